"""`set_image` once, then many `predict` calls, on ONNX Runtime with numpy only (no torch).

Same API, prompts and return shapes as `uniultra.inference.predictor.Predictor`; runs an export directory
written by `uniultra export onnx`. Pre-processing (RGB in [0, 1], antialiased bilinear resize,
ImageNet normalisation) and post-processing (bilinear upsampling of the low-res logits to the
original size) are the numpy twins in uniultra.inference.transforms_numpy. `ExportedPredictor` holds
all of that; `OnnxPredictor` and `uniultra.inference.openvino_predictor.OpenVinoPredictor` only run
the graphs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniultra.inference import onnx_format as md
from uniultra.inference.coords import prompt_tokens
from uniultra.inference.holes import DEFAULT_MAX_HOLE_SHARE, fill_small_holes
from uniultra.inference.presence_gate import CALIBRATED_GATE, PresenceGate, answers_empty, gate_in_force
from uniultra.inference.prompts import LOGIT_CLAMP, PromptSet, check_exact_box
from uniultra.inference.session import ImageSession, require_pixels
from uniultra.inference.transforms_numpy import image_to_model, upsample_logits


class ExportedPredictor(ImageSession):
    """What every runtime of an export directory shares: its metadata, the numpy pre- and
    post-processing, prompt encoding and `predict`. A subclass runs the two graphs (`_encode`,
    `_decode`); `OnnxPredictor` on onnxruntime, `OpenVinoPredictor` on OpenVINO."""

    def __init__(self, export_dir: str | os.PathLike, *, mask_threshold: float = 0.0, verify: bool = True) -> None:
        super().__init__()
        self.export_dir = Path(export_dir)
        self.metadata = md.read_metadata(self.export_dir, verify=verify)
        self.image_size = int(self.metadata["image_size"])
        self.low_res_size = int(self.metadata["low_res_size"])
        pre = self.metadata["preprocessing"]
        self.pixel_mean = np.asarray(pre["pixel_mean"], dtype=np.float32).reshape(3, 1, 1)
        self.pixel_std = np.asarray(pre["pixel_std"], dtype=np.float32).reshape(3, 1, 1)
        self.mask_threshold = mask_threshold
        self.max_hole_share = DEFAULT_MAX_HOLE_SHARE  # as `Predictor.max_hole_share`
        # The automatic head's graph, when the export has one (metadata "auto"): its channel names.
        self.auto_info = self.metadata.get("auto")
        # Exports before 2026-12-06 apply their presence gate inside the graph; later ones leave it to
        # `_predict_auto`, so that a call may choose another.
        self.gate_in_graph = bool((self.auto_info or {}).get("presence_gate_in_graph", True))
        self.presence_threshold = (self.auto_info or {}).get("presence_threshold")
        self.modality: str | None = None  # the channel `predict_without_prompt` decodes through
        self.has_box_decoder = "box_decoder" in self.metadata["files"]
        # An automatic head with an encoder of its own: the image is encoded for it on the first
        # `predict_auto` (`_automatic_features`), never for prompts.
        self.has_auto_encoder = "auto_encoder" in self.metadata["files"]
        self._auto_input: np.ndarray | None = None
        self._auto_features: dict[str, np.ndarray] | None = None
        decoder_config = self.metadata.get("model", {}).get("config", {}).get("decoder", {})
        self.supports_exact_box = bool(decoder_config.get("exact_box_tokens", False))

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(1, 3, S, S) model input -> the encoder's outputs by name."""
        raise NotImplementedError

    def _decode(self, wanted: list[str], feeds: dict[str, np.ndarray], box: bool = False) -> list[np.ndarray]:
        """The decoder's `wanted` outputs for `feeds` (`box`: the box decoder's)."""
        raise NotImplementedError

    def _run_auto(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The automatic graph's (logits, presence) for `feeds`."""
        raise NotImplementedError

    def _encode_auto(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(1, 3, S, S) model input -> the automatic path's own encoder's outputs by name."""
        raise NotImplementedError

    def reset_image(self) -> None:
        super().reset_image()
        self._auto_input, self._auto_features = None, None

    def _automatic_features(self) -> dict[str, np.ndarray]:
        features = self._require_image()
        if not self.has_auto_encoder:
            return features
        if self._auto_features is None:
            self._auto_features = self._encode_auto(self._auto_input)
        return self._auto_features

    def selects_modality(self, automatic: bool = False, tap: bool = False) -> bool:
        """Only the automatic head's channel (an export holds no modality controller)."""
        return automatic and self.auto_info is not None

    @property
    def modality_choices(self) -> tuple[str, ...]:
        info = self.auto_info or {}
        return tuple(info.get("modalities", ())) if info.get("modality_decoder") else ()

    def check_modality(self, name: str) -> None:
        self._channel(name)

    def _channel(self, name: str | None) -> int:
        names = tuple((self.auto_info or {}).get("modalities", ()))
        if not self.modality_choices:
            return 0  # one shared channel
        if name is None and len(names) == 1:
            return 0
        if name not in names:
            raise ValueError(f"unknown modality {name!r}; this export's automatic head knows {list(names)}")
        return names.index(name)

    @property
    def predict_auto(self):
        """`predict_auto(modality=None, return_logits=False)` as `AutoPredictor`'s; absent
        (AttributeError) when the export has no automatic head, so callers can tell."""
        if self.auto_info is None:
            raise AttributeError("predict_auto: this export has no automatic head")
        return self._predict_auto

    @property
    def predict_without_prompt(self):
        if self.auto_info is None:
            raise AttributeError("predict_without_prompt: this export has no automatic head (prompts only)")
        return lambda return_logits=False: self._predict_auto(None, return_logits)

    def resolve_presence_gate(self, gate: PresenceGate = CALIBRATED_GATE) -> float | None:
        """The presence probability `gate` stands for with this export (None: no gate)."""
        if self.auto_info is None:
            raise ValueError("this export has no automatic head, so no presence gate")
        if self.gate_in_graph and gate != CALIBRATED_GATE:
            raise ValueError(f"{self.export_dir} applies its presence gate inside the exported graph (an export "
                             "older than uniultra 2026-12-06): export the checkpoint again to choose the gate")
        return gate_in_force(gate, self.presence_threshold)

    def set_presence_gate(self, gate: PresenceGate) -> float | None:
        """Make `gate` the one every later call holds to."""
        self.presence_threshold = self.resolve_presence_gate(gate)
        return self.presence_threshold

    def _predict_auto(self, modality: str | None = None, return_logits: bool = False,
                      presence_gate: PresenceGate = CALIBRATED_GATE) -> tuple[np.ndarray, float, np.ndarray]:
        threshold = self.resolve_presence_gate(presence_gate)  # an older export refuses all but its own
        if self.gate_in_graph:
            threshold = None  # the graph has applied it
        features = self._automatic_features()
        channel = self._channel(modality if modality is not None else self.modality)
        feeds = {**_encoder_outputs(features), "modality": np.array([channel], dtype=np.int64)}
        logits, presence = self._run_auto(feeds)
        score = float(np.asarray(presence).reshape(-1)[0])
        if answers_empty(score, threshold):
            logits = np.full_like(logits, -LOGIT_CLAMP)
        masks = upsample_logits(fill_small_holes(logits, self.mask_threshold, self.max_hole_share), self.orig_hw)
        mask = masks[0, 0] if return_logits else masks[0, 0] > self.mask_threshold
        return mask, score, np.clip(logits[0, 0], -LOGIT_CLAMP, LOGIT_CLAMP)

    def fork(self) -> ExportedPredictor:
        """A predictor sharing this one's compiled graphs but with no image set: one per image
        (the web app keeps one per cached image). Calls must not overlap (the graphs are shared)."""
        twin = copy.copy(self)
        twin.reset_image()
        return twin

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Any accepted image -> normalised (1, 3, S, S) float32 model input."""
        image = np.asarray(image)
        require_pixels(image)
        resized = image_to_model(image, self.image_size)
        out = (resized - self.pixel_mean) / self.pixel_std  # gray broadcasts to three channels
        return out[None].astype(np.float32, copy=False)

    def set_image(self, image: np.ndarray | str | os.PathLike) -> None:
        """Compute the image embedding once. Accepts an array (gray, RGB, RGBA; 8/16-bit, float) or a path."""
        image = self.load_image(image)
        x = self.preprocess(image)
        features = self._encode(x)
        self._auto_input, self._auto_features = (x if self.has_auto_encoder else None), None
        if self.has_box_decoder:
            features["image_tokens"] = md.image_tokens(features["image_embed"])
        self._remember(features, image)

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
        """Masks for box and/or point prompts on the current image (see `Predictor.predict`).

        box: (4,) or (N, 4) xyxy; points: (P, 2) or (N, P, 2) xy; labels: 1 positive, 0 negative,
        -1 padding; mask_input: (1 or N, 1, S/4, S/4) or (1, S/4, S/4) low-res logits.
        Returns (masks (C, H, W) or (N, C, H, W), scores (C,) or (N, C), low-res logits clamped
        to +-32), C = 3 with `multimask` else 1.
        """
        self._require_image()
        prompts = PromptSet.from_user(box, points, labels, self.orig_hw)
        check_exact_box(exact_box, self.supports_exact_box, prompts.boxes)
        coords, point_labels = self.prompt_arrays(prompts, exact_box)
        feeds, box = self.decoder_feeds(coords, point_labels, mask_input)
        wanted = ["multimask_masks", "multimask_iou_scores"] if multimask else ["masks", "iou_scores"]
        logits, scores = self._decode(wanted, feeds, box)
        masks = upsample_logits(fill_small_holes(logits, self.mask_threshold, self.max_hole_share), self.orig_hw)
        if not return_logits:
            masks = masks > self.mask_threshold
        result = (masks, scores, np.clip(logits, -LOGIT_CLAMP, LOGIT_CLAMP))
        return result if prompts.batched else tuple(r[0] for r in result)

    def decoder_feeds(self, coords: np.ndarray, labels: np.ndarray,
                      mask_input: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], bool]:
        """The feeds of the graph that answers these prompts on the current image, and whether it is
        the box decoder (prompts without a mask input, when the export has one)."""
        features = self._require_image()
        prompts = {"point_coords": coords, "point_labels": labels}
        if mask_input is None and self.has_box_decoder:
            return {**{k: features[k] for k in md.BOX_DECODER_INPUTS[:3]}, **prompts}, True
        mask, has_mask = self._mask_arrays(mask_input, coords.shape[0])
        return {**_encoder_outputs(features), **prompts, "mask_input": mask, "has_mask_input": has_mask}, False

    def prompt_arrays(self, prompts: PromptSet, exact_box: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Validated prompts -> decoder inputs: (N, P, 2) float32 model-input coords, (N, P) int32 labels.

        Box corners come first (labels 2, 3; 4, 5 for an exact box), then clicks, as the torch
        predictor merges them.
        """
        return prompt_tokens(prompts.boxes, prompts.points, prompts.labels, self.orig_hw, self.image_size,
                             exact_box)

    def _mask_arrays(self, mask_input: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        low = self.low_res_size
        if mask_input is None:
            return np.zeros((n, 1, low, low), np.float32), np.zeros(1, np.float32)
        mask = np.asarray(mask_input, dtype=np.float32)
        if mask.ndim == 3:
            mask = mask[None]
        if mask.ndim != 4 or mask.shape[1:] != (1, low, low) or mask.shape[0] not in (1, n):
            raise ValueError(f"mask_input must be (1 or {n}, 1, {low}, {low}) low-res logits, got {mask.shape}")
        return np.ascontiguousarray(np.broadcast_to(mask, (n, 1, low, low))), np.ones(1, np.float32)


class OnnxPredictor(ExportedPredictor):
    """Interactive segmentation with an exported model on onnxruntime.

    Args:
        export_dir: directory written by `uniultra export onnx` (holds uniultra-onnx.json).
        int8: use the dynamically quantised encoder (encoder.int8.onnx; export with --int8).
        threads: intra-op threads of both sessions (None: onnxruntime's default, all cores).
        mask_threshold: logit above which a pixel is foreground.
        spinning: let idle onnxruntime threads busy-wait (see `session_options`).
        verify: check each file's sha256 against the metadata (detects mixed or partial exports).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        *,
        int8: bool = False,
        threads: int | None = None,
        mask_threshold: float = 0.0,
        spinning: bool = False,
        verify: bool = True,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__(export_dir, mask_threshold=mask_threshold, verify=verify)
        files = self.metadata["files"]
        encoder_key = "encoder_int8" if int8 else "encoder"
        if encoder_key not in files:
            raise FileNotFoundError(f"{self.export_dir}: no INT8 encoder in this export (export it with --int8)")
        self.int8 = int8
        options = session_options(threads, spinning=spinning)
        providers = list(providers or ["CPUExecutionProvider"])
        self.encoder = ort.InferenceSession(str(self.export_dir / files[encoder_key]["path"]), options,
                                            providers=providers)
        self.decoder = ort.InferenceSession(str(self.export_dir / files["decoder"]["path"]), options,
                                            providers=providers)
        self.box_decoder = None
        if self.has_box_decoder:
            self.box_decoder = ort.InferenceSession(str(self.export_dir / files["box_decoder"]["path"]), options,
                                                    providers=providers)
        self._encoder_outputs = [o.name for o in self.encoder.get_outputs()]
        self.auto = None
        if "auto_decoder" in files:
            self.auto = ort.InferenceSession(str(self.export_dir / files["auto_decoder"]["path"]), options,
                                             providers=providers)
        self.auto_encoder = None
        if self.has_auto_encoder:
            self.auto_encoder = ort.InferenceSession(str(self.export_dir / files["auto_encoder"]["path"]), options,
                                                     providers=providers)

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self._encoder_outputs, self.encoder.run(None, {"image": x}), strict=True))

    def _decode(self, wanted: list[str], feeds: dict[str, np.ndarray], box: bool = False) -> list[np.ndarray]:
        return (self.box_decoder if box else self.decoder).run(wanted, feeds)

    def _run_auto(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.auto.run(list(md.AUTO_OUTPUTS), feeds)

    def _encode_auto(self, x: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.auto_encoder.get_outputs()]
        return dict(zip(names, self.auto_encoder.run(None, {"image": x}), strict=True))


def session_options(threads: int | None = None, optimization: str = "all", spinning: bool = False) -> Any:
    """onnxruntime session options used by the predictor and the benchmark.

    Full graph optimisation (constant folding, MatMul+Add / Conv+activation fusions, NCHWc
    convolutions), sequential execution (a single-image graph has little inter-op parallelism;
    the threads are better spent inside the big ops), a fixed intra-op thread count, and no
    busy-waiting between ops: with spinning on, the mini encoder at 1024 px ran 25-35% SLOWER
    on a 2-core machine shared with other work (spinning threads steal the cores the work
    needs). Not measured on an idle machine, where spinning usually helps a little.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _encoder_outputs(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder's own outputs among an image's features (the full decoder and the automatic head
    take these; `image_tokens` is the box decoder's)."""
    return {name: features[name] for name in md.ENCODER_OUTPUTS}
