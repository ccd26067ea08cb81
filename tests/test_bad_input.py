"""Bad input on every entry point (issue 6): one exact error naming the field and the allowed range,
no traceback on the command line, and nothing already stored changes.

A results directory (a finished dataset job) and a saved graph file are made once; every case runs
against them (the CLI cases write into them when they succeed) and their SHA-256 checksums must be
the same afterwards. Surfaces: the Python API, the ``routescope`` command (trace, run-job, submit, serve),
dataset jobs and result loading. The viewer's cases run in the browser (test_viewer_browser.py).
A tiny 4-layer Llama (context 512) keeps the model loads cheap; the prompt used for graphs has 8
tokens.

Issue 14 adds untrusted model files (``bad_files``: malformed ``config.json``, safetensors headers,
shard indexes leading out of the model directory, crafted and truncated GGUF files, symbolic-link
loops), devices this machine lacks, ``tau_min`` below float32's range and ``k`` out of range:
each a ``ValueError`` from the API and the one-line error (exit status 2) of the command line.
The memory side of the limits is in test_file_limits.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
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
    bad: dict[str, Path] = field(default_factory=dict)  # untrusted model files, by case (bad_files)


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
    return Ctx(tiny, pipe, graph, stored, bad_files(root / "bad", Path(tiny)))


# ----------------------------------------------------------------------------- untrusted model files
def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _gguf(kv: list[tuple[str, int, bytes]], tensors: list[tuple[str, list[int], int, int]] = (),
          n_kv: int | None = None, pad: int = 64) -> bytes:
    """A GGUF v3 file by hand: ``kv`` as (key, value type, packed value), ``tensors`` as (name,
    dims, type, offset)."""
    s = lambda text: struct.pack("<Q", len(text.encode())) + text.encode()  # noqa: E731
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv) if n_kv is None else n_kv)
    for key, vtype, value in kv:
        out += s(key) + struct.pack("<I", vtype) + value
    for name, dims, ttype, offset in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset)
    return out + b"\0" * pad


def bad_files(root: Path, tiny: Path) -> dict[str, Path]:
    """Copies of the tiny model with one file damaged or crafted each, crafted GGUF files and
    symbolic links, by case name."""
    from test_file_limits import write_tiny_gguf

    root.mkdir()
    out: dict[str, Path] = {}
    config = json.loads((tiny / "config.json").read_text())
    n, header = _header(tiny / "model.safetensors")
    weights = (tiny / "model.safetensors").read_bytes()

    def model(name: str, **files: bytes | str) -> None:
        d = root / name
        shutil.copytree(tiny, d)
        for fname, data in files.items():
            fname = fname.replace("__", ".")
            (d / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
        out[name] = d

    model("config_not_json", config__json="{not json")
    model("config_list", config__json="[1, 2]")
    model("config_wrong_type", config__json=json.dumps({**config, "hidden_size": "big"}))
    model("config_no_model_type", config__json=json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    model("config_no_layers", config__json=json.dumps({k: v for k, v in config.items() if k != "num_hidden_layers"}))
    model("config_absurd", config__json=json.dumps({**config, "hidden_size": 10**9, "num_hidden_layers": 10**6,
                                                   "vocab_size": 10**12}))
    model("config_too_many_layers", config__json=json.dumps({**config, "num_hidden_layers": 5}))
    model("tokenizer_not_json", tokenizer__json="{not json")
    model("tokenizer_config_list", tokenizer_config__json="[1]")
    model("tokenizer_damaged", tokenizer__json='{"model": 5}')
    model("st_short", model__safetensors=b"abc")
    model("st_truncated_header", model__safetensors=weights[:100])
    model("st_truncated_data", model__safetensors=weights[:-10])
    model("st_header_length", model__safetensors=struct.pack("<Q", 10**12) + weights[8:])
    model("st_header_not_json", model__safetensors=weights[:8] + b"x" * n + weights[8 + n:])
    first = sorted(k for k in header if k != "__metadata__")[0]
    crafted = {**header, first: {**header[first], "data_offsets": [0, 10**9]}}
    raw = json.dumps(crafted).encode()
    model("st_offsets", model__safetensors=struct.pack("<Q", len(raw)) + raw + weights[8 + n:])
    names = [k for k in header if k != "__metadata__"]
    index = lambda shard: json.dumps({"weight_map": {k: shard for k in names}})  # noqa: E731
    model("index_absolute", model__safetensors__index__json=index(str(tiny / "model.safetensors")))
    model("index_dotdot", model__safetensors__index__json=index("../../tiny/model.safetensors"))
    model("index_missing_shard", model__safetensors__index__json=index("nope.safetensors"))
    model("index_not_json", model__safetensors__index__json="weight_map: all")
    model("index_extra_tensor", model__safetensors__index__json=json.dumps(
        {"weight_map": {**{k: "model.safetensors" for k in names}, "extra.weight": "model.safetensors"}}))
    model("index_symlink_out", model__safetensors__index__json=index("link.safetensors"))
    os.symlink(tiny / "model.safetensors", out["index_symlink_out"] / "link.safetensors")
    model("weights_symlink_out")
    (out["weights_symlink_out"] / "model.safetensors").unlink()
    os.symlink(tiny / "model.safetensors", out["weights_symlink_out"] / "model.safetensors")

    arch = ("general.architecture", 8, struct.pack("<Q", 5) + b"llama")
    gguf = {
        "gguf_version_0": b"GGUF" + b"\0" * 60,
        "gguf_kv_count": _gguf([arch], n_kv=2**40),
        "gguf_string_length": _gguf([("general.architecture", 8, struct.pack("<Q", 2**40))]),
        "gguf_no_architecture": _gguf([("general.name", 8, struct.pack("<Q", 1) + b"x")]),
        "gguf_dimensions": _gguf([arch], [("w", [4] * 99, 0, 0)]),
        "gguf_tensor_type": _gguf([arch], [("w", [4], 999, 0)]),
        "gguf_tensor_past_end": _gguf([arch], [("w", [1024, 1024], 0, 0)]),
    }
    for name, data in gguf.items():
        out[name] = root / f"{name}.gguf"
        out[name].write_bytes(data)
    real = write_tiny_gguf(root / "tiny.gguf")
    out["gguf_truncated_header"] = root / "truncated-header.gguf"
    out["gguf_truncated_header"].write_bytes(real.read_bytes()[:2000])
    out["gguf_truncated_data"] = root / "truncated-data.gguf"
    out["gguf_truncated_data"].write_bytes(real.read_bytes()[:-1000])
    out["link_loop"] = root / "loop-a"
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    out["link_dangling"] = root / "dangling"
    os.symlink(root / "nowhere", out["link_dangling"])
    out["big_graph"] = root / "big.msgpack"
    with open(out["big_graph"], "wb") as f:
        f.truncate(3 << 30)  # sparse: no disk used
    out["graph_dir"] = root / "dir.msgpack"
    out["graph_dir"].mkdir()
    out["fifo_graph"] = root / "fifo.msgpack"
    os.mkfifo(out["fifo_graph"])
    import msgpack

    doc = msgpack.unpackb((tiny.parent / "stored" / "graph.msgpack").read_bytes(), raw=False)
    doc["meta"]["tau_min"] = 1e-50
    out["tiny_tau_graph"] = root / "tiny-tau.msgpack"
    out["tiny_tau_graph"].write_bytes(msgpack.packb(doc, use_bin_type=True))
    return out


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




def _has_device(kind: str, n: int = 1) -> bool:
    import torch

    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.device_count() >= n
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return getattr(torch, "xpu", None) is not None and torch.xpu.is_available() and torch.xpu.device_count() >= n


NO_CUDA = pytest.mark.skipif(_has_device("cuda"), reason="this machine has CUDA")
NO_MPS = pytest.mark.skipif(_has_device("mps"), reason="this machine has MPS")
NO_XPU4 = pytest.mark.skipif(_has_device("xpu", 4), reason="this machine has 4 XPUs")


def marked(case: tuple, *marks: Any) -> Any:
    """A case with pytest marks (e.g. skipped on a machine that has the device)."""
    return pytest.param(case, id=case[0], marks=list(marks))


def _load(name: str, **options: Any) -> Callable[[Ctx], Any]:
    return lambda c: routescope.load(str(c.bad[name]), reuse=False, **options)


def _at(name: str, text: str) -> Callable[[Ctx], str]:
    return lambda c: f"{c.bad[name]}{text}"


def _truncated_data_message(c: Ctx) -> str:
    size = (Path(c.tiny) / "model.safetensors").stat().st_size
    n, header = _header(Path(c.tiny) / "model.safetensors")
    data_len = size - 8 - n - 10
    name, (b, e) = max(((k, m["data_offsets"]) for k, m in header.items() if k != "__metadata__"),
                       key=lambda t: t[1][1])
    return (f"st_truncated_data/model.safetensors: not a valid safetensors file: tensor {name!r} has data offsets "
            f"[{b}, {e}] outside the {data_len} data bytes")


def _offsets_message(c: Ctx) -> str:
    size = (Path(c.tiny) / "model.safetensors").stat().st_size
    n, header = _header(Path(c.tiny) / "model.safetensors")
    first = sorted(k for k in header if k != "__metadata__")[0]
    return (f"st_offsets/model.safetensors: not a valid safetensors file: tensor {first!r} has data offsets "
            f"[0, 1000000000] outside the {size - 8 - n} data bytes")


def _check_config(name: str) -> Callable[[Ctx], Any]:
    def call(c: Ctx) -> Any:
        from routescope.workers.checkpoint import check_config, resolve

        return check_config(resolve(str(c.bad[name])))
    return call


def _check(fn: str, *args: Any) -> Callable[[Ctx], Any]:
    """``routescope.workers.checkpoint.<fn>(*args)`` or ``...edgeset.<fn>``, the API's own checks."""
    def call(c: Ctx) -> Any:
        from routescope.workers import checkpoint, edgeset

        return getattr(checkpoint if hasattr(checkpoint, fn) else edgeset, fn)(*args)
    return call


def _tokenizer(path: Path) -> Any:
    from routescope.workers.checkpoint import Checkpoint, load_tokenizer

    return load_tokenizer(Checkpoint(path, str(path)))


def params(cases: list[Any]) -> list[Any]:
    return [pytest.param(c, id=c[0]) if type(c) is tuple else c for c in cases]


NOT_JSON = "config.json: config is not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"
TAU_MIN_TINY = ("tau_min: 1e-50 is below the smallest normal float32 (1.1754944e-38); contributions are float32, "
                "where it would underflow to 0")

# Untrusted files, devices, thresholds and k (issue 14). Messages that name a temporary path are
# callables of the context, or start after the path.
API_FILES: list[Any] = [
    ("device cuda without CUDA (checked)", _check("check_device", "cuda"), ValueError,
     "device: 'cuda': CUDA is not available on this machine"),
    ("device nonsense (checked)", _check("check_device", "nonsense"), ValueError,
     "device: 'nonsense' is not a device name (cpu, cuda, cuda:N, mps, xpu:N)"),
    marked(("device cuda without CUDA", lambda c: routescope.load(c.tiny, device="cuda", reuse=False), ValueError,
             "device: 'cuda': CUDA is not available on this machine"), NO_CUDA),
    marked(("device mps without MPS", lambda c: routescope.load(c.tiny, device="mps", reuse=False), ValueError,
             "device: 'mps': Apple MPS is not available on this machine; use cpu"), NO_MPS),
    marked(("device xpu:3", lambda c: routescope.load(c.tiny, device="xpu:3", reuse=False), ValueError,
             "device: 'xpu:3'"), NO_XPU4),
    marked(("device nonsense", lambda c: routescope.load(c.tiny, device="nonsense", reuse=False), ValueError,
             "device: 'nonsense' is not a device name (cpu, cuda, cuda:N, mps, xpu:N)")),
    ("config not JSON", _load("config_not_json"), ValueError, NOT_JSON),
    ("config a list", _load("config_list"), ValueError, "config.json: config must be a JSON map, got list"),
    ("config wrong type", _load("config_wrong_type"), ValueError,
     "config.json: hidden_size must be a positive integer, got 'big'"),
    ("config without model_type", _load("config_no_model_type"), ValueError,
     "config.json: config has no 'model_type' (text)"),
    ("config absurd sizes", _load("config_absurd"), ValueError,
     "config.json: hidden_size 1000000000 is larger than every tensor dimension of the checkpoint (largest 384)"),
    ("config more layers than the tensors", _load("config_too_many_layers"), ValueError,
     "config.json: num_hidden_layers 5 is more layers than the checkpoint holds: 4 (model.layers)"),
    ("config missing num_hidden_layers (checked)", _check_config("config_no_layers"), ValueError,
     "config.json: loaded config: num_hidden_layers 32 is more layers than the checkpoint holds: 4 (model.layers)"),
    marked(("config missing num_hidden_layers", _load("config_no_layers"), ValueError,
             "config.json: loaded config: num_hidden_layers 32 is more layers than the checkpoint holds: 4 (model.layers)")),
    ("tokenizer.json not JSON", _load("tokenizer_not_json"), ValueError,
     "tokenizer_not_json/tokenizer.json: tokenizer file is not valid JSON (Expecting property name enclosed in double "
     "quotes at line 1 column 2)"),
    ("tokenizer_config.json a list", _load("tokenizer_config_list"), ValueError,
     "tokenizer_config_list/tokenizer_config.json: tokenizer file must be a JSON map, got list"),
    ("tokenizer.json damaged (checked)", lambda c: _tokenizer(c.bad["tokenizer_damaged"]), ValueError,
     "tokenizer_damaged: the tokenizer cannot be loaded (KeyError: 'added_tokens')"),
    marked(("tokenizer.json damaged", _load("tokenizer_damaged"), ValueError,
             "tokenizer_damaged: the tokenizer cannot be loaded (KeyError: 'added_tokens')")),
    ("safetensors too short", _load("st_short"), ValueError,
     "st_short/model.safetensors: not a valid safetensors file: 3 bytes, too short for a header"),
    ("safetensors truncated header", _load("st_truncated_header"), ValueError,
     "st_truncated_header/model.safetensors: not a valid safetensors file: header length "),
    ("safetensors truncated data", _load("st_truncated_data"), ValueError, _truncated_data_message),
    ("safetensors header length over the file", _load("st_header_length"), ValueError,
     "st_header_length/model.safetensors: not a valid safetensors file: header length 1000000000000 is larger than the file"),
    ("safetensors header not JSON", _load("st_header_not_json"), ValueError,
     "st_header_not_json/model.safetensors: not a valid safetensors file: the header is not JSON (JSONDecodeError: "
     "Expecting value: line 1 column 1 (char 0))"),
    ("safetensors offsets out of range", _load("st_offsets"), ValueError, _offsets_message),
    ("index: absolute shard path", _load("index_absolute"), ValueError,
     "model.safetensors.index.json: shard '/"),
    ("index: shard with ..", _load("index_dotdot"), ValueError,
     "model.safetensors.index.json: shard '../../tiny/model.safetensors' leads out of the model directory ('..')"),
    ("index: shard linking out", _load("index_symlink_out"), ValueError,
     lambda c: f"model.safetensors.index.json: shard link.safetensors resolves to {Path(c.tiny).resolve()}/model.safetensors, "
               f"outside the model directory {c.bad['index_symlink_out'].resolve()}"),
    ("weights file linking out", _load("weights_symlink_out"), ValueError,
     lambda c: f"{c.bad['weights_symlink_out']}: shard model.safetensors resolves to "
               f"{Path(c.tiny).resolve()}/model.safetensors, outside the model directory"),
    ("index: missing shard", _load("index_missing_shard"), ValueError,
     "model.safetensors.index.json: shard nope.safetensors does not exist"),
    ("index not JSON", _load("index_not_json"), ValueError,
     "model.safetensors.index.json: shard index is not valid JSON (Expecting value at line 1 column 1)"),
    ("index: tensor not in its shard", _load("index_extra_tensor"), ValueError,
     "model.safetensors.index.json: tensor 'extra.weight' is not in its shard model.safetensors"),
    ("GGUF version 0", _load("gguf_version_0"), ValueError, "gguf_version_0.gguf is not valid: version 0; "
                                                            "routescope reads versions 2 and 3"),
    ("GGUF crafted entry count", _load("gguf_kv_count"), ValueError,
     "gguf_kv_count.gguf is not valid: header claims 1099511627776 metadata entries, more than "),
    ("GGUF crafted string length", _load("gguf_string_length"), ValueError,
     "gguf_string_length.gguf is not valid: metadata 'general.architecture': a string of 1099511627776 bytes at "
     "offset 56 exceeds the limit of 16777216"),
    ("GGUF without architecture", _load("gguf_no_architecture"), ValueError,
     "gguf_no_architecture.gguf is not valid: no general.architecture"),
    ("GGUF 99 dimensions", _load("gguf_dimensions"), ValueError, "is not valid: tensor 'w' has 99 dimensions (1 to 4)"),
    ("GGUF unknown tensor type", _load("gguf_tensor_type"), ValueError, "is not valid: tensor 'w' has unknown type 999"),
    ("GGUF tensor past the end", _load("gguf_tensor_past_end"), ValueError,
     "is not valid: tensor 'w' (4194304 bytes at offset "),
    ("GGUF truncated header", _load("gguf_truncated_header"), ValueError,
     "truncated-header.gguf is not valid: metadata 'tokenizer.ggml.tokens': array of 384 items runs past the end "
     "of the file"),
    ("GGUF truncated data", _load("gguf_truncated_data"), ValueError,
     "truncated-data.gguf is not valid: tensor 'output.weight' (98304 bytes at offset 403488) runs past the end of "
     "the file (500792 bytes)"),
    ("model path a symlink loop", _load("link_loop"), ValueError, _at("link_loop", " is a symbolic link loop")),
    ("model path a dangling symlink", _load("link_dangling"), ValueError,
     lambda c: f"model: {c.bad['link_dangling']} is a symbolic link to {c.bad['link_dangling'].parent}/nowhere, "
               "which does not exist"),
    ("tau_min below float32 (checked)", _check("check_tau_min", 1e-50), ValueError, TAU_MIN_TINY),
    marked(("tau_min below float32", lambda c: c.pipe.trace(PROMPT, tau_min=1e-50), ValueError, TAU_MIN_TINY)),
    ("stored graph with tau_min below float32", lambda c: routescope.FlowGraph.load(c.bad["tiny_tau_graph"]),
     EdgeSetError, "tiny-tau.msgpack: meta: tau_min 1e-50 is below the smallest normal float32 (1.1754944e-38)"),
    ("graph file of 3 GiB", lambda c: routescope.FlowGraph.load(c.bad["big_graph"]), EdgeSetError,
     "big.msgpack: edge set of 3221225472 bytes exceeds the limit of 1073741824 bytes"),
    ("graph file a directory", lambda c: routescope.FlowGraph.load(c.bad["graph_dir"]), EdgeSetError,
     "dir.msgpack: edge set is not a regular file"),
    ("graph file a FIFO", lambda c: routescope.FlowGraph.load(c.bad["fifo_graph"]), EdgeSetError,
     "fifo.msgpack: edge set is not a regular file"),
    ("top tokens k 0", lambda c: c.graph.live.prediction(k=0), ValueError, "k: 0 must be an integer in [1, 384]"),
    ("top tokens k 10**9", lambda c: c.graph.live.prediction(k=10**9), ValueError,
     "k: 1000000000 must be an integer in [1, 384]"),
    ("top tokens k -1", lambda c: c.graph.live.top_tokens("I3_7", k=-1), ValueError,
     "k: -1 must be an integer in [1, 384]"),
    ("neurons k 10**9", lambda c: c.graph.live.neurons(0, 7, k=10**9), ValueError,
     "k: 1000000000 must be an integer in [1, 256]"),
]


@pytest.mark.parametrize("case", params(API + API_FILES))
def test_api_bad_input(ctx, unchanged, case):
    _, call, exc_type, message = case
    message = message(ctx) if callable(message) else message
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


# Issue 14 on the command line: one class each (the API table has every variant). "{m_<case>}" is
# the path of bad_files' case.
CLI_FILES: list[Any] = [
    pytest.param(("device cuda without CUDA", ["trace", "--prompt", PROMPT, "--device", "cuda"],
                  "device: 'cuda': CUDA is not available on this machine"), id="device cuda without CUDA", marks=NO_CUDA),
    pytest.param(("device mps without MPS", ["trace", "--prompt", PROMPT, "--device", "mps"],
                  "device: 'mps': Apple MPS is not available on this machine"), id="device mps without MPS", marks=NO_MPS),
    pytest.param(("device xpu:3", ["trace", "--prompt", PROMPT, "--device", "xpu:3"], "device: 'xpu:3'"),
                 id="device xpu:3", marks=NO_XPU4),
    ("device nonsense", ["trace", "--prompt", PROMPT, "--device", "nonsense"],
     "device: 'nonsense' is not a device name (cpu, cuda, cuda:N, mps, xpu:N)"),
    ("config not JSON", ["trace", "--prompt", PROMPT, "--model", "{m_config_not_json}"], NOT_JSON),
    ("config wrong type", ["trace", "--prompt", PROMPT, "--model", "{m_config_wrong_type}"],
     "config.json: hidden_size must be a positive integer, got 'big'"),
    ("config absurd sizes", ["trace", "--prompt", PROMPT, "--model", "{m_config_absurd}"],
     "config.json: hidden_size 1000000000 is larger than every tensor dimension of the checkpoint (largest 384)"),
    ("tokenizer.json not JSON", ["trace", "--prompt", PROMPT, "--model", "{m_tokenizer_not_json}"],
     "tokenizer.json: tokenizer file is not valid JSON (Expecting property name enclosed in double quotes"),
    ("safetensors header length over the file", ["trace", "--prompt", PROMPT, "--model", "{m_st_header_length}"],
     "model.safetensors: not a valid safetensors file: header length 1000000000000 is larger than the file"),
    ("safetensors truncated data", ["trace", "--prompt", PROMPT, "--model", "{m_st_truncated_data}"],
     "st_truncated_data/model.safetensors: not a valid safetensors file: tensor "),
    ("index: shard with ..", ["trace", "--prompt", PROMPT, "--model", "{m_index_dotdot}"],
     "shard '../../tiny/model.safetensors' leads out of the model directory ('..')"),
    ("index: shard linking out", ["trace", "--prompt", PROMPT, "--model", "{m_index_symlink_out}"],
     "model.safetensors.index.json: shard link.safetensors resolves to "),
    ("GGUF crafted entry count", ["trace", "--prompt", PROMPT, "--model", "{m_gguf_kv_count}"],
     "gguf_kv_count.gguf is not valid: header claims 1099511627776 metadata entries, more than "),
    ("GGUF truncated data", ["trace", "--prompt", PROMPT, "--model", "{m_gguf_truncated_data}"],
     "truncated-data.gguf is not valid: tensor 'output.weight' (98304 bytes at offset 403488) runs past the end"),
    ("model path a symlink loop", ["trace", "--prompt", PROMPT, "--model", "{m_link_loop}"],
     "loop-a is a symbolic link loop"),
    ("tau_min below float32", ["trace", "--prompt", PROMPT, "--tau-min", "1e-50"], TAU_MIN_TINY),
    ("top 0", ["trace", "--prompt", PROMPT, "--top", "0"], "top: 0 must be an integer of at least 1"),
    ("top 10**9", ["trace", "--prompt", PROMPT, "--top", str(10**9)],
     "top: 1000000000 must be an integer in [1, 384] (the model's vocabulary)"),
]


@pytest.mark.parametrize("case", params(CLI + CLI_FILES))
def test_cli_bad_input(ctx, unchanged, tmp_path, case):
    _, args, message = case
    dataset = tmp_path / "other.txt"
    dataset.write_text("Something else\n")
    fill = {"results": str(ctx.stored / "results"), "dataset": str(dataset), "graph": str(ctx.stored / "graph.msgpack"),
            **{f"m_{name}": str(path) for name, path in ctx.bad.items()}}
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


def test_devices_of_a_machine_with_two_gpus(monkeypatch):
    """check_device on a machine that has CUDA (simulated: this one may have none): present
    devices pass, canonical; an index past the last names what there is."""
    import torch

    from routescope.workers.checkpoint import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [check_device(d) for d in ("cuda", "cuda:1", " cpu ", torch.device("cuda", 0))] == \
        ["cuda", "cuda:1", "cpu", "cuda:0"]
    with pytest.raises(ValueError) as info:
        check_device("cuda:7")
    assert str(info.value) == "device: 'cuda:7' does not exist: this machine has 2 cuda device(s) (cuda:0 to cuda:1)"


def test_links_into_the_hub_cache_are_accepted(ctx, tmp_path, monkeypatch):
    """Shards may link into the Hugging Face hub cache (snapshots, ``--local-dir`` downloads);
    only links leading elsewhere are refused (cases above)."""
    import huggingface_hub.constants

    from routescope.workers.checkpoint import resolve

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for f in Path(ctx.tiny).iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    local = tmp_path / "local-dir"
    shutil.copytree(ctx.tiny, local)
    (local / "model.safetensors").unlink()
    os.symlink(repo / "blobs" / hashlib.sha256(b"model.safetensors").hexdigest(), local / "model.safetensors")
    for path in (snapshot, local):
        ck = resolve(str(path))
        assert set(ck.weight_map().values()) == {path.resolve() / "model.safetensors"}
        assert ck.n_parameters() == resolve(ctx.tiny).n_parameters()
