import math

import numpy as np
import pytest

from curation.quality import (
    concept_coverage,
    effective_number_of_concepts,
    leak_removal_recall,
    normalised_entropy,
    pairwise_dedup_scores,
    retrieval_precision,
    single_survivor_share,
)


def test_pairwise_dedup_scores_by_hand():
    # True groups {0,1,2} {3,4} {5}; predicted {0,1} {2,3,4} {5}.
    truth = np.array(["a", "a", "a", "b", "b", "c"])
    predicted = np.array([7, 7, 9, 9, 9, 4])
    scores = pairwise_dedup_scores(predicted, truth)
    # Predicted pairs: 1 + 3 = 4; true pairs: 3 + 1 = 4; correct: (0,1) and (3,4) = 2.
    assert (scores.predicted_pairs, scores.true_pairs, scores.correct_pairs) == (4, 4, 2)
    assert scores.precision == 0.5 and scores.recall == 0.5


def test_pairwise_dedup_scores_against_brute_force():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 15, 60), rng.integers(0, 20, 60)
    i, j = np.triu_indices(60, 1)
    same_true, same_pred = truth[i] == truth[j], predicted[i] == predicted[j]
    scores = pairwise_dedup_scores(predicted, truth)
    assert scores.correct_pairs == int((same_true & same_pred).sum())
    assert scores.precision == pytest.approx((same_true & same_pred).sum() / same_pred.sum())
    assert scores.recall == pytest.approx((same_true & same_pred).sum() / same_true.sum())


def test_pairwise_scores_without_pairs_are_perfect():
    scores = pairwise_dedup_scores(np.arange(4), np.arange(4))
    assert scores.precision == 1.0 and scores.recall == 1.0
    with pytest.raises(ValueError, match="equal length"):
        pairwise_dedup_scores(np.arange(3), np.arange(4))


def test_single_survivor_share_by_hand():
    groups = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    keep = np.array([1, 0, 1, 1, 0, 0, 0, 1], dtype=bool)
    # Group 0: one kept; group 1: two kept; group 2: none; group 3 is a singleton, ignored.
    assert single_survivor_share(groups, keep) == pytest.approx(1 / 3)
    assert math.isnan(single_survivor_share(np.arange(3), np.ones(3, dtype=bool)))


def test_leak_removal_recall_by_hand():
    removed = np.array([True, False, True, True])
    is_leak = np.array([True, True, False, True])
    assert leak_removal_recall(removed, is_leak) == pytest.approx(2 / 3)
    assert math.isnan(leak_removal_recall(removed, np.zeros(4, dtype=bool)))


def test_retrieval_precision_and_coverage_by_hand():
    retrieved = np.array(["dog", "cat", "car", "dog"])
    seeds = np.array(["dog", "cat", "bird"])
    assert retrieval_precision(retrieved, seeds) == 0.75
    assert concept_coverage(retrieved, seeds) == pytest.approx(2 / 3)


def test_normalised_entropy_and_effective_number_by_hand():
    even = np.repeat(np.arange(4), 5)
    assert normalised_entropy(even) == pytest.approx(1.0)
    assert effective_number_of_concepts(even) == pytest.approx(4.0)
    skewed = np.array([0, 0, 0, 1])  # shares 3/4, 1/4
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert normalised_entropy(skewed) == pytest.approx(entropy / math.log(2))
    assert normalised_entropy(skewed, num_concepts=4) == pytest.approx(entropy / math.log(4))
    assert effective_number_of_concepts(skewed) == pytest.approx(math.exp(entropy))
    assert normalised_entropy(np.zeros(3)) == 1.0
    with pytest.raises(ValueError, match="below"):
        normalised_entropy(skewed, num_concepts=1)
    with pytest.raises(ValueError, match="empty"):
        normalised_entropy(np.array([]))
