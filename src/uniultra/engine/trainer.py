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
- `best.pt`  a UniUltra model checkpoint (`uniultra.inference.loading.load_model`) holding only
  the trained parameters (EMA weights when EMA is on), the full training config and the base
  checkpoint's identity (path + sha256). When the base is a random initialisation, or every
  parameter trains, it holds every weight and loads standalone.
- logs: see uniultra.engine.logs.

A model with a modality controller (uniultra.peft.controller; e.g. an MDKD student) trains and
validates each sample under its modality: its data entry's label, which must be one of the
controller's modality names. Without a controller no modality is selected and nothing changes.

Resume: `--resume` continues from `out_dir/last.pt` (or starts fresh when there is none); without
it an existing `last.pt` is an error rather than silently overwritten.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniultra.config_io import ConfigError, from_dict, merge_dicts
from uniultra.engine import data as D
from uniultra.engine import zoom_data as Z
from uniultra.engine.checkpointing import (
    check_config_unchanged,
    check_world_size,
    existing_state,
    progress_entries,
    read_state,
    restore_progress,
    resumed_message,
)
from uniultra.engine.config import TrainConfig
from uniultra.engine.distributed import setup
from uniultra.engine.epoch_loop import EpochLoop
from uniultra.engine.interactive import chosen_logits, error_clicks, interactive_rounds, step_generator
from uniultra.engine.logs import RunLog, run_info
from uniultra.engine.losses import segmentation_loss
from uniultra.engine.optimisation import Optimisation
from uniultra.engine.rng import seed_all
from uniultra.engine.weights_hash import write_weights_hash
from uniultra.evaluation.evaluate import ModelMethod, evaluate_dataset
from uniultra.evaluation.metrics import dice_score, iou_score
from uniultra.inference.loading import load_base_model
from uniultra.inference.predictor import Predictor
from uniultra.inference.transforms import upsample_logits
from uniultra.inference.zoom import ZoomPredictor
from uniultra.models.checkpoint import CONTROLLER_META, INFERENCE_META, WEIGHTS_FULL, WEIGHTS_TRAINED, save_model
from uniultra.models.config import ImageModelConfig, preset
from uniultra.models.image_model import ImageFeatures, SAM2ImageModel
from uniultra.peft.apply import (
    apply_peft,
    load_trainable_state,
    set_train_mode,
    trainable_report,
    trainable_state_dict,
)
from uniultra.peft.controller import controller_config, label_modality_ids, use_modality

STATE_FORMAT = "uniultra-train-state"
STATE_VERSION = 1
# Config keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("optim.epochs", "model.base", "out_dir", "log_every", "checkpoint_every", "num_workers", "device",
                     "progress", "cache_dir", "val_batch_size", "threads")


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
    model, identity = _starting_model(config, source)
    if config.prompts.train.exact_box > 0 and not model.config.decoder.exact_box_tokens:
        raise ConfigError(f"{source}: prompts.train.exact_box needs a model with exact-box tokens "
                          "(model.config.decoder.exact_box_tokens: true)")
    if (identity["kind"] == "random init" and not config.loss.multimask_for_points
            and model.config.decoder.dynamic_multimask_via_stability):
        # Nothing would train the multimask outputs, yet at inference the decoder swaps the best of them
        # in for an unstable single mask (BENCHMARKS.md, "Its answers were not all its own": -4.3 tap Dice).
        raise ConfigError(f"{source}: loss.multimask_for_points: false on a randomly initialised model leaves "
                          "the multimask outputs untrained; set model.config.decoder."
                          "dynamic_multimask_via_stability: false so that inference never swaps them in")
    return model, identity


def _starting_model(config: TrainConfig, source: str) -> tuple[SAM2ImageModel, dict[str, Any]]:
    wanted = resolve_model_config(config, source)
    base = config.model.base
    if base:
        if not Path(base).is_file():
            raise FileNotFoundError(f"base checkpoint {base} does not exist (model.base in {source}; "
                                    "pass the file with --base)")
        model, identity = load_base_model(base, config.model.image_size,
                                          exact_box_tokens=wanted is not None and wanted.decoder.exact_box_tokens)
        if wanted is not None:
            model.config = model.config.with_box_priors_of(wanted)
        arch = ("trunk", "neck", "decoder", "backbone_stride")
        if wanted is not None and any(getattr(wanted, k) != getattr(model.config, k) for k in arch):
            raise ConfigError(f"{source}: model: the base checkpoint {base} is a '{model.config.name}' model, "
                              "which is not the preset/config the file asks for (remove them or fix them)")
        return model, identity
    if wanted is None:
        raise ConfigError(f"{source}: model: give a preset, an inline config, or a base checkpoint")
    torch.manual_seed(config.seed)
    return SAM2ImageModel(wanted), {"kind": "random init", "seed": config.seed, "config": wanted.to_dict()}


class _TrainForward(nn.Module):
    """Encoder once per batch, decoder once per prompt group (plus one pass per interactive
    round): the module DDP wraps."""

    def __init__(self, model: SAM2ImageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, groups: list[tuple], modality: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, rounds: int = 0, generator: torch.Generator | None = None,
                mask_prompt: bool = True) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per group (index, coords, labels, multimask, corrected), the (low-res logits, IoU scores)
        of every pass: the prompt's, then, for corrected groups, `rounds` corrections
        (uniultra.engine.interactive; needs `targets`), each given the previous logits
        as mask prompt when `mask_prompt`. `modality`: each sample's modality id for the encoder's
        controller (None: none selected)."""
        with use_modality(self.model, modality):
            features = self.model.encode_image(self.model.normalize(images))
        outputs = []
        for index, coords, labels, multimask, corrected in groups:
            sub = ImageFeatures(features.image_embed[index], [f[index] for f in features.high_res_feats])
            out = self.model.decode(sub, points=(coords, labels), multimask=multimask)
            passes = [(out.low_res_logits, out.iou_scores)]
            for _ in range(rounds if corrected else 0):
                previous = chosen_logits(*passes[-1]).detach()
                click, label = error_clicks(previous, targets[index], generator)
                coords = torch.cat([coords, click.to(coords.dtype)], dim=1)
                labels = torch.cat([labels, label.to(labels.dtype)], dim=1)
                out = self.model.decode(sub, points=(coords, labels), mask_input=previous if mask_prompt else None)
                passes.append((out.low_res_logits, out.iou_scores))
            outputs.append(passes)
        return outputs


# --- the trainer --------------------------------------------------------------------------------

class Trainer(EpochLoop):
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
        super().__init__(config, resume=resume, hooks=hooks or TrainHooks(), command=command, source=source,
                         state=TrainState())
        self.start_model = start_model

    # -- set-up ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        self.ctx = setup(cfg.device)
        last = existing_state(self.out_dir, self.resume)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_all(cfg.seed)


        self.peft = cfg.peft_config(self.source)
        if self.start_model is not None:
            self.model, self.base_identity = self.start_model
            self.report = trainable_report(self.model)
        else:
            self.model, self.base_identity = build_model(cfg, self.source)
            inserted = getattr(self.model, "peft_config", None)
            if inserted is not None and self.peft.method == "full":
                # A base that already carries adapters (e.g. a distilled student): "full" trains every
                # parameter it has, and its checkpoints record the adapters so that they load back.
                for parameter in self.model.parameters():
                    parameter.requires_grad_(True)
                self.peft, self.report = inserted, trainable_report(self.model)
                self.report.method = "full"  # what trains; the table still lists the base's adapters
            else:
                self.report = apply_peft(self.model, self.peft)
        self._say(self.report.format())
        self.model.to(self.ctx.device)
        set_train_mode(self.model, True)
        self.trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trained:
            raise ValueError("nothing to train: the PEFT config freezes every parameter")
        self._check_modalities()
        # Complete weights unless a base file holds the frozen part.
        self.save_full = self.start_model is not None or self.base_identity["kind"] == "random init" or len(
            self.trained) == len(list(self.model.parameters()))

        self._setup_data()
        self._setup_optim()
        self.log = RunLog(self.out_dir, enabled=self.ctx.is_main)
        if last is not None:
            self._load_last(last)
        self.log.info = self._run_info()

    def _check_modalities(self) -> None:
        """With a modality controller, every data entry's label must name one of its modalities
        (checked before any data is read)."""
        labels = list(dict.fromkeys(entry.label for entry in self.config.data))
        ids = label_modality_ids(self.model, labels, self.source)
        if ids is not None:
            self._say("modality controller: " + ", ".join(f"{label} -> modality {int(i)}"
                                                           for label, i in zip(labels, ids, strict=True)))

    def _set_modalities(self, sets: list[D.CachedSet]) -> torch.Tensor | None:
        """The controller's modality id of each cached set (None: the model has no controller)."""
        ids = label_modality_ids(self.model, [s.name for s in sets], self.source)
        return None if ids is None else ids.to(self.ctx.device)

    def _setup_data(self) -> None:
        cfg, ctx = self.config, self.ctx
        size = cfg.model.image_size
        D.ensure_all_phantoms(cfg.data, self.out_dir, ctx)
        if cfg.zoom is not None:
            self._setup_zoom_data()
            return
        train_sets, val_sets = [], []
        bars = cfg.progress and ctx.is_main
        with D.main_fills_cache_first(ctx, cfg.cache_dir):
            for entry in cfg.data:
                root = D.entry_root(entry, self.out_dir)
                if entry.split_train is not None:
                    ds = D.open_split(entry, root, entry.split_train)
                    train_sets.append(D.build_cached_set(entry.label, ds, size, cache_dir=cfg.cache_dir,
                                                         progress=bars))
                if entry.split_val is not None:
                    ds = D.open_split(entry, root, entry.split_val)
                    val_sets.append(D.build_cached_set(entry.label, ds, size, cache_dir=cfg.cache_dir,
                                                       keep_native_masks=True, progress=bars))
        self.train_set = D.TrainSet(train_sets, cfg.prompts.train, cfg.augment, cfg.seed)
        self.train_modality, self.val_modality = self._set_modalities(train_sets), self._set_modalities(val_sets)
        if len(self.train_set) == 0:
            raise ValueError("no training image with an object (every training mask is empty or no "
                             "data entry has a split_train)")
        v = cfg.prompts.val
        self.val = D.build_val_data(val_sets, v.mode, v.jitter, v.seed)
        self._setup_loader(D.collate, "training samples")
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

    def _setup_zoom_data(self) -> None:
        cfg = self.config
        if self._set_modalities([]) is not None:
            raise ValueError("zoomed training does not support a modality controller yet")
        train_sets = [Z.build_native_set(entry, D.open_split(entry, D.entry_root(entry, self.out_dir),
                                                             entry.split_train), cfg.zoom, progress=cfg.progress)
                      for entry in cfg.data if entry.split_train is not None]
        self.val_datasets = [D.open_split(entry, D.entry_root(entry, self.out_dir), entry.split_val)
                             for entry in cfg.data if entry.split_val is not None]
        self.train_set = Z.ZoomTrainSet(train_sets, cfg.prompts.train, cfg.zoom, cfg.model.image_size, cfg.seed,
                                        cfg.augment.hflip)
        self.train_modality = self.val_modality = None
        if len(self.train_set) == 0:
            raise ValueError("no training image with an object or a region")
        self._setup_loader(D.collate, "training samples")
        self.data_counts = {
            "train": {s.name: {"images": len(s), "drawn_per_epoch": n, "targets": "labels" if s.masks else "regions",
                               "empty_skipped": self.train_set.n_empty[s.name]}
                      for s, n in zip(train_sets, self.train_set.counts, strict=True)},
            "val": {d.name: {"images": len(d)} for d in self.val_datasets},
        }
        for name, counts in self.data_counts["train"].items():
            self._say(f"train {name}: {counts['images']} images ({counts['targets']}), {counts['drawn_per_epoch']} "
                      f"samples per epoch, {counts['empty_skipped']} without a target")
        v = cfg.prompts.val
        for d in self.val_datasets:
            self._say(f"val   {d.name} ({d.split}): {len(d)} images, zoomed predictor (margin "
                      f"{cfg.zoom.inference_margin}), prompt {v.mode} J={v.jitter:g} seed {v.seed}")

    def _setup_optim(self) -> None:
        cfg, ctx = self.config, self.ctx
        self.optimisation = Optimisation(self.trained, cfg.optim, cfg.amp, ctx.device, cfg.cpu_amp)
        self._say(f"precision: {self.optimisation.precision} on {ctx.device}")
        # Unused parameters happen legitimately (e.g. the object-score head has no loss).
        self.forward = ctx.wrap(_TrainForward(self.model), find_unused_parameters=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def _weights(self) -> tuple[str, dict[str, torch.Tensor]]:

        if self.save_full:
            return WEIGHTS_FULL, {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return WEIGHTS_TRAINED, {k: v.cpu() for k, v in trainable_state_dict(self.model).items()}

    def _save_last(self) -> None:
        if not self.ctx.is_main:
            return
        kind, weights = self._weights()
        o = self.config.optim
        self._write_last({
            "format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config.to_dict(),
            "weights": kind, "model": weights,
            **progress_entries(self.optimisation, self.state, self.ctx.world_size),
            "schedule": {"lr": self.optimisation.optimizer.param_groups[0]["lr"], "gamma": o.gamma,
                         "warmup_steps": o.warmup_steps},
            "base": self.base_identity,
        })

    def _load_last(self, path: Path) -> None:

        doc = read_state(path, STATE_FORMAT, "training state written by uniultra train")
        check_config_unchanged(path, doc["config"], self.config.to_dict(), RESUMABLE_CHANGES)
        if doc["base"].get("sha256") != self.base_identity.get("sha256"):
            raise ValueError(f"{path}: the run was trained from base {doc['base'].get('path')} "
                             f"(sha256 {doc['base'].get('sha256')}), not {self.base_identity.get('path')}")
        state = TrainState(**doc["state"])
        check_world_size(path, doc, self.ctx.world_size, state.batch_in_epoch)
        if doc["weights"] == WEIGHTS_FULL:
            self.model.load_state_dict(doc["model"])
        else:
            load_trainable_state(self.model, doc["model"])
        restore_progress(doc, self.optimisation, path)
        self.state = state
        self.log.restore(state.step, state.epoch)
        self._say(resumed_message(path, state))

    def _save_best(self, val: dict[str, Any] | None) -> None:
        if not self.ctx.is_main:
            return
        with self.optimisation.ema_applied():
            kind, weights = self._weights()
        meta = {
            "weights": kind, "base": self.base_identity, "peft": self.peft.to_dict(),
            "train": {"config": self.config.to_dict(), "epoch": self.state.epoch, "step": self.state.step,
                      "ema": self.config.optim.ema, "val": val, "trainable": self.report.to_dict(),
                      "selection": "mean over datasets of the val-split Dice" if val else "last epoch (no val)"},
        }
        if self._controller_meta() is not None:  # load_model re-attaches it before loading the weights
            meta[CONTROLLER_META] = self._controller_meta()
        if self.config.zoom is not None:  # how the model must be run: on crops around each prompt
            meta[INFERENCE_META] = {"zoom": {"margin": self.config.zoom.inference_margin}}
        save_model(self.model, self.out_dir / "best.pt", meta=meta, state=weights)

    def _controller_meta(self) -> dict[str, Any] | None:
        """The modality controller's config as checkpoints record it (None without one)."""
        controller = controller_config(self.model)
        return None if controller is None else controller.to_dict()

    # -- validation -----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Dice/IoU per val dataset at native resolution, sharded over processes."""

        if self.config.zoom is not None:
            return self._validate_zoom()
        if not self.val.images:
            return None
        ctx, model, device = self.ctx, self.model, self.ctx.device
        mine = self.val.images[ctx.rank::ctx.world_size]
        rows = []
        model.eval()
        try:
            with self.optimisation.ema_applied(), self._autocast():
                chunk = self.config.val_batch_size
                for start in range(0, len(mine), chunk):
                    part = mine[start:start + chunk]
                    images = torch.stack([torch.from_numpy(self.val.sets[v.set_index].image(v.index)).expand(3, -1, -1)
                                          for v in part]).to(device)
                    modality = None if self.val_modality is None else self.val_modality[
                        torch.tensor([v.set_index for v in part], device=device)]
                    with use_modality(model, modality):
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
                        logits = upsample_logits(all_logits[owner == j], s.native_hw[v.index])
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

    @torch.no_grad()
    def _validate_zoom(self) -> dict[str, Any] | None:
        """The val splits through the zoomed predictor and the evaluation loop: what users get."""

        if not self.val_datasets:
            return None
        v = self.config.prompts.val
        result: dict[str, Any] = {"datasets": {}}
        try:
            with self.optimisation.ema_applied():
                predictor = ZoomPredictor(Predictor(self.model), self.config.zoom.inference_margin)
                for dataset in self.val_datasets:
                    summary = evaluate_dataset(ModelMethod("val", predictor), dataset, prompt_mode=v.mode,
                                               jitter=v.jitter, seed=v.seed, progress=False).summary()
                    result["datasets"][dataset.name] = {"dice": summary["dice"]["mean"],
                                                        "iou": summary["iou"]["mean"],
                                                        "n": summary["n"], "skipped": summary["n_skipped"]}
        finally:
            set_train_mode(self.model, True)
        scored = [d["dice"] for d in result["datasets"].values() if d["dice"] is not None]
        result["dice"] = float(np.mean(scored)) if scored else None
        return result

    # -- the loop -------------------------------------------------------------------------------

    def _train_step(self, batch: D.Batch, epoch: int) -> dict[str, float]:
        cfg = self.config
        batch = batch.to(self.ctx.device)
        groups = [(g.index, g.coords, g.labels, g.kind == "point" and cfg.loss.multimask_for_points,
                   cfg.interactive is not None and cfg.interactive.corrects(g.kind)) for g in batch.groups]
        modality = None if self.train_modality is None else self.train_modality[batch.sets]
        rounds = interactive_rounds(cfg.interactive, cfg.seed, self.state.step)
        generator = step_generator(cfg.seed, self.state.step, batch.images.device) if rounds else None
        with self._autocast():
            outputs = self.forward(batch.images, groups, modality, batch.targets, rounds, generator,
                                   cfg.interactive is None or cfg.interactive.mask_prompt)
        totals, terms = [], {"focal": [], "dice": [], "iou": [], "real_iou": []}
        for g, passes in zip(batch.groups, outputs, strict=True):
            # Every pass counts alike; the logged terms stay those of the first (the prompt's answer).
            outside = None if batch.outside is None else batch.outside[g.index]
            losses = [segmentation_loss(logits, iou, batch.targets[g.index], cfg.loss, outside)
                      for logits, iou in passes]
            totals.append(torch.stack([total for total, _ in losses]).mean(dim=0))
            for k in terms:
                terms[k].append(losses[0][1][k])
        loss = torch.cat(totals).mean()
        lr, grad_norm = self.optimisation.step(loss, epoch, self.state.step)
        values = torch.stack([loss.detach().float()] + [torch.cat(terms[k]).float().mean() for k in terms]
                             + [grad_norm.detach().float().to(loss.device)])
        values = self.ctx.mean(values).tolist()
        if not math.isfinite(values[0]):
            raise FloatingPointError(f"training loss is {values[0]} at step {self.state.step + 1} "
                                     "(lower optim.lr, or enable optim.grad_clip / warmup)")
        return {"lr": lr, "loss": values[0], "focal": values[1], "dice": values[2], "iou_loss": values[3],
                "real_iou": values[4], "grad_norm": values[5]}

    def _step_line(self, epoch: int, row: dict[str, Any]) -> str:
        return (f"epoch {epoch + 1} step {row['batch']}/{self.steps_per_epoch} (global {row['step']}) "
                f"loss {row['loss']:.4f} dice {row['dice']:.4f} lr {row['lr']:.2e} {row['seconds']:.2f} s/step")

    def _epoch_row(self, epoch: int, val: dict[str, Any] | None, best: bool,
                   seconds: dict[str, float | None]) -> dict[str, Any]:
        state = self.state
        losses = [r["loss"] for r in self.log.steps if r["epoch"] == epoch + 1]
        row: dict[str, Any] = {
            "epoch": state.epoch, "end_step": state.step, "lr": self.lr_at(epoch, state.step - 1),
            "train_loss": float(np.mean(losses)) if losses else None,
            "val_dice": val["dice"] if val else None, "best": best, **seconds,
        }
        for name, d in (val or {}).get("datasets", {}).items():
            row[f"val_dice_{name}"] = d["dice"]
            row[f"val_iou_{name}"] = d["iou"]
        return row

    def _epoch_line(self, row: dict[str, Any], val: dict[str, Any] | None) -> str:
        score = row["val_dice"]
        per_set = "  ".join(f"{n} {100 * d['dice']:.2f}" for n, d in (val or {}).get("datasets", {}).items()
                            if d["dice"] is not None)
        return (f"epoch {row['epoch']}/{self.config.optim.epochs}  train loss {row['train_loss']:.4f}  "
                + (f"val Dice {per_set}  mean {100 * score:.2f}{'  *best*' if row['best'] else ''}  "
                   if score is not None else "")
                + self._timing_text(row))

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
        self._run_epochs()
        self._write_hash()
        return TrainResult(self.out_dir, state, self.model, list(self.log.epochs))

    def _write_hash(self) -> None:
        write_weights_hash("", self.ctx.rank, self.ctx.world_size, self.state.step, self.model.state_dict())

    def _run_info(self) -> dict[str, Any]:
        return {
            **run_info(self.command, self.source, self.config.to_dict(), self.ctx),
            "model": self.model.config.to_dict(), "base": self.base_identity, "trainable": self.report.to_dict(),
            "data": self.data_counts, "steps_per_epoch": self.steps_per_epoch,
            "precision": self.optimisation.precision, "modality_controller": self._controller_meta(),
        }


def train(config: TrainConfig, *, resume: bool = False, hooks: TrainHooks | None = None,
          command: str | None = None, source: str = "config") -> TrainResult:
    """Train as configured; see the module docstring for what lands in `config.out_dir`."""
    return Trainer(config, resume=resume, hooks=hooks, command=command, source=source).run()
