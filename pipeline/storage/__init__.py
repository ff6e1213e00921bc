"""Where files live: local folders, ``gs://`` and ``s3://`` buckets, behind one interface.

Every write is a publish: a complete local file becomes the destination in one step
(a rename or hard link locally, one upload with a does-not-exist precondition in a
bucket), so a crash leaves either nothing or the whole file. Nothing is ever streamed
into a bucket. Transient errors (429, 5xx, resets, timeouts) are retried with
exponential backoff and jitter; anything else fails at once as a ``StorageError`` that
names the path and the cause.
"""


from __future__ import annotations

import io
from typing import Iterator

from pipeline.storage.backends import backend_for, forget_clients
from pipeline.storage.local import hash_file
from pipeline.storage.paths import Listed, canonical, is_remote, join, local_path, md5_hex, split_bucket
from pipeline.storage.publish import (NO_SPACE, Staged, atomic_output, pid_alive, remove_stale_temps, staging_folder,
                                      temp_name_for)
from pipeline.storage.retry import RetryPolicy, StorageError, describe, is_transient, retrying, use_retry_policy

__all__ = [
    "Listed", "RangeReader", "RetryPolicy", "Staged", "StorageError", "NO_SPACE",
    "atomic_output", "backend_for", "canonical", "check_corpus", "delete", "describe", "ensure_writable_dir", "exists",
    "forget_clients", "hash_file", "is_remote", "is_transient", "join", "list_files", "local_path", "md5_hex",
    "open_for_reading", "pid_alive", "read_bytes", "read_text", "remove_stale_temps", "retrying", "split_bucket",
    "staging_folder", "temp_name_for", "use_retry_policy", "version",
]


# ---------------------------------------------------------------------------------------
# The operations the pipeline uses


def exists(path: str) -> bool:
    return backend_for(path).exists(path)


def read_bytes(path: str) -> bytes:
    return backend_for(path).read_bytes(path)


def version(path: str) -> str | None:
    """A token naming what ``path`` holds now (None when absent): read it before the
    file, and ``atomic_output(path, if_version=...)`` replaces only that version."""
    return backend_for(path).version(path)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def delete(path: str) -> None:
    backend_for(path).delete(path)


def list_files(root: str, pattern: str, hashes: bool = True) -> Iterator[Listed]:
    """Matching files under ``root``, sorted; ``hashes=False`` when only names and sizes
    are wanted (a local listing then reads no file: buckets report hashes anyway)."""
    return backend_for(root).list(root, pattern, hashes)


def check_corpus(root: str) -> None:
    backend_for(root).check_readable(root)


def ensure_writable_dir(root: str) -> None:
    """Fail with one line saying why the output cannot be written, before any work."""
    backend_for(root).check_writable(root)


class RangeReader(io.RawIOBase):
    """A seekable read-only file over ranged reads, so pyarrow can read a Parquet
    footer from a bucket without downloading the whole shard (bucket backends only:
    a local file is opened as it is)."""

    def __init__(self, path: str):
        self.path = path
        self.backend = backend_for(path)
        self.length = self.backend.size(path)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.position + len(buffer), self.length)
        if end <= self.position:
            return 0
        data = self.backend.read_range(self.path, self.position, end)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def open_for_reading(path: str):
    """A seekable binary file for ``path``: the file itself, or ranged reads of an object."""
    if is_remote(path):
        return io.BufferedReader(RangeReader(path), buffer_size=1 << 16)
    return open(local_path(path), "rb")


