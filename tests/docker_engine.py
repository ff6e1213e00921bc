"""A real Docker engine for the container tests, all of it on this machine.

- ``DockerEngine``: dockerd on a private socket (overlay2 or vfs storage, no bridge
  network, no iptables), stopped by PID.
- ``EngineCache``: where the engine keeps its images between sessions (the stand-in
  base, the build cache of the dependency layer), so a second ``make test`` on the same
  machine builds only what changed, as Docker does for anyone who builds twice.
- ``build_base_image``: no registry can be reached to pull the Dockerfile's base (Debian's
  Python 3.11) nor PyTorch's CUDA index, so a stand-in is built locally: the same Debian
  suite (debootstrap, from the machine's own apt mirror) with its python3 and the CPU
  wheel of the Dockerfile's torch, imported with ``docker import``.
- ``WarmUp``: the engine and the stand-in base, made in a thread from the start of the
  session while the other tests run, so the container tests (run last) find them ready.
- ``LocalRegistry``: Debian's docker-registry on 127.0.0.1, so ``make image``'s push
  and a pod's pull are real.
- ``DockerContainers``: the fake Runpod's pod runtime that runs each pod as a real
  container of the built image (host network: the fake API and storage servers are
  on loopback).

Anything missing raises ``Unavailable`` with the reason, which the tests turn into a
skip that says so.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request
from pathlib import Path

import docker

from helpers import free_port, port_is_free

# The recipe's number goes up whenever build_base_image changes what it makes, so a base
# kept from an older recipe is never taken for the current one.
BASE_RECIPE = 2


def default_base() -> tuple[str, str, str]:
    """The Debian suite, Python (major.minor) and torch of the Dockerfile's default base
    (``python:3.11-slim-bookworm`` and its ``TORCH_VERSION``), which the stand-in copies."""
    from pipeline.runpod.image import dockerfile_defaults

    defaults = dockerfile_defaults()
    match = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim-(\w+)", defaults["BASE_IMAGE"])
    if not match:
        raise AssertionError(f"the Dockerfile's BASE_IMAGE {defaults['BASE_IMAGE']} is not a Debian python image: "
                             "build_base_image cannot make a stand-in of it")
    return match[2], match[1], defaults["TORCH_VERSION"]


BASE_SUITE, BASE_PYTHON, BASE_TORCH = default_base()
BASE_TAG = f"embedding-pipeline-test-base:{BASE_SUITE}-python{BASE_PYTHON}-torch{BASE_TORCH}-r{BASE_RECIPE}"
# The host's trust store goes into the stand-in base: pip in its build steps reaches
# the package index the way this machine does.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class Unavailable(Exception):
    """This machine cannot run the real-container tests; the message says why."""


def _stop(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process group (dockerd takes its containerd with it), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _unmount_under(folder: Path) -> None:
    """dockerd leaves its network namespace (and, when killed, its layers) mounted."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in reversed(mounts):
        if mount.startswith(f"{folder}/"):
            subprocess.run(["umount", "--lazy", mount], check=False)


class DockerEngine:
    """dockerd with overlay2 where the kernel allows it, else vfs (every layer a full
    copy: a build takes several times longer). Its images live in ``data_root`` when one
    is given (kept after ``stop``), else in ``workdir`` (removed)."""

    def __init__(self, workdir: Path, start_timeout: float = 60, data_root: Path | None = None):
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise Unavailable("dockerd is not installed (Debian's docker.io; .ci/run installs it)")
        if os.geteuid() != 0:
            raise Unavailable("dockerd needs root")
        self.workdir = workdir
        self.data_root = data_root or workdir
        self.url = f"unix://{workdir}/docker.sock"
        self.log_path = workdir / "dockerd.log"
        for driver in ("overlay2", "vfs"):
            problem = self._start(dockerd, driver, start_timeout)
            if problem is None:
                self.driver = driver
                return
        raise Unavailable(f"dockerd did not start: {problem}")

    def _start(self, dockerd: str, driver: str, timeout: float) -> str | None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [dockerd, f"--storage-driver={driver}", "--iptables=false", "--bridge=none", "--host", self.url,
                 "--data-root", str(self.data_root / driver), "--exec-root", str(self.workdir / "exec"),
                 "--pidfile", str(self.workdir / "dockerd.pid")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.client = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client = docker.DockerClient(base_url=self.url, timeout=600)  # asks the engine its version
                return None
            except docker.errors.DockerException:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    return f"{driver}: {' | '.join(tail)}"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.client is not None:
            try:
                for container in self.client.containers.list(all=True):
                    container.remove(force=True)
            except docker.errors.DockerException:
                pass
            self.client.close()
        _stop(self.process)
        _unmount_under(self.workdir)
        if self.data_root != self.workdir:
            _unmount_under(self.data_root)
        for name in ("overlay2", "vfs", "exec"):
            shutil.rmtree(self.workdir / name, ignore_errors=True)


class EngineCache:
    """The engine's data root kept between sessions, in ``PIPELINE_TEST_DOCKER_CACHE``
    (``off``: none) or ~/.cache/embedding-pipeline/test-docker. One session holds it at a
    time (a lock); another session beside it, or a cache that keeps the engine from
    starting, gets a fresh engine as before. ``prune`` keeps the current stand-in base
    and the newest image of the pod, whose layers are the next build's cache."""

    def __init__(self, folder: Path, lock):
        self.folder, self._lock = folder, lock

    @classmethod
    def claim(cls) -> "EngineCache | None":
        setting = os.environ.get("PIPELINE_TEST_DOCKER_CACHE", "")
        if setting.lower() in ("0", "off", "no", "false"):
            return None
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        folder = Path(setting) if setting else cache_home / "embedding-pipeline" / "test-docker"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / "lock", "w")
        except OSError:
            return None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return None  # another session is using it
        return cls(folder, lock)

    def wipe(self) -> None:
        _unmount_under(self.folder)
        for name in ("overlay2", "vfs"):
            shutil.rmtree(self.folder / name, ignore_errors=True)

    def registry_place(self, most_bytes: int = 6 * 2**30) -> tuple[Path, int]:
        """The registry's kept storage and the port it had: the engine knows which layers
        a registry holds by its address, and pushes only the others (layers pushed by an
        earlier session are mounted from its namespace). A taken port, or storage grown
        past ``most_bytes`` (every session adds its code and model layers), starts over."""
        storage, port_file = self.folder / "registry", self.folder / "registry-port"
        port = int(port_file.read_text()) if port_file.exists() else None
        size = sum(path.stat().st_size for path in storage.rglob("*") if path.is_file()) if storage.exists() else 0
        if port is None or not port_is_free(port) or size > most_bytes:
            shutil.rmtree(storage, ignore_errors=True)
            port = free_port()
            port_file.write_text(str(port))
        return storage, port

    @staticmethod
    def prune(client: docker.DockerClient, image_name: str) -> None:
        """Every container goes; of the pod's images, all but the newest; stand-in bases
        of another torch or recipe."""
        for container in client.containers.list(all=True):
            container.remove(force=True)
        built = [image for image in client.images.list()
                 if any(tag.rsplit(":", 1)[0].endswith(f"/{image_name}") for tag in image.tags)]
        built.sort(key=lambda image: image.attrs["Created"], reverse=True)
        old_bases = [image for image in client.images.list(name=BASE_TAG.split(":")[0]) if BASE_TAG not in image.tags]
        for image in built[1:] + old_bases:
            client.images.remove(image.id, force=True)

    def release(self) -> None:
        self._lock.close()


def _debian_mirror() -> str:
    """The Debian apt mirror this machine already uses."""
    release = dict(
        line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
    )
    suite = release.get("VERSION_CODENAME", "").strip('"')
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#"))
            if suite in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    for line in legacy.read_text().splitlines() if legacy.exists() else []:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
            return parts[1]
    raise Unavailable(f"no Debian apt mirror found for {suite!r} in /etc/apt")


def build_base_image(engine: DockerEngine, workdir: Path) -> str:
    """A stand-in for the Dockerfile's default base with its torch installed: the same
    Debian suite's python3 (the same Python minor version, checked) with the CPU build of
    the same torch, the one thing missing being CUDA. Like the real base, its python
    takes ``pip install``."""
    if engine.client.images.list(name=BASE_TAG):
        return BASE_TAG
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise Unavailable("debootstrap is not installed (Debian's package; .ci/run installs it)")
    rootfs, wheels = workdir / "rootfs", workdir / "wheels"
    try:
        subprocess.run([debootstrap, "--variant=minbase", "--include=python3,python3-pip,python-is-python3,ca-certificates",
                        BASE_SUITE, str(rootfs), _debian_mirror()], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise Unavailable(f"debootstrap {BASE_SUITE} failed: {exc.stderr.decode(errors='replace')[-300:]}") from None
    python = subprocess.run(["chroot", str(rootfs), "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if python != BASE_PYTHON:
        raise AssertionError(f"Debian {BASE_SUITE}'s Python is {python}, the Dockerfile's default base has {BASE_PYTHON}: "
                             "the stand-in base would test another Python than production's")
    # The Dockerfile's torch, the CPU build (the machine's pip finds it on disk).
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"torch=={BASE_TORCH}", "-d", str(wheels)],
                   check=True)
    [wheel] = wheels.glob("torch-*.whl")
    shutil.copy(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
    shutil.copy("/etc/resolv.conf", rootfs / "etc/resolv.conf")
    shutil.copy(wheel, rootfs / "tmp" / wheel.name)
    subprocess.run(["chroot", str(rootfs), "python3", "-m", "pip", "install", "--quiet", "--no-cache-dir",
                    "--break-system-packages", f"/tmp/{wheel.name}"],
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}, check=True)
    (rootfs / "tmp" / wheel.name).unlink()
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    tarball = workdir / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
    shutil.rmtree(rootfs)
    repository, tag = BASE_TAG.split(":")
    engine.client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    tarball.unlink()
    return BASE_TAG


class WarmUp:
    """``DockerEngine`` and ``build_base_image`` in a background thread. The base is
    mostly downloads and disk (debootstrap from the apt mirror, a pip install, a tar and
    an import), so it hardly competes with the tests running beside it for the cores;
    made in turn, it added minutes to the suite. ``engine()`` and ``base()`` wait for it
    and raise ``Unavailable`` as the foreground calls would."""

    def __init__(self):
        self.workdir = Path(tempfile.mkdtemp(prefix="pytest-docker-"))
        self.cache = EngineCache.claim()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="docker-warm-up")
        self._engine = self._pool.submit(self._make_engine)
        self._base = self._pool.submit(self._make_base)  # after the engine: one thread

    def _make_engine(self) -> DockerEngine:
        (self.workdir / "docker").mkdir()
        if self.cache is None:
            return DockerEngine(self.workdir / "docker")
        try:
            return DockerEngine(self.workdir / "docker", data_root=self.cache.folder)
        except Unavailable:
            self.cache.wipe()  # a damaged cache costs one fresh start, not the tests
            return DockerEngine(self.workdir / "docker", data_root=self.cache.folder)

    def _make_base(self) -> str:
        engine = self._engine.result()
        (self.workdir / "base").mkdir()
        return build_base_image(engine, self.workdir / "base")

    def engine(self) -> DockerEngine:
        return self._engine.result()

    def base(self) -> str:
        return self._base.result()

    def stop(self) -> None:
        """Wait for the thread (a debootstrap is not cut short), prune the kept images,
        stop the engine, and remove what it made outside the cache."""
        from pipeline.runpod.image import IMAGE_NAME

        self._pool.shutdown(wait=True)
        if self._engine.exception() is None:
            engine = self._engine.result()
            if self.cache is not None:
                try:
                    EngineCache.prune(engine.client, IMAGE_NAME)
                except docker.errors.DockerException:
                    pass  # what stays is pruned next time
            engine.stop()
        if self.cache is not None:
            self.cache.release()
        shutil.rmtree(self.workdir, ignore_errors=True)


class LocalRegistry:
    """Debian's docker-registry on 127.0.0.1; the engine trusts loopback registries
    over plain HTTP. Its blobs live in ``storage`` (kept) when given, else in
    ``workdir``; each session pushes to a ``namespace`` of its own, so what a test finds
    there was pushed by this session."""

    def __init__(self, workdir: Path, storage: Path | None = None, port: int | None = None):
        binary = shutil.which("docker-registry")
        if binary is None:
            raise Unavailable("docker-registry is not installed (Debian's package; .ci/run installs it)")
        self.address = f"127.0.0.1:{port or free_port()}"
        self.namespace = f"team-{os.getpid()}-{time.time_ns()}"
        config = workdir / "registry.yml"
        config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {storage or workdir / 'blobs'}\n"
                          f"http:\n  addr: {self.address}\n")
        self.process = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable("docker-registry did not start") from None
                time.sleep(0.2)

    def tags(self, repository: str) -> list[str]:
        import json

        with urllib.request.urlopen(f"http://{self.address}/v2/{repository}/tags/list", timeout=10) as answer:
            return json.load(answer).get("tags") or []

    def stop(self) -> None:
        _stop(self.process, timeout=10)


class DockerContainers:
    """Each fake pod as a real container of ``image``, pulled from its registry first
    as Runpod does. Starting is asynchronous (a pod provisions), as on Runpod."""

    def __init__(self, client: docker.DockerClient, image: str, base_env: dict | None = None):
        self.client, self.image, self.base_env = client, image, dict(base_env or {})
        self.containers: dict = {}
        self.starting: dict[str, threading.Thread] = {}
        self.errors: dict[str, Exception] = {}

    def start(self, pod_id: str, env: dict) -> None:
        def run():
            try:
                repository, tag = self.image.rsplit(":", 1)
                self.client.images.pull(repository, tag=tag)
                self.containers[pod_id] = self.client.containers.run(
                    self.image, name=pod_id, environment={**self.base_env, **env}, network_mode="host", detach=True)
            except docker.errors.DockerException as exc:
                self.errors[pod_id] = exc

        self.starting[pod_id] = threading.Thread(target=run, daemon=True)
        self.starting[pod_id].start()

    def exited(self, pod_id: str) -> bool:
        if self.starting[pod_id].is_alive():
            return False
        if pod_id in self.errors:
            return True  # the container never started: the pod shows as exited
        container = self.containers[pod_id]
        container.reload()
        return container.status in ("exited", "dead")

    def exit_code(self, pod_id: str) -> int:
        self.starting[pod_id].join()
        return self.containers[pod_id].wait(timeout=300)["StatusCode"]

    def logs(self, pod_id: str) -> str:
        return self.containers[pod_id].logs().decode(errors="replace")

    def kill(self, pod_id: str) -> None:
        self.starting[pod_id].join()
        container = self.containers.get(pod_id)
        if container is None:
            return
        container.reload()
        if container.status == "running":
            try:
                container.kill()
            except docker.errors.APIError:
                pass  # it ended on its own meanwhile

    def stop(self) -> None:
        for pod_id in list(self.starting):
            self.kill(pod_id)
