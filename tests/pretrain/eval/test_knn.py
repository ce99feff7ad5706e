"""Weighted k-NN: votes against hand-computed values, the accuracy where the answer is known, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pretrain.eval import knn
from pretrain.eval.knn import knn_accuracy, knn_scores


def unit(angle: float) -> list[float]:
    """A unit vector in the plane at ``angle`` from the first axis: its cosine with [1, 0] is cos(angle)."""
    return [math.cos(angle), math.sin(angle)]


def test_votes_are_weighted_by_exp_similarity_over_temperature() -> None:
    # Two class-0 vectors far from the query and one class-1 vector close to it: the majority of the
    # 3 neighbours is class 0, but the weighted vote is class 1; the nearest alone is class 1 too.
    angles, labels = [1.4, 1.3, 0.3], [0, 0, 1]
    bank = torch.tensor([unit(a) for a in angles]) * torch.tensor([[2.0], [0.5], [3.0]])  # norms do not matter
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(bank, torch.tensor(labels), query, num_classes=2, ks=(1, 3, 10))
    weight = [math.exp(math.cos(a) / 0.07) for a in angles]
    torch.testing.assert_close(scores[3], torch.tensor([[weight[0] + weight[1], weight[2]]]))
    torch.testing.assert_close(scores[1], torch.tensor([[0.0, weight[2]]]))
    torch.testing.assert_close(scores[10], scores[3])  # k beyond the bank: the whole bank
    assert scores[3].argmax().item() == 1


def test_accuracy_is_known_on_separated_and_on_mixed_features() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 5
    labels = torch.arange(4).repeat_interleave(10)
    bank = centres[labels] + torch.randn(40, 16, generator=generator) * 0.3
    queries = centres[labels] + torch.randn(40, 16, generator=generator) * 0.3
    assert knn_accuracy(bank, labels, queries, labels, 4, ks=(1, 20)) == {1: 1.0, 20: 1.0}
    # Queries labelled against their cluster: every one is wrong.
    assert knn_accuracy(bank, labels, queries, (labels + 1) % 4, 4, ks=(5,)) == {5: 0.0}


def test_command_writes_results_for_trained_and_random(teacher_export: Path, image_folders, tmp_path: Path) -> None:
    train, val = image_folders
    output = tmp_path / "knn.json"
    arguments = ["--checkpoint", str(teacher_export), "--train", str(train), "--val", str(val)]
    assert knn.main([*arguments, "--ks", "1,3,20", "--random-baseline", "--num-workers", "0", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["classes"] == ["blue", "green", "red"]
    assert (results["train_images"], results["val_images"], results["image_size"]) == (12, 6, 32)
    assert results["top1"].keys() == results["random_top1"].keys() == {"1", "3", "20"}
    # 6 queries: every accuracy is a multiple of 1/6.
    assert all(round(6 * value, 6).is_integer() for value in results["top1"].values())
    assert results["temperature"] == 0.07 and results["iteration"] == 7
    # Without --output, beside the checkpoint.
    assert knn.main([*arguments, "--ks", "1", "--num-workers", "0"]) == 0
    assert (teacher_export / "eval" / "knn.json").is_file()
