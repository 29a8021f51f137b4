"""Our image path equals the official SAM2 code, end to end, through an official-format checkpoint.

The official package is a test-time reference only (installed by `make setup`). Its predictor imports
torchvision for three transforms; torchvision has no CPU wheel here, so they are stubbed with
exact torch equivalents before the import.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniultra.inference.predictor import Predictor
from uniultra.models.checkpoint import load_official

sam2_build = pytest.importorskip("sam2.build_sam", reason="official sam2==1.1.0 not installed (make setup)")

TOL = 1e-4


class _ToTensor:
    def __call__(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0


class _Resize(torch.nn.Module):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's tensor Resize: bilinear, antialias on, align_corners off.
        return F.interpolate(x.unsqueeze(0), size=self.size, mode="bilinear",
                             align_corners=False, antialias=True).squeeze(0)


class _Normalize(torch.nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@pytest.fixture(scope="module")
def official_predictor_cls():
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.ToTensor, transforms.Resize, transforms.Normalize = _ToTensor, _Resize, _Normalize
        tv.transforms = transforms
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, transforms
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    return SAM2ImagePredictor


def build_official(config: str, image_size: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = sam2_build.build_sam2(config, None, device="cpu",
                                  hydra_overrides_extra=[f"++model.image_size={image_size}"])
    with torch.no_grad():
        # Random init leaves position embeddings and some tokens at zero; perturb every
        # parameter so that a wrong wiring anywhere changes the outputs.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save_official_format(model: torch.nn.Module, path) -> None:
    torch.save({"model": model.state_dict()}, path)


def speckle_rgb(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gray = np.abs(rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w)))
    gray = (255 * gray / gray.max()).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def max_diff(a, b) -> float:
    a, b = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in (a, b))
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


CASES = [
    ("configs/sam2.1/sam2.1_hiera_t.yaml", "tiny", 1024),
    ("configs/sam2.1/sam2.1_hiera_l.yaml", "large", 256),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[1] + f"@{c[2]}" for c in CASES])
def pair(request, tmp_path_factory, official_predictor_cls):
    config, name, size = request.param
    official = build_official(config, size, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / f"sam2.1_hiera_{name}.pt"
    save_official_format(official, path)
    ours, report = load_official(path, image_size=size)
    assert report.preset == name
    assert report.ignored_keys, "video-memory keys of the official checkpoint should be reported"
    assert not any(k.startswith("image_encoder.") for k in report.ignored_keys)
    image = speckle_rgb(1, 300, 420)  # not square, not the model size: exercises resizing
    theirs = official_predictor_cls(official)
    # The official predictor hard-codes the 1024-input feature sizes; give it the real ones.
    theirs._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    mine = Predictor(ours.eval())
    mine.max_hole_share = 0.0  # sam2's image predictor fills no holes by default (max_hole_area=0)
    with torch.no_grad():
        theirs.set_image(image)
    mine.set_image(image)
    return official, ours, theirs, mine, image


def test_backbone_levels_and_embedding_match(pair):
    official, ours, theirs, mine, image = pair
    x = mine.preprocess(image)
    with torch.no_grad():
        ref = official.forward_image(x)  # applies conv_s0 / conv_s1 to levels 0 and 1
        out = ours.image_encoder(x)
        feats = ours.encode_image(x)
    for level in range(3):
        got = out["backbone_fpn"][level]
        if level < 2:
            got = [ours.sam_mask_decoder.conv_s0, ours.sam_mask_decoder.conv_s1][level](got)
        assert max_diff(got, ref["backbone_fpn"][level]) < TOL, f"FPN level {level}"
        assert max_diff(out["vision_pos_enc"][level], ref["vision_pos_enc"][level]) < TOL
    assert max_diff(feats.image_embed, theirs._features["image_embed"]) < TOL
    for got, want in zip(feats.high_res_feats, theirs._features["high_res_feats"], strict=True):
        assert max_diff(got, want) < TOL


PROMPTS = {
    "box": dict(box=np.array([60.0, 50.0, 260.0, 210.0])),
    "one point": dict(points=np.array([[150.0, 120.0]]), labels=np.array([1])),
    "points with negative": dict(points=np.array([[150.0, 120.0], [200.0, 90.0], [20.0, 20.0]]),
                                 labels=np.array([1, 1, 0])),
    "box and point": dict(box=np.array([60.0, 50.0, 260.0, 210.0]),
                          points=np.array([[150.0, 120.0]]), labels=np.array([1])),
}


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_masks_and_scores_match(pair, prompt, multimask):
    _, _, theirs, mine, _ = pair
    p = PROMPTS[prompt]
    with torch.no_grad():
        ref_logits, ref_iou, ref_low = theirs.predict(
            point_coords=p.get("points"), point_labels=p.get("labels"), box=p.get("box"),
            multimask_output=multimask, return_logits=True)
    logits, iou, low = mine.predict(box=p.get("box"), points=p.get("points"), labels=p.get("labels"),
                                    multimask=multimask, return_logits=True)
    assert logits.shape == ref_logits.shape == ((3 if multimask else 1), 300, 420)
    assert max_diff(low, ref_low) < TOL
    assert max_diff(iou, ref_iou) < TOL
    assert max_diff(logits, ref_logits) < TOL
    masks, _, _ = mine.predict(box=p.get("box"), points=p.get("points"), labels=p.get("labels"),
                               multimask=multimask)
    assert masks.dtype == bool
    np.testing.assert_array_equal(masks, ref_logits > 0)


def test_batched_boxes_match(pair):
    _, _, theirs, mine, _ = pair
    boxes = np.array([[60.0, 50.0, 260.0, 210.0], [10.0, 10.0, 100.0, 90.0], [200.0, 100.0, 419.0, 299.0]])
    with torch.no_grad():
        ref_logits, ref_iou, _ = theirs.predict(box=boxes, multimask_output=False, return_logits=True)
    logits, iou, _ = mine.predict(box=boxes, return_logits=True)
    assert logits.shape == (3, 1, 300, 420)
    assert max_diff(iou, ref_iou) < TOL
    assert max_diff(logits, ref_logits) < TOL
