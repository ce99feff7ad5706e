"""Multi-process training: environment detection, and real 2-process CPU runs under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pretrain.checkpoint import read_checkpoint
from pretrain.distributed import DistEnv, detect_environment, first_slurm_host, state_checksum
from pretrain.train import main
from tests.conftest import TINY_CROPS, TINY_NETWORK, TINY_SCHEDULE

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "pretrain" / "configs"
ITERATIONS = 4
TORCHRUN = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29400",
}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[07-08]"}


# ---------------------------------------------------------------- environment detection


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, DistEnv()),
        (TORCHRUN, DistEnv(1, 2, 1, "10.0.0.1", 29400, "torchrun")),
        ({**SLURM, **TORCHRUN}, DistEnv(1, 2, 1, "10.0.0.1", 29400, "torchrun")),  # torchrun inside SLURM
        ({**SLURM, "SLURM_JOB_ID": "123456"}, DistEnv(5, 8, 1, "gpu07", 20000 + 123456 % 20000, "slurm")),
        ({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}, DistEnv(5, 8, 1, "head", 1234, "slurm")),
        ({"SLURM_NTASKS": "4", "MASTER_ADDR": "head"}, DistEnv()),  # an salloc shell, no srun task
    ],
    ids=["single", "torchrun", "torchrun first", "slurm", "slurm with master", "no task"],
)
def test_environment_is_read_in_the_documented_order(environ: dict[str, str], expected: DistEnv) -> None:
    assert detect_environment(environ) == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RANK": "0"}, "RANK set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"),
        ({**TORCHRUN, "MASTER_PORT": ""}, "MASTER_PORT='' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_NODELIST": "a1"}, "SLURM_NTASKS, SLURM_LOCALID missing"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "set MASTER_ADDR"),
        ({**TORCHRUN, "RANK": "2"}, "need 0 <= rank < world size"),
    ],
)
def test_a_partial_environment_names_what_is_missing(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        detect_environment(environ)


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu[03-05,9],cpu1", "gpu03"), ("a1,a2", "a1"), ("node7", "node7"), ("rack-a-[001-004]", "rack-a-001")],
)
def test_the_master_is_the_first_host_of_the_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_slurm_host(nodelist) == host


def test_the_entry_point_rejects_a_partial_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for name in (*TORCHRUN, *SLURM):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (
        main(["--config", str(CONFIGS / "v1_tiny.yaml"), "data.image_folder=x", f"output_dir={tmp_path}"])
        == 2
    )
    assert "error: incomplete torchrun environment: WORLD_SIZE set but RANK" in capsys.readouterr().err


# ---------------------------------------------------------------- 2 processes on CPU


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(8):
        (folder / f"class{i % 2}").mkdir(exist_ok=True)
        array = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"class{i % 2}" / f"{i}.png")
    return folder


def run_args(output_dir: Path, images: Path, batch_size: int, *extra: str) -> list[str]:
    """v1 (DINO only, centering) on a 2-block ViT/8: the losses are means over the global batch, so
    2 processes × 4 images must match 1 × 8. (iBOT masks are drawn per rank and KoLeo is per process
    by the recipe: both differ between the two layouts by design, so they are left out here.)"""
    return [
        "--config",
        str(CONFIGS / "v1_tiny.yaml"),
        *TINY_NETWORK,
        "model.drop_path_rate=0.0",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        *TINY_CROPS,
        "schedule.epochs=2",
        *TINY_SCHEDULE,
        "train.device=cpu",
        f"data.image_folder={images}",
        f"output_dir={output_dir}",
        *extra,
    ]


def metric_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process with the global batch of 8."""
    output_dir = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(run_args(output_dir, images, 8)) == 0
    finally:
        torch.set_num_threads(threads)
    return output_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m",
        "pretrain.train",
        *args,
    ]
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_losses(output_dir: Path, reference_dir: Path) -> None:
    rows, reference = metric_rows(output_dir), metric_rows(reference_dir)
    assert [row["iteration"] for row in rows] == list(range(ITERATIONS))  # rank 0 alone writes
    for row, expected in zip(rows, reference, strict=True):
        for name in ("loss", "grad_norm/backbone", "grad_norm/dino_head"):
            assert row[name] == pytest.approx(expected[name], rel=1e-5), (row["iteration"], name)


def assert_close_teachers(output_dir: Path, reference_dir: Path) -> None:
    reference = load_file(reference_dir / "teacher_backbone.safetensors")
    for name, tensor in load_file(output_dir / "teacher_backbone.safetensors").items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5)


def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(
    images: Path, one_process: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "ddp"
    result = torchrun(run_args(output_dir, images, 4))
    assert_same_losses(output_dir, one_process)
    assert_close_teachers(output_dir, one_process)

    # Each rank hashed its own teacher; rank 0 logged them. They agree with each other and with
    # the teacher in rank 0's checkpoint.
    checksums = re.search(r"teacher checksums by rank: (\w+) (\w+)", result.stderr)
    assert checksums is not None, result.stderr[-4000:]
    checkpoint = read_checkpoint(output_dir / "checkpoints" / f"step-{ITERATIONS:07d}")
    teacher = {
        name.removeprefix("teacher."): tensor
        for name, tensor in checkpoint.model.items()
        if name.startswith("teacher.")
    }
    assert checksums.group(1) == checksums.group(2) == state_checksum(teacher)
    assert checkpoint.trainer["world_size"] == 2 and checkpoint.trainer["global_batch_size"] == 8
    rng = checkpoint.trainer["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # per-rank streams
    assert sorted(path.name for path in output_dir.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "teacher_backbone.json",
        "teacher_backbone.pt",
        "teacher_backbone.safetensors",
        "tensorboard",
    ]


def test_fsdp_on_two_processes_matches_and_resumes_in_one_process(
    images: Path, one_process: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "fsdp"
    torchrun(run_args(output_dir, images, 4, "train.parallelism=fsdp"))
    assert_same_losses(output_dir, one_process)
    assert_close_teachers(output_dir, one_process)

    # The consolidated checkpoint of 2 FSDP shards resumes in a single DDP-less process.
    assert main(run_args(output_dir, images, 8, "schedule.epochs=3")) == 0
    rows = metric_rows(output_dir)
    assert [row["iteration"] for row in rows] == list(range(ITERATIONS + 2))
    assert read_checkpoint(output_dir / "checkpoints" / "step-0000006").trainer["world_size"] == 1
