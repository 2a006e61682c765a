"""Colocated PPO workers under Ray on CPU: the phase loop, data parallelism, crashes, and the example script."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from colocate.engine import EngineConfig
from colocate.ray import TrainerConfig, WorkerConfig, WorkerCrashedError, WorkerGroup  # imports Ray lazily
from colocate.rl import PPOConfig

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
# The environment as the user had it: the fixture's ray.init() sets RAY_AUTH_MODE=token in os.environ
# (Ray 2.60 turns token auth on for a new local cluster); the teardown puts it back.
USER_RAY_AUTH_MODE = os.environ.get("RAY_AUTH_MODE")
CONFIG = WorkerConfig(engine=EngineConfig(model="tiny", device="cpu", max_model_len=64),
                      trainer=TrainerConfig(model="tiny", max_positions=64),
                      ppo=PPOConfig(rollout_batch_size=16, minibatch_size=8, ppo_epochs=1, lr=1e-3, kl_coef=0.01),
                      # Seed 3: both workers' first rollouts score > 0. The random tiny model hits the letter about
                      # once in 320 tokens, and a batch that scores all 0 has zero advantages and gradients (the
                      # policy equals the reference, so no KL either): the weights would not move at all.
                      seed=3)
PHASES = ("generate", "release_engine", "resume_trainer", "prepare", "release_reference", "train", "release_trainer",
          "resume_weights", "update_weights", "resume_cache")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    # address="local": a fresh instance even if RAY_ADDRESS points elsewhere or a `ray start` cluster runs.
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
        if USER_RAY_AUTH_MODE is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = USER_RAY_AUTH_MODE


def run_iteration(group: WorkerGroup, iteration: int) -> dict[str, list[dict[str, Any]]]:
    """One PPO iteration, phase by phase on every worker, as examples/ppo/train.py runs it."""
    calls: list[tuple[str, str, tuple[Any, ...]]] = [
        ("generate", "generate", (iteration,)),
        ("release_engine", "release_engine", ()),
        ("resume_trainer", "resume_trainer", ()),
        ("prepare", "prepare", ()),
        ("release_reference", "release_reference", ()),
        ("train", "train", ()),
        ("release_trainer", "release_trainer", ()),
        ("resume_weights", "resume_engine", (("weights",),)),
        ("update_weights", "update_weights", (iteration + 1,)),
        ("resume_cache", "resume_engine", (("kv_cache", "cuda_graph"),)),
    ]
    return {name: group.run(method, *args) for name, method, args in calls}


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_two_workers_train_data_parallel_and_hand_memory_back_and_forth(ray_local: None) -> None:
    group = WorkerGroup(CONFIG, num_workers=2, num_gpus_per_worker=0, cpus_per_worker=1)
    try:
        assert [r["rank"] for r in group.setup_results] == [0, 1]
        before = group.run("weights_checksum")
        assert before[0] == before[1]  # same preset seed on both workers
        iterations = [run_iteration(group, 0)]
        middle = group.run("weights_checksum")
        iterations.append(run_iteration(group, 1))
        after = group.run("weights_checksum")
        evals = group.run("evaluate", 8, seed=123)
    finally:
        start = time.monotonic()
        group.shutdown()
        shutdown_s = time.monotonic() - start
    assert shutdown_s < 30, f"shutting down two idle workers took {shutdown_s:.1f} s"

    # Data parallel: the two workers trained on different rollouts, yet hold identical weights.
    assert all(r["reward_mean"] > 0 for r in iterations[0]["generate"]), "premise: see the comment on CONFIG"
    assert middle[0] == middle[1] and after[0] == after[1], (middle, after)
    assert before[0] != middle[0] != after[0]
    for results in iterations:
        assert results["train"][0]["value_loss"] != results["train"][1]["value_loss"]  # different local data
    assert evals[0]["responses"] == evals[1]["responses"] and evals[0]["score"] == evals[1]["score"]
    assert len(evals[0]["responses"]) == 8 and all(len(r) == 8 for r in evals[0]["responses"])

    for iteration, results in enumerate(iterations):
        assert set(results) == set(PHASES)
        for name, per_worker in results.items():
            assert [r["rank"] for r in per_worker] == [0, 1], name
            assert all(r["seconds"] >= 0 for r in per_worker), name
        for r in results["generate"]:
            assert 0.0 <= r["reward_mean"] <= 1.0 and r["num_tokens"] == 16 * 8
        for r in results["prepare"]:
            # The engine sampled from exactly the trainer's weights: setup synced them, and iteration 0's
            # update_weights carried the trained ones (middle != before) into iteration 1's generate.
            assert r["logprob_gap_max_abs"] < 1e-3, (iteration, r)
        for r in results["train"]:
            assert all(math.isfinite(r[k]) for k in ("policy_loss", "value_loss", "grad_norm")), r
        # memory snapshots, per worker, right after each phase
        for rank in range(2):
            mem = {name: per_worker[rank] for name, per_worker in results.items()}
            assert mem["generate"]["engine_bytes"] > 0 and mem["generate"]["trainer_bytes"] == 0
            assert mem["release_engine"]["engine_bytes"] == 0
            assert mem["resume_trainer"]["trainer_bytes"] > 0 and mem["resume_trainer"]["engine_bytes"] == 0
            assert 0 < mem["release_reference"]["trainer_bytes"] < mem["resume_trainer"]["trainer_bytes"]
            assert mem["train"]["trainer_bytes"] > mem["release_reference"]["trainer_bytes"]  # grads, AdamW
            assert mem["release_trainer"]["trainer_bytes"] == 0
            assert 0 < mem["resume_weights"]["engine_bytes"] < mem["resume_cache"]["engine_bytes"]
            assert mem["resume_cache"]["engine_bytes"] == mem["generate"]["engine_bytes"]
            assert mem["resume_cache"]["trainer_bytes"] == 0


def kill_and_expect_crash(group: WorkerGroup, pid: int) -> str:
    """SIGKILL `pid`, then the next phase must raise WorkerCrashedError within 60 s; its message."""
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerCrashedError) as info:
        group.run("generate", 0)
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"the crash took {elapsed:.1f} s to surface"
    return str(info.value)


@pytest.mark.timeout(180)  # a hang fails here, not after the suite's 600 s
def test_killed_worker_process_raises_instead_of_hanging(ray_local: None) -> None:
    group = WorkerGroup(CONFIG, num_workers=1, num_gpus_per_worker=0, cpus_per_worker=1)
    try:
        status = group.run("memory_status")[0]
        pid, engine_pid = status["pid"], status["engine_pid"]
        assert pid != os.getpid() and engine_pid != pid and process_alive(engine_pid)
        message = kill_and_expect_crash(group, pid)
        assert "worker 0 of 1 (node " in message and "'generate'" in message, message
        # The orphaned engine child sees its pipe close and exits rather than linger.
        assert wait_until(lambda: not process_alive(engine_pid), 30), f"engine process {engine_pid} outlived its worker"
        group.shutdown()  # after a crash: must not raise
        assert group.workers == [] and group.placement_group is None
    finally:
        group.shutdown()


@pytest.mark.timeout(180)
def test_killed_engine_process_raises_and_the_trainer_survives(ray_local: None) -> None:
    group = WorkerGroup(CONFIG, num_workers=1, num_gpus_per_worker=0, cpus_per_worker=1)
    try:
        status = group.run("memory_status")[0]
        pid, engine_pid = status["pid"], status["engine_pid"]
        assert engine_pid != pid
        checksum = group.run("weights_checksum")
        message = kill_and_expect_crash(group, engine_pid)
        assert "worker 0 of 1" in message and "'generate'" in message and "EngineProcessError" in message, message
        # The engine runs in its own process: its crash leaves the worker and its trainer alive.
        assert process_alive(pid)
        assert group.run("weights_checksum") == checksum
        group.shutdown()  # must not raise
    finally:
        group.shutdown()


def test_example_script_runs_as_a_user_runs_it(ray_local: None, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if USER_RAY_AUTH_MODE is not None:
        env["RAY_AUTH_MODE"] = USER_RAY_AUTH_MODE
    # The fixture's instance is running (started by ray.init, so it wrote no address file, but a
    # `ray start` cluster would have): RAY_ADDRESS=local makes the script's ray.init() start its own.
    env["RAY_ADDRESS"] = "local"
    cmd = [sys.executable, "examples/ppo/train.py", "--num-workers", "2", "--iterations", "2",
           "--rollout-batch-size", "16", "--minibatch-size", "8", "--ppo-epochs", "1", "--verify-tolerance", "0.05",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "Started a local Ray instance" in output, output[-5000:]  # not connected to the fixture's one
    assert "reward" in proc.stdout

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for iteration, line in enumerate(lines):
        record = json.loads(line)
        assert record["iteration"] == iteration
        assert 0.0 <= record["reward_mean"] <= 1.0
        assert set(record["seconds"]) == set(PHASES) and all(s >= 0 for s in record["seconds"].values())
        assert set(record["memory"]) == set(PHASES)
        for name, mem in record["memory"].items():
            assert isinstance(mem["engine_bytes"], int) and isinstance(mem["trainer_bytes"], int), name
        assert record["memory"]["release_engine"]["engine_bytes"] == 0
        assert record["memory"]["release_trainer"]["trainer_bytes"] == 0
        assert record["memory"]["resume_trainer"]["trainer_bytes"] > 0 and record["memory"]["generate"][
            "engine_bytes"] > 0
        assert record["stats"]["logprob_gap_max_abs"] < 1e-3
        # Every update carried the trainer's logprob probe and each engine scored it the same.
        assert record["stats"]["probe_ok"] == 1.0 and record["stats"]["probe_mean_abs_diff"] < 1e-3
    for name in ("reward.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["num_workers"] == 2 and run["args"]["iterations"] == 2
    assert 0.0 <= run["reward_first"] <= 1.0


def test_example_runs_grpo_with_a_warm_start_on_arithmetic(ray_local: None, tmp_path: Path) -> None:
    # The one-GPU arithmetic command at CPU sizes: warm start, GRPO, held-out evaluation, plots.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if USER_RAY_AUTH_MODE is not None:
        env["RAY_AUTH_MODE"] = USER_RAY_AUTH_MODE
    env["RAY_ADDRESS"] = "local"
    cmd = [sys.executable, "examples/ppo/train.py", "--task", "arithmetic", "--max-digits", "2", "--algo", "grpo",
           "--warmup-steps", "20", "--warmup-batch-size", "16", "--iterations", "2", "--rollout-batch-size", "32",
           "--group-size", "8", "--minibatch-size", "16", "--lr-warmup-steps", "4", "--eval-prompts", "16",
           "--eval-every", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "held-out greedy score on arithmetic" in proc.stdout
    run = json.loads((tmp_path / "run.json").read_text())
    warm = run["warm_start"]
    assert set(warm["seconds"]) == {"release_engine", "resume_trainer", "warm_start", "release_trainer",
                                    "resume_weights", "update_weights", "resume_cache"}
    assert warm["warm_start_loss_last"] < warm["warm_start_loss_first"]
    evals = run["eval"]
    assert [i for i, _ in evals["curve"]] == [0, 1, 2]
    assert evals["before_rl"] == evals["curve"][0][1] and evals["after_rl"] == evals["curve"][-1][1]
    assert all(0.0 <= v <= 1.0 for _, v in evals["curve"]) and evals["init"] == 0.0  # random weights: never right
    assert [i for i, _ in evals["train_curve"]] == [0, 1, 2]  # greedy on training problems beside held-out ones
    assert "on training-split problems:" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["algo"] for r in records] == ["grpo", "grpo"]
    for record in records:
        assert set(record["seconds"]) == set(PHASES)
        assert {"entropy", "zero_std_group_fraction", "clip_fraction", "grad_norm", "logprob_gap_max_abs"} <= set(
            record["stats"])
        assert "value_loss" not in record["stats"]  # no critic
        assert record["stats"]["logprob_gap_max_abs"] < 1e-3
        # At most max_new_tokens = 4 for 2-digit operands: the longest answer, its sign or carry, and the EOS.
        assert 1 <= record["stats"]["response_length"] <= 4
    for name in ("reward.png", "training.png", "eval.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
