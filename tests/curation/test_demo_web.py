"""The embedded demo web: deterministic, complete in what it plants, served on a free port."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation import demo_web
from curation.demo_web import BROKEN_KINDS, CONCEPTS, DemoServer, DemoWebConfig

TINY = DemoWebConfig(images_per_concept=3, off_topic=4, exact_duplicates=3, near_duplicates=6,
                     seed_images_per_concept=2, eval_images_per_concept=2, eval_leaks=4,
                     awkward_per_format=1, broken_per_kind=1)  # fmt: skip


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_per_seed(tmp_path):
    a = demo_web.generate(tmp_path / "a", TINY)
    b = demo_web.generate(tmp_path / "b", TINY)
    c = demo_web.generate(tmp_path / "c", DemoWebConfig(**{**TINY.__dict__, "seed": 1}))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_everything_is_planted(demo_root):
    pages = pq.read_table(demo_root / "pages.parquet").to_pylist()
    kinds = {r["kind"] for r in pages}
    assert kinds == {"concept", "off_topic", "exact_duplicate", "near_duplicate", "eval_leak", "awkward", "broken"}
    assert len({r["concept"] for r in pages if r["concept"]}) == len(CONCEPTS) >= 10
    assert {r["transform"] for r in pages if r["kind"] == "near_duplicate"} == set(demo_web.NEAR_DUPLICATE_TRANSFORMS)
    assert {r["transform"] for r in pages if r["kind"] == "awkward"} == set(demo_web.AWKWARD_FORMATS)
    assert {r["transform"] for r in pages if r["kind"] == "broken"} == {k for k, _ in BROKEN_KINDS}
    # Exact duplicates are the same bytes as their original.
    by_group = {}
    for r in pages:
        if r["kind"] in ("concept", "exact_duplicate"):
            name = r["url_template"].rsplit("/img/", 1)[1]
            by_group.setdefault(r["dup_group"], set()).add(hashlib.sha256((demo_root / "web" / name).read_bytes()).digest())
    assert all(len(digests) == 1 for digests in by_group.values())
    # Leaks point at evaluation images that exist; seeds cover a subset of the concepts.
    assert all((demo_root / r["leak_of"]).is_file() for r in pages if r["kind"] == "eval_leak")
    seed_classes = {p.name for p in (demo_root / "seeds").iterdir()}
    assert seed_classes < set(CONCEPTS)
    assert {p.name for p in (demo_root / "eval").iterdir()} == set(CONCEPTS)


def test_masks_cover_the_drawn_object(demo_root):
    pages = pq.read_table(demo_root / "pages.parquet").to_pylist()
    row = next(r for r in pages if r["kind"] == "concept")
    import numpy as np
    from PIL import Image

    mask = np.asarray(Image.open(demo_root / row["mask_path"])) > 0
    assert 0.01 < mask.mean() < 0.7


def test_servers_pick_free_ports_and_serve(demo_root):
    with DemoServer(demo_root) as one, DemoServer(demo_root) as two:
        assert one.port != two.port
        body = urllib.request.urlopen(f"{one.base_url}/img/00000.jpg", timeout=5).read()
        assert body[:2] == b"\xff\xd8"


def test_url_list_follows_img2dataset_convention(demo_urls):
    urls, truth = demo_urls
    table = pq.read_table(urls)
    assert table.column_names == ["url", "caption"]
    gt = pq.read_table(truth)
    assert gt.num_rows == table.num_rows and gt.column("url").to_pylist() == table.column("url").to_pylist()


def test_rerun_can_serve_the_same_urls(demo_root, tmp_path):
    with DemoServer(demo_root) as first:
        first.write_url_list(tmp_path / "a")
    ports = DemoServer.ports_of(tmp_path / "a" / "ground_truth.parquet")
    with DemoServer(demo_root, port=ports[0], refused_port=ports[1]) as second:
        second.write_url_list(tmp_path / "b")
    assert (tmp_path / "a" / "urls.parquet").read_bytes() == (tmp_path / "b" / "urls.parquet").read_bytes()


def test_server_needs_a_generated_web(tmp_path):
    with pytest.raises(FileNotFoundError, match="generate"):
        DemoServer(tmp_path)


def test_concept_folder_links_the_plain_concept_pages_under_the_eval_classes(demo_root, tmp_path):
    folder = demo_web.concept_folder(demo_root, tmp_path / "bank")
    pages = pq.read_table(demo_root / "pages.parquet").to_pylist()
    expected = {(r["concept"], r["url_template"].rsplit("/", 1)[1]) for r in pages if r["kind"] == "concept"}
    links = sorted(folder.glob("*/*"))
    assert {(p.parent.name, p.name) for p in links} == expected
    assert all(p.is_symlink() and p.resolve() == (demo_root / "web" / p.name).resolve() for p in links)
    assert {p.name for p in folder.iterdir()} == {p.name for p in (demo_root / "eval").iterdir()}
    assert demo_web.concept_folder(demo_root, folder) == folder and sorted(folder.glob("*/*")) == links
    with pytest.raises(FileNotFoundError, match="not a demo web"):
        demo_web.concept_folder(tmp_path, tmp_path / "other")


def test_each_concept_owns_a_hue_band_and_a_surface_pattern():
    """What makes the demo learnable without labels (docs/pretrain.md, learning at CPU scale): object
    pixels keep their concept's hue whatever the image, and every concept but the plain kite is
    drawn in two tones of its pattern."""
    rng = np.random.default_rng(0)
    for index, concept in enumerate(CONCEPTS):
        for _ in range(4):
            image, mask = demo_web.draw_concept(rng, concept, 160, 128)
            inside = np.asarray(mask) == 255
            hsv = np.asarray(image.convert("HSV"), dtype=np.float64)[inside]
            saturated = hsv[hsv[:, 1] > 60]  # the dark or light second tone may lose its hue
            hue = np.angle(np.exp(2j * np.pi * saturated[:, 0] / 256).mean()) / (2 * np.pi) % 1.0
            offset = (hue - index / len(CONCEPTS) + 0.5) % 1.0 - 0.5
            assert abs(offset) < 0.05, (concept, hue)
            tones = np.asarray(image.convert("L"), dtype=np.float64)[inside]
            spread = np.percentile(tones, 90) - np.percentile(tones, 10)
            if demo_web.CONCEPT_TEXTURES[concept][0] == "plain":
                assert spread < 8, concept
            else:
                assert spread > 25, (concept, spread)
