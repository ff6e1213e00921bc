"""What this project does to and around the runpod SDK: import it without its logging
and subprocess side effects, let it see HTTP statuses, tell its "try again" errors from the others,
describe them in one line, and the spot-pod mutation it has no call for.

The SDK has no retries of its own: a 5xx or 429 without a GraphQL error comes back as a
body the SDK then fails to read (``KeyError: 'data'`` or a JSON decode error), and one
with a GraphQL error ("internal error") as a ``QueryError`` like any refused request.
``StatusAwareRequests`` lets it see the HTTP status, so every 5xx and 429 is retried.
"""

from __future__ import annotations

import json
import logging
import re

from pipeline.errors import is_network_error


class ApiUnavailable(Exception):
    """The API answered 5xx or 429: an outage or a rate limit, to be retried."""


class StatusAwareRequests:
    """The ``requests`` module as the SDK's query runner sees it, except that an answer
    of status 5xx or 429 raises ``ApiUnavailable`` before the SDK reads its body (a
    GraphQL error body would otherwise become a ``QueryError``, and a retry is lost)."""

    def __init__(self, requests_module):
        self._requests = requests_module

    def __getattr__(self, name):
        return getattr(self._requests, name)

    def post(self, *args, **kwargs):
        response = self._requests.post(*args, **kwargs)
        if response.status_code >= 500 or response.status_code == 429:
            try:
                detail = response.json()["errors"][0]["message"]
            except Exception:
                detail = response.text[:120].strip() or response.reason
            raise ApiUnavailable(f"HTTP {response.status_code}: {detail}")
        return response


def import_runpod():
    """The SDK, without two side effects of its import:

    - the root logging handler it installs (its upload helper calls
      ``logging.basicConfig``), which printed every log line of ours twice;
    - a second Python process: its serverless debugger asks py-cpuinfo for the
      processor's name, which py-cpuinfo finds by running itself in a subprocess, in
      every launcher and in every pod's watchdog, where the pod is billed for it (its cost:
      docs/performance.md); the name, which only serverless workers print, comes from
      /proc/cpuinfo instead."""
    import sys

    if "runpod" in sys.modules:
        return sys.modules["runpod"]
    import cpuinfo

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    asked = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = _processor_name
    try:
        import runpod
    finally:
        cpuinfo.get_cpu_info = asked
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return runpod


def _processor_name() -> dict[str, str]:
    """The one field of ``cpuinfo.get_cpu_info()`` the SDK reads at import."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return {"brand_raw": line.split(":", 1)[1].strip()}
    except OSError:
        pass
    return {"brand_raw": platform.processor()}


def let_the_sdk_see_http_status() -> None:
    """Wrap the SDK's HTTP calls once per process (idempotent)."""
    from runpod.api import graphql

    if not isinstance(graphql.requests, StatusAwareRequests):
        graphql.requests = StatusAwareRequests(graphql.requests)


def is_transient(exc: BaseException) -> bool:
    """The SDK's ways of saying 'try again': a body without data (5xx, 429: the SDK
    indexes ``response["data"]`` and raises KeyError('data')), a body that is not JSON (a
    proxy's error page), a dropped connection or a timeout. Any other KeyError is a
    change in the API's shape and is not retried."""
    if isinstance(exc, KeyError):
        return exc.args == ("data",)
    if isinstance(exc, (ApiUnavailable, json.JSONDecodeError)) or is_network_error(exc):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "JSONDecodeError" in names or ("QueryError" in names and bool(_TRANSIENT_MESSAGE.search(str(exc))))


# A GraphQL error that says "try again" even on a 200 answer.
_TRANSIENT_MESSAGE = re.compile(r"rate limit|too many requests|try again later|internal (server )?error|"
                                r"temporarily unavailable|service unavailable|timed? ?out", re.I)


def spot_pod_mutation(name: str, image_name: str, gpu_type_id: str, cloud_type: str, gpu_count: int,
                      container_disk_in_gb: int, docker_args: str, env: dict[str, str], support_public_ip: bool,
                      start_ssh: bool, bid_per_gpu: float) -> str:
    """Runpod's ``podRentInterruptable``: the SDK's on-demand create with a bid per GPU.
    Strings are written as JSON strings, which GraphQL reads the same way.

    Args:
        name, image_name, gpu_type_id, cloud_type, gpu_count, container_disk_in_gb,
        docker_args, env, support_public_ip, start_ssh: as the SDK's ``create_pod``.
        bid_per_gpu: dollars per hour per GPU offered (the spot price found).
    """
    def text(value: str) -> str:
        return json.dumps(value)

    env_items = ", ".join(f"{{ key: {text(k)}, value: {text(v)} }}" for k, v in env.items())
    fields = [
        f"name: {text(name)}", f"imageName: {text(image_name)}", f"gpuTypeId: {text(gpu_type_id)}",
        f"bidPerGpu: {bid_per_gpu:.4f}", f"cloudType: {cloud_type}", f"gpuCount: {gpu_count}",
        f"containerDiskInGb: {container_disk_in_gb}", "volumeInGb: 0", f"dockerArgs: {text(docker_args)}",
        f"supportPublicIp: {str(support_public_ip).lower()}", f"startSsh: {str(start_ssh).lower()}", f"env: [{env_items}]",
    ]
    return (f"mutation {{ podRentInterruptable(input: {{ {', '.join(fields)} }}) "
            "{ id desiredStatus imageName env machineId machine { podHostId } } }")


def describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args == ("data",):
        return "the API answered without data (a server error or rate limit)"
    if isinstance(exc, KeyError):
        return f"the API's answer lacks the field {exc.args[0]!r}: has the API changed? (runpod SDK out of date?)"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
