"""The example's plots of per-iteration training statistics and of the held-out evaluation (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The per-iteration health of the policy: what to read when a reward curve falls after its peak.
TRAINING_PANELS = (("reward_mean", "mean reward"), ("entropy", "policy entropy (nats/token)"),
                   ("kl_to_reference", "KL to reference (nats/token)"), ("clip_fraction", "clip fraction"),
                   ("grad_norm", "gradient norm (before clipping)"),
                   ("logprob_gap_max_abs", "engine vs trainer |logprob gap|, max"))


def plot_training(records: list[dict[str, Any]], out: Path) -> None:
    """OUT/training.png: reward, entropy, KL to the reference, clip fraction, gradient norm and logprob gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 5.5), sharex=True)
    x = [r["iteration"] for r in records]
    for ax, (key, label) in zip(axes.flat, TRAINING_PANELS):
        y = [r["reward_mean"] if key == "reward_mean" else r["stats"].get(key, float("nan")) for r in records]
        ax.plot(x, y, marker=".", ms=3)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.suptitle(f"{records[0].get('algo', 'ppo').upper()}: per-iteration training statistics", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)


def plot_eval(evals: dict[str, Any], out: Path) -> None:
    """OUT/eval.png: held-out greedy score at the start, after the warm start, during and after RL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    curve = evals["curve"]
    ax.plot([i for i, _ in curve], [v for _, v in curve], marker="o", label="held-out problems")
    if evals.get("train_curve"):
        train = evals["train_curve"]
        ax.plot([i for i, _ in train], [v for _, v in train], marker=".", ls="--", label="training problems")
    if evals.get("init") is not None:
        ax.axhline(evals["init"], color="gray", ls=":", label=f"before the warm start: {evals['init']:.3f}")
    ax.annotate(f"{evals['before_rl']:.3f}", (curve[0][0], curve[0][1]), textcoords="offset points", xytext=(4, 6))
    ax.annotate(f"{evals['after_rl']:.3f}", (curve[-1][0], curve[-1][1]), textcoords="offset points", xytext=(-20, 6))
    ax.set(xlabel="RL iteration (0 = before RL)", ylabel="held-out greedy score", ylim=(-0.02, 1.02),
           title=f"{evals['task']}: held-out evaluation ({evals['num_prompts']} prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=120)
    plt.close(fig)
