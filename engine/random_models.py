"""Random-weight InstructPix2Pix models in diffusers format, for tests (``tiny``) and benchmarks (``sd15``).

``sd15`` has the exact architecture of timbrooks/instruct-pix2pix, so it runs at the real model's shapes
and cost without downloading anything. The CLIP tokenizer files are generated offline.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from engine.errors import InputError

log = logging.getLogger(__name__)

SD15_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "linspace",
    "trained_betas": None,
}

ARCHITECTURES = {
    "tiny": {
        "unet": dict(
            sample_size=32,
            in_channels=8,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            layers_per_block=1,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
        ),
        "merges": 200,
    },
    "sd15": {
        "unet": dict(
            sample_size=64,
            in_channels=8,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        "merges": 2000,
    },
    # The project's own small model (engine/models/shapes): 64x64 images, 4x VAE downsampling to 16x16x4
    # latents, attention only at 8x8 and 4x4, a 2-layer text tower whose vocabulary holds every domain word.
    "shapes": {
        "unet": dict(
            sample_size=16,
            in_channels=8,
            out_channels=4,
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=16,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            sample_size=64,
            mid_block_add_attention=False,
            norm_num_groups=8,  # groups of 4-8 channels: a flat colour keeps its level through GroupNorm
            scaling_factor=1.0,  # measured on the data by the VAE stage
        ),
        "text_encoder": dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=64,
        ),
        "merges": 5000,  # more than the corpus can use: every corpus word becomes one token
        # v-prediction: at high noise the target is about -x0, so a small model learns to keep the input
        # image's layout and colours early in sampling (with epsilon, x0 errors there are amplified ~15x)
        "scheduler": {"prediction_type": "v_prediction"},
    },
}

# Words the generated tokenizer learns merges from: enough to give edit instructions multi-letter tokens.
_CORPUS = (
    "make turn paint change add remove replace put give it the a an of to into with and in on at as "
    "circle square triangle shape background sky water snow winter summer autumn night day sunset rain "
    "red green blue yellow purple orange white black pink brown gray golden silver colour color "
    "cat dog horse person man woman face hair hat glasses beard smile house car tree flower mountain "
    "photo painting style picture image drawing sketch cartoon oil van gogh picasso watercolor "
    "bigger smaller brighter darker older younger happy sad fire ice stone wood metal glass "
    "delete take away get rid erase"
).split()


def write_clip_tokenizer(folder: Path, merges: int) -> None:
    """CLIP-format tokenizer files: byte alphabet, ``merges`` BPE merges learned from a small corpus."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = Counter(tuple(word[:-1]) + (word[-1] + "</w>",) for word in _CORPUS)
    learned: list[tuple[str, str]] = []
    while len(learned) < merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        learned.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(p) for p in learned]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learned), encoding="utf-8"
    )
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def create_model(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-weight ``tiny`` or ``sd15`` InstructPix2Pix model in diffusers format to ``out_dir``."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in ARCHITECTURES:
        raise InputError(f"unknown model kind {kind!r}; choose from {', '.join(ARCHITECTURES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: already exists and is not empty")
    arch = ARCHITECTURES[kind]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_clip_tokenizer(staging / "tokenizer", arch["merges"])
        vocab_size = len(json.loads((staging / "tokenizer" / "vocab.json").read_text(encoding="utf-8")))
        text_config = {"vocab_size": vocab_size, **arch["text_encoder"]}
        text_config.update(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
        torch.manual_seed(seed)
        log.info("building %s UNet", kind)
        UNet2DConditionModel(**arch["unet"]).save_pretrained(staging / "unet")
        log.info("building %s VAE", kind)
        AutoencoderKL(**arch["vae"]).save_pretrained(staging / "vae")
        log.info("building %s text encoder", kind)
        CLIPTextModel(CLIPTextConfig(**text_config)).save_pretrained(staging / "text_encoder")
        (staging / "scheduler").mkdir()
        scheduler = {**SD15_SCHEDULER, **arch.get("scheduler", {}), "_diffusers_version": diffusers.__version__}
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        index = {
            "_class_name": "StableDiffusionInstructPix2PixPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
