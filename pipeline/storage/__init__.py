"""Where files live: local folders, ``gs://`` and ``s3://`` buckets, behind one interface.

Every write is a publish: a complete local file becomes the destination in one step
(a rename or hard link locally, one upload with a does-not-exist precondition in a
bucket), so a crash leaves either nothing or the whole file. Nothing is ever streamed
into a bucket. Transient errors (429, 5xx, resets, timeouts) are retried with
exponential backoff and jitter; anything else fails at once as a ``StorageError`` that
names the path and the cause.
"""

from __future__ import annotations

import base64
import errno
import gc
import hashlib
import io
import logging
import os
import re
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional, TypeVar


from pipeline.errors import PipelineError, backoff

log = logging.getLogger("luigi-interface")
T = TypeVar("T")

REMOTE_SCHEMES = ("gs://", "s3://")
LIST_PAGE_SIZE = 1000
# A temp file whose writer runs on another machine is taken as abandoned after this
# long without a write (a live writer appends a row group every few seconds).
ABANDONED_AFTER_SECONDS = 3600
_TEMP_WRITER = re.compile(r"\.(?P<pid>\d+)@(?P<host>.+)\.[0-9a-f]{8}\.tmp$")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class StorageError(PipelineError):
    """A storage call that failed for good: permanent, or transient past every retry.

    It fails the task (a rerun resumes); it never turns a document into a rejection."""


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


def local_path(path: str) -> Path:
    if is_remote(path):
        raise PipelineError(f"{path}: expected a local path here")
    return Path(path).expanduser()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _is_document(relative: str, pattern: str) -> bool:
    parts = PurePosixPath(relative).parts
    return bool(parts) and not any(p.startswith(".") for p in parts) and PurePosixPath(relative).match(pattern)


# ---------------------------------------------------------------------------------------
# Retries and error classification


def _status_of(exc: BaseException) -> Optional[int]:
    code = getattr(exc, "code", None)  # google.api_core exceptions
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status = getattr(response, "status_code", None)  # google-resumable-media's InvalidResponse
    return status if isinstance(status, int) else None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: rate limits, server errors, dropped connections, timeouts."""
    status = _status_of(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    transient_names = {
        "ConnectionError",  # requests
        "Timeout",
        "ChunkedEncodingError",
        "ProtocolError",  # urllib3
        "IncompleteRead",
        "EndpointConnectionError",  # botocore
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "DataCorruption",  # google-cloud-storage: a download that failed its checksum
    }
    return bool(names & transient_names)


def describe(exc: BaseException) -> str:
    status = _status_of(exc)
    message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    if len(message) > 300:
        message = message[:300] + "…"
    return f"HTTP {status}: {message}" if status else f"{exc.__class__.__name__}: {message}"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a storage call tries: ``attempts``, the first included, and at most
    ``max_wait`` seconds between two (docs/storage.md)."""

    attempts: int = 8
    max_wait: float = 30.0


_retry_policy = RetryPolicy()


def use_retry_policy(policy: RetryPolicy) -> RetryPolicy:
    """Set how this process's storage calls retry (a run sets it from its settings:
    ``config.prepare_run``); returns the policy it replaces."""
    global _retry_policy
    previous, _retry_policy = _retry_policy, policy
    return previous


def retrying(action: str, path: str, call: Callable[[], T]) -> T:
    """Run ``call``, retrying transient errors with jittered exponential backoff."""
    attempts, max_wait = _retry_policy.attempts, _retry_policy.max_wait

    def on_retry(exc: BaseException, attempt: int, wait: float) -> None:
        log.warning("%s %s: %s; retry %d of %d in %.1fs", action, path, describe(exc), attempt, attempts - 1, wait)

    retryer = backoff(is_transient, attempts, max_wait, on_retry)
    try:
        return retryer(call)
    except (FileNotFoundError, FileExistsError, PipelineError):
        raise
    except Exception as exc:
        gave_up = f" (gave up after {attempts} attempts)" if is_transient(exc) else ""
        raise StorageError(f"{action} {path}: {describe(exc)}{gave_up}") from exc


# ---------------------------------------------------------------------------------------
# Backends


class LocalBackend:
    def exists(self, path: str) -> bool:
        return local_path(path).exists()

    def read_bytes(self, path: str) -> bytes:
        return local_path(path).read_bytes()

    def list(self, root: str, pattern: str, hashes: bool = True) -> Iterator[Listed]:
        """Files in full-path sorted order (the order a bucket lists in), streamed:
        only one folder's entries are held at a time. ``hashes=False`` leaves
        ``content_hash`` empty instead of reading every file (an output's own files).

        Only what is inside the corpus is listed, and listing always ends: a symlinked
        folder is never followed (it may loop back to a parent or lead out of the
        corpus; folders inside the corpus are listed under their own path anyway); a
        symlinked file is listed only if it resolves to a regular file inside the
        corpus. Entries that are not regular files (pipes, sockets, devices: reading
        one can block forever), names that are not UTF-8 (a manifest path is text),
        and files that cannot be read to hash them (deleted meanwhile, no permission) are
        skipped, each with a warning.
        """
        base = local_path(root)
        if not base.is_dir():
            return
        real_base = base.resolve()

        def skip(path: Path, why: str) -> None:
            log.warning("corpus: skipped %s: %s", os.fsencode(path).decode("utf-8", "backslashreplace"), why)

        def walk(folder: Path, prefix: str) -> Iterator[Listed]:
            entries = []
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        kind = _kind(entry, real_base)
                    except OSError as exc:  # a link that loops on itself, a file that is gone
                        kind = exc.strerror or str(exc)
                    if kind in ("folder", "file"):
                        entries.append((entry.name + ("/" if kind == "folder" else ""), entry.name, kind == "folder"))
                    else:
                        skip(folder / entry.name, kind)
            for _, name, is_dir in sorted(entries):
                relative = prefix + name
                if is_dir:
                    yield from walk(folder / name, relative + "/")
                elif _is_document(relative, pattern):
                    try:
                        data_hash, size = hash_file(folder / name) if hashes else ("", (folder / name).stat().st_size)
                    except OSError as exc:  # deleted since the folder was read, or unreadable
                        skip(folder / name, f"could not be read to hash it: {exc.strerror or exc}")
                        continue
                    yield Listed(relative, size, data_hash)

        yield from walk(base, "")

    def publish(self, local: Path, dest: str, overwrite: bool) -> bool:
        final = local_path(dest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            os.replace(local, final)
        else:
            try:
                os.link(local, final)  # fails if ``final`` exists: exactly-once
            except FileExistsError:
                return False
            except OSError:
                # A filesystem without hard links: check, then rename. Two racing writers
                # may both rename, but each renames a whole, identical file; the name is
                # never seen pointing at a partial one.
                if final.exists():
                    return False
                os.replace(local, final)
            else:
                local.unlink()
        _fsync(final.parent)
        return True

    def delete(self, path: str) -> None:
        local_path(path).unlink(missing_ok=True)

    def check_writable(self, root: str) -> None:
        folder = local_path(root)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PipelineError(f"cannot write to output {root}: {exc.strerror or exc}") from exc

    def check_readable(self, root: str) -> None:
        folder = local_path(root)
        if not folder.exists():
            raise PipelineError(f"corpus path {root} does not exist")
        if not folder.is_dir():
            raise PipelineError(f"corpus path {root} is not a folder")


def _kind(entry: os.DirEntry, real_base: Path) -> str:
    """``folder`` or ``file`` for what a local listing walks into or lists, else why not."""
    if not _is_utf8(entry.name):
        return "the name is not UTF-8"
    if entry.is_dir(follow_symlinks=False):
        return "folder"
    if not entry.is_symlink():
        return "file" if entry.is_file(follow_symlinks=False) else "not a regular file"
    if not Path(os.path.realpath(entry.path)).is_relative_to(real_base):
        return "a symbolic link that leads out of the corpus"
    if entry.is_dir():
        return "a symbolic link to a folder is not followed"
    return "file" if entry.is_file() else "a symbolic link to no regular file"


def _is_utf8(name: str) -> bool:
    """Whether a file name decoded cleanly (undecodable bytes come back as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GCSBackend:
    """google-cloud-storage with its own retries off: ``retrying`` owns them."""

    def __init__(self):
        from google.cloud import storage

        self.client = storage.Client(credentials=_gcs_credentials(), project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "local")

    def _blob(self, path: str):
        bucket, key = split_bucket(path)
        return self.client.bucket(bucket).blob(key)

    def exists(self, path: str) -> bool:
        return retrying("checking", path, lambda: self._blob(path).exists(retry=None))

    def size(self, path: str) -> int:
        bucket, key = split_bucket(path)

        def fetch():
            blob = self.client.bucket(bucket).get_blob(key, retry=None)
            if blob is None:
                raise FileNotFoundError(path)
            return blob.size

        return retrying("reading", path, fetch)

    def read_bytes(self, path: str) -> bytes:
        from google.api_core.exceptions import NotFound

        def fetch():
            try:
                return self._blob(path).download_as_bytes(retry=None, checksum="md5")
            except NotFound:
                raise FileNotFoundError(path) from None

        return retrying("reading", path, fetch)

    def read_range(self, path: str, start: int, end: int) -> bytes:
        return retrying("reading", path, lambda: self._blob(path).download_as_bytes(start=start, end=end - 1, retry=None, checksum=None))

    def list(self, root: str, pattern: str, hashes: bool = True) -> Iterator[Listed]:  # hashes come with the listing
        """Page by page, resuming from the last page token after a transient error.

        Memory stays flat: only the four fields the manifest needs are asked for and
        copied out of each page, and the page's objects (the library's pages and blobs
        reference each other, so only a full collection frees them) are collected
        before the next page is fetched.
        """
        bucket, prefix = split_bucket(root)
        prefix = f"{prefix}/" if prefix else ""
        token = None
        while True:

            def page(token=token):
                iterator = self.client.list_blobs(
                    bucket, prefix=prefix, page_token=token, page_size=LIST_PAGE_SIZE, retry=None,
                    fields="items(name,size,md5Hash,crc32c),nextPageToken",
                )
                found = [(blob.name, blob.size, _gcs_hash(blob)) for blob in next(iterator.pages, [])]
                return found, iterator.next_page_token

            found, token = retrying("listing", root, page)
            gc.collect()
            for name, size, content_hash in found:
                relative = name[len(prefix) :]
                if not name.endswith("/") and _is_document(relative, pattern):
                    yield Listed(relative, size, content_hash)
            if not token:
                return

    def publish(self, local: Path, dest: str, overwrite: bool) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        def upload():
            try:
                self._blob(dest).upload_from_filename(str(local), if_generation_match=None if overwrite else 0, retry=None, checksum="md5")
            except PreconditionFailed:
                return False
            return True

        return retrying("uploading", dest, upload)

    def delete(self, path: str) -> None:
        from google.api_core.exceptions import NotFound

        def remove():
            try:
                self._blob(path).delete(retry=None)
            except NotFound:
                pass

        retrying("deleting", path, remove)

    def check_writable(self, root: str) -> None:
        _probe_write(self, root)

    def check_readable(self, root: str) -> None:
        """One object listing (objects.list is what reading the corpus needs anyway;
        buckets.get would need more than a reader's role)."""
        bucket, prefix = split_bucket(root)
        from google.api_core.exceptions import NotFound

        def probe():
            try:
                list(self.client.list_blobs(bucket, prefix=prefix, max_results=1, retry=None))
            except NotFound:
                raise PipelineError(f"corpus {root}: bucket {bucket} does not exist") from None

        retrying("reading", root, probe)


def _gcs_hash(blob) -> str:
    if blob.md5_hash:
        return base64.b64decode(blob.md5_hash).hex()
    return f"crc32c:{blob.crc32c}"  # composite objects have no MD5


def _gcs_credentials():
    """Anonymous for a local emulator; else Application Default Credentials (which
    include GOOGLE_APPLICATION_CREDENTIALS), or one clear line saying how to set them."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
    except DefaultCredentialsError:
        raise PipelineError(
            "no Google Cloud credentials for gs:// paths: set GOOGLE_APPLICATION_CREDENTIALS to a "
            "service-account key file, or run `gcloud auth application-default login`"
        ) from None
    return credentials


class S3Backend:
    """boto3 with its own retries off (``retrying`` owns them); AWS_ENDPOINT_URL points
    it at any S3-compatible server."""

    def __init__(self):
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ProfileNotFound

        try:
            session = boto3.session.Session()
            credentials = session.get_credentials()
        except ProfileNotFound as exc:
            raise PipelineError(f"AWS_PROFILE names a profile that does not exist: {exc}") from None
        if credentials is None:
            raise PipelineError(
                "no AWS credentials for s3:// paths: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE (and AWS_ENDPOINT_URL for an S3-compatible server)"
            )
        self.client = session.client("s3", config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))
        self.conditional_writes = True

    def _code(self, exc) -> str:
        return getattr(exc, "response", {}).get("Error", {}).get("Code", "")

    def exists(self, path: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_bucket(path)

        def head():
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if _status_of(exc) == 404 and self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return retrying("checking", path, head)

    def size(self, path: str) -> int:
        bucket, key = split_bucket(path)
        return retrying("reading", path, lambda: self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])

    def _get(self, path: str, **kwargs) -> bytes:
        bucket, key = split_bucket(path)

        def fetch():
            try:
                return self.client.get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(path) from None

        return retrying("reading", path, fetch)

    def read_bytes(self, path: str) -> bytes:
        return self._get(path)

    def read_range(self, path: str, start: int, end: int) -> bytes:
        return self._get(path, Range=f"bytes={start}-{end - 1}")

    def list(self, root: str, pattern: str, hashes: bool = True) -> Iterator[Listed]:  # hashes come with the listing
        bucket, prefix = split_bucket(root)
        prefix = f"{prefix}/" if prefix else ""
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE_SIZE}
            if token:
                kwargs["ContinuationToken"] = token
            page = retrying("listing", root, lambda kwargs=kwargs: self.client.list_objects_v2(**kwargs))
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix) :]
                if not item["Key"].endswith("/") and _is_document(relative, pattern):
                    # Not an MD5 for multipart uploads or SSE-KMS/SSE-C objects, so kept
                    # as an opaque ETag (never a false "changed" rejection).
                    yield Listed(relative, item["Size"], "etag:" + item["ETag"].strip('"'))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def publish(self, local: Path, dest: str, overwrite: bool) -> bool:
        """One PUT of the complete file; ``If-None-Match: *`` makes it exactly-once.

        A server without conditional writes (501) gets a check, then the PUT: two racing
        writers may then both write, but each writes a whole, identical shard."""
        bucket, key = split_bucket(dest)

        def put():
            conditional = not overwrite and self.conditional_writes
            if not overwrite and not conditional and self.exists(dest):
                return False
            with open(local, "rb") as body:
                try:
                    self.client.put_object(Bucket=bucket, Key=key, Body=body, **({"IfNoneMatch": "*"} if conditional else {}))
                except Exception as exc:
                    if _status_of(exc) == 412:
                        return False
                    if _status_of(exc) == 501 and conditional:
                        log.warning("%s: the server has no conditional writes; checking before each upload instead", dest)
                        self.conditional_writes = False
                        return put()
                    raise
            return True

        return retrying("uploading", dest, put)

    def delete(self, path: str) -> None:
        bucket, key = split_bucket(path)
        retrying("deleting", path, lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def check_writable(self, root: str) -> None:
        _probe_write(self, root)

    def check_readable(self, root: str) -> None:
        bucket, _ = split_bucket(root)
        retrying("reading", root, lambda: self.client.head_bucket(Bucket=bucket))


def _probe_write(backend, root: str) -> None:
    """Write and delete a tiny object, so a missing bucket or a missing permission is
    one clear error before any work starts, not after the first shard."""
    probe = join(root, f".write-test-{uuid.uuid4().hex}")
    with tempfile.NamedTemporaryFile() as empty:
        try:
            backend.publish(Path(empty.name), probe, overwrite=True)
        except StorageError as exc:
            raise PipelineError(f"cannot write to output {root}: {exc.__cause__ and describe(exc.__cause__) or exc}") from exc
    backend.delete(probe)


@lru_cache(maxsize=None)
def _backend(scheme: str):
    return {"gs": GCSBackend, "s3": S3Backend, "file": LocalBackend}[scheme]()


def backend_for(path: str):
    """The backend serving ``path`` (one client per process and scheme)."""
    if path.startswith("gs://"):
        return _backend("gs")
    if path.startswith("s3://"):
        return _backend("s3")
    if "://" in path:
        raise PipelineError(f"{path}: unsupported location; use a local folder, gs://bucket/prefix or s3://bucket/prefix")
    return _backend("file")


# ---------------------------------------------------------------------------------------
# The operations the pipeline uses


def exists(path: str) -> bool:
    return backend_for(path).exists(path)


def read_bytes(path: str) -> bytes:
    return backend_for(path).read_bytes(path)


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
def atomic_output(dest: str, overwrite: bool = True) -> Iterator[Staged]:
    """Yield a staging file to write completely; on success it is published to ``dest``
    in one step. With ``overwrite=False`` an existing ``dest`` is kept (exactly-once).
    On error nothing is published and the staging file is removed."""
    stale = remove_stale_temps(dest)
    if stale:
        log.info("%s: removed %d staging file(s) left by an interrupted run", dest, stale)
    staged = Staged(dest)
    try:
        yield staged
        _fsync(staged.path)
        staged.published = backend_for(dest).publish(staged.path, dest, overwrite)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise PipelineError(f"no space left to write {dest} (staged in {staged.path.parent}): {exc.strerror or exc}; "
                            "nothing of it was published: free space and rerun, finished files are kept") from exc
    finally:
        staged.path.unlink(missing_ok=True)
