"""Benchmark: our ingest against standalone img2dataset on the same demo web and server, in one run.

    python bench/ingest.py [--rounds 2] [--out docs/benchmarks.md]

Both download the same URL list from the same local server with the same shard size, threads
per shard and number of parallel shards; runs alternate (ours, theirs, ours, theirs) so machine
noise hits both alike. Ours is timed twice: end to end including starting Ray, and with Ray
already up (the cluster case, where Ray is running before the job). Throughput is successful
images per second of wall time. Target: ours >= 0.8 of standalone img2dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation import demo_web, ray_runtime  # noqa: E402
from curation.decode import ImageConfig  # noqa: E402
from curation.fetch import FetchPolicy  # noqa: E402
from curation.ingest import IngestConfig, run_ingest  # noqa: E402

SHARD, THREADS, PARALLEL, TIMEOUT, SIZE = 200, 16, 2, 5.0, 512


def run_ours(urls: Path, out: Path) -> tuple[float, int]:
    config = IngestConfig(urls=urls, run_dir=out, samples_per_shard=SHARD, threads_per_shard=THREADS,
                          cpus_per_shard=1.0, timeout_s=TIMEOUT, image=ImageConfig(image_size=SIZE),
                          policy=FetchPolicy(allowed_networks=("127.0.0.1/32",)))  # fmt: skip
    start = time.perf_counter()
    result = run_ingest(config, progress=False)
    return time.perf_counter() - start, result.status_counts.get("success", 0)


def run_img2dataset(urls: Path, out: Path) -> tuple[float, int]:
    from img2dataset import download

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
                 output_format="webdataset", output_folder=str(out), processes_count=PARALLEL,
                 thread_count=THREADS, number_sample_per_shard=SHARD, image_size=SIZE, resize_mode="keep_ratio",
                 resize_only_if_bigger=True, timeout=TIMEOUT, compute_hash="sha256", enable_wandb=False,
                 distributor="multiprocessing")  # fmt: skip
    seconds = time.perf_counter() - start
    successes = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, successes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    root = demo_web.generate(work / "site")
    results: dict[str, list[float]] = {"ours (Ray started by the job)": [], "ours (Ray already up)": [],
                                       "img2dataset standalone": []}  # fmt: skip
    with demo_web.DemoServer(root, slow_s=TIMEOUT + 5) as server:
        urls, _ = server.write_url_list(work)
        n_urls = pq.read_metadata(urls).num_rows
        for r in range(args.rounds):
            if ray.is_initialized():
                ray.shutdown()
            seconds, ok = run_ours(urls, work / f"ours_cold_{r}")  # starts Ray itself
            results["ours (Ray started by the job)"].append(ok / seconds)
            seconds, ok = run_ours(urls, work / f"ours_warm_{r}")  # Ray is up now
            results["ours (Ray already up)"].append(ok / seconds)
            seconds, ok = run_img2dataset(urls, work / f"theirs_{r}")
            results["img2dataset standalone"].append(ok / seconds)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in results.items()), flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in results.items()}
    base = median["img2dataset standalone"]
    lines = [
        "## Ingest throughput (bench/ingest.py)",
        "",
        f"Demo web, {n_urls} URLs (54 planted failures, 3 of them 5 s timeouts) from a local server; "
        f"{SHARD} URLs per shard, {THREADS} threads per shard, {PARALLEL} shards in parallel, "
        f"images stored at shorter side <= {SIZE}. Median of {args.rounds} alternating rounds, "
        f"{platform.processor() or platform.machine()}, {ray_runtime.os.cpu_count()} cores.",
        "",
        "| pipeline | images/s | ratio to img2dataset |",
        "|---|---|---|",
        *[f"| {k} | {v:.1f} | {v / base:.2f} |" for k, v in median.items()],
        "",
    ]
    table = "\n".join(lines)
    print(table)
    _write_section(args.out, table)
    return 0


def _write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of docs/benchmarks.md, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nFigures measured on the project's 2-core machine.\n"
    heading = section.splitlines()[0]
    if heading in text:
        before, _, rest = text.partition(heading)
        after = rest.split("\n## ", 1)
        text = before + section + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
