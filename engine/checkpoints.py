"""Where a model's files are: a local diffusers folder, a hub id (cache first), or one original checkpoint file."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InputError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
# Folder that supplies configs and tokenizer for a single-file checkpoint unless told otherwise.
DEFAULT_SINGLE_FILE_CONFIG = "timbrooks/instruct-pix2pix"
HUB_FILES = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A diffusers-format folder (configs, tokenizer, usually weights), plus a single checkpoint file if the
    weights come from one."""

    folder: Path
    single_file: Path | None = None


def resolve_model(model: str | os.PathLike, config: str | os.PathLike | None = None) -> ModelSource:
    """Find a model's files. ``config`` names the diffusers folder or hub id used with a single file."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise InputError(f"{path}: a single-file checkpoint must end in .ckpt or .safetensors")
        return ModelSource(folder=resolve_model(config or DEFAULT_SINGLE_FILE_CONFIG).folder, single_file=path)
    if path.is_dir():
        return ModelSource(folder=path)
    if _HUB_ID.match(str(model)) and not str(model).startswith((".", "/")):
        return ModelSource(folder=fetch_from_hub(str(model)))
    raise InputError(f"{model}: no such model folder or checkpoint file, and not a hub id")


def fetch_from_hub(repo_id: str) -> Path:
    """The local snapshot of a hub model: from the cache, downloading (with progress) only when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise InputError(f"{repo_id}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # network, auth and missing-repo errors all end the same way for the user
        raise InputError(f"{repo_id}: not in the local cache and could not be downloaded ({type(err).__name__})") from None
