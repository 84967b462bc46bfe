"""Files that are never half-written and folders that one run owns at a time.

- :func:`atomic_write` — the one writer of every record a later step reads back (``run.json``,
  ``results.json``, ``summary.md``, ``*_metrics.json``, ...): the content goes to a temporary file in the same
  folder, is fsynced, and replaces the target with ``os.replace`` (atomic on POSIX). A crash at any moment
  leaves either the old file or the new one, never a mix or a truncated file.
- :func:`append_lines` — appends of JSON lines that survive a torn last line (``drop_torn_tail``).
- :func:`file_sha256` — the content hash that identifies a checkpoint whatever its path.
- :class:`FolderLock` — one process (one run: DDP ranks take it on rank 0 only) writes into a folder at a time.
- :func:`safe_name` — a user-given name (an explainer's alias) that becomes a file or folder name.
- :func:`json_safe` — values as strict JSON: non-finite floats become null (every JSON record is written so).

Standard library only: every layer may use it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Union

Content = Union[str, bytes, Callable[[Path], None]]


def atomic_write(path: str | os.PathLike, content: Content, encoding: str = "utf-8") -> Path:
    """Write ``content`` to ``path`` atomically: text, bytes, or a ``save(tmp_path)`` callable for writers
    that want a file name (``figure.savefig``, ``torch.save``, ``np.save`` on an open file, ...).

    The temporary file lives next to ``path`` (same file system, so the rename is atomic) under a unique
    name, and is removed if writing fails; the folder is fsynced after the rename so the new name survives
    a power cut, not just a killed process.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode(encoding) if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, value, **dumps_kwargs) -> Path:
    """``atomic_write(path, json.dumps(json_safe(value), allow_nan=False, **dumps_kwargs))`` (indent 2 unless
    given): strict JSON that any parser reads, NaN and +-inf written as null."""
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write(path, json.dumps(json_safe(value), allow_nan=False, **dumps_kwargs))


def json_safe(value):
    """``value`` with every float that is NaN or +-inf (nested in dicts, lists and tuples) replaced by None,
    so that ``json.dumps(..., allow_nan=False)`` writes strict JSON (null) instead of NaN / Infinity tokens."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# A name that may become one file or folder name inside an output folder (see safe_name).
SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]{1,100}")


def safe_name(value, what: str) -> str:
    """``value`` if it can be one file or folder name inside an output folder, else a ValueError naming ``what``
    (e.g. "--explainers alias") and the value.

    Rule: 1 to 100 characters of ``[A-Za-z0-9._+-]``, not starting with '.': no path separator, no '..', no
    hidden file, nothing a shell or a file system reads specially; checked before anything is written or
    deleted."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or value.startswith("."):
        raise ValueError(f"{what} {value!r} cannot name a file: use 1 to 100 characters of A-Z a-z 0-9 . _ + - "
                         "(no path separator, not starting with '.')")
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open folders: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def drop_torn_tail(fd: int, block: int = 1 << 16) -> int:
    """Truncate the file open as ``fd`` back to just after its last newline; returns the bytes dropped."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    end = size
    while end > 0:
        start = max(0, end - block)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, start + cut + 1)
            return size - (start + cut + 1)
        end = start
    os.ftruncate(fd, 0)
    return size


def append_lines(path: str | os.PathLike, data: bytes) -> int:
    """Append ``data`` (whole lines, each ending in a newline) to ``path`` under an exclusive ``flock``, after
    cutting a torn last line back to the last newline (a process killed in the middle of an append leaves
    one: glued onto it, the first new line would be unreadable too); flushed and fsynced. Returns the number
    of torn bytes dropped."""
    if not data:
        return 0
    with open(path, "a+b") as f:  # O_APPEND: every write lands at the (possibly truncated) end
        fcntl.flock(f, fcntl.LOCK_EX)
        dropped = drop_torn_tail(f.fileno())
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return dropped


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on ``folder`` (the file ``folder/.lock``), held from :meth:`acquire` (or ``with``)
    until :meth:`release` or the end of the process.

    Built on ``fcntl.flock``: the kernel drops the lock when its holder exits in any way (including
    ``kill -9`` or a crash), so a ``.lock`` file left behind by a dead run is not a lock and never needs to be
    deleted by hand — there is no stale lock to detect. The file holds the holder's pid, host and start time,
    only to name it in the refusal. (``flock`` on NFS is emulated with POSIX locks on Linux; on file systems
    without locking at all, acquiring fails loudly rather than silently.)

    A lock is per open file, so a second ``FolderLock`` on the same folder is refused even within one process.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "a run"):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.what = what
        self._file = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise FolderBusyError(
                f"{self.folder} is in use by another {self.what} ({holder}); two processes writing one folder would "
                f"do the work twice and interleave their files. Wait for it to finish, or choose another folder. "
                f"(The lock is released automatically when that process ends, also if it is killed.)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
