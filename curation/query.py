"""Query a run's manifests with SQL: ``python -m curation.query RUN_DIR "SQL"``.

Every manifest under ``RUN_DIR/manifests`` becomes a DuckDB view named after it: a folder of
Parquet parts (``manifests/pool/part-*.parquet`` -> ``pool``) or a single file
(``manifests/curated.parquet`` -> ``curated``). DuckDB reads the Parquet in place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb


def manifest_views(run_dir: str | Path) -> dict[str, str]:
    """``view name -> parquet glob`` for every manifest of the run."""
    manifests = Path(run_dir) / "manifests"
    views = {}
    if manifests.is_dir():
        for entry in sorted(manifests.iterdir()):
            if entry.is_dir() and any(entry.glob("*.parquet")):
                views[entry.name] = str(entry / "*.parquet")
            elif entry.suffix == ".parquet":
                views[entry.stem] = str(entry)
    return views


def connect(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per manifest of the run."""
    views = manifest_views(run_dir)
    if not views:
        raise FileNotFoundError(f"{run_dir} has no manifests (expected {Path(run_dir) / 'manifests'}/...)")
    con = duckdb.connect()
    for name, glob in views.items():
        escaped = glob.replace("'", "''")
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet(\'{escaped}\', union_by_name=true)')
    return con


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curation.query", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("sql", nargs="?", help="a query; without it, list the views and their row counts")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--max-rows", type=int, default=100, help="rows shown in table format")
    args = parser.parse_args(argv)
    try:
        con = connect(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sql = args.sql or " UNION ALL ".join(
        f"SELECT '{name}' AS view, count(*) AS rows FROM \"{name}\"" for name in manifest_views(args.run_dir)
    )
    try:
        relation = con.sql(sql)
    except duckdb.Error as err:
        print(f"error: {err}\nviews: {', '.join(manifest_views(args.run_dir))}", file=sys.stderr)
        return 2
    if relation is None:  # a statement without a result
        return 0
    if args.format == "table":
        relation.show(max_rows=args.max_rows, max_width=200)
    elif args.format == "csv":
        relation.to_df().to_csv(sys.stdout, index=False)
    else:
        relation.to_df().to_json(sys.stdout, orient="records", lines=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
