"""The edit service under hostile input (issue: no 500s, memory bounded by what a client may send, limits that
hold): each defect found by trying the server as an attacker would, a fuzz run, and the memory bound."""
from __future__ import annotations

import base64
import gc
import io
import json
import logging
import os
import random
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

from benchmarks.hostile import blank_png, mutate, sample_files
from engine.serving.encoders import encode_image
from engine.serving.interface import QueueFull
from engine.serving.jobs import Job, JobTable, Outcome, Settings, job_config
from engine.serving.schema import EditParameters
from tests.serving_server import BUNDLE_LOAD, free_port, local_server, wait_ready
from tests.test_serving import INSTRUCTION, pixels, png_bytes, post_edit

FUZZ = Settings(max_batch=4, batch_wait_ms=5, max_queue=64, max_steps=2, max_resolution=64, timeout=30)


def is_refusal(response: httpx.Response, status: int | None = None) -> bool:
    """A 4xx whose body is ``{"error": "<one line>"}`` (of ``status`` where given)."""
    if status is not None and response.status_code != status:
        return False
    body = response.json()
    return 400 <= response.status_code < 500 and set(body) == {"error"} and "\n" not in body["error"]


def wait_for(predicate, timeout: float = 30.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)
    return value


def read_to_close(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def guarded():
    """A server with an API key and low limits, shared by the checks that do not change its state."""
    with local_server(Settings(max_resolution=128, max_steps=50, api_key="k3y", max_body_bytes=2**20,
                               read_timeout=1.0, max_connections=4)) as running:
        yield running


AUTH = {"Authorization": "Bearer k3y"}


def test_unknown_paths_share_one_metrics_label_and_metrics_stay_small(guarded):
    url, _ = guarded
    with httpx.Client() as client:
        for i in range(300):
            client.get(f"{url}/x-{i}", headers=AUTH if i % 2 else {})  # with and without the key
        client.get(f"{url}/v1/jobs/{'ab' * 16}", headers=AUTH)
        client.put(f"{url}/healthz")
        text = client.get(f"{url}/metrics", headers=AUTH).text
    assert "/x-" not in text and 'route="unmatched",status="404"' in text and 'route="unmatched",status="401"' in text
    assert 'route="/v1/jobs/{job_id}"' in text and 'route="/healthz",status="405"' in text
    assert len(text) < 20_000


@pytest.mark.parametrize("fields, message", [
    (dict(resolution="²"), "resolution: a whole number"),
    (dict(resolution="9" * 5000), "at most 12 digits"),
    (dict(steps="9" * 5000), "at most 12 digits"),
    (dict(seed="٣"), "seed"),
])
def test_odd_form_numbers_are_422(guarded, fields, message):
    url, _ = guarded
    response = httpx.post(f"{url}/v1/edits", headers=AUTH, files={"image": ("a.png", png_bytes())},
                          data={"instruction": "x", **fields}, timeout=30)
    assert is_refusal(response, 422) and message in response.json()["error"], response.text


@pytest.mark.parametrize("body, message", [
    ('{"instruction": "x", "image": "IMAGE", "steps": ' + "9" * 5000 + "}", "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
    ('{"instruction": "x", "image": "IMAGE", "steps": true}', "not true or false"),
    ('{"instruction": "x", "image": "IMAGE", "seed": false}', "not true or false"),
    ('{"instruction": "x", "image": "IMAGE", "steps": 1e999}', "steps"),
])
def test_odd_json_is_422(guarded, body, message):
    url, _ = guarded
    body = body.replace("IMAGE", base64.b64encode(png_bytes()).decode())
    response = httpx.post(f"{url}/v1/edits", headers={**AUTH, "Content-Type": "application/json"}, content=body,
                          timeout=30)
    assert is_refusal(response, 422) and message in response.json()["error"], response.text


@pytest.mark.parametrize("side, message", [
    (30000, "too many pixels"),  # a 109 KB bomb: 900 megapixels
    (5000, "over the limit of 16,000,000"),
])
def test_an_image_bomb_is_400(guarded, side, message):
    url, _ = guarded
    response = httpx.post(f"{url}/v1/edits", headers=AUTH, files={"image": ("a.png", blank_png(side, side, "1"))},
                          data={"instruction": "x"}, timeout=30)
    assert is_refusal(response, 400) and message in response.json()["error"], response.text


def test_resolution_none_obeys_max_resolution(guarded):
    url, _ = guarded
    for side, status in ((256, 422), (128, 200)):
        picture = Image.open(io.BytesIO(png_bytes())).convert("RGB").resize((side, side))
        upload = io.BytesIO()
        picture.save(upload, format="PNG")
        response = httpx.post(f"{url}/v1/edits", headers=AUTH, files={"image": ("a.png", upload.getvalue())},
                              data={"instruction": "x", "resolution": "none", "steps": "1"}, timeout=60)
        assert response.status_code == status, response.text
    assert "would edit at the image's 256x256" in httpx.post(
        f"{url}/v1/edits", headers=AUTH, data={"instruction": "x", "resolution": "none"},
        files={"image": ("a.png", blank_png(256, 256))}, timeout=30).json()["error"]


def test_every_error_is_json_with_an_error_field(guarded):
    url, _ = guarded
    many_fields = {f"f{i}": "x" for i in range(40)}  # past the multipart parser's field limit
    responses = [
        httpx.get(f"{url}/nope", headers=AUTH),
        httpx.put(f"{url}/v1/edits", headers=AUTH),
        httpx.post(f"{url}/v1/edits", headers=AUTH, data=many_fields, files={"image": ("a.png", png_bytes())}),
        httpx.get(f"{url}/metrics"),
    ]
    assert [r.status_code for r in responses] == [404, 405, 400, 401]
    assert all(is_refusal(r) for r in responses), [r.text for r in responses]


def test_header_names_and_schemes_are_case_insensitive(guarded):
    url, _ = guarded
    body = json.dumps({"instruction": "x", "image": base64.b64encode(png_bytes()).decode(), "steps": 1})
    response = httpx.post(f"{url}/v1/edits", content=body, timeout=30,
                          headers={"Content-Type": "Application/JSON; charset=UTF-8", "Authorization": "bearer k3y"})
    assert response.status_code == 200, response.text
    assert httpx.head(f"{url}/healthz").status_code == 200 and httpx.head(f"{url}/readyz").status_code == 200


def test_a_request_id_is_logged_only_if_it_looks_like_one(guarded, caplog):
    url, _ = guarded
    with caplog.at_level(logging.INFO, logger="engine.serving"):
        good = httpx.get(f"{url}/healthz", headers={"X-Request-Id": "req-42.a"})
        forged = httpx.get(f"{url}/healthz", headers={"X-Request-Id": "x 200 0.1 ms\tGET /admin " + "z" * 80})
    assert good.headers["x-request-id"] == "req-42.a"
    assert len(forged.headers["x-request-id"]) == 16 and "admin" not in caplog.text


def test_a_long_instruction_logs_one_short_line(guarded, caplog):
    url, _ = guarded
    with caplog.at_level(logging.WARNING, logger="engine.tokenizer"):
        response = httpx.post(f"{url}/v1/edits", headers=AUTH, files={"image": ("a.png", png_bytes())},
                              data={"instruction": "make it blue " * 150, "steps": "1"}, timeout=60)
    assert response.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "tokens, over CLIP" in r.getMessage()]
    assert warnings and all(len(w) < 200 for w in warnings)


def test_a_slow_upload_gets_408_and_requests_past_the_cap_503(guarded):
    url, _ = guarded
    host, port = url.removeprefix("http://").split(":")
    head = (b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 500000\r\n\r\n--b\r\n")
    slow = [socket.create_connection((host, int(port))) for _ in range(4)]
    try:
        for sock in slow:
            sock.sendall(head)
        time.sleep(0.3)
        assert httpx.get(f"{url}/healthz").status_code == 200  # health checks are exempt from the cap
        refused = httpx.get(f"{url}/v1/jobs/nope", headers=AUTH)
        assert refused.status_code == 503 and set(refused.json()) == {"error"} and refused.headers["retry-after"] == "1"
        start = time.monotonic()
        answers = [read_to_close(sock) for sock in slow]
        assert time.monotonic() - start < 3  # the 1 s read deadline, not the client's pace
        assert all(a.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in a for a in answers), answers
    finally:
        for sock in slow:
            sock.close()
    assert wait_for(lambda: httpx.get(f"{url}/v1/jobs/nope", headers=AUTH).status_code == 404)


def test_a_finished_job_keeps_only_its_encoded_answer_and_delete_frees_it():
    with local_server(Settings(max_batch=1)) as (url, worker):
        upload = Image.open(io.BytesIO(png_bytes())).convert("RGB").resize((1000, 1000))
        data = io.BytesIO()
        upload.save(data, format="PNG")
        job_id = httpx.post(f"{url}/v1/jobs", data={"instruction": INSTRUCTION, "seed": "2", "steps": "3"},
                            files={"image": ("a.png", data.getvalue())}).json()["id"]
        job = worker.get(job_id)
        wait_for(lambda: job.state == "succeeded" and list(job.encoded) == ["png"]
                 and job.future.result().image is None)
        assert job.image is None and worker.jobs.held_bytes() == len(job.encoded["png"]) < 3_000_000 // 100
        png = httpx.get(f"{url}/v1/jobs/{job_id}/image").content
        jpeg = httpx.get(f"{url}/v1/jobs/{job_id}/image", headers={"Accept": "image/jpeg"})
        assert png == job.encoded["png"] and jpeg.headers["content-type"] == "image/jpeg"
        from_png = encode_image(Image.open(io.BytesIO(png)).convert("RGB"), "jpeg")  # what the kept PNG gives
        np.testing.assert_array_equal(pixels(jpeg.content), pixels(from_png))
        assert list(job.encoded) == ["png"]  # another format is not kept
        deleted = httpx.delete(f"{url}/v1/jobs/{job_id}")
        assert deleted.status_code == 200 and deleted.json()["state"] == "succeeded"
        assert httpx.get(f"{url}/v1/jobs/{job_id}").status_code == 404 and worker.jobs.held_bytes() == 0


def test_held_images_have_a_byte_budget():
    upload = blank_png(600, 600)  # 1.08 MB decoded
    with local_server(Settings(max_batch=1, max_held_bytes=1_500_000, max_steps=100_000)) as (url, worker):
        first = httpx.post(f"{url}/v1/jobs", data={"instruction": "x", "steps": "20000"},
                           files={"image": ("a.png", upload)})
        assert first.status_code == 202 and worker.jobs.held_bytes() == 600 * 600 * 3
        second = httpx.post(f"{url}/v1/jobs", data={"instruction": "x"}, files={"image": ("a.png", upload)})
        assert is_refusal(second, 429) and "limit of 1 MB of images" in second.json()["error"]
        assert int(second.headers["retry-after"]) >= 1
        httpx.delete(f"{url}/v1/jobs/{first.json()['id']}")  # cancelled: its input is let go
        assert worker.jobs.held_bytes() == 0
        third = httpx.post(f"{url}/v1/edits", data={"instruction": "x", "steps": "1"},
                           files={"image": ("a.png", upload)})
        assert third.status_code == 200


def test_the_job_table_lets_the_oldest_results_go_to_make_room():
    settings = Settings(max_held_bytes=1000)
    table = JobTable(settings)
    params = EditParameters(instruction="x")

    def job(side: int) -> Job:
        made = Job(Image.new("RGB", (side, side)), params, job_config(params), None, None)
        table.add(made)
        return made

    old, newer = job(10), job(10)  # 300 bytes each while queued
    for finished in (old, newer):
        finished.finish("succeeded", Outcome(Image.new("RGB", (10, 10)), 0, 1, {}))
        finished.keep_encoded("png", b"p" * 400)
    assert table.held_bytes() == 800
    with table.room_for(500):  # the oldest result goes; the newer one fits beside the upload
        assert table.get(old.id) is None and table.get(newer.id) is newer and table.held_bytes() == 900
    queued = job(10)
    with pytest.raises(QueueFull, match="limit of 0 MB"):  # neither a queued job nor what is left makes room
        with table.room_for(800):
            pass
    assert table.get(queued.id) is queued and table.get(newer.id) is newer  # nothing let go for nothing


def test_a_job_past_its_deadline_is_cancelled_at_once_and_frees_the_worker_at_the_next_step(caplog):
    with local_server(Settings(timeout=1.0, max_steps=100_000)) as (url, worker):
        job_id = httpx.post(f"{url}/v1/jobs", data={"instruction": "x", "steps": "50000"},
                            files={"image": ("a.png", png_bytes())}).json()["id"]
        wait_for(lambda: worker.metrics.in_flight._value.get() == 1)
        view = wait_for(lambda: (v := httpx.get(f"{url}/v1/jobs/{job_id}").json())["state"] != "running" and v,
                        timeout=5)
        assert view["state"] == "cancelled" and view["error"] == "timeout"
        wait_for(lambda: worker.metrics.in_flight._value.get() == 0, timeout=2)  # the step after the deadline
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            response = post_edit(url, steps=50000)
            assert response.status_code == 504
            wait_for(lambda: worker.metrics.in_flight._value.get() == 0, timeout=2)
            gc.collect()
            time.sleep(0.2)
        assert "never retrieved" not in caplog.text


def test_shutdown_answers_503_with_retry_after_and_ends_every_stream(tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "ip2p.cli", "serve", str(BUNDLE_LOAD["model"]), "--port",
                                    str(port), "--drain-timeout", "2", "--max-steps", "100000", "--max-batch", "2"],
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        answers: list = []

        def edit():
            answers.append(post_edit(url, steps=30000, timeout=60))

        edits = [threading.Thread(target=edit) for _ in range(3)]
        for thread in edits:
            thread.start()
        job_id = httpx.post(f"{url}/v1/jobs", data={"instruction": "x", "steps": "30000"},
                            files={"image": ("a.png", png_bytes())}).json()["id"]
        events: list = []

        def follow():
            with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60) as stream:
                events.extend(line for line in stream.iter_lines() if line.startswith("event: "))

        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        for thread in (*edits, follower):
            thread.join(timeout=30)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    assert len(answers) == 3
    for answer in answers:
        assert answer.status_code == 503 and answer.headers["retry-after"] and "shut down" in answer.json()["error"]
    assert events[-1] == "event: done"
    text = log_path.read_text()
    assert "Traceback" not in text and "CancelledError" not in text and "stopped" in text


VALUES = ["", " ", "0", "-1", "1", "2", "64", "none", "auto", "²", "٣", "1e999", "nan", "-inf", "9" * 40, "true",
          "\x00", "é" * 300, "{", "[]", "exact", "fast", "euler", "png", "jpeg", "x" * 3000]
JSON_VALUES = [None, True, False, 0, -1, 1, 2, 1.5, 1e308, 10**30, "", "auto", [], {}, [[[[]]]], {"a": {"b": 1}},
               "x" * 3000]
FIELDS = ["instruction", "steps", "text_guidance", "image_guidance", "sampler", "seed", "resolution", "preset",
          "output_format", "extra", "image"]


def fuzz_request(rng: random.Random, samples: list[bytes], image_b64: str) -> dict:
    """httpx.post keyword arguments of one random request."""
    names = rng.sample(FIELDS[:-1], rng.randint(0, 5))
    if rng.random() < 0.5:
        upload = mutate(rng.choice(samples), rng) if rng.random() < 0.8 else rng.choice(samples)
        fields = {name: rng.choice(VALUES) for name in names}
        fields.setdefault("steps", "1")
        if rng.random() < 0.8:
            fields.setdefault("instruction", "x")
        return dict(data=fields, files={"image": ("a", upload)} if rng.random() < 0.95 else None)
    body = {name: rng.choice(JSON_VALUES + VALUES) for name in names}
    body.setdefault("steps", 1)
    if rng.random() < 0.8:
        body.setdefault("instruction", "x")
    if rng.random() < 0.9:
        body["image"] = image_b64 if rng.random() < 0.5 else base64.b64encode(mutate(rng.choice(samples), rng)).decode()
    text = json.dumps(body)
    if rng.random() < 0.1:
        text = text[: rng.randrange(len(text) + 1)]
    return dict(content=text, headers={"Content-Type": rng.choice(["application/json", "Application/JSON"])})


def test_fuzz_every_answer_is_2xx_or_a_json_4xx():
    """Mutated images of every format Pillow writes and random form and JSON fields: never a 5xx."""
    rng = random.Random(0)
    samples = sample_files(Image.open(io.BytesIO(png_bytes())).convert("RGB").resize((32, 32)))
    assert len(samples) >= 12
    image_b64 = base64.b64encode(png_bytes()).decode()
    statuses: dict[int, int] = {}
    with local_server(FUZZ) as (url, _), httpx.Client(timeout=60) as client:
        for _ in range(400):
            response = client.post(f"{url}/v1/edits", **fuzz_request(rng, samples, image_b64))
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 300 or is_refusal(response), (response.status_code, response.text)
    assert statuses.get(200, 0) >= 20 and statuses.get(400, 0) >= 20 and statuses.get(422, 0) >= 20, statuses


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_resident_memory_stays_within_the_stated_bound_under_hostile_clients():
    """The bound of docs/serving.md: held images (--max-held-mb) + requests in progress x body limit + one decode.
    Here 48 + 8 x 2 + ~70 MB; before the fix twelve 4000x4000 jobs alone kept ~730 MB."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ip2p.cli", "serve", str(BUNDLE_LOAD["model"]), "--port",
                                str(port), "--max-held-mb", "48", "--max-body-mb", "2", "--max-connections", "8",
                                "--read-timeout", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        with httpx.Client(timeout=60) as client:
            post_edit(url, steps=1)
            baseline = rss_mb(process.pid)
            big = blank_png(4000, 4000)  # 16 megapixels: 48 MB decoded
            for _ in range(12):
                created = client.post(f"{url}/v1/jobs", data={"instruction": "x", "steps": "1"},
                                      files={"image": ("a.png", big)})
                if created.status_code == 202:
                    wait_for(lambda: client.get(f"{url}/v1/jobs/{created.json()['id']}").json()["state"] == "succeeded")
            for i in range(2000):
                client.get(f"{url}/x-{i}")
            for _ in range(30):
                client.post(f"{url}/v1/edits", data={"instruction": "x"},
                            files={"image": ("a.png", blank_png(30000, 30000, "1"))})
            host = ("127.0.0.1", port)
            slow = [socket.create_connection(host) for _ in range(12)]
            for sock in slow:
                sock.sendall(b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"
                             + b"a" * 1_000_000)
            time.sleep(1.5)
            for sock in slow:
                sock.close()
            grown = rss_mb(process.pid) - baseline
            metrics = client.get(f"{url}/metrics").text
    finally:
        process.kill()
    assert grown < 48 + 8 * 2 + 70, f"resident memory grew by {grown:.0f} MB"
    assert len(metrics) < 20_000
