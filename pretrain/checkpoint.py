"""Checkpoints of a pretraining run: consolidated, atomic, retained, and resumable at any world size.

Layout of ``OUTPUT_DIR/checkpoints/step-XXXXXXX/`` (XXXXXXX = iterations done = where a resume starts):

- ``model.pt``: the meta-architecture's full state dict: student, EMA teacher, Gram teacher and the
  DINO/iBOT centers.
- ``optimizer.pt``: AdamW's full state dict, parameters keyed by name (not by position).
- ``trainer.pt``: the iteration, the world size and global batch it was written with, and each rank's
  RNG states (python, numpy, torch CPU and CUDA). Schedules and the data stream are pure functions of
  the iteration, so the iteration is also the data position.
- ``config.yaml``: the resolved config of the run.
- ``teacher_backbone.safetensors`` + ``teacher_backbone.json``: the export (pretrain/export.py).
- ``COMPLETE``: written last.

Why full state dicts written by rank 0 with torch.save rather than torch.distributed.checkpoint: a
checkpoint is then a few ordinary files that ``torch.load(..., weights_only=True)`` reads in any
process, at any world size and under any parallelism (single process, DDP, FSDP2), without the
training code; state is keyed by parameter name, so nothing depends on how it was sharded. The cost is
that rank 0 gathers the whole state in CPU memory and writes it alone: right for the ViT-S to ViT-g
sizes of these recipes; a 7B model would want DCP's sharded, parallel writes.

A folder is written as ``.step-XXXXXXX.tmp``, fsynced, marked ``COMPLETE`` and renamed, so a folder
named ``step-*`` is complete unless its files were damaged afterwards; a leftover ``.tmp`` folder (a
run killed while saving) is ignored and removed by the next save.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain.config import CheckpointConfig

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "LoadedCheckpoint",
    "architecture_differences",
    "capture_rng",
    "check_resumable",
    "config_differences",
    "describe_differences",
    "gather_model_state",
    "gather_optimizer_state",
    "load_model_state",
    "load_optimizer_state",
    "read_checkpoint",
    "restore_rng",
    "retained_iterations",
    "shape_mismatches",
    "step_name",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
MARKER_FILE = "COMPLETE"
SET_ASIDE_SUFFIX = ".unusable"
# Sections whose keys change the networks' parameters: a checkpoint cannot be resumed across them.
ARCHITECTURE_SECTIONS = ("model", "heads")
_STEP = re.compile(r"step-(\d{7,})")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed into this run; the message says why and what to change."""


def step_name(iteration: int) -> str:
    return f"step-{iteration:07d}"


def retained_iterations(iterations: Iterable[int], keep_last: int, keep_every: int) -> set[int]:
    """The checkpoints to keep: the newest ``keep_last`` and every multiple of ``keep_every`` (if > 0)."""
    ordered = sorted(iterations)
    kept = set(ordered[-keep_last:])
    if keep_every > 0:
        kept |= {iteration for iteration in ordered if iteration % keep_every == 0}
    return kept


# ---------------------------------------------------------------------------------------------------
# State of the processes: model, optimizer, RNG


def gather_model_state(model: nn.Module) -> dict[str, Any]:
    """The full state dict on CPU, gathered from the shards under FSDP2 (a collective: every rank
    calls it; rank 0 gets the tensors)."""
    return get_model_state_dict(model, options=_FULL)


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict on CPU, parameters keyed by name (collective, like the model's)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_model_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Load a full state dict into ``model``, sharding it again under FSDP2."""
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load a full optimizer state dict.

    A parameter that has not stepped yet (the heads' last layers while they are frozen) has no state
    in the checkpoint, and must have none after loading either: its first AdamW step counts from 1.
    The loader fills such gaps with the zero state of a dry step it takes on an empty optimizer, so
    that state is dropped again.
    """
    set_optimizer_state_dict(
        model, optimizer, dict(state), options=StateDictOptions(full_state_dict=True, strict=False)
    )
    saved = state["state"]
    for name, param in model.named_parameters():
        if name not in saved:
            optimizer.state.pop(param, None)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        # The current GPU's (one process per GPU), and only when CUDA is in use.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, position, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), position, has_gauss, gauss_value))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# Configs


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved value, current value) for every key whose value differs."""
    old, new = _flatten(saved), _flatten(current)
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    }


def architecture_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The differences in the sections that define the networks (``model``, ``heads``)."""
    return {
        key: values
        for key, values in config_differences(saved, current).items()
        if key.split(".", 1)[0] in ARCHITECTURE_SECTIONS
    }


def describe_differences(differences: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(
        f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in differences.items()
    )


# ---------------------------------------------------------------------------------------------------
# Folders


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Everything a checkpoint folder holds, read into CPU memory."""

    path: Path
    iteration: int
    config: dict[str, Any]
    model: dict[str, Any]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint folder; any missing, truncated or unreadable file raises."""
    match = _STEP.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (step-XXXXXXX)")

    def load(name: str) -> Any:
        return torch.load(path / name, map_location="cpu", weights_only=True)

    trainer = load(TRAINER_FILE)
    if trainer.get("iteration") != int(match.group(1)):
        raise ValueError(
            f"{path / TRAINER_FILE} holds iteration {trainer.get('iteration')}, not {match.group(1)}"
        )
    config = yaml.safe_load((path / CONFIG_FILE).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_FILE} is not a config mapping")
    return LoadedCheckpoint(
        path, trainer["iteration"], config, load(MODEL_FILE), load(OPTIMIZER_FILE), trainer
    )


def shape_mismatches(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> str:
    """The tensors missing from ``found``, unexpected in it or of another shape than ``expected``,
    a few of each, as one line; empty when the two agree."""
    mismatches = {
        "missing": sorted(expected.keys() - found.keys()),
        "unexpected": sorted(found.keys() - expected.keys()),
        "wrong shape": [
            f"{name} {tuple(found[name])} vs {tuple(expected[name])}"
            for name in sorted(found.keys() & expected.keys())
            if tuple(found[name]) != tuple(expected[name])
        ],
    }
    return "; ".join(
        f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
        for label, names in mismatches.items()
        if names
    )


def check_resumable(
    checkpoint: LoadedCheckpoint,
    current_config: Mapping[str, Any],
    expected_shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Raise CheckpointError, before anything is loaded, when the checkpoint's networks cannot be this
    run's: a different ``model``/``heads`` section (named key by key), or parameters whose names or
    shapes differ (other keys shape them too: iBOT on or off, Gram on or off, the global crop size)."""
    differences = architecture_differences(checkpoint.config, current_config)
    if differences:
        raise CheckpointError(
            f"cannot resume from {checkpoint.path}: it was trained with a different architecture "
            f"({describe_differences(differences)}); set these keys back to the checkpoint's values, or "
            "choose a new output_dir to start another run"
        )
    details = shape_mismatches(
        {name: tuple(tensor.shape) for name, tensor in checkpoint.model.items()}, expected_shapes
    )
    if details:
        raise CheckpointError(
            f"cannot resume from {checkpoint.path}: its networks do not fit this config ({details}); "
            "compare losses.ibot_weight, heads.separate_ibot_head, gram.enabled and "
            f"data.augment.global_crop_size with {checkpoint.path / CONFIG_FILE}, or choose a new output_dir"
        )


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_durably(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with open(path, mode) as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


class Checkpointer:
    """The checkpoints folder of a run: when to save, atomic writes, retention and resume candidates.

    Only the writer (rank 0) calls ``save`` and ``set_aside``.
    """

    def __init__(self, root: Path, config: CheckpointConfig) -> None:
        self.root = root
        self.config = config

    def due(self, iteration: int, total_iters: int) -> bool:
        """A checkpoint after ``iteration`` iterations: every ``every`` and at the end."""
        every = self.config.every
        return iteration == total_iters or (every > 0 and iteration % every == 0)

    def step_folders(self) -> list[Path]:
        """Every ``step-*`` folder, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        folders = [path for path in self.root.iterdir() if path.is_dir() and _STEP.fullmatch(path.name)]
        return sorted(folders, key=lambda path: int(path.name.removeprefix("step-")))

    def complete(self) -> list[Path]:
        return [path for path in self.step_folders() if (path / MARKER_FILE).is_file()]

    def temporaries(self) -> list[Path]:
        """Leftovers of saves that did not finish (a killed run); never read, removed by the next save."""
        if not self.root.is_dir():
            return []
        return sorted(path for path in self.root.glob(".step-*.tmp"))

    def _remove_temporaries(self) -> None:
        for path in self.temporaries():
            shutil.rmtree(path, ignore_errors=True)

    def newest_readable(self) -> tuple[LoadedCheckpoint | None, list[Path]]:
        """The newest complete checkpoint that reads back, and the step folders newer than it that
        cannot be resumed (no ``COMPLETE`` marker, or a damaged file), each reported as a warning."""
        for path in self.temporaries():
            logger.warning("ignoring %s: a checkpoint whose save did not finish", path)
        unusable: list[Path] = []
        for path in reversed(self.step_folders()):
            if not (path / MARKER_FILE).is_file():
                logger.warning("skipping checkpoint %s: it has no %s marker (incomplete)", path, MARKER_FILE)
                unusable.append(path)
                continue
            try:
                return read_checkpoint(path), unusable
            except Exception as error:  # torch, zip, pickle, YAML and OS errors alike: the files are damaged
                logger.warning(
                    "skipping checkpoint %s: it cannot be read (%s: %s); falling back to the previous one",
                    path,
                    type(error).__name__,
                    error,
                )
                unusable.append(path)
        return None, unusable

    def set_aside(self, paths: Sequence[Path]) -> None:
        """Rename unusable step folders to ``step-XXXXXXX.unusable``: kept for inspection, but never
        resumed from, counted by retention, or overwritten by a save at the same iteration."""
        for path in paths:
            target = path.with_name(path.name + SET_ASIDE_SUFFIX)
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
            logger.warning("moved the unusable checkpoint %s to %s", path, target)

    def save(self, iteration: int, files: Mapping[str, Any], write_extras: Callable[[Path], None]) -> Path:
        """Write ``files`` (name -> object for torch.save) and what ``write_extras(folder)`` writes (the
        config, the export) into ``step-XXXXXXX``, atomically, then apply retention. On an error (a full
        disk: OSError) the temporary folder is removed, older checkpoints are untouched, and it is raised."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        final = self.root / step_name(iteration)
        temporary = self.root / f".{final.name}.tmp"
        try:
            temporary.mkdir()
            for name, payload in files.items():
                _write_durably(temporary / name, lambda file, payload=payload: torch.save(payload, file))
            write_extras(temporary)
            _write_durably(temporary / MARKER_FILE, lambda file: file.write(f"{iteration}\n"), mode="w")
            if final.exists():  # an earlier attempt at this iteration that was never resumed from
                shutil.rmtree(final)
            os.replace(temporary, final)
            _fsync_folder(self.root)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        self._apply_retention()
        return final

    def _apply_retention(self) -> None:
        folders = {int(path.name.removeprefix("step-")): path for path in self.complete()}
        kept = retained_iterations(folders, self.config.keep_last, self.config.keep_every)
        for iteration, path in folders.items():
            if iteration not in kept:
                (path / MARKER_FILE).unlink()  # first: a half-deleted folder never looks complete
                shutil.rmtree(path)
