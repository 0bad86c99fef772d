"""The edit service on Ray Serve: a FastAPI ingress (the same API as ``ip2p serve``) in front of model replicas,
each running the single-machine server's EditWorker (edits join its denoising loop at every step). ``build_app``
makes the application; ``serve_locally`` runs it.

Back-pressure: each replica takes ``max_ongoing_requests`` at once (``max_queue`` + ``max_batch``: its worker's
queue and loop) and its handle queues ``max_queued_requests`` (``max_queue``) more; past that, or when a
replica's own queue is full, the ingress answers 429. A replica that dies fails its
in-flight requests with 503; Serve restarts it and later requests succeed there.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import math
import os
import re
import time

from PIL import Image
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from engine.config import EditConfig
from engine.errors import ONE_LINE_ERRORS, Cancelled, InputError
from engine.serving.app import create_app
from engine.serving.interface import API_KEY_ENV, EditService, QueueFull, Unavailable, serving_pipeline
from engine.serving.jobs import Job, JobTable, Settings, check_limits, job_config
from engine.serving.metrics import Metrics
from engine.serving.worker import EditWorker
from engine.serving.schema import EditParameters

log = logging.getLogger("engine.serving")
APP_NAME = "ip2p"
POLL_S = 0.05
RESOURCE_STEP = 1e-4  # Ray's resolution of fractional resources


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class EditModel:
    """One replica: its own EditWorker (the single-machine server's queue and denoising loop, so edits join the
    replica's running ones at every step); the ingress keeps the deadlines."""

    def __init__(self, load: dict, settings: Settings):
        # the worker's thread loads, warms up and runs every edit (torch on a CPU is slow on a second thread)
        # Serve lets max_queue + max_batch calls in at once: the worker's queue holds them all (Serve's limits are
        # the back-pressure); the ingress keeps the deadlines
        own = dataclasses.replace(settings, timeout=None, max_queue=settings.max_queue + settings.max_batch)
        self.worker = EditWorker(lambda: serving_pipeline(load, settings), own, Metrics(settings.max_batch))
        while not self.worker.ready:
            if not self.worker.alive:
                raise self.worker.failure or RuntimeError("the replica's worker stopped while warming up")
            time.sleep(POLL_S)

    async def edit(self, image: Image.Image, params: EditParameters):
        """Stream one edit: its EditConfig as this replica's model resolves it (a distilled model's own steps and
        scales), (0, None) once it starts, (denoising steps done, tiled VAE progress) as they advance, then its
        Outcome (or the InputError, QueueFull or failure). Cancelling the call (``response.cancel()`` at
        the ingress) takes the edit out of the replica's loop at the next step: no more UNet rows for it."""
        try:
            job = self.worker.submit(image, params)
        except (InputError, QueueFull, Unavailable) as err:
            yield err
            return
        yield job.config
        reported = None
        try:
            while not job.future.done():
                await asyncio.sleep(POLL_S)
                progress = (job.steps_done, job.tiles) if job.state == "running" else None
                if progress != reported:
                    reported = progress
                    yield progress
            if job.state == "succeeded":
                yield job.future.result()
            elif job.state == "cancelled":
                yield Cancelled(job.cancel_reason or "cancelled")
            else:
                yield InputError(job.error) if job.status == 422 else RuntimeError(job.error)
        finally:
            job.cancel("cancelled")  # the caller stopped listening: out of the loop (a finished job ignores it)
            self.worker.forget(job)

    def check_health(self) -> None:
        if not (self.worker.ready and self.worker.alive):
            raise RuntimeError("the replica's worker is not running")


class RayEditService(EditService):
    """The ingress side: an EditService over a handle to the EditModel replicas (no model loaded here)."""

    def __init__(self, handle, settings: Settings):
        self.handle, self.settings = handle, settings
        self.metrics = Metrics(settings.max_batch)
        self.jobs = JobTable(settings)
        self.ready = True
        self.failure = None  # a replica that fails is Ray Serve's to restart
        self._tasks: set[asyncio.Task] = set()

    def submit(self, image: Image.Image, params: EditParameters) -> Job:
        if not self.ready:
            raise Unavailable("the server is shutting down")
        config = job_config(params)  # the replica's own replaces it (a distilled model's steps and scales)
        # the replica checks the edit's size, and the steps a request leaves to its model (a student's are its own)
        check_limits(config if params.steps is not None else dataclasses.replace(config, steps=1), self.settings)
        pending = len(self.jobs.unfinished())
        if pending >= self.settings.max_queue + self.settings.max_batch:
            raise QueueFull(1)
        job = Job(image, params, config, None, self.settings.timeout)
        self.jobs.add(job)
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job) -> None:
        sent = time.perf_counter()
        self.metrics.in_flight.inc()
        params = job.params.model_copy(update={"seed": job.seed})
        stream = self.handle.options(stream=True).edit.remote(job.image, params)
        followed = asyncio.ensure_future(_follow(job, stream))
        try:
            while not followed.done():
                await asyncio.wait([followed], timeout=POLL_S)
                if not followed.done():
                    job.cancel_if_expired()
                if not followed.done() and job.cancel_reason is not None:  # answered when cancelled
                    stream.cancel()  # the replica takes the edit out of its loop at the next step
                    followed.cancel()
                    return
            self._finish(job, followed, time.perf_counter() - sent)
        finally:
            self.metrics.in_flight.dec()

    def _finish(self, job: Job, waited: asyncio.Future, elapsed: float) -> None:
        try:
            outcome = waited.result()
        except BackPressureError:
            job.finish("failed", error=QueueFull(1), status=429)
        except (RayActorError, RayTaskError) as err:
            log.warning("replica failed under job %s: %s", job.id, type(err).__name__)
            job.finish("failed", error=Unavailable("the model replica failed; retry"), status=503)
        except (asyncio.CancelledError, Cancelled):
            job.finish("cancelled")
        else:
            if isinstance(outcome, Cancelled):
                job.finish("cancelled")
            elif isinstance(outcome, InputError):
                job.finish("failed", error=outcome, status=422)
            elif isinstance(outcome, QueueFull):
                job.finish("failed", error=outcome, status=429)
            elif isinstance(outcome, Unavailable):
                job.finish("failed", error=outcome, status=503)
            elif isinstance(outcome, Exception):
                job.finish("failed", error=outcome, status=500)
            else:
                job.steps_done = job.config.steps
                job.timings["queue"] = max(0.0, elapsed - sum(outcome.timings.values()))  # and the transfers
                job.timings.update(outcome.timings)
                job.finish("succeeded", outcome)

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def forget(self, job: Job) -> None:
        self.jobs.forget(job)

    def position(self, job: Job) -> int | None:
        """0-based place among this ingress's jobs that no replica has started yet, oldest first; None once
        started. (The replicas' own queues are Serve's: this counts what waits ahead of a job, not where.)"""
        waiting = self._waiting()
        return waiting.index(job) if job in waiting else None

    def queue_depth(self) -> int:
        return len(self._waiting())

    def _waiting(self) -> list[Job]:
        return [j for j in self.jobs.unfinished() if j.state == "queued"]

    def stop(self, drain_timeout: float) -> None:
        """As EditService.stop: no new edits, ``drain_timeout`` s for those held, then the rest cancelled (503)."""
        self.ready = False
        deadline = time.monotonic() + drain_timeout
        while self.jobs.unfinished() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for job in self.jobs.unfinished():
            job.cancel("shutdown")


async def _follow(job: Job, stream):
    """Read an edit's stream from a replica into its job: the config it runs, running once it joins the replica's
    loop, the steps done and the tiled VAE's progress, and the last item, the outcome (returned)."""
    outcome = None
    async for item in stream:
        if isinstance(item, EditConfig):
            job.config = item  # what the replica runs: the answer reports its steps and scales
        elif isinstance(item, tuple):
            if job.state == "queued":
                job.start()
            if job.state == "running":
                job.steps_done, job.tiles = item
                job.changed.set()
        else:
            outcome = item
    return outcome


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP API of ``engine.serving.app``, built on the replica around a RayEditService."""

    def __init__(self, model, settings: Settings):
        self.service = RayEditService(model, settings)

    def __serve_build_asgi_app__(self):
        return create_app(self.service, title="ip2p edit service (Ray Serve)")


def build_app(load: dict, settings: Settings, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
              autoscaling: dict | None = None):
    """The Serve application: Ingress -> EditModel x ``replicas`` (or ``autoscaling`` bounds)."""
    check_shape(None if autoscaling else replicas, num_cpus, num_gpus)
    options: dict = dict(ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                         max_ongoing_requests=settings.max_queue + settings.max_batch,
                         max_queued_requests=settings.max_queue)
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    model = EditModel.options(**options).bind(load, settings)
    return Ingress.bind(model, settings)


def check_shape(replicas: int | None, num_cpus: float, num_gpus: float) -> None:
    """Refuse replica counts and resources Ray Serve cannot take, in one line each (None: autoscaled)."""
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
        raise InputError(f"replicas (--replicas) must be a whole number of at least 1, got {replicas!r}")
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise InputError(f"{name} (--{name.replace('_', '-')}) must be a number of at least 0, got {value!r}")


def room_problem(replicas: int, num_cpus: float, num_gpus: float) -> str | None:
    """Why the Ray cluster as it is now cannot place the replicas (Serve would wait for them): a replica needs more
    CPUs or GPUs than any node has, or all of them more than the cluster has; None where they fit."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for flag, need, kind in (("--num-cpus", num_cpus, "CPU"), ("--num-gpus", num_gpus, "GPU")):
        largest = max((node.get(kind, 0.0) for node in nodes), default=0.0)
        total = sum(node.get(kind, 0.0) for node in nodes)
        if need > largest + RESOURCE_STEP:
            return f"{flag} {need:g}: a replica needs {need:g} {kind}s on one node, and the largest has {largest:g}"
        if replicas * need > total + RESOURCE_STEP:
            return (f"{flag} {need:g} x --replicas {replicas}: the replicas need {replicas * need:g} {kind}s, and the "
                    f"Ray cluster has {total:g}")
    return None


LOAD_KEYS = ("model", "backend", "device", "dtype", "variant")


def app(args: dict):
    """The application builder a Serve config names (``import_path: engine.serving.ray_app:app``), e.g. in
    ``serve run docs/serving/serve_config.yaml`` or a KubeRay RayService. ``args``: the model (``model``, ``backend``,
    ``device``, ``dtype``, ``variant``), any ``Settings`` field (``max_batch``, ``max_queue``, ``timeout``, ...),
    and ``replicas``, ``num_cpus``, ``num_gpus``, ``autoscaling`` (an autoscaling_config). The API key, if any,
    comes from $IP2P_API_KEY where the application is built."""
    args = dict(args)
    load = {key: args.pop(key) for key in LOAD_KEYS if key in args}
    shape = {key: args.pop(key) for key in ("replicas", "num_cpus", "num_gpus", "autoscaling") if key in args}
    if "replicas" in shape and "autoscaling" in shape:
        raise InputError("serve config args: replicas and autoscaling both given; an autoscaled application takes "
                         "its replica counts from autoscaling")
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise InputError(f"serve config args: unknown {', '.join(unknown)} (known: {', '.join(sorted(fields))}, "
                         f"{', '.join(LOAD_KEYS)}, replicas, num_cpus, num_gpus, autoscaling)")
    args.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)  # a secret belongs in the environment
    return build_app(load, Settings(**args), **shape)


def replica_error() -> Exception | None:
    """The engine's error that stopped the model replicas from starting (a model that cannot load, a compile that
    cannot run), read from Ray Serve's deployment status; None where it is not one of the engine's."""
    app = serve.status().applications.get(APP_NAME)
    for deployment in app.deployments.values() if app else ():
        lines = deployment.message.strip().splitlines()
        error = engine_error(lines[-1]) if lines else None
        if error is not None:
            return error
    return None


def engine_error(line: str) -> Exception | None:
    """A traceback's last line, ``engine.errors.InputError: ...``, as the one-line error class it names or derives
    from, with its message; None for any other line."""
    match = re.fullmatch(r"(engine(?:\.\w+)*)\.(\w+): (.+)", line)
    try:
        error = getattr(importlib.import_module(match[1]), match[2], None) if match else None
    except ImportError:
        return None
    for kind in ONE_LINE_ERRORS if isinstance(error, type) else ():
        if issubclass(error, kind):
            return kind(match[3])
    return None


def serve_locally(load: dict, settings: Settings, host: str, port: int, replicas: int, num_cpus: float,
                  num_gpus: float) -> None:
    """``ip2p serve --ray``: start (or join) Ray, run the application, block until interrupted."""
    import ray

    application = build_app(load, settings, replicas, num_cpus, num_gpus)
    joined = ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))  # a cluster that may add nodes
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    problem = room_problem(replicas, num_cpus, num_gpus)
    if problem and not joined:
        raise InputError(f"{problem}: Ray Serve would wait for them forever")
    if problem:
        log.warning("%s now: Ray Serve waits until the cluster has them", problem)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application, name=APP_NAME, route_prefix="/")
    except RuntimeError as err:  # "Deploying application ip2p failed": the replicas' own error, if it is ours
        failure = replica_error()
        serve.delete(APP_NAME)
        if failure is None:
            raise
        raise failure from err
    log.info("serving on http://%s:%d with %d Ray Serve replicas", host, port, replicas)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)  # this application only: a joined cluster may serve others
