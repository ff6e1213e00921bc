"""The pod's container: the Dockerfile lints clean, secrets stay out of the build
context, and the image is tagged with exactly the revision it holds."""

import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, luigi_env
from pipeline.runpod.image import build_context, image_reference, revision


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "containers" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_secrets_and_local_state_stay_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".env", ".venv", ".git", "output", "var"):
        assert path in ignored


def test_the_default_build_context_is_this_checkout():
    """``make image`` and a launcher without ``--image`` pass no root: the context must
    still hold the Dockerfile and the package it copies."""
    import tarfile

    with build_context() as context, tarfile.open(fileobj=context) as tar:
        names = set(tar.getnames())
    assert {"containers/Dockerfile", "pyproject.toml", "pipeline/__init__.py", "pipeline/runpod/watchdog.py"} <= names
    assert not any(name.startswith((".git/", ".venv/", "tests/")) for name in names)


def test_the_dockerfile_runs_the_watchdog_and_proves_the_model_loads_offline():
    """The full proof is tests/runpod/test_container_engine.py; this holds where no engine runs."""
    dockerfile = (ROOT / "containers" / "Dockerfile").read_text()
    assert dockerfile.rstrip().endswith('ENTRYPOINT ["python", "-m", "pipeline.runpod.watchdog"]')
    assert "ARG BASE_IMAGE=" in dockerfile
    assert "einops" not in dockerfile and "trust_remote_code" not in dockerfile
    offline = dockerfile.index("HF_HUB_OFFLINE=1")
    assert dockerfile.index("model --fetch") < offline < dockerfile.index('RUN python -m pipeline model "${PIPELINE_MODEL}"')


def test_the_tests_stand_in_base_has_the_default_bases_python_and_torch():
    """The image tests run on a stand-in base (tests/docker_engine.py) made from the
    Dockerfile's defaults; this machine's torch, the Makefile's pin and the floors the
    model loader checks must agree with them, or the tests would prove another stack."""
    import re

    from docker_engine import BASE_PYTHON, BASE_TORCH, BASE_TAG
    from packaging.version import Version

    from pipeline.core.model_loading import PACKAGE_FLOORS, PYTHON_FLOOR
    from pipeline.runpod.image import dockerfile_defaults

    defaults = dockerfile_defaults()
    assert defaults["BASE_IMAGE"].startswith(f"python:{BASE_PYTHON}") and BASE_TORCH == defaults["TORCH_VERSION"]
    assert f"python{BASE_PYTHON}-torch{BASE_TORCH}" in BASE_TAG
    [pinned] = re.findall(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    import torch

    assert pinned == BASE_TORCH == torch.__version__.split("+")[0], "make setup's torch is not the image's"
    assert tuple(map(int, BASE_PYTHON.split("."))) >= PYTHON_FLOOR and Version(BASE_TORCH) >= Version(PACKAGE_FLOORS["torch"])


@pytest.mark.slow  # the model loaded in two subprocesses: not in the fast tier
def test_the_model_check_loads_a_profile_offline_or_says_what_is_missing(tmp_path):
    env = luigi_env(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "pipeline", "model", "minilm"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and '"dimension": 384' in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "-m", "pipeline", "model", "nomic", "--fetch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "the hub is off: run with HF_HUB_OFFLINE=0" in result.stderr


def test_the_image_tag_is_the_git_revision_marked_dirty_when_changed(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("one")
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert revision(tmp_path) == head
    assert image_reference("ghcr.io/you/", tmp_path) == f"ghcr.io/you/embedding-pipeline:{head}"
    (tmp_path / "a.txt").write_text("two")
    assert revision(tmp_path) == f"{head}-dirty"


def test_make_image_without_a_registry_or_engine_says_what_is_missing(tmp_path):
    env = luigi_env(HOME=str(tmp_path), DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    env.pop("PIPELINE_REGISTRY", None)
    result = subprocess.run([sys.executable, "-m", "pipeline", "image"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "PIPELINE_REGISTRY is not set" in result.stderr
    env["PIPELINE_REGISTRY"] = "registry.local:5000/team"
    result = subprocess.run([sys.executable, "-m", "pipeline", "image"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "no Docker engine reachable" in result.stderr
