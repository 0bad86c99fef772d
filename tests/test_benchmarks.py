"""The benchmark suite collects, a tiny case runs, and its JSON becomes a report (timings are not checked)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import load_results, markdown
from engine.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(args, tmp_path):
    """A separate pytest run of the benchmarks, as a user starts one (not a pytest-xdist worker: under one,
    pytest-benchmark would see the worker's variables and turn itself off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["IP2P_BENCH_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def test_suite_collects_quick_and_full_sets(tmp_path):
    quick = run_pytest(["--collect-only", "-q"], tmp_path)
    full = run_pytest(["--collect-only", "-q", "--full"], tmp_path)
    assert quick.returncode == 0, quick.stderr
    assert "test_stage[sd15-512-unet_step-diffusers-fp32]" in quick.stdout
    assert "test_stage[tiny-64-edit-onnxruntime-fp16]" in quick.stdout
    assert "test_stage[sd15-512-unet_step-torch-kv2-bf16]" in quick.stdout
    assert "test_stage[sd15-512-edit-torch-fast-bf16]" in quick.stdout  # every CPU backend times the whole edit
    assert "test_stage[sd15-512-edit-onnxruntime-fp32]" in quick.stdout
    assert "test_stage[sd15-512-unet_step-openvino-bf16]" in quick.stdout  # the CPU's limit beside the peers
    assert "test_stage[sd15-512-edit-openvino-fast-bf16]" in quick.stdout
    assert "unet_step-torch-fast-bf16" not in quick.stdout  # a preset changes only the edit
    assert full.stdout.count("test_stage[") > quick.stdout.count("test_stage[")


def test_one_tiny_case_runs_and_reports(tmp_path):
    results = tmp_path / "results.json"
    done = run_pytest(["--benchmark-only", "-k", "tiny-64-text_encode-diffusers-fp32 or tiny-64-text_encode-torch-fp32 "
                       "or tiny-64-edit-diffusers-fp32 or tiny-64-edit-torch-bf16 or tiny-64-edit-torch-fast-bf16",
                       f"--benchmark-json={results}", "-q"],
                      tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    rows, machine = load_results(results)
    assert {(r["stage"], r["backend"]) for r in rows} == {
        ("text_encode", "diffusers-fp32"), ("text_encode", "torch-fp32"), ("edit", "diffusers-fp32"),
        ("edit", "torch-bf16"), ("edit", "torch-fast-bf16")}
    row = next(r for r in rows if r["backend"] == "torch-fp32")
    assert row["flops"] > 0 and row["peak_flops"] > 0 and row["accuracy_max_rel"] < 1e-5
    edit = next(r for r in rows if r["backend"] == "torch-bf16")
    assert edit["edit_steps"] == 4 and 20 < edit["psnr_db"] < 100  # bf16 against float32, same seed
    assert edit["unet_evaluations"] == 12 and edit["unet_work"] == 12.0 and edit["preset"] == "exact"
    assert set(edit["cpu"]) == {"torch_capability", "native_bf16", "native_fp16"}
    fast = next(r for r in rows if r["backend"] == "torch-fast-bf16")
    assert fast["preset"] == "fast" and fast["edit_steps"] == 8 and fast["unet_evaluations"] <= 24
    assert "psnr_db" not in fast  # another picture by design: its quality is measured by ip2p eval
    assert "psnr_db" not in next(r for r in rows if r["stage"] == "edit" and r["backend"] == "diffusers-fp32")
    table = markdown(rows, machine)
    assert "| text_encode |" in table and "1.00x" in table and "| edit (4 steps) |" in table


def test_report_refuses_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(InputError, match="no stage benchmarks"):
        load_results(path)
    path.write_text("{")
    with pytest.raises(InputError, match="not a pytest-benchmark JSON"):
        load_results(path)


def test_only_one_system_per_model_stays_alive_besides_the_reference(tmp_path):
    from benchmarks.conftest import REFERENCE, Systems

    class Built(Systems):
        def _build(self, kind, backend):
            return (kind, backend)

    systems = Built(tmp_path, "cpu")
    for kind, backend in [("sd15", "diffusers-fp32"), ("sd15", REFERENCE), ("tiny", "torch-bf16")]:
        systems.runner(kind, backend)
    assert set(systems._runners) == {("sd15", "diffusers-fp32"), ("sd15", REFERENCE), ("tiny", "torch-bf16")}
    systems.runner("sd15", "onnxruntime-fp32")
    assert set(systems._runners) == {("sd15", "onnxruntime-fp32"), ("sd15", REFERENCE), ("tiny", "torch-bf16")}


def test_serving_overhead_run_measures_the_shipped_bundle():
    """``ip2p bench serve``'s one-client run: real server, the lean client's prebuilt multipart body accepted, the
    overhead taken against stages that add up to the pipeline's time (so it is below the whole latency)."""
    from benchmarks.serving import uncontended
    from engine.pipeline import DEFAULT_BUNDLE

    run = uncontended({"model": str(DEFAULT_BUNDLE)}, 64, 1, repeats=2, fmt="jpeg", block=1)
    assert run["repeats"] == 2 and run["format"] == "jpeg"
    assert 0 < run["overhead_p50_ms"] < run["http_p50_s"] * 1000
    assert run["read_p50_ms"] > 0 and run["write_p50_ms"] > 0


def test_serving_load_run_checks_every_answer_against_the_library():
    """``ip2p bench serve``'s load run: ``ip2p serve`` in its own process, concurrent clients, every answer
    compared with the library's edit of its seed (the shipped bundle batches bit for bit)."""
    from benchmarks.hostile import server_errors
    from benchmarks.serving import Load, differing, load_run
    from engine.pipeline import DEFAULT_BUNDLE
    from engine.serving.jobs import Settings

    run = load_run({"model": str(DEFAULT_BUNDLE)}, Settings(max_batch=2, batch_wait_ms=50, read_timeout=0.5),
                   Load(clients=3, requests=12, steps=2, hostile=1))
    assert run["statuses"] == {200: 12} and run["throughput_per_s"] > 0
    assert (run["pixels_differing"], run["largest_difference"]) == (0, 0) and differing(run) == "0"
    assert differing(dict(pixels_differing=70, largest_difference=1)) == "70 (at most 1 level)"
    hostile = run["hostile"]  # one hostile client beside them: every kind sent, none answered 5xx
    assert hostile["bomb"] == {"400": sum(hostile["bomb"].values())} and hostile["unknown_path"].keys() == {"404"}
    assert sum(map(sum, (counts.values() for counts in hostile.values()))) >= 3 and server_errors(hostile) == 0
    assert run["server_rss_mb"][1] > 0


def test_report_takes_ratios_to_diffusers_best_cpu_setting_where_it_ran():
    rows = [dict(model="sd15", resolution=512, stage="unet_step", backend=backend, baseline="diffusers-fp32",
                 median_s=seconds) for backend, seconds in (("diffusers-fp32", 14.0), ("diffusers-cl-bf16", 8.0),
                                                            ("openvino-bf16", 6.0))]
    table = markdown(rows, {})
    assert "6.00 s (0.43x, 0.75x best)" in table and "14.00 s (1.00x, 1.75x best)" in table
    assert "best" not in markdown([r for r in rows if r["backend"] != "diffusers-cl-bf16"], {}).split("\n", 2)[2]


def test_the_gpu_side_by_side_dry_runs_on_the_cpu(tmp_path, tiny_model):
    """benchmarks/gpu_compare.py's logic, on the tiny model on the CPU in float32 (eager systems: compiling is
    tested in test_torch_backend.py): every figure present, float32 against float32 the same pictures, a report."""
    from benchmarks import gpu_compare

    out = tmp_path / "compare.json"
    gpu_compare.main(["--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--size", "32", "--steps", "2",
                      "--rounds", "1", "--matmul-size", "256", "--systems", "diffusers-eager", "engine-eager",
                      "--presets", "fast",
                      "--json", str(out), "--report", str(tmp_path / "compare.md")])
    data = json.loads(out.read_text())
    diffusers, engine = data["systems"]
    assert (diffusers["system"], engine["system"]) == ("diffusers-eager", "engine-eager")
    assert set(engine) >= {"unet_step", "exact", "fast", "warmup_s"} and "fast" not in diffusers
    assert engine["unet_rows"]["exact"] == 6 and engine["unet_rows"]["fast"] < 3 * 8
    assert engine["exact"]["psnr_vs_float32"] >= 199 and engine["fast"]["psnr_vs_float32"] >= 199  # identical: 200
    assert 0 < engine["unet_step"]["peak_share"] and data["targets"] == {}
    assert "| engine-eager |" in (tmp_path / "compare.md").read_text()


def test_the_gpu_side_by_side_checks_the_issue_targets():
    from benchmarks.gpu_compare import check_targets

    def system(name, exact, fast=None, share=0.4):
        return {"system": name, "exact": {"ms": exact}, "fast": {"ms": fast}, "unet_step": {"peak_share": share}}

    targets = check_targets([system("diffusers-compiled", 400.0), system("engine-compiled", 250.0, 90.0, 0.3)])
    assert targets == {"exact_ms": [250.0, True], "exact_vs_diffusers_compiled": [0.625, True],
                       "fast_ms": [90.0, False], "unet_step_peak_share": [0.3, False]}
