"""uniultra.peft: CH-Adapter, baselines, freezing, parameter counts, adapter-only state, taps."""

from __future__ import annotations

import copy

import pytest
import torch

from uniultra.models.checkpoint import read_checkpoint, save_model
from uniultra.models.hiera import block_schedule
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft import (
    DIRECTIONS,
    METHODS,
    CHAdapter,
    LoRALinear,
    PeftConfig,
    PeftConfigError,
    PeftError,
    apply_peft,
    load_trainable_state,
    record_taps,
    set_train_mode,
    trainable_report,
    trainable_state_dict,
)
from uniultra.peft.ch_adapter import SOBEL_KERNELS, bottleneck_width

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation, which on a shared 2-core machine costs
    # up to 10x. Restored afterwards so other test modules keep their setting.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base_model() -> SAM2ImageModel:
    torch.manual_seed(0)
    model = SAM2ImageModel.from_preset("mini", SIZE).eval()
    with torch.no_grad():  # no zero pos-embeds etc.: a wrong wiring must show
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [20.0, 4.0, 60.0, 30.0]])
    return images, boxes


def _run(model: SAM2ImageModel, images: torch.Tensor, boxes: torch.Tensor):
    feats = model.encode_image(images)
    return feats, model.decode(feats, boxes=boxes, multimask=True)


def _meta_model(name: str, size: int = 1024) -> SAM2ImageModel:
    with torch.device("meta"):
        return SAM2ImageModel.from_preset(name, size)


# ---------------------------------------------------------------- no-op at initialisation


@pytest.mark.parametrize("method", METHODS)
def test_untrained_peft_leaves_outputs_unchanged(base_model: SAM2ImageModel, method: str) -> None:
    model = copy.deepcopy(base_model)
    apply_peft(model, PeftConfig(method=method))
    images, boxes = _inputs()
    with torch.no_grad():
        f0, d0 = _run(base_model, images, boxes)
        f1, d1 = _run(model, images, boxes)
    # Zero-initialised last layers: the residual added is exactly +0, so outputs are bitwise equal.
    assert torch.equal(f0.image_embed, f1.image_embed)
    for a, b in zip(f0.high_res_feats, f1.high_res_feats, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(d1.low_res_logits, d0.low_res_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(d1.iou_scores, d0.iou_scores, rtol=0, atol=1e-6)
    assert d0.low_res_logits.abs().max() > 1e-3  # not a degenerate comparison


def test_empty_adapter_slot_keeps_official_keys(base_model: SAM2ImageModel) -> None:
    model = copy.deepcopy(base_model)
    before = set(model.state_dict())
    apply_peft(model, PeftConfig(method="adapter_lora"))
    after = set(model.state_dict())
    assert before <= after  # official keys unchanged (LoRA keeps qkv.weight / qkv.bias)
    added = sorted(after - before)
    assert "image_encoder.trunk.blocks.7.adapter.context.0.weight" in added
    assert "image_encoder.trunk.blocks.7.attn.qkv.lora_a" in added
    assert all(".adapter." in k or ".lora_" in k for k in added)
    assert all(b.adapter is None for b in base_model.image_encoder.trunk.blocks)


# ---------------------------------------------------------------- gradients through the edge branch


def test_gradient_reaches_edge_patch_mixer(base_model: SAM2ImageModel) -> None:
    model = copy.deepcopy(base_model)
    apply_peft(model, PeftConfig(method="ch_adapter"))
    set_train_mode(model)
    images, boxes = _inputs()
    adapters = [b.adapter for b in model.image_encoder.trunk.blocks]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step() -> None:
        opt.zero_grad()
        out = model(images, boxes=boxes)
        out.low_res_logits.square().mean().backward()

    # Step 0: the channel mixer is zero, so dL/d(patch mixer) = W_mix^T (...) = 0 exactly; only
    # the zero-initialised last layers get gradient. This is the expected consequence of the no-op
    # initialisation, not a detached branch: after ONE optimiser step the channel mixer is nonzero
    # and the gradient must reach every patch mixer (a detached input would keep it None/zero).
    step()
    for a in adapters:
        assert a.edge.channel_mixer.weight.grad.abs().sum() > 0
        assert a.edge.patch_mixer.weight.grad.abs().sum() == 0
    opt.step()
    step()
    for i, a in enumerate(adapters):
        assert a.edge.patch_mixer.weight.grad.abs().sum() > 0, i
        assert a.context[0].weight.grad.abs().sum() > 0, i
    # Frozen trunk: no gradient accumulated there.
    trunk = model.image_encoder.trunk
    assert trunk.blocks[3].mlp.layers[0].weight.grad is None
    assert trunk.pos_embed.grad is None


# ---------------------------------------------------------------- kernels, depthwise, real permute


def test_sobel_kernels_are_depthwise_buffers() -> None:
    c = 3
    adapter = CHAdapter(dim=8, edge_channels=c)
    edge = adapter.edge
    assert "edge.kernels" in dict(adapter.named_buffers())
    assert all("kernels" not in n for n, _ in adapter.named_parameters())
    assert "edge.kernels" not in adapter.state_dict()  # follows from the config, not stored
    assert edge.kernels.shape == (c * 4, 1, 3, 3)  # depthwise weight layout for groups = c
    want = torch.tensor(
        [
            [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],  # horizontal
            [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],  # vertical
            [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]],  # diagonal
            [[2, 1, 0], [1, 0, -1], [0, -1, -2]],  # anti-diagonal
        ],
        dtype=torch.float32,
    )
    for j in range(c):
        assert torch.equal(edge.kernels[4 * j : 4 * j + 4, 0], want)
    assert torch.equal(torch.tensor([SOBEL_KERNELS[d] for d in DIRECTIONS], dtype=torch.float32), want)
    # Depthwise behaviour: only patch-mixer channel 1 active -> only responses 4..7 nonzero
    # (a full conv would spread it to every output: "4 identical channels").
    with torch.no_grad():
        edge.patch_mixer.weight.zero_()
        edge.patch_mixer.bias.zero_()
        edge.patch_mixer.weight[1, 0] = 1.0
    u = torch.randn(1, 6, 7, 8, generator=torch.Generator().manual_seed(3))
    r = edge.responses(u)
    assert r.shape == (1, c * 4, 6, 7)
    active = r.abs().flatten(2).amax(-1)[0] > 0
    assert active.tolist() == [False] * 4 + [True] * 4 + [False] * 4


def test_vertical_edge_lights_the_horizontal_channel_at_the_edge() -> None:
    # Tokens (B, H, W, D), non-square so a transposition would show; feature 0 steps from 0 to 1
    # between columns 4 and 5 (a vertical edge). A raw view to (B, D, H, W) would scramble this.
    h, w, d = 8, 12, 4
    u = torch.zeros(1, h, w, d)
    u[..., 5:, 0] = 1.0
    adapter = CHAdapter(dim=d, edge_channels=1, edge_activation="none", scale=1.0)
    with torch.no_grad():
        adapter.edge.patch_mixer.weight.zero_()
        adapter.edge.patch_mixer.bias.zero_()
        adapter.edge.patch_mixer.weight[0, 0] = 1.0  # the single edge channel reads feature 0
    r = adapter.edge.responses(u)[0]  # (4 directions, H, W)
    strength = r.abs()
    # The strongest response over all directions and positions is in the horizontal-gradient
    # channel, at the edge columns 4 and 5, on every row; the vertical channel stays silent
    # (replicate padding: no artificial top/bottom border edges).
    assert strength.argmax().item() // (h * w) == 0
    assert torch.equal(strength[0].argmax(dim=1) // 2, torch.full((h,), 2))  # column 4 or 5
    assert torch.equal(strength[0, :, 4], torch.full((h,), 4.0))
    assert torch.equal(strength[0, :, 5], torch.full((h,), 4.0))
    assert strength[0, :, :4].sum() == 0 and strength[0, :, 6:].sum() == 0
    assert strength[1].sum() == 0
    assert strength[2].max() == 3 and strength[3].max() == 3
    # Through the whole adapter and the permute back: route the horizontal response to feature 3.
    with torch.no_grad():
        adapter.edge.channel_mixer.weight[3, 0] = 1.0
    out = adapter(u)
    assert out.shape == (1, h, w, d)
    assert torch.equal(out[0, :, :, 3].abs().argmax(dim=1) // 2, torch.full((h,), 2))
    assert out[..., :3].abs().sum() == 0


# ---------------------------------------------------------------- parameter counts per switch


def _adapter_formula(cfg: PeftConfig, widths: list[int]) -> int:
    total = 0
    n_kernels = {"sobel": len(cfg.directions), "laplace": 1, "none": 0}[cfg.adapter_edge_operator]
    c = cfg.edge_channels
    for dim in widths:
        hidden = bottleneck_width(dim, cfg.ratio)
        total += dim * hidden + hidden + hidden * dim + dim  # context Linear, GELU, Linear
        if n_kernels:
            total += dim * c + c + c * n_kernels * dim + dim  # patch mixer, fixed kernels, channel mixer
    return total


def _lora_formula(cfg: PeftConfig, specs) -> int:
    return sum(cfg.lora_rank * (s.dim + 3 * s.dim_out) for s in specs)


@pytest.mark.parametrize(
    "cfg",
    [
        PeftConfig(),
        PeftConfig(directions=("horizontal", "vertical")),
        PeftConfig(directions=("anti_diagonal",)),
        PeftConfig(edge_operator="laplace"),
        PeftConfig(edge_operator="none"),
        PeftConfig(ratio=0.5),
        PeftConfig(ratio=0.1, edge_channels=4),
        PeftConfig(placement="stage_end"),
        PeftConfig(method="adapter"),
        PeftConfig(method="lora"),
        PeftConfig(method="lora", lora_rank=8, placement="stage_end"),
        PeftConfig(method="adapter_lora", lora_rank=2),
        PeftConfig(method="decoder_only"),
        PeftConfig(method="full"),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.to_dict().items() if v != PeftConfig().to_dict()[k]) or "default",
)
def test_parameter_counts_follow_the_switches(cfg: PeftConfig) -> None:
    model = _meta_model("mini", SIZE)
    base = sum(p.numel() for p in model.parameters())
    report = apply_peft(model, cfg)
    specs = block_schedule(model.config.trunk)
    blocks = range(len(specs)) if cfg.placement == "every_block" else model.image_encoder.trunk.stage_ends
    chosen = [specs[i] for i in blocks]
    want_adapters = _adapter_formula(cfg, [s.dim_out for s in chosen]) if cfg.uses_adapter else 0
    want_lora = _lora_formula(cfg, chosen) if cfg.uses_lora else 0
    assert report.groups["adapters"].total == want_adapters
    assert report.groups["lora"].total == want_lora
    assert report.total == base + want_adapters + want_lora
    assert report.base_total == base
    head = report.groups["prompt_encoder"].total + report.groups["mask_decoder"].total + 256
    if cfg.method == "full":
        assert report.trainable == report.total
    else:
        assert report.trainable == want_adapters + want_lora + head


def test_switch_differences_are_exact() -> None:
    """The deltas between switches, in closed form (mini widths 16, 32x2, 64x7, 128x2)."""
    widths = [s.dim_out for s in block_schedule(_meta_model("mini").config.trunk)]
    sum_d = sum(widths)

    def adapters(**kw) -> int:
        return apply_peft(_meta_model("mini"), PeftConfig(**kw)).groups["adapters"].total

    full = adapters()
    # Dropping 2 of 4 directions removes 2 * c * D channel-mixer weights per block.
    assert full - adapters(directions=("horizontal", "vertical")) == 2 * 8 * sum_d
    # Laplace: one kernel instead of four.
    assert full - adapters(edge_operator="laplace") == 3 * 8 * sum_d
    # No edge branch: patch mixer (D c + c) and channel mixer (4 c D + D) gone.
    assert full - adapters(edge_operator="none") == sum(5 * 8 * d + 8 + d for d in widths)
    # Each extra edge channel costs 5 D + 1 per block.
    assert adapters(edge_channels=9) - full == sum(5 * d + 1 for d in widths)
    # Doubling r doubles the context-branch hidden width h = rD: +2 D h + h per block.
    assert adapters(ratio=0.5) - full == sum(2 * d * (d // 4) + d // 4 for d in widths)
    lora = apply_peft(_meta_model("mini"), PeftConfig(method="lora", lora_rank=1)).groups["lora"].total
    assert lora * 4 == apply_peft(_meta_model("mini"), PeftConfig(method="lora")).groups["lora"].total


# ---------------------------------------------------------------- Hiera-L against the paper


PAPER_TRAINABLE, PAPER_RATIO, PAPER_ADAPTERS = 20.80e6, 0.0891, 9.07e6
# Official SAM2.1-L video model minus our image path: memory attention 5,922,304 + memory encoder
# 1,384,608 + obj_ptr_proj 197,376 + obj_ptr_tpos_proj 16,448 + small tokens (measured with sam2 1.1.0).
VIDEO_ONLY_PARAMS = 7_521_777


def test_hiera_large_trainable_ratio() -> None:
    lines = []
    for c in (8, 1):
        model = _meta_model("large")
        report = apply_peft(model, PeftConfig(method="ch_adapter", edge_channels=c))
        adapters = report.groups["adapters"].total
        # The paper's way: video-memory modules counted as trainable and in the total (SPEC section 7).
        paper_way = (report.trainable + VIDEO_ONLY_PARAMS) / (report.total + VIDEO_ONLY_PARAMS)
        lines.append(
            f"Hiera-L CH-Adapter c={c} r=0.25: adapters {adapters / 1e6:.3f}M, trainable {report.trainable / 1e6:.3f}M"
            f" of {report.total / 1e6:.3f}M = {100 * report.ratio:.2f}% (image path) | counted as the paper"
            f" (+video modules): {(report.trainable + VIDEO_ONLY_PARAMS) / 1e6:.2f}M = {100 * paper_way:.2f}%"
            f" | paper {PAPER_TRAINABLE / 1e6:.2f}M = {100 * PAPER_RATIO:.2f}%, adapters ~{PAPER_ADAPTERS / 1e6:.2f}M"
        )
        if c == 8:
            assert report.base_total == 216_924_865  # SAM2-L image path (encoder 212.70M + decoder side)
            assert adapters == 10_052_088
            assert report.groups["trunk"].trainable == report.groups["neck"].trainable == 0
        else:
            assert adapters == 9_094_152
            # With c = 1 the paper's numbers are reproduced when the video modules are counted.
            assert abs(report.trainable + VIDEO_ONLY_PARAMS - PAPER_TRAINABLE) < 0.05e6
            assert abs(paper_way - PAPER_RATIO) < 0.0005
    print("\n" + "\n".join(lines))


# ---------------------------------------------------------------- freezing per method


@pytest.mark.parametrize("method", METHODS)
def test_freezing_per_method(method: str) -> None:
    model = _meta_model("mini", SIZE)
    report = apply_peft(model, PeftConfig(method=method))
    g = report.groups
    assert g["prompt_encoder"].trainable == g["prompt_encoder"].total
    assert g["mask_decoder"].trainable == g["mask_decoder"].total
    assert g["no_mem_embed"].trainable == 256
    assert g["adapters"].trainable == g["adapters"].total
    assert g["lora"].trainable == g["lora"].total
    assert (g["adapters"].total > 0) == (method in ("ch_adapter", "adapter", "adapter_lora"))
    assert (g["lora"].total > 0) == (method in ("lora", "adapter_lora"))
    if method == "full":
        assert all(p.requires_grad for p in model.parameters())
    else:
        assert g["trunk"].trainable == 0 and g["neck"].trainable == 0
        trunk_names = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("image_encoder.")]
        assert all(".adapter." in n or ".lora_" in n for n in trunk_names)
    if method == "lora":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert all(n.endswith(("lora_a", "lora_b")) or not n.startswith("image_encoder.") for n in trainable)


def test_decoder_flags() -> None:
    model = _meta_model("mini", SIZE)
    cfg = PeftConfig(train_prompt_encoder=False, train_no_mem_embed=False)
    report = apply_peft(model, cfg)
    assert report.groups["prompt_encoder"].trainable == 0
    assert report.groups["no_mem_embed"].trainable == 0
    assert report.groups["mask_decoder"].trainable == report.groups["mask_decoder"].total
    text = report.format()
    assert "adapters" in text and "mask_decoder" in text and "%" in text


def test_apply_twice_raises() -> None:
    model = _meta_model("mini", SIZE)
    apply_peft(model, PeftConfig())
    with pytest.raises(PeftError, match="already applied"):
        apply_peft(model, PeftConfig(method="lora"))
    assert trainable_report(model).method == "ch_adapter"


def test_set_train_mode_keeps_frozen_encoder_in_eval(base_model: SAM2ImageModel) -> None:
    model = copy.deepcopy(base_model)
    apply_peft(model, PeftConfig())
    set_train_mode(model)
    assert model.training and model.sam_mask_decoder.training
    assert not model.image_encoder.training and not model.image_encoder.trunk.blocks[0].training
    assert model.image_encoder.trunk.blocks[0].adapter.training


# ---------------------------------------------------------------- LoRA


def test_lora_linear() -> None:
    torch.manual_seed(5)
    base = torch.nn.Linear(6, 9)
    lora = LoRALinear.wrap(base, rank=2, alpha=6.0)
    assert lora.weight is base.weight and lora.bias is base.bias
    assert lora.scaling == 3.0
    x = torch.randn(4, 6)
    assert torch.equal(lora(x), base(x))  # B = 0: exact no-op
    with torch.no_grad():
        lora.lora_b.normal_()
    want = base(x) + 3.0 * x @ lora.lora_a.T @ lora.lora_b.T
    torch.testing.assert_close(lora(x), want)
    torch.testing.assert_close(lora(x), torch.nn.functional.linear(x, base.weight + lora.delta_weight(), base.bias))
    assert set(lora.state_dict()) == {"weight", "bias", "lora_a", "lora_b"}


# ---------------------------------------------------------------- adapter-only state


def test_trainable_state_round_trip(base_model: SAM2ImageModel, tmp_path) -> None:
    cfg = PeftConfig(method="adapter_lora")
    trained = copy.deepcopy(base_model)
    apply_peft(trained, cfg)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    state = trainable_state_dict(trained)
    assert set(state) == {n for n, p in trained.named_parameters() if p.requires_grad}
    assert not any(k.startswith("image_encoder.") and ".adapter." not in k and ".lora_" not in k for k in state)
    # Snapshot, not references.
    some = next(iter(state))
    assert state[some].data_ptr() != dict(trained.named_parameters())[some].data_ptr()

    # Through a UniUltra checkpoint file, as the engine will store it.
    path = save_model(trained, tmp_path / "adapter.pt", meta={"peft": cfg.to_dict()}, state=state)
    data = read_checkpoint(path)
    restored = copy.deepcopy(base_model)
    apply_peft(restored, PeftConfig.from_dict(data["meta"]["peft"]))
    load_trainable_state(restored, data["state_dict"])
    images, boxes = _inputs(2)
    with torch.no_grad():
        _, want = _run(trained, images, boxes)
        _, got = _run(restored, images, boxes)
        _, untouched = _run(base_model, images, boxes)
    assert torch.equal(got.low_res_logits, want.low_res_logits)
    assert not torch.allclose(untouched.low_res_logits, want.low_res_logits)


def test_load_trainable_state_errors(base_model: SAM2ImageModel) -> None:
    model = _meta_model("mini", SIZE)
    apply_peft(model, PeftConfig(method="ch_adapter"))
    state = trainable_state_dict(model)
    missing = dict(state)
    missing.pop("image_encoder.trunk.blocks.0.adapter.context.0.weight")
    with pytest.raises(PeftError, match="missing 1 trainable"):
        load_trainable_state(model, missing)
    with pytest.raises(PeftError, match="not parameters of this model"):
        load_trainable_state(model, {**state, "image_encoder.trunk.blocks.0.adapter.nope": torch.zeros(1)})
    with pytest.raises(PeftError, match="frozen parameters"):
        load_trainable_state(model, {**state, "image_encoder.trunk.pos_embed": torch.zeros(1)})
    bad = dict(state)
    bad["no_mem_embed"] = torch.zeros(1, 1, 3)
    with pytest.raises(PeftError, match="shape mismatch"):
        load_trainable_state(model, bad)
    # A state from another method names the likely cause.
    lora_model = _meta_model("mini", SIZE)
    apply_peft(lora_model, PeftConfig(method="lora"))
    with pytest.raises(PeftError, match="same PEFT config"):
        load_trainable_state(lora_model, state)


# ---------------------------------------------------------------- config


def test_config_round_trip_and_validation() -> None:
    cfg = PeftConfig(method="ch_adapter", directions=("vertical", "horizontal"), edge_channels=4)
    assert cfg.directions == ("horizontal", "vertical")  # canonical order
    data = cfg.to_dict()
    assert data["directions"] == ["horizontal", "vertical"]  # YAML/JSON-safe
    assert PeftConfig.from_dict(data) == cfg
    assert PeftConfig.from_dict({"directions": ["anti-diagonal"]}).directions == ("anti_diagonal",)
    assert PeftConfig.from_dict(None) == PeftConfig()
    with pytest.raises(PeftConfigError, match="unknown method 'lorax'"):
        PeftConfig(method="lorax")
    with pytest.raises(PeftConfigError, match="unknown edge direction 'up'"):
        PeftConfig(directions=("up",))
    with pytest.raises(PeftConfigError, match="given twice"):
        PeftConfig(directions=("vertical", "vertical"))
    with pytest.raises(PeftConfigError, match="at least one direction"):
        PeftConfig(directions=())
    assert PeftConfig(directions=(), edge_operator="none").directions == ()
    with pytest.raises(PeftConfigError, match="unknown edge_operator"):
        PeftConfig(edge_operator="canny")
    with pytest.raises(PeftConfigError, match="unknown placement"):
        PeftConfig(placement="middle")
    with pytest.raises(PeftConfigError, match="ratio must be > 0"):
        PeftConfig(ratio=0)
    with pytest.raises(PeftConfigError, match="edge_channels must be an integer"):
        PeftConfig(edge_channels=2.5)
    with pytest.raises(PeftConfigError, match="lora_rank must be an integer"):
        PeftConfig(lora_rank=0)
    with pytest.raises(PeftConfigError, match="unknown PEFT config keys"):
        PeftConfig.from_dict({"rank": 4})
    with pytest.raises(PeftConfigError, match="true or false"):
        PeftConfig(train_mask_decoder="yes")


# ---------------------------------------------------------------- distillation taps


def test_record_taps(base_model: SAM2ImageModel) -> None:
    model = copy.deepcopy(base_model)
    apply_peft(model, PeftConfig())
    with torch.no_grad():
        for b in model.image_encoder.trunk.blocks:
            b.adapter.context[2].weight.normal_()  # nonzero adapter output
    images, _ = _inputs()
    trunk = model.image_encoder.trunk
    with record_taps(model) as taps:
        stages = trunk(images)
        for level in (1, 2, 3):
            t = taps.stage(level)
            assert torch.equal(t.output, t.block + t.adapter)  # D1 = D2 + D3
            assert t.adapter.abs().sum() > 0
            assert torch.equal(t.output.permute(0, 3, 1, 2), stages[level - 1])  # D1 is the stage output
            assert t.adapter.requires_grad  # a student's taps carry gradients
    assert all(b.tap_store is None for b in trunk.blocks)  # released on exit
    # Hook-friendly alternative for D3.
    seen = []
    handle = trunk.blocks[0].adapter.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad(), record_taps(model, blocks=[0]) as taps:
        trunk(images)
        assert torch.equal(seen[0], taps[0].adapter)
    handle.remove()


def test_edge_only_adapter_has_no_context_branch_and_starts_as_a_no_op():
    from uniultra.peft.config import PeftConfig, PeftConfigError

    adapter = CHAdapter.from_config(8, PeftConfig(method="ch_adapter", context_branch=False))
    assert adapter.context is None and adapter.edge is not None
    assert not any(k.startswith("context.") for k in adapter.state_dict())
    tokens = torch.randn(2, 5, 5, 8)
    assert torch.equal(adapter(tokens), torch.zeros_like(tokens))  # zero-initialised output layer
    with torch.no_grad():
        adapter.edge.channel_mixer.weight.normal_()
    edge_alone = adapter.scale * adapter.edge(tokens)
    assert torch.allclose(adapter(tokens), edge_alone)
    for bad in ({"method": "adapter", "context_branch": False},
                {"method": "ch_adapter", "edge_operator": "none", "context_branch": False}):
        with pytest.raises(PeftConfigError, match="context_branch"):
            PeftConfig(**bad)
