"""Regressions of the update hardening over HTTP: disk roots, checkpoint folders, complete and finite updates, shm.

Each test runs with the engine in the server's process and in its child process. Every refusal is a
4xx JSON error and changes nothing: the greedy tokens and the weights' version stay as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from safetensors.torch import load_file, save_file

from colocate.server.app import create_app
from colocate.server.serve import ServerThread
from colocate.weight_sync import export_manifest
from tests.integration.servers import Served, error_of, tokens

HANG_TIMEOUT_S = 20.0  # a request that blocks (a FIFO read) fails the test instead of freezing it


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def new_folder(root: Path, label: str) -> Path:
    """A fresh folder under `root` (the servers of both modes share the root)."""
    folder = root / f"{label}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


def write_checkpoint(folder: Path, named: dict[str, torch.Tensor]) -> Path:
    save_file(named, str(folder / "model.safetensors"))
    return folder


def disk_update(server: Served, path: str | Path, **extra: object) -> httpx.Response:
    with server.client(HANG_TIMEOUT_S) as client:
        return client.post("/update_weights", json={"format": "safetensors", "path": str(path), **extra})


def assert_refused(server: Served, r: httpx.Response, *, status: int | None = None) -> dict[str, str]:
    """A 4xx JSON error, and the engine generates what it did before, at the version it had."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert status is None or r.status_code == status, (r.status_code, r.text)
    error = error_of(r)
    assert tokens(server.url) == server.expected
    assert server.engine.memory_status()["weights_version"] == server.version
    return error


# -- where disk updates may read -----------------------------------------------------------
def test_disk_updates_are_refused_without_weights_dirs(rooted_server: Served, weights_root: Path) -> None:
    """Regression: /update_weights with format safetensors loaded any folder the server could read."""
    with ServerThread(create_app(rooted_server.engine)) as bare, httpx.Client(base_url=bare.url, timeout=20) as client:
        r = client.post("/update_weights", json={"format": "safetensors", "path": str(weights_root / "b")})
    error = assert_refused(rooted_server, r, status=403)
    assert error["code"] == "forbidden" and "--weights-dir" in error["message"]


def test_disk_paths_must_resolve_under_a_root(rooted_server: Served, weights_root: Path, checkpoints,
                                              expected_b: list[int]) -> None:
    """Regression: `..` and /proc/self/root/... reached folders outside any allowed one, and the errors
    told whether a path existed. Now every path outside the roots gets the same 403, whatever is there."""
    outside = checkpoints[1]  # a valid checkpoint, outside the root
    link = new_folder(weights_root, "links") / "out"
    link.symlink_to(outside, target_is_directory=True)
    paths = [str(outside), f"{weights_root}/../{outside.name}", f"/proc/self/root{outside}",
             str(link), str(outside.parent / "no-such-folder"), "/etc", "/etc/hostname",
             "/no/such/folder", f"{weights_root}/../../../../../../etc"]
    messages = set()
    for path in paths:
        error = assert_refused(rooted_server, disk_update(rooted_server, path), status=403)
        assert error["code"] == "forbidden"
        messages.add(error["message"].replace(repr(path), "<path>"))
    assert len(messages) == 1, messages  # existing and missing paths read the same
    # A path that goes out and back in stays allowed: it is resolved before the check.
    assert expected_b != rooted_server.expected  # so the tokens tell which weights are loaded
    r = disk_update(rooted_server, f"{weights_root}/b/../b", version=5)
    assert r.status_code == 200, r.text
    assert tokens(rooted_server.url) == expected_b


def test_index_must_name_shards_inside_its_folder(rooted_server: Served, weights_root: Path, checkpoints) -> None:
    """Regression: an index.json could name shards anywhere (`../x.safetensors`, absolute paths); and a
    shard that is a symlink out of the root was read."""
    names = list(weights_of(weights_root / "b"))
    shards = {"parent": "../b/model.safetensors", "absolute": str(weights_root / "b" / "model.safetensors"),
              "outside": str(checkpoints[1] / "model.safetensors")}
    for case, shard in shards.items():
        folder = new_folder(weights_root, f"index-{case}")
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": dict.fromkeys(names, shard)}))
        error = assert_refused(rooted_server, disk_update(rooted_server, folder), status=400)
        assert "outside its folder" in error["message"]
    folder = new_folder(weights_root, "symlinked-shard")
    (folder / "model.safetensors").symlink_to(checkpoints[1] / "model.safetensors")
    error = assert_refused(rooted_server, disk_update(rooted_server, folder))
    assert str(checkpoints[1]) not in error["message"]  # the refusal does not tell where the link points


@pytest.mark.parametrize("layout", ["single", "indexed"])
def test_fifo_checkpoint_is_refused_without_blocking(rooted_server: Served, weights_root: Path, layout: str) -> None:
    """Regression: a FIFO named model.safetensors froze the whole server on its first read."""
    folder = new_folder(weights_root, f"fifo-{layout}")
    fifo = folder / ("model.safetensors" if layout == "single" else "model-00001-of-00001.safetensors")
    os.mkfifo(fifo)
    if layout == "indexed":
        (folder / "model.safetensors.index.json").write_text(
            '{"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}')
    # The old read blocked holding the interpreter lock: the whole test process froze and no timeout in it
    # could fire. A separate process opens the write end after HANG_TIMEOUT_S, so a blocked reader gets EOF,
    # the request returns late, and the test fails instead of hanging.
    unblocker = subprocess.Popen([sys.executable, "-c", _UNBLOCK, str(fifo), str(HANG_TIMEOUT_S)])
    try:
        start = time.monotonic()
        r = disk_update(rooted_server, folder)
        assert time.monotonic() - start < HANG_TIMEOUT_S, "the request blocked on the FIFO"
        error = assert_refused(rooted_server, r, status=400)
        assert "not a regular file" in error["message"]
    finally:
        unblocker.kill()
        unblocker.wait()
        with contextlib.suppress(OSError):  # no reader blocked (ENXIO): nothing to release
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


_UNBLOCK = """
import os, sys, time
time.sleep(float(sys.argv[2]))
for _ in range(100):
    try:
        os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader blocked now
    time.sleep(0.1)
"""


# -- complete and finite updates -----------------------------------------------------------
@pytest.mark.parametrize("dropped", ["one tensor", "one layer"])
def test_update_must_cover_every_weight_unless_partial(rooted_server: Served, weights_root: Path,
                                                        dropped: str) -> None:
    """Regression: a checkpoint missing a tensor, or a whole layer, was accepted and the engine served a mix."""
    named = weights_of(weights_root / "b")
    gone = sorted(n for n in named if (n == "model.layers.1.mlp.down_proj.weight" if dropped == "one tensor"
                                       else n.startswith("model.layers.3.")))
    folder = write_checkpoint(new_folder(weights_root, "missing"), {n: t for n, t in named.items() if n not in gone})
    error = assert_refused(rooted_server, disk_update(rooted_server, folder), status=400)
    assert "unwritten" in error["message"] and gone[0] in error["message"]
    r = disk_update(rooted_server, folder, partial=True, version=8)
    assert r.status_code == 200, r.text
    assert r.json()["kept"] == gone and r.json()["version"] == 8


def _poisoned(named: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    named = {n: t.clone() for n, t in named.items()}
    named["model.layers.0.self_attn.q_proj.weight"][3, 5] = value
    return named


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("path", ["update_weights", "manifest", "bucket messages", "disk"])
def test_non_finite_weights_are_refused_on_every_path(rooted_server: Served, weights_root: Path, path: str,
                                                       value: float) -> None:
    """Regression: NaN/Inf weights were accepted (every output became token 0). Refused now on every path.
    A whole update (in-process update_weights, a one-request manifest, a one-file checkpoint) is checked
    before its copy and leaves the outputs as they were; a streamed one (BucketSender: the engine
    process's update_weights, the Client's bucket messages) is checked in the synchronisation after each
    bucket's copy, so the engine then refuses to generate until a complete update arrives."""
    from colocate.client import Client, ServerError

    bad = _poisoned(weights_of(weights_root / "b"), value)
    streamed = path == "bucket messages" or (path == "update_weights" and rooted_server.mode == "engine-process")
    if path == "update_weights":
        with pytest.raises(ValueError, match="NaN or infinity"):
            rooted_server.engine.update_weights(bad.items(), version=9)
    elif path == "manifest":
        manifest, buckets = export_manifest(bad, dtype=rooted_server.engine.config.torch_dtype, device="cpu")
        try:
            assert len(manifest.buckets) == 1
            with rooted_server.client() as client:
                r = client.post("/update_weights", json={"format": "ipc", "manifest": manifest.to_dict(),
                                                         "version": 9})
            assert "NaN or infinity" in assert_refused(rooted_server, r, status=400)["message"]
        finally:
            for bucket in buckets:
                bucket.release()
    elif path == "bucket messages":
        with Client(rooted_server.url) as client, pytest.raises(ServerError, match="NaN or infinity") as refused:
            client.update_weights(bad.items(), version=9)
        assert refused.value.status == 400
    else:
        folder = write_checkpoint(new_folder(weights_root, "non-finite"), bad)
        error = assert_refused(rooted_server, disk_update(rooted_server, folder), status=400)
        assert "NaN or infinity" in error["message"]
    assert rooted_server.engine.memory_status()["weights_version"] == rooted_server.version
    if streamed:  # never sampled from a mix: refused until a complete update, then as before
        with rooted_server.client() as client:
            r = client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 409 and "hold no valid values" in r.json()["error"]["message"], r.text
        rooted_server.engine.update_weights_from_disk(str(rooted_server.checkpoint), version=rooted_server.version)
    assert tokens(rooted_server.url) == rooted_server.expected


# -- shared-memory handles -----------------------------------------------------------------
@pytest.mark.parametrize("target", ["foreign segment", "our name, not our token", "fifo"])
def test_manifest_cannot_name_a_segment_it_did_not_export(rooted_server: Served, weights_root: Path,
                                                           target: str) -> None:
    """Regression: a manifest could name any /dev/shm segment (its bytes were loaded as weights), and a
    FIFO there was deleted. Now: a 4xx, and the segment or FIFO is still there."""
    from multiprocessing.shared_memory import SharedMemory

    manifest, buckets = export_manifest(weights_of(weights_root / "b"), dtype=rooted_server.engine.config.torch_dtype,
                                        device="cpu")
    body = manifest.to_dict()
    size = body["handles"][0]["nbytes"] + (64 << 10)
    segment, path = None, None
    if target == "fifo":
        name = f"colocate_{secrets.token_hex(8)}"
        path = f"/dev/shm/{name}"
        os.mkfifo(path)
    else:
        segment = SharedMemory(name=None if target == "foreign segment" else f"colocate_{secrets.token_hex(8)}",
                               create=True, size=size)
        name = segment.name.lstrip("/")
        path = f"/dev/shm/{name}"
    body["handles"][0]["name"] = name
    try:
        with rooted_server.client(HANG_TIMEOUT_S) as client:
            r = client.post("/update_weights", json={"format": "ipc", "manifest": body, "version": 4})
        assert_refused(rooted_server, r)
        assert os.path.exists(path)
    finally:
        for bucket in buckets:
            bucket.release()
        if segment is not None:
            segment.close()
            segment.unlink()
        elif os.path.exists(path):
            os.unlink(path)
