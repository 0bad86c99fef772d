"""The EditService interface: the local worker and the Ray service each implement all of it, and warm up alike."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from engine.serving.interface import EditService, warm_up
from engine.serving.jobs import Settings
from engine.serving.metrics import Metrics
from engine.serving.worker import EditWorker

METHODS = sorted(name for name, member in vars(EditService).items() if callable(member) and not name.startswith("_"))
ATTRIBUTES = sorted(EditService.__annotations__)


class RecordingPipeline:
    """Stands in for an EditPipeline: records the edits asked of it."""

    model = SimpleNamespace(default_resolution=24)

    def __init__(self):
        self.edits: list[tuple] = []

    def edit(self, image, instruction, **options):
        self.edits.append((image.size, image.getpixel((0, 0)), instruction, options))


def implements(service: EditService) -> bool:
    """Every attribute of the protocol, and every method its own (not the protocol's empty body)."""
    own = vars(type(service))
    return all(hasattr(service, name) for name in ATTRIBUTES) and all(name in own for name in METHODS)


def test_warm_up_is_one_small_grey_edit():
    pipe = RecordingPipeline()
    warm_up(pipe)
    assert pipe.edits == [((24, 24), (127, 127, 127), "warm up", dict(steps=1, seed=0))]


def test_the_worker_implements_the_service_and_is_ready_after_its_warm_up():
    pipe = RecordingPipeline()
    worker = EditWorker(lambda: pipe, Settings(), Metrics(4))
    try:
        deadline = time.monotonic() + 10
        while not worker.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.ready and len(pipe.edits) == 1 and pipe.edits[0][2] == "warm up"
        assert METHODS == ["forget", "get", "position", "queue_depth", "stop", "submit"] and implements(worker)
    finally:
        worker.stop(1)


def test_the_ray_service_implements_the_service():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[dev]')")
    from engine.serving.ray_app import RayEditService

    assert implements(RayEditService(None, Settings()))
