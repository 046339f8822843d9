"""Batches the store could not take, kept on local disk until it can (`BUDGET_SPILL_DIR`).

While the store is down, the flusher writes each batch of charges and usage records here rather
than hold them all in memory, and a process that stops (or dies) during the outage leaves them
here. Any process on the same store takes them back, oldest first, when it next writes: its
own, and those of engines that are gone (a live one takes back its own: it still counts them as
charges the store has not confirmed; an engine that shuts down leaves its own to anyone). A
batch keeps its id, so one written twice (taken back after a crash between the write and the
file's removal) is applied once: the store skips a batch id it has applied.

One file a batch, `<ns>-<pid>-<engine>-<batch id>.json`, written whole (a temporary file
renamed) under a folder named after the store's URL: a spill is only applied to its own store.

Whether the engine that wrote a batch is still running is told by a lock it holds while it runs
(`<engine>.lock`, `flock`), not by its pid alone: processes in containers of their own that mount
one folder all have pid 1, or pids the others cannot see, so a live one's batches looked like a
gone one's, were written by another, and their writer went on counting them as its own charges
the store had not confirmed, beside the store that held them. A batch whose engine left no lock
(an older release's) is judged by its pid, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from budget_middleware.core.records import Delta, UsageRecord

if sys.platform != "win32":
    import fcntl

logger = logging.getLogger("budget_middleware")

_VERSION = 1
_SUFFIX = ".json"
_LOCK_SUFFIX = ".lock"


def default_spill_root() -> Path:
    """`$XDG_STATE_HOME/budget-middleware/spill`, or `~/.local/state/budget-middleware/spill`."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "budget-middleware" / "spill"


def spill_folder(root: Path, database_url: str) -> Path:
    """The folder of one store's spilled batches (named by its URL's hash: no password shown)."""
    return root / hashlib.sha256(database_url.encode()).hexdigest()[:16]


_GONE = 0  # the pid of files an engine gave up at its shutdown: anyone's
# The engines made in this process (a forked child inherits its parent's: their files carry the
# parent's pid). A file with this process's pid and an engine not made here was left by an
# earlier process that had the same pid (pid 1 of a restarted container, a reused pid): gone.
_ENGINES: set[str] = set()


class Spill:
    """One store's folder of spilled batches, for one engine of one process."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pid = os.getpid()
        self.engine = uuid.uuid4().hex[:12]  # two engines of one process keep theirs apart
        _ENGINES.add(self.engine)
        self._warned = False
        self._lock: int | None = None  # the fd of this engine's lock, from its first batch on
        self._unlockable = False

    def write(self, batch_id: str, deltas: Sequence[Delta], records: Sequence[UsageRecord]) -> str:
        """Write one batch whole; its file's path. Raises OSError when it cannot."""
        # The owner's alone (whatever the umask): a batch tells who spent what, and whoever may
        # write a file here has it applied to the store as charges.
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._hold_lock()
        name = f"{time.time_ns():020d}-{self.pid}-{self.engine}-{batch_id}{_SUFFIX}"
        final = self.folder / name
        partial = self.folder / (name + ".part")
        data = orjson.dumps(
            {
                "version": _VERSION,
                "id": batch_id,
                "deltas": [_delta_out(d) for d in deltas],
                "records": [r._asdict() for r in records],
            }
        )
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, final)
        _sync_folder(self.folder)
        return str(final)

    def oldest(self) -> tuple[str, str, list[Delta], list[UsageRecord]] | None:
        """The oldest batch this process may take back (its own, or a gone process's): its
        path, id, deltas and records; None when there is none. A file that cannot be read is
        renamed `.bad` and logged, never retried for ever."""
        try:
            names = self._names()
        except OSError as exc:
            self._warn(f"cannot read the spill folder {self.folder}: {exc}")
            return None
        alive: dict[int | str, bool] = {}  # one look per process or engine, however many batches
        for name in names:
            if not self._may_take(name, alive):
                continue
            path = self.folder / name
            try:
                data = orjson.loads(path.read_bytes())
                if data.get("version") != _VERSION:
                    raise ValueError(f"version {data.get('version')!r}")
                deltas = [_delta_in(d) for d in data["deltas"]]
                records = [_record_in(r) for r in data["records"]]
                return str(path), str(data["id"]), deltas, records
            except FileNotFoundError:
                continue  # taken back by another process meanwhile
            except Exception as exc:
                logger.error("budget-middleware: spilled batch %s cannot be read: %s", path, exc)
                with contextlib.suppress(OSError):
                    os.replace(path, str(path) + ".bad")
        return None

    def is_own(self, path: str) -> bool:
        """Whether the batch of `path` was spilled by this engine and not given up since (its
        charges are still this engine's unconfirmed ones)."""
        parts = Path(path).name.split("-", 3)
        return len(parts) == 4 and parts[1] != str(_GONE) and parts[2] == self.engine

    def after_fork(self) -> None:
        """In a forked child: an engine of its own (the parent's batches stay the parent's)."""
        self.pid = os.getpid()
        self.engine = uuid.uuid4().hex[:12]
        _ENGINES.add(self.engine)
        if self._lock is not None:  # the parent's: closed here (its lock stays the parent's)
            with contextlib.suppress(OSError):
                os.close(self._lock)
            self._lock = None

    def remove(self, path: str) -> None:
        """The batch of `path` is in the store: its file goes (gone already is fine)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._warn(f"cannot remove the written batch {path}: {exc}")

    def give_up(self) -> int:
        """This engine stops: its batches left on disk are anyone's (the next engine on this
        store, in this process or another, writes them). How many there are."""
        given = 0
        for name in self._names():
            parts = name.split("-", 3)
            if len(parts) == 4 and parts[1] == str(self.pid) and parts[2] == self.engine:
                gone = "-".join([parts[0], str(_GONE), parts[2], parts[3]])
                try:
                    os.replace(self.folder / name, self.folder / gone)
                    given += 1
                except OSError as exc:
                    self._warn(f"cannot leave {name} to the next process: {exc}")
        self._release_lock()
        return given

    def _lock_path(self, engine: str) -> Path:
        return self.folder / f"{engine}{_LOCK_SUFFIX}"

    def _hold_lock(self) -> None:
        """Lock this engine's lock file, before its first batch is written, until it gives its
        batches up or its process ends (the kernel releases a dead process's locks)."""
        if self._lock is not None or self._unlockable or sys.platform == "win32":
            return
        path = self._lock_path(self.engine)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # a folder that takes no locks: its batches judged by pid
            self._unlockable = True
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._warn(f"cannot lock {path} ({exc}): batches here are told live by pid only")
            return
        self._lock = fd

    def _release_lock(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path(self.engine))
            with contextlib.suppress(OSError):
                os.close(fd)

    def _running(self, engine: str) -> bool | None:
        """Whether the engine that wrote batches here runs (its lock is held), in any process,
        container or host that shares the folder; None when it left no lock to tell."""
        if sys.platform == "win32":
            return None
        try:
            fd = os.open(self._lock_path(engine), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError:
            return True  # cannot look: left alone, as another user's process is
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)  # releases the lock just taken, if it was
        return False

    def _names(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.folder) if e.name.endswith(_SUFFIX))
        except FileNotFoundError:
            return []

    def _may_take(self, name: str, alive: dict[int | str, bool]) -> bool:
        parts = name.split("-", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            return False
        pid = int(parts[1])
        if pid != _GONE and parts[2] != self.engine:
            if parts[2] not in alive:
                running = self._running(parts[2])
                if running is not None:
                    alive[parts[2]] = running
            if parts[2] in alive:
                return not alive[parts[2]]
        if pid == self.pid:
            # Another engine of this process keeps its own; an earlier process's are anyone's.
            return parts[2] == self.engine or parts[2] not in _ENGINES
        if pid == _GONE:
            return True
        if pid not in alive:
            alive[pid] = _alive(pid)
        return not alive[pid]

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            logger.error("budget-middleware: %s", text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: alive
    except OSError:
        return False
    return True


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _delta_out(d: Delta) -> dict[str, Any]:
    return {
        "kind": d.kind,
        "id": d.id,
        "window_start": d.window_start.isoformat(),
        "window_end": d.window_end.isoformat(),
        "amount": d.amount,
        "start_ts": d.start_ts,
        "ended_from": None if d.ended_from is None else d.ended_from.isoformat(),
    }


def _delta_in(d: dict[str, Any]) -> Delta:
    ended = d["ended_from"]
    return Delta(
        kind=d["kind"],
        id=d["id"],
        window_start=datetime.fromisoformat(d["window_start"]),
        window_end=datetime.fromisoformat(d["window_end"]),
        amount=int(d["amount"]),
        start_ts=float(d["start_ts"]),
        ended_from=None if ended is None else datetime.fromisoformat(ended),
    )


def _record_in(r: dict[str, Any]) -> UsageRecord:
    r["tags"] = tuple(r["tags"])
    return UsageRecord(**r)
