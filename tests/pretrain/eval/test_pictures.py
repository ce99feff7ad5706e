"""Attention maps and PCA colours against independent computations, and the PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.eval import pictures
from pretrain.eval.pictures import cls_attention_maps, compute_pictures, pca_colours, save_pictures
from pretrain.models import build_vit


@pytest.mark.parametrize("n_registers", [0, 2])
def test_cls_attention_maps_match_the_last_blocks_softmax(n_registers: int) -> None:
    torch.manual_seed(0)
    model = build_vit("vit_test", patch_size=8, img_size=32, n_registers=n_registers).eval()
    images = torch.randn(2, 3, 32, 48)  # a 4 x 6 patch grid
    captured = {}
    model.blocks[-1].norm1.register_forward_hook(lambda module, args, out: captured.setdefault("x", out))
    maps = cls_attention_maps(model, images)
    attention = model.blocks[-1].attn
    q, k, _ = attention.qkv(captured["x"]).reshape(2, -1, 3, model.num_heads, attention.head_dim).unbind(2)
    logits = torch.einsum("bhd,bnhd->bhn", q[:, 0], k) * attention.head_dim**-0.5  # from the CLS query
    expected = logits.softmax(dim=-1)[:, :, 1 + n_registers :].reshape(2, model.num_heads, 4, 6)
    torch.testing.assert_close(maps, expected)


def test_pca_colours_follow_the_first_components() -> None:
    """Two groups of tokens apart along one direction: the first component (red) separates them, and
    each channel is the min-max scaled projection on a principal axis of an independent eigensolver."""
    generator = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    groups = torch.arange(2 * 12) % 2
    tokens = groups[:, None] * 10.0 * direction + torch.randn(24, 16, generator=generator) * 0.5
    colours = pca_colours(tokens.reshape(2, 12, 16), (3, 4)).reshape(24, 3)
    red = colours[:, 0]
    assert (red[groups == 0].max() < 0.3 and red[groups == 1].min() > 0.7) or (
        red[groups == 1].max() < 0.3 and red[groups == 0].min() > 0.7
    )
    centred = tokens.double().numpy() - tokens.double().numpy().mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    for channel in range(3):
        projected = centred @ vectors[:, -1 - channel]  # eigenvalues ascending: the largest last
        scaled = (projected - projected.min()) / (projected.max() - projected.min())
        got = colours[:, channel].double().numpy()
        assert np.allclose(got, scaled, atol=1e-4) or np.allclose(got, 1 - scaled, atol=1e-4)
    assert colours.min() >= 0 and colours.max() <= 1


def test_pictures_are_written_as_png(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_vit("vit_test", patch_size=8, img_size=32).eval()
    paths = save_pictures(compute_pictures(model, torch.randn(3, 3, 32, 32)), tmp_path / "step")
    attention, pca = (Image.open(path) for path in paths)
    assert [path.name for path in paths] == ["attention.png", "pca.png"]
    # 3 images x (image + 2 heads) panels of 1.6 inches at 100 dpi; 2 rows x 3 images.
    assert attention.size == (480, 480) and pca.size == (480, 320)


def test_command_draws_the_first_images_of_a_folder(teacher_export: Path, image_folders, tmp_path: Path) -> None:
    arguments = ["--checkpoint", str(teacher_export), "--images", str(image_folders[0]), "--max-images", "2"]
    assert pictures.main([*arguments, "--output-dir", str(tmp_path / "pictures"), "--random-baseline"]) == 0
    for folder in ("pictures", "pictures/random"):
        assert Image.open(tmp_path / folder / "pca.png").size == (320, 320)
    trained, random = (Image.open(tmp_path / folder / "attention.png") for folder in ("pictures", "pictures/random"))
    assert trained.tobytes() != random.tobytes()
    assert pictures.main(["--checkpoint", str(teacher_export), "--images", str(tmp_path / "none")]) == 2
