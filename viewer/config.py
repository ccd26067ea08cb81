"""Viewer configuration: which models, prompts, datasets and results directories a server offers.

A config file is YAML or JSON::

    default_model: smollm2-135m
    models:                      # hub names, local HF directories, .gguf files, the embedded default
      - smollm2-135m
      - {name: tiny-gpt2, spec: /models/tiny-gpt2}
      - {name: mine, spec: /models/mine.pt, adapter: mypkg.mymodel:make}  # your own model (docs/adapters.md)
    devices: [cpu]               # offered device choices (first is the default)
    dtypes: [float32, bfloat16]  # offered precisions (first is the default)
    data_dirs: [./data]          # prompts datasets and results directories are read only inside these
    prompts: ["The capital of France is"]
    demo_mode: false             # true: only configured models and prompts, no free text
    max_tokens: 256              # longest prompt accepted (tokens, BOS included)
    address: null                # Ray cluster address for live traces (null: in-process)
    backend: canvas              # canvas | webgl | svg (Bokeh output backend of the graph)
    cache_bytes: 536870912       # bound of the shared trace cache
    model_cache_bytes: 4294967296  # bound of loaded models: weights + activation caches (LRU over models)
    activation_cache_bytes: 536870912  # activation cache of each pipeline stage the viewer loads
    max_prompt_chars: null       # longest prompt accepted in characters, checked before tokenising
                                 # (null: 16 per token of max_tokens, at most 65536)
    max_dataset_bytes: 67108864  # larger dataset files are not read (listed with an error)
    max_message_bytes: 2097152   # largest websocket message the server accepts (bigger: connection closed)

Paths inside data directories are resolved by :func:`safe_path`, which refuses ``..``, absolute
paths, URL-encoded traversal and symlinks that point out of the directory.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routescope.cluster.datasets import FORMATS, read_dataset
from routescope.cluster.pipelines import LRUBytes
from routescope.cluster.results import MANIFEST, is_results_dir
from routescope.workers.schema import DEFAULT_MODEL, DTYPES

BACKENDS = ("canvas", "webgl", "svg")
CHARS_PER_TOKEN = 16  # default prompt limit in characters per token of ``max_tokens``
MAX_PROMPT_CHARS_CAP = 65_536  # hard cap of the prompt limit in characters
# The largest websocket message from a browser the server reads. Normal use sends widget values
# and events: the biggest is the prompt box (at most MAX_PROMPT_CHARS_CAP characters, <= 4 UTF-8
# bytes each, JSON-escaped, value and value_input together: < 1 MiB); bigger messages close the
# connection before they are read into memory.
MAX_MESSAGE_BYTES = 2 * 2**20
MIN_MESSAGE_BYTES = 64 * 2**10


class ConfigError(ValueError):
    """The viewer config file is missing, unreadable or invalid."""


class UnsafePathError(ValueError):
    """A requested path would leave the configured data directory."""


@dataclass
class ModelEntry:
    name: str  # shown in the UI
    spec: str  # what routescope.load gets
    adapter: str | None = None  # a user ModelAdapter (module.path:factory), routescope.load(spec, adapter=...)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "spec": self.spec, **({"adapter": self.adapter} if self.adapter else {})}


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
    activation_cache_bytes: int = 512 * 2**20  # per pipeline stage; counted in model_cache_bytes
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN * max_tokens, capped
    max_dataset_bytes: int = 64 * 2**20
    max_message_bytes: int = MAX_MESSAGE_BYTES

    @property
    def prompt_chars_limit(self) -> int:
        """The longest prompt in characters (checked on the server before tokenising)."""
        if self.max_prompt_chars is not None:
            return min(int(self.max_prompt_chars), MAX_PROMPT_CHARS_CAP)
        return min(CHARS_PER_TOKEN * int(self.max_tokens), MAX_PROMPT_CHARS_CAP)

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
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(f"config: {what} must be a list")
    return value


def _texts(value: Any, what: str) -> list[str]:
    """A list of strings (numbers allowed, written as text); anything else is a ConfigError."""
    out = []
    for i, v in enumerate(_as_list(value, what)):
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ConfigError(f"config: {what}[{i}] must be text, not {type(v).__name__}")
        out.append(str(v))
    return out


def _text(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"config: {what} must be text, not {type(value).__name__}")
    return str(value)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"config: {what} must be an integer")
    try:
        number = float(value)
        out = int(number)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config: {what} must be an integer") from None
    if out != number:
        raise ConfigError(f"config: {what} must be an integer")
    if out <= 0:
        raise ConfigError(f"config: {what} must be positive")
    return out


KNOWN_KEYS = ("models", "default_model", "devices", "dtypes", "data_dirs", "prompts", "demo_mode", "max_tokens",
              "address", "backend", "cache_bytes", "model_cache_bytes", "tau_min", "results",
              "activation_cache_bytes", "max_prompt_chars", "max_dataset_bytes", "max_message_bytes")


def parse_config(data: dict[str, Any] | None, base: Path | None = None) -> ViewerConfig:
    """Validate a config mapping; relative data directories are resolved against ``base``.

    Every problem (unknown key, wrong type, value out of range) is a ``ConfigError`` naming the key.
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: top level must be a mapping, not {type(data).__name__}")
    data = dict(data or {})
    base = base or Path.cwd()
    unknown = sorted(str(k) for k in set(data) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_KEYS))}")
    cfg = ViewerConfig()
    if "models" in data:
        models = []
        for i, m in enumerate(_as_list(data["models"], "models")):
            if isinstance(m, str):
                models.append(ModelEntry(m, m))
            elif isinstance(m, dict) and isinstance(m.get("spec", m.get("name")), str) \
                    and set(m) <= {"name", "spec", "adapter"}:
                spec = str(m.get("spec", m.get("name")))
                adapter = m.get("adapter")
                if adapter is not None and (not isinstance(adapter, str) or not adapter.strip()):
                    raise ConfigError(f"config: models[{i}].adapter must be a dotted path (module.path:factory), "
                                      f"not {type(adapter).__name__}")
                models.append(ModelEntry(_text(m.get("name", spec), f"models[{i}].name"), spec, adapter))
            else:
                raise ConfigError(f"config: models[{i}] must be a name or {{name, spec[, adapter]}}")
        if not models:
            raise ConfigError("config: models is empty")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError("config: model names must be unique")
        cfg.models = models
    cfg.default_model = _text(data.get("default_model", cfg.models[0].name), "default_model")
    if cfg.default_model not in cfg.model_names:
        raise ConfigError(f"config: default_model {cfg.default_model!r} is not in models")
    if "devices" in data:
        cfg.devices = _texts(data["devices"], "devices") or ["cpu"]
    if "dtypes" in data:
        cfg.dtypes = _texts(data["dtypes"], "dtypes") or ["float32"]
        bad = [d for d in cfg.dtypes if d not in DTYPES]
        if bad:
            raise ConfigError(f"config: dtype {bad[0]!r} is not one of {', '.join(DTYPES)}")
    cfg.data_dirs = [(base / d).resolve() for d in _texts(data.get("data_dirs"), "data_dirs")]
    cfg.results = [(base / d).resolve() for d in _texts(data.get("results"), "results")]
    cfg.prompts = _texts(data.get("prompts"), "prompts")
    demo = data.get("demo_mode", False)
    if not isinstance(demo, bool):
        raise ConfigError(f"config: demo_mode must be true or false, not {demo!r}")
    cfg.demo_mode = demo
    for key in ("max_tokens", "cache_bytes", "model_cache_bytes", "activation_cache_bytes", "max_prompt_chars",
                "max_dataset_bytes", "max_message_bytes"):
        if data.get(key) is not None:
            setattr(cfg, key, _positive_int(data[key], key))
    if cfg.max_prompt_chars is not None and cfg.max_prompt_chars > MAX_PROMPT_CHARS_CAP:
        raise ConfigError(f"config: max_prompt_chars must be at most {MAX_PROMPT_CHARS_CAP}")
    if cfg.max_message_bytes < MIN_MESSAGE_BYTES:
        raise ConfigError(f"config: max_message_bytes must be at least {MIN_MESSAGE_BYTES}")
    if "tau_min" in data:
        value = data["tau_min"]
        try:
            if isinstance(value, bool):
                raise TypeError
            cfg.tau_min = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config: tau_min must be a number, not {value!r}") from None
        if not 0 < cfg.tau_min <= 0.01:
            raise ConfigError("config: tau_min must be in (0, 0.01] (the threshold slider starts at 0.01)")
    address = data.get("address")
    cfg.address = None if address in (None, "") else _text(address, "address")
    cfg.backend = _text(data.get("backend", "canvas"), "backend")
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"config: backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.demo_mode and not cfg.prompts and not cfg.data_dirs:
        raise ConfigError("config: demo_mode needs prompts or data_dirs with datasets")
    return cfg


def load_config(path: str | os.PathLike | None) -> ViewerConfig:
    """Read and validate a config file (``None``: the defaults, embedded model only).

    Every problem is a one-line ``ConfigError`` naming the file: missing, unreadable, not UTF-8,
    a YAML/JSON syntax error, a top level that is not a mapping, or a wrong value.
    """
    if path is None:
        return ViewerConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config: {path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > 1 << 20:
        raise ConfigError(f"config: {path}: {len(raw)} bytes is too big for a config file (at most 1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path}: not valid UTF-8 (byte {exc.start})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is a config error
        first = " ".join(str(exc).split())  # one line
        raise ConfigError(f"config: {path}: cannot parse: {first}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: {path}: top level must be a mapping")
    try:
        return parse_config(data, base=path.parent.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {path})") from None


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
    files of a job's results directory are never offered, nor symlinks that point out. A data
    directory that cannot be listed lists nothing (it never raises).
    """
    out = []
    for root in data_dirs:
        try:
            if not root.is_dir() or is_results_dir(root):
                continue
            found = sorted(list(root.glob("*")) + list(root.glob("*/*")))
        except OSError:
            continue
        for p in found:
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


def is_utf8_name(name: str) -> bool:
    """Whether a file name (as Python decodes it) was valid UTF-8: names that were not carry lone
    surrogates, which cannot be sent to a browser."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with bytes that were not UTF-8 (lone surrogates) shown as U+FFFD, safe to send."""
    if is_utf8_name(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# Datasets read by the viewer, per file version (path, inode, size, mtime): each file is read once
# while it is unchanged, whichever session asks. Prompts are bounded by their characters; errors
# by their count.
_PROMPTS = LRUBytes(64 * 2**20, lambda prompts: 64 + sum(len(p) + 64 for p in prompts))
_ERRORS: "OrderedDict[tuple, str]" = OrderedDict()
_MAX_ERRORS = 4096
_errors_lock = threading.Lock()


def _remember_error(key: tuple, msg: str) -> None:
    with _errors_lock:
        _ERRORS[key] = msg
        _ERRORS.move_to_end(key)
        while len(_ERRORS) > _MAX_ERRORS:
            _ERRORS.popitem(last=False)


def dataset_prompts(root: Path, relative: str, max_bytes: int = 64 * 2**20, limit: int = 10_000) -> list[str]:
    """``read_prompts`` of a data directory's file, cached per file version; files over
    ``max_bytes`` are refused before they are read. Every problem is a ``ValueError`` naming the
    file (relative to its data directory) and the problem; none escapes as another exception."""
    name = printable(relative)
    path = safe_path(root, relative)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"dataset {name} does not exist") from None
    except OSError as exc:
        raise ValueError(f"dataset {name} cannot be read ({exc.strerror or exc})") from None
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, int(max_bytes), int(limit))
    hit = _PROMPTS.get(key)
    if hit is not None:
        return list(hit)
    with _errors_lock:
        err = _ERRORS.get(key)
    if err is not None:
        raise ValueError(err)
    try:
        if not is_utf8_name(relative):
            raise ValueError(f"dataset {name}: the file name is not valid UTF-8")
        if st.st_size > max_bytes:
            raise ValueError(f"dataset {name}: {st.st_size} bytes exceeds this viewer's limit of {max_bytes} bytes")
        prompts = read_prompts(root, relative, limit=limit)
    except (ValueError, OSError) as exc:
        msg = printable(str(exc)) if isinstance(exc, ValueError) else f"dataset {name} cannot be read ({exc})"
        _remember_error(key, msg)
        raise ValueError(msg) from None
    except (RecursionError, MemoryError) as exc:
        msg = f"dataset {name} cannot be read ({type(exc).__name__})"
        _remember_error(key, msg)
        raise ValueError(msg) from None
    _PROMPTS.put(key, tuple(prompts))
    return prompts


def scan_datasets(data_dirs: list[Path], max_bytes: int = 64 * 2**20, max_files: int = 1000
                  ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The dataset files of ``data_dirs`` split into usable ones, ``(dir_name, relative)``, and
    unusable ones, ``(shown name, why)``: every file is tried (``dataset_prompts``, cached), so a
    page lists only files that can be picked and says why the others cannot. Never raises."""
    good: list[tuple[str, str]] = []
    bad: list[tuple[str, str]] = []
    listed = list_datasets(data_dirs)
    for dname, rel in listed[:max_files]:
        label = printable(f"{dname}/{rel}")
        if not is_utf8_name(dname):
            bad.append((label, "the data directory's name is not valid UTF-8"))
            continue
        try:
            dataset_prompts(find_root(data_dirs, dname), rel, max_bytes)
        except (ValueError, OSError) as exc:
            bad.append((label, printable(str(exc))))
            continue
        good.append((dname, rel))
    if len(listed) > max_files:
        bad.append((f"{len(listed) - max_files} more files", f"only the first {max_files} dataset files are offered"))
    return good, bad


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
