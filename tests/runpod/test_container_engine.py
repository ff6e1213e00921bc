"""The pod's image for real, on a Docker engine started here: ``make image``'s build and
push, then RunpodEmbedAll against the fake Runpod API whose pods are real containers of
that image (CPU, the offline model, buckets on the GCS server on loopback), so the
image, its entrypoint, the watchdog and teardown all run as they would on Runpod.

The engine, the registry and the image are the session's (tests/conftest.py): the
image is built once, from a copy of the checkout with fake secrets planted in it,
and tests/test_secrets.py scans its layers.

Skipped, with the reason, where no engine can start (.ci/run installs one)."""

import shutil

import luigi
import pytest

from fake_runpod import FakeRunpod, assert_no_pod_billed
from helpers import write_corpus
from pipeline import RunpodEmbedAll
from pipeline.runpod.image import IMAGE_NAME, build_and_push, revision

# Building the image takes minutes (on vfs storage, where every layer is a full copy, ten or more);
# the first of these tests in a session builds it.
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(3000)]


@pytest.fixture
def fake(engine, image, monkeypatch, tmp_path):
    from docker_engine import DockerContainers

    runtime = DockerContainers(engine.client, image, {"PIPELINE_WATCHDOG_CHECK_SECONDS": "0.5"})
    api = FakeRunpod(provisioning_seconds=0.1, pod_runtime=runtime)
    for key, value in {"RUNPOD_API_BASE_URL": api.url, "RUNPOD_API_KEY": api.api_key, "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    yield api
    try:
        assert_no_pod_billed(api, timeout=300)
    finally:
        api.stop()
        for container in engine.client.containers.list(all=True):
            container.remove(force=True)


def test_make_image_pushes_the_revision_tag_to_the_registry(image, registry, planted_checkout):
    tag = revision(planted_checkout)  # the checkout it was built from
    assert image == f"{registry.address}/{registry.namespace}/{IMAGE_NAME}:{tag}"
    assert tag in registry.tags(f"{registry.namespace}/{IMAGE_NAME}")


def test_a_change_to_the_code_rebuilds_without_installing_the_dependencies_again(engine, image, planted_checkout,
                                                                               tmp_path, monkeypatch):
    """The Dockerfile installs the dependencies from pyproject.toml before it copies the
    code, so a rebuild after a code change takes that layer (about 1 GB) from the build
    cache: it is neither installed nor pushed nor pulled again."""
    from docker_engine import BASE_TAG

    changed = tmp_path / "checkout"
    shutil.copytree(planted_checkout, changed, symlinks=True)
    module = changed / "pipeline" / "__init__.py"
    module.write_text(module.read_text() + "\n# a change to the code\n")
    monkeypatch.setenv("DOCKER_HOST", engine.url)
    rebuilt = build_and_push("127.0.0.1:1/team", base_image=BASE_TAG, push=False, model="minilm", network_mode="host",
                             root=changed)
    try:
        def dependencies_step(reference):
            [step] = [step for step in engine.client.images.get(reference).history() if "requirements.txt" in step["CreatedBy"]]
            return step

        before, after = dependencies_step(image), dependencies_step(rebuilt)
        assert after["Id"] == before["Id"] != "<missing>", "the dependencies were installed again"
        assert after["Size"] > 100_000_000
        assert engine.client.images.get(rebuilt).id != engine.client.images.get(image).id, "the code change is not in it"
    finally:
        engine.client.images.remove(rebuilt, force=True)


def run_on_a_pod(gcs_bucket, tmp_path, image):
    gcs_bucket.upload_folder(write_corpus(tmp_path / "corpus", documents=9, words=200), "corpus")
    task = RunpodEmbedAll(corpus=f"{gcs_bucket.url}/corpus", output=f"{gcs_bucket.url}/out", docs_per_shard=3,
                          image=image, model="minilm", poll_seconds=0.5)
    return luigi.build([task], local_scheduler=True, log_level="WARNING")


def test_a_run_on_a_real_container_embeds_into_the_bucket_and_the_pod_ends(fake, gcs_bucket, tmp_path, image):
    assert run_on_a_pod(gcs_bucket, tmp_path, image)
    assert [k for k in gcs_bucket.keys("out/shards/") if k.endswith(".parquet")] == [
        f"out/shards/shard-{n:06d}.parquet" for n in range(3)]
    assert "out/_SUCCESS.json" in gcs_bucket.keys("out/")
    [pod_id] = fake.pods
    assert "EmbedShard" in fake.pod_runtime.logs(pod_id)  # the container did the work, not the launcher


def test_a_failure_in_the_container_ends_its_pod_and_fails_the_launcher(fake, gcs_bucket, tmp_path, image):
    fake.pod_runtime.base_env["PIPELINE_MODEL_PATH"] = "/no/model/here"
    assert not run_on_a_pod(gcs_bucket, tmp_path, image)
    [pod_id] = fake.pods
    logs = fake.pod_runtime.logs(pod_id)
    assert "cannot load model" in logs and "watchdog: work ended (the work failed (exit code" in logs
    assert "out/_SUCCESS.json" not in gcs_bucket.keys("out/")


def test_the_entrypoint_exits_non_zero_when_the_work_fails(engine, image, tmp_path):
    """Outside a pod (no RUNPOD_POD_ID) nothing kills the container, so its exit code shows."""
    container = engine.client.containers.run(
        image, environment={"PIPELINE_CORPUS": "/no/corpus/here", "PIPELINE_OUTPUT": "/tmp/out"}, network_mode="host", detach=True)
    try:
        assert container.wait(timeout=300)["StatusCode"] != 0
        assert "corpus" in container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


def test_the_image_has_the_default_bases_python_and_torch_and_nomic_baked_in_and_checked(engine, image):
    """The image build baked nomic's published layout (a stand-in of one layer: no hub
    here) into the hub cache and ran production's check on it; a container of the image
    loads it offline, on the Python and torch the Dockerfile's default base carries."""
    from docker_engine import BASE_PYTHON, BASE_TORCH

    def run(*command):
        return engine.client.containers.run(image, entrypoint=list(command), network_mode="none", remove=True,
                                            stderr=True).decode(errors="replace")

    checked = run("sh", "-c", "python -c \"import sys, torch; print('%d.%d' % sys.version_info[:2], torch.__version__)\" "
                              "&& python -m pipeline model nomic")
    python, torch_version = checked.splitlines()[0].split()
    assert python == BASE_PYTHON and torch_version.split("+")[0] == BASE_TORCH
    assert '"model_id": "nomic-ai/nomic-embed-text-v1.5", "dimension": 768' in checked
    assert "is a stand-in for nomic-ai/nomic-embed-text-v1.5" in checked  # marked: its vectors are refused downstream
    built = engine.client.images.get(image)
    assert "PIPELINE_MODEL=nomic" in built.attrs["Config"]["Env"]
    steps = [step["CreatedBy"] for step in built.history()]
    assert any(step.rstrip().endswith('python -m pipeline model "${PIPELINE_MODEL}"') for step in steps), steps
