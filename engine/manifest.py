"""The bundle manifest: the one file a runtime reads to know what an exported bundle holds.

Written last (and atomically) by ``export``; read by the ONNX Runtime and TensorRT backends.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelConfig
from engine.errors import InputError
from engine.specs import Profile

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(folder: Path, path: Path) -> dict:
    """{"path": relative path, "sha256": ..., "bytes": ...} of one bundle file."""
    return {"path": path.relative_to(folder).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_bundle(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class Bundle:
    """A read, checked bundle: where its files are and what they hold."""

    folder: Path
    manifest: dict

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(**self.manifest["model"])

    @property
    def profile(self) -> Profile:
        return Profile.from_dict(self.manifest["profile"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / self.manifest["tokenizer"]["folder"]

    @property
    def null_embedding_file(self) -> Path:
        return self.folder / self.manifest["null_embedding"]["path"]

    @property
    def all_branches(self) -> bool:
        """Whether the UNet takes exactly 3B rows, every guidance branch at every step: static ONNX bundles of
        older exports. Bundles exported now take B to 3B rows (static ones: one CUDA graph or TensorRT profile
        per row count)."""
        rows = self.manifest["components"]["unet"]["inputs"][0]["shapes"][0][0]  # min N of the sample input
        return rows == 3 * self.profile.batch[0]

    def unet_macs(self, name: str) -> float:
        """Multiply-accumulates of one row of UNet component ``name``, counted at export for the profile's
        opt size (the shallow share changes little with size)."""
        entry = self.manifest["components"][name].get("macs")
        if entry is None:
            raise InputError(f"{self.folder}: the manifest records no work for {name}; export the bundle again")
        return float(entry["per_row"])

    def component_file(self, name: str) -> Path:
        """The main file (graph or engine) of component ``name``."""
        return self.folder / self.manifest["components"][name]["files"][0]["path"]


def all_files(manifest: dict) -> list[dict]:
    entries = [f for c in manifest["components"].values() for f in c["files"]]
    entries += manifest["tokenizer"]["files"] + [manifest["null_embedding"]]
    return entries


def read_bundle(folder: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read ``folder/manifest.json``; with ``verify``, check every listed file's size and sha256."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{folder}: no {MANIFEST_NAME}; not an exported bundle (or its export did not finish)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: bundle format version {manifest.get('format_version')!r}, this engine reads {FORMAT_VERSION}")
    for entry in all_files(manifest):
        file = folder / entry["path"]
        if not file.is_file():
            raise InputError(f"{file}: listed in the manifest but missing")
        if verify and (file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]):
            raise InputError(f"{file}: corrupted (sha256 does not match the manifest); export the bundle again")
    return Bundle(folder=folder, manifest=manifest)
