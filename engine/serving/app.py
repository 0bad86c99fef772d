"""The HTTP API (FastAPI), the same for the single-machine worker and the Ray Serve app: ``create_app(service)``.

``service`` is an EditWorker or a RayEditService: ``submit(image, params) -> Job``, ``get``, ``forget``,
``position``, ``queue_depth``, ``ready``, and ``settings``/``metrics``.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from engine.errors import InputError
from engine.images import OUTPUT_FORMATS, decode_opened, encode_image, open_encoded
from engine.serving.jobs import FINISHED, Job
from engine.serving.schema import EditOutput, JobView, decode_base64, parse_parameters
from engine.serving.worker import QueueFull, Unavailable

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


class BadImage(InputError):
    """The uploaded image cannot be used (400; other bad input is 422)."""


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Gate:
    """ASGI middleware: request id, one log line per request, the API key, the body size limit, status metrics."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}
        route = _route_of(scope["path"])

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            refusal = self._refusal(scope["path"], headers)
            if refusal is None:
                receive, refusal = await self._buffered(receive, headers)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            metrics = self.service.metrics
            metrics.requests.labels(route, str(status["code"])).inc()
            metrics.request_seconds.labels(route).observe(elapsed)
            log.info("%s %s %s %d %.1f ms", request_id, scope["method"], scope["path"], status["code"], elapsed * 1000)

    def _refusal(self, path: str, headers: dict):
        key = self.service.settings.api_key
        if key is None or path in OPEN_PATHS:
            return None
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if hmac.compare_digest(given.encode(), key.encode()):
            return None
        return error(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY' or 'X-API-Key')",
                     {"WWW-Authenticate": "Bearer"})

    async def _buffered(self, receive, headers: dict):
        """The body read up to the limit (413 past it), replayed to the app; then the client's own messages."""
        limit = self.service.settings.max_body_bytes
        too_large = error(413, f"the request body is over this server's limit of {limit:,} bytes")
        if int(headers.get("content-length") or 0) > limit:
            return receive, too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
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


def _route_of(path: str) -> str:
    """A bounded label for metrics: job ids folded."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[1:3] == ["v1", "jobs"]:
        parts[3] = "{id}"
    return "/".join(parts)


async def read_edit(request: Request, service) -> tuple:
    """(RGB image, EditParameters) from a multipart form or JSON body; BadImage or InputError naming the problem."""
    content_type = request.headers.get("content-type", "")
    start = time.perf_counter()
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
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"body: invalid JSON ({err})") from None
        if not isinstance(body, dict):
            raise InputError("body: a JSON object is expected")
        try:
            data = decode_base64(body.pop("image", None))
        except InputError as err:
            raise BadImage(str(err)) from None
        fields = body
    else:
        raise InputError(f"content-type: send multipart/form-data or application/json, got {content_type or 'none'!r}")
    params = parse_parameters(fields)
    try:
        image = open_encoded(data, service.settings.max_pixels, "image")
        image = await off_loop(image.format, image.width * image.height, decode_opened, image, "image")
    except InputError as err:
        raise BadImage(str(err)) from None
    decode_s = time.perf_counter() - start
    service.metrics.stage_seconds.labels("read").observe(decode_s)
    return image, params, decode_s


async def off_loop(fmt: str | None, pixels: int, work, *args):
    """``work(*args)``, image decoding or encoding: on the event loop for an image within ``INLINE_PIXELS`` of its
    format, else in the thread pool."""
    if pixels <= INLINE_PIXELS.get((fmt or "").upper(), 0):
        return work(*args)
    return await run_in_threadpool(work, *args)


def submit(service, image, params, decode_s: float) -> Job:
    job = service.submit(image, params)
    job.timings["read"] = decode_s
    return job


def output_format(job: Job, request: Request) -> str:
    """The format asked for: the request's ``output_format`` field, else the first image type its Accept header
    names, else PNG."""
    if job.params.output_format:
        return job.params.output_format
    accept = request.headers.get("accept", "")
    named = [(accept.find(media), name) for name, (_, media, _) in OUTPUT_FORMATS.items() if media in accept]
    return min(named)[1] if named else "png"


async def encoded(job: Job, service, fmt: str) -> bytes:
    """The job's image in ``fmt``, encoded once per format."""
    if fmt not in job.encoded:
        start = time.perf_counter()
        image = job.future.result().image
        job.encoded[fmt] = await off_loop(fmt, image.width * image.height, encode_image, image, fmt)
        job.timings["write"] = time.perf_counter() - start
        service.metrics.stage_seconds.labels("write").observe(job.timings["write"])
    return job.encoded[fmt]


def image_response(job: Job, fmt: str, data: bytes) -> Response:
    outcome = job.future.result()
    return Response(data, media_type=OUTPUT_FORMATS[fmt][1], headers={
        "X-Seed": str(outcome.seed), "X-Unet-Evaluations": str(outcome.unet_evaluations),
        "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in job.timings.items())})


async def output_of(job: Job, service, fmt: str = "png") -> EditOutput:
    data = await encoded(job, service, fmt)
    outcome = job.future.result()
    return EditOutput(image=base64.b64encode(data).decode(), media_type=OUTPUT_FORMATS[fmt][1], seed=outcome.seed,
                      steps=job.config.steps, text_guidance=job.config.text_guidance,
                      image_guidance=job.config.image_guidance, unet_evaluations=outcome.unet_evaluations,
                      timings=dict(job.timings))


async def view_of(job: Job, service, with_result: bool = True, fmt: str = "png") -> JobView:
    result = await output_of(job, service, fmt) if with_result and job.state == "succeeded" else None
    position = service.position(job) if job.state == "queued" else None
    return JobView(id=job.id, state=job.state, position=position, steps_done=job.steps_done,
                   steps=job.config.steps, error=job.error or (job.cancel_reason if job.state == "cancelled" else None),
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


def create_app(service, title: str = "ip2p edit service") -> FastAPI:
    """The HTTP API over ``service``."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.start()
        yield
        await run_in_threadpool(service.stop, service.settings.drain_timeout)

    app = FastAPI(title=title, docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.add_middleware(Gate, service=service)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # never a traceback in a response
        log.exception("%s: unexpected error", request.scope.get("state", {}).get("request_id"))
        return error(500, f"internal error: {type(err).__name__}")

    async def accepted(request: Request):
        """Read and queue an edit; or the error response that refuses it."""
        try:
            image, params, decode_s = await read_edit(request, service)
            return submit(service, image, params, decode_s)
        except BadImage as err:
            return error(400, str(err))
        except InputError as err:
            return error(422, str(err))
        except QueueFull as err:
            return error(429, str(err), {"Retry-After": str(err.retry_after)})
        except Unavailable as err:
            return error(503, str(err), {"Retry-After": "5"})

    @app.post("/v1/edits")
    async def edits(request: Request):
        job = await accepted(request)
        if not isinstance(job, Job):
            return job
        waited = asyncio.wrap_future(job.future)
        try:
            while not waited.done():
                await asyncio.wait([waited], timeout=DISCONNECT_POLL_S)  # returns at once when done
                if not waited.done() and await request.is_disconnected():
                    job.cancel("disconnected")
                    return error(499, "the client went away")
                if not waited.done() and job.expired(time.monotonic()):
                    job.cancel("timeout")  # the worker frees itself at the next step
                    return failure(job)
            if job.state != "succeeded":
                waited.exception()  # retrieved, so asyncio does not log it
                return failure(job)
            fmt = output_format(job, request)
            if "application/json" in request.headers.get("accept", ""):
                return JSONResponse((await output_of(job, service, fmt)).model_dump())
            return image_response(job, fmt, await encoded(job, service, fmt))
        finally:
            if not waited.done():
                job.cancel("disconnected")
            service.forget(job)

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request):
        job = await accepted(request)
        if not isinstance(job, Job):
            return job
        view = await view_of(job, service)
        return JSONResponse(view.model_dump(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    def find(job_id: str) -> Job | None:
        return service.get(job_id)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        job = find(job_id)
        if job is None:
            return error(404, f"no job {job_id} (finished results are kept {service.settings.result_ttl:g} s)")
        return (await view_of(job, service, fmt=output_format(job, request))).model_dump()

    @app.get("/v1/jobs/{job_id}/image")
    async def job_image(job_id: str, request: Request):
        job = find(job_id)
        if job is None:
            return error(404, f"no job {job_id}")
        if job.state != "succeeded":
            return error(409, f"job {job_id} is {job.state}")
        fmt = output_format(job, request)
        return image_response(job, fmt, await encoded(job, service, fmt))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job = find(job_id)
        if job is None:
            return error(404, f"no job {job_id}")
        job.cancel("cancelled")
        return (await view_of(job, service, with_result=False)).model_dump()

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        job = find(job_id)
        if job is None:
            return error(404, f"no job {job_id}")

        async def stream():
            last, quiet = None, 0.0
            while True:
                view = await view_of(job, service, with_result=False)
                state = (view.state, view.position, view.steps_done)
                if state != last:
                    last, quiet = state, 0.0
                    yield f"event: {'done' if view.state in FINISHED else 'progress'}\ndata: {view.model_dump_json()}\n\n"
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

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if service.ready:
            return {"status": "ready", "queue_depth": service.queue_depth()}
        return error(503, "the model is loading or warming up")

    @app.get("/metrics")
    async def metrics():
        service.metrics.queue_depth.set(service.queue_depth())
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("engine.serving").joinpath("page.html").read_text(encoding="utf-8")

    return app
