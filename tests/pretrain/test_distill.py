"""Distillation at tiny scale: a frozen vit_tiny teacher (another run's checkpoint) trains a vit_test student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import PretrainConfig
from pretrain.config_io import load_config
from pretrain.meta_arch import SSLMetaArch
from pretrain.train import Trainer, main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "pretrain" / "configs"
CROPS = ("data.augment.global_crop_size=32", "data.augment.local_crop_size=16")
SHORT = ("schedule.iters_per_epoch=3", "schedule.epochs=1", "schedule.warmup_epochs=0",
         "schedule.warmup_teacher_temp_epochs=0", "schedule.freeze_last_layer_epochs=0")  # fmt: skip


@pytest.fixture(scope="module")
def teacher_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[str, ...], noise_images: Path
) -> Path:
    """A finished 1-iteration v3 run of a vit_tiny (12 blocks, 192 wide): the teacher."""
    output_dir = tmp_path_factory.mktemp("teacher")
    overrides = [*tiny_model, *CROPS, *SHORT, "schedule.iters_per_epoch=1", "model.arch=vit_tiny", "gram.enabled=false",
                 "data.augment.gram_crop_factor=0", f"data.image_folder={noise_images}", f"output_dir={output_dir}"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture does for each test, which runs after this one
    try:
        Trainer(load_config(PretrainConfig, CONFIGS / "v3_tiny.yaml", overrides)).train()
    finally:
        torch.set_num_threads(threads)
    return output_dir


def distill_args(
    teacher: Path, output_dir: Path, images: Path, tiny_model: tuple[str, ...], *extra: str
) -> list[str]:
    return [
        "--config", str(CONFIGS / "distill" / "v3_tiny.yaml"), *tiny_model, *CROPS, *SHORT,
        f"distill.teacher={teacher}", f"data.image_folder={images}", f"output_dir={output_dir}", *extra,
    ]  # fmt: skip


def test_a_frozen_teacher_trains_a_smaller_student_whose_ema_is_exported(
    teacher_run: Path, tiny_model: tuple[str, ...], noise_images: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "student"
    assert main(distill_args(teacher_run, output_dir, noise_images, tiny_model)) == 0
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    assert all(math.isfinite(row["loss/dino"]) and math.isfinite(row["loss/ibot"]) for row in rows)

    teacher = torch.load(teacher_run / "checkpoints" / "step-0000001" / "model.pt", weights_only=True)
    student = torch.load(output_dir / "checkpoints" / "step-0000003" / "model.pt", weights_only=True)
    frozen = {
        name.removeprefix("distill_teacher."): t for name, t in student.items() if name.startswith("distill_")
    }
    ema_teacher = {
        name.removeprefix("teacher."): t for name, t in teacher.items() if name.startswith("teacher.")
    }
    assert frozen.keys() == ema_teacher.keys()
    assert all(torch.equal(frozen[name], ema_teacher[name]) for name in frozen)  # loaded, and never trained
    assert frozen["backbone.cls_token"].shape[-1] == 192
    assert student["student.backbone.cls_token"].shape[-1] == 48

    # The export is the EMA of the student, not the distillation teacher.
    spec = json.loads((output_dir / "teacher_backbone.json").read_text())["build_vit"]
    exported = load_file(output_dir / "teacher_backbone.safetensors")
    assert spec["name"] == "vit_test"
    assert torch.equal(exported["cls_token"], student["teacher.backbone.cls_token"])


def test_the_student_sees_whole_crops_and_learns_the_targets_at_every_patch(
    teacher_run: Path, tiny_model: tuple[str, ...], noise_images: Path, tmp_path: Path
) -> None:
    args = distill_args(teacher_run, tmp_path, noise_images, tiny_model)
    model = SSLMetaArch(load_config(PretrainConfig, args[1], args[2:]))
    seen: dict[str, object] = {}
    student_forward = model.student["backbone"].forward_features

    def spy_student(crops, masks=None):
        seen["student_masks"] = masks
        return student_forward(crops, masks)

    ibot_forward = model.ibot_loss.forward

    def spy_ibot(student_logits, teacher_probs, masks):
        seen["ibot_masks"] = masks
        return ibot_forward(student_logits, teacher_probs, masks)

    model.student["backbone"].forward_features = spy_student
    model.ibot_loss.forward = spy_ibot
    batch = {
        "global_crops": torch.randn(8, 3, 32, 32),
        "local_crops": torch.randn(8, 3, 16, 16),
        "masks": torch.zeros(8, 16, dtype=torch.bool),  # what the collate draws at masking probability 0
    }
    terms = model(batch, teacher_temp=0.07)
    assert seen["student_masks"] == [None, None]
    assert seen["ibot_masks"].shape == (8, 16) and seen["ibot_masks"].all()
    assert terms["ibot"] > 0 and terms["dino"] > 0
    assert not any(param.requires_grad for param in model.distill_teacher.parameters())
    assert not model.distill_teacher.training


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("heads.out_dim=32",), "set heads.out_dim=64"),
        (("model.patch_size=4",), "set model.patch_size=8"),
        (("data.masking.probability=0.5",), "set data.masking.probability=0"),
        (("model.drop_path_rate=0.1",), "set model.drop_path_rate=0"),
        (("distill.teacher={teacher}/teacher_backbone.pt",), "a teacher export holds the backbone only"),
        (("distill.teacher={teacher}/missing",), "missing: it does not exist; set distill.teacher"),
    ],
    ids=["prototypes", "patch size", "masking", "stochastic depth", "teacher export", "missing teacher"],
)
def test_a_teacher_that_cannot_teach_fails_before_training(
    extra: tuple[str, ...],
    message: str,
    teacher_run: Path,
    tiny_model: tuple[str, ...],
    noise_images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    extra = tuple(item.format(teacher=teacher_run) for item in extra)
    assert main(distill_args(teacher_run, tmp_path / "out", noise_images, tiny_model, *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["v3_tiny.yaml", "v3_vits16.yaml"])
def test_distillation_recipes_load(name: str) -> None:
    config = load_config(PretrainConfig, CONFIGS / "distill" / name, ["data.image_folder=images"])
    assert config.distill.teacher is not None and not config.gram.enabled
    assert (config.data.masking.probability, config.model.drop_path_rate) == (0.0, 0.0)
    assert config.losses.ibot_weight > 0 and config.losses.dino_weight > 0
