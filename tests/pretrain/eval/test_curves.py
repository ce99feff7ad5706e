"""Training curves from metrics.jsonl: the curves come from the right lines (iterations done, nulls
left out, terms in order), the plots are PNG files, and bad input is named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pretrain.eval.curves import knn_curve, loss_curves, plot_knn, plot_losses, read_metrics
from pretrain.eval.features import EvalInputError

METRICS = [
    {"iteration": 0, "loss": 9.0, "loss/dino": 6.0, "loss/ibot": 3.0, "lr": 0.1},
    {"iteration": 1, "loss": None, "loss/dino": None, "loss/ibot": 2.5},  # a non-finite step
    {"iteration": 2, "loss": 8.0, "loss/dino": 5.0, "loss/ibot": 2.0, "loss/koleo": 1.0, "eval/knn_top1": 0.25},
    {"iteration": 3, "loss": 7.0, "loss/dino": 4.5, "loss/ibot": 1.5, "loss/koleo": 1.0, "eval/knn_top1": 0.5},
]


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in METRICS) + "\n")
    return path


def test_curves_count_iterations_done_and_leave_out_nulls(metrics_file):
    metrics = read_metrics(metrics_file)
    assert metrics == METRICS
    curves = loss_curves(metrics)
    assert list(curves) == ["loss", "loss/dino", "loss/ibot", "loss/koleo"]
    done, values = curves["loss"]
    np.testing.assert_array_equal(done, [1, 3, 4])
    np.testing.assert_array_equal(values, [9.0, 8.0, 7.0])
    np.testing.assert_array_equal(curves["loss/ibot"][0], [1, 2, 3, 4])
    np.testing.assert_array_equal(curves["loss/koleo"][0], [3, 4])
    done, accuracy = knn_curve(metrics)
    np.testing.assert_array_equal(done, [3, 4])
    np.testing.assert_array_equal(accuracy, [0.25, 0.5])
    assert [len(c) for c in knn_curve(METRICS[:2])] == [0, 0]


def test_plots_are_png_files(metrics_file, tmp_path):
    metrics = read_metrics(metrics_file)
    plot_losses(metrics, tmp_path / "losses.png")
    plot_knn(metrics, tmp_path / "knn.png", {"random network": 0.1, "chance": 1 / 12})
    for name in ("losses.png", "knn.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 400
            assert np.asarray(image.convert("L")).std() > 10  # lines and text, not a blank canvas


def test_bad_input_is_named(tmp_path):
    with pytest.raises(EvalInputError, match="not found"):
        read_metrics(tmp_path / "missing.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"iteration": 0}\n{not json\n')
    with pytest.raises(EvalInputError, match="one JSON object per line"):
        read_metrics(tmp_path / "broken.jsonl")
    with pytest.raises(EvalInputError, match="eval.every"):
        plot_knn(METRICS[:2], tmp_path / "knn.png", {})
