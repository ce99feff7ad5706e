"""Checkpoints, resume and export of the trainer (CPU, tiny models, a handful of iterations)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pretrain.checkpoint import MARKER_FILE, read_checkpoint, retained_iterations
from pretrain.config import PretrainConfig
from pretrain.config_io import load_config
from pretrain.models import build_vit
from pretrain.train import EXIT_STOPPED, Trainer, main
from tests.conftest import TINY_CROPS, TINY_NETWORK, TINY_SCHEDULE

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "pretrain" / "configs"
GRAM = ("gram.start_iteration=1", "gram.ramp_iterations=0", "gram.refresh_every=2", "gram.n_refreshes=1")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for i in range(8):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        array = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"class{i % 2}" / f"{i}.png")
    return folder


def run_args(recipe: str, output_dir: Path, images: Path, epochs: int, *extra: str) -> list[str]:
    """A 2-block ViT/8 on 32-pixel crops, K=64, batch 4, ``epochs`` × 2 iterations."""
    return [
        "--config",
        str(CONFIGS / f"{recipe}_tiny.yaml"),
        *TINY_NETWORK,
        "data.batch_size=4",
        "data.num_workers=0",
        *TINY_CROPS,
        f"schedule.epochs={epochs}",
        *TINY_SCHEDULE,
        "train.device=cpu",
        "train.log_every=100",
        f"data.image_folder={images}",
        f"output_dir={output_dir}",
        *(GRAM if recipe == "v3" else ()),
        *extra,
    ]


def config_of(args: list[str]) -> PretrainConfig:
    return load_config(PretrainConfig, args[1], args[2:])


def metric_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def steps(output_dir: Path) -> list[str]:
    return sorted(path.name for path in (output_dir / "checkpoints").iterdir())


def test_retention_keeps_the_last_and_every_multiple() -> None:
    assert retained_iterations([2, 4, 6, 8, 10], keep_last=2, keep_every=4) == {4, 8, 10}
    assert retained_iterations([2, 4], keep_last=3, keep_every=0) == {2, 4}
    with pytest.raises(ValueError, match="keep_every 3 is not a multiple of every 2"):
        load_config(
            PretrainConfig,
            CONFIGS / "v1_tiny.yaml",
            ["data.image_folder=x", "checkpoint.every=2", "checkpoint.keep_every=3"],
        )


def test_checkpoints_hold_the_run_state_and_exports_load_without_the_trainer(
    tmp_path: Path, images: Path
) -> None:
    output_dir = tmp_path / "out"
    args = run_args(
        "v3", output_dir, images, 4, "checkpoint.every=2", "checkpoint.keep_last=2", "checkpoint.keep_every=4"
    )
    assert main(args) == 0
    assert steps(output_dir) == ["step-0000004", "step-0000006", "step-0000008"]  # step 2 retired

    final = output_dir / "checkpoints" / "step-0000008"
    assert {path.name for path in final.iterdir()} == {
        "model.pt",
        "optimizer.pt",
        "trainer.pt",
        "config.yaml",
        "teacher_backbone.safetensors",
        "teacher_backbone.json",
        MARKER_FILE,
    }
    checkpoint = read_checkpoint(final)  # weights_only loads: plain tensors and containers
    assert checkpoint.iteration == 8 and checkpoint.config["checkpoint"]["every"] == 2
    prefixes = {name.split(".")[0] for name in checkpoint.model}
    assert prefixes == {"student", "teacher", "gram_teacher", "dino_loss", "ibot_loss"}
    assert {"dino_loss.center", "ibot_loss.center", "student.ibot_head.last_layer.weight"} <= set(
        checkpoint.model
    )
    assert "student.backbone.cls_token" in checkpoint.optimizer["state"]  # keyed by name, not position
    trainer_state = checkpoint.trainer
    assert (trainer_state["world_size"], trainer_state["global_batch_size"]) == (1, 4)
    assert set(trainer_state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert load_config(PretrainConfig, final / "config.yaml", []) == config_of(args)

    teacher = {
        name.removeprefix("teacher.backbone."): tensor
        for name, tensor in checkpoint.model.items()
        if name.startswith("teacher.backbone.")
    }
    for folder in (final, output_dir):  # the export of the final checkpoint and of the run
        spec = json.loads((folder / "teacher_backbone.json").read_text())
        assert spec["iteration"] == 8
        backbone = build_vit(**spec["build_vit"])
        weights = load_file(folder / "teacher_backbone.safetensors")
        backbone.load_state_dict(weights)
        assert all(torch.equal(weights[name], teacher[name]) for name in teacher)
        assert backbone(torch.randn(1, 3, 32, 32)).shape == (1, backbone.embed_dim)
    legacy = torch.load(output_dir / "teacher_backbone.pt", weights_only=True)
    build_vit(**legacy["config"]).load_state_dict(legacy["state_dict"])


def test_resume_takes_the_newest_complete_checkpoint_and_skips_damaged_ones(
    tmp_path: Path, images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output_dir = tmp_path / "out"
    args = run_args("v1", output_dir, images, 4, "checkpoint.every=2", "checkpoint.keep_last=4")
    assert main(args) == 0
    root = output_dir / "checkpoints"
    reference = metric_rows(output_dir)
    (root / "step-0000006" / MARKER_FILE).unlink()  # an incomplete folder (a non-atomic file system)
    model_file = root / "step-0000008" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # damaged after it was written
    (root / "step-0000004" / "optimizer.pt").unlink()  # a file lost
    (root / ".step-0000007.tmp").mkdir()  # a save killed half-way
    (root / ".step-0000007.tmp" / "model.pt").write_bytes(b"half")

    caplog.set_level(logging.INFO)
    trainer = Trainer(config_of(args))
    assert trainer.iteration == 0  # building a trainer reads nothing
    assert trainer.restore() == root / "step-0000002"
    # Step 2 ends the frozen-last-layer epoch: the heads' last layers have no AdamW state yet, and
    # must start their moments and step count from scratch after the resume as well.
    assert trainer.iteration == 2
    log = caplog.text
    assert "ignoring" in log and ".step-0000007.tmp" in log
    assert "step-0000008: it cannot be read" in log and "falling back to the previous one" in log
    assert "step-0000006: it has no COMPLETE marker" in log
    assert "step-0000004: it cannot be read (FileNotFoundError" in log
    assert f"resumed from {root / 'step-0000002'} at iteration 2 of 8" in log
    saved = read_checkpoint(root / "step-0000002").model
    assert all(torch.equal(tensor, saved[name]) for name, tensor in trainer.model.state_dict().items())
    assert steps(output_dir) == [
        ".step-0000007.tmp",
        "step-0000002",
        "step-0000004.unusable",
        "step-0000006.unusable",
        "step-0000008.unusable",
    ]
    assert [row["iteration"] for row in metric_rows(output_dir)] == [0, 1]  # cut at the resume point

    trainer.train()
    rows = metric_rows(output_dir)
    assert [row["iteration"] for row in rows] == list(range(8))
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in reference], abs=1e-5)
    assert [name for name in steps(output_dir) if not name.endswith(".unusable")] == [
        "step-0000002",
        "step-0000004",
        "step-0000006",
        "step-0000008",
    ]


@pytest.mark.parametrize(
    "change, messages",
    [
        (
            ["heads.out_dim=32", "model.patch_size=4"],
            ["heads.out_dim: 64 in the checkpoint, 32 now", "model.patch_size: 8 in the checkpoint, 4 now"],
        ),
        (["data.augment.global_crop_size=48"], ["do not fit this config", "student.backbone.pos_embed"]),
        (["checkpoint.resume=false"], ["checkpoint.resume=false but", "step-0000002"]),
    ],
    ids=["architecture", "shapes", "no resume"],
)
def test_resume_into_another_run_fails_before_any_work(
    change: list[str], messages: list[str], tmp_path: Path, images: Path, capsys: pytest.CaptureFixture
) -> None:
    output_dir = tmp_path / "out"
    assert main(run_args("v1", output_dir, images, 1)) == 0
    before = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}
    capsys.readouterr()

    assert main(run_args("v1", output_dir, images, 2, *change)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error
    assert all(message in error for message in messages), error
    after = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}
    assert after == before  # nothing written, nothing lost


@pytest.mark.parametrize("epochs", [3, 2], ids=["periodic", "final"])
def test_a_full_disk_keeps_the_previous_checkpoint(
    epochs: int,
    tmp_path: Path,
    images: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """The checkpoint of iteration 4 (periodic, or the final one) meets a full disk."""
    real_save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        if ".step-0000004.tmp" in str(getattr(file, "name", file)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    output_dir = tmp_path / "out"
    args = run_args("v1", output_dir, images, epochs, "checkpoint.every=2")
    total = 2 * epochs
    final = total == 4
    assert main(args) == (1 if final else 0)

    message = f"could not write checkpoint step-0000004 in {output_dir / 'checkpoints'}: [Errno 28]"
    assert read_checkpoint(output_dir / "checkpoints" / "step-0000002").iteration == 2  # intact
    assert len(metric_rows(output_dir)) == total
    if final:
        error = capsys.readouterr().err
        assert f"error: {message}" in error and "it resumes from" in error and "step-0000002" in error
        assert steps(output_dir) == ["step-0000002"]
        assert not (output_dir / "teacher_backbone.pt").exists()
        monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command finishes the run
        assert main(args) == 0
        assert steps(output_dir) == ["step-0000002", "step-0000004"]
        assert [row["iteration"] for row in metric_rows(output_dir)] == list(range(total))
    else:
        assert message in caplog.text and "training continues" in caplog.text
        assert steps(output_dir) == ["step-0000002", "step-0000006"]


# ---------------------------------------------------------------- a real kill


@pytest.fixture
def restore_determinism():
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def test_a_killed_run_resumes_exactly(tmp_path: Path, images: Path, restore_determinism: None) -> None:
    """SIGKILL a deterministic CPU run after its first checkpoint; the rerun of the same command must
    log exactly the losses of an uninterrupted run, one line per iteration."""
    extra = ("train.deterministic=true", "checkpoint.every=5", "checkpoint.keep_last=2")
    epochs = 12  # 24 iterations
    reference_dir = tmp_path / "reference"
    assert main(run_args("v3", reference_dir, images, epochs, *extra)) == 0

    output_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "pretrain.train", *run_args("v3", output_dir, images, epochs, *extra)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # the thread count of the reference
    process = subprocess.Popen(command, cwd=REPO, env=environment, stderr=subprocess.PIPE, text=True)
    first = output_dir / "checkpoints" / "step-0000005"
    deadline = time.monotonic() + 120
    while not first.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, killed_log = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, killed_log
    assert first.is_dir() and not (output_dir / "checkpoints" / "step-0000040").exists()
    assert len(metric_rows(output_dir)) < 2 * epochs

    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {output_dir / 'checkpoints' / 'step-'}" in result.stderr
    resumed_at = int(result.stderr.split("at iteration ")[1].split()[0])
    assert 5 <= resumed_at < 2 * epochs

    rows, reference = metric_rows(output_dir), metric_rows(reference_dir)
    assert [row["iteration"] for row in rows] == list(range(2 * epochs))
    for row, expected in zip(rows[resumed_at:], reference[resumed_at:], strict=True):
        for name in ("loss", "loss/dino", "loss/ibot", "loss/koleo", "loss/gram"):
            assert row[name] == pytest.approx(expected[name], abs=1e-5), (row["iteration"], name)
    exported = load_file(output_dir / "teacher_backbone.safetensors")
    for name, tensor in load_file(reference_dir / "teacher_backbone.safetensors").items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-6)


def start_and_wait_for_metrics(
    command: list[str], environment: dict[str, str], output_dir: Path, lines: int, **popen: object
) -> subprocess.Popen:
    """Start a training command and return once it has logged ``lines`` iterations (or ended)."""
    process = subprocess.Popen(command, cwd=REPO, env=environment, stderr=subprocess.PIPE, text=True, **popen)
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.005)
    return process


def test_sigusr1_stops_at_a_step_boundary_with_a_checkpoint_and_the_rerun_loses_no_step(
    tmp_path: Path, images: Path, restore_determinism: None
) -> None:
    """What the sbatch scripts forward ahead of a time limit: SIGUSR1 to a run that writes no periodic
    checkpoint. It must checkpoint the iteration it stopped at and exit with code 3; the rerun starts
    there and logs exactly the losses of an uninterrupted run."""
    extra = ("train.deterministic=true", "checkpoint.every=0")  # only the final checkpoint
    epochs = 12  # 24 iterations
    reference_dir = tmp_path / "reference"
    assert main(run_args("v2", reference_dir, images, epochs, *extra)) == 0

    output_dir = tmp_path / "stopped"
    command = [sys.executable, "-m", "pretrain.train", *run_args("v2", output_dir, images, epochs, *extra)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = start_and_wait_for_metrics(command, environment, output_dir, lines=3)
    process.send_signal(signal.SIGUSR1)
    _, stopped_log = process.communicate(timeout=60)
    assert process.returncode == EXIT_STOPPED, stopped_log
    match = re.search(r"stopped by SIGUSR1 after iteration (\d+) of 24, checkpointed in (\S+):", stopped_log)
    assert match is not None, stopped_log[-2000:]
    stopped_at = int(match.group(1))
    assert 3 <= stopped_at < 2 * epochs
    assert steps(output_dir) == [f"step-{stopped_at:07d}"] == [Path(match.group(2)).name]
    assert (output_dir / "checkpoints" / f"step-{stopped_at:07d}" / MARKER_FILE).is_file()
    assert len(metric_rows(output_dir)) == stopped_at

    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"step-{stopped_at:07d} at iteration {stopped_at} of 24" in result.stderr
    rows, reference = metric_rows(output_dir), metric_rows(reference_dir)
    assert [row["iteration"] for row in rows] == list(range(2 * epochs))
    for row, expected in zip(rows[stopped_at:], reference[stopped_at:], strict=True):
        for name in ("loss", "loss/dino", "loss/ibot", "loss/koleo"):
            assert row[name] == pytest.approx(expected[name], abs=1e-5), (row["iteration"], name)


def test_a_stop_signal_to_the_whole_process_group_spares_the_data_loader_workers(
    tmp_path: Path, images: Path
) -> None:
    """SLURM may signal every process of a task: the loader's worker (forked before training starts)
    must ignore the signal, or the run would die of a lost worker instead of stopping cleanly."""
    output_dir = tmp_path / "out"
    args = run_args("v2", output_dir, images, 12, "checkpoint.every=0", "data.num_workers=1")
    command = [sys.executable, "-m", "pretrain.train", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = start_and_wait_for_metrics(command, environment, output_dir, lines=2, start_new_session=True)
    os.killpg(process.pid, signal.SIGUSR1)
    _, log = process.communicate(timeout=60)
    assert process.returncode == EXIT_STOPPED, log[-3000:]
    stopped_at = int(re.search(r"stopped by SIGUSR1 after iteration (\d+) of 24", log).group(1))
    assert steps(output_dir) == [f"step-{stopped_at:07d}"]
