"""How the coordinator talks to a stage, wherever it runs: one typed interface, two transports.

``StageClient`` is the protocol: the forward pass (``submit_forward`` / ``fetch``, which hands
back ``EdgeSet`` objects), the typed detail questions of ``workers.details.StageDetails``, and
``close``. ``StageClientBase`` implements every detail method once, on top of one ``_detail(name,
*args)`` hook that refuses names outside ``DETAIL_METHODS``; ``LocalStageClient`` (a ``Stage`` in
this process, nothing serialised) and ``RayStageClient`` (a ``StageActor``; msgpack bytes and
ObjectRefs) only supply that hook and the forward pass. Nothing outside ``cluster/`` touches a
``Stage`` or its bridge.

``lazy=True`` on a vector question returns a handle instead of the vector: passed on to the last
stage's ``rank_tokens``, the vector then goes stage to stage (object store), never through the
driver.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from routescope.workers.details import Component, TokenExtremes, TokenRanking, check_detail_method
from routescope.workers.edgeset import EdgeSet
from routescope.workers.schema import Node, Norm
from routescope.workers.stage import RunEvictedError, Stage


class StageClient(Protocol):
    """The coordinator's view of one stage (layers ``[start, stop)``)."""

    start: int
    stop: int

    def submit_forward(self, inputs: Any, lengths: list[int], run_ids: list[str], norm: str,
                       tau_min: float) -> tuple[Any, Any]:
        """Start the stage on ``inputs`` (ids, a residual, or a handle to one); return handles
        to ``(residual, edge sets)``."""

    def fetch(self, handle: Any) -> list[EdgeSet]:
        """The edge sets behind a handle returned by ``submit_forward``."""

    def node_vectors(self, run_id: str, nodes: Sequence[Node], *, lazy: bool = False) -> Any: ...
    def component_vector(self, run_id: str, component: Component, *, lazy: bool = False) -> Any: ...
    def rank_tokens(self, vector: Any, previous: Any, k: int, normalize: bool) -> TokenRanking: ...
    def extreme_tokens(self, vector: Any, k: int, normalize: bool) -> TokenExtremes: ...
    def head_contributions(self, run_id: str, layer: int, target: int, norm: Norm) -> np.ndarray: ...
    def attention_maps(self, run_id: str, layer: int, heads: Sequence[int], norm: Norm
                       ) -> tuple[np.ndarray, np.ndarray]: ...
    def attention_patterns(self, run_id: str, layer: int) -> np.ndarray: ...
    def neurons(self, run_id: str, layer: int, pos: int, k: int, norm: Norm, expert: int | None = None
                ) -> list[dict[str, float]]: ...
    def experts(self, run_id: str, layer: int, pos: int, norm: Norm) -> dict[str, Any]: ...
    def has_run(self, run_id: str) -> bool: ...
    def drop_runs(self, run_ids: Sequence[str]) -> None: ...
    def parameter_bytes(self) -> int: ...
    def counters(self) -> dict[str, int]: ...
    def plain_forward(self, inputs: Any) -> Any: ...
    def close(self) -> None: ...


class StageClientBase:
    """The typed detail methods (``workers.details.StageDetails``), each one ``_detail`` call."""

    start: int
    stop: int

    def _detail(self, method: str, *args: Any, lazy: bool = False) -> Any:
        raise NotImplementedError

    def node_vectors(self, run_id: str, nodes: Sequence[Node], *, lazy: bool = False) -> Any:
        return self._detail("node_vectors", run_id, list(nodes), lazy=lazy)

    def component_vector(self, run_id: str, component: Component, *, lazy: bool = False) -> Any:
        return self._detail("component_vector", run_id, component, lazy=lazy)

    def rank_tokens(self, vector: Any, previous: Any, k: int, normalize: bool) -> TokenRanking:
        return self._detail("rank_tokens", vector, previous, k, normalize)

    def extreme_tokens(self, vector: Any, k: int, normalize: bool) -> TokenExtremes:
        return self._detail("extreme_tokens", vector, k, normalize)

    def head_contributions(self, run_id: str, layer: int, target: int, norm: Norm) -> np.ndarray:
        return self._detail("head_contributions", run_id, layer, target, norm)

    def attention_maps(self, run_id: str, layer: int, heads: Sequence[int], norm: Norm
                       ) -> tuple[np.ndarray, np.ndarray]:
        return self._detail("attention_maps", run_id, layer, list(heads), norm)

    def attention_patterns(self, run_id: str, layer: int) -> np.ndarray:
        return self._detail("attention_patterns", run_id, layer)

    def neurons(self, run_id: str, layer: int, pos: int, k: int, norm: Norm, expert: int | None = None
                ) -> list[dict[str, float]]:
        return self._detail("neurons", run_id, layer, pos, k, norm, expert)

    def experts(self, run_id: str, layer: int, pos: int, norm: Norm) -> dict[str, Any]:
        return self._detail("experts", run_id, layer, pos, norm)

    def has_run(self, run_id: str) -> bool:
        return self._detail("has_run", run_id)

    def drop_runs(self, run_ids: Sequence[str]) -> None:
        return self._detail("drop_runs", list(run_ids))

    def parameter_bytes(self) -> int:
        return self._detail("parameter_bytes")

    def counters(self) -> dict[str, int]:
        return self._detail("counters")

    def plain_forward(self, inputs: Any) -> Any:
        return self._detail("plain_forward", inputs)


class LocalStageClient(StageClientBase):
    """A ``Stage`` in this process: edge sets and tensors are handed over as objects."""

    def __init__(self, stage: Stage):
        self._stage = stage
        self.start, self.stop = stage.start, stage.stop

    def submit_forward(self, inputs, lengths, run_ids, norm, tau_min):
        return self._stage.forward(inputs, lengths, run_ids=run_ids, norm=norm, tau_min=tau_min)

    def fetch(self, handle):
        return handle

    def _detail(self, method: str, *args: Any, lazy: bool = False) -> Any:
        return getattr(self._stage, check_detail_method(method))(*args)

    def close(self) -> None:
        pass


class StageError(RuntimeError):
    """A stage failed (its actor died, could not be restarted, or raised) or gave no answer in time."""

    def __init__(self, message: str, *, stage: int, start: int, stop: int):
        super().__init__(message)
        self.stage, self.start, self.stop = stage, start, stop


class StageTimeoutError(StageError, TimeoutError):
    """A stage gave no answer within the configured timeout."""


class RayStageClient(StageClientBase):
    """``StageClient`` of a ``StageActor``: handles are ObjectRefs, answers are awaited with a timeout.

    ``retries`` is how often Ray re-runs a task of this stage after its actor died (the actor itself
    is restarted by Ray, re-loading its layers); ``timeout_s`` bounds every wait (None: no bound).
    Failures surface as ``StageError`` naming the stage and its layer range.
    """

    def __init__(self, actor, index: int, start: int, stop: int, *, last: bool, retries: int = 1,
                 timeout_s: float | None = 300.0, transport: str | None = None):
        self.actor = actor
        self.index, self.start, self.stop, self.last = index, start, stop, last
        self.retries = retries
        self.timeout_s = timeout_s
        self.transport = transport  # None: object store; "nccl" / "gloo": Ray Direct Transport
        self._seq = 0

    @property
    def name(self) -> str:
        return f"stage {self.index} (layers {self.start}-{self.stop - 1})"

    # ----------------------------------------------------------------------------- StageClient
    def submit_forward(self, inputs, lengths, run_ids, norm, tau_min):
        opts = {"max_task_retries": int(self.retries)}
        if self.transport is None:
            resid, payloads = self.actor.forward.options(**opts).remote(
                inputs, lengths, run_ids, norm, tau_min, not self.last)
            return resid, payloads
        self._seq += 1
        key = None if self.last else f"{run_ids[0]}:{self._seq}"
        payloads = self.actor.forward_keep.options(**opts).remote(inputs, lengths, run_ids, norm, tau_min, key)
        resid = None if key is None else self.actor.take.options(tensor_transport=self.transport, **opts).remote(key)
        return resid, payloads

    def fetch(self, handle):
        return [EdgeSet.decode(p) for p in self._get(handle, "forward")]

    def _detail(self, method: str, *args: Any, lazy: bool = False) -> Any:
        ref = self.actor.detail.options(max_task_retries=int(self.retries)).remote(check_detail_method(method), *args)
        return ref if lazy else self._get(ref, method, detail=True)

    def ready(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self._get(self.actor.ready.remote(), "loading its layers", timeout_s=timeout_s or self.timeout_s)

    def pid(self) -> int:
        return self._get(self.actor.pid.remote(), "pid")

    def close(self) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone, or Ray shut down
            pass

    # ----------------------------------------------------------------------------- errors
    def _get(self, ref, what: str, *, detail: bool = False, timeout_s: float | None = None):
        import ray
        from ray import exceptions as rex

        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return ray.get(ref, timeout=timeout)
        except rex.GetTimeoutError:
            raise StageTimeoutError(f"{self.name}: no answer to {what} within {timeout} s (timeout_s)",
                                    stage=self.index, start=self.start, stop=self.stop) from None
        except (rex.RayActorError, rex.ActorUnavailableError) as exc:
            raise StageError(
                f"{self.name}: actor died during {what} and the task was retried {self.retries} time(s) "
                f"without success ({type(exc).__name__}: {_first_line(exc)})",
                stage=self.index, start=self.start, stop=self.stop) from exc
        except (rex.ObjectLostError, rex.OwnerDiedError) as exc:
            raise StageError(f"{self.name}: input or output of {what} was lost ({type(exc).__name__})",
                             stage=self.index, start=self.start, stop=self.stop) from exc
        except rex.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, RunEvictedError):
                raise RunEvictedError(*cause.args) from None
            if detail and isinstance(cause, (ValueError, KeyError, IndexError, TypeError)):
                raise cause from None  # a bad question (position, head ...): the caller's error, as is
            if isinstance(cause, (rex.RayActorError, rex.ActorUnavailableError)):
                raise StageError(f"{self.name}: an upstream stage's actor died during {what}",
                                 stage=self.index, start=self.start, stop=self.stop) from exc
            raise StageError(f"{self.name}: {what} failed: {type(cause or exc).__name__}: {_first_line(cause or exc)}",
                             stage=self.index, start=self.start, stop=self.stop) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""
