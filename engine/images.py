"""Reading, checking, resizing and converting images. numpy and Pillow only."""
from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from engine.errors import InputError, one_line
from engine.files import atomic_path

DEFAULT_MAX_PIXELS = 64_000_000
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB image from a path, PIL image or uint8/float HxWxC array, EXIF orientation applied.

    Images over ``max_pixels`` are refused from their header, before any pixel is decoded.
    """
    if isinstance(source, Image.Image):
        return to_rgb(_check_size(source, max_pixels, "image"))
    if isinstance(source, np.ndarray):
        return to_rgb(_check_size(_array_to_pil(source), max_pixels, "array"))
    path = Path(source)
    image = open_image(path, max_pixels)
    try:
        with reading(str(path)):
            rgb = to_rgb(image)
    except InputError:
        image.close()
        raise
    if rgb is not image:  # the file's own image is returned when it needed no conversion
        image.close()
    return rgb


def open_encoded(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """An upload opened from its header and checked like a file (not empty, an image, within the limit), no pixel
    decoded yet: a caller sees its format and size before deciding where ``decode_opened`` decodes it."""
    if not data:
        raise InputError(f"{name}: the file is empty")
    with reading(name):
        image = Image.open(io.BytesIO(data))
    return _check_size(image, max_pixels, name)


def decode_opened(image: Image.Image, name: str = "image") -> Image.Image:
    """The pixels of an image from ``open_encoded``, as RGB; InputError naming ``name`` where they are corrupt."""
    with reading(name):
        return to_rgb(image)


@contextmanager
def reading(name: str):
    """Pillow's errors while opening or decoding ``name`` as one InputError line. Its decoders raise many kinds on
    crafted files (OSError, SyntaxError, ValueError, struct.error, IndexError, NotImplementedError, EOFError, a
    DecompressionBombError past its own pixel limit, ...): each is the file's fault, none the server's."""
    try:
        yield
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image file, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"{name}: too many pixels to decode ({one_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise InputError(f"{name}: corrupt or truncated image ({type(err).__name__}: {one_line(err)})") from None


def open_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file lazily (header only) and check it exists, is an image, and is within the limit."""
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty")
    with reading(str(path)):
        image = Image.open(path)
    try:
        return _check_size(image, max_pixels, str(path))
    except InputError:
        image.close()
        raise


def _check_size(image: Image.Image, max_pixels: int, name: str) -> Image.Image:
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(f"{name}: {width}x{height} has {width * height:,} pixels, over the limit of {max_pixels:,}")
    if width == 0 or height == 0:
        raise InputError(f"{name}: the image has no pixels")
    return image


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB in 8 bits: orientation applied, alpha composited on white, 16-bit and float scaled down. An upright
    RGB image is returned as it is (each copy of a 512x512 picture costs ~0.6 ms: a server pays it per request)."""
    image.load()
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_size(width: int, height: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """Output size for an edit at ``resolution``: long side about ``resolution``, sides multiples of
    ``multiple``, the short side rounded up (as the original InstructPix2Pix edit script sizes inputs)."""
    factor = resolution / max(width, height)
    factor = math.ceil(min(width, height) * factor / multiple) * multiple / min(width, height)
    new_width = max(multiple, int(width * factor // multiple) * multiple)
    new_height = max(multiple, int(height * factor // multiple) * multiple)
    return new_width, new_height


def prepare(image: Image.Image, resolution: int | None, multiple: int, crop: bool = True) -> Image.Image:
    """Resize to ``fit_size`` (centre-cropping the few pixels the rounding leaves over, or with ``crop=False``
    stretching to it) or, with ``resolution=None``, pad to the next multiple (``pad_to_multiple``)."""
    if resolution is None:
        return pad_to_multiple(image, multiple)
    size = fit_size(*image.size, resolution, multiple)
    if size == image.size:
        return image
    if not crop:
        return image.resize(size, Image.Resampling.LANCZOS)
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def pad_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """The image extended right and down to sides that are multiples of ``multiple``, mirroring its own pixels
    (no edge of constant colour for the model to edit); ``crop_to`` takes the padding off again."""
    width, height = image.size
    pad_w, pad_h = -width % multiple, -height % multiple
    if not (pad_w or pad_h):
        return image
    array = np.asarray(image)
    return Image.fromarray(np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric"), mode="RGB")


def crop_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) model output with the padding of ``pad_to_multiple`` taken off: the top-left (width, height)."""
    width, height = size
    return image[:, :height, :width]


def carry_change(original: Image.Image, edited: np.ndarray, reconstructed: np.ndarray) -> np.ndarray:
    """The full-size ``original`` plus the edit's change: ``edited`` - ``reconstructed`` (both (3, h, w) in about
    [-1, 1] at the working size: the edit and the VAE's own reconstruction of its input, so the VAE's error is not
    taken for an edit), resized to the original's size. -> (3, H, W) in [-1, 1]."""
    change = resize_planes((edited - reconstructed) / 2.0, original.size, Image.Resampling.BICUBIC)  # [0, 1] units
    base = np.asarray(original, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (3, H, W)
    return np.clip(base + 2.0 * change, -1.0, 1.0)


def to_model_input(images: list[Image.Image]) -> np.ndarray:
    """Same-size RGB images -> float32 (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (B, H, W, 3)
    return (array / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def from_model_output(images: np.ndarray) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> float32 (B, H, W, 3) in [0, 1]."""
    return np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def to_pil(image: np.ndarray) -> Image.Image:
    """float (H, W, 3) in [0, 1] -> RGB PIL image."""
    return Image.fromarray((image * 255).round().astype(np.uint8), mode="RGB")


def output_to_pil(image: np.ndarray) -> Image.Image:
    """float (3, H, W) as the VAE decodes it, in about [-1, 1] -> RGB PIL image: the pixels of
    ``to_pil(from_model_output(...))``, computed plane by plane (no float transpose: 3 ms less at 512x512)."""
    planes = (np.clip(image.astype(np.float32) / 2 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)  # (3, H, W)
    return Image.merge("RGB", [Image.fromarray(plane, mode="L") for plane in planes])


def resize_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float (H, W, 3) in [0, 1] resized to (width, height) with Lanczos, kept in float."""
    planes = resize_planes(image.transpose(2, 0, 1), size, Image.Resampling.LANCZOS)
    return np.clip(planes.transpose(1, 2, 0), 0.0, 1.0).astype(np.float32)


def resize_planes(planes: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """float (C, H, W) resized to (width, height) plane by plane in float (no clipping) -> float32 (C, h, w)."""
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(plane, np.float32), mode="F")
                                .resize(size, resample)) for plane in planes])


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, then rename over the target."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in Image.registered_extensions():
        raise InputError(f"{path}: unknown image extension {suffix or '(none)'}")
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[suffix])
