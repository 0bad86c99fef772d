"""Paired edit data: (input image, instruction, edited image), with the same crop and flip on both.

Reads a folder with ``metadata.jsonl`` (keys ``input_image``, ``edit_prompt``, ``edited_image``,
image paths relative to the folder; ``original_image`` is accepted for ``input_image``, as in
diffusers' trainer). Bad rows (missing keys, missing, corrupt or mismatched-size images) are skipped
and counted, never fatal.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import InputError
from engine.images import load_image

log = logging.getLogger(__name__)

COLUMNS = ("input_image", "edit_prompt", "edited_image")
ALIASES = {"original_image": "input_image"}


@dataclass
class SkipCounter:
    """Why examples were skipped, and how often."""

    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.reasons[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        if not self.reasons:
            return "no examples skipped"
        return f"{self.total} examples skipped: " + ", ".join(f"{n} {r}" for r, n in self.reasons.most_common())


def read_metadata(folder: Path, skipped: SkipCounter) -> list[dict]:
    """Rows of ``folder/metadata.jsonl`` with the three columns (aliases renamed); bad lines are counted."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise InputError(f"{folder}: no metadata.jsonl")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped.add("unreadable metadata line")
            continue
        row = {ALIASES.get(k, k): v for k, v in row.items()}
        if not all(isinstance(row.get(c), str) for c in COLUMNS):
            skipped.add("missing column")
            continue
        rows.append({c: row[c] for c in COLUMNS})
    return rows


def paired_transform(first: Image.Image, second: Image.Image, resolution: int, rng: np.random.Generator,
                     flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Resize both so the short side is ``resolution``, then the same random square crop and the same
    horizontal flip. Returns float32 (3, resolution, resolution) arrays in [-1, 1]."""
    width, height = first.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    left = int(rng.integers(0, size[0] - resolution + 1))
    top = int(rng.integers(0, size[1] - resolution + 1))
    mirror = flip and bool(rng.random() < 0.5)
    out = []
    for image in (first, second):
        image = image.resize(size, Image.Resampling.BICUBIC).crop((left, top, left + resolution, top + resolution))
        if mirror:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append((np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1))
    return out[0], out[1]


class PairedFolder:
    """A metadata.jsonl folder as an indexable dataset; ``load(i, rng)`` returns None for a bad example."""

    def __init__(self, folder: str | Path, resolution: int):
        self.folder, self.resolution = Path(folder), resolution
        self.skipped = SkipCounter()
        self.rows = read_metadata(self.folder, self.skipped)
        if not self.rows:
            raise InputError(f"{self.folder}: metadata.jsonl has no usable rows ({self.skipped.summary()})")

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, rng: np.random.Generator) -> dict | None:
        row = self.rows[index]
        try:
            first = load_image(self.folder / row["input_image"])
            second = load_image(self.folder / row["edited_image"])
        except InputError as err:
            self.skipped.add("missing or corrupt image")
            log.debug("skipping example %d: %s", index, err)
            return None
        if first.size != second.size:
            self.skipped.add("input and edited sizes differ")
            return None
        source, edited = paired_transform(first, second, self.resolution, rng)
        return {"input": source, "edited": edited, "prompt": row["edit_prompt"]}
