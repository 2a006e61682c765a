"""Sleep/wake of the colocate engine against the PCIe floor, naive per-tensor offload and torch_memory_saver.

    PYTHONPATH=. python scripts/bench_sleep_wake.py                                   # GPU: qwen2.5-1.5b, 5 cycles
    PYTHONPATH=. python scripts/bench_sleep_wake.py --device cpu --model tiny --cycles 2   # smoke test
    cat scripts/bench_sleep_wake.py | PYTHONPATH=. python - --device cpu --model tiny --cycles 2   # from stdin

Method. One engine runs `--cycles` cycles of each kind (all tags to cpu, all to meta, kv_cache
alone, weights alone to cpu, weights alone to meta): release; resume all but the graphs (for
meta, `update_weights` from a pinned host copy); graph capture, timed apart; then greedy tokens of
a fixed batch, which must equal those before the first cycle. Wall clock, device synchronised
around each call; the first cycle is reported apart from the steady state (median of the rest).
Memory left while paused: free memory before the engine minus free memory after a full release,
as a share of the engine's awake footprint. Floor: pinned copies of the weights' size, H2D and
D2H, measured in the same run. Peers on the same shape: naive per-tensor `.cpu()`/`.cuda()`,
torch_memory_saver (in a subprocess: it swaps the allocator), and the first use of
`Module.to_empty` against `FlatParameters.materialize` in fresh processes, warm and cold.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from colocate import Engine, EngineConfig
from colocate.memory import TAGS, MemoryReport
from colocate.model import preset_config

try:
    import benchlib  # noqa: F401 - run as a file, Python put this folder first on sys.path
except ModuleNotFoundError:  # piped from stdin, it put the working directory there instead: try its scripts/
    sys.path.insert(0, str(Path.cwd() / "scripts"))
from benchlib.checks import GreedyCheck
from benchlib.config import DeviceDtypeMixin
from benchlib.device import baseline_free, empty_cache
from benchlib.engine_internals import engine_has_cuda_graphs, engine_host_weights, host_arena_num_allocations
from benchlib.floors import NEEDS_CUDA, pcie_bandwidth
from benchlib.measure import FirstSteady, first_and_steady_by_key, timed
from benchlib.peers import first_touch, host_offload
from benchlib.peers.isolated import IsolatedPeer, run_isolated
from benchlib.report import (PEER_COLUMNS, TARGET_COLUMNS, Table, attempt, bench_main, failure, ms, new_report,
                             peer_cells, peer_row, target_cells, target_row, write_json)

_PEERS = ("naive", "tms", "to_empty", "flat")
_MAX_LEFTOVER_FRACTION = 0.01  # the target: at most 1% of the awake footprint
_SHORT = {"kv_cache": "kv", "weights": "w", "cuda_graph": "graph"}
_JSON_NAME = "bench_sleep_wake.json"  # under $OUT, when it is set
_HELPS = {"model": "a preset name (weights drawn on the device)", "dtype": "auto: bfloat16 on CUDA, float32 on CPU",
          "peers": "comma-separated subset of peers; '' for none",
          "out": "JSON path, unless $OUT is set ($OUT/bench_sleep_wake.json)"}


@dataclass(kw_only=True)
class BenchConfig(DeviceDtypeMixin):
    model: str = "qwen2.5-1.5b"
    device: str = "cuda"
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    kv_cache_fraction: float = 0.5
    max_num_seqs: int = 64
    max_model_len: int = 2048
    cycles: int = 5  # per kind: the first, then the steady state (median of the rest)
    num_prompts: int = 8  # greedy check batch
    new_tokens: int = 16
    copy_repeats: int = 5
    peers: list[str] = field(default_factory=lambda: list(_PEERS))
    peer_timeout_s: float = 300.0
    seed: int = 0
    fixed_addresses: bool = False  # EngineConfig.fixed_addresses: graphs kept across cycles (CUDA)
    out: str = "out/bench_sleep_wake.json"

    def __post_init__(self) -> None:
        preset_config(self.model)  # presets only: weights are drawn on the device, no checkpoint to read
        self.check_device_dtype()
        if self.cycles < 2:
            raise ValueError(f"cycles={self.cycles} must be >= 2: the first cycle is reported apart from the rest")
        if self.num_prompts < 1 or self.new_tokens < 1 or self.copy_repeats < 1:
            raise ValueError(f"num_prompts={self.num_prompts}, new_tokens={self.new_tokens} and "
                             f"copy_repeats={self.copy_repeats} must all be >= 1")
        bad = [p for p in self.peers if p not in _PEERS]
        if bad:
            raise ValueError(f"unknown peers {bad}; choose from {list(_PEERS)} or pass --peers '' for none")


# -- colocate: `cycles` cycles of each kind, in this order -----------------------------------
_KINDS = {  # kind: (tags released, where the weights go)
    "all_cpu": (TAGS, "cpu"), "all_meta": (TAGS, "meta"), "kv_cache": (("kv_cache", "cuda_graph"), "cpu"),
    "weights_cpu": (("weights", "cuda_graph"), "cpu"), "weights_meta": (("weights", "cuda_graph"), "meta")}


def _report_metrics(prefix: str, report: MemoryReport) -> dict[str, Any]:
    m: dict[str, Any] = {f"{prefix}_report_s": report.seconds, f"{prefix}_report": report.to_dict()}
    for tag, r in report.tags.items():
        m[f"{prefix}_{tag}_s"] = r.seconds
        m[f"{prefix}_{tag}_bytes"] = r.device_bytes
    return m


def run_cycle(engine: Engine, *, release_tags: tuple[str, ...], weights_to: str,
              weights: list[tuple[str, torch.Tensor]], check: Callable[[], bool], free_base: int | None,
              ) -> dict[str, Any]:
    """Release `release_tags`, resume them with the graphs last (meta: update from host first), check outputs."""
    device = engine.config.torch_device
    m: dict[str, Any] = {}
    m["release_s"], report = timed(lambda: engine.release_memory(release_tags, weights_to=weights_to), device)
    m.update(_report_metrics("release", report))
    if free_base is not None:
        m["leftover_bytes"] = free_base - torch.cuda.mem_get_info(device)[0]
    resume_tags = tuple(t for t in release_tags if t != "cuda_graph")
    m["resume_s"], report = timed(lambda: engine.resume_memory(resume_tags), device)
    m.update(_report_metrics("resume", report))
    if weights_to == "meta" and "weights" in release_tags:
        # A host-to-device refill standing in for the trainer's update; the IPC path is measured elsewhere.
        m["update_from_host_s"], _ = timed(lambda: engine.update_weights(weights), device)
    m["graph_capture_s"], _ = timed(lambda: engine.resume_memory(("cuda_graph",)), device)
    m["greedy_equal"] = check()
    return m


def bench_colocate(cfg: BenchConfig) -> dict[str, Any]:
    device = cfg.torch_device
    free_base = baseline_free(device, cfg.torch_dtype) if cfg.is_cuda else None
    build_s, engine = timed(lambda: Engine(EngineConfig(
        model=cfg.model, device=cfg.device, dtype=cfg.dtype, kv_cache_fraction=cfg.kv_cache_fraction,
        max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len, seed=cfg.seed,
        fixed_addresses=cfg.fixed_addresses)), device)
    try:
        greedy = GreedyCheck(vocab_size=preset_config(cfg.model).vocab_size, num_prompts=cfg.num_prompts,
                             new_tokens=cfg.new_tokens, seed=cfg.seed)
        first_generate_s, reference = timed(lambda: greedy(engine), device)
        awake_bytes = engine.memory_status()["device_bytes"]
        out: dict[str, Any] = {"engine_build_s": build_s, "first_generate_s": first_generate_s,
                               "weights_bytes": awake_bytes["weights"], "kv_cache_bytes": awake_bytes["kv_cache"],
                               "cuda_graphs": engine_has_cuda_graphs(engine)}
        if free_base is not None:
            out["device_free_base_bytes"] = free_base
            out["footprint_bytes"] = free_base - torch.cuda.mem_get_info(device)[0]
        out["host_copy_s"], weights = timed(lambda: engine_host_weights(engine), device)  # pinning: slow, once
        out["num_weight_tensors_hf"] = len(weights)
        out["cycles"], out["summary"] = {}, {}
        for kind, (tags, weights_to) in _KINDS.items():
            cycles = [run_cycle(engine, release_tags=tags, weights_to=weights_to, weights=weights,
                                check=lambda: greedy(engine) == reference,
                                free_base=free_base if tags == TAGS else None) for _ in range(cfg.cycles)]
            out["cycles"][kind] = cycles
            out["summary"][kind] = summary = first_and_steady_by_key(cycles)
            rel, res = summary["release_s"], summary["resume_s"]
            print(f"  colocate {kind:12s} release {ms(rel['first'])} / {ms(rel['steady'])} ms"
                  f"  resume {ms(res['first'])} / {ms(res['steady'])} ms (first / steady)"
                  f"  greedy equal: {all(c['greedy_equal'] for c in cycles)}", flush=True)
        out["host_arena_allocations"] = host_arena_num_allocations(engine)
        out["memory_status_end"] = engine.memory_status()
        return out
    finally:
        engine.shutdown()


# -- peers -----------------------------------------------------------------------------------
def bench_peers(cfg: BenchConfig, *, kv_bytes: int) -> dict[str, Any]:
    """Naive offload here (the engine is gone); torch_memory_saver and first use each in a fresh interpreter."""
    peers: dict[str, Any] = {}
    shape = {"model": cfg.model, "device": cfg.device, "dtype": cfg.dtype, "max_model_len": cfg.max_model_len,
             "num_cycles": cfg.cycles, "seed": cfg.seed}
    if "naive" in cfg.peers:
        print("  peer naive ...", flush=True)
        peers["naive"] = attempt(lambda: host_offload.measure(
            cfg.model, device=cfg.torch_device, dtype=cfg.torch_dtype, max_positions=cfg.max_model_len,
            seed=cfg.seed, num_cycles=cfg.cycles), label="peer naive")
    if "tms" in cfg.peers:
        print("  peer torch_memory_saver (subprocess) ...", flush=True)
        peers["tms"] = (run_isolated(IsolatedPeer(kind="tms", kv_bytes=kv_bytes, **shape),
                                     timeout_s=cfg.peer_timeout_s) if cfg.is_cuda else {"skipped": NEEDS_CUDA})
    for kind in first_touch.PATHS:
        if kind in cfg.peers:
            print(f"  peer first {kind} (fresh subprocesses) ...", flush=True)
            peers[kind] = {"warm": run_isolated(IsolatedPeer(kind=kind, **shape), timeout_s=cfg.peer_timeout_s),
                           "cold": (run_isolated(IsolatedPeer(kind=kind, is_cold=True, **shape),
                                                 timeout_s=cfg.peer_timeout_s)
                                    if cfg.is_cuda else {"skipped": NEEDS_CUDA})}  # no CUDA to initialise on CPU
    return peers


# -- the tables ------------------------------------------------------------------------------
_ROWS = [  # operation, kind, metric, floor (of the PCIe floor; 0.0: no bytes move), target seconds
    ("release all, weights->cpu", "all_cpu", "release_s", "d2h_s", 0.080),
    ("resume weights+kv from cpu (no graphs)", "all_cpu", "resume_s", "h2d_s", 0.100),
    ("release all, weights->meta", "all_meta", "release_s", 0.0, 0.020),
    ("resume weights+kv after meta (alloc only)", "all_meta", "resume_s", 0.0, None),
    ("update_weights from host (not the IPC path)", "all_meta", "update_from_host_s", "h2d_s", None),
    ("graph capture on resume (not in targets)", "all_cpu", "graph_capture_s", None, None),
    ("release kv_cache (+graphs)", "kv_cache", "release_s", 0.0, None),
    ("resume kv_cache", "kv_cache", "resume_s", 0.0, None),
    ("release weights->cpu (+graphs)", "weights_cpu", "release_s", "d2h_s", None),
    ("resume weights from cpu", "weights_cpu", "resume_s", "h2d_s", None),
    ("release weights->meta (+graphs)", "weights_meta", "release_s", 0.0, None),
    ("resume weights after meta (alloc only)", "weights_meta", "resume_s", 0.0, None),
]


def _get(summary: dict[str, Any], kind: str, key: str) -> FirstSteady:
    return summary.get(kind, {}).get(key, {"first": None, "steady": None})


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Rows of the final tables: colocate against floor and target, then against each peer."""
    col, floor = report["colocate"], report["floor"]
    s = col["summary"]
    rows = []
    for label, kind, metric, floor_key, target_s in _ROWS:
        floor_s = floor.get(floor_key) if isinstance(floor_key, str) else floor_key
        prefix = metric.removesuffix("_s")
        tags = {t: _get(s, kind, f"{prefix}_{t}_s")["steady"] for t in TAGS}  # release / resume only
        rows.append({**target_row(label, _get(s, kind, metric), floor_s=floor_s, target_s=target_s),
                     "steady_report_s": _get(s, kind, f"{prefix}_report_s")["steady"],
                     "steady_tag_report_s": {t: x for t, x in tags.items() if x is not None}})
    leftover = None
    if "footprint_bytes" in col:
        left, left_meta = _get(s, "all_cpu", "leftover_bytes"), _get(s, "all_meta", "leftover_bytes")
        worst = max(x for v in (left, left_meta) for x in v.values() if x is not None)
        leftover = {"footprint_bytes": col["footprint_bytes"], "cpu": left, "meta": left_meta,
                    "worst_bytes": worst, "worst_fraction": worst / col["footprint_bytes"],
                    "meets_target": worst <= _MAX_LEFTOVER_FRACTION * col["footprint_bytes"]}
    peers, peer_rows = report["peers"], []
    rel, res = _get(s, "all_cpu", "release_s"), _get(s, "all_cpu", "resume_s")
    naive, tms = peers.get("naive", {}), peers.get("tms", {})
    if "summary" in naive:
        peer_rows.append(peer_row("release all, weights->cpu", rel, "naive .cpu() per tensor",
                                  naive["summary"]["offload_s"]))
        peer_rows.append(peer_row("resume from cpu", res, "naive .cuda() per tensor", naive["summary"]["onload_s"]))
    if "summary" in tms:
        peer_rows.append(peer_row("release all, weights->cpu", rel, "torch_memory_saver pause kv+weights",
                                  tms["summary"]["pause_s"]))
        peer_rows.append(peer_row("resume from cpu", res, "torch_memory_saver resume weights+kv",
                                  tms["summary"]["resume_s"]))
    warm = peers.get("to_empty", {}).get("warm", {})
    if "later_s" in warm:
        peer_rows.append(peer_row("release all, weights->meta", _get(s, "all_meta", "release_s"),
                                  "to('meta') + empty_cache",
                                  {"first": warm["cycles"][0]["to_meta_s"], "steady": warm["to_meta_s"]}))
        peer_rows.append(peer_row("resume weights+kv after meta", _get(s, "all_meta", "resume_s"),
                                  "to_empty (fresh process)", {"first": warm["first_s"], "steady": warm["later_s"]}))
    return {"rows": rows, "leftover": leftover, "peer_rows": peer_rows}


_TARGETS = Table([*TARGET_COLUMNS, ("report", ">7")], last="per tag (report, steady)")
_VS_PEERS = Table(PEER_COLUMNS)


def print_tables(report: dict[str, Any]) -> None:
    summary, col, floor, peers = report["summary"], report["colocate"], report["floor"], report["peers"]
    print(f"\n{report['device']}  {report['config']['model']} {report['config']['dtype']}  weights "
          f"{col['weights_bytes'] / 1e9:.3f} GB, KV {col['kv_cache_bytes'] / 1e9:.2f} GB  "
          f"(times in ms, first / steady = median of cycles 2..{report['config']['cycles']})")
    if "h2d_s" in floor:
        print(f"PCIe pinned: H2D {floor['h2d_bytes_per_s'] / 1e9:.1f} GB/s, "
              f"D2H {floor['d2h_bytes_per_s'] / 1e9:.1f} GB/s")
    else:
        print(f"PCIe floor: {failure(floor)}")
    print(_TARGETS.header())
    print("-" * len(_TARGETS.header()))
    for r in summary["rows"]:
        tags = " ".join(f"{_SHORT[t]} {ms(v)}" for t, v in r["steady_tag_report_s"].items())
        print(_TARGETS.row([*target_cells(r), ms(r["steady_report_s"])], last=tags))
    lo = summary["leftover"]
    if lo:
        print(f"device memory left while paused: worst {lo['worst_bytes'] / 2**20:.1f} MiB = "
              f"{100 * lo['worst_fraction']:.3f}% of the {lo['footprint_bytes'] / 2**30:.2f} GiB footprint "
              f"(target <= {100 * _MAX_LEFTOVER_FRACTION:.0f}%: {'yes' if lo['meets_target'] else 'NO'})")
    else:
        print(f"device memory left while paused: skipped: {NEEDS_CUDA}")
    tms = peers.get("tms", {})
    if "summary" in tms:
        t = tms["summary"]["leftover_bytes"]["steady"]
        print(f"torch_memory_saver left while paused: {t / 2**20:.1f} MiB = {100 * t / tms['footprint_bytes']:.3f}% "
              f"of its {tms['footprint_bytes'] / 2**30:.2f} GiB")
    print("\n" + _VS_PEERS.header())
    for r in summary["peer_rows"]:
        print(_VS_PEERS.row(peer_cells(r)))
    results = {" ".join(filter(None, (name, variant))): r for name, peer in peers.items()
               for variant, r in (peer.items() if name in first_touch.PATHS else [("", peer)])}
    for label, r in results.items():
        if (why := failure(r)) is not None:
            print(f"peer {label}: {why}")
    first_touch.print_table({label: r for label, r in results.items() if "first_s" in r})
    if not report["all_greedy_equal"]:
        print("GREEDY OUTPUTS CHANGED across a sleep/wake cycle: see colocate.cycles[*][*].greedy_equal")


# -- driver ----------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    report = new_report(cfg, doc=__doc__)
    print(f"{report['device']}: {cfg.model} {cfg.dtype}, {cfg.cycles} cycles per kind", flush=True)
    report["colocate"] = col = bench_colocate(cfg)
    report["all_greedy_equal"] = all(c["greedy_equal"] for cycles in col["cycles"].values() for c in cycles)
    write_json(report, out=cfg.out, name=_JSON_NAME)
    empty_cache(cfg.torch_device)
    report["floor"] = pcie_bandwidth(col["weights_bytes"], cfg.torch_device, repeats=cfg.copy_repeats)
    report["peers"] = bench_peers(cfg, kv_bytes=col["kv_cache_bytes"])
    report["summary"] = summarize(report)
    return report


def main() -> None:
    bench_main(BenchConfig, __doc__, helps=_HELPS, run=run_bench, print_report=print_tables, json_name=_JSON_NAME,
               check=("all_greedy_equal", "greedy outputs changed across a sleep/wake cycle (details in the JSON)"))

if __name__ == "__main__":
    main()
