"""Epoch / step scaffolding shared by `uniultra train` (Trainer) and `uniultra distill`
(Distiller): the loop over an epoch's batches with progress, step logs and mid-epoch
checkpoints, and the loop over epochs with validation, best-epoch selection, epoch logs and
the resume state.

What a run does in one step, how it validates and what it saves stay in the subclass; this base
only fixes the order of things, which exact resumption depends on (a step is logged and counted
before a mid-epoch checkpoint, an epoch's best checkpoint is written before its resume state).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from uniultra.engine.checkpointing import LAST, write_state
from uniultra.engine.data import EpochSampler


class EpochLoop:
    """Base of a trainer. The subclass sets, before the loop runs: `config` (with `optim`,
    `progress`, `log_every`, `checkpoint_every`), `ctx` (uniultra.engine.distributed), `state`
    (epoch, step, batch_in_epoch, best_score, best_epoch), `hooks` (on_step_end, on_epoch_end),
    `train_set` then `_setup_loader(...)`, `log` (a RunLog), `optimisation`, `out_dir`; and
    implements `_train_step`, `validate`, `_save_best`, `_save_last`, `_step_line`, `_epoch_row`,
    `_epoch_line`."""

    epoch_label = "epoch"  # progress-bar prefix
    loss_format = ".4f"  # of the loss in the progress bar
    score_key = "dice"  # the key of `validate()`'s result that selects the best epoch
    higher_is_better = True

    def __init__(self, config: Any, *, resume: bool, hooks: Any, command: str | None, source: str,
                 state: Any) -> None:
        """`command` and `source` (the config file) are only recorded in the logs."""
        self.config = config
        self.resume = resume
        self.hooks = hooks
        self.command = command
        self.source = source
        self.out_dir = Path(config.out_dir)
        self.state = state

    def _say(self, text: str) -> None:
        if self.ctx.is_main:
            print(text, flush=True)

    def lr_at(self, epoch: int, step: int) -> float:
        return self.optimisation.lr_at(epoch, step)

    def _autocast(self):
        return self.optimisation.autocast()

    def _setup_loader(self, collate, what: str) -> None:
        """Sampler, loader and steps per epoch over `self.train_set` (`what`: its items, for errors).

        Full batches only, in an order fixed by (seed, epoch) and sharded over processes, so a
        resumed epoch can skip exactly the batches already done."""
        cfg, ctx = self.config, self.ctx
        self.sampler = EpochSampler(self.train_set, ctx.world_size, ctx.rank, cfg.seed)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=cfg.optim.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=cfg.num_workers, collate_fn=collate, pin_memory=ctx.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
        )
        self.steps_per_epoch = len(self.sampler) // cfg.optim.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} {what} give no full batch of "
                             f"{cfg.optim.batch_size} per process ({ctx.world_size} processes)")

    # -- one epoch ------------------------------------------------------------------------------

    def _record_step(self, row: dict[str, Any]) -> None:
        """Log a finished step (a subclass may also account for it, e.g. its time)."""
        self.log.add_step(row)

    def _epoch(self, epoch: int) -> tuple[float, int]:
        """Train the rest of one epoch; returns (seconds, steps done now)."""
        cfg, state = self.config, self.state
        # A resumed epoch skips the batches already done, in the same (seed, epoch) order.
        self.sampler.set_epoch(epoch, skip=state.batch_in_epoch * cfg.optim.batch_size)
        total = self.steps_per_epoch
        bar = None
        if cfg.progress and self.ctx.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, initial=state.batch_in_epoch,
                       desc=f"{self.epoch_label} {epoch + 1}/{cfg.optim.epochs}",
                       unit="step", leave=False, mininterval=1.0)
        start = step_start = time.perf_counter()
        done = 0
        for batch in self.loader:
            done += 1
            row = self._train_step(batch, epoch)
            state.step += 1
            state.batch_in_epoch += 1
            now = time.perf_counter()
            row = {"step": state.step, "epoch": epoch + 1, "batch": state.batch_in_epoch, **row,
                   "seconds": now - step_start}
            step_start = now
            self._record_step(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=format(row["loss"], self.loss_format), lr=f"{row['lr']:.2e}", refresh=False)
            elif state.step % max(cfg.log_every, 1) == 0:
                self._say(self._step_line(epoch, row))
            # The epoch end saves anyway, so a checkpoint on its last batch would be redundant.
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch_in_epoch < total:
                self._save_last()
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(state)
        if bar is not None:
            bar.close()
        return time.perf_counter() - start, done

    # -- all epochs -----------------------------------------------------------------------------

    def _improves(self, score: float | None) -> bool:
        # Without a score (no val split) every epoch is "best", so the last one is kept.
        best = self.state.best_score
        if score is None or best is None:
            return True
        return score > best if self.higher_is_better else score < best

    def _run_epochs(self) -> None:
        cfg, state = self.config, self.state
        while state.epoch < cfg.optim.epochs:
            epoch = state.epoch
            train_seconds, steps_now = self._epoch(epoch)
            state.epoch += 1
            state.batch_in_epoch = 0
            val_start = time.perf_counter()
            val = self.validate()
            val_seconds = time.perf_counter() - val_start
            score = val[self.score_key] if val else None
            improved = self._improves(score)
            if improved:
                state.best_score, state.best_epoch = score, state.epoch
                self._save_best(val)
            seconds = {"seconds_train": train_seconds, "seconds_val": val_seconds,
                       "seconds_per_step": train_seconds / steps_now if steps_now else None}
            row = self._epoch_row(epoch, val, bool(improved and score is not None), seconds)
            self.log.add_epoch(row, {"epoch": state.best_epoch, f"val_{self.score_key}": state.best_score})
            self._save_last()
            self.ctx.barrier()
            self._say(self._epoch_line(row, val))
            if self.hooks.on_epoch_end is not None:
                self.hooks.on_epoch_end(state, row)

    @staticmethod
    def _timing_text(row: dict[str, Any]) -> str:
        """The end of an epoch line: train+val seconds and seconds per step."""
        return (f"{row['seconds_train']:.0f}+{row['seconds_val']:.0f} s"
                + (f"  {row['seconds_per_step']:.3f} s/step" if row["seconds_per_step"] else ""))

    def _write_last(self, document: dict[str, Any]) -> None:
        """Write the resume state, then the logs up to it (so a resume finds both consistent)."""
        write_state(self.out_dir / LAST, document)
        self.log.flush()
