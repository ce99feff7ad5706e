"""Pretraining data: image sources, the resumable mixture sampler, multi-crop augmentation, iBOT masks.

Flow: sources (manifest / ImageFolder) -> MixtureSampler (which image at which global position)
-> MultiCropAugmentation (views per image) -> collate_multicrop (crop-major batch + block masks),
tied together by PretrainDataset, an IterableDataset yielding each rank's share of every global batch.
"""

from pretrain.data.augment import AugmentConfig, MultiCropAugmentation
from pretrain.data.collate import collate_multicrop, draw_masks
from pretrain.data.dataset import PretrainDataset
from pretrain.data.masking import BlockMaskConfig, BlockMaskGenerator
from pretrain.data.sampler import BatchIndices, EpochPermutations, MixtureConfig, MixtureSampler
from pretrain.data.sources import ImageFolderSource, ImageSource, ManifestSource

__all__ = [
    "AugmentConfig",
    "BatchIndices",
    "BlockMaskConfig",
    "BlockMaskGenerator",
    "EpochPermutations",
    "ImageFolderSource",
    "ImageSource",
    "ManifestSource",
    "MixtureConfig",
    "MixtureSampler",
    "MultiCropAugmentation",
    "PretrainDataset",
    "collate_multicrop",
    "draw_masks",
]
