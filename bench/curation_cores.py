"""Benchmark of the curation cores on synthetic data: copy dedup through an IVF index (wall time, pair
recall against exact search, planted copies recovered) and hierarchical k-means time.

Data: L2-normalised 256-d vectors drawn around n/1000 cluster centres (cosine ~0.3 within a cluster),
plus planted near-duplicates of 2% of the rows with similarity uniform in [0.65, 0.95].

Exact self-search of 10^6 vectors takes hours on a few CPU cores, so exact search is run only for a
random query sample; its full cost is extrapolated linearly in the number of queries and reported as
such. The hierarchical k-means uses lighter settings than the library defaults (20 iterations, 3
resampling steps instead of 50 and 10) so that a CPU run finishes; pass --iterations 50
--resampling-steps 10 for the recipe.

    python bench/curation_cores.py --sizes 100000 --out bench_100k.json        # ~45 s on 2 cores
    python bench/curation_cores.py --sizes 100000,1000000 --out bench_1m.json  # 10^6: 1-2 h on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before bench/, whose curation.py would shadow the package

from curation.balance import HierarchicalKMeansConfig, KMeansConfig, hierarchical_kmeans  # noqa: E402
from curation.dedup import components_from_neighbours  # noqa: E402
from curation.knn import KnnConfig, build_index, default_nlist, measure_recall, self_knn  # noqa: E402

PLANTED_SHARE = 0.02
POINTS_PER_CENTRE = 1000


def synthetic(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n unit vectors whose last PLANTED_SHARE·n rows are near-copies of random earlier rows.
    Returns (vectors, original rows, copy rows)."""
    rng = np.random.default_rng(seed)
    num_copies = int(n * PLANTED_SHARE)
    num_base = n - num_copies
    centres = rng.normal(size=(max(1, num_base // POINTS_PER_CENTRE), dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    chunk = 100_000
    for start in range(0, num_base, chunk):
        stop = min(start + chunk, num_base)
        # Noise of 1.5x the centre norm gives cosine ~1 / (1 + 1.5²) ≈ 0.3 between cluster members.
        block = centres[rng.integers(0, len(centres), stop - start)] + 1.5 * rng.normal(
            size=(stop - start, dim)
        ).astype(np.float32)
        x[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    originals = rng.integers(0, num_base, num_copies)
    similarity = rng.uniform(0.65, 0.95, num_copies).astype(np.float32)
    noise = rng.normal(size=(num_copies, dim)).astype(np.float32)
    noise -= (noise * x[originals]).sum(axis=1, keepdims=True) * x[originals]  # orthogonal: exact similarity
    noise *= (np.sqrt(1 / similarity**2 - 1) / np.linalg.norm(noise, axis=1))[:, None]
    copies = x[originals] + noise
    x[num_base:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return x, originals, np.arange(num_base, n)


def bench_size(n: int, args: argparse.Namespace) -> dict:
    x, originals, copies = synthetic(n, args.dim, args.seed)
    knn = KnnConfig(index="ivf", nprobe=args.nprobe, seed=args.seed)

    start = time.perf_counter()
    index = build_index(x, knn)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    similarities, indices = self_knn(x, args.k, knn, index=index)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    dedup = components_from_neighbours(similarities, indices, args.threshold)
    components_s = time.perf_counter() - start
    del similarities, indices

    recall = measure_recall(x, knn, args.recall_sample, args.threshold, args.k, args.seed, index=index)
    del index

    levels = (n // 100, n // 1000)
    config = HierarchicalKMeansConfig(
        clusters_per_level=levels,
        resampling_steps=args.resampling_steps,
        kmeans=KMeansConfig(iterations=args.iterations, seed=args.seed),
    )
    start = time.perf_counter()
    hierarchical_kmeans(x, config)
    hkmeans_s = time.perf_counter() - start

    return {
        "n": n,
        "dim": args.dim,
        "dedup": {
            "index": "ivf",
            "nlist": default_nlist(n),
            "nprobe": args.nprobe,
            "k": args.k,
            "threshold": args.threshold,
            "build_s": build_s,
            "search_s": search_s,
            "components_s": components_s,
            "total_s": build_s + search_s + components_s,
            "components": dedup.num_components,
            "planted_pairs": len(copies),
            "planted_pairs_joined": float(np.mean(dedup.component[originals] == dedup.component[copies])),
        },
        "recall": {
            **asdict(recall),
            "recall": recall.recall,
            "exact_full_self_knn_s_extrapolated": recall.exact_seconds * n / recall.sample_size,
        },
        "hierarchical_kmeans": {
            "levels": list(levels),
            "iterations": args.iterations,
            "resampling_steps": args.resampling_steps,
            "seconds": hkmeans_s,
        },
    }


def print_table(results: list[dict]) -> None:
    header = (
        f"{'n':>9} {'ivf build s':>11} {'search s':>9} {'dedup s':>8} {'recall':>7} {'pairs':>7} "
        f"{'planted ok':>10} {'exact s*':>10} {'hkm levels':>14} {'hkm s':>8}"
    )
    print(header)
    for r in results:
        d, rc, h = r["dedup"], r["recall"], r["hierarchical_kmeans"]
        print(
            f"{r['n']:>9} {d['build_s']:>11.1f} {d['search_s']:>9.1f} {d['total_s']:>8.1f} "
            f"{rc['recall']:>7.4f} {rc['exact_pairs']:>7} {d['planted_pairs_joined']:>10.4f} "
            f"{rc['exact_full_self_knn_s_extrapolated']:>10.0f} "
            f"{'/'.join(map(str, h['levels'])):>14} {h['seconds']:>8.1f}"
        )
    print(
        "recall: share of (query, neighbour) pairs above the threshold in the exact top-k that IVF also "
        "returns, on a random query sample.\n"
        "exact s*: exact self-kNN time EXTRAPOLATED from the exact search of that sample (linear in "
        "queries), not measured on the full set."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this benchmark, shared with bench/curation.py's dedup_kmeans section."""
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated numbers of vectors")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--nprobe", type=int, default=KnnConfig().nprobe)
    parser.add_argument("--recall-sample", type=int, default=5000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--resampling-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads, 0 keeps FAISS's default")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    results = []
    for n in (int(size) for size in args.sizes.split(",")):
        results.append(bench_size(n, args))
        print(f"done n={n}", flush=True)
    return results


def markdown_table(results: list[dict]) -> str:
    rows = [
        "| vectors | IVF build s | IVF search s | dedup total s | pair recall vs exact | exact self-kNN s (extrapolated) "
        "| speed-up | planted pairs joined | hierarchical k-means levels | k-means s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, rc, h = r["dedup"], r["recall"], r["hierarchical_kmeans"]
        exact = rc["exact_full_self_knn_s_extrapolated"]
        rows.append(
            f"| {r['n']:,} | {d['build_s']:.1f} | {d['search_s']:.1f} | {d['total_s']:.1f} | {rc['recall']:.4f} "
            f"({rc['exact_pairs']} pairs) | {exact:.0f} | {exact / d['total_s']:.1f}x | {d['planted_pairs_joined']:.4f} "
            f"| {'/'.join(map(str, h['levels']))} | {h['seconds']:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON file for the results")
    add_arguments(parser)
    args = parser.parse_args()
    results = run(args)
    print_table(results)
    with open(args.out, "w") as handle:
        json.dump({"threads": faiss.omp_get_max_threads(), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
