"""Planning a run before Luigi schedules it (pipeline/planning.py): the manifest written
or grown, the shard count, and one plan per build however often Luigi asks."""

import pytest

from helpers import write_corpus
from pipeline import EmbedAll
from pipeline.core.corpus import manifest_info
from pipeline.errors import PipelineError
from pipeline.planning import forget_plans, plan_run, planned


@pytest.fixture(autouse=True)
def fresh_plans():
    forget_plans()
    yield
    forget_plans()


def run(corpus, output, **extra):
    return EmbedAll(corpus=str(corpus), output=str(output), docs_per_shard=3, device="cpu", **extra)


def test_a_plan_writes_the_missing_manifest_and_counts_its_shards(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=7)
    plan = plan_run(run(corpus, tmp_path / "out"))
    assert plan.shards == 3 and manifest_info(str(tmp_path / "out" / "manifest.parquet"))["documents"] == "7"


def test_new_documents_are_added_only_when_asked(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=6)
    output = tmp_path / "out"
    assert plan_run(run(corpus, output)).shards == 2
    write_corpus(tmp_path / "corpus", documents=9)  # three more
    assert plan_run(run(corpus, output)).shards == 2
    assert plan_run(run(corpus, output, add_new_documents=True)).shards == 3


def test_one_plan_per_build_however_often_luigi_asks(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=6)
    output = tmp_path / "out"
    task = run(corpus, output, add_new_documents=True)
    first = planned(task)
    write_corpus(tmp_path / "corpus", documents=9)  # grown while the build runs: not this build's shards
    assert planned(task) == first and len(task.requires()) == 1 + first.shards
    forget_plans()
    assert planned(task).shards == 3


def test_a_plan_refuses_an_output_listed_from_another_corpus(tmp_path):
    output = tmp_path / "out"
    plan_run(run(write_corpus(tmp_path / "a", documents=3), output))
    with pytest.raises(PipelineError, match="corpus"):
        plan_run(run(write_corpus(tmp_path / "b", documents=3), output))
    assert run(tmp_path / "b", output).requires().task_family == "CorpusManifest"  # the manifest task says why
