"""Training curves from OUTPUT_DIR/metrics.jsonl, as PNG: the loss by term, and the k-NN accuracy of
the evaluations while training (``eval.every``).

The x axis counts iterations done (a metrics line's ``iteration`` is 0-based), the unit in which
checkpoints, evaluations and their picture folders are named. Non-finite values (``null`` in the
file) are left out of a curve rather than drawn as zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pretrain.eval.features import EvalInputError
from pretrain.eval.in_training import KNN_METRIC

__all__ = ["Curve", "knn_curve", "loss_curves", "plot_knn", "plot_losses", "read_metrics"]

LOSS = "loss"
LOSS_TERM_PREFIX = "loss/"

Curve = tuple[np.ndarray, np.ndarray]  # (iterations done, values)


def read_metrics(path: str | Path) -> list[dict]:
    """The metrics of every iteration, in file order."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path} not found: pass the metrics.jsonl that pretrain/train.py writes in OUTPUT_DIR")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise EvalInputError(f"{path} is not a metrics file of one JSON object per line: {error}") from error


def _curve(metrics: list[dict], name: str) -> Curve:
    points = [(line["iteration"] + 1, line[name]) for line in metrics if line.get(name) is not None]
    done = np.array([x for x, _ in points], dtype=np.int64)
    values = np.array([y for _, y in points], dtype=np.float64)
    finite = np.isfinite(values)
    return done[finite], values[finite]


def loss_curves(metrics: list[dict]) -> dict[str, Curve]:
    """The total loss, then each weighted term (``loss/dino``, ``loss/ibot``, ...) in order of first
    appearance; a term never logged (switched off) has no curve."""
    names = [LOSS] if any(LOSS in line for line in metrics) else []
    for line in metrics:
        names += [name for name in line if name.startswith(LOSS_TERM_PREFIX) and name not in names]
    return {name: _curve(metrics, name) for name in names}


def knn_curve(metrics: list[dict]) -> Curve:
    """k-NN top-1 of each evaluation while training; empty without evaluations."""
    return _curve(metrics, KNN_METRIC)


def plot_losses(metrics: list[dict], path: Path) -> None:
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    for name, (done, values) in loss_curves(metrics).items():
        axes.plot(done, values, label=name, linewidth=2.0 if name == LOSS else 1.2)
    axes.set_xlabel("iterations")
    axes.set_ylabel("loss (terms weighted)")
    axes.set_title("Training loss by term")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.savefig(path, dpi=100)


def plot_knn(metrics: list[dict], path: Path, baselines: dict[str, float]) -> None:
    """The k-NN curve, with horizontal lines at ``baselines`` (label -> accuracy, e.g. a random
    network's and chance)."""
    done, accuracy = knn_curve(metrics)
    if not len(done):
        raise EvalInputError(
            f"the metrics hold no {KNN_METRIC}: train with eval.every > 0 (and eval.train_folder, eval.val_folder)"
        )
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    axes.plot(done, 100 * accuracy, marker="o", label="teacher")
    for (label, value), style in zip(baselines.items(), ("--", ":", "-.")):
        axes.axhline(100 * value, linestyle=style, color="grey", label=label)
    axes.set_xlabel("iterations")
    axes.set_ylabel("k-NN top-1 (%)")
    axes.set_title("k-NN accuracy while training")
    axes.set_ylim(0, max(100 * max(accuracy.max(), *baselines.values(), 0.0) * 1.2, 10))
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.savefig(path, dpi=100)
