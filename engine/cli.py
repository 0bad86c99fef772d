"""The ``ip2p`` command: edit images, create random-weight models, describe a model."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from engine.errors import ExportError, InputError, NumericalError

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


def _weights(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,2,3, got {value!r}") from None


def _add_torch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-downsample", type=int, default=1, metavar="N",
                        help="torch backend: the finest level's self-attention reads keys and values pooled NxN "
                        "(token downsampling: faster on CPUs, approximate; 1 = exact, the default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch backend: run the UNet through torch.compile (compiled at the first call of each "
                        "new size, about a minute on 2 CPU cores for SD 1.5)")


def torch_options(args: argparse.Namespace) -> dict | None:
    """Backend options for ``--kv-downsample`` and ``--compile``; refused where the backend cannot apply them."""
    from engine.backends import BUNDLE_BACKENDS

    options = {}
    if args.kv_downsample != 1:
        options["kv_downsample"] = args.kv_downsample
    if args.compile:
        options["compile"] = True
    if options and args.backend in BUNDLE_BACKENDS:
        flag = "--kv-downsample" if "kv_downsample" in options else "--compile"
        raise InputError(f"{flag} applies to the torch UNet: use it with --backend torch")
    return options or None


def build_parser() -> argparse.ArgumentParser:
    from engine.backends import BACKENDS
    from engine.samplers import SAMPLERS

    parser = argparse.ArgumentParser(prog="ip2p", description="InstructPix2Pix: edit images by instruction.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit images by an instruction")
    edit.add_argument("images", nargs="+", help="input image files")
    edit.add_argument("-p", "--prompt", required=True, help="the edit instruction (may be empty)")
    edit.add_argument("-o", "--output", required=True, help="output file (one image) or folder (several)")
    edit.add_argument("--model", help="model folder, bundle, hub id or .ckpt/.safetensors file "
                      "(default: $IP2P_MODEL, else the shipped shapes model)")
    edit.add_argument("--config", help="diffusers folder or hub id for a single-file checkpoint's configs")
    edit.add_argument("--backend", default="torch", choices=sorted(BACKENDS))
    edit.add_argument("--device", default="cpu")
    edit.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float32, or a bundle's own")
    edit.add_argument("--steps", type=int, default=20, help="denoising steps (100 reproduces the paper)")
    edit.add_argument("--text-guidance", type=float, default=7.5)
    edit.add_argument("--image-guidance", type=float, default=1.5)
    edit.add_argument("--sampler", default="euler_ancestral", choices=sorted(SAMPLERS))
    edit.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i")
    edit.add_argument("--resolution", type=_resolution, default="auto", help="long side in pixels, 'auto' or 'none'")
    edit.add_argument("--keep-size", action="store_true", help="resize outputs back to each input's size")
    edit.add_argument("--batch-size", type=int, default=1, help="images denoised together")
    edit.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger inputs")
    edit.add_argument("--cuda-graph", action="store_true",
                      help="replay each network from a CUDA graph (onnxruntime/tensorrt, static-shape bundles)")
    _add_torch_options(edit)

    create = sub.add_parser("create-model", help="write a random-weight model in diffusers format")
    create.add_argument("kind", choices=["tiny", "sd15", "shapes"])
    create.add_argument("out_dir")
    create.add_argument("--seed", type=int, default=0)

    evaluate = sub.add_parser("eval", help="success rate per edit type on held-out synthetic shapes edits")
    evaluate.add_argument("model", nargs="?", help="model folder or bundle (default: as for edit)")
    evaluate.add_argument("--backend", default="torch", choices=sorted(BACKENDS))
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    evaluate.add_argument("--count", type=int, default=300, help="held-out edits, split evenly over edit types")
    evaluate.add_argument("--seed", type=int, help="held-out set seed (default: one training never uses)")
    evaluate.add_argument("--steps", type=int, default=20)
    evaluate.add_argument("--sampler", default="euler_ancestral", choices=sorted(SAMPLERS))
    evaluate.add_argument("--text-guidance", type=float, default=7.5)
    evaluate.add_argument("--image-guidance", type=float, default=1.5)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--json", help="also write the report as JSON here")
    _add_torch_options(evaluate)
    evaluate.add_argument("--save-dir", help="write input/edit/truth sheets here")

    export = sub.add_parser("export", help="export a model to an ONNX or TensorRT bundle")
    export.add_argument("model", help="model folder, hub id or .ckpt/.safetensors file")
    export.add_argument("out_dir")
    export.add_argument("--config", help="diffusers folder or hub id for a single-file checkpoint's configs")
    export.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"])
    export.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    export.add_argument("--batch", default="1:4", help="images per call: N, MIN:MAX or MIN:OPT:MAX")
    shape = export.add_mutually_exclusive_group()
    shape.add_argument("--resolution", default="256:768", help="pixel side range: N, MIN:MAX or MIN:OPT:MAX")
    shape.add_argument("--static", help="one fixed size WxH, e.g. 512x512 (for CUDA graphs)")
    export.add_argument("--verify", action="store_true", help="check every component against PyTorch")
    export.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")

    trainer = sub.add_parser("train", help="fine-tune an InstructPix2Pix UNet (see training/)")
    trainer.add_argument("--config", help="YAML file with any TrainConfig option")
    trainer.add_argument("--base", help="Stable Diffusion or InstructPix2Pix model to start from")
    trainer.add_argument("--data", help="folder with metadata.jsonl")
    trainer.add_argument("--output", help="where the trained model (and checkpoints/) go")
    trainer.add_argument("--max-steps", type=int)
    trainer.add_argument("--resolution", type=int)
    trainer.add_argument("--batch-size", type=int)
    trainer.add_argument("--grad-accum", type=int)
    trainer.add_argument("--lr", type=float)
    trainer.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    trainer.add_argument("--checkpoint-every", type=int)
    trainer.add_argument("--seed", type=int)
    trainer.add_argument("--resume", help="'latest' or a checkpoint folder")

    synth = sub.add_parser("synth", help="write procedural paired shape-edit data (training format)")
    synth.add_argument("out_dir")
    synth.add_argument("--count", type=int, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--shape-weights", type=_weights,
                       help="relative shares of scenes with 1, 2 and 3 shapes, e.g. 1,2,3 (default: equal)")
    synth.add_argument("--edit-weights", type=_weights,
                       help="relative shares of shape recolourings, background recolourings and removals, "
                            "e.g. 4,2,3 (default: even among the edits a scene allows)")

    convert = sub.add_parser("convert", help="write a diffusers-format model as one original-layout checkpoint")
    convert.add_argument("model", help="diffusers-format model folder")
    convert.add_argument("output", help="target .safetensors or .ckpt file")

    bench = sub.add_parser("bench", help="benchmark tools")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    report = bench_sub.add_parser("report", help="markdown table and PNG plot from --benchmark-json results")
    report.add_argument("results", help="pytest-benchmark JSON (pytest benchmarks --benchmark-json=RESULTS.json)")
    report.add_argument("-o", "--output", default="benchmarks.md", help="markdown file to write")
    report.add_argument("--plot", default=None, help="PNG to write (default: beside the markdown)")

    info = sub.add_parser("info", help="describe a model: components, parameters, dtypes, scheduler")
    info.add_argument("model")
    return parser


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
    from engine.config import EditConfig
    from engine.images import open_image, save_image
    from engine.noise import resolve_seeds
    from engine.backends import BUNDLE_BACKENDS
    from engine.pipeline import EditPipeline

    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    config = EditConfig(
        steps=args.steps,
        text_guidance=args.text_guidance,
        image_guidance=args.image_guidance,
        sampler=args.sampler,
        resolution=args.resolution,
        keep_size=args.keep_size,
    )
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
        max_image_pixels=args.max_pixels, progress=not args.quiet, backend_options=options or None,
    )
    seeds = resolve_seeds(args.seed, len(args.images))
    for start in range(0, len(args.images), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        result = pipe.run(args.images[chunk], args.prompt, config, seed=seeds[chunk])
        for image, target, seed in zip(result.images, targets[chunk], result.seeds):
            save_image(image, target)
            log.info("wrote %s (seed %d)", target, seed)
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        log.info("timings: %s", timings)


def run_eval(args: argparse.Namespace) -> None:
    from engine.pipeline import EditPipeline
    from engine.manifest import write_json_atomic
    from training.evaluation import HELD_OUT_SEED, evaluate, format_report

    if args.count < 1 or args.batch_size < 1 or args.steps < 1:
        raise InputError("--count, --batch-size and --steps must be at least 1")
    pipe = EditPipeline.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                        progress=False, backend_options=torch_options(args))
    report = evaluate(pipe, args.count, HELD_OUT_SEED if args.seed is None else args.seed, args.batch_size,
                      args.steps, args.sampler, args.save_dir, progress=not args.quiet,
                      text_guidance=args.text_guidance, image_guidance=args.image_guidance)
    print(format_report(report))
    if args.json:
        write_json_atomic(Path(args.json), report)
        log.info("wrote %s", args.json)


def run_export(args: argparse.Namespace) -> None:
    from engine.specs import Profile, parse_range
    from export.bundle import ExportOptions, export_bundle

    batch = parse_range(args.batch, "--batch", default_opt=1)
    if args.static:
        try:
            width, height = (int(v) for v in args.static.lower().split("x"))
        except ValueError:
            raise InputError(f"--static must look like 512x512, got {args.static!r}") from None
        if batch[0] != batch[2]:
            raise InputError("--static needs one batch size too, e.g. --batch 1")
        profile = Profile(batch=batch, height=(height,) * 3, width=(width,) * 3)
    else:
        side = parse_range(args.resolution, "--resolution", default_opt=512)
        profile = Profile(batch=batch, height=side, width=side)
    options = ExportOptions(format=args.format, precision=args.precision, profile=profile, verify=args.verify,
                            force=args.force)
    out, checks = export_bundle(args.model, args.out_dir, options, config=args.config, progress=not args.quiet)
    for check in checks:
        print(check)
    log.info("wrote %s", out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library chatter (advisories, weight-loading bars) stays out of the CLI unless asked for.
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        logging.getLogger("torch").setLevel(logging.ERROR)
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
    if args.quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
    )
    for name in ("ip2p", "engine", "export", "training", "benchmarks"):  # our own progress notes
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.command == "edit":
            run_edit(args)
        elif args.command == "create-model":
            from engine.random_models import create_model

            log.info("wrote %s", create_model(args.kind, args.out_dir, seed=args.seed))
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "export":
            run_export(args)
        elif args.command == "train":
            from training.config import load_config
            from training.train import train

            flags = {k: getattr(args, k) for k in ("base", "data", "output", "max_steps", "resolution", "batch_size",
                                                   "grad_accum", "lr", "mixed_precision", "checkpoint_every", "seed")}
            log.info("wrote %s", train(load_config(args.config, flags), resume=args.resume, progress=not args.quiet))
        elif args.command == "synth":
            from training.synthetic import generate

            out = generate(args.out_dir, args.count, seed=args.seed, size=args.size, progress=not args.quiet,
                           shape_weights=args.shape_weights, edit_weights=args.edit_weights)
            log.info("wrote %s", out)
        elif args.command == "convert":
            from engine.checkpoints import resolve_model
            from engine.original_format import save_single_file

            log.info("wrote %s", save_single_file(resolve_model(args.model).folder, args.output))
        elif args.command == "bench":
            from benchmarks.report import write_report

            out = Path(args.output)
            write_report(Path(args.results), out, Path(args.plot) if args.plot else out.with_suffix(".png"))
            log.info("wrote %s", out)
        elif args.command == "info":
            from engine.checkpoints import resolve_model
            from engine.info import describe_model

            print(describe_model(resolve_model(args.model).folder))
    except (InputError, NumericalError, ExportError) as err:
        print(f"ip2p: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ip2p: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an engine bug, not bad input: say so in one line unless --verbose
        if args.verbose:
            raise
        print(f"ip2p: internal error: {type(err).__name__}: {err} (rerun with -v for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
