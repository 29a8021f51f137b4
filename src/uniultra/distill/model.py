"""Teacher, student, tap necks and the DSKD loss (SPEC section 4).

    teacher, identity = load_teacher("runs/cpu/universal-teacher/best.pt", image_size=256)
    student = build_student(teacher, StudentSection(preset="mini", image_size=256))
    dskd = DSKD(student, teacher, levels=(1, 2, 3), taps=("D1", "D2", "D3"))
    x = student.normalize(images)
    total, terms = dskd(x, teacher_taps(teacher, x, dskd.levels, dskd.taps))

- Taps (uniultra.peft.taps): at the LAST block of stage l, D2 = the Hiera block output
  (x + MLP(u)), D3 = the adapter output (s * H), D1 = D2 + D3 = what the block returns (the stage
  output). Teacher and student have the same strides (4, 8, 16 at l = 1, 2, 3), so each pair of
  taps has the same grid; only the widths differ.
- Each (level, tap) term has its own neck: Conv 3x3 (student width -> teacher width, padding 1),
  optional GELU, Conv 1x1 (teacher width -> teacher width). Without the activation (default, as the
  SPEC words it) a neck is a factorised linear 3x3 projection.
- L_DSKD = sum over the chosen levels and taps of MSE(teacher tap, neck(student tap)), each MSE a
  mean over batch, channels and positions. Term names are `l{level}.{tap}`, e.g. `l2.D3`.
- Only the trunk blocks up to the last distilled stage run (for teacher and student): later
  stages, the FPN neck and the decoder do not enter the loss. The taps are taken at the stage ends,
  never from the FPN outputs, and any stage 1..4 works (the authors' script distilled FPN outputs
  only and crashed on the 4th level, SPEC 7).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.config_io import from_dict, merge_dicts, to_dict
from uniultra.distill.config import TAP_ATTR, StudentSection, term_name
from uniultra.models.config import HieraConfig, ImageModelConfig, preset
from uniultra.models.hiera import PATCH_STRIDE, Hiera
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft.taps import record_taps

# Modules the student inherits from the teacher (copied, then owned by the student).
INHERITED = ("sam_prompt_encoder", "sam_mask_decoder", "no_mem_embed")


# --- teacher and student ------------------------------------------------------------------------

def load_teacher(
    path: str | os.PathLike, image_size: int, base: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[SAM2ImageModel, dict[str, Any]]:
    """The frozen teacher (eval mode, no parameter requires grad) at `image_size`, and its identity
    (path, sha256) as recorded by uniultra train for base checkpoints."""
    from uniultra.inference.loading import base_identity, load_model
    from uniultra.models.checkpoint import FORMAT_NAME

    teacher = load_model(path, image_size=image_size, device=device, base=base)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher, base_identity(path, FORMAT_NAME)


def stage_strides(cfg: HieraConfig) -> tuple[int, ...]:
    """Pixel stride of each stage's output grid (4, 8, 16, 32 for every preset)."""
    strides = []
    for stage in range(len(cfg.stages)):
        pools = min(stage, cfg.q_pool)
        strides.append(PATCH_STRIDE * cfg.q_stride[0] ** pools)
    return tuple(strides)


def student_config(teacher: SAM2ImageModel, section: StudentSection) -> ImageModelConfig:
    """The student's architecture: the preset's trunk (+ `trunk` overrides); neck, decoder and
    backbone stride of the teacher (the inherited decoder needs the same widths and grid)."""
    base = preset(section.preset, section.image_size)
    trunk_dict = merge_dicts(to_dict(base.trunk), section.trunk or {})
    trunk = from_dict(HieraConfig, trunk_dict, "student config", "student.trunk")
    t = teacher.config
    cfg = ImageModelConfig(name=section.name or base.name, image_size=section.image_size, trunk=trunk,
                           neck=t.neck, decoder=t.decoder, backbone_stride=t.backbone_stride)
    if stage_strides(trunk) != stage_strides(t.trunk):
        raise ValueError(f"student stage strides {stage_strides(trunk)} differ from the teacher's "
                         f"{stage_strides(t.trunk)}: the taps would not have the same grid")
    return cfg


def build_student(
    teacher: SAM2ImageModel, section: StudentSection, peft: dict[str, Any] | None = None,
) -> SAM2ImageModel:
    """A new student: random trunk and FPN neck (seed the torch RNG first), PEFT `peft` (default:
    the student section's, else the teacher's) applied, prompt encoder + mask decoder +
    no_mem_embed COPIED from the teacher. Parameters are left as apply_peft marks them; the
    distiller sets its own trainable set (`mark_dskd_trainable`)."""
    from uniultra.peft.apply import apply_peft

    peft = resolve_student_peft(teacher, section, peft)
    student = SAM2ImageModel(student_config(teacher, section)).to(teacher.no_mem_embed.device)
    apply_peft(student, peft)
    with torch.no_grad():
        student.sam_prompt_encoder.load_state_dict(teacher.sam_prompt_encoder.state_dict())
        student.sam_mask_decoder.load_state_dict(teacher.sam_mask_decoder.state_dict())
        student.no_mem_embed.copy_(teacher.no_mem_embed)
    return student


def resolve_student_peft(
    teacher: SAM2ImageModel, section: StudentSection, peft: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The PEFT config of the student: explicit, else the student section's, else the teacher's."""
    from uniultra.peft.config import PeftConfig

    if peft is None:
        peft = section.peft
    if peft is None:
        applied = getattr(teacher, "peft_config", None)
        if applied is None:
            raise ValueError("the teacher checkpoint has no PEFT config (no adapters); set student.peft "
                             "(e.g. {method: ch_adapter}) or distil from an adapted teacher")
        return applied.to_dict()
    return PeftConfig.from_dict(peft).to_dict()


def last_block_for(model: SAM2ImageModel, levels: Iterable[int]) -> int:
    """Index of the last trunk block the given stages need."""
    ends = model.image_encoder.trunk.stage_ends
    levels = list(levels)
    if max(levels) > len(ends):
        raise ValueError(f"level {max(levels)} asked, but the trunk has {len(ends)} stages")
    return ends[max(levels) - 1]


def mark_dskd_trainable(student: SAM2ImageModel, levels: Iterable[int]) -> dict[str, nn.Parameter]:
    """Distillation trains the student's trunk (patch embedding, position embeddings, every block up
    to the last distilled stage, with their adapters / LoRA); everything else is frozen: later
    stages, the FPN neck (neither enters L_DSKD) and the inherited prompt encoder, mask decoder and
    no_mem_embed (SPEC 4: distillation happens at the encoder only). Returns the trained parameters."""
    last = last_block_for(student, levels)
    student.requires_grad_(False)
    trunk = student.image_encoder.trunk
    trunk.patch_embed.requires_grad_(True)
    trunk.pos_embed.requires_grad_(True)
    trunk.pos_embed_window.requires_grad_(True)
    for block in trunk.blocks[: last + 1]:
        block.requires_grad_(True)
    return {f"student.{n}": p for n, p in student.named_parameters() if p.requires_grad}


def mark_finetune_trainable(student: SAM2ImageModel, freeze_decoder: bool = False) -> None:
    """End-to-end fine-tuning: every parameter, except the inherited decoder parts if asked."""
    student.requires_grad_(True)
    if freeze_decoder:
        for name in INHERITED:
            module = getattr(student, name)
            module.requires_grad_(False)


# --- taps ---------------------------------------------------------------------------------------

def trunk_forward(trunk: Hiera, images: torch.Tensor, last_block: int) -> torch.Tensor:
    """Hiera.forward on normalised images, stopped after block `last_block` (channels-last output).

    Same operations as uniultra.models.hiera.Hiera.forward (a test checks that the taps equal those
    of a full forward)."""
    trunk.check_input(images)
    x = trunk.patch_embed(images)
    x = x + trunk.position_embedding(*x.shape[-2:])
    x = x.permute(0, 2, 3, 1).contiguous()
    for block in trunk.blocks[: last_block + 1]:
        x = block(x)
    return x


def collect_taps(
    model: SAM2ImageModel, images: torch.Tensor, levels: Iterable[int], taps: Iterable[str],
) -> dict[str, torch.Tensor]:
    """{`l{level}.{tap}`: (B, C_l, H_l, W_l)} taps of `model` on normalised images (channels-first
    views of the channels-last block tensors; gradients flow unless run under no_grad)."""
    levels, taps = list(levels), list(taps)
    trunk = model.image_encoder.trunk
    blocks = [trunk.stage_ends[level - 1] for level in levels]
    out: dict[str, torch.Tensor] = {}
    with record_taps(model, blocks) as recorder:
        trunk_forward(trunk, images, max(blocks))
        for level in levels:
            recorded = recorder.stage(level)
            for tap in taps:
                value = getattr(recorded, TAP_ATTR[tap])
                if value is None:
                    raise ValueError(f"tap {tap} (adapter output) asked at stage {level}, but its last block "
                                     f"(trunk block {trunk.stage_ends[level - 1]}) has no adapter")
                out[term_name(level, tap)] = value.permute(0, 3, 1, 2)
    return out


@torch.no_grad()
def teacher_taps(
    teacher: SAM2ImageModel, images: torch.Tensor, levels: Iterable[int], taps: Iterable[str],
) -> dict[str, torch.Tensor]:
    """The frozen teacher's taps (no graph), contiguous channels-first."""
    return {k: v.contiguous() for k, v in collect_taps(teacher, images, levels, taps).items()}


# --- necks and loss -----------------------------------------------------------------------------

class TapNeck(nn.Sequential):
    """Conv 3x3 (student width -> teacher width) -> [GELU] -> Conv 1x1 (teacher width)."""

    def __init__(self, in_dim: int, out_dim: int, activation: str = "none") -> None:
        super().__init__(
            nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1),
            nn.GELU() if activation == "gelu" else nn.Identity(),
            nn.Conv2d(out_dim, out_dim, kernel_size=1),
        )

    @torch.no_grad()
    def init_identity(self) -> None:
        """Make the neck the identity map (needs equal widths, no activation): for tests of
        L_DSKD = 0 when the student is the teacher."""
        conv3, act, conv1 = self
        if conv3.in_channels != conv3.out_channels or not isinstance(act, nn.Identity):
            raise ValueError("an identity neck needs equal widths and neck_activation 'none'")
        eye = torch.eye(conv3.out_channels, dtype=conv3.weight.dtype, device=conv3.weight.device)
        conv3.weight.zero_()
        conv3.weight[:, :, 1, 1] = eye
        conv1.weight.copy_(eye[:, :, None, None])
        conv3.bias.zero_()
        conv1.bias.zero_()


def neck_key(level: int, tap: str) -> str:
    return f"l{level}_{tap}"  # module names cannot contain dots


def make_necks(student_dims: tuple[int, ...], teacher_dims: tuple[int, ...], levels: Iterable[int],
               taps: Iterable[str], activation: str = "none") -> nn.ModuleDict:
    """One TapNeck per (level, tap), student stage width -> teacher stage width."""
    taps = tuple(taps)
    return nn.ModuleDict({
        neck_key(level, tap): TapNeck(student_dims[level - 1], teacher_dims[level - 1], activation)
        for level in levels for tap in taps
    })


def tap_terms(
    necks: nn.ModuleDict, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
    levels: Iterable[int], taps: Iterable[str],
) -> dict[str, torch.Tensor]:
    """{`l{level}.{tap}`: MSE(teacher tap, neck(student tap))} (float32 MSE)."""
    taps = tuple(taps)
    terms: dict[str, torch.Tensor] = {}
    for level in levels:
        for tap in taps:
            name = term_name(level, tap)
            target = teacher[name]
            pred = necks[neck_key(level, tap)](student[name])
            if pred.shape != target.shape:
                raise ValueError(f"{name}: student tap after its neck is {tuple(pred.shape)}, "
                                 f"teacher tap is {tuple(target.shape)}")
            terms[name] = F.mse_loss(pred.float(), target.float())
    return terms


class DSKD(nn.Module):
    """The student and its tap necks; forward(normalised images, teacher taps) -> (L_DSKD, terms).

    `teacher_dims` (teacher stage widths) may be given instead of a teacher model. `terms` is a
    dict {`l{level}.{tap}`: MSE} whose sum is L_DSKD. This is the module DDP wraps."""

    def __init__(
        self,
        student: SAM2ImageModel,
        teacher: SAM2ImageModel | None = None,
        levels: Iterable[int] = (1, 2, 3),
        taps: Iterable[str] = ("D1", "D2", "D3"),
        activation: str = "none",
        teacher_dims: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if teacher_dims is None:
            if teacher is None:
                raise ValueError("give the teacher or its stage widths")
            teacher_dims = teacher.image_encoder.trunk.stage_dims
        self.student = student
        self.levels = tuple(sorted(levels))
        self.taps = tuple(taps)
        student_dims = student.image_encoder.trunk.stage_dims
        last_block_for(student, self.levels)  # checks the levels exist
        self.necks = make_necks(student_dims, teacher_dims, self.levels, self.taps, activation)

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(term_name(level, tap) for level in self.levels for tap in self.taps)

    def init_identity_necks(self) -> None:
        for neck in self.necks.values():
            neck.init_identity()

    def forward(
        self, images: torch.Tensor, teacher: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = collect_taps(self.student, images, self.levels, self.taps)
        terms = tap_terms(self.necks, student, teacher, self.levels, self.taps)
        total = torch.stack(list(terms.values())).sum()
        return total, terms

    def combine(self, terms: dict[str, Any]) -> Any:
        """The loss from its terms (tensors or floats): L_DSKD is their sum."""
        return sum(terms.values())
