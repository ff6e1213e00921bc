"""Every write is a publish: a complete local file becomes the destination in one step,
so a crash leaves either nothing or the whole file; temp files a killed writer left are
removed before a shard is made again."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from pipeline.errors import PipelineError

from pipeline.storage.backends import backend_for
from pipeline.storage.local import fsync_folder
from pipeline.storage.paths import is_remote, local_path

log = logging.getLogger("luigi-interface")


# A temp file whose writer runs on another machine is taken as abandoned after this
# long without a write (a live writer appends a row group every few seconds).
ABANDONED_AFTER_SECONDS = 3600
_TEMP_WRITER = re.compile(r"\.(?P<pid>\d+)@(?P<host>.+)\.[0-9a-f]{8}\.tmp$")


# ---------------------------------------------------------------------------------------
# Staging and publishing


def staging_folder(dest: str) -> Path:
    """Where a file for ``dest`` is written before it is published: beside it for a
    local destination (same filesystem, so the rename is atomic), else a local temp dir."""
    if is_remote(dest):
        folder = Path(tempfile.gettempdir()) / "embedding-pipeline-staging"
    else:
        folder = local_path(dest).parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def temp_name_for(dest: str) -> Path:
    """A hidden, unique staging file for ``dest``, ignored by readers that skip
    dot-files (pyarrow.dataset does) and naming its writer (pid@host) so a later run
    can tell an abandoned temp from a live one."""
    name = PurePosixPath(dest).name
    return staging_folder(dest) / f".{name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex[:8]}.tmp"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_is_gone(temp: Path) -> bool:
    match = _TEMP_WRITER.search(temp.name)
    if match and match["host"] == socket.gethostname():
        return not pid_alive(int(match["pid"]))
    try:
        return time.time() - temp.stat().st_mtime > ABANDONED_AFTER_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temps(dest: str) -> int:
    """Delete staging files that killed writers of ``dest`` left behind; returns how many.

    A staging file of a writer that is still alive (another worker given the same
    shard) is left alone: deleting it would fail that worker for nothing.
    """
    removed = 0
    for temp in staging_folder(dest).glob(f".{PurePosixPath(dest).name}.*.tmp"):
        if _writer_is_gone(temp):
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


# A full disk, a full quota, or a file larger than the process may write.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Staged:
    """A staging file being written; ``published`` says whether it became the destination
    (False: another writer had already published it, and theirs was kept)."""

    def __init__(self, dest: str):
        self.dest = dest
        self.path = temp_name_for(dest)
        self.published = False


@contextmanager
def atomic_output(dest: str, overwrite: bool = True, if_version: str | None = None) -> Iterator[Staged]:
    """Yield a staging file to write completely; on success it is published to ``dest``
    in one step. With ``overwrite=False`` an existing ``dest`` is kept (exactly-once);
    with ``if_version`` (from ``version``) only that version of ``dest`` is replaced
    (compare-and-swap). ``published`` says which happened. On error nothing is
    published and the staging file is removed."""
    stale = remove_stale_temps(dest)
    if stale:
        log.info("%s: removed %d staging file(s) left by an interrupted run", dest, stale)
    staged = Staged(dest)
    try:
        yield staged
        fsync_folder(staged.path)
        staged.published = backend_for(dest).publish(staged.path, dest, overwrite, if_version)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise PipelineError(f"no space left to write {dest} (staged in {staged.path.parent}): {exc.strerror or exc}; "
                            "nothing of it was published: free space and rerun, finished files are kept") from exc
    finally:
        staged.path.unlink(missing_ok=True)
