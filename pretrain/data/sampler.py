"""Infinite, deterministic, resumable plan of every global batch drawn from a mixture of sources.

Design:
- The unit is the global batch. Iteration t holds G = batch_size_per_rank × world_size samples, the
  global sample positions t·G … t·G + G − 1. Position i goes to rank i % world_size, so every rank
  builds its own share of every global batch. Whole batches go to the data-loader workers
  round-robin from the start iteration (worker w builds iterations start + w, start + w + n_workers,
  …), the order in which torch's DataLoader collects them.
- Composition: with probability `p_homogeneous` a batch is homogeneous, all from one source drawn by
  `homogeneous_weights` (DINOv3: 10% ImageNet-only batches); otherwise every sample's source is drawn
  by `weights` (multinomial counts, shuffled over the batch positions). The draws depend only on
  (seed, iteration); batch compositions are drawn 1024 iterations per generator so that the state
  at any iteration is cheap to recompute.
- Each source is read through its own infinite stream of epoch-wise permutations (that of epoch e is
  seeded by the source's seed + e). A source's cursor at iteration t is the number of its samples
  in iterations 0 … t − 1, known from the composition draws alone.
- So everything is a function of (seed, iteration): resuming at iteration t (sample position t·G)
  continues the same sequence exactly, whatever the number of workers, and the checkpoint needs no
  loader state. The trainer's "epochs" are a fixed iteration count of its own choosing; they are
  unrelated to the passes over each source.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

_CHUNK = 1024  # iterations whose compositions one generator draws
_SOURCE_SEED_STRIDE = 2**32  # source s permutes with seed + s·stride, so sources never share a seed
_COMPOSITION_STREAM, _ORDER_STREAM = 0, 1  # keep the two kinds of draws statistically independent


def _normalised(weights: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0 or (array < 0).any() or array.sum() <= 0:
        raise ValueError(f"{name} must be non-negative with a positive sum, got {tuple(weights)}")
    return array / array.sum()


@dataclass(frozen=True)
class MixtureConfig:
    """How global batches draw from the sources (one weight per source, normalised)."""

    weights: tuple[float, ...] = (1.0,)
    # Probability that a whole batch comes from a single source, drawn by homogeneous_weights
    # (None: by weights). DINOv3: p_homogeneous=0.1, homogeneous_weights=(1, 0) with ImageNet first.
    p_homogeneous: float = 0.0
    homogeneous_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _normalised(self.weights, "weights")
        if not 0.0 <= self.p_homogeneous <= 1.0:
            raise ValueError(f"p_homogeneous must be in [0, 1], got {self.p_homogeneous}")
        if self.homogeneous_weights is not None:
            _normalised(self.homogeneous_weights, "homogeneous_weights")
            if len(self.homogeneous_weights) != len(self.weights):
                raise ValueError(
                    f"homogeneous_weights has {len(self.homogeneous_weights)} entries, weights "
                    f"{len(self.weights)}: give one per source"
                )


class EpochPermutations:
    """The infinite index stream of one source: position p reads permutation(p // size)[p % size]."""

    def __init__(self, size: int, seed: int) -> None:
        if size <= 0:
            raise ValueError(f"a source needs at least one image, got size {size}")
        self.size = size
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}  # the two latest epochs: a batch may straddle them

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch `epoch`, seeded by seed + epoch."""
        if epoch not in self._cache:
            if len(self._cache) == 2:
                del self._cache[min(self._cache)]
            # int32 halves the memory of a large source's permutation, held by every worker.
            order = np.arange(self.size, dtype=np.int32 if self.size < 2**31 else np.int64)
            np.random.default_rng(self.seed + epoch).shuffle(order)
            self._cache[epoch] = order
        return self._cache[epoch]

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.size)
        indices = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            indices[selected] = self.permutation(int(epoch))[offsets[selected]]
        return indices


@dataclass(frozen=True)
class BatchIndices:
    """The samples of one iteration (a whole global batch or one rank's share): source and index."""

    iteration: int
    sources: np.ndarray  # (n,) int64 source of each sample
    indices: np.ndarray  # (n,) int64 image index within its source
    positions: np.ndarray  # (n,) int64 global sample positions iteration·G + k
    homogeneous_source: int | None  # the single source of a homogeneous batch, None for a mixed one

    def shard(self, rank: int, world_size: int) -> BatchIndices:
        """The share of `rank`: global positions i with i % world_size == rank."""
        part = slice(rank, None, world_size)
        return BatchIndices(
            self.iteration,
            self.sources[part],
            self.indices[part],
            self.positions[part],
            self.homogeneous_source,
        )


@dataclass(frozen=True)
class _Chunk:
    counts: np.ndarray  # (CHUNK, S) samples of each source in each iteration
    cursors: np.ndarray  # (CHUNK, S) samples of each source in all earlier iterations
    homogeneous_source: np.ndarray  # (CHUNK,) source of a homogeneous batch, -1 for a mixed one


class MixtureSampler:
    """Random access to the global batch of any iteration, and the stream of a rank and worker."""

    def __init__(
        self,
        source_sizes: Sequence[int],
        global_batch_size: int,
        mixture: MixtureConfig = MixtureConfig(),
        seed: int = 0,
    ) -> None:
        if len(mixture.weights) != len(source_sizes):
            raise ValueError(f"{len(source_sizes)} sources but {len(mixture.weights)} mixture weights")
        if global_batch_size <= 0 or seed < 0:
            raise ValueError(f"need global_batch_size > 0 and seed >= 0, got {global_batch_size}, {seed}")
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.mixture = mixture
        self._weights = _normalised(mixture.weights, "weights")
        self._homogeneous_weights = _normalised(mixture.homogeneous_weights or mixture.weights, "weights")
        self._streams = [
            EpochPermutations(size, seed + source * _SOURCE_SEED_STRIDE)
            for source, size in enumerate(source_sizes)
        ]
        self._chunk_starts = [np.zeros(len(source_sizes), dtype=np.int64)]  # cursors at each chunk start
        self._chunk_cache: tuple[int, _Chunk] | None = None

    def _draw_compositions(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _COMPOSITION_STREAM, chunk])
        homogeneous = rng.random(_CHUNK) < self.mixture.p_homogeneous
        homogeneous_source = rng.choice(len(self._streams), size=_CHUNK, p=self._homogeneous_weights)
        counts = rng.multinomial(self.global_batch_size, self._weights, size=_CHUNK)
        counts[homogeneous] = 0
        counts[homogeneous, homogeneous_source[homogeneous]] = self.global_batch_size
        return counts, np.where(homogeneous, homogeneous_source, -1)

    def _chunk(self, chunk: int) -> _Chunk:
        if self._chunk_cache is None or self._chunk_cache[0] != chunk:
            while len(self._chunk_starts) <= chunk:
                counts, _ = self._draw_compositions(len(self._chunk_starts) - 1)
                self._chunk_starts.append(self._chunk_starts[-1] + counts.sum(axis=0))
            counts, homogeneous_source = self._draw_compositions(chunk)
            cursors = self._chunk_starts[chunk] + np.cumsum(counts, axis=0) - counts
            self._chunk_cache = (chunk, _Chunk(counts, cursors, homogeneous_source))
        return self._chunk_cache[1]

    def batch(self, iteration: int) -> BatchIndices:
        """The whole global batch of `iteration`, in global sample-position order."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        chunk, row = divmod(iteration, _CHUNK)
        table = self._chunk(chunk)
        counts, cursors = table.counts[row], table.cursors[row]
        order_rng = np.random.default_rng([self.seed, _ORDER_STREAM, iteration])
        sources = order_rng.permutation(np.repeat(np.arange(len(self._streams)), counts))
        indices = np.empty(self.global_batch_size, dtype=np.int64)
        for source in np.flatnonzero(counts):
            indices[sources == source] = self._streams[source][cursors[source] + np.arange(counts[source])]
        homogeneous_source = int(table.homogeneous_source[row])
        return BatchIndices(
            iteration,
            sources.astype(np.int64),
            indices,
            iteration * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64),
            None if homogeneous_source < 0 else homogeneous_source,
        )

    def iterate(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        start_iteration: int = 0,
    ) -> Iterator[BatchIndices]:
        """The infinite stream of `rank`'s shares of the iterations that `worker` builds."""
        if not 0 <= rank < world_size or self.global_batch_size % world_size:
            raise ValueError(
                f"need 0 <= rank < world_size and world_size dividing the global batch size, got rank "
                f"{rank}, world_size {world_size}, global batch {self.global_batch_size}"
            )
        if not 0 <= worker < num_workers:
            raise ValueError(f"need 0 <= worker < num_workers, got {worker}, {num_workers}")
        for iteration in itertools.count(start_iteration + worker, num_workers):
            yield self.batch(iteration).shard(rank, world_size)
