"""Seed-based retrieval from the deduplicated pool (DINOv2 LVD-142M, step 4).

Sample-based retrieval suits large seed sets: each seed image pulls its k nearest pool images.
Cluster-based retrieval suits small seed sets, whose k nearest neighbours would be too few: the pool
is clustered once, and every cluster that holds enough seed images contributes its images closest to
the centroid. Indices refer to rows of the arrays passed in; the caller maps them back to sample keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from curation.balance import KMeansConfig, assign, kmeans
from curation.knn import GpuMode, KnnConfig, knn_search

IMAGENET1K_CORE_K = 32  # DINOv2 retrieves 32 neighbours per ImageNet-1k image to make it the core


@dataclass(frozen=True)
class SampleRetrievalConfig:
    """k = 4 pool images per seed image (DINOv2 for ImageNet-22k and Landmarks v2); use
    k = IMAGENET1K_CORE_K for ImageNet-1k."""

    k: int = 4
    knn: KnnConfig = field(default_factory=KnnConfig)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(
                f"SampleRetrievalConfig.k must be >= 1 (pool images per seed image), got {self.k}"
            )


@dataclass(frozen=True)
class RetrievalTable:
    """Parallel columns, one row per (pool image, seed image) pair."""

    pool_index: np.ndarray  # int64
    seed_index: np.ndarray  # int64
    similarity: np.ndarray  # float32 cosine similarity


@dataclass(frozen=True)
class SampleRetrievalResult:
    retrieved: (
        RetrievalTable  # each retrieved pool image once, with its most similar seed, sorted by pool index
    )
    num_sources: np.ndarray  # int64, per `retrieved` row: how many seed images retrieved it
    sources: (
        RetrievalTable  # every (pool, seed) pair found: the count DINOv2 reports, before collision removal
    )

    @property
    def collision_rate(self) -> float:
        """Share of (pool, seed) pairs lost when each pool image is counted once."""
        total = len(self.sources.pool_index)
        return 1.0 - len(self.retrieved.pool_index) / total if total else 0.0


def sample_retrieval(
    pool_embeddings: np.ndarray,
    seed_embeddings: np.ndarray,
    config: SampleRetrievalConfig = SampleRetrievalConfig(),
) -> SampleRetrievalResult:
    """k nearest pool images of every seed image (cosine, L2-normalised inputs)."""
    similarities, indices = knn_search(seed_embeddings, pool_embeddings, config.k, config.knn)
    found = indices >= 0
    seeds = np.broadcast_to(np.arange(len(indices), dtype=np.int64)[:, None], indices.shape)
    pool, seed, sims = indices[found], seeds[found], similarities[found]
    order = np.lexsort((seed, -sims, pool))
    pool, seed, sims = pool[order], seed[order], sims[order]
    first = np.ones(len(pool), dtype=bool)
    first[1:] = pool[1:] != pool[:-1]
    starts = np.flatnonzero(first)
    return SampleRetrievalResult(
        retrieved=RetrievalTable(pool[first], seed[first], sims[first]),
        num_sources=np.diff(np.r_[starts, len(pool)]).astype(np.int64),
        sources=RetrievalTable(pool, seed, sims),
    )


@dataclass(frozen=True)
class PoolClusteringConfig:
    """DINOv2 clusters the 744M pool into 100k clusters (~7.4k images each), once for all seed sets."""

    num_clusters: int = 100_000
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)

    def __post_init__(self) -> None:
        if self.num_clusters < 1:
            raise ValueError(f"PoolClusteringConfig.num_clusters must be >= 1, got {self.num_clusters}")


@dataclass(frozen=True)
class PoolClusters:
    centroids: np.ndarray  # (num_clusters, d) float32
    labels: np.ndarray  # int64 per pool row
    distances: np.ndarray  # float32 squared distance of each pool row to its centroid


def cluster_pool(
    pool_embeddings: np.ndarray, config: PoolClusteringConfig = PoolClusteringConfig()
) -> PoolClusters:
    """K-means of the pool, fitted on a sample and assigned in batches; reusable across seed sets."""
    centroids, labels, distances = kmeans(pool_embeddings, config.num_clusters, config.kmeans)
    return PoolClusters(centroids, labels, distances)


@dataclass(frozen=True)
class ClusterRetrievalConfig:
    """DINOv2: clusters holding more than 3 seed images contribute up to 10k images; at most 1M per
    seed set."""

    min_seeds: int = 3  # a cluster needs MORE than this many seed images
    per_cluster: int = 10_000
    max_total: int = 1_000_000

    def __post_init__(self) -> None:
        if self.min_seeds < 0 or self.per_cluster < 1 or self.max_total < 1:
            raise ValueError(
                "ClusterRetrievalConfig needs min_seeds >= 0, per_cluster >= 1 and max_total >= 1, got "
                f"{self.min_seeds}, {self.per_cluster}, {self.max_total}"
            )


@dataclass(frozen=True)
class ClusterRetrievalResult:
    pool_index: np.ndarray  # int64 retrieved pool rows, sorted by cluster then distance to centroid
    cluster: np.ndarray  # int64 cluster of each retrieved row
    distance: np.ndarray  # float32 squared distance of each retrieved row to its centroid
    seed_counts: np.ndarray  # int64 (num_clusters,) seed images assigned to each cluster
    selected_clusters: np.ndarray  # int64 clusters holding more than min_seeds seed images


def cluster_retrieval(
    clusters: PoolClusters,
    seed_embeddings: np.ndarray,
    config: ClusterRetrievalConfig = ClusterRetrievalConfig(),
    assign_batch: int = 65_536,
    use_gpu: GpuMode = "auto",
) -> ClusterRetrievalResult:
    """Seed images go to their nearest centroid; every cluster with more than `min_seeds` of them
    contributes its `per_cluster` pool images closest to the centroid. Over `max_total`, every
    selected cluster is cut to the same depth (its closest images kept), so the cap trims the largest
    contributions instead of dropping whole clusters."""
    num_clusters = len(clusters.centroids)
    seed_labels, _ = assign(seed_embeddings, clusters.centroids, assign_batch, use_gpu)
    seed_counts = np.bincount(seed_labels, minlength=num_clusters).astype(np.int64)
    selected = seed_counts > config.min_seeds
    candidates = np.flatnonzero(selected[clusters.labels])
    labels, distances = clusters.labels[candidates], clusters.distances[candidates]
    order = np.lexsort((distances, labels))
    rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order], side="left")
    order = order[rank < config.per_cluster]
    rank = rank[rank < config.per_cluster]
    if len(order) > config.max_total:
        shallowest = np.lexsort((distances[order], rank))[: config.max_total]
        order = order[np.sort(shallowest)]
    return ClusterRetrievalResult(
        pool_index=candidates[order],
        cluster=labels[order],
        distance=distances[order],
        seed_counts=seed_counts,
        selected_clusters=np.flatnonzero(selected),
    )
