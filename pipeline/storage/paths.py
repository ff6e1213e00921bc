"""Where a path points (a local folder, or which bucket and key), and what a listing
returns."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import PipelineError




REMOTE_SCHEMES = ("gs://", "s3://")
LIST_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Listed:
    """One document found by listing: path relative to the corpus root, size, hash."""

    relative: str
    size: int
    content_hash: str


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}" if root else relative


def split_bucket(path: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    bucket, _, key = path.split("://", 1)[1].partition("/")
    if not bucket:
        raise PipelineError(f"{path}: no bucket name")
    return bucket, key.strip("/")


def canonical(location: str) -> str:
    """One spelling for one place, so pods, leases and the ledger match an output however
    it was typed: an absolute local path (``out``, ``./out/`` and ``/home/me/out`` are one),
    or a bucket URL without a trailing slash or empty parts in its key."""
    if not location:
        return location
    if is_remote(location):
        scheme, rest = location.split("://", 1)
        bucket, _, key = rest.partition("/")
        key = "/".join(part for part in key.split("/") if part)
        return f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}"
    return os.path.abspath(local_path(location))


def local_path(path: str) -> Path:
    if is_remote(path):
        raise PipelineError(f"{path}: expected a local path here")
    return Path(path).expanduser()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def is_document(relative: str, pattern: str) -> bool:
    parts = PurePosixPath(relative).parts
    return bool(parts) and not any(p.startswith(".") for p in parts) and PurePosixPath(relative).match(pattern)
