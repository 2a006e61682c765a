"""Trainer memory tiers against their floors: the disk tier's write and read, and AdamW stepped on the host.

    cd scripts && python bench_trainer_memory.py                         # CUDA if present, else CPU
    cd scripts && python bench_trainer_memory.py --device cpu --gib 0.25 --repeats 2    # smoke test
    cd scripts && cat bench_trainer_memory.py | python - --device cpu --gib 0.25 --repeats 2

Method. A stack of square fp32 linears holding `--gib` of parameters, one backward so every parameter
has a gradient, then torch AdamW's state made by one step: parameters, gradients and two moments, 4x
the parameter bytes. Disk tier: `TrainerOffload(..., disk_dir=--dir).release(to="disk")` then
`resume()`, `--repeats` times (median); floor: the same number of bytes written to and read back from a
file in the same folder by plain unbuffered writes of 64 MiB from a host buffer and reads into a newly
allocated one (a resume allocates its destination too), in the same run
(neither calls fsync, so both measure what the folder's file system takes in and gives back, its page
cache included); the two take turns, repeat by repeat. Host AdamW: `HostAdamW.step()` against torch's
AdamW on the parameters' own device, foreach and (where this torch has it for the device) fused, the
median of `--repeats` steps after one warm-up each, with fp32 and with bf16 moments. Numerics
(`--numerics-steps`, 0 to skip): the tiny preset trained in bf16 on a random bigram language (each
token's favourite successor with p = 0.8), the same batches for every optimizer, against fp32 AdamW on
an fp32 copy: the final loss (mean of the last 20 steps) of each host variant, with fp32 moments and
masters, bf16 moments, bf16 moments without masters (stochastic rounding), and the last with round-to-
nearest instead, which shows what the stochastic rounding is for.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import benchlib  # noqa: F401 - run as a file, Python put this folder first on sys.path
except ModuleNotFoundError:  # piped from stdin, it put the working directory there instead: try its scripts/
    sys.path.insert(0, str(Path.cwd() / "scripts"))
from benchlib.config import DeviceDtypeMixin
from benchlib.measure import timed
from benchlib.report import Table, attempt, bench_main, failure, new_report, ratio

from colocate.trainer import TrainerOffload
from colocate.trainer.host_optimizer import HostAdamW

_JSON_NAME = "bench_trainer_memory.json"
_CHUNK = 64 << 20
_HELPS = {"gib": "parameters in GiB (fp32); the disk tier moves 4x that", "dir": "folder for the disk tier "
          "and its floor (local disk; '' = a temporary folder)", "repeats": "timed runs per measure (median)",
          "numerics_steps": "training steps per optimizer in the numerics comparison (0: skip it)"}


@dataclass(kw_only=True)
class BenchConfig(DeviceDtypeMixin):
    device: str = "auto"
    dtype: str = "float32"
    gib: float = 1.0
    width: int = 4096
    dir: str = ""
    repeats: int = 3
    numerics_steps: int = 300
    out: str = "out/bench_trainer_memory.json"

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.check_device_dtype()
        if not 0 < self.gib <= 64 or self.width < 64 or self.repeats < 1:
            raise ValueError("gib must be in (0, 64], width >= 64, repeats >= 1")
        if self.dir and not Path(self.dir).is_dir():
            raise ValueError(f"dir={self.dir!r} is not a folder")


def make_trainer(cfg: BenchConfig) -> tuple[nn.Module, torch.Tensor]:
    layers = max(1, round(cfg.gib * 2**30 / (4 * cfg.width * cfg.width)))
    model = nn.Sequential(*[nn.Linear(cfg.width, cfg.width, bias=False) for _ in range(layers)]).to(cfg.torch_device)
    x = torch.randn(8, cfg.width, device=cfg.torch_device)
    return model, x


def backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=False)
    model(x).pow(2).mean().backward()


def floor_disk(folder: str, data: memoryview) -> dict[str, float]:
    """One plain unbuffered write of `data` in 64 MiB pieces, and a read back into a new buffer (as a resume
    allocates its destination)."""
    nbytes = len(data)
    fd, name = tempfile.mkstemp(prefix="colocate-floor-", dir=folder)
    try:
        start = time.perf_counter()
        with os.fdopen(fd, "wb", buffering=0) as f:
            for i in range(0, nbytes, _CHUNK):
                f.write(data[i:i + _CHUNK])
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        fresh = memoryview(torch.empty(nbytes, dtype=torch.uint8).numpy()).cast("B")
        with open(name, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                done += f.readinto(fresh[done:done + _CHUNK])
        return {"write_s": write_s, "read_s": time.perf_counter() - start}
    finally:
        os.unlink(name)


def bench_disk(cfg: BenchConfig, folder: str) -> dict[str, Any]:
    """The tier and its floor take turns, so both see the same state of the page cache and the disk."""
    model, x = make_trainer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    backward(model, x)
    optimizer.step()  # the moments exist from here
    offload = TrainerOffload(model, optimizer, disk_dir=folder)
    check = [p.detach().clone() for p in list(model.parameters())[:2]]
    runs, floors, data = [], [], None
    for _ in range(cfg.repeats):
        release_s, _ = timed(lambda: offload.release(to="disk"), cfg.torch_device)
        file_bytes = offload.disk.path.stat().st_size
        resume_s, _ = timed(offload.resume, cfg.torch_device)
        runs.append({"release_s": release_s, "resume_s": resume_s, "file_bytes": file_bytes})
        if data is None:
            data = memoryview(torch.ones(file_bytes, dtype=torch.uint8).numpy()).cast("B")
        floors.append(floor_disk(folder, data))
    intact = all(torch.equal(a, b) for a, b in zip(check, list(model.parameters())[:2]))
    nbytes = runs[0]["file_bytes"]
    floor = {k: statistics.median(f[k] for f in floors) for k in ("write_s", "read_s")} | {"runs": floors}
    release_s, resume_s = (statistics.median(r[k] for r in runs) for k in ("release_s", "resume_s"))
    return {"bytes": nbytes, "runs": runs, "release_s": release_s, "resume_s": resume_s, "floor": floor,
            "release_x_floor": ratio(release_s, floor["write_s"]), "resume_x_floor": ratio(resume_s, floor["read_s"]),
            "write_gb_s": nbytes / release_s / 1e9, "read_gb_s": nbytes / resume_s / 1e9,
            "weights_intact": intact}


def step_seconds(model: nn.Module, x: torch.Tensor, optimizer: Any, cfg: BenchConfig) -> float:
    backward(model, x)
    optimizer.step()  # warm-up: state allocated
    seconds = []
    for _ in range(cfg.repeats):
        backward(model, x)
        seconds.append(timed(optimizer.step, cfg.torch_device)[0])
    return statistics.median(seconds)


def bench_optimizer(cfg: BenchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    variants = {"host": lambda ps: HostAdamW(ps, lr=1e-4),
                "host_bf16_state": lambda ps: HostAdamW(ps, lr=1e-4, state_dtype=torch.bfloat16),
                "device_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)}
    if cfg.is_cuda or hasattr(torch._C, "_fused_adamw_"):  # fused AdamW on CPU exists in recent torch
        variants["device_fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
    def one(make: Any) -> dict[str, float]:
        model, x = make_trainer(cfg)  # a fresh model per variant, freed when this returns
        return {"step_s": step_seconds(model, x, make(model.parameters()), cfg)}

    for name, make in variants.items():
        out[name] = attempt(lambda: one(make), label=f"AdamW {name}")
    best = min((v["step_s"] for k, v in out.items() if not k.startswith("host") and "step_s" in v), default=None)
    out["host_over_best_device"] = ratio(out["host"].get("step_s"), best)
    return out


def bench_numerics(cfg: BenchConfig) -> dict[str, Any]:
    """Final training loss of each host AdamW variant against fp32 AdamW, same model, same batches."""
    from colocate.model import DenseCausalAttention, build_model, init_random_weights, preset_config

    config = preset_config("tiny")
    vocab, batch, length, device = config.vocab_size, 16, 64, cfg.torch_device
    favourite = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(length, device=device).repeat(batch)

    def batches() -> Any:
        gen = torch.Generator().manual_seed(1)
        for _ in range(cfg.numerics_steps):
            x = torch.empty(batch, length, dtype=torch.long)
            x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
            for t in range(1, length):
                keep = torch.rand(batch, generator=gen) < 0.8
                x[:, t] = torch.where(keep, favourite[x[:, t - 1]], torch.randint(0, vocab, (batch,), generator=gen))
            yield x.to(device)

    def final_loss(dtype: torch.dtype, make: Any) -> float:
        model = build_model(config, device=device, dtype=dtype, max_positions=length)
        init_random_weights(model, seed=0)
        model.requires_grad_(True).train()
        optimizer, losses = make(model.parameters()), []
        for x in batches():
            hidden = model(x.flatten(), positions, DenseCausalAttention(batch_size=batch, seq_len=length))
            logits = model.compute_logits(hidden).view(batch, length, vocab).float()
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return statistics.mean(losses[-20:])

    def nearest(ps: Any) -> HostAdamW:
        optimizer = HostAdamW(ps, lr=3e-3, state_dtype=torch.bfloat16, master_weights=False)
        optimizer._round = lambda value, dtype: value.to(dtype)
        return optimizer

    bf16 = torch.bfloat16
    runs = {"fp32 AdamW, fp32 weights": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.0)),
            "host, fp32 moments and masters": (bf16, lambda ps: HostAdamW(ps, lr=3e-3)),
            "host, bf16 moments": (bf16, lambda ps: HostAdamW(ps, lr=3e-3, state_dtype=bf16)),
            "host, bf16 moments, no masters": (bf16, lambda ps: HostAdamW(ps, lr=3e-3, state_dtype=bf16,
                                                                         master_weights=False)),
            "the same, rounded to nearest": (bf16, nearest)}
    out = {"steps": cfg.numerics_steps, "final_loss": {}}
    for name, (dtype, make) in runs.items():
        out["final_loss"][name] = attempt(lambda: {"loss": final_loss(dtype, make)}, label=name).get("loss")
        print(f"  {name}: final loss {out['final_loss'][name]}", flush=True)
    return out


_TABLE = Table([("measure", "<34"), ("seconds", ">8"), ("floor", ">8"), ("x floor", ">7")], last="notes")


def print_tables(report: dict[str, Any]) -> None:
    print(f"\n{report['device']}: {report['parameter_bytes'] / 2**30:.2f} GiB of fp32 parameters")
    print(_TABLE.header())
    d = report["disk"]
    if (why := failure(d)) is None:
        f = d["floor"]
        print(_TABLE.row(["disk tier release (write)", f"{d['release_s']:.3f}", f"{f['write_s']:.3f}",
                          f"{d['release_x_floor']:.2f}"],
                         last=f"{d['bytes'] / 2**30:.2f} GiB, {d['write_gb_s']:.2f} GB/s"))
        print(_TABLE.row(["disk tier resume (read)", f"{d['resume_s']:.3f}", f"{f['read_s']:.3f}",
                          f"{d['resume_x_floor']:.2f}"],
                         last=f"{d['read_gb_s']:.2f} GB/s; intact {d['weights_intact']}"))
    else:
        print(f"disk tier: {why}")
    o = report["optimizer"]
    for name in ("host", "host_bf16_state", "device_foreach", "device_fused"):
        if name in o:
            v = o[name]
            print(_TABLE.row([f"AdamW step, {name}", f"{v['step_s']:.3f}" if "step_s" in v else "-", "-", "-"],
                             last=failure(v) or ""))
    print(f"host AdamW step / best on-device AdamW step: {o['host_over_best_device']}")
    if report.get("numerics"):
        n = report["numerics"]
        print(f"\nfinal loss after {n['steps']} steps (tiny preset, bigram language; mean of the last 20):")
        for name, loss in n["final_loss"].items():
            print(f"  {name:<34} {loss if loss is None else f'{loss:.4f}'}")


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    report = new_report(cfg, doc=__doc__)
    model, _ = make_trainer(cfg)
    report["parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    with tempfile.TemporaryDirectory(dir=cfg.dir or None) as folder:
        report["disk"] = attempt(lambda: bench_disk(cfg, folder), label="disk tier")
        report["disk_folder_left_empty"] = not os.listdir(folder)
    report["optimizer"] = bench_optimizer(cfg)
    report["numerics"] = bench_numerics(cfg) if cfg.numerics_steps else None
    report["all_checks_pass"] = bool(report["disk"].get("weights_intact")) and report["disk_folder_left_empty"]
    return report


def main() -> None:
    bench_main(BenchConfig, __doc__, helps=_HELPS, run=run_bench, print_report=print_tables, json_name=_JSON_NAME,
               check=("all_checks_pass", "the disk tier changed the weights or left a file behind"))


if __name__ == "__main__":
    main()
