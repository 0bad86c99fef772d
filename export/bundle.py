"""``ip2p export``: a model in, a verified self-describing bundle out (ONNX graphs or TensorRT engines).

Everything is written into a staging folder beside OUT_DIR; the manifest is written last and the
folder renamed into place only when every component exported (and verified), so a failed export
leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from engine import specs
from engine.checkpoints import WEIGHTED_COMPONENTS, ModelSource, resolve_model
from engine.config import read_model_config
from engine.errors import ExportError, InputError, quote_error
from engine.files import write_json_atomic
from engine.manifest import (FORMAT_VERSION, MANIFEST_NAME, Component, FileEntry, Macs, Manifest, Source, TensorEntry,
                             Tokenizer, Verification, file_entry, sha256_file)
from engine.specs import Profile
from export import onnx_export
from export.staging import prepare_output, staging_folder, swap_into_place
from export.verify import UNTRAINED_RANGES, Check, compare, verify_component

log = logging.getLogger(__name__)

FORMATS = {"onnx": ("fp32", "fp16"), "tensorrt": ("fp16",)}


@dataclass(frozen=True)
class ExportOptions:
    format: str = "onnx"
    precision: str = "fp32"
    profile: Profile = Profile(batch=(1, 1, 4), height=(256, 512, 768), width=(256, 512, 768))
    verify: bool = False
    force: bool = False
    step_cache: int | None = None  # also export the UNet split for step caching at this depth

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"unknown format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.precision not in FORMATS[self.format]:
            raise InputError(
                f"precision {self.precision} is not supported for format {self.format} "
                f"(supported: {', '.join(FORMATS[self.format])})"
            )


def weights_hash(source: ModelSource) -> str:
    """sha256 over the model's weight files (name and content), in a fixed order."""
    if source.single_file is not None:
        files = [source.single_file]
    else:
        files = [p for name in WEIGHTED_COMPONENTS for p in source.weights(name).files]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(), "opset": str(onnx_export.OPSET)}
    try:
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    return versions


def verification_sizes(profile: Profile, vae_factor: int, text_dim: int, names: list[str],
                       feature: tuple[int, int] | None = None,
                       norms: tuple[int, int, int] = (0, 0, 1)) -> dict[str, list[dict[str, int]]]:
    """Shapes each component of ``names`` is verified at: the profile's opt size and its smallest size (if
    different); the UNets at batch 3 (one guided image) at both. ``feature``: the deep feature's (channels,
    downscale) for the split UNet; ``norms``: the VAE's GroupNorm layers (encoder, decoder) and groups."""
    sides = {(profile.height[1], profile.width[1]), (profile.height[0], profile.width[0])}
    batch = profile.batch[1]
    sets: dict[str, list[dict[str, int]]] = {name: [] for name in names}
    for hp, wp in sorted(sides):
        base = {"B": batch, "HP": hp, "WP": wp, "H": hp // vae_factor, "W": wp // vae_factor, "D": text_dim,
                "LE": norms[0], "LD": norms[1], "G": norms[2]}
        if feature is not None:
            channels, scale = feature
            base |= {"FC": channels, "FH": hp // vae_factor // scale, "FW": wp // vae_factor // scale}
        for name in names:
            sets[name].append({**base, "N": 3 * batch})
    sets["text_encoder"] = sets["text_encoder"][:1]
    return sets


def decoder_is_fp16_safe(module, path: Path, vae_factor: int, profile: Profile) -> Check:
    """The float16 VAE decoder on latents of the magnitudes that make SD's VAE overflow (N(0, 1) x 6
    plus spikes of +-40) against float32 PyTorch."""
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    h, w = profile.height[1] // vae_factor, profile.width[1] // vae_factor
    latents = (rng.standard_normal((1, 4, h, w)) * 6).astype(np.float32)
    latents[0, :, h // 2, w // 2] = 40.0
    latents[0, :, h // 3, w // 3] = -40.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    max_abs, max_rel = compare(module, session, {"latents": latents})
    return Check("vae_decoder", "stress latents", max_abs, max_rel, 1e-2)


def export_bundle(model: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions,
                  config: str | os.PathLike | None = None, variant: str | None = None,
                  progress: bool = True) -> tuple[Path, list[Check]]:
    """Export ``model`` (``variant``: its variant weight files, e.g. fp16) to ``out_dir``; returns the bundle
    folder and the verification results."""
    from engine.backends.torch_modules import unet_macs

    out = Path(out_dir)
    prepare_output(out, options.force)
    if options.format == "tensorrt":
        from export.tensorrt_build import require_tensorrt

        require_tensorrt()
    source = resolve_model(model, config, variant)
    model_config = read_model_config(source.folder)
    profile = options.profile.check(model_config.downsampling)
    unet, modules, component_specs, feature, vocab_size = _networks(source, options.step_cache)
    # The UNet's rows N stay dynamic (B to 3B) in static bundles too: ORT captures one CUDA graph per row count
    # (gpu_graph_id), TensorRT builds one optimisation profile per row count; every other axis is fixed there.
    dims = profile.dims(model_config.vae_factor, model_config.text_dim, feature=feature, norms=model_config.vae_norms)
    # TensorRT builds its fp16 engines from float32 graphs; only ONNX bundles convert the graphs.
    graph_precision = options.precision if options.format == "onnx" else "fp32"
    names = [spec.name for spec in component_specs]
    sizes = verification_sizes(profile, model_config.vae_factor, model_config.text_dim, names, feature,
                               model_config.vae_norms)
    opt_latent = (profile.height[1] // model_config.vae_factor, profile.width[1] // model_config.vae_factor)

    staging = staging_folder(out)
    checks: list[Check] = []
    components: dict[str, Component] = {}
    try:
        for spec in tqdm(component_specs, desc="exporting", unit="component", disable=not progress):
            name = spec.name
            try:
                entry, component_checks = _export_component(
                    name, modules[name], spec, dims, sizes[name], model_config.vae_factor, profile, staging,
                    "fp32" if name in specs.TILE_COMPONENTS else graph_precision, options.verify, vocab_size,
                    model_config.student)
            except InputError:
                raise
            except Exception as err:
                raise ExportError(f"{name}: export failed ({quote_error(err)})") from err
            checks += _passed(name, component_checks)
            if name in specs.UNETS or specs.split_of(name):  # a row's cost weighs step caching's shallow calls
                macs = Macs(unet_macs(unet, name, opt_latent, model_config.text_dim), opt_latent)
                entry = dataclasses.replace(entry, macs=macs)
            components[name] = entry
        tokenizer, null_embedding = _save_text_files(staging, source, modules["text_encoder"])
        gpu = None
        if options.format == "tensorrt":
            from export.tensorrt_build import build_engines

            components, gpu = build_engines(staging, components, dims, profile.static)
        manifest = Manifest(
            format_version=FORMAT_VERSION, format=options.format, precision=options.precision,
            source=Source(str(model), weights_hash(source)), model=model_config, profile=profile,
            guidance="loop",  # the UNet returns all 3B rows; eq. 3 is applied by the shared loop
            components=components, null_embedding=null_embedding, tokenizer=tokenizer, tools=tool_versions(), gpu=gpu,
            verification=tuple(Verification(c.component, c.shapes, c.max_abs, c.max_rel) for c in checks),
        )
        write_json_atomic(staging / MANIFEST_NAME, manifest.to_dict())
        swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, checks


def _networks(source: ModelSource, step_cache: int | None) -> tuple[Any, dict[str, Any], list[specs.ComponentSpec],
                                                                   tuple[int, int] | None, int]:
    """(the UNet, the module to export of every component, their specs, the split UNet's deep feature as
    (channels, downscale from the latent) or None, the text encoder's vocabulary size)."""
    from engine.backends.torch_modules import load_networks, split_modules, tile_module, wrap_components
    from engine.backends.unet_split import check_splittable, feature_channels

    unet, vae, text_encoder = load_networks(source)
    modules = wrap_components(unet, vae, text_encoder)
    modules |= {name: tile_module(modules, name) for name in specs.TILE_COMPONENTS}
    unet_spec = specs.UNET_GUIDED if specs.UNET_GUIDED.name in modules else specs.UNET  # a student's takes the scales
    component_specs = [specs.TEXT_ENCODER, specs.VAE_ENCODER, unet_spec, specs.VAE_DECODER,
                       *specs.TILE_COMPONENTS.values()]
    feature = None
    if step_cache is not None:
        if unet_spec is specs.UNET_GUIDED:
            raise InputError("--step-cache: a distilled student runs few steps of one row; step caching is for its "
                             "teacher")
        check_splittable(unet, step_cache)
        component_specs += specs.unet_split(step_cache)
        modules |= {spec.name: split_modules(unet, spec.name) for spec in specs.unet_split(step_cache)}
        feature = (feature_channels(unet, step_cache), 2 ** (step_cache - 1))
    return unet, modules, component_specs, feature, int(text_encoder.config.vocab_size)


def _passed(name: str, checks: list[Check]) -> list[Check]:
    """``checks`` of component ``name``, logged; ExportError naming the first that failed."""
    for check in checks:
        log.debug("verify %s", check)
    failed = [c for c in checks if not c.passed]
    if failed:
        raise ExportError(f"{name}: verification failed: {failed[0]}")
    return checks


def _save_text_files(staging: Path, source: ModelSource, text_encoder: Any) -> tuple[Tokenizer, FileEntry]:
    """Copy the tokenizer into the bundle and save the null text embedding it gives; their manifest entries."""
    import torch

    from engine.tokenizer import ClipTokenizer

    tokenizer_dir = staging / "tokenizer"
    shutil.copytree(source.folder / "tokenizer", tokenizer_dir)
    with torch.no_grad():
        null = text_encoder(torch.from_numpy(ClipTokenizer(tokenizer_dir)([""])))  # (1, 77, D)
    np.save(staging / "null_embedding.npy", null.numpy().astype(np.float32))
    files = tuple(file_entry(staging, p) for p in sorted(tokenizer_dir.iterdir()))
    return Tokenizer("tokenizer", files), file_entry(staging, staging / "null_embedding.npy")


def _export_component(name, module, spec, dims, size_sets, vae_factor, profile, staging, precision, verify,
                      vocab_size, student):
    """Export (and convert, and verify) one component; returns its manifest entry and checks."""
    fp32_path = staging / (f"{name}.fp32.onnx" if precision == "fp16" else f"{name}.onnx")
    files = onnx_export.export_onnx(module, spec, dims, vae_factor, fp32_path)
    checks: list[Check] = []
    if precision == "fp16":
        path = staging / f"{name}.onnx"
        fp16_files = onnx_export.convert_to_fp16(fp32_path, path)
        if name == specs.VAE_DECODER.name:
            stress = decoder_is_fp16_safe(module, path, vae_factor, profile)
            checks.append(stress)
            if not stress.passed:
                log.warning("the float16 VAE decoder is not safe (%s); the bundle keeps it in float32", stress)
                onnx_export.save_onnx(onnx.load(fp32_path, load_external_data=True), path, external=len(files) > 1)
                fp16_files = onnx_export.onnx_files(path)
                precision = "fp32"
                checks = []
        for f in files:
            f.unlink(missing_ok=True)
        files = fp16_files
    if verify:
        guidance = UNTRAINED_RANGES if student is None else (student.text_range, student.image_range)
        checks += verify_component(name, module, spec, files[0], size_sets, precision, vocab_size, guidance)
    shapes = specs.shape_ranges(spec, dims)
    entry = Component(
        precision=precision,
        files=tuple(file_entry(staging, f) for f in files),  # the runtime's file first: graph or engine
        inputs=tuple(TensorEntry.of(t, shapes[t.name]) for t in spec.inputs),
        outputs=tuple(TensorEntry.of(t, shapes[t.name]) for t in spec.outputs),
    )
    return entry, checks
