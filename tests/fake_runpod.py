"""A fake Runpod API on 127.0.0.1 for driving the real runpod SDK in tests.

It speaks what runpod 1.12's SDK sends: one POST of ``{"query": …}`` to ``/graphql``
with ``Authorization: Bearer <key>``. The query text is parsed with graphql-core (a
query the SDK broke, say with an unescaped quote in an env value, is a syntax error
here as it is there) and answered with exactly the fields it selects. It keeps a
ledger of pods on its own clock, so tests can check that no pod is left running and
what each one cost. As on Runpod, each pod gets an API key of its own (never the
account's), which reaches that pod only; every request is kept in ``received``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import pytest
from graphql import FieldNode, GraphQLSyntaxError, parse, value_from_ast_untyped

NO_CAPACITY = "There are no longer any instances available with the requested specifications. Please refresh and try again."

GPU_TYPES = {
    "NVIDIA GeForce RTX 4090": {"displayName": "RTX 4090", "memoryInGb": 24, "communityPrice": 0.34, "securePrice": 0.69,
                                "communitySpotPrice": 0.20, "secureSpotPrice": 0.35},
    "NVIDIA RTX A6000": {"displayName": "RTX A6000", "memoryInGb": 48, "communityPrice": 0.33, "securePrice": 0.49,
                         "communitySpotPrice": 0.19, "secureSpotPrice": 0.25},
    "NVIDIA L40S": {"displayName": "L40S", "memoryInGb": 48, "communityPrice": 0.79, "securePrice": 0.86,
                    "communitySpotPrice": None, "secureSpotPrice": 0.45},
}


@dataclass
class FakePod:
    id: str
    name: str
    image_name: str
    gpu_type_id: str
    cloud_type: str
    cost_per_hr: float
    env: dict
    docker_args: str
    created_at: float
    provisioned_at: Optional[float]  # None: stuck pulling its image forever
    stopped_at: Optional[float] = None
    terminated_at: Optional[float] = None
    container_env: dict = field(default_factory=dict)
    restarts: int = 0
    interruptible: bool = False
    gpu_count: int = 1
    has_container: bool = False  # the runtime started one (start_containers)

    @property
    def running(self) -> bool:
        return self.terminated_at is None and self.stopped_at is None

    def dollars(self, now: float) -> float:
        end = self.terminated_at or self.stopped_at or now
        return (end - self.created_at) / 3600 * self.cost_per_hr


@dataclass
class FakeRunpod:
    api_key: str = "test-key"
    capacity: dict = field(default_factory=lambda: {gpu: 10 for gpu in GPU_TYPES})
    provisioning_seconds: float = 0.2
    stuck_provisioning: bool = False
    # Queued faults, one per request: 500, 429, "non-json", "graphql-500" (a 500 whose
    # body is a GraphQL error, "internal error", as the real API answers some outages),
    # "drop" (the connection closes with no answer), "new-shape" (a 200 whose data
    # lacks the field asked for, as after an API change). "after-" before any of them:
    # the request is carried out first, then its answer is lost so.
    failures: list = field(default_factory=list)
    # Where a cloud_type ALL pod lands, and so what it is billed.
    all_cloud_lands_on: str = "COMMUNITY"
    # Runpod may start a pod's container again when it exits; by default the pod shows
    # as EXITED instead (still billed until terminated).
    restart_exited_containers: bool = False
    # Each pod's own key is this followed by the pod's id.
    pod_key_prefix: str = "pod-key-"
    # When set, each pod's container runs there (LocalProcesses, or real containers
    # in tests/docker_engine.py) with the pod's env and Runpod's own variables, and
    # terminating the pod kills it.
    pod_runtime: Optional[Any] = None
    # False: pods reach RUNNING but their container never starts (a crash loop, a wrong
    # image, an entrypoint that dies before Python): only the launcher can end them.
    # A function of the pod decides per pod.
    start_containers: Any = True
    # GPU types whose prices the API does not list (None); their pods are still billed
    # at the real price, which each pod shows as its costPerHr.
    unlisted_prices: set = field(default_factory=set)

    def __post_init__(self):
        self.pods: dict[str, FakePod] = {}
        self.requests: list[str] = []
        self.received: list[tuple[str, bytes]] = []  # (Authorization header, body) of every request
        self._lock = threading.Lock()
        self._ids = (f"fakepod{n:04d}" for n in itertools.count(1))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = fake.handle(self.path, self.headers.get("Authorization", ""), body)
                if payload is DROP:
                    self.close_connection = True  # no status line: the client sees the connection end
                    return
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a pod's process killed mid-request (by its own terminate) is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # -- the ledger -------------------------------------------------------------------

    def running_pods(self) -> list[FakePod]:
        """Pods still billed: not terminated (an exited pod's disk is billed too)."""
        with self._lock:
            return [p for p in self.pods.values() if p.terminated_at is None]

    def dollars(self, pod_id: str) -> float:
        return self.pods[pod_id].dollars(time.time())

    # -- the API ----------------------------------------------------------------------

    def pod_key(self, pod_id: str) -> str:
        return f"{self.pod_key_prefix}{pod_id}"

    def handle(self, path: str, authorization: str, body: bytes) -> tuple[int, Any]:
        with self._lock:
            self.received.append((authorization, body))
        if path != "/graphql":
            return 404, {"message": "not found"}
        key = authorization.removeprefix("Bearer ")
        # own_pod: the pod whose own key this is (None for the account's key); it reaches that pod only.
        own_pod = next((pod_id for pod_id in list(self.pods) if key == self.pod_key(pod_id)), None)
        if key != self.api_key and own_pod is None:
            return 401, {"message": "unauthorized"}
        with self._lock:
            fault = self.failures.pop(0) if self.failures else None
        if fault is not None and not str(fault).startswith("after-"):
            return lost_answer(fault)
        query = json.loads(body)["query"]
        try:
            document = parse(query)
        except GraphQLSyntaxError as exc:
            return 400, {"errors": [{"message": f"Syntax Error: {exc.message}"}]}
        data = {}
        for operation in document.definitions:
            for node in operation.selection_set.selections:
                name = node.name.value
                self.requests.append(name)
                args = {arg.name.value: value_from_ast_untyped(arg.value) for arg in node.arguments or ()}
                if own_pod and (name not in ("pod", "podStop", "podTerminate") or (args.get("input") or {}).get("podId") != own_pod):
                    return 200, {"errors": [{"message": "a pod's API key reaches its own pod only"}], "data": None}
                try:
                    value = getattr(self, f"_{name}")(args.get("input") or {})
                except LookupError as exc:
                    return 200, {"errors": [{"message": str(exc)}], "data": None}
                data[node.alias.value if node.alias else name] = select(value, node)
        if fault is not None:
            return lost_answer(str(fault)[len("after-") :])
        return 200, {"data": data}

    def _gpuTypes(self, query: dict) -> list[dict]:
        ids = [query["id"]] if "id" in query else list(GPU_TYPES)
        return [self._listing(gpu) for gpu in ids if gpu in GPU_TYPES]

    def _listing(self, gpu: str) -> dict:
        if gpu in self.unlisted_prices:
            prices = {name: None for name in GPU_TYPES[gpu] if name.endswith("Price")}
            return {"id": gpu, **GPU_TYPES[gpu], **prices, "maxGpuCount": 8, "lowestPrice": {"minimumBidPrice": None, "uninterruptablePrice": None}}
        return {"id": gpu, **GPU_TYPES[gpu], "maxGpuCount": 8, "lowestPrice": {"minimumBidPrice": self._minimum_bid(gpu), "uninterruptablePrice": GPU_TYPES[gpu]["communityPrice"]}}

    @staticmethod
    def _minimum_bid(gpu: str) -> float:
        return min(p for p in (GPU_TYPES[gpu]["communitySpotPrice"], GPU_TYPES[gpu]["secureSpotPrice"]) if p)

    def _podFindAndDeployOnDemand(self, spec: dict) -> dict:
        landed = self.all_cloud_lands_on if spec.get("cloudType", "ALL") == "ALL" else spec["cloudType"]
        return self._deploy(spec, GPU_TYPES[spec["gpuTypeId"]]["securePrice" if landed == "SECURE" else "communityPrice"])

    def _podRentInterruptable(self, spec: dict) -> dict:
        """A spot pod, billed at its bid; ``preempt`` takes it away."""
        if spec["bidPerGpu"] < self._minimum_bid(spec["gpuTypeId"]):
            raise LookupError(f"Your bid price is below the minimum bid price of {self._minimum_bid(spec['gpuTypeId'])}")
        return self._deploy(spec, float(spec["bidPerGpu"]), interruptible=True)

    def preempt(self, pod_id: str) -> None:
        """Runpod takes a spot pod back: its container is killed and the pod is EXITED."""
        assert self.pods[pod_id].interruptible, "only spot pods are preempted"
        if self.pod_runtime:
            self.pod_runtime.kill(pod_id)
        self.pods[pod_id].stopped_at = time.time()

    def _deploy(self, spec: dict, price_per_gpu: float, interruptible: bool = False) -> dict:
        gpu = spec["gpuTypeId"]
        with self._lock:
            if self.capacity.get(gpu, 0) < 1:
                raise LookupError(NO_CAPACITY)
            self.capacity[gpu] -= 1
            now = time.time()
            pod = FakePod(
                id=next(self._ids), name=spec["name"], image_name=spec["imageName"], gpu_type_id=gpu,
                cloud_type=spec.get("cloudType", "ALL"), cost_per_hr=price_per_gpu * int(spec.get("gpuCount") or 1),
                gpu_count=int(spec.get("gpuCount") or 1),
                interruptible=interruptible, env={e["key"]: e["value"] for e in spec.get("env") or []},
                docker_args=spec.get("dockerArgs") or "", created_at=now,
                provisioned_at=None if self.stuck_provisioning else now + self.provisioning_seconds,
            )
            self.pods[pod.id] = pod
        if self.pod_runtime and (self.start_containers(pod) if callable(self.start_containers) else self.start_containers):
            from pipeline.runpod.pod_env import decode_env

            pod.container_env = {**pod.env, **decode_env(pod.env), "RUNPOD_POD_ID": pod.id,
                                 "RUNPOD_GPU_COUNT": str(pod.gpu_count), "RUNPOD_API_KEY": self.pod_key(pod.id), "RUNPOD_API_BASE_URL": self.url}
            self.pod_runtime.start(pod.id, pod.container_env)
            pod.has_container = True
        return self._pod_view(pod)

    def crash(self, pod_id: str) -> None:
        """The container dies (SIGKILL): the pod shows as exited, or its container starts again."""
        self.pod_runtime.kill(pod_id)
        self._reap(self.pods[pod_id])

    def _reap(self, pod: FakePod) -> None:
        with self._lock:
            if not (pod.has_container and pod.running and self.pod_runtime.exited(pod.id)):
                return
            if self.restart_exited_containers:
                pod.restarts += 1
                self.pod_runtime.start(pod.id, pod.container_env)
            else:
                pod.stopped_at = time.time()  # the pod is EXITED

    def _pod(self, query: dict) -> Optional[dict]:
        pod = self.pods.get(query["podId"])
        return None if pod is None or pod.terminated_at else self._pod_view(pod)

    def _myself(self, _query: dict) -> dict:
        return {"pods": [self._pod_view(p) for p in self.pods.values() if not p.terminated_at]}

    def _podStop(self, query: dict) -> dict:
        pod = self._existing(query["podId"])
        pod.stopped_at = pod.stopped_at or time.time()
        return self._pod_view(pod)

    def _podTerminate(self, query: dict) -> None:
        pod = self._existing(query["podId"])
        with self._lock:
            if not pod.terminated_at:
                pod.terminated_at = time.time()
                self.capacity[pod.gpu_type_id] += 1
        if self.pod_runtime:
            self.pod_runtime.kill(pod.id)  # the platform ends the container with the pod
        return None

    def stop(self) -> None:
        if self.pod_runtime:
            self.pod_runtime.stop()
        self.server.shutdown()
        self.server.server_close()

    def _existing(self, pod_id: str) -> FakePod:
        pod = self.pods.get(pod_id)
        if pod is None or pod.terminated_at:
            raise LookupError(f"pod {pod_id} not found")
        return pod

    def _pod_view(self, pod: FakePod) -> dict:
        self._reap(pod)
        now = time.time()
        provisioned = pod.provisioned_at is not None and now >= pod.provisioned_at and pod.running
        return {
            "id": pod.id,
            "name": pod.name,
            "imageName": pod.image_name,
            "env": [f"{k}={v}" for k, v in pod.env.items()],
            "dockerArgs": pod.docker_args,
            "desiredStatus": "RUNNING" if pod.running else "EXITED",
            "costPerHr": pod.cost_per_hr,
            "gpuCount": pod.gpu_count,
            "machineId": f"machine-{pod.id}",
            "machine": {"podHostId": f"host-{pod.id}", "gpuDisplayName": GPU_TYPES[pod.gpu_type_id]["displayName"]},
            "lastStatusChange": "Rented by User",
            "uptimeSeconds": int(now - pod.provisioned_at) if provisioned else 0,
            "runtime": {"uptimeInSeconds": int(now - pod.provisioned_at), "ports": []} if provisioned else None,
        }


DROP = object()  # the handler closes the connection without answering


def lost_answer(fault: Any) -> tuple[int, Any]:
    """How the API answers a request it failed (or carried out, then failed to answer)."""
    if fault == "non-json":
        return 502, b"<html>Bad Gateway</html>"
    if fault == "new-shape":
        return 200, {"data": {}}
    if fault == "graphql-500":
        return 500, {"errors": [{"message": "internal error"}], "data": None}
    if fault == "drop":
        return 0, DROP
    return int(fault), {"message": "injected failure"}


def assert_no_pod_billed(api: FakeRunpod, timeout: float = 60) -> None:
    """How every Runpod scenario ends: no pod still billed, and each pod's ledger record
    says it ended and what it cost, to within a second of the fake's clock."""
    from pipeline.runpod.orchestrator import PodLedger

    deadline = time.monotonic() + timeout
    while api.running_pods() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert api.running_pods() == [], "a pod was left running"
    for pod in api.pods.values():
        record = PodLedger(pod.env["PIPELINE_OUTPUT"]).get(pod.id)
        assert record["stopped_at_epoch"] is not None, f"the ledger shows {pod.id} as running"
        assert PodLedger.dollars(record) == pytest.approx(api.dollars(pod.id), abs=1e-4), (record, pod)


class LocalProcesses:
    """Each pod's container as a local process: the entrypoint and watchdog run for
    real, without an image. ``command`` and ``base_env`` may be changed per test; with
    ``log_dir`` each pod's output is kept there (``logs``)."""

    def __init__(self, command: list, base_env: Optional[dict] = None, cwd: Optional[str] = None, log_dir: Optional[str] = None, *,
                 tmp_root: str):
        self.command, self.base_env, self.cwd, self.log_dir = command, dict(base_env or {}), cwd, log_dir
        self.tmp_root = tmp_root  # under the test's tmp_path, so pytest removes it
        self.processes: dict[str, subprocess.Popen] = {}

    def tmp_of(self, pod_id: str) -> str:
        """The pod's own TMPDIR (``tmp_root/<pod id>``)."""
        return os.path.join(self.tmp_root, pod_id)

    def start(self, pod_id: str, env: dict) -> None:
        output = open(os.path.join(self.log_dir, f"{pod_id}.log"), "ab") if self.log_dir else subprocess.DEVNULL
        # A session of its own: killing the "container" kills everything in it, as on Runpod.
        # A /tmp of its own too, as a container has: Luigi's one-run-per-command lock lives
        # there, and two pods of tests running side by side run the same command.
        os.makedirs(self.tmp_of(pod_id), exist_ok=True)
        self.processes[pod_id] = subprocess.Popen(self.command, env={**self.base_env, **env, "TMPDIR": self.tmp_of(pod_id)},
                                                  cwd=self.cwd,
                                                  stdout=output, stderr=subprocess.STDOUT if self.log_dir else subprocess.DEVNULL,
                                                  start_new_session=True)
        if self.log_dir:
            output.close()  # the process has its own copy

    def logs(self, pod_id: str) -> str:
        with open(os.path.join(self.log_dir, f"{pod_id}.log"), errors="replace") as file:
            return file.read()

    def exited(self, pod_id: str) -> bool:
        return self.processes[pod_id].poll() is not None

    def kill(self, pod_id: str) -> None:
        process = self.processes.get(pod_id)
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group outlives a leader that exited
        except ProcessLookupError:
            pass
        process.wait()

    def stop(self) -> None:
        for pod_id in self.processes:
            self.kill(pod_id)


def select(value: Any, node: FieldNode) -> Any:
    """The parts of ``value`` that the query's selection set asks for."""
    if node.selection_set is None or value is None:
        return value
    if isinstance(value, list):
        return [select(item, node) for item in value]
    return {
        (child.alias.value if child.alias else child.name.value): select(value.get(child.name.value), child)
        for child in node.selection_set.selections
    }
