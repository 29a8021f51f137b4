"""Interactive prediction in the style of SAM2: `set_image` once, then many `predict` calls.

Prompts are given in pixel coordinates of the ORIGINAL image, and masks come back at its size.
A model with a modality controller (uniultra.peft.controller, e.g. an MDKD student) encodes each
image under `modality` (None: the shared network); other models ignore it.
With `cpu_bf16` the encoder runs under bf16 autocast on CPU (fast only where the CPU has bf16 units,
see uniultra.inference.cpu); its features are widened back to fp32 and the decoder runs fp32.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from uniultra.inference.coords import prompt_tokens
from uniultra.inference.holes import DEFAULT_MAX_HOLE_SHARE, fill_small_holes
from uniultra.inference.prompts import LOGIT_CLAMP, PromptSet, check_exact_box
from uniultra.inference.session import ImageSession, require_pixels
from uniultra.inference.transforms import image_to_model, upsample_logits
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft.controller import modality_ids, modality_names, use_modality


class Predictor(ImageSession):
    def __init__(self, model: SAM2ImageModel, mask_threshold: float = 0.0, autocast: bool = True,
                 modality: str | None = None, cpu_bf16: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.mask_threshold = mask_threshold
        # Holes up to this share of their object are filled in every mask (0: none; inference.holes).
        self.max_hole_share = DEFAULT_MAX_HOLE_SHARE
        self.device = next(model.parameters()).device
        # bf16 autocast by default only on CUDA; on CPU fp32 is exact, and faster without bf16 units.
        self._use_autocast = autocast and self.device.type == "cuda"
        # Asked for (`--runtime torch-bf16`): on CPU only the encoder, where the matrix work is.
        self.cpu_bf16 = cpu_bf16 and self.device.type == "cpu"
        self.modality = modality

    @property
    def modality(self) -> str | None:
        """The modality images are encoded under (from the next `set_image` on); None = the shared
        network. Checked against the model's names when set (see `check_modality`)."""
        return self._modality

    @modality.setter
    def modality(self, name: str | None) -> None:
        if name is not None:
            self.check_modality(name)
        self._modality = name

    @property
    def modality_choices(self) -> tuple[str, ...]:
        """The names `modality` selects: the encoder controller's modalities (empty without one)."""
        return modality_names(self.model)

    def check_modality(self, name: str) -> None:
        """ValueError listing the known names unless the model's controller knows `name` (a model
        without a controller ignores any name: it has only the shared network)."""
        if modality_names(self.model):
            modality_ids(self.model, name)

    def selects_modality(self, automatic: bool = False, tap: bool = False) -> bool:
        """Whether a modality changes this model's output (`automatic`: for no-prompt prediction;
        `tap`: for point prompts only)."""
        return bool(modality_names(self.model))

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Any accepted image -> normalised (1, 3, S, S) model input."""
        require_pixels(image)
        return self.model.normalize(image_to_model(image, self.model.image_size, self.device))

    @torch.inference_mode()
    def set_image(self, image: np.ndarray | str | os.PathLike) -> None:
        """Compute the image embedding once. Accepts an array (gray, RGB, RGBA; 8/16-bit, float) or a path."""
        image = self.load_image(image)
        x = self.preprocess(image)
        with self._encoder_autocast(), use_modality(self.model, self._controller_modality()):
            features = self._encode(x)
        self._remember(float32_features(features) if self.cpu_bf16 else features, image)

    def _controller_modality(self) -> str | None:
        """The modality the encoder's controller runs: `modality` if the controller knows it
        (an automatic head's channel may have no controller row), else the shared network."""
        return self.modality if self.modality in modality_names(self.model) else None

    def _encode(self, x: torch.Tensor):
        return self.model.encode_image(x)

    @property
    def supports_exact_box(self) -> bool:
        return self.model.config.decoder.exact_box_tokens

    @torch.inference_mode()
    def predict(
        self,
        box: np.ndarray | list | None = None,
        points: np.ndarray | list | None = None,
        labels: np.ndarray | list | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
        return_logits: bool = False,
        exact_box: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for box and/or point prompts on the current image.

        box: (4,) or (N, 4) xyxy; points: (P, 2) or (N, P, 2) xy; labels: 1 positive, 0 negative.
        exact_box: the boxes touch their objects (a reference mask's or a detector's box, not a
        hand-drawn one); only for models with exact-box tokens (`supports_exact_box`).
        Returns (masks (C, H, W) or (N, C, H, W), scores (C,) or (N, C), low-res logits), where C is
        3 with `multimask` else 1; a batched prompt (N, ...) keeps its leading axis even when N is 1.
        """
        self._require_image()
        prompts = PromptSet.from_user(box, points, labels, self.orig_hw)
        check_exact_box(exact_box, self.supports_exact_box, prompts.boxes)
        coords, point_labels = prompt_tokens(prompts.boxes, prompts.points, prompts.labels, self.orig_hw,
                                             self.model.image_size, exact_box)
        tokens = (torch.from_numpy(coords).to(self.device), torch.from_numpy(point_labels).to(self.device))
        mask_t = _tensor(mask_input, self.device) if mask_input is not None else None
        if mask_t is not None and mask_t.ndim == 3:
            mask_t = mask_t.unsqueeze(0)
        with self._autocast():
            out = self.model.decode(self._features, tokens, None, mask_t, multimask)
        masks, logits = self._to_image_size(out.low_res_logits, return_logits)
        result = (masks, out.iou_scores.float().cpu().numpy(), logits)
        return result if prompts.batched else tuple(r[0] for r in result)

    @torch.inference_mode()
    def predict_without_prompt(self, return_logits: bool = False) -> tuple[np.ndarray, float, np.ndarray]:
        """The model's mask for the current image when given no prompt at all.

        Here the plain decoder with no sparse prompt: the no-prompt baseline of the automatic mode
        (an `AutoPredictor` answers with its automatic head instead). Returns (mask (H, W), its
        predicted IoU, low-res logits).
        """
        features = self._require_image()
        with self._autocast():
            out = self.model.decode(features)
        mask, logits = self._to_image_size(out.low_res_logits, return_logits)
        return mask[0, 0], float(out.iou_scores[0, 0]), logits[0, 0]

    def _to_image_size(self, low_res_logits: torch.Tensor, return_logits: bool) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, h, w) decoder logits -> (masks, or logits, at the original image size; clamped low-res logits)."""
        logits = low_res_logits.float()
        masks = upsample_logits(self._holes_filled(logits), self.orig_hw)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks.cpu().numpy(), logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP).cpu().numpy()

    def _holes_filled(self, logits: torch.Tensor) -> torch.Tensor:
        """The low-res logits with their masks' small holes filled (uniultra.inference.holes)."""
        if self.max_hole_share <= 0:
            return logits
        array = logits.cpu().numpy()
        filled = fill_small_holes(array, self.mask_threshold, self.max_hole_share)
        return logits if filled is array else torch.from_numpy(filled).to(logits.device)

    def _encoder_autocast(self):
        if self.cpu_bf16:
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return self._autocast()

    def _autocast(self):
        if self._use_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def float32_features(value: Any) -> Any:
    """Features computed under bf16 autocast, widened to fp32 (tensors inside dataclasses and lists)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, list | tuple):
        return type(value)(float32_features(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: float32_features(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    return value


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=torch.float32, device=device)
