"""Linear probes on frozen features: a grid of learning rates (and weight decays) trained in one pass.

The backbone runs once over each folder; every (learning rate, weight decay) pair then gets its own
linear classifier, all trained together on the same mini-batches of the cached features (SGD with
momentum 0.9, cosine schedule, cross-entropy). The best one on the validation set is reported, as in
DINOv2's linear evaluation; picking it there makes the number a little optimistic, equally so for
every backbone compared.

    python -m pretrain.eval.linear --checkpoint OUTPUT_DIR/teacher_backbone.safetensors \\
        --train DIR --val DIR [--learning-rates 1e-3,1e-2,0.1] [--weight-decays 0,1e-4] [--output PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pretrain.eval.cli import (
    add_probe_arguments,
    default_output,
    load_for_cli,
    parse_floats,
    run,
    write_json,
)
from pretrain.eval.features import EvalInputError, FeatureSet, train_val_features

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "HeadSetting",
    "ParallelLinearHeads",
    "head_accuracies",
    "head_grid",
    "main",
    "probe_features",
    "run_linear",
    "train_linear_heads",
]

DEFAULT_LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
MOMENTUM = 0.9
Pooling = Literal["cls", "cls_avgpool"]


@dataclass(frozen=True)
class HeadSetting:
    learning_rate: float
    weight_decay: float


def head_grid(learning_rates: Sequence[float], weight_decays: Sequence[float]) -> list[HeadSetting]:
    """Every (learning rate, weight decay) pair; a negative or empty grid is an error."""
    if not learning_rates or not weight_decays:
        raise EvalInputError("give at least one learning rate and one weight decay")
    if min(learning_rates) <= 0 or min(weight_decays) < 0:
        raise EvalInputError(
            f"learning rates must be > 0 and weight decays >= 0, got {list(learning_rates)} and {list(weight_decays)}"
        )
    return [HeadSetting(lr, wd) for lr in learning_rates for wd in weight_decays]


class ParallelLinearHeads(nn.Module):
    """One linear classifier per hyperparameter setting, all reading the same features."""

    def __init__(self, in_dim: int, num_classes: int, count: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_dim, num_classes) for _ in range(count))

    def reset_parameters(self, generator: torch.Generator) -> None:
        # DINO's linear-probe initialisation: small normal weights, zero biases.
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01, generator=generator)
            nn.init.zeros_(head.bias)

    def finite(self) -> list[bool]:
        """Per head: are its weights finite? A learning rate too high for the features diverges."""
        return [all(bool(param.isfinite().all()) for param in head.parameters()) for head in self.heads]

    def forward(self, features: Tensor) -> Tensor:
        """(B, D) -> logits (heads, B, C)."""
        return torch.stack([head(features) for head in self.heads])


def train_linear_heads(
    features: Tensor,
    targets: Tensor,
    num_classes: int,
    settings: Sequence[HeadSetting],
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    progress: bool = False,
) -> ParallelLinearHeads:
    """Train one linear head per setting on (N, D) ``features`` (on their device).

    ``targets`` are class indices (N,) or class probabilities (N, C) (e.g. the share of each class
    in a patch). The loss is the sum of the heads' mean cross-entropies, so each head gets exactly
    its own gradient; each has its own SGD parameter group (learning rate, weight decay) and the
    learning rates follow one cosine schedule to 0.
    """
    if epochs < 1 or batch_size < 1:
        raise EvalInputError(f"the probe needs epochs >= 1 and a batch size >= 1, got {epochs} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    heads = ParallelLinearHeads(features.shape[1], num_classes, len(settings))
    heads.reset_parameters(generator)
    heads.to(features.device)
    optimizer = torch.optim.SGD(
        [
            {"params": head.parameters(), "lr": setting.learning_rate, "weight_decay": setting.weight_decay}
            for head, setting in zip(heads.heads, settings)
        ],
        momentum=MOMENTUM,
    )
    total_steps = epochs * math.ceil(len(features) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    )
    repeats = (len(settings),) + (1,) * (targets.ndim - 1)
    targets = targets.to(features.device)
    with tqdm(total=total_steps, desc="linear heads", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            for batch in torch.randperm(len(features), generator=generator).split(batch_size):
                batch = batch.to(features.device)
                logits = heads(features[batch])
                loss = F.cross_entropy(logits.flatten(0, 1), targets[batch].repeat(repeats)) * len(settings)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
    return heads.eval().requires_grad_(False)


@torch.no_grad()
def head_accuracies(
    heads: ParallelLinearHeads, features: Tensor, labels: Tensor, chunk_size: int = 4096
) -> list[float | None]:
    """Top-1 accuracy of each head; None for a head whose training diverged."""
    correct = torch.zeros(len(heads.heads), device=features.device)
    labels = labels.to(features.device)
    for chunk, chunk_labels in zip(features.split(chunk_size), labels.split(chunk_size)):
        correct += (heads(chunk).argmax(dim=2) == chunk_labels).sum(dim=1)
    return [float(c) / len(features) if ok else None for c, ok in zip(correct.tolist(), heads.finite())]


def probe_features(features: FeatureSet, pooling: Pooling) -> Tensor:
    """What the probe reads: the CLS, or the CLS concatenated with the mean patch token (DINOv2's
    'avgpool' variant)."""
    if pooling == "cls":
        return features.cls
    return torch.cat([features.cls, features.patch_mean], dim=1)


def run_linear(
    model: nn.Module,
    train_folder: Path,
    val_folder: Path,
    image_size: int,
    settings: Sequence[HeadSetting],
    *,
    pooling: Pooling = "cls",
    epochs: int = 50,
    probe_batch_size: int = 256,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the heads on the training folder's frozen features of ``model`` (on its device) and
    measure each on the validation folder; ``best`` is the head with the highest accuracy."""
    train, val, classes = train_val_features(
        model, train_folder, val_folder, image_size,
        batch_size=batch_size, num_workers=num_workers, progress=progress,
    )  # fmt: skip
    device = next(model.parameters()).device
    heads = train_linear_heads(
        probe_features(train, pooling).to(device), train.targets, len(classes), settings,
        epochs=epochs, batch_size=probe_batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    accuracies = head_accuracies(heads, probe_features(val, pooling).to(device), val.targets)
    rows = [{**asdict(setting), "val_top1": accuracy} for setting, accuracy in zip(settings, accuracies)]
    finished = [row for row in rows if row["val_top1"] is not None]
    return {
        "classes": classes,
        "train_images": len(train.cls),
        "val_images": len(val.cls),
        "pooling": pooling,
        "epochs": epochs,
        "heads": rows,
        "best": max(finished, key=lambda row: row["val_top1"]) if finished else None,
    }


def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.eval.linear", description=__doc__.split("\n\n")[0])
    add_probe_arguments(parser)
    parser.add_argument("--train", type=Path, required=True, help="labelled ImageFolder the heads train on")
    parser.add_argument("--val", type=Path, required=True, help="labelled ImageFolder, the same classes")
    parser.add_argument("--learning-rates", type=parse_floats, default=list(DEFAULT_LEARNING_RATES))
    parser.add_argument("--weight-decays", type=parse_floats, default=[0.0])
    parser.add_argument("--epochs", type=int, default=50, help="passes over the cached training features")
    parser.add_argument("--probe-batch-size", type=int, default=256, help="features per SGD step")
    parser.add_argument(
        "--pooling", choices=("cls", "cls_avgpool"), default="cls", help="CLS, or CLS + mean patch token"
    )
    args = parser.parse_args(argv)
    settings = head_grid(args.learning_rates, args.weight_decays)
    backbone, _, image_size = load_for_cli(args)
    evaluated = run_linear(
        backbone.model, args.train, args.val, image_size, settings,
        pooling=args.pooling, epochs=args.epochs, probe_batch_size=args.probe_batch_size,
        batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed, progress=sys.stderr.isatty(),
    )  # fmt: skip
    results = {
        "checkpoint": str(backbone.source),
        "iteration": backbone.iteration,
        "image_size": image_size,
        "train_folder": str(args.train),
        "val_folder": str(args.val),
        **evaluated,
    }
    write_json(args.output or default_output(args.checkpoint, "linear"), results)
    best = results["best"]
    if best is None:
        print("linear probe: every head diverged; try smaller --learning-rates")
    else:
        print(
            f"linear probe top-1: {100 * best['val_top1']:.1f}% (lr {best['learning_rate']:g}, "
            f"weight decay {best['weight_decay']:g})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
