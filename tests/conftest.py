"""Shared fixtures: a tiny random InstructPix2Pix model written once per session, and small images."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cpu import physical_cores
from engine.random_models import create_model

if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("OMP_NUM_THREADS"):
    # each pytest-xdist worker gets its share of the cores (torch, onnxruntime and OpenVINO follow it, and so do
    # the servers the tests start): two workers on two cores each spinning two threads took 1016 s, not 760
    os.environ["OMP_NUM_THREADS"] = str(max(1, physical_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def cli_error(capsys) -> str:
    """What the CLI wrote to stderr, checked to be one ``ip2p: error: ...`` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("ip2p: error: ") and len(err.splitlines()) == 1, err
    return err


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


class SharedBundles(Mapping):
    """The tiny model's ONNX bundles by precision, each exported (verified) when first asked for, once for the
    whole run: every pytest-xdist worker sees the same folder, and each precision has its own lock, so a worker
    that needs only fp32 does not wait while another exports fp16."""

    PRECISIONS = ("fp32", "fp16")

    def __init__(self, model: str, root: Path):
        self.model, self.root = model, root

    def __getitem__(self, precision: str) -> str:
        from filelock import FileLock

        if precision not in self.PRECISIONS:
            raise KeyError(precision)
        from engine.specs import Profile
        from export.bundle import ExportOptions, export_bundle

        folder = self.root / precision
        with FileLock(self.root / f"{precision}.lock"):
            if not (self.root / f"{precision}.done").exists():
                profile = Profile(batch=(1, 1, 2), height=(32, 64, 128), width=(32, 64, 128))
                export_bundle(self.model, folder, ExportOptions(precision=precision, profile=profile, verify=True,
                                                                step_cache=1 if precision == "fp32" else None))
                (self.root / f"{precision}.done").touch()
        return str(folder)

    def __iter__(self):
        return iter(self.PRECISIONS)

    def __len__(self) -> int:
        return len(self.PRECISIONS)


@pytest.fixture(scope="session")
def onnx_bundles(tiny_model, tmp_path_factory) -> SharedBundles:
    """fp32 and fp16 ONNX bundles of the tiny model (profile: 1-2 images, sides 32-128 px), verified; the fp32
    one with the UNet split for step caching at depth 1."""
    return SharedBundles(tiny_model, shared_folder(tmp_path_factory, "bundles"))


def shared_folder(tmp_path_factory, name: str):
    """A folder of this test run that every pytest-xdist worker sees (their base temp's parent), else one of
    this session's own; whoever fills it holds its lock."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


def model_copy(model: str, dest, unet_config: dict | None = None):
    """A copy of ``model`` at ``dest`` with ``unet_config`` entries changed in unet/config.json."""
    import shutil

    copy = Path(shutil.copytree(model, dest))
    if unet_config:
        path = copy / "unet" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **unet_config}))
    return copy


@pytest.fixture(scope="session")
def saved_models(tiny_model, tmp_path_factory) -> dict[str, str]:
    """The tiny model as users get models: written by the installed diffusers/transformers' own
    ``save_pretrained``. ``ip2p``: a StableDiffusionInstructPix2PixPipeline (transformers 5 writes only
    tokenizer.json); ``fp16``: the same in float16 as ``variant="fp16"`` files; ``bin``: .bin weights only;
    ``full``: the timbrooks/instruct-pix2pix layout, with a safety checker and feature extractor;
    ``sd``: a Stable Diffusion base (4-channel UNet) saved by StableDiffusionPipeline."""
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

    root, tiny = tmp_path_factory.mktemp("saved"), Path(tiny_model)
    parts = dict(vae=AutoencoderKL.from_pretrained(tiny / "vae"),
                 text_encoder=CLIPTextModel.from_pretrained(tiny / "text_encoder"),
                 tokenizer=CLIPTokenizer.from_pretrained(tiny / "tokenizer"),
                 scheduler=EulerAncestralDiscreteScheduler.from_pretrained(tiny / "scheduler"))
    unet = UNet2DConditionModel.from_pretrained(tiny / "unet")
    pipe = StableDiffusionInstructPix2PixPipeline(unet=unet, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False, **parts)
    pipe.save_pretrained(root / "ip2p")
    pipe.save_pretrained(root / "bin", safe_serialization=False)
    text_dir = root / "bin" / "text_encoder"  # transformers 5 writes safetensors only; older versions wrote this
    torch.save(parts["text_encoder"].state_dict(), text_dir / "pytorch_model.bin")
    (text_dir / "model.safetensors").unlink()

    checker_config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                 num_hidden_layers=1, vocab_size=100),
                                vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                   num_hidden_layers=1, image_size=32, patch_size=8),
                                projection_dim=16)
    full = StableDiffusionInstructPix2PixPipeline(unet=unet, safety_checker=StableDiffusionSafetyChecker(checker_config),
                                                  feature_extractor=CLIPImageProcessor(), **parts)
    full.save_pretrained(root / "full")
    assert json.loads((root / "full" / "model_index.json").read_text())["safety_checker"][0] == "stable_diffusion"

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    base_unet = UNet2DConditionModel(**{**config, "in_channels": 4})
    StableDiffusionPipeline(unet=base_unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                            **parts).save_pretrained(root / "sd")
    pipe.to(torch.float16).save_pretrained(root / "fp16", variant="fp16")  # last: casts the shared modules
    return {name: str(root / name) for name in ("ip2p", "fp16", "bin", "full", "sd")}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random CLIP (text and vision towers, projection 16) with its tokenizer and image processor, all
    written by the installed transformers' own save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from engine.random_models import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    files = folder.parent / "tokenizer-files"
    write_clip_tokenizer(files, merges=200)
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """A tiny random GPT-2 and a byte-level BPE tokenizer trained here on the shipped example triplets, both
    written by the installed transformers' own save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from training.prompts import TRIPLET, shipped_examples

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [TRIPLET.format(**e) for e in shipped_examples()]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("lm") / "tiny-gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """16 pairs: a red square on grey becomes a blue square, same place."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        x, y = rng.integers(0, 20, 2)
        before = np.full((32, 32, 3), 128, np.uint8)
        after = before.copy()
        before[y:y + 12, x:x + 12] = (220, 30, 30)
        after[y:y + 12, x:x + 12] = (30, 30, 220)
        Image.fromarray(before).save(root / f"in{i}.png")
        Image.fromarray(after).save(root / f"out{i}.png")
        rows.append({"input_image": f"in{i}.png", "edit_prompt": "make the square blue", "edited_image": f"out{i}.png"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(root)
