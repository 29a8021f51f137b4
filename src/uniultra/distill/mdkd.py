"""Multi-modal decoupled knowledge distillation (MDKD, SPEC 5; De-LightSAM / ESP-MedSAM).

    general, _ = load_general_teacher(section, image_size=256, teacher=teacher)
    attach_modality_controller(student, ("busi", "ddti", "tg3k"))
    mdkd = MDKD(student, teacher, general, levels=(1, 2, 3), taps=("D1", "D2", "D3"))
    total, terms = mdkd(x, teacher_taps(teacher, x, levels, taps), general_taps(general, x, levels), ids)

The student (with a modality controller, uniultra.peft.controller) runs twice per step:

- **common knowledge**: controller OFF (no modality: the shared network). Its stage outputs go
  through the common necks and are regressed on the GENERAL teacher's stage outputs:
  L_common = sum over levels of MSE (terms `common.l{level}.D1`). The controller takes no part in
  this pass, so its gradient reaches only the shared student weights and the common necks.
- **modality knowledge**: controller ON with each sample's modality (its dataset label). The
  usual DSKD taps, necks and MSE against the ADAPTED teacher (terms `modality.l{level}.{tap}`).
  This pass runs with the shared student weights' `requires_grad` switched off, so its graph has
  no edge to them at all: its gradient reaches only the controller and the modality necks.

total = weight_common * L_common + weight_modality * L_modality. The two parameter sets are
disjoint and each loss's graph reaches only its own, so one backward of the total gives every
parameter exactly its own loss's gradient (no masking after the fact); one optimiser (and one
DDP forward/backward) serves both. The weights scale each group's gradient; the global gradient
clipping of the optimiser still sees both groups together.

Why D1 for the common terms: a general teacher has no adapters, so the taps it offers are its
block outputs, where the stage output D1 equals the Hiera block output D2; one term per level
says everything it knows. On the student side D1 (stage output = block + adapter: what the next
stage and the FPN neck read) is the like-for-like. The student's D2 alone would leave the adapter
of every distilled stage's last block outside all shared-weight losses (never trained; DDP would
also stop on its missing gradient), and D1 and D2 both against one target would force the
student's adapter outputs to zero.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from uniultra.distill.config import MDKDSection, term_name
from uniultra.distill.model import DSKD, collect_taps, load_teacher, make_necks, stage_strides, tap_terms, teacher_taps
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft.controller import find_controllers, is_controller_parameter, use_modality

# The general teacher's tap (its stage output; = D2 without adapters) and the student's partner.
COMMON_TAP = "D1"
COMMON, MODALITY = "common.", "modality."


def load_general_teacher(
    section: MDKDSection, image_size: int, teacher: SAM2ImageModel, device: str | torch.device = "cpu",
) -> tuple[SAM2ImageModel, dict[str, Any]]:
    """The frozen general teacher at `image_size` and its identity; its stage strides must be the
    adapted teacher's (the student's taps are compared with both on one grid)."""
    if section.general_teacher is None:
        raise ValueError("mdkd needs a general teacher: set mdkd.general_teacher or pass --general-teacher CKPT")
    if not os.path.isfile(section.general_teacher):
        raise FileNotFoundError(f"general teacher not found: {section.general_teacher}")
    general, identity = load_teacher(section.general_teacher, image_size, section.general_base, device)
    ours, theirs = stage_strides(general.config.trunk), stage_strides(teacher.config.trunk)
    if ours != theirs:
        raise ValueError(f"general teacher {section.general_teacher}: stage strides {ours} differ from the adapted "
                         f"teacher's {theirs}: the taps would not share a grid")
    return general, identity


@torch.no_grad()
def general_taps(general: SAM2ImageModel, images: torch.Tensor, levels: Iterable[int]) -> dict[str, torch.Tensor]:
    """The general teacher's stage outputs {`l{level}.D1`: (B, C, H, W)} (no graph)."""
    return teacher_taps(general, images, levels, (COMMON_TAP,))


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """`requires_grad` off for the `with` block: a graph built inside has no edge to `params`
    (restored afterwards; the graph keeps what it recorded)."""
    switched = [p for p in params if p.requires_grad]
    for p in switched:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in switched:
            p.requires_grad_(True)


class MDKD(DSKD):
    """DSKD towards the adapted teacher through the controller (its `necks`), plus the common
    terms towards the general teacher (`common_necks`); forward(normalised images, adapted teacher
    taps, general teacher taps, modality ids (B,)) -> (loss, terms)."""

    def __init__(
        self,
        student: SAM2ImageModel,
        teacher: SAM2ImageModel | None = None,
        general: SAM2ImageModel | None = None,
        levels: Iterable[int] = (1, 2, 3),
        taps: Iterable[str] = ("D1", "D2", "D3"),
        activation: str = "none",
        weight_common: float = 1.0,
        weight_modality: float = 1.0,
        teacher_dims: tuple[int, ...] | None = None,
        general_dims: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(student, teacher, levels, taps, activation, teacher_dims)
        if not find_controllers(student):
            raise ValueError("MDKD needs a student with a modality controller (attach_modality_controller)")
        if general_dims is None:
            if general is None:
                raise ValueError("give the general teacher or its stage widths")
            general_dims = general.image_encoder.trunk.stage_dims
        student_dims = student.image_encoder.trunk.stage_dims
        self.common_necks = make_necks(student_dims, general_dims, self.levels, (COMMON_TAP,), activation)
        self.weight_common = weight_common
        self.weight_modality = weight_modality

    @property
    def term_names(self) -> tuple[str, ...]:
        common = tuple(COMMON + term_name(level, COMMON_TAP) for level in self.levels)
        return common + tuple(MODALITY + name for name in super().term_names)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The student's trained parameters outside the controller (what L_common trains)."""
        return [p for n, p in self.student.named_parameters() if p.requires_grad and not is_controller_parameter(n)]

    def forward(
        self, images: torch.Tensor, teacher: dict[str, torch.Tensor], general: dict[str, torch.Tensor],
        modality: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with use_modality(self.student, None):
            shared = collect_taps(self.student, images, self.levels, (COMMON_TAP,))
        common = tap_terms(self.common_necks, shared, general, self.levels, (COMMON_TAP,))
        with use_modality(self.student, modality), frozen(self.shared_parameters()):
            controlled = collect_taps(self.student, images, self.levels, self.taps)
        specific = tap_terms(self.necks, controlled, teacher, self.levels, self.taps)
        terms = {**{COMMON + k: v for k, v in common.items()}, **{MODALITY + k: v for k, v in specific.items()}}
        return self.combine(terms), terms

    def combine(self, terms: dict[str, Any]) -> Any:
        """weight_common * L_common + weight_modality * L_modality (tensors or floats)."""
        common = sum(v for k, v in terms.items() if k.startswith(COMMON))
        specific = sum(v for k, v in terms.items() if k.startswith(MODALITY))
        return self.weight_common * common + self.weight_modality * specific
