"""``ip2p quantize`` on the shipped shapes bundle: a real NNCF int8 UNet that OpenVINO runs, edits near the float
bundle's, a whole and checked manifest, and one-line errors that leave nothing behind."""
import json
import re
import shutil

import numpy as np
import pytest

from engine import EditPipeline, InputError
from engine.manifest import read_bundle
from engine.pipeline import DEFAULT_BUNDLE
from ip2p.cli import main
from tests.conftest import cli_error

pytest.importorskip("nncf", reason="NNCF is not installed (pip install -e '.[dev]')")
pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[dev]')")

from export.quantize import Calibration, quantize_bundle, read_edits, split_calls  # noqa: E402
from training.synthetic import generate  # noqa: E402


@pytest.fixture(scope="module")
def calibration_data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("calibration") / "edits", 6, seed=5, progress=False)


@pytest.fixture(scope="module")
def int8_bundle(calibration_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "shapes-int8"
    folder, error = quantize_bundle(DEFAULT_BUNDLE, out, Calibration(calibration_data, edits=3, samples=40),
                                    progress=False)  # 3 edits of the default 20 steps: 60 UNet calls
    assert 0 < error < 0.15, error  # the UNet's relative output error on calls it was not calibrated on
    return folder


def psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20))


def test_the_bundle_is_whole_and_says_what_it_holds(int8_bundle):
    bundle = read_bundle(int8_bundle, verify=True)  # every file's size and sha256
    manifest = bundle.manifest
    assert (manifest.format, manifest.precision) == ("openvino", "int8")
    unet = manifest.components["unet"]
    assert unet.precision == "int8" and [f.path for f in unet.files] == ["unet.xml", "unet.bin"]
    float_bundle = read_bundle(DEFAULT_BUNDLE, verify=False).manifest
    for name in ("text_encoder", "vae_encoder", "vae_decoder"):  # the other networks are kept as they are
        assert manifest.components[name].files == float_bundle.components[name].files
    assert manifest.quantization.calibration.unet_calls == 3 * 20
    import openvino as ov

    ops = {op.get_type_name() for op in ov.Core().read_model(str(int8_bundle / "unet.xml")).get_ops()}
    assert "FakeQuantize" in ops  # quantized, not a copy of the float graph
    assert not list(int8_bundle.parent.glob(".shapes-int8.partial-*"))


def test_int8_edits_stay_near_the_float_bundles(int8_bundle, calibration_data):
    """Edits of scenes the calibration never saw (the set's last three) against the float bundle's."""
    quantized = EditPipeline.from_pretrained(int8_bundle, progress=False)  # no backend named: OpenVINO
    assert type(quantized.backend).__name__ == "OpenVinoBackend"
    reference = EditPipeline.from_pretrained(DEFAULT_BUNDLE, backend="openvino", progress=False)
    for seed, (image, instruction) in enumerate(read_edits(calibration_data, 6)[3:]):
        a = reference.edit(image, instruction, seed=seed, output_type="np").images[0]
        b = quantized.edit(image, instruction, seed=seed, output_type="np").images[0]
        assert psnr(a, b) >= 25.0, (instruction, psnr(a, b))


def test_only_openvino_runs_it_and_info_says_int8(int8_bundle, capsys):
    with pytest.raises(InputError, match="openvino"):
        EditPipeline.from_pretrained(int8_bundle, backend="onnxruntime")
    assert main(["info", str(int8_bundle)]) == 0
    out = capsys.readouterr().out
    assert "unet: int8" in out and "runtime here: openvino in int8 (UNet)" in out


def test_calls_held_back_are_never_calibrated_on():
    calls = list(range(50))
    chosen, held = split_calls(calls, samples=20)
    assert len(chosen) == 20 and 5 <= len(held) <= 9 and not set(chosen) & set(held)
    assert chosen[0] == 0 and chosen[-1] == 48  # the first and the last steps are represented
    assert split_calls([7], 300) == ([7], [7])


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, calibration_data, capsys):
    out = tmp_path / "out"
    assert main(["-q", "quantize", str(DEFAULT_BUNDLE), str(out), "--data", str(tmp_path / "nowhere")]) == 2
    assert "metadata.jsonl: not found" in cli_error(capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"input_image": "a.png", "edit_prompt": "x"}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"metadata.jsonl:2: not a JSON object"):
        read_edits(bad, 10)
    assert main(["-q", "quantize", str(tmp_path), str(out), "--data", str(calibration_data)]) == 2
    assert "not an exported bundle" in cli_error(capsys)
    out.mkdir()
    assert main(["-q", "quantize", str(DEFAULT_BUNDLE), str(out), "--data", str(calibration_data)]) == 2
    assert "already exists" in cli_error(capsys)
    assert set(tmp_path.iterdir()) == {bad, out} and not list(out.iterdir())  # no staging folder left behind


def test_a_quantized_bundle_is_not_quantized_again(int8_bundle, tmp_path, calibration_data):
    with pytest.raises(InputError, match="an openvino bundle; quantize an ONNX bundle"):
        quantize_bundle(int8_bundle, tmp_path / "again", Calibration(calibration_data, edits=1), progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(int8_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["unet"]["files"][1]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"unet.bin: corrupted"):
        EditPipeline.from_pretrained(copy)


def test_an_ir_this_openvino_cannot_read_names_the_file_and_the_fix(int8_bundle, tmp_path):
    """An IR written for another OpenVINO (here: an IR version no release has) is refused in one line."""
    from engine.manifest import sha256_file

    copy = tmp_path / "other-version"
    shutil.copytree(int8_bundle, copy)
    xml = copy / "unet.xml"
    text = xml.read_text()
    head = text[: text.index(">", text.index("<net ")) + 1]
    xml.write_text(text.replace(head, re.sub(r'version="\d+"', 'version="99"', head), 1))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["unet"]["files"][0].update(sha256=sha256_file(xml), bytes=xml.stat().st_size)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"unet.xml: OpenVINO cannot read this graph .*quantize it again"):
        EditPipeline.from_pretrained(copy, progress=False)
