"""The base install is the minimal runtime: a fresh virtual environment with ``pip install`` of the project
alone (no extras) edits with the shipped bundle, and has no torch, diffusers or transformers."""
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes.png"
HEAVY = ("torch", "diffusers", "transformers", "onnxscript", "accelerate")  # onnx is in: the backend rewrites graphs


def run(args, cwd, env=None):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> Path:
    """A new venv holding the project's wheel and its base dependencies only."""
    root = tmp_path_factory.mktemp("runtime")
    wheels = root / "wheels"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                 str(ROOT)], cwd=root)
    assert built.returncode == 0, built.stderr
    venv.create(root / "venv", with_pip=True)
    env_python = root / "venv" / "bin" / "python"
    installed = run([str(env_python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                     str(next(wheels.glob("ip2p_engine-*.whl")))], cwd=root)
    assert installed.returncode == 0, installed.stderr
    return root / "venv"


@pytest.mark.parametrize("model", [None, "shapes-distilled"])
def test_the_runtime_alone_edits_with_the_shipped_bundle(runtime_env, tmp_path, model):
    """The default model, and the distilled one by name: both bundles are in the wheel and give the repository's
    bundles' pictures through this environment's onnxruntime."""
    from engine.pipeline import EditPipeline, default_model

    python = runtime_env / "bin" / "python"
    missing = run([str(python), "-c", "import importlib.util as u, sys; "
                   f"sys.exit(sum(u.find_spec(m) is not None for m in {HEAVY!r}))"], cwd=tmp_path)
    assert missing.returncode == 0, "heavy packages are importable in the runtime-only environment"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IP2P_MODEL")}
    out = tmp_path / "edited.png"
    done = run([str(runtime_env / "bin" / "ip2p"), "-q", "edit", str(EXAMPLE), "-p", "make the circle blue",
                *(["--model", model] if model else []), "-o", str(out), "--seed", "0"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    here = EditPipeline.from_pretrained(default_model("onnxruntime", model or "shapes"), progress=False)
    ref = np.asarray(here.edit(EXAMPLE, "make the circle blue", seed=0).images[0], dtype=np.float64) / 255
    edited = np.asarray(Image.open(out), dtype=np.float64) / 255
    assert edited.shape == ref.shape and 10 * np.log10(1 / max(np.mean((edited - ref) ** 2), 1e-20)) >= 40


def test_commands_that_need_torch_name_the_extra(runtime_env, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ip2p = str(runtime_env / "bin" / "ip2p")
    cases = [
        ([ip2p, "export", str(ROOT / "engine" / "models" / "shapes"), str(tmp_path / "b")], "[torch]"),
        ([ip2p, "edit", str(EXAMPLE), "-p", "x", "-o", str(tmp_path / "o.png"), "--backend", "torch"], "[torch]"),
        ([ip2p, "create-model", "tiny", str(tmp_path / "m")], "[torch]"),
        ([ip2p, "train", "--base", "b", "--data", "d", "--output", str(tmp_path / "t")], "[train]"),
    ]
    for args, extra in cases:
        done = run(args, cwd=tmp_path, env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (args, done.stderr)
        assert lines[0].startswith("ip2p: error: ") and f"pip install 'ip2p-engine{extra}'" in lines[0], lines[0]
    assert not (tmp_path / "b").exists() and not (tmp_path / "o.png").exists()


def test_the_runtime_imports_nothing_from_the_other_parts():
    """engine/ never imports export/, training/, benchmarks/ or the ip2p assembler, not even lazily."""
    import ast

    others = ("export", "training", "benchmarks", "ip2p")
    for path in (ROOT / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in others], f"{path}: imports {names}"


def test_a_command_imports_only_the_part_that_owns_it(tmp_path):
    script = ("import sys; from ip2p.cli import main; code = main(['-q', 'edit', 'missing.png', '-p', 'x', "
              "'-o', 'o.png']); print(code, sorted({m.split('.')[0] for m in sys.modules} & "
              "{'export', 'training', 'benchmarks', 'torch'}))")
    done = run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr
