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


def embedding_schema(dim: int) -> pa.Schema:
    """RUN/embeddings/NAME/part-NNNNN.parquet: one L2-normalised vector per stored pool image."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


# RUN/manifests/dedup.parquet: one row per stored pool image.
DEDUP_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("component", pa.string(), nullable=False),  # key of the component's representative
        pa.field("component_size", pa.int32(), nullable=False),
        pa.field("max_similarity", pa.float32(), nullable=False),  # strongest copy edge in the component
        pa.field("is_representative", pa.bool_(), nullable=False),
        pa.field("leak", pa.bool_(), nullable=False),  # the component holds a near-copy of an eval image
        pa.field("leak_eval_image", pa.string()),  # that evaluation image (path), for rows matched directly
        pa.field("leak_similarity", pa.float32()),
        pa.field("keep", pa.bool_(), nullable=False),  # representative and not a leak
    ]
)

# RUN/manifests/retrieval.parquet: every (pool image, seed image) source; an image retrieved by
# several seeds has several rows (collisions stay queryable).
RETRIEVAL_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("seed_set", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # "sample" or "cluster"
        pa.field("seed_key", pa.string()),  # seed image (path under the seed root); null for cluster mode
        pa.field("similarity", pa.float32()),  # to that seed image, or to the cluster centroid
    ]
)

# RUN/manifests/curated.parquet: the curated dataset, one row per selected image. Images live in
# the same tar shards as the pool (seed images are stored in images/seeds-NAME.tar).
CURATED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),  # null for seed images
        pa.field("shard", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("nbytes", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "retrieval", "balance" or "seed"
        pa.field("seed_set", pa.string()),
        pa.field("seed_key", pa.string()),
        pa.field("similarity", pa.float32()),
        pa.field("component", pa.string()),
        pa.field("cluster", pa.list_(pa.int32())),  # cluster id at each level of the hierarchy
    ]
)

# RUN/embeddings/NAME/failed-NNNNN.parquet: pool images the embed stage could not decode.
FAILED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),  # "ErrorClass: message"
    ]
)

# RUN/manifests/clusters.parquet: the hierarchical k-means of the deduplicated pool.
CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("cluster", pa.list_(pa.int32()), nullable=False),  # id per level, finest level first
        pa.field("balanced", pa.bool_(), nullable=False),  # drawn into the balanced sample
    ]
)
