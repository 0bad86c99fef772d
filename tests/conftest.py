"""Shared fixtures: a tiny random InstructPix2Pix model written once per session, and small images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.random_models import create_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(create_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from engine import EditPipeline

    return EditPipeline.from_pretrained(tiny_model, progress=False)


@pytest.fixture
def rgb_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))


@pytest.fixture
def image_file(tmp_path, rgb_image) -> str:
    path = tmp_path / "input.png"
    rgb_image.save(path)
    return str(path)


@pytest.fixture(scope="session")
def onnx_bundles(tiny_model, tmp_path_factory) -> dict[str, str]:
    """fp32 and fp16 ONNX bundles of the tiny model (profile: 1-2 images, sides 32-128 px), verified."""
    from engine.specs import Profile
    from export.bundle import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("bundles")
    profile = Profile(batch=(1, 1, 2), height=(32, 64, 128), width=(32, 64, 128))
    return {
        precision: str(export_bundle(tiny_model, root / precision,
                                     ExportOptions(precision=precision, profile=profile, verify=True))[0])
        for precision in ("fp32", "fp16")
    }


def model_copy(model: str, dest, unet_config: dict | None = None):
    """A copy of ``model`` at ``dest`` with ``unet_config`` entries changed in unet/config.json."""
    import json
    import shutil
    from pathlib import Path

    copy = Path(shutil.copytree(model, dest))
    if unet_config:
        path = copy / "unet" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **unet_config}))
    return copy
