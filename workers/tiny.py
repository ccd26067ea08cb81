"""Tiny random-weight models of several architectures, built from configs with no download.

They cover what the embedded Llama-family model does not: LayerNorm with biases (GPT-2),
learned positions (OPT), parallel attention+FFN (GPT-NeoX/Pythia), and grouped-query attention
with rotary embeddings (Llama). Each is saved as a normal Hugging Face directory (safetensors,
optionally sharded, with a byte-level BPE tokenizer trained here), so the stage loader reads
it exactly as it reads a real checkpoint. Also used by the benchmarks for model *shapes*
(e.g. a 13B-shaped Llama) where only the cost matters.

``ARCHITECTURES`` are the four the engine tests and benchmarks run on. ``FAMILIES`` adds one tiny
model per further family for the conformance suite (``tests/test_conformance.py``): GPT-Neo with
local layers, OPT-350m's post-LN layout, GPT-J, Mistral with a short sliding window, Qwen2/Qwen3,
Phi, Phi-3, Gemma 1/2/3, StableLM, Falcon (7B and new-decoder layouts), OLMo-2 and three
mixture-of-experts families. Sliding windows are 4 tokens, so prompts of 12+ tokens use them.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("gpt2", "llama", "opt", "neox")
# Further families (conformance suite); the four above keep their weights and behaviour unchanged.
EXTRA_FAMILIES = (
    "gpt_neo", "opt_350m", "gptj", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "stablelm",
    "falcon", "falcon_new", "gemma2", "gemma3", "olmo2", "mixtral", "qwen2_moe", "olmoe",
)
FAMILIES = ARCHITECTURES + EXTRA_FAMILIES
WINDOW = 4  # sliding / local attention window of the tiny models that have one

_CORPUS = """The capital of France is Paris. The capital of Italy is Rome. Berlin is in Germany.
A transformer reads tokens and writes a residual stream; attention heads move information
between positions and feed-forward blocks transform it. def add(a, b): return a + b
for i in range(10): print(i * i) # squares. She sold sea shells by the sea shore.
Water boils at 100 degrees Celsius. The quick brown fox jumps over the lazy dog 42 times.
"""


def train_tokenizer(vocab_size: int = 384):
    """A small byte-level BPE tokenizer with BOS/EOS/PAD tokens (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def tiny_config(arch: str, n_layers: int = 4, vocab_size: int = 384, d_model: int = 64, n_heads: int = 4):
    """A small config of the given architecture family (one of ``FAMILIES``)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=512, **common)
    if arch == "llama":
        return LlamaConfig(
            num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2), intermediate_size=4 * d_model,
            max_position_embeddings=512, tie_word_embeddings=False, **common,
        )
    if arch == "opt":
        return OPTConfig(
            num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
            ffn_dim=4 * d_model, max_position_embeddings=512, word_embed_proj_dim=d_model, **common,
        )
    if arch == "neox":
        return GPTNeoXConfig(
            num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
            intermediate_size=4 * d_model, max_position_embeddings=512, use_parallel_residual=True,
            rotary_pct=0.5, tie_word_embeddings=False, **common,
        )
    if arch in EXTRA_FAMILIES:
        return _extra_config(arch, n_layers, d_model, n_heads, common)
    raise ValueError(f"architecture: {arch!r} is not one of {', '.join(FAMILIES)}")


def _extra_config(arch: str, n_layers: int, d: int, n_heads: int, common: dict):
    """Configs of ``EXTRA_FAMILIES``: each family's own layout, at tiny sizes."""
    import transformers as tf

    dh = d // n_heads
    kv = max(1, n_heads // 2)
    llama_like = dict(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=n_heads,
                      num_key_value_heads=kv, intermediate_size=2 * d, max_position_embeddings=512,
                      tie_word_embeddings=False, **common)
    alternating = ["sliding_attention", "full_attention"] * n_layers
    if arch == "gpt_neo":  # global and local layers alternate; local attention, no 1/sqrt(d_head) scale
        return tf.GPTNeoConfig(num_layers=n_layers, hidden_size=d, num_heads=n_heads, intermediate_size=2 * d,
                               attention_types=[[["global", "local"], (n_layers + 1) // 2]], window_size=WINDOW,
                               max_position_embeddings=512, **common)
    if arch == "opt_350m":  # post-LN, no final norm, embeddings projected in and out
        return tf.OPTConfig(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=n_heads, ffn_dim=2 * d,
                            max_position_embeddings=512, do_layer_norm_before=False, word_embed_proj_dim=d // 2,
                            **common)
    if arch == "gptj":  # parallel block with one LayerNorm, partial rotary (GPT-J's interleaved layout)
        return tf.GPTJConfig(n_layer=n_layers, n_embd=d, n_head=n_heads, n_inner=2 * d, rotary_dim=dh // 2,
                             n_positions=512, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=WINDOW, head_dim=dh, **llama_like)
    if arch == "qwen2":  # biases on q, k, v (not on o)
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen3":  # RMSNorm on q and k per head
        return tf.Qwen3Config(head_dim=dh, **llama_like)
    if arch == "phi":  # parallel block, partial rotary, dense with bias
        return tf.PhiConfig(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=n_heads,
                            num_key_value_heads=n_heads, intermediate_size=2 * d, max_position_embeddings=512,
                            rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                             "rope_type": "default"},
                            tie_word_embeddings=False, **common)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(original_max_position_embeddings=512, **llama_like)
    if arch == "gemma":  # RMSNorm gain 1 + w, embedding scaled by sqrt(d), multi-query
        return tf.GemmaConfig(**{**llama_like, "num_key_value_heads": 1, "tie_word_embeddings": True}, head_dim=dh)
    if arch == "stablelm":  # LayerNorm, biases on q, k, v, partial rotary
        return tf.StableLmConfig(use_qkv_bias=True, **llama_like)
    if arch in ("falcon", "falcon_new"):
        if arch == "falcon":  # Falcon-7B: one KV head, one shared LayerNorm
            layout = dict(multi_query=True, new_decoder_architecture=False)
        else:  # Falcon-40B: KV groups in the fused QKV, separate LayerNorms for attention and FFN
            layout = dict(new_decoder_architecture=True, num_kv_heads=kv, num_ln_in_parallel_attn=2)
        return tf.FalconConfig(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=n_heads,
                               ffn_hidden_size=2 * d, parallel_attn=True, bias=False, alibi=False,
                               max_position_embeddings=512, tie_word_embeddings=False, **layout, **common)
    if arch == "gemma2":  # sandwich norms, soft-capping, sliding layers
        return tf.Gemma2Config(**{**llama_like, "tie_word_embeddings": True}, head_dim=dh, query_pre_attn_scalar=dh,
                               sliding_window=WINDOW, layer_types=alternating[:n_layers])
    if arch == "gemma3":  # sandwich norms, q/k norms, sliding layers
        return tf.Gemma3TextConfig(**{**llama_like, "tie_word_embeddings": True}, head_dim=dh,
                                   query_pre_attn_scalar=dh, sliding_window=WINDOW, layer_types=alternating[:n_layers])
    if arch == "olmo2":  # norms after attention and FFN only, q/k norms over all heads
        return tf.Olmo2Config(**llama_like)
    if arch == "mixtral":
        return tf.MixtralConfig(**{**llama_like, "intermediate_size": d // 2}, num_local_experts=4,
                                num_experts_per_tok=2)
    if arch == "qwen2_moe":  # routed experts and a gated shared expert
        return tf.Qwen2MoeConfig(**llama_like, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=d // 2,
                                 shared_expert_intermediate_size=d, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "olmoe":
        return tf.OlmoeConfig(**{**llama_like, "intermediate_size": d // 2}, num_experts=4, num_experts_per_tok=2)
    raise AssertionError(arch)


def build_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Build, randomly initialise and save a tiny model with its tokenizer; return the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer()
    config = tiny_config(arch, n_layers=n_layers, vocab_size=len(tokenizer), d_model=d_model, n_heads=n_heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform attention; larger weights give peaked, realistic patterns.
    with torch.no_grad():
        if arch in ARCHITECTURES:
            for name, p in model.named_parameters():
                if p.ndim == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                    p.mul_(4.0)
                elif p.ndim == 1 and "bias" in name:
                    p.normal_(0.0, 0.05)
        else:
            _scale_extra(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out


def _scale_extra(model) -> None:
    """Weights of ``EXTRA_FAMILIES`` models: matrices (experts' too) x4 for peaked attention, random biases,
    and norm gains moved off their init value (so a gain read as ``w`` instead of ``1 + w`` shows). Where q
    and k are normalised, scaling their projections does nothing: their norms' gains are raised instead."""
    import torch

    gemma = "gemma" in type(model).__name__.lower()
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if p.ndim >= 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
            p.mul_(4.0)
        elif p.ndim == 1 and name.endswith("bias"):
            p.normal_(0.0, 0.05)
        elif p.ndim == 1 and leaf in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
            p.copy_((1.0 if gemma else 2.0) + 0.1 * torch.randn_like(p))  # gain 2 (Gemma: 1 + w)
        elif p.ndim == 1:  # other norm gains
            p.add_(0.1 * torch.randn_like(p))
