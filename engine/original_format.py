"""Write a diffusers-format model as one original (CompVis/LDM-layout) checkpoint file.

The inverse of diffusers' single-file loader for SD 1.x-style models: ``model.diffusion_model.*`` for
the UNet, ``first_stage_model.*`` for the VAE, ``cond_stage_model.transformer.*`` for CLIP. Used by
``ip2p convert`` and by the tests that check single-file loading on checkpoints they write.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from engine.checkpoints import ModelSource, Weights
from engine.config import read_model_config
from engine.errors import InputError
from engine.files import atomic_path

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, prefix_from: str, prefix_to: str, inner: dict[str, str] | None = None) -> str | None:
    if not key.startswith(prefix_from + "."):
        return None
    rest = key[len(prefix_from) + 1 :]
    for old, new in (inner or {}).items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"{prefix_to}.{rest}"


def unet_key_map(config: dict) -> list[tuple[str, str, dict[str, str] | None]]:
    """(diffusers prefix, LDM prefix, inner renames) for every block of an SD 1.x-style UNet config."""
    layers = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    pairs = [("time_embedding.linear_1", "time_embed.0", None), ("time_embedding.linear_2", "time_embed.2", None),
             ("conv_in", "input_blocks.0.0", None), ("conv_norm_out", "out.0", None), ("conv_out", "out.2", None),
             ("mid_block.resnets.0", "middle_block.0", _RESNET), ("mid_block.attentions.0", "middle_block.1", None),
             ("mid_block.resnets.1", "middle_block.2", _RESNET)]
    for i, kind in enumerate(down):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", _RESNET))
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1", None))
        if i < len(down) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op", None))
    for i, kind in enumerate(up):
        attention = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _RESNET))
            if attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1", None))
        if i < len(up) - 1:
            last = i * (layers + 1) + layers
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{2 if attention else 1}.conv", None))
    return pairs


def vae_key_map(config: dict) -> list[tuple[str, str, dict[str, str] | None]]:
    """(diffusers prefix, LDM prefix, inner renames) for an AutoencoderKL config."""
    blocks = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    shortcut = {"conv_shortcut": "nin_shortcut"}
    pairs = [("encoder.conv_norm_out", "encoder.norm_out", None), ("decoder.conv_norm_out", "decoder.norm_out", None)]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", shortcut),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", shortcut),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)]
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", shortcut))
        for j in range(layers + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{blocks - 1 - i}.block.{j}", shortcut))
        if i < blocks - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", None))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{blocks - 1 - i}.upsample.conv", None))
    return pairs


def _convert(state: dict[str, np.ndarray], pairs, root: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        for old, new, inner in pairs:
            renamed = _rename(key, old, new, inner)
            if renamed is not None:
                break
        else:
            renamed = key  # conv_in, conv_out, quant convs and attention internals keep their names
        if ".mid.attn_1." in renamed and renamed.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[f"{root}.{renamed}"] = value
    return out


def load_weights(weights: Weights) -> dict[str, np.ndarray]:
    """One component's state dict as numpy arrays, from its safetensors files or (with torch) .bin pickles."""
    state: dict[str, np.ndarray] = {}
    for path in weights.files:
        if weights.safetensors:
            from safetensors.numpy import load_file

            state |= load_file(path)
        else:
            import torch

            state |= {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                      for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    return state


def save_single_file(model: str | os.PathLike | ModelSource, path: str | os.PathLike) -> Path:
    """Write a diffusers folder's UNet, VAE and text encoder as one LDM-layout file, atomically: safetensors,
    or a torch pickle ``{"state_dict": ...}`` for a ``.ckpt`` path."""
    from safetensors.numpy import save_file

    source = model if isinstance(model, ModelSource) else ModelSource(folder=Path(model))
    folder, target = source.folder, Path(path)
    read_model_config(folder)  # refuses anything that is not an InstructPix2Pix folder
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    state = _convert(load_weights(source.weights("unet")), unet_key_map(unet_config), "model.diffusion_model")
    state |= _convert(load_weights(source.weights("vae")), vae_key_map(vae_config), "first_stage_model")
    text = load_weights(source.weights("text_encoder"))
    # transformers 5 saves CLIPTextModel without the "text_model." prefix that original checkpoints carry
    state |= {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in text.items()}
    if target.suffix not in (".ckpt", ".safetensors"):
        raise InputError(f"{target}: a single-file checkpoint must end in .safetensors or .ckpt")
    with atomic_path(target) as tmp:
        if target.suffix == ".ckpt":
            import torch

            torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp)
        else:
            save_file(state, tmp)
    return target
