"""What a launcher tells its pod, as environment variables: one contract, written on
the launcher's side (``to_env``) and read in the pod and by whoever ends an orphan
(``from_env``).

- The run's settings (those declared ``to_pods`` in pipeline/settings.py) are their own
  ``PIPELINE_<NAME>`` variables, the names ``config.setting`` reads, so the pod's workers
  take them as their defaults, as any machine would (``settings_env``).
- Everything else is the launcher→pod protocol, named ``LAUNCH_*`` so that it is never
  taken for a user's setting: the watchdog's limits (``LAUNCH_WATCHDOG_*``,
  ``watchdog.Limits``), and the two below.
- ``PodWorkers``: how many GPUs the pod has and which scheduler its workers share.
- ``PodIdentity``: who the pod is (name, run, GPU, price, image, creation), from which
  its ledger record is rebuilt when its launcher never wrote one.
- Values the runpod SDK cannot carry in its GraphQL travel base64-encoded
  (``encode_env`` / ``decode_env``).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.output.ledger import ledger_record
from pipeline.settings import SETTINGS, declared

PROTOCOL = "LAUNCH_"

_SAFE_ENV_VALUE = re.compile(r'^[^"\\\n\r]*$')


def settings_env(settings: dict[str, object]) -> dict[str, str]:
    """Run settings as the variables a pod's workers read; None left out. Only settings
    declared to travel to pods (``to_pods``)."""
    travelling = {setting.name for setting in SETTINGS if setting.to_pods}
    unknown = set(settings) - travelling
    if unknown:
        raise ValueError(f"not settings that travel to pods: {sorted(unknown)}")
    return {declared(name).env: declared(name).text(value) for name, value in settings.items() if value is not None}


@dataclass(frozen=True)
class PodWorkers:
    """How the pod's watchdog runs its workers."""

    gpus: int = 1  # one worker per GPU, each pinned to its own
    scheduler_url: str = ""  # a luigid shared with other pods; empty: one on the pod's loopback

    def to_env(self) -> dict[str, str]:
        env = {"LAUNCH_GPUS": str(self.gpus)}
        if self.scheduler_url:
            env["LAUNCH_SCHEDULER_URL"] = self.scheduler_url
        return env

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "PodWorkers":
        """GPUs: the launcher says how many it rented; Runpod's own count is the fallback."""
        gpus = 1
        for name in ("LAUNCH_GPUS", "RUNPOD_GPU_COUNT"):
            if env.get(name, "").strip():
                gpus = max(int(env[name]), 1)
                break
        return cls(gpus=gpus, scheduler_url=env.get("LAUNCH_SCHEDULER_URL", ""))


@dataclass(frozen=True)
class PodIdentity:
    """Who a pod is, put in its env by the launcher that creates it."""

    name: str = ""
    run_id: str = "unrecorded"
    gpu_type: str = ""
    cloud_type: str = ""
    image: str = ""
    created_at: Optional[float] = None  # epoch seconds; billing starts no later
    price_per_hour: float = 0.0  # as listed; 0: unknown, and the watchdog asks its pod's costPerHr

    def to_env(self) -> dict[str, str]:
        env = {
            "LAUNCH_POD_NAME": self.name,
            "LAUNCH_RUN_ID": self.run_id,
            "LAUNCH_GPU_TYPE": self.gpu_type,
            "LAUNCH_CLOUD_TYPE": self.cloud_type,
            "LAUNCH_IMAGE": self.image,
        }
        if self.created_at is not None:
            env["LAUNCH_WATCHDOG_CREATED_AT"] = str(self.created_at)
        if self.price_per_hour:  # no listed price: never a 0 the watchdog would trust
            env["LAUNCH_WATCHDOG_PRICE_PER_HOUR"] = str(self.price_per_hour)
        return env

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "PodIdentity":
        created, price = env.get("LAUNCH_WATCHDOG_CREATED_AT"), env.get("LAUNCH_WATCHDOG_PRICE_PER_HOUR")
        return cls(
            name=env.get("LAUNCH_POD_NAME", ""), run_id=env.get("LAUNCH_RUN_ID", "unrecorded"),
            gpu_type=env.get("LAUNCH_GPU_TYPE", ""), cloud_type=env.get("LAUNCH_CLOUD_TYPE", ""),
            image=env.get("LAUNCH_IMAGE", ""), created_at=float(created) if created else None,
            price_per_hour=float(price) if price else 0.0,
        )

    def ledger_record(self, pod_id: str, price: float, gpu_count: int, now: float) -> dict[str, Any]:
        """The pod's ledger record, for a pod whose record was never written (its launcher
        died): by its watchdog, or by the launch that ends it as an orphan."""
        started = self.created_at if self.created_at is not None else now
        return ledger_record(pod_id, self.name, self.run_id, self.gpu_type, gpu_count, self.cloud_type, price,
                             self.image, started)


def encode_env(env: dict[str, str]) -> dict[str, str]:
    """The SDK pastes env values into its GraphQL text unescaped, so a quote, backslash
    or newline (a service-account JSON) would break the query. Such values travel
    base64-encoded as ``NAME_B64``; ``decode_env`` restores them inside the pod."""
    encoded = {}
    for key, value in env.items():
        if _SAFE_ENV_VALUE.match(value):
            encoded[key] = value
        else:
            encoded[f"{key}_B64"] = base64.b64encode(value.encode()).decode()
    return encoded


def decode_env(environ: dict[str, str]) -> dict[str, str]:
    """The variables ``encode_env`` encoded, decoded (for the pod's entrypoint)."""
    return {key[: -len("_B64")]: base64.b64decode(value).decode() for key, value in environ.items() if key.endswith("_B64")}
