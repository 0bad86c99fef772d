"""Procedural paired edit data with exact ground truth: 1-3 shapes on a plain background.

Edits: recolour a named shape, recolour the background, remove a named shape, each with several
phrasings so a model learns words rather than templates. Seeded: the same seed gives the same data.
Writes the training folder format (``metadata.jsonl`` + PNGs) and records each edit's ground truth
(kind, target shape, colour) in the row for evaluation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from engine.errors import InputError
from engine.files import write_jsonl_atomic

PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 50),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
RECOLOUR = ("make the {shape} {colour}", "turn the {shape} {colour}", "paint the {shape} {colour}",
            "change the {shape} to {colour}", "colour the {shape} {colour}")
BACKGROUND = ("make the background {colour}", "turn the background {colour}", "paint the background {colour}",
              "change the background to {colour}")
REMOVE = ("remove the {shape}", "delete the {shape}", "take away the {shape}", "get rid of the {shape}")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # left, top, right, bottom


def draw(size: int, background: str, shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (size, size), PALETTE[background])
    pen = ImageDraw.Draw(image)
    for s in shapes:
        _draw_shape(pen, s, PALETTE[s.colour])
    return image


def shape_mask(size: int, shape: Shape) -> np.ndarray:
    """(size, size) bool: the pixels ``draw`` paints for ``shape``."""
    image = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(image), shape, 255)
    return np.asarray(image) > 0


def _draw_shape(pen: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    if shape.kind == "circle":
        pen.ellipse(shape.box, fill=fill)
    elif shape.kind == "square":
        pen.rectangle(shape.box, fill=fill)
    else:
        left, top, right, bottom = shape.box
        pen.polygon([(left, bottom), ((left + right) / 2, top), (right, bottom)], fill=fill)


def random_scene(rng: np.random.Generator, size: int, count: int | None = None) -> tuple[str, list[Shape]]:
    """A background colour and ``count`` (else 1-3, uniformly) non-overlapping shapes of distinct kinds and
    colours, none the background's (fewer only where 100 tries find no free place)."""
    colours = list(rng.permutation(list(PALETTE)))
    background = colours.pop()
    kinds = list(rng.permutation(SHAPES))[: count or int(rng.integers(1, 4))]
    shapes: list[Shape] = []
    for kind in kinds:
        for _ in range(100):
            side = int(rng.integers(size // 5, size // 2))
            left, top = (int(v) for v in rng.integers(1, size - side - 1, 2))
            box = (left, top, left + side, top + side)
            if all(box[2] < o.box[0] or o.box[2] < box[0] or box[3] < o.box[1] or o.box[3] < box[1] for o in shapes):
                shapes.append(Shape(kind, colours.pop(), box))
                break
    return background, shapes


EDITS = ("recolour", "background", "remove")


def random_edit(
    rng: np.random.Generator, background: str, shapes: list[Shape], kind: str | None = None,
    edit_p: np.ndarray | None = None,
) -> tuple[str, str, list[Shape], dict]:
    """(instruction, new background, new shapes, ground truth) for one random edit of a scene; ``kind``
    (one of EDITS) fixes the edit type, else it is drawn (removal needs a scene of 2+ shapes), evenly or
    with the probabilities ``edit_p`` (of EDITS, from ``edit_probabilities``)."""
    used = {background, *(s.colour for s in shapes)}
    free = [c for c in PALETTE if c not in used]
    if kind is None:
        allowed = list(EDITS) if len(shapes) > 1 else ["recolour", "background"]
        if edit_p is None:
            kind = rng.choice(allowed)
        else:
            p = edit_p[: len(allowed)]
            if p.sum() == 0:  # a weight of 0 on recolouring and background: one-shape scenes still need an edit
                p = np.ones(len(allowed))
            kind = str(rng.choice(allowed, p=p / p.sum()))
    elif kind == "remove" and len(shapes) < 2:
        raise ValueError("removal needs a scene with at least two shapes")
    if kind == "background":
        colour = str(rng.choice(free))
        text = str(rng.choice(BACKGROUND)).format(colour=colour)
        return text, colour, shapes, {"edit": "background", "colour": colour}
    target = shapes[int(rng.integers(len(shapes)))]
    rest = [s for s in shapes if s is not target]
    if kind == "remove":
        text = str(rng.choice(REMOVE)).format(shape=target.kind)
        return text, background, rest, {"edit": "remove", "shape": target.kind, "box": list(target.box)}
    colour = str(rng.choice(free))
    text = str(rng.choice(RECOLOUR)).format(shape=target.kind, colour=colour)
    new = [Shape(s.kind, colour, s.box) if s is target else s for s in shapes]
    return text, background, new, {"edit": "recolour", "shape": target.kind, "colour": colour, "box": list(target.box)}


def weights_to_probabilities(weights: Sequence[float], name: str, of: str) -> np.ndarray:
    """(3,) probabilities from 3 relative ``weights``; ``name`` and ``of`` word the error."""
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise InputError(f"{name} must be 3 weights >= 0 (of {of}) with a positive sum, got {weights}")
    return np.asarray(weights, dtype=np.float64) / sum(weights)


def shape_probabilities(weights: Sequence[float]) -> np.ndarray:
    """(3,) probabilities of 1, 2 and 3 shapes per scene from relative ``weights``."""
    return weights_to_probabilities(weights, "shape_weights", "1, 2, 3 shapes")


def edit_probabilities(weights: Sequence[float]) -> np.ndarray:
    """(3,) probabilities of recolouring a shape, recolouring the background and removing a shape (EDITS)."""
    return weights_to_probabilities(weights, "edit_weights", "recolour, background, remove")


def generate(out_dir: str | os.PathLike, count: int, seed: int = 0, size: int = 64, progress: bool = True,
             shape_weights: tuple[float, float, float] | None = None,
             edit_weights: tuple[float, float, float] | None = None) -> Path:
    """Write ``count`` pairs to ``out_dir`` (created; must not hold data already); with ``shape_weights`` its
    scenes hold 1, 2 or 3 shapes in those relative proportions (more scenes of several shapes teach picking
    the named shape among them), else 1-3 uniformly; with ``edit_weights`` the edits are recolourings,
    background recolourings and removals in those relative proportions (a scene of one shape draws from the
    first two), else evenly among those a scene allows."""
    out = Path(out_dir)
    if (out / "metadata.jsonl").exists():
        raise InputError(f"{out}: already holds a metadata.jsonl")
    if count < 1 or size < 16:
        raise InputError("count must be at least 1 and size at least 16")
    p = None if shape_weights is None else shape_probabilities(shape_weights)
    edit_p = None if edit_weights is None else edit_probabilities(edit_weights)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(count), desc="generating", unit="pair", disable=not progress):
        wanted = None if p is None else int(rng.choice(3, p=p)) + 1
        background, shapes = random_scene(rng, size, wanted)
        while wanted is not None and len(shapes) < wanted:
            background, shapes = random_scene(rng, size, wanted)
        text, new_background, new_shapes, truth = random_edit(rng, background, shapes, edit_p=edit_p)
        draw(size, background, shapes).save(out / "images" / f"{i:06d}_in.png")
        draw(size, new_background, new_shapes).save(out / "images" / f"{i:06d}_out.png")
        rows.append({"input_image": f"images/{i:06d}_in.png", "edit_prompt": text,
                     "edited_image": f"images/{i:06d}_out.png", "truth": truth})
    write_jsonl_atomic(out / "metadata.jsonl", rows)
    return out
