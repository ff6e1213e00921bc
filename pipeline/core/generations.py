"""Generations of a manifest: which rows are current, and what a change log does to them.

Shard files are never rewritten. When the corpus changes, a sync (``pipeline.core.sync``)
records the change as a new generation of the manifest instead:

- a new or changed document gets a new row (``generation`` g) in a new shard after the last;
- the row it replaces, and the row of a deleted document, gets ``superseded_in`` g;
- a moved document (same bytes at a new path, the old path gone) gets a new row in the
  shard that already holds its vectors, with ``embedded_doc_id``: the id its rows carry
  there. Its doc id follows its path, so readers re-key those rows (doc id and
  ``metadata.path``) from the manifest instead of embedding it again.

A manifest made before syncs existed has none of these columns: every row is then of
generation 0 and current (``with_generations``). "Own" rows are the ones a shard embeds
or rejects itself (every row but the re-keyed ones): they are what its stats count.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

GENERATION_FIELDS = [
    pa.field("generation", pa.int32()),
    pa.field("superseded_in", pa.int32()),
    pa.field("embedded_doc_id", pa.string()),
]
ACTIONS = ("added", "changed", "moved", "deleted")
CHANGE_LOG_SCHEMA = pa.schema([
    ("generation", pa.int32()),
    ("action", pa.string()),
    ("doc_id", pa.string()),  # the document's id now (a deleted one's last id)
    ("path", pa.string()),  # its path now (a deleted one's last path)
    ("old_path", pa.string()),  # the path of the row it supersedes (null when added)
    ("old_shard", pa.int32()),  # the shard of the row it supersedes (null when added)
    ("new_shard", pa.int32()),  # the shard of its new row (null when deleted; a moved one stays)
    ("bytes", pa.int64()),
    ("content_hash", pa.string()),
    ("embedded_doc_id", pa.string()),  # moved: the id its rows carry in new_shard
    ("time", pa.string()),  # when the sync listed the corpus, ISO 8601 UTC
])


def with_generations(table: pa.Table) -> pa.Table:
    """The manifest table with its generation columns, added (generation 0, current, not
    re-keyed) to a manifest written before syncs."""
    for field in GENERATION_FIELDS:
        if field.name not in table.column_names:
            value = 0 if field.name == "generation" else None
            table = table.append_column(field, pa.array([value] * table.num_rows, field.type))
    return table


def is_current(table: pa.Table) -> pa.Array:
    return pc.is_null(table["superseded_in"])


def is_own(table: pa.Table) -> pa.Array:
    """Rows a shard embeds or rejects itself: all but a moved document's re-keyed row."""
    return pc.is_null(table["embedded_doc_id"])


def stored_ids(table: pa.Table) -> pa.Array:
    """The doc id each row's vectors carry in its shard."""
    return pc.coalesce(table["embedded_doc_id"], table["doc_id"])


@dataclass(frozen=True)
class ShardView:
    """How the rows stored in one shard map onto the current documents:
    ``{stored doc id: (current doc id, current path)}``. A stored id absent from it
    belongs to a superseded row."""

    current: dict[str, tuple[str, str]]

    def keeps(self, stored_doc_id: str) -> bool:
        return stored_doc_id in self.current

    def rekeys(self) -> bool:
        """Whether any row of the shard is read under another id than it was stored with."""
        return any(stored != doc_id for stored, (doc_id, _) in self.current.items())


def shard_view(rows: pa.Table) -> ShardView:
    """The current view of one shard, from its manifest rows (``with_generations``)."""
    current = rows.filter(is_current(rows))
    return ShardView({stored: (doc_id, path) for stored, doc_id, path in
                      zip(stored_ids(current).to_pylist(), current["doc_id"].to_pylist(), current["path"].to_pylist())})


def apply_change_log(manifest: pa.Table, changes: pa.Table) -> pa.Table:
    """The next generation of a manifest (``with_generations``) from one change log: the
    rows it supersedes marked, its new rows added, and the whole kept in shard order (a
    moved document's row goes beside the rows of the shard that holds its vectors)."""
    generation = changes["generation"][0].as_py() if changes.num_rows else None
    if generation is None:
        return manifest
    superseding = changes.filter(pc.is_valid(changes["old_path"]))
    hit = pc.and_(is_current(manifest), pc.is_in(manifest["path"], value_set=superseding["old_path"]))
    superseded_in = pc.if_else(hit, pa.scalar(generation, pa.int32()), manifest["superseded_in"])
    manifest = manifest.set_column(manifest.schema.get_field_index("superseded_in"), "superseded_in", superseded_in)
    arriving = changes.filter(pc.is_valid(changes["new_shard"]))
    new_rows = pa.table({
        "doc_id": arriving["doc_id"], "path": arriving["path"], "bytes": arriving["bytes"],
        "content_hash": arriving["content_hash"], "shard": arriving["new_shard"],
        "generation": arriving["generation"], "superseded_in": pa.nulls(arriving.num_rows, pa.int32()),
        "embedded_doc_id": arriving["embedded_doc_id"],
    }).select(manifest.column_names).cast(manifest.schema.remove_metadata())
    grown = pa.concat_tables([manifest.replace_schema_metadata(None), new_rows])
    return grown.take(pc.sort_indices(grown["shard"]))  # a stable sort: row order within a shard kept


def first_copies(rows: pa.Table, shard: int | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Which row holds each content under ``--skip-duplicates``, across generations.

    The own rows are walked in manifest order; the first *live* one of a content holds it:
    a current row, or the stored row of a current re-keyed one (a moved document keeps its
    vectors). A superseded row holds nothing, since its vectors are no longer read.
    Returns ``{content_hash: the holder's current path}`` and, for each own row of
    ``shard`` whose content a holder before it has, ``{its stored doc id: that path}``.
    """
    rekeyed = rows.filter(pc.and_(is_current(rows), pc.invert(is_own(rows))))
    now_at = dict(zip(rekeyed["embedded_doc_id"].to_pylist(), rekeyed["path"].to_pylist()))
    own = rows.filter(is_own(rows))
    holders: dict[str, str] = {}
    copies: dict[str, str] = {}
    for doc_id, path, content_hash, row_shard, superseded_in in zip(
            *(own[name].to_pylist() for name in ("doc_id", "path", "content_hash", "shard", "superseded_in"))):
        if content_hash in holders:
            if row_shard == shard:
                copies[doc_id] = holders[content_hash]
        elif superseded_in is None or doc_id in now_at:
            holders[content_hash] = now_at.get(doc_id, path)
    return holders, copies


def later_copies(rows: pa.Table) -> pa.Table:
    """Every own row whose content a live row before it holds, as ``shard``, ``doc_id``
    (stored) and ``holder`` (the holder's current path): ``first_copies``'s answer for
    every shard at once, computed with Arrow's group-by and joins rather than a walk in
    Python, so a whole manifest of millions of rows takes seconds (``rows``: with its
    generation columns)."""
    rows = rows.append_column("position", pa.array(range(rows.num_rows), pa.int64()))
    rekeyed = rows.filter(pc.and_(is_current(rows), pc.invert(is_own(rows)))).select(["embedded_doc_id", "path"])
    rekeyed = rekeyed.rename_columns(["doc_id", "moved_to"])
    own = rows.filter(is_own(rows))
    live = own.filter(pc.or_(pc.is_null(own["superseded_in"]), pc.is_in(own["doc_id"], value_set=rekeyed["doc_id"])))
    firsts = live.group_by("content_hash").aggregate([("position", "min")]).rename_columns(["content_hash", "held_at"])
    holders = firsts.join(live.select(["position", "doc_id", "path"]), keys="held_at", right_keys="position")
    holders = holders.join(rekeyed, keys="doc_id", join_type="left outer")
    holders = holders.append_column("holder", pc.coalesce(holders["moved_to"], holders["path"])).select(
        ["content_hash", "held_at", "holder"])
    copies = own.select(["shard", "doc_id", "content_hash", "position"]).join(holders, keys="content_hash")
    copies = copies.filter(pc.greater(copies["position"], copies["held_at"]))
    return copies.select(["shard", "doc_id", "holder"])


def own_row_count(manifest: pa.Table) -> int:
    return pc.sum(is_own(manifest).cast(pa.int64())).as_py() or 0


def current_row_count(manifest: pa.Table) -> int:
    return pc.sum(is_current(manifest).cast(pa.int64())).as_py() or 0


def rows_to_embed(rows: pa.Table) -> list[dict]:
    """The manifest rows a shard embeds (``rows``: all of its rows), in manifest order:
    its own rows. One whose document has since moved is read from its new path under its
    stored id, so a shard made again after a move holds what readers re-key."""
    if "embedded_doc_id" not in rows.column_names:
        return rows.to_pylist()
    moved = rows.filter(pc.and_(is_current(rows), pc.invert(is_own(rows))))
    moved_to = dict(zip(moved["embedded_doc_id"].to_pylist(), moved["path"].to_pylist()))
    own = rows.filter(is_own(rows)).select(["doc_id", "path", "bytes", "content_hash", "shard"]).to_pylist()
    for row in own:
        row["path"] = moved_to.get(row["doc_id"], row["path"])
    return own
