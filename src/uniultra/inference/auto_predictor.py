"""Automatic-mode prediction: `set_image` once, then `predict_auto` needs no prompt at all.

An automatic-mode checkpoint keeps its base model whole, so `AutoPredictor` is a `Predictor` on
that base (same preprocessing, same cached embedding, box / point prompts still answered) plus
the automatic head's `predict_auto`. A head with an encoder of its own encodes the image a second
time, on its first `predict_auto` for that image: box prompts never pay for it.

`choose_modality` and `check_modality_option` serve `uniultra evaluate` and `uniultra predict`
for both kinds of modality: an automatic head's decoding channel and a plain model's encoder
controller (uniultra.peft.controller).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from uniultra.inference.predictor import Predictor, float32_features
from uniultra.inference.presence_gate import CALIBRATED_GATE, PresenceGate, answers_empty, gate_in_force
from uniultra.models.auto_segmenter import ABSENT_LOGIT, AutoSegmenter, presence


class AutoPredictor(Predictor):
    def __init__(self, model: AutoSegmenter, mask_threshold: float = 0.0, autocast: bool = True,
                 modality: str | None = None, cpu_bf16: bool = False) -> None:
        super().__init__(model.base, mask_threshold, autocast, cpu_bf16=cpu_bf16)
        self.auto = model.eval()
        # `modality` is also the channel used when `predict_auto` is given none (None: the only one).
        self.modality = modality
        # With an own encoder: the current image's model input, and its automatic features once computed.
        self._auto_input: torch.Tensor | None = None
        self._auto_features = None

    @property
    def modality_choices(self) -> tuple[str, ...]:
        """Names that select a decoding channel; empty when one shared channel decodes every modality."""
        config = self.auto.config
        return config.modalities if config.modality_decoder else ()

    def check_modality(self, name: str) -> None:
        self.auto.modality_index(name)  # an unknown name fails here, listing the known ones

    def selects_modality(self, automatic: bool = False, tap: bool = False) -> bool:
        # Taps: only a zoomed predictor around this one locates them with the head (ZoomPredictor).
        return automatic or super().selects_modality(automatic)

    def _encode(self, x: torch.Tensor):
        if self.auto.encoder is None:
            return self.auto.encode_image(x)  # one encoding serves prompts and the automatic path
        self._auto_input, self._auto_features = x, None
        return self.model.encode_image(x)

    def reset_image(self) -> None:
        super().reset_image()
        self._auto_input, self._auto_features = None, None

    def automatic_features(self):
        """The current image's features for the automatic path (its own encoder's, computed once)."""
        features = self._require_image()
        if self.auto.encoder is None:
            return features
        if self._auto_features is None:
            with torch.inference_mode(), self._encoder_autocast():
                encoded = self.auto.encode_image(self._auto_input)
            self._auto_features = float32_features(encoded) if self.cpu_bf16 else encoded
        return self._auto_features

    def resolve_presence_gate(self, gate: PresenceGate = CALIBRATED_GATE) -> float | None:
        """The presence probability `gate` stands for with this checkpoint (None: no gate)."""
        return gate_in_force(gate, self.auto.config.presence_threshold)

    def set_presence_gate(self, gate: PresenceGate) -> float | None:
        """Make `gate` the one every later call holds to (`resolve_presence_gate`'s 'calibrated')."""
        threshold = self.resolve_presence_gate(gate)
        self.auto.config = dataclasses.replace(self.auto.config, presence_threshold=threshold)
        return threshold

    @torch.inference_mode()
    def predict_auto(self, modality: str | None = None, return_logits: bool = False,
                     presence_gate: PresenceGate = CALIBRATED_GATE) -> tuple[np.ndarray, float, np.ndarray]:
        """Mask of the current image without any prompt, decoded through `modality`'s channel.

        Returns (mask (H, W) bool at the original size, or float logits with `return_logits`;
        score = the presence probability (`uniultra.models.auto_segmenter.presence`), i.e. how sure
        the model is that the image contains the target at all; low-res logits (S/4, S/4)).
        An image whose score is below `presence_gate` (uniultra.inference.presence_gate; default the
        checkpoint's own) is answered empty.
        """
        threshold = self.resolve_presence_gate(presence_gate)
        features = self.automatic_features()
        channel = self.auto.modality_index(modality if modality is not None else self.modality)
        with self._autocast():
            out = self.auto.decode_auto(features, torch.tensor([channel], device=self.device), gated=False)
        score = float(presence(out)[0])
        low = out.low_res_logits
        if answers_empty(score, threshold):
            low = torch.full_like(low, ABSENT_LOGIT)
        mask, logits = self._to_image_size(low, return_logits)
        return mask[0, 0], score, logits[0, 0]

    def predict_without_prompt(self, return_logits: bool = False) -> tuple[np.ndarray, float, np.ndarray]:
        """With no prompt, an automatic-mode model answers through its head (channel `self.modality`)."""
        return self.predict_auto(None, return_logits)


def automatic_head(predictor: object) -> AutoSegmenter | None:
    """The automatic head behind a predictor (an `AutoPredictor`, or a wrapper of one such as
    `ZoomPredictor`); None for a model without one and for exported (ONNX, OpenVINO) models."""
    for candidate in (predictor, getattr(predictor, "predictor", None)):
        auto = getattr(candidate, "auto", None)
        if isinstance(auto, AutoSegmenter):
            return auto
    return None


def has_auto_head(predictor: object) -> bool:
    """Whether a predictor (an `AutoPredictor`, or a wrapper of one such as `ZoomPredictor`) segments
    without prompts through an automatic head."""
    return callable(getattr(predictor, "predict_auto", None))


def choose_modality(predictor: Predictor, requested: str | None, dataset: str | None = None,
                    required: bool = True) -> str | None:
    """The modality to run: `requested` if given, else the dataset's (folder) name when the model
    knows it, else the automatic head's only channel, or a controller's shared network (None; also
    the answer for one shared channel)."""
    names = predictor.modality_choices
    if requested is not None:
        predictor.check_modality(requested)
        return requested
    if dataset in names:
        return dataset
    if not has_auto_head(predictor):
        return None  # the controller's shared network: what every modality has in common
    if len(names) <= 1:
        return names[0] if names else None
    if not required:  # taps: without a known modality they are answered without the head
        return None
    shown = f"the dataset name {dataset!r} is none of them" if dataset else "none was named"
    raise ValueError(f"the model decodes each modality separately ({', '.join(names)}) and {shown}: "
                     "choose one with --modality NAME")


def check_modality_option(predictor: object, spec: str, requested: str | None, automatic: bool,
                          tap: bool = False) -> None:
    """Refuse `--modality` where it selects nothing: a model with neither automatic head nor
    modality controller, or an automatic head's channel with box prompts (`automatic`: --prompt none;
    `tap`: point prompts only, which a zoomed model with a head locates through the channel)."""
    selects = getattr(predictor, "selects_modality", None)
    if requested is None or (selects is not None and selects(automatic, tap=tap)):
        return
    if has_auto_head(predictor):
        raise ValueError("--modality selects a channel of the automatic head: use it with --prompt none, or with "
                         "point prompts only (taps) on a zoomed model")
    raise ValueError(f"{spec} has no automatic head and no modality controller: --modality applies only to "
                     "checkpoints from `uniultra auto train` and to MDKD students (`uniultra distill` with mdkd)")
