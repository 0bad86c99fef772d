"""The UNet as two networks for step caching (DeepCache, Ma et al. 2023, arXiv 2312.00858).

A UNet with L levels runs conv_in, down levels 0..L-1, the middle block, up levels L-1..0 and conv_out; up
level j takes the skip connections of down level j. Split at ``depth`` d: the *full* network is the whole
UNet and also returns the hidden state entering the d outermost up levels (``deep_feature``); the
*shallow* network runs only conv_in, the d outermost down levels and those d up levels, taking
``deep_feature`` from the last full call in place of everything deeper. Same modules, same weights:
the full network's ``noise_pred`` is the UNet's own.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.errors import InputError


def check_splittable(unet: nn.Module, depth: int) -> None:
    """Refuse UNets whose forward needs more than this split reproduces, and depths it has no level for."""
    config = unet.config
    levels = len(unet.down_blocks)
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth < levels:
        raise InputError(f"step cache depth must be a whole number from 1 to {levels - 1} for this UNet "
                         f"({levels} levels), got {depth!r}")
    extras = {"class_embed_type": config.class_embed_type, "addition_embed_type": config.addition_embed_type,
              "time_cond_proj_dim": config.time_cond_proj_dim}
    used = [name for name, value in extras.items() if value is not None]
    if used or config.center_input_sample:
        raise InputError(f"step caching supports SD-style UNets; this one uses {', '.join(used) or 'center_input_sample'}")


def feature_channels(unet: nn.Module, depth: int) -> int:
    """Channels of ``deep_feature``: the output of the up level just inside the ``depth`` outer ones."""
    return unet.up_blocks[len(unet.up_blocks) - depth - 1].resnets[-1].out_channels


def feature_shape(unet: nn.Module, depth: int, latent_size: tuple[int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of ``deep_feature`` for one row, at the resolution of down level
    ``depth - 1`` (2^(depth-1) coarser than the latent)."""
    channels = feature_channels(unet, depth)
    h, w = latent_size
    for _ in range(depth - 1):
        h, w = -(-h // 2), -(-w // 2)
    return channels, h, w


class _Levels(nn.Module):
    """The pieces of a diffusers UNet2DConditionModel forward that both halves share."""

    def __init__(self, unet: nn.Module, depth: int, kv_downsample: int = 1):
        super().__init__()
        check_splittable(unet, depth)
        self.unet, self.depth, self.kv_downsample = unet, depth, kv_downsample

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)  # (N, 4C)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
        return emb, context

    def attention_kwargs(self, sample: torch.Tensor) -> dict | None:
        return {"latent_size": tuple(sample.shape[-2:])} if self.kv_downsample > 1 else None

    def down(self, block: nn.Module, h: torch.Tensor, emb, context, kwargs):
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, encoder_hidden_states=context, cross_attention_kwargs=kwargs)
        return block(hidden_states=h, temb=emb)

    def up(self, block: nn.Module, h: torch.Tensor, skips: tuple, emb, context, kwargs, upsample_size):
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=context,
                         cross_attention_kwargs=kwargs, upsample_size=upsample_size)
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size)

    def up_levels(self, h, skips: tuple, first: int, emb, context, kwargs, odd_size: bool) -> torch.Tensor:
        """Up levels ``first``.. to the end, consuming ``skips`` from their end; then conv_out."""
        unet = self.unet
        for i in range(first, len(unet.up_blocks)):
            block = unet.up_blocks[i]
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if odd_size and i < len(unet.up_blocks) - 1 else None
            h = self.up(block, h, res, emb, context, kwargs, size)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)

    def odd_size(self, sample: torch.Tensor) -> bool:
        """Whether a side is no multiple of the UNet's total upsampling (the up levels then follow the
        skips' sizes, as diffusers does)."""
        factor = 2 ** self.unet.num_upsamplers
        return any(d % factor for d in sample.shape[-2:])


class FullUNet(_Levels):
    """sample (N, 8, H, W), timestep (N,), encoder_hidden_states (N, 77, D) -> noise_pred (N, 4, H, W) and
    deep_feature (N, C, H', W'): the input of the ``depth`` outermost up levels."""

    def forward(self, sample, timestep, encoder_hidden_states):
        unet = self.unet
        emb, context = self.embed(sample, timestep, encoder_hidden_states)
        kwargs, odd = self.attention_kwargs(sample), self.odd_size(sample)
        h = unet.conv_in(sample)
        skips = (h,)
        for block in unet.down_blocks:
            h, res = self.down(block, h, emb, context, kwargs)
            skips += res
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                h = unet.mid_block(h, emb, encoder_hidden_states=context, cross_attention_kwargs=kwargs)
            else:
                h = unet.mid_block(h, emb)
        first = len(unet.up_blocks) - self.depth
        for i in range(first):
            block = unet.up_blocks[i]
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            h = self.up(block, h, res, emb, context, kwargs, skips[-1].shape[2:] if odd else None)
        return self.up_levels(h, skips, first, emb, context, kwargs, odd), h


class ShallowUNet(_Levels):
    """sample, timestep, encoder_hidden_states and deep_feature (from the last full call) -> noise_pred:
    only the ``depth`` outermost levels run."""

    def forward(self, sample, timestep, encoder_hidden_states, deep_feature):
        unet = self.unet
        emb, context = self.embed(sample, timestep, encoder_hidden_states)
        kwargs, odd = self.attention_kwargs(sample), self.odd_size(sample)
        h = unet.conv_in(sample)
        skips = (h,)
        for block in unet.down_blocks[: self.depth]:
            h, res = self.down(block, h, emb, context, kwargs)
            skips += res
        first = len(unet.up_blocks) - self.depth
        consumed = sum(len(block.resnets) for block in unet.up_blocks[first:])
        return self.up_levels(deep_feature, skips[:consumed], first, emb, context, kwargs, odd)
