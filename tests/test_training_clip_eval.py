"""``ip2p eval --clip`` (training/clip_eval.py) end to end on a tiny random CLIP written by transformers'
save_pretrained, its scores checked against CLIPModel's own."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ip2p.cli import main
from tests.conftest import cli_error
from tests.test_training_clip_metrics import CAPTIONS, images, reference_scores


def write_captioned_folder(folder, input_key="input_caption", output_key="output_caption", broken=False):
    folder.mkdir()
    rows = []
    for i, (image, (cap_in, cap_out, instruction)) in enumerate(zip(images(3, size=(64, 64)), CAPTIONS)):
        image.save(folder / f"{i}.png")
        rows.append({"input_image": f"{i}.png", "edit_prompt": instruction, input_key: cap_in, output_key: cap_out})
    if broken:
        rows.append({"input_image": "missing.png", "edit_prompt": "x", input_key: "a", output_key: "b"})
        rows.append({"input_image": "0.png", "edit_prompt": "x"})  # no captions
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_eval_clip_sweep_writes_scores_edits_and_plot(tmp_path, tiny_model, tiny_clip, capsys):
    data = write_captioned_folder(tmp_path / "data", "original_prompt", "edited_prompt", broken=True)
    out, saved, plot = tmp_path / "clip.json", tmp_path / "edits", tmp_path / "sweep.png"
    code = main(["-q", "eval", tiny_model, "--clip", tiny_clip, "--data", str(data), "--sweep", "image", "--steps", "2",
                 "--json", str(out), "--save-dir", str(saved), "--plot", str(plot), "--seed", "5"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["examples"] == 3 and sum(report["skipped"].values()) == 2
    assert [s["image_guidance"] for s in report["settings"]] == [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2]
    assert {s["text_guidance"] for s in report["settings"]} == {7.5}
    first = report["settings"][0]
    assert first["unet_evaluations_per_edit"] == 4  # s_I = 1: two branches, two steps
    assert report["settings"][1]["unet_evaluations_per_edit"] == 6
    # the scores are those of the saved edits
    edited = [Image.open(saved / "text7.5-image1" / f"{i:05d}.png") for i in range(3)]
    inputs = [Image.open(data / f"{i}.png") for i in range(3)]
    expected = reference_scores(tiny_clip, inputs, edited, [c[0] for c in CAPTIONS], [c[1] for c in CAPTIONS])
    got = np.array([[e[m] for e in first["per_example"]] for m in
                    ("clip_image_similarity", "clip_text_image_similarity", "clip_directional_similarity")])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert first["clip_directional_similarity"] == pytest.approx(float(expected[2].mean()), abs=1e-5)
    assert Image.open(plot).size[0] > 300
    assert "CLIP scores over 3 edits" in capsys.readouterr().out


def test_eval_clip_reads_a_saved_hugging_face_dataset(tmp_path, tiny_model, tiny_clip):
    datasets = pytest.importorskip("datasets")
    folder = write_captioned_folder(tmp_path / "folder")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    table = {"input_image": [Image.open(folder / r["input_image"]) for r in rows],
             **{k: [r[k] for r in rows] for k in ("edit_prompt", "input_caption", "output_caption")}}
    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "input_caption": datasets.Value("string"), "output_caption": datasets.Value("string")})
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "clip.json"
    assert main(["-q", "eval", tiny_model, "--clip", tiny_clip, "--data", str(tmp_path / "hf"), "--steps", "2",
                 "--image-guidance", "1.3", "--count", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["examples"] == 2 and len(report["settings"]) == 1
    assert report["settings"][0]["image_guidance"] == 1.3


@pytest.mark.parametrize("args, message", [
    (["--clip", "CLIP"], "--clip and --data go together"),
    (["--sweep", "image"], "--sweep and --plot score with CLIP"),
    (["--clip", "MODEL", "--data", "DATA"], "not a CLIP model"),
    (["--clip", "CLIP", "--data", "NOCAPTIONS"], "no usable captioned examples"),
    (["--clip", "CLIP", "--data", "MISSING"], "no such data folder"),
])
def test_eval_clip_bad_input_is_one_line(tmp_path, tiny_model, tiny_clip, capsys, args, message):
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (32, 32)).save(plain / "a.png")
    (plain / "metadata.jsonl").write_text(json.dumps({"input_image": "a.png", "edit_prompt": "x",
                                                      "edited_image": "a.png"}) + "\n")
    names = {"CLIP": tiny_clip, "MODEL": tiny_model, "DATA": str(plain), "NOCAPTIONS": str(plain),
             "MISSING": str(tmp_path / "missing")}
    assert main(["-q", "eval", tiny_model, *[names.get(a, a) for a in args]]) == 2
    assert message in cli_error(capsys)
