"""The HTTP API (FastAPI), the same for the single-machine worker and the Ray Serve app: ``create_app(service)``
over an EditService (``interface.py``).

Every error is ``{"error": "..."}`` with a 4xx (or 503 while unavailable); what a client sends never causes a 5xx.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match

from engine.errors import InputError, one_line
from engine.images import decode_opened, open_encoded
from engine.serving.encoders import OUTPUT_FORMATS, encode_image
from engine.serving.interface import EditService, QueueFull, Unavailable
from engine.serving.jobs import FINISHED, Job
from engine.serving.schema import EditOutput, EditParameters, JobView, decode_base64, parse_parameters

log = logging.getLogger("engine.serving")
OPEN_PATHS = ("/healthz", "/readyz", "/")  # answered without the API key
STREAM_POLL_S = 0.1  # how often an SSE stream looks at its job
DISCONNECT_POLL_S = 0.2  # how often a waiting /v1/edits looks for a client that went away
KEEPALIVE_S = 15.0
# Pixels up to which an image of each format is decoded or encoded on the event loop rather than in the thread
# pool: a round trip through the pool costs 0.1-0.4 ms on a busy 2-core host, as much as a 512x512 JPEG's decode
# (~0.7 ms), and these sizes take 1-2 ms at most. Bigger images, and other formats, go to the pool, so that no
# other connection waits on one long decode or encode.
INLINE_PIXELS = {"JPEG": 512 * 512, "PNG": 128 * 128, "WEBP": 128 * 128}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # a client's X-Request-Id is logged only if it looks like one
UNMATCHED = "unmatched"  # the metrics label of every path no route matches


class BadImage(InputError):
    """The uploaded image cannot be used (400; other bad input is 422)."""


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Gate:
    """ASGI middleware: request id, one log line per request, the cap on requests in progress, the API key, the
    body size limit and read deadline, status metrics labelled by route template (bounded: one label per route,
    one for every unknown path)."""

    def __init__(self, app, service: EditService, router):
        self.app, self.service, self.router = app, service, router
        self.active = 0  # requests in progress, health checks left out (only the event loop changes it)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given_id = headers.get("x-request-id", "")
        request_id = given_id if REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}
        route = self._route_of(scope)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        counted = scope["path"] not in OPEN_PATHS
        self.active += counted
        try:
            refusal = self._refusal(scope["path"], headers)
            if refusal is None and counted and self.active > self.service.settings.max_connections:
                refusal = error(503, f"this server has {self.service.settings.max_connections} requests in progress, "
                                     "its limit", {"Retry-After": "1"})
            if refusal is None:
                receive, refusal = await self._buffered(receive, headers)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self.active -= counted
            elapsed = time.perf_counter() - start
            metrics = self.service.metrics
            metrics.requests.labels(route, str(status["code"])).inc()
            metrics.request_seconds.labels(route).observe(elapsed)
            log.info("%s %s %s %d %.1f ms", request_id, scope["method"], one_line(scope["path"], 120), status["code"],
                     elapsed * 1000)

    def _route_of(self, scope) -> str:
        """The template of the route ``scope`` asks for (``/v1/jobs/{job_id}``), else ``unmatched``."""
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:  # PARTIAL: the path matches, not the method (405)
                return route.path
        return UNMATCHED

    def _refusal(self, path: str, headers: dict):
        key = self.service.settings.api_key
        if key is None or path in OPEN_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        given = headers.get("x-api-key") or (token.strip() if scheme.lower() == "bearer" else "")
        if hmac.compare_digest(given.encode(), key.encode()):
            return None
        return error(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY' or 'X-API-Key')",
                     {"WWW-Authenticate": "Bearer"})

    async def _buffered(self, receive, headers: dict):
        """The body read up to the limit (413 past it) within the read deadline (408 past it), replayed to the
        app; then the client's own messages."""
        settings = self.service.settings
        limit = settings.max_body_bytes
        too_large = error(413, f"the request body is over this server's limit of {limit:,} bytes")
        length = headers.get("content-length", "0").strip() or "0"
        if not length.isdigit() or len(length) > 15 or int(length) > limit:
            return receive, too_large
        deadline = time.monotonic() + settings.read_timeout
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                return receive, error(408, f"the request body did not arrive within {settings.read_timeout:g} s",
                                      {"Connection": "close"})
            if message["type"] == "http.disconnect":
                return receive, error(400, "the client went away")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return receive, too_large
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


async def read_edit(request: Request, service: EditService) -> tuple:
    """(the upload's bytes, EditParameters) from a multipart form or JSON body; BadImage or InputError naming the
    problem."""
    content_type = request.headers.get("content-type", "").lower()  # media types are case-insensitive
    if content_type.startswith("multipart/form-data") or content_type.startswith("application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=32, max_part_size=service.settings.max_body_bytes)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadImage("image: missing (send the file as the multipart field 'image')")
        data = await upload.read()
        fields = {k: v for k, v in form.items() if k != "image"}
    elif content_type.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as err:  # bad syntax or encoding, a 5000-digit number, deep nesting
            raise InputError(f"body: invalid JSON ({one_line(err, 120)})") from None
        if not isinstance(body, dict):
            raise InputError("body: a JSON object is expected")
        try:
            data = decode_base64(body.pop("image", None))
        except InputError as err:
            raise BadImage(str(err)) from None
        fields = body
    else:
        raise InputError(f"content-type: send multipart/form-data or application/json, got "
                         f"{one_line(content_type, 80) or 'none'!r}")
    return data, parse_parameters(fields)


async def submit_upload(data: bytes, params: EditParameters, service: EditService) -> Job:
    """The upload decoded to RGB and queued, its bytes reserved in the service's budget from before the decode
    until the job counts them itself (QueueFull when they do not fit); BadImage naming a bad image."""
    try:
        opened = open_encoded(data, service.settings.max_pixels, "image")
    except InputError as err:
        raise BadImage(str(err)) from None
    with service.jobs.room_for(opened.width * opened.height * 3):  # RGB, as the job will hold it
        try:
            image = await off_loop(opened.format, opened.width * opened.height, decode_opened, opened, "image")
        except InputError as err:
            raise BadImage(str(err)) from None
        return service.submit(image, params)


async def off_loop(fmt: str | None, pixels: int, work, *args):
    """``work(*args)``, image decoding or encoding: on the event loop for an image within ``INLINE_PIXELS`` of its
    format, else in the thread pool."""
    if pixels <= INLINE_PIXELS.get((fmt or "").upper(), 0):
        return work(*args)
    return await run_in_threadpool(work, *args)


def output_format(job: Job, request: Request) -> str:
    """The format asked for: the request's ``output_format`` field, else the first image type its Accept header
    names, else PNG."""
    if job.params.output_format:
        return job.params.output_format
    accept = request.headers.get("accept", "")
    named = [(accept.find(media), name) for name, (_, media, _) in OUTPUT_FORMATS.items() if media in accept]
    return min(named)[1] if named else "png"


async def encoded(job: Job, service: EditService, fmt: str) -> bytes:
    """The job's image in ``fmt``, encoded once per format while the decoded result is held. A job that keeps
    only its encoded answer (``keep_encoded``: PNG unless the request named a format) is decoded from it for
    another format, which is not kept."""
    if fmt in job.encoded:
        return job.encoded[fmt]
    start = time.perf_counter()
    image = job.future.result().image
    kept = image is None
    if kept:
        image = await run_in_threadpool(decode_opened, open_encoded(next(iter(job.encoded.values()))))
    data = await off_loop(fmt, image.width * image.height, encode_image, image, fmt)
    if not kept:
        job.encoded[fmt] = data
        job.timings["write"] = time.perf_counter() - start
        service.metrics.stage_seconds.labels("write").observe(job.timings["write"])
    return data


async def keep_encoded(job: Job, service: EditService) -> None:
    """Once a queued job (``/v1/jobs``) finishes: its answer encoded in the format it asked for (PNG unless it
    named one), and only those bytes kept."""
    try:
        await asyncio.wrap_future(job.future)
    except Exception:  # noqa: BLE001 - a failed or cancelled job holds no image
        return
    fmt = job.params.output_format or "png"
    job.keep_encoded(fmt, await encoded(job, service, fmt))


def image_response(job: Job, fmt: str, data: bytes) -> Response:
    outcome = job.future.result()
    return Response(data, media_type=OUTPUT_FORMATS[fmt][1], headers={
        "X-Seed": str(outcome.seed), "X-Unet-Evaluations": str(outcome.unet_evaluations),
        "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in job.timings.items())})


async def output_of(job: Job, service: EditService, fmt: str = "png") -> EditOutput:
    data = await encoded(job, service, fmt)
    outcome = job.future.result()
    return EditOutput(image=base64.b64encode(data).decode(), media_type=OUTPUT_FORMATS[fmt][1], seed=outcome.seed,
                      steps=job.config.steps, text_guidance=job.config.text_guidance,
                      image_guidance=job.config.image_guidance, unet_evaluations=outcome.unet_evaluations,
                      timings=dict(job.timings))


async def view_of(job: Job, service: EditService, with_result: bool = True, fmt: str = "png") -> JobView:
    job.cancel_if_expired()
    result = await output_of(job, service, fmt) if with_result and job.state == "succeeded" else None
    position = service.position(job) if job.state == "queued" else None
    return JobView(id=job.id, state=job.state, position=position, steps_done=job.steps_done,
                   steps=job.config.steps, tiles=job.tiles if job.state == "running" else None, error=job.error or (job.cancel_reason if job.state == "cancelled" else None),
                   result=result)


def failure(job: Job) -> JSONResponse:
    """The answer of a job that did not succeed."""
    if job.cancel_reason == "timeout":
        return error(504, f"the edit did not finish within this server's timeout of {job_timeout(job):g} s")
    if job.cancel_reason == "shutdown":
        return error(503, "the server shut down before the edit finished", {"Retry-After": "1"})
    if job.state == "cancelled":
        return error(409, f"the edit was cancelled ({job.cancel_reason})")
    return error(job.status or 500, job.error or "the edit failed")


def job_timeout(job: Job) -> float:
    return (job.deadline or job.created) - job.created


def _retrieve(future: asyncio.Future) -> None:
    """Done callback: the outcome looked at, so asyncio does not log a failed edit nobody waited for."""
    if not future.cancelled():
        future.exception()


def create_app(service: EditService, title: str = "ip2p edit service") -> FastAPI:
    """The HTTP API over ``service``."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await run_in_threadpool(service.stop, service.settings.drain_timeout)

    app = FastAPI(title=title, docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.add_middleware(Gate, service=service, router=app.router)
    add_error_handlers(app)
    for add_routes in (add_edit_routes, add_job_routes, add_event_routes, add_health_routes):
        add_routes(app, service)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": one line}; never a traceback in a response."""

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException):  # 404, 405, the multipart parser's limits
        return error(err.status_code, one_line(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        return error(422, one_line(err.errors()[0].get("msg", "invalid request") if err.errors() else err))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # never a traceback in a response
        log.exception("%s: unexpected error", request.scope.get("state", {}).get("request_id"))
        return error(500, f"internal error: {type(err).__name__}")


async def accepted(request: Request, service: EditService) -> Job | Response:
    """Read, decode and queue an edit; or the error response that refuses it."""
    start = time.perf_counter()
    try:
        data, params = await read_edit(request, service)
        job = await submit_upload(data, params, service)
    except BadImage as err:
        return error(400, str(err))
    except InputError as err:
        return error(422, str(err))
    except QueueFull as err:
        return error(429, str(err), {"Retry-After": str(err.retry_after)})
    except Unavailable as err:
        return error(503, str(err), {"Retry-After": "5"})
    job.timings["read"] = time.perf_counter() - start  # parsed, decoded and queued
    service.metrics.stage_seconds.labels("read").observe(job.timings["read"])
    return job


def add_edit_routes(app: FastAPI, service: EditService) -> None:
    """POST /v1/edits: an edit answered in the same request."""
    @app.post("/v1/edits")
    async def edits(request: Request):
        job = await accepted(request, service)
        if not isinstance(job, Job):
            return job
        waited = asyncio.wrap_future(job.future)
        waited.add_done_callback(_retrieve)
        try:
            while not waited.done():
                await asyncio.wait([waited], timeout=DISCONNECT_POLL_S)  # returns at once when done
                if not waited.done() and await request.is_disconnected():
                    job.cancel("disconnected")
                    return error(499, "the client went away")
                job.cancel_if_expired()  # answered at once; the worker frees itself at the next step
            if job.state != "succeeded":
                return failure(job)
            fmt = output_format(job, request)
            if "application/json" in request.headers.get("accept", ""):
                return JSONResponse((await output_of(job, service, fmt)).model_dump())
            return image_response(job, fmt, await encoded(job, service, fmt))
        finally:
            if not waited.done():
                job.cancel("disconnected")
            service.forget(job)


def add_job_routes(app: FastAPI, service: EditService) -> None:
    """/v1/jobs: an edit queued and looked up later (its result, its progress as server-sent events)."""
    keepers: set[asyncio.Task] = set()  # keep_encoded tasks of queued jobs

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request):
        job = await accepted(request, service)
        if not isinstance(job, Job):
            return job
        keeper = asyncio.get_running_loop().create_task(keep_encoded(job, service))
        keepers.add(keeper)
        keeper.add_done_callback(keepers.discard)
        view = await view_of(job, service)
        return JSONResponse(view.model_dump(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        job = service.get(job_id)
        if job is None:
            return error(404, f"no job {job_id} (finished results are kept {service.settings.result_ttl:g} s)")
        return (await view_of(job, service, fmt=output_format(job, request))).model_dump()

    @app.get("/v1/jobs/{job_id}/image")
    async def job_image(job_id: str, request: Request):
        job = service.get(job_id)
        if job is None:
            return error(404, f"no job {job_id}")
        if job.state != "succeeded":
            return error(409, f"job {job_id} is {job.state}")
        fmt = output_format(job, request)
        return image_response(job, fmt, await encoded(job, service, fmt))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        """A queued or running job is cancelled (and shown as such until its result would expire); a finished
        one is deleted with its result."""
        job = service.get(job_id)
        if job is None:
            return error(404, f"no job {job_id}")
        if job.state in FINISHED:
            service.forget(job)
        job.cancel("cancelled")
        return (await view_of(job, service, with_result=False)).model_dump()


def add_event_routes(app: FastAPI, service: EditService) -> None:
    """GET /v1/jobs/{id}/events: a job's progress as server-sent events, ending with its final state."""
    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        job = service.get(job_id)
        if job is None:
            return error(404, f"no job {job_id}")

        async def stream():
            last, quiet = None, 0.0
            while True:
                view = await view_of(job, service, with_result=False)
                state = (view.state, view.position, view.steps_done, view.tiles)
                if state != last:
                    last, quiet = state, 0.0
                    event = "done" if view.state in FINISHED else "progress"
                    yield f"event: {event}\ndata: {view.model_dump_json()}\n\n"
                    if view.state in FINISHED:
                        return
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(STREAM_POLL_S)
                quiet += STREAM_POLL_S

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def add_health_routes(app: FastAPI, service: EditService) -> None:
    """Liveness, readiness, metrics and the page."""
    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz():
        if service.ready:
            return {"status": "ready", "queue_depth": service.queue_depth()}
        return error(503, "the model is loading, warming up or shutting down", {"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        service.metrics.queue_depth.set(service.queue_depth())
        service.metrics.held_bytes.set(service.jobs.held_bytes())
        text = await run_in_threadpool(service.metrics.render)  # no edit or health check waits on it
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("engine.serving").joinpath("page.html").read_text(encoding="utf-8")

