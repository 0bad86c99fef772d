"""The diffusers/transformers networks as modules named and shaped by ``engine.specs``: wrappers, token
downsampling, the UNet's step-caching halves, loading and MAC counting.

``export/`` traces these modules to ONNX and ``torch_backend`` runs them, so both run the same graph.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine import specs
from engine.backends import unet_split
from engine.checkpoints import WEIGHTED_COMPONENTS, ModelSource, Weights
from engine.config import check_unet_channels
from engine.errors import InputError, quote_error


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


class TileContext:
    """What the GroupNorms of one tile call share: the inputs they read and the statistics they report."""

    def __init__(self):
        self.stats: torch.Tensor | None = None  # (L, B, G, 2): mean, variance
        self.owned: torch.Tensor | None = None  # (B, 1, h, w) on the latent grid
        self.given: torch.Tensor | None = None  # (1,): 1 normalise with ``stats``, 0 with the tile's own
        self.parts: dict[int, torch.Tensor] = {}  # layer -> (B, G, 3): count, mean, variance of the owned cells
        self.boxes: list[tuple[int, int, int, int]] | None = None  # ``owned`` as rectangles, where it is (eager)


def owned_boxes(owned: torch.Tensor) -> list[tuple[int, int, int, int]] | None:
    """Each row's owned cells as a rectangle (top, bottom, left, right) on the latent grid, or None where one is
    no rectangle (``engine.vae_tiles`` always gives rectangles; anything else takes the graph's masked path)."""
    boxes = []
    for mask in owned[:, 0] > 0:
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        if not len(rows):
            return None
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if bottom - top != len(rows) or right - left != len(cols) or int(mask.sum()) != len(rows) * len(cols):
            return None
        boxes.append((top, bottom, left, right))
    return boxes


class TileNorm(nn.Module):
    """A VAE GroupNorm running on one tile: normalises with the whole picture's statistics (or the tile's own),
    and reports the statistics of the cells its tile owns, so that the tiles of a picture together give the
    whole picture's. A (B, C, N) input (the VAE's attention) lies on the latent grid."""

    def __init__(self, norm: nn.GroupNorm, context: TileContext, layer: int):
        super().__init__()
        self.norm, self.context, self.layer = norm, context, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, norm = self.context, self.norm
        owned = ctx.owned
        grid = x if x.ndim == 4 else x.reshape(*x.shape[:2], *owned.shape[-2:])
        b, c, h, w = grid.shape
        if ctx.boxes is not None and h % owned.shape[-2] == 0 and w % owned.shape[-1] == 0:
            return self._eager(grid).reshape(x.shape)
        values = grid.float().reshape(b, norm.num_groups, -1, h, w)  # (B, G, C/G, h, w)
        mask = F.interpolate(owned.float(), size=(h, w), mode="nearest")[:, :, None]  # (B, 1, 1, h, w)
        count = mask.sum((2, 3, 4)) * values.shape[2]  # (B, 1)
        mean = (values * mask).sum((2, 3, 4)) / count  # (B, G)
        var = (((values - mean[..., None, None, None]) * mask) ** 2).sum((2, 3, 4)) / count
        ctx.parts[self.layer] = torch.stack([count.expand_as(mean), mean, var], -1)
        given, stats = ctx.given.float(), ctx.stats[self.layer].float()  # (1,), (B, G, 2)
        mean = given * stats[..., 0] + (1 - given) * values.mean((2, 3, 4))
        var = given * stats[..., 1] + (1 - given) * values.var((2, 3, 4), unbiased=False)
        normed = (values - mean[..., None, None, None]) * torch.rsqrt(var + norm.eps)[..., None, None, None]
        out = normed.reshape(b, c, h, w) * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]
        return out.to(x.dtype).reshape(x.shape)

    def _eager(self, grid: torch.Tensor) -> torch.Tensor:
        """The same in fused kernels, for eager torch: the owned cells are rectangles (sliced, not masked), the
        normalisation one GroupNorm (the tile's own statistics) or one batch norm over the rows' channels (given
        statistics). Three times faster than the masked graph on a CPU, which is what an export traces."""
        ctx, norm = self.context, self.norm
        b, c, h, w = grid.shape
        scale_h, scale_w = h // ctx.owned.shape[-2], w // ctx.owned.shape[-1]
        parts = []
        for row, (top, bottom, left, right) in zip(grid, ctx.boxes):
            cells = row[:, top * scale_h : bottom * scale_h, left * scale_w : right * scale_w].float()
            var, mean = torch.var_mean(cells.reshape(norm.num_groups, -1), dim=1, unbiased=False)
            parts.append(torch.stack([torch.full_like(mean, cells[0].numel() * (c // norm.num_groups)), mean, var], -1))
        ctx.parts[self.layer] = torch.stack(parts)
        if not bool(ctx.given):
            return norm(grid)
        stats = ctx.stats[self.layer].float().repeat_interleave(c // norm.num_groups, 1)  # (B, C, 2)
        return F.batch_norm(grid.reshape(1, b * c, h, w), stats[..., 0].reshape(-1), stats[..., 1].reshape(-1),
                            norm.weight.float().repeat(b), norm.bias.float().repeat(b), False, 0.0, norm.eps
                            ).reshape(b, c, h, w)


class VaeTile(nn.Module):
    """A VAE network (``VaeEncoder`` or ``VaeDecoder``) for one tile (``engine.specs.vae_tile``): the same weights,
    its GroupNorms replaced by ``TileNorm``s, numbered in module order."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.context = TileContext()
        shared = {id(t): t for t in list(network.parameters()) + list(network.buffers())}
        self.network = copy.deepcopy(network, shared)  # the modules copied, the weights shared
        norms = [(parent, name) for parent in self.network.modules() for name, child in parent.named_children()
                 if isinstance(child, nn.GroupNorm)]
        for layer, (parent, name) in enumerate(norms):
            setattr(parent, name, TileNorm(getattr(parent, name), self.context, layer))
        self.layers = len(norms)

    def run_tile(self, x: torch.Tensor, norm_stats: torch.Tensor, owned: torch.Tensor,
                 given_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.context
        ctx.stats, ctx.owned, ctx.given, ctx.parts = norm_stats, owned, given_stats, {}
        tracing = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        ctx.boxes = None if tracing else owned_boxes(owned)
        out = self.network(x)
        parts = torch.stack([ctx.parts[layer] for layer in range(self.layers)])  # (L, B, G, 3)
        ctx.stats = ctx.owned = ctx.given = ctx.boxes = None
        return out, parts


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


SCALE_EMBEDDING_FACTOR = 1000.0  # a scale is multiplied by this before its sines, as LCM embeds its one scale


def scale_embedding(scales: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, 2) guidance scales (s_T, s_I) -> (N, 2 * dim): each scale's ``dim`` sinusoidal features (half sines,
    half cosines, frequencies from 1 down to 1/10000), the two side by side: what a student's UNet takes as
    ``timestep_cond`` (Luo et al. 2023 embed their single guidance scale this way)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=scales.device) * (-math.log(10000.0) / max(half - 1, 1)))
    angles = scales.float()[..., None] * SCALE_EMBEDDING_FACTOR * freqs  # (N, 2, half)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(1)  # flatten: an export keeps N symbolic


class GuidedUNet(UNet):
    """A distilled student's UNet (``specs.UNET_GUIDED``): also guidance (N, 2), each row's (s_T, s_I), embedded
    and added to the time embedding through diffusers' ``timestep_cond`` -> its guided noise_pred (N, 4, H, W)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                guidance: torch.Tensor) -> torch.Tensor:
        kwargs = {"latent_size": tuple(sample.shape[-2:])} if self.kv_downsample > 1 else None
        cond = scale_embedding(guidance, self.unet.config.time_cond_proj_dim // 2).to(sample.dtype)
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=cond, cross_attention_kwargs=kwargs,
                         return_dict=False)[0]


def wrap_components(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, kv_downsample: int = 1) -> dict[str, nn.Module]:
    """The spec-named modules of one InstructPix2Pix model (a student's UNet, one that takes a time condition:
    ``unet_guided``)."""
    guided = bool(getattr(unet.config, "time_cond_proj_dim", None))
    wrapper = (GuidedUNet if guided else UNet)(unet, kv_downsample).eval()
    return {
        specs.TEXT_ENCODER.name: TextEncoder(text_encoder).eval(),
        specs.VAE_ENCODER.name: VaeEncoder(vae).eval(),
        (specs.UNET_GUIDED if guided else specs.UNET).name: wrapper,
        specs.VAE_DECODER.name: VaeDecoder(vae).eval(),
    }


class VaeEncoderTile(VaeTile):
    """images (B, 3, 8H, 8W), norm_stats (LE, B, G, 2), owned (B, 1, H, W), given_stats (1,) -> image_latents
    (B, 4, H, W), norm_parts (LE, B, G, 3)."""

    def forward(self, images, norm_stats, owned, given_stats):
        return self.run_tile(images, norm_stats, owned, given_stats)


class VaeDecoderTile(VaeTile):
    """latents (B, 4, H, W), norm_stats (LD, B, G, 2), owned (B, 1, H, W), given_stats (1,) -> images
    (B, 3, 8H, 8W), norm_parts (LD, B, G, 3)."""

    def forward(self, latents, norm_stats, owned, given_stats):
        return self.run_tile(latents, norm_stats, owned, given_stats)


def tile_module(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The tile network ``name`` (``vae_encoder_tile``/``vae_decoder_tile``) made from ``modules``' own VAE
    network, sharing its weights; None for any other name."""
    kinds = {specs.VAE_ENCODER_TILE.name: (VaeEncoderTile, specs.VAE_ENCODER.name),
             specs.VAE_DECODER_TILE.name: (VaeDecoderTile, specs.VAE_DECODER.name)}
    if name not in kinds:
        return None
    cls, network = kinds[name]
    return cls(modules[network]).eval()


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
            raise InputError(f"{source.single_file}: cannot load this checkpoint ({quote_error(err)})") from None
        check_unet_channels(pipe.unet.config.in_channels, source.single_file)
        return pipe.unet, pipe.vae, pipe.text_encoder
    found = {name: source.weights(name) for name in WEIGHTED_COMPONENTS}  # all found (or named) before any loads
    return tuple(load_component(source, name, dtype, weights) for name, weights in found.items())
