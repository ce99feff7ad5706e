"""Ingest of a URL list into image shards and a pool manifest with one row per URL."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.decode import ImageConfig
from curation.fetch import FetchPolicy
from curation.ingest import IngestConfig, IngestError, pool_part, read_pool, read_url_list, run_ingest
from curation.schemas import POOL_SCHEMA

LOOPBACK = FetchPolicy(allowed_networks=("127.0.0.1/32",), max_bytes=4 * 1024 * 1024)


def small_config(urls: Path, run_dir: Path, **overrides) -> IngestConfig:
    settings = dict(samples_per_shard=40, threads_per_shard=8, cpus_per_shard=0.5, timeout_s=4.0,
                    image=ImageConfig(image_size=128), policy=LOOPBACK)  # fmt: skip
    return IngestConfig(urls=urls, run_dir=run_dir, **{**settings, **overrides})


@pytest.fixture(scope="module")
def ingested(ray_session, demo_urls, tmp_path_factory):
    urls, truth = demo_urls
    # Carry an extra input column through, as users' lists have (licence, source, ...).
    table = pq.read_table(urls)
    table = table.append_column("licence", pa.array([f"cc-{i}" for i in range(table.num_rows)]))
    with_extra = tmp_path_factory.mktemp("input") / "urls.parquet"
    pq.write_table(table, with_extra)
    run_dir = tmp_path_factory.mktemp("run")
    result = run_ingest(small_config(with_extra, run_dir), progress=False)
    return run_dir, result, read_pool(run_dir), pq.read_table(truth)


def test_one_row_per_input_url(ingested):
    _, result, pool, truth = ingested
    assert pool.num_rows == truth.num_rows == result.rows
    assert sorted(pool.column("url").to_pylist()) == sorted(truth.column("url").to_pylist())
    assert len(set(pool.column("key").to_pylist())) == pool.num_rows


def test_every_url_ends_as_planted(ingested):
    """Bad input (item 5) fails by class; awkward but valid images succeed."""
    _, _, pool, truth = ingested
    expected = {r["url"]: r for r in truth.to_pylist()}
    mismatches = [
        (expected[r["url"]]["transform"] or expected[r["url"]]["kind"], r["status"], r["error_class"], r["error_message"])
        for r in pool.to_pylist()
        if (r["status"], r["error_class"]) != (expected[r["url"]]["expected_status"], expected[r["url"]]["expected_error_class"])
    ]  # fmt: skip
    assert mismatches == []
    failed_kinds = {expected[r["url"]]["transform"] for r in pool.to_pylist() if r["status"] == "failed"}
    assert len(failed_kinds) == 18  # every broken kind of the demo web was exercised


def test_manifest_schema_and_carried_columns(ingested):
    _, _, pool, _ = ingested
    assert pool.schema.names[: len(POOL_SCHEMA)] == POOL_SCHEMA.names
    for field in POOL_SCHEMA:
        assert pool.schema.field(field.name).type == field.type, field.name
    assert pool.schema.names[len(POOL_SCHEMA):] == ["licence"]
    assert all(v.startswith("cc-") for v in pool.column("licence").to_pylist())


def test_stored_images_are_where_the_manifest_says(ingested):
    run_dir, _, pool, _ = ingested
    rows = [r for r in pool.to_pylist() if r["status"] == "success"]
    for r in rows[:25]:
        with open(run_dir / r["shard"], "rb") as f:
            f.seek(r["offset"])
            img = Image.open(io.BytesIO(f.read(r["nbytes"])))
            assert img.format == "JPEG" and img.size == (r["width"], r["height"])
    assert all(r["sha256"] and len(r["sha256"]) == 64 for r in rows)
    assert all(min(r["width"], r["height"]) <= 128 for r in rows)


def test_exact_duplicates_share_the_download_hash(ingested, demo_root):
    _, _, pool, truth = ingested
    kinds = {r["url"]: r for r in truth.to_pylist()}
    by_group: dict[int, set[str]] = {}
    for r in pool.to_pylist():
        t = kinds[r["url"]]
        if t["kind"] in ("concept", "exact_duplicate") and r["status"] == "success":
            by_group.setdefault(t["dup_group"], set()).add(r["sha256"])
    assert all(len(v) == 1 for v in by_group.values())
    name = next(r["url_template"] for r in truth.to_pylist() if r["kind"] == "concept").rsplit("/img/", 1)[1]
    digest = hashlib.sha256((demo_root / "web" / name).read_bytes()).hexdigest()
    assert digest in set(pool.column("sha256").to_pylist())


def test_exif_rotated_images_are_stored_upright(ingested):
    _, _, pool, truth = ingested
    rotated = {r["url"] for r in truth.to_pylist() if r["transform"] == "exif_rotated_jpeg"}
    rows = [r for r in pool.to_pylist() if r["url"] in rotated]
    assert rows and all(r["status"] == "success" for r in rows)


def test_summary_reports_progress_figures(ingested):
    _, result, pool, _ = ingested
    text = result.summary()
    assert "img/s" in text and "blocked_address" in text and "http_404" in text
    assert result.status_counts["success"] + result.status_counts["failed"] == pool.num_rows
    assert result.downloaded == result.status_counts["success"] and result.images_per_second > 0


def test_rerun_of_a_finished_ingest_skips_every_shard(ingested):
    run_dir, first, _, _ = ingested
    again = run_ingest(small_config(run_dir / "input" / "urls.parquet", run_dir), progress=False)
    assert again.shards_skipped == again.shards_total == first.shards_total and again.downloaded == 0


def test_a_different_url_list_for_the_same_run_is_refused(ingested, tmp_path):
    run_dir, _, _, _ = ingested
    other = tmp_path / "other.txt"
    other.write_text("http://127.0.0.1:1/x.jpg\n")
    with pytest.raises(IngestError, match="different URL list"):
        run_ingest(small_config(other, run_dir), progress=False)


# ---------------------------------------------------------------- input formats and bad input


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt", ".parquet"])
def test_input_formats(tmp_path, suffix):
    path = tmp_path / f"urls{suffix}"
    if suffix == ".txt":
        path.write_text("http://a/1.jpg\n\nhttp://a/2.jpg\n")
    elif suffix == ".parquet":
        pq.write_table(pa.table({"link": ["http://a/1.jpg", "http://a/2.jpg"], "alt": ["x", "y"]}), path)
    else:
        sep = "," if suffix == ".csv" else "\t"
        path.write_text(f"source{sep}url{sep}caption\nweb{sep}http://a/1.jpg{sep}x\nweb{sep}http://a/2.jpg{sep}y\n")
    url_col, caption_col = ("link", "alt") if suffix == ".parquet" else ("url", "caption")
    table = read_url_list(path, url_col, caption_col)
    assert table.column("url").to_pylist() == ["http://a/1.jpg", "http://a/2.jpg"]
    assert table.column_names[0] == "url"


def test_missing_url_column_names_the_columns_and_the_flag(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text("link\nhttp://a/1.jpg\n")
    with pytest.raises(IngestError, match=r"no column 'url'.*\['link'\].*--url-col"):
        read_url_list(path)


def test_input_columns_must_not_clash_with_the_manifest(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text("url,status\nhttp://a/1.jpg,ok\n")
    with pytest.raises(IngestError, match=r"\['status'\] clash"):
        read_url_list(path)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("urls.json", "{}", "unknown format"),
    ("missing.parquet", None, "does not exist"),
    ("empty.txt", "", "no rows"),
])  # fmt: skip
def test_unreadable_lists_say_why(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(IngestError, match=message):
        read_url_list(path)


def test_pool_part_refuses_a_shard_whose_tar_lost_images():
    meta = pa.table({"key": ["0"], "url": ["http://a"], "status": ["success"], "error_message": [None]})
    with pytest.raises(IngestError, match="missing from the tar"):
        pool_part(meta, {}, "images/00000.tar")
