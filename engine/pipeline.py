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
from engine.backends import BUNDLE_BACKENDS, Backend, backend_module, bundle_runtime
from engine.caching import FeatureCache, StepCache
from engine.checkpoints import resolve_model
from engine.config import EditConfig, ModelConfig, Resolution, read_model_config
from engine.manifest import is_bundle, read_bundle
from engine.errors import InputError, NumericalError
from engine.extras import available
from engine.guidance import COND, UNCOND, GuidancePlan, Groups, guided_denoiser
from engine.noise import NoiseSource, resolve_seeds
from engine.presets import preset_config
from engine.samplers import SAMPLERS
from engine.specs import TEXT_ENCODER, VAE_DECODER, VAE_DECODER_FP32, VAE_ENCODER, Profile
from engine.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

MODEL_ENV = "IP2P_MODEL"  # the model used when none is named
DEFAULT_MODEL = Path(__file__).parent / "models" / "shapes"  # shipped: trained by training/configs/shapes.yaml
DEFAULT_BUNDLE = Path(__file__).parent / "models" / "shapes-onnx"  # the same model exported (fp16 ONNX)
TORCH_STACK = ("torch", "diffusers", "transformers")  # what the torch backend imports
TEXT_CACHE_SIZE = 32  # instructions whose embeddings are kept


@dataclass
class EditResult:
    """Edited images (PIL, or float32 (B, H, W, 3) in [0, 1]), the seed of each, seconds per stage (adding up to
    the edit's wall time), and the work done per image: UNet rows evaluated (a 20-step edit with all three
    branches: 60) and their MAC-weighted sum, in whole-UNet rows (the same while every row runs the whole UNet)."""

    images: list[Image.Image] | np.ndarray | list[np.ndarray]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: list[int] = field(default_factory=list)
    unet_work: list[float] = field(default_factory=list)


class StageClock:
    """Wall-clock seconds per stage with no gaps: a lap charges the time since the previous lap to its stage, so
    the stages add up to the whole call."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
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
        all_branches: bool = False,
        max_image_pixels: int = imaging.DEFAULT_MAX_PIXELS,
        progress: bool = True,
    ):
        self.backend, self.model, self.tokenizer = backend, model, tokenizer
        self.profile = profile  # shapes an exported bundle accepts; None: any
        self.all_branches = all_branches  # the UNet takes only 3B rows (a static ONNX bundle of an older export)
        self.max_image_pixels, self.progress = max_image_pixels, progress
        self._null_embedding: Any = None if null_embedding is None else backend.asarray(null_embedding)
        self._text_cache: OrderedDict[str, Any] = OrderedDict()  # instruction -> (1, 77, D), most recent last

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
        installed for a bundle (``engine.backends.bundle_runtime``: OpenVINO for ONNX on a CPU), else torch. ``dtype`` defaults to float32 for torch and to the bundle's precision for bundles.
        With no ``model``: $IP2P_MODEL, else the shipped shapes model (its ONNX bundle where torch is
        not installed or a bundle backend is asked for)."""
        model = model or os.environ.get(MODEL_ENV) or default_model(backend)
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
                       all_branches=bundle.all_branches,
                       max_image_pixels=max_image_pixels, progress=progress)
        if backend in BUNDLE_BACKENDS:
            raise InputError(f"{model}: backend {backend!r} runs exported bundles; export it first with `ip2p export`")
        source = resolve_model(model, config, variant)
        model_config = read_model_config(source.folder)
        tokenizer = ClipTokenizer(source.folder / "tokenizer")
        runner = module.load(source, device=device, dtype=dtype or "float32", **options)
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
        output_type: str = "pil",
        guidance_interval: tuple[float, float] | None = None,
        adaptive_guidance: float | None = None,
        cache_interval: int | None = None,
        cache_depth: int | None = None,
    ) -> EditResult:
        """Edit one image or a list. ``preset`` sets steps, sampler and guidance savings (``engine.presets``);
        a setting given here overrides it (None: the preset's; exact: 20 euler_ancestral steps, s_T 7.5,
        s_I 1.5). ``steps=100`` reproduces the paper; ``resolution="auto"`` is the model's own (512 for
        SD 1.5), ``None`` keeps the input size. ``latents``: unit-variance initial noise (B, 4, H/8, W/8),
        scaled by the scheduler's init_noise_sigma as diffusers does. ``guidance_interval`` (lo, hi]: guide
        only for sigma inside it; ``adaptive_guidance``: the cosine past which a branch stops;
        ``cache_interval``/``cache_depth``: step caching, the whole UNet every ``cache_interval``-th call and
        only its ``cache_depth`` outer levels between (all approximate)."""
        config = preset_config(
            preset, dict(resolution=resolution, keep_size=keep_size, output_type=output_type),
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
    ) -> EditResult:
        """Edit ``images`` with ``config``; images that end up the same size are denoised as one batch.

        ``guidance_scales``: (s_T, s_I) per image, in place of the config's (each image gets the pixels it
        would get alone with its own). ``on_step(steps_done)`` runs after every denoising step of every
        batch; raising ``engine.errors.Cancelled`` there stops the edit before the next UNet call, and
        returning indices into ``images`` drops those images: they cost no UNet rows from the next step on
        and come back mid-grey, while the others keep exactly their pixels."""
        clock = StageClock()
        if not images:
            raise InputError("no images to edit")
        instructions = _instructions_for(instruction, len(images))
        scales = _scales_for(guidance_scales, config, len(images))
        loaded = [imaging.load_image(im, self.max_image_pixels) for im in images]
        resolution, multiple = self._sizing(config.resolution)
        prepared = [imaging.prepare(im, resolution, multiple) for im in loaded]
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
        max_batch = self.profile.batch[2] if self.profile else len(images)
        chunks = [  # (offset in the group, members): a bundle's profile caps images per call
            (start, group[start : start + max_batch]) for group in groups.values()
            for start in range(0, len(group), max_batch)
        ]
        if self.all_branches and not config.guidance.exact:
            raise InputError("the guidance interval and adaptive guidance change the UNet rows from step to step; "
                             "this static-shape ONNX bundle, exported before static bundles took every row "
                             "count, always runs all three branches: export it again")
        self._check_step_cache(config.step_cache)
        for _, members in chunks:  # every call is checked before any work starts
            self._check_size(prepared[members[0]].size, len(members))
        for start, members in chunks:
            pixels = imaging.to_model_input([prepared[i] for i in members])
            noise = None if latents is None else latents[start : start + len(members)]
            clock.lap("preprocess")
            edited, rows, cost = self._edit_batch(
                pixels, [instructions[i] for i in members], [seeds[i] for i in members], noise, config, clock,
                [scales[i] for i in members], on_step and _members_callback(on_step, members),
            )
            for i, out, count, done in zip(members, edited, rows, cost):
                outputs[i], evaluations[i], work[i] = out, count, done

        if config.output_type == "pil" and not config.keep_size:
            result: Any = [imaging.output_to_pil(out) for out in outputs]
        else:
            arrays = [imaging.from_model_output(out[None])[0] for out in outputs]  # (H, W, 3) in [0, 1]
            if config.keep_size:
                arrays = [
                    imaging.resize_array(out, im.size) if out.shape[1::-1] != im.size else out
                    for out, im in zip(arrays, loaded)
                ]
            if config.output_type == "pil":
                result = [imaging.to_pil(out) for out in arrays]
            elif len({out.shape for out in arrays}) == 1:
                result = np.stack(arrays)
            else:
                result = arrays
        clock.lap("postprocess")
        return EditResult(images=result, seeds=seeds, timings=dict(clock.seconds), unet_evaluations=evaluations,
                          unet_work=work)

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

    def _check_size(self, size: tuple[int, int], count: int) -> None:
        """Refuse a size outside an exported bundle's profile, stating the allowed range."""
        if self.profile is None:
            return
        width, height = size
        (h_lo, _, h_hi), (w_lo, _, w_hi), (b_lo, _, _) = self.profile.height, self.profile.width, self.profile.batch
        if not (h_lo <= height <= h_hi and w_lo <= width <= w_hi):
            raise InputError(f"{width}x{height} is outside this bundle's profile: width {w_lo}-{w_hi}, "
                             f"height {h_lo}-{h_hi} pixels; pass a resolution inside it or export with a wider one")
        if count < b_lo:
            raise InputError(f"this bundle was exported for at least {b_lo} images per call, got {count}")

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

    def _edit_batch(
        self,
        pixels: np.ndarray,
        instructions: list[str],
        seeds: list[int],
        latents: np.ndarray | None,
        config: EditConfig,
        clock: StageClock,
        scales: list[tuple[float, float]],
        on_step: Callable[[int], list[int]] | None,
    ) -> tuple[np.ndarray, list[int], list[float]]:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, 3, H, W) edited pixels as the VAE decodes them (about [-1, 1]), the
        UNet rows each image took, and their MAC-weighted sum in whole-UNet rows."""
        be, b = self.backend, len(instructions)
        plan = GuidancePlan(b, [t for t, _ in scales], [i for _, i in scales], config.guidance,
                            all_branches=self.all_branches)

        text = self.encode_text(instructions)  # (B, 77, D)
        null = self.null_embedding() if set(plan.needed) != {COND} else None  # (1, 77, D)
        clock.lap("text_encode")

        image_latents = be.run(VAE_ENCODER.name, {"images": be.asarray(pixels)})["image_latents"]  # (B, 4, h, w)
        clock.lap("image_encode")

        sampler = SAMPLERS[config.sampler]
        schedule = sampler.schedule(self.model.scheduler, config.steps)
        noise = NoiseSource(seeds)
        shape = (self.model.latent_channels, pixels.shape[2] // self.model.vae_factor, pixels.shape[3] // self.model.vae_factor)
        if latents is None:
            initial = noise.randn(shape)
        elif latents.shape != (b, *shape):
            raise InputError(f"latents must have shape {(b, *shape)} for these images, got {latents.shape}")
        else:
            initial = latents
        x = be.asarray(initial) * schedule.init_noise_sigma  # (B, 4, h, w)

        def take(array: Any, indices: list[int]) -> Any:
            """Rows ``indices`` of a (B, ...) array; the array itself when they are all of them in order."""
            return array if len(indices) == b else be.concat([array[i : i + 1] for i in indices], 0)

        conditioning: dict[tuple, tuple[Any, Any]] = {}  # per grouping: (text rows, image latent rows), reused

        def rows_for(groups: Groups) -> tuple[Any, Any]:
            """(N, 77, D) text and (N, 4, h, w) image latents of the rows ``groups`` asks for, branch-major per
            group: the same objects every step they are asked for (a GPU backend uploads them once)."""
            key = tuple((tuple(indices), branches) for indices, branches in groups)
            if key not in conditioning:
                texts, images = [], []
                for indices, branches in groups:
                    for k in branches:
                        texts.append(take(text, indices) if k == COND else be.concat([null] * len(indices), 0))
                        latent = take(image_latents, indices)
                        images.append(latent * 0 if k == UNCOND else latent)
                conditioning[key] = (be.constant(be.concat(texts, 0)), be.concat(images, 0))
            return conditioning[key]

        evaluations, work = [0] * b, [0.0] * b  # UNet rows per image over the whole edit, and their MACs in UNets
        cache, features = config.step_cache, FeatureCache(lambda parts: be.concat(parts, 0))
        full_name, shallow_name = cache.components
        latent_size = (shape[1], shape[2])
        shallow_cost = be.macs(shallow_name, latent_size) / be.macs(full_name, latent_size) if cache.on else 1.0
        calls = 0  # UNet calls so far: the step cache decides by it

        def unet(x_in: Any, t: float, groups: Groups) -> list[dict[int, Any]]:
            nonlocal calls
            if not any(branches for _, branches in groups):  # every image dropped: no UNet call
                return [{} for _ in groups]
            text_rows, image_rows = rows_for(groups)
            xs, keys = [], []
            for indices, branches in groups:
                xs += [take(x_in, indices)] * len(branches)  # sliced once per group, not once per branch
                keys += [(i, k) for k in branches for i in indices]  # (image, branch) of each row, in row order
            sample = be.concat([be.concat(xs, 0), image_rows], 1)  # (N, 8, h, w)
            n = sample.shape[0]
            inputs = {"sample": sample, "timestep": be.asarray(np.full(n, t, dtype=np.float32)),
                      "encoder_hidden_states": text_rows}
            full = cache.full(calls) or not features.covers(keys)
            if full:
                result = be.run(full_name, inputs)
                if cache.on:
                    features.store(keys, result["deep_feature"])  # (N, C, h', w')
            else:
                result = be.run(shallow_name, {**inputs, "deep_feature": features.take(keys)})
            calls += 1
            out = result["noise_pred"]  # (N, 4, h, w)
            outputs, offset = [], 0
            for indices, branches in groups:
                group = {}
                for k in branches:
                    group[k] = out[offset : offset + len(indices)]
                    offset += len(indices)
                for i in indices:
                    evaluations[i] += len(branches)
                    work[i] += len(branches) * (1.0 if full else shallow_cost)
                outputs.append(group)
            return outputs

        denoiser = guided_denoiser(unet, schedule.timestep, plan, lambda parts: be.concat(parts, 0),
                                   self.model.prediction_type, to_numpy=be.to_numpy)
        extra = {"noise_sampler": lambda: be.asarray(noise.randn(shape))} if sampler.stochastic else {}
        def step_done(i: int, *_: Any) -> None:
            bar.update()
            if on_step is not None:
                plan.drop(on_step(i + 1))

        with tqdm(total=config.steps, desc="denoising", unit="step", disable=not self.progress, leave=False) as bar:
            x = sampler.sample(denoiser, x, schedule.sigmas, callback=step_done, **extra)
        x = x * (1.0 / (float(schedule.sigmas[-1]) ** 2 + 1) ** 0.5)  # back to the DDPM scale the VAE expects
        clock.lap("denoise")

        kept = [i for i in range(b) if i not in plan.gone]
        if len(kept) == b:
            decoded = self._decode(x)
        else:  # dropped images are not decoded: they come back mid-grey
            decoded = np.zeros((b, 3, pixels.shape[2], pixels.shape[3]), np.float32)
            if kept:
                decoded[kept] = self._decode(take(x, kept))
        clock.lap("decode")
        return decoded, evaluations, work

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


def _members_callback(on_step: Callable[[int], Collection[int] | None],
                      members: list[int]) -> Callable[[int], list[int]]:
    """``on_step`` for one batch of ``run``'s images: the dropped images it names, as indices into the batch."""
    def batch_step(done: int) -> list[int]:
        dropped = set(on_step(done) or ())
        return [j for j, i in enumerate(members) if i in dropped]

    return batch_step


def default_model(backend: str | None = None) -> Path:
    """The shipped model, trained by the project on synthetic shapes edits: its diffusers folder for the
    torch backend, its fp16 ONNX bundle for the bundle backends; with no backend named, the folder where
    torch is installed, else the bundle."""
    wants_bundle = backend in BUNDLE_BACKENDS or (backend is None and not available(*TORCH_STACK))
    path = DEFAULT_BUNDLE if wants_bundle else DEFAULT_MODEL
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
