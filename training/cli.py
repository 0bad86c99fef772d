"""Training's commands: ``train`` (needs the train extra), ``synth`` (procedural data), ``eval`` (held-out shapes
edits on any backend, or CLIP metrics), and the paper's data pipeline: ``generate-prompts``, ``train-prompts``,
``generate-pairs``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine.cli import add_edit_options, add_model_options, add_torch_options, edit_config, torch_options
from engine.errors import InputError

log = logging.getLogger("ip2p")


def _weights(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,2,3, got {value!r}") from None


def add_train_arguments(trainer: argparse.ArgumentParser) -> None:
    trainer.add_argument("--config", help="YAML file with any TrainConfig option")
    trainer.add_argument("--base", help="Stable Diffusion or InstructPix2Pix model to start from")
    trainer.add_argument("--base-variant", help="the base's weight variant to load, e.g. fp16")
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


def add_distill_arguments(distiller: argparse.ArgumentParser) -> None:
    distiller.add_argument("teacher", nargs="?", help="the InstructPix2Pix model to distil (folder, checkpoint or hub id)")
    distiller.add_argument("--config", help="YAML file with any DistillConfig option")
    distiller.add_argument("--data", help="training pairs, in any format ip2p train reads")
    distiller.add_argument("-o", "--output", help="where the student (and each stage's checkpoints) go")
    distiller.add_argument("--guidance-steps", type=int, help="optimiser steps of stage 1 (the scales as input)")
    distiller.add_argument("--consistency-steps", type=int, help="optimiser steps of stage 2 (few steps)")
    distiller.add_argument("--resolution", type=int)
    distiller.add_argument("--batch-size", type=int)
    distiller.add_argument("--lr", type=float)
    distiller.add_argument("--text-range", type=_range, metavar="LO:HI", help="s_T the student learns (default 1:12)")
    distiller.add_argument("--image-range", type=_range, metavar="LO:HI", help="s_I the student learns (default 1:3)")
    distiller.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    distiller.add_argument("--checkpoint-every", type=int)
    distiller.add_argument("--seed", type=int)
    distiller.add_argument("--resume", help="'latest' or a checkpoint folder")


def run_distill(args: argparse.Namespace) -> None:
    from engine.extras import import_extra

    distill = import_extra("training.distill", "ip2p distill", extra="train")
    flags = {k: getattr(args, k) for k in ("teacher", "data", "output", "guidance_steps", "consistency_steps",
                                           "resolution", "batch_size", "lr", "text_range", "image_range",
                                           "mixed_precision", "checkpoint_every", "seed")}
    log.info("wrote %s", distill.distill(distill.load_distill_config(args.config, flags), resume=args.resume,
                                         progress=not args.quiet))


def add_synth_arguments(synth: argparse.ArgumentParser) -> None:
    synth.add_argument("out_dir")
    synth.add_argument("--count", type=int, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--shape-weights", type=_weights,
                       help="relative shares of scenes with 1, 2 and 3 shapes, e.g. 1,2,3 (default: equal)")
    synth.add_argument("--edit-weights", type=_weights,
                       help="relative shares of shape recolourings, background recolourings and removals, "
                            "e.g. 4,2,3 (default: even among the edits a scene allows)")


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("model", nargs="?", help="model folder or bundle (default: as for edit)")
    add_model_options(evaluate)
    evaluate.add_argument("--count", type=int, help="held-out edits, split evenly over edit types (default 300); "
                          "with --data, the first COUNT usable examples (default all)")
    evaluate.add_argument("--seed", type=int, help="held-out set seed (default: one training never uses); with "
                          "--data, example i's edit seed is SEED + i (default 0)")
    evaluate.add_argument("--clip", metavar="CLIP_MODEL", help="score edits of --data with this CLIP model (a folder "
                          "or hub id; the paper's: openai/clip-vit-large-patch14) instead of the shapes check")
    evaluate.add_argument("--data", help="--clip: a captioned set in any format ip2p train reads")
    evaluate.add_argument("--sweep", choices=["none", "image", "text", "both"], default="none",
                          help="--clip: also vary image guidance over 1.0-2.2 and/or text guidance over 3-12")
    evaluate.add_argument("--plot", help="--clip: write directional against image similarity here (PNG)")
    add_edit_options(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--json", help="also write the report as JSON here")
    add_torch_options(evaluate)
    evaluate.add_argument("--save-dir", help="write input/edit/truth sheets here")


def _range(value: str) -> tuple[float, float]:
    lo, sep, hi = value.partition(":")
    try:
        if sep:
            return float(lo), float(hi)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected LO:HI such as 0.1:0.9, got {value!r}")


def add_pairs_arguments(pairs: argparse.ArgumentParser) -> None:
    from training.pairs import PairSettings

    d = PairSettings()
    pairs.add_argument("prompts", help="prompts.jsonl: {input, edit, output} per line (ip2p generate-prompts)")
    pairs.add_argument("--base", required=True, help="a text-to-image Stable Diffusion folder or hub id")
    pairs.add_argument("--clip", required=True, metavar="CLIP_MODEL", help="the filter's CLIP (the paper's: "
                       "openai/clip-vit-large-patch14)")
    pairs.add_argument("-o", "--output", required=True, help="the data folder to write (or resume)")
    pairs.add_argument("--samples", type=int, default=d.samples, help=f"candidates per prompt (default {d.samples})")
    pairs.add_argument("--keep", type=int, default=d.keep, help="best candidates kept per prompt")
    pairs.add_argument("--steps", type=int, default=d.steps)
    pairs.add_argument("--resolution", type=int, default=d.resolution)
    pairs.add_argument("--seed", type=int, default=d.seed)
    pairs.add_argument("--p-range", type=_range, default=d.p_range, metavar="LO:HI",
                       help="fraction of steps with shared attention, drawn per candidate (default 0.1:0.9)")
    pairs.add_argument("--guidance-range", type=_range, default=d.guidance_range, metavar="LO:HI",
                       help="text guidance, drawn per candidate (default 5:9)")
    pairs.add_argument("--clip-threshold", type=float, default=d.clip_threshold,
                       help="each image against its caption (default 0.2)")
    pairs.add_argument("--clip-img-threshold", type=float, default=d.clip_img_threshold,
                       help="input image against edited image (default 0.7)")
    pairs.add_argument("--clip-dir-threshold", type=float, default=d.clip_dir_threshold,
                       help="image change against caption change (default 0.2)")
    pairs.add_argument("--device", default="cpu")


def run_pairs(args: argparse.Namespace) -> None:
    from engine.extras import import_extra

    pairs = import_extra("training.pairs", "ip2p generate-pairs")
    for name, (lo, hi) in (("--p-range", args.p_range), ("--guidance-range", args.guidance_range)):
        if not 0 <= lo <= hi or (name == "--p-range" and hi > 1):
            raise InputError(f"{name}: LO:HI with 0 <= LO <= HI{' <= 1' if name == '--p-range' else ''}, got {lo}:{hi}")
    settings = pairs.PairSettings(samples=args.samples, keep=args.keep, steps=args.steps, resolution=args.resolution,
                                  seed=args.seed, p_range=args.p_range, guidance_range=args.guidance_range,
                                  clip_threshold=args.clip_threshold, clip_img_threshold=args.clip_img_threshold,
                                  clip_dir_threshold=args.clip_dir_threshold)
    pairs.generate_pairs(args.prompts, args.base, args.clip, args.output, settings, device=args.device,
                         progress=not args.quiet)


def add_prompts_arguments(prompts: argparse.ArgumentParser) -> None:
    prompts.add_argument("captions", help="text file, one input caption a line")
    prompts.add_argument("-o", "--output", required=True, help="prompts.jsonl to write")
    source = prompts.add_mutually_exclusive_group(required=True)
    source.add_argument("--lm", help="a causal language model: folder or hub id (e.g. one from train-prompts)")
    source.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible completion server (vLLM, llama.cpp)")
    prompts.add_argument("--endpoint-model", help="--endpoint: the model name to ask for")
    prompts.add_argument("--temperature", type=float, default=0.8)
    prompts.add_argument("--seed", type=int, default=0, help="caption i is sampled with seed SEED + i")
    prompts.add_argument("--device", default="cpu")


def run_prompts(args: argparse.Namespace) -> None:
    from engine.extras import import_extra

    prompts = import_extra("training.prompts", "ip2p generate-prompts")
    captions = prompts.read_captions(args.captions)
    if args.endpoint:
        lm = prompts.EndpointLM(args.endpoint, args.endpoint_model, args.temperature)
    else:
        lm = prompts.TransformersLM(args.lm, args.device, args.temperature)
    prompts.generate_prompts(captions, lm, args.output, seed=args.seed, progress=not args.quiet)


def add_train_prompts_arguments(trainer: argparse.ArgumentParser) -> None:
    trainer.add_argument("triplets", nargs="?", help="JSON lines of {input, edit, output} (default: the examples "
                         "that ship with the project)")
    trainer.add_argument("--lm", required=True, help="the causal language model to fine-tune: folder or hub id")
    trainer.add_argument("-o", "--output", required=True, help="a new folder for the fine-tuned model")
    trainer.add_argument("--steps", type=int, default=200)
    trainer.add_argument("--lr", type=float, default=5e-5)
    trainer.add_argument("--batch-size", type=int, default=8)
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--device", default="cpu")


def run_train_prompts(args: argparse.Namespace) -> None:
    from engine.extras import import_extra

    prompts = import_extra("training.prompts", "ip2p train-prompts")
    triplets = prompts.read_triplets(args.triplets) if args.triplets else prompts.shipped_examples()
    prompts.train_prompts(triplets, args.lm, args.output, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          seed=args.seed, device=args.device, progress=not args.quiet)


def run_train(args: argparse.Namespace) -> None:
    from engine.extras import import_extra

    load_config = import_extra("training.config", "ip2p train", extra="train").load_config
    train = import_extra("training.train", "ip2p train", extra="train").train
    flags = {k: getattr(args, k) for k in ("base", "base_variant", "data", "output", "max_steps", "resolution",
                                           "batch_size", "grad_accum", "lr", "mixed_precision", "checkpoint_every",
                                           "seed")}
    log.info("wrote %s", train(load_config(args.config, flags), resume=args.resume, progress=not args.quiet))


def run_synth(args: argparse.Namespace) -> None:
    from training.synthetic import generate

    out = generate(args.out_dir, args.count, seed=args.seed, size=args.size, progress=not args.quiet,
                   shape_weights=args.shape_weights, edit_weights=args.edit_weights)
    log.info("wrote %s", out)


def run_eval(args: argparse.Namespace) -> None:
    from engine.files import write_json_atomic
    from engine.pipeline import EditPipeline
    from training.evaluation import HELD_OUT_SEED, evaluate, format_report

    if (args.count is not None and args.count < 1) or args.batch_size < 1:
        raise InputError("--count and --batch-size must be at least 1")
    if bool(args.clip) != bool(args.data):
        raise InputError("--clip and --data go together: the CLIP model, and the captioned set it scores")
    if not args.clip and (args.sweep != "none" or args.plot):
        raise InputError("--sweep and --plot score with CLIP: give --clip CLIP_MODEL --data DATA")
    config = edit_config(args)
    if args.clip:
        from training.clip_eval import clip_evaluate, format_clip_report, load_examples, plot_clip_report, sweep_configs
        from training.clip_metrics import ClipScorer, resolve_clip

        resolve_clip(args.clip)  # a wrong model is named before any data is read
        examples, skipped = load_examples(args.data, args.count)
        if skipped.total:
            log.warning("%s: %s", args.data, skipped.summary())
        scorer = ClipScorer(args.clip, device=args.device)
    pipe = EditPipeline.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                        variant=args.variant, progress=False, backend_options=torch_options(args))
    if pipe.model.student is not None:  # its presets are its own step counts
        config = edit_config(args, pipe.model.student)
    if args.clip:
        report = clip_evaluate(pipe, scorer, examples, sweep_configs(config, args.sweep),
                               seed=args.seed or 0, batch_size=args.batch_size, save_dir=args.save_dir,
                               progress=not args.quiet)
        report.update(clip_model=str(args.clip), data=str(args.data), skipped=dict(skipped.reasons))
        print(format_clip_report(report))
        if args.plot:
            plot_clip_report(report, args.plot)
            log.info("wrote %s", args.plot)
    else:
        report = evaluate(pipe, config, args.count or 300, HELD_OUT_SEED if args.seed is None else args.seed,
                          args.batch_size, args.save_dir, progress=not args.quiet)
        print(format_report(report))
    if args.json:
        write_json_atomic(Path(args.json), report)
        log.info("wrote %s", args.json)


COMMANDS = {
    "train": (add_train_arguments, run_train),
    "distill": (add_distill_arguments, run_distill),
    "synth": (add_synth_arguments, run_synth),
    "eval": (add_eval_arguments, run_eval),
    "generate-pairs": (add_pairs_arguments, run_pairs),
    "generate-prompts": (add_prompts_arguments, run_prompts),
    "train-prompts": (add_train_prompts_arguments, run_train_prompts),
}
