"""`uniultra auto train | calibrate | fit-presence`: the automatic (no-prompt) head (docs/auto.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from uniultra.commands.train import add_out_option, add_run_options, command_line, run_overrides, set_overrides


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "auto",
        help="automatic (no-prompt) segmentation: train its head",
        description="The automatic segmentation head (SPEC 5): a self-patch prompt generator and one decoding "
                    "channel per modality on top of a box-promptable model.",
    )
    sub = parser.add_subparsers(dest="auto_command", metavar="ACTION", required=True)
    train = sub.add_parser(
        "train",
        help="train the automatic head on a base model from a YAML config",
        description="Train the automatic head from a YAML config (relative paths are resolved against the "
                    "current directory). Writes OUT/{best.pt,last.pt,steps.csv,epochs.csv,log.json,curves.png}.",
    )
    train.add_argument("--config", required=True, type=Path, help="YAML config (e.g. configs/cpu/auto-universal.yaml)")
    add_out_option(train)
    train.add_argument("--epochs", type=int, default=None, help="number of epochs (overrides optim.epochs)")
    add_run_options(train, set_example="model.modality_decoder=false",
                    progress_help="no progress bars (lines every log_every steps instead)")
    train.set_defaults(func=run_auto_train)
    _finished_run_parser(
        sub, "calibrate", run_auto_calibrate,
        help="choose the presence gate of an automatic-head checkpoint on the val splits",
        description="Choose the presence-probability threshold below which the automatic head answers 'nothing "
                    "here', on the val splits of the config's datasets (never the test split), and rewrite "
                    "the checkpoint with it. `uniultra auto train` does this after its last epoch.",
    )
    _finished_run_parser(
        sub, "fit-presence", run_auto_fit_presence,
        help="fit a presence probe on the encoder features of an automatic-head checkpoint, then its gate",
        description="Fit the presence probe (a logistic regression per decoding channel on pooled encoder "
                    "features, uniultra.models.presence_probe) on the train splits of the config's datasets, "
                    "its strength chosen on the val splits; then choose the presence gate on val as `calibrate` "
                    "does. The checkpoint is rewritten in place with the probe and the gate. `uniultra auto "
                    "train` does this itself when the config sets model.presence_probe: true.",
    )


def _finished_run_parser(sub, name: str, func, *, help: str, description: str) -> None:
    """An action on a finished run: its config (for the data) and the checkpoint it rewrites."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("--config", required=True, type=Path, help="the YAML config the head was trained with")
    parser.add_argument("--model", required=True, type=Path, help="auto checkpoint (rewritten in place)")
    parser.add_argument("--cross-fit", type=int, default=None, metavar="K",
                        help="choose the gate on the val images AND the train images of every channel with a "
                             "fitted presence probe, each scored by a probe refitted without its part of a "
                             "K-fold split (BUSI: 109 normal train scans besides its 10 val ones); 0: val only; "
                             "default: the config's model.presence_cross_fit")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                        help="override a config key as `auto train` did, e.g. --set model.base=BASE.safetensors "
                             "(value read as YAML; repeatable)")
    parser.set_defaults(func=func)



def run_auto_train(args: argparse.Namespace) -> int:
    from uniultra.auto.config import load_auto_config
    from uniultra.auto.trainer import train_auto

    config = load_auto_config(args.config, run_overrides(args))
    result = train_auto(config, resume=args.resume, command=command_line(), source=str(args.config))
    state = result.state
    best = (f"; best val Dice {100 * state.best_score:.2f} at epoch {state.best_epoch}"
            if state.best_score is not None else "")
    print(f"done: {state.epoch} epochs, {state.step} steps{best}; {result.out_dir / 'best.pt'}")
    return 0


def run_auto_calibrate(args: argparse.Namespace) -> int:
    from uniultra.auto.config import check_cross_fit, load_auto_config
    from uniultra.auto.trainer import AutoTrainer, calibration_text
    from uniultra.models.auto_checkpoint import fitted_probe_channels
    from uniultra.models.checkpoint import read_checkpoint

    config = on_cached_features(load_auto_config(args.config, set_overrides(args.set_options)), args.model)
    folds = check_cross_fit(config.model.presence_cross_fit if args.cross_fit is None else args.cross_fit)
    # Only the datasets whose probe was fitted are scored out of fold: the others are never gated.
    fitted = fitted_probe_channels(read_checkpoint(args.model).get("meta")) if folds else ()
    trainer = AutoTrainer(config, source=str(args.config))
    # A head without per-dataset channels has one probe ("shared") for every dataset.
    trainer.setup_validation(train=bool(fitted), native_train=True,
                             train_only=None if "shared" in fitted else fitted)
    if not trainer.val_splits:
        raise ValueError(f"{args.config}: no data entry has a val split to calibrate on")
    print(calibration_text(trainer.calibrate_presence(args.model, cross_fit=folds)))
    return 0


def run_auto_fit_presence(args: argparse.Namespace) -> int:
    from uniultra.auto.config import check_cross_fit, load_auto_config
    from uniultra.auto.trainer import AutoTrainer, calibration_text, probe_text

    config = on_cached_features(load_auto_config(args.config, set_overrides(args.set_options)), args.model)
    folds = check_cross_fit(config.model.presence_cross_fit if args.cross_fit is None else args.cross_fit)
    trainer = AutoTrainer(config, source=str(args.config))
    trainer.setup_validation(train=True, native_train=bool(folds))
    if not trainer.train_splits:
        raise ValueError(f"{args.config}: no data entry has a train split to fit the presence probe on")
    print(probe_text(trainer.fit_presence_probe(args.model)))
    if trainer.val_splits:
        print(calibration_text(trainer.calibrate_presence(args.model, cross_fit=folds)))
    return 0


def on_cached_features(config, checkpoint: Path):
    """`config` as `calibrate` and `fit-presence` read it: for a run that trained its encoder
    (`model.freeze_encoder: false`), the checkpoint's trained encoder is the frozen base whose
    features are cached and scored."""
    from uniultra.auto.trainer import frozen_features_config

    return config if config.model.freeze_encoder else frozen_features_config(config, checkpoint)
