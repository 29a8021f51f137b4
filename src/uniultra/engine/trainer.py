"""The training loop: `train(config)` (what `uniultra train` runs).

Per step: the image encoder runs once on the batch, the decoder once per prompt kind in it;
focal + dice + IoU loss (uniultra.engine.losses); Adam(W); learning rate
`lr * gamma**epoch * min(1, (step + 1) / warmup_steps)`; gradient clipping; optional EMA of the
trained weights. Per epoch: validation on the VAL split with the evaluation prompts (fixed seed),
Dice per dataset; `best.pt` when the mean over datasets improves (never the test split);
`last.pt` always.

Files in `out_dir`:
- `last.pt`  everything to resume: trained weights, optimiser, schedule, EMA, GradScaler, RNG
  states (torch, numpy, python), epoch, step and position in the epoch (`checkpoint_every` also
  saves it mid-epoch). Training data order is a function of (seed, epoch), each sample's
  augmentation and prompt of (seed, epoch, sample index), so a resumed run reproduces the
  uninterrupted one bit for bit on CPU (same seed, same number of processes).
- `best.pt`  a UniUltra model checkpoint (`uniultra.models.checkpoint.load_model`) holding only
  the trained parameters (EMA weights when EMA is on), the full training config and the base
  checkpoint's identity (path + sha256). When the base is a random initialisation, or every
  parameter trains, it holds every weight and loads standalone.
- logs: see uniultra.engine.logs.

Resume: `--resume` continues from `out_dir/last.pt` (or starts fresh when there is none); without
it an existing `last.pt` is an error rather than silently overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniultra.atomic import atomic_write
from uniultra.config_io import ConfigError, from_dict, merge_dicts
from uniultra.engine import data as D
from uniultra.engine.config import TrainConfig
from uniultra.engine.distributed import setup
from uniultra.engine.logs import RunLog
from uniultra.engine.losses import segmentation_loss
from uniultra.models.checkpoint import WEIGHTS_FULL, WEIGHTS_TRAINED, load_base_model, save_model
from uniultra.models.config import ImageModelConfig, preset
from uniultra.models.image_model import ImageFeatures, SAM2ImageModel

STATE_FORMAT = "uniultra-train-state"
STATE_VERSION = 1
# Config keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("optim.epochs", "model.base", "out_dir", "log_every", "checkpoint_every", "num_workers", "device",
                     "progress", "cache_dir", "val_batch_size", "threads")
# Debug aid (used by the distributed test): each process writes the hash of its final weights here.
HASH_DIR_ENV = "UNIULTRA_TRAIN_HASH_DIR"


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps done
    batch_in_epoch: int = 0  # batches this process has done in the current epoch
    best_score: float | None = None
    best_epoch: int | None = None


@dataclass
class TrainHooks:
    """Callbacks for tests and tools; an exception raised here stops training like a crash would."""

    on_step_end: Callable[[TrainState], None] | None = None
    on_epoch_end: Callable[[TrainState, dict[str, Any]], None] | None = None


@dataclass
class TrainResult:
    out_dir: Path
    state: TrainState
    model: SAM2ImageModel  # the trained model (raw weights, not EMA), in train mode
    epochs: list[dict[str, Any]] = field(default_factory=list)


# --- model --------------------------------------------------------------------------------------

def resolve_model_config(config: TrainConfig, source: str = "config") -> ImageModelConfig | None:
    """The architecture a config asks for (`preset` with `config` merged over it), or None."""
    section = config.model
    if section.preset is None and section.config is None:
        return None
    try:
        start = preset(section.preset, section.image_size) if section.preset else ImageModelConfig(
            image_size=section.image_size)
    except ValueError as exc:
        raise ConfigError(f"{source}: model.preset: {exc}") from exc
    inline = dict(section.config or {})
    if "image_size" in inline and inline["image_size"] != section.image_size:
        raise ConfigError(f"{source}: model.config.image_size: {inline['image_size']} differs from "
                          f"model.image_size {section.image_size}; set only model.image_size")
    merged = merge_dicts(start.to_dict(), inline)
    merged["image_size"] = section.image_size
    return from_dict(ImageModelConfig, merged, source, "model.config")


def build_model(config: TrainConfig, source: str = "config") -> tuple[SAM2ImageModel, dict[str, Any]]:
    """The starting model and the identity of its weights (base file + sha256, or random init)."""
    wanted = resolve_model_config(config, source)
    base = config.model.base
    if base:
        if not Path(base).is_file():
            raise FileNotFoundError(f"base checkpoint {base} does not exist (model.base in {source}; "
                                    "pass the file with --base)")
        model, identity = load_base_model(base, config.model.image_size)
        arch = ("trunk", "neck", "decoder", "backbone_stride")
        if wanted is not None and any(getattr(wanted, k) != getattr(model.config, k) for k in arch):
            raise ConfigError(f"{source}: model: the base checkpoint {base} is a '{model.config.name}' model, "
                              "which is not the preset/config the file asks for (remove them or fix them)")
        return model, identity
    if wanted is None:
        raise ConfigError(f"{source}: model: give a preset, an inline config, or a base checkpoint")
    torch.manual_seed(config.seed)
    return SAM2ImageModel(wanted), {"kind": "random init", "seed": config.seed, "config": wanted.to_dict()}


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and exact bytes of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class _TrainForward(nn.Module):
    """Encoder once per batch, decoder once per prompt group: the module DDP wraps."""

    def __init__(self, model: SAM2ImageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, groups: list[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        features = self.model.encode_image(self.model.normalize(images))
        outputs = []
        for index, coords, labels, multimask in groups:
            sub = ImageFeatures(features.image_embed[index], [f[index] for f in features.high_res_feats])
            out = self.model.decode(sub, points=(coords, labels), multimask=multimask)
            outputs.append((out.low_res_logits, out.iou_scores))
        return outputs


class EMA:
    """Exponential moving average of the trained parameters (decay warms up: min(d, (1+n)/(10+n)))."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.params = params
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1 - d)

    @contextlib.contextmanager
    def applied(self):
        """Temporarily put the EMA weights into the model."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not match the trained parameters")
        for n, t in state.items():
            self.shadow[n].copy_(t)


# --- RNG state ----------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --- the trainer --------------------------------------------------------------------------------

class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        hooks: TrainHooks | None = None,
        command: str | None = None,
        source: str = "config",
        start_model: tuple[SAM2ImageModel, dict[str, Any]] | None = None,
    ) -> None:
        """`start_model`: (model, identity of its weights) to train INSTEAD of building one from
        `config.model` and applying `config.peft` (e.g. a distilled student, uniultra.distill). The
        model comes with its PEFT already applied and its trained parameters marked requires_grad;
        `config.peft` must be that PEFT config (it is stored in best.pt). Its checkpoints always hold
        every weight (there is no base file to rebuild the frozen part from)."""
        self.config = config
        self.resume = resume
        self.hooks = hooks or TrainHooks()
        self.command = command
        self.source = source
        self.out_dir = Path(config.out_dir)
        self.state = TrainState()
        self.start_model = start_model

    # -- set-up ---------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.ctx.is_main:
            print(text, flush=True)

    def _setup(self) -> None:
        cfg = self.config
        self.ctx = setup(cfg.device)
        last = self.out_dir / "last.pt"
        if last.is_file() and not self.resume:
            raise ValueError(f"{self.out_dir} already holds a run ({last}); pass --resume to continue it "
                             "or choose another --out")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

        from uniultra.peft.apply import apply_peft, set_train_mode, trainable_report

        self.peft = cfg.peft_config(self.source)
        if self.start_model is not None:
            self.model, self.base_identity = self.start_model
            self.report = trainable_report(self.model)
        else:
            self.model, self.base_identity = build_model(cfg, self.source)
            self.report = apply_peft(self.model, self.peft)
        self._say(self.report.format())
        self.model.to(self.ctx.device)
        set_train_mode(self.model, True)
        self.trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trained:
            raise ValueError("nothing to train: the PEFT config freezes every parameter")
        # Complete weights unless a base file holds the frozen part.
        self.save_full = self.start_model is not None or self.base_identity["kind"] == "random init" or len(
            self.trained) == len(list(self.model.parameters()))

        self._setup_data()
        self._setup_optim()
        self.log = RunLog(self.out_dir, enabled=self.ctx.is_main)
        if self.resume and last.is_file():
            self._load_last(last)
        self.log.info = self._run_info()

    def _setup_data(self) -> None:
        cfg, ctx = self.config, self.ctx
        size = cfg.model.image_size
        if ctx.is_main:
            for entry in cfg.data:
                if entry.phantom is not None:
                    D.ensure_phantoms(entry, self.out_dir)
        ctx.barrier()
        # With a disk cache the main process fills it first; the others then memory-map it.
        shared_cache = ctx.distributed and cfg.cache_dir is not None
        if shared_cache and not ctx.is_main:
            ctx.barrier()
        train_sets, val_sets = [], []
        bars = cfg.progress and ctx.is_main
        for entry in cfg.data:
            root = D.entry_root(entry, self.out_dir)
            if entry.split_train is not None:
                ds = D.open_split(entry, root, entry.split_train)
                train_sets.append(D.build_cached_set(entry.label, ds, size, cache_dir=cfg.cache_dir, progress=bars))
            if entry.split_val is not None:
                ds = D.open_split(entry, root, entry.split_val)
                val_sets.append(D.build_cached_set(entry.label, ds, size, cache_dir=cfg.cache_dir,
                                                   keep_native_masks=True, progress=bars))
        if shared_cache and ctx.is_main:
            ctx.barrier()
        self.train_set = D.TrainSet(train_sets, cfg.prompts.train, cfg.augment, cfg.seed)
        if len(self.train_set) == 0:
            raise ValueError("no training image with an object (every training mask is empty or no "
                             "data entry has a split_train)")
        v = cfg.prompts.val
        self.val = D.build_val_data(val_sets, v.mode, v.jitter, v.seed)
        self.sampler = D.EpochSampler(self.train_set, ctx.world_size, ctx.rank, cfg.seed)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=cfg.optim.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=cfg.num_workers, collate_fn=D.collate, pin_memory=ctx.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
        )
        self.steps_per_epoch = len(self.sampler) // cfg.optim.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training samples give no full batch of "
                             f"{cfg.optim.batch_size} per process ({ctx.world_size} processes)")
        self.data_counts = {
            "train": {s.name: {"images": len(s), "empty_skipped": self.train_set.n_empty[s.name]}
                      for s in train_sets},
            "val": {s.name: {"images": len(s), "empty_skipped": self.val.skipped[s.name]} for s in val_sets},
        }
        for s in train_sets:
            self._say(f"train {s.name} ({s.split}): {len(s)} images, {self.train_set.n_empty[s.name]} with an "
                      "empty mask skipped")
        for s in val_sets:
            self._say(f"val   {s.name} ({s.split}): {len(s)} images, {self.val.skipped[s.name]} skipped "
                      f"(empty mask), prompt {v.mode} J={v.jitter:g} seed {v.seed}")
        if not val_sets:
            self._say("WARNING: no validation split: best.pt will hold the last epoch's weights")

    def _setup_optim(self) -> None:
        cfg, ctx = self.config, self.ctx
        o = cfg.optim
        params = list(self.trained.values())
        kind = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        self.optimizer = kind(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.ema = EMA(self.trained, o.ema) if o.ema else None
        cuda = ctx.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        forward = _TrainForward(self.model)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Unused parameters happen legitimately (e.g. the object-score head has no loss).
            forward = DistributedDataParallel(forward, device_ids=[ctx.device.index] if cuda else None,
                                              find_unused_parameters=True)
        self.forward = forward

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)

    def lr_at(self, epoch: int, step: int) -> float:
        o = self.config.optim
        warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        return o.lr * o.gamma**epoch * warm

    # -- checkpoints ----------------------------------------------------------------------------

    def _weights(self) -> tuple[str, dict[str, torch.Tensor]]:
        from uniultra.peft.apply import trainable_state_dict

        if self.save_full:
            return WEIGHTS_FULL, {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return WEIGHTS_TRAINED, {k: v.cpu() for k, v in trainable_state_dict(self.model).items()}

    def _save_last(self) -> None:
        if not self.ctx.is_main:
            return
        kind, weights = self._weights()
        document = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config.to_dict(),
            "weights": kind, "model": weights, "optimizer": self.optimizer.state_dict(),
            "schedule": {"lr": self.optimizer.param_groups[0]["lr"], "gamma": self.config.optim.gamma,
                         "warmup_steps": self.config.optim.warmup_steps},
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_state(), "state": asdict(self.state), "world_size": self.ctx.world_size,
            "base": self.base_identity,
        }
        atomic_write(self.out_dir / "last.pt", lambda tmp: torch.save(document, tmp))
        self.log.flush()

    def _load_last(self, path: Path) -> None:
        from uniultra.peft.apply import load_trainable_state

        doc = torch.load(path, map_location="cpu", weights_only=True)
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a training state written by uniultra train")
        before, now = _flatten(doc["config"]), _flatten(self.config.to_dict())
        changed = sorted(k for k in set(before) | set(now)
                         if before.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
        if changed:
            details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
            raise ValueError(f"{path}: the config differs from the run being resumed ({details}); "
                             f"only {', '.join(RESUMABLE_CHANGES)} may change")
        if doc["base"].get("sha256") != self.base_identity.get("sha256"):
            raise ValueError(f"{path}: the run was trained from base {doc['base'].get('path')} "
                             f"(sha256 {doc['base'].get('sha256')}), not {self.base_identity.get('path')}")
        state = TrainState(**doc["state"])
        if doc["world_size"] != self.ctx.world_size and state.batch_in_epoch:
            raise ValueError(f"{path}: saved mid-epoch by {doc['world_size']} processes; resume it with the same "
                             f"number (now {self.ctx.world_size})")
        if doc["weights"] == WEIGHTS_FULL:
            self.model.load_state_dict(doc["model"])
        else:
            load_trainable_state(self.model, doc["model"])
        self.optimizer.load_state_dict(doc["optimizer"])
        if self.ema is not None:
            if doc["ema"] is None:
                raise ValueError(f"{path}: the run had no EMA")
            self.ema.load_state_dict(doc["ema"])
        if self.scaler is not None and doc["scaler"] is not None:
            self.scaler.load_state_dict(doc["scaler"])
        set_rng_state(doc["rng"])
        self.state = state
        self.log.restore(state.step, state.epoch)
        where = f"epoch {state.epoch + 1}, batch {state.batch_in_epoch}" if state.batch_in_epoch else \
            f"the end of epoch {state.epoch}"
        self._say(f"resumed from {path} at {where} (step {state.step})")

    def _save_best(self, val: dict[str, Any] | None) -> None:
        if not self.ctx.is_main:
            return
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            kind, weights = self._weights()
        meta = {
            "weights": kind, "base": self.base_identity, "peft": self.peft.to_dict(),
            "train": {"config": self.config.to_dict(), "epoch": self.state.epoch, "step": self.state.step,
                      "ema": self.config.optim.ema, "val": val, "trainable": self.report.to_dict(),
                      "selection": "mean over datasets of the val-split Dice" if val else "last epoch (no val)"},
        }
        save_model(self.model, self.out_dir / "best.pt", meta=meta, state=weights)

    # -- validation -----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Dice/IoU per val dataset at native resolution, sharded over processes."""
        from uniultra.evaluation.metrics import dice_score, iou_score
        from uniultra.peft.apply import set_train_mode

        if not self.val.images:
            return None
        ctx, model, device = self.ctx, self.model, self.ctx.device
        mine = self.val.images[ctx.rank::ctx.world_size]
        rows = []
        model.eval()
        try:
            with self.ema.applied() if self.ema else contextlib.nullcontext(), self._autocast():
                chunk = self.config.val_batch_size
                for start in range(0, len(mine), chunk):
                    part = mine[start:start + chunk]
                    images = torch.stack([torch.from_numpy(self.val.sets[v.set_index].image(v.index)).expand(3, -1, -1)
                                          for v in part]).to(device)
                    features = model.encode_image(model.normalize(images))
                    # Every object of every image of the chunk in one decoder call (one prompt mode,
                    # so all prompts have the same number of tokens).
                    owner = torch.cat([torch.full((len(v.coords),), j) for j, v in enumerate(part)]).to(device)
                    sub = ImageFeatures(features.image_embed[owner], [f[owner] for f in features.high_res_feats])
                    coords = torch.cat([v.coords for v in part]).to(device)
                    labels = torch.cat([v.labels for v in part]).to(device)
                    all_logits = model.decode(sub, points=(coords, labels)).low_res_logits.float()
                    for j, v in enumerate(part):
                        s = self.val.sets[v.set_index]
                        logits = F.interpolate(all_logits[owner == j], size=s.native_hw[v.index],
                                               mode="bilinear", align_corners=False)
                        pred = (logits[:, 0] > 0).any(dim=0).cpu().numpy()
                        truth = s.native_masks[v.index]
                        rows.append((v.set_index, dice_score(pred, truth), iou_score(pred, truth)))
        finally:
            set_train_mode(model, True)
        rows = [r for part in ctx.all_gather_object(rows) for r in part]
        result: dict[str, Any] = {"datasets": {}}
        for si, s in enumerate(self.val.sets):
            dice = [r[1] for r in rows if r[0] == si]
            iou = [r[2] for r in rows if r[0] == si]
            result["datasets"][s.name] = {"dice": float(np.mean(dice)) if dice else None,
                                          "iou": float(np.mean(iou)) if iou else None,
                                          "n": len(dice), "skipped": self.val.skipped[s.name]}
        scored = [d["dice"] for d in result["datasets"].values() if d["dice"] is not None]
        result["dice"] = float(np.mean(scored)) if scored else None
        return result

    # -- the loop -------------------------------------------------------------------------------

    def _train_step(self, batch: D.Batch, epoch: int) -> dict[str, float]:
        cfg = self.config
        batch = batch.to(self.ctx.device)
        groups = [(g.index, g.coords, g.labels, g.kind == "point" and cfg.loss.multimask_for_points)
                  for g in batch.groups]
        with self._autocast():
            outputs = self.forward(batch.images, groups)
        totals, terms = [], {"focal": [], "dice": [], "iou": [], "real_iou": []}
        for g, (logits, iou) in zip(batch.groups, outputs, strict=True):
            total, parts = segmentation_loss(logits, iou, batch.targets[g.index], cfg.loss)
            totals.append(total)
            for k in terms:
                terms[k].append(parts[k])
        loss = torch.cat(totals).mean()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trained.values()), clip)
        lr = self.lr_at(epoch, self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.state.step)
        values = torch.stack([loss.detach().float()] + [torch.cat(terms[k]).float().mean() for k in terms]
                             + [grad_norm.detach().float().to(loss.device)])
        values = self.ctx.mean(values).tolist()
        if not math.isfinite(values[0]):
            raise FloatingPointError(f"training loss is {values[0]} at step {self.state.step + 1} "
                                     "(lower optim.lr, or enable optim.grad_clip / warmup)")
        return {"lr": lr, "loss": values[0], "focal": values[1], "dice": values[2], "iou_loss": values[3],
                "real_iou": values[4], "grad_norm": values[5]}

    def _epoch(self, epoch: int) -> tuple[float, int]:
        """Train the rest of one epoch; returns (seconds, steps done now)."""
        cfg, state = self.config, self.state
        self.sampler.set_epoch(epoch, skip=state.batch_in_epoch * cfg.optim.batch_size)
        total = self.steps_per_epoch
        bar = None
        if cfg.progress and self.ctx.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                       unit="step", leave=False, mininterval=1.0)
        start = time.perf_counter()
        step_start = time.perf_counter()
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
            self.log.add_step(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
            elif state.step % max(cfg.log_every, 1) == 0:
                self._say(f"epoch {epoch + 1} step {state.batch_in_epoch}/{total} (global {state.step}) "
                          f"loss {row['loss']:.4f} dice {row['dice']:.4f} lr {row['lr']:.2e} "
                          f"{row['seconds']:.2f} s/step")
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch_in_epoch < total:
                self._save_last()
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(state)
        if bar is not None:
            bar.close()
        return time.perf_counter() - start, done

    def run(self) -> TrainResult:
        try:
            self._setup()
            return self._run()
        finally:
            if hasattr(self, "ctx"):
                self.ctx.close()

    def _run(self) -> TrainResult:
        cfg, state = self.config, self.state
        self._say(f"training {cfg.optim.epochs} epochs x {self.steps_per_epoch} steps (batch {cfg.optim.batch_size} "
                  f"x {self.ctx.world_size} process(es)) on {self.ctx.device}; out {self.out_dir}")
        while state.epoch < cfg.optim.epochs:
            epoch = state.epoch
            train_seconds, steps_now = self._epoch(epoch)
            state.epoch += 1
            state.batch_in_epoch = 0
            val_start = time.perf_counter()
            val = self.validate()
            val_seconds = time.perf_counter() - val_start
            score = val["dice"] if val else None
            improved = score is None or state.best_score is None or score > state.best_score
            if improved:
                state.best_score, state.best_epoch = score, state.epoch
                self._save_best(val)
            losses = [r["loss"] for r in self.log.steps if r["epoch"] == epoch + 1]
            row: dict[str, Any] = {
                "epoch": state.epoch, "end_step": state.step, "lr": self.lr_at(epoch, state.step - 1),
                "train_loss": float(np.mean(losses)) if losses else None,
                "val_dice": score, "best": bool(improved and score is not None),
                "seconds_train": train_seconds, "seconds_val": val_seconds,
                "seconds_per_step": train_seconds / steps_now if steps_now else None,
            }
            for name, d in (val or {}).get("datasets", {}).items():
                row[f"val_dice_{name}"] = d["dice"]
                row[f"val_iou_{name}"] = d["iou"]
            best = {"epoch": state.best_epoch, "val_dice": state.best_score}
            self.log.add_epoch(row, best)
            self._save_last()
            self.ctx.barrier()
            per_set = "  ".join(f"{n} {100 * d['dice']:.2f}" for n, d in (val or {}).get("datasets", {}).items()
                                if d["dice"] is not None)
            self._say(f"epoch {state.epoch}/{cfg.optim.epochs}  train loss {row['train_loss']:.4f}  "
                      + (f"val Dice {per_set}  mean {100 * score:.2f}{'  *best*' if row['best'] else ''}  "
                         if score is not None else "")
                      + f"{train_seconds:.0f}+{val_seconds:.0f} s"
                      + (f"  {row['seconds_per_step']:.3f} s/step" if row["seconds_per_step"] else ""))
            if self.hooks.on_epoch_end is not None:
                self.hooks.on_epoch_end(state, row)
        self._write_hash()
        return TrainResult(self.out_dir, state, self.model, list(self.log.epochs))

    def _write_hash(self) -> None:
        target = os.environ.get(HASH_DIR_ENV)
        if not target:
            return
        from uniultra.atomic import atomic_write_text

        digest = state_hash(self.model.state_dict())
        atomic_write_text(Path(target) / f"rank{self.ctx.rank}.json",
                          json.dumps({"rank": self.ctx.rank, "world_size": self.ctx.world_size, "sha256": digest,
                                      "step": self.state.step}))

    def _run_info(self) -> dict[str, Any]:
        return {
            "command": self.command, "config_file": self.source, "config": self.config.to_dict(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": str(self.ctx.device), "processes": self.ctx.world_size},
            "model": self.model.config.to_dict(), "base": self.base_identity, "trainable": self.report.to_dict(),
            "data": self.data_counts, "steps_per_epoch": self.steps_per_epoch,
        }


def train(config: TrainConfig, *, resume: bool = False, hooks: TrainHooks | None = None,
          command: str | None = None, source: str = "config") -> TrainResult:
    """Train as configured; see the module docstring for what lands in `config.out_dir`."""
    return Trainer(config, resume=resume, hooks=hooks, command=command, source=source).run()
