"""Building the single-machine service: the pipeline, its metrics and the worker that owns it."""
from __future__ import annotations

from engine.pipeline import EditPipeline
from engine.serving.jobs import Settings
from engine.serving.metrics import Metrics
from engine.serving.worker import EditWorker


def local_service(load: dict, settings: Settings) -> EditWorker:
    """An EditWorker around ``EditPipeline.from_pretrained(**load)`` (no progress bars: a server logs)."""
    pipe = EditPipeline.from_pretrained(**load, max_image_pixels=settings.max_pixels, progress=False)
    return EditWorker(pipe, settings, Metrics(settings.max_batch))
