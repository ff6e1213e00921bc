"""``--sync``: follow a corpus that changed since its manifest, one generation at a time.

The corpus is listed once and compared with the manifest's current rows by path and
content hash (``diff``): new documents are added, changed ones embedded again, deleted
ones marked, and a document whose bytes moved to a new path (the old path gone, its shard
already made) is re-keyed without embedding (``pipeline.core.generations``). The
change is published as the generation's change log, then applied to the manifest.

Kill safety and several workers: the change log is the commit point. It is published
exactly once (the first writer's stands; a second worker reads it instead of its own
diff), and the manifest is derived from it deterministically. A sync killed after the
change log and before the manifest finds the log on its rerun and applies it, then
lists the corpus again for anything that changed meanwhile. ``_SUCCESS.json`` is deleted
first, so a half-synced output never looks finished.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.core.corpus import ROWS_PER_WRITE, doc_id_for, list_documents, manifest_file, manifest_info
from pipeline.core.generations import (ACTIONS, CHANGE_LOG_SCHEMA, apply_change_log, current_row_count, first_copies,
                                       is_current, own_row_count, stored_ids, with_generations)
from pipeline.core.shard_file import footer_settings
from pipeline.output.layout import OutputLayout

log = logging.getLogger("luigi-interface")


@dataclass
class SyncResult:
    """What one sync did: the manifest's generation after it, and how many documents each
    action touched over the generations it published (``added``, ``changed``, ``moved``,
    ``deleted``)."""

    generation: int
    counts: Counter = field(default_factory=Counter)

    @property
    def changed_anything(self) -> bool:
        return sum(self.counts.values()) > 0

    def describe(self) -> str:
        if not self.changed_anything:
            return f"the output is in step with the corpus (generation {self.generation})"
        return f"synced to generation {self.generation}: {actions_counted(self.counts)}"


def actions_counted(counts: dict) -> str:
    """``1 added, 2 changed``: the actions with a count, in a fixed order."""
    return ", ".join(f"{counts[action]} {action}" for action in ACTIONS if counts.get(action))


def read_manifest(manifest: str) -> pa.Table:
    """The whole manifest with its generation columns, and the file's metadata (counts
    included, which are written as the file closes) as the table's."""
    parquet = pq.ParquetFile(manifest_file(manifest))
    return with_generations(parquet.read().replace_schema_metadata(parquet.metadata.metadata))


LISTING_SCHEMA = pa.schema([("path", pa.string()), ("bytes", pa.int64()), ("content_hash", pa.string())])


def listing_table(corpus: str, pattern: str) -> pa.Table:
    """The corpus as it is now: path, bytes, content_hash (one listing)."""
    return listing_of(list_documents(corpus, pattern))


def listing_of(documents: Iterable[storage.Listed]) -> pa.Table:
    """A listing held as Arrow columns, built ``ROWS_PER_WRITE`` documents at a time:
    never a Python list of the corpus."""
    batches, documents = [], iter(documents)
    while rows := list(itertools.islice(documents, ROWS_PER_WRITE)):
        batches.append(pa.record_batch([[d.relative for d in rows], [d.size for d in rows], [d.content_hash for d in rows]],
                                       schema=LISTING_SCHEMA))
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA).combine_chunks()


def diff(manifest: pa.Table, listing: pa.Table, first_new_shard: int, docs_per_shard: int, generation: int,
         published: set[int], only_added: bool = False, skip_duplicates: bool = False) -> pa.Table:
    """The change log that takes the manifest's current rows to the listing.

    Args:
        manifest: the manifest (``with_generations``).
        listing: ``listing_table`` of the corpus now.
        first_new_shard: the manifest's shard count: new rows go into shards from here.
        docs_per_shard: rows per new shard.
        generation: the generation this change log makes.
        published: the shards with a file: only a document whose shard is made can be
            re-keyed; one moved out of a shard not yet made is deleted and added.
        only_added: list new paths only (``--add-new-documents``).
        skip_duplicates: the output rejects copies (``--skip-duplicates``): a copy whose
            content's holder is changed or deleted here is embedded again (``changed``),
            so each content stays embedded once among the current documents.
    """
    # Memory: a 10-million-row manifest and listing are each held once; beside them, one
    # hash set of the current paths and an int per listed document (where its path is in the
    # manifest), then tables of the changes only. (A join of the whole listing with the whole
    # manifest doubled the peak.)
    current = manifest.filter(is_current(manifest)) if pc.any(pc.invert(is_current(manifest))).as_py() else manifest
    position = pc.index_in(listing["path"], value_set=current["path"])  # null: a path the manifest lacks
    known = pc.is_valid(position)
    new = listing.filter(pc.invert(known))
    changed = listing.slice(0, 0).append_column("content_hash_before", pa.array([], pa.string()))
    changed = changed.append_column("shard", pa.array([], pa.int32()))
    gone = current.slice(0, 0)
    if not only_added:
        hash_before = current["content_hash"].take(position)
        edited = pc.and_(known, pc.not_equal(listing["content_hash"], hash_before))
        changed = listing.filter(edited).append_column("content_hash_before", hash_before.filter(edited))
        changed = changed.append_column("shard", current["shard"].take(position.filter(edited))).sort_by("path")
        listed = np.zeros(current.num_rows, dtype=bool)
        listed[position.drop_null().to_numpy()] = True
        gone = current.filter(pa.array(~listed)).sort_by("path")
    gone = gone.append_column("stored_id", stored_ids(gone))
    moves = _pair_moves(gone, new, published)
    if skip_duplicates:
        changed, moves = _copies_left_without_holder(manifest, current, changed, gone, moves)
    columns = ["path", "bytes", "content_hash"]
    arriving = pa.concat_tables([new.select(columns), changed.select(columns)])
    listed = {path: (size, content_hash) for path, size, content_hash in zip(*(arriving[c].to_pylist() for c in columns))}
    old_shard = dict(zip(changed["path"].to_pylist(), changed["shard"].to_pylist()))
    embedded = sorted(path for path in listed if path not in moves)  # into new shards, in path order
    rows: list[dict] = []
    for i, path in enumerate(embedded):
        size, content_hash = listed[path]
        shard_before = old_shard.get(path)
        rows.append({"action": "added" if shard_before is None else "changed", "doc_id": doc_id_for(path),
                     "path": path, "old_path": None if shard_before is None else path, "old_shard": shard_before,
                     "new_shard": first_new_shard + i // docs_per_shard, "bytes": size, "content_hash": content_hash})
    for path, old in sorted(moves.items()):
        size, content_hash = listed[path]
        rows.append({"action": "moved", "doc_id": doc_id_for(path), "path": path, "old_path": old["path"],
                     "old_shard": old["shard"], "new_shard": old["shard"], "bytes": size,
                     "content_hash": content_hash, "embedded_doc_id": old["stored_id"]})
    moved_away = {old["path"] for old in moves.values()}
    for old in gone.to_pylist():
        if old["path"] not in moved_away:
            rows.append({"action": "deleted", "doc_id": old["doc_id"], "path": old["path"], "old_path": old["path"],
                         "old_shard": old["shard"], "new_shard": None, "bytes": old["bytes"],
                         "content_hash": old["content_hash"]})
    time = dt.datetime.now(dt.timezone.utc).isoformat()
    for row in rows:
        row.update(generation=generation, time=time)
    return pa.Table.from_pylist(rows, schema=CHANGE_LOG_SCHEMA)


def _pair_moves(gone: pa.Table, new: pa.Table, published: set[int]) -> dict[str, dict]:
    """{new path: the gone row it moved from}: gone and new documents with the same bytes,
    paired in path order, where the gone one's shard is made."""
    waiting: dict[str, list[dict]] = defaultdict(list)
    for row in gone.to_pylist():
        if row["shard"] in published:
            waiting[row["content_hash"]].append(row)
    moves = {}
    for path, content_hash in zip(new["path"].to_pylist(), new["content_hash"].to_pylist()):
        if waiting.get(content_hash):
            moves[path] = waiting[content_hash].pop(0)
    return moves


def _copies_left_without_holder(manifest: pa.Table, current: pa.Table, changed: pa.Table, gone: pa.Table,
                                moves: dict[str, dict]) -> tuple[pa.Table, dict[str, dict]]:
    """Under ``--skip-duplicates``: the changed documents and moves once the copies whose
    holder is changed or deleted (not moved) are listed as changed too, to be embedded
    again. A move of such a content is dropped (deleted and added instead), since the
    row it would re-key is a rejected copy."""
    at_risk = pa.concat_arrays([changed["content_hash_before"].combine_chunks().cast(pa.string()),
                                gone["content_hash"].combine_chunks()])
    if len(at_risk) == 0:
        return changed, moves
    rows = manifest.filter(pc.is_in(manifest["content_hash"], value_set=at_risk))
    holders = first_copies(rows)[0]
    touched = set(changed["path"].to_pylist()) | set(gone["path"].to_pylist())
    moved_away = {old["path"] for old in moves.values()}
    lost = {content_hash for content_hash, path in holders.items() if path in touched and path not in moved_away}
    if not lost:
        return changed, moves
    moves = {path: old for path, old in moves.items() if old["content_hash"] not in lost}
    copies = current.filter(pc.and_(pc.is_in(current["content_hash"], value_set=pa.array(list(lost), pa.string())),
                                    pc.invert(pc.is_in(current["path"], value_set=pa.array(list(touched), pa.string())))))
    again = pa.table({"path": copies["path"], "bytes": copies["bytes"], "content_hash": copies["content_hash"],
                      "content_hash_before": copies["content_hash"], "shard": copies["shard"]})
    kept = changed.select(again.column_names)
    return pa.concat_tables([kept, again.cast(kept.schema)]), moves


def read_change_log(path: str) -> pa.Table:
    with storage.open_for_reading(path) as file:
        return pq.read_table(file).cast(CHANGE_LOG_SCHEMA)


def sync_output(corpus: str, pattern: str, output: str, only_added: bool = False,
                skip_duplicates: bool = False) -> SyncResult:
    """Bring the output's manifest in step with the corpus: publish each generation's change
    log, then the manifest it makes. Returns what changed; the caller embeds the new shards
    (``skip_duplicates``: the output's, see ``diff``)."""
    where = OutputLayout.of(output)
    result = SyncResult(generation=0)
    while True:
        version = storage.version(where.manifest)  # before the read: a newer manifest then fails the swap, never an older one
        manifest = read_manifest(where.manifest)
        info = footer_settings(manifest.schema.metadata)  # the table's own: another worker may publish the next one meanwhile
        generation = int(info.get("generation", 0)) + 1
        ours = False
        if storage.exists(where.change_log(generation)):  # a sync killed before its manifest, or another worker's
            changes = read_change_log(where.change_log(generation))
            log.info("generation %d: applying the change log published before", generation)
        else:
            changes = diff(manifest, listing_table(corpus, pattern), int(info["shards"]), int(info["docs_per_shard"]),
                           generation, set(where.list_shards().numbers), only_added, skip_duplicates)
            if changes.num_rows == 0:
                result.generation = generation - 1
                return result
            storage.delete(where.summary)  # first: a kill after this leaves no summary that looks finished
            published = _publish_change_log(where.change_log(generation), changes)
            ours, changes = published is changes, published
        if not publish_manifest(where.manifest, apply_change_log(manifest, changes), info, changes, version):
            log.info("generation %d: another worker published the manifest meanwhile; reading it again", generation)
            continue  # never overwrite a newer generation with this one
        result.generation = generation
        result.counts.update(changes["action"].to_pylist())
        if only_added or ours:
            # Our own listing made this generation: the manifest is in step with the corpus as
            # listed. Listing again only to find what changed during the sync would read a
            # whole corpus twice (10 million documents); the next sync takes it. A change log
            # found published (a killed sync's, another worker's) may be old: look again.
            return result


def _publish_change_log(path: str, changes: pa.Table) -> pa.Table:
    """Publish exactly once; the change log that stands (ours, or another worker's)."""
    with storage.atomic_output(path, overwrite=False) as staged:
        pq.write_table(changes, staged.path)
    return changes if staged.published else read_change_log(path)


def publish_manifest(path: str, manifest: pa.Table, info: dict[str, str], changes: pa.Table, version: str | None) -> bool:
    """Replace the manifest only if it is still the ``version`` this one was made from
    (compare-and-swap); False when another worker published one meanwhile."""
    shards = max(int(info["shards"]), (pc.max(manifest["shard"]).as_py() or -1) + 1)
    metadata = {f"pipeline.{key}": value for key, value in info.items()}
    metadata.update({
        "pipeline.documents": str(own_row_count(manifest)),
        "pipeline.current_documents": str(current_row_count(manifest)),
        "pipeline.shards": str(shards),
        "pipeline.generation": str(changes["generation"][0].as_py()),
        "pipeline.extended_at": changes["time"][0].as_py(),
    })
    with storage.atomic_output(path, if_version=version) as staged:
        pq.write_table(manifest.replace_schema_metadata(metadata), staged.path, row_group_size=ROWS_PER_WRITE)
    return staged.published


def last_sync(output: str) -> dict | None:
    """What the latest sync changed: ``generation``, ``time``, the count of each action and
    ``current_documents``; None for an output never synced (one small read)."""
    where = OutputLayout.of(output)
    info = manifest_info(where.manifest)
    generation = int(info.get("generation", 0))
    if generation == 0 or not storage.exists(where.change_log(generation)):
        return None
    changes = read_change_log(where.change_log(generation))
    counts = Counter(changes["action"].to_pylist())
    return {"generation": generation, "time": changes["time"][0].as_py() if changes.num_rows else None,
            **{action: counts[action] for action in ACTIONS},
            "current_documents": int(info.get("current_documents", info.get("documents", 0)))}


def describe_sync(sync: dict) -> str:
    return (f"generation {sync['generation']} (last sync {sync['time']}: {actions_counted(sync) or 'nothing'}); "
            f"{sync['current_documents']:,} current documents")

