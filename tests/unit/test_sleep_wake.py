"""release_memory / resume_memory / update_weights on CPU: round trips, meta guard, staging, in-flight requests."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.engine.engine import EnginePausedError, PauseTimeoutError
from colocate.memory import TagState

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)
PROMPTS = ["Hello world", [5, 6, 7, 8], "colocate sleeps"]
ALL = ("kv_cache", "weights", "cuda_graph")


def make_engine(**kwargs) -> Engine:
    return Engine(EngineConfig(**{"model": "tiny", "device": "cpu", "max_model_len": 128, **kwargs}))


@pytest.fixture
def engine() -> Engine:
    return make_engine()


def tokens(engine: Engine, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


def snapshot(engine: Engine) -> list[tuple[str, torch.Tensor]]:
    return [(n, t.clone()) for n, t in engine.runner.model.hf_named_tensors()]


@pytest.mark.parametrize("tags", [ALL, ("kv_cache",), ("weights",), ("cuda_graph",), ("kv_cache", "weights")])
def test_round_trip_to_cpu_keeps_outputs(engine: Engine, tags: tuple[str, ...]) -> None:
    before = tokens(engine)
    sampled = tokens(engine, SamplingParams(max_new_tokens=10, temperature=1.0, seed=11))
    report = engine.release_memory(tags, weights_to="cpu")
    assert not engine.memory.is_awake
    assert all(engine.state[t] is TagState.PAUSED for t in tags)
    assert report.device_bytes > 0 or tags == ("cuda_graph",)
    engine.resume_memory(tags)
    assert engine.memory.is_awake
    assert tokens(engine) == before
    assert tokens(engine, SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)) == sampled


def test_resumed_kv_cache_full_of_nan_changes_no_output(engine: Engine) -> None:
    # Regression: the torch decode path gathered whole blocks, so NaN left in the slots past a
    # sequence's length (the resumed cache is uninitialised) reached the output as 0 * NaN.
    before = tokens(engine)
    engine.release_memory(("kv_cache",))
    engine.resume_memory(("kv_cache",))
    engine.runner.kv.tensor.fill_(float("nan"))
    outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == before
    assert all(torch.isfinite(torch.tensor(o.logprobs)).all() for o in outputs)


def test_release_frees_and_reports_bytes(engine: Engine) -> None:
    weights_bytes = engine.memory.weights.nbytes
    kv_bytes = engine.runner.kv.nbytes
    report = engine.release_memory(weights_to="cpu")
    assert report.tags["weights"].device_bytes == weights_bytes
    assert report.tags["weights"].host_bytes == weights_bytes
    assert report.tags["kv_cache"].device_bytes == kv_bytes
    status = engine.memory_status()
    assert status["device_bytes"] == {"kv_cache": 0, "weights": 0, "cuda_graph": 0}
    assert status["host_bytes"]["weights"] >= weights_bytes
    assert all(p.device.type == "meta" for p in engine.runner.model.parameters())
    assert engine.runner.kv.tensor is None
    resumed = engine.resume_memory()
    assert resumed.tags["weights"].device_bytes == weights_bytes
    assert engine.memory_status()["device_bytes"]["kv_cache"] == kv_bytes


def test_bucketed_updates_across_a_weights_round_trip() -> None:
    engine, other = make_engine(seed=0), make_engine(seed=1)
    named = [(n, t.clone()) for n, t in other.runner.model.hf_named_tensors()]
    for _ in range(2):  # the second update reuses the cached plan (views into the parameters)
        engine.begin_weight_update([(n, tuple(t.shape), t.dtype) for n, t in named], version=1)
        engine.load_weight_bucket(named)
        engine.finish_weight_update()
    assert tokens(engine) == tokens(other)
    engine.release_memory(("weights",), weights_to="meta")
    engine.resume_memory(("weights",))  # new parameters: the cached plan must not be used
    engine.begin_weight_update([(n, tuple(t.shape), t.dtype) for n, t in named], version=2)
    engine.load_weight_bucket(named)
    engine.finish_weight_update()
    engine.resume_memory()
    assert tokens(engine) == tokens(other)


def test_host_arena_is_allocated_once_and_can_be_released(engine: Engine) -> None:
    for _ in range(3):
        engine.release_memory(weights_to="cpu")
        engine.resume_memory()
    assert engine.memory.arena.num_allocations == 1
    engine.release_memory(weights_to="cpu")
    with pytest.raises(RuntimeError, match="holds the paused weights"):
        engine.release_host_arena()
    engine.resume_memory()
    assert engine.release_host_arena() == engine.memory.weights.nbytes
    assert engine.memory_status()["host_bytes"]["weights"] == 0


def test_keep_host_arena_false_frees_it_after_each_resume() -> None:
    engine = make_engine(keep_host_arena=False)
    before = tokens(engine)
    for _ in range(2):
        engine.release_memory(weights_to="cpu")
        assert engine.memory_status()["host_bytes"]["weights"] == engine.memory.weights.nbytes
        engine.resume_memory()
        assert engine.memory_status()["host_bytes"]["weights"] == 0
        assert tokens(engine) == before
    assert engine.memory.arena.num_allocations == 2


def test_meta_pause_refuses_until_every_weight_is_written(engine: Engine) -> None:
    before = tokens(engine)
    weights = snapshot(engine)
    engine.release_memory(weights_to="meta")
    engine.resume_memory(("weights",))
    engine.update_weights(weights[:5], version=1, partial=True)
    engine.resume_memory(("kv_cache", "cuda_graph"))
    missing = engine.memory_status()["num_missing_weights"]
    assert missing > 0
    with pytest.raises(RuntimeError, match="update_weights") as err:
        engine.generate("x", GREEDY)
    assert f"{missing} weight(s) hold no valid values" in str(err.value)
    engine.update_weights(weights[5:], version=2, partial=True)
    assert engine.memory_status()["num_missing_weights"] == 0
    assert tokens(engine) == before
    assert engine.weights_version == 2


def test_staged_resume_with_new_weights_matches_a_fresh_engine() -> None:
    engine, other = make_engine(seed=0), make_engine(seed=1)
    expected = tokens(other)
    assert expected != tokens(engine)
    engine.release_memory(weights_to="meta")
    engine.resume_memory(("weights",))
    assert engine.state["kv_cache"] is TagState.PAUSED  # the KV cache is not back yet
    engine.update_weights(other.runner.model.hf_named_tensors(), version=7)
    engine.resume_memory(("kv_cache", "cuda_graph"))
    assert tokens(engine) == expected


def test_buffers_survive_every_mode(engine: Engine) -> None:
    rotary = engine.runner.model.model.rotary_emb
    cos, sin = rotary.cos.clone(), rotary.sin.clone()
    weights = snapshot(engine)
    for mode in ("cpu", "meta"):
        engine.release_memory(weights_to=mode)
        assert rotary.cos.device.type == "cpu"
        engine.resume_memory(("weights",))
        if mode == "meta":
            engine.update_weights(weights)
        engine.resume_memory()
        assert torch.equal(rotary.cos, cos) and torch.equal(rotary.sin, sin)


def test_noops_are_reported_not_raised(engine: Engine) -> None:
    awake = engine.resume_memory()
    assert all("no-op" in r.message for r in awake.tags.values())
    engine.release_memory(("kv_cache",))
    again = engine.release_memory(("kv_cache",))
    assert again.tags["kv_cache"].message.startswith("no-op")
    partial = engine.resume_memory()
    assert "no-op" in partial.tags["weights"].message and "no-op" not in partial.tags["kv_cache"].message


def test_graphs_cannot_resume_before_what_they_point_at(engine: Engine) -> None:
    engine.release_memory()
    with pytest.raises(ValueError, match="resume them first"):
        engine.resume_memory(("cuda_graph",))
    assert all(s is TagState.PAUSED for s in engine.state.values())
    engine.resume_memory(("weights", "kv_cache", "cuda_graph"))
    assert engine.memory.is_awake


@pytest.mark.parametrize("kwargs, match", [
    (dict(tags=("kv",)), "unknown memory tag"),
    (dict(tags=()), "tags is empty"),
    (dict(weights_to="disk"), "weights_to"),
    (dict(mode="later"), "mode"),
    (dict(timeout_s=0), "timeout_s"),
])
def test_bad_release_arguments_change_nothing(engine: Engine, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        engine.release_memory(**kwargs)
    assert engine.memory.is_awake and tokens(engine)


def test_refused_updates_change_nothing(engine: Engine) -> None:
    before = tokens(engine)
    good = snapshot(engine)
    bad_name = good[:3] + [("model.layers.99.mlp.up_proj.weight", good[0][1])]
    bad_shape = good[:3] + [(good[4][0], torch.zeros(3, 3))]
    for bad in (bad_name, bad_shape, good[:3] + [(good[5][0], torch.zeros_like(good[5][1], dtype=torch.int32))]):
        with pytest.raises(ValueError, match="nothing was copied"):
            engine.update_weights([(n, t + 1.0) if t.is_floating_point() and t.dim() > 1 else (n, t) for n, t in bad])
    assert tokens(engine) == before
    engine.release_memory(("weights",))
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.update_weights(good)


def _generate_in_thread(engine: Engine, prompts, params) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["out"] = engine.generate(prompts, params)
        except BaseException as e:  # checked by the test
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _wait_running(engine: Engine) -> None:
    deadline = time.monotonic() + 30
    while not engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.scheduler.running, "the request never started"


def test_wait_mode_drains_in_flight_requests() -> None:
    engine = make_engine()
    long = SamplingParams(max_new_tokens=60, temperature=0.0)
    expected = engine.generate(PROMPTS, long)
    thread, box = _generate_in_thread(engine, PROMPTS, long)
    _wait_running(engine)
    report = engine.release_memory(mode="wait", timeout_s=60)
    thread.join(60)
    assert report.num_aborted == 0
    assert [o.token_ids for o in box["out"]] == [o.token_ids for o in expected]
    assert all(o.finish_reason == "length" for o in box["out"])


def test_wait_mode_times_out_and_stays_awake() -> None:
    engine = make_engine(max_model_len=1024)
    long = SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True)
    thread, box = _generate_in_thread(engine, [[1, 2, 3]], long)
    _wait_running(engine)
    with pytest.raises(PauseTimeoutError, match="stays awake"):
        engine.release_memory(mode="wait", timeout_s=0.05)
    assert engine.memory.is_awake
    assert engine.generate("ok", GREEDY)[0].finish_reason == "length"  # new requests are admitted again
    thread.join(120)
    assert len(box["out"][0].token_ids) == 900


def test_abort_mode_finishes_requests_with_abort() -> None:
    engine = make_engine(max_model_len=1024)
    long = SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True)
    thread, box = _generate_in_thread(engine, [[1, 2, 3], [4, 5]], long)
    _wait_running(engine)
    report = engine.release_memory(mode="abort")
    thread.join(30)
    assert report.num_aborted == 2
    assert [o.finish_reason for o in box["out"]] == ["abort", "abort"]
    assert all(len(o.token_ids) < 900 and len(o.logprobs) == len(o.token_ids) for o in box["out"])
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_request_arriving_while_paused_completes_after_resume(engine: Engine) -> None:
    expected = tokens(engine)
    engine.release_memory()
    thread, box = _generate_in_thread(engine, PROMPTS, GREEDY)
    deadline = time.monotonic() + 30  # the thread may take a while to start on a loaded machine
    while engine.memory_status()["num_waiting"] < len(PROMPTS) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive() and engine.memory_status()["num_waiting"] == len(PROMPTS)
    engine.resume_memory(("weights",))
    time.sleep(0.1)
    assert thread.is_alive()  # the KV cache is still paused
    engine.resume_memory(("kv_cache", "cuda_graph"))
    thread.join(30)
    assert [o.token_ids for o in box["out"]] == expected


def test_request_waiting_too_long_gets_a_retryable_error() -> None:
    engine = make_engine(paused_wait_s=0.2)
    engine.release_memory()
    with pytest.raises(EnginePausedError, match="retry after resume_memory"):
        engine.generate("late", GREEDY)
    assert engine.memory_status()["num_waiting"] == 0  # withdrawn, not left behind
    engine.resume_memory()
    assert engine.generate("late", GREEDY)[0].finish_reason == "length"


def test_release_and_resume_from_another_thread_while_generating() -> None:
    engine = make_engine()
    expected = tokens(engine)
    stop = threading.Event()
    errors: list[BaseException] = []

    def cycle() -> None:
        try:
            while not stop.is_set():
                engine.release_memory(mode="wait")
                engine.resume_memory()
        except BaseException as e:
            errors.append(e)

    cycler = threading.Thread(target=cycle)
    cycler.start()
    try:
        results = [tokens(engine) for _ in range(5)]
    finally:
        stop.set()
        cycler.join(30)
    assert not errors
    assert all(r == expected for r in results)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host-memory fallback is what a CPU engine reports")
def test_reports_free_memory_on_cpu_like_memory_status(engine: Engine) -> None:
    """Regression: on CPU a release reported device_free_* as 0 while memory_status reported host memory."""
    status = engine.memory_status()
    report = engine.release_memory()
    resumed = engine.resume_memory()
    for free in (report.device_free_before, report.device_free_after, resumed.device_free_after):
        assert 0 < free <= status["device_total_bytes"]
    assert status["device_free_bytes"] > 0


def test_memory_limit_is_checked_and_a_no_op_on_cpu() -> None:
    from colocate import Engine, EngineConfig, SamplingParams
    from colocate.trainer import TrainerConfig

    for bad in (0, -1, 1.5, "1G"):
        with pytest.raises(ValueError, match="memory_limit"):
            EngineConfig(model="tiny", device="cpu", memory_limit=bad)
        with pytest.raises(ValueError, match="memory_limit"):
            TrainerConfig(model="tiny", memory_limit=bad)
    with pytest.raises(ValueError, match="fixed_addresses"):
        EngineConfig(model="tiny", device="cpu", memory_limit=1 << 30, fixed_addresses=True)
    engine = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=64, memory_limit=1 << 20))
    try:  # CPU has no device pool to cap: the engine runs as without the limit
        assert engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].token_ids
    finally:
        engine.shutdown()
