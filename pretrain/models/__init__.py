"""Backbones and heads for DINO-family pretraining, with a small name registry.

``build_vit("vit_small", patch_size=14, n_registers=4)`` builds a ViT-S/14 with 4 registers; every
keyword of ``VisionTransformer`` can be overridden.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from .heads import DINOHead
from .vit import Features, VisionTransformer

_MODELS: dict[str, dict[str, Any]] = {
    "vit_test": {"embed_dim": 48, "depth": 2, "num_heads": 2},  # for unit tests only
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_giant": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn": "swiglu"},  # DINOv2 "giant2"
}

_VIT_ARGS = tuple(name for name in inspect.signature(VisionTransformer.__init__).parameters if name != "self")


def list_models() -> list[str]:
    """Registered backbone names, smallest first."""
    return list(_MODELS)


def build_vit(name: str, **overrides: Any) -> VisionTransformer:
    """Build a registered ViT; ``overrides`` replace any ``VisionTransformer`` constructor argument.

    Wrap the call in ``with torch.device("meta"):`` to build without allocating memory.
    """
    if name not in _MODELS:
        closest = difflib.get_close_matches(name, _MODELS, n=1, cutoff=0.0)
        raise ValueError(
            f"unknown model {name!r}; did you mean {closest[0]!r}? Valid names: {', '.join(_MODELS)}"
        )
    unknown = sorted(set(overrides) - set(_VIT_ARGS))
    if unknown:
        raise TypeError(f"unknown override(s) {unknown} for {name!r}; valid keys: {', '.join(_VIT_ARGS)}")
    return VisionTransformer(**{**_MODELS[name], **overrides})


__all__ = ["DINOHead", "Features", "VisionTransformer", "build_vit", "list_models"]
