"""The teacher in timm's VisionTransformer gives the same features, where the architecture maps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.eval.features import EvalInputError, load_backbone
from pretrain.eval.timm_convert import load_timm, to_timm
from pretrain.models import build_vit


@pytest.mark.parametrize(
    "options",
    [{}, {"n_registers": 4}, {"layerscale_init": 1e-5, "n_registers": 1}],
    ids=["plain", "registers", "layerscale"],
)
def test_timm_model_gives_the_same_features(options: dict) -> None:
    torch.manual_seed(0)
    ours = build_vit("vit_test", patch_size=8, img_size=32, **options).eval()
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if name.endswith("gamma"):  # LayerScale at its 1e-5 init would hide the blocks' contribution
                parameter.uniform_(0.5, 1.5)
    converted = to_timm(ours)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours.forward_features(images)
        tokens = converted.forward_features(images)
        torch.testing.assert_close(converted(images), expected["cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 0], expected["cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1 + ours.n_registers :], expected["patches"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1 : 1 + ours.n_registers], expected["registers"], atol=1e-5, rtol=1e-5)


def test_teacher_export_loads_into_timm(teacher_export: Path) -> None:
    ours = load_backbone(teacher_export).model
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_timm(teacher_export)(images), ours(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"pos_embed": "rope"}, "uses RoPE"), ({"ffn": "swiglu"}, "feed-forward network is SwiGLUFFN")],
)
def test_backbones_timm_cannot_hold_are_refused(options: dict, message: str) -> None:
    with pytest.raises(EvalInputError, match=message):
        to_timm(build_vit("vit_test", patch_size=8, img_size=32, **options))
