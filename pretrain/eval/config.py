"""The ``eval`` section of the pretraining config: k-NN and pictures while training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["EvalConfig"]


@dataclass(frozen=True)
class EvalConfig:
    """Every ``every`` iterations (and after the last), the teacher's k-NN top-1 accuracy on a small
    held-out set is logged as ``eval/knn_top1``, and attention and PCA pictures of ``probe_images``
    validation images (the classes in turn) are written to OUTPUT_DIR/eval/step-XXXXXXX/.

    Both folders are ImageFolder trees (``folder/<class>/<image>``) with the same classes; their
    images are loaded once, at the global crop size, when the trainer starts.
    """

    every: int = 0  # 0: no evaluation while training
    train_folder: Path | None = None  # the labelled bank of the k-NN
    val_folder: Path | None = None  # the queries, never trained on
    knn_k: int = 20
    probe_images: int = 4  # 0: no pictures
    batch_size: int = 64

    def validate(self) -> None:
        if self.every < 0 or self.knn_k < 1 or self.probe_images < 0 or self.batch_size < 1:
            raise ValueError(
                f"need every >= 0, knn_k >= 1, probe_images >= 0 and batch_size >= 1, got {self.every}, "
                f"{self.knn_k}, {self.probe_images} and {self.batch_size}"
            )
        if self.every and (self.train_folder is None or self.val_folder is None):
            raise ValueError(
                f"eval.every={self.every} needs eval.train_folder=DIR (labelled k-NN bank) and "
                "eval.val_folder=DIR (held-out queries), ImageFolder trees with the same classes; "
                "or set eval.every=0"
            )
