"""Training from nothing: the recipe's stages run in order, are checked, and are skipped once done."""
import json

import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError
from training.config import load_config
from training.train import train

SMALL = """
recipe:
  synthetic: {count: 48, seed: 1, size: 64, shape_weights: [0, 1, 1]}
  vae: {steps: 2, batch_size: 4, images: 60, holdout: 8, min_psnr: %s}
resolution: 64
batch_size: 4
max_steps: 2
ema_decay: 0.0
checkpoint_every: 0
save_dtype: float16
"""


def test_recipe_builds_data_base_and_vae_then_trains_a_loadable_model(tmp_path):
    from engine.pipeline import EditPipeline

    path = tmp_path / "small.yaml"
    path.write_text(SMALL % 0)
    out = train(load_config(path, {"output": str(tmp_path / "run")}))
    recipe = out / "recipe"
    rows = [json.loads(line) for line in (recipe / "data" / "metadata.jsonl").read_text().splitlines()]
    pictures = [np.asarray(Image.open(recipe / "data" / r["input_image"]).convert("RGB")) for r in rows]
    colours = [len(np.unique(picture.reshape(-1, 3), axis=0)) for picture in pictures]
    assert len(rows) == 48 and min(colours) >= 3  # shape_weights [0, 1, 1]: background + 2 or 3 flat shapes
    report = json.loads((recipe / "base" / "vae" / "vae_stage.json").read_text())
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert report["steps"] == 2 and vae_config["scaling_factor"] == pytest.approx(report["scaling_factor"])
    assert vae_config["scaling_factor"] != 1.0  # measured on the data, not the architecture's placeholder
    saved = json.loads((out / "training_config.json").read_text())["config"]
    assert saved["recipe"]["synthetic"]["shape_weights"] == [0, 1, 1] and saved["base"] == str(recipe / "base")
    from safetensors.torch import load_file

    for component in ("unet", "vae", "text_encoder"):
        weights = next((out / component).glob("*.safetensors"))
        assert {str(v.dtype) for v in load_file(weights).values() if v.is_floating_point()} == {"torch.float16"}
    image = recipe / "data" / "images" / "000000_in.png"
    edited = EditPipeline.from_pretrained(out, progress=False).edit(image, "make the circle blue", steps=2, seed=0)
    assert edited.images[0].size == (64, 64)


def test_a_vae_below_the_psnr_floor_stops_the_recipe_before_the_unet(tmp_path):
    path = tmp_path / "strict.yaml"
    path.write_text(SMALL % 99)
    with pytest.raises(InputError, match="reconstruction PSNR .* below min_psnr 99"):
        train(load_config(path, {"output": str(tmp_path / "run")}))
    assert not (tmp_path / "run" / "unet").exists()


def test_recipe_options_are_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("recipe: {vae: {stepz: 3}}\n")
    with pytest.raises(InputError, match="bad recipe option"):
        load_config(path, {"output": "o"})
    path.write_text("recipe: {synthetic: {shape_weights: [1, 2]}}\n")
    with pytest.raises(InputError, match="bad.yaml: bad recipe option .*shape_weights must be 3 weights"):
        load_config(path, {"output": "o"})
    path.write_text("recipe: {synthetic: {edit_weights: [1, -2, 1]}}\n")
    with pytest.raises(InputError, match="bad.yaml: bad recipe option .*edit_weights must be 3 weights"):
        load_config(path, {"output": "o"})
    path.write_text("recipe: {colours: 3}\n")
    with pytest.raises(InputError, match="unknown recipe option"):
        load_config(path, {"output": "o"})
    path.write_text("recipe: {}\n")
    with pytest.raises(InputError, match="--output is required"):
        load_config(path, {})
