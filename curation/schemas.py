"""Arrow schemas of the run's manifests: the data contracts between stages, defined once.

docs/manifests.md documents every column; tests check that each stage writes exactly these.
"""

from __future__ import annotations

import pyarrow as pa

# One row per input URL. Input columns other than url and caption are carried after these.
POOL_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # "success" or "failed"
        pa.field("error_class", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),  # of the downloaded bytes, before re-encoding
        pa.field("shard", pa.string()),  # tar file, relative to the run directory
        pa.field("offset", pa.int64()),  # byte offset of the stored JPEG inside the tar
        pa.field("nbytes", pa.int64()),  # size of the stored JPEG
    ]
)

RESERVED_INPUT_COLUMNS = frozenset(POOL_SCHEMA.names) - {"url", "caption"}
