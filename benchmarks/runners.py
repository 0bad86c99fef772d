"""Each benchmarked system behind one interface: ``stage(name, resolution) -> callable``.

Our engine on every backend, and diffusers' StableDiffusionInstructPix2PixPipeline on the same weights
as the baseline. All systems get the same numpy inputs, built once per (stage, resolution); only the
call is timed, and network stages return numpy so accuracies can be compared.
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
NETWORK_STAGES = ("text_encode", "vae_encode", "unet_step", "vae_decode")
PROMPT = "make the circle blue"
EDIT_STEPS = {"cpu": 4, "cuda": 20}  # end-to-end edit: a quick 4 on a CPU, the usual 20 on a GPU
SIGMA, SIGMA_NEXT = 10.0, 8.0  # one mid-schedule step for the guidance + sampler stage


def stage_inputs(resolution: int, vae_factor: int, text_dim: int) -> dict[str, np.ndarray]:
    """Fixed random inputs of every stage at ``resolution`` (batch 1 image, 3 UNet rows)."""
    rng = np.random.default_rng(1)
    h = resolution // vae_factor
    return {
        "images": rng.uniform(-1, 1, (1, 3, resolution, resolution)).astype(np.float32),
        "sample": rng.standard_normal((3, 8, h, h)).astype(np.float32),
        "timestep": np.full(3, 500.0, np.float32),
        "text": rng.standard_normal((3, 77, text_dim)).astype(np.float32),
        "latents": rng.standard_normal((1, 4, h, h)).astype(np.float32),
        "eps": rng.standard_normal((3, 4, h, h)).astype(np.float32),
        "noise": rng.standard_normal((1, 4, h, h)).astype(np.float32),
        "photo": (rng.random((resolution, resolution, 3)) * 255).astype(np.uint8),
    }


def guidance_and_step(latents, eps, noise):
    """Input scaling, eq. 3 and one ancestral Euler step on any array type: the loop's per-step work
    besides the UNet call. Returns (UNet input of the step, next latents)."""
    scaled = latents * (1.0 / (SIGMA**2 + 1) ** 0.5)
    guided = combine_guidance(eps[:1], eps[1:2], eps[2:], 7.5, 1.5)
    denoised = latents - guided * SIGMA
    down, up = ancestral_step(SIGMA, SIGMA_NEXT)
    return scaled, latents + (latents - denoised) / SIGMA * (down - SIGMA) + noise * up


class EngineRunner:
    """Our EditPipeline on one backend: stages call the backend exactly as the denoising loop does. The
    edit runs ``edit_steps`` steps exactly, or a preset (engine/presets.py) with its own steps."""

    def __init__(self, pipe: EditPipeline, edit_steps: int, preset: str = "exact"):
        from engine.presets import preset_config

        self.pipe, self.preset = pipe, preset
        self.edit_steps = edit_steps if preset == "exact" else preset_config(preset).steps
        self.unet_evaluations = 3 * self.edit_steps  # until an edit has run and counted them
        self.unet_work = float(self.unet_evaluations)  # the same, MAC-weighted (differs with step caching)

    def _edit(self, photo: np.ndarray, resolution: int) -> np.ndarray:
        result = self.pipe.edit(photo, PROMPT, preset=self.preset, steps=self.edit_steps, seed=0,
                                resolution=resolution, output_type="np")
        self.unet_evaluations, self.unet_work = result.unet_evaluations[0], result.unet_work[0]
        return result.images

    def stage(self, name: str, resolution: int) -> Callable[[], Any]:
        pipe, be, model = self.pipe, self.pipe.backend, self.pipe.model
        raw = stage_inputs(resolution, model.vae_factor, model.text_dim)
        x = {k: be.asarray(v) for k, v in raw.items() if k != "photo"}
        ids = be.asarray(pipe.tokenizer([PROMPT]))
        calls = {
            "text_encode": lambda: be.to_numpy(be.run("text_encoder", {"input_ids": ids})["text_embeddings"]),
            "vae_encode": lambda: be.to_numpy(be.run("vae_encoder", {"images": x["images"]})["image_latents"]),
            "unet_step": lambda: be.to_numpy(be.run("unet", {"sample": x["sample"], "timestep": x["timestep"],
                                                             "encoder_hidden_states": x["text"]})["noise_pred"]),
            "guidance_sampler": lambda: be.to_numpy(guidance_and_step(x["latents"], x["eps"], x["noise"])[1]),
            "vae_decode": lambda: be.to_numpy(be.run("vae_decoder", {"latents": x["latents"]})["images"]),
            "edit": lambda: self._edit(raw["photo"], resolution),
        }
        return calls[name]


class DiffusersRunner:
    """diffusers' pipeline and its modules, called as its pipeline calls them."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, edit_steps: int, channels_last: bool = False):
        """``channels_last``: the UNet and VAE in channels-last memory format (diffusers' advice for CPUs)."""
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            model_dir, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
        ).to(device)
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.device, self.dtype, self.edit_steps = pipe, device, dtype, edit_steps

    def stage(self, name: str, resolution: int) -> Callable[[], Any]:
        from PIL import Image

        pipe, dev = self.pipe, self.device
        raw = stage_inputs(resolution, pipe.vae_scale_factor, pipe.text_encoder.config.hidden_size)
        x = {k: torch.from_numpy(v).to(dev, self.dtype) for k, v in raw.items() if k not in ("photo", "timestep")}
        ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(dev)
        t = torch.tensor(500.0, device=dev)
        photo = Image.fromarray(raw["photo"])
        scheduler = pipe.scheduler
        scale = pipe.vae.config.scaling_factor

        def guidance_sampler():
            """diffusers' per-step work besides the UNet: scale_model_input, chunk, eq. 3, scheduler.step.
            Its scheduler is stateful, so each call also resets it with set_timesteps (about 40 us here)."""
            scheduler.set_timesteps(20)
            scheduler.scale_model_input(x["latents"], scheduler.timesteps[0])
            cond, image, uncond = x["eps"].chunk(3)
            guided = uncond + 7.5 * (cond - image) + 1.5 * (image - uncond)
            return scheduler.step(guided, scheduler.timesteps[0], x["latents"]).prev_sample

        calls = {
            "text_encode": lambda: pipe.text_encoder(ids)[0],
            "vae_encode": lambda: pipe.vae.encode(x["images"]).latent_dist.mode(),
            "unet_step": lambda: pipe.unet(x["sample"], t, x["text"]).sample,
            "guidance_sampler": guidance_sampler,
            "vae_decode": lambda: pipe.vae.decode(x["latents"] / scale).sample,
            "edit": lambda: pipe(PROMPT, image=photo, num_inference_steps=self.edit_steps, output_type="np",
                                 generator=torch.Generator(dev).manual_seed(0)).images,
        }

        def call():
            with torch.inference_mode():
                out = calls[name]()
            return out.float().cpu().numpy() if isinstance(out, torch.Tensor) else out

        return call
