"""Cosine k-nearest-neighbour search over L2-normalised float32 vectors with FAISS.

Inner product equals cosine similarity for unit vectors, so every index here uses the inner-product
metric and returns similarities, not distances. Small databases are searched exactly; large ones go
through an IVF-Flat index (vectors stored uncompressed, so the similarities it returns are exact for the
neighbours it finds and the dedup thresholds keep their meaning; only recall is approximate, which
`measure_recall` quantifies). FAISS runs on GPU when one is visible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

GpuMode = Literal["auto", "always", "never"]

# FAISS k-means warns below 39 training points per centroid; the nlist heuristic stays above it.
_MIN_TRAIN_POINTS_PER_LIST = 39


@dataclass(frozen=True)
class KnnConfig:
    """How to build and search the index; the number of neighbours k is an argument of each search,
    because every stage picks its own (dedup 64, sample-based retrieval 4 or 32)."""

    index: Literal["auto", "flat", "ivf"] = "auto"
    # 'auto' searches exactly up to this database size: an exact self-kNN of 10^5 vectors takes about
    # a minute on 2 CPU cores and grows quadratically (CURATION.md: hours at 10^6).
    exact_max: int = 100_000
    nlist: int | None = None  # IVF lists; None -> 4·sqrt(n), at least 39 training points per list
    nprobe: int = 32  # lists visited per query: the recall / speed knob
    train_points_per_list: int = 64  # IVF quantiser is trained on nlist × this sampled vectors
    query_batch: int = 65_536  # queries per FAISS call, bounds temporary memory
    use_gpu: GpuMode = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.index not in ("auto", "flat", "ivf"):
            raise ValueError(f"KnnConfig.index must be 'auto', 'flat' or 'ivf', got {self.index!r}")
        if self.use_gpu not in ("auto", "always", "never"):
            raise ValueError(f"KnnConfig.use_gpu must be 'auto', 'always' or 'never', got {self.use_gpu!r}")
        for name in ("exact_max", "nprobe", "train_points_per_list", "query_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"KnnConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"KnnConfig.nlist must be >= 1 or None (heuristic), got {self.nlist}")


def gpu_enabled(use_gpu: GpuMode) -> bool:
    """Resolve 'auto' to whether FAISS sees a GPU; 'always' without one is a configuration error."""
    available = faiss.get_num_gpus() > 0
    if use_gpu == "always" and not available:
        raise ValueError("use_gpu='always' but FAISS sees no GPU: install faiss-gpu or use 'auto'")
    return available and use_gpu != "never"


def to_device(index: faiss.Index, use_gpu: GpuMode) -> faiss.Index:
    """Clone a CPU index onto all visible GPUs when enabled (settings such as nprobe are copied)."""
    return faiss.index_cpu_to_all_gpus(index) if gpu_enabled(use_gpu) else index


def as_float32(x: np.ndarray) -> np.ndarray:
    """FAISS needs C-contiguous float32 (n, d); avoid a copy when the input already is."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    _check_vectors(x)
    return x


def default_nlist(n: int) -> int:
    """4·sqrt(n) lists, capped so that every list gets enough training points."""
    return max(1, min(int(4 * math.sqrt(n)), n // _MIN_TRAIN_POINTS_PER_LIST))


def resolve_index_kind(n: int, config: KnnConfig) -> Literal["flat", "ivf"]:
    if config.index == "auto":
        return "flat" if n <= config.exact_max else "ivf"
    return config.index


def _check_vectors(x: np.ndarray) -> None:
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")


def add_in_batches(index: faiss.Index, database: np.ndarray, batch: int) -> faiss.Index:
    """Add rows batch by batch, converting each to float32, so a memory-mapped or float16 database is
    never copied whole."""
    for start in range(0, len(database), batch):
        index.add(as_float32(database[start : start + batch]))
    return index


def build_index(database: np.ndarray, config: KnnConfig = KnnConfig()) -> faiss.Index:
    """Index the database vectors: IndexFlatIP (exact) or IndexIVFFlat with inner product, whose
    coarse quantiser is trained on a random sample of nlist × train_points_per_list vectors."""
    _check_vectors(database)
    n, dim = database.shape
    if resolve_index_kind(n, config) == "flat":
        return add_in_batches(to_device(faiss.IndexFlatIP(dim), config.use_gpu), database, config.query_batch)
    nlist = config.nlist or default_nlist(n)
    if nlist > n:
        raise ValueError(f"KnnConfig.nlist={nlist} exceeds the {n} database vectors; lower it")
    cpu_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    cpu_index.nprobe = min(config.nprobe, nlist)
    cpu_index.cp.min_points_per_centroid = 1  # the sample size is chosen here, silence FAISS's warning
    cpu_index.cp.seed = config.seed
    index = to_device(cpu_index, config.use_gpu)
    train_size = min(n, nlist * config.train_points_per_list)
    sample = np.random.default_rng(config.seed).choice(n, size=train_size, replace=False)
    index.train(as_float32(database[np.sort(sample)]))
    return add_in_batches(index, database, config.query_batch)


def search(
    index: faiss.Index, queries: np.ndarray, k: int, query_batch: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product, in query batches. Missing neighbours (k > database size, or an IVF probe
    that reached too few vectors) come back as index -1 with similarity -inf."""
    _check_vectors(queries)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    similarities = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), query_batch):
        stop = start + query_batch
        similarities[start:stop], indices[start:stop] = index.search(as_float32(queries[start:stop]), k)
    similarities[indices < 0] = -np.inf
    return similarities, indices


def knn_search(
    queries: np.ndarray, database: np.ndarray, k: int, config: KnnConfig = KnnConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """k most similar database vectors for every query: (similarities, indices), both (n_queries, k),
    sorted by decreasing similarity."""
    return search(build_index(database, config), queries, k, config.query_batch)


def drop_self(similarities: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn a (n, k+1) self-search into (n, k) neighbours of others. Each row loses the entry that is
    the query itself, wherever ties put it; a row whose self was not returned (exact duplicates filling
    the list, or an IVF miss) loses its least similar entry instead."""
    n, width = indices.shape
    is_self = indices == np.arange(n)[:, None]
    is_self &= np.cumsum(is_self, axis=1) == 1  # only the first occurrence
    no_self = ~is_self.any(axis=1)
    is_self[no_self, width - 1] = True
    keep = ~is_self
    return similarities[keep].reshape(n, width - 1), indices[keep].reshape(n, width - 1)


def self_knn(
    x: np.ndarray, k: int, config: KnnConfig = KnnConfig(), index: faiss.Index | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest other points of every point of x (the point itself excluded). Pass `index` to reuse
    an index already built over x."""
    index = build_index(x, config) if index is None else index
    return drop_self(*search(index, x, k + 1, config.query_batch))


@dataclass(frozen=True)
class RecallReport:
    """Pair recall of the configured index against exact search on a query sample."""

    index_kind: str
    sample_size: int
    threshold: float
    k: int
    exact_pairs: int  # (query, neighbour) pairs above threshold in the exact top-k
    found_pairs: int  # of those, pairs the configured index also returned
    exact_seconds: float  # exact search time of the sample
    approx_seconds: float  # configured-index search time of the sample

    @property
    def recall(self) -> float:
        """found / exact; NaN when the sample holds no pair above the threshold."""
        return self.found_pairs / self.exact_pairs if self.exact_pairs else math.nan


def measure_recall(
    x: np.ndarray,
    config: KnnConfig = KnnConfig(),
    sample_size: int = 1_000,
    threshold: float = 0.6,
    k: int = 64,
    seed: int = 0,
    index: faiss.Index | None = None,
) -> RecallReport:
    """Pair recall of the index that `config` builds over x (or `index`, already built over x) on a
    random query sample: among the (query, neighbour) pairs with similarity above `threshold` in the
    exact self top-k, the share the configured index also returns. This is what dedup thresholds need;
    plain top-k recall would also count far neighbours that never become edges."""
    _check_vectors(x)
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=min(sample_size, len(x)), replace=False))
    queries = as_float32(x[rows])
    index = build_index(x, config) if index is None else index
    exact_index = add_in_batches(
        to_device(faiss.IndexFlatIP(x.shape[1]), config.use_gpu), x, config.query_batch
    )

    def pairs(idx: faiss.Index) -> tuple[set[tuple[int, int]], float]:
        start = time.perf_counter()
        sims, nbrs = search(idx, queries, k + 1, config.query_batch)
        seconds = time.perf_counter() - start
        query_pos, column = np.nonzero((sims > threshold) & (nbrs != rows[:, None]) & (nbrs >= 0))
        return set(zip(rows[query_pos].tolist(), nbrs[query_pos, column].tolist(), strict=True)), seconds

    exact, exact_seconds = pairs(exact_index)
    approx, approx_seconds = pairs(index)
    return RecallReport(
        index_kind=resolve_index_kind(len(x), config),
        sample_size=len(rows),
        threshold=threshold,
        k=k,
        exact_pairs=len(exact),
        found_pairs=len(exact & approx),
        exact_seconds=exact_seconds,
        approx_seconds=approx_seconds,
    )
