"""A deliberately naive, dense implementation of SPEC sections 2-4, for checking the engine.

It runs the *whole* model as one Hugging Face model under its own TransformerBridge (not the
stage loader), materialises every attention part ``a * (v @ W_O)`` per target, and takes norms
by brute force, in float64.
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-5


def full_bridge(model_dir):
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


def capture(bridge, ids: list[int]):
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(torch.tensor([ids]), prepend_bos=False)
    return {k: v[0].double() for k, v in cache.items()}


def _norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    return x.abs().sum(-1) if norm == "l1" else x.pow(2).sum(-1).sqrt()


def layer(bridge, cache, l: int, norm: str = "l1"):
    """Dense contributions of layer ``l``: c_attn [T, T, H], c_res [T], c_mlp [T] or None,
    c_ffn [T], c_res_ffn [T] (the last two None for parallel blocks)."""
    W_O = bridge.W_O[l].detach().double()  # [H, dh, d]
    H = W_O.shape[0]
    v = cache[f"blocks.{l}.attn.hook_v"]
    v = v.repeat_interleave(H // v.shape[1], dim=1)  # [T, H, dh]
    pattern = cache[f"blocks.{l}.attn.hook_pattern"]  # [H, T, T]
    u = torch.einsum("the,hed->thd", v, W_O)  # [T, H, d]
    pre = cache[f"blocks.{l}.hook_resid_pre"]
    post = cache[f"blocks.{l}.hook_resid_post"]
    mlp = cache[f"blocks.{l}.hook_mlp_out"]
    parallel = f"blocks.{l}.hook_resid_mid" not in cache
    whole = post if parallel else cache[f"blocks.{l}.hook_resid_mid"]
    T = pre.shape[0]
    c_attn = np.zeros((T, T, H))
    c_res = np.zeros(T)
    c_mlp = np.zeros(T) if parallel else None
    for t in range(T):
        y = whole[t]
        parts = pattern[:, t, : t + 1].T[..., None] * u[: t + 1]  # [S, H, d]: every part, materialised
        prox = (_norm(y, norm) - _norm(y - parts, norm)).clamp_min(EPS)
        prox_res = (_norm(y, norm) - _norm(y - pre[t], norm)).clamp_min(EPS)
        total = prox.sum() + prox_res
        if parallel:
            prox_mlp = (_norm(y, norm) - _norm(y - mlp[t], norm)).clamp_min(EPS)
            total = total + prox_mlp
            c_mlp[t] = float(prox_mlp / total)
        c_attn[t, : t + 1] = (prox / total).numpy()
        c_res[t] = float(prox_res / total)
    if parallel:
        return c_attn, c_res, c_mlp, None, None
    mid = cache[f"blocks.{l}.hook_resid_mid"]
    p_ffn = (_norm(post, norm) - _norm(post - mlp, norm)).clamp_min(EPS)
    p_res = (_norm(post, norm) - _norm(post - mid, norm)).clamp_min(EPS)
    return c_attn, c_res, None, (p_ffn / (p_ffn + p_res)).numpy(), (p_res / (p_ffn + p_res)).numpy()


def parts_sum(bridge, cache, l: int):
    """``sum_{s,h} part(s,h)`` per target and ``sum_s part(s,h)`` per (target, head)."""
    W_O = bridge.W_O[l].detach().double()
    H = W_O.shape[0]
    v = cache[f"blocks.{l}.attn.hook_v"]
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    pattern = cache[f"blocks.{l}.attn.hook_pattern"]
    per_head = torch.einsum("hts,she,hed->thd", pattern, v, W_O)  # [T, H, d]
    return per_head.sum(1), per_head
