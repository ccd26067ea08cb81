"""Viewer configuration: which models, prompts, datasets and results directories a server offers.

A config file is YAML or JSON::

    default_model: smollm2-135m
    models:                      # hub names, local HF directories, .gguf files, the embedded default
      - smollm2-135m
      - {name: tiny-gpt2, spec: /models/tiny-gpt2}
    devices: [cpu]               # offered device choices (first is the default)
    dtypes: [float32, bfloat16]  # offered precisions (first is the default)
    data_dirs: [./data]          # prompts datasets and results directories are read only inside these
    prompts: ["The capital of France is"]
    demo_mode: false             # true: only configured models and prompts, no free text
    max_tokens: 256              # longest prompt accepted (tokens, BOS included)
    address: null                # Ray cluster address for live traces (null: in-process)
    backend: canvas              # canvas | webgl | svg (Bokeh output backend of the graph)
    cache_bytes: 536870912       # bound of the shared trace cache
    model_cache_bytes: 4294967296  # bound of loaded model weights (LRU over models)

Paths inside data directories are resolved by :func:`safe_path`, which refuses ``..``, absolute
paths, URL-encoded traversal and symlinks that point out of the directory.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routescope.cluster.datasets import FORMATS, read_dataset
from routescope.cluster.results import MANIFEST, is_results_dir
from routescope.workers.schema import DEFAULT_MODEL, DTYPES

BACKENDS = ("canvas", "webgl", "svg")


class ConfigError(ValueError):
    """The viewer config file is missing, unreadable or invalid."""


class UnsafePathError(ValueError):
    """A requested path would leave the configured data directory."""


@dataclass
class ModelEntry:
    name: str  # shown in the UI
    spec: str  # what routescope.load gets

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "spec": self.spec}


@dataclass
class ViewerConfig:
    models: list[ModelEntry] = field(default_factory=lambda: [ModelEntry(DEFAULT_MODEL, DEFAULT_MODEL)])
    default_model: str = DEFAULT_MODEL
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    data_dirs: list[Path] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    demo_mode: bool = False
    max_tokens: int = 256
    address: str | None = None
    backend: str = "canvas"
    cache_bytes: int = 512 * 2**20
    model_cache_bytes: int = 4 * 2**30
    tau_min: float = 0.01
    results: list[Path] = field(default_factory=list)  # extra results dirs (e.g. from --results)

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise ValueError(f"model: {name!r} is not one of the configured models "
                         f"({', '.join(m.name for m in self.models)})")

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


def _as_list(value: Any, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(f"config: {what} must be a list")
    return value


def parse_config(data: dict[str, Any] | None, base: Path | None = None) -> ViewerConfig:
    """Validate a config mapping; relative data directories are resolved against ``base``."""
    data = dict(data or {})
    base = base or Path.cwd()
    known = {"models", "default_model", "devices", "dtypes", "data_dirs", "prompts", "demo_mode", "max_tokens",
             "address", "backend", "cache_bytes", "model_cache_bytes", "tau_min", "results"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = ViewerConfig()
    if "models" in data:
        models = []
        for i, m in enumerate(_as_list(data["models"], "models")):
            if isinstance(m, str):
                models.append(ModelEntry(m, m))
            elif isinstance(m, dict) and isinstance(m.get("spec", m.get("name")), str):
                spec = str(m.get("spec", m.get("name")))
                models.append(ModelEntry(str(m.get("name", spec)), spec))
            else:
                raise ConfigError(f"config: models[{i}] must be a name or {{name, spec}}")
        if not models:
            raise ConfigError("config: models is empty")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError("config: model names must be unique")
        cfg.models = models
    cfg.default_model = str(data.get("default_model", cfg.models[0].name))
    if cfg.default_model not in cfg.model_names:
        raise ConfigError(f"config: default_model {cfg.default_model!r} is not in models")
    if "devices" in data:
        cfg.devices = [str(d) for d in _as_list(data["devices"], "devices")] or ["cpu"]
    if "dtypes" in data:
        cfg.dtypes = [str(d) for d in _as_list(data["dtypes"], "dtypes")] or ["float32"]
        bad = [d for d in cfg.dtypes if d not in DTYPES]
        if bad:
            raise ConfigError(f"config: dtype {bad[0]!r} is not one of {', '.join(DTYPES)}")
    cfg.data_dirs = [(base / str(d)).resolve() for d in _as_list(data.get("data_dirs"), "data_dirs")]
    cfg.results = [(base / str(d)).resolve() for d in _as_list(data.get("results"), "results")]
    cfg.prompts = [str(p) for p in _as_list(data.get("prompts"), "prompts")]
    cfg.demo_mode = bool(data.get("demo_mode", False))
    for key in ("max_tokens", "cache_bytes", "model_cache_bytes"):
        if key in data:
            try:
                value = int(data[key])
            except (TypeError, ValueError):
                raise ConfigError(f"config: {key} must be an integer") from None
            if value <= 0:
                raise ConfigError(f"config: {key} must be positive")
            setattr(cfg, key, value)
    if "tau_min" in data:
        cfg.tau_min = float(data["tau_min"])
        if not 0 < cfg.tau_min <= 0.01:
            raise ConfigError("config: tau_min must be in (0, 0.01] (the threshold slider starts at 0.01)")
    cfg.address = data.get("address") or None
    cfg.backend = str(data.get("backend", "canvas"))
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"config: backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.demo_mode and not cfg.prompts and not cfg.data_dirs:
        raise ConfigError("config: demo_mode needs prompts or data_dirs with datasets")
    return cfg


def load_config(path: str | os.PathLike | None) -> ViewerConfig:
    """Read and validate a config file (``None``: the defaults, embedded model only)."""
    if path is None:
        return ViewerConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is a config error
        raise ConfigError(f"config: {path}: cannot parse: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: {path}: top level must be a mapping")
    return parse_config(data, base=path.parent.resolve())


# --------------------------------------------------------------------------------- safe paths
def safe_path(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative``, refusing anything that could leave ``root``.

    Refused: empty names, absolute paths, ``..`` components, backslashes, NUL, URL-encoded
    (even double-encoded) forms of those, and paths whose resolved target (symlinks followed)
    is outside ``root``.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise UnsafePathError("path: empty")
    decoded = relative
    for _ in range(3):  # undo URL-encoding, also when it was applied more than once
        nxt = urllib.parse.unquote(decoded)
        if nxt == decoded:
            break
        decoded = nxt
    if decoded != relative:
        raise UnsafePathError(f"path: {relative!r}: URL-encoded names are not accepted")
    if "\x00" in relative or "\\" in relative:
        raise UnsafePathError(f"path: {relative!r}: invalid character")
    if relative.startswith(("/", "~")) or os.path.isabs(relative) or (len(relative) > 1 and relative[1] == ":"):
        raise UnsafePathError(f"path: {relative!r}: absolute paths are not accepted")
    parts = Path(relative).parts
    if any(p in ("..", ".") for p in parts) or ".." in relative.split("/"):
        raise UnsafePathError(f"path: {relative!r}: '..' is not accepted")
    root = Path(root).resolve()
    candidate = (root / relative)
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"path: {relative!r} points outside the data directory")
    return resolved


def find_root(roots: list[Path], name: str) -> Path:
    """The configured directory whose last component (or full path string) is ``name``."""
    for r in roots:
        if name in (r.name, str(r)):
            return r
    raise UnsafePathError(f"directory {name!r} is not a configured data or results directory")


def list_datasets(data_dirs: list[Path]) -> list[tuple[str, str]]:
    """``(data_dir_name, relative_file)`` of every dataset file (a suffix of
    ``cluster.datasets.FORMATS``) directly in, or one level below, a data directory.

    Only names are listed (a file's contents are read when it is picked, ``read_prompts``). The
    files of a job's results directory are never offered, nor symlinks that point out.
    """
    out = []
    for root in data_dirs:
        if not root.is_dir() or is_results_dir(root):
            continue
        for p in sorted(list(root.glob("*")) + list(root.glob("*/*"))):
            if p.suffix.lower() not in FORMATS or p.name == MANIFEST:
                continue
            rel = p.relative_to(root).as_posix()
            try:
                if not p.is_file() or is_results_dir(p.parent):
                    continue
                safe_path(root, rel)
            except (UnsafePathError, OSError):  # pointing out, or not ours to read: not offered
                continue
            out.append((root.name, rel))
    return out


def read_prompts(root: Path, relative: str, column: str = "prompt", limit: int = 10_000) -> list[str]:
    """The usable prompts (at most ``limit``) of the dataset file ``relative`` inside ``root``,
    read by ``cluster.datasets.read_dataset``.

    A file that cannot be read (missing column, a JSON document that is not an array of records,
    JSON nested too deeply, no usable prompt) raises ``ValueError`` naming the file and the
    problem; a missing file ``FileNotFoundError``. Unusable records are left out.
    """
    dataset = read_dataset(safe_path(root, relative), column, name=relative)
    prompts = [r.text for r in dataset.valid[:limit]]
    if not prompts:
        raise ValueError(f"dataset {relative} holds no usable prompts ({dataset.records[0].error})")
    return prompts
