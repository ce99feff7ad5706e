"""DuckDB over the run's manifests: views, the CLI, and the documented example queries."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import query

DOCS = Path(__file__).resolve().parents[2] / "docs" / "manifests.md"


@pytest.fixture
def run_dir(tmp_path):
    pool = tmp_path / "manifests" / "pool"
    pool.mkdir(parents=True)
    pq.write_table(pa.table({"key": ["0", "1"], "url": ["http://a.com/x.jpg", "http://b.org/y.jpg"],
                             "status": ["success", "failed"], "error_class": [None, "http_404"],
                             "width": pa.array([64, None], pa.int32()), "height": pa.array([48, None], pa.int32()),
                             "original_width": pa.array([640, None], pa.int32()),
                             "original_height": pa.array([480, None], pa.int32()),
                             "shard": ["images/00000.tar", None], "nbytes": pa.array([1000, None], pa.int64())}),
                   pool / "part-00000.parquet")  # fmt: skip
    pq.write_table(pa.table({"key": ["2"], "url": ["http://a.com/z.jpg"], "status": ["success"],
                             "error_class": pa.array([None], pa.string()), "width": pa.array([32], pa.int32()),
                             "height": pa.array([32], pa.int32()), "original_width": pa.array([32], pa.int32()),
                             "original_height": pa.array([32], pa.int32()),
                             "shard": ["images/00001.tar"], "nbytes": pa.array([500], pa.int64())}),
                   pool / "part-00001.parquet")  # fmt: skip
    pq.write_table(pa.table({"key": ["0"], "source": ["retrieval"], "seed_set": ["demo"]}),
                   tmp_path / "manifests" / "curated.parquet")
    return tmp_path


def test_each_manifest_is_a_view(run_dir):
    con = query.connect(run_dir)
    assert con.execute("SELECT count(*) FROM pool").fetchone() == (3,)
    assert con.execute("SELECT count(*) FROM curated").fetchone() == (1,)


def test_cli_prints_a_table(run_dir, capsys):
    assert query.main([str(run_dir), "SELECT status, count(*) AS n FROM pool GROUP BY status ORDER BY status"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"failed\s*│\s*1", out) and re.search(r"success\s*│\s*2", out)


def test_cli_lists_views_without_sql(run_dir, capsys):
    query.main([str(run_dir)])
    out = capsys.readouterr().out
    assert "pool" in out and "curated" in out


def test_cli_csv_output(run_dir, capsys):
    query.main([str(run_dir), "SELECT key FROM pool ORDER BY key", "--format", "csv"])
    assert capsys.readouterr().out.split() == ["key", "0", "1", "2"]


def test_bad_sql_and_missing_run_are_clear(run_dir, tmp_path, capsys):
    assert query.main([str(run_dir), "SELECT nope FROM pool"]) == 2
    assert "views: " in capsys.readouterr().err
    assert query.main([str(tmp_path / "nothing")]) == 2
    assert "has no manifests" in capsys.readouterr().err


def test_documented_example_queries_run(run_dir):
    """Every ```sql block of docs/manifests.md runs against a pool manifest."""
    blocks = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 4
    con = query.connect(run_dir)
    for sql in blocks:
        con.sql(sql).fetchall()
