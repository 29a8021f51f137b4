"""`TrainConfig`: everything a training run needs, read from a small YAML file.

Paths inside a config (data folders, the base checkpoint, `out_dir`, `cache_dir`) are resolved
against the CURRENT WORKING DIRECTORY, exactly like paths given on the command line; the shipped
configs assume you run from the repository root (so `../shared/data/busi` is the shared data).
See docs/training.md for every key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from uniultra.config_io import ConfigError, from_dict, load_yaml, merge_dicts, to_dict

# "box+click": a box and one more click, positive on the object or negative inside the box off it
# (what a user adds to correct a box-only mask).
TRAIN_PROMPT_MODES = ("box", "point", "points3", "box+point", "box+click")
PHANTOM_KINDS = Literal["hypoechoic", "hyperechoic", "cyst", "complex", "wrapping", "halo", "mixed", "mixed-complex",
                        "mixed-wrapping"]


@dataclass(frozen=True)
class ModelSection:
    """Architecture and starting weights.

    - `base`: a checkpoint to start from (official SAM2/SAM2.1 `.pt` or a UniUltra checkpoint);
      the architecture then comes from that file, and `preset`/`config`, when given, must match it.
    - no `base`: random initialisation (seeded) of `preset`, with `config` (a partial or whole
      ImageModelConfig mapping: name, trunk, neck, decoder, ...) merged over it.
    """

    preset: str | None = None
    config: dict[str, Any] | None = None
    image_size: int = 1024
    base: str | None = None


@dataclass(frozen=True)
class PhantomSpec:
    """Synthetic phantoms generated once (uniultra.data.phantom) and used as a dataset."""

    n: int = 200
    seed: int = 0
    size: int = 256
    kind: PHANTOM_KINDS = "mixed"
    n_lesions: int = 1
    geometry: Literal["linear", "sector", "random"] = "random"
    val_fraction: float = 0.1
    lesion_scale: float = 1.0  # lesion size multiplier (uniultra.data.phantom.make_phantom)

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"phantom n must be >= 2, got {self.n}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"phantom val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class DataEntry:
    """One dataset folder. `split_train` / `split_val`: a split name, "all" (every image) or null
    (the set is not used for training / for validation). `phantom`: generate the folder first
    (into `path`, default `<out_dir>/data/<name>`), with its own splits.json. `subset`: a file
    from `uniultra data coreset`; only the training images it lists under this entry's label are
    used (validation is never filtered). `targets`: `labels` (the masks) or `regions` (unsupervised
    regions of the images, uniultra.data.regions; the masks are never read; zoomed training only).
    `weight`: how many of the entry's images an epoch draws, relative to its size (zoomed training)."""

    path: str | None = None
    name: str | None = None
    split_train: str | None = "train"
    split_val: str | None = "val"
    splits_file: str | None = None
    phantom: PhantomSpec | None = None
    subset: str | None = None
    targets: Literal["labels", "regions"] = "labels"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        if self.targets == "regions" and self.split_val is not None:
            raise ValueError("a `targets: regions` entry has no labels to validate on: set split_val: null")
        if self.path is None and self.phantom is None:
            raise ValueError("a data entry needs a path (or a phantom spec)")
        if self.phantom is not None and self.name is None and self.path is None:
            raise ValueError("a phantom data entry needs a name or a path")
        if self.subset is not None and self.split_train is None:
            raise ValueError(f"subset {self.subset} needs a split_train to restrict")
        if self.subset is not None and self.split_train == self.split_val:
            # The subset is applied by split name: it would filter the validation set too.
            raise ValueError(f"subset {self.subset}: split_train and split_val are both "
                             f"{self.split_train!r}; a subset needs distinct splits")

    @property
    def label(self) -> str:
        return self.name or Path(self.path or "").resolve().name


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    gamma: float = 0.98  # lr *= gamma after every epoch
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr over the first steps
    grad_clip: float | None = 1.0  # max global gradient norm; null = no clipping
    batch_size: int = 4  # per process (global batch = batch_size * processes)
    epochs: int = 200
    ema: float | None = None  # decay of an exponential moving average of the trained weights

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 0 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, batch_size >= 1, epochs >= 0, warmup_steps >= 0")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be a decay in (0, 1) or null, got {self.ema}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True)
class LossConfig:
    focal: float = 0.2
    dice: float = 0.8
    iou: float = 1.0  # MSE between the IoU head and the real IoU of the predicted mask
    # Soft dice between the mask's projections on the x and y axes (max over the other axis) and the
    # truth's (BoxInst's projection term): weighs how far the mask reaches towards each side of the
    # object's box, which a model that only outlines the dark core of an unseen object gets wrong.
    projection: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # One positive point is ambiguous: predict the 3 multimask candidates and train the best one
    # (SAM/SAM2 practice); every other prompt trains the single-mask output.
    multimask_for_points: bool = True
    # The IoU head learns the IoU with the WHOLE object, the part a crop cut off counting as missed
    # (only tap-crop samples, `zoom.tap_crops`, cut objects off): then predicted IoUs of one tap's
    # answers on crops of different sizes can be compared, which the tap selection does.
    iou_whole_object: bool = False


@dataclass(frozen=True)
class InteractiveConfig:
    """SAM-style interactive training (uniultra.engine.interactive): after the first answer to each
    prompt, `rounds` more decoder passes, each adding one click sampled uniformly from the current
    error region and feeding the previous low-res logits back as the mask prompt; the loss averages
    over every pass. `probability`: share of steps that run the rounds (the others: one pass).
    `mask_prompt: false` keeps the clicks but not the previous logits: the way a zoomed model is
    used (ZoomPredictor answers each object on its own crop and takes no mask_input).
    `modes`: the training prompt modes whose samples get the rounds (null: every mode); e.g. leave
    out `point` so that one-tap answers train as without rounds."""

    rounds: int = 2
    probability: float = 0.5
    mask_prompt: bool = True
    modes: tuple[str, ...] | None = None

    def corrects(self, mode: str) -> bool:
        return self.modes is None or mode in self.modes

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"interactive.rounds must be >= 1 (omit the section for none), got {self.rounds}")
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"interactive.probability must be in (0, 1], got {self.probability}")
        if self.modes is not None:
            bad = sorted(set(self.modes) - set(TRAIN_PROMPT_MODES))
            if bad or not self.modes:
                raise ValueError(f"interactive.modes must be a non-empty list of {list(TRAIN_PROMPT_MODES)}, "
                                 f"got {list(self.modes)}")


@dataclass(frozen=True)
class TrainPromptConfig:
    # Probability of each prompt kind per training sample (normalised to sum 1).
    modes: dict[str, float] = field(default_factory=lambda: {"box": 0.6, "point": 0.2, "box+point": 0.2})
    # Box jitter J (px at 1024 scale): each sample draws J from this list, then pushes each side
    # outward by uniform 0..J. Keep 0 in the list: exact boxes must be trained too (SPEC 8).
    jitter: tuple[float, ...] = (0.0, 10.0, 20.0, 30.0)
    # Probability that a positive point is the farthest-interior pixel (what evaluation uses);
    # otherwise it is uniform inside the object.
    center_point_prob: float = 0.5
    # Probability that a sample with a box gets the object's exact box (J = 0) given with the
    # exact-box tokens (labels 4, 5) instead of a jittered plain box; needs a model built with
    # `decoder.exact_box_tokens`. 0 keeps every recipe's random stream as it was.
    exact_box: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.exact_box <= 1.0:
            raise ValueError(f"exact_box must be a probability in [0, 1], got {self.exact_box}")
        bad = sorted(set(self.modes) - set(TRAIN_PROMPT_MODES))
        if bad:
            raise ValueError(f"unknown training prompt modes {bad}; choose from {list(TRAIN_PROMPT_MODES)}")
        if not self.modes or any(p < 0 for p in self.modes.values()) or sum(self.modes.values()) <= 0:
            raise ValueError("training prompt mode probabilities must be >= 0 with a positive sum")
        if not self.jitter or any(j < 0 for j in self.jitter):
            raise ValueError("jitter must be a non-empty list of values >= 0")


@dataclass(frozen=True)
class ValPromptConfig:
    mode: Literal["box", "point", "points3", "box+point"] = "box"
    jitter: float = 20.0
    seed: int = 0


@dataclass(frozen=True)
class PromptConfig:
    train: TrainPromptConfig = field(default_factory=TrainPromptConfig)
    val: ValPromptConfig = field(default_factory=ValPromptConfig)


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5  # probability of a left-right flip
    vflip: float = 0.0  # probability of an up-down flip (off: the probe is at the top)
    affine_prob: float = 0.8  # probability of the random scale / shift below
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.1  # max translation, fraction of the image side
    rotate: float = 0.0  # max rotation in degrees


@dataclass(frozen=True)
class ZoomConfig:
    """Zoomed training (uniultra.engine.zoom_data): every sample is a crop around its object."""

    margin: tuple[float, float] = (1.15, 1.8)  # box crop = the box enlarged by uniform(margin)
    inference_margin: float = 1.4  # what the trained model's predictor uses (stored in best.pt)
    whole_image_points: float = 0.5  # share of point-only samples shown the whole image
    # Share of point-only samples cut as a square centred on the tap, of a side drawn from the
    # crops a tap is answered on (uniultra.inference.roi.TAP_SIDES; the object may be cut off), in
    # place of the crop `whole_image_points` chose. 0: every point-only crop holds the whole object.
    tap_crops: float = 0.0
    intensity: float = 0.5  # probability of a random gamma / contrast change
    # Grow every region target by this many pixels of its label map (longer side 256) before use:
    # the unsupervised regions sit inside the outlines people draw (their borders follow a smoothed
    # image), about 1-2 map pixels on the labelled objects of five sets of six (BENCHMARKS.md).
    region_grow: float = 0.0
    regions_dir: str = "runs/cache/regions"  # where the region maps of `targets: regions` entries are cached

    def __post_init__(self) -> None:
        low, high = self.margin
        if not 1.0 <= low <= high:
            raise ValueError(f"zoom margin must be 1 <= low <= high, got {self.margin}")
        if self.inference_margin < 1.0:
            raise ValueError(f"zoom inference_margin must be >= 1, got {self.inference_margin}")
        if self.region_grow < 0:
            raise ValueError(f"zoom region_grow must be >= 0 map pixels, got {self.region_grow}")
        for name in ("whole_image_points", "tap_crops", "intensity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"zoom {name} must be a probability in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    peft: dict[str, Any] = field(default_factory=lambda: {"method": "full"})
    data: tuple[DataEntry, ...] = ()
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    zoom: ZoomConfig | None = None  # null: whole images resized to the model input
    interactive: InteractiveConfig | None = None  # null: one decoder pass per prompt
    seed: int = 0
    out_dir: str = "runs/train"
    log_every: int = 20  # steps between progress lines / log flushes
    checkpoint_every: int = 0  # steps between mid-epoch last.pt saves (0: at epoch ends only)
    num_workers: int = 0  # DataLoader workers per process
    amp: Literal["bf16", "fp16", "none"] = "bf16"  # autocast dtype on CUDA
    # bf16 autocast on a CPU with bf16 units (AVX512-BF16 / AMX; elsewhere fp32, warned). Opt-in: it
    # roughly halves a tiny-sized Hiera's step but slows the mini's (BENCHMARKS "Training in bf16 on a CPU").
    cpu_amp: Literal["bf16", "none"] = "none"
    device: str = "auto"  # auto = cuda if available else cpu; or cpu, cuda, cuda:1, mps
    threads: int | None = None  # torch CPU threads per process (null: torch's default)
    cache_dir: str | None = None  # resized-image cache on disk (shared by processes); null = memory
    val_batch_size: int = 8
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        config = from_dict(cls, data, source)
        config.peft_config(source)  # validate now, with the file named
        check_data_entries(config.data, source)
        if config.zoom is None and any(d.targets == "regions" for d in config.data):
            raise ConfigError(f"{source}: data: `targets: regions` entries need zoomed training (a zoom: section)")
        return config

    def peft_config(self, source: str = "config"):
        from uniultra.peft.config import PeftConfig

        try:
            return PeftConfig.from_dict(self.peft)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: peft: {exc}") from exc

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def check_data_entries(entries: tuple[DataEntry, ...], source: str) -> None:
    """At least one dataset, and distinct names (they key logs, caches and per-set results)."""
    if not entries:
        raise ConfigError(f"{source}: data: no dataset given (list entries, or pass --data DIR)")
    labels = [d.label for d in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{source}: data: dataset names must be distinct, got {labels}")


def read_config_document(
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    data_dirs: list[str] | None = None,
) -> tuple[dict[str, Any], str]:
    """(document, source name) of a run config, before validation: the YAML file (none: empty),
    command-line overrides (a nested mapping) merged over it, and `--data` folders, which replace
    its data list. Shared by `uniultra train` and `uniultra distill`."""
    data = load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "command line"
    if overrides:
        data = merge_dicts(data, overrides)
    if data_dirs:
        data["data"] = [{"path": d} for d in data_dirs]
    return data, source


def load_train_config(
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    data_dirs: list[str] | None = None,
) -> TrainConfig:
    """Read a YAML config, apply command-line overrides (a nested mapping merged over it) and
    `--data` folders (which replace the config's data list), and validate the result."""
    return TrainConfig.from_dict(*read_config_document(path, overrides, data_dirs))


def parse_set_option(text: str) -> dict[str, Any]:
    """`optim.lr=1e-3` -> {"optim": {"lr": 0.001}}; the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    result: dict[str, Any] = {}
    node = result
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result
