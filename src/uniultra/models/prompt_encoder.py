"""Prompt encoder of the SAM2 image path: points, boxes and masks to decoder tokens.

Parameter and buffer names follow the official SAM2 checkpoints (`sam_prompt_encoder.*`),
so an official state dict loads here with ``strict=True``.

Point labels: -1 padding, 0 negative click, 1 positive click, 2 box top-left, 3 box bottom-right;
with `exact_box_tokens`, 4 / 5 the corners of an exact box (uniultra.models.prompt_labels).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ImageModelConfig
from .layers import LayerNorm2d

PAD_LABEL = -1
NUM_POINT_TYPES = 4  # negative, positive, box top-left, box bottom-right


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier-feature positional encoding of 2-D positions.

    A fixed Gaussian matrix projects (x, y) in [-1, 1]^2 to `num_pos_feats` frequencies; the encoding
    is their sine and cosine, so the output has 2 * num_pos_feats channels.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        # A buffer, not a parameter: the frequencies are random and never trained, but must be saved.
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode (..., 2) positions normalised to [0, 1] as (x, y); returns (..., 2 * num_pos_feats)."""
        freqs = self.positional_encoding_gaussian_matrix
        angles = 2 * math.pi * ((2 * coords.to(freqs.dtype) - 1) @ freqs)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (h, w) grid of cells, shaped (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self.encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode (B, N, 2) pixel coordinates (x, y) of an image of size (H, W); returns (B, N, C)."""
        h, w = image_size
        scale = torch.tensor([w, h], device=coords.device, dtype=coords.dtype)
        return self.encode(coords / scale)


class PromptEncoder(nn.Module):
    """Encodes point, box and mask prompts into sparse tokens and a dense embedding.

    Args:
        embed_dim: channel width of the prompt tokens (256 in SAM2).
        image_embedding_size: (h, w) of the image embedding grid, i.e. image_size // 16.
        input_image_size: (H, W) of the (padded) model input, in pixels.
        mask_in_chans: hidden width of the mask downscaling path (16 in SAM2).
        activation: activation of the mask downscaling path.
        exact_box_tokens: two more point types (labels 4, 5) for the corners of an exact box.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: int | tuple[int, int],
        input_image_size: int | tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
        exact_box_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = _pair(image_embedding_size)
        self.input_image_size = _pair(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        # One learned offset per point type (label 0..3; 4..5 below), plus the token that stands in for padding.
        self.num_point_embeddings = NUM_POINT_TYPES
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(NUM_POINT_TYPES))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        # Mask prompts come in at 4x the embedding grid and are brought down by two stride-2 convs.
        h, w = self.image_embedding_size
        self.mask_input_size = (4 * h, 4 * w)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        if exact_box_tokens:
            self.add_exact_box_tokens()

    def add_exact_box_tokens(self) -> None:
        """Two more point types (labels 4, 5) for an exact box's corners, starting as copies of the plain
        box corners (no random draw, so every other parameter is initialised as in a model without
        them; a trained model keeps its answers to every other prompt): an exact box first reads as a
        box, and training learns what "exact" adds."""
        if len(self.point_embeddings) != NUM_POINT_TYPES:
            raise ValueError("this prompt encoder already has exact-box tokens")
        corners = self.point_embeddings[2:NUM_POINT_TYPES]
        self.point_embeddings.extend(nn.Embedding.from_pretrained(c.weight.detach().clone(), freeze=False)
                                     for c in corners)
        self.num_point_embeddings = len(self.point_embeddings)

    @classmethod
    def from_config(cls, config: ImageModelConfig) -> PromptEncoder:
        size = config.embedding_size
        return cls(
            embed_dim=config.neck.d_model,
            image_embedding_size=(size, size),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.decoder.mask_in_chans,
            exact_box_tokens=config.decoder.exact_box_tokens,
        )

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell, shaped (1, embed_dim, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords + 0.5  # pixel indices -> pixel centres
        if pad:
            # Without a box, SAM was trained with one extra padding token after the clicks.
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PAD_LABEL)], dim=1)
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        labels = labels.unsqueeze(-1)
        # Padding tokens carry no position, only the learned "not a point" vector.
        emb = torch.where(labels == PAD_LABEL, self.not_a_point_embed.weight, pe)
        for label, type_embed in enumerate(self.point_embeddings):
            emb = torch.where(labels == label, emb + type_embed.weight, emb)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.reshape(-1, 2, 2) + 0.5  # (x0, y0, x1, y1) -> two pixel-centre corners
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        top_left, bottom_right = self.point_embeddings[2].weight, self.point_embeddings[3].weight
        return pe + torch.cat([top_left, bottom_right], dim=0)

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        if masks.ndim != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != self.mask_input_size:
            raise ValueError(
                f"mask prompts must be (B, 1, {self.mask_input_size[0]}, {self.mask_input_size[1]}), "
                f"got {tuple(masks.shape)}"
            )
        return self.mask_downscaling(masks)

    def masks_where(self, masks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Dense embedding of `masks` (N, 1, 4h, 4w) where `present` (N,) is true, else "no mask"."""
        no_mask = self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return torch.where(present.reshape(-1, 1, 1, 1), self._embed_masks(masks), no_mask)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: (coords (B, N, 2) as pixel (x, y), labels (B, N)) or None.
            boxes: (B, 4) pixel (x0, y0, x1, y1) or None.
            masks: (B, 1, 4h, 4w) mask logits or None.

        Returns:
            sparse: (B, T, embed_dim) with T = N + 1 (points only: a padding token is appended),
                N + 2 (points and boxes) or 2 (boxes only); T = 0 without points and boxes.
            dense: (B, embed_dim, h, w).
        """
        batch = _check_prompts(points, boxes, masks)
        tokens = []
        if points is not None:
            tokens.append(self._embed_points(*points, pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        empty = self.no_mask_embed.weight.new_empty(batch, 0, self.embed_dim)
        sparse = torch.cat(tokens, dim=1) if tokens else empty

        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense


def _check_prompts(
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
) -> int:
    """Validate prompt shapes and return the batch size they agree on (1 when there are none)."""
    batches = {}
    if points is not None:
        coords, labels = points
        if coords.ndim != 3 or coords.shape[-1] != 2:
            raise ValueError(f"point coords must be (B, N, 2), got {tuple(coords.shape)}")
        if tuple(labels.shape) != tuple(coords.shape[:2]):
            raise ValueError(
                f"point labels must be (B, N) = {tuple(coords.shape[:2])} to match coords "
                f"{tuple(coords.shape)}, got {tuple(labels.shape)}"
            )
        batches["points"] = coords.shape[0]
    if boxes is not None:
        if boxes.numel() % 4 or boxes.shape[-1] not in (2, 4):
            raise ValueError(f"boxes must be (B, 4) as (x0, y0, x1, y1), got {tuple(boxes.shape)}")
        batches["boxes"] = boxes.numel() // 4
    if len(set(batches.values())) > 1:
        raise ValueError(f"point and box batch sizes disagree: {batches}")
    batch = next(iter(batches.values()), None)
    if masks is not None:
        # A single mask may be shared by every prompt (it broadcasts in the decoder).
        if batch is not None and masks.shape[0] not in (1, batch):
            raise ValueError(f"mask batch {masks.shape[0]} does not match prompt batch {batch}")
        batch = batch if batch is not None else masks.shape[0]
    return 1 if batch is None else batch
