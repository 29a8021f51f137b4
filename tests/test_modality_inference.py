"""Inference under a modality with a modality controller: `Predictor(modality=...)`,
`uniultra evaluate` (dataset folder name by default, `--modality` overrides) and `uniultra predict`.

Random-weight `mini` models with CH-Adapters at 64 px (test_modality_controller's), one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_modality_controller import MODALITIES, model_with_adapters, randomise
from uniultra.cli import main
from uniultra.data.phantom import make_phantom, write_phantom_dataset
from uniultra.inference.auto_predictor import choose_modality
from uniultra.inference.predictor import Predictor
from uniultra.models.checkpoint import save_model
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft.controller import attach_modality_controller, controller_config, use_modality

SIZE = 64
BOX = np.array([10.0, 12.0, 50.0, 44.0])

pytestmark = pytest.mark.usefixtures("one_thread")


def controller_model(nonzero: bool = True) -> SAM2ImageModel:
    model = model_with_adapters(size=SIZE)
    controllers = attach_modality_controller(model, MODALITIES, bottleneck=4)
    if nonzero:
        randomise(controllers)
    return model


def logits(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    predictor.set_image(image)
    return predictor.predict(box=BOX, return_logits=True)[0]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_phantom(3, (SIZE, SIZE)).image


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints (controller, plain) and two datasets, 'busi' (a modality) and 'other' (none)."""
    root = tmp_path_factory.mktemp("inference")
    model = controller_model()
    meta = {"weights": "full", "peft": model.peft_config.to_dict(),
            "modality_controller": controller_config(model).to_dict()}
    plain = model_with_adapters(size=SIZE)
    out = {"controller": save_model(model, root / "controller.pt", meta=meta),
           "plain": save_model(plain, root / "plain.pt", meta={"weights": "full", "peft": plain.peft_config.to_dict()})}
    for i, name in enumerate(("busi", "other")):
        out[name] = write_phantom_dataset(root / name, 2, seed=i, size=SIZE)
    return out


def test_predictor_encodes_under_its_modality(image):
    model = controller_model()
    shared = logits(Predictor(model), image)
    ddti = logits(Predictor(model, modality="ddti"), image)
    assert not np.array_equal(shared, ddti)
    predictor = Predictor(model, modality="ddti")
    predictor.modality = "busi"  # a settable attribute, for the next set_image
    busi = logits(predictor, image)
    assert not np.array_equal(busi, ddti)
    # What set_image caches is the encoder's output under that modality.
    x = predictor.preprocess(image)
    with torch.no_grad(), use_modality(model, "busi"):
        assert torch.equal(predictor._features.image_embed, model.encode_image(x).image_embed)
    with pytest.raises(ValueError, match=r"unknown modality 'xyz'.*busi.*ddti.*tg3k"):
        predictor.modality = "xyz"
    assert predictor.modality == "busi" and predictor.modality_choices == MODALITIES


def test_zeroed_controller_and_plain_models_ignore_the_modality(image):
    zeroed = controller_model(nonzero=False)
    assert np.array_equal(logits(Predictor(zeroed), image), logits(Predictor(zeroed, modality="tg3k"), image))
    plain = model_with_adapters(size=SIZE)
    predictor = Predictor(plain, modality="busi")  # no controller: only the shared network
    assert predictor.modality_choices == () and not predictor.selects_modality()
    assert np.array_equal(logits(predictor, image), logits(Predictor(plain), image))


def test_choice_follows_request_then_dataset_then_shared_network():
    predictor = Predictor(controller_model())
    assert choose_modality(predictor, None, "busi") == "busi"
    assert choose_modality(predictor, "tg3k", "busi") == "tg3k"
    assert choose_modality(predictor, None, "other") is None
    with pytest.raises(ValueError, match="unknown modality 'xyz'"):
        choose_modality(predictor, "xyz", "busi")


def evaluate(tmp_path: Path, files: dict[str, Path], model: str, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "results.json"
    code = main(["evaluate", "--model", str(files[model]), "--data", str(files["busi"]), "--data",
                 str(files["other"]), "--prompt", "box", "--out", str(out), "--no-progress", *extra])
    return code, json.loads(out.read_text()) if code == 0 else None


def test_evaluate_picks_the_dataset_name_and_modality_overrides(files, tmp_path, capsys):
    code, document = evaluate(tmp_path, files, "controller")
    assert code == 0
    assert {n: d["modality"] for n, d in document["datasets"].items()} == {"busi": "busi", "other": None}
    code, document = evaluate(tmp_path, files, "controller", "--modality", "ddti")
    assert code == 0 and "--modality ddti" in document["command"]
    assert {n: d["modality"] for n, d in document["datasets"].items()} == {"busi": "ddti", "other": "ddti"}
    capsys.readouterr()
    assert evaluate(tmp_path, files, "controller", "--modality", "xyz")[0] == 2
    err = capsys.readouterr().err
    assert "unknown modality 'xyz'" in err and "busi" in err and str(files["controller"]) in err
    assert evaluate(tmp_path, files, "plain", "--modality", "busi")[0] == 2
    assert "no automatic head and no modality controller" in capsys.readouterr().err


def test_predict_encodes_under_the_modality(files, image, tmp_path, capsys):
    from uniultra.inference.loading import load_model

    source = tmp_path / "scan.png"
    Image.fromarray(image).save(source)
    box = [str(v) for v in BOX]
    for modality in ("ddti", None):
        out = tmp_path / f"{modality}.png"
        extra = ["--modality", modality] if modality else []
        assert main(["predict", "--model", str(files["controller"]), "--image", str(source), "--box", *box,
                     "--out", str(out), *extra]) == 0
        predictor = Predictor(load_model(files["controller"]), modality=modality)
        predictor.set_image(image)
        expected = predictor.predict(box=BOX)[0][0]
        assert np.array_equal(np.asarray(Image.open(out)) > 0, expected)
    capsys.readouterr()
    assert main(["predict", "--model", str(files["controller"]), "--image", str(source), "--box", *box,
                 "--out", str(tmp_path / "x.png"), "--modality", "xyz"]) == 2
    assert "unknown modality 'xyz'" in capsys.readouterr().err
