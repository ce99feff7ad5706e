"""The launcher without SLURM: --cluster debug and local, requeue bookkeeping, run-folder owners and
the checks made before anything is queued (tests/slurm runs it on a real SLURM cluster)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain import launch, ownership
from pretrain.config import PretrainConfig
from pretrain.config_io import dump_config, load_config

REPO = Path(__file__).resolve().parents[2]
V3_TINY = REPO / "pretrain" / "configs" / "v3_tiny.yaml"
SHORT = ("data.augment.global_crop_size=32", "data.augment.local_crop_size=16", "schedule.epochs=2",
         "schedule.iters_per_epoch=2", "schedule.warmup_epochs=0", "schedule.warmup_teacher_temp_epochs=1",
         "checkpoint.every=2", "gram.start_iteration=2", "gram.refresh_every=2", "gram.n_refreshes=1")  # fmt: skip


def launch_args(output_dir: Path, images: Path, tiny_model: tuple[str, ...], *cluster: str) -> list[str]:
    return [*cluster, "--config", str(V3_TINY), *tiny_model, *SHORT, f"data.image_folder={images}",
            f"output_dir={output_dir}"]  # fmt: skip


def metric_iterations(output_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_debug_cluster_trains_in_this_process_and_owns_the_folder(
    tmp_path: Path, tiny_model: tuple[str, ...], noise_images: Path, capsys: pytest.CaptureFixture
) -> None:
    output_dir = tmp_path / "run"
    args = launch_args(output_dir, noise_images, tiny_model, "--cluster", "debug", "--gpus-per-node", "0")
    assert launch.main(args) == 0
    assert metric_iterations(output_dir) == [0, 1, 2, 3]
    assert (output_dir / "checkpoints" / "step-0000004" / "COMPLETE").is_file()
    owner = json.loads((output_dir / ownership.OWNER_FILE).read_text())
    assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
    (log,) = (output_dir / launch.JOBS_FOLDER).glob("*/*_0_log.out")  # an output folder per job
    assert "task logs in" in capsys.readouterr().out


def test_local_cluster_runs_one_process_per_task_and_they_train_together(
    tmp_path: Path, tiny_model: tuple[str, ...], noise_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tasks inherit it
    output_dir = tmp_path / "run"
    args = launch_args(
        output_dir, noise_images, tiny_model, "--cluster", "local", "--gpus-per-node", "2", "--time", "10"
    )
    assert launch.main(args) == 0
    assert metric_iterations(output_dir) == [0, 1, 2, 3]
    logs = sorted((output_dir / launch.JOBS_FOLDER).glob("*/*_log.out"))
    assert len(logs) == 2  # one per task
    # Two ranks under DDP: rank 0 compares the teacher checksums of both at the end.
    assert "teacher checksums by rank" in logs[0].read_text() + logs[0].with_suffix(".err").read_text()
    config = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 4


def test_checkpoint_requeues_the_same_job_until_the_maximum(tmp_path: Path) -> None:
    job = launch.TrainingJob(V3_TINY, ("a=1",), tmp_path, max_requeues=2)
    first = job.checkpoint()
    assert first.function == launch.TrainingJob(V3_TINY, ("a=1",), tmp_path, max_requeues=2, requeues=1)
    second = first.function.checkpoint()
    assert second.function.requeues == 2
    assert second.function.checkpoint() is None  # two requeues done: the job ends


def test_slurm_times_and_gres() -> None:
    assert [launch.parse_time(t) for t in ("90", "30:30", "01:00:00", "2-0", "1-02:30", "1-00:00:30")] == [
        90, 31, 60, 2880, 1590, 1441,
    ]  # fmt: skip
    assert [
        launch.gpus_of(g) for g in ("gpu:8", "gpu:a100:4(S:0-1),gpu:v100:2", "(null)", "tmpdisk:100")
    ] == [8, 6, 0, 0]
    with pytest.raises(launch.LaunchError, match="not a SLURM time"):
        launch.parse_time("2 days")


def write_checkpoint_config(output_dir: Path, config: PretrainConfig) -> None:
    """What a run of ``config`` leaves in OUTPUT_DIR/checkpoints for the pre-flight check to read."""
    folder = output_dir / "checkpoints" / "step-0000002"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(dump_config(config)))
    (folder / "COMPLETE").write_text("2\n")


@pytest.mark.parametrize(
    "case", ["missing manifest", "unknown key", "architecture", "owned folder", "two nodes here"]
)
def test_bad_input_fails_before_anything_is_queued(
    case: str, tmp_path: Path, tiny_model: tuple[str, ...], noise_images: Path, capsys: pytest.CaptureFixture
) -> None:
    output_dir = tmp_path / "run"
    cluster = ["--cluster", "local", "--gpus-per-node", "0"]
    extra: list[str] = []
    if case == "missing manifest":
        extra, message = [f"data.manifest={tmp_path / 'run' / 'manifests' / 'nope'}"], "manifest not found"
    elif case == "unknown key":
        extra, message = ["optim.clip_gard=1"], "did you mean 'optim.clip_grad'"
    elif case == "architecture":
        other = load_config(
            PretrainConfig, V3_TINY, [*tiny_model, "model.arch=vit_tiny", "data.image_folder=x"]
        )
        write_checkpoint_config(output_dir, other)
        message = "holds checkpoints of another architecture (newest"
    elif case == "owned folder":
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        output_dir.mkdir()
        live = ownership.Owner(None, socket.gethostname(), sleeper.pid)
        (output_dir / ownership.OWNER_FILE).write_text(json.dumps(live.__dict__))
        message = f"belongs to process {sleeper.pid} on {socket.gethostname()}"
    else:
        cluster, message = ["--cluster", "local", "--nodes", "2"], "runs on this machine only: use --nodes 1"
    try:
        code = launch.main([*cluster, *launch_args(output_dir, noise_images, tiny_model)[0:], *extra])
    finally:
        if case == "owned folder":
            sleeper.kill()
            sleeper.wait()
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error, error
    assert not (output_dir / launch.JOBS_FOLDER).exists()  # nothing submitted


def test_an_owner_that_has_ended_gives_the_folder_up(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    ownership.claim(tmp_path, ownership.Owner(None, socket.gethostname(), ended.pid))
    me = ownership.Owner.current()
    ownership.claim(tmp_path, me)  # the process ended: the folder is free
    assert ownership.read_owner(tmp_path).pid == os.getpid()
    ownership.claim(tmp_path, me)  # taking one's own folder again is fine


def test_a_slurm_owner_that_cannot_be_checked_counts_as_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ownership.shutil, "which", lambda name: None)  # no squeue on this machine
    ownership.claim(tmp_path, ownership.Owner.submitted("4242"))
    with pytest.raises(
        ownership.OwnershipError, match=r"SLURM job 4242 .*\(squeue is not available here"
    ) as error:
        ownership.check_free(tmp_path, ownership.Owner.current())
    assert f"delete {tmp_path / ownership.OWNER_FILE}" in str(error.value)
    ownership.check_free(tmp_path, ownership.Owner("4242", "elsewhere", 1))  # the same job, requeued
