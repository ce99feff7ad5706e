"""Curation stages after the embeddings: copy dedup and decontamination, seed retrieval,
rebalancing, and the curated manifest with its lineage.

Each stage reads embeddings (``curation.embed``) and earlier manifests, calls the pure cores
(``dedup``, ``retrieval``, ``balance``) through a pure table-building function, and writes one
Parquet manifest atomically with a stamp of its inputs and settings in the file's metadata: a
rerun with the same stamp skips the stage; anything else redoes it and, through the stamps, every
stage after it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from curation.balance import HierarchicalKMeansConfig, balanced_sample, hierarchical_kmeans
from curation.dedup import DecontaminationConfig, DedupConfig, copy_components, decontaminate
from curation.ingest import read_pool
from curation.retrieval import (
    ClusterRetrievalConfig,
    PoolClusteringConfig,
    SampleRetrievalConfig,
    cluster_pool,
    cluster_retrieval,
    sample_retrieval,
)
from curation.schemas import CLUSTERS_SCHEMA, CURATED_SCHEMA, DEDUP_SCHEMA, RETRIEVAL_SCHEMA
from curation.seeds import IMAGE_SUFFIXES, SeedSet

# Thresholds belong to the copy descriptor: SSCD's as calibrated for DINOv2, ours for the
# weight-free multi-scale PDQ as measured on the demo web (docs/curation.md).
DEFAULT_THRESHOLDS = {"pdq": (0.7, 0.5), "other": (0.6, 0.45)}
# Evaluation images are few, so each is indexed as several views a re-hosted copy may match:
# itself, its mirror image, and its centre and corner crops. A leak costs more than a lost pool image.
EVAL_CROP_FRACTIONS = (0.95, 0.9)
# Cluster-based retrieval: DINOv2 split 744M images into 100k clusters (~7.4k each); small pools
# get clusters of about this many images.
IMAGES_PER_RETRIEVAL_CLUSTER = 50


class CurationError(ValueError):
    """Bad input to a curation stage: the message says what to change."""


@dataclass(frozen=True)
class CurationConfig:
    copy_spec: str = "pdq"
    dedup_threshold: float | None = None  # None: the copy descriptor's default
    dedup_k: int = 64
    decontamination_threshold: float | None = None
    eval_sets: tuple[Path, ...] = ()
    seed_sets: tuple[SeedSet, ...] = ()
    clusters_per_level: tuple[int, ...] | None = None  # None: n/30 and n/100 (1000 / 300 for 30k images)
    resampling_steps: int = 10
    balanced_share: float = 0.15  # balanced part of the curated set, as a share of the deduplicated pool
    include_seed_images: bool = True
    seed: int = 0

    def thresholds(self) -> tuple[float, float]:
        dedup, decontam = DEFAULT_THRESHOLDS["pdq" if self.copy_spec.startswith("pdq") else "other"]
        dedup = dedup if self.dedup_threshold is None else self.dedup_threshold
        decontam = decontam if self.decontamination_threshold is None else self.decontamination_threshold
        for name, value in (("--dedup-threshold", dedup), ("--decontamination-threshold", decontam)):
            if not 0 < value <= 1:
                raise CurationError(f"{name} is a cosine similarity in (0, 1], got {value}")
        return dedup, decontam

    def levels(self, n: int) -> tuple[int, ...]:
        if self.clusters_per_level is not None:
            return tuple(self.clusters_per_level)
        return tuple(sorted({max(2, n // 30), max(1, n // 100)}, reverse=True))


# ---------------------------------------------------------------- stamps and files


def _stamp(*parts) -> bytes:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest().encode()


def _stamp_of(path: Path) -> bytes | None:
    if not path.exists():
        return None
    return (pq.read_schema(path).metadata or {}).get(b"lvd_stamp")


def _write(table: pa.Table, path: Path, stamp: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table.replace_schema_metadata({b"lvd_stamp": stamp}), tmp)
    os.replace(tmp, path)


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def eval_views(image: Image.Image) -> list[Image.Image]:
    """The views of one evaluation image that decontamination searches for."""
    w, h = image.size
    crops = []
    for fraction in EVAL_CROP_FRACTIONS:
        cw, ch = round(w * fraction), round(h * fraction)
        for x, y in [((w - cw) // 2, (h - ch) // 2), (0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]:
            crops.append(image.crop((x, y, x + cw, y + ch)))
    return [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), *crops]


def load_images(paths: list[Path], what: str) -> list[Image.Image]:
    images = []
    for p in paths:
        try:
            images.append(Image.open(p).convert("RGB"))
        except OSError as err:
            raise CurationError(f"{what}: {p} cannot be read as an image ({err}); remove or replace it") from err
    if not images:
        raise CurationError(f"{what} has no readable image")
    return images


# ---------------------------------------------------------------- pure cores


def dedup_table(keys: np.ndarray, copy: np.ndarray, mirrored: np.ndarray | None, quality: np.ndarray,
                eval_copy: np.ndarray, eval_names: list[str], config: CurationConfig) -> pa.Table:  # fmt: skip
    """Copy components with one representative each, and components holding a near-copy of an
    evaluation image removed whole (DEDUP_SCHEMA). ``eval_copy`` rows are views of the evaluation
    images named by ``eval_names``."""
    dedup_threshold, decontam_threshold = config.thresholds()
    n = len(keys)
    k = max(1, min(config.dedup_k, n - 1))
    result = copy_components(copy, DedupConfig(k=k, threshold=dedup_threshold), quality=quality, keys=keys,
                             mirrored=mirrored)  # fmt: skip
    leak = np.zeros(n, bool)
    leak_eval: list[str | None] = [None] * n
    leak_similarity: list[float | None] = [None] * n
    if len(eval_copy):
        found = decontaminate(copy, result.component, eval_copy, DecontaminationConfig(threshold=decontam_threshold))
        leak = np.asarray(found.removed, bool)
        for i in np.flatnonzero(found.direct):
            leak_eval[i] = eval_names[int(found.eval_index[i])]
            leak_similarity[i] = float(found.similarity[i])
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "component": pa.array(keys[result.component], pa.string()),
            "component_size": pa.array(result.component_size, pa.int32()),
            "max_similarity": pa.array(result.component_max_similarity, pa.float32()),
            "is_representative": pa.array(result.keep),
            "leak": pa.array(leak),
            "leak_eval_image": pa.array(leak_eval, pa.string()),
            "leak_similarity": pa.array(leak_similarity, pa.float32()),
            "keep": pa.array(result.keep & ~leak),
        },
        schema=DEDUP_SCHEMA,
    )


def retrieval_table(keys: np.ndarray, semantic: np.ndarray, seed_set: SeedSet, seed_names: list[str],
                    seed_vectors: np.ndarray, seed: int = 0) -> pa.Table:  # fmt: skip
    """Every (pool image, seed) source of one seed set (RETRIEVAL_SCHEMA), capped per seed set."""
    if seed_set.retrieval == "sample":
        found = sample_retrieval(semantic, seed_vectors, SampleRetrievalConfig(k=min(seed_set.k, len(keys))))
        sources = found.sources
        best = found.retrieved
        if len(best.pool_index) > seed_set.cap:  # keep the images closest to their seeds
            allowed = best.pool_index[np.argsort(-best.similarity, kind="stable")[: seed_set.cap]]
            mask = np.isin(sources.pool_index, allowed)
        else:
            mask = np.ones(len(sources.pool_index), bool)
        return pa.table(
            {
                "key": pa.array(keys[sources.pool_index[mask]], pa.string()),
                "seed_set": pa.array([seed_set.name] * int(mask.sum()), pa.string()),
                "mode": pa.array(["sample"] * int(mask.sum()), pa.string()),
                "seed_key": pa.array([seed_names[i] for i in sources.seed_index[mask]], pa.string()),
                "similarity": pa.array(sources.similarity[mask], pa.float32()),
            },
            schema=RETRIEVAL_SCHEMA,
        )
    num_clusters = max(1, min(100_000, len(keys) // IMAGES_PER_RETRIEVAL_CLUSTER))
    clusters = cluster_pool(semantic, PoolClusteringConfig(num_clusters=num_clusters))
    found = cluster_retrieval(clusters, seed_vectors, ClusterRetrievalConfig(
        min_seeds=seed_set.cluster_min_seeds, per_cluster=seed_set.cluster_max_images, max_total=seed_set.cap))  # fmt: skip
    # Unit vectors: squared distance d to a (near-unit) centroid gives cosine ~ 1 - d/2.
    similarity = 1.0 - found.distance / 2.0
    return pa.table(
        {
            "key": pa.array(keys[found.pool_index], pa.string()),
            "seed_set": pa.array([seed_set.name] * len(found.pool_index), pa.string()),
            "mode": pa.array(["cluster"] * len(found.pool_index), pa.string()),
            "seed_key": pa.nulls(len(found.pool_index), pa.string()),
            "similarity": pa.array(similarity, pa.float32()),
        },
        schema=RETRIEVAL_SCHEMA,
    )


def balance_selection(semantic: np.ndarray, config: CurationConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids per level (n, levels) finest first, indices of the balanced sample)."""
    n = len(semantic)
    hierarchy = hierarchical_kmeans(semantic, HierarchicalKMeansConfig(
        clusters_per_level=config.levels(n), resampling_steps=config.resampling_steps))  # fmt: skip
    target = int(round(config.balanced_share * n))
    return hierarchy.assignments, balanced_sample(hierarchy.assignments, target, seed=config.seed)


def curated_table(pool: pa.Table, dedup: pa.Table, retrieval: pa.Table, clusters: pa.Table,
                  balanced_keys: list[str], seed_rows: list[dict]) -> pa.Table:  # fmt: skip
    """The curated set (CURATED_SCHEMA): retrieved images (each once, with its most similar seed),
    then balanced images not already retrieved, then the seed images themselves."""
    best = retrieval.sort_by([("key", "ascending"), ("similarity", "descending")]).to_pylist()
    chosen: dict[str, dict] = {}
    for row in best:
        chosen.setdefault(row["key"], {"source": "retrieval", **row})
    for key in balanced_keys:
        chosen.setdefault(key, {"source": "balance"})
    location = {r["key"]: r for r in pool.select(["key", "url", "shard", "offset", "nbytes"]).to_pylist()}
    component = dict(zip(dedup.column("key").to_pylist(), dedup.column("component").to_pylist()))
    cluster = dict(zip(clusters.column("key").to_pylist(), clusters.column("cluster").to_pylist()))
    rows = [
        {
            "key": key,
            "url": location[key]["url"],
            "shard": location[key]["shard"],
            "offset": location[key]["offset"],
            "nbytes": location[key]["nbytes"],
            "source": info["source"],
            "seed_set": info.get("seed_set"),
            "seed_key": info.get("seed_key"),
            "similarity": info.get("similarity"),
            "component": component.get(key),
            "cluster": cluster.get(key),
        }
        for key, info in sorted(chosen.items())
    ]
    return pa.Table.from_pylist(rows + seed_rows, schema=CURATED_SCHEMA)


# ---------------------------------------------------------------- stages over a run directory


class Embedders:
    """The copy and semantic embedders, loaded on first use (a skipped stage loads no model)."""

    def __init__(self, copy_spec: str, semantic_spec: str):
        self.copy_spec, self.semantic_spec = copy_spec, semantic_spec
        self._loaded: dict[str, object] = {}

    def _get(self, spec: str):
        from curation.embed import load_embedder

        if spec not in self._loaded:
            self._loaded[spec] = load_embedder(spec)
        return self._loaded[spec]

    @property
    def copy(self):
        return self._get(self.copy_spec)

    @property
    def semantic(self):
        return self._get(self.semantic_spec)


@dataclass
class StageCounts:
    name: str
    images_in: int
    images_out: int
    details: dict

    def as_dict(self) -> dict:
        return {"name": self.name, "in": self.images_in, "out": self.images_out, **self.details}


def _pool_quality(pool: pa.Table, keys: np.ndarray) -> np.ndarray:
    """Original pixel count per key: the representative of a copy component is its largest image."""
    pixels = pc.multiply(pc.cast(pool.column("original_width"), pa.int64()), pc.cast(pool.column("original_height"), pa.int64()))
    lookup = dict(zip(pool.column("key").to_pylist(), pixels.to_pylist()))
    return np.array([lookup[k] or 0 for k in keys], np.float64)


def run_dedup(run_dir: Path, config: CurationConfig, embedders) -> StageCounts:
    """Copy dedup and decontamination → manifests/dedup.parquet."""
    from curation.embed import embeddings_fingerprint, read_embeddings

    out = run_dir / "manifests" / "dedup.parquet"
    keys, copy = read_embeddings(run_dir, "copy")
    mirrored = read_embeddings(run_dir, "copy_mirrored")[1] if (run_dir / "embeddings" / "copy_mirrored").exists() else None
    keys = np.array(keys, dtype=object)
    eval_paths = [p for root in config.eval_sets for p in list_images(root)]
    stamp = _stamp("dedup", config.copy_spec, embeddings_fingerprint(run_dir, "copy"),
                   mirrored is not None and embeddings_fingerprint(run_dir, "copy_mirrored"), config.thresholds(), config.dedup_k, len(keys), EVAL_CROP_FRACTIONS,
                   [str(p) for p in eval_paths])  # fmt: skip
    if _stamp_of(out) != stamp:
        if len(keys) == 0:
            raise CurationError(f"{run_dir}: the pool has no stored image to deduplicate; check the ingest summary")
        eval_copy = np.zeros((0, copy.shape[1]), np.float32)
        eval_names: list[str] = []
        if eval_paths:
            views = [(str(p), view) for p, img in zip(eval_paths, load_images(eval_paths, "evaluation sets"))
                     for view in eval_views(img)]  # fmt: skip
            eval_names = [name for name, _ in views]
            eval_copy = embedders.copy.embed([view for _, view in views])
        table = dedup_table(keys, copy, mirrored, _pool_quality(read_pool(run_dir), keys), eval_copy, eval_names,
                            config)  # fmt: skip
        _write(table, out, stamp)
    table = pq.read_table(out)
    keep = table.column("keep").to_numpy(zero_copy_only=False)
    leak = table.column("leak").to_numpy(zero_copy_only=False)
    representative = table.column("is_representative").to_numpy(zero_copy_only=False)
    return StageCounts("dedup", len(keys), int(keep.sum()), {
        "copy_embedder": config.copy_spec, "threshold": config.thresholds()[0],
        "decontamination_threshold": config.thresholds()[1], "components": int(representative.sum()),
        "removed_as_copies": int((~representative).sum()), "removed_as_leaks": int((leak & representative).sum()),
        "eval_images": len(eval_paths)})  # fmt: skip


def _kept_semantic(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from curation.embed import read_embeddings

    keys, semantic = read_embeddings(run_dir, "semantic")
    keep = pq.read_table(run_dir / "manifests" / "dedup.parquet", columns=["key", "keep"])
    kept = {k for k, ok in zip(keep.column("key").to_pylist(), keep.column("keep").to_pylist()) if ok}
    mask = np.array([k in kept for k in keys], bool)
    return np.array(keys, dtype=object)[mask], semantic[mask]


def run_retrieval(run_dir: Path, config: CurationConfig, embedders) -> StageCounts:
    """Seed retrieval on the deduplicated pool → manifests/retrieval.parquet."""
    from curation.embed import embeddings_fingerprint

    out = run_dir / "manifests" / "retrieval.parquet"
    keys, semantic = _kept_semantic(run_dir)
    seeds = [(s, list_images(s.root)) for s in config.seed_sets]
    stamp = _stamp("retrieval", _stamp_of(run_dir / "manifests" / "dedup.parquet"), embedders.semantic_spec,
                   embeddings_fingerprint(run_dir, "semantic"),
                   [(s.name, s.retrieval, s.k, s.cluster_min_seeds, s.cluster_max_images, s.cap, [str(p) for p in paths])
                    for s, paths in seeds])  # fmt: skip
    if _stamp_of(out) != stamp:
        tables = [pa.table({f.name: pa.array([], f.type) for f in RETRIEVAL_SCHEMA}, schema=RETRIEVAL_SCHEMA)]
        for seed_set, paths in seeds:
            vectors = embedders.semantic.embed(load_images(paths, f"seed set {seed_set.name!r} ({seed_set.root})"))
            names = [str(p.relative_to(seed_set.root)) for p in paths]
            tables.append(retrieval_table(keys, semantic, seed_set, names, vectors, config.seed))
        _write(pa.concat_tables(tables), out, stamp)
    table = pq.read_table(out)
    unique = len(set(table.column("key").to_pylist()))
    return StageCounts("retrieval", len(keys), unique, {
        "semantic_embedder": embedders.semantic_spec, "sources_before_collision_removal": table.num_rows,
        "seed_sets": [s.name for s in config.seed_sets]})  # fmt: skip


def run_balance(run_dir: Path, config: CurationConfig, embedders) -> StageCounts:
    """Hierarchical k-means of the deduplicated pool → manifests/clusters.parquet, and the balanced
    sample (kept in the file's metadata for the curated manifest)."""
    from curation.embed import embeddings_fingerprint

    out = run_dir / "manifests" / "clusters.parquet"
    keys, semantic = _kept_semantic(run_dir)
    stamp = _stamp("balance", _stamp_of(run_dir / "manifests" / "dedup.parquet"), embedders.semantic_spec,
                   embeddings_fingerprint(run_dir, "semantic"),
                   config.levels(len(keys)), config.resampling_steps, config.balanced_share, config.seed)  # fmt: skip
    if _stamp_of(out) != stamp:
        if len(keys) < 2:
            raise CurationError("fewer than 2 images are left after dedup: nothing to rebalance")
        assignments, selected = balance_selection(semantic, config)
        flag = np.zeros(len(keys), bool)
        flag[selected] = True
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "cluster": pa.array(assignments.astype(np.int32).tolist(), pa.list_(pa.int32())),
                          "balanced": pa.array(flag)}, schema=CLUSTERS_SCHEMA)  # fmt: skip
        _write(table, out, stamp)
    table = pq.read_table(out)
    return StageCounts("balance", len(keys), int(pc.sum(table.column("balanced")).as_py() or 0), {
        "clusters_per_level": list(config.levels(len(keys)))})  # fmt: skip


def store_seed_images(run_dir: Path, seed_set: SeedSet) -> list[dict]:
    """Put a seed set's images into images/seeds-NAME.tar so the curated set reads one way; rows for
    the curated manifest."""
    paths = list_images(seed_set.root)
    tar_rel = f"images/seeds-{seed_set.name}.tar"
    tar_path = run_dir / tar_rel
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for i, path in enumerate(paths):
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{i:08d}{path.suffix.lower()}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, tar_path)
    rows = []
    with tarfile.open(tar_path) as tar:
        for path, member in zip(paths, tar.getmembers()):
            rel = str(path.relative_to(seed_set.root))
            rows.append({"key": f"seed:{seed_set.name}:{rel}", "url": None, "shard": tar_rel, "offset": member.offset_data,
                         "nbytes": member.size, "source": "seed", "seed_set": seed_set.name, "seed_key": rel,
                         "similarity": None, "component": None, "cluster": None})  # fmt: skip
    return rows


def run_curated(run_dir: Path, config: CurationConfig) -> StageCounts:
    """The curated manifest → manifests/curated.parquet."""
    manifests = run_dir / "manifests"
    retrieval = pq.read_table(manifests / "retrieval.parquet")
    clusters = pq.read_table(manifests / "clusters.parquet")
    balanced = [k for k, b in zip(clusters.column("key").to_pylist(), clusters.column("balanced").to_pylist()) if b]
    seed_rows = [r for s in config.seed_sets for r in store_seed_images(run_dir, s)] if config.include_seed_images else []
    table = curated_table(read_pool(run_dir), pq.read_table(manifests / "dedup.parquet"), retrieval,
                          clusters.select(["key", "cluster"]), balanced, seed_rows)  # fmt: skip
    _write(table, manifests / "curated.parquet", _stamp("curated", _stamp_of(manifests / "retrieval.parquet"),
                                                        _stamp_of(manifests / "clusters.parquet")))  # fmt: skip
    sources = {s: int(n) for s, n in zip(*np.unique(table.column("source").to_pylist(), return_counts=True))}
    return StageCounts("curated", len(balanced) + len(set(retrieval.column("key").to_pylist())) + len(seed_rows),
                       table.num_rows, {"by_source": sources})  # fmt: skip


def write_lineage(run_dir: Path, stages: list[StageCounts], extra: dict) -> Path:
    import faiss
    import img2dataset
    import ray
    import torch

    versions = {"torch": torch.__version__, "faiss": faiss.__version__, "ray": ray.__version__,
                "img2dataset": getattr(img2dataset, "__version__", "unknown"), "pyarrow": pa.__version__}  # fmt: skip
    lineage = {"stages": [s.as_dict() for s in stages], "versions": versions, **extra}
    path = run_dir / "lineage.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lineage, indent=2, default=str))
    os.replace(tmp, path)
    return path


def near_threshold_examples(run_dir: Path, config: CurationConfig, sample: int = 50_000,
                            max_pairs: int = 40) -> list[tuple[str, str, float]]:  # fmt: skip
    """Pairs of pool images whose copy similarity is near the dedup threshold, for the report (a
    random sample of the pool bounds the cost on large runs)."""
    from curation.dedup import copy_neighbours, near_threshold_pairs
    from curation.embed import read_embeddings

    keys, copy = read_embeddings(run_dir, "copy")
    rows = np.arange(len(keys))
    if len(rows) > sample:
        rows = np.sort(np.random.default_rng(config.seed).choice(len(rows), sample, replace=False))
    if len(rows) < 2:
        return []
    threshold = config.thresholds()[0]
    sims, idx = copy_neighbours(copy[rows], DedupConfig(k=min(8, len(rows) - 1), threshold=threshold))
    found = near_threshold_pairs(sims, idx, threshold, band=0.1, max_pairs=max_pairs, seed=config.seed)
    return [(keys[rows[a]], keys[rows[b]], float(s)) for (a, b), s in zip(found.pairs, found.similarity)]
