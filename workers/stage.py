"""A pipeline stage: layers ``[start, stop)`` of a model, with capture, contributions and details.

The model side is a ``workers.adapter.LayerRange`` built by a ``ModelAdapter``: by default
``workers.bridge_adapter.BridgeAdapter`` (a Hugging Face checkpoint read through TransformerLens'
``TransformerBridge``), or a user's own adapter (``docs/adapters.md``). The stage works on what
the range reports per layer (the hook names of ``workers.adapter.HOOKS``) and its ``W_O`` /
``W_out``: forward with capture, contributions and edge sets, the activation cache, the typed detail
answers, and the load-time probe of ``workers.support``. A single process is a one-stage pipeline;
the Ray actors of ``workers.actor`` hold one ``Stage`` each.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import fields
from typing import Any, Sequence

import numpy as np
import torch

from .adapter import HOOKS, AdapterError, ModelAdapter, check_range, resolve_adapter
from .checkpoint import Checkpoint, check_device
from .contributions import (
    DEFAULT_CHUNK_BYTES,
    LayerActivations,
    Norm,
    attention_contributions_chunk,
    layer_contributions,
    neuron_contributions,
    part_contributions,
    target_head_contributions,
)
from . import kernels, support
from .details import Component, TokenExtremes, TokenRanking
from .moe import expert_activations, expert_down, expert_parts, route
from .edgeset import EdgeSet
from .schema import ModelFacts, ModelInfo, Node, canonical_dtype

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HOOKS = HOOKS


class RunEvictedError(KeyError):
    """The activations of a run are no longer cached on this stage."""


class ActivationStore:
    """Activations of recent runs, least recently used evicted beyond a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._runs: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def n_bytes(self) -> int:
        return sum(size for size, _ in self._runs.values())

    def put(self, key: str, value: dict[str, Any]) -> None:
        size = sum(t.numel() * t.element_size() for t in _tensors(value))
        with self._lock:
            self._runs[key] = (size, value)
            self._runs.move_to_end(key)
            while len(self._runs) > 1 and self.n_bytes > self.max_bytes:
                self._runs.popitem(last=False)
            if self.n_bytes > self.max_bytes:  # one run alone exceeds the budget: keep nothing
                self._runs.clear()

    def get(self, key: str) -> dict[str, Any]:
        with self._lock:
            if key not in self._runs:
                raise RunEvictedError(key)
            self._runs.move_to_end(key)
            return self._runs[key][1]

    def drop(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._runs.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._runs


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class Stage:
    """Layers ``[start, stop)`` of a model: forward with capture, contributions, detail queries."""

    def __init__(
        self,
        model: str | Checkpoint | ModelAdapter,
        start: int = 0,
        stop: int | None = None,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        cache_bytes: int = 2 * 2**30,
        chunk_bytes: int | None = None,
        adapter: Any = None,
    ):
        """Layers ``[start, stop)`` of ``model``: a model spec or ``Checkpoint`` read by the default
        ``BridgeAdapter``, or by ``adapter`` (``workers.adapter.resolve_adapter``: a dotted path,
        factory, class or adapter object) when given; or a ``ModelAdapter`` itself."""
        if adapter is None and not isinstance(model, (str, Checkpoint)) and hasattr(model, "build"):
            adapter, model = model, None
        self.adapter = resolve_adapter(adapter, model)
        self.checkpoint: Checkpoint | None = getattr(self.adapter, "checkpoint", None)
        total = int(self.adapter.n_layers)
        stop = total if stop is None else stop
        if not 0 <= start < stop <= total:
            raise ValueError(f"layers: stage range [{start}, {stop}) is not within the model's [0, {total})")
        self.start, self.stop, self.n_layers_total = start, stop, total
        self.first, self.last = start == 0, stop == total
        self.device = torch.device(check_device(device))
        self.dtype = _dtype(dtype)
        where = f"adapter {self.adapter.name!r}" if self.checkpoint is None else str(self.checkpoint.path)
        self._where = where
        self.layers = check_range(self.adapter.build(start, stop, self.device, self.dtype), stop - start, where)
        self.chunk_bytes = chunk_bytes or _chunk_budget(self.device)
        self.tokenizer = self.adapter.tokenizer
        facts = self.layers.facts
        self.parallel = bool(facts.parallel)
        # Extensions of the bridge adapter (workers.bridge_adapter), absent from user adapters:
        # MoE blocks have no single W_out, their detail is read from the block input (workers.moe);
        # norms on the attention / FFN outputs inside each block (SPEC 4a) are linearised at their input.
        self.moe_blocks = getattr(self.layers, "moe_blocks", None)
        self.block_norms = getattr(self.layers, "block_norms", None)
        self.W_O = self.layers.W_O.detach()  # [n, H, dh, d]
        self.W_out = None if self.moe_blocks is not None else self.layers.W_out.detach()  # [n, d_ff, d]
        sizes = {f.name: int(getattr(facts, f.name)) for f in fields(ModelFacts) if f.type == "int"}
        self.info = ModelInfo(architecture=facts.architecture, parallel=self.parallel, **sizes,
                              name=self.adapter.name, n_layers=total, n_params=int(self.layers.parameter_count()))
        self.store = ActivationStore(cache_bytes)
        self.recomputed_batches = 0  # batches computed again, synced, after a candidate list overflowed
        self._lock = threading.Lock()
        self._check_decomposition()

    def _check_decomposition(self) -> None:
        """Refuse the model unless its readings add up on a probe (``support.check_decomposition``)."""
        x = support.probe_inputs(self.info.d_vocab, self.info.d_model, self.first, self.device, self.dtype)
        arch = self.info.architecture

        def check(i: int, layer: dict[str, torch.Tensor]) -> None:
            self._check_layer(i, layer, x.shape[1])
            acts = self._slice(layer, 0, x.shape[1])
            if self.moe_blocks is not None:
                support.check_moe(arch, self.start + i, acts, self.moe_blocks[i], self.dtype)
            scales = (None, None) if self.block_norms is None else \
                (self._norm_scale(acts, i, "attn"), self._norm_scale(acts, i, "mlp"))
            support.check_decomposition(arch, self.start + i, acts, self.W_O[i],
                                        None if self.W_out is None else self.W_out[i], self.parallel, self.dtype,
                                        *scales)

        with self._lock, torch.inference_mode():
            try:
                self._run(x, [x.shape[1]], check)
            except (support.UnsupportedModelError, AdapterError):
                raise
            except (RuntimeError, IndexError, ValueError) as exc:  # the model's own forward failed
                raise ValueError(f"{self._where}: {arch} failed on a {x.shape[1]}-token probe forward "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                                 + ("check its config" if self.checkpoint is not None else "check the adapter")) from None

    def _check_layer(self, i: int, layer: dict[str, torch.Tensor], n_tokens: int) -> None:
        """The probe's layer ``i`` reports every activation the stage reads, in its shape (``AdapterError``)."""
        f = self.layers.facts
        d, T = f.d_model, n_tokens
        want: dict[str, tuple] = {"hook_resid_pre": (1, T, d), "hook_resid_post": (1, T, d),
                                  "attn.hook_v": (1, T, None, f.d_head), "attn.hook_pattern": (1, f.n_heads, T, T),
                                  "hook_attn_out": (1, T, d), "hook_mlp_out": (1, T, d)}
        if not self.parallel:
            want["hook_resid_mid"] = (1, T, d)
        if self.moe_blocks is None:
            want["mlp.hook_post"] = (1, T, f.d_ff)
        for name, shape in want.items():
            t = layer.get(name)
            ok = isinstance(t, torch.Tensor) and t.dim() == len(shape) and \
                all(w is None or w == g for w, g in zip(shape, t.shape))
            if ok and name == "attn.hook_v":  # H_kv key/value heads, each serving H / H_kv query heads
                ok = t.shape[2] >= 1 and f.n_heads % t.shape[2] == 0
            if not ok:
                got = "nothing" if t is None else list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                expected = [("H_kv" if w is None else w) for w in shape]
                raise AdapterError(f"{self._where}: layer {self.start + i} reported {got} as {name!r}, expected a "
                                   f"tensor of shape {expected} (see workers.adapter.HOOK_SHAPES)")

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        inputs: torch.Tensor,
        lengths: list[int],
        *,
        run_ids: list[str] | None = None,
        norm: Norm = "l1",
        tau_min: float = 0.01,
        keep: bool = True,
    ) -> tuple[torch.Tensor, list[EdgeSet]]:
        """Run this stage's layers on a left-padded batch; return the residual and edge sets.

        ``inputs`` is ``[B, T]`` token ids on the first stage, else the ``[B, T, d]`` residual the
        previous stage produced. ``lengths`` are the unpadded lengths (positions ``T - len..T-1``
        hold the prompt). Returns the residual after ``stop - 1`` and one ``EdgeSet`` per prompt
        (encoded only where it leaves the process). With ``keep``, activations are cached under
        ``run_ids`` for detail queries.
        """
        with self._lock, torch.inference_mode():
            keep = keep and run_ids is not None and self._fits_cache(inputs.shape[1], lengths)
            # With the fused kernels the layers never wait for the device; whether a candidate list
            # overflowed is read once, at the end, and then the batch is computed again, synced.
            dropped = torch.zeros(1, dtype=torch.long, device=self.device) if kernels.available(self.device) else None
            while True:
                columns: list[dict[str, list]] = [_new_columns() for _ in lengths]
                kept: list[list[dict[str, torch.Tensor]]] = [[] for _ in lengths]

                def on_layer(i: int, layer: dict[str, torch.Tensor]) -> None:
                    # Each layer's contributions are computed as soon as it has run, so only one
                    # layer's activations (its [H, T, T] pattern above all) are alive at a time.
                    for b, n in enumerate(lengths):
                        acts = self._slice(layer, b, n)
                        self._add_layer(columns[b], i, acts, norm, tau_min, dropped)
                        if keep:
                            kept[b].append(acts)

                resid_out = self._run(inputs, lengths, on_layer)
                if dropped is None or int(dropped.item()) == 0:
                    break
                dropped = None
                self.recomputed_batches += 1
            edge_sets = [self._edge_set(columns[b], n, norm, tau_min) for b, n in enumerate(lengths)]
            if keep:
                for b, n in enumerate(lengths):
                    self.store.put(run_ids[b], {"input": _row(inputs, b, n), "layers": kept[b]})
        return resid_out, edge_sets

    def _fits_cache(self, n_tokens: int, lengths: list[int]) -> bool:
        """Whether the batch's activations fit the detail cache (else they are not kept at all)."""
        H, n_kv, d, d_ff = self.info.n_heads, self.info.n_kv_heads, self.info.d_model, self.info.d_ff
        itemsize = torch.finfo(self.dtype).bits // 8
        per_layer = sum(4 * n * d + n * n_kv * self.info.d_head + H * n * n + n * d_ff for n in lengths)
        return per_layer * itemsize * (self.stop - self.start) <= self.store.max_bytes

    def _run(self, inputs: torch.Tensor, lengths: list[int], on_layer) -> torch.Tensor:
        """Forward through the layer range; ``on_layer(i, activations)`` as each layer completes."""
        batch, n_tok = inputs.shape[:2]
        mask = torch.zeros(batch, n_tok, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, n_tok - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        mask, positions = mask.to(self.device), positions.to(self.device)
        if self.first and inputs.dtype.is_floating_point:
            raise ValueError("the first stage takes token ids")
        x = inputs.to(self.device) if self.first else inputs.to(self.device, self.dtype)
        return self.layers.forward(x, mask, positions, on_layer)

    def _slice(self, layer: dict[str, torch.Tensor], b: int, n: int) -> dict[str, torch.Tensor]:
        """One prompt's activations of one layer without its left padding (model dtype)."""
        out = {}
        for name, t in layer.items():
            if name == "attn.hook_pattern":
                out[name] = t[b, :, -n:, -n:].contiguous()
            else:
                out[name] = t[b, -n:].contiguous()
        return out

    def _norm_scale(self, acts: dict[str, torch.Tensor], i: int, side: str) -> torch.Tensor:
        """The diagonal of the block's ``"attn"`` or ``"mlp"`` output norm at its input, ``[T, d]``."""
        norm = self.block_norms[i][0 if side == "attn" else 1]
        return norm.scale(acts[f"{side}.norm_in"])

    def _layer_acts(self, acts: dict[str, torch.Tensor], i: int) -> LayerActivations:
        return LayerActivations(
            resid_pre=acts["hook_resid_pre"],
            resid_mid=acts.get("hook_resid_mid"),
            resid_post=acts["hook_resid_post"],
            mlp_out=acts["hook_mlp_out"],
            v=acts["attn.hook_v"],
            pattern=acts["attn.hook_pattern"],
            W_O=self.W_O[i],
            attn_scale=None if self.block_norms is None else self._norm_scale(acts, i, "attn"),
        )

    def _add_layer(self, cols: dict[str, list], i: int, acts: dict[str, torch.Tensor], norm: Norm,
                   tau_min: float, dropped: torch.Tensor | None = None) -> None:
        c = layer_contributions(self._layer_acts(acts, i), norm, tau_min, self.chunk_bytes, dropped)
        g = self.start + i
        cols["hl"].append(torch.full_like(c.head_target, g))
        cols["el"].append(torch.full_like(c.edge_target, g))
        for key, val in (("ht", c.head_target), ("hs", c.head_source), ("hh", c.head_head), ("hw", c.head_weight),
                         ("et", c.edge_target), ("es", c.edge_source), ("ew", c.edge_weight),
                         ("ra", c.c_res_attn), ("f", c.c_ffn), ("rf", c.c_res_ffn)):
            cols[key].append(val)

    def _edge_set(self, cols: dict[str, list], n_tokens: int, norm: Norm, tau_min: float) -> EdgeSet:
        flat = to_host({k: torch.cat(v) if k not in ("ra", "f", "rf") else torch.stack(v) for k, v in cols.items()})
        for names, source in ((("hl", "ht", "hs", "hh", "hw"), "hs"), (("el", "et", "es", "ew"), "es")):
            keep = flat[source] >= 0  # drop the padding of fixed-size lists (GPUs)
            if not keep.all():
                flat.update({k: flat[k][keep] for k in names})
        return EdgeSet(
            model=self.info.name, n_layers=self.n_layers_total, n_heads=self.info.n_heads, n_tokens=n_tokens,
            layer_start=self.start, layer_stop=self.stop, parallel=self.parallel, norm=norm, tau_min=float(tau_min),
            head_layer=flat["hl"], head_target=flat["ht"], head_source=flat["hs"], head_head=flat["hh"],
            head_weight=flat["hw"], edge_layer=flat["el"], edge_target=flat["et"], edge_source=flat["es"],
            edge_weight=flat["ew"], res_attn=flat["ra"], ffn=flat["f"], res_ffn=flat["rf"],
        )

    # ----------------------------------------------------------------------------- details (SPEC 7)
    def owns(self, layer: int) -> bool:
        return self.start <= layer < self.stop

    def _acts(self, run_id: str, layer: int) -> dict[str, torch.Tensor]:
        if not self.owns(layer):
            raise ValueError(f"layer {layer} is not held by stage [{self.start}, {self.stop})")
        return self.store.get(run_id)["layers"][layer - self.start]

    # Every method from here to ``plain_forward`` is one of ``details.StageDetails``.
    def has_run(self, run_id: str) -> bool:
        return run_id in self.store

    def drop_runs(self, run_ids: Sequence[str]) -> None:
        self.store.drop(run_ids)

    def node_vectors(self, run_id: str, nodes: Sequence[Node]) -> torch.Tensor:
        """``[n, d]`` fp32 vectors of residual nodes of this stage's layers (``M``: FFN output)."""
        out = []
        for node in nodes:
            acts = self._acts(run_id, node.layer)
            _check_pos(node.pos, acts["hook_resid_pre"].shape[0])
            if node.kind == "X":
                if node.layer != self.start or not self.first:
                    raise ValueError(f"node: {node.name}: the embedding is held by the first stage")
                key = "hook_resid_pre"
            else:
                key = {"A": "hook_resid_mid", "I": "hook_resid_post", "M": "hook_mlp_out"}[node.kind]
            if key not in acts:  # parallel blocks have no A node
                raise ValueError(f"node: {node.name}: parallel attention+FFN blocks have no A node")
            out.append(acts[key][node.pos].float())
        return torch.stack(out).cpu()

    def component_vector(self, run_id: str, component: Component) -> torch.Tensor:
        """The ``[d]`` fp32 vector of a block, head, edge or neuron (``details.Component``)."""
        c = component
        acts = self._acts(run_id, c.layer)
        i = c.layer - self.start
        pos = _check_pos(c.pos, acts["hook_resid_pre"].shape[0])
        if c.kind in ("attn_out", "mlp_out"):
            return acts[f"hook_{c.kind}"][pos].float().cpu()
        if c.kind == "block":
            return (acts["hook_resid_post"][pos].float() - acts["hook_resid_pre"][pos].float()).cpu()
        if c.kind in ("head", "edge"):
            H = self.W_O.shape[1]
            heads = range(H) if c.head is None else [_check_index("head", c.head, H)]
            v = acts["attn.hook_v"].float()
            group = H // v.shape[1]
            srcs = slice(0, pos + 1) if c.kind == "head" else slice(_check_pos(c.source, pos + 1), c.source + 1)
            out = torch.zeros(self.W_O.shape[-1])
            for h in heads:
                a = acts["attn.hook_pattern"][h, pos, srcs].float()
                out += ((a[:, None] * v[srcs, h // group]).sum(0) @ self.W_O[i, h].float()).cpu()
            if self.block_norms is not None:  # the part as it joins the stream (SPEC 4a)
                out *= self._norm_scale(acts, i, "attn")[pos].cpu()
            return out
        if self.moe_blocks is not None:
            gate, act, W_out = self._expert_neurons(acts, i, pos, c.expert)
            n = _check_index("neuron", c.neuron, W_out.shape[0])
            return (gate * act[n] * W_out[n]).float().cpu()
        n = _check_index("neuron", c.neuron, self.W_out.shape[1])
        vec = acts["mlp.hook_post"][pos, n].float() * self.W_out[i, n].float()
        if self.block_norms is not None:
            vec = vec * self._norm_scale(acts, i, "mlp")[pos]
        return vec.cpu()

    def head_contributions(self, run_id: str, layer: int, target: int, norm: Norm = "l1") -> np.ndarray:
        """``c_attn[target, :target+1, :]`` as ``[target+1, H]``."""
        acts = self._acts(run_id, layer)
        _check_pos(target, acts["hook_resid_pre"].shape[0])
        la = self._layer_acts(acts, layer - self.start)
        return target_head_contributions(la, target, norm).cpu().numpy()

    def attention_maps(self, run_id: str, layer: int, heads: Sequence[int], norm: Norm = "l1"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Patterns and contribution maps of ``heads``, both ``[len(heads), T, T]``: the layer's
        contributions are computed once for all the heads asked for."""
        acts = self._acts(run_id, layer)
        H = self.W_O.shape[1]
        idx = [_check_index("head", h, H) for h in heads]
        if not idx:
            raise ValueError("heads: ask for at least one head")
        la = self._layer_acts(acts, layer - self.start)
        contrib = _head_contribution_maps(la, idx, norm, self.chunk_bytes)
        return acts["attn.hook_pattern"][idx].float().cpu().numpy(), contrib.cpu().numpy()

    def attention_patterns(self, run_id: str, layer: int) -> np.ndarray:
        """Every head's attention pattern of one layer, ``[H, T, T]`` fp32 (dataset statistics)."""
        return self._acts(run_id, layer)["attn.hook_pattern"].float().cpu().numpy()

    def neurons(self, run_id: str, layer: int, pos: int, k: int = 20, norm: Norm = "l1",
                expert: int | None = None) -> list[dict[str, float]]:
        """Neurons of the FFN at ``(layer, pos)`` ranked by per-neuron contribution (SPEC 4); in an
        MoE block, the neurons of routed expert ``expert`` (default: the one with the largest gate),
        each ``gate * act[n] * W_out[n]`` (SPEC 4b)."""
        acts = self._acts(run_id, layer)
        _check_pos(pos, acts["hook_resid_pre"].shape[0])
        i = layer - self.start
        post = acts["hook_resid_post"][pos]
        if self.moe_blocks is not None:
            gate, act, W_out = self._expert_neurons(acts, i, pos, expert)
            scaled = gate * act
            rest = post - scaled @ W_out  # everything else: residual, other experts, shared expert
        else:
            # Parallel blocks have no resid_mid: everything but the FFN output plays the residual.
            act, scaled, W_out = acts["mlp.hook_post"][pos].float(), acts["mlp.hook_post"][pos], self.W_out[i]
            if self.block_norms is not None:  # neurons as they join the stream (SPEC 4a)
                W_out = W_out.float() * self._norm_scale(acts, i, "mlp")[pos][None, :]
            rest = acts["hook_resid_mid"][pos] if "hook_resid_mid" in acts else post - acts["hook_mlp_out"][pos]
        k = _check_k(k, W_out.shape[0])
        c = neuron_contributions(rest, post, scaled, W_out, norm)
        top = torch.topk(c[:-1], k)
        return [{"neuron": int(n), "contribution": float(w), "activation": float(act[n])}
                for w, n in zip(top.values, top.indices)]

    def experts(self, run_id: str, layer: int, pos: int, norm: Norm = "l1") -> dict[str, Any]:
        """An MoE block at ``(layer, pos)`` (SPEC 4b): the router's weights over all experts, and the
        contributions of the routed experts, the shared expert and the residual to ``I{layer}_{pos}``."""
        if self.moe_blocks is None:
            raise ValueError(f"layer {layer}: not a mixture-of-experts block")
        acts = self._acts(run_id, layer)
        pos = _check_pos(pos, acts["hook_resid_pre"].shape[0])
        i = layer - self.start
        parts = expert_parts(self.moe_blocks[i], acts["mlp.hook_in"][pos])
        vectors = [parts.outputs] + ([] if parts.shared is None else [parts.shared[None]])
        residual = acts["hook_resid_mid"][pos] if "hook_resid_mid" in acts else \
            acts["hook_resid_post"][pos] - acts["hook_mlp_out"][pos]
        c = part_contributions(acts["hook_resid_post"][pos], torch.cat(vectors + [residual[None]]), norm)
        k = len(parts.experts)
        return {
            "router": parts.router_probs.tolist(),
            "routed": [{"expert": e, "gate": g, "contribution": float(c[j])}
                       for j, (e, g) in enumerate(zip(parts.experts, parts.gates))],
            "shared": None if parts.shared is None else {"contribution": float(c[k])},
            "residual": float(c[-1]),
        }

    def _expert_neurons(self, acts: dict[str, torch.Tensor], i: int, pos: int, expert: int | None
                        ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``(gate, act [d_e], W_out [d_e, d])`` of a routed expert at ``pos``."""
        block = self.moe_blocks[i]
        x = acts["mlp.hook_in"][pos]
        _, experts, gates = route(block, x)  # the router alone: no expert is evaluated for this
        if expert is None:
            expert = experts[max(range(len(gates)), key=gates.__getitem__)]
        n_experts = int(block.experts.gate_up_proj.shape[0])
        expert = _check_index("expert", expert, n_experts)
        if expert not in experts:
            raise ValueError(f"expert {expert} is not routed at position {pos} (routed: {experts})")
        with torch.inference_mode():
            act = expert_activations(block, x, expert).float()
        return gates[experts.index(expert)], act, expert_down(block, expert).float()

    def _logits(self, vectors: torch.Tensor, normalize: bool) -> torch.Tensor:
        if not self.last:
            raise ValueError("only the last stage holds the final norm and unembedding")
        if vectors.dim() != 2 or vectors.shape[-1] != self.info.d_model:
            raise ValueError(f"vectors: shape {tuple(vectors.shape)} is not [n, {self.info.d_model}]")
        with torch.inference_mode():
            x = vectors.to(self.device, self.dtype)[None]
            if normalize:
                x = self.layers.final_norm(x)
            return self.layers.unembed(x)[0].float()  # soft-capped by the range where the model caps

    def rank_tokens(self, vector: torch.Tensor, previous: torch.Tensor | None = None, k: int = 10,
                    normalize: bool = True) -> TokenRanking:
        """Top-``k`` tokens of ``vector`` with their ranks, and their ranks under ``previous``
        (the predecessor's vector) when given; ranked here, on the stage holding the unembedding."""
        rows = [vector.reshape(1, -1)] + ([] if previous is None else [previous.reshape(1, -1)])
        logits = self._logits(torch.cat(rows), normalize)
        k = _check_k(k, logits.shape[-1])
        top = torch.topk(logits[0], k)
        ranks = (logits[0][None, :] > top.values[:, None]).sum(-1)
        prev = None
        if previous is not None:
            prev = (logits[1][None, :] > logits[1, top.indices][:, None]).sum(-1).tolist()
        return TokenRanking(top.indices.tolist(), top.values.tolist(), ranks.tolist(), prev)

    def extreme_tokens(self, vector: torch.Tensor, k: int = 10, normalize: bool = False) -> TokenExtremes:
        """The ``k`` most promoted and most suppressed tokens of a ``[d]`` vector."""
        logits = self._logits(vector.reshape(1, -1), normalize)[0]
        k = _check_k(k, logits.shape[-1])
        up, down = torch.topk(logits, k), torch.topk(-logits, k)
        return TokenExtremes(up.indices.tolist(), up.values.tolist(), down.indices.tolist(),
                             (-down.values).tolist())

    def parameter_bytes(self) -> int:
        """Bytes of the parameters this stage holds (its share of the model)."""
        return int(self.layers.parameter_bytes())

    def counters(self) -> dict[str, int]:
        """``recomputed_batches`` (after a candidate list overflowed), ``cached_bytes`` (activations)."""
        return {"recomputed_batches": self.recomputed_batches, "cached_bytes": self.store.n_bytes}

    def plain_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """This stage's layers without capture or contributions: ``[1, T]`` ids on the first
        stage, else the previous stage's residual; returns the residual (or logits, last stage)."""
        with torch.inference_mode():
            return self.layers.plain_forward(inputs)


def _head_contribution_maps(acts: LayerActivations, heads: list[int], norm: Norm, chunk_bytes: int) -> torch.Tensor:
    """Dense ``c_attn[heads]`` as ``[len(heads), T, T]`` (zeros above the diagonal), one pass over
    the layer's targets in chunks, whatever the number of heads."""
    n = acts.resid_pre.shape[0]
    out = torch.zeros(len(heads), n, n, dtype=torch.float32, device=acts.resid_pre.device)
    step = 64
    for t0 in range(0, n, step):
        t1 = min(n, t0 + step)
        c_attn, _, _ = attention_contributions_chunk(acts, t0, t1, norm, chunk_bytes=chunk_bytes)
        out[:, t0:t1, :t1] = c_attn[heads].float()
    return out


def _new_columns() -> dict[str, list]:
    return {k: [] for k in ("hl", "ht", "hs", "hh", "hw", "el", "et", "es", "ew", "ra", "f", "rf")}


def _row(inputs: torch.Tensor, b: int, n: int) -> torch.Tensor:
    return inputs[b, -n:].clone()


def _check_pos(pos: int | None, n: int) -> int:
    if pos is None or not 0 <= int(pos) < n:
        raise ValueError(f"position {pos} outside [0, {n - 1}]")
    return int(pos)


def _check_index(what: str, value: int | None, n: int) -> int:
    if value is None or isinstance(value, bool) or not 0 <= int(value) < n:
        raise ValueError(f"{what} {value} outside [0, {n - 1}]")
    return int(value)


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k: {k} must be an integer in [1, {n}]")
    return int(k)


def to_host(columns: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The columns as numpy arrays, moved in one device-to-host copy (one per prompt, not per column)."""
    # Widest dtypes first, so every column starts aligned in the packed buffer.
    names = sorted(columns, key=lambda k: -columns[k].element_size())
    packed = [columns[k].contiguous().reshape(-1).view(torch.uint8) for k in names]
    host = torch.cat(packed).cpu().numpy() if packed else np.empty(0, np.uint8)
    out, offset = {}, 0
    for name, part in zip(names, packed):
        col = columns[name]
        dtype = torch.empty(0, dtype=col.dtype).numpy().dtype
        out[name] = host[offset : offset + part.numel()].view(dtype).reshape(tuple(col.shape))
        offset += part.numel()
    return out


def _chunk_budget(device: torch.device) -> int:
    """Working-memory budget of the contribution chunks: cache-sized on CPU; on a GPU a share of
    the memory left once the weights are loaded (fewer, larger chunks keep it busy and sync less)."""
    if device.type != "cuda":
        return DEFAULT_CHUNK_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(max(free // 16, DEFAULT_CHUNK_BYTES * 16), 4 * 2**30))


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32  # fp32 by default, whatever the checkpoint stores
    if isinstance(dtype, torch.dtype):
        return dtype
    return TORCH_DTYPES[canonical_dtype(dtype)]

