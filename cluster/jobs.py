"""Dataset jobs: trace every prompt of a dataset and write per-prompt results, resumably.

A job reads a dataset (``cluster.datasets``: text, JSON lines, JSON or CSV), runs its prompts
through a pipeline with several in flight, and writes a results directory (layout in
``cluster.results``): the manifest, one edge set per prompt whose ``trace`` carries the job's
metadata, route summary and previous-token attention sums, and the failures.

Every file is written atomically (``storage.atomic_write``): a prompt's file is complete or
absent. A rerun on the same results directory skips the prompts whose files exist, so a job
killed at any point and started again ends with every prompt exactly once. A rerun with
anything that changes the stored numbers different (dataset contents, model, dtype, norm,
tau_min, positions, tau/mode of the stored summaries, BOS, the weights' *contents*, the edge-set
wire version) is refused with every differing field named, rather than mixed in.

One job at a time per results directory: a job holds an exclusive ``flock`` on
``<results>/job.lock`` from before it reads the manifest until it has written its last file
(the OS drops it when the process dies, so a killed job leaves no stale lock). A second job is
refused with a one-line message naming the directory and the holder (pid, host, start time),
or waits for it with ``wait_lock`` (``--wait-lock [SECONDS]``). Submitted jobs run this code too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from routescope.workers.edgeset import VERSION as EDGESET_VERSION
from routescope.workers.schema import (DEFAULT_MODEL, DEFAULT_TAU_MIN, MODES, NORMS, JobMeta, canonical_dtype,
                                       check_choice)

from .datasets import MAX_PROMPT_CHARS, read_dataset
from .results import FAILED, LOCK, MANIFEST, PROMPTS, Results, done_indexes, prompt_path, read_job_json
from .stats import POSITIONS, prediction_summary, prediction_targets
from .storage import FileLock, LockHeld, atomic_create, atomic_write, describe_holder

SCHEMA = "routescope.job-results"
SCHEMA_VERSION = 2  # 2: dtype, edge-set version and a weights fingerprint of the tensors' bytes
# Options that must match for a rerun to resume into existing results (all change stored numbers).
_RESUME_KEYS = ("tau_min", "norm", "positions", "prepend_bos", "tau", "mode", "column", "attention", "dtype")


# ================================================================================= options
@dataclass
class JobSpec:
    """Everything a dataset job needs; serialisable (``to_args``) for submission."""

    dataset: str
    results: str
    model: str = DEFAULT_MODEL
    stages: int | None = None
    layers: str | None = None
    address: str | None = None  # Ray address of the stage actors (None: in-process stages)
    gpus_per_stage: float = 0.0
    cpus_per_stage: float = 1.0
    device: str = "cpu"
    dtype: str | None = None
    column: str = "prompt"
    tau_min: float = DEFAULT_TAU_MIN
    tau: float = 0.04  # threshold of the stored route summary (stats can recompute at any tau >= tau_min)
    mode: str = "renormalize"
    norm: str = "l1"
    positions: str = "last"
    prepend_bos: bool = True
    attention: bool = True  # per-head previous-token attention sums (detail queries, one per layer/head)
    in_flight: int = 4
    max_chars: int = MAX_PROMPT_CHARS
    throttle_s: float = 0.0  # testing knob: pause after each group of prompts
    job_id: str | None = None
    progress: bool | None = None  # tqdm bar: None = when stderr is a terminal
    wait_lock: float | None = None  # results in use by another job: None/0 refuse, else wait (s; inf: no limit)

    def check(self) -> "JobSpec":
        check_choice("norm", self.norm, NORMS)
        check_choice("mode", self.mode, MODES)
        check_choice("positions", self.positions, POSITIONS)
        for name in ("tau_min", "tau"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or not 0 < v < 1:
                raise ValueError(f"{name}: {v} must be a number in (0, 1)")
        if self.tau < self.tau_min:
            raise ValueError(f"tau: {self.tau} is below tau_min {self.tau_min}")
        if not isinstance(self.in_flight, int) or self.in_flight < 1:
            raise ValueError(f"in_flight: {self.in_flight} must be a positive integer")
        canonical_dtype(self.dtype)
        w = self.wait_lock
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or math.isnan(w) or w < 0):
            raise ValueError(f"wait_lock: {w!r} must be a number of seconds >= 0 (inf: wait as long as it takes)")
        return self

    def analysis_options(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _RESUME_KEYS}
        out["dtype"] = canonical_dtype(self.dtype) or "float32"
        return out

    def to_args(self) -> list[str]:
        """Command-line arguments of ``routescope run-job`` for this spec."""
        args = ["--model", self.model, "--dataset", self.dataset, "--results", self.results,
                "--column", self.column, "--tau-min", repr(float(self.tau_min)), "--norm", self.norm,
                "--positions", self.positions, "--in-flight", str(self.in_flight),
                "--gpus-per-stage", repr(float(self.gpus_per_stage)), "--cpus-per-stage", repr(float(self.cpus_per_stage)),
                "--tau", repr(float(self.tau)), "--mode", self.mode]
        if not self.prepend_bos:
            args.append("--no-bos")
        if self.stages is not None:
            args += ["--stages", str(self.stages)]
        if self.layers is not None:
            args += ["--layers", self.layers]
        if self.address is not None:
            args += ["--address", self.address]
        if self.dtype is not None:
            args += ["--dtype", self.dtype]
        if self.wait_lock is not None:
            args += ["--wait-lock", repr(float(self.wait_lock))]
        return args

    def env(self) -> dict[str, str]:
        """Options the CLI has no flag for travel as environment variables."""
        env = {"ROUTESCOPE_JOB_ATTENTION": "1" if self.attention else "0"}
        if self.throttle_s:
            env["ROUTESCOPE_JOB_THROTTLE_S"] = repr(float(self.throttle_s))
        if self.job_id:
            env["ROUTESCOPE_JOB_ID"] = self.job_id
        return env


def spec_from_args(args: Any, env: dict[str, str] | None = None) -> JobSpec:
    """A ``JobSpec`` from parsed CLI arguments plus the ``ROUTESCOPE_JOB_*`` environment."""
    env = os.environ if env is None else env
    return JobSpec(
        dataset=args.dataset, results=args.results, model=args.model, stages=args.stages, layers=args.layers,
        address=args.address, gpus_per_stage=args.gpus_per_stage, cpus_per_stage=args.cpus_per_stage,
        device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", None), column=args.column,
        tau_min=args.tau_min, norm=args.norm, positions=args.positions, in_flight=args.in_flight,
        tau=float(args.tau),
        mode=args.mode,
        prepend_bos=not args.no_bos,
        attention=env.get("ROUTESCOPE_JOB_ATTENTION", "1") != "0",
        throttle_s=float(env.get("ROUTESCOPE_JOB_THROTTLE_S", 0) or 0),
        job_id=env.get("ROUTESCOPE_JOB_ID") or None,
        wait_lock=getattr(args, "wait_lock", None),
    )


# ================================================================================= results
class ResultsLocked(ValueError):
    """The results directory is in use by another job (the message names it and the holder)."""


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode()


def _results_dir(location: str | os.PathLike) -> Path:
    """The results directory as an absolute path, created with its parents (``ValueError`` when
    it cannot be: a file, a symbolic-link loop, no permission)."""
    raw = Path(location).expanduser()
    try:
        results = raw.resolve()
    except (RuntimeError, OSError) as exc:  # Python < 3.13: RuntimeError("Symlink loop from ...")
        raise ValueError(f"results location {raw} cannot be used: {exc}") from None
    try:
        if results.exists() and not results.is_dir():
            raise ValueError(f"results location {results} is not writable: it is a file, not a directory")
        results.mkdir(parents=True, exist_ok=True)
    except ValueError:
        raise
    except OSError as exc:
        raise ValueError(f"results location {results} is not writable ({exc.strerror or exc})") from None
    return results


def _locked_message(results: Path, exc: LockHeld) -> str:
    held = f"results location {results} is in use by another job ({describe_holder(exc.holder)})"
    if exc.waited:
        return f"{held}, still after waiting {exc.waited:.0f}s"
    return f"{held}; wait for it to end, or pass --wait-lock [SECONDS] (wait_lock= in run_job) to wait for it"


def lock_results(results: str | os.PathLike, *, wait: float | None = None, job_id: str | None = None) -> FileLock:
    """Take the job lock of ``results`` (an existing directory) and return it (``.release()``
    it, or let the process end); ``ResultsLocked`` when another job holds it, at once or after
    waiting up to ``wait`` seconds (``math.inf``: as long as it takes)."""
    results = Path(results)
    lock = FileLock(results / LOCK)

    def waiting(holder: dict[str, Any] | None) -> None:
        how = "as long as it takes" if math.isinf(wait) else f"up to {wait:g}s"
        print(f"routescope job: results location {results} is in use by another job ({describe_holder(holder)}); "
              f"waiting {how} for it to end", flush=True)

    try:
        return lock.acquire(wait=wait, info={"job_id": job_id or "", "command": "run-job"}, on_wait=waiting)
    except LockHeld as exc:
        raise ResultsLocked(_locked_message(results, exc)) from None
    except OSError as exc:
        raise ValueError(f"results location {results}: cannot take the job lock {lock.path} "
                         f"({exc.strerror or exc})") from None


def _prepare_results(results: Path) -> None:
    """With the job lock held: the prompts folder, a proof that the directory is writable, and
    no temporary files of a killed run."""
    try:
        done_indexes(results)  # a prompts/ that is not a directory (a link loop, a file): a clear error
        (results / PROMPTS).mkdir(exist_ok=True)
        probe = results / ".write-probe"
        atomic_write(probe, b"ok", fsync=False)
        probe.unlink()
    except ValueError:
        raise
    except OSError as exc:
        raise ValueError(f"results location {results} is not writable ({exc.strerror or exc})") from None
    # Temporary files of a run that was killed mid-write: never results, and (the lock is held)
    # no other job's; safe to drop.
    for d in (results, results / PROMPTS):
        for p in d.glob(".*.tmp"):
            try:
                if p.is_symlink() or p.is_file():
                    p.unlink()
            except OSError:
                pass


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What must match for a resume, by the name a refusal gives it."""
    out = {"dataset contents sha256": (manifest.get("dataset") or {}).get("sha256"),
           "model": manifest.get("model")}
    out.update((f"option {k}", v) for k, v in (manifest.get("options") or {}).items())
    out["edge-set version"] = manifest.get("edgeset_version")
    out["weights contents sha256"] = (manifest.get("weights") or {}).get("fingerprint")
    return out


def _check_resume(results: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest, after checking it describes the same job (else ``ValueError``
    naming every field that differs, old vs new)."""
    path = results / MANIFEST
    if not os.path.lexists(path):
        if done_indexes(results):
            raise ValueError(f"results location {results} holds prompt files but no {MANIFEST}; "
                             "use an empty directory")
        return None
    if os.path.islink(path):
        raise ValueError(f"results location {results}: {MANIFEST} is a symbolic link, not a job manifest")
    try:
        old = read_job_json(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"results location {results}: unreadable {MANIFEST} ({exc})") from None
    if not isinstance(old, dict) or old.get("schema") != SCHEMA:
        raise ValueError(f"results location {results}: {MANIFEST} is not a routescope job manifest")
    was, now = _identity(old), _identity(manifest)
    # (the dataset by name only: its hashes say nothing to a reader; the manifest has its path)
    diffs = ["dataset contents (sha256)" if k == "dataset contents sha256" else f"{k} ({was.get(k)!r} vs {v!r})"
             for k, v in now.items() if was.get(k) != v]
    if diffs:
        raise ValueError(f"results location {results} holds results of a different job: " + "; ".join(diffs)
                         + ". Use another results location (existing results were left untouched)")
    return old


# ================================================================================= the job
class Progress:
    """A tqdm bar on a terminal, plus plain progress lines for job logs (non-terminals)."""

    def __init__(self, total: int, done: int, bar: bool | None, interval: float = 2.0):
        self.total, self.done, self.failed = total, done, 0
        self.start = time.monotonic()
        self.last_line = 0.0
        self.interval = interval
        self.first_done = done
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="prompt", desc="routescope job", dynamic_ncols=True)
        self.lines = not use_bar or not sys.stderr.isatty()
        self.line(force=True)

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        if self.bar is not None:
            self.bar.update(n + failed)
        self.line()

    def line(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.lines or (not force and now - self.last_line < self.interval):
            return
        self.last_line = now
        new = self.done - self.first_done
        rate = new / max(now - self.start, 1e-9)
        left = self.total - self.done - self.failed
        eta = f", eta {left / rate:.0f}s" if rate > 0 and left > 0 else ""
        pct = 100.0 * (self.done + self.failed) / max(self.total, 1)
        print(f"progress: {self.done}/{self.total} prompts done, {self.failed} failed ({pct:.0f}%), "
              f"{rate:.2f} prompts/s{eta}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.line(force=True)


def _load_pipeline(spec: JobSpec):
    # Loading a pipeline brings in torch; a job refused for its inputs never gets this far.
    from routescope.cluster.pipelines import load

    kwargs = dict(stages=spec.stages, layers=spec.layers, gpus_per_stage=spec.gpus_per_stage,
                  cpus_per_stage=spec.cpus_per_stage, dtype=spec.dtype)
    if spec.address is not None:
        try:
            from . import ray_pipeline  # noqa: F401 - imported only to learn whether Ray is usable here
        except ImportError as exc:
            print(f"warning: Ray stage actors unavailable ({exc}); running the stages inside the job's "
                  "driver process instead", flush=True)
        else:
            return load(spec.model, address=spec.address, **kwargs)
    return load(spec.model, device=spec.device, **kwargs)


def _layer_patterns(graph, layer: int) -> np.ndarray:
    """``pattern[h, t, s]`` of every head of ``layer``, in one detail call to the owning stage."""
    if not graph.is_live:  # e.g. a hand-made graph: per-head maps
        return np.stack([graph.attention_maps(layer, h)[0] for h in range(graph.n_heads)]).astype(np.float64)
    return np.asarray(graph.live.attention_patterns(layer), dtype=np.float64)


def previous_token_sums(graph, *, bos_sink: bool) -> dict[str, Any]:
    """Per head, the sum over positions of attention on the previous token (live graph).

    Positions counted: ``t >= 2`` when position 0 is the BOS sink (at ``t = 1`` the previous
    token *is* the sink), else ``t >= 1``. Sums over those positions: ``prev_sum`` of
    ``pattern[t, t-1]`` and ``nonsink_sum`` of the attention not on the sink,
    ``sum_{s >= 1} pattern[t, s]`` (``1`` per position without a sink); their ratio over a
    dataset is the share of the non-sink attention that goes to the previous token.
    """
    L, H, T = graph.n_layers, graph.n_heads, graph.n_tokens
    first = 2 if bos_sink else 1
    raw = np.zeros((L, H))
    nonsink = np.zeros((L, H))
    count = max(T - first, 0)
    if count:
        t = np.arange(first, T)
        for layer in range(L):
            patterns = _layer_patterns(graph, layer)
            prev = patterns[:, t, t - 1].astype(np.float64)
            raw[layer] = prev.sum(1)
            if bos_sink:
                nonsink[layer] = patterns[:, t, 1:].astype(np.float64).sum((1, 2))
            else:
                nonsink[layer] = float(count)
    return {"prev_sum": raw.tolist(), "nonsink_sum": nonsink.tolist(), "count": count, "bos_sink": bos_sink,
            "first_position": first}


def run(spec: JobSpec, *, pipeline=None) -> dict[str, Any]:
    """Run a dataset job to completion (resuming into existing results); return the manifest.
    The results directory's job lock is held from before the manifest is read until the job's
    last write."""
    spec.check()
    dataset = read_dataset(spec.dataset, spec.column, max_chars=spec.max_chars)
    results = _results_dir(spec.results)
    lock = lock_results(results, wait=spec.wait_lock, job_id=spec.job_id)
    try:
        return _run_locked(spec, dataset, results, pipeline, lock)
    finally:
        lock.release()


def _weights(ckpt) -> dict[str, Any]:
    return {"fingerprint": ckpt.fingerprint(), "checkpoint": ckpt.path.name, "spec": ckpt.spec}


def _run_locked(spec: JobSpec, dataset, results: Path, pipeline, lock: FileLock) -> dict[str, Any]:
    _prepare_results(results)
    if pipeline is not None:
        ckpt = pipeline.checkpoint
    else:  # the checkpoint the pipeline will load (resolving is cheap once converted/downloaded)
        from routescope.workers.checkpoint import resolve

        ckpt = resolve(spec.model)
    manifest: dict[str, Any] = {
        "schema": SCHEMA, "version": SCHEMA_VERSION, "routescope_version": metadata.version("routescope"),
        "model": spec.model, "options": spec.analysis_options(), "dataset": dataset.describe(),
        "edgeset_version": EDGESET_VERSION, "weights": _weights(ckpt),
    }
    old = _check_resume(results, manifest)  # before any model is loaded
    done = done_indexes(results)
    stale = sorted(done - {r.index for r in dataset.records})
    if stale:
        raise ValueError(f"results location {results} holds prompt files {stale[:5]} not in the dataset")
    started = time.time()
    print(f"routescope job: {len(dataset.records)} records in {dataset.path} ({dataset.format}), "
          f"results in {results}" + (" (resuming)" if old else ""), flush=True)

    todo = [r for r in dataset.records if r.index not in done and r.error is None]
    if pipeline is None and old and not todo:
        pipe = None  # nothing left to trace: no model to load
        manifest.update({k: old.get(k) for k in ("model_info", "layout", "pipeline")})
    else:
        pipe = pipeline if pipeline is not None else _load_pipeline(spec)
        if Path(pipe.checkpoint.path) != Path(ckpt.path):  # resolved elsewhere (e.g. another cache)
            manifest["weights"] = _weights(pipe.checkpoint)
            old = _check_resume(results, manifest) if old else old
        manifest.update({
            "model_info": pipe.info.to_dict(), "layout": [list(r) for r in pipe.layout],
            "pipeline": type(pipe.clients[0]).__name__ if getattr(pipe, "clients", None) else None,
        })
    runs = list(old.get("runs", [])) if old else []
    this_run = {"started": started, "job_id": spec.job_id, "host": socket.gethostname(), "pid": os.getpid(),
                "locked_at": (lock.holder or {}).get("started_at"), "traced": 0}
    runs.append(this_run)
    manifest["runs"] = runs
    manifest["created"] = old.get("created", started) if old else started

    failed: dict[int, dict[str, Any]] = {}
    pending: list[tuple[int, int, str, list[int]]] = []
    for r in dataset.records:
        if r.index in done:
            continue
        if r.error is not None:
            failed[r.index] = {"index": r.index, "line": r.line, "error": r.error}
            continue
        try:
            ids = pipe.tokenize(r.text, prepend_bos=spec.prepend_bos)
        except ValueError as exc:
            failed[r.index] = {"index": r.index, "line": r.line, "error": f"line {r.line}: {exc}"}
            continue
        pending.append((r.index, r.line, r.text, ids))
    manifest_exists = old is not None

    def write_state(status: str) -> None:
        nonlocal manifest_exists
        manifest["status"] = status
        manifest["updated"] = time.time()
        n_done = len(done_indexes(results))
        manifest["counts"] = {"records": len(dataset.records), "done": n_done, "failed": len(failed),
                              "pending": len(dataset.records) - n_done - len(failed)}
        atomic_write(results / FAILED, _json_bytes(sorted(failed.values(), key=lambda f: f["index"])))
        if manifest_exists:
            atomic_write(results / MANIFEST, _json_bytes(manifest))
            return
        try:  # the first manifest appears complete and only if none is there (no two creators)
            atomic_create(results / MANIFEST, _json_bytes(manifest))
        except FileExistsError:
            raise ValueError(f"results location {results}: another writer created {MANIFEST} while this job "
                             "held the job lock (a routescope without job locks?); nothing of it was replaced") from None
        manifest_exists = True

    for idx, f in sorted(failed.items()):
        print(f"skipped: {f['error']}", flush=True)
    write_state("running")
    progress = Progress(len(dataset.records), len(done), spec.progress)
    bos_sink = bool(spec.prepend_bos)
    try:
        for g0 in range(0, len(pending), spec.in_flight):
            group = pending[g0 : g0 + spec.in_flight]
            try:
                graphs = pipe.trace_ids([ids for *_, ids in group], norm=spec.norm, tau_min=spec.tau_min,
                                        prompts=[text for _, _, text, _ in group])
                outcomes: list[Any] = list(graphs)
            except Exception as exc:  # isolate the prompt at fault: retry one by one
                outcomes = []
                for item in group:
                    try:
                        outcomes.append(pipe.trace_ids([item[3]], norm=spec.norm, tau_min=spec.tau_min,
                                                       prompts=[item[2]])[0])
                    except Exception as one_exc:  # noqa: BLE001 - reported per prompt
                        outcomes.append(one_exc)
                print(f"warning: a group of {len(group)} prompts failed ({type(exc).__name__}: {exc}); "
                      "retried one by one", flush=True)
            for (idx, line, text, _), g in zip(group, outcomes):
                if isinstance(g, Exception):
                    failed[idx] = {"index": idx, "line": line, "error": f"line {line}: {type(g).__name__}: {g}"}
                    print(f"failed: prompt {idx} (line {line}): {type(g).__name__}: {g}", flush=True)
                    progress.update(0, failed=1)
                    continue
                try:
                    _annotate(g, spec, idx, line, bos_sink)
                    g.save(prompt_path(results, idx))
                except OSError as exc:
                    raise ValueError(f"results location {results}: cannot write prompt {idx} "
                                     f"({exc.strerror or exc})") from None
                except Exception as exc:  # noqa: BLE001 - a detail query failed: report, go on
                    failed[idx] = {"index": idx, "line": line, "error": f"line {line}: {type(exc).__name__}: {exc}"}
                    print(f"failed: prompt {idx} (line {line}): {type(exc).__name__}: {exc}", flush=True)
                    progress.update(0, failed=1)
                    continue
                failed.pop(idx, None)
                this_run["traced"] += 1
                progress.update(1)
            if spec.throttle_s:
                time.sleep(spec.throttle_s)
    finally:
        progress.close()
    write_state("complete" if not failed else "complete_with_failures")
    print(f"routescope job: done: {manifest['counts']['done']} of {len(dataset.records)} prompts, "
          f"{len(failed)} failed, {this_run['traced']} traced by this run, {time.time() - started:.1f}s", flush=True)
    return manifest


def _annotate(graph, spec: JobSpec, index: int, line: int, bos_sink: bool) -> None:
    """Put the job's per-prompt metadata, route summary and attention sums into ``edges.trace``."""
    trace = graph.edges.trace
    trace.job = JobMeta(index=index, line=line, positions=spec.positions, job_id=spec.job_id or "")
    targets = prediction_targets(graph.n_tokens, spec.positions)
    trace.summary = prediction_summary(graph.edges, spec.tau, spec.mode, targets).to_dict()
    try:
        top = graph.live.prediction(k=3)
        trace.prediction = [{"token": p["token"], "id": int(p["id"]), "score": float(p["score"])} for p in top]
    except Exception:  # noqa: BLE001 - the prediction is a convenience
        trace.prediction = None
    if spec.attention:
        trace.attention = previous_token_sums(graph, bos_sink=bos_sink)


# ================================================================================= entry points
def run_job(dataset: str | os.PathLike, results: str | os.PathLike, *, model: str = DEFAULT_MODEL,
            pipeline=None, **options: Any):
    """Run a dataset job in this process (small cases); return its ``Results``. ``options`` are
    ``JobSpec`` fields; ``wait_lock=SECONDS`` waits for another job holding ``results`` (else
    ``ResultsLocked`` at once)."""
    fields_ = {f.name for f in dataclasses.fields(JobSpec)}
    unknown = set(options) - fields_
    if unknown:
        raise TypeError(f"run_job: unknown option(s) {', '.join(sorted(unknown))}")
    spec = JobSpec(dataset=str(dataset), results=str(results), model=model, **options)
    run(spec, pipeline=pipeline)
    return Results(results)


def main(args: Any) -> int:
    """``routescope run-job``: exit status 0 when every prompt was traced, 1 when some failed."""
    if args.command != "run-job":
        raise ValueError(f"{args.command}: cluster.jobs.main runs 'run-job' (submit: cluster.submit.main)")
    manifest = run(spec_from_args(args))
    return 0 if manifest["status"] == "complete" else 1
