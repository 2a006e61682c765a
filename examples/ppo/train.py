"""PPO or GRPO with the engine and the trainer colocated: one Ray actor per GPU (or CPU worker) holds both, taking turns.

    python examples/ppo/train.py                                  # CPU, the tiny preset, PPO, about 2 minutes
    python examples/ppo/train.py --algo grpo                      # the same task with GRPO
    python examples/ppo/train.py --num-gpus 1 --model byte-100m --task arithmetic --algo grpo --warmup-steps 300
    python examples/ppo/train.py --num-gpus 4 --model qwen2.5-0.5b --max-new-tokens 256
    ray job submit --working-dir . -- python examples/ppo/train.py --num-gpus 4

Writes OUT/metrics.jsonl (one line per iteration), OUT/run.json, OUT/reward.png, OUT/training.png (entropy,
KL, clip fraction, gradient norm, logprob gap), OUT/eval.png and OUT/memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray

from colocate.cli import HelpFormatter, OneLineParser
from colocate.engine import EngineConfig
from colocate.ray import TrainerConfig, WorkerConfig, WorkerGroup
from colocate.rl import TASKS, GRPOConfig, PPOConfig, get_task
from colocate.trainer.sft import WarmStartConfig

# Phases that only move memory between the two sides; --no-release skips them (the comparison run).
MEMORY_PHASES = ("release_engine", "resume_trainer", "release_reference", "release_trainer", "resume_weights",
                 "resume_cache")
ENGINE_SWITCH_PHASES = ("release_engine", "resume_weights", "update_weights", "resume_cache")


def warm_start(group: WorkerGroup, args: argparse.Namespace) -> dict[str, Any]:
    """Supervised steps on the task's demonstrations before RL, with the same memory hand-over as an iteration."""
    log = PhaseLog(group, skip=MEMORY_PHASES if args.no_release else ())
    phase = log.start(-1)
    phase("release_engine")
    phase("resume_trainer")
    phase("warm_start")                                    # next-token loss; the reference becomes the result
    phase("release_trainer")
    phase("resume_weights", "resume_engine", ("weights",))
    phase("update_weights", "update_weights", 0)
    phase("resume_cache", "resume_engine", ("kv_cache", "cuda_graph"))
    return {"seconds": log.record["seconds"], **log.record["stats"]}


def evaluate(group: WorkerGroup, args: argparse.Namespace, split: str = "eval") -> float:
    """Mean greedy score on the task's held-out prompts (for arithmetic: the exact-match accuracy), or on as
    many prompts of its training split (the same ones each time)."""
    results = group.run("evaluate", args.eval_prompts, seed=10_000 + args.seed, split=split)
    return sum(r["score"] for r in results) / len(results)


def evaluate_both(group: WorkerGroup, args: argparse.Namespace, evals: dict[str, Any], iteration: int) -> None:
    """Append the held-out score to `evals["curve"]` and the training-split one to `evals["train_curve"]`: a
    score that rises on the problems RL trains on and not on held-out ones was memorised, not learned."""
    evals["curve"].append((iteration, evaluate(group, args)))
    evals["train_curve"].append((iteration, evaluate(group, args, "train")))


def train(group: WorkerGroup, args: argparse.Namespace, out: Path,
          evals: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The RL loop. Each line is one phase on every worker at once; the memory calls are the loop."""
    log = PhaseLog(group, skip=MEMORY_PHASES if args.no_release else ())
    if args.no_release:
        group.run("resume_trainer")  # both sides stay resident for the whole run
    records = []
    progress = _progress(args.iterations, args.algo)
    with open(out / "metrics.jsonl", "w") as metrics:
        for iteration in progress:
            phase = log.start(iteration)
            phase("generate", iteration)                   # engine samples and scores; trainer state on the host
            phase("release_engine")                        # KV cache, weights (to meta), decode graphs freed
            phase("resume_trainer")                        # policy, value head, AdamW moments, reference back
            phase("prepare")                               # values, reference logprobs, GAE, logprob gap
            phase("release_reference")                     # the reference is done until the next iteration
            phase("train")                                 # PPO epochs, gradients all-reduced over workers
            if args.update_from == "device":               # the update reads the trainer's device memory
                phase("resume_weights", "resume_engine", ("weights",))    # engine weights: memory only
                phase("update_weights", "update_weights", iteration + 1)  # device to device through CUDA IPC
                phase("release_trainer")                   # trainer state back to pinned host memory
            else:                                          # both sides never on the device at once
                phase("release_trainer")
                phase("resume_weights", "resume_engine", ("weights",))
                phase("update_weights", "update_weights", iteration + 1)  # reads pinned host memory
            phase("resume_cache", "resume_engine", ("kv_cache", "cuda_graph"))
            record = log.finish()
            record["algo"] = args.algo
            if evals is not None and args.eval_every and (iteration + 1) % args.eval_every == 0:
                evaluate_both(group, args, evals, iteration + 1)  # the engine holds this iteration's weights
                record["eval_score"], record["train_split_score"] = evals["curve"][-1][1], evals["train_curve"][-1][1]
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            records.append(record)
            progress.set_postfix(reward=f"{record['reward_mean']:.3f}", s_per_it=f"{record['iteration_seconds']:.2f}",
                                 switch=f"{100 * record['switch_share']:.1f}%")
    return records


class PhaseLog:
    """Runs a phase on every worker, timing it at the driver and keeping each worker's memory snapshot."""

    def __init__(self, group: WorkerGroup, *, skip: tuple[str, ...]) -> None:
        self.group, self.skip = group, skip
        self.t0 = time.perf_counter()
        self.record: dict[str, Any] = {}

    def start(self, iteration: int):
        self.record = {"iteration": iteration, "seconds": {}, "memory": {}, "stats": {}}
        return self._phase

    def _phase(self, name: str, *args: Any) -> None:
        if name in self.skip:
            return
        method, args = (args[0], args[1:]) if args and isinstance(args[0], str) else (name, args)
        start = time.perf_counter()
        results = self.group.run(method, *args)
        self.record["seconds"][name] = time.perf_counter() - start
        memory = {key: max(r[key] for r in results) for key in results[0] if key.endswith("_bytes")}
        memory["t"] = time.perf_counter() - self.t0
        self.record["memory"][name] = memory
        for key in results[0]:
            if key in memory or key in ("seconds", "rank"):
                continue
            values = [r[key] for r in results]
            # Over workers: maxima stay maxima, counts add up, everything else is a mean.
            self.record["stats"][key] = (max(values) if "_max" in key else sum(values) if key.startswith("num_")
                                         else sum(values) / len(values))

    def finish(self) -> dict[str, Any]:
        record = self.record
        seconds = record["seconds"]
        record["reward_mean"] = record["stats"].pop("reward_mean")
        record["iteration_seconds"] = sum(seconds.values())
        switch = sum(seconds.get(p, 0.0) for p in (*MEMORY_PHASES, "update_weights"))
        record["switch_share"] = switch / record["iteration_seconds"]
        record["engine_switch_share"] = sum(seconds.get(p, 0.0) for p in ENGINE_SWITCH_PHASES) / record[
            "iteration_seconds"]
        return record


def _progress(n: int, desc: str = "ppo"):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the metrics file is the record
        return _NoBar(range(n))
    return tqdm(range(n), desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def __init__(self, it: range) -> None:
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **values: Any) -> None:
        print(" ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr, flush=True)


def plot(records: list[dict[str, Any]], out: Path) -> None:
    """OUT/reward.png (reward per iteration) and OUT/memory.png (both sides' device memory over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iteration"] for r in records], [r["reward_mean"] for r in records], marker=".")
    algo = records[0].get("algo", "ppo").upper()
    ax.set(xlabel="iteration", ylabel="mean reward", ylim=(-0.02, 1.02), title=f"{algo} reward")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "reward.png", dpi=120)
    plt.close(fig)

    plot_memory(records, out)


# Band colours of the phases that compute; every phase that only moves memory (and the weight update) is grey.
PHASE_COLORS = {"generate": "tab:green", "prepare": "tab:purple", "train": "tab:red"}


def plot_memory(records: list[dict[str, Any]], out: Path) -> None:
    """OUT/memory.png: what each side holds over the last three iterations, on bands that name the phases."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    # The last three iterations: enough to see the two sides take turns, few enough to read. A phase's
    # memory is read when it ends (its "t"); it began its measured seconds before.
    shown = records[-3:]
    spans = [(r["iteration"], name, m["t"] - r["seconds"][name], m) for r in shown for name, m in r["memory"].items()]
    t0 = spans[0][2]
    scale = 2**30 if max(max(m["engine_bytes"], m["trainer_bytes"]) for *_, m in spans) >= 2**30 else 2**20
    unit = "GiB" if scale == 2**30 else "MiB"
    t = [0.0] + [m["t"] - t0 for *_, m in spans]
    first = spans[0][3]
    fig, ax = plt.subplots(figsize=(10, 3.8), layout="constrained")
    for _, name, start, m in spans:  # a strip along the top, above the data (the y range leaves it room)
        ax.axvspan(start - t0, m["t"] - t0, ymin=0.9, ymax=1.0, color=PHASE_COLORS.get(name, "0.6"), alpha=0.6, lw=0)
    # step="pre": the memory read after a phase is drawn across that phase.
    stacks = ax.stackplot(t, [first["engine_bytes"] / scale] + [m["engine_bytes"] / scale for *_, m in spans],
                          [first["trainer_bytes"] / scale] + [m["trainer_bytes"] / scale for *_, m in spans],
                          labels=["engine (KV cache, weights, graphs)", "trainer (policy, AdamW, reference)"],
                          step="pre", alpha=0.8)
    handles: list[Any] = list(stacks)
    if first.get("device_used_bytes") is not None:
        handles += ax.step(t, [first["device_used_bytes"] / scale] + [m["device_used_bytes"] / scale
                                                                      for *_, m in spans],
                           where="pre", color="k", lw=0.8, label="device used (all processes)")
    for r in shown:
        begin = next(start for it, _, start, _ in spans if it == r["iteration"]) - t0
        ax.axvline(begin, color="k", ls="--", lw=0.8)
        ax.annotate(f"iteration {r['iteration']}", (begin, 0.9), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", va="top", fontsize=8)
    handles += [Patch(color=color, alpha=0.6, label=f"{name} phase") for name, color in PHASE_COLORS.items()]
    handles.append(Patch(color="0.6", alpha=0.6, label="memory switches and weight update"))
    top = max(max(m["engine_bytes"] + m["trainer_bytes"], m.get("device_used_bytes") or 0) for *_, m in spans)
    ax.set(xlabel="seconds", ylabel=unit, xlim=(0, t[-1]), ylim=(0, 1.25 * top / scale),
           title="device memory each side holds on one worker")
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)


def _curves():
    """examples/ppo/curves.py (the training and evaluation plots), found beside this script or under the
    current folder; None, with a note, when the script runs from somewhere it cannot see them (stdin)."""
    import importlib.util

    here = Path(globals().get("__file__", "")).resolve().parent
    for folder in (here, Path.cwd() / "examples" / "ppo"):
        path = folder / "curves.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("ppo_example_curves", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    print("training.png and eval.png need examples/ppo/curves.py; run from the repository root to get them",
          file=sys.stderr)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="train.py", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--num-gpus", type=int, default=0, help="workers, one per GPU; 0 runs on CPU")
    p.add_argument("--num-workers", type=int, default=1, help="CPU workers when --num-gpus is 0")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="CPU cores per worker (Ray gives its torch that many threads); default 1, or with "
                        "--optimizer host the cluster's cores shared out: the host AdamW step runs on them")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--algo", default="ppo", choices=["ppo", "grpo"], help="ppo: value head + GAE; grpo: no critic, "
                   "advantages relative to each prompt's group of --group-size responses")
    p.add_argument("--model", default="tiny", help="a preset (tiny, qwen2.5-0.5b, ...) or an HF checkpoint folder")
    p.add_argument("--out", default="runs/ppo", help="folder for metrics.jsonl and the plots")
    p.add_argument("--task", default="repeat_letter", choices=list(TASKS))
    p.add_argument("--min-digits", type=int, default=None, help="arithmetic: fewest digits per operand (default 1)")
    p.add_argument("--max-digits", type=int, default=None, help="arithmetic: most digits per operand (default 3)")
    p.add_argument("--ops", default=None, help="arithmetic: '+', '-' or '+-' (default)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response length (default: the task's)")
    p.add_argument("--rollout-batch-size", type=int, default=128, help="sequences per iteration, all workers")
    p.add_argument("--minibatch-size", type=int, default=32, help="sequences per optimizer step, all workers")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="RL optimizer steps over which lr rises linearly")
    p.add_argument("--kl-coef", type=float, default=None,
                   help="PPO: per-token KL penalty in the reward (default 0.01); GRPO: k3 KL in the loss (default 0: "
                   "no reference model)")
    p.add_argument("--advantage-norm", default="whiten", choices=["whiten", "center", "none"],
                   help="PPO: zero mean and unit variance over the batch (default), the mean only, or neither")
    p.add_argument("--kl-kind", default="k3", choices=["k3", "k1"],
                   help="PPO: the per-token KL estimator in the reward (k3 default; k1 pays for unlikely tokens)")
    p.add_argument("--group-size", type=int, default=8, help="GRPO: responses per prompt")
    p.add_argument("--no-scale-by-std", action="store_true", help="GRPO: advantage = reward - group mean, unscaled")
    p.add_argument("--loss-norm", default="token", choices=["token", "sequence"],
                   help="GRPO: mean over every response token (default) or over each response first")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="supervised warm-start steps on the task's demonstrations before RL (0: none)")
    p.add_argument("--warmup-batch-size", type=int, default=64, help="sequences per warm-start step, all workers")
    p.add_argument("--warmup-lr", type=float, default=1e-3)
    p.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts for the greedy evaluation (0: none)")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N iterations (0: before and after)")
    p.add_argument("--trainer-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--optimizer", default="device", choices=["device", "host"],
                   help="host: AdamW's moments and fp32 masters in host memory, the step on the CPU")
    p.add_argument("--optimizer-state-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="with --optimizer host: AdamW's moments in bf16, rounded stochastically (8 bytes a "
                   "parameter on the host instead of 12)")
    p.add_argument("--no-master-weights", action="store_true",
                   help="with --optimizer host: no fp32 master weights (the host keeps the weights in their dtype; "
                   "with bf16 moments, 6 bytes a parameter)")
    p.add_argument("--offload-dir", default=None,
                   help="a folder: the trainer's released state goes to a file there, not to host memory")
    p.add_argument("--offload-activations", action="store_true",
                   help="tensors saved for backward wait in pinned host memory during training")
    p.add_argument("--critic-model", default=None,
                   help="PPO: a preset or folder for a critic of its own (LM + value head, its own AdamW) instead "
                        "of a value head on the policy")
    p.add_argument("--reward-model", default=None,
                   help="a preset or HF sequence-classification folder whose score is the reward (the task's score is "
                        "still logged)")
    p.add_argument("--reward-offload", type=float, default=0.0,
                   help="fraction of the reward model's layers streamed from pinned host memory")
    p.add_argument("--reference-offload", type=float, default=0.0,
                   help="fraction of the reference model's layers streamed from pinned host memory for its forward")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences the engine decodes at once")
    p.add_argument("--kv-cache-fraction", type=float, default=0.5, help="CUDA: share of free memory for the KV cache")
    p.add_argument("--weights-to", default="meta", choices=["meta", "cpu"])
    p.add_argument("--quantization", default=None, choices=["fp8"], help="fp8 rollout engine, quantized on update")
    p.add_argument("--weights-offload", type=float, default=0.0,
                   help="fraction of the engine's layers streamed from pinned host memory for each forward")
    p.add_argument("--device-budget-gib", type=float, default=None,
                   help="CUDA: cap the engine's and the trainer's processes at this many GiB of device memory each "
                        "(the KV cache is sized within it); measure their sum with nvidia-smi (scripts/bench_ppo.py)")
    p.add_argument("--verify-tolerance", type=float, default=None,
                   help="every update carries a logprob probe of the trainer's weights; the engine refuses weights "
                        "whose mean |logprob difference| on it exceeds this many nats, e.g. 0.1 (default: no probe)")
    p.add_argument("--tis-cap", type=float, default=None,
                   help="weight each token's loss by min(p_trainer / p_engine, CAP), e.g. 2, for an engine that "
                        "samples from other numerics (fp8); logged as tis_weight_mean (default: off)")
    p.add_argument("--update-from", default="device", choices=["device", "host"],
                   help="device: update the engine from the trainer's device memory, then release the trainer "
                        "(needs room for the engine's weights beside the trainer); host: release the trainer first")
    p.add_argument("--no-release", action="store_true", help="keep both sides resident (the comparison run)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> tuple[WorkerConfig, int]:
    """The worker config and the number of workers; ValueError with the fix for sizes that do not divide."""
    num_workers = args.num_gpus or args.num_workers
    if num_workers < 1 or args.num_gpus < 0:
        raise ValueError("--num-gpus must be >= 0 and --num-workers >= 1")
    if args.iterations < 1:
        raise ValueError(f"--iterations {args.iterations} must be >= 1")
    if args.device_budget_gib is not None and not args.device_budget_gib > 0:
        raise ValueError(f"--device-budget-gib {args.device_budget_gib} must be > 0")
    if args.rollout_batch_size % args.minibatch_size:
        raise ValueError(f"--minibatch-size {args.minibatch_size} must divide --rollout-batch-size "
                         f"{args.rollout_batch_size}, so every optimizer step sees as many sequences")
    for name in ("rollout_batch_size", "minibatch_size"):
        if getattr(args, name) % num_workers:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must split evenly over "
                             f"{num_workers} workers")
    if args.warmup_steps < 0 or args.warmup_batch_size % num_workers:
        raise ValueError(f"--warmup-steps must be >= 0 and --warmup-batch-size {args.warmup_batch_size} must split "
                         f"evenly over {num_workers} workers")
    device = "cuda" if args.num_gpus else "cpu"
    options = {"max_new_tokens": args.max_new_tokens, "min_digits": args.min_digits, "max_digits": args.max_digits,
               "ops": args.ops}
    task_overrides = {k: v for k, v in options.items() if v is not None}
    task = get_task(args.task, **task_overrides)
    ppo = PPOConfig(rollout_batch_size=args.rollout_batch_size // num_workers,
                    minibatch_size=args.minibatch_size // num_workers, ppo_epochs=args.ppo_epochs, lr=args.lr,
                    kl_coef=0.01 if args.kl_coef is None else args.kl_coef, advantage_norm=args.advantage_norm,
                    kl_kind=args.kl_kind, lr_warmup_steps=args.lr_warmup_steps, tis_cap=args.tis_cap)
    grpo = GRPOConfig()  # unused by PPO workers
    if args.algo == "grpo":
        grpo = GRPOConfig(rollout_batch_size=args.rollout_batch_size // num_workers,
                          minibatch_size=args.minibatch_size // num_workers, ppo_epochs=args.ppo_epochs, lr=args.lr,
                          kl_coef=args.kl_coef or 0.0, group_size=args.group_size,
                          scale_by_std=not args.no_scale_by_std, loss_norm=args.loss_norm,
                          lr_warmup_steps=args.lr_warmup_steps, tis_cap=args.tis_cap)
    warmup = (WarmStartConfig(num_steps=args.warmup_steps, batch_size=args.warmup_batch_size // num_workers,
                              lr=args.warmup_lr, seed=args.seed) if args.warmup_steps else None)
    budget = None if args.device_budget_gib is None else int(args.device_budget_gib * 2**30)
    engine = EngineConfig(model=args.model, device=device, kv_cache_fraction=args.kv_cache_fraction,
                          max_num_seqs=args.max_num_seqs,
                          max_model_len=64 + task.max_new_tokens, seed=args.seed, quantization=args.quantization,
                          weights_offload=args.weights_offload, memory_limit=budget)
    trainer = TrainerConfig(model=args.model, device=device, param_dtype=args.trainer_dtype, seed=args.seed,
                            memory_limit=budget,
                            max_positions=engine.max_model_len, optimizer=args.optimizer,
                            optimizer_state_dtype=args.optimizer_state_dtype, master_weights=not args.no_master_weights,
                            offload_activations=args.offload_activations, offload_dir=args.offload_dir,
                            reference_offload=args.reference_offload, critic_model=args.critic_model,
                            reward_model=args.reward_model, reward_offload=args.reward_offload)
    return WorkerConfig(engine=engine, trainer=trainer, ppo=ppo, algo=args.algo, grpo=grpo, warm_start=warmup,
                        task=args.task, task_overrides=task_overrides, temperature=args.temperature,
                        weights_to=args.weights_to, seed=args.seed,
                        verify_tolerance=args.verify_tolerance), num_workers


def check_before_ray(args: argparse.Namespace) -> None:
    """ValueError for what would otherwise fail after Ray starts: a missing model, GPUs this machine lacks."""
    if args.offload_dir is not None and not Path(args.offload_dir).is_dir():
        raise ValueError(f"--offload-dir {args.offload_dir!r} is not a folder")
    from colocate.model import resolve_config

    resolve_config(args.model)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; name a folder")
    # With no cluster named, Ray starts here: it can only use this machine's GPUs (and would wait for more).
    if args.num_gpus and not os.environ.get("RAY_ADDRESS"):
        import torch

        num_visible = torch.cuda.device_count()
        if num_visible < args.num_gpus:
            raise ValueError(f"--num-gpus {args.num_gpus} but torch sees {num_visible} GPU(s) on this machine and "
                             "no Ray cluster is named (RAY_ADDRESS); ask for fewer, or submit to a cluster "
                             "with `ray job submit`")


def cpus_per_worker(args: argparse.Namespace, num_workers: int) -> int:
    """The flag, else 1, or with a host optimizer the cluster's cores shared out: a Ray actor's torch runs as many
    threads as it was given CPUs, and a 1.5B model's AdamW step on one thread takes ~10 s."""
    if args.cpus_per_worker is not None:
        return args.cpus_per_worker
    if args.optimizer != "host":
        return 1
    if not ray.is_initialized():
        ray.init()
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers - 1)  # one core left for the rest


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config, num_workers = build_config(args)
        check_before_ray(args)
    except ValueError as e:  # one line, exit code 2 (as for a bad flag), nothing started and no folder made
        print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    group = WorkerGroup(config, num_workers=num_workers, num_gpus_per_worker=1 if args.num_gpus else 0,
                        cpus_per_worker=cpus_per_worker(args, num_workers))
    evals: dict[str, Any] = {"task": args.task, "num_prompts": args.eval_prompts, "init": None}
    warm: dict[str, Any] | None = None
    try:
        setup_seconds = time.perf_counter() - start
        if args.warmup_steps:
            if args.eval_prompts:
                evals["init"] = evaluate(group, args)
            warm = warm_start(group, args)
        evals["curve"], evals["train_curve"] = [], []
        if args.eval_prompts:
            evaluate_both(group, args, evals, 0)
            evals["before_rl"] = evals["curve"][0][1]
        rl_start = time.perf_counter()
        records = train(group, args, out, evals if args.eval_prompts else None)
        rl_seconds = time.perf_counter() - rl_start
        if args.eval_prompts:
            if evals["curve"][-1][0] != args.iterations:
                evaluate_both(group, args, evals, args.iterations)
            evals["after_rl"] = evals["curve"][-1][1]
    finally:
        group.shutdown()
    rewards = [r["reward_mean"] for r in records]
    summary = {"args": vars(args), "num_workers": num_workers, "setup_seconds": setup_seconds,
               "total_seconds": time.perf_counter() - start, "rl_seconds": rl_seconds,
               "iteration_seconds_mean": sum(r["iteration_seconds"] for r in records[1:] or records) / max(
                   1, len(records) - 1),
               "reward_first": rewards[0], "reward_last3": sum(rewards[-3:]) / len(rewards[-3:]),
               "reward_last5": sum(rewards[-5:]) / len(rewards[-5:]), "reward_max": max(rewards),
               "switch_share_mean": sum(r["switch_share"] for r in records[1:] or records) / max(1, len(records) - 1),
               "warm_start": warm, "eval": evals if args.eval_prompts else None}
    (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(records, out)
    curves = _curves()
    if curves is not None:
        curves.plot_training(records, out)
        if args.eval_prompts:
            curves.plot_eval(evals, out)
    print(f"{args.algo}: reward {rewards[0]:.3f} -> {summary['reward_last5']:.3f} (mean of the last five) in "
          f"{len(records)} iterations, {summary['total_seconds']:.0f} s; memory switches and weight sync took "
          f"{100 * summary['switch_share_mean']:.1f}% of an iteration. Plots and metrics in {out}/")
    if args.eval_prompts:
        before = f"{evals['init']:.3f} before the warm start, " if evals["init"] is not None else ""
        print(f"held-out greedy score on {args.task}: {before}{evals['before_rl']:.3f} before RL, "
              f"{evals['after_rl']:.3f} after RL (on training-split problems: {evals['train_curve'][0][1]:.3f} -> "
              f"{evals['train_curve'][-1][1]:.3f})")


if __name__ == "__main__":
    main()
