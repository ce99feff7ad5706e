"""KoLeo regulariser (Kozachenko-Leonenko entropy estimate): spreads features over the sphere."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """−mean log distance of each L2-normalised sample to its nearest other sample, on (B, D) features.

    Always fp32, also under autocast or for half inputs: in half precision d + 1e-8 rounds to 0 for
    duplicate samples and the loss becomes inf.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[0] < 2:
            raise ValueError(
                f"KoLeo needs at least 2 samples per process, got {features.shape[0]}: "
                "raise the per-process batch size or set the KoLeo loss weight to 0"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), dim=-1, eps=self.eps)
            with torch.no_grad():
                similarity = x @ x.t()
                similarity.fill_diagonal_(-torch.inf)
                neighbour = similarity.argmax(dim=1)
            distance = (x - x[neighbour]).norm(dim=-1)
            return -torch.log(distance + self.eps).mean()
