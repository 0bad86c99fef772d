"""A bundle folder is written whole or not at all: into a staging folder beside the output, renamed into place
when finished."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engine.errors import InputError


def prepare_output(out: Path, force: bool) -> None:
    """Refuse an output that exists (unless ``force``) or whose parent folder is missing or not writable."""
    if out.exists() and not force:
        raise InputError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    parent = out.parent if out.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: output's parent folder does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: not writable")


def staging_folder(out: Path) -> Path:
    """A new empty folder beside ``out`` to write the bundle into (removed by the caller if the write fails)."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent if str(out.parent) else "."))


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to ``out``, replacing an old bundle only once the new one is whole."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.chmod(0o755)
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
