"""The container tests' engine cache (tests/docker_engine.py): one session holds it at a
time, ``off`` turns it off, and the registry's kept place starts over when its port is
taken or its storage has grown too large. No engine is started here."""

import socket

import pytest

from docker_engine import EngineCache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_DOCKER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_one_session_holds_the_cache_and_the_next_gets_it_once_released(cache_dir):
    first = EngineCache.claim()
    assert first is not None and first.folder == cache_dir
    assert EngineCache.claim() is None, "a second session beside the first must start from nothing"
    first.release()
    again = EngineCache.claim()
    assert again is not None
    again.release()


def test_off_means_no_cache(monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_DOCKER_CACHE", "off")
    assert EngineCache.claim() is None


def test_the_registry_keeps_its_port_and_layers_while_it_can(cache_dir):
    cache = EngineCache.claim()
    try:
        storage, port = cache.registry_place()
        (storage / "blobs").mkdir(parents=True)
        (storage / "blobs" / "layer").write_bytes(b"x" * 1000)
        assert cache.registry_place() == (storage, port)
        assert (storage / "blobs" / "layer").exists()

        _, new_port = cache.registry_place(most_bytes=999)  # grown too large: starts over
        assert not storage.exists()

        with socket.socket() as taker:  # the port is taken: another one, and empty storage
            taker.bind(("127.0.0.1", new_port))
            (storage / "blobs").mkdir(parents=True)
            (storage / "blobs" / "layer").write_bytes(b"x")
            storage_after, port_after = cache.registry_place()
            assert port_after != new_port and not storage_after.exists()
    finally:
        cache.release()
