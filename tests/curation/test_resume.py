"""The whole demo pipeline in a subprocess, as `make demo` runs it: killed with SIGKILL mid-ingest,
rerun to the end. Nothing lost, nothing duplicated, nothing redone; then the curation's quality
against the demo web's ground truth, and the bad-input exits of the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.ingest import read_pool
from curation.schemas import CURATED_SCHEMA

REPO = Path(__file__).resolve().parents[2]
SHARD = 100


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / "build_lvd.py"), "--seeds", "demo", "--out", str(run_dir),
            "--samples-per-shard", str(SHARD), "--threads", "8", "--timeout", "10", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def killed_then_finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    pool_dir = run_dir / "manifests" / "pool"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(_command(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(pool_dir.glob("part-*.parquet")):
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline, "no shard finished within 5 minutes"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its Ray head and the demo server die together
    first.wait()
    survivors = {p.name: p.stat().st_mtime_ns for p in pool_dir.glob("part-*.parquet")}
    second = subprocess.run(_command(run_dir), env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    return run_dir, survivors, second.stdout


def test_sigkill_then_rerun_completes_exactly(killed_then_finished):
    run_dir, survivors, stdout = killed_then_finished
    pool_dir = run_dir / "manifests" / "pool"
    total = -(-pq.read_metadata(run_dir / "input" / "urls.parquet").num_rows // SHARD)
    assert 0 < len(survivors) < total, "the kill must land mid-run for this test to mean anything"
    # Shards a worker finished between the kill and its own death count as done too.
    skipped = int(re.search(r"\((\d+) already done, skipped\)", stdout).group(1))
    assert len(survivors) <= skipped < total, stdout
    # Shards finished before the kill were not downloaded again.
    assert {n: (pool_dir / n).stat().st_mtime_ns for n in survivors} == survivors
    pool = read_pool(run_dir)
    urls = pq.read_table(run_dir / "input" / "urls.parquet").column("url").to_pylist()
    assert pool.num_rows == len(urls)
    assert sorted(pool.column("url").to_pylist()) == sorted(urls)
    assert len(set(pool.column("key").to_pylist())) == len(urls)
    assert f"{len(urls)}/{len(urls)} URLs ended as planted" in stdout, stdout


def test_curation_meets_its_quality_targets_on_the_demo_web(killed_then_finished):
    run_dir, _, stdout = killed_then_finished
    lineage = json.loads((run_dir / "lineage.json").read_text())
    figures = lineage["quality"]
    assert figures["dedup_precision"] >= 0.95 and figures["dedup_recall"] >= 0.9, figures
    assert figures["leak_removal_recall"] >= 0.9, figures
    # With the weight-free outline descriptor as semantic embedder (the demo's default). The balance
    # figures are reported, not targeted: with this descriptor the margin over a random sample is
    # within seed noise (docs/curation.md); test_curate checks balancing with separating embeddings.
    assert figures["retrieval_precision"] >= 0.8, figures
    for name in ("entropy_balanced", "entropy_random_sample"):
        assert 0 <= figures[name] <= 1
    assert "retrieval_precision" in stdout and "report:" in stdout
    names = [s["name"] for s in lineage["stages"]]
    assert names == ["dedup", "retrieval", "balance", "curated"]
    assert lineage["embedders"]["copy"] == "pdq" and lineage["versions"]["faiss"]


def test_curated_manifest_is_readable_and_consistent(killed_then_finished):
    run_dir, _, _ = killed_then_finished
    curated = pq.read_table(run_dir / "manifests" / "curated.parquet")
    assert curated.schema.remove_metadata() == CURATED_SCHEMA
    assert len(set(curated.column("key").to_pylist())) == curated.num_rows
    assert set(curated.column("source").to_pylist()) == {"retrieval", "balance", "seed"}
    dedup = pq.read_table(run_dir / "manifests" / "dedup.parquet").to_pylist()
    dropped = {r["key"] for r in dedup if not r["keep"]}
    assert not dropped & set(curated.column("key").to_pylist()), "a copy or a leak reached the curated set"
    for row in curated.to_pylist()[:: max(1, curated.num_rows // 20)]:
        with open(run_dir / row["shard"], "rb") as f:
            f.seek(row["offset"])
            assert len(f.read(row["nbytes"])) == row["nbytes"]


def test_rerun_of_a_finished_run_redoes_nothing(killed_then_finished):
    run_dir, _, _ = killed_then_finished
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "manifests").glob("*.parquet")}
    stamps.pop(run_dir / "manifests" / "curated.parquet")  # cheap and always rewritten
    again = subprocess.run(_command(run_dir), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "imagenet"], "IMAGENET_ROOT"),
    (["--seeds", "demo", "--semantic-embedder", "nope:x"], "unknown embedder scheme"),
    (["--seeds", "demo", "--dedup-threshold", "1.5"], "cosine similarity in (0, 1]"),
    (["--seeds", "demo", "--eval-sets", "/nonexistent"], "is not a directory"),
    (["--seeds", "demo", "--ground-truth", "/nonexistent.parquet"], "goes with --urls"),
    (["--seeds", "/tmp", "--ground-truth", "/nonexistent.parquet"], "is not a file"),
])  # fmt: skip
def test_bad_input_fails_before_any_download(tmp_path, args, message):
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGENET_ROOT", "LVD_SEEDS_FILE")}
    (tmp_path / "urls.txt").write_text("http://example.invalid/x.jpg\n")
    urls = [] if "demo" in args else ["--urls", str(tmp_path / "urls.txt")]
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "build_lvd.py"), *args, *urls,
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "run" / "images").exists()


def test_empty_pool_stops_with_a_clear_message_and_keeps_the_ingest(tmp_path):
    from PIL import Image

    (tmp_path / "seeds" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "seeds" / "a" / "x.jpg")
    (tmp_path / "urls.txt").write_text("file:///etc/hostname\nftp://127.0.0.1/x.jpg\n")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "build_lvd.py"), "--seeds", str(tmp_path / "seeds"),
                           "--urls", str(tmp_path / "urls.txt"), "--out", str(run_dir), "--semantic-embedder", "pdq",
                           "--no-progress"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 2 and "no stored image" in done.stderr, done.stdout + done.stderr
    assert read_pool(run_dir).num_rows == 2  # the finished ingest stays
