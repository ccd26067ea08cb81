"""Limits are applied before memory is spent (issue 14), and the GGUF conversion cache survives
killed and concurrent conversions.

Memory: each oversized or crafted input is handed to the real loader in a fresh Python process
that has already imported and warmed up everything; the process's peak resident memory
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each case; a 1 ms sampling thread where
that is not allowed) may grow by less than 100 MiB while the input is refused with its exact
message. A control case decodes the same crafted metadata without routescope's limits and must
grow by far more, so the measurement is known to see what it should. Sparse files (``truncate``)
make the 3 GiB inputs cost no disk.

GGUF cache: a tiny Llama GGUF (random weights, the tiny BPE tokenizer) is written with the
``gguf`` package (converting the embedded SmolLM2 takes ~40 s and 1.2 GB; this one ~9 s). A
conversion killed with SIGKILL leaves its temporary directory; the next conversion removes it and
completes. Two processes converting the same file at once produce one complete checkpoint,
converted once (the second waits on the lock and reuses it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from test_wire import make_edge_set

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LIMIT_MIB = 100
GiB = 1 << 30

# ----------------------------------------------------------------------------- measuring
_MEASURE = r'''
import json, re, sys, threading, time, traceback

def _kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False

class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _kib("VmRSS"), False
    def run(self):
        while not self.stop:
            self.peak = max(self.peak, _kib("VmRSS"))
            time.sleep(0.001)

def measure(name, code, env):
    exact = _reset_peak()
    base = _kib("VmRSS")
    sampler = None if exact else _Sampler()
    if sampler:
        sampler.start()
    error = None
    try:
        exec(code, env)
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": str(exc)}
    if sampler:
        sampler.stop = True
        sampler.join()
    peak = _kib("VmHWM") if exact else sampler.peak
    return {"name": name, "error": error, "growth_mib": (peak - base) / 1024, "method": "hwm" if exact else "sampled"}

spec = json.loads(sys.stdin.read())
env = {}
exec(spec["setup"], env)
print("RESULTS " + json.dumps([measure(name, code, env) for name, code in spec["cases"]]))
'''


def measure(setup: str, cases: list[tuple[str, str]], cache: Path, timeout: int = 600) -> dict[str, dict]:
    """Run ``setup`` then each case's code in one fresh process (routescope cache ``cache``); per
    case: the exception raised (type, message) and the peak resident-memory growth in MiB."""
    res = subprocess.run([PY, "-c", _MEASURE], input=json.dumps({"setup": setup, "cases": cases}),
                         capture_output=True, text=True, timeout=timeout, env={**ENV, "ROUTESCOPE_CACHE": str(cache)})
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line is not None, (res.returncode, res.stdout[-2000:], res.stderr[-4000:])
    return {r["name"]: r for r in json.loads(line[len("RESULTS "):])}


def assert_refused(result: dict, message: str) -> None:
    assert result["error"] is not None, f"{result['name']}: accepted"
    assert message in result["error"]["message"], result
    assert result["growth_mib"] < LIMIT_MIB, result


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


# ----------------------------------------------------------------------------- edge sets
def crafted_metadata_payload(n_dicts: int) -> bytes:
    """A valid edge set whose trace summary is ``n_dicts`` empty maps (one byte each on the wire,
    ~70 bytes each once decoded)."""
    doc = msgpack.unpackb(make_edge_set().encode(), raw=False)
    doc["trace"] = {"summary": {"x": [[{}] * 1000] * (n_dicts // 1000)}}
    return msgpack.packb(doc, use_bin_type=True)


def test_oversized_and_expanding_edge_sets_are_refused_without_the_memory(tmp_path):
    big = sparse(tmp_path / "big.msgpack", 3 * GiB, b"\x85")
    small = tmp_path / "meta-1mib.msgpack"
    small.write_bytes(crafted_metadata_payload(1 << 20))
    large = tmp_path / "meta-8mib.msgpack"
    large.write_bytes(crafted_metadata_payload(8 << 20))
    assert 1 << 20 <= small.stat().st_size < 2 << 20 and large.stat().st_size >= 8 << 20
    setup = textwrap.dedent(f"""
        import msgpack
        from routescope.cluster.graph import FlowGraph
        from routescope.workers.edgeset import EdgeSet
        import test_wire
        EdgeSet.decode(test_wire.make_edge_set().encode())  # warm up
        data = open({str(large)!r}, "rb").read()
    """)
    sys_path = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    out = measure(sys_path + setup, [
        ("graph 3 GiB", f"FlowGraph.load({str(big)!r})"),
        ("read 3 GiB", f"EdgeSet.read({str(big)!r})"),
        ("metadata 1 MiB", f"FlowGraph.load({str(small)!r})"),
        ("metadata 8 MiB", f"FlowGraph.load({str(large)!r})"),
        ("control: plain msgpack", "doc = msgpack.unpackb(data, max_array_len=len(data)); del doc; raise ValueError('x')"),
    ], tmp_path / "cache")
    assert_refused(out["graph 3 GiB"], f"{big}: edge set of {3 * GiB} bytes exceeds the limit of {GiB} bytes")
    assert_refused(out["read 3 GiB"], f"edge set of {3 * GiB} bytes exceeds the limit of {GiB} bytes")
    for name, path in (("metadata 1 MiB", small), ("metadata 8 MiB", large)):
        assert_refused(out[name], f"{path}: metadata: decoding would build over 48 MiB of objects from a "
                                  f"{path.stat().st_size}-byte payload (limit 48 MiB + 4 x the column bytes)")
    # The same bytes decoded without limits: the measurement sees the expansion it guards against.
    assert out["control: plain msgpack"]["growth_mib"] > 5 * LIMIT_MIB, out["control: plain msgpack"]


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from routescope.workers.tiny import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("limits") / "tiny", n_layers=4)


def _variant(tiny: Path, root: Path, name: str) -> Path:
    import shutil

    d = root / name
    shutil.copytree(tiny, d)
    return d


def test_oversized_and_absurd_checkpoint_files_are_refused_without_the_memory(tiny, tmp_path):
    cfg = json.loads((tiny / "config.json").read_text())
    absurd = _variant(tiny, tmp_path, "absurd")
    # Sizes that make building the model allocate (a 2*10**8-wide head's rotary buffers) or fail late.
    (absurd / "config.json").write_text(json.dumps({**cfg, "hidden_size": 2 * 10**8, "num_attention_heads": 1,
                                                    "num_key_value_heads": 1}))
    everything = _variant(tiny, tmp_path, "everything")
    (everything / "config.json").write_text(json.dumps({**cfg, "hidden_size": 10**9, "num_hidden_layers": 10**6,
                                                        "vocab_size": 10**12, "intermediate_size": 10**9}))
    layers = _variant(tiny, tmp_path, "layers")
    (layers / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**6}))
    huge_config = _variant(tiny, tmp_path, "huge-config")
    sparse(huge_config / "config.json", 3 * GiB, b'{"model_type": "llama", "x": "')
    huge_index = _variant(tiny, tmp_path, "huge-index")
    sparse(huge_index / "model.safetensors.index.json", 3 * GiB, b'{"weight_map": {"')
    huge_header = _variant(tiny, tmp_path, "huge-header")
    sparse(huge_header / "model.safetensors", 4 * GiB, (3 * GiB).to_bytes(8, "little") + b"{")
    huge_gguf = sparse(tmp_path / "huge.gguf", 3 * GiB,
                       b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
                       + (2 * GiB).to_bytes(8, "little"))
    setup = textwrap.dedent(f"""
        import routescope
        from routescope.workers.checkpoint import check_gguf
        routescope.load({str(tiny)!r}, reuse=False).trace("warm up")
    """)
    load = "routescope.load({!r}, reuse=False)".format
    out = measure(setup, [
        ("absurd width", load(str(absurd))), ("absurd everything", load(str(everything))),
        ("absurd layers", load(str(layers))), ("3 GiB config", load(str(huge_config))),
        ("3 GiB index", load(str(huge_index))), ("3 GiB header", load(str(huge_header))),
        ("3 GiB GGUF string", f"check_gguf({str(huge_gguf)!r})"),
        ("3 GiB GGUF load", load(str(huge_gguf))),
    ], tmp_path / "cache")
    assert_refused(out["absurd width"], f"{absurd}/config.json: hidden_size 200000000 is larger than every tensor "
                                        "dimension of the checkpoint (largest 384)")
    assert_refused(out["absurd everything"], f"{everything}/config.json: hidden_size 1000000000 is larger than every "
                                             "tensor dimension of the checkpoint (largest 384)")
    assert_refused(out["absurd layers"], f"{layers}/config.json: num_hidden_layers 1000000 exceeds the limit of 4096 layers")
    assert_refused(out["3 GiB config"], f"{huge_config}/config.json: config of {3 * GiB} bytes exceeds the limit of "
                                        f"{16 << 20} bytes")
    assert_refused(out["3 GiB index"], f"model.safetensors.index.json: shard index of {3 * GiB} bytes exceeds the "
                                       f"limit of {64 << 20} bytes")
    assert_refused(out["3 GiB header"], f"{huge_header}/model.safetensors: not a valid safetensors file: header "
                                        f"length {3 * GiB} exceeds the format's limit of 100000000")
    message = (f"model: GGUF file {huge_gguf} is not valid: metadata key: a string of {2 * GiB} bytes at offset 24 "
               f"exceeds the limit of {16 << 20}")
    assert_refused(out["3 GiB GGUF string"], message)
    assert_refused(out["3 GiB GGUF load"], message)


# ----------------------------------------------------------------------------- GGUF cache
def write_tiny_gguf(path: Path, n_layers: int = 2, d: int = 64, heads: int = 4, kv: int = 2, ff: int = 128) -> Path:
    """A small Llama GGUF file (fp32 random weights, the tiny byte-level BPE tokenizer) that
    ``transformers`` converts like a real one."""
    import gguf

    from routescope.workers.tiny import train_tokenizer

    spec = json.loads(train_tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv_: kv_[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(d // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    add("token_embd.weight", len(tokens), d)
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        add(f"blk.{i}.attn_q.weight", d, d)
        add(f"blk.{i}.attn_k.weight", d * kv // heads, d)
        add(f"blk.{i}.attn_v.weight", d * kv // heads, d)
        add(f"blk.{i}.attn_output.weight", d, d)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        add(f"blk.{i}.ffn_gate.weight", ff, d)
        add(f"blk.{i}.ffn_up.weight", ff, d)
        add(f"blk.{i}.ffn_down.weight", d, ff)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    add("output.weight", len(tokens), d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# A process resolving the GGUF file; ``slow`` makes its conversion write a partial file and hang
# (to be killed), ``log`` records each conversion and when resolve was called and returned.
_CONVERT = r'''
import os, sys, time
from pathlib import Path
import routescope.workers.checkpoint as ck
gguf, mode, log = sys.argv[1], sys.argv[2], sys.argv[3]
def note(event):
    with open(log, "a") as f:
        f.write(f"{event} {os.getpid()} {time.time()}\n")
real = ck._convert_gguf
def convert(src, out):
    note("convert-start")
    if mode == "slow":
        (out / "model.safetensors").write_bytes(b"partial")
        print("CONVERTING", out, flush=True)
        time.sleep(600)
    time.sleep(2)  # long enough for a second process to arrive while this one converts
    real(src, out)
    note("convert-end")
ck._convert_gguf = convert
note("call")
print("RESOLVED", ck.resolve(gguf).path, flush=True)
note("done")
'''


def _converter(gguf: Path, cache: Path, mode: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", _CONVERT, str(gguf), mode, str(log)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "ROUTESCOPE_CACHE": str(cache)})


def _events(log: Path) -> list[tuple[str, int, float]]:
    return [(e, int(p), float(t)) for e, p, t in (line.split() for line in log.read_text().splitlines())]


def _lock_is_free(lock: Path) -> bool:
    import fcntl

    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _assert_one_complete_checkpoint(root: Path, target: Path) -> None:
    from routescope.workers.checkpoint import read_safetensors_header

    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert dirs == [target.name], dirs  # no temporary directory left, no second copy
    assert json.loads((target / "config.json").read_text())["num_hidden_layers"] == 2
    assert "model.embed_tokens.weight" in read_safetensors_header(target / "model.safetensors")


def test_killed_conversion_is_cleaned_and_the_next_one_completes(gguf_file, tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "log"
    killed = _converter(gguf_file, cache, "slow", log)
    line = killed.stdout.readline()
    assert line.startswith("CONVERTING "), (line, killed.stderr.read() if killed.poll() is not None else "")
    tmp = Path(line.split(" ", 1)[1].strip())
    root = cache / "gguf"
    lock = root / f".{tmp.name.split('.tmp-')[0][1:]}.lock"
    assert tmp.parent == root and (tmp / "model.safetensors").read_bytes() == b"partial"
    assert not _lock_is_free(lock)  # held by the live conversion
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert tmp.is_dir() and _lock_is_free(lock)  # what a crash leaves: a half directory, a free lock

    fresh = _converter(gguf_file, cache, "normal", log)
    out, err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, err[-4000:]
    target = Path(out.split("RESOLVED ", 1)[1].strip())
    assert not tmp.exists()
    _assert_one_complete_checkpoint(root, target)
    assert [e for e, *_ in _events(log)] == ["call", "convert-start", "call", "convert-start", "convert-end", "done"]


def test_two_conversions_at_once_make_one_complete_checkpoint(gguf_file, tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "log"
    procs = [_converter(gguf_file, cache, "normal", log) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
        outs.append(Path(out.split("RESOLVED ", 1)[1].strip()))
    assert outs[0] == outs[1]
    _assert_one_complete_checkpoint(cache / "gguf", outs[0])
    events = _events(log)
    converters = [pid for e, pid, _ in events if e == "convert-start"]
    assert len(converters) == 1, events  # converted once
    waiter = next(pid for e, pid, _ in events if e == "call" and pid != converters[0])
    called = next(t for e, pid, t in events if e == "call" and pid == waiter)
    converted = next(t for e, pid, t in events if e == "convert-end")
    assert called < converted, events  # the second asked while the first was converting, and waited


def test_stale_temporary_directories_are_removed_and_live_ones_kept(tmp_path):
    from routescope.workers.checkpoint import STALE_TMP_SECONDS, _ConversionLock, clean_stale_conversions

    root = tmp_path / "gguf"
    root.mkdir()
    old = time.time() - STALE_TMP_SECONDS - 60
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()

    def tmpdir(name: str, age: float | None = old) -> Path:
        d = root / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
        if age is not None:
            os.utime(d, (age, age))
        return d

    stale = tmpdir(".a-1.tmp-x1")  # old, nobody holds a's lock
    recent = tmpdir(".b-2.tmp-x2", age=None)  # could be starting right now: kept
    live = tmpdir(".c-3.tmp-x3")  # old, but its conversion is alive (holds the lock): kept
    mine = tmpdir(".d-4.tmp-x4", age=None)  # recent, but the caller holds d's lock: a dead attempt
    legacy_dead = tmpdir(f"e-5.tmp{dead}")  # routescope before issue 14, its process gone
    legacy_live = tmpdir(f"f-6.tmp{os.getpid()}")  # ... its process alive: kept
    complete = root / "g-7"
    complete.mkdir()
    with _ConversionLock(root, "c-3"):
        removed = clean_stale_conversions(root, holding="d-4")
    assert sorted(removed) == sorted([stale, mine, legacy_dead])
    assert all(d.is_dir() for d in (recent, live, legacy_live, complete))
    assert not any(d.exists() for d in removed)
