"""The default ``ModelAdapter``: a Hugging Face checkpoint read through TransformerLens' bridge.

``BridgeAdapter(model)`` resolves a model spec (hub name, local directory, ``.gguf`` file, the
embedded default) to a checkpoint and reads its config; ``build(start, stop, ...)`` makes a
smaller Hugging Face model of ``stop - start`` layers whose tensors are read (renumbered) from the
checkpoint's safetensors (the first range also holds the token embedding, the last the final norm
and unembedding), wraps it in ``TransformerBridge`` and returns it as a ``BridgeRange``, whose hook
points are the only way routescope reads its internals.

Beyond ``workers.adapter.LayerRange`` a ``BridgeRange`` carries two extensions the stage reads when
present (not part of the public protocol yet):

* ``block_norms``: per layer, the linearised attention- and FFN-output norms of blocks that
  normalise their outputs (SPEC 4a: Gemma-2/3, OLMo-2); their inputs are reported as
  ``attn.norm_in`` / ``mlp.norm_in`` (forward pre-hooks on the norm modules);
* ``moe_blocks``: the mixture-of-experts FFN module of every layer (SPEC 4b); such a range has no
  ``W_out`` and reports the FFN input as ``mlp.hook_in`` instead of ``mlp.hook_post``.

Final-logit soft-capping (Gemma-2) is applied in ``unembed``.
"""

from __future__ import annotations

import copy
import re
from functools import partial
from typing import Any, Callable

import torch

from . import support
from .adapter import HOOKS
from .schema import ModelFacts
from .checkpoint import Checkpoint, resolve
from .checkpoint import check_config, load_tokenizer as checkpoint_load_tokenizer
from .conversion import CheckpointMapping
from .moe import is_moe, moe_block
from .norms import LinearisedRMSNorm
from .schema import DEFAULT_MODEL


def load_config(checkpoint: Checkpoint):
    """The checkpoint's ``transformers`` config, validated against its tensors first (``check_config``)."""
    return check_config(checkpoint)


def load_tokenizer(checkpoint: Checkpoint):
    """The checkpoint's tokenizer; a damaged tokenizer file is one clear error naming the checkpoint."""
    return checkpoint_load_tokenizer(checkpoint)


def _n_layers(config) -> int:
    return int(config.num_hidden_layers)


def _layer_key(name: str) -> tuple[str, int, str] | None:
    """Split ``prefix.<i>.rest`` of a transformer-layer tensor name, if it is one."""
    m = re.match(r"^(.*?(?:layers|\.h|blocks))\.(\d+)\.(.+)$", name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, mod in model.named_modules():
        if mod is module:
            return name
    return None


class BridgeAdapter:
    """A Hugging Face checkpoint as a ``ModelAdapter`` (the default); cheap to make: it reads the
    config only, the weights are read by ``build``."""

    def __init__(self, model: str | Checkpoint = DEFAULT_MODEL):
        self.checkpoint = model if isinstance(model, Checkpoint) else resolve(model)
        self.config = load_config(self.checkpoint)
        self.n_layers = _n_layers(self.config)
        self.name = self.checkpoint.spec
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.checkpoint)
        return self._tokenizer

    def build(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> "BridgeRange":
        return BridgeRange(self, start, stop, device, dtype)


class BridgeRange:
    """Layers ``[start, stop)`` of a Hugging Face model as their own ``TransformerBridge``."""

    def __init__(self, adapter: BridgeAdapter, start: int, stop: int, device: torch.device, dtype: torch.dtype):
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        config = adapter.config
        self.checkpoint = adapter.checkpoint
        self.start, self.stop = start, stop
        self.first, self.last = start == 0, stop == adapter.n_layers
        self.device, self.dtype = device, dtype
        self.hf_model, stage_config = self._build_hf_model(config)
        self.bridge = build_bridge_from_module(
            self.hf_model, type(self.hf_model).__name__, hf_config=stage_config, tokenizer=adapter.tokenizer
        )
        self.bridge.eval()
        hooks = self.bridge.hook_dict
        self.parallel = "blocks.0.hook_resid_mid" not in hooks
        # MoE blocks have no single W_out: their detail is read from the block input (workers.moe).
        self.moe_blocks = _moe_blocks(self.hf_model) if is_moe(config) else None
        # Norms on the attention / FFN outputs inside each block (SPEC 4a): linearised at their input,
        # which a forward pre-hook on the norm module captures (the bridge has no hook there).
        self.block_norms = _block_norms(self.hf_model, int(config.hidden_size))
        self.hook_names = HOOKS if self.moe_blocks is None else \
            tuple(h for h in HOOKS if h != "mlp.hook_post") + ("mlp.hook_in",)
        missing = [h for h in self.hook_names if f"blocks.0.{h}" not in hooks and h != "hook_resid_mid"]
        if missing:
            raise NotImplementedError(f"{type(self.hf_model).__name__}: bridge lacks hook points {missing}")
        self.W_O = self.bridge.W_O.detach()  # [n, H, dh, d]
        self.W_out = None if self.moe_blocks is not None else self.bridge.W_out.detach()  # [n, d_ff, d]
        self.facts = self._facts(config)
        # Capture hooks are attached once: run_with_hooks re-resolves the bridge's hook aliases for
        # every hook on every call (~0.35 s per SmolLM2 trace). They do nothing unless a run sets
        # ``_capture``.
        self._capture: Callable[[int, str, torch.Tensor], None] | None = None
        for i in range(stop - start):
            for name in self.hook_names:
                if f"blocks.{i}.{name}" in hooks:
                    self.bridge.add_hook(f"blocks.{i}.{name}", partial(self._on_hook, i, name), is_permanent=True)
        for i, norms in enumerate(self.block_norms or []):
            for name, module in zip(("attn.norm_in", "mlp.norm_in"), norms[2:]):
                module.register_forward_pre_hook(partial(self._on_norm_input, i, name))
        self.softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)

    def _on_hook(self, i: int, name: str, tensor: torch.Tensor, hook: Any = None) -> None:
        if self._capture is not None:
            self._capture(i, name, tensor)

    def _on_norm_input(self, i: int, name: str, module: torch.nn.Module, args: tuple) -> None:
        if self._capture is not None:
            self._capture(i, name, args[0])

    # ----------------------------------------------------------------------------- loading
    def _build_hf_model(self, config):
        """A model of ``stop - start`` layers holding only this range's tensors."""
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        stage_config = copy.deepcopy(config)
        stage_config.num_hidden_layers = self.stop - self.start
        # Per-layer attention kinds (sliding/local vs global) follow the layers into the stage.
        for key in ("layer_types", "attention_layers"):  # attention_layers: GPT-Neo
            if getattr(stage_config, key, None):
                setattr(stage_config, key, list(getattr(config, key))[self.start : self.stop])
        # Eager attention exposes the attention pattern to the bridge's hooks on every architecture.
        stage_config._attn_implementation = "eager"
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(stage_config, attn_implementation="eager")
        support.check_architecture(config, model)  # before any weight is read
        tied = bool(getattr(config, "tie_word_embeddings", False))
        embed_name = _module_name(model, model.get_input_embeddings())
        unembed_name = _module_name(model, model.get_output_embeddings())
        d = config.hidden_size
        if not self.first:
            model.set_input_embeddings(torch.nn.Embedding(1, d, dtype=self.dtype))
        if not self.last:
            model.set_output_embeddings(torch.nn.Linear(d, 1, bias=False, dtype=self.dtype))

        weight_map = self.checkpoint.weight_map()
        mapping = CheckpointMapping(model)
        wanted: dict[str, tuple[str, list[str], str | None]] = {}  # stored -> (renamed, stage names, fused)
        for stored in weight_map:
            name = mapping.rename(stored)
            fused = mapping.merge_target(name)  # per-expert tensors that build one fused model tensor
            key = fused or name
            layer = _layer_key(key)
            targets = []
            if layer is not None:
                prefix, i, rest = layer
                if self.start <= i < self.stop:
                    targets.append(f"{prefix}.{i - self.start}.{rest}")
            elif embed_name and key.startswith(embed_name + "."):
                if self.first:
                    targets.append(key)
                if self.last and tied and not self.first:
                    targets.append(unembed_name + key[len(embed_name):])
            elif unembed_name and key.startswith(unembed_name + "."):
                if self.last and not (tied and self.first):
                    targets.append(key)
            else:  # final norm, learned positions, projections: small, every stage takes them
                targets.append(key)
            if targets:
                wanted[stored] = (name, targets, fused)
        state: dict[str, torch.Tensor] = {}
        to_fuse: dict[str, list[str]] = {}
        pieces: dict[str, torch.Tensor] = {}
        by_shard: dict[Any, list[str]] = {}
        for name in wanted:
            by_shard.setdefault(weight_map[name], []).append(name)
        for shard, names in by_shard.items():
            with safe_open(str(shard), "pt", device="cpu") as f:
                for name in names:
                    tensor = f.get_tensor(name).to(self.dtype)
                    renamed, targets, fused = wanted[name]
                    if fused is not None:
                        pieces[renamed] = tensor
                        to_fuse[fused] = targets
                        continue
                    for target in targets:
                        state[target] = tensor
        for fused, targets in to_fuse.items():
            tensor = mapping.merged(fused, pieces)
            for target in targets:
                state[target] = tensor
        model.load_state_dict(state, strict=False, assign=True)
        if self.first and self.last and tied:  # one matrix serves both ends, as in the checkpoint
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        still_meta = [n for n, p in model.named_parameters() if p.is_meta]
        if still_meta:
            raise ValueError(f"{self.checkpoint.path}: checkpoint lacks tensors for {still_meta[:5]}")
        for module in model.modules():  # rotary and other buffers built at init: match the dtype rules
            for bname, buf in list(module.named_buffers(recurse=False)):
                if buf.is_floating_point() and bname not in ("inv_freq", "original_inv_freq"):
                    module._buffers[bname] = buf.to(self.dtype)
        model.to(self.device)
        model.eval()
        return model, stage_config

    def _facts(self, config) -> ModelFacts:
        H, dh, d = self.W_O.shape[1:]
        return ModelFacts(
            architecture=type(self.hf_model).__name__,
            n_heads=int(H),
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or H),
            d_model=int(d),
            d_head=int(dh),
            d_ff=int(self.W_out.shape[1]) if self.W_out is not None else
            int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size),
            d_vocab=int(config.vocab_size),
            n_ctx=int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)),
            parallel=self.parallel,
        )

    # ----------------------------------------------------------------------------- LayerRange
    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                on_layer: Callable[[int, dict[str, torch.Tensor]], None]) -> torch.Tensor:
        """Forward through the bridge; ``on_layer(i, activations)`` as each layer completes."""
        n_layers = self.stop - self.start
        current: dict[int, dict[str, torch.Tensor]] = {}
        out: list[torch.Tensor] = []

        def capture(i: int, name: str, tensor: torch.Tensor) -> None:
            current.setdefault(i, {})[name] = tensor.detach()
            if name == "hook_resid_post":  # the last hook of block i
                layer = current.pop(i)
                on_layer(i, layer)
                if i == n_layers - 1:
                    out.append(layer["hook_resid_post"])

        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids}
        self._capture = capture
        try:
            if self.first:
                self.bridge(inputs, prepend_bos=False, **kwargs)
            else:
                self.bridge(inputs, start_at_layer=0, **kwargs)
        finally:
            self._capture = None
        return out[0]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.bridge.ln_final(x)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.bridge.unembed(x).float()
        if self.softcap:  # Gemma-2 caps its final logits: read them as the model does
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.hf_model.parameters())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.hf_model.parameters())

    def plain_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        last = f"blocks.{self.stop - self.start - 1}.hook_resid_post"
        if self.first and self.last:
            return self.bridge(inputs.to(self.device))
        if self.last:
            return self.bridge(inputs.to(self.device, self.dtype), start_at_layer=0)
        kwargs = {"names_filter": [last]}
        if self.first:
            _, cache = self.bridge.run_with_cache(inputs.to(self.device), prepend_bos=False, **kwargs)
        else:
            _, cache = self.bridge.run_with_cache(inputs.to(self.device, self.dtype), start_at_layer=0, **kwargs)
        return cache[last]


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return next(m for n, m in model.named_modules()
                if isinstance(m, torch.nn.ModuleList) and n.rsplit(".", 1)[-1] in ("layers", "h", "blocks"))


def _block_norms(model: torch.nn.Module, d_model: int) -> list[tuple] | None:
    """Per layer ``(attention norm, FFN norm, their modules)`` for blocks that normalise their
    outputs before the residual (Gemma-2/3, OLMo-2: ``post_feedforward_layernorm`` present), else None."""
    layers = _decoder_layers(model)
    if not any(hasattr(layer, "post_feedforward_layernorm") for layer in layers):
        return None
    out = []
    for layer in layers:
        modules = (layer.post_attention_layernorm, layer.post_feedforward_layernorm)
        try:
            out.append(tuple(LinearisedRMSNorm.of(m, d_model) for m in modules) + modules)
        except NotImplementedError as exc:
            raise support.UnsupportedModelError(f"{type(model).__name__}: {exc}") from None
    return out


def _moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE FFN module of every decoder layer of a stage model."""
    blocks = [moe_block(layer) for layer in _decoder_layers(model)]
    if any(b is None for b in blocks):
        raise support.UnsupportedModelError(
            f"{type(model).__name__}: a mixture-of-experts model whose FFN blocks are not laid out as a router "
            "'gate' and fused 'experts' (gate_up_proj, down_proj) in every layer")
    return blocks
