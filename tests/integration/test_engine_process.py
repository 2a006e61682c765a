"""launch_engine on CPU: the engine in a child process, updated through shared-memory buckets."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams, launch_engine
from colocate.model import load_model
from colocate.server import EngineProcessError
from colocate.weight_sync import export_manifest

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
PROMPTS = ["Hello world", [5, 6, 7, 8], "colocate"]


@pytest.fixture(scope="module")
def expected_b(checkpoints: tuple[Path, Path]) -> list[list[int]]:
    engine = Engine(EngineConfig(model=str(checkpoints[1]), device="cpu", max_model_len=128))
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture
def engine(checkpoints: tuple[Path, Path]):
    handle = launch_engine(EngineConfig(model=str(checkpoints[0]), device="cpu", max_model_len=128))
    yield handle
    handle.shutdown()


def tokens(engine) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def test_update_from_colocate_trainer_matches_fresh_engine(engine, checkpoints, expected_b) -> None:
    before = tokens(engine)
    assert before != expected_b
    trainer, _ = load_model(str(checkpoints[1]), device="cpu", dtype=torch.float32)
    result = engine.update_weights(trainer.hf_named_tensors(), version=3, bucket_bytes=1 << 20)
    assert result["num_buckets"] > 3 and result["version"] == 3
    assert tokens(engine) == expected_b
    assert engine.weights_version == 3


def test_update_from_a_transformers_model(engine, checkpoints, expected_b) -> None:
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints[1]), dtype=torch.float32)
    engine.update_weights(hf_model.named_parameters(), version=1)
    assert tokens(engine) == expected_b


@pytest.mark.parametrize("case", ["unknown name", "wrong shape", "integer dtype"])
def test_bad_updates_refused_and_outputs_unchanged(engine, checkpoints, case) -> None:
    before = tokens(engine)
    trainer, _ = load_model(str(checkpoints[1]), device="cpu", dtype=torch.float32)
    named = list(trainer.hf_named_tensors())
    if case == "unknown name":
        named.append(("model.layers.99.mlp.up_proj.weight", named[0][1]))
    elif case == "wrong shape":
        named[3] = (named[3][0], torch.zeros(7, 7))
    else:
        named[3] = (named[3][0], named[3][1].to(torch.int32))
    with pytest.raises(ValueError, match=named[-1][0] if case == "unknown name" else named[3][0]):
        engine.update_weights(named, version=9)
    assert tokens(engine) == before
    assert engine.weights_version is None


def _manifest_with_buckets(named: list[tuple[str, torch.Tensor]], keep: list) -> dict:
    manifest, buckets = export_manifest(named, dtype=torch.float32, device="cpu", bucket_bytes=1 << 20, version=5)
    keep.extend(buckets)
    return manifest.to_dict()


def test_complete_manifest_update(engine, checkpoints, expected_b) -> None:
    trainer, _ = load_model(str(checkpoints[1]), device="cpu", dtype=torch.float32)
    keep: list = []
    try:
        manifest = _manifest_with_buckets(list(trainer.hf_named_tensors()), keep)
        assert engine.update_weights_from_manifest(manifest)["version"] == 5
    finally:
        for exported in keep:
            exported.release()
    assert tokens(engine) == expected_b


@pytest.mark.parametrize("case", ["bogus handle", "truncated bucket", "unknown handle kind", "last bucket missing"])
def test_bad_manifests_change_nothing(engine, checkpoints, case) -> None:
    before = tokens(engine)
    trainer, _ = load_model(str(checkpoints[1]), device="cpu", dtype=torch.float32)
    keep: list = []
    try:
        manifest = _manifest_with_buckets(list(trainer.hf_named_tensors()), keep)
        last = manifest["handles"][-1]
        if case == "bogus handle":
            last["name"] = "colocate_no_such_segment"
        elif case == "truncated bucket":
            last["nbytes"] = manifest["buckets"][-1]["nbytes"] - 256
        elif case == "unknown handle kind":
            last["kind"] = "pickle"
        else:
            keep[-1].release()  # the producer let go of it: opening fails
        with pytest.raises((ValueError, RuntimeError)):
            engine.update_weights_from_manifest(manifest)
    finally:
        for exported in keep:
            exported.release()
    assert tokens(engine) == before  # every handle is opened before the first copy


def _producer_that_exits(named_bytes: list[tuple[str, list[int]]], queue: mp.Queue) -> None:
    named = [(n, torch.tensor(v, dtype=torch.float32).view(-1)) for n, v in named_bytes]
    keep: list = []
    queue.put(_manifest_with_buckets(named, keep))
    # Exit without releasing: the segments vanish with this process (its resource tracker unlinks them).


def test_manifest_from_a_dead_process_is_refused(engine) -> None:
    before = tokens(engine)
    status = engine.memory_status()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_producer_that_exits, args=([("model.norm.weight", [1.0] * 256)], queue))
    proc.start()
    manifest = queue.get(timeout=60)
    proc.join(60)
    time.sleep(0.5)
    with pytest.raises((RuntimeError, ValueError), match="producer|exited|open"):
        engine.update_weights_from_manifest(manifest)
    assert tokens(engine) == before
    assert engine.memory_status()["weights_version"] == status["weights_version"]


def test_producer_failing_mid_update_never_serves_a_mix(engine, checkpoints, expected_b, monkeypatch) -> None:
    import colocate.weight_sync.sender as process

    trainer, _ = load_model(str(checkpoints[1]), device="cpu", dtype=torch.float32)
    named = list(trainer.hf_named_tensors())
    real_fill, calls = process.fill_and_checksum, []

    def fill_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("producer died")
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(process, "fill_and_checksum", fill_then_die)
    with pytest.raises(RuntimeError, match="producer died"):
        engine.update_weights(named, version=2, bucket_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="hold no valid values"):
        engine.generate("x", GREEDY)
    monkeypatch.setattr(process, "fill_and_checksum", real_fill)
    engine.update_weights(named, version=2)
    assert tokens(engine) == expected_b


def test_silent_producer_times_out_and_engine_refuses(checkpoints) -> None:
    engine = Engine(EngineConfig(model=str(checkpoints[0]), device="cpu", max_model_len=128))
    named = list(engine.runner.model.hf_named_tensors())
    engine.begin_weight_update([(n, tuple(t.shape), t.dtype) for n, t in named], version=1, timeout_s=0.2)
    engine.load_weight_bucket([(n, t.clone()) for n, t in named[:4]])
    time.sleep(0.4)
    with pytest.raises(RuntimeError, match="hold no valid values"):
        engine.generate("x", GREEDY)


def test_update_from_disk(engine, checkpoints, expected_b, tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        engine.update_weights_from_disk(str(tmp_path / "missing"))
    result = engine.update_weights_from_disk(str(checkpoints[1]), version=4)
    assert result["version"] == 4
    assert tokens(engine) == expected_b


def test_memory_round_trip_through_the_handle(engine) -> None:
    before = tokens(engine)
    report = engine.release_memory(weights_to="cpu")
    assert report.tags["weights"].device_bytes > 0
    assert not engine.memory_status()["is_awake"]
    engine.resume_memory()
    assert tokens(engine) == before


def test_killed_child_raises_instead_of_hanging(checkpoints) -> None:
    handle = launch_engine(EngineConfig(model=str(checkpoints[0]), device="cpu", max_model_len=4096))
    box: dict = {}

    def long_generate() -> None:
        try:
            handle.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True))
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=long_generate)
    thread.start()
    time.sleep(1.0)
    os.kill(handle.pid, signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(box.get("error"), EngineProcessError) and "exited" in str(box["error"])
    with pytest.raises(EngineProcessError):
        handle.memory_status()
    handle.shutdown()


def test_shutdown_leaves_no_process_or_segment(checkpoints) -> None:
    segments = shm_segments()
    handle = launch_engine(EngineConfig(model=str(checkpoints[0]), device="cpu", max_model_len=128))
    trainer, _ = load_model(str(checkpoints[1]), device="cpu", dtype=torch.float32)
    handle.update_weights(trainer.hf_named_tensors(), bucket_bytes=1 << 20)
    pid = handle.pid
    handle.shutdown()
    handle.shutdown()  # idempotent
    assert not handle.is_alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert shm_segments() <= segments


def test_repeated_updates_reuse_the_layout_and_stay_correct(engine, checkpoints, expected_b) -> None:
    a, _ = load_model(str(checkpoints[0]), device="cpu", dtype=torch.float32)
    b, _ = load_model(str(checkpoints[1]), device="cpu", dtype=torch.float32)
    before = tokens(engine)
    for trainer, expected in [(b, expected_b), (a, before), (b, expected_b)]:
        engine.update_weights(trainer.hf_named_tensors(), bucket_bytes=1 << 20)  # same layout: id only
        assert tokens(engine) == expected
    engine.update_weights(a.hf_named_tensors(), bucket_bytes=2 << 20)  # a new layout: the whole manifest again
    assert tokens(engine) == before
    engine.release_memory(("weights",), weights_to="meta")
    engine.resume_memory(("weights",))  # new parameters behind the same layout
    engine.update_weights(b.hf_named_tensors(), bucket_bytes=2 << 20)
    engine.resume_memory()
    assert tokens(engine) == expected_b


# A user's script as the README shows it: launch_engine at top level, no `if __name__ == "__main__":`.
UNGUARDED_SCRIPT = """
from colocate import EngineConfig, SamplingParams, launch_engine
with launch_engine(EngineConfig(model="tiny", device="cpu", max_model_len=64)) as engine:
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0.0))[0]
    print("tokens", out.token_ids, "pid", engine.pid)
"""


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_script_without_a_main_guard_launches_the_engine(how: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "user_script.py"
    script.write_text(UNGUARDED_SCRIPT)
    run = dict(capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    if how == "file":
        result = subprocess.run([sys.executable, str(script)], **run)
    else:
        result = subprocess.run([sys.executable, "-"], input=UNGUARDED_SCRIPT, **run)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("tokens")]
    # Printed once: the child never ran the script again (spawn re-imported __main__ and printed twice, or died).
    assert len(lines) == 1, result.stdout
    expected = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64)).generate(
        [[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0.0))[0].token_ids
    assert lines[0].startswith(f"tokens {expected}"), (lines, expected)


def test_generate_stream_gives_the_outputs_of_generate_piece_by_piece(engine) -> None:
    params = [SamplingParams(max_new_tokens=9, temperature=0.0, top_logprobs=2),
              SamplingParams(max_new_tokens=6, temperature=1.0, seed=5, ignore_eos=True, prompt_logprobs=1)]
    expected = engine.generate(["Hello", [5, 6, 7]], params)
    events = list(engine.generate_stream(["Hello", [5, 6, 7]], params))
    for i, out in enumerate(expected):
        mine = [e for e in events if e.index == i]
        assert mine[-1].output == out and all(e.delta is not None for e in mine[:-1])  # deltas, then its output
        assert [t for e in mine[:-1] for t in e.delta.token_ids] == out.token_ids
        assert [lp for e in mine[:-1] for lp in e.delta.logprobs] == out.logprobs
    first = next(e.delta for e in events if e.index == 1)
    assert first.prompt_logprobs == expected[1].prompt_logprobs and first.prompt_logprobs[0] is None
    assert isinstance(expected[0].top_logprobs[0][0], tuple)  # (id, logprob) pairs survive the JSON
    # A streamed request cancelled after its first tokens finishes at once with finish_reason "abort".
    first_tokens: queue.SimpleQueue = queue.SimpleQueue()
    call_id, future = engine.generate_async(["Hello"], SamplingParams(max_new_tokens=120, temperature=0.0,
                                                                      ignore_eos=True), on_event=first_tokens.put)
    assert first_tokens.get(timeout=60).delta.token_ids
    engine.cancel(call_id)
    out = future.result(timeout=60)[0]
    assert out.finish_reason == "abort" and len(out.token_ids) < 120


def test_closing_a_stream_early_cancels_its_request(engine, monkeypatch) -> None:
    cancelled: list[int] = []
    cancel = engine.cancel
    monkeypatch.setattr(engine, "cancel", lambda call_id: (cancelled.append(call_id), cancel(call_id)))
    stream = engine.generate_stream(["Hello"], SamplingParams(max_new_tokens=120, temperature=0.0, ignore_eos=True))
    assert next(stream).delta.token_ids
    stream.close()
    assert len(cancelled) == 1
