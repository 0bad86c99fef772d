"""The runtime's commands: ``edit`` (any backend), ``info``, and with the torch extra ``create-model`` and
``convert``. ``ip2p.cli`` assembles them with the other parts' commands."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from engine.errors import InputError

if TYPE_CHECKING:
    from engine.config import EditConfig, Student

log = logging.getLogger("ip2p")


def _resolution(value: str):
    if value.lower() == "none":
        return None
    if value.lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'none' or 'auto', got {value!r}") from None


def add_torch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-downsample", type=int, default=1, metavar="N",
                        help="torch backend: the finest level's self-attention reads keys and values pooled NxN "
                        "(token downsampling: faster on CPUs, approximate; 1 = exact, the default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch backend: run the UNet and the VAE decoder through torch.compile (compiled at the "
                        "first call of each new size, about a minute on 2 CPU cores for SD 1.5; kept on disk for the "
                        "next process), on CUDA replayed as CUDA graphs")
    parser.add_argument("--no-cuda-graphs", dest="graphs", action="store_false", default=None,
                        help="torch backend with --compile on CUDA: compiled, without CUDA graphs")


def torch_options(args: argparse.Namespace) -> dict | None:
    """Backend options for ``--kv-downsample`` and ``--compile``; refused where the backend cannot apply them."""
    from engine.backends import BUNDLE_BACKENDS

    options = {}
    if args.kv_downsample != 1:
        options["kv_downsample"] = args.kv_downsample
    if args.compile:
        options["compile"] = True
    if args.graphs is not None:
        options["graphs"] = args.graphs
    if options and args.backend in BUNDLE_BACKENDS:
        flag = {"kv_downsample": "--kv-downsample", "compile": "--compile"}.get(next(iter(options)), "--no-cuda-graphs")
        raise InputError(f"{flag} applies to the torch backend: use it with --backend torch")
    return options or None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--backend, --device, --dtype and --variant: how a model is loaded, for every command that edits."""
    from engine.backends import BACKENDS

    parser.add_argument("--backend", choices=sorted(BACKENDS),
                        help="default: the bundle's own runtime for an exported bundle, else torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: a bundle's own; torch: float16 on CUDA, "
                        "float32 elsewhere")
    parser.add_argument("--variant", help="weight files of this variant, e.g. fp16 for *.fp16.safetensors "
                        "(default: the plain files, else the only variant there is)")


def _interval(value: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI sigmas such as 1.0:15, got {value!r}") from None
    return lo, hi


def add_edit_options(parser: argparse.ArgumentParser) -> None:
    """How one edit runs: preset, steps, sampler, guidance scales and the guidance savings (edit and eval)."""
    from engine.presets import PRESETS
    from engine.samplers import SAMPLERS

    parser.add_argument("--preset", default="exact", choices=list(PRESETS),
                        help="a measured combination of the savings below (default exact: the full edit's pictures)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20, or the preset's; 100 is the paper's)")
    parser.add_argument("--text-guidance", type=float, help="s_T of eq. 3 (default 7.5, or a distilled model's own)")
    parser.add_argument("--image-guidance", type=float,
                        help="s_I of eq. 3 (default 1.5, or a distilled model's own; 1 saves a third of the UNet)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), help="default euler_ancestral, or the preset's")
    parser.add_argument("--guidance-interval", type=_interval, metavar="LO:HI",
                        help="guide only while sigma is in (LO, HI], else the instruction branch alone (approximate)")
    parser.add_argument("--adaptive-guidance", type=float, metavar="COS",
                        help="stop a guidance branch of an image once its cosine similarity to the next passes COS, "
                             "about 0.99 (approximate)")
    parser.add_argument("--cache-interval", type=int, metavar="N",
                        help="step caching: the whole UNet every N-th call, only its outer levels between (approximate)")
    parser.add_argument("--cache-depth", type=int, metavar="D",
                        help="step caching: how many outer UNet levels the calls between run (default 1)")


def edit_config(args: argparse.Namespace, student: "Student | None" = None, **fixed) -> "EditConfig":
    """The EditConfig of ``--preset`` (a distilled ``student``'s own presets for its model) with the options given
    on the command line, and ``fixed``."""
    from engine.presets import preset_config

    return preset_config(args.preset, fixed, student, steps=args.steps, text_guidance=args.text_guidance,
                         image_guidance=args.image_guidance, sampler=args.sampler,
                         guidance_interval=args.guidance_interval, adaptive_guidance=args.adaptive_guidance,
                         cache_interval=args.cache_interval, cache_depth=args.cache_depth)


def add_edit_arguments(edit: argparse.ArgumentParser) -> None:
    edit.add_argument("images", nargs="+", help="input image files")
    edit.add_argument("-p", "--prompt", required=True, help="the edit instruction (may be empty)")
    edit.add_argument("-o", "--output", required=True, help="output file (one image) or folder (several)")
    edit.add_argument("--model", help="model folder, bundle, hub id or .ckpt/.safetensors file "
                      "(default: $IP2P_MODEL, else the shipped shapes model)")
    edit.add_argument("--config", help="diffusers folder or hub id for a single-file checkpoint's configs")
    add_model_options(edit)
    add_edit_options(edit)
    edit.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i")
    edit.add_argument("--resolution", type=_resolution, default="auto", help="long side in pixels, 'auto' or 'none'")
    edit.add_argument("--keep-size", action="store_true", help="resize outputs back to each input's size")
    edit.add_argument("--keep-detail", action="store_true",
                      help="edit at --resolution, then add only the change to the full-size input (its detail kept)")
    edit.add_argument("--vae-tile", type=_resolution, default="auto", metavar="PX",
                      help="VAE tile side in pixels, 'none' (never tile) or 'auto' (past a memory budget)")
    edit.add_argument("--batch-size", type=int, default=1, help="images denoised together")
    edit.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger inputs")
    edit.add_argument("--cuda-graph", action="store_true",
                      help="replay each network from a CUDA graph (onnxruntime/tensorrt, static-shape bundles)")
    add_torch_options(edit)


def add_info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("model", help="model folder, hub id or exported bundle")
    info.add_argument("--variant", help="describe the weight files of this variant (e.g. fp16)")


def add_create_arguments(create: argparse.ArgumentParser) -> None:
    create.add_argument("kind", choices=["tiny", "sd15", "shapes"])
    create.add_argument("out_dir")
    create.add_argument("--seed", type=int, default=0)


def add_convert_arguments(convert: argparse.ArgumentParser) -> None:
    convert.add_argument("model", help="diffusers-format model folder")
    convert.add_argument("output", help="target .safetensors or .ckpt file")
    convert.add_argument("--variant", help="read the weight files of this variant (e.g. fp16)")


def output_paths(images: Sequence[str], output: str) -> list[Path]:
    """One output path per input: ``output`` itself for one image, ``output/<stem>.png`` for several."""
    from PIL import Image

    out = Path(output)
    if len(images) == 1:
        if out.is_dir():
            return [out / (Path(images[0]).stem + ".png")]
        if out.suffix.lower() not in Image.registered_extensions():
            raise InputError(f"{out}: unknown image extension {out.suffix or '(none)'}; use .png, .jpg, .webp, ...")
        if not out.parent.is_dir():
            raise InputError(f"{out.parent}: output folder does not exist")
        return [out]
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: several inputs need an output folder, and this is a file")
    out.mkdir(parents=True, exist_ok=True)
    paths, seen = [], set()
    for image in images:
        stem = Path(image).stem
        name, n = stem, 1
        while name in seen:
            name, n = f"{stem}_{n}", n + 1
        seen.add(name)
        paths.append(out / f"{name}.png")
    return paths


def run_edit(args: argparse.Namespace) -> None:
    from engine.images import open_image, save_image
    from engine.noise import resolve_seeds
    from engine.backends import BUNDLE_BACKENDS
    from engine.pipeline import EditPipeline

    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    config = edit_config(args, resolution=args.resolution, keep_size=args.keep_size, keep_detail=args.keep_detail,
                         vae_tile=args.vae_tile)
    targets = output_paths(args.images, args.output)
    for image in args.images:  # fail before the model loads: headers only, pixels are decoded per batch
        open_image(Path(image), args.max_pixels).close()
    if args.cuda_graph and args.backend not in BUNDLE_BACKENDS:
        raise InputError("--cuda-graph replays exported bundles: use --backend onnxruntime or tensorrt")
    options = torch_options(args) or {}
    if args.cuda_graph:
        options["cuda_graph"] = True
    pipe = EditPipeline.from_pretrained(
        args.model, backend=args.backend, device=args.device, dtype=args.dtype, config=args.config,
        variant=args.variant, max_image_pixels=args.max_pixels, progress=not args.quiet, backend_options=options or None,
    )
    if pipe.model.student is not None:  # its presets are its own step counts
        config = edit_config(args, pipe.model.student, resolution=args.resolution, keep_size=args.keep_size,
                             keep_detail=args.keep_detail, vae_tile=args.vae_tile)
    seeds = resolve_seeds(args.seed, len(args.images))
    for start in range(0, len(args.images), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        result = pipe.run(args.images[chunk], args.prompt, config, seed=seeds[chunk])
        for image, target, seed in zip(result.images, targets[chunk], result.seeds):
            save_image(image, target)
            log.info("wrote %s (seed %d)", target, seed)
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        log.info("timings: %s; %d UNet evaluations per image", timings, max(result.unet_evaluations))


def run_info(args: argparse.Namespace) -> None:
    from engine.info import describe_bundle, describe_model
    from engine.manifest import is_bundle, read_bundle

    if is_bundle(args.model):
        print(describe_bundle(read_bundle(args.model, verify=False)))
        return
    from engine.checkpoints import resolve_model

    print(describe_model(resolve_model(args.model, variant=args.variant)))


def run_create(args: argparse.Namespace) -> None:
    from engine.extras import import_extra

    create_model = import_extra("engine.random_models", "ip2p create-model").create_model
    log.info("wrote %s", create_model(args.kind, args.out_dir, seed=args.seed))


def run_convert(args: argparse.Namespace) -> None:
    from engine.checkpoints import resolve_model
    from engine.extras import import_extra

    save_single_file = import_extra("engine.original_format", "ip2p convert").save_single_file
    log.info("wrote %s", save_single_file(resolve_model(args.model, variant=args.variant), args.output))


COMMANDS = {
    "edit": (add_edit_arguments, run_edit),
    "info": (add_info_arguments, run_info),
    "create-model": (add_create_arguments, run_create),
    "convert": (add_convert_arguments, run_convert),
}
