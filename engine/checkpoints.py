"""Where a model's files are: a local diffusers folder, a hub id (cache first), or one original checkpoint file;
and which weight files of a component to load (``.safetensors`` or ``.bin``, plain or a variant such as fp16)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from engine.errors import InputError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
# Folder that supplies configs and tokenizer for a single-file checkpoint unless told otherwise.
DEFAULT_SINGLE_FILE_CONFIG = "timbrooks/instruct-pix2pix"
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")  # safety_checker, feature_extractor: never loaded
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # preferred first
HUB_CONFIG_FILES = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # diffusion_pytorch_model-00001-of-00002.safetensors


@dataclass(frozen=True)
class ModelSource:
    """A diffusers-format folder (configs, tokenizer, usually weights), plus a single checkpoint file if the
    weights come from one."""

    folder: Path
    single_file: Path | None = None
    variant: str | None = None  # weight variant asked for ("fp16": *.fp16.safetensors); None: the plain files

    def weights(self, component: str) -> "Weights":
        """The weight files of ``component`` (a diffusers folder's), for this source's variant."""
        return component_weights(self.folder / component, self.variant)


def resolve_model(model: str | os.PathLike, config: str | os.PathLike | None = None,
                  variant: str | None = None) -> ModelSource:
    """Find a model's files. ``config`` names the diffusers folder or hub id used with a single file;
    ``variant`` picks variant weight files (``fp16`` for ``*.fp16.safetensors``)."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise InputError(f"{path}: a single-file checkpoint must end in .ckpt or .safetensors")
        return ModelSource(folder=resolve_model(config or DEFAULT_SINGLE_FILE_CONFIG).folder, single_file=path)
    if path.is_dir():
        return ModelSource(folder=path, variant=variant)
    if _HUB_ID.match(str(model)) and not str(model).startswith((".", "/")):
        return ModelSource(folder=fetch_from_hub(str(model), variant), variant=variant)
    raise InputError(f"{model}: no such model folder or checkpoint file, and not a hub id")


@dataclass(frozen=True)
class Weights:
    """One component's weight files: all of one format and variant (several when sharded)."""

    files: tuple[Path, ...]
    variant: str | None

    @property
    def safetensors(self) -> bool:
        return self.files[0].suffix == ".safetensors"


def weight_variant(name: str) -> str | None:
    """"diffusion_pytorch_model.fp16.safetensors" -> "fp16"; a plain or sharded plain name -> None."""
    stem = _SHARD.sub("", name.rsplit(".", 1)[0])
    return stem.rsplit(".", 1)[1] if "." in stem else None


def select_weights(names: Iterable[str], variant: str | None) -> tuple[list[str], str | None]:
    """(the file names to load, their variant) among one component's file names, as diffusers picks them:
    the asked-for variant (with none asked, the plain files, else the only variant there is), safetensors
    before .bin. Raises ValueError saying what is there."""
    found: dict[str | None, dict[str, list[str]]] = {}
    for name in sorted(names):
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        if suffix in WEIGHT_SUFFIXES:
            found.setdefault(weight_variant(name), {}).setdefault(suffix, []).append(name)
    if not found:
        raise ValueError("no weights file (*.safetensors or *.bin)")
    variants = ", ".join(sorted(v or "plain" for v in found))
    if variant is None and None not in found:
        if len(found) > 1:
            raise ValueError(f"only variant weights ({variants}): pass a variant (--variant)")
        variant = next(iter(found))
    if variant not in found:
        raise ValueError(f"no {variant} weights (this folder has: {variants})")
    by_suffix = found[variant]
    return next(by_suffix[s] for s in WEIGHT_SUFFIXES if s in by_suffix), variant


def component_weights(folder: Path, variant: str | None = None) -> Weights:
    """The weight files to load from one component folder (``unet/``, ``vae/``, ``text_encoder/``)."""
    try:
        names, chosen = select_weights((p.name for p in folder.iterdir() if p.is_file()), variant)
    except ValueError as err:
        raise InputError(f"{folder}: {err}") from None
    if chosen != variant:
        log.info("%s: no plain weights, loading the %s variant", folder, chosen)
    return Weights(tuple(folder / n for n in names), chosen)


def hub_weight_files(repo_files: Iterable[str], variant: str | None) -> list[str]:
    """The weight files of a hub repository (its file list) that one edit needs, per component."""
    by_component: dict[str, list[str]] = {}
    for path in repo_files:
        component, _, name = path.partition("/")
        if component in WEIGHTED_COMPONENTS and name and "/" not in name:
            by_component.setdefault(component, []).append(name)
    selected = []
    for component, names in by_component.items():
        try:
            chosen, _ = select_weights(names, variant)
        except ValueError:
            continue  # reported by name when the snapshot is loaded
        selected += [f"{component}/{n}" for n in chosen]
        selected += [f"{component}/{n}" for n in names if ".index." in n and n.endswith(".json")]  # shard maps
    return selected


def fetch_from_hub(repo_id: str, variant: str | None = None) -> Path:
    """The local snapshot of a hub model: from the cache, downloading (with progress) only when online.
    Only configs, the tokenizer and the chosen weight files of the UNet, VAE and text encoder are fetched."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise InputError(f"{repo_id}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        weights = hub_weight_files(HfApi().list_repo_files(repo_id), variant)
        return Path(snapshot_download(repo_id, allow_patterns=HUB_CONFIG_FILES + weights))
    except Exception as err:  # network, auth and missing-repo errors all end the same way for the user
        raise InputError(f"{repo_id}: not in the local cache and could not be downloaded ({type(err).__name__})") from None
