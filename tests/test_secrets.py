"""No secret leaks. Every credential (tests/secret_canaries.py) is a recognisable fake
holding the marker ``SECRETCANARY``. Some come from a ``.env`` in the launcher's
working folder, some from its environment: both sources are proved to work, and the
marker (or its base64 form) is looked for everywhere a secret must not be: the
launcher's output, the pods' logs, every request the Runpod API received (but the
pod's own credentials in its env), luigid's status messages, error texts and task
history, every object of the run's buckets, the build context, and every layer of the
image the docker tests share.

Where a secret must go, it is checked that it went there only: the Runpod API key
authorises the launcher's requests and is never sent to a pod (Runpod gives each pod a
key of its own); the pod gets its own scoped Google and AWS keys, never the launcher's."""

from __future__ import annotations

import base64
import gzip
import io
import json
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fake_runpod import FakeRunpod, LocalProcesses, assert_no_pod_billed
from helpers import ROOT, api, luigi_command, luigi_env, running_luigid, write_corpus
from pipeline.runpod.image import DOCKERFILE, build_context, copied_paths
from pipeline.runpod.pod_env import decode_env
from secret_canaries import (LAUNCHER_AWS, LAUNCHER_RUNPOD_KEY, MARKER, POD_AWS, POD_GOOGLE_KEY, POD_RUNPOD_KEY_PREFIX,
                             REGISTRY_LOGIN, write_project)

IMAGE = "registry.local/embedding:test"


# -- finding the marker ---------------------------------------------------------------


def base64_forms(text: bytes) -> list[bytes]:
    """What ``text`` looks like inside any base64 string, at each of the three
    alignments: the characters that depend on ``text`` alone."""
    forms = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + text)
        forms.append(encoded[-(-4 * shift // 3): 4 * (shift + len(text)) // 3])
    return forms


NEEDLES = [MARKER, *base64_forms(MARKER)]


def test_the_base64_forms_find_the_marker_wherever_it_sits():
    for prefix in (b"", b"x", b"xy", b'{"private_key": "'):
        assert any(form in base64.b64encode(prefix + MARKER + b"tail") for form in base64_forms(MARKER))


def found(data: bytes | str) -> list[str]:
    """Each place the marker (or its base64 form) is in ``data``, with some context."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    hits = []
    for needle in NEEDLES:
        start = data.find(needle)
        while start != -1:
            hits.append(repr(data[max(start - 60, 0): start + len(needle) + 60]))
            start = data.find(needle, start + 1)
    return hits


class Leaks:
    """Everything looked at, and where the marker turned up."""

    def __init__(self):
        self.looked_at: list[str] = []
        self.hits: dict[str, list[str]] = {}

    def scan(self, where: str, data: bytes | str) -> None:
        self.looked_at.append(where)
        if hits := found(data):
            self.hits[where] = hits

    def scan_file(self, where: str, data: bytes) -> None:
        """Raw bytes, and what compression or Parquet's encodings would hide."""
        self.scan(where, data)
        if data[:2] == b"\x1f\x8b":
            self.scan(f"{where} (gunzipped)", gzip.decompress(data))
        if data[:4] == b"PAR1":
            parquet = pq.ParquetFile(io.BytesIO(data))
            self.scan(f"{where} (metadata)", repr(parquet.metadata.metadata) + str(parquet.schema_arrow))
            self.scan(f"{where} (rows)", json.dumps(parquet.read().to_pylist(), default=str))

    def scan_folder(self, where: str, folder: Path, allowed: tuple[Path, ...] = ()) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink() and path not in allowed:
                self.scan_file(f"{where}/{path.relative_to(folder)}", path.read_bytes())

    def assert_none(self) -> None:
        assert self.looked_at
        assert not self.hits, "secrets leaked:\n" + "\n".join(f"{where}: {hits[:3]}" for where, hits in self.hits.items())


def test_the_scan_finds_a_secret_in_plain_text_base64_gzip_and_parquet(tmp_path):
    import pyarrow as pa

    leaks = Leaks()
    leaks.scan("clean", "nothing to see")
    leaks.scan("plain", f"key={LAUNCHER_RUNPOD_KEY}")
    leaks.scan("base64", base64.b64encode(b'{"k": "' + POD_GOOGLE_KEY.encode()))
    leaks.scan_file("gzip", gzip.compress(REGISTRY_LOGIN[1].encode()))
    pq.write_table(pa.table({"text": [POD_AWS[1] * 50]}), tmp_path / "t.parquet", compression="zstd")
    leaks.scan_file("parquet", (tmp_path / "t.parquet").read_bytes())
    assert {"plain", "base64", "gzip (gunzipped)", "parquet (rows)"} <= set(leaks.hits) and "clean" not in leaks.hits


# -- a full Runpod scenario -----------------------------------------------------------


class Scenario:
    """RunpodEmbedAll as a user runs it (``luigi`` in the folder with ``.env``), on a
    luigid, the corpus in an S3 bucket and the output in a GCS bucket (so both kinds
    of pod credentials travel), against the fake Runpod API whose pods are local
    processes running the container's entrypoint."""

    def __init__(self, tmp_path: Path, gcs_bucket, s3_bucket):
        self.gcs, self.s3 = gcs_bucket, s3_bucket
        s3_bucket.upload_folder(write_corpus(tmp_path / "corpus", documents=9, words=200), "corpus")
        self.pod_logs, self.pod_tmp, self.home = tmp_path / "pod-logs", tmp_path / "pod-tmp", tmp_path / "home"
        for folder in (self.pod_logs, self.pod_tmp, self.home):
            folder.mkdir()
        pod_env = luigi_env(HOME=str(self.home), PIPELINE_WATCHDOG_CHECK_SECONDS="0.2")
        pod_env.pop("RUNPOD_API_KEY", None)
        self.fake = FakeRunpod(api_key=LAUNCHER_RUNPOD_KEY, pod_key_prefix=POD_RUNPOD_KEY_PREFIX, provisioning_seconds=0.1,
                               pod_runtime=LocalProcesses([sys.executable, "-m", "pipeline.runpod.watchdog"], pod_env, str(ROOT),
                                                          str(self.pod_logs), tmp_root=str(self.pod_tmp)))
        self.project = write_project(tmp_path / "project")
        self.status_messages: set[str] = set()
        self.errors: dict[str, str] = {}

    def launcher_env(self) -> dict[str, str]:
        """Secrets not in ``.env`` come from the environment; nothing else is inherited."""
        env = luigi_env(
            HOME=str(self.home), LUIGI_CONFIG_PATH=str(ROOT / "luigi.cfg"), RUNPOD_API_BASE_URL=self.fake.url,
            **self.gcs.env, AWS_ENDPOINT_URL=self.s3.env["AWS_ENDPOINT_URL"], AWS_DEFAULT_REGION=self.s3.env["AWS_DEFAULT_REGION"],
            AWS_ACCESS_KEY_ID=LAUNCHER_AWS[0], PIPELINE_POD_AWS_ACCESS_KEY_ID=POD_AWS[0],
            PIPELINE_REGISTRY_USERNAME=REGISTRY_LOGIN[0],
        )
        env.pop("RUNPOD_API_KEY", None)  # only from .env
        return env

    def launch(self, port: int, *extra: str) -> subprocess.CompletedProcess:
        """The launcher on luigid at ``port``, whose status messages and errors are
        collected while it runs."""
        stop = threading.Event()

        def watch():
            while not stop.wait(0.1):
                self.collect(port)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            return subprocess.run(
                luigi_command("RunpodEmbedAll", "--scheduler-url", f"http://127.0.0.1:{port}",
                              "--corpus", f"{self.s3.url}/corpus", "--output", f"{self.gcs.url}/out", "--docs-per-shard", "3",
                              "--image", IMAGE, "--poll-seconds", "0.2", "--model", "minilm", *extra),
                cwd=self.project, env=self.launcher_env(), capture_output=True, text=True, timeout=600)
        finally:
            stop.set()
            watcher.join()
            self.collect(port)

    def collect(self, port: int) -> None:
        try:
            for task_id, task in api(port, "task_list", status="", upstream_status="", search="").items():
                self.status_messages.add(json.dumps(task))
                if task["status"] == "FAILED":
                    self.errors[task_id] = json.dumps(api(port, "fetch_error", task_id=task_id))
        except OSError:
            pass  # a slow answer: the next look catches up

    def scan(self, leaks: Leaks, launcher: subprocess.CompletedProcess, luigid: Path) -> None:
        leaks.scan("launcher stdout", launcher.stdout)
        leaks.scan("launcher stderr", launcher.stderr)
        leaks.scan("luigid status messages", "\n".join(sorted(self.status_messages)))
        leaks.scan("luigid error texts", "\n".join(self.errors.values()))
        leaks.scan_folder("luigid (state, task history, logs)", luigid)
        for pod_id in self.fake.pods:
            leaks.scan(f"pod {pod_id} log", self.fake.pod_runtime.logs(pod_id))
        for bucket in (self.gcs, self.s3):
            for key in bucket.keys():
                leaks.scan_file(f"{bucket.url}/{key}", bucket.get(key))
        leaks.scan_folder("HOME", self.home)
        leaks.scan_folder("the launcher's folder", self.project,
                          allowed=(self.project / ".env", self.project / "keys" / "launcher.json", self.project / "keys" / "pod.json"))
        leaks.scan_folder("the pods' TMPDIR", self.pod_tmp,
                          allowed=tuple(self.pod_tmp / pod_id / "gcp-credentials.json" for pod_id in self.fake.pods))
        self.scan_api_requests(leaks)

    def scan_api_requests(self, leaks: Leaks) -> None:
        """What the Runpod API was sent holds no secret but the pod's own bucket
        credentials, in its env (the API keys travel in the Authorization header)."""
        pod_credentials = [value for pod in self.fake.pods.values() for name, value in pod.env.items()
                           if name in ("GOOGLE_CREDENTIALS_JSON_B64", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        for number, (_, body) in enumerate(self.fake.received):
            for value in pod_credentials:
                body = body.replace(value.encode(), b"<the pod's own credential>")
            leaks.scan(f"Runpod API request {number}", body)

    def assert_pods_got_their_own_credentials_only(self) -> None:
        """The launcher's key authorised the launcher's requests; each pod used a key
        of its own, and was sent its own bucket credentials, none of the launcher's."""
        pod_keys = {f"Bearer {self.fake.pod_key(pod_id)}" for pod_id in self.fake.pods}
        assert {authorization for authorization, _ in self.fake.received} <= {f"Bearer {LAUNCHER_RUNPOD_KEY}", *pod_keys}
        for pod in self.fake.pods.values():
            sent = {**pod.env, **decode_env(pod.env)}
            assert sent["GOOGLE_CREDENTIALS_JSON"] == POD_GOOGLE_KEY  # from the .env's path
            assert (sent["AWS_ACCESS_KEY_ID"], sent["AWS_SECRET_ACCESS_KEY"]) == POD_AWS  # from the env and the .env
            assert "RUNPOD_API_KEY" not in sent and pod.container_env["RUNPOD_API_KEY"] == self.fake.pod_key(pod.id)
            everything = json.dumps(sent)
            for secret in (LAUNCHER_RUNPOD_KEY, *LAUNCHER_AWS, REGISTRY_LOGIN[1], "SECRETCANARY0LAUNCHER", "SECRETCANARY-launcher"):
                assert secret not in everything, f"the launcher's {secret[:20]}… was sent to pod {pod.id}"
        # Inside the pod the Google key is a file of the pod's user alone.
        for pod_id in self.fake.pods:
            key_file = self.pod_tmp / pod_id / "gcp-credentials.json"
            assert key_file.read_text() == POD_GOOGLE_KEY and stat.S_IMODE(key_file.stat().st_mode) == 0o600

    def stop(self) -> None:
        try:
            assert_no_pod_billed(self.fake)
        finally:
            self.fake.stop()


@pytest.fixture
def scenario(tmp_path, gcs_bucket, s3_bucket):
    scenario = Scenario(tmp_path, gcs_bucket, s3_bucket)
    yield scenario
    scenario.stop()


@pytest.mark.slow
def test_a_run_on_a_pod_leaks_no_secret(scenario, tmp_path):
    leaks = Leaks()
    with running_luigid(tmp_path / "luigid") as port:
        # The pod's worker is on the same luigid: its status and history are scanned too.
        launcher = scenario.launch(port, "--pods-scheduler-url", f"http://127.0.0.1:{port}")
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    assert "out/_SUCCESS.json" in scenario.gcs.keys("out/")
    assert any("shards done" in message for message in scenario.status_messages)  # the launcher's
    assert any("EmbedShard" in message for message in scenario.status_messages)  # the pod's worker's
    assert "launcher's own" not in launcher.stderr  # the pod's own keys were configured
    assert any(authorization.startswith(f"Bearer {POD_RUNPOD_KEY_PREFIX}") for authorization, _ in scenario.fake.received), \
        "the watchdog did not use its pod's own key"
    scenario.assert_pods_got_their_own_credentials_only()
    scenario.scan(leaks, launcher, tmp_path / "luigid")
    leaks.assert_none()


@pytest.mark.slow
def test_a_pod_whose_work_fails_leaks_no_secret_in_its_errors(scenario, tmp_path):
    scenario.fake.pod_runtime.base_env["PIPELINE_MODEL_PATH"] = str(tmp_path / "no-model-here")
    leaks = Leaks()
    with running_luigid(tmp_path / "luigid") as port:
        launcher = scenario.launch(port)
    assert launcher.returncode == 30 and "ended before the work was done" in launcher.stderr, launcher.stderr[-3000:]
    [pod_id] = scenario.fake.pods
    assert "cannot load model" in scenario.fake.pod_runtime.logs(pod_id)
    assert any("RunpodEmbedAll: pod(s) " in error and "ended before the work was done" in error
               for error in scenario.errors.values()), scenario.errors  # the web view's one line
    scenario.assert_pods_got_their_own_credentials_only()
    scenario.scan(leaks, launcher, tmp_path / "luigid")
    leaks.assert_none()


@pytest.mark.slow
def test_a_refused_api_key_is_not_repeated_in_the_error(scenario, tmp_path):
    refused = "rpa_SECRETCANARY0REFUSED0RUNPOD0KEY"
    (scenario.project / ".env").write_text((scenario.project / ".env").read_text().replace(LAUNCHER_RUNPOD_KEY, refused))
    leaks = Leaks()
    with running_luigid(tmp_path / "luigid") as port:
        launcher = scenario.launch(port)
    assert launcher.returncode == 30 and "the API key was refused" in launcher.stderr, launcher.stderr[-3000:]
    assert scenario.fake.pods == {} and scenario.errors
    assert {authorization for authorization, _ in scenario.fake.received} == {f"Bearer {refused}"}  # its one place
    scenario.scan(leaks, launcher, tmp_path / "luigid")
    leaks.assert_none()


# -- the workers inside a pod ---------------------------------------------------------


def test_the_pods_workers_get_the_bucket_credentials_but_not_its_runpod_key(tmp_path):
    """The watchdog keeps the pod's Runpod key (to end its pod); the Luigi workers get
    the Google key as a private file and the AWS keys, nothing encoded, nothing more."""
    dump = tmp_path / "worker-env.json"
    worker = tmp_path / "worker.py"
    worker.write_text(f"import json, os\njson.dump(dict(os.environ), open({str(dump)!r}, 'w'))\n")
    run_one_worker = ("import sys; from pipeline.runpod import watchdog; "
                      f"watchdog.work_command = lambda url, extra: [sys.executable, {str(worker)!r}]; sys.exit(watchdog.main([]))")
    env = luigi_env(HOME=str(tmp_path), TMPDIR=str(tmp_path), RUNPOD_API_BASE_URL="http://127.0.0.1:9", RUNPOD_API_KEY=f"{POD_RUNPOD_KEY_PREFIX}1",
                    GOOGLE_CREDENTIALS_JSON_B64=base64.b64encode(POD_GOOGLE_KEY.encode()).decode(),
                    AWS_ACCESS_KEY_ID=POD_AWS[0], AWS_SECRET_ACCESS_KEY=POD_AWS[1], PIPELINE_WATCHDOG_CHECK_SECONDS="0.1")
    watchdog = subprocess.run([sys.executable, "-c", run_one_worker], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert watchdog.returncode == 0, watchdog.stderr
    seen = json.loads(dump.read_text())
    assert "RUNPOD_API_KEY" not in seen and not [name for name in seen if name.endswith("_B64")]
    assert (seen["AWS_ACCESS_KEY_ID"], seen["AWS_SECRET_ACCESS_KEY"]) == POD_AWS
    assert Path(seen["GOOGLE_APPLICATION_CREDENTIALS"]).read_text() == POD_GOOGLE_KEY
    assert found(watchdog.stdout + watchdog.stderr) == []


# -- the image ------------------------------------------------------------------------


def context_files(root: Path) -> dict[str, bytes]:
    with build_context(root) as context, tarfile.open(fileobj=context) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}


def test_the_build_context_holds_what_the_image_needs_and_no_secret(planted_checkout):
    """The copy with planted secrets (tests/secret_canaries.py) the shared image is built from."""
    files = context_files(planted_checkout)
    needed = {"containers/Dockerfile",
              *[p for p in copied_paths(planted_checkout / DOCKERFILE) if (planted_checkout / p).is_file()]}
    assert needed <= set(files) and "pipeline/runpod/watchdog.py" in files
    assert not [name for name in files if name.split("/")[0] in (".env", ".git", ".venv", "var", "output", "pod-key.json", "tests")]
    assert not [name for name in files if "__pycache__" in name]
    leaks = Leaks()
    for name, data in files.items():
        leaks.scan_file(f"build context: {name}", data)
    with build_context(planted_checkout) as context:
        leaks.scan("build context tar", context.read())
    leaks.assert_none()


def test_this_checkouts_build_context_has_no_env_or_local_state():
    """Here the names only: a real ``.env`` may be present and is not read."""
    names = set(context_files(ROOT))
    assert not [name for name in names if name.split("/")[0] in (".env", ".git", ".venv", "var", "output", "tests")]
    assert not [name for name in names if name.endswith(".json") or "__pycache__" in name]


def layer_mode(start: bytes) -> str | None:
    """How to read an archive member as a layer: a tar, a gzipped tar, or not a layer."""
    if start[:2] == b"\x1f\x8b":
        return "r|gz"
    return "r|" if start[257:262] == b"ustar" else None


def scan_saved_image(leaks: Leaks, saved: Path) -> None:
    """Every member of ``docker save``'s archive (manifests, the image config with its
    env and history) and every file and file name of every layer in it."""
    with tarfile.open(saved) as archive:
        for member in archive:
            if not member.isfile():
                continue
            mode = layer_mode(archive.extractfile(member).read(512))
            if mode is None:
                leaks.scan_file(f"image: {member.name}", archive.extractfile(member).read())
                continue
            names = []
            with tarfile.open(fileobj=archive.extractfile(member), mode=mode) as layer:
                for file in layer:
                    names.append(f"{file.name} -> {file.linkname}")
                    if file.isfile():
                        leaks.scan_file(f"image layer {member.name}: {file.name}", layer.extractfile(file).read())
            leaks.scan(f"image layer {member.name} (file names)", "\n".join(names))


def test_the_image_scan_looks_into_every_layer_and_the_config(tmp_path):
    def tar_of(files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    layer = tar_of({"app/clean.py": b"print()", "root/.cache/key.gz": gzip.compress(POD_GOOGLE_KEY.encode())})
    (tmp_path / "image.tar").write_bytes(tar_of({"0123/layer.tar": layer, "0123.json": f'{{"Env": ["K={REGISTRY_LOGIN[1]}"]}}'.encode()}))
    leaks = Leaks()
    scan_saved_image(leaks, tmp_path / "image.tar")
    assert set(leaks.hits) == {"image layer 0123/layer.tar: root/.cache/key.gz (gunzipped)", "image: 0123.json"}


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(3000)  # the session's image is built by whichever docker test comes first
def test_no_layer_of_the_built_image_holds_a_secret(engine, image, tmp_path):
    """The session's image (tests/conftest.py): ``make image`` from the planted checkout
    with every secret also in the environment. Each layer, the config, env and history
    are scanned."""
    built = engine.client.images.get(image)
    leaks = Leaks()
    leaks.scan("image attributes (config, env, history)", json.dumps([built.attrs, built.history()]))
    saved = tmp_path / "image.tar"
    with saved.open("wb") as file:
        for chunk in built.save(named=True):
            file.write(chunk)
    scan_saved_image(leaks, saved)
    leaks.assert_none()
    assert any("layer" in where for where in leaks.looked_at)
