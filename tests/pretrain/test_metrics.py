"""Tests of the training-health metrics: spike and collapse detectors, TensorBoard scalars, peak memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.metrics import HealthMonitor, is_loss_spike, is_uniform_collapse, peak_memory_mib
from pretrain.train import main
from tests.pretrain.test_train import ITERATIONS, image_folder, read_metrics, recipe_args

__all__ = ["image_folder"]  # the fixture, shared with test_train


def flags_of(monitor: HealthMonitor, losses: list[float], entropies: list[float]) -> list[list[str]]:
    return [
        monitor.update({"iteration": i, "loss": loss, "teacher_entropy/dino": entropy})
        for i, (loss, entropy) in enumerate(zip(losses, entropies, strict=True))
    ]


def test_loss_spike_is_a_loss_above_k_times_the_running_median() -> None:
    recent = [1.0, 1.1, 0.9, 50.0, 1.0]  # one earlier outlier does not move the median
    assert not is_loss_spike(recent, 2.9)
    assert is_loss_spike(recent, 3.1)
    assert is_loss_spike(recent, 1.6, factor=1.5)
    assert not is_loss_spike([], 100.0)


def test_monitor_flags_a_spike_only_after_a_full_window() -> None:
    monitor = HealthMonitor(n_prototypes=64, spike_window=5)
    losses = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 2.0]
    flags = flags_of(monitor, losses, [1.0] * len(losses))
    assert [i for i, f in enumerate(flags) if "loss_spike" in f] == [7]


def test_uniform_collapse_is_a_mean_entropy_within_tolerance_of_ln_k() -> None:
    ln_k = math.log(256)
    assert is_uniform_collapse([ln_k * 0.97] * 3, 256)
    assert not is_uniform_collapse([ln_k * 0.9] * 3, 256)
    assert not is_uniform_collapse([ln_k, ln_k * 0.5], 256)  # the window's mean counts
    assert not is_uniform_collapse([], 256)


def test_monitor_flags_collapse_when_the_window_mean_approaches_ln_k(caplog) -> None:
    ln_k = math.log(64)
    entropies = [0.5 * ln_k] * 6 + [ln_k] * 6  # healthy, then flat targets
    monitor = HealthMonitor(n_prototypes=64, collapse_window=4)
    with caplog.at_level("WARNING", logger="pretrain.metrics"):
        flags = flags_of(monitor, [1.0] * len(entropies), entropies)
    collapsed = [i for i, f in enumerate(flags) if "collapse" in f]
    assert collapsed == [9, 10, 11]  # from the first window whose mean is within 5% of ln K
    assert not any("loss_spike" in f for f in flags)
    # One warning when the collapse starts, not one per collapsed step (a long run's log stays readable).
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["collapse at iteration 9"]


def test_peak_memory_is_positive() -> None:
    assert peak_memory_mib(torch.device("cpu")) > 0


@pytest.mark.parametrize("tensorboard", [True, False])
def test_tiny_run_writes_tensorboard_scalars_peak_memory_and_flags(
    tensorboard: bool, tmp_path: Path, image_folder: Path
) -> None:
    output_dir = tmp_path / "out"
    args = recipe_args(
        "v2", output_dir, f"data.image_folder={image_folder}", f"train.tensorboard={tensorboard}"
    )
    assert main(args) == 0

    rows = read_metrics(output_dir)
    assert all(row["memory/peak_mib"] > 0 and row["flags"] == [] for row in rows)
    assert all(0 < row["teacher_entropy/dino"] <= math.log(64) + 1e-5 for row in rows)
    if not tensorboard:
        assert not (output_dir / "tensorboard").exists()
        return
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    numeric = {k for k, v in rows[0].items() if k != "iteration" and isinstance(v, int | float)}
    assert {"loss", "loss/ibot", "memory/peak_mib", "teacher_entropy/dino", "data_wait_share"} <= tags
    assert tags == numeric
    assert [event.step for event in events.Scalars("loss")] == list(range(ITERATIONS))
