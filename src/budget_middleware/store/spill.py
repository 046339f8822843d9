"""Batches the store could not take, kept on local disk until it can (`BUDGET_SPILL_DIR`).

While the store is down, the flusher writes each batch of charges and usage records here rather
than hold them all in memory, and a process that stops (or dies) during the outage leaves them
here. Any process on the same store takes them back, oldest first, when it next writes: its
own, and those of engines that are gone (a live one takes back its own: it still counts them as
charges the store has not confirmed; an engine that shuts down leaves its own to anyone). A
batch keeps its id, so one written twice (taken back after a crash between the write and the
file's removal) is applied once: the store skips a batch id it has applied.

One file a batch, `<ns>-<pid>-<engine>-<batch id>.json`, written whole (a temporary file
renamed) under a folder named after the store (`spill_folder`): a spill is only applied to its
own store.

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
import re
import sys
import time
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired

import orjson
from pydantic import StrictInt, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # (pydantic reads it so on Python 3.11)

from budget_middleware.core.durations import Duration, parse_duration
from budget_middleware.core.providers import canonical_provider
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


def spill_root(spill_dir: Path | None) -> Path:
    """Where spilled batches and debts to Redis go: `BUDGET_SPILL_DIR`, else the default."""
    return spill_dir if spill_dir is not None else default_spill_root()


def spill_folder(root: Path, database_url: str) -> Path:
    """The folder of one store's spilled batches, named by a hash of the store itself (no
    password shown): a SQLite file by its absolute path, a server's database by its host, port
    and name. Not by the URL's text: two apps on the default `sqlite:///./budget.db` in folders
    of their own shared one folder and wrote each other's batches into their own store, and
    one store spelled anew (its password rotated, an option added) never found its own."""
    return root / hashlib.sha256(_store_identity(database_url).encode()).hexdigest()[:16]


def legacy_spill_folder(root: Path, database_url: str) -> Path | None:
    """Where releases before named the store's folder (by its URL's text), when that is
    another folder and could only be this store's: batches they left there are taken too. A
    relative SQLite path's could be another app's store: none (`unclaimed_legacy_folder`)."""
    if _relative_sqlite(database_url):
        return None
    legacy = root / hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return None if legacy == spill_folder(root, database_url) else legacy


def unclaimed_legacy_folder(root: Path, database_url: str) -> Path | None:
    """The folder an earlier release named after a relative SQLite URL (the default
    `sqlite:///./budget.db`), when batches are left in it: they may be this store's or another
    app's on the same URL in another folder, so they are not taken; the operator is told where
    they are (`BudgetEngine` logs it at start-up) and moves them into this store's folder."""
    if not _relative_sqlite(database_url):
        return None
    legacy = root / hashlib.sha256(database_url.encode()).hexdigest()[:16]
    if legacy == spill_folder(root, database_url):
        return None
    try:
        return legacy if any(legacy.glob("*" + _SUFFIX)) else None
    except OSError:
        return None


def _relative_sqlite(database_url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        url = make_url(database_url)
    except Exception:
        return False
    database = url.database or ""
    return url.get_backend_name() == "sqlite" and not (
        database.startswith("file:") or os.path.isabs(database)
    )


def _store_identity(database_url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        url = make_url(database_url)
    except Exception:  # not a URL SQLAlchemy reads: its text, as before
        return database_url
    backend = url.get_backend_name()
    database = url.database or ""
    if backend == "sqlite":
        if not database.startswith("file:"):
            database = os.path.abspath(database)
        return f"sqlite:{database}"
    port = url.port if url.port is not None else _DEFAULT_PORTS.get(backend, "")
    host = url.host or str(url.query.get("host", ""))  # a Unix socket's folder, if so given
    # PostgreSQL's `options` may choose the schema (`-csearch_path=tenant_a`): stores told
    # apart so in one database are not one (other query options, `sslmode` say, do not count).
    options = url.query.get("options", "")
    chosen = f"?options={options}" if options else ""
    return f"{backend}://{host.lower()}:{port}/{database}{chosen}"


_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


_GONE = 0  # the pid of files an engine gave up at its shutdown: anyone's
_TAKEN = "t"  # after a file's moment: a batch an engine took over from another (`claim_gone`)
# The engines made in this process (a forked child inherits its parent's: their files carry the
# parent's pid). A file with this process's pid and an engine not made here was left by an
# earlier process that had the same pid (pid 1 of a restarted container, a reused pid): gone.
_ENGINES: set[str] = set()


class Spill:
    """One store's folder of spilled batches, for one engine of one process."""

    def __init__(self, folder: Path, legacy: Path | None = None) -> None:
        self.folder = folder
        self.legacy = legacy  # an earlier release's folder of this store: its batches taken too
        self.pid = os.getpid()
        self.engine = uuid.uuid4().hex[:12]  # two engines of one process keep theirs apart
        _ENGINES.add(self.engine)
        self._warned = False
        self._lock: int | None = None  # the fd of this engine's lock, from its first batch on
        # Batch files that could not be read, renamed `.bad`: (new path, error), for the engine
        # to set aside where an operator sees them (their charges never reach the store).
        self.unreadable: list[tuple[str, str]] = []
        self._unlockable = False
        self.given_up: list[str] = []  # the ids of the batches `give_up` left to anyone
        self._deltas: dict[str, list[Delta]] = {}  # `others_unwritten`'s, read once a batch

    def write(self, batch_id: str, deltas: Sequence[Delta], records: Sequence[UsageRecord]) -> str:
        """Write one batch whole; its file's path. Raises OSError when it cannot."""
        # The owner's alone (whatever the umask): a batch tells who spent what, and whoever may
        # write a file here has it applied to the store as charges.
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._hold_lock()
        name = f"{time.time_ns():020d}-{self.pid}-{self.engine}-{batch_id}{_SUFFIX}"
        data = {
            "version": _VERSION,
            "id": batch_id,
            "deltas": [_delta_out(d) for d in deltas],
            "records": [r._asdict() for r in records],
        }
        return _write_whole(self.folder, name, data)

    def oldest(self) -> tuple[str, str, list[Delta], list[UsageRecord]] | None:
        """The oldest batch this process may take back (its own, or a gone process's): its
        path, id, deltas and records; None when there is none. A file that cannot be read is
        renamed `.bad` and logged, never retried for ever."""
        entries = self._entries()
        if entries is None:
            return None
        alive: dict[int | str, bool] = {}  # one look per process or engine, however many batches
        for name, folder in entries:
            if not self._may_take(name, alive, folder):
                continue
            found = self._read(folder / name)
            if found is not None:
                return found
        return None

    def claim_gone(self, keep: Collection[str] = ()) -> list[tuple[str, list[Delta]]]:
        """Every batch here of an engine that is gone, renamed to this engine's (a rename: one
        engine takes each), from now on this engine's unwritten charges; their deltas. Taken
        one at a time (`oldest`), while the store could not be written only the first was
        this engine's: the rest counted nowhere, and a process started in an outage admitted
        again what the one before had spent. The batches whose ids are in `keep` are left as
        they are (those named by debts to Redis left on disk: counted by their payment). By
        batch id."""
        entries = self._entries()
        claimed: list[tuple[str, list[Delta]]] = []
        if entries is None:
            return claimed
        alive: dict[int | str, bool] = {}
        for name, folder in entries:
            parts = name.split("-", 3)
            if self.is_own(name) or not self._may_take(name, alive, folder):
                continue
            if len(parts) == 4 and parts[3].removesuffix(_SUFFIX) in keep:
                continue
            # Marked taken (`_TAKEN` after its moment): another engine's seed counts it
            # (`others_unwritten`), as it does a gone engine's, not as this engine's own.
            taken = parts[0].removesuffix(_TAKEN) + _TAKEN
            mine = self.folder / f"{taken}-{self.pid}-{self.engine}-{parts[3]}"
            try:
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # (a legacy one's)
                self._hold_lock()
                os.replace(folder / name, mine)
            except FileNotFoundError:
                continue  # claimed by another engine meanwhile
            except OSError as exc:
                self._warn(f"cannot take {name} over: {exc}")
                continue
            found = self._read(mine)
            if found is not None:
                claimed.append((found[1], found[2]))
        if claimed:
            _sync_folder(self.folder)
        return claimed

    def others_unwritten(self) -> dict[str, list[Delta]]:
        """The batches here whose charges no live engine counts as its own (a seed of a window
        key, Redis restarted empty, counts them: `RedisCounters._read_and_seed`): given up,
        taken over by another engine (`claim_gone`: that engine's seeds count them too, but
        another's, made first, lacked them), or of an engine that is gone; not this engine's
        (its ledger counts them). By batch id, their deltas; a file that cannot be read is
        left to the flusher (`oldest`)."""
        entries = self._entries()
        found: dict[str, list[Delta]] = {}
        if entries is None:
            return found
        alive: dict[int | str, bool] = {}
        cache, self._deltas = self._deltas, {}
        for name, folder in entries:
            parts = name.split("-", 3)
            if len(parts) != 4 or parts[2] == self.engine:
                continue
            if not (
                parts[1] == str(_GONE)
                or parts[0].endswith(_TAKEN)
                or self._may_take(name, alive, folder)
            ):
                continue
            batch_id = parts[3].removesuffix(_SUFFIX)
            deltas = cache.get(batch_id)
            if deltas is None:
                try:
                    data = orjson.loads((folder / name).read_bytes())
                    deltas = [_delta_in(d) for d in data["deltas"]]
                except Exception:  # gone meanwhile (written, or taken: renamed), or unreadable
                    continue
            found[batch_id] = self._deltas[batch_id] = deltas  # (a batch's file never changes)
        return found

    def _entries(self) -> list[tuple[str, Path]] | None:
        """The batch files here (and in the legacy folder), oldest first; None: unreadable."""
        try:
            entries = [(name, self.folder) for name in self._names()]
            if self.legacy is not None:
                entries += [(name, self.legacy) for name in self._names(self.legacy)]
                entries.sort()
        except OSError as exc:
            self._warn(f"cannot read the spill folder {self.folder}: {exc}")
            return None
        return entries

    def _read(self, path: Path) -> tuple[str, str, list[Delta], list[UsageRecord]] | None:
        """A batch file's path, id, deltas and records; None when it is gone (taken by another
        process meanwhile) or cannot be read (renamed `.bad` and logged, never retried)."""
        try:
            data = orjson.loads(path.read_bytes())
            if data.get("version") != _VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            deltas = [_delta_in(d) for d in data["deltas"]]
            records = [_record_in(r) for r in data["records"]]
            return str(path), str(data["id"]), deltas, records
        except FileNotFoundError:
            return None
        except Exception as exc:
            logger.error("budget-middleware: spilled batch %s cannot be read: %s", path, exc)
            with contextlib.suppress(OSError):
                os.replace(path, str(path) + ".bad")
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            self.unreadable.append((str(path) + ".bad", error[:300]))
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

    def own_batches(self) -> list[str]:
        """The ids of this engine's batches on disk (those `give_up` would leave to anyone)."""
        ids: list[str] = []
        for name in self._names():
            parts = name.split("-", 3)
            if len(parts) == 4 and parts[1] == str(self.pid) and parts[2] == self.engine:
                ids.append(parts[3].removesuffix(_SUFFIX))
        return ids

    def give_up(self) -> int:
        """This engine stops: its batches left on disk are anyone's (the next engine on this
        store, in this process or another, writes them). How many there are (their ids:
        `given_up`)."""
        self.given_up = []
        for name in self._names():
            parts = name.split("-", 3)
            if len(parts) == 4 and parts[1] == str(self.pid) and parts[2] == self.engine:
                gone = "-".join([parts[0], str(_GONE), parts[2], parts[3]])
                try:
                    os.replace(self.folder / name, self.folder / gone)
                    self.given_up.append(parts[3].removesuffix(_SUFFIX))
                except OSError as exc:
                    self._warn(f"cannot leave {name} to the next process: {exc}")
        self._release_lock()
        return len(self.given_up)

    def _lock_path(self, engine: str, folder: Path | None = None) -> Path:
        return (folder or self.folder) / f"{engine}{_LOCK_SUFFIX}"

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

    def _running(self, engine: str, folder: Path) -> bool | None:
        """Whether the engine that wrote batches in `folder` runs (its lock is held), in any
        process, container or host that shares the folder; None when it left no lock to tell."""
        if sys.platform == "win32":
            return None
        try:
            fd = os.open(self._lock_path(engine, folder), os.O_RDONLY)
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

    def _names(self, folder: Path | None = None) -> list[str]:
        try:
            return sorted(
                e.name for e in os.scandir(folder or self.folder) if e.name.endswith(_SUFFIX)
            )
        except FileNotFoundError:
            return []

    def _may_take(self, name: str, alive: dict[int | str, bool], folder: Path) -> bool:
        parts = name.split("-", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            return False
        pid = int(parts[1])
        if pid != _GONE and parts[2] != self.engine:
            if parts[2] not in alive:
                running = self._running(parts[2], folder)
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


def _write_whole(folder: Path, name: str, data: dict[str, Any]) -> str:
    """`data` as the file `name` in `folder`, whole (a temporary file, synced, renamed), the
    owner's alone; its path. Raises OSError when it cannot."""
    final = folder / name
    partial = folder / (name + ".part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(fd, "wb") as file:
            file.write(orjson.dumps(data))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, final)
    except BaseException:
        # Half written (a full disk): never read, and a round's retry names a new one, so
        # each failed round left one behind, taking what room the disk had.
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    _sync_folder(folder)
    return str(final)


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
        "terms": None if d.terms is None else [_duration_out(d.terms[0]), d.terms[1]],
    }


def _duration_out(duration: Duration | None) -> str | None:
    return None if duration is None else str(duration)


def _delta_in(d: dict[str, Any]) -> Delta:
    ended = d["ended_from"]
    terms = d.get("terms")  # (none in a file an earlier release wrote)
    return Delta(
        kind=d["kind"],
        id=d["id"],
        window_start=datetime.fromisoformat(d["window_start"]),
        window_end=datetime.fromisoformat(d["window_end"]),
        amount=int(d["amount"]),
        start_ts=float(d["start_ts"]),
        ended_from=None if ended is None else datetime.fromisoformat(ended),
        terms=_terms_in(terms),
    )


def _terms_in(terms: Any) -> tuple[Duration | None, bool] | None:
    """`Delta.terms` as written (None: not known, the stored ones taken: as an earlier release
    wrote the delta, and not worth setting the batch's charges aside for)."""
    try:
        return (parse_duration(terms[0]), bool(terms[1]))
    except (TypeError, ValueError, IndexError, KeyError):
        return None


def _record_in(r: dict[str, Any]) -> UsageRecord:
    r["tags"] = tuple(r["tags"])
    # By its one name, as schema version 8 renamed the stored records: a batch an earlier
    # release spilled names `google`, `OpenAI` as its requests did.
    r["provider"] = canonical_provider(r["provider"])
    return UsageRecord(**r)


# What a Redis backend owed Redis as its engine stopped (Redis away then): one file an engine,
# `<ns>-<id>.json`, in a folder of that Redis (no password) within the store's spill folder, for
# the next process on both to add (`RedisCounters._pay_left`).
_DEBTS_VERSION = 1


def debts_folder(root: Path, database_url: str, redis_url: str) -> Path:
    from budget_middleware.settings import without_password

    redis = hashlib.sha256(without_password(redis_url).encode()).hexdigest()[:16]
    return spill_folder(root, database_url) / f"redis-{redis}"


def write_debts(folder: Path, debts: dict[str, Any]) -> str:
    """Write one engine's debts to Redis whole (a temporary file renamed); the file's path.
    Raises OSError when it cannot."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{debts['id']}{_SUFFIX}"
    return _write_whole(folder, name, {**debts, "version": _DEBTS_VERSION})


def left_debts(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The debts to Redis engines left here, oldest first (any process may pay them: each file
    is paid once, under its id). A file that cannot be read, or lacks what a payment reads
    (`_Debts`), is renamed `.bad` and logged."""
    try:
        with os.scandir(folder) as entries:
            listed = [e.name for e in entries]
    except FileNotFoundError:
        return []
    names = sorted(name for name in listed if name.endswith(_SUFFIX))
    if not names:  # notes of batches (`note_written`) that no debts here name any more: gone
        for name in listed:
            if name.endswith(_WRITTEN):
                with contextlib.suppress(OSError):
                    os.unlink(folder / name)
    found: list[tuple[Path, dict[str, Any]]] = []
    for name in names:
        path = folder / name
        try:
            data = dict(_DEBTS_FILE.validate_json(path.read_bytes()))
        except FileNotFoundError:
            continue  # paid by another process meanwhile
        except Exception as exc:
            reason: object = exc
            if isinstance(exc, ValidationError):  # on one line: where, and what is wrong
                reason = "; ".join(
                    ": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"])))
                    for e in exc.errors(include_url=False)
                )
            logger.error("budget-middleware: debts to Redis in %s cannot be read: %s", path, reason)
            with contextlib.suppress(OSError):
                os.replace(path, str(path) + ".bad")
            continue
        found.append((path, data))
    return found


# How long a folder of debts found empty and unchanged since is taken as still empty, and how
# long after its last change it may be (a file system whose times are coarse gives a file
# written in the same tick the same time: not trusted until later).
_QUIET_RESCAN_SECONDS = 60.0
_QUIET_AFTER_SECONDS = 2.0


class LeftDebts:
    """The debts left in one folder (`left_debts`), for a payer that looks every heartbeat:
    listed again only once the folder has changed since a look that found none to pay (its
    modification time), and at least every minute. Listed every round, a folder that kept
    1,000 `.bad` files cost 2.7 ms of a thread a second (10,000: 22 ms), for ever."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._quiet: tuple[int, float] | None = None  # (its mtime, when) found with none

    def read(self) -> list[tuple[Path, dict[str, Any]]]:
        try:
            changed = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return []
        now = time.time()
        quiet = self._quiet
        if quiet is not None and changed == quiet[0] and now - quiet[1] < _QUIET_RESCAN_SECONDS:
            return []
        found = left_debts(self.folder)
        settled = now - changed / 1e9 > _QUIET_AFTER_SECONDS
        self._quiet = (changed, now) if not found and settled else None
        return found


# A batch's id names a file (`note_written`): letters and digits only (uuid4().hex).
_BATCH_ID = re.compile(r"[A-Za-z0-9]{1,64}")
_BatchId = Annotated[str, StringConstraints(pattern=f"^{_BATCH_ID.pattern}$")]


class _Debt(TypedDict):
    """One debt as `RedisCounters._leave_debts` writes it."""

    key: str
    mark: str
    record: str
    amount: StrictInt
    start: float
    end: float | None
    done: str | None
    places: list[tuple[StrictInt, StrictInt]]
    stamps: list[tuple[float | None, StrictInt]]
    base: StrictInt


class _Debts(TypedDict):
    """A file of debts as `RedisCounters._leave_debts` writes it."""

    version: Literal[1]  # (`_DEBTS_VERSION`)
    id: str
    done: str
    instance: str
    settled: float | None
    batches: NotRequired[list[_BatchId]]  # (none in an earlier release's files)
    debts: list[_Debt]


# A file read is checked whole: a field missing or of another type (a file damaged, or
# hand-edited) failed its payment with a KeyError that no caller expected: the engine could not
# start ("could not start: 'amount'"), or the heartbeat stopped for good, and no other file was
# paid.
_DEBTS_FILE: TypeAdapter[_Debts] = TypeAdapter(_Debts)


# Where the store had a batch an engine gave up as it stopped owing Redis (`give_up`): one note
# a batch, `<batch id>.written`, beside the debts that name it, written by the engine that wrote
# the batch to the store, with the store's clock read after the commit (`note_written`). The
# debts' file could not say when the store had its charges (they were not written when it was
# left): a window key seeded from the store since (Redis restarted empty) holds them when that
# seed read the store after this moment, and the payment leaves them out (`written_at`).
_WRITTEN = ".written"


def note_written(folder: Path, batch_id: str, at: float) -> None:
    """The batch `batch_id` is in the store since `at` (the store's clock after its commit), for
    the debts here that name it; nothing when no debts are here (no note is left for none).
    Raises OSError when it cannot."""
    try:
        with os.scandir(folder) as entries:
            if not any(e.name.endswith(_SUFFIX) for e in entries):
                return
    except FileNotFoundError:
        return
    if _BATCH_ID.fullmatch(batch_id):
        _write_whole(folder, batch_id + _WRITTEN, {"at": at})


def written_at(folder: Path, batch_ids: Sequence[str]) -> float | None:
    """When the store had all these batches (the latest of their notes); None when that is not
    known of each (not written yet, or by an engine on another Redis or spill folder)."""
    latest: float | None = None
    for batch_id in batch_ids:
        try:
            at = orjson.loads((folder / (batch_id + _WRITTEN)).read_bytes())["at"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if isinstance(at, bool) or not isinstance(at, int | float):
            return None
        latest = at if latest is None else max(latest, at)
    return latest


def still_spilled(folder: Path, batch_ids: Sequence[str]) -> bool:
    """Whether any of these batches waits in the store's spill folder `folder` still (given up,
    or taken by an engine that has not written it yet): the store does not hold it."""
    ends = tuple(f"-{batch_id}{_SUFFIX}" for batch_id in batch_ids)
    try:
        with os.scandir(folder) as entries:
            return any(e.name.endswith(ends) for e in entries)
    except FileNotFoundError:
        return False


def debts_paid(path: Path, batch_ids: Sequence[str]) -> None:
    """A file of debts is paid: it goes, and the notes of the batches it names."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    for batch_id in batch_ids:
        with contextlib.suppress(OSError):
            (path.parent / (batch_id + _WRITTEN)).unlink(missing_ok=True)
