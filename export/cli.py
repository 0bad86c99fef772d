"""``ip2p export``: a model in, a verified bundle out (needs the torch extra; TensorRT also the tensorrt extra)."""
from __future__ import annotations

import argparse
import logging

from engine.errors import InputError

log = logging.getLogger("ip2p")


def add_export_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("model", help="model folder, hub id or .ckpt/.safetensors file")
    export.add_argument("out_dir")
    export.add_argument("--config", help="diffusers folder or hub id for a single-file checkpoint's configs")
    export.add_argument("--variant", help="export the weight files of this variant (e.g. fp16)")
    export.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"])
    export.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    export.add_argument("--batch", default="1:4", help="images per call: N, MIN:MAX or MIN:OPT:MAX")
    shape = export.add_mutually_exclusive_group()
    shape.add_argument("--resolution", default="256:768", help="pixel side range: N, MIN:MAX or MIN:OPT:MAX")
    shape.add_argument("--static", help="one fixed size WxH, e.g. 512x512 (for CUDA graphs)")
    export.add_argument("--step-cache", type=int, metavar="DEPTH",
                        help="also export the UNet split for step caching at DEPTH outer levels (usually 1)")
    export.add_argument("--verify", action="store_true", help="check every component against PyTorch")
    export.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")


def run_export(args: argparse.Namespace) -> None:
    from engine.extras import import_extra
    from engine.specs import Profile, parse_range

    bundle = import_extra("export.bundle", "ip2p export")
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
    options = bundle.ExportOptions(format=args.format, precision=args.precision, profile=profile, verify=args.verify,
                                   force=args.force, step_cache=args.step_cache)
    out, checks = bundle.export_bundle(args.model, args.out_dir, options, config=args.config, variant=args.variant,
                                       progress=not args.quiet)
    for check in checks:
        print(check)
    log.info("wrote %s", out)


def add_quantize_arguments(quantize: argparse.ArgumentParser) -> None:
    quantize.add_argument("bundle", help="an ONNX bundle written by ip2p export")
    quantize.add_argument("out_dir")
    quantize.add_argument("--data", required=True,
                          help="calibration edits: a folder with metadata.jsonl (input_image, edit_prompt), "
                               "as ip2p synth writes or ip2p train reads")
    quantize.add_argument("--edits", type=int, default=32, help="calibration edits to run (default 32)")
    quantize.add_argument("--steps", type=int, help="denoising steps per calibration edit (default: the edit's)")
    quantize.add_argument("--samples", type=int, default=300,
                          help="UNet calls the statistics come from, spread over every step (default 300)")
    quantize.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")


def run_quantize(args: argparse.Namespace) -> None:
    from pathlib import Path

    from engine.extras import import_extra

    quantize = import_extra("export.quantize", "ip2p quantize", extra="int8")
    calibration = quantize.Calibration(Path(args.data), edits=args.edits, steps=args.steps, samples=args.samples)
    out, error = quantize.quantize_bundle(args.bundle, args.out_dir, calibration, force=args.force,
                                          progress=not args.quiet)
    log.info("wrote %s (int8 UNet, relative output error %.4f on held-back calibration calls)", out, error)


COMMANDS = {"export": (add_export_arguments, run_export), "quantize": (add_quantize_arguments, run_quantize)}
