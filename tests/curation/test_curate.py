"""Curation stages: pure table cores, then the whole chain on the demo web against its ground truth."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation.curate import (
    CurationConfig,
    CurationError,
    curated_table,
    dedup_table,
    load_images,
    retrieval_table,
)
from curation.schemas import CLUSTERS_SCHEMA, CURATED_SCHEMA, DEDUP_SCHEMA, RETRIEVAL_SCHEMA
from curation.seeds import SeedSet


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def planted():
    """Ten random directions; rows 0-2 are copies of one image, 3-4 of another, 5-9 are distinct."""
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(7, 64)))
    x = _unit(np.vstack([base[0] + 0.05 * rng.normal(size=(3, 64)), base[1] + 0.05 * rng.normal(size=(2, 64)), base[2:]]))
    return np.array([f"k{i}" for i in range(10)], dtype=object), x


def test_dedup_keeps_one_per_component_and_drops_leaky_components_whole(planted):
    keys, x = planted
    quality = np.arange(10, dtype=float)  # the largest image of a component is its representative
    leak_probe = x[3:4] + 0.01  # an evaluation image that is a near-copy of row 3
    table = dedup_table(keys, x, None, quality, _unit(leak_probe), ["eval/a.jpg"], CurationConfig(dedup_threshold=0.8, decontamination_threshold=0.8))
    assert table.schema == DEDUP_SCHEMA
    rows = {r["key"]: r for r in table.to_pylist()}
    assert {rows[k]["component"] for k in ("k0", "k1", "k2")} == {"k2"}
    assert [k for k, r in rows.items() if r["is_representative"]] == ["k2", "k4", "k5", "k6", "k7", "k8", "k9"]
    assert rows["k3"]["leak"] and rows["k4"]["leak"] and not rows["k4"]["keep"]  # whole component removed
    assert rows["k3"]["leak_eval_image"] == "eval/a.jpg" and rows["k3"]["leak_similarity"] > 0.8
    assert sum(r["keep"] for r in rows.values()) == 6


def test_sample_retrieval_tracks_collisions_and_caps(planted):
    keys, x = planted
    seed_set = SeedSet("s", None, "sample", k=3, cap=2)
    table = retrieval_table(keys, x, seed_set, ["a.jpg", "b.jpg"], x[[0, 1]], 0)
    assert table.schema == RETRIEVAL_SCHEMA
    assert set(table.column("key").to_pylist()) <= {"k0", "k1", "k2"}
    assert len(set(table.column("key").to_pylist())) == 2  # the cap keeps the two closest images
    assert table.num_rows > 2  # both seeds' sources of an image stay queryable


def test_cluster_retrieval_rows(planted):
    keys, x = planted
    table = retrieval_table(keys, x, SeedSet("s", None, "cluster", cluster_min_seeds=0), [], x[:3], 0)
    assert table.num_rows >= 1 and set(table.column("mode").to_pylist()) == {"cluster"}


def test_curated_prefers_retrieval_over_balance_and_appends_seeds():
    pool = pa.table({"key": ["a", "b", "c"], "url": ["u/a", "u/b", "u/c"], "shard": ["s.tar"] * 3,
                     "offset": [0, 10, 20], "nbytes": [5, 5, 5]})  # fmt: skip
    dedup = pa.table({"key": ["a", "b", "c"], "component": ["a", "b", "c"]})
    retrieval = pa.table({"key": ["a", "a"], "seed_set": ["s", "s"], "mode": ["sample"] * 2, "seed_key": ["x", "y"],
                          "similarity": pa.array([0.5, 0.9], pa.float32())})  # fmt: skip
    clusters = pa.table({"key": ["a", "b", "c"], "cluster": pa.array([[0, 0], [1, 0], [2, 1]], pa.list_(pa.int32()))})
    seed_row = {"key": "seed:s:x", "url": None, "shard": "images/seeds-s.tar", "offset": 0, "nbytes": 3, "source": "seed",
                "seed_set": "s", "seed_key": "x", "similarity": None, "component": None, "cluster": None}  # fmt: skip
    table = curated_table(pool, dedup, retrieval, clusters, ["a", "c"], [seed_row])
    assert table.schema == CURATED_SCHEMA
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["a"]["source"] == "retrieval" and rows["a"]["seed_key"] == "y"  # its most similar seed
    assert rows["c"]["source"] == "balance" and rows["c"]["cluster"] == [2, 1]
    assert "b" not in rows and rows["seed:s:x"]["source"] == "seed"


@pytest.mark.parametrize("bad", [dict(dedup_threshold=0.0), dict(dedup_threshold=1.5), dict(decontamination_threshold=-1)])
def test_threshold_out_of_range_names_the_flag(bad):
    with pytest.raises(CurationError, match=r"threshold is a cosine similarity in \(0, 1\]"):
        CurationConfig(**bad).thresholds()


def test_default_levels_follow_the_pool_size():
    assert CurationConfig().levels(30_000) == (1000, 300)
    assert CurationConfig(clusters_per_level=(8, 2)).levels(30_000) == (8, 2)


def test_unreadable_seed_images_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(CurationError, match="x.jpg cannot be read as an image"):
        load_images([tmp_path / "a" / "x.jpg"], "seed set 'mine'")
    with pytest.raises(CurationError, match="no readable image"):
        load_images([], "seed set 'mine'")


def test_clusters_schema_is_what_the_balance_stage_writes():
    assert CLUSTERS_SCHEMA.names == ["key", "cluster", "balanced"]


def test_balancing_evens_out_long_tailed_concepts():
    """With embeddings that carry the concept (as a good semantic embedder's do), the balanced
    sample is more even over concepts than a uniform random sample of the same size."""
    from curation.curate import balance_selection
    from curation.quality import normalised_entropy

    rng = np.random.default_rng(0)
    counts = [600, 300, 150, 80, 40, 20, 10]
    concepts = np.repeat(np.arange(len(counts)), counts)
    centres = _unit(rng.normal(size=(len(counts), 32)))
    x = _unit(centres[concepts] + 0.05 * rng.normal(size=(len(concepts), 32)))
    assignments, selected = balance_selection(x, CurationConfig(clusters_per_level=(40, 10), balanced_share=0.1))
    assert assignments.shape == (len(x), 2) and len(selected) == round(0.1 * len(x))
    random = rng.choice(len(x), len(selected), replace=False)
    balanced_entropy = normalised_entropy(concepts[selected], len(counts))
    random_entropy = normalised_entropy(concepts[random], len(counts))
    assert balanced_entropy > random_entropy + 0.1, (balanced_entropy, random_entropy)
