"""Tests of the training entry point, the meta-architecture and the recipe configs (CPU, tiny models)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import re
import subprocess
import sys
import tarfile
import types
import typing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pretrain.config import PretrainConfig
from pretrain.config_io import load_config
from pretrain.losses import DINOLoss
from pretrain.meta_arch import SSLMetaArch
from pretrain.models import build_vit
from pretrain.train import Trainer, main
from tests.conftest import TINY_CROPS, TINY_NETWORK, TINY_SCHEDULE

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "pretrain" / "configs"
ITERATIONS = 4  # schedule.epochs × schedule.iters_per_epoch of tiny_overrides


def tiny_overrides(output_dir: Path, *extra: str) -> list[str]:
    """A 2-block ViT/8 on 32-pixel crops, K=64, batch 4, 4 iterations, the first 2 with a frozen last layer."""
    return [
        *TINY_NETWORK,
        "data.batch_size=4",
        "data.num_workers=0",
        *TINY_CROPS,
        "schedule.epochs=2",
        *TINY_SCHEDULE,
        "train.device=cpu",
        "train.log_every=1",
        f"output_dir={output_dir}",
        *extra,
    ]


# The Gram stage of v3_tiny starts late in its own schedule; start it within the 4 tiny iterations.
GRAM_OVERRIDES = (
    "gram.start_iteration=1",
    "gram.ramp_iterations=0",
    "gram.refresh_every=2",
    "gram.n_refreshes=1",
)


def recipe_args(recipe: str, output_dir: Path, data: str, *extra: str) -> list[str]:
    gram = GRAM_OVERRIDES if recipe == "v3" else ()
    return [
        "--config",
        str(CONFIGS / f"{recipe}_tiny.yaml"),
        *tiny_overrides(output_dir, data, *gram, *extra),
    ]


def tiny_config(recipe: str, output_dir: Path, data: str, *extra: str) -> PretrainConfig:
    args = recipe_args(recipe, output_dir, data, *extra)
    return load_config(PretrainConfig, args[1], args[2:])


def picture(seed: int, size: int = 40) -> np.ndarray:
    """A coloured rectangle on noise: some structure for the crops, different for every seed."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    top, left = rng.integers(0, size // 2, 2)
    array[top : top + size // 2, left : left + size // 2] = rng.integers(0, 256, 3)
    return array


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "folder"
    for i in range(8):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(i)).save(folder / f"class{i % 2}" / f"{i}.png")
    return folder


def write_manifest(run_dir: Path, name: str, rows: list[dict]) -> Path:
    path = run_dir / "manifests" / name / "part-00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.parent


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """RUN_DIR/manifests/pool over one tar shard of 8 images (the layout the curation pipeline writes)."""
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    with tarfile.open(run_dir / "images" / "00000.tar", "w") as tar:
        for i in range(8):
            data = png(picture(100 + i))
            info = tarfile.TarInfo(f"img{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(run_dir / "images" / "00000.tar") as tar:
        rows = [
            {
                "key": member.name,
                "status": "success",
                "shard": "images/00000.tar",
                "offset": member.offset_data,
                "nbytes": member.size,
            }
            for member in tar.getmembers()
        ]
    return write_manifest(run_dir, "pool", rows)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


COMMON_METRICS = {
    "iteration",
    "loss",
    "loss/dino",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "last_layer_lr_mult",
    "grad_norm/backbone",
    "grad_norm/dino_head",
    "images_per_s",
    "data_wait_share",
    "skipped",
    "corrupt_images",
    "teacher_entropy/dino",
    "memory/peak_mib",
    "flags",
}
RECIPE_METRICS = {
    "v1": set(),
    "v2": {"loss/ibot", "loss/koleo"},
    "v3": {"loss/ibot", "loss/koleo", "loss/gram", "gram_weight", "grad_norm/ibot_head"},
}


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "recipe, source", [("v1", "image_folder"), ("v2", "manifest"), ("v3", "image_folder")]
)
def test_entry_point_trains_and_writes_metrics_config_and_teacher(
    recipe: str, source: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = f"data.{source}={request.getfixturevalue(source)}"
    output_dir = tmp_path / "out"
    args = recipe_args(recipe, output_dir, data)
    assert main(args) == 0

    rows = read_metrics(output_dir)
    assert [row["iteration"] for row in rows] == list(range(ITERATIONS))
    for row in rows:
        assert set(row) == COMMON_METRICS | RECIPE_METRICS[recipe], row
        assert not row["skipped"] and np.isfinite(row["loss"])
        assert row["loss"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("loss/")), rel=1e-5)
        assert 0.0 <= row["data_wait_share"] <= 1.0 and row["images_per_s"] > 0
    if recipe == "v3":  # the Gram term starts at gram.start_iteration=1
        assert rows[0]["loss/gram"] == 0.0 and all(row["loss/gram"] > 0 for row in rows[1:])

    assert load_config(PretrainConfig, output_dir / "config.yaml", []) == load_config(
        PretrainConfig, args[1], args[2:]
    )
    export = torch.load(output_dir / "teacher_backbone.pt")
    backbone = build_vit(**export["config"])
    backbone.load_state_dict(export["state_dict"])
    assert backbone(torch.randn(1, 3, 32, 32)).shape == (1, backbone.embed_dim)


def test_module_entry_point_runs_as_a_command(tmp_path: Path, image_folder: Path) -> None:
    output_dir = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "pretrain.train",
        *recipe_args("v2", output_dir, f"data.image_folder={image_folder}"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"iteration {ITERATIONS}/{ITERATIONS}" in result.stderr  # log lines when stderr is not a terminal
    assert len(read_metrics(output_dir)) == ITERATIONS and (output_dir / "teacher_backbone.pt").is_file()


# ---------------------------------------------------------------- teacher, freeze, Gram teacher


def test_teacher_is_the_ema_of_the_student(tmp_path: Path, image_folder: Path) -> None:
    trainer = Trainer(tiny_config("v2", tmp_path, f"data.image_folder={image_folder}"))
    model = trainer.model
    teacher_before = [p.detach().clone() for p in model.teacher.parameters()]
    trainer.step(next(trainer.batches()))
    momentum = trainer.schedules.at(0)["momentum"]
    changed = 0
    for old, new, student in zip(
        teacher_before, model.teacher.parameters(), model.student.parameters(), strict=True
    ):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * student, rtol=1e-5, atol=1e-7)
        changed += not torch.equal(old, new)
    assert changed > 0
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_last_layer_is_frozen_during_the_first_epoch(tmp_path: Path, image_folder: Path) -> None:
    trainer = Trainer(tiny_config("v3", tmp_path, f"data.image_folder={image_folder}"))
    heads = {name: module for name, module in trainer.model.student.items() if name != "backbone"}
    assert set(heads) == {"dino_head", "ibot_head"}
    initial = {name: head.last_layer.weight.detach().clone() for name, head in heads.items()}
    mlp_initial = heads["dino_head"].mlp[0].weight.detach().clone()
    batches = trainer.batches()
    for _ in range(2):  # freeze_last_layer_epochs=1 × iters_per_epoch=2
        trainer.step(next(batches))
        for name, head in heads.items():
            assert torch.equal(head.last_layer.weight, initial[name]), name
    assert not torch.equal(heads["dino_head"].mlp[0].weight, mlp_initial)
    trainer.step(next(batches))
    for name, head in heads.items():
        assert not torch.equal(head.last_layer.weight, initial[name]), name


def test_gram_teacher_is_taken_at_the_start_iteration_and_refreshed_on_schedule(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config("v3", tmp_path, f"data.image_folder={image_folder}", "schedule.epochs=3")
    trainer = Trainer(config)
    model = trainer.model
    taken: list[tuple[int, dict[str, torch.Tensor]]] = []
    refresh = model.refresh_gram_teacher

    def spy() -> None:
        teacher = {k: v.clone() for k, v in model.teacher["backbone"].state_dict().items()}
        taken.append((trainer.iteration, teacher))
        refresh()

    monkeypatch.setattr(model, "refresh_gram_teacher", spy)
    trainer.train()
    assert [iteration for iteration, _ in taken] == [1, 3]  # start 1, every 2, 1 refresh, 6 iterations
    gram_state = model.gram_teacher.state_dict()
    for name, tensor in taken[-1][1].items():
        assert torch.equal(gram_state[name], tensor), name
    final_teacher = model.teacher["backbone"].state_dict()
    assert any(not torch.equal(gram_state[name], final_teacher[name]) for name in gram_state)
    assert all(not p.requires_grad for p in model.gram_teacher.parameters())
    assert [row["gram_weight"] for row in read_metrics(tmp_path)] == [0.0] + [config.gram.weight] * 5


def test_local_dino_weight_scales_the_local_pairs_only() -> None:
    config = load_config(
        PretrainConfig,
        CONFIGS / "v1_tiny.yaml",
        ["data.image_folder=unused", "model.arch=vit_test", "heads.out_dim=8", "heads.hidden_dim=8"],
    )
    generator = torch.Generator().manual_seed(0)
    batch, n_local, k = 3, 4, 8
    student = [torch.randn(batch, k, generator=generator) for _ in range(2 + n_local)]
    teacher = [torch.softmax(torch.randn(batch, k, generator=generator), dim=-1) for _ in range(2)]

    def cross_entropy(t: int, s: int) -> torch.Tensor:
        return -(teacher[t] * torch.log_softmax(student[s] / 0.1, dim=-1)).sum(-1).mean()

    for weight in (1.0, 0.5, 0.0):
        model = SSLMetaArch(
            dataclasses.replace(config, losses=dataclasses.replace(config.losses, local_dino_weight=weight))
        )
        pairs = [(t, s, 1.0 if s < 2 else weight) for t in range(2) for s in range(2 + n_local) if s != t]
        expected = sum(w * cross_entropy(t, s) for t, s, w in pairs) / len(pairs)
        torch.testing.assert_close(model._dino_term(student, teacher), expected)


# ---------------------------------------------------------------- non-finite losses


def poison_second_dino_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DINO loss of the second step (and only it) becomes NaN."""
    original = DINOLoss.forward
    calls = itertools.count()

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if next(calls) == 1 else loss

    monkeypatch.setattr(DINOLoss, "forward", poisoned)


def test_nan_policy_skip_skips_the_step(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(
        tiny_config("v2", tmp_path, f"data.image_folder={image_folder}", "optim.nan_policy=skip")
    )
    poison_second_dino_loss(monkeypatch)
    batches = trainer.batches()
    assert not trainer.step(next(batches))["skipped"]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.step(next(batches))
    assert metrics["skipped"] and metrics["loss"] is None and metrics["grad_norm/backbone"] is None
    assert trainer.iteration == 2
    assert all(torch.equal(old, new) for old, new in zip(before, trainer.model.parameters(), strict=True))
    assert not trainer.step(next(batches))["skipped"]
    assert any(not torch.equal(old, new) for old, new in zip(before, trainer.model.parameters(), strict=True))


def test_nan_policy_stop_stops_with_a_message(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    poison_second_dino_loss(monkeypatch)
    output_dir = tmp_path / "out"
    assert main(recipe_args("v2", output_dir, f"data.image_folder={image_folder}")) == 1
    error = capsys.readouterr().err
    assert "error: non-finite loss nan at iteration 1" in error and "optim.nan_policy=skip" in error
    assert len(read_metrics(output_dir)) == 1 and not (output_dir / "teacher_backbone.pt").exists()


# ---------------------------------------------------------------- configs and bad input


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_recipe_config_loads_validates_and_builds_on_meta(path: Path) -> None:
    config = load_config(PretrainConfig, path, ["data.image_folder=images"])
    recipe = path.stem.removesuffix("_tiny")
    losses, augment = config.losses, config.data.augment
    if recipe == "v1":
        assert (losses.ibot_weight, losses.koleo_weight) == (0.0, 0.0)
        assert config.model.pos_embed == "learned" and losses.target_mode == "centering"
        assert config.schedule.kind == "cosine"
    elif recipe == "v2":
        assert losses.ibot_weight > 0 and losses.koleo_weight > 0
        assert config.schedule.kind == "cosine"
    else:
        assert (config.model.pos_embed, config.model.n_registers, config.heads.separate_ibot_head) == (
            "rope",
            4,
            True,
        )
        assert (losses.target_mode, config.schedule.kind, config.gram.enabled) == (
            "sinkhorn",
            "constant",
            True,
        )
    if path.stem in ("v1", "v2", "v3"):  # the tiny recipes trade these for speed
        assert augment.n_local_crops == {"v1": 10, "v2": 8, "v3": 8}[path.stem]
        assert config.schedule.momentum_start == {"v1": 0.996, "v2": 0.992, "v3": 0.994}[path.stem]
    with torch.device("meta"):
        model = SSLMetaArch(config)
    n_params = sum(p.numel() for p in model.student["backbone"].parameters())
    if path.stem in ("v2", "v3"):
        assert 290e6 < n_params < 320e6  # ViT-L
    elif path.stem == "v1":
        assert 20e6 < n_params < 23e6  # ViT-S
    else:
        assert n_params < 1e6


def test_unknown_key_suggests_the_nearest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["--config", str(CONFIGS / "v2_tiny.yaml"), "data.image_folder=x", "losses.ibot_wieght=0.5"])
        == 2
    )
    assert "did you mean 'losses.ibot_weight'?" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"base: {CONFIGS / 'v2_tiny.yaml'}\nheads:\n  out_dimm: 8\n")
    assert main(["--config", str(typo), "data.image_folder=x"]) == 2
    assert "unknown config key 'heads.out_dimm'; did you mean 'heads.out_dim'?" in capsys.readouterr().err


def bad_input_cases(tmp_path: Path, image_folder: Path) -> dict[str, tuple[list[str], str]]:
    folder = f"data.image_folder={image_folder}"
    failed = [
        {"key": f"k{i}", "status": "failed_to_download", "shard": None, "offset": None, "nbytes": None}
        for i in range(3)
    ]
    unreadable = write_manifest(tmp_path / "run", "failed", failed)
    empty_folder = tmp_path / "empty" / "class"
    empty_folder.mkdir(parents=True)
    return {
        "missing manifest": (
            [f"data.manifest={tmp_path / 'run' / 'manifests' / 'nope'}"],
            "manifest not found",
        ),
        "unreadable manifest": ([f"data.manifest={unreadable}"], "has no readable image: 0 of 3 rows"),
        "empty image folder": ([f"data.image_folder={empty_folder.parent}"], "holds no image"),
        "no data source": ([], "no data source given"),
        "crop size": (
            [folder, "data.augment.global_crop_size=36"],
            "global_crop_size 36 is not divisible by model.patch_size 8",
        ),
        "koleo with batch 1": ([folder, "data.batch_size=1"], "KoLeo needs at least 2 images per process"),
        "unknown architecture": (
            [folder, "model.arch=vit_tinny"],
            "unknown model 'vit_tinny'; did you mean 'vit_tiny'?",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing manifest",
        "unreadable manifest",
        "empty image folder",
        "no data source",
        "crop size",
        "koleo with batch 1",
        "unknown architecture",
    ],
)
def test_bad_input_fails_before_training_with_a_message(
    case: str, tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    extra, message = bad_input_cases(tmp_path, image_folder)[case]
    output_dir = tmp_path / "out"
    args = ["--config", str(CONFIGS / "v2_tiny.yaml"), *tiny_overrides(output_dir), *extra]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert not output_dir.exists()  # nothing written, no step taken


# ---------------------------------------------------------------- docs


def config_keys(cls: type, prefix: str = "") -> set[str]:
    """Every dotted key of a config dataclass; list-of-dataclass fields as ``name[].key``."""
    keys: set[str] = set()
    for name, annotation in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1:
            annotation = options[0]
        item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
        if dataclasses.is_dataclass(annotation):
            keys |= config_keys(annotation, f"{prefix}{name}.")
        elif item is not None and dataclasses.is_dataclass(item):
            keys |= config_keys(item, f"{prefix}{name}[].")
        else:
            keys.add(prefix + name)
    return keys


def test_docs_list_exactly_the_config_keys() -> None:
    key_table = (REPO / "docs" / "pretrain.md").read_text().split("## Config keys", 1)[1]
    assert set(re.findall(r"^\| `([^`]+)` \|", key_table, re.MULTILINE)) == config_keys(PretrainConfig)
