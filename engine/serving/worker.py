"""The single-machine service: a bounded queue, dynamic batching, and one thread that owns the pipeline."""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

from PIL import Image

from engine.errors import Cancelled, InputError
from engine.serving.interface import EditService, QueueFull, Unavailable, warm_up
from engine.serving.jobs import (FINISHED, Job, JobTable, Settings, advance, batch_key, check_limits, check_size,
                                 job_config, run_batch)
from engine.serving.metrics import Metrics
from engine.serving.schema import EditParameters

if TYPE_CHECKING:
    from engine.pipeline import EditPipeline

log = logging.getLogger(__name__)


class EditWorker(EditService):
    """Owns one EditPipeline: requests are queued, gathered into batches of one key, and run on one thread."""

    def __init__(self, load_pipeline: Callable[[], "EditPipeline"], settings: Settings, metrics: Metrics):
        """Start the worker thread, which loads the pipeline with ``load_pipeline()`` (errors are raised here),
        warms it up, and serves. Loading on the thread that runs the edits matters for torch on a CPU: a second
        thread running parallel regions makes OpenMP throttle its spinning (4 threads on 2 cores), and a 64x64
        edit took 2.5x as long as on the thread that loaded it (measured)."""
        self.settings, self.metrics = settings, metrics
        self._queue: deque[Job] = deque()
        self.jobs = JobTable(settings)  # every job still known
        self._lock = threading.Condition()
        self._stopping = False
        self.ready = False
        self._batch_seconds = 1.0  # running mean of a batch's wall time, for Retry-After
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(load_pipeline, loaded), name="ip2p-edit-worker",
                                        daemon=True)
        self._thread.start()
        self.pipe = loaded.result()

    # -- the request side (any thread) --------------------------------------------------------------------
    def submit(self, image: Image.Image, params: EditParameters) -> Job:
        """Queue an edit; InputError for settings the service refuses, QueueFull when there is no room."""
        settings = self.settings
        config = job_config(params)
        check_limits(config, settings)
        size = self.pipe.edit_size(image.size, config.resolution)
        check_size(config, size, settings)
        job = Job(image, params, config, batch_key(config, size), settings.timeout)
        with self._lock:
            if self._stopping or not self._thread.is_alive():
                raise Unavailable("the server is shutting down")
            self._drop_dead()  # cancelled jobs leave their places at once, not when the running batch ends
            if len(self._queue) >= settings.max_queue:
                raise QueueFull(self._retry_after())
            self._queue.append(job)
            self.jobs.add(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def forget(self, job: Job) -> None:
        """Drop a job whose answer was given directly (``/v1/edits``): it counts toward no retention limit."""
        self.jobs.forget(job)

    def position(self, job: Job) -> int | None:
        """0-based place in the queue, None once it left."""
        with self._lock:
            for i, queued in enumerate(self._queue):
                if queued is job:
                    return i
        return None

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def stop(self, drain_timeout: float) -> None:
        """Stop taking edits (503, and /readyz 503), let queued and running ones finish for up to
        ``drain_timeout`` s, cancel the rest (their clients get 503 with Retry-After), join. A second call
        returns once the first is done."""
        with self._lock:
            self._stopping = True
            self.ready = False
            self._lock.notify_all()
        deadline = time.monotonic() + drain_timeout
        while self._thread.is_alive() and time.monotonic() < deadline and self.jobs.unfinished():
            time.sleep(0.05)
        with self._lock:
            for job in self.jobs.unfinished():
                job.cancel("shutdown")
            self._lock.notify_all()
        self._thread.join(timeout=max(drain_timeout, 1.0))

    def _retry_after(self) -> int:
        batches = len(self._queue) / max(self.settings.max_batch, 1)
        return max(1, math.ceil(batches * self._batch_seconds))

    # -- the worker thread ------------------------------------------------------------------------------
    def _loop(self, load_pipeline: Callable[[], "EditPipeline"], loaded: Future) -> None:
        try:
            self.pipe = load_pipeline()
        except BaseException as err:  # the caller re-raises it: a bad model is one line from the CLI
            loaded.set_exception(err)
            return
        loaded.set_result(self.pipe)
        warm_up(self.pipe)
        self.ready = True
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest live job and up to max_batch - 1 others of its key, gathered for batch_wait_ms."""
        settings = self.settings
        with self._lock:
            while True:
                self._drop_dead()
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._lock.wait(timeout=0.5)
            first = self._queue[0]
            gather_until = time.monotonic() + settings.batch_wait_ms / 1000
            while True:
                batch = [j for j in self._queue if j.key == first.key and j.cancel_reason is None][: settings.max_batch]
                remaining = gather_until - time.monotonic()
                if len(batch) >= settings.max_batch or remaining <= 0 or self._stopping:
                    break
                self._lock.wait(timeout=remaining)
                self._drop_dead()
                if first not in self._queue:  # cancelled while gathering: start over with the next
                    return []
            for job in batch:
                self._queue.remove(job)
            batch = [job for job in batch if job.start()]  # one cancelled meanwhile stays finished
            for job in batch:
                job.timings["queue"] = time.monotonic() - job.created
            self.metrics.queue_depth.set(len(self._queue))
            return batch

    def _drop_dead(self) -> None:
        """Take cancelled and timed-out jobs out of the queue (cancelling answers them; caller holds the lock)."""
        for job in list(self._queue):
            job.cancel_if_expired()
            if job.cancel_reason is not None:
                self._queue.remove(job)
        self.metrics.queue_depth.set(len(self._queue))

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        self.metrics.batch_size.observe(len(batch))
        self.metrics.in_flight.inc(len(batch))

        start = time.perf_counter()
        try:
            outcomes = run_batch(self.pipe, batch, lambda done: advance(batch, done))
        except Cancelled:
            pass  # every job of the batch was cancelled, and answered then
        except InputError as err:  # a request the pipeline refuses (e.g. a size outside a bundle's profile)
            for job in batch:
                job.finish("failed", error=err, status=422)
        except Exception as err:  # an engine fault: the requests fail, the worker goes on serving
            log.exception("batch of %d failed", len(batch))
            for job in batch:
                job.finish("failed", error=RuntimeError(f"internal error: {type(err).__name__}"), status=500)
        else:
            for job, outcome in zip(batch, outcomes):
                if job.state not in FINISHED:  # else cancelled during the edit, and answered then
                    job.timings.update(outcome.timings)
                    job.finish("succeeded", outcome)
            for stage, seconds in outcomes[0].timings.items():
                self.metrics.stage_seconds.labels(stage).observe(seconds)
        finally:
            self.metrics.in_flight.dec(len(batch))
            elapsed = time.perf_counter() - start
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed

