"""What the HTTP API runs on: the EditService protocol, which EditWorker (``worker.py``, this machine) and
RayEditService (``ray_app.py``, Ray Serve) implement side by side, the errors both raise, and what both share."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from engine.errors import InputError
from engine.pipeline import EditPipeline

if TYPE_CHECKING:
    from engine.serving.jobs import Job, JobTable, Settings
    from engine.serving.metrics import Metrics
    from engine.serving.schema import EditParameters

log = logging.getLogger(__name__)
API_KEY_ENV = "IP2P_API_KEY"  # where ``ip2p serve`` and a Serve config read the API key from


class QueueFull(RuntimeError):
    """No room for another edit (429): the queue holds --max-queue jobs, or the images held would pass
    --max-held-mb; ``retry_after`` is the estimated seconds until there is room."""

    def __init__(self, retry_after: int, why: str = "the edit queue is full"):
        super().__init__(f"{why}; retry in about {retry_after} s")
        self.retry_after = retry_after


class Unavailable(RuntimeError):
    """The service is not taking edits (shutting down, or its model failed)."""


class EditService(Protocol):
    """The service ``create_app`` serves: it queues edits as Jobs, runs them on a pipeline, and drains on stop."""

    settings: Settings
    metrics: Metrics
    jobs: JobTable  # every job still known, and the byte budget of the images they hold
    ready: bool  # taking edits (/readyz 200): loaded, warmed up, not stopping
    failure: BaseException | None  # why it stopped serving on its own (its warm-up failed), else None

    def submit(self, image: Image.Image, params: EditParameters) -> Job:
        """Queue an edit; InputError for settings it refuses, QueueFull without room, Unavailable when stopping."""

    def get(self, job_id: str) -> Job | None:
        """The job of ``job_id``, None when unknown or let go."""

    def forget(self, job: Job) -> None:
        """Drop a job whose answer was given directly (``/v1/edits``): it counts toward no retention limit."""

    def position(self, job: Job) -> int | None:
        """0-based place among the edits waiting to start, None once started."""

    def queue_depth(self) -> int:
        """Edits waiting to start."""

    def stop(self, drain_timeout: float) -> None:
        """Take no more edits, let those held finish for up to ``drain_timeout`` s, cancel the rest (503)."""


def serving_pipeline(load: dict, settings: Settings) -> EditPipeline:
    """``EditPipeline.from_pretrained(**load)`` as a server runs it: no progress bars (a server logs) and the
    pixel limit of its settings. onnxruntime keeps its spinning CPU threads: sleeping ones cut the server's
    overhead p99 from ~18 to ~6 ms but made the 64x64 edit ~10% slower on the 2-core host (docs/serving.md)."""
    pipe = EditPipeline.from_pretrained(**load, max_image_pixels=settings.max_pixels, progress=False)
    if pipe.profile is not None and pipe.profile.batch[0] > 1:
        raise InputError(f"{load.get('model')}: this bundle takes at least {pipe.profile.batch[0]} images per call, "
                         "and the server encodes each request's image alone; export it with a batch profile from 1")
    return pipe


def warm_up(pipe: EditPipeline, sizes: tuple[tuple[int, int], ...] = ()) -> None:
    """``pipe.warmup(sizes)`` before a service says ready (``--warmup``; none: the model's own size), so that its
    first requests do not pay for compilation, graph capture or lazy set-up."""
    start = time.perf_counter()
    pipe.warmup(sizes)
    log.info("model warm in %.2f s; serving", time.perf_counter() - start)
