"""Batch the multi-crop views of B images and draw the iBOT masks of their 2B global crops.

Layout is crop-major: all images' view 1, then all images' view 2 (then the locals view by view), so
`crops.chunk(n_views)` gives one view of the whole batch, which is how the losses pair views.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from pretrain.data.masking import BlockMaskConfig, BlockMaskGenerator


@lru_cache(maxsize=8)
def _mask_generator(grid: tuple[int, int], config: BlockMaskConfig) -> BlockMaskGenerator:
    return BlockMaskGenerator(grid, config)


def _stack_views(samples: Sequence[dict[str, list[Tensor]]], name: str) -> Tensor:
    n_views = len(samples[0][name])
    if any(len(sample[name]) != n_views for sample in samples):
        raise ValueError(f"every sample must have the same number of {name}")
    return torch.stack([sample[name][view] for view in range(n_views) for sample in samples])


def draw_masks(
    n_crops: int,
    grid: tuple[int, int],
    *,
    mask_ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    block_masking: BlockMaskConfig | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n_crops, P) bool masks: int(n_crops·mask_probability) crops masked, in random crop order.

    The masked crops' target ratios are stratified: crop i draws its ratio uniformly in the i-th of
    the intervals cut by linspace(low, high), so every batch spans the whole range. block_masking
    shapes the blocks (None: the defaults of BlockMaskConfig).
    """
    low, high = mask_ratio_range
    if not 0.0 <= low <= high <= 1.0 or not 0.0 <= mask_probability <= 1.0:
        raise ValueError(
            "need 0 <= low <= high <= 1 and 0 <= mask_probability <= 1, "
            f"got {mask_ratio_range} and {mask_probability}"
        )
    # Python's generator is far faster than torch for the many scalar draws of block masking.
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
    mask_generator = _mask_generator(tuple(grid), block_masking or BlockMaskConfig())
    n_patches = mask_generator.num_patches
    n_masked_crops = int(n_crops * mask_probability)
    bounds = np.linspace(low, high, n_masked_crops + 1)
    masks = np.zeros((n_crops, n_patches), dtype=bool)
    for crop in range(n_masked_crops):
        ratio = rng.uniform(bounds[crop], bounds[crop + 1])
        masks[crop] = mask_generator(int(n_patches * ratio), rng).reshape(-1)
    crop_order = list(range(n_crops))
    rng.shuffle(crop_order)
    return torch.from_numpy(masks[crop_order])


def collate_multicrop(
    samples: Sequence[dict[str, list[Tensor]]],
    *,
    patch_size: int,
    mask_ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    block_masking: BlockMaskConfig | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Stack B samples of `MultiCropAugmentation` and draw iBOT masks, deterministic given `generator`.

    Returns:
      global_crops  (2B, 3, H, W), crop-major: rows b and B + b are the two views of image b
      local_crops   (n_local·B, 3, h, w), crop-major; shape (0,) when there are no local crops
      gram_crops    (2B, 3, H', W'), crop-major, only when the samples carry them
      masks         (2B, P) bool, True = masked patch, P = (H / patch_size)·(W / patch_size)
      mask_indices  (M,) int64 flat indices into masks.view(-1) of the M masked patches, row-major
      n_masked      (2B,) int64 masked patches per global crop
      mask_weights  (M,) float32 1 / n_masked of each masked patch's crop: the iBOT loss is
                    -(1/2B) Σ weights · cross-entropy, a per-crop mean that every crop counts in
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    global_crops = _stack_views(samples, "global_crops")
    height, width = global_crops.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"global crops {height}x{width} are not a multiple of patch_size {patch_size}")
    masks = draw_masks(
        len(global_crops),
        (height // patch_size, width // patch_size),
        mask_ratio_range=mask_ratio_range,
        mask_probability=mask_probability,
        block_masking=block_masking,
        generator=generator,
    )
    n_masked = masks.sum(dim=1)
    mask_indices = masks.view(-1).nonzero().squeeze(1)
    batch = {
        "global_crops": global_crops,
        "local_crops": _stack_views(samples, "local_crops") if samples[0]["local_crops"] else torch.empty(0),
        "masks": masks,
        "mask_indices": mask_indices,
        "n_masked": n_masked,
        "mask_weights": (1.0 / n_masked.float()).repeat_interleave(n_masked),
    }
    if "gram_crops" in samples[0]:
        batch["gram_crops"] = _stack_views(samples, "gram_crops")
    return batch
