"""The gs:// and s3:// backends against real servers on loopback, with injected faults."""

import pytest

from conftest import Bucket
from pipeline import storage
from pipeline.core.corpus import list_documents, write_manifest, write_manifest_of
from pipeline.errors import PipelineError
from pipeline.storage import StorageError, atomic_output
from storage_servers import FaultProxy


def publish(dest, data, overwrite=False):
    with atomic_output(dest, overwrite=overwrite) as staged:
        staged.path.write_bytes(data)
    return staged.published


def test_publish_is_exactly_once_and_overwrite_replaces(bucket):
    dest = f"{bucket.url}/out/shards/shard-000000.parquet"
    assert publish(dest, b"first writer") is True
    assert publish(dest, b"second writer") is False  # it notices, and succeeds without overwriting
    assert bucket.get("out/shards/shard-000000.parquet") == b"first writer"
    assert publish(f"{bucket.url}/out/_SUCCESS.json", b"v1", overwrite=True)
    assert publish(f"{bucket.url}/out/_SUCCESS.json", b"v2", overwrite=True)
    assert bucket.get("out/_SUCCESS.json") == b"v2"
    assert storage.exists(dest) and not storage.exists(f"{bucket.url}/out/shards/shard-000001.parquet")


def swap(dest, data, version):
    with atomic_output(dest, if_version=version) as staged:
        staged.path.write_bytes(data)
    return staged.published


def check_compare_and_swap(root: str) -> None:
    dest = f"{root}/out/manifest.parquet"
    assert storage.version(dest) is None
    assert publish(dest, b"version one", overwrite=True)
    first = storage.version(dest)
    assert swap(dest, b"version two", first) is True
    second = storage.version(dest)
    assert second not in (None, first)
    assert swap(dest, b"a late writer's", first) is False  # made from what is no longer there
    assert storage.read_bytes(dest) == b"version two"
    assert swap(dest, b"version three", second) is True and storage.read_bytes(dest) == b"version three"
    storage.delete(dest)
    assert swap(dest, b"after a delete", second) is False and not storage.exists(dest)


def test_a_compare_and_swap_publish_replaces_only_the_version_it_was_made_from(bucket):
    check_compare_and_swap(bucket.url)


def test_a_compare_and_swap_publish_in_a_local_folder(tmp_path):
    check_compare_and_swap(str(tmp_path))


@pytest.mark.slow  # thousands of objects through a loopback server: not in the fast tier
def test_listing_pages_filters_and_hashes(bucket):
    import hashlib

    names = [f"corpus/part-{i % 3}/doc-{i:05d}.md" for i in range(2300)]
    for name in names[:2300]:
        bucket.put(name, name.encode())
    bucket.put("corpus/notes.txt", b"not markdown")
    bucket.put("corpus/.hidden/x.md", b"hidden")
    listed = list(list_documents(f"{bucket.url}/corpus", "*.md"))
    assert [d.relative for d in listed] == sorted(n[len("corpus/") :] for n in names)
    md5 = {d.relative: hashlib.md5(f"corpus/{d.relative}".encode()).hexdigest() for d in listed}
    # GCS reports the MD5; S3's ETag is kept opaque (it is no MD5 under SSE-KMS or multipart).
    assert all(d.content_hash == (md5[d.relative] if bucket.kind == "gcs" else f"etag:{md5[d.relative]}") for d in listed)


def test_missing_bucket_and_empty_prefix_are_clear_errors(bucket):
    with pytest.raises(PipelineError, match="no files matching"):
        list(list_documents(f"{bucket.url}/nothing-here", "*.md"))
    with pytest.raises(PipelineError, match="no-such-bucket"):
        list(list_documents(f"{bucket.scheme}://no-such-bucket-{bucket.name}/corpus", "*.md"))
    with pytest.raises(PipelineError, match="cannot write to output"):
        storage.ensure_writable_dir(f"{bucket.scheme}://no-such-bucket-{bucket.name}/out")
    storage.ensure_writable_dir(f"{bucket.url}/out")
    assert bucket.keys("out") == []  # the write probe cleaned up after itself


def test_reading_a_missing_object_is_file_not_found(bucket):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket.url}/missing.md")


def test_manifest_in_a_bucket_from_a_corpus_in_a_bucket(bucket, small_corpus):
    bucket.upload_folder(small_corpus, "corpus")
    manifest = f"{bucket.url}/out/manifest.parquet"
    assert write_manifest(f"{bucket.url}/corpus", "*.md", 5, manifest) == 12
    from pipeline.core.corpus import manifest_info, manifest_rows

    info = manifest_info(manifest)
    assert (info["documents"], info["shards"], info["corpus"]) == ("12", "3", f"{bucket.url}/corpus")
    assert [r["shard"] for r in manifest_rows(manifest, 2)] == [2, 2]


def test_a_shard_reads_its_rows_from_a_bucket_manifest_without_downloading_it(bucket, tmp_path, monkeypatch):
    """At 10 million documents the manifest is 0.64 GB: each worker and pod downloaded it.
    A shard's rows now cost the footer and its own row group, a few ranged reads."""
    from pipeline.core.corpus import manifest_rows

    documents = 100_000
    listing = [storage.Listed(f"folder-{i % 50}/document-{i:07d}.md", 1000 + i, f"{i:032x}") for i in range(documents)]
    manifest = f"{bucket.url}/out/manifest.parquet"
    write_manifest_of(listing, f"{bucket.url}/corpus", "*.md", 10, manifest)
    size = storage.backend_for(manifest).size(manifest)
    backend = type(storage.backend_for(manifest))
    ranges, real_range = [], backend.read_range
    monkeypatch.setattr(backend, "read_bytes", lambda self, path: pytest.fail(f"{path} was downloaded whole"))
    monkeypatch.setattr(backend, "read_range", lambda self, path, start, end: ranges.append(end - start) or real_range(self, path, start, end))
    rows = manifest_rows(manifest, 1234)
    assert [row["path"] for row in rows] == [listing[i].relative for i in range(12340, 12350)]
    assert len(ranges) <= 8 and sum(ranges) < size / 5, (ranges, size)


@pytest.fixture(params=["gcs", "s3"])
def proxied_bucket(request, monkeypatch, fast_retries):
    """A bucket reached through a fault-injecting proxy (the plan is set by each test)."""
    server = request.getfixturevalue("gcs_server" if request.param == "gcs" else "s3_server")
    proxy = FaultProxy(server.port)
    yield Bucket(request.param, server, monkeypatch, url=proxy.url), proxy
    proxy.stop()
    storage.forget_clients()


def test_transient_errors_are_retried_until_the_call_succeeds(proxied_bucket):
    bucket, proxy = proxied_bucket
    faults = iter(["503", "429", "reset", "500", "reset-mid-body"])
    proxy.plan = lambda method, path, number: next(faults, None)
    dest = f"{bucket.url}/out/shards/shard-000007.parquet"
    assert publish(dest, b"x" * 100_000) is True
    assert [fault for _, _, fault in proxy.faults()] == ["503", "429", "reset", "500", "reset-mid-body"]
    assert bucket.get("out/shards/shard-000007.parquet") == b"x" * 100_000


def test_an_upload_that_never_completes_leaves_no_object(proxied_bucket):
    bucket, proxy = proxied_bucket
    proxy.plan = lambda method, path, number: "reset-mid-body" if method in ("POST", "PUT") else None
    with pytest.raises(StorageError, match="gave up after 6 attempts"):
        publish(f"{bucket.url}/out/shards/shard-000001.parquet", b"y" * 200_000)
    proxy.plan = lambda method, path, number: None
    assert bucket.keys("out") == []


@pytest.mark.parametrize("status", ["403", "400"])
def test_permanent_errors_fail_at_once_naming_path_and_cause(proxied_bucket, status):
    bucket, proxy = proxied_bucket
    proxy.plan = lambda method, path, number: status
    path = f"{bucket.url}/corpus/doc.md"
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(path)
    assert str(caught.value).startswith(f"reading {path}: HTTP {status}")
    attempts = [entry for entry in proxy.log if "doc.md" in entry[1]]
    assert len(attempts) == 1, "a permanent error was retried"


@pytest.mark.slow  # thousands of objects through a loopback server: not in the fast tier
def test_listing_resumes_from_its_page_after_a_fault(proxied_bucket):
    bucket, proxy = proxied_bucket
    for i in range(2100):
        bucket.put(f"corpus/doc-{i:05d}.md", b"x")
    list_requests = []

    def fail_the_second_page_twice(method, path, number):
        if method == "GET" and "prefix=corpus" in path and "maxResults=1&" not in path:  # not the readability probe
            list_requests.append(path)
            return "503" if len(list_requests) in (2, 3) else None
        return None

    proxy.plan = fail_the_second_page_twice
    listed = [d.relative for d in list_documents(f"{bucket.url}/corpus", "*.md")]
    assert listed == [f"doc-{i:05d}.md" for i in range(2100)]
    assert len(proxy.faults()) == 2
    assert list_requests[1] == list_requests[2] == list_requests[3], "the retry did not ask for the same page"
    assert len(list_requests) == 5  # three pages, two of them asked again


@pytest.mark.slow  # thousands of objects through a loopback server: not in the fast tier
def test_a_manifest_of_five_thousand_objects_pages_through_the_bucket(tmp_path, monkeypatch):
    """Listing at scale: 5,000 objects, 5 pages of the API's 1,000, streamed into the manifest.
    (How flat its memory stays is measured in benchmarks/manifest_memory.py.)"""
    import pyarrow.parquet as pq

    from storage_servers import preloaded_gcs

    server = preloaded_gcs(tmp_path / "gcs", 5_000)
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        storage.forget_clients()
        manifest = tmp_path / "manifest.parquet"
        assert write_manifest("gs://big/corpus", "*.md", 1000, str(manifest)) == 5_000
        table = pq.read_table(manifest)
        paths = table.column("path").to_pylist()
        assert paths == sorted(paths) and len(set(table.column("doc_id").to_pylist())) == 5_000
        assert table.column("shard").to_pylist() == [i // 1000 for i in range(5_000)]
    finally:
        server.stop()
        storage.forget_clients()


def test_s3_without_conditional_writes_falls_back_to_check_then_put(s3_server, monkeypatch, fast_retries):
    proxy = FaultProxy(s3_server.port)
    try:
        bucket = Bucket("s3", s3_server, monkeypatch, url=proxy.url)
        proxy.plan = lambda method, path, number: "501" if method == "PUT" and number == 1 else None
        dest = f"{bucket.url}/out/shards/shard-000000.parquet"
        assert publish(dest, b"first") is True
        assert publish(dest, b"second") is False
        assert bucket.get("out/shards/shard-000000.parquet") == b"first"
        first = storage.version(dest)  # a compare-and-swap checks the version, then puts
        assert swap(dest, b"replaced", first) is True and swap(dest, b"late", first) is False
        assert bucket.get("out/shards/shard-000000.parquet") == b"replaced"
        assert [fault for _, _, fault in proxy.faults()] == ["501"]
    finally:
        proxy.stop()
        storage.forget_clients()


def test_a_large_shard_is_published_whole_and_exactly_once(bucket):
    """Over 8 MB google-cloud-storage switches to a resumable upload; the precondition
    and the one-object-or-none guarantee must hold there too."""
    import os as _os

    data = _os.urandom(20 * 2**20)
    dest = f"{bucket.url}/out/shards/shard-000042.parquet"
    assert publish(dest, data) is True
    assert publish(dest, b"late writer") is False
    assert bucket.get("out/shards/shard-000042.parquet") == data
    reader = storage.open_for_reading(dest)
    reader.seek(-16, 2)
    assert reader.read() == data[-16:]
