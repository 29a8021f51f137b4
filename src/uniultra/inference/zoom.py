"""Zoomed prediction: each object is segmented on a crop around its prompt, then pasted back.

`ZoomPredictor` wraps any predictor with SAM2's `set_image` / `predict` contract (PyTorch or
ONNX) and keeps that contract. Per object:
- with a box: the crop is the box enlarged by `margin` (uniultra.inference.roi), extended to
  hold every positive point; negative points outside the crop are dropped (outside the crop the
  answer is background anyway);
- with points only (a tap): candidate crops are cut around what a first pass on the whole image
  segments for the points, and as squares of several sizes centred on them; the points are
  answered on each, and the answer the candidates agree on most is kept (`DEFAULT_TAP_SCALES`);
  a model with an automatic head and a chosen modality first tries the head's part under the tap as
  a box (`TAP_LOCATOR_AGREEMENT`); with no modality named, the unsupervised regions holding the tap
  are answered as boxes too and compete with the crops (`_region_answers`).
The crop is resized to the model input by the wrapped predictor (one preprocessing for all), and
its logits, at crop size, are pasted into an image-sized canvas of background logits.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import numpy as np
from scipy import ndimage

from uniultra.data.prompts import pad_boxes
from uniultra.data.regions import region_label_maps, regions_holding
from uniultra.inference.auto_predictor import has_auto_head
from uniultra.inference.presence_gate import CALIBRATED_GATE, PresenceGate
from uniultra.inference.prompts import LOGIT_CLAMP, PromptSet
from uniultra.inference.roi import (
    TAP_SIDES,
    Roi,
    crop,
    enlarge_box,
    mask_box,
    mask_edges,
    paste,
    roi_around_box,
    tap_square,
)
from uniultra.inference.session import ImageSession

DEFAULT_MARGIN = 1.4
# A tap is also answered on square crops centred on it, of these sides (fractions of the image's longer
# side); the answer that agrees best with the others (mean IoU) wins, plus TAP_SCORE_WEIGHT x its
# predicted IoU, less a penalty when its mask touches its crop's border (the object was cut off).
# Agreement alone beat the predicted IoU alone (carotid held out: 78.9 vs 67.4 tap Dice); sides and
# penalty were chosen on the val splits of the six shared sets (mean tap Dice: sides up to 0.45 with
# penalty 0.5, 57.5; these, 66.1); adding half the predicted IoU raised that to 69.5 (carotid 74.6 ->
# 91.7, busi 68.0 -> 66.9; weights 0.4-0.7 within 0.5 of each other). A zoomed model almost never
# touches its crop's border (it was trained on crops that hold the whole object), so the penalty rarely acts.
DEFAULT_TAP_SCALES = TAP_SIDES
BORDER_PENALTY = 2.0
TAP_SCORE_WEIGHT = 0.5
# Automatic mode: parts of the head's mask smaller than this share of its largest part are left out of
# the box that is refined (fragments far from the object would stretch it).
MAIN_PART_SHARE = 0.2
# A tap says where, not how far. With an automatic head and a modality chosen, the head's mask (the
# anatomy it was trained on, no prompt) is read first: its connected part under the tap, loosened by
# TAP_LOCATOR_PADDING px at 1024 scale, is answered as a box with the tap, and that answer is kept when
# it agrees with the part (IoU above TAP_LOCATOR_AGREEMENT; else the crops decide as without a head).
# Chosen on the val splits with the default (benchmarks/probe_tap_locator.py, mean tap Dice over the six
# sets 69.5 -> 73.2 at 0.7; 0.6 / 0.8: 73.0 / 73.0; padding 0 / 20: 72.2 / 73.2; always taking the part's
# box: 68.5, since the head is a poor locator of carotid, nerves and vessels, where the agreement test
# mostly leaves the crops' answer).
TAP_LOCATOR_PADDING = 10.0
TAP_LOCATOR_AGREEMENT = 0.7
# A located tap's answer is the mean of the box answer's and the head's logits (the part of it under the
# tap): since the head has its own whole-scan encoder (2026-12-06 evening) the two err in different
# places. Val, same padding and agreement, the default (benchmarks/probe_tap_locator.py): mean tap Dice
# over the six sets 77.33 -> 78.30, no set lower (tg3k +3.0, carotid +1.3, vessels +0.8, ddti +0.6).
# A tap with no anatomy named (the head cannot locate it, or there is no head) may be on anatomy the
# model never saw, where its choice among the crops loses 14-25 Dice against the best crop. The region
# maps of the foundation stage (uniultra.data.regions: no labels, no training, ~0.08 s an image) hold
# such objects too: each distinct region holding the tap is answered as its box, loosened by
# TAP_LOCATOR_PADDING, with the tap, and these answers join the crops' under the same score
# (`_region_answers`). BENCHMARKS.md, "Taps located by unsupervised regions": on the leave-one-out folds'
# held-out sets one tap goes busi 52.6 -> 63.8, ddti 38.9 -> 42.4, tg3k 43.6 -> 56.2, carotid 67.5 ->
# 76.2, vessel 53.8 -> 57.6, nerve 44.3 -> 43.8 (with REGION_COPY_IOU); on trained anatomy the model's
# own crops are better (test, unnamed: nerve 61.3 -> 51.9, vessel 80.0 -> 72.0), hence only when no
# anatomy is named.
# Nested regions of several levels often give one answer several times over; its copies would outvote
# the crops (nerves and vessels), so answers of regions alike above this IoU count once in the vote.
# Chosen with one leave-one-out fold left out at a time (probe_tap_regions.py --select: 0.9 on four folds
# of five); end to end, held-out one tap mean 55.2 -> 56.6, test unnamed 67.3 -> 68.8 (ddti -0.9 / -2.4).
REGION_COPY_IOU = 0.9
# Side of the crop around a tapped point whose first pass found nothing, as a fraction of the image.
EMPTY_TAP_FRACTION = 0.25
# Boxes drawn tight around the object (from a reference mask or a detector; `--tight-boxes`) are pushed
# outward by this many px at 1024 scale on each side first: the model was trained on boxes loosened by
# 0-30 px, so to it a tight box cuts into the object. Chosen on the val splits of the six shared sets with
# the default (box J = 0, mean Dice over the six: padding 0 / 4 / 6 / 8 / 10 / 12 -> 87.36 / 88.41 /
# 88.56 / 88.49 / 88.22 / 87.74); on loose boxes it costs Dice (J = 20: 87.53 -> 86.06), hence opt-in.
TIGHT_BOX_PADDING = 6.0


class ZoomPredictor(ImageSession):
    def __init__(self, predictor, margin: float = DEFAULT_MARGIN,
                 tap_scales: tuple[float, ...] = DEFAULT_TAP_SCALES, refine_auto: bool = False,
                 box_padding: float = 0.0, tap_locator: bool = True, tap_regions: bool = True,
                 tap_locator_votes: bool = False) -> None:
        super().__init__()
        if margin < 1.0:
            raise ValueError(f"zoom margin must be >= 1 (the crop must hold the box), got {margin}")
        if box_padding < 0:
            raise ValueError(f"box padding must be >= 0 px (boxes are only ever loosened), got {box_padding}")
        self.predictor = predictor
        self.margin = margin
        self.tap_scales = tuple(tap_scales)
        # Px at 1024 scale added to each side of every box before it is answered (TIGHT_BOX_PADDING).
        self.box_padding = box_padding
        # Boxes touch their objects: answered with the exact-box tokens of a model that has them.
        self.exact_boxes = False
        # Boxes touch their objects, so nothing of an object lies outside its box as drawn: the answer is
        # cut to it. Val, box J = 0 with the padding: mean Dice 88.89 -> 89.01, no set lower (busi +0.16,
        # tg3k +0.30, nerves +0.20; benchmarks/probe_box_fit.py --tight --rules clip).
        self.clip_to_boxes = False
        # Automatic mode, optionally: the head's whole-image mask only finds the object and its box is
        # answered on a crop like a user's box (see `_predict_auto`). Off by default: with the default's
        # head it LOWERED the val Dice on all six sets (busi lesion images 45.2 -> 43.7, carotid 70.4
        # -> 64.3; benchmarks/bench_auto.py): where the head's mask is wrong the box is wrong too.
        self.refine_auto = refine_auto
        # Taps located by the automatic head's part first (TAP_LOCATOR_AGREEMENT), when there is a head
        # and a modality is chosen.
        self.tap_locator = tap_locator
        # A located answer that disagrees with the head's part joins the crops' vote instead of being dropped.
        # Off: val mean one-tap Dice +0.2 (busi +0.7, tg3k +1.1, vessels +0.7, nerves -1.2;
        # benchmarks/probe_tap_variants.py), the size of a change not shipped before.
        self.tap_locator_votes = tap_locator_votes
        # Taps not located by the head: the unsupervised regions holding them compete with the crops.
        self.tap_regions = tap_regions
        self._region_maps: np.ndarray | None = None
        # The head's whole-image logits per modality, for the image set: every tap on it reads them, while
        # each tap's crops replace the whole image's encoding in the wrapped predictor.
        self._head_logits: dict[str, np.ndarray] = {}
        self._whole_image_set = False

    def around(self, predictor) -> ZoomPredictor:
        """A twin with every setting of this one (margin, taps, tight boxes, ...) around `predictor`, with no
        image set: the web app keeps one per cached image."""
        twin = copy.copy(self)
        twin.predictor = predictor
        twin.reset_image()
        twin._region_maps, twin._head_logits, twin._whole_image_set = None, {}, False
        return twin

    def __getattr__(self, name: str):
        # Everything but set_image/predict (model, modality, mask_threshold, ...) is the wrapped predictor's.
        if name in ("predictor", "predict_auto"):
            raise AttributeError(name)
        return getattr(self.predictor, name)

    def set_image(self, image: np.ndarray | str | os.PathLike) -> None:
        image = self.load_image(image)
        # Nothing is encoded yet: each object's crop is, in predict; the session keeps the image itself.
        self._remember(image, image)
        self._whole_image_set = False
        self._region_maps = None
        self._head_logits = {}

    def predict(self, box=None, points=None, labels=None, mask_input=None, multimask: bool = False,
                return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same arguments and return shapes as `Predictor.predict`; the low-res logits returned are
        those of each object's crop. `mask_input` is not supported (crops differ per object)."""
        image = self._require_image()
        if mask_input is not None:
            raise ValueError("a zoomed predictor takes no mask_input: each object is answered on its own crop")
        prompts = PromptSet.from_user(box, points, labels, self.orig_hw)
        drawn = prompts.boxes if self.clip_to_boxes else None
        if prompts.boxes is not None and self.box_padding:
            prompts.boxes = pad_boxes(prompts.boxes, self.orig_hw, self.box_padding)
        n = len(prompts.boxes) if prompts.boxes is not None else len(prompts.points)
        results = [self._predict_object(image, prompts, i, multimask, return_logits) for i in range(n)]
        masks, scores, low = (np.stack([r[k] for r in results]) for k in range(3))
        if drawn is not None:
            masks = _cut_to_boxes(masks, drawn, prompts, -LOGIT_CLAMP if return_logits else False)
        return (masks, scores, low) if prompts.batched else (masks[0], scores[0], low[0])

    def selects_modality(self, automatic: bool = False, tap: bool = False) -> bool:
        """Whether a modality changes the output: the wrapped predictor's answer, and for taps the
        automatic head's channel that locates them."""
        return self.predictor.selects_modality(automatic) or (tap and self._locates_taps())

    def _locates_taps(self) -> bool:
        return self.tap_locator and has_auto_head(self.predictor) and bool(self.predictor.modality_choices)

    @property
    def modality(self):
        """The wrapped predictor's modality (the automatic head's channel), read and set through."""
        return self.predictor.modality

    @modality.setter
    def modality(self, name) -> None:
        self.predictor.modality = name

    @property
    def max_hole_share(self) -> float:
        """The wrapped predictor's (it answers each crop): holes up to this share of their object are filled."""
        return self.predictor.max_hole_share

    @max_hole_share.setter
    def max_hole_share(self, share: float) -> None:
        self.predictor.max_hole_share = share

    def predict_without_prompt(self, return_logits: bool = False):
        """No prompt: an automatic head's answer (refined, see `_predict_auto`), else the wrapped
        predictor's plain answer on the whole image."""
        if callable(getattr(self.predictor, "predict_auto", None)):
            return self._predict_auto(None, return_logits)
        self._encode_whole_image()
        return self.predictor.predict_without_prompt(return_logits)

    @property
    def predict_auto(self):
        """The wrapped predictor's automatic head on the whole image; absent (AttributeError) when it
        has none, so that callers can tell, as with any predictor."""
        if not callable(getattr(self.predictor, "predict_auto", None)):
            raise AttributeError("predict_auto: the wrapped predictor has no automatic head")
        return self._predict_auto

    def _predict_auto(self, modality: str | None = None, return_logits: bool = False,
                      presence_gate: PresenceGate = CALIBRATED_GATE):
        """The head's answer on the whole image; with `refine_auto`, then the box of its main parts
        answered on a crop, as a user's box would be: the head localises, the zoomed box path
        draws the boundary. The score stays the head's presence probability."""
        self._encode_whole_image()
        found, score, low = self.predictor.predict_auto(modality, return_logits, presence_gate)
        if not self.refine_auto:
            return found, score, low
        box = main_parts_box(found > self.predictor.mask_threshold if return_logits else found)
        if box is None:
            return found, score, low
        masks, _, low = self.predict(box=box, return_logits=return_logits)  # one candidate: (1, H, W)
        return masks[0], score, low[0]

    def _encode_whole_image(self) -> None:
        image = self._require_image()
        if not self._whole_image_set:
            self.predictor.set_image(image)
            self._whole_image_set = True

    def _predict_object(self, image: np.ndarray, prompts: PromptSet, i: int, multimask: bool,
                        return_logits: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        box = None if prompts.boxes is None else prompts.boxes[i]
        points = None if prompts.points is None else prompts.points[i]
        labels = None if prompts.labels is None else prompts.labels[i]
        tap = box is None and (labels == 1).any()
        located = self._located_tap(image, points, labels, return_logits) if tap and not multimask else None
        if located is not None and located[1]:
            return located[0][:3]
        rois = [self._roi(box, points, labels)]
        if tap:
            rois += self._tap_rois(points[labels == 1])
        answers = [self._answer_on(image, roi, box, points, labels, multimask, return_logits) for roi in rois]
        if located is not None and self.tap_locator_votes:
            answers.append(located[0])
        crops = len(answers)
        if tap and not multimask and self.tap_regions and getattr(self.predictor, "modality", None) is None:
            answers += self._region_answers(image, points, labels, return_logits)
        return answers[_most_agreed(answers, self.predictor.mask_threshold, return_logits, copies_from=crops)][:3]

    def _region_answers(self, image: np.ndarray, points: np.ndarray, labels: np.ndarray,
                        return_logits: bool) -> list[tuple]:
        """Each unsupervised region (uniultra.data.regions) holding a positive point and no negative one,
        answered as its box loosened by TAP_LOCATOR_PADDING, with the points."""
        if self._region_maps is None:  # once per image, for every tap on it
            self._region_maps = region_label_maps(image)
        regions = regions_holding(self._region_maps, points[labels == 1], self.orig_hw, points[labels == 0])
        boxes = [pad_boxes(mask_box(region), self.orig_hw, TAP_LOCATOR_PADDING) for region in regions]
        return [self._answer_on(image, self._roi(box, points, labels), box, points, labels, False, return_logits,
                                exact_box=False) for box in boxes]

    def _located_tap(self, image: np.ndarray, points: np.ndarray, labels: np.ndarray,
                     return_logits: bool) -> tuple[tuple, bool] | None:
        """(the tap answered as the box of the automatic head's part under it, as a crop answer's 4-tuple;
        whether that answer agrees with the part, TAP_LOCATOR_AGREEMENT); None without a head, a modality
        or such a part."""
        if not self._locates_taps() or self.predictor.modality is None:
            return None
        threshold, positives = self.predictor.mask_threshold, points[labels == 1]
        head = self._head_answer(self.predictor.modality)
        part = parts_under(head > threshold, positives)
        if part is None:
            return None
        box = pad_boxes(mask_box(part), self.orig_hw, TAP_LOCATOR_PADDING)
        # The part's box is loosened on purpose: never the exact-box tokens, even under --tight-boxes.
        logits, scores, low, cut_off = self._answer_on(image, self._roi(box, points, labels), box, points, labels,
                                                       False, True, exact_box=False)
        agrees = _iou(logits[0] > threshold, part) > TAP_LOCATOR_AGREEMENT
        # The head's and the box answer's mean logit, its part under the tap (see TAP_LOCATOR_AGREEMENT).
        blend = (logits[0] + head) / 2
        kept = parts_under(blend > threshold, positives)
        if kept is None:
            return None
        answer = np.where(kept, blend, -LOGIT_CLAMP)[None]
        return ((answer if return_logits else answer > threshold), scores, low, cut_off), agrees

    def _head_answer(self, modality: str) -> np.ndarray:
        """The automatic head's logits for `modality` on the whole image, computed once per image."""
        if modality not in self._head_logits:
            self._encode_whole_image()
            # A tap says the object is there: the presence gate, which answers "is anything here", stays off.
            logits = self.predictor.predict_auto(modality, return_logits=True, presence_gate="off")[0]
            self._head_logits[modality] = np.asarray(logits, np.float32)
        return self._head_logits[modality]

    def _tap_rois(self, positives: np.ndarray) -> list[Roi]:
        return [tap_square(positives, scale, self.orig_hw) for scale in self.tap_scales]

    def _answer_on(self, image: np.ndarray, roi: Roi, box, points, labels, multimask: bool,
                   return_logits: bool, exact_box: bool | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(masks or logits at image size, scores, crop low-res logits, which masks touch the crop's
        border (M,)) on one crop. `exact_box`: the box touches its object (default: `exact_boxes`)."""
        self.predictor.set_image(crop(image, roi))
        self._whole_image_set = False
        offset = roi.offset
        kwargs = {"multimask": multimask, "return_logits": True}
        if box is not None:
            kwargs["box"] = box - np.tile(offset, 2)
            if self.exact_boxes if exact_box is None else exact_box:
                kwargs["exact_box"] = True
        if points is not None:
            kwargs["points"], kwargs["labels"] = _points_in_roi(points, labels, roi)
        logits, scores, low = self.predictor.predict(**kwargs)
        logits = np.asarray(logits, dtype=np.float32)
        full = paste(logits, roi, self.orig_hw, -LOGIT_CLAMP)
        cut_off = touches_border(logits > self.predictor.mask_threshold)
        return (full if return_logits else full > self.predictor.mask_threshold), scores, low, cut_off

    def _roi(self, box: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None) -> Roi:
        positives = np.zeros((0, 2)) if points is None else points[labels == 1]
        if box is None:
            box = self._first_pass_box(points, labels, positives)
        return roi_around_box(_box_holding(box, positives), self.orig_hw, self.margin)

    def _first_pass_box(self, points: np.ndarray, labels: np.ndarray, positives: np.ndarray) -> np.ndarray:
        """Box of what a whole-image pass segments for the points (the part holding a positive point)."""
        self._encode_whole_image()
        mask = np.asarray(self.predictor.predict(points=points, labels=labels)[0][0], dtype=bool)
        part = parts_under(mask, positives)
        box = mask_box(mask if part is None else part)
        if box is not None:
            return box
        anchor = positives.mean(0) if len(positives) else points.reshape(-1, 2).mean(0)
        half = EMPTY_TAP_FRACTION * max(self.orig_hw) / 2
        return np.concatenate([anchor - half, anchor + half])


def answer_tight_boxes(predictor, spec: str = "this model") -> None:
    """Tell `predictor` that its boxes touch their objects (`--tight-boxes`): a zoomed model with
    exact-box tokens gets them; one without loosens every box by TIGHT_BOX_PADDING first. Only zoomed
    models were measured, so any other predictor (or a baseline: None) is refused."""
    if not isinstance(predictor, ZoomPredictor):
        raise ValueError(f"{spec}: --tight-boxes is for zoomed models (trained on loosened boxes, so a tight box "
                         "is loosened for them first); this one takes boxes as they are drawn")
    if predictor.supports_exact_box:
        predictor.exact_boxes = True
    else:
        predictor.box_padding = TIGHT_BOX_PADDING
    predictor.clip_to_boxes = True


@contextmanager
def tight_boxes_for(predictor, tight: bool, spec: str):
    """`answer_tight_boxes` for the duration of one request (the web app's predictors are shared by
    requests that may differ); nothing changes when `tight` is false."""
    if not tight:
        yield predictor
        return
    answer_tight_boxes(predictor, spec)  # refuses any predictor but a zoomed one, before changing it
    try:
        yield predictor
    finally:
        # A shared predictor answers loose boxes.
        predictor.box_padding, predictor.exact_boxes, predictor.clip_to_boxes = 0.0, False, False


@contextmanager
def tap_modality_for(predictor, modality: str | None, tap: bool):
    """The automatic head's channel that locates one request's tap (`ZoomPredictor`'s tap locator), put
    back afterwards (the web app's predictors are shared); nothing changes when `modality` is None. A
    modality where it would select nothing (a box in the request, a model without the locator) is refused."""
    if modality is None:
        yield predictor
        return
    selects = getattr(predictor, "selects_modality", None)
    if not (tap and selects is not None and selects(tap=True)):
        raise ValueError("a modality locates a tap (points only, no box) on a zoomed model with an automatic head: "
                         "this request has a box or the model has no such head")
    predictor.check_modality(modality)
    before = predictor.modality
    predictor.modality = modality
    try:
        yield predictor
    finally:
        predictor.modality = before


def _most_agreed(answers: list[tuple], threshold: float, logits: bool, copies_from: int | None = None) -> int:
    """Index of the candidate mask with the highest agreement plus TAP_SCORE_WEIGHT x its predicted IoU,
    less the border penalty. Agreement: the mean IoU with the others, where the answers from index
    `copies_from` on that are near-copies of each other (IoU above REGION_COPY_IOU) count as one voter."""
    if len(answers) == 1:
        return 0
    masks = [(a[0][0] > threshold) if logits else a[0][0] for a in answers]
    ious = np.array([[_iou(a, b) for b in masks] for a in masks])
    voters = _voters(ious, len(masks) if copies_from is None else copies_from)
    scores = []
    for i in range(len(masks)):
        agreement = np.mean([ious[i, voter].mean() for voter in voters if i not in voter] or [0.0])
        predicted = float(np.ravel(answers[i][1])[0])
        scores.append(float(agreement) + TAP_SCORE_WEIGHT * predicted
                      - BORDER_PENALTY * float(np.ravel(answers[i][3])[0]))
    return int(np.argmax(scores))


def _voters(ious: np.ndarray, copies_from: int, copy_iou: float = REGION_COPY_IOU) -> list[list[int]]:
    """Candidates before `copies_from` vote alone; later ones join the first later voter they copy
    (IoU with its first member above `copy_iou`)."""
    voters: list[list[int]] = []
    for k in range(len(ious)):
        copied = next((v for v in voters if k >= copies_from and v[0] >= copies_from
                       and ious[k, v[0]] > copy_iou), None)
        if copied is None:
            voters.append([k])
        else:
            copied.append(k)
    return voters


def _cut_to_boxes(masks: np.ndarray, boxes: np.ndarray, prompts: PromptSet, background) -> np.ndarray:
    """`masks` (N, C, H, W) with everything outside each object's box (xyxy, pixels inclusive), extended
    to hold its positive points, set to `background`."""
    masks = masks.copy()
    for i, box in enumerate(boxes):
        if prompts.points is not None:
            box = _box_holding(box, prompts.points[i][prompts.labels[i] == 1])
        x0, y0 = np.floor(box[:2]).astype(int).clip(0)
        x1, y1 = np.ceil(box[2:]).astype(int) + 1
        inside = np.zeros(masks.shape[-2:], dtype=bool)
        inside[y0:y1, x0:x1] = True
        masks[i][:, ~inside] = background
    return masks


def _box_holding(box: np.ndarray, points: np.ndarray) -> np.ndarray:
    """`box` (xyxy) extended to hold `points` (P, 2)."""
    if not len(points):
        return box
    return np.concatenate([np.minimum(box[:2], points.min(0)), np.maximum(box[2:], points.max(0))])


def parts_under(mask: np.ndarray, points: np.ndarray) -> np.ndarray | None:
    """The connected parts of `mask` (8-connected) that hold one of `points` (x, y), or None."""
    components, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    hit = {int(components[int(y), int(x)]) for x, y in np.clip(points, 0, None).astype(int)
           if y < mask.shape[0] and x < mask.shape[1]} - {0}
    return np.isin(components, list(hit)) if hit else None


def touches_border(masks: np.ndarray) -> np.ndarray:
    """Per mask of (M, H, W): does it reach the crop's outermost rows or columns (cut off by the crop)."""
    return masks[:, [0, -1], :].any(axis=(1, 2)) | masks[:, :, [0, -1]].any(axis=(1, 2))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def main_parts_box(mask: np.ndarray, min_share: float = MAIN_PART_SHARE) -> np.ndarray | None:
    """Box prompt (pixel edges, enlarged like a user's loose box: `enlarge_box`) of a mask's connected
    parts of at least `min_share` of the largest part's area (stray fragments would stretch it);
    None for an empty mask."""
    components, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return None
    areas = np.bincount(components.ravel())[1:]
    kept = np.flatnonzero(areas >= min_share * areas.max()) + 1
    return np.asarray(enlarge_box(mask_edges(np.isin(components, kept)), mask.shape))


def _points_in_roi(points: np.ndarray, labels: np.ndarray, roi: Roi) -> tuple[np.ndarray, np.ndarray]:
    """Points in crop pixels; those outside the crop become padding (label -1 at the origin)."""
    local = points - roi.offset
    inside = (local[:, 0] >= 0) & (local[:, 1] >= 0) & (local[:, 0] <= roi.width) & (local[:, 1] <= roi.height)
    return np.where(inside[:, None], local, 0.0), np.where(inside, labels, -1)
