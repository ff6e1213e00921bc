import os
import shutil
from pathlib import Path

import pytest

# With -n, each xdist worker gets its share of the cores: torch (and every run a test
# starts, which inherits this) would otherwise spin a thread per core in each worker,
# and oversubscribed cores made the fast tier slower on two workers than on one.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(_share))

from helpers import NO_METADATA_PROBES, ROOT, SHARED_CORPUS, write_corpus

os.environ.update(NO_METADATA_PROBES)


@pytest.fixture(scope="session")
def embedder():
    """The offline model in full precision, loaded once for the whole session (as a
    worker would)."""
    from pipeline.core.embedder import EmbedderSettings, load_embedder

    return load_embedder(EmbedderSettings(device="cpu", batch_tokens=16384, precision="float32"))


@pytest.fixture(scope="session")
def nomic_home(tmp_path_factory):
    """A Hugging Face home holding nomic-embed-text-v1.5 as its hub download leaves it:
    nomic's published layout, two of its twelve layers, random weights, unmarked (so
    verify and search take what it makes: these tests check the code, not the vectors'
    meaning). ``.snapshot`` is the model folder."""
    from pipeline.core.stand_in import save_stand_in

    home = tmp_path_factory.mktemp("hf-home")
    snapshot = save_stand_in(str(home), "nomic", layers=2, marked=False, hf_home=True)
    return NomicHome(home, snapshot)


class NomicHome:
    def __init__(self, home, snapshot):
        self.home, self.snapshot = home, snapshot

    def env(self) -> dict[str, str]:
        """A process's environment that finds it as the profile's own weights."""
        return {"HF_HOME": str(self.home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def small_corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def shared_corpus():
    if not (SHARED_CORPUS.is_dir() and any(SHARED_CORPUS.rglob("*.md"))):
        pytest.skip("../shared/corpus is not present")
    return SHARED_CORPUS


# ---------------------------------------------------------------------------------------
# Headless Chromium, for tests that look at a page as a user would


@pytest.fixture(scope="session")
def artifacts_folder() -> Path:
    """Where screenshots are kept for people to look at: ``$PIPELINE_TEST_ARTIFACTS``,
    default ``test-artifacts/`` in the repository."""
    folder = Path(os.environ.get("PIPELINE_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser():
    """Headless Chromium through the system chromedriver (never Selenium Manager, which
    would download one); quit, with its driver, at the end."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        missing = " and ".join(name for name, path in {"chromium": chromium, "chromedriver": chromedriver}.items()
                               if not path)
        pytest.skip(f"no headless Chromium, the browser test is skipped: {missing} not found "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing, the browser test is skipped "
                                                                 "(pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 # Loopback only: no proxy, no background calls home.
                 "--no-proxy-server", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------
# Storage servers on loopback


@pytest.fixture(scope="session")
def gcs_server():
    from storage_servers import FakeGCS

    server = FakeGCS()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    from storage_servers import MotoS3

    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def fast_retries():
    """Retry waits of tens of milliseconds, so fault tests take seconds, not minutes: in
    this process, and (the environment it yields) in the runs it starts."""
    from pipeline.storage import RetryPolicy, use_retry_policy

    before = use_retry_policy(RetryPolicy(attempts=6, max_wait=0.05))
    yield {"PIPELINE_STORAGE_RETRIES": "6", "PIPELINE_STORAGE_RETRY_MAX_WAIT": "0.05"}
    use_retry_policy(before)


class Bucket:
    """A fresh bucket on one of the servers, with the environment that reaches it."""

    counter = 0

    def __init__(self, kind, server, monkeypatch, url=None):
        import pipeline.storage

        Bucket.counter += 1
        self.kind = kind
        self.name = f"test-bucket-{Bucket.counter}-{os.getpid()}"
        self.env = server.env(url)
        self.server = server
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        pipeline.storage.forget_clients()  # clients read their endpoint when made
        self.scheme = "gs" if kind == "gcs" else "s3"
        self.url = f"{self.scheme}://{self.name}"
        if kind == "gcs":
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            # Set-up talks to the server directly, never through a test's fault proxy.
            self.client = storage.Client(
                credentials=AnonymousCredentials(), project="test", client_options={"api_endpoint": server.url}
            )
            self.client.create_bucket(self.name)
        else:
            import boto3

            self.client = boto3.client("s3", endpoint_url=server.url)
            self.client.create_bucket(Bucket=self.name)

    def put(self, key: str, data: bytes) -> None:
        if self.kind == "gcs":
            self.client.bucket(self.name).blob(key).upload_from_string(data)
        else:
            self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def delete(self, key: str) -> None:
        if self.kind == "gcs":
            self.client.bucket(self.name).blob(key).delete()
        else:
            self.client.delete_object(Bucket=self.name, Key=key)

    def mirror_folder(self, folder, prefix: str) -> None:
        """Make ``prefix`` hold what ``folder`` holds now: files written, the rest deleted."""
        wanted = {f"{prefix}/{path.relative_to(folder).as_posix()}" for path in folder.rglob("*") if path.is_file()}
        for key in self.keys(prefix + "/"):
            if key not in wanted:
                self.delete(key)
        self.upload_folder(folder, prefix)

    def get(self, key: str) -> bytes:
        if self.kind == "gcs":
            return self.client.bucket(self.name).blob(key).download_as_bytes()
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        if self.kind == "gcs":
            return sorted(b.name for b in self.client.list_blobs(self.name, prefix=prefix))
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def upload_folder(self, folder, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.put(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def _bucket(kind, request, monkeypatch):
    server = request.getfixturevalue("gcs_server" if kind == "gcs" else "s3_server")
    yield Bucket(kind, server, monkeypatch)
    import pipeline.storage

    pipeline.storage.forget_clients()


@pytest.fixture(params=["gcs", "s3"])
def bucket(request, monkeypatch):
    yield from _bucket(request.param, request, monkeypatch)


@pytest.fixture
def gcs_bucket(request, monkeypatch):
    yield from _bucket("gcs", request, monkeypatch)


@pytest.fixture
def s3_bucket(request, monkeypatch):
    yield from _bucket("s3", request, monkeypatch)


# ---------------------------------------------------------------------------------------
# The pod's image on a real Docker engine, built once for the session: the
# real-container tests run it, tests/test_secrets.py scans its layers.


def or_skip(make, what: str):
    """``make()``, or a skip that says what this machine lacks."""
    from docker_engine import Unavailable

    try:
        return make()
    except Unavailable as exc:
        pytest.skip(f"{what}, the real-container tests are skipped: {exc}")


_warm_up = None  # docker_engine.WarmUp, started once the session knows it runs a container test


def warm_up():
    global _warm_up
    if _warm_up is None:
        from docker_engine import WarmUp

        _warm_up = WarmUp()
    return _warm_up


def _on_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


_session_tmp = None  # TMPDIR of the whole session, made by the process that starts it


def pytest_configure(config):
    """One temporary folder for everything the session starts (xdist workers, runs,
    pods, dockerd, luigid, Chromium inherit TMPDIR): what a process killed on purpose
    leaves behind (a staged file, a manifest's local copy, Luigi's lock files) goes with
    the session instead of piling up in /tmp."""
    global _session_tmp
    if _on_xdist_worker(config) or "PIPELINE_TEST_SESSION_TMP" in os.environ:
        return
    import tempfile

    _session_tmp = tempfile.mkdtemp(prefix="pipeline-tests-")
    os.environ.update(TMPDIR=_session_tmp, PIPELINE_TEST_SESSION_TMP=_session_tmp)
    tempfile.tempdir = None  # read TMPDIR again


SESSION_FAILED = pytest.StashKey[bool]()  # set at the session's end, read as pytest unconfigures


def pytest_unconfigure(config):
    """Removed when every test passed; kept, and named, for a look when one failed."""
    if _session_tmp is None:
        return
    if config.stash.get(SESSION_FAILED, False):
        print(f"\nthe session's temporary files are kept in {_session_tmp}")
    else:
        shutil.rmtree(_session_tmp, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """The container tests last, so the engine and base made beside the others are ready.
    With ``-n``, they are one xdist group: one worker starts one engine, and xdist sends
    that group (the largest) first, so it runs beside the others from the start."""
    containers = [item for item in items if item.get_closest_marker("docker")]
    for item in containers:
        item.add_marker(pytest.mark.xdist_group("docker"))
    items[:] = [item for item in items if not item.get_closest_marker("docker")] + containers


def pytest_collection_finish(session):
    # An xdist worker cannot know whether it will be sent the container tests: there the
    # engine starts with the first of them.
    if not _on_xdist_worker(session.config) and any(item.get_closest_marker("docker") for item in session.items):
        warm_up()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[SESSION_FAILED] = exitstatus not in (0, pytest.ExitCode.NO_TESTS_COLLECTED)
    if _warm_up is not None:
        _warm_up.stop()


@pytest.fixture(scope="session")
def engine():
    return or_skip(warm_up().engine, "no Docker engine")


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    from docker_engine import LocalRegistry

    cache = warm_up().cache
    kept = cache.registry_place() if cache is not None else (None, None)
    registry = or_skip(lambda: LocalRegistry(tmp_path_factory.mktemp("registry"), *kept), "no local registry")
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def planted_checkout(tmp_path_factory):
    """A copy of this checkout with fake secrets planted in it (tests/secret_canaries.py)."""
    from secret_canaries import plant_checkout

    return plant_checkout(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def image(engine, registry, planted_checkout):
    """What ``make image`` builds and pushes, on the stand-in base, with the production
    profile baked in as nomic's published layout (a stand-in of one layer: no hub here),
    so the build's own check loads it as on a pod; the pods of the container tests run the
    offline minilm, which every image carries in its package. From the planted checkout,
    with the launcher's secrets in the environment (which must reach no layer)."""
    from pipeline.runpod.image import build_and_push
    from secret_canaries import launcher_secrets

    base = or_skip(warm_up().base, "no stand-in base image")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**launcher_secrets(planted_checkout), "DOCKER_HOST": engine.url}.items():
            patch.setenv(name, value)
        # The engine has no bridge network, so build steps use the host's.
        return build_and_push(f"{registry.address}/{registry.namespace}", base_image=base, model="nomic", network_mode="host",
                              root=planted_checkout, stand_in_layers=1)
