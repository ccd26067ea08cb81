"""ALTI proximity contributions (SPEC sections 2-4): the readable top level of the engine's math.

Notation follows SPEC: for an attention block, target ``t``, source ``s``, head ``h``::

    u[s, h]      = v[s, kv(h)] @ W_O[h]                 # what head h would write, per unit weight
    part(s, h)   = a[h, t, s] * u[s, h]                 # a = attention pattern
    prox         = max(||y|| - ||y - part||, eps)       # y = the whole the parts were added into
    c            = prox / sum(prox over all parts of y)

Attention parts are never materialised: L2 uses ``||y - a u||^2 = ||y||^2 - 2a<y,u> + a^2||u||^2`` in head
space; L1 is exact through a sign identity and a bounded correction (``exact_l1``, where the method and
its exactness argument are written down). Everything is computed in chunks of target positions sized by
a byte budget, causal half only, so no ``T*T*H*d`` tensor ever exists, and norms accumulate in fp32
whatever the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import exact_l1
from .schema import Norm
from .exact_l1 import MIN_CHUNK_TARGETS, L1Bounds, expand_kv

EPS = 1e-5
DEFAULT_CHUNK_BYTES = 16 * 2**20  # CPU: cache-sized chunks win; GPUs take larger (see Stage)


@dataclass
class LayerActivations:
    """What one layer's contributions need, for one prompt (no padding), fp32 or model dtype.

    ``resid_mid`` is None for parallel attention+FFN blocks (GPT-NeoX, GPT-J, Phi).
    """

    resid_pre: torch.Tensor  # [T, d]
    resid_mid: torch.Tensor | None  # [T, d]
    resid_post: torch.Tensor  # [T, d]
    mlp_out: torch.Tensor  # [T, d]
    v: torch.Tensor  # [T, H_kv, d_head], includes b_V
    pattern: torch.Tensor  # [H, T, T]
    W_O: torch.Tensor  # [H, d_head, d]
    # A norm applied to the attention output inside the block (SPEC 4a), linearised at its actual
    # input: the part (s, h) of target t joins the stream as ``attn_scale[t] * part``. None: no norm.
    attn_scale: torch.Tensor | None = None  # [T, d]

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
    ``mlp_out`` in the single whole ``resid_post`` and ``c_res_ffn`` is all zeros. On GPUs the
    head and edge lists are fixed-size, padded with rows whose source is -1 (see ``_at_least``);
    whoever reads them on the host drops those.
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


def attention_proximity_chunk(
    acts: LayerActivations,
    t0: int,
    t1: int,
    norm: Norm,
    bounds: L1Bounds | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw proximities (before ``eps`` clamp) of the parts ``(s, h)`` of targets ``t0..t1-1``.

    Returns fp32 ``[H, t1 - t0, t1]``; entries with ``s > t`` are meaningless (callers mask them).
    ``bounds`` (L1 only) may be passed in to reuse them across chunks of one layer; ``dropped``: see
    ``exact_l1.correction``.
    """
    n_heads = acts.W_O.shape[0]
    y = acts.attn_whole[t0:t1].float()  # [C, d]
    a = acts.pattern[:, t0:t1, :t1].float()  # [H, C, S]
    v = expand_kv(acts.v[:t1], n_heads).float().transpose(0, 1)  # [H, S, dh]
    W_O = acts.W_O.float()
    scale = None if acts.attn_scale is None else acts.attn_scale[t0:t1].float()  # [C, d]
    if norm == "l2":
        return _l2_proximity(y, a, v, W_O, scale)
    if bounds is None:
        bounds = L1Bounds.build(acts.v, acts.W_O)
    if scale is None:
        return exact_l1.proximity(y, a, v, W_O, t0, bounds, chunk_bytes, dropped)
    # ||y - D*a*u||_1 = sum_i |D_i| * |y_i / D_i - a*u_i|: the exact search on y / D, weighted by |D|
    # (a coordinate with D_i = 0 adds nothing to either side).
    nonzero = scale != 0
    y_scaled = torch.where(nonzero, y / torch.where(nonzero, scale, 1.0), 1.0)
    return exact_l1.proximity(y_scaled, a, v, W_O, t0, bounds, chunk_bytes, dropped, weights=scale.abs())


def _l2_proximity(y: torch.Tensor, a: torch.Tensor, v: torch.Tensor, W_O: torch.Tensor,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """``||y|| - ||y - a D u||`` in L2 for ``y`` ``[C, d]``, ``a`` ``[H, C, S]``, ``v`` ``[H, S, dh]``,
    ``D`` = ``scale`` ``[C, d]`` (1 when None): ``[H, C, S]``."""
    # <y, D u[s,h]> = ((D y) @ W_O[h]^T) . v[s]; ||u[s,h]||^2 = v[s] (W_O W_O^T) v[s], or with D,
    # sum_i D_i^2 u_i^2 (head outputs squared, times D^2: one matmul)
    yq = torch.einsum("cd,hed->hce", y if scale is None else y * scale, W_O)  # [H, C, dh]
    dot = yq @ v.transpose(1, 2)  # [H, C, S]
    if scale is None:
        gram = W_O @ W_O.transpose(1, 2)  # [H, dh, dh]
        u_sq = torch.einsum("hse,hef,hsf->hs", v, gram, v)[:, None, :]  # [H, 1, S]
    else:
        u2 = (v @ W_O).square()  # [H, S, d]
        u_sq = (u2 @ scale.square().T).transpose(1, 2)  # [H, C, S]
    y_norm = torch.linalg.vector_norm(y, dim=-1)[None, :, None]  # [1, C, 1]
    rest_sq = (y_norm**2 - 2 * a * dot + a * a * u_sq).clamp_min(0.0)
    # ||y|| - ||y - au|| written without cancellation.
    return (2 * a * dot - a * a * u_sq) / (y_norm + rest_sq.sqrt()).clamp_min(1e-30)


def attention_contributions_chunk(
    acts: LayerActivations,
    t0: int,
    t1: int,
    norm: Norm = "l1",
    bounds: L1Bounds | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    dropped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Normalised contributions to the attention whole of targets ``t0..t1-1``.

    Returns ``(c_attn [H, C, t1], c_res [C], c_mlp [C] or None)``; ``c_attn`` is exactly 0 for
    ``s > t``, and everything sums to 1 per target. ``c_mlp`` exists for parallel blocks only.
    """
    whole = acts.attn_whole[t0:t1]
    prox = attention_proximity_chunk(acts, t0, t1, norm, bounds=bounds, chunk_bytes=chunk_bytes, dropped=dropped)
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


FIXED_SIZE_SELECTION: bool | None = None  # None: on GPUs (tests set True to run that path on a CPU)


def _at_least(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Indices ``[n, x.dim()]`` of the entries ``>= tau``, in row-major order like ``nonzero``.

    Rows of ``x`` are targets, and a target's contributions sum to 1 (to within fp32 rounding), so
    no more than ``1.01 / tau`` of its entries pass. On GPUs the indices are therefore a list of that
    fixed size padded with -1 (``nonzero_static``): unlike ``nonzero`` it needs no host sync to learn
    its length. On CPUs exactly ``nonzero``.
    """
    fixed = x.device.type != "cpu" if FIXED_SIZE_SELECTION is None else FIXED_SIZE_SELECTION
    if not fixed:
        return (x >= tau).nonzero()
    size = min(x.numel(), x.shape[0] * math.floor(1.01 / tau) if tau > 0 else x.numel())
    try:
        return torch.nonzero_static(x >= tau, size=size, fill_value=-1)
    except NotImplementedError:  # no CUDA kernel before torch 2.6
        return (x >= tau).nonzero()


def layer_contributions(
    acts: LayerActivations,
    norm: Norm = "l1",
    tau_min: float = 0.01,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    dropped: torch.Tensor | None = None,
) -> SparseLayerContributions:
    """All contributions of one layer (SPEC sections 3-4), sparse at ``tau_min``.

    ``dropped``: where the fused kernels run, an int64 ``[1]`` device tensor; the L1 candidate
    search then never waits for the device, and counts there what did not fit its lists (see
    ``exact_l1.correction``): if that is not 0, the layer must be computed again without ``dropped``.
    """
    n_tokens = acts.resid_pre.shape[0]
    n_heads = acts.W_O.shape[0]
    device = acts.resid_pre.device
    # u and its signed p-th powers (3x one hook_result in fp32, 2x with bf16 powers), built once per layer.
    bounds = L1Bounds.build(acts.v, acts.W_O) if norm == "l1" else None
    # Several [H, C, T] fp32 temporaries and, for L1, the candidate search's working memory live at
    # once; size C to the byte budget (small chunks also skip more of the non-causal half).
    per_target = int((24 + exact_l1.search_bytes(bounds, device)) * n_heads * n_tokens)
    step = max(1, min(n_tokens, max(MIN_CHUNK_TARGETS, chunk_bytes // per_target)))
    heads, edges = [], []
    c_res_attn = torch.empty(n_tokens, device=device)
    c_ffn = torch.empty(n_tokens, device=device)
    for t0 in range(0, n_tokens, step):
        t1 = min(n_tokens, t0 + step)
        c_attn, c_res, c_mlp = attention_contributions_chunk(acts, t0, t1, norm, bounds, chunk_bytes, dropped)
        c_res_attn[t0:t1] = c_res
        if c_mlp is not None:
            c_ffn[t0:t1] = c_mlp
        c = c_attn.permute(1, 2, 0)  # [C, S, H]: rows come sorted by (t, s, h)
        t, s, h = _at_least(c, tau_min).unbind(1)
        heads.append((t + t0, s, h, c[t, s, h]))
        w = c.sum(-1)
        t, s = _at_least(w, tau_min).unbind(1)
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


def neuron_contributions(
    resid_mid: torch.Tensor, resid_post: torch.Tensor, post: torch.Tensor, W_out: torch.Tensor, norm: Norm = "l1"
) -> torch.Tensor:
    """Per-neuron contributions at one position (SPEC 4): parts ``act[n] * W_out[n]`` and ``resid_mid``.

    ``resid_mid``/``resid_post`` are ``[d]``, ``post`` is ``[d_ff]``, ``W_out`` is ``[d_ff, d]``.
    Returns fp32 ``[d_ff + 1]``: neurons then the residual.
    """
    parts = post.float()[:, None] * W_out.float()  # [d_ff, d]: one position only, small
    return part_contributions(resid_post, torch.cat([parts, resid_mid.float()[None]]), norm)


def part_contributions(whole: torch.Tensor, parts: torch.Tensor, norm: Norm = "l1") -> torch.Tensor:
    """SPEC 2 for one whole ``[d]`` and its ``[n, d]`` parts: fp32 ``[n]`` summing to 1."""
    y = whole.float()
    prox = proximity(y.expand_as(parts), parts.float(), norm)
    return prox / prox.sum()
