"""CH-Adapter (SPEC section 2): a context bottleneck plus a fixed-kernel edge branch.

The adapter sits in a Hiera block's `adapter` slot (uniultra.models.hiera.MultiScaleBlock) and
receives u = block.norm2(x), the tokens in the trunk's channels-last layout (B, H, W, D). The block
then computes x + MLP(u) + adapter(u), and the adapter returns s * H with

    H = P(u) + F_edge(u)
    P(u)      = Linear(rD -> D)(GELU(Linear(D -> rD)(u)))                       "context"
    F_edge(u) = mix_out(act(depthwise_fixed_kernels(mix_in(u))))                "edge"

- mix_in ("patch mixer") is a 1x1 conv D -> c; the fixed kernels are applied DEPTHWISE
  (groups = c): each of the c channels is filtered by every kernel of the chosen directions, giving
  c * n_kernels responses (channel j's responses are rows j*n .. j*n+n-1); mix_out ("channel
  mixer") is a 1x1 conv c * n_kernels -> D.
- The kernels are non-persistent buffers: they never train, never enter an optimiser and are not
  stored in checkpoints (they follow from the config).
- Tokens go to (B, D, H, W) with a real permute (a zero-copy strided view of the channels-last
  tensor, which conv2d handles as channels_last memory format) and come back with the inverse
  permute. A raw `.view` would scramble space (a defect of the authors' code, SPEC section 7).
- Gradients flow through the edge branch (nothing is detached).
- The last layer of each branch (context.2 and edge.channel_mixer) is zero-initialised, so an
  untrained adapter returns exactly zero and the block is unchanged. Consequence: at step 0 only
  those last layers receive gradient; the first layers start learning after the first update.

Decisions:
- Nonlinearity in the edge branch: GELU between the filtered responses and the channel mixer
  (config `edge_activation`, "none" for a purely linear branch). Without it the branch collapses
  to one linear 3x3 conv of rank <= c, which cannot express edge *strength* (e.g. |gradient|)
  independently of edge polarity; GELU matches the context branch.
- Border handling: replicate padding before the 3x3 kernels. Zero padding would make every map
  border look like a strong edge (token features are not zero-mean), for every image.
- The adapter branch is not subject to the block's stochastic depth (drop_path_rate is 0 in every
  preset anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.peft.config import DIRECTIONS, PeftConfig

# Cross-correlation kernels as F.conv2d applies them (SPEC section 2). "horizontal" measures the
# change along the width axis, so a vertical edge (dark left, bright right) gives a positive response.
SOBEL_KERNELS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "horizontal": ((-1, 0, 1), (-2, 0, 2), (-1, 0, 1)),
    "vertical": ((1, 2, 1), (0, 0, 0), (-1, -2, -1)),
    "diagonal": ((0, 1, 2), (-1, 0, 1), (-2, -1, 0)),
    "anti_diagonal": ((2, 1, 0), (1, 0, -1), (0, -1, -2)),
}
LAPLACE_KERNEL = ((0, 1, 0), (1, -4, 1), (0, 1, 0))


def bottleneck_width(dim: int, ratio: float) -> int:
    """Hidden width of the context branch: round(ratio * dim), at least 1."""
    return max(1, int(ratio * dim + 0.5))


def edge_kernels(operator: str, directions: tuple[str, ...] = DIRECTIONS) -> torch.Tensor:
    """(n_kernels, 3, 3) float32 kernels of an edge operator; `directions` only matter for sobel."""
    if operator == "sobel":
        unknown = [d for d in directions if d not in SOBEL_KERNELS]
        if unknown or not directions:
            raise ValueError(f"sobel needs directions from {list(SOBEL_KERNELS)}, got {list(directions)}")
        return torch.tensor([SOBEL_KERNELS[d] for d in directions], dtype=torch.float32)
    if operator == "laplace":
        return torch.tensor([LAPLACE_KERNEL], dtype=torch.float32)
    raise ValueError(f"no kernels for edge operator {operator!r} (sobel or laplace)")


class EdgeBranch(nn.Module):
    """Patch mixer D -> c, depthwise fixed 3x3 kernels, activation, channel mixer back to D.

    forward: (B, H, W, D) -> (B, H, W, D). `responses` exposes the filtered maps (B, c*n, H, W).
    """

    def __init__(
        self,
        dim: int,
        channels: int,
        kernels: torch.Tensor,
        activation: str = "gelu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernels.ndim != 3 or kernels.shape[1:] != (3, 3):
            raise ValueError(f"kernels must be (n, 3, 3), got {tuple(kernels.shape)}")
        self.channels = channels
        self.n_kernels = kernels.shape[0]
        factory = {"device": device, "dtype": dtype}
        self.patch_mixer = nn.Conv2d(dim, channels, kernel_size=1, **factory)
        # Depthwise weight (c * n, 1, 3, 3): with groups = c, output j*n + k is input channel j
        # filtered by kernel k. A buffer, not a parameter: fixed and out of every optimiser.
        weight = kernels.to(device=device, dtype=dtype or torch.get_default_dtype())
        self.register_buffer("kernels", weight.repeat(channels, 1, 1).unsqueeze(1), persistent=False)
        self.act = nn.GELU() if activation == "gelu" else nn.Identity()
        self.channel_mixer = nn.Conv2d(channels * self.n_kernels, dim, kernel_size=1, **factory)

    def responses(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) tokens -> (B, c * n_kernels, H, W) fixed-kernel responses of the patch mixer."""
        x = tokens.permute(0, 3, 1, 2)  # real permute to (B, D, H, W), never a view/reshape
        x = self.patch_mixer(x)
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(x, self.kernels, groups=self.channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        y = self.channel_mixer(self.act(self.responses(tokens)))
        return y.permute(0, 2, 3, 1)  # back to (B, H, W, D)


class CHAdapter(nn.Module):
    """forward(u (B, H, W, D)) -> s * (P(u) + F_edge(u)), (B, H, W, D); see the module docstring.

    `edge_operator="none"` gives the plain bottleneck adapter (no `edge` submodule); `context=False`
    the edge branch alone (no `context` submodule; the paper's "edge only" ablation).
    State-dict keys: context.{0,2}.{weight,bias}, edge.patch_mixer.*, edge.channel_mixer.*.
    """

    def __init__(
        self,
        dim: int,
        ratio: float = 0.25,
        edge_channels: int = 8,
        directions: tuple[str, ...] = DIRECTIONS,
        edge_operator: str = "sobel",
        edge_activation: str = "gelu",
        scale: float = 0.5,
        context: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden = bottleneck_width(dim, ratio)
        self.dim = dim
        self.scale = float(scale)
        self.context: nn.Sequential | None = None
        if context:
            self.context = nn.Sequential(nn.Linear(dim, hidden, **factory), nn.GELU(),
                                         nn.Linear(hidden, dim, **factory))
        self.edge: EdgeBranch | None = None
        if edge_operator != "none":
            kernels = edge_kernels(edge_operator, tuple(directions))
            self.edge = EdgeBranch(dim, edge_channels, kernels, edge_activation, **factory)
        self.reset_output_layers()

    @classmethod
    def from_config(
        cls, dim: int, config: PeftConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CHAdapter:
        """The adapter `config.method` asks for (plain bottleneck for adapter / adapter_lora)."""
        return cls(
            dim,
            ratio=config.ratio,
            edge_channels=config.edge_channels,
            directions=config.directions,
            edge_operator=config.adapter_edge_operator,
            edge_activation=config.edge_activation,
            scale=config.scale,
            context=config.context_branch,
            device=device,
            dtype=dtype,
        )

    def reset_output_layers(self) -> None:
        """Zero the last layer of each branch: the adapter becomes an exact no-op."""
        last = ([self.context[2]] if self.context is not None else []) + (
            [self.edge.channel_mixer] if self.edge is not None else [])
        for layer in last:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        branches = [b(tokens) for b in (self.context, self.edge) if b is not None]
        return self.scale * sum(branches[1:], branches[0])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}"
