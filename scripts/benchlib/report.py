"""The bench report: its header, rows against floor, target and peers, peer errors, text tables, the JSON file."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchlib.config import DeviceDtypeMixin, allow_spawn_from_stdin, parse_config
from benchlib.device import free_device


# -- cells -----------------------------------------------------------------------------------
def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing or b is 0 (no floor: nothing has to move)."""
    return a / b if a is not None and b else None


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def met(value: bool | None) -> str:
    return "not measured" if value is None else "met" if value else "MISSED"


# -- rows ------------------------------------------------------------------------------------
def target_row(operation: str, measured: Mapping[str, float | None], *, floor_s: float | None,
               target_s: float | None) -> dict[str, Any]:
    """One operation against its floor and its target (at most `target_s`, on the steady time)."""
    steady = measured["steady"]
    return {"operation": operation, "first_s": measured["first"], "steady_s": steady, "floor_s": floor_s,
            "x_floor": ratio(steady, floor_s), "target_s": target_s,
            "meets_target": None if target_s is None or steady is None else steady <= target_s}


def peer_row(operation: str, ours: Mapping[str, float | None], peer: str,
             theirs: Mapping[str, float | None]) -> dict[str, Any]:
    """One operation against a peer's: both first and steady times, and the speed-ups (theirs over ours)."""
    return {"operation": operation, "peer": peer, "peer_first_s": theirs["first"], "peer_steady_s": theirs["steady"],
            "first_s": ours["first"], "steady_s": ours["steady"],
            "speedup_first": ratio(theirs["first"], ours["first"]),
            "speedup_steady": ratio(theirs["steady"], ours["steady"])}


TARGET_COLUMNS = (("operation", "<44"), ("first", ">8"), ("steady", ">8"), ("floor", ">7"), ("x floor", ">7"),
                  ("target", ">7"), ("ok", ">3"))
PEER_COLUMNS = (("colocate vs peer", "<32"), ("peer", "<38"), ("peer first", ">10"), ("steady", ">8"),
                ("ours first", ">10"), ("steady", ">8"), ("speedup f/s", ">12"))


def target_cells(row: Mapping[str, Any]) -> list[str]:
    """A `target_row` under TARGET_COLUMNS: times in ms, x floor to two places, ok as yes / NO / -."""
    ok = "-" if row["meets_target"] is None else "yes" if row["meets_target"] else "NO"
    x = "-" if row["x_floor"] is None else f"{row['x_floor']:.2f}"
    return [row["operation"], ms(row["first_s"]), ms(row["steady_s"]), ms(row["floor_s"]), x, ms(row["target_s"]), ok]


def peer_cells(row: Mapping[str, Any]) -> list[str]:
    """A `peer_row` under PEER_COLUMNS: times in ms, speed-ups first / steady."""
    sf, ss = row["speedup_first"], row["speedup_steady"]
    speed = f"{sf:.1f}x/{ss:.1f}x" if sf is not None and ss is not None else "-"
    return [row["operation"], row["peer"], ms(row["peer_first_s"]), ms(row["peer_steady_s"]), ms(row["first_s"]),
            ms(row["steady_s"]), speed]


@dataclasses.dataclass(frozen=True)
class Table:
    """A fixed-width text table: columns of (title, format spec), then an optional free-width last column.

        table = Table([("operation", "<12"), ("steady", ">8")], last="notes")
        print(table.header())                                  # operation      steady  notes
        print(table.row(["release", ms(0.0725)], last="kv"))   # release          72.5  kv
    """

    columns: Sequence[tuple[str, str]]
    last: str | None = None

    def header(self) -> str:
        return self.row([title for title, _ in self.columns], last=self.last)

    def row(self, cells: Sequence[str], *, last: str | None = None) -> str:
        assert len(cells) == len(self.columns), f"{len(cells)=} {len(self.columns)=}"
        line = " ".join(format(cell, spec) for cell, (_, spec) in zip(cells, self.columns))
        return line if last is None else f"{line}  {last}"


# -- failures --------------------------------------------------------------------------------
def error_result(exc: BaseException, *, max_traceback_chars: int | None = 3000) -> dict[str, str]:
    """{"error": the exception and the end of its traceback (None: all of it)}."""
    trace = "".join(traceback.format_exception(exc))
    return {"error": f"{type(exc).__name__}: {exc}\n{trace[-max_traceback_chars:] if max_traceback_chars else trace}"}


def attempt(step: Callable[[], dict[str, Any]], *, label: str) -> dict[str, Any]:
    """`step()`, or its error as the result: a failing peer is a result, not a crash, and the next steps run."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001
        print(f"  {label} ERROR {type(exc).__name__}: {exc}", flush=True)
        return error_result(exc)


def failure(result: Mapping[str, Any]) -> str | None:
    """Why a peer has no numbers (skipped, failed, or exited badly), on one line; None if it has them."""
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    msg = result.get("error") or result.get("exit_error")
    if not msg:
        return None
    lines = [x for x in msg.strip().splitlines() if x.strip()]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")[:300]


# -- the report ------------------------------------------------------------------------------
def new_report(cfg: DeviceDtypeMixin, *, doc: str) -> dict[str, Any]:
    """The report's header: device, versions, date, config and the method (`doc` after "Method.")."""
    device = cfg.torch_device
    if cfg.is_cuda and device.index is not None:
        torch.cuda.set_device(device)  # raises for a bare "cuda" (no index)
    assert dataclasses.is_dataclass(cfg), f"{type(cfg)=}"
    return {"device": torch.cuda.get_device_name(device) if cfg.is_cuda else "cpu", "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(cfg), "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "method": doc.split("Method.")[1]}


def write_json(report: dict[str, Any], *, out: str, name: str,
               default: Callable[[Any], Any] | None = str) -> Path:
    """Write `report` to `$OUT/name` when $OUT is set (results come back from there), else to `out`.

    `default` turns values JSON cannot hold into something it can; None makes them an error instead.
    """
    path = Path(os.environ["OUT"]) / name if os.environ.get("OUT") else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=default))
    return path


def run_per_model(report: dict[str, Any], models: Sequence[str], bench: Callable[[str], dict[str, Any]], *,
                  device: torch.device, out: str, json_name: str) -> None:
    """`bench(model)` for each model into `report["models"]`, with its wall time; a model that fails (e.g. out
    of memory) gets its error there and the others still run; the JSON is written after each model."""
    for model in models:
        start = time.perf_counter()
        try:
            report["models"].append(bench(model))
        except Exception as exc:  # noqa: BLE001 - one shape failing must not lose the others
            report["models"].append({"model": model, **error_result(exc, max_traceback_chars=None)})
            print(f"  {model}: ERROR {type(exc).__name__}: {exc}", flush=True)
            free_device(device)
        report["models"][-1]["wall_s"] = time.perf_counter() - start
        print(f"  {model}: {report['models'][-1]['wall_s']:.0f} s", flush=True)
        write_json(report, out=out, name=json_name)  # partial results survive a later failure


def bench_main(config_cls: type, doc: str, *, helps: Mapping[str, str], run: Callable[[Any], dict[str, Any]],
               print_report: Callable[[dict[str, Any]], None], json_name: str, check: tuple[str, str] | None = None,
               without: Sequence[str] = ()) -> None:
    """A bench script's `main`: flags into its config, the run, its wall time, the JSON, the table, and then
    the script's correctness check (`check` = (report key that must be true, message)) as an assertion."""
    allow_spawn_from_stdin()
    cfg = parse_config(config_cls, description=doc.splitlines()[0], helps=helps, without=without)
    start = time.perf_counter()
    report = run(cfg)
    report["bench_wall_s"] = time.perf_counter() - start
    path = write_json(report, out=cfg.out, name=json_name)
    print(f"\nwrote {path} ({report['bench_wall_s']:.0f} s)")
    print_report(report)
    if check is not None:
        key, message = check
        assert report[key], message
