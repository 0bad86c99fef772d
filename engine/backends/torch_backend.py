"""PyTorch backend: the diffusers/transformers networks wrapped to the tensor names of ``engine.specs``.

The wrapper modules here are also what ``export/`` traces to ONNX, so both run the same graph.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine import specs
from engine.backends import unet_split
from engine.checkpoints import WEIGHTED_COMPONENTS, ModelSource, Weights
from engine.config import check_unet_channels
from engine.cpu import cpu_precision
from engine.errors import InputError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TextEncoder(nn.Module):
    """input_ids (B, 77) int64 -> text_embeddings (B, 77, D): CLIP's last hidden state."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids)[0]


class VaeEncoder(nn.Module):
    """images (B, 3, 8H, 8W) in [-1, 1] -> image_latents (B, 4, H, W): the posterior's mode, unscaled."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.latent_channels = vae.config.latent_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)  # (B, 2C, H, W): mean and log-variance
        return moments[:, : self.latent_channels]


class VaeDecoder(nn.Module):
    """latents (B, 4, H, W), scaled as the sampler makes them -> images (B, 3, 8H, 8W) in about [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.decoder = vae.decoder
        self.post_quant_conv = vae.post_quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def token_grid(tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the UNet level holding ``tokens`` positions: each level halves the latent, rounding up."""
    h, w = latent_size
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} tokens are no level of a {latent_size[0]}x{latent_size[1]} latent")
    return h, w


class KeyValueDownsampling:
    """Attention processor whose self-attention takes keys and values from the hidden states average-pooled
    ``factor`` x ``factor`` (token downsampling, "ToDo", Smith et al. 2024, arXiv 2402.13573): about
    factor**2 fewer keys, every query kept. With ``factor`` 1, or for cross-attention, plain attention."""

    def __init__(self, factor: int):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.factor, self.attend = factor, AttnProcessor2_0()

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.factor > 1 and encoder_hidden_states is None:
            b, n, c = hidden_states.shape  # (B, h*w, C)
            grid = hidden_states.transpose(1, 2).reshape(b, c, *token_grid(n, latent_size))
            pooled = F.avg_pool2d(grid, self.factor, ceil_mode=True)  # (B, C, h/f, w/f)
            encoder_hidden_states = pooled.flatten(2).transpose(1, 2)
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def set_kv_downsampling(unet: nn.Module, factor: int) -> None:
    """Token downsampling in the self-attentions of the UNet's finest attention level (64x64 tokens for
    SD 1.5 at 512 px, where nearly all attention time goes); every other attention stays exact."""
    down_types = unet.config.down_block_types
    level = next((i for i, kind in enumerate(down_types) if "CrossAttn" in kind), None)
    if level is None:
        raise InputError(f"kv_downsample: this UNet has no attention in its down blocks ({', '.join(down_types)})")
    finest = (f"down_blocks.{level}.", f"up_blocks.{len(down_types) - 1 - level}.")
    unet.set_attn_processor({
        name: KeyValueDownsampling(factor if name.startswith(finest) and name.endswith(".attn1.processor") else 1)
        for name in unet.attn_processors
    })


class UNet(nn.Module):
    """sample (N, 8, H, W), timestep (N,), encoder_hidden_states (N, 77, D) -> noise_pred (N, 4, H, W).

    ``kv_downsample`` > 1 approximates the finest level's self-attention (``set_kv_downsampling``)."""

    def __init__(self, unet: nn.Module, kv_downsample: int = 1):
        super().__init__()
        self.unet, self.kv_downsample = unet, kv_downsample
        if kv_downsample > 1:
            set_kv_downsampling(unet, kv_downsample)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        kwargs = {"latent_size": tuple(sample.shape[-2:])} if self.kv_downsample > 1 else None
        return self.unet(sample, timestep, encoder_hidden_states, cross_attention_kwargs=kwargs, return_dict=False)[0]


def wrap_components(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, kv_downsample: int = 1) -> dict[str, nn.Module]:
    """The spec-named modules of one InstructPix2Pix model."""
    return {
        specs.TEXT_ENCODER.name: TextEncoder(text_encoder).eval(),
        specs.VAE_ENCODER.name: VaeEncoder(vae).eval(),
        specs.UNET.name: UNet(unet, kv_downsample).eval(),
        specs.VAE_DECODER.name: VaeDecoder(vae).eval(),
    }


FP32_DECODER = specs.VAE_DECODER_FP32
# On a CPU, oneDNN's convolutions run faster on NHWC ("channels last") tensors: the sd15 VAE, nothing but
# convolutions and one attention, took 13-21% less time that way at 512 px in bf16 and fp32 (interleaved A/B,
# AVX512 host, docs/benchmarks.md); the UNet did not gain (its attention reshapes undo the layout): NCHW.
# They run image by image: at another batch size they round differently (by up to 16 levels of a pixel in
# bf16 on the shipped model), and a server batching requests promises each its solo pixels. The cost was
# within noise on the shipped model at 64 px, batch 8 (2.13 against 2.11 edits/s in fp32, 2.82 / 2.70 in bf16).
CHANNELS_LAST_ON_CPU = (specs.VAE_ENCODER.name, specs.VAE_DECODER.name, FP32_DECODER)


def split_modules(unet: nn.Module, name: str, kv_downsample: int = 1) -> nn.Module | None:
    """The step-caching half ``name`` (``unet_full_dK`` or ``unet_shallow_dK``) of ``unet``, sharing its
    weights; None for any other name."""
    split = specs.split_of(name)
    if split is None:
        return None
    kind, depth = split
    half = unet_split.FullUNet if kind == "full" else unet_split.ShallowUNet
    return half(unet, depth, kv_downsample).eval()


def unet_macs(unet: nn.Module, name: str, latent_size: tuple[int, int], text_dim: int, kv_downsample: int = 1) -> float:
    """Multiply-accumulates of one UNet row of component ``name`` (the plain UNet or a split half) at
    ``latent_size``, counted by torch's FlopCounterMode on a weightless (meta-device) copy."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = type(unet).from_config(unet.config)
        plain = UNet(twin, kv_downsample)  # installs the token downsampling the halves then share
        module = split_modules(twin, name, kv_downsample) or plain
        h, w = latent_size
        inputs = {"sample": torch.empty(1, twin.config.in_channels, h, w), "timestep": torch.empty(1),
                  "encoder_hidden_states": torch.empty(1, 77, text_dim)}
        split = specs.split_of(name)
        if split is not None and split[0] == "shallow":
            inputs["deep_feature"] = torch.empty(1, *unet_split.feature_shape(twin, split[1], latent_size))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(**inputs)
    return counter.get_total_flops() / 2


class TorchBackend:
    """Runs the wrapped networks under ``torch.inference_mode`` in one dtype on one device: eagerly, or
    with ``compile_unet`` the UNets (nearly all of an edit's work) through ``torch.compile``. The halves of
    the UNet split for step caching are made from the UNet's own modules when first asked for."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, dtype: torch.dtype,
                 compile_unet: bool = False):
        self.device, self.dtype, self.compile_unet = device, dtype, compile_unet
        wrapper = modules[specs.UNET.name]
        self._unet, self._kv_downsample = wrapper.unet, wrapper.kv_downsample  # the diffusers UNet, for splits
        self._channels_last = set(CHANNELS_LAST_ON_CPU) if device.type == "cpu" else set()
        self._modules = {name: (m.to(device=device, dtype=dtype), dtype) for name, m in modules.items()}
        for name in self._channels_last & set(self._modules):
            self._modules[name][0].to(memory_format=torch.channels_last)
        self._macs: dict[tuple[str, tuple[int, int]], float] = {}
        if compile_unet:
            self._modules[specs.UNET.name] = (self._compiled(self._modules[specs.UNET.name][0]), dtype)
            log.info("the UNet is compiled at its first call for each new input shape (about a minute on 2 CPU "
                     "cores for SD 1.5), then runs compiled")

    @staticmethod
    def _compiled(module: nn.Module) -> nn.Module:
        # freezing: weights become constants, so inductor folds them and pre-packs them for oneDNN on CPUs
        return torch.compile(module, dynamic=False, options={"freezing": True})

    def has(self, component: str) -> bool:
        if component in self._modules or (component == FP32_DECODER and self.dtype != torch.float32):
            return True
        return split_modules(self._unet, component, self._kv_downsample) is not None  # InputError: no such level

    def _module(self, component: str) -> tuple[nn.Module, torch.dtype]:
        if component not in self._modules:
            if component == FP32_DECODER:
                module, dtype = copy.deepcopy(self._modules[specs.VAE_DECODER.name][0]).float(), torch.float32
            else:
                module, dtype = split_modules(self._unet, component, self._kv_downsample), self.dtype
                if module is None:
                    raise KeyError(f"no component {component!r}")
                if self.compile_unet:
                    module = self._compiled(module)
            self._modules[component] = (module, dtype)
        return self._modules[component]

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        module, dtype = self._module(component)
        spec = specs.VAE_DECODER if component == FP32_DECODER else specs.component_spec(component)
        layout = torch.channels_last if component in self._channels_last else torch.contiguous_format
        args = {k: v.to(dtype).contiguous(memory_format=layout) if v.is_floating_point() else v
                for k, v in inputs.items()}
        with torch.inference_mode():
            if layout is torch.channels_last:  # image by image: see CHANNELS_LAST_ON_CPU
                rows = len(next(iter(args.values())))
                outs = [self._outputs(module(**{k: v[i : i + 1] for k, v in args.items()})) for i in range(rows)]
                outs = tuple(torch.cat(parts) for parts in zip(*outs))
            else:
                outs = self._outputs(module(**args))
        return {name: value.float().contiguous() for name, value in zip(spec.output_names, outs)}

    @staticmethod
    def _outputs(out) -> tuple:
        return out if isinstance(out, tuple) else (out,)

    def macs(self, component: str, latent_size: tuple[int, int]) -> float:
        """Multiply-accumulates of one row of a UNet component at ``latent_size`` (counted once per size)."""
        key = (component, tuple(latent_size))
        if key not in self._macs:
            text_dim = int(self._unet.config.cross_attention_dim)
            self._macs[key] = unet_macs(self._unet, component, latent_size, text_dim, self._kv_downsample)
        return self._macs[key]

    def asarray(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().float().cpu().numpy()

    def concat(self, arrays: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(list(arrays), dim=axis)

    def constant(self, array: torch.Tensor) -> torch.Tensor:
        return array  # already on the device


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} asked for, but MPS is not available")
    return dev


def load_component(source: ModelSource, name: str, dtype: torch.dtype = torch.float32,
                   weights: Weights | None = None) -> nn.Module:
    """One network (``unet``, ``vae`` or ``text_encoder``) of a diffusers folder, from ``weights`` (default: the
    files ``source.weights`` picks: safetensors or .bin, plain or the asked-for variant, sharded or not)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    weights = weights or source.weights(name)
    folder = source.folder / name
    if name == "text_encoder":
        return CLIPTextModel.from_pretrained(folder, dtype=dtype, variant=weights.variant,
                                             use_safetensors=weights.safetensors)
    cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
    return cls.from_pretrained(folder, torch_dtype=dtype, variant=weights.variant, use_safetensors=weights.safetensors)


def load_networks(source: ModelSource, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(unet, vae, text_encoder) from a diffusers folder or a single original checkpoint."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    if source.single_file is not None:
        try:
            pipe = StableDiffusionInstructPix2PixPipeline.from_single_file(
                str(source.single_file), config=str(source.folder), local_files_only=True, torch_dtype=dtype,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise InputError(f"{source.single_file}: cannot load this checkpoint ({str(err).splitlines()[0]})") from None
        check_unet_channels(pipe.unet.config.in_channels, source.single_file)
        return pipe.unet, pipe.vae, pipe.text_encoder
    found = {name: source.weights(name) for name in WEIGHTED_COMPONENTS}  # all found (or named) before any loads
    return tuple(load_component(source, name, dtype, weights) for name, weights in found.items())


def check_compiler(device: torch.device) -> None:
    """torch.compile's CPU code is C++ built at run time: refuse up front where no compiler is installed."""
    if device.type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise InputError("compile on a CPU needs a C++ compiler (g++ or clang++) to build its kernels; "
                         "install one or run without compile")


def load(source: ModelSource, device: str = "cpu", dtype: str = "float32", kv_downsample: int = 1,
         compile: bool = False, keep_dtype: bool = False) -> TorchBackend:
    """A TorchBackend for a model on ``device`` in ``dtype`` ("float32", "float16" or "bfloat16"; on a CPU that
    only emulates the reduced precision, float32, which is faster there, with a warning).
    ``kv_downsample`` 2 or more trades exactness for speed (``set_kv_downsampling``); 1 is exact.
    ``compile`` runs the UNet through ``torch.compile`` (same results up to rounding, compiled per shape).
    ``keep_dtype`` runs ``dtype`` even where the CPU only emulates it (to reproduce its rounding, not for speed)."""
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if not isinstance(kv_downsample, int) or isinstance(kv_downsample, bool) or not 1 <= kv_downsample <= 8:
        raise InputError(f"kv_downsample must be a whole number from 1 (exact) to 8, got {kv_downsample!r}")
    if not isinstance(compile, bool):
        raise InputError(f"compile must be true or false, got {compile!r}")
    dev = parse_device(device)
    if dev.type == "cpu" and not keep_dtype:
        dtype, why = cpu_precision(dtype)
        if why:
            log.warning("%s (torch kernels: %s)", why, torch.backends.cpu.get_cpu_capability())
    if compile:
        check_compiler(dev)
    unet, vae, text_encoder = load_networks(source, DTYPES[dtype])
    return TorchBackend(wrap_components(unet, vae, text_encoder, kv_downsample), dev, DTYPES[dtype], compile)
