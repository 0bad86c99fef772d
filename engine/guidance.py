"""Three-way classifier-free guidance (Brooks et al. 2022, eq. 3) as a wrapper around the UNet.

Array-agnostic: works on torch tensors and numpy arrays alike. The UNet is evaluated once per step at
batch 3B, branches in the order (instruction, image), ("", image), ("", zero image latent).
"""
from __future__ import annotations

from typing import Any, Callable

BRANCHES = 3


def uses_guidance(text_scale: float, image_scale: float) -> bool:
    """With both scales 1, eq. 3 reduces to the conditional branch: batch B suffices."""
    return not (text_scale == 1 and image_scale == 1)


def combine_guidance(eps_cond: Any, eps_image: Any, eps_uncond: Any, text_scale: float, image_scale: float) -> Any:
    """eps_uncond + s_T (eps_cond - eps_image) + s_I (eps_image - eps_uncond), Brooks et al. eq. 3."""
    return eps_uncond + text_scale * (eps_cond - eps_image) + image_scale * (eps_image - eps_uncond)


def guided_denoiser(
    unet: Callable[[Any, float], Any],
    timestep_of: Callable[[float], float],
    text_scale: float,
    image_scale: float,
    prediction_type: str = "epsilon",
    all_branches: bool = False,
) -> Callable[[Any, float], Any]:
    """Turn ``unet(scaled_x, t) -> model output`` (batch 3B, or B without guidance) into ``D(x, sigma)``.

    ``x`` is in k-diffusion's parametrisation (x0 + sigma * eps); the UNet sees x / sqrt(sigma^2 + 1).
    ``all_branches`` keeps batch 3B even when both scales are 1 (static-shape engines accept only 3B).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    guided = all_branches or uses_guidance(text_scale, image_scale)

    def denoise(x: Any, sigma: float) -> Any:
        c_in = 1.0 / (sigma**2 + 1) ** 0.5
        out = unet(x * c_in, timestep_of(sigma))  # (3B or B, 4, h, w)
        if guided:
            b = x.shape[0]
            out = combine_guidance(out[:b], out[b : 2 * b], out[2 * b :], text_scale, image_scale)
        if prediction_type == "epsilon":
            return x - out * sigma
        return x * (c_in * c_in) - out * (sigma * c_in)  # v-prediction (Salimans & Ho 2022)

    return denoise
