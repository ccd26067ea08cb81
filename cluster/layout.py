"""Stage layouts: which contiguous layer ranges each pipeline stage holds."""

from __future__ import annotations

import re

from routescope.workers.checkpoint import Checkpoint


def parse_layers(text: str, n_layers: int) -> list[tuple[int, int]]:
    """Parse ``"0-9,10-19,20-29"`` (inclusive ranges) and check they tile ``[0, n_layers)`` once."""
    ranges = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if not m:
            raise ValueError(f"layers: {part.strip()!r} is not a range like 0-9")
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise ValueError(f"layers: range {a}-{b} is empty")
        ranges.append((a, b + 1))
    check_layout(ranges, n_layers)
    return ranges


def check_layout(ranges: list[tuple[int, int]], n_layers: int) -> None:
    """Stage ranges must cover every layer of the model exactly once, in order."""
    if not ranges:
        raise ValueError("layers: no stages")
    expected = 0
    for a, b in ranges:
        if a != expected or b <= a:
            raise ValueError(
                f"layers: stages must cover layers 0-{n_layers - 1} exactly once in order; "
                f"got {', '.join(f'{x}-{y - 1}' for x, y in ranges)}"
            )
        expected = b
    if expected != n_layers:
        raise ValueError(
            f"layers: stages end at layer {expected - 1} but the model has layers 0-{n_layers - 1}"
        )


def layer_bytes(checkpoint: Checkpoint, n_layers: int) -> tuple[list[int], int, int]:
    """Parameter bytes per layer, of the embedding side and of the output side (from headers only)."""
    from routescope.workers.bridge_adapter import _layer_key

    sizes = {name: meta["data_offsets"][1] - meta["data_offsets"][0]
             for name, meta in checkpoint.tensor_headers().items()}
    per_layer = [0] * n_layers
    embed = unembed = 0
    for name, size in sizes.items():
        key = _layer_key(name)
        if key is not None and key[1] < n_layers:
            per_layer[key[1]] += size
        elif "embed" in name and "pos" not in name and "out" not in name or name.startswith("transformer.wte"):
            embed += size
        else:
            unembed += size
    return per_layer, embed, unembed


def balance(per_layer: list[int], n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[tuple[int, int]]:
    """Contiguous split of layers into ``n_stages`` minimising the largest stage's bytes."""
    n = len(per_layer)
    if not 1 <= n_stages <= n:
        raise ValueError(f"stages: {n_stages} stages for a model of {n} layers (allowed 1 to {n})")
    cost = list(per_layer)
    cost[0] += first_extra
    cost[-1] += last_extra
    lo, hi = max(cost), sum(cost)
    while lo < hi:  # smallest capacity that needs at most n_stages stages
        mid = (lo + hi) // 2
        if _n_parts(cost, mid) <= n_stages:
            hi = mid
        else:
            lo = mid + 1
    ranges, start, acc = [], 0, 0
    for i, c in enumerate(cost):
        remaining_layers, remaining_stages = n - i, n_stages - len(ranges)
        if acc and (acc + c > lo or remaining_layers < remaining_stages):
            ranges.append((start, i))
            start, acc = i, 0
        acc += c
    ranges.append((start, n))
    return ranges


def _n_parts(cost: list[int], capacity: int) -> int:
    parts, acc = 1, 0
    for c in cost:
        if acc + c > capacity:
            parts, acc = parts + 1, 0
        acc += c
    return parts


def plan(checkpoint: Checkpoint, n_layers: int, stages: int | None = None, layers: str | None = None) -> list[tuple[int, int]]:
    """The stage layout for a run: explicit ``layers``, else ``stages`` balanced by bytes, else one."""
    if layers is not None and stages is not None:
        ranges = parse_layers(layers, n_layers)
        if len(ranges) != stages:
            raise ValueError(f"stages: --stages {stages} disagrees with --layers ({len(ranges)} ranges)")
        return ranges
    if layers is not None:
        return parse_layers(layers, n_layers)
    if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
        raise ValueError(f"stages: {stages!r} must be a whole number of at least 1")
    if stages is None or stages == 1:
        return [(0, n_layers)]
    if stages > n_layers:
        raise ValueError(f"stages: {stages} stages for a model of {n_layers} layers (allowed 1 to {n_layers})")
    per_layer, embed, unembed = layer_bytes(checkpoint, n_layers)
    return balance(per_layer, stages, embed, unembed)
