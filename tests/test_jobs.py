"""Dataset jobs: in-process runs, bad inputs, resume, and submission to a local Ray head.

The Ray tests start one ``ray start --head --block`` on 127.0.0.1 (free ports, its own temp dir)
for the module and end it by its process group in teardown, so a cluster of another user on this
machine is never touched (``ray stop --force`` would kill every Ray process here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import routescope
from routescope.cluster import datasets, jobs, stats
from routescope.cluster.results import Results, done_indexes

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The cat sat on the", "Paris is the capital of", "One, two, three,", "def add(a, b): return",
    "She opened the door and", "Water boils at 100", "The quick brown fox", "import numpy as",
    "My favourite colour is", "In 1969 the first man", "Roses are red, violets are", "for i in range(",
    "The sun rises in the", "He said that he would", "Dogs are loyal and", "x = [1, 2, 3]",
    "The meeting was moved to", "Bread is made from", "Once upon a time there", "The train leaves at",
]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    return path


def assert_same(a, b, atol: float = 2e-4) -> None:
    """Two edge sets of one prompt hold the same contributions (up to float noise; a part that
    sits on the tau_min boundary may be stored by one run and not the other)."""
    assert a.n_tokens == b.n_tokens and a.n_layers == b.n_layers
    assert list(a.trace.token_ids) == list(b.trace.token_ids)
    for name in ("res_attn", "ffn", "res_ffn"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=atol, err_msg=name)
    for group, key in (("head", ("layer", "target", "source", "head")), ("edge", ("layer", "target", "source"))):
        def table(e):
            cols = [getattr(e, f"{group}_{c}").tolist() for c in key]
            return {tuple(k): float(w) for k, w in zip(zip(*cols), getattr(e, f"{group}_weight").tolist())}

        da, db = table(a), table(b)
        for k in set(da) | set(db):
            wa, wb = da.get(k), db.get(k)
            if wa is None or wb is None:
                assert (wa or wb) < a.tau_min + atol, (group, k, wa, wb)
            else:
                assert abs(wa - wb) <= atol, (group, k, wa, wb)


# ================================================================================= datasets (no model)
def test_read_text_jsonl_csv(tmp_path):
    p = tmp_path / "d.txt"
    p.write_bytes(b"first prompt\n\nthird \xff line\n" + b"x" * 50 + b"\nlast\r\n")
    d = datasets.read_dataset(p, max_chars=40)
    assert [(r.index, r.line) for r in d.records] == [(0, 1), (2, 3), (3, 4), (4, 5)]
    assert d.records[0].text == "first prompt" and d.records[3].text == "last"
    assert d.records[1].error == "line 3: not valid UTF-8 (byte 6)" and d.records[1].text is None
    assert d.records[2].error == "line 4: 50 characters exceeds the limit of 40"
    assert len(d.sha256) == 64 and d.describe()["n_invalid"] == 2

    j = tmp_path / "d.jsonl"
    j.write_text('{"prompt": "a b c"}\n{"text": "x"}\nnot json\n\n{"prompt": "tab\\u0007"}\n')
    d = datasets.read_dataset(j)
    assert d.format == "jsonl" and d.records[0].text == "a b c"
    assert "no text field 'prompt'" in d.records[1].error and "not valid JSON" in d.records[2].error
    assert "control character U+0007" in d.records[3].error and d.records[3].index == 4

    c = tmp_path / "d.csv"
    c.write_text('id,text\n1,"hello, world"\n2,\n3,"multi\nline"\n')
    d = datasets.read_dataset(c, column="text")
    assert [r.text for r in d.records] == ["hello, world", None, "multi\nline"]
    assert "empty 'text'" in d.records[1].error
    with pytest.raises(ValueError, match="no column 'prompt'"):
        datasets.read_dataset(c)


def test_read_json_array_and_nesting(tmp_path):
    j = tmp_path / "d.json"
    j.write_text('[\n  {"prompt": "one"},\n  "two",\n\n  {"prompt": ["x"]},\n  7\n]\n')
    d = datasets.read_dataset(j)
    assert d.format == "json" and [(r.index, r.line) for r in d.records] == [(0, 2), (1, 3), (2, 5), (3, 6)]
    assert [r.text for r in d.records] == ["one", "two", None, None]
    assert d.records[2].error == "item 3 (line 5): field 'prompt' is an array, not text"
    assert d.records[3].error == "item 4 (line 6): a number, not a JSON object or text"
    deep = tmp_path / "deep.jsonl"
    deep.write_text('"a JSON string is a prompt too"\n' + "[" * 100_000 + "\n")
    d = datasets.read_dataset(deep)
    assert d.records[0].text == "a JSON string is a prompt too"
    assert d.records[1].error == "line 2: JSON nested too deeply"
    for text, msg in (("[" * 100_000, "JSON nested too deeply"), ('{"prompt": "x"}', "array of records, not an object"),
                      ('["a" "b"]', "not valid JSON"), ("[]", "holds no prompts")):
        j.write_text(text)
        with pytest.raises(ValueError, match=msg):
            datasets.read_dataset(j)
    with pytest.raises(ValueError, match="dataset format: 'yaml' is not one of text, jsonl, json, csv"):
        datasets.read_dataset(j, format="yaml")


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.read_dataset(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        datasets.read_dataset(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not a file"):
        datasets.read_dataset(tmp_path)


def test_cli_errors_before_any_model_load(tmp_path, capsys):
    from routescope.cli import main

    rc = main(["run-job", "--dataset", str(tmp_path / "missing.txt"), "--results", str(tmp_path / "r")])
    assert rc == 2 and "dataset" in capsys.readouterr().err
    data = write_lines(tmp_path / "d.txt", ["hello there"])
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for results in (blocker, blocker / "sub"):
        rc = main(["run-job", "--dataset", str(data), "--results", str(results)])
        err = capsys.readouterr().err
        assert rc == 2 and "not writable" in err, err
    assert blocker.read_text() == "keep me"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_cluster(tmp_path, capsys):
    data = write_lines(tmp_path / "d.txt", ["hello there"])
    results = tmp_path / "r"
    results.mkdir()
    (results / "keep.txt").write_text("x")
    address = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot reach the Ray cluster"):
        routescope.submit(data, results, address=address)
    from routescope.cli import main

    assert main(["submit", "--address", address, "--dataset", str(data), "--results", str(results)]) == 2
    assert "cannot reach the Ray cluster at" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30
    assert sorted(p.name for p in results.iterdir()) == ["keep.txt"]


# ================================================================================= in-process jobs
@pytest.fixture(scope="module")
def pipe():
    return routescope.load("smollm2-135m")


@pytest.fixture(scope="module")
def reference(pipe):
    """Uninterrupted in-process traces of PROMPTS (index -> EdgeSet)."""
    return {i: g.edges for i, g in enumerate(pipe.trace(PROMPTS))}


def test_run_job_in_process(tmp_path, pipe, reference):
    data = write_lines(tmp_path / "d.txt", PROMPTS[:6])
    res = routescope.run_job(data, tmp_path / "r", pipeline=pipe, in_flight=4, positions="all", tau=0.05)
    assert isinstance(res, Results) and res.indexes == list(range(6))
    m = res.manifest
    assert m["status"] == "complete" and m["counts"] == {"records": 6, "done": 6, "failed": 0, "pending": 0}
    assert m["routescope_version"] == routescope.__version__ and m["model"] == "smollm2-135m"
    assert m["dataset"]["sha256"] == datasets.read_dataset(data).sha256
    assert len(m["weights"]["fingerprint"]) == 64 and m["options"]["positions"] == "all"  # sha256 of the bytes
    assert m["options"]["tau"] == 0.05 and m["model_info"]["n_layers"] == 30
    assert json.loads((tmp_path / "r" / "failed.json").read_text()) == []
    for i in range(6):
        e = res.edges(i)
        assert_same(e, reference[i])
        assert e.trace.prompt == PROMPTS[i] and e.trace.job.index == i
        assert e.trace.summary["targets"] == list(range(e.n_tokens))
        assert e.trace.attention["count"] == e.n_tokens - 2
        assert e.trace.prediction[0]["token"]
    imp = stats.importance(res)
    assert imp.n_predictions.iloc[0] == sum(res.edges(i).n_tokens for i in range(6))
    # stored summaries equal a recomputation from the edge sets
    again = stats.importance(res, tau=0.05, mode="renormalize", positions="all")
    np.testing.assert_allclose(imp.frequency, again.frequency)
    prev = stats.previous_token(res)
    assert prev["prev_token"].between(0, 1).all() and len(prev) == 30 * 9
    assert res.graph(0).route(0.05).records()


def test_previous_token_fast_path_matches_attention_maps(pipe):
    g = pipe.trace("The quick brown fox jumps over")
    fast = jobs.previous_token_sums(g, bos_sink=True)
    t = np.arange(2, g.n_tokens)
    for layer, head in ((0, 0), (3, 4), (29, 8)):
        p, _ = g.live.attention_maps(layer, head)  # the public (slow) detail query
        assert fast["prev_sum"][layer][head] == pytest.approx(float(p[t, t - 1].sum()), abs=1e-6)
        assert fast["nonsink_sum"][layer][head] == pytest.approx(float(p[t, 1:].sum()), rel=1e-5)


class Crashing:
    """A pipeline that dies (like a killed process) on its ``n``-th ``trace_ids`` call."""

    def __init__(self, pipe, n: int):
        self._pipe, self._n = pipe, n

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def trace_ids(self, *args, **kwargs):
        self._n -= 1
        if self._n == 0:
            raise SystemExit("killed")
        return self._pipe.trace_ids(*args, **kwargs)


def test_resume_after_crash_in_process(tmp_path, pipe, reference):
    data = write_lines(tmp_path / "d.txt", PROMPTS[:5])
    results = tmp_path / "r"
    with pytest.raises(SystemExit):
        routescope.run_job(data, results, pipeline=Crashing(pipe, 2), in_flight=2)
    assert done_indexes(results) == {0, 1}
    assert json.loads((results / "manifest.json").read_text())["status"] == "running"
    before = {p.name: p.read_bytes() for p in (results / "prompts").iterdir()}
    res = routescope.run_job(data, results, pipeline=pipe, in_flight=3)
    assert res.indexes == list(range(5)) and len(list((results / "prompts").iterdir())) == 5
    for name, data_ in before.items():  # finished prompts were not redone
        assert (results / "prompts" / name).read_bytes() == data_
    for i in range(5):
        assert_same(res.edges(i), reference[i])
    m = res.manifest
    assert m["status"] == "complete" and len(m["runs"]) == 2


def test_bad_lines_are_reported_and_results_kept(tmp_path, pipe):
    data = tmp_path / "d.txt"
    data.write_bytes(b"The cat sat on the\nbad \xc3\x28 byte\n" + b"long " * 20 + b"\nOne two three\n")
    results = tmp_path / "r"
    res = routescope.run_job(data, results, pipeline=pipe, max_chars=60)
    assert res.indexes == [0, 3]
    failed = {f["index"]: f["error"] for f in res.failed}
    assert failed == {1: "line 2: not valid UTF-8 (byte 4)", 2: "line 3: 100 characters exceeds the limit of 60"}
    assert res.manifest["status"] == "complete_with_failures"
    snapshot = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    # another job into the same location is refused; nothing written is touched
    with pytest.raises(ValueError, match="different job.*option tau_min"):
        routescope.run_job(data, results, pipeline=pipe, max_chars=60, tau_min=0.02)
    other = write_lines(tmp_path / "other.txt", ["Something else entirely"])
    with pytest.raises(ValueError, match="dataset contents"):
        routescope.run_job(other, results, pipeline=pipe)
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == snapshot
    with pytest.raises(TypeError, match="unknown option"):
        routescope.run_job(data, results, pipeline=pipe, colour="blue")


# ================================================================================= Ray cluster
@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head`` on 127.0.0.1 (dashboard on loopback); yields the dashboard address."""
    temp = tempfile.mkdtemp(prefix="rsray-", dir="/tmp")
    ports = [free_port() for _ in range(7)]
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--port={ports[0]}",
           f"--dashboard-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
           f"--ray-client-server-port={ports[3]}", f"--dashboard-agent-grpc-port={ports[4]}",
           f"--runtime-env-agent-port={ports[5]}", f"--metrics-export-port={ports[6]}", f"--temp-dir={temp}",
           "--disable-usage-stats"]
    log = open(Path(temp) / "head.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(temp) / 'head.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # 401 without the token: the dashboard is up
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        _stop_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop_head(proc: subprocess.Popen, temp: str) -> None:
    """End the head we started: its process group, then any process of its session left over."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    for pid_dir in Path("/proc").iterdir():  # workers that left the group but belong to our temp dir
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if temp.encode() in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def dataset20(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("data") / "prompts20.txt", PROMPTS)


@pytest.fixture(scope="module")
def ray_job_results(ray_head, dataset20, tmp_path_factory):
    """A 20-prompt, 2-stage job submitted through the Job Submission API, run to completion."""
    results = tmp_path_factory.mktemp("ray") / "results"
    handle = routescope.submit(dataset20, results, address=ray_head, stages=2, in_flight=4)
    status = handle.wait(timeout=300)
    logs = handle.logs()
    assert status == "SUCCEEDED", logs[-3000:]
    return handle, logs


def test_ray_job_end_to_end(ray_job_results, reference):
    handle, logs = ray_job_results
    assert handle.status() == "SUCCEEDED"
    assert "progress: 20/20 prompts done" in logs and "stage actors unavailable" not in logs
    res = handle.results()
    assert res.indexes == list(range(20)) and res.failed == []
    m = res.manifest
    assert m["layout"] == [[0, 11], [11, 30]] and m["pipeline"] == "RayStageClient"
    assert m["runs"][0]["job_id"] == handle.job_id
    for i in range(20):
        assert_same(res.edges(i), reference[i])
    assert handle.progress() == (20, 20)


def test_ray_job_killed_and_resubmitted(ray_head, dataset20, ray_job_results, tmp_path):
    results = tmp_path / "results"
    handle = routescope.submit(dataset20, results, address=ray_head, stages=2, in_flight=2, throttle_s=1.5)
    deadline = time.monotonic() + 240
    while len(done_indexes(results)) < 4:
        assert handle.status() not in ("FAILED", "SUCCEEDED"), handle.logs()[-3000:]
        assert time.monotonic() < deadline, handle.logs()[-3000:]
        time.sleep(0.2)
    assert handle.cancel(timeout=60) == "STOPPED"
    n_killed = len(done_indexes(results))
    assert 4 <= n_killed < 20
    # resubmit from the command line, waiting for the end
    out = subprocess.run([sys.executable, "-m", "routescope", "submit", "--address", ray_head, "--dataset",
                          str(dataset20), "--results", str(results), "--stages", "2", "--in-flight", "4", "--wait"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "(resuming)" in out.stdout and "progress: 20/20 prompts done" in out.stdout
    names = sorted(p.name for p in (results / "prompts").iterdir())
    assert names == [f"{i:06d}.msgpack" for i in range(20)]  # every prompt exactly once, no temp files
    res = Results(results)
    assert len(res.manifest["runs"]) == 2 and res.manifest["status"] == "complete"
    uninterrupted = ray_job_results[0].results()
    for i in range(20):
        assert_same(res.edges(i), uninterrupted.edges(i))
        assert res.edges(i).trace.summary == uninterrupted.edges(i).trace.summary or np.allclose(
            res.edges(i).trace.summary["head_flow"], uninterrupted.edges(i).trace.summary["head_flow"], atol=1e-4)


def test_submitted_job_refused_while_results_are_in_use(ray_head, dataset20, tmp_path):
    """A submitted job ends in run-job's code: refused while another job holds the results
    directory (here this test process), it fails, and ``submit --wait`` shows why and exits 1."""
    results = tmp_path / "results"
    results.mkdir()
    lock = jobs.lock_results(results)
    try:
        before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
        out = subprocess.run([sys.executable, "-m", "routescope", "submit", "--address", ray_head, "--dataset",
                              str(dataset20), "--results", str(results), "--wait"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        holder = json.loads((results / "job.lock").read_text())
        message = (f"routescope run-job: error: results location {results} is in use by another job "
                   f"(pid {os.getpid()} on {holder['host']}, started {holder['started_at']}); wait for it to end, "
                   "or pass --wait-lock [SECONDS] (wait_lock= in run_job) to wait for it")
        assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
        last = out.stdout.strip().splitlines()[-1]
        assert last.startswith("job routescope-") and last.endswith(f": FAILED: {message}"), out.stdout[-3000:]
        assert message in out.stdout.splitlines()  # the job's own line, streamed with its logs
        assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before
    finally:
        lock.release()


def test_notebook_runs_end_to_end(ray_head, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "examples" / "dataset_job.ipynb", as_version=4)
    os.environ["ROUTESCOPE_EXAMPLE_ADDRESS"] = ray_head
    os.environ["ROUTESCOPE_EXAMPLE_PROMPTS"] = "10"
    os.environ["ROUTESCOPE_EXAMPLE_RESULTS"] = str(tmp_path / "nb-results")
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k in ("ROUTESCOPE_EXAMPLE_ADDRESS", "ROUTESCOPE_EXAMPLE_PROMPTS", "ROUTESCOPE_EXAMPLE_RESULTS"):
            os.environ.pop(k, None)
    outputs = "".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "SUCCEEDED" in outputs and "image/png" in outputs
    assert Results(tmp_path / "nb-results").indexes == list(range(10))
