"""The results directory of a dataset job: its layout, and ``Results`` to read one.

Layout (written by ``cluster.jobs``, every file atomically)::

    manifest.json            model, weights hash, options, routescope version, dataset hash, counts
    failed.json              prompts of the latest run that could not be traced, with reasons
    job.lock                 held (``flock``) by the job writing here; names its pid and start
    prompts/<index:06d>.msgpack
                             the full edge set of one prompt (``FlowGraph.save``); its ``trace``
                             holds the prompt, the job's ``JobMeta``, the route summary and the
                             per-head previous-token attention sums (see ``cluster.stats``)

A prompt's file is complete or absent, so the files present are the prompts done. Only names
``prompt_path`` writes count (6 or more ASCII digits, no extra leading zero, ``.msgpack``, a
regular file, not a symbolic link): anything else in ``prompts/`` (temporary files, stray or
look-alike names such as non-ASCII digits, directories, links) is neither done nor an error.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterator

from routescope.workers.edgeset import MAX_PAYLOAD_BYTES, EdgeSet, EdgeSetError, read_file

from .graph import FlowGraph

MANIFEST = "manifest.json"
FAILED = "failed.json"
PROMPTS = "prompts"
LOCK = "job.lock"
_PROMPT_NAME = re.compile(r"([0-9]{6,})\.msgpack", re.ASCII)


class ResultsError(ValueError):
    """A results directory that cannot be read as one (named in the message)."""


def prompt_path(results: str | os.PathLike, index: int) -> Path:
    """The file of prompt ``index`` in the results directory ``results``."""
    index = int(index)
    if index < 0:
        raise ValueError(f"prompt index {index} is negative")
    return Path(results) / PROMPTS / f"{index:06d}.msgpack"


def prompt_index(name: str) -> int | None:
    """The index of a file name ``prompt_path`` writes, else None (``000001.msgpack`` -> 1;
    ``0000001.msgpack``, ``١٢٣٤٥٦.msgpack``, ``.000001.msgpack.x.tmp`` -> None)."""
    m = _PROMPT_NAME.fullmatch(name)
    if m is None:
        return None
    index = int(m.group(1))
    return index if f"{index:06d}" == m.group(1) else None


def _prompts_dir(results: str | os.PathLike) -> Path | None:
    """``results/prompts`` when it is a directory, None when absent; ``ResultsError`` when it is
    something else (a file, a dangling link, a symbolic-link loop)."""
    d = Path(results) / PROMPTS
    try:
        st = os.stat(d)
    except FileNotFoundError:
        if os.path.islink(d):
            raise ResultsError(f"{d}: a dangling symbolic link, not a directory") from None
        return None
    except NotADirectoryError:  # results itself is not a directory: nothing done there
        return None
    except OSError as exc:  # ELOOP: a symbolic-link loop
        raise ResultsError(f"{d}: not a readable directory ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ResultsError(f"{d}: not a directory")
    return d


def done_indexes(results: str | os.PathLike) -> set[int]:
    """Indexes whose result file exists (complete, since files are written atomically): regular
    files under the names ``prompt_path`` writes; other entries are ignored."""
    d = _prompts_dir(results)
    if d is None:
        return set()
    out = set()
    try:
        with os.scandir(d) as it:
            for entry in it:
                index = prompt_index(entry.name)
                if index is None:
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        out.add(index)
                except OSError:
                    continue
    except OSError as exc:
        raise ResultsError(f"{d}: cannot list the directory ({exc.strerror or exc})") from None
    return out


MAX_JOB_FILE_BYTES = 64 * 2**20  # manifest.json, failed.json: a colleague's file is read bounded


def read_job_json(p: Path) -> Any:
    """A job file (manifest, failed list) as JSON, its size checked on the opened file first."""
    return json.loads(read_file(p, MAX_JOB_FILE_BYTES, what=p.name))


def _read_json(p: Path) -> Any:
    try:
        return read_job_json(p)
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{p}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None


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
        if os.path.islink(self.path / MANIFEST) and not (self.path / MANIFEST).exists():
            raise ResultsError(f"{self.path / MANIFEST}: a dangling symbolic link or a symbolic-link loop")
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.path} is not a results directory (no {MANIFEST})")
        self._cache: dict[int, EdgeSet] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        m = _read_json(self.path / MANIFEST)
        if not isinstance(m, dict):
            raise ResultsError(f"{self.path / MANIFEST}: not a job manifest (a JSON object)")
        return m

    @property
    def failed(self) -> list[dict[str, Any]]:
        p = self.path / FAILED
        return _read_json(p) if p.is_file() else []

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
            payload = _read_result(p)
            if payload is None:
                raise KeyError(f"prompt {index} has no result in {self.path}")
            try:
                self._cache[index] = EdgeSet.decode(payload)
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


def _read_result(p: Path, max_bytes: int | None = None) -> bytes | None:
    """The bytes of a prompt file: None when absent (or not a regular file: a link, a directory);
    ``EdgeSetError`` naming the file when unreadable or larger than an edge set may be (checked
    before anything is read)."""
    max_bytes = MAX_PAYLOAD_BYTES if max_bytes is None else max_bytes
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR) or os.path.islink(p) or os.path.isdir(p):
            return None
        raise EdgeSetError(f"{p}: unreadable ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > max_bytes:
            raise EdgeSetError(f"{p}: {st.st_size} bytes exceeds the limit of {max_bytes} for an edge set")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(st.st_size + 1)  # the file's size, not the limit: nothing larger is allocated
        if len(data) > max_bytes:  # grew since the check
            raise EdgeSetError(f"{p}: more than {max_bytes} bytes, the limit for an edge set")
        return data
    except OSError as exc:
        raise EdgeSetError(f"{p}: unreadable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
