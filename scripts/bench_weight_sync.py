"""Weight updates into an engine in another process on the same GPU: bucketed CUDA IPC against the HBM floor and peers.

    PYTHONPATH=. python scripts/bench_weight_sync.py                                      # GPU: 0.5B, 1.5B, 7B
    PYTHONPATH=. python scripts/bench_weight_sync.py --device cpu --models tiny --repeats 2   # smoke test (< 60 s)
    cat scripts/bench_weight_sync.py | PYTHONPATH=. python - --device cpu --models tiny --repeats 2   # from stdin

Method. Per shape, an engine in a child process (`launch_engine`, seed-0 weights) and a trainer
copy of the same shape with other weights in this process, on the same GPU. colocate:
`engine.update_weights(trainer.hf_named_tensors())`, `--repeats` times, wall clock in this
process; the first call is reported apart from the steady state (median of the rest), with the
peak extra device memory of the call. Every path must give the same greedy tokens (the IPC update,
the per-tensor peer, the disk peer or an in-process reference) and weight fingerprints.
Floor: a device-to-device copy of 2 GiB measured in the run gives the read+write bandwidth;
floor_s = 2 * weights_bytes / that bandwidth. Peers, same shapes, same run: per-tensor CUDA IPC
(one handle per tensor), a CPU round trip (`.to("cpu")`, shared memory through a spawned helper,
`.copy_()` back on the GPU), and safetensors save + `update_weights_from_disk` on local disk. The
disk and CPU peers are skipped for the shapes in `--skip-slow-peers-for`.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from colocate import Engine, EngineConfig, launch_engine
from colocate.model import PRESETS, CausalLM, build_model, init_random_weights, preset_config

try:
    import benchlib  # noqa: F401 - run as a file, Python put this folder first on sys.path
except ModuleNotFoundError:  # piped from stdin, it put the working directory there instead: try its scripts/
    sys.path.insert(0, str(Path.cwd() / "scripts"))
from benchlib.checks import GreedyCheck, fingerprint
from benchlib.config import DeviceDtypeMixin
from benchlib.device import free_device
from benchlib.floors import hbm_bandwidth
from benchlib.measure import first_and_steady, timed
from benchlib.peers import cpu_round_trip as cpu_peer, disk_reload as disk_peer, per_tensor_ipc as per_tensor_peer
from benchlib.report import attempt, bench_main, error_result, ms, new_report, write_json
from benchlib.weight_sync_report import print_table, summarize_model

if TYPE_CHECKING:
    from colocate.server import EngineProcess

_DEFAULT_MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")
_JSON_NAME = "bench_weight_sync.json"  # under $OUT, when it is set
_HELPS = {"models": "comma-separated preset names", "dtype": "auto: bfloat16 on CUDA, float32 on CPU",
          "repeats": "colocate updates per shape (>= 2)",
          "skip_slow_peers_for": "comma-separated shapes without the disk and CPU round trip peers; '' for none",
          "tmp_dir": "checkpoint folder for the disk peer (local disk)",
          "out": "JSON path, unless $OUT is set ($OUT/bench_weight_sync.json)"}


@dataclass(kw_only=True)
class BenchConfig(DeviceDtypeMixin):
    models: list[str] = field(default_factory=lambda: list(_DEFAULT_MODELS))
    device: str = "cuda"
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    bucket_mib: int = 512
    repeats: int = 5  # colocate updates per shape: the first, then the steady state (median of the rest)
    peer_repeats: int = 2
    skip_slow_peers_for: list[str] = field(default_factory=lambda: ["qwen2.5-7b"])
    kv_cache_fraction: float = 0.1  # small, so the trainer copy (and the peers' copies) fit beside the engine
    max_num_seqs: int = 16
    max_model_len: int = 256
    num_prompts: int = 8
    new_tokens: int = 16
    floor_repeats: int = 10
    trainer_seed: int = 1  # no flag: the checks below name seeds 0, 1 and 2
    peer_timeout_s: float = 600.0
    tmp_dir: str = "out/tmp"  # on local disk, not $OUT (results come back from there) and not /dev/shm
    out: str = "out/bench_weight_sync.json"

    def __post_init__(self) -> None:
        unknown = [m for m in self.models + self.skip_slow_peers_for if m not in PRESETS]
        if unknown or not self.models:
            raise ValueError(f"models {unknown or '(none)'}: pass preset names, comma-separated, "
                             f"from {sorted(PRESETS)}")
        self.check_device_dtype()
        if self.repeats < 2:
            raise ValueError(f"repeats={self.repeats} must be >= 2: the first update is reported apart from the rest")
        for name in ("bucket_mib", "peer_repeats", "num_prompts", "new_tokens", "floor_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.kv_cache_fraction < 1:
            raise ValueError(f"kv_cache_fraction={self.kv_cache_fraction} must be in (0, 1), e.g. 0.1")

    @property
    def bucket_bytes(self) -> int:
        return self.bucket_mib << 20


def engine_config(cfg: BenchConfig, model: str, *, kv_cache_fraction: float | None = None) -> EngineConfig:
    return EngineConfig(model=model, device=cfg.device, dtype=cfg.dtype,
                        kv_cache_fraction=kv_cache_fraction or cfg.kv_cache_fraction, max_num_seqs=cfg.max_num_seqs,
                        max_model_len=cfg.max_model_len, seed=0)


def draw(trainer: CausalLM, seed: int) -> int:
    """Fill the trainer with the weights of `seed`; returns their fingerprint."""
    init_random_weights(trainer, seed=seed)
    return fingerprint(t for _, t in trainer.hf_named_tensors())


def update_ipc(engine: EngineProcess, trainer: CausalLM, *, version: int, bucket_bytes: int,
               device: torch.device) -> dict[str, Any]:
    """colocate's bucketed update: wall time, the engine's report, and the peak extra device memory here."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    wall_s, result = timed(lambda: engine.update_weights(trainer.hf_named_tensors(), version=version,
                                                         bucket_bytes=bucket_bytes), device)
    run = {"wall_s": wall_s, "producer_seconds": result["seconds"], "num_buckets": result["num_buckets"],
           "bytes": result["bytes"], "version": result["version"], "phase_seconds": result.get("phase_seconds"),
           "receiver_seconds": result.get("receiver_seconds"), "one_pass_buckets": result.get("one_pass_buckets")}
    phases = {**(result.get("phase_seconds") or {}),
              **{f"engine {k}": v for k, v in (result.get("receiver_seconds") or {}).items()}}
    print("    phases (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in phases.items())
          + f"; {result.get('one_pass_buckets')} of {result['num_buckets']} buckets in one pass", flush=True)
    if device.type == "cuda":
        run["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - allocated
    return run


# -- one model shape: its steps in order -----------------------------------------------------
class ShapeBench:
    """The steps of one model shape; they share the engine, the trainer, the check prompts and the results."""

    def __init__(self, cfg: BenchConfig, model: str, engine: EngineProcess, out: dict[str, Any]) -> None:
        self.cfg, self.model, self.engine, self.out = cfg, model, engine, out
        self.device = cfg.torch_device
        self.checks: dict[str, bool] = out.setdefault("checks", {})
        self.versions = itertools.count(1)
        self.greedy = GreedyCheck(vocab_size=preset_config(model).vocab_size, num_prompts=cfg.num_prompts,
                                  new_tokens=cfg.new_tokens, seed=0)
        out["trainer_build_s"], self.trainer = timed(lambda: build_model(
            preset_config(model), device=self.device, dtype=cfg.torch_dtype, max_positions=64), self.device)
        self.fingerprint_w1 = draw(self.trainer, cfg.trainer_seed)
        sizes = [t.numel() * t.element_size() for _, t in self.trainer.hf_named_tensors()]
        out.update(weights_bytes=sum(sizes), num_tensors=len(sizes), largest_tensor_bytes=max(sizes))
        self.tokens: dict[str, list[list[int]]] = {"w0": self.greedy(engine)}  # the engine's own seed 0 weights

    def attempt(self, key: str, step: Callable[[], dict[str, Any]]) -> None:
        """Run one peer; a failing peer is recorded as a result, and the other steps still run."""
        self.out[key] = attempt(step, label=f"{self.model}: {key}")
        if "error" in self.out[key]:
            free_device(self.device)

    def colocate(self) -> dict[str, Any]:
        """Bucketed IPC of the seed 1 weights, `--repeats` times."""
        runs = [update_ipc(self.engine, self.trainer, version=next(self.versions), bucket_bytes=self.cfg.bucket_bytes,
                           device=self.device) for _ in range(self.cfg.repeats)]
        self.tokens["w1"] = self.greedy(self.engine)
        self.checks["ipc_update_changed_outputs"] = self.tokens["w1"] != self.tokens["w0"]
        out = {"runs": runs, "num_buckets": runs[0]["num_buckets"],
               "wall_s": first_and_steady([r["wall_s"] for r in runs])}
        if "peak_extra_bytes" in runs[0]:
            out["peak_extra_bytes_max"] = max(r["peak_extra_bytes"] for r in runs)
        print(f"  {self.model}: colocate first {ms(out['wall_s']['first'])} ms, steady {ms(out['wall_s']['steady'])} "
              f"ms ({out['num_buckets']} buckets)", flush=True)
        return out

    def per_tensor_ipc(self) -> dict[str, Any]:
        """Peer a, with the trainer on seed 2 weights."""
        out = per_tensor_peer.measure(self.engine, self.trainer, repeats=self.cfg.peer_repeats, versions=self.versions,
                                      dtype=self.cfg.torch_dtype, device=self.device)
        self.tokens["per_tensor"] = self.greedy(self.engine)
        print(f"  {self.model}: per-tensor IPC {ms(out['total_s']['steady'])} ms ({out['num_handles']} handles)",
              flush=True)
        return out

    def bucketed_w2(self) -> None:
        """Seed 2 weights through the bucketed path: the per-tensor peer's outputs must match them."""
        free_device(self.device)
        update_ipc(self.engine, self.trainer, version=next(self.versions), bucket_bytes=self.cfg.bucket_bytes,
                   device=self.device)
        self.tokens["w2"] = self.greedy(self.engine)
        self.checks["seed2_outputs_differ_from_seed1"] = self.tokens["w2"] != self.tokens["w1"]
        if "per_tensor" in self.tokens:
            self.checks["per_tensor_equals_bucketed"] = self.tokens["per_tensor"] == self.tokens["w2"]

    def disk(self) -> dict[str, Any]:
        """Peer c; its first load moves the engine from seed 2 to seed 1 weights: the reference for the IPC update."""
        def check_reference() -> None:
            self.checks["ipc_equals_reference"] = self.greedy(self.engine) == self.tokens["w1"]

        out = disk_peer.measure(self.engine, self.trainer, model=self.model, dtype=self.cfg.dtype, device=self.device,
                                tmp_dir=self.cfg.tmp_dir, repeats=self.cfg.peer_repeats, versions=self.versions,
                                after_first=check_reference)
        print(f"  {self.model}: disk save+load {ms(out['total_s']['steady'])} ms ({out['fs_type']})", flush=True)
        return out

    def in_process_reference(self) -> dict[str, Any]:
        """Where the disk peer is skipped: an in-process engine filled by a direct copy, freed at once."""
        def reference_tokens() -> list[list[int]]:
            kv_cache_fraction = min(self.cfg.kv_cache_fraction, 0.05)
            reference = Engine(engine_config(self.cfg, self.model, kv_cache_fraction=kv_cache_fraction))
            try:
                reference.update_weights(self.trainer.hf_named_tensors())
                return self.greedy(reference)
            finally:
                reference.shutdown()

        seconds, tokens = timed(reference_tokens, self.device)
        self.checks["ipc_equals_reference"] = tokens == self.tokens["w1"]
        return {"kind": "in-process Engine.update_weights (no buckets, no IPC, no child)", "seconds": seconds}

    def cpu_round_trip(self) -> dict[str, Any]:
        """Peer b, with the trainer on seed 1 weights; the helper reports the fingerprint of what it received."""
        free_device(self.device)
        out = cpu_peer.measure(self.model, self.trainer, device=self.device, dtype=self.cfg.dtype,
                               repeats=self.cfg.peer_repeats, timeout_s=self.cfg.peer_timeout_s,
                               expected_fingerprint=self.fingerprint_w1)
        self.checks["cpu_round_trip_fingerprint_equal"] = out["fingerprint_equal"]
        print(f"  {self.model}: CPU round trip {ms(out['total_s']['steady'])} ms", flush=True)
        return out


def bench_model(cfg: BenchConfig, model: str, *, floor: dict[str, Any]) -> dict[str, Any]:
    """colocate, then each peer, on one shape: seed 1 weights by IPC, seed 2 per tensor, seed 1 again for the rest."""
    skip_slow = model in cfg.skip_slow_peers_for
    out: dict[str, Any] = {"model": model, "skip_slow_peers": skip_slow}
    out["engine_start_s"], engine = timed(lambda: launch_engine(engine_config(cfg, model)), cfg.torch_device)
    bench = None
    try:
        bench = ShapeBench(cfg, model, engine, out)
        if "read_write_bytes_per_s" in floor:
            out["floor_s"] = 2 * out["weights_bytes"] / floor["read_write_bytes_per_s"]
        out["colocate"] = bench.colocate()
        draw(bench.trainer, cfg.trainer_seed + 1)
        bench.attempt("per_tensor_ipc", bench.per_tensor_ipc)
        bench.bucketed_w2()
        bench.checks["trainer_redraw_identical"] = draw(bench.trainer, cfg.trainer_seed) == bench.fingerprint_w1
        if skip_slow:
            print(f"  {model}: skipped the disk and CPU round trip peers (--skip-slow-peers-for)", flush=True)
            out["disk"] = out["cpu_round_trip"] = {"skipped": "--skip-slow-peers-for"}
            bench.attempt("reference", bench.in_process_reference)
        else:
            out["reference"] = {"kind": "update_weights_from_disk of the saved trainer (seed 2 -> seed 1 weights)"}
            bench.attempt("disk", bench.disk)
            bench.attempt("cpu_round_trip", bench.cpu_round_trip)
        out["summary"] = summarize_model(out)
        return out
    finally:
        engine.shutdown()
        bench = None  # frees the trainer's weights before the next shape
        free_device(cfg.torch_device)


# -- driver ----------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    report = new_report(cfg, doc=__doc__)
    report["models"] = []
    print(f"{report['device']}: {', '.join(cfg.models)} ({cfg.dtype}), {cfg.repeats} updates each", flush=True)
    report["floor"] = hbm_bandwidth(cfg.torch_device, repeats=cfg.floor_repeats)
    if "read_write_bytes_per_s" in report["floor"]:
        print(f"  HBM read+write {report['floor']['read_write_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    for model in cfg.models:
        try:
            report["models"].append(bench_model(cfg, model, floor=report["floor"]))
        except Exception as exc:  # noqa: BLE001 - one shape failing (e.g. out of memory) must not lose the others
            report["models"].append({"model": model, **error_result(exc, max_traceback_chars=None)})
            print(f"  {model}: ERROR {type(exc).__name__}: {exc}", flush=True)
            free_device(cfg.torch_device)
        write_json(report, out=cfg.out, name=_JSON_NAME)  # partial results survive a later failure
    report["all_checks_pass"] = all(m.get("summary", {}).get("all_checks_pass", False) for m in report["models"])
    return report


def main() -> None:
    bench_main(BenchConfig, __doc__, helps=_HELPS, run=run_bench, print_report=print_table, json_name=_JSON_NAME,
               check=("all_checks_pass", "a correctness check failed or a shape errored (details in the JSON)"),
               without=("trainer_seed",))

if __name__ == "__main__":
    main()
