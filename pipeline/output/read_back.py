"""Reading an output back: shard paths, whole shards, vectors in bounded batches, counts.

For whoever uses the embeddings (search, an import into a vector store): an output can
hold thousands of shards, far more than memory, so ``stream_embeddings`` reads one shard
and one row batch at a time, and ``embedding_stats`` reads only footers. Paths may be
local or ``gs://`` / ``s3://`` (see docs/storage.md); a bucket's shards are read with
ranged reads, never downloaded whole. See docs/api.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from pipeline import storage
from pipeline.output.layout import OutputLayout
from pipeline.core.shard_file import footer_settings, refuse_stand_in, shard_metadata

if TYPE_CHECKING:  # pyarrow and numpy load only when something is read: `import pipeline` stays light
    import numpy as np
    import pyarrow as pa

COLUMNS = ["doc_id", "chunk_id", "embedding_vector", "text", "metadata"]


@dataclass
class EmbeddingBatch:
    """Consecutive rows of one shard, as Python and numpy values (row i of each field
    belongs together)."""

    doc_ids: list[str]
    chunk_ids: "np.ndarray"  # int32 [n]
    vectors: "np.ndarray"  # float32 [n, dim], L2-normalised
    texts: list[str]
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.doc_ids)


def list_embedding_files(output: str) -> list[str]:
    """The published shard files of an output (``layout``), in shard order. Hidden temp
    files a killed run left behind, and anything else in the folder, are skipped: only
    what was published in one step is complete."""
    return OutputLayout.of(output).list_shards().paths()


def read_shard(path: str) -> "pa.Table":
    """One whole shard as a table, with its settings in ``schema.metadata`` (a shard
    holds ``docs_per_shard`` documents, so it fits in memory where the output may not)."""
    import pyarrow.parquet as pq

    with storage.open_for_reading(path) as f:
        table = pq.read_table(f)
    refuse_stand_in(footer_settings(table.schema.metadata), path)
    return table


def _batch(record_batch: "pa.RecordBatch") -> EmbeddingBatch:
    import numpy as np
    import pyarrow as pa

    rows = record_batch.num_rows
    vectors = record_batch.column("embedding_vector")
    dimension = vectors.type.list_size if isinstance(vectors.type, pa.FixedSizeListType) else None
    flat = vectors.flatten().to_numpy(zero_copy_only=False)
    return EmbeddingBatch(
        doc_ids=record_batch.column("doc_id").to_pylist(),
        chunk_ids=record_batch.column("chunk_id").to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        vectors=np.asarray(flat, dtype=np.float32).reshape(rows, dimension if dimension is not None else -1),
        texts=record_batch.column("text").to_pylist(),
        metadata=record_batch.column("metadata").to_pylist(),
    )


def stream_embeddings(output: str, batch_size: int = 1000) -> Iterator[EmbeddingBatch]:
    """Every row of an output, in shard order then row order, in batches of at most
    ``batch_size`` rows. Memory holds what pyarrow decodes at a time (about one row
    group of one shard), whatever the size of the output; a batch never spans two shards."""
    import pyarrow.parquet as pq

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    for path in list_embedding_files(output):
        with storage.open_for_reading(path) as f:
            parquet = pq.ParquetFile(f)
            refuse_stand_in(footer_settings(parquet.metadata.metadata), path)
            for record_batch in parquet.iter_batches(batch_size=batch_size, columns=COLUMNS):
                if record_batch.num_rows:
                    yield _batch(record_batch)


def embedding_stats(output: str) -> dict[str, Any]:
    """How many vectors an output holds and what they are, from shard footers only
    (``pipeline.stats`` and the settings), so it costs one small read per shard:
    ``count`` rows, ``dimension``, ``model`` (model id), ``model_profile``, ``prefix``,
    ``shards`` (published shard files) and ``documents`` (embedded documents)."""
    stats: dict[str, Any] = {"count": 0, "dimension": None, "model": None, "model_profile": None, "prefix": None,
                             "shards": 0, "documents": 0}
    for path in list_embedding_files(output):
        footer = shard_metadata(path)
        if stats["model"] is None:
            stats.update(dimension=int(footer["dimension"]), model=footer.get("model_id"),
                         model_profile=footer.get("model_profile"), prefix=footer.get("prefix"))
        counts = json.loads(footer["stats"])
        stats["count"] += int(counts["chunks"])
        stats["documents"] += int(counts["embedded_documents"])
        stats["shards"] += 1
    return stats
