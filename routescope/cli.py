"""The ``routescope`` command line: trace, serve, bench, submit, run-job."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from routescope import DEFAULT_MODEL


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub name, local HF directory, .gguf file, or the embedded 'smollm2-135m' (default)")
    p.add_argument("--stages", type=int, default=None, help="number of pipeline stages (balanced by parameter bytes)")
    p.add_argument("--layers", default=None, help="explicit stage layer ranges, e.g. 0-9,10-19,20-29")
    p.add_argument("--gpus-per-stage", type=float, default=0.0, help="GPUs per Ray stage actor")
    p.add_argument("--cpus-per-stage", type=float, default=1.0, help="CPUs per Ray stage actor")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address ('local' starts one here; default $RAY_ADDRESS; unset: in-process)")
    p.add_argument("--device", default="cpu", help="device of in-process stages (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype (default float32)")


def _add_adapter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="MODULE:FACTORY",
                   help="a model of your own: module.path:factory or module.path.ClassName of a ModelAdapter, "
                        "given --model (docs/adapters.md)")


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tau", type=float, default=0.04, help="route threshold in (0, 1), default 0.04")
    p.add_argument("--tau-min", type=float, default=0.01, help="smallest contribution kept, default 0.01")
    p.add_argument("--mode", default="renormalize", choices=["renormalize", "plain"])
    p.add_argument("--norm", default="l1", choices=["l1", "l2"])
    p.add_argument("--no-bos", action="store_true", help="do not prepend the model's BOS token")


def _wait_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v >= 0:  # NaN included
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routescope", description="Information-flow routes of LLM predictions.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trace", help="trace a prompt and print the route of a position")
    _add_model_options(p)
    _add_adapter_option(p)
    _add_analysis_options(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--target", default=None, help="position(s) to trace: N, N,M or 'all' (default: last)")
    p.add_argument("--out", default=None, help="write the graph: file.msgpack (full) or file.json (route)")
    p.add_argument("--top", type=int, default=5, help="how many predicted tokens to print")

    p = sub.add_parser("serve", help="serve the web viewer")
    p.add_argument("--config", default=None, help="viewer config file (YAML or JSON)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only; IPv6 as ::1 or [::1])")
    # checked by routescope.viewer.server.parse_port: one-line 'routescope serve: error: --port ...', exit 2
    p.add_argument("--port", default="5006", help="TCP port, 1-65535 (default 5006)")
    p.add_argument("--allow-remote", action="store_true", help="required to bind beyond loopback")
    p.add_argument("--basic-auth", default=None, help="file with user:password lines (required with --allow-remote)")
    p.add_argument("--results", default=None, help="open a results directory of a dataset job")
    p.add_argument("--show", action="store_true", help="open a browser")

    p = sub.add_parser("bench", help="benchmark: plain forward vs full trace")
    _add_model_options(p)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--norm", default="l1", choices=["l1", "l2"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--naive", action="store_true", help="also time the naive dense implementation")

    for name, help_text in (("submit", "submit a dataset job to a Ray cluster"),
                            ("run-job", "run a dataset job in this process")):
        p = sub.add_parser(name, help=help_text)
        _add_model_options(p)
        p.add_argument("--dataset", required=True, help="text (one prompt a line), JSONL with 'prompt', or CSV")
        p.add_argument("--column", default="prompt", help="CSV/JSONL field holding the prompt")
        p.add_argument("--results", required=True, help="results directory")
        p.add_argument("--tau-min", type=float, default=0.01)
        p.add_argument("--norm", default="l1", choices=["l1", "l2"])
        p.add_argument("--positions", default="last", choices=["last", "all"])
        p.add_argument("--tau", type=float, default=0.04, help="route threshold of the route summaries")
        p.add_argument("--mode", default="renormalize", choices=["renormalize", "plain"])
        p.add_argument("--no-bos", action="store_true", help="do not prepend the model's BOS token")
        p.add_argument("--in-flight", type=int, default=4, help="prompts in flight at once")
        p.add_argument("--wait-lock", type=_wait_seconds, nargs="?", const=float("inf"), default=None,
                       metavar="SECONDS",
                       help="when another job holds the results directory, wait for it to end (up to SECONDS; "
                            "no value: as long as it takes) instead of refusing")
        if name == "submit":
            p.add_argument("--wait", action="store_true", help="wait for the job and stream its logs")
    return parser


def cmd_trace(args: argparse.Namespace) -> int:
    import routescope
    from routescope.cluster.pipeline import validate_prompt
    from routescope.cluster.routes import check_tau, parse_targets
    from routescope.workers.checkpoint import check_device
    from routescope.workers.edgeset import check_tau_min

    # Everything that can be checked without the model is checked before loading it.
    validate_prompt(args.prompt)
    check_tau_min(args.tau_min)
    check_tau(args.tau, args.tau_min)
    if args.top < 1:
        raise ValueError(f"top: {args.top} must be an integer of at least 1")
    if args.address is None:  # in-process stages run on this machine's device
        args.device = check_device(args.device)
    graph = routescope.trace(
        args.model, args.prompt, tau_min=args.tau_min, norm=args.norm, prepend_bos=not args.no_bos,
        stages=args.stages, layers=args.layers, address=args.address, gpus_per_stage=args.gpus_per_stage,
        cpus_per_stage=args.cpus_per_stage, device=args.device, dtype=args.dtype,
        **({"adapter": args.adapter} if args.adapter else {}),
    )
    vocab = graph.meta.model_info.d_vocab if graph.meta.model_info else None
    if vocab is not None and args.top > vocab:
        raise ValueError(f"top: {args.top} must be an integer in [1, {vocab}] (the model's vocabulary)")
    targets = parse_targets(args.target)
    edges = graph.route(args.tau, args.mode, targets)
    tokens = graph.tokens
    print(f"model: {graph.model} ({graph.n_layers} layers, {graph.n_heads} heads)")
    print("tokens: " + " ".join(f"{i}:{t!r}" for i, t in enumerate(tokens)))
    pred = graph.live.prediction(k=args.top)
    print("prediction after the last token: " + ", ".join(f"{p['token']!r} ({p['score']:.2f})" for p in pred))
    label = "last position" if targets is None else f"positions {args.target}"
    print(f"route of {label} at tau={args.tau} ({args.mode}): {len(edges)} edges")
    src, dst = edges.node_names()
    order = sorted(range(len(edges)), key=lambda i: (-int(edges.layer[i]), -float(edges.weight[i])))
    for i in order:
        print(f"  L{int(edges.layer[i]):>3}  {src[i]:>8} -> {dst[i]:<8} {float(edges.weight[i]):.3f}  "
              f"{['attn', 'residual', 'ffn in', 'ffn out', 'residual'][int(edges.kind[i])]}")
    if args.out:
        path = graph.save(args.out, tau=args.tau, mode=args.mode, targets=targets)
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "trace":
            return cmd_trace(args)
        if args.command == "serve":
            from routescope.viewer.server import main as serve_main

            return serve_main(args)
        if args.command == "bench":
            from routescope.cluster.bench import main as bench_main

            return bench_main(args)
        if args.command == "run-job":
            from routescope.cluster.jobs import main as run_job_main

            return run_job_main(args)
        if args.command == "submit":
            from routescope.cluster.submit import main as submit_main

            return submit_main(args)
    except (ValueError, OSError, NotImplementedError, RuntimeError) as exc:
        # One line, no traceback: bad input and unusable files (OSError: unreadable, permissions).
        print(f"routescope {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if not isinstance(exc, OSError) or exc.filename is None or str(exc.filename) in text \
        else f"{exc.filename}: {text}"


if __name__ == "__main__":
    raise SystemExit(main())
