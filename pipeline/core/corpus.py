"""The corpus: listing documents, reading and decoding them, front matter, the manifest."""

from __future__ import annotations

import base64
import codecs
import datetime as dt
import hashlib
import itertools
import json
import multiprocessing.util
import os
import re
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline import storage
from pipeline.core.generations import later_copies, rows_to_embed, with_generations
from pipeline.core.shard_file import footer_settings
from pipeline.errors import PipelineError

MANIFEST_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("path", pa.string()),
        ("bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("shard", pa.int32()),
    ]
)
ROWS_PER_WRITE = 5_000
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)
# Front matter longer than this is not read: every chunk of the document carries its
# fields, so a huge block would be copied into thousands of rows (and of gigabytes).
MAX_FRONT_MATTER_CHARS = 65_536


class Rejected(Exception):
    """A document that cannot be embedded; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # reader processes send rejections back (pipeline.core.reader_pool)
        return Rejected, (self.reason, self.detail)


@dataclass
class Document:
    doc_id: str
    path: str
    text: str  # decoded, newlines normalised to \n; offsets index this string
    encoding: str
    content_hash: str
    front_matter: dict[str, Any] = field(default_factory=dict)
    front_matter_error: Optional[str] = None
    body_start: int = 0


def doc_id_for(relative_path: str) -> str:
    """Stable id of a document: it depends only on its path inside the corpus."""
    return hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:20]


def list_documents(corpus: str, pattern: str) -> Iterator[storage.Listed]:
    """Matching files in sorted order, streamed; hidden files and folders skipped."""
    storage.check_corpus(corpus)
    found = False
    for listed in storage.list_files(corpus, pattern):
        found = True
        yield listed
    if not found:
        raise PipelineError(f"corpus {corpus} has no files matching {pattern!r}")


def write_manifest(corpus: str, pattern: str, docs_per_shard: int, dest: str) -> int:
    """List the corpus once and publish the manifest; returns the document count.

    The listing is streamed into the Parquet file in batches, so memory stays flat
    however large the corpus. If another worker published a manifest first, theirs
    is kept: the manifest never changes once written.
    """
    return write_manifest_of(list_documents(corpus, pattern), corpus, pattern, docs_per_shard, dest)


def write_manifest_of(listing: Iterable[storage.Listed], corpus: str, pattern: str, docs_per_shard: int,
                      dest: str) -> int:
    """Publish the manifest of documents already listed (sorted by path), e.g. a chosen
    few files of a corpus (``EmbeddingInterface.batch_process``)."""
    if docs_per_shard < 1:
        raise PipelineError(f"docs_per_shard must be at least 1, not {docs_per_shard}")
    schema = MANIFEST_SCHEMA.with_metadata(
        {"pipeline.corpus": corpus, "pipeline.pattern": pattern, "pipeline.docs_per_shard": str(docs_per_shard)}
    )
    count = 0
    with storage.atomic_output(dest, overwrite=False) as staged, pq.ParquetWriter(staged.path, schema) as writer:
        listing = iter(listing)
        while True:
            batch = list(itertools.islice(listing, ROWS_PER_WRITE))
            if not batch:
                break
            writer.write_table(manifest_table(batch, count, docs_per_shard, schema))
            count += len(batch)
        writer.add_key_value_metadata(
            {
                "pipeline.documents": str(count),
                "pipeline.shards": str(-(-count // docs_per_shard)),
                "pipeline.created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
        )
    return count


def manifest_table(documents: list[storage.Listed], position: int, docs_per_shard: int, schema: pa.Schema,
                   first_shard: int = 0) -> pa.Table:
    """The manifest rows of listed documents, the first of them the ``position``-th
    document counted from shard ``first_shard``."""
    return pa.table({
        "doc_id": [doc_id_for(d.relative) for d in documents],
        "path": [d.relative for d in documents],
        "bytes": [d.size for d in documents],
        "content_hash": [d.content_hash for d in documents],
        "shard": [first_shard + (position + i) // docs_per_shard for i in range(len(documents))],
    }, schema=schema)


def manifest_info(manifest: str) -> dict[str, str]:
    """The manifest's own record of how it was made (corpus, pattern, shard size, counts),
    read afresh each time (its footer only: a few ranged reads in a bucket), because
    ``--add-new-documents`` may have grown it since this process last looked."""
    with storage.open_for_reading(manifest) as file:
        return footer_settings(pq.ParquetFile(file).metadata.metadata)


def manifest_file(manifest: str) -> str:
    """A local copy of the manifest: the file itself, or for a bucket one download per
    process and version of the manifest (a grown one is fetched again), so every shard
    reads its rows from a copy as new as the manifest."""
    if not storage.is_remote(manifest):
        return str(storage.local_path(manifest))
    info = manifest_info(manifest)
    return _downloaded(manifest, f"{info.get('documents')}@{info.get('generation', 0)}@{info.get('extended_at', '')}")


_copies: dict[str, tuple[str, int, Path]] = {}  # manifest -> (version, pid that made it, folder)
_copies_lock = threading.Lock()


def _downloaded(manifest: str, version: str) -> str:
    """This version's local copy, made once per process (a forked worker reads its
    parent's). A process deletes the copies it made: an older version's when a newer
    one comes, the rest when it ends, so a long-lived worker following a growing
    manifest, or a task process per shard, never fills the disk with copies."""
    with _copies_lock:
        known = _copies.get(manifest)
        if known and known[0] == version:
            return str(known[2] / "manifest-copy.parquet")
        _remove_own_copies_at_exit()
        folder = Path(tempfile.mkdtemp(prefix="manifest-"))
        (folder / "manifest-copy.parquet").write_bytes(storage.read_bytes(manifest))
        if known and known[1] == os.getpid():
            shutil.rmtree(known[2], ignore_errors=True)  # an open reader keeps reading its unlinked file
        _copies[manifest] = (version, os.getpid(), folder)
        return str(folder / "manifest-copy.parquet")


_cleanup_registered_in: int | None = None  # the pid whose exit removes its copies


def _remove_own_copies_at_exit() -> None:
    """Once per process: a finalizer, which multiprocessing runs when this process
    ends, also in a task process Luigi forks (which skips atexit handlers, and starts
    with its parent's finalizers cleared)."""
    global _cleanup_registered_in
    if _cleanup_registered_in != os.getpid():
        multiprocessing.util.Finalize(None, _remove_own_copies, exitpriority=0)
        _cleanup_registered_in = os.getpid()


def _remove_own_copies() -> None:
    for _version, pid, folder in list(_copies.values()):
        if pid == os.getpid():
            shutil.rmtree(folder, ignore_errors=True)


def manifest_rows(manifest: str, shard: int) -> list[dict[str, Any]]:
    """The manifest rows one shard embeds, in manifest order (``generations.rows_to_embed``).

    On a bucket, only the footer and the row groups that hold this shard are read, by
    ranged reads (``storage.open_for_reading``): a worker or pod never downloads the whole
    manifest for its shards (0.64 GB at 10 million documents), and always reads the
    manifest as it is now."""
    if storage.is_remote(manifest):
        with storage.open_for_reading(manifest) as stream:
            return rows_to_embed(pq.read_table(stream, filters=[("shard", "=", shard)]))
    return rows_to_embed(pq.read_table(manifest_file(manifest), filters=[("shard", "=", shard)]))


def duplicates_in_shard(manifest: str, shard: int) -> dict[str, str]:
    """{stored doc id: the holder's path} for each document of ``shard`` whose content
    a live document earlier in manifest order (an earlier shard, or earlier in this one)
    already holds (``generations.later_copies``: a superseded row holds nothing).

    Decided once per process and version of the manifest, for every shard at once, and
    kept as the few rows that are copies: a worker's later shards read nothing more. (Each
    shard read every earlier shard's rows before: quadratic, 12 s and 2 GB per shard at
    10 million documents.)"""
    local = manifest_file(manifest)
    stat = os.stat(local)
    version = (local, stat.st_mtime_ns, stat.st_size)
    with _copies_lock:
        if _later_copies.get("version") != version:
            _later_copies.update(version=version, copies=later_copies(with_generations(_rows_sharing_content(local))))
        copies = _later_copies["copies"]
    mine = copies.filter(pc.equal(copies["shard"], shard))
    return dict(zip(mine["doc_id"].to_pylist(), mine["holder"].to_pylist()))


_later_copies: dict[str, Any] = {}  # version -> the manifest's later copies, for the last manifest read


def _rows_sharing_content(local: str) -> pa.Table:
    """The manifest's rows whose content another row has too, in manifest order: all that
    the duplicate decision needs. Two passes over the file, a row group at a time, with
    one 8-byte key per row in memory (80 MB at 10 million rows) instead of every row."""
    parquet = pq.ParquetFile(local)
    groups = range(parquet.num_row_groups)
    keys = [np.fromiter(map(hash, parquet.read_row_group(i, columns=["content_hash"]).column(0).to_pylist()), np.int64)
            for i in groups]
    ordered = np.sort(np.concatenate(keys)) if keys else np.array([], np.int64)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])  # a key collision only adds a row: decided exactly after
    wanted = ["doc_id", "path", "content_hash", "shard", "superseded_in", "embedded_doc_id"]
    columns = [name for name in wanted if name in parquet.schema_arrow.names]
    kept = [parquet.read_row_group(i, columns=columns).filter(pa.array(np.isin(keys[i], repeated))) for i in groups]
    return pa.concat_tables(kept) if kept else parquet.schema_arrow.empty_table().select(columns)


def content_matches(data: bytes, content_hash: str) -> bool:
    """Whether bytes are still what the manifest listed (MD5 as buckets report it;
    CRC32C for composite GCS objects; multipart S3 ETags cannot be recomputed)."""
    if content_hash.startswith("crc32c:"):
        import google_crc32c

        return base64.b64encode(google_crc32c.Checksum(data).digest()).decode() == content_hash[len("crc32c:") :]
    if content_hash.startswith("etag:"):
        return True
    return storage.md5_hex(data) == content_hash


def decode(data: bytes) -> tuple[str, str]:
    """Bytes to text, naming the encoding used; binary and empty files are rejected.

    UTF-8 first (much of the archive), then Windows-1252 and Latin-1 (the rest of it
    was ISO-8859-1). Newlines are normalised so character offsets are stable.
    """
    if not data.strip():
        raise Rejected("empty", "the file has no text")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text, encoding = data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as exc:
            raise Rejected("undecodable", f"starts with a UTF-16 byte-order mark but is not UTF-16: {exc.reason}") from None
    elif b"\x00" in data:
        raise Rejected("binary", "the file contains NUL bytes")
    else:
        text, encoding = _decode_8bit(data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if len(_CONTROL_CHARS.findall(text[:65536])) > 0.01 * min(len(text), 65536):
        raise Rejected("binary", "more than 1% control characters")
    return text, encoding


def _decode_8bit(data: bytes) -> tuple[str, str]:
    """UTF-8; UTF-8 with its few invalid bytes replaced (U+FFFD) when the rest is real
    UTF-8 text (a file patched with bytes in another encoding: falling back for the
    whole file would garble every accented letter of it); else Windows-1252, Latin-1."""
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    replaced = data.decode("utf-8-sig", errors="replace")
    invalid = replaced.count("\ufffd") - data.count("\ufffd".encode())
    if sum(1 for character in replaced if character > "\x7f") - invalid > invalid:
        return replaced, "utf-8-replace"
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _plain(value: Any) -> Any:
    """Front-matter values as JSON-safe scalars/lists/dicts (YAML makes dates objects)."""
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class _AliasFound(yaml.YAMLError):
    pass


class _FrontMatterLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases. An alias (``*name``) shares a node, so a
    few lines of aliases of aliases expand to billions of values, or loop on
    themselves, once the fields are copied out as plain JSON."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasFound(f"front matter uses a YAML alias (*{self.peek_event().anchor}), which is not read")
        return super().compose_node(parent, index)


def split_front_matter(text: str) -> tuple[dict[str, Any], int, Optional[str]]:
    """(fields, offset where the body starts, error or None).

    A block that cannot be used (not a YAML mapping, aliases, nested too deeply,
    longer than MAX_FRONT_MATTER_CHARS) is still cut from the body (it is not prose),
    and its error is kept so the chunk metadata can say so.
    """
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, 0, None
    if match.end() > MAX_FRONT_MATTER_CHARS:
        return {}, match.end(), f"front matter is longer than {MAX_FRONT_MATTER_CHARS:,} characters"
    try:
        fields = _plain(yaml.load(match.group(1) or "", Loader=_FrontMatterLoader) or {})
    except _AliasFound as exc:
        return {}, match.end(), str(exc)
    except RecursionError:
        return {}, match.end(), "front matter is nested too deeply"
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        return {}, match.end(), f"front matter is not valid YAML: {first_line}"
    if not isinstance(fields, dict):
        return {}, match.end(), f"front matter is a {type(fields).__name__}, not a mapping"
    return fields, match.end(), None


def _check_local_file(corpus: str, relative: str) -> None:
    """Refuse a local document that now leads out of the corpus or is no regular file.

    The listing skips both, but a file can be replaced after it (by a symbolic link to
    a secret, or by a pipe that blocks the reader forever). Buckets have neither."""
    if storage.is_remote(corpus):
        return
    real = os.path.realpath(storage.join(corpus, relative))
    if not Path(real).is_relative_to(os.path.realpath(corpus)):
        raise Rejected("outside_corpus", "the path is now a symbolic link that leads out of the corpus; it was not read")
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return  # reading it says what is wrong (gone: missing)
    if not stat.S_ISREG(mode):
        raise Rejected("unreadable", "not a regular file (a folder, pipe, socket or device)")


def read_document(corpus: str, row: dict[str, Any]) -> Document:
    """Read, check against the manifest, decode and split one document."""
    _check_local_file(corpus, row["path"])
    try:
        data = storage.read_bytes(storage.join(corpus, row["path"]))
    except FileNotFoundError:
        raise Rejected("missing", "the file is gone since the manifest was written") from None
    except storage.StorageError:
        raise  # the store is failing, not the document: fail the shard, rerun later
    except OSError as exc:
        raise Rejected("unreadable", str(exc)) from None
    if not content_matches(data, row["content_hash"]):
        raise Rejected("changed", "the file changed since the manifest was written")
    text, encoding = decode(data)
    fields, body_start, error = split_front_matter(text)
    return Document(
        doc_id=row["doc_id"],
        path=row["path"],
        text=text,
        encoding=encoding,
        content_hash=row["content_hash"],
        front_matter=fields,
        front_matter_error=error,
        body_start=body_start,
    )


def front_matter_json(document: Document) -> str:
    return json.dumps(document.front_matter, ensure_ascii=False, sort_keys=True)


def iter_documents(corpus: str, rows: list[dict[str, Any]]) -> Iterator[tuple[dict, Document | Rejected]]:
    """Each manifest row with its document, or the rejection that explains why not.

    Any error reading one document becomes that document's rejection: one odd file
    must never fail the shard around it. A row marked ``duplicate_of`` (the path of an
    earlier document with the same content, see ``duplicates_in_shard``) is not read.
    """
    for row in rows:
        if row.get("duplicate_of"):
            yield row, Rejected("duplicate", f"same content_hash as {row['duplicate_of']}, earlier in the manifest")
            continue
        try:
            yield row, read_document(corpus, row)
        except Rejected as rejected:
            yield row, rejected
        except storage.StorageError:
            raise
        except Exception as exc:
            yield row, Rejected("unreadable", f"{exc.__class__.__name__}: {exc}")
