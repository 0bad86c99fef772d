"""The EditService interface: the local worker and the Ray service each implement all of it, and warm up alike."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from engine.errors import CompileError
from engine.serving.interface import EditService, warm_up
from engine.serving.jobs import Settings
from engine.serving.metrics import Metrics
from engine.serving.worker import EditWorker

METHODS = sorted(name for name, member in vars(EditService).items() if callable(member) and not name.startswith("_"))
ATTRIBUTES = sorted(EditService.__annotations__)


class RecordingPipeline:
    """Stands in for an EditPipeline: records the warm-ups asked of it."""

    model = SimpleNamespace(default_resolution=24, student=None)

    def __init__(self):
        self.warmups: list[tuple] = []

    def warmup(self, sizes):
        self.warmups.append(tuple(sizes))

    def denoising_loop(self, on_call):
        return []  # no edit ever runs: the worker waits for jobs, then for its stop


def implements(service: EditService) -> bool:
    """Every attribute of the protocol, and every method its own (not the protocol's empty body)."""
    own = vars(type(service))
    return all(hasattr(service, name) for name in ATTRIBUTES) and all(name in own for name in METHODS)


def test_warm_up_warms_the_sizes_asked_for():
    pipe = RecordingPipeline()
    warm_up(pipe)
    warm_up(pipe, ((64, 48),))
    assert pipe.warmups == [(), ((64, 48),)]


def test_warmup_runs_every_unet_row_count_at_each_size(tiny_model):
    """1, 2 and 3 rows at each size (the latent's), twice (a CUDA graph is recorded at a shape's second call),
    through the pipeline's own loop; the default: the model's size."""
    from engine import EditPipeline

    pipe = EditPipeline.from_pretrained(tiny_model, progress=False)
    calls, run = [], pipe.backend.run

    def recording(name, inputs):
        if name == "unet":
            calls.append((name, tuple(inputs["sample"].shape)))
        return run(name, inputs)

    pipe.backend.run = recording
    seconds = pipe.warmup([(64, 48), (32, 32)])
    assert list(seconds) == ["64x48", "32x32"] and all(v > 0 for v in seconds.values())
    factor = pipe.model.vae_factor
    assert calls == [("unet", (rows, 8, h // factor, w // factor))
                     for w, h in ((64, 48), (32, 32)) for rows in (1, 2, 3, 1, 2, 3)]
    calls.clear()
    side = pipe.model.default_resolution
    assert list(pipe.warmup()) == [f"{side}x{side}"] and len(calls) == 6


def test_the_worker_implements_the_service_and_is_ready_after_its_warm_up():
    pipe = RecordingPipeline()
    worker = EditWorker(lambda: pipe, Settings(), Metrics(4))
    try:
        deadline = time.monotonic() + 10
        while not worker.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.ready and pipe.warmups == [()]
        assert METHODS == ["forget", "get", "position", "queue_depth", "stop", "submit"] and implements(worker)
        assert worker.alive  # serving after its warm-up
    finally:
        worker.stop(1)
    assert not worker.alive


def test_the_ray_service_implements_the_service():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[dev]')")
    from engine.serving.ray_app import RayEditService

    assert implements(RayEditService(None, Settings()))


class FailingWarmUp(RecordingPipeline):
    """Stands in for an EditPipeline whose warm-up fails (a compile that cannot run there) once released."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def edit_size(self, size, resolution):
        return (24, 24)

    def warmup(self, sizes):
        self.release.wait(10)
        raise CompileError("unet: torch.compile failed at sample 3x8x3x3 (...): run without compile (no --compile)")


def test_a_failed_warm_up_stops_the_server_with_it_and_answers_the_edits_queued_meanwhile():
    from PIL import Image

    from engine.serving.schema import EditParameters
    from engine.serving.service import background_server

    pipe = FailingWarmUp()
    worker = EditWorker(lambda: pipe, Settings(), Metrics(4))
    job = worker.submit(Image.new("RGB", (24, 24)), EditParameters(instruction="x"))  # queued during the warm-up
    pipe.release.set()
    with pytest.raises(CompileError, match="run without compile"):
        with background_server(worker):  # raises the failure instead of waiting to be ready
            pass
    assert isinstance(worker.failure, CompileError) and not worker.ready and not worker.alive
    assert job.state == "cancelled" and job.cancel_reason == "shutdown" and worker.queue_depth() == 0  # a 503
