"""A reference of SPEC 1-4 (and 4a, 4b) read from plain ``transformers`` modules, with no TransformerLens.

The conformance suite (``test_conformance.py``) checks routescope against it on tiny models of every
family. Everything here comes from one ordinary Hugging Face forward pass: eager attention,
``output_attentions=True`` (the pattern), ``output_hidden_states=True`` (checked against the residual
nodes), and forward hooks on each block, its attention's value and output projections, its FFN and the
norms inside it. Nothing is recomputed from weights except the per-head split of the output projection
(``W_O``), and every reading is checked against the tensors the model really produced before it is used:

* ``z[t, h] == sum_s pattern[h, t, s] * v[s, kv(h)]`` (the input of the output projection), which pins
  the value layout of each family (fused ``c_attn``, NeoX's per-head ``[q|k|v]``, Falcon's per-group
  ``[q..|k|v]``, Phi-3's ``[Q|K|V]``) and the head -> KV-head map;
* ``sum_{s,h} part(s, h) + b_O == attn_out`` (SPEC 3), through a norm inside the block linearised at its
  actual input (SPEC 4a: RMSNorm ``g / rms(x)``, Gemma's gain ``1 + w``; LayerNorm ``g / std(x)`` on the
  centred part, its bias in no part) where the family has one;
* the residual nodes are the sums SPEC 1 says (``A = I_prev + attention``, ``I = A + FFN``, or the
  parallel ``I = I_prev + attention + FFN``), ``A`` read where HF has it as a module input.

Contributions (SPEC 2-4) are then computed densely in float64, every part materialised, one target at a
time. Per family, what is read where is the ``Layout`` below (``layout_for``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

EPS = 1e-5  # SPEC 2
CHECK_RTOL = 1e-5  # fp32 readings that must agree (relative to the largest magnitude involved)

# ----------------------------------------------------------------------------- where each family keeps what


def _v_plain(out: torch.Tensor, cfg: "Dims") -> torch.Tensor:  # q_proj/k_proj/v_proj models
    return out.reshape(out.shape[0], -1, cfg.d_head)


def _v_gpt2(out: torch.Tensor, cfg: "Dims") -> torch.Tensor:  # c_attn: [q | k | v], each d wide
    d = cfg.n_heads * cfg.d_head
    return out[:, 2 * d : 3 * d].reshape(out.shape[0], cfg.n_heads, cfg.d_head)


def _v_neox(out: torch.Tensor, cfg: "Dims") -> torch.Tensor:  # query_key_value: per head [q | k | v]
    return out.reshape(out.shape[0], cfg.n_heads, 3 * cfg.d_head)[..., 2 * cfg.d_head :]


def _v_phi3(out: torch.Tensor, cfg: "Dims") -> torch.Tensor:  # qkv_proj: [Q (H) | K (H_kv) | V (H_kv)]
    start = (cfg.n_heads + cfg.n_kv_heads) * cfg.d_head
    return out[:, start:].reshape(out.shape[0], cfg.n_kv_heads, cfg.d_head)


def _v_falcon(out: torch.Tensor, cfg: "Dims") -> torch.Tensor:
    T, dh = out.shape[0], cfg.d_head
    if cfg.falcon == "new":  # per KV group [q_1 .. q_{H/H_kv} | k | v]
        return out.reshape(T, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads + 2, dh)[:, :, -1]
    if cfg.falcon == "multi_query":  # [q_1 .. q_H | k | v], one KV head
        return out.reshape(T, cfg.n_heads + 2, dh)[:, -1:]
    return out.reshape(T, cfg.n_heads, 3, dh)[:, :, 2]  # per head [q | k | v]


@dataclass(frozen=True)
class Layout:
    """Module paths (relative to a block) of one family, and how to read them.

    ``v``: the module whose output holds v (before rotary, which never touches v), read by ``split_v``;
    ``o``: the attention output projection (its input is ``z``, its output ``attn_out``); ``ffn``: the
    module whose output is the FFN output (before any norm after it); ``mid``: a module whose *input* is
    ``resid_mid`` (sequential blocks); ``attn_norm``/``ffn_norm``: norms inside the block, applied to the
    attention / FFN output (sandwich norms), or, with ``post_ln``, to ``resid_pre + attn_out`` /
    ``resid_mid + ffn_out`` (post-LN). ``gain_offset``: RMSNorm gain ``offset + w`` (Gemma: 1).
    """

    layers: str
    v: str
    split_v: Callable[[torch.Tensor, "Dims"], torch.Tensor]
    o: str
    ffn: str
    mid: str | None = None
    parallel: bool = False
    conv1d: bool = False  # GPT-2's Conv1D stores its weight [in, out]
    attn_norm: str | None = None
    ffn_norm: str | None = None
    post_ln: bool = False
    gain_offset: float = 0.0


_LLAMA_LIKE = Layout("model.layers", "self_attn.v_proj", _v_plain, "self_attn.o_proj", "mlp",
                     mid="post_attention_layernorm")
_SANDWICH = dict(attn_norm="post_attention_layernorm", ffn_norm="post_feedforward_layernorm",
                 mid="pre_feedforward_layernorm")

LAYOUTS: dict[str, Layout] = {
    "GPT2LMHeadModel": Layout("transformer.h", "attn.c_attn", _v_gpt2, "attn.c_proj", "mlp", mid="ln_2", conv1d=True),
    "GPTNeoForCausalLM": Layout("transformer.h", "attn.attention.v_proj", _v_plain, "attn.attention.out_proj", "mlp",
                                mid="ln_2"),
    "OPTForCausalLM": Layout("model.decoder.layers", "self_attn.v_proj", _v_plain, "self_attn.out_proj", "fc2",
                             mid="final_layer_norm"),
    "GPTJForCausalLM": Layout("transformer.h", "attn.v_proj", _v_plain, "attn.out_proj", "mlp", parallel=True),
    "GPTNeoXForCausalLM": Layout("gpt_neox.layers", "attention.query_key_value", _v_neox, "attention.dense", "mlp",
                                 parallel=True),
    "PhiForCausalLM": Layout("model.layers", "self_attn.v_proj", _v_plain, "self_attn.dense", "mlp", parallel=True),
    "Phi3ForCausalLM": Layout("model.layers", "self_attn.qkv_proj", _v_phi3, "self_attn.o_proj", "mlp",
                              mid="post_attention_layernorm"),
    "FalconForCausalLM": Layout("transformer.h", "self_attention.query_key_value", _v_falcon, "self_attention.dense",
                                "mlp", parallel=True),
    "Gemma2ForCausalLM": Layout("model.layers", "self_attn.v_proj", _v_plain, "self_attn.o_proj", "mlp",
                                gain_offset=1.0, **_SANDWICH),
    "Gemma3ForCausalLM": Layout("model.layers", "self_attn.v_proj", _v_plain, "self_attn.o_proj", "mlp",
                                gain_offset=1.0, **_SANDWICH),
    "Olmo2ForCausalLM": Layout("model.layers", "self_attn.v_proj", _v_plain, "self_attn.o_proj", "mlp", mid="mlp",
                               attn_norm="post_attention_layernorm", ffn_norm="post_feedforward_layernorm"),
}
for _name in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "StableLm", "Mixtral", "Qwen2Moe", "Olmoe"):
    LAYOUTS[f"{_name}ForCausalLM"] = _LLAMA_LIKE


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    falcon: str | None = None  # Falcon's fused-QKV layout: "new", "multi_query" or "per_head"


def layout_for(model: torch.nn.Module) -> tuple[Layout, Dims]:
    """The family's ``Layout`` (by HF class and config) and its head dimensions."""
    cfg = model.config
    arch = type(model).__name__
    layout = LAYOUTS[arch]
    if arch == "OPTForCausalLM" and not cfg.do_layer_norm_before:  # OPT-350m: post-LN
        layout = Layout(layout.layers, layout.v, layout.split_v, layout.o, layout.ffn, mid="fc1",
                        attn_norm="self_attn_layer_norm", ffn_norm="final_layer_norm", post_ln=True)
    H = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or cfg.num_heads)
    d = int(cfg.hidden_size)
    dh = int(getattr(cfg, "head_dim", None) or d // H)
    kv = int(getattr(cfg, "num_key_value_heads", None) or H)
    falcon = None
    if arch == "FalconForCausalLM":
        falcon = "new" if cfg.new_decoder_architecture else "multi_query" if cfg.multi_query else "per_head"
        kv = cfg.num_kv_heads if falcon == "new" else 1 if falcon == "multi_query" else H
    n_layers = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or cfg.num_layers)
    return layout, Dims(n_layers, H, kv, dh, falcon)


# ----------------------------------------------------------------------------- capture


def load(model_dir: str) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def capture(model: torch.nn.Module, ids: list[int]) -> tuple[dict[str, list[torch.Tensor]], Any]:
    """One forward of ``ids`` (as given, no BOS added) with hooks; returns per-layer float64 tensors
    ``[T, ...]`` (batch dropped, clones: Falcon adds into its FFN output in place) and the HF output."""
    layout, dims = layout_for(model)
    blocks = model.get_submodule(layout.layers)
    T = len(ids)
    got: dict[str, list[Any]] = {}

    def keep(key: str, i: int, t: torch.Tensor) -> None:
        got.setdefault(key, [None] * dims.n_layers)[i] = t.detach().reshape(T, -1).double().clone()

    def on_input(key: str, i: int):
        def hook(mod, args, kwargs):
            keep(key, i, args[0] if args else kwargs["hidden_states"])
        return hook

    def on_output(key: str, i: int):
        def hook(mod, args, kwargs, out):
            keep(key, i, _first(out))
        return hook

    handles = []
    for i, block in enumerate(blocks):
        sub = block.get_submodule
        hooks = [(block, "resid_pre", "in"), (block, "resid_post", "out"), (sub(layout.v), "v_raw", "out"),
                 (sub(layout.o), "z", "in"), (sub(layout.o), "attn_out", "out"), (sub(layout.ffn), "ffn_out", "out")]
        if layout.mid:
            hooks.append((sub(layout.mid), "mid_probe", "in"))
        for name, key in ((layout.attn_norm, "attn_norm"), (layout.ffn_norm, "ffn_norm")):
            if name:
                hooks += [(sub(name), key + "_in", "in"), (sub(name), key + "_out", "out")]
        for mod, key, where in hooks:
            fn = on_input(key, i) if where == "in" else on_output(key, i)
            if where == "in":
                handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(fn, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    got["v"] = [layout.split_v(v, dims) for v in got.pop("v_raw")]
    got["pattern"] = [a[0].detach().double() for a in out.attentions]  # [H, T, T]
    return got, out


# ----------------------------------------------------------------------------- norms inside a block (SPEC 4a)


@dataclass
class LinearNorm:
    """A norm frozen at its actual input ``x`` (``[T, d]``): ``N(x) = image(x) + bias``, exact."""

    scale: torch.Tensor  # [T, d]: gain / rms(x) or gain / std(x), per target
    centre: bool  # LayerNorm subtracts the mean of each part
    bias: torch.Tensor  # [d] (zeros for RMSNorm)

    def image(self, p: torch.Tensor, t: int | slice = slice(None)) -> torch.Tensor:
        """``N_lin(p)`` for parts of targets ``t`` (``p`` ``[..., d]``, broadcast against ``scale[t]``)."""
        if self.centre:
            p = p - p.mean(-1, keepdim=True)
        s = self.scale[t]
        return p * (s if isinstance(t, slice) else s.reshape((1,) * (p.dim() - 1) + s.shape))


def linearise(module: torch.nn.Module, x: torch.Tensor, gain_offset: float) -> LinearNorm:
    """SPEC 4a for ``module`` (``nn.LayerNorm`` or an RMSNorm) at input ``x`` ``[T, d]`` (float64)."""
    weight = module.weight.detach().double()
    if isinstance(module, torch.nn.LayerNorm):
        std = (x.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
        bias = module.bias.detach().double() if module.bias is not None else torch.zeros_like(weight)
        return LinearNorm(weight / std, True, bias)
    eps = getattr(module, "eps", None)
    eps = module.variance_epsilon if eps is None else eps
    rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return LinearNorm((gain_offset + weight) / rms, False, torch.zeros_like(weight))


# ----------------------------------------------------------------------------- the reference


@dataclass
class LayerReference:
    """One layer, float64. ``c_ffn``: share of the FFN part in its whole (for parallel blocks the one whole
    ``resid_post``, so ``c_attn``, ``c_res_attn`` and ``c_ffn`` sum to 1 and ``c_res_ffn`` is 0)."""

    c_attn: np.ndarray  # [T, T, H]: target, source, head; 0 for s > t
    c_res_attn: np.ndarray  # [T]
    c_ffn: np.ndarray  # [T]
    c_res_ffn: np.ndarray  # [T]
    resid_pre: torch.Tensor  # [T, d]
    resid_mid: torch.Tensor | None  # [T, d], None for parallel blocks
    resid_post: torch.Tensor  # [T, d]
    ffn_part: torch.Tensor  # [T, d]: the FFN block's vector as it joins the stream (M node)
    pattern: torch.Tensor  # [H, T, T]: HF's attention weights


@dataclass
class Reference:
    arch: str
    layout: Layout
    dims: Dims
    ids: list[int]
    layers: list[LayerReference]
    logits: torch.Tensor  # [T, V] fp32, HF's
    hidden_states: list[torch.Tensor]  # HF's output_hidden_states, [T, d] float64
    checks: dict[str, float] = field(default_factory=dict)  # name -> relative error of each invariant

    @property
    def parallel(self) -> bool:
        return self.layout.parallel

    def prediction(self) -> int:
        return int(self.logits[-1].argmax())


def norm_of(x: torch.Tensor, norm: str) -> torch.Tensor:
    return x.abs().sum(-1) if norm == "l1" else x.pow(2).sum(-1).sqrt()


def proximity(whole: torch.Tensor, part: torch.Tensor, norm: str) -> torch.Tensor:
    """SPEC 2: ``max(||y|| - ||y - p||, eps)``."""
    return (norm_of(whole, norm) - norm_of(whole - part, norm)).clamp_min(EPS)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(float(b.abs().max()), float(a.abs().max()), 1e-12))


def output_weights(module: torch.nn.Module, dims: Dims, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_O`` ``[H, d_head, d]`` and ``b_O`` ``[d]`` (zeros without a bias) of an output projection."""
    w = module.weight.detach().double()
    w = w if conv1d else w.T  # [H * d_head, d]
    W_O = w.reshape(dims.n_heads, dims.d_head, -1)
    b = getattr(module, "bias", None)
    return W_O, (b.detach().double() if b is not None else torch.zeros(W_O.shape[-1], dtype=torch.float64))


def reference(model: torch.nn.Module, ids: list[int], norm: str = "l1") -> Reference:
    """SPEC 1-4 for one prompt, from HF's own tensors; ``checks`` holds every invariant's relative error."""
    layout, dims = layout_for(model)
    got, out = capture(model, ids)
    blocks = model.get_submodule(layout.layers)
    checks: dict[str, float] = {}
    layers = []
    for i, block in enumerate(blocks):
        layers.append(_layer(i, block, got, layout, dims, norm, checks))
    hs = [h[0].double() for h in out.hidden_states]
    # HF's hidden_states[l] is the input of block l; its last entry is after the final norm.
    for i in range(dims.n_layers):
        checks[f"hidden_states[{i}] == resid_pre[{i}]"] = _rel(layers[i].resid_pre, hs[i])
    return Reference(type(model).__name__, layout, dims, list(ids), layers, out.logits[0].detach().float(), hs,
                     checks)


def _layer(i: int, block: torch.nn.Module, got: dict, layout: Layout, dims: Dims, norm: str,
           checks: dict[str, float]) -> LayerReference:
    g = {k: v[i] for k, v in got.items()}
    T = g["resid_pre"].shape[0]
    H = dims.n_heads
    pre, post, attn_out, ffn_out = g["resid_pre"], g["resid_post"], g["attn_out"], g["ffn_out"]
    v = g["v"].repeat_interleave(H // g["v"].shape[1], dim=1)  # [T, H, dh]: kv(h) = h // (H / H_kv)
    pattern = g["pattern"]  # [H, T, T]
    W_O, b_O = output_weights(block.get_submodule(layout.o), dims, layout.conv1d)

    # The readings, checked against what the model computed.
    z = torch.einsum("hts,she->the", pattern, v)  # [T, H, dh]
    checks[f"L{i} z == pattern @ v"] = _rel(z, g["z"].reshape(T, H, dims.d_head))
    u = torch.einsum("she,hed->shd", v, W_O)  # u[s, h] = v_s^h @ W_O[h]
    checks[f"L{i} sum parts + b_O == attn_out"] = _rel(torch.einsum("hts,shd->td", pattern, u) + b_O, attn_out)

    # What joins the residual stream, and the image of every part in it (SPEC 3, 4a).
    attn_norm = ffn_norm = None
    if layout.attn_norm:
        attn_norm = linearise(block.get_submodule(layout.attn_norm), g["attn_norm_in"], layout.gain_offset)
        x = pre + attn_out if layout.post_ln else attn_out
        checks[f"L{i} attn norm input"] = _rel(x, g["attn_norm_in"])
        joined = attn_norm.image(x) + attn_norm.bias
        checks[f"L{i} attn norm linearised"] = _rel(joined, g["attn_norm_out"])
    res_part = attn_norm.image(pre) if layout.post_ln else pre

    if layout.parallel:
        ffn_part = ffn_out
        whole = post
        checks[f"L{i} resid_post == resid_pre + attn_out + ffn_out"] = _rel(pre + attn_out + ffn_out, post)
        mid = None
    else:
        mid = g["mid_probe"]
        if layout.post_ln:
            checks[f"L{i} resid_mid == LN(resid_pre + attn_out)"] = _rel(g["attn_norm_out"], mid)
        elif attn_norm is not None:
            checks[f"L{i} resid_mid == resid_pre + N(attn_out)"] = _rel(pre + g["attn_norm_out"], mid)
        else:
            checks[f"L{i} resid_mid == resid_pre + attn_out"] = _rel(pre + attn_out, mid)
        whole = mid
        if layout.ffn_norm:
            ffn_norm = linearise(block.get_submodule(layout.ffn_norm), g["ffn_norm_in"], layout.gain_offset)
            x = mid + ffn_out if layout.post_ln else ffn_out
            checks[f"L{i} ffn norm input"] = _rel(x, g["ffn_norm_in"])
            checks[f"L{i} ffn norm linearised"] = _rel(ffn_norm.image(x) + ffn_norm.bias, g["ffn_norm_out"])
            ffn_part = ffn_norm.image(ffn_out)
            ffn_res = ffn_norm.image(mid) if layout.post_ln else mid
            const = ffn_norm.bias
        else:
            ffn_part, ffn_res, const = ffn_out, mid, 0.0
        checks[f"L{i} resid_post == FFN residual part + FFN part + constants"] = _rel(ffn_res + ffn_part + const, post)

    # SPEC 3 (with 4a's images): the attention parts of target t and their whole.
    c_attn, c_res_attn, c_ffn, c_res_ffn = np.zeros((T, T, H)), np.zeros(T), np.zeros(T), np.zeros(T)
    for t in range(T):
        y = whole[t]
        part = pattern[:, t, : t + 1].T[..., None] * u[: t + 1]  # [t+1, H, d]
        if attn_norm is not None:
            part = attn_norm.image(part, t)
        prox = proximity(y, part, norm)  # [t+1, H]
        prox_res = proximity(y, res_part[t], norm)
        total = prox.sum() + prox_res
        if layout.parallel:
            prox_ffn = proximity(y, ffn_part[t], norm)
            total = total + prox_ffn
            c_ffn[t] = float(prox_ffn / total)
        c_attn[t, : t + 1] = (prox / total).numpy()
        c_res_attn[t] = float(prox_res / total)
        # The parts plus constants add up to the whole (SPEC 3 invariant, in 4a's form through a norm).
        const = b_O if attn_norm is None else attn_norm.image(b_O, t) + attn_norm.bias
        rest = ffn_part[t] if layout.parallel else 0.0
        key = f"L{i} attention whole == sum of its parts + constants"
        checks[key] = max(checks.get(key, 0.0), _rel(part.sum((0, 1)) + res_part[t] + const + rest, y))
    if not layout.parallel:
        prox_ffn, prox_res = proximity(post, ffn_part, norm), proximity(post, ffn_res, norm)
        c_ffn, c_res_ffn = (prox_ffn / (prox_ffn + prox_res)).numpy(), (prox_res / (prox_ffn + prox_res)).numpy()
    return LayerReference(c_attn, c_res_attn, c_ffn, c_res_ffn, pre, mid, post, ffn_part, pattern)
