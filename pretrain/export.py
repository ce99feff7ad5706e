"""The teacher backbone on its own, in files that load without the training code.

Two forms of the same weights:

- ``teacher_backbone.safetensors`` + ``teacher_backbone.json``: the weights in safetensors (no pickle,
  readable from any framework) and ``{"build_vit": keyword arguments, "iteration": n}``; written at
  every checkpoint (inside its folder) and at the end (in OUTPUT_DIR).
- ``teacher_backbone.pt``: ``{'config': build_vit keyword arguments, 'state_dict': weights}`` with
  torch.save, at the end, for ``curation/embed.py``'s ``dino:`` embedder.

Rebuild either with ``pretrain.models.build_vit(**config).load_state_dict(weights)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "EXPORT_CONFIG_FILE",
    "EXPORT_WEIGHTS_FILE",
    "TORCH_EXPORT_FILE",
    "TEACHER_BACKBONE_PREFIX",
    "teacher_backbone_state",
    "write_safetensors_export",
    "write_torch_export",
]

EXPORT_WEIGHTS_FILE = "teacher_backbone.safetensors"
EXPORT_CONFIG_FILE = "teacher_backbone.json"
TORCH_EXPORT_FILE = "teacher_backbone.pt"
TEACHER_BACKBONE_PREFIX = "teacher.backbone."  # of the meta-architecture's state dict


def teacher_backbone_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The teacher backbone's weights, named as in ``build_vit(...).state_dict()``, from the full
    state dict of the meta-architecture."""
    prefix = TEACHER_BACKBONE_PREFIX
    return {name[len(prefix) :]: tensor for name, tensor in model_state.items() if name.startswith(prefix)}


def _replace(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder and rename: never half-written."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_safetensors_export(
    folder: Path, backbone_state: Mapping[str, Tensor], spec: Mapping[str, Any], iteration: int
) -> None:
    """``teacher_backbone.safetensors`` and ``teacher_backbone.json`` in ``folder``."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone_state.items()}
    _replace(
        folder / EXPORT_WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": "pt"})
    )
    text = json.dumps({"build_vit": dict(spec), "iteration": iteration}, indent=2) + "\n"
    _replace(folder / EXPORT_CONFIG_FILE, lambda path: path.write_text(text))


def write_torch_export(path: Path, backbone_state: Mapping[str, Tensor], spec: Mapping[str, Any]) -> None:
    """``{'config': spec, 'state_dict': weights}`` with torch.save (the format curation/embed.py reads)."""
    state_dict = {name: tensor.detach().cpu() for name, tensor in backbone_state.items()}
    _replace(path, lambda temporary: torch.save({"config": dict(spec), "state_dict": state_dict}, temporary))
