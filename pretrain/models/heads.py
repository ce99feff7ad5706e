"""Projection head shared by the DINO (CLS) and iBOT (patch) objectives."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from .layers import init_linear


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2-normalise, then a bias-free linear layer to ``out_dim`` prototypes.

    ``weight_norm_last_layer=True`` (v1/v2) weight-normalises the last layer with the magnitude fixed
    to 1, so each prototype is a unit vector and logits are cosine similarities; False (v3) keeps a
    plain linear layer, which shards more simply under FSDP2. ``last_layer`` is exposed so training
    can freeze it during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        weight_norm_last_layer: bool = True,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        if weight_norm_last_layer:
            weight_norm(self.last_layer)
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                init_linear(layer)
        if parametrize.is_parametrized(self.last_layer, "weight"):
            weight = self.last_layer.parametrizations.weight
            nn.init.ones_(weight.original0)  # magnitude, fixed
            nn.init.trunc_normal_(weight.original1, std=0.02)  # direction
        else:
            nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> prototype logits (..., out_dim), before any temperature."""
        x = self.mlp(x)
        # 1e-12 underflows in fp16 and would divide by zero.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
