"""Dataset jobs that share a results directory, resumes that would mix, and hostile results
(issue 14, the dataset-job part), with real ``routescope run-job`` processes.

* One job at a time per results directory (an OS file lock held for the job's lifetime): two
  jobs started together, with equal or different options, never mix; exactly one runs, the other
  is refused with a one-line message naming the directory and the holder, or waits
  (``--wait-lock``) and then computes nothing again. Stored bytes are unchanged by every refusal.
* A resume is refused when anything that changes the stored numbers differs: dtype, tau_min,
  the weights' bytes (a tensor rewritten in place, same shape), the edge-set version.
* Only the file names the job writes count as done prompts; stray names, links, directories,
  symbolic-link loops neither count nor crash.
* Result files follow the umask; a link planted at a temporary name is never written through.
* Statistics over a crafted result declaring huge sizes are refused before allocating.

A tiny 4-layer Llama keeps each process to seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from routescope.cluster import jobs, stats, storage
from routescope.cluster.results import LOCK, Results, ResultsError, done_indexes, prompt_index
from routescope.workers.checkpoint import Checkpoint
from routescope.workers.edgeset import VERSION as EDGESET_VERSION

EXE = str(Path(sys.executable).with_name("routescope"))
WORDS = "the river city bridge salt wool iron market tower north winter ships harbour king garden".split()
PROMPTS = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5)).capitalize() for i in range(20)]
RUN_TIMEOUT = 300


# ================================================================================= helpers
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "ROUTESCOPE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from routescope.workers.tiny import build_tiny_model

    return str(build_tiny_model("llama", tmp_path_factory.mktemp("safety") / "tiny", n_layers=4))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "prompts.txt"
    p.write_text("".join(f"{x}\n" for x in PROMPTS))
    return p


def cmd(tiny: str, dataset: Path, results: Path, *extra: str) -> list[str]:
    return [EXE, "run-job", "--model", tiny, "--dataset", str(dataset), "--results", str(results),
            "--in-flight", "2", *extra]


def start(args, env, *, throttle: float = 0.0, umask: int = 0o022, stdout=subprocess.PIPE) -> subprocess.Popen:
    e = {**env, "ROUTESCOPE_JOB_THROTTLE_S": repr(throttle)} if throttle else env
    return subprocess.Popen(args, stdout=stdout, stderr=subprocess.PIPE, text=True, env=e,
                            preexec_fn=lambda: os.umask(umask))


def run(args, env, **kw) -> subprocess.CompletedProcess:
    p = start(args, env, **kw)
    out, err = p.communicate(timeout=RUN_TIMEOUT)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def checksums(results: Path, *, lock: bool = False) -> dict[str, str]:
    """SHA-256 of every file under ``results`` (links by their target, never followed); the lock
    file, whose content names the current holder, only with ``lock``."""
    out = {}
    for root, dirs, files in os.walk(results, followlinks=False):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(results))
            if rel == LOCK and not lock:
                continue
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif not p.is_dir():
                out[rel] = f"special:{stat.S_IFMT(os.lstat(p).st_mode)}"
    return out


def holder() -> dict:
    """What the job lock of this test process says about it."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def locked_message(results: Path, h: "dict | Path") -> str:
    """The refusal of a job finding ``results`` locked by holder ``h`` (a record, or the lock
    file holding one)."""
    h = json.loads(h.read_text()) if isinstance(h, Path) else h
    return (f"routescope run-job: error: results location {results} is in use by another job "
            f"(pid {h['pid']} on {h['host']}, started {h['started_at']}); wait for it to end, or pass "
            f"--wait-lock [SECONDS] (wait_lock= in run_job) to wait for it")


def different_job(results: Path, *diffs: str) -> str:
    return (f"routescope run-job: error: results location {results} holds results of a different job: "
            + "; ".join(diffs) + ". Use another results location (existing results were left untouched)")


def assert_one_option_set(results: Path, n: int, *, tau_min: float, norm: str) -> None:
    """Every prompt present exactly once, every file decodes, and all of one option set."""
    res = Results(results)
    assert res.indexes == list(range(n))
    assert res.problems() == {}
    names = sorted(os.listdir(results / "prompts"))
    assert names == [f"{i:06d}.msgpack" for i in range(n)]  # nothing else, no temporary files
    for i in range(n):
        es = res.edges(i)
        assert (es.tau_min, es.norm) == (tau_min, norm), i
        assert es.trace.prompt == PROMPTS[i] and es.trace.job.index == i
    opts = res.manifest["options"]
    assert (opts["tau_min"], opts["norm"]) == (tau_min, norm)
    assert res.manifest["status"] == "complete"


def traced(stdout: str) -> int:
    line = [ln for ln in stdout.splitlines() if ln.startswith("routescope job: done:")][-1]
    return int(line.split(" traced by this run")[0].rsplit(", ", 1)[1])


@pytest.fixture(scope="module")
def complete(tmp_path_factory, tiny, dataset, env) -> Path:
    """A finished 20-prompt job (umask 022), copied by the tests that change it."""
    results = tmp_path_factory.mktemp("complete") / "results"
    out = run(cmd(tiny, dataset, results), env)
    assert out.returncode == 0, out.stderr
    assert traced(out.stdout) == 20
    return results


def copy_of(complete: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "results"
    shutil.copytree(complete, dst, symlinks=True)
    return dst


# ================================================================================= one job at a time
@pytest.mark.parametrize("second", [(), ("--norm", "l2")], ids=["equal-options", "different-options"])
def test_two_jobs_started_together(tmp_path, tiny, dataset, env, second):
    results = tmp_path / "results"
    a = start(cmd(tiny, dataset, results), env, throttle=0.4)
    b = start(cmd(tiny, dataset, results, *second), env, throttle=0.4)
    outs = {p: p.communicate(timeout=RUN_TIMEOUT) for p in (a, b)}
    assert sorted(p.returncode for p in (a, b)) == [0, 2], {p.pid: o for p, o in outs.items()}
    winner, loser = (a, b) if a.returncode == 0 else (b, a)
    # the refused job: one line naming the directory and the winner (its pid, when it took the lock)
    run0 = Results(results).manifest["runs"][0]
    assert run0["pid"] == winner.pid
    assert outs[loser][1].strip() == locked_message(results, {**run0, "started_at": run0["locked_at"]})
    assert "routescope job:" not in outs[loser][0]  # it wrote nothing, not even a start line
    assert (results / LOCK).read_bytes() == b""  # released: an idle lock file names no holder
    # nothing mixed, nothing lost: the winner's options throughout
    norm = "l2" if (winner is b and second) else "l1"
    assert_one_option_set(results, 20, tau_min=0.01, norm=norm)
    m = Results(results).manifest
    assert len(m["runs"]) == 1 and m["runs"][0]["pid"] == winner.pid and m["runs"][0]["traced"] == 20
    for p in [results / "manifest.json", results / "failed.json", results / LOCK, results / "prompts" / "000000.msgpack"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p  # umask 022

    # Refused attempts while a job holds the directory (here: this test process) change no byte.
    lock = jobs.lock_results(results)
    try:
        assert {k: json.loads((results / LOCK).read_text())[k] for k in ("pid", "host")} == holder()
        before = checksums(results, lock=True)
        for extra in ((), ("--norm", "l2"), ("--tau-min", "0.02")):
            out = run(cmd(tiny, dataset, results, *extra), env)
            assert out.returncode == 2
            assert out.stderr.strip() == locked_message(results, results / LOCK)
            assert checksums(results, lock=True) == before
    finally:
        lock.release()


def test_wait_lock_waits_then_computes_nothing(tmp_path, tiny, dataset, env, complete):
    results = copy_of(complete, tmp_path)
    prompts_before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (results / "prompts").iterdir()}
    stored = checksums(results)
    lock = jobs.lock_results(results)
    log = tmp_path / "b.out"
    with open(log, "w") as f:
        b = start(cmd(tiny, dataset, results, "--wait-lock"), env, stdout=f)
        deadline = time.monotonic() + 120
        while "waiting as long as it takes" not in log.read_text():
            assert b.poll() is None, b.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)
        assert b.poll() is None and checksums(results) == stored  # it waits, and touches nothing
        lock.release()
        _, err = b.communicate(timeout=RUN_TIMEOUT)
    out = log.read_text()
    assert b.returncode == 0, err
    assert f"results location {results} is in use by another job (pid {os.getpid()} on" in out
    assert "(resuming)" in out and traced(out) == 0  # found the job complete: computed nothing
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (results / "prompts").iterdir()} == prompts_before
    m = Results(results).manifest
    assert len(m["runs"]) == 2 and m["runs"][1]["traced"] == 0 and m["status"] == "complete"


def test_wait_lock_timeout_and_refusal_after_waiting(tmp_path, tiny, dataset, env, complete):
    results = copy_of(complete, tmp_path)
    lock = jobs.lock_results(results)
    try:
        before = checksums(results, lock=True)
        t0 = time.monotonic()
        out = run(cmd(tiny, dataset, results, "--wait-lock", "1.5"), env)
        assert out.returncode == 2 and time.monotonic() - t0 >= 1.5
        h = json.loads((results / LOCK).read_text())
        assert out.stderr.strip() == (f"routescope run-job: error: results location {results} is in use by another "
                                      f"job (pid {h['pid']} on {h['host']}, started {h['started_at']}), still after "
                                      "waiting 2s")
        assert checksums(results, lock=True) == before
    finally:
        lock.release()
    # waiting, then finding a job of other options: refused like any resume that would mix
    lock = jobs.lock_results(results)
    stored = checksums(results)
    log = tmp_path / "b.out"
    with open(log, "w") as f:
        b = start(cmd(tiny, dataset, results, "--wait-lock", "60", "--tau-min", "0.02"), env, stdout=f)
        deadline = time.monotonic() + 120
        while "waiting up to 60s" not in log.read_text():
            assert b.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        lock.release()
        _, err = b.communicate(timeout=RUN_TIMEOUT)
    assert b.returncode == 2, log.read_text() + err
    assert err.strip() == different_job(results, "option tau_min (0.01 vs 0.02)")
    assert checksums(results) == stored


def test_two_waiting_jobs_trace_every_prompt_once(tmp_path, tiny, dataset, env):
    results = tmp_path / "results"
    a = start(cmd(tiny, dataset, results, "--wait-lock", "300"), env, throttle=0.2)
    b = start(cmd(tiny, dataset, results, "--wait-lock", "300"), env, throttle=0.2)
    outs = {p: p.communicate(timeout=2 * RUN_TIMEOUT) for p in (a, b)}
    assert [a.returncode, b.returncode] == [0, 0], outs
    assert sorted(traced(o) for o, _ in outs.values()) == [0, 20]
    assert sum("waiting up to 300s" in o for o, _ in outs.values()) == 1
    assert_one_option_set(results, 20, tau_min=0.01, norm="l1")
    assert [r["traced"] for r in Results(results).manifest["runs"]] == [20, 0]


def test_lock_is_released_by_a_killed_job(tmp_path, tiny, dataset, env):
    results = tmp_path / "results"
    a = start(cmd(tiny, dataset, results), env, throttle=5.0)
    deadline = time.monotonic() + 120
    while not done_indexes(results):
        assert a.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(jobs.ResultsLocked, match=f"in use by another job \\(pid {a.pid} on"):
        jobs.lock_results(results)
    a.kill()
    a.wait(timeout=30)
    jobs.lock_results(results).release()  # no stale lock: the OS dropped it with the process


def test_lock_api(tmp_path, monkeypatch):
    """In one process too, two locks of one directory exclude each other; a planted link at the
    lock file's name is refused, never written through."""
    (tmp_path / "r").mkdir()
    first = jobs.lock_results(tmp_path / "r", job_id="j1")
    with pytest.raises(jobs.ResultsLocked) as exc:
        jobs.lock_results(tmp_path / "r")
    assert "\n" not in str(exc.value) and str(tmp_path / "r") in str(exc.value)
    assert json.loads((tmp_path / "r" / LOCK).read_text())["job_id"] == "j1"
    first.release()
    jobs.lock_results(tmp_path / "r").release()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "s").mkdir()
    os.symlink(victim, tmp_path / "s" / LOCK)
    with pytest.raises(ValueError, match="cannot take the job lock .*symbolic link"):
        jobs.lock_results(tmp_path / "s")
    assert victim.read_text() == "keep"
    with pytest.raises(ValueError, match="wait_lock"):
        jobs.JobSpec("d", "r", wait_lock=-1).check()
    assert jobs.JobSpec("d", "r", wait_lock=float("inf")).to_args()[-2:] == ["--wait-lock", "inf"]


# ================================================================================= resume refusals
def test_resume_refusals_name_every_differing_field(tmp_path, tiny, dataset, env, complete):
    results = copy_of(complete, tmp_path)
    stored = checksums(results, lock=True)
    cases = [
        (("--dtype", "bfloat16"), ["option dtype ('float32' vs 'bfloat16')"]),
        (("--tau-min", "0.02"), ["option tau_min (0.01 vs 0.02)"]),
        (("--tau-min", "0.02", "--norm", "l2", "--positions", "all"),
         ["option tau_min (0.01 vs 0.02)", "option norm ('l1' vs 'l2')", "option positions ('last' vs 'all')"]),
        (("--mode", "plain"), ["option mode ('renormalize' vs 'plain')"]),
    ]
    for extra, diffs in cases:
        out = run(cmd(tiny, dataset, results, *extra), env)
        assert out.returncode == 2, out.stdout
        assert out.stderr.strip() == different_job(results, *diffs)
        assert checksums(results, lock=True) == stored
    # an edge-set wire version other than this writer's
    m = json.loads((results / "manifest.json").read_text())
    assert m["edgeset_version"] == EDGESET_VERSION and m["options"]["dtype"] == "float32"
    m["edgeset_version"] = EDGESET_VERSION - 1
    (results / "manifest.json").write_text(json.dumps(m))
    stored = checksums(results, lock=True)
    out = run(cmd(tiny, dataset, results), env)
    assert out.returncode == 2
    assert out.stderr.strip() == different_job(results, f"edge-set version ({EDGESET_VERSION - 1} vs {EDGESET_VERSION})")
    assert checksums(results, lock=True) == stored


def _rewrite_one_tensor(model_file: Path) -> str:
    """Overwrite one tensor's bytes in place (same dtype, shape, file size); return its name."""
    with open(model_file, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        name = sorted(k for k in header if k != "__metadata__")[0]
        a, b = header[name]["data_offsets"]
        f.seek(8 + n + a)
        old = f.read(b - a)
        f.seek(8 + n + a)
        f.write(bytes(x ^ 0x01 for x in old))  # low mantissa bits: same shape, other numbers
    return name


def test_resume_refused_when_weights_changed_in_place(tmp_path, tiny, env, monkeypatch):
    monkeypatch.setenv("ROUTESCOPE_CACHE", env["ROUTESCOPE_CACHE"])
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    data = tmp_path / "d.txt"
    data.write_text("".join(f"{x}\n" for x in PROMPTS[:3]))
    results = tmp_path / "results"
    out = run(cmd(str(model), data, results), env)
    assert out.returncode == 0, out.stderr
    old = Results(results).manifest["weights"]["fingerprint"]
    ckpt = Checkpoint(model, str(model))
    assert ckpt.fingerprint() == old and len(old) == 64
    stored = checksums(results, lock=True)
    st = (model / "model.safetensors").stat()
    _rewrite_one_tensor(model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the mtime put back
    assert (model / "model.safetensors").stat().st_size == st.st_size
    new = ckpt.fingerprint()
    assert new != old
    out = run(cmd(str(model), data, results), env)
    assert out.returncode == 2, out.stdout
    assert out.stderr.strip() == different_job(results, f"weights contents sha256 ({old!r} vs {new!r})")
    assert checksums(results, lock=True) == stored
    # a changed config (same weights) is another model too
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 10
    (model / "config.json").write_text(json.dumps(cfg))
    assert ckpt.fingerprint() not in (old, new)


def test_fingerprint_is_cached_by_file_identity(tmp_path, tiny, monkeypatch):
    from routescope.workers import checkpoint

    monkeypatch.setenv("ROUTESCOPE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    ckpt = Checkpoint(model, "m")
    fp = ckpt.fingerprint()
    assert list((tmp_path / "cache" / "fingerprints").glob("*.json"))  # on disk for the next process
    reads = []
    monkeypatch.setattr(checkpoint, "open", lambda f, *a, **k: (reads.append(str(f)), open(f, *a, **k))[1],
                        raising=False)
    checkpoint._HASH_MEMO.clear()
    assert ckpt.fingerprint() == fp
    assert not [r for r in reads if r.endswith(".safetensors")]  # unchanged: not read again
    checkpoint._HASH_MEMO.clear()
    (tmp_path / "cache" / "fingerprints").rename(tmp_path / "cache" / "gone")
    assert ckpt.fingerprint() == fp and [r for r in reads if r.endswith(".safetensors")]  # no cache: read
    monkeypatch.delattr(checkpoint, "open")
    _rewrite_one_tensor(model / "model.safetensors")
    assert ckpt.fingerprint() != fp


# ================================================================================= stray names
def test_stray_names_in_prompts_neither_count_nor_crash(tmp_path, tiny, dataset, env, complete):
    results = copy_of(complete, tmp_path)
    d = results / "prompts"
    (d / "\u0660\u0660\u0660\u0660\u0660\u0661.msgpack").write_bytes(b"garbage")  # Arabic-Indic digits: int() reads 1
    (d / "\uff10\uff10\uff10\uff10\uff10\uff15.msgpack").write_bytes(b"garbage")  # full-width digits
    (d / "0000001.msgpack").write_bytes((d / "000001.msgpack").read_bytes())  # not a name the job writes
    (d / "000002.msgpack.bak").write_bytes(b"x")
    (d / "garbage").write_bytes(os.urandom(64))
    (d / "12345.msgpack").write_bytes(b"x")  # five digits
    (d / "000100.msgpack").mkdir()  # a directory under a result's name
    os.symlink(d / "000003.msgpack", d / "000101.msgpack")  # a link to a real result
    os.symlink("000102.msgpack", d / "000102.msgpack")  # a symbolic-link loop
    os.symlink("/nonexistent", d / "000103.msgpack")  # dangling
    os.mkfifo(d / "000104.msgpack")  # a FIFO: opening it must not hang
    assert [prompt_index(n) for n in ("000001.msgpack", "1000000.msgpack", "\u0660\u0660\u0660\u0660\u0660\u0661.msgpack",
                                       "0000001.msgpack", ".000001.msgpack.ab.tmp")] == [1, 1000000, None, None, None]
    assert done_indexes(results) == set(range(20))
    res = Results(results)
    assert res.indexes == list(range(20)) and res.problems() == {}
    with pytest.raises(KeyError):
        res.edges(101)  # a link is not a result
    assert stats.importance(res).n_predictions.iloc[0] == 20
    stray = sorted(os.listdir(d))
    out = run(cmd(tiny, dataset, results), env)  # resume: nothing stale, nothing to do
    assert out.returncode == 0, out.stderr
    assert traced(out.stdout) == 0
    assert sorted(os.listdir(d)) == stray  # the user's files are left alone


# ================================================================================= umask, links
def test_files_follow_the_umask(tmp_path, tiny, env):
    from routescope.cluster.graph import FlowGraph

    saved = os.umask(0o022)
    try:
        for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(mask)
            p = tmp_path / f"f{mask:o}.json"
            storage.atomic_write(p, b"{}")
            assert stat.S_IMODE(p.stat().st_mode) == mode
            storage.atomic_write(p, b"[]")  # replacing keeps to the umask as well
            assert stat.S_IMODE(p.stat().st_mode) == mode
            q = tmp_path / f"c{mask:o}.json"
            storage.atomic_create(q, b"{}")
            assert stat.S_IMODE(q.stat().st_mode) == mode
            with pytest.raises(FileExistsError):
                storage.atomic_create(q, b"[]")
            assert q.read_bytes() == b"{}"
        os.umask(0o077)
        g = FlowGraph(_crafted(4, 2, 8, "last"))
        g.save(tmp_path / "g.msgpack")
        assert stat.S_IMODE((tmp_path / "g.msgpack").stat().st_mode) == 0o600
    finally:
        os.umask(saved)
    # a real job under umask 077: every file 0600, every folder 0700
    data = tmp_path / "d.txt"
    data.write_text(PROMPTS[0] + "\n")
    results = tmp_path / "results"
    out = run(cmd(tiny, data, results), env, umask=0o077)
    assert out.returncode == 0, out.stderr
    modes = {str(p.relative_to(results)): stat.S_IMODE(p.stat().st_mode) for p in results.rglob("*")}
    assert modes == {"manifest.json": 0o600, "failed.json": 0o600, LOCK: 0o600, "prompts": 0o700,
                     "prompts/000000.msgpack": 0o600}


def test_atomic_write_never_follows_a_link_at_its_temporary_name(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    names = iter(["planted", "fresh0"])
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: next(names))
    os.symlink(victim, tmp_path / ".out.json.planted.tmp")
    storage.atomic_write(tmp_path / "out.json", b"new")
    assert victim.read_text() == "keep" and (tmp_path / "out.json").read_bytes() == b"new"
    assert os.path.islink(tmp_path / ".out.json.planted.tmp")
    # a link at the destination is replaced, not written through
    os.symlink(victim, tmp_path / "dest.json")
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: os.urandom(n).hex())
    storage.atomic_write(tmp_path / "dest.json", b"new")
    assert victim.read_text() == "keep" and not os.path.islink(tmp_path / "dest.json")


# ================================================================================= crafted sizes
def _crafted(n_layers: int, n_heads: int, n_tokens: int, positions: str):
    from routescope.workers.edgeset import EdgeSet
    from routescope.workers.schema import JobMeta, TraceMeta

    e = np.zeros(0)
    dense = np.zeros((n_layers, n_tokens), np.float32)
    return EdgeSet("crafted", n_layers, n_heads, n_tokens, 0, n_layers, False, "l1", 0.01,
                   e, e, e, e, e, e, e, e, e, dense, dense, dense,
                   trace=TraceMeta(job=JobMeta(index=0, line=1, positions=positions, job_id="")))


def _crafted_results(path: Path, es) -> Path:
    (path / "prompts").mkdir(parents=True)
    (path / "prompts" / "000000.msgpack").write_bytes(es.encode())
    (path / "manifest.json").write_text(json.dumps({"schema": jobs.SCHEMA, "status": "complete"}))
    (path / "failed.json").write_text("[]")
    return path


RSS_SCRIPT = textwrap.dedent("""
    # Peak RSS of this process while statistics refuse a crafted result: VmHWM, the high-water
    # mark of this process's own memory (reset to the current RSS by clear_refs 5; getrusage's
    # ru_maxrss would carry the forking parent's size across exec).
    import json, sys, psutil
    from routescope.cluster import stats
    from routescope.cluster.results import Results

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    res = Results(sys.argv[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = psutil.Process().memory_info().rss
    try:
        getattr(stats, sys.argv[2])(res)
        error = None
    except ValueError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "peak_growth": hwm() - base,
                      "rss_growth": psutil.Process().memory_info().rss - base}))
""")


@pytest.mark.parametrize("shape", [(1, 1, 1 << 20, "all"), (4096, 4096, 1, "last")], ids=["tokens", "heads"])
@pytest.mark.parametrize("function", ["importance", "previous_token"])
def test_crafted_huge_sizes_are_refused_before_allocating(tmp_path, shape, function):
    es = _crafted(*shape)
    results = _crafted_results(tmp_path / "r", es)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(results), function],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    path = str(results / "prompts" / "000000.msgpack")
    assert r["error"] is not None and r["error"].startswith(path + ": ") and "refused" in r["error"], r
    assert r["peak_growth"] < 100 * 2**20, r  # refused before any array of the declared sizes
    if function == "importance" and shape[3] == "all":
        # without the bound: 10 float64 rows of [P=T, T] alone would be 80 TiB
        assert "would allocate about" in r["error"] and "TiB" in r["error"]
    with pytest.raises(stats.StatsSizeError, match="prediction_summary: "):
        stats.prediction_summary(es, targets=range(es.n_tokens) if shape[3] == "all" else None)


def test_crafted_result_larger_than_an_edge_set_is_not_read(tmp_path, monkeypatch):
    from routescope.cluster import results as results_mod
    from routescope.workers.edgeset import EdgeSetError

    r = _crafted_results(tmp_path / "r", _crafted(1, 1, 4, "last"))
    monkeypatch.setattr(results_mod, "MAX_PAYLOAD_BYTES", 64)
    with pytest.raises(EdgeSetError, match="000000.msgpack: .* bytes exceeds the limit of 64"):
        Results(r).edges(0)


# ================================================================================= symlink loops
def test_symlink_loops_are_clear_errors_or_skipped(tmp_path, tiny, dataset, env, complete):
    # loops inside the results directory (not where results are read): skipped
    results = copy_of(complete, tmp_path)
    os.symlink("loop", results / "loop")
    os.symlink("..", results / "prompts" / "up")
    os.symlink(".", results / "prompts" / "self")
    res = Results(results)
    assert res.indexes == list(range(20)) and res.problems() == {}
    assert len(stats.previous_token(res)) == 4 * 4
    out = run(cmd(tiny, dataset, results), env)
    assert out.returncode == 0 and traced(out.stdout) == 0, out.stderr

    # prompts/ itself a symbolic-link loop
    looped = tmp_path / "looped"
    shutil.copytree(complete, looped, symlinks=True, ignore=shutil.ignore_patterns("prompts"))
    os.symlink("prompts", looped / "prompts")
    for call in (lambda: Results(looped).indexes, lambda: done_indexes(looped), lambda: stats.importance(looped)):
        with pytest.raises(ResultsError, match=f"{looped / 'prompts'}: not a readable directory"):
            call()
    stored = checksums(looped, lock=True)
    out = run(cmd(tiny, dataset, looped), env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"routescope run-job: error: {looped / 'prompts'}: not a readable directory "
                                  "(Too many levels of symbolic links)")
    assert checksums(looped, lock=True) == stored

    # the manifest a loop
    mloop = tmp_path / "mloop"
    shutil.copytree(complete, mloop, symlinks=True)
    (mloop / "manifest.json").unlink()
    os.symlink("manifest.json", mloop / "manifest.json")
    with pytest.raises(ResultsError, match="symbolic-link loop"):
        Results(mloop)
    out = run(cmd(tiny, dataset, mloop), env)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"routescope run-job: error: results location {mloop}: manifest.json is a symbolic link, not a job manifest")

    # the results location itself a loop
    rloop = tmp_path / "rloop"
    os.symlink("rloop", rloop)
    out = run(cmd(tiny, dataset, rloop), env)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"routescope run-job: error: results location {rloop} cannot be used:")
    with pytest.raises(FileNotFoundError, match="not a results directory"):
        Results(rloop)


def test_oversized_job_files_are_refused_before_reading(tmp_path):
    """A colleague's manifest.json / failed.json of hundreds of MiB is refused by its size on the
    opened file, not read whole (issue 14, limits before allocating)."""
    import psutil

    from routescope.cluster.results import MAX_JOB_FILE_BYTES, Results, ResultsError

    (tmp_path / "prompts").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    with open(tmp_path / "failed.json", "wb") as f:
        f.truncate(200 * 2**20)  # sparse: costs no disk
    before = psutil.Process().memory_info().rss
    with pytest.raises(ResultsError, match=f"failed.json of {200 * 2**20} bytes exceeds the limit of {MAX_JOB_FILE_BYTES}"):
        Results(tmp_path).failed
    assert psutil.Process().memory_info().rss - before < 100 * 2**20
