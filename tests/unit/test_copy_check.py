"""The one-pass bucket copy (copy, checksum and NaN/inf scan in one read): where it applies, and, in Triton's
interpreter, that it copies the same bytes and finds the same checksum and the same non-finite tensors as the
separate copy and checks, and that an engine fed through it refuses corrupted and non-finite buckets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colocate.weight_sync.copy_check import BucketCheck, plan_segments

REPO = Path(__file__).resolve().parents[2]


def _views(bucket: torch.Tensor, specs: list[tuple[int, torch.dtype, int]]) -> list[torch.Tensor]:
    return [bucket[o:o + n * torch.tensor([], dtype=d).element_size()].view(d) for o, d, n in specs]


def test_segments_cover_the_bucket_in_order_with_its_gaps() -> None:
    bucket = torch.zeros(1000, dtype=torch.uint8)
    sources = _views(bucket, [(400, torch.float32, 10), (8, torch.bfloat16, 100)])
    segments = plan_segments(bucket, sources, [torch.empty_like(s) for s in sources])
    assert segments[:, :2].tolist() == [[0, 4], [4, 100], [104, 96], [200, 20], [220, 280]]
    assert segments[:, 3].tolist() == [0, 1, 0, 2, 0] and segments[:, 4].tolist() == [-1, 1, -1, 0, -1]
    assert (segments[:, 2] == 0).tolist() == [True, False, True, False, True]  # gaps are checksummed, not copied


@pytest.mark.parametrize("case", ["cast", "fp8 destination", "strided destination", "overlap", "int tensor"])
def test_the_separate_path_keeps_what_one_pass_cannot_do(case: str) -> None:
    bucket = torch.zeros(4096, dtype=torch.uint8)
    sources = _views(bucket, [(0, torch.bfloat16, 64), (256, torch.float32, 64)])
    destinations = [torch.empty_like(s) for s in sources]
    if case == "cast":
        destinations[0] = torch.empty(64, dtype=torch.float32)
    elif case == "fp8 destination":
        destinations[0] = object()  # an Fp8Slice: quantized on write
    elif case == "strided destination":
        destinations[1] = torch.empty(128, dtype=torch.float32)[::2]
    elif case == "overlap":
        sources[1] = bucket[64:320].view(torch.float32)
    else:
        sources[1] = bucket[256:512].view(torch.int32)
        destinations[1] = torch.empty_like(sources[1])
    assert plan_segments(bucket, sources, destinations) is None


def test_a_cpu_bucket_is_not_copied_in_one_pass_by_default() -> None:
    bucket = torch.zeros(4096, dtype=torch.uint8)
    sources = _views(bucket, [(0, torch.bfloat16, 64)])
    assert BucketCheck(bucket, 0, "bucket 0").copy_and_check([torch.empty_like(sources[0])], sources) is None


_INTERPRETED = r"""
import random

import numpy as np
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.weight_sync import BucketImporter, BucketSender, copy_check
from colocate.weight_sync.checksum import _checksum_numpy
from tests.local_transport import LocalTransport

assert copy_check.self_check("cpu")
rng = random.Random(0)
for trial in range(12):
    bucket = torch.randint(0, 256, (rng.randrange(2, 80_000) * 2,), dtype=torch.uint8)
    sources, position = [], 0
    while True:
        dtype = rng.choice([torch.bfloat16, torch.float32, torch.float16])
        size = torch.tensor([], dtype=dtype).element_size()
        start = -(-(position + rng.choice([0, 0, 2, 6, 100])) // size) * size
        n = rng.randrange(0, 30_000)
        if start + n * size > bucket.numel():
            break
        view = bucket[start:start + n * size].view(dtype)
        view.copy_(torch.randn(n).to(dtype))
        if n and rng.random() < 0.3:
            view[rng.randrange(n)] = rng.choice([float("nan"), float("inf"), -float("inf")])
        sources.append(view)
        position = start + n * size
    rng.shuffle(sources)
    destinations = [torch.zeros_like(s) for s in sources]
    want_bad = sorted(i for i, s in enumerate(sources) if not bool(s.isfinite().all()))
    check = copy_check.BucketCheck(bucket, _checksum_numpy(bucket), f"bucket {trial}")
    check.one_pass_devices = ("cpu",)
    judge = check.copy_and_check(destinations, sources)
    assert judge is not None
    assert judge() == want_bad, (trial, want_bad)
    assert all(torch.equal(d.view(torch.uint8), s.view(torch.uint8)) for d, s in zip(destinations, sources)), trial
    bucket[rng.randrange(bucket.numel())] ^= 0x01  # one flipped bit: the same pass refuses it
    try:
        check.copy_and_check(destinations, sources)()
        raise AssertionError("a flipped bit was not caught")
    except ValueError as e:
        assert "arrived corrupted" in str(e)

# A sender's fill in the same pass: fp32 rounded into bf16 slots (to nearest even, as torch), others as they are.
for trial in range(6):
    bucket = torch.randint(0, 256, (300_000,), dtype=torch.uint8)
    specs, position = [], rng.randrange(0, 64, 2)
    while position < 250_000:
        dtype = rng.choice([torch.bfloat16, torch.float32, torch.float16])
        size = torch.tensor([], dtype=dtype).element_size()
        start = -(-position // size) * size
        specs.append((start, dtype, rng.randrange(1, 12_000)))
        position = start + specs[-1][2] * size + rng.choice([0, 4, 100])
    specs = [sp for sp in specs if sp[0] + sp[2] * torch.tensor([], dtype=sp[1]).element_size() <= bucket.numel()]
    reference = bucket.clone()
    slots = [bucket[o:o + n * torch.tensor([], dtype=d).element_size()].view(d) for o, d, n in specs]
    sources = []
    for slot in slots:
        cast = slot.dtype == torch.bfloat16 and rng.random() < 0.5
        values = torch.randn(slot.numel()) * rng.choice([1.0, 1e3, 1e-30])
        # A NaN's bits after rounding differ between torch's own CPU and CUDA casts (it is refused anyway)
        values[0] = rng.choice([0.0, -0.0, float("inf"), 3.4e38, 1.00390625, 1.01171875, *[float("nan")] * (not cast)])
        sources.append(values if cast else values.to(slot.dtype))
    for (o, d, n), src in zip(specs, sources):
        reference[o:o + n * torch.tensor([], dtype=d).element_size()].view(d).copy_(src)
    checksum = copy_check.launch(bucket, copy_check.plan_segments(bucket, slots, sources, gather=True),
                                 gather=True)[0].sum()
    assert torch.equal(bucket, reference), trial
    assert int(checksum) == _checksum_numpy(reference), trial

# An engine fed through the one pass: same tokens as the sender's model; corrupted or NaN buckets refused.
copy_check.BucketCheck.one_pass_devices = ("cuda", "cpu")
taken = []
plain = copy_check.BucketCheck.copy_and_check
copy_check.BucketCheck.copy_and_check = lambda self, d, s: taken.append(plain(self, d, s)) or taken[-1]
greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
engine = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64, seed=0))
other = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64, seed=1))
named = list(other.runner.model.hf_named_tensors())
importer = BucketImporter(engine, device=torch.device("cpu"))


def send(corrupt=None, version=3):
    return BucketSender(LocalTransport(importer, corrupt), device=torch.device("cpu"), dtype=torch.float32,
                        bucket_bytes=1 << 20).send(named, version=version)


layouts = []  # whether each launch's layout allowed the kernel's 16-byte accesses
plain_aligned = copy_check.aligned
copy_check.aligned = lambda b, seg: layouts.append(plain_aligned(b, seg)) or layouts[-1]
gathered = []
plain_gather = copy_check.gather_checksum
import colocate.weight_sync.buckets as buckets_module
buckets_module.gather_checksum = lambda *a: gathered.append(plain_gather(*a)) or gathered[-1]
assert send(version=3)["version"] == 3
assert gathered and all(c is not None for c in gathered), "the sender's fill did not take the one pass"
assert taken and all(j is not None for j in taken), "the one pass did not take the fp32 buckets"
assert len(layouts) == len(gathered) + len(taken) and all(layouts), "weight buckets should be 16-byte aligned"
want = [o.token_ids for o in other.generate([[1, 2, 3], [9, 8, 7]], greedy)]
assert [o.token_ids for o in engine.generate([[1, 2, 3], [9, 8, 7]], greedy)] == want


def flip(buf):
    buf[buf.numel() // 3] ^= 0x10


try:
    send(flip, version=4)
    raise AssertionError("a corrupted bucket was accepted")
except ValueError as e:
    assert "arrived corrupted" in str(e), e
try:
    engine.generate("x", greedy)
    raise AssertionError("generated from a half-updated model")
except RuntimeError as e:
    assert "hold no valid values" in str(e), e
poisoned = dict(named)
name = "model.layers.0.mlp.down_proj.weight"
poisoned[name] = poisoned[name].clone()
poisoned[name][0, 0] = float("nan")
try:
    BucketSender(LocalTransport(importer), device=torch.device("cpu"), dtype=torch.float32,
                 bucket_bytes=1 << 20).send(list(poisoned.items()), version=5)
    raise AssertionError("a NaN weight was accepted")
except ValueError as e:
    assert "NaN or infinity" in str(e) and name in str(e), e
assert send(version=6)["version"] == 6
assert [o.token_ids for o in engine.generate([[1, 2, 3], [9, 8, 7]], greedy)] == want
engine.shutdown()
other.shutdown()
print("OK")
"""


def test_one_pass_copy_agrees_with_the_separate_path_in_the_interpreter() -> None:
    pytest.importorskip("triton", reason="the kernel needs Triton; on CUDA machines it checks itself at first use")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=600,
                         check=False, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-2000:] + out.stderr[-4000:]


def test_aligned_layouts_take_the_wide_accesses() -> None:
    # 16-byte accesses need every segment's start and length on 8 words and every address on 16 bytes
    from colocate.weight_sync.copy_check import aligned
    bucket = torch.zeros(4096, dtype=torch.uint8)
    rows = np.array([[0, 64, 0, 0, -1], [64, 1024, 1 << 20, 1, 0]], dtype=np.int64)
    assert aligned(bucket, rows)
    for column, value in ((0, 4), (1, 60), (2, (1 << 20) + 8)):
        odd = rows.copy()
        odd[1, column] = value
        assert not aligned(bucket, odd), (column, value)
    assert not aligned(bucket[2:], rows)  # the bucket's own start
