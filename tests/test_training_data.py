import json

import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError
from training.data import PairedFolder, paired_transform


def write_folder(tmp_path, rows):
    (tmp_path / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    return tmp_path


def test_rows_load_and_bad_ones_are_skipped_and_counted(tmp_path):
    Image.new("RGB", (40, 32), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 32), (0, 0, 255)).save(tmp_path / "b.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    folder = write_folder(tmp_path, [
        {"input_image": "a.png", "edit_prompt": "make it blue", "edited_image": "b.png"},
        {"original_image": "a.png", "edit_prompt": "alias", "edited_image": "b.png"},
        {"input_image": "a.png", "edit_prompt": "sizes differ", "edited_image": "small.png"},
        {"input_image": "a.png", "edit_prompt": "corrupt", "edited_image": "broken.png"},
        {"input_image": "a.png", "edit_prompt": "missing", "edited_image": "nope.png"},
        {"input_image": "a.png", "edited_image": "b.png"},
        "{not json",
    ])
    data = PairedFolder(folder, resolution=16)
    assert len(data) == 5
    rng = np.random.default_rng(0)
    loaded = [data.load(i, rng) for i in range(len(data))]
    assert [x is None for x in loaded] == [False, False, True, True, True]
    first = loaded[0]
    assert first["input"].shape == first["edited"].shape == (3, 16, 16) and first["prompt"] == "make it blue"
    assert first["input"][0].mean() > 0.9 and first["edited"][2].mean() > 0.9  # red in, blue out
    assert data.skipped.total == 5
    assert data.skipped.reasons == {"missing column": 1, "unreadable metadata line": 1,
                                    "input and edited sizes differ": 1, "missing or corrupt image": 2}


def test_same_crop_and_flip_on_both_images():
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))
    image = Image.fromarray(gradient)
    for seed in range(8):
        a, b = paired_transform(image, image, 32, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)
    flips = {paired_transform(image, image, 32, np.random.default_rng(s))[0][0, 0, 0] > 0 for s in range(16)}
    assert flips == {True, False}  # both orientations occur


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="no metadata.jsonl"):
        PairedFolder(tmp_path, 16)
    write_folder(tmp_path, ["{bad"])
    with pytest.raises(InputError, match="no usable rows"):
        PairedFolder(tmp_path, 16)
