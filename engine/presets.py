"""Named combinations of the ways an edit does less work, chosen from measurements (docs/savings.md).

``exact`` is the default: the pictures of the full three-branch edit, at no more UNet rows than eq. 3
weights. The others trade a measured amount of edit quality for less UNet work. Their thresholds were
tuned on the shipped shapes model and may not transfer to photo models: check your own edits.
"""
from __future__ import annotations

import dataclasses

from engine.caching import StepCache
from engine.config import EditConfig, Student
from engine.errors import InputError
from engine.guidance import GuidanceOptions

PRESETS: dict[str, dict] = {
    "exact": {},  # 20 euler_ancestral steps, all that eq. 3 weights: 60 UNet rows per edit at s_T 7.5, s_I 1.5
    # adaptive guidance only: 26.2 rows per edit on the shapes model, success within 1 point of exact
    "balanced": {"guidance": GuidanceOptions(adaptive_threshold=0.99)},
    # 8 deterministic Euler steps and an earlier adaptive cut: 11.9 rows per edit, success within 1.7 points (on
    # this model Euler keeps its quality at 8 steps where Euler-ancestral, DPM++ and UniPC lose 5-30 points)
    "fast": {"steps": 8, "sampler": "euler", "guidance": GuidanceOptions(adaptive_threshold=0.9)},
}


def preset_config(preset: str = "exact", fixed: dict | None = None, student: Student | None = None,
                  **settings) -> EditConfig:
    """The EditConfig of ``preset``, with every setting given (not None) taking precedence over it, and the
    fields no preset sets (``fixed``: resolution, keep_size, output_type) as given. For a distilled ``student``
    (``ModelConfig.student``) a preset is its sampler at the step count it names for that preset, at its default
    scales: a student has one UNet row a step and no branches to save."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset]) if student is None else {
        "steps": student.preset_steps(preset), "sampler": student.sampler,
        "text_guidance": student.scales[0], "image_guidance": student.scales[1]}
    guidance = values.pop("guidance", GuidanceOptions())
    interval, adaptive = settings.pop("guidance_interval", None), settings.pop("adaptive_guidance", None)
    if interval is not None or adaptive is not None:
        guidance = dataclasses.replace(guidance, **{k: v for k, v in (("interval", interval),
                                                                       ("adaptive_threshold", adaptive)) if v is not None})
    cache = values.pop("step_cache", StepCache())
    interval, depth = settings.pop("cache_interval", None), settings.pop("cache_depth", None)
    if interval is not None or depth is not None:
        cache = StepCache(cache.interval if interval is None else interval, cache.depth if depth is None else depth)
    values.update({k: v for k, v in settings.items() if v is not None})
    return EditConfig(**values, **(fixed or {}), guidance=guidance, step_cache=cache)
