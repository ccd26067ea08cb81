"""routescope: information-flow routes of LLM predictions, computed in pipeline stages.

Notebook use::

    import routescope
    g = routescope.trace("smollm2-135m", "The capital of France is")
    g.route(tau=0.04).records()
    g.live.top_tokens("I29_5")
"""

from __future__ import annotations

from typing import Any, Sequence

from routescope.workers.schema import DEFAULT_MODEL, DEFAULT_TAU_MIN

__version__ = "0.1.0"


def load(model: str = DEFAULT_MODEL, **options: Any):
    """A ``Pipeline`` for ``model``, from the process's one pipeline cache: in-process, or Ray
    stage actors when ``address`` is given (``address="local"`` starts a local Ray).

    Options: ``stages``, ``layers``, ``address``, ``gpus_per_stage``, ``cpus_per_stage``,
    ``device``, ``dtype``, ``max_tokens``, ``reuse``, ``adapter`` (see ``routescope.cluster.pipelines.load``).

    ``adapter="mypkg.mymodel:make"`` (or ``mypkg.mymodel.MyAdapter``) traces a model of your own
    through a ``ModelAdapter`` (``docs/adapters.md``); ``model`` is then handed to that factory.
    """
    from routescope.cluster.pipelines import load as _load

    return _load(model, **options)


def unload(pipeline: Any, close: bool = True) -> None:
    """Forget a cached pipeline; with ``close``, also release its stages (Ray actors).

    ``close=False`` suits callers that only drop their reference while others may still use it.
    """
    from routescope.cluster.pipelines import unload as _unload

    _unload(pipeline, close=close)


def trace(model: str, prompt: str | Sequence[str], *, tau_min: float = DEFAULT_TAU_MIN, norm: str = "l1",
          prepend_bos: bool = True, **load_options: Any):
    """Trace one prompt (returns a ``FlowGraph``) or several (a list) through ``model``; the
    ``load_options`` are ``load``'s (``adapter=`` for a model of your own, ``docs/adapters.md``)."""
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
