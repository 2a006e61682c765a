"""Colocated PPO on GPUs: time per phase, the share spent switching memory, peak memory, and what fits.

    python scripts/bench_ppo.py --out OUT --runs scale          # the example on 1, 2, 4 GPUs (as many as there are)
    python scripts/bench_ppo.py --out OUT --runs largest --model qwen2.5-7b   # colocated vs --no-release
    python scripts/bench_ppo.py --out OUT --runs four_models --model llama-3-8b --device-budget-gib 80
    python scripts/bench_ppo.py --out OUT --runs four_models --model qwen2.5-1.5b --device-budget-gib 24

Each run is `examples/ppo/train.py` in a subprocess; its metrics.jsonl is summarised here (iteration 0,
which pays first-time costs such as pinning host memory, is reported apart from the steady state).
Every run also samples, every 0.2 s, the device memory in use on the whole GPU (nvidia-smi: the engine's
process and the trainer's together) and the host memory in use above what it was before the run
(/proc/meminfo), and reports their peaks. `four_models`: PPO with a policy, a separate critic, a reference
and a reward model of `--model`, colocated with the engine, each process capped at `--device-budget-gib`
(`--device-budget-gib` of the example) and the sampled peaks compared with that budget and with
`--host-budget-gib`; the placement flags are in FOUR_MODELS and `--extra` adds or overrides them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from colocate.memory.device import memory_info

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
# Rollout shapes per GPU: (sequences, response tokens, sequences the engine decodes at once, PPO epochs).
SHAPES = {"short": (256, 256, 64, 1), "long": (512, 512, 256, 2)}
# The four-model scenario's placement: trained models in bf16 with AdamW on the host (bf16 moments, no fp32
# masters: 6 host bytes a parameter), activations in host memory, frozen models released to disk.
FOUR_MODELS = ["--trainer-dtype", "bfloat16", "--optimizer", "host", "--optimizer-state-dtype", "bfloat16",
               "--no-master-weights", "--offload-activations", "--weights-to", "meta", "--rollout-batch-size", "32",
               "--minibatch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "128", "--lr", "1e-6",
               "--iterations", "3", "--kv-cache-fraction", "0.3"]


class PeakSampler:
    """Peaks of the GPU's used memory (all processes, nvidia-smi) and of host memory in use above its level at
    the start (/proc/meminfo), sampled every `period_s` on a thread while the block runs."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s, self.device_peak, self.host_peak = period_s, None, 0
        self._stop = threading.Event()
        self._host_start = self._host_used()

    @staticmethod
    def _host_used() -> int:
        available, total = memory_info(torch.device("cpu"))  # /proc/meminfo
        return total - available

    @staticmethod
    def _device_used() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None  # no GPU (or no nvidia-smi): only the host is sampled
        return max(int(line) for line in out.split()) * 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            device = self._device_used()
            if device is not None:
                self.device_peak = max(self.device_peak or 0, device)
            self.host_peak = max(self.host_peak, self._host_used() - self._host_start)
            self._stop.wait(self.period_s)

    def __enter__(self) -> "PeakSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_example(name: str, out: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
    folder = out / name
    cmd = [sys.executable, str(ROOT / "examples/ppo/train.py"), "--out", str(folder), *args]
    print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    with PeakSampler() as peaks:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = -1, f"timed out after {timeout_s} s: {str(e.stderr)[-2000:]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text(tail)
    result: dict[str, Any] = {"name": name, "args": args, "returncode": rc, "wall_seconds": time.perf_counter() - start,
                              "oom": "out of memory" in tail.lower() or "OutOfMemoryError" in tail,
                              "device_peak_gib": None if peaks.device_peak is None else peaks.device_peak / GiB,
                              "host_peak_gib": peaks.host_peak / GiB}
    metrics = folder / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    result |= summarise(records)
    if rc != 0:
        result["error_tail"] = tail[-1500:]
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=None)[:1500], flush=True)
    return result


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {"num_iterations": 0}
    steady = records[1:] or records
    phases = {}
    for phase in records[0]["seconds"]:
        phases[phase] = {
            "first_s": records[0]["seconds"][phase],
            "steady_s": statistics.median(r["seconds"][phase] for r in steady),
            "peak_trainer_gib": max(r["memory"][phase].get("trainer_peak_bytes", 0) for r in records) / GiB,
            "max_device_used_gib": max(r["memory"][phase].get("device_used_bytes", 0) for r in records) / GiB,
            "engine_gib": max(r["memory"][phase]["engine_bytes"] for r in records) / GiB,
            "trainer_gib": max(r["memory"][phase]["trainer_bytes"] for r in records) / GiB,
            "worker_host_gib": max(r["memory"][phase].get("host_resident_bytes") or 0 for r in records) / GiB,
        }
    return {"num_iterations": len(records), "phases": phases,
            "iteration_s_first": records[0]["iteration_seconds"],
            "iteration_s_steady": statistics.median(r["iteration_seconds"] for r in steady),
            "switch_share_steady": statistics.median(r["switch_share"] for r in steady),
            "engine_switch_share_steady": statistics.median(r["engine_switch_share"] for r in steady),
            "reward_first": records[0]["reward_mean"], "reward_last": records[-1]["reward_mean"],
            "logprob_gap_mean_abs": statistics.median(r["stats"]["logprob_gap_mean_abs"] for r in steady),
            "tokens_per_iteration": records[-1]["stats"].get("num_tokens", 0)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | rc | iter s (first / steady) | switch share | engine switch share | "
             "peak device used GiB (in-run / sampled) | peak host GiB | logprob gap |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if not r.get("phases"):
            lines.append(f"| {r['name']} | {r['returncode']}{' OOM' if r['oom'] else ''} | - | - | - | "
                         f"- / {_gib(r.get('device_peak_gib'))} | {_gib(r.get('host_peak_gib'))} | - |")
            continue
        peak = max(p["max_device_used_gib"] for p in r["phases"].values())
        lines.append(f"| {r['name']} | {r['returncode']}{' OOM' if r['oom'] else ''} | {r['iteration_s_first']:.2f} / "
                     f"{r['iteration_s_steady']:.2f} | {100 * r['switch_share_steady']:.2f}% | "
                     f"{100 * r['engine_switch_share_steady']:.2f}% | {peak:.1f} / {_gib(r.get('device_peak_gib'))} | "
                     f"{_gib(r.get('host_peak_gib'))} | {r['logprob_gap_mean_abs']:.3g} |")
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def phase_table(result: dict[str, Any]) -> str:
    lines = [f"{result['name']}: | phase | first s | steady s | engine GiB | trainer GiB | trainer peak GiB | "
             "device used GiB | worker host GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for phase, p in result.get("phases", {}).items():
        lines.append(f"| {phase} | {p['first_s']:.3f} | {p['steady_s']:.3f} | {p['engine_gib']:.2f} | "
                     f"{p['trainer_gib']:.2f} | {p['peak_trainer_gib']:.2f} | {p['max_device_used_gib']:.2f} | "
                     f"{p.get('worker_host_gib', 0):.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", nargs="+", default=["scale"], choices=["scale", "largest", "four_models"])
    p.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU counts for 'scale' (default: 1, 2, 4 "
                   "up to the GPUs present)")
    p.add_argument("--shapes", nargs="+", default=["short"], choices=sorted(SHAPES))
    p.add_argument("--model", default="qwen2.5-7b", help="the preset for 'largest' and 'four_models'")
    p.add_argument("--device-budget-gib", type=float, default=80.0, help="four_models: the device budget")
    p.add_argument("--host-budget-gib", type=float, default=120.0, help="four_models: the host budget (checked)")
    p.add_argument("--extra", default="", help="four_models: more example flags, e.g. '--reference-offload 0.5'")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--timeout", type=float, default=540)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    num_gpus = torch.cuda.device_count()
    results = []
    common = ["--lr", "1e-6", "--iterations", str(args.iterations)]
    if "scale" in args.runs:
        for shape in args.shapes:
            seqs, tokens, engine_seqs, epochs = SHAPES[shape]
            for n in args.gpus or [n for n in (1, 2, 4) if n <= num_gpus]:
                results.append(run_example(f"qwen2.5-0.5b-{shape}-{n}gpu", out, [
                    "--num-gpus", str(n), "--model", "qwen2.5-0.5b", "--rollout-batch-size", str(seqs * n),
                    "--minibatch-size", str(16 * n), "--ppo-epochs", str(epochs), "--max-new-tokens", str(tokens),
                    "--max-num-seqs", str(engine_seqs), *common], args.timeout))
    if "largest" in args.runs:
        largest = ["--num-gpus", "1", "--model", args.model, "--trainer-dtype", "bfloat16", "--rollout-batch-size",
                   "32", "--minibatch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "256", "--lr", "1e-6",
                   "--iterations", "3"]
        results.append(run_example(f"{args.model}-colocated", out, largest, args.timeout))
        results.append(run_example(f"{args.model}-no-release", out, [*largest, "--no-release"], args.timeout))
    if "four_models" in args.runs:
        disk = out / "offload"  # the frozen models' released state (and anything else released to disk)
        disk.mkdir(exist_ok=True)
        m = args.model
        result = run_example(f"{m}-four-models-{args.device_budget_gib:g}gib", out, [
            "--num-gpus", "1" if num_gpus else "0", "--model", m, "--critic-model", m, "--reward-model", m,
            "--offload-dir", str(disk), "--device-budget-gib", str(args.device_budget_gib), *FOUR_MODELS,
            *shlex.split(args.extra)], args.timeout)
        peak = result["device_peak_gib"]  # None where nvidia-smi cannot be read (no GPU)
        result["within_device_budget"] = None if peak is None else peak <= args.device_budget_gib
        result["within_host_budget"] = result["host_peak_gib"] <= args.host_budget_gib
        results.append(result)
    (out / "bench_ppo.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if num_gpus else "cpu",
                                                    "num_gpus": num_gpus, "torch": torch.__version__,
                                                    "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    print(table(results))
    for r in results:
        print(phase_table(r))


if __name__ == "__main__":
    main()
