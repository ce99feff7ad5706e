"""Training-health metrics of the trainer: peak memory, loss-spike and collapse flags, TensorBoard scalars.

The detectors are pure functions over recent values, so that they are tested on synthetic sequences;
``HealthMonitor`` keeps the windows they read. Rank 0 alone monitors and writes: every value it reads
(the global loss, the teacher entropy) is already the same on every rank.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COLLAPSE_TOLERANCE",
    "COLLAPSE_WINDOW",
    "SPIKE_FACTOR",
    "SPIKE_WINDOW",
    "TEACHER_ENTROPY_METRIC",
    "HealthMonitor",
    "ScalarWriter",
    "is_loss_spike",
    "is_uniform_collapse",
    "peak_memory_mib",
]

logger = logging.getLogger(__name__)

SPIKE_FACTOR = 3.0  # a loss above 3× the running median ...
SPIKE_WINDOW = 50  # ... of the previous 50 steps is a spike
COLLAPSE_TOLERANCE = 0.05  # a mean teacher entropy within 5% of ln K ...
COLLAPSE_WINDOW = 20  # ... over the last 20 steps is a uniform collapse
TEACHER_ENTROPY_METRIC = "teacher_entropy/dino"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on a GPU, peak resident set size on CPU
    (what the operating system kills for)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def is_loss_spike(recent: Sequence[float], loss: float, factor: float = SPIKE_FACTOR) -> bool:
    """True when ``loss`` exceeds ``factor`` × the median of ``recent`` (the median ignores the
    outliers that a mean would follow). A full window is the caller's business; no history, no spike."""
    return bool(recent) and loss > factor * statistics.median(recent)


def is_uniform_collapse(
    recent_entropies: Sequence[float], n_prototypes: int, tolerance: float = COLLAPSE_TOLERANCE
) -> bool:
    """True when the mean teacher-target entropy of ``recent_entropies`` is within ``tolerance`` of its
    maximum ln K: the teacher assigns every image the same flat distribution and the loss teaches nothing."""
    if not recent_entropies:
        return False
    return statistics.fmean(recent_entropies) >= (1.0 - tolerance) * math.log(n_prototypes)


class HealthMonitor:
    """Flags of each iteration from the loss and the teacher entropy over sliding windows.

    A flag needs a full window, so that the first steps (whose teacher is near uniform by construction
    of a random head) do not cry wolf. The windows restart with the process: after a resume the first
    ``window`` steps are not checked.
    """

    def __init__(
        self,
        n_prototypes: int,
        spike_factor: float = SPIKE_FACTOR,
        spike_window: int = SPIKE_WINDOW,
        collapse_tolerance: float = COLLAPSE_TOLERANCE,
        collapse_window: int = COLLAPSE_WINDOW,
    ) -> None:
        self.n_prototypes = n_prototypes
        self.spike_factor = spike_factor
        self.collapse_tolerance = collapse_tolerance
        self.losses: deque[float] = deque(maxlen=spike_window)
        self.entropies: deque[float] = deque(maxlen=collapse_window)
        self.collapsed = False  # the warning is logged when a collapse starts, not at every step of it

    def update(self, metrics: dict[str, Any]) -> list[str]:
        """The flags of this iteration's ``metrics`` ('loss_spike', 'collapse'). A spike is logged as a
        warning; a collapse is logged when it starts (and again if it starts anew after a recovery)."""
        flags: list[str] = []
        loss, iteration = metrics["loss"], metrics["iteration"]
        if loss is not None:
            if len(self.losses) == self.losses.maxlen and is_loss_spike(self.losses, loss, self.spike_factor):
                flags.append("loss_spike")
                logger.warning(
                    "loss spike at iteration %d: %.4g > %.3g × the median %.4g of the last %d steps",
                    iteration,
                    loss,
                    self.spike_factor,
                    statistics.median(self.losses),
                    len(self.losses),
                )
            self.losses.append(loss)
        entropy = metrics.get(TEACHER_ENTROPY_METRIC)
        if entropy is not None:
            self.entropies.append(entropy)
            full = len(self.entropies) == self.entropies.maxlen
            collapsed = full and is_uniform_collapse(self.entropies, self.n_prototypes, self.collapse_tolerance)
            if collapsed:
                flags.append("collapse")
            if collapsed and not self.collapsed:
                logger.warning(
                    "collapse at iteration %d: mean teacher entropy %.4g over %d steps is within %.0f%% of "
                    "ln K = %.4g (uniform targets); raise the teacher temperature warm-up or lower the lr",
                    iteration,
                    statistics.fmean(self.entropies),
                    len(self.entropies),
                    100 * self.collapse_tolerance,
                    math.log(self.n_prototypes),
                )
            self.collapsed = collapsed
        return flags


class ScalarWriter:
    """Every numeric metric of an iteration as a TensorBoard scalar of the same name under ``log_dir``.

    ``purge_step`` (the iteration a resumed run starts at) makes TensorBoard drop the events a killed
    run wrote after its last checkpoint, as the metrics file does.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # an optional dependency: only this writer needs it
            raise ValueError(
                "train.tensorboard=true needs the tensorboard package: pip install tensorboard, or set "
                "train.tensorboard=false"
            ) from error
        self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, metrics: dict[str, Any]) -> None:
        step = metrics["iteration"]
        for name, value in metrics.items():
            if name != "iteration" and isinstance(value, int | float):  # bools count as 0/1
                self._writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        self._writer.close()
