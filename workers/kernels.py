"""Fused GPU kernels for the exact L1 correction (``exact_l1.correction``; the method is in that module).

Unfused, the candidate search is a batched matmul writing a ``[G, S, H, C]`` bound tensor, a pass
testing it and a ``nonzero`` over the result: on a GPU these read and write the bound tensor (72
groups per part for Llama-2-13B) several times and cost more than the forward pass, and
``nonzero`` makes the host wait. ``bound_candidates`` does the three in one Triton kernel: each
program multiplies one tile of the bound's matmul in registers, tests it in the epilogue and
appends the indices that pass to a list, so the bound tensor never reaches memory. ``correction``
then evaluates the listed candidates, reading their number on the device: nothing waits for the
device inside a layer (a list that overflowed is reported for the caller to redo the work).

Triton ships with CUDA builds of PyTorch. Where it is missing, ``available()`` is False and the
unfused path runs. The tests run the kernels on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``, tests/kernel_checks.py).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused path runs
    triton = None


_failure: str | None = None  # why the kernels stopped being used in this process


def available(device: torch.device) -> bool:
    """Whether the kernels run for tensors on ``device``: on GPUs with Triton, unless they failed
    (``ROUTESCOPE_KERNEL=torch`` disables them; ``=triton`` forces them, also on CPUs, interpreted)."""
    choice = os.environ.get("ROUTESCOPE_KERNEL", "auto")
    if triton is None or choice == "torch":
        return False
    if choice == "triton":
        return True
    return device.type == "cuda" and _failure is None


def fall_back(exc: Exception) -> None:
    """After a kernel failure: warn and use the unfused path from now on, unless the kernels were forced."""
    global _failure
    if os.environ.get("ROUTESCOPE_KERNEL") == "triton":
        raise exc
    _failure = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"the fused L1 kernels failed ({_failure}); using the unfused path "
                  "(set ROUTESCOPE_KERNEL=torch to skip them)")


if triton is not None:

    @triton.jit
    def _bound_candidates_kernel(
        powers, z, log_u, log_a, log_y, out, count,
        n_rows, n_cols, n_inner, n_heads, first_target, capacity, floor, inv_p,
        s_pg, s_pm, s_pk, s_zg, s_zk, s_zn, s_ug, s_am, s_an, s_yg,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        g = tl.program_id(0)  # fastest-varying: programs sharing a log_a tile run together
        m0, n0 = tl.program_id(1) * BM, tl.program_id(2) * BN
        # Rows are (source, head) pairs, columns targets: a tile whose first source comes after its
        # last target is all in the non-causal half (log a = -inf) and is skipped.
        if m0 // n_heads <= first_target + tl.minimum(n0 + BN, n_cols) - 1:
            rm = m0 + tl.arange(0, BM)
            rn = n0 + tl.arange(0, BN)
            rk = tl.arange(0, BK)
            in_m, in_n = rm < n_rows, rn < n_cols
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, n_inner, BK):
                k = k0 + rk
                a = tl.load(powers + g * s_pg + rm[:, None] * s_pm + k[None, :] * s_pk,
                            mask=in_m[:, None] & (k[None, :] < n_inner), other=0.0)
                b = tl.load(z + g * s_zg + k[:, None] * s_zk + rn[None, :] * s_zn,
                            mask=(k[:, None] < n_inner) & in_n[None, :], other=0.0)
                acc += tl.dot(a, b)
            # The epilogue is exact_l1._bound_exceeds: log(max(total, floor)) / p + log U + log a > log Y.
            lu = tl.load(log_u + g * s_ug + rm, mask=in_m, other=0.0)
            la = tl.load(log_a + rm[:, None] * s_am + rn[None, :] * s_an, mask=in_m[:, None] & in_n[None, :],
                         other=float("-inf"))
            ly = tl.load(log_y + g * s_yg + rn, mask=in_n, other=0.0)
            r = tl.log(tl.maximum(acc, floor)) * inv_p + lu[:, None] + la
            hit = (r > ly[None, :]) & in_m[:, None] & in_n[None, :]
            flat_hit = tl.reshape(hit.to(tl.int32), (BM * BN,))
            n_hit = tl.sum(flat_hit, axis=0)
            if n_hit > 0:
                base = tl.atomic_add(count, n_hit)
                pos = base + tl.cumsum(flat_hit, axis=0) - 1
                index = (g * n_rows + rm[:, None].to(tl.int64)) * n_cols + rn[None, :]
                tl.store(out + pos, tl.reshape(index, (BM * BN,)), mask=(flat_hit > 0) & (pos < capacity))

    @triton.jit
    def _correction_kernel(
        index, count, capacity, rows, sign_abs, a, corr,
        n_sources, n_groups, n_heads, n_targets, n_cols_a, dg,
        DG: tl.constexpr, BLOCK: tl.constexpr,
    ):
        n = tl.minimum(tl.load(count), capacity)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if tl.program_id(0) * BLOCK < n:  # the grid covers the list's capacity; its tail is idle
            valid = i < n
            f = tl.load(index + i, mask=valid, other=0)
            per_group = n_cols_a * n_heads * n_targets
            g = f // per_group
            sh = (f % per_group) // n_targets
            c = f % n_targets
            s, h = sh // n_heads, sh % n_heads
            part = (h * n_targets + c) * n_cols_a + s  # into a / corr, [H, C, S]
            weight = tl.load(a + part, mask=valid, other=0.0)
            k = tl.arange(0, DG)
            both = valid[:, None] & (k < dg)[None, :]
            u = tl.load(rows + ((h * n_sources + s) * n_groups + g)[:, None] * dg + k[None, :], mask=both, other=0.0)
            y_row = sign_abs + ((c * n_groups + g) * 2 * dg)[:, None] + k[None, :]
            sign = tl.load(y_row, mask=both, other=0.0)
            y_abs = tl.load(y_row + dg, mask=both, other=0.0)
            val = tl.sum(tl.maximum(u * weight[:, None] * sign - y_abs, 0.0), axis=1)
            tl.atomic_add(corr + part, val, mask=valid & (val > 0))


@dataclass
class Candidates:
    """The kernel's list: ``index[:count]`` are flat indices into ``[G, S*H, C]`` (no order)."""

    index: torch.Tensor  # int64 [capacity]
    count: torch.Tensor  # int32 [1], on the device; above ``capacity`` where the list overflowed
    capacity: int

    def dropped(self) -> torch.Tensor:
        """How many passing indices did not fit (int64 [1], on the device: no host sync)."""
        return (self.count.long() - self.capacity).clamp_min_(0)


# About 2% of bounds pass on SmolLM2. Lists are sized for 1/16 of the bounds, or 1.5x the highest
# rate a synced search has seen in this process; a synced search re-runs, sized exactly, when its
# list overflows (a deferred one reports it: see Candidates.dropped).
_MIN_CAPACITY = 1024
_pass_rate = 1 / 16


def bound_candidates(powers: torch.Tensor, z: torch.Tensor, log_u: torch.Tensor, log_a: torch.Tensor,
                     log_y: torch.Tensor, floor: float, inv_p: float, n_heads: int = 1,
                     first_target: int | None = None, synced: bool = True) -> Candidates:
    """Where ``log(max(powers @ z, floor)) * inv_p + log_u + log_a > log_y``, as flat indices into ``[G, M, N]``.

    ``powers`` ``[G, M, K]`` and ``z`` ``[G, K, N]`` (bf16 or fp32, fp32 accumulation), ``log_u``
    ``[G, M]``, ``log_a`` ``[M, N]``, ``log_y`` ``[G, N]`` (fp32). Row ``m`` is source
    ``m // n_heads``, column ``n`` target ``first_target + n``: tiles with no source at or before a
    target are skipped (their ``log_a`` must be -inf). Default: no tile is skipped.

    ``synced``: the host reads the number found (as ``nonzero`` does) and the list always holds
    them all. Otherwise nothing waits for the device, and the caller must check ``dropped()``.
    """
    G, M, K = powers.shape
    N = z.shape[2]
    if first_target is None:
        n_heads, first_target = 1, M
    if log_u.stride(1) != 1 or log_y.stride(1) != 1:
        raise ValueError("bound_candidates: log_u and log_y must be contiguous along their last dimension")
    kernel, blocks = _bound_kernel(powers.device)
    grid = lambda meta: (G, triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))  # noqa: E731
    global _pass_rate
    count = torch.zeros(1, dtype=torch.int32, device=powers.device)
    capacity = max(_MIN_CAPACITY, int(G * M * N * _pass_rate))
    while True:
        out = torch.empty(capacity, dtype=torch.int64, device=powers.device)
        kernel[grid](
            powers, z, log_u, log_a, log_y, out, count,
            M, N, K, n_heads, first_target, capacity, floor, inv_p,
            powers.stride(0), powers.stride(1), powers.stride(2), z.stride(0), z.stride(1), z.stride(2),
            log_u.stride(0), log_a.stride(0), log_a.stride(1), log_y.stride(0), **blocks,
        )
        if not synced:
            return Candidates(out, count, capacity)
        n = int(count.item())
        _pass_rate = max(_pass_rate, 1.5 * n / (G * M * N))  # never lowered: layers differ
        if n <= capacity:
            return Candidates(out, count, capacity)
        capacity = n  # the list overflowed (indices past its end were dropped): once more, sized exactly
        count.zero_()


def correction(candidates: Candidates, rows: torch.Tensor, sign_abs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_i relu(a * sign(y_i) * u_i - |y_i|)`` over each candidate's group, summed per part: fp32 ``[H*C*S]``.

    ``rows`` ``[H, n_sources, G, dg]`` (u), ``sign_abs`` ``[C, G, 2, dg]`` (sign and ``|y|``), ``a``
    ``[H, C, S]``, all fp32 and contiguous; the candidates index ``[G, S*H, C]``. Needs no host sync.
    """
    H, n_sources, G, dg = rows.shape
    C, S = a.shape[1], a.shape[2]
    corr = torch.zeros(H * C * S, device=a.device)
    kernel, blocks = _correction_kernel_for(a.device)
    grid = lambda meta: (triton.cdiv(candidates.capacity, meta["BLOCK"]),)  # noqa: E731
    kernel[grid](
        candidates.index, candidates.count, candidates.capacity, rows.contiguous(), sign_abs, a, corr,
        n_sources, G, H, C, S, dg, DG=triton.next_power_of_2(dg), **blocks,
    )
    return corr


_tuned: dict[str, object] = {}


def _bound_kernel(device: torch.device) -> tuple[object, dict[str, int]]:
    """The candidate kernel and the block sizes to pass it: small fixed ones in the interpreter; on
    GPUs autotuned once per coordinate-group size (the count is reset between trials)."""
    if device.type != "cuda":
        return _bound_candidates_kernel, {"BM": 32, "BN": 32, "BK": 16}
    if "bound" not in _tuned:
        configs = [triton.Config({"BM": bm, "BN": bn, "BK": 32}, num_warps=w, num_stages=3)
                   for bm, bn, w in ((128, 64, 4), (128, 64, 8), (64, 64, 4), (128, 128, 8))]
        _tuned["bound"] = triton.autotune(configs, key=["n_inner"], reset_to_zero=["count"])(_bound_candidates_kernel)
    return _tuned["bound"], {}


def _correction_kernel_for(device: torch.device) -> tuple[object, dict[str, int]]:
    """The correction kernel and its block size, as ``_bound_kernel`` (the sums are reset between trials)."""
    if device.type != "cuda":
        return _correction_kernel, {"BLOCK": 32}
    if "correction" not in _tuned:
        configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 4), (32, 4), (64, 8))]
        _tuned["correction"] = triton.autotune(configs, key=["dg"], reset_to_zero=["corr"])(_correction_kernel)
    return _tuned["correction"], {}
