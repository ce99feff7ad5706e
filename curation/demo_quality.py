"""Quality of a curation run on the demo web, against the ground truth the generator planted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from curation import quality
from curation.ingest import read_pool

OFF_TOPIC = "(off-topic)"


def demo_quality(run_dir: Path, ground_truth: Path, seeded_concepts: set[str], seed: int = 0) -> dict[str, float]:
    """Dedup pair precision/recall, leak-removal recall, retrieval precision, and normalised concept
    entropy of the balanced sample against a uniform random sample of the same size."""
    truth = {r["url"]: r for r in pq.read_table(ground_truth).to_pylist()}
    url_of = dict(zip(*(read_pool(run_dir).column(c).to_pylist() for c in ("key", "url"))))
    manifests = Path(run_dir) / "manifests"
    dedup = pq.read_table(manifests / "dedup.parquet").to_pylist()
    rows = [truth[url_of[r["key"]]] for r in dedup]
    groups = np.array([t["dup_group"] for t in rows])
    _, components = np.unique([r["component"] for r in dedup], return_inverse=True)
    scores = quality.pairwise_dedup_scores(components, groups)
    is_leak = np.array([t["kind"] == "eval_leak" for t in rows])
    removed = np.array([r["leak"] for r in dedup])
    figures = {
        "dedup_precision": scores.precision,
        "dedup_recall": scores.recall,
        "single_survivor_share": quality.single_survivor_share(groups, np.array([r["is_representative"] for r in dedup])),
        "leak_removal_recall": quality.leak_removal_recall(removed, is_leak),
    }
    retrieved = sorted(set(pq.read_table(manifests / "retrieval.parquet", columns=["key"]).column("key").to_pylist()))
    concepts = np.array([truth[url_of[k]]["concept"] or OFF_TOPIC for k in retrieved], dtype=object)
    figures["retrieval_precision"] = quality.retrieval_precision(concepts, np.array(sorted(seeded_concepts), dtype=object))
    clusters = pq.read_table(manifests / "clusters.parquet", columns=["key", "balanced"]).to_pylist()
    concept_of = {r["key"]: truth[url_of[r["key"]]]["concept"] or OFF_TOPIC for r in clusters}
    balanced = np.array([concept_of[r["key"]] for r in clusters if r["balanced"]], dtype=object)
    pool_concepts = np.array(list(concept_of.values()), dtype=object)
    random = np.random.default_rng(seed).choice(pool_concepts, size=len(balanced), replace=False)
    num_concepts = len(set(pool_concepts))
    figures["entropy_balanced"] = quality.normalised_entropy(balanced, num_concepts)
    figures["entropy_random_sample"] = quality.normalised_entropy(random, num_concepts)
    figures["entropy_deduplicated_pool"] = quality.normalised_entropy(pool_concepts, num_concepts)
    return figures


def format_quality(figures: dict[str, float]) -> str:
    width = max(map(len, figures))
    return "\n".join(f"  {name:<{width}}  {value:.3f}" for name, value in figures.items())
