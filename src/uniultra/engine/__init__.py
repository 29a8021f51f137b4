"""Training engine: `uniultra train` (see docs/training.md).

    from uniultra.engine.config import load_train_config
    from uniultra.engine.trainer import train

    result = train(load_train_config("configs/cpu/adapt-busi-ch_adapter.yaml"))
"""
