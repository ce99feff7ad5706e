"""Copy-detection dedup and decontamination (DINOv2 LVD-142M, steps 2 and 3).

Dedup: every image's k nearest neighbours by copy-descriptor cosine similarity, edges above a
threshold, connected components of that graph, one representative kept per component. Copies are
transitive in practice (A re-encoded as B, B cropped as C), and components capture that without a
second pass. Decontamination removes every pool component holding a near-copy of an evaluation image,
whole, so that no re-encoded sibling of a benchmark image survives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from curation.knn import KnnConfig, build_index, search, self_knn


def _check_threshold(owner: str, threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"{owner}.threshold must be in (0, 1] (a cosine similarity), got {threshold}")


@dataclass(frozen=True)
class DedupConfig:
    """DINOv2 defaults for SSCD descriptors: 64 neighbours, edges with similarity > 0.6 (SSCD calls
    > 0.75 a copy at ~90% precision, so 0.6 leans to recall). Other descriptors need their own
    threshold (see curation/copy_descriptor.py)."""

    k: int = 64
    threshold: float = 0.6
    knn: KnnConfig = field(default_factory=KnnConfig)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"DedupConfig.k must be >= 1 (neighbours per image), got {self.k}")
        _check_threshold("DedupConfig", self.threshold)


@dataclass(frozen=True)
class DedupResult:
    """Per-row outcome of copy dedup; row i describes input vector i."""

    component: np.ndarray  # int64: row index of the component's representative (stable id)
    keep: np.ndarray  # bool: True for the one representative of each component
    component_size: np.ndarray  # int64: members in the row's component
    component_max_similarity: np.ndarray  # float32: strongest edge in the component, 0 for singletons
    edges: np.ndarray  # (E, 2) int64, i < j, each undirected edge above the threshold once
    edge_similarity: np.ndarray  # (E,) float32

    @property
    def num_components(self) -> int:
        return int(self.keep.sum())


def copy_neighbours(
    embeddings: np.ndarray, config: DedupConfig = DedupConfig(), mirrored: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k-nearest-neighbour graph dedup works on: (similarities, indices), (n, k), self excluded.

    With `mirrored` (descriptors of the horizontally flipped images, same row order) each image is also
    searched by its mirror image, so flipped copies are linked even by a descriptor that is not
    flip-invariant; the graph then has 2k columns per row."""
    index = build_index(embeddings, config.knn)
    similarities, indices = self_knn(embeddings, config.k, config.knn, index=index)
    if mirrored is None:
        return similarities, indices
    mirror_sims, mirror_indices = search(index, mirrored, config.k, config.knn.query_batch)
    # A symmetric image matches its own mirror: that is not a copy of anything else.
    own = mirror_indices == np.arange(len(embeddings))[:, None]
    mirror_sims[own], mirror_indices[own] = -np.inf, -1
    return np.hstack([similarities, mirror_sims]), np.hstack([indices, mirror_indices])


def graph_edges(
    similarities: np.ndarray, indices: np.ndarray, lower: float, upper: float = np.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges of a kNN graph with lower < similarity <= upper, each (i < j) once with the
    highest similarity seen for it (mirror searches can see a pair at two similarities)."""
    n, width = indices.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), width).reshape(n, width)
    mask = (indices >= 0) & (indices != rows) & (similarities > lower) & (similarities <= upper)
    i, j, sims = rows[mask], indices[mask], similarities[mask]
    low, high = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((-sims, high, low))
    low, high, sims = low[order], high[order], sims[order]
    first = np.ones(len(low), dtype=bool)
    first[1:] = (low[1:] != low[:-1]) | (high[1:] != high[:-1])
    return np.stack([low[first], high[first]], axis=1), sims[first].astype(np.float32)


def _key_ranks(keys: np.ndarray | None, n: int) -> np.ndarray:
    """Rank of every row's key; keys (e.g. sample ids) make tie-breaking independent of row order."""
    if keys is None:
        return np.arange(n)
    keys = np.asarray(keys)
    if keys.shape != (n,):
        raise ValueError(f"keys must have shape ({n},), got {keys.shape}")
    order = np.argsort(keys, kind="stable")
    if n > 1 and np.any(keys[order][1:] == keys[order][:-1]):
        raise ValueError("keys must be unique: they break ties between component members")
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n)
    return ranks


def components_from_neighbours(
    similarities: np.ndarray,
    indices: np.ndarray,
    threshold: float,
    quality: np.ndarray | None = None,
    keys: np.ndarray | None = None,
) -> DedupResult:
    """Connected components of the edges above `threshold`, and one representative per component.

    Representative rule: the member with the highest `quality` (e.g. stored pixel count: the least
    downscaled copy), ties broken by the smallest key (`keys`, e.g. sample ids; row index when None).
    The rule only looks at member values, so the kept set does not depend on input order."""
    _check_threshold("components_from_neighbours", threshold)
    n = len(indices)
    edges, edge_similarity = graph_edges(similarities, indices, threshold)
    graph = scipy.sparse.coo_matrix(
        (np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n)
    )
    num_labels, labels = connected_components(graph, directed=False)

    quality = np.zeros(n) if quality is None else np.asarray(quality, dtype=np.float64)
    if quality.shape != (n,) or not np.all(np.isfinite(quality)):
        raise ValueError(f"quality must be {n} finite numbers, one per row")
    order = np.lexsort((_key_ranks(keys, n), -quality, labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    representative = np.empty(num_labels, dtype=np.int64)
    representative[labels[order][first]] = order[first]

    max_similarity = np.zeros(num_labels, dtype=np.float32)
    np.maximum.at(max_similarity, labels[edges[:, 0]], edge_similarity)
    keep = np.zeros(n, dtype=bool)
    keep[representative] = True
    return DedupResult(
        component=representative[labels],
        keep=keep,
        component_size=np.bincount(labels, minlength=num_labels)[labels].astype(np.int64),
        component_max_similarity=max_similarity[labels],
        edges=edges,
        edge_similarity=edge_similarity,
    )


def copy_components(
    embeddings: np.ndarray,
    config: DedupConfig = DedupConfig(),
    quality: np.ndarray | None = None,
    keys: np.ndarray | None = None,
    mirrored: np.ndarray | None = None,
) -> DedupResult:
    """Self-dedup of L2-normalised copy descriptors: kNN graph, edges > threshold, components, one
    representative each (see `components_from_neighbours` for the rule, `copy_neighbours` for
    `mirrored`). Run `copy_neighbours` and `components_from_neighbours` separately to reuse the graph
    for `near_threshold_pairs`."""
    similarities, indices = copy_neighbours(embeddings, config, mirrored)
    return components_from_neighbours(similarities, indices, config.threshold, quality, keys)


@dataclass(frozen=True)
class NearThresholdPairs:
    """Pairs to show a user choosing a threshold, sorted by decreasing similarity."""

    pairs: np.ndarray  # (P, 2) int64, i < j
    similarity: np.ndarray  # (P,) float32


def near_threshold_pairs(
    similarities: np.ndarray,
    indices: np.ndarray,
    threshold: float,
    band: float = 0.05,
    max_pairs: int = 1_000,
    bins: int = 10,
    seed: int = 0,
) -> NearThresholdPairs:
    """Pairs of the kNN graph with similarity in (threshold - band, threshold + band], sampled evenly
    across `bins` equal-width similarity bins (at most max_pairs // bins each): pair counts grow fast
    as similarity drops, and a uniform sample would show only the lowest bin."""
    if band <= 0 or max_pairs < 1 or bins < 1:
        raise ValueError(f"need band > 0, max_pairs >= 1 and bins >= 1, got {band}, {max_pairs}, {bins}")
    lower, upper = threshold - band, threshold + band
    pairs, sims = graph_edges(similarities, indices, lower, upper)
    bin_of = np.minimum(((sims - lower) / (upper - lower) * bins).astype(np.int64), bins - 1)
    order = np.lexsort((np.random.default_rng(seed).random(len(sims)), bin_of))
    sorted_bins = bin_of[order]
    bin_start = np.searchsorted(sorted_bins, sorted_bins, side="left")
    chosen = order[np.arange(len(order)) - bin_start < max(1, max_pairs // bins)]
    chosen = chosen[np.argsort(-sims[chosen], kind="stable")]
    return NearThresholdPairs(pairs=pairs[chosen], similarity=sims[chosen])


@dataclass(frozen=True)
class DecontaminationConfig:
    """DINOv2 decontaminates at SSCD similarity > 0.45, looser than dedup: a leaked benchmark image
    costs more than a lost pool image."""

    threshold: float = 0.45
    knn: KnnConfig = field(default_factory=KnnConfig)

    def __post_init__(self) -> None:
        _check_threshold("DecontaminationConfig", self.threshold)


@dataclass(frozen=True)
class DecontaminationResult:
    """Per pool row. `similarity` / `eval_index` are the component's best match over all its members
    (kept even below the threshold, so reports can show the margin)."""

    removed: np.ndarray  # bool: the row's component holds a near-copy of an evaluation image
    direct: np.ndarray  # bool: this row itself is above the threshold (the others go with their component)
    eval_index: np.ndarray  # int64: evaluation image best matched by the component, -1 if none found
    similarity: np.ndarray  # float32: that match's similarity, -inf if none found


def decontaminate(
    pool_embeddings: np.ndarray,
    pool_components: np.ndarray,
    eval_embeddings: np.ndarray,
    config: DecontaminationConfig = DecontaminationConfig(),
    eval_mirrored: np.ndarray | None = None,
) -> DecontaminationResult:
    """Remove every pool component (ids from `DedupResult.component`, any integers) that holds a
    near-copy of an evaluation image. The evaluation images are indexed and each pool image is
    searched for its single nearest one, so every pool image is checked (no top-k truncation).
    `eval_mirrored` adds the horizontally flipped evaluation images to the index."""
    pool_components = np.asarray(pool_components)
    if pool_components.shape != (len(pool_embeddings),):
        raise ValueError(f"pool_components must have one id per pool row, got shape {pool_components.shape}")
    num_eval = len(eval_embeddings)
    database = eval_embeddings if eval_mirrored is None else np.vstack([eval_embeddings, eval_mirrored])
    sims, nearest = search(build_index(database, config.knn), pool_embeddings, 1, config.knn.query_batch)
    row_similarity, row_eval = sims[:, 0], np.where(nearest[:, 0] >= 0, nearest[:, 0] % num_eval, -1)

    _, labels = np.unique(pool_components, return_inverse=True)
    order = np.lexsort((-row_similarity, labels))
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    best_row = np.empty(labels.max() + 1 if len(labels) else 0, dtype=np.int64)
    best_row[labels[order][first]] = order[first]
    component_best = best_row[labels]
    similarity = row_similarity[component_best]
    return DecontaminationResult(
        removed=similarity > config.threshold,
        direct=row_similarity > config.threshold,
        eval_index=row_eval[component_best],
        similarity=similarity,
    )
