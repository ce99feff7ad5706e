"""Contract tests for the ViT backbones, their layers and the DINO head (CPU, tiny models)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pretrain.models import DINOHead, VisionTransformer, build_vit, list_models
from pretrain.models.layers import (
    Attention,
    DropPath,
    LayerScale,
    RotaryEmbedding2d,
    SwiGLUFFN,
    apply_rope,
)

CONFIGS = [
    {"pos_embed": pos, "ffn": ffn, "n_registers": regs, "patch_size": patch}
    for pos, ffn, regs, patch in itertools.product(("learned", "rope"), ("mlp", "swiglu"), (0, 4), (14, 16))
]
CONFIG_IDS = [f"{c['pos_embed']}-{c['ffn']}-reg{c['n_registers']}-p{c['patch_size']}" for c in CONFIGS]
GRID = (4, 3)  # patches per crop (h, w): non-square to catch transposed grids


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images(model: VisionTransformer, batch: int = 2, grid: tuple[int, int] = GRID) -> torch.Tensor:
    return torch.randn(batch, 3, grid[0] * model.patch_size, grid[1] * model.patch_size)


def _masks(batch: int, num_patches: int) -> torch.Tensor:
    masks = torch.zeros(batch, num_patches, dtype=torch.bool)
    masks[0, [0, 2, 5]] = True  # the second image stays unmasked, as in iBOT batches
    return masks


def _all_outputs(features: dict) -> list[torch.Tensor]:
    return [features[k] for k in ("cls", "registers", "patches", "prenorm")]


def _set_fused(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_forward_features_shapes_and_finite(config: dict) -> None:
    model = build_vit("vit_test", **config)
    x = _images(model)
    num_patches = GRID[0] * GRID[1]
    features = model.forward_features(x, _masks(2, num_patches))
    dim, regs = model.embed_dim, model.n_registers
    assert features["cls"].shape == (2, dim)
    assert features["registers"].shape == (2, regs, dim)
    assert features["patches"].shape == (2, num_patches, dim)
    assert features["prenorm"].shape == (2, 1 + regs + num_patches, dim)
    assert features["grid"] == GRID
    assert all(torch.isfinite(t).all() for t in _all_outputs(features))
    model.eval()
    assert torch.equal(model(x), model.forward_features(x)["cls"])


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_every_parameter_receives_gradient(config: dict) -> None:
    model = build_vit("vit_test", **config)
    x = _images(model)
    for masks in (None, _masks(2, GRID[0] * GRID[1])):
        model.zero_grad(set_to_none=True)
        outputs = _all_outputs(model.forward_features(x, masks))
        # Random weights: a plain sum of LayerNorm outputs has zero gradient with respect to its input.
        loss = sum((out * torch.randn_like(out)).sum() for out in outputs)
        loss.backward()
        for name, param in model.named_parameters():
            if name == "mask_token" and masks is None:
                assert param.grad is None, "mask token used without masks"
                continue
            assert param.grad is not None, f"{name} got no gradient (masks={masks is not None})"
            assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_fused_and_explicit_attention_agree(config: dict) -> None:
    model = build_vit("vit_test", **config).eval()
    x = _images(model)
    fused = model.forward_features(x)
    _set_fused(model, False)
    explicit = model.forward_features(x)
    for a, b in zip(_all_outputs(fused), _all_outputs(explicit)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    weights = model.get_last_self_attention(x)
    num_tokens = 1 + model.n_registers + GRID[0] * GRID[1]
    assert weights.shape == (2, model.num_heads, num_tokens, num_tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, model.num_heads, num_tokens))


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_masked_patch_pixels_do_not_reach_any_output(config: dict) -> None:
    model = build_vit("vit_test", **config).eval()
    p = model.patch_size
    x = _images(model)
    masks = _masks(2, GRID[0] * GRID[1])
    reference = model.forward_features(x, masks)

    changed = x.clone()
    for index in masks[0].nonzero().flatten().tolist():
        row, col = divmod(index, GRID[1])
        changed[0, :, row * p : (row + 1) * p, col * p : (col + 1) * p] = torch.randn(3, p, p)
    for a, b in zip(_all_outputs(reference), _all_outputs(model.forward_features(changed, masks))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    # Sanity: without the masks the same pixel change does reach the outputs.
    unmasked = model.forward_features(x)["cls"]
    assert not torch.allclose(unmasked[0], model.forward_features(changed)["cls"][0])
    assert not torch.allclose(unmasked[0], reference["cls"][0])
    torch.testing.assert_close(unmasked[1], reference["cls"][1], atol=1e-6, rtol=0)


def test_mask_token_replaces_patch_before_position_is_added() -> None:
    model = build_vit("vit_test", n_registers=4, img_size=64).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    block_inputs = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: block_inputs.append(args[0]))
    masks = _masks(2, 16)
    model.forward_features(_images(model, grid=(4, 4)), masks)
    masked = masks[0].nonzero().flatten()
    tokens = block_inputs[0][0, model.num_prefix_tokens :][masked]
    torch.testing.assert_close(tokens, model.mask_token + model.pos_embed[0, 1:][masked])


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_list_input_equals_per_tensor_calls(config: dict) -> None:
    model = build_vit("vit_test", **config).eval()
    global_crops = _images(model, batch=2, grid=(4, 4))
    local_crops = _images(model, batch=3, grid=(2, 2))
    global_masks = _masks(2, 16)
    listed = model.forward_features([global_crops, local_crops], [global_masks, None])
    separate = [model.forward_features(global_crops, global_masks), model.forward_features(local_crops)]
    assert len(listed) == 2
    for got, want in zip(listed, separate):
        assert got["grid"] == want["grid"]
        for a, b in zip(_all_outputs(got), _all_outputs(want)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="masks"):
        model.forward_features([global_crops, local_crops], [global_masks])


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_meta_construction_then_init_weights(config: dict) -> None:
    with torch.device("meta"):
        model = build_vit("vit_test", **config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = build_vit("vit_test", **config)
    for (name, buffer), (_, fresh_buffer) in zip(model.named_buffers(), fresh.named_buffers()):
        assert torch.equal(buffer, fresh_buffer), name
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    assert torch.all(model.mask_token == 0)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    features = model.forward_features(_images(model), _masks(2, GRID[0] * GRID[1]))
    assert all(torch.isfinite(t).all() for t in _all_outputs(features))


def test_learned_pos_embed_interpolates_to_other_crop_sizes() -> None:
    model = build_vit("vit_test", patch_size=16, img_size=224).eval()
    assert model.ref_grid == (14, 14)
    for size in ((112, 112), (112, 224), (224, 224)):
        features = model.forward_features(torch.randn(1, 3, *size))
        assert features["grid"] == (size[0] // 16, size[1] // 16)
        assert features["patches"].shape[1] == (size[0] // 16) * (size[1] // 16)
        assert torch.isfinite(features["prenorm"]).all()

    # Orientation: an embedding that encodes only the row must still do so after resizing.
    with torch.no_grad():
        rows = torch.arange(14.0).repeat_interleave(14)
        model.pos_embed[0, 1:] = rows[:, None].expand(-1, model.embed_dim)
    resized = model._interpolated_pos_embed(model.pos_embed, 7, 5)[0, 1:, 0].reshape(7, 5)
    torch.testing.assert_close(resized, resized[:, :1].expand(-1, 5))
    assert torch.all(resized[1:, 0] > resized[:-1, 0])
    assert model._interpolated_pos_embed(model.pos_embed, 14, 14) is model.pos_embed


def test_rope_works_at_any_grid_and_leaves_prefix_tokens_alone() -> None:
    model = build_vit("vit_test", pos_embed="rope", n_registers=4).eval()
    assert model.pos_embed is None
    for grid in ((1, 1), (3, 5), (7, 7)):
        features = model.forward_features(_images(model, batch=1, grid=grid))
        assert features["patches"].shape[1] == grid[0] * grid[1]
        assert torch.isfinite(features["prenorm"]).all()

    rope = RotaryEmbedding2d(head_dim=8).eval()
    tables = rope(3, 5)
    assert tables[0].shape == (15, 8)
    q = torch.randn(2, 1, 5 + 15, 8)  # 5 prefix tokens (CLS + registers), then 15 patches
    rotated = apply_rope(q, tables)
    assert torch.equal(rotated[:, :, :5], q[:, :, :5])
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps norms
    assert not torch.allclose(rotated[:, :, 5:], q[:, :, 5:])


def test_rope_random_rescaling_only_in_train_mode() -> None:
    rope = RotaryEmbedding2d(head_dim=8, rescale_range=(0.5, 2.0))
    rope.train()
    assert not torch.equal(rope(4, 4)[0], rope(4, 4)[0])
    rope.eval()
    assert torch.equal(rope(4, 4)[0], rope(4, 4)[0])
    fixed = RotaryEmbedding2d(head_dim=8, rescale_range=None).train()
    assert torch.equal(fixed(4, 4)[0], rope(4, 4)[0])

    model = build_vit("vit_test", pos_embed="rope").train()
    x = _images(model)
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_image_size_not_divisible_by_patch_raises() -> None:
    model = build_vit("vit_test", patch_size=16)
    with pytest.raises(ValueError, match=r"30x32.*16"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="masks"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("name", "published"), [("vit_small", 22e6), ("vit_base", 86e6), ("vit_large", 304e6)]
)
def test_parameter_counts_match_published(name: str, published: float) -> None:
    with torch.device("meta"):
        model = build_vit(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(published, rel=0.05)


def test_registry() -> None:
    assert list_models() == ["vit_test", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant"]
    with torch.device("meta"):
        giant = build_vit("vit_giant", patch_size=14, n_registers=4)
    assert (giant.embed_dim, giant.depth, giant.num_heads, giant.patch_size) == (1536, 40, 24, 14)
    assert isinstance(giant.blocks[0].mlp, SwiGLUFFN)
    with pytest.raises(ValueError, match="vit_small") as error:
        build_vit("vit_smal")
    assert "vit_large" in str(error.value)  # the valid names are listed too
    with pytest.raises(TypeError, match="patch_size"):
        build_vit("vit_test", patchsize=14)


def test_drop_path() -> None:
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    out = drop(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # whole samples kept or dropped
    assert 0 < (per_sample[:, 0] == 0).sum() < 64

    model = build_vit("vit_tiny", depth=5, drop_path_rate=0.2)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_layerscale_and_swiglu_widths() -> None:
    model = build_vit("vit_test")
    assert isinstance(model.blocks[0].ls1, LayerScale)
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    assert isinstance(build_vit("vit_test", layerscale_init=None).blocks[0].ls1, nn.Identity)
    for dim, hidden in ((48, 128), (50, 136), (384, 1024), (1536, 4096)):
        with torch.device("meta"):
            assert SwiGLUFFN(dim).hidden_features == hidden


@pytest.mark.parametrize("weight_norm_last_layer", [True, False])
def test_dino_head(weight_norm_last_layer: bool) -> None:
    head = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16, weight_norm_last_layer=weight_norm_last_layer)
    x = torch.randn(5, 7, 48)
    out = head(x)
    assert out.shape == (5, 7, 100)
    assert torch.isfinite(out).all()
    assert parametrize.is_parametrized(head.last_layer, "weight") == weight_norm_last_layer
    if weight_norm_last_layer:
        magnitude = head.last_layer.parametrizations.weight.original0
        assert not magnitude.requires_grad
        torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(100))
        # Unit prototypes and a unit bottleneck: logits are cosine similarities.
        assert out.abs().max() <= 1 + 1e-5
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)

    with torch.device("meta"):
        meta_head = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16)
    meta_head.to_empty(device="cpu")
    meta_head.reset_parameters()
    assert torch.isfinite(meta_head(x)).all()
