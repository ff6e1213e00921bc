"""A corpus that gained documents after its manifest was written.

By default a run keeps the manifest it has (shard membership never moves) and only says
how many documents it leaves out. ``--add-new-documents`` appends them to the manifest
as new shards after the last one, so finished shards are never touched.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.output.layout import OutputLayout
from pipeline.core.corpus import ROWS_PER_WRITE, list_documents, manifest_file, manifest_info, manifest_table


def documents_not_in_manifest(corpus: str, pattern: str, manifest: str) -> Iterator[storage.Listed]:
    """Documents listed now that the manifest lacks, in listing order. The manifest's
    paths are held as one Arrow column (tens of bytes a document), the listing streamed."""
    known = pq.read_table(manifest_file(manifest), columns=["path"])["path"].combine_chunks()
    listing = list_documents(corpus, pattern)
    while batch := list(itertools.islice(listing, ROWS_PER_WRITE)):
        listed = pc.is_in(pa.array([d.relative for d in batch], pa.string()), value_set=known).to_pylist()
        yield from (document for document, present in zip(batch, listed) if not present)


def add_new_documents(corpus: str, pattern: str, manifest: str) -> int:
    """Append the documents the manifest lacks as new shards; returns how many. The
    manifest is published again whole (old rows unchanged, then the new ones), and the
    output's ``_SUCCESS.json`` deleted: it no longer describes the output, and left there
    it would make a later run without this option (a pod's, or a rerun after a kill)
    think the new shards were done."""
    new = documents_not_in_manifest(corpus, pattern, manifest)
    first = next(new, None)
    if first is None:
        return 0
    info = manifest_info(manifest)
    per_shard, shards, documents = int(info["docs_per_shard"]), int(info["shards"]), int(info["documents"])
    old = pq.ParquetFile(manifest_file(manifest))
    storage.delete(OutputLayout.of(manifest.rsplit("/", 1)[0]).summary)  # first: a kill after the growth leaves none
    added = 0
    with storage.atomic_output(manifest) as staged, pq.ParquetWriter(staged.path, old.schema_arrow) as writer:
        for batch in old.iter_batches(ROWS_PER_WRITE):
            writer.write_batch(batch)
        pending = itertools.chain([first], new)
        while batch := list(itertools.islice(pending, ROWS_PER_WRITE)):
            writer.write_table(manifest_table(batch, added, per_shard, old.schema_arrow, first_shard=shards))
            added += len(batch)
        writer.add_key_value_metadata({
            "pipeline.documents": str(documents + added),
            "pipeline.shards": str(shards + -(-added // per_shard)),
            "pipeline.created_at": info.get("created_at", ""),
            "pipeline.extended_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        })
    return added
