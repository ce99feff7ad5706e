"""Per-iteration training schedules, precomputed as numpy arrays.

Every schedule is a pure function of the config, one value per iteration, so resuming at iteration
``t`` reads exactly the values an uninterrupted run would have used; no scheduler state is saved.
An "epoch" is a fixed number of iterations (``iters_per_epoch``), not a pass over a dataset.

Conventions: a warm-up or ramp of ``n`` iterations starts at its start value at its first iteration
and reaches its target at iteration ``n`` after it began (the first iteration after the ramp); a
cosine phase starts exactly at ``base`` and ends exactly at ``final`` on the last iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

__all__ = [
    "ScheduleConfig",
    "Schedules",
    "linear_ramp",
    "scaled_lr",
    "warmup_constant",
    "warmup_cosine",
]


def _check_span(total_iters: int, **spans: int) -> None:
    if total_iters < 0 or any(n < 0 for n in spans.values()):
        raise ValueError(f"iteration counts must be >= 0, got total_iters={total_iters}, {spans}")
    if sum(spans.values()) > total_iters:
        parts = " + ".join(f"{name}={n}" for name, n in spans.items())
        raise ValueError(f"{parts} exceeds total_iters={total_iters}; shorten them or train longer")


def _warmup(start: float, end: float, iters: int) -> np.ndarray:
    """``iters`` values from ``start`` rising linearly towards ``end`` (which the next iteration takes)."""
    return start + (end - start) * np.arange(iters, dtype=np.float64) / max(iters, 1)


def warmup_cosine(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
    """0 for ``freeze_iters``, linear warm-up to ``base``, then a half cosine to ``final`` (v1/v2)."""
    _check_span(total_iters, freeze_iters=freeze_iters, warmup_iters=warmup_iters)
    cosine_iters = total_iters - freeze_iters - warmup_iters
    progress = np.linspace(0.0, 1.0, cosine_iters)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([np.zeros(freeze_iters), _warmup(start_warmup_value, base, warmup_iters), cosine])


def warmup_constant(
    base: float, total_iters: int, warmup_iters: int, start_warmup_value: float = 0.0
) -> np.ndarray:
    """Linear warm-up to ``base``, then ``base`` until the end (v3)."""
    _check_span(total_iters, warmup_iters=warmup_iters)
    constant = np.full(total_iters - warmup_iters, base, dtype=np.float64)
    return np.concatenate([_warmup(start_warmup_value, base, warmup_iters), constant])


def linear_ramp(
    start: float, end: float, total_iters: int, ramp_iters: int, delay_iters: int = 0
) -> np.ndarray:
    """``start`` for ``delay_iters``, linear to ``end`` over ``ramp_iters``, then ``end``.

    For the teacher temperature (0.04 -> 0.07 over 30 epochs) and the Gram loss weight (0 for the
    first 1M iterations, then up). A ramp longer than the run is cut off where the run ends.
    """
    if min(total_iters, ramp_iters, delay_iters) < 0:
        raise ValueError(f"iteration counts must be >= 0, got {total_iters=}, {ramp_iters=}, {delay_iters=}")
    values = np.concatenate(
        [
            np.full(delay_iters, start, dtype=np.float64),
            _warmup(start, end, ramp_iters),
            np.full(total_iters, end),
        ]
    )
    return values[:total_iters]


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Square-root scaling of the learning rate from the reference batch of 1024 images."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}")
    return base_lr * math.sqrt(global_batch / 1024)


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule settings; the defaults are the DINOv2 short-run recipe (cosine).

    ``kind='cosine'`` (v1/v2): lr warms up then decays to ``min_lr``; weight decay and teacher
    momentum follow cosines from their start to their end values. ``kind='constant'`` (v3): lr warms
    up then stays; weight decay and momentum stay at their start values (the ``*_end`` keys are unused).
    """

    kind: Literal["cosine", "constant"] = "cosine"
    epochs: int = 100
    iters_per_epoch: int = 1250  # one ImageNet-1k pass at batch 1024
    warmup_epochs: int = 10
    base_lr: float = 0.004  # at global batch 1024; see scaled_lr
    min_lr: float = 1e-6
    weight_decay_start: float = 0.04
    weight_decay_end: float = 0.4
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    freeze_last_layer_epochs: int = 1

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    def validate(self) -> None:
        if self.epochs <= 0 or self.iters_per_epoch <= 0:
            raise ValueError(
                f"epochs ({self.epochs}) and iters_per_epoch ({self.iters_per_epoch}) must be > 0"
            )
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs > self.epochs or self.freeze_last_layer_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) and freeze_last_layer_epochs "
                f"({self.freeze_last_layer_epochs}) must not exceed epochs ({self.epochs}); lower them "
                "or raise epochs"
            )
        if not 0.0 <= self.momentum_start <= 1.0 or not 0.0 <= self.momentum_end <= 1.0:
            raise ValueError(
                f"teacher momentum must lie in [0, 1], got {self.momentum_start} -> {self.momentum_end}"
            )


@dataclass(frozen=True, eq=False)  # array fields: element-wise == would make equality ambiguous
class Schedules:
    """One value per iteration for every scheduled quantity of a run."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray  # teacher EMA momentum
    teacher_temp: np.ndarray
    last_layer_lr_mult: np.ndarray  # 0 while the head's last layer is frozen, else 1

    @classmethod
    def from_config(cls, config: ScheduleConfig, global_batch: int) -> Schedules:
        config.validate()
        total = config.total_iters
        per_epoch = config.iters_per_epoch
        peak_lr = scaled_lr(config.base_lr, global_batch)
        warmup = config.warmup_epochs * per_epoch
        if config.kind == "cosine":
            lr = warmup_cosine(peak_lr, config.min_lr, total, warmup)
            weight_decay = warmup_cosine(config.weight_decay_start, config.weight_decay_end, total, 0)
            momentum = warmup_cosine(config.momentum_start, config.momentum_end, total, 0)
        else:
            lr = warmup_constant(peak_lr, total, warmup)
            weight_decay = np.full(total, config.weight_decay_start)
            momentum = np.full(total, config.momentum_start)
        teacher_temp = linear_ramp(
            config.warmup_teacher_temp,
            config.teacher_temp,
            total,
            config.warmup_teacher_temp_epochs * per_epoch,
        )
        frozen = config.freeze_last_layer_epochs * per_epoch
        last_layer = np.concatenate([np.zeros(frozen), np.ones(total - frozen)])
        return cls(lr, weight_decay, momentum, teacher_temp, last_layer)

    @property
    def total_iters(self) -> int:
        return len(self.lr)

    def at(self, iteration: int) -> dict[str, float]:
        """All scheduled values at ``iteration`` (0-based), as plain floats for the step and the logs."""
        if not 0 <= iteration < self.total_iters:
            raise IndexError(
                f"iteration {iteration} is outside the schedule of {self.total_iters} iterations"
            )
        return {field.name: float(getattr(self, field.name)[iteration]) for field in fields(self)}
