"""The JSON records the tools keep beside what they make (a data set's settings, a stage marker, a
checkpoint's meta, a benchmark's figures): written atomically, and compared field by field when a run
would continue what another one started."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".jaxdistill.lock"


def atomic_json(path: Path, data: Any):
    """Readers see the old file or the new one, never half of one; a unique temporary file per call, so
    processes writing the same file at once do not write into each other's."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the data set is read by others too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, *, error: type[Exception] = ValueError, remedy: str = "restore it") -> Any:
    """The JSON in `path`; `error` naming the file and `remedy` when its text cannot be read or parsed (a
    truncated download, a git-lfs pointer). A missing file stays an OSError."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"cannot read {path} ({e}); {remedy}") from e


def changes(before: Any, now: Any, *, shared_only: bool = False, name: str = "") -> dict[str, tuple[Any, Any]]:
    """{"dotted.name": (old, new)} for each leaf that differs between two records (dicts compared key by
    key, lists and tuples alike: JSON gives back lists). A key one side lacks is a change from or to None;
    with `shared_only` it is not a change at all (a record written before the field existed)."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = set(before) & set(now) if shared_only else set(before) | set(now)
        out = {}
        for k in sorted(keys, key=str):
            out |= changes(before.get(k), now.get(k), shared_only=shared_only, name=f"{name}.{k}" if name else str(k))
        return out
    before, now = _tuples(before), _tuples(now)
    return {} if before == now else {name: (before, now)}


def describe(changed: dict[str, tuple[Any, Any]], keys=None) -> str:
    """"name: old → new; ..." for `changes`' result (only `keys`, in their order, where given)."""
    return "; ".join(f"{k}: {changed[k][0]!r} → {changed[k][1]!r}" for k in (changed if keys is None else keys))


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, *, error: type[Exception] = ValueError) -> Iterator[None]:
    """An exclusive lock on `folder` (flock on its LOCK_NAME file) while the block runs: a second command
    writing into the same folder is refused with `error`, naming the first (host, process, start), instead of
    both writing there. The kernel drops the lock when the process ends however it ends: no stale locks.
    On a file system without locks (some network and FUSE mounts) the block runs unlocked, said."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "a command that is starting"
            raise error(f"{folder} is in use by {holder}; wait for it to end (or stop it), or give another "
                        "folder") from None
        except OSError as e:
            locked = False
            print(f"note: cannot lock {folder} ({e.strerror}): nothing stops another command from writing there "
                  "at the same time", file=sys.stderr)
        if locked:
            since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
            os.ftruncate(fd, 0)
            os.write(fd, f"{what} (process {os.getpid()} on {socket.gethostname()}, since {since})\n".encode())
        yield
    finally:
        os.close(fd)  # drops the lock
