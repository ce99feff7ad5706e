"""DINO multi-crop augmentation: 2 global and N local views per image, plus an optional Gram view.

Each view gets its own crop, colour distortion, and view-specific blur/solarisation. The blur and
solarisation probabilities are explicit per view so that the choice between the DINO paper and the
public DINOv2/v3 code (see AugmentConfig) is visible in every config and testable.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOLARIZE_THRESHOLD = 128  # on 8-bit pixel values, as in DINO


@dataclass(frozen=True)
class AugmentConfig:
    """Multi-crop settings; defaults follow the DINO paper with the DINOv2 crop scales."""

    global_crop_size: int = 224
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    n_local_crops: int = 8
    horizontal_flip: bool = True  # DINOv3 7B trains without it
    # Brightness, contrast, saturation, hue.
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_kernel_size: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Probabilities of the DINO paper. The public DINOv2/v3 code passes these numbers to a blur that
    # takes p as the probability of NOT blurring, so its global view 1 is never blurred and view 2 is
    # blurred 90% of the time; its released checkpoints were trained that way. To reproduce them, set
    # global1_blur_p=0.0 and global2_blur_p=0.9 (the local 0.5 is the same either way).
    global1_blur_p: float = 1.0
    global1_solarize_p: float = 0.0
    global2_blur_p: float = 0.1
    global2_solarize_p: float = 0.2
    local_blur_p: float = 0.5
    local_solarize_p: float = 0.0
    # DINOv3 Gram anchoring: >0 adds, per global crop, the same crop geometry rendered at
    # global_crop_size × gram_crop_factor without colour distortion, for the Gram teacher.
    gram_crop_factor: float = 0.0

    def __post_init__(self) -> None:
        probabilities = {
            field.name: getattr(self, field.name) for field in fields(self) if field.name.endswith("_p")
        }
        bad = {name: p for name, p in probabilities.items() if not 0.0 <= p <= 1.0}
        if bad:
            raise ValueError(f"probabilities must be in [0, 1], got {bad}")
        for name in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        if self.global_crop_size <= 0 or self.local_crop_size <= 0 or self.n_local_crops < 0:
            raise ValueError("crop sizes must be positive and n_local_crops non-negative")
        if self.blur_kernel_size <= 0 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd and positive, got {self.blur_kernel_size}")
        if self.gram_crop_factor < 0:
            raise ValueError(f"gram_crop_factor must be >= 0 (0 = no Gram view), got {self.gram_crop_factor}")


class MultiCropAugmentation:
    """PIL RGB image -> {"global_crops": 2 × (3, G, G), "local_crops": n × (3, L, L)} as lists of tensors,
    plus "gram_crops": 2 × (3, G·factor, G·factor) when the Gram view is on.

    Draws from torch's global generator, like torchvision; seed it to reproduce a sample.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        self.config = config
        # Used only to draw crop boxes, so that a Gram view can reuse the box of its global crop.
        self._global_box = v2.RandomResizedCrop(config.global_crop_size, scale=config.global_crop_scale)
        self._local_box = v2.RandomResizedCrop(config.local_crop_size, scale=config.local_crop_scale)
        self._to_normalised_tensor = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )
        self._global1 = self._photometric(config.global1_blur_p, config.global1_solarize_p)
        self._global2 = self._photometric(config.global2_blur_p, config.global2_solarize_p)
        self._local = self._photometric(config.local_blur_p, config.local_solarize_p)

    def _photometric(self, blur_p: float, solarize_p: float) -> v2.Compose:
        config = self.config
        return v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(*config.color_jitter)], p=config.color_jitter_p),
                v2.RandomGrayscale(p=config.grayscale_p),
                v2.RandomApply([v2.GaussianBlur(config.blur_kernel_size, sigma=config.blur_sigma)], p=blur_p),
                v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p),
                self._to_normalised_tensor,
            ]
        )

    def _crop(self, image: Image.Image, box: dict[str, int], size: int, flip: bool) -> Image.Image:
        view = F.resized_crop(image, **box, size=[size, size], interpolation=InterpolationMode.BICUBIC)
        return F.horizontal_flip(view) if flip else view

    def _draw_flip(self) -> bool:
        return self.config.horizontal_flip and bool(torch.rand(()) < 0.5)

    def __call__(self, image: Image.Image) -> dict[str, list[Tensor]]:
        config = self.config
        global_crops, gram_crops = [], []
        for photometric in (self._global1, self._global2):
            box, flip = self._global_box.make_params([image]), self._draw_flip()
            global_crops.append(photometric(self._crop(image, box, config.global_crop_size, flip)))
            if config.gram_crop_factor:
                gram_size = round(config.global_crop_size * config.gram_crop_factor)
                gram_crops.append(self._to_normalised_tensor(self._crop(image, box, gram_size, flip)))
        local_crops = []
        for _ in range(config.n_local_crops):
            box, flip = self._local_box.make_params([image]), self._draw_flip()
            local_crops.append(self._local(self._crop(image, box, config.local_crop_size, flip)))
        views = {"global_crops": global_crops, "local_crops": local_crops}
        if config.gram_crop_factor:
            views["gram_crops"] = gram_crops
        return views
