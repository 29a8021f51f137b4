"""`DistillConfig`: a DSKD run (SPEC section 4) read from a small YAML file (docs/distill.md).

The data, optimiser, augmentation, loss and prompt sections are the training engine's own
dataclasses (uniultra.engine.config), so a dataset list written for `uniultra train` works here
unchanged. Paths are resolved against the current working directory, like `uniultra train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from uniultra.config_io import ConfigError, from_dict, to_dict
from uniultra.engine.config import (
    AugmentConfig,
    DataEntry,
    LossConfig,
    OptimConfig,
    PromptConfig,
    TrainConfig,
    check_data_entries,
    read_config_document,
)

# Tap names of the paper: D1 = stage output (block + adapter), D2 = Hiera block output, D3 = adapter output.
TAP_NAMES = ("D1", "D2", "D3")
# Which BlockTaps attribute (uniultra.peft.taps) holds each tap.
TAP_ATTR = {"D1": "output", "D2": "block", "D3": "adapter"}
TapName = Literal["D1", "D2", "D3"]


@dataclass(frozen=True)
class TeacherSection:
    """The adapted teacher: a UniUltra checkpoint with CH-Adapters (uniultra train's best.pt).

    `base`: for an adapter-only checkpoint, its base file (default: the path recorded in it).
    The teacher always runs at the student's input size (the taps must have the same grid)."""

    checkpoint: str | None = None
    base: str | None = None


@dataclass(frozen=True)
class StudentSection:
    """The student: `preset`'s Hiera trunk (with `trunk` keys merged over it), the teacher's neck
    width, prompt encoder and mask decoder, and the PEFT config `peft` (null: the teacher's)."""

    preset: str = "mini"
    image_size: int = 256
    name: str | None = None  # model name stored in the checkpoint (default: the preset name)
    trunk: dict[str, Any] | None = None  # HieraConfig keys merged over the preset's trunk
    peft: dict[str, Any] | None = None


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Run the teacher once per training image and keep its taps on disk (memory-mapped).

    Only valid without random augmentation (`augment: null`): a cached feature belongs to the
    un-augmented image. Without `dir` the cache goes to `<out_dir>/teacher_cache`."""

    enabled: bool = False
    dir: str | None = None
    dtype: Literal["float16", "float32"] = "float16"


@dataclass(frozen=True)
class FinetuneConfig:
    """Optional end-to-end fine-tuning of the distilled student with the segmentation loss, run
    by the training engine (uniultra.engine.trainer) in `<out_dir>/finetune`.

    Everything of the student trains (trunk, adapters, MDKD's modality controller, FPN neck, and -
    unless `freeze_decoder` - prompt encoder, mask decoder and no_mem_embed). An MDKD student keeps
    its controller: the engine runs each sample under its data entry's modality."""

    epochs: int = 0
    freeze_decoder: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"finetune epochs must be >= 0, got {self.epochs}")
        # One knob: `epochs`; optim.epochs mirrors it (so a written config reads back unchanged).
        if self.optim.epochs != self.epochs:
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, epochs=self.epochs))


@dataclass(frozen=True)
class MDKDSection:
    """Multi-modal decoupled distillation (SPEC 5; uniultra.distill.mdkd, docs/distill.md): the
    student gets a modality controller; its shared weights learn the GENERAL teacher's stage
    outputs with the controller off, the controller learns the adapted teacher's taps per modality.

    `modalities`: controller channels; null = the data entries' labels in order (a sample's
    modality is its entry's label; an explicit list must contain every label)."""

    general_teacher: str | None = None  # a foundation checkpoint without adapters (or --general-teacher)
    general_base: str | None = None  # base file of an adapter-only general teacher (default: recorded path)
    modalities: tuple[str, ...] | None = None
    weight_common: float = 1.0
    weight_modality: float = 1.0
    bottleneck: int = 8  # hidden width of each block's per-modality MLP

    def __post_init__(self) -> None:
        if self.weight_common < 0 or self.weight_modality < 0 or self.weight_common + self.weight_modality == 0:
            raise ValueError(f"mdkd weights must be >= 0 and not both 0, got weight_common {self.weight_common}, "
                             f"weight_modality {self.weight_modality}")
        if self.bottleneck < 1:
            raise ValueError(f"mdkd.bottleneck must be >= 1, got {self.bottleneck}")
        if self.modalities is not None and (not self.modalities or len(set(self.modalities)) != len(self.modalities)):
            raise ValueError(f"mdkd.modalities must be distinct names (or null), got {list(self.modalities)}")


@dataclass(frozen=True)
class DistillConfig:
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    # Stages distilled (l = 1, 2, 3 in the paper) and taps per stage; each (level, tap) is one
    # MSE term with its own neck (3x3 conv then 1x1 conv, student width -> teacher width).
    levels: tuple[int, ...] = (1, 2, 3)
    taps: tuple[TapName, ...] = ("D1", "D2", "D3")
    neck_activation: Literal["none", "gelu"] = "none"  # between the neck's 3x3 and 1x1 convs
    data: tuple[DataEntry, ...] = ()
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Random augmentation of the distillation images (null: none; required by teacher_cache).
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mdkd: MDKDSection | None = None  # null: plain DSKD
    seed: int = 0
    out_dir: str = "runs/distill"
    log_every: int = 20
    checkpoint_every: int = 0  # steps between mid-epoch last.pt saves (0: epoch ends only)
    num_workers: int = 0
    amp: Literal["bf16", "fp16", "none"] = "bf16"  # CUDA autocast of the forward passes
    cpu_amp: Literal["bf16", "none"] = "none"  # as in uniultra train's config
    device: str = "auto"
    threads: int | None = None
    cache_dir: str | None = None  # resized-image cache (shared with uniultra train)
    val_batch_size: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        if not levels or len(set(levels)) != len(levels) or any(not 1 <= lv <= 4 for lv in levels):
            raise ValueError(f"levels must be distinct stage numbers in 1..4 (the paper: 1, 2, 3), got {list(levels)}")
        taps = tuple(self.taps)
        if not taps or len(set(taps)) != len(taps):
            raise ValueError(f"taps must be a non-empty list of distinct names from {list(TAP_NAMES)}, "
                             f"got {list(taps)}")
        # Canonical order: the same switch always gives the same term names and necks.
        object.__setattr__(self, "levels", tuple(sorted(levels)))
        object.__setattr__(self, "taps", tuple(t for t in TAP_NAMES if t in taps))
        if self.teacher_cache.enabled and augments(self.augment):
            raise ValueError("teacher_cache.enabled needs augment: null (cached teacher features belong to the "
                             "un-augmented image; random augmentation would make them wrong)")
        if self.mdkd is not None:
            self.modality_names()  # every data label must have a modality

    def modality_names(self) -> tuple[str, ...]:
        """The controller's modalities (MDKD): `mdkd.modalities`, else the data labels in order."""
        labels = tuple(dict.fromkeys(entry.label for entry in self.data))
        named = self.mdkd.modalities if self.mdkd is not None else None
        if named is None:
            return labels
        missing = [label for label in labels if label not in named]
        if missing:
            raise ValueError(f"mdkd.modalities {list(named)} lacks the data labels {missing} (a sample's modality "
                             "is its data entry's label)")
        return tuple(named)

    @property
    def term_names(self) -> tuple[str, ...]:
        """Loss-term names, e.g. ('l1.D1', 'l1.D2', ...): one per (level, tap)."""
        return tuple(term_name(level, tap) for level in self.levels for tap in self.taps)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> DistillConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DistillConfig:
        finetune = data.get("finetune")
        ft_optim = finetune.get("optim") if isinstance(finetune, dict) else None
        if isinstance(ft_optim, dict) and "epochs" in ft_optim and ft_optim["epochs"] != finetune.get("epochs", 0):
            raise ConfigError(f"{source}: finetune.optim.epochs: set finetune.epochs instead (0 = no fine-tuning)")
        config = from_dict(cls, data, source)
        check_data_entries(config.data, source)
        if config.student.peft is not None:
            from uniultra.peft.config import PeftConfig

            try:
                PeftConfig.from_dict(config.student.peft)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: student.peft: {exc}") from exc
        return config

    def finetune_train_config(self, peft: dict[str, Any], out_dir: str | Path) -> TrainConfig:
        """The engine config of the fine-tuning phase (the model itself is handed over prebuilt)."""
        ft = self.finetune
        return TrainConfig.from_dict({
            "model": {"image_size": self.student.image_size},
            "peft": peft,
            "data": [to_dict(d) for d in self.data],
            "optim": to_dict(ft.optim),
            "loss": to_dict(ft.loss), "prompts": to_dict(ft.prompts), "augment": to_dict(ft.augment),
            "seed": self.seed, "out_dir": str(out_dir), "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every, "num_workers": self.num_workers, "amp": self.amp,
            "cpu_amp": self.cpu_amp,
            "device": self.device, "threads": self.threads, "cache_dir": self.cache_dir,
            "val_batch_size": self.val_batch_size, "progress": self.progress,
        }, source="finetune section")


def term_name(level: int, tap: str) -> str:
    return f"l{level}.{tap}"


def augments(cfg: AugmentConfig | None) -> bool:
    """True when `cfg` can change an image (any flip or affine probability above zero)."""
    return cfg is not None and (cfg.hflip > 0 or cfg.vflip > 0 or cfg.affine_prob > 0)


def load_distill_config(
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    data_dirs: list[str] | None = None,
) -> DistillConfig:
    """Read a YAML config, merge command-line overrides over it, replace `data` by `--data`
    folders when given, and validate."""
    return DistillConfig.from_dict(*read_config_document(path, overrides, data_dirs))
