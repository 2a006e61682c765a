"""bench_weight_sync's summary of one shape and its printed table, with the targets it is judged by."""

from __future__ import annotations

from typing import Any

from benchlib.floors import HBM_FORMULA
from benchlib.report import Table, failure, met, ms, ratio, times

PEERS = ("per_tensor_ipc", "cpu_round_trip", "disk")  # their keys in a shape's results, in the table's order
# The targets: on the 1.5B shape <= 10 ms wall and >= 100x faster than the CPU round trip and the disk path;
# with checksums on, the steady update at most this many times its HBM floor.
_TARGET_MODEL = "qwen2.5-1.5b"
_TARGET_S = 0.010
_TARGET_SPEEDUP = 100.0
_TARGET_X_FLOOR = {"qwen2.5-1.5b": 5.0, "qwen2.5-7b": 3.0}


# -- the table -------------------------------------------------------------------------------
def summarize_model(out: dict[str, Any]) -> dict[str, Any]:
    steady = out["colocate"]["wall_s"]["steady"]
    peers = {k: out[k].get("total_s", {}).get("steady") for k in PEERS}
    errors = [k for k in (*PEERS, "reference") if "error" in out.get(k, {})]
    s = {"weights_bytes": out["weights_bytes"], "floor_s": out.get("floor_s"),
         "colocate_first_s": out["colocate"]["wall_s"]["first"], "colocate_steady_s": steady,
         "x_floor": ratio(steady, out.get("floor_s")), **{f"{k}_s": v for k, v in peers.items()},
         "speedup": {k: ratio(v, steady) for k, v in peers.items()}, "errors": errors,
         "all_checks_pass": not errors and "ipc_equals_reference" in out["checks"] and all(out["checks"].values())}
    if out["model"] in _TARGET_X_FLOOR and s["x_floor"] is not None:
        s["x_floor_target"] = {"at_most": _TARGET_X_FLOOR[out["model"]],
                               "met": s["x_floor"] <= _TARGET_X_FLOOR[out["model"]]}
    if out["model"] == _TARGET_MODEL:
        s["targets"] = {"steady_s_at_most": _TARGET_S, "steady_met": steady <= _TARGET_S,
                        "speedup_at_least": _TARGET_SPEEDUP,
                        **{f"vs_{k}_met": (x >= _TARGET_SPEEDUP if x is not None else None)
                           for k, x in s["speedup"].items() if k != "per_tensor_ipc"}}
    return s


_TABLE = Table([("model", "<14"), ("GB", ">6"), ("floor", ">6"), ("first", ">7"), ("steady", ">7"), ("x floor", ">7"),
                ("per-tensor", ">10"), ("cpu rt", ">8"), ("disk", ">8"), ("vs pt", ">6"), ("vs cpu", ">7"),
                ("vs disk", ">7")], last="checks")


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['device']}, {report['config']['dtype']}, buckets of {report['config']['bucket_mib']} MiB; "
          f"times in ms (colocate: first / steady; peers: steady)")
    floor = report["floor"]
    if "read_write_bytes_per_s" in floor:
        print(f"HBM read+write {floor['read_write_bytes_per_s'] / 1e12:.2f} TB/s; {HBM_FORMULA.split(';')[0]}")
    else:
        print(f"HBM floor: {failure(floor)}")
    print(_TABLE.header())
    for m in report["models"]:
        if "summary" not in m:
            print(f"{m['model']:14s} ERROR: {m.get('error', '?').strip().splitlines()[-1][:200]}")
            continue
        s, x = m["summary"], m["summary"]["speedup"]
        peer_cells = ["error" if "error" in m[k] else "skip" if "skipped" in m[k] else ms(m[k]["total_s"]["steady"])
                      for k in PEERS]
        failed = [k for k, ok in m["checks"].items() if not ok] + [f"{k} error" for k in s["errors"]]
        if "ipc_equals_reference" not in m["checks"]:
            failed.append("no reference")
        print(_TABLE.row([m["model"], f"{s['weights_bytes'] / 1e9:.2f}", ms(s["floor_s"]), ms(s["colocate_first_s"]),
                          ms(s["colocate_steady_s"]), "-" if s["x_floor"] is None else f"{s['x_floor']:.1f}",
                          *peer_cells, *(times(x[k]) for k in PEERS)],
                         last="ok" if s["all_checks_pass"] else "FAILED: " + ", ".join(failed)))
        if "x_floor_target" in s:
            t = s["x_floor_target"]
            print(f"  target ({m['model']}): steady <= {t['at_most']:.0f}x its floor: {met(t['met'])}")
        if "targets" in s:
            t = s["targets"]
            print(f"  target ({m['model']}): steady <= {ms(_TARGET_S)} ms: {'met' if t['steady_met'] else 'MISSED'}; "
                  f">= {_TARGET_SPEEDUP:.0f}x vs CPU round trip: {met(t.get('vs_cpu_round_trip_met'))}, "
                  f"vs disk: {met(t.get('vs_disk_met'))}")
