"""Run settings: importing the package changes nothing; a task's defaults are read when it
is made, from the environment, .env, luigi.cfg and the built-in defaults, in that order."""

import subprocess
import sys

from helpers import ROOT, luigi_env

IMPORT_EVERYTHING = """
import importlib, json, logging, os, pkgutil, sys
import luigi, luigi.configuration

config = luigi.configuration.get_config()
def snapshot():
    return {
        "environment": dict(os.environ),
        "luigi config": {section: dict(config.items(section)) for section in config.sections()},
        "logging filters": [len(logging.getLogger(name).filters) for name in ("luigi", "luigi-interface")],
        "handlers on every luigi.Task": repr(luigi.Task._event_callbacks.get(luigi.Task)),
    }
before = snapshot()
import pipeline
for module in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    if module.name != "pipeline.__main__":
        importlib.import_module(module.name)
after = snapshot()
changed = {key: [before[key], after[key]] for key in before if before[key] != after[key]}
print(json.dumps({"modules": len(sys.modules), "changed": changed}))
"""


def test_importing_every_module_changes_no_environment_config_or_logging(tmp_path):
    """With a .env and a luigi.cfg beside it, as in the repository: nothing is loaded,
    set or registered until a run starts."""
    (tmp_path / ".env").write_text("PIPELINE_CORPUS=/from/dotenv\nA_SECRET_FROM_DOTENV=canary\n")
    (tmp_path / "luigi.cfg").write_text((ROOT / "luigi.cfg").read_text())
    env = {k: v for k, v in luigi_env(PYTHONPATH=str(ROOT)).items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")}
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    report = json.loads(result.stdout.splitlines()[-1])
    assert report["changed"] == {}
    assert report["modules"] > 100  # the imports did happen


def test_defaults_are_read_when_a_task_is_made(monkeypatch, tmp_path):
    from pipeline import EmbedAll, RunpodEmbedAll

    monkeypatch.chdir(tmp_path)  # no .env here
    params = dict(RunpodEmbedAll.get_params())
    assert params["spot"].task_value("RunpodEmbedAll", "spot") is False
    monkeypatch.setenv("PIPELINE_SPOT", "yes")
    monkeypatch.setenv("PIPELINE_MAX_DOLLARS", "2.5")
    monkeypatch.setenv("PIPELINE_POD_MODEL", "minilm")
    assert params["spot"].task_value("RunpodEmbedAll", "spot") is True
    assert params["max_dollars"].task_value("RunpodEmbedAll", "max_dollars") == 2.5
    assert params["model"].task_value("RunpodEmbedAll", "model") == "minilm"  # the pod_model setting
    monkeypatch.setenv("PIPELINE_DOCS_PER_SHARD", "17")
    assert EmbedAll(output=str(tmp_path / "out")).docs_per_shard == 17
    assert EmbedAll(output=str(tmp_path / "out"), docs_per_shard=3).docs_per_shard == 3  # given beats the setting
