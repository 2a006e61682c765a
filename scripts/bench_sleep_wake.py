"""Sleep/wake of the colocate engine against the PCIe floor, naive per-tensor offload and torch_memory_saver.

    PYTHONPATH=. python scripts/bench_sleep_wake.py                                   # H100: qwen2.5-1.5b, 5 cycles
    PYTHONPATH=. python scripts/bench_sleep_wake.py --device cpu --model tiny --cycles 2   # smoke test

Method. One process builds the engine (random weights drawn on the device) and runs `--cycles`
cycles of each kind, in this order: all tags with weights to cpu, all tags with weights to meta,
kv_cache alone, weights alone to cpu, weights alone to meta. A cycle is: release; resume of
everything but the graphs; for meta, `update_weights` from a pinned host copy of the weights made
once at start (a stand-in for the trainer: *not* the CUDA IPC path); graph capture
(`resume_memory(("cuda_graph",))`, timed apart and excluded from the targets); then greedy
generation of a fixed batch, whose token ids must equal those before the first cycle. Every time
is wall clock with the device synchronised before and after the call; the engine's own report
seconds are kept beside it. The first cycle of each kind is reported apart from the steady state
(median of the other cycles); only the first kind's first cycle is the first of the process.

Memory left while paused is the free memory of the device (`torch.cuda.mem_get_info`) before the
engine was built (after a small matmul, so the CUDA context and cuBLAS are not counted) minus the
free memory after a release of every tag, as a share of the engine's awake footprint (free before
minus free after building it and generating once).

Floor. Pinned host-to-device and device-to-host bandwidth of one copy of the weights' size (CUDA
events, median of `--copy-repeats`), measured in the same run after the engine is shut down:
floor = weight bytes / bandwidth. (The qwen2.5-1.5b preset ties its embeddings: 3.09 GB, where the
DESIGN's 64 ms floor assumed 3.55 GB with a separate LM head.)

Peers, on the same model shape and dtype: naive per-tensor offload (`.cpu()` of each tensor under
its HF name, free, `.cuda()` back), in this process after the engine is gone; torch_memory_saver
(weights in a CPU-backed region, a KV-sized tensor of the engine's KV bytes in another), in a
subprocess because it swaps the CUDA allocator; and the first-use cost of `Module.to_empty`
versus `FlatParameters.materialize`, each in fresh subprocesses with and without a CUDA warm-up
(`--peer to_empty|flat [--cold]`), so the first call's time can be split into CUDA initialisation,
allocation and the rest. `to_empty` there runs on colocate's model (fused qkv and gate_up: 198
parameters for qwen2.5-1.5b); the naive peer uses the 338 tensors of the HF layout.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

import colocate
from colocate import Engine, EngineConfig, SamplingParams
from colocate.memory import TAGS, FlatParameters, MemoryReport, materialize_buffers
from colocate.model import build_meta_model, build_model, init_random_weights, preset_config

# benchlib sits beside this script: Python puts the script's folder first on sys.path.
from benchlib import measure
from benchlib.checks import fingerprint
from benchlib.config import DTYPES as _DTYPES, DeviceDtypeMixin
from benchlib.report import ms as _ms, ratio as _ratio, write_json

T = TypeVar("T")
_PEERS = ("naive", "tms", "to_empty", "flat")
_NEEDS_CUDA = "skipped: needs CUDA"
_TARGETS_S = {"release_cpu": 0.080, "release_meta": 0.020, "resume_cpu": 0.100}  # DESIGN.md, steady state
_MAX_LEFTOVER_FRACTION = 0.01
_SHORT = {"kv_cache": "kv", "weights": "w", "cuda_graph": "graph"}
_REPO_ROOT = str(Path(colocate.__file__).resolve().parents[1])
_JSON_NAME = "bench_sleep_wake.json"  # under $OUT, when it is set


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
    out: str = "out/bench_sleep_wake.json"

    def __post_init__(self) -> None:
        preset_config(self.model)  # presets only: weights are drawn on the device, no checkpoint to read
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA device; pass --device cpu")
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.is_cuda else "float32"
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be 'auto' or one of {sorted(_DTYPES)}")
        if self.cycles < 2:
            raise ValueError(f"cycles={self.cycles} must be >= 2: the first cycle is reported apart from the rest")
        if self.num_prompts < 1 or self.new_tokens < 1 or self.copy_repeats < 1:
            raise ValueError(f"num_prompts={self.num_prompts}, new_tokens={self.new_tokens} and "
                             f"copy_repeats={self.copy_repeats} must all be >= 1")
        bad = [p for p in self.peers if p not in _PEERS]
        if bad:
            raise ValueError(f"unknown peers {bad}; choose from {list(_PEERS)} or pass --peers '' for none")


@dataclass(kw_only=True)
class PeerTask:
    """What one peer subprocess measures; the parent sets it through the --peer flags."""

    kind: str  # "tms" | "to_empty" | "flat"
    is_cold: bool = False  # to_empty / flat: no CUDA warm-up first, so the first call pays CUDA initialisation
    kv_bytes: int = 0  # tms: bytes of the KV-sized tensor (the engine's KV cache)
    out: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _PEERS[1:]:
            raise ValueError(f"--peer {self.kind!r} must be one of {list(_PEERS[1:])}")
        if not self.out:
            raise ValueError("--peer needs --peer-out FILE for its JSON result")


# -- timing ----------------------------------------------------------------------------------
def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """`benchlib.timed` whose synchronisations are never the first CUDA call: cold peers pay CUDA init inside."""
    return measure.timed(fn, device, can_init_cuda=False)


def first_and_steady(cycles: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """For every number the cycles recorded: the first cycle's value and the median of the others."""
    keys = dict.fromkeys(k for c in cycles for k, v in c.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    out = {}
    for key in keys:
        rest = [c[key] for c in cycles[1:] if key in c]
        out[key] = {"first": cycles[0].get(key), "steady": statistics.median(rest) if rest else None}
    return out


class CallTimer:
    """Wraps `owner.name` while active and records the host time of every call (allocation calls here)."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name
        self.seconds: list[float] = []

    def __enter__(self) -> CallTimer:
        self.original = getattr(self.owner, self.name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        setattr(self.owner, self.name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.name, self.original)

    def summary(self) -> dict[str, float | int]:
        s = self.seconds
        return {"num_calls": len(s), "total_s": sum(s), "max_s": max(s, default=0.0),
                "first_call_s": s[0] if s else 0.0}


def baseline_free(device: torch.device, dtype: torch.dtype) -> int:
    # CUDA context, cuBLAS handle and workspace exist before the engine: not its footprint.
    a = torch.randn(64, 64, device=device, dtype=dtype)
    (a @ a).sum().item()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


# -- colocate --------------------------------------------------------------------------------
def host_weights(engine: Engine) -> list[tuple[str, torch.Tensor]]:
    """Every weight under its HF name, as views of one (pinned) host copy of the engine's flat buffer."""
    flat = engine.memory.weights
    host = torch.empty(flat.nbytes, dtype=torch.uint8, pin_memory=flat.buffer.is_cuda)
    host.copy_(flat.buffer)
    named = []
    for name, t in engine.runner.model.hf_named_tensors():
        assert t.is_contiguous(), f"{name=} {t.stride()=}"  # fused shards are dim-0 splits
        offset, nbytes = t.data_ptr() - flat.buffer.data_ptr(), t.numel() * t.element_size()
        named.append((name, host[offset: offset + nbytes].view(t.dtype).view(t.shape)))
    return named


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
        max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len, seed=cfg.seed)), device)
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        prompts = torch.randint(0, engine.model_config.vocab_size, (cfg.num_prompts, 16), generator=gen).tolist()
        greedy = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=0.0, ignore_eos=True)

        def tokens() -> list[list[int]]:
            return [o.token_ids for o in engine.generate(prompts, greedy)]

        first_generate_s, reference = timed(tokens, device)
        out: dict[str, Any] = {
            "engine_build_s": build_s, "first_generate_s": first_generate_s,
            "weights_bytes": engine.memory.weights.nbytes, "kv_cache_bytes": engine.runner.kv_cache_nbytes(),
            "num_weight_tensors_hf": sum(1 for _ in engine.runner.model.hf_named_tensors()),
            "cuda_graphs": engine.runner.graphs is not None,
        }
        if free_base is not None:
            out["device_free_base_bytes"] = free_base
            out["footprint_bytes"] = free_base - torch.cuda.mem_get_info(device)[0]
        out["host_copy_s"], weights = timed(lambda: host_weights(engine), device)  # pinning: slow, once
        kinds = {"all_cpu": (TAGS, "cpu"), "all_meta": (TAGS, "meta"), "kv_cache": (("kv_cache", "cuda_graph"), "cpu"),
                 "weights_cpu": (("weights", "cuda_graph"), "cpu"), "weights_meta": (("weights", "cuda_graph"), "meta")}
        out["cycles"], out["summary"] = {}, {}
        for kind, (tags, weights_to) in kinds.items():
            cycles = [run_cycle(engine, release_tags=tags, weights_to=weights_to, weights=weights,
                                check=lambda: tokens() == reference, free_base=free_base if tags == TAGS else None)
                      for _ in range(cfg.cycles)]
            out["cycles"][kind] = cycles
            out["summary"][kind] = first_and_steady(cycles)
            s = out["summary"][kind]
            print(f"  colocate {kind:12s} release {_ms(s['release_s']['first'])} / {_ms(s['release_s']['steady'])} ms"
                  f"  resume {_ms(s['resume_s']['first'])} / {_ms(s['resume_s']['steady'])} ms (first / steady)"
                  f"  greedy equal: {all(c['greedy_equal'] for c in cycles)}", flush=True)
        out["host_arena_allocations"] = engine.memory.arena.num_allocations
        out["memory_status_end"] = engine.memory_status()
        return out
    finally:
        engine.shutdown()


# -- floor -----------------------------------------------------------------------------------
def pcie_bandwidth(nbytes: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Pinned H2D and D2H: one copy of `nbytes`, CUDA events, median of `repeats` after a warm-up copy."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out: dict[str, float] = {"bytes": nbytes}
    for direction, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        seconds = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        out[f"{direction}_s"] = statistics.median(seconds)
        out[f"{direction}_bytes_per_s"] = nbytes / out[f"{direction}_s"]
    del host, dev
    torch.cuda.empty_cache()
    return out


# -- peers in this process -------------------------------------------------------------------
def bench_naive(cfg: BenchConfig) -> dict[str, Any]:
    """Per-tensor `.cpu()` (pageable) + free, then `.cuda()` of each back: what a framework without pools does."""
    device = cfg.torch_device
    model = build_model(preset_config(cfg.model), device=device, dtype=cfg.torch_dtype,
                        max_positions=cfg.max_model_len)
    init_random_weights(model, seed=cfg.seed)
    # One allocation per HF tensor (fused qkv / gate_up split), as an HF-layout model holds them.
    tensors = {name: t.clone() for name, t in model.hf_named_tensors()}
    del model
    gc.collect()
    if cfg.is_cuda:
        torch.cuda.empty_cache()
    before = fingerprint(tensors.values())
    out: dict[str, Any] = {"num_tensors": len(tensors), "bytes": sum(t.numel() * t.element_size()
                                                                       for t in tensors.values())}

    def offload() -> dict[str, torch.Tensor]:
        host = {name: t.to("cpu", copy=True) for name, t in tensors.items()}  # = .cpu(), but copies on CPU too
        tensors.clear()
        if cfg.is_cuda:
            torch.cuda.empty_cache()  # give the memory back to the device, as a release does
        return host

    cycles = []
    for _ in range(cfg.cycles):
        offload_s, host = timed(offload, device)
        onload_s, back = timed(lambda: {name: t.to(device, copy=True) for name, t in host.items()}, device)
        tensors.update(back)
        del host
        cycles.append({"offload_s": offload_s, "onload_s": onload_s,
                       "is_equal": fingerprint(tensors.values()) == before})
    del tensors
    if cfg.is_cuda:
        torch.cuda.empty_cache()
    out["cycles"], out["summary"] = cycles, first_and_steady(cycles)
    return out


# -- peers in subprocesses -------------------------------------------------------------------
def run_peer(cfg: BenchConfig, task: PeerTask) -> dict[str, Any]:
    """Run one peer in a fresh interpreter; its JSON result, or what went wrong."""
    with tempfile.TemporaryDirectory(prefix="bench_sleep_wake_") as tmp:
        task.out = str(Path(tmp) / "peer.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", task.kind, "--peer-out", task.out,
               "--kv-bytes", str(task.kv_bytes), *(["--cold"] if task.is_cold else []), "--model", cfg.model,
               "--device", cfg.device, "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len),
               "--cycles", str(cfg.cycles), "--seed", str(cfg.seed)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")])))
        if task.is_cold:
            # torch.cuda.is_available() (config validation) then asks NVML, not the CUDA runtime, so the
            # first timed call pays all of CUDA's initialisation.
            env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        if task.kind == "tms":
            # torch_memory_saver refuses to start with expandable segments on.
            conf = [c for c in env.get("PYTORCH_CUDA_ALLOC_CONF", "").split(",") if c and "expandable" not in c]
            env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(conf)
            # hook_mode "preload" (its default): allocations outside its regions stay ordinary cudaMalloc;
            # in "torch" mode freeing any tensor made outside a region aborts the process.
            try:
                from torch_memory_saver.utils import get_binary_path_from_package

                env["LD_PRELOAD"] = str(get_binary_path_from_package("torch_memory_saver_hook_mode_preload"))
            except Exception as exc:  # noqa: BLE001 - not installed, or no GPU runtime: the peer reports it
                env["TMS_PRELOAD_ERROR"] = repr(exc)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cfg.peer_timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {cfg.peer_timeout_s} s"}
        result = json.loads(Path(task.out).read_text()) if Path(task.out).exists() else {}
        result["process_wall_s"] = time.perf_counter() - start
        if proc.returncode != 0:
            key = "exit_error" if result and "error" not in result else "error"
            result[key] = f"exit code {proc.returncode}: {proc.stderr[-3000:]}"
        return result


def peer_tms(cfg: BenchConfig, kv_bytes: int) -> dict[str, Any]:
    """torch_memory_saver 0.0.10: weights in a CPU-backed region, a KV-sized tensor in another; pause/resume each."""
    try:
        from torch_memory_saver import torch_memory_saver
    except ImportError as exc:
        return {"error": f"not installed: {exc}"}
    if os.environ.get("TMS_PRELOAD_ERROR"):
        return {"error": f"could not set LD_PRELOAD for torch_memory_saver: {os.environ['TMS_PRELOAD_ERROR']}"}
    torch_memory_saver.hook_mode = "preload"  # the parent set LD_PRELOAD to its hook library
    device = cfg.torch_device
    try:
        version = importlib.metadata.version("torch_memory_saver")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (no package metadata)"
    out: dict[str, Any] = {"version": version, "hook_mode": "preload", "kv_bytes": kv_bytes}
    # In hook_mode "torch" every allocation goes through torch_memory_saver, and freeing one made
    # outside a region aborts ("only support interesting region"): all work here runs in a region.
    scratch = lambda: torch_memory_saver.region(tag="scratch")  # noqa: E731
    with scratch():
        free_base = baseline_free(device, cfg.torch_dtype)
    model = build_meta_model(preset_config(cfg.model), dtype=cfg.torch_dtype, max_positions=cfg.max_model_len)
    with torch_memory_saver.region(tag="weights", enable_cpu_backup=True):
        out["weights_alloc_s"], _ = timed(lambda: model.to_empty(device=device), device)
        model.reset_buffers()
        init_random_weights(model, seed=cfg.seed)
    try:  # pinned (cudaMallocHost) or mmap host shadows: what the weights' pause copies into
        out["cpu_backup_backend"] = torch_memory_saver._impl._binary_wrapper.cdll.tms_get_cpu_backup_backend().decode()
    except Exception as exc:  # noqa: BLE001 - private API; only informative
        out["cpu_backup_backend"] = f"unknown ({type(exc).__name__})"
    with torch_memory_saver.region(tag="kv_cache"):
        out["kv_alloc_s"], kv = timed(lambda: torch.empty(kv_bytes, dtype=torch.uint8, device=device), device)
    torch.cuda.empty_cache()
    out["footprint_bytes"] = free_base - torch.cuda.mem_get_info(device)[0]
    with scratch():
        before = fingerprint(model.parameters())
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    cycles = []
    for _ in range(cfg.cycles):
        m: dict[str, Any] = {}
        torch.cuda.empty_cache()  # our own cached temporaries (the fingerprint's) are not tms's leftover
        m["pause_kv_cache_s"], _ = timed(lambda: torch_memory_saver.pause("kv_cache"), device)
        m["pause_weights_s"], _ = timed(lambda: torch_memory_saver.pause("weights"), device)
        m["leftover_bytes"] = free_base - torch.cuda.mem_get_info(device)[0]
        m["resume_weights_s"], _ = timed(lambda: torch_memory_saver.resume("weights"), device)
        m["resume_kv_cache_s"], _ = timed(lambda: torch_memory_saver.resume("kv_cache"), device)
        m["pause_s"] = m["pause_kv_cache_s"] + m["pause_weights_s"]
        m["resume_s"] = m["resume_weights_s"] + m["resume_kv_cache_s"]
        with scratch():
            m["weights_equal"] = fingerprint(model.parameters()) == before
        cycles.append(m)
    del kv
    out["cycles"], out["summary"] = cycles, first_and_steady(cycles)
    return out


def peer_first_touch(cfg: BenchConfig, *, kind: str, is_cold: bool) -> dict[str, Any]:
    """The first `to_empty` (or flat `materialize`) of a fresh process versus later ones, split into parts."""
    device, cpu = cfg.torch_device, torch.device("cpu")
    is_cuda = device.type == "cuda"
    out: dict[str, Any] = {"path": kind, "is_cold": is_cold, "cuda_initialized_at_start": torch.cuda.is_initialized()}
    if is_cuda and not is_cold:
        # Timed by hand: a synchronize before them would itself create the CUDA context.
        start = time.perf_counter()
        torch.cuda.init()  # torch's lazy init: driver, runtime, allocator; the context may come later
        out["cuda_init_s"] = time.perf_counter() - start
        for key in ("first_empty_s", "second_empty_s"):  # the first creates the context if init did not
            start = time.perf_counter()
            torch.empty(1, device=device)
            torch.cuda.synchronize(device)
            out[key] = time.perf_counter() - start
    out["build_meta_s"], model = timed(lambda: build_meta_model(
        preset_config(cfg.model), dtype=cfg.torch_dtype, max_positions=cfg.max_model_len), cpu)
    segments = _num_segments(device)
    if kind == "to_empty":
        with CallTimer(torch, "empty_like") as calls:  # Module.to_empty calls torch.empty_like per tensor
            out["first_s"], _ = timed(lambda: model.to_empty(device=device), device)

        def to_meta() -> None:
            model.to("meta")
            _empty_cache(device)

        def back() -> None:
            model.to_empty(device=device)
    else:
        out["flat_layout_s"], flat = timed(lambda: FlatParameters(model), cpu)
        with CallTimer(torch, "empty") as calls:  # FlatParameters.materialize: one torch.empty
            out["first_s"], _ = timed(lambda: flat.materialize(device), device)
        out["first_buffers_s"], _ = timed(lambda: materialize_buffers(model, device), device)

        def to_meta() -> None:
            flat.to_meta()
            _empty_cache(device)

        def back() -> None:
            flat.materialize(device)
    out["first_alloc"] = calls.summary()
    out["first_num_segments"] = _num_segments(device) - segments  # cudaMalloc calls
    out["cuda_initialized_by_first"] = is_cold and is_cuda
    cycles = []
    for _ in range(max(cfg.cycles - 1, 3)):
        to_meta_s, _ = timed(to_meta, device)
        back_s, _ = timed(back, device)
        cycles.append({"to_meta_s": to_meta_s, "later_s": back_s})
    out["cycles"] = cycles
    out["to_meta_s"] = statistics.median(c["to_meta_s"] for c in cycles)
    out["later_s"] = statistics.median(c["later_s"] for c in cycles)
    out["num_tensors"] = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    return out


def _num_segments(device: torch.device) -> int:
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return 0
    return torch.cuda.memory_stats(device).get("segment.all.allocated", 0)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_peer_task(cfg: BenchConfig, task: PeerTask) -> None:
    """The subprocess side: measure, and always leave a JSON result (errors included) for the parent."""
    result: dict[str, Any] = {"kind": task.kind}
    try:
        if task.kind == "tms":
            result.update(peer_tms(cfg, task.kv_bytes))
        else:
            result.update(peer_first_touch(cfg, kind=task.kind, is_cold=task.is_cold))
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    Path(task.out).write_text(json.dumps(result, indent=2))


# -- summary ---------------------------------------------------------------------------------
def _get(summary: dict, kind: str, key: str) -> dict[str, float | None]:
    return summary.get(kind, {}).get(key, {"first": None, "steady": None})


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Rows of the final tables: colocate against floor and target, then against each peer."""
    col = report["colocate"]
    s = col["summary"]
    floor = report["floor"]
    d2h, h2d = floor.get("d2h_s"), floor.get("h2d_s")
    specs = [  # label, kind, metric, floor seconds, target seconds
        ("release all, weights->cpu", "all_cpu", "release_s", d2h, _TARGETS_S["release_cpu"]),
        ("resume weights+kv from cpu (no graphs)", "all_cpu", "resume_s", h2d, _TARGETS_S["resume_cpu"]),
        ("release all, weights->meta", "all_meta", "release_s", 0.0, _TARGETS_S["release_meta"]),
        ("resume weights+kv after meta (alloc only)", "all_meta", "resume_s", 0.0, None),
        ("update_weights from host (not the IPC path)", "all_meta", "update_from_host_s", h2d, None),
        ("graph capture on resume (not in targets)", "all_cpu", "graph_capture_s", None, None),
        ("release kv_cache (+graphs)", "kv_cache", "release_s", 0.0, None),
        ("resume kv_cache", "kv_cache", "resume_s", 0.0, None),
        ("release weights->cpu (+graphs)", "weights_cpu", "release_s", d2h, None),
        ("resume weights from cpu", "weights_cpu", "resume_s", h2d, None),
        ("release weights->meta (+graphs)", "weights_meta", "release_s", 0.0, None),
        ("resume weights after meta (alloc only)", "weights_meta", "resume_s", 0.0, None),
    ]
    rows = []
    for label, kind, metric, floor_s, target_s in specs:
        v = _get(s, kind, metric)
        tags = {t: _get(s, kind, f"{metric.removesuffix('_s')}_{t}_s")["steady"] for t in TAGS}
        report_s = _get(s, kind, f"{metric.removesuffix('_s')}_report_s")["steady"]  # release / resume only
        rows.append({"operation": label, "first_s": v["first"], "steady_s": v["steady"], "floor_s": floor_s,
                     "steady_report_s": report_s,
                     "x_floor": _ratio(v["steady"], floor_s), "target_s": target_s,
                     "meets_target": None if target_s is None or v["steady"] is None else v["steady"] <= target_s,
                     "steady_tag_report_s": {t: x for t, x in tags.items() if x is not None}})
    leftover = None
    if "footprint_bytes" in col:
        left = _get(s, "all_cpu", "leftover_bytes")
        left_meta = _get(s, "all_meta", "leftover_bytes")
        worst = max(x for v in (left, left_meta) for x in v.values() if x is not None)
        leftover = {"footprint_bytes": col["footprint_bytes"], "cpu": left, "meta": left_meta,
                    "worst_bytes": worst, "worst_fraction": worst / col["footprint_bytes"],
                    "meets_target": worst <= _MAX_LEFTOVER_FRACTION * col["footprint_bytes"]}
    peers = report["peers"]
    peer_rows = []

    def peer_row(label: str, ours: dict, peer_name: str, theirs: dict) -> None:
        peer_rows.append({"operation": label, "peer": peer_name, "peer_first_s": theirs["first"],
                          "peer_steady_s": theirs["steady"], "first_s": ours["first"], "steady_s": ours["steady"],
                          "speedup_first": _ratio(theirs["first"], ours["first"]),
                          "speedup_steady": _ratio(theirs["steady"], ours["steady"])})

    rel, res = _get(s, "all_cpu", "release_s"), _get(s, "all_cpu", "resume_s")
    naive, tms = peers.get("naive", {}), peers.get("tms", {})
    if "summary" in naive:
        peer_row("release all, weights->cpu", rel, "naive .cpu() per tensor", naive["summary"]["offload_s"])
        peer_row("resume from cpu", res, "naive .cuda() per tensor", naive["summary"]["onload_s"])
    if "summary" in tms:
        peer_row("release all, weights->cpu", rel, "torch_memory_saver pause kv+weights", tms["summary"]["pause_s"])
        peer_row("resume from cpu", res, "torch_memory_saver resume weights+kv", tms["summary"]["resume_s"])
    warm = peers.get("to_empty", {}).get("warm", {})
    if "later_s" in warm:
        peer_row("release all, weights->meta", _get(s, "all_meta", "release_s"), "to('meta') + empty_cache",
                 {"first": warm["cycles"][0]["to_meta_s"], "steady": warm["to_meta_s"]})
        peer_row("resume weights+kv after meta", _get(s, "all_meta", "resume_s"), "to_empty (fresh process)",
                 {"first": warm["first_s"], "steady": warm["later_s"]})
    return {"rows": rows, "leftover": leftover, "peer_rows": peer_rows}


def print_tables(report: dict[str, Any]) -> None:
    summary = report["summary"]
    col = report["colocate"]
    print(f"\n{report['device']}  {report['config']['model']} {report['config']['dtype']}  weights "
          f"{col['weights_bytes'] / 1e9:.3f} GB, KV {col['kv_cache_bytes'] / 1e9:.2f} GB  "
          f"(times in ms, first / steady = median of cycles 2..{report['config']['cycles']})")
    floor = report["floor"]
    if "h2d_s" in floor:
        print(f"PCIe pinned: H2D {floor['h2d_bytes_per_s'] / 1e9:.1f} GB/s, "
              f"D2H {floor['d2h_bytes_per_s'] / 1e9:.1f} GB/s")
    else:
        print(f"PCIe floor: {floor['skipped']}")
    header = (f"{'operation':44s} {'first':>8s} {'steady':>8s} {'floor':>7s} {'x floor':>7s} {'target':>7s} "
              f"{'ok':>3s} {'report':>7s}  per tag (report, steady)")
    print(header)
    print("-" * len(header))
    for r in summary["rows"]:
        ok = "-" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")
        x = "-" if r["x_floor"] is None else f"{r['x_floor']:.2f}"
        tags = " ".join(f"{_SHORT[t]} {_ms(v)}" for t, v in r["steady_tag_report_s"].items())
        print(f"{r['operation']:44s} {_ms(r['first_s']):>8s} {_ms(r['steady_s']):>8s} {_ms(r['floor_s']):>7s} "
              f"{x:>7s} {_ms(r['target_s']):>7s} {ok:>3s} {_ms(r['steady_report_s']):>7s}  {tags}")
    lo = summary["leftover"]
    if lo:
        print(f"device memory left while paused: worst {lo['worst_bytes'] / 2**20:.1f} MiB = "
              f"{100 * lo['worst_fraction']:.3f}% of the {lo['footprint_bytes'] / 2**30:.2f} GiB footprint "
              f"(target <= {100 * _MAX_LEFTOVER_FRACTION:.0f}%: {'yes' if lo['meets_target'] else 'NO'})")
    else:
        print(f"device memory left while paused: {_NEEDS_CUDA}")
    tms = report["peers"].get("tms", {})
    if "summary" in tms:
        t = tms["summary"]["leftover_bytes"]["steady"]
        print(f"torch_memory_saver left while paused: {t / 2**20:.1f} MiB = {100 * t / tms['footprint_bytes']:.3f}% "
              f"of its {tms['footprint_bytes'] / 2**30:.2f} GiB")
    print(f"\n{'colocate vs peer':32s} {'peer':38s} {'peer first':>10s} {'steady':>8s} {'ours first':>10s} "
          f"{'steady':>8s} {'speedup f/s':>12s}")
    for r in summary["peer_rows"]:
        sf, ss = r["speedup_first"], r["speedup_steady"]
        speed = f"{sf:.1f}x/{ss:.1f}x" if sf is not None and ss is not None else "-"
        print(f"{r['operation']:32s} {r['peer']:38s} {_ms(r['peer_first_s']):>10s} {_ms(r['peer_steady_s']):>8s} "
              f"{_ms(r['first_s']):>10s} {_ms(r['steady_s']):>8s} {speed:>12s}")
    for name, peer in report["peers"].items():
        for variant, r in (peer.items() if name in ("to_empty", "flat") else [("", peer)]):
            msg = r.get("skipped") or r.get("error") or r.get("exit_error")
            if msg:
                lines = [x for x in msg.strip().splitlines() if x.strip()]
                shown = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
                print(f"peer {' '.join(filter(None, (name, variant)))}: {shown[:300]}")
    rows = [(f"{name} {v}", r) for name in ("to_empty", "flat")
            for v, r in report["peers"].get(name, {}).items() if "first_s" in r]
    if rows:
        # first = the first to_empty / materialize of the process; alloc = its torch.empty(_like) calls
        # (count, total, the first call, the slowest); excess = first - later (median of the later ones).
        print(f"\n{'first use in a fresh process':20s} {'cuda.init':>9s} {'empty(1)':>8s} {'first':>8s} "
              f"{'alloc n/total/first/max':>29s} {'mallocs':>7s} {'excess':>8s} {'later':>7s} {'to meta':>7s}")
        for label, r in rows:
            a = r["first_alloc"]
            alloc = f"{a['num_calls']}/{_ms(a['total_s'])}/{_ms(a['first_call_s'])}/{_ms(a['max_s'])}"
            print(f"{label:20s} {_ms(r.get('cuda_init_s')):>9s} {_ms(r.get('first_empty_s')):>8s} "
                  f"{_ms(r['first_s']):>8s} {alloc:>29s} {r['first_num_segments']:>7d} "
                  f"{_ms(r['first_s'] - r['later_s']):>8s} {_ms(r['later_s']):>7s} {_ms(r['to_meta_s']):>7s}")
    if not report["all_greedy_equal"]:
        print("GREEDY OUTPUTS CHANGED across a sleep/wake cycle: see colocate.cycles[*][*].greedy_equal")


# -- driver ----------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    device = cfg.torch_device
    if cfg.is_cuda and device.index is not None:
        torch.cuda.set_device(device)  # raises for a bare "cuda" (no index)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cfg.is_cuda else "cpu", "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "config": asdict(cfg),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "method": __doc__.split("Method.")[1],
    }
    print(f"{report['device']}: {cfg.model} {cfg.dtype}, {cfg.cycles} cycles per kind", flush=True)
    report["colocate"] = col = bench_colocate(cfg)
    report["all_greedy_equal"] = all(c["greedy_equal"] for cycles in col["cycles"].values() for c in cycles)
    write_json(report, out=cfg.out, name=_JSON_NAME)
    if cfg.is_cuda:
        torch.cuda.empty_cache()
        report["floor"] = pcie_bandwidth(col["weights_bytes"], device, cfg.copy_repeats)
    else:
        report["floor"] = {"skipped": _NEEDS_CUDA}
    peers: dict[str, Any] = {}
    report["peers"] = peers
    if "naive" in cfg.peers:
        print("  peer naive ...", flush=True)
        try:
            peers["naive"] = bench_naive(cfg)
        except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
            peers["naive"] = {"error": f"{type(exc).__name__}: {exc}"}
    if "tms" in cfg.peers:
        print("  peer torch_memory_saver (subprocess) ...", flush=True)
        peers["tms"] = (run_peer(cfg, PeerTask(kind="tms", kv_bytes=col["kv_cache_bytes"], out="-"))
                        if cfg.is_cuda else {"skipped": _NEEDS_CUDA})
    for kind in ("to_empty", "flat"):
        if kind in cfg.peers:
            print(f"  peer first {kind} (fresh subprocesses) ...", flush=True)
            variants = ("warm", "cold") if cfg.is_cuda else ("warm",)  # no CUDA to initialise on CPU
            peers[kind] = {v: run_peer(cfg, PeerTask(kind=kind, is_cold=v == "cold", out="-")) for v in variants}
    report["summary"] = summarize(report)
    return report


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, PeerTask | None]:
    d = BenchConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=d["model"].default, help="a preset name (weights drawn on the device)")
    p.add_argument("--device", default=d["device"].default)
    p.add_argument("--dtype", default=d["dtype"].default, help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--kv-cache-fraction", type=float, default=d["kv_cache_fraction"].default)
    p.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default)
    p.add_argument("--max-model-len", type=int, default=d["max_model_len"].default)
    p.add_argument("--cycles", type=int, default=d["cycles"].default)
    p.add_argument("--num-prompts", type=int, default=d["num_prompts"].default)
    p.add_argument("--new-tokens", type=int, default=d["new_tokens"].default)
    p.add_argument("--copy-repeats", type=int, default=d["copy_repeats"].default)
    p.add_argument("--peers", default=",".join(_PEERS), help="comma-separated subset of peers; '' for none")
    p.add_argument("--peer-timeout-s", type=float, default=d["peer_timeout_s"].default)
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--out", default=d["out"].default, help="JSON path, unless $OUT is set ($OUT/bench_sleep_wake.json)")
    p.add_argument("--peer", default="", help=argparse.SUPPRESS)  # internal: run one peer in this subprocess
    p.add_argument("--peer-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--kv-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cfg = BenchConfig(model=a.model, device=a.device, dtype=a.dtype, kv_cache_fraction=a.kv_cache_fraction,
                      max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, cycles=a.cycles,
                      num_prompts=a.num_prompts, new_tokens=a.new_tokens, copy_repeats=a.copy_repeats,
                      peers=[x.strip() for x in a.peers.split(",") if x.strip()], peer_timeout_s=a.peer_timeout_s,
                      seed=a.seed, out=a.out)
    task = PeerTask(kind=a.peer, is_cold=a.cold, kv_bytes=a.kv_bytes, out=a.peer_out) if a.peer else None
    return cfg, task


def main() -> None:
    cfg, task = parse_args()
    if task is not None:
        run_peer_task(cfg, task)
        return
    start = time.perf_counter()
    report = run_bench(cfg)
    report["bench_wall_s"] = time.perf_counter() - start
    path = write_json(report, out=cfg.out, name=_JSON_NAME)
    print(f"\nwrote {path} ({report['bench_wall_s']:.0f} s)")
    print_tables(report)
    assert report["all_greedy_equal"], "greedy outputs changed across a sleep/wake cycle (details in the JSON)"


if __name__ == "__main__":
    main()
