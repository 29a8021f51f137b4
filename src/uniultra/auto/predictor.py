"""Automatic-mode prediction: `set_image` once, then `predict_auto` needs no prompt at all.

An automatic-mode checkpoint keeps its base model whole, so `AutoPredictor` is a `Predictor` on
that base (same preprocessing, same cached embedding, box / point prompts still answered) plus
the automatic head's `predict_auto`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from uniultra.auto.checkpoint import is_auto_checkpoint, load_auto_model
from uniultra.auto.model import AutoSegmenter
from uniultra.models.checkpoint import load_model
from uniultra.models.image_model import SAM2ImageModel
from uniultra.predictor import Predictor


class AutoPredictor(Predictor):
    def __init__(self, model: AutoSegmenter, mask_threshold: float = 0.0, autocast: bool = True,
                 modality: str | None = None) -> None:
        super().__init__(model.base, mask_threshold, autocast)
        self.auto = model.eval()
        self.modality = modality

    @property
    def modality(self) -> str | None:
        """Channel used when `predict_auto` is given no modality (None: the model's only channel)."""
        return self._modality

    @modality.setter
    def modality(self, name: str | None) -> None:
        if name is not None:
            self.auto.modality_index(name)  # an unknown name fails here, listing the known ones
        self._modality = name

    @property
    def modality_choices(self) -> tuple[str, ...]:
        """Names that select a decoding channel; empty when one shared channel decodes every modality."""
        config = self.auto.config
        return config.modalities if config.modality_decoder else ()

    def _encode(self, x: torch.Tensor):
        return self.auto.encode_image(x)

    @torch.inference_mode()
    def predict_auto(self, modality: str | None = None,
                     return_logits: bool = False) -> tuple[np.ndarray, float, np.ndarray]:
        """Mask of the current image without any prompt, decoded through `modality`'s channel.

        Returns (mask (H, W) bool at the original size, or float logits with `return_logits`;
        score = the highest patch probability of the prompt generator, i.e. how sure the model is
        that the image contains the target at all; low-res logits (S/4, S/4)).
        """
        features = self._require_image()
        channel = self.auto.modality_index(modality if modality is not None else self.modality)
        with self._autocast():
            out = self.auto.decode_auto(features, torch.tensor([channel], device=self.device))
        mask, logits = self._to_image_size(out.low_res_logits, return_logits)
        score = float(torch.sigmoid(out.patch_logits.float()).max())
        return mask[0, 0], score, logits[0, 0]

    def predict_without_prompt(self, return_logits: bool = False) -> tuple[np.ndarray, float, np.ndarray]:
        """With no prompt, an automatic-mode model answers through its head (channel `self.modality`)."""
        return self.predict_auto(None, return_logits)


def choose_modality(predictor: AutoPredictor, requested: str | None, dataset: str | None = None) -> str | None:
    """The channel to decode with: `requested` if given, else the dataset's (folder) name when the
    model has a channel of that name, else the model's only channel. None = one shared channel."""
    names = predictor.modality_choices
    if requested is not None:
        predictor.auto.modality_index(requested)
        return requested
    if dataset in names:
        return dataset
    if len(names) <= 1:
        return names[0] if names else None
    shown = f"the dataset name {dataset!r} is none of them" if dataset else "none was named"
    raise ValueError(f"the model decodes each modality separately ({', '.join(names)}) and {shown}: "
                     "choose one with --modality NAME")


def load_any_model(spec: str | os.PathLike, image_size: int | None = None,
                   device: str | torch.device = "cpu") -> SAM2ImageModel | AutoSegmenter:
    """What `load_model` loads, except that an automatic-mode checkpoint keeps its head."""
    if not (Path(spec).is_file() and is_auto_checkpoint(spec)):
        return load_model(spec, image_size=image_size, device=device)
    model = load_auto_model(spec, device=device)
    if image_size not in (None, model.image_size):
        raise ValueError(f"{spec}: an automatic-mode checkpoint runs at the size it was trained at "
                         f"({model.image_size} px), not --size {image_size}")
    return model


def load_predictor(spec: str | os.PathLike, image_size: int | None = None,
                   device: str | torch.device = "cpu") -> Predictor:
    """A `Predictor` for any model spec, an `AutoPredictor` for an automatic-mode checkpoint."""
    model = load_any_model(spec, image_size=image_size, device=device)
    return AutoPredictor(model) if isinstance(model, AutoSegmenter) else Predictor(model)
