"""``s3://`` buckets (and S3-compatible servers, ``AWS_ENDPOINT_URL``) through boto3, with
its own retries off: ``retrying`` owns them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError

from pipeline.storage.backend import probe_write
from pipeline.storage.paths import LIST_PAGE_SIZE, Listed, is_document, split_bucket
from pipeline.storage.retry import retrying, status_of

log = logging.getLogger("luigi-interface")


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
        return self._head(path, lambda answer: True) or False

    def _head(self, path: str, read):
        """``read(head_object's answer)``, or None when there is no such object."""
        from botocore.exceptions import ClientError

        bucket, key = split_bucket(path)

        def head():
            try:
                return read(self.client.head_object(Bucket=bucket, Key=key))
            except ClientError as exc:
                if status_of(exc) == 404 and self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
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
                if not item["Key"].endswith("/") and is_document(relative, pattern):
                    # Not an MD5 for multipart uploads or SSE-KMS/SSE-C objects, so kept
                    # as an opaque ETag (never a false "changed" rejection).
                    yield Listed(relative, item["Size"], "etag:" + item["ETag"].strip('"'))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def version(self, path: str) -> str | None:
        """The object's ETag (its MD5 for a single PUT: equal bytes, equal version)."""
        return self._head(path, lambda answer: answer["ETag"].strip('"'))

    def publish(self, local: Path, dest: str, overwrite: bool, if_version: str | None = None) -> bool:
        """One PUT of the complete file; ``If-None-Match: *`` makes it exactly-once, and
        ``If-Match`` a compare-and-swap.

        A server without conditional writes (501) gets a check, then the PUT: two racing
        writers may then both write, but each writes a whole, identical shard."""
        bucket, key = split_bucket(dest)

        def put():
            wants = not overwrite or if_version is not None
            conditional = wants and self.conditional_writes
            if wants and not conditional:
                if (self.version(dest) != if_version) if if_version is not None else self.exists(dest):
                    return False
            condition = {"IfMatch": if_version} if if_version is not None else {"IfNoneMatch": "*"}
            with open(local, "rb") as body:
                try:
                    self.client.put_object(Bucket=bucket, Key=key, Body=body, **(condition if conditional else {}))
                except Exception as exc:
                    if status_of(exc) == 412 or (if_version is not None and status_of(exc) == 404):
                        return False  # 404: the object is gone, so not at the version asked for
                    if status_of(exc) == 501 and conditional:
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
        probe_write(self, root)

    def check_readable(self, root: str) -> None:
        bucket, _ = split_bucket(root)
        retrying("reading", root, lambda: self.client.head_bucket(Bucket=bucket))
