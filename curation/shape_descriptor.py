"""Weight-free semantic descriptor for offline runs: the Fourier magnitudes of oriented-gradient maps,
a colour- and translation-invariant description of outlines, as a unit vector.

The semantic embedder (retrieval, clustering) should be a trained network: an open_clip tower, or the
teacher this project's pretraining exports (`dino:`). Where no weights can be fetched, as on the demo
web, a randomly initialised network groups images by colour and position, not by what they show. This
descriptor describes what outlines an image holds, wherever they are:

1. the shorter side is resized to 64 pixels and the centre square kept (``SIDE``);
2. a 3x3 box blur, then per pixel the gradient of the colour channel with the strongest gradient
   (colour-invariant: only the contrast of an edge counts, not its colours);
3. gradient orientations modulo 180 degrees, in 12 bins with linear interpolation between neighbouring
   bins: 12 maps of gradient magnitude, average-pooled to 32x32 and divided by their total (contrast);
4. the magnitude of each map's 2-D Fourier transform at the lowest frequencies (|fy|, fx < 4, the
   half-plane that is not redundant: 25 per map, 300 in all). A shift of the image changes only the
   phases, so the description does not depend on where the object is, while the low frequencies still
   say how edges of each orientation are spread and spaced (the bars of "bars", the arms of a "star");
5. square roots (which damp the dominant zero frequency), then L2 normalisation.

On the demo web's held-out images it reaches 0.80 k-NN top-1 over 12 concepts, against 0.11 for raw
pixels and 0.09 for a random ViT (k=20, cosine). It is not a substitute for a trained embedder on real
photographs, where outlines alone say little.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIDE = 64
BINS = 12
POOL = 2
FREQUENCIES = 4
DIM = BINS * (FREQUENCIES + (2 * FREQUENCIES - 1) * (FREQUENCIES - 1))


def preprocess(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, SIDE, SIDE) float32 in [0, 1]: shorter side to SIDE, centre square."""
    image = image.convert("RGB")
    scale = SIDE / min(image.size)
    width, height = max(SIDE, round(image.width * scale)), max(SIDE, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (width - SIDE) // 2, (height - SIDE) // 2
    image = image.crop((left, top, left + SIDE, top + SIDE))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def orientation_maps(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, BINS, H, W): gradient magnitude split by orientation (steps 2 and 3)."""
    channels = images.shape[1]
    smooth = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    kernel = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).repeat(channels, 1, 1, 1)
    gx = F.conv2d(smooth, kernel, padding=(0, 1), groups=channels)
    gy = F.conv2d(smooth, kernel.transpose(2, 3), padding=(1, 0), groups=channels)
    strongest = (gx.square() + gy.square()).argmax(dim=1, keepdim=True)
    gx, gy = gx.gather(1, strongest), gy.gather(1, strongest)
    magnitude = (gx.square() + gy.square()).sqrt()
    position = torch.atan2(gy, gx).remainder(math.pi) / math.pi * BINS
    lower = position.floor()
    upper_weight = position - lower
    lower = lower.long() % BINS
    maps = torch.zeros(images.shape[0], BINS, *images.shape[2:])
    maps.scatter_add_(1, lower, magnitude * (1 - upper_weight))
    maps.scatter_add_(1, (lower + 1) % BINS, magnitude * upper_weight)
    return maps


def descriptors(images: torch.Tensor) -> np.ndarray:
    """(N, 3, SIDE, SIDE) images from ``preprocess`` -> (N, DIM) float32 unit vectors."""
    # The floor gives an image without edges (a flat colour) the description of edges spread evenly
    # over all orientations and places, instead of a zero vector; elsewhere it is negligible.
    maps = F.avg_pool2d(orientation_maps(images), POOL) + 1e-6
    maps = maps / maps.sum(dim=(1, 2, 3), keepdim=True)
    spectrum = torch.fft.rfft2(maps).abs()  # (N, BINS, H, W // 2 + 1); column 0 is fx = 0
    f = FREQUENCIES
    # fx = 0 needs only fy >= 0 (its negative rows mirror them); fx > 0 takes fy in (-f, f).
    low = torch.cat(
        [
            spectrum[:, :, :f, 0].flatten(2),
            spectrum[:, :, :f, 1:f].flatten(2),
            spectrum[:, :, -(f - 1) :, 1:f].flatten(2),
        ],
        dim=2,
    )
    return F.normalize(low.flatten(1).sqrt(), dim=1).numpy().astype(np.float32)
