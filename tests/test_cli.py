"""The ``routescope`` command as a user runs it: a fresh process, the embedded model, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).with_name("routescope"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_trace_prints_route_and_prediction(tmp_path, smollm2_checkpoint):
    out = tmp_path / "route.json"
    res = run("trace", "--prompt", "The capital of France is", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "prediction after the last token: ' Paris'" in res.stdout
    assert "route of last position at tau=0.04 (renormalize)" in res.stdout
    assert "X0_" in res.stdout and "I29_5" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["edges"] and doc["tau"] == 0.04


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-model-xyz", "--prompt", "hi"], "unknown model 'no-such-model-xyz'"),
    (["--model", "./missing/dir", "--prompt", "hi"], "path ./missing/dir does not exist"),
    (["--prompt", "   "], "prompt: empty or whitespace only"),
    (["--prompt", "hi", "--tau", "1.5"], "tau: 1.5 must be a number in (0, 1)"),
    (["--prompt", "bell\x07"], "prompt: contains control character U+0007"),
    (["--prompt", "hi", "--layers", "0-9,12-29"], "layers: stages must cover layers 0-29 exactly once"),
])
def test_bad_input_fails_with_a_clear_message(args, message):
    res = run("trace", *args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_prompt_longer_than_the_context_is_refused(smollm2_checkpoint):
    res = run("trace", "--prompt", "word " * 9000)
    assert res.returncode == 2
    assert "tokens exceeds the limit of 8192 (model context 8192)" in res.stderr
    assert "Traceback" not in res.stderr


def test_gpu_benchmark_script_rehearses_on_cpu(tmp_path):
    """benchmarks/bench_gpu.py (run on lent GPUs only) keeps working: its equality step on the CPU."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    res = subprocess.run([sys.executable, str(script), "--rehearse", "--steps", "1", "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert len(doc["equality"]) == 12 and "errors" not in doc
    assert all(r["max_abs_diff"] <= 1e-6 and r["same_routes"] for r in doc["equality"])
