"""The SAM2 image model: image encoder, prompt encoder and mask decoder joined.

Only the image path of SAM2 lives here (no memory attention, memory encoder or object pointers),
with the official parameter names so official checkpoints load key for key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from uniultra.models.box_prior import box_ellipse_logits, box_logit_prior
from uniultra.models.config import ImageModelConfig, preset
from uniultra.models.image_encoder import ImageEncoder
from uniultra.models.mask_decoder import MaskDecoder
from uniultra.models.prompt_encoder import PromptEncoder
from uniultra.models.prompt_labels import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT
from uniultra.models.transformer import TwoWayTransformer

# ImageNet statistics: SAM2 was pretrained with them, so every input is normalised this way.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageFeatures:
    """What the encoder computes once per image and every prompt reuses."""

    image_embed: torch.Tensor  # (B, 256, S/16, S/16), no_mem_embed already added
    high_res_feats: list[torch.Tensor]  # [(B, 32, S/4, S/4), (B, 64, S/8, S/8)]

    def select(self, index: int) -> ImageFeatures:
        return ImageFeatures(
            self.image_embed[index : index + 1], [f[index : index + 1] for f in self.high_res_feats]
        )


@dataclass
class DecoderOutput:
    low_res_logits: torch.Tensor  # (N, C, S/4, S/4)
    iou_scores: torch.Tensor  # (N, C)
    object_score_logits: torch.Tensor  # (N, 1)
    mask_tokens: torch.Tensor  # (N, C, 256), for heads built on top of the decoder


class SAM2ImageModel(nn.Module):
    def __init__(self, config: ImageModelConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.neck.d_model
        dec = config.decoder
        self.image_encoder = ImageEncoder(config)
        self.sam_prompt_encoder = PromptEncoder.from_config(config)
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=dec.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=dec.transformer_depth,
                embedding_dim=dim,
                mlp_dim=dec.transformer_mlp_dim,
                num_heads=dec.transformer_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
            use_high_res_features=dec.use_high_res_features,
            iou_prediction_use_sigmoid=dec.iou_prediction_use_sigmoid,
            dynamic_multimask_via_stability=dec.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=dec.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=dec.dynamic_multimask_stability_thresh,
            pred_obj_scores=dec.pred_obj_scores,
            pred_obj_scores_mlp=dec.pred_obj_scores_mlp,
            use_multimask_token_for_obj_ptr=dec.use_multimask_token_for_obj_ptr,
            upscale_blur=dec.upscale_blur,
        )
        # SAM2 adds this learned "no memory" token to single-image features (directly_add_no_mem_embed).
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_preset(cls, name: str, image_size: int = 1024) -> SAM2ImageModel:
        return cls(preset(name, image_size))

    def add_exact_box_tokens(self) -> None:
        """Give a model built without them the exact-box tokens (`decoder.exact_box_tokens`), e.g. to
        fine-tune a trained model for exact boxes; its answers to every other prompt are unchanged."""
        self.sam_prompt_encoder.add_exact_box_tokens()
        self.config = replace(self.config, decoder=replace(self.config.decoder, exact_box_tokens=True))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> ImageNet-normalised input."""
        return (images - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Encode normalised (B, 3, S, S) images; S must equal the model's image_size."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        fpn = self.image_encoder(images, with_position_encoding=False)["backbone_fpn"]
        decoder = self.sam_mask_decoder
        # The decoder's high-res projections depend only on the image: run them once here.
        high_res = [decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])] if decoder.use_high_res_features else []
        embed = fpn[-1] + self.no_mem_embed.view(1, -1, 1, 1)
        return ImageFeatures(image_embed=embed, high_res_feats=high_res)

    def decode(
        self,
        features: ImageFeatures,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> DecoderOutput:
        """Decode prompts given in model-input pixel coordinates.

        points: (coords (N, P, 2), labels (N, P)); boxes: (N, 4) xyxy. N prompts either pair with N
        images in `features` or, when `features` holds one image, all refer to that image.
        """
        points = merge_boxes_into_points(points, boxes)
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        if mask_input is None and points is not None and self.config.decoder.box_prior:
            encoder = self.sam_prompt_encoder
            prior, has_box = box_ellipse_logits(*points, encoder.mask_input_size, self.config.image_size)
            dense = encoder.masks_where(prior, has_box)
        n_prompts = sparse.shape[0]
        n_images = features.image_embed.shape[0]
        if n_images not in (1, n_prompts):
            raise ValueError(f"{n_prompts} prompts cannot be paired with {n_images} images")
        masks, iou, tokens, obj = self.sam_mask_decoder(
            image_embeddings=features.image_embed,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=n_images == 1 and n_prompts > 1,
            high_res_features=features.high_res_feats or None,
            mask_bias=self.mask_bias(points),
        )
        return DecoderOutput(low_res_logits=masks, iou_scores=iou, object_score_logits=obj, mask_tokens=tokens)

    def mask_bias(self, points: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        """The box's logit prior for prompts with boxes merged into points, or None when it is off."""
        weight = self.config.decoder.box_logit_prior
        if not weight or points is None:
            return None
        grid = self.sam_prompt_encoder.mask_input_size
        return box_logit_prior(*points, grid, self.config.image_size, weight)

    def forward(
        self,
        images: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> DecoderOutput:
        """Training entry: normalised images with one prompt set each."""
        return self.decode(self.encode_image(images), points, boxes, mask_input, multimask)


def merge_boxes_into_points(
    points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Boxes become two labelled corner points placed before any clicks, as SAM2 does."""
    if boxes is None:
        return points
    corners = boxes.reshape(-1, 2, 2)
    labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], dtype=torch.int, device=boxes.device)
    labels = labels.expand(corners.shape[0], 2)
    if points is None:
        return corners, labels
    coords, point_labels = points
    if coords.shape[0] != corners.shape[0]:
        raise ValueError(f"{corners.shape[0]} boxes but {coords.shape[0]} point sets: counts must match")
    return torch.cat([corners, coords], dim=1), torch.cat([labels, point_labels.to(labels.dtype)], dim=1)
