"""What loads a model: floors on the stack checked in one line, no checkpoint's own code
ever run, nomic's published config read in transformers' NomicBert's terms."""

import json
import re
import tomllib

import pytest

from helpers import ROOT
from pipeline.core import model_loading, nomic_layout
from pipeline.core.embedder import Embedder
from pipeline.core.profiles import PROFILES
from pipeline.errors import PipelineError

GOOD = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "sentence-transformers": "6.3.0"}


def test_the_stack_floors_are_checked_and_named_in_one_line(monkeypatch):
    assert model_loading.stack_problems((3, 11), GOOD) == []
    problems = model_loading.stack_problems((3, 10), dict(GOOD, transformers="5.4.0", torch="2.5.1"))
    assert problems == ["Python 3.10 (needs 3.11 or newer)", "torch 2.5.1 (needs 2.6 or newer)",
                        "transformers 5.4.0 (needs 5.5 or newer)"]
    monkeypatch.setattr(model_loading, "stack_problems", lambda: ["transformers 5.4.0 (needs 5.5 or newer)"])
    with pytest.raises(PipelineError) as refused:
        model_loading.check_stack()
    assert "\n" not in str(refused.value) and "pip install -U 'torch>=2.6' 'transformers>=5.5'" in str(refused.value)
    monkeypatch.setattr(model_loading, "stack_problems", lambda: ["Python 3.10 (needs 3.11 or newer)"])
    with pytest.raises(PipelineError, match=r"Python 3\.10 \(needs 3\.11 or newer\); use Python 3\.11 or newer$"):
        model_loading.check_stack()


def test_pyproject_declares_the_floors_the_loader_checks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=" + ".".join(map(str, model_loading.PYTHON_FLOOR))
    declared = dict(re.match(r"([\w-]+)>=([\d.]+)", dependency).groups() for dependency in project["dependencies"]
                    if re.match(r"[\w-]+>=", dependency))
    for package, floor in model_loading.PACKAGE_FLOORS.items():
        assert declared[package] == floor, package


def test_a_model_type_transformers_does_not_know_is_refused_with_what_to_upgrade(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "nomic_bert_9", "auto_map": {"AutoModel": "x--y.Z"}}))
    with pytest.raises(PipelineError, match=r"model_type 'nomic_bert_9', which transformers 5\.\S+ does not know, and its "
                                            r"remote code is never run: upgrade to a transformers that ships it"):
        Embedder(PROFILES["nomic"], str(folder), "cpu", 0, 4096, "float32")
    import transformers

    monkeypatch.setattr(transformers, "CONFIG_MAPPING", {"bert": None})  # a transformers before NomicBert
    with pytest.raises(PipelineError, match=r"upgrade to transformers>=5\.5 \(pip install -U 'transformers>=5\.5'\)"):
        model_loading.check_model_type(nomic_layout.PUBLISHED_CONFIG, "somewhere")


def test_nomics_published_config_is_read_in_nomicberts_terms():
    assert nomic_layout.native_config(nomic_layout.PUBLISHED_CONFIG, "x") == {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "layer_norm_eps": 1e-12, "vocab_size": 30528, "type_vocab_size": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}, "head_dim": 64}
    # A config transformers 5 saved (its own names beside nomic's) passes where they agree.
    both = dict(nomic_layout.PUBLISHED_CONFIG, num_hidden_layers=12, max_position_embeddings=2048,
                rope_parameters={"rope_theta": 1000.0, "rope_type": "default", "partial_rotary_factor": 1.0})
    native = nomic_layout.native_config(both, "x")
    assert native["num_hidden_layers"] == 12 and native["rope_parameters"]["partial_rotary_factor"] == 1.0
    # NomicBertConfig derives head_dim before the overrides reach it: another width gets its own.
    assert nomic_layout.native_config(dict(nomic_layout.PUBLISHED_CONFIG, n_embd=384), "x")["head_dim"] == 32
    from transformers import NomicBertConfig

    config = NomicBertConfig.from_dict({}, **nomic_layout.native_config(dict(nomic_layout.PUBLISHED_CONFIG, n_embd=384), "x"))
    assert (config.hidden_size, config.head_dim) == (384, 32)


@pytest.mark.parametrize("change, refusal", [
    ({"rotary_emb_fraction": 0.5}, "rotary_emb_fraction=0.5 is not what transformers' NomicBert computes"),
    ({"prenorm": True}, "prenorm=True"),
    ({"qkv_proj_bias": True}, "qkv_proj_bias=True"),
    ({"num_hidden_layers": 6}, "config.json says n_layer=12 but num_hidden_layers=6"),
    ({"rope_parameters": {"rope_theta": 10000.0}}, "rotary_emb_base=1000 but rope_parameters={'rope_theta': 10000.0}"),
    ({"n_embd": 770}, "a width of 770 does not split into 12 heads"),
])
def test_a_nomic_config_transformers_would_compute_differently_is_refused(change, refusal):
    with pytest.raises(PipelineError, match=re.escape(refusal)):
        nomic_layout.native_config(dict(nomic_layout.PUBLISHED_CONFIG, **change), "x")


def test_no_profile_runs_a_checkpoints_own_code():
    assert all(not hasattr(profile, "trust_remote_code") for profile in PROFILES.values())
    source = (ROOT / "pipeline").rglob("*.py")
    assert not [path for path in source if "trust_remote_code=True" in path.read_text()]


def test_loading_a_model_draws_no_progress_bar(capfd):
    """transformers draws a "Loading weights" bar on stderr: noise in a run's log, and in
    what ``python -m pipeline search`` answers."""
    model_loading.load_sentence_transformer(PROFILES["minilm"].locate(), "cpu")
    assert "Loading weights" not in capfd.readouterr().err
