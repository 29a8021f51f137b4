"""The distillation run: `distill(config)` (what `uniultra distill` runs), see docs/distill.md.

Phase 1, DSKD (SPEC 4): per step the frozen teacher's taps (computed, or read from the teacher
cache) and the student's taps through their necks give L_DSKD; Adam(W) with the engine's schedule
`lr * gamma**epoch * min(1, (step + 1) / warmup_steps)`, gradient clipping, optional EMA. Trained:
the student trunk up to the last distilled stage with its adapters, and the necks; frozen: the
teacher, the student's later stages and FPN neck (outside L_DSKD) and the inherited prompt
encoder, mask decoder and no_mem_embed (distillation happens at the encoder only). Per epoch:
L_DSKD on the val split (un-augmented; never the test split); `distilled.pt` keeps the student of
the best (lowest) val L_DSKD, or of the last epoch without a val split.

With an `mdkd` section the phase is MDKD instead (uniultra.distill.mdkd; SPEC 5): the student gets
a modality controller, a second (general) teacher gives common terms for the shared weights, the
adapted teacher's terms train the controller, each sample under its dataset's modality; the rest
(schedule, cache, validation, checkpoints with `meta.modality_controller`, resume) is the same.

Phase 2, optional (`finetune.epochs > 0`): end-to-end fine-tuning of the distilled student with the
segmentation loss by the training engine (uniultra.engine.trainer.Trainer, handed the student
prebuilt), in `<out_dir>/finetune` with its own logs, last.pt and best.pt (val Dice selection).
The student's later stages and FPN neck are first trained here, so a usable segmenter needs it.
An MDKD student is fine-tuned with its controller, which trains too: the engine selects each
sample's modality from its data entry's label, as MDKD did.

Files in `out_dir`:
- `student.pt`   THE result: the full student (mini trunk + adapters + FPN neck + inherited or
  fine-tuned decoder), every weight, `meta.peft` so `load_model("student.pt")` rebuilds the adapters;
  it is finetune/best.pt when fine-tuning ran, else distilled.pt;
- `distilled.pt` the student after DSKD (same format);
- `last.pt`      resume state of the DSKD phase (student + necks, optimiser, EMA, RNG states, epoch,
  step, position in the epoch); written atomically at epoch ends and every `checkpoint_every` steps;
- `steps.csv`, `epochs.csv`, `log.json`, `curves.png`: DSKD logs (one column per term);
- `distill_report.json`: config, teacher identity, parameter counts, per-term losses, timings,
  fine-tuning result, output files;
- `teacher_cache/` (when enabled without a `dir`), `finetune/`.

Resume (`--resume`): data order is a function of (seed, epoch), each sample's augmentation of
(seed, epoch, index), RNG states are restored, so a resumed run reproduces the uninterrupted one
bit for bit on CPU (same seed and process count). A finished DSKD phase is not redone; the
fine-tuning phase resumes through the engine's own mechanism.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniultra.atomic import atomic_write, atomic_write_text
from uniultra.distill import data as DD
from uniultra.distill.config import DistillConfig, term_name
from uniultra.distill.logs import DistillLog
from uniultra.distill.mdkd import COMMON_TAP, MDKD, general_taps, load_general_teacher
from uniultra.distill.model import (
    DSKD,
    build_student,
    load_teacher,
    mark_dskd_trainable,
    mark_finetune_trainable,
    resolve_student_peft,
    stage_strides,
    teacher_taps,
)
from uniultra.engine import data as D
from uniultra.engine.checkpointing import (
    LAST,
    check_config_unchanged,
    check_world_size,
    existing_state,
    progress_entries,
    read_state,
    restore_progress,
    resumed_message,
)
from uniultra.engine.distributed import setup
from uniultra.engine.epoch_loop import EpochLoop
from uniultra.engine.logs import machine_info, run_info
from uniultra.engine.optimisation import Optimisation
from uniultra.engine.rng import seed_all
from uniultra.engine.trainer import TrainHooks
from uniultra.engine.weights_hash import write_weights_hash
from uniultra.inference.loading import base_identity, load_model
from uniultra.models.checkpoint import CONTROLLER_META, WEIGHTS_FULL, save_model
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft.config import PeftConfig
from uniultra.peft.controller import attach_modality_controller, controller_config, controller_parameters

STATE_FORMAT = "uniultra-distill-state"
STATE_VERSION = 1
# Config keys that may change between a run and its resumption (they do not change the DSKD result).
RESUMABLE_CHANGES = ("optim.epochs", "teacher.", "finetune.", "out_dir", "log_every", "checkpoint_every",
                     "num_workers", "device", "progress", "cache_dir", "val_batch_size", "threads",
                     "teacher_cache.dir", "mdkd.general_teacher", "mdkd.general_base")


@dataclass
class DistillState:
    epoch: int = 0  # completed DSKD epochs
    step: int = 0
    batch_in_epoch: int = 0
    best_score: float | None = None  # lowest val L_DSKD so far
    best_epoch: int | None = None
    seconds: float = 0.0  # DSKD training time (steps only), summed over sessions


@dataclass
class DistillHooks:
    """Callbacks for tests and tools; an exception raised here stops the run like a crash would."""

    on_step_end: Callable[[DistillState], None] | None = None
    on_epoch_end: Callable[[DistillState, dict[str, Any]], None] | None = None
    finetune: TrainHooks | None = None


@dataclass
class DistillResult:
    out_dir: Path
    state: DistillState
    student: SAM2ImageModel | None  # the final student (eval mode), on process 0
    report: dict[str, Any] = field(default_factory=dict)


def encoder_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a SAM2ImageModel: image encoder (trunk + FPN neck, adapters included),
    adapters alone, and the whole model."""
    enc = sum(p.numel() for p in model.image_encoder.parameters())
    adapters = sum(p.numel() for n, p in model.image_encoder.named_parameters() if ".adapter." in n)
    return {"encoder": enc, "adapters": adapters, "encoder_without_adapters": enc - adapters,
            "whole": sum(p.numel() for p in model.parameters())}


class Distiller(EpochLoop):
    epoch_label = "DSKD epoch"
    loss_format = ".4g"
    score_key = "loss"  # val L_DSKD: lower is better
    higher_is_better = False

    def __init__(
        self,
        config: DistillConfig,
        *,
        resume: bool = False,
        hooks: DistillHooks | None = None,
        command: str | None = None,
        source: str = "config",
    ) -> None:
        super().__init__(config, resume=resume, hooks=hooks or DistillHooks(), command=command, source=source,
                         state=DistillState())
        self.teacher_identity: dict[str, Any] | None = None
        self.general: SAM2ImageModel | None = None  # MDKD's general teacher
        self.general_identity: dict[str, Any] | None = None
        self.dskd_info: dict[str, Any] = {}
        self.loss_name = "L_MDKD" if config.mdkd is not None else "L_DSKD"

    # -- set-up ---------------------------------------------------------------------------------

    def _peek_last(self) -> dict[str, Any] | None:
        last = existing_state(self.out_dir, self.resume)
        if last is None:
            return None
        return read_state(last, STATE_FORMAT, "distillation state written by uniultra distill")

    def _setup(self, last: dict[str, Any] | None) -> None:
        cfg = self.config
        if cfg.teacher.checkpoint is None:
            raise ValueError("no teacher: set teacher.checkpoint in the config or pass --teacher CKPT")
        seed_all(cfg.seed)
        device = self.ctx.device
        self.teacher, self.teacher_identity = load_teacher(cfg.teacher.checkpoint, cfg.student.image_size,
                                                           cfg.teacher.base, device)
        self.peft = resolve_student_peft(self.teacher, cfg.student)
        teacher_peft = getattr(self.teacher, "peft_config", None)
        if "D3" in cfg.taps and not (PeftConfig.from_dict(self.peft).uses_adapter
                                     and teacher_peft is not None and teacher_peft.uses_adapter):
            raise ValueError("tap D3 (adapter output) needs adapters in teacher and student (PEFT method "
                             f"ch_adapter / adapter / adapter_lora; student: {self.peft['method']}, teacher: "
                             f"{teacher_peft.method if teacher_peft else None}); drop D3 from taps")
        if cfg.mdkd is not None:
            self.general, self.general_identity = load_general_teacher(cfg.mdkd, cfg.student.image_size,
                                                                       self.teacher, device)
        torch.manual_seed(cfg.seed)  # the student's and the necks' initialisation
        self.student = build_student(self.teacher, cfg.student, self.peft)
        self.dskd = self._distiller_module().to(device)
        mark_dskd_trainable(self.student, cfg.levels)  # with the controllers of those blocks (MDKD)
        self.trained = {n: p for n, p in self.dskd.named_parameters() if p.requires_grad}
        self.params = {"teacher": encoder_params(self.teacher), "student": encoder_params(self.student),
                       "necks": sum(p.numel() for n, p in self.dskd.named_parameters() if not n.startswith("student.")),
                       "trained_in_dskd": sum(p.numel() for p in self.trained.values())}
        if cfg.mdkd is not None:
            self.params["controller"] = sum(p.numel() for p in controller_parameters(self.student).values())
            self.params["general_teacher"] = encoder_params(self.general)
        t, s = self.teacher.config, self.student.config
        self._say(f"teacher {cfg.teacher.checkpoint}: '{t.name}' trunk C={t.trunk.embed_dim} stages {t.trunk.stages}, "
                  f"encoder {self.params['teacher']['encoder'] / 1e6:.3f}M params; PEFT {self.peft['method']}")
        p = {k: v / 1e6 for k, v in self.params["student"].items()}
        self._say(f"student '{s.name}' trunk C={s.trunk.embed_dim} stages {s.trunk.stages} at {s.image_size} px: "
                  f"encoder {p['encoder']:.3f}M params ({p['adapters']:.3f}M adapters), whole {p['whole']:.3f}M; "
                  f"necks {self.params['necks'] / 1e6:.3f}M; "
                  f"trained in DSKD {self.params['trained_in_dskd'] / 1e6:.3f}M")
        self._say(f"{self.loss_name} terms ({len(self.dskd.term_names)}): {', '.join(self.dskd.term_names)}")
        self._setup_data()
        self._setup_optim()
        self.log = DistillLog(self.out_dir, self.dskd.term_names, enabled=self.ctx.is_main)
        if last is not None:
            self._load_last(last)
        self.log.info = self._run_info()

    def _distiller_module(self) -> DSKD:
        """DSKD (student + necks), or for MDKD: the controller attached to the student (one channel
        per modality) and MDKD (student + both sets of necks)."""
        cfg = self.config
        if cfg.mdkd is None:
            return DSKD(self.student, self.teacher, cfg.levels, cfg.taps, cfg.neck_activation)
        self.modalities = cfg.modality_names()
        attach_modality_controller(self.student, self.modalities, cfg.mdkd.bottleneck)
        self._say(f"MDKD: general teacher {cfg.mdkd.general_teacher} ('{self.general.config.name}'), controller "
                  f"modalities {list(self.modalities)}, weights common {cfg.mdkd.weight_common} / modality "
                  f"{cfg.mdkd.weight_modality}")
        return MDKD(self.student, self.teacher, self.general, cfg.levels, cfg.taps, cfg.neck_activation,
                    cfg.mdkd.weight_common, cfg.mdkd.weight_modality)

    def _setup_data(self) -> None:
        cfg, ctx = self.config, self.ctx
        size = cfg.student.image_size
        D.ensure_all_phantoms(cfg.data, self.out_dir, ctx)
        bars = cfg.progress and ctx.is_main
        train, val = [], []  # (cached set, dataset)
        with D.main_fills_cache_first(ctx, cfg.cache_dir):
            for entry in cfg.data:
                root = D.entry_root(entry, self.out_dir)
                for split, target in ((entry.split_train, train), (entry.split_val, val)):
                    if split is None:
                        continue
                    ds = D.open_split(entry, root, split)
                    target.append((D.build_cached_set(entry.label, ds, size, cache_dir=cfg.cache_dir,
                                                      progress=bars), ds))
        self.train_set = self._distill_set(train, cfg.augment)
        self.val_set = self._distill_set(val, None)
        if len(self.train_set) == 0:
            raise ValueError("no distillation image (no data entry has a split_train with images)")
        self._setup_loader(DD.collate, "distillation images")
        self.data_counts = {"train": {s.name: len(s) for s, _ in train}, "val": {s.name: len(s) for s, _ in val}}
        for s, _ in train:
            self._say(f"distil on {s.name} ({s.split}): {len(s)} images (empty masks included)")
        for s, _ in val:
            self._say(f"val   {s.name} ({s.split}): {len(s)} images (val {self.loss_name}, un-augmented)")
        if not val:
            self._say("WARNING: no validation split: distilled.pt will hold the last epoch's student")

    def _distill_set(self, sets: list, augment) -> DD.DistillSet:
        """The DistillSet of (cached set, dataset) pairs, with the cached taps of the teacher (and
        of MDKD's general teacher) and each set's modality id (MDKD)."""
        cfg = self.config
        images = [s for s, _ in sets]
        teacher = general = modalities = None
        if cfg.teacher_cache.enabled:
            teacher = [self._teacher_cache(s, ds, self.teacher, self.teacher_identity, cfg.taps) for s, ds in sets]
        if cfg.mdkd is not None:
            if cfg.teacher_cache.enabled:
                general = [self._teacher_cache(s, ds, self.general, self.general_identity, (COMMON_TAP,))
                           for s, ds in sets]
            modalities = [self.modalities.index(s.name) for s in images]
        return DD.DistillSet(images, augment, cfg.seed, teacher, general, modalities)

    def _teacher_cache(self, images: D.CachedSet, dataset, teacher: SAM2ImageModel, identity: dict[str, Any],
                       taps: tuple[str, ...]) -> dict[str, np.ndarray]:
        """`teacher`'s cached taps `taps` of `images` (the adapted teacher, or MDKD's general one:
        its own sha256 and taps give it its own files)."""
        cfg, ctx = self.config, self.ctx
        directory = Path(cfg.teacher_cache.dir) if cfg.teacher_cache.dir else self.out_dir / "teacher_cache"
        keep = DD.stored_taps(taps)
        trunk = teacher.image_encoder.trunk
        strides = stage_strides(trunk.config)
        size = cfg.student.image_size
        # Every distillable level is cached, whatever `levels` asks: one cache serves each levels ablation.
        levels = DD.CACHED_LEVELS
        shapes = {term_name(lv, tap): (trunk.stage_dims[lv - 1], size // strides[lv - 1], size // strides[lv - 1])
                  for lv in levels for tap in keep}
        stem = DD.cache_stem(images.name, dataset, identity["sha256"], size, levels, taps, cfg.teacher_cache.dtype)

        def compute(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            with self._autocast():
                x = teacher.normalize(batch.to(ctx.device))
                return teacher_taps(teacher, x, levels, keep)

        start = time.perf_counter()
        arrays = DD.build_teacher_cache(stem, directory, images, shapes, compute, cfg.teacher_cache.dtype,
                                        batch_size=cfg.val_batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                        barrier=ctx.barrier, progress=cfg.progress and ctx.is_main)
        nbytes = sum(a.nbytes for a in arrays.values())
        self._say(f"teacher cache {images.name} ({images.split}): {len(images)} images, {nbytes / 2**20:.0f} MiB "
                  f"in {directory} ({time.perf_counter() - start:.1f} s)")
        wanted = {term_name(lv, tap) for lv in cfg.levels for tap in keep}
        return {name: array for name, array in arrays.items() if name in wanted}

    def _setup_optim(self) -> None:
        cfg, ctx = self.config, self.ctx
        self.optimisation = Optimisation(self.trained, cfg.optim, cfg.amp, ctx.device, cfg.cpu_amp)
        self._say(f"precision: {self.optimisation.precision} on {ctx.device}")
        # Every trained parameter enters L_DSKD (mark_dskd_trainable trains exactly the used blocks).
        self.forward = ctx.wrap(self.dskd)

    def _autocast(self):
        # The teacher cache is built during set-up, before the optimisation (and its autocast) exist.
        if not hasattr(self, "optimisation"):
            return contextlib.nullcontext()
        return self.optimisation.autocast()

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_last(self) -> None:
        if not self.ctx.is_main:
            return
        self._write_last({
            "format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config.to_dict(),
            "model": {k: v.detach().cpu().clone() for k, v in self.dskd.state_dict().items()},
            **progress_entries(self.optimisation, self.state, self.ctx.world_size),
            "teacher": self.teacher_identity, "peft": self.peft, "dskd_info": self.dskd_info,
            "general": self.general_identity,
        })

    def _check_resumable(self, doc: dict[str, Any]) -> None:
        check_config_unchanged(self.out_dir / LAST, doc["config"], self.config.to_dict(), RESUMABLE_CHANGES)

    def _load_last(self, doc: dict[str, Any]) -> None:
        path = self.out_dir / LAST
        if doc["teacher"].get("sha256") != self.teacher_identity.get("sha256"):
            raise ValueError(f"{path}: the run distils teacher {doc['teacher'].get('path')} (sha256 "
                             f"{doc['teacher'].get('sha256')}), not {self.teacher_identity.get('path')}")
        general = doc.get("general") or {}
        if self.general_identity is not None and general.get("sha256") != self.general_identity.get("sha256"):
            raise ValueError(f"{path}: the run distils general teacher {general.get('path')} (sha256 "
                             f"{general.get('sha256')}), not {self.general_identity.get('path')}")
        state = DistillState(**doc["state"])
        check_world_size(path, doc, self.ctx.world_size, state.batch_in_epoch)
        self.dskd.load_state_dict(doc["model"])
        restore_progress(doc, self.optimisation, path)
        self.state = state
        self.dskd_info = doc.get("dskd_info") or {}
        self.log.restore(state.step, state.epoch)
        self._say(resumed_message(path, state))

    def _save_best(self, val: dict[str, Any] | None) -> None:
        """`distilled.pt`: the student of the best epoch (EMA weights when EMA is on)."""
        if not self.ctx.is_main:
            return
        with self.optimisation.ema_applied():
            meta = {
                "weights": WEIGHTS_FULL, "peft": self.peft,
                "distill": {"teacher": self.teacher_identity, "levels": list(self.config.levels),
                            "taps": list(self.config.taps), "epoch": self.state.epoch, "step": self.state.step,
                            "ema": self.config.optim.ema, "val": val, "config": self.config.to_dict(),
                            "selection": f"lowest val {self.loss_name}" if val else "last epoch (no val)"},
            }
            controller = controller_config(self.student)
            if controller is not None:  # load_model re-attaches it (inference: uniultra.peft.controller.use_modality)
                meta[CONTROLLER_META] = controller.to_dict()
                meta["distill"]["general_teacher"] = self.general_identity
            save_model(self.student, self.out_dir / "distilled.pt", meta=meta)

    # -- validation -----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Mean L_DSKD and terms per val image (un-augmented), sharded over processes."""
        if len(self.val_set) == 0:
            return None
        ctx, cfg = self.ctx, self.config
        mine = list(range(ctx.rank, len(self.val_set), ctx.world_size))
        sums = {name: 0.0 for name in self.dskd.term_names}
        count = 0
        self.dskd.eval()
        try:
            with self.optimisation.ema_applied(), self._autocast():
                for start in range(0, len(mine), cfg.val_batch_size):
                    batch = DD.collate([self.val_set[(0, i)] for i in mine[start:start + cfg.val_batch_size]])
                    _, terms = self.dskd(*self._inputs(batch))
                    n = batch["images"].shape[0]
                    for k, v in terms.items():
                        sums[k] += float(v) * n
                    count += n
        finally:
            self.dskd.train()
        gathered = ctx.all_gather_object((sums, count))
        total = sum(c for _, c in gathered)
        terms = {k: sum(s[k] for s, _ in gathered) / total for k in sums}
        return {"loss": self.dskd.combine(terms), "terms": terms, "images": total}

    # -- the loop -------------------------------------------------------------------------------

    def _inputs(self, batch: dict) -> tuple:
        """The forward's arguments for a collated batch: (normalised images, teacher taps), and for
        MDKD also the general teacher's taps and the modality ids."""
        cfg, device = self.config, self.ctx.device
        x = self.student.normalize(batch["images"].to(device, non_blocking=True))
        if "teacher" in batch:
            target = {k: v.to(device, non_blocking=True) for k, v in batch["teacher"].items()}
            target = DD.complete_taps(target, cfg.levels, cfg.taps)
        else:
            with self._autocast():
                target = teacher_taps(self.teacher, x, cfg.levels, cfg.taps)
        if cfg.mdkd is None:
            return x, target
        if "general" in batch:
            general = {k: v.to(device, non_blocking=True) for k, v in batch["general"].items()}
        else:
            with self._autocast():
                general = general_taps(self.general, x, cfg.levels)
        return x, target, general, batch["modality"].to(device, non_blocking=True)

    def _train_step(self, batch: dict, epoch: int) -> dict[str, float]:
        inputs = self._inputs(batch)
        with self._autocast():
            loss, terms = self.forward(*inputs)
        lr, grad_norm = self.optimisation.step(loss, epoch, self.state.step)
        names = self.dskd.term_names
        values = torch.stack([loss.detach().float()] + [terms[k].detach().float() for k in names]
                             + [grad_norm.detach().float().to(loss.device)])
        values = self.ctx.mean(values).tolist()
        if not math.isfinite(values[0]):
            raise FloatingPointError(f"{self.loss_name} is {values[0]} at step {self.state.step + 1} "
                                     "(lower optim.lr, or enable optim.grad_clip / warmup)")
        return {"lr": lr, "loss": values[0], **dict(zip(names, values[1:-1], strict=True)), "grad_norm": values[-1]}

    def _record_step(self, row: dict[str, Any]) -> None:
        self.state.seconds += row["seconds"]  # DSKD time over every session, for the report
        super()._record_step(row)

    def _step_line(self, epoch: int, row: dict[str, Any]) -> str:
        return (f"DSKD epoch {epoch + 1} step {row['batch']}/{self.steps_per_epoch} (global {row['step']}) "
                f"{self.loss_name} {row['loss']:.4g} lr {row['lr']:.2e} {row['seconds']:.2f} s/step")

    def _epoch_row(self, epoch: int, val: dict[str, Any] | None, best: bool,
                   seconds: dict[str, float | None]) -> dict[str, Any]:
        state = self.state
        rows = [r for r in self.log.steps if r["epoch"] == epoch + 1]
        row: dict[str, Any] = {
            "epoch": state.epoch, "end_step": state.step, "lr": self.lr_at(epoch, state.step - 1),
            "train_loss": float(np.mean([r["loss"] for r in rows])) if rows else None,
        }
        for name in self.dskd.term_names:
            row[f"train_{name}"] = float(np.mean([r[name] for r in rows])) if rows else None
        row["val_loss"] = val["loss"] if val else None
        for name, value in (val or {}).get("terms", {}).items():
            row[f"val_{name}"] = value
        row.update({"best": best, **seconds})
        return row

    def _epoch_line(self, row: dict[str, Any], val: dict[str, Any] | None) -> str:
        score = row["val_loss"]
        return (f"DSKD epoch {row['epoch']}/{self.config.optim.epochs}  train {self.loss_name} {row['train_loss']:.4g}"
                + (f"  val {score:.4g}{'  *best*' if row['best'] else ''}" if score is not None else "")
                + "  " + self._timing_text(row))

    def _run_dskd(self) -> None:
        cfg, state = self.config, self.state
        self._say(f"distilling {cfg.optim.epochs} epochs x {self.steps_per_epoch} steps (batch {cfg.optim.batch_size} "
                  f"x {self.ctx.world_size} process(es)) on {self.ctx.device}; out {self.out_dir}")
        self.dskd.train()
        self.teacher.eval()
        self._run_epochs()
        epochs = self.log.epochs
        self.dskd_info = {
            "epochs": state.epoch, "steps": state.step, "steps_per_epoch": self.steps_per_epoch,
            "seconds_train": state.seconds, "seconds_per_step": state.seconds / state.step if state.step else None,
            "best_epoch": state.best_epoch, "best_val_loss": state.best_score,
            "first_epoch": epochs[0] if epochs else None, "last_epoch": epochs[-1] if epochs else None,
            "params": self.params, "data": self.data_counts,
        }

    # -- fine-tuning ----------------------------------------------------------------------------

    def _finetune(self) -> dict[str, Any]:
        from uniultra.engine.trainer import Trainer

        cfg = self.config
        distilled = self.out_dir / "distilled.pt"
        student = load_model(distilled, device=self.ctx.device)
        mark_finetune_trainable(student, cfg.finetune.freeze_decoder)
        identity = base_identity(distilled, "uniultra distilled student")
        peft = student.peft_config.to_dict()
        ft_dir = self.out_dir / "finetune"
        train_config = cfg.finetune_train_config(peft, ft_dir)
        self._say(f"fine-tuning the distilled student end to end for {cfg.finetune.epochs} epochs"
                  f"{' (inherited decoder frozen)' if cfg.finetune.freeze_decoder else ''}; out {ft_dir}")
        trainer = Trainer(train_config, resume=self.resume, hooks=self.hooks.finetune, command=self.command,
                          source=f"{self.source} (finetune)", start_model=(student, identity))
        result = trainer.run()
        epochs = result.epochs
        return {"epochs": result.state.epoch, "steps": result.state.step, "best_epoch": result.state.best_epoch,
                "best_val_dice": result.state.best_score, "out_dir": str(ft_dir),
                "last_epoch": epochs[-1] if epochs else None,
                "seconds_train": float(sum(e.get("seconds_train") or 0.0 for e in epochs)),
                "seconds_per_step": epochs[-1].get("seconds_per_step") if epochs else None}

    # -- run ------------------------------------------------------------------------------------

    def run(self) -> DistillResult:
        self.ctx = setup(self.config.device)
        try:
            return self._run()
        finally:
            self.ctx.close()

    def _run(self) -> DistillResult:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        last = self._peek_last()
        if last is not None:
            self._check_resumable(last)
        done = last is not None and DistillState(**last["state"]).epoch >= cfg.optim.epochs \
            and (self.out_dir / "distilled.pt").is_file()
        if done:
            self.state = DistillState(**last["state"])
            self.teacher_identity = last["teacher"]
            self.peft = last["peft"]
            self.general_identity = last.get("general")
            self.dskd_info = last.get("dskd_info") or {}
            self._say(f"DSKD phase already complete in {self.out_dir} ({self.state.epoch} epochs)")
        else:
            self._setup(last)
            self._run_dskd()
            if self.ctx.is_main:
                # The info of the finished phase goes into last.pt too, for a later --resume.
                self._save_last()
            self._write_hash()
            del self.forward, self.optimisation
        self.ctx.barrier()
        finetune = self._finetune() if cfg.finetune.epochs > 0 else None
        final = self.out_dir / "finetune" / "best.pt" if finetune else self.out_dir / "distilled.pt"
        report, student = {}, None
        if self.ctx.is_main:
            atomic_write(self.out_dir / "student.pt", lambda tmp: shutil.copyfile(final, tmp))
            student = load_model(self.out_dir / "student.pt")
            report = self._report(finetune, final, student)
            atomic_write_text(self.out_dir / "distill_report.json", json.dumps(report, indent=1) + "\n")
            self._say(f"done: student {self.out_dir / 'student.pt'} (from {final.name}); "
                      f"report {self.out_dir / 'distill_report.json'}")
        self.ctx.barrier()
        return DistillResult(self.out_dir, self.state, student, report)

    def _write_hash(self) -> None:
        """Debug aid of the DDP test (as uniultra train): `distill-rank<r>.json` with the sha256 of
        this process's student + necks after DSKD, in $UNIULTRA_TRAIN_HASH_DIR."""
        write_weights_hash("distill-", self.ctx.rank, self.ctx.world_size, self.state.step, self.dskd.state_dict())

    def _report(self, finetune: dict[str, Any] | None, final: Path, student: SAM2ImageModel) -> dict[str, Any]:
        cfg = self.config
        return {
            "command": self.command, "config_file": self.source, "config": cfg.to_dict(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "teacher": self.teacher_identity,
            "student": {"config": student.config.to_dict(), "peft": self.peft, "params": encoder_params(student)},
            "dskd": {"levels": list(cfg.levels), "taps": list(cfg.taps),
                     "terms": [term_name(lv, t) for lv in cfg.levels for t in cfg.taps],
                     "teacher_cache": cfg.teacher_cache.enabled, "augment": cfg.augment is not None,
                     **self.dskd_info},
            "mdkd": None if cfg.mdkd is None else {
                "general_teacher": self.general_identity, "modalities": list(cfg.modality_names()),
                "controller": controller_config(student).to_dict(), "weight_common": cfg.mdkd.weight_common,
                "weight_modality": cfg.mdkd.weight_modality},
            "finetune": finetune,
            "outputs": {"student": str(self.out_dir / "student.pt"), "student_from": str(final),
                        "distilled": str(self.out_dir / "distilled.pt"), "logs": str(self.out_dir)},
            "machine": machine_info(self.ctx),
        }

    def _run_info(self) -> dict[str, Any]:
        return {
            **run_info(self.command, self.source, self.config.to_dict(), self.ctx),
            "teacher": self.teacher_identity, "general_teacher": self.general_identity,
            "student": self.student.config.to_dict(), "peft": self.peft,
            "terms": list(self.dskd.term_names), "params": self.params, "data": self.data_counts,
            "steps_per_epoch": self.steps_per_epoch, "precision": self.optimisation.precision,
        }


def distill(config: DistillConfig, *, resume: bool = False, hooks: DistillHooks | None = None,
            command: str | None = None, source: str = "config") -> DistillResult:
    """Distil (and optionally fine-tune) as configured; see the module docstring for the files."""
    return Distiller(config, resume=resume, hooks=hooks, command=command, source=source).run()
