"""Networks taken from another run's checkpoint when a run is built.

Three keys name such a checkpoint: ``checkpoint.init_from`` (the starting weights of a stage,
pretrain/stages.py), ``gram.teacher_checkpoint`` (the first Gram teacher of the refinement stage) and
``distill.teacher`` (the frozen teacher of a distillation, pretrain/distill.py). Each is a checkpoint
folder (``RUN/checkpoints/step-XXXXXXX``) or a run folder, which stands for its newest complete
checkpoint. Only ``model.pt`` (memory-mapped: nothing is read that is not copied) and ``config.yaml``
are read, never the optimizer.

The loading happens when the meta-architecture is built, so that a run resumed from its own
checkpoint simply overwrites these weights; built on the meta device (shape checks, the launcher's
pre-flight) everything is checked and nothing is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from pretrain.checkpoint import (
    CONFIG_FILE,
    MARKER_FILE,
    MODEL_FILE,
    Checkpointer,
    CheckpointError,
    shape_mismatches,
)
from pretrain.config import CheckpointConfig
from pretrain.export import EXPORT_CONFIG_FILE

__all__ = [
    "NOT_INHERITED",
    "init_networks",
    "load_part",
    "read_saved_config",
    "resolve_checkpoint",
]

# Parts of a meta-architecture's state that a next stage does not inherit: its Gram teacher is
# taken on its own schedule (gram.teacher_checkpoint) and a distillation teacher is named again.
NOT_INHERITED = ("gram_teacher.", "distill_teacher.")
CHECKPOINTS_FOLDER = "checkpoints"  # OUTPUT_DIR/checkpoints, as pretrain/train.py writes it


def resolve_checkpoint(path: Path, key: str) -> Path:
    """The complete checkpoint folder that ``path`` names (itself, or a run folder's newest)."""
    path = Path(path)
    if (path / MARKER_FILE).is_file():
        return path
    complete = Checkpointer(path / CHECKPOINTS_FOLDER, CheckpointConfig()).complete()
    if complete:
        return complete[-1]
    if path.is_file() or (path / EXPORT_CONFIG_FILE).is_file():
        hint = (
            "a teacher export holds the backbone only, and the heads are needed as well; name the "
            "checkpoint folder it came from (RUN/checkpoints/step-XXXXXXX) or its run folder"
        )
    elif not path.exists():
        hint = "it does not exist"
    else:
        hint = (
            f"it is neither a checkpoint folder (with a {MARKER_FILE} marker) nor a run folder with "
            f"complete checkpoints in {CHECKPOINTS_FOLDER}/"
        )
    raise CheckpointError(f"{key}={path}: {hint}; set {key} to a checkpoint folder or a run folder")


def read_saved_config(folder: Path) -> dict[str, Any]:
    """The resolved config a checkpoint was written with, as plain YAML data."""
    config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a config mapping")
    return config


def read_model_state(folder: Path) -> dict[str, Tensor]:
    """The meta-architecture's state dict of a checkpoint, memory-mapped on the CPU."""
    try:
        return torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"cannot read {folder / MODEL_FILE}: {error}") from error


def take_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix``, with the prefix removed (``teacher.backbone.`` -> a backbone)."""
    return {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def _is_meta(module: nn.Module) -> bool:
    return any(tensor.is_meta for tensor in module.state_dict().values())


def load_part(module: nn.Module, folder: Path, prefix: str, key: str) -> None:
    """Copy the ``prefix`` part of checkpoint ``folder``'s state (``teacher.backbone.``: its EMA
    teacher's backbone) into ``module``, after checking that every tensor name and shape agree; on the
    meta device only check. ``key`` is the config key that named the checkpoint, for the message."""
    state = take_prefix(read_model_state(folder), prefix)
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    details = shape_mismatches({name: tuple(tensor.shape) for name, tensor in state.items()}, expected)
    if details:
        raise CheckpointError(
            f"{key}: the {prefix}* weights of {folder} do not fit the networks of this config ({details}); "
            f"compare the model and heads sections with {folder / CONFIG_FILE}, or name another checkpoint"
        )
    if not _is_meta(module):
        module.load_state_dict(state)


def init_networks(model: nn.Module, source: Path) -> Path:
    """Start ``model`` (a meta-architecture) from the networks and centers of the checkpoint that
    ``source`` names (``checkpoint.init_from``), all but its Gram and distillation teachers.
    Returns the checkpoint folder used."""
    folder = resolve_checkpoint(source, "checkpoint.init_from")
    inherited = {
        name: tensor
        for name, tensor in read_model_state(folder).items()
        if not name.startswith(NOT_INHERITED)
    }
    targets = {
        name: tensor for name, tensor in model.state_dict().items() if not name.startswith(NOT_INHERITED)
    }
    details = shape_mismatches(
        {name: tuple(tensor.shape) for name, tensor in inherited.items()},
        {name: tuple(tensor.shape) for name, tensor in targets.items()},
    )
    if details:
        raise CheckpointError(
            f"checkpoint.init_from: the networks of {folder} do not fit this config ({details}); a stage "
            f"keeps the model and heads of the stage before it: compare with {folder / CONFIG_FILE}"
        )
    if not _is_meta(model):
        model.load_state_dict(inherited, strict=False)
    return folder
