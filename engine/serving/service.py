"""Running an EditService on uvicorn, and building the single-machine one (an EditWorker over the pipeline)."""
from __future__ import annotations

import signal
import socket
import threading
import time
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

import uvicorn

from engine.serving.interface import EditService, serving_pipeline
from engine.serving.jobs import Settings
from engine.serving.metrics import Metrics
from engine.serving.worker import EditWorker

GRACE_S = 5  # seconds uvicorn gives responses to finish once the service has drained


def local_service(load: dict, settings: Settings) -> EditWorker:
    """An EditWorker around the serving pipeline of ``load`` (EditPipeline.from_pretrained's arguments)."""
    return EditWorker(lambda: serving_pipeline(load, settings), settings, Metrics(settings.max_batch))


class DrainingServer(uvicorn.Server):
    """uvicorn that drains the service before it closes connections. On SIGTERM or SIGINT the service stops
    taking edits (503, /readyz 503) and has ``drain_timeout`` seconds to finish what it holds; the rest is
    cancelled, so their clients get 503 with Retry-After and their event streams a final event; only then does
    uvicorn close connections. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, service: EditService):
        super().__init__(config)
        self.service = service
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None:
            super().handle_exit(sig, frame)
            return
        self._drain = threading.Thread(target=self._drain_then_exit, name="ip2p-drain", daemon=True)
        self._drain.start()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's periodic check whether to exit, and whether the service stopped on its own (``failure``)."""
        return self.service.failure is not None or await super().on_tick(counter)

    def _drain_then_exit(self) -> None:
        self.service.stop(self.service.settings.drain_timeout)
        self.should_exit = True


def http_server(service: EditService, host: str, port: int) -> DrainingServer:
    """The API over ``service`` on uvicorn at ``host:port``, draining on shutdown."""
    from engine.serving.app import create_app

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=GRACE_S)
    return DrainingServer(config, service)


@contextmanager
def background_server(service: EditService, host: str = "127.0.0.1", port: int = 0,
                      ready_timeout: float = 120.0) -> Iterator[str]:
    """Run the API over ``service`` on uvicorn in a thread (embedding, tests, benchmarks); yields its base URL
    once ``/readyz`` answers 200; drains and shuts it down on exit. ``port=0`` picks a free port."""
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = http_server(service, host, port)
    thread = threading.Thread(target=server.run, name="ip2p-http", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while not (server.started and service.ready):
            if service.failure is not None:
                raise service.failure
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server at {url} did not become ready in {ready_timeout:g} s")
            time.sleep(0.05)
        yield url
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=service.settings.drain_timeout + GRACE_S + 30)
