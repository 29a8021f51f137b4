"""uniultra.distill.mdkd: multi-modal decoupled distillation (SPEC 5) with the modality controller.

Tiny custom SAM2 models at 64 px on phantom data, one torch thread: adapted teacher = test_distill's
(Hiera C=8, mini layout, CH-Adapters); general teacher = the same architecture without adapters;
student = the mini layout at C=4 with the teacher's CH-Adapters and a controller per modality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from run_outputs import read_rows, same_state
from test_distill import SIZE, STUDENT, TEACHER_CONFIG, make_teacher
from uniultra.config_io import ConfigError, from_dict, merge_dicts
from uniultra.data.phantom import write_phantom_dataset
from uniultra.distill.config import DistillConfig, StudentSection, load_distill_config
from uniultra.distill.mdkd import MDKD, general_taps
from uniultra.distill.model import DSKD, build_student, load_teacher, mark_dskd_trainable, teacher_taps
from uniultra.distill.trainer import DistillHooks, distill
from uniultra.inference.loading import load_model
from uniultra.models.checkpoint import read_checkpoint, save_model
from uniultra.models.config import ImageModelConfig, preset
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft.controller import (
    ControllerConfig,
    attach_modality_controller,
    controller_config,
    controller_parameters,
    is_controller_parameter,
    use_modality,
)

REPO = Path(__file__).resolve().parents[1]
LEVELS, TAPS = (1, 2, 3), ("D1", "D2", "D3")

pytestmark = pytest.mark.usefixtures("one_thread")


def general_teacher(seed: int = 5) -> SAM2ImageModel:
    """A tiny general teacher: test_distill's teacher architecture without adapters."""
    torch.manual_seed(seed)
    return SAM2ImageModel(from_dict(ImageModelConfig, merge_dicts(preset("mini", SIZE).to_dict(), TEACHER_CONFIG)))


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> tuple[Path, Path]:
    """(adapted teacher, general teacher) checkpoint files."""
    root = tmp_path_factory.mktemp("teachers")
    adapted = make_teacher()
    save_model(adapted, root / "adapted.pt", meta={"weights": "full", "peft": adapted.peft_config.to_dict()})
    save_model(general_teacher(), root / "general.pt", meta={"weights": "full"})
    return root / "adapted.pt", root / "general.pt"


@pytest.fixture(scope="module")
def teachers(teacher_files) -> tuple[SAM2ImageModel, SAM2ImageModel]:
    return load_teacher(teacher_files[0], SIZE)[0], load_teacher(teacher_files[1], SIZE)[0]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, Path]:
    """Two small datasets, `pa` and `pb`: two modalities (6 images each: 4 train, 2 val)."""
    roots = []
    for i, name in enumerate(("pa", "pb")):
        root = write_phantom_dataset(tmp_path_factory.mktemp("data") / name, 6, seed=i, size=SIZE)
        stems = [f"phantom_{k:04d}" for k in range(6)]
        (root / "splits.json").write_text(json.dumps({"train": stems[:4], "val": stems[4:], "test": []}))
        roots.append(root)
    return tuple(roots)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def mdkd_for(teachers, randomise: bool = False) -> MDKD:
    teacher, general = teachers
    torch.manual_seed(1)
    student = build_student(teacher, StudentSection(**STUDENT))
    controllers = attach_modality_controller(student, ("pa", "pb"), bottleneck=4)
    if randomise:  # every controller parameter then gets gradient (not only values / up projections)
        with torch.no_grad():
            for p in (p for c in controllers for p in c.parameters()):
                p.normal_(0, 0.2)
    mdkd = MDKD(student, teacher, general, LEVELS, TAPS, weight_common=0.5, weight_modality=2.0)
    mark_dskd_trainable(student, LEVELS)
    return mdkd


def targets(teachers, x):
    teacher, general = teachers
    return teacher_taps(teacher, x, LEVELS, TAPS), general_taps(general, x, LEVELS)


# --- the loss -------------------------------------------------------------------------------------

def test_terms_and_a_zeroed_controller(teachers):
    mdkd = mdkd_for(teachers)
    x = images()
    adapted, general = targets(teachers, x)
    assert set(general) == {"l1.D1", "l2.D1", "l3.D1"}
    # Without adapters the general teacher's stage output is its block output (D1 = D2).
    assert torch.equal(general["l2.D1"], teacher_taps(teachers[1], x, (2,), ("D2",))["l2.D2"])
    with torch.no_grad():
        total, terms = mdkd(x, adapted, general, torch.tensor([0, 1]))
        # The zeroed controller is the shared network: the modality terms are plain DSKD's.
        plain = DSKD(mdkd.student, teachers[0], LEVELS, TAPS)
        plain.necks.load_state_dict(mdkd.necks.state_dict())
        _, reference = plain(x, adapted)
    assert list(terms) == list(mdkd.term_names) == (
        [f"common.l{lv}.D1" for lv in LEVELS] + [f"modality.l{lv}.{t}" for lv in LEVELS for t in TAPS])
    assert all(torch.equal(terms[f"modality.{k}"], v) for k, v in reference.items())
    common = sum(v for k, v in terms.items() if k.startswith("common."))
    torch.testing.assert_close(total, 0.5 * common + 2.0 * sum(reference.values()))
    assert mdkd.combine({k: float(v) for k, v in terms.items()}) == pytest.approx(float(total), rel=1e-6)


def gradients(loss: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor | None]:
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return dict(zip(params, grads, strict=True))


def nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def test_common_loss_trains_only_shared_weights_modality_loss_only_the_controller(teachers):
    mdkd = mdkd_for(teachers, randomise=True)
    x = images()
    total, terms = mdkd(x, *targets(teachers, x), torch.tensor([0, 1]))
    trained = {n: p for n, p in mdkd.named_parameters() if p.requires_grad}
    assert all(p.requires_grad for p in mdkd.shared_parameters())  # restored after the frozen pass
    controller = {n for n in trained if is_controller_parameter(n)}
    modality_necks = {n for n in trained if n.startswith("necks.")}
    common_necks = {n for n in trained if n.startswith("common_necks.")}
    shared = set(trained) - controller - modality_necks - common_necks
    assert controller and shared and all(n.startswith("student.") for n in shared)
    common_loss = sum(v for k, v in terms.items() if k.startswith("common."))
    modality_loss = sum(v for k, v in terms.items() if k.startswith("modality."))
    from_common, from_modality = gradients(common_loss, trained), gradients(modality_loss, trained)
    # Exact routing: no graph edge at all from one loss to the other's parameters.
    assert all(from_common[n] is None for n in controller | modality_necks)
    assert all(from_modality[n] is None for n in shared | common_necks)
    # ... and each loss does reach its own: every block's controller; the trunk and the adapters
    # (their zero-initialised output layers keep the first layers at zero gradient for one step).
    assert all(nonzero(from_modality[n]) for n in controller)
    assert all(from_common[n] is not None for n in shared | common_necks)
    assert all(nonzero(from_common[f"student.image_encoder.trunk.blocks.{i}.attn.qkv.weight"]) for i in range(10))
    # One backward of the weighted total gives each group exactly its own loss's gradient.
    total.backward()
    for name, p in trained.items():
        own, weight = (from_common[name], 0.5) if name in shared | common_necks else (from_modality[name], 2.0)
        torch.testing.assert_close(p.grad, weight * own, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_kind", ["common.", "modality."])
def test_an_optimiser_step_on_one_loss_leaves_the_other_group_unchanged(teachers, loss_kind):
    mdkd = mdkd_for(teachers, randomise=True)
    before = {n: p.detach().clone() for n, p in mdkd.named_parameters()}
    optimizer = torch.optim.Adam([p for p in mdkd.parameters() if p.requires_grad], lr=1e-2)
    x = images()
    _, terms = mdkd(x, *targets(teachers, x), torch.tensor([1, 0]))
    sum(v for k, v in terms.items() if k.startswith(loss_kind)).backward()
    optimizer.step()
    moved = {n for n, p in mdkd.named_parameters() if not torch.equal(p.detach(), before[n])}
    in_controller = {n for n in moved if is_controller_parameter(n)}
    if loss_kind == "common.":
        assert moved and not in_controller and not any(n.startswith("necks.") for n in moved)
    else:
        assert moved == in_controller | {n for n in moved if n.startswith("necks.")} and in_controller


# --- config ---------------------------------------------------------------------------------------

def test_config():
    data = [{"path": "x/pa"}, {"path": "y/pb"}]
    config = DistillConfig.from_dict({"data": data, "mdkd": {"general_teacher": "g.pt"}})
    assert config.modality_names() == ("pa", "pb") and config.mdkd.weight_common == 1.0
    assert DistillConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    named = DistillConfig.from_dict({"data": data, "mdkd": {"modalities": ["pb", "pa", "pc"]}})
    assert named.modality_names() == ("pb", "pa", "pc")
    assert DistillConfig.from_dict({"data": data}).mdkd is None
    assert DistillConfig.from_dict({"data": data, "mdkd": {}, "finetune": {"epochs": 2}}).finetune.epochs == 2
    bad = [({"mdkd": {"modalities": ["pa"]}}, "lacks the data labels"),
           ({"mdkd": {"weight_common": 0, "weight_modality": 0}}, "not both 0"),
           ({"mdkd": {"bottleneck": 0}}, "bottleneck")]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            DistillConfig.from_dict({"data": data, **extra})


def test_shipped_config():
    config = load_distill_config(REPO / "configs" / "cpu" / "mdkd-mini-universal.yaml")
    plain = load_distill_config(REPO / "configs" / "cpu" / "distill-mini-universal.yaml")
    assert config.mdkd.general_teacher == "runs/cpu/foundation-c32/best.pt"
    assert config.teacher.checkpoint == "runs/cpu/universal-teacher/best.pt"
    assert config.data == plain.data and config.student == plain.student and config.modality_names() == (
        "busi", "ddti", "tg3k")
    assert config.finetune.epochs == 0 and config.out_dir != plain.out_dir


# --- runs -----------------------------------------------------------------------------------------

def run_document(out: Path, teacher_files, phantoms, **overrides) -> dict:
    return merge_dicts({
        "teacher": {"checkpoint": str(teacher_files[0])},
        "student": STUDENT,
        "data": [{"path": str(p)} for p in phantoms],
        "mdkd": {"general_teacher": str(teacher_files[1]), "bottleneck": 4},
        "optim": {"lr": 2e-3, "epochs": 2, "batch_size": 4, "warmup_steps": 0, "ema": 0.9},
        "out_dir": str(out), "progress": False, "log_every": 1000, "threads": 1, "checkpoint_every": 1,
    }, overrides)


def test_command_line_run_with_both_teacher_caches(teacher_files, teachers, phantoms, tmp_path):
    from uniultra.cli import main

    document = run_document(tmp_path / "unused", teacher_files, phantoms, augment=None,
                            teacher_cache={"enabled": True, "dtype": "float32"})
    del document["mdkd"]["general_teacher"], document["out_dir"]
    config = tmp_path / "mdkd.yaml"
    config.write_text(yaml.safe_dump(document))
    out = tmp_path / "run"
    code = main(["distill", "--config", str(config), "--general-teacher", str(teacher_files[1]), "--out", str(out),
                 "--epochs", "1", "--no-progress"])
    assert code == 0
    for name in ("student.pt", "distilled.pt", "last.pt", "steps.csv", "epochs.csv", "distill_report.json"):
        assert (out / name).is_file(), name
    # One cache per teacher, set and split: the general teacher's stems are its own (D1 only).
    markers = sorted((out / "teacher_cache").glob("*.json"))
    assert len(markers) == 8
    general_files = {p.name.split(".", 1)[1] for p in (out / "teacher_cache").glob("*.l1.D1.npy")}
    assert general_files == {"l1.D1.npy"} and len(list((out / "teacher_cache").glob("*.l1.D1.npy"))) == 4
    report = json.loads((out / "distill_report.json").read_text())
    assert report["mdkd"]["modalities"] == ["pa", "pb"] and report["mdkd"]["general_teacher"]["path"] == str(
        teacher_files[1])
    assert {"common.l1.D1", "modality.l3.D3"} <= set(read_rows(out / "steps.csv")[0])
    # The student reloads with its controller; a modality id selects its channel at inference.
    meta = read_checkpoint(out / "student.pt")["meta"]
    assert meta["modality_controller"] == {"modalities": ["pa", "pb"], "bottleneck": 4, "blocks": None}
    student = load_model(out / "student.pt")
    assert controller_config(student) == ControllerConfig(("pa", "pb"), 4)
    x = student.normalize(torch.rand(1, 3, SIZE, SIZE))
    with torch.no_grad():
        shared = student.encode_image(x).image_embed
        with use_modality(student, "pb"):
            pb = student.encode_image(x).image_embed
            masks = student(x, boxes=torch.tensor([[8.0, 8, 40, 40]]))
    assert masks.low_res_logits.shape == (1, 1, SIZE // 4, SIZE // 4)
    assert not torch.equal(shared, pb)  # the trained controller is no longer a no-op
    # The cached general taps are the general teacher's stage outputs of the un-augmented images.
    stem = [m.name[:-len(".json")] for m in markers if m.name.startswith("pb-val-")]
    cached = [np.load(out / "teacher_cache" / f"{s}.l2.D1.npy") for s in stem
              if (out / "teacher_cache" / f"{s}.l2.D1.npy").is_file()]
    assert len(cached) == 1 and cached[0].shape == (2, 16, SIZE // 8, SIZE // 8)


def test_command_line_run_fine_tunes_the_student_with_its_controller(teacher_files, phantoms, tmp_path):
    from uniultra.cli import main

    document = run_document(tmp_path / "unused", teacher_files, phantoms,
                            finetune={"epochs": 1, "optim": {"lr": 1e-3, "batch_size": 4, "warmup_steps": 0}})
    config = tmp_path / "mdkd.yaml"
    config.write_text(yaml.safe_dump(document))
    out = tmp_path / "run"
    assert main(["distill", "--config", str(config), "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    report = json.loads((out / "distill_report.json").read_text())
    assert report["finetune"]["epochs"] == 1 and report["finetune"]["steps"] == 2
    assert read_checkpoint(out / "student.pt")["meta"]["modality_controller"]["modalities"] == ["pa", "pb"]
    student, distilled = load_model(out / "student.pt"), load_model(out / "distilled.pt")
    assert controller_config(student) == ControllerConfig(("pa", "pb"), 4)
    tuned, before = controller_parameters(student), controller_parameters(distilled)
    assert tuned.keys() == before.keys()
    # Fine-tuning trains every controller block, the stage-4 ones MDKD left alone included.
    changed = {n for n in tuned if not torch.equal(tuned[n], before[n])}
    assert {n for n in changed if n.endswith(".value")} == {n for n in tuned if n.endswith(".value")}


def test_run_without_cache_resumes_exactly(teacher_files, phantoms, tmp_path):
    ref = distill(DistillConfig.from_dict(run_document(tmp_path / "ref", teacher_files, phantoms)))
    assert len(controller_parameters(ref.student)) == 7 * 12

    def crash(state):
        if state.step == 3:
            raise RuntimeError("simulated kill")

    crashed = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated kill"):
        distill(DistillConfig.from_dict(run_document(crashed, teacher_files, phantoms)),
                hooks=DistillHooks(on_step_end=crash))
    last = torch.load(crashed / "last.pt", weights_only=True)
    assert last["state"]["step"] == 3 and last["general"]["path"] == str(teacher_files[1])
    with pytest.raises(ValueError, match="general teacher"):  # another general teacher file
        distill(DistillConfig.from_dict(run_document(crashed, teacher_files, phantoms,
                                                     mdkd={"general_teacher": str(teacher_files[0])})), resume=True)
    distill(DistillConfig.from_dict(run_document(crashed, teacher_files, phantoms)), resume=True)
    for name in ("student.pt", "distilled.pt"):
        assert same_state(read_checkpoint(crashed / name)["state_dict"],
                          read_checkpoint(tmp_path / "ref" / name)["state_dict"])
    assert same_state(torch.load(crashed / "last.pt", weights_only=True)["model"],
                      torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["model"])
