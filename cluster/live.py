"""``LiveRun``: the live part of a traced prompt, answering detail questions (SPEC section 7).

A ``FlowGraph`` is data; the pipeline that traced it hands out one small ``LiveRun`` per prompt
(``graph.live``). Each question goes to the stage that owns the layer, through the typed stage
interface (``stage_clients.StageClient``); vocabulary readings are ranked on the last stage, which
holds the unembedding, so only ids, scores and ranks come back. With Ray stages the vector itself
goes from its stage to the last one through the object store, not through this process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import numpy as np

from routescope.workers.details import Component, TokenExtremes
from routescope.workers.schema import Node, Norm, as_node, predecessor

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .stage_clients import StageClient

T = TypeVar("T")


class LiveRun:
    """Detail questions about one traced prompt, answered by the stages that traced it."""

    def __init__(self, pipeline: "Pipeline", run_id: str, *, n_tokens: int, n_layers: int, n_heads: int,
                 parallel: bool, norm: Norm):
        self._pipeline = pipeline
        self.run_id = run_id
        self.n_tokens, self.n_layers, self.n_heads = n_tokens, n_layers, n_heads
        self.parallel, self.norm = parallel, norm

    def __repr__(self) -> str:
        return f"LiveRun(run_id={self.run_id!r}, tokens={self.n_tokens}, layers={self.n_layers})"

    # ----------------------------------------------------------------------------- checks
    def _ask(self, fn: Callable[[], T]) -> T:
        return self._pipeline.ask(self.run_id, fn)

    def _owner(self, layer: int) -> "StageClient":
        return self._pipeline.owner(self._layer(layer))

    def _layer(self, layer: int) -> int:
        return _index("layer", layer, self.n_layers)

    def _pos(self, pos: int) -> int:
        return _index("position", pos, self.n_tokens)

    def _node(self, node: str | Node) -> Node:
        n = as_node(node)
        self._layer(n.layer)
        self._pos(n.pos)
        if n.kind == "A" and self.parallel:
            raise ValueError(f"node: {n.name}: parallel attention+FFN blocks have no A node")
        return n

    def _decode(self, token_id: int) -> str:
        return self._pipeline.tokenizer.decode([token_id])

    # ----------------------------------------------------------------------------- vectors
    def node_vector(self, node: str | Node):
        """The ``[d]`` vector of ``X0_t`` / ``A{l}_t`` / ``I{l}_t``, or the FFN output for ``M{l}_t``."""
        n = self._node(node)
        return self._ask(lambda: self._owner(n.layer).node_vectors(self.run_id, [n])[0])

    def component_vector(self, component: Component):
        """The ``[d]`` vector of a block, head, edge or neuron (``details.Component``)."""
        self._layer(component.layer)
        self._pos(component.pos)
        return self._ask(lambda: self._owner(component.layer).component_vector(self.run_id, component))

    # ----------------------------------------------------------------------------- readings
    def top_tokens(self, node: str | Node, k: int = 10, normalize: bool = True) -> list[dict[str, Any]]:
        """Top-``k`` tokens of a residual node with rank changes against its predecessor (SPEC 7)."""
        n = self._node(node)
        prev = predecessor(n, self.parallel)
        prev_node = None if prev is None else as_node(prev)

        def ask():
            vec = self._owner(n.layer).node_vectors(self.run_id, [n], lazy=True)
            before = None if prev_node is None else \
                self._owner(prev_node.layer).node_vectors(self.run_id, [prev_node], lazy=True)
            return self._pipeline.last.rank_tokens(vec, before, k, normalize)

        r = self._ask(ask)
        out = []
        for i, (tok, score, rank) in enumerate(zip(r.ids, r.scores, r.ranks)):
            item: dict[str, Any] = {"token": self._decode(tok), "id": tok, "score": score, "rank": rank}
            if r.prev_ranks is not None:
                item["prev_rank"] = r.prev_ranks[i]
                item["rank_change"] = r.prev_ranks[i] - rank
            out.append(item)
        return out

    def promoted(self, what: str, layer: int, pos: int, *, head: int | None = None, source: int | None = None,
                 neuron: int | None = None, expert: int | None = None, k: int = 10,
                 normalize: bool = False) -> dict[str, list[dict[str, Any]]]:
        """Tokens a block, head, edge or neuron promotes (largest logits) and suppresses (smallest).

        ``what``: ``attn_out`` | ``mlp_out`` | ``block`` (everything layer ``layer`` added) |
        ``head`` | ``edge`` | ``neuron`` (see ``details.Component``).
        """
        comp = Component(what, self._layer(layer), self._pos(pos), head=head, source=source, neuron=neuron,
                         expert=expert)

        def ask() -> TokenExtremes:
            vec = self._owner(comp.layer).component_vector(self.run_id, comp, lazy=True)
            return self._pipeline.last.extreme_tokens(vec, k, normalize)

        r = self._ask(ask)
        return {
            "promoted": [{"token": self._decode(i), "id": i, "score": s} for i, s in zip(r.promoted_ids, r.promoted_scores)],
            "suppressed": [{"token": self._decode(i), "id": i, "score": s}
                           for i, s in zip(r.suppressed_ids, r.suppressed_scores)],
        }

    def prediction(self, pos: int | None = None, k: int = 5) -> list[dict[str, Any]]:
        """The model's top-``k`` next tokens after position ``pos`` (default the last)."""
        pos = self.n_tokens - 1 if pos is None else self._pos(pos)
        return self.top_tokens(Node("I", self.n_layers - 1, pos), k=k, normalize=True)

    # ----------------------------------------------------------------------------- contributions
    def head_contributions(self, layer: int, target: int, source: int | None = None) -> np.ndarray:
        """Exact ``c_attn[target, :, :]`` (``[target+1, H]``), or one edge's heads ``[H]``."""
        layer, target = self._layer(layer), self._pos(target)
        c = self._ask(lambda: self._owner(layer).head_contributions(self.run_id, layer, target, self.norm))
        if source is None:
            return c
        return c[_index("source", source, target + 1, "a source precedes its target")]

    def attention_maps(self, layer: int, heads: int | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Attention patterns and contribution maps of one layer's ``heads``, computed in one pass
        on their stage: ``[T, T]`` each for one head (an int), ``[n, T, T]`` for a list, all heads
        for None."""
        layer = self._layer(layer)
        one = isinstance(heads, (int, np.integer)) and not isinstance(heads, bool)
        wanted = [int(heads)] if one else list(range(self.n_heads)) if heads is None else [int(h) for h in heads]
        pat, con = self._ask(lambda: self._owner(layer).attention_maps(self.run_id, layer, wanted, self.norm))
        return (pat[0], con[0]) if one else (pat, con)

    def attention_patterns(self, layer: int) -> np.ndarray:
        """Every head's attention pattern of one layer, ``[H, T, T]``."""
        layer = self._layer(layer)
        return self._ask(lambda: self._owner(layer).attention_patterns(self.run_id, layer))

    def neurons(self, layer: int, pos: int, k: int = 20, expert: int | None = None) -> list[dict[str, float]]:
        """Neurons of ``M{layer}_{pos}`` ranked by contribution (MoE blocks: of routed ``expert``,
        default the one with the largest gate)."""
        layer, pos = self._layer(layer), self._pos(pos)
        return self._ask(lambda: self._owner(layer).neurons(self.run_id, layer, pos, k, self.norm, expert))

    def experts(self, layer: int, pos: int) -> dict[str, Any]:
        """An MoE block ``M{layer}_{pos}`` (SPEC 4b): ``router`` (weights over all experts),
        ``routed`` (expert, gate, contribution), ``shared`` and ``residual`` contributions to
        ``I{layer}_{pos}``; answered by the stage that holds the layer."""
        layer, pos = self._layer(layer), self._pos(pos)
        return self._ask(lambda: self._owner(layer).experts(self.run_id, layer, pos, self.norm))


def _index(what: str, value: Any, n: int, why: str = "") -> int:
    """``value`` as an int in ``[0, n)``, else a ``ValueError`` naming it (booleans are not indices)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise ValueError(f"{what} {value} outside [0, {n - 1}]" + (f" ({why})" if why else ""))
    return int(value)
