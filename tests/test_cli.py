import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ip2p.cli import COMMANDS, LIBRARY_QUIET_ENVIRONMENT, build_parser, main, parse_args


def run(args, capsys):
    code = main(["-q", *args])
    return code, capsys.readouterr()


def test_edit_writes_the_output(tiny_model, image_file, tmp_path, capsys):
    out = tmp_path / "edited.png"
    code, _ = run(["edit", image_file, "-p", "make it blue", "-o", str(out), "--model", tiny_model,
                   "--steps", "2", "--seed", "1", "--resolution", "none", "--keep-size"], capsys)
    assert code == 0
    assert Image.open(out).size == Image.open(image_file).size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.png", "input.png"]


def test_several_inputs_go_to_a_folder_with_per_image_seeds(tiny_model, tmp_path, capsys):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"in{i}.png"))
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(paths[-1])
    out = tmp_path / "outs"
    code, _ = run(["edit", *paths, "-p", "x", "-o", str(out), "--model", tiny_model, "--steps", "1",
                   "--seed", "5", "--batch-size", "2"], capsys)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["in0.png", "in1.png", "in2.png"]
    single = tmp_path / "single.png"
    run(["edit", paths[2], "-p", "x", "-o", str(single), "--model", tiny_model, "--steps", "1", "--seed", "7"], capsys)
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(out / "in2.png")))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such image file"),
        ("corrupt", "corrupt or truncated"),
        ("empty", "the file is empty"),
        ("text", "not an image file"),
        ("huge", "over the limit"),
        ("tile", "vae_tile: 66 px is not a multiple of"),
        ("detail", "keep_detail carries an edit made at a working resolution"),
        ("extension", "unknown image extension"),
        ("nomodel", "no such model folder"),
        ("graph", "--cuda-graph replays exported bundles"),
        ("kv-backend", "--kv-downsample applies to the torch backend: use it with --backend torch"),
        ("compile-backend", "--compile applies to the torch backend: use it with --backend torch"),
        ("kv-factor", "kv_downsample must be a whole number from 1 (exact) to 8, got 0"),
        ("interval", "guidance interval must be (lo, hi] with 0 <= lo < hi"),
        ("adaptive", "adaptive guidance threshold must be in (0, 1]"),
        ("steps", "steps must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tiny_model, tmp_path, capsys, case, message):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(image)
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    args = ["edit", str(image), "-p", "x", "-o", str(out), "--model", tiny_model, "--steps", "0" if case == "steps" else "1"]
    if case == "missing":
        args[1] = str(tmp_path / "nope.png")
    elif case == "corrupt":
        image.write_bytes(image.read_bytes()[:50])
    elif case == "empty":
        image.write_bytes(b"")
    elif case == "text":
        image.write_text("hello")
    elif case == "huge":
        args += ["--max-pixels", "100"]
    elif case == "tile":
        args += ["--vae-tile", "66"]
    elif case == "detail":
        args += ["--keep-detail", "--resolution", "none"]
    elif case == "extension":
        args[5] = str(tmp_path / "out.nope")
    elif case == "nomodel":
        args[7] = str(tmp_path / "no-model")
    elif case == "graph":
        args += ["--cuda-graph"]
    elif case == "kv-backend":
        args += ["--kv-downsample", "2", "--backend", "onnxruntime"]
    elif case == "compile-backend":
        args += ["--compile", "--backend", "onnxruntime"]
    elif case == "kv-factor":
        args += ["--kv-downsample", "0"]
    elif case == "interval":
        args += ["--guidance-interval", "5:1"]
    elif case == "adaptive":
        args += ["--adaptive-guidance", "1.5"]
    code, captured = run(args, capsys)
    assert code == 2 and "Traceback" not in captured.err
    # in-process, weight-loading bars of an earlier import may show; the error itself is one line
    errors = [line for line in captured.err.strip().splitlines() if not line.startswith("Loading")]
    assert len(errors) == 1 and errors[0].startswith("ip2p: error: ") and message in errors[0]
    assert out.read_bytes() == b"precious"  # nothing half-written over an existing file


def test_console_script_exit_code_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ip2p", "edit", str(tmp_path / "x.png"), "-p", "x",
                           "-o", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("no such image file")


def test_create_model_info_and_convert(tmp_path, capsys):
    model = tmp_path / "tiny"
    assert run(["create-model", "tiny", str(model), "--seed", "3"], capsys)[0] == 0
    code, captured = run(["info", str(model)], capsys)
    assert code == 0 and "channels 8 -> 4" in captured.out and "EulerAncestralDiscreteScheduler" in captured.out
    assert run(["create-model", "tiny", str(model)], capsys)[1].err.strip().endswith("already exists and is not empty")
    assert run(["convert", str(model), str(tmp_path / "tiny.safetensors")], capsys)[0] == 0
    assert (tmp_path / "tiny.safetensors").stat().st_size > 1_000_000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "4:1"], "min exceeds max"),
        (["--static", "512"], "--static must look like 512x512"),
        (["--static", "512x512", "--batch", "1:4"], "needs one batch size"),
        (["--format", "tensorrt", "--precision", "fp32"], "not supported for format tensorrt"),
        (["--resolution", "202:300"], "multiples of"),
    ],
)
def test_export_bad_options_are_one_line_and_non_zero(tiny_model, tmp_path, capsys, extra, message):
    code, captured = run(["export", tiny_model, str(tmp_path / "bundle"), *extra], capsys)
    errors = [line for line in captured.err.strip().splitlines() if line.startswith("ip2p:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in captured.err
    assert not (tmp_path / "bundle").exists()


def test_export_refuses_an_existing_output(tiny_model, tmp_path, capsys):
    (tmp_path / "bundle").mkdir()
    code, captured = run(["export", tiny_model, str(tmp_path / "bundle")], capsys)
    assert code == 2 and "already exists; pass --force" in captured.err


def test_quiet_hides_progress_bars_of_long_commands(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "loud"), "--count", "3"]) == 0
    assert "generating" in capsys.readouterr().err
    assert main(["-q", "synth", str(tmp_path / "quiet"), "--count", "3", "--edit-weights", "0,1,0"]) == 0
    assert capsys.readouterr().err == ""
    assert '"edit": "background"' in (tmp_path / "quiet" / "metadata.jsonl").read_text()
    assert '"edit": "recolour"' not in (tmp_path / "quiet" / "metadata.jsonl").read_text()


def test_edit_options_reach_the_pipeline(tiny_model, tmp_path, capsys, caplog):
    """--image-guidance 1 costs two UNet rows a step, the interval one outside it; the log line says so."""
    import logging

    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
    base = ["edit", str(image), "-p", "x", "-o", str(tmp_path / "o.png"), "--model", tiny_model, "--steps", "3"]
    for extra, rows in ((["--image-guidance", "1"], 6), (["--guidance-interval", "100:200"], 3), ([], 9)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ip2p"):
            assert main(base + extra) == 0
        assert f"{rows} UNet evaluations per image" in caplog.text, extra


# every command with its required arguments (parsed only, never run)
REQUIRED_ARGUMENTS = {
    "edit": ["in.png", "-p", "x", "-o", "out.png"],
    "info": ["MODEL"],
    "create-model": ["tiny", "OUT"],
    "convert": ["MODEL", "OUT"],
    "serve": [],
    "export": ["MODEL", "OUT"],
    "quantize": ["BUNDLE", "OUT", "--data", "DATA"],
    "train": [],
    "distill": [],
    "synth": ["OUT"],
    "eval": [],
    "generate-prompts": ["captions.txt", "--lm", "LM", "-o", "OUT"],
    "train-prompts": ["--lm", "LM", "-o", "OUT"],
    "generate-pairs": ["prompts.jsonl", "--base", "B", "--clip", "C", "-o", "OUT"],
    "bench": ["report", "results.json"],
}


def test_every_command_is_in_the_global_options_table():
    assert set(REQUIRED_ARGUMENTS) == set(COMMANDS)


def parsed(argv: list[str]):
    parser, _ = build_parser(argv)
    return parse_args(parser, argv)


@pytest.mark.parametrize("command", sorted(REQUIRED_ARGUMENTS))
@pytest.mark.parametrize("before, after",
                         [(["-q"], ["-v"]), ([], ["-q", "--verbose"]), ([], ["-qv"]), (["-v", "-q"], [])])
def test_global_options_go_before_or_after_every_command(command, before, after):
    args = parsed([*before, command, *REQUIRED_ARGUMENTS[command], *after])
    plain = parsed([command, *REQUIRED_ARGUMENTS[command]])
    assert args.command == command and not (plain.quiet or plain.verbose)
    assert vars(args) == {**vars(plain), "quiet": True, "verbose": True}  # the command's own arguments as before


def test_quiet_after_the_command_hides_progress_and_unknown_options_are_still_refused(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "quiet"), "--count", "2", "-q"]) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as refused:
        main(["synth", str(tmp_path / "other"), "-q", "--nope"])
    assert refused.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_serve_warmup_sizes_parse_and_a_bad_one_is_one_line(capsys):
    assert parsed(["serve", "--warmup", "512x512, 768X512"]).warmup == ((512, 512), (768, 512))
    with pytest.raises(SystemExit) as refused:
        parsed(["serve", "--warmup", "512x"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "sizes are WIDTHxHEIGHT pixels such as 512x512, got '512x'" in err


def run_console(*args: str) -> subprocess.CompletedProcess:
    """``python -m ip2p ARGS`` in a fresh process, none of the library quieting inherited from this one."""
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_QUIET_ENVIRONMENT}
    return subprocess.run([sys.executable, "-m", "ip2p", *args], capture_output=True, text=True, env=env, timeout=600)


def test_library_progress_bars_show_only_with_verbose_and_ours_without_quiet(tiny_model, image_file, tmp_path):
    import transformers

    edit = ["edit", image_file, "-p", "x", "-o", str(tmp_path / "o.png"), "--model", tiny_model, "--steps", "1"]
    plain = run_console(*edit)
    assert plain.returncode == 0, plain.stderr
    assert "denoising" in plain.stderr  # our own bar
    assert "Loading weights" not in plain.stderr  # transformers' bar while it loads the text encoder
    assert "[transformers]" not in plain.stderr and "Warning" not in plain.stderr  # advisories, Python warnings
    verbose = run_console(*edit, "-v")
    assert verbose.returncode == 0 and "denoising" in verbose.stderr, verbose.stderr
    if int(transformers.__version__.split(".")[0]) >= 5:  # the bar came with transformers 5
        assert "Loading weights" in verbose.stderr
