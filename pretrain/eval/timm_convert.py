"""The teacher backbone as a timm ``VisionTransformer``, for tools that speak timm.

It maps where the architecture does: learned positions and the plain MLP feed-forward network,
with or without registers and LayerScale. RoPE (v3) and SwiGLU (ViT-giant) backbones have no timm
``VisionTransformer`` equivalent and are refused. The conversion is exact at the backbone's reference
image size (tests/pretrain/eval/test_timm_convert.py); at other sizes both interpolate the learned
positions bicubically, but timm's resampling differs in detail.

    from pretrain.eval.timm_convert import load_timm
    model = load_timm("OUTPUT_DIR/teacher_backbone.safetensors")  # model(x) is the CLS embedding

Needs timm (``pip install timm``; in the project's ``dev`` extras).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from pretrain.eval.features import EvalInputError, load_backbone
from pretrain.models import VisionTransformer
from pretrain.models.layers import LayerScale, Mlp

try:
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
except ImportError as error:
    raise ImportError("pretrain.eval.timm_convert needs timm: pip install timm") from error

__all__ = ["load_timm", "timm_state_dict", "to_timm"]


def timm_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our backbone's weights under timm's names, for timm's ``no_embed_class`` layout.

    Ours adds a learned position to the CLS token and to each patch, none to the registers; timm's
    ``no_embed_class`` layout adds positions to the patches only, so the CLS position is folded into
    the CLS token. Registers are timm's ``reg_token``; the iBOT mask token (training only) is dropped.
    Every other name is the same in both.
    """
    converted: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == "mask_token":
            continue
        if name == "cls_token":
            converted[name] = tensor + state["pos_embed"][:, :1]
        elif name == "pos_embed":
            converted[name] = tensor[:, 1:]
        elif name == "register_tokens":
            converted["reg_token"] = tensor
        else:
            converted[name] = tensor
    return converted


def to_timm(backbone: VisionTransformer) -> TimmVisionTransformer:
    """A timm ``VisionTransformer`` with ``backbone``'s weights, in eval mode, without a classifier:
    ``forward`` returns the normed CLS token, ``forward_features`` the normed tokens [CLS, registers,
    patches], as ``backbone.forward_features`` does."""
    if backbone.pos_embed is None:
        raise EvalInputError(
            "this backbone uses RoPE (model.pos_embed=rope), which timm's VisionTransformer does not have; "
            "only learned-position backbones (pos_embed=learned) convert"
        )
    first = backbone.blocks[0]
    if not isinstance(first.mlp, Mlp):
        raise EvalInputError(
            f"this backbone's feed-forward network is {type(first.mlp).__name__}; only the plain MLP "
            "(model.ffn=mlp) maps onto timm's VisionTransformer"
        )
    timm_model = TimmVisionTransformer(
        img_size=backbone.ref_grid[0] * backbone.patch_size,
        patch_size=backbone.patch_size,
        in_chans=backbone.patch_embed.proj.in_channels,
        num_classes=0,
        global_pool="token",
        embed_dim=backbone.embed_dim,
        depth=backbone.depth,
        num_heads=backbone.num_heads,
        mlp_ratio=first.mlp.fc1.out_features / backbone.embed_dim,
        qkv_bias=first.attn.qkv.bias is not None,
        # Any value creates timm's LayerScale; the trained gammas are loaded below.
        init_values=first.ls1.init_value if isinstance(first.ls1, LayerScale) else None,
        no_embed_class=True,
        reg_tokens=backbone.n_registers,
        dynamic_img_size=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=backbone.norm.eps),
    )
    try:
        timm_model.load_state_dict(timm_state_dict(backbone.state_dict()))
    except RuntimeError as error:
        raise EvalInputError(f"the backbone does not map onto timm's VisionTransformer: {error}") from error
    return timm_model.eval()


def load_timm(path: str | Path) -> TimmVisionTransformer:
    """The teacher of a teacher export or checkpoint folder (``load_backbone``) as a timm model."""
    return to_timm(load_backbone(path).model)
