"""The output's layout: one module builds every path, and no other spells a name."""

import ast
from pathlib import Path

from pipeline.output import layout
from pipeline.output.layout import OutputLayout

from helpers import ROOT

# Pieces of the output's file and folder names that only pipeline/output/layout.py may spell.
LAYOUT_NAMES = ("_SUCCESS.json", "manifest.parquet", "/shards", "/rejects", "_runs", "shard-{", "shard-*", "shard-0",
                "shard-N", "/batches")


def code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal in a module's code, f-string pieces included;
    docstrings are prose about the layout, not paths, and are left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_but_layout_spells_an_output_name():
    spelled = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
               for path in sorted((ROOT / "pipeline").rglob("*.py")) if path.name != "layout.py"
               for line, text in code_strings(path) if any(name in text for name in LAYOUT_NAMES)]
    assert spelled == []


def test_the_checker_finds_a_spelled_name(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Writes _SUCCESS.json."""\ndef f(out):\n    """About shards/."""\n    return f"{out}/shards/x", "1 shards/h"\n')
    assert [text for _, text in code_strings(module) if any(name in text for name in LAYOUT_NAMES)] == ["/shards/x"]


def test_every_path_of_an_output():
    out = OutputLayout.of("gs://bucket/run/")
    assert out == OutputLayout.of("gs://bucket/run")
    assert out.manifest == "gs://bucket/run/manifest.parquet"
    assert out.summary == "gs://bucket/run/_SUCCESS.json"
    assert out.shard(12) == "gs://bucket/run/shards/shard-000012.parquet"
    assert out.rejects_of(3) == "gs://bucket/run/rejects/shard-000003.jsonl"
    assert out.pod_record("abc") == "gs://bucket/run/_runs/pods/abc.json"
    assert out.launcher_lease("r1") == "gs://bucket/run/_runs/launchers/r1.json"
    assert OutputLayout.of("/").root == "/"


def test_a_listing_keeps_shards_and_names_strays(tmp_path):
    out = OutputLayout.of(str(tmp_path))
    (tmp_path / "shards" / "extra").mkdir(parents=True)
    for name in ("shard-000002.parquet", "shard-000000.parquet", "notes.parquet", "shard-12.parquet", "extra/shard-000001.parquet"):
        (tmp_path / "shards" / name).write_bytes(b"")
    listing = out.list_shards()
    assert listing.paths() == [out.shard(0), out.shard(2)]
    assert sorted(listing.strays) == ["shards/extra/shard-000001.parquet", "shards/notes.parquet", "shards/shard-12.parquet"]
    assert out.first_shard() in ((0, out.shard(0)), (2, out.shard(2)))
    assert layout.shard_number("shard-000007.jsonl", layout.REJECTS_SUFFIX) == 7
    assert layout.shard_number(".shard-000007.parquet.tmp", layout.SHARD_SUFFIX) is None
