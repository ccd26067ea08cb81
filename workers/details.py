"""The detail questions a stage answers about a traced run (SPEC section 7), as one typed interface.

``StageDetails`` is the whole of it: every method a coordinator may call on a stage besides the
forward pass. The Ray actor and the in-process client both accept exactly ``DETAIL_METHODS``,
derived from this protocol, and refuse anything else by name. Questions and answers are small,
typed values: a ``Component`` says which vector is meant, ``TokenRanking`` and ``TokenExtremes``
carry ids, scores and ranks (never a vocabulary-sized row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

import numpy as np

from .schema import Node, Norm

ComponentKind = Literal["attn_out", "mlp_out", "block", "head", "edge", "neuron"]
COMPONENT_KINDS: tuple[str, ...] = ("attn_out", "mlp_out", "block", "head", "edge", "neuron")


@dataclass(frozen=True)
class Component:
    """A vector written into the residual stream at ``(layer, pos)``.

    ``attn_out`` / ``mlp_out``: the block's output; ``block``: everything layer ``layer`` added
    (``I{l}`` minus its input); ``head``: one head's output (``head`` required); ``edge``: the
    part from ``source`` through ``head`` (None: all heads); ``neuron``: activation times its
    ``W_out`` row (``neuron`` required).
    """

    kind: ComponentKind
    layer: int
    pos: int
    head: int | None = None
    source: int | None = None
    neuron: int | None = None
    expert: int | None = None  # MoE blocks: the routed expert a neuron belongs to (None: largest gate)

    def __post_init__(self) -> None:
        if self.kind not in COMPONENT_KINDS:
            raise ValueError(f"component: {self.kind!r} is not one of {', '.join(COMPONENT_KINDS)}")
        if self.kind == "head" and self.head is None:
            raise ValueError("component: a head's vector needs head=")
        if self.kind == "edge" and self.source is None:
            raise ValueError("component: an edge's vector needs source=")
        if self.kind == "neuron" and self.neuron is None:
            raise ValueError("component: a neuron's vector needs neuron=")


@dataclass(frozen=True)
class TokenRanking:
    """The top ``k`` tokens of a vector: ids, scores (logits) and ranks (0 = best); with
    ``prev_ranks``, the ranks of the same ids under the predecessor's vector."""

    ids: list[int]
    scores: list[float]
    ranks: list[int]
    prev_ranks: list[int] | None = None


@dataclass(frozen=True)
class TokenExtremes:
    """The tokens a vector promotes most (largest logits) and suppresses most (smallest)."""

    promoted_ids: list[int]
    promoted_scores: list[float]
    suppressed_ids: list[int]
    suppressed_scores: list[float]


class StageDetails(Protocol):
    """What a stage answers about a run it traced (``run_id``), besides the forward pass."""

    def node_vectors(self, run_id: str, nodes: Sequence[Node]) -> Any:
        """``[n, d]`` float32 vectors of residual nodes (``X``/``A``/``I``; ``M`` = FFN output)."""

    def component_vector(self, run_id: str, component: Component) -> Any:
        """The ``[d]`` float32 vector of one component (see ``Component``)."""

    def rank_tokens(self, vector: Any, previous: Any, k: int, normalize: bool) -> TokenRanking:
        """Top-``k`` tokens of a ``[d]`` vector, ranks also under ``previous`` if given (last stage)."""

    def extreme_tokens(self, vector: Any, k: int, normalize: bool) -> TokenExtremes:
        """The ``k`` most promoted and most suppressed tokens of a ``[d]`` vector (last stage)."""

    def head_contributions(self, run_id: str, layer: int, target: int, norm: Norm) -> np.ndarray:
        """``c_attn[target, :target+1, :]`` as ``[target+1, H]``."""

    def attention_maps(self, run_id: str, layer: int, heads: Sequence[int], norm: Norm
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Patterns and contribution maps of ``heads`` of one layer, both ``[len(heads), T, T]``."""

    def attention_patterns(self, run_id: str, layer: int) -> np.ndarray:
        """Every head's attention pattern of one layer, ``[H, T, T]``."""

    def neurons(self, run_id: str, layer: int, pos: int, k: int, norm: Norm, expert: int | None
                ) -> list[dict[str, float]]:
        """The ``k`` FFN neurons of ``(layer, pos)`` with the largest contributions (MoE: of ``expert``)."""

    def experts(self, run_id: str, layer: int, pos: int, norm: Norm) -> dict[str, Any]:
        """An MoE block at ``(layer, pos)``: router weights, routed/shared experts' contributions."""

    def has_run(self, run_id: str) -> bool:
        """Whether the run's activations are still cached here."""

    def drop_runs(self, run_ids: Sequence[str]) -> None:
        """Forget cached runs (the coordinator no longer records them)."""

    def parameter_bytes(self) -> int:
        """Bytes of the parameters this stage holds."""

    def counters(self) -> dict[str, int]:
        """Work counters (e.g. ``recomputed_batches``) for benchmarks."""

    def plain_forward(self, inputs: Any) -> Any:
        """The stage's layers without capture or contributions (the benchmarks' baseline)."""


DETAIL_METHODS: frozenset[str] = frozenset(
    name for name, value in vars(StageDetails).items() if callable(value) and not name.startswith("_"))


def check_detail_method(name: str) -> str:
    """``name`` if it is a detail method, else a ``ValueError`` listing those that are."""
    if name not in DETAIL_METHODS:
        raise ValueError(f"stage method {name!r} is not one of {', '.join(sorted(DETAIL_METHODS))}")
    return name
