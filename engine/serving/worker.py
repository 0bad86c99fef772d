"""The single-machine service: a bounded queue, and one thread that owns the pipeline and runs its denoising loop,
with queued edits joining the running ones at every step (or, with request batching, only between batches)."""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

from PIL import Image

from engine.denoising import DenoisingLoop, Edit
from engine.errors import InputError
from engine.serving.interface import EditService, QueueFull, Unavailable, warm_up
from engine.serving.jobs import (FINISHED, Job, JobTable, Outcome, Settings, advance_tiles, batch_key, check_limits,
                                 check_size, job_config)
from engine.serving.metrics import Metrics
from engine.serving.schema import EditParameters

if TYPE_CHECKING:
    from engine.pipeline import EditPipeline

log = logging.getLogger(__name__)


class EditWorker(EditService):
    """Owns one EditPipeline: requests are queued and denoised on one thread, in one loop whose set of edits changes
    at every step (``settings.batching``: "step"; "request": batches of one key, run to the end)."""

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
        self.failure: BaseException | None = None  # a warm-up that failed: the worker stopped, and the server with it
        self._edit_seconds = 1.0  # running mean of an edit's wall time from its start, for Retry-After
        self._size: tuple[int, int] | None = None  # the edit size of the running edits
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(load_pipeline, loaded), name="ip2p-edit-worker",
                                        daemon=True)
        self._thread.start()
        self.pipe = loaded.result()

    # -- the request side (any thread) --------------------------------------------------------------------
    def submit(self, image: Image.Image, params: EditParameters) -> Job:
        """Queue an edit; InputError for settings the service refuses, QueueFull when there is no room."""
        settings = self.settings
        student = self.pipe.model.student
        config = job_config(params, student)
        check_limits(config, settings)
        if student is not None:  # a scale it was never trained on is refused with the request, not mid-run
            student.check_scales(config.text_guidance, config.image_guidance)
        size = self.pipe.edit_size(image.size, config.resolution)
        check_size(config, size, settings)
        job = Job(image, params, config, batch_key(config, size), settings.timeout, self.pipe.model.student is not None)
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

    @property
    def alive(self) -> bool:
        """Whether the worker thread still runs (it ends only when stopped, or when loading or warming up failed)."""
        return self._thread.is_alive()

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
        edits_at_once = max(1, self.settings.max_batch // 3)
        return max(1, math.ceil(len(self._queue) / edits_at_once * self._edit_seconds))

    # -- the worker thread ------------------------------------------------------------------------------
    def _loop(self, load_pipeline: Callable[[], "EditPipeline"], loaded: Future) -> None:
        """Load, warm up, then the denoising loop: newcomers admitted (and encoded) between steps, one step of every
        running edit, the finished ones decoded and answered, the cancelled ones taken out."""
        try:
            self.pipe = load_pipeline()
        except BaseException as err:  # the caller re-raises it: a bad model is one line from the CLI
            loaded.set_exception(err)
            return
        loaded.set_result(self.pipe)
        try:
            warm_up(self.pipe, self.settings.warmup)
        except Exception as err:  # e.g. a compile that cannot run here: never ready, and the server stops with it
            self._fail(err)
            return
        self.ready = True
        loop = self.pipe.denoising_loop(on_call=self._count_call)
        running: dict[Edit, Job] = {}
        while True:
            admitted = self._admit(loop)
            if admitted is None:
                return
            for job in admitted:
                self._begin(job, loop, running)
            if loop:
                self._step(loop, running)

    def _fail(self, err: Exception) -> None:
        """The warm-up failed: take no more edits, answer those queued meanwhile with 503, keep ``err`` as the
        ``failure`` the server stops with."""
        with self._lock:
            self.failure, self._stopping = err, True
            for job in self.jobs.unfinished():
                job.cancel("shutdown")
            self._queue.clear()
            self.metrics.queue_depth.set(0)
            self._lock.notify_all()

    def _admit(self, loop: DenoisingLoop) -> list[Job] | None:
        """The queued jobs that start now (None: stopped and nothing left). Step batching: jobs of the running
        edits' size join while their rows fit ``max_batch``, oldest first. Request batching: only into an empty
        loop, a batch of the oldest job's key, gathered for ``batch_wait_ms``. Waits only while nothing runs."""
        with self._lock:
            while True:
                self._drop_dead()
                if self._queue or loop:
                    break
                if self._stopping:
                    return None
                self._lock.wait(timeout=0.5)
            if self.settings.batching == "request":
                chosen = self._gather() if not loop else []
            else:
                chosen = self._joining(loop)
            for job in chosen:
                self._queue.remove(job)
            chosen = [job for job in chosen if job.start()]  # one cancelled meanwhile stays finished
            self.metrics.queue_depth.set(len(self._queue))
            return chosen

    def _joining(self, loop: DenoisingLoop) -> list[Job]:
        """Step batching: the oldest queued jobs, in order, that fit beside the running edits (caller holds the
        lock). A job of another size waits for the running ones to finish, and nothing overtakes it."""
        size = self._size if loop else None
        room, chosen = self.settings.max_batch - loop.rows(), []
        for job in self._queue:
            if size is not None and job.size != size or (job.rows > room and (loop or chosen)):
                break
            size, room = job.size, room - job.rows
            chosen.append(job)
        if chosen:
            self._size = size
        return chosen

    def _gather(self) -> list[Job]:
        """Request batching: the oldest job and the next ones of its key whose rows fit ``max_batch``, gathered for
        ``batch_wait_ms`` (caller holds the lock; the wait releases it)."""
        first = self._queue[0]
        gather_until = time.monotonic() + self.settings.batch_wait_ms / 1000
        while True:
            batch, rows = [], 0
            for job in self._queue:
                fits = not batch or rows + job.rows <= self.settings.max_batch
                if job.key == first.key and job.cancel_reason is None and fits:
                    batch.append(job)
                    rows += job.rows
            remaining = gather_until - time.monotonic()
            if rows >= self.settings.max_batch or remaining <= 0 or self._stopping:
                break
            self._lock.wait(timeout=remaining)
            self._drop_dead()
            if first not in self._queue:  # cancelled while gathering: start over with the next
                return []
        self._size = first.size
        return batch

    def _drop_dead(self) -> None:
        """Take cancelled and timed-out jobs out of the queue (cancelling answers them; caller holds the lock)."""
        for job in list(self._queue):
            job.cancel_if_expired()
            if job.cancel_reason is not None:
                self._queue.remove(job)
        self.metrics.queue_depth.set(len(self._queue))

    def _begin(self, job: Job, loop: DenoisingLoop, running: dict[Edit, Job]) -> None:
        """Encode a newcomer's text and image and add its edit to the loop; a refused one fails alone, one cancelled
        meanwhile (its image let go) is left out."""
        image = job.image
        if image is None or job.cancel_reason is not None:
            return
        job.timings["queue"] = time.monotonic() - job.created  # its wait, and the newcomers encoded before it
        self.metrics.join_wait.observe(job.timings["queue"])
        try:
            edit = self.pipe.begin(image, job.params.instruction, job.config, job.seed, job.scales,
                                   on_tiles=functools.partial(advance_tiles, [job]))
        except InputError as err:  # a request the pipeline refuses (e.g. a size outside a bundle's profile)
            job.finish("failed", error=err, status=422)
            return
        except Exception as err:  # an engine fault: this request fails, the worker goes on serving
            log.exception("starting job %s failed", job.id)
            job.finish("failed", error=RuntimeError(f"internal error: {type(err).__name__}"), status=500)
            return
        if job.cancel_reason is not None:  # cancelled while it was encoded
            return
        loop.add(edit)
        running[edit] = job
        self.metrics.in_flight.set(len(running))

    def _step(self, loop: DenoisingLoop, running: dict[Edit, Job]) -> None:
        """One step of every running edit; finished ones answered, cancelled and timed-out ones taken out."""
        try:
            finished = loop.step()
        except Exception as err:  # an engine fault: the running requests fail, the worker goes on serving
            log.exception("a denoising step of %d edits failed", len(running))
            for edit, job in running.items():
                loop.remove(edit)
                job.finish("failed", error=RuntimeError(f"internal error: {type(err).__name__}"), status=500)
            running.clear()
            finished = []
        for edit in finished:
            self._finish(running.pop(edit), edit)
        for edit, job in list(running.items()):
            job.cancel_if_expired()
            if job.cancel_reason is not None:  # answered when cancelled; no more rows from the next step on
                loop.remove(edit)
                del running[edit]
            else:
                job.steps_done = edit.done
                job.changed.set()
        self.metrics.in_flight.set(len(running))

    def _finish(self, job: Job, edit: Edit) -> None:
        """Decode a denoised edit and answer its job (unless it was cancelled at its last step)."""
        if job.state in FINISHED:
            return
        try:
            result = self.pipe.finish(edit)
        except Exception as err:
            log.exception("decoding job %s failed", job.id)
            job.finish("failed", error=RuntimeError(f"internal error: {type(err).__name__}"), status=500)
            return
        job.steps_done = edit.done
        job.timings.update(result.timings)
        job.finish("succeeded", Outcome(result.images[0], job.seed, result.unet_evaluations[0], dict(result.timings)))
        for stage, seconds in result.timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        elapsed = time.monotonic() - job.created - job.timings.get("queue", 0.0)
        self._edit_seconds = 0.8 * self._edit_seconds + 0.2 * elapsed

    def _count_call(self, rows: int, padded: int) -> None:
        self.metrics.batch_size.observe(rows)
        if padded:
            self.metrics.padded_rows.inc(padded)
