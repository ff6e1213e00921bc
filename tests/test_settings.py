"""Every setting is declared once (pipeline/settings.py), and everything that names one is
derived from that declaration or checked against it: the Luigi parameters, the command
line, the pods' environment, .env.example, the README's tables and luigi.cfg."""

import configparser
import re

import luigi
import pytest

from helpers import ROOT
from pipeline import config, settings
from pipeline.settings import SETTINGS, Setting


def test_the_readme_tables_and_env_example_say_what_the_declaration_says():
    """Written by ``python -m pipeline settings --write-docs``: edit pipeline/settings.py
    and run it, never the files by hand."""
    assert (ROOT / ".env.example").read_text() == settings.env_example()
    readme = (ROOT / "README.md").read_text()
    assert readme == settings.readme_with_tables(readme)
    for group in ("run", "runpod"):
        assert settings.markdown_table(group) in readme, f"the README has no table of the {group} settings"


def test_every_pipeline_variable_in_env_example_is_declared():
    named = set(re.findall(r"^#? ?(PIPELINE_[A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert named == {setting.env for setting in SETTINGS if setting.env}


def test_luigi_cfg_sets_no_setting_the_declaration_does_not_know():
    """A ``[pipeline]`` section is allowed (it outranks the defaults), but a misspelt
    name there would be ignored silently."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "luigi.cfg")
    if parser.has_section("pipeline"):
        assert set(parser.options("pipeline")) <= set(config.DEFAULTS)


@pytest.mark.parametrize("family", ["EmbedAll", "RunpodEmbedAll"])
def test_each_parameter_is_a_declared_setting_with_its_type_and_help(family):
    task = luigi.task_register.Register.get_task_cls(family)
    parameters = dict(task.get_params())
    groups = ("run",) if family == "EmbedAll" else ("run", "runpod")
    declared = {setting.parameter or setting.name: setting for setting in SETTINGS
                if setting.group in groups and setting.flag}
    assert set(parameters) == set(declared)
    for name, parameter in parameters.items():
        setting = declared[name]
        assert parameter.description == setting.help, name
        assert parameter.parse(setting.default) == setting.parse(setting.default), name
        if not setting.flag_only:
            assert parameter._setting == setting.name, name  # its default is read from this setting


def test_the_cli_takes_its_defaults_from_the_settings(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("PIPELINE_PRECISION", "bfloat16")
    seen = {}
    monkeypatch.setattr("pipeline.bench.bench", lambda *args: seen.setdefault("args", args) and "")
    main(["bench", "--corpus", "unused"])
    assert seen["args"][4] == "bfloat16"  # --precision: the setting, from the environment
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert settings.declared("precision").help.split(";")[0] in " ".join(capsys.readouterr().out.split())


SETTING_READ = re.compile(r"""(environ|env)(\.get\(|\[|\.setdefault\()\s*f?["']PIPELINE_""")


def test_nothing_reads_a_pipeline_variable_past_the_declaration():
    offenders = [f"{path.relative_to(ROOT)}:{number}" for path in sorted((ROOT / "pipeline").rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if SETTING_READ.search(line)]
    assert offenders == []


def test_a_new_setting_reaches_the_pods_without_touching_the_launcher(monkeypatch, tmp_path):
    """One declaration plus its parameter: the launcher sends it, a pod's worker reads it."""
    from pipeline import EmbedAll, RunpodEmbedAll

    colour = Setting("colour", str, "blue", "a setting that does not exist yet", to_pods=True)
    monkeypatch.setattr(settings, "SETTINGS", settings.SETTINGS + (colour,))
    monkeypatch.setitem(settings.BY_NAME, "colour", colour)
    monkeypatch.setitem(config.DEFAULTS, "colour", "blue")
    monkeypatch.setattr("pipeline.runpod.pod_env.SETTINGS", settings.SETTINGS)
    monkeypatch.setattr("pipeline.runpod.launcher.SETTINGS", settings.SETTINGS)

    class Launcher(RunpodEmbedAll):
        colour = config.parameter("colour")

    class Worker(EmbedAll):
        colour = config.parameter("colour")

    env = Launcher(corpus=str(tmp_path), output=str(tmp_path / "out"), image="img", colour="green").pod_env()
    assert env["PIPELINE_COLOUR"] == "green"
    monkeypatch.setenv("PIPELINE_COLOUR", env["PIPELINE_COLOUR"])
    assert Worker(output=str(tmp_path / "out")).colour == "green"


def test_settings_shows_each_value_and_where_it_came_from(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PIPELINE_DEVICE=cpu\nPIPELINE_REGISTRY_PASSWORD=hunter2\n")
    config._dotenv_values.cache_clear()
    monkeypatch.setenv("PIPELINE_DOCS_PER_SHARD", "25")
    for name in ("PIPELINE_DEVICE", "PIPELINE_PATTERN", "PIPELINE_REGISTRY_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    try:
        assert main(["settings"]) == 0
    finally:
        config._dotenv_values.cache_clear()
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["PIPELINE_DOCS_PER_SHARD"].split()[1:3] == ["'25'", "environment"]
    assert lines["PIPELINE_DEVICE"].split()[1:3] == ["'cpu'", ".env"]
    assert lines["PIPELINE_PATTERN"].split()[1:3] == ["'*.md'", "default"]
    assert "hunter2" not in lines["PIPELINE_REGISTRY_PASSWORD"] and "(set)" in lines["PIPELINE_REGISTRY_PASSWORD"]
