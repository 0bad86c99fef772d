"""How much of the teacher's text and image terms (paper eq. 3) distilled students reproduce with their one row.

``python -m benchmarks.scale_response STUDENT [STUDENT ...] --config DISTILL.yaml [--batches 4] [--json OUT.json]``:
the teacher and the data are the distillation config's (``training/configs/shapes-distilled.yaml``), each STUDENT a
folder of ``ip2p distill`` (``OUT`` or ``OUT/guidance/model``). ``training.distill.scale_response`` says what the
figures mean; the same batches, timesteps and noise for every student.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def measure(students: list[str], config_path: str, batches: int) -> dict[str, dict]:
    """{student: {term: {cosine, norm_ratio}}} on the same batches of the config's data."""
    import torch
    from diffusers import UNet2DConditionModel

    from engine.backends.torch_modules import load_component
    from training.distill import _Frozen, load_distill_config, scale_response

    config = load_distill_config(config_path, {})
    frozen = _Frozen(config, torch.device("cpu"))
    teacher = load_component(frozen.source, "unet").eval()
    return {student: scale_response(frozen, teacher, UNet2DConditionModel.from_pretrained(Path(student) / "unet")
                                    .eval(), config, batches) for student in students}


def table(results: dict[str, dict]) -> str:
    lines = ["| student | text term: cosine, norm ratio | image term: cosine, norm ratio |", "|---|---:|---:|"]
    for student, terms in results.items():
        cells = [f"{terms[term]['cosine']:.2f}, {terms[term]['norm_ratio']:.2f}" for term in ("text", "image")]
        lines.append(f"| {student} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+")
    parser.add_argument("--config", default="training/configs/shapes-distilled.yaml")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--json", help="results file to write")
    args = parser.parse_args(argv)
    results = measure(args.students, args.config, args.batches)
    if args.json:
        from engine.files import write_json_atomic

        write_json_atomic(args.json, results, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
