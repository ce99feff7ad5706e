import numpy as np
import pytest

from curation.balance import (
    HierarchicalKMeansConfig,
    KMeansConfig,
    assign,
    balanced_sample,
    closest_per_cluster,
    hierarchical_kmeans,
    kmeans,
    water_fill,
)
from curation.quality import normalised_entropy

# CURATION.md's toy: five groups of very uneven size.
GROUP_SIZES = (6000, 1500, 400, 150, 50)
FAST_KMEANS = KMeansConfig(iterations=10, seed=0)


def blobs(sizes, dim=8, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    group = np.repeat(np.arange(len(sizes)), sizes)
    return (centres[group] + spread * rng.normal(size=(len(group), dim))).astype(np.float32), group


def greedy_water_fill(sizes, quota):
    """Oracle: hand out one unit at a time to the member with the least so far that has room."""
    allocation = np.zeros(len(sizes), dtype=np.int64)
    for _ in range(quota):
        open_members = np.flatnonzero(allocation < sizes)
        allocation[open_members[np.argmin(allocation[open_members])]] += 1
    return allocation


def test_water_fill_matches_greedy_oracle():
    rng = np.random.default_rng(0)
    for _ in range(300):
        num_groups = int(rng.integers(1, 4))
        group = rng.integers(0, num_groups, size=int(rng.integers(1, 10)))
        sizes = rng.integers(0, 15, size=len(group))
        totals = np.bincount(group, weights=sizes, minlength=num_groups).astype(np.int64)
        quota = np.array([rng.integers(0, total + 1) for total in totals])
        allocation = water_fill(group, sizes, quota, rng)
        for g in range(num_groups):
            members = group == g
            assert allocation[members].sum() == quota[g]
            assert np.all(allocation[members] <= sizes[members])
            assert sorted(allocation[members]) == sorted(greedy_water_fill(sizes[members], quota[g]))


def test_water_fill_pinned_example():
    # 10 over sizes 1, 2, 8, 8: the small ones give all (3), the rest 7 splits 4 + 3 at random.
    allocation = water_fill(
        np.zeros(4, dtype=np.int64), np.array([8, 1, 8, 2]), np.array([10]), np.random.default_rng(1)
    )
    assert allocation[1] == 1 and allocation[3] == 2
    assert sorted(allocation[[0, 2]]) == [3, 4]


def test_kmeans_fits_on_sample_and_assigns_everything():
    x, group = blobs((300, 300, 300), seed=1)
    config = KMeansConfig(iterations=10, max_points_per_centroid=40)  # fits on 120 of 900 points
    centroids, labels, distances = kmeans(x, 3, config)
    assert centroids.shape == (3, 8) and labels.shape == (900,) and distances.shape == (900,)
    # Every blob lands in one cluster.
    assert all(len(np.unique(labels[group == g])) == 1 for g in range(3))
    again, _ = assign(x, centroids, batch=7)
    np.testing.assert_array_equal(again, labels)


def test_closest_per_cluster_takes_nearest_members():
    labels = np.array([0, 0, 0, 1, 1, 2])
    distances = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 9.0])
    assert closest_per_cluster(labels, distances, 2).tolist() == [1, 2, 4, 3, 5]


def test_hierarchical_kmeans_shapes_and_consistent_tree():
    x, _ = blobs((400, 300, 200, 100), seed=2)
    config = HierarchicalKMeansConfig(clusters_per_level=(40, 8, 2), resampling_steps=2, kmeans=FAST_KMEANS)
    hierarchy = hierarchical_kmeans(x, config)
    assert hierarchy.assignments.shape == (1000, 3)
    assert [c.shape for c in hierarchy.centroids] == [(40, 8), (8, 8), (2, 8)]
    for level, clusters in enumerate(config.clusters_per_level):
        assert hierarchy.assignments[:, level].max() < clusters
    # A tree: each cluster has exactly one parent.
    for level in range(2):
        child, parent = hierarchy.assignments[:, level], hierarchy.assignments[:, level + 1]
        pairs = np.unique(np.stack([child, parent], axis=1), axis=0)
        assert len(pairs) == len(np.unique(child))


def test_balanced_sampling_flattens_uneven_groups():
    x, group = blobs(GROUP_SIZES, seed=3)
    config = HierarchicalKMeansConfig(clusters_per_level=(50, 5), resampling_steps=3, kmeans=FAST_KMEANS)
    assignments = hierarchical_kmeans(x, config).assignments
    target = 1000
    random_pick = np.random.default_rng(0).choice(len(x), size=target, replace=False)
    picked = balanced_sample(assignments, target, seed=0)
    assert len(picked) == target and len(np.unique(picked)) == target
    flat_quotas = balanced_sample(assignments[:, :1], target, seed=0)  # equal quotas over level-1 clusters
    before = normalised_entropy(group[random_pick], num_concepts=5)
    flat = normalised_entropy(group[flat_quotas], num_concepts=5)
    after = normalised_entropy(group[picked], num_concepts=5)
    assert 0.4 < before < 0.6
    assert after > 0.9
    assert flat < after


def test_balanced_sample_is_deterministic_and_handles_small_pools():
    assignments = np.stack([np.arange(20) % 6, np.arange(20) % 2], axis=1)
    np.testing.assert_array_equal(
        balanced_sample(assignments, 7, seed=4), balanced_sample(assignments, 7, seed=4)
    )
    np.testing.assert_array_equal(balanced_sample(assignments, 50), np.arange(20))
    assert len(balanced_sample(assignments[:, 0], 5)) == 5  # a single level may come as 1-D


def test_config_validation():
    with pytest.raises(ValueError, match="strictly decreasing"):
        HierarchicalKMeansConfig(clusters_per_level=(10, 10))
    with pytest.raises(ValueError, match="resample_fraction"):
        HierarchicalKMeansConfig(resample_fraction=0.0)
    with pytest.raises(ValueError, match="init"):
        KMeansConfig(init="kmeans||")
    with pytest.raises(ValueError, match="only 5 points"):
        hierarchical_kmeans(
            np.zeros((5, 2), dtype=np.float32), HierarchicalKMeansConfig(clusters_per_level=(6,))
        )
