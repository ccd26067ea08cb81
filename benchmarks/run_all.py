"""Regenerate docs/benchmarks.md: run every benchmark once and record its output and the machine.

Run: ``.venv/bin/python benchmarks/run_all.py [--quick]`` (``--quick`` skips the 2048-token run and
the naive reference). Each benchmark prints its own figures and ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("routescope"))


def machine() -> str:
    import psutil
    import torch

    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}), "
            f"load average at start {os.getloadavg()[0]:.1f}")


def run(title: str, cmd: list[str], timeout: int) -> str:
    t0 = time.time()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        out = res.stdout.strip() or res.stderr.strip()[-2000:]
    except subprocess.TimeoutExpired as exc:
        out = ((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")).strip()
        out += f"\n(timed out after {timeout} s)"
    return f"### {title}\n\n`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}` ({time.time() - t0:.0f} s wall)\n\n```\n{out}\n```\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-measured.md"))
    args = ap.parse_args()
    sections = [f"# Benchmark run\n\nMachine: {machine()}\n"]
    sections.append(run("Engine, SmolLM2, 256 tokens, L1, one stage", [EXE, "bench", "--tokens", "256", "--repeat", "2"]
                        + ([] if args.quick else ["--naive"]), 3600))
    sections.append(run("Engine, SmolLM2, 256 tokens, L1, two in-process stages",
                        [EXE, "bench", "--tokens", "256", "--repeat", "2", "--stages", "2"], 3600))
    sections.append(run("Engine, SmolLM2, 256 tokens, L2", [EXE, "bench", "--tokens", "256", "--repeat", "2", "--norm", "l2"], 3600))
    if not args.quick:
        sections.append(run("Engine, SmolLM2, 2048 tokens, L1", [EXE, "bench", "--tokens", "2048", "--repeat", "1"], 7200))
    sections.append(run("Ray pipeline", [sys.executable, "benchmarks/bench_pipeline.py"], 3600))
    sections.append(run("Viewer in the browser", [sys.executable, "benchmarks/bench_viewer.py"], 1800))
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
