"""Gram anchoring (DINOv3): keep the student's patch-similarity structure close to a Gram teacher's."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _patch_gram(patches: Tensor) -> Tensor:
    """(B, P, D) -> (B, P, P) cosine similarities between the patches of each image."""
    unit = F.normalize(patches, dim=-1)
    return unit @ unit.transpose(1, 2)


def _resize_patch_map(patches: Tensor, grid: tuple[int, int], target_grid: tuple[int, int]) -> Tensor:
    """Bicubic resize of row-major patch features (B, h'·w', D) to (B, h·w, D)."""
    batch, _, dim = patches.shape
    patch_map = patches.transpose(1, 2).reshape(batch, dim, *grid)
    resized = F.interpolate(patch_map, size=target_grid, mode="bicubic", align_corners=False)
    return resized.flatten(2).transpose(1, 2)


class GramLoss(nn.Module):
    """Mean over images and entries of (G_student − G_teacher)², G = X̂X̂ᵀ of L2-normalised patches.

    Patches are row-major over their (h, w) grid. When the Gram teacher saw the crop at another
    resolution its patch map is first resized (bicubic) to the student's grid. Computed in fp32;
    the teacher side carries no gradient.
    """

    def forward(
        self,
        student_patches: Tensor,
        teacher_patches: Tensor,
        student_grid: tuple[int, int],
        teacher_grid: tuple[int, int],
    ) -> Tensor:
        """student_patches (B, h·w, D), teacher_patches (B, h'·w', D) for grids (h, w) and (h', w')."""
        student_grid, teacher_grid = tuple(student_grid), tuple(teacher_grid)
        for name, patches, grid in (
            ("student", student_patches, student_grid),
            ("teacher", teacher_patches, teacher_grid),
        ):
            if patches.shape[1] != grid[0] * grid[1]:
                raise ValueError(
                    f"{name} has {patches.shape[1]} patches, but its grid {grid} holds {grid[0] * grid[1]}"
                )
        with torch.autocast(device_type=student_patches.device.type, enabled=False):
            with torch.no_grad():
                teacher = teacher_patches.float()
                if teacher_grid != student_grid:
                    teacher = _resize_patch_map(teacher, teacher_grid, student_grid)
                teacher_gram = _patch_gram(teacher)
            student_gram = _patch_gram(student_patches.float())
            return (student_gram - teacher_gram).square().mean()
