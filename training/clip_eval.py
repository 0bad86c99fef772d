"""``ip2p eval --clip``: edit a captioned set with a model and score the edits with CLIP, for one setting or the
paper's sweeps (Brooks et al. 2022, fig. 8: directional against image similarity, one point per guidance
setting).

The data: any format ``ip2p train --data`` reads, with ``input_image``, ``edit_prompt``, ``input_caption`` and
``output_caption`` (or the released dataset's ``original_prompt`` / ``edited_prompt``). Example ``i`` is edited
with seed ``seed + i`` in every setting, so the settings differ only by what they set.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from tqdm.auto import tqdm

from engine.errors import InputError
from engine.images import save_image
from training.clip_metrics import METRICS, ClipScorer
from training.data import CAPTIONED, SkipCounter, open_rows, read_image
from engine.files import atomic_path

if TYPE_CHECKING:
    from PIL import Image

    from engine.config import EditConfig
    from engine.pipeline import EditPipeline

log = logging.getLogger(__name__)
# The sweeps: image guidance over the paper's 1.0-2.2 at the config's text guidance, and text guidance over
# 3-12 at its image guidance (this project's choice of range for the second).
IMAGE_SWEEP = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
TEXT_SWEEP = (3.0, 5.0, 7.5, 10.0, 12.0)
SWEEPS = ("none", "image", "text", "both")


@dataclasses.dataclass(frozen=True)
class Example:
    image: "Image.Image"
    instruction: str
    input_caption: str
    output_caption: str


def load_examples(data: str | Path, count: int | None = None) -> tuple[list[Example], SkipCounter]:
    """The first ``count`` usable examples of ``data`` (all by default); unusable ones skipped and counted."""
    source = Path(data)
    if not source.exists():
        raise InputError(f"{source}: no such data folder or file")
    skipped = SkipCounter()
    rows = open_rows(source, skipped, CAPTIONED)
    examples = []
    for index in range(len(rows)):
        if count is not None and len(examples) >= count:
            break
        row = rows[index]
        if row is None:
            skipped.add("missing column (input_image, edit_prompt, input_caption, output_caption)")
            continue
        try:
            image = read_image(row["input_image"])
        except InputError as err:
            skipped.add("missing or corrupt image")
            log.debug("skipping example %d: %s", index, err)
            continue
        examples.append(Example(image, row["edit_prompt"], row["input_caption"], row["output_caption"]))
    if not examples:
        raise InputError(f"{source}: no usable captioned examples ({skipped.summary()}); each needs input_image, "
                         "edit_prompt, input_caption and output_caption (or original_prompt / edited_prompt)")
    return examples, skipped


def sweep_configs(config: "EditConfig", sweep: str) -> list["EditConfig"]:
    """The settings a sweep runs: the config alone, or it with each scale of the image and/or text sweep."""
    if sweep not in SWEEPS:
        raise InputError(f"--sweep: one of {', '.join(SWEEPS)}, got {sweep!r}")
    configs = [config] if sweep == "none" else []
    if sweep in ("image", "both"):
        configs += [dataclasses.replace(config, image_guidance=s) for s in IMAGE_SWEEP]
    if sweep in ("text", "both"):
        configs += [dataclasses.replace(config, text_guidance=s) for s in TEXT_SWEEP]
    return list(dict.fromkeys(configs))  # "both" has the config's own point twice


def label(config: "EditConfig") -> str:
    return f"text{config.text_guidance:g}-image{config.image_guidance:g}"


def clip_evaluate(pipe: "EditPipeline", scorer: ClipScorer, examples: Sequence[Example],
                  configs: Sequence["EditConfig"], seed: int = 0, batch_size: int = 8,
                  save_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Edit every example with every config and score the edits; a report with, per setting, its scales, the
    three means, the UNet work per edit, and every example's scores."""
    inputs = [e.image for e in examples]
    before = scorer.image_embeddings(inputs)
    captions = (scorer.text_embeddings([e.input_caption for e in examples]),
                scorer.text_embeddings([e.output_caption for e in examples]))
    settings = []
    bar = tqdm(total=len(configs) * len(examples), desc="editing", unit="edit", disable=not progress)
    for config in configs:
        edited, work = [], []
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            result = pipe.run([e.image for e in batch], [e.instruction for e in batch], config,
                              seed=[seed + start + i for i in range(len(batch))])
            edited += result.images
            work += result.unet_evaluations
            bar.update(len(batch))
        if save_dir is not None:
            _save(Path(save_dir) / label(config), edited)
        scores = scorer.score(inputs, edited, [e.input_caption for e in examples],
                              [e.output_caption for e in examples], input_embeddings=before,
                              caption_embeddings=captions)
        settings.append(dict(text_guidance=config.text_guidance, image_guidance=config.image_guidance,
                             steps=config.steps, sampler=config.sampler, **scores.means(),
                             unet_evaluations_per_edit=float(np.mean(work)), per_example=scores.per_example()))
    bar.close()
    return dict(examples=len(examples), seed=seed, settings=settings)


def _save(folder: Path, images: Sequence["Image.Image"]) -> None:
    """The edits by example index, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        save_image(image, folder / f"{index:05d}.png")


def format_clip_report(report: dict) -> str:
    header = f"{'text':>6} {'image':>6} {'image sim':>10} {'text-image':>11} {'directional':>12} {'UNet/edit':>10}"
    lines = [f"CLIP scores over {report['examples']} edits ({report.get('clip_model', 'CLIP')})", header]
    for s in report["settings"]:
        lines.append(f"{s['text_guidance']:>6g} {s['image_guidance']:>6g} {s[METRICS[0]]:>10.4f} "
                     f"{s[METRICS[1]]:>11.4f} {s[METRICS[2]]:>12.4f} {s['unet_evaluations_per_edit']:>10.1f}")
    return "\n".join(lines)


def plot_clip_report(report: dict, out: str | Path) -> None:
    """Directional similarity against image similarity, one point per setting (the paper's fig. 8), written
    atomically to ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from None
    out = Path(out)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for sweep, marker in (("image", "o"), ("text", "s")):
        fixed = "text_guidance" if sweep == "image" else "image_guidance"
        varied = "image_guidance" if sweep == "image" else "text_guidance"
        groups: dict[float, list[dict]] = {}
        for s in report["settings"]:
            groups.setdefault(s[fixed], []).append(s)
        for value, points in groups.items():
            if len({p[varied] for p in points}) < 2:
                continue
            points.sort(key=lambda p: p[varied])
            ax.plot([p[METRICS[0]] for p in points], [p[METRICS[2]] for p in points], marker=marker,
                    label=f"{varied.replace('_', ' ')} (s_{'T' if fixed == 'text_guidance' else 'I'} {value:g})")
            for p in points:
                ax.annotate(f"{p[varied]:g}", (p[METRICS[0]], p[METRICS[2]]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    if not ax.lines:  # a single setting, or settings that share no fixed scale
        ax.scatter([s[METRICS[0]] for s in report["settings"]], [s[METRICS[2]] for s in report["settings"]])
    ax.set_xlabel("CLIP image similarity (input vs edit)")
    ax.set_ylabel("CLIP directional similarity")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
