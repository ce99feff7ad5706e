"""iBOT loss: the student predicts the teacher's targets at the masked patches of its global crops."""

import torch.nn.functional as F
from torch import Tensor

from pretrain.losses.targets import TeacherTargetLoss


class IBOTPatchLoss(TeacherTargetLoss):
    """Per-image mean masked-patch cross-entropy, averaged over all global crops (masked or not).

    Order convention: masked patches are gathered in row-major order of `masks` (n_images, P), i.e.
    `patch_tokens[masks]` for patch tokens (n_images, P, D); the student logits, the teacher logits
    given to `teacher_probs` and the targets all follow it. In Sinkhorn mode the targets are balanced
    over the masked patches of all processes, whose counts may differ; every process must call
    `teacher_probs` (and `update_center`), even with no masked patch.
    """

    def forward(self, student_masked_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """Loss from student logits (M, K) and targets (M, K) at the M = masks.sum() masked patches.

        masks: (n_images, P) bool over all global crops; images without a masked patch add 0 to the
        sum but still count in the n_images denominator, as in the recipe.
        """
        log_probs = F.log_softmax(student_masked_logits.float() / self.student_temp, dim=-1)
        patch_cross_entropy = -(teacher_probs.float() * log_probs).sum(dim=-1)
        masked_per_image = masks.sum(dim=1, keepdim=True).clamp(min=1)
        patch_weight = (1.0 / masked_per_image).expand(masks.shape)[masks]
        return (patch_cross_entropy * patch_weight).sum() / masks.shape[0]
