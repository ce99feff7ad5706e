"""Loading the teacher from every form a run leaves, the feature extraction, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import tv_tensors

from pretrain.checkpoint import CONFIG_FILE, MODEL_FILE
from pretrain.config import PretrainConfig
from pretrain.config_io import load_config, save_config
from pretrain.eval import knn
from pretrain.eval.features import (
    EvalInputError,
    LabelledImages,
    eval_transform,
    extract_features,
    load_backbone,
    train_val_features,
)
from pretrain.export import teacher_backbone_state
from pretrain.meta_arch import SSLMetaArch
from tests.pretrain.eval.conftest import EXPORT_ITERATION, TINY_SPEC, write_image_folder

TINY_RUN = [
    "model.arch=vit_test",
    "model.patch_size=8",
    "model.layerscale_init=null",
    "heads.out_dim=16",
    "heads.hidden_dim=16",
    "heads.bottleneck_dim=8",
    "data.augment.global_crop_size=32",
    "data.augment.local_crop_size=16",
    "data.image_folder=unused",
]


def write_checkpoint(folder: Path, keep: str = "") -> dict[str, torch.Tensor]:
    """A checkpoint folder as pretrain/train.py writes it (model.pt, config.yaml), its model state
    restricted to names starting with ``keep``; returns the teacher backbone's weights."""
    config = load_config(PretrainConfig, None, TINY_RUN)
    torch.manual_seed(2)
    state = SSLMetaArch(config).state_dict()
    folder.mkdir(parents=True)
    torch.save({name: t for name, t in state.items() if name.startswith(keep)}, folder / MODEL_FILE)
    save_config(config, folder / CONFIG_FILE)
    return teacher_backbone_state(state)


def assert_same_weights(loaded: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_every_export_form_loads_the_teacher(teacher_export: Path) -> None:
    expected = load_file(teacher_export / "teacher_backbone.safetensors")
    for path in ("teacher_backbone.safetensors", "teacher_backbone.json", "teacher_backbone.pt", "."):
        backbone = load_backbone(teacher_export / path)
        assert_same_weights(backbone.model, expected)
        assert not backbone.model.training
        assert backbone.image_size == TINY_SPEC["img_size"]
        assert backbone.spec == TINY_SPEC
    assert load_backbone(teacher_export).iteration == EXPORT_ITERATION
    assert load_backbone(teacher_export / "teacher_backbone.pt").iteration is None


def test_checkpoint_folder_loads_its_teacher(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "step-0000012"
    teacher = write_checkpoint(folder)
    backbone = load_backbone(folder)
    assert_same_weights(backbone.model, teacher)
    assert backbone.iteration == 12
    assert backbone.spec["name"] == "vit_test" and backbone.image_size == 32


def test_checkpoint_without_teacher_says_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "step-0000004"
    write_checkpoint(folder, keep="student.")
    with pytest.raises(EvalInputError, match=r"holds no teacher: model.pt has no 'teacher.backbone.\*' weights"):
        load_backbone(folder)
    # The command says it without a traceback, exit code 2, naming what to pass instead.
    assert knn.main(["--checkpoint", str(folder), "--train", "x", "--val", "y"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: checkpoint") and "its top-level names: student" in message
    assert "OUTPUT_DIR/checkpoints/step-XXXXXXX" in message


def test_other_unusable_checkpoints(tmp_path: Path, teacher_export: Path) -> None:
    with pytest.raises(EvalInputError, match="checkpoint not found"):
        load_backbone(tmp_path / "missing.safetensors")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(EvalInputError, match=r"holds no teacher: it lacks the 'config' and 'state_dict'"):
        load_backbone(tmp_path / "other.pt")
    with pytest.raises(EvalInputError, match="holds neither a checkpoint"):
        load_backbone(tmp_path)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "teacher_backbone.safetensors").write_bytes((teacher_export / "teacher_backbone.safetensors").read_bytes())
    with pytest.raises(EvalInputError, match=r"teacher export incomplete: .*teacher_backbone.json is missing"):
        load_backbone(lone / "teacher_backbone.safetensors")


def test_folders_with_other_classes_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture, teacher_export: Path) -> None:
    train = write_image_folder(tmp_path / "train", 1, seed=0)
    val = write_image_folder(tmp_path / "val", 1, seed=1, classes={"blue": (0, 0, 255), "cyan": (0, 255, 255)})
    model = load_backbone(teacher_export).model
    with pytest.raises(EvalInputError) as raised:
        train_val_features(model, train, val, 32)
    assert "do not match: only in the first: ['green', 'red']; only in the second: ['cyan']" in str(raised.value)
    arguments = ["--checkpoint", str(teacher_export), "--train", str(train), "--val", str(val)]
    assert knn.main(arguments) == 2
    assert "error: the classes of the training folder (--train)" in capsys.readouterr().err


def test_empty_validation_set_is_refused(tmp_path: Path, teacher_export: Path, capsys: pytest.CaptureFixture) -> None:
    train = write_image_folder(tmp_path / "train", 1, seed=0)
    val = tmp_path / "val"
    (val / "blue").mkdir(parents=True)
    arguments = ["--checkpoint", str(teacher_export), "--train", str(train), "--val", str(val)]
    assert knn.main(arguments) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: the validation folder (--val) is empty: image folder {val} holds no image")
    assert "put images into its class folders or pass another folder" in message


def test_features_are_the_backbone_outputs_in_dataset_order(image_folders, teacher_export: Path) -> None:
    model = load_backbone(teacher_export).model
    dataset = LabelledImages(image_folders[0], 32, "training folder")
    features = extract_features(model, dataset, batch_size=5, keep_patches=True)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    direct = model.forward_features(images)
    torch.testing.assert_close(features.cls, direct["cls"])
    torch.testing.assert_close(features.patches, direct["patches"])
    torch.testing.assert_close(features.patch_mean, direct["patches"].mean(dim=1))
    assert features.grid == (4, 4)
    assert features.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert dataset.classes == ["blue", "green", "red"]


def test_transform_crops_a_mask_like_its_image() -> None:
    """A 64 x 32 image whose right half is white: the centre crop keeps columns 16-47, so after
    resizing to 16 the right half of the crop is white and so is the mask, its values kept."""
    image = Image.new("RGB", (64, 32))
    image.paste((255, 255, 255), (32, 0, 64, 32))
    labels = torch.zeros(32, 64, dtype=torch.int64)
    labels[:, 32:] = 5
    pixels, mask = eval_transform(16)(image, tv_tensors.Mask(labels))
    assert pixels.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert mask[:, :8].eq(0).all() and mask[:, 8:].eq(5).all()
    assert (pixels[:, :, 9:] > pixels[:, :, :7].max()).all()
