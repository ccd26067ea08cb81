"""``FlowGraph``: the information-flow graph of one prompt, as users hold it.

It wraps the merged edge set of all stages (every number the routes need) plus, when it came
from a live pipeline, a handle for detail queries answered by the stages (SPEC section 7).
A graph loaded from a file answers every route question but no detail question.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from routescope.workers.edgeset import COLUMNS, EdgeSet

from .routes import Edges, Mode, parse_node, residual_node, route, threshold
from .storage import atomic_write

if TYPE_CHECKING:
    from .pipeline import Pipeline


class DetailsUnavailableError(RuntimeError):
    """Detail queries need the live model that produced the graph."""


class FlowGraph:
    """Contributions of every layer for one prompt, with routes and readings of nodes."""

    def __init__(self, edges: EdgeSet, backend: "Pipeline | None" = None, run_id: str | None = None):
        if edges.layer_start != 0 or edges.layer_stop != edges.n_layers:
            raise ValueError("FlowGraph: the edge set must cover all layers")
        self.edges = edges
        self.backend = backend
        self.run_id = run_id

    # ----------------------------------------------------------------------------- facts
    @property
    def n_layers(self) -> int:
        return self.edges.n_layers

    @property
    def n_tokens(self) -> int:
        return self.edges.n_tokens

    @property
    def n_heads(self) -> int:
        return self.edges.n_heads

    @property
    def parallel(self) -> bool:
        return self.edges.parallel

    @property
    def tokens(self) -> list[str]:
        return list(self.edges.extra.get("tokens") or [str(i) for i in range(self.n_tokens)])

    @property
    def token_ids(self) -> list[int]:
        return list(self.edges.extra.get("token_ids") or [])

    @property
    def prompt(self) -> str | None:
        return self.edges.extra.get("prompt")

    @property
    def model(self) -> str:
        return self.edges.model

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.edges.extra.get("model_info") or {})

    def __repr__(self) -> str:
        return (f"FlowGraph(model={self.model!r}, tokens={self.n_tokens}, layers={self.n_layers}, "
                f"head_parts={len(self.edges.head_weight)}, norm={self.edges.norm!r}, tau_min={self.edges.tau_min})")

    # ----------------------------------------------------------------------------- routes
    def graph_edges(self, tau: float = 0.04, mode: Mode = "renormalize") -> Edges:
        """Every edge surviving ``tau`` (not only those on a route)."""
        return threshold(self.edges, tau, mode)

    def route(self, tau: float = 0.04, mode: Mode = "renormalize", targets: Iterable[int] | str | None = None) -> Edges:
        """Edges of the route(s) to the output of ``targets`` (default: last position; ``"all"``)."""
        if isinstance(targets, str):
            if targets != "all":
                raise ValueError(f"targets: {targets!r}; use positions or 'all'")
            targets = range(self.n_tokens)
        elif isinstance(targets, (int, np.integer)):
            targets = [int(targets)]
        return route(self.edges, targets, tau, mode)

    def head_parts(self, layer: int, target: int, source: int | None = None) -> list[dict[str, Any]]:
        """Stored per-head parts (``c >= tau_min``) into ``A{layer}_{target}``, largest first."""
        e = self.edges
        m = (e.head_layer == layer) & (e.head_target == target)
        if source is not None:
            m &= e.head_source == source
        order = np.argsort(-e.head_weight[m])
        return [{"source": int(s), "head": int(h), "weight": float(w)}
                for s, h, w in zip(e.head_source[m][order], e.head_head[m][order], e.head_weight[m][order])]

    # ----------------------------------------------------------------------------- export
    def to_networkx(self, tau: float = 0.04, mode: Mode = "renormalize", targets: Iterable[int] | str | None = None):
        """The route as a ``networkx.DiGraph`` (node attributes: layer, position, kind, token)."""
        import networkx as nx

        edges = self.route(tau, mode, targets)
        g = nx.DiGraph(model=self.model, tau=tau, mode=mode, prompt=self.prompt)
        src, dst = edges.node_names()
        tokens = self.tokens
        for a, b, w, k, l in zip(src, dst, edges.weight, edges.kind, edges.layer):
            for name in (a, b):
                if name not in g:
                    kind, layer, pos = parse_node(name)
                    g.add_node(name, kind=kind, layer=layer, position=pos, token=tokens[pos])
            g.add_edge(a, b, weight=float(w), kind=int(k), layer=int(l))
        return g

    def to_dict(self, tau: float | None = 0.04, mode: Mode = "renormalize",
                targets: Iterable[int] | str | None = None) -> dict[str, Any]:
        """JSON-ready: metadata, tokens and the route's edges (``tau=None``: all stored columns)."""
        out: dict[str, Any] = {
            "model": self.model, "prompt": self.prompt, "tokens": self.tokens, "token_ids": self.token_ids,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "parallel": self.parallel,
            "norm": self.edges.norm, "tau_min": self.edges.tau_min,
        }
        if tau is None:
            out["columns"] = {name: getattr(self.edges, name).tolist() for name in COLUMNS}
        else:
            out.update(tau=tau, mode=mode, edges=self.route(tau, mode, targets).records())
        return out

    def save(self, path: str | os.PathLike, **route_options: Any) -> Path:
        """Write ``.msgpack`` (the full edge set, reloadable) or ``.json`` (the route), atomically."""
        path = Path(path)
        if path.suffix == ".msgpack":
            data = self.edges.encode()
        elif path.suffix == ".json":
            data = json.dumps(self.to_dict(**route_options), indent=1).encode()
        else:
            raise ValueError(f"out: {path.name}: use a .msgpack or .json file name")
        atomic_write(path, data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FlowGraph":
        """Read a ``.msgpack`` graph written by ``save`` (validated; no details attached)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"graph file {path} does not exist")
        return cls(EdgeSet.decode(path.read_bytes()))

    # ----------------------------------------------------------------------------- details (SPEC 7)
    def _ask(self, layer: int, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.backend is None or self.run_id is None:
            raise DetailsUnavailableError("this graph has no live model attached (loaded from a file?)")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} outside [0, {self.n_layers - 1}]")
        return self.backend.ask(self.run_id, layer, method, *args, **kwargs)

    def _check_pos(self, pos: int) -> int:
        if not 0 <= int(pos) < self.n_tokens:
            raise ValueError(f"position {pos} outside [0, {self.n_tokens - 1}]")
        return int(pos)

    def node_vector(self, node: str):
        """The residual vector of ``X0_t`` / ``A{l}_t`` / ``I{l}_t``, or ``mlp_out`` for ``M{l}_t``."""
        kind, layer, pos = parse_node(node)
        self._check_pos(pos)
        if kind == "A" and self.parallel:
            raise ValueError(f"node: {node}: parallel attention+FFN blocks have no A node")
        what = {"X": "resid_pre", "A": "resid_mid", "I": "resid_post", "M": "mlp_out"}[kind]
        return self._ask(layer, "vector", what, layer, pos)

    def predecessor(self, node: str) -> str | None:
        """The residual node a residual node was built on (None for the embedding)."""
        kind, layer, pos = parse_node(node)
        if kind == "X":
            return None
        if kind == "I" and not self.parallel:
            return f"A{layer}_{pos}"
        if kind == "M":
            return f"A{layer}_{pos}" if not self.parallel else residual_node(layer, pos)
        return residual_node(layer, pos)

    def top_tokens(self, node: str, k: int = 10, normalize: bool = True) -> list[dict[str, Any]]:
        """Top-k tokens of a residual node with ranks against its predecessor (SPEC 7)."""
        import torch

        x = self.node_vector(node)
        pred = self.predecessor(node)
        vectors = [x] if pred is None else [x, self.node_vector(pred)]
        logits = self.backend.project(torch.stack(vectors), normalize)
        top = torch.topk(logits[0], k)
        out = []
        for score, tok in zip(top.values.tolist(), top.indices.tolist()):
            item = {"token": self._decode(tok), "id": tok, "score": score,
                    "rank": int((logits[0] > logits[0, tok]).sum())}
            if pred is not None:
                item["prev_rank"] = int((logits[1] > logits[1, tok]).sum())
                item["rank_change"] = item["prev_rank"] - item["rank"]
            out.append(item)
        return out

    def promoted(self, what: str, layer: int, pos: int, *, head: int | None = None, source: int | None = None,
                 neuron: int | None = None, k: int = 10, normalize: bool = False) -> dict[str, list[dict[str, Any]]]:
        """Tokens a block, head, edge or neuron promotes (largest logits) and suppresses (smallest).

        ``what``: ``attn_out`` | ``mlp_out`` | ``block`` (node minus predecessor of ``I{layer}``)
        | ``head`` | ``edge`` | ``neuron``.
        """
        import torch

        self._check_pos(pos)
        if what == "block":
            vec = self._ask(layer, "vector", "resid_post", layer, pos) - self._ask(layer, "vector", "resid_pre", layer, pos)
        else:
            vec = self._ask(layer, "vector", what, layer, pos, head=head, source=source, neuron=neuron)
        logits = self.backend.project(vec[None], normalize)[0]
        up, down = torch.topk(logits, k), torch.topk(-logits, k)
        return {
            "promoted": [{"token": self._decode(i), "id": i, "score": s} for s, i in zip(up.values.tolist(), up.indices.tolist())],
            "suppressed": [{"token": self._decode(i), "id": i, "score": -s} for s, i in zip(down.values.tolist(), down.indices.tolist())],
        }

    def head_contributions(self, layer: int, target: int, source: int | None = None) -> np.ndarray:
        """Exact ``c_attn[target, :, :]`` (``[target+1, H]``), or one edge's heads ``[H]``."""
        self._check_pos(target)
        c = self._ask(layer, "head_contributions", layer, target, norm=self.edges.norm)
        return c if source is None else c[self._check_pos(source)]

    def attention_maps(self, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pattern[head], c_attn[:, :, head])``, both ``[T, T]``."""
        return self._ask(layer, "attention_maps", layer, head, norm=self.edges.norm)

    def neurons(self, layer: int, pos: int, k: int = 20) -> list[dict[str, float]]:
        """Neurons of ``M{layer}_{pos}`` ranked by contribution."""
        return self._ask(layer, "neurons", layer, self._check_pos(pos), k, norm=self.edges.norm)

    def prediction(self, pos: int | None = None, k: int = 5) -> list[dict[str, Any]]:
        """The model's top-k next tokens after position ``pos`` (default the last)."""
        pos = self.n_tokens - 1 if pos is None else self._check_pos(pos)
        return self.top_tokens(f"I{self.n_layers - 1}_{pos}", k=k, normalize=True)

    def _decode(self, token_id: int) -> str:
        return self.backend.tokenizer.decode([token_id])
