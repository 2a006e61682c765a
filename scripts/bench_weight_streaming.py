"""Decode with part of the weights streamed from pinned host memory (EngineConfig.weights_offload), against its floor.

    cd scripts && python bench_weight_streaming.py                    # GPU: qwen2.5-1.5b and llama-3-8b shapes
    cd scripts && python bench_weight_streaming.py --device cpu --models tiny --batches 1,4 --offloads 0,0.5,1
    cd scripts && cat bench_weight_streaming.py | python - --device cpu --models tiny --batches 1,4

Method. Per shape, one in-process engine per (offload, prefetch), random preset weights (seed 0), freed
before the next. Decode tokens/s per batch size as benchlib.model_measures.decode_throughput (greedy, EOS
ignored; a step = (t(N) - t(1)) / (N - 1)), decode CUDA graphs on, copies of the streamed layers captured in
them. Floor of a step = max(resident floor, streamed floor): the bytes the step reads from device memory
(resident weights, the streamed layers once from their staging slots, the KV cache) / the HBM read+write
bandwidth of a device copy in this run, and the streamed layers' bytes / the pinned host-to-device bandwidth
measured in this run. `prefetch 1` is the no-prefetch peer: one staging slot, so a streamed layer's copy
waits for the layer before it to finish (copy then compute). Check: every engine's greedy tokens equal the
resident engine's. Demonstration (`--budget-model`): the model's greedy tokens resident, then with
`--budget-offload` under a device budget of `--budget-gib` for weights plus the KV cache (enforced with
torch.cuda.set_per_process_memory_fraction from the end of the load on, NVML's used memory recorded);
the tokens must match.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from colocate import Engine, EngineConfig
from colocate.model import PRESETS, preset_config

try:
    import benchlib  # noqa: F401 - run as a file, Python put this folder first on sys.path
except ModuleNotFoundError:  # piped from stdin, it put the working directory there instead: try its scripts/
    sys.path.insert(0, str(Path.cwd() / "scripts"))
from benchlib.checks import GreedyCheck
from benchlib.config import DeviceDtypeMixin
from benchlib.device import free_device
from benchlib.floors import hbm_bandwidth, pcie_bandwidth
from benchlib.measure import timed
from benchlib.model_measures import decode_step_bytes, decode_throughput, kv_bytes_per_token
from benchlib.report import Table, attempt, bench_main, failure, ms, new_report, ratio, run_per_model

_JSON_NAME = "bench_weight_streaming.json"
_TARGETS = {"x_floor_where_streaming_dominates": 1 / 0.85, "offload_0.25_batch_256_over_resident": 1.3}
_HELPS = {"models": "comma-separated preset names", "batches": "comma-separated decode batch sizes",
          "offloads": "weights_offload fractions, comma-separated", "no_prefetch_offloads": "offloads also run with "
          "weights_prefetch=1 (copy then compute)", "budget_model": "the demonstration's preset ('' skips it)",
          "out": "JSON path, unless $OUT is set"}


@dataclass(kw_only=True)
class BenchConfig(DeviceDtypeMixin):
    models: list[str] = field(default_factory=lambda: ["qwen2.5-1.5b", "llama-3-8b"])
    device: str = "cuda"
    dtype: str = "auto"
    batches: list[str] = field(default_factory=lambda: ["1", "64", "256"])
    offloads: list[str] = field(default_factory=lambda: ["0", "0.25", "0.5", "0.75", "1"])
    no_prefetch_offloads: list[str] = field(default_factory=lambda: ["0.5", "1"])
    prefetch: int = 2
    prompt_len: int = 32
    new_tokens: int = 32
    floor_repeats: int = 10
    budget_model: str = "llama-3-8b"
    budget_offload: float = 0.625
    budget_gib: float = 8.0
    seed: int = 0
    out: str = "out/bench_weight_streaming.json"

    def __post_init__(self) -> None:
        if not self.models or any(m not in PRESETS for m in self.models + [self.budget_model or self.models[0]]):
            raise ValueError(f"models={self.models}, budget_model={self.budget_model!r}: preset names from "
                             f"{sorted(PRESETS)}")
        self.check_device_dtype()
        for name in ("batches", "offloads", "no_prefetch_offloads"):
            try:
                values = [float(x) for x in getattr(self, name)]
            except ValueError:
                values = [-1.0]
            if (name != "no_prefetch_offloads" and not values) or any(v < 0 for v in values) or \
                    (name == "batches" and any(v < 1 or v != int(v) for v in values)) or \
                    (name != "batches" and any(v > 1 for v in values)):
                want = "positive integers" if name == "batches" else "fractions from 0 to 1"
                raise ValueError(f"{name}={getattr(self, name)}: pass {want}, comma-separated")
        if self.new_tokens < 2 or self.prompt_len < 1 or self.prefetch < 1:
            raise ValueError("new_tokens must be >= 2; prompt_len and prefetch >= 1")

    def engine_config(self, model: str, offload: float, prefetch: int) -> EngineConfig:
        batch = max(int(b) for b in self.batches + ["8"])
        max_len = self.prompt_len + self.new_tokens + 16
        blocks = batch * (-(-max_len // 16) + 1) + 2
        return EngineConfig(model=model, device=self.device, dtype=self.dtype, seed=self.seed, max_model_len=max_len,
                            max_num_seqs=batch, weights_offload=offload, weights_prefetch=prefetch,
                            kv_cache_bytes=blocks * 16 * kv_bytes_per_token(preset_config(model), self.torch_dtype))


def bench_engine(cfg: BenchConfig, model: str, offload: float, prefetch: int, greedy: GreedyCheck,
                 reference: list | None) -> dict[str, Any]:
    free_device(cfg.torch_device)
    build_s, engine = timed(lambda: Engine(cfg.engine_config(model, offload, prefetch)), cfg.torch_device)
    try:
        status = engine.memory_status()
        tokens = greedy(engine)
        out = {"offload": offload, "prefetch": prefetch, "build_s": build_s, "tokens": tokens,
               "resident_bytes": status["device_bytes"]["weights"],
               "staging_bytes": status["device_bytes"].get("weights_staging", 0),
               "streamed_bytes": status["host_bytes"].get("weights_offloaded", 0),
               "layers_streamed": [] if engine.runner.streamer is None else engine.runner.streamer.indices,
               "same_tokens_as_resident": reference is None or tokens == reference}
        out["decode"] = {b: decode_throughput(engine, int(b), prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens,
                                              seed=cfg.seed) for b in cfg.batches}
        print(f"  {model} offload {offload} prefetch {prefetch}: tok/s " + ", ".join(
            f"{b}: {d['tokens_per_s']:.0f}" for b, d in out["decode"].items()) +
            f"; same tokens {out['same_tokens_as_resident']}", flush=True)
        return out
    finally:
        engine.shutdown()
        free_device(cfg.torch_device)


def bench_model(cfg: BenchConfig, model: str, floors: dict[str, Any]) -> dict[str, Any]:
    greedy = GreedyCheck(vocab_size=preset_config(model).vocab_size, num_prompts=8, new_tokens=16, seed=cfg.seed)
    runs, reference = [], None
    plan = [(float(f), cfg.prefetch) for f in cfg.offloads] + [(float(f), 1) for f in cfg.no_prefetch_offloads]
    if (0.0, cfg.prefetch) in plan:  # the resident engine first: its tokens are the reference
        plan.remove((0.0, cfg.prefetch))
        plan.insert(0, (0.0, cfg.prefetch))
    for offload, prefetch in plan:
        run = attempt(lambda: bench_engine(cfg, model, offload, prefetch, greedy, reference),
                      label=f"{model} offload {offload} prefetch {prefetch}")
        if offload == 0 and "tokens" in run:
            reference = run["tokens"]
        runs.append(run)
    return {"model": model, "runs": runs, "rows": rows(cfg, model, runs, floors)}


def rows(cfg: BenchConfig, model: str, runs: list[dict[str, Any]], floors: dict[str, Any]) -> list[dict[str, Any]]:
    hbm, h2d = floors["hbm"].get("read_write_bytes_per_s"), floors["pcie"].get("h2d_bytes_per_s")
    resident = {b: d["step_s"] for r in runs if r.get("offload") == 0 for b, d in r["decode"].items()}
    out = []
    for r in runs:
        for b, d in r.get("decode", {}).items():
            read = decode_step_bytes(preset_config(model), weights_bytes=r["resident_bytes"] + r["streamed_bytes"],
                                     dtype=cfg.torch_dtype, batch=int(b),
                                     mean_context=cfg.prompt_len + cfg.new_tokens / 2)
            resident_floor = read / hbm if hbm else None
            streamed_floor = r["streamed_bytes"] / h2d if h2d else 0.0
            floor = None if resident_floor is None else max(resident_floor, streamed_floor)
            out.append({"offload": r["offload"], "prefetch": r["prefetch"], "batch": int(b), **d,
                        "resident_floor_s": resident_floor, "streamed_floor_s": streamed_floor, "floor_s": floor,
                        "streaming_dominates": resident_floor is not None and streamed_floor > resident_floor,
                        "x_floor": ratio(d["step_s"], floor), "x_resident": ratio(d["step_s"], resident.get(b)),
                        "same_tokens": r["same_tokens_as_resident"]})
    return out


def demonstration(cfg: BenchConfig) -> dict[str, Any]:
    """The model resident, then streamed under a device budget: same greedy tokens, the budget held."""
    device, model = cfg.torch_device, cfg.budget_model
    greedy = GreedyCheck(vocab_size=preset_config(model).vocab_size, num_prompts=8, new_tokens=32, seed=cfg.seed)
    engine = Engine(cfg.engine_config(model, 0.0, cfg.prefetch))
    try:
        resident, resident_bytes = greedy(engine), engine.memory_status()["device_bytes"]["weights"]
        kv = engine.memory_status()["device_bytes"]["kv_cache"]
    finally:
        engine.shutdown()
    free_device(device)
    out: dict[str, Any] = {"model": model, "offload": cfg.budget_offload, "budget_bytes": int(cfg.budget_gib * 2**30),
                           "resident_weights_bytes": resident_bytes, "kv_cache_bytes": kv}
    if not cfg.is_cuda:
        engine = Engine(cfg.engine_config(model, cfg.budget_offload, cfg.prefetch))
        try:
            return out | {"same_tokens": greedy(engine) == resident, "budget": "not enforced on CPU"}
        finally:
            engine.shutdown()
    index = device.index if device.index is not None else torch.cuda.current_device()  # the fraction wants one
    total = torch.cuda.get_device_properties(index).total_memory
    limit = out["budget_bytes"] + kv + (1 << 30)  # + 1 GiB for activations, graphs' pool and cuBLAS workspaces
    # The budget binds the rollout: set once the engine is built, because a random preset's load draws each
    # tensor in float32 on the device first (the embedding alone: 2 GiB on this shape), which a checkpoint
    # load does not. The load's own peak is reported beside it.
    torch.cuda.reset_peak_memory_stats(device)
    try:
        engine = Engine(cfg.engine_config(model, cfg.budget_offload, cfg.prefetch))
        out["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.set_per_process_memory_fraction(limit / total, index)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            status = engine.memory_status()["device_bytes"]
            tokens = greedy(engine)
            out |= {"same_tokens": tokens == resident, "weights_bytes": status["weights"] + status["weights_staging"],
                    "limit_bytes": limit, "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                    "nvml_used_bytes": torch.cuda.device_memory_used(device)
                    if hasattr(torch.cuda, "device_memory_used") else None}
            out["weights_within_budget"] = out["weights_bytes"] <= out["budget_bytes"]
        finally:
            engine.shutdown()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        free_device(device)
    return out


_TABLE = Table([("model", "<13"), ("offload", ">7"), ("prefetch", ">8"), ("batch", ">5"), ("tok/s", ">9"),
                ("ms/step", ">8"), ("floor", ">7"), ("x floor", ">7"), ("x resident", ">10")], last="same tokens")


def print_tables(report: dict[str, Any]) -> None:
    floors = report["floors"]
    hbm, pcie = floors["hbm"], floors["pcie"]
    if "read_write_bytes_per_s" in hbm:
        print(f"\n{report['device']}: HBM read+write {hbm['read_write_bytes_per_s'] / 1e12:.2f} TB/s, pinned H2D "
              f"{pcie['h2d_bytes_per_s'] / 1e9:.1f} GB/s; floor = max(step bytes / HBM, streamed bytes / H2D)")
    print(_TABLE.header())
    for m in report["models"]:
        if (why := failure(m)) is not None:
            print(f"{m['model']:13s} ERROR: {why}")
            continue
        for r in m["rows"]:
            print(_TABLE.row([m["model"], f"{r['offload']:.2f}", str(r["prefetch"]), str(r["batch"]),
                              f"{r['tokens_per_s']:.0f}", ms(r["step_s"]), ms(r["floor_s"]), _x(r["x_floor"]),
                              _x(r["x_resident"])], last=str(r["same_tokens"])))
        for r in m["runs"]:
            if (why := failure(r)) is not None:
                print(f"  {m['model']}: {why}")
    d = report.get("demonstration")
    if d:
        print(f"\ndemonstration: {failure(d) or d}")
    print(f"targets: {_TARGETS}")


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    report = new_report(cfg, doc=__doc__)
    report.update(models=[], targets=_TARGETS)
    largest = max(_layer_bytes(m, cfg) for m in cfg.models)  # one layer: the size of a streamed copy
    report["floors"] = {"hbm": hbm_bandwidth(cfg.torch_device, repeats=cfg.floor_repeats),
                        "pcie": pcie_bandwidth(largest, cfg.torch_device, repeats=cfg.floor_repeats)}
    run_per_model(report, cfg.models, lambda model: bench_model(cfg, model, report["floors"]),
                  device=cfg.torch_device, out=cfg.out, json_name=_JSON_NAME)
    if cfg.budget_model:
        report["demonstration"] = attempt(lambda: demonstration(cfg), label="demonstration")
    runs = [r for m in report["models"] for r in m.get("runs", [])]
    report["all_checks_pass"] = (all("error" not in m for m in report["models"]) and runs
                                 and all(r.get("same_tokens_as_resident") for r in runs)
                                 and report.get("demonstration", {}).get("same_tokens", True) is True)
    return report


def _layer_bytes(model: str, cfg: BenchConfig) -> int:
    c = preset_config(model)
    params = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + 3 * c.hidden_size * \
        c.intermediate_size
    return params * cfg.torch_dtype.itemsize


def main() -> None:
    bench_main(BenchConfig, __doc__, helps=_HELPS, run=run_bench, print_report=print_tables, json_name=_JSON_NAME,
               check=("all_checks_pass", "a streamed engine's tokens differed, or a run errored (details in the JSON)"))


if __name__ == "__main__":
    main()
