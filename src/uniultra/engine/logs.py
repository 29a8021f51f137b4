"""Run logs in `out_dir`, every file written atomically (rewritten whole, never appended):

- `steps.csv`: one row per optimiser step (loss terms averaged over processes, lr, grad norm,
  seconds); rewritten at most every `FLUSH_SECONDS`, at every checkpoint and epoch end;
- `epochs.csv`: one row per epoch (mean train loss, val Dice / IoU per dataset and their mean,
  best flag, times);
- `log.json`: run information (command, config, machine, trainable parameters, data counts),
  the epoch rows and the best epoch;
- `curves.png`: train loss per step (+ epoch mean) and val Dice per dataset per epoch.

On resume, rows after the checkpoint's step / epoch are dropped, so every step appears once.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from pathlib import Path
from typing import Any

from uniultra.atomic import atomic_write, atomic_write_text

STEP_FIELDS = ("step", "epoch", "batch", "lr", "loss", "focal", "dice", "iou_loss", "real_iou", "grad_norm",
               "seconds")
FLUSH_SECONDS = 30.0


def _csv_text(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in fields})
    return buffer.getvalue()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: _parse(v) for k, v in row.items()})
    return rows


def _parse(text: str | None) -> Any:
    if text is None or text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def machine_info(ctx) -> dict[str, Any]:
    """Where a run ran (`ctx`: uniultra.engine.distributed's context), for logs and reports."""
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(ctx.device), "processes": ctx.world_size}


def run_info(command: str | None, source: str, config: dict[str, Any], ctx) -> dict[str, Any]:
    """The head of `log.json`: how the run was started, with what config, where."""
    return {"command": command, "config_file": source, "config": config,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(ctx)}


class RunLog:
    """The log files of a run; a subclass changes the step columns (`step_fields`), how the best
    epoch is found again on resume (`_best_epoch`) and the curves (`plot`)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self.best: dict[str, Any] | None = None
        self._last_flush = time.monotonic()

    def restore(self, step: int, epochs_done: int) -> None:
        """Keep what was logged up to a checkpoint (resume)."""
        self.steps = [r for r in _read_csv(self.out_dir / "steps.csv") if int(r["step"]) <= step]
        log_file = self.out_dir / "log.json"
        if log_file.is_file():
            previous = json.loads(log_file.read_text())
            self.epochs = [e for e in previous.get("epochs", []) if e["epoch"] <= epochs_done]
        self.best = self._best_epoch()

    def _best_epoch(self) -> dict[str, Any] | None:
        return max((e for e in self.epochs if e.get("val_dice") is not None),
                   key=lambda e: e["val_dice"], default=None)

    @property
    def step_fields(self) -> list[str]:
        return list(STEP_FIELDS)

    def add_step(self, row: dict[str, Any]) -> None:
        self.steps.append(row)
        if self.enabled and time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush(plot=False)

    def add_epoch(self, row: dict[str, Any], best: dict[str, Any] | None) -> None:
        self.epochs.append(row)
        self.best = best
        self.flush(plot=True)

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
            self.plot(self.out_dir / "curves.png")

    def plot(self, path: Path) -> None:
        plot_curves(path, self.steps, self.epochs)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (runs have no display; imported late, it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_train_loss(ax, steps: list[dict[str, Any]], epochs: list[dict[str, Any]], epoch_label: str) -> None:
    """Train loss per step (faint) and per epoch (mean, at the epoch's last step)."""
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.5, alpha=0.4, label="step")
    done = [e for e in epochs if e.get("train_loss") is not None]
    if done:
        ax.plot([e["end_step"] for e in done], [e["train_loss"] for e in done], "o-", label=epoch_label)


def save_figure(fig, path: Path) -> None:
    """Write a figure atomically as PNG and free it (pyplot keeps every open figure alive)."""
    plt = pyplot()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def plot_curves(path: Path, steps: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    plot_train_loss(ax_loss, steps, epochs, "epoch mean")
    ax_loss.set(xlabel="step", ylabel="train loss", title="training loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    names = sorted({k[len("val_dice_"):] for e in epochs for k in e if k.startswith("val_dice_")})
    for name in names:
        pts = [(e["epoch"], 100 * e[f"val_dice_{name}"]) for e in epochs if e.get(f"val_dice_{name}") is not None]
        ax_val.plot(*zip(*pts, strict=True), "o-", label=name)
    mean = [(e["epoch"], 100 * e["val_dice"]) for e in epochs if e.get("val_dice") is not None]
    if mean and len(names) > 1:
        ax_val.plot(*zip(*mean, strict=True), "k--", lw=2, label="mean")
    ax_val.set(xlabel="epoch", ylabel="Dice %", title="validation Dice (val split)")
    if names:
        ax_val.legend()
    ax_val.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
