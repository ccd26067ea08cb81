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
The correction is non-zero for about 0.05% of (part, coordinate) pairs; a Hoelder bound computed
as one more matmul per layer finds them (``_l1_correction``) and only those are evaluated. L2 uses
``||y - a u||^2 = ||y||^2 - 2a<y,u> + a^2||u||^2`` in the same head space.

Everything is computed in chunks of target positions sized by a byte budget, causal half only, so
no ``T*T*H*d`` tensor ever exists, and norms accumulate in fp32 whatever the model dtype.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from . import kernels

EPS = 1e-5
Norm = Literal["l1", "l2"]
DEFAULT_CHUNK_BYTES = 16 * 2**20  # CPU: cache-sized chunks win; GPUs take larger (see Stage)
# Each chunk re-reads the layer's L1 bound tables (2x the size of all head outputs): fewer than
# this many targets per chunk and long prompts spend their time re-reading them (T=2048: 6x slower).
MIN_CHUNK_TARGETS = 64


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


BOUND_POWER = 16  # p of the Hoelder bound: the sum of p-th powers overestimates the max by <= n^(1/p)
BOUND_SLACK = 0.05  # log-space slack covering rounding and fp32 underflow of the p-th powers
# The slack lets the bound's sum be underestimated by up to e^(p * slack) = 2.2x and stay an upper
# bound, so on GPUs the matmul runs in bf16 (fp32 range, 2^-8 rounding) on tensor cores.
COORD_GROUP = 72  # coordinates per group: one bound per (group, head, target, source)
_TINY = 1e-30


def _pow16_(x: torch.Tensor) -> torch.Tensor:
    for _ in range(4):  # x**16 by squaring: exact enough and 4 cheap passes
        x.mul_(x)
    return x


@dataclass
class L1Bounds:
    """Per-layer tables for the exact L1 correction (see ``_l1_correction``).

    Coordinates are split into ``G`` groups of ``dg``; for every source ``s``, head ``h`` and group
    ``g``: ``log U`` with ``U = max_i |u_i|``, and ``x_i = (max(u_i, 0) / U)^p`` followed by
    ``(max(-u_i, 0) / U)^p``.
    """

    rows: torch.Tensor  # [H, S, G, dg] u, zero-padded to whole groups
    powers: torch.Tensor  # [G, S, H, 2 * dg] signed p-th powers of u / U
    log_max_abs: torch.Tensor  # [G, S, H] log U, U at least _TINY

    @classmethod
    def build(cls, v: torch.Tensor, W_O: torch.Tensor, group: int = COORD_GROUP,
              matmul_dtype: torch.dtype | None = None) -> "L1Bounds":
        """Tables of one layer; ``matmul_dtype`` (default: bf16 on CUDA, else fp32) stores the powers."""
        if matmul_dtype is None:
            matmul_dtype = torch.bfloat16 if v.device.type == "cuda" else torch.float32
        u = head_outputs(v, W_O)  # [H, S, d]
        H, S, d = u.shape
        dg = min(group, d)
        G = -(-d // dg)
        if G * dg > d:
            u = torch.nn.functional.pad(u, (0, G * dg - d))
        ug = u.view(H, S, G, dg)
        U = ug.abs().amax(-1).clamp_min_(_TINY)  # [H, S, G]
        scaled = (ug / U[..., None]).to(matmul_dtype).permute(2, 1, 0, 3)  # [G, S, H, dg]
        # In bf16 the four squarings compound to ~3% error on x^p, 0.2% on the bound: inside the slack.
        powers = torch.empty(G, S, H, 2, dg, device=u.device, dtype=matmul_dtype)
        torch.clamp_min(scaled, 0.0, out=powers[:, :, :, 0])
        torch.clamp_max(scaled, 0.0, out=powers[:, :, :, 1])
        _pow16_(powers)  # (-x)^16 = x^16: the second half holds the negative parts
        return cls(ug, powers.view(G, S, H, 2 * dg), U.log_().permute(2, 1, 0).contiguous())


def _underflow_floor(dg: int) -> float:
    """Underflowed terms are each < 2^-126 (2*dg of them at most): bounding the sum from below by
    twice their total, within the slack, keeps the bound an upper bound."""
    return 4 * dg * 1.2e-38


def _bound_exceeds(total: torch.Tensor, log_u: torch.Tensor, log_a: torch.Tensor, log_y: torch.Tensor,
                   dg: int, inplace: bool = True) -> torch.Tensor:
    """``[G, S, H, C]`` bool: where ``a * U / Y * total^(1/p)``, with the slack, exceeds 1.

    Takes the logs of ``U`` ``[G, S, H]``, ``a`` ``[S, H, C]`` and ``Y * e^-slack`` ``[G, C]``, laid
    out so every read is contiguous along ``C``. In fp32 (a bf16 ``total`` is converted), as a few
    in-place passes over ``total`` (overwritten if fp32, unless ``inplace=False``).
    """
    floor = _underflow_floor(dg)
    if inplace and total.dtype == torch.float32:
        r = total.clamp_min_(floor)
    else:
        r = total.clamp_min(floor).float()
    r.log_().mul_(1.0 / BOUND_POWER)
    r.add_(log_u[..., None]).add_(log_a[None])
    return r > log_y[:, None, None, :]


def _fused_enabled() -> bool:
    return os.environ.get("ROUTESCOPE_COMPILE", "1") != "0"


_compiled: dict[str, object] = {}


def _bound_exceeds_fused(*args) -> torch.Tensor:
    """``_bound_exceeds`` as one kernel (``torch.compile``): on a GPU the unfused passes over
    ``total`` cost more than the matmul that made it. Falls back to the eager version with a
    warning where compilation is unavailable."""
    fn = _compiled.get("exceeds")
    if fn is None:
        fn = _compiled["exceeds"] = torch.compile(_bound_exceeds, dynamic=True)
    try:
        return fn(*args, inplace=False)  # a failure part-way must leave ``total`` for the fallback
    except Exception as exc:  # no Triton, no compiler: same result, unfused
        warnings.warn(f"torch.compile of the L1 bound test failed ({type(exc).__name__}: {exc}); "
                      "running it unfused (set ROUTESCOPE_COMPILE=0 to skip the attempt)")
        _compiled["exceeds"] = _bound_exceeds
        return _bound_exceeds(*args)


def _l1_correction(
    bounds: L1Bounds, a: torch.Tensor, y: torch.Tensor, sign: torch.Tensor, chunk_bytes: int,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i relu(a * sign(y_i) * u_i - |y_i|)`` for every part, exactly: fp32 ``[H, C, S]``.

    A coordinate needs correcting only where ``sign(y_i) u_i > 0`` and ``a |u_i| / |y_i| > 1``.
    Per (group, head, target, source) the largest such ratio is bounded by a matmul::

        max_i a|u_i|/|y_i|  <=  a * U / Y * (sum_i x_i z_i)^(1/p),   z_i = (Y / |y_i|)^p [signs agree]

    (``U``/``Y`` = group max of ``|u|`` / min of ``|y|``, so every term is in [0, 1]; the max term
    is part of the sum). Only (group, part) pairs whose bound exceeds 1 are evaluated, exactly, over
    the group's coordinates: about 1.02x the pairs that truly need it, 0.05% of all coordinates.
    ``sign`` is ``sign(y)`` with ``sign(0) = +1``, as the main term used it.

    Where the fused kernels run (``kernels.available``), given ``dropped`` (an int64 ``[1]`` device
    tensor) the search does not wait for the device: the candidates that did not fit its list are
    added to ``dropped``, and the caller must redo the work with ``dropped=None`` if any were.
    """
    H, C, S = a.shape
    G, dg = bounds.powers.shape[0], bounds.rows.shape[-1]
    d = y.shape[-1]
    if G * dg > d:  # padding coordinates: |y| = 1 and u = 0 never need correcting
        y = torch.nn.functional.pad(y, (0, G * dg - d), value=1.0)
        sign = torch.nn.functional.pad(sign, (0, G * dg - d), value=1.0)
    sign_abs = torch.empty(C, G, 2, dg, device=y.device)
    sign_abs[:, :, 0] = sign.view(C, G, dg)
    y_abs = torch.abs(y.view(C, G, dg), out=sign_abs[:, :, 1])
    y_min = y_abs.amin(-1).clamp_min_(_TINY)  # [C, G]
    z_all = _pow16_(y_min[..., None] / y_abs.clamp_min(_TINY)).permute(1, 2, 0)  # [G, dg, C]
    z = torch.empty(G, 2, dg, C, device=y.device)
    torch.mul(z_all, sign_abs[:, :, 0].permute(1, 2, 0) > 0, out=z[:, 0])
    torch.sub(z_all, z[:, 0], out=z[:, 1])
    powers = bounds.powers[:, :S].reshape(G, S * H, 2 * dg)
    z = z.view(G, 2 * dg, C).to(powers.dtype)
    log_a = a.permute(2, 0, 1).log().contiguous()  # [S, H, C]; log 0 = -inf: never a candidate
    log_y = (y_min.log().T - BOUND_SLACK).contiguous()  # [G, C]
    if kernels.available(y.device):  # matmul, test and list in one kernel, the correction in another
        try:
            found = kernels.bound_candidates(powers, z, bounds.log_max_abs[:, :S].reshape(G, S * H),
                                             log_a.view(S * H, C), log_y, _underflow_floor(dg), 1.0 / BOUND_POWER,
                                             n_heads=H, first_target=S - C,  # the chunk's targets end its sources
                                             synced=dropped is None)
            corr = kernels.correction(found, bounds.rows, sign_abs, a.contiguous()).view(H, C, S)
            if dropped is not None:
                dropped += found.dropped()
            return corr
        except Exception as exc:  # no compiler for this GPU, ...: the same result, unfused
            kernels.fall_back(exc)
    exceeds = _bound_exceeds_fused if y.is_cuda and _fused_enabled() else _bound_exceeds
    # The bound tensor and its test take 12 bytes per entry: targets in blocks that fit the budget
    # (a chunk sized for the kernels is 24x too large for them), of at least MIN_CHUNK_TARGETS.
    block = max(MIN_CHUNK_TARGETS, chunk_bytes // (12 * G * S * H))
    found = []
    for c0 in range(0, C, block):
        c1 = min(C, c0 + block)
        total = torch.bmm(powers, z[:, :, c0:c1]).view(G, S, H, c1 - c0)
        g, s, h, c = exceeds(total, bounds.log_max_abs[:, :S], log_a[:, :, c0:c1], log_y[:, c0:c1], dg).nonzero(
            as_tuple=True)
        found.append((g, s, h, c + c0))
        del total
    g, s, h, c = (torch.cat(x) for x in zip(*found)) if len(found) > 1 else found[0]
    corr = torch.zeros(H * C * S, device=a.device)
    a_flat = a.reshape(-1)
    rows = bounds.rows.reshape(-1, dg)
    n_sources = bounds.rows.shape[1]
    step = max(1, chunk_bytes // (16 * dg))
    for k in range(0, len(g), step):  # bounded working memory however many candidates
        gk, sk, hk, ck = g[k : k + step], s[k : k + step], h[k : k + step], c[k : k + step]
        part = (hk * C + ck) * S + sk
        u = rows.index_select(0, (hk * n_sources + sk) * G + gk)  # [n, dg]
        ys = sign_abs.view(C * G, 2, dg).index_select(0, ck * G + gk)  # [n, 2, dg]
        val = u.mul_(a_flat.index_select(0, part)[:, None]).mul_(ys[:, 0]).sub_(ys[:, 1]).clamp_min_(0.0).sum(-1)
        corr.index_add_(0, part, val)
    return corr.view(H, C, S)


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
    ``_l1_correction``.
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
    if bounds is None:
        bounds = L1Bounds.build(acts.v, acts.W_O)
    causal = torch.ones(t1 - t0, t1, dtype=torch.bool, device=y.device).tril(t0)
    a = torch.where(causal, a, 0.0)
    return prox - 2 * _l1_correction(bounds, a, y, sign, chunk_bytes, dropped)


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
    ``_l1_correction``): if that is not 0, the layer must be computed again without ``dropped``.
    """
    n_tokens = acts.resid_pre.shape[0]
    n_heads = acts.W_O.shape[0]
    device = acts.resid_pre.device
    # Tables of the size of one hook_result, built once per layer.
    bounds = L1Bounds.build(acts.v, acts.W_O) if norm == "l1" else None
    # Several [H, C, T] fp32 temporaries and, for L1, the [G, T, H, C] bound tensor and its test (or,
    # fused, a candidate list for 1/16 of it) live at once; size C to the byte budget (small chunks
    # also skip more of the non-causal half).
    n_groups = bounds.powers.shape[0] if bounds is not None else 0
    bound_bytes = n_groups * (0.5 if kernels.available(device) else 12)
    per_target = int((24 + bound_bytes) * n_heads * n_tokens)
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
