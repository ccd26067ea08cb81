"""The coordinator: tokenises, drives the residual through the stages, merges their edge sets.

Stages are reached through ``StageClient`` objects (``stage_clients``) with one typed interface,
so the same coordinator runs a single in-process stage, several in-process stages, or Ray actors.
Each traced prompt becomes a ``FlowGraph`` (data) with a ``LiveRun`` attached (``graph.live``):
detail questions go to the stage that owns the layer, vocabulary readings to the last stage, and
only small answers travel. The record of runs (what is needed to recompute an evicted run) is
bounded; a run dropped from it is dropped from the stages' activation caches too.
"""

from __future__ import annotations

import dataclasses
import threading
import unicodedata
import uuid
from collections import OrderedDict
from typing import Any, Callable, Sequence, TypeVar

import torch

from routescope.workers.adapter import adapter_label, resolve_adapter
from routescope.workers.checkpoint import Checkpoint, resolve
from routescope.workers.edgeset import EdgeSet, check_tau_min
from routescope.workers.schema import (DEFAULT_MODEL, DEFAULT_TAU_MIN, NORMS, ModelInfo, Norm, TraceMeta,
                                       check_choice)
from routescope.workers.stage import RunEvictedError, Stage

from .graph import FlowGraph
from .layout import balance, plan
from .live import LiveRun
from .stage_clients import LocalStageClient, StageClient

T = TypeVar("T")
MAX_RUNS = 4096  # runs the coordinator can recompute; older ones are forgotten here and on the stages


def validate_prompt(prompt: Any, index: int | None = None) -> str:
    """Reject prompts no model should see: empty, non-text, control characters."""
    where = "prompt" if index is None else f"prompt {index}"
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: must be text, got {type(prompt).__name__}")
    if any("\udc80" <= c <= "\udcff" for c in prompt):
        # Bytes that were not UTF-8, smuggled in as lone surrogates (command-line arguments, file
        # names): report them as what they are.
        raw = prompt.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    if not prompt.strip():
        raise ValueError(f"{where}: empty or whitespace only")
    bad = [c for c in prompt if unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\t\r"]
    if bad:
        raise ValueError(f"{where}: contains control character U+{ord(bad[0]):04X}")
    return prompt


class Pipeline:
    """A model split into stages, ready to trace prompts and answer detail queries."""

    def __init__(self, checkpoint: Checkpoint | None, clients: Sequence[StageClient], info: ModelInfo, tokenizer,
                 *, max_tokens: int | None = None, batch_size: int = 8, max_runs: int = MAX_RUNS,
                 adapter: str | None = None):
        self.checkpoint = checkpoint  # None for a model read by a user adapter (``adapter``)
        self.adapter = adapter
        self.clients = list(clients)
        # A stage's own ModelInfo counts only its parameters; the model's are in the checkpoint
        # (a user adapter's pipeline is given the sum over its stages).
        self.info = info if checkpoint is None else dataclasses.replace(info, n_params=checkpoint.n_parameters())
        self.tokenizer = tokenizer
        self.max_tokens = min(info.n_ctx, max_tokens) if max_tokens else info.n_ctx
        self.batch_size = batch_size
        # One lock per pipeline: traces and detail questions of every caller (API, viewer
        # sessions, jobs) take it, so one model instance is shared safely.
        self.lock = threading.RLock()
        self.max_runs = max_runs
        self._runs: OrderedDict[str, tuple[list[int], str, float]] = OrderedDict()

    # ----------------------------------------------------------------------------- building
    @classmethod
    def local(cls, model: str | Checkpoint | None = DEFAULT_MODEL, *, stages: int | None = None,
              layers: str | None = None, device: str = "cpu", dtype: str | None = None,
              max_tokens: int | None = None, cache_bytes: int = 2 * 2**30,
              chunk_bytes: int | None = None, adapter: Any = None) -> "Pipeline":
        """All stages in this process (one stage unless ``stages``/``layers`` say otherwise).
        ``chunk_bytes``: the contribution chunks' working memory (default: sized to the device).
        ``adapter``: a user's model adapter (``docs/adapters.md``): a dotted path
        ``module.path:factory`` / ``module.path.ClassName``, a factory or class (called with
        ``model=model`` if it takes ``model``), or an adapter object; None: the checkpoint ``model``
        through TransformerBridge."""
        if adapter is None:
            model = model if isinstance(model, Checkpoint) else resolve(model)
        source = resolve_adapter(adapter, model)
        checkpoint = adapter_checkpoint(source)
        ranges = plan_layers(checkpoint, source.n_layers, stages=stages, layers=layers)
        built = [Stage(source, a, b, device=device, dtype=dtype, cache_bytes=cache_bytes, chunk_bytes=chunk_bytes)
                 for a, b in ranges]
        info = built[-1].info
        if checkpoint is None:
            info = dataclasses.replace(info, n_params=sum(s.info.n_params for s in built))
        return cls(checkpoint, [LocalStageClient(s) for s in built], info, source.tokenizer,
                   max_tokens=max_tokens, adapter=adapter_label(adapter))

    @property
    def layout(self) -> list[tuple[int, int]]:
        return [(c.start, c.stop) for c in self.clients]

    @property
    def last(self) -> StageClient:
        """The stage holding the final norm and unembedding."""
        return self.clients[-1]

    def close(self) -> None:
        for c in self.clients:
            c.close()

    # ----------------------------------------------------------------------------- tracing
    def tokenize(self, prompt: str, prepend_bos: bool = True) -> list[int]:
        """Token ids of a prompt, with the model's BOS token first unless ``prepend_bos`` is off."""
        prompt = validate_prompt(prompt)
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if prepend_bos:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise ValueError("prepend_bos: this tokenizer has no BOS token; pass prepend_bos=False")
            ids = [bos] + ids
        if not ids:
            raise ValueError("prompt: tokenises to nothing")
        if len(ids) > self.max_tokens:
            raise ValueError(
                f"prompt: {len(ids)} tokens exceeds the limit of {self.max_tokens} "
                f"(model context {self.info.n_ctx})"
            )
        return ids

    def trace(self, prompts: str | Sequence[str], *, norm: Norm = "l1", tau_min: float = DEFAULT_TAU_MIN,
              prepend_bos: bool = True) -> FlowGraph | list[FlowGraph]:
        """Flow graphs of one prompt (a ``FlowGraph``) or several (a list, in the order given)."""
        single = isinstance(prompts, (str, bytes))
        items = [prompts] if single else list(prompts)
        if not items:
            raise ValueError("prompts: empty list")
        check_choice("norm", norm, NORMS)
        tau_min = check_tau_min(tau_min)
        token_ids = [self.tokenize(validate_prompt(p, None if single else i), prepend_bos) for i, p in enumerate(items)]
        graphs = self.trace_ids(token_ids, norm=norm, tau_min=float(tau_min), prompts=[str(p) for p in items])
        return graphs[0] if single else graphs

    def trace_ids(self, token_ids: list[list[int]], *, norm: Norm = "l1", tau_min: float = DEFAULT_TAU_MIN,
                  prompts: list[str] | None = None) -> list[FlowGraph]:
        """Trace tokenised prompts; batches are submitted to all stages before any result is
        awaited, so with Ray actors several batches are in flight at once."""
        with self.lock:
            run_ids = [uuid.uuid4().hex for _ in token_ids]
            pending = []
            for b0 in range(0, len(token_ids), self.batch_size):
                ids = token_ids[b0 : b0 + self.batch_size]
                pending.append((b0, self._submit(ids, run_ids[b0 : b0 + len(ids)], norm, tau_min)))
            graphs: list[FlowGraph] = []
            for b0, handles in pending:
                per_stage = [client.fetch(h) for client, h in zip(self.clients, handles)]
                for j in range(len(per_stage[0])):
                    i = b0 + j
                    merged = EdgeSet.concatenate([stage[j] for stage in per_stage])
                    ids = list(token_ids[i])
                    merged.trace = TraceMeta(
                        prompt=None if prompts is None else prompts[i], token_ids=ids,
                        tokens=[self.tokenizer.decode([t]) for t in ids],
                        raw_tokens=list(self.tokenizer.convert_ids_to_tokens(ids)), model_info=self.info)
                    self._remember(run_ids[i], ids, norm, tau_min)
                    live = LiveRun(self, run_ids[i], n_tokens=merged.n_tokens, n_layers=merged.n_layers,
                                   n_heads=merged.n_heads, parallel=merged.parallel, norm=norm)
                    graphs.append(FlowGraph(merged, live=live))
            self._forget_old()
            return graphs

    def _remember(self, run_id: str, ids: list[int], norm: str, tau_min: float) -> None:
        self._runs[run_id] = (ids, norm, tau_min)
        self._runs.move_to_end(run_id)

    def _forget_old(self) -> None:
        """Drop the oldest runs beyond ``max_runs``, here and from the stages' caches."""
        old = []
        while len(self._runs) > self.max_runs:
            old.append(self._runs.popitem(last=False)[0])
        if old:
            for client in self.clients:
                client.drop_runs(old)

    def _submit(self, batch_ids: list[list[int]], run_ids: list[str], norm: str, tau_min: float) -> list[Any]:
        """Left-pad a batch and chain it through the stages; return each stage's payload handle."""
        n = max(len(x) for x in batch_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inputs = torch.tensor([[pad] * (n - len(x)) + list(x) for x in batch_ids], dtype=torch.long)
        lengths = [len(x) for x in batch_ids]
        x: Any = inputs
        handles = []
        for client in self.clients:
            x, payloads = client.submit_forward(x, lengths, run_ids, norm, tau_min)
            handles.append(payloads)
        return handles

    # ----------------------------------------------------------------------------- details
    def owner(self, layer: int) -> StageClient:
        """The stage holding ``layer``."""
        for c in self.clients:
            if c.start <= layer < c.stop:
                return c
        raise ValueError(f"layer {layer} outside [0, {self.info.n_layers - 1}]")

    def ask(self, run_id: str, question: Callable[[], T]) -> T:
        """Answer ``question`` (typed stage calls about ``run_id``) under the pipeline's lock; if a
        stage has evicted the run, recompute it once and ask again."""
        with self.lock:
            try:
                return question()
            except Exception as exc:
                if not _is_evicted(exc):
                    raise
            self._recompute(run_id)
            return question()

    def _recompute(self, run_id: str) -> None:
        run = self._runs.get(run_id)
        if run is None:
            raise RunEvictedError(f"run {run_id} is unknown to this pipeline; trace the prompt again")
        ids, norm, tau_min = run
        self._runs.move_to_end(run_id)
        handles = self._submit([ids], [run_id], norm, tau_min)
        for client, h in zip(self.clients, handles):
            client.fetch(h)


def adapter_checkpoint(adapter: Any) -> Checkpoint | None:
    """The checkpoint an adapter reads (the default one's; a user adapter may expose one too)."""
    checkpoint = getattr(adapter, "checkpoint", None)
    return checkpoint if isinstance(checkpoint, Checkpoint) else None


def plan_layers(checkpoint: Checkpoint | None, n_layers: int, *, stages: int | None = None,
                layers: str | None = None) -> list[tuple[int, int]]:
    """``layout.plan``; without a checkpoint (a user adapter) ``stages`` get equal numbers of layers."""
    if checkpoint is None and layers is None and isinstance(stages, int) and not isinstance(stages, bool) \
            and 1 < stages <= n_layers:
        return balance([1] * n_layers, stages)
    return plan(checkpoint, n_layers, stages=stages, layers=layers)


def _is_evicted(exc: BaseException) -> bool:
    if isinstance(exc, RunEvictedError):
        return True
    cause = getattr(exc, "cause", None)  # Ray wraps remote exceptions
    return isinstance(cause, RunEvictedError) or "RunEvictedError" in type(exc).__name__
