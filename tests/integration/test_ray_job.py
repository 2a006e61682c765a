"""The PPO example submitted as a Ray job to a head started with the `ray` CLI, as a cluster user runs it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")
job_submission = pytest.importorskip("ray.job_submission")

REPO = Path(__file__).resolve().parents[2]
RAY_CLI = Path(sys.executable).parent / "ray"


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_pids(temp_dir: str) -> list[int]:
    """Processes of the head started with `--temp-dir temp_dir`: the dir is on each one's command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if head.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {head.returncode} before the dashboard came up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the dashboard at {url} did not answer within {timeout_s} s")
        time.sleep(0.2)


@pytest.fixture
def ray_head(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A head node from `ray start --head`; yields the dashboard URL the job client talks to.

    Ray 2.60 turns token authentication on for a new cluster when ~/.ray/auth_token exists (and a
    ray.init() earlier in this process writes one and sets RAY_AUTH_MODE=token in os.environ); the
    head then warns "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled
    to opt out" and the client must send the token. A local test cluster opts out, as the warning says,
    on both sides: RAY_AUTH_MODE=disabled for the head (and so the job driver it starts) and the client.
    RAY_ADDRESS is dropped so that nothing connects to another cluster.

    Clean-up is scoped to this head: `ray stop --force` would kill every Ray process on the machine
    (a developer's own cluster included), so the head runs with `--block` in its own process group,
    and teardown kills that group and then any process left with this head's private --temp-dir.
    """
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    gcs_port, dashboard_port, agent_port, client_port = free_ports(4)
    # A short private temp dir: Ray's socket paths must fit in 107 bytes, and ray start writes its
    # address file there, not in /tmp/ray, so no later ray.init() on this machine connects to it.
    temp_dir = tempfile.mkdtemp(prefix="colocate-ray-")
    cmd = [str(RAY_CLI), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
           "--dashboard-port", str(dashboard_port), "--dashboard-agent-listen-port", str(agent_port),
           "--ray-client-server-port", str(client_port), "--include-dashboard", "true", "--disable-usage-stats",
           "--temp-dir", temp_dir]
    log_path = tmp_path / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(cmd, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        try:
            wait_for_dashboard(url, head, timeout_s=90)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}\n{log_path.read_text()[-3000:]}") from e
        yield url
    finally:
        # SIGTERM makes `ray start --block` drain for up to 30 s; the head is ours alone, so kill it outright.
        try:  # start_new_session: the group is `ray start` and the daemons it spawned, nothing else
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(30)
        deadline = time.monotonic() + 30
        while (left := session_pids(temp_dir)) and time.monotonic() < deadline:
            for pid in left:  # e.g. workers that moved to a process group of their own
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ppo_example_as_a_ray_job(ray_head: str, tmp_path: Path) -> None:
    client = job_submission.JobSubmissionClient(ray_head)
    out = tmp_path / "out"
    # sys.executable, not a bare `python`: the interpreter that has colocate installed, whatever PATH says.
    entrypoint = shlex.join([sys.executable, "examples/ppo/train.py", "--iterations", "2", "--rollout-batch-size",
                             "16", "--minibatch-size", "8", "--ppo-epochs", "1", "--out", str(out)])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(REPO), "excludes": [".git", ".gpu", "runs", "docs/results"]})
    start = time.monotonic()
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # PENDING, RUNNING -> SUCCEEDED, FAILED or STOPPED
        if time.monotonic() - start > 240:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after 240 s:\n{client.get_job_logs(job_id)[-5000:]}")
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == job_submission.JobStatus.SUCCEEDED, f"job {job_id} {status}:\n{logs[-5000:]}"
    assert "reward" in logs
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1]
    assert all(0.0 <= json.loads(line)["reward_mean"] <= 1.0 for line in lines)
    assert (out / "run.json").is_file()
