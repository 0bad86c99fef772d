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
