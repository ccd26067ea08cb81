"""How many GPUs a routescope pipeline needs for an fp16/bf16 model.

    python deploy/gpu_sizing.py                            # the table in deploy/README.md
    python deploy/gpu_sizing.py --params 8e9 --card-gb 24  # one model on one card size

Rule: weights take params x 2 bytes (fp16/bf16). Each card keeps HEADROOM of its
memory free for the CUDA context, the allocator's fragmentation and the activation
caches a transparency run keeps per layer (attention patterns and per-layer
contributions for the prompt), so only (1 - HEADROOM) x card holds weights:

    gpus = ceil(params * 2 B / ((1 - HEADROOM) * card))

GB means 10**9 bytes throughout; cards are taken at their nominal 24/40/80 GB.
Use the result as `--stages N` with `--gpus-per-stage 1`.
"""

from __future__ import annotations

import argparse
import math

BYTES_PER_PARAM = 2  # fp16 / bf16
HEADROOM = 0.20  # fraction of every card kept free for activations, CUDA context, fragmentation
# Mixture-of-experts models are sized by *all* their parameters: every expert's weights stay resident
# (a stage holds its layers' experts whichever the router picks), so experts dominate the bytes;
# layouts balance stages by parameter bytes (cluster/layout.py), which counts them.
MODELS = [("7B", 7e9), ("13B", 13e9), ("30B", 30e9), ("70B", 70e9),
          ("Mixtral-8x7B (MoE, 46.7B total, 12.9B active)", 46.7e9),
          ("Mixtral-8x22B (MoE, 141B total, 39B active)", 141e9)]
CARDS_GB = [24, 40, 80]


def weights_gb(params: float) -> float:
    return params * BYTES_PER_PARAM / 1e9


def gpus_needed(params: float, card_gb: float, headroom: float = HEADROOM) -> int:
    if params <= 0 or card_gb <= 0 or not 0 <= headroom < 1:
        raise ValueError("params and card_gb must be positive, headroom in [0, 1)")
    return math.ceil(weights_gb(params) / (card_gb * (1 - headroom)))


def table() -> str:
    head = "| model (fp16/bf16) | weights | " + " | ".join(f"{c} GB cards" for c in CARDS_GB) + " |"
    rule = "| --- | --- | " + " | ".join("---" for _ in CARDS_GB) + " |"
    rows = [
        f"| {name} | {weights_gb(p):.0f} GB | "
        + " | ".join(str(gpus_needed(p, c)) for c in CARDS_GB)
        + " |"
        for name, p in MODELS
    ]
    return "\n".join([head, rule, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, help="parameter count, e.g. 7e9")
    ap.add_argument("--card-gb", type=float, help="memory of one GPU in GB, e.g. 24")
    ap.add_argument("--headroom", type=float, default=HEADROOM, help="fraction of each card kept free")
    args = ap.parse_args(argv)
    if (args.params is None) != (args.card_gb is None):
        ap.error("--params and --card-gb go together")
    if args.params is None:
        print(table())
    else:
        print(gpus_needed(args.params, args.card_gb, args.headroom))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
