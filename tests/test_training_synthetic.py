import json

import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError
from training.data import PairedData
from training.synthetic import PALETTE, generate


def test_generated_pairs_have_exact_ground_truth(tmp_path):
    out = generate(tmp_path / "shapes", count=60, seed=1)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and {r["truth"]["edit"] for r in rows} == {"recolour", "background", "remove"}
    assert len({r["edit_prompt"].split(" the ")[0] for r in rows}) > 4  # several phrasings
    for row in rows:
        before = np.asarray(Image.open(out / row["input_image"]))
        after = np.asarray(Image.open(out / row["edited_image"]))
        truth = row["truth"]
        if truth["edit"] == "background":
            assert tuple(after[0, 0]) == PALETTE[truth["colour"]] and truth["colour"] in row["edit_prompt"]
        elif truth["edit"] == "recolour":
            left, top, right, bottom = truth["box"]
            centre = after[(top + bottom) // 2 + 2, (left + right) // 2]
            assert tuple(centre) == PALETTE[truth["colour"]] and truth["shape"] in row["edit_prompt"]
            assert tuple(after[0, 0]) == tuple(before[0, 0])
        else:
            left, top, right, bottom = truth["box"]
            assert tuple(after[(top + bottom) // 2 + 2, (left + right) // 2]) == tuple(before[0, 0])
    assert len(PairedData(out, 32)) == 60


def test_same_seed_same_data_and_no_overwrite(tmp_path):
    a = generate(tmp_path / "a", 5, seed=3)
    b = generate(tmp_path / "b", 5, seed=3)
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    with pytest.raises(InputError, match="already holds"):
        generate(a, 5)


def _shape_counts(out) -> list[int]:
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    # flat colours: distinct colours = background + one per shape
    return [len(np.unique(np.asarray(Image.open(out / r["input_image"]).convert("RGB")).reshape(-1, 3), axis=0)) - 1
            for r in rows]


def test_shape_weights_set_how_many_scenes_hold_one_two_or_three_shapes(tmp_path):
    assert set(_shape_counts(generate(tmp_path / "three", 20, seed=2, shape_weights=(0, 0, 1), progress=False))) == {3}
    counts = np.bincount(_shape_counts(generate(tmp_path / "mix", 300, seed=2, shape_weights=(1, 2, 3),
                                                progress=False)), minlength=4)[1:]
    assert abs(counts[0] / 300 - 1 / 6) < 0.07 and abs(counts[2] / 300 - 1 / 2) < 0.08, counts
    with pytest.raises(InputError, match="shape_weights must be 3 weights"):
        generate(tmp_path / "bad", count=3, shape_weights=(1, -1, 1))


def _edits(out) -> list[str]:
    return [json.loads(line)["truth"]["edit"] for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_edit_weights_set_the_shares_of_recolouring_background_and_removal(tmp_path):
    assert set(_edits(generate(tmp_path / "recolour", 20, seed=2, edit_weights=(1, 0, 0), progress=False))) == {"recolour"}
    busy = generate(tmp_path / "remove", 20, seed=2, shape_weights=(0, 1, 1), edit_weights=(0, 0, 1), progress=False)
    assert set(_edits(busy)) == {"remove"}
    # removal needs two shapes: scenes of one shape fall back to the other two edits, evenly when both weigh 0
    assert set(_edits(generate(tmp_path / "one", 30, seed=2, shape_weights=(1, 0, 0), edit_weights=(0, 0, 1),
                               progress=False))) == {"recolour", "background"}
    edits = _edits(generate(tmp_path / "mix", 600, seed=2, shape_weights=(0, 1, 1), edit_weights=(4, 2, 3),
                            progress=False))
    shares = [edits.count(kind) / 600 for kind in ("recolour", "background", "remove")]
    assert abs(shares[0] - 4 / 9) < 0.06 and abs(shares[1] - 2 / 9) < 0.05 and abs(shares[2] - 3 / 9) < 0.06, shares
    with pytest.raises(InputError, match="edit_weights must be 3 weights"):
        generate(tmp_path / "bad", count=3, edit_weights=(0, 0, 0))
