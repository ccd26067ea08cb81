"""Detail-query seams before and after a refactor, both measured in one run (SmolLM2, 256 tokens).

    .venv/bin/python benchmarks/bench_seams.py [--before 1f7132e] [--tokens 256] [--only before|after]

Figures, per code version:

1. In-process trace: median of 5 (after one warm-up) of ``pipe.trace_ids([ids])`` on a one-stage
   ``Pipeline.local("smollm2-135m")``.
2. Bytes per viewer click on the residual node ``I20_{T-1}`` (its top tokens with ranks against its
   predecessor), counted at the stage-client boundary of a 2-stage local Ray pipeline: every call
   on a client object is wrapped, and ``len(pickle.dumps(x, protocol=5))`` of its arguments and of
   its answer is summed (torch tensors through plain pickle: an estimate of what Ray serialises).
   Answers alone are what reaches the driver. Also: the same for one attention-edge and one FFN click.
3. Click -> panel latency through that Ray pipeline: median over 20 clicks at 20 different layers of
   every query one click makes (residual node; attention edge: head contributions + one head's
   maps; FFN node: top neurons + the tokens ``mlp_out`` promotes).

"before" is a git commit, checked out as a git worktree under /tmp; "after" is the working tree
holding this script. Each side runs in its own subprocess (one after the other) whose PYTHONPATH
starts with a temporary ``routescope/`` package made of symlinks into that tree (the layout of its
pyproject ``package-dir``), so ``import routescope`` loads that tree and not the editable install.

Version-specific calls live in two adapters, ``OldAPI`` (``graph.top_tokens`` ...,
``client.call(method, ...)``) and ``NewAPI`` (``graph.live`` ..., typed client methods), chosen by
feature detection on the traced graph (``hasattr(graph, "live")``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

print = functools.partial(print, flush=True)  # noqa: A001  (progress shows while the children run)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
DEFAULT_BEFORE = "1f7132e"
RESIDUAL_LAYER = 20
N_CLICKS = 20
TRACE_REPEAT = 5
RAY_RESERVE_S = 80  # what the Ray part needs on this 2-core machine: repeats of the trace stop earlier
CLICK_RESERVE_S = 8  # latency loops stop when less is left (fewer clicks then, and the count is printed)
RESULT_TAG = "BENCH_SEAMS_RESULT "
# The text of routescope.cluster.bench.prompt_ids, copied so both versions see the same prompt.
TEXT = ("The history of the city began on the river, where traders met to sell salt, wool and iron; "
        "later the bridge, the cathedral and the university drew scholars from every country. ")


class Deadline(Exception):
    """This side ran past its time budget."""


# ================================================================================= measuring bytes
def pickled_size(obj: Any) -> int:
    """Bytes of ``obj`` pickled with protocol 5 (tensors and arrays in band); -1 if unpicklable."""
    try:
        return len(pickle.dumps(obj, protocol=5))
    except Exception:
        return -1


class ByteCounter:
    """Calls crossing the stage-client boundary while active: (stage, method, sent, received)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._undo: list[Callable[[], None]] = []
        self._depth: dict[int, int] = {}

    def wrap(self, client: Any, name: str, stage: int) -> None:
        """Replace ``client.<name>`` (an instance attribute shadowing the class method)."""
        original = getattr(client, name)
        had_own = name in vars(client)
        counter = self

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            key = id(client)
            if counter._depth.get(key):  # a client method calling another: count the outer call only
                return original(*args, **kwargs)
            counter._depth[key] = 1
            try:
                answer = original(*args, **kwargs)
            finally:
                counter._depth[key] = 0
            method = args[0] if name == "call" and args and isinstance(args[0], str) else name
            handle = _is_handle(answer)
            sent = (tuple(_ref_id(a) for a in args), {k: _ref_id(v) for k, v in kwargs.items()})
            counter.calls.append({"stage": stage, "method": method, "sent": pickled_size(sent),
                                  "received": _answer_size(answer), "handle": handle,
                                  "ray_sent": ray_size(sent), "ray_received": 0 if handle else ray_size(answer),
                                  "ref": answer if handle else None})
            return answer

        setattr(client, name, counted)
        self._undo.append((lambda: setattr(client, name, original)) if had_own else (lambda: delattr(client, name)))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "ByteCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def resolve_handles(self, timeout_s: float = 30.0) -> None:
        """Sizes of the objects that answers given as ObjectRefs point to (they travel from stage to
        stage through the object store, not through the driver); fetched after the click."""
        for c in self.calls:
            ref, c["ref"] = c.get("ref"), None
            c["handle_bytes"] = 0
            if ref is not None:
                try:
                    import ray

                    c["handle_bytes"] = max(0, pickled_size(ray.get(ref, timeout=timeout_s)))
                except Exception:
                    c["handle_bytes"] = -1

    def summary(self) -> dict[str, Any]:
        self.resolve_handles()
        calls = self.calls
        return {"calls": len(calls), "sent": sum(max(c["sent"], 0) for c in calls),
                "received": sum(max(c["received"], 0) for c in calls),
                "total": sum(max(c["sent"], 0) + max(c["received"], 0) for c in calls),
                "unpicklable": sum(c["sent"] < 0 or c["received"] < 0 for c in calls),
                "handles": sum(bool(c["handle"]) for c in calls),
                "handle_bytes": sum(max(0, c.get("handle_bytes", 0)) for c in calls),
                "ray_total": (None if any(c["ray_sent"] is None or c["ray_received"] is None for c in calls)
                              else sum(c["ray_sent"] + c["ray_received"] for c in calls)),
                "per_call": [f"stage {c['stage']} {c['method']}: sent {c['sent']} B, received {c['received']} B"
                             + (f" (an ObjectRef to {c.get('handle_bytes')} B that go stage to stage, not to "
                                "the driver)" if c["handle"] else "")
                             for c in calls]}


def ray_size(obj: Any) -> int | None:
    """Bytes Ray's own serialiser makes of ``obj`` (a check of the pickle estimate); None if unknown."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return int(ray._private.worker.global_worker.get_serialization_context().serialize(obj).total_bytes)
    except Exception:
        return None


def _is_handle(obj: Any) -> bool:
    try:
        import ray

        return isinstance(obj, ray.ObjectRef)
    except Exception:
        return False


def _ref_id(obj: Any) -> Any:
    """An ObjectRef argument travels as its id (the object itself goes store to stage)."""
    return obj.binary() if _is_handle(obj) else obj


def _answer_size(obj: Any) -> int:
    return 0 if _is_handle(obj) else pickled_size(obj)


# ================================================================================= API adapters
class OldAPI:
    """The API of commit 1f7132e: detail queries on ``FlowGraph``; clients answer ``call(method, ...)``."""

    name = "OldAPI (graph.top_tokens ..., RayStageClient.call)"

    def click_residual(self, graph: Any, node: str) -> Any:
        return graph.top_tokens(node, k=10)

    def click_edge(self, graph: Any, layer: int, target: int, source: int, head: int) -> Any:
        return graph.head_contributions(layer, target, source), graph.attention_maps(layer, head)

    def click_ffn(self, graph: Any, layer: int, pos: int) -> Any:
        return graph.neurons(layer, pos, k=20), graph.promoted("mlp_out", layer, pos)

    def wrap_byte_counter(self, pipe: Any) -> ByteCounter:
        counter = ByteCounter()
        for i, client in enumerate(pipe.clients):
            counter.wrap(client, "call", i)
        return counter


class NewAPI:
    """Detail queries on ``graph.live`` (a ``LiveRun``), stage clients with typed methods instead of
    ``call`` (issue 13)."""

    name = "NewAPI (graph.live ..., typed client methods)"

    def click_residual(self, graph: Any, node: str) -> Any:
        return graph.live.top_tokens(node, k=10)

    def click_edge(self, graph: Any, layer: int, target: int, source: int, head: int) -> Any:
        return graph.live.head_contributions(layer, target, source), graph.live.attention_maps(layer, [head])

    def click_ffn(self, graph: Any, layer: int, pos: int) -> Any:
        return graph.live.neurons(layer, pos, k=20), graph.live.promoted("mlp_out", layer, pos)

    def wrap_byte_counter(self, pipe: Any) -> ByteCounter:
        """Every public method of each client (properties and attributes left alone)."""
        counter = ByteCounter()
        for i, client in enumerate(pipe.clients):
            for name in dir(client):
                if name.startswith("_"):
                    continue
                static = inspect.getattr_static(client, name, None)
                if isinstance(static, property) or not callable(getattr(client, name, None)):
                    continue
                if inspect.isclass(getattr(client, name)):
                    continue
                counter.wrap(client, name, i)
        return counter


def choose_api(graph: Any) -> OldAPI | NewAPI:
    """NewAPI when graphs have ``live`` (looked up on the class: the new property raises, not
    AttributeError, on a graph without a live model)."""
    return NewAPI() if hasattr(type(graph), "live") or "live" in getattr(graph, "__dict__", {}) else OldAPI()


# ================================================================================= one side (child)
def prompt_ids(pipe: Any, n_tokens: int) -> list[int]:
    """``n_tokens`` ids of ordinary English text, BOS first (as ``routescope.cluster.bench``)."""
    try:
        ids = list(pipe.tokenize(TEXT))
    except AttributeError:
        tok = pipe.tokenizer
        ids = [tok.bos_token_id] + list(tok(TEXT, add_special_tokens=False)["input_ids"])
    body = ids[1:]
    while len(body) < n_tokens:
        body = body + ids[1:]
    return ids[:1] + body[: n_tokens - 1]


def _median_ms(times: list[float]) -> dict[str, float]:
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def _on_signal(signum: int, frame: Any) -> None:
    if signum == signal.SIGALRM:
        raise Deadline("time budget of this side spent")
    raise SystemExit(f"signal {signum}")


def child(side: str, root: Path, n_tokens: int, budget_s: int) -> int:
    signal.signal(signal.SIGALRM, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.alarm(max(1, budget_s))
    t_start = time.perf_counter()

    def left() -> float:
        return budget_s - (time.perf_counter() - t_start)

    res: dict[str, Any] = {"side": side, "tokens": n_tokens, "load_avg": os.getloadavg()[0]}
    try:
        import routescope
        import routescope.cluster.pipeline as pipeline_mod
        import torch

        where = os.path.realpath(pipeline_mod.__file__)
        print(f"routescope.cluster.pipeline.__file__ = {pipeline_mod.__file__}\n  -> {where}")
        if not where.startswith(str(root) + os.sep):
            raise SystemExit(f"routescope loads from {where}, not from {root}")
        res["pipeline_file"] = where
        res["routescope_file"] = os.path.realpath(routescope.__file__)
        print(f"machine: {os.cpu_count()} cores, load average {res['load_avg']:.2f}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")

        # 1. in-process trace
        from routescope.cluster.pipeline import Pipeline

        t0 = time.perf_counter()
        pipe = Pipeline.local(MODEL)
        print(f"one-stage in-process pipeline loaded in {time.perf_counter() - t0:.1f} s")
        ids = prompt_ids(pipe, n_tokens)
        res["tokens"] = len(ids)
        t0 = time.perf_counter()
        pipe.trace_ids([ids])  # warm-up
        times = [time.perf_counter() - t0]  # replaced by the timed runs below
        for i in range(TRACE_REPEAT):
            if i and left() - RAY_RESERVE_S < 1.2 * max(times):
                print(f"time budget: stopping the trace repeats after {i} (of {TRACE_REPEAT})")
                break
            t0 = time.perf_counter()
            pipe.trace_ids([ids])
            times = (times if i else []) + [time.perf_counter() - t0]
            res["trace_s"], res["trace_all_s"] = statistics.median(times), times
        print(f"in-process trace, {len(ids)} tokens: median {res['trace_s']:.3f} s of {len(times)} "
              f"({', '.join(f'{t:.3f}' for t in times)} s)")
        pipe.close()
        del pipe
        gc.collect()

        # 2. and 3. through a 2-stage Ray pipeline
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            _ray_part(root, ids, res, left)
        finally:
            ray.shutdown()
        res["ok"] = True
    except BaseException as exc:  # report what was measured before the failure
        import traceback

        traceback.print_exc()
        res["ok"] = False
        res["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    finally:
        signal.alarm(0)
    res["wall_s"] = time.perf_counter() - t_start
    res["load_avg_end"] = os.getloadavg()[0]  # others' work on the machine shows here: times are then unreliable
    print(RESULT_TAG + json.dumps(res))
    return 0 if res.get("ok") else 1


def _ray_part(root: Path, ids: list[int], out: dict[str, Any], left: Callable[[], float]) -> None:
    """Figures 2 and 3, written into ``out`` as they are measured (kept if time runs out)."""
    import ray
    import torch

    from routescope.cluster.ray_pipeline import ray_pipeline

    t0 = time.perf_counter()
    pipe = ray_pipeline(MODEL, stages=2, address="local", cpus_per_stage=0.5)
    try:
        print(f"2-stage Ray pipeline {pipe.layout} ready in {time.perf_counter() - t0:.1f} s")
        out["ray_layout"] = pipe.layout

        @ray.remote(num_cpus=0)
        def worker_file() -> str:
            import routescope.workers.stage as stage_mod

            return os.path.realpath(stage_mod.__file__)

        wf = ray.get(worker_file.remote(), timeout=60)
        print(f"a Ray worker imports routescope.workers.stage from {wf}")
        if not wf.startswith(str(root) + os.sep):
            raise SystemExit(f"Ray workers load routescope from {wf}, not from {root}")

        t0 = time.perf_counter()
        graph = pipe.trace_ids([ids])[0]
        print(f"Ray trace, {len(ids)} tokens: {time.perf_counter() - t0:.2f} s")
        api = choose_api(graph)
        out["api"] = api.name
        print(f"adapter: {api.name}")
        n_layers, n_heads, last = int(graph.n_layers), int(graph.n_heads), len(ids) - 1
        vocab = int(pipe.info.d_vocab)
        full = torch.zeros(2, vocab, dtype=torch.float32)
        out["vocab"] = vocab
        out["full_logits_raw"] = full.numel() * full.element_size()
        out["full_logits_pickled"] = pickled_size(full)

        # warm-up, at a position no measured click uses
        api.click_residual(graph, f"I1_{last - 1}")
        api.click_edge(graph, 1, last - 1, last - 2, 0)
        api.click_ffn(graph, 1, last - 1)

        # 2. bytes of one click of each kind (first click on these nodes: nothing cached yet)
        node = f"I{RESIDUAL_LAYER}_{last}"
        clicks = {
            "residual": lambda: api.click_residual(graph, node),
            "edge": lambda: api.click_edge(graph, RESIDUAL_LAYER, last, last - 1, RESIDUAL_LAYER % n_heads),
            "ffn": lambda: api.click_ffn(graph, RESIDUAL_LAYER, last),
        }
        out["bytes"] = {}
        for kind, click in clicks.items():
            with api.wrap_byte_counter(pipe) as counter:
                answer = click()
            out["bytes"][kind] = summary = counter.summary()
            print(f"bytes, one {kind} click (layer {RESIDUAL_LAYER}, position {last}): {summary['total']} B "
                  f"in {summary['calls']} calls ({summary['sent']} B sent to stages, {summary['received']} B "
                  f"answered to the driver; Ray's own serialiser: {summary['ray_total']} B; moved stage to stage "
                  f"by ObjectRef: {summary['handle_bytes']} B)")
            for line in summary["per_call"]:
                print(f"    {line}")
            if kind == "residual":
                out["residual_answer"] = _brief(answer)
                print(f"    answer: {out['residual_answer']}")

        # 3. click -> panel latency at 20 layers other than the byte-counted one
        layers = [l for l in range(n_layers) if l != RESIDUAL_LAYER]
        if len(layers) > N_CLICKS:
            layers = [layers[round(i * (len(layers) - 1) / (N_CLICKS - 1))] for i in range(N_CLICKS)]
        out["latency_layers"] = layers
        kinds = {
            "residual": lambda l: api.click_residual(graph, f"I{l}_{last}"),
            "edge": lambda l: api.click_edge(graph, l, last, last - 1, l % n_heads),
            "ffn": lambda l: api.click_ffn(graph, l, last),
        }
        out["latency"] = {}
        for kind, click in kinds.items():
            times: list[float] = []
            for l in layers:
                if times and left() < CLICK_RESERVE_S + 1.5 * max(times):
                    print(f"time budget: {kind} clicks stopped after {len(times)} of {len(layers)}")
                    break
                t0 = time.perf_counter()
                click(l)
                times.append(time.perf_counter() - t0)
                out["latency"][kind] = stats = {**_median_ms(times), "n": len(times)}
            print(f"click -> panel, {kind}: median {stats['median_ms']:.1f} ms over {len(times)} clicks "
                  f"(min {stats['min_ms']:.1f}, max {stats['max_ms']:.1f} ms)")
    finally:
        pipe.close()


def _brief(answer: Any) -> str:
    """The first three tokens of a top-token answer, to compare the two versions by eye."""
    try:
        items = answer.get("tokens", answer) if isinstance(answer, dict) else answer
        return ", ".join(f"{it['token']!r} (rank {it.get('rank')}, prev {it.get('prev_rank')})" for it in list(items)[:3])
    except Exception:
        return repr(answer)[:200]


# ================================================================================= the driver (parent)
def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def worktree(commit: str) -> Path:
    """A detached worktree of ``commit`` under /tmp (reused when present)."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    path = Path(tempfile.gettempdir()) / f"rs-before-{sha[:10]}"
    if path.is_dir():
        try:
            if git("rev-parse", "HEAD", cwd=path) == sha:
                return path
        except subprocess.CalledProcessError:
            pass
        raise SystemExit(f"{path} exists but is not a worktree at {sha}; remove it "
                         f"(git -C {ROOT} worktree remove --force {path})")
    git("worktree", "prune")
    git("worktree", "add", "--detach", str(path), sha)
    return path


def shim(root: Path, side: str) -> Path:
    """A temporary folder holding ``routescope/`` built of symlinks into ``root``, following the
    ``package-dir`` of its pyproject (``routescope.workers`` -> ``workers/`` ...)."""
    import tomllib

    cfg = tomllib.loads((root / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    package_dir = cfg.get("package-dir") or {"routescope": "routescope"}
    top = Path(tempfile.mkdtemp(prefix=f"rs-shim-{side}-"))
    pkg = top / "routescope"
    pkg.mkdir()
    base = root / package_dir.get("routescope", "routescope")
    for entry in base.iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in sorted(package_dir.items()):
        parts = name.split(".")
        if parts[0] != "routescope" or len(parts) == 1:
            continue
        if len(parts) != 2:
            print(f"warning: package-dir {name} = {folder} (nested) is not mapped in the shim")
            continue
        link = pkg / parts[1]
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(root / folder)
    return top


def run_side(side: str, root: Path, n_tokens: int, budget_s: int) -> dict[str, Any]:
    top = shim(root, side)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(top)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--root", str(root),
           "--tokens", str(n_tokens), "--side-timeout", str(budget_s)]
    print(f"\n=== {side}: {root} (shim {top}) ===")
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=top, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            if line.startswith(RESULT_TAG):
                result.update(json.loads(line[len(RESULT_TAG):]))
            elif line.strip():
                print(f"  [{side}] {line.rstrip()}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=budget_s + 30)
    except subprocess.TimeoutExpired:
        print(f"  [{side}] no result within {budget_s + 30} s: stopping it")
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the child's own process group (start_new_session)
                proc.wait(timeout=wait)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
    reader.join(timeout=10)
    shutil.rmtree(top, ignore_errors=True)  # removes the symlinks, not what they point to
    if not result:
        result = {"side": side, "ok": False, "error": f"no result (exit code {proc.returncode})"}
    result["subprocess_s"] = time.perf_counter() - t0
    print(f"=== {side}: {'done' if result.get('ok') else 'FAILED: ' + str(result.get('error'))} "
          f"in {result['subprocess_s']:.0f} s ===")
    return result


def _get(res: dict[str, Any] | None, *keys: str) -> float | None:
    cur: Any = res
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur if isinstance(cur, (int, float)) else None


def table(results: dict[str, dict[str, Any]]) -> str:
    b, a = results.get("before"), results.get("after")
    rows = [
        ("in-process trace, median of up to 5 [s]", ("trace_s",), "{:.3f}"),
        ("residual click: bytes across the stage-client boundary [B]", ("bytes", "residual", "total"), "{:,.0f}"),
        ("residual click: bytes reaching the driver (answers) [B]", ("bytes", "residual", "received"), "{:,.0f}"),
        ("residual click: bytes sent to stages (arguments) [B]", ("bytes", "residual", "sent"), "{:,.0f}"),
        ("residual click: the same, as Ray's serialiser counts [B]", ("bytes", "residual", "ray_total"), "{:,.0f}"),
        ("residual click: stage calls", ("bytes", "residual", "calls"), "{:.0f}"),
        ("residual click: bytes moved stage to stage by ObjectRef [B]", ("bytes", "residual", "handle_bytes"),
         "{:,.0f}"),
        ("edge click: bytes across the boundary [B]", ("bytes", "edge", "total"), "{:,.0f}"),
        ("edge click: bytes reaching the driver [B]", ("bytes", "edge", "received"), "{:,.0f}"),
        ("FFN click: bytes across the boundary [B]", ("bytes", "ffn", "total"), "{:,.0f}"),
        ("FFN click: bytes reaching the driver [B]", ("bytes", "ffn", "received"), "{:,.0f}"),
        ("full-vocabulary logits [2, V] float32, raw [B]", ("full_logits_raw",), "{:,.0f}"),
        ("full-vocabulary logits [2, V] float32, pickled [B]", ("full_logits_pickled",), "{:,.0f}"),
        ("click -> panel, residual node, median of up to 20 [ms]", ("latency", "residual", "median_ms"), "{:.1f}"),
        ("click -> panel, attention edge, median of up to 20 [ms]", ("latency", "edge", "median_ms"), "{:.1f}"),
        ("click -> panel, FFN node, median of up to 20 [ms]", ("latency", "ffn", "median_ms"), "{:.1f}"),
    ]
    cells = [("figure", "before", "after", "after/before")]
    for label, keys, fmt in rows:
        vb, va = _get(b, *keys), _get(a, *keys)
        ratio = f"{va / vb:.3g}" if vb and va is not None else "n/a"
        cells.append((label, fmt.format(vb) if vb is not None else "n/a", fmt.format(va) if va is not None else "n/a",
                      ratio))
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def goals(results: dict[str, dict[str, Any]]) -> list[str]:
    b, a = results.get("before"), results.get("after")
    out = []
    full = _get(b, "full_logits_pickled")
    proxy = ""
    if not full and _get(a, "full_logits_pickled"):  # same model, same V: the figure does not depend on the code
        full, proxy = _get(a, "full_logits_pickled"), " (before not measured: [2, V] float32 of the after side)"
    click = _get(a, "bytes", "residual", "total")
    if full and click is not None:
        ok = click <= 0.01 * full
        out.append(f"goal: bytes per residual click after <= 1% of the full-vocabulary logits of before{proxy}: "
                   f"{click:,.0f} B vs {0.01 * full:,.0f} B ({100 * click / full:.2f}%): {'met' if ok else 'NOT met'}")
    else:
        limit = f"{0.01 * full:,.0f} B" if full else "n/a"
        out.append(f"goal: bytes per residual click after <= 1% of the full-vocabulary logits of before ({limit}): "
                   "n/a (a side was not measured)")
    tb, ta = _get(b, "trace_s"), _get(a, "trace_s")
    if tb and ta is not None:
        out.append(f"goal: in-process trace after <= 1.05 x before: {ta:.3f} s vs {1.05 * tb:.3f} s "
                   f"({ta / tb:.3f} x): {'met' if ta <= 1.05 * tb else 'NOT met'}")
    else:
        out.append("goal: in-process trace after <= 1.05 x before: n/a (a side was not measured)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=DEFAULT_BEFORE, help="git commit of the 'before' code (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=256, help="prompt length in tokens, BOS included")
    ap.add_argument("--only", choices=("before", "after"), default=None, help="measure one side only")
    ap.add_argument("--budget", type=int, default=330,
                    help="time budget of the whole run in s, shared out among the sides (default %(default)s)")
    ap.add_argument("--side-timeout", type=int, default=165, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=("before", "after"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tokens < 4:
        ap.error("--tokens must be at least 4")
    if args.child:
        return child(args.child, Path(args.root).resolve(), args.tokens, args.side_timeout)

    t0 = time.perf_counter()
    sides = [args.only] if args.only else ["before", "after"]
    roots = {}
    if "before" in sides:
        roots["before"] = worktree(args.before)
    if "after" in sides:
        roots["after"] = ROOT
    print(f"bench_seams: {MODEL}, {args.tokens} tokens; before = {args.before} "
          f"({roots.get('before', 'not measured')}), after = working tree {ROOT}"
          + ("" if "after" in sides else " (not measured)"))
    results = {}
    for i, side in enumerate(sides):  # one after the other: the machine may have 2 cores only
        share = (args.budget - (time.perf_counter() - t0)) / (len(sides) - i)
        results[side] = run_side(side, roots[side], args.tokens, max(60, int(share) - 5))

    print(f"\nbench_seams: {MODEL}, {args.tokens}-token prompt, 2-stage local Ray pipeline for the clicks "
          f"(residual node I{RESIDUAL_LAYER}_<last>); {os.cpu_count()} cores")
    for side, res in results.items():
        print(f"  {side}: {res.get('api', '?')}; layout {res.get('ray_layout', '?')}; load average "
              f"{res.get('load_avg', float('nan')):.2f} at start, {res.get('load_avg_end', float('nan')):.2f} at the end; {res.get('subprocess_s', 0):.0f} s; trace runs "
              f"{len(res.get('trace_all_s') or [])}; clicks timed "
              + "/".join(str((res.get("latency") or {}).get(k, {}).get("n", 0)) for k in ("residual", "edge", "ffn"))
              + ("" if res.get("ok") else f"; FAILED (figures up to the failure kept): {res.get('error')}"))
    print("Bytes are len(pickle.dumps(x, protocol=5)) of each stage call's arguments and answer (torch "
          "tensors through plain pickle: an estimate of what Ray serialises; a tensor that is a view pickles "
          "its whole storage, as Ray's serialiser does too, checked in the 'as Ray's serialiser counts' row).\n")
    print(table(results))
    print()
    for line in goals(results):
        print(line)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
