"""Conditioning dropout for three-way guidance (Brooks et al. 2022, sec. 3.2.1)."""
from __future__ import annotations

import torch


def dropout_masks(r: torch.Tensor, p: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (text, image) from uniform draws ``r`` (B,): r < p drops the text only, p <= r < 2p
    both, 2p <= r < 3p the image only; otherwise both are kept."""
    drop_text = r < 2 * p
    drop_image = (r >= p) & (r < 3 * p)
    return ~drop_text, ~drop_image


def apply_dropout(text: torch.Tensor, null_text: torch.Tensor, image_latents: torch.Tensor, r: torch.Tensor,
                  p: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """A dropped text becomes the embedding of "" (1, 77, D); a dropped image a zero latent."""
    keep_text, keep_image = dropout_masks(r, p)
    text = torch.where(keep_text[:, None, None], text, null_text.to(text.dtype))  # (B, 77, D)
    image_latents = image_latents * keep_image[:, None, None, None].to(image_latents.dtype)  # (B, 4, h, w)
    return text, image_latents
