"""An RL rollout on the colocate engine: n responses per prompt with natural stops, against n=1 and transformers.

    cd scripts && OUT=$OUT python3 bench_rollout.py          # GPU: qwen2.5-1.5b bf16, 512 prompts, n=8, <= 1024 new
    cd scripts && python bench_rollout.py --device cpu --model tiny --num-prompts 8 --n 4 --max-new-tokens 32
    cat scripts/bench_rollout.py | PYTHONPATH=. python - --device cpu --model tiny --num-prompts 8 --n 4   # stdin

Method. A preset with random weights is saved once as an HF checkpoint, which the engine and
transformers both load. Prompts are random token ids of lengths drawn uniformly in
[min_prompt_len, max_prompt_len]; prompt j samples with seed `seed + n*j` (its n responses use the
next n seeds). Random weights never sample EOS on purpose (it is ignored), so responses end on a
stop set: k random ids, k = stop_rate * vocab, rescaled once by the rate at which a pilot rollout
without stops (it also warms the engine up) sampled them. The rollout is one timed
`engine.generate`, device synchronised around it. Device idle share (None on CPU): 1 - the union
of the kernel and copy intervals torch.profiler records (CUDA activity only) / wall, over a
rollout of the first `--profile-prompts` prompts (the profiler's cost is in that wall); and, if
pynvml imports, 1 - mean utilization.gpu polled every 50 ms over the full, unprofiled rollout.
Against n=1: the same prompts as n separate seeded requests each (the same streams, so the same
responses unless batch-dependent rounding flips a sample); prefill: generate with max_new_tokens=1
for n=N and n=1 (median of `--prefill-repeats`), and once as the separate requests, whose first
tokens must equal n=N's. Floor (CUDA): the decode HBM traffic at full batches of max_num_seqs,
ceil(generated tokens / max_num_seqs) * weight bytes + KV bytes of every generated token's
context, over the read+write copy bandwidth measured in the run. Peer: transformers `generate`
(static cache, else dynamic; after a warm-up call of the same shapes stopped at 8 tokens),
num_return_sequences=n, the stop set as eos_token_id, top_k 0, on the first `--peer-prompts`
prompts, against colocate on the same prompts, by generated tokens/s.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import statistics
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.model import PRESETS, save_preset

try:
    import benchlib  # noqa: F401 - run as a file, Python put this folder first on sys.path
except ModuleNotFoundError:  # piped from stdin, it put the working directory there instead: try its scripts/
    sys.path.insert(0, str(Path.cwd() / "scripts"))
from benchlib.config import DeviceDtypeMixin
from benchlib.device import free_device
from benchlib.floors import NEEDS_CUDA, hbm_bandwidth
from benchlib.measure import timed
from benchlib.model_measures import kv_bytes_per_token
from benchlib.report import attempt, bench_main, new_report, ratio
from benchlib.rollout_report import PREFILL_TARGET_X, print_table

_JSON_NAME = "bench_rollout.json"  # under $OUT, when it is set
_HELPS = {"model": "a preset name (random weights)", "dtype": "auto: bfloat16 on CUDA, float32 on CPU",
          "stop_rate": "probability per token that a response ends", "profile_prompts": "CUDA; 0: no profile",
          "peer_prompts": "0: no transformers peer", "peer_cache": "static or dynamic",
          "out": "JSON path, unless $OUT is set ($OUT/bench_rollout.json)"}


@dataclass(kw_only=True)
class BenchConfig(DeviceDtypeMixin):
    model: str = "qwen2.5-1.5b"
    device: str = "cuda"
    dtype: str = "auto"
    num_prompts: int = 512
    min_prompt_len: int = 64
    max_prompt_len: int = 512
    n: int = 8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    stop_rate: float = 1 / 256
    seed: int = 0
    max_num_seqs: int = 256
    kv_cache_fraction: float = 0.5
    pilot_prompts: int = 32
    prefill_repeats: int = 3
    profile_prompts: int = 64
    peer_prompts: int = 32
    peer_cache: str = "static"  # transformers' cache; "dynamic" is tried if it fails
    floor_repeats: int = 10
    out: str = "out/bench_rollout.json"

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise ValueError(f"model={self.model!r}: pass a preset name from {sorted(PRESETS)}")
        self.check_device_dtype()
        if not 1 <= self.min_prompt_len <= self.max_prompt_len:
            raise ValueError(f"need 1 <= min_prompt_len={self.min_prompt_len} <= max_prompt_len={self.max_prompt_len}")
        for name in ("num_prompts", "n", "max_new_tokens", "max_num_seqs", "pilot_prompts", "prefill_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.peer_cache not in ("static", "dynamic"):
            raise ValueError(f"peer_cache={self.peer_cache!r} must be 'static' or 'dynamic'")
        if not 0 < self.stop_rate < 0.5:
            raise ValueError(f"stop_rate={self.stop_rate} must be in (0, 0.5), e.g. 0.0039 (1/256)")
        self.profile_prompts, self.peer_prompts = (min(max(x, 0), self.num_prompts)
                                                   for x in (self.profile_prompts, self.peer_prompts))


def params_for(cfg: BenchConfig, num_prompts: int, stops: list[int], *, max_new_tokens: int,
               n: int | None = None) -> list[SamplingParams]:
    """Prompt j's params, seed `seed + n*j`; n None: the n separate requests of each prompt (seeds + i), n=1 each."""
    return [SamplingParams(n=n or 1, temperature=cfg.temperature, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                           ignore_eos=True, seed=cfg.seed + cfg.n * j + i)
            for j in range(num_prompts) for i in range(1 if n else cfg.n)]


def stats(outs: list[Any], wall_s: float, prompts: list[list[int]]) -> dict[str, Any]:
    """A generate call's numbers; `prompts` as passed to it (their tokens: what it had to prefill)."""
    lens = [len(o.token_ids) for o in outs]
    tokens, stopped = sum(lens), sum(o.finish_reason == "stop" for o in outs)
    return {"wall_s": wall_s, "responses": len(outs), "generated_tokens": tokens, "tokens_per_s": tokens / wall_s,
            "prompt_tokens": sum(map(len, prompts)), "mean_response_len": tokens / len(outs),
            "max_response_len": max(lens), "stopped_share": stopped / len(outs), "measured_stop_rate": stopped / tokens,
            "context_tokens": sum(len(o.prompt_token_ids) * n + n * (n - 1) // 2 for o, n in zip(outs, lens))}


def choose_stops(cfg: BenchConfig, engine: Engine, prompts: list[list[int]]) -> dict[str, Any]:
    """k random ids for `stop_rate`, rescaled by how often a pilot rollout (no stops) sampled the first k."""
    vocab = engine.model_config.vocab_size
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(cfg.seed + 1))
    k = max(1, round(cfg.stop_rate * vocab))
    pilot = params_for(cfg, min(cfg.pilot_prompts, len(prompts)), [], max_new_tokens=min(cfg.max_new_tokens, 128),
                       n=cfg.n)
    for p in pilot:
        p.seed += 1 << 40  # streams of their own
    wall_s, outs = timed(lambda: engine.generate(prompts[:len(pilot)], pilot), cfg.torch_device)
    counts = torch.bincount(torch.tensor([t for o in outs for t in o.token_ids]), minlength=vocab)
    hits, total = int(counts[order[:k]].sum()), int(counts.sum())
    k_final = min(max(1, round(k * cfg.stop_rate * total / hits)), vocab // 2) if hits >= 16 else k
    return {"ids": order[:k_final].tolist(), "k_first": k, "k": k_final, "pilot_s": wall_s, "pilot_tokens": total,
            "pilot_hits_of_first_k": hits, "pilot_rate_of_first_k": hits / total}


def rollout_nvml(cfg: BenchConfig, engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
    """The timed rollout; on CUDA with pynvml, utilization.gpu polled beside it every 50 ms (idle = 1 - mean)."""
    samples: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.05):
            samples.append(torch.cuda.utilization(cfg.torch_device))

    if cfg.is_cuda and importlib.util.find_spec("pynvml"):
        threading.Thread(target=poll, daemon=True).start()
    try:
        wall_s, outs = timed(lambda: engine.generate(prompts, params), cfg.torch_device)
    finally:
        stop.set()
    why = NEEDS_CUDA if not cfg.is_cuda else "pynvml is not installed" if not samples else None
    idle = {"idle_share": None, "skipped": why} if why else {"idle_share": 1 - statistics.mean(samples) / 100,
                                                             "method": "nvml utilization.gpu", "samples": len(samples)}
    return wall_s, outs, idle


def profiled_idle(cfg: BenchConfig, engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
    """A rollout under torch.profiler (CUDA activity only): idle share = 1 - union of device intervals / wall."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall_s, outs = timed(lambda: engine.generate(prompts, params), cfg.torch_device)
    spans = sorted((e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
                   if e.device_type() == DeviceType.CUDA)
    busy_ns, end = 0, -1
    for start, stop in spans:  # the union: overlapping intervals (several streams) count once
        if stop > end:
            busy_ns, end = busy_ns + stop - max(start, end), stop
    return {"method": "torch.profiler: union of CUDA kernel and copy intervals vs wall", "prompts": len(prompts),
            **stats(outs, wall_s, prompts), "device_events": len(spans), "busy_s": busy_ns / 1e9,
            "idle_share": max(0.0, 1 - busy_ns / 1e9 / wall_s)}


def versus_n1(cfg: BenchConfig, engine: Engine, prompts: list[list[int]], stops: list[int],
              rollout_outs: list[Any] | None) -> dict[str, Any]:
    """The rollout as n separate seeded requests per prompt; the prefill of n=N, n=1 and the separate requests."""
    device, sep, num = cfg.torch_device, [p for p in prompts for _ in range(cfg.n)], len(prompts)
    wall_s, outs = timed(lambda: engine.generate(sep, params_for(cfg, num, stops, max_new_tokens=cfg.max_new_tokens)),
                         device)
    out: dict[str, Any] = {"separate": stats(outs, wall_s, sep)}
    if rollout_outs is not None:
        out["responses_equal_share"] = statistics.mean(a.token_ids == b.token_ids for a, b in zip(outs, rollout_outs))
    one = {n: params_for(cfg, num, stops, max_new_tokens=1, n=n) for n in (cfg.n, 1)}
    runs: dict[int, list[float]] = {n: [] for n in one}
    for _ in range(cfg.prefill_repeats):
        for n, params in one.items():
            seconds, res = timed(lambda p=params: engine.generate(prompts, p), device)
            runs[n].append(seconds)
            if n == cfg.n:
                first_n = res
    sep_s, sep_outs = timed(lambda: engine.generate(sep, params_for(cfg, num, stops, max_new_tokens=1)), device)
    equal = [a.token_ids[:1] == b.token_ids[:1] for a, b in zip(first_n, sep_outs)]
    n_s, n1_s = statistics.median(runs[cfg.n]), statistics.median(runs[1])
    out["prefill"] = {"n_s": n_s, "n1_s": n1_s, "x_n1": ratio(n_s, n1_s), "target_x_at_most": PREFILL_TARGET_X,
                      "n_s_all": runs[cfg.n], "n1_s_all": runs[1], "separate_s": sep_s,
                      "prompt_tokens": sum(map(len, prompts))}
    out["checks"] = {"first_tokens_equal_separate": all(equal), "first_tokens_equal_share": statistics.mean(equal)}
    return out


def transformers_peer(cfg: BenchConfig, path: Path, prompts: list[list[int]], stops: list[int]) -> dict[str, Any]:
    try:
        import transformers
        from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
    except ImportError as exc:
        return {"skipped": f"transformers is not installed ({exc})"}
    device, width = cfg.torch_device, max(map(len, prompts))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.torch_dtype).to(device).eval()
    pad = next(t for t in range(model.config.vocab_size) if t not in set(stops))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    class StopAfter(StoppingCriteria):  # the warm-up: same shapes (static cache, compiled graphs), 8 tokens
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= width + 8, device=input_ids.device)

    out: dict[str, Any] = {"transformers": transformers.__version__, "prompts": len(prompts)}
    try:
        for cache in dict.fromkeys((cfg.peer_cache, "dynamic")):
            def run(warm: bool, cache: str = cache) -> torch.Tensor:
                return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                                      top_k=0, top_p=1.0, num_return_sequences=cfg.n, max_new_tokens=cfg.max_new_tokens,
                                      eos_token_id=stops, pad_token_id=pad, cache_implementation=cache,
                                      stopping_criteria=StoppingCriteriaList([StopAfter()] if warm else []))
            try:
                warm_s, _ = timed(lambda: run(True), device)
                torch.manual_seed(cfg.seed)
                wall_s, seqs = timed(lambda: run(False), device)
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile failing: try the next cache
                out[f"{cache}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"  transformers {cache}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            gen = seqs[:, width:]
            hit = torch.isin(gen, torch.tensor(stops, device=device))
            lens = torch.where(hit.any(1), hit.int().argmax(1) + 1, gen.shape[1])
            tokens = int(lens.sum())
            return {**out, "cache": cache, "warmup_s": warm_s, "wall_s": wall_s, "generated_tokens": tokens,
                    "tokens_per_s": tokens / wall_s, "mean_response_len": tokens / len(lens),
                    "max_response_len": int(lens.max())}
        return {**out, "error": "every cache failed"}
    finally:
        model = None  # freed before the next step
        gc.collect()
        torch._dynamo.reset()
        free_device(device)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    report, device = new_report(cfg, doc=__doc__), cfg.torch_device
    gen, vocab = torch.Generator().manual_seed(cfg.seed), PRESETS[cfg.model].vocab_size
    lens = torch.randint(cfg.min_prompt_len, cfg.max_prompt_len + 1, (cfg.num_prompts,), generator=gen).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]
    report["floor"] = hbm_bandwidth(device, repeats=cfg.floor_repeats)
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        path = save_preset(cfg.model, Path(tmp) / cfg.model, seed=cfg.seed, dtype=cfg.torch_dtype, device=device)
        build_s, engine = timed(lambda: Engine(EngineConfig(
            model=str(path), device=cfg.device, dtype=cfg.dtype, kv_cache_fraction=cfg.kv_cache_fraction,
            max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_prompt_len + cfg.max_new_tokens, seed=cfg.seed)),
            device)
        weights_bytes = engine.memory_status()["device_bytes"]["weights"]
        report["engine"] = {"build_s": build_s, **engine.limits(), "weights_bytes": weights_bytes}
        print(f"{report['device']}: {cfg.model} ({cfg.dtype}), engine built in {build_s:.1f} s", flush=True)
        try:
            report["stops"] = stops = attempt(lambda: choose_stops(cfg, engine, prompts), label="stop set")
            ids, kp, kc = stops.get("ids"), cfg.profile_prompts, cfg.peer_prompts
            if ids is None:
                return report
            print(f"  stop set: {stops['k']} ids (pilot rate of the first {stops['k_first']}: "
                  f"{stops['pilot_rate_of_first_k']:.5f}; pilot {stops['pilot_s']:.1f} s)", flush=True)
            params = params_for(cfg, len(prompts), ids, max_new_tokens=cfg.max_new_tokens, n=cfg.n)
            outs: list[Any] = []

            def rollout() -> dict[str, Any]:
                wall_s, result, idle = rollout_nvml(cfg, engine, prompts, params)
                outs.extend(result)
                out = {**stats(result, wall_s, prompts), "idle_share": idle.pop("idle_share"), "idle_nvml": idle}
                if "read_write_bytes_per_s" in report["floor"]:
                    floor_bytes = (math.ceil(out["generated_tokens"] / cfg.max_num_seqs) * weights_bytes
                                   + out["context_tokens"] * kv_bytes_per_token(engine.model_config, cfg.torch_dtype))
                    out["floor_s"] = floor_bytes / report["floor"]["read_write_bytes_per_s"]
                    out["x_floor"] = wall_s / out["floor_s"]
                print(f"  rollout: {wall_s:.1f} s, {out['tokens_per_s']:.0f} tok/s", flush=True)
                return out

            report["rollout"] = attempt(rollout, label="rollout")
            report["n1"] = attempt(lambda: versus_n1(cfg, engine, prompts, ids, outs or None), label="n=1")
            report["checks"] = report["n1"].get("checks", {})  # recorded, not asserted
            outs.clear()
            report["idle_profile"] = (
                {"idle_share": None, "skipped": NEEDS_CUDA if not cfg.is_cuda else "--profile-prompts 0"}
                if not (cfg.is_cuda and kp) else
                attempt(lambda: profiled_idle(cfg, engine, prompts[:kp], params[:kp]), label="profile"))

            def subset() -> dict[str, Any]:
                wall_s, result = timed(lambda: engine.generate(prompts[:kc], params[:kc]), device)
                return stats(result, wall_s, prompts[:kc])

            report["colocate_subset"] = attempt(subset, label="subset") if kc else {"skipped": "--peer-prompts 0"}
        finally:
            engine.shutdown()
            free_device(device)
        report["peer"] = (attempt(lambda: transformers_peer(cfg, path, prompts[:kc], ids), label="peer")
                          if kc else {"skipped": "--peer-prompts 0"})
    return report


def main() -> None:
    bench_main(BenchConfig, __doc__, helps=_HELPS, run=run_bench, print_report=print_table, json_name=_JSON_NAME)

if __name__ == "__main__":
    main()
