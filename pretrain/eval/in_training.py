"""Evaluation while pretraining: k-NN accuracy of the teacher and its pictures, every ``eval.every``
iterations and after the last (the ``eval`` section, pretrain/eval/config.py).

The held-out images are decoded once, when the trainer is built (so a bad folder fails before the
first step), and kept in memory at the global crop size: keep the folders small (hundreds of
images). Every process runs the evaluation on the same images, since under FSDP the teacher's
forward needs all of them; only the writer (rank 0) writes pictures. The teacher is in eval mode
(no stochastic depth, no RoPE jitter), so an evaluation draws no random numbers and leaves the
training run exactly as it would be without it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from pretrain.checkpoint import step_name
from pretrain.eval.config import EvalConfig
from pretrain.eval.features import LabelledImages, check_same_classes, extract_features
from pretrain.eval.knn import knn_accuracy
from pretrain.eval.pictures import compute_pictures, save_pictures
from pretrain.models import VisionTransformer

__all__ = ["EVAL_DIR", "KNN_METRIC", "TrainingEvaluator", "spread_over_classes"]

EVAL_DIR = "eval"  # OUTPUT_DIR/eval/step-XXXXXXX/{attention,pca}.png
KNN_METRIC = "eval/knn_top1"


def spread_over_classes(labels: Tensor, count: int) -> Tensor:
    """Indices of ``count`` samples taking the classes in turn: the first sample of each class, then
    the second of each, and so on (so that the probe images show every class)."""
    seen: dict[int, int] = {}
    rank_in_class = []
    for label in labels.tolist():
        rank_in_class.append(seen.get(label, 0))
        seen[label] = rank_in_class[-1] + 1
    order = sorted(range(len(labels)), key=lambda index: (rank_in_class[index], labels[index].item()))
    return torch.tensor(order[:count], dtype=torch.long)


def _decoded(dataset: LabelledImages) -> tuple[Tensor, Tensor]:
    pairs = [dataset[index] for index in range(len(dataset))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


class TrainingEvaluator:
    """k-NN top-1 of the teacher backbone on the held-out folders, and pictures of the probe images."""

    def __init__(self, config: EvalConfig, image_size: int, output_dir: Path) -> None:
        if config.train_folder is None or config.val_folder is None:
            raise ValueError("TrainingEvaluator needs eval.train_folder and eval.val_folder")
        bank = LabelledImages(config.train_folder, image_size, "k-NN bank eval.train_folder")
        queries = LabelledImages(config.val_folder, image_size, "k-NN queries eval.val_folder")
        check_same_classes(bank, queries)
        self.config = config
        self.num_classes = len(bank.classes)
        self.bank_images, self.bank_labels = _decoded(bank)
        self.query_images, self.query_labels = _decoded(queries)
        self.probe_images = self.query_images[spread_over_classes(self.query_labels, config.probe_images)]
        self.pictures_dir = output_dir / EVAL_DIR

    def due(self, iterations_done: int, total_iters: int) -> bool:
        every = self.config.every
        return every > 0 and (iterations_done % every == 0 or iterations_done == total_iters)

    @torch.no_grad()
    def evaluate(self, backbone: VisionTransformer, iterations_done: int, write: bool) -> dict[str, float]:
        """``{'eval/knn_top1': accuracy}``; with ``write``, the pictures of the probe images (queries,
        the classes in turn) in OUTPUT_DIR/eval/step-XXXXXXX/."""
        was_training = backbone.training
        backbone.eval()
        batch_size, k = self.config.batch_size, self.config.knn_k
        bank = extract_features(backbone, TensorDataset(self.bank_images, self.bank_labels), batch_size=batch_size)
        queries = extract_features(backbone, TensorDataset(self.query_images, self.query_labels), batch_size=batch_size)
        top1 = knn_accuracy(bank.cls, bank.targets, queries.cls, queries.targets, self.num_classes, ks=(k,))[k]
        if len(self.probe_images):
            pictures = compute_pictures(backbone, self.probe_images.to(next(backbone.parameters()).device))
            if write:
                save_pictures(pictures, self.pictures_dir / step_name(iterations_done))
        backbone.train(was_training)
        return {KNN_METRIC: top1}
