"""A real edit server on a loopback port for the serving tests: uvicorn in a thread, or the Ray Serve app."""
from __future__ import annotations

import socket
import time
from contextlib import contextmanager

import httpx
from engine.pipeline import DEFAULT_BUNDLE
from engine.serving.jobs import Settings
from engine.serving.service import background_server, local_service

BUNDLE_LOAD = dict(model=str(DEFAULT_BUNDLE), backend="onnxruntime")  # the shipped shapes bundle, fast on a CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready in {timeout} s")


@contextmanager
def local_server(settings: Settings, load: dict = BUNDLE_LOAD):
    """Yields (base URL, the EditWorker) of a uvicorn server running in this process."""
    service = local_service(load, settings)
    with background_server(service) as url:
        yield url, service


@contextmanager
def ray_server(settings: Settings, load: dict = BUNDLE_LOAD, replicas: int = 2):
    """Yields (base URL, the Serve app's name) of the Ray Serve app on a 2-CPU local Ray, two CPU replicas."""
    import ray
    from ray import serve

    from engine.serving.ray_app import APP_NAME, build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(load, settings, replicas=replicas, num_cpus=0.5), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url, APP_NAME
    finally:
        serve.shutdown()
        ray.shutdown()
