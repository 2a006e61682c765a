"""bench_rollout's table: the rollout, n=1 against n=N (whole and prefill), the profiled idle share, the peer."""

from __future__ import annotations

from typing import Any

from benchlib.report import Table, failure, ratio, times

PREFILL_TARGET_X = 1.2  # the target: the prefill of n=8 at most 1.2x that of n=1


_TABLE = Table([("operation", "<38"), ("wall s", ">8"), ("tokens", ">9"), ("tok/s", ">9"), ("mean len", ">8"),
                ("max len", ">7")], last="notes")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_table(report: dict[str, Any]) -> None:
    cfg, n = report["config"], report["config"]["n"]
    print(f"\n{report['device']}, {cfg['model']} {cfg['dtype']}, {cfg['num_prompts']} prompts of "
          f"{cfg['min_prompt_len']}-{cfg['max_prompt_len']} tokens, n={n}, <= {cfg['max_new_tokens']} new tokens, "
          f"stop rate {cfg['stop_rate']:.5f}, max_num_seqs {cfg['max_num_seqs']}")
    print(_TABLE.header())

    def row(label: str, r: dict[str, Any], notes: str = "") -> None:
        keys = ("generated_tokens", "tokens_per_s", "mean_response_len", "max_response_len")
        cells = [f"{r['wall_s']:.3f}", *(f"{r[k]:.0f}" if k in r else "-" for k in keys)] if "wall_s" in r else "-" * 5
        print(_TABLE.row([label, *cells], last=notes if "wall_s" in r else failure(r) or "not run"))

    r, n1 = report.get("rollout", {}), report.get("n1", {})
    floor = f"; {r['x_floor']:.1f}x the HBM floor ({r['floor_s']:.2f} s)" if "floor_s" in r else ""
    row(f"rollout n={n}", r, f"prompt tokens {r.get('prompt_tokens')}; stopped {pct(r.get('stopped_share'))}, stop "
        f"rate {r.get('measured_stop_rate', 0):.5f}; idle (nvml) {pct(r.get('idle_share'))}{floor}")
    sep, pre, checks = n1.get("separate", n1), n1.get("prefill"), n1.get("checks", {})
    row(f"n=1: {n} seeded requests per prompt", sep, f"{times(ratio(sep.get('wall_s'), r.get('wall_s')))} the n={n} "
        f"wall; responses equal to n={n}'s: {pct(n1.get('responses_equal_share'))}")
    if pre:
        ok = "met" if pre["x_n1"] <= PREFILL_TARGET_X else "MISSED"
        row(f"prefill n={n} (max_new_tokens=1)", {"wall_s": pre["n_s"]},
            f"{pre['x_n1']:.2f}x n=1 (target <= {PREFILL_TARGET_X}x: {ok})")
        row("prefill n=1", {"wall_s": pre["n1_s"]}, f"prompt tokens {pre['prompt_tokens']}")
        row(f"prefill {n} separate requests", {"wall_s": pre["separate_s"]}, f"first tokens equal n={n}'s: "
            f"{checks['first_tokens_equal_separate']} ({pct(checks['first_tokens_equal_share'])})")
    prof, sub, peer = (report.get(k, {}) for k in ("idle_profile", "colocate_subset", "peer"))
    row(f"rollout n={n}, {cfg['profile_prompts']} prompts, profiled", prof, f"idle {pct(prof.get('idle_share'))} "
        f"({prof.get('device_events')} device events)")
    row(f"colocate n={n}, {cfg['peer_prompts']} prompts", sub)
    speedup = times(ratio(sub.get("tokens_per_s"), peer.get("tokens_per_s")))
    row(f"transformers {peer.get('cache', '')}, {cfg['peer_prompts']} prompts", peer,
        f"colocate {speedup} its tok/s; warm-up {peer.get('warmup_s', 0):.1f} s")
