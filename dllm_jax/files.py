"""Writing files safely: the one atomic writer, strict JSON, output checks and lock files.

Every whole file a command writes (JSON records, settings sidecars, fitted controller files)
goes through `atomic_write_text` / `write_json`: the text goes to a hidden temporary file in
the destination's folder, is flushed and fsync'ed, gets the mode a plain `open(path, "w")`
would give (0666 less the umask) and is renamed over the destination, so a reader sees the
old file or the new one, never half of one. `check_output_path` checks a destination before
any work is done (the folder exists, is writable, the path is not a folder), so a long run
does not fail at its last step. JSON is strict: NaN and infinities become null (`strict`).

`ExclusiveLock` is an advisory lock file (`fcntl.flock`) for outputs one process at a time may
append to (`dllm-jax batch`): it holds the owner's pid, host and start time; a second process
is refused with the owner named; a lock file left by a process that died is taken over (the
kernel releases the lock of a dead process) with a notice.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from dllm_jax.config import ConfigError


class FileError(ConfigError):
    """A file or folder that cannot be written; the message names it and says how to fix it."""


def _named(path: str | os.PathLike, flag: str | None) -> str:
    return f"{flag} {os.fspath(path)}" if flag else os.fspath(path)


def _umask_mode(mode: int = 0o666) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def check_output_path(path: str | os.PathLike, flag: str | None = None, *,
                      create_parent: bool = False) -> Path:
    """Check that a file can be written at `path` before any work: its folder exists (or,
    with `create_parent`, can be made under an existing writable ancestor), a file can be
    created there, and `path` is not a folder. Raises FileError naming `flag` and the path."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_dir():
        raise FileError(f"{_named(p, flag)} is a folder; give a file name, e.g. "
                        f"{p / 'out.jsonl'}.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise FileError(f"{_named(p, flag)}: {parent} is not a folder; choose another path.")
        if not create_parent:
            raise FileError(f"{_named(p, flag)}: the folder {parent} does not exist; create it "
                            f"first (mkdir -p {parent}) or choose another path.")
        ancestor = parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        probe_folder(ancestor, p, flag)
        return p
    probe_folder(parent, p, flag)
    return p


def probe_folder(folder: Path, target: str | os.PathLike, flag: str | None = None) -> None:
    """Raise FileError unless a file can be created in `folder` (tried, then removed: a
    permission bit says nothing on a read-only file system or for root)."""
    if not folder.is_dir():
        raise FileError(f"{_named(target, flag)}: {folder} is not a folder; choose another path.")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".dllm-probe-"):
            pass
    except OSError as e:
        raise FileError(f"{_named(target, flag)}: cannot write in {folder} "
                        f"({e.strerror or e}); choose a writable folder.") from None


def strict(obj: Any) -> Any:
    """`obj` with every float NaN / infinity replaced by None (JSON null), recursively; numpy
    scalars and arrays become Python numbers and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):   # numpy scalars and arrays
        return strict(obj.tolist())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict `json.dumps`: NaN / infinities written as null, never as `NaN`."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def atomic_write_text(path: str | os.PathLike, text: str, flag: str | None = None) -> Path:
    """Write `text` to `path` atomically (temporary file in the same folder, fsync, rename),
    with the mode `open(path, "w")` would give. Raises FileError naming the file."""
    p = Path(os.path.expanduser(os.fspath(path)))
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileError(f"{_named(p, flag)}: the folder {parent} does not exist; create it first.")
    tmp = parent / f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = text.encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.fchmod(fd, _umask_mode())
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise FileError(f"cannot write {_named(p, flag)} ({e.strerror or e}); check the folder "
                        f"is writable and the disk is not full.") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return p


def write_json(path: str | os.PathLike, obj: Any, flag: str | None = None,
               indent: int | None = 2) -> Path:
    """`atomic_write_text` of strict JSON (NaN -> null) with a final newline."""
    return atomic_write_text(path, dumps(obj, indent=indent) + "\n", flag)


# ----------------------------------------------------------------------------- lock files
def _describe(owner: dict[str, Any]) -> str:
    since = owner.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(
        since, (int, float)) else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}{when}"


class ExclusiveLock:
    """An exclusive advisory lock on `path` (a lock file, e.g. `OUTPUT.lock`).

        lock = ExclusiveLock("answers.jsonl.lock", what="--output answers.jsonl")
        lock.acquire(warn)     # FileError naming the owner if another process holds it
        ...
        lock.release()         # removes the lock file

    The lock is `fcntl.flock` on the file (released by the kernel when the owner dies, so a
    crashed run never blocks the next one); the file holds the owner as JSON for messages.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path, self.what, self.fd = Path(path), what, None

    def _read_owner(self, fd: int) -> dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 4096)
            owner = json.loads(data.decode("utf-8")) if data.strip() else {}
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self, warn: Callable[[str], None] | None = None) -> None:
        import fcntl

        warn = warn or (lambda msg: None)
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _umask_mode(0o644))
            except OSError as e:
                raise FileError(f"cannot create the lock file {self.path} for {self.what} "
                                f"({e.strerror}); choose a writable folder.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read_owner(fd)
                os.close(fd)
                raise FileError(
                    f"{self.what} is in use by another run ({_describe(owner)}; lock file "
                    f"{self.path}); wait for it to finish or stop it, or choose another "
                    f"output.") from None
            except OSError as e:   # a file system without flock: go on unlocked, say so
                warn(f"warning: cannot lock {self.path} ({e.strerror}); make sure no other "
                     f"run writes {self.what}.")
                self.fd = fd
                return
            try:   # the file may have been removed by its previous owner meanwhile: retry
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            owner = self._read_owner(fd)
            if owner:
                warn(f"{self.path}: taking over the lock left by {_describe(owner)}, which "
                     f"no longer runs (an interrupted run).")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
            os.fsync(fd)
            self.fd = fd
            return
        raise FileError(f"cannot take the lock {self.path}: it keeps being replaced; is another "
                        f"run starting on {self.what}?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


__all__ = ["ExclusiveLock", "FileError", "atomic_write_text", "check_output_path", "dumps",
           "probe_folder", "strict", "write_json"]
