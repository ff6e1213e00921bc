"""``make image``: build this project's container and push it, tagged with the git revision.

The registry comes from ``PIPELINE_REGISTRY`` (for example ``ghcr.io/you``); log in
with ``docker login`` first, or set ``PIPELINE_REGISTRY_USERNAME`` and
``PIPELINE_REGISTRY_PASSWORD``. Secrets are never build arguments: they cannot end
up in the image's layers or history.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from pipeline import config
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.image")
# The checkout: containers/Dockerfile and what it copies are found from here.
ROOT = Path(__file__).resolve().parents[2]
IMAGE_NAME = "embedding-pipeline"
DOCKERFILE = "containers/Dockerfile"


def revision(root: Path = ROOT) -> str:
    """The short git revision, with ``-dirty`` when the working tree has changes, so a
    tag always names exactly what is in the image."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        short = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        raise PipelineError(f"cannot read the git revision to tag the image: {exc}") from exc
    return f"{short}-dirty" if dirty else short


def image_reference(registry: str, root: Path = ROOT) -> str:
    if not registry:
        raise PipelineError("PIPELINE_REGISTRY is not set: name the registry to push to (for example ghcr.io/you) in .env")
    return f"{registry.rstrip('/')}/{IMAGE_NAME}:{revision(root)}"


def dockerfile_defaults(dockerfile: Path = ROOT / DOCKERFILE) -> dict[str, str]:
    """The Dockerfile's ``ARG NAME=default`` values: its base image and torch, which the
    tests' stand-in base must match."""
    defaults = {}
    for line in dockerfile.read_text().splitlines():
        words = line.split(maxsplit=1)
        if len(words) == 2 and words[0].upper() == "ARG" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            defaults[name] = value.strip()
    return defaults


def copied_paths(dockerfile: Path) -> list[str]:
    """What the Dockerfile's ``COPY`` lines take from the build context."""
    paths = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY" and not any(word.startswith("--from") for word in words):
            paths += [word for word in words[1:-1] if not word.startswith("--")]
    return paths


def build_context(root: Path = ROOT):
    """The tar the engine builds from (a temporary file), made as the docker SDK makes
    it for ``docker build``, but holding only what the Dockerfile copies, less what
    ``.dockerignore`` leaves out: ``.env``, ``.git``, local state or a key file left in
    the checkout never reach the engine."""
    from docker import utils

    ignore = root / ".dockerignore"
    lines = [line.strip() for line in (ignore.read_text().splitlines() if ignore.exists() else [])]
    ignored = [line for line in lines if line and not line.startswith("#")]
    exclude = ["*", *(f"!{path}" for path in copied_paths(root / DOCKERFILE)), *ignored]
    return utils.tar(str(root), exclude=exclude, dockerfile=(DOCKERFILE, None))


def build_and_push(registry: str, base_image: str = "", push: bool = True, model: str = "nomic", network_mode: str | None = None,
                   root: Path = ROOT, stand_in_layers: int = 0) -> str:
    """Build containers/Dockerfile with the docker SDK, push it, return the reference.

    Args:
        registry: where to push (for example ``ghcr.io/you``); the image is named under it.
        base_image: the Dockerfile's ``BASE_IMAGE``; empty keeps its default (``dockerfile_defaults``).
        push: False builds only.
        model: the profile whose weights are baked in.
        network_mode: the build steps' network (``host`` where the engine has no bridge
            network).
        root: the checkout to build (its git revision tags the image).
        stand_in_layers: above 0, bake a stand-in of that many layers in the model's
            published layout instead of its weights (random: for throughput, and tests)."""
    import docker
    from docker.errors import APIError, BuildError, DockerException

    reference = image_reference(registry, root)
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        raise PipelineError(f"no Docker engine reachable (is dockerd running? DOCKER_HOST?): {exc}") from exc
    build_args = {"PIPELINE_MODEL": model, **({"BASE_IMAGE": base_image} if base_image else {}),
                  **({"STAND_IN_LAYERS": str(stand_in_layers)} if stand_in_layers else {})}
    log.info("building %s", reference)
    try:
        with build_context(root) as context:
            _, logs = client.images.build(fileobj=context, custom_context=True, dockerfile=DOCKERFILE, tag=reference,
                                          buildargs=build_args, rm=True, network_mode=network_mode)
        for line in logs:
            if "stream" in line and line["stream"].strip():
                log.info("%s", line["stream"].rstrip())
    except BuildError as exc:
        raise PipelineError(f"the image build failed: {exc.msg}") from exc
    if not push:
        return reference
    username, password = config.setting("registry_username"), config.setting("registry_password")
    if username and password:
        client.login(username=username, password=password, registry=registry.split("/")[0])
    repository, tag = reference.rsplit(":", 1)
    try:
        for line in client.images.push(repository, tag=tag, stream=True, decode=True):
            if "error" in line:
                raise PipelineError(f"pushing {reference} failed: {line['error']}")
    except APIError as exc:
        raise PipelineError(f"pushing {reference} failed: {exc.explanation or exc}") from exc
    log.info("pushed %s", reference)
    return reference
