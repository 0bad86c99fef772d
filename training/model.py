"""The UNet to train: an SD 1.x UNet grown from 4 to 8 input channels, or an InstructPix2Pix UNet as is."""
from __future__ import annotations

import torch
from torch import nn

from engine.errors import InputError


def expand_conv_in(unet: nn.Module) -> nn.Module:
    """A copy of ``unet`` whose conv_in takes 8 channels: the original 4 channels' weights and the bias
    copied, the 4 new (image latent) channels zero, so training starts from the base model's behaviour."""
    from diffusers import UNet2DConditionModel

    old = unet.conv_in
    if old.in_channels == 8:
        return unet
    if old.in_channels != 4:
        raise InputError(f"cannot grow a UNet with {old.in_channels} input channels to 8")
    grown = UNet2DConditionModel.from_config({**unet.config, "in_channels": 8})
    state = unet.state_dict()
    weight = torch.zeros(old.out_channels, 8, *old.kernel_size, dtype=old.weight.dtype)
    weight[:, :4] = old.weight.detach()  # (320, 8, 3, 3): noisy-latent channels from the base model
    state["conv_in.weight"] = weight
    grown.load_state_dict(state)
    return grown.to(old.weight.dtype)
