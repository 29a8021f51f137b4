"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: small models run faster so, and CI's 2 cores stay free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A model small enough to train a step in milliseconds (the mini's layout, narrower).
SMALL_MODEL = {"name": "c8", "trunk": {"embed_dim": 8}, "neck": {"d_model": 32},
               "decoder": {"transformer_mlp_dim": 64, "iou_head_hidden_dim": 32}}


@pytest.fixture
def phantoms_and_small_base(tmp_path):
    """Six phantom pairs split 4 train / 2 val, and a randomly initialised SMALL_MODEL at 64 px saved as a
    base checkpoint: (dataset root, base checkpoint path, the model's config section)."""
    import json

    from uniultra.data.phantom import write_phantom_dataset
    from uniultra.engine.config import TrainConfig
    from uniultra.engine.trainer import build_model
    from uniultra.models.checkpoint import save_model

    root = write_phantom_dataset(tmp_path / "ph", 6, seed=3, size=96, n_lesions=1)
    stems = [f"phantom_{i:04d}" for i in range(6)]
    (root / "splits.json").write_text(json.dumps({"train": stems[:4], "val": stems[4:], "test": []}))
    torch.manual_seed(0)
    config = TrainConfig.from_dict({"model": {"preset": "mini", "image_size": 64, "config": SMALL_MODEL},
                                    "data": [{"path": str(root)}]}, "base")
    base = tmp_path / "base.pt"
    save_model(build_model(config, "base")[0], base)
    return root, base, SMALL_MODEL
