"""Weight-free copy-detection descriptor: Meta's PDQ perceptual hash (`pdqhash` package, MIT bindings
of the BSD reference code), as a unit vector so cosine search works unchanged.

PDQ downsamples the luminance to 64x64, takes a 2-D DCT, keeps the 16x16 lowest frequencies and
thresholds them at their median: 256 bits. Bits b in {0, 1} become (2b - 1) / 16, a unit vector, so
cosine similarity = 1 - 2 * hamming / 256 (PDQ's usual match cut, hamming <= 31, is similarity >= 0.758).

It survives re-encoding, resizing, brightness changes and small overlays; it is NOT invariant to
horizontal flips (a mirrored copy looks unrelated). `describe` therefore also hashes each image's
mirror; pass those to `dedup.copy_components(mirrored=...)` and `dedup.decontaminate(eval_mirrored=...)`.
Flat images (solid colours, tiny gradients) give unreliable hashes that all look alike: PDQ reports a
quality score and recommends ignoring hashes below 50 (leave them out of dedup, or treat as singletons).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pdqhash
from PIL import Image

DIM = 256
# Measured on procedurally drawn images (see tests/curation/test_copy_descriptor.py and the report):
# copies (JPEG q50, x0.5 resize, 90% centre crop, brightness, small text) vs distinct images.
DEDUP_THRESHOLD = 0.5
DECONTAMINATION_THRESHOLD = 0.4
MIN_QUALITY = 50  # PDQ's own advice: below this the hash is not trustworthy
_MAX_SIDE = 512  # PDQ looks at 64x64 anyway; shrinking first makes large images ~10x cheaper


@dataclass(frozen=True)
class CopyDescriptors:
    vectors: np.ndarray  # (N, 256) float32, unit norm
    mirrored: np.ndarray | None  # (N, 256) descriptors of the horizontally flipped images
    quality: np.ndarray  # (N,) int64 PDQ quality in [0, 100]; below MIN_QUALITY the hash is unreliable


def _pixels(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    if max(image.size) > _MAX_SIDE:
        image = image.copy()
        image.thumbnail((_MAX_SIDE, _MAX_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _unit_vector(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.float32) * 2.0 - 1.0) / np.sqrt(DIM, dtype=np.float32)


def describe(images: list[Image.Image], with_mirrored: bool = True) -> CopyDescriptors:
    """PDQ descriptors, PDQ quality and (optionally) descriptors of the mirrored images."""
    vectors = np.empty((len(images), DIM), dtype=np.float32)
    mirrored = np.empty((len(images), DIM), dtype=np.float32) if with_mirrored else None
    quality = np.empty(len(images), dtype=np.int64)
    for row, image in enumerate(images):
        pixels = _pixels(image)
        bits, quality[row] = pdqhash.compute(pixels)
        vectors[row] = _unit_vector(bits)
        if mirrored is not None:
            # Hash the flipped pixels rather than PDQ's dihedral bit tricks: those differ from the hash
            # of an actually mirrored file by ~10% of the bits.
            mirrored[row] = _unit_vector(pdqhash.compute(np.ascontiguousarray(pixels[:, ::-1]))[0])
    return CopyDescriptors(vectors, mirrored, quality)


def descriptors(images: list[Image.Image]) -> np.ndarray:
    """(N, 256) float32 unit vectors; cosine similarity = 1 - 2 * hamming / 256."""
    return describe(images, with_mirrored=False).vectors
