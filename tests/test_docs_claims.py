"""What the docs say about settings and commands, checked against the code: a reviewer
found such claims false or stale wherever no test held them."""

import re

import pytest

from helpers import ROOT
from pipeline.core.shard_file import SHARED_SETTINGS
from pipeline.settings import DEFINING, SETTINGS, SPEED_ONLY

ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
API = (ROOT / "docs" / "api.md").read_text()


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_0-9]+)`", text))


def paragraph(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_architecture_lists_every_command(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    commands = set(re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out).group(1).split(","))
    listed = paragraph(ARCHITECTURE, "are `python -m pipeline …`:", ";")
    assert {word.strip() for word in listed.split(",")} == commands


def test_architecture_lists_the_settings_that_define_an_output_and_those_that_do_not():
    assert backticked(paragraph(ARCHITECTURE, "(`settings.DEFINING`:", ")")) == set(DEFINING)
    assert backticked(paragraph(ARCHITECTURE, "(`SPEED_ONLY`:", ")")) == set(SPEED_ONLY)


def test_architecture_lists_what_a_shard_records_and_every_shard_must_share():
    listed = paragraph(ARCHITECTURE, "made is compared with what this run would make:", "(`SHARED_SETTINGS`")
    assert backticked(listed) == set(SHARED_SETTINGS)


def test_api_lists_the_settings_an_embedding_interface_takes():
    run_settings = {s.name for s in SETTINGS if s.group == "run" and not s.flag_only} - {"corpus", "output"}
    listed = paragraph(API, "One output and the settings that make it", "Unset ones")
    assert backticked(listed) == run_settings
