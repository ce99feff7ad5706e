"""Build an LVD-style curated dataset from a web URL list.

    python pipelines/build_lvd.py --seeds demo                            # the embedded demo web
    python pipelines/build_lvd.py --seeds imagenet --urls urls.parquet --out runs/lvd

Without --urls the pipeline runs on the embedded demo web: it generates it (seeded), serves it on
127.0.0.1 for the duration of the run, and allows that one address through the crawler's
internal-address block; the run goes to runs/demo/pass1, the first pass of `make demo`'s closed loop
(pipelines/closed_loop.py), which it shares. A demo web served elsewhere is a URL list with its
--ground-truth: the run then prints the same quality figures. Every stage resumes: rerun the same
command after an interruption.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from curation import demo_web, seeds
from curation.curate import (
    CurationConfig,
    CurationError,
    Embedders,
    StageCounts,
    near_threshold_examples,
    run_balance,
    run_curated,
    run_dedup,
    run_retrieval,
    write_lineage,
)
from curation.decode import ImageConfig
from curation.demo_quality import demo_quality, format_quality
from curation.embed import EmbedConfig, EmbedderError, EmbedError, check_spec, run_embed
from curation.fetch import FetchPolicy
from curation.ingest import IngestConfig, IngestError, read_pool, run_ingest
from curation.report import ReportInputs, build_report, embedding_lookup

DEMO_NETWORK = "127.0.0.1/32"
STAGES = ("ingest", "embed", "curate")
DEFAULT_SEMANTIC = "open_clip:ViT-L-14:openai"
# No weights can be fetched for the demo, and a randomly initialised network clusters by colour; the
# weight-free shape descriptor tells the demo web's concepts apart (curation/shape_descriptor.py).
DEMO_SEMANTIC = "hog"
DEMO_RUN = Path("runs/demo/pass1")  # the first curation pass of `make demo` (pipelines/closed_loop.py)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", required=True,
                        help=f"seed sets: registered names ({', '.join(sorted(seeds.REGISTRY))}) or ImageFolder paths")
    parser.add_argument("--urls", type=Path, help="URL list (Parquet, CSV, TSV or TXT with a url column); "
                        "omit for the embedded demo web")
    parser.add_argument("--out", type=Path, help=f"run directory (default: {DEMO_RUN} in demo mode)")
    parser.add_argument("--ground-truth", type=Path,
                        help="with --urls from a demo web served elsewhere: the ground truth that "
                        "curation.demo_web.DemoServer.write_url_list wrote beside them, for quality figures")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--url-col", default="url")
    parser.add_argument("--caption-col", default="caption")
    parser.add_argument("--samples-per-shard", type=int, help="URLs per download shard (default 10000; demo 200)")
    parser.add_argument("--threads", type=int, help="download threads per shard (default 64; demo 16)")
    parser.add_argument("--cpus-per-shard", type=float, default=1.0, help="Ray CPUs reserved by one shard task")
    parser.add_argument("--timeout", type=float, help="seconds per request (default 10; demo 5)")
    parser.add_argument("--retries", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=ImageConfig.image_size, help="shorter side stored")
    parser.add_argument("--max-pixels", type=int, default=ImageConfig.max_pixels)
    parser.add_argument("--max-bytes", type=int, default=FetchPolicy.max_bytes)
    parser.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                        help="let the crawler reach this internal network (repeatable), e.g. 127.0.0.1/32")
    parser.add_argument("--copy-embedder", default="pdq",
                        help="copy-detection descriptor: pdq (weight-free) or torchscript:SSCD.pt[:SIZE]")
    parser.add_argument("--semantic-embedder",
                        help="embedder for retrieval and clustering: open_clip:ARCH[:WEIGHTS], dino:CHECKPOINT, "
                        f"torchscript:PATH, hog (default {DEFAULT_SEMANTIC}; demo {DEMO_SEMANTIC})")
    parser.add_argument("--eval-sets", nargs="*", type=Path, default=[],
                        help="ImageFolders of evaluation sets whose near-copies are removed (demo: its eval set)")
    parser.add_argument("--dedup-threshold", type=float, help="copy similarity (default: the descriptor's)")
    parser.add_argument("--decontamination-threshold", type=float, help="(default: the descriptor's, looser)")
    parser.add_argument("--dedup-k", type=int, default=64, help="neighbours searched per image for copies")
    parser.add_argument("--levels", type=lambda s: tuple(int(v) for v in s.split(",")),
                        help="clusters per level of the hierarchical k-means, finest first, e.g. 1000,300")
    parser.add_argument("--resampling-steps", type=int, default=10)
    parser.add_argument("--balanced-share", type=float, default=0.15,
                        help="balanced sample size as a share of the deduplicated pool")
    parser.add_argument("--embed-cpus", type=float, default=0.5, help="Ray CPUs per embedding actor")
    parser.add_argument("--stop-after", choices=STAGES, default=STAGES[-1], help="run the stages up to this one")
    parser.add_argument("--no-progress", action="store_true")  # fmt: skip
    return parser.parse_args(argv)


def ingest_quality(run_dir: Path, ground_truth: Path) -> str:
    """How the ingest's outcome matches the demo web's planted truth."""
    truth = {r["url"]: r for r in pq.read_table(ground_truth).to_pylist()}
    pool = read_pool(run_dir).select(["url", "status", "error_class"]).to_pylist()
    as_expected = sum(
        1 for r in pool
        if r["status"] == truth[r["url"]]["expected_status"]
        and r["error_class"] == truth[r["url"]]["expected_error_class"]
    )  # fmt: skip
    return f"  demo ground truth: {as_expected}/{len(pool)} URLs ended as planted (status and error class)"


def embedding_runs(copy_spec: str, semantic_spec: str) -> list[tuple[str, str]]:
    """(name, spec) of the embeddings the curation needs; PDQ also describes mirrored images,
    since its hash is not flip-invariant."""
    runs = [("copy", copy_spec)]
    if copy_spec == "pdq":
        runs.append(("copy_mirrored", "pdq:mirrored"))
    return runs + [("semantic", semantic_spec)]


def ingest(args: argparse.Namespace, run_dir: Path, demo: bool, demo_root: Path) -> Path | None:
    """Download the URL list (or the demo web, served for the duration); returns the demo's ground truth
    (--ground-truth with --urls)."""
    allowed = list(args.allow_network)
    server, ground_truth = None, args.ground_truth
    if demo:
        # A rerun serves on the first run's ports when it can, so that the URLs stay the same.
        previous = demo_root / "ground_truth.parquet"
        port, refused_port = demo_web.DemoServer.ports_of(previous) if previous.exists() else (None, None)
        server = demo_web.DemoServer(demo_root / "site", port=port, refused_port=refused_port, slow_s=15).start()
        urls, ground_truth = server.write_url_list(demo_root)
        allowed.append(DEMO_NETWORK)
        print(f"demo web served at {server.base_url}; crawler allowed to reach {DEMO_NETWORK}", flush=True)
    else:
        urls = args.urls
    config = IngestConfig(
        urls=urls,
        run_dir=run_dir,
        url_col=args.url_col,
        caption_col=args.caption_col,
        samples_per_shard=args.samples_per_shard or (200 if demo else 10_000),
        threads_per_shard=args.threads or (16 if demo else 64),
        cpus_per_shard=args.cpus_per_shard,
        timeout_s=args.timeout or (5.0 if demo else 10.0),
        retries=args.retries,
        image=ImageConfig(image_size=args.image_size, max_pixels=args.max_pixels),
        policy=FetchPolicy(max_bytes=args.max_bytes, allowed_networks=tuple(allowed)),
    )
    try:
        result = run_ingest(config, ray_address=args.ray_address, progress=not args.no_progress)
    finally:
        if server is not None:
            server.stop()
    print(result.summary())
    if ground_truth is not None:
        print(ingest_quality(run_dir, ground_truth))
    print(f"pool manifest: {result.pool_dir}  (query: python -m curation.query {run_dir} \"SELECT ...\")")
    return ground_truth


def embed_pool(run_dir: Path, copy_spec: str, semantic_spec: str, *, ray_address: str | None = None,
               progress: bool = True, embed_cpus: float = 0.5) -> None:  # fmt: skip
    """Every embedding the curation needs (``embedding_runs``); finished parts are kept."""
    for name, spec in embedding_runs(copy_spec, semantic_spec):
        result = run_embed(run_dir, name, EmbedConfig(spec=spec, cpus_per_actor=embed_cpus),
                           ray_address=ray_address, progress=progress)  # fmt: skip
        print(f"embeddings {name}: {result.summary()}", flush=True)


def seeded_classes(seed_sets: tuple[seeds.SeedSet, ...]) -> set[str]:
    """The class folders of the seed sets: on a demo web, the concepts that retrieval should find."""
    return {folder.name for seed in seed_sets for folder in seed.root.iterdir() if folder.is_dir()}


@dataclass(frozen=True)
class CurationOutcome:
    stages: list[StageCounts]
    quality: dict[str, float]  # against the demo web's ground truth; empty without one
    report: Path


def curate(run_dir: Path, curation: CurationConfig, semantic_spec: str, ground_truth: Path | None) -> CurationOutcome:
    """Dedup, retrieval, balance and the curated manifest on finished embeddings, then lineage.json
    and the report; each stage is skipped when its stamp says it is done."""
    embedders = Embedders(curation.copy_spec, semantic_spec)
    stages = [run_dedup(run_dir, curation, embedders), run_retrieval(run_dir, curation, embedders),
              run_balance(run_dir, curation, embedders), run_curated(run_dir, curation)]  # fmt: skip
    figures = demo_quality(run_dir, ground_truth, seeded_classes(curation.seed_sets)) if ground_truth else {}
    write_lineage(run_dir, stages, {"embedders": {"copy": curation.copy_spec, "semantic": semantic_spec},
                                    "thresholds": dict(zip(("dedup", "decontamination"), curation.thresholds())),
                                    "quality": figures})  # fmt: skip
    for stage in stages:
        print(f"{stage.name:>9}: {stage.images_in} -> {stage.images_out}")
    report = build_report(run_dir, ReportInputs(
        near_threshold_pairs=near_threshold_examples(run_dir, curation), dedup_threshold=curation.thresholds()[0],
        quality=figures, seed_roots={s.name: s.root for s in curation.seed_sets},
        copy_embeddings=embedding_lookup(run_dir, "copy")))  # fmt: skip
    if figures:
        print("quality against the demo web's ground truth:\n" + format_quality(figures))
    print(f"curated manifest: {run_dir / 'manifests' / 'curated.parquet'}\nreport: {report}", flush=True)
    return CurationOutcome(stages, figures, report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = args.urls is None
    run_dir = args.out or (DEMO_RUN if demo else None)
    if run_dir is None:
        print("error: --out is required with --urls (the run directory)", file=sys.stderr)
        return 2
    if args.ground_truth is not None and (demo or not args.ground_truth.is_file()):
        problem = "goes with --urls (demo mode plants its own)" if demo else "is not a file"
        print(f"error: --ground-truth {args.ground_truth} {problem}: pass the ground_truth.parquet written "
              "beside the URL list by curation.demo_web.DemoServer.write_url_list, or leave it out", file=sys.stderr)  # fmt: skip
        return 2
    demo_root = run_dir / "demo"
    try:
        if demo:
            print(f"demo mode: generating the demo web under {demo_root}", flush=True)
            demo_web.generate(demo_root / "site")
        seed_sets = [seeds.resolve(s, demo_root / "site" / "seeds" if demo else None) for s in args.seeds]
        for seed in seed_sets:
            print(f"seed set {seed.name}: {seed.root} ({seed.retrieval}-based retrieval)")
        semantic_spec = args.semantic_embedder or (DEMO_SEMANTIC if demo else DEFAULT_SEMANTIC)
        eval_sets = tuple(args.eval_sets) or ((demo_root / "site" / "eval",) if demo else ())
        curation = CurationConfig(
            copy_spec=args.copy_embedder, dedup_threshold=args.dedup_threshold,
            decontamination_threshold=args.decontamination_threshold, dedup_k=args.dedup_k,
            eval_sets=eval_sets, seed_sets=tuple(seed_sets), clusters_per_level=args.levels,
            resampling_steps=args.resampling_steps, balanced_share=args.balanced_share,
        )  # fmt: skip
        # Everything that can be checked is checked before the first download.
        curation.thresholds()
        for spec in (args.copy_embedder, semantic_spec):
            check_spec(spec)
        for folder in eval_sets:
            seeds.check_image_folder(folder, f"evaluation set {folder}")
        ground_truth = ingest(args, run_dir, demo, demo_root)
        if args.stop_after == "ingest":
            return 0
        embed_pool(run_dir, args.copy_embedder, semantic_spec, ray_address=args.ray_address,
                   progress=not args.no_progress, embed_cpus=args.embed_cpus)  # fmt: skip
        if args.stop_after == "embed":
            return 0
        curate(run_dir, curation, semantic_spec, ground_truth)
    except (IngestError, seeds.SeedError, CurationError, EmbedderError, EmbedError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
