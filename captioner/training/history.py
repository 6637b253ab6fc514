"""A run's history: ``metrics.jsonl`` (one row per completed epoch) and the curves plot."""
from __future__ import annotations

import json
from pathlib import Path

from captioner.io import atomic_write, atomic_write_text


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl rewritten whole and atomically: never a torn line nor, after a resume, a
    repeated epoch."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def plot_history(history: list[dict], path: Path, monitor: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(epochs, [h["train/loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h.get(f"val/{monitor}") for h in history], "s-", color="tab:red", label=f"val {monitor}")
    ax2.set_ylabel(f"val {monitor} (0-1)", color="tab:red")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
