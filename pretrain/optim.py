"""AdamW parameter groups with layer-wise lr decay, per-step schedule application and per-module clipping.

Groups carry multipliers, not values: ``apply_schedules`` turns the scheduled lr and weight decay of
the current iteration into each group's ``lr`` and ``weight_decay`` before every optimizer step.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

__all__ = ["apply_schedules", "build_optimizer", "clip_grad_norms", "param_groups"]

# Backbone parameters before the first block: layer 0 for layer-wise lr decay.
_EMBEDDING_NAMES = frozenset({"patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens"})
# Learned tokens and positions: decaying them towards zero would only erase what they encode.
_TOKEN_NAMES = frozenset({"pos_embed", "cls_token", "mask_token", "register_tokens"})
# Name components added by torch.compile, activation checkpointing and FSDP1 wrappers.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.")


def _canonical_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _depth(module: nn.Module) -> int:
    """Number of transformer blocks L (0 for modules without ``blocks``, e.g. heads)."""
    blocks = getattr(module, "blocks", None)
    return len(blocks) if isinstance(blocks, nn.ModuleList) else 0


def _layer_id(name: str, depth: int) -> int:
    """0 for embeddings and tokens, i + 1 for ``blocks.i``, L + 1 for the rest (final norm, heads)."""
    if name.split(".", 1)[0] in _EMBEDDING_NAMES:
        return 0
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) + 1 if match else depth + 1


def _weight_decay_exempt(name: str, param: nn.Parameter) -> bool:
    """No weight decay for biases, norm weights and LayerScale gammas (all 1-D), tokens and positions."""
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".", 1)[0] in _TOKEN_NAMES


def param_groups(
    model_modules: dict[str, nn.Module], layer_decay: float = 1.0, patch_embed_lr_mult: float = 0.2
) -> list[dict[str, Any]]:
    """AdamW parameter groups for the trainable parameters of ``model_modules`` (backbone, heads).

    lr multiplier = ``layer_decay ** (L + 1 - layer_id)`` (× ``patch_embed_lr_mult`` for the patch
    embedding), where L is the module's number of blocks; heads therefore get 1. ``wd_multiplier`` is 0
    for biases, 1-D parameters (norm weights, LayerScale gammas) and learned tokens/positions, else 1.
    Parameters of a head's ``last_layer`` get ``is_last_layer=True``. Parameters with identical
    settings share one group; groups keep the order in which their first parameter appears, so the
    grouping is the same on every rank and after a resume. A parameter reachable from several modules
    (a DINO head shared with iBOT) is counted once; frozen parameters are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for module_name, module in model_modules.items():
        depth = _depth(module)
        for raw_name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = _canonical_name(raw_name)
            lr_multiplier = layer_decay ** (depth + 1 - _layer_id(name, depth))
            if name.startswith("patch_embed."):
                lr_multiplier *= patch_embed_lr_mult
            wd_multiplier = 0.0 if _weight_decay_exempt(name, param) else 1.0
            is_last_layer = "last_layer" in name.split(".")
            key = (lr_multiplier, wd_multiplier, is_last_layer)
            if key not in groups:
                suffix = "_last_layer" if is_last_layer else ""
                groups[key] = {
                    "name": f"lr{lr_multiplier:.4g}_wd{wd_multiplier:g}{suffix}",
                    "params": [],
                    "param_names": [],  # torch's own key for named groups, kept in optimizer state dicts
                    "lr_multiplier": lr_multiplier,
                    "wd_multiplier": wd_multiplier,
                    "is_last_layer": is_last_layer,
                }
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(f"{module_name}.{raw_name}")
    return list(groups.values())


def apply_schedules(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr_mult: float = 1.0
) -> None:
    """Set every group's lr and weight decay for this iteration from the scheduled values.

    ``last_layer_lr_mult`` (0 during the first epoch) freezes the heads' last layers: with lr 0
    AdamW neither steps nor decays them.
    """
    for group in optimizer.param_groups:
        group_lr = lr * group["lr_multiplier"]
        if group["is_last_layer"]:
            group_lr *= last_layer_lr_mult
        group["lr"] = group_lr
        group["weight_decay"] = wd * group["wd_multiplier"]


def clip_grad_norms(modules: dict[str, nn.Module], max_norm: float | None) -> dict[str, float]:
    """Clip each module's gradients to ``max_norm`` separately; returns each module's pre-clip norm.

    Per module (backbone, each head) so that a head's large gradient cannot shrink the backbone's
    update. ``max_norm=None`` measures without clipping.
    """
    limit = float("inf") if max_norm is None else max_norm
    norms: dict[str, float] = {}
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        # Under FSDP2 the norm is a DTensor; its full value is the same on every rank.
        norms[name] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    return norms


def build_optimizer(
    groups: list[dict[str, Any]], betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over ``groups``; fused when every parameter is on CUDA (``fused=None``), foreach otherwise.

    lr and weight decay start at 0: ``apply_schedules`` sets them before each step.
    """
    if fused is None:
        fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(
        groups, lr=0.0, betas=betas, weight_decay=0.0, fused=fused, foreach=None if fused else True
    )
