"""EditPipeline: image + instruction in, edited image out. The one denoising loop, for every backend."""
from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from engine import images as imaging
from engine import tiling, vae_tiles
from engine.backends import BUNDLE_BACKENDS, Backend, backend_module, bundle_runtime
from engine.caching import StepCache
from engine.checkpoints import resolve_model
from engine.config import EditConfig, ModelConfig, Resolution, VaeTile, read_model_config
from engine.manifest import is_bundle, read_bundle
from engine.errors import InputError, NumericalError
from engine.extras import available
from engine.denoising import DenoisingLoop, Edit
from engine.guidance import COND, GuidancePlan, GuidedStep
from engine.noise import NoiseSource, resolve_seeds
from engine.presets import preset_config
from engine.rows import UNetRows
from engine.samplers import SAMPLERS
from engine.specs import TEXT_ENCODER, VAE_DECODER, VAE_DECODER_FP32, VAE_ENCODER, Profile
from engine.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

MODEL_ENV = "IP2P_MODEL"  # the model used when none is named
DEFAULT_MODEL = Path(__file__).parent / "models" / "shapes"  # shipped: trained by training/configs/shapes.yaml
DEFAULT_BUNDLE = Path(__file__).parent / "models" / "shapes-onnx"  # the same model exported (fp16 ONNX)
# Shipped models loadable by name: the diffusers folder, and its bundle beside it (<name>-onnx).
SHIPPED = ("shapes", "shapes-distilled")  # shapes-distilled: training/configs/shapes-distilled.yaml
TORCH_STACK = ("torch", "diffusers", "transformers")  # what the torch backend imports
TEXT_CACHE_SIZE = 32  # instructions whose embeddings are kept
VAE_MEMORY = 1 << 30  # bytes of VAE activations past which vae_tile="auto" tiles (the EditPipeline's vae_memory)
VAE_LIVE_VALUES = 4  # activations of the full-resolution level alive at once in a VAE call, per channel and pixel
UNET_MEMORY = 3 << 30  # bytes of UNet activations a call may hold: more rows are split into calls (unet_memory)
# activations alive at once in a UNet row, per channel of its full-resolution level and latent pixel: SD 1.5 in
# bfloat16 on a CPU grew 0.41 GiB a row at 1024x1024 (its transformer's feed-forward is 8 widths wide there)
UNET_LIVE_VALUES = 42


@dataclass
class EditResult:
    """Edited images (PIL, or float32 (B, H, W, 3) in [0, 1]), the seed of each, seconds per stage (adding up to
    the edit's wall time; a tiled VAE's tiles are inside ``image_encode`` and ``decode``), the VAE tiles run per
    stage (``tiles``: absent where the VAE ran whole), and the work done per image: UNet rows evaluated (a 20-step
    edit with all three branches: 60) and their MAC-weighted sum, in whole-UNet rows (the same while every row
    runs the whole UNet)."""

    images: list[Image.Image] | np.ndarray | list[np.ndarray]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: list[int] = field(default_factory=list)
    unet_work: list[float] = field(default_factory=list)
    tiles: dict[str, int] = field(default_factory=dict)


class StageClock:
    """Wall-clock seconds per stage with no gaps: a lap charges the time since the previous lap to its stage, so
    the stages add up to the whole call; and the VAE tiles each stage ran, told to ``on_tiles(stage, done, total)``
    as they run."""

    def __init__(self, on_tiles: Callable[[str, int, int], None] | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.tiles: dict[str, int] = defaultdict(int)
        self.on_tiles = on_tiles
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now


class EditPipeline:
    """InstructPix2Pix editing over any backend: tokenise, encode, denoise with 3-way guidance, decode."""

    def __init__(
        self,
        backend: Backend,
        model: ModelConfig,
        tokenizer: ClipTokenizer,
        *,
        null_embedding: np.ndarray | None = None,
        profile: Profile | None = None,
        max_image_pixels: int = imaging.DEFAULT_MAX_PIXELS,
        progress: bool = True,
        vae_memory: int = VAE_MEMORY,
        unet_memory: int = UNET_MEMORY,
    ):
        self.backend, self.model, self.tokenizer = backend, model, tokenizer
        self.profile = profile  # shapes an exported bundle accepts; None: any
        self.max_image_pixels, self.progress = max_image_pixels, progress
        self.vae_memory = vae_memory  # bytes of VAE activations past which vae_tile="auto" tiles
        self.unet_memory = unet_memory  # bytes of UNet activations past which a call's rows are split
        self._null_embedding: Any = None if null_embedding is None else backend.asarray(null_embedding)
        self._text_cache: OrderedDict[str, Any] = OrderedDict()  # instruction -> (1, 77, D), most recent last
        self._tiled_encoder: vae_tiles.TiledVae | None = None  # made at the first tiled call
        self._tiled_decoder: vae_tiles.TiledVae | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        backend: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        *,
        config: str | os.PathLike | None = None,
        variant: str | None = None,
        backend_options: dict | None = None,
        max_image_pixels: int = imaging.DEFAULT_MAX_PIXELS,
        progress: bool = True,
    ) -> "EditPipeline":
        """Load a diffusers folder, hub id or single .ckpt/.safetensors file with ``backend="torch"``
        (``config`` names the diffusers folder or hub id that supplies a single file's configs and
        tokenizer; ``variant`` picks variant weight files such as fp16), or an exported bundle with
        ``backend="onnxruntime"``/``"openvino"``/``"tensorrt"``. ``backend=None`` is the fastest exact runtime
        installed for a bundle (``engine.backends.bundle_runtime``: OpenVINO for ONNX on a CPU), else torch. ``dtype`` defaults to the bundle's precision for bundles, for torch to float16 on CUDA and float32 elsewhere.
        With no ``model``: $IP2P_MODEL, else the shipped shapes model (its ONNX bundle where torch is
        not installed or a bundle backend is asked for)."""
        model = locate_model(model, backend)
        bundle = read_bundle(model) if is_bundle(model) else None
        if backend is None and bundle is not None:
            backend, why = bundle_runtime(bundle.format, device)
            log.info("%s: running on %s (%s)", model, backend, why)
        backend = backend or "torch"
        module = backend_module(backend)
        options = backend_options or {}
        check_options(module, backend, options)
        if bundle is not None:
            if backend not in BUNDLE_BACKENDS:
                raise InputError(f"{model}: an exported bundle; run it with backend {', '.join(BUNDLE_BACKENDS)}")
            runner = module.load(bundle, device=device, dtype=dtype, **options)
            return cls(runner, bundle.model, ClipTokenizer(bundle.tokenizer_dir),
                       null_embedding=np.load(bundle.null_embedding_file), profile=bundle.profile,
                       max_image_pixels=max_image_pixels, progress=progress)
        if backend in BUNDLE_BACKENDS:
            raise InputError(f"{model}: backend {backend!r} runs exported bundles; export it first with `ip2p export`")
        source = resolve_model(model, config, variant)
        model_config = read_model_config(source.folder)
        tokenizer = ClipTokenizer(source.folder / "tokenizer")
        runner = module.load(source, device=device, dtype=dtype, **options)
        return cls(runner, model_config, tokenizer, max_image_pixels=max_image_pixels, progress=progress)

    def edit(
        self,
        image: imaging.ImageInput | Sequence[imaging.ImageInput],
        instruction: str | Sequence[str],
        *,
        preset: str = "exact",
        steps: int | None = None,
        text_guidance: float | None = None,
        image_guidance: float | None = None,
        sampler: str | None = None,
        seed: int | Sequence[int] | None = None,
        latents: Any = None,
        resolution: Resolution = "auto",
        keep_size: bool = False,
        keep_detail: bool = False,
        vae_tile: VaeTile = "auto",
        output_type: str = "pil",
        guidance_interval: tuple[float, float] | None = None,
        adaptive_guidance: float | None = None,
        cache_interval: int | None = None,
        cache_depth: int | None = None,
    ) -> EditResult:
        """Edit one image or a list. ``preset`` sets steps, sampler and guidance savings (``engine.presets``);
        a setting given here overrides it (None: the preset's; exact: 20 euler_ancestral steps, s_T 7.5,
        s_I 1.5; a distilled model's presets: its own steps and scales). ``steps=100`` reproduces the paper;
        ``resolution="auto"`` is the model's own (512 for SD 1.5), ``None`` edits at the input's own size (any
        size: padded by mirroring, cropped back). ``keep_detail``: edit at the resolution and add only the change
        to the full-size input. ``vae_tile``: the VAE's tile side in pixels, None for never, "auto" past the
        pipeline's ``vae_memory``. ``latents``: unit-variance initial noise (B, 4, H/8, W/8), scaled by the
        scheduler's init_noise_sigma as diffusers does. ``guidance_interval`` (lo, hi]: guide
        only for sigma inside it; ``adaptive_guidance``: the cosine past which a branch stops;
        ``cache_interval``/``cache_depth``: step caching, the whole UNet every ``cache_interval``-th call and
        only its ``cache_depth`` outer levels between (all approximate)."""
        config = preset_config(
            preset, dict(resolution=resolution, keep_size=keep_size, keep_detail=keep_detail, vae_tile=vae_tile,
                         output_type=output_type), self.model.student,
            steps=steps, text_guidance=text_guidance, image_guidance=image_guidance, sampler=sampler,
            guidance_interval=guidance_interval, adaptive_guidance=adaptive_guidance,
            cache_interval=cache_interval, cache_depth=cache_depth,
        )
        batch = list(image) if isinstance(image, (list, tuple)) else [image]
        return self.run(batch, instruction, config, seed=seed, latents=latents)

    def run(
        self,
        images: list[imaging.ImageInput],
        instruction: str | Sequence[str],
        config: EditConfig,
        *,
        seed: int | Sequence[int] | None = None,
        latents: Any = None,
        guidance_scales: Sequence[tuple[float, float]] | None = None,
        on_step: Callable[[int], Collection[int] | None] | None = None,
        on_tiles: Callable[[str, int, int], None] | None = None,
    ) -> EditResult:
        """Edit ``images`` with ``config``; images that end up the same size are denoised as one batch.

        ``guidance_scales``: (s_T, s_I) per image, in place of the config's (each image gets the pixels it
        would get alone with its own). ``on_step(steps_done)`` runs after every denoising step of every
        batch; raising ``engine.errors.Cancelled`` there stops the edit before the next UNet call, and
        returning indices into ``images`` drops those images: they cost no UNet rows from the next step on
        and come back mid-grey, while the others keep exactly their pixels. ``on_tiles(stage, done, total)`` runs
        after every call of a tiled VAE (``stage``: "image_encode" or "decode")."""
        clock = StageClock(on_tiles)
        if not images:
            raise InputError("no images to edit")
        instructions = _instructions_for(instruction, len(images))
        scales = _scales_for(guidance_scales, config, len(images))
        loaded, prepared = self._load(images, config)
        seeds = resolve_seeds(seed, len(images))
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(prepared):
            groups[im.size].append(i)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if len(groups) > 1:
                raise InputError("explicit latents need all images to be edited at the same size")
        clock.lap("preprocess")

        outputs: list[np.ndarray] = [np.empty(0)] * len(images)
        evaluations, work = [0] * len(images), [0.0] * len(images)
        chunks = _chunked(groups.values(), self.profile.batch[2] if self.profile else len(images))
        self._check_calls(config, [(prepared[members[0]].size, len(members)) for _, members in chunks], scales)
        for start, members in chunks:
            pixels = imaging.to_model_input([prepared[i] for i in members])
            noise = None if latents is None else latents[start : start + len(members)]
            clock.lap("preprocess")
            edit = self._begin(pixels, [instructions[i] for i in members], [seeds[i] for i in members], noise,
                               config, [scales[i] for i in members], [loaded[i] for i in members], clock)
            self._denoise(edit, on_step and _members_callback(on_step, members))
            for i, out, count, done in zip(members, self._end(edit), edit.rows.evaluations, edit.rows.work):
                outputs[i], evaluations[i], work[i] = out, count, done

        result = _to_output(outputs, config, [im.size for im in loaded])
        clock.lap("postprocess")
        return EditResult(images=result, seeds=seeds, timings=dict(clock.seconds), unet_evaluations=evaluations,
                          unet_work=work, tiles=dict(clock.tiles))

    def begin(self, image: imaging.ImageInput, instruction: str, config: EditConfig, seed: int,
              scales: tuple[float, float] | None = None,
              on_tiles: Callable[[str, int, int], None] | None = None) -> Edit:
        """One image's edit, its text and image encoded, ready for a ``DenoisingLoop`` (the server's unit of work;
        ``scales``: (s_T, s_I) in place of the config's). ``finish`` it once the loop is done with it."""
        clock = StageClock(on_tiles)
        loaded, prepared = self._load([image], config)
        per_image = _scales_for(None if scales is None else [scales], config, 1)
        self._check_calls(config, [(prepared[0].size, 1)], per_image)
        pixels = imaging.to_model_input(prepared)
        clock.lap("preprocess")
        return self._begin(pixels, [instruction], [seed], None, config, per_image, loaded, clock)

    def _load(self, images: list[imaging.ImageInput],
              config: EditConfig) -> tuple[list[Image.Image], list[Image.Image]]:
        """The images read and checked, and each sized for the edit (the working resolution, or padded to the
        model's multiple)."""
        loaded = [imaging.load_image(im, self.max_image_pixels) for im in images]
        resolution, multiple = self._sizing(config.resolution)
        return loaded, [imaging.prepare(im, resolution, multiple, crop=not config.keep_detail) for im in loaded]

    def finish(self, edit: Edit) -> EditResult:
        """The result of an edit from ``begin`` whose denoising is done: decoded, as its config asks."""
        context: _Context = edit.owner
        context.clock.lap("denoise")  # since begin: the steps, and the waits between them in a shared loop
        result = _to_output(self._end(edit), context.config, [im.size for im in context.originals])
        context.clock.lap("postprocess")
        return EditResult(images=result, seeds=context.seeds, timings=dict(context.clock.seconds),
                          unet_evaluations=edit.rows.evaluations, unet_work=edit.rows.work,
                          tiles=dict(context.clock.tiles))

    def warmup(self, sizes: Sequence[tuple[int, int]] = ()) -> dict[str, float]:
        """One-step edits at each edit size (width, height; none given: the model's own), two for every UNet row
        count a step can ask of an image (1, 2 and 3; a student's 1) and the VAE's, so that compilation, graph
        capture (torch's CUDA graph trees record at a shape's second call) and lazy set-up happen now, not in the
        first requests. Seconds per size ("WxH")."""
        student = self.model.student
        scales = [(student.text_range[0], student.image_range[0])] if student else [(1.0, 1.0), (7.5, 1.0), (7.5, 1.5)]
        config = EditConfig(steps=1, resolution=None, output_type="np")
        side = self.model.default_resolution
        seconds = {}
        for width, height in sizes or [(side, side)]:
            start = time.perf_counter()
            for scale in [*scales, *scales]:
                self.run([Image.new("RGB", (width, height), (127, 127, 127))], "warm up", config, seed=0,
                         guidance_scales=[scale])
            seconds[f"{width}x{height}"] = time.perf_counter() - start
            log.info("warm at %dx%d: %.2f s", width, height, seconds[f"{width}x{height}"])
        return seconds

    def denoising_loop(self, on_call: Callable[[int, int], None] | None = None) -> DenoisingLoop:
        """An empty loop for this pipeline's edits, its calls within the UNet rows a bundle's profile takes and
        the rows whose activations ``unet_memory`` holds."""
        limits = (1, None) if self.profile is None else (self.profile.batch[0], 3 * self.profile.batch[2])
        return DenoisingLoop(self.backend, limits, on_call, self.unet_rows_within)

    def unet_rows_within(self, latent_pixels: int) -> int:
        """UNet rows one call of ``latent_pixels`` (h * w) may take within ``unet_memory`` (at least one)."""
        row = latent_pixels * self.model.unet_width * UNET_LIVE_VALUES * self.backend.value_bytes
        return max(1, self.unet_memory // row)

    @staticmethod
    def _restore_size(edited: np.ndarray, reconstructed: np.ndarray | None, original: Image.Image,
                      config: EditConfig) -> np.ndarray:
        """(3, H, W) edited pixels at the input's own size where the config asks for it: the padding of
        ``resolution=None`` cropped off; with ``keep_detail``, the change from the VAE's ``reconstructed`` input
        carried onto the full-size ``original``."""
        if config.resolution is None:
            return imaging.crop_to(edited, original.size)
        if reconstructed is not None:
            return imaging.carry_change(original, edited, reconstructed)
        return edited

    def _sizing(self, resolution: Resolution) -> tuple[int | None, int]:
        """The long side images are resized to (None: kept) and the multiple their sides are rounded to."""
        resolution = self.model.default_resolution if resolution == "auto" else resolution
        return resolution, self.model.downsampling if resolution is None else math.lcm(64, self.model.downsampling)

    def edit_size(self, size: tuple[int, int], resolution: Resolution = "auto") -> tuple[int, int]:
        """(width, height) an input of ``size`` is denoised at: requests of one size can share a batch."""
        target, multiple = self._sizing(resolution)
        if target is None:
            return size
        return imaging.fit_size(*size, target, multiple)

    def _check_size(self, size: tuple[int, int], count: int, what: str = "the edit") -> None:
        """Refuse a size outside an exported bundle's profile, stating the allowed range."""
        if self.profile is None:
            return
        width, height = size
        (h_lo, _, h_hi), (w_lo, _, w_hi), (b_lo, _, _) = self.profile.height, self.profile.width, self.profile.batch
        if not (h_lo <= height <= h_hi and w_lo <= width <= w_hi):
            raise InputError(f"{what}: {width}x{height} is outside this bundle's profile: width {w_lo}-{w_hi}, "
                             f"height {h_lo}-{h_hi} pixels; pass a resolution inside it or export with a wider one")
        if count < b_lo:
            raise InputError(f"this bundle was exported for at least {b_lo} images per call, got {count}")

    def _check_calls(self, config: EditConfig, calls: list[tuple[tuple[int, int], int]],
                     scales: list[tuple[float, float]]) -> None:
        """Refuse, before any work starts, a call (size, images) the bundle or the VAE tiles cannot run, or settings
        a distilled student cannot take."""
        student = self.model.student
        if student is not None:
            if not config.guidance.exact or config.step_cache.on:
                raise InputError("a distilled model runs one UNet row a step: guidance intervals, adaptive guidance "
                                 "and step caching do not apply to it; leave them off")
            for text_scale, image_scale in scales:
                student.check_scales(text_scale, image_scale)
        self._check_step_cache(config.step_cache)
        for size, count in calls:
            self._check_size(size, count)
            self.vae_tiling(config.vae_tile, size, count)

    def _check_step_cache(self, cache: StepCache) -> None:
        """Refuse step caching up front where the backend lacks the split UNet, naming the fix."""
        if not cache.on:
            return
        missing = [name for name in cache.components if not self.backend.has(name)]
        if missing:
            raise InputError(f"step caching at depth {cache.depth} needs the split UNet ({', '.join(missing)}), which "
                             f"this bundle lacks: export it with `ip2p export MODEL OUT --step-cache {cache.depth}`")

    def encode_text(self, instructions: list[str]) -> Any:
        """(B, 77, D) text embeddings on the backend; recent instructions come from a small LRU cache."""
        missing = list(dict.fromkeys(s for s in instructions if s not in self._text_cache))
        if missing:
            ids = self.backend.asarray(self.tokenizer(missing))
            embeddings = self.backend.run(TEXT_ENCODER.name, {"input_ids": ids})["text_embeddings"]
            for i, text in enumerate(missing):
                self._text_cache[text] = embeddings[i : i + 1]
        for text in instructions:
            self._text_cache.move_to_end(text)
        rows = [self._text_cache[s] for s in instructions]
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return rows[0] if len(rows) == 1 else self.backend.concat(rows, 0)

    def null_embedding(self) -> Any:
        """(1, 77, D) embedding of the empty instruction, computed once."""
        if self._null_embedding is None:
            self._null_embedding = self.encode_text([""])
        return self._null_embedding

    def _begin(
        self,
        pixels: np.ndarray,
        instructions: list[str],
        seeds: list[int],
        latents: np.ndarray | None,
        config: EditConfig,
        scales: list[tuple[float, float]],
        originals: list[Image.Image],
        clock: StageClock,
    ) -> Edit:
        """(B, 3, H, W) pixels in [-1, 1] of one size -> their edit, text and image encoded, at its first step."""
        student = self.model.student is not None
        plan = GuidancePlan(len(instructions), [t for t, _ in scales], [i for _, i in scales], config.guidance,
                            distilled=student)
        text = self.encode_text(instructions)  # (B, 77, D)
        null = self.null_embedding() if set(plan.needed) != {COND} else None  # (1, 77, D)
        clock.lap("text_encode")

        tiles = self.vae_tiling(config.vae_tile, pixels.shape[:1:-1], len(pixels))
        image_latents = self.encode_image(pixels, tiles, clock)  # (B, 4, h, w)
        clock.lap("image_encode")

        be = self.backend
        sampler = SAMPLERS[config.sampler]
        schedule = sampler.schedule(self.model.scheduler, config.steps)
        noise = NoiseSource(seeds)
        x = self._initial_latents(noise, latents, pixels.shape) * schedule.init_noise_sigma  # (B, 4, h, w)
        shape = tuple(x.shape[1:])
        extra = sampler.arguments(schedule, lambda: be.asarray(noise.randn(shape)))
        guided = GuidedStep(plan, schedule.timestep, lambda parts: be.concat(parts, 0), self.model.prediction_type,
                            to_numpy=be.to_numpy)
        guidance = be.asarray(np.asarray(scales, np.float32)) if student else None  # (B, 2): the student's input
        rows = UNetRows(be, text, null, image_latents, config.step_cache, guidance)
        context = _Context(config, seeds, originals, pixels.shape, tiles, image_latents, clock)
        return Edit(sampler.steps(x, schedule.sigmas, **extra), guided, rows, schedule.sigmas, owner=context)

    def _end(self, edit: Edit) -> list[np.ndarray]:
        """A denoised edit's (3, H, W) pixels per image, decoded (dropped images mid-grey), at the size its config
        asks for."""
        context: _Context = edit.owner
        clock = context.clock
        decoded = self._decode_kept(edit.sample, edit.plan.gone, context.pixel_shape, context.tiles, clock)
        own: Any = [None] * len(decoded)
        if context.config.keep_detail:
            own = self.decode(context.image_latents * self.model.scaling_factor, context.tiles, clock)
        clock.lap("decode")
        restored = [self._restore_size(*parts, context.config) for parts in zip(decoded, own, context.originals)]
        clock.lap("postprocess")
        return restored

    def vae_tiling(self, tile: VaeTile, size: tuple[int, int], count: int) -> tiling.Tiling | None:
        """The latent-grid tiling of the VAE for ``count`` pictures of ``size`` (width, height) pixels; None where
        it runs whole: ``tile`` None, or the picture fits one tile, or ("auto") its activations stay within
        ``vae_memory``. Auto tiles are the largest that ``vae_memory`` holds (at least the model's own resolution;
        within a bundle's profile): the larger the tile, the nearer its GroupNorm statistics are the whole
        picture's."""
        factor, multiple = self.model.vae_factor, self.model.downsampling
        if isinstance(tile, int) and tile % multiple:
            raise InputError(f"vae_tile: {tile} px is not a multiple of {multiple} (this model's downsampling)")
        if tile == "auto":
            if count * self._vae_bytes(size[0] * size[1], self.backend.value_bytes) <= self.vae_memory:
                return None
            largest = math.isqrt(self.vae_memory // self._vae_bytes(1)) // multiple * multiple
            tile = max(self.model.default_resolution, largest)
            if self.profile is not None:
                tile = min(tile, self.profile.height[2], self.profile.width[2])
        if tile is None or max(size) <= tile:
            return None
        if self.profile is not None:
            self._check_size((min(tile, size[0]), min(tile, size[1])), count, what="vae_tile")
        overlap = max(1, tile // factor // 4)  # a quarter of the tile, as diffusers' tiled VAE
        return tiling.Tiling(tile // factor, overlap)

    def _vae_bytes(self, pixels: int, value_bytes: int = 4) -> int:
        """Estimated bytes of VAE activations for a picture of ``pixels``: its full-resolution level, ``value_bytes``
        a value (the whole networks compute in the backend's dtype; the tile networks normalise in float32)."""
        return pixels * self.model.vae_width * VAE_LIVE_VALUES * value_bytes

    def encode_image(self, pixels: np.ndarray, tiles: tiling.Tiling | None = None,
                     clock: StageClock | None = None) -> Any:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, 4, H/f, W/f) image latents on the backend (the encoder's mode),
        tile by tile where ``tiles`` says so."""
        be = self.backend
        if tiles is None:
            return be.run(VAE_ENCODER.name, {"images": be.asarray(pixels)})["image_latents"]
        if self._tiled_encoder is None:
            self._tiled_encoder = vae_tiles.encoder(be, self.model.vae_norms)
        return be.asarray(self._tiled(self._tiled_encoder, pixels, tiles, self.model.vae_factor, 1, "image_encode",
                                      clock))

    def decode(self, latents: Any, tiles: tiling.Tiling | None = None, clock: StageClock | None = None) -> np.ndarray:
        """(B, 4, h, w) latents, scaled as the sampler makes them -> (B, 3, fh, fw) pixels in about [-1, 1], tile by
        tile where ``tiles`` says so."""
        if tiles is None:
            return self._decode(latents)
        if self._tiled_decoder is None:
            self._tiled_decoder = vae_tiles.decoder(self.backend, self.model.vae_norms, self._decode)
        return self._tiled(self._tiled_decoder, self.backend.to_numpy(latents), tiles, 1, self.model.vae_factor,
                           "decode", clock)

    def _tiled(self, network: vae_tiles.TiledVae, x: np.ndarray, tiles: tiling.Tiling, in_scale: int, out_scale: int,
               stage: str, clock: StageClock | None) -> np.ndarray:
        """``network`` over ``tiles`` with a progress bar, as many tiles per call as ``vae_memory`` holds (within a
        bundle's profile), and the tiles counted on ``clock`` under ``stage``."""
        per_call = max(1, self.vae_memory // (len(x) * self._vae_bytes((tiles.tile * self.model.vae_factor) ** 2)))
        if self.profile is not None:
            per_call = max(1, min(per_call, self.profile.batch[2] // len(x)))
        count = tiles.count(x.shape[2] // in_scale, x.shape[3] // in_scale)
        total, before = count * network.passes, clock.tiles[stage] if clock is not None else 0
        with tqdm(total=total, desc=f"{stage} tiles", unit="tile", disable=not self.progress, leave=False) as bar:
            def done(ran: int) -> None:
                bar.update(ran)
                if clock is not None:
                    clock.tiles[stage] += ran
                    if clock.on_tiles is not None:
                        clock.on_tiles(stage, clock.tiles[stage] - before, total)

            return network(x, tiles, in_scale, out_scale, per_call, done)

    def _latent_shape(self, pixel_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(C, h, w) of one image's latents for (B, 3, H, W) pixels."""
        factor = self.model.vae_factor
        return self.model.latent_channels, pixel_shape[2] // factor, pixel_shape[3] // factor

    def _initial_latents(self, noise: NoiseSource, latents: np.ndarray | None, pixel_shape: tuple[int, ...]) -> Any:
        """Unit-variance starting noise (B, 4, h, w) on the backend: the seeds', or the caller's, checked."""
        shape, count = self._latent_shape(pixel_shape), pixel_shape[0]
        if latents is None:
            return self.backend.asarray(noise.randn(shape))
        if latents.shape != (count, *shape):
            raise InputError(f"latents must have shape {(count, *shape)} for these images, got {latents.shape}")
        return self.backend.asarray(latents)

    def _denoise(self, edit: Edit, on_step: Callable[[int], list[int]] | None) -> None:
        """Run one edit's steps in a loop of its own; ``on_step(steps_done)`` may drop images after each."""
        loop = self.denoising_loop()
        loop.add(edit)
        with tqdm(total=edit.total, desc="denoising", unit="step", disable=not self.progress, leave=False) as bar:
            while loop:
                loop.step()
                bar.update()
                if on_step is not None:
                    edit.plan.drop(on_step(edit.done))  # cancelled images cost no rows from the next step on
        edit.owner.clock.lap("denoise")

    def _decode_kept(self, x: Any, gone: set[int], pixel_shape: tuple[int, ...], tiles: tiling.Tiling | None,
                     clock: StageClock) -> np.ndarray:
        """(B, 3, H, W) decoded pixels of the images not dropped; dropped ones are not decoded (mid-grey)."""
        count = pixel_shape[0]
        kept = [i for i in range(count) if i not in gone]
        if len(kept) == count:
            return self.decode(x, tiles, clock)
        decoded = np.zeros((count, 3, pixel_shape[2], pixel_shape[3]), np.float32)
        if kept:
            decoded[kept] = self.decode(self.backend.concat([x[i : i + 1] for i in kept], 0), tiles, clock)
        return decoded

    def _decode(self, latents: Any) -> np.ndarray:
        """(B, 3, H, W) decoded pixels; a reduced-precision overflow is retried with the float32 decoder."""
        be = self.backend
        decoded = be.to_numpy(be.run(VAE_DECODER.name, {"latents": latents})["images"])
        fallback = VAE_DECODER_FP32
        if not np.isfinite(decoded).all() and be.has(fallback):
            log.warning("the VAE decoder produced NaN/Inf in reduced precision; decoding again in float32")
            decoded = be.to_numpy(be.run(fallback, {"latents": latents})["images"])
        if not np.isfinite(decoded).all():
            raise NumericalError("the decoded image contains NaN or Inf (the model's weights or latents are broken)")
        return decoded


@dataclass
class _Context:
    """What the pipeline keeps with an edit in the loop to finish it: its config, seeds, the loaded inputs, the
    (B, 3, H, W) shape of its pixels, the VAE's tiling, the image latents (for ``keep_detail``), its clock."""

    config: EditConfig
    seeds: list[int]
    originals: list[Image.Image]
    pixel_shape: tuple[int, ...]
    tiles: tiling.Tiling | None
    image_latents: Any
    clock: StageClock


def _to_output(outputs: list[np.ndarray], config: EditConfig, sizes: list[tuple[int, int]]) -> Any:
    """Decoded (3, H, W) images as the config asks: PIL images or float32 arrays in [0, 1], at the inputs'
    ``sizes`` with ``keep_size``."""
    if config.output_type == "pil" and not config.keep_size:
        return [imaging.output_to_pil(out) for out in outputs]
    arrays = [imaging.from_model_output(out[None])[0] for out in outputs]  # (H, W, 3) in [0, 1]
    if config.keep_size:
        arrays = [imaging.resize_array(out, size) if out.shape[1::-1] != size else out
                  for out, size in zip(arrays, sizes)]
    if config.output_type == "pil":
        return [imaging.to_pil(out) for out in arrays]
    return np.stack(arrays) if len({out.shape for out in arrays}) == 1 else arrays


def _chunked(groups: Collection[list[int]], max_batch: int) -> list[tuple[int, list[int]]]:
    """(offset in its group, members) of each call: a bundle's profile caps the images per call."""
    return [(start, group[start : start + max_batch]) for group in groups for start in range(0, len(group), max_batch)]


def _members_callback(on_step: Callable[[int], Collection[int] | None],
                      members: list[int]) -> Callable[[int], list[int]]:
    """``on_step`` for one batch of ``run``'s images: the dropped images it names, as indices into the batch."""
    def batch_step(done: int) -> list[int]:
        dropped = set(on_step(done) or ())
        return [j for j, i in enumerate(members) if i in dropped]

    return batch_step


def locate_model(model: str | os.PathLike | None, backend: str | None = None) -> str | os.PathLike:
    """What ``from_pretrained(model, backend)`` loads: ``model``, else $IP2P_MODEL, else the shipped default; a
    shipped model's name (``SHIPPED``) becomes its folder or bundle."""
    model = model or os.environ.get(MODEL_ENV) or default_model(backend)
    return default_model(backend, str(model)) if str(model) in SHIPPED and not Path(model).exists() else model


def default_model(backend: str | None = None, name: str = "shapes") -> Path:
    """A shipped model (``SHIPPED``), trained by the project on synthetic shapes edits: its diffusers folder for
    the torch backend, its fp16 ONNX bundle for the bundle backends; with no backend named, the folder where
    torch is installed, else the bundle."""
    wants_bundle = backend in BUNDLE_BACKENDS or (backend is None and not available(*TORCH_STACK))
    path = DEFAULT_MODEL.parent / (f"{name}-onnx" if wants_bundle else name)
    if not (path / ("manifest.json" if wants_bundle else "model_index.json")).is_file():
        raise InputError(f"no model given and the shipped model is missing from {path}: "
                         f"pass a model, or set {MODEL_ENV}")
    return path


def check_options(module, backend: str, options: dict) -> None:
    """Refuse backend options that ``backend`` does not take, naming them, before anything loads."""
    taken = set(inspect.signature(module.load).parameters) - {"source", "bundle", "device", "dtype"}
    unknown = sorted(set(options) - taken)
    if unknown:
        raise InputError(f"backend {backend!r} does not take option {', '.join(unknown)} "
                         f"(it takes: {', '.join(sorted(taken)) or 'none'})")


def _scales_for(scales: Sequence[tuple[float, float]] | None, config: EditConfig, count: int) -> list[tuple[float, float]]:
    """(s_T, s_I) per image: the config's for all, or one pair per image, each a number."""
    if scales is None:
        return [(config.text_guidance, config.image_guidance)] * count
    pairs = [tuple(pair) for pair in scales]
    if len(pairs) != count:
        raise InputError(f"give one (text, image) guidance pair per image: got {len(pairs)} for {count} images")
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(v, (int, float)) and v == v for v in pair):
            raise InputError(f"a guidance pair is two numbers (text, image), got {pair!r}")
    return [(float(t), float(i)) for t, i in pairs]


def _instructions_for(instruction: str | Sequence[str], count: int) -> list[str]:
    if isinstance(instruction, str):
        return [instruction] * count
    instructions = list(instruction)
    if len(instructions) != count or not all(isinstance(s, str) for s in instructions):
        raise InputError(f"give one instruction, or one per image: got {len(instructions)} for {count} images")
    return instructions
