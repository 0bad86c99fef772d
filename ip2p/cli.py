"""The ``ip2p`` entry point. Each part owns its commands (``engine/cli.py``, ``export/cli.py``,
``training/cli.py``, ``benchmarks/cli.py``); this module only assembles them, importing a part when one
of its commands runs, so ``ip2p edit`` on a runtime-only install never touches export or training code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from typing import Sequence

from engine.errors import ONE_LINE_ERRORS
from engine.extras import missing_extra

log = logging.getLogger("ip2p")

# command -> (module that owns it, one-line help); the module's COMMANDS maps it to (add_arguments, run)
COMMANDS = {
    "edit": ("engine.cli", "edit images by an instruction"),
    "info": ("engine.cli", "describe a model or bundle: components, parameters, dtypes, scheduler"),
    "create-model": ("engine.cli", "write a random-weight model in diffusers format"),
    "convert": ("engine.cli", "write a diffusers-format model as one original-layout checkpoint"),
    "serve": ("engine.serving.cli", "serve edits over HTTP: batching, jobs, back-pressure, metrics, a web page"),
    "export": ("export.cli", "export a model to an ONNX or TensorRT bundle"),
    "quantize": ("export.cli", "an ONNX bundle with an int8 UNet for OpenVINO (approximate)"),
    "train": ("training.cli", "fine-tune an InstructPix2Pix UNet (see training/)"),
    "distill": ("training.cli", "distil an InstructPix2Pix model into one UNet row a step, in few steps"),
    "synth": ("training.cli", "write procedural paired shape-edit data (training format)"),
    "eval": ("training.cli", "score edits: held-out synthetic shapes edits, or CLIP metrics on a captioned set"),
    "generate-prompts": ("training.cli", "edit instructions and edited captions for input captions, from a language model"),
    "train-prompts": ("training.cli", "fine-tune a causal language model on (caption, instruction, edited caption) triplets"),
    "generate-pairs": ("training.cli", "before/after training pairs from caption pairs: Prompt-to-Prompt and a CLIP filter"),
    "bench": ("benchmarks.cli", "benchmark tools"),
}
PARTS = ("ip2p", "engine", "export", "training", "benchmarks")  # loggers of our own progress notes
GLOBAL_OPTIONS_NOTE = "-v/--verbose and -q/--quiet go before or after the command."
# What other packages read at import to stay quiet (set unless -v, and unless the user set them)
LIBRARY_QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",  # advisories and load reports
    "DIFFUSERS_VERBOSITY": "error",
    "TORCH_LOGS": "-all",  # torch sets up its own "torch" logger at import: errors only (the ONNX exporter's notes)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # downloads, and transformers' "Loading weights" bar, which reads it
    "TQDM_DISABLE": "1",  # any other package's bar (diffusers' "Loading pipeline components..."); ours pass disable=
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The first argument naming a command (global options may come before it)."""
    return next((a for a in argv if not a.startswith("-")), None) if argv else None


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, full tracebacks, and other packages' warnings and progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed, the global options read before or after the command (``ip2p export MODEL OUT -q``)."""
    args, rest = parser.parse_known_args(argv)
    trailing = argparse.ArgumentParser(add_help=False)
    add_global_options(trailing)
    args, unknown = trailing.parse_known_args(rest, namespace=args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict]:
    """The parser, with full arguments only for the command in ``argv``; and that command's run functions."""
    parser = argparse.ArgumentParser(prog="ip2p", description="InstructPix2Pix: edit images by instruction.",
                                     epilog=GLOBAL_OPTIONS_NOTE)
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    name = chosen_command(argv)
    runners = {}
    for command, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(command, help=help_text, description=help_text, epilog=GLOBAL_OPTIONS_NOTE)
        if command == name:
            add_arguments, run = importlib.import_module(module).COMMANDS[command]
            add_arguments(sub_parser)
            runners[command] = run
    return parser, runners


def hide_library_noise() -> None:
    """Keep other packages' warnings, advisories and progress bars off the console. A package imported later
    reads the environment, one imported already is told directly; our own bars pass ``disable=`` (``-q``)."""
    for variable, value in LIBRARY_QUIET_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)
    warnings.simplefilter("ignore")  # we warn through logging: every Python warning is another package's
    logging.getLogger("torch").setLevel(logging.ERROR)  # torch, once imported, owns this logger (TORCH_LOGS)
    for package in ("transformers", "diffusers"):
        if package in sys.modules:
            package_logging = importlib.import_module(f"{package}.utils.logging")
            package_logging.set_verbosity_error()
            package_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        importlib.import_module("huggingface_hub.utils").disable_progress_bars()


def configure_logging(verbose: bool, quiet: bool) -> None:
    if not verbose:
        hide_library_noise()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )
    for name in PARTS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        parser, runners = build_parser(argv)
        args = parse_args(parser, argv)
        configure_logging(args.verbose, args.quiet)
        runners[args.command](args)
    except ONE_LINE_ERRORS as err:
        print(f"ip2p: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        hint = missing_extra(err, f"ip2p {chosen_command(argv)}")
        if hint is None or verbose:
            raise
        print(f"ip2p: error: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ip2p: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an engine bug, not bad input: say so in one line unless --verbose
        if verbose:
            raise
        print(f"ip2p: internal error: {type(err).__name__}: {err} (rerun with -v for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
