"""Hiera trunk, FPN neck and image encoder: equivalence with the official SAM2 (1.1.0) modules,
parameter counts per preset, input-size validation and the small helpers they are built from.

The official modules are built directly (no hydra) with the arguments of the sam2.1 yaml configs,
given noisy weights (pos embeds are zeros and norms are ones at init, which would hide bugs), and
their state dicts are loaded into ours with strict=True.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from uniultra.models.config import PRESETS, ImageModelConfig, preset
from uniultra.models.hiera import Hiera, max_pool, window_partition, window_unpartition
from uniultra.models.image_encoder import ImageEncoder
from uniultra.models.position_encoding import PositionEmbeddingSine

TOL = 1e-4


def _official_encoder(cfg: ImageModelConfig) -> torch.nn.Module:
    """Official ImageEncoder with the same arguments as configs/sam2.1/sam2.1_hiera_*.yaml."""
    from sam2.modeling.backbones.hieradet import Hiera as OfficialHiera
    from sam2.modeling.backbones.image_encoder import FpnNeck as OfficialFpnNeck
    from sam2.modeling.backbones.image_encoder import ImageEncoder as OfficialImageEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine as OfficialSine

    t, n = cfg.trunk, cfg.neck
    trunk = OfficialHiera(
        embed_dim=t.embed_dim,
        num_heads=t.num_heads,
        stages=t.stages,
        global_att_blocks=t.global_att_blocks,
        window_spec=t.window_spec,
        window_pos_embed_bkg_spatial_size=t.window_pos_embed_bkg_spatial_size,
    )
    neck = OfficialFpnNeck(
        position_encoding=OfficialSine(num_pos_feats=n.d_model, normalize=True, temperature=10000),
        d_model=n.d_model,
        backbone_channel_list=list(trunk.channel_list),
        fpn_top_down_levels=list(n.fpn_top_down_levels),
        fpn_interp_model=n.fpn_interp_model,
    )
    return OfficialImageEncoder(trunk, neck, scalp=n.scalp)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # Pos embeds get O(1) noise so a wrong resize/tiling shows; the rest a small nudge.
            scale = 0.5 if "pos_embed" in name else 0.05
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _pair(name: str) -> tuple[torch.nn.Module, ImageEncoder]:
    torch.manual_seed(0)
    cfg = preset(name)  # built for 1024; the encoder takes any multiple of 32
    official = _official_encoder(cfg).eval()
    _perturb(official, seed=1)
    # Ours on the meta device, then take the official tensors: no second random init of big presets.
    with torch.device("meta"):
        ours = ImageEncoder(cfg).eval()
    ours.load_state_dict(official.state_dict(), strict=True, assign=True)
    return official, ours


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("tiny", (1024, 1024)),
        ("large", (256, 256)),
        # 320 -> token grids 80/40/20/10: windows 14 and 7 need padding, pos embed tiles 10x.
        ("mini", (320, 320)),
        ("tiny", (256, 384)),  # non-square
    ],
)
def test_matches_official(name: str, size: tuple[int, int]) -> None:
    pytest.importorskip("sam2")
    official, ours = _pair(name)

    # Same block schedule: windows (incl. the lagging first block of a stage), globals, q-pool.
    for i, (o, u) in enumerate(zip(official.trunk.blocks, ours.trunk.blocks, strict=True)):
        ours_dims = (u.norm1.normalized_shape[0], u.norm2.normalized_shape[0])
        assert (o.window_size, o.dim, o.dim_out) == (u.window_size, *ours_dims), i
        assert (o.q_stride is not None) == (u.q_stride is not None), i
        assert o.attn.num_heads == u.attn.num_heads, i

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, *size, generator=gen)
    with torch.no_grad():
        want, got = official(x), ours(x)
    assert set(got) == set(want)
    fpn = _max_diff(want["backbone_fpn"], got["backbone_fpn"])
    pos = _max_diff(want["vision_pos_enc"], got["vision_pos_enc"])
    feat = _max_diff([want["vision_features"]], [got["vision_features"]])
    assert len(got["backbone_fpn"]) == 3
    h, w = size
    assert got["vision_features"].shape == (1, 256, h // 16, w // 16)
    assert got["vision_features"].abs().max() > 0.1  # not a degenerate all-zero comparison
    assert fpn < TOL and pos < TOL and feat < TOL, (fpn, pos, feat)


def test_trunk_stage_outputs_match_official() -> None:
    pytest.importorskip("sam2")
    official, ours = _pair("mini")
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = official.trunk(x), ours.trunk(x)
    assert [tuple(t.shape) for t in got] == [(2, 16 * 2**i, 64 // 2**i, 64 // 2**i) for i in range(4)]
    assert _max_diff(want, got) < TOL


# SPEC: trunk + neck parameters, in millions.
SPEC_PARAMS = {"tiny": 27.22, "small": 34.32, "base_plus": 69.11, "large": 212.70, "mini": 0.820}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        enc = ImageEncoder(preset(name))
    count = sum(p.numel() for p in enc.parameters()) / 1e6
    assert abs(count - SPEC_PARAMS[name]) < 0.005, count


@pytest.mark.parametrize("size", [(64, 64), (20, 30), (1, 5)])
def test_position_encoding_matches_official(size: tuple[int, int]) -> None:
    pytest.importorskip("sam2")
    from sam2.modeling.position_encoding import PositionEmbeddingSine as OfficialSine

    x = torch.zeros(2, 7, *size)
    want = OfficialSine(num_pos_feats=256)(x)
    got = PositionEmbeddingSine(256)(x)
    assert got.shape == (2, 256, *size)
    assert (got - want).abs().max().item() < 1e-6


def test_rejects_sizes_not_multiple_of_32() -> None:
    enc = ImageEncoder(preset("mini", 256)).eval()
    for shape in [(1, 3, 1000, 1000), (1, 3, 256, 240)]:
        with pytest.raises(ValueError, match="multiples of 32"):
            enc(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.zeros(1, 1, 256, 256))
    with pytest.raises(ValueError, match="multiple of 32"):
        preset("tiny", 1000)


def test_max_pool_equals_maxpool2d() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 7, 5, generator=gen)  # (B, H, W, C), odd sizes: floor mode drops the edge
    for stride in [(2, 2), (3, 2)]:
        want = F.max_pool2d(x.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)
        assert torch.equal(max_pool(x, stride, dim=1), want)


def test_window_partition_round_trip_with_padding() -> None:
    x = torch.randn(2, 10, 13, 3, generator=torch.Generator().manual_seed(5))
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 3 * 4, 4, 4, 3)
    assert torch.equal(windows[0], x[0, :4, :4])
    assert windows[-1, 2:].abs().sum() == 0  # bottom padding rows are zeros
    assert torch.equal(window_unpartition(windows, 10, 13), x)


def test_trains_with_drop_path() -> None:
    torch.manual_seed(6)
    cfg = preset("mini")
    cfg = replace(cfg, trunk=replace(cfg.trunk, drop_path_rate=0.2))
    enc = ImageEncoder(cfg).train()
    out = enc(torch.randn(2, 3, 64, 96))
    loss = sum(f.square().mean() for f in out["backbone_fpn"])
    loss.backward()
    assert torch.isfinite(enc.trunk.pos_embed.grad).all() and enc.trunk.pos_embed.grad.abs().sum() > 0
    # Trunk param names are exactly the official ones (spot check of the naming scheme).
    names = set(dict(enc.named_parameters()))
    assert {"trunk.pos_embed_window", "trunk.blocks.1.proj.weight", "neck.convs.3.conv.bias"} <= names
    assert isinstance(enc.trunk, Hiera)
