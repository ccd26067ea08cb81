"""Norms inside a block, linearised at their actual input (SPEC 4a).

Gemma-2/3 and OLMo-2 normalise the attention output (``post_attention_layernorm``) and the FFN
output (``post_feedforward_layernorm``) before they join the residual stream. An RMSNorm
``N(x) = g * x / rms(x)`` with its scale frozen at the input ``x`` is the diagonal map
``N_lin(p) = (g / rms(x)) * p``, so ``N(x) = sum_i N_lin(p_i)`` for the parts ``p_i`` of ``x``: every
part is replaced by its image, and the contributions follow SPEC 2 against the vector that really
joins the stream. ``scale(x)`` is that diagonal, ``[T, d]``.

The gain is read from the module itself (``g = N(1) * sqrt(1 + eps)``), so variants such as
Gemma's ``1 + w`` need no special case; the stage checks ``scale(x) * x == N(x)`` on a probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearisedRMSNorm:
    """An RMSNorm's gain and epsilon, and the diagonal of its linearisation at an input."""

    gain: torch.Tensor  # [d], fp32
    eps: float

    @classmethod
    def of(cls, module: torch.nn.Module, d_model: int) -> "LinearisedRMSNorm":
        if "RMSNorm" not in type(module).__name__:
            raise NotImplementedError(f"{type(module).__name__}: only RMSNorms inside blocks are linearised (SPEC 4a)")
        eps = getattr(module, "variance_epsilon", None)
        eps = float(getattr(module, "eps", 1e-6) if eps is None else eps)
        p = next(module.parameters())
        with torch.inference_mode():
            ones = torch.ones(1, d_model, dtype=p.dtype, device=p.device)
            gain = module(ones)[0].float() * math.sqrt(1.0 + eps)
        return cls(gain, eps)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``g / rms(x)`` per row of ``x`` ``[T, d]`` (fp32, the norm's own ``eps`` included)."""
        x = x.float()
        rms = torch.sqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return self.gain.to(x.device)[None, :] / rms
