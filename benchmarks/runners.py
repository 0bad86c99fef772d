"""Each benchmarked system behind one interface: ``stage(name, resolution) -> callable`` on fixed inputs.

Our engine on every backend, and diffusers' StableDiffusionInstructPix2PixPipeline on the same weights
as the baseline. Inputs are built once per (stage, resolution); only the call is timed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine import EditPipeline
from engine.guidance import combine_guidance
from engine.samplers import ancestral_step

STAGES = ("text_encode", "vae_encode", "unet_step", "guidance_sampler", "vae_decode", "edit")
PROMPT = "make the circle blue"
EDIT_STEPS = 4


def test_image(resolution: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((resolution, resolution, 3)) * 255).astype(np.uint8)


class EngineRunner:
    """Our EditPipeline on one backend: stages call the backend exactly as the denoising loop does."""

    def __init__(self, pipe: EditPipeline, device: str):
        self.pipe, self.device = pipe, device

    def stage(self, name: str, resolution: int) -> Callable[[], Any]:
        pipe, be, model = self.pipe, self.pipe.backend, self.pipe.model
        h = resolution // model.vae_factor
        rng = np.random.default_rng(1)
        ids = be.asarray(pipe.tokenizer([PROMPT]))
        images = be.asarray(rng.uniform(-1, 1, (1, 3, resolution, resolution)).astype(np.float32))
        sample = be.asarray(rng.standard_normal((3, 8, h, h)).astype(np.float32))
        timestep = be.asarray(np.full(3, 500.0, np.float32))
        text = be.asarray(rng.standard_normal((3, 77, model.text_dim)).astype(np.float32))
        latents = be.asarray(rng.standard_normal((1, 4, h, h)).astype(np.float32))
        eps = be.asarray(rng.standard_normal((3, 4, h, h)).astype(np.float32))
        noise = be.asarray(rng.standard_normal((1, 4, h, h)).astype(np.float32))
        image = test_image(resolution)

        def guidance_sampler() -> Any:  # eq. 3 and one ancestral Euler step, no network
            guided = combine_guidance(eps[:1], eps[1:2], eps[2:], 7.5, 1.5)
            denoised = latents - guided * 10.0
            down, up = ancestral_step(10.0, 8.0)
            return be.to_numpy(latents + (latents - denoised) / 10.0 * (down - 10.0) + noise * up)

        calls = {
            "text_encode": lambda: be.to_numpy(be.run("text_encoder", {"input_ids": ids})["text_embeddings"]),
            "vae_encode": lambda: be.to_numpy(be.run("vae_encoder", {"images": images})["image_latents"]),
            "unet_step": lambda: be.to_numpy(be.run("unet", {"sample": sample, "timestep": timestep,
                                                             "encoder_hidden_states": text})["noise_pred"]),
            "guidance_sampler": guidance_sampler,
            "vae_decode": lambda: be.to_numpy(be.run("vae_decoder", {"latents": latents})["images"]),
            "edit": lambda: pipe.edit(image, PROMPT, steps=EDIT_STEPS, seed=0, resolution=resolution),
        }
        return calls[name]

    def flop_counter_target(self, name: str, resolution: int) -> Callable[[], Any] | None:
        return None  # FLOPs are counted once, on the torch modules (see DiffusersRunner)


class DiffusersRunner:
    """diffusers' pipeline and its modules, called as the pipeline calls them."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype = torch.float32):
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            model_dir, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
        ).to(device)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.device, self.dtype = pipe, device, dtype

    def stage(self, name: str, resolution: int) -> Callable[[], Any]:
        pipe, dev, dt = self.pipe, self.device, self.dtype
        h = resolution // pipe.vae_scale_factor
        g = torch.Generator().manual_seed(1)
        ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(dev)
        images = (torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1).to(dev, dt)
        sample = torch.randn(3, 8, h, h, generator=g).to(dev, dt)
        text = torch.randn(3, 77, pipe.text_encoder.config.hidden_size, generator=g).to(dev, dt)
        latents = torch.randn(1, 4, h, h, generator=g).to(dev, dt)
        eps = torch.randn(3, 4, h, h, generator=g).to(dev, dt)
        timestep = torch.tensor(500.0, device=dev)
        image = test_image(resolution)
        scheduler = pipe.scheduler

        def guidance_sampler() -> Any:  # what the pipeline does per step besides the UNet call
            scheduler.set_timesteps(20)
            t = scheduler.timesteps[0]
            text_eps, image_eps, uncond_eps = eps.chunk(3)
            guided = uncond_eps + 7.5 * (text_eps - image_eps) + 1.5 * (image_eps - uncond_eps)
            return scheduler.step(guided, t, latents, generator=torch.Generator(dev).manual_seed(0)).prev_sample.cpu()

        with_grad_off = torch.inference_mode
        calls = {
            "text_encode": lambda: _run(with_grad_off, lambda: pipe.text_encoder(ids)[0].cpu()),
            "vae_encode": lambda: _run(with_grad_off, lambda: pipe.vae.encode(images).latent_dist.mode().cpu()),
            "unet_step": lambda: _run(with_grad_off, lambda: pipe.unet(sample, timestep, text).sample.cpu()),
            "guidance_sampler": lambda: _run(with_grad_off, guidance_sampler),
            "vae_decode": lambda: _run(with_grad_off, lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.cpu()),
            "edit": lambda: pipe(PROMPT, image=_pil(image), num_inference_steps=EDIT_STEPS,
                                 generator=torch.Generator(dev).manual_seed(0)).images,
        }
        return calls[name]

    def flop_counter_target(self, name: str, resolution: int) -> Callable[[], Any] | None:
        """The stage as a pure torch call, for torch's FLOP counter (None for stages without network)."""
        return None if name == "guidance_sampler" else self.stage(name, resolution)


def _run(context, fn):
    with context():
        return fn()


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)
