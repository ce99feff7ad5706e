"""The launch paths on a real (one-node) SLURM cluster: the sbatch script, the submitit launcher, requeues
that resume from the newest checkpoint, bad input refused before queueing or at once at start, and
the Ray curation script. Each run is a tiny v3 on CPU (the node's two GPUs are declared, not real)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import re
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import submitit
import yaml
from PIL import Image

from pretrain import launch, ownership, stages
from pretrain.config import PretrainConfig
from pretrain.config_io import dump_config, load_config

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 10
# Every iteration is checkpointed: the fsynced writes make a step slow enough for a signal sent after
# the second checkpoint to arrive before the end, and the requeued job resumes from the newest one.
SCHEDULE = (
    "data.augment.global_crop_size=32", "data.augment.local_crop_size=16", "schedule.epochs=5",
    "schedule.iters_per_epoch=2", "schedule.warmup_epochs=0", "schedule.warmup_teacher_temp_epochs=1",
    "checkpoint.every=1", "gram.start_iteration=4", "gram.refresh_every=2", "gram.n_refreshes=1",
)  # fmt: skip


@pytest.fixture(scope="module")
def curated_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/manifests/curated over one tar shard of 8 images, as the curation pipeline lays it out."""
    run = tmp_path_factory.mktemp("lvd")
    (run / "images").mkdir()
    with tarfile.open(run / "images" / "00000.tar", "w") as tar:
        for i in range(8):
            data = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                data, "PNG"
            )
            info = tarfile.TarInfo(f"img{i}.png")
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
    with tarfile.open(run / "images" / "00000.tar") as tar:
        rows = [{"key": m.name, "status": "success", "shard": "images/00000.tar", "offset": m.offset_data,
                 "nbytes": m.size} for m in tar.getmembers()]  # fmt: skip
    (run / "manifests" / "curated").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), run / "manifests" / "curated" / "part-00000.parquet")
    return run / "manifests" / "curated"


def wait_for_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.1)


def assert_finished_like_an_uninterrupted_run(output_dir: Path, total: int = ITERATIONS) -> None:
    """One metrics line per iteration, the final checkpoint and the export."""
    iterations = [
        json.loads(line)["iteration"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert iterations == list(range(total))
    assert (output_dir / "checkpoints" / f"step-{total:07d}" / "COMPLETE").is_file()
    assert (output_dir / "teacher_backbone.safetensors").is_file()


def resumed_at(log: str, total: int = ITERATIONS) -> int:
    match = re.search(rf"resumed from \S+/step-(\d+) at iteration (\d+) of {total}", log)
    assert match is not None, log[-3000:]
    return int(match.group(2))


def test_sbatch_pretrain_v3_trains_on_a_curated_manifest_and_requeues_itself_on_the_time_limit_signal(
    slurm_cluster, curated_manifest: Path, tiny_model: tuple[str, ...], tmp_path: Path
) -> None:
    output_dir = tmp_path / "v3"
    env = {**os.environ, "CONFIG": "pretrain/configs/v3_tiny.yaml", "MANIFEST": str(curated_manifest),
           "OUTPUT_DIR": str(output_dir), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # fmt: skip
    # No periodic checkpoint: whatever the requeued job resumes from, the signal made it. 40 iterations
    # leave the signal time to arrive before the end.
    iterations = 40
    schedule = (*SCHEDULE, "checkpoint.every=0", f"schedule.epochs={iterations // 2}")
    # The script's header asks for 2 nodes of 8 GPUs for 48 hours; this cluster has one node of 2.
    submitted = slurm_cluster.run(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
        "--time=15", f"--output={tmp_path}/slurm-%j.out", "slurm/pretrain_v3.sh", *tiny_model, *schedule,
        cwd=REPO, env=env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, "training did not start within 180 s"
        time.sleep(0.05)
    assert json.loads((output_dir / ownership.OWNER_FILE).read_text())["job_id"] == job
    # What --signal=B:USR1@300 sends five minutes before the time limit: the shell passes it to the
    # task, which checkpoints the iteration it is at and stops; then the job requeues itself.
    assert slurm_cluster.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    assert slurm_cluster.wait_for(job, {"COMPLETED", "FAILED"}, timeout_s=240, release=True) == "COMPLETED"
    log = (tmp_path / f"slurm-{job}.out").read_text()
    stopped = re.search(rf"stopped by SIGUSR1 after iteration (\d+) of {iterations}", log)
    assert stopped is not None, log[-3000:]
    assert f"requeueing job {job} (1 of 3)" in log and "(restart 1)" in log
    assert 2 <= resumed_at(log, iterations) == int(stopped.group(1)) < iterations
    assert_finished_like_an_uninterrupted_run(output_dir, iterations)


def test_launcher_job_preempted_requeues_resumes_and_finishes_with_the_full_step_count(
    slurm_cluster, noise_images: Path, tiny_model: tuple[str, ...], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # sbatch hands it to the job
    output_dir = tmp_path / "v3"
    args = ["--nodes", "1", "--gpus-per-node", "1", "--cpus-per-task", "1", "--partition", "debug", "--time", "30",
            "--max-requeues", "1", "--config", "pretrain/configs/v3_tiny.yaml", *tiny_model, *SCHEDULE,
            f"data.image_folder={noise_images}", f"output_dir={output_dir}"]  # fmt: skip
    monkeypatch.chdir(REPO)
    assert launch.main(args) == 0
    job = re.search(r"^job (\d+):", capsys.readouterr().out, re.MULTILINE).group(1)
    assert json.loads((output_dir / ownership.OWNER_FILE).read_text())["job_id"] == job  # pending: owned
    wait_for_file(output_dir / "checkpoints" / "step-0000002" / "COMPLETE", timeout_s=180)
    # submitit's own preemption: USR2 to the tasks. The trainer checkpoints the iteration it is at and
    # stops, then hands the signal to submitit, whose checkpoint() asks for the requeue.
    submitit.SlurmJob(output_dir / launch.JOBS_FOLDER / job, job)._interrupt()
    assert slurm_cluster.wait_for(job, {"COMPLETED", "FAILED"}, timeout_s=240, release=True) == "COMPLETED"
    folder = output_dir / launch.JOBS_FOLDER / job
    log = (folder / f"{job}_0_log.out").read_text() + (folder / f"{job}_0_log.err").read_text()
    stopped = re.search(rf"stopped by SIGUSR2 after iteration (\d+) of {ITERATIONS}", log)
    assert stopped is not None, log[-3000:]
    assert "this job is preempted" in log and "requeued (1 of 1)" in log
    assert 2 <= resumed_at(log) == int(stopped.group(1)) < ITERATIONS
    assert_finished_like_an_uninterrupted_run(output_dir)


def held_job(slurm_cluster) -> str:
    submitted = slurm_cluster.run("sbatch", "--parsable", "--hold", "--time=1", "--wrap", "true")
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


@pytest.mark.parametrize(
    ("cluster", "extra", "message"),
    [
        (
            ("--gpus-per-node", "8"),
            (),
            "--gpus-per-node 8 but the nodes of partition 'debug' have at most 2 GPUs",
        ),
        (("--nodes", "3"), (), "--nodes 3 but partition 'debug' has 1 nodes"),
        (("--partition", "gpu"), (), "partition 'gpu' does not exist; sinfo lists: debug"),
        ((), ("data.manifest=/nowhere/manifests/curated",), "manifest not found: /nowhere/manifests/curated"),
        ((), ("schedule.epocs=3",), "unknown config key 'schedule.epocs'; did you mean 'schedule.epochs'?"),
        ((), ("model.arch=vit_tiny",), "holds checkpoints of another architecture"),
        ((), (), "which is still alive (squeue: PENDING)"),
    ],
    ids=[
        "gpus per node",
        "nodes",
        "partition",
        "missing manifest",
        "unknown key",
        "architecture",
        "owned folder",
    ],
)
def test_bad_input_is_refused_before_queueing(
    cluster: tuple[str, ...], extra: tuple[str, ...], message: str, slurm_cluster, noise_images: Path,
    tiny_model: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    output_dir = tmp_path / "v3"
    request = {
        "--gpus-per-node": "1",
        "--cpus-per-task": "1",
        "--time": "10",
        **dict(zip(cluster[::2], cluster[1::2])),
    }
    args = [*(item for pair in request.items() for item in pair), "--config", str(REPO / "pretrain/configs/v3_tiny.yaml"),
            *tiny_model, f"data.image_folder={noise_images}", f"output_dir={output_dir}", *extra]  # fmt: skip
    holder = None
    if "architecture" in message:
        # A run of the tiny config left its checkpoints: vit_tiny cannot continue it.
        folder = output_dir / "checkpoints" / "step-0000002"
        folder.mkdir(parents=True)
        config = load_config(PretrainConfig, REPO / "pretrain/configs/v3_tiny.yaml",
                             [*tiny_model, f"data.image_folder={noise_images}"])  # fmt: skip
        (folder / "config.yaml").write_text(yaml.safe_dump(dump_config(config)))
        (folder / "COMPLETE").write_text("2\n")
    elif "still alive" in message:
        holder = held_job(slurm_cluster)
        ownership.claim(output_dir, ownership.Owner.submitted(holder))
        message = f"belongs to SLURM job {holder} on {socket.gethostname()}"
    before = slurm_cluster.jobs()
    try:
        assert launch.main(args) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error, error
        assert slurm_cluster.jobs() == before  # nothing queued
    finally:
        if holder is not None:
            slurm_cluster.run("scancel", holder)


def test_sbatch_job_fails_at_once_when_another_job_owns_its_folder(
    slurm_cluster, noise_images: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "v3"
    holder = held_job(slurm_cluster)
    ownership.claim(output_dir, ownership.Owner.submitted(holder))
    env = {**os.environ, "CONFIG": "pretrain/configs/v3_tiny.yaml", "IMAGE_FOLDER": str(noise_images),
           "OUTPUT_DIR": str(output_dir), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # fmt: skip
    try:
        submitted = slurm_cluster.run(
            "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
            "--time=5", f"--output={tmp_path}/slurm-%j.out", "slurm/pretrain_v3.sh", cwd=REPO, env=env,
        )  # fmt: skip
        job = submitted.stdout.strip()
        assert slurm_cluster.wait_for(job, {"COMPLETED", "FAILED"}, timeout_s=240) == "FAILED"
    finally:
        slurm_cluster.run("scancel", holder)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"error: output_dir {output_dir} belongs to SLURM job {holder}" in log
    assert "srun" not in log and not (output_dir / "metrics.jsonl").exists()  # no training process started


def test_curate_ray_starts_a_ray_cluster_and_runs_the_pipeline_on_it(
    slurm_cluster, noise_images: Path, tmp_path: Path
) -> None:
    """A Ray head on the allocation's node (a one-node allocation: no workers), then build_lvd.py's
    ingest stage through --ray-address, over a URL list served on this machine."""
    served = tmp_path / "www"
    served.mkdir()
    for i, image in enumerate(sorted(noise_images.rglob("*.png"))[:4]):
        (served / f"{i}.png").write_bytes(image.read_bytes())
    urls = tmp_path / "urls.parquet"
    env = {**os.environ, "PYTHON": sys.executable, "RAY_PORT": str(free_ray_port())}
    with http_server(served) as port:
        pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/{i}.png" for i in range(4)]}), urls)
        submitted = slurm_cluster.run(
            "sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--time=10", f"--output={tmp_path}/slurm-%j.out",
            "slurm/curate_ray.sh", "--seeds", str(noise_images), "--urls", str(urls), "--out", str(tmp_path / "lvd"),
            "--stop-after", "ingest", "--allow-network", "127.0.0.1/32", "--semantic-embedder", "open_clip:ViT-B-32",
            "--samples-per-shard", "2", "--threads", "2", "--no-progress", cwd=REPO, env=env,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip()
        state = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED"}, timeout_s=300)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert re.search(r"Ray cluster at \S+: 1 nodes", log)
    assert "success: 4   failed: 0" in log
    pool = pq.read_table(tmp_path / "lvd" / "manifests" / "pool")
    assert pool.num_rows == 4 and set(pool.column("status").to_pylist()) == {"success"}


def free_ray_port() -> int:
    """A free port for the Ray head, below the range Ray gives its workers (10002-19999)."""
    for port in range(6400, 7000, 3):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port between 6400 and 7000")


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[int]:
    """Serve ``folder`` on 127.0.0.1 from a thread; yields its port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join()


def test_stages_are_queued_as_a_chain_that_a_failed_stage_cancels(
    slurm_cluster, noise_images: Path, tiny_model: tuple[str, ...], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    output = tmp_path / "stages"
    monkeypatch.chdir(REPO)
    args = ["--nodes", "1", "--gpus-per-node", "1", "--cpus-per-task", "1", "--time", "10",
            "--pipeline", "pretrain/configs/stages/v3_tiny.yaml", "--output", str(output), *tiny_model,
            f"data.image_folder={noise_images}"]  # fmt: skip
    assert stages.main(args) == 0
    jobs = re.findall(r"^stage \w+: job (\d+):", capsys.readouterr().out, re.MULTILINE)
    assert len(jobs) == 3
    for name, job in zip(("pretrain", "gram", "highres"), jobs):
        assert json.loads((output / name / ownership.OWNER_FILE).read_text())["job_id"] == job
    for previous, job in zip(jobs, jobs[1:]):
        details = slurm_cluster.run("scontrol", "show", "job", job).stdout
        assert f"Dependency=afterok:{previous}" in details
    slurm_cluster.run("scancel", jobs[0])  # the first stage fails: the others are cancelled
    for job in jobs[1:]:
        assert slurm_cluster.wait_for(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout_s=120) == "CANCELLED"
