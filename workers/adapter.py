"""Your own model in routescope: the model side of a stage as a small public protocol.

A stage (``workers.stage.Stage``) needs, per layer, a handful of activations and two weight
tensors; everything else it computes itself (contributions, edge sets, the activation cache, the
typed detail answers, the load-time probe of ``workers.support``). Two protocols say what it needs:

* ``ModelAdapter``: the model as a whole. ``name``, ``n_layers``, ``tokenizer``, and
  ``build(start, stop, device, dtype)``, which loads layers ``[start, stop)`` and returns them as a
  ``LayerRange``. Building an adapter should be cheap (read a config, not the weights): the
  coordinator builds one to learn ``n_layers`` and to tokenise, and every stage builds its own.
* ``LayerRange``: layers ``[start, stop)`` as their own object, holding only those layers' weights
  (plus the embedding on the first range, the final norm and unembedding on the last). Its
  ``forward`` calls back once per layer with that layer's activations under the stage's hook names
  (``HOOKS``, the TransformerLens names of SPEC sections 1-4), and it offers ``W_O``, ``W_out``,
  ``final_norm``, ``unembed``, ``facts``, ``parameter_bytes``, ``parameter_count`` and
  ``plain_forward``.

The default adapter is ``workers.bridge_adapter.BridgeAdapter`` (a Hugging Face checkpoint read
through TransformerLens' ``TransformerBridge``). Two extensions stay specific to it for now and are
not part of this protocol: norms inside blocks (SPEC 4a: Gemma-2/3, OLMo-2; a range's
``block_norms`` and the ``attn.norm_in`` / ``mlp.norm_in`` activations) and mixture-of-experts FFN
blocks (SPEC 4b; ``moe_blocks`` and ``mlp.hook_in``). A user adapter describes pre-norm blocks with a
dense FFN (sequential or parallel attention+FFN).

Selection: ``resolve_adapter`` turns ``adapter=`` (a dotted path ``module.path:factory`` or
``module.path.ClassName``, a callable, or an adapter object) into a ``ModelAdapter``; ``None`` is
the default bridge adapter. See ``docs/adapters.md`` for shapes, a minimal example, and how to
select an adapter from the API, the CLI and the viewer config.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from .schema import ModelFacts  # part of the protocol; defined with ModelInfo, which extends it

# Per-layer activation names a LayerRange reports (on_layer's dict keys), with their shapes for a
# batch of B prompts of T (left-padded) positions. hook_resid_mid is absent for parallel blocks.
HOOKS: tuple[str, ...] = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_v", "attn.hook_pattern",
                          "hook_attn_out", "hook_mlp_out", "mlp.hook_post")
HOOK_SHAPES: dict[str, str] = {
    "hook_resid_pre": "[B, T, d]", "hook_resid_mid": "[B, T, d]", "hook_resid_post": "[B, T, d]",
    "attn.hook_v": "[B, T, H_kv, d_head]", "attn.hook_pattern": "[B, H, T, T]", "hook_attn_out": "[B, T, d]",
    "hook_mlp_out": "[B, T, d]", "mlp.hook_post": "[B, T, d_ff]",
}

OnLayer = Callable[[int, "dict[str, torch.Tensor]"], None]


class AdapterError(ValueError):
    """An ``adapter=`` selection that names no usable model adapter (one line, says why)."""


@runtime_checkable
class LayerRange(Protocol):
    """Layers ``[start, stop)`` of a model, holding only their weights (see the module docstring).

    Tensors are in the dtype and on the device ``build`` was given. ``n = stop - start``; layer
    indices passed to ``on_layer`` are local, ``0 .. n-1``.
    """

    facts: ModelFacts
    W_O: torch.Tensor    # [n, H, d_head, d]: attention output projection, per head
    W_out: torch.Tensor  # [n, d_ff, d]: FFN output projection (rows are neurons)

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                on_layer: OnLayer) -> torch.Tensor:
        """Run the range on a left-padded batch.

        ``inputs``: ``[B, T]`` token ids (long) on the first range, else ``[B, T, d]``, the residual
        the previous range returned. ``attention_mask``: ``[B, T]`` long, 1 on prompt positions, 0 on
        the left padding. ``position_ids``: ``[B, T]`` long, 0 at each prompt's first token.

        After each layer ``i`` completes, call ``on_layer(i, acts)`` with that layer's activations
        (``HOOKS`` -> tensors of ``HOOK_SHAPES``): ``hook_resid_pre`` the layer's input,
        ``hook_resid_mid`` = pre + attention output (sequential blocks only), ``hook_resid_post``
        the layer's output, ``attn.hook_v`` the values per key/value head **including** ``b_V``,
        ``attn.hook_pattern`` the attention probabilities (rows sum to 1 over unmasked sources),
        ``hook_attn_out`` the attention output (all heads through ``W_O``, plus ``b_O``),
        ``hook_mlp_out`` the FFN output, ``mlp.hook_post`` the FFN activations that multiply
        ``W_out`` (``act(gate) * up`` for gated FFNs). They must add up as SPEC 3-4 say:
        ``attn_out = sum_{s,h} pattern[h,t,s] v[s,kv(h)] @ W_O[h] + b_O``,
        ``mlp_out = mlp_post @ W_out + b_out``, ``mid = pre + attn_out``, ``post = mid + mlp_out``
        (parallel: ``post = pre + attn_out + mlp_out``); the stage checks this on a probe at load.

        Returns the residual after the range's last layer, ``[B, T, d]`` (before the final norm).
        """

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final norm of ``[..., d]`` residual vectors (last range only)."""

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., d_vocab]`` of ``[..., d]`` (already normalised) vectors, as the model reads
        them (soft-capping included; last range only)."""

    def parameter_bytes(self) -> int:
        """Bytes of the parameters this range holds."""

    def parameter_count(self) -> int:
        """Number of parameters this range holds (the pipeline reports their sum over ranges)."""

    def plain_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The range without any capture: ``[1, T]`` ids on the first range, else a residual;
        returns the residual after its last layer, or the logits on the last range (benchmarks'
        baseline)."""


@runtime_checkable
class ModelAdapter(Protocol):
    """A model routescope can trace: what a user implements for a model of their own."""

    name: str       # the model's name in graphs, results and the viewer
    n_layers: int   # transformer layers in all
    tokenizer: Any  # __call__(text, add_special_tokens=False) -> {"input_ids": [...]}, decode(ids),
    #                 convert_ids_to_tokens(ids), bos_token_id, pad_token_id

    def build(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> LayerRange:
        """Load layers ``[start, stop)`` (embedding if ``start == 0``, final norm and unembedding if
        ``stop == n_layers``) onto ``device`` in ``dtype``. May be called several times on one
        adapter (one range per in-process stage); each call returns a range of its own."""


_ADAPTER_MEMBERS = ("name", "n_layers", "tokenizer", "build")
_RANGE_MEMBERS = ("facts", "W_O", "W_out", "forward", "final_norm", "unembed", "parameter_bytes",
                  "parameter_count", "plain_forward")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def adapter_label(adapter: Any) -> str | None:
    """A hashable, printable name of an ``adapter=`` selection (cache keys, CLI arguments)."""
    if adapter is None or isinstance(adapter, str):
        return adapter
    qual = getattr(adapter, "__qualname__", None) or type(adapter).__qualname__
    mod = getattr(adapter, "__module__", None) or type(adapter).__module__
    return f"{mod}:{qual}" if isinstance(adapter, (type,)) or inspect.isroutine(adapter) else f"{mod}:{qual}@{id(adapter):x}"


def import_object(path: str) -> Any:
    """The object a dotted path names: ``module.path:attr`` (attr may be dotted) or
    ``module.path.attr``; ``AdapterError`` with a one-line reason otherwise."""
    where = f"adapter {path!r}"
    if not isinstance(path, str) or not path.strip():
        raise AdapterError(f"adapter: {path!r} is not a dotted path (module.path:factory or module.path.ClassName)")
    path = path.strip()
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not module or not attr or not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(attr):
        raise AdapterError(f"{where}: not a dotted path (module.path:factory or module.path.ClassName)")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise AdapterError(f"{where}: module {module!r} not found (is it installed, or on PYTHONPATH?)") from None
        raise AdapterError(f"{where}: importing module {module!r} failed: {exc}") from None
    except Exception as exc:  # the module itself raised while importing
        first = (str(exc).splitlines() or [""])[0][:200]
        raise AdapterError(f"{where}: importing module {module!r} failed: {type(exc).__name__}: {first}") from None
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = module if i == 0 else f"{module}:{'.'.join(attr.split('.')[:i])}"
            raise AdapterError(f"{where}: {owner!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def is_adapter(obj: Any) -> bool:
    return not isinstance(obj, type) and all(hasattr(obj, m) for m in _ADAPTER_MEMBERS) and callable(obj.build)


def check_adapter(obj: Any, where: str) -> Any:
    """``obj`` if it has the members of ``ModelAdapter`` with sensible values, else ``AdapterError``."""
    missing = [m for m in _ADAPTER_MEMBERS if not hasattr(obj, m)]
    if missing or not callable(getattr(obj, "build", None)):
        raise AdapterError(f"{where}: {type(obj).__name__} is not a model adapter (it lacks "
                           f"{', '.join(missing) or 'a callable build'}; see docs/adapters.md)")
    n = obj.n_layers
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdapterError(f"{where}: n_layers {n!r} must be a positive integer")
    if not isinstance(obj.name, str) or not obj.name:
        raise AdapterError(f"{where}: name {obj.name!r} must be non-empty text")
    return obj


def check_range(layers: Any, n: int, where: str) -> Any:
    """A built ``LayerRange`` with the members and tensor shapes the stage reads, else ``AdapterError``."""
    missing = [m for m in _RANGE_MEMBERS if not hasattr(layers, m)]
    if missing:
        raise AdapterError(f"{where}: build() returned {_a(layers)}, not a layer range (it lacks "
                           f"{', '.join(missing)}; see docs/adapters.md)")
    f = layers.facts
    if not isinstance(f, ModelFacts):
        raise AdapterError(f"{where}: facts must be a routescope.workers.adapter.ModelFacts, got {type(f).__name__}")
    if f.n_kv_heads < 1 or f.n_heads % f.n_kv_heads:
        raise AdapterError(f"{where}: n_heads {f.n_heads} is not a multiple of n_kv_heads {f.n_kv_heads}")
    want = {"W_O": (n, f.n_heads, f.d_head, f.d_model), "W_out": (n, f.d_ff, f.d_model)}
    for name, shape in want.items():
        t = getattr(layers, name)
        if t is None and name == "W_out" and getattr(layers, "moe_blocks", None) is not None:
            continue  # mixture-of-experts blocks (bridge only) have no single W_out
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AdapterError(f"{where}: {name} is {got}, expected {list(shape)} "
                               f"({'[n, H, d_head, d]' if name == 'W_O' else '[n, d_ff, d]'})")
    return layers


def resolve_adapter(adapter: Any, model: Any = None) -> ModelAdapter:
    """The ``ModelAdapter`` an ``adapter=`` selection names, for model spec ``model``.

    ``adapter``: None (the default: ``BridgeAdapter(model)``, a Hugging Face checkpoint through
    TransformerBridge); a dotted path ``module.path:factory`` or ``module.path.ClassName``; a
    factory or class; or an adapter object. A factory or class is called with ``model=model`` if it
    takes a parameter named ``model`` (or ``**kwargs``), else with no arguments; what it returns
    (or a module-level adapter object the path names) must have the members of ``ModelAdapter``.
    """
    if adapter is None:
        from .bridge_adapter import BridgeAdapter

        return BridgeAdapter(model) if model is not None else BridgeAdapter()
    where = f"adapter {adapter_label(adapter)!r}"
    obj = import_object(adapter) if isinstance(adapter, str) else adapter
    if is_adapter(obj):
        return check_adapter(obj, where)
    if not callable(obj):
        raise AdapterError(f"{where}: {_a(obj)} is neither a model adapter nor a factory or class "
                           "returning one (see docs/adapters.md)")
    built = obj(**({"model": model} if _takes_model(obj) else {}))
    if not is_adapter(built):
        raise AdapterError(f"{where}: calling it returned {_a(built)}, not a model adapter "
                           f"(it lacks {', '.join(m for m in _ADAPTER_MEMBERS if not hasattr(built, m)) or 'build'};"
                           " see docs/adapters.md)")
    return check_adapter(built, where)


def _a(obj: Any) -> str:
    """``a PlainTransformer`` / ``an int``: the type of ``obj`` with its article."""
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _takes_model(fn: Callable) -> bool:
    try:
        params: Mapping[str, inspect.Parameter] = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "model" in params and params["model"].kind != inspect.Parameter.POSITIONAL_ONLY \
        or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
