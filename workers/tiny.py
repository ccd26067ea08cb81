"""Tiny random-weight models of several architectures, built from configs with no download.

They cover what the embedded Llama-family model does not: LayerNorm with biases (GPT-2),
learned positions (OPT), parallel attention+FFN (GPT-NeoX/Pythia), and grouped-query attention
with rotary embeddings (Llama). Each is saved as a normal Hugging Face directory (safetensors,
optionally sharded, with a byte-level BPE tokenizer trained here), so the stage loader reads
it exactly as it reads a real checkpoint. Also used by the benchmarks for model *shapes*
(e.g. a 13B-shaped Llama) where only the cost matters.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("gpt2", "llama", "opt", "neox")

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
    """A small config of the given architecture family."""
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
    raise ValueError(f"architecture: {arch!r} is not one of {', '.join(ARCHITECTURES)}")


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
        for name, p in model.named_parameters():
            if p.ndim == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
            elif p.ndim == 1 and "bias" in name:
                p.normal_(0.0, 0.05)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out
