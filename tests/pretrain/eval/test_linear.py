"""Linear probes: a grid of heads trained in one pass reaches what separable features allow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.eval import linear
from pretrain.eval.features import EvalInputError
from pretrain.eval.linear import head_accuracies, head_grid, train_linear_heads


def separable(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes in 8 dimensions, linearly separable (class c has feature c shifted by +4)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    features = torch.randn(count, 8, generator=generator)
    features[torch.arange(count), labels] += 4.0
    return features, labels


def test_heads_learn_separable_features_and_a_diverged_head_spoils_no_other() -> None:
    train, train_labels = separable(300, seed=0)
    val, val_labels = separable(150, seed=1)
    # An infinite learning rate makes its head's weights non-finite at the first step.
    settings = head_grid([0.1, float("inf"), 1e-6], [0.0])
    heads = train_linear_heads(train, train_labels, 3, settings, epochs=10, batch_size=32)
    learned, diverged, frozen = head_accuracies(heads, val, val_labels)
    assert learned >= 0.95
    assert diverged is None and heads.finite() == [True, False, True]
    assert frozen < learned  # a learning rate too small to move the heads stays near its initial guess


def test_soft_targets_train_like_class_indices() -> None:
    train, labels = separable(300, seed=0)
    settings = head_grid([0.1], [0.0, 1e-4])
    by_index = train_linear_heads(train, labels, 3, settings, epochs=5, batch_size=32, seed=3)
    by_share = train_linear_heads(
        train, torch.nn.functional.one_hot(labels, 3).float(), 3, settings, epochs=5, batch_size=32, seed=3
    )
    for a, b in zip(by_index.parameters(), by_share.parameters()):
        torch.testing.assert_close(a, b)


def test_bad_grids_are_refused() -> None:
    with pytest.raises(EvalInputError, match="learning rates must be > 0"):
        head_grid([0.0], [0.0])
    with pytest.raises(EvalInputError, match="at least one learning rate"):
        head_grid([], [0.0])
    features, labels = separable(10, seed=0)
    with pytest.raises(EvalInputError, match="epochs >= 1"):
        train_linear_heads(features, labels, 3, head_grid([0.1], [0.0]), epochs=0, batch_size=4)


def test_command_reports_every_head_and_the_best(teacher_export: Path, image_folders, tmp_path: Path) -> None:
    train, val = image_folders
    output = tmp_path / "linear.json"
    arguments = [
        "--checkpoint", str(teacher_export), "--train", str(train), "--val", str(val), "--num-workers", "0",
        "--learning-rates", "0.01,0.1", "--weight-decays", "0,1e-4", "--epochs", "3", "--pooling", "cls_avgpool",
        "--output", str(output),
    ]  # fmt: skip
    assert linear.main(arguments) == 0
    results = json.loads(output.read_text())
    assert [(h["learning_rate"], h["weight_decay"]) for h in results["heads"]] == [
        (0.01, 0.0), (0.01, 1e-4), (0.1, 0.0), (0.1, 1e-4)
    ]  # fmt: skip
    assert results["best"] == max(results["heads"], key=lambda head: head["val_top1"])
    assert (results["train_images"], results["val_images"], results["pooling"]) == (12, 6, "cls_avgpool")
