"""`uniultra auto train`: a short run on phantoms (empty masks included), the loss, config errors.

Random "mini" weights at 128 px on tiny phantom sets, one torch thread.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from uniultra.auto.config import AutoTrainConfig, load_auto_config
from uniultra.auto.trainer import auto_loss, build_auto_model, mark_trainable, train_auto
from uniultra.cli import main
from uniultra.config_io import ConfigError
from uniultra.engine.config import DataEntry, PhantomSpec
from uniultra.engine.data import ensure_phantoms
from uniultra.engine.run_archive import pack_run, restore_run
from uniultra.inference.loading import load_auto_model, load_model
from uniultra.models.auto_checkpoint import save_auto_model
from uniultra.models.image_model import SAM2ImageModel

SIZE = 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory):
    """Two phantom sets (two modalities); the first has two training images with an EMPTY mask."""
    root = tmp_path_factory.mktemp("data")
    entries = [
        {"name": "pa", "path": str(root / "pa"), "phantom": {"n": 14, "seed": 0, "size": SIZE, "val_fraction": 0.3}},
        {"name": "pb", "path": str(root / "pb"), "phantom": {"n": 10, "seed": 1, "size": SIZE, "kind": "cyst",
                                                              "val_fraction": 0.3}},
    ]
    for entry in entries:
        spec = PhantomSpec(**entry["phantom"])
        ensure_phantoms(DataEntry(path=entry["path"], name=entry["name"], phantom=spec), root)
    for stem in ("phantom_0000", "phantom_0001"):
        path = root / "pa" / "masks" / f"{stem}.png"
        Image.fromarray(np.zeros_like(np.asarray(Image.open(path)))).save(path)
    return entries


def run_config(out_dir, entries, **changes) -> AutoTrainConfig:
    document = {
        "model": {"base": "preset:mini", "image_size": SIZE},
        "data": entries,
        "optim": {"lr": 1e-3, "batch_size": 4, "epochs": 1, "warmup_steps": 0},
        "out_dir": str(out_dir), "cache_dir": str(out_dir / "cache"), "threads": 1, "progress": False,
        "log_every": 1, "val_batch_size": 4,
        **changes,
    }
    return AutoTrainConfig.from_dict(document, source="test")


def test_one_epoch_writes_a_loadable_best_checkpoint_and_logs(phantom_sets, tmp_path):
    out = tmp_path / "run"
    result = train_auto(run_config(out, phantom_sets))
    assert result.state.epoch == 1 and result.state.step == (9 + 7) // 4
    for name in ("best.pt", "last.pt", "steps.csv", "epochs.csv", "log.json", "curves.png"):
        assert (out / name).is_file(), name
    model = load_auto_model(out / "best.pt")
    assert model.config.modalities == ("pa", "pb") and model.modality_decoder.channels == 2
    meta = torch.load(out / "best.pt", weights_only=True)["meta"]
    assert meta["modalities"] == ["pa", "pb"] and meta["epoch"] == 1
    assert 0.0 <= meta["val_dice"] <= 1.0 and len(meta["base"]["sha256"]) == 64
    assert meta["train"]["config"]["model"]["base"] == "preset:mini"
    assert type(load_model(out / "best.pt")) is SAM2ImageModel
    log = json.loads((out / "log.json").read_text())
    assert log["data"]["train"]["pa"] == {"images": 9, "empty_masks": 2}  # empty masks are trained on
    assert set(log["epochs"][0]) >= {"val_dice", "val_dice_pa", "val_dice_pb", "train_loss"}
    features = sorted(p.name for p in (out / "cache" / "auto-features").glob("*.npy"))
    assert len(features) == 4 * 3  # 2 sets x (train, val) x (embed, s0, s1)
    # Packed for a repository (uniultra archive): the auto checkpoint and logs, not the feature cache.
    archive = pack_run(out, tmp_path / "archive")
    assert archive.finished and set(archive.files) == {"best.pt", "steps.csv", "epochs.csv", "log.json", "curves.png"}
    restore_run(tmp_path / "archive", tmp_path / "back")
    back = load_auto_model(tmp_path / "back" / "best.pt")
    assert back.config.modalities == ("pa", "pb")
    assert torch.load(tmp_path / "back" / "best.pt", weights_only=True)["meta"]["val_dice"] == meta["val_dice"]


def test_cached_features_are_reused_and_a_run_resumes(phantom_sets, tmp_path):
    out = tmp_path / "run"
    config = run_config(out, phantom_sets)
    train_auto(config)
    cache = out / "cache" / "auto-features"
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    with pytest.raises(ValueError, match="already holds a run"):
        train_auto(config)
    result = train_auto(config.replace(optim=dataclasses.replace(config.optim, epochs=2)), resume=True)
    assert result.state.epoch == 2
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == stamps


def test_shared_query_mode_has_one_channel(phantom_sets, tmp_path):
    config = run_config(tmp_path / "shared", phantom_sets, model={"base": "preset:mini", "image_size": SIZE,
                                                                  "modality_decoder": False, "train_decoder": False})
    model, _ = build_auto_model(config)
    trained = mark_trainable(model, config)
    assert model.modality_decoder.channels == 1 and model.modality_index("pb") == 0
    assert not any(name.startswith("base.") for name in trained)


def test_loss_decreases_on_a_fixed_batch(phantom_sets, tmp_path):
    # The bundled (trained) base at its 256 px: random weights learn too slowly for a short check.
    config = run_config(tmp_path, phantom_sets, model={"base": "default"})
    model, _ = build_auto_model(config)
    size = model.image_size
    optimizer = torch.optim.Adam(list(mark_trainable(model, config).values()), lr=1e-3)
    torch.manual_seed(0)
    images = torch.rand(4, 3, size, size)
    masks = torch.zeros(4, size, size)
    masks[0, 60:140, 80:180] = 1
    masks[1, 20:80, 20:100] = 1
    masks[2, 120:240, 120:200] = 1  # sample 3 stays empty: "nothing here" is a target too
    modality = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        features = model.encode_image(model.normalize(images))
    model.train()
    losses = []
    for _ in range(12):
        loss, _ = auto_loss(model.decode_auto(features, modality), masks, 32, config.loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_configs_name_the_file(tmp_path, phantom_sets, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {base: default, colour: red}\ndata: [{path: x}]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.colour: unknown key"):
        load_auto_config(bad)
    assert main(["auto", "train", "--config", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    bad.write_text("data: [{path: x}]\nmodel: {patch_size: 24}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.patch_size"):
        load_auto_config(bad)
    bad.write_text("data: [{path: x}]\naugment: {hflip: 0.5}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*freeze_encoder"):
        load_auto_config(bad)
    bad.write_text("model: {base: default}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: data: no dataset"):
        load_auto_config(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        train_auto(run_config(tmp_path / "r", phantom_sets, model={"base": str(tmp_path / "missing.pt")}))


def test_the_shipped_configs_are_valid():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs" / "cpu"
    universal = load_auto_config(configs / "auto-universal.yaml")
    shared = load_auto_config(configs / "auto-universal-shared.yaml")
    assert universal.modalities == ("busi", "ddti", "tg3k") and universal.model.modality_decoder
    assert not shared.model.modality_decoder
    assert universal.replace(model=shared.model, out_dir=shared.out_dir) == shared


def test_init_head_starts_a_run_from_a_finished_head(phantom_sets, tmp_path):
    first = train_auto(run_config(tmp_path / "first", phantom_sets)).model
    first.attach_presence_probe()  # a file whose head has a probe: dropped for a run that fits none
    first.presence_probe.weight.normal_()
    save_auto_model(first, tmp_path / "head.pt")
    warm = run_config(tmp_path / "warm", phantom_sets, model={"base": "preset:mini", "image_size": SIZE,
                                                              "init_head": str(tmp_path / "head.pt"),
                                                              "freeze_encoder": False},
                      augment={"hflip": 0.5})
    model, _ = build_auto_model(warm)
    assert model.presence_probe is None
    want = {k: v for k, v in first.head_state().items() if not k.startswith("presence_probe.")}
    got = model.head_state()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    cold, _ = build_auto_model(run_config(tmp_path / "cold", phantom_sets))
    key = "prompt_generator.score.0.weight"
    assert not torch.equal(cold.head_state()[key], want[key])


def test_init_head_refuses_other_channels_and_missing_files(phantom_sets, tmp_path):
    train_auto(run_config(tmp_path / "first", phantom_sets))
    best = str(tmp_path / "first" / "best.pt")
    swapped = run_config(tmp_path / "swapped", phantom_sets[::-1],
                         model={"base": "preset:mini", "image_size": SIZE, "init_head": best})
    with pytest.raises(ValueError, match=r"best\.pt: its channels \['pa', 'pb'\] are not this run's \['pb', 'pa'\]"):
        build_auto_model(swapped)
    missing = run_config(tmp_path / "missing", phantom_sets,
                         model={"base": "preset:mini", "image_size": SIZE, "init_head": str(tmp_path / "no.pt")})
    with pytest.raises(FileNotFoundError, match=r"init_head .*no\.pt does not exist"):
        build_auto_model(missing)
