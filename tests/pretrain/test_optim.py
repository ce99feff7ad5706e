"""Schedules (hand-checked values, resume) and AdamW groups (layer/weight decay, freezing, clipping)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.config_io import load_config, save_config
from pretrain.models import DINOHead, build_vit
from pretrain.optim import apply_schedules, build_optimizer, clip_grad_norms, param_groups
from pretrain.schedules import (
    ScheduleConfig,
    Schedules,
    linear_ramp,
    scaled_lr,
    warmup_constant,
    warmup_cosine,
)

# ---------------------------------------------------------------------------------------------------
# Schedules


def test_warmup_cosine_hand_checked_values() -> None:
    values = warmup_cosine(1.0, 0.2, total_iters=25, warmup_iters=4, start_warmup_value=0.1)
    assert len(values) == 25
    assert values[0] == pytest.approx(0.1)  # warm-up start
    assert values[2] == pytest.approx(0.55)  # halfway up the warm-up
    assert values[4] == pytest.approx(1.0)  # end of warm-up = start of the cosine
    assert values[14] == pytest.approx(0.6)  # cosine midpoint = (base + final) / 2
    assert values[-1] == pytest.approx(0.2)  # last = final
    assert np.all(np.diff(values[4:]) <= 0)


def test_warmup_cosine_freeze_span() -> None:
    values = warmup_cosine(1.0, 0.0, total_iters=12, warmup_iters=2, freeze_iters=3)
    np.testing.assert_allclose(values[:6], [0.0, 0.0, 0.0, 0.0, 0.5, 1.0])
    assert values[-1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="exceeds total_iters=4"):
        warmup_cosine(1.0, 0.0, total_iters=4, warmup_iters=3, freeze_iters=2)


def test_warmup_constant_and_linear_ramp() -> None:
    np.testing.assert_allclose(warmup_constant(2.0, total_iters=6, warmup_iters=4), [0, 0.5, 1, 1.5, 2, 2])
    temps = linear_ramp(0.04, 0.07, total_iters=8, ramp_iters=4)
    np.testing.assert_allclose(temps, [0.04, 0.0475, 0.055, 0.0625, 0.07, 0.07, 0.07, 0.07])
    gram = linear_ramp(0.0, 2.0, total_iters=6, ramp_iters=2, delay_iters=3)
    np.testing.assert_allclose(gram, [0, 0, 0, 0, 1, 2])
    np.testing.assert_allclose(linear_ramp(0.0, 1.0, total_iters=3, ramp_iters=10), [0, 0.1, 0.2])


def test_scaled_lr() -> None:
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.004, 4096) == pytest.approx(0.008)


SHORT = ScheduleConfig(epochs=4, iters_per_epoch=5, warmup_epochs=1, warmup_teacher_temp_epochs=2)


def test_cosine_schedules_from_config() -> None:
    sched = Schedules.from_config(SHORT, global_batch=256)
    assert sched.total_iters == 20
    peak = 0.004 * math.sqrt(256 / 1024)
    first, after_warmup, last = sched.at(0), sched.at(5), sched.at(19)
    assert first["lr"] == 0.0 and after_warmup["lr"] == pytest.approx(peak)
    assert last["lr"] == pytest.approx(1e-6)
    assert (first["weight_decay"], last["weight_decay"]) == pytest.approx((0.04, 0.4))
    assert (first["momentum"], last["momentum"]) == pytest.approx((0.992, 1.0))
    assert (first["teacher_temp"], sched.at(5)["teacher_temp"]) == pytest.approx((0.04, 0.055))
    assert sched.at(10)["teacher_temp"] == pytest.approx(0.07) and last["teacher_temp"] == pytest.approx(0.07)
    assert sched.at(4)["last_layer_lr_mult"] == 0.0 and after_warmup["last_layer_lr_mult"] == 1.0


def test_constant_schedules_from_config() -> None:
    config = ScheduleConfig(
        kind="constant", epochs=3, iters_per_epoch=4, warmup_epochs=1, momentum_start=0.994
    )
    sched = Schedules.from_config(config, global_batch=1024)
    np.testing.assert_allclose(sched.lr, [0, 0.001, 0.002, 0.003] + [0.004] * 8)
    np.testing.assert_allclose(sched.weight_decay, 0.04)
    np.testing.assert_allclose(sched.momentum, 0.994)


def test_resume_continues_schedules_exactly(tmp_path: Path) -> None:
    uninterrupted = Schedules.from_config(SHORT, global_batch=512)
    # A resumed run rebuilds its schedules from the config saved beside the checkpoint.
    save_config(SHORT, tmp_path / "config.yaml")
    resumed = Schedules.from_config(load_config(ScheduleConfig, tmp_path / "config.yaml", []), 512)
    for iteration in range(7, SHORT.total_iters):
        assert resumed.at(iteration) == uninterrupted.at(iteration)
    with pytest.raises(IndexError, match="outside the schedule of 20 iterations"):
        resumed.at(20)


# ---------------------------------------------------------------------------------------------------
# Parameter groups, schedule application, clipping


def _model() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    backbone = build_vit("vit_test", n_registers=2)  # depth 2
    head = DINOHead(48, 10, hidden_dim=16, bottleneck_dim=8)
    return {"backbone": backbone, "dino_head": head, "ibot_head": head}  # shared head, as in v2


def _settings(groups: list[dict]) -> dict[str, tuple[float, float, bool]]:
    return {
        name: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
        for g in groups
        for name in g["param_names"]
    }


def test_layer_decay_multipliers() -> None:
    settings = _settings(param_groups(_model(), layer_decay=0.5, patch_embed_lr_mult=0.2))
    lr = {name: s[0] for name, s in settings.items()}
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(0.5**3 * 0.2)
    for name in ("pos_embed", "cls_token", "register_tokens", "mask_token"):
        assert lr[f"backbone.{name}"] == pytest.approx(0.5**3)
    assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**2)
    assert lr["backbone.blocks.1.mlp.fc2.bias"] == pytest.approx(0.5)
    assert lr["backbone.norm.weight"] == 1.0 and lr["dino_head.mlp.0.weight"] == 1.0
    # The shared head is counted once; the frozen weight-norm magnitude is left out.
    assert not any(name.startswith("ibot_head.") for name in settings)
    assert "dino_head.last_layer.parametrizations.weight.original0" not in settings
    last = {name for name, s in settings.items() if s[2]}
    assert last == {"dino_head.last_layer.parametrizations.weight.original1"}


def test_weight_decay_exemptions_and_merging() -> None:
    groups = param_groups(_model(), layer_decay=0.9)
    settings = _settings(groups)
    no_decay = {name for name, s in settings.items() if s[1] == 0.0}
    expected = {"backbone.pos_embed", "backbone.cls_token", "backbone.register_tokens", "backbone.mask_token"}
    expected |= {name for name in settings if name.endswith(".bias") or ".norm" in name or ".ls" in name}
    assert no_decay == expected
    assert "backbone.blocks.0.ls1.gamma" in no_decay and "backbone.blocks.0.norm1.weight" in no_decay
    assert "backbone.blocks.0.attn.qkv.weight" not in no_decay
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))  # identical settings share one group
    # Layer 0: tokens, patch-embed weight, patch-embed bias; layers 1-3: decay / no decay; last layer.
    assert len(keys) == 3 + 3 * 2 + 1


def test_apply_schedules_and_frozen_last_layer() -> None:
    modules = _model()
    optimizer = build_optimizer(param_groups(modules, layer_decay=0.5))
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]
    apply_schedules(optimizer, lr=0.1, wd=0.04, last_layer_lr_mult=0.0)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 0.1 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])

    head = modules["dino_head"]
    last_before = head.last_layer.parametrizations.weight.original1.detach().clone()
    mlp_before = head.mlp[0].weight.detach().clone()
    head(modules["backbone"](torch.randn(2, 3, 32, 32))).pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(head.last_layer.parametrizations.weight.original1, last_before)
    assert not torch.equal(head.mlp[0].weight, mlp_before)

    apply_schedules(optimizer, lr=0.1, wd=0.04, last_layer_lr_mult=1.0)
    last_group = next(g for g in optimizer.param_groups if g["is_last_layer"])
    assert last_group["lr"] == pytest.approx(0.1)


def test_clip_grad_norms_per_module() -> None:
    big, small = nn.Linear(4, 4), nn.Linear(4, 4)
    for module, value in ((big, 5.0), (small, 0.1)):
        for param in module.parameters():
            param.grad = torch.full_like(param, value)
    expected_big, expected_small = 5.0 * math.sqrt(20), 0.1 * math.sqrt(20)  # 20 parameters each
    norms = clip_grad_norms({"backbone": big, "head": small}, max_norm=3.0)
    assert norms == pytest.approx({"backbone": expected_big, "head": expected_small})
    grad_norm = torch.cat([p.grad.flatten() for p in big.parameters()]).norm()
    assert grad_norm == pytest.approx(3.0, rel=1e-4)  # capped
    assert small.weight.grad[0, 0] == pytest.approx(0.1)  # untouched: clipped separately
    assert clip_grad_norms({"backbone": big}, max_norm=None)["backbone"] == pytest.approx(3.0, rel=1e-4)
