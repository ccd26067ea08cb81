"""An MoE layer against a dense layer of the same active width, traced by routescope, in one run.

A Mixtral-shaped model (8 experts, top-2, expert width F) and a Llama-shaped model with FFN width 2F
(the same active FFN width, the same attention) are built with random weights, 4 layers, and traced
at ``--tokens`` tokens (L1, all positions), each in its own process, alternating dense, MoE, dense,
MoE ... (``--rounds``), so neither gets a warmer machine; medians over the rounds. Printed: plain forward and full trace of each, per layer,
and the ratio MoE / dense of the full trace (goal: at most 1.5x) and of the plain forward (what the
model itself costs; the trace cannot be cheaper than its forward).

    .venv/bin/python benchmarks/bench_moe.py [--tokens 256] [--width 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def build(kind: str, out: Path, width: int, n_layers: int) -> Path:
    import transformers as T
    from transformers import AutoModelForCausalLM

    from routescope.workers.tiny import train_tokenizer

    tok = train_tokenizer()
    common = dict(vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=2, num_hidden_layers=n_layers,
                  hidden_size=width, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                  tie_word_embeddings=False)
    if kind == "moe":
        cfg = T.MixtralConfig(intermediate_size=width, num_local_experts=8, num_experts_per_tok=2, **common)
    else:
        cfg = T.LlamaConfig(intermediate_size=2 * width, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def measure(kind: str, tokens: int, width: int, layers: int, repeat: int) -> dict:
    """One model's figures, in this process."""
    from routescope.cluster import bench

    with tempfile.TemporaryDirectory() as tmp:
        path = build(kind, Path(tmp) / kind, width, layers)
        return bench.run(str(path), tokens, repeat=repeat, out=io.StringIO())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", choices=("dense", "moe"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tokens, args.width, args.layers, args.repeat)))
        return
    runs: dict[str, list[dict]] = {"dense": [], "moe": []}
    for _ in range(args.rounds):
        for kind in ("dense", "moe"):
            cmd = [sys.executable, __file__, "--one", kind, "--tokens", str(args.tokens), "--width", str(args.width),
                   "--layers", str(args.layers), "--repeat", str(args.repeat)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[kind].append(json.loads(out))
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("forward_s", "full_s")} for k, v in runs.items()}
    d, m = med["dense"], med["moe"]
    L = args.layers
    print(f"d_model={args.width}, 8 heads, {L} layers, {args.tokens} tokens, L1, {args.rounds} rounds "
          f"(medians; each round one process per model)")
    for kind, label in (("dense", f"dense (FFN width {2 * args.width})"), ("moe", f"MoE (8 experts x {args.width}, top-2)")):
        f = med[kind]
        each = ", ".join(f"{r['full_s'] * 1000 / L:.0f}" for r in runs[kind])
        print(f"{label:34s} forward {f['forward_s'] * 1000 / L:.1f} ms/layer, full trace {f['full_s'] * 1000 / L:.1f} "
              f"ms/layer (rounds: {each})")
    print(f"MoE / dense: forward x{m['forward_s'] / d['forward_s']:.2f}, full trace x{m['full_s'] / d['full_s']:.2f} "
          f"(goal <= 1.5)")


if __name__ == "__main__":
    main()
