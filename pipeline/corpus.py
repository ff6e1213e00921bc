"""The corpus: listing documents, reading and decoding them, front matter, the manifest."""

from __future__ import annotations

import codecs
import datetime as dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .errors import PipelineError
from .storage import atomic_output, local_path

MANIFEST_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("path", pa.string()),
        ("bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("shard", pa.int32()),
    ]
)
_ROWS_PER_WRITE = 10_000
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)


class Rejected(Exception):
    """A document that cannot be embedded; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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


def list_documents(corpus: str, pattern: str) -> list[str]:
    """Relative POSIX paths of matching files, sorted; hidden files and folders skipped."""
    root = local_path(corpus)
    if not root.exists():
        raise PipelineError(f"corpus path {corpus} does not exist")
    if not root.is_dir():
        raise PipelineError(f"corpus path {corpus} is not a folder")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            relative = PurePosixPath(Path(folder, name).relative_to(root).as_posix())
            if relative.match(pattern):
                found.append(str(relative))
    if not found:
        raise PipelineError(f"corpus {corpus} has no files matching {pattern!r}")
    found.sort()
    return found


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def write_manifest(corpus: str, pattern: str, docs_per_shard: int, dest: str) -> int:
    """List the corpus once and publish the manifest; returns the document count.

    Rows are written in batches so memory holds the sorted path list, not the rows.
    """
    if docs_per_shard < 1:
        raise PipelineError(f"docs_per_shard must be at least 1, not {docs_per_shard}")
    paths = list_documents(corpus, pattern)
    root = local_path(corpus)
    metadata = {
        "corpus": corpus,
        "pattern": pattern,
        "docs_per_shard": str(docs_per_shard),
        "documents": str(len(paths)),
        "shards": str(-(-len(paths) // docs_per_shard)),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    schema = MANIFEST_SCHEMA.with_metadata({f"pipeline.{k}": v for k, v in metadata.items()})
    with atomic_output(dest) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(paths), _ROWS_PER_WRITE):
            rows = {name: [] for name in schema.names}
            for position, relative in enumerate(paths[start : start + _ROWS_PER_WRITE], start):
                size, digest = _hash_file(root / relative)
                rows["doc_id"].append(doc_id_for(relative))
                rows["path"].append(relative)
                rows["bytes"].append(size)
                rows["content_hash"].append(digest)
                rows["shard"].append(position // docs_per_shard)
            writer.write_table(pa.table(rows, schema=schema))
    return len(paths)


def manifest_info(manifest: str) -> dict[str, str]:
    """The manifest's own record of how it was made (corpus, pattern, shard size, counts)."""
    raw = pq.read_schema(local_path(manifest)).metadata or {}
    return {k.decode()[len("pipeline.") :]: v.decode() for k, v in raw.items() if k.startswith(b"pipeline.")}


def manifest_rows(manifest: str, shard: int) -> list[dict[str, Any]]:
    """The manifest rows of one shard, in manifest order."""
    table = pq.read_table(local_path(manifest), filters=[("shard", "=", shard)])
    return table.to_pylist()


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
        for encoding in ("utf-8-sig", "cp1252", "latin-1"):
            try:
                text = data.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
        encoding = "utf-8" if encoding == "utf-8-sig" else encoding
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if len(_CONTROL_CHARS.findall(text[:65536])) > 0.01 * min(len(text), 65536):
        raise Rejected("binary", "more than 1% control characters")
    return text, encoding


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


def split_front_matter(text: str) -> tuple[dict[str, Any], int, Optional[str]]:
    """(fields, offset where the body starts, error or None).

    A block that does not parse as a YAML mapping is still cut from the body (it is
    not prose), and its error is kept so the chunk metadata can say so.
    """
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, 0, None
    try:
        fields = yaml.safe_load(match.group(1) or "") or {}
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        return {}, match.end(), f"front matter is not valid YAML: {first_line}"
    if not isinstance(fields, dict):
        return {}, match.end(), f"front matter is a {type(fields).__name__}, not a mapping"
    return _plain(fields), match.end(), None


def read_document(corpus: str, row: dict[str, Any]) -> Document:
    """Read, check against the manifest, decode and split one document."""
    path = local_path(corpus) / row["path"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Rejected("missing", "the file is gone since the manifest was written") from None
    except OSError as exc:
        raise Rejected("unreadable", str(exc)) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != row["content_hash"]:
        raise Rejected("changed", "the file changed since the manifest was written")
    text, encoding = decode(data)
    fields, body_start, error = split_front_matter(text)
    return Document(
        doc_id=row["doc_id"],
        path=row["path"],
        text=text,
        encoding=encoding,
        content_hash=digest,
        front_matter=fields,
        front_matter_error=error,
        body_start=body_start,
    )


def front_matter_json(document: Document) -> str:
    return json.dumps(document.front_matter, ensure_ascii=False, sort_keys=True)


def iter_documents(corpus: str, rows: list[dict[str, Any]]) -> Iterator[tuple[dict, Document | Rejected]]:
    """Each manifest row with its document, or the rejection that explains why not.

    Any error reading one document becomes that document's rejection: one odd file
    must never fail the shard around it.
    """
    for row in rows:
        try:
            yield row, read_document(corpus, row)
        except Rejected as rejected:
            yield row, rejected
        except Exception as exc:
            yield row, Rejected("unreadable", f"{exc.__class__.__name__}: {exc}")
