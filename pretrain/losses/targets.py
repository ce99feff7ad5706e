"""Teacher targets shared by the DINO (CLS) and iBOT (masked patch) losses: centering or Sinkhorn-Knopp."""

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.losses._dist import all_reduce_max, all_reduce_sum

TargetMode = Literal["centering", "sinkhorn"]


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Soft assignment of the global batch to K prototypes with (approximately) equal prototype mass.

    `teacher_logits` (N_local, K) are this process's samples; the prototype sums and the batch size
    N = Σ N_local are global (all-reduced), so every process must call this, even with N_local = 0.
    Returns (N_local, K) fp32 rows that sum to 1.

    Math of the recipe with Q = exp(z/τt)ᵀ (K × N): repeat n_iterations times: divide each prototype
    row by its global sum and by K, then each sample column by its sum and by N; finally multiply by N.
    The first iteration runs in log space: exp(z/τt) overflows or underflows fp32 at low τt, and the
    recipe's initial normalisation to total mass 1 is absorbed by the first row normalisation.
    """
    if n_iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least 1 iteration, got {n_iterations}")
    logits = teacher_logits.float() / teacher_temp
    n_prototypes = logits.shape[1]
    global_batch = all_reduce_sum(logits.new_tensor(float(logits.shape[0])))

    # Rows (prototypes): per-prototype log-sum-exp over the global batch, shifted by the global max.
    local_max = logits.amax(dim=0) if logits.shape[0] else logits.new_full((n_prototypes,), -math.inf)
    prototype_max = all_reduce_max(local_max)
    prototype_mass = all_reduce_sum(torch.exp(logits - prototype_max).sum(dim=0))
    log_q = logits - (prototype_max + prototype_mass.log() + math.log(n_prototypes))
    # Columns (samples): local.
    log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + global_batch.log())
    q = log_q.exp()  # (N_local, K), i.e. Qᵀ

    for _ in range(n_iterations - 1):
        q /= all_reduce_sum(q.sum(dim=0, keepdim=True)) * n_prototypes
        q /= q.sum(dim=1, keepdim=True) * global_batch
    return q * global_batch


class TeacherTargetLoss(nn.Module):
    """Base of the losses trained against teacher probabilities; owns the center and both target modes.

    Call order per step: `teacher_probs(...)`, then (centering mode) `update_center(...)` with the same
    logits, so that this step's targets use the center of the previous steps as in the recipe.
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float, mode: TargetMode) -> Tensor:
        """Targets (N, K) fp32 for teacher logits (N, K); no gradient flows back to the teacher."""
        if mode == "centering":
            return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        if mode == "sinkhorn":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        raise ValueError(f"Unknown teacher target mode {mode!r}; expected one of {get_args(TargetMode)}")

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """c ← m·c + (1−m)·mean of the logits over the global batch (all processes, any local sizes).

        Call after `teacher_probs`. A step without any logits on any process leaves c unchanged.
        """
        logits = teacher_logits.float()
        global_sum = all_reduce_sum(logits.sum(dim=0, keepdim=True))
        global_count = all_reduce_sum(logits.new_tensor(float(logits.shape[0])))
        batch_mean = global_sum / global_count.clamp(min=1)
        updated = self.center_momentum * self.center + (1 - self.center_momentum) * batch_mean
        # torch.where rather than a Python branch: no device sync on the count.
        self.center.copy_(torch.where(global_count > 0, updated, self.center))
