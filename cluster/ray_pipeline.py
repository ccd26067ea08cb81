"""Pipelines of Ray stage actors: placement, resource checks, transport, retries and timeouts.

``ray_pipeline(model, stages=..., address=...)`` returns the same ``Pipeline`` as
``Pipeline.local`` (same ``trace``, detail queries and graphs), whose stages are ``StageActor``s:

* Layout: ``cluster.layout.plan`` (explicit ``layers``, else ``stages`` balanced by parameter bytes).
* Resources: each stage is one bundle ``{"CPU": cpus_per_stage, "GPU": gpus_per_stage}`` of one
  placement group: ``STRICT_PACK`` (one node) when some node can hold all stages, else ``PACK``
  (spread over as few nodes as needed). Before anything is created the cluster's resources are
  checked; a cluster lacking the GPUs or CPUs asked for fails at once with a message naming what is
  missing, and the group's readiness is awaited with a timeout, so nothing hangs.
* Transport: stages on GPUs pass the residual GPU to GPU with Ray Direct Transport (NCCL group
  over the stage actors); on CPU, or with ``transport="object_store"``, chained ObjectRefs through
  the object store. ``transport="gloo"`` runs the direct path on CPU (tests).
* Faults: actors restart after dying (``max_restarts``, default unlimited); each stage task is
  retried ``retries`` times on the restarted actor, after which ``trace`` raises ``StageError``
  naming the stage and its layer range. No graph is returned unless every stage answered.
  A restarted stage has lost its activation cache: detail queries then recompute the run.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import ray

from routescope.workers.actor import stage_actor_class
from routescope.workers.adapter import adapter_label, resolve_adapter
from routescope.workers.bridge_adapter import load_config, load_tokenizer
from routescope.workers.checkpoint import Checkpoint, resolve
from routescope.workers.schema import DEFAULT_MODEL

from .pipeline import Pipeline, adapter_checkpoint, plan_layers
from .stage_clients import RayStageClient, StageError, StageTimeoutError

__all__ = ["ray_pipeline", "RayPipeline", "ClusterResourceError", "StageError", "StageTimeoutError"]

TRANSPORTS = ("auto", "object_store", "nccl", "gloo")


class ClusterResourceError(RuntimeError):
    """The Ray cluster lacks the resources the stages ask for."""


class RayPipeline(Pipeline):
    """A ``Pipeline`` of Ray stage actors; ``close`` kills them and frees the placement group."""

    def __init__(self, *args: Any, placement_group=None, owns_ray: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.placement_group = placement_group
        self._owns_ray = owns_ray
        self.transport = "object_store"
        self.strategy = None
        self.stage_info: list[dict[str, Any]] = []

    @property
    def retries(self) -> int:
        return self.clients[0].retries

    @retries.setter
    def retries(self, value: int) -> None:
        for c in self.clients:
            c.retries = int(value)

    @property
    def timeout_s(self) -> float | None:
        return self.clients[0].timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float | None) -> None:
        for c in self.clients:
            c.timeout_s = value

    def trace_ids(self, token_ids, **kwargs):
        try:
            return super().trace_ids(token_ids, **kwargs)
        except StageError:
            if self.transport == "object_store":
                raise
            # A restarted actor has left its collective group (Ray Direct Transport cannot heal that):
            # from now on the residual goes through the object store; the run is tried once more
            # there unless retries are off.
            warnings.warn(f"a stage failed under tensor transport {self.transport!r}; "
                          "falling back to the object store", RuntimeWarning, stacklevel=2)
            self.transport = "object_store"
            for c in self.clients:
                c.transport = None
            if self.retries == 0:
                raise
        return super().trace_ids(token_ids, **kwargs)

    def close(self) -> None:
        super().close()
        if self.placement_group is not None:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception:
                pass
            self.placement_group = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


def connect(address: str | None, *, num_cpus: float | None = None) -> bool:
    """Join (or start, for ``"local"``) a Ray cluster unless already connected; True if started here."""
    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=None if num_cpus is None else max(1, int(-(-num_cpus // 1))),
                 include_dashboard=False, log_to_driver=False)
        return True
    ray.init(address=address, log_to_driver=False)
    return True


def check_resources(n_stages: int, gpus_per_stage: float, cpus_per_stage: float) -> str:
    """Fail fast when the cluster cannot hold the stages; return the placement strategy."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    totals = ray.cluster_resources()
    need = {"GPU": gpus_per_stage * n_stages, "CPU": cpus_per_stage * n_stages}
    missing = []
    for res, per_stage in (("GPU", gpus_per_stage), ("CPU", cpus_per_stage)):
        if per_stage <= 0:
            continue
        have = float(totals.get(res, 0))
        best = max((float(n["Resources"].get(res, 0)) for n in nodes), default=0.0)
        if have < need[res] - 1e-9:
            missing.append(f"{n_stages} stages x {per_stage:g} {res} = {need[res]:g} {res} requested, "
                           f"the cluster has {have:g} {res} in all (missing {need[res] - have:g} {res})")
        elif best < per_stage - 1e-9:
            missing.append(f"a stage needs {per_stage:g} {res} on one node; the largest node has {best:g} {res}")
    if missing:
        raise ClusterResourceError("Ray cluster lacks resources for the pipeline: " + "; ".join(missing)
                                   + f" ({len(nodes)} node(s))")
    fits_one = any(all(float(n["Resources"].get(r, 0)) >= need[r] - 1e-9 for r in need if need[r] > 0)
                   for n in nodes)
    return "STRICT_PACK" if fits_one else "PACK"


def _free() -> str:
    free = ray.available_resources()
    return ", ".join(f"{free.get(r, 0):g} {r}" for r in ("CPU", "GPU"))


def ray_pipeline(model: str | Checkpoint = DEFAULT_MODEL, *, stages: int | None = None, layers: str | None = None,
                 address: str | None = None, gpus_per_stage: float = 0, cpus_per_stage: float = 1,
                 dtype: str | None = None, max_tokens: int | None = None, cache_bytes: int = 2 * 2**30,
                 retries: int = 1, max_restarts: int = -1, timeout_s: float | None = 300.0,
                 ready_timeout_s: float = 60.0, load_timeout_s: float = 600.0, transport: str = "auto",
                 batch_size: int = 8, adapter: Any = None) -> RayPipeline:
    """A ``Pipeline`` whose stages are Ray actors (see the module docstring).

    ``address``: a Ray address, ``"local"`` (start a local Ray here), or None (``RAY_ADDRESS``, else
    local). If Ray is already initialised in this process, that cluster is used.
    ``adapter``: a user's model adapter as a dotted path (``module.path:factory`` or
    ``module.path.ClassName``, see ``docs/adapters.md``), imported here (layers, tokenizer) and
    again by every stage actor on its node; the module must be importable there too.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport: {transport!r} is not one of {', '.join(TRANSPORTS)}")
    if gpus_per_stage < 0 or cpus_per_stage < 0:
        raise ValueError("gpus_per_stage and cpus_per_stage must be >= 0")
    if retries < 0:
        raise ValueError(f"retries: {retries} must be >= 0")
    if adapter is None:
        checkpoint = model if isinstance(model, Checkpoint) else resolve(model)
        n_layers = int(load_config(checkpoint).num_hidden_layers)
        tokenizer = None
    else:
        source = resolve_adapter(adapter, model)  # here: the layout and the tokenizer; the actors build their own
        checkpoint, n_layers, tokenizer = adapter_checkpoint(source), int(source.n_layers), source.tokenizer
    ranges = plan_layers(checkpoint, n_layers, stages=stages, layers=layers)
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    owns_ray = connect(address, num_cpus=max(os.cpu_count() or 1, cpus_per_stage * len(ranges)))
    pg = None
    clients: list[RayStageClient] = []
    try:
        strategy = check_resources(len(ranges), gpus_per_stage, cpus_per_stage)
        bundle = {"CPU": float(cpus_per_stage)} if cpus_per_stage > 0 else {}
        if gpus_per_stage > 0:
            bundle["GPU"] = float(gpus_per_stage)
        if not bundle:
            bundle = {"CPU": 0.01}
        pg = ray.util.placement_group([dict(bundle) for _ in ranges], strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ClusterResourceError(
                f"placement group of {len(ranges)} bundles {bundle} ({strategy}) not ready within "
                f"{ready_timeout_s} s: free now {_free()} (other placement groups or tasks hold the rest)"
            ) from None
        if transport == "auto":
            # NCCL wants one GPU per rank: stages sharing a GPU keep the object store.
            transport = "nccl" if gpus_per_stage >= 1 and len(ranges) > 1 else "object_store"
        direct = transport in ("nccl", "gloo") and len(ranges) > 1
        actor_cls = stage_actor_class(direct)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # The actor re-resolves the spec itself, so a cluster node converts or finds the checkpoint locally.
        spec = (checkpoint if isinstance(model, Checkpoint) else str(model)) if adapter is None else model
        device = "cuda" if gpus_per_stage > 0 else "cpu"
        threads = max(1, int(cpus_per_stage)) if cpus_per_stage > 0 else 1
        for i, (a, b) in enumerate(ranges):
            actor = actor_cls.options(
                num_cpus=cpus_per_stage, num_gpus=gpus_per_stage, max_restarts=max_restarts,
                max_task_retries=retries, name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=i),
            ).remote(spec, a, b, device=device, dtype=dtype, cache_bytes=cache_bytes, threads=threads,
                     **({} if adapter is None else {"adapter": adapter}))
            clients.append(RayStageClient(actor, i, a, b, last=b == n_layers, retries=retries,
                                          timeout_s=timeout_s, transport=transport if direct else None))
        t0 = time.perf_counter()
        infos = []
        for c in clients:  # all load in parallel; the wait is bounded by load_timeout_s overall
            left = max(1.0, load_timeout_s - (time.perf_counter() - t0))
            infos.append(c.ready(timeout_s=left))
        if direct:
            from ray.experimental.collective import create_collective_group

            create_collective_group([c.actor for c in clients], backend="torch_gloo" if transport == "gloo" else "nccl")
        info = infos[-1]["info"]
        if checkpoint is None:  # a user adapter: the model's parameters are its stages'
            info = dataclasses.replace(info, n_params=sum(i["info"].n_params for i in infos))
        pipe = RayPipeline(checkpoint, clients, info, load_tokenizer(checkpoint) if tokenizer is None else tokenizer,
                           max_tokens=max_tokens, batch_size=batch_size, placement_group=pg, owns_ray=owns_ray,
                           adapter=adapter_label(adapter))
        pipe.stage_info = infos
        pipe.transport = transport if direct else "object_store"
        pipe.strategy = strategy
        return pipe
    except BaseException:
        for c in clients:
            c.close()
        if pg is not None:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:
                pass
        if owns_ray:
            ray.shutdown()
        raise
