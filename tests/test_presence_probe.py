"""The presence probe of the automatic head: the module, its fit, checkpoints and the training path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from test_auto_train import phantom_sets, run_config  # noqa: F401 (phantom_sets is a fixture)
from uniultra.auto.presence_fit import (
    MIN_VAL_AUC,
    ChannelData,
    fit_presence_probe,
    logistic_regression,
    out_of_fold_logits,
    roc_auc,
)
from uniultra.auto.trainer import train_auto
from uniultra.cli import main
from uniultra.inference.loading import load_auto_model, pack_model
from uniultra.models.auto_checkpoint import PROBE_META, save_auto_model
from uniultra.models.auto_segmenter import AutoHeadConfig, AutoSegmenter, presence
from uniultra.models.checkpoint import read_checkpoint
from uniultra.models.image_model import SAM2ImageModel
from uniultra.models.presence_probe import UNFITTED_LOGIT, PresenceProbe, pooled_statistics, statistics_size

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 128
MODALITIES = ("busi", "ddti", "tg3k")


def make_model() -> AutoSegmenter:
    torch.manual_seed(0)
    return AutoSegmenter(SAM2ImageModel.from_preset("mini", SIZE), AutoHeadConfig(MODALITIES)).eval()


def features_of(model: AutoSegmenter, n: int):
    torch.manual_seed(2)
    with torch.no_grad():
        return model.encode_image(model.normalize(torch.rand(n, 3, SIZE, SIZE)))


def separable(n: int, size: int, seed: int, shift: float = 2.0) -> ChannelData:
    """Statistics whose first coordinate is `shift` higher on present images (a third are absent)."""
    generator = torch.Generator().manual_seed(seed)
    present = torch.arange(n) % 3 != 0
    statistics = torch.randn(n, size, generator=generator)
    statistics[:, 0] += shift * present
    return ChannelData(statistics, present)


def test_the_probe_reads_pooled_encoder_statistics_per_channel():
    model = make_model()
    probe = model.attach_presence_probe()
    features = features_of(model, 3)
    stats = pooled_statistics(features.image_embed, features.high_res_feats)
    assert stats.shape == (3, statistics_size(256, (32, 64)))
    with torch.no_grad():
        # Unfitted: every channel says "present".
        assert torch.equal(probe(features.image_embed, features.high_res_feats, torch.tensor([0, 1, 2])),
                           torch.full((3,), UNFITTED_LOGIT))
        probe.center.copy_(stats.mean(0))
        probe.scale.copy_(stats.std(0) + 1.0)
        probe.weight[1] = torch.randn(stats.shape[1])
        probe.bias[1] = -0.5
        got = model.decode_auto(features, torch.tensor([1, 1, 0])).presence_logits
    want = ((stats - probe.center) / probe.scale) @ probe.weight[1] - 0.5
    assert torch.allclose(got[:2], want[:2], atol=1e-4) and got[2] == UNFITTED_LOGIT


def test_logistic_regression_is_the_balanced_l2_one():
    sklearn = pytest.importorskip("sklearn.linear_model")
    data = separable(90, 6, seed=0, shift=1.0)
    w, b = logistic_regression(data.statistics, data.present.float(), c=0.1)
    reference = sklearn.LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000, tol=1e-10)
    reference.fit(data.statistics.numpy(), data.present.numpy())
    assert np.allclose(w.numpy(), reference.coef_[0], atol=1e-3)
    assert abs(float(b) - reference.intercept_[0]) < 1e-3


def test_fit_keeps_only_channels_it_can_check_and_that_separate():
    size = 10
    probe = PresenceProbe(2, (1, 1), channels=4)  # 3 x 2 + 2 x (1 + 1) = 10 statistics
    assert statistics_size(2, (1, 1)) == size
    noise = separable(60, size, seed=5, shift=0.0)  # labels unrelated to the statistics
    train = {0: separable(60, size, seed=1), 1: ChannelData(torch.randn(30, size), torch.ones(30, dtype=torch.bool)),
             2: noise, 3: separable(60, size, seed=3)}
    val = {0: separable(30, size, seed=2), 2: separable(30, size, seed=6, shift=0.0)}
    report = fit_presence_probe(probe, train, val)
    assert report["0"]["fitted"] and report["0"]["val_auc"] > 0.9
    assert report["0"]["train_absent"] == 20 and report["0"]["train_present"] == 40
    assert not report["1"]["fitted"] and "train" in report["1"]["reason"]  # no empty image to learn from
    assert not report["2"]["fitted"] and report["2"]["val_auc"] < MIN_VAL_AUC
    assert not report["3"]["fitted"] and "val" in report["3"]["reason"]  # nothing to check it on
    assert torch.all(probe.weight[1:] == 0) and torch.all(probe.bias[1:] == UNFITTED_LOGIT)
    held = val[0]
    scores = ((held.statistics - probe.center) / probe.scale) @ probe.weight[0] + probe.bias[0]
    assert roc_auc(scores.numpy(), held.present.numpy()) == pytest.approx(report["0"]["val_auc"])


def test_out_of_fold_logits_score_each_image_as_unseen():
    # Pure noise in many dimensions: a weakly regularised probe separates its own train images, but
    # scores images it was fitted without at chance; on separable data the folds still separate.
    noise = separable(60, 40, seed=7, shift=0.0)
    w, b = logistic_regression(noise.statistics, noise.present.float(), c=10.0)
    labels = noise.present.numpy()
    assert roc_auc((noise.statistics @ w + b).numpy(), labels) > 0.99
    held_out = out_of_fold_logits(noise.statistics, noise.present, 10.0, folds=4)
    assert roc_auc(held_out.numpy(), labels) < 0.75
    data = separable(60, 8, seed=4, shift=2.5)
    logits = out_of_fold_logits(data.statistics, data.present, 0.1, folds=3, seed=1)
    assert roc_auc(logits.numpy(), data.present.numpy()) > 0.9
    assert torch.equal(logits, out_of_fold_logits(data.statistics, data.present, 0.1, folds=3, seed=1))
    with pytest.raises(ValueError, match="at least 2 folds"):
        out_of_fold_logits(data.statistics, data.present, 0.1, folds=1)
    with pytest.raises(ValueError, match="at least 30 images of each class"):
        out_of_fold_logits(data.statistics, data.present, 0.1, folds=30)


def test_roc_auc_counts_ties_half_and_needs_both_classes():
    labels = np.array([True, True, False, False])
    assert roc_auc(np.array([0.9, 0.5, 0.5, 0.1]), labels) == pytest.approx(0.875)
    assert roc_auc(np.array([0.1, 0.2]), np.array([True, True])) is None


def test_an_attached_probe_round_trips_and_packs(tmp_path):
    model = make_model()
    probe = model.attach_presence_probe()
    with torch.no_grad():
        probe.weight.normal_(0, 0.01)
        probe.bias.copy_(torch.tensor([-1.0, 0.5, UNFITTED_LOGIT]))
    path = tmp_path / "auto.pt"
    save_auto_model(model, path)
    packed = pack_model(path, tmp_path / "packed.safetensors", half=True)
    features = features_of(model, 2)
    for file, tolerance in ((path, 0.0), (packed, 2e-2)):
        loaded = load_auto_model(file)
        assert loaded.config.presence_probe
        with torch.no_grad():
            want = presence(model.decode_auto(features, torch.tensor([0, 1])))
            got = presence(loaded.decode_auto(features, torch.tensor([0, 1])))
        assert torch.allclose(got, want, atol=tolerance)


def test_training_with_a_probe_and_the_command_write_its_report(phantom_sets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    config = run_config(out, phantom_sets, model={"base": "preset:mini", "image_size": SIZE, "presence_probe": True})
    train_auto(config)
    report = read_checkpoint(out / "best.pt")["meta"][PROBE_META]
    # The phantom sets have 2 (pa) and 0 (pb) empty train images: too few to fit; both stay "present".
    assert set(report) == {"pa", "pb"} and not any(r["fitted"] for r in report.values())
    assert load_auto_model(out / "best.pt").config.presence_probe

    plain = tmp_path / "plain"
    train_auto(run_config(plain, phantom_sets))
    config_file = tmp_path / "auto.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(run_config(plain, phantom_sets).to_dict()))
    assert main(["auto", "fit-presence", "--config", str(config_file), "--model", str(plain / "best.pt")]) == 0
    meta = read_checkpoint(plain / "best.pt")["meta"]
    assert PROBE_META in meta and "presence_calibration" in meta
    assert load_auto_model(plain / "best.pt").presence_probe is not None


def test_calibrating_on_cross_fitted_train_images(phantom_sets, tmp_path, capsys):  # noqa: F811
    import yaml

    out = tmp_path / "run"
    config = run_config(out, phantom_sets, model={"base": "preset:mini", "image_size": SIZE, "presence_probe": True})
    train_auto(config)
    checkpoint = read_checkpoint(out / "best.pt")
    meta = checkpoint["meta"]
    # pa's 2 empty train images are too few for `fit-presence`; mark it fitted as if they had sufficed.
    meta[PROBE_META]["pa"] = {"fitted": True, "C": 0.1}
    save_auto_model(load_auto_model(out / "best.pt"), out / "best.pt", meta=meta)
    config_file = tmp_path / "auto.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    command = ["auto", "calibrate", "--config", str(config_file), "--model", str(out / "best.pt")]
    assert main([*command, "--set", "model.presence_cross_fit=2"]) == 0
    calibration = read_checkpoint(out / "best.pt")["meta"]["presence_calibration"]
    assert calibration["split"] == "val + train of pa scored by 2-fold cross-fitted presence probes"
    before = meta["presence_calibration"]["per_dataset"]
    # pa: its val images and all its train images (2 of them empty); pb (no fitted probe): val only.
    assert calibration["per_dataset"]["pa"]["n"] == 14 > before["pa"]["n"]
    assert calibration["per_dataset"]["pa"]["n_empty_truth"] == 2 + before["pa"]["n_empty_truth"]
    assert calibration["per_dataset"]["pb"]["n"] == before["pb"]["n"]
    assert main([*command, "--set", "model.presence_cross_fit=2", "--cross-fit", "0"]) == 0  # the flag wins
    assert read_checkpoint(out / "best.pt")["meta"]["presence_calibration"]["split"] == "val"
    assert main([*command, "--cross-fit", "1"]) != 0
    assert "cross-fitting takes 0 (val only) or a number of folds >= 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="presence_cross_fit needs model.presence_probe"):
        run_config(tmp_path, phantom_sets, model={"base": "preset:mini", "image_size": SIZE, "presence_cross_fit": 5})


def test_training_with_cross_fitting_and_no_fitted_channel_calibrates_on_val(phantom_sets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train_auto(run_config(out, phantom_sets, model={"base": "preset:mini", "image_size": SIZE,
                                                    "presence_probe": True, "presence_cross_fit": 3}))
    meta = read_checkpoint(out / "best.pt")["meta"]
    assert not any(r["fitted"] for r in meta[PROBE_META].values())  # too few empty train images
    assert meta["presence_calibration"]["split"] == "val"


def test_a_run_that_trains_its_encoder_fits_the_probe_on_the_trained_encoder(tmp_path, phantom_sets):  # noqa: F811
    out = tmp_path / "run"
    config = run_config(out, phantom_sets, model={"base": "preset:mini", "image_size": SIZE, "presence_head": True,
                                                  "presence_probe": True, "freeze_encoder": False})
    train_auto(config)
    best = out / "best.pt"
    meta = read_checkpoint(best)["meta"]
    assert set(meta[PROBE_META]) == {"pa", "pb"} and meta["presence_calibration"]["split"] == "val"
    model = load_auto_model(best)
    assert model.presence_probe is not None
    trained = model.base.image_encoder.state_dict()
    torch.manual_seed(config.seed)  # the preset base's init (uniultra.auto.trainer.load_base)
    start = SAM2ImageModel.from_preset("mini", SIZE).image_encoder.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in trained.items())  # the encoder did train
    # The finished run's config calibrates again: its features are the checkpoint's encoder's.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["auto", "calibrate", "--config", str(path), "--model", str(best)]) == 0
