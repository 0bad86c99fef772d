"""Distillation (training/distill.py) on the tiny model, and the engine running its students."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine import EditPipeline, InputError
from training.distill import DistillConfig, distill, make_student

TINY = dict(resolution=32, batch_size=4, lr=1e-3, guidance_steps=3, consistency_steps=3, checkpoint_every=0,
            seed=5, embedding_dim=8, text_range=(1.0, 8.0), image_range=(1.0, 2.5), preset_steps=(4, 2, 1),
            original_inference_steps=10, ema_decay=0.9)


def config(teacher, data, out, **changes) -> DistillConfig:
    return DistillConfig(**{**TINY, "teacher": str(teacher), "data": str(data), "output": str(out), **changes})


@pytest.fixture(scope="module")
def student(tiny_model, pairs, tmp_path_factory):
    return distill(config(tiny_model, pairs, tmp_path_factory.mktemp("distill") / "student", default_scales=(4.0, 2.0)),
                   progress=False)


def unet_weights(folder):
    return load_file(f"{folder}/unet/diffusion_pytorch_model.safetensors")


def test_a_new_student_predicts_what_the_teachers_conditional_branch_does(tiny_model):
    from diffusers import UNet2DConditionModel

    from engine.backends.torch_modules import scale_embedding

    teacher = UNet2DConditionModel.from_pretrained(f"{tiny_model}/unet")
    student = make_student(teacher, 8)
    assert student.config.time_cond_proj_dim == 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 8, generator=gen)
    text = torch.randn(2, 77, teacher.config.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = teacher(x, t, text).sample
        got = student(x, t, text, timestep_cond=scale_embedding(torch.tensor([[7.5, 1.5], [2.0, 1.0]]), 8)).sample
    torch.testing.assert_close(got, expected)


def test_the_student_folder_loads_in_diffusers_and_runs_one_row_a_step_in_the_engine(student, rgb_image):
    from diffusers import LCMScheduler, StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(student, safety_checker=None,
                                                                  requires_safety_checker=False)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 16
    card = json.loads((student / "distillation.json").read_text())
    assert card["steps"] == [4, 2, 1] and card["stages"]["guidance"]["steps"] == 3
    engine = EditPipeline.from_pretrained(str(student), progress=False)
    assert engine.model.student.text_range == (1.0, 8.0)
    for preset, steps in (("exact", 4), ("balanced", 2), ("fast", 1)):
        result = engine.edit(rgb_image, "make it blue", preset=preset, seed=1, output_type="np")
        assert result.unet_evaluations == [steps]  # one row a step
    guided = EditPipeline.from_pretrained(str(student / "guidance" / "model"), progress=False)  # stage 1 alone
    assert guided.model.student.sampler == "euler_ancestral"
    assert guided.edit(rgb_image, "make it blue", seed=1, preset="fast").unet_evaluations == [8]


def test_the_students_scales_act_as_the_unets_input_says(student, rgb_image):
    """The engine's guided row equals the diffusers UNet called with the scale embedding, and other scales give
    another output (the projection made large, as a trained student's is)."""
    from engine.backends.torch_modules import scale_embedding

    engine = EditPipeline.from_pretrained(str(student), progress=False)
    be = engine.backend
    unet = be._module("unet_guided")[0].unet
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    inputs = {"sample": rng.standard_normal((2, 8, 8, 8)).astype(np.float32),
              "timestep": np.array([3.0, 700.0], np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, engine.model.text_dim)).astype(np.float32),
              "guidance": np.array([[7.5, 1.5], [3.0, 2.0]], np.float32)}
    out = be.to_numpy(be.run("unet_guided", {k: be.asarray(v) for k, v in inputs.items()})["noise_pred"])
    other = be.to_numpy(be.run("unet_guided", {k: be.asarray(v) for k, v in
                                               {**inputs, "guidance": inputs["guidance"] + 1}.items()})["noise_pred"])
    assert np.abs(out - other).max() > 1e-2
    with torch.no_grad():
        expected = unet(*(torch.from_numpy(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states")),
                        timestep_cond=scale_embedding(torch.from_numpy(inputs["guidance"]), 8)).sample
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


def test_a_students_own_default_scales_apply_where_an_edit_gives_none(student, rgb_image):
    assert json.loads((student / "distillation.json").read_text())["scales"] == [4.0, 2.0]
    assert "scales" not in json.loads((student / "guidance" / "model" / "distillation.json").read_text())
    assert EditPipeline.from_pretrained(str(student / "guidance" / "model")).model.student.scales == (7.5, 1.5)
    engine = EditPipeline.from_pretrained(str(student), progress=False)
    assert engine.model.student.scales == (4.0, 2.0)
    edit = lambda **scales: engine.edit(rgb_image, "make it blue", seed=1, output_type="np", **scales).images
    default = edit()
    np.testing.assert_array_equal(default, edit(text_guidance=4.0, image_guidance=2.0))
    assert np.abs(default - edit(text_guidance=7.5, image_guidance=1.5)).max() > 0  # a given scale wins
    np.testing.assert_array_equal(edit(text_guidance=6.0), edit(text_guidance=6.0, image_guidance=2.0))


def test_a_student_refuses_scales_it_never_learnt_and_the_savings_it_has_no_use_for(student, rgb_image):
    engine = EditPipeline.from_pretrained(str(student), progress=False)
    with pytest.raises(InputError, match="text_guidance 9 is outside 1-8"):
        engine.edit(rgb_image, "x", text_guidance=9.0)
    with pytest.raises(InputError, match="image_guidance 0.5 is outside 1-2.5"):
        engine.edit(rgb_image, "x", image_guidance=0.5)
    with pytest.raises(InputError, match="one UNet row a step"):
        engine.edit(rgb_image, "x", adaptive_guidance=0.9)
    with pytest.raises(InputError, match="lcm sampler takes at most 10 steps"):
        engine.edit(rgb_image, "x", steps=20)


def test_resume_equals_an_uninterrupted_distillation(tiny_model, pairs, tmp_path):
    straight = distill(config(tiny_model, pairs, tmp_path / "a", checkpoint_every=2), progress=False)
    checkpoint = tmp_path / "a" / "consistency" / "checkpoints" / "step-2"
    assert checkpoint.is_dir() and (tmp_path / "a" / "guidance" / "checkpoints" / "step-2").is_dir()
    # b: stage 1 finished, stage 2 stopped at its checkpoint (as a killed run leaves them)
    import shutil

    shutil.copytree(tmp_path / "a" / "guidance", tmp_path / "b" / "guidance")
    shutil.copytree(checkpoint, tmp_path / "b" / "consistency" / "checkpoints" / "step-2")
    resumed = distill(config(tiny_model, pairs, tmp_path / "b", checkpoint_every=2), resume="latest", progress=False)
    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_the_consistency_stage_learns_from_either_guided_teacher_on_either_schedule(student, tiny_model, pairs,
                                                                                    tmp_path):
    """Stage 2 from stage 1's student (one row) differs from stage 2 from the teacher's three rows (the fixture's);
    a cosine schedule brings the rate to zero at the stage's end."""
    import csv
    import shutil

    shutil.copytree(student / "guidance", tmp_path / "s" / "guidance")  # stage 1 done: only stage 2 runs
    other = distill(config(tiny_model, pairs, tmp_path / "s", consistency_teacher="guidance", lr_schedule="cosine",
                           log_every=1), progress=False)
    rates = [float(row["lr"]) for row in csv.DictReader(open(other / "consistency" / "log.csv"))]
    assert len(rates) == 3 and rates[0] > rates[1] > rates[2] == 0.0
    assert json.loads((other / "training_config.json").read_text())["config"]["consistency_teacher"] == "guidance"
    a, b = unet_weights(student), unet_weights(other)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) > 1e-4


def test_the_image_term_loss_and_the_scale_embeddings_own_rate(tiny_model, pairs, tmp_path):
    """``image_term_weight``: stage 1 adds the error of the image term alone, which a scale-blind student (a new
    one) gets wholly wrong; ``scale_lr_scale``: the scale embedding learns at its own rate."""
    from diffusers import UNet2DConditionModel

    from training.distill import _Frozen, _parameter_groups, guidance_loss, scale_response

    cfg = config(tiny_model, pairs, tmp_path / "l", image_term_weight=1.0, scale_lr_scale=10.0)
    frozen = _Frozen(cfg, torch.device("cpu"))
    teacher = UNet2DConditionModel.from_pretrained(f"{tiny_model}/unet").eval()
    student = make_student(teacher, cfg.embedding_dim)
    examples = [frozen.data.load(i, np.random.default_rng(i)) for i in range(4)]

    def loss(weight, image_range=cfg.image_range):
        changed = DistillConfig(**{**cfg.__dict__, "image_term_weight": weight, "image_range": image_range})
        with torch.no_grad():
            return float(guidance_loss(frozen, teacher, changed)(student, examples, torch.Generator().manual_seed(0)))

    blind = scale_response(frozen, teacher, student, cfg, batches=1)
    assert blind["image"]["norm_ratio"] == blind["text"]["norm_ratio"] == 0.0
    assert loss(3.0) - loss(1.0) > 1e-4  # the image term: the blind student misses all of it
    # one image scale: the second row is the first (s_T kept), and there is no image term to miss
    assert loss(3.0, (1.5, 1.5)) == pytest.approx(loss(1.0, (1.5, 1.5)), rel=1e-6)
    groups = _parameter_groups(student, cfg)
    assert list(groups[1]["params"]) == [student.time_embedding.cond_proj.weight]
    assert groups[1]["lr"] == pytest.approx(10 * cfg.lr) and "lr" not in groups[0]
    trained = distill(config(tiny_model, pairs, tmp_path / "t", image_term_weight=1.0, scale_lr_scale=10.0,
                             consistency_steps=0), progress=False)
    saved = json.loads((trained / "training_config.json").read_text())["config"]
    assert saved["image_term_weight"] == 1.0 and saved["scale_lr_scale"] == 10.0
    learnt = UNet2DConditionModel.from_pretrained(f"{trained}/guidance/unet").eval()
    response = scale_response(frozen, teacher, learnt, cfg, batches=1)
    assert all(response[term]["norm_ratio"] > 0 and -1 <= response[term]["cosine"] <= 1 for term in response)


def test_the_scale_response_benchmark_reads_a_distillation_config(student, tiny_model, pairs, tmp_path, capsys):
    from benchmarks.scale_response import main

    (tmp_path / "d.yaml").write_text(f"teacher: {tiny_model}\ndata: {pairs}\noutput: {tmp_path / 'o'}\n"
                                     "resolution: 32\nbatch_size: 4\nembedding_dim: 8\n")
    main([str(student / "guidance" / "model"), "--config", str(tmp_path / "d.yaml"), "--batches", "1",
          "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())[str(student / "guidance" / "model")]
    assert set(saved) == {"text", "image"} and saved["image"]["norm_ratio"] > 0
    assert f"{saved['image']['cosine']:.2f}, {saved['image']['norm_ratio']:.2f} |" in capsys.readouterr().out


def test_the_student_scales_benchmark_chooses_on_validation_sets_beside_the_teacher(student, tiny_model, tmp_path,
                                                                                   capsys):
    from benchmarks.savings import HELD_OUT_SEEDS
    from benchmarks.student_scales import VALIDATION_SEEDS, choose
    from ip2p.cli import main

    assert not set(VALIDATION_SEEDS) & set(HELD_OUT_SEEDS)
    assert main(["bench", "scales", str(student), "-o", str(tmp_path), "--text", "2", "4", "--image", "1",
                 "--count", "3"]) == 0
    result = json.loads((tmp_path / "student_scales.json").read_text())
    assert list(result["grid"]) == ["1 step, s_T 2, s_I 1", "1 step, s_T 4, s_I 1"]
    assert set(result["exact"]) == {"recolour", "background", "remove"} and result["chosen"] in result["grid"]
    assert result["chosen"] == "1 step, s_T {:g}, s_I {:g}".format(*result["scales"])
    assert f"**{result['chosen']}**" in (tmp_path / "student_scales.md").read_text()
    exact = {"recolour": 95.0, "background": 90.0}
    grid = {"best mean": {"recolour": 99.0, "background": 80.0},  # gaps +4, -10
            "worst -4, mean -4": {"recolour": 91.0, "background": 86.0},
            "worst -4, mean -3": {"recolour": 93.0, "background": 86.0}}
    assert choose(grid, exact) == "worst -4, mean -3"  # the worst type's gap first, then the mean gap
    capsys.readouterr()
    assert main(["bench", "scales", str(tiny_model), "-o", str(tmp_path / "x")]) != 0
    assert capsys.readouterr().err == (f"ip2p: error: {tiny_model}: not a distilled model (no distillation.json); "
                                       "see ip2p distill\n")
    assert main(["bench", "scales", str(student), "-o", str(tmp_path / "x"), "--text", "9"]) != 0
    assert "text_guidance 9 is outside 1-8" in capsys.readouterr().err
    assert main(["bench", "scales", str(student), "-o", str(tmp_path / "x"), "--count", "2"]) != 0
    assert capsys.readouterr().err == "ip2p: error: --count 2: at least 3 edits a set, one of each type\n"


def test_bad_teachers_and_settings_are_one_clear_line(student, tiny_model, pairs, tmp_path, saved_models):
    with pytest.raises(InputError, match="a distilled student"):
        distill(config(student, pairs, tmp_path / "x"), progress=False)
    with pytest.raises(InputError, match="4-channel text-to-image UNet"):
        distill(config(saved_models["sd"], pairs, tmp_path / "y"), progress=False)
    with pytest.raises(InputError, match="text_range"):
        config(tiny_model, pairs, tmp_path / "z", text_range=(5.0, 2.0))
    with pytest.raises(InputError, match="not a checkpoint of"):
        distill(config(tiny_model, pairs, tmp_path / "w"), resume=str(tmp_path), progress=False)
    with pytest.raises(InputError, match="preset_steps"):
        config(tiny_model, pairs, tmp_path / "z", preset_steps=(4, 4, 20))
    with pytest.raises(InputError, match="lr_schedule must be one of"):
        config(tiny_model, pairs, tmp_path / "z", lr_schedule="exponential")
    with pytest.raises(InputError, match="consistency_teacher must be teacher or guidance"):
        config(tiny_model, pairs, tmp_path / "z", consistency_teacher="student")
    with pytest.raises(InputError, match="image_term_weight must be >= 0 and scale_lr_scale > 0"):
        config(tiny_model, pairs, tmp_path / "z", scale_lr_scale=0.0)
    with pytest.raises(InputError, match="default_scales 9, 1.5 must lie inside text_range and image_range"):
        config(tiny_model, pairs, tmp_path / "z", default_scales=(9.0, 1.5))
    with pytest.raises(InputError, match="leave out 7.5, 1.5"):
        config(tiny_model, pairs, tmp_path / "z", text_range=(2.0, 5.0))
    with pytest.raises(InputError, match=r"default_scales: two numbers, s_T and s_I, got \[4.0\]"):
        config(tiny_model, pairs, tmp_path / "z", default_scales=(4.0,))


def test_a_folder_whose_default_scales_lie_outside_its_ranges_is_refused(student, tmp_path):
    import shutil

    folder = shutil.copytree(student, tmp_path / "s", ignore=shutil.ignore_patterns("guidance", "consistency"))
    card = json.loads((folder / "distillation.json").read_text())
    (folder / "distillation.json").write_text(json.dumps({**card, "scales": [4.0, 3.0]}))
    with pytest.raises(InputError, match=r"distillation.json: default scales: image_guidance 3 is outside 1-2.5"):
        EditPipeline.from_pretrained(str(folder), progress=False)
    older = {key: value for key, value in card.items() if key != "scales"}  # written before students had their own
    (folder / "distillation.json").write_text(json.dumps({**older, "text_range": [2.0, 5.0]}))
    loaded = EditPipeline.from_pretrained(str(folder), progress=False)
    assert loaded.model.student.scales == (7.5, 1.5)
    with pytest.raises(InputError, match="text_guidance 7.5 is outside 2-5"):  # asked for by default: refused
        loaded.edit(np.zeros((32, 32, 3), np.uint8), "x")


def test_a_bundle_whose_default_scales_lie_outside_its_ranges_is_refused(student_bundle, tmp_path):
    import shutil

    folder = shutil.copytree(student_bundle, tmp_path / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model"]["student"]["scales"] = [9.0, 2.0]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"manifest.json: model.student: default scales: text_guidance 9 is outside"):
        EditPipeline.from_pretrained(str(folder), progress=False)


@pytest.fixture(scope="module")
def student_bundle(student, tmp_path_factory):
    """The student exported (verified against torch at export)."""
    from engine.specs import Profile
    from export.bundle import ExportOptions, export_bundle

    profile = Profile(batch=(1, 1, 2), height=(32, 64, 64), width=(32, 64, 64))
    return export_bundle(str(student), tmp_path_factory.mktemp("student") / "bundle",
                         ExportOptions(profile=profile, verify=True))[0]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_students_bundle_verifies_and_edits_as_torch_does(student, student_bundle, rgb_image, backend):
    runtime = EditPipeline.from_pretrained(str(student_bundle), backend=backend, progress=False)
    assert runtime.model.student.scales == (4.0, 2.0) and runtime.backend.has("unet_guided")
    kwargs = dict(seed=3, output_type="np", text_guidance=6.0, image_guidance=2.0)
    got = runtime.edit(rgb_image, "make it blue", **kwargs)
    expected = EditPipeline.from_pretrained(str(student), progress=False).edit(rgb_image, "make it blue", **kwargs)
    assert got.unet_evaluations == expected.unet_evaluations == [4]
    mse = float(np.mean((got.images - expected.images) ** 2))
    assert 10 * np.log10(1 / max(mse, 1e-20)) >= 40.0  # dB, as every float32 runtime against torch


@pytest.mark.parametrize("where", ["local", "ray"])
def test_the_server_runs_a_students_edits_one_row_each_and_answers_the_library_pixels(student_bundle, where):
    """Two edits at different scales and presets share the loop's calls; each answers its solo pixels, a call
    holds one row per edit, one that names no steps or scales runs and reports the student's own, and a scale
    outside the student's range is a 422 naming it; on ``ip2p serve`` and on Ray Serve."""
    import base64

    import httpx

    from engine.serving.jobs import Settings
    from tests.serving_server import local_server, ray_server
    from tests.test_serving import pixels, png_bytes, solo

    load = dict(model=str(student_bundle), backend="onnxruntime")
    library = EditPipeline.from_pretrained(**load, progress=False)
    settings = Settings(max_batch=4, max_queue=8, max_steps=4)  # under the teacher's 20: a student's own 4 pass
    server = local_server(settings, load) if where == "local" else ray_server(settings, load, replicas=1)
    asks = [dict(seed=1, preset="exact", text_guidance=6.0), dict(seed=2, preset="fast", image_guidance=2.0),
            dict(seed=3)]
    with server as (url, _), httpx.Client(timeout=120) as client:
        answers = [client.post(f"{url}/v1/edits", files={"image": ("a.png", png_bytes(), "image/png")},
                               data={"instruction": "make it blue", **{k: str(v) for k, v in ask.items()}},
                               headers={"Accept": "application/json"}) for ask in asks]
        refused = client.post(f"{url}/v1/edits", files={"image": ("a.png", png_bytes(), "image/png")},
                              data={"instruction": "x", "text_guidance": "20"})
        too_long = client.post(f"{url}/v1/edits", files={"image": ("a.png", png_bytes(), "image/png")},
                               data={"instruction": "x", "steps": "5"})
    for ask, answer in zip(asks, answers):
        assert answer.status_code == 200, answer.text
        shown = pixels(base64.b64decode(answer.json()["image"]))
        np.testing.assert_array_equal(shown, solo(library, instruction="make it blue", **ask))
    told = answers[2].json()
    assert (told["steps"], told["text_guidance"], told["image_guidance"], told["unet_evaluations"]) == (4, 4.0, 2.0, 4)
    assert refused.status_code == 422 and "outside 1-8" in refused.text
    assert too_long.status_code == 422 and "steps: at most 4 on this server, got 5" in too_long.text
