"""SAM2 mask decoder: prompt tokens + image embedding -> mask logits, IoU and object scores.

Parameter names follow the official SAM2 checkpoints (`sam_mask_decoder.*`), so an official
state dict loads here with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ImageModelConfig
from .layers import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts masks from image and prompt embeddings with a two-way transformer.

    Output tokens, in order: [object-score token], IoU token, `num_multimask_outputs + 1` mask tokens.
    Mask token 0 is the single-mask output, tokens 1.. are the multimask outputs.

    Args (defaults are the plain-SAM ones, as in the official class; SAM2.1 uses the `from_config` values):
        transformer_dim: token and image-embedding width (256).
        transformer: the two-way transformer.
        num_multimask_outputs: masks returned when `multimask_output=True` (3).
        activation: activation of the upscaling path.
        iou_head_depth, iou_head_hidden_dim: shape of the IoU prediction MLP.
        use_high_res_features: add stride-4 and stride-8 backbone features while upscaling;
            `conv_s0` / `conv_s1` project those features from `transformer_dim` channels (the caller
            applies them once per image, see `project_high_res_features`).
        iou_prediction_use_sigmoid: squash predicted IoU to [0, 1].
        dynamic_multimask_via_stability: when one mask is requested at inference, replace an unstable
            single-mask output by the best multimask output.
        dynamic_multimask_stability_delta, dynamic_multimask_stability_thresh: stability is the IoU of
            the mask thresholded at +delta and at -delta; below `thresh` counts as unstable.
        pred_obj_scores: add an object-score token and head (else object score logits are a constant 10).
        pred_obj_scores_mlp: use a 3-layer MLP rather than a Linear for the object-score head.
        use_multimask_token_for_obj_ptr: return the multimask tokens as `sam_tokens_out` when
            `multimask_output=True` (else always the single-mask token).
        upscale_blur: smooth the last (1) or both (2) transposed-conv outputs with a fixed [1, 2, 1] kernel
            (see DecoderConfig); 0 = none.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
        upscale_blur: int = 0,
    ) -> None:
        super().__init__()
        if upscale_blur not in (0, 1, 2):
            raise ValueError(f"upscale_blur must be 0, 1 or 2 (transposed convs smoothed), got {upscale_blur!r}")
        self.upscale_blur = int(upscale_blur)
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr

        # Two stride-2 transposed convs: embedding grid (stride 16) -> stride 4, width C -> C/8.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)

        # Hypernetworks: each mask token becomes the weights of a 1x1 "conv" over the upscaled features.
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, 3)
                if pred_obj_scores_mlp
                else nn.Linear(transformer_dim, 1)
            )

        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    @classmethod
    def from_config(cls, config: ImageModelConfig) -> MaskDecoder:
        """The SAM2.1 image-predictor decoder described by `config` (dynamic multimask included)."""
        d = config.decoder
        dim = config.neck.d_model
        transformer = TwoWayTransformer(
            depth=d.transformer_depth,
            embedding_dim=dim,
            num_heads=d.transformer_heads,
            mlp_dim=d.transformer_mlp_dim,
        )
        return cls(
            transformer_dim=dim,
            transformer=transformer,
            num_multimask_outputs=d.num_multimask_outputs,
            iou_head_depth=d.iou_head_depth,
            iou_head_hidden_dim=d.iou_head_hidden_dim,
            use_high_res_features=d.use_high_res_features,
            iou_prediction_use_sigmoid=d.iou_prediction_use_sigmoid,
            dynamic_multimask_via_stability=d.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=d.dynamic_multimask_stability_delta,
            upscale_blur=d.upscale_blur,
            dynamic_multimask_stability_thresh=d.dynamic_multimask_stability_thresh,
            pred_obj_scores=d.pred_obj_scores,
            pred_obj_scores_mlp=d.pred_obj_scores_mlp,
            use_multimask_token_for_obj_ptr=d.use_multimask_token_for_obj_ptr,
        )

    def project_high_res_features(self, feat_s0: torch.Tensor, feat_s1: torch.Tensor) -> list[torch.Tensor]:
        """Project neck levels 0 (stride 4) and 1 (stride 8) into the form `forward` expects.

        The official model does this once per image in `forward_image`, not inside the decoder.
        """
        return [self.conv_s0(feat_s0), self.conv_s1(feat_s1)]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
        mask_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks.

        Args:
            image_embeddings: (B, C, h, w); with `repeat_image`, (1, C, h, w) shared by all B prompts.
            image_pe: (1, C, h, w) from `PromptEncoder.get_dense_pe()`.
            sparse_prompt_embeddings: (B, T, C).
            dense_prompt_embeddings: (B, C, h, w) (or (1, C, h, w), broadcast).
            multimask_output: return the `num_multimask_outputs` masks instead of one.
            repeat_image: one image embedding for several prompts.
            high_res_features: [stride-4 (B, C/8, 4h, 4w), stride-8 (B, C/4, 2h, 2w)], already projected
                by conv_s0 / conv_s1; required when `use_high_res_features`.
            mask_bias: (B, 1, 4h, 4w) logits added to every mask before any selection (a box's shape
                prior, `uniultra.models.box_prior.box_logit_prior`), or None.

        Returns:
            masks: (B, M, 4h, 4w) logits, M = num_multimask_outputs or 1.
            iou_pred: (B, M).
            sam_tokens_out: (B, M', C) output mask tokens (M' = M for multimask with
                `use_multimask_token_for_obj_ptr`, else 1).
            object_score_logits: (B, 1).
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            repeat_image=repeat_image,
            high_res_features=high_res_features,
            mask_bias=mask_bias,
        )
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, :1], iou_pred[:, :1]

        # Outside multimask mode the single-mask token is always returned: it is the token the
        # video model was trained to use as object pointer.
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, :1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def _output_tokens(self, batch: int) -> torch.Tensor:
        weights = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            weights.insert(0, self.obj_score_token.weight)
        return torch.cat(weights, dim=0).unsqueeze(0).expand(batch, -1, -1)

    def _image_tokens_source(
        self, image_embeddings: torch.Tensor, dense: torch.Tensor, batch: int, repeat_image: bool
    ) -> torch.Tensor:
        if repeat_image:
            if image_embeddings.shape[0] != 1:
                raise ValueError(
                    f"repeat_image needs a single image embedding, got batch {image_embeddings.shape[0]}"
                )
            image_embeddings = image_embeddings.expand(batch, -1, -1, -1)
        elif image_embeddings.shape[0] != batch:
            raise ValueError(
                f"image batch {image_embeddings.shape[0]} != prompt batch {batch}; "
                "pass repeat_image=True to share one image between prompts"
            )
        return image_embeddings + dense

    def _upscale(self, src: torch.Tensor, high_res_features: list[torch.Tensor] | None) -> torch.Tensor:
        deconv1, norm1, act1, deconv2, act2 = self.output_upscaling
        if self.use_high_res_features:
            if high_res_features is None or len(high_res_features) != 2:
                raise ValueError("this decoder uses high-res features: pass [feat_s0, feat_s1]")
            feat_s0, feat_s1 = high_res_features
        else:
            feat_s0 = feat_s1 = 0.0
        # The skip connections are added before each normalisation/activation, as trained.
        x = act1(norm1(self._smooth(deconv1(src), self.upscale_blur >= 2) + feat_s1))
        return act2(self._smooth(deconv2(x), self.upscale_blur >= 1) + feat_s0)

    @staticmethod
    def _smooth(x: torch.Tensor, on: bool) -> torch.Tensor:
        """Separable [1, 2, 1] / 4 per channel, edges replicated (identity when not `on`)."""
        if not on:
            return x
        kernel = x.new_tensor([0.25, 0.5, 0.25])
        channels = x.shape[1]
        x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), kernel.view(1, 1, 1, 3).expand(channels, 1, 1, 3),
                     groups=channels)
        return F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), kernel.view(1, 1, 3, 1).expand(channels, 1, 3, 1),
                        groups=channels)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
        mask_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All outputs before mask selection: masks (B, num_mask_tokens, 4h, 4w), iou (B, num_mask_tokens),
        mask tokens (B, num_mask_tokens, C), object score logits (B, 1)."""
        src = self._image_tokens_source(image_embeddings, dense_prompt_embeddings,
                                        sparse_prompt_embeddings.shape[0], repeat_image)
        return self._predict_from(src, image_pe, sparse_prompt_embeddings, high_res_features, mask_bias)

    def predict_masks_from_tokens(
        self,
        image_tokens: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_embedding: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
        mask_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`predict_masks` for image embeddings already flattened to (B, h*w, C) tokens and a dense
        embedding that is one (C,) vector for every location (no mask prompt): the graph an exported
        box / point decoder runs, with no layout change per prompt."""
        return self._predict_from(image_tokens + dense_embedding, image_pe, sparse_prompt_embeddings,
                                  high_res_features, mask_bias)

    def _predict_from(
        self,
        src: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        mask_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if image_pe.shape[0] != 1:
            raise ValueError(f"image_pe must have batch 1 (from get_dense_pe()), got {tuple(image_pe.shape)}")
        batch = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([self._output_tokens(batch), sparse_prompt_embeddings], dim=1)
        h, w = image_pe.shape[-2:]
        hs, src = self.transformer(src, image_pe, tokens)
        b, c = src.shape[0], src.shape[2]
        first = 1 if self.pred_obj_scores else 0  # index of the IoU token
        iou_token_out = hs[:, first]
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens]

        upscaled = self._upscale(src.transpose(1, 2).reshape(b, c, h, w), high_res_features)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        if mask_bias is not None:
            masks = masks + mask_bias

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0])
        else:
            # Without a head the object is assumed present: sigmoid(10) ~ 1.
            object_score_logits = iou_pred.new_full((iou_pred.shape[0], 1), 10.0)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _get_stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU between the mask thresholded at +delta and at -delta, per mask (1 for empty masks)."""
        logits = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        area_i = (logits > delta).sum(dim=-1).float()
        area_u = (logits > -delta).sum(dim=-1).float()
        return torch.where(area_u > 0, area_i / area_u, 1.0)

    def _dynamic_multimask_via_stability(
        self, all_masks: torch.Tensor, all_iou: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the single-mask output where it is stable; elsewhere take the multimask output with the
        highest predicted IoU. A lone click is often ambiguous, and token 0 then gives a blurry mask."""
        multi_masks, multi_iou = all_masks[:, 1:], all_iou[:, 1:]
        best = multi_iou.argmax(dim=-1, keepdim=True)  # (B, 1)
        best_iou = multi_iou.gather(1, best)
        best_masks = torch.take_along_dim(multi_masks, best[:, :, None, None], dim=1)

        single_masks, single_iou = all_masks[:, :1], all_iou[:, :1]
        stable = self._get_stability_scores(single_masks) >= self.dynamic_multimask_stability_thresh  # (B, 1)
        masks = torch.where(stable[:, :, None, None], single_masks, best_masks)
        iou = torch.where(stable, single_iou, best_iou)
        return masks, iou
