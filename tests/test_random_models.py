import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from engine.random_models import ARCHITECTURES


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_sd15_architecture_matches_instruct_pix2pix():
    """Built on the meta device: shapes and parameter counts without allocating 3.4 GB."""
    arch = ARCHITECTURES["sd15"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
    assert count(unet) == pytest.approx(859.5e6, rel=1e-3)
    assert unet.conv_in.in_channels == 8 and unet.conv_out.out_channels == 4
    assert count(vae) == pytest.approx(83.65e6, rel=1e-3)
    assert count(text) == pytest.approx(123.06e6, rel=1e-3)
    assert vae.config.scaling_factor == 0.18215 and text.config.hidden_act == "quick_gelu"


def test_tiny_model_files(tiny_model):
    from pathlib import Path

    folder = Path(tiny_model)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 12_000_000
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["steps_offset"] == 1
