"""Paired edit data: (input image, instruction, edited image), with the same crop and flip on both.

Three sources, all with the columns ``input_image``, ``edit_prompt``, ``edited_image`` (``original_image``
is accepted for ``input_image``, as in diffusers' trainer); evaluation sets (``CAPTIONED``) have
``input_image``, ``edit_prompt``, ``input_caption`` and ``output_caption`` instead (the released dataset's
``original_prompt`` and ``edited_prompt`` accepted for the captions):

- a folder with ``metadata.jsonl`` (image paths relative to the folder);
- a Hugging Face dataset saved with ``save_to_disk``, or a folder / file of ``.parquet`` files (for
  example a local copy of timbrooks/instructpix2pix-clip-filtered);
- WebDataset tar shards (``.tar`` files, or a folder of them): each sample is the files sharing a key,
  ``<key>.input.<ext>``, ``<key>.edited.<ext>`` and ``<key>.txt`` (the instruction), and for captions
  ``<key>.json`` with ``input_caption`` and ``output_caption``.

Bad examples (missing columns, missing, corrupt or mismatched-size images) are skipped and counted,
never fatal.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.errors import InputError
from engine.images import load_image

log = logging.getLogger(__name__)

COLUMNS = ("input_image", "edit_prompt", "edited_image")  # training pairs
CAPTIONED = ("input_image", "edit_prompt", "input_caption", "output_caption")  # evaluation sets
IMAGE_COLUMNS = ("input_image", "edited_image")
ALIASES = {"original_image": "input_image", "original_prompt": "input_caption", "edited_prompt": "output_caption"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def _normalise(row: dict, columns: tuple[str, ...] = COLUMNS) -> dict | None:
    row = {ALIASES.get(k, k): v for k, v in row.items()}
    if any(row.get(c) is None for c in columns):
        return None
    if any(not isinstance(row[c], str) for c in columns if c not in IMAGE_COLUMNS):
        return None
    return {c: row[c] for c in columns}


class FolderRows:
    """Rows of ``folder/metadata.jsonl``; image references are paths."""

    def __init__(self, folder: Path, skipped: SkipCounter, columns: tuple[str, ...] = COLUMNS):
        self.folder = folder
        self.rows = []
        for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = _normalise(json.loads(line), columns)
            except (json.JSONDecodeError, AttributeError):
                skipped.add("unreadable metadata line")
                continue
            if row is None or not all(isinstance(row[c], str) for c in columns):
                skipped.add("missing column")
                continue
            self.rows.append({**row, **{c: folder / row[c] for c in IMAGE_COLUMNS if c in columns}})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        return self.rows[index]


class HuggingFaceRows:
    """A ``datasets`` dataset (saved to disk, or parquet files); rows are read lazily."""

    def __init__(self, path: Path, columns: tuple[str, ...] = COLUMNS):
        self.columns = columns
        try:
            import datasets
        except ImportError:
            raise InputError(f"{path}: reading Hugging Face datasets needs the train extra: pip install '.[train]'") from None
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            self.dataset = datasets.load_from_disk(str(path))
        else:
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
            self.dataset = datasets.load_dataset("parquet", data_files=files, split="train")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        return _normalise(self.dataset[index], self.columns)


class TarRows:
    """WebDataset shards: samples grouped by key, members read on demand."""

    def __init__(self, shards: list[Path], skipped: SkipCounter, columns: tuple[str, ...] = COLUMNS):
        self.members = ("input", "txt") + (("edited",) if "edited_image" in columns else ()) + (
            ("json",) if "input_caption" in columns else ())
        self.samples: list[dict[str, tuple[Path, str]]] = []
        for shard in shards:
            groups: dict[str, dict[str, tuple[Path, str]]] = defaultdict(dict)
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.isfile() and "." in Path(member.name).name:
                        key, _, field_name = member.name.partition(".")
                        groups[key][field_name] = (shard, member.name)
            for key, fields in groups.items():
                names = {k.split(".")[0]: v for k, v in fields.items()}
                if set(self.members) <= set(names):
                    self.samples.append(names)
                else:
                    skipped.add("incomplete tar sample")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        with tarfile.open(sample["input"][0]) as tar:  # a sample's files live in one shard
            read = {name: tar.extractfile(sample[name][1]).read() for name in self.members}
        row = {"input_image": read["input"], "edit_prompt": read["txt"].decode("utf-8").strip()}
        if "edited" in read:
            row["edited_image"] = read["edited"]
        if "json" in read:
            try:
                captions = json.loads(read["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            if not isinstance(captions, dict):
                return None
            row.update(captions)
        return _normalise(row, CAPTIONED) if "json" in read else row


def open_rows(source: Path, skipped: SkipCounter, columns: tuple[str, ...] = COLUMNS):
    """The row reader for ``source``: a metadata.jsonl folder, a HF dataset / parquet, or tar shards; rows have
    ``columns`` (None where an example lacks one)."""
    if source.is_dir() and (source / "metadata.jsonl").is_file():
        return FolderRows(source, skipped, columns)
    if source.is_dir() and not any(source.iterdir()):
        raise InputError(f"{source}: empty data folder")
    shards = [source] if source.suffix == ".tar" else sorted(source.glob("*.tar")) if source.is_dir() else []
    if shards:
        return TarRows(shards, skipped, columns)
    is_parquet = source.suffix == ".parquet" or (source.is_dir() and any(source.rglob("*.parquet")))
    if is_parquet or (source / "dataset_info.json").is_file():
        return HuggingFaceRows(source, columns)
    raise InputError(f"{source}: no metadata.jsonl, .tar shards, parquet files or saved Hugging Face dataset")


def read_image(reference: Any) -> Image.Image:
    """A path, raw bytes, a datasets image dict or a PIL image -> RGB; InputError if unreadable."""
    if isinstance(reference, dict):
        reference = reference.get("bytes") or reference.get("path")
    if isinstance(reference, (bytes, bytearray)):
        try:
            reference = Image.open(io.BytesIO(reference))
            reference.load()
        except Exception as err:  # Pillow raises several types for bad bytes
            raise InputError(f"unreadable image bytes ({err})") from None
    return load_image(reference)


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


class PairedData:
    """Any supported source as an indexable dataset; ``load(i, rng)`` returns None for a bad example."""

    def __init__(self, source: str | Path, resolution: int):
        self.source, self.resolution = Path(source), resolution
        if not self.source.exists():
            raise InputError(f"{self.source}: no such data folder or file")
        self.skipped = SkipCounter()
        self.rows = open_rows(self.source, self.skipped)
        if len(self.rows) == 0:
            raise InputError(f"{self.source}: no usable examples ({self.skipped.summary()})")

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, index: int) -> tuple[Image.Image, str, Image.Image] | None:
        """(input, instruction, edited) of example ``index``, or None (counted) if it is unusable."""
        row = self.rows[index]
        if row is None:
            self.skipped.add("missing column")
            return None
        try:
            first, second = read_image(row["input_image"]), read_image(row["edited_image"])
        except InputError as err:
            self.skipped.add("missing or corrupt image")
            log.debug("skipping example %d: %s", index, err)
            return None
        if first.size != second.size:
            self.skipped.add("input and edited sizes differ")
            return None
        return first, row["edit_prompt"], second

    def load(self, index: int, rng: np.random.Generator) -> dict | None:
        found = self.images(index)
        if found is None:
            return None
        first, prompt, second = found
        source, edited = paired_transform(first, second, self.resolution, rng)
        return {"input": source, "edited": edited, "prompt": prompt}
