"""Ingest: a web URL list becomes image shards and a pool manifest with one row per URL.

Downloading, sharding, writing tar shards and per-shard resume are img2dataset's (its Reader,
Downloader and WebDatasetSampleWriter); this module adds what a crawl of untrusted URLs needs
(``curation.fetch``: address, scheme and size policy), a decoder that survives the web
(``curation.decode``), Ray tasks as the distributor, error classes, and the pool manifest.

Run directory layout::

    RUN/input/urls.parquet        snapshot of the user's list (a rerun reads this, not the original)
    RUN/images/NNNNN.tar          stored JPEGs (img2dataset webdataset shards, with their .parquet)
    RUN/manifests/pool/part-NNNNN.parquet   one pool part per shard, written last: the done marker
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from curation import ray_runtime  # noqa: F401  (sets the quiet environment before img2dataset loads)
from curation.decode import ImageConfig, ImageResizer
from curation.errors import classify
from curation.fetch import FetchPolicy
from curation.schemas import POOL_SCHEMA, RESERVED_INPUT_COLUMNS

INPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}


class IngestError(RuntimeError):
    """Bad input to the ingest: the message says what to change."""


@dataclass(frozen=True)
class IngestConfig:
    urls: Path
    run_dir: Path
    url_col: str = "url"
    caption_col: str = "caption"
    samples_per_shard: int = 10_000
    threads_per_shard: int = 64
    cpus_per_shard: float = 1.0
    timeout_s: float = 10.0
    retries: int = 0
    user_agent_token: str = "lvd-curation"
    # img2dataset's default opt-out directives: images whose server says so are not stored.
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    image: ImageConfig = field(default_factory=ImageConfig)
    policy: FetchPolicy = field(default_factory=FetchPolicy)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise IngestError(f"samples_per_shard must be at least 1, got {self.samples_per_shard}")
        if self.timeout_s <= 0:
            raise IngestError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass
class IngestResult:
    pool_dir: Path
    rows: int
    shards_total: int
    shards_skipped: int
    seconds: float
    downloaded: int  # successes written by this run (not by an earlier, interrupted one)
    status_counts: dict[str, int]
    error_counts: dict[str, int]

    @property
    def images_per_second(self) -> float:
        return self.downloaded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"ingest: {self.rows} URLs in {self.shards_total} shards "
            f"({self.shards_skipped} already done, skipped)",
            f"  success: {self.status_counts.get('success', 0)}   failed: {self.status_counts.get('failed', 0)}",
            f"  this run: {self.downloaded} images in {self.seconds:.1f} s = {self.images_per_second:.1f} img/s",
        ]
        if self.error_counts:
            lines.append("  failures by error class:")
            width = max(map(len, self.error_counts))
            for name, count in sorted(self.error_counts.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"    {name:<{width}}  {count}")
        return "\n".join(lines)


# ---------------------------------------------------------------- input snapshot


def read_url_list(path: Path, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """Read a URL list (Parquet, CSV, TSV or TXT) into a table with ``url`` (and ``caption``) first."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"URL list {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in INPUT_FORMATS:
        raise IngestError(f"URL list {path}: unknown format {suffix!r}; use one of {sorted(INPUT_FORMATS)}")
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix == ".txt":
            lines = [line.strip() for line in path.read_text().splitlines()]
            table = pa.table({url_col: [line for line in lines if line]})
        else:
            delimiter = "\t" if suffix == ".tsv" else ","
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        raise IngestError(f"URL list {path} cannot be read as {INPUT_FORMATS[suffix]}: {err}") from err
    if url_col not in table.column_names:
        raise IngestError(
            f"URL list {path} has no column {url_col!r} (columns: {table.column_names}); "
            "name the URL column with --url-col"
        )
    names = ["url" if c == url_col else "caption" if c == caption_col else c for c in table.column_names]
    table = table.rename_columns(names)
    clashes = sorted(RESERVED_INPUT_COLUMNS & set(names))
    if clashes:
        raise IngestError(
            f"URL list {path}: columns {clashes} clash with pool manifest columns; rename them in the input"
        )
    if table.num_rows == 0:
        raise IngestError(f"URL list {path} has no rows")
    table = table.set_column(names.index("url"), "url", pc.cast(table.column("url"), pa.string()))
    if "caption" in names:
        table = table.set_column(names.index("caption"), "caption", pc.cast(table.column("caption"), pa.string()))
    first = ["url"] + (["caption"] if "caption" in names else [])
    return table.select(first + [c for c in names if c not in first])


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snapshot_input(config: IngestConfig) -> Path:
    """Copy the URL list into the run once; a rerun must name the same list (or none changed)."""
    input_dir = config.run_dir / "input"
    snapshot, source = input_dir / "urls.parquet", input_dir / "source.json"
    digest = _file_digest(config.urls) if Path(config.urls).exists() else None
    if snapshot.exists() and source.exists():
        recorded = json.loads(source.read_text())
        if digest is not None and digest != recorded["sha256"]:
            raise IngestError(
                f"run directory {config.run_dir} was started with a different URL list "
                f"({recorded['path']}); resume with that list, or pass a new --out for this one"
            )
        return snapshot
    table = read_url_list(config.urls, config.url_col, config.caption_col)
    input_dir.mkdir(parents=True, exist_ok=True)
    tmp = snapshot.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, snapshot)
    source.write_text(json.dumps({"path": str(config.urls), "sha256": digest, "rows": table.num_rows}))
    return snapshot


# ---------------------------------------------------------------- pool manifest core


def tar_index(tar_path: Path) -> dict[str, tuple[int, int]]:
    """``key -> (offset, nbytes)`` of each stored JPEG, for random access without untarring."""
    index = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                index[member.name[: -len(".jpg")]] = (member.offset_data, member.size)
    return index


def pool_part(meta: pa.Table, index: dict[str, tuple[int, int]], shard: str) -> pa.Table:
    """Turn img2dataset's per-shard table into a pool manifest part (POOL_SCHEMA + carried columns)."""
    n = meta.num_rows
    keys = meta.column("key").to_pylist()
    raw_status = meta.column("status").to_pylist()
    messages = meta.column("error_message").to_pylist()
    outcomes = [
        ("success", None, None) if raw == "success" else ("failed", *classify(message or raw or ""))
        for raw, message in zip(raw_status, messages)
    ]
    status, error_class, error_message = (list(column) for column in zip(*outcomes)) if n else ([], [], [])
    located = [index.get(k) if s == "success" else None for k, s in zip(keys, status)]
    missing = [k for k, s, loc in zip(keys, status, located) if s == "success" and loc is None]
    if missing:
        raise IngestError(f"shard {shard}: {len(missing)} images listed as stored are missing from the tar")

    def column(name: str, default_type: pa.DataType) -> pa.Array:
        if name in meta.column_names:
            return pc.cast(meta.column(name), default_type).combine_chunks()
        return pa.nulls(n, default_type)

    built = {
        "key": pa.array(keys, pa.string()),
        "url": column("url", pa.string()),
        "caption": column("caption", pa.string()),
        "status": pa.array(status, pa.string()),
        "error_class": pa.array(error_class, pa.string()),
        "error_message": pa.array(error_message, pa.string()),
        "width": column("width", pa.int32()),
        "height": column("height", pa.int32()),
        "original_width": column("original_width", pa.int32()),
        "original_height": column("original_height", pa.int32()),
        "sha256": column("sha256", pa.string()),
        "shard": pa.array([shard if loc else None for loc in located], pa.string()),
        "offset": pa.array([loc[0] if loc else None for loc in located], pa.int64()),
        "nbytes": pa.array([loc[1] if loc else None for loc in located], pa.int64()),
    }
    carried = [c for c in meta.column_names if c not in built]
    arrays = [built[f.name] for f in POOL_SCHEMA] + [meta.column(c) for c in carried]
    fields = list(POOL_SCHEMA) + [meta.schema.field(c) for c in carried]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields)).sort_by("key")


def read_pool(run_dir: Path) -> pa.Table:
    pool_dir = Path(run_dir) / "manifests" / "pool"
    parts = sorted(pool_dir.glob("part-*.parquet"))
    if not parts:
        raise IngestError(f"{run_dir} has no pool manifest yet: run the ingest first")
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")


def count_outcomes(pool: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    status = Counter(pool.column("status").to_pylist())
    errors = Counter(e for e in pool.column("error_class").to_pylist() if e is not None)
    return dict(status), dict(errors)


# ---------------------------------------------------------------- distributed download


def _shard_name(shard_id: int, digits: int) -> str:
    return f"{shard_id:0{digits}d}"


def _driver_alive(token: list) -> bool:
    """Whether the driver that submitted this task still runs: ``token`` wraps an object the driver
    owns (a list keeps Ray from resolving it before the task starts), and fetching an object whose
    owner died fails. Works on any node, unlike a process check."""
    import ray

    try:
        ray.get(token[0], timeout=60)
    except Exception:  # OwnerDiedError, ObjectLostError, GetTimeoutError: either way, do not record
        return False
    return True


def _download_shard(downloader, shard_id: int, arrow_file: str, policy: FetchPolicy, run_dir: str,
                    digits: int, driver_token: list) -> dict[str, int]:  # fmt: skip
    """One Ray task: download a shard with the guarded opener, then write its pool part last."""
    from curation import fetch

    raylet = os.getppid()
    fetch.install(policy)
    ok, _ = downloader((shard_id, arrow_file))
    name = _shard_name(shard_id, digits)
    if not ok:
        raise RuntimeError(f"shard {name} failed inside img2dataset (see the worker log above)")
    if os.getppid() != raylet or not _driver_alive(driver_token):
        # The node or the driver died under this task (the run was killed): a worker that outlives its
        # run must not record the shard; its results may be from a half-dead crawl (in demo mode the
        # web server dies with the driver, and every download after that is refused).
        raise RuntimeError(f"shard {name}: the run died during the download; not recorded")
    images = Path(run_dir) / "images"
    meta = pq.read_table(images / f"{name}.parquet")
    part = pool_part(meta, tar_index(images / f"{name}.tar"), f"images/{name}.tar")
    pool_dir = Path(run_dir) / "manifests" / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    tmp = pool_dir / f".part-{name}.parquet.tmp"
    pq.write_table(part, tmp)
    os.replace(tmp, pool_dir / f"part-{name}.parquet")
    return dict(Counter(part.column("status").to_pylist()))


def done_shards(pool_dir: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in pool_dir.glob("part-*.parquet")}


def run_ingest(config: IngestConfig, ray_address: str | None = None, progress: bool = True) -> IngestResult:
    """Download every URL of ``config.urls`` into ``config.run_dir``; resumes finished shards."""
    import ray
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.writer import WebDatasetSampleWriter
    from tqdm import tqdm

    from curation.ray_runtime import init_ray

    start = time.perf_counter()
    run_dir = Path(config.run_dir).resolve()
    snapshot = snapshot_input(dataclasses.replace(config, run_dir=run_dir))
    columns = pq.read_schema(snapshot).names
    rows = pq.read_metadata(snapshot).num_rows
    shards_total = -(-rows // config.samples_per_shard)
    digits = max(5, len(str(shards_total - 1)))
    pool_dir = run_dir / "manifests" / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    done = done_shards(pool_dir)
    todo = shards_total - len(done)
    downloaded = 0
    if todo:
        init_ray(ray_address)
        images = run_dir / "images"
        tmp = images / "_tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        has_caption = "caption" in columns
        extra = [c for c in columns if c not in ("url", "caption")]
        with contextlib.redirect_stdout(io.StringIO()):  # img2dataset's reader chats about bandwidth
            reader = Reader(str(snapshot), "parquet", "url", "caption" if has_caption else None, None, None,
                            extra or None, config.samples_per_shard, done, str(tmp))  # fmt: skip
            shards = list(reader)
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter,
            resizer=ImageResizer(config.image),
            thread_count=config.threads_per_shard,
            save_caption=has_caption,
            extract_exif=False,
            output_folder=str(images),
            column_list=reader.column_list,
            timeout=config.timeout_s,
            number_sample_per_shard=config.samples_per_shard,
            oom_shard_count=digits,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format="jpg",
            retries=config.retries,
            user_agent_token=config.user_agent_token,
            disallowed_header_directives=list(config.disallowed_header_directives),
        )
        task = ray.remote(_download_shard).options(num_cpus=config.cpus_per_shard, max_retries=2)
        downloader_ref = ray.put(downloader)
        driver_token = [ray.put(True)]
        pending = {
            task.remote(downloader_ref, sid, path, config.policy, str(run_dir), digits, driver_token): sid
            for sid, path in shards
        }
        done_rows = sum(pq.read_metadata(pool_dir / f"part-{_shard_name(s, digits)}.parquet").num_rows for s in done)
        failures: list[str] = []
        counts: Counter = Counter()
        bar = tqdm(total=rows, initial=done_rows, unit="url", desc="ingest", disable=not progress, smoothing=0)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            shard_id = pending.pop(ready[0])
            try:
                shard_counts = ray.get(ready[0])
            except Exception as err:  # a shard that fails is reported; the others go on
                failures.append(f"shard {shard_id}: {err}")
                continue
            counts.update(shard_counts)
            bar.update(sum(shard_counts.values()))
            elapsed = time.perf_counter() - start
            bar.set_postfix(ok=counts["success"], failed=counts["failed"], img_s=f"{counts['success'] / elapsed:.0f}")
        bar.close()
        downloaded = counts["success"]
        if failures:
            raise IngestError(
                f"{len(failures)} shards failed; finished shards are kept, rerun the same command to retry them:\n"
                + "\n".join(failures)
            )
        shutil.rmtree(tmp, ignore_errors=True)
    pool = read_pool(run_dir)
    if pool.num_rows != rows:
        raise IngestError(f"pool manifest has {pool.num_rows} rows for {rows} input URLs; rerun to repair")
    status_counts, error_counts = count_outcomes(pool)
    return IngestResult(pool_dir, rows, shards_total, len(done), time.perf_counter() - start, downloaded,
                        status_counts, error_counts)  # fmt: skip
