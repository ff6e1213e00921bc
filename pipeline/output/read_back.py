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
from pipeline.core.corpus import manifest_file, manifest_info
from pipeline.core.generations import ShardView, shard_view
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


def read_shard(path: str, history: bool = False) -> "pa.Table":
    """One whole shard as a table, with its settings in ``schema.metadata`` (a shard
    holds ``docs_per_shard`` documents, so it fits in memory where the output may not).

    Its current rows, re-keyed (see ``pipeline.core.generations``), once the output has
    been synced; ``history=True`` gives every row as it was stored."""
    import pyarrow.parquet as pq

    with storage.open_for_reading(path) as f:
        table = pq.read_table(f)
    refuse_stand_in(footer_settings(table.schema.metadata), path)
    try:
        output, shard = OutputLayout.holding(path)
    except ValueError:  # a shard file on its own, outside an output: as stored
        return table
    view = None if history else current_view(output, shard)
    return table if view is None else current_rows(table, view)


def synced(output: "OutputLayout") -> bool:
    """Whether a sync ever changed the output (else every stored row is current)."""
    return storage.exists(output.manifest) and manifest_info(output.manifest).get("generation", "0") != "0"


def current_view(output: "OutputLayout", shard: int, is_synced: bool | None = None) -> ShardView | None:
    """The shard's current view, or None where every stored row is current."""
    if not (synced(output) if is_synced is None else is_synced):
        return None
    import pyarrow.parquet as pq

    rows = pq.read_table(manifest_file(output.manifest), filters=[("shard", "=", shard)],
                         columns=["doc_id", "path", "shard", "superseded_in", "embedded_doc_id"])
    return shard_view(rows)


def current_rows(rows: "pa.Table | pa.RecordBatch", view: ShardView) -> "pa.Table | pa.RecordBatch":
    """The rows of ``view``'s shard that are current, under their current doc id and path."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = rows.filter(pc.is_in(rows.column("doc_id"), value_set=pa.array(list(view.current), pa.string())))
    if not view.rekeys() or kept.num_rows == 0:
        return kept
    now = [view.current[stored] for stored in kept.column("doc_id").to_pylist()]
    columns = {name: kept.column(name) for name in kept.schema.names}
    columns["doc_id"] = pa.array([doc_id for doc_id, _ in now], pa.string())
    make = pa.Table.from_arrays if isinstance(kept, pa.Table) else pa.RecordBatch.from_arrays
    if "metadata" not in columns:  # some columns only
        return make(list(columns.values()), schema=kept.schema)
    metadata = kept.column("metadata")
    if isinstance(metadata, pa.ChunkedArray):
        metadata = metadata.combine_chunks()
    fields = {name: metadata.field(name) for name in (f.name for f in metadata.type)}
    fields["path"] = pa.array([path for _, path in now], pa.string())
    columns["metadata"] = pa.StructArray.from_arrays(list(fields.values()), fields=list(metadata.type))
    return make(list(columns.values()), schema=kept.schema)


def embedding_batch(record_batch: "pa.RecordBatch") -> EmbeddingBatch:
    """One record batch of a shard (``COLUMNS``) as Python and numpy values."""
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


def stream_embeddings(output: str, batch_size: int = 1000, history: bool = False) -> Iterator[EmbeddingBatch]:
    """Every current row of an output (``read_shard``; ``history=True``: every stored
    row), in shard order then row order, in batches of at most ``batch_size`` rows. Memory holds what pyarrow decodes at a time (about one row
    group of one shard), whatever the size of the output; a batch never spans two shards."""
    import pyarrow.parquet as pq

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    where = OutputLayout.of(output)
    is_synced = not history and synced(where)
    for shard, path in sorted(where.list_shards().numbers.items()):
        view = current_view(where, shard, is_synced)
        with storage.open_for_reading(path) as f:
            parquet = pq.ParquetFile(f)
            refuse_stand_in(footer_settings(parquet.metadata.metadata), path)
            for record_batch in parquet.iter_batches(batch_size=batch_size, columns=COLUMNS):
                if view is not None:
                    record_batch = current_rows(record_batch, view)
                if record_batch.num_rows:
                    yield embedding_batch(record_batch)


def current_shard_rows(output: str, columns: list[str] | None = None,
                       shards: set[int] | None = None) -> Iterator[tuple[int, "pa.Table"]]:
    """(shard, its current rows) for every shard of an output (or those in ``shards``),
    one whole shard at a time, ``columns`` only (default ``COLUMNS``; ``doc_id`` is
    needed for the current view). Row positions are the same whichever columns are read."""
    where = OutputLayout.of(output)
    is_synced = synced(where)
    for shard, path in sorted(where.list_shards().numbers.items()):
        if shards is not None and shard not in shards:
            continue
        table = stored_columns(path, columns or COLUMNS)
        view = current_view(where, shard, is_synced)
        yield shard, (table if view is None else current_rows(table, view))


def embedding_stats(output: str) -> dict[str, Any]:
    """How many vectors an output holds and what they are, from shard footers only
    (``pipeline.stats`` and the settings), so it costs one small read per shard (of a
    synced output, the doc id column too: it counts the current rows):
    ``count`` rows, ``dimension``, ``model`` (model id), ``model_profile``, ``prefix``,
    ``shards`` (published shard files) and ``documents`` (embedded documents)."""
    stats: dict[str, Any] = {"count": 0, "dimension": None, "model": None, "model_profile": None, "prefix": None,
                             "shards": 0, "documents": 0}
    where = OutputLayout.of(output)
    is_synced = synced(where)
    for shard, path in sorted(where.list_shards().numbers.items()):
        footer = shard_metadata(path)
        if stats["model"] is None:
            stats.update(dimension=int(footer["dimension"]), model=footer.get("model_id"),
                         model_profile=footer.get("model_profile"), prefix=footer.get("prefix"))
        stats["shards"] += 1
        view = current_view(where, shard, is_synced)
        if view is None:
            counts = json.loads(footer["stats"])
            stats["count"] += int(counts["chunks"])
            stats["documents"] += int(counts["embedded_documents"])
        else:  # a synced output: its current rows, from the doc id column
            doc_ids = stored_columns(path, ["doc_id"])["doc_id"].to_pylist()
            kept = [doc_id for doc_id in doc_ids if view.keeps(doc_id)]
            stats["count"] += len(kept)
            stats["documents"] += len(set(kept))
    return stats


def stored_columns(path: str, columns: list[str]) -> "pa.Table":
    """Some columns of a shard as stored (history included), without the others' pages."""
    import pyarrow.parquet as pq

    with storage.open_for_reading(path) as f:
        return pq.read_table(f, columns=columns)
