"""Parameter-efficient fine-tuning of the SAM2 image model: CH-Adapter and the Table V baselines.

    report = apply_peft(model, PeftConfig(method="ch_adapter"))
    print(report.format())
    state = trainable_state_dict(model)          # small adapter-only checkpoint
    load_trainable_state(other_model, state)     # after apply_peft(other_model, same config)

See docs/peft.md.
"""

from uniultra.peft.apply import (
    GroupCount,
    PeftError,
    TrainableReport,
    apply_peft,
    load_trainable_state,
    parameter_group,
    set_train_mode,
    trainable_report,
    trainable_state_dict,
)
from uniultra.peft.ch_adapter import CHAdapter, EdgeBranch
from uniultra.peft.config import DIRECTIONS, METHODS, PeftConfig, PeftConfigError
from uniultra.peft.lora import LoRALinear, bottleneck_adapter
from uniultra.peft.taps import BlockTaps, record_taps

__all__ = [
    "DIRECTIONS",
    "METHODS",
    "BlockTaps",
    "CHAdapter",
    "EdgeBranch",
    "GroupCount",
    "LoRALinear",
    "PeftConfig",
    "PeftConfigError",
    "PeftError",
    "TrainableReport",
    "apply_peft",
    "bottleneck_adapter",
    "load_trainable_state",
    "parameter_group",
    "record_taps",
    "set_train_mode",
    "trainable_report",
    "trainable_state_dict",
]
