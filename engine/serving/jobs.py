"""An edit request inside the service: its settings, its state, and how a batch of them runs on the pipeline."""
from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Hashable, Iterator

from PIL import Image

from engine.config import EditConfig, Student
from engine.errors import Cancelled, InputError
from engine.guidance import needed_branches
from engine.presets import preset_config
from engine.serving.interface import QueueFull
from engine.serving.schema import EditParameters, draw_seed

FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Outcome:
    """What a finished edit produced; ``image`` is let go once the answer is kept encoded (``Job.keep_encoded``)."""

    image: Image.Image | None
    seed: int
    unet_evaluations: int
    timings: dict[str, float]


class Job:
    """One request: decoded image, resolved config and seed, and its progress; ``future`` holds the Outcome.

    The decoded input is let go when the job finishes; a finished job keeps its answer, encoded once it is
    (``keep_encoded``). ``held_bytes`` is what it holds in images, for the service's byte budget."""

    def __init__(self, image: Image.Image, params: EditParameters, config: EditConfig, key: Hashable,
                 timeout: float | None, distilled: bool = False):
        """``distilled``: the model is a student (one UNet row a step, whatever the scales)."""
        self.id = uuid.uuid4().hex
        self.image, self.params, self.config, self.key = image, params, config, key
        self.distilled = distilled
        self.seed = params.seed if params.seed is not None else draw_seed()
        self.created = time.monotonic()
        self.deadline = None if timeout is None else self.created + timeout
        self.state, self.steps_done, self.error = "queued", 0, None
        self.tiles: tuple[str, int, int] | None = None  # (stage, done, total) of a tiled VAE while it runs
        self.cancel_reason: str | None = None  # set by cancel(): "cancelled", "timeout", "disconnected", ...
        self.future: Future = Future()
        self.finished_at: float | None = None
        self.timings: dict[str, float] = {}
        self.encoded: dict[str, bytes] = {}  # the answer's bytes by output format, encoded once each
        self.status: int | None = None
        self.changed = threading.Event()  # set on every change; SSE streams wait on it
        self._state_lock = threading.Lock()  # the worker and the event loop both start, cancel and finish jobs

    @property
    def scales(self) -> tuple[float, float]:
        return self.config.text_guidance, self.config.image_guidance

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) the edit runs at: jobs of one size can share UNet calls."""
        return self.key[0]

    @property
    def rows(self) -> int:
        """UNet rows a step of this edit takes at most: one per branch its scales weigh (eq. 3); a student's one."""
        return 1 if self.distilled else len(needed_branches(*self.scales))

    def start(self) -> bool:
        """Mark a queued job running; False if it was cancelled meanwhile (the worker leaves it out)."""
        with self._state_lock:
            if self.state != "queued" or self.cancel_reason is not None:
                return False
            self.state = "running"
        self.changed.set()
        return True

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the job: it is answered as cancelled at once, and the worker drops it before it runs or at the
        next denoising step."""
        with self._state_lock:
            if self.cancel_reason is not None or self.state in FINISHED:
                return
            self.cancel_reason = reason
        self.finish("cancelled")

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def cancel_if_expired(self) -> None:
        """Cancel the job as timed out once its deadline has passed, whoever looks first (worker, handler, view)."""
        if self.expired(time.monotonic()):
            self.cancel("timeout")

    def finish(self, state: str, outcome: Outcome | None = None, error: BaseException | None = None,
               status: int | None = None) -> None:
        """End the job, once (later calls do nothing); ``status`` is the HTTP status a failure answers (422 bad
        input, 503 unavailable). The decoded input is let go."""
        with self._state_lock:
            if self.state in FINISHED:
                return
            self.state, self.finished_at, self.status = state, time.monotonic(), status
            self.error = None if error is None else str(error)
            self.image = None
        if outcome is not None:
            self.future.set_result(outcome)
        else:
            self.future.set_exception(error or Cancelled(self.cancel_reason or "cancelled"))
        self.changed.set()

    def keep_encoded(self, fmt: str, data: bytes) -> None:
        """Keep a succeeded job's answer as ``data`` (encoded in ``fmt``) only: the decoded result is let go."""
        self.encoded = {fmt: data}
        self.future.result().image = None

    def held_bytes(self) -> int:
        """Bytes of image data the job holds: its decoded input until it finishes, then its answer (decoded until
        ``keep_encoded``, and every encoding made)."""
        held = sum(len(data) for data in self.encoded.values())
        images = [self.image]
        if self.state == "succeeded" and self.future.done():
            images.append(self.future.result().image)
        return held + sum(image.width * image.height * len(image.getbands()) for image in images if image is not None)


def job_config(params: EditParameters, student: Student | None = None) -> EditConfig:
    """The EditConfig a request asks for (InputError naming a bad setting); a distilled ``student``'s presets are
    its own step counts."""
    resolution = {"auto": "auto", "none": None}.get(params.resolution, params.resolution)  # type: ignore[arg-type]
    return preset_config(params.preset, dict(resolution=resolution, keep_detail=params.keep_detail), student,
                         steps=params.steps, sampler=params.sampler,
                         text_guidance=params.text_guidance, image_guidance=params.image_guidance)


def batch_key(config: EditConfig, size: tuple[int, int]) -> Hashable:
    """Requests with equal keys share a denoising call: same size, steps, sampler and guidance options; the
    scales may differ (per image in the loop)."""
    return size, dataclasses.replace(config, text_guidance=0.0, image_guidance=0.0)


def check_limits(config: EditConfig, settings: "Settings") -> None:
    """Refuse the steps and resolution this server does not run (InputError naming the limit)."""
    if config.steps > settings.max_steps:
        raise InputError(f"steps: at most {settings.max_steps} on this server, got {config.steps}")
    if isinstance(config.resolution, int) and config.resolution > settings.max_resolution:
        raise InputError(f"resolution: at most {settings.max_resolution} on this server, got {config.resolution}")


def check_size(config: EditConfig, size: tuple[int, int], settings: "Settings") -> None:
    """Refuse an edit size (width, height) this server does not run. ``resolution=none`` edits at the input's own
    size: its long side obeys --max-resolution as an asked-for resolution does."""
    width, height = size
    if config.resolution is None and max(size) > settings.max_resolution:
        raise InputError(f"resolution: 'none' would edit at the image's {width}x{height}, over this server's limit "
                         f"of {settings.max_resolution} px a side; ask for a resolution")
    if width * height > settings.max_pixels:
        raise InputError(f"the edit would run at {width}x{height}, over this server's limit of "
                         f"{settings.max_pixels:,} pixels; ask for a smaller resolution")


class JobTable:
    """Jobs by id; finished ones are kept ``result_ttl`` seconds, at most ``max_results`` of them, and the oldest
    let go first when the images held by all jobs would pass ``max_held_bytes``."""

    def __init__(self, settings: "Settings"):
        self.settings = settings
        self._jobs: dict[str, Job] = {}  # insertion order: oldest first
        self._lock = threading.Lock()
        self._reserved = 0  # bytes promised to uploads being decoded

    @contextmanager
    def room_for(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget while an upload is decoded and queued (its job then counts itself);
        QueueFull when even without finished jobs there is no room."""
        budget = self.settings.max_held_bytes
        with self._lock:
            self._prune()
            held = self._held()
            finished = [(job, job.held_bytes()) for job in self._jobs.values() if job.state in FINISHED]
            if held - sum(size for _, size in finished) + nbytes > budget:
                raise QueueFull(2, f"this server holds its limit of {budget / 2**20:,.0f} MB of images")
            for job, size in finished:  # oldest first
                if held + nbytes <= budget:
                    break
                held -= size
                del self._jobs[job.id]
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= nbytes

    def held_bytes(self) -> int:
        """Bytes of image data held by every known job, and promised to uploads being decoded."""
        with self._lock:
            return self._held()

    def _held(self) -> int:
        return self._reserved + sum(job.held_bytes() for job in self._jobs.values())

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            self._prune()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._prune()
            return self._jobs.get(job_id)

    def forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def unfinished(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state not in FINISHED]

    def _prune(self) -> None:
        now = time.monotonic()
        for job in self._jobs.values():
            if job.state not in FINISHED:
                job.cancel_if_expired()
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        excess = len(finished) - self.settings.max_results
        for job in finished:
            if excess > 0 or now - job.finished_at > self.settings.result_ttl:
                del self._jobs[job.id]
                excess -= 1


def advance_tiles(batch: list[Job], stage: str, done: int, total: int) -> None:
    """Record a tiled VAE's progress on every running job of ``batch`` (``EditPipeline.begin``'s ``on_tiles``)."""
    for job in batch:
        if job.state == "running":
            job.tiles = (stage, done, total)
            job.changed.set()


@dataclass
class Settings:
    """How the service batches, queues and limits work (CLI flags of ``ip2p serve``)."""

    max_batch: int = 12  # UNet rows per call: an edit at both guidance scales takes 3
    batching: str = "step"  # "step": edits join the running ones at every step; "request": whole batches
    batch_wait_ms: float = 10.0  # request batching: how long a batch's first request waits for others
    max_queue: int = 64
    timeout: float | None = 120.0  # seconds per request, queue included
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 16_000_000
    max_steps: int = 100
    max_resolution: int = 1024
    result_ttl: float = 600.0  # seconds a finished job's result is kept
    max_results: int = 256
    max_held_bytes: int = 1024 * 2**20  # images held by queued and finished jobs; 429 past it
    read_timeout: float = 30.0  # seconds a client may take to send a request body; 408 past it
    max_connections: int = 256  # requests in progress (each holds a connection), health checks exempt; 503 past it
    drain_timeout: float = 30.0  # seconds queued work may take to finish on shutdown
    api_key: str | None = field(default=None, repr=False)
    warmup: tuple[tuple[int, int], ...] = ()  # edit sizes (width, height) warmed up before ready; (): the model's

    def __post_init__(self) -> None:
        if self.batching not in ("step", "request"):
            raise InputError(f"batching: 'step' or 'request', got {self.batching!r}")
        if any(not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0) for w, h in self.warmup):
            raise InputError(f"warmup: sizes are positive WIDTHxHEIGHT pixels, got {self.warmup!r}")
