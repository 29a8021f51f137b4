"""Run logs of the distillation phase: the engine's RunLog (steps.csv, epochs.csv, log.json, all
written atomically, trimmed on resume) with one column per DSKD term and distillation curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniultra.engine.logs import RunLog, plot_train_loss, pyplot, save_figure


class DistillLog(RunLog):
    def __init__(self, out_dir: str | Path, term_names: tuple[str, ...], enabled: bool = True) -> None:
        super().__init__(out_dir, enabled)
        self.term_names = term_names

    @property
    def step_fields(self) -> list[str]:
        return ["step", "epoch", "batch", "lr", "loss", *self.term_names, "grad_norm", "seconds"]

    def _best_epoch(self) -> dict[str, Any] | None:
        # The lowest val L_DSKD, as the run selects it.
        scored = [e for e in self.epochs if e.get("val_loss") is not None]
        return min(scored, key=lambda e: e["val_loss"], default=None)

    def plot(self, path: Path) -> None:
        plot_distill_curves(path, self.steps, self.epochs, self.term_names)


def plot_distill_curves(path: Path, steps: list[dict[str, Any]], epochs: list[dict[str, Any]],
                        term_names: tuple[str, ...]) -> None:
    """Left: L_DSKD per step and per epoch (train, val). Right: each term per epoch (train solid,
    val dashed), log scale."""
    plt = pyplot()
    fig, (ax_loss, ax_terms) = plt.subplots(1, 2, figsize=(12, 4.2))
    plot_train_loss(ax_loss, steps, epochs, "train (epoch mean)")
    val = [e for e in epochs if e.get("val_loss") is not None]
    if val:
        ax_loss.plot([e["end_step"] for e in val], [e["val_loss"] for e in val], "s--", label="val")
    ax_loss.set(xlabel="step", ylabel="L_DSKD", title="DSKD loss (sum of the terms)")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(term_names):
        color = colors[i % len(colors)]
        pts = [(e["epoch"], e[f"train_{name}"]) for e in epochs if e.get(f"train_{name}") is not None]
        if pts:
            ax_terms.plot(*zip(*pts, strict=True), "o-", color=color, label=name, ms=3)
        pts = [(e["epoch"], e[f"val_{name}"]) for e in epochs if e.get(f"val_{name}") is not None]
        if pts:
            ax_terms.plot(*zip(*pts, strict=True), "--", color=color, ms=3)
    ax_terms.set(xlabel="epoch", ylabel="MSE", title="terms per epoch (solid train, dashed val)")
    ax_terms.set_yscale("log")
    if term_names:
        ax_terms.legend(fontsize=7, ncol=3)
    ax_terms.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
