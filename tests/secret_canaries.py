"""The fake secrets tests/test_secrets.py looks for, and a checkout with them planted.

Every credential is a recognisable fake holding the marker ``SECRETCANARY``. The pod's
image the docker tests share (tests/conftest.py) is built from ``plant_checkout``'s copy
with ``launcher_secrets`` in the environment, so test_secrets.py scans the very image
the real-container tests run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from helpers import ROOT

MARKER = b"SECRETCANARY"


def service_account(who: str) -> str:
    """A Google service-account key file's text, every identifying field a canary."""
    return json.dumps({
        "type": "service_account",
        "project_id": "canary-project",
        "private_key_id": f"SECRETCANARY0{who}0KEYID",
        "private_key": f"-----BEGIN PRIVATE KEY-----\nMIIEvSECRETCANARY0{who}0PRIVATEKEY\n-----END PRIVATE KEY-----\n",
        "client_email": f"SECRETCANARY-{who.lower()}@canary-project.iam.gserviceaccount.com",
        "client_id": "100000000000000000001",
        "token_uri": "https://oauth2.googleapis.com/token",
    }, indent=2)


LAUNCHER_RUNPOD_KEY = "rpa_SECRETCANARY0LAUNCHER0RUNPOD0KEY"
POD_RUNPOD_KEY_PREFIX = "rpa_SECRETCANARY0POD0RUNPOD0KEY0"  # the fake issues one per pod
LAUNCHER_GOOGLE_KEY, POD_GOOGLE_KEY = service_account("LAUNCHER"), service_account("POD")
LAUNCHER_AWS = ("AKIASECRETCANARY0LAUNCHER", "SECRETCANARY0launcher0aws0secret/+key")
POD_AWS = ("AKIASECRETCANARY0POD", "SECRETCANARY0pod0aws0secret/+key")
REGISTRY_LOGIN = ("canary-robot", "SECRETCANARY0registry0password")
GIT_REMOTE = "https://x-access-token:ghp_SECRETCANARY0GIT0TOKEN@github.com/you/pipeline"


def write_project(folder: Path) -> Path:
    """The launcher's working folder: its ``.env`` and two service-account key files
    (where docs/security.md says to keep them: outside any checkout)."""
    folder.mkdir()
    keys = folder / "keys"
    keys.mkdir(mode=0o700)
    (keys / "launcher.json").write_text(LAUNCHER_GOOGLE_KEY)
    (keys / "pod.json").write_text(POD_GOOGLE_KEY)
    (folder / ".env").write_text(
        f"RUNPOD_API_KEY={LAUNCHER_RUNPOD_KEY}\n"
        f"GOOGLE_APPLICATION_CREDENTIALS={keys / 'launcher.json'}\n"
        f"PIPELINE_POD_GOOGLE_APPLICATION_CREDENTIALS={keys / 'pod.json'}\n"
        f"AWS_SECRET_ACCESS_KEY={LAUNCHER_AWS[1]}\n"
        f"PIPELINE_POD_AWS_SECRET_ACCESS_KEY={POD_AWS[1]}\n"
        f"PIPELINE_REGISTRY_PASSWORD={REGISTRY_LOGIN[1]}\n"
    )
    return folder


def plant_checkout(folder: Path) -> Path:
    """A copy of this checkout (``folder/checkout``) as someone's working copy might
    hold it: a ``.env``, a remote URL with a token in ``.git/config``, a service-account
    key file at the top (where ``gcloud iam service-accounts keys create`` puts it),
    local state and output. The ``.env``'s key files are in ``folder/elsewhere``."""
    copy = folder / "checkout"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    git = ["git", "-C", str(copy), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "checkout"], check=True)
    subprocess.run([*git, "remote", "add", "origin", GIT_REMOTE], check=True)
    shutil.copy(write_project(folder / "elsewhere") / ".env", copy / ".env")
    (copy / "pod-key.json").write_text(POD_GOOGLE_KEY)
    for path in ("var/luigi/state.pickle", "output/_runs/pods/fakepod0001.json", ".venv/secret.txt", "pipeline/__pycache__/x.pyc"):
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_text(f"RUNPOD_API_KEY={LAUNCHER_RUNPOD_KEY}\n")
    return copy


def launcher_secrets(checkout: Path) -> dict[str, str]:
    """What ``make image`` may find in its environment: the checkout's ``.env`` and the
    launcher's AWS key id and registry user."""
    env = dict(line.split("=", 1) for line in (checkout / ".env").read_text().splitlines())
    return {**env, "AWS_ACCESS_KEY_ID": LAUNCHER_AWS[0], "PIPELINE_REGISTRY_USERNAME": REGISTRY_LOGIN[0]}
