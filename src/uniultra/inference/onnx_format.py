"""The contract between an ONNX export and whoever runs it (numpy + stdlib only, no torch).

An export directory holds the encoder and decoder graphs (and optionally a box decoder, an automatic
head and an INT8 encoder) plus
`uniultra-onnx.json`, which records everything a runtime needs besides the graphs: input size,
normalisation constants, prompt label meanings, tensor names and shapes, the model config, and
the sha256 of every file so a mismatched or half-replaced directory is detected on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from uniultra.atomic import file_sha256

FORMAT_NAME = "uniultra-onnx"
FORMAT_VERSION = 1
METADATA_FILE = "uniultra-onnx.json"
ENCODER_FILE = "encoder.onnx"
ENCODER_INT8_FILE = "encoder.int8.onnx"
DECODER_FILE = "decoder.onnx"

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1")
DECODER_INPUTS = (
    "image_embed",
    "high_res_feats_0",
    "high_res_feats_1",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
)
DECODER_OUTPUTS = ("masks", "iou_scores", "multimask_masks", "multimask_iou_scores", "object_score_logits")
# The same decoder for prompts without a mask input (every box and click), taking the image embedding as
# (1, h*w, C) tokens that the predictor lays out once per image: no layout change and no unused mask
# branch per prompt (OpenVINO bf16 at 1024 px: 22.4 -> 17.1 ms per box). Optional: exports without it
# (and models whose dense prompt depends on the box, `box_prior`) run `decoder` for everything.
BOX_DECODER_FILE = "box_decoder.onnx"
BOX_DECODER_INPUTS = ("image_tokens", "high_res_feats_0", "high_res_feats_1", "point_coords", "point_labels")
# The automatic (no-prompt) head, when the exported model has one (metadata "auto" names its channels).
AUTO_FILE = "auto_decoder.onnx"
AUTO_INPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1", "modality")
AUTO_OUTPUTS = ("auto_masks", "presence")
# The automatic head's own encoder, when it has one (inputs and outputs as the encoder's): its outputs feed
# the automatic graph, and it runs only when an image is segmented without a prompt.
AUTO_ENCODER_FILE = "auto_encoder.onnx"

LABEL_MEANINGS = {
    "-1": "padding (ignored; lets prompts of different lengths share a batch)",
    "0": "negative click (background)",
    "1": "positive click (foreground)",
    "2": "box top-left corner",
    "3": "box bottom-right corner",
}


class ExportFormatError(ValueError):
    """An export directory that cannot be used; the message names the file and the problem."""




def read_metadata(export_dir: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Load and check `uniultra-onnx.json`; with `verify`, every listed file's sha256 too."""
    export_dir = Path(export_dir)
    path = export_dir / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir}: no {METADATA_FILE} (not a `uniultra export onnx` directory)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportFormatError(f"{path}: unreadable metadata ({exc})") from exc
    _check_format(meta, path)
    if verify:
        _verify_files(export_dir, meta["files"])
    return meta


def _check_format(meta: dict[str, Any], path: Path) -> None:
    """The format name and version this code reads, and the two graphs every export has."""
    if meta.get("format") != FORMAT_NAME:
        raise ExportFormatError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportFormatError(
            f"{path}: format_version {meta.get('format_version')!r}; this uniultra reads version {FORMAT_VERSION}"
        )
    for key in ("encoder", "decoder"):
        if key not in meta.get("files", {}):
            raise ExportFormatError(f"{path}: no '{key}' entry in 'files'")


def _verify_files(export_dir: Path, files: dict[str, Any]) -> None:
    """Every listed file is there with its recorded sha256."""
    for key, entry in files.items():
        file = export_dir / entry["path"]
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {METADATA_FILE} as '{key}' but missing")
        if file_sha256(file) != entry["sha256"]:
            raise ExportFormatError(
                f"{file}: sha256 differs from {METADATA_FILE}: the directory mixes two exports; export again"
            )


def image_tokens(image_embed: np.ndarray) -> np.ndarray:
    """The box decoder's `image_tokens` input: the encoder's (1, C, h, w) embedding as (1, h*w, C)."""
    b, c = image_embed.shape[:2]
    return np.ascontiguousarray(image_embed.reshape(b, c, -1).transpose(0, 2, 1))
