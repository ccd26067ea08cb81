"""``routescope bench``: plain forward vs full trace, peak memory and edge-set bytes, in one run.

The last printed line is ``ratio=<full/forward>``. Times are medians over ``--repeat`` runs after
one warm-up; peak memory is sampled (RSS on CPU, ``max_memory_allocated`` on GPU) per phase.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Callable

import psutil
import torch

from ..workers import reference
from .pipeline import Pipeline

_TEXT = ("The history of the city began on the river, where traders met to sell salt, wool and iron; "
         "later the bridge, the cathedral and the university drew scholars from every country. ")


class PeakMemory:
    """Peak resident memory (or GPU memory) while the block runs, sampled every few ms."""

    def __init__(self, device: str = "cpu", interval: float = 0.005):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        proc = psutil.Process()
        self.peak = proc.memory_info().rss

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


def prompt_ids(pipe: Pipeline, n_tokens: int) -> list[int]:
    """``n_tokens`` ids of ordinary English text, BOS first."""
    ids = pipe.tokenize(_TEXT)
    body = ids[1:]
    while len(body) < n_tokens:
        body = body + ids[1:]
    return ids[:1] + body[: n_tokens - 1]


def plain_forward(pipe: Pipeline, ids: list[int]) -> None:
    """The model's forward pass through the same stage models, capturing only stage outputs."""
    x: torch.Tensor = torch.tensor([ids])
    for client in pipe.clients:
        x = client.plain_forward(x)


def timed(fn: Callable[[], object], repeat: int, device: str) -> tuple[float, int]:
    fn()  # warm-up
    times, peak = [], 0
    for _ in range(repeat):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak)
    return statistics.median(times), peak


def run(model: str, n_tokens: int, *, stages: int | None = None, layers: str | None = None, norm: str = "l1",
        repeat: int = 3, device: str = "cpu", dtype: str | None = None, naive: bool = False,
        out=sys.stdout, pipe: Pipeline | None = None) -> dict[str, float]:
    """Measure and print; return the figures. ``pipe``: reuse a built pipeline (no detail cache)."""
    if pipe is None:
        pipe = Pipeline.local(model, stages=stages, layers=layers, device=device, dtype=dtype,
                              cache_bytes=0)  # no detail cache: measure the trace itself
    ids = prompt_ids(pipe, n_tokens)
    payload_bytes = [0]

    def full() -> None:
        graph = pipe.trace_ids([ids], norm=norm)[0]
        graph.route(0.04, targets="all")
        payload_bytes[0] = len(graph.edges.encode())

    baseline_rss = psutil.Process().memory_info().rss if not device.startswith("cuda") else 0
    t_fwd, mem_fwd = timed(lambda: plain_forward(pipe, ids), repeat, device)
    t_full, mem_full = timed(full, repeat, device)
    info = pipe.info
    dense = info.n_layers * n_tokens * n_tokens * info.n_heads * 4
    figures = {"forward_s": t_fwd, "full_s": t_full, "ratio": t_full / t_fwd, "peak_forward_bytes": mem_fwd,
               "peak_full_bytes": mem_full, "edge_set_bytes": payload_bytes[0], "dense_bytes": dense}
    mem_label = "max_memory_allocated" if device.startswith("cuda") else "peak RSS"
    print(f"model={model} arch={info.architecture} layers={info.n_layers} heads={info.n_heads} d={info.d_model} "
          f"tokens={n_tokens} stages={len(pipe.clients)} layout={pipe.layout} norm={norm} device={device} "
          f"dtype={dtype or 'float32'} threads={torch.get_num_threads()}", file=out)
    print(f"plain forward: {t_fwd * 1000:.1f} ms   full trace: {t_full * 1000:.1f} ms", file=out)
    print(f"{mem_label}: forward {mem_fwd / 2**20:.0f} MiB, full trace {mem_full / 2**20:.0f} MiB "
          f"(x{mem_full / max(mem_fwd, 1):.2f}; process baseline {baseline_rss / 2**20:.0f} MiB)", file=out)
    print(f"edge-set bytes: {payload_bytes[0]} ({100 * payload_bytes[0] / dense:.3f}% of dense fp32 "
          f"contributions, {dense} bytes)", file=out)
    if naive:
        bridge = reference.load_bridge(pipe.checkpoint.path)
        t0 = time.perf_counter()
        cache = reference.capture(bridge, ids)
        for l in range(info.n_layers):
            reference.layer_contributions(bridge, cache, l, norm)
        t_naive = time.perf_counter() - t0
        figures.update(naive_s=t_naive, speedup=t_naive / t_full)
        print(f"naive dense reference (routescope.workers.reference): {t_naive:.2f} s -> engine speed-up "
              f"x{t_naive / t_full:.1f}", file=out)
    print(f"ratio={t_full / t_fwd:.3f}", file=out)
    return figures


def main(args: argparse.Namespace) -> int:
    if args.tokens < 2:
        raise ValueError(f"tokens: {args.tokens} must be at least 2")
    run(args.model, args.tokens, stages=args.stages, layers=args.layers, norm=args.norm, repeat=args.repeat,
        device=args.device, dtype=args.dtype, naive=args.naive)
    return 0
