"""Crash-safe file writes and the exclusive lock of a results directory.

``atomic_write``: a reader sees the old complete file or the new complete file. The temporary
file is created beside the destination with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never through a
symbolic link planted at its name) and mode ``0o666`` filtered by the process's umask, like any
file the user creates (so results are shared as the user's umask says, not always ``0600``),
fsynced, then renamed over the destination (a rename replaces a link at the destination, never
writes through it). ``atomic_create`` is the same but fails if the destination exists.

``FileLock``: an exclusive ``flock`` on a lock file, held while the lock object is open. The OS
drops it when the process ends however it ends (SIGKILL included), so a killed job never leaves
a stale lock to clean up; the file's content only says who holds it (pid, host, start time),
and is emptied again on release. The file itself is never removed (removing a lock file races
with a process that has it open and is about to lock it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside ``path`` (mode ``0o666 & ~umask``) and its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    for _ in range(64):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a name taken (or a planted link): another random name
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _write_temp(path: Path, data: bytes, fsync: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _fsync_dir(d: Path) -> None:
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to a new temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    tmp = _write_temp(path, data, fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if fsync:  # make the rename itself durable
        _fsync_dir(path.parent)


def atomic_create(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Like ``atomic_write``, but ``FileExistsError`` if ``path`` exists (anything at the name,
    a symbolic link included): the complete file appears at once, and only one creator wins.

    A hard link from the complete temporary file is the atomic create-if-absent. Where the file
    system has no hard links, the fallback is a check then a rename: atomic for readers, and
    exclusive for writers that hold the directory's ``FileLock`` (every dataset job does)."""
    path = Path(path)
    tmp = _write_temp(path, data, fsync)
    try:
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
            os.replace(tmp, path)
    finally:
        _unlink_quietly(tmp)
    if fsync:
        _fsync_dir(path.parent)


# ================================================================================= the lock
class LockHeld(RuntimeError):
    """The lock is held by another process (or another open of the file); ``holder`` is what
    its lock file says about that holder (``None`` when unreadable)."""

    def __init__(self, path: Path, holder: dict[str, Any] | None, waited: float = 0.0):
        self.path, self.holder, self.waited = path, holder, waited
        super().__init__(f"{path} is locked by {describe_holder(holder)}")


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host, started 2025-01-01 12:00:00 +0000`` (from a lock file's content)."""
    if not holder:
        return "an unknown process (its lock file names no holder yet)"
    where = f"pid {holder.get('pid')}"
    if holder.get("host"):
        where += f" on {holder['host']}"
    return f"{where}, started {holder.get('started_at', '?')}"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive ``flock`` on ``path`` (created with ``0o666 & ~umask`` when absent, never
    through a symbolic link). ``acquire`` writes the holder's pid, host and start time into the
    file; the OS releases the lock when the file is closed or the process ends.

    ``flock`` locks are per open file, so two opens in one process exclude each other too. On
    Linux NFS clients ``flock`` is carried out as a whole-file byte-range lock (NFSv4 locks are
    held by the server), so jobs on different nodes of a shared file system exclude each other.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None
        self.holder: dict[str, Any] | None = None

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "the lock file is a symbolic link", str(self.path)) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "the lock file is not a regular file", str(self.path))
        return fd

    def read_holder(self, settle: float = 1.0) -> dict[str, Any] | None:
        """What the lock file says about its holder. A holder writes its record just after it
        locks, so an empty, torn or dead-process record is read again for up to ``settle`` s."""
        deadline = time.monotonic() + settle
        me = socket.gethostname()
        while True:
            holder = None
            try:
                fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK)
                try:
                    raw = os.read(fd, 4096)
                finally:
                    os.close(fd)
                holder = json.loads(raw.decode()) if raw.strip() else None
                if not isinstance(holder, dict):
                    holder = None
            except (OSError, ValueError):
                holder = None
            settled = holder is not None and (holder.get("host") != me or _pid_alive(holder.get("pid")))
            if settled or time.monotonic() >= deadline:
                return holder
            time.sleep(0.02)

    def try_acquire(self, info: dict[str, Any] | None = None) -> bool:
        """Take the lock if it is free (True), else False; the lock file records ``info``."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise OSError(exc.errno, "the file system does not support file locks", str(self.path)) from None
            raise
        started = time.time()
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                       "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
                       **(info or {})}
        data = (json.dumps(self.holder) + "\n").encode()
        # Content first, then the length: a reader sees the old record, a torn one (read again), or this.
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        self.fd = fd
        return True

    def acquire(self, wait: float | None = None, info: dict[str, Any] | None = None,
                on_wait: Callable[[dict[str, Any] | None], None] | None = None, poll: float = 0.2) -> "FileLock":
        """Take the lock; when held elsewhere, ``LockHeld`` at once (``wait`` None or 0) or after
        waiting up to ``wait`` seconds (``math.inf``: as long as it takes). ``on_wait(holder)`` is
        called once when waiting starts."""
        if self.try_acquire(info):
            return self
        holder = self.read_holder()
        if holder is None and self.try_acquire(info):  # released while its record was read
            return self
        if not wait or wait <= 0:
            raise LockHeld(self.path, holder)
        if on_wait is not None:
            on_wait(holder)
        t0 = time.monotonic()
        while True:
            time.sleep(poll if math.isinf(wait) else max(0.0, min(poll, t0 + wait - time.monotonic())))
            if self.try_acquire(info):
                return self
            if time.monotonic() - t0 >= wait:
                raise LockHeld(self.path, self.read_holder(), waited=time.monotonic() - t0)

    def release(self) -> None:
        """Clear the holder's record and drop the lock. (A killed holder leaves its record; the
        next holder overwrites it, and it is read only while the lock is held.)"""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)  # an idle lock file is empty: taking and releasing changes no byte
            except OSError:
                pass
            os.close(fd)  # closing the only descriptor of the open file drops the flock

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
