"""The training loop on the tiny model and a small paired folder it writes itself."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training.config import TrainConfig, load_config
from training.train import PairEncoder, train


def config(tiny_model, pairs, out, **changes):
    base = dict(base=tiny_model, data=pairs, output=str(out), resolution=32, batch_size=4, lr=1e-3, ema_decay=0.0,
                max_steps=4, checkpoint_every=0, seed=3)
    return TrainConfig(**{**base, **changes})


def unet_weights(folder):
    return load_file(f"{folder}/unet/diffusion_pytorch_model.safetensors")


def test_resume_equals_an_uninterrupted_run(tiny_model, pairs, tmp_path):
    straight = train(config(tiny_model, pairs, tmp_path / "a", checkpoint_every=2, ema_decay=0.99))
    checkpoint = tmp_path / "a" / "checkpoints" / "step-2"
    assert checkpoint.is_dir()
    resumed = train(config(tiny_model, pairs, tmp_path / "b", ema_decay=0.99), resume=str(checkpoint))
    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_latent_cache_hits_repeated_pairs_within_its_limit_and_changes_nothing(tiny_model, pairs, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(f"{tiny_model}/vae")
    rng = np.random.default_rng(0)
    examples = [{"input": rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32),
                 "edited": rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32)} for _ in range(3)]
    plain, cached = PairEncoder(vae, "cpu"), PairEncoder(vae, "cpu", cache_mb=1)
    for batch in (examples[:2], examples[1:], examples[::-1]):
        for a, b in zip(plain(batch), cached(batch)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (cached.hits, cached.misses, len(cached.entries)) == (4, 3, 3)
    small = PairEncoder(vae, "cpu", cache_mb=1)
    small.limit = cached.used // 3  # room for one pair's encodings
    small(examples), small(examples)
    assert len(small.entries) == 1 and (small.hits, small.misses) == (1, 5)

    # 16 pairs x 2 flips at the training resolution: 12 batches of 4 must repeat some; the same losses either
    # way (weights are not compared: Adam turns float noise in near-zero gradients into lr-sized steps)
    def losses(folder):
        return [float(row.split(",")[1]) for row in (folder / "log.csv").read_text().splitlines()[1:]]

    plain_run = train(config(tiny_model, pairs, tmp_path / "plain", max_steps=12, log_every=1))
    cached_run = train(config(tiny_model, pairs, tmp_path / "cached", max_steps=12, log_every=1, latent_cache_mb=8))
    assert len(losses(plain_run)) == 12
    np.testing.assert_allclose(losses(cached_run), losses(plain_run), rtol=1e-4)


def test_training_lowers_the_loss_and_the_output_loads(tiny_model, pairs, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from engine import EditPipeline

    out = train(config(tiny_model, pairs, tmp_path / "m", max_steps=30, log_every=10, validate_every=30,
                       validation_steps=2))
    report = json.loads((out / "training_config.json").read_text())
    assert report["config"]["max_steps"] == 30
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,images_per_second" and [r.split(",")[0] for r in rows[1:]] == ["10", "20", "30"]
    assert Image.open(out / "validation" / "step-30.png").size == (3 * 64, 64)
    start = train(config(tiny_model, pairs, tmp_path / "init", max_steps=0))
    assert _eval_loss(out, pairs) < _eval_loss(start, pairs)
    pipe = EditPipeline.from_pretrained(out, progress=False)
    assert pipe.edit(f"{pairs}/in0.png", "make the square blue", steps=2, seed=0).images[0].size == (64, 64)
    ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert ref.unet.config.in_channels == 8


def _eval_loss(model, pairs):
    """Mean denoising loss over fixed draws, the same for every model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from engine.schedules import alphas_cumprod
    from engine.tokenizer import ClipTokenizer
    from training.data import PairedData
    from training.train import _loss

    unet = UNet2DConditionModel.from_pretrained(f"{model}/unet")
    vae = AutoencoderKL.from_pretrained(f"{model}/vae")
    text = CLIPTextModel.from_pretrained(f"{model}/text_encoder")
    tok = ClipTokenizer(f"{model}/tokenizer")
    acp = torch.from_numpy(alphas_cumprod(json.loads(open(f"{model}/scheduler/scheduler_config.json").read())))
    data = PairedData(pairs, 32)
    null = text(torch.from_numpy(tok([""])))[0]
    losses = []
    with torch.no_grad():
        for seed in range(8):
            batch = [data.load(i, np.random.default_rng(seed)) for i in range(8)]
            losses.append(_loss(batch, unet, PairEncoder(vae, "cpu"), text, tok, null, acp, 0.18215, "epsilon", 0.0,
                                torch.Generator().manual_seed(seed), "cpu").item())
    return float(np.mean(losses))


def test_stable_diffusion_base_is_grown_and_saved_untrained(tiny_model, pairs, tmp_path):
    from diffusers import UNet2DConditionModel

    from engine.random_models import ARCHITECTURES
    from tests.conftest import model_copy

    base = model_copy(tiny_model, tmp_path / "sd")
    torch.manual_seed(0)
    four = UNet2DConditionModel(**{**ARCHITECTURES["tiny"]["unet"], "in_channels": 4})
    four.save_pretrained(base / "unet")
    out = train(config(str(base), pairs, tmp_path / "init", max_steps=0))
    weights = unet_weights(out)
    assert weights["conv_in.weight"].shape[1] == 8
    torch.testing.assert_close(weights["conv_in.weight"][:, :4], four.conv_in.weight.detach())
    torch.testing.assert_close(weights["conv_in.bias"], four.conv_in.bias.detach())


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: m\ndata: d\noutput: o\nlr: 0.0003\nmax_steps: 7\n")
    cfg = load_config(path, {"max_steps": 9, "batch_size": None})
    assert (cfg.lr, cfg.max_steps, cfg.batch_size) == (0.0003, 9, 4)
    path.write_text("base: m\nlearning_rate: 1\n")
    with pytest.raises(Exception, match="unknown option"):
        load_config(path, {})


def test_shipped_config_files_load():
    from pathlib import Path

    from training.distill import load_distill_config

    for path in Path(__file__).resolve().parents[1].joinpath("training", "configs").glob("*.yaml"):
        if path.stem.endswith("-distilled"):  # ip2p distill's
            assert load_distill_config(path, {}).consistency_steps > 0
        else:
            assert load_config(path, {"base": "m", "data": "d", "output": "o"}).max_steps > 0


def test_data_cursor_visits_every_example_once_per_epoch():
    from training.train import DataCursor

    cursor = DataCursor(7, seed=1)
    first, second = [cursor.next_index() for _ in range(7)], [cursor.next_index() for _ in range(7)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    resumed = DataCursor(7, seed=1, position=9)
    assert [resumed.next_index() for _ in range(5)] == second[2:]


def test_train_from_a_stable_diffusion_base_saved_by_diffusers(saved_models, pairs, tmp_path, image_file):
    """``ip2p train --base`` on StableDiffusionPipeline.save_pretrained output (4-channel UNet, tokenizer.json
    only); the trained model edits and ``ip2p info`` reads it."""
    from engine import EditPipeline
    from ip2p.cli import main

    out = tmp_path / "trained"
    assert main(["-q", "train", "--base", saved_models["sd"], "--data", pairs, "--output", str(out),
                 "--max-steps", "1", "--resolution", "32", "--batch-size", "2", "--checkpoint-every", "0"]) == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 8
    pipe = EditPipeline.from_pretrained(out, progress=False)
    edited = pipe.edit(image_file, "make the square blue", steps=2, seed=0, output_type="np").images
    assert edited.shape[-1] == 3 and np.isfinite(edited).all()
    assert main(["info", str(out)]) == 0
