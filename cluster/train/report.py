"""Plots of a run from its RUN_DIR/metrics.jsonl: losses, expert load per MoE layer, balance."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cluster.train.driver import read_metrics  # noqa: E402


def plot_losses(records: list[dict], out: Path) -> Path:
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    aux = {r["step"]: r["aux_loss"] for r in records if "aux_loss" in r}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(list(train), list(train.values()), label="train", lw=1)
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    if aux:
        twin = ax.twinx()
        twin.plot(list(aux), list(aux.values()), color="tab:red", alpha=0.6, lw=1, label="MoE aux (right)")
        twin.set_ylabel("auxiliary loss")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, out / "loss.png")


def moe_table(records: list[dict]) -> tuple[list[int], dict[int, list[dict]]]:
    """Steps with MoE statistics and, per layer, the statistics at those steps."""
    steps, by_layer = [], {}
    for r in records:
        if r.get("moe"):
            steps.append(r["step"])
            for s in r["moe"]:
                by_layer.setdefault(s["layer"], []).append(s)
    return steps, by_layer


def plot_expert_load(steps: list[int], stats: list[dict], layer: int, out: Path) -> Path:
    """Heatmap of each expert's share of the layer's tokens over steps (1/E = balanced)."""
    load = np.array([s["tokens_per_expert"] for s in stats], dtype=float)
    share = load / np.maximum(load.sum(1, keepdims=True), 1)
    E = share.shape[1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * E + 2))
    im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, E - 0.5), vmin=0, vmax=max(2.0 / E, share.max()))
    ax.set(xlabel="step", ylabel="expert", title=f"Layer {layer}: share of tokens per expert (balanced = {1 / E:.3f})")
    fig.colorbar(im, ax=ax, label="share of tokens")
    return _save(fig, out / f"expert_load_layer{layer}.png")


def plot_balance(steps: list[int], by_layer: dict[int, list[dict]], out: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for layer, stats in sorted(by_layer.items()):
        a.plot(steps, [s["imbalance"] for s in stats], label=f"layer {layer}")
        b.plot(steps, [100 * s["dropped_frac"] for s in stats], label=f"layer {layer}")
    a.axhline(1.0, color="grey", ls="--", lw=0.8)
    a.set(xlabel="step", ylabel="max / mean tokens per expert", title="Load imbalance")
    b.set(xlabel="step", ylabel="% of token copies", title="Dropped by capacity")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "balance.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    records = read_metrics(run_dir)
    if not any("loss" in r for r in records):
        raise FileNotFoundError(f"{run_dir} has no metrics (metrics.jsonl is missing or has no training step); "
                                "was the run started with metrics.jsonl: false?")
    out = Path(out) if out else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_losses(records, out)]
    steps, by_layer = moe_table(records)
    if steps:
        paths += [plot_expert_load(steps, stats, layer, out) for layer, stats in sorted(by_layer.items())]
        paths.append(plot_balance(steps, by_layer, out))
    return paths
