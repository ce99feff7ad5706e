"""Benchmarks of the curation stages, one function per section, on this machine in one run.

    python bench/curation.py [--sections embed] [--json results.json] [--out docs/benchmarks.md]

Each section returns its figures (JSON) and a markdown table; the tables go under the heading
"## Curation (bench/curation.py)" of docs/benchmarks.md, one "### section" each: a run replaces the
subsections it ran (in place) and keeps the others.

embed: the embed stage (default EmbedConfig: Ray Data actors reading JPEGs from tar shards by offset)
against the same model's bare forward loop in one process (same images, read the same way, same
preprocessing and batch size), at torch's default thread count and at one thread (on a busy machine
one thread can win: intra-op threads wait for each other), alternating so machine noise hits all
alike. Ray is started before timing (the cluster case); the stage's time includes starting its
actors and loading the model in them, the loop's includes loading the model. Model: a ViT-S/16
exported as this project's pretraining does (``dino:`` spec, random weights). Target: stage >= 0.9
of the faster loop.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/, whose curation.py would shadow the package

from bench.curation_cores import add_arguments  # noqa: E402
from bench.ingest import _write_section  # noqa: E402
from curation import ray_runtime  # noqa: E402
from curation.embed import EmbedConfig, load_embedder, run_embed  # noqa: E402
from curation.ingest import pool_part, tar_index  # noqa: E402
from pretrain.models import build_vit  # noqa: E402

HEADING = "## Curation (bench/curation.py)"


# ---------------------------------------------------------------- embed


def synthetic_pool(run_dir: Path, images: int, per_shard: int, seed: int = 0) -> None:
    """A pool of smooth random 512x384 JPEGs (the ingest's default stored size) in tar shards with
    their pool parts, laid out as the ingest writes them."""
    rng = np.random.default_rng(seed)
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "manifests" / "pool").mkdir(parents=True)
    for shard in range(-(-images // per_shard)):
        name = f"{shard:05d}"
        keys = [f"{name}{i:04d}" for i in range(min(per_shard, images - shard * per_shard))]
        with tarfile.open(run_dir / "images" / f"{name}.tar", "w") as tar:
            for key in keys:
                coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((512, 384), Image.Resampling.BICUBIC)
                data = io.BytesIO()
                image.save(data, "JPEG", quality=90)
                member = tarfile.TarInfo(f"{key}.jpg")
                member.size = data.tell()
                data.seek(0)
                tar.addfile(member, data)
        meta = pa.table({"key": keys, "url": [f"https://example.invalid/{k}.jpg" for k in keys],
                         "status": ["success"] * len(keys), "error_message": pa.nulls(len(keys), pa.string())})  # fmt: skip
        index = tar_index(run_dir / "images" / f"{name}.tar")
        pq.write_table(
            pool_part(meta, index, f"images/{name}.tar"),
            run_dir / "manifests" / "pool" / f"part-{name}.parquet",
        )


def bare_loop(run_dir: Path, spec: str, batch_size: int, threads: int) -> int:
    """The reference: one process with ``threads`` torch threads reads, decodes, preprocesses and
    embeds batch after batch."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        embedder = load_embedder(spec, "cpu")
        parts = sorted((run_dir / "manifests" / "pool").glob("*.parquet"))
        rows = (
            pa.concat_tables(pq.read_table(p) for p in parts)
            .select(["shard", "offset", "nbytes"])
            .to_pylist()
        )
        done = 0
        for start in range(0, len(rows), batch_size):
            items = []
            for row in rows[start : start + batch_size]:
                with open(run_dir / row["shard"], "rb") as f:
                    f.seek(row["offset"])
                    items.append(embedder.preprocess(Image.open(io.BytesIO(f.read(row["nbytes"])))))
            done += len(embedder.embed_batch(items))
        return done
    finally:
        torch.set_num_threads(default)


def bench_embed(args: argparse.Namespace) -> tuple[dict, str]:
    cores = torch.get_num_threads()
    bare = {
        f"bare loop, 1 process, {cores} torch threads (default)": cores,
        "bare loop, 1 process, 1 torch thread": 1,
    }
    stage = "embed stage (Ray Data, default EmbedConfig)"
    steady = "embed stage after its first batch"
    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        run_dir = work / "run"
        synthetic_pool(run_dir, args.images, per_shard=-(-args.images // 4))
        torch.manual_seed(0)
        config = {"name": "vit_small", "img_size": args.image_size}
        teacher = work / "teacher_backbone.pt"
        torch.save({"config": config, "state_dict": build_vit(**config).state_dict()}, teacher)
        spec = f"dino:{teacher}"
        ray_runtime.init_ray()
        rates: dict[str, list[float]] = {name: [] for name in [*bare, stage, steady]}
        startups: list[float] = []
        for r in range(args.rounds):
            for name, threads in bare.items():
                start = time.perf_counter()
                images = bare_loop(run_dir, spec, args.batch_size, threads)
                rates[name].append(images / (time.perf_counter() - start))
            result = run_embed(
                run_dir, f"round{r}", EmbedConfig(spec, batch_size=args.batch_size), progress=False
            )
            rates[stage].append(result.images_per_second)
            startups.append(result.startup_seconds)
            rates[steady].append(
                (result.images - args.batch_size) / (result.seconds - result.startup_seconds)
            )
            print(
                f"embed round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    base = max(median[name] for name in bare)  # the stronger reference
    startup = statistics.median(startups)
    figures = {"images": args.images, "image_size": args.image_size, "batch_size": args.batch_size,
               "rounds": args.rounds, "images_per_s": median, "stage_startup_s": startup,
               "ratio_to_best_bare_loop": median[stage] / base}  # fmt: skip
    table = "\n".join([
        "### embed",
        "",
        f"{args.images} synthetic 512x384 JPEGs in 4 tar shards, ViT-S/16 (random weights, `dino:` export) at "
        f"{args.image_size} px, fp32 on CPU, batch {args.batch_size}. Median of {args.rounds} alternating rounds; "
        "Ray already up; stage time includes starting its actors and loading the model in them "
        f"(first batch back after {startup:.1f} s); the last row leaves that fixed cost out. "
        "Ratio to the faster bare loop; target >= 0.9. Other jobs share this machine: rates move by "
        "tens of percent from run to run.",
        "",
        "| pipeline | images/s | ratio to the faster bare loop |",
        "|---|---|---|",
        *[f"| {name} | {value:.1f} | {value / base:.2f} |" for name, value in median.items()],
        "",
    ])  # fmt: skip
    return figures, table


def bench_dedup_kmeans(args: argparse.Namespace) -> tuple[dict, str]:
    """Copy dedup through IVF against exact search, and hierarchical k-means, on synthetic vectors
    (bench/curation_cores.py holds the measurement)."""
    from bench.curation_cores import markdown_table, run

    results = run(args)
    intro = (f"### dedup_kmeans\n\n{args.dim}-d synthetic unit vectors with 2 % planted near-copies; IVF (nprobe "
             f"{args.nprobe}), k = {args.k}, threshold {args.threshold}; exact self-kNN extrapolated from "
             f"{args.recall_sample} exact queries; hierarchical k-means {args.iterations} iterations, "
             f"{args.resampling_steps} resampling steps. Target at 10^6: recall >= 0.98, >= 10x faster than exact.\n\n")  # fmt: skip
    return {"results": results}, intro + markdown_table(results) + "\n"


SECTIONS: dict[str, Callable[[argparse.Namespace], tuple[dict, str]]] = {
    "embed": bench_embed,
    "dedup_kmeans": bench_dedup_kmeans,
}


# ---------------------------------------------------------------- report


def merge_subsections(path: Path, tables: dict[str, str]) -> str:
    """This benchmark's section of ``path`` with the given "### name" subsections replaced or added."""
    text = path.read_text() if path.exists() else ""
    old = text.partition(HEADING)[2].split("\n## ", 1)[0] if HEADING in text else ""
    subsections = {}
    for chunk in old.split("\n### ")[1:]:
        subsections[chunk.split("\n", 1)[0].strip()] = "### " + chunk.strip("\n") + "\n"
    subsections.update({name: table.strip("\n") + "\n" for name, table in tables.items()})
    header = (f"{HEADING}\n\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}.\n")  # fmt: skip
    return header + "".join(f"\n{table}" for table in subsections.values())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=512, help="embed: pool images")
    parser.add_argument(
        "--image-size", type=int, default=112, help="embed: model input side (multiple of 16)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="embed: images per batch")
    add_arguments(parser.add_argument_group("dedup_kmeans"))
    args = parser.parse_args()
    names = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    figures, tables = {}, {}
    for name in names:
        figures[name], tables[name] = SECTIONS[name](args)
        print(tables[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    _write_section(args.out, merge_subsections(args.out, tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
