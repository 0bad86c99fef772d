"""Finding a model folder for data generation and metrics: a local folder, or a hub id's snapshot from the
offline cache (downloaded only when online and HF_HUB_OFFLINE is not set)."""
from __future__ import annotations

import os
from pathlib import Path

from engine.errors import InputError


def model_folder(name: str | os.PathLike, what: str, patterns: list[str]) -> Path:
    """The folder of model ``name`` (``what`` names the kind in errors; ``patterns`` the files to download)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as err:  # an id huggingface_hub refuses (e.g. a malformed name)
        raise InputError(f"{name}: no such {what} folder or hub id ({type(err).__name__})") from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise InputError(f"{name}: no such {what} folder, and not in the local Hugging Face cache")
    try:
        return Path(snapshot_download(str(name), allow_patterns=patterns))
    except Exception as err:  # network, auth and missing-repo errors end the same way for the user
        raise InputError(f"{name}: no such {what} folder, and it could not be downloaded ({type(err).__name__})") from None
