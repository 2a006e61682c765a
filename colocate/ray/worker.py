"""One colocated worker per GPU: an engine (child process) and a PPO trainer taking turns on one device."""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from colocate.engine import EngineConfig, SamplingParams
from colocate.engine.engine import Engine
from colocate.memory.host import resident_bytes
from colocate.memory.state import TagState
from colocate.model import make_probe
from colocate.process import launch_engine
from colocate.rl import GRPOConfig, PPOConfig, get_task
from colocate.rl.rollout import RolloutBatch
from colocate.trainer import GRPOTrainer, PolicyTrainer, PPOTrainer, TrainerConfig
from colocate.trainer.sft import WarmStartConfig, warm_start


@dataclass(kw_only=True)
class WorkerConfig:
    """Everything one worker builds. Every worker of a group gets the same one.

    >>> WorkerConfig(engine=EngineConfig(model="tiny", device="cpu"), trainer=TrainerConfig(model="tiny"),
    ...              ppo=PPOConfig(rollout_batch_size=64, minibatch_size=16), task="repeat_letter")
    `ppo.rollout_batch_size` is per worker: a group of N workers generates N times as many
    sequences per iteration. `algo="grpo"` trains with `grpo` instead (no value head; `ppo` is
    unused), and each prompt is sampled `grpo.group_size` times. `warm_start` configures the
    supervised phase a driver may run before RL (the `warm_start` method).
    `engine_in_process=True` runs the engine inside the worker instead of in a child process
    (one process less; the child is the default because it is how inference servers run, and
    it keeps an engine crash from taking the trainer down).
    """

    engine: EngineConfig
    trainer: TrainerConfig
    ppo: PPOConfig = field(default_factory=PPOConfig)
    algo: Literal["ppo", "grpo"] = "ppo"
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    warm_start: WarmStartConfig | None = None
    task: str = "repeat_letter"
    task_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"max_new_tokens": 256}
    temperature: float = 1.0
    engine_in_process: bool = False
    weights_to: str = "meta"  # where the engine's weights go while the trainer trains; the update refills them
    seed: int = 0
    # Every update carries a logprob probe of the trainer's weights (colocate.model.make_probe) that the
    # engine checks before it samples with them; None: no probe. A number: the tolerance in nats.
    verify_tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.engine.model != self.trainer.model:
            raise ValueError(f"the engine serves {self.engine.model!r} but the trainer trains "
                             f"{self.trainer.model!r}; give both the same preset or folder")
        if self.weights_to not in ("meta", "cpu"):
            raise ValueError(f"weights_to={self.weights_to!r} must be 'meta' (discard; the update refills them) "
                             f"or 'cpu'")
        if self.algo not in _TRAINERS:
            raise ValueError(f"algo={self.algo!r} is unknown; choose from {sorted(_TRAINERS)}")
        get_task(self.task, **self.task_overrides)  # raises for an unknown task or a bad override
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 (PPO samples; 1.0 is usual)")


class ColocatedWorker:
    """The trainer and the engine of one device; each public method is one phase of a PPO iteration.

    Ray wraps this class (`WorkerGroup` does it); it also works as a plain object:
    >>> worker = ColocatedWorker(config, rank=0, world_size=1)
    >>> worker.setup()                           # trainer built and released, engine started, weights synced
    >>> worker.generate(0); worker.release_engine(); worker.resume_trainer(); ...
    Every phase returns its seconds and a memory snapshot of both sides, measured right after it.
    """

    def __init__(self, config: WorkerConfig, *, rank: int, world_size: int) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = _local_device(config.engine.device)
        self.is_cuda = self.device.type == "cuda"
        self.task = get_task(config.task, **config.task_overrides)
        self.trainer: PolicyTrainer | None = None
        self.engine: Any = None  # EngineProcess, or Engine when engine_in_process
        self.batch: RolloutBatch | None = None
        self.version = 0
        self.last_probe: dict[str, Any] = {}  # the engine's answer to the last update's probe, if it had one

    # -- set-up -----------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0's are where the process group meets."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join the data-parallel group: NCCL on CUDA, gloo on CPU."""
        if self.world_size == 1:
            return
        if self.is_cuda:
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.is_cuda else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
                                rank=self.rank, world_size=self.world_size, device_id=self.device if self.is_cuda
                                else None)

    def setup(self) -> dict[str, Any]:
        """Build the trainer, release it, start the engine into the freed memory, give it the trainer's weights."""
        config = self.config
        start = time.perf_counter()
        trainer_config = TrainerConfig(**{**asdict(config.trainer), "device": str(self.device)})
        rl = config.grpo if config.algo == "grpo" else config.ppo
        self.trainer = _TRAINERS[config.algo](trainer_config, rl, temperature=config.temperature)
        self.trainer.release()
        engine_config = EngineConfig(**{**asdict(config.engine), "device": str(self.device),
                                        "seed": config.seed + self.rank})
        self.engine = Engine(engine_config) if config.engine_in_process else launch_engine(engine_config)
        # The engine built its own copy (random for a preset, in its own dtype); one sync makes
        # it sample from exactly the trainer's weights from the first iteration on.
        self._send_weights(version=0)
        return self._phase(start)

    # -- the phases of one iteration, in order -----------------------------------------------
    def generate(self, iteration: int) -> dict[str, Any]:
        """This worker's share of rollouts: sample, score, keep them here for the trainer."""
        rl, task = self.trainer.rl, self.task
        start = time.perf_counter()
        seed = self._seed(iteration)
        # GRPO: group_size responses to each prompt, in a row, sharing its prefill and KV blocks; response i
        # of the batch is seeded seed * rollout_batch_size + i.
        group_size = self.config.grpo.group_size if self.config.algo == "grpo" else 1
        unique = task.sample_prompts(rl.rollout_batch_size // group_size, seed=seed)
        params = [SamplingParams(max_new_tokens=task.max_new_tokens, temperature=self.config.temperature,
                                 seed=seed * rl.rollout_batch_size + k * group_size, ignore_eos=task.ignore_eos,
                                 n=group_size) for k in range(len(unique))]
        outputs = self.engine.generate(unique, params)
        prompts = [p for p in unique for _ in range(group_size)]
        responses = [o.token_ids for o in outputs]
        scores = [task.score(p, r) for p, r in zip(prompts, responses)]
        self.batch = RolloutBatch.collate(prompts, responses, [o.logprobs for o in outputs], scores,
                                          pad_id=self.trainer.pad_id)
        result = self._phase(start)
        result["reward_mean"] = sum(scores) / len(scores)
        result["num_tokens"] = sum(len(r) for r in responses)
        return result

    def release_engine(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.engine.release_memory(weights_to=self.config.weights_to)
        return self._phase(start)

    def resume_trainer(self) -> dict[str, Any]:
        """Policy, value head, AdamW moments and the reference back on the device, one copy each."""
        return self._timed(self.trainer.resume)

    def prepare(self) -> dict[str, Any]:
        """Values, reference logprobs, rewards and advantages; the engine-vs-trainer logprob gap."""
        start = time.perf_counter()
        self.batch = self.batch.to(self.device)
        stats = self.trainer.prepare(self.batch)
        return self._phase(start) | stats

    def release_reference(self) -> dict[str, Any]:
        """The reference is done for this iteration: give its memory to the PPO epochs."""
        return self._timed(self.trainer.release_reference)

    def train(self) -> dict[str, Any]:
        start = time.perf_counter()
        stats = self.trainer.train(self.batch)
        self.batch = None
        return self._phase(start) | stats

    def release_trainer(self) -> dict[str, Any]:
        """The trainer's state to pinned host memory; gradients dropped."""
        return self._timed(self.trainer.release)

    def resume_engine(self, tags: tuple[str, ...] | list[str]) -> dict[str, Any]:
        start = time.perf_counter()
        self.engine.resume_memory(tuple(tags))
        return self._phase(start)

    def update_weights(self, version: int) -> dict[str, Any]:
        """The trainer's new weights into the engine's memory: CUDA IPC buckets (shared memory on CPU)."""
        start = time.perf_counter()
        self._send_weights(version)
        return self._phase(start) | self.last_probe

    # -- before RL: between resume_trainer and release_trainer, like train --------------------
    def warm_start(self) -> dict[str, Any]:
        """Supervised steps on the task's demonstrations (`config.warm_start`); the reference becomes the result."""
        if self.config.warm_start is None:
            raise RuntimeError("this worker has no warm_start config; set WorkerConfig(warm_start=WarmStartConfig())")
        start = time.perf_counter()
        stats = warm_start(self.trainer, self.task, self.config.warm_start, rank=self.rank,
                           world_size=self.world_size)
        return self._phase(start) | stats

    # -- checks ----------------------------------------------------------------------------
    def evaluate(self, num_prompts: int, seed: int, split: Literal["train", "eval"] = "eval") -> dict[str, Any]:
        """Greedy responses of the engine to `num_prompts` prompts of the task's `split`, and their mean score."""
        prompts = self.task.sample_prompts(num_prompts, seed=seed, split=split)
        outputs = self.engine.generate(prompts, SamplingParams(max_new_tokens=self.task.max_new_tokens,
                                                               temperature=0.0, ignore_eos=self.task.ignore_eos))
        responses = [o.token_ids for o in outputs]
        scores = [self.task.score(p, r) for p, r in zip(prompts, responses)]
        return {"score": sum(scores) / len(scores), "responses": responses}

    def weights_checksum(self) -> float:
        """Sum of every trainer weight in float64: data-parallel workers must agree exactly."""
        with torch.no_grad():
            return sum(t.double().sum().item() for _, t in self.trainer.named_weights())

    # -- plumbing --------------------------------------------------------------------------
    def _seed(self, iteration: int) -> int:
        """The seed of this worker's rollout in `iteration`: distinct for every (run seed, iteration, rank)."""
        return (self.config.seed * ITERATION_SEED_STRIDE + iteration) * self.world_size + self.rank

    def _send_weights(self, version: int) -> None:
        # A trainer released to disk has no readable weights: bring it back for the update, then release again.
        on_disk = self.trainer.release_to == "disk" and self.trainer.policy_offload.state is TagState.PAUSED
        if on_disk:
            self.trainer.resume()
        tolerance = self.config.verify_tolerance
        probe = None if tolerance is None else make_probe(self.trainer.policy.lm, tolerance=tolerance)
        result = self.engine.update_weights(self.trainer.named_weights(), version=version, verify=probe)
        if on_disk:
            self.trainer.release()
        self.last_probe = {k: v for k, v in result.items() if k.startswith("probe_")}
        self.version = version
        # The update's buckets and cast temporaries stay reserved by this process's allocator
        # until emptied, and the engine is about to want that memory for its KV cache.
        if self.is_cuda:
            torch.cuda.empty_cache()

    def _timed(self, fn: Callable[[], Any]) -> dict[str, Any]:
        start = time.perf_counter()
        fn()
        return self._phase(start)

    def _phase(self, start: float) -> dict[str, Any]:
        """Seconds since `start` and what each side holds on the device now (plus peaks on CUDA)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        status = self.engine.memory_status() if self.engine is not None else None
        snapshot = {"seconds": seconds, "rank": self.rank,
                    "engine_bytes": sum(status["device_bytes"].values()) if status else 0,
                    "trainer_bytes": self.trainer.device_bytes() if self.trainer else 0,
                    "host_resident_bytes": resident_bytes()}  # this worker's (the engine's process apart)
        if self.is_cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            snapshot["device_used_bytes"] = total - free  # both processes, their CUDA contexts included
            snapshot["trainer_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return snapshot

    # The phases' names before 0.2 (one release with a DeprecationWarning).
    def onload_trainer(self) -> dict[str, Any]:
        warnings.warn("onload_trainer is now resume_trainer", DeprecationWarning, stacklevel=2)
        return self.resume_trainer()

    def offload_reference(self) -> dict[str, Any]:
        warnings.warn("offload_reference is now release_reference", DeprecationWarning, stacklevel=2)
        return self.release_reference()

    def offload_trainer(self) -> dict[str, Any]:
        warnings.warn("offload_trainer is now release_trainer", DeprecationWarning, stacklevel=2)
        return self.release_trainer()

    def memory_status(self) -> dict[str, Any]:
        return {"engine": self.engine.memory_status(), "trainer_bytes": self.trainer.device_bytes(),
                "pid": os.getpid(), "engine_pid": getattr(self.engine, "pid", os.getpid())}

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if getattr(self, "trainer", None) is not None:
            self.trainer.close()  # files of the disk tier: the actor is killed next, no finalizer would run
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# More iterations than any run makes: run seeds s and s + 1 never share an iteration's seed.
ITERATION_SEED_STRIDE = 1_000_003

_TRAINERS: dict[str, type[PolicyTrainer]] = {"ppo": PPOTrainer, "grpo": GRPOTrainer}


def _local_device(device: str) -> torch.device:
    """The worker's device. Ray gives a GPU actor exactly one visible GPU, so CUDA means cuda:0."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", 0) if device.startswith("cuda") else torch.device(device)

