import pytest

from helpers import SHARED_CORPUS, write_corpus


@pytest.fixture(scope="session")
def embedder():
    """The offline model, loaded once for the whole session (as a worker would)."""
    from pipeline.embedder import load_embedder

    return load_embedder("minilm", "", "cpu", 0, 16384)


@pytest.fixture
def small_corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def shared_corpus():
    if not (SHARED_CORPUS.is_dir() and any(SHARED_CORPUS.rglob("*.md"))):
        pytest.skip("../shared/corpus is not present")
    return SHARED_CORPUS
