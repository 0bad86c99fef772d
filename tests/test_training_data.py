import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError
from training.data import PairedData, paired_transform


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
    data = PairedData(folder, resolution=16)
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


def test_empty_or_unknown_sources_are_refused(tmp_path):
    with pytest.raises(InputError, match="empty data folder"):
        PairedData(tmp_path, 16)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no metadata.jsonl, .tar shards, parquet"):
        PairedData(tmp_path, 16)
    write_folder(tmp_path, ["{bad"])
    with pytest.raises(InputError, match="no usable examples"):
        PairedData(tmp_path, 16)


def png_bytes(color, size=(24, 24)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


ROWS = [
    {"input_image": png_bytes((255, 0, 0)), "edit_prompt": "make it blue", "edited_image": png_bytes((0, 0, 255))},
    {"input_image": png_bytes((255, 0, 0)), "edit_prompt": "corrupt", "edited_image": b"not a png"},
    {"input_image": png_bytes((0, 255, 0)), "edit_prompt": "sizes", "edited_image": png_bytes((0, 0, 0), (8, 8))},
]


def check_loaded(data):
    rng = np.random.default_rng(0)
    loaded = [data.load(i, rng) for i in range(len(data))]
    assert [x is None for x in loaded] == [False, True, True]
    assert loaded[0]["prompt"] == "make it blue" and loaded[0]["edited"][2].mean() > 0.9
    assert data.skipped.reasons == {"missing or corrupt image": 1, "input and edited sizes differ": 1}


def test_parquet_and_saved_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the train extra (datasets) is not installed")
    table = datasets.Dataset.from_dict({
        "original_image": [{"bytes": r["input_image"], "path": None} for r in ROWS],
        "edit_prompt": [r["edit_prompt"] for r in ROWS],
        "edited_image": [{"bytes": r["edited_image"], "path": None} for r in ROWS],
    })
    table.to_parquet(str(tmp_path / "train-0.parquet"))
    check_loaded(PairedData(tmp_path / "train-0.parquet", 16))
    table.save_to_disk(str(tmp_path / "saved"))
    check_loaded(PairedData(tmp_path / "saved", 16))


def test_webdataset_shards(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, row in enumerate(ROWS + [{"input_image": png_bytes((1, 1, 1))}]):
            for name, data in (("input.png", row["input_image"]), ("edited.png", row.get("edited_image")),
                               ("txt", row.get("edit_prompt", "").encode() if "edit_prompt" in row else None)):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"sample{i:03d}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = PairedData(tmp_path, 16)
    assert data.skipped.reasons == {"incomplete tar sample": 1}
    data.skipped.reasons.clear()
    check_loaded(data)
