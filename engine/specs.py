"""Tensor names of every network, declared once.

The torch backend, the exporter, the TensorRT builder and the runtimes all read these specs, so a
component's inputs and outputs are called the same everywhere. Dimensions are symbolic names
(``B`` images per call, ``N`` UNet rows: 3B with guidance or B without, ``H``/``W`` latent height/width,
``HP``/``WP`` pixel height/width, ``D`` text width; ``LE``/``LD``/``G`` the VAE encoder's and decoder's GroupNorm
layers and their groups; ``FC``/``FH``/``FW`` the channels, height and width of the
step cache's deep feature) or integers. A ``Profile`` gives every symbol a
min/opt/max range; exporters, TensorRT profiles, buffer allocation and input checks all derive from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InputError

Range = tuple[int, int, int]  # min, opt, max


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
        TensorSpec("sample", "float32", ("N", 8, "H", "W")),  # [scaled noisy latents | image latents]
        TensorSpec("timestep", "float32", ("N",)),
        TensorSpec("encoder_hidden_states", "float32", ("N", 77, "D")),
    ),
    outputs=(TensorSpec("noise_pred", "float32", ("N", 4, "H", "W")),),
)

# A distilled student's UNet (``ip2p distill``): the guidance scales (s_T, s_I) of each row are an input, embedded
# into its time embedding, and one row per image stands for eq. 3's three.
UNET_GUIDED = ComponentSpec(
    name="unet_guided",
    inputs=UNET.inputs + (TensorSpec("guidance", "float32", ("N", 2)),),
    outputs=UNET.outputs,
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latents", "float32", ("B", 4, "H", "W")),),  # scaled, as the sampler produces them
    outputs=(TensorSpec("images", "float32", ("B", 3, "HP", "WP")),),  # RGB in [-1, 1]
)

COMPONENTS = {spec.name: spec for spec in (TEXT_ENCODER, VAE_ENCODER, UNET, VAE_DECODER)}
UNETS = {spec.name: spec for spec in (UNET, UNET_GUIDED)}  # a bundle holds one of them


def vae_tile(spec: ComponentSpec, layers: str) -> ComponentSpec:
    """The VAE network ``spec`` for one tile of a larger picture (``engine.tiling``): its ``layers`` GroupNorms
    normalise with the whole picture's statistics (``given_stats`` 1) or the tile's own (0), and report the
    count, mean and variance of the latent cells the tile owns (``owned`` 1), per layer, image and group."""
    return ComponentSpec(
        name=spec.name + "_tile",
        inputs=spec.inputs + (
            TensorSpec("norm_stats", "float32", (layers, "B", "G", 2)),  # mean, variance
            TensorSpec("owned", "float32", ("B", 1, "H", "W")),  # 1 on the latent cells the tile owns, else 0
            TensorSpec("given_stats", "float32", (1,)),
        ),
        outputs=spec.outputs + (TensorSpec("norm_parts", "float32", (layers, "B", "G", 3)),),  # count, mean, var
    )


VAE_ENCODER_TILE, VAE_DECODER_TILE = vae_tile(VAE_ENCODER, "LE"), vae_tile(VAE_DECODER, "LD")
# Bundles carry them in float32 whatever their precision: the statistics they gather overflow float16 sums.
TILE_COMPONENTS = {spec.name: spec for spec in (VAE_ENCODER_TILE, VAE_DECODER_TILE)}
DEEP_FEATURE = TensorSpec("deep_feature", "float32", ("N", "FC", "FH", "FW"))


def unet_split(depth: int) -> tuple[ComponentSpec, ComponentSpec]:
    """The UNet as two networks for step caching at ``depth`` (``engine.backends.unet_split``): the full
    one, which also returns the input of the ``depth`` outermost up levels, and the shallow one, which
    runs only those levels (and their down levels) on that feature from the last full call."""
    full = ComponentSpec(name=f"unet_full_d{depth}", inputs=UNET.inputs, outputs=UNET.outputs + (DEEP_FEATURE,))
    shallow = ComponentSpec(name=f"unet_shallow_d{depth}", inputs=UNET.inputs + (DEEP_FEATURE,), outputs=UNET.outputs)
    return full, shallow


def split_of(name: str) -> tuple[str, int] | None:
    """("full" or "shallow", depth) of a split UNet's component name; None for any other name."""
    kind, _, depth = name.rpartition("_d")
    if kind in ("unet_full", "unet_shallow") and depth.isdigit():
        return kind.removeprefix("unet_"), int(depth)
    return None


def component_spec(name: str) -> ComponentSpec:
    """The spec of any component a bundle or backend may hold, the split UNets included."""
    if name in COMPONENTS or name in TILE_COMPONENTS or name in UNETS:
        return COMPONENTS.get(name) or TILE_COMPONENTS.get(name) or UNETS[name]
    split = split_of(name)
    if split is None:
        raise KeyError(f"no component {name!r}")
    full, shallow = unet_split(split[1])
    return full if split[0] == "full" else shallow
# The float32 VAE decoder a backend may offer as a fallback when reduced precision overflows.
VAE_DECODER_FP32 = VAE_DECODER.name + "_fp32"


@dataclass(frozen=True)
class Profile:
    """Shapes a bundle accepts: images per call and pixel height/width, each (min, opt, max)."""

    batch: Range
    height: Range
    width: Range

    @property
    def static(self) -> bool:
        return all(r[0] == r[2] for r in (self.batch, self.height, self.width))

    def check(self, multiple: int) -> "Profile":
        """Raise InputError unless every range is ordered, positive and (for sides) a multiple of ``multiple``."""
        for name, (lo, opt, hi) in (("batch", self.batch), ("height", self.height), ("width", self.width)):
            if lo < 1 or not lo <= opt <= hi:
                raise InputError(f"{name} profile {lo}:{opt}:{hi} must satisfy 1 <= min <= opt <= max")
            if name != "batch" and any(v % multiple for v in (lo, opt, hi)):
                raise InputError(f"{name} profile {lo}:{opt}:{hi}: sides must be multiples of {multiple}")
        return self

    def dims(self, vae_factor: int, text_dim: int, feature: tuple[int, int] | None = None,
             norms: tuple[int, int, int] | None = None) -> dict[str, Range]:
        """Range of every symbolic dimension. UNet rows N run from B (no guidance) to 3B. ``feature``: (channels,
        downscale from the latent) of the step cache's deep feature, for bundles with the split UNet. ``norms``:
        the VAE encoder's and decoder's GroupNorm layers and groups, for the tile networks."""
        b = self.batch
        extra = {} if norms is None else {"LE": (norms[0],) * 3, "LD": (norms[1],) * 3, "G": (norms[2],) * 3}
        if feature is not None:
            channels, scale = feature
            extra |= {"FC": (channels,) * 3, "FH": tuple(v // vae_factor // scale for v in self.height),
                     "FW": tuple(v // vae_factor // scale for v in self.width)}
        return extra | {
            "B": b,
            "N": (b[0], 3 * b[1], 3 * b[2]),
            "HP": self.height,
            "WP": self.width,
            "H": tuple(v // vae_factor for v in self.height),
            "W": tuple(v // vae_factor for v in self.width),
            "D": (text_dim,) * 3,
        }

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        return cls(tuple(data["batch"]), tuple(data["height"]), tuple(data["width"]))


def shape_ranges(spec: ComponentSpec, dims: dict[str, Range]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min shape, opt shape, max shape) of every input and output of ``spec``."""
    out = {}
    for tensor in spec.inputs + spec.outputs:
        out[tensor.name] = tuple(
            tuple(d if isinstance(d, int) else dims[d][k] for d in tensor.dims) for k in range(3)
        )
    return out


def parse_range(text: str, what: str, default_opt: int | None = None) -> Range:
    """"4" -> (4, 4, 4); "1:4" -> (1, opt, 4) with opt = default_opt clamped into range (else min);
    "1:2:4" -> (1, 2, 4)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise InputError(f"{what} must look like 4, 1:4 or 1:2:4, got {text!r}") from None
    if len(parts) == 1:
        return (parts[0],) * 3
    if len(parts) == 2:
        lo, hi = parts
        opt = lo if default_opt is None else min(max(default_opt, lo), hi)
        if lo > hi:
            raise InputError(f"{what} range {text}: min exceeds max")
        return lo, opt, hi
    if len(parts) == 3:
        if not parts[0] <= parts[1] <= parts[2]:
            raise InputError(f"{what} range {text}: need min <= opt <= max")
        return parts[0], parts[1], parts[2]
    raise InputError(f"{what} must look like 4, 1:4 or 1:2:4, got {text!r}")
