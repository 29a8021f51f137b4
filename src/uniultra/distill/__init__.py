"""UniUltra-mini by deep-supervised knowledge distillation (DSKD, SPEC section 4): `uniultra distill`.

    from uniultra.distill import distill, load_distill_config

    result = distill(load_distill_config("configs/cpu/distill-mini-universal.yaml"))
    # result.out_dir / "student.pt" loads with uniultra.inference.loading.load_model

Building blocks (uniultra.distill.model): `load_teacher`, `build_student`, `DSKD` (student + tap
necks, forward -> L_DSKD and its terms), `teacher_taps`, `collect_taps`. See docs/distill.md.
"""

from uniultra.distill.config import TAP_NAMES, DistillConfig, load_distill_config
from uniultra.distill.model import DSKD, TapNeck, build_student, collect_taps, load_teacher, teacher_taps
from uniultra.distill.trainer import DistillHooks, DistillResult, distill

__all__ = [
    "DSKD",
    "TAP_NAMES",
    "DistillConfig",
    "DistillHooks",
    "DistillResult",
    "TapNeck",
    "build_student",
    "collect_taps",
    "distill",
    "load_distill_config",
    "load_teacher",
    "teacher_taps",
]
