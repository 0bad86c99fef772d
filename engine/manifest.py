"""The bundle manifest: the one file a runtime reads to know what an exported bundle holds.

``Manifest`` and its parts below are the one definition of ``manifest.json``: the exporters build a
``Manifest`` and write its ``to_dict()`` last (and atomically); ``read_bundle`` reads it back with
``from_dict``, which refuses a missing or unknown key in one line naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from engine import specs
from engine.config import ModelConfig, Student, check_default_scales
from engine.errors import InputError
from engine.specs import Profile

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(InputError):
    """A manifest key missing, unknown or of the wrong kind; ``read_bundle`` adds the file's name."""


def _object(data: Any, cls: type, where: str) -> dict:
    """``data`` checked as the JSON object of dataclass ``cls``: every key it needs, none it does not know."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where} is not an object")
    known = [f.name for f in fields(cls)]
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ManifestError(f"unknown key {unknown[0]!r} in {where}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
    if missing:
        raise ManifestError(f"missing key {missing[0]!r} in {where}")
    return data


def _model_config(data: dict) -> ModelConfig:
    """ModelConfig from its JSON object (lists become the tuples the dataclass holds)."""
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
    if values.get("student") is not None:
        student = _object(values["student"], Student, "model.student")
        values["student"] = Student(**{key: tuple(value) if isinstance(value, list) else value
                                       for key, value in student.items()})
        if "scales" in student:
            try:
                check_default_scales(values["student"], "model.student")
            except InputError as err:
                raise ManifestError(str(err)) from None
    return ModelConfig(**values)


def _mapping(data: Any, where: str, optional: bool = False) -> dict | None:
    """``data`` checked as a JSON object of any keys (or, where ``optional``, null)."""
    if not (isinstance(data, dict) or (optional and data is None)):
        raise ManifestError(f"{where} is not an object")
    return data


def _list(data: Any, where: str) -> list:
    if not isinstance(data, list):
        raise ManifestError(f"{where} is not a list")
    return data


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One bundle file: its path relative to the bundle folder, sha256 and size."""

    path: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, data: dict, where: str = "a file entry") -> FileEntry:
        data = _object(data, cls, where)
        return cls(data["path"], data["sha256"], data["bytes"])


def file_entry(folder: Path, path: Path) -> FileEntry:
    """The manifest entry of bundle file ``path``, hashed now."""
    return FileEntry(path.relative_to(folder).as_posix(), sha256_file(path), path.stat().st_size)


def _files(data: Any, where: str) -> tuple[FileEntry, ...]:
    return tuple(FileEntry.from_dict(entry, f"{where}[{i}]") for i, entry in enumerate(_list(data, where)))


@dataclass(frozen=True)
class TensorEntry:
    """One input or output of a component: its spec's name, dtype and dims, and its (min, opt, max) shapes."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    shapes: tuple[tuple[int, ...], ...]  # (min, opt, max)

    @classmethod
    def of(cls, tensor: specs.TensorSpec, shapes: tuple[tuple[int, ...], ...]) -> TensorEntry:
        return cls(tensor.name, tensor.dtype, tuple(tensor.dims), shapes)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims),
                "shapes": [list(shape) for shape in self.shapes]}

    @classmethod
    def from_dict(cls, data: dict, where: str = "a tensor entry") -> TensorEntry:
        data = _object(data, cls, where)
        shapes = tuple(tuple(_list(s, f"{where}.shapes")) for s in _list(data["shapes"], f"{where}.shapes"))
        if len(shapes) != 3:
            raise ManifestError(f"{where}.shapes is not (min, opt, max)")
        return cls(data["name"], data["dtype"], tuple(_list(data["dims"], f"{where}.dims")), shapes)


def _tensors(data: Any, where: str) -> tuple[TensorEntry, ...]:
    return tuple(TensorEntry.from_dict(entry, f"{where}[{i}]") for i, entry in enumerate(_list(data, where)))


@dataclass(frozen=True)
class Macs:
    """Multiply-accumulates of one UNet row, counted at export at the profile's opt latent size."""

    per_row: float
    latent_size: tuple[int, int]

    def to_dict(self) -> dict:
        return {"per_row": self.per_row, "latent_size": list(self.latent_size)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "macs") -> Macs:
        data = _object(data, cls, where)
        return cls(data["per_row"], tuple(_list(data["latent_size"], f"{where}.latent_size")))


@dataclass(frozen=True)
class Component:
    """One network of the bundle: its files (the runtime's graph or engine first) and tensors."""

    precision: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    macs: Macs | None = None  # the UNets only: a row's cost weighs step caching's shallow calls
    engine_key: str | None = None  # TensorRT bundles: the engine cache's key

    def to_dict(self) -> dict:
        data = {"precision": self.precision, "files": [f.to_dict() for f in self.files],
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}
        if self.macs is not None:
            data["macs"] = self.macs.to_dict()
        if self.engine_key is not None:
            data["engine_key"] = self.engine_key
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "a component") -> Component:
        data = _object(data, cls, where)
        macs = Macs.from_dict(data["macs"], f"{where}.macs") if "macs" in data else None
        files = _files(data["files"], f"{where}.files")
        return cls(data["precision"], files, _tensors(data["inputs"], f"{where}.inputs"),
                   _tensors(data["outputs"], f"{where}.outputs"), macs, data.get("engine_key"))


@dataclass(frozen=True)
class Source:
    """The model a bundle was exported from, and a hash over its weight files."""

    model: str
    weights_sha256: str

    def to_dict(self) -> dict:
        return {"model": self.model, "weights_sha256": self.weights_sha256}

    @classmethod
    def from_dict(cls, data: dict, where: str = "source") -> Source:
        data = _object(data, cls, where)
        return cls(data["model"], data["weights_sha256"])


@dataclass(frozen=True)
class Tokenizer:
    """The tokenizer's folder in the bundle and its files."""

    folder: str
    files: tuple[FileEntry, ...]

    def to_dict(self) -> dict:
        return {"folder": self.folder, "files": [f.to_dict() for f in self.files]}

    @classmethod
    def from_dict(cls, data: dict, where: str = "tokenizer") -> Tokenizer:
        data = _object(data, cls, where)
        return cls(data["folder"], _files(data["files"], f"{where}.files"))


@dataclass(frozen=True)
class Verification:
    """One exported component against PyTorch at one set of shapes (``export.verify``)."""

    component: str
    shapes: str
    max_abs: float
    max_rel: float

    def to_dict(self) -> dict:
        return {"component": self.component, "shapes": self.shapes, "max_abs": self.max_abs, "max_rel": self.max_rel}

    @classmethod
    def from_dict(cls, data: dict, where: str = "verification") -> Verification:
        data = _object(data, cls, where)
        return cls(data["component"], data["shapes"], data["max_abs"], data["max_rel"])


@dataclass(frozen=True)
class CalibrationRecord:
    """The edits an int8 UNet was calibrated on (``ip2p quantize``)."""

    data: str
    edits: int
    steps: int | None
    unet_calls: int
    samples: int | None = None  # the calls NNCF took its statistics from (not recorded by every version)

    def to_dict(self) -> dict:
        data = {"data": self.data, "edits": self.edits, "steps": self.steps, "unet_calls": self.unet_calls}
        return data if self.samples is None else data | {"samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict, where: str = "quantization.calibration") -> CalibrationRecord:
        data = _object(data, cls, where)
        return cls(data["data"], data["edits"], data["steps"], data["unet_calls"], data.get("samples"))


@dataclass(frozen=True)
class Quantization:
    """How a bundle's UNet was quantized, on what, and its relative output error on held-back calls."""

    tool: str
    method: str
    calibration: CalibrationRecord
    unet_relative_error: float

    def to_dict(self) -> dict:
        return {"tool": self.tool, "method": self.method, "calibration": self.calibration.to_dict(),
                "unet_relative_error": self.unet_relative_error}

    @classmethod
    def from_dict(cls, data: dict, where: str = "quantization") -> Quantization:
        data = _object(data, cls, where)
        calibration = CalibrationRecord.from_dict(data["calibration"], f"{where}.calibration")
        return cls(data["tool"], data["method"], calibration, data["unet_relative_error"])


def _components(data: Any) -> dict[str, Component]:
    """The components object: every network the engine needs, and only networks it knows."""
    if not isinstance(data, dict):
        raise ManifestError("components is not an object")
    for name in data:
        try:
            specs.component_spec(name)
        except KeyError:
            raise ManifestError(f"unknown component {name!r} in components") from None
    missing = [name for name in specs.COMPONENTS if name not in data and name not in specs.UNETS]
    if missing:
        raise ManifestError(f"missing key {missing[0]!r} in components")
    unets = [name for name in specs.UNETS if name in data]
    if not unets:
        raise ManifestError(f"missing key {specs.UNET.name!r} in components")
    if len(unets) > 1:
        raise ManifestError(f"components hold both {' and '.join(unets)}: one UNet a bundle")
    return {name: Component.from_dict(entry, f"components.{name}") for name, entry in data.items()}


@dataclass(frozen=True)
class Manifest:
    """Everything ``manifest.json`` says: what was exported from what, in which shapes, into which files."""

    format_version: int
    format: str  # "onnx", "tensorrt", or "openvino" (an ONNX bundle with an int8 OpenVINO IR UNet)
    precision: str
    source: Source
    model: ModelConfig
    profile: Profile
    guidance: str  # "loop": the UNet returns all its rows; eq. 3 is applied by the shared loop
    components: dict[str, Component]
    null_embedding: FileEntry
    tokenizer: Tokenizer
    tools: dict[str, str]  # versions of the tools that made the bundle
    gpu: dict[str, str] | None  # TensorRT bundles: {"name", "compute_capability"} the engines are for
    verification: tuple[Verification, ...]
    quantization: Quantization | None = None

    def files(self) -> list[FileEntry]:
        """Every file the bundle holds."""
        return [f for c in self.components.values() for f in c.files] + [*self.tokenizer.files, self.null_embedding]

    def to_dict(self) -> dict:
        data = {
            "format_version": self.format_version, "format": self.format, "precision": self.precision,
            "source": self.source.to_dict(), "model": {key: list(value) if isinstance(value, tuple) else value
                                                         for key, value in dataclasses.asdict(self.model).items()
                                                         if not (key == "student" and value is None)},
            "profile": self.profile.to_dict(), "guidance": self.guidance,
            "components": {name: c.to_dict() for name, c in self.components.items()},
            "null_embedding": self.null_embedding.to_dict(), "tokenizer": self.tokenizer.to_dict(),
            "tools": dict(self.tools), "gpu": None if self.gpu is None else dict(self.gpu),
            "verification": [v.to_dict() for v in self.verification],
        }
        if self.quantization is not None:
            data["quantization"] = self.quantization.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """The manifest of JSON object ``data``; ManifestError (one line) for a missing, unknown or malformed key."""
        try:
            return cls._parse(_object(data, cls, "the manifest"))
        except ManifestError:
            raise
        except (TypeError, ValueError, AttributeError) as err:
            raise ManifestError(f"a value of the wrong kind ({err})") from None

    @classmethod
    def _parse(cls, data: dict) -> Manifest:
        quantization = data.get("quantization")
        verification = _list(data["verification"], "verification")
        return cls(
            format_version=data["format_version"], format=data["format"], precision=data["precision"],
            source=Source.from_dict(data["source"]),
            model=_model_config(_object(data["model"], ModelConfig, "model")),
            profile=Profile.from_dict(_object(data["profile"], Profile, "profile")), guidance=data["guidance"],
            components=_components(data["components"]),
            null_embedding=FileEntry.from_dict(data["null_embedding"], "null_embedding"),
            tokenizer=Tokenizer.from_dict(data["tokenizer"]), tools=dict(_mapping(data["tools"], "tools")),
            gpu=_mapping(data["gpu"], "gpu", optional=True),
            verification=tuple(Verification.from_dict(v, f"verification[{i}]") for i, v in enumerate(verification)),
            quantization=None if quantization is None else Quantization.from_dict(quantization),
        )


def is_bundle(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class Bundle:
    """A read, checked bundle: where its files are and what they hold."""

    folder: Path
    manifest: Manifest

    @property
    def format(self) -> str:
        return self.manifest.format

    @property
    def model(self) -> ModelConfig:
        return self.manifest.model

    @property
    def profile(self) -> Profile:
        return self.manifest.profile

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / self.manifest.tokenizer.folder

    @property
    def null_embedding_file(self) -> Path:
        return self.folder / self.manifest.null_embedding.path

    def unet_macs(self, name: str) -> float:
        """Multiply-accumulates of one row of UNet component ``name``, counted at export for the profile's
        opt size (the shallow share changes little with size)."""
        macs = self.manifest.components[name].macs
        if macs is None:
            raise InputError(f"{self.folder}: the manifest records no work for {name}; export the bundle again")
        return float(macs.per_row)

    def component_file(self, name: str) -> Path:
        """The main file (graph or engine) of component ``name``."""
        return self.folder / self.manifest.components[name].files[0].path


def read_manifest(folder: Path) -> Manifest:
    """``folder/manifest.json``, checked: InputError (one line, naming the file) for anything it cannot read."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{folder}: no {MANIFEST_NAME}; not an exported bundle (or its export did not finish)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON ({err})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: bundle format version {version!r}, this engine reads {FORMAT_VERSION}")
    try:
        manifest = Manifest.from_dict(data)
    except ManifestError as err:
        raise InputError(f"{path}: {err}; export the bundle again with `ip2p export`") from None
    if manifest.model.unet_component not in manifest.components:
        raise InputError(f"{path}: the model is {'a' if manifest.model.student else 'no'} distilled student, but the "
                         f"bundle holds no {manifest.model.unet_component}; export it again with `ip2p export`")
    rows = [t.shapes[0][0] for t in manifest.components[manifest.model.unet_component].inputs if t.name == "sample"]
    if manifest.profile.static and rows == [3 * manifest.profile.batch[0]]:
        raise InputError(f"{path}: a static bundle of an older export, its UNet taking only 3B rows; "
                         "export it again with `ip2p export`")
    return manifest


def read_bundle(folder: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read ``folder/manifest.json``; with ``verify``, check every listed file's size and sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for entry in manifest.files():
        file = folder / entry.path
        if not file.is_file():
            raise InputError(f"{file}: listed in the manifest but missing")
        if verify and (file.stat().st_size != entry.bytes or sha256_file(file) != entry.sha256):
            raise InputError(f"{file}: corrupted (sha256 does not match the manifest); export the bundle again")
    return Bundle(folder=folder, manifest=manifest)
