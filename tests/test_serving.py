"""The edit service over real HTTP on loopback: answers, batching, back-pressure, jobs, limits and faults."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from engine import EditPipeline
from engine.errors import InputError
from engine.serving.encoders import encode_image
from engine.serving.jobs import Settings
from tests.serving_server import BUNDLE_LOAD, free_port, local_server, ray_server, wait_ready

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "shapes.png")
INSTRUCTION = "make the circle blue"


SHARED = Settings(max_batch=12, batch_wait_ms=50, max_queue=32, max_steps=2000, timeout=60)


@pytest.fixture(scope="module", params=["local", "ray"])
def server(request):
    """The same API tests run against ``ip2p serve`` and the Ray Serve app (two CPU replicas)."""
    if request.param == "local":
        with local_server(SHARED) as running:
            yield running
    else:
        with ray_server(SHARED) as running:
            yield running


@pytest.fixture(scope="module")
def local():
    with local_server(SHARED) as running:
        yield running


@pytest.fixture(scope="module")
def library():
    return EditPipeline.from_pretrained(**BUNDLE_LOAD, progress=False)


def png_bytes() -> bytes:
    with open(EXAMPLE, "rb") as f:
        return f.read()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def post_edit(url: str, timeout: float = 60, **fields) -> httpx.Response:
    fields.setdefault("instruction", INSTRUCTION)
    return httpx.post(f"{url}/v1/edits", files={"image": ("shapes.png", png_bytes(), "image/png")},
                      data={k: str(v) for k, v in fields.items()}, timeout=timeout)


def solo(library, seed: int, **settings) -> np.ndarray:
    return np.asarray(library.edit(EXAMPLE, settings.pop("instruction", INSTRUCTION), seed=seed, **settings).images[0])


def test_multipart_edit_answers_the_png_of_the_library_edit(server, library):
    url, _ = server
    response = post_edit(url, seed=3)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "3" and response.headers["x-request-id"]
    np.testing.assert_array_equal(pixels(response.content), solo(library, 3))


def test_json_edit_answers_json_with_seed_scales_and_timings(server, library):
    url, _ = server
    body = {"instruction": INSTRUCTION, "image": base64.b64encode(png_bytes()).decode(), "steps": 8,
            "text_guidance": 5.0, "image_guidance": 1.0}
    response = httpx.post(f"{url}/v1/edits", json=body, headers={"Accept": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert 0 <= answer["seed"] < 2**31 and answer["steps"] == 8
    assert (answer["text_guidance"], answer["image_guidance"]) == (5.0, 1.0)
    assert answer["unet_evaluations"] == 16  # s_I = 1: two branches a step
    assert {"read", "queue", "text_encode", "image_encode", "denoise", "decode", "write"} <= set(answer["timings"])
    expected = solo(library, answer["seed"], steps=8, text_guidance=5.0, image_guidance=1.0)
    np.testing.assert_array_equal(pixels(base64.b64decode(answer["image"])), expected)


def test_keep_detail_answers_at_the_uploads_size_as_the_library_does(server, library):
    url, _ = server
    big = Image.open(EXAMPLE).convert("RGB")
    big = big.resize((big.width * 4, big.height * 3), Image.NEAREST)
    upload = io.BytesIO()
    big.save(upload, format="PNG")
    response = httpx.post(f"{url}/v1/edits", files={"image": ("big.png", upload.getvalue(), "image/png")},
                          data={"instruction": INSTRUCTION, "seed": "5", "steps": "4", "keep_detail": "true"},
                          timeout=60)
    assert response.status_code == 200, response.text
    expected = library.edit(big, INSTRUCTION, seed=5, steps=4, keep_detail=True).images[0]
    np.testing.assert_array_equal(pixels(response.content), np.asarray(expected))
    refused = post_edit(url, keep_detail="true", resolution="none")
    assert refused.status_code == 422 and "keep_detail" in refused.json()["error"]


@pytest.mark.parametrize("how", ["field", "accept"])
@pytest.mark.parametrize("fmt, media", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_lossy_formats_by_field_or_accept_header(server, library, how, fmt, media):
    url, _ = server
    fields = dict(instruction=INSTRUCTION, seed="4")
    headers = {"Accept": f"{media}, image/png;q=0.5"} if how == "accept" else {}
    if how == "field":
        fields["output_format"] = fmt
    response = httpx.post(f"{url}/v1/edits", files={"image": ("a.png", png_bytes())}, data=fields, headers=headers,
                          timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == media
    assert Image.open(io.BytesIO(response.content)).format == fmt.upper()
    expected = encode_image(Image.fromarray(solo(library, 4)), fmt)  # lossy, but the library's picture
    np.testing.assert_array_equal(pixels(response.content), pixels(expected))


def test_small_images_are_coded_on_the_event_loop_and_big_ones_in_the_pool(local, library):
    import asyncio

    from engine.serving.app import off_loop

    async def where(fmt: str, side: int) -> str:
        return await off_loop(fmt, side * side, lambda: threading.current_thread().name)

    loop_thread = threading.current_thread().name  # asyncio.run runs the loop on this thread
    assert asyncio.run(where("JPEG", 512)) == loop_thread and asyncio.run(where("jpeg", 64)) == loop_thread
    assert asyncio.run(where("PNG", 256)) != loop_thread and asyncio.run(where("JPEG", 513)) != loop_thread
    assert asyncio.run(where("TIFF", 8)) != loop_thread  # formats not named go to the pool
    url, _ = local  # either way the answer is the library's edit: a 300 px JPEG (inline), a 300 px PNG (pool)
    scene = Image.open(EXAMPLE).convert("RGB").resize((300, 300), Image.Resampling.LANCZOS)
    for fmt in ("jpeg", "png"):
        upload = encode_image(scene, fmt)
        response = httpx.post(f"{url}/v1/edits", files={"image": (f"a.{fmt}", upload)},
                              data=dict(instruction=INSTRUCTION, seed="3", output_format=fmt), timeout=60)
        assert response.status_code == 200, response.text
        expected = library.edit(Image.open(io.BytesIO(upload)), INSTRUCTION, seed=3).images[0]
        np.testing.assert_array_equal(pixels(response.content), pixels(encode_image(expected, fmt)))


def test_concurrent_requests_are_batched_and_each_gets_its_solo_pixels(server, library):
    url, worker = server
    local = not isinstance(worker, str)  # the Ray app batches in its replicas, which keep no metrics here
    before = worker.metrics.batch_size.collect()[0].samples if local else None
    settings = [dict(seed=s, text_guidance=6.0 + s, image_guidance=1.0 + 0.25 * s) for s in range(8)]
    with httpx.Client(timeout=60) as client:
        answers = [None] * len(settings)

        def send(i):
            answers[i] = client.post(f"{url}/v1/edits", files={"image": ("a.png", png_bytes())},
                                     data={"instruction": INSTRUCTION, **{k: str(v) for k, v in settings[i].items()}})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(settings))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for answer, setting in zip(answers, settings):
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(pixels(answer.content), solo(library, **setting))
    if not local:
        return
    after = worker.metrics.batch_size.collect()[0].samples
    assert bucket(after, 3) - bucket(before, 3) < bucket(after, "+Inf") - bucket(before, "+Inf")  # shared calls


def bucket(samples, le) -> float:
    """UNet calls of at most ``le`` rows in the rows-per-call histogram's samples."""
    return next(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] in (str(le), f"{le}.0"))


@pytest.mark.parametrize("fields, files, status, message", [
    (dict(instruction="x"), {"image": ("a.txt", b"not an image")}, 400, "not an image"),
    (dict(instruction="x"), {"image": ("a.png", b"")}, 400, "empty"),
    (dict(instruction="x"), None, 400, "image: missing"),
    ({}, "png", 422, "instruction: missing"),
    (dict(instruction="x", steps="many"), "png", 422, "steps"),
    (dict(instruction="x", steps="0"), "png", 422, "steps"),
    (dict(instruction="x", steps="5000"), "png", 422, "at most 2000"),
    (dict(instruction="x", sampler="magic"), "png", 422, "unknown sampler"),
    (dict(instruction="x", preset="turbo"), "png", 422, "unknown preset"),
    (dict(instruction="x", text_guidance="nan"), "png", 422, "text_guidance"),
    (dict(instruction="x", seed="-1"), "png", 422, "seed"),
    (dict(instruction="x", colour="red"), "png", 422, "colour"),
    (dict(instruction="x", resolution="99999"), "png", 422, "resolution"),
])
def test_bad_form_input_is_a_json_error_naming_it(server, fields, files, status, message):
    url, _ = server
    files = {"image": ("a.png", png_bytes())} if files == "png" else files
    response = httpx.post(f"{url}/v1/edits", data=fields, files=files, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_bad_json_and_content_types_are_refused(server):
    url, _ = server
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 422, "invalid JSON"),
        (dict(json=[1, 2]), 422, "JSON object"),
        (dict(json={"instruction": "x", "image": "@@@"}), 400, "base64"),
        (dict(json={"instruction": "x"}), 400, "image: missing"),
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 422, "content-type"),
    ]
    for kwargs, status, message in cases:
        response = httpx.post(f"{url}/v1/edits", timeout=30, **kwargs)
        assert response.status_code == status and message in response.json()["error"], response.text


def test_a_body_over_the_limit_is_413_and_a_huge_image_is_refused_from_its_header():
    with local_server(Settings(max_body_bytes=50_000, max_pixels=10_000)) as (url, _):
        response = httpx.post(f"{url}/v1/edits", data={"instruction": "x"},
                              files={"image": ("a.png", os.urandom(60_000))}, timeout=30)
        assert response.status_code == 413 and "limit of 50,000 bytes" in response.json()["error"]
        big = io.BytesIO()
        Image.new("RGB", (200, 200)).save(big, format="PNG")
        response = httpx.post(f"{url}/v1/edits", data={"instruction": "x"}, files={"image": ("a.png", big.getvalue())})
        assert response.status_code == 400 and "over the limit of 10,000" in response.json()["error"]


def test_a_full_queue_answers_429_with_retry_after_then_recovers():
    with local_server(Settings(max_batch=1, max_queue=2, max_steps=5000)) as (url, worker):
        with httpx.Client(timeout=120) as client:
            jobs = [client.post(f"{url}/v1/jobs", data={"instruction": "x", "steps": "400"},
                                files={"image": ("a.png", png_bytes())}) for _ in range(6)]
            codes = [j.status_code for j in jobs]
            assert codes.count(202) >= 2 and 429 in codes, codes
            refused = jobs[codes.index(429)]
            assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["error"]
            for job in jobs:
                if job.status_code == 202:
                    client.delete(f"{url}/v1/jobs/{job.json()['id']}")
            deadline = time.monotonic() + 30
            while worker.queue_depth() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert post_edit(url, seed=1).status_code == 200


def test_a_request_past_the_timeout_is_504_and_frees_the_worker():
    with local_server(Settings(timeout=1.0, max_steps=100_000)) as (url, worker):
        start = time.monotonic()
        response = post_edit(url, steps=20_000)
        assert response.status_code == 504 and "timeout of 1 s" in response.json()["error"]
        assert time.monotonic() - start < 10
        # the worker stopped the long edit (one step: a whole edit may pass the 1 s timeout on a busy host)
        assert post_edit(url, seed=0, steps=1).status_code == 200


def test_a_job_reports_progress_streams_events_and_keeps_its_result(server, library):
    url, _ = server
    created = httpx.post(f"{url}/v1/jobs", data={"instruction": INSTRUCTION, "seed": "5", "steps": "30"},
                         files={"image": ("a.png", png_bytes())})
    assert created.status_code == 202 and created.headers["location"] == f"/v1/jobs/{created.json()['id']}"
    job_id = created.json()["id"]
    events = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["state"] == "succeeded" and events[-1]["steps_done"] == 30
    done = [e["steps_done"] for e in events if e["state"] == "running"]
    assert done == sorted(done) and any(0 < d < 30 for d in done)  # progress while it runs, on both servers
    view = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert view["state"] == "succeeded" and view["result"]["seed"] == 5
    expected = solo(library, 5, steps=30)
    np.testing.assert_array_equal(pixels(base64.b64decode(view["result"]["image"])), expected)
    np.testing.assert_array_equal(pixels(httpx.get(f"{url}/v1/jobs/{job_id}/image").content), expected)
    assert httpx.get(f"{url}/v1/jobs/nope").status_code == 404


def test_deleting_a_job_stops_its_denoising_loop(server):
    url, _ = server
    job_id = httpx.post(f"{url}/v1/jobs", data={"instruction": "x", "steps": "2000"},
                        files={"image": ("a.png", png_bytes())}).json()["id"]
    while httpx.get(f"{url}/v1/jobs/{job_id}").json()["steps_done"] == 0:
        time.sleep(0.02)
    httpx.delete(f"{url}/v1/jobs/{job_id}")
    deadline = time.monotonic() + 10
    while (view := httpx.get(f"{url}/v1/jobs/{job_id}").json())["state"] != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert view["state"] == "cancelled" and view["steps_done"] < 2000
    assert httpx.get(f"{url}/v1/jobs/{job_id}/image").status_code == 409


def test_a_job_cancelled_inside_a_batch_drops_out_and_the_other_keeps_its_pixels(library):
    with local_server(Settings(max_batch=6, max_steps=2000)) as (url, worker):
        ids = [httpx.post(f"{url}/v1/jobs", data={"instruction": INSTRUCTION, "steps": "120", "seed": str(seed)},
                          files={"image": ("a.png", png_bytes())}).json()["id"] for seed in (1, 2)]
        while httpx.get(f"{url}/v1/jobs/{ids[0]}").json()["steps_done"] == 0:
            time.sleep(0.02)
        httpx.delete(f"{url}/v1/jobs/{ids[0]}")
        deadline = time.monotonic() + 10
        while (gone := httpx.get(f"{url}/v1/jobs/{ids[0]}").json())["state"] != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        other = httpx.get(f"{url}/v1/jobs/{ids[1]}").json()
        assert other["state"] == "running" and other["steps_done"] < 120  # answered at once, not with the batch
        while (other := httpx.get(f"{url}/v1/jobs/{ids[1]}").json())["state"] != "succeeded":
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
        samples = worker.metrics.batch_size.collect()[0].samples
    assert bucket(samples, 5) < bucket(samples, 6) and bucket(samples, 3) > 0  # steps of both, then of one
    assert other["result"]["unet_evaluations"] == 360 and gone["steps_done"] < 120
    np.testing.assert_array_equal(pixels(base64.b64decode(other["result"]["image"])), solo(library, 2, steps=120))


def test_a_client_that_disconnects_cancels_its_edit(local):
    url, worker = local
    body = (b"--b\r\nContent-Disposition: form-data; name=\"instruction\"\r\n\r\nx\r\n--b\r\nContent-Disposition: "
            b"form-data; name=\"steps\"\r\n\r\n2000\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
            b"filename=\"a.png\"\r\n\r\n" + png_bytes() + b"\r\n--b--\r\n")
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while worker.metrics.in_flight._value.get() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    start = time.monotonic()
    while worker.metrics.in_flight._value.get() and time.monotonic() - start < 10:
        time.sleep(0.02)
    assert time.monotonic() - start < 5  # 2000 steps take far longer: the loop stopped
    assert post_edit(url, seed=0).status_code == 200


def test_the_api_key_guards_everything_but_health():
    with local_server(Settings(api_key="s3cret")) as (url, _):
        assert post_edit(url).status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200
        response = httpx.post(f"{url}/v1/edits", headers={"Authorization": "Bearer s3cret"},
                              data={"instruction": "x"}, files={"image": ("a.png", png_bytes())}, timeout=30)
        assert response.status_code == 200
        assert httpx.get(f"{url}/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(f"{url}/metrics", headers={"X-API-Key": "s3cret!"}).status_code == 401


def test_health_metrics_and_the_page(server):
    url, _ = server
    assert post_edit(url, steps=1).status_code == 200  # a fresh server has no stage timings to show yet
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json()["status"] == "ready"
    text = httpx.get(f"{url}/metrics").text
    for name in ("ip2p_requests_total", "ip2p_queue_depth", "ip2p_batch_size_bucket", "ip2p_stage_seconds_bucket",
                 "ip2p_edits_in_flight", "ip2p_request_seconds_bucket"):
        assert name in text
    assert 'route="/v1/jobs/{job_id}"' in text or "/v1/jobs/" not in text  # job ids never become labels
    page = httpx.get(f"{url}/").text
    assert 'id="image"' in page and "Randomize seed" in page and "/v1/edits" in page


def test_serve_command_drains_and_exits_cleanly_on_sigterm(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "ip2p.cli", "serve", str(BUNDLE_LOAD["model"]), "--port",
                                str(port), "--drain-timeout", "20"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        job_id = httpx.post(f"{url}/v1/jobs", data={"instruction": INSTRUCTION, "steps": "50"},
                            files={"image": ("a.png", png_bytes())}).json()["id"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in text and "serving on" in text and "stopped" in text
    assert job_id


def test_serve_refuses_a_bad_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ip2p.cli", "serve", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "missing" in result.stderr


def test_the_worker_loads_its_pipeline_on_the_thread_that_edits(library):
    import threading as threads

    from engine.serving.metrics import Metrics
    from engine.serving.worker import EditWorker

    loaded_on = []

    def load():
        loaded_on.append(threads.current_thread().name)
        return library

    worker = EditWorker(load, Settings(), Metrics(4))
    try:
        assert loaded_on == ["ip2p-edit-worker"] and worker.pipe is library
    finally:
        worker.stop(1)

    def broken():
        raise InputError("models/none: no such model folder")

    with pytest.raises(InputError, match="no such model folder"):
        EditWorker(broken, Settings(), Metrics(4))
