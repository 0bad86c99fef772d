"""Building the single-machine service (the pipeline, its metrics, the worker that owns it), and running it."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from engine.pipeline import EditPipeline
from engine.serving.jobs import Settings
from engine.serving.metrics import Metrics
from engine.serving.worker import EditWorker


def serving_pipeline(load: dict, settings: Settings) -> EditPipeline:
    """``EditPipeline.from_pretrained(**load)`` as a server runs it: no progress bars (a server logs) and the
    pixel limit of its settings. onnxruntime keeps its spinning CPU threads: sleeping ones cut the server's
    overhead p99 from ~18 to ~6 ms but made the 64x64 edit ~10% slower on the 2-core host (docs/serving.md)."""
    return EditPipeline.from_pretrained(**load, max_image_pixels=settings.max_pixels, progress=False)


def local_service(load: dict, settings: Settings) -> EditWorker:
    """An EditWorker around the serving pipeline of ``load`` (EditPipeline.from_pretrained's arguments)."""
    return EditWorker(lambda: serving_pipeline(load, settings), settings, Metrics(settings.max_batch))


@contextmanager
def background_server(service, host: str = "127.0.0.1", port: int = 0, ready_timeout: float = 120.0):
    """Run the API over ``service`` on uvicorn in a thread (embedding, tests, benchmarks); yields its base URL
    once ``/readyz`` answers 200; shuts it down on exit. ``port=0`` picks a free port."""
    import uvicorn

    from engine.serving.app import create_app

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="ip2p-http", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while not (server.started and service.ready):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server at {url} did not become ready in {ready_timeout:g} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
