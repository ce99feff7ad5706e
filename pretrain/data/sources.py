"""Image sources: random access to the images of a curated manifest or of an ImageFolder tree.

Every source has the same small interface (`__len__`, `load`, `key`), so the dataset can mix them.
A corrupt image must not kill a week-long run: `load` skips it deterministically (to the next index)
and counts it in `n_skipped`, per process.
"""

from __future__ import annotations

import abc
import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MANIFEST_COLUMNS = ("key", "shard", "offset", "nbytes")
SUCCESS = "success"

# More consecutive corrupt images than this means a broken shard or manifest, not bad luck.
MAX_CONSECUTIVE_SKIPS = 32

# What PIL raises on undecodable, truncated or malicious data.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageSource(abc.ABC):
    """Random access to N images, with deterministic skipping of corrupt ones."""

    def __init__(self) -> None:
        self.n_skipped = 0

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def key(self, index: int) -> str:
        """A stable identifier of image `index`, for logs and deduplication."""

    @abc.abstractmethod
    def read_bytes(self, index: int) -> bytes:
        """The encoded bytes of image `index`."""

    def decode(self, index: int) -> Image.Image:
        """Image `index` as RGB; raises on a corrupt image (see `load` for the tolerant version)."""
        with Image.open(io.BytesIO(self.read_bytes(index))) as image:
            return image.convert("RGB")

    def load_indexed(self, index: int) -> tuple[int, Image.Image]:
        """(index actually returned, RGB image): corrupt images are skipped to the next index.

        The returned index is what callers needing per-image metadata (a label, a key) must use.
        """
        for attempt in range(MAX_CONSECUTIVE_SKIPS + 1):
            current = (index + attempt) % len(self)
            try:
                return current, self.decode(current)
            except _DECODE_ERRORS as error:
                self.n_skipped += 1
                logger.warning(
                    "skipping corrupt image %s: %s: %s", self.key(current), type(error).__name__, error
                )
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_SKIPS + 1} consecutive corrupt images from index {index} of {self!r}: "
            "the shard or the manifest is broken"
        )

    def load(self, index: int) -> Image.Image:
        """Image `index` as RGB, or the next readable one when it is corrupt."""
        return self.load_indexed(index)[1]


def find_run_dir(manifest: Path) -> Path:
    """RUN_DIR of a manifest: the parent of its nearest ancestor folder named `manifests`."""
    for folder in [manifest, *manifest.parents]:
        if folder.name == "manifests" and folder.is_dir():
            return folder.parent
    raise ValueError(
        f"cannot infer the run directory of manifest {manifest}: no ancestor folder is named 'manifests'; "
        "pass root=RUN_DIR (the folder that the manifest's shard paths are relative to)"
    )


def _manifest_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.is_file():
        return [path]
    parts = sorted(path.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"manifest folder {path} holds no part-*.parquet file")
    return parts


class ManifestSource(ImageSource):
    """The successful rows of a curated manifest; image i is bytes [offset, offset+nbytes) of RUN_DIR/shard.

    Columns are kept as Arrow/numpy arrays rather than Python objects, so that forked data-loader
    workers share them instead of copying them on access.
    """

    def __init__(self, path: str | Path, root: str | Path | None = None) -> None:
        super().__init__()
        self.path = Path(path).absolute()
        files = _manifest_files(self.path)
        self.root = Path(root).absolute() if root is not None else find_run_dir(self.path)
        table = pa.concat_tables([self._read_table(file) for file in files], promote_options="default")
        n_rows = table.num_rows
        if "status" in table.column_names:
            status = table.column("status")
            table = table.filter(pc.equal(status, SUCCESS))
            if table.num_rows == 0:
                counts = Counter(status.to_pylist())
                raise ValueError(
                    f"manifest {self.path} has no readable image: 0 of {n_rows} rows have status "
                    f"'{SUCCESS}' (status counts: {dict(counts.most_common())})"
                )
        elif n_rows == 0:
            raise ValueError(f"manifest {self.path} has no readable image: it has 0 rows")
        self._keys = table.column("key").combine_chunks()
        shards = pc.dictionary_encode(table.column("shard")).combine_chunks()
        self._shard_paths = [str(self.root / shard) for shard in shards.dictionary.to_pylist()]
        self._shard_ids = shards.indices.to_numpy(zero_copy_only=False)
        self._offsets = table.column("offset").to_numpy().astype(np.int64)
        self._nbytes = table.column("nbytes").to_numpy().astype(np.int64)

    def _read_table(self, file: Path) -> pa.Table:
        names = pq.read_schema(file).names
        missing = [column for column in MANIFEST_COLUMNS if column not in names]
        if missing:
            raise ValueError(f"manifest file {file} lacks the columns {missing} (has {names})")
        columns = [*MANIFEST_COLUMNS, "status"] if "status" in names else list(MANIFEST_COLUMNS)
        return pq.read_table(file, columns=columns)

    def __len__(self) -> int:
        return len(self._offsets)

    def __repr__(self) -> str:
        return f"ManifestSource({str(self.path)!r}, root={str(self.root)!r}, {len(self)} images)"

    def key(self, index: int) -> str:
        return self._keys[index].as_py()

    def read_bytes(self, index: int) -> bytes:
        # Opened per read: cheap next to decoding, and safe in forked workers (no shared file offset).
        with open(self._shard_paths[self._shard_ids[index]], "rb") as shard:
            shard.seek(int(self._offsets[index]))
            return shard.read(int(self._nbytes[index]))


class ImageFolderSource(ImageSource):
    """An ImageFolder tree (`path/<class>/**/<image>`), labelled by class folder in sorted order."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path).absolute()
        if not self.path.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.path}")
        self.classes = sorted(entry.name for entry in self.path.iterdir() if entry.is_dir())
        self._files: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            files = sorted(
                file
                for file in (self.path / name).rglob("*")
                if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file()
            )
            self._files += files
            labels += [label] * len(files)
        if not self._files:
            raise ValueError(
                f"image folder {self.path} holds no image: expected {self.path}/<class>/<image> with an "
                f"extension in {sorted(IMAGE_EXTENSIONS)}"
            )
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.path)!r}, {len(self)} images, {len(self.classes)} classes)"

    def key(self, index: int) -> str:
        return self._files[index].relative_to(self.path).as_posix()

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def read_bytes(self, index: int) -> bytes:
        return self._files[index].read_bytes()
