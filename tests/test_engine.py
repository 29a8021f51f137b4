"""uniultra.engine: training loop, checkpoints, exact resume, DDP on CPU, config errors.

Everything runs on a tiny custom SAM2 (Hiera C=8, neck/decoder width 32) at 64 px on synthetic
phantom datasets, one torch thread (the test box is a shared 2-core CPU).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dataset_factory import write_pair
from run_outputs import read_rows, same_state
from torchrun_cli import run_two_processes
from uniultra.auto.config import load_auto_config
from uniultra.config_io import ConfigError
from uniultra.data.phantom import make_phantom, write_phantom_dataset
from uniultra.distill.config import load_distill_config
from uniultra.engine import optimisation
from uniultra.engine.config import TrainConfig, load_train_config, parse_set_option
from uniultra.engine.run_archive import check_archive, pack_document, pack_run, restore_run, unpack_document
from uniultra.engine.trainer import TrainHooks, build_model, train
from uniultra.engine.weights_hash import state_hash
from uniultra.inference.loading import load_model
from uniultra.inference.predictor import Predictor
from uniultra.models.checkpoint import CheckpointError, read_checkpoint, save_model
from uniultra.models.image_model import SAM2ImageModel

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "preset": "mini",
    "image_size": 64,
    "config": {"name": "c8", "trunk": {"embed_dim": 8}, "neck": {"d_model": 32},
               "decoder": {"transformer_mlp_dim": 64, "iou_head_hidden_dim": 32}},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _splits(root: Path, stems: list[str], n_val: int) -> None:
    (root / "splits.json").write_text(json.dumps({"train": stems[:-n_val], "val": stems[-n_val:], "test": []}))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> list[Path]:
    """Two small sets: 'pa' (12 one-lesion phantoms) and 'pb' (8 two-lesion phantoms + 2 normal
    images with empty masks, one in train and one in val)."""
    base = tmp_path_factory.mktemp("data")
    pa = write_phantom_dataset(base / "pa", 12, seed=1, size=64)
    _splits(pa, [f"phantom_{i:04d}" for i in range(12)], 3)
    pb = write_phantom_dataset(base / "pb", 8, seed=2, size=(64, 80), n_lesions=2)
    for i in range(2):
        normal = make_phantom(100 + i, (64, 80), n_lesions=0)
        write_pair(pb, f"normal_{i}", normal.mask, normal.image)
    stems = [f"phantom_{i:04d}" for i in range(8)]
    (pb / "splits.json").write_text(json.dumps({"train": stems[:6] + ["normal_0"],
                                                "val": stems[6:] + ["normal_1"], "test": []}))
    return [pa, pb]


def tiny_config(out_dir: Path, data: list[Path], **overrides) -> TrainConfig:
    document = {
        "model": TINY_MODEL,
        "data": [{"path": str(d)} for d in data],
        "optim": {"lr": 1e-3, "epochs": 2, "batch_size": 4, "warmup_steps": 2},
        "out_dir": str(out_dir), "progress": False, "log_every": 1000, "threads": 1,
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            document.setdefault(section, {})[leaf] = value
        else:
            document[key] = value
    return TrainConfig.from_dict(document, "test")


# --- a short run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "run"
    result = train(tiny_config(out, datasets, optim__epochs=4))
    return out, result


def test_short_run_lowers_loss_and_writes_logs(short_run):
    out, result = short_run
    for name in ("last.pt", "best.pt", "steps.csv", "epochs.csv", "log.json", "curves.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "no temporary file may be left behind"
    epochs = read_rows(out / "epochs.csv")
    assert [int(e["epoch"]) for e in epochs] == [1, 2, 3, 4]
    assert float(epochs[-1]["train_loss"]) < float(epochs[0]["train_loss"])
    # pa: 9 train images; pb: 6 lesion images + 1 empty mask (skipped) -> 15 samples, 3 steps of 4.
    steps = read_rows(out / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 13))
    log = json.loads((out / "log.json").read_text())
    assert log["data"]["train"]["pb"] == {"images": 7, "empty_skipped": 1}
    assert log["data"]["val"]["pb"] == {"images": 3, "empty_skipped": 1}
    assert log["trainable"]["method"] == "full" and log["best"]["epoch"] in (1, 2, 3, 4)
    assert {"val_dice_pa", "val_dice_pb", "val_dice"} <= set(epochs[0])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_bf16_autocast_only_where_asked_and_with_bf16_units(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert optimisation.autocast_dtype(cuda, "fp16") == torch.float16
    assert optimisation.autocast_dtype(cuda, "none", "bf16") is None  # cpu_amp is the CPU's setting only
    assert optimisation.autocast_dtype(cpu, "bf16") is None  # `amp` alone never changes CPU training
    monkeypatch.setattr(optimisation, "has_bf16_units", lambda: True)
    assert optimisation.autocast_dtype(cpu, "none", "bf16") == torch.bfloat16
    monkeypatch.setattr(optimisation, "has_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 units.*runs in fp32"):
        assert optimisation.autocast_dtype(cpu, "bf16", "bf16") is None


def test_cpu_bf16_run_trains_and_records_its_precision(datasets, tmp_path, monkeypatch):
    """Where the CPU has bf16 units, `cpu_amp: bf16` trains in bf16 (PyTorch emulates it elsewhere,
    so the test runs on any CPU): finite, falling loss unlike fp32's to the digit, fp32 weights, the
    precision in log.json."""
    monkeypatch.setattr(optimisation, "has_bf16_units", lambda: True)
    out = tmp_path / "bf16"
    result = train(tiny_config(out, datasets, optim__epochs=2, cpu_amp="bf16"))
    log = json.loads((out / "log.json").read_text())
    assert log["precision"] == "bf16" and log["config"]["cpu_amp"] == "bf16"
    steps = read_rows(out / "steps.csv")
    losses = [float(r["loss"]) for r in steps]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model = result.model.state_dict().values()
    assert all(t.dtype == torch.float32 for t in model if t.is_floating_point())
    train(tiny_config(tmp_path / "fp32", datasets, optim__epochs=1))
    fp32 = read_rows(tmp_path / "fp32" / "steps.csv")
    assert json.loads((tmp_path / "fp32" / "log.json").read_text())["precision"] == "fp32"
    assert float(fp32[0]["loss"]) != pytest.approx(losses[0], abs=1e-6)  # same seed, other arithmetic


def test_validation_follows_the_evaluation_protocol(datasets, tmp_path):
    """Per-epoch validation = `uniultra evaluate` on the val split with the same prompts (every
    object, union of masks, native resolution, empty masks skipped), up to float16 image caching
    and batching. Checked on the untrained model, whose masks are far from empty."""
    from uniultra.data.dataset import SegmentationDataset
    from uniultra.engine.trainer import Trainer
    from uniultra.evaluation.evaluate import ModelMethod, evaluate

    trainer = Trainer(tiny_config(tmp_path / "val", datasets, val_batch_size=3))
    trainer._setup()
    ours = trainer.validate()
    method = ModelMethod("untrained", Predictor(trainer.model.eval()))
    results = evaluate(method, [SegmentationDataset(d, split="val") for d in datasets],
                       prompt_mode="box", jitter=20.0, seed=0, progress=False)
    for r in results:
        theirs = r.summary()
        assert 0.05 < theirs["dice"]["mean"] < 0.95
        assert ours["datasets"][r.name]["dice"] == pytest.approx(theirs["dice"]["mean"], abs=2e-3)
        assert ours["datasets"][r.name]["n"] == theirs["n"]
        assert ours["datasets"][r.name]["skipped"] == theirs["n_skipped"]
    assert ours["datasets"]["pb"]["skipped"] == 1


def test_full_best_checkpoint_loads_standalone_and_predicts(short_run, datasets):
    out, result = short_run
    data = read_checkpoint(out / "best.pt")
    assert data["meta"]["weights"] == "full" and data["meta"]["base"]["kind"] == "random init"
    assert data["meta"]["train"]["config"]["optim"]["epochs"] == 4
    model = load_model(out / "best.pt")
    assert model.config.trunk.embed_dim == 8 and model.image_size == 64
    predictor = Predictor(model)
    image = make_phantom(7, 64).image
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(box=[10, 10, 40, 40])
    assert masks.shape == (1, 64, 64) and masks.dtype == bool and scores.shape == (1,)


# --- exact resume -------------------------------------------------------------------------------

def resume_config(out: Path, datasets: list[Path], **overrides) -> TrainConfig:
    # EMA and augmentation on: their state and randomness must survive the interruption too.
    return tiny_config(out, datasets, optim__ema=0.9, checkpoint_every=2, **overrides)


def test_resume_reproduces_uninterrupted_run(datasets, tmp_path):
    reference = train(resume_config(tmp_path / "ref", datasets))
    ref_state = reference.model.state_dict()
    ref_steps = [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(tmp_path / "ref" / "steps.csv")]

    # 1) stopped cleanly after epoch 1, resumed to 2 epochs.
    train(resume_config(tmp_path / "split", datasets, optim__epochs=1))
    with pytest.raises(ValueError, match="--resume"):
        train(resume_config(tmp_path / "split", datasets))
    resumed = train(resume_config(tmp_path / "split", datasets), resume=True)
    assert same_state(resumed.model.state_dict(), ref_state)

    # 2) crashed in the middle of epoch 2 (after the mid-epoch checkpoint at step 4), resumed.
    def crash(state):
        if state.step == 5:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train(resume_config(tmp_path / "crash", datasets), hooks=TrainHooks(on_step_end=crash))
    last = torch.load(tmp_path / "crash" / "last.pt", weights_only=True)
    assert (last["state"]["epoch"], last["state"]["step"], last["state"]["batch_in_epoch"]) == (1, 4, 1)
    crashed = train(resume_config(tmp_path / "crash", datasets), resume=True)
    assert same_state(crashed.model.state_dict(), ref_state)

    for run in ("split", "crash"):
        steps = [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(tmp_path / run / "steps.csv")]
        assert steps == ref_steps, f"{run}: every step logged once, with the same values"
        assert same_state(load_model(tmp_path / run / "best.pt").state_dict(),
                          load_model(tmp_path / "ref" / "best.pt").state_dict())


def test_resume_refuses_a_changed_config(datasets, tmp_path):
    train(tiny_config(tmp_path / "run", datasets, optim__epochs=1))
    with pytest.raises(ValueError, match=r"optim\.lr"):
        train(tiny_config(tmp_path / "run", datasets, optim__lr=5e-4), resume=True)


# --- adapter-only checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize("peft", [{"method": "ch_adapter", "edge_channels": 2}, {"method": "lora", "lora_rank": 2}])
def test_adapter_best_checkpoint_loads_with_its_base(datasets, tmp_path, peft):
    pytest.importorskip("uniultra.peft.apply", reason="uniultra.peft is not there yet")
    torch.manual_seed(0)
    base = save_model(SAM2ImageModel(_tiny_image_config()), tmp_path / "base.pt")
    run = tmp_path / "adapt"
    result = train(tiny_config(run, datasets, model={**TINY_MODEL, "base": str(base)}, peft=peft,
                               optim__epochs=1))
    data = read_checkpoint(run / "best.pt")
    meta = data["meta"]
    assert meta["weights"] == "trained" and meta["peft"]["method"] == peft["method"]
    assert meta["base"]["sha256"] and meta["base"]["path"] == str(base)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert set(data["state_dict"]) == trained
    assert not any(k.startswith("image_encoder.trunk.patch_embed") for k in data["state_dict"])

    loaded = load_model(run / "best.pt")
    assert same_state(loaded.state_dict(), result.model.state_dict())
    # The base moved: found through an explicit base=, and refused when it is another file.
    moved = shutil.move(base, tmp_path / "elsewhere.pt")
    with pytest.raises(CheckpointError, match="pass the base file"):
        load_model(run / "best.pt")
    assert same_state(load_model(run / "best.pt", base=moved).state_dict(), result.model.state_dict())
    torch.manual_seed(1)
    other = save_model(SAM2ImageModel(_tiny_image_config()), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(run / "best.pt", base=other)
    Predictor(loaded).set_image(make_phantom(3, 64).image)


def test_full_training_of_a_base_that_carries_adapters(datasets, tmp_path):
    """`peft: full` on a base with CH-Adapters (a distilled student) trains every parameter and
    writes a complete best.pt that rebuilds the adapters on load."""
    from uniultra.peft import apply_peft

    torch.manual_seed(0)
    student = SAM2ImageModel(_tiny_image_config())
    apply_peft(student, {"method": "ch_adapter", "edge_channels": 2})
    base = save_model(student, tmp_path / "student.pt", meta={"peft": student.peft_config.to_dict()})
    run = tmp_path / "continue"
    result = train(tiny_config(run, datasets, model={**TINY_MODEL, "base": str(base)}, peft={"method": "full"},
                               optim__epochs=1))
    assert all(p.requires_grad for p in result.model.parameters())
    meta = read_checkpoint(run / "best.pt")["meta"]
    assert meta["weights"] == "full" and meta["peft"]["method"] == "ch_adapter"
    loaded = load_model(run / "best.pt")
    assert same_state(loaded.state_dict(), result.model.state_dict())
    assert not same_state(loaded.state_dict(), load_model(base).state_dict())


def _tiny_image_config():
    from uniultra.engine.trainer import resolve_model_config

    return resolve_model_config(TrainConfig.from_dict({"model": TINY_MODEL, "data": [{"path": "x"}]}))


# --- two processes (gloo) -----------------------------------------------------------------------

def test_torchrun_two_processes_end_with_identical_weights(datasets, tmp_path):
    config = tiny_config(tmp_path / "ddp", datasets, optim__epochs=1, optim__batch_size=2).to_dict()
    # A generated phantom set too: process 0 writes it into out_dir/data/pc, the other waits.
    config["data"].append({"name": "pc", "phantom": {"n": 6, "size": 64, "seed": 3, "val_fraction": 0.34}})
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config))
    hashes = tmp_path / "hashes"
    proc = run_two_processes("train", config_file, hashes, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((hashes / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["sha256"] == ranks[1]["sha256"]
    # 9 + 6 + 3 = 18 samples over 2 processes: 9 each, 4 steps of 2 per process.
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    # Only rank 0 wrote, and what it wrote is what both processes hold.
    last = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and state_hash(last["model"]) == ranks[0]["sha256"]
    assert len(read_rows(tmp_path / "ddp" / "steps.csv")) == 4
    log = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert log["data"]["train"]["pc"]["images"] == 3 and log["data"]["val"]["pc"]["images"] == 3
    assert (tmp_path / "ddp" / "data" / "pc" / "phantom.json").is_file()


# --- configuration files ------------------------------------------------------------------------

def write_yaml(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(("change", "pattern"), [
    ({"optim": {"lr": 1e-3, "learning_rate": 1}}, r"bad\.yaml: optim\.learning_rate: unknown key"),
    ({"epochz": 3}, r"bad\.yaml: epochz: unknown key"),
    ({"optim": {"lr": "fast"}}, r"bad\.yaml: optim\.lr: expected a number, got str 'fast'"),
    ({"optim": {"epochs": 2.5}}, r"bad\.yaml: optim\.epochs: expected an integer"),
    ({"augment": {"scale": [0.9]}}, r"bad\.yaml: augment\.scale: expected a list of 2 items"),
    ({"progress": "yes"}, r"bad\.yaml: progress: expected true/false"),
    ({"amp": "fp8"}, r"bad\.yaml: amp: must be one of 'bf16', 'fp16', 'none'"),
    ({"cpu_amp": "fp16"}, r"bad\.yaml: cpu_amp: must be one of 'bf16', 'none'"),
    ({"data": [{"path": "x", "split": "train"}]}, r"bad\.yaml: data\[0\]\.split: unknown key"),
    ({"peft": {"method": "prefix"}}, r"bad\.yaml: peft: unknown method 'prefix'"),
    ({"prompts": {"train": {"modes": {"scribble": 1.0}}}}, r"bad\.yaml: prompts\.train: unknown training prompt"),
])
def test_config_errors_name_the_file_and_the_key(tmp_path, change, pattern):
    document = {"model": TINY_MODEL, "data": [{"path": "somewhere"}]}
    for key, value in change.items():
        document[key] = {**document[key], **value} if isinstance(document.get(key), dict) else value
    with pytest.raises(ConfigError, match=pattern):
        load_train_config(write_yaml(tmp_path / "bad.yaml", document))


def test_model_config_errors_and_cli_message(tmp_path, capsys, datasets):
    from uniultra.cli import main
    from uniultra.engine.trainer import resolve_model_config

    bad = {"model": {**TINY_MODEL, "config": {"trunk": {"embed_dim": "wide"}}}, "data": [{"path": "x"}]}
    with pytest.raises(ConfigError, match=r"m\.yaml: model\.config\.trunk\.embed_dim: expected an integer"):
        resolve_model_config(load_train_config(write_yaml(tmp_path / "m.yaml", bad)), "m.yaml")
    path = write_yaml(tmp_path / "cli.yaml", {"model": TINY_MODEL, "data": [{"path": "x"}], "optim": {"lr": []}})
    assert main(["train", "--config", str(path)]) == 2
    assert "cli.yaml: optim.lr: expected a number" in capsys.readouterr().err


def test_overrides_and_shipped_configs(tmp_path):
    assert parse_set_option("optim.lr=1e-3") == {"optim": {"lr": "1e-3"}}
    cfg = load_train_config(write_yaml(tmp_path / "c.yaml", {"model": TINY_MODEL, "data": [{"path": "a"}]}),
                            parse_set_option("optim.lr=1e-3"), ["d1", "d2"])
    assert cfg.optim.lr == 1e-3 and [d.path for d in cfg.data] == ["d1", "d2"]
    shipped = [REPO / "configs" / "paper" / "uniultra-l.yaml", REPO / "configs" / "cpu" / "foundation-c32.yaml",
               REPO / "configs" / "cpu" / "universal-teacher.yaml",
               *[REPO / "configs" / "cpu" / f"adapt-busi-{m}.yaml"
                 for m in ("ch_adapter", "decoder_only", "lora", "adapter", "full")]]
    for path in shipped:
        config = load_train_config(path)
        assert not any(Path(d.path).is_absolute() for d in config.data if d.path), path
        assert config.optim.batch_size == 4
    paper = load_train_config(REPO / "configs" / "paper" / "uniultra-l.yaml")
    assert (paper.optim.lr, paper.optim.gamma, paper.optim.epochs) == (1e-4, 0.98, 200)
    assert (paper.loss.focal, paper.loss.dice, paper.peft_config().method) == (0.2, 0.8, "ch_adapter")
    assert 0.0 in load_train_config(REPO / "configs" / "cpu" / "foundation-c32.yaml").prompts.train.jitter


def test_cached_images_match_the_predictor_preprocessing():
    from uniultra.inference.transforms import resize_for_model

    image = make_phantom(5, (70, 90)).image
    ours = torch.from_numpy(resize_for_model(image, 64)).expand(3, -1, -1)
    predictor = Predictor(SAM2ImageModel(_tiny_image_config()))
    theirs = predictor.preprocess(image)[0] * predictor.model.pixel_std[0] + predictor.model.pixel_mean[0]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_untrained_multimask_outputs_are_never_swapped_in():
    config = TrainConfig.from_dict({"model": {"preset": "mini", "image_size": 64}, "data": [{"path": "unused"}],
                                    "loss": {"multimask_for_points": False}}, "m.yaml")
    with pytest.raises(ConfigError, match="m.yaml: loss.multimask_for_points: false .*dynamic_multimask"):
        build_model(config, "m.yaml")
    static = config.replace(model=dataclasses.replace(
        config.model, config={"decoder": {"dynamic_multimask_via_stability": False}}))
    model, _ = build_model(static, "m.yaml")
    assert not model.sam_mask_decoder.dynamic_multimask_via_stability


def _shipped_configs(kind: str) -> list[Path]:
    """The YAML files under configs/ of one kind, told apart by their top-level keys."""
    def kind_of(path: Path) -> str:
        keys = yaml.safe_load(path.read_text())
        return "distill" if "teacher" in keys else "train" if "peft" in keys else "auto"
    return [p for p in sorted((REPO / "configs").rglob("*.yaml")) if kind_of(p) == kind]


def test_every_shipped_config_loads():
    loaders = {"train": load_train_config, "distill": load_distill_config, "auto": load_auto_config}
    for kind, loader in loaders.items():
        paths = _shipped_configs(kind)
        assert paths, kind
        for path in paths:
            loader(path)


def test_random_init_cpu_configs_build_their_model():
    """A run that starts from random weights fails at model build, not after its data is read: build them all."""
    built = 0
    for path in _shipped_configs("train"):
        config = load_train_config(path)
        if config.model.base is None and config.model.image_size <= 256:
            model, identity = build_model(config, str(path))
            assert identity["kind"] == "random init", path
            built += 1
    assert built >= 20


# --- a run packed for the repository (uniultra archive) ------------------------------------------

def test_archive_keeps_optimiser_moments_and_step_counts():
    document = {"model": {"w": torch.randn(4096)},
                "optimizer": {"state": {0: {"step": torch.tensor(1963.0), "exp_avg_sq": torch.full((2048,), 3e-20)}}},
                "rng": {"torch": torch.arange(5000, dtype=torch.uint8)}}
    packed = pack_document(document)
    assert packed["packed"]["model"]["w"].dtype == torch.float16
    assert packed["packed"]["optimizer"]["state"][0]["exp_avg_sq"].dtype == torch.bfloat16
    back = unpack_document(packed, Path("x.pt"))
    assert back["optimizer"]["state"][0]["step"].item() == 1963.0  # a 16-bit step count would read 1960
    assert torch.allclose(back["optimizer"]["state"][0]["exp_avg_sq"], document["optimizer"]["state"][0]["exp_avg_sq"],
                          rtol=1e-2, atol=0)  # float16 would have rounded them to zero
    assert back["model"]["w"].dtype == torch.float32
    assert torch.allclose(back["model"]["w"], document["model"]["w"], rtol=1e-3, atol=1e-4)
    assert torch.equal(back["rng"]["torch"], document["rng"]["torch"])


def test_archived_run_resumes_elsewhere_and_ends_like_the_uninterrupted_run(datasets, tmp_path):
    def config(out: Path) -> TrainConfig:
        document = resume_config(out, datasets).to_dict()
        # A phantom entry: its data/ folder is not archived, the resumed trainer writes it again.
        document["data"].append({"name": "pc", "phantom": {"n": 6, "size": 64, "seed": 3, "val_fraction": 0.34}})
        return TrainConfig.from_dict(document, "test")

    reference = train(config(tmp_path / "ref"))

    def crash(state):
        if state.step == 5:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train(config(tmp_path / "crash"), hooks=TrainHooks(on_step_end=crash))
    archive = pack_run(tmp_path / "crash", tmp_path / "weights" / "crash")
    assert not archive.finished and {"last.pt", "best.pt", "steps.csv", "log.json"} <= set(archive.files)
    assert archive.bytes_after < 0.8 * archive.bytes_before
    assert not (tmp_path / "weights" / "crash" / "data").exists()
    with pytest.raises(ValueError, match="already holds an archive"):
        pack_run(tmp_path / "crash", tmp_path / "weights" / "crash")

    restore_run(tmp_path / "weights" / "crash", tmp_path / "restored")
    with pytest.raises(ValueError, match="already holds a run"):
        restore_run(tmp_path / "weights" / "crash", tmp_path / "restored")
    resumed = train(config(tmp_path / "restored"), resume=True)
    assert resumed.state.step == reference.state.step
    assert [r["step"] for r in read_rows(tmp_path / "restored" / "steps.csv")] == \
        [r["step"] for r in read_rows(tmp_path / "ref" / "steps.csv")]
    ref_state = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.allclose(value.float(), ref_state[name].float(), rtol=0.05, atol=2e-3), name


def test_archive_of_a_finished_run_keeps_the_best_model_only(short_run, tmp_path):
    out, result = short_run
    archive = pack_run(out, tmp_path / "archive")
    assert archive.finished and "last.pt" not in archive.files and "best.pt" in archive.files
    restore_run(tmp_path / "archive", tmp_path / "back")
    assert not (tmp_path / "back" / "last.pt").exists()
    original, restored = load_model(out / "best.pt"), load_model(tmp_path / "back" / "best.pt")
    image = make_phantom(7, 64).image
    answers = []
    for model in (original, restored):
        predictor = Predictor(model)
        predictor.set_image(image)
        answers.append(predictor.predict(box=[10, 10, 40, 40], return_logits=True)[2])
    assert torch.allclose(torch.as_tensor(answers[0]), torch.as_tensor(answers[1]), atol=0.05)

    damaged = tmp_path / "archive" / "best.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match=r"best\.pt: sha256 differs"):
        restore_run(tmp_path / "archive", tmp_path / "again")
    with pytest.raises(FileNotFoundError, match="not a run archive"):
        restore_run(out, tmp_path / "again")


def test_committed_run_archives_are_intact_and_load(tmp_path):
    manifests = sorted((REPO / "weights").rglob("ARCHIVE.json"))
    if not manifests:
        pytest.skip("no run archive is committed under weights/")
    for i, manifest in enumerate(manifests):
        assert "best.pt" in check_archive(manifest.parent)["files"], manifest
        restore_run(manifest.parent, tmp_path / str(i))
        assert isinstance(load_model(tmp_path / str(i) / "best.pt"), SAM2ImageModel), manifest
