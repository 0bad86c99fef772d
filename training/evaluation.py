"""``ip2p eval``: how often a model gets a synthetic-shapes edit right, per edit type, on a held-out set.

An edit succeeds when (1) the target region's mean colour is nearest the requested colour among the palette
(the new colour for a recolour, the background's colour where a removed shape was) and (2) the rest of the
image is unchanged: PSNR >= 25 dB against the ground truth outside the target region. Region borders
(``BORDER`` pixels either side of the target's outline, where the VAE's 4x downsampling blurs) count for
neither. Works with any backend the pipeline runs, torch or an exported bundle.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from training.synthetic import EDITS, PALETTE, Shape, draw, random_edit, random_scene, shape_mask

if TYPE_CHECKING:
    from engine.config import EditConfig
    from engine.pipeline import EditPipeline

HELD_OUT_SEED = 1_000_003  # training data uses small seeds (the shipped model: 1)
MIN_PSNR = 25.0  # dB, untouched region against the ground truth
BORDER = 2  # pixels


@dataclass(frozen=True)
class Case:
    """One held-out edit: input, instruction, ground truth, the region it changes and the colour it must get."""

    edit: str
    image: Image.Image
    instruction: str
    target: np.ndarray  # (H, W, 3) uint8 ground truth
    region: np.ndarray  # (H, W) bool
    colour: str
    shapes: int  # shapes in the input scene


@dataclass(frozen=True)
class Score:
    colour_ok: bool
    psnr: float

    @property
    def success(self) -> bool:
        return self.colour_ok and self.psnr >= MIN_PSNR


def held_out_cases(count: int, seed: int = HELD_OUT_SEED, size: int = 64) -> list[Case]:
    """``count`` cases, as even a split over the edit types as ``count`` allows, from a seeded generator."""
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    for i in range(count):
        kind = EDITS[i % len(EDITS)]
        background, shapes = random_scene(rng, size)
        while kind == "remove" and len(shapes) < 2:
            background, shapes = random_scene(rng, size)
        text, new_background, new_shapes, truth = random_edit(rng, background, shapes, kind)
        if kind == "background":
            region, colour = ~np.any([shape_mask(size, s) for s in shapes], axis=0), truth["colour"]
        else:
            region = shape_mask(size, Shape(truth["shape"], "white", tuple(truth["box"])))
            colour = truth["colour"] if kind == "recolour" else background
        cases.append(Case(kind, draw(size, background, shapes), text,
                          np.asarray(draw(size, new_background, new_shapes)), region, colour, len(shapes)))
    return cases


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` dilated by ``pixels`` (square neighbourhood)."""
    out = mask.copy()
    for _ in range(pixels):
        padded = np.pad(out, 1)
        out = np.any([padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    return out


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    """Peak signal-to-noise ratio in dB of two arrays whose values span ``peak`` (255 for uint8 pixels)."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return 10 * math.log10(peak**2 / max(mse, 1e-20))


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    distances = [np.sum((np.asarray(PALETTE[n], dtype=np.float64) - rgb) ** 2) for n in names]
    return names[int(np.argmin(distances))]


def score(case: Case, edited: np.ndarray) -> Score:
    """Score one (H, W, 3) uint8 edit of ``case``."""
    inner = ~_grow(~case.region, BORDER) & case.region
    inner = inner if inner.any() else case.region
    colour_ok = nearest_colour(edited[inner].astype(np.float64).mean(0)) == case.colour
    untouched = ~_grow(case.region, BORDER)
    quality = psnr(edited[untouched], case.target[untouched], peak=255.0) if untouched.any() else math.inf
    return Score(colour_ok, quality)


def evaluate(pipe: "EditPipeline", config: "EditConfig", count: int = 300, seed: int = HELD_OUT_SEED,
             batch_size: int = 16, save_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Per-edit-type success rates (percent) of ``pipe`` (an EditPipeline) editing with ``config`` (at the
    scenes' own size) on ``count`` held-out cases, the UNet work per edit, and each case's score under
    "cases"; ``save_dir`` gets a sheet per batch (inputs, edits, ground truth as rows)."""
    config = dataclasses.replace(config, resolution=None, keep_size=False, output_type="pil")
    cases = held_out_cases(count, seed)
    scores: list[Score] = []
    evaluations: list[int] = []
    work: list[float] = []
    for start in tqdm(range(0, len(cases), batch_size), desc="evaluating", unit="batch", disable=not progress):
        batch = cases[start : start + batch_size]
        result = pipe.run([c.image for c in batch], [c.instruction for c in batch], config,
                          seed=[seed + start + i for i in range(len(batch))])
        arrays = [np.asarray(im.convert("RGB")) for im in result.images]
        scores += [score(c, a) for c, a in zip(batch, arrays)]
        evaluations += result.unet_evaluations
        work += result.unet_work
        if save_dir is not None:
            _save_sheet(Path(save_dir) / f"batch-{start // batch_size:03d}.png", batch, arrays)
    guidance = config.guidance
    report = {"count": len(cases), "seed": seed, "steps": config.steps, "sampler": config.sampler,
              "text_guidance": config.text_guidance, "image_guidance": config.image_guidance,
              "guidance_interval": list(guidance.interval) if guidance.interval else None,
              "adaptive_guidance": guidance.adaptive_threshold,
              "cache_interval": config.step_cache.interval, "cache_depth": config.step_cache.depth,
              "unet_evaluations_per_edit": float(np.mean(evaluations)), "unet_work_per_edit": float(np.mean(work)),
              "edits": {}}
    for edit in EDITS:
        mine = [s for c, s in zip(cases, scores) if c.edit == edit]
        if mine:
            report["edits"][edit] = {
                "n": len(mine),
                "success": 100.0 * np.mean([s.success for s in mine]),
                "colour_correct": 100.0 * np.mean([s.colour_ok for s in mine]),
                "untouched_psnr_ok": 100.0 * np.mean([s.psnr >= MIN_PSNR for s in mine]),
                "median_untouched_psnr_db": float(np.median([s.psnr for s in mine])),
            }
    report["cases"] = [{"edit": c.edit, "instruction": c.instruction, "colour": c.colour, "shapes": c.shapes,
                        "region_pixels": int(c.region.sum()), "colour_ok": bool(s.colour_ok),
                        "untouched_psnr_db": round(s.psnr, 2) if math.isfinite(s.psnr) else None,
                        "success": bool(s.success)} for c, s in zip(cases, scores)]
    return report


def format_report(report: dict) -> str:
    """Markdown table of an ``evaluate`` report."""
    approximations = "".join(
        f", {name} {report[key]}" for key, name in (("guidance_interval", "guidance interval"),
                                                    ("adaptive_guidance", "adaptive guidance")) if report.get(key))
    if report.get("cache_interval", 1) > 1:
        approximations += f", step cache every {report['cache_interval']} at depth {report['cache_depth']}"
    lines = [f"{report['count']} held-out edits (seed {report['seed']}, {report['steps']} {report['sampler']} steps, "
             f"text guidance {report['text_guidance']}, image guidance {report['image_guidance']}{approximations}; "
             f"{report['unet_evaluations_per_edit']:.1f} UNet evaluations per edit, "
             f"{report.get('unet_work_per_edit', report['unet_evaluations_per_edit']):.1f} in whole-UNet MACs)",
             "", "| edit | n | success | colour right | untouched >= 25 dB | median untouched PSNR |",
             "|---|---:|---:|---:|---:|---:|"]
    for edit, r in report["edits"].items():
        lines.append(f"| {edit} | {r['n']} | {r['success']:.1f}% | {r['colour_correct']:.1f}% | "
                     f"{r['untouched_psnr_ok']:.1f}% | {r['median_untouched_psnr_db']:.1f} dB |")
    cases = report.get("cases", [])
    if cases:  # where the failures are: scenes of several shapes ask the model to find the named one
        counts = sorted({c["shapes"] for c in cases})
        lines += ["", "Success by shapes in the scene:", "",
                  "| edit | " + " | ".join(f"{n} shape{'s' * (n > 1)}" for n in counts) + " |",
                  "|---|" + "---:|" * len(counts)]
        for edit in report["edits"]:
            cells = []
            for n in counts:
                mine = [c["success"] for c in cases if c["edit"] == edit and c["shapes"] == n]
                cells.append(f"{100.0 * np.mean(mine):.0f}% of {len(mine)}" if mine else "-")
            lines.append(f"| {edit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save_sheet(path: Path, cases: list[Case], edited: list[np.ndarray]) -> None:
    rows = [np.concatenate([np.asarray(c.image) for c in cases], 1), np.concatenate(edited, 1),
            np.concatenate([c.target for c in cases], 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(path)
