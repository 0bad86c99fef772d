"""docs/serving's Ray Serve config and KubeRay RayService: valid by Ray's own schema, the same applications, and
building the application they name with the deployment options they ask for."""
from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[dev]')")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from engine.errors import InputError  # noqa: E402
from engine.serving.ray_app import app  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serving"


def load(name: str) -> dict:
    return yaml.safe_load((DOCS / name).read_text(encoding="utf-8"))


def test_serve_config_is_a_valid_serve_config_naming_the_builder():
    config = ServeDeploySchema.model_validate(load("serve_config.yaml"))
    (application,) = config.applications
    assert application.import_path == "engine.serving.ray_app:app"


def test_rayservice_runs_the_same_applications():
    service = load("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded["applications"] == load("serve_config.yaml")["applications"]


def test_the_builder_makes_the_deployments_the_config_asks_for(monkeypatch):
    monkeypatch.setenv("IP2P_API_KEY", "from-the-secret")
    args = load("serve_config.yaml")["applications"][0]["args"]
    ingress = app(args)._bound_deployment
    model_app, settings = ingress.init_args
    model = model_app._bound_deployment
    assert model.name == "EditModel" and ingress.name == "Ingress"
    assert model.init_args[0] == dict(model="/models/instruct-pix2pix-fp16", backend="onnxruntime", device="cuda")
    assert (settings.max_batch, settings.max_queue, settings.timeout) == (12, 64, 120)
    assert settings.api_key == "from-the-secret"
    assert model.ray_actor_options["num_gpus"] == 0.5 and model.ray_actor_options["num_cpus"] == 2
    assert (model.max_ongoing_requests, model.max_queued_requests) == (64 + 12, 64)  # its queue and loop
    autoscaling = model._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 8)


def test_the_builder_names_an_unknown_arg():
    with pytest.raises(InputError, match="unknown max_bach"):
        app({"model": "m", "max_bach": 4})


def test_the_builder_names_a_batching_policy_the_server_does_not_have():
    with pytest.raises(InputError, match="^batching: 'step' or 'request', got 'continuous'$"):
        app({"model": "m", "batching": "continuous"})


@pytest.mark.parametrize("shape, message", [
    ({"replicas": 0}, r"replicas \(--replicas\) must be a whole number of at least 1, got 0"),
    ({"replicas": 1.5}, "replicas .* got 1.5"),
    ({"num_cpus": -1}, r"num_cpus \(--num-cpus\) must be a number of at least 0, got -1"),
    ({"num_gpus": "half"}, "num_gpus .* got 'half'"),
    ({"num_gpus": True}, "num_gpus .* got True"),
    ({"num_cpus": float("inf")}, "num_cpus .* got inf"),
])
def test_the_builder_refuses_replicas_and_resources_serve_cannot_take(shape, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        app({"model": "m", **shape})


def test_an_autoscaled_application_takes_no_replica_count():
    autoscaling = {"min_replicas": 1, "max_replicas": 2}
    assert app({"model": "m", "autoscaling": autoscaling})
    with pytest.raises(InputError, match="replicas and autoscaling both given"):
        app({"model": "m", "replicas": 2, "autoscaling": autoscaling})


@pytest.mark.parametrize("line, kind, message", [
    ("engine.errors.InputError: /m: no such model folder", "InputError", "/m: no such model folder"),
    ("engine.errors.CompileError: unet: compile failed at x: y", "CompileError", "unet: compile failed at x: y"),
    ("engine.manifest.ManifestError: bundle: bad manifest", "InputError", "bundle: bad manifest"),  # a subclass
    ("engine.errors.Cancelled: stop", None, None),  # not one of the one-line errors
    ("engine.nowhere.InputError: x", None, None),
    ("RuntimeError: engine.errors.InputError: x", None, None),
    ("ValueError: bad", None, None),
])
def test_a_replicas_last_traceback_line_becomes_the_engines_one_line_error(line, kind, message):
    from engine.serving.ray_app import engine_error

    error = engine_error(line)
    assert (type(error).__name__ if error else None, str(error) if error else None) == (kind, message)
