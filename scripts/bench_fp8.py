"""The fp8 engine against the bf16 engine, same run, same shapes: load peak, decode, weight updates, sleep/wake, KL.

    cd scripts && python bench_fp8.py                                               # GPU: qwen2.5-1.5b and 7b
    cd scripts && python bench_fp8.py --device cpu --models tiny --batches 1,4      # smoke test (< 90 s)
    cd scripts && cat bench_fp8.py | python - --device cpu --models tiny --batches 1,4   # from stdin

Method. Per shape, one in-process engine per variant, freed before the next: the model dtype (bf16 on
CUDA), fp8 with fp8_gemm "dequantize" and "scaled_mm" (CUDA capability >= 8.9), all from the preset's
seed-0 weights. In each: greedy tokens of a fixed batch (the reference); decode tokens/s per batch size
(benchlib.model_measures.decode_throughput) against the floor, the bytes a step reads / the HBM bandwidth
of a device copy in this run; `update_weights` of a trainer copy's seed-1 tensors on the device (fp8:
quantized on receive) and weights sleep/wake to cpu (not scaled_mm: same weights), --repeats times each,
first and steady (median of the rest). Checks: an update changes the tokens; an update back to seed 0,
and the sleep/wake cycles, give the reference again (a fresh engine's on those weights); numbers count
only where their variant's checks pass. Load peak: the preset saved as a bf16 checkpoint, loaded by
load_model as fp8 and in the model dtype; load-then-quantize = the bf16 peak + the fp8 weights and scales
beside it (as tests/gpu/test_fp8_gpu.py). KL: sequences sampled (temperature 1) by the unquantized engine,
teacher-forced through both loaded models: mean KL(bf16 || fp8) and |delta logprob| of the sampled tokens.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.model import PRESETS, CausalLM, build_model, init_random_weights, load_model, preset_config, save_preset
from colocate.model.quant import can_use_scaled_mm, fp8_linears

try:
    import benchlib  # noqa: F401 - run as a file, Python put this folder first on sys.path
except ModuleNotFoundError:  # piped from stdin, it put the working directory there instead: try its scripts/
    sys.path.insert(0, str(Path.cwd() / "scripts"))
from benchlib.checks import GreedyCheck
from benchlib.config import DeviceDtypeMixin
from benchlib.device import free_device
from benchlib.floors import hbm_bandwidth
from benchlib.measure import first_and_steady, timed
from benchlib.model_measures import (decode_step_bytes, decode_throughput, kv_bytes_per_token, logprob_gap,
                                     measure_load, parameter_bytes, teacher_forced_logprobs, timed_updates,
                                     weights_sleep_wake)
from benchlib.report import Table, attempt, bench_main, failure, ms, new_report, ratio, run_per_model

_JSON_NAME = "bench_fp8.json"  # under $OUT, when it is set
_TARGETS = {"load_peak_over_bf16_model": 0.6, "update_fp8_over_bf16": 1.3, "sleep_wake_fp8_over_bf16": 0.6}
_NOTE = ("random presets have no learned top-1 (logit gaps below fp8 noise): top-1 agreement and KL here bound "
         "the numeric gap only; fidelity on a trained model: tests/gpu/test_fp8_gpu.py::test_top1_agreement")
_STEPS = ("decode", "update", "sleep_wake")
_CHECK_PROMPTS = 8  # the greedy check: 8 prompts of 16 tokens, 16 new tokens
_HELPS = {"models": "comma-separated preset names", "batches": "comma-separated decode batch sizes",
          "dtype": "auto: bfloat16 on CUDA, float32 on CPU", "repeats": "updates and sleep/wake cycles (>= 2)",
          "tmp_dir": "the bf16 checkpoint's folder (local disk)", "out": "JSON path, unless $OUT is set"}


@dataclass(kw_only=True)
class BenchConfig(DeviceDtypeMixin):
    models: list[str] = field(default_factory=lambda: ["qwen2.5-1.5b", "qwen2.5-7b"])
    device: str = "cuda"
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    batches: list[str] = field(default_factory=lambda: ["1", "16", "64", "256"])
    prompt_len: int = 32
    new_tokens: int = 64
    repeats: int = 4  # updates and sleep/wake cycles: the first, then the steady state (median of the rest)
    kl_prompts: int = 8
    floor_repeats: int = 10
    seed: int = 0
    tmp_dir: str = "out/tmp"  # local disk, not $OUT (results come back from there)
    out: str = "out/bench_fp8.json"

    def __post_init__(self) -> None:
        if not self.models or any(m not in PRESETS for m in self.models):
            raise ValueError(f"models={self.models}: pass preset names from {sorted(PRESETS)}")
        self.check_device_dtype()
        if not self.batches or not all(b.isdigit() and int(b) > 0 for b in self.batches):
            raise ValueError(f"batches={self.batches}: pass positive integers, comma-separated")
        if min(self.repeats, self.new_tokens) < 2 or min(self.prompt_len, self.kl_prompts, self.floor_repeats) < 1:
            raise ValueError("repeats and new_tokens must be >= 2; prompt_len, kl_prompts, floor_repeats >= 1")

    @property
    def max_model_len(self) -> int:
        return max(self.prompt_len, 16) + max(self.new_tokens, 16)  # 16 + 16: the greedy check

    @property
    def base(self) -> str:  # the unquantized variant
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[self.dtype]

    @property
    def has_scaled_mm(self) -> bool:
        return can_use_scaled_mm(self.torch_device) and self.dtype == "bfloat16"

    def engine_config(self, model: str, **quant: Any) -> EngineConfig:
        """The KV cache sized for the largest batch at max_model_len, a spare block each, and the padding sink."""
        batch = max([int(b) for b in self.batches] + [self.kl_prompts, _CHECK_PROMPTS])
        blocks = batch * (-(-self.max_model_len // 16) + 1) + 2
        return EngineConfig(model=model, device=self.device, dtype=self.dtype, seed=self.seed, block_size=16,
                            max_model_len=self.max_model_len, max_num_seqs=batch,
                            kv_cache_bytes=blocks * 16 * kv_bytes_per_token(preset_config(model), self.torch_dtype),
                            **quant)


VARIANTS = {"fp8_dequantize": {"quantization": "fp8"},
            "fp8_scaled_mm": {"quantization": "fp8", "fp8_gemm": "scaled_mm"}}


# -- one engine: decode, updates, sleep/wake -------------------------------------------------
def bench_update(engine: Engine, trainer: CausalLM, check: Callable[[], bool], cfg: BenchConfig) -> dict[str, Any]:
    init_random_weights(trainer, seed=cfg.seed + 1)
    runs = timed_updates(engine, trainer.hf_named_tensors, repeats=cfg.repeats)
    changed = not check()
    init_random_weights(trainer, seed=cfg.seed)
    engine.update_weights(trainer.hf_named_tensors())
    return {"runs": runs, "s": first_and_steady([r["s"] for r in runs]),
            "checks": {"update_changes_tokens": changed, "update_back_equals_fresh": check()}}


def bench_variant(cfg: BenchConfig, model: str, name: str, trainer: CausalLM, shared: dict[str, Any],
                  ) -> dict[str, Any]:
    if name == "fp8_scaled_mm" and not cfg.has_scaled_mm:
        return {"skipped": "scaled_mm needs CUDA compute capability >= 8.9 and bfloat16"}
    free_device(cfg.torch_device)
    build_s, engine = timed(lambda: Engine(cfg.engine_config(model, **VARIANTS.get(name, {}))), cfg.torch_device)
    try:
        vocab = engine.model_config.vocab_size
        greedy = GreedyCheck(vocab_size=vocab, num_prompts=_CHECK_PROMPTS, new_tokens=16, seed=cfg.seed)
        reference = greedy(engine)
        check = lambda: greedy(engine) == reference
        nbytes = engine.memory_status()["device_bytes"]
        out = {"engine_build_s": build_s, "weights_bytes": nbytes["weights"], "kv_cache_bytes": nbytes["kv_cache"]}
        if name == cfg.base:  # the KL step's sequences, sampled by the unquantized engine
            prompts = torch.randint(0, vocab, (cfg.kl_prompts, cfg.prompt_len),
                                    generator=torch.Generator().manual_seed(cfg.seed + 3)).tolist()
            params = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=1.0, seed=cfg.seed, ignore_eos=True)
            shared["seqs"] = [p + o.token_ids for p, o in zip(prompts, engine.generate(prompts, params))]
        label = f"{model} {name}"
        out["decode"] = attempt(lambda: {b: decode_throughput(engine, int(b), prompt_len=cfg.prompt_len, seed=cfg.seed,
                                                              new_tokens=cfg.new_tokens) for b in cfg.batches},
                                label=f"{label} decode")
        out["update"] = attempt(lambda: bench_update(engine, trainer, check, cfg), label=f"{label} update")
        out["sleep_wake"] = ({"skipped": "the weights of fp8_dequantize"} if name == "fp8_scaled_mm" else
                             attempt(lambda: {**weights_sleep_wake(engine, repeats=cfg.repeats),
                                              "checks": {"sleep_wake_equals_fresh": check()}},
                                     label=f"{label} sleep/wake"))
        out["checks"] = {k: v for step in _STEPS for k, v in out[step].get("checks", {}).items()}
        out["ok"] = all("error" not in out[s] for s in _STEPS) and all(out["checks"].values())
        print(f"  {label}: tok/s " + ", ".join(f"{b}: {d['tokens_per_s']:.0f}" for b, d in out["decode"].items()
                                               if isinstance(d, dict)) + f"; checks {out['checks']}", flush=True)
        return out
    finally:
        engine.shutdown()
        free_device(cfg.torch_device)


# -- load peak and KL, from a bf16 checkpoint -----------------------------------------------
def bench_load_kl(cfg: BenchConfig, model: str, seqs: list[list[int]] | None) -> dict[str, Any]:
    device, out = cfg.torch_device, {"kl_tokens": "sampled by the unquantized engine"}
    if seqs is None:  # that engine failed before sampling
        out["kl_tokens"], seqs = "random (no sampled sequences)", torch.randint(
            0, preset_config(model).vocab_size, (cfg.kl_prompts, cfg.prompt_len + cfg.new_tokens)).tolist()
    ids, start = torch.tensor(seqs, device=device), cfg.prompt_len

    def load(path: Path, **quant: Any) -> tuple[CausalLM, dict[str, Any]]:
        (m, _), result = measure_load(lambda: load_model(str(path), device=device, dtype=cfg.torch_dtype,
                                                         max_positions=cfg.max_model_len, **quant), device)
        return m, {**result, "model_bytes": parameter_bytes(m)}

    Path(cfg.tmp_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.tmp_dir) as tmp:
        out["save_s"], path = timed(lambda: save_preset(model, Path(tmp) / "ckpt", seed=cfg.seed, dtype=torch.bfloat16,
                                                        device=device), device)
        fp8, out["fp8"] = load(path, quantization="fp8")
        scores = {"fp8_dequantize": teacher_forced_logprobs(fp8, ids, start)}
        if cfg.has_scaled_mm:
            for _, layer in fp8_linears(fp8):
                layer.gemm = "scaled_mm"
            scores["fp8_scaled_mm"] = teacher_forced_logprobs(fp8, ids, start)
        del fp8
        base, out["base"] = load(path)
        reference = teacher_forced_logprobs(base, ids, start)
        naive_extra = sum(p.numel() + p.shape[0] * 4 for n, p in base.named_parameters()
                          if p.dim() == 2 and ".layers." in n)  # the fp8 weights + scales made beside the bf16 ones
        del base
    if cfg.is_cuda:
        out["load_then_quantize_peak_bytes"] = out["base"]["peak_bytes"] + naive_extra
    out["fp8_peak_over_bf16_model"] = ratio(out["fp8"]["peak_bytes"], out["base"]["model_bytes"])
    out["kl"] = {name: logprob_gap(reference, lp, ids[:, start:]) for name, lp in scores.items()}
    return out


# -- one shape -------------------------------------------------------------------------------
def bench_model(cfg: BenchConfig, model: str, floor: dict[str, Any]) -> dict[str, Any]:
    out, shared = {"model": model, "variants": {}}, {}
    trainer = build_model(preset_config(model), device=cfg.torch_device, dtype=cfg.torch_dtype, max_positions=64)
    for name in (cfg.base, *VARIANTS):
        print(f"  {model} {name} ...", flush=True)
        out["variants"][name] = attempt(partial(bench_variant, cfg, model, name, trainer, shared),
                                        label=f"{model} {name}")
    trainer = None  # frees its weights before the loads
    free_device(cfg.torch_device)
    print(f"  {model}: load peak and KL ...", flush=True)
    out["load_kl"] = attempt(lambda: bench_load_kl(cfg, model, shared.get("seqs")), label=f"{model} load/KL")
    free_device(cfg.torch_device)
    out["summary"] = summarize(out, cfg, floor)
    return out


def summarize(m: dict[str, Any], cfg: BenchConfig, floor: dict[str, Any]) -> dict[str, Any]:
    """Decode rows against the floor and the unquantized engine; fp8 / base ratios where both passed their checks."""
    variants, base, bw = m["variants"], cfg.base, floor.get("read_write_bytes_per_s")
    ok = {n: v for n, v in variants.items() if v.get("ok")}  # numbers count only where the checks pass

    def steady(n: str, step: str, *keys: str) -> float | None:
        x = [ok.get(n, {}).get(step, {}).get(k, {}).get("steady") for k in keys]
        return None if None in x else sum(x)

    rows = []
    for name, v in variants.items():
        for b, d in (v["decode"].items() if isinstance(v.get("decode"), dict) else ()):
            if isinstance(d, dict):
                read = decode_step_bytes(preset_config(m["model"]), weights_bytes=v["weights_bytes"], batch=int(b),
                                         dtype=cfg.torch_dtype, mean_context=cfg.prompt_len + cfg.new_tokens / 2)
                floor_s = read / bw if bw else None
                rows.append({"variant": name, "batch": int(b), "counts": name in ok, **d, "bytes_read": read,
                             "floor_s": floor_s, "x_floor": ratio(d["step_s"], floor_s),
                             "vs_base": ratio(d["tokens_per_s"] if name in ok else None,
                                              ok.get(base, {}).get("decode", {}).get(b, {}).get("tokens_per_s"))})
    fp8 = [n for n in VARIANTS if "skipped" not in variants[n]]
    return {"decode": rows, "checks_pass": {n: n in ok for n, v in variants.items() if "skipped" not in v},
            "targets": _TARGETS, "fp8_peak_over_bf16_model": m["load_kl"].get("fp8_peak_over_bf16_model"),
            "update_fp8_over_base": {n: ratio(steady(n, "update", "s"), steady(base, "update", "s")) for n in fp8},
            "sleep_wake_fp8_over_base": {n: ratio(steady(n, "sleep_wake", "release_s", "resume_s"),
                                                  steady(base, "sleep_wake", "release_s", "resume_s"))
                                         for n in fp8 if "skipped" not in variants[n].get("sleep_wake", {})}}


# -- the tables ------------------------------------------------------------------------------
_DECODE = Table([("model", "<13"), ("variant", "<15"), ("batch", ">5"), ("tok/s", ">9"), ("ms/step", ">8"),
                 ("floor", ">7"), ("x floor", ">7"), ("vs base", ">7")], last="checks pass")
_OPS = Table([("model", "<13"), ("variant", "<15"), ("weights", ">7"), ("load pk", ">7"), ("update", ">11"),
              ("release", ">11"), ("resume", ">11"), ("graphs", ">7"), ("mean KL", ">8"), ("max|dlp|", ">8")],
             last="checks")


def _fs(x: Any) -> str:
    return f"{ms(x['first'])}/{ms(x['steady'])}" if isinstance(x, dict) and "first" in x else "-"


def _x(x: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x / scale, spec)


def _ratios(by_variant: dict[str, float | None]) -> str:
    return ", ".join(f"{n} {_x(x)}" for n, x in by_variant.items()) or "-"


def print_tables(report: dict[str, Any]) -> None:
    floor, base = report["floor"], report["base"]
    bw = (f"HBM read+write {floor['read_write_bytes_per_s'] / 1e12:.2f} TB/s" if "read_write_bytes_per_s" in floor
          else f"HBM floor {failure(floor)}")
    print(f"\n{report['device']}, base {base}; {bw}; floor = bytes a step reads / that bandwidth; vs base: tok/s")
    print(_DECODE.header())
    for m in report["models"]:
        for r in m.get("summary", {}).get("decode", []):
            print(_DECODE.row([m["model"], r["variant"], str(r["batch"]), f"{r['tokens_per_s']:.0f}", ms(r["step_s"]),
                               ms(r["floor_s"]), _x(r["x_floor"]), _x(r["vs_base"])], last=str(r["counts"])))
    print(f"\nweights, load peak: GiB; times: ms, first/steady (median of the rest); graphs: one capture after the "
          f"sleep/wake cycles; KL({base} || variant) and |delta logprob| over sampled tokens")
    print(_OPS.header())
    for m in report["models"]:
        if "summary" not in m:
            print(f"{m['model']:13s} ERROR: {failure(m)}")
            continue
        s, lk = m["summary"], m["load_kl"]
        for name, v in m["variants"].items():
            if (why := failure(v)) is not None:
                print(f"{m['model']:13s} {name:15s} {why}")
                continue
            failed = ([k for k, ok in v["checks"].items() if not ok]
                      + [f"{st} error" for st in _STEPS if "error" in v[st]])
            sw, kl = v["sleep_wake"], lk.get("kl", {}).get(name, {})
            peak = lk.get("base" if name == base else "fp8", {}).get("peak_bytes")
            print(_OPS.row([m["model"], name, _x(v["weights_bytes"], ".3f", 2**30), _x(peak, ".3f", 2**30),
                            _fs(v["update"].get("s")), _fs(sw.get("release_s")), _fs(sw.get("resume_s")),
                            ms(sw.get("graph_capture_s")), _x(kl.get("mean_kl"), ".1e"),
                            _x(kl.get("max_abs_dlogprob"), ".3f")],
                           last="ok" if v["ok"] else "FAILED: " + ", ".join(failed)))
        if (why := failure(lk)) is not None:
            print(f"  {m['model']} load peak / KL: {why}")
        print(f"  {m['model']}: fp8 load peak / {base} model {_x(s['fp8_peak_over_bf16_model'])} (target <= "
              f"{_TARGETS['load_peak_over_bf16_model']}; load-then-quantize peak "
              f"{_x(lk.get('load_then_quantize_peak_bytes'), '.3f', 2**30)} GiB); fp8 / {base} steady: update "
              f"{_ratios(s['update_fp8_over_base'])} (target <= {_TARGETS['update_fp8_over_bf16']}), release+resume "
              f"{_ratios(s['sleep_wake_fp8_over_base'])} (target <= {_TARGETS['sleep_wake_fp8_over_bf16']})")
    print(f"note: {_NOTE}")


# -- driver ----------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    report = new_report(cfg, doc=__doc__)
    report.update(models=[], base=cfg.base, note=_NOTE)
    print(f"{report['device']}: {', '.join(cfg.models)}, batches {','.join(cfg.batches)}", flush=True)
    report["floor"] = hbm_bandwidth(cfg.torch_device, repeats=cfg.floor_repeats)
    run_per_model(report, cfg.models, lambda model: bench_model(cfg, model, report["floor"]), device=cfg.torch_device,
                  out=cfg.out, json_name=_JSON_NAME)
    report["all_checks_pass"] = all("summary" in m and all(m["summary"]["checks_pass"].values())
                                    and "error" not in m["load_kl"] for m in report["models"])
    return report


def main() -> None:
    bench_main(BenchConfig, __doc__, helps=_HELPS, run=run_bench, print_report=print_tables, json_name=_JSON_NAME,
               check=("all_checks_pass", "a check failed, or a variant or shape errored (details in the JSON)"))

if __name__ == "__main__":
    main()
