"""Mixture-of-experts FFN blocks (SPEC 4b): the routed experts' and shared expert's parts.

``M{l}_t`` is the whole MoE output, read from the block's output hook like any FFN, so routes need
nothing from here. The detail of one ``(l, t)`` does: from the block's input ``x_t`` and its own
tensors (router ``gate``, fused ``experts.gate_up_proj`` / ``down_proj``, optional
``shared_expert`` with its sigmoid ``shared_expert_gate``, as Mixtral, Qwen2-MoE and OLMoE lay them
out in ``transformers``), each routed expert's output ``gate_e(t) * expert_e(x_t)``, the shared
expert's output, and one expert's neurons ``gate_e(t) * act_e[n] * W_out_e[n]``. The stage checks
on a probe that these parts add up to the block's output, so a block laid out otherwise is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def is_moe(config: Any) -> bool:
    """Whether the config describes mixture-of-experts FFN blocks."""
    return max(int(getattr(config, k, 0) or 0) for k in ("num_local_experts", "num_experts", "n_routed_experts")) > 0


def moe_block(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The MoE FFN module of a decoder layer (``mlp`` with ``gate`` and fused ``experts``), if any."""
    for name in ("mlp", "block_sparse_moe", "moe"):
        block = getattr(layer, name, None)
        experts = getattr(block, "experts", None)
        if block is not None and hasattr(block, "gate") and hasattr(experts, "gate_up_proj"):
            return block
    return None


@dataclass
class ExpertParts:
    """The parts of one position's MoE output: ``outputs[i]`` is ``gates[i] * expert_{experts[i]}(x)``."""

    router_probs: torch.Tensor  # [E] softmax over all experts
    experts: list[int]
    gates: list[float]
    outputs: torch.Tensor  # [k, d], gate included
    shared: torch.Tensor | None  # [d], sigmoid gate included

    def total(self) -> torch.Tensor:
        out = self.outputs.sum(0)
        return out if self.shared is None else out + self.shared


def expert_activations(block: torch.nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """``act(gate_e x) * (up_e x)``: the ``[d_expert]`` input of expert ``expert``'s down projection."""
    ex = block.experts
    gate, up = torch.nn.functional.linear(x, ex.gate_up_proj[expert]).chunk(2, dim=-1)
    return ex.act_fn(gate) * up


def expert_down(block: torch.nn.Module, expert: int) -> torch.Tensor:
    """``W_out`` of expert ``expert`` as ``[d_expert, d]`` (rows are the neurons' vectors)."""
    return block.experts.down_proj[expert].detach().T


def route(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int], list[float]]:
    """The router at one position: softmax over all experts ``[E]``, the routed experts and their gates."""
    with torch.inference_mode():
        logits, weights, indices = block.gate(x[None])
    return torch.softmax(logits.float(), dim=-1)[0], [int(e) for e in indices[0].tolist()], \
        [float(w) for w in weights[0].tolist()]


def expert_parts(block: torch.nn.Module, x: torch.Tensor) -> ExpertParts:
    """The routed and shared experts' outputs at one position, from the block input ``x`` ``[d]``."""
    probs, experts, gates = route(block, x)
    with torch.inference_mode():
        outputs = torch.stack([
            gates[i] * torch.nn.functional.linear(expert_activations(block, x, e), block.experts.down_proj[e])
            for i, e in enumerate(experts)])
        shared = None
        if getattr(block, "shared_expert", None) is not None:
            shared = block.shared_expert(x[None])[0]
            if getattr(block, "shared_expert_gate", None) is not None:
                shared = torch.sigmoid(block.shared_expert_gate(x[None]))[0] * shared
    return ExpertParts(probs, experts, gates, outputs, shared)
