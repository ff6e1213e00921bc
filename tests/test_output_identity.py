"""An output is defined by the settings that change its vectors or its layout: a run with
any of them changed, on a finished or a half-finished output, is refused with the setting
named, never called complete; settings that only change speed never refuse. Through
``EmbeddingInterface``, on nomic's layout (tests/conftest.py ``nomic_home``)."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

from helpers import write_corpus
from luigi.retcodes import run_with_retcodes

from pipeline import planning
from pipeline.cli import main
from pipeline.config import prepare_run
from pipeline.core.stand_in import save_stand_in
from pipeline.errors import PipelineError
from pipeline.interface import EmbeddingInterface
from pipeline.output.layout import OutputLayout
from pipeline.settings import DEFINING, SPEED_ONLY


@pytest.fixture(scope="module")
def finished(nomic_home, tmp_path_factory):
    """A finished output of six documents in three shards, and how it was made."""
    root = tmp_path_factory.mktemp("identity")
    corpus = write_corpus(root / "corpus", documents=6, words=60)
    settings = dict(corpus=str(corpus), docs_per_shard=2, model="nomic", model_path=nomic_home.snapshot, device="cpu",
                    precision="float32")
    api = EmbeddingInterface(root / "out", **settings)
    api.resume_from_checkpoint(api.get_checkpoint())
    return root, settings


def other_weights(root):
    return save_stand_in(str(root / "other-weights"), "nomic", layers=2, seed=1, marked=False)


CHANGES = [  # (setting, its value now, what the refusal says)
    ("docs_per_shard", lambda root: 3, "docs_per_shard: 2 in the output, 3 now"),
    ("pattern", lambda root: "*.markdown", "pattern: '*.md' in the output, '*.markdown' now"),
    ("corpus", lambda root: str(write_corpus(root / "another-corpus", documents=2, words=40)), "corpus: "),
    ("model", lambda root: "minilm", "model: 'nomic' in the output, 'minilm' now"),
    ("model_path", other_weights, "model_path: "),
    ("max_tokens", lambda root: 256, "max_tokens: 0 in the output, 256 now"),
    ("dimensions", lambda root: 256, "dimensions: 0 in the output, 256 now"),
    ("vector_dtype", lambda root: "float16", "vector_dtype: 'float32' in the output, 'float16' now"),
    ("compact_columns", lambda root: "binary", "compact_columns: '' in the output, 'binary' now"),
    ("skip_duplicates", lambda root: True, "skip_duplicates: False in the output, True now"),
]


def test_every_defining_setting_is_changed_by_a_test():
    assert {change[0] for change in CHANGES} == set(DEFINING)


def copy_of(root, tmp_path, half_finished):
    """A copy of the finished output; half-finished: without its summary and last shard."""
    output = tmp_path / "out"
    shutil.copytree(root / "out", output)
    if half_finished:
        layout = OutputLayout.of(str(output))
        for path in (layout.summary, layout.shard(2)):
            Path(path).unlink()
    return output


def changed_settings(root, settings, setting, value):
    changed = {**settings, setting: value(root)}
    if setting == "model":
        changed["model_path"] = ""
    return changed


def files_of(output):
    return sorted((path.relative_to(output).as_posix(), path.stat().st_mtime_ns) for path in output.rglob("*"))


def run_with(output, settings):
    api = EmbeddingInterface(output, **settings)
    return api.resume_from_checkpoint(api.get_checkpoint())


@pytest.mark.parametrize("half_finished", [False, True], ids=["finished", "half-finished"])
@pytest.mark.parametrize("setting, value, refusal", CHANGES, ids=[change[0] for change in CHANGES])
def test_a_changed_defining_setting_is_refused_with_the_setting_named(finished, tmp_path, setting, value, refusal,
                                                                      half_finished):
    root, settings = finished
    output = copy_of(root, tmp_path, half_finished)
    before = files_of(output)
    with pytest.raises(PipelineError, match="made with other settings") as refused:
        run_with(output, changed_settings(root, settings, setting, value))
    assert refusal in str(refused.value) and "use a new --output" in str(refused.value)
    assert files_of(output) == before, "the output was changed"


def luigi_flags(settings: dict) -> list[str]:
    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            flags += [f"--{name.replace('_', '-')}"] if value else []
        else:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


@pytest.mark.parametrize("half_finished", [False, True], ids=["finished", "half-finished"])
@pytest.mark.parametrize("setting, value, refusal", CHANGES, ids=[change[0] for change in CHANGES])
def test_the_luigi_command_exits_30_with_one_line_naming_the_setting(finished, tmp_path, caplog, setting, value, refusal,
                                                                     half_finished):
    """``luigi --module pipeline EmbedAll …`` as a user types it, in this process (the same
    command-line parsing, scheduling and exit codes; no interpreter to start per case).
    ``--no-lock``: Luigi's process lock would see pytest's other workers, which share this
    command line, as the same command already running."""
    root, settings = finished
    output = copy_of(root, tmp_path, half_finished)
    before = files_of(output)
    prepare_run()
    planning.forget_plans()
    with pytest.raises(SystemExit) as exit:
        run_with_retcodes(["--module", "pipeline", "EmbedAll", "--local-scheduler", "--no-lock", "--output", str(output),
                           *luigi_flags(changed_settings(root, settings, setting, value))])
    assert exit.value.code == 30
    refusals = [record.getMessage() for record in caplog.records if "made with other settings" in record.getMessage()]
    assert refusals and refusal in refusals[0] and "\n" not in refusals[0], refusals
    assert files_of(output) == before, "the output was changed"


SPEED_CHANGES = [("precision", "bfloat16"), ("batch_tokens", 1024), ("readers", 0), ("device", "auto")]


def test_every_setting_that_only_changes_speed_is_tried():
    assert {change[0] for change in SPEED_CHANGES} == set(SPEED_ONLY)


@pytest.mark.parametrize("setting, value", SPEED_CHANGES)
def test_a_setting_that_only_changes_speed_never_refuses(finished, tmp_path, setting, value):
    root, settings = finished
    output = tmp_path / "out"
    shutil.copytree(root / "out", output)
    assert run_with(output, {**settings, setting: value}).finished


def test_following_the_refusals_compact_hint_gives_an_output_the_changed_run_calls_done(finished, tmp_path, caplog):
    root, settings = finished
    output = copy_of(root, tmp_path, half_finished=False)
    changed = {**settings, "vector_dtype": "float16", "compact_columns": "binary"}
    with pytest.raises(PipelineError) as refused:
        run_with(output, changed)
    command = re.search(r"python -m pipeline (compact \S+ NEW_OUTPUT(?: --[a-z-]+ '[^']*')+)", str(refused.value)).group(1)
    converted = tmp_path / "converted"
    assert main(shlex.split(command.replace("NEW_OUTPUT", str(converted)))) == 0
    before = files_of(converted)
    assert run_with(converted, changed).finished
    assert files_of(converted) == before, "a converted output was embedded again"
