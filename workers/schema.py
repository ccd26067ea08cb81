"""The project's shared vocabulary, defined once: every module imports these names from here.

* Defaults and choices: ``DEFAULT_MODEL``, ``DEFAULT_TAU_MIN``, ``NORMS``, ``MODES``, ``DTYPES``.
* Nodes and edge kinds of the flow graph (SPEC section 5): ``X0_t``, ``A{l}_t``, ``M{l}_t``,
  ``I{l}_t``; kinds ``ATTN, RES_ATTN, FFN_IN, FFN_OUT, RES_FFN``. ``Node`` is the typed form of a
  node name, ``parse_node`` / ``Node.name`` convert.
* ``ModelInfo``: what the coordinator and the viewer know about a model.
* ``TraceMeta``: the validated, versioned metadata an edge set carries (tokens, prompt, model,
  job data), replacing the untyped ``extra`` dict of wire version 1.

This module is the bottom layer: it imports nothing of the project and nothing heavy.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TAU_MIN = 0.01

Norm = Literal["l1", "l2"]
Mode = Literal["renormalize", "plain"]
NORMS: tuple[str, ...] = ("l1", "l2")
MODES: tuple[str, ...] = ("renormalize", "plain")
# Precisions a stage computes in (names users type; aliases map to the same torch dtype).
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Edge kinds (SPEC section 5).
ATTN, RES_ATTN, FFN_IN, FFN_OUT, RES_FFN = range(5)
KIND_NAMES: tuple[str, ...] = ("attn", "res_attn", "ffn_in", "ffn_out", "res_ffn")
NODE_KINDS: tuple[str, ...] = ("X", "A", "M", "I")  # integer node kinds index this


def check_choice(what: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming both."""
    if value not in choices:
        raise ValueError(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return value


def canonical_dtype(dtype: str | None) -> str | None:
    """``"fp16"`` -> ``"float16"``; None stays None (the stage's default, float32)."""
    if dtype is None:
        return None
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    return check_choice("dtype", dtype, DTYPES)


# ================================================================================= nodes
@dataclass(frozen=True)
class Node:
    """A node of the flow graph: ``kind`` X (embedding), A (after attention), M (FFN block) or
    I (after the layer), at ``layer`` and token position ``pos``."""

    kind: str
    layer: int
    pos: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.layer}_{self.pos}"

    def __str__(self) -> str:
        return self.name


def parse_node(name: str) -> tuple[str, int, int]:
    """``"A4_5"`` -> ``("A", 4, 5)``; raises ``ValueError`` naming the problem."""
    m = re.fullmatch(r"([XAMI])(\d+)_(\d+)", name.strip()) if isinstance(name, str) else None
    if not m:
        raise ValueError(f"node: {name!r} is not a node name like X0_3, A4_5, M4_5 or I4_5")
    kind, layer, pos = m.group(1), int(m.group(2)), int(m.group(3))
    if kind == "X" and layer != 0:
        raise ValueError(f"node: {name!r}: the embedding node is X0_<pos>")
    return kind, layer, pos


def as_node(node: "str | Node") -> Node:
    """A ``Node`` from a node name or a ``Node``."""
    return node if isinstance(node, Node) else Node(*parse_node(node))


def residual_node(layer: int, pos: int) -> str:
    """The residual entering layer ``layer`` at ``pos``: ``X0_pos`` or ``I{layer-1}_pos``."""
    return f"X0_{pos}" if layer == 0 else f"I{layer - 1}_{pos}"


# Node kinds as integers (index into NODE_KINDS), for columns of nodes.
X_NODE, A_NODE, M_NODE, I_NODE = range(4)


def source_nodes(kind: Any, layer: Any, parallel: bool) -> tuple[Any, Any]:
    """``(node kind, node layer)`` columns of the nodes edges of ``kind`` in ``layer`` leave from
    (the position is the edge's source position). The rules of SPEC 5, once, on integer arrays."""
    import numpy as np

    kind, layer = np.asarray(kind, np.int64), np.asarray(layer, np.int64)
    from_residual = (kind == ATTN) | (kind == RES_ATTN) | ((kind == FFN_IN) & parallel)
    code = np.where(kind == FFN_OUT, M_NODE, A_NODE)  # FFN_IN and RES_FFN of sequential blocks leave A
    code = np.where(from_residual, np.where(layer == 0, X_NODE, I_NODE), code)
    node_layer = np.where(from_residual & (layer > 0), layer - 1, layer)
    return code, node_layer


def target_nodes(kind: Any, layer: Any, parallel: bool) -> tuple[Any, Any]:
    """``(node kind, node layer)`` columns of the nodes edges of ``kind`` in ``layer`` arrive at."""
    import numpy as np

    kind, layer = np.asarray(kind, np.int64), np.asarray(layer, np.int64)
    attn = (kind == ATTN) | (kind == RES_ATTN)
    code = np.where(attn, I_NODE if parallel else A_NODE, np.where(kind == FFN_IN, M_NODE, I_NODE))
    return code, layer


def node_names(code: Any, layer: Any, pos: Any) -> list[str]:
    """Names of integer node columns, e.g. ``(A_NODE, 4, 5)`` -> ``"A4_5"``."""
    return [f"{NODE_KINDS[c]}{l}_{p}" for c, l, p in zip(code.tolist(), layer.tolist(), pos.tolist())]


def source_node(kind: int, layer: int, pos: int, parallel: bool) -> str:
    """The node an edge of ``kind`` in ``layer`` leaves from, at ``pos``."""
    code, node_layer = source_nodes([kind], [layer], parallel)
    return f"{NODE_KINDS[int(code[0])]}{int(node_layer[0])}_{pos}"


def target_node(kind: int, layer: int, pos: int, parallel: bool) -> str:
    """The node an edge of ``kind`` in ``layer`` arrives at, at ``pos``."""
    code, node_layer = target_nodes([kind], [layer], parallel)
    return f"{NODE_KINDS[int(code[0])]}{int(node_layer[0])}_{pos}"


def predecessor(node: "str | Node", parallel: bool) -> str | None:
    """The residual node a node was built on (None for the embedding)."""
    n = as_node(node)
    if n.kind == "X":
        return None
    if n.kind in ("I", "M") and not parallel:
        return f"A{n.layer}_{n.pos}"
    return residual_node(n.layer, n.pos)


# ================================================================================= model info
@dataclass(frozen=True)
class ModelFacts:
    """Sizes of a model, as a ``LayerRange`` of a model adapter holds them (the same on every range).

    ``architecture``: a name for messages and the viewer (e.g. the class name); ``n_heads`` query
    heads, ``n_kv_heads`` key/value heads (``n_heads`` without grouped-query attention),
    ``d_model`` residual width, ``d_head`` head width, ``d_ff`` FFN width (rows of ``W_out``),
    ``d_vocab`` vocabulary, ``n_ctx`` longest prompt in tokens, ``parallel``: attention and FFN
    read the same input (GPT-J / NeoX blocks, no ``hook_resid_mid``)."""

    architecture: str
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_ff: int
    d_vocab: int
    n_ctx: int
    parallel: bool = False


@dataclass(frozen=True, kw_only=True)
class ModelInfo(ModelFacts):
    """What the viewer and the coordinator need to know about a model: its sizes, name, layer
    count and parameter count."""

    name: str
    n_layers: int
    n_params: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelInfo":
        """Validated: every field present with its type (``MetaError`` otherwise)."""
        if not isinstance(data, dict):
            raise MetaError(f"model_info must be a map, got {type(data).__name__}")
        out = {}
        for f in fields(cls):
            v = data.get(f.name)
            want = str if f.type == "str" else bool if f.type == "bool" else int
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise MetaError(f"model_info.{f.name} must be {want.__name__}, got {type(v).__name__}")
            out[f.name] = v
        return cls(**out)


# ================================================================================= trace metadata
META_VERSION = 2
MAX_META_ITEMS = 1 << 20  # list lengths (tokens); the edge set's own token limit
MAX_META_DEPTH = 6
MAX_TEXT = 1 << 20  # characters of one string (a prompt)
MAX_META_MAP = 4096  # entries of one map
# Totals over the whole metadata (every list item and map entry, every character of text):
# three token columns of the largest prompt plus route summaries of every position fit.
MAX_META_TOTAL_ITEMS = 1 << 23
MAX_META_TOTAL_TEXT = 1 << 26


class MetaError(ValueError):
    """Trace metadata that does not follow the schema."""


@dataclass(frozen=True)
class JobMeta:
    """Where a traced prompt came from in a dataset job."""

    index: int
    line: int
    positions: str
    job_id: str


@dataclass
class TraceMeta:
    """Metadata of one traced prompt, carried with its edge set (wire version 2, ``"trace"``).

    ``tokens`` are the decoded token texts, ``raw_tokens`` the tokenizer's own pieces.
    ``prediction``: the model's top next tokens after the last position (``token``, ``id``,
    ``score``), when known. ``summary`` and ``attention`` are a dataset job's per-prompt route
    summary and attention sums (maps of numbers and lists, see ``cluster.stats``).
    """

    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    raw_tokens: list[str] = field(default_factory=list)
    model_info: ModelInfo | None = None
    prediction: list[dict[str, Any]] | None = None
    job: JobMeta | None = None
    summary: dict[str, Any] | None = None
    attention: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain msgpack/JSON-ready values (absent fields omitted)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or (isinstance(v, list) and not v and f.name != "prediction"):
                continue
            if isinstance(v, (ModelInfo, JobMeta)):
                v = asdict(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Any, n_tokens: int | None = None) -> "TraceMeta":
        """Validate a decoded map (wire version 2, or a version-1 ``extra``); ``MetaError`` names
        the first problem. Unknown keys are refused: a newer writer's file is not half-read."""
        if not isinstance(data, dict):
            raise MetaError(f"trace metadata must be a map, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MetaError(f"trace metadata: unknown field(s) {', '.join(map(repr, unknown[:5]))}")
        _check_plain(data, "trace", 0, [0, 0])
        prompt = data.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise MetaError(f"trace.prompt must be text, got {type(prompt).__name__}")
        ids = _list_of(data, "token_ids", int)
        tokens = _list_of(data, "tokens", str)
        raw = _list_of(data, "raw_tokens", str)
        if n_tokens is not None:
            for name, col in (("token_ids", ids), ("tokens", tokens), ("raw_tokens", raw)):
                if col and len(col) != n_tokens:
                    raise MetaError(f"trace.{name}: {len(col)} entries for {n_tokens} tokens")
        info = data.get("model_info")
        pred = data.get("prediction")
        if pred is not None:
            if not isinstance(pred, list) or not all(
                    isinstance(p, dict) and isinstance(p.get("token"), str) and isinstance(p.get("id"), int)
                    and isinstance(p.get("score"), (int, float)) for p in pred):
                raise MetaError("trace.prediction must be a list of {token, id, score}")
        job = data.get("job")
        if job is not None:
            if not isinstance(job, dict) or set(job) != {"index", "line", "positions", "job_id"}:
                raise MetaError("trace.job must be a map of index, line, positions and job_id")
            if not all(isinstance(job[k], int) and not isinstance(job[k], bool) for k in ("index", "line")) \
                    or not isinstance(job["positions"], str) or not isinstance(job["job_id"], str):
                raise MetaError("trace.job: index and line are integers, positions and job_id text")
            job = JobMeta(**job)
        for name in ("summary", "attention"):
            if data.get(name) is not None and not isinstance(data[name], dict):
                raise MetaError(f"trace.{name} must be a map")
        return cls(prompt=prompt, token_ids=ids, tokens=tokens, raw_tokens=raw,
                   model_info=None if info is None else ModelInfo.from_dict(info), prediction=pred, job=job,
                   summary=data.get("summary"), attention=data.get("attention"))


def _list_of(data: dict[str, Any], key: str, typ: type) -> list:
    v = data.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, typ) and not isinstance(x, bool) for x in v):
        raise MetaError(f"trace.{key} must be a list of {typ.__name__}")
    return list(v)


def _check_plain(value: Any, where: str, depth: int, total: list[int]) -> None:
    """Only maps with text keys, lists, text, numbers, booleans and None, to a bounded depth, with
    bounded sizes: per map, list and text, and in total (``total``: [items, characters] so far)."""
    if depth > MAX_META_DEPTH:
        raise MetaError(f"{where}: nested deeper than {MAX_META_DEPTH} levels")
    if isinstance(value, dict):
        if len(value) > MAX_META_MAP:
            raise MetaError(f"{where}: map of {len(value)} entries")
        _count(total, where, len(value), 0)
        for k, v in value.items():
            if not isinstance(k, str):
                raise MetaError(f"{where}: keys must be text")
            _count(total, where, 0, len(k))
            _check_plain(v, f"{where}.{k}", depth + 1, total)
    elif isinstance(value, list):
        if len(value) > MAX_META_ITEMS:
            raise MetaError(f"{where}: list of {len(value)} entries")
        _count(total, where, len(value), 0)
        if value and all(isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in value[:64]):
            # Flat lists (tokens, ids, numbers): one pass without a call per scalar item.
            chars = 0
            for x in value:
                t = type(x)
                if t is str:
                    if len(x) > MAX_TEXT:
                        raise MetaError(f"{where}[]: text of {len(x)} characters")
                    chars += len(x)
                elif not (t is int or t is float or t is bool):
                    _check_plain(x, f"{where}[]", depth + 1, total)
            _count(total, where, 0, chars)
            return
        for x in value:
            _check_plain(x, f"{where}[]", depth + 1, total)
    elif isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise MetaError(f"{where}: text of {len(value)} characters")
        _count(total, where, 0, len(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise MetaError(f"{where}: not a finite number")
    elif not (value is None or isinstance(value, (bool, int))):
        raise MetaError(f"{where}: {type(value).__name__} is not allowed in metadata")


def _count(total: list[int], where: str, items: int, chars: int) -> None:
    total[0] += items
    total[1] += chars
    if total[0] > MAX_META_TOTAL_ITEMS:
        raise MetaError(f"{where}: metadata holds over {MAX_META_TOTAL_ITEMS} items in all")
    if total[1] > MAX_META_TOTAL_TEXT:
        raise MetaError(f"{where}: metadata holds over {MAX_META_TOTAL_TEXT} characters of text in all")
