"""``FlowGraph``: the information-flow graph of one prompt, as data.

It is the merged edge set of all stages (every number the routes need) with its typed metadata
(``TraceMeta``: tokens, prompt, model). It is saved, loaded, compared and analysed without a
model; a graph from a file and a graph just traced are the same data. The live part, detail
questions answered by the stages that traced it (SPEC section 7), is a separate small handle the
pipeline attaches: ``graph.live`` (a ``cluster.live.LiveRun``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from routescope.workers.edgeset import COLUMNS, EdgeSet
from routescope.workers.schema import TraceMeta, parse_node, predecessor

from .routes import Edges, Mode, route, threshold
from .storage import atomic_write

if TYPE_CHECKING:
    from .live import LiveRun


class DetailsUnavailableError(RuntimeError):
    """Detail queries need the live model that produced the graph."""


class FlowGraph:
    """Contributions of every layer for one prompt, with its routes; ``live`` for readings."""

    def __init__(self, edges: EdgeSet, live: "LiveRun | None" = None):
        if edges.layer_start != 0 or edges.layer_stop != edges.n_layers:
            raise ValueError("FlowGraph: the edge set must cover all layers")
        self.edges = edges
        self._live = live

    @property
    def live(self) -> "LiveRun":
        """The detail questions of the traced run; ``DetailsUnavailableError`` for a graph that
        has no live model (loaded from a file, or its pipeline was closed)."""
        if self._live is None:
            raise DetailsUnavailableError("this graph has no live model attached (loaded from a file?); "
                                          "trace the prompt again to ask detail questions")
        return self._live

    @property
    def is_live(self) -> bool:
        return self._live is not None

    @property
    def meta(self) -> TraceMeta:
        return self.edges.trace

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
        return list(self.meta.tokens or [str(i) for i in range(self.n_tokens)])

    @property
    def token_ids(self) -> list[int]:
        return list(self.meta.token_ids)

    @property
    def prompt(self) -> str | None:
        return self.meta.prompt

    @property
    def model(self) -> str:
        return self.edges.model

    def predecessor(self, node: str) -> str | None:
        """The residual node a node was built on (None for the embedding)."""
        return predecessor(node, self.parallel)

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
        if not path.exists():
            raise FileNotFoundError(f"graph file {path} does not exist")
        try:
            edges = EdgeSet.read(path)  # size checked before reading
        except FileNotFoundError:
            raise FileNotFoundError(f"graph file {path} does not exist") from None
        except ValueError as exc:  # EdgeSetError: name the file
            raise type(exc)(f"{path}: {exc}") from None
        return cls(edges)
