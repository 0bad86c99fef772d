"""Step caching (DeepCache, Ma et al. 2023, arXiv 2312.00858): the UNet's deep features change slowly from
step to step, so most calls can reuse the last full call's and run only the outer levels.

``StepCache`` says which UNet calls run the whole network; ``FeatureCache`` keeps the deep feature of the
last full call per UNet row (image and guidance branch), so a call whose rows differ from it (a branch
dropped by adaptive guidance) takes just the rows it needs; a call needing rows it lacks (a guidance
interval starting) runs the whole UNet. Array-agnostic, like the guidance policies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from engine.errors import InputError
from engine.specs import UNET, unet_split

Row = tuple[int, int]  # (image index, guidance branch)


@dataclass(frozen=True)
class StepCache:
    """Every ``interval``-th UNet call (the first included) runs the whole UNet; the others only its
    ``depth`` outermost levels on the cached deep feature. ``interval`` 1 is off (exact)."""

    interval: int = 1
    depth: int = 1

    def __post_init__(self) -> None:
        for name in ("interval", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"step cache {name} must be a whole number of at least 1, got {value!r}")

    @property
    def on(self) -> bool:
        return self.interval > 1

    def full(self, call: int) -> bool:
        """Whether UNet call ``call`` (0, 1, ...) of an edit runs the whole network."""
        return call % self.interval == 0

    @property
    def components(self) -> tuple[str, str]:
        """(full, shallow) component names; the plain UNet's twice when off."""
        if not self.on:
            return UNET.name, UNET.name
        full, shallow = unet_split(self.depth)
        return full.name, shallow.name


class FeatureCache:
    """The deep feature (N, C, h, w) of the last full call, with the (image, branch) of each row."""

    def __init__(self, concat: Callable[[Sequence[Any]], Any]):
        self._concat = concat
        self._rows: list[Row] = []
        self._feature: Any = None

    def store(self, rows: list[Row], feature: Any) -> None:
        self._rows, self._feature = list(rows), feature

    def covers(self, rows: list[Row]) -> bool:
        return set(rows) <= set(self._rows)

    def take(self, rows: list[Row]) -> Any:
        """The cached feature of ``rows`` (all covered), in that order: the cached array itself when they
        are its rows."""
        if rows == self._rows:
            return self._feature
        index = {row: i for i, row in enumerate(self._rows)}
        return self._concat([self._feature[index[row] : index[row] + 1] for row in rows])
