"""``python -m pipeline verify OUTPUT``: prove an output is whole before importing it.

Every document of the manifest must be embedded or rejected with a reason, exactly once;
every row must be a well-formed chunk of its document with a finite unit vector; every
shard must share one schema and one model's settings; the stats and the summary must
count what is there. The check reads the manifest and the shards as streams, one shard
and one row batch at a time, so its memory does not grow with the number of shards.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.core.corpus import manifest_file, manifest_info
from pipeline.core.generations import first_copies, is_current, stored_ids
from pipeline.output import layout
from pipeline.output.layout import OutputLayout, numbered_name
from pipeline.core.shard_file import SHARED_SETTINGS, setting_differs, shard_schema
from pipeline.core.vector_format import VectorFormat, stored_vectors
from pipeline.output.footers import COUNTS, ShardFooter

NORM_TOLERANCE = 1e-3  # fp16 models give unit vectors to about 1e-4
NORM_TOLERANCE_FLOAT16 = 4e-3  # stored as float16: each value rounded to 11 significant bits
BATCH_ROWS = 8192
SUMMARY_COUNTS = ("shards", *COUNTS)


@dataclass
class Verdict:
    """What ``verify_output`` found: problems (one line each) and the totals it counted."""

    problems: list[str] = field(default_factory=list)
    totals: Counter = field(default_factory=Counter)
    settings: dict[str, str] = field(default_factory=dict)
    generation: int = 0  # of the manifest: how many syncs it has been through
    current_documents: int | None = None
    rejected_copies: set[tuple[int, str]] = field(default_factory=set)  # synced: (shard, stored id) rejected as ``duplicate``

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "totals": dict(self.totals),
                "model": self.settings.get("model_id"), "dimension": self.settings.get("dimension")}


def manifest_shards(manifest_file: str, docs_per_shard: int, problems: list[str]) -> Iterator[tuple[int, list[dict]]]:
    """(shard, its manifest rows) in order, read in batches. Shards are numbered 0, 1, 2, …
    with at most ``docs_per_shard`` rows each (a manifest that gained documents has a
    short shard before the new ones); anything else is a problem."""
    parquet = pq.ParquetFile(manifest_file)
    columns = [name for name in ("doc_id", "path", "shard", "superseded_in", "embedded_doc_id")
               if name in parquet.schema_arrow.names]
    rows = (row for batch in parquet.iter_batches(BATCH_ROWS, columns=columns) for row in batch.to_pylist())
    expected = 0
    for shard, group in itertools.groupby(rows, key=lambda row: row["shard"]):
        group = list(group)
        own = sum(1 for row in group if not row.get("embedded_doc_id"))
        if shard != expected or own > docs_per_shard:
            problems.append(f"manifest: shard {shard} has {own} rows where shard {expected} "
                            f"of at most {docs_per_shard} documents was due")
        expected = shard + 1
        yield shard, group


@dataclass
class _ShardCount:
    rows: int = 0
    tokens: int = 0
    bad_vectors: Counter = field(default_factory=Counter)
    first_bad: dict[str, str] = field(default_factory=dict)
    chunks: dict[str, list[int]] = field(default_factory=dict)

    def flag(self, kind: str, doc_id: str, chunk_id: int, count: int = 1) -> None:
        self.bad_vectors[kind] += count
        self.first_bad.setdefault(kind, f"{doc_id} chunk {chunk_id}")


def _count_rows(parquet: pq.ParquetFile, normalized: bool, vector_format: VectorFormat) -> _ShardCount:
    """Chunk ids per document, tokens and vector faults (compact columns that do not
    follow from the vectors among them), one row batch at a time."""
    count = _ShardCount()
    tolerance = NORM_TOLERANCE_FLOAT16 if vector_format.dtype == "float16" else NORM_TOLERANCE
    columns = ["doc_id", "chunk_id", "embedding_vector", "metadata", *vector_format.column_names()]
    for batch in parquet.iter_batches(BATCH_ROWS, columns=columns):
        doc_ids = batch.column("doc_id").to_pylist()
        chunk_ids = batch.column("chunk_id").to_pylist()
        for doc_id, chunk_id in zip(doc_ids, chunk_ids):
            count.chunks.setdefault(doc_id, []).append(chunk_id)
        count.rows += batch.num_rows
        tokens = batch.column("metadata").field("token_count")
        count.tokens += int(pc.sum(tokens).as_py() or 0)
        vectors = stored_vectors(batch.column("embedding_vector"))
        finite = np.isfinite(vectors).all(axis=1)
        for i in np.flatnonzero(~finite)[:1]:
            count.flag("not finite", doc_ids[i], chunk_ids[i], int((~finite).sum()))
        if normalized:
            norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
            off = finite & (np.abs(norms - 1.0) > tolerance)
            for i in np.flatnonzero(off)[:1]:
                count.flag("norm not 1", doc_ids[i], chunk_ids[i], int(off.sum()))
        for kind, wrong in vector_format.mismatches(batch, vectors).items():
            for i in np.flatnonzero(wrong)[:1]:
                count.flag(kind, doc_ids[i], chunk_ids[i], int(wrong.sum()))
    return count


def _read_rejects(output: str, shard: int, name: str, problems: list[str]) -> list[dict]:
    rejects = []
    for number, line in enumerate(storage.read_text(OutputLayout.of(output).rejects_of(shard)).splitlines(), 1):
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and record.get("doc_id") and record.get("reason")):
                raise ValueError("no doc_id or no reason")
            rejects.append(record)
        except ValueError as exc:
            problems.append(f"{name}: rejects line {number} is not a rejection record ({exc})")
    return rejects


def verify_shard(output: str, shard: int, manifest_rows: list[dict], has_rejects: bool, verdict: Verdict) -> None:
    """Check one shard against its manifest rows, its rejects and the first shard's settings."""
    name = numbered_name(shard, layout.SHARD_SUFFIX)
    problems, reference = verdict.problems, verdict.settings
    try:
        path = OutputLayout.of(output).shard(shard)
        with storage.open_for_reading(path) as f:
            parquet = pq.ParquetFile(f)
            footer = ShardFooter.parse(shard, path, parquet.metadata.metadata)
            metadata = footer.settings
            if not reference:
                reference.update(metadata, shard=numbered_name(shard, ""))
            differs = [f"{k} {metadata.get(k)!r} ({reference['shard']}: {reference.get(k)!r})"
                       for k in SHARED_SETTINGS if setting_differs(metadata, reference, k)]
            if differs:
                problems.append(f"{name}: made with other settings: {'; '.join(differs)}")
                return
            if metadata.get("stand_in_for"):
                problems.append(f"{name}: made by a stand-in for {metadata['stand_in_for']} (random weights, for "
                                f"measuring throughput only): its vectors mean nothing")
                return
            dimension = int(reference["dimension"])
            expected = shard_schema(dimension, reference).remove_metadata()
            if not parquet.schema_arrow.remove_metadata().equals(expected):
                problems.append(f"{name}: schema differs from the pipeline's: {parquet.schema_arrow.remove_metadata()}")
                return
            count = _count_rows(parquet, reference.get("normalized") == "true", VectorFormat.of(reference))
    except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
        problems.append(f"{name}: unreadable ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return
    for kind, n in count.bad_vectors.items():
        problems.append(f"{name}: {n} vector(s) {kind} (first: {count.first_bad[kind]})")

    for doc_id, ids in count.chunks.items():
        if len(set(ids)) != len(ids):
            duplicated = sorted(i for i, n in Counter(ids).items() if n > 1)
            problems.append(f"{name}: document {doc_id} has duplicate chunk ids {duplicated[:5]}")
        elif sorted(ids) != list(range(len(ids))):
            problems.append(f"{name}: document {doc_id} has chunk ids {sorted(ids)[:8]}…, not 0..{len(ids) - 1}")

    rejects = _read_rejects(output, shard, name, problems) if has_rejects else []
    if verdict.generation:
        verdict.rejected_copies.update((shard, r["doc_id"]) for r in rejects if r["reason"] == "duplicate")
    listed = {row["doc_id"]: row["path"] for row in manifest_rows if not row.get("embedded_doc_id")}
    embedded, rejected = set(count.chunks), Counter(r["doc_id"] for r in rejects)
    twice = sorted(d for d, n in rejected.items() if n > 1) + sorted(embedded & set(rejected))
    missing = [d for d in listed if d not in embedded and d not in rejected]
    foreign = sorted((embedded | set(rejected)) - set(listed))
    if twice:
        problems.append(f"{name}: {len(twice)} document(s) counted twice (embedded and rejected, or rejected twice), "
                        f"first: {listed.get(twice[0], twice[0])}")
    if missing:
        problems.append(f"{name}: {len(missing)} document(s) neither embedded nor rejected, first: {listed[missing[0]]}")
    if foreign:
        problems.append(f"{name}: {len(foreign)} document(s) not in this shard's manifest rows, first: {foreign[0]}")
    rekeyed = [row for row in manifest_rows if row.get("embedded_doc_id") and row.get("superseded_in") is None]
    lost = [row["path"] for row in rekeyed if row["embedded_doc_id"] not in embedded | set(rejected)]
    if lost:
        problems.append(f"{name}: {len(lost)} moved document(s) whose stored rows are not in it, first: {lost[0]}")

    stats = footer.stats
    if not stats:
        problems.append(f"{name}: no pipeline.stats in its footer")
    else:
        found = {"documents": len(listed), "embedded_documents": len(embedded), "rejected_documents": len(rejects),
                 "chunks": count.rows, "tokens": count.tokens, "shard": shard}
        wrong = [f"{k} {stats.get(k)} (found {v})" for k, v in found.items() if stats.get(k) != v]
        if wrong:
            problems.append(f"{name}: its stats do not match its rows: {', '.join(wrong)}")
    verdict.totals.update(shards=1, documents=len(listed), embedded_documents=len(embedded),
                          rejected_documents=len(rejects), chunks=count.rows, tokens=count.tokens)


def shard_numbers(listing: layout.Listing, folder: str, suffix: str, total: int, problems: list[str]) -> set[int]:
    """The shard numbers of the manifest's ``total`` with a file in a listing of
    ``folder``; a file the manifest does not account for is a problem."""
    strays = listing.strays + [f"{folder}/{numbered_name(n, suffix)}" for n in listing.numbers if n >= total]
    problems.extend(f"{stray}: not a shard of the manifest's {total}" for stray in sorted(strays))
    return {n for n in listing.numbers if n < total}


def _check_summary(output: str, verdict: Verdict) -> None:
    path = OutputLayout.of(output).summary
    if not storage.exists(path):
        verdict.problems.append(f"{layout.SUMMARY}: missing (EmbedAll writes it once every shard exists)")
        return
    try:
        summary = json.loads(storage.read_text(path))
    except ValueError as exc:
        verdict.problems.append(f"{layout.SUMMARY}: not JSON ({exc})")
        return
    wrong = [f"{k} {summary.get(k)} (found {verdict.totals[k]})" for k in SUMMARY_COUNTS if summary.get(k) != verdict.totals[k]]
    for key, setting in (("model", "model_id"), ("dimension", "dimension")):
        if verdict.settings and str(summary.get(key)) != verdict.settings.get(setting):
            wrong.append(f"{key} {summary.get(key)!r} (shards: {verdict.settings.get(setting)!r})")
    if wrong:
        verdict.problems.append(f"{layout.SUMMARY}: does not match the shards: {', '.join(wrong)}")


def verify_output(output: str, on_shard: Optional[Callable[[int], None]] = None) -> Verdict:
    """Every check on an output (local folder or bucket prefix); ``on_shard(total)`` is
    called after each shard, for a progress bar."""
    where = OutputLayout.of(output)
    output, manifest, verdict = where.root, where.manifest, Verdict()
    if not storage.exists(manifest):
        verdict.problems.append(f"{layout.MANIFEST}: missing; {output} is not an output, or its run never started")
        return verdict
    try:
        info = manifest_info(manifest)
        total, docs_per_shard = int(info["shards"]), int(info["docs_per_shard"])
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        verdict.problems.append(f"{layout.MANIFEST}: unreadable ({exc.__class__.__name__}: {exc})")
        return verdict
    verdict.generation = int(info.get("generation", 0))
    shards = shard_numbers(where.list_shards(), layout.SHARDS, layout.SHARD_SUFFIX, total, verdict.problems)
    rejects = shard_numbers(where.list_rejects(), layout.REJECTS, layout.REJECTS_SUFFIX, total, verdict.problems)
    seen = set()
    for shard, rows in manifest_shards(manifest_file(manifest), docs_per_shard, verdict.problems):
        seen.add(shard)
        if shard in shards:
            verify_shard(output, shard, rows, shard in rejects, verdict)
        else:
            verdict.problems.append(f"{numbered_name(shard, layout.SHARD_SUFFIX)}: missing (its {len(rows)} documents are not embedded)")
        if on_shard:
            on_shard(total)
    if len(seen) != total or int(info.get("documents", -1)) != verdict.totals["documents"]:
        verdict.problems.append(f"{layout.MANIFEST}: says {total} shards and {info.get('documents')} documents, "
                                f"holds {len(seen)} shards and {verdict.totals['documents']} documents")
    verdict.current_documents = int(info["current_documents"]) if "current_documents" in info else None
    check_change_logs(where, verdict.generation, verdict.problems, verdict.rejected_copies)
    _check_summary(output, verdict)
    return verdict


def check_change_logs(where: OutputLayout, generation: int, problems: list[str],
                      rejected_copies: set[tuple[int, str]]) -> None:
    """Each sync's change log (generations 1..``generation``) says exactly which manifest
    rows it added and superseded, no sync's change log waits to be applied, and every
    current copy rejected as ``duplicate`` (``rejected_copies``: shard, stored id) has a live
    holder. The manifest is read whole only for a synced output: an output never synced
    has no generations to check, and verify's memory stays flat there."""
    from pipeline.core.sync import read_change_log, read_manifest

    if storage.exists(where.change_log(generation + 1)):
        problems.append(f"change log of generation {generation + 1}: published but not applied to the manifest "
                        "(a sync was interrupted): rerun with --sync")
    if generation == 0:
        return
    table = read_manifest(where.manifest)
    current_paths = table.filter(pc.is_null(table["superseded_in"]))["path"]
    if len(pc.unique(current_paths)) != len(current_paths):
        problems.append(f"{layout.MANIFEST}: a path is current in more than one row")
    check_copies_held(table, rejected_copies, problems)
    for number in range(1, generation + 1):
        path = where.change_log(number)
        if not storage.exists(path):
            problems.append(f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}: missing (manifest generation {generation})")
            continue
        changes = read_change_log(path)
        made = table.filter(pc.equal(table["generation"], number))
        ended = table.filter(pc.equal(table["superseded_in"], number))
        arriving = changes.filter(pc.is_valid(changes["new_shard"]))
        leaving = changes.filter(pc.is_valid(changes["old_path"]))
        if (sorted(zip(made["path"].to_pylist(), made["shard"].to_pylist()))
                != sorted(zip(arriving["path"].to_pylist(), arriving["new_shard"].to_pylist()))
                or sorted(ended["path"].to_pylist()) != sorted(leaving["old_path"].to_pylist())):
            problems.append(f"change log of generation {number}: does not match the manifest's rows of that "
                            f"generation ({arriving.num_rows} arriving, {leaving.num_rows} leaving in the log; "
                            f"{made.num_rows} made, {ended.num_rows} superseded in the manifest)")


def check_copies_held(manifest: pa.Table, rejected_copies: set[tuple[int, str]], problems: list[str]) -> None:
    """Under ``--skip-duplicates`` a copy is rejected, not embedded: the content of each
    current copy must stay held by a live document (``generations.first_copies``), or no
    current document's rows carry it (a holder changed or deleted by a sync that did not
    embed its copies again)."""
    if not rejected_copies:
        return
    current = manifest.filter(is_current(manifest))
    copies = {path: content_hash for shard, stored, path, content_hash in
              zip(current["shard"].to_pylist(), stored_ids(current).to_pylist(), current["path"].to_pylist(),
                  current["content_hash"].to_pylist()) if (shard, stored) in rejected_copies}
    rows = manifest.filter(pc.is_in(manifest["content_hash"], value_set=pa.array(sorted(set(copies.values())), pa.string())))
    holders = first_copies(rows)[0]
    unheld = sorted(path for path, content_hash in copies.items() if holders.get(content_hash, path) in copies)
    if unheld:
        problems.append(f"{layout.MANIFEST}: {len(unheld)} current document(s) rejected as duplicates of content no "
                        f"current document holds (a sync left them unembedded), first: {unheld[0]}")


def format_verdict(output: str, verdict: Verdict) -> str:
    t = verdict.totals
    if verdict.ok:
        return (f"{output}: ok: {t['shards']} shards, {t['documents']:,} documents ({t['embedded_documents']:,} embedded, "
                f"{t['rejected_documents']:,} rejected with a reason), {t['chunks']:,} chunks, {t['tokens']:,} tokens, "
                f"{verdict.settings.get('model_id')} ({verdict.settings.get('dimension')} dimensions)"
                + (f"; generation {verdict.generation}: {verdict.current_documents:,} current documents, the rest "
                   "superseded by syncs" if verdict.generation else ""))
    return "\n".join(verdict.problems + [f"{output}: {len(verdict.problems)} problem(s)"])
