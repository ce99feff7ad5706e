"""The pretraining stream: this rank's share of every global batch, loaded, augmented and collated.

Randomness is keyed, not carried: the augmentation of a sample is seeded by (seed, its global
sample position) and the masks of a rank's batch by (seed, iteration, rank). A run resumed at
iteration t therefore sees exactly the batches it would have seen, and the augmentations stay the
same under a different world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.sampler import BatchIndices, MixtureConfig, MixtureSampler
from pretrain.data.sources import ImageSource
from pretrain.distributed import ignore_stop_signals

_SAMPLE_STREAM, _MASK_STREAM = 0, 1


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])


class PretrainDataset(IterableDataset):
    """Infinite stream of collated batches of `batch_size` samples (this rank's share) from `start_iteration`.

    transform: PIL image -> sample dict (e.g. MultiCropAugmentation).
    collate: called as collate(samples, generator=torch.Generator) (e.g. a functools.partial of
      collate_multicrop). Each batch also carries `iteration` (int), `source_ids` (B,) int64 and
      `n_skipped`, the corrupt images skipped while building it.
    Use `loader()` (or a DataLoader with batch_size=None): the items are already batches.
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        transform: Callable[[Image.Image], dict[str, Any]],
        collate: Callable[..., dict[str, Any]],
        batch_size: int,
        *,
        mixture: MixtureConfig | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_iteration: int = 0,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("PretrainDataset needs at least one source")
        if batch_size <= 0 or not 0 <= rank < world_size or start_iteration < 0:
            raise ValueError(
                f"need batch_size > 0, 0 <= rank < world_size and start_iteration >= 0, got {batch_size}, "
                f"rank {rank}, world_size {world_size}, start_iteration {start_iteration}"
            )
        self.sources = list(sources)
        self.transform = transform
        self.collate = collate
        self.batch_size = batch_size
        self.mixture = mixture if mixture is not None else MixtureConfig(weights=(1.0,) * len(self.sources))
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_iteration = start_iteration

    def sampler(self) -> MixtureSampler:
        return MixtureSampler(
            [len(source) for source in self.sources],
            self.batch_size * self.world_size,
            self.mixture,
            self.seed,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shares = self.sampler().iterate(
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            start_iteration=self.start_iteration,
        )
        for share in shares:
            yield self.build(share)

    def build(self, share: BatchIndices) -> dict[str, Any]:
        """Load, augment and collate one rank's share of an iteration."""
        skipped_before = sum(source.n_skipped for source in self.sources)
        samples = []
        # Keyed seeds on a forked generator: reproducible, and the trainer's own RNG is left alone
        # when the loader runs in the main process.
        with torch.random.fork_rng(devices=[]):
            for source, index, position in zip(share.sources, share.indices, share.positions, strict=True):
                torch.manual_seed(_seed(self.seed, _SAMPLE_STREAM, int(position)))
                samples.append(self.transform(self.sources[source].load(int(index))))
        generator = torch.Generator().manual_seed(_seed(self.seed, _MASK_STREAM, share.iteration, self.rank))
        batch = self.collate(samples, generator=generator)
        batch["iteration"] = share.iteration
        batch["source_ids"] = torch.from_numpy(share.sources)
        batch["n_skipped"] = sum(source.n_skipped for source in self.sources) - skipped_before
        return batch

    def loader(self, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
        """A DataLoader that passes the batches through in iteration order."""
        return DataLoader(
            self,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=ignore_stop_signals,
        )
