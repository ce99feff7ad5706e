"""A static HTML report of a curation run: how many images each stage kept, how the clusters look
before and after balancing, and the images behind the numbers (copy components, pairs on both sides of
the dedup threshold, what each seed image retrieved), so that a person can judge a run and choose
thresholds by looking rather than by writing SQL.

The page is RUN_DIR/report/index.html; thumbnails and plots are files under RUN_DIR/report/img/ with
relative links, so the folder can be copied or served as it is. Manifests are read through the DuckDB
views of `curation.query`; any of them may be missing, and the sections it feeds then say so.
Similarities that only the pipeline holds (pairs near the threshold, copy descriptors, quality
figures) come in through `ReportInputs` instead of being recomputed here.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

from curation.quality import normalised_entropy
from curation.query import connect, manifest_views

THUMBNAIL_PX = 112
CLUSTERS_SHOWN = 3  # largest clusters, and as many smallest
IMAGES_PER_CLUSTER = 12
COMPONENTS_SHOWN = 3  # largest components, and as many with the weakest strongest edge
MEMBERS_PER_COMPONENT = 8
PAIRS_PER_SIDE = 8
SEEDS_PER_SET = 4
RETRIEVED_PER_SEED = 8
PLOT_POINTS = 2_000  # a sorted size curve of millions of clusters is drawn from this many ranks

# Keys -> one L2-normalised vector per key, in the order asked.
EmbeddingLookup = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class ReportInputs:
    """What the manifests do not hold, passed in by the pipeline that computed it."""

    # (pool key, pool key, similarity), e.g. from `curation.dedup.near_threshold_pairs`
    near_threshold_pairs: list[tuple[str, str, float]] = field(default_factory=list)
    dedup_threshold: float | None = None  # the threshold those pairs surround
    quality: dict[str, float] = field(default_factory=dict)  # figure name -> value, shown as a table
    seed_roots: dict[str, Path] = field(default_factory=dict)  # seed set -> root that seed_key is under
    copy_embeddings: EmbeddingLookup | None = None  # copy descriptors: similarity to the representative

    def __post_init__(self) -> None:
        if self.near_threshold_pairs and self.dedup_threshold is None:
            raise ValueError(
                "ReportInputs.near_threshold_pairs needs dedup_threshold (the threshold the pairs surround) "
                "to split them into merged and kept-apart pairs"
            )


def embedding_lookup(run_dir: Path, name: str) -> EmbeddingLookup:
    """Vectors by key from RUN_DIR/embeddings/NAME/*.parquet (`embedding_schema`); DuckDB filters by key,
    so only the requested vectors reach Python, however large the table."""
    glob = str(Path(run_dir) / "embeddings" / name / "*.parquet")

    def lookup(keys: Sequence[str]) -> np.ndarray:
        found = dict(
            duckdb.execute(
                "SELECT key, embedding FROM read_parquet(?) WHERE key IN (SELECT unnest(?::VARCHAR[]))",
                [glob, list(keys)],
            ).fetchall()
        )
        missing = [key for key in keys if key not in found]
        if missing:
            raise KeyError(f"no {name!r} embedding under {glob} for keys {missing[:5]}")
        return np.asarray([found[key] for key in keys], dtype=np.float32)

    return lookup


def build_report(run_dir: Path, extra: ReportInputs | None = None) -> Path:
    """Write RUN_DIR/report/index.html (and its img/ folder, rebuilt from scratch) and return its path."""
    run_dir = Path(run_dir)
    report_dir = run_dir / "report"
    shutil.rmtree(report_dir / "img", ignore_errors=True)
    (report_dir / "img").mkdir(parents=True)
    page = _Report(run_dir, extra or ReportInputs()).render()
    index = report_dir / "index.html"
    partial = index.with_suffix(".html.tmp")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, index)  # a reader never sees half a page
    return index


PAGE_CSS = f"""
body {{ font-family: system-ui, sans-serif; color: #222; max-width: 1160px; margin: 0 auto;
       padding: 0 16px 48px; line-height: 1.4; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 40px; }}
h3 {{ margin: 20px 0 8px; font-size: 1.05em; }}
nav a {{ margin-right: 14px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
th, td {{ border: 1px solid #ddd; padding: 3px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f4f4f4; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }}
figure {{ margin: 0; }}
figure.thumb {{ width: {THUMBNAIL_PX}px; }}
figure.thumb img, figure.pair img, .missing {{ width: {THUMBNAIL_PX}px; height: {THUMBNAIL_PX}px;
  object-fit: contain; background: #f4f4f4; display: block; }}
.missing {{ display: flex; align-items: center; justify-content: center; color: #999; font-size: 12px; }}
figure.plot img {{ max-width: 100%; }}
figure.seed img {{ outline: 3px solid #c44e52; }}
figure.pair {{ border: 1px solid #ddd; padding: 4px; }}
figure.pair .images {{ display: flex; gap: 4px; }}
figcaption {{ font-size: 12px; color: #555; overflow-wrap: anywhere; margin-top: 2px; }}
.note {{ color: #777; font-style: italic; }}
"""

# Records on <body> how many images loaded, so a headless browser (and a curious reader) can check.
IMAGE_CHECK_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.imagesOk = `${loaded}/${images.length}`;
});
"""

_SECTIONS = (
    ("funnel", "Counts per stage"),
    ("errors", "Download errors"),
    ("quality", "Quality figures"),
    ("cluster-sizes", "Cluster sizes before and after balancing"),
    ("cluster-grids", "Largest and smallest clusters"),
    ("components", "Copy components"),
    ("threshold", "Pairs near the dedup threshold"),
    ("retrieval", "Retrieval examples"),
)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{_esc(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(src: str | None, alt: str) -> str:
    return f'<img src="{_esc(src)}" alt="{_esc(alt)}">' if src else '<div class="missing">no image</div>'


def _thumb(src: str | None, caption: str, css_class: str = "thumb") -> str:
    return (
        f'<figure class="{css_class}">{_image(src, caption)}<figcaption>{_esc(caption)}</figcaption></figure>'
    )


def _plot(file_name: str, alt: str, caption: str) -> str:
    return (
        f'<figure class="plot"><img src="img/{file_name}" alt="{_esc(alt)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _grid(figures: Sequence[str]) -> str:
    return f'<div class="grid">{"".join(figures)}</div>'


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def _bar_chart(path: Path, labels: Sequence[str], values: Sequence[int], xlabel: str) -> None:
    fig = Figure(figsize=(9, 0.42 * len(labels) + 1.1), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(np.arange(len(labels)), values, color="#4c72b0")
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.invert_yaxis()
    ax.bar_label(bars, labels=[f"{v:,}" for v in values], padding=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.12)
    ax.set_xlabel(xlabel)
    fig.savefig(path, dpi=100)


def _read_stored(path: Path, offset: int, nbytes: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(nbytes)


class _Report:
    """One build of the page: the run's DuckDB views, and the thumbnails written so far."""

    def __init__(self, run_dir: Path, inputs: ReportInputs):
        self.run_dir, self.inputs = run_dir, inputs
        self.img_dir = run_dir / "report" / "img"
        self.views = set(manifest_views(run_dir))
        self.con = connect(run_dir) if self.views else duckdb.connect()

    def render(self) -> str:
        bodies = {
            "funnel": self._funnel(),
            "errors": self._errors(),
            "quality": self._quality(),
            "cluster-sizes": self._cluster_sizes(),
            "cluster-grids": self._cluster_grids(),
            "components": self._components(),
            "threshold": self._threshold_pairs(),
            "retrieval": self._retrieval(),
        }
        nav = "".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title in _SECTIONS)
        sections = "".join(
            f'<section id="{sid}"><h2>{_esc(title)}</h2>{bodies[sid]}</section>' for sid, title in _SECTIONS
        )
        generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Curation report: {_esc(self.run_dir.name)}</title><style>{PAGE_CSS}</style></head>"
            f"<body><h1>Curation report: {_esc(self.run_dir.name)}</h1>"
            f'<p class="note">{_esc(self.run_dir.resolve())}, generated {generated}</p>'
            f"<nav>{nav}</nav>{sections}<script>{IMAGE_CHECK_SCRIPT}</script></body></html>\n"
        )

    # --- data access -------------------------------------------------------------------------------

    def _one(self, sql: str, params: Sequence[object] = ()) -> tuple:
        return self.con.execute(sql, list(params)).fetchone()

    def _all(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return self.con.execute(sql, list(params)).fetchall()

    def _column(self, sql: str, params: Sequence[object] = ()) -> list:
        return [row[0] for row in self._all(sql, params)]

    def _thumbnail(self, ident: str, open_image: Callable[[], Image.Image]) -> str | None:
        """Relative path of the thumbnail of `ident` (written once per build); None when the image
        cannot be read, so that one bad file costs one placeholder rather than the report."""
        name = hashlib.sha1(ident.encode()).hexdigest()[:16] + ".jpg"
        path = self.img_dir / name
        if not path.exists():
            try:
                with open_image() as img:
                    img.draft(img.mode, (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at a reduced scale
                    thumb = ImageOps.exif_transpose(img).convert("RGB")
            except OSError:
                return None
            thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            thumb.save(path, quality=85)
        return f"img/{name}"

    def _stored_thumbnail(self, ident: str, shard: str, offset: int, nbytes: int) -> str | None:
        return self._thumbnail(
            ident, lambda: Image.open(io.BytesIO(_read_stored(self.run_dir / shard, offset, nbytes)))
        )

    def _pool_thumbnails(self, keys: Sequence[str]) -> dict[str, str | None]:
        """Thumbnail of each key's stored pool image; None for keys the pool manifest does not store."""
        thumbs: dict[str, str | None] = dict.fromkeys(keys)
        if "pool" in self.views and keys:
            for key, shard, offset, nbytes in self._all(
                'SELECT key, shard, "offset", nbytes FROM pool '
                "WHERE status = 'success' AND key IN (SELECT unnest(?::VARCHAR[]))",
                [list(keys)],
            ):
                thumbs[key] = self._stored_thumbnail(f"pool:{key}", shard, offset, nbytes)
        return thumbs

    def _seed_thumbnail(self, seed_set: str, seed_key: str) -> str | None:
        """From the seed root when given, else from the copy stored with the curated seed images."""
        ident = f"seed:{seed_set}:{seed_key}"
        root = self.inputs.seed_roots.get(seed_set)
        if root is not None and (Path(root) / seed_key).is_file():
            return self._thumbnail(ident, lambda: Image.open(Path(root) / seed_key))
        if "curated" in self.views:
            stored = self._one(
                'SELECT shard, "offset", nbytes FROM curated '
                "WHERE source = 'seed' AND seed_set = ? AND seed_key = ? LIMIT 1",
                [seed_set, seed_key],
            )
            if stored is not None:
                return self._stored_thumbnail(ident, *stored)
        return None

    def _cluster_labels(self, view: str, level: int) -> np.ndarray:
        """Cluster id at `level` (1 = finest) of every row of `view` that has one."""
        return self.con.execute(
            f"SELECT list_extract(cluster, ?) AS c FROM {view} WHERE list_extract(cluster, ?) IS NOT NULL",
            [level, level],
        ).fetchnumpy()["c"]

    # --- sections ----------------------------------------------------------------------------------

    def _stage_counts(self) -> list[tuple[str, int]]:
        stages: list[tuple[str, int]] = []
        if "pool" in self.views:
            urls, downloaded = self._one(
                "SELECT count(*), count(*) FILTER (WHERE status = 'success') FROM pool"
            )
            stages += [("pool URLs", urls), ("downloaded", downloaded)]
        if "dedup" in self.views:
            deduplicated, clean = self._one(
                "SELECT count(*) FILTER (WHERE is_representative), count(*) FILTER (WHERE keep) FROM dedup"
            )
            stages += [("after dedup", deduplicated), ("after decontamination", clean)]
        if "retrieval" in self.views:
            stages.append(("retrieved", self._one("SELECT count(DISTINCT key) FROM retrieval")[0]))
        if "curated" in self.views:
            stages.append(("curated", self._one("SELECT count(*) FROM curated")[0]))
        return stages

    def _funnel(self) -> str:
        parts = []
        stages = self._stage_counts()
        if stages:
            _bar_chart(self.img_dir / "funnel.png", [s for s, _ in stages], [n for _, n in stages], "images")
            first = stages[0][1]
            rows = [
                (name, f"{n:,}", _percent(n, stages[i - 1][1]) if i else "–", _percent(n, first))
                for i, (name, n) in enumerate(stages)
            ]
            caption = "Images left after each stage, from the manifests."
            if "retrieval" in self.views:
                sources = self._one("SELECT count(*) FROM retrieval")[0]
                caption += (
                    f" Retrieved counts each pool image once; the {sources:,} (pool, seed) sources are the "
                    "count before collision removal."
                )
            parts += [
                _plot("funnel.png", "stage funnel", caption),
                html_table(("stage", "images", "of previous", f"of {stages[0][0]}"), rows),
            ]
        else:
            parts.append(_note("No manifests under manifests/: nothing to count."))
        if "curated" in self.views:
            composition = self._all(
                "SELECT source, count(*) AS n FROM curated GROUP BY source ORDER BY n DESC"
            )
            total = sum(n for _, n in composition)
            parts += [
                "<h3>Curated composition</h3>",
                html_table(
                    ("source", "images", "share"), [(s, f"{n:,}", _percent(n, total)) for s, n in composition]
                ),
            ]
        parts.append(self._lineage())
        return "".join(parts)

    def _lineage(self) -> str:
        """lineage.json's stages as a table; stages or fields it lacks are left out, not guessed."""
        path = self.run_dir / "lineage.json"
        if not path.is_file():
            return ""
        try:
            lineage = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return "<h3>Lineage</h3>" + _note(f"lineage.json could not be read: {err}")
        stages = lineage.get("stages") if isinstance(lineage, dict) else None
        rows = []
        for stage in stages if isinstance(stages, list) else []:
            if not isinstance(stage, dict) or "name" not in stage:
                continue
            count_in, count_out = stage.get("in"), stage.get("out")
            counted = isinstance(count_in, int) and isinstance(count_out, int)
            details = ", ".join(
                f"{k}={v}"
                for k, v in stage.items()
                if k not in ("name", "in", "out") and not isinstance(v, dict | list)
            )
            rows.append(
                (
                    stage["name"],
                    f"{count_in:,}" if isinstance(count_in, int) else "–",
                    f"{count_out:,}" if isinstance(count_out, int) else "–",
                    _percent(count_out, count_in) if counted else "–",
                    details,
                )
            )
        if not rows:
            return ""
        return "<h3>Lineage (lineage.json)</h3>" + html_table(("stage", "in", "out", "kept", "details"), rows)

    def _errors(self) -> str:
        if "pool" not in self.views:
            return _note("No pool manifest (manifests/pool/).")
        failed = self._all(
            "SELECT coalesce(error_class, 'unclassified') AS c, count(*) AS n FROM pool "
            "WHERE status <> 'success' GROUP BY c ORDER BY n DESC, c"
        )
        total = self._one("SELECT count(*) FROM pool")[0]
        if not failed:
            return _note(f"All {total:,} URLs were downloaded.")
        _bar_chart(self.img_dir / "errors.png", [c for c, _ in failed], [n for _, n in failed], "URLs")
        failures = sum(n for _, n in failed)
        caption = (
            f"{failures:,} of {total:,} URLs failed ({_percent(failures, total)}), by error class "
            "(docs/manifests.md explains each)."
        )
        return _plot("errors.png", "error classes", caption)

    def _quality(self) -> str:
        if not self.inputs.quality:
            return _note("No quality figures were passed (ReportInputs.quality).")
        return html_table(
            ("figure", "value"), [(name, f"{value:.4g}") for name, value in self.inputs.quality.items()]
        )

    def _cluster_sizes(self) -> str:
        if "clusters" not in self.views:
            return _note("No cluster table (manifests/clusters.parquet).")
        levels = self._one("SELECT max(len(cluster)) FROM clusters")[0]
        if not levels:
            return _note("The cluster table is empty.")
        rows, curves = [], []
        for level in range(1, levels + 1):
            before = self._cluster_labels("clusters", level)
            after = self._cluster_labels("curated", level) if "curated" in self.views else before[:0]
            before_ids, before_sizes = np.unique(before, return_counts=True)
            after_ids, after_sizes = np.unique(after, return_counts=True)
            # Entropy over the pool's clusters, so that a selection missing clusters scores lower.
            num_clusters = len(np.union1d(before_ids, after_ids))
            rows.append(
                (
                    "1 (finest)" if level == 1 else level,
                    f"{len(before_ids):,}",
                    f"{int(np.median(before_sizes)):,} / {before_sizes.max():,}" if len(before) else "–",
                    f"{normalised_entropy(before, num_clusters):.3f}" if len(before) else "–",
                    f"{len(after_ids):,}",
                    f"{int(np.median(after_sizes)):,} / {after_sizes.max():,}" if len(after) else "–",
                    f"{normalised_entropy(after, num_clusters):.3f}" if len(after) else "–",
                )
            )
            if level == 1:
                curves = [("deduplicated pool", before_sizes), ("curated", after_sizes)]
        fig = Figure(figsize=(9, 4), layout="constrained")
        ax = fig.subplots()
        for label, sizes in curves:
            if len(sizes):
                ordered = np.sort(sizes)[::-1]
                ranks = np.unique(
                    np.linspace(0, len(ordered) - 1, min(len(ordered), PLOT_POINTS)).astype(int)
                )
                ax.plot(
                    ranks + 1,
                    ordered[ranks],
                    drawstyle="steps-mid",
                    label=f"{label} ({len(sizes):,} clusters)",
                )
        ax.set_yscale("log")
        ax.set_xlabel("cluster rank (largest first)")
        ax.set_ylabel("images in cluster")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.savefig(self.img_dir / "cluster_sizes.png", dpi=100)
        caption = (
            "Sorted cluster sizes at the finest level, log scale: balancing should flatten the curve. "
            "Normalised entropy of the cluster shares is 1 for perfectly even clusters."
        )
        header = (
            "level",
            "pool clusters",
            "pool median / max",
            "pool entropy",
            "curated clusters",
            "curated median / max",
            "curated entropy",
        )
        return _plot("cluster_sizes.png", "cluster sizes", caption) + html_table(header, rows)

    def _cluster_grids(self) -> str:
        if "clusters" not in self.views:
            return _note("No cluster table (manifests/clusters.parquet).")
        sizes = self._all(
            "SELECT list_extract(cluster, 1) AS c, count(*) AS n FROM clusters "
            "WHERE c IS NOT NULL GROUP BY c ORDER BY n DESC, c"
        )
        largest = sizes[:CLUSTERS_SHOWN]
        smallest = [s for s in sizes[::-1][:CLUSTERS_SHOWN] if s not in largest]
        curated: dict[int, int] = {}
        if "curated" in self.views:
            curated = dict(
                self._all(
                    "SELECT list_extract(cluster, 1) AS c, count(*) FROM curated "
                    "WHERE c IS NOT NULL GROUP BY c"
                )
            )
        parts = [
            _note(
                f"Finest level; up to {IMAGES_PER_CLUSTER} members of each, picked at random; "
                "'curated' marks members that the balanced selection kept."
            )
        ]
        for title, chosen in (("Largest clusters", largest), ("Smallest clusters", smallest)):
            if not chosen:
                continue
            parts.append(f"<h3>{_esc(title)}</h3>")
            for cluster, size in chosen:
                keys = self._column(
                    "SELECT key FROM clusters WHERE list_extract(cluster, 1) = ? "
                    "ORDER BY hash(key), key LIMIT ?",
                    [cluster, IMAGES_PER_CLUSTER],
                )
                kept = set()
                if "curated" in self.views:
                    kept = set(
                        self._column(
                            "SELECT key FROM curated WHERE key IN (SELECT unnest(?::VARCHAR[]))", [keys]
                        )
                    )
                thumbs = self._pool_thumbnails(keys)
                parts.append(
                    f"<p>cluster {cluster}: {_count(size, 'image')} in the pool, "
                    f"{curated.get(cluster, 0):,} curated</p>"
                    + _grid([_thumb(thumbs[k], k + (" · curated" if k in kept else "")) for k in keys])
                )
        return "".join(parts)

    def _components(self) -> str:
        if "dedup" not in self.views:
            return _note("No dedup manifest (manifests/dedup.parquet).")
        summary = (
            "SELECT component, any_value(component_size) AS size, max(max_similarity) AS edge, bool_or(leak) "
            "FROM dedup WHERE component_size > 1 GROUP BY component ORDER BY {order}, component LIMIT ?"
        )
        chosen = self._all(summary.format(order="size DESC"), [COMPONENTS_SHOWN])
        chosen += [
            c for c in self._all(summary.format(order="edge ASC"), [COMPONENTS_SHOWN]) if c not in chosen
        ]
        if not chosen:
            return _note("Dedup found no copies: every component has a single image.")
        similarity_note = (
            "Captions give each member's copy-descriptor similarity to the representative."
            if self.inputs.copy_embeddings is not None
            else "Pass ReportInputs.copy_embeddings to see each member's similarity to the representative."
        )
        parts = [
            _note(
                f"The largest components and those held together by the weakest edge; the "
                f"representative (kept) comes first. {similarity_note}"
            )
        ]
        for representative, size, edge, leak in chosen:
            members = self._column(
                "SELECT key FROM dedup WHERE component = ? ORDER BY key <> component, key LIMIT ?",
                [representative, MEMBERS_PER_COMPONENT],
            )
            captions = {k: k for k in members}
            if self.inputs.copy_embeddings is not None:
                vectors = self.inputs.copy_embeddings(members)
                for key, similarity in zip(members[1:], vectors[1:] @ vectors[0], strict=True):
                    captions[key] = f"{key} · {similarity:.3f}"
            captions[representative] = f"{representative} · representative"
            thumbs = self._pool_thumbnails(members)
            heading = f"{_count(size, 'image')}, strongest edge {edge:.3f}" + (
                ", removed as a benchmark leak" if leak else ""
            )
            parts.append(
                f"<h3>{_esc(heading)}</h3>" + _grid([_thumb(thumbs[k], captions[k]) for k in members])
            )
        return "".join(parts)

    def _threshold_pairs(self) -> str:
        pairs, threshold = self.inputs.near_threshold_pairs, self.inputs.dedup_threshold
        if not pairs:
            return _note("No pairs were passed (ReportInputs.near_threshold_pairs).")
        above = sorted((p for p in pairs if p[2] > threshold), key=lambda p: p[2])[:PAIRS_PER_SIDE]
        below = sorted((p for p in pairs if p[2] <= threshold), key=lambda p: -p[2])[:PAIRS_PER_SIDE]
        thumbs = self._pool_thumbnails(sorted({k for a, b, _ in above + below for k in (a, b)}))

        def pair(a: str, b: str, similarity: float) -> str:
            images = "".join(_image(thumbs[k], k) for k in (a, b))
            caption = f"{similarity:.3f} · {a} / {b}"
            return (
                f'<figure class="pair"><div class="images">{images}</div>'
                f"<figcaption>{_esc(caption)}</figcaption></figure>"
            )

        parts = [
            _note(
                f"Dedup threshold {threshold:.3f}: pairs above it are merged as copies, pairs below "
                "are kept apart. Closest to the threshold first."
            )
        ]
        for title, chosen in (("Just above (merged)", above), ("Just below (kept apart)", below)):
            parts.append(f"<h3>{_esc(title)}</h3>")
            parts.append(_grid([pair(*p) for p in chosen]) if chosen else _note("none"))
        return "".join(parts)

    def _retrieval(self) -> str:
        if "retrieval" not in self.views:
            return _note("No retrieval manifest (manifests/retrieval.parquet).")
        parts = []
        for seed_set, images, sources in self._all(
            "SELECT seed_set, count(DISTINCT key), count(*) FROM retrieval "
            "GROUP BY seed_set ORDER BY seed_set"
        ):
            parts.append(
                f"<h3>Seed set {_esc(seed_set)}: {_count(images, 'pool image')} "
                f"from {_count(sources, 'source')}</h3>"
            )
            # One seed image per class (its folder), so that the examples spread over the classes.
            seeds = self._column(
                "SELECT seed_key FROM (SELECT seed_key, row_number() OVER (PARTITION BY "
                "regexp_replace(seed_key, '/[^/]*$', '') ORDER BY hash(seed_key), seed_key) AS r FROM "
                "(SELECT DISTINCT seed_key FROM retrieval WHERE seed_set = ? AND seed_key IS NOT NULL)) "
                "WHERE r = 1 ORDER BY hash(seed_key), seed_key LIMIT ?",
                [seed_set, SEEDS_PER_SET],
            )
            for seed_key in seeds:
                retrieved = self._all(
                    "SELECT key, similarity FROM retrieval WHERE seed_set = ? AND seed_key = ? "
                    "ORDER BY similarity DESC NULLS LAST, key LIMIT ?",
                    [seed_set, seed_key, RETRIEVED_PER_SEED],
                )
                seed = _thumb(self._seed_thumbnail(seed_set, seed_key), f"seed {seed_key}", "thumb seed")
                parts.append(self._retrieved_grid(retrieved, first=seed))
            by_cluster = self._all(
                "SELECT key, similarity FROM retrieval WHERE seed_set = ? AND seed_key IS NULL "
                "ORDER BY similarity DESC NULLS LAST, key LIMIT ?",
                [seed_set, 2 * RETRIEVED_PER_SEED],
            )
            if by_cluster:
                parts.append(_note("Cluster-based retrieval: the images closest to their cluster centroid."))
                parts.append(self._retrieved_grid(by_cluster))
        return "".join(parts)

    def _retrieved_grid(self, retrieved: list[tuple[str, float | None]], first: str = "") -> str:
        """(key, similarity) rows as captioned thumbnails, after `first` (the seed image's figure)."""
        thumbs = self._pool_thumbnails([k for k, _ in retrieved])
        figures = [_thumb(thumbs[k], f"{k} · {s:.3f}" if s is not None else k) for k, s in retrieved]
        return _grid([first, *figures])
