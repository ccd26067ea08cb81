"""GPU checks of issues 3 and 5, all figures from one run on one GPU.

1. Equality on the GPU: tiny random models of four architectures traced on the GPU (fp32) as 1-,
   2- and 3-stage in-process pipelines against the CPU in-process path: max abs difference of
   every contribution and whether the routes are identical.
2. A Llama-2-13B-shaped random-weight model (fp16): one stage, 1024 tokens, full trace of all
   positions against a plain forward (issue 5 goal: at most 2x and under 1.5 s).
3. The same model split in 2 in-process stages on the one GPU, 512 tokens (issue 3).
4. A Llama-2-70B-shaped model: one middle stage holding layers 10-19 of 80, 1024 tokens of
   residual in, trace against plain forward (issue 5 asks for the figure).
5. Ray actors on the GPU (fractional GPUs, object-store transport: NCCL cannot pair two ranks on
   one device): a 2-stage tiny pipeline against the CPU in-process path.

Random-weight checkpoints are written as sharded safetensors (one shard a layer) with only the
tensors a measured stage needs, under ``--work`` (a tmpfs such as /dev/shm keeps it fast).
``--rehearse`` runs every step at reduced depth and length on the CPU to shake out shape bugs.

Run: ``python benchmarks/bench_gpu.py --out results/ [--work /dev/shm/rs] [--steps 1,2,3,4,5]``
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from routescope.cluster import bench
from routescope.cluster.pipeline import Pipeline
from routescope.workers import kernels
from routescope.workers.stage import Stage
from routescope.workers.tiny import ARCHITECTURES, build_tiny_model, train_tokenizer

print = functools.partial(print, flush=True)  # noqa: A001

# (d_model, heads, kv heads, d_ff, layers, vocab) of the published models
SHAPES = {"13b": (5120, 40, 40, 13824, 40, 32000), "70b": (8192, 64, 8, 28672, 80, 32000)}
PROMPTS = ["The capital of France is", "def add(a, b): return a + b", "Water boils at 100 degrees",
           "The quick brown fox jumps over the lazy dog", "She sold sea shells by the sea shore."]


# ----------------------------------------------------------------------------- checkpoints
def write_llama_checkpoint(out: Path, shape: str, layers: range, *, embed: bool, unembed: bool,
                           device: str, dtype: torch.dtype = torch.float16, n_layers: int | None = None) -> Path:
    """A Llama-shaped random checkpoint holding only ``layers`` (and the ends asked for)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    d, H, kv, ff, L, vocab = SHAPES[shape]
    L = n_layers or L
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=d, num_attention_heads=H, num_key_value_heads=kv, intermediate_size=ff,
                         num_hidden_layers=L, vocab_size=vocab, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         rms_norm_eps=1e-5)
    config.torch_dtype = dtype
    config.save_pretrained(out)
    train_tokenizer().save_pretrained(out)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    dh = d // H
    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], shard: str) -> None:
        save_file(tensors, str(out / shard))
        weight_map.update({k: shard for k in tensors})

    ends = {"model.norm.weight": torch.ones(d, dtype=dtype)}
    if embed:
        ends["model.embed_tokens.weight"] = rand(vocab, d)
    if unembed:
        ends["lm_head.weight"] = rand(vocab, d)
    save(ends, "ends.safetensors")
    for i in layers:
        p = f"model.layers.{i}."
        save({p + "input_layernorm.weight": torch.ones(d, dtype=dtype),
              p + "post_attention_layernorm.weight": torch.ones(d, dtype=dtype),
              p + "self_attn.q_proj.weight": rand(H * dh, d), p + "self_attn.k_proj.weight": rand(kv * dh, d),
              p + "self_attn.v_proj.weight": rand(kv * dh, d), p + "self_attn.o_proj.weight": rand(d, H * dh),
              p + "mlp.gate_proj.weight": rand(ff, d), p + "mlp.up_proj.weight": rand(ff, d),
              p + "mlp.down_proj.weight": rand(d, ff)}, f"layer-{i:03d}.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- comparisons
def _parts(es, key_cols, wcol) -> dict:
    keys = zip(*(getattr(es, c).tolist() for c in key_cols))
    return dict(zip(keys, getattr(es, wcol).tolist()))


def contribution_diff(ga, gb) -> float:
    """Max abs difference over every contribution; a part kept on one side only counts in full
    minus ``tau_min`` (it must sit on the threshold to be a rounding effect)."""
    ea, eb = ga.edges, gb.edges
    worst = max(float(np.abs(getattr(ea, c) - getattr(eb, c)).max()) for c in ("res_attn", "ffn", "res_ffn"))
    for key_cols, wcol in ((("head_layer", "head_target", "head_source", "head_head"), "head_weight"),
                           (("edge_layer", "edge_target", "edge_source"), "edge_weight")):
        pa, pb = _parts(ea, key_cols, wcol), _parts(eb, key_cols, wcol)
        for k in pa.keys() | pb.keys():
            if k in pa and k in pb:
                worst = max(worst, abs(pa[k] - pb[k]))
            else:
                worst = max(worst, abs(pa.get(k, pb.get(k)) - ea.tau_min))
    return worst


def same_routes(ga, gb) -> bool:
    for tau in (0.04, 0.1):
        ra, rb = ga.route(tau=tau, targets="all"), gb.route(tau=tau, targets="all")
        ia = np.lexsort((ra.target, ra.source, ra.layer, ra.kind))
        ib = np.lexsort((rb.target, rb.source, rb.layer, rb.kind))
        for col in ("kind", "layer", "source", "target"):
            if not np.array_equal(getattr(ra, col)[ia], getattr(rb, col)[ib]):
                return False
    return True


# ----------------------------------------------------------------------------- steps
def step_equality(args, results: dict) -> None:
    """Tiny models, 1-3 in-process stages on the device vs the CPU path: contributions and routes."""
    device = args.device
    for arch in ARCHITECTURES:
        path = build_tiny_model(arch, args.work / f"tiny-{arch}", n_layers=6)
        cpu = Pipeline.local(str(path))
        ref = cpu.trace(PROMPTS)
        for n_stages in (1, 2, 3):
            gpu = Pipeline.local(str(path), stages=n_stages, device=device)
            got = gpu.trace(PROMPTS)
            diff = max(contribution_diff(a, b) for a, b in zip(ref, got))
            routes = all(same_routes(a, b) for a, b in zip(ref, got))
            results.setdefault("equality", []).append(
                {"arch": arch, "stages": n_stages, "layout": gpu.layout, "max_abs_diff": diff, "same_routes": routes})
            print(f"  {arch:5s} {n_stages} stage(s) {gpu.layout}: max abs diff vs CPU {diff:.2e}, "
                  f"routes identical: {routes}")
            gpu.close()
        cpu.close()
        free()


def step_13b_one_stage(args, results: dict) -> None:
    """13B-shaped fp16, one stage: L1 (candidate kernel, and the torch.compile'd test it replaces) and
    L2 vs a plain forward; a profile."""
    ckpt = write_llama_checkpoint(args.work / "llama13b", "13b", range(args.layers_13b), embed=True, unembed=True,
                                  device=args.device, n_layers=args.layers_13b)
    pipe = Pipeline.local(str(ckpt), device=args.device, dtype="float16", cache_bytes=0)
    variants = (("l1", "auto", "L1, fused candidate kernel (workers/kernels.py)"),
                ("l1", "torch", "L1, bmm + torch.compile'd test + nonzero"),
                ("l2", "auto", "L2"))
    for norm, kernel, label in variants:
        os.environ["ROUTESCOPE_KERNEL"] = kernel
        print(f"  [{label}]")
        try:
            figures = bench.run(str(ckpt), args.tokens, norm=norm, repeat=args.repeat, device=args.device,
                                dtype="float16", pipe=pipe)
        except Exception as exc:  # a kernel failure must not cost the other figures
            print(f"  FAILED: {type(exc).__name__}: {exc}")
            results[f"13b_1stage_{args.tokens}_{norm}_{kernel}_error"] = repr(exc)
            continue
        results[f"13b_1stage_{args.tokens}_{norm}{'' if kernel == 'auto' else '_' + kernel}"] = figures
    recomputed = sum(client.counters()["recomputed_batches"] for client in pipe.clients)
    print(f"  batches computed again after a candidate list overflowed: {recomputed}; candidate lists sized "
          f"for {kernels._pass_rate:.3%} of the bounds")
    results["13b_recomputed_batches"], results["13b_candidate_pass_rate"] = recomputed, kernels._pass_rate
    os.environ["ROUTESCOPE_KERNEL"] = "auto"
    profile(pipe, args)
    pipe.close()
    del pipe
    free()


def profile(pipe: Pipeline, args) -> None:
    """Where a full L1 trace spends its time: the top kernels and host-side operators."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = bench.prompt_ids(pipe, args.tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        pipe.trace_ids([ids], norm="l1")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    device_key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    table = prof.key_averages().table(sort_by=device_key, row_limit=30, max_name_column_width=60)
    print(table)
    (args.out / "profile_13b_l1.txt").write_text(table + "\n\n" + prof.key_averages().table(
        sort_by="cpu_time_total", row_limit=40, max_name_column_width=60))


def step_13b_two_stages(args, results: dict) -> None:
    """13B-shaped fp16 in 2 in-process stages on one device, half the tokens, vs 1 stage."""
    ckpt = args.work / "llama13b"
    t = args.tokens // 2
    results[f"13b_2stages_{t}"] = bench.run(str(ckpt), t, stages=2, repeat=args.repeat, device=args.device,
                                            dtype="float16")
    results[f"13b_1stage_{t}"] = bench.run(str(ckpt), t, repeat=args.repeat, device=args.device, dtype="float16")
    shutil.rmtree(ckpt)  # room for the 70B slice on a tmpfs
    free()


def step_70b_slice(args, results: dict) -> None:
    """One 70B-shaped middle stage (layers 10-19 of 80) fed a residual: trace vs plain forward."""
    a, b = args.slice_70b
    n_layers = SHAPES["70b"][4] if not args.rehearse else b + 1
    ckpt = write_llama_checkpoint(args.work / "llama70b-slice", "70b", range(a, b), embed=False, unembed=False,
                                  device=args.device, n_layers=n_layers)
    t0 = time.perf_counter()
    stage = Stage(str(ckpt), a, b, device=args.device, dtype="float16", cache_bytes=0)
    load_s = time.perf_counter() - t0
    T, d = args.tokens, SHAPES["70b"][0]
    gen = torch.Generator(device=args.device).manual_seed(1)
    x = torch.randn(1, T, d, generator=gen, device=args.device).to(torch.float16)

    def plain() -> None:
        stage.plain_forward(x)

    payload = [b""]

    def full() -> None:
        payload[0] = stage.forward(x, [T], run_ids=None, keep=False)[1][0].encode()

    t_fwd, mem_fwd = bench.timed(plain, args.repeat, args.device)
    t_full, mem_full = bench.timed(full, args.repeat, args.device)
    fig = {"layers": [a, b], "tokens": T, "load_s": load_s, "parameter_bytes": stage.parameter_bytes(),
           "forward_s": t_fwd, "full_s": t_full, "ratio": t_full / t_fwd, "peak_forward_bytes": mem_fwd,
           "peak_full_bytes": mem_full, "edge_set_bytes": len(payload[0])}
    results["70b_slice"] = fig
    print(f"  70B-shaped stage, layers {a}-{b - 1} of {n_layers}, {stage.parameter_bytes() / 2**30:.1f} GiB fp16, "
          f"loaded in {load_s:.1f} s; {T} tokens of residual in")
    print(f"  plain forward {t_fwd * 1000:.1f} ms, full trace {t_full * 1000:.1f} ms, ratio {t_full / t_fwd:.2f}; "
          f"peak memory {mem_fwd / 2**30:.1f} / {mem_full / 2**30:.1f} GiB; edge set {len(payload[0]):,} bytes")
    del stage
    free()


def step_ray(args, results: dict) -> None:
    """Ray stage actors on the device (fractional GPUs) vs the CPU in-process path."""
    import ray

    from routescope.cluster.ray_pipeline import ray_pipeline

    path = build_tiny_model("llama", args.work / "tiny-ray-llama", n_layers=6)
    cpu = Pipeline.local(str(path))
    ref = cpu.trace(PROMPTS)
    gpus = 1 if args.device.startswith("cuda") else 0
    ray.init(address="local", num_cpus=4, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        for n_stages in (2, 3):
            pipe = ray_pipeline(str(path), stages=n_stages, gpus_per_stage=0.3 if gpus else 0, cpus_per_stage=1,
                                timeout_s=300)
            where = pipe.clients[0].actor.ready.remote()
            got = pipe.trace(PROMPTS)
            diff = max(contribution_diff(a, b) for a, b in zip(ref, got))
            routes = all(same_routes(a, b) for a, b in zip(ref, got))
            desc = ray.get(where)
            results.setdefault("ray", []).append({"stages": n_stages, "transport": pipe.transport,
                                                  "device": desc.get("device"), "max_abs_diff": diff,
                                                  "same_routes": routes})
            print(f"  ray {n_stages} stages on {desc.get('device')}, transport {pipe.transport}: "
                  f"max abs diff vs CPU {diff:.2e}, routes identical: {routes}")
            pipe.close()
    finally:
        ray.shutdown()


STEPS = {1: step_equality, 2: step_13b_one_stage, 3: step_13b_two_stages, 4: step_70b_slice, 5: step_ray}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/routescope-bench"))
    ap.add_argument("--steps", default="1,2,3,4,5")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rehearse", action="store_true", help="CPU dry run: 2 layers, 64 tokens, repeat 1")
    args = ap.parse_args()
    args.layers_13b, args.slice_70b = SHAPES["13b"][4], (10, 20)
    if args.rehearse:
        args.layers_13b, args.slice_70b, args.tokens, args.repeat = 2, (1, 2), 64, 1
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    triton_version = kernels.triton.__version__ if kernels.triton is not None else None
    fused = kernels.available(torch.device(args.device))
    print(f"device: {dev}; torch {torch.__version__}; triton {triton_version}; fused L1 kernels: {fused}; "
          f"steps {args.steps}")
    results: dict = {"device": dev, "torch": torch.__version__, "triton": triton_version, "fused_kernels": fused}
    failed = 0
    for n in (int(s) for s in args.steps.split(",")):
        print(f"\n== step {n}: {STEPS[n].__doc__ or STEPS[n].__name__}")
        t0 = time.perf_counter()
        try:
            STEPS[n](args, results)
        except Exception:  # report and go on: later steps measure other things
            failed += 1
            traceback.print_exc(file=sys.stdout)
            results.setdefault("errors", []).append({"step": n, "error": traceback.format_exc(limit=3)})
        print(f"   step {n} took {time.perf_counter() - t0:.1f} s")
        (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))
        free()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
