"""The run report: built from a synthetic run directory (tar shards, every manifest, lineage.json), it
links only files that exist, has every section, shows the right counts, tolerates a partial run, and
renders in a real headless browser with every image loaded."""

from __future__ import annotations

import colorsys
import io
import json
import re
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from curation.report import ReportInputs, build_report, embedding_lookup
from curation.schemas import CURATED_SCHEMA, DEDUP_SCHEMA, POOL_SCHEMA, RETRIEVAL_SCHEMA, embedding_schema

SECTIONS = (
    "funnel",
    "errors",
    "quality",
    "cluster-sizes",
    "cluster-grids",
    "components",
    "threshold",
    "retrieval",
)

NUM_URLS, NUM_STORED = 40, 32
ERRORS = ["http_404"] * 4 + ["dns_failure"] * 3 + ["timeout"]
COMPONENTS = {0: [0, 1, 2, 3], 4: [4, 5], 6: [6, 7, 8]}  # representative -> members
LEAKED_COMPONENT = 6
FINE_CLUSTER_SIZES = [10, 6, 4, 2, 2, 1]  # over the 25 kept images
DEMO_SEEDS = {"cat/0.jpg": [9, 10, 11, 12], "cat/1.jpg": [12, 13], "dog/0.jpg": [14, 15, 16]}


def key(i: int) -> str:
    return f"{i:09d}"


def representative(i: int) -> int:
    return next((rep for rep, members in COMPONENTS.items() if i in members), i)


def picture(hue: float, label: str, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A colour field with a shape and a label: distinct at a glance in the screenshot."""
    rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.6, 0.85))
    img = Image.new("RGB", size, rgb)
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 15, 70, 65), fill=(255 - rgb[0], 255 - rgb[1], 255 - rgb[2]))
    draw.text((8, 70), label, fill=(0, 0, 0))
    return img


def jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    """Write a tar of JPEGs; return name -> (offset, nbytes) of each member's data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def stored_image(i: int) -> Image.Image:
    """Members of a planted copy component share their representative's picture, slightly shifted."""
    base = representative(i)
    img = picture(base / NUM_STORED, key(i))
    return img.rotate(3 * (i - base), fillcolor=img.getpixel((0, 0)))


def write_pool(run: Path) -> None:
    locations = write_tar(
        run / "images/00000.tar", {f"{key(i)}.jpg": jpeg(stored_image(i)) for i in range(NUM_STORED)}
    )
    rows = []
    for i in range(NUM_URLS):
        stored = i < NUM_STORED
        offset, nbytes = locations[f"{key(i)}.jpg"] if stored else (None, None)
        rows.append(
            {
                "key": key(i),
                "url": f"http://example.org/{i}.jpg",
                "caption": None,
                "status": "success" if stored else "failed",
                "error_class": None if stored else ERRORS[i - NUM_STORED],
                "error_message": None if stored else "planted failure",
                "width": 120 if stored else None,
                "height": 90 if stored else None,
                "original_width": 120 if stored else None,
                "original_height": 90 if stored else None,
                "sha256": None,
                "shard": "images/00000.tar" if stored else None,
                "offset": offset,
                "nbytes": nbytes,
            }
        )
    (run / "manifests/pool").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=POOL_SCHEMA), run / "manifests/pool/part-00000.parquet")


def kept_keys() -> list[str]:
    return [key(i) for i in range(NUM_STORED) if representative(i) == i != LEAKED_COMPONENT]


def write_dedup_retrieval_curated(run: Path, seeds_root: Path) -> None:
    dedup = []
    for i in range(NUM_STORED):
        rep = representative(i)
        leak = rep == LEAKED_COMPONENT
        dedup.append(
            {
                "key": key(i),
                "component": key(rep),
                "component_size": len(COMPONENTS.get(rep, [i])),
                "max_similarity": {0: 0.93, 4: 0.64, 6: 0.88}.get(rep, 0.0),
                "is_representative": i == rep,
                "leak": leak,
                "leak_eval_image": "eval/val/x.jpg" if i == 7 else None,
                "leak_similarity": 0.7 if i == 7 else None,
                "keep": i == rep and not leak,
            }
        )
    pq.write_table(pa.Table.from_pylist(dedup, schema=DEDUP_SCHEMA), run / "manifests/dedup.parquet")

    kept = kept_keys()
    fine = np.repeat(np.arange(len(FINE_CLUSTER_SIZES)), FINE_CLUSTER_SIZES)
    cluster_of = {k: [int(c), int(c) // 3] for k, c in zip(kept, fine, strict=True)}
    clusters = pa.table({"key": kept, "cluster": pa.array(list(cluster_of.values()), pa.list_(pa.int32()))})
    pq.write_table(clusters, run / "manifests/clusters.parquet")

    columns = ("key", "seed_set", "mode", "seed_key", "similarity")
    retrieval = [
        dict(zip(columns, row, strict=True))
        for row in [
            *((key(i), "demo", "sample", seed, 0.9 - 0.05 * j) for seed, found in DEMO_SEEDS.items()
              for j, i in enumerate(found)),
            *((key(i), "flowers", "cluster", None, 0.5 + 0.01 * i) for i in (17, 18, 19, 20)),
            (key(21), "landmarks", "sample", "tower/0.jpg", 0.8),
        ]
    ]  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist(retrieval, schema=RETRIEVAL_SCHEMA), run / "manifests/retrieval.parquet"
    )

    for seed in DEMO_SEEDS:  # the demo set's seed images live under its root
        (seeds_root / seed).parent.mkdir(parents=True, exist_ok=True)
        picture(0.1 if seed.startswith("cat") else 0.6, seed).save(seeds_root / seed)
    # The landmarks set has no root: its seed image is the copy stored with the curated seeds.
    landmark = write_tar(run / "images/seeds-landmarks.tar", {"tower/0.jpg": jpeg(picture(0.8, "tower"))})

    pool = pq.read_table(run / "manifests/pool").to_pylist()
    location = {r["key"]: (r["shard"], r["offset"], r["nbytes"]) for r in pool}
    retrieved = sorted({r["key"] for r in retrieval})
    balanced = [k for k in kept if k not in retrieved][::2]
    curated = [
        dict(
            zip(("shard", "offset", "nbytes"), location[k], strict=True),
            key=k,
            url=None,
            source=source,
            seed_set=None,
            seed_key=None,
            similarity=None,
            component=k,
            cluster=cluster_of.get(k),
        )
        for source, keys in (("retrieval", retrieved), ("balance", balanced))
        for k in keys
    ]
    curated.append(
        {
            "key": "seed-landmarks-0",
            "url": None,
            "shard": "images/seeds-landmarks.tar",
            "offset": landmark["tower/0.jpg"][0],
            "nbytes": landmark["tower/0.jpg"][1],
            "source": "seed",
            "seed_set": "landmarks",
            "seed_key": "tower/0.jpg",
            "similarity": None,
            "component": None,
            "cluster": None,
        }
    )
    pq.write_table(pa.Table.from_pylist(curated, schema=CURATED_SCHEMA), run / "manifests/curated.parquet")


def write_embeddings(run: Path) -> dict[str, np.ndarray]:
    """Copy descriptors; members of a planted component lie near their representative."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(NUM_STORED, 8)).astype(np.float32)
    for rep, members in COMPONENTS.items():
        vectors[members[1:]] = vectors[rep] + 0.3 * rng.normal(size=(len(members) - 1, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    (run / "embeddings/copy").mkdir(parents=True)
    table = pa.table(
        {
            "key": [key(i) for i in range(NUM_STORED)],
            "embedding": pa.array(list(vectors), pa.list_(pa.float32(), 8)),
        },
        schema=embedding_schema(8),
    )
    pq.write_table(table, run / "embeddings/copy/part-00000.parquet")
    return {key(i): vectors[i] for i in range(NUM_STORED)}


NEAR_PAIRS = [
    (key(4), key(5), 0.64),
    (key(9), key(10), 0.58),
    (key(11), key(12), 0.61),
    (key(13), key(14), 0.55),
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A synthetic run with every manifest, and its built report."""
    run = tmp_path_factory.mktemp("run")
    seeds_root = tmp_path_factory.mktemp("seeds") / "demo"
    write_pool(run)
    write_dedup_retrieval_curated(run, seeds_root)
    vectors = write_embeddings(run)
    lineage = {
        "stages": [
            {"name": "ingest", "in": NUM_URLS, "out": NUM_STORED, "seconds": 1.5},
            {"name": "dedup", "in": NUM_STORED, "out": 26},
            {"name": "balance"},
            "not a stage",
        ]
    }
    (run / "lineage.json").write_text(json.dumps(lineage))
    inputs = ReportInputs(
        near_threshold_pairs=NEAR_PAIRS,
        dedup_threshold=0.6,
        quality={"dedup pair precision": 0.97, "leak removal recall": 1.0},
        seed_roots={"demo": seeds_root},
        copy_embeddings=embedding_lookup(run, "copy"),
    )
    build_report(run, inputs)
    return run, vectors


class PageParser(HTMLParser):
    """What the tests look at: links, section ids, table rows and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.sections: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes["src"] or "")
        elif tag in ("a", "link") and attributes.get("href"):
            self.links.append(attributes["href"] or "")
        elif tag == "section":
            self.sections.append(attributes["id"] or "")
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(run: Path) -> PageParser:
    parser = PageParser()
    parser.feed((run / "report/index.html").read_text(encoding="utf-8"))
    return parser


def assert_links_resolve(run: Path, page: PageParser) -> None:
    report = run / "report"
    for ref in page.images + [link for link in page.links if not link.startswith("#")]:
        assert not re.match(r"^([a-z]+:|/)", ref), f"{ref} is not a relative path"
        assert (report / ref).is_file(), f"{ref} is referenced but missing"
    for anchor in (link[1:] for link in page.links if link.startswith("#")):
        assert anchor in page.sections


def test_every_section_is_there_and_every_link_resolves(full_run):
    run, _ = full_run
    page = parse(run)
    assert page.sections == list(SECTIONS)
    assert_links_resolve(run, page)
    assert {"img/funnel.png", "img/errors.png", "img/cluster_sizes.png"} <= set(page.images)
    thumbnails = [src for src in page.images if not src.endswith(".png")]
    assert len(thumbnails) > 40
    with Image.open(run / "report" / thumbnails[0]) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= 128
    assert "no image" not in "".join(page.text)  # every key shown has its stored image


def test_counts_come_from_the_manifests(full_run):
    run, _ = full_run
    rows = parse(run).rows
    curated = len(pq.read_table(run / "manifests/curated.parquet"))
    retrieved = len({r["key"] for r in pq.read_table(run / "manifests/retrieval.parquet").to_pylist()})
    for stage, count in [
        ("pool URLs", NUM_URLS),
        ("downloaded", NUM_STORED),
        ("after dedup", len({representative(i) for i in range(NUM_STORED)})),
        ("after decontamination", len(kept_keys())),
        ("retrieved", retrieved),
        ("curated", curated),
    ]:
        assert any(row[:2] == [stage, str(count)] for row in rows), stage
    assert ["ingest", str(NUM_URLS), str(NUM_STORED), "80.0%", "seconds=1.5"] in rows
    assert ["balance", "–", "–", "–", ""] in rows  # a stage without counts is listed, not guessed
    assert ["dedup pair precision", "0.97"] in rows
    # Normalised entropy of the finest level's cluster shares, over the pool's clusters, by hand.
    curated_fine = [
        c[0] for c in pq.read_table(run / "manifests/curated.parquet")["cluster"].to_pylist() if c
    ]
    expected = []
    for counts in (np.array(FINE_CLUSTER_SIZES), np.unique(curated_fine, return_counts=True)[1]):
        shares = counts / counts.sum()
        expected.append(f"{-(shares * np.log(shares)).sum() / np.log(len(FINE_CLUSTER_SIZES)):.3f}")
    level = next(row for row in rows if row[0] == "1 (finest)")
    assert [level[1], level[3], level[6]] == [str(len(FINE_CLUSTER_SIZES)), *expected]


def test_components_pairs_and_seeds_are_captioned(full_run):
    run, vectors = full_run
    text = " ".join(parse(run).text)
    similarity = float(vectors[key(1)] @ vectors[key(0)])
    assert f"{key(1)} · {similarity:.3f}" in text
    assert f"{key(0)} · representative" in text
    assert "removed as a benchmark leak" in text
    above, below = text.index("Just above (merged)"), text.index("Just below (kept apart)")
    assert above < text.index(f"0.610 · {key(11)}") < text.index(f"0.640 · {key(4)}") < below
    assert below < text.index(f"0.580 · {key(9)}") < text.index(f"0.550 · {key(13)}")
    assert text.count("seed cat/") == 1  # one seed image per class
    assert "seed dog/0.jpg" in text and "seed tower/0.jpg" in text  # tower: the curated copy, no root
    assert "Cluster-based retrieval" in text


def test_a_partial_run_still_gets_a_page(tmp_path):
    write_pool(tmp_path)
    (tmp_path / "lineage.json").write_text("{not json")
    page = parse(build_report(tmp_path).parent.parent)
    assert page.sections == list(SECTIONS)
    assert_links_resolve(tmp_path, page)
    text = " ".join(page.text)
    for missing in ("manifests/dedup.parquet", "manifests/clusters.parquet", "manifests/retrieval.parquet"):
        assert missing in text
    assert "lineage.json could not be read" in text


def test_pairs_need_their_threshold():
    with pytest.raises(ValueError, match="dedup_threshold"):
        ReportInputs(near_threshold_pairs=NEAR_PAIRS)


def test_embedding_lookup_names_missing_keys(full_run):
    run, vectors = full_run
    lookup = embedding_lookup(run, "copy")
    np.testing.assert_allclose(lookup([key(3), key(1)]), np.stack([vectors[key(3)], vectors[key(1)]]))
    with pytest.raises(KeyError, match="nope"):
        lookup([key(1), "nope"])


@pytest.mark.browser
def test_page_renders_in_a_headless_browser(full_run, headless_browser):
    run, _ = full_run
    page = headless_browser(run / "report/index.html")
    loaded, total = page.images_loaded()
    assert total == len(parse(run).images) and loaded == total, f"images loaded: {loaded}/{total}"
    assert page.screenshot.shape == (3000, 1200)
    assert page.screenshot.std() > 20, "the screenshot is blank"
