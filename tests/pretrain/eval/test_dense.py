"""Dense probe: IoU on hand-made masks, patch targets, a probe that must be perfect, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pretrain.eval import dense
from pretrain.eval.dense import (
    class_shares,
    confusion_matrix,
    evaluate_segmentation_heads,
    iou_per_class,
    masked_images,
    mean_iou,
)
from pretrain.eval.features import EvalInputError
from pretrain.eval.linear import head_grid, train_linear_heads


def test_iou_on_hand_made_masks() -> None:
    # Truth: left half object (1). Prediction: the left three columns object.
    target = torch.tensor([[1, 1, 0, 0]] * 4)
    predicted = torch.tensor([[1, 1, 1, 0]] * 4)
    confusion = confusion_matrix(predicted, target, num_classes=3)
    assert confusion.tolist() == [[4, 4, 0], [0, 8, 0], [0, 0, 0]]
    iou = iou_per_class(confusion)
    # Background: 4 right / (8 true + 4 predicted - 4); object: 8 / (8 + 12 - 8); class 2 absent: NaN.
    assert iou[:2].tolist() == pytest.approx([0.5, 2 / 3])
    assert math.isnan(iou[2])
    assert mean_iou(confusion) == pytest.approx((0.5 + 2 / 3) / 2)
    assert mean_iou(confusion_matrix(target, target, 2)) == 1.0


def test_class_shares_per_patch() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]]])
    shares = class_shares(labels, num_classes=3, patch_size=2)
    # Patches in row-major order: top-left, top-right, bottom-left, bottom-right.
    expected = [[0.75, 0.25, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert shares.tolist() == [expected]


def test_probe_on_patch_features_that_encode_the_class_is_perfect() -> None:
    """Label maps of 2 x 2-pixel patches, each patch one class; its feature is its class's one-hot
    plus noise. The heads must recover every pixel, through the bilinear upsampling too."""
    generator = torch.Generator().manual_seed(0)
    patch_labels = torch.randint(0, 3, (40, 4, 4), generator=generator)
    label_maps = patch_labels.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (40, 8, 8)
    patches = torch.nn.functional.one_hot(patch_labels.flatten(1), 3).float() * 3
    patches = torch.cat([patches, torch.zeros(40, 16, 5)], dim=2) + 0.1 * torch.randn(40, 16, 8, generator=generator)
    targets = class_shares(label_maps[:30], 3, patch_size=2)
    settings = head_grid([0.3, 1e-7], [0.0])
    heads = train_linear_heads(patches[:30].flatten(0, 1), targets.flatten(0, 1), 3, settings, epochs=20, batch_size=64)
    confusions = evaluate_segmentation_heads(heads, patches[30:], (4, 4), label_maps[30:], chunk_size=4)
    assert confusions[0].sum() == 10 * 64
    assert mean_iou(confusions[0]) == 1.0
    assert mean_iou(confusions[1]) < 0.9


def test_command_on_the_demo_web(demo_root: Path, teacher_export: Path, tmp_path: Path) -> None:
    pages = pq.read_table(demo_root / "pages.parquet").to_pylist()
    concept_images = sum(1 for page in pages if page["kind"] == "concept")
    assert len(masked_images(demo_root)) == concept_images
    output = tmp_path / "dense.json"
    arguments = [
        "--checkpoint", str(teacher_export), "--demo", str(demo_root), "--classes", "concept", "--num-workers", "0",
        "--learning-rates", "0.01,0.1", "--epochs", "2", "--output", str(output),
    ]  # fmt: skip
    assert dense.main(arguments) == 0
    results = json.loads(output.read_text())
    assert results["classes"][0] == "background" and len(results["classes"]) == 13
    assert results["train_images"] + results["test_images"] == concept_images
    assert abs(results["train_images"] - results["test_images"]) <= 1
    for network in ("trained", "random"):
        best = results[network]["best"]
        assert len(results[network]["heads"]) == 2 and 0.0 <= best["miou"] <= 1.0
        assert best["iou_per_class"].keys() == set(results["classes"])


def test_a_folder_without_a_demo_web_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="--demo must be the root of a demo web"):
        masked_images(tmp_path)
