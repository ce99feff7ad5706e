"""Clustering-based balancing (Vo et al. 2024, used for DINOv3's LVD-1689M).

Web pools are long-tailed: a few concepts (products, memes, screenshots) dominate. Plain k-means puts
its centroids where the points are dense, so equal quotas per cluster still favour the head. The fix
is hierarchical k-means with resampling, built bottom-up, then balanced sampling top-down:

- level 1 clusters the points, level t clusters the centroids of level t-1;
- at each level, after k-means (k-means++ init), R resampling steps flatten the centroid density: the
  r points closest to each centroid (within its cluster) form a resampled set in which every cluster
  weighs the same, the centroids are recomputed by k-means on that set (started from the current
  centroids), and everything is reassigned;
- balanced sampling water-fills the target over the top-level clusters, recursively down to the
  leaves, and draws at random inside leaves.

K-means is fitted on a sample of at most `max_points_per_centroid` points per centroid and the full
data is assigned in batches, so memory stays bounded by the sample plus the output labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Literal

import faiss
import numpy as np

from curation.knn import GpuMode, as_float32, gpu_enabled, to_device

_INIT_METHODS = {
    "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    "random": faiss.ClusteringInitMethod_RANDOM,
}


@dataclass(frozen=True)
class KMeansConfig:
    """One flat k-means (Euclidean), fitted on a sample and applied to all points in batches."""

    iterations: int = 50
    init: Literal["kmeans++", "random"] = "kmeans++"
    max_points_per_centroid: int = 256  # fitting sample = clusters × this (FAISS's own default cap)
    assign_batch: int = 65_536
    use_gpu: GpuMode = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in _INIT_METHODS:
            raise ValueError(f"KMeansConfig.init must be one of {sorted(_INIT_METHODS)}, got {self.init!r}")
        for name in ("iterations", "max_points_per_centroid", "assign_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"KMeansConfig.{name} must be >= 1, got {getattr(self, name)}")


def take_sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """At most `size` random rows of x, in row order (memory-mapped inputs are read forward); x itself,
    not a copy, when it is small enough."""
    if size >= len(x):
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))]


def fit_kmeans(
    x: np.ndarray,
    num_clusters: int,
    config: KMeansConfig = KMeansConfig(),
    init_centroids: np.ndarray | None = None,
) -> np.ndarray:
    """Centroids (num_clusters, d) of k-means on x (all of it: sample beforehand for large data).
    Starting from `init_centroids` skips the k-means++ / random seeding."""
    x = as_float32(x)
    if not 1 <= num_clusters <= len(x):
        raise ValueError(f"cannot make {num_clusters} clusters from {len(x)} points")
    clustering = faiss.Kmeans(
        x.shape[1],
        num_clusters,
        niter=config.iterations,
        seed=config.seed,
        init_method=_INIT_METHODS[config.init],
        # Fit on every row given (the caller chose the sample), without FAISS's size warnings.
        min_points_per_centroid=1,
        max_points_per_centroid=-(-len(x) // num_clusters),
        gpu=gpu_enabled(config.use_gpu),
    )
    clustering.train(x, init_centroids=None if init_centroids is None else as_float32(init_centroids))
    return clustering.centroids


def assign(
    x: np.ndarray, centroids: np.ndarray, batch: int = 65_536, use_gpu: GpuMode = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of x, streamed in batches: (labels int64, squared distances)."""
    index = to_device(faiss.IndexFlatL2(centroids.shape[1]), use_gpu)
    index.add(as_float32(centroids))
    labels = np.empty(len(x), dtype=np.int64)
    distances = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), batch):
        dist, lab = index.search(as_float32(x[start : start + batch]), 1)
        labels[start : start + batch], distances[start : start + batch] = lab[:, 0], dist[:, 0]
    return labels, distances


def kmeans(
    x: np.ndarray, num_clusters: int, config: KMeansConfig = KMeansConfig()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit on a sample of at most num_clusters × max_points_per_centroid rows, assign every row:
    (centroids, labels, squared distances)."""
    sample = take_sample(x, num_clusters * config.max_points_per_centroid, config.seed)
    centroids = fit_kmeans(sample, num_clusters, config)
    labels, distances = assign(x, centroids, config.assign_batch, config.use_gpu)
    return centroids, labels, distances


def closest_per_cluster(labels: np.ndarray, distances: np.ndarray, per_cluster: int) -> np.ndarray:
    """Row indices of the `per_cluster` rows closest to their own centroid in every cluster (all rows
    of smaller clusters), ordered by cluster then distance."""
    order = np.lexsort((distances, labels))
    sorted_labels = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return order[rank < per_cluster]


@dataclass(frozen=True)
class HierarchicalKMeansConfig:
    """Clusters per level, finest first. CURATION.md shapes: 1000 / 300 for ~30k images (the
    default), 60k / 1.2k / 120 for ~5M, 10M / 500k / 50k / 10k for 744M; 10-20x between levels."""

    clusters_per_level: tuple[int, ...] = (1000, 300)
    resampling_steps: int = 10
    resample_fraction: float = 0.5  # r = this × mean cluster size of the level
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)

    def __post_init__(self) -> None:
        levels = tuple(self.clusters_per_level)
        if not levels or min(levels) < 1 or any(b >= a for a, b in pairwise(levels)):
            raise ValueError(
                f"HierarchicalKMeansConfig.clusters_per_level must be positive and strictly decreasing "
                f"(finest level first), got {levels}"
            )
        if self.resampling_steps < 0:
            raise ValueError(
                f"HierarchicalKMeansConfig.resampling_steps must be >= 0, got {self.resampling_steps}"
            )
        if not 0.0 < self.resample_fraction <= 1.0:
            raise ValueError(
                f"HierarchicalKMeansConfig.resample_fraction must be in (0, 1], got {self.resample_fraction}"
            )


@dataclass(frozen=True)
class Hierarchy:
    """Result of hierarchical k-means."""

    assignments: np.ndarray  # (n, levels) int64: cluster of every point at every level, finest first
    centroids: list[np.ndarray]  # per level, (clusters, d)


def resampled_kmeans(
    x: np.ndarray, num_clusters: int, config: HierarchicalKMeansConfig, seed: int
) -> np.ndarray:
    """Centroids of one level: k-means, then `resampling_steps` rounds of (r closest points per
    cluster -> k-means on them from the current centroids -> reassign)."""
    kmeans_config = replace(config.kmeans, seed=seed)
    centroids = fit_kmeans(x, num_clusters, kmeans_config)
    per_cluster = max(1, round(config.resample_fraction * len(x) / num_clusters))
    for _ in range(config.resampling_steps):
        labels, distances = assign(x, centroids, kmeans_config.assign_batch, kmeans_config.use_gpu)
        resampled = x[closest_per_cluster(labels, distances, per_cluster)]
        if len(resampled) < num_clusters:  # too few non-empty clusters left to refit
            break
        centroids = fit_kmeans(resampled, num_clusters, kmeans_config, init_centroids=centroids)
    return centroids


def hierarchical_kmeans(
    x: np.ndarray, config: HierarchicalKMeansConfig = HierarchicalKMeansConfig()
) -> Hierarchy:
    """Bottom-up hierarchical k-means with resampling; level 1 is fitted on a sample of the points and
    every point is then assigned in batches."""
    levels = config.clusters_per_level
    if levels[0] > len(x):
        raise ValueError(f"the finest level asks for {levels[0]} clusters but there are only {len(x)} points")
    sample = take_sample(x, levels[0] * config.kmeans.max_points_per_centroid, config.kmeans.seed)
    centroids = [resampled_kmeans(sample, levels[0], config, config.kmeans.seed)]
    point_labels, _ = assign(x, centroids[0], config.kmeans.assign_batch, config.kmeans.use_gpu)
    columns = [point_labels]
    for level, num_clusters in enumerate(levels[1:], start=1):
        centroids.append(resampled_kmeans(centroids[-1], num_clusters, config, config.kmeans.seed + level))
        parent, _ = assign(centroids[-2], centroids[-1], config.kmeans.assign_batch, config.kmeans.use_gpu)
        columns.append(parent[columns[-1]])
    return Hierarchy(assignments=np.stack(columns, axis=1), centroids=centroids)


def water_fill(
    group: np.ndarray, sizes: np.ndarray, quota: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Split each group's quota over its members as evenly as their sizes allow (vectorised over groups).

    Within a group, members sorted by size take everything they have while that is no more than an even
    share of what is left; the others split the rest equally, the indivisible remainder going one each
    to randomly chosen ones. `quota[g]` must not exceed the total size of group g (a group label).
    Returns the allocation of every member."""
    m = len(group)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((rng.random(m), sizes, group))
    g, s = group[order], sizes[order].astype(np.int64)
    position = np.arange(m)
    segment_start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    segment = np.cumsum(np.r_[True, g[1:] != g[:-1]]) - 1
    start = segment_start[segment]
    end = np.r_[segment_start[1:], m][segment]
    cumulative = np.r_[0, np.cumsum(s)]
    before = cumulative[position] - cumulative[start]
    takes_all = s * (end - position) <= quota[g] - before
    # Members that take all form a prefix of their group (a standard water-filling property), so the
    # first one that does not fixes the level shared by the rest.
    first_shared = np.minimum.reduceat(np.where(takes_all, end, position), segment_start)[segment]
    num_shared = np.maximum(end - first_shared, 1)
    left = quota[g] - (cumulative[first_shared] - cumulative[start])
    shared = position >= first_shared
    # Random order among the sharing members decides who gets the remainder.
    by_chance = np.lexsort((rng.random(m), ~shared, segment))
    chance_rank = np.empty(m, dtype=np.int64)
    chance_rank[by_chance] = position - start[by_chance]
    allocation = np.where(shared, left // num_shared + (chance_rank < left % num_shared), s)
    result = np.empty(m, dtype=np.int64)
    result[order] = allocation
    return result


def _node_ids(assignments: np.ndarray) -> list[np.ndarray]:
    """Per level (finest first), a dense id of every point's node, keyed by its whole path from the
    top so that inconsistent label reuse across parents cannot merge nodes."""
    num_levels = assignments.shape[1]
    ids = [np.unique(assignments[:, -1], return_inverse=True)[1].astype(np.int64)]
    for level in range(num_levels - 2, -1, -1):
        path = ids[-1] * (int(assignments[:, level].max()) + 1) + assignments[:, level]
        ids.append(np.unique(path, return_inverse=True)[1].astype(np.int64))
    return ids[::-1]


def balanced_sample(assignments: np.ndarray, target_size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a balanced sample: the target is water-filled over the top-level clusters,
    each cluster's share over its sub-clusters, down to the finest clusters, and inside those the
    points are drawn at random. Each point at most once; exactly target_size points, or every point
    when the pool is smaller. `assignments` is (n, levels), finest level first (`Hierarchy.assignments`)."""
    assignments = np.asarray(assignments, dtype=np.int64)
    if assignments.ndim == 1:
        assignments = assignments[:, None]
    if target_size < 0 or (assignments.size and assignments.min() < 0):
        raise ValueError("target_size and cluster labels must be non-negative")
    n = len(assignments)
    if target_size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    quota = np.array([target_size], dtype=np.int64)
    parent_of_point = np.zeros(n, dtype=np.int64)  # the root
    for node_of_point in _node_ids(assignments)[::-1]:
        num_nodes = int(node_of_point.max()) + 1
        first_member = np.unique(node_of_point, return_index=True)[1]
        sizes = np.bincount(node_of_point, minlength=num_nodes)
        quota = water_fill(parent_of_point[first_member], sizes, quota, rng)
        parent_of_point = node_of_point
    picked = water_fill(parent_of_point, np.ones(n, dtype=np.int64), quota, rng)
    return np.flatnonzero(picked)
