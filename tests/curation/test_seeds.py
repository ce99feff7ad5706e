"""The seed registry resolves names and paths, and says what to set when it cannot."""

from __future__ import annotations

import pytest
from PIL import Image

from curation import seeds


def _image_folder(root, classes=("a", "b")):
    for c in classes:
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / c / "0.jpg")
    return root


def test_unset_imagenet_names_the_variable(monkeypatch):
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    monkeypatch.delenv("LVD_SEEDS_FILE", raising=False)
    with pytest.raises(seeds.SeedError, match="IMAGENET_ROOT"):
        seeds.resolve("imagenet")


def test_imagenet_from_environment_keeps_its_retrieval_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGENET_ROOT", str(_image_folder(tmp_path / "in1k")))
    seed = seeds.resolve("imagenet")
    assert seed.root == tmp_path / "in1k" and seed.retrieval == "sample" and seed.k == 32


def test_seeds_file_maps_names_to_paths(monkeypatch, tmp_path):
    folder = _image_folder(tmp_path / "food")
    (tmp_path / "seeds.yaml").write_text(f"food101: {folder}\n")
    monkeypatch.setenv("LVD_SEEDS_FILE", str(tmp_path / "seeds.yaml"))
    assert seeds.resolve("food101").retrieval == "cluster"


def test_a_path_is_a_seed_set(tmp_path):
    assert seeds.resolve(str(_image_folder(tmp_path / "mine"))).name == "mine"


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(seeds.SeedError, match="no images"):
        seeds.resolve(str(tmp_path / "empty"))


def test_typo_suggests_the_registered_name():
    with pytest.raises(seeds.SeedError, match="did you mean the registered set 'imagenet'"):
        seeds.resolve("imagenett")


def test_demo_exists_only_in_demo_mode(demo_root):
    with pytest.raises(seeds.SeedError, match="demo mode"):
        seeds.resolve("demo")
    assert seeds.resolve("demo", demo_root / "seeds").root == demo_root / "seeds"
