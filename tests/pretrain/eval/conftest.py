"""Fixtures of the evaluation tests: a tiny teacher export and small labelled ImageFolder trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.export import write_safetensors_export, write_torch_export
from pretrain.models import build_vit

# A 2-block ViT/8 on 32-pixel images: a 4 x 4 patch grid.
TINY_SPEC = {"name": "vit_test", "patch_size": 8, "img_size": 32, "layerscale_init": None}
EXPORT_ITERATION = 7
CLASS_COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


@pytest.fixture(scope="session")
def teacher_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUTPUT_DIR with teacher_backbone.{safetensors,json,pt} of a seeded random vit_test."""
    output_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    state = build_vit(**TINY_SPEC).state_dict()
    write_safetensors_export(output_dir, state, TINY_SPEC, EXPORT_ITERATION)
    write_torch_export(output_dir / "teacher_backbone.pt", state, TINY_SPEC)
    return output_dir


def write_image_folder(root: Path, per_class: int, seed: int, classes: dict = CLASS_COLOURS) -> Path:
    """root/<class>/<n>.png: a square of the class colour on grey noise, placed at random."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(90, 160, (40, 40, 3), dtype=np.uint8)
            top, left = rng.integers(0, 16, 2)
            pixels[top : top + 24, left : left + 24] = colour
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


@pytest.fixture
def image_folders(tmp_path: Path) -> tuple[Path, Path]:
    """(train, val): 3 colour classes, 4 and 2 images each."""
    return write_image_folder(tmp_path / "train", 4, seed=0), write_image_folder(tmp_path / "val", 2, seed=1)
