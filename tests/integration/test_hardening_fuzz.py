"""Malformed checkpoints, index files, manifests and bucket messages over HTTP: a 4xx JSON error, never a 5xx.

Both server modes. Every answer is {"error": {"code", "type", "message"}} with no traceback in it,
whether the engine runs in the server's process or in its child.
"""

from __future__ import annotations

import copy
import json
import random
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save

from colocate.weight_sync import export_manifest
from tests.integration.servers import Served, error_of, tokens

SMALL = "model.norm.weight"  # a small tensor whose header entry the cases break


def malformed_safetensors(valid: bytes) -> dict[str, bytes]:
    """Broken variants of a valid safetensors file: lengths, headers, dtypes, shapes and offsets."""
    n = int.from_bytes(valid[:8], "little")
    header, data = json.loads(valid[8:8 + n]), valid[8 + n:]
    entry = header[SMALL]
    begin, end = entry["data_offsets"]

    def with_header(h: object, body: bytes = data) -> bytes:
        raw = json.dumps(h).encode()
        return len(raw).to_bytes(8, "little") + raw + body

    def with_entry(**changes: object) -> bytes:
        return with_header({**header, SMALL: {k: v for k, v in {**entry, **changes}.items() if v is not None}})

    rng = random.Random(0)
    cases = {
        "empty": b"", "four bytes": b"\x01\x02\x03\x04", "length only": (16).to_bytes(8, "little"),
        "header length 2^63": (1 << 63).to_bytes(8, "little") + valid[8:],
        "header length 2^64-1": b"\xff" * 8 + valid[8:],
        "header length past the end": len(valid).to_bytes(8, "little") + valid[8:],
        "header length zero": (0).to_bytes(8, "little") + valid[8:],
        "header not JSON": (5).to_bytes(8, "little") + b"{nope" + data,
        "header not UTF-8": (4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc" + data,
        "header a list": with_header([1, 2]), "header a string": with_header("x"),
        "header nested deeply": with_header(json.loads("[" * 500 + "]" * 500)),
        "truncated in the header": valid[:8 + n // 2], "truncated in the data": valid[:8 + n + len(data) // 2],
        "wrong dtype string": with_entry(dtype="F99"), "dtype not a string": with_entry(dtype=5),
        "offsets past the end": with_entry(data_offsets=[len(data), len(data) + end - begin]),
        "offsets reversed": with_entry(data_offsets=[end, begin]),
        "offsets negative": with_entry(data_offsets=[-8, end - begin - 8]),
        "offsets one short": with_entry(data_offsets=[begin, end - 4]),
        "offsets not a list": with_entry(data_offsets="0-4"),
        "offsets missing": with_header({**header, SMALL: {"dtype": entry["dtype"], "shape": entry["shape"]}}),
        "shape negative": with_entry(shape=[-1]), "shape huge": with_entry(shape=[1 << 40, 1 << 40]),
        "shape not a list": with_entry(shape="256"), "entry not an object": with_header({**header, SMALL: 5}),
        "metadata not strings": with_header({**header, "__metadata__": {"format": 5}}),
        "unknown tensor name": with_header({**{k: v for k, v in header.items() if k != SMALL},
                                            "model.no_such.weight": entry}),
    }
    for i in range(3):
        cases[f"random bytes {i}"] = rng.randbytes(rng.randrange(1, 4096))
        flipped = bytearray(valid[:8 + n])
        flipped[8 + rng.randrange(n)] ^= 0x5A  # one byte of the header
        cases[f"header byte flipped {i}"] = bytes(flipped) + data
    return cases


def malformed_indexes(shard: str) -> dict[str, bytes]:
    """Broken model.safetensors.index.json texts for a folder holding one valid `shard`."""
    def index(weight_map: object) -> bytes:
        return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()

    return {"not JSON": b"{nope", "not UTF-8": b"\xff\xfe{}", "a list": b"[1, 2]", "a number": b"5",
            "nested deeply": b"[" * 100_000 + b"]" * 100_000, "huge integer": b"1" * 10_000,
            "weight_map a number": index(5), "weight_map a list": index([shard]), "weight_map empty": index({}),
            "shard an integer": index({SMALL: 5}), "shard null": index({SMALL: None}),
            "shard a list": index({SMALL: [shard]}), "nested path": index({SMALL: f"sub/{shard}"}),
            "absolute path": index({SMALL: f"/tmp/{shard}"}), "dot dot": index({SMALL: ".."}),
            "dot": index({SMALL: "."}), "empty name": index({SMALL: ""}), "missing shard": index({SMALL: "nope"}),
            "NUL in name": index({SMALL: "a\x00b"})}


@pytest.fixture
def valid_bytes(weights_root: Path) -> bytes:
    return (weights_root / "b" / "model.safetensors").read_bytes()


def _post_disk(server: Served, folder: Path) -> httpx.Response:
    with server.client(20) as client:
        return client.post("/update_weights", json={"format": "safetensors", "path": str(folder)})


def _assert_bad_input(r: httpx.Response, case: str) -> None:
    assert r.status_code == 400, (case, r.status_code, r.text)
    assert error_of(r)["code"] == "invalid_request", (case, r.text)


def test_malformed_checkpoint_files_answer_400(rooted_server: Served, weights_root: Path, valid_bytes: bytes) -> None:
    for case, raw in malformed_safetensors(valid_bytes).items():
        folder = weights_root / f"bad-file-{secrets.token_hex(4)}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(raw)
        _assert_bad_input(_post_disk(rooted_server, folder), case)
    # A well-formed file whose tensor does not fit the model.
    named = load_file(str(weights_root / "b" / "model.safetensors"))
    named[SMALL] = named[SMALL][:-1].clone()
    folder = weights_root / f"bad-shape-{secrets.token_hex(4)}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(save(named))
    _assert_bad_input(_post_disk(rooted_server, folder), "wrong shape for the model")
    assert tokens(rooted_server.url) == rooted_server.expected


def test_malformed_index_files_answer_400(rooted_server: Served, weights_root: Path, valid_bytes: bytes) -> None:
    shard = "model-00001-of-00001.safetensors"
    for case, raw in malformed_indexes(shard).items():
        folder = weights_root / f"bad-index-{secrets.token_hex(4)}"
        (folder / "sub").mkdir(parents=True)
        (folder / shard).write_bytes(valid_bytes)
        (folder / "sub" / shard).write_bytes(valid_bytes)
        (folder / "model.safetensors.index.json").write_bytes(raw)
        _assert_bad_input(_post_disk(rooted_server, folder), case)
    folder = weights_root / f"index-is-a-folder-{secrets.token_hex(4)}"
    (folder / "model.safetensors.index.json").mkdir(parents=True)
    _assert_bad_input(_post_disk(rooted_server, folder), "index is a folder")
    assert tokens(rooted_server.url) == rooted_server.expected


# -- manifests and bucket messages ---------------------------------------------------------
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=6)


def _paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _paths(value, (*prefix, key))


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """`doc` with one to three random edits: a node replaced by any JSON value, removed, or given a sibling."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        if not path:
            doc = draw(_JSON)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(_JSON)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(_JSON)
        else:
            parent.insert(path[-1], draw(_JSON))
    return doc


def test_mutated_manifests_and_bucket_messages_never_answer_5xx(rooted_server: Served, weights_root: Path) -> None:
    named = load_file(str(weights_root / "b" / "model.safetensors"))
    manifest, buckets = export_manifest(named, dtype=rooted_server.engine.config.torch_dtype, device="cpu")
    full = manifest.to_dict()
    message = {"index": 0, "handle": full["handles"][0], "keep_open": False, "finish": True,
               "begin": {"manifest": {k: v for k, v in full.items() if k != "handles"}, "layout_id": 1,
                         "version": 3, "partial": False}}
    bodies = [{"format": "ipc", "manifest": full, "version": 3}, {"format": "ipc_bucket", "message": message}]
    statuses: list[int] = []

    @given(body=st.sampled_from(bodies).flatmap(mutated))
    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(body: Any, client: httpx.Client) -> None:
        # json.dumps writes NaN and Infinity as the bare words some clients send.
        r = client.post("/update_weights", content=json.dumps(body), headers={"Content-Type": "application/json"})
        statuses.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            error_of(r)
        assert client.post("/update_weights/abort").status_code == 200  # a message may have left one open

    try:
        with rooted_server.client(20) as client:
            for body in bodies:  # unmutated, both are accepted: the mutations start from working requests
                assert client.post("/update_weights", json=body).status_code == 200
            fuzz(client=client)
    finally:
        for bucket in buckets:
            bucket.release()
    assert any(400 <= s < 500 for s in statuses) and len(statuses) >= 40
