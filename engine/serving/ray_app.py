"""The edit service on Ray Serve: a FastAPI ingress (the same API as ``ip2p serve``) in front of model replicas
that batch with ``@serve.batch``. ``build_app`` makes the application; ``serve_locally`` runs it.

Back-pressure: each replica takes ``max_ongoing_requests`` at once (``max_batch``) and its handle queues
``max_queued_requests`` (``max_queue``) more; past that the ingress answers 429. A replica that dies fails its
in-flight requests with 503; Serve restarts it and later requests succeed there.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from engine.errors import Cancelled, InputError
from engine.serving.app import create_app
from engine.serving.cli import API_KEY_ENV
from engine.serving.jobs import Job, JobTable, Outcome, Settings, batch_key, check_limits, job_config, run_batch
from engine.serving.metrics import Metrics
from engine.serving.schema import EditParameters
from engine.serving.worker import QueueFull, Unavailable

log = logging.getLogger("engine.serving")
APP_NAME = "ip2p"
POLL_S = 0.05


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class EditModel:
    """One replica: its own EditPipeline; concurrent requests are gathered by ``@serve.batch``."""

    def __init__(self, load: dict, settings: Settings):
        from engine.serving.service import serving_pipeline

        # one thread loads, warms up and runs every edit (see EditWorker: torch on a CPU is slow on a second one)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ip2p-edit")
        self.pipe = self._thread.submit(serving_pipeline, load, settings).result()
        self.settings = settings
        self.edit_batch.set_max_batch_size(settings.max_batch)
        self.edit_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        side = self.pipe.model.default_resolution
        self._thread.submit(self.pipe.edit, Image.new("RGB", (side, side), (127, 127, 127)), "warm up", steps=1,
                            seed=0).result()

    async def edit(self, image: Image.Image, params: EditParameters) -> Outcome:
        return await self.edit_batch((image, params))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def edit_batch(self, requests: list[tuple[Image.Image, EditParameters]]) -> list:
        """Edit a gathered batch: requests of one size, steps, sampler and guidance options share a pipeline
        call (one at a time: ``max_concurrent_batches`` is 1); each answer is its Outcome, or the InputError."""
        jobs, answers = [], [None] * len(requests)
        for i, (image, params) in enumerate(requests):
            try:
                config = job_config(params)
                check_limits(config, self.settings)
                jobs.append((i, Job(image, params, config, batch_key(config, self.pipe.edit_size(image.size,
                                                                                       config.resolution)), None)))
            except InputError as err:
                answers[i] = err
        groups: dict = {}
        for i, job in jobs:
            groups.setdefault(job.key, []).append((i, job))
        for members in groups.values():
            try:
                outcomes = await asyncio.get_running_loop().run_in_executor(
                    self._thread, run_batch, self.pipe, [job for _, job in members])
            except InputError as err:
                outcomes = [err] * len(members)
            for (i, _), outcome in zip(members, outcomes):
                answers[i] = outcome
        return answers

    def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError("the pipeline is not loaded")


class RayEditService:
    """The ingress side: the API's service over a handle to the EditModel replicas (no model loaded here)."""

    def __init__(self, handle, settings: Settings):
        self.handle, self.settings = handle, settings
        self.metrics = Metrics(settings.max_batch)
        self.jobs = JobTable(settings)
        self.ready = True
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """Nothing to start: the replicas are Serve's."""

    def submit(self, image: Image.Image, params: EditParameters) -> Job:
        config = job_config(params)
        check_limits(config, self.settings)
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
        job.state, sent = "running", time.perf_counter()
        self.metrics.in_flight.inc()
        response = self.handle.edit.remote(job.image, job.params.model_copy(update={"seed": job.seed}))
        waited = asyncio.ensure_future(_result(response))
        try:
            while not waited.done():
                await asyncio.wait([waited], timeout=POLL_S)
                if not waited.done() and (job.cancel_reason or job.expired(time.monotonic())):
                    job.cancel("timeout" if job.cancel_reason is None else job.cancel_reason)
                    response.cancel()
                    waited.cancel()
                    job.finish("cancelled")
                    return
            self._finish(job, waited, time.perf_counter() - sent)
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
            if isinstance(outcome, InputError):
                job.finish("failed", error=outcome, status=422)
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
        return None  # the replicas' queues are Serve's

    def queue_depth(self) -> int:
        return len(self.jobs.unfinished())

    def stop(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        while self.jobs.unfinished() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for job in self.jobs.unfinished():
            job.cancel("shutdown")


async def _result(response):
    return await response


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
    options: dict = dict(ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                         max_ongoing_requests=settings.max_batch, max_queued_requests=settings.max_queue)
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    model = EditModel.options(**options).bind(load, settings)
    return Ingress.bind(model, settings)


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
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise InputError(f"serve config args: unknown {', '.join(unknown)} (known: {', '.join(sorted(fields))}, "
                         f"{', '.join(LOAD_KEYS)}, replicas, num_cpus, num_gpus, autoscaling)")
    args.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)  # a secret belongs in the environment
    return build_app(load, Settings(**args), **shape)


def serve_locally(load: dict, settings: Settings, host: str, port: int, replicas: int, num_cpus: float,
                  num_gpus: float) -> None:
    """``ip2p serve --ray``: start (or join) Ray, run the application, block until interrupted."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(load, settings, replicas, num_cpus, num_gpus), name=APP_NAME, route_prefix="/")
    log.info("serving on http://%s:%d with %d Ray Serve replicas", host, port, replicas)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
