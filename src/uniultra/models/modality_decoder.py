"""Query-decoupled modality decoder (SPEC 5): one learned query and hypernetwork per modality.

The two-way transformer, upscaling path, high-res projections and IoU / object tokens are the base
SAM2 mask decoder's, passed in at call time rather than held here, so the auto checkpoint keeps one
copy of them and the base model stays box-promptable. Only the selected modality's query enters the
transformer, so modality k's output depends on query k and hypernetwork k alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from uniultra.models.mask_decoder import MaskDecoder


class ModalityDecoder(nn.Module):
    def __init__(self, base_decoder: MaskDecoder, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"a modality decoder needs at least one channel, got {channels}")
        dim = base_decoder.transformer_dim
        self.queries = nn.Embedding(channels, dim)
        # Every channel starts as the base decoder's single-mask output, so training starts from a
        # decoder that already segments, and untrained channels agree with each other.
        with torch.no_grad():
            self.queries.weight.copy_(base_decoder.mask_tokens.weight[0].expand(channels, dim))
        self.hypernetworks = nn.ModuleList(
            copy.deepcopy(base_decoder.output_hypernetworks_mlps[0]) for _ in range(channels)
        )

    @property
    def channels(self) -> int:
        return self.queries.num_embeddings

    def forward(
        self,
        decoder: MaskDecoder,
        image_embed: torch.Tensor,
        image_pe: torch.Tensor,
        dense_prompt: torch.Tensor,
        high_res_feats: list[torch.Tensor],
        modality: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, 1, 4h, 4w) for image embeddings (B, C, h, w) and modality ids (B,), and
        the image tokens the two-way transformer returns, as a (B, C, h, w) map (they have attended
        to the modality's query: what the presence head reads)."""
        b, c, h, w = image_embed.shape
        tokens = torch.cat([self._fixed_tokens(decoder, b), self.queries(modality).unsqueeze(1)], dim=1)
        hs, src = decoder.transformer(image_embed + dense_prompt, image_pe, tokens)
        query_out = hs[:, -1]
        image_tokens = src.transpose(1, 2).reshape(b, c, h, w)
        # The base decoder's own upscaling, including its high-res skip connections.
        upscaled = decoder._upscale(image_tokens, high_res_feats or None)
        weights = self._hypernetwork(query_out, modality)  # (B, C/8)
        return torch.einsum("bc,bchw->bhw", weights, upscaled).unsqueeze(1), image_tokens

    @staticmethod
    def _fixed_tokens(decoder: MaskDecoder, batch: int) -> torch.Tensor:
        """The base's [object-score,] IoU tokens, in the order the base transformer was trained with."""
        weights = [decoder.iou_token.weight]
        if decoder.pred_obj_scores:
            weights.insert(0, decoder.obj_score_token.weight)
        return torch.cat(weights, dim=0).unsqueeze(0).expand(batch, -1, -1)

    def _hypernetwork(self, query_out: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Apply hypernetwork k to the samples of modality k only; absent channels get no gradient."""
        out: torch.Tensor | None = None
        for k in modality.unique().tolist():
            rows = (modality == k).nonzero(as_tuple=True)[0]
            part = self.hypernetworks[k](query_out[rows])
            if out is None:
                out = part.new_zeros(query_out.shape[0], part.shape[1])
            out = out.index_copy(0, rows, part)
        if out is None:
            raise ValueError("empty batch: no modality ids given")
        return out

