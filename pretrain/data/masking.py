"""BEiT-style block masks for iBOT: rectangles of patches rather than scattered ones.

Masking whole blocks forces the student to infer a patch from context further away than its
immediate neighbours. Blocks are added until the target count is reached (never exceeded); when no
block fits any more, the remainder is masked at random (DINOv3), so the realised count is exact.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class BlockMaskConfig:
    """Shape of the blocks; the defaults are those of BEiT, DINOv2 and DINOv3."""

    min_block_patches: int = 4
    block_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    # No single block covers more than this share of the grid.
    max_block_fraction: float = 0.5
    max_tries: int = 10  # attempts to place one block before giving up
    complete_to_target: bool = True  # mask random patches to reach the target exactly (v3)

    def __post_init__(self) -> None:
        low, high = self.block_aspect_ratio
        if self.min_block_patches < 1 or not 0 < low <= high or not 0 < self.max_block_fraction <= 1:
            raise ValueError(
                "need min_block_patches >= 1, 0 < aspect low <= high and 0 < max_block_fraction <= 1, "
                f"got {self}"
            )
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {self.max_tries}")


class Block(NamedTuple):
    top: int
    left: int
    height: int
    width: int


class BlockMaskGenerator:
    """Block masks over a (height, width) patch grid, from a caller-provided `random.Random`."""

    def __init__(self, grid: tuple[int, int], config: BlockMaskConfig = BlockMaskConfig()) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.config = config
        self.max_block_patches = max(1, int(config.max_block_fraction * self.num_patches))
        low, high = config.block_aspect_ratio
        self._log_aspect = (math.log(low), math.log(high))

    def blocks(self, n_target: int, rng: random.Random) -> tuple[np.ndarray, list[Block]]:
        """The block mask (height, width) of at most n_target patches, and the blocks that make it.

        Each block: area U(min_block_patches, budget) with budget = min(patches still to mask, block
        cap), log-uniform aspect ratio, random position; kept if it adds 1..budget new patches.
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks: list[Block] = []
        n_masked = 0
        while n_masked < n_target:
            budget = min(n_target - n_masked, self.max_block_patches)
            block = self._place_block(mask, budget, rng)
            if block is None:
                break
            region = mask[block.top : block.top + block.height, block.left : block.left + block.width]
            n_masked += region.size - int(region.sum())
            region[...] = True
            blocks.append(block)
        return mask, blocks

    def _place_block(self, mask: np.ndarray, budget: int, rng: random.Random) -> Block | None:
        for _ in range(self.config.max_tries):
            area = rng.uniform(self.config.min_block_patches, budget)
            aspect = math.exp(rng.uniform(*self._log_aspect))
            height = round(math.sqrt(area * aspect))
            width = round(math.sqrt(area / aspect))
            if not (1 <= height <= self.height and 1 <= width <= self.width):
                continue
            top = rng.randint(0, self.height - height)
            left = rng.randint(0, self.width - width)
            n_new = height * width - int(mask[top : top + height, left : left + width].sum())
            if 0 < n_new <= budget:
                return Block(top, left, height, width)
        return None

    def __call__(self, n_target: int, rng: random.Random) -> np.ndarray:
        """A (height, width) bool mask of n_target patches (at most, without completion)."""
        if not 0 <= n_target <= self.num_patches:
            raise ValueError(f"cannot mask {n_target} of {self.num_patches} patches")
        mask, _ = self.blocks(n_target, rng)
        missing = n_target - int(mask.sum())
        if self.config.complete_to_target and missing > 0:
            free = np.flatnonzero(~mask).tolist()
            mask.flat[rng.sample(free, missing)] = True
        return mask
