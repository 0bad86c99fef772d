"""Ray Serve faults (the API itself is tested against the Ray app in test_serving.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

from engine.serving.jobs import Settings
from tests.serving_server import free_port, ray_server
from tests.test_serving import png_bytes, post_edit


def test_ray_a_killed_replica_fails_in_flight_requests_with_503_then_recovers():
    import ray

    with ray_server(Settings(max_batch=2, max_steps=100_000, timeout=120), replicas=1) as (url, app):
        answers = {}
        thread = threading.Thread(target=lambda: answers.update(r=post_edit(url, steps=30_000, timeout=120)))
        thread.start()
        time.sleep(3)  # the edit is running on the replica
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EditModel" in a["name"]]
        assert replicas
        for actor in replicas:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        start = time.monotonic()
        thread.join(timeout=60)
        assert answers["r"].status_code == 503 and "replica" in answers["r"].json()["error"]
        assert time.monotonic() - start < 30  # fails fast, not at the timeout
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and status != 200:
            status = post_edit(url, seed=0, timeout=60).status_code
            time.sleep(0.5)
        assert status == 200  # Serve restarted the replica


def test_ray_a_deleted_job_frees_its_replica_at_the_next_step():
    """One replica, one edit at a time: a 30,000-step job deleted mid-edit must stop there, or the next edit
    would wait behind it for minutes."""
    with ray_server(Settings(max_batch=1, max_steps=100_000, timeout=300), replicas=1) as (url, _):
        job_id = httpx.post(f"{url}/v1/jobs", data={"instruction": "x", "steps": "30000"},
                            files={"image": ("a.png", png_bytes())}).json()["id"]
        deadline = time.monotonic() + 60
        while (view := httpx.get(f"{url}/v1/jobs/{job_id}").json())["steps_done"] == 0:
            assert view["state"] in ("queued", "running") and time.monotonic() < deadline
            time.sleep(0.05)
        assert view["state"] == "running" and view["position"] is None
        waiting = [httpx.post(f"{url}/v1/jobs", data={"instruction": "x", "steps": "10", "seed": str(seed)},
                              files={"image": ("a.png", png_bytes())}).json()["id"] for seed in (1, 2)]
        time.sleep(0.5)
        views = [httpx.get(f"{url}/v1/jobs/{i}").json() for i in waiting]
        assert [(v["state"], v["position"]) for v in views] == [("queued", 0), ("queued", 1)]  # behind the first
        httpx.delete(f"{url}/v1/jobs/{job_id}")
        start = time.monotonic()
        assert post_edit(url, seed=0, timeout=120).status_code == 200
        assert time.monotonic() - start < 30  # the rest of the 30,000 steps would take minutes
        assert httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"] == "cancelled"
        while (states := [httpx.get(f"{url}/v1/jobs/{i}").json()["state"] for i in waiting]) != ["succeeded"] * 2:
            assert time.monotonic() - start < 60 and "failed" not in states and "cancelled" not in states
            time.sleep(0.1)


def test_ray_replicas_that_cannot_load_the_model_end_the_command_with_its_one_line_error(tmp_path):
    """The replicas load the model, not the command: their error (here a model folder that does not exist) comes
    back from Ray Serve's deployment status as the command's own one-line error, exit code 2."""
    missing = tmp_path / "no-such-model"
    done = subprocess.run([sys.executable, "-m", "ip2p", "-q", "serve", str(missing), "--ray", "--port",
                           str(free_port())], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (f"ip2p: error: {missing}: no such model folder or checkpoint "
                                                    "file, and not a hub id")


@pytest.mark.parametrize("shape, problem", [
    (["--num-cpus", "1000"], r"--num-cpus 1000: a replica needs 1000 CPUs on one node, and the largest has \d+"),
    (["--num-cpus", "1", "--replicas", "1000"], r"--num-cpus 1 x --replicas 1000: the replicas need 1000 CPUs, and "
                                                r"the Ray cluster has \d+"),
])
def test_ray_replicas_needing_more_than_the_local_cluster_has_are_refused_in_one_line(shape, problem):
    """Ray Serve would wait for them forever; the command says so instead (a local Ray, which adds no nodes)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, started by the command
    done = subprocess.run([sys.executable, "-m", "ip2p", "-q", "serve", "--ray", *shape, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(f"ip2p: error: {problem}: Ray Serve would wait for them forever", last), last
