"""DINO loss on the CLS token: student views against teacher targets of the other global views."""

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.losses.targets import TeacherTargetLoss


class DINOLoss(TeacherTargetLoss):
    """Mean cross-entropy over all (student crop, teacher global crop) pairs of different views.

    Teacher side: `teacher_probs(teacher_logits, teacher_temp, mode)` takes the teacher's global-crop
    logits (n_global·B, K) in crop-major order (crop 0 of every image, then crop 1, ...) and returns
    targets in the same order; split them with `.chunk(n_global)` for `forward`. In centering mode call
    `update_center(teacher_logits)` after computing the targets.
    """

    def forward(self, student_logits: list[Tensor], teacher_probs: list[Tensor]) -> Tensor:
        """Loss from `student_logits` (one (B, K) per crop, global crops first, in the teacher's order)
        and `teacher_probs` (one (B, K) per global crop). Student crop i and teacher crop i are the
        same view and are skipped: 2 globals + 8 locals give 2·10 − 2 = 18 pairs.
        """
        n_teacher, n_student = len(teacher_probs), len(student_logits)
        if not 1 <= n_teacher <= n_student or n_student < 2:
            raise ValueError(
                f"DINO needs at least 2 student crops and 1..n_student teacher crops, "
                f"got {n_student} student and {n_teacher} teacher crops"
            )
        student_log_probs = F.log_softmax(torch.stack(student_logits).float() / self.student_temp, dim=-1)
        targets = torch.stack(teacher_probs).float()
        batch_size = targets.shape[1]
        # cross_entropy[t, s]: batch-mean CE between teacher crop t and student crop s.
        cross_entropy = -torch.einsum("tbk,sbk->ts", targets, student_log_probs) / batch_size
        other_view = ~torch.eye(n_teacher, n_student, dtype=torch.bool, device=cross_entropy.device)
        return cross_entropy[other_view].mean()
