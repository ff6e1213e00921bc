"""What a storage backend is: the methods every one has (as luigi's ``FileSystem`` names
its required ones), the ones only buckets have, and the write probe buckets share."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Protocol

from pipeline.errors import PipelineError
from pipeline.storage.paths import Listed, join
from pipeline.storage.retry import StorageError, describe


class Backend(Protocol):
    """Required of every backend. A bucket backend also has ``size(path)`` and
    ``read_range(path, start, end)``, which ``RangeReader`` uses for ranged reads of a
    shard's footer; a local file is opened instead."""

    def exists(self, path: str) -> bool: ...

    def read_bytes(self, path: str) -> bytes: ...

    def list(self, root: str, pattern: str, hashes: bool = True) -> Iterator[Listed]:
        """Files under ``root`` matching ``pattern``, in full-path byte order, streamed."""

    def version(self, path: str) -> str | None:
        """A token that changes whenever ``path`` is written (None when it is absent),
        for a compare-and-swap ``publish``."""

    def publish(self, local: Path, dest: str, overwrite: bool, if_version: str | None = None) -> bool:
        """Make the complete file ``local`` the object ``dest`` in one step; False when
        ``dest`` existed and ``overwrite`` is off, or (``if_version``) when ``dest`` is no
        longer at that version: nothing is written then."""

    def delete(self, path: str) -> None: ...

    def check_writable(self, root: str) -> None:
        """A ``PipelineError`` now, before any work, if an output cannot be written."""

    def check_readable(self, root: str) -> None:
        """A ``PipelineError`` now if a corpus cannot be read."""


def probe_write(backend, root: str) -> None:
    """Write and delete a tiny object, so a missing bucket or a missing permission is
    one clear error before any work starts, not after the first shard."""
    probe = join(root, f".write-test-{uuid.uuid4().hex}")
    with tempfile.NamedTemporaryFile() as empty:
        try:
            backend.publish(Path(empty.name), probe, overwrite=True)
        except StorageError as exc:
            raise PipelineError(f"cannot write to output {root}: {exc.__cause__ and describe(exc.__cause__) or exc}") from exc
    backend.delete(probe)
