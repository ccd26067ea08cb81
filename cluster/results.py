"""The results directory of a dataset job: its layout, and ``Results`` to read one.

Layout (written by ``cluster.jobs``, every file atomically)::

    manifest.json            model, weights hash, options, routescope version, dataset hash, counts
    failed.json              prompts of the latest run that could not be traced, with reasons
    prompts/<index:06d>.msgpack
                             the full edge set of one prompt (``FlowGraph.save``); its ``trace``
                             holds the prompt, the job's ``JobMeta``, the route summary and the
                             per-head previous-token attention sums (see ``cluster.stats``)

A prompt's file is complete or absent, so the files present are the prompts done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from routescope.workers.edgeset import EdgeSet, EdgeSetError

from .graph import FlowGraph

MANIFEST = "manifest.json"
FAILED = "failed.json"
PROMPTS = "prompts"


def prompt_path(results: str | os.PathLike, index: int) -> Path:
    """The file of prompt ``index`` in the results directory ``results``."""
    return Path(results) / PROMPTS / f"{int(index):06d}.msgpack"


def done_indexes(results: str | os.PathLike) -> set[int]:
    """Indexes whose result file exists (complete, since files are written atomically)."""
    d = Path(results) / PROMPTS
    if not d.is_dir():
        return set()
    return {int(p.stem) for p in d.iterdir()
            if p.suffix == ".msgpack" and p.stem.isdigit() and not p.name.startswith(".")}


def is_results_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a job's results directory (a manifest and a list of failures)."""
    path = Path(path)
    return (path / MANIFEST).is_file() and (path / FAILED).is_file()


class Results:
    """A results directory of a dataset job: manifest, failures and per-prompt edge sets.

    Statistics over it are functions of ``cluster.stats`` (``importance(results)``, ...); its
    views are in ``viewer.stats_view``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.path} is not a results directory (no {MANIFEST})")
        self._cache: dict[int, EdgeSet] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def failed(self) -> list[dict[str, Any]]:
        p = self.path / FAILED
        return json.loads(p.read_text()) if p.is_file() else []

    @property
    def indexes(self) -> list[int]:
        return sorted(done_indexes(self.path))

    def __len__(self) -> int:
        return len(self.indexes)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Results({str(self.path)!r}, model={m.get('model')!r}, done={len(self)}, "
                f"failed={len(self.failed)}, status={m.get('status')!r})")

    def edges(self, index: int) -> EdgeSet:
        """The edge set of prompt ``index`` (``KeyError`` if not done, ``EdgeSetError`` if corrupt)."""
        if index not in self._cache:
            p = prompt_path(self.path, index)
            if not p.is_file():
                raise KeyError(f"prompt {index} has no result in {self.path}")
            try:
                self._cache[index] = EdgeSet.decode(p.read_bytes())
            except EdgeSetError as exc:
                raise EdgeSetError(f"{p}: {exc}") from None
        return self._cache[index]

    def problems(self) -> dict[int, str]:
        """Prompt files that do not decode to a valid edge set, by index: ``{index: 'path: why'}``.
        The others load as usual; statistics skip these with a warning."""
        out = {}
        for i in self.indexes:
            try:
                self.edges(i)
            except EdgeSetError as exc:
                out[i] = str(exc)
        return out

    def graph(self, index: int) -> FlowGraph:
        """The ``FlowGraph`` of prompt ``index`` (routes; no live details)."""
        return FlowGraph(self.edges(index))

    def graphs(self) -> Iterator[FlowGraph]:
        for i in self.indexes:
            yield self.graph(i)

    def __iter__(self) -> Iterator[FlowGraph]:
        return self.graphs()

    def table(self):
        """One row per traced prompt (a DataFrame): index, line, prompt, tokens, top prediction."""
        import pandas as pd

        rows = []
        for i in self.indexes:
            es = self.edges(i)
            trace = es.trace
            pred = trace.prediction or [{}]
            rows.append({"index": i, "line": trace.job.line if trace.job else None, "prompt": trace.prompt,
                         "n_tokens": es.n_tokens, "prediction": pred[0].get("token")})
        return pd.DataFrame(rows)

    def serve_command(self) -> str:
        return f"routescope serve --results {self.path}"
