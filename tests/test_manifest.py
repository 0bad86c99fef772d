"""The bundle manifest's one definition: typed, written and read back unchanged, and refused in one line where a
key is missing or unknown."""
import dataclasses
import json
from pathlib import Path

import pytest

from engine.errors import InputError
from engine.files import write_json_atomic
from engine.manifest import (MANIFEST_NAME, CalibrationRecord, Macs, Manifest, Quantization, read_bundle)
from engine.pipeline import DEFAULT_BUNDLE


def shipped() -> dict:
    return json.loads((DEFAULT_BUNDLE / MANIFEST_NAME).read_text(encoding="utf-8"))


def test_the_shipped_manifest_loads_and_writes_back_the_same_json(tmp_path):
    manifest = read_bundle(DEFAULT_BUNDLE).manifest
    assert manifest.to_dict() == shipped()
    write_json_atomic(tmp_path / MANIFEST_NAME, manifest.to_dict())
    assert (tmp_path / MANIFEST_NAME).read_bytes() == (DEFAULT_BUNDLE / MANIFEST_NAME).read_bytes()
    assert manifest.components["unet"].inputs[0].shapes[2] == (48, 8, 128, 128) and manifest.gpu is None


def test_every_part_round_trips():
    manifest = Manifest.from_dict(shipped())
    unet = dataclasses.replace(manifest.components["unet"], macs=Macs(1.5e9, (16, 16)), engine_key="ab" * 16)
    full = dataclasses.replace(
        manifest, components={**manifest.components, "unet": unet}, gpu={"name": "GPU", "compute_capability": "9.0"},
        quantization=Quantization("nncf", "ptq", CalibrationRecord("edits", 4, None, 24, samples=8), 0.03))
    data = full.to_dict()
    assert Manifest.from_dict(data) == full and Manifest.from_dict(json.loads(json.dumps(data))) == full
    assert list(data)[-1] == "quantization" and list(data["components"]["unet"])[-2:] == ["macs", "engine_key"]
    assert "quantization" not in manifest.to_dict() and "macs" not in manifest.to_dict()["components"]["vae_decoder"]


DROP = object()


def changed(path: list, value=DROP) -> dict:
    """The shipped manifest's JSON with the key at ``path`` set to ``value``, or dropped."""
    data = node = shipped()
    *parents, last = path
    for key in parents:
        node = node[key]
    if value is DROP:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("path, value, problem", [
    (["tokenizer"], DROP, "missing key 'tokenizer' in the manifest"),
    (["extra"], 1, "unknown key 'extra' in the manifest"),
    (["components", "unet", "files", 0, "sha256"], DROP, "missing key 'sha256' in components.unet.files[0]"),
    (["components", "unet", "inputs", 0, "layout"], "NCHW", "unknown key 'layout' in components.unet.inputs[0]"),
    (["components", "unet"], DROP, "missing key 'unet' in components"),
    (["components", "refiner"], {}, "unknown component 'refiner' in components"),
    (["model", "text_dim"], DROP, "missing key 'text_dim' in model"),
    (["profile", "batch"], 3, "a value of the wrong kind"),
    (["verification"], {}, "verification is not a list"),
])
def test_a_missing_or_unknown_key_is_one_line_naming_the_file(tmp_path, path, value, problem):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(changed(path, value)))
    with pytest.raises(InputError) as err:
        read_bundle(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / MANIFEST_NAME}: {problem}") and "\n" not in message
    assert message.endswith("export the bundle again with `ip2p export`")


def test_another_format_version_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(shipped() | {"format_version": 2}))
    with pytest.raises(InputError, match="bundle format version 2, this engine reads 1"):
        read_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[]")
    with pytest.raises(InputError, match="bundle format version None"):
        read_bundle(tmp_path)


def test_an_exported_manifest_is_what_to_dict_writes(onnx_bundles):
    for folder in onnx_bundles.values():
        text = (Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8")
        assert json.dumps(read_bundle(folder, verify=False).manifest.to_dict(), indent=2) + "\n" == text
