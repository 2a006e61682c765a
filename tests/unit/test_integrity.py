"""Updates arrive intact or are refused: the bucket checksum catches flipped, truncated and swapped bytes."""

from __future__ import annotations

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.process.service import EngineService
from colocate.weight_sync import BucketImporter, BucketSender, export_manifest
from colocate.weight_sync.checksum import _checksum_torch, bucket_checksum
from tests.local_transport import LocalTransport

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
PROMPTS = [[1, 2, 3], [9, 8, 7, 6]]


def tokens(engine: Engine) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def engines():
    engine = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64, seed=0))
    other = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64, seed=1))
    yield engine, other
    engine.shutdown()
    other.shutdown()


def _flip(buf: torch.Tensor) -> None:
    buf[buf.numel() // 3] ^= 0x10


def _truncate(buf: torch.Tensor) -> None:
    buf[buf.numel() // 2:] = 0  # the tail never arrived


def _swap(buf: torch.Tensor) -> None:
    a, b = buf[4096:8192].clone(), buf[16384:20480].clone()  # two slices of 4 KiB trade places
    buf[4096:8192], buf[16384:20480] = b, a


CORRUPTIONS = {"flipped byte": _flip, "truncated bucket": _truncate, "two swapped slices": _swap}


def test_checksum_sees_every_corruption_and_nothing_else() -> None:
    buf = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    clean = bucket_checksum(buf)
    assert bucket_checksum(buf.clone()) == clean == _checksum_torch(buf)
    for name, corrupt in CORRUPTIONS.items():
        bad = buf.clone()
        corrupt(bad)
        assert bucket_checksum(bad) != clean, name


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_manifest_update_is_refused_and_changes_nothing(engines, corruption: str) -> None:
    engine, other = engines
    before = tokens(engine)
    manifest, buckets = export_manifest(list(other.runner.model.hf_named_tensors()), dtype=torch.float32,
                                        device="cpu", version=5)
    try:
        CORRUPTIONS[corruption](buckets[0].buffer)  # in shared memory, after the producer's checksum
        with pytest.raises(ValueError, match="arrived corrupted"):
            EngineService(engine).update_weights_from_manifest(manifest.to_dict())
    finally:
        for bucket in buckets:
            bucket.release()
    assert tokens(engine) == before and engine.weights_version != 5


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_streamed_bucket_is_refused_and_the_engine_will_not_generate(corruption: str) -> None:
    engine = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64, seed=0))
    other = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64, seed=1))
    try:
        named = list(other.runner.model.hf_named_tensors())
        importer = BucketImporter(engine, device=torch.device("cpu"))
        sender = BucketSender(LocalTransport(importer, CORRUPTIONS[corruption]), device=torch.device("cpu"),
                              dtype=torch.float32, bucket_bytes=1 << 20)
        with pytest.raises(ValueError, match="arrived corrupted"):
            sender.send(named, version=3)
        # Some weights may be new and others old: never sampled from until a good update arrives.
        with pytest.raises(RuntimeError, match="hold no valid values"):
            engine.generate("x", GREEDY)
        good = BucketSender(LocalTransport(importer), device=torch.device("cpu"), dtype=torch.float32,
                            bucket_bytes=1 << 20)
        assert good.send(named, version=4)["version"] == 4
        assert tokens(engine) == tokens(other)
    finally:
        engine.shutdown()
        other.shutdown()


_KERNEL_CHECK = """
import torch
from colocate.weight_sync import checksum as c
from colocate.weight_sync import _checksum_kernel as k
gen = torch.Generator().manual_seed(0)
cases = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in (2, 46, 8192, 24622, 173032)]
cases.append(torch.full((41014,), 255, dtype=torch.uint8))  # every word 0xFFFF: the 32-bit tile sums at their largest
for buf in cases:
    words = buf.view(torch.int16)
    programs = max(1, min(-(-words.numel() // c._BLOCK), 6))
    partial = torch.empty(programs, dtype=torch.int64)
    k.checksum_kernel[(programs,)](words, partial, words.numel(), BLOCK=c._BLOCK, TILE=c._TILE)
    assert int(partial.sum()) == c._checksum_numpy(buf) == int(c._checksum_torch(buf)), buf.numel()
print("OK")
"""


def test_triton_checksum_kernel_agrees_with_the_references_in_the_interpreter() -> None:
    """The CUDA kernel's arithmetic (32-bit tiles, 64-bit totals), run by Triton's CPU interpreter."""
    pytest.importorskip("triton", reason="the kernel needs Triton; on CUDA machines _triton_ok checks it at first use")
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-2000:] + out.stderr[-3000:]
