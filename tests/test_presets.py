import pytest

from engine.errors import InputError
from engine.presets import PRESETS, preset_config


def test_presets_are_documented_combinations_and_settings_override_them():
    assert list(PRESETS) == ["exact", "balanced", "fast"]
    exact = preset_config("exact")
    assert exact.steps == 20 and exact.sampler == "euler_ancestral" and exact.guidance.exact
    fast = preset_config("fast")
    assert (fast.steps, fast.sampler, fast.guidance.adaptive_threshold) == (8, "euler", 0.9)
    assert preset_config("balanced").guidance.adaptive_threshold == 0.99 and preset_config("balanced").steps == 20
    mine = preset_config("fast", {"resolution": None}, steps=12, adaptive_guidance=0.95, sampler="euler_ancestral")
    assert (mine.steps, mine.guidance.adaptive_threshold, mine.resolution, mine.sampler) == (12, 0.95, None,
                                                                                              "euler_ancestral")
    assert preset_config("fast", sampler=None).sampler == "euler"  # None: the preset's
    assert preset_config("exact", guidance_interval=(1.0, 5.0)).guidance.interval == (1.0, 5.0)
    with pytest.raises(InputError, match="unknown preset 'turbo'; choose from exact, balanced, fast"):
        preset_config("turbo")


def test_a_preset_runs_and_does_less_work(tiny_pipe):
    import numpy as np

    image = np.zeros((32, 32, 3), np.uint8)
    exact = tiny_pipe.edit(image, "x", seed=0, resolution=None)
    fast = tiny_pipe.edit(image, "x", preset="fast", seed=0, resolution=None)
    assert exact.unet_evaluations == [60] and fast.unet_evaluations[0] <= 30
