"""beaver: a fast, single-file, multi-modal embedded database on SQLite.

One ``.db`` file holds dicts with TTL, lists, priority queues, blobs, time-indexed logs,
pub/sub channels, inter-process locks and searchable document collections. It is safe to
share between threads and processes, and this module needs nothing but the standard library.

    >>> from beaver import BeaverDB
    >>> db = BeaverDB(":memory:")
    >>> config = db.dict("app_config")
    >>> config["theme"] = "dark"
    >>> config["theme"]
    'dark'
    >>> db.close()
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = [
    "BeaverDB", "Model", "QueueItem", "Blob", "Lock",
    "DictManager", "ListManager", "QueueManager", "BlobManager", "AsyncManager",
    "BeaverError", "ClosedError", "SchemaError", "LockTimeout", "LockLost", "QueueEmpty",
    "Timeout", "DatabaseBusy", "ValidationError", "FeatureUnavailable",
]

import asyncio
import base64
import contextlib
import datetime as _dt
import functools
import io
import json
import logging
import os
import queue as _queue
import sqlite3
import sys
import tempfile
import threading
import time
import types
import typing
import uuid
import weakref
from collections.abc import MutableMapping, MutableSequence

logger = logging.getLogger("beaver")


# ==========================================================================================
# Constants
# ==========================================================================================

SCHEMA_VERSION = 1
DEFAULT_TIMEOUT = 30.0          # seconds a connection waits for SQLite's write lock
WATCH_INTERVAL = 0.001          # seconds between two PRAGMA data_version checks
WATCH_LINGER = 2.0              # seconds the watcher keeps polling after its last user left
PURGE_INTERVAL = 1.0            # seconds between two purges of expired dict keys
PURGE_BATCH = 500               # expired rows deleted per purge
PAGE_SIZE = 1000                # rows fetched per page when iterating
LOCK_WAITER_GRACE = 3.0         # a waiter that stops heart-beating this long loses its place
_SHIFT = 1 << 60                # list positions live far below this; see ListManager._shift


# ==========================================================================================
# Exceptions
# ==========================================================================================

class BeaverError(Exception):
    """Root of every error beaver raises on its own account."""


class ClosedError(BeaverError):
    """The database was closed; no further calls are possible."""


class SchemaError(BeaverError):
    """The file holds a beaver layout this version does not understand."""


class FeatureUnavailable(BeaverError):
    """The SQLite library lacks a feature (FTS5, trigram tokenizer...) this call needs."""


class Timeout(BeaverError, TimeoutError):
    """A wait (queue ``get``, channel ``listen``...) ended before anything arrived."""


class DatabaseBusy(Timeout):
    """SQLite's write lock stayed taken for longer than the database timeout."""


class LockTimeout(Timeout):
    """A beaver lock could not be acquired in time."""


class LockLost(BeaverError):
    """A lock was released or renewed by an object that no longer holds it."""


class QueueEmpty(BeaverError, IndexError):
    """A non-blocking ``get`` found the queue empty."""


class ValidationError(BeaverError, ValueError):
    """A value does not fit the model of its structure."""


# ==========================================================================================
# Helpers
# ==========================================================================================

def _now() -> float:
    """The one clock of beaver: seconds since the epoch, as stored in every table."""
    return time.time()


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a structure name must be a non-empty str, not {name!r}")
    return name


def _check_key(key) -> str:
    if not isinstance(key, str):
        raise TypeError(f"keys must be str, not {type(key).__name__}")
    return key


def _check_ttl(ttl_seconds):
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float)):
        raise TypeError(f"ttl_seconds must be a number of seconds, not {ttl_seconds!r}")
    if not ttl_seconds > 0:
        raise ValueError(f"ttl_seconds must be positive, not {ttl_seconds!r}")
    return float(ttl_seconds)


def _seconds(value, what: str):
    """Accept seconds as a number or a ``timedelta``; ``None`` passes through."""
    if value is None:
        return None
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be seconds or a timedelta, not {value!r}")
    if value < 0:
        raise ValueError(f"{what} must not be negative, not {value!r}")
    return float(value)


class _Deadline:
    """Remaining time of a wait; ``None`` means wait forever."""

    __slots__ = ("end",)

    def __init__(self, timeout):
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self, cap=None):
        left = None if self.end is None else max(0.0, self.end - time.monotonic())
        if cap is not None:
            left = cap if left is None else min(left, cap)
        return left

    @property
    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


# ==========================================================================================
# Codecs and Model
# ==========================================================================================

def _json_dumps(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise TypeError(f"value is not JSON-serializable: {e}") from None


class _JsonCodec:
    """Plain JSON: what goes in as dicts, lists, str, numbers, bools and None comes back."""

    model = None

    def encode(self, value) -> str:
        if hasattr(value, "model_dump_json"):
            return value.model_dump_json()
        return _json_dumps(value)

    def decode(self, text):
        return json.loads(text)


class _ModelCodec:
    """Values are instances of ``model`` (pydantic or ``beaver.Model``), validated on write."""

    def __init__(self, model):
        for method in ("model_validate", "model_validate_json"):
            if not hasattr(model, method):
                raise TypeError(f"model {model!r} has no {method}(); use pydantic or beaver.Model")
        self.model = model

    def encode(self, value) -> str:
        if type(value) is not self.model:
            if isinstance(value, self.model):
                value = value.model_dump()  # a subclass: keep only what the model reads back
            elif not isinstance(value, dict):
                raise TypeError(f"expected a {self.model.__name__} (or a dict of its fields), "
                                f"got {type(value).__name__}")
            value = self._validate(value)
        return value.model_dump_json()

    def decode(self, text):
        return self.model.model_validate_json(text)

    def _validate(self, data):
        try:
            return self.model.model_validate(data)
        except (TypeError, ValueError) as e:
            raise ValidationError(f"invalid {self.model.__name__}: {e}") from None


_JSON = _JsonCodec()


def _codec_for(model):
    return _JSON if model is None else _ModelCodec(model)


def _to_jsonable(value):
    """A plain JSON value for anything beaver stores (models become dicts)."""
    if hasattr(value, "model_dump"):
        return json.loads(value.model_dump_json())
    return value


class Model:
    """A zero-dependency, annotation-driven record with pydantic's method names.

        >>> class User(Model):
        ...     name: str
        ...     age: int = 0
        >>> User(name="Ada").model_dump()
        {'name': 'Ada', 'age': 0}
        >>> User.model_validate_json('{"name": "Bob", "age": 3}')
        User(name='Bob', age=3)

    Fields are the class annotations (inherited ones too); a class attribute is the default.
    Nested models, lists and dicts of models are rebuilt from plain JSON on validation.
    """

    def __init__(self, **data):
        fields = self._fields()
        unknown = set(data) - set(fields)
        if unknown:
            raise ValidationError(f"{type(self).__name__}: unknown field(s) {sorted(unknown)}")
        for field, annotation in fields.items():
            if field in data:
                value = _coerce(annotation, data[field], f"{type(self).__name__}.{field}")
            elif hasattr(type(self), field):
                value = _copy_default(getattr(type(self), field))
            else:
                raise ValidationError(f"{type(self).__name__}: missing field {field!r}")
            object.__setattr__(self, field, value)

    @classmethod
    def _fields(cls) -> dict:
        cached = cls.__dict__.get("_beaver_fields")
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = {k: v for k, v in hints.items()
                      if not k.startswith("_") and typing.get_origin(v) is not typing.ClassVar}
            cls._beaver_fields = cached
        return cached

    def model_dump(self) -> dict:
        """The record as plain JSON-ready data (nested models become dicts)."""
        return {field: _dump(getattr(self, field)) for field in self._fields()}

    def model_dump_json(self) -> str:
        """The record as a JSON string."""
        return _json_dumps(self.model_dump())

    @classmethod
    def model_validate(cls, obj):
        """Build an instance from a dict (or return ``obj`` if it already is one)."""
        if isinstance(obj, cls):
            return obj
        if not isinstance(obj, dict):
            raise ValidationError(f"{cls.__name__} needs a dict, not {type(obj).__name__}")
        return cls(**obj)

    @classmethod
    def model_validate_json(cls, text):
        """Build an instance from a JSON string."""
        return cls.model_validate(json.loads(text))

    def __eq__(self, other):
        return type(other) is type(self) and other.model_dump() == self.model_dump()

    def __repr__(self):
        inner = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields())
        return f"{type(self).__name__}({inner})"


def _copy_default(value):
    return value.copy() if isinstance(value, (list, dict, set)) else value


def _dump(value):
    if isinstance(value, Model):
        return value.model_dump()
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


_SIMPLE_TYPES = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


def _coerce(annotation, value, where):
    """Check ``value`` against a field annotation, rebuilding nested models from dicts."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is typing.Any or annotation is object:
        return value
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ValidationError as e:
                errors.append(str(e))
        raise ValidationError("; ".join(errors) or f"{where}: invalid value {value!r}")
    if isinstance(annotation, type) and issubclass(annotation, Model):
        if isinstance(value, dict):
            return annotation.model_validate(value)
        if not isinstance(value, annotation):
            raise ValidationError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    if origin in (list, set, tuple) and isinstance(value, (list, tuple, set)):
        item = args[0] if args else typing.Any
        return [_coerce(item, v, where) for v in value]
    if origin is dict and isinstance(value, dict):
        item = args[1] if len(args) == 2 else typing.Any
        return {k: _coerce(item, v, where) for k, v in value.items()}
    if origin is not None:
        expected = (origin,)
    else:
        expected = _SIMPLE_TYPES.get(annotation, (annotation,) if isinstance(annotation, type) else ())
    if expected and not isinstance(value, expected):
        raise ValidationError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, "
                              f"got {type(value).__name__}")
    if annotation is not bool and expected and isinstance(value, bool) and bool not in expected:
        raise ValidationError(f"{where}: expected {annotation.__name__}, got bool")
    return value


# ==========================================================================================
# Core: connections, pragmas, transactions, schema
# ==========================================================================================

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS beaver_meta (
        key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS beaver_dicts (
        name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, expires_at REAL,
        PRIMARY KEY (name, key)) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS beaver_dicts_expiry
        ON beaver_dicts (expires_at) WHERE expires_at IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS beaver_lists (
        name TEXT NOT NULL, pos INTEGER NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (name, pos)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS beaver_queues (
        seq INTEGER PRIMARY KEY, name TEXT NOT NULL, priority NUMERIC NOT NULL,
        timestamp REAL NOT NULL, data TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS beaver_queues_order ON beaver_queues (name, priority, seq)""",
    """CREATE TABLE IF NOT EXISTS beaver_blobs (
        name TEXT NOT NULL, key TEXT NOT NULL, data BLOB NOT NULL, metadata TEXT,
        PRIMARY KEY (name, key)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS beaver_locks (
        ticket INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, owner TEXT NOT NULL,
        expires_at REAL NOT NULL, held INTEGER NOT NULL DEFAULT 0)""",
    """CREATE INDEX IF NOT EXISTS beaver_locks_name ON beaver_locks (name, ticket)""",
]

_live_cores: "weakref.WeakSet[_Core]" = weakref.WeakSet()


def _reset_cores_after_fork():
    for core in list(_live_cores):
        core._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_cores_after_fork)


def _memory_path() -> str:
    """A private file for ``":memory:"`` databases: RAM-backed where /dev/shm exists."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="beaver-memory-", suffix=".db", dir=folder)
    os.close(fd)
    return path


class _Core:
    """Per-thread connections to one file, transactions, and after-commit hooks.

    Every thread gets its own ``sqlite3.Connection`` (autocommit mode). Writes that read
    first run inside ``transaction()``, which starts with ``BEGIN IMMEDIATE`` so that two
    writers never deadlock on a lock upgrade. Nested ``transaction()`` calls use savepoints.
    """

    def __init__(self, path, timeout=DEFAULT_TIMEOUT, durability="normal"):
        if durability not in ("normal", "full"):
            raise ValueError("durability must be 'normal' or 'full'")
        self.memory = str(path) == ":memory:"
        self.path = _memory_path() if self.memory else os.fspath(path)
        self.timeout = float(timeout)
        self.synchronous = "OFF" if self.memory else durability.upper()
        self.closed = False
        self._local = threading.local()
        self._conns: list = []
        self._conns_lock = threading.Lock()
        self._next_purge = 0.0
        self.watcher = _Watcher(self)
        _live_cores.add(self)
        try:
            self._ensure_schema()
        except BaseException:
            self.close()
            raise

    # -- connections ------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
        return conn

    def _open(self) -> sqlite3.Connection:
        if self.closed:
            raise ClosedError("the database is closed")
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False, cached_statements=256)
            conn.execute("PRAGMA busy_timeout = %d" % int(self.timeout * 1000))
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute("PRAGMA synchronous = %s" % self.synchronous)
            conn.execute("PRAGMA foreign_keys = OFF")
        except sqlite3.DatabaseError as e:
            raise self._open_error(e) from None
        with self._conns_lock:
            if self.closed:
                conn.close()
                raise ClosedError("the database is closed")
            self._forget_dead_threads()
            self._conns.append((threading.current_thread(), conn))
        self._local.conn = conn
        self._local.depth = 0
        self._local.pending = []
        return conn

    def _open_error(self, e) -> BeaverError:
        folder = os.path.dirname(os.path.abspath(self.path))
        if "not a database" in str(e) or "malformed" in str(e):
            return BeaverError(f"{self.path!r} is not a SQLite database (or it is corrupt): {e}")
        if not os.path.isdir(folder):
            return BeaverError(f"cannot open {self.path!r}: folder {folder!r} does not exist")
        if not os.access(folder, os.W_OK):
            return BeaverError(f"cannot open {self.path!r}: folder {folder!r} is not writable "
                               "(beaver needs to create the WAL files beside the database)")
        return BeaverError(f"cannot open {self.path!r}: {e}")

    def _forget_dead_threads(self):
        alive = []
        for thread, conn in self._conns:
            if thread.is_alive():
                alive.append((thread, conn))
            else:
                conn.close()
        self._conns = alive

    def _after_fork(self):
        """In a forked child the parent's connections must not be used (nor closed)."""
        self._local = threading.local()
        self._conns = []
        self._conns_lock = threading.Lock()
        self.watcher = _Watcher(self)

    def close(self):
        """Close every thread's connection and stop background threads."""
        if self.closed:
            return
        self.closed = True
        self.watcher.stop()
        with self._conns_lock:
            for _, conn in self._conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._conns = []
        self._local = threading.local()
        _live_cores.discard(self)
        if self.memory:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(self.path + suffix)

    # -- statements and transactions ---------------------------------------------------

    def execute(self, sql, params=()):
        """Run one statement on this thread's connection (autocommit unless in a transaction)."""
        try:
            return self.conn().execute(sql, params)
        except sqlite3.Error as e:
            raise self._error(e) from e

    def executemany(self, sql, rows):
        try:
            return self.conn().executemany(sql, rows)
        except sqlite3.Error as e:
            raise self._error(e) from e

    def _error(self, e):
        if self.closed:
            return ClosedError("the database is closed")
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            return DatabaseBusy(f"the database stayed locked for over {self.timeout:g}s: {e}")
        if isinstance(e, sqlite3.ProgrammingError) and "closed" in str(e):
            return ClosedError("the database is closed")
        return BeaverError(f"SQLite error: {e}")

    @property
    def in_transaction(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; nested calls become savepoints.

        Callbacks registered with ``after_commit`` run once the outermost level commits,
        and are dropped if it (or their savepoint) rolls back.
        """
        conn = self.conn()
        local = self._local
        depth = local.depth
        if depth == 0:
            self._run(conn, "BEGIN IMMEDIATE")
            local.pending = []
        else:
            self._run(conn, f"SAVEPOINT beaver_{depth}")
        mark = len(local.pending)
        local.depth = depth + 1
        try:
            yield conn
        except BaseException:
            local.depth = depth
            del local.pending[mark:]
            if depth == 0:
                self._rollback(conn)
            else:
                self._run(conn, f"ROLLBACK TO beaver_{depth}")
                self._run(conn, f"RELEASE beaver_{depth}")
            raise
        local.depth = depth
        if depth > 0:
            self._run(conn, f"RELEASE beaver_{depth}")
            return
        try:
            self._run(conn, "COMMIT")
        except BaseException:
            local.pending = []
            self._rollback(conn)
            raise
        pending, local.pending = local.pending, []
        for callback in pending:
            callback()

    def _run(self, conn, sql):
        try:
            conn.execute(sql)
        except sqlite3.Error as e:
            raise self._error(e) from e

    def _rollback(self, conn):
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def after_commit(self, callback):
        """Run ``callback`` now, or after the current transaction commits."""
        if getattr(self._local, "depth", 0) > 0:
            self._local.pending.append(callback)
        else:
            callback()

    def changed(self):
        """Tell in-process waiters that this thread wrote something (after commit)."""
        if self.watcher.users:
            self.after_commit(self.watcher.wake)

    # -- schema ------------------------------------------------------------------------

    def _ensure_schema(self):
        found = self._schema_version()
        if found == SCHEMA_VERSION and self._tables_complete():
            return
        if found is not None and found != SCHEMA_VERSION:
            raise SchemaError(f"{self.path!r} has beaver schema version {found}; this beaver "
                              f"({__version__}) reads version {SCHEMA_VERSION} only")
        with self.transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO beaver_meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    def _schema_version(self):
        try:
            row = self.execute("SELECT value FROM beaver_meta WHERE key = 'schema_version'"
                               ).fetchone()
        except BeaverError as e:
            if "no such table" in str(e):
                return None
            raise
        if row is None:
            return None
        try:
            return int(row[0])
        except ValueError:
            raise SchemaError(f"{self.path!r} has an unreadable schema stamp {row[0]!r}") from None

    def _tables_complete(self) -> bool:
        wanted = {s.split("EXISTS")[1].split()[0] for s in _SCHEMA}
        rows = self.execute("SELECT name FROM sqlite_master WHERE name LIKE 'beaver%'").fetchall()
        return wanted <= {r[0] for r in rows}

    def purge_due(self) -> bool:
        """True about once per PURGE_INTERVAL: time to delete a batch of expired keys."""
        now = _now()
        if now < self._next_purge:
            return False
        self._next_purge = now + PURGE_INTERVAL
        return True


# ==========================================================================================
# Change notification
# ==========================================================================================

class _Watcher:
    """Wakes waiting threads when the database changes, whichever process wrote.

    While anybody waits, one thread polls ``PRAGMA data_version`` on its own connection every
    millisecond (a few microseconds each) and bumps ``tick`` when another connection has
    committed. Writers of this process bump it directly. Waiters sleep on one condition.
    """

    def __init__(self, core):
        self._core = core
        self._cond = threading.Condition()
        self.tick = 0
        self.users = 0
        self._thread = None
        self._stopping = False

    def wake(self):
        with self._cond:
            self.tick += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def watching(self):
        """Keep the poller running while the block runs."""
        with self._cond:
            self.users += 1
            self._start()
        try:
            yield self
        finally:
            with self._cond:
                self.users -= 1

    def wait(self, tick, timeout):
        """Sleep until ``tick`` moves on or ``timeout`` seconds pass (the caller watches)."""
        with self._cond:
            if self.tick == tick and not self._stopping:
                self._cond.wait(timeout)

    def wait_for(self, probe, timeout=None, cap=None):
        """Call ``probe()`` until it returns something other than None, waking on changes.

        ``cap`` bounds each sleep (or is a callable returning that bound, for waits whose
        condition also depends on the clock). Returns None when ``timeout`` passes.
        """
        deadline = _Deadline(timeout)
        with self.watching():
            while True:
                tick = self.tick
                result = probe()
                if result is not None:
                    return result
                if self._stopping:
                    raise ClosedError("the database was closed while waiting")
                if deadline.expired:
                    return None
                limit = cap() if callable(cap) else cap
                self.wait(tick, deadline.remaining(limit))

    def _start(self):
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._poll, name="beaver-watcher", daemon=True)
            self._thread.start()

    def _poll(self):
        try:
            conn = sqlite3.connect(self._core.path, timeout=self._core.timeout,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            logger.exception("beaver watcher could not open %s", self._core.path)
            return
        idle_since = None
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            while not self._stopping:
                time.sleep(WATCH_INTERVAL)
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    last = version
                    self.wake()
                if self.users:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > WATCH_LINGER:
                    with self._cond:
                        if not self.users:
                            self._thread = None
                            return
        except sqlite3.Error:
            if not self._stopping:
                logger.exception("beaver watcher stopped")
        finally:
            conn.close()

    def stop(self):
        self._stopping = True
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)


# ==========================================================================================
# Events
# ==========================================================================================

class _EventHandle:
    """Returned by ``manager.on(...)``; call ``off()`` to stop listening."""

    def __init__(self, events, topic, event, callback):
        self._events, self.topic, self.event, self.callback = events, topic, event, callback
        self.active = True

    def off(self):
        """Stop delivering events to this callback (idempotent)."""
        if self.active:
            self.active = False
            self._events.remove(self)

    def __repr__(self):
        state = "on" if self.active else "off"
        return f"<EventHandle {self.topic[0]}:{self.topic[1]} {self.event!r} {state}>"


class _Events:
    """Callbacks per (kind, name), run after commit on one dispatcher thread, in order."""

    def __init__(self):
        self._handles: dict = {}
        self._lock = threading.Lock()
        self._inbox: _queue.SimpleQueue = _queue.SimpleQueue()
        self._thread = None

    def listening(self, topic) -> bool:
        return topic in self._handles

    def add(self, topic, event, callback) -> _EventHandle:
        if not callable(callback):
            raise TypeError("callback must be callable")
        if not isinstance(event, str) or not event:
            raise TypeError("event must be a non-empty str such as 'set' or '*'")
        handle = _EventHandle(self, topic, event, callback)
        with self._lock:
            self._handles[topic] = self._handles.get(topic, ()) + (handle,)
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name="beaver-events",
                                                daemon=True)
                self._thread.start()
        return handle

    def remove(self, handle):
        with self._lock:
            rest = tuple(h for h in self._handles.get(handle.topic, ()) if h is not handle)
            if rest:
                self._handles[handle.topic] = rest
            else:
                self._handles.pop(handle.topic, None)

    def emit(self, topic, payload):
        handles = self._handles.get(topic)
        if handles:
            self._inbox.put((handles, payload))

    def _dispatch(self):
        while True:
            item = self._inbox.get()
            if item is None:
                return
            handles, payload = item
            for handle in handles:
                if handle.active and handle.event in ("*", payload["event"]):
                    try:
                        handle.callback(payload)
                    except Exception:
                        logger.exception("beaver event callback %r failed", handle.callback)

    def stop(self):
        if self._thread is not None:
            self._inbox.put(None)


# ==========================================================================================
# Manager base
# ==========================================================================================

class _Held:
    """What ``acquire()`` returns: truthy, and a context manager that releases on exit."""

    __slots__ = ("_lock", "_value")

    def __init__(self, lock, value):
        self._lock, self._value = lock, value

    def __bool__(self):
        return True

    def __enter__(self):
        return self._value

    def __exit__(self, *exc):
        self._lock.release()

    def release(self):
        self._lock.release()


class _Manager:
    """Shared plumbing of every structure: codec, events, batch lock, dump/load, async."""

    _kind = ""      # "dict", "list", ...: the name in dumps, events and lock names
    _table = ""     # the table whose rows carry a ``name`` column for this structure

    def __init__(self, db, name, model=None):
        self._db = db
        self._core = db._core
        self._name = _check_name(name)
        self._model = model
        self._codec = _codec_for(model)
        self._topic = (self._kind, self._name)
        self._lock = None
        self._lock_guard = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self):
        return self._model

    def __repr__(self):
        return f"<{type(self).__name__} {self._name!r}>"

    # -- writes and events -------------------------------------------------------------

    def _wrote(self, event, **fields):
        """After a write: wake waiters and, if anybody listens, emit ``event``."""
        core = self._core
        if core.watcher.users:
            core.after_commit(core.watcher.wake)
        if self._db._events.listening(self._topic):
            payload = {"event": event, "kind": self._kind, "name": self._name, **fields}
            core.after_commit(lambda: self._db._events.emit(self._topic, payload))

    def on(self, event, callback) -> _EventHandle:
        """Call ``callback(payload)`` after every ``event`` ('set', 'del', ... or '*').

            >>> handle = db.dict("config").on("set", lambda p: print(p["key"]))
            >>> handle.off()
        """
        return self._db._events.add(self._topic, event, callback)

    # -- batch lock ----------------------------------------------------------------------

    def acquire(self, timeout=None, block=True, ttl=60.0):
        """Take this structure's inter-process lock; use the result in a ``with`` block.

            >>> with db.queue("jobs").acquire(timeout=5) as q:
            ...     batch = [q.get(block=False) for _ in range(len(q))]

        The lock is advisory: it excludes other holders of the same structure's lock, in any
        thread or process. Raises ``LockTimeout`` (a ``TimeoutError``) if not acquired.
        """
        with self._lock_guard:
            if self._lock is None:
                self._lock = Lock(self._db, f"__beaver_{self._kind}__:{self._name}", ttl=ttl)
        self._lock.acquire(timeout=timeout, block=block)
        return _Held(self._lock, self)

    def release(self):
        """Release the lock taken by ``acquire()``."""
        if self._lock is None:
            raise LockLost(f"{self!r} is not locked")
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    # -- whole-structure operations -------------------------------------------------------

    def clear(self):
        """Remove every item of this structure."""
        with self._core.transaction():
            self._core.execute(f"DELETE FROM {self._table} WHERE name = ?", (self._name,))
            self._wrote("clear")

    def dump(self, fp=None):
        """Export to a JSON-ready dict, or write it as JSON to the file object ``fp``.

            >>> data = db.dict("config").dump()
            >>> data["metadata"]["count"]
            2
        """
        with self._core.transaction():
            items = self._dump_items()
        data = {
            "metadata": {
                "type": self._kind, "name": self._name, "count": len(items),
                "dumped_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "beaver_version": __version__,
            },
            "items": items,
        }
        if fp is None:
            return data
        json.dump(data, fp, ensure_ascii=False, indent=2)
        return None

    def load(self, data_or_fp):
        """Add the items of a ``dump()`` (a dict, JSON text or a file object) in one transaction."""
        data = _read_dump(data_or_fp)
        kind = data.get("metadata", {}).get("type", self._kind)
        if kind.lower() != self._kind:
            raise ValueError(f"this dump holds a {kind}, not a {self._kind}")
        items = data.get("items")
        if not isinstance(items, list):
            raise ValueError("a dump needs an 'items' list")
        with self._core.transaction():
            self._load_items(items)

    def _dump_items(self) -> list:
        raise NotImplementedError

    def _load_items(self, items):
        raise NotImplementedError

    def _paged(self, sql, start, key_of=lambda row: row[0]):
        """Iterate rows of ``sql`` (taking name, cursor, limit) page by page, by cursor."""
        cursor = start
        while True:
            rows = self._core.execute(sql, (self._name, cursor, PAGE_SIZE)).fetchall()
            yield from rows
            if len(rows) < PAGE_SIZE:
                return
            cursor = key_of(rows[-1])

    def as_async(self) -> "AsyncManager":
        """An awaitable twin of this manager whose calls run in worker threads.

            >>> adict = db.dict("config").as_async()
            >>> await adict.set("theme", "dark")
        """
        return AsyncManager(self)


def _read_dump(data_or_fp) -> dict:
    if isinstance(data_or_fp, (str, bytes)):
        data = json.loads(data_or_fp)
    elif hasattr(data_or_fp, "read"):
        data = json.load(data_or_fp)
    else:
        data = data_or_fp
    if not isinstance(data, dict):
        raise ValueError("a dump is a JSON object with 'metadata' and 'items'")
    return data


# ==========================================================================================
# Dict
# ==========================================================================================

_MISSING = object()
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


class DictManager(_Manager, MutableMapping):
    """A persistent ``dict`` of str keys, with optional expiry per key.

        >>> config = db.dict("app_config")
        >>> config["theme"] = "dark"
        >>> config.set("session", {"user": 1}, ttl_seconds=3600)
        >>> sorted(config)
        ['session', 'theme']
    """

    _kind = "dict"
    _table = "beaver_dicts"

    def __getitem__(self, key):
        row = self._core.execute(
            f"SELECT value FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}",
            (self._name, _check_key(key), _now())).fetchone()
        if row is None:
            raise KeyError(key)
        return self._codec.decode(row[0])

    def get(self, key, default=None):
        """The value of ``key``, or ``default`` if it is missing or expired."""
        row = self._core.execute(
            f"SELECT value FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}",
            (self._name, _check_key(key), _now())).fetchone()
        return default if row is None else self._codec.decode(row[0])

    def __setitem__(self, key, value):
        self.set(key, value)

    def set(self, key, value, ttl_seconds=None):
        """Store ``value`` under ``key``; with ``ttl_seconds`` it expires that much later.

            >>> cache.set("weather", {"temp": 21}, ttl_seconds=600)
        """
        key, ttl = _check_key(key), _check_ttl(ttl_seconds)
        text = self._codec.encode(value)
        expires_at = None if ttl is None else _now() + ttl
        self._core.execute(
            "INSERT INTO beaver_dicts (name, key, value, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at",
            (self._name, key, text, expires_at))
        self._wrote("set", key=key, value=_to_jsonable(value))
        if self._core.purge_due():
            self._purge_expired()

    def __delitem__(self, key):
        cursor = self._core.execute(
            f"DELETE FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}",
            (self._name, _check_key(key), _now()))
        if cursor.rowcount == 0:
            raise KeyError(key)
        self._wrote("del", key=key)

    def __contains__(self, key):
        if not isinstance(key, str):
            return False
        return self._core.execute(
            f"SELECT 1 FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}",
            (self._name, key, _now())).fetchone() is not None

    def __len__(self):
        return self._core.execute(
            f"SELECT count(*) FROM beaver_dicts WHERE name = ? AND {_LIVE}",
            (self._name, _now())).fetchone()[0]

    def __iter__(self):
        for key, _ in self._live_rows():
            yield key

    def keys(self) -> list:
        """A snapshot list of the live keys, in key order."""
        return list(self)

    def values(self) -> list:
        """A snapshot list of the live values, in key order."""
        return [value for _, value in self.items()]

    def items(self) -> list:
        """A snapshot list of live ``(key, value)`` pairs, in key order."""
        decode = self._codec.decode
        return [(key, decode(text)) for key, text in self._live_rows()]

    def _live_rows(self):
        now = _now()
        sql = ("SELECT key, value FROM beaver_dicts WHERE name = ? AND key %s ? AND "
               f"{_LIVE} ORDER BY key LIMIT ?")
        op, cursor = ">=", ""  # the first page includes the key '', which sorts first
        while True:
            rows = self._core.execute(sql % op, (self._name, cursor, now, PAGE_SIZE)).fetchall()
            yield from rows
            if len(rows) < PAGE_SIZE:
                return
            op, cursor = ">", rows[-1][0]

    def pop(self, key, default=_MISSING):
        """Remove ``key`` and return its value (or ``default``; else ``KeyError``)."""
        with self._core.transaction():
            value = self.get(key, _MISSING)
            if value is _MISSING:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            del self[key]
            return value

    def popitem(self):
        """Remove and return the pair with the smallest key; ``KeyError`` if empty."""
        with self._core.transaction():
            for key, text in self._live_rows():
                self._core.execute("DELETE FROM beaver_dicts WHERE name = ? AND key = ?",
                                   (self._name, key))
                self._wrote("del", key=key)
                return key, self._codec.decode(text)
        raise KeyError("popitem(): dictionary is empty")

    def setdefault(self, key, default=None):
        """Return the value of ``key``, storing ``default`` first if it is missing."""
        with self._core.transaction():
            value = self.get(key, _MISSING)
            if value is _MISSING:
                self.set(key, default)
                value = default
            return value

    def update(self, *args, **kwargs):
        """Like ``dict.update``, in one transaction."""
        with self._core.transaction():
            for key, value in dict(*args, **kwargs).items():
                self.set(key, value)

    def ttl(self, key):
        """Seconds until ``key`` expires; ``None`` if it never does; ``KeyError`` if absent."""
        row = self._core.execute(
            f"SELECT expires_at FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}",
            (self._name, _check_key(key), _now())).fetchone()
        if row is None:
            raise KeyError(key)
        return None if row[0] is None else max(0.0, row[0] - _now())

    def _purge_expired(self):
        self._core.execute(
            "DELETE FROM beaver_dicts WHERE (name, key) IN (SELECT name, key FROM beaver_dicts "
            "WHERE expires_at <= ? LIMIT ?)", (_now(), PURGE_BATCH))

    def _dump_items(self):
        rows = self._core.execute(
            f"SELECT key, value, expires_at FROM beaver_dicts WHERE name = ? AND {_LIVE} "
            "ORDER BY key", (self._name, _now())).fetchall()
        return [{"key": k, "value": json.loads(v), "expires_at": e} for k, v, e in rows]

    def _load_items(self, items):
        now = _now()
        for item in items:
            expires_at = item.get("expires_at")
            if expires_at is not None and expires_at <= now:
                continue
            ttl = None if expires_at is None else expires_at - now
            self.set(item["key"], item["value"], ttl_seconds=ttl)


# ==========================================================================================
# List
# ==========================================================================================

class ListManager(_Manager, MutableSequence):
    """A persistent ``list`` with O(1) ends and index access.

        >>> tasks = db.list("tasks")
        >>> tasks.push("write report")
        >>> tasks.prepend("plan")
        >>> tasks[0], len(tasks)
        ('plan', 2)

    Items sit at dense integer positions, so ``tasks[i]`` is one index lookup whatever
    ``i`` is; inserting or deleting in the middle shifts the shorter side, like a list does.
    """

    _kind = "list"
    _table = "beaver_lists"

    _MIN = "(SELECT min(pos) FROM beaver_lists WHERE name = ?)"
    _MAX = "(SELECT max(pos) FROM beaver_lists WHERE name = ?)"

    # -- positions ------------------------------------------------------------------------

    def _bounds(self):
        """(first position, length) of the list."""
        lo, hi = self._core.execute(f"SELECT {self._MIN}, {self._MAX}",
                                    (self._name, self._name)).fetchone()
        return (0, 0) if lo is None else (lo, hi - lo + 1)

    def _index(self, index, length, clamp=False) -> int:
        if isinstance(index, bool) or not isinstance(index, int):
            if hasattr(index, "__index__"):
                index = index.__index__()
            else:
                raise TypeError(f"list indices must be integers or slices, not "
                                f"{type(index).__name__}")
        if index < 0:
            index += length
        if clamp:
            return min(max(index, 0), length)
        if not 0 <= index < length:
            raise IndexError("list index out of range")
        return index

    def _shift(self, lo_pos, hi_pos, delta):
        """Move items at positions [lo_pos, hi_pos] by ``delta`` without key collisions.

        The rows first jump far beyond every live position, then land at their new place.
        """
        self._core.execute(
            "UPDATE beaver_lists SET pos = pos + ? WHERE name = ? AND pos BETWEEN ? AND ?",
            (_SHIFT + delta, self._name, lo_pos, hi_pos))
        self._core.execute(
            "UPDATE beaver_lists SET pos = pos - ? WHERE name = ? AND pos >= ?",
            (_SHIFT, self._name, _SHIFT // 2))

    # -- reading --------------------------------------------------------------------------

    def __len__(self):
        return self._bounds()[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._get_slice(index)
        if isinstance(index, int) and not isinstance(index, bool):
            if index >= 0:
                sql = f"SELECT value FROM beaver_lists WHERE name = ? AND pos = {self._MIN} + ?"
            else:
                sql = (f"SELECT value FROM beaver_lists WHERE name = ? "
                       f"AND pos = {self._MAX} + 1 + ?")
            row = self._core.execute(sql, (self._name, self._name, index)).fetchone()
            if row is None:
                raise IndexError("list index out of range")
            return self._codec.decode(row[0])
        with self._core.transaction():
            lo, length = self._bounds()
            return self[self._index(index, length)]

    def _get_slice(self, s):
        with self._core.transaction():
            lo, length = self._bounds()
            indices = range(*s.indices(length))
            if not indices:
                return []
            first, last = min(indices), max(indices)
            rows = self._core.execute(
                "SELECT value FROM beaver_lists WHERE name = ? AND pos BETWEEN ? AND ? "
                "ORDER BY pos", (self._name, lo + first, lo + last)).fetchall()
        decode = self._codec.decode
        return [decode(rows[i - first][0]) for i in indices]

    def __iter__(self):
        decode = self._codec.decode
        sql = ("SELECT pos, value FROM beaver_lists WHERE name = ? AND pos > ? "
               "ORDER BY pos LIMIT ?")
        for _, text in self._paged(sql, -(1 << 62)):
            yield decode(text)

    def __reversed__(self):
        decode = self._codec.decode
        sql = ("SELECT pos, value FROM beaver_lists WHERE name = ? AND pos < ? "
               "ORDER BY pos DESC LIMIT ?")
        for _, text in self._paged(sql, 1 << 62):
            yield decode(text)

    def _values_from(self, pos) -> list:
        rows = self._core.execute(
            "SELECT value FROM beaver_lists WHERE name = ? AND pos >= ? ORDER BY pos",
            (self._name, pos)).fetchall()
        return [row[0] for row in rows]

    # -- writing --------------------------------------------------------------------------

    def push(self, value):
        """Append ``value`` at the end (``append`` is the same)."""
        text = self._codec.encode(value)
        self._core.execute(
            f"INSERT INTO beaver_lists (name, pos, value) "
            f"VALUES (?, coalesce({self._MAX} + 1, 0), ?)", (self._name, self._name, text))
        self._wrote("push", value=_to_jsonable(value))

    append = push

    def prepend(self, value):
        """Insert ``value`` at the front."""
        text = self._codec.encode(value)
        self._core.execute(
            f"INSERT INTO beaver_lists (name, pos, value) "
            f"VALUES (?, coalesce({self._MIN} - 1, 0), ?)", (self._name, self._name, text))
        self._wrote("prepend", value=_to_jsonable(value))

    def extend(self, values):
        """Append every item of ``values`` in one transaction."""
        texts = [self._codec.encode(v) for v in values]
        with self._core.transaction():
            lo, length = self._bounds()
            start = lo + length if length else 0
            self._core.executemany(
                "INSERT INTO beaver_lists (name, pos, value) VALUES (?, ?, ?)",
                [(self._name, start + i, t) for i, t in enumerate(texts)])
            self._wrote("extend", count=len(texts))

    def __iadd__(self, values):
        self.extend(values)
        return self

    def insert(self, index, value):
        """Insert ``value`` before ``index`` (Python semantics, negative indices too)."""
        text = self._codec.encode(value)
        with self._core.transaction():
            lo, length = self._bounds()
            index = self._index(index, length, clamp=True)
            if index < length // 2:
                self._shift(lo, lo + index - 1, -1)
                pos = lo + index - 1
            else:
                self._shift(lo + index, lo + length - 1, +1)
                pos = lo + index
            if length == 0:
                pos = 0
            self._core.execute("INSERT INTO beaver_lists (name, pos, value) VALUES (?, ?, ?)",
                               (self._name, pos, text))
            self._wrote("insert", index=index, value=_to_jsonable(value))

    def __setitem__(self, index, value):
        if isinstance(index, slice):
            return self._set_slice(index, value)
        text = self._codec.encode(value)
        with self._core.transaction():
            lo, length = self._bounds()
            index = self._index(index, length)
            self._core.execute("UPDATE beaver_lists SET value = ? WHERE name = ? AND pos = ?",
                               (text, self._name, lo + index))
            self._wrote("set", index=index, value=_to_jsonable(value))

    def __delitem__(self, index):
        if isinstance(index, slice):
            return self._del_slice(index)
        with self._core.transaction():
            lo, length = self._bounds()
            self._remove_at(lo, length, self._index(index, length))
            self._wrote("del", index=index)

    def _remove_at(self, lo, length, index):
        self._core.execute("DELETE FROM beaver_lists WHERE name = ? AND pos = ?",
                           (self._name, lo + index))
        if index < length // 2:
            self._shift(lo, lo + index - 1, +1)
        else:
            self._shift(lo + index + 1, lo + length - 1, -1)

    def pop(self, index=None):
        """Remove and return the item at ``index`` (default: the last one).

        On an empty list ``pop()`` returns ``None``; an explicit bad index raises IndexError.
        """
        with self._core.transaction():
            lo, length = self._bounds()
            if index is None:
                if length == 0:
                    return None
                index = length - 1
            index = self._index(index, length)
            row = self._core.execute(
                "SELECT value FROM beaver_lists WHERE name = ? AND pos = ?",
                (self._name, lo + index)).fetchone()
            self._remove_at(lo, length, index)
            self._wrote("pop", index=index)
        return self._codec.decode(row[0])

    def deque(self):
        """Remove and return the first item, or ``None`` if the list is empty."""
        with self._core.transaction():
            row = self._core.execute(
                f"SELECT pos, value FROM beaver_lists WHERE name = ? AND pos = {self._MIN}",
                (self._name, self._name)).fetchone()
            if row is None:
                return None
            self._core.execute("DELETE FROM beaver_lists WHERE name = ? AND pos = ?",
                               (self._name, row[0]))
            self._wrote("deque")
        return self._codec.decode(row[1])

    popleft = deque

    def remove(self, value):
        """Remove the first item equal to ``value`` (``ValueError`` if there is none)."""
        with self._core.transaction():
            del self[self.index(value)]

    def reverse(self):
        """Reverse the list in place, in one transaction."""
        with self._core.transaction():
            lo, length = self._bounds()
            self._rewrite(lo, list(reversed(self._values_from(lo))))
            self._wrote("reverse")

    def _rewrite(self, pos, texts):
        """Replace every item from position ``pos`` on by ``texts``."""
        self._core.execute("DELETE FROM beaver_lists WHERE name = ? AND pos >= ?",
                           (self._name, pos))
        self._core.executemany("INSERT INTO beaver_lists (name, pos, value) VALUES (?, ?, ?)",
                               [(self._name, pos + i, t) for i, t in enumerate(texts)])

    def _set_slice(self, s, values):
        texts = [self._codec.encode(v) for v in values]
        with self._core.transaction():
            lo, length = self._bounds()
            start, stop, step = s.indices(length)
            if step == 1:
                tail = self._values_from(lo + start)
                self._rewrite(lo + start if length else 0,
                              texts + tail[max(0, stop - start):])
            else:
                indices = range(start, stop, step)
                if len(indices) != len(texts):
                    raise ValueError(f"attempt to assign sequence of size {len(texts)} "
                                     f"to extended slice of size {len(indices)}")
                self._core.executemany(
                    "UPDATE beaver_lists SET value = ? WHERE name = ? AND pos = ?",
                    [(t, self._name, lo + i) for t, i in zip(texts, indices)])
            self._wrote("set_slice")

    def _del_slice(self, s):
        with self._core.transaction():
            lo, length = self._bounds()
            indices = range(*s.indices(length))
            if not indices:
                return
            first = min(indices)
            doomed = {i - first for i in indices}
            tail = self._values_from(lo + first)
            self._rewrite(lo + first, [t for i, t in enumerate(tail) if i not in doomed])
            self._wrote("del_slice")

    def _dump_items(self):
        rows = self._core.execute(
            "SELECT value FROM beaver_lists WHERE name = ? ORDER BY pos", (self._name,))
        return [json.loads(row[0]) for row in rows]

    def _load_items(self, items):
        self.extend(items)


# ==========================================================================================
# Queue
# ==========================================================================================

class QueueItem(typing.NamedTuple):
    """One queue entry: lower ``priority`` first, then older ``timestamp`` first."""
    priority: float
    timestamp: float
    data: typing.Any


class QueueManager(_Manager):
    """A persistent priority queue; every item is handed to exactly one ``get``.

        >>> jobs = db.queue("jobs")
        >>> jobs.put({"action": "backup"}, priority=20)
        >>> jobs.put({"action": "reply"}, priority=1)
        >>> jobs.get().data
        {'action': 'reply'}
    """

    _kind = "queue"
    _table = "beaver_queues"

    def put(self, data, priority=0):
        """Add ``data``; lower ``priority`` numbers come out first, FIFO among equals."""
        if isinstance(priority, bool) or not isinstance(priority, (int, float)):
            raise TypeError(f"priority must be a number, not {priority!r}")
        if priority != priority:
            raise ValueError("priority must not be NaN")
        text = self._codec.encode(data)
        self._core.execute(
            "INSERT INTO beaver_queues (name, priority, timestamp, data) VALUES (?, ?, ?, ?)",
            (self._name, priority, _now(), text))
        self._wrote("put", priority=priority, data=_to_jsonable(data))

    def get(self, block=True, timeout=None) -> QueueItem:
        """Remove and return the first item.

        With ``block=False`` an empty queue raises ``QueueEmpty`` (an ``IndexError``);
        otherwise it waits, up to ``timeout`` seconds if given, then raises ``TimeoutError``.
        """
        timeout = _seconds(timeout, "timeout")
        if not block:
            item = self._take()
            if item is None:
                raise QueueEmpty(f"queue {self._name!r} is empty")
            return item
        item = self._core.watcher.wait_for(self._take, timeout)
        if item is None:
            raise Timeout(f"no item arrived in queue {self._name!r} within {timeout}s")
        return item

    def _take(self):
        with self._core.transaction():
            row = self._core.execute(
                "SELECT seq, priority, timestamp, data FROM beaver_queues WHERE name = ? "
                "ORDER BY priority, seq LIMIT 1", (self._name,)).fetchone()
            if row is None:
                return None
            self._core.execute("DELETE FROM beaver_queues WHERE seq = ?", (row[0],))
            item = QueueItem(row[1], row[2], self._codec.decode(row[3]))
            self._wrote("get", priority=item.priority, data=json.loads(row[3]))
        return item

    def peek(self):
        """The item ``get`` would return next, without removing it; ``None`` if empty."""
        row = self._core.execute(
            "SELECT priority, timestamp, data FROM beaver_queues WHERE name = ? "
            "ORDER BY priority, seq LIMIT 1", (self._name,)).fetchone()
        return None if row is None else QueueItem(row[0], row[1], self._codec.decode(row[2]))

    def __len__(self):
        return self._core.execute("SELECT count(*) FROM beaver_queues WHERE name = ?",
                                  (self._name,)).fetchone()[0]

    def __bool__(self):
        return True

    def __iter__(self):
        """The items in the order ``get`` would return them (nothing is removed)."""
        rows = self._core.execute(
            "SELECT priority, timestamp, data FROM beaver_queues WHERE name = ? "
            "ORDER BY priority, seq", (self._name,)).fetchall()
        decode = self._codec.decode
        return iter([QueueItem(p, t, decode(d)) for p, t, d in rows])

    def _dump_items(self):
        return [{"priority": item.priority, "timestamp": item.timestamp,
                 "data": _to_jsonable(item.data)} for item in self]

    def _load_items(self, items):
        self._core.executemany(
            "INSERT INTO beaver_queues (name, priority, timestamp, data) VALUES (?, ?, ?, ?)",
            [(self._name, i.get("priority", 0), i.get("timestamp", _now()),
              self._codec.encode(i["data"])) for i in items])
        self._wrote("load", count=len(items))


# ==========================================================================================
# Blob
# ==========================================================================================

class Blob(typing.NamedTuple):
    """A stored binary object: its key, its bytes and its JSON metadata."""
    key: str
    data: bytes
    metadata: typing.Any


class BlobManager(_Manager):
    """Binary objects (images, PDFs...) under str keys, with JSON metadata.

        >>> files = db.blobs("uploads")
        >>> files.put("a.txt", b"hello", metadata={"mimetype": "text/plain"})
        >>> files.get("a.txt").data
        b'hello'
    """

    _kind = "blob"
    _table = "beaver_blobs"

    def put(self, key, data, metadata=None):
        """Store the bytes ``data`` (bytes, bytearray or memoryview) under ``key``."""
        key = _check_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob data must be bytes-like, not {type(data).__name__}")
        meta = None if metadata is None else self._codec.encode(metadata)
        self._core.execute(
            "INSERT INTO beaver_blobs (name, key, data, metadata) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, key) DO UPDATE SET data = excluded.data, "
            "metadata = excluded.metadata", (self._name, key, bytes(data), meta))
        self._wrote("put", key=key, size=len(data), metadata=_to_jsonable(metadata))

    def get(self, key):
        """The ``Blob`` stored under ``key``, or ``None``."""
        row = self._core.execute(
            "SELECT data, metadata FROM beaver_blobs WHERE name = ? AND key = ?",
            (self._name, _check_key(key))).fetchone()
        if row is None:
            return None
        return Blob(key, row[0], None if row[1] is None else self._codec.decode(row[1]))

    def __getitem__(self, key):
        blob = self.get(key)
        if blob is None:
            raise KeyError(key)
        return blob

    def __setitem__(self, key, data):
        self.put(key, data)

    def delete(self, key):
        """Remove the blob under ``key``; ``KeyError`` if there is none."""
        cursor = self._core.execute("DELETE FROM beaver_blobs WHERE name = ? AND key = ?",
                                    (self._name, _check_key(key)))
        if cursor.rowcount == 0:
            raise KeyError(key)
        self._wrote("delete", key=key)

    __delitem__ = delete

    def __contains__(self, key):
        return isinstance(key, str) and self._core.execute(
            "SELECT 1 FROM beaver_blobs WHERE name = ? AND key = ?",
            (self._name, key)).fetchone() is not None

    def __len__(self):
        return self._core.execute("SELECT count(*) FROM beaver_blobs WHERE name = ?",
                                  (self._name,)).fetchone()[0]

    def __bool__(self):
        return True

    def __iter__(self):
        sql = "SELECT key FROM beaver_blobs WHERE name = ? AND key %s ? ORDER BY key LIMIT ?"
        op, cursor = ">=", ""  # the first page includes the key '', which sorts first
        while True:
            rows = self._core.execute(sql % op, (self._name, cursor, PAGE_SIZE)).fetchall()
            yield from (key for (key,) in rows)
            if len(rows) < PAGE_SIZE:
                return
            op, cursor = ">", rows[-1][0]

    def keys(self) -> list:
        """A snapshot list of the keys, in key order."""
        return list(self)

    def _dump_items(self):
        rows = self._core.execute(
            "SELECT key, data, metadata FROM beaver_blobs WHERE name = ? ORDER BY key",
            (self._name,))
        return [{"key": k, "data": base64.b64encode(d).decode("ascii"),
                 "metadata": None if m is None else json.loads(m)} for k, d, m in rows]

    def _load_items(self, items):
        for item in items:
            self.put(item["key"], base64.b64decode(item["data"]), item.get("metadata"))


# ==========================================================================================
# Lock
# ==========================================================================================

class Lock:
    """A fair (FIFO) inter-process lock with a time-to-live and a fencing token.

        >>> with db.lock("nightly-report", timeout=10):
        ...     build_report()

    Waiters queue by ticket and keep their place however long they wait; the ``ttl``
    bounds only how long a holder may keep the lock without ``renew()``, so a crashed
    holder frees it at the latest ``ttl`` seconds after acquiring. ``token`` grows with
    every acquisition and can fence writes by stale holders. One ``Lock`` object shared
    by several threads excludes them as ``threading.Lock`` would.
    """

    def __init__(self, db, name, timeout=None, ttl=60.0):
        self._core = db._core
        self.name = _check_name(name)
        self.timeout = _seconds(timeout, "timeout")
        self.ttl = _seconds(ttl, "ttl")
        if not self.ttl:
            raise ValueError("ttl must be positive")
        self._guard = threading.Lock()
        self._owner = f"{os.getpid()}:{uuid.uuid4().hex}"
        self._ticket = None
        self._beat_due = 0.0
        self._head_expires = None

    @property
    def token(self):
        """The fencing token of the current hold (``None`` when not held)."""
        return self._ticket

    @property
    def held(self) -> bool:
        """True while this object holds the lock (and its TTL has not run out)."""
        return self._ticket is not None and self._core.execute(
            "SELECT 1 FROM beaver_locks WHERE ticket = ? AND held = 1 AND expires_at > ?",
            (self._ticket, _now())).fetchone() is not None

    @property
    def locked(self) -> bool:
        """True while anybody holds the lock."""
        return self._core.execute(
            "SELECT 1 FROM beaver_locks WHERE name = ? AND held = 1 AND expires_at > ?",
            (self.name, _now())).fetchone() is not None

    def acquire(self, timeout=None, block=True):
        """Wait for the lock (up to ``timeout`` s, default the lock's own) and take it.

        Returns a truthy object usable as a context manager; raises ``LockTimeout`` (a
        ``TimeoutError``) when the wait ends without the lock. ``block=False`` tries once.
        """
        timeout = self.timeout if timeout is None else _seconds(timeout, "timeout")
        deadline = _Deadline(0.0 if not block else timeout)
        left = deadline.remaining()
        if not self._guard.acquire(timeout=-1 if left is None else left):
            raise LockTimeout(f"lock {self.name!r} is held by another thread of this object")
        try:
            ticket = self._enqueue()
            if block:
                got = self._core.watcher.wait_for(self._claim, deadline.remaining(),
                                                  cap=self._next_check)
            else:
                got = self._claim()
            if got is None:
                raise LockTimeout(f"could not acquire lock {self.name!r} within {timeout}s")
        except BaseException:
            self._leave(self._ticket)
            self._ticket = None
            self._guard.release()
            raise
        return _Held(self, self)

    def _enqueue(self):
        cursor = self._core.execute(
            "INSERT INTO beaver_locks (name, owner, expires_at) VALUES (?, ?, ?)",
            (self.name, self._owner, _now() + LOCK_WAITER_GRACE))
        self._ticket = cursor.lastrowid
        self._beat_due = time.monotonic() + LOCK_WAITER_GRACE / 3
        return self._ticket

    def _claim(self):
        """One attempt: take the lock if this ticket is first in line (else heart-beat)."""
        now = _now()
        head = self._core.execute(
            "SELECT ticket, expires_at FROM beaver_locks WHERE name = ? AND expires_at > ? "
            "ORDER BY ticket LIMIT 1", (self.name, now)).fetchone()
        if head is not None and head[0] == self._ticket:
            with self._core.transaction():
                self._core.execute("DELETE FROM beaver_locks WHERE name = ? AND expires_at <= ?",
                                   (self.name, now))
                cursor = self._core.execute(
                    "UPDATE beaver_locks SET held = 1, expires_at = ? WHERE ticket = ?",
                    (now + self.ttl, self._ticket))
            if cursor.rowcount == 1:
                return True
        self._head_expires = None if head is None else head[1]
        if time.monotonic() >= self._beat_due or head is None:
            self._heartbeat()
        return None

    def _heartbeat(self):
        cursor = self._core.execute("UPDATE beaver_locks SET expires_at = ? WHERE ticket = ?",
                                    (_now() + LOCK_WAITER_GRACE, self._ticket))
        if cursor.rowcount == 0:  # our row was reaped while this process stalled
            self._enqueue()
        self._beat_due = time.monotonic() + LOCK_WAITER_GRACE / 3

    def _next_check(self):
        """Sleep no longer than the next heartbeat or the head's expiry."""
        wait = max(0.0, self._beat_due - time.monotonic())
        if self._head_expires is not None:
            wait = min(wait, max(0.001, self._head_expires - _now()))
        return wait

    def _leave(self, ticket):
        if ticket is None or self._core.closed:
            return False
        cursor = self._core.execute("DELETE FROM beaver_locks WHERE ticket = ?", (ticket,))
        self._core.changed()
        return cursor.rowcount == 1

    def release(self):
        """Give the lock to the next waiter. ``LockLost`` if the TTL had already run out."""
        if self._ticket is None:
            raise LockLost(f"lock {self.name!r} is not held by this object")
        ticket, self._ticket = self._ticket, None
        try:
            still_ours = self._core.execute(
                "SELECT 1 FROM beaver_locks WHERE ticket = ? AND expires_at > ?",
                (ticket, _now())).fetchone() is not None
            self._leave(ticket)
        finally:
            self._guard.release()
        if not still_ours:
            raise LockLost(f"lock {self.name!r} expired before release (ttl {self.ttl}s)")

    def renew(self, ttl=None):
        """Extend the hold to ``ttl`` (default: the lock's ttl) seconds from now."""
        ttl = self.ttl if ttl is None else _seconds(ttl, "ttl")
        cursor = None if self._ticket is None else self._core.execute(
            "UPDATE beaver_locks SET expires_at = ? WHERE ticket = ? AND held = 1 "
            "AND expires_at > ?", (_now() + ttl, self._ticket, _now()))
        if cursor is None or cursor.rowcount == 0:
            raise LockLost(f"lock {self.name!r} is not held by this object")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return f"<Lock {self.name!r} {'held' if self._ticket else 'free'}>"


# ==========================================================================================
# BeaverDB
# ==========================================================================================

class BeaverDB:
    """One database file and the entry point to every structure in it.

        >>> db = BeaverDB("app.db")
        >>> db.dict("config")["theme"] = "dark"
        >>> db.close()

    Share one ``BeaverDB`` between threads freely (each thread gets its own connection);
    other processes open the same path with their own ``BeaverDB``. ``":memory:"`` gives a
    private database that lives until ``close()``.

    ``timeout`` is how long a write waits for SQLite's lock; ``durability="full"`` syncs
    every commit to disk (the default, "normal", is crash-safe but may lose the last
    commits on power loss).
    """

    def __init__(self, path, *, timeout=DEFAULT_TIMEOUT, durability="normal"):
        self._core = _Core(path, timeout=timeout, durability=durability)
        self._events = _Events()
        self._managers: dict = {}
        self._managers_lock = threading.Lock()

    @property
    def path(self) -> str:
        return self._core.path

    def _manager(self, cls, name, model=None, **options):
        key = (cls._kind, _check_name(name))
        with self._managers_lock:
            if self._core.closed:
                raise ClosedError("the database is closed")
            manager = self._managers.get(key)
            if manager is None:
                manager = cls(self, name, model=model, **options)
                self._managers[key] = manager
            elif model is not None and manager.model is not model:
                raise ValueError(f"{cls._kind} {name!r} is already open with model "
                                 f"{manager.model!r}, not {model!r}")
            return manager

    def dict(self, name, model=None) -> DictManager:
        """The persistent dict called ``name`` (values validated by ``model`` if given)."""
        return self._manager(DictManager, name, model)

    def list(self, name, model=None) -> ListManager:
        """The persistent list called ``name``."""
        return self._manager(ListManager, name, model)

    def queue(self, name, model=None) -> QueueManager:
        """The persistent priority queue called ``name``."""
        return self._manager(QueueManager, name, model)

    def blobs(self, name, model=None) -> BlobManager:
        """The blob store called ``name`` (``model`` types the metadata)."""
        return self._manager(BlobManager, name, model)

    blob = blobs

    def lock(self, name, timeout=None, ttl=60.0, lock_ttl=None) -> Lock:
        """A new inter-process lock object on ``name`` (``lock_ttl`` is the 1.x spelling)."""
        self._check_open()
        return Lock(self, name, timeout=timeout, ttl=lock_ttl if lock_ttl is not None else ttl)

    @contextlib.contextmanager
    def transaction(self):
        """Group writes of any structures into one atomic transaction.

            >>> with db.transaction():
            ...     db.dict("accounts")["alice"] = 90
            ...     db.list("ledger").push({"from": "alice", "amount": 10})

        Nested blocks are savepoints; an exception rolls back its block and propagates.
        """
        with self._core.transaction():
            yield self

    def _check_open(self):
        if self._core.closed:
            raise ClosedError("the database is closed")

    @property
    def closed(self) -> bool:
        return self._core.closed

    def close(self):
        """Close every connection of every thread; later calls raise ``ClosedError``."""
        self._events.stop()
        self._core.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<BeaverDB {self._core.path!r}{' closed' if self.closed else ''}>"


# ==========================================================================================
# Async wrappers
# ==========================================================================================

class AsyncManager:
    """Awaitable twin of a manager: each method runs in a worker thread.

        >>> tasks = db.queue("tasks").as_async()
        >>> await tasks.put({"job": 1})
        >>> item = await tasks.get(timeout=5)
    """

    def __init__(self, manager):
        self._sync = manager

    @property
    def sync(self):
        """The synchronous manager behind this wrapper."""
        return self._sync

    def __getattr__(self, attr):
        value = getattr(self._sync, attr)
        if attr.startswith("_") or not callable(value):
            return value

        @functools.wraps(value)
        async def call(*args, **kwargs):
            return await asyncio.to_thread(value, *args, **kwargs)
        return call

    async def len(self) -> int:
        """``len()`` of the structure."""
        return await asyncio.to_thread(len, self._sync)

    async def contains(self, item) -> bool:
        """``item in structure``."""
        return await asyncio.to_thread(self._sync.__contains__, item)

    async def getitem(self, key):
        """``structure[key]``."""
        return await asyncio.to_thread(self._sync.__getitem__, key)

    async def setitem(self, key, value):
        """``structure[key] = value``."""
        return await asyncio.to_thread(self._sync.__setitem__, key, value)

    async def delitem(self, key):
        """``del structure[key]``."""
        return await asyncio.to_thread(self._sync.__delitem__, key)

    async def __aenter__(self):
        await asyncio.to_thread(self._sync.acquire)
        return self

    async def __aexit__(self, *exc):
        await asyncio.to_thread(self._sync.release)

    async def __aiter__(self):
        for item in await asyncio.to_thread(list, self._sync):
            yield item

    def __repr__(self):
        return f"<Async {self._sync!r}>"


# ==========================================================================================
# Alias modules: ``from beaver.queues import QueueItem`` and friends
# ==========================================================================================

_ALIASES = {
    "manager": ["AsyncManager", "DictManager", "ListManager", "QueueManager", "BlobManager"],
    "dicts": ["DictManager"],
    "lists": ["ListManager"],
    "queues": ["QueueItem", "QueueManager"],
    "blobs": ["Blob", "BlobManager"],
    "locks": ["Lock", "LockTimeout"],
}


def _register_aliases():
    for sub, names in _ALIASES.items():
        module = types.ModuleType(f"{__name__}.{sub}", f"Alias of beaver's {sub} names.")
        for name in names:
            setattr(module, name, globals()[name])
        sys.modules[module.__name__] = module
        globals().setdefault(sub, module)  # so ``import beaver.queues`` binds beaver.queues


_register_aliases()
