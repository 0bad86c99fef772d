"""Tile boxes and blending (engine/tiling.py): pure arithmetic, checked on numpy arrays."""
import numpy as np
import pytest

from engine.errors import InputError
from engine.tiling import Tiling, blend, combine_statistics, owned, ramp


@pytest.mark.parametrize("length", [16, 17, 40, 64, 100, 257])
def test_spans_cover_the_side_with_equal_tiles_overlapping_at_least_as_asked(length):
    tiling = Tiling(tile=16, overlap=4)
    spans = tiling.spans(length)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert {stop - start for start, stop in spans} == {min(16, length)}  # one static tile shape
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        assert stop - start >= 4
    assert len(spans) == len(set(spans)) == tiling.count(length, 1)


def test_a_side_that_fits_is_one_tile_of_its_own_size():
    assert Tiling(64, 16).spans(40) == [(0, 40)]


@pytest.mark.parametrize("tile, overlap", [(0, 0), (8, 8), (8, -1)])
def test_a_tiling_that_cannot_work_is_refused(tile, overlap):
    with pytest.raises(InputError, match="tile"):
        Tiling(tile, overlap)


def test_ramps_rise_across_overlaps_skip_the_margin_and_sum_to_one():
    spans = Tiling(16, 8).spans(40)
    weights = [ramp(span, spans, scale=2, margin=2) for span in spans]
    total = np.zeros(80)
    for (start, stop), w in zip(spans, weights):
        assert w.shape == ((stop - start) * 2,) and w.min() >= 0 and 0.5 < w.max() <= 1
        total[start * 2 : stop * 2] += w
    assert weights[0][0] == 1 and weights[-1][-1] == 1  # the picture's own edges keep full weight
    assert weights[1][:4].max() == 0  # the margin: where a tile lacks its neighbour's context
    assert total.min() > 0


def test_blending_a_pointwise_map_gives_the_whole_picture_back():
    x = np.random.default_rng(0).normal(size=(2, 3, 40, 56)).astype(np.float32)
    calls = []

    def double_upsample(tiles, boxes):  # a map whose tiles agree wherever they overlap
        calls.append(len(tiles))
        return [np.repeat(np.repeat(2 * t, 4, axis=2), 4, axis=3) for t in tiles]

    out = blend(double_upsample, x, Tiling(16, 4), in_scale=1, out_scale=4, out_channels=3, per_call=3, margin=1)
    np.testing.assert_allclose(out, np.repeat(np.repeat(2 * x, 4, axis=2), 4, axis=3), rtol=1e-6)
    assert sum(calls) == Tiling(16, 4).count(40, 56) and max(calls) == 3


def test_blending_downscales_when_the_input_grid_is_finer():
    x = np.arange(2 * 64 * 64, dtype=np.float32).reshape(1, 2, 64, 64)
    out = blend(lambda tiles, boxes: [t[:, :, ::4, ::4] for t in tiles], x, Tiling(8, 2), in_scale=4, out_scale=1,
                out_channels=2)
    np.testing.assert_allclose(out, x[:, :, ::4, ::4], rtol=1e-6)


def test_owned_cells_partition_the_side():
    spans = Tiling(16, 6).spans(50)
    flags = np.zeros(50)
    for span in spans:
        flags[span[0] : span[1]] += owned(span, spans)
    np.testing.assert_array_equal(flags, 1)


def test_statistics_of_owned_parts_combine_to_the_whole():
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 2.0, size=(2, 5, 4, 90))  # (L, B, G, cells)
    cuts = [0, 7, 40, 41, 90]
    parts = [np.stack([np.full(values.shape[:3], b - a), values[..., a:b].mean(-1), values[..., a:b].var(-1)], -1)
             for a, b in zip(cuts, cuts[1:])]
    whole = combine_statistics(parts)
    np.testing.assert_allclose(whole[..., 0], values.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(whole[..., 1], values.var(-1), rtol=1e-4)
