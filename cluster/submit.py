"""Send dataset jobs to a Ray cluster through Ray's Job Submission API.

``submit(dataset, results, address=...)`` starts ``python -m routescope run-job ...`` as a Ray job
(the driver then places the pipeline's stage actors on the cluster) and returns a ``JobHandle``
with ``status()``, ``logs()``, ``wait()``, ``watch()`` (a progress bar read from the results
directory), ``cancel()`` and ``results()``.

``address`` is the cluster's dashboard (Job Submission) address, ``http://HOST:8265``; default
``$RAY_ADDRESS`` when it is an http address, else ``http://127.0.0.1:8265``. The dataset and
the results directory must be paths the cluster's nodes see (the same machine, or shared
storage). Ray 2.60 clusters use token authentication: the token is read from ``RAY_AUTH_TOKEN``
or ``~/.ray/auth_token`` (or pass ``token=``) and sent as an ``Authorization: Bearer`` header;
``RAY_AUTH_MODE`` is never put into the job's runtime environment.

A submitted job runs ``routescope run-job``, so it takes the results directory's job lock like
any job: a job refused because another holds the directory (or for any other reason) exits
non-zero, Ray marks it FAILED, and ``routescope submit --wait`` prints its error line and exits
1. ``wait_lock=`` (``--wait-lock [SECONDS]``) makes it wait for the other job instead.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from routescope.workers.schema import DEFAULT_MODEL

from .datasets import read_dataset
from .jobs import JobSpec, spec_from_args
from .results import Results, done_indexes

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _address(address: str | None) -> str:
    if address is None:
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    address = str(address).strip()
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def client(address: str | None = None, token: str | None = None, timeout: float = 10.0):
    """A ``JobSubmissionClient`` for ``address``, authenticated; clear error when unreachable."""
    from ray.job_submission import JobSubmissionClient

    address = _address(address)
    tok = _token(token)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    _probe(address, headers, timeout)
    # The client wants RAY_AUTH_MODE=token while it connects. Set it only for that moment: left in
    # the environment, a later ray.init() in this process would start a token-mode GCS that its
    # own (already configured) driver cannot talk to.
    saved = os.environ.get("RAY_AUTH_MODE")
    if tok and saved is None:
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        raise RuntimeError(f"cannot reach the Ray cluster at {address}: {type(exc).__name__}: {exc}") from None
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)


def _probe(address: str, headers: dict[str, str] | None, timeout: float) -> None:
    """Fail fast (seconds, not Ray's long retries) when nothing answers at ``address``."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(address + "/api/version", headers=headers or {})
    try:
        urllib.request.urlopen(req, timeout=timeout).read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise RuntimeError(f"the Ray cluster at {address} refused the credentials (HTTP {exc.code}); "
                               "set RAY_AUTH_TOKEN or pass token=") from None
        # another status still proves something answers
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"cannot reach the Ray cluster at {address} ({reason}); is the head running "
                           "(`ray start --head`) and is this its dashboard address?") from None


def default_runtime_env(spec: JobSpec, pip: list[str] | None = None, env_vars: dict[str, str] | None = None,
                        working_dir: str | None = None) -> dict[str, Any]:
    """The job's runtime environment: the ``ROUTESCOPE_JOB_*`` options, the model cache, unbuffered
    output, and optionally pip packages (``pip=["routescope[...]", ...]``) and a working dir."""
    env = {"PYTHONUNBUFFERED": "1", **spec.env()}
    for name in ("ROUTESCOPE_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update(env_vars or {})
    env.pop("RAY_AUTH_MODE", None)  # never: workers would fail to register (STACK.md)
    renv: dict[str, Any] = {"env_vars": env}
    if pip:
        renv["pip"] = list(pip)
    if working_dir:
        renv["working_dir"] = working_dir
    return renv


class JobHandle:
    """A submitted dataset job."""

    def __init__(self, job_id: str, address: str, results: str, token: str | None = None, total: int | None = None):
        self.job_id = job_id
        self.address = address
        self.results_path = Path(results)
        self._token = token
        self._client = None
        self.total = total

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r}, address={self.address!r}, results={str(self.results_path)!r})"

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.address, self._token)
        return self._client

    def status(self) -> str:
        """``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
        return str(getattr(self.client.get_job_status(self.job_id), "value", self.client.get_job_status(self.job_id)))

    def info(self):
        return self.client.get_job_info(self.job_id)

    def logs(self) -> str:
        return self.client.get_job_logs(self.job_id)

    def progress(self) -> tuple[int, int | None]:
        """``(prompts done, records in the dataset)``, read from the results directory."""
        return len(done_indexes(self.results_path)), self.total

    def cancel(self, wait: bool = True, timeout: float = 60.0) -> str:
        """Stop the job (its driver is killed; finished prompt files stay; resubmit to resume)."""
        self.client.stop_job(self.job_id)
        return self.wait(timeout=timeout) if wait else self.status()

    def wait(self, timeout: float | None = None, *, show_logs: bool = False, poll: float = 1.0) -> str:
        """Block until the job ends; return its final status (``TimeoutError`` after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        shown = 0
        while True:
            status = self.status()
            if show_logs:  # read after the status: once it is terminal, these are the last logs
                text = self.logs()
                if len(text) > shown:
                    sys.stdout.write(text[shown:])
                    sys.stdout.flush()
                    shown = len(text)
            if status in TERMINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {status} after {timeout}s")
            time.sleep(poll)

    def watch(self, timeout: float | None = None, poll: float = 1.0) -> str:
        """A tqdm progress bar (notebook or terminal) of prompts done, until the job ends."""
        from tqdm.auto import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=self.total, unit="prompt", desc=f"job {self.job_id}")
        try:
            while True:
                status = self.status()
                done = len(done_indexes(self.results_path))
                bar.update(done - bar.n)
                bar.set_postfix_str(status)
                if status in TERMINAL:
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.job_id} still {status} after {timeout}s")
                time.sleep(poll)
        finally:
            bar.close()

    def results(self) -> Results:
        """The results so far (statistics over them: ``cluster.stats``)."""
        return Results(self.results_path)


def submit_job_spec(spec: JobSpec, *, address: str | None = None, token: str | None = None,
                    runtime_env: dict[str, Any] | None = None, pip: list[str] | None = None,
                    python: str | None = None, submission_id: str | None = None,
                    entrypoint_num_cpus: float = 0, metadata: dict[str, str] | None = None) -> JobHandle:
    """Submit ``spec`` as a Ray job. ``python``: the interpreter on the cluster (default this
    one, ``sys.executable``: right for a local cluster; name the cluster's for remote ones)."""
    spec.check()
    dataset = read_dataset(spec.dataset, spec.column, max_chars=spec.max_chars)  # fail here, not in the job
    spec.dataset = str(dataset.path)
    spec.results = str(Path(spec.results).expanduser().resolve())
    results = Path(spec.results)
    if results.exists() and not results.is_dir():
        raise ValueError(f"results location {results} is not writable: it is a file, not a directory")
    address_ = _address(address)
    tok = _token(token)
    cl = client(address_, tok)
    spec.job_id = submission_id or f"routescope-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if spec.address is None:
        spec.address = "auto"  # stage actors on the job's cluster
    renv = runtime_env if runtime_env is not None else default_runtime_env(spec, pip=pip)
    renv.setdefault("env_vars", {}).update({k: v for k, v in spec.env().items() if k not in renv["env_vars"]})
    if "RAY_AUTH_MODE" in renv.get("env_vars", {}):
        raise ValueError("runtime_env: do not set RAY_AUTH_MODE in a job's environment (workers fail to register)")
    entrypoint = " ".join(shlex.quote(x) for x in [python or sys.executable, "-m", "routescope", "run-job",
                                                   *spec.to_args()])
    try:
        job_id = cl.submit_job(entrypoint=entrypoint, submission_id=spec.job_id, runtime_env=renv,
                               entrypoint_num_cpus=entrypoint_num_cpus,
                               metadata={"routescope": "dataset-job", "results": spec.results, **(metadata or {})})
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"job submission to {address_} failed: {type(exc).__name__}: {exc}") from None
    return JobHandle(job_id, address_, spec.results, tok, total=len(dataset.records))


def submit(dataset: str | os.PathLike, results: str | os.PathLike, *, model: str = DEFAULT_MODEL,
           address: str | None = None, wait: bool = False, token: str | None = None,
           runtime_env: dict[str, Any] | None = None, pip: list[str] | None = None, python: str | None = None,
           submission_id: str | None = None, pipeline_address: str | None = None, **options: Any) -> JobHandle:
    """Submit a dataset job to the Ray cluster at ``address`` (see module docstring).

    ``options`` are ``JobSpec`` fields: ``stages``, ``layers``, ``gpus_per_stage``,
    ``cpus_per_stage``, ``column``, ``tau_min``, ``tau``, ``mode``, ``norm``, ``positions``,
    ``prepend_bos``, ``in_flight``, ... ``pipeline_address`` is where the job's driver places
    the stage actors (default ``"auto"``: the job's own cluster).
    """
    names = {f.name for f in dataclasses.fields(JobSpec)} - {"dataset", "results", "model", "address"}
    unknown = set(options) - names
    if unknown:
        raise TypeError(f"submit: unknown option(s) {', '.join(sorted(unknown))}")
    spec = JobSpec(dataset=str(dataset), results=str(results), model=model, address=pipeline_address, **options)
    handle = submit_job_spec(spec, address=address, token=token, runtime_env=runtime_env, pip=pip, python=python,
                             submission_id=submission_id)
    if wait:
        handle.wait(show_logs=True)
    return handle


def main(args: Any) -> int:
    """``routescope submit``: submit the job; with ``--wait``, stream its logs until it ends."""
    spec = spec_from_args(args)
    address = args.address
    spec.address = None  # the job's driver places the stage actors on its own cluster ("auto")
    handle = submit_job_spec(spec, address=address)
    print(f"submitted job {handle.job_id} to {handle.address}; results in {spec.results}", flush=True)
    if getattr(args, "wait", False):
        status = handle.wait(show_logs=True)
        line = f"job {handle.job_id}: {status}"
        if status != "SUCCEEDED":
            errors = _error_lines(handle)
            if errors:
                line += f": {errors[-1]}"
        print(line, flush=True)
        return 0 if status == "SUCCEEDED" else 1
    return 0


def _error_lines(handle: JobHandle) -> list[str]:
    """The job's own error lines (``routescope run-job: error: ...``), else Ray's job message."""
    try:
        lines = [ln.strip() for ln in handle.logs().splitlines() if "routescope run-job: error:" in ln]
        if lines:
            return lines
        message = getattr(handle.info(), "message", None)
        return [str(message).strip().splitlines()[0]] if message else []
    except Exception:  # noqa: BLE001 - a summary line is a convenience; the logs were streamed
        return []
