"""Every checkpoint form a user can hand us, each written by the test itself."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import EditPipeline, InputError
from engine.checkpoints import resolve_model
from engine.config import read_model_config
from engine.original_format import save_single_file
from tests.conftest import model_copy


def edit(pipe, image_file):
    return pipe.edit(image_file, "make it blue", steps=2, seed=3, output_type="np").images


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_gives_the_same_pixels_as_the_folder(tiny_model, tiny_pipe, tmp_path, image_file, suffix):
    single = save_single_file(tiny_model, tmp_path / f"ip2p{suffix}")
    pipe = EditPipeline.from_pretrained(single, config=tiny_model, progress=False)
    np.testing.assert_array_equal(edit(pipe, image_file), edit(tiny_pipe, image_file))


def test_single_file_of_another_architecture_is_refused(tiny_model, tmp_path):
    single = save_single_file(tiny_model, tmp_path / "ip2p.safetensors")
    other = model_copy(tiny_model, tmp_path / "other", {"block_out_channels": [64, 128]})
    with pytest.raises(InputError, match="ip2p.safetensors: cannot load"):
        EditPipeline.from_pretrained(single, config=other, progress=False)


def test_missing_component_names_the_folder(tiny_model, tmp_path):
    copy = model_copy(tiny_model, tmp_path / "m")
    shutil.rmtree(copy / "vae")
    with pytest.raises(InputError, match="missing component folder vae/"):
        EditPipeline.from_pretrained(copy)
    shutil.copytree(Path(tiny_model) / "vae", copy / "vae")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="unet: no weights file"):
        EditPipeline.from_pretrained(copy)


def test_text_to_image_unet_is_refused(tiny_model, tmp_path):
    copy = model_copy(tiny_model, tmp_path / "m", {"in_channels": 4})
    with pytest.raises(InputError, match="a 4-channel text-to-image UNet is not an InstructPix2Pix model"):
        read_model_config(copy)


def test_unknown_paths_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such model"):
        resolve_model(tmp_path / "nothing-here")
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"x")
    with pytest.raises(InputError, match=".ckpt or .safetensors"):
        resolve_model(weird)


def fake_hub_cache(tiny_model, cache: Path, repo: str) -> None:
    """The layout huggingface_hub writes: models--org--name/{snapshots/<rev>,refs/main}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, root / "snapshots" / revision)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)


def run_cli(args, env_extra, cwd):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "ip2p", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_hub_id_resolves_from_the_local_cache_offline(tiny_model, tmp_path, image_file):
    fake_hub_cache(tiny_model, tmp_path / "hub", "testorg/tiny-ip2p")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out.png"
    done = run_cli(["-q", "edit", image_file, "-p", "x", "-o", str(out), "--model", "testorg/tiny-ip2p",
                    "--steps", "1", "--seed", "0"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    missing = run_cli(["info", "testorg/not-cached"], env, tmp_path)
    assert missing.returncode == 2
    assert "not in the local Hugging Face cache" in missing.stderr and "Traceback" not in missing.stderr


def test_models_saved_by_the_libraries_edit_to_the_same_pixels(saved_models, tiny_pipe, image_file):
    """save_pretrained of today's diffusers/transformers: tokenizer.json only, fp16 variant files, .bin
    weights, the layout with a safety checker and feature extractor (ignored, never loaded)."""
    assert not (Path(saved_models["ip2p"]) / "tokenizer" / "vocab.json").exists()
    reference = edit(tiny_pipe, image_file)
    for name in ("ip2p", "bin", "full"):
        pipe = EditPipeline.from_pretrained(saved_models[name], progress=False)
        np.testing.assert_array_equal(edit(pipe, image_file), reference, err_msg=name)
    half = EditPipeline.from_pretrained(saved_models["fp16"], variant="fp16", progress=False)
    assert np.abs(edit(half, image_file) - reference).max() < 0.02  # weights rounded to float16


def test_variants_are_chosen_or_named(saved_models, tmp_path, caplog):
    from engine.checkpoints import component_weights

    fp16 = Path(saved_models["fp16"]) / "unet"
    assert component_weights(fp16, "fp16").files == (fp16 / "diffusion_pytorch_model.fp16.safetensors",)
    with caplog.at_level("INFO", logger="engine"):  # a CLI run earlier may have left "engine" at WARNING
        assert component_weights(fp16).variant == "fp16"  # the only weights there are
    assert "loading the fp16 variant" in caplog.text
    with pytest.raises(InputError, match=r"ip2p/unet: no fp16 weights \(this folder has: plain\)"):
        resolve_model(saved_models["ip2p"], variant="fp16").weights("unet")
    both = Path(shutil.copytree(fp16, tmp_path / "unet"))
    (both / "diffusion_pytorch_model.ema.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"unet: only variant weights \(ema, fp16\): pass a variant"):
        component_weights(both)


def test_weight_file_selection():
    from engine.checkpoints import hub_weight_files, select_weights, weight_variant

    assert weight_variant("diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert weight_variant("diffusion_pytorch_model-00001-of-00002.safetensors") is None
    assert weight_variant("diffusion_pytorch_model.fp16-00001-of-00002.safetensors") == "fp16"
    names = ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"]
    assert select_weights(names, None) == (["diffusion_pytorch_model.safetensors"], None)
    assert select_weights(names, "fp16") == (["diffusion_pytorch_model.fp16.safetensors"], "fp16")
    assert select_weights(["pytorch_model.bin", "config.json"], None) == (["pytorch_model.bin"], None)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert select_weights(shards, None) == (shards[:2], None)
    with pytest.raises(ValueError, match="no weights file"):
        select_weights(["config.json"], None)
    # the timbrooks/instruct-pix2pix file list: one format of one variant per component, no safety checker
    repo = ["model_index.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
            "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin",
            "text_encoder/pytorch_model.bin", "text_encoder/model.fp16.safetensors"]
    assert hub_weight_files(repo, None) == ["unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"]
    assert hub_weight_files(repo, "fp16") == ["unet/diffusion_pytorch_model.fp16.safetensors",
                                              "text_encoder/model.fp16.safetensors"]


def test_a_layout_that_cannot_load_is_one_line(saved_models, tmp_path):
    copy = Path(shutil.copytree(saved_models["ip2p"], tmp_path / "m"))
    (copy / "tokenizer" / "tokenizer.json").unlink()
    done = run_cli(["edit", str(copy / "x.png"), "-p", "x", "-o", str(tmp_path / "o.png"), "--model", str(copy)],
                   {}, tmp_path)
    assert done.returncode == 2  # the input image is checked first
    Image.new("RGB", (32, 32)).save(copy / "x.png")
    done = run_cli(["edit", str(copy / "x.png"), "-p", "x", "-o", str(tmp_path / "o.png"), "--model", str(copy)],
                   {}, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"ip2p: error: {copy / 'tokenizer'}: no tokenizer: need tokenizer.json, or vocab.json and merges.txt "
        "(vocab.json, merges.txt missing)"]


def test_info_reads_every_layout(saved_models, onnx_bundles, tmp_path):
    for name, expected in (("ip2p", "F32"), ("fp16", "variant fp16"), ("bin", "weights in .bin form"),
                           ("full", "channels 8 -> 4")):
        done = run_cli(["info", saved_models[name]], {}, tmp_path)
        assert done.returncode == 0 and expected in done.stdout, (name, done.stderr)
    done = run_cli(["info", onnx_bundles["fp16"]], {}, tmp_path)
    assert done.returncode == 0 and "(onnx, fp16," in done.stdout and "unet: fp16" in done.stdout
