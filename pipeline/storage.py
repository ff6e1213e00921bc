"""Where files live and how they are published: complete temp file, then one rename.

Only local paths for now; ``gs://`` and ``s3://`` are refused with a clear message
until their backends land, so nobody mistakes a local folder named ``gs:`` for a bucket.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import luigi

from .errors import PipelineError

REMOTE_SCHEMES = ("gs://", "s3://")


def local_path(path: str) -> Path:
    """The local path for a corpus or output location, or a clear refusal."""
    if path.startswith(REMOTE_SCHEMES):
        raise PipelineError(f"{path}: bucket paths are not supported yet; use a local folder")
    return Path(path).expanduser()


def target(path: str) -> luigi.LocalTarget:
    """The Luigi target whose existence means 'done'."""
    return luigi.LocalTarget(str(local_path(path)))


def ensure_writable_dir(path: str) -> Path:
    """Create an output folder or fail with one line saying why it cannot be written."""
    folder = local_path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(f"cannot write to output {path}: {exc.strerror or exc}") from exc
    return folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A temp file whose writer runs on another machine is taken as abandoned after this
# long without a write (a live writer appends a row group every few seconds).
ABANDONED_AFTER_SECONDS = 3600
_TEMP_WRITER = re.compile(r"\.(?P<pid>\d+)@(?P<host>.+)\.[0-9a-f]{8}\.tmp$")


def temp_name_for(dest: Path) -> Path:
    """A hidden, unique sibling of ``dest``: same filesystem (so rename is atomic),
    ignored by readers that skip dot-files (pyarrow.dataset does), and naming its
    writer (pid@host) so a later run can tell an abandoned temp from a live one."""
    return dest.with_name(f".{dest.name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
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
        return not _pid_alive(int(match["pid"]))
    try:
        return time.time() - temp.stat().st_mtime > ABANDONED_AFTER_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temps(dest: Path) -> int:
    """Delete temp files that killed writers of ``dest`` left behind; returns how many.

    A temp file of a writer that is still alive (another worker given the same shard)
    is left alone: deleting it would fail that worker for nothing.
    """
    removed = 0
    for temp in dest.parent.glob(f".{dest.name}.*.tmp"):
        if _writer_is_gone(temp):
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def atomic_output(dest: str) -> Iterator[Path]:
    """Yield a temp path to write completely; on success it becomes ``dest`` in one rename.

    A crash at any point leaves either the old state or the whole new file, never a
    partial ``dest``. On error the temp file is removed.
    """
    final = local_path(dest)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_for(final)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
