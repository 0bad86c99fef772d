"""Step-level batching over real HTTP: edits join the running ones at the next step and leave at their last, with
the pixels of their solo edits; a short edit does not wait for a long one; nothing is lost or answered twice when
edits are cancelled or their clients disconnect mid-step."""
from __future__ import annotations

import base64
import io
import random
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from engine import EditPipeline
from engine.serving.jobs import Settings
from tests.serving_server import BUNDLE_LOAD, local_server, ray_server
from tests.test_serving import INSTRUCTION, bucket, pixels, png_bytes, solo

# steps, sampler, preset, (s_T, s_I): every one a different batch key under request batching
MIXED = [
    dict(steps=12, preset="exact", text_guidance=7.5, image_guidance=1.5),
    dict(steps=4, sampler="dpmpp_2m", preset="exact", text_guidance=5.0, image_guidance=1.2),
    dict(steps=8, preset="fast"),
    dict(steps=6, sampler="unipc", preset="balanced", text_guidance=1.0, image_guidance=1.0),
    dict(steps=3, sampler="dpmpp_2m_sde", preset="exact", text_guidance=3.0, image_guidance=3.0),
]
STEP_SERVER = Settings(max_batch=12, max_queue=64, max_steps=3000, timeout=120)


@pytest.fixture(scope="module")
def library():
    return EditPipeline.from_pretrained(**BUNDLE_LOAD, progress=False)


def create_job(client: httpx.Client, url: str, seed: int, **settings) -> str:
    fields = {"instruction": INSTRUCTION, "seed": str(seed), **{k: str(v) for k, v in settings.items()}}
    response = client.post(f"{url}/v1/jobs", files={"image": ("a.png", png_bytes(), "image/png")}, data=fields)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def final_view(client: httpx.Client, url: str, job_id: str) -> dict:
    wait_for(lambda: client.get(f"{url}/v1/jobs/{job_id}").json()["state"] in ("succeeded", "failed", "cancelled"))
    return client.get(f"{url}/v1/jobs/{job_id}").json()


def test_edits_joining_mid_way_share_calls_and_answer_their_solo_pixels(library):
    with local_server(STEP_SERVER) as (url, worker), httpx.Client(timeout=60) as client:
        ids = []
        for seed, settings in enumerate(MIXED):
            ids.append(create_job(client, url, seed, **settings))
            if seed == 0:
                wait_for(lambda: client.get(f"{url}/v1/jobs/{ids[0]}").json()["steps_done"] >= 2)  # joins mid-way
        views = [final_view(client, url, job_id) for job_id in ids]
        samples = worker.metrics.batch_size.collect()[0].samples
        waits = worker.metrics.join_wait.collect()[0].samples
    for seed, (view, settings) in enumerate(zip(views, MIXED)):
        assert view["state"] == "succeeded", view
        answer = pixels(base64.b64decode(view["result"]["image"]))
        np.testing.assert_array_equal(answer, solo(library, seed, **settings))
    assert bucket(samples, 3) < bucket(samples, "+Inf")  # some calls held rows of several edits
    assert next(s.value for s in waits if s.name.endswith("_count")) == len(MIXED)  # each waited to join


@pytest.mark.parametrize("where", ["local", "ray"])
def test_a_short_edit_answers_while_a_long_job_runs(where):
    """A 4-step edit sent behind a 3000-step job joins it at the next step and is answered long before it ends."""
    settings = STEP_SERVER
    server = local_server(settings) if where == "local" else ray_server(settings, replicas=1)
    with server as (url, _), httpx.Client(timeout=60) as client:
        long_id = create_job(client, url, 1, steps=3000)
        wait_for(lambda: client.get(f"{url}/v1/jobs/{long_id}").json()["steps_done"] > 0)
        response = client.post(f"{url}/v1/edits", files={"image": ("a.png", png_bytes())},
                               data={"instruction": INSTRUCTION, "steps": "4", "seed": "2"})
        long_view = client.get(f"{url}/v1/jobs/{long_id}").json()
        client.delete(f"{url}/v1/jobs/{long_id}")
    assert response.status_code == 200
    assert long_view["state"] == "running" and long_view["steps_done"] < 3000


def test_request_batching_makes_the_short_edit_wait_for_the_long_one():
    with local_server(Settings(max_batch=12, max_steps=3000, batching="request")) as (url, _), \
            httpx.Client(timeout=60) as client:
        long_id = create_job(client, url, 1, steps=60)
        wait_for(lambda: client.get(f"{url}/v1/jobs/{long_id}").json()["steps_done"] > 0)
        short_id = create_job(client, url, 2, steps=4)
        short = final_view(client, url, short_id)
        long_view = client.get(f"{url}/v1/jobs/{long_id}").json()
    assert short["state"] == long_view["state"] == "succeeded"  # the long one finished first


def disconnect_mid_edit(url: str, steps: int) -> None:
    """Send an edit on a raw socket and close it once the request is in."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"instruction\"\r\n\r\nx\r\n--b\r\nContent-Disposition: "
            b"form-data; name=\"steps\"\r\n\r\n" + str(steps).encode() + b"\r\n--b\r\nContent-Disposition: form-data; "
            b"name=\"image\"; filename=\"a.png\"\r\n\r\n" + png_bytes() + b"\r\n--b--\r\n")
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(random.uniform(0.05, 0.3))


def test_under_load_with_cancels_and_disconnects_no_edit_is_lost_or_answered_twice(library):
    rng = random.Random(0)
    with local_server(STEP_SERVER) as (url, worker), httpx.Client(timeout=120) as client:
        plan = [(seed, MIXED[seed % len(MIXED)], rng.random() < 0.3) for seed in range(24)]
        ids, events = {}, {}

        def follow(job_id: str) -> None:
            with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=120) as stream:
                events[job_id] = [line for line in stream.iter_lines() if line.startswith("event: ")]

        followers = []
        for seed, settings, cancel in plan:
            ids[seed] = create_job(client, url, seed, **settings)
            followers.append(threading.Thread(target=follow, args=(ids[seed],)))
            followers[-1].start()
            if seed % 6 == 0:
                threading.Thread(target=disconnect_mid_edit, args=(url, 500)).start()
            if cancel:
                time.sleep(rng.uniform(0, 0.2))
                client.delete(f"{url}/v1/jobs/{ids[seed]}")
        views = {seed: final_view(client, url, ids[seed]) for seed, _, _ in plan}
        for follower in followers:
            follower.join(timeout=120)
        wait_for(lambda: worker.metrics.in_flight._value.get() == 0 and worker.queue_depth() == 0, timeout=30)
        assert worker._thread.is_alive() and client.post(f"{url}/v1/edits", files={"image": ("a.png", png_bytes())},
                                                         data={"instruction": "x", "steps": "2"}).status_code == 200
    for seed, settings, cancel in plan:
        view = views[seed]
        assert events[ids[seed]].count("event: done") == 1 and events[ids[seed]][-1] == "event: done"
        if cancel:
            assert view["state"] in ("cancelled", "succeeded"), view  # a cancel may come after the last step
        else:
            assert view["state"] == "succeeded", view
        if view["state"] == "succeeded":
            image = Image.open(io.BytesIO(base64.b64decode(view["result"]["image"])))
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), solo(library, seed, **settings))


def test_a_bundle_that_needs_several_images_per_call_is_refused_at_start(tmp_path):
    """The server encodes each request's image alone: a profile from 2 images is refused in one line, at start-up."""
    import json
    import shutil

    from engine.errors import InputError
    from engine.serving.service import local_service

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_LOAD["model"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["profile"]["batch"] = [2, 2, 16]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="at least 2 images per call"):
        local_service({**BUNDLE_LOAD, "model": str(bundle)}, STEP_SERVER)
