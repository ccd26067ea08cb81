"""Bad input on every entry point (issue 6): one exact error naming the field and the allowed range,
no traceback on the command line, and nothing already stored changes.

A results directory (a finished dataset job) and a saved graph file are made once; every case runs
against them (the CLI cases write into them when they succeed) and their SHA-256 checksums must be
the same afterwards. Surfaces: the Python API, the ``routescope`` command (trace, run-job, submit, serve),
dataset jobs and result loading. The viewer's cases run in the browser (test_viewer_browser.py).
A tiny 4-layer Llama (context 512) keeps the model loads cheap; the prompt used for graphs has 8
tokens.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import routescope
from routescope.cluster import stats
from routescope.workers.edgeset import EdgeSetError

EXE = str(Path(sys.executable).with_name("routescope"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PROMPT = "The capital of France is"  # 8 tokens with the tiny tokenizer, BOS included
NAN = float("nan")


@dataclass
class Ctx:
    tiny: str  # model directory
    pipe: Any  # its in-process pipeline
    graph: Any  # a traced graph of PROMPT
    stored: Path  # results/ and graph.msgpack live here


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    from routescope.workers.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("bad-input")
    tiny = str(build_tiny_model("llama", root / "tiny", n_layers=4))
    pipe = routescope.load(tiny)
    stored = root / "stored"
    dataset = root / "prompts.txt"
    dataset.write_text(f"{PROMPT}\nWater boils at\ndef add(a, b):\n")
    routescope.run_job(dataset, stored / "results", model=tiny, pipeline=pipe)
    graph = pipe.trace(PROMPT)
    graph.save(stored / "graph.msgpack")
    return Ctx(tiny, pipe, graph, stored)


@pytest.fixture
def unchanged(ctx):
    """Checksums of everything stored, before and after the test."""
    before = digest(ctx.stored)
    assert len(before) >= 6  # manifest, failed.json, three prompts, graph
    yield
    assert digest(ctx.stored) == before


# ----------------------------------------------------------------------------- Python API
API: list[tuple[str, Callable[[Ctx], Any], type, str]] = [
    ("empty prompt", lambda c: c.pipe.trace("   "), ValueError, "prompt: empty or whitespace only"),
    ("prompt over the model context", lambda c: c.pipe.trace("word " * 600), ValueError,
     "prompt: 3001 tokens exceeds the limit of 512 (model context 512)"),
    ("prompt over the configured limit", lambda c: routescope.load(c.tiny, max_tokens=4).trace(PROMPT), ValueError,
     "prompt: 8 tokens exceeds the limit of 4 (model context 512)"),
    ("invalid UTF-8", lambda c: c.pipe.trace(b"bad \xc3\x28 byte"), ValueError, "prompt: not valid UTF-8 (byte 4)"),
    ("control character", lambda c: c.pipe.trace("bell\x07"), ValueError,
     "prompt: contains control character U+0007"),
    ("one bad prompt of a batch", lambda c: c.pipe.trace([PROMPT, ""]), ValueError,
     "prompt 1: empty or whitespace only"),
    ("tau_min NaN", lambda c: c.pipe.trace(PROMPT, tau_min=NAN), ValueError, "tau_min: nan must be a number in (0, 1)"),
    ("tau_min 0", lambda c: c.pipe.trace(PROMPT, tau_min=0), ValueError, "tau_min: 0 must be a number in (0, 1)"),
    ("tau 1.5", lambda c: c.graph.route(tau=1.5), ValueError, "tau: 1.5 must be a number in (0, 1)"),
    ("tau NaN", lambda c: c.graph.route(tau=NAN), ValueError, "tau: nan must be a number in (0, 1)"),
    ("target past the end", lambda c: c.graph.route(targets=[8]), ValueError, "target: position 8 outside [0, 7]"),
    ("negative target", lambda c: c.graph.route(targets=[-1]), ValueError, "target: position -1 outside [0, 7]"),
    ("node past the last layer", lambda c: c.graph.live.top_tokens("I4_0"), ValueError, "layer 4 outside [0, 3]"),
    ("unknown model name", lambda c: routescope.load("no-such-model-xyz"), ValueError,
     "model: unknown model 'no-such-model-xyz' (not embedded (smollm2-135m), not a local path"),
    ("model path that does not exist", lambda c: routescope.load("./missing/dir"), ValueError,
     "model: path ./missing/dir does not exist"),
    ("stages leaving a gap", lambda c: routescope.load(c.tiny, layers="0-1,3-3"), ValueError,
     "layers: stages must cover layers 0-3 exactly once in order; got 0-1, 3-3"),
    ("stages overlapping", lambda c: routescope.load(c.tiny, layers="0-2,2-3"), ValueError,
     "layers: stages must cover layers 0-3 exactly once in order; got 0-2, 2-3"),
    ("more stages than layers", lambda c: routescope.load(c.tiny, stages=9), ValueError,
     "stages: 9 stages for a model of 4 layers (allowed 1 to 4)"),
    ("dataset that does not exist", lambda c: routescope.run_job("/nonexistent/d.txt", c.stored / "results",
                                                                  pipeline=c.pipe), FileNotFoundError,
     "dataset /nonexistent/d.txt does not exist"),
    ("job threshold NaN into existing results",
     lambda c: routescope.run_job(c.stored / "missing.txt", c.stored / "results", pipeline=c.pipe, tau_min=NAN),
     ValueError, "tau_min: nan must be a number in (0, 1)"),
    ("results directory that does not exist", lambda c: routescope.open_results("/nonexistent/results"), FileNotFoundError,
     "/nonexistent/results is not a results directory (no manifest.json)"),
    ("graph file that does not exist", lambda c: routescope.FlowGraph.load(c.stored / "nope.msgpack"),
     FileNotFoundError, "nope.msgpack does not exist"),
]


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_api_bad_input(ctx, unchanged, case):
    _, call, exc_type, message = case
    with pytest.raises(exc_type) as info:
        call(ctx)
    assert message in str(info.value)


# ----------------------------------------------------------------------------- command line
CLI: list[tuple[str, list[str], str]] = [
    ("empty prompt", ["trace", "--prompt", "   "], "prompt: empty or whitespace only"),
    ("prompt over the model context", ["trace", "--prompt", "word " * 600],
     "prompt: 3001 tokens exceeds the limit of 512 (model context 512)"),
    ("invalid UTF-8", ["trace", "--prompt", os.fsdecode(b"bad \xc3\x28 byte")], "prompt: not valid UTF-8 (byte 4)"),
    ("control character", ["trace", "--prompt", "bell\x07"], "prompt: contains control character U+0007"),
    ("tau 1.5", ["trace", "--prompt", PROMPT, "--tau", "1.5"], "tau: 1.5 must be a number in (0, 1)"),
    ("tau NaN", ["trace", "--prompt", PROMPT, "--tau", "nan"], "tau: nan must be a number in (0, 1)"),
    ("tau_min 0", ["trace", "--prompt", PROMPT, "--tau-min", "0"], "tau_min: 0.0 must be a number in (0, 1)"),
    ("target past the end", ["trace", "--prompt", PROMPT, "--target", "8"], "target: position 8 outside [0, 7]"),
    ("target not a number", ["trace", "--prompt", PROMPT, "--target", "last"], "target: 'last' is not N, N,M or 'all'"),
    ("unknown model name", ["trace", "--model", "no-such-model-xyz", "--prompt", PROMPT],
     "unknown model 'no-such-model-xyz'"),
    ("model path that does not exist", ["trace", "--model", "./missing/dir", "--prompt", PROMPT],
     "model: path ./missing/dir does not exist"),
    ("stages leaving a gap", ["trace", "--prompt", PROMPT, "--layers", "0-1,3-3"],
     "layers: stages must cover layers 0-3 exactly once in order; got 0-1, 3-3"),
    ("more stages than layers", ["trace", "--prompt", PROMPT, "--stages", "9"],
     "stages: 9 stages for a model of 4 layers (allowed 1 to 4)"),
    ("job: dataset that does not exist", ["run-job", "--dataset", "/nonexistent/d.txt", "--results", "{results}"],
     "dataset /nonexistent/d.txt does not exist"),
    ("job: threshold NaN", ["run-job", "--dataset", "{dataset}", "--results", "{results}", "--tau-min", "nan"],
     "tau_min: nan must be a number in (0, 1)"),
    ("job: another job into existing results", ["run-job", "--dataset", "{dataset}", "--results", "{results}",
                                                "--tau-min", "0.02"],
     "holds results of a different job: dataset contents (sha256); option tau_min (0.01 vs 0.02)"),
    ("job: results location is a file", ["run-job", "--dataset", "{dataset}", "--results", "{graph}"],
     "is not writable: it is a file, not a directory"),
    ("submit: threshold NaN", ["submit", "--dataset", "{dataset}", "--results", "{results}", "--address",
                               "http://127.0.0.1:9", "--tau-min", "nan"], "tau_min: nan must be a number in (0, 1)"),
    ("submit: dataset that does not exist", ["submit", "--dataset", "/nonexistent/d.txt", "--results", "{results}",
                                             "--address", "http://127.0.0.1:9"], "dataset /nonexistent/d.txt does not exist"),
    ("viewer: results directory that does not exist", ["serve", "--results", "/nonexistent/results"],
     "/nonexistent/results"),
]


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input(ctx, unchanged, tmp_path, case):
    _, args, message = case
    dataset = tmp_path / "other.txt"
    dataset.write_text("Something else\n")
    fill = {"results": str(ctx.stored / "results"), "dataset": str(dataset), "graph": str(ctx.stored / "graph.msgpack")}
    argv = [a.format(**fill) if "{" in a else a for a in args]
    if argv[0] in ("trace", "run-job") and "--model" not in argv:
        argv += ["--model", ctx.tiny]
    if argv[0] == "trace":
        argv += ["--out", str(ctx.stored / "graph.msgpack")]  # would overwrite it, were the input accepted
    res = subprocess.run([EXE, *argv], capture_output=True, text=True, timeout=300, env=ENV,
                         errors="surrogateescape")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr
    assert re.search(rf"^routescope {argv[0]}: error: ", res.stderr, re.M), res.stderr
    assert "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- stored files
def test_corrupted_result_is_reported_by_name_and_the_rest_loads(ctx, unchanged, tmp_path):
    """A damaged prompt file in a results directory: named in the error, the others still load and
    statistics skip it with a warning naming it."""
    copy = tmp_path / "results"
    shutil.copytree(ctx.stored / "results", copy)
    bad = copy / "prompts" / "000001.msgpack"
    data = bytearray(bad.read_bytes())
    bad.write_bytes(bytes(data[: len(data) // 2]))  # truncated, as by a disk fault
    res = routescope.open_results(copy)
    assert res.indexes == [0, 1, 2]
    problems = res.problems()
    assert list(problems) == [1] and str(bad) in problems[1]
    with pytest.raises(EdgeSetError, match=re.escape(str(bad))):
        res.edges(1)
    assert res.edges(0).n_tokens == 8 and res.edges(2).n_tokens > 0
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        table = stats.importance(res)
    assert table is not None
