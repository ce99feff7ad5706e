"""Evaluation inside the training loop: logged with the metrics, pictures written, the run unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pretrain.eval.in_training import spread_over_classes
from pretrain.train import Trainer, main
from tests.pretrain.eval.conftest import write_image_folder
from tests.pretrain.test_train import read_metrics, recipe_args, tiny_config


@pytest.fixture
def held_out(tmp_path: Path) -> tuple[Path, Path]:
    return write_image_folder(tmp_path / "bank", 2, seed=3), write_image_folder(tmp_path / "queries", 1, seed=4)


def eval_overrides(bank: Path, queries: Path) -> list[str]:
    return [
        "eval.every=2",
        f"eval.train_folder={bank}",
        f"eval.val_folder={queries}",
        "eval.knn_k=3",
        "eval.probe_images=2",
    ]


def test_knn_is_logged_and_pictures_written_every_n_iterations(tmp_path: Path, held_out) -> None:
    data = f"data.image_folder={held_out[0]}"
    evaluated = tiny_config("v2", tmp_path / "evaluated", data, *eval_overrides(*held_out))
    Trainer(evaluated).train()
    rows = read_metrics(evaluated.output_dir)
    # 4 iterations, every 2: after iterations 2 and 4 (rows 1 and 3). 3 queries: multiples of 1/3.
    assert [("eval/knn_top1" in row) for row in rows] == [False, True, False, True]
    assert all(round(3 * row["eval/knn_top1"], 6).is_integer() for row in rows[1::2])
    for step in ("step-0000002", "step-0000004"):
        attention = Image.open(evaluated.output_dir / "eval" / step / "attention.png")
        assert attention.size == (480, 320)  # 2 probe images x (image + 2 heads)
        assert (evaluated.output_dir / "eval" / step / "pca.png").is_file()
    # The evaluation draws no random numbers and changes no state: the run is the one without it.
    plain = tiny_config("v2", tmp_path / "plain", data)
    Trainer(plain).train()
    assert [row["loss"] for row in read_metrics(plain.output_dir)] == [row["loss"] for row in rows]


def test_bad_evaluation_folders_stop_before_training(tmp_path: Path, held_out, capsys) -> None:
    bank, _ = held_out
    other = write_image_folder(tmp_path / "other", 1, seed=5, classes={"blue": (0, 0, 255)})
    output_dir = tmp_path / "out"
    args = recipe_args("v2", output_dir, f"data.image_folder={bank}", *eval_overrides(bank, other))
    assert main(args) == 2
    assert "error: the classes of the k-NN bank eval.train_folder" in capsys.readouterr().err
    assert main(recipe_args("v2", output_dir, f"data.image_folder={bank}", "eval.every=5")) == 2
    assert "eval.every=5 needs eval.train_folder=DIR" in capsys.readouterr().err
    assert not output_dir.exists()


def test_probe_images_take_the_classes_in_turn() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    assert spread_over_classes(labels, 5).tolist() == [0, 3, 4, 1, 5]
    assert spread_over_classes(labels, 0).tolist() == []
