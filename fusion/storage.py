"""Crash-safe file writes and an inter-process lock.

``atomic_write`` writes to a temporary file in the target's folder, fsyncs it, ``os.replace``s it over
the target and fsyncs the folder: a reader sees the old file or the new one, never a torn one, even if
the writer is killed with SIGKILL. ``FileLock`` is an ``fcntl.flock`` on a lock file that records the
holder's pid; the kernel drops it when the holder dies, so a stale lock never blocks anyone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from adafuse.fusion.errors import UserError
from adafuse.fusion.faults import fault_point


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_mode() -> int:
    """What ``open()`` would give a new file under the current umask (mkstemp's own default is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def staged_file(path: Path, mode: str = "wb", encoding: str | None = None):
    """A handle on a temporary file next to ``path`` that replaces ``path`` (durably) only if the block
    completes; on any error or interruption the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"cannot write '{path}': {err.strerror}") from None
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        fault_point(f"write:{path.name}")  # crash tests: killed with the new file complete but not in place
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise UserError(f"cannot write '{path}': {err.strerror}") from None
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (with the permissions a plain write would give)."""
    with staged_file(path) as handle:
        handle.write(data)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FileLock:
    """An exclusive ``flock`` on ``path``; ``blocking=False`` raises a :class:`UserError` naming the holder."""

    def __init__(self, path: Path, blocking: bool = True, timeout: float | None = None) -> None:
        self.path = Path(path)
        self.blocking = blocking
        self.timeout = timeout
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot create lock file '{self.path}': {err.strerror}") from None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking and deadline is None else fcntl.LOCK_NB))
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if not self.blocking or (deadline is not None and time.monotonic() > deadline):
                    os.close(fd)
                    raise UserError(
                        f"'{self.path.parent}' is in use by another adafuse process (pid {self.holder()})"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a missing file, invalid JSON or another value is one UserError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (expected {what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object ({what})")
    return data
