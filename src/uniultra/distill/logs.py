"""Run logs of the distillation phase: the engine's RunLog (steps.csv, epochs.csv, log.json, all
written atomically, trimmed on resume) with one column per DSKD term and distillation curves."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from uniultra.atomic import atomic_write, atomic_write_text
from uniultra.engine.logs import RunLog


def _csv_text(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]
                         for k in fields})
    return buffer.getvalue()


class DistillLog(RunLog):
    def __init__(self, out_dir: str | Path, term_names: tuple[str, ...], enabled: bool = True) -> None:
        super().__init__(out_dir, enabled)
        self.term_names = term_names

    @property
    def step_fields(self) -> list[str]:
        return ["step", "epoch", "batch", "lr", "loss", *self.term_names, "grad_norm", "seconds"]

    def restore(self, step: int, epochs_done: int) -> None:
        super().restore(step, epochs_done)
        scored = [e for e in self.epochs if e.get("val_loss") is not None]
        self.best = min(scored, key=lambda e: e["val_loss"], default=None)

    def flush(self, plot: bool = False) -> None:
        if not self.enabled:
            return
        self._last_flush = time.monotonic()
        atomic_write_text(self.out_dir / "steps.csv", _csv_text(self.steps, self.step_fields))
        fields: list[str] = []
        for row in self.epochs:
            fields += [k for k in row if k not in fields and not isinstance(row[k], dict | list)]
        atomic_write_text(self.out_dir / "epochs.csv", _csv_text(self.epochs, fields))
        document = {**self.info, "epochs": self.epochs, "best": self.best}
        atomic_write_text(self.out_dir / "log.json", json.dumps(document, indent=1) + "\n")
        if plot:
            plot_distill_curves(self.out_dir / "curves.png", self.steps, self.epochs, self.term_names)


def plot_distill_curves(path: Path, steps: list[dict[str, Any]], epochs: list[dict[str, Any]],
                        term_names: tuple[str, ...]) -> None:
    """Left: L_DSKD per step and per epoch (train, val). Right: each term per epoch (train solid,
    val dashed), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_terms) = plt.subplots(1, 2, figsize=(12, 4.2))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.5, alpha=0.4, label="step")
    done = [e for e in epochs if e.get("train_loss") is not None]
    if done:
        ax_loss.plot([e["end_step"] for e in done], [e["train_loss"] for e in done], "o-", label="train (epoch mean)")
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

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)
