"""What credentials a pod receives: the pod's own scoped ones first, only for the kinds of
bucket the run uses, and never the launcher's without a warning."""

import logging

import pytest

from pipeline import RunpodEmbedAll
from pipeline.errors import PipelineError

LAUNCHER_KEY = '{"type": "service_account", "client_email": "launcher-owner@example.invalid"}'
POD_KEY = '{"type": "service_account", "client_email": "pod-two-buckets@example.invalid"}'


@pytest.fixture
def keys(tmp_path, monkeypatch, gcs_server, s3_server):
    """Launcher credentials set; buckets reachable on the loopback servers."""
    import pipeline.storage

    for key, value in {**gcs_server.env(), **s3_server.env()}.items():
        monkeypatch.setenv(key, value)
    pipeline.storage.forget_clients()
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"PIPELINE_POD_{name}", raising=False)
    (tmp_path / "launcher.json").write_text(LAUNCHER_KEY)
    (tmp_path / "pod.json").write_text(POD_KEY)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "launcher.json"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "LAUNCHERKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "launcher-secret")
    yield tmp_path
    pipeline.storage.forget_clients()


def pod_env(corpus, output):
    return RunpodEmbedAll(corpus=corpus, output=output, image="img").pod_env()


def values(env):
    return "\n".join(env.values())


def test_the_pods_own_google_key_is_sent_instead_of_the_launchers(keys, monkeypatch, caplog):
    monkeypatch.setenv("PIPELINE_POD_GOOGLE_APPLICATION_CREDENTIALS", str(keys / "pod.json"))
    with caplog.at_level(logging.WARNING):
        env = pod_env("gs://corpus-bucket/md", "gs://output-bucket/run")
    assert env["GOOGLE_CREDENTIALS_JSON"] == POD_KEY
    assert "launcher-owner" not in values(env)
    assert "AWS_ACCESS_KEY_ID" not in env and "launcher-secret" not in values(env)  # no s3:// in this run
    assert "launcher's own" not in caplog.text


def test_without_a_pod_key_the_launchers_is_sent_with_a_warning(keys, caplog):
    with caplog.at_level(logging.WARNING):
        env = pod_env("gs://corpus-bucket/md", "gs://output-bucket/run")
    assert env["GOOGLE_CREDENTIALS_JSON"] == LAUNCHER_KEY
    assert "PIPELINE_POD_GOOGLE_APPLICATION_CREDENTIALS" in caplog.text
    assert "launcher-owner" not in caplog.text  # the key itself is never logged


def test_s3_gets_the_pods_own_keys_and_only_when_a_bucket_is_s3(keys, monkeypatch):
    monkeypatch.setenv("PIPELINE_POD_AWS_ACCESS_KEY_ID", "PODKEYID")
    monkeypatch.setenv("PIPELINE_POD_AWS_SECRET_ACCESS_KEY", "pod-secret")
    env = pod_env("s3://corpus-bucket/md", "gs://output-bucket/run")
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("PODKEYID", "pod-secret")
    assert "launcher-secret" not in values(env) and "LAUNCHERKEYID" not in values(env)
    assert "GOOGLE_CREDENTIALS_JSON" in env


def test_a_run_without_buckets_sends_no_credentials(keys, tmp_path):
    env = pod_env(str(tmp_path / "corpus"), str(tmp_path / "out"))
    assert not {"GOOGLE_CREDENTIALS_JSON", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert "RUNPOD_API_KEY" not in env  # Runpod gives each pod a key of its own


def test_a_missing_pod_key_file_is_a_clear_error(keys, monkeypatch):
    monkeypatch.setenv("PIPELINE_POD_GOOGLE_APPLICATION_CREDENTIALS", str(keys / "missing.json"))
    with pytest.raises(PipelineError, match="missing.json does not exist"):
        pod_env("gs://corpus-bucket/md", "gs://output-bucket/run")
