"""Ground-truth metrics for a curation run (CURATION.md, "Ways to judge"): dedup pair precision and
recall, groups left with exactly one survivor, leak-removal recall, retrieval precision and concept
coverage, and how balanced the concepts of a selection are (normalised entropy, effective number).

Labels can be any array of hashable scalars (ints, strings); pair counts come from contingency tables,
never from enumerating pairs, so they stay linear in the number of items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _pairs_within(labels: np.ndarray) -> int:
    """Unordered pairs of items sharing a label."""
    counts = np.unique(labels, return_counts=True)[1].astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


@dataclass(frozen=True)
class PairScores:
    predicted_pairs: int  # pairs in the same predicted component
    true_pairs: int  # pairs in the same true duplicate group
    correct_pairs: int  # pairs in both

    @property
    def precision(self) -> float:
        """1.0 when nothing was merged: no wrong pair was made."""
        return self.correct_pairs / self.predicted_pairs if self.predicted_pairs else 1.0

    @property
    def recall(self) -> float:
        """1.0 when there are no true duplicates: none was missed."""
        return self.correct_pairs / self.true_pairs if self.true_pairs else 1.0


def pairwise_dedup_scores(predicted_components: np.ndarray, true_groups: np.ndarray) -> PairScores:
    """Pairwise precision / recall of a dedup: a pair is predicted when both items fall in the same
    component and true when both belong to the same planted group (unique labels for singletons)."""
    predicted, truth = np.asarray(predicted_components), np.asarray(true_groups)
    if predicted.shape != truth.shape or predicted.ndim != 1:
        raise ValueError(
            f"need two 1-D label arrays of equal length, got {predicted.shape} and {truth.shape}"
        )
    predicted_ids = np.unique(predicted, return_inverse=True)[1].astype(np.int64)
    true_ids = np.unique(truth, return_inverse=True)[1].astype(np.int64)
    joint = predicted_ids * (int(true_ids.max(initial=0)) + 1) + true_ids
    return PairScores(_pairs_within(predicted_ids), _pairs_within(true_ids), _pairs_within(joint))


def single_survivor_share(true_groups: np.ndarray, keep: np.ndarray) -> float:
    """Share of true duplicate groups (two members or more) with exactly one member kept: zero kept
    is over-deletion, two or more is a missed duplicate. NaN without any such group."""
    labels = np.unique(np.asarray(true_groups), return_inverse=True)[1].astype(np.int64)
    counts = np.bincount(labels)
    kept = np.bincount(labels, weights=np.asarray(keep, dtype=np.float64), minlength=len(counts))
    groups = counts >= 2
    return float(np.mean(kept[groups] == 1)) if groups.any() else math.nan


def leak_removal_recall(removed: np.ndarray, is_leak: np.ndarray) -> float:
    """Share of planted near-copies of evaluation images that decontamination removed (NaN if none)."""
    removed, is_leak = np.asarray(removed, dtype=bool), np.asarray(is_leak, dtype=bool)
    return float(removed[is_leak].mean()) if is_leak.any() else math.nan


def retrieval_precision(retrieved_concepts: np.ndarray, seed_concepts: np.ndarray) -> float:
    """Share of retrieved items whose concept is one of the seed set's concepts (NaN if none retrieved)."""
    retrieved = np.asarray(retrieved_concepts)
    return float(np.isin(retrieved, np.asarray(seed_concepts)).mean()) if len(retrieved) else math.nan


def concept_coverage(retrieved_concepts: np.ndarray, seed_concepts: np.ndarray) -> float:
    """Share of the seed set's distinct concepts with at least one retrieved item."""
    seeds = np.unique(np.asarray(seed_concepts))
    return float(np.isin(seeds, np.asarray(retrieved_concepts)).mean()) if len(seeds) else math.nan


def _concept_entropy(concepts: np.ndarray) -> float:
    """Shannon entropy (nats) of the concept shares."""
    if len(concepts) == 0:
        raise ValueError("cannot measure the concept balance of an empty selection")
    counts = np.unique(np.asarray(concepts), return_counts=True)[1]
    shares = counts / counts.sum()
    return float(-(shares * np.log(shares)).sum())


def normalised_entropy(concepts: np.ndarray, num_concepts: int | None = None) -> float:
    """Entropy of the concept shares divided by log(num_concepts): 1 for perfectly even shares.
    Pass the pool's concept count to compare selections that miss some concepts; by default it is
    the number of distinct concepts present."""
    concepts = np.asarray(concepts)
    entropy = _concept_entropy(concepts)
    present = len(np.unique(concepts))
    num_concepts = present if num_concepts is None else num_concepts
    if num_concepts < present:
        raise ValueError(f"num_concepts={num_concepts} is below the {present} concepts present")
    return entropy / math.log(num_concepts) if num_concepts > 1 else 1.0


def effective_number_of_concepts(concepts: np.ndarray) -> float:
    """exp(entropy): how many equally common concepts would give the same entropy."""
    return math.exp(_concept_entropy(concepts))
