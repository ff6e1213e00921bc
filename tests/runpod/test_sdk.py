"""``sdk.import_runpod``: the SDK without the side effects of its import, checked in a
clean process each time (an import happens once per process)."""

import json
import subprocess
import sys

from helpers import ROOT, luigi_env

IMPORT_AND_REPORT = """
import json, logging, sys
spawned = []
sys.addaudithook(lambda event, args: spawned.append([str(part) for part in args[1]]) if event == "subprocess.Popen" else None)
root = logging.getLogger()
before = list(root.handlers)
if sys.argv[1] == "plain":
    import runpod
else:
    from pipeline.runpod.sdk import import_runpod
    runpod = import_runpod()
    assert import_runpod() is runpod
import cpuinfo
from runpod.serverless.utils import rp_debugger
print(json.dumps({"spawned": spawned, "handlers_added": len(root.handlers) - len(before),
                  "processor": rp_debugger.PROCESSOR, "cpuinfo_restored": cpuinfo.get_cpu_info.__module__ == "cpuinfo.cpuinfo",
                  "has_terminate": hasattr(runpod, "terminate_pod")}))
"""


def pythons(spawned: list[list[str]]) -> list[list[str]]:
    """The Python processes among those started (py-cpuinfo also runs ``file`` and
    ``uname`` at import: a few milliseconds)."""
    return [command for command in spawned if command[0] == sys.executable]


def report(how: str) -> dict:
    child = subprocess.run([sys.executable, "-c", IMPORT_AND_REPORT, how], cwd=ROOT, env=luigi_env(),
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_the_sdk_imported_plainly_starts_a_python_and_adds_a_root_handler():
    """What import_runpod is there for (if a new SDK stops doing either, it can go)."""
    plain = report("plain")
    assert any("cpuinfo" in " ".join(command) for command in pythons(plain["spawned"])), plain
    assert plain["handlers_added"] == 1


def test_import_runpod_starts_no_python_and_adds_no_handler_and_the_sdk_still_knows_the_processor():
    ours = report("ours")
    assert pythons(ours["spawned"]) == [] and ours["handlers_added"] == 0
    assert ours["processor"] and ours["processor"] != "Unable to get processor info."
    assert ours["cpuinfo_restored"] and ours["has_terminate"]
