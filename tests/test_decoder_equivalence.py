"""Prompt encoder, two-way transformer and mask decoder against the official SAM2 (1.1.0) modules.

The official modules are built directly with the SAM2.1 image-predictor arguments
(`SAM2Base._build_sam_heads` + the dynamic-multimask overrides of `build_sam2`), given seeded random
weights, and their state dicts are loaded into ours with strict=True.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sam2")

from sam2.modeling.sam.mask_decoder import MaskDecoder as OfficialMaskDecoder  # noqa: E402
from sam2.modeling.sam.prompt_encoder import PromptEncoder as OfficialPromptEncoder  # noqa: E402
from sam2.modeling.sam.transformer import TwoWayTransformer as OfficialTwoWayTransformer  # noqa: E402

from uniultra.models.config import preset  # noqa: E402
from uniultra.models.mask_decoder import MaskDecoder  # noqa: E402
from uniultra.models.prompt_encoder import PromptEncoder  # noqa: E402

TOL = 1e-5
DIM = 256


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter and buffer, so zero biases and unit norms cannot hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))


def _official_pair(image_size: int):
    torch.manual_seed(image_size)
    grid = image_size // 16
    enc = OfficialPromptEncoder(
        embed_dim=DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    dec = OfficialMaskDecoder(
        num_multimask_outputs=3,
        transformer=OfficialTwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
    )
    _perturb(enc, seed=1)
    _perturb(dec, seed=2)
    return enc.eval(), dec.eval()


class Models:
    """Official and ported heads with identical weights, plus one image's features."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.grid = image_size // 16
        self.off_enc, self.off_dec = _official_pair(image_size)
        config = preset("tiny", image_size)
        self.enc = PromptEncoder.from_config(config).eval()
        self.dec = MaskDecoder.from_config(config).eval()
        self.enc.load_state_dict(self.off_enc.state_dict(), strict=True)
        self.dec.load_state_dict(self.off_dec.state_dict(), strict=True)

        gen = torch.Generator().manual_seed(7)
        g = self.grid
        self.image_embed = torch.randn(1, DIM, g, g, generator=gen)
        self.neck_s0 = torch.randn(1, DIM, 4 * g, 4 * g, generator=gen)
        self.neck_s1 = torch.randn(1, DIM, 2 * g, 2 * g, generator=gen)

    def run(self, official: bool, points=None, boxes=None, masks=None, multimask=True, image_batch=1):
        """Prompt encoder + decoder as SAM2ImagePredictor._predict calls them."""
        enc, dec = (self.off_enc, self.off_dec) if official else (self.enc, self.dec)
        with torch.no_grad():
            sparse, dense = enc(points=points, boxes=boxes, masks=masks)
            high_res = [dec.conv_s0(self.neck_s0), dec.conv_s1(self.neck_s1)]
            image = self.image_embed
            if image_batch > 1:  # one embedding per prompt instead of repeat_image
                image = image.expand(image_batch, -1, -1, -1)
            return dec(
                image_embeddings=image,
                image_pe=enc.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=sparse.shape[0] > 1 and image_batch == 1,
                high_res_features=high_res,
            )


@pytest.fixture(scope="module", params=[1024, 256])
def models(request) -> Models:
    return Models(request.param)


def _max_diffs(ours, ref) -> dict[str, float]:
    names = ("masks", "iou", "tokens", "obj_score")
    diffs = {}
    for name, a, b in zip(names, ours, ref, strict=True):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
        diffs[name] = (a - b).abs().max().item()
    return diffs


def _assert_close(ours, ref) -> None:
    diffs = _max_diffs(ours, ref)
    assert all(d < TOL for d in diffs.values()), diffs


def _prompts(image_size: int) -> dict[str, dict]:
    s = image_size / 1024  # keep prompts at the same relative place for every input size
    box = torch.tensor([[200.0, 300.0, 640.0, 820.0]]) * s
    boxes3 = torch.tensor(
        [[10.0, 20.0, 300.0, 400.0], [500.0, 100.0, 1000.0, 700.0], [5.0, 5.0, 1019.0, 1019.0]]
    )
    point = (torch.tensor([[[412.0, 533.0]]]) * s, torch.tensor([[1]], dtype=torch.int32))
    three = (
        torch.tensor([[[412.0, 533.0], [600.0, 610.0], [100.0, 900.0]]]) * s,
        torch.tensor([[1, 0, 1]], dtype=torch.int32),
    )
    box_as_points = (box.reshape(1, 2, 2), torch.tensor([[2, 3]], dtype=torch.int32))
    box_then_point = (
        torch.cat([box.reshape(1, 2, 2), point[0]], dim=1),
        torch.tensor([[2, 3, 1]], dtype=torch.int32),
    )
    return {
        "box": {"boxes": box},
        "box_as_points": {"points": box_as_points},
        "one_point": {"points": point},
        "three_points_with_negative": {"points": three},
        "box_and_point": {"points": point, "boxes": box},
        "box_then_point_as_points": {"points": box_then_point},
        "three_boxes_one_image": {"boxes": boxes3 * s},
        "three_boxes_as_points_one_image": {
            "points": (boxes3.reshape(3, 2, 2) * s, torch.tensor([[2, 3]] * 3, dtype=torch.int32))
        },
    }


CASES = list(_prompts(1024))


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_prompt_to_masks_matches_official(models: Models, case: str, multimask: bool) -> None:
    prompt = _prompts(models.image_size)[case]
    ref = models.run(True, multimask=multimask, **prompt)
    ours = models.run(False, multimask=multimask, **prompt)
    _assert_close(ours, ref)
    batch = 3 if "three_boxes" in case else 1
    low_res = 4 * models.grid
    assert ours[0].shape == (batch, 3 if multimask else 1, low_res, low_res)
    assert ours[1].shape == (batch, 3 if multimask else 1)
    assert ours[2].shape == (batch, 3 if multimask else 1, DIM)
    assert ours[3].shape == (batch, 1)


def test_prompt_encoder_outputs_match(models: Models) -> None:
    torch.testing.assert_close(models.enc.get_dense_pe(), models.off_enc.get_dense_pe(), atol=0, rtol=0)
    for case, prompt in _prompts(models.image_size).items():
        full = {"points": None, "boxes": None, "masks": None, **prompt}
        with torch.no_grad():
            for a, b in zip(models.enc(**full), models.off_enc(**full), strict=True):
                torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=case)


def test_mask_prompt_and_per_prompt_images(models: Models) -> None:
    g = models.grid
    gen = torch.Generator().manual_seed(3)
    masks = torch.randn(2, 1, 4 * g, 4 * g, generator=gen) * 5
    points = (
        torch.tensor([[[30.0, 40.0], [50.0, 10.0]], [[100.0, 120.0], [70.0, 80.0]]])
        * models.image_size
        / 256,
        torch.tensor([[1, 0], [1, -1]], dtype=torch.int32),
    )
    for multimask in (True, False):
        prompt = {"points": points, "masks": masks, "multimask": multimask, "image_batch": 2}
        _assert_close(models.run(False, **prompt), models.run(True, **prompt))
    # A mask prompt alone.
    _assert_close(models.run(False, masks=masks[:1]), models.run(True, masks=masks[:1]))


@pytest.mark.parametrize(
    "hyper_scale, expect_stable",
    [(1e-3, [False] * 3), (1.0, [False] * 3), (4.0, [True, False, False])],
)
def test_dynamic_multimask_fallback(hyper_scale: float, expect_stable: list[bool]) -> None:
    """Scale the single-mask hypernetwork: small logits are unstable (fall back to the best multimask
    output), larger ones stable; at scale 4 the three box prompts mix both branches in one batch."""
    m = Models(256)
    for dec in (m.off_dec, m.dec):
        with torch.no_grad():
            last = dec.output_hypernetworks_mlps[0].layers[-1]
            last.weight.mul_(hyper_scale)
            last.bias.mul_(hyper_scale)
    boxes = _prompts(256)["three_boxes_one_image"]["boxes"]
    ours = m.run(False, boxes=boxes, multimask=False)
    _assert_close(ours, m.run(True, boxes=boxes, multimask=False))

    with torch.no_grad():
        sparse, dense = m.enc(points=None, boxes=boxes, masks=None)
        high_res = m.dec.project_high_res_features(m.neck_s0, m.neck_s1)
        all_masks, all_iou = m.dec.predict_masks(
            m.image_embed, m.enc.get_dense_pe(), sparse, dense, repeat_image=True, high_res_features=high_res
        )[:2]
    stable = m.dec._get_stability_scores(all_masks[:, 0]) >= 0.98
    assert stable.tolist() == expect_stable
    best = all_iou[:, 1:].argmax(dim=1) + 1
    chosen = torch.where(stable, 0, best)
    rows = torch.arange(3)
    torch.testing.assert_close(ours[0][:, 0], all_masks[rows, chosen], atol=0, rtol=0)
    torch.testing.assert_close(ours[1][:, 0], all_iou[rows, chosen], atol=0, rtol=0)


def test_stability_selection_mixed_batch() -> None:
    """Stable and unstable prompts in one batch, with distinct best multimask indices."""
    m = Models(256)
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 4, 16, 16, generator=gen) * 10
    logits[1, 0] = 0.01 * torch.randn(16, 16, generator=gen)  # unstable single mask
    logits[2, 0] = 0.0  # area_u covers all and area_i is empty -> unstable
    logits[0, 0] = -10.0  # empty union -> stability 1 -> stable
    iou = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.5, 0.8, 0.1, 0.2], [0.5, 0.1, 0.2, 0.7]])
    ours = m.dec._dynamic_multimask_via_stability(logits, iou)
    ref = m.off_dec._dynamic_multimask_via_stability(logits, iou)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(ours[1], torch.tensor([[0.1], [0.8], [0.7]]))


def test_training_mode_skips_fallback() -> None:
    m = Models(256)
    m.off_dec.train()
    m.dec.train()
    prompt = _prompts(256)["three_points_with_negative"]
    _assert_close(m.run(False, multimask=False, **prompt), m.run(True, multimask=False, **prompt))


def test_state_dict_keys_identical() -> None:
    m = Models(256)
    assert list(m.enc.state_dict()) == list(m.off_enc.state_dict())
    assert list(m.dec.state_dict()) == list(m.off_dec.state_dict())


def test_point_shape_mismatch_raises() -> None:
    enc = PromptEncoder(DIM, 16, 256, 16)
    coords = torch.rand(2, 3, 2) * 256
    with pytest.raises(ValueError, match=r"labels must be \(B, N\)"):
        enc(points=(coords, torch.ones(2, 4, dtype=torch.int32)), boxes=None, masks=None)
    with pytest.raises(ValueError, match=r"labels must be \(B, N\)"):
        enc(points=(coords, torch.ones(3, 3, dtype=torch.int32)), boxes=None, masks=None)
    with pytest.raises(ValueError, match=r"coords must be \(B, N, 2\)"):
        enc(points=(torch.rand(2, 3, 3), torch.ones(2, 3)), boxes=None, masks=None)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        enc(points=(coords, torch.ones(2, 3)), boxes=torch.rand(3, 4), masks=None)


def test_other_input_sizes_shapes() -> None:
    for size in (512, 256):
        config = preset("tiny", size)
        enc, dec = PromptEncoder.from_config(config), MaskDecoder.from_config(config)
        g = size // 16
        sparse, dense = enc(points=(torch.rand(2, 3, 2) * size, torch.ones(2, 3)), boxes=None, masks=None)
        assert sparse.shape == (2, 4, DIM) and dense.shape == (2, DIM, g, g)
        assert enc.get_dense_pe().shape == (1, DIM, g, g)
        high_res = dec.project_high_res_features(
            torch.rand(1, DIM, 4 * g, 4 * g), torch.rand(1, DIM, 2 * g, 2 * g)
        )
        with torch.no_grad():
            out = dec(torch.rand(1, DIM, g, g), enc.get_dense_pe(), sparse, dense, True, True, high_res)
        assert out[0].shape == (2, 3, 4 * g, 4 * g)
