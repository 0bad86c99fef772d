"""Every checkpoint form a user can hand us, each written by the test itself."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


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
