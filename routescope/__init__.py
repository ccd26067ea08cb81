"""routescope: information-flow routes of LLM predictions, computed in pipeline stages.

Notebook use::

    import routescope
    g = routescope.trace("smollm2-135m", "The capital of France is")
    g.route(tau=0.04).records()
    g.top_tokens("I29_5")
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

__version__ = "0.1.0"
DEFAULT_MODEL = "smollm2-135m"

_pipelines: dict[tuple, Any] = {}
_pipelines_lock = threading.Lock()


def load(model: str = DEFAULT_MODEL, *, stages: int | None = None, layers: str | None = None,
         address: str | None = None, gpus_per_stage: float = 0, cpus_per_stage: float = 1,
         device: str = "cpu", dtype: str | None = None, max_tokens: int | None = None, reuse: bool = True):
    """A ``Pipeline`` for ``model``: in-process, or Ray stage actors when ``address`` is given,
    ``gpus_per_stage`` > 0, or ``stages`` > 1 on Ray (``address="local"`` starts a local Ray).

    Pipelines are cached per arguments, so repeated ``trace`` calls do not reload the model.
    """
    key = (str(model), stages, layers, address, gpus_per_stage, cpus_per_stage, device, dtype, max_tokens)
    with _pipelines_lock:
        if reuse and key in _pipelines:
            return _pipelines[key]
        if address is not None:
            from routescope.cluster.ray_pipeline import ray_pipeline

            pipe = ray_pipeline(model, stages=stages, layers=layers, address=address, gpus_per_stage=gpus_per_stage,
                                cpus_per_stage=cpus_per_stage, dtype=dtype, max_tokens=max_tokens)
        else:
            from routescope.cluster.pipeline import Pipeline

            pipe = Pipeline.local(model, stages=stages, layers=layers, device=device, dtype=dtype,
                                  max_tokens=max_tokens)
        if reuse:
            _pipelines[key] = pipe
        return pipe


def unload(pipeline: Any, close: bool = True) -> None:
    """Forget a pipeline cached by ``load``; with ``close``, also release its stages (Ray actors).

    ``close=False`` suits callers that only drop their reference while others may still use it.
    """
    with _pipelines_lock:
        for key, cached in list(_pipelines.items()):
            if cached is pipeline:
                del _pipelines[key]
    if close:
        pipeline.close()


def trace(model: str, prompt: str | Sequence[str], *, tau_min: float = 0.01, norm: str = "l1",
          prepend_bos: bool = True, **load_options: Any):
    """Trace one prompt (returns a ``FlowGraph``) or several (a list) through ``model``."""
    return load(model, **load_options).trace(prompt, norm=norm, tau_min=tau_min, prepend_bos=prepend_bos)


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when a class is asked for.
    if name == "FlowGraph":
        from routescope.cluster.graph import FlowGraph

        return FlowGraph
    if name == "Pipeline":
        from routescope.cluster.pipeline import Pipeline

        return Pipeline
    if name == "EdgeSet":
        from routescope.workers.edgeset import EdgeSet

        return EdgeSet
    raise AttributeError(name)


__all__ = ["load", "unload", "trace", "FlowGraph", "Pipeline", "EdgeSet", "DEFAULT_MODEL", "__version__"]


def submit(dataset, results, **options: Any):
    """Submit a dataset job to a Ray cluster (Job Submission API); returns a ``JobHandle``.

    See ``routescope.cluster.submit.submit`` for the options (``address``, ``model``, ``stages``,
    ``tau_min``, ``positions``, ``runtime_env``, ``wait``, ...).
    """
    from routescope.cluster.submit import submit as _submit

    return _submit(dataset, results, **options)


def run_job(dataset, results, **options: Any):
    """Run a dataset job in this process (small cases); returns the results (``Results``)."""
    from routescope.cluster.jobs import run_job as _run_job

    return _run_job(dataset, results, **options)


def open_results(path):
    """Open a results directory of a dataset job (``routescope.cluster.results.Results``)."""
    from routescope.cluster.results import Results

    return Results(path)
