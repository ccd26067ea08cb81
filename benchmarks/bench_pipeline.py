"""Benchmark of the Ray pipeline (issue 3), all figures from one run.

1. Wire size: msgpack bytes of one prompt's edge set (what the stages send the coordinator)
   against the bytes of the dense contribution tensors (``c_attn [L, T, T, H]`` plus the three
   ``[L, T]`` columns, fp32), SmolLM2 at T=256. Goal: <= 1%.
2. End-to-end time of 16 prompts of 128 tokens: a 2-stage local Ray pipeline (one CPU per stage,
   batches in flight through both stages) against the in-process pipeline. Goal: overhead <= 25%.

Run: ``.venv/bin/python benchmarks/bench_pipeline.py [--model smollm2-135m] [--prompts 16]``
"""

from __future__ import annotations

import argparse
import functools
import os
import time

from routescope.workers.schema import DEFAULT_MODEL

print = functools.partial(print, flush=True)  # noqa: A001  (progress shows during long runs)

TEXT = (
    "The capital of France is Paris, and the capital of Italy is Rome. A transformer reads tokens and "
    "writes a residual stream; attention heads move information between positions while feed-forward "
    "blocks transform it. Water boils at one hundred degrees Celsius at sea level. The quick brown fox "
    "jumps over the lazy dog, again and again, while she sells sea shells by the sea shore. "
)


def prompt_ids(pipe, n_tokens: int, offset: int = 0) -> list[int]:
    """``n_tokens`` ids (BOS first) of natural text, shifted by ``offset`` words so prompts differ."""
    words = (TEXT * 40).split()
    ids = pipe.tokenize(" ".join(words[offset:offset + 4 * n_tokens]))
    return ids[:n_tokens]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--wire-tokens", type=int, default=256)
    ap.add_argument("--ray-batch", type=int, default=2, help="prompts per batch in the Ray pipeline")
    args = ap.parse_args()

    import ray
    import torch

    from routescope.cluster.pipeline import Pipeline
    from routescope.cluster.ray_pipeline import ray_pipeline

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch threads "
          f"{torch.get_num_threads()}")
    local = Pipeline.local(args.model)
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    remote, t_build = timed(lambda: ray_pipeline(args.model, stages=2, cpus_per_stage=1, timeout_s=600))
    remote.batch_size = args.ray_batch
    print(f"ray 2-stage pipeline: layout {remote.layout}, transport {remote.transport}, built in {t_build:.1f} s")
    try:
        # ---------------------------------------------------------------- 1. wire size
        ids = prompt_ids(local, args.wire_tokens)
        T = len(ids)
        g = remote.trace_ids([ids])[0]
        info = local.info
        first = remote.clients[0]  # stage 0's own payload, as it travels to the coordinator
        _, handle = first.submit_forward(torch.tensor([ids]), [T], ["bench-wire"], "l1", 0.01)
        stage0 = len(first.fetch(handle)[0])
        wire = len(g.edges.encode())
        dense = info.n_layers * T * T * info.n_heads * 4 + 3 * info.n_layers * T * 4
        print(f"\n[1] wire size, {info.name}, T={T}, tau_min=0.01")
        print(f"    msgpack edge set (merged, per prompt): {wire:,} bytes "
              f"({g.edges.head_weight.size:,} head parts, {g.edges.edge_weight.size:,} edges)")
        print(f"    stage 0 payload alone: {stage0:,} bytes")
        print(f"    dense contribution tensors (fp32):      {dense:,} bytes")
        print(f"    ratio: {100 * wire / dense:.3f}%  (goal <= 1%)")

        # ---------------------------------------------------------------- 2. end to end
        batch = [prompt_ids(local, args.tokens, offset=7 * i) for i in range(args.prompts)]
        local.trace_ids(batch[:1])  # warm up both paths
        remote.trace_ids(batch[:1])
        gl, t_local = timed(lambda: local.trace_ids(batch))
        gr, t_ray = timed(lambda: remote.trace_ids(batch))
        same = all(
            abs(a.edges.ffn - b.edges.ffn).max() <= 1e-5 and a.edges.head_weight.size == b.edges.head_weight.size
            for a, b in zip(gl, gr)
        )
        print(f"\n[2] end to end, {args.prompts} prompts x {len(batch[0])} tokens, {info.name}")
        print(f"    in-process (1 stage, {torch.get_num_threads()} threads, batch {local.batch_size}): {t_local:.2f} s")
        print(f"    ray, 2 stages x 1 CPU (batch {remote.batch_size}, {-(-args.prompts // remote.batch_size)} "
              f"batches in flight): {t_ray:.2f} s")
        print(f"    overhead: {100 * (t_ray / t_local - 1):+.1f}%  (goal <= 25%); same graphs: {same}")
    finally:
        remote.close()
        ray.shutdown()


if __name__ == "__main__":
    main()
