"""The layering the README draws, checked on the source: workers -> cluster -> viewer.

* ``workers/`` (stage side) imports nothing of ``cluster/``, ``viewer/`` or the top-level package.
* ``cluster/`` (coordinator) imports nothing of ``viewer/`` or the top-level package.
* Only ``cluster/stage_clients.py`` holds a ``Stage``; nothing outside ``cluster/`` (and the
  stage itself) reaches into a stage's bridge or a client's stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package folder
                pkg = {"workers": "routescope.workers", "cluster": "routescope.cluster",
                       "viewer": "routescope.viewer", "routescope": "routescope"}[path.parent.name]
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("layer,forbidden", [
    ("workers", ("routescope.cluster", "routescope.viewer", "routescope.cli")),
    ("cluster", ("routescope.viewer", "routescope.cli")),
])
def test_lower_layers_do_not_import_upper_ones(layer, forbidden):
    for path in sorted((ROOT / layer).glob("*.py")):
        for name in _imports(path):
            assert not name.startswith(forbidden), f"{path.name} imports {name}"
            assert name not in ("routescope", "routescope.load", "routescope.trace"), \
                f"{path.name} imports the top-level package ({name})"


def test_nothing_outside_cluster_reaches_into_stages():
    for folder in ("viewer", "routescope", "benchmarks", "examples", "cluster", "tests"):
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name in ("stage_clients.py", "test_architecture.py"):
                continue
            text = path.read_text()
            for needle in ("client.stage", "._stage", ".bridge.", "stage.bridge"):
                assert needle not in text, f"{folder}/{path.name} reaches into a stage ({needle})"
