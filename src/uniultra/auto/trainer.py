"""Training of the automatic head: `train_auto(config)` (what `uniultra auto train` runs).

Per step: the prompt generator and the modality decoder (plus, by default, the base decoder's
transformer and upscaling path) run on the batch's image features; loss = focal + dice of the
mask logits upsampled to the input size against the mask at that size (as `uniultra train`) +
`loss.patch` x BCE of the patch logits against the max-pooled mask. Every training image is used,
including those with an EMPTY mask: "nothing here" is an answer the head must learn.

With `model.freeze_encoder` (the default) the encoder never changes, so its features are
computed once per (un-augmented) image at the base's input size and memory-mapped from disk
(float16; keyed by the base weights' sha256, the dataset files, split and size); a step then
costs only the decoder.

Per epoch: validation on the val splits, Dice at each image's native resolution (empty truth +
empty prediction = 1, uniultra.evaluation.metrics.dice_score), averaged per dataset then over
datasets; `best.pt` (an auto checkpoint, uniultra.models.auto_checkpoint) when that mean improves;
`last.pt` is the resume state (`--resume`); logs as `uniultra train` (steps.csv, epochs.csv,
log.json, curves.png). After the last epoch the presence gate of `best.pt` is calibrated on the
val splits (uniultra.auto.calibration).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from uniultra.auto.calibration import Calibration, ImageOutcome, choose_threshold
from uniultra.auto.config import AutoLossConfig, AutoTrainConfig
from uniultra.auto.presence_fit import ChannelData, fit_presence_probe, out_of_fold_logits
from uniultra.engine import data as D
from uniultra.engine.checkpointing import (
    check_config_unchanged,
    existing_state,
    progress_entries,
    read_state,
    restore_progress,
    resumed_message,
)
from uniultra.engine.distributed import DistContext, pick_device
from uniultra.engine.epoch_loop import EpochLoop
from uniultra.engine.logs import RunLog, run_info
from uniultra.engine.losses import dice_loss, sigmoid_focal_loss
from uniultra.engine.optimisation import Optimisation
from uniultra.engine.rng import seed_all
from uniultra.engine.trainer import TrainHooks, TrainState
from uniultra.engine.weights_hash import state_hash
from uniultra.inference.loading import load_auto_model
from uniultra.inference.transforms import upsample_logits
from uniultra.models.auto_checkpoint import (
    CALIBRATION_META,
    META_KEY,
    PROBE_META,
    fitted_probe_channels,
    is_auto_data,
    load_head_state,
    save_auto_model,
)
from uniultra.models.auto_segmenter import AutoHeadConfig, AutoOutput, AutoSegmenter, presence
from uniultra.models.checkpoint import AUTO_HEAD_PREFIX, read_checkpoint
from uniultra.models.image_model import ImageFeatures, SAM2ImageModel
from uniultra.models.patch_prompt import patch_targets
from uniultra.models.presence_probe import pooled_statistics

STATE_FORMAT = "uniultra-auto-train-state"
STATE_VERSION = 1
FEATURE_CACHE_VERSION = 1
# Config keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("optim.epochs", "out_dir", "log_every", "checkpoint_every", "num_workers", "device",
                     "progress", "cache_dir", "val_batch_size", "threads")
STEP_FIELDS = ("step", "epoch", "batch", "lr", "loss", "focal", "dice", "patch_bce", "presence_bce", "grad_norm",
               "seconds")


@dataclass
class AutoTrainResult:
    out_dir: Path
    state: TrainState
    model: AutoSegmenter
    epochs: list[dict[str, Any]] = field(default_factory=list)
    calibration: Calibration | None = None


# --- model --------------------------------------------------------------------------------------

def load_base(config: AutoTrainConfig, source: str = "config") -> tuple[SAM2ImageModel, dict[str, Any]]:
    """The base model and the identity of its weights (file + sha256, or seeded random init)."""
    from uniultra.inference.loading import base_identity, bundled_default_path, load_base_model, load_default_model
    from uniultra.models.config import preset

    spec, size = config.model.base, config.model.image_size
    if spec == "default":
        return load_default_model(size), base_identity(bundled_default_path(), "bundled default")
    if spec.startswith("preset:"):
        torch.manual_seed(config.seed)
        name = spec.split(":", 1)[1]
        model = SAM2ImageModel(preset(name, size or 1024))
        return model, {"kind": "random init", "preset": name, "seed": config.seed,
                       "sha256": state_hash(model.state_dict())}
    if not Path(spec).is_file():
        raise FileNotFoundError(f"base checkpoint {spec} does not exist (model.base in {source})")
    return load_base_model(spec, size)


def frozen_features_config(config: AutoTrainConfig, checkpoint: str | os.PathLike) -> AutoTrainConfig:
    """`config` with `checkpoint`'s image model as a frozen base: for a run that trained its encoder
    (`model.freeze_encoder: false`), the presence probe and gate are fitted on the cached features of the
    encoder it trained, never on those of the base it started from."""
    model = dataclasses.replace(config.model, base=str(checkpoint), freeze_encoder=True, init_head=None)
    return config.replace(model=model, augment=None)


def build_auto_model(config: AutoTrainConfig, source: str = "config") -> tuple[AutoSegmenter, dict[str, Any]]:
    base, identity = load_base(config, source)
    m = config.model
    head = AutoHeadConfig(modalities=config.modalities, modality_decoder=m.modality_decoder, patch_size=m.patch_size,
                          presence_head=m.presence_head, presence_probe=m.presence_probe, own_decoder=m.own_decoder)
    torch.manual_seed(config.seed)  # the prompt generator's random init
    model = AutoSegmenter(base, head)
    if m.init_head is not None:
        warm_start_head(model, Path(m.init_head), source)
    return model, identity


def warm_start_head(model: AutoSegmenter, path: Path, source: str = "config") -> None:
    """Load the head weights of the automatic checkpoint `path` into `model` (`model.init_head`): same
    channels in the same order, same head settings; a presence probe in the file is dropped when
    `model` has none (it is fitted after training, on the final encoder's features)."""
    if not path.is_file():
        raise FileNotFoundError(f"model.init_head {path} does not exist ({source})")
    data = read_checkpoint(path)
    if not is_auto_data(data):
        raise ValueError(f"model.init_head {path}: not an automatic checkpoint (no head to start from; {source})")
    theirs = tuple(data["meta"][META_KEY].get("modalities") or ())
    if theirs != model.config.modalities:
        raise ValueError(f"model.init_head {path}: its channels {list(theirs)} are not this run's "
                         f"{list(model.config.modalities)} (the data entries, in order; {source})")
    probe = f"{AUTO_HEAD_PREFIX}presence_probe."
    state = {k: v for k, v in data["state_dict"].items()
             if not (model.presence_probe is None and k.startswith(probe))}
    load_head_state(model, state, path)


def mark_trainable(model: AutoSegmenter, config: AutoTrainConfig) -> dict[str, nn.Parameter]:
    """Set requires_grad as configured; returns the trained parameters by name."""
    model.requires_grad_(False)
    parts: list[nn.Module] = [model.prompt_generator, model.modality_decoder]
    if model.presence_head is not None:
        parts.append(model.presence_head)
    decoder = model.auto_decoder
    if config.model.train_decoder:
        # Only what the automatic path uses: the base's mask tokens, hypernetworks, IoU and
        # object-score heads get no loss here, so they stay as they were (box prompts keep them).
        parts += [decoder.transformer, decoder.output_upscaling, decoder.iou_token]
        if decoder.pred_obj_scores:
            parts.append(decoder.obj_score_token)
    if not config.model.freeze_encoder:
        parts.append(model.base.image_encoder)
        base_decoder = model.base.sam_mask_decoder  # its high-res projections are part of the encoding
        if base_decoder.use_high_res_features:
            parts += [base_decoder.conv_s0, base_decoder.conv_s1]
    for part in parts:
        part.requires_grad_(True)
    if not config.model.freeze_encoder:
        model.base.no_mem_embed.requires_grad_(True)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- loss ---------------------------------------------------------------------------------------

def auto_loss(out: AutoOutput, masks: torch.Tensor, patch_size: int,
              cfg: AutoLossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch loss and its terms; masks (B, S, S) 0/1 at the model input size."""
    logits = upsample_logits(out.low_res_logits, masks.shape[-2:])
    targets = masks.unsqueeze(1).float()
    focal = sigmoid_focal_loss(logits, targets, cfg.focal_alpha, cfg.focal_gamma).mean()
    dice = dice_loss(logits, targets).mean()
    patch = F.binary_cross_entropy_with_logits(out.patch_logits.float(), patch_targets(targets, patch_size))
    total = cfg.focal * focal + cfg.dice * dice + cfg.patch * patch
    terms = {"focal": focal.detach(), "dice": dice.detach(), "patch_bce": patch.detach()}
    if out.presence_logits is not None:
        present = targets.flatten(1).amax(dim=1)
        bce = F.binary_cross_entropy_with_logits(out.presence_logits.float(), present)
        total = total + cfg.presence * bce
        terms["presence_bce"] = bce.detach()
    return total, terms


# --- data ---------------------------------------------------------------------------------------

@dataclass
class SplitData:
    """One split of one dataset at the model's input size, with its decoding channel."""

    images: D.CachedSet
    modality: int
    features: dict[str, np.ndarray] | None = None  # memory-mapped cached encoder features


def feature_shapes(model: AutoSegmenter) -> dict[str, tuple[int, int, int]]:
    cfg = model.base.config
    size, dim = cfg.image_size, cfg.neck.d_model
    shapes = {"embed": (dim, size // cfg.backbone_stride, size // cfg.backbone_stride)}
    if model.base.sam_mask_decoder.use_high_res_features:
        shapes |= {"s0": (dim // 8, size // 4, size // 4), "s1": (dim // 4, size // 8, size // 8)}
    return shapes


def features_from(arrays: dict[str, torch.Tensor]) -> ImageFeatures:
    high_res = [arrays[k] for k in ("s0", "s1") if k in arrays]
    return ImageFeatures(image_embed=arrays["embed"], high_res_feats=high_res)


def feature_cache_stem(split: D.CachedSet, dataset, base_sha256: str, size: int) -> str:
    from uniultra.distill.data import dataset_key

    key = json.dumps([FEATURE_CACHE_VERSION, dataset_key(dataset), base_sha256, size, "float16"])
    return f"{split.name}-{split.split or 'all'}-{size}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class AutoSet(Dataset):
    """Every image of several splits (empty masks included); items addressed by (epoch, index)."""

    def __init__(self, splits: list[SplitData], augment_cfg, seed: int) -> None:
        self.splits = splits
        self.augment = augment_cfg
        self.seed = seed
        self.items = [(si, i) for si, s in enumerate(splits) for i in range(len(s.images))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        si, i = self.items[index]
        split = self.splits[si]
        item: dict[str, Any] = {"modality": split.modality}
        mask = np.asarray(split.images.masks[i])
        if split.features is not None:
            item["features"] = {k: torch.from_numpy(np.array(v[i], dtype=np.float32))
                                for k, v in split.features.items()}
        else:
            image = split.images.image(i)
            if self.augment is not None:
                image, mask = D.augment(image, mask, self.augment, np.random.default_rng([self.seed, epoch, index]))
            item["image"] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).expand(3, -1, -1)
        item["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        return item


def collate(items: list[dict]) -> dict:
    batch: dict[str, Any] = {"modality": torch.tensor([it["modality"] for it in items], dtype=torch.long),
                             "mask": torch.stack([it["mask"] for it in items])}
    if "features" in items[0]:
        batch["features"] = {k: torch.stack([it["features"][k] for it in items]) for k in items[0]["features"]}
    else:
        batch["image"] = torch.stack([it["image"] for it in items])
    return batch


class AutoRunLog(RunLog):
    @property
    def step_fields(self) -> list[str]:
        return list(STEP_FIELDS)


# --- the trainer --------------------------------------------------------------------------------

class AutoTrainer(EpochLoop):
    epoch_label = "auto epoch"

    def __init__(self, config: AutoTrainConfig, *, resume: bool = False, hooks: TrainHooks | None = None,
                 command: str | None = None, source: str = "config") -> None:
        super().__init__(config, resume=resume, hooks=hooks or TrainHooks(), command=command, source=source,
                         state=TrainState())

    def run(self) -> AutoTrainResult:
        self._setup()
        cfg = self.config
        self._say(f"training the automatic head {cfg.optim.epochs} epochs x {self.steps_per_epoch} steps "
                  f"(batch {cfg.optim.batch_size}) on {self.ctx.device}; out {self.out_dir}")
        self._run_epochs()
        best = self.out_dir / "best.pt"
        fitter = self if cfg.model.freeze_encoder else self._fitter_on_trained_encoder(best)
        if cfg.model.presence_probe:
            self._say(probe_text(fitter.fit_presence_probe(best)))
        calibration = fitter.calibrate_presence(best, cross_fit=cfg.model.presence_cross_fit)
        if calibration is not None:
            self._say(calibration_text(calibration))
        return AutoTrainResult(self.out_dir, self.state, self.model, list(self.log.epochs), calibration)

    def _fitter_on_trained_encoder(self, best: Path) -> AutoTrainer:
        """A trainer whose cached features are those of `best`'s trained encoder, ready to fit the presence
        probe and choose the gate (a run that trained its encoder scores presence with it)."""
        cfg = self.config
        fitter = AutoTrainer(frozen_features_config(cfg, best), source=f"{self.source} (trained encoder of {best})")
        fitter.setup_validation(train=cfg.model.presence_probe, native_train=cfg.model.presence_cross_fit > 0)
        return fitter

    # -- set-up ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("uniultra auto train runs in one process (it trains only the head on cached "
                             "features); start it without torchrun")
        self.ctx = DistContext(device=pick_device(cfg.device))
        last = existing_state(self.out_dir, self.resume)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_all(cfg.seed)
        self.model, self.base_identity = build_auto_model(cfg, self.source)
        self.model.to(self.ctx.device)
        self.trained = mark_trainable(self.model, cfg)
        self._say(self._trainable_text())
        self._setup_data()
        self.optimisation = Optimisation(self.trained, cfg.optim, "none", self.ctx.device)
        self.log = AutoRunLog(self.out_dir)
        if last is not None:
            self._load_last(last)
        self.log.info = self._run_info()

    def setup_validation(self, train: bool = False, native_train: bool = False,
                         train_only: Collection[str] | None = None) -> None:
        """Only what `calibrate_presence` needs (device, base, val splits; with `train`, the train
        splits too, for `fit_presence_probe`, or of the `train_only` datasets, with their native masks
        for a cross-fitted calibration when `native_train`): for a finished run."""
        cfg = self.config
        self.ctx = DistContext(device=pick_device(cfg.device))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model, self.base_identity = build_auto_model(cfg, self.source)
        self.model.to(self.ctx.device)
        self.train_splits, self.val_splits = self._splits(train=train, native_train=native_train,
                                                          train_only=train_only)

    def _splits(self, train: bool = True, native_train: bool = False,
                train_only: Collection[str] | None = None) -> tuple[list[SplitData], list[SplitData]]:
        """(train splits, val splits) of the config's data entries, each with its decoding channel."""
        found: tuple[list[SplitData], list[SplitData]] = ([], [])
        for entry in self.config.data:
            root = D.ensure_phantoms(entry, self.out_dir) if entry.phantom is not None else Path(entry.path)
            modality = self.model.modality_index(entry.label)
            wanted = train and (train_only is None or entry.label in train_only)
            for split_name, target, native in ((entry.split_train if wanted else None, found[0], native_train),
                                               (entry.split_val, found[1], True)):
                if split_name is not None:
                    target.append(self._split(entry, root, split_name, modality, native))
        return found

    def _trainable_text(self) -> str:
        n_trained = sum(p.numel() for p in self.trained.values())
        n_total = sum(p.numel() for p in self.model.parameters())
        head = self.model.config
        return (f"automatic head: {head.channels} decoding channel(s) for {list(head.modalities)}, patch "
                f"{head.patch_size} px; training {n_trained:,} of {n_total:,} parameters")

    def _setup_data(self) -> None:
        cfg = self.config
        train, val = self._splits(native_train=cfg.model.presence_cross_fit > 0)
        self.train_splits = train
        self.train_set = AutoSet(train, cfg.augment, cfg.seed)
        if len(self.train_set) == 0:
            raise ValueError("no training image: no data entry has a split_train with images")
        self.val_splits = val
        self._setup_loader(collate, "training images")
        self.data_counts = {"train": self._counts(train), "val": self._counts(val)}
        for kind, splits in (("train", train), ("val", val)):
            for s in splits:
                n_empty = self.data_counts[kind][s.images.name]["empty_masks"]
                self._say(f"{kind:5s} {s.images.name} ({s.images.split}): {len(s.images)} images, "
                          f"{n_empty} with an empty mask (kept)")
        if not val:
            self._say("WARNING: no validation split: best.pt will hold the last epoch's weights")

    @staticmethod
    def _counts(splits: list[SplitData]) -> dict[str, dict[str, int]]:
        return {s.images.name: {"images": len(s.images),
                                "empty_masks": int((~np.asarray(s.images.masks).reshape(len(s.images), -1)
                                                    .any(axis=1)).sum())}
                for s in splits}

    def _split(self, entry, root: Path, split_name: str, modality: int, native: bool) -> SplitData:
        cfg = self.config
        dataset = D.open_split(entry, root, split_name)
        images = D.build_cached_set(entry.label, dataset, self.model.image_size, cache_dir=cfg.cache_dir,
                                    keep_native_masks=native, progress=cfg.progress)
        features = self._feature_cache(images, dataset) if cfg.model.freeze_encoder else None
        return SplitData(images, modality, features)

    def _feature_cache(self, images: D.CachedSet, dataset) -> dict[str, np.ndarray]:
        from uniultra.distill.data import build_teacher_cache

        model = self.model
        stem = feature_cache_stem(images, dataset, self.base_identity["sha256"], model.image_size)

        @torch.no_grad()
        def compute(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            model.eval()
            features = model.encode_image(model.normalize(batch.to(self.ctx.device)))
            return {"embed": features.image_embed, **dict(zip(("s0", "s1"), features.high_res_feats, strict=False))}

        return build_teacher_cache(stem, self.config.feature_cache_dir, images, feature_shapes(self.model),
                                   compute, "float16", batch_size=self.config.val_batch_size,
                                   progress=self.config.progress)

    # -- one step -------------------------------------------------------------------------------

    def _features(self, batch: dict) -> ImageFeatures:
        device = self.ctx.device
        if "features" in batch:
            return features_from({k: v.to(device) for k, v in batch["features"].items()})
        return self.model.encode_image(self.model.normalize(batch["image"].to(device)))

    def _train_step(self, batch: dict, epoch: int) -> dict[str, float]:
        self.model.train()
        out = self.model.decode_auto(self._features(batch), batch["modality"].to(self.ctx.device))
        loss, terms = auto_loss(out, batch["mask"].to(self.ctx.device), self.model.config.patch_size,
                                self.config.loss)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.state.step + 1} "
                                     "(lower optim.lr, or enable optim.grad_clip / warmup)")
        lr, grad_norm = self.optimisation.step(loss, epoch, self.state.step)
        return {"lr": lr, "loss": loss.item(), **{k: float(v) for k, v in terms.items()},
                "grad_norm": float(grad_norm)}

    # -- validation -----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Dice / IoU per val dataset at native resolution; empty truth + empty prediction = 1."""
        if not self.val_splits:
            return None
        self.model.eval()
        with self.optimisation.ema_applied():
            per_set = {s.images.name: self._validate_split(s) for s in self.val_splits}
        self.model.train()
        scored = [d["dice"] for d in per_set.values() if d["dice"] is not None]
        return {"datasets": per_set, "dice": float(np.mean(scored)) if scored else None}

    def _validate_split(self, split: SplitData, model: AutoSegmenter | None = None) -> dict[str, Any]:
        rows = self._score_split(split, model or self.model)
        empty = [r for r in rows if r[2]]
        mean = lambda k: float(np.mean([r[k] for r in rows])) if rows else None  # noqa: E731
        return {"dice": mean(0), "iou": mean(1),
                "n": len(rows), "n_empty": len(empty),
                "empty_correct": float(np.mean([r[3] for r in empty])) if empty else None}

    def _score_split(self, split: SplitData, model: AutoSegmenter) -> list[tuple[float, float, bool, bool, float]]:
        """Per val image: (Dice, IoU, truth empty, prediction empty, presence) at native resolution."""
        from uniultra.evaluation.metrics import dice_score, iou_score

        rows = []
        n, chunk = len(split.images), self.config.val_batch_size
        for start in range(0, n, chunk):
            idx = list(range(start, min(start + chunk, n)))
            out = self._predict(split, idx, model)
            logits, scores = out.low_res_logits.detach().float(), presence(out).detach()
            for j, i in enumerate(idx):
                up = upsample_logits(logits[j:j + 1], split.images.native_hw[i])
                pred = (up[0, 0] > 0).cpu().numpy()
                truth = split.images.native_masks[i]
                rows.append((dice_score(pred, truth), iou_score(pred, truth), not truth.any(), not pred.any(),
                             float(scores[j])))
        return rows

    @torch.no_grad()
    def calibrate_presence(self, path: Path, cross_fit: int = 0) -> Calibration | None:
        """Choose the presence gate on the val splits for the auto checkpoint `path` and rewrite it.

        With `cross_fit` K >= 2, the train images of every channel whose presence probe was fitted join
        the val images, each scored by a probe fitted without its fold (`out_of_fold_logits`): BUSI has
        10 normal val scans but 109 train ones. Their masks come from a head trained on them, so their
        Dice is optimistic; a missed lesion then weighs a little more than on unseen images.
        """
        if not self.val_splits:
            return None
        model = self._load_on_cached_features(path)
        model.config = dataclasses.replace(model.config, presence_threshold=None)
        outcomes = {s.images.name: [ImageOutcome(presence=r[4], dice=r[0], truth_empty=r[2])
                                    for r in self._score_split(s, model)] for s in self.val_splits}
        meta = dict(read_checkpoint(path).get("meta") or {})
        train = self._cross_fitted_train_outcomes(model, meta, path, cross_fit) if cross_fit else {}
        for name, rows in train.items():
            outcomes[name] = [*outcomes.get(name, []), *rows]
        source = (f"val + train of {', '.join(train)} scored by {cross_fit}-fold cross-fitted presence probes"
                  if train else "val")
        result = choose_threshold(outcomes, source)
        model.config = dataclasses.replace(model.config, presence_threshold=result.threshold)
        meta[CALIBRATION_META] = result.as_dict()
        save_auto_model(model, path, meta=meta)
        return result

    def _load_on_cached_features(self, path: Path) -> AutoSegmenter:
        """The auto checkpoint `path`, refused unless its automatic path reads this run's encoder (the
        cached features are `model.base`'s; a packed file's own encoder must be that model's)."""
        model = load_auto_model(path, self.ctx.device)
        mine = self.model.features_model.image_encoder.state_dict()
        theirs = model.features_model.image_encoder.state_dict()
        if mine.keys() != theirs.keys() or any(not torch.equal(v, theirs[k].to(v.device)) for k, v in mine.items()):
            raise ValueError(f"{path}: its automatic path runs another image encoder than model.base of {self.source} "
                             f"({self.config.model.base}), whose features this command reads: give the config its "
                             "head was trained with")
        return model

    def _cross_fitted_train_outcomes(self, model: AutoSegmenter, meta: dict[str, Any], path: Path,
                                     folds: int) -> dict[str, list]:
        """Train images of the probe's fitted channels (from the checkpoint's `meta`): out-of-fold
        presence, ungated Dice."""
        if model.presence_probe is None:
            raise ValueError(f"{path}: no presence probe to cross-fit (uniultra auto fit-presence adds one)")
        fitted = fitted_probe_channels(meta)
        found: dict[str, list[ImageOutcome]] = {}
        for channel, name in enumerate(model.config.modalities if model.config.modality_decoder else ("shared",)):
            splits = [s for s in self.train_splits if s.modality == channel]
            if name not in fitted or not splits:
                continue
            report = meta[PROBE_META][name]
            data = [self._channel_statistics([s])[channel] for s in splits]
            probe = model.presence_probe
            x = (torch.cat([d.statistics for d in data]).float() - probe.center.cpu()) / probe.scale.cpu()
            logits = out_of_fold_logits(x, torch.cat([d.present for d in data]), float(report["C"]), folds,
                                        self.config.seed).split([len(d.present) for d in data])
            for split, split_logits in zip(splits, logits, strict=True):
                rows = self._score_split(split, model)
                found[split.images.name] = [ImageOutcome(presence=float(torch.sigmoid(z)), dice=r[0],
                                                         truth_empty=r[2]) for z, r in zip(split_logits, rows,
                                                                                          strict=True)]
        return found

    @torch.no_grad()
    def fit_presence_probe(self, path: Path) -> dict[str, dict]:
        """Fit the presence probe of the auto checkpoint `path` (attached when it has none) on the
        train splits' cached features, strength chosen on val, and rewrite the checkpoint."""
        model = self._load_on_cached_features(path)
        probe = model.presence_probe if model.presence_probe is not None else model.attach_presence_probe()
        report = fit_presence_probe(probe, self._channel_statistics(self.train_splits),
                                    self._channel_statistics(self.val_splits))
        named = {model.config.modalities[int(c)] if model.config.modality_decoder else "shared": r
                 for c, r in report.items()}
        meta = dict(read_checkpoint(path).get("meta") or {})
        meta[PROBE_META] = named
        save_auto_model(model, path, meta=meta)
        return named

    def _channel_statistics(self, splits: list[SplitData]) -> dict[int, ChannelData]:
        """Per decoding channel: the pooled encoder statistics and presence labels of its images."""
        grouped: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for split in splits:
            if split.features is None:
                raise ValueError("the presence probe is fitted on cached features: set model.freeze_encoder: true")
            chunk = self.config.val_batch_size
            for start in range(0, len(split.images), chunk):
                idx = list(range(start, min(start + chunk, len(split.images))))
                features = self._features({"features": {k: torch.from_numpy(np.array(v[idx], dtype=np.float32))
                                                        for k, v in split.features.items()}})
                present = torch.from_numpy(np.asarray(split.images.masks[idx]).reshape(len(idx), -1).any(axis=1))
                grouped.setdefault(split.modality, []).append(
                    (pooled_statistics(features.image_embed, features.high_res_feats).cpu(), present))
        return {c: ChannelData(torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows]))
                for c, rows in grouped.items()}

    def _predict(self, split: SplitData, idx: list[int], model: AutoSegmenter | None = None) -> AutoOutput:
        model = model or self.model
        if split.features is not None:
            batch = {"features": {k: torch.from_numpy(np.array(v[idx], dtype=np.float32))
                                  for k, v in split.features.items()}}
        else:
            batch = {"image": torch.stack([torch.from_numpy(split.images.image(i)).expand(3, -1, -1) for i in idx])}
        modality = torch.full((len(idx),), split.modality, dtype=torch.long, device=self.ctx.device)
        return model.decode_auto(self._features(batch), modality)

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_best(self, val: dict[str, Any] | None) -> None:
        meta = {
            "base": self.base_identity, "modalities": list(self.model.config.modalities),
            "epoch": self.state.epoch, "val_dice": val["dice"] if val else None,
            "train": {"config": self.config.to_dict(), "step": self.state.step, "val": val,
                      "selection": "mean over datasets of the val-split Dice" if val else "last epoch (no val)"},
        }
        with self.optimisation.ema_applied():
            save_auto_model(self.model, self.out_dir / "best.pt", meta=meta)

    def _save_last(self) -> None:
        from uniultra.peft.apply import trainable_state_dict

        self._write_last({
            "format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config.to_dict(),
            "model": trainable_state_dict(self.model),
            **progress_entries(self.optimisation, self.state, 1), "base": self.base_identity,
        })

    def _load_last(self, path: Path) -> None:
        from uniultra.peft.apply import load_trainable_state

        doc = read_state(path, STATE_FORMAT, "resume state written by uniultra auto train")
        check_config_unchanged(path, doc["config"], self.config.to_dict(), RESUMABLE_CHANGES)
        if doc["base"].get("sha256") != self.base_identity.get("sha256"):
            raise ValueError(f"{path}: the run was trained from base {doc['base'].get('path')} "
                             f"(sha256 {doc['base'].get('sha256')}), not {self.base_identity.get('path')}")
        load_trainable_state(self.model, doc["model"])
        restore_progress(doc, self.optimisation, path)
        self.state = TrainState(**doc["state"])
        self.log.restore(self.state.step, self.state.epoch)
        self._say(resumed_message(path, self.state))

    # -- logs -----------------------------------------------------------------------------------

    def _step_line(self, epoch: int, row: dict[str, Any]) -> str:
        return (f"epoch {epoch + 1} step {row['batch']}/{self.steps_per_epoch} (global {row['step']}) "
                f"loss {row['loss']:.4f} dice {row['dice']:.4f} patch {row['patch_bce']:.4f} "
                + (f"presence {row['presence_bce']:.4f} " if "presence_bce" in row else "")
                + f"lr {row['lr']:.2e} {row['seconds']:.2f} s/step")

    def _epoch_row(self, epoch: int, val: dict[str, Any] | None, best: bool,
                   seconds: dict[str, float | None]) -> dict[str, Any]:
        losses = [r["loss"] for r in self.log.steps if r["epoch"] == epoch + 1]
        row: dict[str, Any] = {
            "epoch": self.state.epoch, "end_step": self.state.step, "lr": self.lr_at(epoch, self.state.step - 1),
            "train_loss": float(np.mean(losses)) if losses else None,
            "val_dice": val["dice"] if val else None, "best": best, **seconds,
        }
        for name, d in (val or {}).get("datasets", {}).items():
            row[f"val_dice_{name}"] = d["dice"]
            row[f"val_iou_{name}"] = d["iou"]
            row[f"val_empty_correct_{name}"] = d["empty_correct"]
        return row

    def _epoch_line(self, row: dict[str, Any], val: dict[str, Any] | None) -> str:
        per_set = "  ".join(f"{n} {100 * d['dice']:.2f}" for n, d in (val or {}).get("datasets", {}).items()
                            if d["dice"] is not None)
        score = row["val_dice"]
        return (f"epoch {row['epoch']}/{self.config.optim.epochs}  train loss {row['train_loss']:.4f}  "
                + (f"val Dice {per_set}  mean {100 * score:.2f}{'  *best*' if row['best'] else ''}  "
                   if score is not None else "")
                + self._timing_text(row))

    def _run_info(self) -> dict[str, Any]:
        return {**run_info(self.command, self.source, self.config.to_dict(), self.ctx),
                "model": self.model.base.config.to_dict(), "auto_head": self.model.config.to_dict(),
                "base": self.base_identity, "data": self.data_counts, "steps_per_epoch": self.steps_per_epoch,
                "trained_parameters": sum(p.numel() for p in self.trained.values())}


def calibration_text(c: Calibration) -> str:
    if c.threshold is None:
        return f"presence gate: none (it did not raise the Dice on {c.source}, {100 * c.val_dice_ungated:.2f})"
    gated = sum(d["n_gated"] for d in c.per_dataset.values())
    return (f"presence gate: empty mask below presence probability {c.threshold:.3f}, chosen on {c.source} "
            f"({gated} images gated); Dice {100 * c.val_dice_ungated:.2f} -> {100 * c.val_dice_gated:.2f}")


def probe_text(report: dict[str, dict]) -> str:
    fitted = [f"{name} (C {r['C']}, {r['train_absent']} empty of {r['train_absent'] + r['train_present']} train "
              f"images, val AUC {r['val_auc']:.3f})" for name, r in report.items() if r["fitted"]]
    left = [f"{name} ({r['reason']})" for name, r in report.items() if not r["fitted"]]
    return (f"presence probe fitted: {'; '.join(fitted) or 'no channel'}; "
            f"always present: {', '.join(left) or 'none'}")


def train_auto(config: AutoTrainConfig, *, resume: bool = False, hooks: TrainHooks | None = None,
               command: str | None = None, source: str = "config") -> AutoTrainResult:
    """Train the automatic head as configured; see the module docstring for what lands in out_dir."""
    return AutoTrainer(config, resume=resume, hooks=hooks, command=command, source=source).run()
