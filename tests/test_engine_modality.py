"""uniultra.engine with a modality controller: each sample trains and validates under its data
entry's modality.

test_engine's tiny custom SAM2 (Hiera C=8) at 64 px with a controller for two phantom datasets,
`pa` and `pb`, handed to the engine as its base checkpoint; one torch thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from run_outputs import read_rows
from test_engine import TINY_MODEL
from test_modality_controller import randomise
from uniultra.config_io import from_dict, merge_dicts
from uniultra.data.phantom import write_phantom_dataset
from uniultra.engine import trainer as engine
from uniultra.engine.config import TrainConfig
from uniultra.engine.trainer import train
from uniultra.inference.loading import load_model
from uniultra.models.checkpoint import read_checkpoint, save_model
from uniultra.models.config import ImageModelConfig, preset
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft.controller import ControllerConfig, attach_modality_controller, controller_config

MODALITIES = ("pa", "pb")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """`pa` and `pb`: 10 phantoms each, 8 train and 2 val."""
    roots = {}
    for i, name in enumerate(MODALITIES):
        root = write_phantom_dataset(tmp_path_factory.mktemp("data") / name, 10, seed=i, size=64)
        stems = [f"phantom_{k:04d}" for k in range(10)]
        (root / "splits.json").write_text(json.dumps({"train": stems[:8], "val": stems[8:], "test": []}))
        roots[name] = root
    return roots


def tiny_model(controller_rows: list[int] | None) -> SAM2ImageModel:
    """The tiny model with a controller for pa and pb: zeroed (`[]`), non-zero in the listed rows,
    or no controller at all (None)."""
    torch.manual_seed(0)
    config = merge_dicts(preset("mini", 64).to_dict(), TINY_MODEL["config"])
    model = SAM2ImageModel(from_dict(ImageModelConfig, config))
    if controller_rows is not None:
        controllers = attach_modality_controller(model, MODALITIES, bottleneck=4)
        if controller_rows:
            randomise(controllers, rows=controller_rows)
    return model


def base_file(path: Path, controller_rows: list[int] | None) -> Path:
    model = tiny_model(controller_rows)
    meta = {"weights": "full"}
    if controller_rows is not None:
        meta["modality_controller"] = controller_config(model).to_dict()
    return save_model(model, path, meta=meta)


def run(out: Path, base: Path, data: list[Path], **settings) -> list[float]:
    """Train one epoch from `base`; the step losses."""
    train(TrainConfig.from_dict({
        "model": {"base": str(base), "image_size": 64},
        "data": [{"path": str(d)} for d in data],
        "optim": {"lr": 1e-3, "epochs": 1, "batch_size": 4, "warmup_steps": 0},
        "out_dir": str(out), "progress": False, "log_every": 1000, "threads": 1, **settings,
    }, "test"))
    return [float(r["loss"]) for r in read_rows(out / "steps.csv")]


def test_a_modality_s_controller_changes_only_that_modality_s_training(phantoms, tmp_path):
    zero = base_file(tmp_path / "zero.pt", [])
    pb_only = base_file(tmp_path / "pb.pt", [1])  # pb's tokens and MLP non-zero, pa's still zero
    plain = base_file(tmp_path / "plain.pt", None)
    pa = run(tmp_path / "pa-zero", zero, [phantoms["pa"]])
    assert len(pa) == 2
    # pa's samples never read pb's rows, and pb's rows get no gradient: the whole run is the same.
    assert run(tmp_path / "pa-pb", pb_only, [phantoms["pa"]]) == pa
    # A zeroed controller is the shared network: same first loss as the model without one.
    assert run(tmp_path / "pa-plain", plain, [phantoms["pa"]])[0] == pa[0]
    pb = run(tmp_path / "pb-zero", zero, [phantoms["pb"]])
    assert run(tmp_path / "pb-pb", pb_only, [phantoms["pb"]])[0] != pb[0]
    # best.pt records the controller and reloads with it.
    best = tmp_path / "pb-pb" / "best.pt"
    assert read_checkpoint(best)["meta"]["modality_controller"]["modalities"] == list(MODALITIES)
    assert controller_config(load_model(best)) == ControllerConfig(MODALITIES, 4)


def test_each_sample_of_a_mixed_batch_gets_its_entry_s_modality(phantoms, tmp_path, monkeypatch):
    """The ids given to the controller, per training and validation forward, against the data
    entries the batch's samples come from."""
    events: list[tuple[str, list]] = []
    real_step, real_use = engine.Trainer._train_step, engine.use_modality

    def train_step(self, batch, epoch):
        names = [self.train_set.sets[self.train_set.items[i][0]].name for i in batch.indices]
        events.append(("samples", [MODALITIES.index(n) for n in names]))
        return real_step(self, batch, epoch)

    def use_modality(model, ids):
        events.append(("ids", None if ids is None else ids.tolist()))
        return real_use(model, ids)

    monkeypatch.setattr(engine.Trainer, "_train_step", train_step)
    monkeypatch.setattr(engine, "use_modality", use_modality)
    run(tmp_path / "mixed", base_file(tmp_path / "zero.pt", []), [phantoms["pa"], phantoms["pb"]], val_batch_size=3)
    steps = [(events[k][1], events[k + 1][1]) for k in range(len(events)) if events[k][0] == "samples"]
    assert len(steps) == 4 and all(samples == ids for samples, ids in steps)
    assert any(len(set(samples)) == 2 for samples, _ in steps)  # some batch mixes pa and pb
    # Validation: 2 pa and 2 pb images in chunks of 3.
    val = [ids for kind, ids in events[-2:]]
    assert val == [[0, 0, 1], [1]]


def test_a_label_the_controller_does_not_know_is_an_error(phantoms, tmp_path):
    base = base_file(tmp_path / "zero.pt", [])
    with pytest.raises(ValueError, match=r"test.yaml: the data labels \['other'\] are no modality.*\['pa', 'pb'\]"):
        train(TrainConfig.from_dict({
            "model": {"base": str(base), "image_size": 64},
            "data": [{"path": str(phantoms["pa"])}, {"path": str(phantoms["pb"]), "name": "other"}],
            "out_dir": str(tmp_path / "bad"), "progress": False, "threads": 1,
        }, "test"), source="test.yaml")
    assert not (tmp_path / "bad" / "steps.csv").exists()
