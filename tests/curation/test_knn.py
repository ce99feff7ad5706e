import numpy as np
import pytest

from curation.knn import (
    KnnConfig,
    build_index,
    default_nlist,
    drop_self,
    knn_search,
    measure_recall,
    resolve_index_kind,
    self_knn,
)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n=3000, dim=32, centres=30, spread=1.0, copies=300, seed=0):
    """Clustered vectors (similarity ~0.5 within a cluster) plus `copies` near-duplicates of random
    rows (similarity ~0.99)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, dim))
    x = centre[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, dim))
    originals = rng.choice(n, size=copies, replace=False)
    near = x[originals] + 0.1 * np.linalg.norm(x[originals], axis=1, keepdims=True) / np.sqrt(
        dim
    ) * rng.normal(size=(copies, dim))
    return unit(np.vstack([x, near]))


def test_knn_search_matches_brute_force():
    rng = np.random.default_rng(1)
    database, queries = unit(rng.normal(size=(300, 16))), unit(rng.normal(size=(25, 16)))
    sims, idx = knn_search(queries, database, 5, KnnConfig(query_batch=7))
    brute = queries @ database.T
    expected = np.argsort(-brute, axis=1)[:, :5]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(brute, expected, axis=1), atol=1e-5)
    assert sims.dtype == np.float32 and idx.dtype == np.int64


def test_self_knn_excludes_each_point_itself():
    rng = np.random.default_rng(2)
    x = unit(rng.normal(size=(50, 8)))
    x[10] = x[20]  # exact duplicates: ties may put the other one first
    sims, idx = self_knn(x, 4)
    assert idx.shape == (50, 4)
    assert not np.any(idx == np.arange(50)[:, None])
    assert idx[10, 0] == 20 and idx[20, 0] == 10
    np.testing.assert_allclose(sims[10, 0], 1.0, atol=1e-5)


def test_drop_self_when_self_is_missing_drops_the_last():
    sims = np.array([[1.0, 0.9, 0.8], [1.0, 1.0, 0.7]], dtype=np.float32)
    idx = np.array([[0, 5, 6], [2, 3, 4]])  # row 1 never sees itself
    kept_sims, kept_idx = drop_self(sims, idx)
    assert kept_idx.tolist() == [[5, 6], [2, 3]]
    np.testing.assert_allclose(kept_sims, [[0.9, 0.8], [1.0, 1.0]])


def test_self_knn_pads_when_k_exceeds_the_data():
    x = unit(np.random.default_rng(3).normal(size=(4, 8)))
    sims, idx = self_knn(x, 6)
    assert np.all(idx[:, :3] >= 0) and np.all(idx[:, 3:] == -1) and np.all(np.isneginf(sims[:, 3:]))


def test_auto_picks_exact_below_threshold_and_ivf_above():
    config = KnnConfig(exact_max=1000)
    assert resolve_index_kind(1000, config) == "flat"
    assert resolve_index_kind(1001, config) == "ivf"
    assert resolve_index_kind(10, KnnConfig(index="ivf")) == "ivf"
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(100) == 2  # at least 39 training points per list


def test_ivf_pair_recall_on_clustered_set():
    x = clustered()
    config = KnnConfig(index="ivf", nlist=40, nprobe=2)
    index = build_index(x, config)
    assert index.nlist == 40 and index.nprobe == 2
    report = measure_recall(x, config, sample_size=1000, threshold=0.8, k=16, index=index)
    assert report.index_kind == "ivf" and report.sample_size == 1000
    assert report.exact_pairs > 100  # mostly the planted copies
    assert report.recall >= 0.95


def test_exhaustive_ivf_recall_is_one():
    x = clustered(n=1000, copies=100, seed=4)
    report = measure_recall(
        x, KnnConfig(index="ivf", nlist=10, nprobe=10), sample_size=200, threshold=0.8, k=8
    )
    assert report.recall == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="'auto', 'flat' or 'ivf'"):
        KnnConfig(index="hnsw")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        KnnConfig(nprobe=0)
    with pytest.raises(ValueError, match="use_gpu"):
        KnnConfig(use_gpu="maybe")
    with pytest.raises(ValueError, match="exceeds"):
        build_index(unit(np.ones((5, 4))), KnnConfig(index="ivf", nlist=10))
    with pytest.raises(ValueError, match="2-D"):
        knn_search(np.ones(4, dtype=np.float32), np.ones((3, 4), dtype=np.float32), 1)
