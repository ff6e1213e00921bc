"""``gs://`` buckets through google-cloud-storage, with its own retries off: ``retrying``
owns them."""

from __future__ import annotations

import base64
import gc
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError

from pipeline.storage.backend import probe_write
from pipeline.storage.paths import LIST_PAGE_SIZE, Listed, is_document, split_bucket
from pipeline.storage.retry import retrying



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
                if not name.endswith("/") and is_document(relative, pattern):
                    yield Listed(relative, size, content_hash)
            if not token:
                return

    def version(self, path: str) -> str | None:
        """The object's generation, which every write changes."""
        bucket, key = split_bucket(path)

        def fetch():
            blob = self.client.bucket(bucket).get_blob(key, retry=None)
            return None if blob is None else str(blob.generation)

        return retrying("checking", path, fetch)

    def publish(self, local: Path, dest: str, overwrite: bool, if_version: str | None = None) -> bool:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        match = int(if_version) if if_version is not None else None if overwrite else 0

        def upload():
            try:
                self._blob(dest).upload_from_filename(str(local), if_generation_match=match, retry=None, checksum="md5")
            except NotFound:
                if if_version is None:
                    raise
                return False  # the object is gone: not the version asked for
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
        probe_write(self, root)

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
