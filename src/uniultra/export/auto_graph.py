"""The automatic (no-prompt) head as an ONNX graph, exported beside the encoder and decoder.

`AutoGraph` computes what `AutoSegmenter.decode_auto` computes for ONE image and one channel,
with export-friendly ops: every channel's hypernetwork runs (six small MLPs on one vector) and the
chosen row is gathered, instead of the per-channel loop training uses. The presence gate is not part
of the graph (since 2026-12-06): the predictor applies the metadata's gate, or one a call chooses.
Inputs: the encoder graph's three outputs and the channel id; outputs: the low-res mask logits and
the presence probability.
"""

from __future__ import annotations

import torch
from torch import nn

from uniultra.models.auto_segmenter import AutoSegmenter
from uniultra.models.image_model import ImageFeatures


class AutoGraph(nn.Module):
    def __init__(self, model: AutoSegmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embed: torch.Tensor, high_res_feats_0: torch.Tensor, high_res_feats_1: torch.Tensor,
                modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        auto, features = self.model, self.model.features_model
        decoder, heads = auto.auto_decoder, auto.modality_decoder
        patch_logits = auto.prompt_generator.patch_logits(image_embed)
        no_mask = features.sam_prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = no_mask + auto.prompt_generator.dense_prompt(patch_logits, tuple(image_embed.shape[-2:]))
        tokens = torch.cat([heads._fixed_tokens(decoder, 1), heads.queries(modality).unsqueeze(1)], dim=1)
        hs, src = decoder.transformer(image_embed + dense, features.sam_prompt_encoder.get_dense_pe(), tokens)
        b, c, h, w = image_embed.shape
        image_tokens = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = decoder._upscale(image_tokens, [high_res_feats_0, high_res_feats_1])
        every = torch.stack([mlp(hs[:, -1]) for mlp in heads.hypernetworks], dim=1)  # (1, channels, C/8)
        weights = every.index_select(1, modality).squeeze(1)
        logits = torch.einsum("bc,bchw->bhw", weights, upscaled).unsqueeze(1)
        features = ImageFeatures(image_embed, [high_res_feats_0, high_res_feats_1])
        presence_logits = auto.presence_logits(features, image_tokens, modality)
        if presence_logits is not None:
            presence = torch.sigmoid(presence_logits)
        else:
            presence = torch.sigmoid(patch_logits.flatten(1).amax(dim=1))
        return logits, presence


def auto_metadata(model: AutoSegmenter) -> dict:
    """What a runtime needs to run the automatic graph: its channels and how presence is gated."""
    config = model.config
    return {"modalities": list(config.modalities), "modality_decoder": config.modality_decoder,
            "presence_threshold": config.presence_threshold, "presence_head": config.presence_head,
            "presence_probe": config.presence_probe, "presence_gate_in_graph": False,
            "own_encoder": model.encoder is not None}
