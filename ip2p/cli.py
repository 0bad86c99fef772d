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

from engine.errors import ExportError, InputError, NumericalError
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
    "train": ("training.cli", "fine-tune an InstructPix2Pix UNet (see training/)"),
    "synth": ("training.cli", "write procedural paired shape-edit data (training format)"),
    "eval": ("training.cli", "score edits: held-out synthetic shapes edits, or CLIP metrics on a captioned set"),
    "generate-prompts": ("training.cli", "edit instructions and edited captions for input captions, from a language model"),
    "train-prompts": ("training.cli", "fine-tune a causal language model on (caption, instruction, edited caption) triplets"),
    "generate-pairs": ("training.cli", "before/after training pairs from caption pairs: Prompt-to-Prompt and a CLIP filter"),
    "bench": ("benchmarks.cli", "benchmark tools"),
}
PARTS = ("ip2p", "engine", "export", "training", "benchmarks")  # loggers of our own progress notes


def chosen_command(argv: Sequence[str]) -> str | None:
    """The first argument naming a command (global options may come before it)."""
    return next((a for a in argv if not a.startswith("-")), None) if argv else None


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict]:
    """The parser, with full arguments only for the command in ``argv``; and that command's run functions."""
    parser = argparse.ArgumentParser(prog="ip2p", description="InstructPix2Pix: edit images by instruction.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    name = chosen_command(argv)
    runners = {}
    for command, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(command, help=help_text, description=help_text)
        if command == name:
            add_arguments, run = importlib.import_module(module).COMMANDS[command]
            add_arguments(sub_parser)
            runners[command] = run
    return parser, runners


def configure_logging(verbose: bool, quiet: bool) -> None:
    # Library chatter (advisories, weight-loading bars) stays out of the CLI unless asked for.
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        logging.getLogger("torch").setLevel(logging.ERROR)
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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
        args = parser.parse_args(argv)
        configure_logging(args.verbose, args.quiet)
        runners[args.command](args)
    except (InputError, NumericalError, ExportError) as err:
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
