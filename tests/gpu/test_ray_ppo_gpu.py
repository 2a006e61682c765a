"""One colocated worker on one GPU: both sides take turns on the device, and the weights reach the engine."""

from __future__ import annotations

import pytest
import torch

from colocate.engine import EngineConfig
from colocate.rl import PPOConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PHASES = [("generate", 0), ("release_engine",), ("resume_trainer",), ("prepare",), ("release_reference",), ("train",),
          ("release_trainer",), ("resume_engine", ("weights",)), ("update_weights", 1),
          ("resume_engine", ("kv_cache", "cuda_graph"))]


@pytest.fixture(scope="module")
def group():
    ray = pytest.importorskip("ray")
    from colocate.ray import TrainerConfig, WorkerConfig, WorkerGroup

    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False)
    # Whatever earlier modules of this pytest process left cached on the device is given back by
    # tests/gpu/conftest.py first: the worker's engine sizes its KV cache from the device's free memory.
    config = WorkerConfig(engine=EngineConfig(model="qwen2.5-0.5b", device="cuda", kv_cache_fraction=0.3,
                                              max_model_len=128),
                          trainer=TrainerConfig(model="qwen2.5-0.5b", device="cuda", max_positions=128),
                          ppo=PPOConfig(rollout_batch_size=32, minibatch_size=16, ppo_epochs=1, lr=1e-5),
                          task_overrides={"max_new_tokens": 32})
    try:
        group = WorkerGroup(config, num_workers=1, num_gpus_per_worker=1, ready_timeout_s=60)
    except BaseException:
        ray.shutdown()  # a failed set-up must not leave Ray running under the rest of the session
        raise
    try:
        yield group
    finally:
        group.shutdown()
        ray.shutdown()


def test_sides_take_turns_and_weights_reach_the_engine(group) -> None:
    snapshots = {}
    for method, *args in PHASES:
        name = method if method != "resume_engine" else f"resume_{args[0][0]}"
        snapshots[name] = group.run(method, *args)[0]
    generate, released = snapshots["generate"], snapshots["release_engine"]
    # Releasing frees the engine's KV cache, weights and graphs: the device has that much more room.
    assert generate["engine_bytes"] > 1 << 30
    assert released["engine_bytes"] == 0
    assert generate["device_used_bytes"] - released["device_used_bytes"] >= 0.95 * generate["engine_bytes"]
    # The offloaded trainer keeps only non-parameter buffers (rotary tables) on the device.
    onloaded = snapshots["resume_trainer"]["trainer_bytes"]
    assert onloaded > 4 * 0.49e9  # at least the fp32 params of a 0.5B model
    assert generate["trainer_bytes"] < 0.01 * onloaded
    assert snapshots["release_trainer"]["trainer_bytes"] < 0.01 * onloaded
    # Regression: the offload kept references to its device tensors while emptying the cache, so
    # the trainer's process kept the memory reserved (allocated 0, device used +7 GiB).
    assert snapshots["release_trainer"]["device_used_bytes"] < released["device_used_bytes"] + (256 << 20)
    # The engine samples in bf16, the trainer recomputes under bf16 autocast from fp32 weights:
    # the gap is rounding, not a different model.
    assert snapshots["prepare"]["logprob_gap_mean_abs"] < 0.1
    # Back to full size; the decode graphs' pool can differ by a little between two captures.
    assert abs(snapshots["resume_kv_cache"]["engine_bytes"] - generate["engine_bytes"]) < 0.01 * generate["engine_bytes"]

    checksum = group.run("weights_checksum")[0]
    again = group.run("generate", 1)[0]
    assert 0.0 <= again["reward_mean"] <= 1.0
    assert group.run("weights_checksum")[0] == checksum  # generating does not touch the trainer's copy
