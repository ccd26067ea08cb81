"""Checkpoint names -> model names, with Hugging Face's own conversion rules for the architecture.

A stage reads tensors straight from the safetensors files, so it must apply what
``from_pretrained`` applies while loading: plain renamings (``block_sparse_moe`` -> ``mlp``) and
merging rules that build one fused model tensor from several checkpoint tensors (Mixtral's
per-expert ``experts.{e}.w1`` / ``w3`` stacked and concatenated into ``experts.gate_up_proj``).
Only the operations whose meaning is plain are applied (stack a module list, concatenate); any
other rule the architecture declares is refused, naming it, rather than loading a different model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass
class _Merge:
    """One fused target: per source pattern, the checkpoint tensors by expert index."""

    target: str
    operations: list[tuple[str, int]]  # ("stack" | "cat", dim), in order
    sources: list[dict[int, str]] = field(default_factory=list)


class CheckpointMapping:
    """The conversion rules of ``model``'s architecture, applied to checkpoint tensor names."""

    def __init__(self, model: torch.nn.Module):
        self.renames: list[tuple[re.Pattern, str]] = []
        self.merges: list[tuple[list[re.Pattern], str, list[tuple[str, int]]]] = []
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
        except ImportError:  # older transformers: checkpoints already use model names
            return
        arch = type(model).__name__
        for rule in get_model_conversion_mapping(model, add_legacy=False):
            if type(rule) is WeightRenaming and len(rule.source_patterns) == 1:
                self.renames.append((re.compile(rule.source_patterns[0]), rule.target_patterns[0]))
            elif isinstance(rule, WeightConverter):
                ops = []
                for op in rule.operations:
                    kind = {"MergeModulelist": "stack", "Concatenate": "cat"}.get(type(op).__name__)
                    if kind is None or len(rule.target_patterns) != 1:
                        raise NotImplementedError(f"{arch}: checkpoint conversion step {type(op).__name__} of "
                                                  f"{rule.source_patterns} is not supported by the stage loader")
                    ops.append((kind, int(op.dim)))
                sources = [re.compile(re.escape(p).replace(r"\*", r"(\d+)") + "$") for p in rule.source_patterns]
                self.merges.append((sources, rule.target_patterns[0], ops))
        self._pending: dict[str, _Merge] = {}

    def rename(self, name: str) -> str:
        for pattern, target in self.renames:
            name = pattern.sub(target, name)
        return name

    def merge_target(self, name: str) -> str | None:
        """The fused model name a (renamed) checkpoint name contributes to, or None; remembered
        for ``merged``."""
        for sources, target, ops in self.merges:
            for i, pattern in enumerate(sources):
                m = pattern.search(name)
                if m:
                    full = name[: m.start()] + target
                    merge = self._pending.setdefault(full, _Merge(full, ops, [{} for _ in sources]))
                    merge.sources[i][int(m.group(1))] = name
                    return full
        return None

    def merged(self, target: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Build the fused tensor ``target`` from the checkpoint ``tensors`` (by renamed name)."""
        merge = self._pending[target]
        parts: list[torch.Tensor] = []
        for by_index in merge.sources:
            if sorted(by_index) != list(range(len(by_index))):
                raise ValueError(f"{target}: checkpoint experts {sorted(by_index)} are not 0..{len(by_index) - 1}")
            parts.append([tensors[by_index[e]] for e in range(len(by_index))])
        out: list[torch.Tensor] | torch.Tensor = parts
        for kind, dim in merge.operations:
            if kind == "stack":
                out = [torch.stack(p, dim=dim) for p in out]
            else:
                out = torch.cat(out, dim=dim)
        return out if isinstance(out, torch.Tensor) else out[0]
