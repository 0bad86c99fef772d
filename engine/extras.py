"""Which optional extra of the package brings a missing library, so a command can say what to install.

The base install is the minimal runtime (numpy, pillow, tokenizers, onnxruntime, tqdm); everything heavy
comes with an extra (pyproject.toml's optional-dependencies).
"""
from __future__ import annotations

import importlib
from types import ModuleType

PACKAGE = "ip2p-engine"
EXTRA_OF = {  # top-level module -> the extra that installs it
    "torch": "torch", "diffusers": "torch", "transformers": "torch", "safetensors": "torch",
    "huggingface_hub": "torch", "onnx": "torch", "onnxscript": "torch",
    "accelerate": "train", "datasets": "train", "webdataset": "train", "yaml": "train", "bitsandbytes": "train",
    "tensorrt": "tensorrt", "polygraphy": "tensorrt", "cuda": "tensorrt",
    "ray": "ray", "openvino": "openvino", "nncf": "int8",
    "pytest": "dev", "pytest_benchmark": "dev", "matplotlib": "dev",
}


def missing_extra(err: ModuleNotFoundError, what: str, extra: str | None = None) -> str | None:
    """One line saying which extra ``what`` needs (``extra``, else the one that brings the missing library),
    when ``err`` is a library one of our extras brings; None for any other missing module (a bug, not an
    install choice)."""
    name = (err.name or "").split(".")[0]
    if name not in EXTRA_OF:
        return None
    return f"{what} needs {name}, which is not installed: pip install '{PACKAGE}[{extra or EXTRA_OF[name]}]'"


def import_extra(module: str, what: str, extra: str | None = None) -> ModuleType:
    """Import ``module``; a missing optional library becomes an InputError naming the extra to install
    (``extra`` where ``what`` needs more than the library's own)."""
    from engine.errors import InputError

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        hint = missing_extra(err, what, extra)
        if hint is None:
            raise
        raise InputError(hint) from None


def available(*modules: str) -> bool:
    """Whether every one of ``modules`` can be imported (found, not imported)."""
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in modules)
