"""The Parquet shard: schema, writer and reader (see docs/schema.md).

Rows are appended to a hidden temp file as each group of documents is embedded, so
memory holds one group, not a shard; the file becomes the shard in one rename.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.core.vector_format import VectorFormat

PIPELINE_VERSION = "0.1.0"
META_PREFIX = "pipeline."

METADATA_TYPE = pa.struct(
    [
        ("path", pa.string()),
        ("title", pa.string()),
        ("author", pa.string()),
        ("date", pa.string()),
        ("source_url", pa.string()),
        ("language", pa.string()),
        ("front_matter", pa.string()),  # every field, as a JSON object
        ("front_matter_error", pa.string()),
        ("encoding", pa.string()),
        ("heading_path", pa.list_(pa.string())),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("token_count", pa.int32()),
    ]
)
# Front-matter fields promoted to their own metadata columns.
PROMOTED_FIELDS = ("title", "author", "date", "source_url", "language")


# A shard's columns but the vectors: what readers hand back (pipeline.core.chunk_columns).
CHUNK_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("chunk_id", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("metadata", METADATA_TYPE, nullable=False),
    ]
)


def shard_schema(dimension: int, settings: dict[str, str]) -> pa.Schema:
    """The columns of a shard whose settings (the vector format among them) are these."""
    schema = CHUNK_SCHEMA
    for offset, field in enumerate(VectorFormat.of(settings).fields(dimension)):
        schema = schema.insert(2 + offset, field)
    meta = {META_PREFIX + k: v for k, v in settings.items()}
    meta[META_PREFIX + "version"] = PIPELINE_VERSION
    return schema.with_metadata(meta)


def rows_table(schema: pa.Schema, rows: list[dict[str, Any]] | pa.Table, vectors: np.ndarray) -> pa.Table:
    """A shard table of chunk rows (a CHUNK_SCHEMA table, or dicts with doc_id,
    chunk_id, text, metadata) and their vectors."""
    chunks = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)
    dimension = schema.field("embedding_vector").type.list_size
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, dimension)
    columns = chunks.columns
    columns[2:2] = [pa.chunked_array([array]) for array in VectorFormat.of(footer_settings(schema.metadata)).arrays(vectors)]
    return pa.Table.from_arrays(columns, schema=schema)


class ShardWriter:
    """Append row groups to a temp Parquet file; ``close(stats)`` records the shard's counts."""

    def __init__(self, path, schema: pa.Schema):
        self.schema = schema
        self._writer = pq.ParquetWriter(path, schema, compression="snappy")

    def write(self, rows: list[dict[str, Any]] | pa.Table, vectors: np.ndarray) -> None:
        if len(rows):
            self._writer.write_table(rows_table(self.schema, rows, vectors))

    def close(self, stats: dict[str, Any]) -> None:
        self._writer.add_key_value_metadata({META_PREFIX + "stats": json.dumps(stats, sort_keys=True)})
        self._writer.close()

    def abort(self) -> None:
        self._writer.close()


def shard_metadata(path: str) -> dict[str, str]:
    """A shard's file-level metadata (settings and stats) without reading its rows."""
    with storage.open_for_reading(path) as f:
        return footer_settings(pq.ParquetFile(f).metadata.metadata)


def footer_settings(raw: dict[bytes, bytes] | None) -> dict[str, str]:
    """The pipeline's entries of a Parquet file's key-value metadata, without their prefix."""
    return {k.decode()[len(META_PREFIX) :]: v.decode() for k, v in (raw or {}).items() if k.startswith(META_PREFIX.encode())}


def shard_stats(path: str) -> dict[str, Any]:
    return json.loads(shard_metadata(path)["stats"])


# Settings every shard of one output must share, or their vectors cannot be mixed.
SHARED_SETTINGS = ("model_profile", "model_id", "weights_sha256", "stand_in_for", "dimension", "matryoshka_from", "prefix",
                   "max_tokens", "normalized", "chunk_max_tokens", "chunk_overlap_tokens", "vector_dtype", "compact_columns")

# What a shard made before a setting was recorded had: it is compared as this.
UNRECORDED_MEANS = {"vector_dtype": "float32", "compact_columns": ""}

# Settings shards made before they were recorded lack: compared only where both have them.
RECORDED_LATER = ("weights_sha256",)


def setting_differs(first: dict[str, str], second: dict[str, str], key: str) -> bool:
    if key in RECORDED_LATER and (key not in first or key not in second):
        return False
    return first.get(key, UNRECORDED_MEANS.get(key)) != second.get(key, UNRECORDED_MEANS.get(key))


def settings_mismatch(existing: dict[str, str], wanted: dict[str, str], keys: Iterable[str]) -> list[str]:
    """The settings (model, weights, dimension, prefix, chunker) in which two shards differ."""
    return [f"{k}: {existing.get(k)!r} in the output, {wanted.get(k)!r} now" for k in keys if setting_differs(existing, wanted, k)]


def refuse_stand_in(settings: dict[str, str], where: str) -> None:
    """Vectors from a stand-in model (random weights, pipeline.core.stand_in) mean nothing:
    nothing that uses vectors may take them."""
    if settings.get("stand_in_for"):
        from pipeline.errors import PipelineError

        raise PipelineError(f"{where} was made by a stand-in for {settings['stand_in_for']} (random weights, for "
                            f"measuring throughput only): its vectors mean nothing; embed again with the real model")
