"""Tiny mixture-of-experts models (Mixtral, Qwen2-MoE with a shared expert, OLMoE), saved in the
per-expert checkpoint layout ``transformers`` writes, and an independent float64 reading of their
MoE blocks from the checkpoint tensors (no routescope code)."""

from __future__ import annotations

from pathlib import Path

import torch

MOE_ARCHS = ("mixtral", "qwen2_moe", "olmoe")


def moe_config(arch: str, vocab: int, n_layers: int = 4):
    import transformers as T

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2, num_hidden_layers=n_layers,
                  hidden_size=32, num_attention_heads=4, tie_word_embeddings=False)
    if arch == "mixtral":
        return T.MixtralConfig(intermediate_size=48, num_key_value_heads=2, num_local_experts=4, **common)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                shared_expert_intermediate_size=32, num_key_value_heads=2, **common)
    return T.OlmoeConfig(intermediate_size=48, num_experts=4, num_experts_per_tok=2, **common)


def build_moe_model(arch: str, out: Path, n_layers: int = 4) -> Path:
    from transformers import AutoModelForCausalLM

    from routescope.workers.tiny import train_tokenizer

    tok = train_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(arch, len(tok), n_layers))
    with torch.no_grad():  # peaked attention and routing, as the other tiny models
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.mul_(4.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@torch.no_grad()
def reference_experts(block, x: torch.Tensor) -> tuple[torch.Tensor, list[int], list[float], torch.Tensor, torch.Tensor | None]:
    """Float64 from the HF block's parameters: router probabilities, top-k experts and gates, each
    routed expert's gated output ``[k, d]``, and the gated shared expert's output."""
    x = x.double()
    logits = x @ block.gate.weight.double().T
    probs = torch.softmax(logits, -1)
    k = int(block.gate.top_k)
    top = torch.topk(probs, k)
    gates = top.values
    if getattr(block.gate, "norm_topk_prob", True):  # Mixtral renormalises always
        gates = gates / gates.sum()
    act = torch.nn.functional.silu
    outs = []
    for e, g in zip(top.indices.tolist(), gates.tolist()):
        gu = block.experts.gate_up_proj[e].double()
        gate, up = (gu @ x).chunk(2)
        outs.append(g * (block.experts.down_proj[e].double() @ (act(gate) * up)))
    shared = None
    if getattr(block, "shared_expert", None) is not None:
        se = block.shared_expert
        h = act(se.gate_proj.weight.double() @ x) * (se.up_proj.weight.double() @ x)
        shared = torch.sigmoid(block.shared_expert_gate.weight.double() @ x) * (se.down_proj.weight.double() @ h)
    return probs, top.indices.tolist(), gates.tolist(), torch.stack(outs), shared
