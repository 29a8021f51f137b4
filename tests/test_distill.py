"""uniultra.distill: taps, the DSKD loss and its switches, gradients, a short run, exact resume,
teacher cache, fine-tuning through the engine, the command and the shipped configs.

Everything runs on tiny custom SAM2 models at 64 px on phantom data, one torch thread: teacher =
Hiera C=8 (mini layout) with CH-Adapters, neck/decoder width 32; student = the same layout at C=4
(a "tiny-width mini"), or the real `mini` preset (C=16) where only shapes matter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from run_outputs import read_rows, same_state
from torchrun_cli import run_two_processes
from uniultra.config_io import ConfigError, from_dict, merge_dicts
from uniultra.data.phantom import write_phantom_dataset
from uniultra.distill.config import DistillConfig, StudentSection, load_distill_config
from uniultra.distill.model import (
    DSKD,
    build_student,
    collect_taps,
    load_teacher,
    mark_dskd_trainable,
    teacher_taps,
)
from uniultra.distill.trainer import DistillHooks, distill
from uniultra.engine.run_archive import pack_run, restore_run
from uniultra.engine.weights_hash import state_hash
from uniultra.inference.loading import load_model
from uniultra.models.checkpoint import read_checkpoint, save_model
from uniultra.models.config import ImageModelConfig, preset
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft import CHAdapter, PeftConfig, apply_peft, record_taps

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
TEACHER_CONFIG = {"name": "c8", "trunk": {"embed_dim": 8}, "neck": {"d_model": 32},
                  "decoder": {"transformer_mlp_dim": 64, "iou_head_hidden_dim": 32}}
STUDENT = {"preset": "mini", "image_size": SIZE, "trunk": {"embed_dim": 4}}
LEVELS = [(1,), (2, 3), (1, 2, 3)]
TAPS = [("D1",), ("D1", "D2"), ("D1", "D3"), ("D1", "D2", "D3")]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_teacher(seed: int = 0) -> SAM2ImageModel:
    """A tiny 'adapted teacher': CH-Adapters with non-zero weights, so D3 is not zero."""
    torch.manual_seed(seed)
    config = from_dict(ImageModelConfig, merge_dicts(preset("mini", SIZE).to_dict(), TEACHER_CONFIG))
    model = SAM2ImageModel(config)
    apply_peft(model, PeftConfig(method="ch_adapter", edge_channels=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    model = make_teacher()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_model(model, path, meta={"weights": "full", "peft": model.peft_config.to_dict()})
    return path


@pytest.fixture(scope="module")
def teacher(teacher_file) -> SAM2ImageModel:
    return load_teacher(teacher_file, SIZE)[0]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = write_phantom_dataset(tmp_path_factory.mktemp("data") / "pa", 12, seed=1, size=SIZE)
    stems = [f"phantom_{i:04d}" for i in range(12)]
    (root / "splits.json").write_text(json.dumps({"train": stems[:9], "val": stems[9:], "test": []}))
    return root


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def student_for(teacher: SAM2ImageModel, **section) -> SAM2ImageModel:
    torch.manual_seed(1)
    return build_student(teacher, StudentSection(**{**STUDENT, **section}))


# --- taps -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("student_trunk, widths", [({"embed_dim": 4}, (4, 8, 16)), (None, (16, 32, 64))])
def test_tap_shapes_follow_the_spec(teacher, student_trunk, widths):
    student = student_for(teacher, trunk=student_trunk)
    x = images()
    t = teacher_taps(teacher, x, (1, 2, 3), ("D1", "D2", "D3"))
    s = collect_taps(student, x, (1, 2, 3), ("D1", "D2", "D3"))
    for level, stride in zip((1, 2, 3), (4, 8, 16), strict=True):
        grid = SIZE // stride
        for tap in ("D1", "D2", "D3"):
            name = f"l{level}.{tap}"
            assert t[name].shape == (2, 8 * 2 ** (level - 1), grid, grid), name  # teacher C, 2C, 4C
            assert s[name].shape == (2, widths[level - 1], grid, grid), name
        # D1 = D2 + D3 exactly: the stage output is the block output plus the adapter output.
        assert torch.equal(t[f"l{level}.D1"], t[f"l{level}.D2"] + t[f"l{level}.D3"])
        assert t[f"l{level}.D3"].abs().max() > 0
    # The necks bring every student tap to the teacher's shape.
    dskd = DSKD(student, teacher)
    for name, value in s.items():
        assert dskd.necks[name.replace(".", "_")](value).shape == t[name].shape


def test_truncated_forward_taps_equal_full_forward_taps(teacher):
    """collect_taps stops after stage 3; its taps are those of the whole image encoder."""
    x = images()
    with torch.no_grad(), record_taps(teacher) as recorder:
        teacher.image_encoder(x)
        full = {level: recorder.stage(level) for level in (1, 2, 3)}
        full = {f"l{lv}.{tap}": getattr(full[lv], attr).permute(0, 3, 1, 2).clone()
                for lv in (1, 2, 3) for tap, attr in (("D1", "output"), ("D2", "block"), ("D3", "adapter"))}
    ours = teacher_taps(teacher, x, (1, 2, 3), ("D1", "D2", "D3"))
    assert ours.keys() == full.keys()
    assert all(torch.equal(ours[k], full[k]) for k in ours)
    # Stage outputs are what the trunk returns.
    with torch.no_grad():
        outputs = teacher.image_encoder.trunk(x)
    assert torch.equal(ours["l3.D1"], outputs[2])


def test_student_inherits_the_teacher_decoder_and_peft(teacher):
    student = student_for(teacher)
    for name in ("sam_prompt_encoder", "sam_mask_decoder"):
        a, b = getattr(student, name).state_dict(), getattr(teacher, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(student.no_mem_embed, teacher.no_mem_embed)
    assert student.peft_config == teacher.peft_config
    assert student.config.neck == teacher.config.neck and student.config.trunk.embed_dim == 4
    assert sum(isinstance(m, CHAdapter) for m in student.modules()) == 12  # one per block
    # The real mini preset with CH-Adapters (edge width c = 1, docs/peft.md): the paper's 0.86M encoder.
    mini = SAM2ImageModel(preset("mini", 256))
    apply_peft(mini, PeftConfig(edge_channels=1))
    encoder = sum(p.numel() for p in mini.image_encoder.parameters())
    assert round(encoder / 1e6, 2) == 0.86


# --- the loss -------------------------------------------------------------------------------------

def test_dskd_loss_is_zero_when_the_student_is_the_teacher(teacher):
    twin = student_for(teacher, trunk={"embed_dim": 8})  # the teacher's architecture
    twin.load_state_dict(teacher.state_dict())
    dskd = DSKD(twin, teacher)
    dskd.init_identity_necks()
    x = images()
    total, terms = dskd(x, teacher_taps(teacher, x, dskd.levels, dskd.taps))
    assert len(terms) == 9 and total.item() == 0.0 and all(v.item() == 0.0 for v in terms.values())
    with torch.no_grad():
        weight = twin.image_encoder.trunk.patch_embed.proj.weight
        weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    total, terms = dskd(x, teacher_taps(teacher, x, dskd.levels, dskd.taps))
    assert total.item() > 0 and all(v.item() > 0 for v in terms.values())  # the patch embedding feeds every tap


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("taps", TAPS)
def test_each_switch_decides_which_terms_exist(teacher, levels, taps):
    expected = {f"l{lv}.{tap}" for lv in levels for tap in taps}
    config = DistillConfig(levels=levels, taps=taps)
    assert set(config.term_names) == expected
    dskd = DSKD(student_for(teacher), teacher, levels, taps)
    assert set(dskd.term_names) == expected and len(dskd.necks) == len(expected)
    x = images(1)
    total, terms = dskd(x, teacher_taps(teacher, x, levels, taps))
    assert set(terms) == expected
    assert torch.allclose(total, torch.stack(list(terms.values())).sum())


def test_config_validation():
    assert DistillConfig(levels=(3, 1), taps=("D3", "D1")).term_names == ("l1.D1", "l1.D3", "l3.D1", "l3.D3")
    with pytest.raises(ConfigError, match="levels"):
        DistillConfig.from_dict({"levels": [0, 1], "data": [{"path": "x"}]}, "t.yaml")
    with pytest.raises(ConfigError, match="taps"):
        DistillConfig.from_dict({"taps": ["D4"], "data": [{"path": "x"}]}, "t.yaml")
    with pytest.raises(ConfigError, match="augment: null"):
        DistillConfig.from_dict({"teacher_cache": {"enabled": True}, "data": [{"path": "x"}]}, "t.yaml")
    DistillConfig.from_dict({"teacher_cache": {"enabled": True}, "augment": None, "data": [{"path": "x"}]})
    with pytest.raises(ConfigError, match="finetune.epochs"):
        DistillConfig.from_dict({"finetune": {"optim": {"epochs": 3}}, "data": [{"path": "x"}]}, "t.yaml")
    with pytest.raises(ConfigError, match="no dataset"):
        DistillConfig.from_dict({}, "t.yaml")
    # A written config reads back unchanged.
    config = DistillConfig.from_dict({"data": [{"path": "x"}], "finetune": {"epochs": 4}, "levels": [2]})
    assert config.finetune.optim.epochs == 4
    assert DistillConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


# --- gradients ------------------------------------------------------------------------------------

def test_gradients_reach_student_trunk_and_adapters_never_the_teacher(teacher):
    student = student_for(teacher)
    dskd = DSKD(student, teacher, (1, 2, 3), ("D1", "D2", "D3"))
    trained = mark_dskd_trainable(student, dskd.levels)
    x = images()
    total, _ = dskd(x, teacher_taps(teacher, x, dskd.levels, dskd.taps))
    total.backward()
    trunk = student.image_encoder.trunk
    last = trunk.stage_ends[2]
    assert trunk.patch_embed.proj.weight.grad.abs().sum() > 0 and trunk.pos_embed.grad.abs().sum() > 0
    for i in range(last + 1):
        block = trunk.blocks[i]
        assert block.attn.qkv.weight.grad.abs().sum() > 0, f"block {i}"
        # The adapters' zero-initialised output layers get gradient at once (first layers after an update).
        assert block.adapter.context[2].weight.grad.abs().sum() > 0, f"adapter {i}"
        assert block.adapter.edge.channel_mixer.weight.grad.abs().sum() > 0, f"adapter edge {i}"
    assert all(p.grad is not None for p in trained.values())
    assert all(p.grad is not None for p in dskd.necks.parameters())
    # (a D3 neck's 3x3 weight starts with zero gradient: the untrained student adapter outputs zero)
    assert all(p.grad.abs().sum() > 0 for k, neck in dskd.necks.items() if not k.endswith("D3")
               for p in neck.parameters())
    # Never the teacher; nothing outside the encoder stages 1-3 either.
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    untouched = [*trunk.blocks[last + 1:].parameters(), *student.image_encoder.neck.parameters(),
                 *student.sam_mask_decoder.parameters(), *student.sam_prompt_encoder.parameters(), student.no_mem_embed]
    assert all(not p.requires_grad and p.grad is None for p in untouched)


# --- runs -----------------------------------------------------------------------------------------

def run_config(out: Path, teacher_file: Path, data: Path, **overrides) -> DistillConfig:
    document = {
        "teacher": {"checkpoint": str(teacher_file)},
        "student": STUDENT,
        "data": [{"path": str(data)}],
        "optim": {"lr": 2e-3, "epochs": 2, "batch_size": 3, "warmup_steps": 0, "ema": 0.9},
        "out_dir": str(out), "progress": False, "log_every": 1000, "threads": 1, "checkpoint_every": 2,
    }
    return DistillConfig.from_dict(merge_dicts(document, overrides), "test")


def test_short_run_lowers_the_loss_writes_a_standalone_student_and_resumes_exactly(teacher_file, teacher, phantoms,
                                                                                   tmp_path):
    ref = distill(run_config(tmp_path / "ref", teacher_file, phantoms, optim={"epochs": 3}))
    out = tmp_path / "ref"
    for name in ("student.pt", "distilled.pt", "last.pt", "steps.csv", "epochs.csv", "log.json", "curves.png",
                 "distill_report.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))
    epochs = read_rows(out / "epochs.csv")
    assert float(epochs[-1]["train_loss"]) < float(epochs[0]["train_loss"])
    assert float(epochs[-1]["val_loss"]) < float(epochs[0]["val_loss"])
    steps = read_rows(out / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 10))  # 9 images, batch 3, 3 epochs
    assert {"l1.D1", "l2.D2", "l3.D3"} <= set(steps[0])
    report = json.loads((out / "distill_report.json").read_text())
    assert report["dskd"]["terms"] == [f"l{lv}.{t}" for lv in (1, 2, 3) for t in ("D1", "D2", "D3")]
    assert report["dskd"]["seconds_per_step"] > 0 and report["finetune"] is None

    # Standalone: a copy in another folder, with the teacher file gone, rebuilds adapters and all.
    alone = tmp_path / "elsewhere" / "student.pt"
    alone.parent.mkdir()
    shutil.copy(out / "student.pt", alone)
    moved = shutil.move(teacher_file, tmp_path / "teacher-moved.pt")
    try:
        student = load_model(alone)
    finally:
        shutil.move(moved, teacher_file)
    assert student.config.trunk.embed_dim == 4 and student.peft_config.method == "ch_adapter"
    assert sum(isinstance(m, CHAdapter) for m in student.modules()) == 12
    assert read_checkpoint(alone)["meta"]["weights"] == "full"
    assert same_state(student.sam_mask_decoder.state_dict(), teacher.sam_mask_decoder.state_dict())
    assert same_state(student.state_dict(), ref.student.state_dict())
    with torch.no_grad():
        masks = student(student.normalize(torch.rand(1, 3, SIZE, SIZE)), boxes=torch.tensor([[8.0, 8, 40, 40]]))
    assert masks.low_res_logits.shape == (1, 1, SIZE // 4, SIZE // 4)

    # Killed mid-epoch 2 (after the checkpoint at step 4), then resumed: the same weights.
    def crash(state):
        if state.step == 5:
            raise RuntimeError("simulated kill")

    crashed = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated kill"):
        distill(run_config(crashed, teacher_file, phantoms, optim={"epochs": 3}),
                hooks=DistillHooks(on_step_end=crash))
    last = torch.load(crashed / "last.pt", weights_only=True)
    assert (last["state"]["epoch"], last["state"]["step"], last["state"]["batch_in_epoch"]) == (1, 4, 1)
    with pytest.raises(ValueError, match="--resume"):
        distill(run_config(crashed, teacher_file, phantoms, optim={"epochs": 3}))
    with pytest.raises(ValueError, match="levels"):
        distill(run_config(crashed, teacher_file, phantoms, optim={"epochs": 3}, levels=[1]), resume=True)
    distill(run_config(crashed, teacher_file, phantoms, optim={"epochs": 3}), resume=True)
    for name in ("student.pt", "distilled.pt"):
        assert same_state(read_checkpoint(crashed / name)["state_dict"], read_checkpoint(out / name)["state_dict"])
    assert same_state(torch.load(crashed / "last.pt", weights_only=True)["model"],
                      torch.load(out / "last.pt", weights_only=True)["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_rows(crashed / "steps.csv")) == strip(steps)


def test_teacher_cache_and_finetuning(teacher_file, teacher, phantoms, tmp_path):
    out = tmp_path / "cached"
    config = run_config(out, teacher_file, phantoms, augment=None, optim={"epochs": 1, "ema": None},
                        teacher_cache={"enabled": True, "dtype": "float32"},
                        finetune={"epochs": 1, "optim": {"lr": 1e-3, "batch_size": 3}})
    result = distill(config)
    # The cache holds the teacher's taps of the un-augmented images: D2 and D3 (D1 = D2 + D3).
    markers = sorted((out / "teacher_cache").glob("*.json"))
    assert len(markers) == 2  # train and val
    from uniultra.engine.config import DataEntry
    from uniultra.engine.data import build_cached_set, open_split

    entry = DataEntry(path=str(phantoms))
    val_images = build_cached_set("pa", open_split(entry, phantoms, "val"), SIZE)
    stem = [m for m in markers if "-val-" in m.name][0].name[:-len(".json")]
    x = torch.stack([torch.from_numpy(val_images.image(i)).expand(3, -1, -1) for i in range(len(val_images))])
    fresh = teacher_taps(teacher, teacher.normalize(x), (1, 2, 3), ("D2", "D3"))
    for name, value in fresh.items():
        assert torch.equal(torch.from_numpy(np.load(out / "teacher_cache" / f"{stem}.{name}.npy")), value), name
    assert not list((out / "teacher_cache").glob(".*partial"))

    # Fine-tuning ran in finetune/ through the engine; student.pt is its best.pt, complete.
    assert (out / "finetune" / "best.pt").is_file() and (out / "finetune" / "epochs.csv").is_file()
    data = read_checkpoint(out / "student.pt")
    assert data["meta"]["weights"] == "full" and data["meta"]["peft"]["method"] == "ch_adapter"
    student = load_model(out / "student.pt")
    distilled = load_model(out / "distilled.pt")
    # End to end: the decoder and the FPN neck moved too.
    assert not same_state(student.sam_mask_decoder.state_dict(), distilled.sam_mask_decoder.state_dict())
    assert not same_state(student.image_encoder.neck.state_dict(), distilled.image_encoder.neck.state_dict())
    report = result.report
    assert report["finetune"]["epochs"] == 1 and report["dskd"]["teacher_cache"] is True
    _check_distill_run_archive(out, student, tmp_path)


def _check_distill_run_archive(out: Path, student: SAM2ImageModel, tmp_path: Path) -> None:
    """`uniultra archive` on a finished distillation: every model and report, the fine-tuning sub-run,
    no resume state and no teacher cache; restored, student.pt answers as before (fp16 rounding)."""
    archive = pack_run(out, tmp_path / "archive")
    assert archive.finished
    assert {"student.pt", "distilled.pt", "distill_report.json", "epochs.csv", "finetune/best.pt",
            "finetune/epochs.csv"} <= set(archive.files), archive.files
    assert not [n for n in archive.files if n.endswith("last.pt") or n.startswith("teacher_cache")]
    restore_run(tmp_path / "archive", tmp_path / "back")
    back = load_model(tmp_path / "back" / "student.pt")
    x = student.normalize(torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    box = torch.tensor([[8.0, 8, 40, 40]])
    with torch.no_grad():
        before, after = student(x, boxes=box).low_res_logits, back(x, boxes=box).low_res_logits
    assert torch.allclose(before, after, atol=0.05 * before.abs().max().item())
    # Before its fine-tuning phase starts, a distillation is not finished: its DSKD state is kept.
    pending = tmp_path / "pending"
    shutil.copytree(out, pending, ignore=shutil.ignore_patterns("finetune", "student.pt", "teacher_cache"))
    archive = pack_run(pending, tmp_path / "archive-pending")
    assert not archive.finished and "last.pt" in archive.files


def test_one_teacher_cache_serves_every_levels_ablation(teacher_file, phantoms, tmp_path):
    cache = tmp_path / "shared_cache"
    common = dict(augment=None, optim={"epochs": 1, "ema": None}, teacher_cache={"enabled": True, "dir": str(cache)})
    distill(run_config(tmp_path / "all", teacher_file, phantoms, **common))
    files = sorted(p.name for p in cache.iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    result = distill(run_config(tmp_path / "l1", teacher_file, phantoms, levels=[1], **common))
    # The levels-1 run found the levels-1,2,3 cache: no new file, nothing rewritten.
    assert sorted(p.name for p in cache.iterdir()) == files
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    assert result.report["dskd"]["terms"] == ["l1.D1", "l1.D2", "l1.D3"]


# --- two processes (gloo) -----------------------------------------------------------------------

def test_torchrun_two_processes(teacher_file, phantoms, tmp_path):
    """DDP on CPU with the teacher cache built by both processes (each its share)."""
    config = run_config(tmp_path / "ddp", teacher_file, phantoms, augment=None, teacher_cache={"enabled": True},
                        optim={"epochs": 1, "batch_size": 2}).to_dict()
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config))
    hashes = tmp_path / "hashes"
    proc = run_two_processes("distill", config_file, hashes, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((hashes / f"distill-rank{r}.json").read_text()) for r in (0, 1)]
    # 9 images over 2 processes: 5 and 4 (padded to 5 by the sampler), 2 steps of 2 per process.
    assert ranks[0]["world_size"] == 2 and ranks[0]["step"] == ranks[1]["step"] == 2
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    last = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and state_hash(last["model"]) == ranks[0]["sha256"]
    cached = {p.name.split(".", 1)[1]: np.load(p) for p in (tmp_path / "ddp" / "teacher_cache").glob("pa-train-*.npy")}
    assert set(cached) == {f"l{lv}.{t}.npy" for lv in (1, 2, 3) for t in ("D2", "D3")}
    assert all(np.abs(a).reshape(len(a), -1).max(axis=1).min() > 0 for a in cached.values())  # every row written
    assert load_model(tmp_path / "ddp" / "student.pt").peft_config.method == "ch_adapter"


# --- the command and the shipped configs ----------------------------------------------------------

def test_command_line(teacher_file, phantoms, tmp_path):
    from uniultra.cli import main

    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump({
        "student": STUDENT, "levels": [2, 3], "taps": ["D1", "D3"],
        "optim": {"lr": 1e-3, "epochs": 5, "batch_size": 3}, "threads": 1, "progress": False,
    }))
    code = main(["distill", "--config", str(config), "--teacher", str(teacher_file), "--data", str(phantoms),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "run" / "distill_report.json").read_text())
    assert report["dskd"]["terms"] == ["l2.D1", "l2.D3", "l3.D1", "l3.D3"] and report["dskd"]["epochs"] == 1
    assert report["teacher"]["path"] == str(teacher_file)


@pytest.mark.parametrize("name, levels", [("distill-mini-universal", (1, 2, 3)),
                                          ("distill-mini-universal-levels-1", (1,)),
                                          ("distill-mini-universal-levels-23", (2, 3))])
def test_shipped_cpu_configs(name, levels):
    config = load_distill_config(REPO / "configs" / "cpu" / f"{name}.yaml")
    assert config.levels == levels and config.taps == ("D1", "D2", "D3")
    assert config.student.preset == "mini" and config.student.image_size == 256
    assert config.teacher.checkpoint == "runs/cpu/universal-teacher/best.pt"
    assert [Path(d.path).name for d in config.data] == ["busi", "ddti", "tg3k"]


def test_shipped_paper_config():
    config = load_distill_config(REPO / "configs" / "paper" / "uniultra-mini.yaml")
    assert config.student.image_size == 1024 and config.levels == (1, 2, 3) and config.taps == ("D1", "D2", "D3")
    assert config.optim.lr == 1e-4 and config.optim.gamma == 0.98 and config.optim.batch_size == 4
