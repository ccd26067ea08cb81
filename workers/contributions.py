"""ALTI proximity contributions (SPEC sections 2-4): the one place where the math lives.

Notation follows SPEC: for an attention block, target ``t``, source ``s``, head ``h``::

    u[s, h]      = v[s, kv(h)] @ W_O[h]                 # what head h would write, per unit weight
    part(s, h)   = a[h, t, s] * u[s, h]                 # a = attention pattern
    prox         = max(||y|| - ||y - part||, eps)       # y = the whole the parts were added into
    c            = prox / sum(prox over all parts of y)

L1 exactly, without materialising parts. Per coordinate, ``|y_i| - |y_i - a z_i|`` equals
``a * sign(y_i) * z_i`` except where ``a*|z_i| > |y_i|`` with the same sign, where it is lower by
``2 * (a*|z_i| - |y_i|)``.  So::

    prox = a * <sign(y), u>  -  2 * sum_i [sign(y_i) u_i > 0] * relu(a*|u_i| - |y_i|)

The first term is ``a * (sign(y) @ W_O[h]^T) . v[s]``: a matmul as cheap as the attention scores.
The correction is non-zero only where ``a * max_i|u_i| > min_i |y_i|``; those candidate triples are
found with one comparison and corrected exactly by a gather. L2 uses
``||y - a u||^2 = ||y||^2 - 2a<y,u> + a^2||u||^2`` in the same head space.

Everything is computed in chunks of target positions sized by a byte budget, causal half only, so
no ``T*T*H*d`` tensor ever exists, and norms accumulate in fp32 whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

EPS = 1e-5
Norm = Literal["l1", "l2"]
DEFAULT_CHUNK_BYTES = 16 * 2**20  # CPU: cache-sized chunks win; GPUs take larger (see Stage)


@dataclass
class LayerActivations:
    """What one layer's contributions need, for one prompt (no padding), fp32 or model dtype.

    ``resid_mid`` is None for parallel attention+FFN blocks (GPT-NeoX, GPT-J, Phi).
    """

    resid_pre: torch.Tensor  # [T, d]
    resid_mid: torch.Tensor | None  # [T, d]
    resid_post: torch.Tensor  # [T, d]
    attn_out: torch.Tensor  # [T, d], includes b_O
    mlp_out: torch.Tensor  # [T, d]
    v: torch.Tensor  # [T, H_kv, d_head], includes b_V
    pattern: torch.Tensor  # [H, T, T]
    W_O: torch.Tensor  # [H, d_head, d]

    @property
    def parallel(self) -> bool:
        return self.resid_mid is None

    @property
    def attn_whole(self) -> torch.Tensor:
        """The vector the attention parts were added into."""
        return self.resid_post if self.resid_mid is None else self.resid_mid


@dataclass
class SparseLayerContributions:
    """Contributions of one layer, sparse where they are quadratic in T (SPEC sections 3-5).

    Head parts and head-summed attention edges are kept when ``>= tau_min``; the per-position
    values (residual and FFN parts) are kept densely. For parallel blocks ``c_ffn`` is the share of
    ``mlp_out`` in the single whole ``resid_post`` and ``c_res_ffn`` is all zeros.
    """

    head_target: torch.Tensor  # int64 [n]
    head_source: torch.Tensor  # int64 [n]
    head_head: torch.Tensor  # int64 [n]
    head_weight: torch.Tensor  # fp32 [n]
    edge_target: torch.Tensor  # int64 [m]
    edge_source: torch.Tensor  # int64 [m]
    edge_weight: torch.Tensor  # fp32 [m]
    c_res_attn: torch.Tensor  # fp32 [T]
    c_ffn: torch.Tensor  # fp32 [T]
    c_res_ffn: torch.Tensor  # fp32 [T]


def vector_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Row norms in fp32."""
    return torch.linalg.vector_norm(x.float(), ord=1 if norm == "l1" else 2, dim=-1)


def proximity(whole: torch.Tensor, part: torch.Tensor, norm: Norm = "l1") -> torch.Tensor:
    """SPEC section 2 for row-aligned parts: ``max(||y|| - ||y - p||, eps)`` per row."""
    whole, part = whole.float(), part.float()
    return (vector_norm(whole, norm) - vector_norm(whole - part, norm)).clamp_min(EPS)


def head_outputs(v: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """``u[s, h] = v[s, kv(h)] @ W_O[h]``, shape [H, T, d], fp32."""
    n_heads = W_O.shape[0]
    v = expand_kv(v, n_heads).float()  # [T, H, dh]
    return torch.einsum("the,hed->htd", v, W_O.float())


def expand_kv(v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat grouped key/value heads so head h reads kv head ``h // (H / H_kv)``."""
    n_kv = v.shape[1]
    if n_kv == n_heads:
        return v
    return v.repeat_interleave(n_heads // n_kv, dim=1)


@dataclass
class HeadOutputs:
    """Per-layer L1 helpers: ``u[h, s]`` and, per (head, coordinate), sources sorted by ``|u|``."""

    u: torch.Tensor  # [H, T, d] fp32
    u_t: torch.Tensor  # [H, d, T] the same, coordinate-major (contiguous rows over sources)
    abs_sorted: torch.Tensor  # [H, d, T] ascending |u| over sources
    order: torch.Tensor  # [H, d, T] source index of each sorted entry

    @classmethod
    def build(cls, v: torch.Tensor, W_O: torch.Tensor) -> "HeadOutputs":
        u = head_outputs(v, W_O)
        u_t = u.transpose(1, 2).contiguous()
        abs_sorted, order = u_t.abs().sort(dim=-1)
        return cls(u, u_t, abs_sorted, order)


SMALL_COORDS = 16  # per target, the smallest |y_i| are corrected densely for every part
TOP_SOURCES = 8  # per (head, target), sources corrected over every coordinate


def _l1_correction(
    heads: HeadOutputs, a: torch.Tensor, y: torch.Tensor, t0: int, chunk_bytes: int
) -> torch.Tensor:
    """``sum_i relu(a * sign(y_i) * u_i - |y_i|)`` for every part, exactly: ``[H, C, S]``.

    (The relu is zero where ``u_i`` and ``y_i`` differ in sign, so no separate sign test.)
    Most parts need no correction. The largest attention weights of each (head, target) are
    corrected over all coordinates; the smallest ``|y_i|`` of each target, which attract most
    corrections, densely for every part. For any other (part, coordinate), ``a <= a_rest`` (the
    next largest weight), so it can only need correcting where ``|u_i| > |y_i| / a_rest``:
    sorting ``|u|`` over sources per (head, coordinate) turns that into a ``searchsorted``
    count, and only those (target, source, head, coordinate) quadruples are evaluated.
    """
    H, C, S = a.shape
    d = y.shape[-1]
    y_abs = y.abs()
    sign = torch.where(y >= 0, 1.0, -1.0)  # sign(0) = +1
    c_idx = torch.arange(C, device=a.device)[:, None]
    m = min(TOP_SOURCES, S)
    top = torch.topk(a, min(m + 1, S), dim=-1)
    top_s = top.indices[..., :m]  # [H, C, m]
    a_rest = top.values[..., m] if S > m else torch.zeros(H, C, device=a.device)
    # Exact over all coordinates for the top sources (the attention sink among them).
    h_idx = torch.arange(H, device=a.device)[:, None, None]
    signed_top = heads.u[h_idx, top_s] * sign[None, :, None, :]  # [H, C, m, d]
    corr_top = (top.values[..., :m, None] * signed_top - y_abs[None, :, None, :]).clamp_min_(0.0).sum(-1)
    corr = torch.zeros(H, C, S, device=a.device).scatter_add_(2, top_s, corr_top)
    a_rest_parts = a.scatter(2, top_s, 0.0)  # the top sources are done
    # The k smallest |y_i| of each target, densely for every other part.
    k = min(SMALL_COORDS, d)
    small = torch.topk(y_abs, k, dim=-1, largest=False).indices  # [C, k]
    signed_small = heads.u_t[:, small, :S] * sign[c_idx, small][None, :, :, None]  # [H, C, k, S]
    signed_small.mul_(a_rest_parts[:, :, None, :]).sub_(y_abs[c_idx, small][None, :, :, None]).clamp_min_(0.0)
    corr += signed_small.sum(2)
    del signed_small
    n_src = heads.abs_sorted.shape[-1]
    theta = y_abs[None] / a_rest[..., None].clamp_min(1e-30)  # [H, C, d]
    theta[:, c_idx, small] = float("inf")  # already done densely
    # Batched over (head, coordinate): [H, d, T] sorted rows, [H, d, C] queries.
    first = torch.searchsorted(heads.abs_sorted, theta.transpose(1, 2).contiguous(), right=True).transpose(1, 2)
    count = n_src - first  # [H, C, d]: sources with |u| > theta
    per_row = count.sum(dim=(0, 2))  # candidates per target row
    # Expanding a candidate takes ~10 int64/fp32 temporaries: bound rows per step by the budget.
    rows_per_step = max(1, int(chunk_bytes // (80 * max(1, int(per_row.max())))))
    for c0 in range(0, C, rows_per_step):
        cnt = count[:, c0 : c0 + rows_per_step]
        total = int(cnt.sum())
        if total == 0:
            continue
        h, c, i = cnt.nonzero(as_tuple=True)
        reps = cnt[h, c, i]
        h, c, i, f = (x.repeat_interleave(reps) for x in (h, c + c0, i, first[h, c + c0, i]))
        # j-th candidate of a run: sorted position first + j
        starts = torch.cumsum(reps, 0) - reps
        j = torch.arange(total, device=a.device) - starts.repeat_interleave(reps)
        s = heads.order[h, i, f + j]
        keep = (s <= c + t0) & (s < S)
        h, c, i, s = h[keep], c[keep], i[keep], s[keep]
        val = a_rest_parts[h, c, s] * heads.u[h, s, i] * sign[c, i] - y_abs[c, i]
        ok = val > 0
        corr.view(-1).scatter_add_(0, ((h * C + c) * S + s)[ok], val[ok])
    return corr


def attention_proximity_chunk(
    acts: LayerActivations,
    t0: int,
    t1: int,
    norm: Norm,
    heads: HeadOutputs | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Raw proximities (before ``eps`` clamp) of the parts ``(s, h)`` of targets ``t0..t1-1``.

    Returns fp32 ``[H, t1 - t0, t1]``; entries with ``s > t`` are meaningless (callers mask them).
    ``heads`` (L1 only) may be passed in to reuse it across chunks of one layer.
    """
    n_heads = acts.W_O.shape[0]
    y = acts.attn_whole[t0:t1].float()  # [C, d]
    a = acts.pattern[:, t0:t1, :t1].float()  # [H, C, S]
    v = expand_kv(acts.v[:t1], n_heads).float().transpose(0, 1)  # [H, S, dh]
    W_O = acts.W_O.float()
    if norm == "l2":
        # <y, u[s,h]> = (y @ W_O[h]^T) . v[s]; ||u[s,h]||^2 = v[s] (W_O W_O^T) v[s]
        yq = torch.einsum("cd,hed->hce", y, W_O)  # [H, C, dh]
        dot = yq @ v.transpose(1, 2)  # [H, C, S]
        gram = W_O @ W_O.transpose(1, 2)  # [H, dh, dh]
        u_sq = torch.einsum("hse,hef,hsf->hs", v, gram, v)  # [H, S]
        y_norm = torch.linalg.vector_norm(y, dim=-1)[None, :, None]  # [1, C, 1]
        rest_sq = (y_norm**2 - 2 * a * dot + a * a * u_sq[:, None, :]).clamp_min(0.0)
        # ||y|| - ||y - au|| written without cancellation.
        return (2 * a * dot - a * a * u_sq[:, None, :]) / (y_norm + rest_sq.sqrt()).clamp_min(1e-30)
    sign = torch.where(y >= 0, 1.0, -1.0)  # sign(0) = +1 by convention
    sign_q = torch.einsum("cd,hed->hce", sign, W_O)  # [H, C, dh]
    prox = a * (sign_q @ v.transpose(1, 2))  # [H, C, S]: a * <sign(y), u>
    if heads is None:
        heads = HeadOutputs.build(acts.v, acts.W_O)
    causal = torch.ones(t1 - t0, t1, dtype=torch.bool, device=y.device).tril(t0)
    a = torch.where(causal, a, 0.0)
    return prox - 2 * _l1_correction(heads, a, y, t0, chunk_bytes)


def attention_contributions_chunk(
    acts: LayerActivations,
    t0: int,
    t1: int,
    norm: Norm = "l1",
    heads: HeadOutputs | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Normalised contributions to the attention whole of targets ``t0..t1-1``.

    Returns ``(c_attn [H, C, t1], c_res [C], c_mlp [C] or None)``; ``c_attn`` is exactly 0 for
    ``s > t``, and everything sums to 1 per target. ``c_mlp`` exists for parallel blocks only.
    """
    whole = acts.attn_whole[t0:t1]
    prox = attention_proximity_chunk(acts, t0, t1, norm, heads=heads, chunk_bytes=chunk_bytes)
    causal = torch.ones(t1 - t0, t1, dtype=torch.bool, device=prox.device).tril(t0)
    prox = torch.where(causal, prox.clamp_min(EPS), 0.0)  # future positions are not parts
    prox_res = proximity(whole, acts.resid_pre[t0:t1], norm)
    total = prox.sum(dim=(0, 2)) + prox_res
    prox_mlp = None
    if acts.parallel:
        prox_mlp = proximity(whole, acts.mlp_out[t0:t1], norm)
        total = total + prox_mlp
    c_mlp = None if prox_mlp is None else prox_mlp / total
    return prox / total[None, :, None], prox_res / total, c_mlp


def layer_contributions(
    acts: LayerActivations,
    norm: Norm = "l1",
    tau_min: float = 0.01,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> SparseLayerContributions:
    """All contributions of one layer (SPEC sections 3-4), sparse at ``tau_min``."""
    n_tokens = acts.resid_pre.shape[0]
    n_heads = acts.W_O.shape[0]
    device = acts.resid_pre.device
    # [H, T, d] plus its sort: O(T H d log T), the size of one hook_result.
    head_out = HeadOutputs.build(acts.v, acts.W_O) if norm == "l1" else None
    # Several [H, C, T] fp32 temporaries and the [H, C, k, T] small-coordinate pass live at once;
    # size C to the byte budget (small chunks also skip more of the non-causal half).
    per_target = (6 + 2 * SMALL_COORDS) * n_heads * n_tokens * 4
    step = max(1, min(n_tokens, chunk_bytes // per_target))
    heads, edges = [], []
    c_res_attn = torch.empty(n_tokens, device=device)
    c_ffn = torch.empty(n_tokens, device=device)
    for t0 in range(0, n_tokens, step):
        t1 = min(n_tokens, t0 + step)
        c_attn, c_res, c_mlp = attention_contributions_chunk(acts, t0, t1, norm, head_out, chunk_bytes)
        c_res_attn[t0:t1] = c_res
        if c_mlp is not None:
            c_ffn[t0:t1] = c_mlp
        c = c_attn.permute(1, 2, 0)  # [C, S, H]: nonzero() yields rows sorted by (t, s, h)
        t, s, h = (c >= tau_min).nonzero().unbind(1)
        heads.append((t + t0, s, h, c[t, s, h]))
        w = c.sum(-1)
        t, s = (w >= tau_min).nonzero().unbind(1)
        edges.append((t + t0, s, w[t, s]))
    if acts.parallel:
        c_res_ffn = torch.zeros(n_tokens, device=device)
    else:
        prox_ffn = proximity(acts.resid_post, acts.mlp_out, norm)
        prox_res_ffn = proximity(acts.resid_post, acts.resid_mid, norm)
        c_ffn = prox_ffn / (prox_ffn + prox_res_ffn)
        c_res_ffn = prox_res_ffn / (prox_ffn + prox_res_ffn)
    ht, hs, hh, hw = (torch.cat(x) for x in zip(*heads))
    et, es, ew = (torch.cat(x) for x in zip(*edges))
    return SparseLayerContributions(ht, hs, hh, hw, et, es, ew, c_res_attn, c_ffn, c_res_ffn)


def target_head_contributions(acts: LayerActivations, t: int, norm: Norm = "l1") -> torch.Tensor:
    """Dense ``c_attn[t, :t+1, :]`` of one target, fp32 ``[t+1, H]`` (head detail view)."""
    c_attn, _, _ = attention_contributions_chunk(acts, t, t + 1, norm)
    return c_attn[:, 0, :].T


def head_contribution_map(acts: LayerActivations, head: int, norm: Norm = "l1") -> torch.Tensor:
    """Dense ``c_attn[:, :, head]``, fp32 ``[T, T]`` (zeros above the diagonal)."""
    n = acts.resid_pre.shape[0]
    c_attn, _, _ = attention_contributions_chunk(acts, 0, n, norm)
    return c_attn[head]


def neuron_contributions(
    resid_mid: torch.Tensor, resid_post: torch.Tensor, post: torch.Tensor, W_out: torch.Tensor, norm: Norm = "l1"
) -> torch.Tensor:
    """Per-neuron contributions at one position (SPEC 4): parts ``act[n] * W_out[n]`` and ``resid_mid``.

    ``resid_mid``/``resid_post`` are ``[d]``, ``post`` is ``[d_ff]``, ``W_out`` is ``[d_ff, d]``.
    Returns fp32 ``[d_ff + 1]``: neurons then the residual.
    """
    y = resid_post.float()
    parts = post.float()[:, None] * W_out.float()  # [d_ff, d]: one position only, small
    prox = proximity(y.expand_as(parts), parts, norm)
    prox_res = proximity(y[None], resid_mid.float()[None], norm)
    prox = torch.cat([prox, prox_res])
    return prox / prox.sum()
