"""Decode throughput of the colocate engine against transformers `generate` and the HBM floor.

    python scripts/bench_engine.py                                   # H100: qwen2.5-0.5b and -1.5b, batch 1/16/64
    python scripts/bench_engine.py --models tiny --batch-sizes 1,4 --new-tokens 8 --device cpu   # smoke test

Method. Every prompt has `--prompt-len` random token ids; decoding is greedy with EOS ignored, so
each call makes exactly N new tokens per sequence. A call with max_new_tokens=N runs one prefill
(which samples the first token) and N-1 decode steps; a call with max_new_tokens=1 runs the same
prefill alone. So one decode step of the batch takes (t(N) - t(1)) / (N - 1), and decode
throughput is B * (N - 1) / (t(N) - t(1)). Each side is warmed up with one call of each length
first (Triton and torch.compile compilation land there; their times are reported as `first_call_s`),
then the median of `--repeats` timed calls of each length is used; the device is synchronised
before and after every timed call. transformers gets the same weights (the preset saved once as an
HF checkpoint, which the engine loads too), the same prompts and lengths, with both its dynamic and
its static cache (static is torch.compiled by transformers on CUDA); the better one is the peer.

Floor. The device-to-device copy bandwidth B_hbm is measured in the same run (bytes read + written
by a large `clone`, timed with CUDA events). One decode step must read every weight once, except
that only B rows of the embedding table are read (the LM head is read whole, tied or not), and
the keys and values of every context token: floor = (weight bytes + KV bytes) / B_hbm, with the
KV bytes taken at the mean context length of the decode steps, prompt_len + N / 2.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.model import CausalLM, preset_config, save_preset

# benchlib sits beside this script: Python puts the script's folder first on sys.path.
from benchlib.config import DTYPES, DeviceDtypeMixin
from benchlib.measure import timed
from benchlib.report import write_json

_CACHES = ("dynamic", "static")
_JSON_NAME = "bench_engine.json"  # under $OUT, when it is set


@dataclass(kw_only=True)
class BenchConfig(DeviceDtypeMixin):
    models: list[str] = field(default_factory=lambda: ["qwen2.5-0.5b", "qwen2.5-1.5b"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64])
    new_tokens: int = 128
    prompt_len: int = 32
    repeats: int = 3  # timed calls of each length per engine measurement (median)
    peer_repeats: int = 1  # the same for transformers, whose calls take seconds
    peer_caches: list[str] = field(default_factory=lambda: list(_CACHES))  # [] skips transformers
    device: str = "cuda"
    dtype: str = "bfloat16"
    kv_cache_fraction: float = 0.5
    max_model_len: int = 2048
    copy_mib: int = 0  # 0: 2048 on CUDA, 64 on CPU
    seed: int = 0
    out: str = "out/bench_engine.json"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("--models is empty; name at least one preset, e.g. qwen2.5-1.5b")
        for model in self.models:
            preset_config(model)  # raises naming the presets
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes={self.batch_sizes} must be non-empty and all >= 1")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens={self.new_tokens} must be >= 2: decode time is t(N) - t(1)")
        if self.prompt_len < 1 or self.prompt_len + self.new_tokens > self.max_model_len:
            raise ValueError(f"prompt_len={self.prompt_len} + new_tokens={self.new_tokens} must fit in "
                             f"max_model_len={self.max_model_len}; raise --max-model-len")
        if self.repeats < 1 or self.peer_repeats < 1:
            raise ValueError(f"repeats={self.repeats} and peer_repeats={self.peer_repeats} must be >= 1")
        bad = [c for c in self.peer_caches if c not in _CACHES]
        if bad:
            raise ValueError(f"peer_caches {bad} unknown; choose from {list(_CACHES)} or pass '' to skip transformers")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(DTYPES)}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA device; pass --device cpu")
        if not self.copy_mib:
            self.copy_mib = 2048 if self.is_cuda else 64


def copy_bandwidth(device: torch.device, nbytes: int, iters: int = 10) -> float:
    """Bytes read + written per second by a device-to-device `clone` of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.clone()  # warm-up: allocation of the destination, kernel load
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            src.clone()
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds, _ = timed(lambda: [src.clone() for _ in range(iters)], device)
    del src
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes * iters / seconds


def decode_step_bytes(model: CausalLM, *, batch: int, mean_context: float, kv_itemsize: int) -> dict[str, float]:
    """Bytes one decode step must read: weights (B embedding rows, the LM head whole) and the KV cache."""
    embed, lm_head = model.model.embed_tokens.weight, model.lm_head.weight
    unique = {id(p): p for p in model.parameters()}  # a tied LM head is the embedding: counted once here
    weight_bytes = sum(p.numel() * p.element_size() for p in unique.values() if p is not embed)
    if lm_head is embed:
        weight_bytes += lm_head.numel() * lm_head.element_size()  # tied: the whole table is read as the LM head
    weight_bytes += batch * embed.shape[1] * embed.element_size()  # the B rows looked up
    mc = model.config
    kv_bytes = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * kv_itemsize * batch * mean_context
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes}


def decode_timing(run: Callable[[int], None], *, batch: int, new_tokens: int, repeats: int,
                  device: torch.device) -> dict[str, float]:
    """Warm up, then per-step decode time from the median t(N) - t(1) (see the module docstring)."""
    first_call_s, _ = timed(lambda: run(new_tokens), device)
    timed(lambda: run(1), device)
    t_n = statistics.median(timed(lambda: run(new_tokens), device)[0] for _ in range(repeats))
    t_1 = statistics.median(timed(lambda: run(1), device)[0] for _ in range(repeats))
    step_s = (t_n - t_1) / (new_tokens - 1)
    return {"first_call_s": first_call_s, "t_new_tokens_s": t_n, "t_prefill_s": t_1, "step_s": step_s,
            "tokens_per_s": batch / step_s if step_s > 0 else float("nan")}


def make_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed + batch)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).tolist()


def bench_colocate(cfg: BenchConfig, path: Path, prompts: dict[int, list[list[int]]],
                   bandwidth: float) -> dict[int, dict]:
    device = torch.device(cfg.device)
    start = time.perf_counter()
    engine = Engine(EngineConfig(model=str(path), device=cfg.device, dtype=cfg.dtype,
                                 kv_cache_fraction=cfg.kv_cache_fraction, max_num_seqs=max(cfg.batch_sizes),
                                 max_model_len=cfg.max_model_len, enable_cuda_graph=True, seed=cfg.seed))
    build_s = time.perf_counter() - start  # load, KV pool, graph capture: the first cycle of the process
    print(f"  colocate  engine built in {build_s:.1f} s", flush=True)
    results = {}
    try:
        kv_itemsize = engine.runner.kv.tensor.element_size()
        for batch in cfg.batch_sizes:
            def run(n: int, batch: int = batch) -> None:
                outs = engine.generate(prompts[batch], SamplingParams(max_new_tokens=n, temperature=0.0,
                                                                      ignore_eos=True))
                assert all(len(o.token_ids) == n for o in outs), f"{[len(o.token_ids) for o in outs]=} {n=}"

            timing = decode_timing(run, batch=batch, new_tokens=cfg.new_tokens, repeats=cfg.repeats, device=device)
            floor = decode_step_bytes(engine.runner.model, batch=batch, kv_itemsize=kv_itemsize,
                                      mean_context=cfg.prompt_len + cfg.new_tokens / 2)
            floor["step_s"] = (floor["weight_bytes"] + floor["kv_bytes"]) / bandwidth
            results[batch] = {"colocate": timing, "floor": floor, "colocate_build_s": build_s,
                              "cuda_graphs": engine.runner.graphs is not None,
                              "fraction_of_floor": floor["step_s"] / timing["step_s"]}
            print(f"  colocate  batch {batch:3d}: {timing['tokens_per_s']:10.1f} tok/s "
                  f"({timing['step_s'] * 1e3:.2f} ms/step)", flush=True)
    finally:
        engine.shutdown()
    return results


def bench_transformers(cfg: BenchConfig, path: Path, prompts: dict[int, list[list[int]]]) -> dict[int, dict]:
    from transformers import AutoModelForCausalLM

    device = torch.device(cfg.device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype]).to(device).eval()
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    results: dict[int, dict] = {batch: {} for batch in cfg.batch_sizes}
    failed: set[str] = set()  # a cache that failed once (e.g. torch.compile) is not retried at other sizes
    try:
        for batch in cfg.batch_sizes:
            input_ids = torch.tensor(prompts[batch], device=device)
            for cache in cfg.peer_caches:
                if cache in failed:
                    results[batch][cache] = {"error": "skipped: failed at a smaller batch size"}
                    continue
                def run(n: int, input_ids: torch.Tensor = input_ids, cache: str = cache) -> None:
                    extra = {"cache_implementation": "static"} if cache == "static" else {}
                    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
                                         **extra)
                    assert out.shape == (input_ids.shape[0], input_ids.shape[1] + n), f"{out.shape=} {n=}"

                try:
                    timing = decode_timing(run, batch=batch, new_tokens=cfg.new_tokens,
                                           repeats=cfg.peer_repeats, device=device)
                except Exception as exc:  # noqa: BLE001 - a failing peer cache is a result, not a crash
                    results[batch][cache] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    failed.add(cache)
                    print(f"  transformers {cache:7s} batch {batch:3d}: FAILED {type(exc).__name__}: "
                          f"{str(exc)[:200]}", flush=True)
                    continue
                results[batch][cache] = timing
                print(f"  transformers {cache:7s} batch {batch:3d}: {timing['tokens_per_s']:10.1f} tok/s "
                      f"({timing['step_s'] * 1e3:.2f} ms/step, first call {timing['first_call_s']:.1f} s)",
                      flush=True)
    finally:
        del model
        gc.collect()
        torch._dynamo.reset()  # compiled graphs of the static cache hold CUDA-graph memory pools
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def best_peer(peer: dict[str, dict]) -> tuple[str | None, dict | None]:
    ok = {cache: r for cache, r in peer.items() if "tokens_per_s" in r and r["tokens_per_s"] > 0}
    if not ok:
        return None, None
    cache = max(ok, key=lambda c: ok[c]["tokens_per_s"])
    return cache, ok[cache]


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':14s} {'batch':>5s} {'colocate tok/s':>14s} {'transformers tok/s':>24s} "
              f"{'speedup':>8s} {'step ms':>8s} {'floor ms':>8s} {'% floor':>8s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        cache, peer = r["peer_cache"], r["peer"]
        peer_txt = f"{peer['tokens_per_s']:.1f} ({cache})" if peer else "n/a"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "n/a"
        print(f"{r['model']:14s} {r['batch']:5d} {r['colocate']['tokens_per_s']:14.1f} {peer_txt:>24s} "
              f"{speedup:>8s} {r['colocate']['step_s'] * 1e3:8.3f} {r['floor']['step_s'] * 1e3:8.3f} "
              f"{100 * r['fraction_of_floor']:7.1f}%")


def run_bench(cfg: BenchConfig) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "method": "decode step = (t(max_new_tokens=N) - t(max_new_tokens=1)) / (N - 1), median of repeats "
                  "after one warm-up call of each length; tok/s = batch / step; floor = (weights except "
                  "embedding + B embedding rows + LM head + KV at context prompt_len + N/2) / copy bandwidth",
        "results": [],
    }
    try:
        import transformers
        report["transformers"] = transformers.__version__
    except ImportError:
        report["transformers"] = None
        cfg.peer_caches = []
    bandwidth = copy_bandwidth(device, cfg.copy_mib << 20)
    report["copy_bandwidth_bytes_per_s"] = bandwidth
    print(f"{report['device']}: device copy {bandwidth / 1e9:.1f} GB/s (read + write, {cfg.copy_mib} MiB)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        for name in cfg.models:
            print(f"{name}:", flush=True)
            path = save_preset(name, Path(tmp) / name, seed=cfg.seed, dtype=DTYPES[cfg.dtype], device=device)
            vocab = preset_config(name).vocab_size
            prompts = {b: make_prompts(vocab, b, cfg.prompt_len, cfg.seed) for b in cfg.batch_sizes}
            ours = bench_colocate(cfg, path, prompts, bandwidth)
            peers = bench_transformers(cfg, path, prompts) if cfg.peer_caches else {b: {} for b in cfg.batch_sizes}
            for batch in cfg.batch_sizes:
                cache, peer = best_peer(peers[batch])
                row = {"model": name, "batch": batch, **ours[batch], "transformers": peers[batch],
                       "peer_cache": cache, "peer": peer,
                       "speedup": ours[batch]["colocate"]["tokens_per_s"] / peer["tokens_per_s"] if peer else None}
                row["peer_fraction_of_floor"] = row["floor"]["step_s"] / peer["step_s"] if peer else None
                report["results"].append(row)
            # After each model, so a run cut short still leaves its results.
            write_json(report, out=cfg.out, name=_JSON_NAME, default=None)
    return report


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    d = BenchConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(d["models"].default_factory()), help="comma-separated presets")
    p.add_argument("--batch-sizes", default=",".join(map(str, d["batch_sizes"].default_factory())))
    p.add_argument("--new-tokens", type=int, default=d["new_tokens"].default)
    p.add_argument("--prompt-len", type=int, default=d["prompt_len"].default)
    p.add_argument("--repeats", type=int, default=d["repeats"].default)
    p.add_argument("--peer-repeats", type=int, default=d["peer_repeats"].default)
    p.add_argument("--peer-caches", default=",".join(_CACHES),
                   help="transformers caches to try, comma-separated; '' skips transformers")
    p.add_argument("--device", default=d["device"].default)
    p.add_argument("--dtype", default=d["dtype"].default)
    p.add_argument("--kv-cache-fraction", type=float, default=d["kv_cache_fraction"].default)
    p.add_argument("--max-model-len", type=int, default=d["max_model_len"].default)
    p.add_argument("--copy-mib", type=int, default=d["copy_mib"].default, help="0: 2048 on CUDA, 64 on CPU")
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--out", default=d["out"].default, help="JSON path, unless $OUT is set ($OUT/bench_engine.json)")
    a = p.parse_args(argv)

    def items(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    return BenchConfig(models=items(a.models), batch_sizes=[int(b) for b in items(a.batch_sizes)],
                       new_tokens=a.new_tokens, prompt_len=a.prompt_len, repeats=a.repeats,
                       peer_repeats=a.peer_repeats, peer_caches=items(a.peer_caches), device=a.device,
                       dtype=a.dtype, kv_cache_fraction=a.kv_cache_fraction, max_model_len=a.max_model_len,
                       copy_mib=a.copy_mib, seed=a.seed, out=a.out)


def main() -> None:
    cfg = parse_args()
    report = run_bench(cfg)
    path = write_json(report, out=cfg.out, name=_JSON_NAME, default=None)
    print(f"\nwrote {path}")
    print_table(report["results"])


if __name__ == "__main__":
    main()
