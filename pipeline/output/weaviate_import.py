"""Shard rows as Weaviate objects (docs/weaviate.md).

A pure mapping, with no client: ``weaviate_objects(batch)`` turns one ``EmbeddingBatch``
from ``pipeline.output.read_back.stream_embeddings`` into dicts that the weaviate-client batch API
takes as they are (``batch.add_object(properties=..., vector=..., uuid=...)``), and
``COLLECTION_PROPERTIES`` names the collection's properties and their data types;
``weaviate_changes(output, generation)`` is what one sync's change log does to a
collection imported before it.
weaviate-client is not a dependency of the pipeline; only the script in the docs imports it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from pipeline.output.read_back import EmbeddingBatch

# Fixed for good: every object's uuid derives from it, so changing it would make a
# re-import add a second copy of every chunk instead of overwriting it.
UUID_NAMESPACE = uuid.UUID("2a015435-7b3d-5bff-8a67-80092ad3b685")

# (property name, weaviate DataType member name), in the order of docs/weaviate.md.
COLLECTION_PROPERTIES: list[tuple[str, str]] = [
    ("doc_id", "TEXT"),
    ("chunk_id", "INT"),
    ("text", "TEXT"),
    ("path", "TEXT"),
    ("title", "TEXT"),
    ("author", "TEXT"),
    ("date", "TEXT"),
    ("source_url", "TEXT"),
    ("language", "TEXT"),
    ("heading_path", "TEXT_ARRAY"),
    ("char_start", "INT"),
    ("char_end", "INT"),
    ("token_count", "INT"),
]

# The metadata struct fields that become properties (front_matter, front_matter_error
# and encoding stay in the shards).
METADATA_PROPERTIES = [name for name, _ in COLLECTION_PROPERTIES if name not in ("doc_id", "chunk_id", "text")]


def object_uuid(doc_id: str, chunk_id: int) -> str:
    """The object's id: the same (doc_id, chunk_id) always gives the same uuid."""
    return str(uuid.uuid5(UUID_NAMESPACE, f"{doc_id}:{int(chunk_id)}"))


def weaviate_objects(batch: "EmbeddingBatch") -> list[dict[str, Any]]:
    """One ``{"uuid", "properties", "vector"}`` per row of ``batch``, in row order.

    Properties whose value is null (``title`` of a document without front matter, ...)
    are left out, never sent as None: Weaviate stores a missing property as null.
    ``vector`` is a list of Python floats, the row's float32 values exactly."""
    objects = []
    for i, doc_id in enumerate(batch.doc_ids):
        chunk_id = int(batch.chunk_ids[i])
        metadata = batch.metadata[i] or {}
        properties: dict[str, Any] = {"doc_id": doc_id, "chunk_id": chunk_id, "text": batch.texts[i]}
        for name in METADATA_PROPERTIES:
            value = metadata.get(name)
            if value is not None:
                properties[name] = list(value) if name == "heading_path" else value
        objects.append({
            "uuid": object_uuid(doc_id, chunk_id),
            "properties": properties,
            "vector": batch.vectors[i].tolist(),
        })
    return objects


@dataclass
class WeaviateChanges:
    """What one sync's change log does to a collection imported from the output before
    it: ``delete`` the uuids of chunks that are no longer current (a changed document's
    extra chunks when it got shorter, a moved document's old ids, a deleted document's
    chunks), and ``upsert`` the objects of the new chunks (``weaviate_objects`` dicts)."""

    delete: list[str]
    upsert: Iterator[dict[str, Any]]


def weaviate_changes(output: str, generation: int) -> WeaviateChanges:
    """The collection changes of sync ``generation`` (apply each generation's in turn,
    after the run that embedded its shards). Reads only the shards the change touches."""
    import pyarrow.compute as pc

    from pipeline.core.sync import read_manifest
    from pipeline.output.layout import OutputLayout
    from pipeline.output.read_back import COLUMNS, embedding_batch, read_shard, stored_columns

    where = OutputLayout.of(output)
    manifest = read_manifest(where.manifest)
    ended = manifest.filter(pc.equal(manifest["superseded_in"], generation)).to_pylist()
    made = manifest.filter(pc.and_(pc.equal(manifest["generation"], generation), pc.is_null(manifest["superseded_in"])))
    upserts = []
    for shard in sorted(set(made["shard"].to_pylist())):
        rows = read_shard(where.shard(shard))
        upserts.append(rows.filter(pc.is_in(rows["doc_id"], value_set=made["doc_id"])))
    new_ids = {object_uuid(doc_id, chunk) for table in upserts
               for doc_id, chunk in zip(table["doc_id"].to_pylist(), table["chunk_id"].to_pylist())}
    old_ids = []
    for shard in sorted({row["shard"] for row in ended}):
        stored = stored_columns(where.shard(shard), ["doc_id", "chunk_id"]).to_pylist()
        chunks: dict[str, list[int]] = {}
        for row in stored:
            chunks.setdefault(row["doc_id"], []).append(row["chunk_id"])
        for row in (r for r in ended if r["shard"] == shard):
            old_ids += [object_uuid(row["doc_id"], chunk) for chunk in chunks.get(row["embedded_doc_id"] or row["doc_id"], [])]
    return WeaviateChanges(delete=sorted(set(old_ids) - new_ids), upsert=(
        obj for table in upserts for batch in table.select(COLUMNS).to_batches() if batch.num_rows
        for obj in weaviate_objects(embedding_batch(batch))))
