"""`AutoTrainConfig`: a run of `uniultra auto train` (docs/auto.md), read from a small YAML file.

Data entries and the optimiser section are the training engine's own dataclasses
(uniultra.engine.config), so a dataset list written for `uniultra train` works here unchanged.
Paths are resolved against the current working directory, like `uniultra train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniultra.config_io import ConfigError, from_dict, to_dict
from uniultra.distill.config import augments
from uniultra.engine.config import AugmentConfig, DataEntry, OptimConfig, check_data_entries, read_config_document


@dataclass(frozen=True)
class AutoModelSection:
    """The base model and the automatic head on top of it.

    - `base`: "default" (the bundled model), a checkpoint path, or "preset:NAME" (random weights,
      seeded: for tests); `image_size`: null = the base's own input size.
    - `freeze_encoder`: the image encoder (with the decoder's high-res projections, which belong to
      the per-image features) stays fixed and its features are computed once per image and cached.
    - `train_decoder`: also train the base decoder's transformer, upscaling path and IoU / object
      tokens (the head's queries, hypernetworks and prompt generator always train). Keep it false
      for a head meant to ship WITH its base: the trained parts are shared with box prompts.
    - `own_decoder`: the automatic path runs a copy of the base's mask decoder; `train_decoder` then
      trains the copy, and the base answers box prompts exactly as before.
    - `presence_head`: add the image-level presence head (uniultra.models.presence_head), trained
      with `loss.presence` x BCE against "the mask is not empty".
    - `presence_probe`: after training, fit a presence probe on the encoder's pooled features
      (uniultra.models.presence_probe; closed form, train split, strength chosen on val); it then
      gives the presence score the gate is calibrated on. It reads cached features: with
      `freeze_encoder: false`, those of the encoder as trained (best.pt), computed after training.
    - `init_head`: an automatic checkpoint (a finished run's best.pt, trained with the same data
      entries and head settings) whose head weights start this run instead of a random init: a warm
      start, e.g. for training the encoder with a head that already works (`freeze_encoder: false`).
      Its presence probe, if any, is left out when this run has none.
    - `presence_cross_fit`: K >= 2 chooses the gate on the val images AND the train images of every
      channel with a fitted probe, each scored by a probe refitted without its part of a K-fold split
      (BUSI: 119 normal scans, val and train, instead of 10); 0: val only. Needs `presence_probe`.
    """

    base: str = "default"
    image_size: int | None = None
    modality_decoder: bool = True
    patch_size: int = 32
    freeze_encoder: bool = True
    train_decoder: bool = True
    presence_head: bool = False
    presence_probe: bool = False
    own_decoder: bool = False
    presence_cross_fit: int = 0
    init_head: str | None = None

    def __post_init__(self) -> None:
        check_cross_fit(self.presence_cross_fit)
        if self.presence_cross_fit and not self.presence_probe:
            raise ValueError("model.presence_cross_fit needs model.presence_probe: true (it refits the probe)")


def check_cross_fit(folds: int) -> int:
    """0 (val only) or a number of folds >= 2."""
    if folds == 1 or folds < 0:
        raise ValueError(f"presence cross-fitting takes 0 (val only) or a number of folds >= 2, got {folds}")
    return folds


@dataclass(frozen=True)
class AutoLossConfig:
    """Focal + dice on the mask (as `uniultra train`), plus BCE on the patch logits and, with a
    presence head, BCE on its image-level logit."""

    focal: float = 0.2
    dice: float = 0.8
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    patch: float = 1.0  # weight of the prompt generator's patch BCE
    presence: float = 1.0  # weight of the presence head's BCE (ignored without the head)

    def __post_init__(self) -> None:
        if min(self.focal, self.dice, self.patch, self.presence) < 0 or self.focal + self.dice <= 0:
            raise ValueError("loss weights must be >= 0, with focal + dice > 0")


@dataclass(frozen=True)
class AutoTrainConfig:
    model: AutoModelSection = field(default_factory=AutoModelSection)
    data: tuple[DataEntry, ...] = ()
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, batch_size=8, epochs=20))
    loss: AutoLossConfig = field(default_factory=AutoLossConfig)
    # Random augmentation (null: none). Cached features belong to un-augmented images, so it
    # needs model.freeze_encoder: false.
    augment: AugmentConfig | None = None
    seed: int = 0
    out_dir: str = "runs/auto"
    cache_dir: str | None = None  # resized images (shared with uniultra train) and encoder features
    log_every: int = 20
    checkpoint_every: int = 0  # steps between mid-epoch last.pt saves (0: epoch ends only)
    num_workers: int = 0
    device: str = "auto"  # auto = cuda if available else cpu; or cpu, cuda, cuda:1, mps
    threads: int | None = None
    val_batch_size: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model.freeze_encoder and augments(self.augment):
            raise ValueError("augment needs model.freeze_encoder: false (the cached encoder features belong "
                             "to the un-augmented images); set augment: null or unfreeze the encoder")

    @property
    def modalities(self) -> tuple[str, ...]:
        """One decoding channel per data entry, named by its label (busi, ddti, ...)."""
        return tuple(d.label for d in self.data)

    @property
    def feature_cache_dir(self) -> Path:
        return Path(self.cache_dir) / "auto-features" if self.cache_dir else Path(self.out_dir) / "feature_cache"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> AutoTrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> AutoTrainConfig:
        config = from_dict(cls, data, source)
        check_data_entries(config.data, source)
        m = config.model
        if m.patch_size <= 0 or m.patch_size % 16:
            raise ConfigError(f"{source}: model.patch_size: must be a positive multiple of 16 (the embedding "
                              f"stride), got {m.patch_size}")
        return config


def load_auto_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> AutoTrainConfig:
    """Read a YAML config, merge command-line overrides (a nested mapping) over it, and validate."""
    return AutoTrainConfig.from_dict(*read_config_document(path, overrides))
