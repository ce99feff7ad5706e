import numpy as np
import pytest

from curation.balance import KMeansConfig
from curation.retrieval import (
    IMAGENET1K_CORE_K,
    ClusterRetrievalConfig,
    PoolClusteringConfig,
    PoolClusters,
    SampleRetrievalConfig,
    cluster_pool,
    cluster_retrieval,
    sample_retrieval,
)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_sample_retrieval_counts_collisions_once_and_keeps_all_sources():
    rng = np.random.default_rng(0)
    pool = unit(rng.normal(size=(60, 64)))
    # Seeds 0 and 1 are both close to pool row 5 (seed 1 closer); seed 2 is close to pool row 9.
    seeds = unit(
        np.vstack([pool[5] + 0.3 * rng.normal(size=64), pool[5] + 0.1 * rng.normal(size=64), pool[9]])
    )
    result = sample_retrieval(pool, seeds, SampleRetrievalConfig(k=1))
    assert result.retrieved.pool_index.tolist() == [5, 9]
    assert result.retrieved.seed_index.tolist() == [1, 2]  # the most similar seed wins
    assert result.num_sources.tolist() == [2, 1]
    assert sorted(
        zip(result.sources.pool_index.tolist(), result.sources.seed_index.tolist(), strict=True)
    ) == [
        (5, 0),
        (5, 1),
        (9, 2),
    ]
    assert result.collision_rate == pytest.approx(1 / 3)
    np.testing.assert_allclose(result.retrieved.similarity[1], 1.0, atol=1e-5)


def test_sample_retrieval_k_neighbours_per_seed():
    rng = np.random.default_rng(1)
    pool, seeds = unit(rng.normal(size=(200, 16))), unit(rng.normal(size=(10, 16)))
    result = sample_retrieval(pool, seeds, SampleRetrievalConfig(k=4))
    assert len(result.sources.pool_index) == 40
    assert np.all(np.bincount(result.sources.seed_index) == 4)
    assert len(np.unique(result.retrieved.pool_index)) == len(result.retrieved.pool_index)
    assert result.num_sources.sum() == 40
    assert SampleRetrievalConfig().k == 4 and IMAGENET1K_CORE_K == 32


def toy_clusters():
    """Four clusters on a line; cluster c holds 10 rows at distances 0..9 from its centroid."""
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]], dtype=np.float32)
    labels = np.repeat(np.arange(4), 10)
    distances = np.tile(np.arange(10, dtype=np.float32)[::-1], 4)  # last row of each cluster is closest
    return PoolClusters(centroids, labels, distances)


def seeds_near(counts):
    return np.vstack([np.tile([[10.0 * c, 0.1]], (n, 1)) for c, n in enumerate(counts)]).astype(np.float32)


def test_cluster_retrieval_respects_seed_minimum_and_per_cluster_cap():
    clusters = toy_clusters()
    result = cluster_retrieval(
        clusters, seeds_near([5, 3, 4, 0]), ClusterRetrievalConfig(min_seeds=3, per_cluster=4)
    )
    assert result.seed_counts.tolist() == [5, 3, 4, 0]
    assert result.selected_clusters.tolist() == [0, 2]  # more than 3 seeds
    assert result.pool_index.tolist() == [9, 8, 7, 6, 29, 28, 27, 26]  # closest to the centroid first
    assert result.cluster.tolist() == [0] * 4 + [2] * 4
    assert np.all(np.diff(result.distance[:4]) > 0)


def test_cluster_retrieval_total_cap_trims_every_cluster_to_the_same_depth():
    clusters = toy_clusters()
    config = ClusterRetrievalConfig(min_seeds=0, per_cluster=10, max_total=9)
    result = cluster_retrieval(clusters, seeds_near([1, 1, 1, 0]), config)
    assert len(result.pool_index) == 9
    assert np.bincount(result.cluster, minlength=4).tolist() == [3, 3, 3, 0]
    assert result.pool_index[:3].tolist() == [9, 8, 7]


def test_cluster_pool_end_to_end():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 8)) * 5
    pool = (centres[np.repeat(np.arange(3), 100)] + rng.normal(size=(300, 8))).astype(np.float32)
    clusters = cluster_pool(pool, PoolClusteringConfig(num_clusters=3, kmeans=KMeansConfig(iterations=10)))
    assert clusters.centroids.shape == (3, 8) and clusters.labels.shape == (300,)
    seeds = (centres[[0, 0, 0, 0, 1]] + 0.1 * rng.normal(size=(5, 8))).astype(np.float32)
    result = cluster_retrieval(clusters, seeds, ClusterRetrievalConfig(min_seeds=3, per_cluster=50))
    assert len(result.pool_index) == 50
    assert np.all(result.pool_index < 100)  # all from the first blob


def test_config_validation():
    with pytest.raises(ValueError, match="k must be >= 1"):
        SampleRetrievalConfig(k=0)
    with pytest.raises(ValueError, match="per_cluster >= 1"):
        ClusterRetrievalConfig(per_cluster=0)
    with pytest.raises(ValueError, match="num_clusters"):
        PoolClusteringConfig(num_clusters=0)
    defaults = ClusterRetrievalConfig()
    assert (defaults.min_seeds, defaults.per_cluster, defaults.max_total) == (3, 10_000, 1_000_000)
