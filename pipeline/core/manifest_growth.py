"""A corpus that gained documents after its manifest was written.

By default a run keeps the manifest it has (shard membership never moves) and only says
how many documents it leaves out. ``--add-new-documents`` appends them to the manifest
as new shards after the last one, so finished shards are never touched; ``--sync``
(``pipeline.core.sync``) follows changed, moved and deleted documents too.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.core.corpus import ROWS_PER_WRITE, list_documents, manifest_file
from pipeline.core.sync import sync_output


def documents_not_in_manifest(corpus: str, pattern: str, manifest: str) -> Iterator[storage.Listed]:
    """Documents listed now that the manifest lacks, in listing order. The manifest's
    paths are held as one Arrow column (tens of bytes a document), the listing streamed."""
    parquet = pq.ParquetFile(manifest_file(manifest))
    table = parquet.read(columns=[name for name in ("path", "superseded_in") if name in parquet.schema_arrow.names])
    if "superseded_in" in table.column_names:  # a synced manifest: a deleted path is not known any more
        table = table.filter(pc.is_null(table["superseded_in"]))
    known = table["path"].combine_chunks()
    listing = list_documents(corpus, pattern)
    while batch := list(itertools.islice(listing, ROWS_PER_WRITE)):
        listed = pc.is_in(pa.array([d.relative for d in batch], pa.string()), value_set=known).to_pylist()
        yield from (document for document, present in zip(batch, listed) if not present)


def add_new_documents(corpus: str, pattern: str, manifest: str) -> int:
    """Append the documents the manifest lacks as new shards; returns how many. A sync
    that only adds (``pipeline.core.sync``): a new generation of the manifest with its
    change log, finished shards untouched, ``_SUCCESS.json`` deleted first (it no longer
    describes the output, and left there it would make a later run without this option
    think the new shards were done)."""
    return sync_output(corpus, pattern, manifest.rsplit("/", 1)[0], only_added=True).counts["added"]
