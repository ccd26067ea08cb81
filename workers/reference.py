"""A dense float64 reference of SPEC sections 2-4: the independent check of the engine.

It reads like the SPEC: every part is materialised and every norm is taken by brute force, one target
at a time. It runs the *whole* model as one Hugging Face model under its own TransformerBridge (not the
stage loader) and shares no code with the fast path (``contributions``, ``exact_l1``), so the two agree
only if both follow the SPEC. It covers sequential and parallel pre-norm blocks (the tiny test models and
SmolLM2); norms inside a block (SPEC 4a) and per-neuron or per-expert detail are not in it. Every part of a
target at once and float64: for tests and ``routescope bench --naive``, never for traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

EPS = 1e-5


def load_bridge(model_dir: str) -> Any:
    """The whole model, loaded the ordinary way, with eager attention and per-head results."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    bridge = build_bridge_from_module(model, type(model).__name__, hf_config=config, tokenizer=tok)
    try:
        bridge.set_use_attn_result(True)
    except NotImplementedError:  # e.g. OPT: per-head results come from hook_z @ W_O instead
        pass
    bridge.eval()
    return bridge


def capture(bridge: Any, ids: list[int]) -> dict[str, torch.Tensor]:
    """Every hook's activation for one prompt (ids taken as they are, no BOS added), float64, batch dropped."""
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(torch.tensor([ids]), prepend_bos=False)
    return {k: v[0].double() for k, v in cache.items()}


def norm_of(x: torch.Tensor, norm: str) -> torch.Tensor:
    """``||x||`` over the last dimension: L1 or L2."""
    return x.abs().sum(-1) if norm == "l1" else x.pow(2).sum(-1).sqrt()


def proximity(whole: torch.Tensor, part: torch.Tensor, norm: str) -> torch.Tensor:
    """SPEC 2: ``prox = max(||y|| - ||y - p||, eps)``."""
    return (norm_of(whole, norm) - norm_of(whole - part, norm)).clamp_min(EPS)


def attention_parts(bridge: Any, cache: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """SPEC 3: ``u[s, h] = v_s^h @ W_O[h]``, ``[T, H, d]``; ``part(s, h)`` of target ``t`` is
    ``pattern[h, t, s] * u[s, h]``."""
    W_O = bridge.W_O[layer].detach().double()  # [H, d_head, d]
    H = W_O.shape[0]
    v = cache[f"blocks.{layer}.attn.hook_v"]  # [T, H_kv, d_head], already includes b_V
    v = v.repeat_interleave(H // v.shape[1], dim=1)  # kv(h) = h // (H / H_kv)
    return torch.einsum("the,hed->thd", v, W_O)


@dataclass
class LayerReference:
    """Dense contributions of one layer (SPEC 3-4), float64.

    ``c_ffn`` is the share of ``mlp_out`` in its whole: ``resid_post``, which for parallel blocks is also
    the attention whole (so ``c_attn``, ``c_res_attn`` and ``c_ffn`` sum to 1 there, and ``c_res_ffn`` is None).
    """

    c_attn: np.ndarray  # [T, T, H]: target, source, head; 0 for s > t
    c_res_attn: np.ndarray  # [T]
    c_ffn: np.ndarray  # [T]
    c_res_ffn: np.ndarray | None  # [T]
    parallel: bool


def layer_contributions(bridge: Any, cache: dict[str, torch.Tensor], layer: int, norm: str = "l1") -> LayerReference:
    """Contributions of layer ``layer`` from the activations of ``capture`` (SPEC 2-4), every part materialised."""
    hook = f"blocks.{layer}."
    u = attention_parts(bridge, cache, layer)  # [T, H, d]
    pattern = cache[hook + "attn.hook_pattern"]  # [H, T, T]
    resid_pre, resid_post, mlp_out = (cache[hook + n] for n in ("hook_resid_pre", "hook_resid_post", "hook_mlp_out"))
    parallel = hook + "hook_resid_mid" not in cache  # SPEC 4: one whole, resid_post
    whole = resid_post if parallel else cache[hook + "hook_resid_mid"]
    T, H = u.shape[0], u.shape[1]
    c_attn, c_res_attn, c_ffn = np.zeros((T, T, H)), np.zeros(T), np.zeros(T)
    for t in range(T):
        y = whole[t]
        part = pattern[:, t, : t + 1].T[..., None] * u[: t + 1]  # [t+1, H, d]: part(s, h) for s <= t
        prox = proximity(y, part, norm)  # [t+1, H]
        prox_res = proximity(y, resid_pre[t], norm)
        total = prox.sum() + prox_res
        if parallel:
            prox_ffn = proximity(y, mlp_out[t], norm)
            total = total + prox_ffn
            c_ffn[t] = float(prox_ffn / total)
        c_attn[t, : t + 1] = (prox / total).numpy()
        c_res_attn[t] = float(prox_res / total)
    if parallel:
        return LayerReference(c_attn, c_res_attn, c_ffn, None, parallel)
    # SPEC 4: parts mlp_out[t] and resid_mid[t] of the whole resid_post[t].
    prox_ffn, prox_res = proximity(resid_post, mlp_out, norm), proximity(resid_post, whole, norm)
    total = prox_ffn + prox_res
    return LayerReference(c_attn, c_res_attn, (prox_ffn / total).numpy(), (prox_res / total).numpy(), parallel)


def attention_parts_sum(bridge: Any, cache: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_{s,h} part(s, h)`` per target ``[T, d]`` and ``sum_s part(s, h)`` per (target, head) ``[T, H, d]``,
    for SPEC 3's invariants (``attn_out - b_O`` and ``hook_result``)."""
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [H, T, T]
    per_head = torch.einsum("hts,shd->thd", pattern, attention_parts(bridge, cache, layer))
    return per_head.sum(1), per_head
