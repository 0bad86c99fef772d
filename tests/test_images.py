import numpy as np
import pytest
from PIL import Image

from engine import images
from engine.errors import InputError


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif)
    assert images.load_image(path).size == (20, 40)


def test_upright_rgb_is_not_copied_and_files_stay_usable(tmp_path):
    upright = Image.new("RGB", (8, 8), (1, 2, 3))
    assert images.load_image(upright) is upright  # a copy per request is measurable at 512x512
    path = tmp_path / "rgb.png"
    upright.save(path)
    assert images.load_image(path).getpixel((7, 7)) == (1, 2, 3)  # loaded from a file: not closed under the caller


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert images.load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert images.load_image(half).getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "1"])
def test_other_modes_become_rgb(mode):
    assert images.load_image(Image.new(mode, (8, 8))).mode == "RGB"


def test_16_bit_image_is_scaled(tmp_path):
    array = np.full((8, 8), 65535, dtype=np.uint16)
    array[0, 0] = 32768
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    loaded = np.asarray(images.load_image(path))
    assert loaded[1, 1].tolist() == [255, 255, 255] and loaded[0, 0, 0] == 128


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0] * 256)
    path = tmp_path / "p.png"
    im.save(path, transparency=0)
    assert images.load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_pixel_limit_refused_from_the_header(tmp_path):
    path = tmp_path / "big.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 MP, a few kB on disk
    with pytest.raises(InputError, match="over the limit"):
        images.load_image(path)
    with pytest.raises(InputError, match="big.png"):
        images.load_image(path, max_pixels=1000)


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    for path, message in [(empty, "empty"), (text, "not an image"), (truncated, "cut.png"),
                          (tmp_path / "missing.png", "no such image")]:
        with pytest.raises(InputError, match=message):
            images.load_image(path)


@pytest.mark.parametrize(
    "size, resolution, expected",
    [((512, 512), 512, (512, 512)), ((1024, 768), 512, (512, 384)), ((640, 480), 512, (512, 384)),
     ((300, 1000), 512, (192, 640)), ((100, 100), 512, (512, 512))],
)
def test_fit_size(size, resolution, expected):
    assert images.fit_size(*size, resolution) == expected


def test_prepare_keeps_a_divisible_size_and_pads_any_other():
    im = Image.new("RGB", (48, 32))
    assert images.prepare(im, None, 16) is im
    assert images.prepare(im, None, 64).size == (64, 64)
    assert images.crop_to(np.zeros((3, 64, 64)), im.size).shape == (3, 32, 48)


def test_model_io_round_trip():
    rng = np.random.default_rng(0)
    ims = [Image.fromarray((rng.random((8, 12, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    x = images.to_model_input(ims)
    assert x.shape == (2, 3, 8, 12) and x.min() >= -1 and x.max() <= 1
    back = images.from_model_output(x)
    assert np.array_equal(np.asarray(images.to_pil(back[1])), np.asarray(ims[1]))


def test_save_image_is_atomic_and_checks_extension(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")
    with pytest.raises(InputError, match="extension"):
        images.save_image(Image.new("RGB", (4, 4)), tmp_path / "out.xyz")
    images.save_image(Image.new("RGB", (4, 4)), target)
    assert Image.open(target).size == (4, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_output_to_pil_equals_the_float_path():
    decoded = np.random.default_rng(1).normal(0, 0.8, (3, 64, 48)).astype(np.float32)  # some outside [-1, 1]
    decoded[0, 0, :5] = [-1.0, 1.0, 0.0, 1 / 255 - 1, 0.5 / 127.5 - 1]  # the edges, and rounding ties
    expected = images.to_pil(images.from_model_output(decoded[None])[0])
    assert np.array_equal(np.asarray(images.output_to_pil(decoded)), np.asarray(expected))


def test_resize_array_keeps_float_range():
    out = images.resize_array(np.random.default_rng(0).random((8, 8, 3)).astype(np.float32), (10, 6))
    assert out.shape == (6, 10, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
