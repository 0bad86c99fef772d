"""Tensor names of every network, declared once.

The torch backend, the exporter, the TensorRT builder and the runtimes all read these specs, so a
component's inputs and outputs are called the same everywhere. Dimensions are symbolic names
(``B`` batch, ``H``/``W`` latent height/width, ``HP``/``WP`` pixel height/width) or integers.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name of the float32 variant: "float32", "int64", ...
    dims: tuple[str | int, ...]


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    inputs=(TensorSpec("input_ids", "int64", ("B", 77)),),
    outputs=(TensorSpec("text_embeddings", "float32", ("B", 77, "D")),),
)

VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    inputs=(TensorSpec("images", "float32", ("B", 3, "HP", "WP")),),  # RGB in [-1, 1]
    outputs=(TensorSpec("image_latents", "float32", ("B", 4, "H", "W")),),  # posterior mode, unscaled
)

UNET = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", "float32", ("B", 8, "H", "W")),  # [scaled noisy latents | image latents]
        TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("encoder_hidden_states", "float32", ("B", 77, "D")),
    ),
    outputs=(TensorSpec("noise_pred", "float32", ("B", 4, "H", "W")),),
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latents", "float32", ("B", 4, "H", "W")),),  # scaled, as the sampler produces them
    outputs=(TensorSpec("images", "float32", ("B", 3, "HP", "WP")),),  # RGB in [-1, 1]
)

COMPONENTS = {spec.name: spec for spec in (TEXT_ENCODER, VAE_ENCODER, UNET, VAE_DECODER)}
