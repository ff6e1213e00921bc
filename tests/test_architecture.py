"""The package's folders are its architecture: which folder may import which, a module
map in docs/architecture.md that matches the tree, and modules short enough to read.
Also the house rules a reader relies on: public functions with many parameters say what
each is, and no test patches a private name."""

import ast
import re
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "pipeline"

# What each folder may import from the pipeline itself; None: anything. Third-party
# imports are free, except Luigi and the Runpod SDK where NO_LUIGI_OR_RUNPOD says.
MAY_IMPORT = {
    "core": ("pipeline.core", "pipeline.storage", "pipeline.errors", "pipeline.settings",
             "pipeline.output.layout"),  # a shard is published into the layout
    "storage": ("pipeline.storage", "pipeline.errors", "pipeline.settings"),
    "output": ("pipeline.output", "pipeline.core", "pipeline.storage", "pipeline.errors", "pipeline.settings"),
    "runpod": None,
    "": None,
}
NO_LUIGI_OR_RUNPOD = ("core", "storage", "output")
# Modules over the length a reader takes in at once; each is a known debt, not a licence.
LONGEST = 450
TOO_LONG_FOR_NOW: set[str] = set()


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def folder_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else ""


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}; the package uses absolute ones"
            names.add(node.module)
            if node.module == "pipeline" or node.module.startswith("pipeline."):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_each_folder_imports_only_what_it_may():
    wrong = []
    for path in modules():
        folder = folder_of(path)
        for name in sorted(imported(path)):
            top = name.split(".")[0]
            if folder in NO_LUIGI_OR_RUNPOD and top in ("luigi", "runpod"):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            allowed = MAY_IMPORT[folder]
            if top == "pipeline" and allowed is not None and name != "pipeline":
                # "from pipeline.x import y": the module x (y may be a name in it, or a module under it)
                if not any(name == prefix or name.startswith(prefix + ".") for prefix in allowed):
                    parent = name.rsplit(".", 1)[0]
                    if not any(parent == prefix or parent.startswith(prefix + ".") for prefix in allowed):
                        wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def module_map() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return text[text.index("## Modules\n"):text.index("\n## ", text.index("## Modules\n") + 1)]


def test_the_module_map_names_every_module_and_only_those():
    named = set(re.findall(r"\*\*`([a-z0-9_/]+\.py)`\*\*", module_map()))
    tree = {str(path.relative_to(PACKAGE)) for path in modules()}
    assert tree - named == set(), "modules the map in docs/architecture.md does not describe"
    assert named - tree == set(), "modules the map describes that are not in the tree"


def test_modules_stay_short_enough_to_read():
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in modules()}
    assert {name for name, lines in lengths.items() if lines > LONGEST} <= TOO_LONG_FOR_NOW, lengths


def test_the_tests_mirror_the_package():
    """A module's tests sit in the folder of the same name (tests/core/ for pipeline/core/);
    tests of the top-level modules and of whole runs at the top of tests/."""
    folders = {path.parent.name for path in (ROOT / "tests").glob("*/test_*.py")}
    packages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert folders == packages, "test folders that are no package folder, or package folders without tests"


PATCHERS = {"setattr", "delattr", "object"}  # monkeypatch.setattr/delattr, mock.patch.object
DOTTED_PATCHERS = {"setattr", "delattr", "patch"}  # the same given "module.name", and mock.patch


def private_patches(source: str) -> list[str]:
    """Each call in ``source`` that patches a private attribute by name: a patcher whose
    second argument (or, for a dotted target, whose last name) starts with one underscore."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        strings = [arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None for arg in node.args]
        if name in DOTTED_PATCHERS and strings[0] and "." in strings[0]:  # monkeypatch.setattr("mod.name", v), mock.patch("mod.name")
            target = strings[0].rsplit(".", 1)[1]
        elif name in PATCHERS and len(strings) >= 2 and strings[1]:
            target = strings[1]
        else:
            continue
        if target.startswith("_") and not target.startswith("__"):
            found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_the_private_patch_finder_finds_what_it_must():
    source = ('monkeypatch.setattr(sync, "_publish", f)\nmock.patch.object(m, "_cache")\nmock.patch("a.b._c")\n'
              'monkeypatch.setattr("a.b._d", 1)\nmonkeypatch.delattr("a.b._e")\nmonkeypatch.setattr(e, "__init__", f)\n'
              'monkeypatch.setattr(e, "public", f)\n')
    assert [hit.split(":")[0] for hit in private_patches(source)] == ["line 1", "line 2", "line 3", "line 4", "line 5"]


def test_no_test_patches_a_private_attribute():
    """Tests go through what the code offers; a test that patches a private name breaks
    when the code is tidied, and proves a path no user takes."""
    patches = {str(path.relative_to(ROOT)): hits for path in sorted((ROOT / "tests").rglob("*.py"))
               if path.name != "test_architecture.py" and (hits := private_patches(path.read_text()))}
    assert patches == {}


MANY_PARAMETERS = 6
SHARES_ARGS = {"bench.py:bench": "run_bench"}  # a wrapper whose docstring points to the function it passes them to


def test_public_functions_with_many_parameters_say_what_each_is():
    """An ``Args:`` section where a call has too many parameters to guess from their names."""
    undocumented, documented = [], set()
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            names = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
            if "Args:" in (ast.get_docstring(node) or ""):
                documented.add(node.name)
            elif len(names) >= MANY_PARAMETERS and f"{path.relative_to(PACKAGE)}:{node.name}" not in SHARES_ARGS:
                undocumented.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert undocumented == []
    assert set(SHARES_ARGS.values()) <= documented
