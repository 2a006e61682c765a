"""Weight sync building blocks: bucket planning, fill and views, the manifest's parser, shm and CUDA IPC handles."""

from __future__ import annotations

import base64
import copy
import json
import multiprocessing as mp
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from colocate.weight_sync import (ALIGN, FORMAT, BucketLayout, TensorSlot, WeightManifest, allocate_bucket,
                                  bucket_views, device_uuid, fill_bucket, open_bucket, plan_buckets)
from colocate.weight_sync import cuda_ipc

REPO_ROOT = Path(__file__).resolve().parents[2]
HAS_DEV_SHM = os.path.isdir("/dev/shm")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPES = [("embed.weight", (37, 16)), ("layers.0.norm.weight", (16,)), ("layers.0.attn.scale", ()),
          ("layers.0.mlp.weight", (64, 16)), ("empty", (0, 3)), ("lm_head.weight", (37, 16))]


def _sources(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float32) for name, shape in SHAPES}


def _checksum(tensor: torch.Tensor) -> int:
    """Position-weighted sum of the tensor's bytes: equal bytes in equal order give equal sums."""
    raw = tensor.detach().reshape(-1).view(torch.uint8).cpu().to(torch.int64)  # [nbytes]
    return int((raw * (torch.arange(raw.numel()) % 251 + 1)).sum())


def _slot_ranges(layout: BucketLayout) -> list[tuple[int, int]]:
    return sorted((slot.offset, slot.offset + slot.nbytes) for slot in layout.tensors)


# --- plan_buckets -------------------------------------------------------------------------------------------------

def test_plan_buckets_aligns_slots_and_keeps_order() -> None:
    layouts = plan_buckets(SHAPES, dtype=torch.bfloat16, bucket_bytes=2048)
    assert [slot.name for layout in layouts for slot in layout.tensors] == [name for name, _ in SHAPES]
    for layout in layouts:
        assert all(slot.offset % ALIGN == 0 and slot.dtype == "bfloat16" for slot in layout.tensors)
        ranges = _slot_ranges(layout)
        assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:])), "slots overlap"
        assert layout.nbytes == max(end for _, end in ranges)  # no trailing padding
        assert layout.nbytes <= 2048 or len(layout.tensors) == 1
    assert [slot.shape for layout in layouts for slot in layout.tensors] == [shape for _, shape in SHAPES]


def test_plan_buckets_fills_greedily_up_to_the_limit() -> None:
    # float32 [100] is 400 bytes: slots at 0 and 512 end at 912 <= 1024; a third at 1024 would end past it.
    layouts = plan_buckets([(f"t{i}", (100,)) for i in range(5)], dtype=torch.float32, bucket_bytes=1024)
    assert [[slot.offset for slot in layout.tensors] for layout in layouts] == [[0, 512], [0, 512], [0]]
    assert [layout.nbytes for layout in layouts] == [912, 912, 400]
    assert layouts[0].tensors[0] == TensorSlot(name="t0", shape=(100,), dtype="float32", offset=0)
    assert layouts[0].tensors[0].nbytes == 400


def test_plan_buckets_gives_a_large_tensor_its_own_bucket() -> None:
    layouts = plan_buckets([("a", (10,)), ("big", (1000,)), ("b", (10,)), ("c", (10,))], dtype=torch.float16,
                           bucket_bytes=1024)
    assert [[slot.name for slot in layout.tensors] for layout in layouts] == [["a"], ["big"], ["b", "c"]]
    assert layouts[1].nbytes == 2000 > 1024
    assert plan_buckets([("big", (1000,))], dtype=torch.float16, bucket_bytes=1)[0].nbytes == 2000


@pytest.mark.parametrize("kwargs, match", [
    (dict(named_shapes=[("a", (2,))], dtype=torch.float32, bucket_bytes=0), "bucket_bytes"),
    (dict(named_shapes=[("a", (2,))], dtype=torch.float32, bucket_bytes=-5), "bucket_bytes"),
    (dict(named_shapes=[("a", (2,))], dtype=torch.float32, bucket_bytes=True), "bucket_bytes"),
    (dict(named_shapes=[("a", (2,)), ("a", (3,))], dtype=torch.float32), "duplicate tensor name 'a'"),
    (dict(named_shapes=[], dtype=torch.float32), "at least one tensor"),
    (dict(named_shapes=iter(()), dtype=torch.bfloat16), "at least one tensor"),
    (dict(named_shapes=[("a", (2,))], dtype=torch.float64), "not supported"),
    (dict(named_shapes=[("a", (2,))], dtype=torch.int32), "not supported"),
    (dict(named_shapes=[("a", (2, -1))], dtype=torch.float32), "non-negative"),
    (dict(named_shapes=[("", (2,))], dtype=torch.float32), "non-empty"),
])
def test_plan_buckets_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_buckets(**kwargs)


# --- fill_bucket and bucket_views ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fill_then_views_round_trip_with_cast(dtype: torch.dtype) -> None:
    sources = _sources()
    sources["layers.0.norm.weight"] = torch.nn.Parameter(sources["layers.0.norm.weight"])  # requires_grad
    sources["embed.weight"] = sources["embed.weight"].double()  # any source dtype
    (layout,) = plan_buckets([(n, tuple(t.shape)) for n, t in sources.items()], dtype=dtype)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    fill_bucket(layout, sources, buffer)
    views = bucket_views(layout, buffer)
    assert [name for name, _ in views] == list(sources)
    for name, view in views:
        assert view.dtype == dtype and view.shape == sources[name].shape
        assert torch.equal(view, sources[name].detach().to(dtype)), name  # the same rounding as .to()


def test_bucket_views_alias_the_buffer() -> None:
    (layout,) = plan_buckets([("a", (4,)), ("b", (2, 3))], dtype=torch.float32)
    buffer = torch.zeros(layout.nbytes + 100, dtype=torch.uint8)  # larger than needed is fine
    (_, a), (_, b) = bucket_views(layout, buffer)
    assert a.data_ptr() == buffer.data_ptr() and b.data_ptr() == buffer.data_ptr() + layout.tensors[1].offset
    b.fill_(1.5)
    assert torch.equal(buffer[256:280].view(torch.float32), torch.full((6,), 1.5))


def test_fill_bucket_checks_everything_before_the_first_copy() -> None:
    sources = _sources()
    (layout,) = plan_buckets([(n, tuple(t.shape)) for n, t in sources.items()], dtype=torch.bfloat16)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no tensor named 'lm_head.weight'"):
        fill_bucket(layout, {n: t for n, t in sources.items() if n != "lm_head.weight"}, buffer)
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(16, 37\)"):
        fill_bucket(layout, {**sources, "lm_head.weight": sources["lm_head.weight"].t()}, buffer)
    assert not buffer.any(), "a rejected fill changed the buffer"
    fill_bucket(layout, {**sources, "extra": torch.ones(3)}, buffer)  # names beyond the layout are ignored


@pytest.mark.parametrize("make_buffer, match", [
    (lambda n: torch.zeros(n - 1, dtype=torch.uint8), "holds"),
    (lambda n: torch.zeros(n, dtype=torch.float32), "uint8"),
    (lambda n: torch.zeros(2, n, dtype=torch.uint8), "1-D"),
    (lambda n: torch.zeros(2 * n, dtype=torch.uint8)[::2], "contiguous"),
    (lambda n: bytearray(n), "uint8"),
])
def test_bucket_views_rejects_bad_buffers(make_buffer: Callable[[int], object], match: str) -> None:
    (layout,) = plan_buckets([("a", (4,)), ("b", (2, 3))], dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        bucket_views(layout, make_buffer(layout.nbytes))


# --- WeightManifest -----------------------------------------------------------------------------------------------

def _manifest() -> WeightManifest:
    layouts = plan_buckets(SHAPES, dtype=torch.bfloat16, bucket_bytes=2048)
    handles = tuple({"kind": "shm", "name": f"psm_{i}", "nbytes": layout.nbytes, "pid": 1}
                    for i, layout in enumerate(layouts))
    return WeightManifest(version=7, buckets=layouts, handles=handles)


def test_manifest_round_trips_through_json() -> None:
    manifest = _manifest()
    assert len(manifest.buckets) >= 2
    data = json.loads(json.dumps(manifest.to_dict()))
    assert data["format"] == FORMAT and data["version"] == 7
    assert data["buckets"][0]["tensors"][0] == {"name": "embed.weight", "shape": [37, 16], "dtype": "bfloat16",
                                                "offset": 0}
    assert WeightManifest.from_dict(data) == manifest
    assert manifest.num_tensors == len(SHAPES)
    assert manifest.total_bytes == sum(2 * torch.Size(shape).numel() for _, shape in SHAPES)
    layout_only = WeightManifest(version=None, buckets=manifest.buckets)
    assert "handles" not in layout_only.to_dict()
    assert WeightManifest.from_dict(json.loads(json.dumps(layout_only.to_dict()))) == layout_only


def test_manifest_from_dict_copies_its_input() -> None:
    data = _manifest().to_dict()
    manifest = WeightManifest.from_dict(data)
    data["handles"][0]["name"] = "changed"
    data["buckets"][0]["tensors"][0]["shape"].append(1)
    assert manifest == _manifest()
    manifest.to_dict()["handles"][0]["name"] = "changed"
    assert manifest.handles[0]["name"] == "psm_0"


def test_manifest_constructor_checks_the_layout() -> None:
    slot = TensorSlot(name="a", shape=(4,), dtype="float32", offset=0)
    with pytest.raises(ValueError, match=r"buckets\[1\].tensors\[0\].name: duplicate"):
        WeightManifest(version=0, buckets=(BucketLayout(nbytes=16, tensors=(slot,)),) * 2)
    with pytest.raises(ValueError, match="handles: 0 handles for 1 buckets"):
        WeightManifest(version=0, buckets=(BucketLayout(nbytes=16, tensors=(slot,)),), handles=())


def _set(path: str, value: object) -> Callable[[dict], None]:
    """A mutation that sets data[k1][k2]... (ints index lists) to value."""
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]

    def mutate(data: dict) -> None:
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]

    def mutate(data: dict) -> None:
        target = data
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return mutate


def _overlap(data: dict) -> None:
    data["buckets"][0]["tensors"][1]["offset"] = 256  # embed.weight [37, 16] bf16 covers [0, 1184)


def _duplicate_across_buckets(data: dict) -> None:
    data["buckets"][1]["tensors"][0]["name"] = data["buckets"][0]["tensors"][0]["name"]


MALFORMED = [  # (id, mutation, from_dict kwargs, text the error must contain)
    ("only a junk key", lambda d: d.clear() or d.update(x=[]), {}, "manifest: unknown key 'x'"),
    ("unknown top-level key", _set("extra", 1), {}, "manifest: unknown key 'extra'"),
    ("missing buckets", _delete("buckets"), {}, "manifest: missing key 'buckets'"),
    ("unknown format", _set("format", "colocate.weights/2"), {}, "format"),
    ("format not a string", _set("format", 1), {}, "format"),
    ("version a string", _set("version", "7"), {}, "version"),
    ("version a bool", _set("version", True), {}, "version"),
    ("version negative", _set("version", -1), {}, "version"),
    ("buckets an object", _set("buckets", {}), {}, "buckets: expected a JSON array"),
    ("bucket nbytes negative", _set("buckets/0/nbytes", -1), {}, "buckets[0].nbytes"),
    ("bucket nbytes a bool", _set("buckets/0/nbytes", True), {}, "buckets[0].nbytes"),
    ("bucket nbytes a float", _set("buckets/0/nbytes", 2048.0), {}, "buckets[0].nbytes"),
    ("bucket unknown key", _set("buckets/1/device", "cuda"), {}, "buckets[1]: unknown key 'device'"),
    ("bucket not an object", _set("buckets/1", [1, 2]), {}, "buckets[1]: expected a JSON object"),
    ("tensors not a list", _set("buckets/0/tensors", "abc"), {}, "buckets[0].tensors"),
    ("tensor missing offset", _delete("buckets/0/tensors/1/offset"), {}, "buckets[0].tensors[1]: missing key"),
    ("tensor extra key", _set("buckets/0/tensors/1/data", "AAAA"), {}, "buckets[0].tensors[1]: unknown key"),
    ("name empty", _set("buckets/0/tensors/0/name", ""), {}, "buckets[0].tensors[0].name"),
    ("name not a string", _set("buckets/0/tensors/0/name", 5), {}, "buckets[0].tensors[0].name"),
    ("name too long", _set("buckets/0/tensors/0/name", "x" * 513), {}, "buckets[0].tensors[0].name"),
    ("name with a control char", _set("buckets/0/tensors/0/name", "a\x00b"), {}, "buckets[0].tensors[0].name"),
    ("shape negative dim", _set("buckets/0/tensors/1/shape", [-16]), {}, "buckets[0].tensors[1].shape[0]"),
    ("shape float dim", _set("buckets/0/tensors/0/shape", [37, 16.0]), {}, "buckets[0].tensors[0].shape[1]"),
    ("shape bool dim", _set("buckets/0/tensors/0/shape", [True, 16]), {}, "buckets[0].tensors[0].shape[0]"),
    ("shape a string", _set("buckets/0/tensors/0/shape", "37,16"), {}, "buckets[0].tensors[0].shape"),
    ("shape too many dims", _set("buckets/0/tensors/2/shape", [1] * 17), {}, "buckets[0].tensors[2].shape"),
    ("shape huge dim", _set("buckets/0/tensors/2/shape", [0, 1 << 60]), {}, "buckets[0].tensors[2].shape[1]"),
    ("dtype unknown", _set("buckets/0/tensors/0/dtype", "int8"), {}, "buckets[0].tensors[0].dtype"),
    ("dtype torch spelling", _set("buckets/0/tensors/0/dtype", "torch.float32"), {}, "buckets[0].tensors[0].dtype"),
    ("offset unaligned", _set("buckets/0/tensors/1/offset", 1280 + 8), {}, "buckets[0].tensors[1].offset"),
    ("offset negative", _set("buckets/0/tensors/1/offset", -256), {}, "buckets[0].tensors[1].offset"),
    ("offset a string", _set("buckets/0/tensors/1/offset", "1280"), {}, "buckets[0].tensors[1].offset"),
    ("slot past nbytes", _set("buckets/0/nbytes", 100), {}, "reaches past the bucket's nbytes=100"),
    ("slots overlap", _overlap, {}, "buckets[0].tensors[1].offset: the slot at 256 overlaps buckets[0].tensors[0]"),
    ("duplicate name across buckets", _duplicate_across_buckets, {}, "buckets[1].tensors[0].name: duplicate"),
    ("too many tensors", lambda d: None, {"max_tensors": 3}, "max_tensors=3"),
    ("too many bytes", lambda d: None, {"max_bytes": 2500}, "max_bytes=2500"),
    ("handles an object", _set("handles", {}), {}, "handles: expected a JSON array"),
    ("handles too short", lambda d: d["handles"].pop(), {}, "handles: 2 handles for 3 buckets"),
    ("handle not an object", _set("handles/0", "psm_0"), {}, "handles[0]: expected a JSON object"),
    ("handle with a non-JSON value", _set("handles/0/name", b"psm_0"), {}, "handles[0].name"),
    ("handle nested too deep", _set("handles/0/x", [[[[[[1]]]]]]), {}, "handles[0].x"),
]


@pytest.mark.parametrize("mutate, kwargs, expected", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_from_dict_rejects_malformed_manifests(mutate: Callable[[dict], None], kwargs: dict, expected: str) -> None:
    data = _manifest().to_dict()
    assert [len(b["tensors"]) for b in data["buckets"]] == [3, 2, 1]
    mutate(data)
    with pytest.raises(ValueError) as info:
        WeightManifest.from_dict(data, **kwargs)
    assert expected in str(info.value)


@pytest.mark.parametrize("data", [None, [], "manifest", 3, json.dumps(_manifest().to_dict())])
def test_from_dict_rejects_non_objects(data: object) -> None:
    with pytest.raises(ValueError, match="manifest: expected a JSON object"):
        WeightManifest.from_dict(data)


# --- shared-memory handles ----------------------------------------------------------------------------------------

def _consume_in_child(manifest_json: str, device: str, results: mp.Queue) -> None:
    """Spawned consumer: open every bucket by its handle, checksum each tensor view, close, report plain ints."""
    try:
        manifest = WeightManifest.from_dict(json.loads(manifest_json))
        sums: list[int] = []
        for layout, handle in zip(manifest.buckets, manifest.handles):
            with open_bucket(handle, nbytes=layout.nbytes, device=device) as bucket:
                sums += [_checksum(view) for _, view in bucket_views(layout, bucket.buffer)]
        results.put(sums)
    except BaseException as e:  # report, so that the test fails with the child's error
        results.put(repr(e))


def _run_child(target: Callable, *args: object) -> object:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, results))
    child.start()
    try:
        result = results.get(timeout=120)
    finally:
        child.join(timeout=120)
    assert child.exitcode == 0, f"child exit code {child.exitcode}"
    return result


def _export(layouts: tuple[BucketLayout, ...], sources: dict[str, torch.Tensor], device: str) -> list:
    buckets = [allocate_bucket(layout.nbytes, device) for layout in layouts]
    for layout, bucket in zip(layouts, buckets):
        fill_bucket(layout, sources, bucket.buffer)
    return buckets


def test_shm_bucket_opens_in_a_spawned_process() -> None:
    sources = _sources()
    layouts = plan_buckets([(n, tuple(t.shape)) for n, t in sources.items()], dtype=torch.bfloat16,
                           bucket_bytes=2048)
    buckets = _export(layouts, sources, "cpu")
    try:
        manifest = WeightManifest(version=1, buckets=layouts, handles=tuple(b.handle for b in buckets))
        sums = _run_child(_consume_in_child, json.dumps(manifest.to_dict()), "cpu")
        assert sums == [_checksum(sources[slot.name].to(torch.bfloat16)) for layout in layouts
                        for slot in layout.tensors]
        if HAS_DEV_SHM:  # the consumer closed and exited; the producer's segments are still there
            assert all(os.path.exists(f"/dev/shm/{b.handle['name']}") for b in buckets)
    finally:
        for bucket in buckets:
            bucket.release()
    if HAS_DEV_SHM:
        assert not any(os.path.exists(f"/dev/shm/{b.handle['name']}") for b in buckets)


def test_release_unlinks_the_segment_and_is_idempotent() -> None:
    bucket = allocate_bucket(1000, "cpu")
    assert bucket.buffer.dtype == torch.uint8 and bucket.buffer.shape == (1000,)
    assert bucket.handle == {"kind": "shm", "name": bucket.handle["name"], "token": bucket.handle["token"],
                             "nbytes": 1000, "pid": os.getpid()}
    json.dumps(bucket.handle)
    path = f"/dev/shm/{bucket.handle['name']}"
    assert os.path.exists(path) or not HAS_DEV_SHM
    bucket.release()
    bucket.release()
    assert not os.path.exists(path)
    with pytest.raises(RuntimeError, match="released"):
        bucket.buffer
    with allocate_bucket(10, "cpu") as other:
        path = f"/dev/shm/{other.handle['name']}"
    assert not os.path.exists(path)


def test_open_released_segment_says_the_producer_may_have_exited() -> None:
    bucket = allocate_bucket(512, "cpu")
    handle = bucket.handle
    bucket.release()
    with pytest.raises(RuntimeError, match="could not open the bucket.*producer process"):
        open_bucket(handle, nbytes=512, device="cpu")


def test_open_truncated_segment() -> None:
    with allocate_bucket(1000, "cpu") as bucket:
        with pytest.raises(ValueError, match="truncated bucket"):
            open_bucket({**bucket.handle, "nbytes": 4096}, nbytes=4096, device="cpu")


def test_views_outlive_close_and_release_without_crashing() -> None:
    (layout,) = plan_buckets([("a", (64,))], dtype=torch.float32)
    bucket = allocate_bucket(layout.nbytes, "cpu")
    fill_bucket(layout, {"a": torch.arange(64.0)}, bucket.buffer)
    producer_views = bucket_views(layout, bucket.buffer)
    opened = open_bucket(bucket.handle, nbytes=layout.nbytes, device="cpu")
    consumer_views = bucket_views(layout, opened.buffer)
    opened.close()
    bucket.release()
    # The mapping stays until the last view goes, rather than being unmapped under them.
    assert torch.equal(consumer_views[0][1], torch.arange(64.0))
    assert torch.equal(producer_views[0][1], torch.arange(64.0))
    if HAS_DEV_SHM:
        assert not os.path.exists(f"/dev/shm/{bucket.handle['name']}")


def test_empty_bucket() -> None:
    with allocate_bucket(0, "cpu") as bucket, open_bucket(bucket.handle, nbytes=0, device="cpu") as opened:
        assert bucket.buffer.numel() == 0 and opened.buffer.numel() == 0


def _cuda_handle() -> dict:
    return {"kind": "cuda_ipc", "device_uuid": "GPU-0", "handle": base64.b64encode(b"\x02c" + bytes(64)).decode(),
            "storage_nbytes": 4096, "storage_offset": 0,
            "ref_counter_handle": base64.b64encode(b"/torch_123_456_0").decode(), "ref_counter_offset": 3,
            "event_handle": base64.b64encode(bytes(64)).decode(), "event_sync_required": True, "nbytes": 4096,
            "pid": 123}


SHM_HANDLE = {"kind": "shm", "name": "colocate_0123456789abcdef", "token": "0" * 32, "nbytes": 4096, "pid": 123}
BOGUS_HANDLES = [  # (id, handle, text the error must contain)
    ("a list", [SHM_HANDLE], "handle: expected a JSON object"),
    ("a string", "psm_abc", "handle: expected a JSON object"),
    ("None", None, "handle: expected a JSON object"),
    ("unknown kind", {**SHM_HANDLE, "kind": "nccl"}, "handle.kind"),
    ("no kind", {k: v for k, v in SHM_HANDLE.items() if k != "kind"}, "handle.kind"),
    ("unknown key", {**SHM_HANDLE, "path": "/dev/shm/x"}, "handle: unknown key 'path'"),
    ("missing pid", {k: v for k, v in SHM_HANDLE.items() if k != "pid"}, "handle: missing key 'pid'"),
    ("nbytes mismatch", {**SHM_HANDLE, "nbytes": 4095}, "handle.nbytes"),
    ("nbytes a bool", {**SHM_HANDLE, "nbytes": True}, "handle.nbytes"),
    ("pid a string", {**SHM_HANDLE, "pid": "123"}, "handle.pid"),
    ("name '..'", {**SHM_HANDLE, "name": ".."}, "handle.name"),
    ("name traversal", {**SHM_HANDLE, "name": "../../etc/passwd"}, "handle.name"),
    ("name with a dotdot", {**SHM_HANDLE, "name": "colocate_0123..6789abcdef"}, "handle.name"),
    ("name with a slash", {**SHM_HANDLE, "name": "/colocate/0123456789abcdef"}, "handle.name"),
    ("name with two leading slashes", {**SHM_HANDLE, "name": "//colocate_0123456789abcdef"}, "handle.name"),
    ("name not ours", {**SHM_HANDLE, "name": "psm_abc"}, "handle.name"),
    ("token missing", {k: v for k, v in SHM_HANDLE.items() if k != "token"}, "handle: missing key 'token'"),
    ("token not hex", {**SHM_HANDLE, "token": "z" * 32}, "handle.token"),
    ("name empty", {**SHM_HANDLE, "name": ""}, "handle.name"),
    ("name with a space", {**SHM_HANDLE, "name": "psm abc"}, "handle.name"),
    ("name too long", {**SHM_HANDLE, "name": "p" * 201}, "handle.name"),
    ("name not a string", {**SHM_HANDLE, "name": 5}, "handle.name"),
    ("cuda: bad base64", {**_cuda_handle(), "handle": "not base64!"}, "handle.handle"),
    ("cuda: handle not a string", {**_cuda_handle(), "handle": [1, 2]}, "handle.handle"),
    ("cuda: handle too long", {**_cuda_handle(), "handle": "A" * 4000}, "handle.handle"),
    ("cuda: short event handle", {**_cuda_handle(), "event_handle": base64.b64encode(bytes(8)).decode()},
     "handle.event_handle"),
    ("cuda: foreign ref counter", {**_cuda_handle(), "ref_counter_handle": base64.b64encode(b"/psm_x").decode()},
     "handle.ref_counter_handle"),
    ("cuda: ref counter offset out of range", {**_cuda_handle(), "ref_counter_offset": 10_000},
     "handle.ref_counter_offset"),
    ("cuda: truncated storage", {**_cuda_handle(), "storage_nbytes": 4000}, "handle.storage_nbytes: truncated"),
    ("cuda: negative storage offset", {**_cuda_handle(), "storage_offset": -512}, "handle.storage_offset"),
    ("cuda: event flag not a bool", {**_cuda_handle(), "event_sync_required": 1}, "handle.event_sync_required"),
    ("cuda: uuid not a string", {**_cuda_handle(), "device_uuid": 0}, "handle.device_uuid"),
]


@pytest.mark.parametrize("handle, expected", [case[1:] for case in BOGUS_HANDLES], ids=[c[0] for c in BOGUS_HANDLES])
def test_open_bucket_rejects_bogus_handles(handle: object, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        open_bucket(copy.deepcopy(handle), nbytes=4096, device="cpu")
    assert expected in str(info.value)


def test_open_bucket_needs_the_device_type_of_its_kind() -> None:
    with pytest.raises(ValueError, match="handle.kind: a 'cuda_ipc' bucket opens on a cuda device, not on cpu"):
        open_bucket(_cuda_handle(), nbytes=4096, device="cpu")
    with pytest.raises(ValueError, match="handle.kind: a 'shm' bucket opens on a cpu device, not on cuda"):
        open_bucket(SHM_HANDLE, nbytes=4096, device="cuda")


def test_device_uuid() -> None:
    assert device_uuid("cpu") == "cpu" and device_uuid(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="cpu and cuda"):
        device_uuid("meta")


def test_expandable_segments_are_off_only_around_the_allocation() -> None:
    was_on = cuda_ipc.expandable_segments_on()
    try:
        cuda_ipc.set_allocator_settings("expandable_segments:True")
        with cuda_ipc.expandable_segments_off():
            assert not cuda_ipc.expandable_segments_on()
        assert cuda_ipc.expandable_segments_on()
        cuda_ipc.set_allocator_settings("expandable_segments:False")
        with cuda_ipc.expandable_segments_off():
            assert not cuda_ipc.expandable_segments_on()
        assert not cuda_ipc.expandable_segments_on()
    finally:
        cuda_ipc.set_allocator_settings(f"expandable_segments:{was_on}")


_TRACKER_SCRIPT = r'''
import json, os, subprocess, sys
import multiprocessing as mp
import torch
from colocate.weight_sync import allocate_bucket, open_bucket

def consume(handle_json, results):
    handle = json.loads(handle_json)
    with open_bucket(handle, nbytes=handle["nbytes"], device="cpu") as bucket:
        results.put(int(bucket.buffer.to(torch.int64).sum()))

CONSUMER = """
import json, sys
import torch
from colocate.weight_sync import open_bucket
handle = json.loads(sys.argv[1])
with open_bucket(handle, nbytes=handle["nbytes"], device="cpu") as bucket:
    print(int(bucket.buffer.to(torch.int64).sum()))
"""

if __name__ == "__main__":
    bucket = allocate_bucket(4096, "cpu")
    bucket.buffer.fill_(3)
    handle_json = json.dumps(bucket.handle)
    ctx = mp.get_context("spawn")  # a child shares the producer's resource tracker
    results = ctx.Queue()
    child = ctx.Process(target=consume, args=(handle_json, results))
    child.start()
    assert results.get(timeout=120) == 3 * 4096
    child.join(120)
    assert child.exitcode == 0
    # An unrelated process has a resource tracker of its own, which unlinks what it knows at exit.
    out = subprocess.run([sys.executable, "-c", CONSUMER, handle_json], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(3 * 4096), out
    assert out.stderr == "", out.stderr
    path = "/dev/shm/" + bucket.handle["name"]
    assert os.path.exists(path), "a consumer unlinked the producer's segment"
    bucket.release()
    assert not os.path.exists(path)
    print("OK")
'''


@pytest.mark.skipif(not HAS_DEV_SHM, reason="checks /dev/shm (Linux)")
def test_consumers_leave_the_resource_tracker_alone(tmp_path: Path) -> None:
    """Regression: attaching consumers registered the segment with their resource tracker. Their exit then
    unlinked the producer's segment, and unregistering instead made a shared tracker print a KeyError."""
    script = tmp_path / "tracker.py"
    script.write_text(_TRACKER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "leaked" not in out.stderr, out.stderr


# --- CUDA IPC handles ---------------------------------------------------------------------------------------------

def _export_and_exit(results: mp.Queue) -> None:
    """Spawned producer that exits right after sending its handle (as JSON text)."""
    bucket = allocate_bucket(4096, "cuda")
    bucket.buffer.fill_(1)
    torch.cuda.synchronize()
    results.put(json.dumps(bucket.handle))


@needs_cuda
def test_cuda_bucket_opens_in_a_spawned_process() -> None:
    sources = _sources()
    layouts = plan_buckets([(n, tuple(t.shape)) for n, t in sources.items()], dtype=torch.bfloat16,
                           bucket_bytes=2048)
    torch.cuda.synchronize()
    allocated_before = torch.cuda.memory_allocated()
    buckets = _export(layouts, sources, "cuda")  # CPU float32 sources, cast to bf16 on the way
    handle = buckets[0].handle
    assert handle["kind"] == "cuda_ipc" and handle["device_uuid"] == device_uuid("cuda")
    json.dumps(handle)
    manifest = WeightManifest(version=3, buckets=layouts, handles=tuple(b.handle for b in buckets))
    sums = _run_child(_consume_in_child, json.dumps(manifest.to_dict()), "cuda")
    assert sums == [_checksum(sources[slot.name].to(torch.bfloat16)) for layout in layouts for slot in layout.tensors]
    for bucket in buckets:  # the consumer closed before answering: each block goes straight back
        bucket.release()
    assert torch.cuda.memory_allocated() == allocated_before, "a released bucket stayed in torch's IPC limbo"


@needs_cuda
def test_cuda_bucket_from_another_gpu_is_refused() -> None:
    with allocate_bucket(4096, "cuda") as bucket:
        fake = {**bucket.handle, "device_uuid": "GPU-00000000-0000-0000-0000-000000000000"}
        with pytest.raises(ValueError, match="bucket on GPU 'GPU-00000000.*engine on"):
            open_bucket(fake, nbytes=4096, device="cuda")


@needs_cuda
def test_cuda_bucket_exports_with_expandable_segments_on() -> None:
    was_on = cuda_ipc.expandable_segments_on()
    cuda_ipc.set_allocator_settings("expandable_segments:True")
    try:
        (layout,) = plan_buckets([("w", (1024, 1024))], dtype=torch.float16)  # 2 MiB: a large-pool block
        sources = {"w": torch.randn(1024, 1024, device="cuda")}
        (bucket,) = _export((layout,), sources, "cuda")
        assert cuda_ipc.expandable_segments_on(), "the allocator setting was not restored"
        # torch's handle header: version 2, then 'c' (cudaMalloc) or 'e' (expandable segment, needs pidfd_open)
        assert base64.b64decode(bucket.handle["handle"])[:2] != b"\x02e", "exported from an expandable segment"
        manifest = WeightManifest(version=0, buckets=(layout,), handles=(bucket.handle,))
        assert _run_child(_consume_in_child, json.dumps(manifest.to_dict()), "cuda") == [
            _checksum(sources["w"].to(torch.float16))]
        bucket.release()
    finally:
        cuda_ipc.set_allocator_settings(f"expandable_segments:{was_on}")


@needs_cuda
def test_cuda_open_after_the_producer_exited() -> None:
    handle = json.loads(_run_child(_export_and_exit))
    with pytest.raises(RuntimeError, match="could not open the bucket: the producer process may have exited"):
        open_bucket(handle, nbytes=4096, device="cuda")


@needs_cuda
def test_cuda_bucket_filled_from_pinned_host_float32_casts_on_the_device() -> None:
    # An offloaded trainer's weights are fp32 in pinned host memory; the bucket is bf16 on the GPU.
    names = [("a", (300, 7)), ("b", (64,)), ("c", (5, 5))]
    sources = {n: torch.randn(*s).pin_memory() for n, s in names}
    sources["b"] = sources["b"].to(torch.bfloat16)  # same dtype: the one-launch path
    (layout,) = plan_buckets(names, dtype=torch.bfloat16)
    with allocate_bucket(layout.nbytes, "cuda") as bucket:
        fill_bucket(layout, sources, bucket.buffer)
        for name, view in bucket_views(layout, bucket.buffer):
            assert view.device.type == "cuda" and torch.equal(view.cpu(), sources[name].to(torch.bfloat16)), name


# --- shared memory handles are bound to their producer ------------------------------------------------------------

@pytest.mark.skipif(not HAS_DEV_SHM, reason="checks /dev/shm (Linux)")
def test_shm_handle_must_name_the_producers_own_segment() -> None:
    """Regression: a manifest could name any process's /dev/shm segment (its bytes were loaded as weights),
    and a FIFO there was deleted when the map failed. Only colocate's names, regular files and the
    handle's token are accepted now, and nothing the consumer did not create is ever unlinked."""
    from multiprocessing.shared_memory import SharedMemory

    foreign = SharedMemory(create=True, size=8192)  # someone else's segment, default name
    impostor = SharedMemory(name="colocate_00000000deadbeef", create=True, size=8192)  # our name, not our token
    fifo = "/dev/shm/colocate_00000000feedface"
    os.mkfifo(fifo)
    try:
        base = {"kind": "shm", "token": "ab" * 16, "nbytes": 4096, "pid": os.getpid()}
        with pytest.raises(ValueError, match="handle.name: expected a colocate shared memory name"):
            open_bucket({**base, "name": foreign.name}, nbytes=4096, device="cpu")
        with pytest.raises(ValueError, match="does not carry the handle's token"):
            open_bucket({**base, "name": "colocate_00000000deadbeef"}, nbytes=4096, device="cpu")
        with pytest.raises(ValueError, match="not a regular file"):
            open_bucket({**base, "name": "colocate_00000000feedface"}, nbytes=4096, device="cpu")
        assert os.path.exists(fifo) and os.path.exists(f"/dev/shm/{impostor.name.lstrip('/')}")
        # The producer's own handle, token included, still opens.
        with allocate_bucket(4096, "cpu") as bucket:
            bucket.buffer.fill_(7)
            with open_bucket(bucket.handle, nbytes=4096, device="cpu") as opened:
                assert int(opened.buffer.sum()) == 7 * 4096
            wrong = {**bucket.handle, "token": "0" * 32}
            with pytest.raises(ValueError, match="token"):
                open_bucket(wrong, nbytes=4096, device="cpu")
    finally:
        os.unlink(fifo)
        for segment in (foreign, impostor):
            segment.close()
            segment.unlink()
