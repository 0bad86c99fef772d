"""``ip2p bench pairs``: the time ``ip2p generate-pairs`` takes per pair at the real shapes: a random-weight
Stable Diffusion 1.5 (4-channel UNet, the sd15 architecture) and a random-weight CLIP ViT-L/14, built in memory.

A 50-step candidate at 512x512 is too slow to run in full on a CPU host, so the candidate is timed at two step
counts and the per-step cost extrapolated (stated as such in the result); the CLIP filter is timed as it runs.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
CLIP_L14 = dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, hidden_act="quick_gelu"),
                vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu"),
                projection_dim=768)


def sd15_base():
    """A StableDiffusionPipeline at SD 1.5's shapes with random weights (the sd15 InstructPix2Pix architecture
    with a 4-channel UNet)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from engine.random_models import ARCHITECTURES, SD15_SCHEDULER, write_clip_tokenizer

    arch = ARCHITECTURES["sd15"]
    folder = tempfile.mkdtemp(prefix="sd15-tokenizer-")
    write_clip_tokenizer(Path(folder), arch["merges"])
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**{**arch["text_encoder"], "vocab_size": len(tokenizer),
                                           "bos_token_id": tokenizer.bos_token_id,
                                           "eos_token_id": tokenizer.eos_token_id,
                                           "pad_token_id": tokenizer.pad_token_id}))
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER)
    return StableDiffusionPipeline(vae=AutoencoderKL(**arch["vae"]), text_encoder=text, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**{**arch["unet"], "in_channels": 4}),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def clip_l14(folder: str) -> str:
    """A random CLIP ViT-L/14 with its processor, saved to ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from engine.random_models import write_clip_tokenizer

    write_clip_tokenizer(Path(folder) / "tokenizer-files", 2000)
    tokenizer = CLIPTokenizer(f"{folder}/tokenizer-files/vocab.json", f"{folder}/tokenizer-files/merges.txt")
    config = CLIPConfig(text_config={**CLIP_L14["text_config"], "vocab_size": len(tokenizer),
                                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                     "pad_token_id": tokenizer.pad_token_id},
                        vision_config=CLIP_L14["vision_config"], projection_dim=CLIP_L14["projection_dim"])
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def time_pairs(resolution: int = 512, step_counts: tuple[int, int] = (2, 4), samples: int = 4,
               target_steps: int = 50) -> dict:
    """Seconds per candidate (measured at two step counts, extrapolated to ``target_steps``), for the CLIP filter
    of ``samples`` candidates, and per kept pair with ``samples`` candidates each."""
    from training.clip_metrics import ClipScorer
    from training.pairs import install_sharing, sample_pair

    pipe = sd15_base()
    state = install_sharing(pipe)
    caption_in, caption_out = "a red car parked on a bridge", "a blue car parked on a bridge"
    sample_pair(pipe, state, caption_in, caption_out, 0.5, 7.5, 0, 1, resolution)  # warm-up
    seconds = {}
    for steps in step_counts:
        start = time.perf_counter()
        first, second = sample_pair(pipe, state, caption_in, caption_out, 0.5, 7.5, 0, steps, resolution)
        seconds[steps] = time.perf_counter() - start
    low, high = step_counts
    per_step = (seconds[high] - seconds[low]) / (high - low)
    fixed = seconds[low] - low * per_step
    with tempfile.TemporaryDirectory() as folder:
        scorer = ClipScorer(clip_l14(folder))
        images = [first, second] * samples
        start = time.perf_counter()
        embeddings = scorer.image_embeddings(images)
        scorer.text_embeddings([caption_in, caption_out])
        clip_s = time.perf_counter() - start
    assert np.isfinite(embeddings).all()
    candidate = fixed + target_steps * per_step
    return dict(resolution=resolution, measured_steps=seconds, seconds_per_step=per_step, fixed_seconds=fixed,
                target_steps=target_steps, candidate_seconds_extrapolated=candidate, samples=samples,
                clip_filter_seconds=clip_s, seconds_per_prompt_extrapolated=samples * candidate + clip_s)
