"""Exact L1 proximities of attention parts, without materialising the parts (SPEC sections 2-3).

For a whole ``y`` (target ``t``) and a part ``a * u`` (``a = pattern[h, t, s]``, ``u = v[s, kv(h)] @ W_O[h]``),
write ``w_i = a * sign(y_i) * u_i`` with ``sign(0) = +1``. Per coordinate,
``|y_i| - |y_i - a u_i| = |y_i| - ||y_i| - w_i|``, which is ``w_i`` while ``w_i <= |y_i|`` and
``w_i - 2 (w_i - |y_i|)`` beyond. Summed over coordinates::

    prox = a * <sign(y), u>  -  2 * sum_i relu(a * sign(y_i) * u_i - |y_i|)

an identity, not an approximation. The **main term** is ``a * (sign(y) @ W_O[h]^T) . v[s]``: one matmul per
chunk of targets, as cheap as the attention scores. The **correction** is non-zero only where the part
overshoots ``y`` on a coordinate (``a |u_i| > |y_i|`` with matching signs): about 0.05% of (part,
coordinate) pairs on SmolLM2. The method finds those and evaluates the correction there alone.

What is bounded. Coordinates are split into ``G`` groups of ``dg = COORD_GROUP`` (the last one padded with
``u = 0``, ``|y| = 1``, which never overshoot). Per (group, head, target, source), with ``U`` the group's
largest ``|u_i|`` and ``Y`` its smallest ``|y_i|``, the largest overshoot ratio is bounded by a Hoelder sum
of ``p``-th powers (``p = BOUND_POWER``)::

    max_i a|u_i|/|y_i| [signs agree]  <=  a * U / Y * (sum_i x_i z_i)^(1/p),
    x_i = (|u_i| / U)^p,   z_i = (Y / |y_i|)^p [sign(y_i) u_i > 0]

Every term is in ``[0, 1]`` and the largest is one of the terms, so the right side is an upper bound. The
signs are split into the two halves of the inner dimension (the positive parts of ``u`` against the
coordinates where ``y >= 0``, the negative parts against ``y < 0``), so for all sources, heads and targets
of a chunk the sums are one batched matmul ``[G, S*H, 2dg] @ [G, 2dg, C]`` over tables built once per
layer (``L1Bounds``).

How candidates are chosen. A (group, part) pair is a candidate when its bound, computed in log space,
exceeds 1 with a slack: ``log(max(total, floor)) / p + log U + log a > log Y - BOUND_SLACK``
(``_bound_exceeds``; on GPUs fused into the matmul's epilogue, ``kernels.bound_candidates``). Pairs
outside the causal half have ``a = 0``, ``log a = -inf``: never candidates. About 1.02x the pairs that
truly overshoot pass (71k for 66k of 2.4M on SmolLM2 layers 0/7/15/29).

How the correction is computed. For each candidate, ``sum_i relu(a * sign(y_i) * u_i - |y_i|)`` over the
group's ``dg`` coordinates, in fp32 from the stored ``u`` rows, added into its part (``_evaluate``, or
``kernels.correction``).

Why this is exact.

* No overshooting coordinate is missed. Where one exists, its ratio ``a|u_i|/|y_i|`` exceeds 1, so the
  true bound does. The computed sum can fall short of the true one only by rounding and by underflow of
  the p-th powers. Rounding is negligible in fp32; on GPUs the tables and ``z`` are bf16 (fp32's range,
  2^-8 rounding: 0.4% on ``z``, ~3% on ``x^p`` once the four squarings of ``x^16`` compound it, 0.2% on
  the bound), multiplied on tensor cores with fp32 accumulation. Each underflowed term is below 2^-126
  and there are at most ``2 dg`` of them, so with the floor (twice their largest possible total,
  ``_underflow_floor``) ``max(total, floor)`` is at least 2/3 of the true sum. The slack lets the sum be
  underestimated by up to ``e^(p * slack) = 2.2x`` and the test still pass, far more than both together:
  the test stays an upper bound.
* Extra candidates change nothing: on a pair that does not overshoot every ``relu`` term is exactly 0.0.
  So the correction equals the dense one, and ``prox`` equals ``||y|| - ||y - a u||`` up to fp32 rounding
  for *every* part; the contributions derived from it are complete, and a selection ``c >= tau_min`` over
  them misses no part (only parts within rounding of ``tau_min`` may fall either side).

Chunking. Callers pass the targets in chunks (``contributions.layer_contributions``, at least
``MIN_CHUNK_TARGETS`` a chunk); within a chunk the unfused bound tensor is computed in blocks of targets
and the candidates are evaluated in batches, both within ``chunk_bytes``. No ``T*T*H*d`` tensor exists.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import kernels

BOUND_POWER = 16  # p of the Hoelder bound: the sum of p-th powers overestimates the max by <= n^(1/p)
BOUND_SLACK = 0.05  # log-space slack covering rounding and fp32 underflow of the p-th powers
# The slack lets the bound's sum be underestimated by up to e^(p * slack) = 2.2x and stay an upper
# bound, so on GPUs the matmul runs in bf16 (fp32 range, 2^-8 rounding) on tensor cores.
COORD_GROUP = 72  # coordinates per group: one bound per (group, head, target, source)
# Each chunk re-reads the layer's bound tables (2x the size of all head outputs): fewer than this
# many targets per chunk and long prompts spend their time re-reading them (T=2048: 6x slower).
MIN_CHUNK_TARGETS = 64
_TINY = 1e-30


# Head space, shared with contributions.py: they live here because that module imports this one.
def expand_kv(v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat grouped key/value heads so head h reads kv head ``h // (H / H_kv)``."""
    n_kv = v.shape[1]
    if n_kv == n_heads:
        return v
    return v.repeat_interleave(n_heads // n_kv, dim=1)


def head_outputs(v: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """``u[s, h] = v[s, kv(h)] @ W_O[h]``, shape [H, T, d], fp32."""
    n_heads = W_O.shape[0]
    v = expand_kv(v, n_heads).float()  # [T, H, dh]
    return torch.einsum("the,hed->htd", v, W_O.float())


def _pow16_(x: torch.Tensor) -> torch.Tensor:
    for _ in range(4):  # x**16 by squaring: exact enough and 4 cheap passes
        x.mul_(x)
    return x


@dataclass
class L1Bounds:
    """Per-layer tables of the candidate search and the correction.

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

    @property
    def n_groups(self) -> int:
        return self.powers.shape[0]


def search_bytes(bounds: L1Bounds | None, device: torch.device) -> float:
    """Working memory of the candidate search per (head, source, target) of a chunk: the ``[G, S, H, C]``
    bound tensor and its test (12 bytes an entry) or, with the fused kernels, a candidate list for 1/16
    of it (0.5 bytes). 0 without bounds (L2)."""
    n_groups = bounds.n_groups if bounds is not None else 0
    return n_groups * (0.5 if kernels.available(device) else 12)


def proximity(
    y: torch.Tensor, a: torch.Tensor, v: torch.Tensor, W_O: torch.Tensor, first_target: int, bounds: L1Bounds,
    chunk_bytes: int, dropped: torch.Tensor | None = None, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||y|| - ||y - a u||`` (before the ``eps`` clamp) for the parts of a chunk of targets: fp32 ``[H, C, S]``.

    ``y`` ``[C, d]`` holds the wholes of targets ``first_target..first_target+C-1``, ``a`` ``[H, C, S]`` their
    attention weights over sources ``0..S-1``, ``v`` ``[H, S, dh]`` (kv heads expanded), ``W_O`` ``[H, dh, d]``,
    all fp32. Entries with ``s > t`` are meaningless (callers mask them). ``dropped``: see ``correction``.
    ``weights`` ``[C, d]`` (>= 0): the L1 norm weighted per target and coordinate,
    ``sum_i w_i (|y_i| - |y_i - a u_i|)`` (a norm inside the block, linearised: SPEC 4a). The identity
    and the search are unchanged (overshoots are where ``a |u_i| > |y_i|``); both terms are weighted.
    """
    sign = torch.where(y >= 0, 1.0, -1.0)  # sign(0) = +1, in the main term and the correction alike
    signed = sign if weights is None else sign * weights
    sign_q = torch.einsum("cd,hed->hce", signed, W_O)  # [H, C, dh]
    prox = a * (sign_q @ v.transpose(1, 2))  # [H, C, S]: a * <sign(y), u>
    causal = torch.ones(a.shape[1], a.shape[2], dtype=torch.bool, device=y.device).tril(first_target)
    a = torch.where(causal, a, 0.0)  # log 0 = -inf: the non-causal half is never a candidate
    return prox - 2 * correction(bounds, a, y, sign, chunk_bytes, dropped, weights)


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


def correction(
    bounds: L1Bounds, a: torch.Tensor, y: torch.Tensor, sign: torch.Tensor, chunk_bytes: int,
    dropped: torch.Tensor | None = None, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i relu(a * sign(y_i) * u_i - |y_i|)`` for every part, exactly: fp32 ``[H, C, S]``.

    ``a`` ``[H, C, S]`` is 0 outside the causal half; ``sign`` is ``sign(y)`` with ``sign(0) = +1``, as the
    main term used it. Candidates are searched (module docstring) and only they are evaluated.

    Where the fused kernels run (``kernels.available``), given ``dropped`` (an int64 ``[1]`` device
    tensor) the search does not wait for the device: the candidates that did not fit its list are
    added to ``dropped``, and the caller must redo the work with ``dropped=None`` if any were.
    """
    H, C, S = a.shape
    G, dg = bounds.n_groups, bounds.rows.shape[-1]
    d = y.shape[-1]
    if G * dg > d:  # padding coordinates: |y| = 1 and u = 0 never need correcting
        y = torch.nn.functional.pad(y, (0, G * dg - d), value=1.0)
        sign = torch.nn.functional.pad(sign, (0, G * dg - d), value=1.0)
        if weights is not None:
            weights = torch.nn.functional.pad(weights, (0, G * dg - d), value=0.0)
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
    if kernels.available(y.device) and weights is None:  # matmul, test and list in one kernel, the correction in another
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
    found = _candidates(powers, z, bounds.log_max_abs[:, :S], log_a, log_y, dg, chunk_bytes, exceeds)
    w = None if weights is None else weights.reshape(C * G, dg)
    return _evaluate(found, bounds.rows, sign_abs, a, chunk_bytes, w)


def _candidates(
    powers: torch.Tensor, z: torch.Tensor, log_u: torch.Tensor, log_a: torch.Tensor, log_y: torch.Tensor, dg: int,
    chunk_bytes: int, exceeds: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused search: indices ``(g, s, h, c)`` of the (group, part) pairs whose bound exceeds 1."""
    G, S, H = log_u.shape
    C = z.shape[-1]
    # The bound tensor and its test take 12 bytes per entry: targets in blocks that fit the budget
    # (a chunk sized for the kernels is 24x too large for them), of at least MIN_CHUNK_TARGETS.
    block = max(MIN_CHUNK_TARGETS, chunk_bytes // (12 * G * S * H))
    found = []
    for c0 in range(0, C, block):
        c1 = min(C, c0 + block)
        total = torch.bmm(powers, z[:, :, c0:c1]).view(G, S, H, c1 - c0)
        g, s, h, c = exceeds(total, log_u, log_a[:, :, c0:c1], log_y[:, c0:c1], dg).nonzero(as_tuple=True)
        found.append((g, s, h, c + c0))
        del total
    return tuple(torch.cat(x) for x in zip(*found)) if len(found) > 1 else found[0]


def _evaluate(
    found: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], rows: torch.Tensor, sign_abs: torch.Tensor,
    a: torch.Tensor, chunk_bytes: int, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The correction of the candidates ``found``, summed per part: fp32 ``[H, C, S]`` (0 elsewhere).

    ``rows`` ``[H, n_sources, G, dg]`` (u), ``sign_abs`` ``[C, G, 2, dg]`` (sign and ``|y|``), ``a`` ``[H, C, S]``,
    ``weights`` ``[C * G, dg]`` or None (see ``proximity``).
    """
    g, s, h, c = found
    H, C, S = a.shape
    n_sources, G, dg = rows.shape[1:]
    corr = torch.zeros(H * C * S, device=a.device)
    a_flat = a.reshape(-1)
    rows = rows.reshape(-1, dg)
    step = max(1, chunk_bytes // (16 * dg))
    for k in range(0, len(g), step):  # bounded working memory however many candidates
        gk, sk, hk, ck = g[k : k + step], s[k : k + step], h[k : k + step], c[k : k + step]
        part = (hk * C + ck) * S + sk
        u = rows.index_select(0, (hk * n_sources + sk) * G + gk)  # [n, dg]
        ys = sign_abs.view(C * G, 2, dg).index_select(0, ck * G + gk)  # [n, 2, dg]
        val = u.mul_(a_flat.index_select(0, part)[:, None]).mul_(ys[:, 0]).sub_(ys[:, 1]).clamp_min_(0.0)
        if weights is not None:
            val.mul_(weights.index_select(0, ck * G + gk))
        val = val.sum(-1)
        corr.index_add_(0, part, val)
    return corr.view(H, C, S)
