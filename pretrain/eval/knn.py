"""Weighted k-NN classification on the L2-normalised teacher CLS (DINO's k-NN evaluation).

Each validation image is classified by its k most cosine-similar training images, each voting for
its class with weight exp(similarity / 0.07). No training, no hyperparameter search: the quickest
read of how well the features separate classes.

    python -m pretrain.eval.knn --checkpoint OUTPUT_DIR/teacher_backbone.safetensors \\
        --train DIR --val DIR [--ks 10,20,100,200] [--random-baseline] [--output PATH]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.eval.cli import add_probe_arguments, default_output, load_for_cli, run, write_json
from pretrain.eval.features import random_backbone, train_val_features

__all__ = ["DEFAULT_KS", "TEMPERATURE", "knn_accuracy", "knn_scores", "main", "run_knn"]

DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


@torch.no_grad()
def knn_scores(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = TEMPERATURE,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Class scores (Q, C) of the weighted vote for each k, on the device of ``bank``.

    The k most cosine-similar bank vectors vote for their label with weight exp(similarity /
    temperature); a k larger than the bank uses the whole bank. Queries go in chunks, so memory is
    chunk_size × bank size.
    """
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(bank.device)
    widest = min(max(ks), len(bank))
    scores: dict[int, list[Tensor]] = {k: [] for k in ks}
    for chunk in F.normalize(queries.float().to(bank.device), dim=1).split(chunk_size):
        similarity, index = (chunk @ bank.T).topk(widest, dim=1)  # sorted, most similar first
        weights, labels = (similarity / temperature).exp(), bank_labels[index]
        for k in ks:
            votes = torch.zeros(len(chunk), num_classes, device=bank.device)
            scores[k].append(votes.scatter_add_(1, labels[:, :k], weights[:, :k]))
    return {k: torch.cat(parts) for k, parts in scores.items()}


def knn_accuracy(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = TEMPERATURE,
) -> dict[int, float]:
    """Top-1 accuracy of the weighted k-NN vote for each k."""
    scores = knn_scores(bank, bank_labels, queries, num_classes, ks, temperature)
    query_labels = query_labels.to(bank.device)
    return {k: float((votes.argmax(dim=1) == query_labels).float().mean()) for k, votes in scores.items()}


def run_knn(
    model: torch.nn.Module,
    train_folder: Path,
    val_folder: Path,
    image_size: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = TEMPERATURE,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """k-NN top-1 accuracy (keyed by k as text, for JSON) of ``model`` (on its device) with the
    training ImageFolder as bank and the validation ImageFolder as queries, and the sizes."""
    train, val, classes = train_val_features(
        model, train_folder, val_folder, image_size,
        batch_size=batch_size, num_workers=num_workers, progress=progress,
    )  # fmt: skip
    device = next(model.parameters()).device
    accuracy = knn_accuracy(train.cls.to(device), train.targets, val.cls, val.targets, len(classes), ks, temperature)
    return {
        "classes": classes,
        "train_images": len(train.cls),
        "val_images": len(val.cls),
        "top1": {str(k): value for k, value in accuracy.items()},
    }


def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.eval.knn", description=__doc__.split("\n\n")[0])
    add_probe_arguments(parser)
    parser.add_argument("--train", type=Path, required=True, help="labelled ImageFolder: the k-NN bank")
    parser.add_argument("--val", type=Path, required=True, help="ImageFolder of queries, the same classes")
    parser.add_argument(
        "--ks", type=lambda text: [int(k) for k in text.split(",")], default=list(DEFAULT_KS), help="k values"
    )
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="vote weight exp(sim / T)")
    parser.add_argument(
        "--random-baseline", action="store_true", help="also evaluate a randomly initialised network of the same shape"
    )
    args = parser.parse_args(argv)
    backbone, device, image_size = load_for_cli(args)
    options: dict[str, Any] = {
        "batch_size": args.batch_size, "num_workers": args.num_workers, "progress": sys.stderr.isatty(),
    }  # fmt: skip
    evaluated = run_knn(backbone.model, args.train, args.val, image_size, args.ks, args.temperature, **options)
    results: dict[str, Any] = {
        "checkpoint": str(backbone.source),
        "iteration": backbone.iteration,
        "image_size": image_size,
        "train_folder": str(args.train),
        "val_folder": str(args.val),
        "temperature": args.temperature,
        **evaluated,
    }
    if args.random_baseline:
        random_model = random_backbone(backbone.spec, args.seed).to(device)
        random_run = run_knn(random_model, args.train, args.val, image_size, args.ks, args.temperature, **options)
        results["random_top1"] = random_run["top1"]
    write_json(args.output or default_output(args.checkpoint, "knn"), results)
    print("k-NN top-1: " + ", ".join(f"k={k} {100 * acc:.1f}%" for k, acc in results["top1"].items()))


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
