"""scripts/load_test.py at a small size, read from stdin: no 5xx, no lost request, every pause and resume answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "load_test.py"


def test_load_test_facts(tmp_path: Path) -> None:
    """16 clients for 4 s against an engine-process server, the script piped to `python -`."""
    out = tmp_path / "load.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    with SCRIPT.open() as script:
        proc = subprocess.run([sys.executable, "-", "--clients", "16", "--seconds", "4", "--engine-process",
                               "--cycle-interval-s", "0.5", "--out", str(out)], stdin=script, capture_output=True,
                              text=True, check=False, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    requests = report["requests"]
    assert requests["num_completed"] > 0 and requests["num_completed"] == requests["num_sent"], requests
    assert requests["num_5xx"] == 0 and requests["num_lost"] == 0 and requests["num_4xx"] == 0, requests
    assert report["pause"]["num"] >= 2 and report["pause"]["num_ok"] == report["pause"]["num"], report["pause"]
    assert report["resume"]["num_ok"] == report["resume"]["num"] == report["pause"]["num"], report["resume"]
    assert set(report["health"]["statuses"]) == {"200"} and report["health"]["latency_ms"]["n"] > 0
    assert report["server_exit_code"] == 0
    assert "/health" in proc.stdout and "lost" in proc.stdout  # the table was printed
