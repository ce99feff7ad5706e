import numpy as np
import pytest

from curation.dedup import (
    DecontaminationConfig,
    DedupConfig,
    components_from_neighbours,
    copy_components,
    copy_neighbours,
    decontaminate,
    graph_edges,
    near_threshold_pairs,
)
from curation.knn import KnnConfig


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(num_singletons=200, group_sizes=(2, 3, 4, 2, 5), dim=128, noise=0.15, seed=0):
    """Random (near-orthogonal) images plus groups of noisy copies of a few of them. Returns the
    vectors and the true group of every row (singletons get their own)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(num_singletons + len(group_sizes), dim))
    rows, groups = [base[:num_singletons]], list(range(num_singletons))
    for offset, size in enumerate(group_sizes):
        group_id = num_singletons + offset
        rows.append(base[group_id] + noise * rng.normal(size=(size, dim)))
        groups += [group_id] * size
    return unit(np.vstack(rows)), np.array(groups)


def test_planted_groups_recovered_exactly():
    x, groups = planted()
    result = copy_components(x, DedupConfig(k=8))
    same_component = result.component[:, None] == result.component[None, :]
    np.testing.assert_array_equal(same_component, groups[:, None] == groups[None, :])
    assert result.num_components == len(np.unique(groups))
    assert result.keep.sum() == result.num_components
    assert np.all(result.keep[result.component])  # the id is the representative's row
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    assert sorted(np.unique(result.component_size[result.keep])) == sorted(np.unique(sizes))
    assert np.all(result.component_max_similarity[result.component_size == 1] == 0)
    assert np.all(result.component_max_similarity[result.component_size > 1] > 0.6)
    assert np.all(result.edges[:, 0] < result.edges[:, 1]) and np.all(result.edge_similarity > 0.6)


def test_components_are_transitive():
    # A~B and B~C above the threshold, A~C far below: one component of three.
    angle = np.arccos(0.75)
    chain = np.zeros((3, 16))
    chain[:, 0], chain[:, 1] = np.cos([0, angle, 2 * angle]), np.sin([0, angle, 2 * angle])
    others = np.random.default_rng(1).normal(size=(20, 16))
    x = unit(np.vstack([chain, others]))
    assert float(x[0] @ x[2]) < 0.2
    result = copy_components(x, DedupConfig(k=4))
    assert result.component[0] == result.component[1] == result.component[2]
    assert result.component_size[0] == 3 and result.keep[:3].sum() == 1


def test_representative_rule_is_deterministic_and_order_independent():
    x, _ = planted(seed=2)
    keys = np.array([f"sample-{i:04d}" for i in range(len(x))])
    quality = np.random.default_rng(3).integers(0, 3, size=len(x))  # many ties
    config = DedupConfig(k=8)
    kept = set(keys[copy_components(x, config, quality=quality, keys=keys).keep])
    permutation = np.random.default_rng(4).permutation(len(x))
    shuffled = copy_components(x[permutation], config, quality=quality[permutation], keys=keys[permutation])
    assert set(keys[permutation][shuffled.keep]) == kept
    # The rule itself: highest quality, then smallest key.
    result = copy_components(x, config, quality=quality, keys=keys)
    for component in np.unique(result.component):
        members = np.flatnonzero(result.component == component)
        best = members[quality[members] == quality[members].max()]
        assert keys[component] == min(keys[best])


def test_duplicate_keys_and_bad_quality_are_rejected():
    x, _ = planted(num_singletons=10)
    with pytest.raises(ValueError, match="unique"):
        copy_components(x, DedupConfig(k=4), keys=np.zeros(len(x)))
    with pytest.raises(ValueError, match="finite"):
        copy_components(x, DedupConfig(k=4), quality=np.full(len(x), np.nan))


def test_mirrored_descriptors_link_flipped_copies():
    rng = np.random.default_rng(5)
    x = unit(rng.normal(size=(30, 128)))
    mirrored = unit(rng.normal(size=(30, 128)))
    x[7] = unit(mirrored[3:4] + 0.1 * rng.normal(size=(1, 128)))[0]  # row 7 is a flipped copy of row 3
    config = DedupConfig(k=4)
    assert copy_components(x, config).component_size[3] == 1
    with_mirrors = copy_components(x, config, mirrored=mirrored)
    assert with_mirrors.component[3] == with_mirrors.component[7]
    assert with_mirrors.num_components == 29


def test_graph_edges_deduplicate_and_ignore_missing():
    sims = np.array([[0.9, 0.5], [0.9, -np.inf], [0.7, 0.65]], dtype=np.float32)
    idx = np.array([[1, 2], [0, -1], [0, 2]])
    edges, edge_sims = graph_edges(sims, idx, lower=0.6)
    assert edges.tolist() == [[0, 1], [0, 2]]
    np.testing.assert_allclose(edge_sims, [0.9, 0.7])


def test_near_threshold_pairs_cover_the_band():
    x, _ = planted(noise=0.8, seed=6)  # copy-to-copy similarity ~ 1 / (1 + 0.8²) = 0.61
    sims, idx = copy_neighbours(x, DedupConfig(k=8))
    near = near_threshold_pairs(sims, idx, threshold=0.6, band=0.1, max_pairs=1000)
    assert len(near.similarity) > 0
    assert np.all((near.similarity > 0.5) & (near.similarity <= 0.7))
    assert np.all(np.diff(near.similarity) <= 0)
    capped = near_threshold_pairs(sims, idx, threshold=0.6, band=0.1, max_pairs=2, bins=2)
    assert len(capped.similarity) <= 2
    result = components_from_neighbours(sims, idx, 0.6)
    above = {tuple(pair) for pair, s in zip(near.pairs.tolist(), near.similarity, strict=True) if s > 0.6}
    assert above <= {tuple(edge) for edge in result.edges.tolist()}


def test_decontamination_removes_whole_components():
    x, groups = planted(seed=7)
    dedup = copy_components(x, DedupConfig(k=8))
    group_rows = np.flatnonzero(groups == groups[-1])  # the last planted group, five copies
    rng = np.random.default_rng(8)
    eval_images = unit(
        np.vstack([rng.normal(size=(5, 128)), x[group_rows[0]] + 0.05 * rng.normal(size=(1, 128))])
    )
    result = decontaminate(x, dedup.component, eval_images)
    np.testing.assert_array_equal(np.flatnonzero(result.removed), group_rows)
    assert result.direct[group_rows].any() and result.direct.sum() <= len(group_rows)
    assert np.all(result.eval_index[group_rows] == 5)
    assert np.all(result.similarity[group_rows] > 0.45)
    assert np.all(result.similarity[~result.removed] <= 0.45)


def test_decontamination_sees_mirrored_eval_images():
    rng = np.random.default_rng(9)
    pool = unit(rng.normal(size=(40, 128)))
    eval_images, eval_mirrored = unit(rng.normal(size=(3, 128))), unit(rng.normal(size=(3, 128)))
    pool[10] = unit(eval_mirrored[2:3] + 0.05 * rng.normal(size=(1, 128)))[0]
    components = np.arange(40)
    assert not decontaminate(pool, components, eval_images).removed.any()
    result = decontaminate(pool, components, eval_images, eval_mirrored=eval_mirrored)
    assert np.flatnonzero(result.removed).tolist() == [10] and result.eval_index[10] == 2


def test_results_match_with_ivf_index():
    x, _ = planted(num_singletons=400, seed=10)
    exact = copy_components(x, DedupConfig(k=8))
    approx = copy_components(x, DedupConfig(k=8, knn=KnnConfig(index="ivf", nlist=8, nprobe=8)))
    np.testing.assert_array_equal(exact.component, approx.component)  # nprobe = nlist is exhaustive


def test_config_validation_says_the_valid_range():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DedupConfig(threshold=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValueError, match=">= 1"):
        DedupConfig(k=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DecontaminationConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="one id per pool row"):
        decontaminate(np.eye(3, dtype=np.float32), np.arange(2), np.eye(3, dtype=np.float32))
