"""Distillation: a frozen, larger teacher from another run trains a smaller student.

As in DINOv2's small models and the DINOv3 family (shared/RECIPE.md): the teacher's DINO and iBOT
heads give the targets, the student trains with the same losses on whole crops (no masking, no
stochastic depth) and learns the iBOT targets at every patch of both global crops; the EMA teacher of
the meta-architecture becomes an EMA of the student, which is the exported model.

``distill.teacher`` names a checkpoint folder or a run folder (pretrain/warm_start.py); its
``config.yaml`` says how to build the teacher and its ``teacher.*`` weights (the EMA teacher's
backbone and heads) are loaded. The teacher is part of the meta-architecture's state (frozen, in eval
mode), so a checkpoint of the student holds it too.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pretrain.checkpoint import CONFIG_FILE, CheckpointError
from pretrain.config import PretrainConfig
from pretrain.config_io import ConfigError, load_config
from pretrain.warm_start import load_part, resolve_checkpoint

__all__ = ["TEACHER_PREFIX", "load_teacher", "teacher_config"]

KEY = "distill.teacher"
TEACHER_PREFIX = "teacher."  # the EMA teacher of the teacher's own run


def teacher_config(config: PretrainConfig) -> tuple[PretrainConfig, Path]:
    """The config the teacher was trained with and its checkpoint folder; raises CheckpointError when
    its heads cannot teach this student (another number of prototypes, another patch grid)."""
    if config.distill.teacher is None:
        raise ValueError("teacher_config needs distill.teacher")
    folder = resolve_checkpoint(config.distill.teacher, KEY)
    try:
        teacher = load_config(PretrainConfig, folder / CONFIG_FILE)
    except (ConfigError, OSError) as error:
        raise CheckpointError(
            f"{KEY}: cannot read the teacher's config {folder / CONFIG_FILE}: {error}"
        ) from error
    problems = []
    if teacher.heads.out_dim != config.heads.out_dim:
        problems.append(
            f"heads.out_dim is {config.heads.out_dim} but the teacher's heads have {teacher.heads.out_dim} "
            f"prototypes: set heads.out_dim={teacher.heads.out_dim}"
        )
    if config.losses.ibot_weight > 0 and teacher.model.patch_size != config.model.patch_size:
        problems.append(
            f"iBOT pairs student and teacher patches, but model.patch_size is {config.model.patch_size} and "
            f"the teacher's {teacher.model.patch_size}: set model.patch_size={teacher.model.patch_size}"
        )
    if config.losses.dino_weight > 0 and teacher.losses.dino_weight == 0 and teacher.heads.separate_ibot_head:
        problems.append(
            "the teacher has no DINO head (it trained without the DINO loss): set losses.dino_weight=0"
        )
    if problems:
        raise CheckpointError(f"{KEY}={config.distill.teacher} ({folder}): " + "; ".join(problems))
    return teacher, folder


def load_teacher(networks: nn.ModuleDict, folder: Path) -> None:
    """Copy the EMA teacher of checkpoint ``folder`` (backbone and heads) into ``networks`` and freeze it."""
    load_part(networks, folder, TEACHER_PREFIX, KEY)
    networks.requires_grad_(False)
