"""Three-way classifier-free guidance (Brooks et al. 2022, eq. 3), and the policies that decide, step by step
and image by image, which of its three UNet branches to evaluate.

Eq. 3, eps = e_u + s_T (e_c - e_i) + s_I (e_i - e_u), is the weighted sum
eps = s_T e_c + (s_I - s_T) e_i + (1 - s_I) e_u, branches (instruction, image), ("", image),
("", zero image latent). A branch whose weight is 0 needs no UNet rows (exact): with s_I = 1 the third,
with s_T = s_I the second, with both 1 only the first. The approximate policies drop a branch once its
term stops mattering and stand in a kept branch for it:

- the guidance interval (Kynkaanniemi et al. 2024, arXiv 2404.07724) guides only for sigma in (lo, hi];
  outside it eps = e_c;
- adaptive guidance (Castillo et al. 2023, arXiv 2312.12487), extended to three branches: once
  cos(e_i, e_u) passes a threshold, e_u is taken as e_i (the image term s_I (e_i - e_u) is spent) and
  the ("", zero) rows stop; once cos(e_c, e_i) passes it, e_i is taken as e_c and the ("", image) rows
  stop. Per image: one image's decision never changes another's rows.

Array-agnostic: the combination works on torch tensors and numpy arrays alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from engine.errors import InputError

COND, IMAGE, UNCOND = 0, 1, 2  # branch indices, in the order of the batched UNet call
BRANCHES = 3
ALL = (COND, IMAGE, UNCOND)


def branch_weights(text_scale: float, image_scale: float) -> tuple[float, float, float]:
    """The weights of (e_c, e_i, e_u) in eq. 3: (s_T, s_I - s_T, 1 - s_I); they sum to 1."""
    return (float(text_scale), float(image_scale) - float(text_scale), 1.0 - float(image_scale))


def needed_branches(text_scale: float, image_scale: float) -> tuple[int, ...]:
    """The branches with a non-zero weight: all that eq. 3 needs, exactly."""
    return tuple(k for k, w in enumerate(branch_weights(text_scale, image_scale)) if w != 0)


def combine_guidance(eps_cond: Any, eps_image: Any, eps_uncond: Any, text_scale: float, image_scale: float) -> Any:
    """eps_uncond + s_T (eps_cond - eps_image) + s_I (eps_image - eps_uncond), Brooks et al. eq. 3."""
    return eps_uncond + text_scale * (eps_cond - eps_image) + image_scale * (eps_image - eps_uncond)


def combine(outputs: dict[int, Any], weights: Sequence[float]) -> Any:
    """Eq. 3 from the branches evaluated: all three as written; otherwise the weighted sum over those given,
    a missing branch standing for itself only where its weight is 0 (checked by the plans)."""
    if len(outputs) == BRANCHES:
        s_t, s_i = weights[COND], weights[COND] + weights[IMAGE]
        return combine_guidance(outputs[COND], outputs[IMAGE], outputs[UNCOND], s_t, s_i)
    total = None
    for k, out in outputs.items():
        if weights[k] != 0:
            total = out * weights[k] if total is None else total + out * weights[k]
    return total


def substitute(branches: tuple[int, ...], weights: Sequence[float]) -> tuple[float, float, float]:
    """Weights over the evaluated ``branches`` after standing e_c in for a missing e_i, and e_i (or e_c)
    for a missing e_u: the approximation of the adaptive policy and the interval."""
    w = list(weights)
    if UNCOND not in branches:
        w[IMAGE if IMAGE in branches else COND] += w[UNCOND]
        w[UNCOND] = 0.0
    if IMAGE not in branches:
        w[COND] += w[IMAGE]
        w[IMAGE] = 0.0
    return (w[0], w[1], w[2])


@dataclass(frozen=True)
class GuidanceOptions:
    """How much of eq. 3 to evaluate. The defaults are exact; every other setting is an approximation.

    ``interval``: guide only for sigma in (lo, hi] (None: always); ``adaptive_threshold``: the cosine
    similarity past which a branch's term counts as converged and its rows stop (None: never)."""

    interval: tuple[float, float] | None = None
    adaptive_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.interval is not None:
            lo, hi = self.interval
            if not 0 <= lo < hi:
                raise InputError(f"guidance interval must be (lo, hi] with 0 <= lo < hi, got {self.interval}")
        if self.adaptive_threshold is not None and not 0 < self.adaptive_threshold <= 1:
            raise InputError(f"adaptive guidance threshold must be in (0, 1], got {self.adaptive_threshold}")

    @property
    def exact(self) -> bool:
        return self.interval is None and self.adaptive_threshold is None


class GuidancePlan:
    """Per image, which branches each step evaluates, and with what weights they combine. The scales are one
    for all images or one per image (a server's batch of requests, each with its own).

    ``branches(sigma)`` is asked before each UNet call; ``observe(outputs)`` after it, with each image's
    evaluated branch outputs as numpy arrays (used by the adaptive rule only). ``drop(images)`` stops every
    row of images no longer wanted (a server's cancelled requests): they evaluate no branch from then on."""

    def __init__(self, count: int, text_scale: float | Sequence[float], image_scale: float | Sequence[float],
                 options: GuidanceOptions = GuidanceOptions(), distilled: bool = False):
        """``distilled``: the UNet takes the scales as input (a student of ``ip2p distill``): its one row per image,
        the (instruction, image) row, is eq. 3's result already."""
        texts, images = scales_per_image(text_scale, count, "text"), scales_per_image(image_scale, count, "image")
        self.options = options
        if distilled:
            self._weights, self._needed = [(1.0, 0.0, 0.0)] * count, [(COND,)] * count
        else:
            self._weights = [branch_weights(t, i) for t, i in zip(texts, images)]  # per image: its own scales
            self._needed = [needed_branches(t, i) for t, i in zip(texts, images)]
        self.needed = tuple(k for k in ALL if any(k in n for n in self._needed))  # branches some image needs
        self._dropped: list[set[int]] = [set() for _ in range(count)]  # adaptive: converged branches per image
        self.gone: set[int] = set()  # images dropped whole

    def drop(self, images: Iterable[int]) -> None:
        """Evaluate nothing more for ``images``."""
        self.gone.update(images)

    def branches(self, sigma: float) -> list[tuple[int, ...]]:
        """The branches each image evaluates at this step (none for a dropped image)."""
        interval = self.options.interval
        if interval is not None and not interval[0] < sigma <= interval[1]:
            wanted = [(COND,)] * len(self._dropped)
        else:
            wanted = [tuple(k for k in needed if k not in dropped)
                      for needed, dropped in zip(self._needed, self._dropped)]
        return [() if i in self.gone else b for i, b in enumerate(wanted)]

    def most_rows(self) -> int:
        """UNet rows any later step of this plan can ask for: each image's exact branches less those the adaptive
        rule has stopped (for good; a guidance interval only ever brings back branches among the rest)."""
        return sum(len(set(needed) - dropped) for i, (needed, dropped) in enumerate(zip(self._needed, self._dropped))
                   if i not in self.gone)

    def watching(self, branches: list[tuple[int, ...]]) -> bool:
        """Whether the adaptive rule needs this step's outputs: it is on and some image can still drop a branch."""
        return self.options.adaptive_threshold is not None and any(len(b) > 1 for b in branches)

    def weights_for(self, branches: tuple[int, ...], image: int = 0) -> tuple[float, float, float]:
        """The weights that combine ``branches`` for ``image``: eq. 3's where they are all it needs."""
        weights = self._weights[image]
        return weights if set(self._needed[image]) <= set(branches) else substitute(branches, weights)

    def groups(self, sigma: float) -> "Groups":
        """This step's images grouped by the branches they evaluate and the weights that combine them."""
        branches = self.branches(sigma)
        return group_images(branches, [(b, self.weights_for(b, i)) for i, b in enumerate(branches)])

    def observe(self, outputs: list[dict[int, np.ndarray]]) -> None:
        """Adaptive guidance: stop a branch of an image once its term has converged (cosine >= threshold)."""
        threshold = self.options.adaptive_threshold
        if threshold is None:
            return
        for dropped, out in zip(self._dropped, outputs):
            if IMAGE in out and UNCOND in out and cosine(out[IMAGE], out[UNCOND]) >= threshold:
                dropped.add(UNCOND)
            if COND in out and IMAGE in out and cosine(out[COND], out[IMAGE]) >= threshold:
                dropped.add(IMAGE)
                dropped.add(UNCOND)  # e_u without e_i would stand in for nothing: the text term is spent too
            if COND in out and UNCOND in out and IMAGE not in out and cosine(out[COND], out[UNCOND]) >= threshold:
                dropped.add(UNCOND)  # s_T = s_I: eq. 3 is two-way, as in the original adaptive guidance


def scales_per_image(scale: float | Sequence[float], count: int, name: str) -> list[float]:
    if isinstance(scale, (int, float)):
        return [float(scale)] * count
    scales = [float(v) for v in scale]
    if len(scales) != count:
        raise InputError(f"give one {name} guidance scale, or one per image: got {len(scales)} for {count} images")
    return scales


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


Groups = list[tuple[list[int], tuple[int, ...]]]  # (image indices, the branches they evaluate), in call order
RowsUNet = Callable[[Any, float, Groups], list[dict[int, Any]]]  # -> per group {branch: (len(indices), 4, h, w)}


def group_images(branches: list[tuple[int, ...]], keys: Sequence[Any] | None = None) -> Groups:
    """Images that evaluate the same branches (and share ``keys``, when given), together, first appearance
    first: one group when all agree."""
    groups: dict[Any, tuple[list[int], tuple[int, ...]]] = {}
    for i, b in enumerate(branches):
        groups.setdefault(b if keys is None else keys[i], ([], b))[0].append(i)
    return list(groups.values())


class GuidedStep:
    """``D(x, sigma)`` of eq. 3 in two halves, so that one loop can put many edits' UNet rows in one call:
    ``request`` is the UNet input, timestep and row groups ``plan`` asks for at this step, ``denoised`` the
    prediction made from their outputs.

    ``x`` is in k-diffusion's parametrisation (x0 + sigma * eps); the UNet sees x / sqrt(sigma^2 + 1).
    ``concat`` joins arrays along the batch; ``to_numpy`` brings outputs to the host for the adaptive rule, only
    on the steps it still watches."""

    def __init__(self, plan: GuidancePlan, timestep_of: Callable[[float], float], concat: Callable[[list[Any]], Any],
                 prediction_type: str = "epsilon", to_numpy: Callable[[Any], np.ndarray] = np.asarray):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.plan, self.timestep_of, self.concat = plan, timestep_of, concat
        self.prediction_type, self.to_numpy = prediction_type, to_numpy

    def request(self, x: Any, sigma: float) -> tuple[Any, float, Groups]:
        """(the UNet's scaled input (B, 4, h, w), its timestep, the images grouped by the branches they evaluate)."""
        return x * (1.0 / (sigma**2 + 1) ** 0.5), self.timestep_of(sigma), self.plan.groups(sigma)

    def denoised(self, x: Any, sigma: float, groups: Groups, outputs: list[dict[int, Any]]) -> Any:
        """D(x, sigma) (B, 4, h, w) from the UNet's ``outputs`` per group; the adaptive rule observes them."""
        plan = self.plan
        if plan.watching([b for _, b in groups]):
            plan.observe(_per_image(groups, outputs, self.to_numpy, x.shape[0]))
        parts = [combine(out, plan.weights_for(b, indices[0])) if b else x[indices] * 0  # dropped: no prediction
                 for (indices, b), out in zip(groups, outputs)]
        if len(parts) == 1:
            out = parts[0]  # (B, 4, h, w), images in order
        else:
            order = np.argsort(np.concatenate([indices for indices, _ in groups]), kind="stable")
            out = self.concat(parts)[order.tolist()]
        if self.prediction_type == "epsilon":
            return x - out * sigma
        c_in = 1.0 / (sigma**2 + 1) ** 0.5
        return x * (c_in * c_in) - out * (sigma * c_in)  # v-prediction (Salimans & Ho 2022)


def guided_denoiser(
    unet: RowsUNet,
    timestep_of: Callable[[float], float],
    plan: GuidancePlan,
    concat: Callable[[list[Any]], Any],
    prediction_type: str = "epsilon",
    to_numpy: Callable[[Any], np.ndarray] = np.asarray,
) -> Callable[[Any, float], Any]:
    """Turn ``unet(scaled_x, t, groups) -> per group {branch: output}`` into ``D(x, sigma)`` (``GuidedStep``'s
    halves around one call)."""
    step = GuidedStep(plan, timestep_of, concat, prediction_type, to_numpy)

    def denoise(x: Any, sigma: float) -> Any:
        scaled, t, groups = step.request(x, sigma)
        return step.denoised(x, sigma, groups, unet(scaled, t, groups))

    return denoise


def _per_image(groups: Groups, outputs: list[dict[int, Any]], to_numpy, count: int) -> list[dict[int, np.ndarray]]:
    per_image: list[dict[int, np.ndarray]] = [{} for _ in range(count)]
    for (indices, _), out in zip(groups, outputs):
        for k, value in out.items():
            host = to_numpy(value)
            for j, i in enumerate(indices):
                per_image[i][k] = host[j]
    return per_image
