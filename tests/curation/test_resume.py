"""A demo ingest killed with SIGKILL mid-run resumes: nothing lost, nothing duplicated, nothing redone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from curation.ingest import read_pool

REPO = Path(__file__).resolve().parents[2]


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / "build_lvd.py"), "--seeds", "demo", "--out", str(run_dir),
            "--samples-per-shard", "100", "--threads", "8", "--timeout", "10", "--no-progress"]  # fmt: skip


def test_sigkill_then_rerun_completes_exactly(tmp_path):
    run_dir = tmp_path / "run"
    pool_dir = run_dir / "manifests" / "pool"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(_command(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(pool_dir.glob("part-*.parquet")):
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline, "no shard finished within 5 minutes"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its Ray workers and the demo server die together
    first.wait()
    survivors = {p.name: p.stat().st_mtime_ns for p in pool_dir.glob("part-*.parquet")}
    total = -(-pq.read_metadata(run_dir / "input" / "urls.parquet").num_rows // 100)
    assert 0 < len(survivors) < total, "the kill must land mid-run for this test to mean anything"

    second = subprocess.run(_command(run_dir), env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    # Shards a worker finished between the kill and its own death count as done too.
    skipped = int(re.search(r"\((\d+) already done, skipped\)", second.stdout).group(1))
    assert len(survivors) <= skipped < total, second.stdout
    # Shards finished before the kill were not downloaded again.
    assert {n: (pool_dir / n).stat().st_mtime_ns for n in survivors} == survivors
    pool = read_pool(run_dir)
    urls = pq.read_table(run_dir / "input" / "urls.parquet").column("url").to_pylist()
    assert pool.num_rows == len(urls)
    assert sorted(pool.column("url").to_pylist()) == sorted(urls)
    assert len(set(pool.column("key").to_pylist())) == len(urls)
    assert f"{len(urls)}/{len(urls)} URLs ended as planted" in second.stdout, second.stdout


def test_unresolvable_seed_set_fails_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGENET_ROOT", "LVD_SEEDS_FILE")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "build_lvd.py"), "--seeds", "imagenet",
                           "--urls", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "IMAGENET_ROOT" in done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "run" / "images").exists()
