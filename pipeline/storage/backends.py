"""One backend per scheme and process, picked by a path's scheme; a bucket backend checks
its credentials when it is made."""

from __future__ import annotations

from functools import lru_cache

from pipeline.errors import PipelineError

from pipeline.storage.backend import Backend
from pipeline.storage.local import LocalBackend



@lru_cache(maxsize=None)
def _backend(scheme: str) -> Backend:
    if scheme == "gs":
        from pipeline.storage.gcs import GCSBackend

        return GCSBackend()
    if scheme == "s3":
        from pipeline.storage.s3 import S3Backend

        return S3Backend()
    return LocalBackend()


def forget_clients() -> None:
    """Make the next call build its backends afresh (after the environment that reaches
    a bucket changed: credentials, an emulator's address)."""
    _backend.cache_clear()


def backend_for(path: str) -> Backend:
    """The backend serving ``path`` (one client per process and scheme)."""
    if path.startswith("gs://"):
        return _backend("gs")
    if path.startswith("s3://"):
        return _backend("s3")
    if "://" in path:
        raise PipelineError(f"{path}: unsupported location; use a local folder, gs://bucket/prefix or s3://bucket/prefix")
    return _backend("file")
