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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from engine import specs
from engine.checkpoints import WEIGHTED_COMPONENTS, ModelSource, resolve_model
from engine.config import read_model_config
from engine.errors import ExportError, InputError
from engine.manifest import FORMAT_VERSION, MANIFEST_NAME, file_entry, sha256_file, write_json_atomic
from engine.specs import Profile
from export import onnx_export
from export.verify import Check, compare, verify_component

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


def _prepare_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise InputError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    parent = out.parent if out.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: output's parent folder does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: not writable")


def verification_sizes(profile: Profile, vae_factor: int, text_dim: int, names: list[str],
                       feature: tuple[int, int] | None = None) -> dict[str, list[dict[str, int]]]:
    """Shapes each component of ``names`` is verified at: the profile's opt size and its smallest size (if
    different); the UNets at batch 3 (one guided image) at both. ``feature``: the deep feature's (channels,
    downscale) for the split UNet."""
    sides = {(profile.height[1], profile.width[1]), (profile.height[0], profile.width[0])}
    batch = profile.batch[1]
    sets: dict[str, list[dict[str, int]]] = {name: [] for name in names}
    for hp, wp in sorted(sides):
        base = {"B": batch, "HP": hp, "WP": wp, "H": hp // vae_factor, "W": wp // vae_factor, "D": text_dim}
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
    import torch

    from engine.backends.torch_backend import load_networks, split_modules, unet_macs, wrap_components
    from engine.backends.unet_split import check_splittable, feature_channels
    from engine.tokenizer import ClipTokenizer

    out = Path(out_dir)
    _prepare_output(out, options.force)
    if options.format == "tensorrt":
        from export.tensorrt_build import require_tensorrt

        require_tensorrt()
    source = resolve_model(model, config, variant)
    model_config = read_model_config(source.folder)
    profile = options.profile.check(model_config.downsampling)
    unet, vae, text_encoder = load_networks(source)
    modules = wrap_components(unet, vae, text_encoder)
    component_specs = list(specs.COMPONENTS.values())
    feature = None
    if options.step_cache is not None:
        depth = options.step_cache
        check_splittable(unet, depth)
        component_specs += specs.unet_split(depth)
        modules |= {spec.name: split_modules(unet, spec.name) for spec in specs.unet_split(depth)}
        feature = (feature_channels(unet, depth), 2 ** (depth - 1))  # (channels, downscale from the latent)
    vocab_size = int(text_encoder.config.vocab_size)
    # The UNet's rows N stay dynamic (B to 3B) in static bundles too: ORT captures one CUDA graph per row count
    # (gpu_graph_id), TensorRT builds one optimisation profile per row count; every other axis is fixed there.
    dims = profile.dims(model_config.vae_factor, model_config.text_dim, feature=feature)
    # TensorRT builds its fp16 engines from float32 graphs; only ONNX bundles convert the graphs.
    graph_precision = options.precision if options.format == "onnx" else "fp32"
    names = [spec.name for spec in component_specs]
    sizes = verification_sizes(profile, model_config.vae_factor, model_config.text_dim, names, feature)
    opt_latent = (profile.height[1] // model_config.vae_factor, profile.width[1] // model_config.vae_factor)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent if str(out.parent) else "."))
    checks: list[Check] = []
    components: dict[str, dict] = {}
    try:
        for spec in tqdm(component_specs, desc="exporting", unit="component", disable=not progress):
            name = spec.name
            try:
                entry, component_checks = _export_component(
                    name, modules[name], spec, dims, sizes[name], model_config.vae_factor, profile, staging,
                    graph_precision, options.verify, vocab_size,
                )
            except InputError:
                raise
            except Exception as err:
                raise ExportError(f"{name}: export failed ({type(err).__name__}: {str(err).splitlines()[0]})") from err
            for check in component_checks:
                log.debug("verify %s", check)
            failed = [c for c in component_checks if not c.passed]
            if failed:
                raise ExportError(f"{name}: verification failed: {failed[0]}")
            checks += component_checks
            if name == specs.UNET.name or specs.split_of(name):  # a row's cost weighs step caching's shallow calls
                entry["macs"] = {"per_row": unet_macs(unet, name, opt_latent, model_config.text_dim),
                                 "latent_size": list(opt_latent)}
            components[name] = entry

        tokenizer_dir = staging / "tokenizer"
        shutil.copytree(source.folder / "tokenizer", tokenizer_dir)
        with torch.no_grad():
            null = modules["text_encoder"](torch.from_numpy(ClipTokenizer(tokenizer_dir)([""])))  # (1, 77, D)
        np.save(staging / "null_embedding.npy", null.numpy().astype(np.float32))

        if options.format == "tensorrt":
            from export.tensorrt_build import build_engines

            gpu = build_engines(staging, components, dims, profile.static)
        else:
            gpu = None
        manifest = {
            "format_version": FORMAT_VERSION,
            "format": options.format,
            "precision": options.precision,
            "source": {"model": str(model), "weights_sha256": weights_hash(source)},
            "model": dataclasses.asdict(model_config),  # read back as ModelConfig(**...) by the runtime
            "profile": profile.to_dict(),
            "guidance": "loop",  # the UNet returns all 3B rows; eq. 3 is applied by the shared loop
            "components": components,
            "null_embedding": file_entry(staging, staging / "null_embedding.npy"),
            "tokenizer": {"folder": "tokenizer",
                          "files": [file_entry(staging, p) for p in sorted(tokenizer_dir.iterdir())]},
            "tools": tool_versions(),
            "gpu": gpu,
            "verification": [
                {"component": c.component, "shapes": c.shapes, "max_abs": c.max_abs, "max_rel": c.max_rel}
                for c in checks
            ],
        }
        write_json_atomic(staging / MANIFEST_NAME, manifest)
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, checks


def _export_component(name, module, spec, dims, size_sets, vae_factor, profile, staging, precision, verify,
                      vocab_size):
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
        checks += verify_component(name, module, spec, files[0], size_sets, precision, vocab_size)
    shapes = specs.shape_ranges(spec, dims)
    entry = {
        "precision": precision,
        "files": [file_entry(staging, f) for f in files],  # the runtime's file first: graph or engine
        "inputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims), "shapes": [list(s) for s in shapes[t.name]]}
                   for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims), "shapes": [list(s) for s in shapes[t.name]]}
                    for t in spec.outputs],
    }
    return entry, checks


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to ``out``, replacing an old bundle only once the new one is whole."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.chmod(0o755)
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
