"""Weight-free copy-detection descriptor built on Meta's PDQ perceptual hash (`pdqhash` package: MIT
bindings of the BSD reference code), as a unit vector so the cosine kNN and dedup code work unchanged.

PDQ downsamples the luminance to 64x64, takes a 2-D DCT, keeps 16x16 low frequencies and thresholds
them at their median: 256 bits. Bits b in {0, 1} become (2b - 1) / 16, a unit vector, so for one
hash cosine similarity = 1 - 2 * hamming / 256 (PDQ's usual match cut, hamming <= 31, is >= 0.758).

Plain PDQ survives re-encoding, resizing, brightness and small overlays but not cropping: a 90%
centre crop falls to similarity ~0.37 in the median, no better than unrelated images in the worst
cases. So by default the descriptor is multi-scale: the normalised mean of the PDQ vectors of centre
crops at 100, 95, 90, 85 and 80% of the frame. A crop of a copy shares most of those views with the
original, which lifts 90% crops to >= 0.57 while unrelated images stay below ~0.38 (measurements
next to the thresholds below). `DescriptorConfig(scales=(1.0,))` gives plain PDQ and the exact
hamming relation.

Not invariant to horizontal flips: `describe` also returns the descriptors of the mirrored images, to
pass to `dedup.copy_components(mirrored=...)` and `dedup.decontaminate(eval_mirrored=...)`.
Flat images (solid colours, a few large shapes) give unreliable hashes that all look alike: PDQ's
quality score flags them; PDQ advises ignoring hashes below 50 (leave them out of the dedup).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pdqhash
from PIL import Image

DIM = 256
# Chosen from 600 procedurally drawn images (2 seeds; 441 with PDQ quality >= 50, the kind
# tests/curation/test_copy_descriptor.py draws), default scales. Copies (JPEG q50, x0.5 resize, 90%
# centre crop, brightness x1.3 and +30, small text; flips against the mirrored descriptors): lowest
# 0.57 (90% crops), then 0.67 (brightness x1.3), all other kinds >= 0.88. Distinct images (~48k
# pairs): highest 0.34 (0.38 when mirrors count), 99.9th percentile 0.25 (0.28). Decontamination leans
# further to recall, as DINOv2's 0.45-vs-0.6 does for SSCD; at pool scale expect more false matches
# from the extreme tail of the distinct-image distribution than these samples show.
DEDUP_THRESHOLD = 0.45
DECONTAMINATION_THRESHOLD = 0.4
MIN_QUALITY = 50
_WORKING_SIDE = 128  # images are box-reduced towards this longest side first: PDQ only looks at 64x64


@dataclass(frozen=True)
class DescriptorConfig:
    scales: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)  # centre-crop fractions averaged together

    def __post_init__(self) -> None:
        if not self.scales or not all(0.0 < s <= 1.0 for s in self.scales):
            raise ValueError(
                f"DescriptorConfig.scales must be non-empty fractions in (0, 1], got {self.scales}"
            )


@dataclass(frozen=True)
class CopyDescriptors:
    vectors: np.ndarray  # (N, 256) float32, unit norm
    mirrored: np.ndarray | None  # (N, 256) descriptors of the horizontally flipped images
    quality: np.ndarray  # (N,) int64 PDQ quality of the full frame, 0-100; below MIN_QUALITY unreliable


def _working_copy(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    factor = max(image.size) // _WORKING_SIDE
    return image.reduce(factor) if factor > 1 else image


def _centre_crop(image: Image.Image, fraction: float) -> np.ndarray:
    width, height = image.size
    dx, dy = width * (1 - fraction) / 2, height * (1 - fraction) / 2
    return np.asarray(image.crop((round(dx), round(dy), round(width - dx), round(height - dy))))


def _describe_one(image: Image.Image, scales: tuple[float, ...]) -> tuple[np.ndarray, int]:
    """Multi-scale descriptor and the PDQ quality of the first scale's hash."""
    hashes = [pdqhash.compute(_centre_crop(image, fraction)) for fraction in scales]
    total = np.sum([bits * 2.0 - 1.0 for bits, _ in hashes], axis=0)
    return (total / np.linalg.norm(total)).astype(np.float32), int(hashes[0][1])


def describe(
    images: list[Image.Image], config: DescriptorConfig = DescriptorConfig(), with_mirrored: bool = True
) -> CopyDescriptors:
    """Descriptors, PDQ quality and (optionally) descriptors of the mirrored images."""
    vectors = np.empty((len(images), DIM), dtype=np.float32)
    mirrored = np.empty((len(images), DIM), dtype=np.float32) if with_mirrored else None
    quality = np.empty(len(images), dtype=np.int64)
    for row, image in enumerate(images):
        working = _working_copy(image)
        vectors[row], quality[row] = _describe_one(working, config.scales)
        if mirrored is not None:
            # Hash actually flipped pixels: PDQ's dihedral bit tricks differ from the hash of a
            # mirrored file by ~10% of the bits.
            mirrored[row] = _describe_one(working.transpose(Image.Transpose.FLIP_LEFT_RIGHT), config.scales)[
                0
            ]
    return CopyDescriptors(vectors, mirrored, quality)


def descriptors(images: list[Image.Image], config: DescriptorConfig = DescriptorConfig()) -> np.ndarray:
    """(N, 256) float32 unit vectors for cosine copy detection (see `describe` for mirrors, quality)."""
    return describe(images, config, with_mirrored=False).vectors
