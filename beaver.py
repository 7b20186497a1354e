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
    "LeasedItem", "LogManager", "LogEntry", "LiveView", "ChannelManager", "Subscriber",
    "AsyncChannelManager", "AsyncSubscriber", "AsyncLogManager", "AsyncLock",
    "BeaverError", "ClosedError", "SchemaError", "LockTimeout", "LockLost", "QueueEmpty",
    "Timeout", "DatabaseBusy", "ValidationError", "FeatureUnavailable", "DiskFull",
    "CorruptDatabase", "ForeignDatabase", "ReadOnlyDatabase",
    "Document", "CollectionManager", "rerank",
    "BeaverClient", "RemoteError", "Unauthorized", "import_upstream", "main",
]

import array
import base64
import collections
import contextlib
import datetime as _dt
import functools
import heapq
import itertools
import json
import logging
import math
import operator
import os
import queue as _queue
import re
import select
import sqlite3
import sys
import tempfile
import threading
import time
import types
import typing
import unicodedata
import uuid
import weakref
from collections.abc import MutableMapping, MutableSequence

logger = logging.getLogger("beaver")


class _LazyModule:
    """A module imported on first attribute access (keeps ``import beaver`` fast)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(__import__(self._name), attr)


asyncio = _LazyModule("asyncio")   # only the async wrappers need it


# ==========================================================================================
# Constants
# ==========================================================================================

SCHEMA_VERSION = 1
MIN_SQLITE = (3, 31, 0)         # RETURNING (3.35) and the trigram tokenizer (3.34) are optional
DEFAULT_TIMEOUT = 30.0          # seconds a connection waits for SQLite's write lock
WATCH_INTERVAL = 0.001          # seconds between two PRAGMA data_version checks
WATCH_HOT = 0.25                # after a file change, poll every WATCH_INTERVAL this long
WATCH_IDLE_CHECK = 0.05         # with inotify, the longest sleep between two checks
WATCH_LINGER = 2.0              # seconds the watcher keeps polling after its last user left
PURGE_INTERVAL = 1.0            # seconds between two idle purges of expired dict keys
PURGE_BATCH = 1000              # expired rows deleted per statement of an idle purge
PURGE_EVERY = 100               # expiring writes between two purges of 2 * PURGE_EVERY rows
PAGE_SIZE = 1000                # rows fetched per page when iterating
MMAP_SIZE = (256 << 20) if sys.maxsize > 2 ** 32 else 0   # bytes of the file read through mmap
LISTENER_TTL = 10.0             # a listener registration lives this long without a heartbeat
LISTENER_REFRESH = 0.05         # seconds a writer trusts its cache of listened topics
EVENT_RETENTION = 60.0          # seconds cross-process event rows are kept
CHANNEL_RETENTION = 3600.0      # default seconds a channel message is kept
CHANNEL_MAX_MESSAGES = 100_000  # default messages kept per channel
LOCK_WAITER_GRACE = 3.0         # a waiter that stops heart-beating this long loses its place
MAX_SECONDS = 1e10              # the longest TTL, lease, period or retention (about 317 years)
_SHIFT = 1 << 60                # list positions live far below this; see ListManager._shift


# ==========================================================================================
# Exceptions
# ==========================================================================================

class BeaverError(Exception):
    """Root of every error beaver raises on its own account.

    An error that comes from SQLite keeps the ``sqlite3`` exception as ``orig`` and its
    (extended) result code as ``code`` (``code & 0xFF`` is the primary one: 5 busy, 11
    corrupt, 13 full...); both are ``None`` otherwise.
    """

    orig = None
    code = None


class ClosedError(BeaverError):
    """The database was closed; no further calls are possible."""


class SchemaError(BeaverError):
    """The file holds a beaver layout this version does not understand."""


class ForeignDatabase(SchemaError):
    """The file belongs to another program, e.g. the upstream ``beaver-db`` package."""


class CorruptDatabase(BeaverError):
    """The file is damaged or is not a SQLite database."""


class DiskFull(BeaverError, OSError):
    """The disk (or SQLite's ``max_page_count``) has no room for the write."""


class ReadOnlyDatabase(BeaverError, PermissionError):
    """A write to a file (or folder) this process may only read."""


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
    """A value does not fit its structure: its model, or what SQLite can store."""


# ==========================================================================================
# Helpers
# ==========================================================================================

def _now() -> float:
    """The one clock of beaver: seconds since the epoch, as stored in every table."""
    return time.time()


# Every number and name that comes from a user goes through these checks, before anything
# is written: the right type (a bool is not a number), finite, in range, and errors that
# name the argument.

def _check_text(text, what) -> str:
    """``text`` if SQLite can store it: a str without lone surrogates."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} {text!r:.60} holds a lone surrogate: it is not Unicode "
                             "text SQLite can store") from None
    return text


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a structure name must be a non-empty str, not {name!r:.60}")
    return _check_text(name, "structure name")


def _check_key(key) -> str:
    return _check_text(key, "key")


def _check_number(value, what, low=None, high=None, integer=False):
    """``value``: an int (or float unless ``integer``) that is not a bool, finite, in
    [``low``, ``high``] where given."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        if integer and hasattr(value, "__index__") and not isinstance(value, bool):
            value = operator.index(value)           # numpy integers and the like
        else:
            raise TypeError(f"{what} must be {'an int' if integer else 'a number'}, "
                            f"not {value!r:.60}")
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = [f">= {low:g}"] * (low is not None) + [f"<= {high:g}"] * (high is not None)
        raise ValueError(f"{what} must be {' and '.join(bounds)}, not {value!r:.40}")
    return value


def _seconds(value, what: str, positive=False, wait=False, high=MAX_SECONDS):
    """Seconds from a number or a ``timedelta``; ``None`` passes through.

    A duration is finite, >= 0 (> 0 if ``positive``) and at most ``high``. A wait
    (``wait=True``) may also be ``inf`` or longer than the clock counts: no limit (None).
    """
    if value is None:
        return None
    if isinstance(value, _dt.timedelta):
        value = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be seconds (a number or a timedelta), not {value!r:.60}")
    if wait and value >= threading.TIMEOUT_MAX:
        return None
    _check_number(value, what)
    if value < 0 or value > high or (positive and value == 0):
        raise ValueError(f"{what} must be {'more than 0' if positive else '0 or more'} and at "
                         f"most {high:g} seconds, not {value!r:.40}")
    return float(value)


def _check_ttl(ttl_seconds):
    return _seconds(ttl_seconds, "ttl_seconds", positive=True)


def _count(value, what, low=0, high=1 << 62) -> int:
    """A whole number of things (``top_k``, ``limit``, ``max_messages``...)."""
    return _check_number(value, what, low, high, integer=True)


class _Deadline:
    """Remaining time of a wait; ``None`` means wait forever."""

    __slots__ = ("end",)

    def __init__(self, timeout):
        forever = timeout is None or timeout >= threading.TIMEOUT_MAX  # e.g. float("inf")
        self.end = None if forever else time.monotonic() + timeout

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

try:  # CPython's C encoder, called directly: json.dumps(value, ensure_ascii=False,
    # separators=(",", ":")) without building a JSONEncoder and its Python frames per value
    from json.encoder import c_make_encoder as _c_make_encoder, encode_basestring as _encode_str
except ImportError:  # pragma: no cover - Pythons without the _json accelerator
    _c_make_encoder = None
_json_default = json.JSONEncoder().default
_json_scan = json.JSONDecoder().scan_once
if _c_make_encoder is not None:
    # Without a markers dict (no cycle check) one encoder serves every call; a cycle ends in
    # RecursionError, and the checking encoder then reports it as json.dumps would.
    _json_encode = _c_make_encoder(None, _json_default, _encode_str, None, ":", ",",
                                   False, False, True)


def _json_dumps(value) -> str:
    try:
        if _c_make_encoder is None:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        try:
            return "".join(_json_encode(value, 0))
        except RecursionError:      # a cycle, or deep nesting: the checking encoder tells
            return "".join(_c_make_encoder({}, _json_default, _encode_str, None, ":", ",",
                                           False, False, True)(value, 0))
    except RecursionError:
        raise _too_deep() from None
    except (TypeError, ValueError) as e:
        raise TypeError(f"value is not JSON-serializable: {e}") from None


def _parse_json(text):
    """A JSON value a user handed in (a dump...): ``ValueError`` if it is not JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None


def _too_deep() -> ValueError:
    return ValueError("value is nested too deeply to store (lists and dicts inside each "
                      f"other more than about {sys.getrecursionlimit()} levels)")


def _json_loads(text):
    """``json.loads(text)``, scanning compact JSON (what beaver writes) without its wrapper.

    Stored text that is not JSON (or nests beyond the recursion limit) raises
    ``CorruptDatabase``: beaver never writes such text.
    """
    try:
        value, end = _json_scan(text, 0)
        if end == len(text):
            return value
    except (StopIteration, TypeError, RecursionError):
        pass                    # leading space, bytes, bad JSON: json.loads decides
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as e:
        raise CorruptDatabase(f"a stored value is not JSON beaver can read: {e!r:.200}") from None


class _JsonCodec:
    """Plain JSON: what goes in as dicts, lists, str, numbers, bools and None comes back."""

    model = None
    _plain = frozenset((dict, list, str, int, float, bool, type(None)))

    def encode(self, value) -> str:
        if type(value) not in self._plain and hasattr(value, "model_dump_json"):
            return _model_json(value)
        return _json_dumps(value)

    decode = staticmethod(_json_loads)


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
        return _model_json(value)

    def decode(self, text):
        return self.model.model_validate_json(text)

    def _validate(self, data):
        try:
            return self.model.model_validate(data)
        except RecursionError:
            raise _too_deep() from None
        except (TypeError, ValueError) as e:
            raise ValidationError(f"invalid {self.model.__name__}: {e}") from None


_JSON = _JsonCodec()


def _model_json(instance) -> str:
    try:
        return instance.model_dump_json()
    except RecursionError:
        raise _too_deep() from None


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
    if isinstance(value, (list, tuple, set, frozenset)):
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
    if origin is typing.Literal:
        if value not in args:
            raise ValidationError(f"{where}: expected one of {args!r}, got {value!r}")
        return value
    if origin is tuple and args and args[-1] is not Ellipsis and isinstance(value, (list, tuple)):
        if len(value) != len(args):
            raise ValidationError(f"{where}: expected {len(args)} items, got {len(value)}")
        return [_coerce(a, v, where) for a, v in zip(args, value)]
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
    """CREATE TABLE IF NOT EXISTS beaver_queue_leases (
        lease INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, priority NUMERIC NOT NULL,
        timestamp REAL NOT NULL, data TEXT NOT NULL, until REAL NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS beaver_queue_leases_due ON beaver_queue_leases (name, until)""",
    """CREATE TABLE IF NOT EXISTS beaver_logs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, timestamp REAL NOT NULL,
        data TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS beaver_logs_time ON beaver_logs (name, timestamp)""",
    """CREATE TABLE IF NOT EXISTS beaver_channels (
        seq INTEGER PRIMARY KEY, name TEXT NOT NULL, timestamp REAL NOT NULL,
        data TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS beaver_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
        origin TEXT NOT NULL, timestamp REAL NOT NULL, payload TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS beaver_listeners (
        owner TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, expires_at REAL NOT NULL,
        PRIMARY KEY (owner, kind, name)) WITHOUT ROWID""",
    # No index on beaver_locks: it holds only held locks and their waiters, and one page per
    # write keeps an uncontended acquire + release near two raw commits.
    """CREATE TABLE IF NOT EXISTS beaver_locks (
        ticket INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, owner TEXT NOT NULL,
        expires_at REAL NOT NULL, held INTEGER NOT NULL DEFAULT 0,
        ttl REAL NOT NULL DEFAULT 60)""",
    """CREATE TABLE IF NOT EXISTS beaver_collections (
        collection TEXT PRIMARY KEY, dim INTEGER, metric TEXT NOT NULL DEFAULT 'l2', options TEXT,
        version INTEGER NOT NULL DEFAULT 0, epoch INTEGER NOT NULL DEFAULT 0, cid INTEGER UNIQUE)""",
    """CREATE TABLE IF NOT EXISTS beaver_documents (
        id INTEGER PRIMARY KEY, collection TEXT NOT NULL, doc_id TEXT NOT NULL, body TEXT,
        UNIQUE (collection, doc_id))""",
    # a rowid table: a 1.5 KB vector fits its leaf page (WITHOUT ROWID spills each to an
    # overflow page: 6x slower key reads, 6x slower single inserts, twice the file size)
    """CREATE TABLE IF NOT EXISTS beaver_vectors (
        collection TEXT NOT NULL, doc_id TEXT NOT NULL, vector BLOB NOT NULL,
        PRIMARY KEY (collection, doc_id))""",
    """CREATE TABLE IF NOT EXISTS beaver_vector_log (
        collection TEXT NOT NULL, version INTEGER NOT NULL, doc_id TEXT NOT NULL,
        PRIMARY KEY (collection, version)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS beaver_terms (
        cid INTEGER NOT NULL, term TEXT NOT NULL, PRIMARY KEY (cid, term)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS beaver_edges (
        collection TEXT NOT NULL, source TEXT NOT NULL, label TEXT NOT NULL, target TEXT NOT NULL,
        metadata TEXT, PRIMARY KEY (collection, source, label, target)) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS beaver_edges_incoming
        ON beaver_edges (collection, target, label, source)""",
]

_SCHEMA_NAMES = frozenset(statement.split("EXISTS")[1].split()[0] for statement in _SCHEMA)

# Tables only the upstream ``beaver-db`` package makes: 2.x names them ``__beaver_*__``, and
# 0.x-1.x used ``beaver_*`` names that this beaver never uses.
_UPSTREAM_1X_TABLES = frozenset((
    "beaver_pubsub_log", "beaver_collection_versions", "beaver_priority_queues",
    "beaver_manager_versions", "beaver_lock_waiters", "beaver_trigrams", "beaver_fts_index",
    "_beaver_kv_store"))


def _upstream_version(conn):
    """'2.x' or '1.x' (0.x included) if ``conn`` (a ``sqlite3.Connection``) holds a file of the
    upstream ``beaver-db`` package, else None.

        >>> _upstream_version(sqlite3.connect("old.db"))
        '2.x'
    """
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if any(name.startswith("__beaver_") for name in tables):
        return "2.x"
    if tables & _UPSTREAM_1X_TABLES:
        return "1.x"
    return None


# DELETE ... RETURNING takes an item in one autocommit statement (3.35.5 fixed its early bugs)
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 5)
_MAX_BUSY_TIMEOUT = (2 ** 31 - 1) / 1000     # SQLite counts its busy timeout in int milliseconds

_live_cores: "weakref.WeakSet[_Core]" = weakref.WeakSet()


def _reset_cores_after_fork():
    for core in list(_live_cores):
        core._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_cores_after_fork)


@functools.lru_cache(maxsize=None)
def _refs_at_rest() -> int:
    """References an idle ``sqlite3.Connection`` holds on itself (its statement cache)."""
    conn = sqlite3.connect(":memory:", check_same_thread=False, cached_statements=256)
    try:
        return sys.getrefcount(conn) - 2    # minus ``conn`` and getrefcount's argument
    finally:
        conn.close()


_MEMORY_PREFIX = "beaver-memory-"


def _memory_path() -> str:
    """A private file for ``":memory:"`` databases: RAM-backed where /dev/shm exists.

    Its name carries the process id: files of processes that died without ``close()`` are
    removed when another memory database is made; at exit a process removes its own.
    """
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = folder or tempfile.gettempdir()
    _sweep_memory_files(folder)
    fd, path = tempfile.mkstemp(prefix=f"{_MEMORY_PREFIX}{os.getpid()}-", suffix=".db",
                                dir=folder)
    os.close(fd)
    _remove_at_exit()
    return path


def _sweep_memory_files(folder):
    """Remove the memory database files of processes that no longer run (POSIX)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            pid = entry.name[len(_MEMORY_PREFIX):].split("-", 1)[0]
            if entry.name.startswith(_MEMORY_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True             # alive, owned by another user
    return True


def _remove_database_files(path):
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.remove(path + suffix)


@functools.lru_cache(maxsize=None)
def _remove_at_exit():
    """Once per process: at exit, remove the files of this process's open memory databases."""
    import atexit
    atexit.register(lambda: [_remove_database_files(core.path) for core in list(_live_cores)
                             if core.memory and core._pid == os.getpid()])


# What a SQLite call may raise: its own errors, text that is not UTF-8 (stored text or, in a
# corrupt file, SQLite's own message), a str with a lone surrogate or an int beyond 64 bits
# in a parameter.
_DB_ERRORS = (sqlite3.Error, UnicodeError, OverflowError)

# Pythons before 3.11 give no result code: SQLite's wording of the codes beaver tells apart
# (sqlite3_errstr) is how the code is recovered, here and nowhere else.
_ERRSTR_CODES = (
    ("database is locked", 5), ("database table is locked", 6),
    ("attempt to write a readonly database", 8), ("database disk image is malformed", 11),
    ("malformed database schema", 11), ("database or disk is full", 13),
    ("unable to open database file", 14), ("string or blob too big", 18),
    ("file is not a database", 26))


def _result_code(error):
    """The SQLite (extended) result code of a ``sqlite3.Error``, or None."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        text = str(error)
        code = next((c for wording, c in _ERRSTR_CODES if text.startswith(wording)), None)
    return code


def _sqlite_error(error, path, timeout) -> Exception:
    """The beaver exception for ``error``, raised by a SQLite call on the file ``path``."""
    if isinstance(error, UnicodeDecodeError):
        new = CorruptDatabase(f"{path!r} holds text that is not UTF-8 (a damaged file?): {error}")
    elif isinstance(error, UnicodeEncodeError):
        return ValueError(f"cannot store {error.object[:60]!r}: it holds a lone surrogate "
                          f"{error.object[error.start:error.end]!r}, which is not Unicode text")
    elif isinstance(error, OverflowError):
        return ValueError(f"cannot store an integer beyond 64 bits: {error}")
    else:
        code = _result_code(error)
        primary = None if code is None else code & 0xFF
        if primary in (5, 6):
            new = DatabaseBusy(f"the database stayed locked for over {timeout:g}s: {error}")
        elif primary == 13:
            new = DiskFull(f"no room left to write {path!r}: {error}")
        elif primary in (11, 26):
            new = CorruptDatabase(f"{path!r} is damaged or not a SQLite database: {error}")
        elif primary == 8:
            new = ReadOnlyDatabase(f"{path!r} cannot be written here: {error}")
        elif primary == 18:
            new = ValidationError(f"a value is too big for SQLite: {error}")
        else:
            new = BeaverError(f"SQLite error: {error}")
        new.code = code
    new.orig = error
    return new


class _Rows:
    """A cursor whose rows are fetched under beaver's error translation.

    ``_Core.execute`` returns one for statements that yield rows (SELECT, ``RETURNING``):
    SQLite reports many errors (a damaged page, a full disk at the commit of a
    ``DELETE ... RETURNING``) while rows are fetched, not when the statement starts.
    """

    __slots__ = ("_core", "_cursor")

    def __init__(self, core, cursor):
        self._core, self._cursor = core, cursor

    def fetchone(self):
        try:
            return self._cursor.fetchone()
        except _DB_ERRORS as e:
            raise self._core._error(e) from e

    def fetchall(self) -> list:
        try:
            return self._cursor.fetchall()
        except _DB_ERRORS as e:
            raise self._core._error(e) from e

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._cursor)
        except _DB_ERRORS as e:
            raise self._core._error(e) from e

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self):
        return self._cursor.lastrowid


class _Core:
    """Per-thread connections to one file, transactions, and after-commit hooks.

    Every thread gets its own ``sqlite3.Connection`` (autocommit mode). Writes that read
    first run inside ``transaction()``, which starts with ``BEGIN IMMEDIATE`` so that two
    writers never deadlock on a lock upgrade. Nested ``transaction()`` calls use savepoints.
    """

    def __init__(self, path, timeout=DEFAULT_TIMEOUT, durability="normal"):
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise FeatureUnavailable(
                f"beaver needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; this Python's "
                f"sqlite3 module uses SQLite {sqlite3.sqlite_version}")
        if durability not in ("normal", "full"):
            raise ValueError("durability must be 'normal' or 'full'")
        self.timeout = _seconds(timeout, "timeout", high=_MAX_BUSY_TIMEOUT)
        if self.timeout is None:
            raise TypeError("timeout must be seconds (a number or a timedelta), not None")
        self.memory = str(path) == ":memory:"
        # absolute, so a later chdir cannot send new threads' connections to another file
        self.path = _memory_path() if self.memory else os.path.abspath(os.fspath(path))
        self.synchronous = "OFF" if self.memory else durability.upper()
        self.closed = False
        self._local = threading.local()
        self._conns: list = []
        self._conns_lock = threading.Lock()
        self._busy: dict = {}         # thread -> connection close() found in use
        self.held_locks: set = set()  # Lock objects holding their lock: close() releases them
        self.expiring = 0             # expiring dict rows written since the last purge
        self.purger = None            # the thread that purges expired rows while idle
        self._halt = threading.Event()
        self._pid = os.getpid()
        self.watcher = _Watcher(self)
        _live_cores.add(self)
        try:
            self._ensure_schema()
            if self.one("SELECT 1 FROM beaver_dicts WHERE expires_at IS NOT NULL LIMIT 1"):
                self.start_purger()
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
            self._close_deferred()
            raise ClosedError("the database is closed")
        conn = None
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False, cached_statements=256)
            conn.execute("PRAGMA busy_timeout = %d" % int(self.timeout * 1000))
            self._refuse_upstream(conn)     # before anything (WAL mode first) changes the file
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute("PRAGMA synchronous = %s" % self.synchronous)
            conn.execute("PRAGMA foreign_keys = OFF")
            conn.execute("PRAGMA mmap_size = %d" % MMAP_SIZE)
        except BaseException as e:
            if conn is not None:
                conn.close()
            if isinstance(e, _DB_ERRORS):
                raise self._open_error(e) from e
            raise
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

    def _open_error(self, e) -> Exception:
        error = _sqlite_error(e, self.path, self.timeout)
        if type(error) is BeaverError:     # not one SQLite names: say what is wrong around it
            folder = os.path.dirname(self.path)
            if not os.path.isdir(folder):
                hint = f"folder {folder!r} does not exist"
            elif os.path.isdir(self.path):
                hint = "it is a folder"
            elif not os.access(folder, os.W_OK):
                hint = (f"folder {folder!r} is not writable (beaver needs to create the WAL "
                        "files beside the database)")
            else:
                hint = str(e)
            error.args = (f"cannot open {self.path!r}: {hint}",)
        return error

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
        self._busy = {}
        self.purger = None
        self._halt = threading.Event()
        self.watcher = _Watcher(self)

    def close(self):
        """Close every thread's connection and stop background threads."""
        if self.closed:
            return
        self.closed = True
        self._halt.set()
        self.watcher.stop()
        self._local = threading.local()     # from now on no thread can pick a connection up
        with self._conns_lock:
            conns, self._conns = self._conns, []
            at_rest = _refs_at_rest()
            for thread, conn in conns:
                # CPython crashes if a connection is closed under another thread's running
                # statement: one referenced from elsewhere (a frame, a cursor) than here (the
                # tuple, ``conn``, getrefcount's argument) is left to its thread to close.
                idle = not thread.is_alive() or sys.getrefcount(conn) - 3 <= at_rest
                if idle or thread is threading.current_thread():
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                else:
                    self._busy[thread] = conn
        _live_cores.discard(self)
        if self.memory and os.getpid() == self._pid:    # not a forked child's copy
            _remove_database_files(self.path)

    def _close_deferred(self):
        """Close the connections ``close()`` found busy whose thread is done with them: this
        thread's (it is between calls now) and those of threads that have ended."""
        me = threading.current_thread()
        with self._conns_lock:
            done = [t for t in self._busy if t is me or not t.is_alive()]
            conns = [self._busy.pop(t) for t in done]
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- statements and transactions ---------------------------------------------------

    def execute(self, sql, params=()):
        """Run one statement on this thread's connection (autocommit unless in a transaction).

        Returns the cursor (``rowcount``, ``lastrowid``); for a statement that yields rows,
        a ``_Rows`` whose fetches translate errors too. ``one`` and ``all`` read rows faster.
        """
        try:
            conn = self._local.conn
        except AttributeError:
            conn = self.conn()
        try:
            cursor = conn.execute(sql, params)
        except _DB_ERRORS as e:
            raise self._error(e) from e
        return cursor if cursor.description is None else _Rows(self, cursor)

    def one(self, sql, params=()):
        """The first row of ``sql`` (or None), every step under the error translation."""
        try:
            conn = self._local.conn
        except AttributeError:
            conn = self.conn()
        try:
            return conn.execute(sql, params).fetchone()
        except _DB_ERRORS as e:
            raise self._error(e) from e

    def all(self, sql, params=()) -> list:
        """Every row of ``sql``, as a list."""
        try:
            return self.conn().execute(sql, params).fetchall()
        except _DB_ERRORS as e:
            raise self._error(e) from e

    def executemany(self, sql, rows):
        try:
            return self.conn().executemany(sql, rows)
        except _DB_ERRORS as e:
            raise self._error(e) from e

    def _error(self, e) -> Exception:
        """The exception to raise for ``e``, an error of a SQLite call on this file."""
        if self.closed:
            self._close_deferred()
            return ClosedError("the database is closed")
        return _sqlite_error(e, self.path, self.timeout)

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
        except _DB_ERRORS as e:
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
        names = self._names()
        if self._stamp(names) == SCHEMA_VERSION and _SCHEMA_NAMES <= names:
            return
        with self.transaction() as conn:
            names = self._names()           # another process may have made them meanwhile
            if self._stamp(names) is None and any(n.startswith("beaver_") for n in names):
                raise SchemaError(f"{self.path!r} has beaver tables but no schema stamp: a "
                                  "layout (an older beaver?) this version does not know")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO beaver_meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    def _names(self) -> set:
        """The names of the tables and indexes in the file."""
        return {row[0] for row in self.all("SELECT name FROM sqlite_master")}

    def _refuse_upstream(self, conn):
        version = _upstream_version(conn)
        if version is not None:
            raise ForeignDatabase(
                f"{self.path!r} was made by the upstream beaver-db package ({version}), whose "
                "layout this beaver does not open; copy it into a new file with: "
                "beaver import-upstream OLD.db NEW.db")

    def _stamp(self, names):
        """The schema version stamped in the file (None if there is none); refuses others."""
        row = None if "beaver_meta" not in names else self.one(
            "SELECT value FROM beaver_meta WHERE key = 'schema_version'")
        if row is None:
            return None
        try:
            found = int(row[0])
        except ValueError:
            raise SchemaError(f"{self.path!r} has an unreadable schema stamp {row[0]!r}") from None
        if found != SCHEMA_VERSION:
            raise SchemaError(f"{self.path!r} has beaver schema version {found}; this beaver "
                              f"({__version__}) reads version {SCHEMA_VERSION} only")
        return found

    # -- expired dict rows ---------------------------------------------------------------
    #
    # Dead rows stay a small fraction of live ones: every PURGE_EVERY expiring writes delete
    # up to twice as many due rows (so writes purge faster than they expire), and while the
    # database is open a thread purges whatever fell due, in batches, every PURGE_INTERVAL.

    def purge_expired(self, limit) -> int:
        """Delete up to ``limit`` expired rows of every dict; returns how many went."""
        self.expiring = 0
        if self.purger is None:
            self.start_purger()
        now = _now()
        if self.one("SELECT 1 FROM beaver_dicts WHERE expires_at <= ? LIMIT 1", (now,)) is None:
            return 0                # a read: no write lock taken for nothing
        return self.execute(
            "DELETE FROM beaver_dicts WHERE (name, key) IN (SELECT name, key FROM beaver_dicts "
            "WHERE expires_at <= ? LIMIT ?)", (now, limit)).rowcount

    def start_purger(self):
        with self._conns_lock:
            if self.purger is None and not self.closed:
                self.purger = threading.Thread(target=self._purge_while_open,
                                               name="beaver-purge", daemon=True)
                self.purger.start()

    def _purge_while_open(self):
        while not self._halt.wait(PURGE_INTERVAL):
            try:
                while self.purge_expired(PURGE_BATCH) >= PURGE_BATCH and not self._halt.is_set():
                    pass
            except ReadOnlyDatabase:
                return
            except BeaverError as e:
                if self.closed:
                    break
                logger.warning("beaver could not purge expired dict keys: %s", e)
        self._close_deferred()


# ==========================================================================================
# Change notification
# ==========================================================================================

class _FileNotify:
    """Linux inotify on the database files, so an idle watcher sleeps instead of polling.

    A commit by any process appends to the ``-wal`` file; the event wakes the watcher, which
    then checks ``PRAGMA data_version`` (the truth) and polls every millisecond for a short
    while. Elsewhere ``open`` returns None and the watcher polls every millisecond.
    """

    def __init__(self, fd):
        self.fd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)

    @classmethod
    def open(cls, paths):
        if not sys.platform.startswith("linux") or os.environ.get("BEAVER_WATCH") == "poll":
            return None
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            if any(libc.inotify_add_watch(fd, os.fsencode(p), 0x2) < 0 for p in paths):
                os.close(fd)       # 0x2 = IN_MODIFY; a missing -wal file means: poll instead
                return None
        except (OSError, AttributeError, ImportError):
            return None
        return cls(fd)

    def wait(self, timeout):
        """Block until a watched file changes or ``timeout`` seconds pass."""
        self._poller.poll(int(timeout * 1000))

    def drain(self) -> bool:
        """Consume pending events; True if there were any."""
        got = False
        while True:
            try:
                if not os.read(self.fd, 4096):
                    return got
                got = True
            except BlockingIOError:
                return got
            except OSError:
                return True

    def close(self):
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Watcher:
    """Wakes waiting threads when the database changes, whichever process wrote.

    While anybody waits, one thread checks ``PRAGMA data_version`` on its own connection and
    bumps ``tick`` when another connection has committed. On Linux it sleeps on inotify events
    of the ``-wal`` file (every commit appends to it) and then polls every millisecond for a
    short while; elsewhere (or with ``BEAVER_WATCH=poll``) it polls every millisecond. Writers
    of this process bump ``tick`` directly. Waiters sleep on one condition.
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
                    self._core._close_deferred()
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
        notify = None
        try:
            conn = sqlite3.connect(self._core.path, timeout=self._core.timeout,
                                   isolation_level=None, check_same_thread=False)
            cursor = conn.cursor()
            version = lambda: cursor.execute("PRAGMA data_version").fetchone()[0]
            version()           # opens the WAL, so the -wal file exists to be watched
            # Watch first, then take the baseline, then wake every waiter: a commit before the
            # baseline (which a waiter's first probe, run before this thread, may have missed)
            # is covered by that wake; any later commit raises an event.
            notify = _FileNotify.open([self._core.path + "-wal", self._core.path])
            last = version()
        except sqlite3.Error:
            logger.exception("beaver watcher could not open %s", self._core.path)
            if notify is not None:
                notify.close()
            return
        self.wake()
        idle_since, hot_until = None, 0.0
        try:
            while not self._stopping:
                if notify is None:
                    time.sleep(WATCH_INTERVAL)
                else:
                    hot = time.monotonic() < hot_until
                    notify.wait(WATCH_INTERVAL if hot else WATCH_IDLE_CHECK)
                fresh = notify is not None and notify.drain()
                if fresh:
                    hot_until = time.monotonic() + WATCH_HOT
                current = version()
                for _ in range(3 if fresh and current == last else 0):
                    time.sleep(WATCH_INTERVAL / 10)   # the WAL write precedes the commit mark
                    current = version()
                    if current != last:
                        break
                if current != last:
                    last = current
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
            if notify is not None:
                notify.close()
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

_live_realtime: "weakref.WeakSet" = weakref.WeakSet()      # _Events and _Hub objects


def _reset_realtime_after_fork():
    for owner in list(_live_realtime):
        owner._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_realtime_after_fork)


# The events each kind of structure emits; '*' listens to all of them.
_EVENT_NAMES = {
    "dict": ("set", "del", "clear"),
    "list": ("push", "prepend", "extend", "insert", "set", "set_slice", "del", "del_slice",
             "pop", "deque", "reverse", "clear"),
    "queue": ("put", "get", "ack", "nack", "load", "clear"),
    "blob": ("put", "delete", "clear"),
    "log": ("log", "load", "clear"),
    "channel": ("publish", "load", "clear"),
    "collection": ("index", "drop", "connect", "disconnect", "clear"),
}


def _check_event(kind, event) -> str:
    """``event`` if structures of ``kind`` emit it (or it is '*'); else ValueError."""
    if not isinstance(event, str) or not event:
        raise TypeError(f"event must be a non-empty str such as 'set' or '*', not {event!r:.60}")
    valid = _EVENT_NAMES.get(kind, ())
    if event != "*" and event not in valid:
        raise ValueError(f"a {kind} emits no {event!r} event; valid events: '*', "
                         + ", ".join(map(repr, valid)))
    return event


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
    """Callbacks per (kind, name), in every process, run after commit on one dispatcher thread.

    A write whose topic is listened to in this ``BeaverDB`` is queued in memory after commit.
    A write whose topic is listened to by another ``BeaverDB`` (any process) is also stored in
    ``beaver_events``, inside the writer's transaction. Listeners register in
    ``beaver_listeners`` with a heartbeat, so a crashed process stops costing writers anything
    after LISTENER_TTL. Writers know the listened topics from a cache refreshed every
    LISTENER_REFRESH seconds, and ``on()`` for a new topic returns that much after registering,
    so every write that starts after ``on()`` returns is delivered, whichever process made it.
    The dispatcher reads other processes' rows and local events, in order, and isolates each
    callback's errors (logged on the ``beaver`` logger).
    """

    def __init__(self, core):
        _live_realtime.add(self)
        self._core = core
        self.origin = uuid.uuid4().hex
        self._handles: dict = {}
        self._since: dict = {}            # topic -> last event seq when it was first listened to
        self._lock = threading.Lock()
        self._inbox: collections.deque = collections.deque()
        self._thread = None
        self._wakeup = threading.Event()
        self._stopping = False
        self._remote = frozenset()
        self._remote_due = 0.0
        self._last_seq = 0
        self._halt = threading.Event()    # set by stop(): ends the heartbeat thread

    # -- writer side ---------------------------------------------------------------------

    def listening(self, topic) -> bool:
        """True if a callback of this ``BeaverDB`` listens to ``topic``."""
        return topic in self._handles

    def remote(self, topic) -> bool:
        """True if another ``BeaverDB`` (any process) listens to ``topic`` (cached)."""
        now = time.monotonic()
        if now >= self._remote_due:
            self._remote_due = now + LISTENER_REFRESH
            rows = self._core.all(
                "SELECT DISTINCT kind, name FROM beaver_listeners WHERE owner != ? "
                "AND expires_at > ?", (self.origin, _now()))
            self._remote = frozenset(map(tuple, rows))
        return topic in self._remote

    def record(self, topic, payload):
        """Store ``payload`` for other processes (inside the caller's transaction)."""
        self._core.execute(
            "INSERT INTO beaver_events (kind, name, origin, timestamp, payload) "
            "VALUES (?, ?, ?, ?, ?)", (topic[0], topic[1], self.origin, _now(),
                                       _json_dumps(payload)))

    def emit(self, topic, payload):
        """Queue a local event (called after commit)."""
        self._inbox.append((topic, payload))
        self._core.watcher.wake()

    # -- listener side --------------------------------------------------------------------

    def add(self, topic, event, callback) -> _EventHandle:
        if not callable(callback):
            raise TypeError("callback must be callable")
        if not isinstance(event, str) or not event:
            raise TypeError("event must be a non-empty str such as 'set' or '*'")
        handle = _EventHandle(self, topic, event, callback)
        with self._lock:
            new_topic = topic not in self._handles
            if new_topic:
                self._register(topic)
            self._handles[topic] = self._handles.get(topic, ()) + (handle,)
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name="beaver-events",
                                                daemon=True)
                self._thread.start()
                threading.Thread(target=self._beats, name="beaver-events-heartbeat",
                                 daemon=True).start()
        self._wakeup.set()
        if new_topic:       # by now every writer's cache of listened topics includes it
            time.sleep(LISTENER_REFRESH)
        return handle

    def _register(self, topic):
        with self._core.transaction():
            self._core.execute(
                "INSERT OR REPLACE INTO beaver_listeners (owner, kind, name, expires_at) "
                "VALUES (?, ?, ?, ?)", (self.origin, topic[0], topic[1], _now() + LISTENER_TTL))
            since = self._core.one("SELECT coalesce(max(seq), 0) FROM beaver_events"
                                       )[0]
        self._since[topic] = since
        if not self._handles:
            self._last_seq = since

    def remove(self, handle):
        with self._lock:
            rest = tuple(h for h in self._handles.get(handle.topic, ()) if h is not handle)
            if rest:
                self._handles[handle.topic] = rest
                return
            self._handles.pop(handle.topic, None)
            self._since.pop(handle.topic, None)
        if not self._core.closed:
            self._core.execute("DELETE FROM beaver_listeners WHERE owner = ? AND kind = ? "
                               "AND name = ?", (self.origin, *handle.topic))

    def _dispatch(self):
        watcher = self._core.watcher
        while not self._stopping:
            try:
                if not self._handles and not self._inbox:
                    self._wakeup.wait(LISTENER_TTL / 3)
                    self._wakeup.clear()
                    continue
                batch = watcher.wait_for(self._collect, None)
            except Exception:
                if self._stopping or self._core.closed:
                    return
                logger.exception("beaver event dispatcher failed; retrying")
                time.sleep(0.1)
                continue
            for topic, payload in batch:
                self._deliver(topic, payload)

    def _collect(self):
        """The probe of the dispatcher: local events, then new rows of other processes."""
        batch = []
        while self._inbox:
            batch.append(self._inbox.popleft())
        if self._handles:
            batch.extend(self._fetch())
        if batch or (not self._handles and not self._inbox):
            return batch
        return None

    def _fetch(self):
        rows = self._core.all(
            "SELECT seq, kind, name, payload FROM beaver_events WHERE seq > ? AND origin != ? "
            "ORDER BY seq LIMIT ?", (self._last_seq, self.origin, PAGE_SIZE))
        if rows:
            self._last_seq = rows[-1][0]
        since = self._since
        return [((kind, name), _json_loads(text)) for seq, kind, name, text in rows
                if seq > since.get((kind, name), seq)]

    def _deliver(self, topic, payload):
        for handle in self._handles.get(topic, ()):
            if handle.active and handle.event in ("*", payload.get("event")):
                try:
                    handle.callback(payload)
                except Exception:
                    logger.exception("beaver event callback %r failed", handle.callback)

    def _beats(self):
        """The heartbeat thread: registrations stay alive however long a callback runs."""
        while not self._halt.is_set():
            if self._handles:
                try:
                    self._heartbeat()
                except Exception:
                    if self._stopping or self._core.closed:
                        return
                    logger.exception("beaver event heartbeat failed; retrying")
            self._halt.wait(LISTENER_TTL / 3)

    def _heartbeat(self):
        """Keep our registrations alive; drop dead processes' ones and old event rows (never
        rows this database has yet to read)."""
        now = _now()
        topics = list(self._handles)
        with self._core.transaction():
            self._core.execute("DELETE FROM beaver_listeners WHERE expires_at <= ?", (now,))
            self._core.executemany(
                "INSERT OR REPLACE INTO beaver_listeners (owner, kind, name, expires_at) "
                "VALUES (?, ?, ?, ?)", [(self.origin, k, n, now + LISTENER_TTL) for k, n in topics])
            first = self._core.one(
                "SELECT seq FROM beaver_events WHERE timestamp >= ? ORDER BY seq LIMIT 1",
                (now - EVENT_RETENTION,))
            self._core.execute("DELETE FROM beaver_events WHERE seq < ?",
                               (min(first[0] if first else 1 << 62, self._last_seq + 1),))

    def _after_fork(self):
        """A forked child starts with no listeners and an identity of its own."""
        self.__init__(self._core)

    def stop(self):
        self._stopping = True
        self._wakeup.set()
        self._halt.set()
        if self._handles and not self._core.closed:
            with contextlib.suppress(BeaverError):
                self._core.execute("DELETE FROM beaver_listeners WHERE owner = ?", (self.origin,))


# ==========================================================================================
# Manager base
# ==========================================================================================

_NO_TRANSACTION = contextlib.nullcontext()


class _Default:
    """The value of an option left out: a new manager takes the default, an open one stays."""

    def __repr__(self):
        return "<default>"


_DEFAULT = _Default()


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


class _StructureLock:
    """``acquire()`` / ``release()`` / ``with`` on a structure's own inter-process lock,
    for local managers and their remote twins alike (``_new_lock`` makes the lock)."""

    _lock = None
    _creating = threading.Lock()      # making a structure's lock is rare: one guard for all

    def _new_lock(self, name, ttl):
        raise NotImplementedError

    def acquire(self, timeout=None, block=True, ttl=60.0):
        """Take this structure's inter-process lock; use the result in a ``with`` block.

            >>> with db.queue("jobs").acquire(timeout=5) as q:
            ...     batch = [q.get(block=False) for _ in range(len(q))]

        The lock is advisory: it excludes other holders of the same structure's lock, in any
        thread or process. Raises ``LockTimeout`` (a ``TimeoutError``) if not acquired.
        """
        ttl = _seconds(ttl, "ttl", positive=True)
        with _StructureLock._creating:
            if self._lock is None:
                self._lock = self._new_lock(f"__beaver_{self._kind}__:{self._name}", ttl)
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


class _Manager(_StructureLock):
    """Shared plumbing of every structure: codec, events, batch lock, dump/load, async."""

    def _new_lock(self, name, ttl):
        return Lock(self._db, name, ttl=ttl)

    _kind = ""      # "dict", "list", ...: the name in dumps, events and lock names
    _table = ""     # the table whose rows carry a ``name`` column for this structure
    _OPTIONS: dict = {}     # option -> (default, check): settings fixed when the manager opens

    def __init__(self, db, name, model=None):
        self._db = db
        self._core = db._core
        self._name = _check_name(name)
        self._model = model
        self._codec = _codec_for(model)
        self._topic = (self._kind, self._name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self):
        return self._model

    def __repr__(self):
        return f"<{type(self).__name__} {self._name!r}>"

    def _option(self, option, value):
        """The checked value of ``option`` (its default if ``value`` was left out)."""
        default, check = self._OPTIONS[option]
        return default if value is _DEFAULT else check(value)

    def _reopen(self, model, options):
        """Check the arguments of another ``db.<kind>(name, ...)`` against this open manager:
        what is left out (or ``model=None``) reuses it, what conflicts is an error."""
        if model is not None and self._model is not model:
            raise ValueError(f"{self._kind} {self._name!r} is already open with model "
                             f"{self._model!r}, not {model!r}")
        for option, value in options.items():
            if value is not _DEFAULT and self._option(option, value) != getattr(self, option):
                raise ValueError(f"{self._kind} {self._name!r} is already open with {option}="
                                 f"{getattr(self, option)!r}, not {value!r} (leave {option} out "
                                 "to use the open one)")

    # -- writes and events -------------------------------------------------------------

    def _listened(self) -> bool:
        """False when ``_wrote`` would do nothing and ``_atomic`` add nothing: nobody waits
        in this process and nobody listens anywhere.

        Hot paths test this first, then skip the event payload and take single statements.
        """
        events = self._db._events
        return (bool(self._core.watcher.users) or events.listening(self._topic)
                or events.remote(self._topic))

    def _wrote(self, event, **fields):
        """After a write: wake waiters and, if anybody listens anywhere, emit ``event``.

        Other processes' listeners get the event from ``beaver_events``, written here, inside
        the caller's transaction (see ``_atomic``); this process's ones get it after commit.
        """
        core, events = self._core, self._db._events
        if core.watcher.users:
            core.after_commit(core.watcher.wake)
        local, remote = events.listening(self._topic), events.remote(self._topic)
        if local or remote:
            payload = {"event": event, "kind": self._kind, "name": self._name, **fields}
            if remote:
                events.record(self._topic, payload)
            if local:
                core.after_commit(lambda: events.emit(self._topic, payload))

    def _atomic(self):
        """A transaction around a single-statement write if its event must be stored with it."""
        if self._db._events.remote(self._topic):
            return self._core.transaction()
        return _NO_TRANSACTION

    def on(self, event, callback) -> _EventHandle:
        """Call ``callback(payload)`` after every ``event`` ('set', 'del', ... or '*').

            >>> handle = db.dict("config").on("set", lambda p: print(p["key"]))
            >>> handle.off()

        Writes from any thread or process are delivered once each, after their commit, in
        order, on this database's event thread. The payload has ``event``, ``kind``, ``name``
        and the operation's fields (``key`` and ``value`` for dicts, ``data`` for queues and
        logs, ``payload`` for channels...). A callback that raises is logged and skipped.
        """
        return self._db._events.add(self._topic, _check_event(self._kind, event), callback)

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
            rows = self._core.all(sql, (self._name, cursor, PAGE_SIZE))
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


def _item_fields(item, *names, **optional):
    """The fields ``names`` (required) and ``optional`` (with defaults) of a dump item."""
    if not isinstance(item, dict):
        raise ValueError(f"a dump item is a JSON object, not {item!r:.60}")
    missing = [name for name in names if name not in item]
    if missing:
        raise ValueError(f"dump item {item!r:.60} lacks {', '.join(missing)}")
    return [item[name] for name in names] + [item.get(k, v) for k, v in optional.items()]


def _read_dump(data_or_fp) -> dict:
    if isinstance(data_or_fp, (str, bytes)):
        data = _parse_json(data_or_fp)
    elif hasattr(data_or_fp, "read"):
        data = _parse_json(data_or_fp.read())
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

    _GET = f"SELECT value FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}"
    _HAS = f"SELECT 1 FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}"
    _SET = ("INSERT INTO beaver_dicts (name, key, value, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at")
    _DEL = f"DELETE FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}"

    def __getitem__(self, key):
        if type(key) is not str:
            _check_key(key)
        row = self._core.one(self._GET, (self._name, key, _now()))
        if row is None:
            raise KeyError(key)
        return self._codec.decode(row[0])

    def get(self, key, default=None):
        """The value of ``key``, or ``default`` if it is missing or expired."""
        if type(key) is not str:
            _check_key(key)
        row = self._core.one(self._GET, (self._name, key, _now()))
        return default if row is None else self._codec.decode(row[0])

    def set(self, key, value, ttl_seconds=None):
        """Store ``value`` under ``key``; with ``ttl_seconds`` it expires that much later.

            >>> cache.set("weather", {"temp": 21}, ttl_seconds=600)

        Before writing anything, raises ``TypeError`` (a key that is not a str, a value that
        is not JSON) or ``ValueError`` (a ttl that is not a positive finite number, a lone
        surrogate, a value nested too deeply).
        """
        if type(key) is not str:
            _check_key(key)
        ttl = None if ttl_seconds is None else _check_ttl(ttl_seconds)
        text = self._codec.encode(value)
        expires_at = None if ttl is None else _now() + ttl
        if self._listened():
            with self._atomic():
                self._core.execute(self._SET, (self._name, key, text, expires_at))
                self._wrote("set", key=key, value=_to_jsonable(value))
        else:
            self._core.execute(self._SET, (self._name, key, text, expires_at))
        if expires_at is not None:
            core = self._core
            core.expiring += 1
            if core.expiring >= PURGE_EVERY or core.purger is None:
                core.purge_expired(2 * PURGE_EVERY)

    __setitem__ = set

    def __delitem__(self, key):
        if type(key) is not str:
            _check_key(key)
        with self._atomic():
            cursor = self._core.execute(self._DEL, (self._name, key, _now()))
            if cursor.rowcount == 0:
                raise KeyError(key)
            self._wrote("del", key=key)

    def __contains__(self, key):
        if not isinstance(key, str):
            return False
        return self._core.one(self._HAS, (self._name, key, _now())) is not None

    def __len__(self):
        return self._core.one(
            f"SELECT count(*) FROM beaver_dicts WHERE name = ? AND {_LIVE}",
            (self._name, _now()))[0]

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
            rows = self._core.all(sql % op, (self._name, cursor, now, PAGE_SIZE))
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
        row = self._core.one(
            f"SELECT expires_at FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}",
            (self._name, _check_key(key), _now()))
        if row is None:
            raise KeyError(key)
        return None if row[0] is None else max(0.0, row[0] - _now())

    def _dump_items(self):
        rows = self._core.all(
            f"SELECT key, value, expires_at FROM beaver_dicts WHERE name = ? AND {_LIVE} "
            "ORDER BY key", (self._name, _now()))
        return [{"key": k, "value": _json_loads(v), "expires_at": e} for k, v, e in rows]

    def _load_items(self, items):
        now = _now()
        for item in items:
            key, value, expires_at = _item_fields(item, "key", "value", expires_at=None)
            if expires_at is not None and _check_number(expires_at, "expires_at") <= now:
                continue
            ttl = None if expires_at is None else min(expires_at - now, MAX_SECONDS)
            self.set(key, value, ttl_seconds=ttl)


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
    _AT = f"SELECT value FROM beaver_lists WHERE name = ? AND pos = {_MIN} + ?"
    _AT_END = f"SELECT value FROM beaver_lists WHERE name = ? AND pos = {_MAX} + 1 + ?"
    _PUSH = ("INSERT INTO beaver_lists (name, pos, value) "
             f"VALUES (?, coalesce({_MAX} + 1, 0), ?)")
    _PREPEND = ("INSERT INTO beaver_lists (name, pos, value) "
                f"VALUES (?, coalesce({_MIN} - 1, 0), ?)")
    _TAKE_LAST = ("DELETE FROM beaver_lists WHERE name = ?1 AND pos = "
                  "(SELECT max(pos) FROM beaver_lists WHERE name = ?1) RETURNING value")
    _TAKE_FIRST = ("DELETE FROM beaver_lists WHERE name = ?1 AND pos = "
                   "(SELECT min(pos) FROM beaver_lists WHERE name = ?1) RETURNING value")

    # -- positions ------------------------------------------------------------------------

    def _bounds(self):
        """(first position, length) of the list."""
        lo, hi = self._core.one(f"SELECT {self._MIN}, {self._MAX}",
                                    (self._name, self._name))
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
        if lo_pos > hi_pos:
            return
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
        if type(index) is int and abs(index) < _SHIFT:
            sql = self._AT if index >= 0 else self._AT_END
            row = self._core.one(sql, (self._name, self._name, index))
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
            rows = self._core.all(
                "SELECT value FROM beaver_lists WHERE name = ? AND pos BETWEEN ? AND ? "
                "ORDER BY pos", (self._name, lo + first, lo + last))
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
        rows = self._core.all(
            "SELECT value FROM beaver_lists WHERE name = ? AND pos >= ? ORDER BY pos",
            (self._name, pos))
        return [row[0] for row in rows]

    # -- writing --------------------------------------------------------------------------

    def push(self, value):
        """Append ``value`` at the end (``append`` is the same)."""
        text = self._codec.encode(value)
        if self._listened():
            with self._atomic():
                self._core.execute(self._PUSH, (self._name, self._name, text))
                self._wrote("push", value=_to_jsonable(value))
        else:
            self._core.execute(self._PUSH, (self._name, self._name, text))

    append = push

    def prepend(self, value):
        """Insert ``value`` at the front."""
        text = self._codec.encode(value)
        if self._listened():
            with self._atomic():
                self._core.execute(self._PREPEND, (self._name, self._name, text))
                self._wrote("prepend", value=_to_jsonable(value))
        else:
            self._core.execute(self._PREPEND, (self._name, self._name, text))

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
        if index is None and _HAS_RETURNING and not self._listened():
            value = self._take(self._TAKE_LAST)
            return None if value is _MISSING else value
        with self._core.transaction():
            lo, length = self._bounds()
            if index is None:
                if length == 0:
                    return None
                index = length - 1
            index = self._index(index, length)
            row = self._core.one(
                "SELECT value FROM beaver_lists WHERE name = ? AND pos = ?",
                (self._name, lo + index))
            self._remove_at(lo, length, index)
            self._wrote("pop", index=index)
        return self._codec.decode(row[0])

    def deque(self):
        """Remove and return the first item, or ``None`` if the list is empty."""
        if _HAS_RETURNING and not self._listened():
            value = self._take(self._TAKE_FIRST)
            return None if value is _MISSING else value
        with self._core.transaction():
            row = self._core.one(
                f"SELECT pos, value FROM beaver_lists WHERE name = ? AND pos = {self._MIN}",
                (self._name, self._name))
            if row is None:
                return None
            self._core.execute("DELETE FROM beaver_lists WHERE name = ? AND pos = ?",
                               (self._name, row[0]))
            self._wrote("deque")
        return self._codec.decode(row[1])

    popleft = deque

    def _take(self, sql):
        """Delete and decode the end item ``sql`` picks, in one statement (or ``_MISSING``)."""
        row = self._core.one(sql, (self._name,))
        return _MISSING if row is None else self._codec.decode(row[0])

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
        return [_json_loads(row[0]) for row in rows]

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


class LeasedItem(QueueItem):
    """A ``QueueItem`` from ``get(lease=...)``; pass it to ``ack()`` when done."""
    lease_id = None


def _check_priority(priority):
    _check_number(priority, "priority")
    if isinstance(priority, int) and not -(1 << 63) <= priority < (1 << 63):
        raise ValueError(f"an int priority must fit in 64 bits, not {priority!r:.40}")
    return priority


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

    _PUT = "INSERT INTO beaver_queues (name, priority, timestamp, data) VALUES (?, ?, ?, ?)"
    _TAKE = ("DELETE FROM beaver_queues WHERE seq = (SELECT seq FROM beaver_queues "
             "WHERE name = ?1 ORDER BY priority, seq LIMIT 1) AND NOT EXISTS (SELECT 1 FROM "
             "beaver_queue_leases WHERE name = ?1 AND until <= ?2) "
             "RETURNING priority, timestamp, data")

    def put(self, data, priority=0):
        """Add ``data``; lower ``priority`` numbers come out first, FIFO among equals.

            >>> jobs.put({"action": "reply"}, priority=1)

        ``priority`` is a finite int (64 bits) or float: else ``TypeError`` / ``ValueError``.
        """
        if type(priority) is not int or not -(1 << 63) <= priority < (1 << 63):
            _check_priority(priority)
        text = self._codec.encode(data)
        if self._listened():
            with self._atomic():
                self._core.execute(self._PUT, (self._name, priority, _now(), text))
                self._wrote("put", priority=priority, data=_to_jsonable(data))
        else:
            self._core.execute(self._PUT, (self._name, priority, _now(), text))

    def get(self, block=True, timeout=None, lease=None) -> QueueItem:
        """Remove and return the first item.

        With ``block=False`` an empty queue raises ``QueueEmpty`` (an ``IndexError``);
        otherwise it waits, up to ``timeout`` seconds if given (``inf``: no limit), then raises
        ``TimeoutError``. A ``timeout`` or ``lease`` that is not a number of seconds (a bool,
        NaN, negative) raises ``TypeError`` / ``ValueError`` before anything is taken.

        ``lease=seconds`` delivers at least once instead of exactly once: the item is hidden,
        not deleted, and comes back to the queue (at the end of its priority) unless
        ``ack(item)`` is called within ``lease`` seconds:

            >>> item = jobs.get(lease=30)
            >>> process(item.data)
            >>> jobs.ack(item)
        """
        timeout = _seconds(timeout, "timeout", wait=True)
        lease = _seconds(lease, "lease", positive=True)
        item = self._take(lease, woken=False)
        if not block or self._core.in_transaction:
            if item is None and block:
                raise BeaverError(f"queue {self._name!r} is empty, and waiting inside a "
                                  "transaction would block every writer: use block=False")
            if item is None:
                raise QueueEmpty(f"queue {self._name!r} is empty")
            return item
        if item is None:
            take = functools.partial(self._take, lease)
            item = self._core.watcher.wait_for(take, timeout, cap=self._lease_due)
        if item is None:
            raise Timeout(f"no item arrived in queue {self._name!r} within {timeout}s")
        return item

    def _take(self, lease=None, woken=True):
        if woken and not self._core.in_transaction and not self._takeable():
            return None         # a waiter woken by some other write: no write lock for nothing
        if lease is None and _HAS_RETURNING and self._codec is _JSON and not self._listened():
            item = self._take_fast()
            if item is not _MISSING:
                return item
        with self._core.transaction():
            now = _now()
            self._reclaim(now)
            row = self._core.one(
                "SELECT seq, priority, timestamp, data FROM beaver_queues WHERE name = ? "
                "ORDER BY priority, seq LIMIT 1", (self._name,))
            if row is None:
                return None
            self._core.execute("DELETE FROM beaver_queues WHERE seq = ?", (row[0],))
            if lease is None:
                item = QueueItem(row[1], row[2], self._codec.decode(row[3]))
            else:
                cursor = self._core.execute(
                    "INSERT INTO beaver_queue_leases (name, priority, timestamp, data, until) "
                    "VALUES (?, ?, ?, ?, ?)", (self._name, row[1], row[2], row[3], now + lease))
                item = LeasedItem(row[1], row[2], self._codec.decode(row[3]))
                item.lease_id = cursor.lastrowid
            self._wrote("get", priority=item.priority, data=_json_loads(row[3]), lease=lease)
        return item

    def _take_fast(self):
        """A plain ``get`` in one autocommit statement (it locks like BEGIN IMMEDIATE).

        ``_MISSING`` if it took nothing: the queue is empty or a lease is due for reclaim.
        """
        row = self._core.one(self._TAKE, (self._name, _now()))
        return _MISSING if row is None else QueueItem(row[0], row[1], self._codec.decode(row[2]))

    def clear(self):
        """Remove every item, leased ones included."""
        with self._core.transaction():
            self._core.execute("DELETE FROM beaver_queue_leases WHERE name = ?", (self._name,))
            super().clear()

    def _takeable(self) -> bool:
        """A read: is there an item, or an item whose lease ran out?"""
        return self._core.one(
            "SELECT EXISTS (SELECT 1 FROM beaver_queues WHERE name = ?) OR EXISTS (SELECT 1 "
            "FROM beaver_queue_leases WHERE name = ? AND until <= ?)",
            (self._name, self._name, _now()))[0] == 1

    def _reclaim(self, now):
        """Put items whose lease ran out back into the queue (inside a transaction)."""
        if self._core.one("SELECT 1 FROM beaver_queue_leases WHERE name = ? AND until <= ?",
                              (self._name, now)) is None:
            return
        self._core.execute(
            "INSERT INTO beaver_queues (name, priority, timestamp, data) SELECT name, priority, "
            "timestamp, data FROM beaver_queue_leases WHERE name = ? AND until <= ? "
            "ORDER BY lease", (self._name, now))
        self._core.execute("DELETE FROM beaver_queue_leases WHERE name = ? AND until <= ?",
                           (self._name, now))

    def _lease_due(self):
        """Seconds until the next lease of this queue runs out (bounds a blocked ``get``)."""
        row = self._core.one("SELECT min(until) FROM beaver_queue_leases WHERE name = ?",
                                 (self._name,))
        return None if row[0] is None else max(0.0, row[0] - _now()) + 0.0005

    def ack(self, item) -> bool:
        """Finish an item taken with ``get(lease=...)``: it will not come back.

        Returns False if its lease had already run out and the item went back to the queue
        (so another worker may process it too).
        """
        lease_id = getattr(item, "lease_id", None)
        if lease_id is None:
            raise TypeError("ack() takes an item returned by get(lease=...)")
        with self._atomic():
            cursor = self._core.execute(
                "DELETE FROM beaver_queue_leases WHERE lease = ? AND name = ?",
                (lease_id, self._name))
            if cursor.rowcount:
                self._wrote("ack", priority=item.priority, data=_to_jsonable(item.data))
        return cursor.rowcount == 1

    def nack(self, item) -> bool:
        """Give a leased item back to the queue now; False if its lease had already run out."""
        lease_id = getattr(item, "lease_id", None)
        if lease_id is None:
            raise TypeError("nack() takes an item returned by get(lease=...)")
        with self._core.transaction():
            cursor = self._core.execute(
                "UPDATE beaver_queue_leases SET until = 0 WHERE lease = ? AND name = ?",
                (lease_id, self._name))
            self._reclaim(_now())
            self._wrote("nack", priority=item.priority, data=_to_jsonable(item.data))
        return cursor.rowcount == 1

    def as_async(self) -> "AsyncQueueManager":
        """An awaitable twin whose ``get`` can be cancelled without losing an item."""
        return AsyncQueueManager(self)

    def peek(self):
        """The item ``get`` would return next, without removing it; ``None`` if empty."""
        row = self._core.one(
            "SELECT priority, timestamp, data FROM beaver_queues WHERE name = ? "
            "ORDER BY priority, seq LIMIT 1", (self._name,))
        return None if row is None else QueueItem(row[0], row[1], self._codec.decode(row[2]))

    def __len__(self):
        return self._core.one("SELECT count(*) FROM beaver_queues WHERE name = ?",
                                  (self._name,))[0]

    def __bool__(self):
        return True

    def __iter__(self):
        """The items in the order ``get`` would return them (nothing is removed)."""
        rows = self._core.all(
            "SELECT priority, timestamp, data FROM beaver_queues WHERE name = ? "
            "ORDER BY priority, seq", (self._name,))
        decode = self._codec.decode
        return iter([QueueItem(p, t, decode(d)) for p, t, d in rows])

    def _dump_items(self):
        """Queued items, then leased ones (a restored dump hands those out again)."""
        leased = self._core.all(
            "SELECT priority, timestamp, data FROM beaver_queue_leases WHERE name = ? "
            "ORDER BY lease", (self._name,))
        return [{"priority": item.priority, "timestamp": item.timestamp,
                 "data": _to_jsonable(item.data)} for item in self] + [
                {"priority": p, "timestamp": t, "data": _json_loads(d)} for p, t, d in leased]

    def _load_items(self, items):
        rows = []
        for item in items:
            data, priority, when = _item_fields(item, "data", priority=0, timestamp=None)
            rows.append((self._name, _check_priority(priority),
                         _now() if when is None else _check_number(when, "timestamp"),
                         self._codec.encode(data)))
        self._core.executemany(
            "INSERT INTO beaver_queues (name, priority, timestamp, data) VALUES (?, ?, ?, ?)",
            rows)
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
        with self._atomic():
            self._core.execute(
                "INSERT INTO beaver_blobs (name, key, data, metadata) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name, key) DO UPDATE SET data = excluded.data, "
                "metadata = excluded.metadata", (self._name, key, bytes(data), meta))
            self._wrote("put", key=key, size=len(data), metadata=_to_jsonable(metadata))

    def get(self, key):
        """The ``Blob`` stored under ``key``, or ``None``."""
        row = self._core.one(
            "SELECT data, metadata FROM beaver_blobs WHERE name = ? AND key = ?",
            (self._name, _check_key(key)))
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
        with self._atomic():
            cursor = self._core.execute("DELETE FROM beaver_blobs WHERE name = ? AND key = ?",
                                        (self._name, _check_key(key)))
            if cursor.rowcount == 0:
                raise KeyError(key)
            self._wrote("delete", key=key)

    __delitem__ = delete

    def __contains__(self, key):
        return isinstance(key, str) and self._core.one(
            "SELECT 1 FROM beaver_blobs WHERE name = ? AND key = ?",
            (self._name, key)) is not None

    def __len__(self):
        return self._core.one("SELECT count(*) FROM beaver_blobs WHERE name = ?",
                                  (self._name,))[0]

    def __bool__(self):
        return True

    def __iter__(self):
        sql = "SELECT key FROM beaver_blobs WHERE name = ? AND key %s ? ORDER BY key LIMIT ?"
        op, cursor = ">=", ""  # the first page includes the key '', which sorts first
        while True:
            rows = self._core.all(sql % op, (self._name, cursor, PAGE_SIZE))
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
                 "metadata": None if m is None else _json_loads(m)} for k, d, m in rows]

    def _load_items(self, items):
        for item in items:
            key, data, metadata = _item_fields(item, "key", "data", metadata=None)
            if not isinstance(data, str):
                raise ValueError(f"blob {key!r}: data must be base64 text, not {data!r:.40}")
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError as e:          # binascii.Error
                raise ValueError(f"blob {key!r}: data is not base64 ({e})") from None
            self.put(key, data, metadata)


# ==========================================================================================
# Log
# ==========================================================================================

class LogEntry(typing.NamedTuple):
    """One log record: when it happened (an aware UTC ``datetime``) and its data."""
    timestamp: _dt.datetime
    data: typing.Any


_EPOCH_RANGE = (-62135596800, 253402300799)    # 0001-01-01 to 9999-12-31T23:59:59 UTC
_UTC_ENDS = (_dt.datetime.min.replace(tzinfo=_dt.timezone.utc),
             _dt.datetime.max.replace(tzinfo=_dt.timezone.utc))


def _epoch(value, what="timestamp", bound=False) -> float:
    """Seconds since the epoch from a ``datetime`` (naive = local time) or a number, in the
    years 1 to 9999 that ``datetime`` can show; a query's ``bound`` may lie beyond (even inf).
    """
    if isinstance(value, _dt.datetime):
        try:
            return value.timestamp()
        except (OverflowError, OSError, ValueError) as e:
            raise ValueError(f"{what} {value!r} has no epoch time here: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a datetime or epoch seconds, not {value!r:.60}")
    if bound and value == value:
        return value if isinstance(value, float) else float(max(min(value, 1e300), -1e300))
    return float(_check_number(value, what, *_EPOCH_RANGE))


def _utc(seconds) -> _dt.datetime:
    """The aware UTC ``datetime`` of stored epoch seconds (clamped to years 1 and 9999)."""
    try:
        return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return _UTC_ENDS[seconds > 0]


class LogManager(_Manager):
    """A time-indexed log of structured entries, with range queries and live aggregates.

        >>> metrics = db.log("system_metrics")
        >>> metrics.log({"cpu": 0.4})
        >>> metrics.log({"cpu": 0.9}, timestamp=datetime.now(timezone.utc))
        >>> [entry.data["cpu"] for entry in metrics.range(start=time.time() - 60)]
        [0.4, 0.9]

    Timestamps are ``datetime`` objects or epoch seconds; a naive ``datetime`` is taken as
    local time (as ``datetime.timestamp()`` does). Entries come back as ``LogEntry`` with an
    aware UTC timestamp, in time order (equal timestamps keep insertion order).
    ``retention`` (seconds or a ``timedelta``) drops older entries as new ones are logged.
    """

    _kind = "log"
    _table = "beaver_logs"

    _OPTIONS = {"retention": (None, lambda v: _seconds(v, "retention", positive=True))}

    def __init__(self, db, name, model=None, retention=_DEFAULT):
        super().__init__(db, name, model)
        self.retention = self._option("retention", retention)
        self._next_prune = 0.0

    def log(self, data, timestamp=None):
        """Append ``data`` at ``timestamp`` (default: now).

            >>> metrics.log({"cpu": 0.4}, timestamp=datetime.now(timezone.utc))

        ``timestamp`` is a ``datetime`` or epoch seconds within the years 1 to 9999
        (``ValueError`` otherwise, ``TypeError`` for other types).
        """
        when = _now() if timestamp is None else _epoch(timestamp)
        text = self._codec.encode(data)
        with self._atomic():
            self._core.execute("INSERT INTO beaver_logs (name, timestamp, data) VALUES (?, ?, ?)",
                               (self._name, when, text))
            self._wrote("log", timestamp=when, data=_to_jsonable(data))
        if self.retention is not None and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PURGE_INTERVAL
            self._core.execute("DELETE FROM beaver_logs WHERE name = ? AND timestamp < ?",
                               (self._name, _now() - self.retention))

    def range(self, start=None, end=None) -> list:
        """Entries with ``start <= timestamp <= end`` (either bound may be None), oldest first.

            >>> for when, data in logs.range(start=datetime(2025, 1, 1, tzinfo=timezone.utc)):
            ...     print(when, data)
        """
        low = -math.inf if start is None else _epoch(start, "start", bound=True)
        high = math.inf if end is None else _epoch(end, "end", bound=True)
        rows = self._core.all(
            "SELECT timestamp, data FROM beaver_logs WHERE name = ? AND timestamp BETWEEN ? AND ? "
            "ORDER BY timestamp, seq", (self._name, low, high))
        decode = self._codec.decode
        return [LogEntry(_utc(t), decode(d)) for t, d in rows]

    def __iter__(self):
        decode = self._codec.decode
        sql = ("SELECT timestamp, seq, data FROM beaver_logs WHERE name = ? AND (timestamp, seq) "
               "> (?, ?) ORDER BY timestamp, seq LIMIT ?")
        low, seq = float("-inf"), 0
        while True:
            rows = self._core.all(sql, (self._name, low, seq, PAGE_SIZE))
            for t, _, d in rows:
                yield LogEntry(_utc(t), decode(d))
            if len(rows) < PAGE_SIZE:
                return
            low, seq = rows[-1][0], rows[-1][1]

    def __len__(self):
        return self._core.one("SELECT count(*) FROM beaver_logs WHERE name = ?",
                                  (self._name,))[0]

    def __bool__(self):
        return True

    def live(self, window, period, aggregator=list) -> "LiveView":
        """An iterator of ``aggregator(entries in the last window)``, now and every ``period``.

            >>> view = logs.live(window=timedelta(seconds=5), period=timedelta(seconds=1),
            ...                  aggregator=lambda rows: len(rows))
            >>> with view:
            ...     for count in view:
            ...         print(count)

        Each period reads only the rows logged since the last one (in any process). Close it
        with ``close()`` or a ``with`` block; iteration then stops.
        """
        return LiveView(self, window, period, aggregator)

    def _dump_items(self):
        rows = self._core.all("SELECT timestamp, data FROM beaver_logs WHERE name = ? "
                                  "ORDER BY timestamp, seq", (self._name,))
        return [{"timestamp": t, "data": _json_loads(d)} for t, d in rows]

    def _load_items(self, items):
        rows = []
        for item in items:
            data, when = _item_fields(item, "data", timestamp=None)
            rows.append((self._name, _now() if when is None else _epoch(when),
                         self._codec.encode(data)))
        self._core.executemany(
            "INSERT INTO beaver_logs (name, timestamp, data) VALUES (?, ?, ?)", rows)
        self._wrote("load", count=len(items))

    def as_async(self) -> "AsyncLogManager":
        """An awaitable twin; ``async for summary in alog.live(...)`` works."""
        return AsyncLogManager(self)


class LiveView:
    """The iterator returned by ``LogManager.live``: a rolling window, updated incrementally."""

    def __init__(self, log, window, period, aggregator):
        self._log = log
        self.window = _seconds(window, "window")
        self.period = _seconds(period, "period", positive=True)
        if self.window is None or self.period is None:
            raise TypeError("live() needs a window and a period (seconds or timedeltas)")
        if not callable(aggregator):
            raise TypeError("aggregator must be callable")
        self._aggregator = aggregator
        self._entries: collections.deque = collections.deque()   # (timestamp, seq, data)
        self._last_seq = None
        self._due = None
        self._closed = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed.is_set():
            raise StopIteration
        if self._due is not None:
            wait = self._due - time.monotonic()
            if wait > 0 and self._closed.wait(wait):
                raise StopIteration
        return self._tick()

    def _wait_time(self) -> float:
        return 0.0 if self._due is None else max(0.0, self._due - time.monotonic())

    def _tick(self):
        """Read the new rows, drop the old ones, and aggregate the window."""
        now = time.monotonic()
        self._due = now + self.period if self._due is None else max(self._due + self.period, now)
        if self._last_seq is None:
            self._load()
        else:
            self._read_new()
        cutoff = _now() - self.window
        entries = self._entries
        while entries and entries[0][0] < cutoff:
            entries.popleft()
        return self._aggregator([data for _, _, data in entries])

    def _load(self):
        core, log = self._log._core, self._log
        self._last_seq = core.one("SELECT coalesce(max(seq), 0) FROM beaver_logs"
                                      )[0]
        rows = core.all(
            "SELECT timestamp, seq, data FROM beaver_logs WHERE name = ? AND timestamp >= ? "
            "AND seq <= ? ORDER BY timestamp, seq",
            (log.name, _now() - self.window, self._last_seq))
        decode = log._codec.decode
        self._entries.extend((t, s, decode(d)) for t, s, d in rows)

    def _read_new(self):
        log = self._log
        rows = log._core.all(
            "SELECT timestamp, seq, data FROM beaver_logs WHERE seq > ? AND +name = ? "
            "ORDER BY seq", (self._last_seq, log.name))
        if not rows:
            return
        self._last_seq = rows[-1][1]
        decode, entries = log._codec.decode, self._entries
        for t, s, d in rows:
            entry = (t, s, decode(d))
            if not entries or entries[-1][:2] <= entry[:2]:
                entries.append(entry)
            else:                   # logged with an older timestamp: keep the window sorted
                ordered = sorted([*entries, entry], key=lambda e: e[:2])
                self._entries = entries = collections.deque(ordered)

    def close(self):
        """Stop the view; a blocked iteration ends at once."""
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<LiveView {self._log.name!r} window={self.window}s period={self.period}s>"


# ==========================================================================================
# Channel
# ==========================================================================================

class ChannelManager(_Manager):
    """A pub/sub channel: every subscriber gets every message published after it subscribed.

        >>> events = db.channel("system_events")
        >>> with events.subscribe() as listener:
        ...     events.publish({"event": "user_login", "user_id": "alice"})
        ...     for message in listener.listen(timeout=5):
        ...         print(message)
        ...         break
        {'event': 'user_login', 'user_id': 'alice'}

    Messages are rows numbered by a sequence, delivered in order, exactly once, in every
    thread and process. One poller thread per ``BeaverDB`` fans them out to its subscribers.
    Messages are kept ``retention`` seconds (default an hour) and at most ``max_messages``
    per channel (default 100 000), pruned as new ones are published (``None`` turns a limit
    off). The newest message of a channel is never pruned.
    """

    _kind = "channel"
    _table = "beaver_channels"
    _PUBLISH = "INSERT INTO beaver_channels (name, timestamp, data) VALUES (?, ?, ?)"

    _OPTIONS = {
        "retention": (CHANNEL_RETENTION, lambda v: _seconds(v, "retention", positive=True)),
        "max_messages": (CHANNEL_MAX_MESSAGES,
                         lambda v: None if v is None else _count(v, "max_messages", low=1))}

    def __init__(self, db, name, model=None, retention=_DEFAULT, max_messages=_DEFAULT):
        super().__init__(db, name, model)
        self.retention = self._option("retention", retention)
        self.max_messages = self._option("max_messages", max_messages)
        self._next_prune = 0.0

    def publish(self, payload):
        """Send ``payload`` (any JSON value, or a model instance) to every subscriber."""
        text = self._codec.encode(payload)
        if self._listened():
            with self._atomic():
                self._core.execute(self._PUBLISH, (self._name, _now(), text))
                self._wrote("publish", payload=_to_jsonable(payload))
        else:
            self._core.execute(self._PUBLISH, (self._name, _now(), text))
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PURGE_INTERVAL
            self.prune()

    def prune(self):
        """Drop messages beyond the retention limits (done by ``publish`` every second)."""
        core = self._core
        if self.retention is not None:
            keep = core.one(       # the first fresh message, or else the newest one
                "SELECT seq FROM beaver_channels WHERE name = ? AND timestamp >= ? ORDER BY seq "
                "LIMIT 1", (self._name, _now() - self.retention)) or core.one(
                "SELECT max(seq) FROM beaver_channels WHERE name = ?", (self._name,))
            if keep[0] is not None:
                core.execute("DELETE FROM beaver_channels WHERE seq < ? AND name = ?",
                             (keep[0], self._name))
        if self.max_messages is not None:
            core.execute(
                "DELETE FROM beaver_channels WHERE name = ? AND seq <= (SELECT seq FROM "
                "beaver_channels WHERE name = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (self._name, self._name, int(self.max_messages)))

    def clear(self):
        """Remove every retained message (subscribers stay subscribed)."""
        with self._core.transaction():
            # The newest row of the table keeps the sequence from going back (seq is not
            # AUTOINCREMENT, to keep publishing to one page write): it becomes a nameless
            # marker instead of being deleted.
            top = self._core.one("SELECT max(seq) FROM beaver_channels")[0]
            self._core.execute("DELETE FROM beaver_channels WHERE (name = ? OR name = '') "
                               "AND seq < ?", (self._name, top or 0))
            self._core.execute("UPDATE beaver_channels SET name = '', data = 'null' "
                               "WHERE seq = ? AND name = ?", (top, self._name))
            self._wrote("clear")

    def subscribe(self) -> "Subscriber":
        """A new subscription, receiving every message published from now on.

            >>> with db.channel("chat").subscribe() as sub:
            ...     for message in sub.listen():
            ...         handle(message)
        """
        return Subscriber(self)

    def __len__(self):
        """Messages currently retained."""
        return self._core.one("SELECT count(*) FROM beaver_channels WHERE name = ?",
                                  (self._name,))[0]

    def __bool__(self):
        return True

    def history(self, limit=None) -> list:
        """The retained messages, oldest first (the last ``limit`` ones if given)."""
        rows = self._core.all(
            "SELECT data FROM (SELECT seq, data FROM beaver_channels WHERE name = ? "
            "ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (self._name, -1 if limit is None else _count(limit, "limit")))
        return [self._codec.decode(r[0]) for r in rows]

    def _dump_items(self):
        rows = self._core.all("SELECT timestamp, data FROM beaver_channels WHERE name = ? "
                                  "ORDER BY seq", (self._name,))
        return [{"timestamp": t, "payload": _json_loads(d)} for t, d in rows]

    def _load_items(self, items):
        rows = []
        for item in items:
            payload, when = _item_fields(item, "payload", timestamp=None)
            rows.append((self._name, _now() if when is None else _check_number(when, "timestamp"),
                         self._codec.encode(payload)))
        self._core.executemany(
            "INSERT INTO beaver_channels (name, timestamp, data) VALUES (?, ?, ?)", rows)
        self._wrote("load", count=len(items))

    def as_async(self) -> "AsyncChannelManager":
        """An awaitable twin; ``async for message in achannel.subscribe().listen()`` works."""
        return AsyncChannelManager(self)


_CLOSED = object()


class Subscriber:
    """One subscription to a channel; use it in a ``with`` block and iterate ``listen()``."""

    def __init__(self, channel, sink=None):
        self.channel = channel
        self._inbox: _queue.SimpleQueue = _queue.SimpleQueue()
        self._sink = sink or self._inbox.put
        self.start = 0
        self.closed = False
        channel._db._hub.add(self)

    def _deliver(self, text):
        self._sink(text)

    def get(self, timeout=None):
        """The next message; ``TimeoutError`` after ``timeout`` seconds without one."""
        timeout = _seconds(timeout, "timeout", wait=True)
        try:
            text = self._inbox.get(timeout=timeout)
        except _queue.Empty:
            raise Timeout(f"no message on channel {self.channel.name!r} within {timeout}s"
                          ) from None
        if text is _CLOSED:
            self._inbox.put(_CLOSED)
            raise ClosedError("the subscription is closed")
        return self.channel._codec.decode(text)

    def listen(self, timeout=None):
        """Yield messages as they arrive, until ``close()``.

        ``timeout`` bounds each wait: if no message arrives for that long, ``TimeoutError``
        is raised (catch it to stop listening). Without it, the wait is unbounded.
        """
        while True:
            try:
                yield self.get(timeout)
            except ClosedError:
                return

    def __iter__(self):
        return self.listen()

    def close(self):
        """Stop receiving; a ``listen()`` in progress ends."""
        if not self.closed:
            self.closed = True
            self.channel._db._hub.remove(self)
            self._sink(_CLOSED)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Subscriber {self.channel.name!r}{' closed' if self.closed else ''}>"


class _Hub:
    """The one channel poller of a ``BeaverDB``: reads new rows, fans them out in memory."""

    def __init__(self, db):
        _live_realtime.add(self)
        self._core = db._core
        self._subs: dict = {}        # channel name -> tuple of Subscriber
        self._last: dict = {}        # channel name -> last seq read
        self._lock = threading.Lock()
        self._thread = None

    def add(self, sub):
        name = sub.channel.name
        with self._lock:
            sub.start = self._core.one("SELECT coalesce(max(seq), 0) FROM beaver_channels"
                                           )[0]
            if name not in self._subs:
                self._last[name] = sub.start
            self._subs[name] = self._subs.get(name, ()) + (sub,)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="beaver-channels",
                                                daemon=True)
                self._thread.start()

    def remove(self, sub):
        name = sub.channel.name
        with self._lock:
            rest = tuple(s for s in self._subs.get(name, ()) if s is not sub)
            if rest:
                self._subs[name] = rest
            else:
                self._subs.pop(name, None)
                self._last.pop(name, None)
        self._core.watcher.wake()

    def stop(self):
        """Close every subscription (on ``BeaverDB.close``): their ``listen()`` loops end."""
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        for sub in subs:
            sub.close()

    def _after_fork(self):
        self._subs, self._last = {}, {}
        self._lock = threading.Lock()
        self._thread = None

    def _run(self):
        try:
            self._core.watcher.wait_for(self._poll)
        except Exception:
            if not self._core.closed:
                logger.exception("beaver channel poller stopped")
            with self._lock:
                self._thread = None

    def _poll(self):
        """Deliver new rows of every subscribed channel; True once nobody subscribes."""
        with self._lock:
            if not self._subs:
                self._thread = None
                return True
            work = list(self._last.items())
        for name, last in work:
            while True:
                rows = self._core.all(
                    "SELECT seq, data FROM beaver_channels WHERE seq > ? AND name = ? "
                    "ORDER BY seq LIMIT ?", (last, name, PAGE_SIZE))
                if not rows:
                    break
                with self._lock:      # read after the rows: a newer subscriber's start is past them
                    subs = self._subs.get(name, ())
                    if name in self._last:
                        self._last[name] = rows[-1][0]
                for seq, text in rows:
                    for sub in subs:
                        if seq > sub.start:
                            sub._deliver(text)
                last = rows[-1][0]
                if len(rows) < PAGE_SIZE:
                    break
        return None


# ==========================================================================================
# Lock
# ==========================================================================================

def _add_lock_ttl_column(core):
    """Files made by the first 0.1 development builds lack ``beaver_locks.ttl``: add it."""
    if getattr(core, "_lock_ttl_checked", False):
        return
    columns = {row[1] for row in core.execute("PRAGMA table_info(beaver_locks)")}
    if "ttl" not in columns:
        with contextlib.suppress(BeaverError):      # another process added it first
            core.execute("ALTER TABLE beaver_locks ADD COLUMN ttl REAL NOT NULL DEFAULT 60")
    core._lock_ttl_checked = True


class Lock:
    """A fair (FIFO) inter-process lock with a time-to-live and a fencing token.

        >>> with db.lock("nightly-report", timeout=10):
        ...     build_report()

    Waiters queue by ticket and keep their place however long they wait; the ``ttl``
    bounds only how long a holder may keep the lock without ``renew()``, so a crashed
    holder frees it at the latest ``ttl`` seconds after acquiring. A release hands the lock
    straight to the first live waiter, which then takes it without writing. ``token`` grows with
    every acquisition and can fence writes by stale holders. One ``Lock`` object shared
    by several threads excludes them as ``threading.Lock`` would.
    """

    def __init__(self, db, name, timeout=None, ttl=60.0):
        self._core = db._core
        self.name = _check_name(name)
        self.timeout = _seconds(timeout, "timeout", wait=True)
        self.ttl = _seconds(ttl, "ttl", positive=True)
        if self.ttl is None:
            raise TypeError("a lock needs a ttl (seconds or a timedelta)")
        self._guard = threading.Lock()
        self._owner = f"{os.getpid()}:{uuid.uuid4().hex}"
        _add_lock_ttl_column(self._core)
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
        return self._ticket is not None and self._core.one(
            "SELECT 1 FROM beaver_locks WHERE ticket = ? AND held > 0 AND expires_at > ?",
            (self._ticket, _now())) is not None

    @property
    def locked(self) -> bool:
        """True while anybody holds the lock."""
        return self._core.one(
            "SELECT 1 FROM beaver_locks WHERE name = ? AND held > 0 AND expires_at > ?",
            (self.name, _now())) is not None

    def acquire(self, timeout=None, block=True):
        """Wait for the lock (up to ``timeout`` s, default the lock's own) and take it.

        Returns a truthy object usable as a context manager; raises ``LockTimeout`` (a
        ``TimeoutError``) when the wait ends without the lock. ``block=False`` tries once.
        """
        timeout = self.timeout if timeout is None else _seconds(timeout, "timeout", wait=True)
        deadline = _Deadline(0.0 if not block else timeout)
        if not self._guard.acquire(False):
            left = deadline.remaining()
            if not self._guard.acquire(timeout=-1 if left is None else left):
                raise LockTimeout(f"lock {self.name!r} is held by another thread of this object")
        try:
            got = self._enqueue()
            if got is None and block:
                got = self._core.watcher.wait_for(self._claim, deadline.remaining(),
                                                  cap=self._next_check)
            if got is None:
                raise LockTimeout(f"could not acquire lock {self.name!r} " + (
                    f"within {timeout}s" if block else "at once (block=False)"))
        except BaseException:
            self._drop()
            raise
        self._core.held_locks.add(self)
        return _Held(self, self)

    def _drop(self):
        """Forget this object's ticket (its row too) and let its threads acquire again."""
        ticket, self._ticket = self._ticket, None
        self._core.held_locks.discard(self)
        try:
            self._leave(ticket)
        finally:
            if self._guard.locked():
                self._guard.release()

    def _enqueue(self):
        """Take a ticket and, if nobody is ahead, the lock."""
        now = _now()
        cursor = self._core.execute(       # uncontended: one statement takes the lock
            "INSERT INTO beaver_locks (name, owner, expires_at, held, ttl) SELECT ?, ?, ?, 1, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM beaver_locks WHERE name = ? AND expires_at > ?)",
            (self.name, self._owner, now + self.ttl, self.ttl, self.name, now))
        if cursor.rowcount == 1:
            self._ticket = cursor.lastrowid
            return True
        with self._core.transaction():
            now = _now()
            cursor = self._core.execute(
                "INSERT INTO beaver_locks (name, owner, expires_at, ttl) VALUES (?, ?, ?, ?)",
                (self.name, self._owner, now + LOCK_WAITER_GRACE, self.ttl))
            self._ticket = cursor.lastrowid
            got = self._take(now)
            if got is None:         # tell the holder that its release must hand over
                self._core.execute("UPDATE beaver_locks SET held = 2 WHERE name = ? AND held = 1",
                                   (self.name,))
        self._beat_due = time.monotonic() + LOCK_WAITER_GRACE / 3
        return got

    def _take(self, now):
        """Inside a transaction: hold the lock if this ticket heads the line of live rows."""
        head = self._core.one(
            "SELECT ticket, expires_at FROM beaver_locks WHERE name = ? AND expires_at > ? "
            "ORDER BY ticket LIMIT 1", (self.name, now))
        if head is None or head[0] != self._ticket:
            self._head_expires = None if head is None else head[1]
            return None
        self._core.execute("DELETE FROM beaver_locks WHERE name = ? AND ticket < ?",
                           (self.name, self._ticket))
        self._core.execute("UPDATE beaver_locks SET held = 2, expires_at = ? WHERE ticket = ?",
                           (now + self.ttl, self._ticket))
        return True

    def _claim(self):
        """One attempt while waiting: a read first, a write only when first in line."""
        now = _now()
        head = self._core.one(
            "SELECT ticket, expires_at, held FROM beaver_locks WHERE name = ? AND expires_at > ? "
            "ORDER BY ticket LIMIT 1", (self.name, now))
        if head is not None and head[0] == self._ticket:
            if head[2]:                 # the previous holder handed it over on release
                return True
            with self._core.transaction():
                if self._take(_now()):
                    return True
        else:
            self._head_expires = None if head is None else head[1]
        if time.monotonic() >= self._beat_due or head is None:
            return self._heartbeat()
        return None

    def _heartbeat(self):
        now = _now()
        cursor = self._core.execute(
            "UPDATE beaver_locks SET expires_at = ? WHERE ticket = ? AND expires_at > ? "
            "AND held = 0", (now + LOCK_WAITER_GRACE, self._ticket, now))
        if cursor.rowcount == 0:
            row = self._core.one("SELECT held, expires_at FROM beaver_locks WHERE ticket = ?",
                                     (self._ticket,))
            if row is not None and row[0] and row[1] > now:
                return True             # handed over meanwhile
            # this process stalled past the grace time: queue again
            self._core.execute("DELETE FROM beaver_locks WHERE ticket = ?", (self._ticket,))
            return self._enqueue()
        self._beat_due = time.monotonic() + LOCK_WAITER_GRACE / 3
        return None

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
        self._core.held_locks.discard(self)
        try:
            # held = 1: nobody queued behind us (waiters set 2), so one statement suffices
            still_ours = self._core.execute(
                "DELETE FROM beaver_locks WHERE ticket = ? AND held = 1 AND expires_at > ?",
                (ticket, _now())).rowcount == 1
            if not still_ours:
                with self._core.transaction():
                    still_ours = self._core.execute(
                        "DELETE FROM beaver_locks WHERE ticket = ? AND expires_at > ?",
                        (ticket, _now())).rowcount == 1
                    if not still_ours:
                        self._leave(ticket)
                    self._hand_over()
            self._core.changed()
        finally:
            self._guard.release()
        if not still_ours:
            raise LockLost(f"lock {self.name!r} expired before release (ttl {self.ttl}s)")

    def _hand_over(self):
        """Make the first live waiter the holder, so it need not write to take the lock."""
        now = _now()
        self._core.execute(
            "UPDATE beaver_locks SET held = 2, expires_at = ? + ttl WHERE held = 0 AND ticket = "
            "(SELECT ticket FROM beaver_locks WHERE name = ? AND expires_at > ? ORDER BY ticket "
            "LIMIT 1)", (now, self.name, now))

    def renew(self, ttl=None):
        """Extend the hold to ``ttl`` (default: the lock's ttl) seconds from now.

            >>> lock.renew(300)

        ``LockLost`` if the hold had already run out (the object may then acquire again).
        """
        ttl = self.ttl if ttl is None else _seconds(ttl, "ttl", positive=True)
        if self._ticket is None:
            raise LockLost(f"lock {self.name!r} is not held by this object")
        cursor = self._core.execute(
            "UPDATE beaver_locks SET expires_at = ? WHERE ticket = ? AND held > 0 "
            "AND expires_at > ?", (_now() + ttl, self._ticket, _now()))
        if cursor.rowcount == 0:
            self._drop()                # the hold ran out: this object is free to acquire
            raise LockLost(f"lock {self.name!r} expired before renew (ttl {self.ttl}s)")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def as_async(self) -> "AsyncLock":
        """An awaitable twin: ``async with db.lock("job").as_async(): ...``."""
        return AsyncLock(self)

    def __repr__(self):
        return f"<Lock {self.name!r} {'held' if self._ticket else 'free'}>"


# ==========================================================================================
# Collection: documents searchable by text, typo-tolerant text, vectors and relationships
# ==========================================================================================

# FTS rowid = collection id (19 bits) | document rowid (32 bits) | field path number (12 bits),
# so a collection's rows are one rowid range, which FTS5 filters without reading any row.
_FTS_PATH_BITS = 12
_FTS_DOC_BITS = 32
_FTS_SCHEMA = [
    # One row per (document, field path); collection and path are UNINDEXED: never searchable.
    """CREATE VIRTUAL TABLE IF NOT EXISTS beaver_fts USING fts5(
        text, collection UNINDEXED, path UNINDEXED, tokenize = 'unicode61 remove_diacritics 2')""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS beaver_fts_vocab USING fts5vocab(beaver_fts, 'row')""",
]
FUZZY_MIN_LENGTH = (3, 7)       # a query term needs 3 letters to allow 1 typo, 7 to allow 2
FUZZY_MAX_TERM = 40             # longer terms are searchable but never typo-corrected
FUZZY_ROUNDS = 6                # candidate terms tried one by one before the rest at once
FUZZY_FREQUENCIES = 40          # candidates (best first) whose frequency orders them
VECTOR_METRICS = ("l2", "cosine", "ip")
VECTOR_LOG_KEEP = 10000         # vector changes remembered for other processes' caches
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_TERM = re.compile(r"[^\W_]+")
_QUERY_TOKEN = re.compile(r'"[^"]*"?|[^\s"]+')
_BIG_ENDIAN = sys.byteorder == "big"


def _as_vector(value):
    """An embedding (list, tuple, ``array``, numpy array) as a list of float32 values."""
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, array.array):
        value = value.tolist()
    if isinstance(value, (str, bytes, dict)):
        raise TypeError(f"an embedding is a sequence of numbers, not {type(value).__name__}")
    try:
        packed = array.array("f", value)
    except (TypeError, OverflowError):
        raise TypeError("an embedding is a flat sequence of finite numbers") from None
    if not packed:
        raise ValueError("an embedding needs at least one number")
    if not math.isfinite(sum(packed)):   # float32 values cannot overflow a float sum
        raise ValueError("an embedding must not contain NaN or infinity")
    return packed.tolist()


def _pack_vector(values) -> bytes:
    packed = array.array("f", values)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


class _Packed(bytes):
    """A stored embedding (float32 bytes) that a ``Document`` decodes when it is read."""
    __slots__ = ()


def _unpack_vector(blob):
    if blob is None:
        return None
    packed = array.array("f")
    packed.frombytes(blob)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tolist()


def _terms(text) -> list:
    """Split text into index terms the way FTS5's unicode61 tokenizer does."""
    terms = _TERM.findall(text.lower())
    if text.isascii():
        return terms
    return [term if term.isascii() else "".join(
        c for c in unicodedata.normalize("NFD", term) if not unicodedata.combining(c))
            for term in terms]


def _trigrams(term) -> set:
    padded = f"${term}$"
    return {padded[i:i + 3] for i in range(len(padded) - 2)}


def _edit_distance(a, b, limit) -> int:
    """Levenshtein distance where a swap of two neighbours counts as one edit (capped)."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    before, previous = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, before[j - 2] + 1)
            current[j] = cost
        if min(current) > limit:
            return limit + 1
        before, previous = previous, current
    return previous[-1]


def _slip(typed, word) -> bool:
    """Whether ``typed`` is ``word`` with one letter dropped or two neighbours swapped.

    Such slips are likelier than a substitution or an extra letter, which could each have
    been any of many letters, so these candidates are tried first (then by frequency).
    """
    if len(word) == len(typed) + 1:
        return any(word[:i] + word[i + 1:] == typed for i in range(len(word)))
    if len(word) == len(typed):
        diff = [i for i in range(len(word)) if word[i] != typed[i]]
        return (len(diff) == 2 and diff[1] == diff[0] + 1
                and word[diff[0]] == typed[diff[1]] and word[diff[1]] == typed[diff[0]])
    return False


def _neighbourhood(term) -> set:
    """Every string one edit away from ``term`` (over ASCII letters, digits and its own)."""
    letters = set(_ALPHABET) | set(term)
    splits = [(term[:i], term[i:]) for i in range(len(term) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out |= {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    out |= {a + c + b[1:] for a, b in splits if b for c in letters}
    out |= {a + c + b for a, b in splits for c in letters}
    out.discard(term)
    return out


def _text_fields(value, path="", out=None) -> dict:
    """``{dotted path: [strings]}`` of a JSON value (strings inside lists keep the path)."""
    out = {} if out is None else out
    if isinstance(value, str):
        out.setdefault(path, []).append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _text_fields(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _text_fields(item, path, out)
    return out


def _check_paths(paths):
    if paths is None:
        return None
    if isinstance(paths, str):
        paths = [paths]
    paths = list(paths)
    if not all(isinstance(p, str) for p in paths):
        raise TypeError("field paths are dotted str paths such as 'meta.title'")
    return paths


def _on_paths(path, paths) -> bool:
    return any(path == p or path.startswith(p + ".") for p in paths)


def _json_path(path) -> str:
    if not isinstance(path, str) or not path or '"' in path:
        raise ValueError(f"bad field path {path!r}: use dotted names such as 'meta.year'")
    return "$" + "".join(f'."{part}"' for part in path.split("."))


# -- the query language ------------------------------------------------------------------

class _Atom(typing.NamedTuple):
    text: str           # a word or phrase, quoted when written to FTS5
    prefix: bool


def _parse_query(text):
    """Plain user text as ``(groups, negatives)``: AND of OR-groups of atoms, minus negatives.

    Understood: words, "quoted phrases", ``prefix*``, ``OR``, ``AND``, ``-word``, ``NOT word``.
    Everything else is text, so no input can produce an FTS5 syntax error.
    """
    if not isinstance(text, str):
        raise TypeError(f"a query is a str, not {type(text).__name__}")
    groups, negatives = [], []
    negate = join = False
    for token in _QUERY_TOKEN.findall(text):
        if token in ("OR", "AND", "NOT") and not token.startswith('"'):
            join, negate = token == "OR", token == "NOT" or negate
            continue
        if token.startswith("-") and len(token) > 1:
            negate, token = True, token.lstrip("-")
        prefix = token.endswith("*") and not token.startswith('"')
        atom = _Atom(token.strip('"*') if not token.startswith('"') else token.strip('"'), prefix)
        if _TERM.search(atom.text):
            if negate:
                negatives.append(atom)
            elif join and groups:
                groups[-1].append(atom)
            else:
                groups.append([atom])
        negate = join = False
    return groups, negatives


def _fts_atom(atom) -> str:
    return '"' + atom.text.replace('"', '""') + '"' + ("*" if atom.prefix else "")


def _fts_expression(groups, negatives) -> str:
    expr = " AND ".join("(" + " OR ".join(map(_fts_atom, group)) + ")" for group in groups)
    if negatives:
        expr = f"({expr}) NOT ({' OR '.join(map(_fts_atom, negatives))})"
    return expr


# -- documents ---------------------------------------------------------------------------

class Document:
    """A document: an id, an optional embedding and a body (any JSON value or a model).

        >>> doc = Document(id="sqlite-001", body="SQLite is an embedded database.")
        >>> Document(id="a1", content="Hello", tags=["x"]).content     # fields -> dict body
        'Hello'

    ``id`` defaults to a new uuid string. ``embedding`` accepts lists, tuples, ``array`` and
    numpy arrays; it is kept as float32 values (what the collection stores).
    """

    def __init__(self, id=None, embedding=None, body=None, **fields):
        if fields:
            if body is None:
                body = fields
            elif isinstance(body, dict):
                body = {**body, **fields}
            else:
                raise TypeError("extra fields need a dict body (or no body)")
        if id is None:
            id = str(uuid.uuid4())
        elif isinstance(id, int) and not isinstance(id, bool):
            id = str(id)
        elif not isinstance(id, str) or not id:
            raise TypeError(f"a document id is a non-empty str, not {id!r}")
        self.id = id
        self._embedding = _as_vector(embedding)
        self.body = body

    @property
    def embedding(self):
        """The embedding as a list of float32 values, or None."""
        value = self._embedding
        if type(value) is _Packed:      # read from the database: decoded on first access
            value = self._embedding = _unpack_vector(value)
        return value

    @embedding.setter
    def embedding(self, value):
        self._embedding = value

    def __getattr__(self, name):
        body = self.__dict__.get("body")
        if not name.startswith("__"):
            if isinstance(body, dict) and name in body:
                return body[name]
            if hasattr(body, "model_dump") and hasattr(body, name):
                return getattr(body, name)
        raise AttributeError(f"Document has no attribute or body field {name!r}")

    def to_dict(self) -> dict:
        """``{"id", "embedding", "body"}`` as plain JSON values."""
        return {"id": self.id, "embedding": self.embedding, "body": _to_jsonable(self.body)}

    @classmethod
    def from_dict(cls, data) -> "Document":
        """The inverse of ``to_dict()``."""
        return cls(id=data.get("id"), embedding=data.get("embedding"), body=data.get("body"))

    def __eq__(self, other):
        if not isinstance(other, Document):
            return NotImplemented
        return (self.id, self.embedding, self.body) == (other.id, other.embedding, other.body)

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        parts = [f"id={self.id!r}"]
        if self.embedding is not None:
            head = ", ".join(f"{x:.4g}" for x in self.embedding[:3])
            parts.append(f"embedding=[{head}{', ...' if len(self.embedding) > 3 else ''}]"
                         f" ({len(self.embedding)} dims)")
        body = repr(self.body)
        parts.append("body=" + (body if len(body) <= 80 else body[:77] + "..."))
        return f"Document({', '.join(parts)})"


class Edge(typing.NamedTuple):
    """A labelled, directed relationship between two documents of a collection."""
    source: str
    target: str
    label: str
    metadata: typing.Any = None


def _doc_id(doc_or_id) -> str:
    if isinstance(doc_or_id, Document):
        return doc_or_id.id
    if isinstance(doc_or_id, str) and doc_or_id:
        return doc_or_id
    raise TypeError(f"expected a Document or a document id, not {doc_or_id!r}")


def _chunks(items, size=500):
    """Lists of at most ``size`` items of any iterable, read as they are needed."""
    items = iter(items)
    chunk = list(itertools.islice(items, size))
    while chunk:
        yield chunk
        chunk = list(itertools.islice(items, size))


def _marks(n) -> str:
    return ",".join("?" * n)


def _ensure_grams(core) -> bool:
    """The trigram index of known words (FTS5 ``trigram`` tokenizer, SQLite 3.34+)."""
    ready = getattr(core, "_grams_ready", None)
    if ready is None:
        try:
            core.execute("CREATE VIRTUAL TABLE IF NOT EXISTS beaver_grams USING fts5("
                         "term, tokenize = 'trigram')")
            ready = True
        except BeaverError as e:
            if "no such" not in str(e) and "parse error" not in str(e):
                raise
            logger.warning("this SQLite has no FTS5 trigram tokenizer: fuzziness 2 acts as 1")
            ready = False
        core._grams_ready = ready
    return ready


def _ensure_fts(core) -> bool:
    """Create the FTS5 tables once per database; False where SQLite lacks FTS5."""
    ready = getattr(core, "_fts_ready", None)
    if ready is None:
        ready = True
        try:
            for statement in _FTS_SCHEMA:
                core.execute(statement)
        except BeaverError as e:
            if "no such module" not in str(e):
                raise
            logger.warning("this SQLite has no FTS5: collections work without text search")
            ready = False
        core._fts_ready = ready
    return ready


def _vector_backend_wanted() -> str:
    """``BEAVER_VECTOR_BACKEND``: '' (faiss when installed), 'exact' or 'faiss' (required)."""
    wanted = os.environ.get("BEAVER_VECTOR_BACKEND", "").strip().lower()
    if wanted not in ("", "exact", "faiss"):
        raise ValueError(f"BEAVER_VECTOR_BACKEND={wanted!r}: use 'exact' (the built-in search), "
                         "'faiss' (beaver_vector, required) or leave it unset (faiss if installed)")
    return wanted


class CollectionManager(_Manager):
    """Documents searchable by full text, typo-tolerant text, vectors and relationships.

        >>> articles = db.collection("articles")
        >>> articles.index(Document(id="a1", body="SQLite is an embedded database"))
        >>> [doc.id for doc, score in articles.match("datbase", fuzziness=1)]
        ['a1']

    ``match`` scores are relevance (higher is better); ``search`` scores are distances
    (lower is better) under the collection's metric: ``l2`` (default), ``cosine`` or ``ip``.
    """

    _kind = "collection"
    _table = "beaver_documents"

    def __init__(self, db, name, model=None, metric=None, **options):
        super().__init__(db, name, model)
        self._fts = _ensure_fts(self._core)
        if self._fts:
            _ensure_grams(self._core)       # created outside any write transaction
        self._metric, self._options = self._register(metric, options)
        self._vocab = (None, set())         # (epoch, terms known to be in beaver_terms)
        self._batch = threading.local()     # terms added by this thread's open transaction
        self._vectors = None                # _VectorCache of the exact search
        self._backend = None                # beaver_vector index, False when unavailable
        self._backend_lock = threading.Lock()
        self._dim = None                    # the vector dimension, once committed

    def _register(self, metric, options):
        if metric is not None and metric not in VECTOR_METRICS:
            raise ValueError(f"metric must be one of {VECTOR_METRICS}, not {metric!r}")
        text = _json_dumps(options) if options else None
        self._core.execute(
            "INSERT INTO beaver_collections (collection, metric, options, cid) "
            "SELECT ?, ?, ?, coalesce(max(cid), 0) + 1 FROM beaver_collections WHERE true "
            "ON CONFLICT (collection) DO NOTHING", (self._name, metric or "l2", text))
        stored, stored_options, self._cid = self._core.execute(
            "SELECT metric, options, cid FROM beaver_collections WHERE collection = ?",
            (self._name,)).fetchone()
        if metric is not None and metric != stored:
            raise ValueError(f"collection {self._name!r} uses metric {stored!r}, not {metric!r}")
        if options and json.loads(stored_options or "{}") != json.loads(text):
            raise ValueError(f"collection {self._name!r} was created with options "
                             f"{stored_options}, not {text}")
        return stored, json.loads(stored_options or "{}")

    @property
    def metric(self) -> str:
        """The vector distance of this collection: 'l2', 'cosine' or 'ip'."""
        return self._metric

    # -- documents -------------------------------------------------------------------------

    def index(self, document, fts=True, fuzzy=False):
        """Insert or replace ``document`` with its text index and vector, atomically.

            >>> docs.index(Document(id="a1", body={"title": "Hi", "tags": ["x"]}))
            >>> docs.index(doc, fts=["title"])        # index only these field paths

        ``fts=False`` skips the text index. ``fuzzy`` is accepted for compatibility: every
        text-indexed document is searchable with typos. Returns the document.
        """
        prepared = self._prepare(document, fts)
        with self._core.transaction():
            self._store(prepared)
        return document

    def index_many(self, documents, fts=True, fuzzy=False) -> int:
        """Index many documents in one transaction (much faster than one by one).

            >>> docs.index_many(Document(id=str(i), body=text) for i, text in enumerate(texts))

        Every document is validated before anything is written; returns how many.
        """
        prepared = [self._prepare(document, fts) for document in documents]
        dims = {len(p[0].embedding) for p in prepared if p[3] is not None}
        if len(dims) > 1:
            raise ValidationError(f"embeddings of different dimensions {sorted(dims)}")
        with self._core.transaction():
            rows, words = [], set()         # text rows and words, written once at the end
            for item in prepared:
                self._store(item, (rows, words))
            self._insert_text(rows, words)
        return len(prepared)

    def _prepare(self, document, fts):
        """Validate and encode before the transaction: (document, body, texts, vector)."""
        if not isinstance(document, Document):
            raise TypeError(f"index() takes a Document, not {type(document).__name__}")
        body = None if document.body is None else self._codec.encode(document.body)
        texts = self._texts(document.body, fts) if self._fts else []
        vector = None if document.embedding is None else _pack_vector(document.embedding)
        return document, body, texts, vector

    def _store(self, prepared, batch=None):
        document, body, texts, vector = prepared
        state = self._state()
        dim = state["dim"]
        if vector is not None and dim is not None and len(document.embedding) != dim:
            raise ValidationError(f"embedding has {len(document.embedding)} dimensions; "
                                  f"collection {self._name!r} holds {dim}")
        rowid, existed = self._write_row(document.id, body)
        self._write_text(rowid, texts, existed, batch)
        if vector is not None or existed:
            self._write_vector(document.id, vector, dim)
            state["dim"] = dim or (None if vector is None else len(vector) // 4)
        self._wrote("index", id=document.id)

    def _state(self) -> dict:
        """``dim`` (and ``epoch``, see ``_epoch``) of this collection, once per transaction.

        The dimension never changes once set: after a commit that knows it, later
        transactions of this process skip the read.
        """
        local = self._batch
        token = getattr(self._core._local, "pending", None)
        if getattr(local, "token", None) is not token:
            local.token, local.terms = token, set()
            state = local.state = {"dim": self._dim}
            if self._dim is None:
                state["dim"], state["epoch"] = self._core.execute(
                    "SELECT dim, epoch FROM beaver_collections WHERE collection = ?",
                    (self._name,)).fetchone()

            def committed():
                local.token = None
                self._dim = self._dim or state["dim"]
            self._core.after_commit(committed)
        return local.state

    def _epoch(self) -> int:
        """The collection's epoch (bumped by ``clear``), read once per transaction."""
        state = self._state()
        if "epoch" not in state:
            state["epoch"] = self._core.execute(
                "SELECT epoch FROM beaver_collections WHERE collection = ?",
                (self._name,)).fetchone()[0]
        return state["epoch"]

    def _texts(self, body, fts) -> list:
        if not fts or body is None:
            return []
        fields = _text_fields(_to_jsonable(body))
        if fts is not True:
            paths = _check_paths(fts)
            fields = {p: v for p, v in fields.items() if _on_paths(p, paths)}
        texts = [(p, "\n".join(v)) for p, v in sorted(fields.items())]
        if len(texts) >= 1 << _FTS_PATH_BITS:
            raise ValueError(f"a document may have at most {1 << _FTS_PATH_BITS} text fields")
        return [(p, t) for p, t in texts if t.strip()]

    def _write_row(self, doc_id, body):
        """Insert or update the document row: ``(rowid, whether it existed)``."""
        cursor = self._core.execute(
            "INSERT INTO beaver_documents (collection, doc_id, body) VALUES (?, ?, ?) "
            "ON CONFLICT (collection, doc_id) DO NOTHING", (self._name, doc_id, body))
        if cursor.rowcount:
            return cursor.lastrowid, False
        if _HAS_RETURNING:
            return self._core.execute(
                "UPDATE beaver_documents SET body = ? WHERE collection = ? AND doc_id = ? "
                "RETURNING id", (body, self._name, doc_id)).fetchall()[0][0], True
        row = self._core.execute(
            "SELECT id FROM beaver_documents WHERE collection = ? AND doc_id = ?",
            (self._name, doc_id)).fetchone()
        self._core.execute("UPDATE beaver_documents SET body = ? WHERE id = ?", (body, row[0]))
        return row[0], True

    def _write_text(self, rowid, texts, existed=True, batch=None):
        """Replace a document's text rows (or add them to ``batch``, written by the caller)."""
        if not self._fts:
            return
        base = self._fts_rowid(rowid)
        if existed:
            self._core.execute("DELETE FROM beaver_fts WHERE rowid >= ? AND rowid < ?",
                               (base, base + (1 << _FTS_PATH_BITS)))
        rows, words = ([], set()) if batch is None else batch
        for i, (path, text) in enumerate(texts):
            rows.append((base + i, text, self._name, path))
            words.update(_terms(text))
        if batch is None:
            self._insert_text(rows, words)

    def _insert_text(self, rows, words):
        if rows:
            self._core.executemany(
                "INSERT INTO beaver_fts (rowid, text, collection, path) VALUES (?, ?, ?, ?)",
                rows)
            self._add_terms(words, self._epoch())

    def _fts_rowid(self, rowid) -> int:
        if rowid >= 1 << _FTS_DOC_BITS or self._cid >= 1 << (63 - _FTS_DOC_BITS - _FTS_PATH_BITS):
            raise BeaverError("too many documents or collections for the text index")
        return (self._cid << (_FTS_DOC_BITS + _FTS_PATH_BITS)) | (rowid << _FTS_PATH_BITS)

    def _write_vector(self, doc_id, vector, dim):
        if vector is None:
            if self._core.execute("DELETE FROM beaver_vectors WHERE collection = ? AND "
                                  "doc_id = ?", (self._name, doc_id)).rowcount:
                self._vectors_changed(dim, doc_id)
                self._call_backend(dim, "on_delete", doc_id)
            return
        self._core.execute(
            "INSERT INTO beaver_vectors (collection, doc_id, vector) VALUES (?, ?, ?) "
            "ON CONFLICT (collection, doc_id) DO UPDATE SET vector = excluded.vector",
            (self._name, doc_id, vector))
        self._vectors_changed(len(vector) // 4, doc_id)
        self._call_backend(len(vector) // 4, "on_upsert", doc_id, vector)

    def _vectors_changed(self, dim, doc_id):
        """Count a vector change in the collection's version and log it for other caches."""
        bump = ("UPDATE beaver_collections SET version = version + 1, dim = coalesce(dim, ?) "
                "WHERE collection = ?")
        if _HAS_RETURNING:
            version = self._core.execute(bump + " RETURNING version",
                                         (dim, self._name)).fetchall()[0][0]
        else:
            self._core.execute(bump, (dim, self._name))
            version = self._core.execute("SELECT version FROM beaver_collections WHERE "
                                         "collection = ?", (self._name,)).fetchone()[0]
        self._core.execute("INSERT INTO beaver_vector_log (collection, version, doc_id) "
                           "VALUES (?, ?, ?)", (self._name, version, doc_id))
        if version % VECTOR_LOG_KEEP == 0:
            self._core.execute("DELETE FROM beaver_vector_log WHERE collection = ? AND "
                               "version <= ?", (self._name, version - VECTOR_LOG_KEEP))

    def drop(self, document):
        """Remove a document (given as a ``Document`` or an id), its vector and its edges.

            >>> docs.drop("a1")

        Raises ``KeyError`` if there is no such document.
        """
        doc_id = _doc_id(document)
        with self._core.transaction():
            row = self._core.execute(
                "SELECT id FROM beaver_documents WHERE collection = ? AND doc_id = ?",
                (self._name, doc_id)).fetchone()
            if row is None:
                raise KeyError(doc_id)
            self._core.execute("DELETE FROM beaver_documents WHERE id = ?", (row[0],))
            dim = self._core.execute("SELECT dim FROM beaver_collections WHERE collection = ?",
                                     (self._name,)).fetchone()[0]
            self._write_text(row[0], [])
            self._write_vector(doc_id, None, dim)
            self._core.execute("DELETE FROM beaver_edges WHERE collection = ? AND source = ?",
                               (self._name, doc_id))
            self._core.execute("DELETE FROM beaver_edges WHERE collection = ? AND target = ?",
                               (self._name, doc_id))
            self._wrote("drop", id=doc_id)

    __delitem__ = drop

    _SELECT = ("SELECT d.doc_id, d.body, v.vector, d.id FROM beaver_documents d "
               "LEFT JOIN beaver_vectors v ON v.collection = d.collection AND v.doc_id = d.doc_id "
               "WHERE d.collection = ? ")

    def _document(self, row) -> Document:
        doc = Document.__new__(Document)
        vector = row[2]
        doc.__dict__.update(id=row[0], body=None if row[1] is None else self._codec.decode(row[1]),
                            _embedding=None if vector is None else _Packed(vector))
        return doc

    def _documents(self, column, keys) -> dict:
        """``{key: Document}`` of the documents whose ``column`` ('id' or 'doc_id') is in keys."""
        at = 3 if column == "id" else 0
        keys = keys if isinstance(keys, list) else list(keys)
        found, make = {}, self._document
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = self._core.execute(self._select_in(column, len(chunk)),
                                      (self._name, *chunk)).fetchall()
            for row in rows:
                found[row[at]] = make(row)
        return found

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _select_in(column, n) -> str:
        sql = CollectionManager._SELECT + f"AND d.{column} IN ({_marks(n)})"
        if column == "id":      # rowid lookups, not a scan of the collection's index
            sql = sql.replace("WHERE d.collection", "WHERE +d.collection")
        return sql

    def get(self, doc_id, default=None):
        """The document with this id, or ``default``.

            >>> docs.get("a1").body
        """
        row = self._core.execute(self._SELECT + "AND d.doc_id = ?",
                                 (self._name, _doc_id(doc_id))).fetchone()
        return default if row is None else self._document(row)

    def __getitem__(self, doc_id):
        doc = self.get(doc_id)
        if doc is None:
            raise KeyError(doc_id)
        return doc

    def __contains__(self, document):
        if not isinstance(document, (str, Document)):
            return False
        return self._core.execute(
            "SELECT 1 FROM beaver_documents WHERE collection = ? AND doc_id = ?",
            (self._name, _doc_id(document))).fetchone() is not None

    def __len__(self):
        return self._core.execute("SELECT count(*) FROM beaver_documents WHERE collection = ?",
                                  (self._name,)).fetchone()[0]

    def __bool__(self):
        return True

    def __iter__(self):
        sql = self._SELECT + "AND d.doc_id > ? ORDER BY d.doc_id LIMIT ?"
        for row in self._paged(sql, ""):
            yield self._document(row)

    def clear(self):
        """Remove every document, vector, text index entry and edge of this collection."""
        with self._core.transaction():
            for table in ("beaver_documents", "beaver_vectors", "beaver_edges",
                          "beaver_vector_log"):
                self._core.execute(f"DELETE FROM {table} WHERE collection = ?", (self._name,))
            if self._fts:
                low = self._fts_rowid(0)
                self._core.execute("DELETE FROM beaver_fts WHERE rowid >= ? AND rowid < ?",
                                   (low, low + (1 << (_FTS_DOC_BITS + _FTS_PATH_BITS))))
            self._core.execute("DELETE FROM beaver_terms WHERE cid = ?", (self._cid,))
            self._batch.token, self._vocab = None, (None, set())
            self._core.execute("UPDATE beaver_collections SET version = version + 1, "
                               "epoch = epoch + 1 WHERE collection = ?", (self._name,))
            dim = self._core.execute("SELECT dim FROM beaver_collections WHERE collection = ?",
                                     (self._name,)).fetchone()[0]
            self._call_backend(dim, "on_clear")
            self._wrote("clear")

    # -- full-text search -------------------------------------------------------------------

    def match(self, query, on=None, top_k=10, fuzziness=0, raw=False, highlight=False):
        """Full-text search: ``[(Document, score)]``, best first (higher score is better).

            >>> docs.match("embedded database")              # all words, any order
            >>> docs.match('"embedded database" OR sqlite -mysql', on=["title"])
            >>> docs.match("datbase", fuzziness=1)           # typo-tolerant

        The query understands words, "phrases", ``prefix*``, ``OR``, ``-word``/``NOT word``;
        anything else is searched as text and never raises. ``raw=True`` passes full FTS5
        syntax through. ``on`` restricts the search to dotted field paths. ``fuzziness`` (1
        or 2) also finds words up to that many edits away (3+ letters for one, 7+ for
        two), ranked by edits, then relevance. ``highlight=True`` returns
        ``(Document, score, snippet)`` triples with matches in ``[...]``.
        """
        if not self._fts:
            raise FeatureUnavailable("this SQLite was built without FTS5: match() is unavailable")
        top_k = _count(top_k, "top_k")
        paths = _check_paths(on)
        if top_k <= 0 or paths == []:
            return []
        if raw:
            if not isinstance(query, str):
                raise TypeError("a query is a str")
            expr = query
            hits = self._ranked(expr, paths, top_k, checked=True)
        else:
            groups, negatives = _parse_query(query)
            if not groups:
                return []
            expr = _fts_expression(groups, negatives)
            if fuzziness:
                hits, expr = self._fuzzy(groups, negatives, paths, top_k, int(fuzziness))
            else:
                hits = self._ranked(expr, paths, top_k)
        docs = self._documents("id", [rowid for rowid, _ in hits])
        if highlight:
            return [(docs[rowid], score, self._snippet(expr, rowid))
                    for rowid, score in hits if rowid in docs]
        return [(docs[rowid], score) for rowid, score in hits if rowid in docs]

    def _ranked(self, expr, paths, limit, checked=False) -> list:
        """``[(document rowid, relevance)]`` of one FTS5 expression, one entry per document."""
        low = self._fts_rowid(0)
        sql = (f"SELECT (rowid >> {_FTS_PATH_BITS}) & {(1 << _FTS_DOC_BITS) - 1}, "
               f"-sum(rank) AS score FROM beaver_fts "
               f"WHERE beaver_fts MATCH ? AND rowid >= ? AND rowid < ?")
        params = [expr, low, low + (1 << (_FTS_DOC_BITS + _FTS_PATH_BITS))]
        if paths is not None:
            sql += " AND (" + " OR ".join(["path = ? OR substr(path, 1, ?) = ?"] * len(paths)) + ")"
            for p in paths:
                params += [p, len(p) + 1, p + "."]
        sql += " GROUP BY 1 ORDER BY score DESC LIMIT ?"
        try:
            return self._core.execute(sql, (*params, limit)).fetchall()
        except BeaverError as e:
            if checked and isinstance(e.__cause__, sqlite3.OperationalError):
                raise ValidationError(f"bad FTS5 query {expr!r}: {e.__cause__}") from None
            raise

    def _snippet(self, expr, rowid) -> str:
        base = self._fts_rowid(rowid)
        row = self._core.execute(
            "SELECT snippet(beaver_fts, 0, '[', ']', '...', 16) FROM beaver_fts "
            "WHERE beaver_fts MATCH ? AND rowid >= ? AND rowid < ? ORDER BY rank LIMIT 1",
            (expr, base, base + (1 << _FTS_PATH_BITS))).fetchone()
        return row[0] if row else ""

    # -- fuzzy search -----------------------------------------------------------------------

    def _fuzzy(self, groups, negatives, paths, top_k, fuzziness):
        """Try the query as typed, then with each typo-corrected term in turn.

        Returns the hits and an expression every hit matches (for snippets)."""
        if fuzziness not in (0, 1, 2):
            raise ValueError("fuzziness is 0, 1 or 2")
        expr = _fts_expression(groups, negatives)
        hits = self._ranked(expr, paths, top_k)
        if len(hits) >= top_k:
            return hits, expr
        options = [[self._spellings(atom, fuzziness) for atom in group] for group in groups]
        found = {rowid: (0, score) for rowid, score in hits}
        for turn in range(1, FUZZY_ROUNDS + 1):
            rewritten = [[_Atom(term, False) for spellings in group for term in
                          (spellings[:turn] if turn < FUZZY_ROUNDS else spellings)]
                         for group in options]
            if all(rewritten):
                expr = _fts_expression([g + r for g, r in zip(groups, rewritten)], negatives)
                more = self._ranked(expr, paths, top_k + len(found))
                for rowid, score in more:
                    found.setdefault(rowid, (turn, score))
            if len(found) >= top_k or not any(len(s) > turn for g in options for s in g):
                break
        best = sorted(found.items(), key=lambda item: (item[1][0], -item[1][1]))[:top_k]
        return [(rowid, score) for rowid, (_, score) in best], expr

    def _spellings(self, atom, fuzziness) -> list:
        """The indexed terms within ``fuzziness`` edits of a one-word atom, best first."""
        words = _terms(atom.text)
        if atom.prefix or len(words) != 1 or len(words[0]) > FUZZY_MAX_TERM:
            return [atom.text]
        word = words[0]
        limit = min(fuzziness, sum(len(word) >= n for n in FUZZY_MIN_LENGTH))
        if limit == 0:
            return [word]
        if limit > 1 and _ensure_grams(self._core):
            candidates = self._known(self._trigram_candidates(word, limit))
        else:
            limit = 1
            candidates = self._known(_neighbourhood(word) | {word})
        scored = [(_edit_distance(word, term, limit), term) for term in candidates]
        scored = sorted((d, not _slip(word, term), term) for d, term in scored if d <= limit)
        frequency = self._frequencies([term for _, _, term in scored])
        scored.sort(key=lambda item: (item[0], item[1], -frequency.get(item[2], 0), item[2]))
        return [term for _, _, term in scored] or [word]

    def _trigram_candidates(self, word, limit) -> set:
        """Known words (of any collection) sharing enough trigrams with ``word``."""
        grams = _trigrams(word)
        need = max(1, len(grams) - 4 * limit)
        query = " OR ".join('"' + gram.replace('"', '""') + '"' for gram in sorted(grams))
        found = set()
        for (padded,) in self._core.execute(
                "SELECT term FROM beaver_grams WHERE beaver_grams MATCH ?", (query,)):
            term = padded[1:-1]
            if abs(len(term) - len(word)) <= limit and len(_trigrams(term) & grams) >= need:
                found.add(term)
        return found

    def _known(self, terms) -> list:
        found = []
        for chunk in _chunks(terms):
            found += [row[0] for row in self._core.execute(
                f"SELECT term FROM beaver_terms WHERE cid = ? AND term IN "
                f"({_marks(len(chunk))})", (self._cid, *chunk))]
        return found

    def _frequencies(self, terms) -> dict:
        """How many text fields hold each term (any collection), for a few terms."""
        if len(terms) < 2:
            return {}
        found = {}
        for term in terms[:FUZZY_FREQUENCIES]:
            row = self._core.execute("SELECT doc FROM beaver_fts_vocab WHERE term = ?",
                                     (term,)).fetchone()
            found[term] = row[0] if row else 0
        return found

    def _add_terms(self, words, epoch):
        """Record new words (and their trigrams) in this collection's vocabulary."""
        known_epoch, known = self._vocab
        if known_epoch != epoch:
            known = {row[0] for row in self._core.execute(
                "SELECT term FROM beaver_terms WHERE cid = ?", (self._cid,))}
            self._vocab = (epoch, known)
        batch = self._batch.terms          # this transaction's new terms (see _state)
        new = words - known - batch
        if not new:
            return
        new = {term for term in new if len(term) <= FUZZY_MAX_TERM}
        batch |= new
        self._core.executemany("INSERT OR IGNORE INTO beaver_terms (cid, term) VALUES (?, ?)",
                               [(self._cid, term) for term in sorted(new)])
        if _ensure_grams(self._core):
            self._core.executemany(
                "INSERT INTO beaver_grams (term) VALUES (?)",
                [(f"${term}$",) for term in new
                 if len(term) >= FUZZY_MIN_LENGTH[1] - 2 and term.isalpha()])
        self._core.after_commit(lambda: known.update(new))

    # -- graph ------------------------------------------------------------------------------

    def connect(self, source, target, label, metadata=None):
        """Add (or update) the edge ``source -[label]-> target`` between two documents.

            >>> net.connect(alice, bob, label="FOLLOWS", metadata={"since": 2020})
        """
        source, target = _doc_id(source), _doc_id(target)
        if not isinstance(label, str) or not label:
            raise TypeError(f"an edge label is a non-empty str, not {label!r}")
        meta = None if metadata is None else _json_dumps(_to_jsonable(metadata))
        with self._core.transaction():
            found = {row[0] for row in self._core.execute(
                "SELECT doc_id FROM beaver_documents WHERE collection = ? AND doc_id IN (?, ?)",
                (self._name, source, target))}
            if len(found) < len({source, target}):
                missing = sorted({source, target} - found)[0]
                raise KeyError(f"no document {missing!r} in {self._name!r}")
            self._core.execute(
                "INSERT INTO beaver_edges (collection, source, label, target, metadata) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection, source, label, target) "
                "DO UPDATE SET metadata = excluded.metadata",
                (self._name, source, label, target, meta))
            self._wrote("connect", source=source, target=target, label=label)

    def disconnect(self, source, target, label=None):
        """Remove the edges from ``source`` to ``target`` (only those with ``label`` if given)."""
        source, target = _doc_id(source), _doc_id(target)
        sql = "DELETE FROM beaver_edges WHERE collection = ? AND source = ? AND target = ?"
        params = [self._name, source, target]
        if label is not None:
            sql, params = sql + " AND label = ?", params + [label]
        with self._core.transaction():
            if self._core.execute(sql, params).rowcount:
                self._wrote("disconnect", source=source, target=target, label=label)

    def edges(self, document, direction="outgoing", label=None) -> list:
        """The ``Edge``s leaving ('outgoing'), entering ('incoming') or touching ('both') it."""
        doc_id = _doc_id(document)
        sides = {"outgoing": ["source"], "incoming": ["target"], "both": ["source", "target"]}
        if direction not in sides:
            raise ValueError("direction is 'outgoing', 'incoming' or 'both'")
        found = []
        for side in sides[direction]:
            sql = (f"SELECT source, target, label, metadata FROM beaver_edges "
                   f"WHERE collection = ? AND {side} = ?")
            params = [self._name, doc_id]
            if label is not None:
                sql, params = sql + " AND label = ?", params + [label]
            found += [Edge(s, t, lab, None if m is None else json.loads(m))
                      for s, t, lab, m in self._core.execute(sql + " ORDER BY 1, 2, 3", params)]
        if direction == "both":
            unique = {(e.source, e.label, e.target): e for e in found}
            found = [unique[key] for key in sorted(unique)]
        return found

    def neighbors(self, document, label=None, direction="outgoing") -> list:
        """The documents one edge away, in id order.

            >>> [doc.id for doc in net.neighbors(alice, label="FOLLOWS")]
            ['bob', 'charlie']
        """
        ids = sorted(self._step([_doc_id(document)], _labels(label), direction))
        docs = self._documents("doc_id", ids)
        return [docs[i] for i in ids if i in docs]

    def walk(self, source, labels=None, depth=1, direction="outgoing") -> list:
        """Documents reachable in 1..``depth`` edges, breadth first (the source excluded).

            >>> [doc.id for doc in net.walk(alice, labels=["FOLLOWS"], depth=2)]
            ['bob', 'charlie', 'diana']

        Each document appears once, at its shortest distance; cycles are harmless.
        """
        start = _doc_id(source)
        labels = _labels(labels)
        seen, frontier, order = {start}, [start], []
        for _ in range(int(depth)):
            reached = sorted(self._step(frontier, labels, direction) - seen)
            if not reached:
                break
            seen.update(reached)
            order += reached
            frontier = reached
        docs = self._documents("doc_id", order)
        return [docs[i] for i in order if i in docs]

    def _step(self, frontier, labels, direction) -> set:
        """Ids one edge away from any id of ``frontier``."""
        sides = {"outgoing": [("source", "target")], "incoming": [("target", "source")],
                 "both": [("source", "target"), ("target", "source")]}
        if direction not in sides:
            raise ValueError("direction is 'outgoing', 'incoming' or 'both'")
        reached = set()
        for here, there in sides[direction]:
            for chunk in _chunks(frontier):
                sql = (f"SELECT {there} FROM beaver_edges WHERE collection = ? "
                       f"AND {here} IN ({_marks(len(chunk))})")
                params = [self._name, *chunk]
                if labels is not None:
                    sql += f" AND label IN ({_marks(len(labels))})"
                    params += labels
                reached.update(row[0] for row in self._core.execute(sql, params))
        return reached

    # -- vectors ----------------------------------------------------------------------------

    def search(self, vector, top_k=10, where=None) -> list:
        """Nearest documents to ``vector``: ``[(Document, distance)]``, closest first.

            >>> docs.search([0.1, 0.9, 0.2], top_k=3)
            >>> docs.search(query, where={"lang": "en", "meta.year": [2023, 2024]})

        Exact unless the ``beaver_vector`` extra provides an index. ``where`` keeps documents
        whose body fields (dotted paths) equal the value (or one of a list of values).
        """
        top_k = _count(top_k, "top_k")
        query = _as_vector(vector)
        if self._backend and self._dim:     # the dimension never changes once committed
            dim = self._dim
        else:
            dim, version, epoch = self._core.execute(
                "SELECT dim, version, epoch FROM beaver_collections WHERE collection = ?",
                (self._name,)).fetchone()
            if dim is not None and not self._core.in_transaction:
                self._dim = dim
        if dim is None or top_k <= 0:
            return []
        if len(query) != dim:
            raise ValidationError(f"query has {len(query)} dimensions; collection "
                                  f"{self._name!r} holds {dim}")
        allowed = self._where(where) if where else None
        backend = self._vector_backend(dim)
        if backend is not None:
            hits = backend.search(query, top_k, allowed)
        else:
            hits = self._exact(version, epoch, dim).search(query, top_k, allowed)
        docs = self._documents("doc_id", [doc_id for doc_id, _ in hits])
        return [(docs[doc_id], float(d)) for doc_id, d in hits if doc_id in docs]

    def _where(self, where) -> set:
        if not isinstance(where, dict):
            raise TypeError("where is a dict of {field path: value}")
        sql, params = "SELECT doc_id FROM beaver_documents WHERE collection = ?", [self._name]
        for path, value in where.items():
            field = "json_extract(body, ?)"
            if value is None:
                sql += f" AND {field} IS NULL"
                params.append(_json_path(path))
                continue
            values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            if not all(isinstance(v, (str, int, float)) for v in values):
                raise TypeError("where values are str, numbers, bools, None or lists of them")
            sql += f" AND {field} IN ({_marks(len(values))})"
            params += [_json_path(path)] + [int(v) if isinstance(v, bool) else v for v in values]
        return {row[0] for row in self._core.execute(sql, params)}

    def _exact(self, version, epoch, dim) -> "_VectorCache":
        """The in-memory vectors, brought up to ``version`` (reloaded after a clear)."""
        cache = self._vectors
        if cache is not None and cache.epoch == epoch and cache.version != version:
            log = self._core.execute(
                "SELECT version, doc_id FROM beaver_vector_log WHERE collection = ? AND "
                "version > ? ORDER BY version", (self._name, cache.version)).fetchall()
            if log and log[0][0] == cache.version + 1:
                changed = {doc_id for _, doc_id in log}
                fresh = dict.fromkeys(changed)
                for chunk in _chunks(changed):
                    fresh.update(self._core.execute(
                        f"SELECT doc_id, vector FROM beaver_vectors WHERE collection = ? "
                        f"AND doc_id IN ({_marks(len(chunk))})", (self._name, *chunk)))
                cache.patch(log[-1][0], fresh)
            else:
                cache = None
        if cache is None or cache.epoch != epoch:
            rows = self._core.execute(
                "SELECT doc_id, vector FROM beaver_vectors WHERE collection = ?",
                (self._name,)).fetchall()
            cache = self._vectors = _VectorCache(self._metric, epoch, version, rows, dim)
        return cache

    def _vector_backend(self, dim):
        """The ``beaver_vector`` index of this collection, or None for the built-in search."""
        backend = self._backend
        if dim is not None and (backend is None or (backend and backend.dim != dim)):
            with self._backend_lock:    # a first vector rolled back may have opened it
                if self._backend and self._backend.dim != dim:
                    self._backend.close()
                    self._backend = None
                if self._backend is None:
                    self._backend = self._open_backend(dim) or False
        return self._backend or None

    def _open_backend(self, dim):
        wanted = _vector_backend_wanted()
        if wanted == "exact":
            return None
        try:
            import beaver_vector
            open_index = beaver_vector.open_index
        except (ImportError, AttributeError) as e:
            if wanted == "faiss":
                raise FeatureUnavailable("BEAVER_VECTOR_BACKEND=faiss, but beaver_vector (numpy "
                                         f"and faiss-cpu) cannot be imported: {e}") from None
            return None
        try:
            return open_index(self._core, self._name, dim, self._metric, **self._options)
        except FeatureUnavailable:
            if wanted == "faiss":
                raise
            return None

    def _call_backend(self, dim, method, *args):
        backend = self._vector_backend(dim)
        if backend is not None:
            getattr(backend, method)(*args)

    def compact(self):
        """Merge the text index into one segment and fold the vector index's pending changes.

            >>> docs.compact()      # after a bulk load; searches keep working meanwhile
        """
        if self._fts:
            with self._core.transaction():
                self._core.execute("INSERT INTO beaver_fts (beaver_fts) VALUES ('optimize')")
        backend = self._backend
        if backend:
            backend.compact()

    def _on_close(self):
        backend, self._backend = self._backend, None
        if backend:
            backend.close()

    # -- dump and load ----------------------------------------------------------------------

    def dump(self, fp=None):
        """Export documents and edges: ``{"metadata", "items", "edges"}`` (or JSON to ``fp``).

            >>> data = docs.dump()
            >>> other.load(data)
        """
        with self._core.transaction():
            data = super().dump()
            data["edges"] = [edge._asdict() for edge in self._all_edges()]
        data["metadata"]["metric"] = self._metric
        if fp is None:
            return data
        json.dump(data, fp, ensure_ascii=False, indent=2)
        return None

    def _all_edges(self):
        rows = self._core.execute(
            "SELECT source, target, label, metadata FROM beaver_edges WHERE collection = ? "
            "ORDER BY source, label, target", (self._name,))
        return [Edge(s, t, lab, None if m is None else json.loads(m)) for s, t, lab, m in rows]

    def _dump_items(self):
        return [doc.to_dict() for doc in self]

    def load(self, data_or_fp):
        """Add the documents and edges of a ``dump()`` in one transaction (text re-indexed)."""
        data = _read_dump(data_or_fp)
        with self._core.transaction():
            super().load(data)
            for edge in data.get("edges") or []:
                self.connect(edge["source"], edge["target"], edge["label"], edge.get("metadata"))

    def _load_items(self, items):
        self.index_many(Document.from_dict(item) for item in items)


def _labels(labels):
    if labels is None:
        return None
    return [labels] if isinstance(labels, str) else list(labels)


class _VectorCache:
    """All vectors of a collection in memory for exact search: numpy when it imports.

    Kept current by replaying ``beaver_vector_log`` (doc ids whose vector changed, by
    collection version), so a change costs one row update, not a reload of every vector.
    """

    def __init__(self, metric, epoch, version, rows, dim):
        self.metric, self.epoch, self.version = metric, epoch, version
        self.ids = [row[0] for row in rows]
        self.position = {doc_id: i for i, doc_id in enumerate(self.ids)}
        try:
            import numpy
        except ImportError:
            numpy = None
        self.np = numpy
        self.lock = threading.Lock()
        if numpy is None:
            self.rows = [self._prepare(row[1]) for row in rows]
            return
        matrix = numpy.frombuffer(b"".join(row[1] for row in rows), dtype="<f4")
        matrix = matrix.reshape(len(rows), dim).astype(numpy.float32)
        if metric == "cosine":
            norms = numpy.linalg.norm(matrix, axis=1, keepdims=True)
            matrix /= numpy.where(norms == 0, 1, norms)
        self._buffer = matrix
        self._squares = numpy.einsum("ij,ij->i", matrix, matrix)

    def _prepare(self, blob):
        vector = array.array("f", _unpack_vector(blob))
        if self.metric == "cosine":
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            vector = array.array("f", [x / norm for x in vector])
        return vector

    def patch(self, version, fresh):
        """Apply ``{doc_id: vector blob or None}`` (None: the vector is gone)."""
        with self.lock:
            for doc_id, blob in fresh.items():
                at = self.position.get(doc_id)
                if blob is None:
                    if at is not None:
                        self._remove(at)
                elif at is None:
                    self._append(doc_id, self._prepare(blob))
                else:
                    self._put(at, self._prepare(blob))
            self.version = version

    def _put(self, at, vector):
        if self.np is None:
            self.rows[at] = vector
        else:
            self._buffer[at] = vector
            self._squares[at] = self._buffer[at] @ self._buffer[at]

    def _append(self, doc_id, vector):
        n = len(self.ids)
        if self.np is None:
            self.rows.append(vector)
        elif n == len(self._buffer):
            np = self.np
            grown = np.empty((max(16, 2 * n), len(vector)), dtype=np.float32)
            grown[:n] = self._buffer[:n]
            self._buffer = grown
            self._squares = np.concatenate([self._squares[:n], np.empty(len(grown) - n,
                                                                        dtype=np.float32)])
        self.ids.append(doc_id)
        self.position[doc_id] = n
        if self.np is not None:
            self._put(n, vector)

    def _remove(self, at):
        """Delete row ``at`` by moving the last row into its place."""
        last, gone = len(self.ids) - 1, self.ids[at]
        if at != last:
            moved = self.ids[last]
            if self.np is None:
                self.rows[at] = self.rows[last]
            else:
                self._buffer[at] = self._buffer[last]
                self._squares[at] = self._squares[last]
            self.ids[at] = moved
            self.position[moved] = at
        self.ids.pop()
        if self.np is None:
            self.rows.pop()
        del self.position[gone]

    def search(self, query, top_k, allowed=None) -> list:
        """``[(doc_id, distance)]`` of the ``top_k`` closest vectors (among ``allowed``)."""
        if self.metric == "cosine":
            norm = math.sqrt(sum(x * x for x in query)) or 1.0
            query = [x / norm for x in query]
        with self.lock:
            if allowed is None:
                positions = None
            else:
                positions = sorted(self.position[i] for i in allowed if i in self.position)
                if not positions:
                    return []
            if self.np is not None:
                return self._search_numpy(query, top_k, positions)
            return self._search_python(query, top_k, positions)

    def _search_numpy(self, query, top_k, positions):
        np = self.np
        n = len(self.ids)
        q = np.asarray(query, dtype=np.float32)
        matrix, squares = self._buffer[:n], self._squares[:n]
        if positions is not None:
            matrix, squares = matrix[positions], squares[positions]
        if not len(matrix):
            return []
        dots = matrix @ q
        scores = squares - 2 * dots if self.metric == "l2" else -dots
        k = min(top_k, len(scores))
        best = np.argpartition(scores, k - 1)[:k] if k < len(scores) else np.arange(k)
        best = best[np.argsort(scores[best], kind="stable")]
        rows = best if positions is None else np.asarray(positions)[best]
        if self.metric == "l2":
            exact = np.sqrt(((self._buffer[rows] - q) ** 2).sum(axis=1))
            order = np.argsort(exact, kind="stable")
            return [(self.ids[rows[i]], float(exact[i])) for i in order]
        shift = 1.0 if self.metric == "cosine" else 0.0
        return [(self.ids[r], shift + float(scores[b])) for r, b in zip(rows, best)]

    def _search_python(self, query, top_k, positions):
        q = array.array("f", query)
        candidates = range(len(self.rows)) if positions is None else positions
        if self.metric == "l2":
            scored = ((math.dist(self.rows[i], q), i) for i in candidates)
        else:
            shift = 1.0 if self.metric == "cosine" else 0.0
            scored = ((shift - sum(map(operator.mul, self.rows[i], q)), i) for i in candidates)
        return [(self.ids[i], d) for d, i in heapq.nsmallest(top_k, scored)]


def rerank(*results, weights=None, k=60) -> list:
    """Merge ranked result lists by reciprocal rank fusion; returns documents, best first.

        >>> best = rerank(text_results, vector_results, weights=[0.6, 0.4])

    Each list holds documents or ``(document, score)`` pairs, best first. A document's fused
    score is the sum over lists of ``weight / (k + rank)``.
    """
    weights = [1.0] * len(results) if weights is None else list(weights)
    if len(weights) != len(results):
        raise ValueError(f"{len(weights)} weights for {len(results)} result lists")
    scores, docs = {}, {}
    for weight, result in zip(weights, results):
        seen = set()
        for rank, item in enumerate(result, 1):
            doc = item[0] if isinstance(item, tuple) else item
            key = doc.id if isinstance(doc, Document) else doc
            if key in seen:
                continue
            seen.add(key)
            docs.setdefault(key, doc)
            scores[key] = scores.get(key, 0.0) + weight / (k + rank)
    return [docs[key] for key in sorted(scores, key=lambda key: -scores[key])]


class _Managers:
    """One manager per (kind, name) for a database or client.

    Asking again for an open structure returns the same manager: options left out (and
    ``model=None``) reuse its settings; a model or option that differs from them is a
    ``ValueError`` rather than a silent second codec or a setting quietly ignored.
    """

    def __init__(self):
        self._by_key: dict = {}
        self._lock = threading.Lock()

    def get(self, cls, name, model, make, options=None):
        """The cached manager of ``cls`` called ``name``, made by ``make()`` the first time."""
        key = (cls._kind, _check_name(name))
        with self._lock:
            manager = self._by_key.get(key)
            if manager is None:
                manager = self._by_key[key] = make()
            else:
                _Manager._reopen(manager, model, options or {})
            return manager

    def all(self) -> list:
        with self._lock:
            return list(self._by_key.values())


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
        self._events = _Events(self._core)
        self._hub = _Hub(self)
        self._managers = _Managers()

    @property
    def path(self) -> str:
        return self._core.path

    def _manager(self, cls, name, model=None, **options):
        self._check_open()
        return self._managers.get(cls, name, model,
                                  lambda: cls(self, name, model=model, **options), options)

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

    def log(self, name, model=None, retention=_DEFAULT) -> LogManager:
        """The time-indexed log called ``name`` (``retention`` in seconds or a timedelta).

        Settings hold for this ``BeaverDB``'s manager: leave them out to reuse the open one
        (a different value is a ``ValueError``); a new manager defaults to no retention.
        """
        return self._manager(LogManager, name, model, retention=retention)

    def channel(self, name, model=None, retention=_DEFAULT,
                max_messages=_DEFAULT) -> ChannelManager:
        """The pub/sub channel called ``name`` (messages kept ``retention`` s, ``max_messages``).

        A new manager defaults to an hour and 100 000 messages; leave the settings out to
        reuse the open one (a different value is a ``ValueError``).
        """
        return self._manager(ChannelManager, name, model, retention=retention,
                             max_messages=max_messages)

    def lock(self, name, timeout=None, ttl=60.0, lock_ttl=None) -> Lock:
        """A new inter-process lock object on ``name`` (``lock_ttl`` is the 1.x spelling)."""
        self._check_open()
        return Lock(self, name, timeout=timeout, ttl=lock_ttl if lock_ttl is not None else ttl)

    def collection(self, name, model=None, metric=None, **options) -> CollectionManager:
        """The document collection called ``name``: full-text, fuzzy, vector and graph search.

            >>> articles = db.collection("articles")
            >>> images = db.collection("images", metric="cosine")

        ``model`` types the document bodies; ``metric`` ('l2' by default, 'cosine', 'ip') and
        extra options (e.g. ``index="hnsw"`` for ``beaver_vector``) are fixed at creation.
        """
        self._check_open()
        manager = self._managers.get(CollectionManager, name, model, lambda: CollectionManager(
            self, name, model=model, metric=metric, **options))
        if metric is not None and metric != manager.metric:
            raise ValueError(f"collection {name!r} uses metric {manager.metric!r}, not {metric!r}")
        if options and options != manager._options:
            raise ValueError(f"collection {name!r} is open with options {manager._options}, "
                             f"not {options}")
        return manager

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

    # -- the whole database --------------------------------------------------------------

    def dump(self, fp, names=None) -> int:
        """Write every structure (or those in ``names``) to the text file ``fp`` as JSON lines.

            >>> with open("backup.jsonl", "w") as f:
            ...     db.dump(f)
            3

        One consistent snapshot, streamed; returns the number of structures written. The
        format is described in the "Dump, load, backup" section of this module.
        """
        return _dump_database(self, fp, names)

    def load(self, fp, mode="append") -> int:
        """Read a ``dump()`` back from ``fp``, in one transaction; returns the structure count.

            >>> with open("backup.jsonl") as f:
            ...     db.load(f, mode="replace")
            3

        ``mode="append"`` adds the items to what is there; ``"replace"`` first empties each
        structure the dump holds (structures absent from the dump are left alone).
        """
        return _load_database(self, fp, mode)

    def backup(self, path) -> str:
        """Copy the database to ``path`` while other threads and processes keep writing.

            >>> db.backup("nightly.db")
            '/srv/nightly.db'

        The copy is one consistent snapshot (SQLite's online backup API), written to a
        temporary file and renamed into place. Returns the absolute path.
        """
        return _backup_database(self, path)

    def info(self) -> dict:
        """The file, its size, and every structure in it with its kind and size.

            >>> db.info()["structures"]
            [{'kind': 'dict', 'name': 'app_config', 'size': 2}]
        """
        return _database_info(self)

    def _check_open(self):
        if self._core.closed:
            self._core._close_deferred()
            raise ClosedError("the database is closed")

    @property
    def closed(self) -> bool:
        return self._core.closed

    def close(self):
        """Release the locks this database holds, close every connection of every thread;
        later calls raise ``ClosedError``."""
        self._events.stop()
        self._hub.stop()
        for manager in self._managers.all():
            getattr(manager, "_on_close", lambda: None)()
        for lock in list(self._core.held_locks):
            with contextlib.suppress(BeaverError):     # LockLost: it had run out anyway
                lock.release()
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

    def on(self, event, callback):
        """Same as the manager's ``on`` (not awaited): callbacks run on the event thread."""
        return self._sync.on(event, callback)

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
        future = asyncio.ensure_future(asyncio.to_thread(self._sync.acquire))
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:  # the wait goes on in its thread: release what it gets
            future.add_done_callback(
                lambda f: f.cancelled() or f.exception() or self._sync.release())
            raise
        return self

    async def __aexit__(self, *exc):
        await asyncio.to_thread(self._sync.release)

    async def __aiter__(self):
        for item in await asyncio.to_thread(list, self._sync):
            yield item

    def __repr__(self):
        return f"<Async {self._sync!r}>"


class AsyncQueueManager(AsyncManager):
    """Awaitable twin of a queue.

        >>> jobs = db.queue("jobs").as_async()
        >>> item = await asyncio.wait_for(jobs.get(), 5)

    Cancelling a waiting ``get`` (``wait_for`` timing out, say) stops its worker thread, and
    an item taken at that very moment goes back to the queue, at the end of its priority.
    """

    async def get(self, block=True, timeout=None, lease=None) -> QueueItem:
        """``QueueManager.get`` as a coroutine that may safely be cancelled."""
        queue, stop = self._sync, threading.Event()

        def wait():
            if stop.is_set():
                return None
            if not block:
                return queue.get(block=False, lease=lease)
            item = queue._core.watcher.wait_for(lambda: stop.is_set() or queue._take(lease),
                                                _seconds(timeout, "timeout"),
                                                cap=queue._lease_due)
            if item is None:
                raise Timeout(f"no item arrived in queue {queue.name!r} within {timeout}s")
            return item
        future = asyncio.ensure_future(asyncio.to_thread(wait))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            queue._core.watcher.wake()
            future.add_done_callback(self._give_back)
            raise

    def _give_back(self, future):
        """Requeue what a cancelled ``get`` took (a plain thread: the loop may be closing)."""
        if future.cancelled() or future.exception() is not None:
            return
        item = future.result()
        if isinstance(item, QueueItem):
            if getattr(item, "lease_id", None) is not None:
                target, args = self._sync.nack, (item,)
            else:
                target, args = self._sync.put, (item.data, item.priority)
            threading.Thread(target=target, args=args, name="beaver-requeue").start()


class AsyncChannelManager(AsyncManager):
    """Awaitable twin of a channel.

        >>> achannel = db.channel("chat").as_async()
        >>> async with achannel.subscribe() as sub:
        ...     await achannel.publish({"text": "hi"})
        ...     async for message in sub.listen(timeout=5):
        ...         break
    """

    def subscribe(self) -> "AsyncSubscriber":
        """A subscription delivering into the running event loop (call it inside a coroutine)."""
        return AsyncSubscriber(self._sync)


class AsyncSubscriber:
    """A channel subscription for asyncio: ``async for message in sub.listen()``."""

    def __init__(self, channel):
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("subscribe() on an async channel needs a running event loop"
                               ) from None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._sub = Subscriber(channel, sink=self._put)

    def _put(self, text):
        with contextlib.suppress(RuntimeError):      # the loop is already closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, text)

    async def get(self, timeout=None):
        """The next message; ``TimeoutError`` after ``timeout`` seconds without one."""
        timeout = _seconds(timeout, "timeout")
        try:
            text = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"no message on channel {self._sub.channel.name!r} within "
                          f"{timeout}s") from None
        if text is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            raise ClosedError("the subscription is closed")
        return self._sub.channel._codec.decode(text)

    async def listen(self, timeout=None):
        """Yield messages until ``close()``; ``TimeoutError`` after ``timeout`` s of silence."""
        while True:
            try:
                message = await self.get(timeout)
            except ClosedError:
                return
            yield message

    def __aiter__(self):
        return self.listen()

    def close(self):
        """Stop receiving; a ``listen()`` in progress ends."""
        self._sub.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


class AsyncLogManager(AsyncManager):
    """Awaitable twin of a log: ``async for summary in alog.live(window, period, agg)``."""

    def live(self, window, period, aggregator=list) -> "AsyncLiveView":
        """Like ``LogManager.live``, as an async iterator."""
        return AsyncLiveView(self._sync.live(window, period, aggregator))


class AsyncLiveView:
    """Async iterator over a ``LiveView``: waits with ``asyncio.sleep``, reads in a thread."""

    def __init__(self, view):
        self.view = view

    def __aiter__(self):
        return self

    async def __anext__(self):
        view = self.view
        while not view.closed and view._wait_time() > 0:
            await asyncio.sleep(min(view._wait_time(), 0.25))
        if view.closed:
            raise StopAsyncIteration
        return await asyncio.to_thread(view._tick)

    def close(self):
        self.view.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


class AsyncLock:
    """Awaitable twin of a ``Lock``: ``async with db.lock("job").as_async(): ...``."""

    def __init__(self, lock):
        self.sync = lock

    async def acquire(self, timeout=None, block=True):
        """Wait for the lock without blocking the event loop; ``TimeoutError`` on timeout."""
        task = asyncio.ensure_future(asyncio.to_thread(self.sync.acquire, timeout, block))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:      # do not leak a lock the worker thread still gets
            task.add_done_callback(lambda t: t.cancelled() or t.exception()
                                   or self.sync.release())
            raise
        return self

    async def release(self):
        await asyncio.to_thread(self.sync.release)

    async def renew(self, ttl=None):
        await asyncio.to_thread(self.sync.renew, ttl)

    @property
    def token(self):
        return self.sync.token

    async def locked(self) -> bool:
        return await asyncio.to_thread(lambda: self.sync.locked)

    async def __aenter__(self):
        return await self.acquire()

    async def __aexit__(self, *exc):
        await self.release()

    def __repr__(self):
        return f"<Async {self.sync!r}>"


# ==========================================================================================
# Dump, load, backup: the whole database
# ==========================================================================================
#
# ``db.dump(fp)`` writes JSON lines (UTF-8 text), streaming, one structure after another:
#
#     {"beaver_dump": 1, "beaver_version": "0.1.0", "dumped_at": "2026-01-01T00:00:00+00:00"}
#     {"structure": "dict", "name": "app_config", "count": 2}
#     {"key": "theme", "value": "dark", "expires_at": null}
#     {"key": "user_id", "value": 123, "expires_at": null}
#     {"structure": "list", "name": "daily_tasks", "count": 1}
#     {"id": "task-001", "desc": "Write project report"}
#     {"end": true, "structures": 2}
#
# A structure line is followed by exactly ``count`` item lines, each one item exactly as the
# structure's own ``dump()`` writes it in its "items" list (dict keys keep ``expires_at``,
# queue items their priority and timestamp, blobs are base64, models are plain JSON). The
# final "end" line tells a complete dump from a truncated one.

DUMP_FORMAT = 1
_LOAD_BATCH = 1000

# kind -> (table, BeaverDB factory, WHERE clause for live rows, column holding the name)
_STRUCTURES = {
    "dict": ("beaver_dicts", "dict", f"WHERE {_LIVE}", "name"),
    "list": ("beaver_lists", "list", "", "name"),
    "queue": ("beaver_queues", "queue", "", "name"),
    "blob": ("beaver_blobs", "blobs", "", "name"),
    "log": ("beaver_logs", "log", "", "name"),
    "channel": ("beaver_channels", "channel", "WHERE name != ''", "name"),
    "collection": ("beaver_documents", "collection", "", "collection"),
}


@contextlib.contextmanager
def _read_snapshot(core):
    """Read everything inside one deferred transaction: a consistent snapshot (WAL).

    Writers in other connections keep going; nested ``transaction()`` calls become savepoints.
    """
    if core.in_transaction:
        yield
        return
    conn = core.conn()
    local = core._local
    core._run(conn, "BEGIN")
    local.depth, local.pending = 1, []
    try:
        core.one("SELECT count(*) FROM beaver_meta")  # the snapshot starts here
        yield
    finally:
        local.depth, local.pending = 0, []
        core._rollback(conn)


def _structure_names(db, kind) -> list:
    """Names of the structures of ``kind`` that hold at least one (live) item."""
    table, _, where, column = _STRUCTURES[kind]
    params = (_now(),) if "?" in where else ()
    rows = db._core.execute(f"SELECT {column}, count(*) FROM {table} {where} "
                            f"GROUP BY {column} ORDER BY {column}", params)
    return [(name, size) for name, size in rows]


def _database_info(db) -> dict:
    structures = []
    for kind in _STRUCTURES:
        structures += [{"kind": kind, "name": n, "size": s} for n, s in _structure_names(db, kind)]
    rows = db._core.execute(
        "SELECT name, count(*), max(held) FROM beaver_locks WHERE expires_at > ? "
        "GROUP BY name ORDER BY name", (_now(),))
    structures += [{"kind": "lock", "name": n, "size": s, "locked": bool(h)} for n, s, h in rows]
    size = sum(os.path.getsize(db.path + s) for s in ("", "-wal") if os.path.exists(db.path + s))
    return {"path": db.path, "bytes": size, "beaver_version": __version__,
            "schema_version": SCHEMA_VERSION, "structures": structures}


def _wanted(names, kinds):
    """A filter on (kind, name): ``names`` may hold plain names or ``kind:name``."""
    if not names and not kinds:
        return lambda kind, name: True
    names = set(names or ())
    kinds = set(kinds or ())
    return lambda kind, name: ((not kinds or kind in kinds) and
                               (not names or name in names or f"{kind}:{name}" in names))


def _dump_database(db, fp, names=None, kinds=None) -> int:
    wanted = _wanted(names, kinds)
    write = fp.write
    count = 0
    with _read_snapshot(db._core):
        write(_json_dumps({"beaver_dump": DUMP_FORMAT, "beaver_version": __version__,
                           "dumped_at": _dt.datetime.now(_dt.timezone.utc).isoformat()}) + "\n")
        for kind in _STRUCTURES:
            for name, _ in _structure_names(db, kind):
                if wanted(kind, name):
                    _dump_structure(db, kind, name, write)
                    count += 1
        write(_json_dumps({"end": True, "structures": count}) + "\n")
    return count


def _dump_structure(db, kind, name, write):
    """A structure line, its items, and for a collection its edges after the documents."""
    manager = getattr(db, _STRUCTURES[kind][1])(name)
    items = manager._dump_items()
    header = {"structure": kind, "name": name, "count": len(items)}
    extra = []
    if kind == "collection":
        extra = [edge._asdict() for edge in manager._all_edges()]
        header.update(metric=manager.metric, options=manager._options or None, edges=len(extra))
    write(_json_dumps(header) + "\n")
    for item in items + extra:
        write(_json_dumps(item) + "\n")


def _dump_lines(fp):
    """The JSON values of a dump, one per non-empty line, with line numbers in errors."""
    for number, line in enumerate(fp, 1):
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        if not line.strip():
            continue
        try:
            yield _parse_json(line)
        except ValueError as e:
            raise ValueError(f"line {number} of the dump: {e}") from None


def _load_database(db, fp, mode="append") -> int:
    if mode not in ("append", "replace"):
        raise ValueError("mode must be 'append' or 'replace'")
    lines = _dump_lines(fp)
    header = next(lines, None)
    if not isinstance(header, dict) or "beaver_dump" not in header:
        raise ValueError("not a beaver dump (its first line must be the beaver_dump header)")
    if header["beaver_dump"] != DUMP_FORMAT:
        raise ValueError(f"dump format {header['beaver_dump']!r} is not supported")
    loaded = 0
    with db._core.transaction():
        for line in lines:
            if isinstance(line, dict) and line.get("end") is True:
                return loaded
            _load_structure(db, line, lines, mode)
            loaded += 1
    raise ValueError("the dump is truncated (no end line); nothing was loaded")


def _load_structure(db, line, lines, mode):
    if not isinstance(line, dict) or line.get("structure") not in _STRUCTURES:
        raise ValueError(f"expected a structure line in the dump, found {line!r:.80}")
    count = line.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"bad item count in {line!r:.80}")
    kind, name = _item_fields(line, "structure", "name")
    if kind == "collection":
        manager = db.collection(name, metric=line.get("metric"), **(line.get("options") or {}))
    else:
        manager = getattr(db, _STRUCTURES[kind][1])(name)
    if mode == "replace":
        manager.clear()
    for batch in _batches(lines, count, f"{kind} {name!r}"):
        manager._load_items(batch)
    for batch in _batches(lines, line.get("edges") or 0, f"the edges of {kind} {name!r}"):
        for edge in batch:
            manager.connect(*_item_fields(edge, "source", "target", "label", metadata=None))


def _batches(lines, count, what):
    """The next ``count`` values of ``lines``, in lists of at most _LOAD_BATCH."""
    batch = []
    for _ in range(count):
        item = next(lines, _MISSING)
        if item is _MISSING:
            raise ValueError(f"the dump ends inside {what}")
        batch.append(item)
        if len(batch) >= _LOAD_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _backup_database(db, path):
    target = os.path.abspath(os.fspath(path))
    if target == os.path.abspath(db.path):
        raise ValueError("cannot back a database up onto itself")
    db._check_open()
    fd, tmp = tempfile.mkstemp(prefix=".beaver-backup-", suffix=".db",
                               dir=os.path.dirname(target))
    os.close(fd)
    try:
        source = sqlite3.connect(db.path, timeout=db._core.timeout)
        dest = sqlite3.connect(tmp)
        try:
            source.backup(dest)  # one step: a consistent snapshot, writers carry on (WAL)
        finally:
            dest.close()
            source.close()
        os.replace(tmp, target)
    except _DB_ERRORS as e:
        raise _sqlite_error(e, target, db._core.timeout) from e
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return target


# ==========================================================================================
# BeaverClient: the same API over HTTP, against ``python -m beaver_server``
# ==========================================================================================

class RemoteError(BeaverError):
    """The server answered with an error this client has no better exception for."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class Unauthorized(RemoteError, PermissionError):
    """The server wants a (different) bearer token."""


# The server names the exception in its JSON error body; the client raises the same class.
_REMOTE_ERRORS = {cls.__name__: cls for cls in (
    KeyError, IndexError, ValueError, TypeError, TimeoutError, BeaverError, ClosedError,
    SchemaError, FeatureUnavailable, Timeout, DatabaseBusy, LockTimeout, LockLost, QueueEmpty,
    ValidationError, DiskFull, CorruptDatabase, ForeignDatabase, ReadOnlyDatabase)}
_CHUNK_WAIT = 25.0   # seconds a single blocking request may wait on the server
_NO_BODY = object()


def _quote(text) -> str:
    from urllib.parse import quote
    return quote(str(text), safe="")


class _Http:
    """One keep-alive HTTP(S) connection per thread to one server."""

    def __init__(self, url, token=None, timeout=60.0):
        from urllib.parse import urlsplit
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()
        self._all: list = []
        self.streams = weakref.WeakSet()    # open _RemoteStreams, closed by close()

    def _connection(self, fresh=False):
        conn = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn, True
        import http.client
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        self._local.conn = conn
        self._all.append(conn)
        return conn, False

    def request(self, method, path, query=None, body=None, headers=None, wait=0.0, sink=None):
        """Send one request; return ``(status, headers, body bytes)``; retry a stale socket.

        With ``sink``, a successful response body is passed to it in chunks instead.
        """
        if query:
            from urllib.parse import urlencode
            pairs = {k: _query_value(v) for k, v in query.items() if v is not None}
            path = f"{path}?{urlencode(pairs)}" if pairs else path
        all_headers = {**self.headers, **(headers or {})}
        conn, reused = self._connection()
        for attempt in (0, 1):
            try:
                conn.timeout = self.timeout + wait
                if conn.sock is not None:
                    conn.sock.settimeout(conn.timeout)
                conn.request(method, self.prefix + path, body=body, headers=all_headers)
                response = conn.getresponse()
                if sink is None or response.status >= 400:
                    return response.status, response.headers, response.read()
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    sink(chunk)
                return response.status, response.headers, b""
            except (ConnectionError, OSError) as e:
                conn.close()
                if attempt or not reused or isinstance(e, TimeoutError):
                    raise RemoteError(f"{method} {self.url}{path} failed: {e}") from None
                conn, reused = self._connection(fresh=True)
        raise AssertionError("unreachable")

    def stream(self, path, query=None):
        """A dedicated connection reading ``path`` as a server-sent event stream."""
        import http.client
        from urllib.parse import urlencode
        pairs = {k: _query_value(v) for k, v in (query or {}).items() if v is not None}
        path = self.prefix + path + (f"?{urlencode(pairs)}" if pairs else "")
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", path, headers={**self.headers, "Accept": "text/event-stream"})
            response = conn.getresponse()
            if response.status >= 400:
                _raise_remote(response.status, response.read())
            conn.sock.settimeout(None)   # a quiet stream is not an error; close() ends it
        except (ConnectionError, OSError) as e:
            conn.close()
            raise RemoteError(f"GET {self.url}{path} failed: {e}") from None
        except BaseException:
            conn.close()
            raise
        return conn, response

    def close(self):
        """Close every connection; open streams end as if closed."""
        for stream in list(self.streams):
            stream.close()
        for conn in self._all:
            conn.close()
        self._all = []
        self._local = threading.local()


def _query_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _raise_remote(status, body):
    try:
        error = json.loads(body)
        name, message = error.get("error"), error.get("message", "")
    except (ValueError, AttributeError):
        name, message = None, body.decode("utf-8", "replace")[:500]
    if status == 401:
        raise Unauthorized(message or "unauthorized", status)
    if status == 404 and not body:   # the answer to a HEAD request has no body
        raise KeyError("")
    cls = _REMOTE_ERRORS.get(name)
    if cls is None:
        raise RemoteError(f"HTTP {status}: {message}", status)
    raise cls(message)


class _RemoteManager(_StructureLock):
    """Shared plumbing of the remote twins of the managers."""

    _kind = ""
    _route = ""

    def __init__(self, client, name, model=None):
        self._client = client
        self._http = client._http
        self._name = _check_name(name)
        self._model = model
        self._codec = _codec_for(model)
        self._base = f"/{self._route}/{_quote(name)}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self):
        return self._model

    def __repr__(self):
        return f"<{type(self).__name__} {self._name!r} at {self._http.url}>"

    def _send(self, method, suffix="", query=None, body=_NO_BODY, headers=None, wait=0.0):
        """One request on this structure; the raw response body, or the server's exception."""
        return self._exchange(method, suffix, query, body, headers, wait)[1]

    def _exchange(self, method, suffix="", query=None, body=_NO_BODY, headers=None, wait=0.0):
        """Like ``_send``, returning ``(response headers, body)``."""
        if body is not _NO_BODY and not isinstance(body, bytes):
            body = body.encode("utf-8")
            headers = {"Content-Type": "application/json", **(headers or {})}
        status, response_headers, data = self._http.request(
            method, self._base + suffix, query, None if body is _NO_BODY else body,
            headers, wait)
        if status >= 400:
            _raise_remote(status, data)
        return response_headers, data

    def _call(self, method, suffix="", query=None, body=_NO_BODY, wait=0.0):
        data = self._send(method, suffix, query, body, wait=wait)
        return json.loads(data) if data else None

    def _value(self, obj):
        """A stored value as the caller's codec wants it (model instances when typed)."""
        return obj if self._model is None else self._codec.decode(_json_dumps(obj))

    def _summary(self, view=None):
        return self._call("GET", "", {"view": view})

    def __len__(self):
        return self._summary()["size"]

    def __bool__(self):
        return True

    def clear(self):
        """Remove every item of this structure."""
        self._call("DELETE")

    def dump(self, fp=None):
        """Export to a JSON-ready dict, or write it as JSON to the file object ``fp``."""
        data = self._summary("dump")["dump"]
        if fp is None:
            return data
        json.dump(data, fp, ensure_ascii=False, indent=2)
        return None

    def load(self, data_or_fp):
        """Add the items of a ``dump()`` (a dict, JSON text or a file object)."""
        self._call("POST", "", {"mode": "append"}, _json_dumps(_read_dump(data_or_fp)))

    def _new_lock(self, name, ttl):
        return RemoteLock(self._client, name, ttl=ttl)

    def on(self, event, callback) -> "_RemoteEventHandle":
        """Call ``callback(payload)`` after every ``event`` ('set', 'del', ... or '*').

            >>> handle = client.dict("config").on("set", lambda p: print(p["key"]))
            >>> handle.off()

        The server streams the events of this structure (server-sent events); callbacks run
        on one thread of this client, in order. Listening starts before ``on`` returns.
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        _check_event(self._kind, event)
        stream = _RemoteStream(self._http, f"/events/{self._kind}/{_quote(self._name)}",
                               {"event": event}, json.loads)
        return _RemoteEventHandle(stream, event, callback)

    def as_async(self) -> "AsyncManager":
        """An awaitable twin whose calls run in worker threads."""
        return AsyncManager(self)


class RemoteDict(_RemoteManager, MutableMapping):
    """``db.dict(name)`` over HTTP."""

    _kind, _route = "dict", "dicts"

    def __getitem__(self, key):
        return self._codec.decode(self._send("GET", "/" + _quote(_check_key(key))))

    def get(self, key, default=None):
        """The value of ``key``, or ``default`` if it is missing or expired."""
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key, value):
        self.set(key, value)

    def set(self, key, value, ttl_seconds=None):
        """Store ``value`` under ``key``; with ``ttl_seconds`` it expires that much later."""
        self._send("PUT", "/" + _quote(_check_key(key)), {"ttl_seconds": _check_ttl(ttl_seconds)},
                   self._codec.encode(value))

    def __delitem__(self, key):
        self._send("DELETE", "/" + _quote(_check_key(key)))

    def pop(self, key, default=_MISSING):
        """Remove ``key`` and return its value (or ``default``; else ``KeyError``)."""
        try:
            return self._codec.decode(self._send("DELETE", "/" + _quote(_check_key(key))))
        except KeyError:
            if default is _MISSING:
                raise
            return default

    def __contains__(self, key):
        if not isinstance(key, str):
            return False
        try:
            self._send("HEAD", "/" + _quote(key))
        except KeyError:
            return False
        return True

    def setdefault(self, key, default=None):
        """Return the value of ``key``, storing ``default`` first if it is missing."""
        return self._codec.decode(self._send(
            "PUT", "/" + _quote(_check_key(key)), {"if_absent": True}, self._codec.encode(default)))

    def update(self, *args, **kwargs):
        """Like ``dict.update``, in one transaction on the server."""
        items = {k: json.loads(self._codec.encode(v)) for k, v in dict(*args, **kwargs).items()}
        self._call("PATCH", "", body=_json_dumps(items))

    def ttl(self, key):
        """Seconds until ``key`` expires; ``None`` if it never does; ``KeyError`` if absent."""
        ttl = self._exchange("HEAD", "/" + _quote(_check_key(key)))[0].get("Beaver-TTL")
        return None if ttl is None else float(ttl)

    def __iter__(self):
        return iter(self._summary("keys")["keys"])

    def keys(self) -> list:
        """A snapshot list of the live keys, in key order."""
        return list(self)

    def items(self) -> list:
        """A snapshot list of live ``(key, value)`` pairs, in key order."""
        return [(k, self._value(v)) for k, v in self._summary("items")["items"]]

    def values(self) -> list:
        """A snapshot list of the live values, in key order."""
        return [v for _, v in self.items()]


class RemoteList(_RemoteManager, MutableSequence):
    """``db.list(name)`` over HTTP."""

    _kind, _route = "list", "lists"

    def __getitem__(self, index):
        if isinstance(index, slice):
            query = {"start": index.start, "stop": index.stop, "step": index.step}
            return [self._value(v) for v in self._call("GET", "/slice", query)]
        return self._codec.decode(self._send("GET", f"/items/{_list_index(index)}"))

    def __setitem__(self, index, value):
        if isinstance(index, slice):
            query = {"start": index.start, "stop": index.stop, "step": index.step}
            body = "[" + ",".join(self._codec.encode(v) for v in value) + "]"
            self._send("PUT", "/slice", query, body)
            return
        self._send("PUT", f"/items/{_list_index(index)}", body=self._codec.encode(value))

    def __delitem__(self, index):
        if isinstance(index, slice):
            self._send("DELETE", "/slice", {"start": index.start, "stop": index.stop,
                                            "step": index.step})
            return
        self._send("DELETE", f"/items/{_list_index(index)}")

    def __len__(self):
        return self._summary()["size"]

    def __iter__(self):
        return iter([self._value(v) for v in self._summary("items")["items"]])

    def __reversed__(self):
        return reversed(list(self))

    def push(self, value):
        """Append ``value`` at the end (``append`` is the same)."""
        self._send("POST", "/push", body=self._codec.encode(value))

    append = push

    def prepend(self, value):
        """Insert ``value`` at the front."""
        self._send("POST", "/prepend", body=self._codec.encode(value))

    def extend(self, values):
        """Append every item of ``values`` in one transaction."""
        self._send("POST", "/extend", body="[" + ",".join(map(self._codec.encode, values)) + "]")

    def __iadd__(self, values):
        self.extend(values)
        return self

    def insert(self, index, value):
        """Insert ``value`` before ``index`` (Python semantics)."""
        self._send("POST", "/insert", {"index": _list_index(index)}, self._codec.encode(value))

    def pop(self, index=None):
        """Remove and return the item at ``index`` (default: the last; ``None`` if empty)."""
        query = None if index is None else {"index": _list_index(index)}
        return self._optional(*self._exchange("POST", "/pop", query))

    def deque(self):
        """Remove and return the first item, or ``None`` if the list is empty."""
        return self._optional(*self._exchange("POST", "/deque"))

    popleft = deque

    def _optional(self, headers, data):
        return None if headers.get("Beaver-Empty") else self._codec.decode(data)

    def reverse(self):
        """Reverse the list in place, in one transaction."""
        self._send("POST", "/reverse")


def _lease_id(item):
    lease_id = getattr(item, "lease_id", None)
    if lease_id is None:
        raise TypeError("ack() and nack() take an item returned by get(lease=...)")
    return lease_id


def _list_index(index) -> int:
    if isinstance(index, bool) or not hasattr(index, "__index__"):
        raise TypeError(f"list indices must be integers or slices, not {type(index).__name__}")
    return index.__index__()


class RemoteQueue(_RemoteManager):
    """``db.queue(name)`` over HTTP. A blocking ``get`` waits in chunks on the server."""

    _kind, _route = "queue", "queues"

    def put(self, data, priority=0):
        """Add ``data``; lower ``priority`` numbers come out first, FIFO among equals."""
        if isinstance(priority, bool) or not isinstance(priority, (int, float)):
            raise TypeError(f"priority must be a number, not {priority!r}")
        self._send("POST", "/put", {"priority": priority}, self._codec.encode(data))

    def get(self, block=True, timeout=None, lease=None) -> QueueItem:
        """Remove and return the first item (``QueueEmpty``/``TimeoutError`` as locally).

        With ``lease=seconds`` the item returns to the queue unless ``ack(item)`` is called
        in time: the safe way to take work over a network that may drop a response.
        """
        deadline = _Deadline(_seconds(timeout, "timeout", wait=True))
        query = {"block": block, "lease": _seconds(lease, "lease", positive=True)}
        while True:
            wait = deadline.remaining(cap=_CHUNK_WAIT) if block else 0.0
            try:
                item = self._call("POST", "/get", {**query, "timeout": wait}, wait=wait)
            except Timeout:
                if deadline.expired:
                    raise
                continue
            return self._item(item)

    def _item(self, item):
        if "lease_id" not in item:
            return QueueItem(item["priority"], item["timestamp"], self._value(item["data"]))
        leased = LeasedItem(item["priority"], item["timestamp"], self._value(item["data"]))
        leased.lease_id = item["lease_id"]
        return leased

    def ack(self, item) -> bool:
        """Finish an item taken with ``get(lease=...)``; False if its lease had run out."""
        return self._call("POST", "/ack", {"lease_id": _lease_id(item)})

    def nack(self, item) -> bool:
        """Give a leased item back to the queue now; False if its lease had run out."""
        return self._call("POST", "/nack", {"lease_id": _lease_id(item)})

    def peek(self):
        """The item ``get`` would return next, without removing it; ``None`` if empty."""
        item = self._call("GET", "/peek")
        return None if item is None else self._item(item)

    def __iter__(self):
        return iter([self._item(i) for i in self._summary("items")["items"]])


class RemoteBlobs(_RemoteManager):
    """``db.blobs(name)`` over HTTP: bytes travel raw, metadata in a header."""

    _kind, _route = "blob", "blobs"

    def put(self, key, data, metadata=None):
        """Store the bytes ``data`` under ``key``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob data must be bytes-like, not {type(data).__name__}")
        headers = {"Content-Type": "application/octet-stream"}
        if metadata is not None:
            headers["Beaver-Metadata"] = json.dumps(json.loads(self._codec.encode(metadata)))
        self._send("PUT", "/" + _quote(_check_key(key)), body=bytes(data), headers=headers)

    def get(self, key):
        """The ``Blob`` stored under ``key``, or ``None``."""
        try:
            headers, data = self._exchange("GET", "/" + _quote(_check_key(key)))
        except KeyError:
            return None
        meta = headers.get("Beaver-Metadata")
        return Blob(key, data, None if meta is None else self._codec.decode(meta))

    def __getitem__(self, key):
        blob = self.get(key)
        if blob is None:
            raise KeyError(key)
        return blob

    def __setitem__(self, key, data):
        self.put(key, data)

    def delete(self, key):
        """Remove the blob under ``key``; ``KeyError`` if there is none."""
        self._send("DELETE", "/" + _quote(_check_key(key)))

    __delitem__ = delete

    def __contains__(self, key):
        if not isinstance(key, str):
            return False
        try:
            self._send("HEAD", "/" + _quote(key))
        except KeyError:
            return False
        return True

    def __iter__(self):
        return iter(self._summary("keys")["keys"])

    def keys(self) -> list:
        """A snapshot list of the keys, in key order."""
        return list(self)


class RemoteLock:
    """``db.lock(name)`` over HTTP: the server holds the lock on this object's behalf."""

    def __init__(self, client, name, timeout=None, ttl=60.0):
        self._http = client._http
        self.name = _check_name(name)
        self.timeout = _seconds(timeout, "timeout", wait=True)
        self.ttl = _seconds(ttl, "ttl", positive=True)
        if self.ttl is None:
            raise TypeError("a lock needs a ttl (seconds or a timedelta)")
        self._base = f"/locks/{_quote(name)}"
        self._token = None
        self._guard = threading.Lock()

    def _call(self, suffix, query=None, method="POST", wait=0.0):
        status, _, data = self._http.request(method, self._base + suffix, query, wait=wait)
        if status >= 400:
            _raise_remote(status, data)
        return json.loads(data) if data else None

    @property
    def token(self):
        """The fencing token of the current hold (``None`` when not held)."""
        return self._token

    @property
    def held(self) -> bool:
        """True while this object holds the lock (and its TTL has not run out)."""
        return self._token is not None and self._call("", {"token": self._token}, "GET")["held"]

    @property
    def locked(self) -> bool:
        """True while anybody holds the lock."""
        return self._call("", method="GET")["locked"]

    def acquire(self, timeout=None, block=True):
        """Wait for the lock (up to ``timeout`` s) and take it; ``LockTimeout`` otherwise."""
        timeout = self.timeout if timeout is None else _seconds(timeout, "timeout", wait=True)
        deadline = _Deadline(timeout if block else 0.0)
        if not self._guard.acquire(timeout=-1 if timeout is None else timeout):
            raise LockTimeout(f"lock {self.name!r} is held by another thread of this object")
        try:
            while True:
                wait = deadline.remaining(cap=_CHUNK_WAIT)
                try:
                    held = self._call("/acquire", {"timeout": wait, "ttl": self.ttl}, wait=wait)
                    break
                except LockTimeout:
                    if deadline.expired:
                        raise
        except BaseException:
            self._guard.release()
            raise
        self._token = held["token"]
        return _Held(self, self)

    def release(self):
        """Give the lock to the next waiter. ``LockLost`` if the TTL had already run out."""
        if self._token is None:
            raise LockLost(f"lock {self.name!r} is not held by this object")
        token, self._token = self._token, None
        try:
            self._call("/release", {"token": token})
        finally:
            self._guard.release()

    def renew(self, ttl=None):
        """Extend the hold to ``ttl`` (default: the lock's ttl) seconds from now."""
        if self._token is None:
            raise LockLost(f"lock {self.name!r} is not held by this object")
        ttl = self.ttl if ttl is None else _seconds(ttl, "ttl", positive=True)
        try:
            self._call("/renew", {"token": self._token, "ttl": ttl})
        except LockLost:
            self._token = None          # the hold ran out: this object may acquire again
            self._guard.release()
            raise

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return f"<RemoteLock {self.name!r} {'held' if self._token else 'free'}>"


class RemoteLog(_RemoteManager):
    """``db.log(name)`` over HTTP; ``live()`` follows a server-sent event stream."""

    _kind, _route = "log", "logs"

    def log(self, data, timestamp=None):
        """Append ``data`` at ``timestamp`` (a datetime or epoch seconds; default now)."""
        when = None if timestamp is None else _epoch(timestamp)
        self._send("POST", "/log", {"timestamp": when}, self._codec.encode(data))

    def _entries(self, rows):
        return [LogEntry(_utc(row["timestamp"]), self._value(row["data"])) for row in rows]

    def range(self, start=None, end=None) -> list:
        """Entries with ``start <= timestamp <= end`` (either may be None), oldest first."""
        query = {"start": None if start is None else _epoch(start, "start"),
                 "end": None if end is None else _epoch(end, "end")}
        return self._entries(self._call("GET", "/range", query))

    def __iter__(self):
        return iter(self.range())

    def live(self, window, period, aggregator=list) -> "_RemoteStream":
        """``aggregator(values in the last window)`` now and every ``period`` (an iterator)."""
        if not callable(aggregator):
            raise TypeError("aggregator must be callable")
        query = {"window": _seconds(window, "window"),
                 "period": _seconds(period, "period", positive=True)}
        decode = self._value
        return _RemoteStream(self._http, self._base + "/live", query,
                             lambda text: aggregator([decode(v) for v in json.loads(text)]))

    def as_async(self) -> "_AsyncRemoteManager":
        """An awaitable twin; ``async for summary in alog.live(...)`` works."""
        return _AsyncRemoteManager(self)


class _RemoteStream:
    """A server-sent event stream read by a thread; iterate it, ``close()`` it when done."""

    def __init__(self, http, path, query, decode):
        self._decode = decode
        self._inbox: _queue.SimpleQueue = _queue.SimpleQueue()
        self._closed = False
        self._conn, response = http.stream(path, query)
        http.streams.add(self)
        self._reader = threading.Thread(target=self._read, args=(response,), daemon=True,
                                        name="beaver-client-stream")
        self._reader.start()

    def _read(self, response):
        data = []
        try:
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif not line and data:
                    self._inbox.put("\n".join(data))
                    data = []
        except (OSError, ValueError, AttributeError):
            pass
        self._inbox.put(_MISSING)

    def get(self, timeout=None):
        """The next event; ``TimeoutError`` after ``timeout`` seconds without one."""
        try:
            text = self._inbox.get(timeout=_seconds(timeout, "timeout", wait=True))
        except _queue.Empty:
            raise Timeout(f"nothing arrived within {timeout}s") from None
        if text is _MISSING:
            self._inbox.put(_MISSING)
            if self._closed:
                raise ClosedError("the stream is closed")
            raise RemoteError("the server ended the stream")
        return self._decode(text)

    def listen(self, timeout=None):
        """Yield events until ``close()`` (``TimeoutError`` after ``timeout`` s of silence)."""
        while True:
            try:
                yield self.get(timeout)
            except ClosedError:
                return

    def __iter__(self):
        return self.listen()

    def __next__(self):
        try:
            return self.get()
        except ClosedError:
            raise StopIteration from None

    def as_async(self) -> "_AsyncRemoteStream":
        return _AsyncRemoteStream(self)

    def close(self):
        """Stop the stream; a ``listen()`` in progress ends."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._conn.sock and self._conn.sock.shutdown(2)
            self._conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _RemoteEventHandle:
    """Returned by a remote manager's ``on(...)``; ``off()`` stops listening."""

    def __init__(self, stream, event, callback):
        self.event, self.callback = event, callback
        self._stream = stream
        self._thread = threading.Thread(target=self._dispatch, daemon=True,
                                        name="beaver-client-events")
        self._thread.start()

    def _dispatch(self):
        for payload in self._stream.listen():
            try:
                self.callback(payload)
            except Exception:   # one failing callback must not stop the others
                logger.exception("event callback %r failed", self.callback)

    @property
    def active(self) -> bool:
        return not self._stream.closed

    def off(self):
        """Stop delivering events to this callback (idempotent)."""
        self._stream.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


class _AsyncRemoteStream:
    """The asyncio face of a remote stream: ``async for`` / ``await get()`` / ``async with``."""

    def __init__(self, stream):
        self._stream = stream

    async def get(self, timeout=None):
        """The next event; ``TimeoutError`` after ``timeout`` seconds without one."""
        return await asyncio.to_thread(self._stream.get, timeout)

    async def listen(self, timeout=None):
        """Yield events until ``close()`` (``TimeoutError`` after ``timeout`` s of silence)."""
        while True:
            try:
                yield await self.get(timeout)
            except ClosedError:
                return

    def __aiter__(self):
        return self.listen()

    async def __anext__(self):
        try:
            return await self.get()
        except ClosedError:
            raise StopAsyncIteration from None

    def close(self):
        """Stop the stream; a ``listen()`` in progress ends."""
        self._stream.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


class _AsyncRemoteManager(AsyncManager):
    """Awaitable twin of a remote channel or log: streams become async iterators."""

    def subscribe(self) -> _AsyncRemoteStream:
        """``async with achannel.subscribe() as sub: async for message in sub.listen(): ...``"""
        return self._sync.subscribe().as_async()

    def live(self, window, period, aggregator=list) -> _AsyncRemoteStream:
        """``async for summary in alog.live(window, period, aggregator): ...``"""
        return self._sync.live(window, period, aggregator).as_async()


class RemoteChannel(_RemoteManager):
    """``db.channel(name)`` over HTTP; subscriptions are server-sent event streams."""

    _kind, _route = "channel", "channels"

    def publish(self, payload):
        """Send ``payload`` to every subscriber."""
        self._send("POST", "/publish", body=self._codec.encode(payload))

    def subscribe(self) -> _RemoteStream:
        """A subscription receiving every message published once this call has returned.

            >>> with client.channel("chat").subscribe() as sub:
            ...     for message in sub.listen(timeout=5):
            ...         print(message)
        """
        return _RemoteStream(self._http, self._base + "/sse", None, self._codec.decode)

    def history(self, limit=None) -> list:
        """The retained messages, oldest first (the last ``limit`` ones if given)."""
        return [self._value(m) for m in self._call("GET", "/history", {"limit": limit})]

    def as_async(self) -> _AsyncRemoteManager:
        """An awaitable twin; ``async for message in achannel.subscribe().listen()`` works."""
        return _AsyncRemoteManager(self)


class RemoteCollection(_RemoteManager):
    """``db.collection(name)`` over HTTP: documents, full-text, fuzzy, vector and graph search."""

    _kind, _route = "collection", "collections"

    def _configure(self, metric, options):
        """Create the collection with ``metric``/``options`` (ValueError if it differs)."""
        self._call("PUT", "", body=_json_dumps({"metric": metric, "options": options}))

    @property
    def metric(self) -> str:
        """The vector distance of this collection: 'l2', 'cosine' or 'ip'."""
        return self._summary()["metric"]

    def _document(self, data) -> "Document":
        doc = Document.from_dict({**data, "body": None})
        doc.body = None if data.get("body") is None else self._value(data["body"])
        return doc

    def _doc_json(self, document) -> dict:
        body = None if document.body is None else json.loads(self._codec.encode(document.body))
        return {"id": document.id, "embedding": document.embedding, "body": body}

    def index(self, document, fts=True, fuzzy=False):
        """Insert or replace ``document`` (text index and vector included); returns it."""
        if not isinstance(document, Document):
            raise TypeError(f"index() takes a Document, not {type(document).__name__}")
        self._call("POST", "/index", body=_json_dumps(
            {**self._doc_json(document), "fts": fts, "fuzzy": fuzzy}))
        return document

    def get(self, doc_id, default=None):
        """The document with ``doc_id``, or ``default``."""
        try:
            return self[doc_id]
        except KeyError:
            return default

    def __getitem__(self, doc_id):
        return self._document(self._call("GET", "/documents/" + _quote(_doc_id(doc_id))))

    def __contains__(self, document):
        try:
            self._send("HEAD", "/documents/" + _quote(_doc_id(document)))
        except (KeyError, TypeError):
            return False
        return True

    def drop(self, document):
        """Remove a document (a ``Document`` or an id), its vector and its edges."""
        self._send("DELETE", "/documents/" + _quote(_doc_id(document)))

    __delitem__ = drop

    def __iter__(self):
        return iter([self._document(d) for d in self._summary("items")["items"]])

    def _hits(self, rows):
        return [(self._document(r["document"]), r["score"], r["snippet"]) if "snippet" in r
                else (self._document(r["document"]), r["score"]) for r in rows]

    def match(self, query, on=None, top_k=10, fuzziness=0, raw=False, highlight=False):
        """Full-text search: ``[(Document, score)]``, best first (as ``BeaverDB``)."""
        return self._hits(self._call("POST", "/match", body=_json_dumps({
            "query": query, "on": [on] if isinstance(on, str) else on, "top_k": top_k,
            "fuzziness": fuzziness, "raw": raw, "highlight": highlight})))

    def search(self, vector, top_k=10, where=None) -> list:
        """Nearest documents to ``vector``: ``[(Document, distance)]``, closest first."""
        return self._hits(self._call("POST", "/search", body=_json_dumps(
            {"vector": _as_vector(vector), "top_k": top_k, "where": where})))

    def connect(self, source, target, label, metadata=None):
        """Add (or update) the edge ``source -[label]-> target``."""
        self._call("POST", "/connect", body=_json_dumps({
            "source": _doc_id(source), "target": _doc_id(target), "label": label,
            "metadata": _to_jsonable(metadata)}))

    def disconnect(self, source, target, label=None):
        """Remove the edges from ``source`` to ``target`` (only ``label`` ones if given)."""
        self._call("POST", "/disconnect", body=_json_dumps(
            {"source": _doc_id(source), "target": _doc_id(target), "label": label}))

    def edges(self, document, direction="outgoing", label=None) -> list:
        """The ``Edge``s leaving, entering or touching ``document``."""
        rows = self._call("GET", "/edges", {"id": _doc_id(document), "direction": direction,
                                            "label": label})
        return [Edge(**row) for row in rows]

    def neighbors(self, document, label=None, direction="outgoing") -> list:
        """The documents one edge away, in id order."""
        rows = self._call("GET", "/neighbors", {"id": _doc_id(document), "label": label,
                                                "direction": direction})
        return [self._document(d) for d in rows]

    def walk(self, source, labels=None, depth=1, direction="outgoing") -> list:
        """Documents reachable in 1..``depth`` edges, breadth first (the source excluded)."""
        rows = self._call("POST", "/walk", body=_json_dumps({
            "source": _doc_id(source), "labels": [labels] if isinstance(labels, str) else labels,
            "depth": depth, "direction": direction}))
        return [self._document(d) for d in rows]

    def compact(self):
        """Fold pending changes of the server's vector index into its base."""
        self._call("POST", "/compact")


class BeaverClient:
    """A ``BeaverDB`` look-alike that talks to a beaver server: change one line to go remote.

        >>> db = BeaverClient("http://127.0.0.1:8000", token="s3cret")   # was BeaverDB("app.db")
        >>> db.dict("app_config")["theme"] = "dark"
        >>> db.queue("jobs").get(timeout=5).data

    Each thread keeps one keep-alive connection. Errors are the same classes ``BeaverDB``
    raises (``KeyError``, ``IndexError``, ``TimeoutError``, ``LockTimeout``...); transport
    failures raise ``RemoteError``, a wrong token ``Unauthorized``. Events (``.on()``),
    channel subscriptions and live views stream as server-sent events. Not available
    remotely: ``transaction()``.
    """

    def __init__(self, url, token=None, *, timeout=60.0):
        self._http = _Http(url, token, timeout)
        self._managers = _Managers()
        self._closed = False

    @property
    def url(self) -> str:
        return self._http.url

    def _manager(self, cls, name, model=None):
        if self._closed:
            raise ClosedError("the client is closed")
        return self._managers.get(cls, name, model, lambda: cls(self, name, model))

    def dict(self, name, model=None) -> RemoteDict:
        """The remote dict called ``name``."""
        return self._manager(RemoteDict, name, model)

    def list(self, name, model=None) -> RemoteList:
        """The remote list called ``name``."""
        return self._manager(RemoteList, name, model)

    def queue(self, name, model=None) -> RemoteQueue:
        """The remote priority queue called ``name``."""
        return self._manager(RemoteQueue, name, model)

    def blobs(self, name, model=None) -> RemoteBlobs:
        """The remote blob store called ``name``."""
        return self._manager(RemoteBlobs, name, model)

    blob = blobs

    def log(self, name, model=None) -> RemoteLog:
        """The remote time-indexed log called ``name``."""
        return self._manager(RemoteLog, name, model)

    def channel(self, name, model=None) -> RemoteChannel:
        """The remote pub/sub channel called ``name``."""
        return self._manager(RemoteChannel, name, model)

    def collection(self, name, model=None, metric=None, **options) -> RemoteCollection:
        """The remote document collection called ``name`` (``metric`` fixed at creation)."""
        manager = self._manager(RemoteCollection, name, model)
        if metric is not None or options:
            manager._configure(metric, options)
        return manager

    def lock(self, name, timeout=None, ttl=60.0, lock_ttl=None) -> RemoteLock:
        """A new remote inter-process lock object on ``name``."""
        ttl = lock_ttl if lock_ttl is not None else ttl
        return RemoteLock(self, name, timeout=timeout, ttl=ttl)

    def _get(self, path, query=None, sink=None):
        """The body of a GET (or, with ``sink``, its headers after streaming the body)."""
        status, headers, data = self._http.request("GET", path, query, sink=sink)
        if status >= 400:
            _raise_remote(status, data)
        return data if sink is None else headers

    def info(self) -> dict:
        """Every structure on the server: kind, name and size."""
        return json.loads(self._get("/info"))

    def dump(self, fp, names=None) -> int:
        """Write the server's database (or the structures in ``names``) as JSON lines."""
        import codecs
        decoder = codecs.getincrementaldecoder("utf-8")()
        headers = self._get("/dump", {"names": ",".join(names) if names else None},
                            sink=lambda chunk: fp.write(decoder.decode(chunk)))
        fp.write(decoder.decode(b"", final=True))
        return int(headers.get("Beaver-Structures", 0))

    def load(self, fp, mode="append") -> int:
        """Send a JSON-lines dump to the server, loaded there in one transaction."""
        text = fp.read()
        body = text.encode("utf-8") if isinstance(text, str) else text
        status, _, data = self._http.request("POST", "/load", {"mode": mode}, body,
                                             {"Content-Type": "application/x-ndjson"})
        if status >= 400:
            _raise_remote(status, data)
        return json.loads(data)["structures"]

    def backup(self, path) -> str:
        """Download a consistent copy of the server's database file to ``path``."""
        target = os.path.abspath(os.fspath(path))
        partial = target + ".part"
        try:
            with open(partial, "wb") as f:
                self._get("/backup", sink=f.write)
            os.replace(partial, target)
        finally:
            with contextlib.suppress(OSError):
                os.remove(partial)
        return target

    def transaction(self):
        raise FeatureUnavailable("transactions are not available through BeaverClient")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self):
        """Close every connection this client opened."""
        self._closed = True
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<BeaverClient {self._http.url!r}{' closed' if self._closed else ''}>"


# ==========================================================================================
# Alias modules: ``from beaver.queues import QueueItem`` and friends
# ==========================================================================================

_ALIASES = {
    "manager": ["AsyncManager", "DictManager", "ListManager", "QueueManager", "BlobManager",
                "LogManager", "ChannelManager"],
    "dicts": ["DictManager"],
    "lists": ["ListManager"],
    "queues": ["QueueItem", "LeasedItem", "QueueManager"],
    "logs": ["LogManager", "LogEntry", "LiveView"],
    "channels": ["ChannelManager", "Subscriber"],
    "blobs": ["Blob", "BlobManager"],
    "locks": ["Lock", "LockTimeout"],
    "collections": ["Document", "CollectionManager", "Edge", "rerank"],
}


def _register_aliases():
    for sub, names in _ALIASES.items():
        module = types.ModuleType(f"{__name__}.{sub}", f"Alias of beaver's {sub} names.")
        for name in names:
            setattr(module, name, globals()[name])
        sys.modules[module.__name__] = module
        globals().setdefault(sub, module)  # so ``import beaver.queues`` binds beaver.queues


_register_aliases()
# ==========================================================================================
# Import from the public beaver-db package: import_upstream(OLD, NEW)
# ==========================================================================================
#
# The public ``beaver-db`` package keeps the same kinds of structures in other tables, learned
# from files it wrote (scripts/make_upstream_fixtures.py): 1.x names them ``beaver_NAME``,
# 2.x ``__beaver_NAME__``, and every row carries its structure's name:
#   dicts (dict_name, key, value JSON, expires_at epoch), lists (list_name, item_order: REAL
#   in 1.x, text in 2.x, in order either way, item_value), priority_queues (queue_name,
#   priority, timestamp, data), blobs (store_name, key, data, metadata), logs (log_name,
#   timestamp, data), pubsub_log (channel_name, timestamp, message_payload), edges
#   (collection, source_item_id, target_item_id, label, metadata). Documents: 1.x
#   beaver_collections (collection, item_id, item_vector float32, metadata); 2.x
#   __beaver_documents__ (collection, item_id, data) and __beaver_vectors__ (collection,
#   item_id, vector, metadata): the documents, vectors and graph of one name become one
#   beaver collection (a vector without a document becomes a document, its metadata the body).
# Text and vector indexes are derived (beaver builds its own); locks and event notifications
# are transient; sketches and encrypted dicts have no beaver counterpart: reported, not copied.

_UPSTREAM_TABLES = ("dicts", "lists", "priority_queues", "blobs", "logs", "pubsub_log",
                    "collections", "documents", "vectors", "edges", "sketches", "lock_waiters",
                    "manager_versions", "fts_index", "trigrams", "vector_change_log",
                    "collection_versions", "field_index", "field_index_manifest",
                    "lsh_config", "lsh_index")
_UPSTREAM_INTERNAL_DICTS = {"__metadata__", "__security__", "__events__"}   # + __beaver_*__

# kind -> (upstream table, name column, columns, order within a structure, row -> dump item)
_UPSTREAM_KINDS = {
    "list": ("lists", "list_name", "item_value", "item_order",
             lambda row: json.loads(row[0])),
    "queue": ("priority_queues", "queue_name", "priority, timestamp, data",
              "priority, timestamp, rowid",
              lambda row: {"priority": row[0], "timestamp": row[1], "data": json.loads(row[2])}),
    "blob": ("blobs", "store_name", "key, data, metadata", "key",
             lambda row: {"key": row[0], "data": base64.b64encode(row[1]).decode("ascii"),
                          "metadata": None if row[2] is None else json.loads(row[2])}),
    "log": ("logs", "log_name", "timestamp, data", "timestamp",
            lambda row: {"timestamp": row[0], "data": json.loads(row[1])}),
    "channel": ("pubsub_log", "channel_name", "timestamp, message_payload", "timestamp",
                lambda row: {"timestamp": row[0], "payload": json.loads(row[1])}),
}


def _is_event_channel(name) -> bool:
    """The channels where beaver-db 1.x (``__beaver_events__``) and 2.x keep notifications."""
    return name == "__beaver_events__" or (name.startswith("__events_") and name.endswith("__"))


class _UpstreamFile:
    """A beaver-db 1.x / 2.x file opened read-only; its structures as ``dump()`` items."""

    def __init__(self, path):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path!r}")
        from urllib.request import pathname2url
        # No -wal file means nobody has it open: immutable=1 then reads it without creating
        # the -wal and -shm files a read-only WAL connection would leave behind.
        flags = "mode=ro" if os.path.exists(path + "-wal") else "mode=ro&immutable=1"
        self.conn = sqlite3.connect(f"file:{pathname2url(os.path.abspath(path))}?{flags}",
                                    uri=True, isolation_level=None)
        try:
            self.conn.execute("BEGIN")          # one snapshot for the whole read
            self.version = _upstream_version(self.conn)
            self.tables = [row[0] for row in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise SchemaError(f"{path!r} is not a SQLite database ({e})") from None
        if self.version is None:
            self.conn.close()
            raise SchemaError(f"{path!r} is a beaver database already: open it with BeaverDB"
                              if "beaver_meta" in self.tables else
                              f"{path!r} holds no beaver-db 1.x or 2.x tables")
        self.skipped: dict = {}
        # 1.x searches by squared euclidean distance (the ranking of "l2"), 2.x by cosine
        self.metric = "l2" if self.version == "1.x" else "cosine"

    def close(self):
        self.conn.close()

    def name_of(self, base) -> str:
        """The name of the upstream table ``base`` ('dicts'...) in this file's version."""
        return f"beaver_{base}" if self.version == "1.x" else f"__beaver_{base}__"

    def table(self, base):
        """The quoted name of the upstream table ``base``, or None if the file lacks it."""
        name = self.name_of(base)
        return f'"{name}"' if name in self.tables else None

    def rows(self, sql, params=()):
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as e:
            raise SchemaError(f"{self.path!r} is not laid out as beaver-db {self.version} "
                              f"writes it: {e}") from None

    def skip(self, what, name, count=1):
        """Record ``count`` items of structure ``name`` that are not copied, under ``what``."""
        names = self.skipped.setdefault(what, {})
        names[name] = names.get(name, 0) + count

    def unknown_tables(self) -> list:
        """Tables that are not beaver-db's (nor SQLite's, nor its text index's shadows)."""
        known = {self.name_of(base) for base in _UPSTREAM_TABLES}
        shadows = self.name_of("fts_index") + "_"
        return [name for name in self.tables
                if name not in known and not name.startswith(("sqlite_", shadows))]

    def upstream_release(self):
        """The package version a 1.x file records (its ``__metadata__`` dict), else None."""
        dicts = self.table("dicts")
        row = dicts and self.rows(f"SELECT value FROM {dicts} WHERE dict_name = '__metadata__' "
                                  "AND key = 'version'").fetchone()
        return json.loads(row[0]) if row else None

    # -- structures: (kind, name, items, edges) ------------------------------------------------

    def structures(self):
        yield from self._dicts()
        for kind in _UPSTREAM_KINDS:
            yield from self._simple(kind)
        yield from self._collections()
        for base, column, what in (("sketches", "name", "sketches"),
                                   ("lock_waiters", "lock_name", "locks")):
            for name, rows in self._grouped(base, "1", column, "1"):
                self.skip(what, name, sum(1 for _ in rows))

    def _grouped(self, base, columns, name_column, order):
        table = self.table(base)
        if table is None:
            return iter(())
        rows = self.rows(f"SELECT {name_column}, {columns} FROM {table} "
                         f"ORDER BY {name_column}, {order}")
        return ((name, (row[1:] for row in group))
                for name, group in itertools.groupby(rows, operator.itemgetter(0)))

    def _dicts(self):
        encrypted = set()
        dicts = self.table("dicts")
        if dicts:
            encrypted = {row[0] for row in self.rows(
                f"SELECT key FROM {dicts} WHERE dict_name = '__security__'")}
        now = _now()
        for name, rows in self._grouped("dicts", "key, value, expires_at", "dict_name", "key"):
            if name in encrypted:
                self.skip("encrypted_dicts", name, sum(1 for _ in rows))
            elif name not in _UPSTREAM_INTERNAL_DICTS and not (
                    name.startswith("__beaver_") and name.endswith("__")):
                yield "dict", name, self._live_items(name, rows, now), ()

    def _live_items(self, name, rows, now):
        for key, value, expires_at in rows:
            if expires_at is not None and expires_at <= now:
                self.skip("expired_keys", name)
            else:
                yield {"key": key, "value": json.loads(value), "expires_at": expires_at}

    def _simple(self, kind):
        base, name_column, columns, order, item = _UPSTREAM_KINDS[kind]
        for name, rows in self._grouped(base, columns, name_column, order):
            if kind == "channel" and _is_event_channel(name):
                self.skip("event_messages", name, sum(1 for _ in rows))
            else:
                yield kind, name, map(item, rows), ()

    def _collections(self):
        tables = [t for t in map(self.table, ("collections", "documents", "vectors", "edges"))
                  if t]
        if not tables:
            return
        union = " UNION ".join(f"SELECT collection FROM {table}" for table in tables)
        for (name,) in self.rows(f"SELECT * FROM ({union}) ORDER BY 1").fetchall():
            yield "collection", name, self._documents(name), self._edges(name)

    def _documents(self, name):
        """Document dicts plus their ``fts`` setting; placeholders for bare edge ends last."""
        fts_paths = self._fts_paths(name)
        for doc_id, vector, body, lost in self.rows(*self._document_query(name)):
            if lost is not None:
                self.skip("vector_metadata", name)
            paths = True if fts_paths is None else tuple(sorted(fts_paths.get(doc_id, ()))) \
                or False
            yield {"id": doc_id, "embedding": _unpack_vector(vector),
                   "body": None if body is None else json.loads(body), "fts": paths}
        for doc_id in self._edge_ends_without_document(name):
            self.skip("placeholder_documents", name)
            yield {"id": doc_id, "embedding": None, "body": None, "fts": False}

    def _document_query(self, name):
        """SQL (id, vector, body JSON, vector metadata with no place) and its parameters."""
        if self.version == "1.x":
            return (f"SELECT item_id, item_vector, metadata, NULL FROM "
                    f"{self.table('collections')} WHERE collection = ?", (name,))
        docs, vectors = self.table("documents"), self.table("vectors")
        if vectors is None:
            return f"SELECT item_id, NULL, data, NULL FROM {docs} WHERE collection = ?", (name,)
        bare = f"SELECT item_id, vector, metadata, NULL FROM {vectors} v WHERE collection = ?"
        if docs is None:
            return bare, (name,)
        return (f"SELECT d.item_id, v.vector, d.data, v.metadata FROM {docs} d LEFT JOIN "
                f"{vectors} v ON v.collection = d.collection AND v.item_id = d.item_id "
                f"WHERE d.collection = ? UNION ALL {bare} AND NOT EXISTS (SELECT 1 FROM "
                f"{docs} d WHERE d.collection = v.collection AND d.item_id = v.item_id)",
                (name, name))

    def _fts_paths(self, name):
        """{doc id: the field paths upstream indexed as text}; None without a text index."""
        fts = self.table("fts_index")
        if fts is None:
            return None
        paths: dict = {}
        for doc_id, path in self.rows(
                f"SELECT item_id, field_path FROM {fts} WHERE collection = ?", (name,)):
            paths.setdefault(doc_id, set()).add(path)
        return paths

    def _edge_ends_without_document(self, name) -> list:
        edges = self.table("edges")
        if edges is None:
            return []
        have = " UNION ".join(f"SELECT item_id FROM {table} WHERE collection = ?1"
                              for table in (self.table("collections"), self.table("documents"),
                                            self.table("vectors")) if table) or "SELECT NULL"
        return [row[0] for row in self.rows(
            f"SELECT id FROM (SELECT source_item_id AS id FROM {edges} WHERE collection = ?1 "
            f"UNION SELECT target_item_id FROM {edges} WHERE collection = ?1) "
            f"WHERE id NOT IN ({have}) ORDER BY 1", (name,))]

    def _edges(self, name):
        edges = self.table("edges")
        if edges is None:
            return iter(())
        return ({"source": s, "target": t, "label": label,
                 "metadata": None if meta is None else json.loads(meta)}
                for s, t, label, meta in self.rows(
                    f"SELECT source_item_id, target_item_id, label, metadata FROM {edges} "
                    "WHERE collection = ? ORDER BY source_item_id, label, target_item_id",
                    (name,)))


def _copy_structure(db, kind, name, items, edges, metric):
    """Write (or, without ``db``, only count) one structure: its item count."""
    if kind == "collection":
        manager = None if db is None else db.collection(name, metric=metric)
        return _copy_collection(manager, items, edges, metric)
    manager = None if db is None else getattr(db, _STRUCTURES[kind][1])(name)
    count = 0
    for batch in _chunks(items, _LOAD_BATCH):
        count += len(batch)
        if manager is not None:
            manager._load_items(batch)
    return count


def _copy_collection(manager, documents, edges, metric) -> dict:
    """Index the documents (each as upstream indexed its text), then connect the edges."""
    counts = {"documents": 0, "vectors": 0, "edges": 0, "metric": metric}
    for batch in _chunks(documents, _LOAD_BATCH):
        counts["documents"] += len(batch)
        counts["vectors"] += sum(item["embedding"] is not None for item in batch)
        by_fts: dict = {}
        for item in batch:
            by_fts.setdefault(item["fts"], []).append(Document.from_dict(item))
        for fts, group in by_fts.items():
            if manager is not None:
                manager.index_many(group, fts=fts)
    for edge in edges:
        counts["edges"] += 1
        if manager is not None:
            manager.connect(edge["source"], edge["target"], edge["label"], edge["metadata"])
    return counts


def import_upstream(old, new, dry_run=False) -> dict:
    """Copy a database of the public ``beaver-db`` 1.x or 2.x package into a new beaver file.

        >>> report = beaver.import_upstream("old.db", "new.db")
        >>> report["structures"]["dict"]
        {'app_config': 4}

    Every structure is copied: dicts (live keys, with their expiry), lists in order, queues
    with priorities, blobs with metadata, logs with timestamps, collections with documents,
    vectors and edges, channel history. ``old`` is opened read-only and never changed;
    ``new`` must not exist (it is created, and removed again if the import fails: nothing is
    half-written). ``dry_run=True`` reads everything and writes nothing. The report counts
    what is copied per structure, what is ``skipped`` (expired keys, encrypted dicts,
    sketches, locks, event notifications...) and the ``unknown_tables`` of the file.
    """
    old, new = os.fspath(old), os.fspath(new)
    source = _UpstreamFile(old)
    try:
        if os.path.lexists(new):
            raise FileExistsError(f"{new!r} exists: import-upstream writes a new file")
        report = {"source": old, "target": new, "upstream": source.version,
                  "upstream_release": source.upstream_release(), "dry_run": bool(dry_run)}
        if dry_run:
            structures = _copy_upstream(source, None)
        else:
            structures = _import_into_new_file(source, new)
        report.update(structures=structures, skipped=source.skipped,
                      unknown_tables=source.unknown_tables())
        return report
    finally:
        source.close()


def _copy_upstream(source, db) -> dict:
    structures: dict = {}
    for kind, name, items, edges in source.structures():
        try:
            structures.setdefault(kind, {})[name] = _copy_structure(
                db, kind, name, items, edges, source.metric)
        except (ValueError, TypeError, KeyError) as e:
            raise SchemaError(f"cannot import {kind} {name!r} of {source.path!r}: "
                              f"{type(e).__name__}: {e}") from e
    return structures


def _import_into_new_file(source, new) -> dict:
    open(new, "x").close()                  # claims the name: never overwrites a file
    try:
        with BeaverDB(new) as db:
            with db.transaction():
                return _copy_upstream(source, db)
    except BaseException:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.remove(new + suffix)
        raise


# ==========================================================================================
# CLI: beaver [--database PATH] <dict|list|queue|blob|lock|...> NAME <operation> [args]
# ==========================================================================================
#
# Output is JSON (``"dark"``, lists, objects) so it pipes into ``jq``; a VALUE argument is
# JSON when it parses as JSON, else the text itself; ``-`` reads standard input. Exit status:
# 0 done, 1 not found or the operation failed, 2 usage error. Errors go to standard error.

_NOTHING = object()     # a handler result that prints nothing


class _Exit(int):
    """A handler result that is the process exit status (``lock NAME run``)."""


def _cli_value(text):
    if text == "-":
        text = sys.stdin.read()
        try:
            return json.loads(text)
        except ValueError:
            return text[:-1] if text.endswith("\n") else text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cli_text(text) -> str:
    if text == "-":
        return sys.stdin.read()
    with open(text, encoding="utf-8") as f:
        return f.read()


def _cli_bytes(path) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _cli_json(value):
    """Plain JSON for anything a handler returns (models, queue items, documents...)."""
    if isinstance(value, QueueItem):
        item = {"priority": value.priority, "timestamp": value.timestamp,
                "data": _cli_json(value.data)}
        if getattr(value, "lease_id", None) is not None:
            item["lease_id"] = value.lease_id
        return item
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_cli_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _cli_json(v) for k, v in value.items()}
    return _to_jsonable(value)


def _quiet(action):
    def run(manager, args):
        action(manager, args)
        return _NOTHING
    return run


def _arg(*flags, **options):
    return flags, options


_KEY = _arg("key", help="the key")
_VALUE = _arg("value", help="a JSON value, else taken as text; - reads standard input")
_INDEX = _arg("index", type=int, help="a position (negative counts from the end)")
_FILE = _arg("file", help="a file path; - reads standard input")
_TIMEOUT = _arg("--timeout", type=float, default=None, help="seconds to wait (default: forever)")
_NO_WAIT = _arg("--no-wait", "-n", action="store_true", help="fail at once instead of waiting")


def _structure_ops(kind):
    """Operations every structure has: len, clear, dump, load."""
    return [
        ("len", f"print the number of items of the {kind}", [], lambda m, a: len(m)),
        ("clear", f"remove every item of the {kind}", [], _quiet(lambda m, a: m.clear())),
        ("dump", f"print the {kind} as one JSON document", [], lambda m, a: m.dump()),
        ("load", f"add the items of a JSON dump of a {kind}", [_FILE],
         _quiet(lambda m, a: m.load(_cli_text(a.file)))),
    ]


def _queue_get(manager, args):
    if args.no_wait:
        return manager.get(block=False, lease=args.lease)
    return manager.get(timeout=args.timeout, lease=args.lease)


def _leased_item(lease_id):
    item = LeasedItem(0, 0.0, None)
    item.lease_id = lease_id
    return item


def _blob_get(manager, args):
    data = manager[args.key].data
    if args.output and args.output != "-":
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return _NOTHING


def _blob_info(manager, args):
    blob = manager[args.key]
    return {"key": blob.key, "size": len(blob.data), "metadata": blob.metadata}


def _lock_status(db, args):
    lock = db.lock(args.name)
    return {"name": args.name, "locked": lock.locked}


def _lock_run(db, args):
    """Run a command while holding the lock; never run it when the lock was not acquired."""
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise _UsageError("lock run needs a command to run")
    lock = db.lock(args.name, ttl=args.ttl)
    try:
        lock.acquire(timeout=0.0 if args.no_wait else args.timeout, block=not args.no_wait)
    except TimeoutError:
        print(f"beaver: lock {args.name!r} was not acquired; not running {command[0]!r}",
              file=sys.stderr)
        return _Exit(1)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_until, args=(lock, stop), daemon=True)
    renewer.start()
    try:
        return _Exit(_run_command(command))
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(LockLost):
            lock.release()


def _renew_until(lock, stop):
    while not stop.wait(lock.ttl / 3):
        try:
            lock.renew()
        except BeaverError as e:
            logger.warning("could not renew lock %r: %s", lock.name, e)


def _run_command(command) -> int:
    import subprocess
    try:
        process = subprocess.Popen(command)
    except OSError as e:
        print(f"beaver: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        return 130


_DIRECTION = _arg("--direction", choices=["outgoing", "incoming", "both"], default="outgoing")


def _cli_time(text):
    """Epoch seconds or an ISO 8601 time (naive = local time) from the command line."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _UsageError(f"not a time: {text!r} (use epoch seconds or ISO 8601)") from None


def _cli_entries(entries):
    return [{"timestamp": e.timestamp.isoformat(), "data": e.data} for e in entries]


def _cli_document(args):
    value = _cli_value(args.document)
    if args.id is None and isinstance(value, dict) and "id" in value and \
            set(value) <= {"id", "body", "embedding"}:
        return Document.from_dict(value)
    return Document(id=args.id, body=value)


def _cli_hits(hits):
    return [{"document": doc, "score": score} for doc, score, *_ in hits]


def _cli_stream(items, count):
    """Print each item as one JSON line; returns how many were printed."""
    printed = 0
    for item in items:
        print(json.dumps(_cli_json(item), ensure_ascii=False), flush=True)
        printed += 1
        if count is not None and printed >= count:
            break
    return printed


def _channel_listen(manager, args):
    with manager.subscribe() as subscriber:
        try:
            printed = _cli_stream(subscriber.listen(timeout=args.timeout), args.count)
        except TimeoutError:
            return _Exit(0 if args.count is None else 1)
    return _Exit(0 if args.count is None or printed >= args.count else 1)


def _log_live(manager, args):
    with manager.live(window=args.window, period=args.period) as view:
        _cli_stream(view, args.count)
    return _Exit(0)


# kind -> (help, BeaverDB factory, [(operation, help, [arguments], handler(manager, args))])
CLI_KINDS = {
    "dict": ("a persistent dict of JSON values, with TTL", "dict", [
        ("get", "print the value of KEY", [_KEY], lambda m, a: m[a.key]),
        ("set", "store VALUE under KEY", [_KEY, _VALUE, _arg(
            "--ttl", type=float, default=None, help="expire after this many seconds")],
         _quiet(lambda m, a: m.set(a.key, _cli_value(a.value), ttl_seconds=a.ttl))),
        ("delete", "delete KEY", [_KEY], _quiet(lambda m, a: m.__delitem__(a.key))),
        ("pop", "delete KEY and print its value", [_KEY], lambda m, a: m.pop(a.key)),
        ("has", "print whether KEY exists (exit status 1 if not)", [_KEY],
         lambda m, a: True if a.key in m else _Exit(1)),
        ("ttl", "print the seconds until KEY expires (null: never)", [_KEY],
         lambda m, a: m.ttl(a.key)),
        ("keys", "print the keys", [], lambda m, a: m.keys()),
        ("items", "print every key and value as one JSON object", [],
         lambda m, a: dict(m.items())),
    ] + _structure_ops("dict")),
    "list": ("a persistent list", "list", [
        ("push", "append VALUE", [_VALUE], _quiet(lambda m, a: m.push(_cli_value(a.value)))),
        ("prepend", "insert VALUE at the front", [_VALUE],
         _quiet(lambda m, a: m.prepend(_cli_value(a.value)))),
        ("insert", "insert VALUE before INDEX", [_INDEX, _VALUE],
         _quiet(lambda m, a: m.insert(a.index, _cli_value(a.value)))),
        ("get", "print the item at INDEX", [_INDEX], lambda m, a: m[a.index]),
        ("set", "replace the item at INDEX", [_INDEX, _VALUE],
         _quiet(lambda m, a: m.__setitem__(a.index, _cli_value(a.value)))),
        ("delete", "delete the item at INDEX", [_INDEX],
         _quiet(lambda m, a: m.__delitem__(a.index))),
        ("pop", "remove and print the last item (or the one at INDEX)",
         [_arg("index", type=int, nargs="?", default=None, help="a position")],
         lambda m, a: m.pop(a.index)),
        ("deque", "remove and print the first item", [], lambda m, a: m.deque()),
        ("items", "print every item as one JSON list", [], lambda m, a: list(m)),
    ] + _structure_ops("list")),
    "queue": ("a persistent priority queue", "queue", [
        ("put", "add VALUE (lower priority first)", [_VALUE, _arg(
            "--priority", "-p", type=float, default=0, help="priority (default 0)")],
         _quiet(lambda m, a: m.put(_cli_value(a.value), priority=_number(a.priority)))),
        ("get", "take the first item and print it", [_TIMEOUT, _NO_WAIT, _arg(
            "--lease", type=float, default=None,
            help="seconds before the item returns unless acked (prints its lease_id)")],
         _queue_get),
        ("ack", "finish a leased item (exit status 1 if its lease had run out)",
         [_arg("lease_id", type=int)],
         lambda m, a: True if m.ack(_leased_item(a.lease_id)) else _Exit(1)),
        ("nack", "give a leased item back to the queue now", [_arg("lease_id", type=int)],
         lambda m, a: True if m.nack(_leased_item(a.lease_id)) else _Exit(1)),
        ("peek", "print the first item without taking it", [], lambda m, a: m.peek()),
        ("items", "print every item, in the order get would take them", [],
         lambda m, a: list(m)),
    ] + _structure_ops("queue")),
    "blob": ("a store of binary objects with JSON metadata", "blobs", [
        ("put", "store the bytes of FILE under KEY", [_KEY, _FILE, _arg(
            "--metadata", "-m", default=None, help="JSON metadata")],
         _quiet(lambda m, a: m.put(a.key, _cli_bytes(a.file),
                                   None if a.metadata is None else _cli_value(a.metadata)))),
        ("get", "write the bytes under KEY to standard output (or --output)", [_KEY, _arg(
            "--output", "-o", default=None, help="write to this file")], _blob_get),
        ("info", "print the size and metadata of KEY", [_KEY], _blob_info),
        ("delete", "delete KEY", [_KEY], _quiet(lambda m, a: m.delete(a.key))),
        ("keys", "print the keys", [], lambda m, a: m.keys()),
    ] + _structure_ops("blob")),
    "log": ("a time-indexed log of JSON values", "log", [
        ("write", "append VALUE (now, or at --timestamp)", [_VALUE, _arg(
            "--timestamp", "-t", default=None, help="epoch seconds or an ISO 8601 time")],
         _quiet(lambda m, a: m.log(_cli_value(a.value), timestamp=_cli_time(a.timestamp)))),
        ("range", "print the entries between --start and --end (inclusive)", [
            _arg("--start", default=None, help="epoch seconds or an ISO 8601 time"),
            _arg("--end", default=None, help="epoch seconds or an ISO 8601 time")],
         lambda m, a: _cli_entries(m.range(_cli_time(a.start), _cli_time(a.end)))),
        ("live", "print the values of the last --window seconds every --period, as JSON lines",
         [_arg("--window", type=float, default=60.0, help="seconds (default 60)"),
          _arg("--period", type=float, default=1.0, help="seconds (default 1)"),
          _arg("--count", type=int, default=None, help="stop after this many updates")],
         _log_live),
    ] + _structure_ops("log")),
    "channel": ("a pub/sub channel", "channel", [
        ("publish", "send VALUE to every subscriber", [_VALUE],
         _quiet(lambda m, a: m.publish(_cli_value(a.value)))),
        ("listen", "print messages published from now on, as JSON lines", [
            _arg("--timeout", type=float, default=None,
                 help="stop after this many seconds without a message"),
            _arg("--count", type=int, default=None, help="stop after this many messages")],
         _channel_listen),
        ("history", "print the retained messages, oldest first", [
            _arg("--limit", type=int, default=None, help="only the last LIMIT ones")],
         lambda m, a: m.history(a.limit)),
    ] + _structure_ops("channel")),
    "collection": ("documents searchable by text, typos, vectors and relationships",
                   "collection", [
        ("index", "store a document: JSON {\"id\", \"body\", \"embedding\"} (or a body + --id)",
         [_arg("document", help="the document as JSON; - reads standard input"),
          _arg("--id", default=None, help="the id, when DOCUMENT is just the body"),
          _arg("--no-fts", action="store_true", help="do not index the text")],
         lambda m, a: m.index(_cli_document(a), fts=not a.no_fts).id),
        ("get", "print the document ID", [_arg("id")], lambda m, a: m[a.id]),
        ("drop", "delete the document ID and its edges", [_arg("id")],
         _quiet(lambda m, a: m.drop(a.id))),
        ("match", "full-text search (typo-tolerant with --fuzziness)", [
            _arg("query"), _arg("--fuzziness", "-f", type=int, default=0),
            _arg("--top-k", "-k", type=int, default=10),
            _arg("--on", action="append", default=None, help="a field path (repeatable)")],
         lambda m, a: _cli_hits(m.match(a.query, on=a.on, top_k=a.top_k,
                                        fuzziness=a.fuzziness))),
        ("search", "nearest documents to a vector (JSON list of numbers)", [
            _arg("vector"), _arg("--top-k", "-k", type=int, default=10)],
         lambda m, a: _cli_hits(m.search(_cli_value(a.vector), top_k=a.top_k))),
        ("connect", "add the edge SOURCE -[LABEL]-> TARGET", [
            _arg("source"), _arg("target"), _arg("label"),
            _arg("--metadata", "-m", default=None, help="JSON metadata")],
         _quiet(lambda m, a: m.connect(a.source, a.target, a.label, None if a.metadata is None
                                       else _cli_value(a.metadata)))),
        ("disconnect", "remove the edges SOURCE -> TARGET", [
            _arg("source"), _arg("target"), _arg("--label", default=None)],
         _quiet(lambda m, a: m.disconnect(a.source, a.target, a.label))),
        ("edges", "print the edges of ID", [_arg("id"), _DIRECTION,
                                            _arg("--label", default=None)],
         lambda m, a: [e._asdict() for e in m.edges(a.id, a.direction, a.label)]),
        ("neighbors", "print the documents one edge away from ID", [
            _arg("id"), _arg("--label", default=None), _DIRECTION],
         lambda m, a: m.neighbors(a.id, label=a.label, direction=a.direction)),
        ("walk", "print the documents up to --depth edges away from ID", [
            _arg("id"), _arg("--labels", action="append", default=None),
            _arg("--depth", type=int, default=1), _DIRECTION],
         lambda m, a: m.walk(a.id, labels=a.labels, depth=a.depth, direction=a.direction)),
        ("ids", "print the ids of the documents", [], lambda m, a: [d.id for d in m]),
    ] + _structure_ops("collection")),
    "lock": ("an inter-process lock", None, [
        ("run", "run a command while holding the lock; exit with its status", [
            _TIMEOUT, _NO_WAIT,
            _arg("--ttl", type=float, default=60.0, help="seconds a hold lasts unless renewed "
                                                          "(renewed while the command runs)"),
            _arg("argv", nargs="...", metavar="COMMAND", help="the command and its arguments")],
         _lock_run),
        ("status", "print whether the lock is held", [], _lock_status),
    ]),
}


def _number(value):
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


class _UsageError(Exception):
    """Bad command-line usage found after parsing (exit status 2)."""


def _cli_parser(kind=None):
    """The argument parser; only ``kind`` gets its operations (building them all is slow)."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="beaver", description="Inspect and change a beaver database from the shell. "
        "Values are JSON (else text); output is JSON.",
        epilog="examples:\n  beaver --database my_data.db dict app_config get theme\n"
               "  beaver --database data.db lock my-cron-job run bash -c 'run_daily_report.sh'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", "-d", default=None,
                        help="database file (default: $BEAVER_DATABASE or beaver.db)")
    parser.add_argument("--url", default=None,
                        help="use a beaver server at this URL instead (default: $BEAVER_URL)")
    parser.add_argument("--token", default=None, help="bearer token for --url ($BEAVER_TOKEN)")
    parser.add_argument("--version", action="version", version=f"beaver {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for each, (help_text, _, operations) in CLI_KINDS.items():
        _cli_kind_parser(commands, each, help_text, operations if each == kind else None)
    _cli_database_parsers(commands)
    return parser


def _cli_kind_parser(commands, kind, help_text, operations):
    sub = commands.add_parser(kind, help=help_text, description=help_text)
    if operations is None:      # not the kind on this command line: its name is enough
        return
    sub.add_argument("name", help=f"the name of the {kind}")
    ops = sub.add_subparsers(dest="operation", metavar="OPERATION", required=True)
    for operation, op_help, arguments, handler in operations:
        op = ops.add_parser(operation, help=op_help, description=op_help)
        for flags, options in arguments:
            op.add_argument(*flags, **options)
        op.set_defaults(handler=handler, kind=kind)


def _cli_database_parsers(commands):
    info = commands.add_parser("info", help="print every structure: kind, name, size")
    info.set_defaults(handler=lambda db, a: db.info())
    dump = commands.add_parser("dump", help="print the database (or the named structures) "
                                            "as JSON lines")
    dump.add_argument("names", nargs="*", help="structure names (or kind:name); default all")
    dump.set_defaults(handler=_quiet(lambda db, a: db.dump(sys.stdout, a.names or None)))
    load = commands.add_parser("load", help="load a JSON-lines dump in one transaction")
    load.add_argument("file", help="the dump file; - reads standard input")
    load.add_argument("--replace", action="store_true",
                      help="empty each structure of the dump before loading it")
    load.set_defaults(handler=_cli_load)
    backup = commands.add_parser("backup", help="copy the database to PATH while it is in use")
    backup.add_argument("path", help="the copy to write")
    backup.set_defaults(handler=lambda db, a: db.backup(a.path))
    commands.add_parser("serve", help="run the REST server (see beaver serve --help)",
                        add_help=False)
    commands.add_parser("client", help="run a command against the database (same as without "
                                       "'client')", add_help=False)
    commands.add_parser("import-upstream", help="copy a beaver-db 1.x/2.x file into a new "
                                                "beaver file (see --help)", add_help=False)


def _cli_load(db, args):
    mode = "replace" if args.replace else "append"
    if args.file == "-":
        return {"structures": db.load(sys.stdin, mode)}
    with open(args.file, encoding="utf-8") as f:
        return {"structures": db.load(f, mode)}


def _open_database(args):
    url = args.url or os.environ.get("BEAVER_URL")
    if url and not args.database:
        return BeaverClient(url, token=args.token or os.environ.get("BEAVER_TOKEN"))
    return BeaverDB(args.database or os.environ.get("BEAVER_DATABASE") or "beaver.db")


def _cli_run(db, args):
    if args.command not in CLI_KINDS:
        return args.handler(db, args)
    factory = CLI_KINDS[args.command][1]
    if factory is None:
        return args.handler(db, args)
    return args.handler(getattr(db, factory)(args.name), args)


def _cli_print(result):
    if result is _NOTHING:
        return 0
    if isinstance(result, _Exit):
        return int(result)
    print(json.dumps(_cli_json(result), indent=2, ensure_ascii=False))
    return 0


def _command_word(argv):
    """(index of the command word after the top-level options, the --database value)."""
    database, i = None, 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help"):
        if argv[i] in ("--database", "-d") and i + 1 < len(argv):
            database = argv[i + 1]
        i += 1 if "=" in argv[i] or argv[i] == "--version" else 2
    return i, database


def _split_serve(argv):
    """``[top-level options] serve [server options]``: the server's own argument list."""
    i, database = _command_word(argv)
    if i >= len(argv) or argv[i] != "serve":
        return None
    return (["--database", database] if database else []) + argv[i + 1:]


def _cli_serve(server_argv) -> int:
    try:
        import beaver_server
    except ImportError as e:
        print(f"beaver: the server needs the [server] extra (pip install 'beaver-db[server]'): "
              f"{e}", file=sys.stderr)
        return 1
    try:
        return beaver_server.main(server_argv, prog="beaver serve")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def _cli_import_upstream(argv) -> int:
    """``beaver import-upstream OLD.db NEW.db [--dry-run]``: prints the JSON report."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="beaver import-upstream",
        description="Copy every structure of a database written by the public beaver-db 1.x "
                    "or 2.x package into a new beaver file. OLD is only read; NEW must not "
                    "exist. Prints a JSON report: counts per structure, what was skipped, "
                    "unknown tables.")
    parser.add_argument("old", metavar="OLD.db", help="the beaver-db file (read-only)")
    parser.add_argument("new", metavar="NEW.db", help="the beaver file to create")
    parser.add_argument("--dry-run", action="store_true",
                        help="read everything and print the counts; write nothing")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        report = import_upstream(args.old, args.new, dry_run=args.dry_run)
    except (BeaverError, OSError) as e:
        print(f"beaver: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return _cli_print(report)


def main(argv=None) -> int:
    """The ``beaver`` command: ``beaver [--database PATH] <kind> NAME <operation> [args]``.

        $ beaver --database my_data.db dict app_config get theme
        "dark"
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "client" in argv[:4]:
        argv.remove("client")
    server_argv = _split_serve(argv)
    if server_argv is not None:
        return _cli_serve(server_argv)
    i, _ = _command_word(argv)
    if argv[i:i + 1] == ["import-upstream"]:
        return _cli_import_upstream(argv[i + 1:])
    try:
        i, _ = _command_word(argv)
        args = _cli_parser(argv[i] if i < len(argv) else None).parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        db = _open_database(args)
    except (BeaverError, ValueError) as e:
        print(f"beaver: {e}", file=sys.stderr)
        return 1
    try:
        return _cli_print(_cli_run(db, args))
    except _UsageError as e:
        print(f"beaver: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"beaver: not found: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except (BeaverError, LookupError, ValueError, TypeError, OSError) as e:
        print(f"beaver: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
