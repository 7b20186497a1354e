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
    "AsyncChannelManager", "AsyncSubscriber", "AsyncLogManager", "AsyncLock", "Stream",
    "AsyncStream", "AsyncLiveView",
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

try:
    import fcntl
except ImportError:     # not POSIX: the writers of several processes meet on SQLite's lock only
    fcntl = None

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
DEFAULT_TIMEOUT = 30.0          # seconds a write waits for its turn (beaver's gates, SQLite's lock)
WATCH_INTERVAL = 0.001          # seconds between two PRAGMA data_version checks
WATCH_HOT = 0.25                # after a file change, poll every WATCH_INTERVAL this long
WATCH_IDLE_CHECK = 0.05         # with inotify, the longest sleep between two checks
WATCH_LINGER = 2.0              # seconds the watcher keeps polling after its last user left
GATE_FIRST_PAUSE = 20e-6        # a writer waiting at the processes' gate first sleeps this long,
GATE_LONGEST_PAUSE = 0.001      # doubling up to this, between two tries
GATE_PROBE_EVERY = 0.05         # and tries SQLite's own lock this often (see _Core._begin_in_turn)
GATE_LINK_CHECK_EVERY = 64      # takes of the gate between two checks that the -wal is not deleted
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
_HELD_IN_THIS_PROCESS = "another thread of this process holds a write transaction"


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


class _WritersBusy(DatabaseBusy):
    """Internal: ``transaction(wait=False)`` found another writer at the writers' gates (a
    thread of this process, another process) and did not wait for it."""


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
            raise ValidationError(f"{what} {text!r:.60} holds a lone surrogate: it is not valid "
                                  "Unicode text, which SQLite stores") from None
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
    # RecursionError, and the checking encoder then reports it as json.dumps would. NaN and
    # infinities are refused: they are not JSON, and SQLite's JSON functions reject the row.
    _json_encode = _c_make_encoder(None, _json_default, _encode_str, None, ":", ",",
                                   False, False, False)


def _json_dumps(value) -> str:
    try:
        if _c_make_encoder is None:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        try:
            return "".join(_json_encode(value, 0))
        except RecursionError:      # a cycle, or deep nesting: the checking encoder tells
            return "".join(_c_make_encoder({}, _json_default, _encode_str, None, ":", ",",
                                           False, False, False)(value, 0))
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
    # the field indexes (see _FieldIndexes): one partial index each, named from these columns
    """CREATE TABLE IF NOT EXISTS beaver_indexes (
        kind TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
        PRIMARY KEY (kind, name, path)) WITHOUT ROWID""",
    # the answers to recent keyed requests of the server (exactly-once over the wire); one
    # B-tree, no index on created: _RequestPruner forgets old ones in key order
    """CREATE TABLE IF NOT EXISTS beaver_requests (
        key TEXT PRIMARY KEY, created REAL NOT NULL, status INTEGER NOT NULL, body BLOB)
        WITHOUT ROWID""",
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

        >>> conn = sqlite3.connect(":memory:")
        >>> _upstream_version(conn) is None
        True
        >>> _ = conn.execute("CREATE TABLE __beaver_dicts__ (name, key, value)")
        >>> _upstream_version(conn)
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
        return ValidationError(f"cannot store {error.object[:60]!r}: it holds a lone surrogate "
                               f"{error.object[error.start:error.end]!r} (not valid Unicode)")
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


class _WalGate:
    """The writers' gate between processes: an exclusive ``flock`` on the ``-wal`` file.

    Processes that meet on SQLite's write lock wait in its busy handler, which sleeps 1, 2,
    5, 10... ms however soon the lock is free, while a write holds it for well under a
    millisecond. So a writer first takes this gate, polling it without blocking and sleeping
    a little longer after each miss (``GATE_FIRST_PAUSE`` doubling up to
    ``GATE_LONGEST_PAUSE``), and only then runs ``BEGIN IMMEDIATE``, which then seldom
    finds SQLite's lock taken. The gate is an order among beaver's writers, never a rule:
    SQLite's lock still decides who writes, and ``_Core._begin_in_turn`` tries that lock
    directly when the gate stays taken (a holder stopped before its ``BEGIN``).

    Why the ``-wal`` file: it exists as long as the database has an open connection,
    SQLite takes no POSIX lock on it (its locks are on the database file and ``-shm``:
    closing any descriptor of those would drop every lock the process holds on them,
    SQLite's included, so beaver never opens them), and an ``flock`` belongs to one open
    file description and dies with its process (a SIGKILLed holder blocks nobody). Each
    process opens its own descriptor (a forked child too: one inherited would share the
    parent's lock, and its unlock would release it). When every connection to the database
    closes, SQLite deletes the ``-wal`` and the next one makes a new file: a descriptor of
    the deleted file (no links left) is reopened; that is checked every
    ``GATE_LINK_CHECK_EVERY`` takes only, as a ``fstat`` costs as much as the lock and the
    file cannot go while this core keeps a connection open, which it does from its start to
    its close. Before the ``-wal`` exists (a new database), and where ``flock`` is missing or
    refused, there is no gate.

    One writer per process at a time comes here (after ``_Core._writers``); ``close()`` may
    come from any thread meanwhile: it closes the descriptor only while no writer is inside
    (each side writes its flag, then reads the other's), else the writer's ``release`` does.
    """

    def __init__(self, path):
        self.path = path
        self.fd = None              # our descriptor of the -wal file, opened on first use
        self._file = None           # its file object: closes it if the core is dropped unclosed
        self.usable = fcntl is not None
        self._held = False          # this process holds the lock
        self._inside = False        # a writer is between take() and release()
        self._closed = False
        self._takes = 0
        self._guard = threading.Lock()     # closes the descriptor once

    def take(self, until=None) -> bool:
        """Enter the gate: True once this process holds it or there is no gate to hold;
        False if another holds it at once (``until`` None) or still at ``until`` (a
        ``time.monotonic()`` time). Every ``take`` is followed by one ``release``."""
        self._inside = True
        if self._closed or not self.usable:
            return True
        fd = self.fd if self.fd is not None else self._open()
        pause = GATE_FIRST_PAUSE
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:     # another open file description holds it
                now = time.monotonic()
                if until is None or now >= until:
                    return False
                if self._closed:
                    return True
                time.sleep(min(pause, until - now))
                pause = min(2 * pause, GATE_LONGEST_PAUSE)
                continue
            except OSError:             # a file system without flock: no gate from now on
                self.usable = False
                return True
            self._held = True
            self._takes += 1
            if self._takes % GATE_LINK_CHECK_EVERY or os.fstat(fd).st_nlink:
                return True
            self._held = False          # the -wal was deleted (and maybe made anew)
            self._close_fd()
            fd = self._open()
        return True

    def release(self):
        """Leave the gate (unlock it if held); close the descriptor if close() came while a
        writer was inside."""
        if self._held:
            self._held = False
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self._inside = False
        if self._closed:
            self._close_fd()

    def close(self):
        """No more writers: close the descriptor (now, or at the release of the one inside)."""
        self._closed = True
        if not self._inside:
            self._close_fd()

    def after_fork(self):
        """In a forked child: drop the parent's descriptor without unlocking it (closing our
        copy leaves the parent's lock alone); the child opens its own when it writes."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self.fd, self._file, self._held, self._inside = None, None, False, False
        self._guard = threading.Lock()

    def _open(self):
        """Our descriptor of the -wal file, or None while there is none (never created here:
        SQLite makes it, with the database's permissions) or after close()."""
        try:
            file = open(self.path, "rb", buffering=0)     # not inherited by exec'd children
        except FileNotFoundError:
            return None
        except PermissionError:     # unreadable: no gate, SQLite's lock alone
            self.usable = False
            return None
        except OSError:             # out of descriptors for now: no gate this time
            return None
        with self._guard:
            if self._closed:
                file.close()
                return None
            self._file, self.fd = file, file.fileno()
        return self.fd

    def _close_fd(self):
        with self._guard:
            file, self._file, self.fd = self._file, None, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()            # drops our flock with it


class _Transaction:
    """One level of ``_Core.transaction()``: the outermost a write transaction, the inner ones
    savepoints (a class, not a generator: it runs on every write)."""

    __slots__ = ("core", "wait", "local", "depth", "gate", "conn", "mark", "undo_mark")

    def __init__(self, core, wait=True):
        self.core, self.wait = core, wait

    def __enter__(self):
        core = self.core
        local = core._local
        depth = getattr(local, "depth", 0)
        if depth == 0:
            self.gate = gate = core._writers    # this one (a forked child gets a new one)
            conn = core._enter_write(gate, self.wait)
            local = core._local
            local.pending, local.undo, local.token = [], [], object()
            local.doomed = None         # the error at which the engine rolled it all back
        else:
            conn = core.conn()
            local = core._local
            core._run(conn, f"SAVEPOINT beaver_{depth}")
        self.local, self.depth, self.conn = local, depth, conn
        self.mark, self.undo_mark = len(local.pending), len(local.undo)
        local.depth = depth + 1
        return conn

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            self.roll_back(error)
            return False
        core, local, depth = self.core, self.local, self.depth
        if local.doomed is not None:    # its writes are gone: it fails with that error
            if depth > 0:
                local.depth = depth
                return False
            self.roll_back(local.doomed)
            raise local.doomed
        local.depth = depth
        if depth > 0:
            core._run(self.conn, f"RELEASE beaver_{depth}")
            return False
        try:
            core._run(self.conn, "COMMIT")
        except BaseException:
            local.pending = []
            core._undo(0)
            core._rollback(self.conn)
            raise
        finally:
            core._leave_write(self.gate)
        pending, local.pending, local.undo = local.pending, [], []
        for callback in pending:
            callback()
        return False

    def roll_back(self, error):
        """Undo this level at ``error``: its callbacks dropped, its rollback callbacks run,
        then ``ROLLBACK`` (the outermost level, which lets the next writer in) or ``ROLLBACK
        TO`` its savepoint.

        When the engine has rolled back the whole transaction at ``error`` (SQLITE_FULL...),
        there is no savepoint to go back to: the transaction is doomed. What the caller
        writes after catching the error runs in a new transaction (not one statement at a
        time), and the outermost level rolls it back and raises ``error`` again.
        """
        core, local, depth, conn = self.core, self.local, self.depth, self.conn
        local.depth = depth
        del local.pending[self.mark:]
        try:
            core._undo(self.undo_mark)  # before ROLLBACK: no other writer can commit meanwhile
            if depth == 0:
                core._rollback(conn)
            elif local.doomed is not None:
                pass                    # its savepoint went with the first transaction
            elif core.connection_in_transaction():
                core._run(conn, f"ROLLBACK TO beaver_{depth}")
                core._run(conn, f"RELEASE beaver_{depth}")
            else:
                local.doomed = error
                core._run(conn, "BEGIN")
        finally:
            if depth == 0:
                core._leave_write(self.gate)


class _Core:
    """Per-thread connections to one file, transactions, and after-commit hooks.

    Every thread gets its own ``sqlite3.Connection`` (autocommit mode). Writes that read
    first run inside ``transaction()``, which starts with ``BEGIN IMMEDIATE`` so that two
    writers never deadlock on a lock upgrade. Nested ``transaction()`` calls use savepoints.

    It is the SQLite engine: what differs per engine is reached through the core (the SQL of
    filters and field indexes, the snapshot, the wake-up watcher); ``beaver_postgres`` has
    the PostgreSQL one. Managers hold no engine-specific code paths of their own.
    """

    engine = "sqlite"
    SNAPSHOT_BEGIN = "BEGIN"        # a read-only transaction that sees one snapshot
    # On an engine where a take that finds nothing locks nothing, the statement a woken queue
    # get sends alone: parameters (name, now, events origin); one row (priority, timestamp,
    # data, queued, first lease end), data NULL when it took nothing because the queue is
    # empty, a lease is due or another BeaverDB listens to the queue's events. Here (SQLite:
    # an empty write still takes the write lock) None: a woken get looks first.
    TAKE_OR_LOOK = None

    def compile_filter(self, where, column) -> "_Filter":
        """The filter ``where`` compiled for this engine over the JSON column ``column``."""
        return _Filter(where, column)

    def order_terms(self, order_by, column) -> tuple:
        """``(ORDER BY terms, canonical paths)`` of ``order_by`` for this engine."""
        return _order_terms(order_by, column)

    def field_indexes(self, *args) -> "_FieldIndexes":
        """The field indexes of one structure (arguments of ``_FieldIndexes``)."""
        return _FieldIndexes(self, *args)

    def check_json(self):
        _check_json1(self)

    def text_search(self) -> bool:
        """Make what collections' text search needs (once); False where it cannot work."""
        return _ensure_fts(self)

    def connection_in_transaction(self) -> bool:
        """Whether this thread's connection is in a transaction (beaver's or a raw BEGIN)."""
        return self.conn().in_transaction

    def size(self) -> int:
        """Bytes the database takes on disk (the file and its WAL)."""
        return sum(os.path.getsize(self.path + s) for s in ("", "-wal")
                   if os.path.exists(self.path + s))

    def identity(self):
        """What tells this database from any other, however it is named: the machine, and
        the device and inode of the file (a link or another spelling of the path is it too);
        found once, None while the file cannot be looked at."""
        if self._identity is None:
            import socket
            try:
                stat = os.stat(self.path)
            except OSError:
                return None
            self._identity = f"sqlite:{socket.gethostname()}:{stat.st_dev}:{stat.st_ino}"
        return self._identity

    def __init__(self, path, timeout=DEFAULT_TIMEOUT, durability="normal"):
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise FeatureUnavailable(
                f"beaver needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; this Python's "
                f"sqlite3 module uses SQLite {sqlite3.sqlite_version}")
        self._settings(timeout, durability)
        self.memory = str(path) == ":memory:"
        # absolute, so a later chdir cannot send new threads' connections to another file
        self.path = _memory_path() if self.memory else os.path.abspath(os.fspath(path))
        self.synchronous = "OFF" if self.memory else durability.upper()
        self.wal_gate = _WalGate(self.path + "-wal")
        self._identity = None
        self._start()

    def _settings(self, timeout, durability):
        """Check the settings every engine takes and set up the state of no connection yet."""
        if durability not in ("normal", "full"):
            raise ValueError("durability must be 'normal' or 'full'")
        self.timeout = _seconds(timeout, "timeout", high=_MAX_BUSY_TIMEOUT)
        if self.timeout is None:
            raise TypeError("timeout must be seconds (a number or a timedelta), not None")
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
        self._writers = threading.Lock()     # see _enter_write
        self.wal_gate = None                  # the processes' gate: SQLite files only

    def _start(self):
        """Watch for changes, make the schema, purge expired rows if any: the core is open."""
        self.watcher = self._new_watcher()
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
        self._local.undo = []
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
        self._writers = threading.Lock()
        if self.wal_gate is not None:
            self.wal_gate.after_fork()
        self.purger = None
        self._halt = threading.Event()
        self.watcher = self._new_watcher()

    def _new_watcher(self):
        return _Watcher(self)

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
        if self.wal_gate is not None:
            self.wal_gate.close()
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

    def _begin(self, conn, sql):
        """Begin a transaction on ``conn`` with ``sql``; the connection it runs on."""
        self._run(conn, sql)
        return conn

    def transaction(self, wait=True) -> "_Transaction":
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; nested calls become savepoints.

            >>> core = db._core
            >>> with core.transaction() as conn:
            ...     _ = conn.execute("SELECT 1")

        Callbacks registered with ``after_commit`` run once the outermost level commits,
        and are dropped if it (or their savepoint) rolls back; those registered with
        ``on_rollback`` run if their level (or an outer one) rolls back. With ``wait``
        False, an outermost level that would wait for another writer (see ``_enter_write``)
        raises ``_WritersBusy`` at once instead.
        """
        return _Transaction(self, wait)

    def _enter_write(self, gate, wait=True):
        """Take this process's writer gate, then this thread's connection (after the gate: a
        pooled one is not held while waiting), then ``BEGIN IMMEDIATE``; the connection.

        Threads of one process queue on a ``threading.Lock`` and are handed it the moment
        the last writer commits; meeting on SQLite's lock instead, a loser sleeps 1, 2, 5...
        ms in SQLite's busy handler however soon the lock is free (with four threads writing
        through the server, over a third of the time). On a SQLite file the one writer of
        each process then meets other processes' at ``wal_gate`` (see ``_WalGate``). Neither
        gate is a rule of its own: SQLite's lock is. The timeout counts every wait. With
        ``wait`` False, a gate taken raises ``_WritersBusy`` at once.
        """
        deadline = None
        if not gate.acquire(blocking=False):
            if not wait:
                raise _WritersBusy(_HELD_IN_THIS_PROCESS)
            started = time.monotonic()
            if not gate.acquire(timeout=self.timeout):
                raise DatabaseBusy(f"the database stayed locked for over {self.timeout:g}s: "
                                   + _HELD_IN_THIS_PROCESS)
            deadline = started + self.timeout
        try:
            conn = self.conn()
            if not wait:
                return self._begin_unless_held(conn)
            if self.wal_gate is not None:
                return self._begin_in_turn(conn, deadline)
            return self._begin_by(conn, deadline)
        except BaseException:
            gate.release()
            raise

    def _begin_unless_held(self, conn):
        """``BEGIN IMMEDIATE`` on ``conn`` unless another process is at the writers' gate:
        ``_WritersBusy`` then, at once; the connection. SQLite's lock itself (taken by a
        writer that passes no gate: another program, a single-statement write) is waited
        for as usual."""
        wal_gate = self.wal_gate
        if wal_gate is not None and not wal_gate.take():
            wal_gate.release()
            raise _WritersBusy("another process holds the writers' gate")
        try:
            return self._begin_by(conn, None)
        except BaseException:
            if wal_gate is not None:
                wal_gate.release()
            raise

    def _begin_in_turn(self, conn, deadline):
        """``BEGIN IMMEDIATE`` on ``conn`` through the processes' gate, by ``deadline`` (a
        ``time.monotonic()`` time; None: the whole timeout from now); the connection.

        While another process holds the gate, this tries SQLite's lock itself every
        ``GATE_PROBE_EVERY`` seconds and at the deadline: a holder that is not writing (one
        stopped before its ``BEGIN``) delays others that long at most, and ``DatabaseBusy``
        comes from SQLite's lock only.
        """
        wal_gate = self.wal_gate
        try:
            if wal_gate.take():
                return self._begin_by(conn, deadline)
            if deadline is None:
                deadline = time.monotonic() + self.timeout
            while not wal_gate.take(until=min(deadline, time.monotonic() + GATE_PROBE_EVERY)):
                try:
                    return self._begin_within(conn, 0)
                except DatabaseBusy:
                    if time.monotonic() >= deadline:
                        raise
            return self._begin_by(conn, deadline)
        except BaseException:
            wal_gate.release()
            raise

    def _begin_by(self, conn, deadline):
        """``BEGIN IMMEDIATE`` waiting on SQLite's lock until ``deadline`` (a
        ``time.monotonic()`` time; None: the whole timeout); the connection."""
        if deadline is None:
            return self._begin(conn, "BEGIN IMMEDIATE")
        return self._begin_within(conn, deadline - time.monotonic())

    def _leave_write(self, gate):
        """After ``COMMIT`` or ``ROLLBACK``: let the next writer in, another process's first."""
        if self.wal_gate is not None:
            self.wal_gate.release()
        gate.release()

    def _begin_within(self, conn, left):
        """``BEGIN IMMEDIATE`` waiting at most ``left`` seconds on SQLite's lock (the timeout
        counts the wait at the gate too); the connection it began on."""
        self._run(conn, "PRAGMA busy_timeout = %d" % max(0, int(left * 1000)))
        try:
            self._run(conn, "BEGIN IMMEDIATE")
        finally:
            self._run(conn, "PRAGMA busy_timeout = %d" % int(self.timeout * 1000))
        return conn

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

    def transaction_token(self):
        """An object standing for this thread's current outermost transaction (None outside
        one): per-transaction state is keyed by it."""
        local = self._local
        return local.token if getattr(local, "depth", 0) > 0 else None

    def on_rollback(self, callback):
        """Run ``callback`` if the current transaction level, or an outer one, rolls back.

        For in-memory state derived from this transaction's writes: a released savepoint
        hands its callbacks to the enclosing level; a commit drops them; outside a
        transaction there is nothing to undo. They run newest first, before the rollback.
        """
        if getattr(self._local, "depth", 0) > 0:
            self._local.undo.append(callback)

    def _undo(self, mark):
        """Run (newest first) and drop the rollback callbacks registered since ``mark``."""
        local = self._local
        callbacks, local.undo = local.undo[mark:], local.undo[:mark]
        for callback in reversed(callbacks):
            try:
                callback()
            except Exception:   # the rollback itself must still happen
                logger.exception("a rollback callback failed")

    def changed(self):
        """Tell in-process waiters that this thread wrote something (after commit)."""
        if self.watcher.users:
            self.after_commit(self.watcher.wake)

    # -- schema ------------------------------------------------------------------------

    def _ensure_schema(self):
        names = self._names()
        if self._stamp(names) == SCHEMA_VERSION and _SCHEMA_NAMES <= names:
            if "beaver_requests_age" in names:      # made by earlier versions: a write each
                with self.transaction() as conn:     # keyed request paid for, now unused
                    conn.execute("DROP INDEX IF EXISTS beaver_requests_age")
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


def _settle(futures):
    for future in futures:
        if not future.done():
            future.set_result(None)


class _Watcher:
    """Wakes waiting threads when the database changes, whichever process wrote.

    While anybody waits, one thread checks ``PRAGMA data_version`` on its own connection and
    bumps ``tick`` when another connection has committed. On Linux it sleeps on inotify events
    of the ``-wal`` file (every commit appends to it) and then polls every millisecond for a
    short while; elsewhere (or with ``BEAVER_WATCH=poll``) it polls every millisecond. Writers
    of this process bump ``tick`` directly. Threads sleep on one condition; coroutines
    (``wait_for_async``) await a future that the same wake-up settles.
    """

    def __init__(self, core):
        self._core = core
        self._cond = threading.Condition()
        self.tick = 0
        self.users = 0
        self._thread = None
        self._stopping = False
        self._futures: dict = {}      # event loop -> futures of coroutines awaiting a tick

    def wake(self):
        with self._cond:
            self.tick += 1
            self._cond.notify_all()
            if not self._futures:
                return
            waiting, self._futures = self._futures, {}
        for loop, futures in waiting.items():   # one hop per event loop, however many wait
            with contextlib.suppress(RuntimeError):     # that loop has closed meanwhile
                loop.call_soon_threadsafe(_settle, futures)

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

    def wait_for(self, probe, timeout=None, cap=None, probed_at=None):
        """Call ``probe()`` until it returns something other than None, waking on changes.

        ``cap`` bounds each sleep (or is a callable returning that bound, for waits whose
        condition also depends on the clock). Returns None when ``timeout`` passes.
        ``probed_at``: the caller has just probed in vain, having read ``tick`` before; the
        wait then sleeps first (any change since that read wakes it at once).
        """
        deadline = _Deadline(timeout)
        with self.watching():
            while True:
                if probed_at is None:
                    tick = self.tick
                    result = probe()
                    if result is not None:
                        return result
                else:
                    tick, probed_at = probed_at, None
                if self._stopping:
                    self._core._close_deferred()
                    raise ClosedError("the database was closed while waiting")
                if deadline.expired:
                    return None
                limit = cap() if callable(cap) else cap
                self.wait(tick, deadline.remaining(limit))

    async def wait_for_async(self, probe, timeout=None, cap=None, run=None, stop=None):
        """``wait_for`` for asyncio: awaits changes instead of holding a thread while it waits.

        ``run(probe)`` is awaited for each attempt (e.g. ``probe`` run in a thread pool, so
        SQLite never runs on the event loop). ``stop`` (an ``asyncio.Future``) ends the wait
        early: a probe in progress finishes first, and its result is returned.
        """
        loop = asyncio.get_running_loop()
        deadline = _Deadline(timeout)
        with self.watching():
            while True:
                tick = self.tick
                result = await run(probe)
                if result is not None or (stop is not None and stop.done()):
                    return result
                if self._stopping:
                    raise ClosedError("the database was closed while waiting")
                if deadline.expired:
                    return None
                limit = cap() if callable(cap) else cap
                await self._tick_after(loop, tick, deadline.remaining(limit), stop)

    async def _tick_after(self, loop, tick, timeout, stop):
        """Return once ``tick`` moved on, ``timeout`` seconds passed or ``stop`` is done."""
        future = loop.create_future()
        with self._cond:
            if self.tick != tick or self._stopping:
                return
            self._futures.setdefault(loop, []).append(future)
        waits = {future} if stop is None else {future, stop}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            future.cancel()

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
        self.wake()
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

            >>> jobs = db.queue("jobs")
            >>> for n in range(3):
            ...     jobs.put(n)
            >>> with jobs.acquire(timeout=5) as q:     # no other holder takes items meanwhile
            ...     batch = [q.get(block=False).data for _ in range(len(q))]
            >>> batch
            [0, 1, 2]

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
            if option not in self._OPTIONS or value is _DEFAULT:
                continue            # collections compare theirs with the stored ones
            if self._option(option, value) != getattr(self, option):
                raise ValueError(f"{self._kind} {self._name!r} is already open with {option}="
                                 f"{getattr(self, option)!r}, not {value!r} (leave {option} out "
                                 "to use the open one)")

    # -- writes and events -------------------------------------------------------------

    def _listened(self) -> bool:
        """False when ``_wrote`` would do nothing and ``_atomic`` add nothing: nobody waits
        in this process and nobody listens anywhere.

        Hot paths test this first, then skip the event payload and take single statements.
        """
        events = self._db._events      # as _heard, inline: this is on every write's path
        return (bool(self._core.watcher.users) or events.listening(self._topic)
                or events.remote(self._topic))

    def _heard(self) -> bool:
        """True if a callback listens to this structure's events, here or in another
        process: writes that wake no waiter (a queue take) ask only this."""
        events = self._db._events
        return events.listening(self._topic) or events.remote(self._topic)

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

            >>> import queue
            >>> keys = queue.Queue()
            >>> handle = db.dict("config").on("set", lambda p: keys.put(p["key"]))
            >>> db.dict("config")["theme"] = "dark"
            >>> keys.get(timeout=5)                    # called on the event thread
            'theme'
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

            >>> db.dict("config").update(theme="dark", lang="en")
            >>> data = db.dict("config").dump()
            >>> data["metadata"]["count"], data["items"][0]
            (2, {'key': 'lang', 'value': 'en', 'expires_at': None})
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
        return list(self._export())

    def _export(self):
        """The items of this structure as ``dump()`` writes them, in dump order, read page by
        page (memory stays bounded, whatever the size): what ``dump`` and ``copy_to`` read."""
        raise NotImplementedError

    _load_batch = 1000      # items that ``load`` and ``copy_to`` write at once

    def _load_items(self, items):
        raise NotImplementedError

    def _paged(self, sql, start, key_of=lambda row: row[0]):
        """Iterate rows of ``sql`` (taking name, cursor, limit) page by page, by cursor.

        A tuple cursor fills one parameter per value (``(a, b) > (?, ?)``)."""
        cursor = start
        while True:
            values = cursor if isinstance(cursor, tuple) else (cursor,)
            rows = self._core.all(sql, (self._name, *values, PAGE_SIZE))
            yield from rows
            if len(rows) < PAGE_SIZE:
                return
            cursor = key_of(rows[-1])

    def as_async(self) -> "AsyncManager":
        """An awaitable twin of this manager whose calls run in worker threads.

            >>> adict = db.dict("config").as_async()
            >>> await adict.set("theme", "dark")       # in async code (or python -m asyncio)
            >>> await adict.get("theme")
            'dark'
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


_CLOSED = object()      # what a push stream's inbox receives when the stream closes


class Stream:
    """Values that arrive over time: a channel subscription, a live view, a remote stream.

        >>> chat = db.channel("chat")
        >>> with chat.subscribe() as sub:
        ...     chat.publish("hello")
        ...     chat.publish("world")
        ...     print(sub.get(timeout=5))
        ...     for message in sub.listen(timeout=5):
        ...         print(message)
        ...         break
        hello
        world

    ``get(timeout)`` returns the next value (``TimeoutError`` after ``timeout`` seconds
    without one); iterating (or ``listen()``) yields values until ``close()``; a ``with``
    block closes it; ``as_async()`` is its asyncio face. A push source hands raw values to
    ``_deliver`` from any thread and ``_decode`` makes them what the caller sees; a pull
    source (``LiveView``) computes each value when it is due instead (``_due``/``_produce``).
    """

    _what = "value"

    def __init__(self):
        self._inbox: _queue.SimpleQueue = _queue.SimpleQueue()
        self._sink = self._inbox.put
        self.closed = False

    def _deliver(self, raw):
        self._sink(raw)

    def _decode(self, raw):
        return raw

    def _stop(self):
        """Detach from the source (``close()`` calls it once)."""

    def _next(self, timeout):
        try:
            raw = self._inbox.get(timeout=timeout)
        except _queue.Empty:
            raise Timeout(f"no {self._what} arrived within {timeout}s") from None
        if raw is _CLOSED:
            self._inbox.put(_CLOSED)
            raise ClosedError(f"the {type(self).__name__.lower()} is closed")
        return raw

    def get(self, timeout=None):
        """The next value; ``TimeoutError`` after ``timeout`` seconds without one."""
        return self._decode(self._next(_seconds(timeout, "timeout", wait=True)))

    def listen(self, timeout=None):
        """Yield values as they arrive, until ``close()``.

        ``timeout`` bounds each wait: if nothing arrives for that long, ``TimeoutError`` is
        raised (catch it to stop listening). Without it, the wait is unbounded.
        """
        while True:
            try:
                yield self.get(timeout)
            except ClosedError:
                return

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return self.get()
        except ClosedError:
            raise StopIteration from None

    def close(self):
        """Stop the stream; a ``listen()`` or iteration in progress ends."""
        if not self.closed:
            self.closed = True
            self._stop()
            self._sink(_CLOSED)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def as_async(self) -> "AsyncStream":
        """The asyncio face: ``async for value in stream.as_async(): ...``."""
        return AsyncStream(self)


# ==========================================================================================
# Queries: filters, ordering, paging and field indexes
# ==========================================================================================
#
# A filter is a plain JSON-able dict that _Filter compiles into one SQL condition over a
# structure's JSON column; every value in it becomes a bound parameter. Two things do reach
# SQL text, because SQLite matches an expression index and a partial index's WHERE by the
# text of their expressions (a bound parameter does not match a literal without re-planning
# the statement at every call): JSON paths, which first pass a strict grammar (_field_path),
# and the structure's name in a field index's WHERE and in the queries meant to use it. Both
# are written by one quoting function, _sql_text.

FILTER_MAX_DEPTH = 16           # nesting of $and / $or / $not in one filter
FILTER_MAX_CONDITIONS = 256     # conditions in one filter (SQLite's expressions nest 1000 deep)

_KEY = r'([^.\[\]"\\\x00-\x1f$][^.\[\]"\\\x00-\x1f]*)|"([^"\\\x00-\x1f]*)"'
_ITEM = r'\[(0|[1-9][0-9]{0,8})\]'
_PATH_FIRST = re.compile(f"(?:{_KEY})|{_ITEM}")
_PATH_NEXT = re.compile(rf"\.(?:{_KEY})|{_ITEM}")
_BARE_KEY = re.compile(r'[^.\[\]"\\\x00-\x1f$][^.\[\]"\\\x00-\x1f]*\Z')

# JSON types in the order results sort by; a missing field (SQL NULL) sorts before all of them
_RANKS = {"null": 0, "false": 1, "true": 2, "integer": 3, "real": 3, "text": 4, "array": 5,
          "object": 6}
_NULL, _FALSE, _TRUE, _NUMBER, _STRING, _ARRAY = range(6)
_RANK_SQL = ("CASE json_type({column}, {path}) "
             + " ".join(f"WHEN '{name}' THEN {rank}" for name, rank in _RANKS.items()) + " END")
_ORDERING = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_ITEM_IS = {_NULL: "e.type = 'null'", _FALSE: "e.type = 'false'", _TRUE: "e.type = 'true'",
            _NUMBER: "e.type IN ('integer', 'real') AND e.value = ?",
            _STRING: "e.type = 'text' AND e.value = ?"}


def _sql_text(text, what="text") -> str:
    """``text`` as an SQL string literal: the one way beaver writes a string into SQL."""
    if "\x00" in text:
        raise ValidationError(f"{what} {text!r} holds a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what} {text!r} is not valid Unicode (a lone surrogate)") from None
    return "'" + text.replace("'", "''") + "'"


class _Path(typing.NamedTuple):
    text: str       # the canonical spelling: author.name, tags[0], "v1.2".notes
    sql: str        # the SQLite JSON path as an SQL literal: '$."author"."name"'
    parts: tuple = ()   # its keys (str) and array items (int), for other engines' spellings


def _field_path(path, where="a field path") -> _Path:
    """Check ``path`` against the path grammar; its canonical and SQL spellings.

    Keys are joined by dots (``author.name``), ``[N]`` is item N of an array (``tags[0]``),
    and a key holding a dot, a bracket or a leading ``$`` is written in double quotes
    (``"v1.2".notes``). Keys holding a double quote, a backslash or a control character
    cannot be addressed.
    """
    if not isinstance(path, str):
        raise ValidationError(f"{where}: a field path is a str, not {type(path).__name__}")
    try:
        return _parse_path(path)
    except ValidationError as e:
        raise ValidationError(f"{where}: {e}") from None


@functools.lru_cache(maxsize=1024)
def _parse_path(path) -> _Path:
    parts, at, pattern = [], 0, _PATH_FIRST
    while at < len(path) or not parts:
        match = pattern.match(path, at)
        if match is None:
            raise ValidationError(
                f"bad field path {path!r} at character {at} (keys joined by dots, [N] for an "
                'array item, "double quotes" around a key with . [ ] or a leading $)')
        bare, quoted, item = match.groups()
        parts.append(int(item) if item is not None else bare if bare is not None else quoted)
        at, pattern = match.end(), _PATH_NEXT
    text, sql = "", "$"
    for part in parts:
        if isinstance(part, int):
            text, sql = text + f"[{part}]", sql + f"[{part}]"
        else:
            key = part if _BARE_KEY.match(part) else f'"{part}"'
            text, sql = text + ("." if text else "") + key, sql + f'."{part}"'
    return _Path(text, _sql_text(sql, "the field path"), tuple(parts))


@functools.lru_cache(maxsize=1024)
def _json_terms(column, path) -> tuple:
    """The SQL of a path's JSON type rank and value: the two expressions a field index holds."""
    return _RANK_SQL.format(column=column, path=path.sql), f"json_extract({column}, {path.sql})"


def _scalar(value, where) -> tuple:
    """``(type rank, SQL value)`` of a filter operand, which must be a JSON scalar."""
    if value is None:
        return _NULL, None
    if isinstance(value, bool):
        return (_TRUE if value else _FALSE), None
    if isinstance(value, int):      # beyond 64 bits SQLite reads JSON integers as floats
        value = int(value)
        return _NUMBER, value if -2 ** 63 <= value < 2 ** 63 else _big_float(value, where)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{where}: {value!r} is not a JSON number")
        return _NUMBER, float(value)
    if isinstance(value, str):
        _sql_text(value, f"{where}: the string")    # SQLite's JSON functions cut at a NUL
        return _STRING, str(value)
    raise ValidationError(f"{where}: expected a JSON scalar (str, number, bool or None), "
                          f"not {type(value).__name__}")


def _big_float(value, where) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValidationError(f"{where}: an integer of {value.bit_length()} bits is beyond "
                              "the range of JSON numbers") from None


class _Filter:
    """A filter dict compiled to one SQL condition over the JSON column ``column``.

        >>> f = _Filter({"year": {"$gte": 2020}, "tags": {"$contains": "work"}}, "t.value")
        >>> f.params
        [2020, 'work']

    The whole filter is checked before any SQL runs: a malformed one raises ValidationError
    (a ValueError) naming the bad part. ``sql`` is never NULL for any row (so ``NOT`` is
    exact), ``params`` are its parameters in order, and ``indexable`` the canonical paths of
    top-level conditions that a field index can serve.
    """

    TRUE, FALSE = "1", "0"              # the engine's spellings of an always true/false condition
    _terms = staticmethod(_json_terms)  # (rank, value) SQL of a path; another engine's own

    def __init__(self, where, column):
        self.column = column
        self.params: list = []
        self.indexable: set = set()
        self._conditions = 0
        self.sql = self.TRUE if where is None else self._all(where, "where", 0, True)

    def _all(self, where, at, depth, top) -> str:
        """Every condition of a filter dict, joined by AND."""
        if not isinstance(where, dict):
            raise ValidationError(f"{at}: a filter is a dict of {{path: condition}}, "
                                  f"not {type(where).__name__}")
        if depth > FILTER_MAX_DEPTH:
            raise ValidationError(f"{at}: the filter nests deeper than {FILTER_MAX_DEPTH} levels")
        terms = []
        for key, condition in where.items():
            here = f"{at}[{key!r}]"
            if key in ("$and", "$or"):
                terms.append(self._logic(key, condition, here, depth, top))
            elif key == "$not":
                terms.append(f"NOT ({self._all(condition, here, depth + 1, False)})")
            elif isinstance(key, str) and key.startswith("$"):
                raise ValidationError(f"{here}: unknown operator (a field whose name starts "
                                      f"with $ is written in double quotes: '\"{key}\"')")
            else:
                path = _field_path(key, here)
                terms.append(self._field(path, condition, here, depth, top))
        return " AND ".join(f"({term})" for term in terms) or self.TRUE

    def _logic(self, op, filters, at, depth, top) -> str:
        if not isinstance(filters, (list, tuple)) or not filters:
            raise ValidationError(f"{at}: {op} takes a non-empty list of filters")
        terms = [self._all(f, f"{at}[{i}]", depth + 1, top and op == "$and")
                 for i, f in enumerate(filters)]
        return f" {op[1:].upper()} ".join(f"({term})" for term in terms)

    def _field(self, path, condition, at, depth, top) -> str:
        """The conditions on one path: an operator dict, a list ($in) or a value ($eq)."""
        if isinstance(condition, dict):
            if not condition or not all(isinstance(op, str) and op.startswith("$")
                                        for op in condition):
                raise ValidationError(f"{at}: a condition dict holds operators such as $eq or "
                                      "$gt (whole objects are not compared)")
            return " AND ".join(
                f"({self._operator(path, op, operand, f'{at}[{op!r}]', depth, top)})"
                for op, operand in condition.items())
        if isinstance(condition, (list, tuple)):
            return self._operator(path, "$in", condition, at, depth, top)
        return self._operator(path, "$eq", condition, at, depth, top)

    def _operator(self, path, op, operand, at, depth, top) -> str:
        self._conditions += 1
        if self._conditions > FILTER_MAX_CONDITIONS:
            raise ValidationError(f"{at}: a filter holds at most {FILTER_MAX_CONDITIONS} "
                                  "conditions")
        rank, value = self._terms(self.column, path)
        if op == "$not":
            if depth >= FILTER_MAX_DEPTH:
                raise ValidationError(f"{at}: the filter nests deeper than {FILTER_MAX_DEPTH} "
                                      "levels")
            return f"NOT ({self._field(path, operand, at, depth + 1, False)})"
        if op == "$exists":
            if not isinstance(operand, bool):
                raise ValidationError(f"{at}: $exists takes true or false, not {operand!r}")
            return f"{rank} IS {'NOT ' if operand else ''}NULL"
        if op in ("$in", "$nin"):
            sql, kinds = self._any(rank, value, operand, at)
            indexed = len(kinds) == 1
        elif op == "$contains":
            return self._contains(path, rank, _scalar(operand, at))
        elif op in ("$eq", "$ne"):
            sql, indexed = self._equal(rank, value, _scalar(operand, at)), True
        elif op in _ORDERING:
            sql, indexed = self._compare(rank, value, op, _scalar(operand, at), at), True
        else:
            raise ValidationError(f"{at}: unknown operator {op!r}")
        if op in ("$ne", "$nin"):
            return f"NOT ({sql})"
        if top and indexed:
            self.indexable.add(path.text)
        return sql

    def _equal(self, rank, value, typed) -> str:
        kind, operand = typed
        if kind < _NUMBER:          # null, false, true: the type says it all
            return f"{rank} IS {kind}"
        self.params.append(operand)
        return f"{value} = ? AND {rank} IS {kind}"

    def _compare(self, rank, value, op, typed, at) -> str:
        kind, operand = typed
        if kind not in (_NUMBER, _STRING):
            raise ValidationError(f"{at}: {op} compares numbers or strings, not {operand!r}")
        self.params.append(operand)
        return f"{value} {_ORDERING[op]} ? AND {rank} IS {kind}"

    def _any(self, rank, value, operands, at) -> tuple:
        """``$in``: equal to one of the operands (a list; one JSON array parameter per type)."""
        if not isinstance(operands, (list, tuple)):
            raise ValidationError(f"{at}: expected a list of values, not "
                                  f"{type(operands).__name__}")
        typed = [_scalar(v, f"{at}[{i}]") for i, v in enumerate(operands)]
        kinds = sorted({kind for kind, _ in typed})
        terms = []
        for kind in kinds:
            if kind < _NUMBER:
                terms.append(f"{rank} IS {kind}")
            else:
                self.params.append(_json_dumps([v for k, v in typed if k == kind]))
                terms.append(f"{value} IN (SELECT value FROM json_each(?)) AND {rank} IS {kind}")
        return " OR ".join(f"({term})" for term in terms) or self.FALSE, kinds

    def _contains(self, path, rank, typed) -> str:
        """``$contains``: the field is an array holding the operand."""
        kind, operand = typed
        if kind >= _NUMBER:
            self.params.append(operand)
        return (f"{rank} IS {_ARRAY} AND EXISTS (SELECT 1 FROM json_each({self.column}, "
                f"{path.sql}) AS e WHERE {_ITEM_IS[kind]})")


def _order_terms(order_by, column, json_terms=_json_terms) -> tuple:
    """``(ORDER BY terms, canonical paths)`` of ``order_by``: a path or a list of paths, each
    ``"-path"`` for descending. Values sort by JSON type (missing, null, false, true, numbers,
    strings, arrays, objects), then by value."""
    if order_by is None:
        return [], []
    items = [order_by] if isinstance(order_by, str) else order_by
    if not isinstance(items, (list, tuple)):
        raise ValidationError(f"order_by is a path or a list of paths, not "
                              f"{type(order_by).__name__}")
    terms, paths = [], []
    for item in items:
        descending = isinstance(item, str) and item.startswith("-")
        path = _field_path(item[1:] if descending else item, f"order_by {item!r}")
        direction = " DESC" if descending else ""
        terms += [term + direction for term in json_terms(column, path)]
        paths.append(path.text)
    return terms, paths


def _paging(limit, offset) -> list:
    """The ``LIMIT ? OFFSET ?`` parameters (``limit=None``: no limit)."""
    for value, what in ((limit, "limit"), (offset, "offset")):
        if value is None and what == "limit":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an int, not {value!r}")
        if value < 0:
            raise ValueError(f"{what} must not be negative, not {value!r}")
    return [-1 if limit is None else min(limit, 2 ** 63 - 1), min(offset, 2 ** 63 - 1)]


_JSON_CHECKED: list = []


def _check_json1(core):
    """FeatureUnavailable unless this SQLite has the JSON functions (built in since 3.38)."""
    if not _JSON_CHECKED:
        try:
            core.execute("SELECT json_type('[]')").fetchone()
        except BeaverError:
            raise FeatureUnavailable("this SQLite lacks the JSON functions that filters and "
                                     "field indexes need (built in since SQLite 3.38)") from None
        _JSON_CHECKED.append(True)


class _FieldIndexes:
    """The field indexes of one structure, the scope of its queries and their plans.

    A field index is a partial expression index on the structure's table: the JSON type rank
    and the value of one path, then the columns of the structure's own order (so it serves
    ``ORDER BY`` and keeps ties in order), over this structure's rows only. It is listed in
    ``beaver_indexes`` and lives in the file: every process and every later open uses it.
    """

    def __init__(self, core, kind, name, table, column, scope, order):
        self._core, self._kind, self._name = core, kind, name
        self._table, self._column, self._scope, self._order = table, column, scope, order
        self.json = f"{table}.{column}"     # the JSON column as queries name it

    def scope(self, paths, alias="") -> tuple:
        """``(SQL, parameters)`` of the condition selecting this structure's rows.

        With a field index on one of ``paths`` it is the index's own ``+name = '<name>'``:
        SQLite then cannot use the table's key instead (which its default estimates favour),
        and the text matches the partial index at once (a bound name matches too, but only by
        re-planning the statement at every call). Otherwise ``name = ?``. A query that
        aliases the table passes the ``alias`` (``+d.name = '<name>'`` matches the index too).
        """
        column = f"{alias}.{self._scope}" if alias else self._scope
        if paths and not set(paths).isdisjoint(self.paths()):
            return self._only_this(column), []
        return f"{column} = ?", [self._name]

    def _only_this(self, column=None) -> str:
        return f"+{column or self._scope} = {_sql_text(self._name, 'a structure name')}"

    def paths(self) -> list:
        """The canonical paths of this structure's field indexes, sorted."""
        rows = self._core.execute("SELECT path FROM beaver_indexes WHERE kind = ? AND name = ? "
                                  "ORDER BY path", (self._kind, self._name)).fetchall()
        return [path for path, in rows]

    def _index_name(self, path) -> str:
        digest = uuid.uuid5(uuid.NAMESPACE_OID, f"{self._kind}\x00{self._name}\x00{path}").hex
        return f"beaver_fx_{digest}"

    def _key_terms(self, path) -> str:
        """The indexed expressions of ``path``: its JSON type rank, then its value."""
        _check_json1(self._core)
        return ", ".join(_json_terms(self._column, path))

    def create(self, path):
        path = _field_path(path)
        only_this = self._only_this()
        terms = self._key_terms(path)
        with self._core.transaction():
            self._core.execute(
                f"CREATE INDEX IF NOT EXISTS {self._index_name(path.text)} ON {self._table} "
                f"({terms}, {self._order}) WHERE {only_this}")
            self._core.execute("INSERT OR IGNORE INTO beaver_indexes (kind, name, path) "
                               "VALUES (?, ?, ?)", (self._kind, self._name, path.text))

    def drop(self, path) -> bool:
        path = _field_path(path)
        self._only_this()               # a name SQL cannot hold has no index (and says why)
        with self._core.transaction():
            gone = self._core.execute(
                "DELETE FROM beaver_indexes WHERE kind = ? AND name = ? AND path = ?",
                (self._kind, self._name, path.text)).rowcount
            self._core.execute(f"DROP INDEX IF EXISTS {self._index_name(path.text)}")
        return gone > 0

    def explain(self, sql, params) -> dict:
        """``{"index": the path of the field index used or None, "plan": [...]}``."""
        plan = [row[3] for row in self._core.execute("EXPLAIN QUERY PLAN " + sql, params)]
        names = {self._index_name(path): path for path in self.paths()}
        used = [names[word] for line in plan for word in re.findall(r"\w+", line)
                if word in names]
        return {"index": used[0] if used else None, "plan": plan}


class _Indexed:
    """Filters and field indexes for the structures whose rows hold JSON (a mixin of their
    managers): ``_table`` has a ``_scope_column`` naming the structure, a ``_json_column``
    holding each row's JSON, and ``_order`` columns giving the structure's own order."""

    _scope_column = "name"
    _json_column = ""
    _order = ""

    @functools.cached_property
    def _fields(self) -> _FieldIndexes:
        return self._core.field_indexes(self._kind, self._name, self._table,
                                        self._json_column, self._scope_column, self._order)

    def _filter(self, where, order_by=None, column=None) -> tuple:
        """``(_Filter, ORDER BY terms, their paths)``, all checked before any SQL runs.

        ``column`` is the JSON column as the query names it (default ``table.column``; a query
        that aliases the table passes ``alias.column``: field indexes still match)."""
        column = column or self._fields.json
        query = self._core.compile_filter(where, column)
        order, paths = self._core.order_terms(order_by, column)
        if where is not None or order_by is not None:
            self._core.check_json()
        return query, order, paths

    def create_index(self, path):
        """Index the field at ``path``: filters and ordering on it stop reading every row.

            >>> users = db.dict("users")
            >>> users.update(ada={"name": "Ada", "age": 36}, bob={"name": "Bob", "age": 25})
            >>> users.create_index("age")
            >>> users.explain(where={"age": {"$gte": 30}})["index"]
            'age'

        A partial index over this structure's rows, stored in the file: every process and
        every later open use it. Creating an existing index does nothing; ``clear()`` keeps
        the indexes. Each index costs some work on every write to this structure.
        """
        self._fields.create(path)

    def drop_index(self, path) -> bool:
        """Drop the field index on ``path``; False if there was none.

            >>> users = db.dict("users")
            >>> users.create_index("age")
            >>> users.drop_index("age"), users.drop_index("age")
            (True, False)
        """
        return self._fields.drop(path)

    def indexes(self) -> list:
        """The paths of this structure's field indexes, canonically spelled and sorted.

            >>> users = db.dict("users")
            >>> users.create_index("author.name")
            >>> users.create_index("age")
            >>> users.indexes()
            ['age', 'author.name']
        """
        return self._fields.paths()


# ==========================================================================================
# Dict
# ==========================================================================================

_MISSING = object()
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


class DictManager(_Manager, _Indexed, MutableMapping):
    """A persistent ``dict`` of str keys, with optional expiry per key.

        >>> config = db.dict("app_config")
        >>> config["theme"] = "dark"
        >>> config.set("session", {"user": 1}, ttl_seconds=3600)
        >>> sorted(config)
        ['session', 'theme']
    """

    _kind = "dict"
    _table = "beaver_dicts"
    _json_column = "value"
    _order = "key"

    _GET = f"SELECT value FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}"
    _HAS = f"SELECT 1 FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}"
    _SET = ("INSERT INTO beaver_dicts (name, key, value, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at")
    _DEL = f"DELETE FROM beaver_dicts WHERE name = ? AND key = ? AND {_LIVE}"

    def __getitem__(self, key):
        if type(key) is not str:        # _stored's lines inlined: the hottest path of all
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

    def _stored(self, key) -> str:
        """The JSON text stored under ``key``, as it is (a server answers a get of a dict
        without a model with it: no decoding and encoding again); ``KeyError``.

            >>> db.dict("d")["k"] = {"a": [1, 2]}
            >>> db.dict("d")._stored("k")
            '{"a":[1,2]}'
        """
        if type(key) is not str:
            _check_key(key)
        row = self._core.one(self._GET, (self._name, key, _now()))
        if row is None:
            raise KeyError(key)
        return row[0]

    def set(self, key, value, ttl_seconds=None):
        """Store ``value`` under ``key``; with ``ttl_seconds`` it expires that much later.

            >>> cache = db.dict("cache")
            >>> cache.set("weather", {"temp": 21}, ttl_seconds=600)
            >>> cache["weather"]                       # for ten minutes
            {'temp': 21}

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

    def find(self, where=None, order_by=None, limit=None, offset=0) -> list:
        """Live ``(key, value)`` pairs whose value matches ``where``, in key order by default.

            >>> users = db.dict("users")
            >>> users.update(ada={"name": "Ada", "age": 36, "tags": ["admin"]},
            ...              bob={"name": "Bob", "age": 25, "tags": ["admin"]},
            ...              eve={"name": "Eve", "age": 41, "tags": ["dev"]})
            >>> users.find({"age": {"$gte": 30}, "tags": {"$contains": "admin"}},
            ...            order_by=["-age", "name"], limit=10)
            [('ada', {'name': 'Ada', 'age': 36, 'tags': ['admin']})]

        ``where`` is a filter (see "Queries and filters" in the README); ``order_by`` a field
        path or a list of them, ``"-path"`` for descending, ties in key order. Values may be
        JSON or models (paths then name the model's fields).
        """
        sql, params = self._find_query(where, order_by, limit, offset)
        decode = self._codec.decode
        return [(key, decode(text)) for key, text in self._core.execute(sql, params)]

    def explain(self, where=None, order_by=None) -> dict:
        """How SQLite would run ``find(where, order_by)``: the field index it uses, and its plan.

            >>> users = db.dict("users")
            >>> users.create_index("age")
            >>> users.explain(where={"age": 36})
            {'index': 'age', 'plan': ['SEARCH ... USING INDEX beaver_fx_...']}
        """
        return self._fields.explain(*self._find_query(where, order_by, None, 0))

    def _find_query(self, where, order_by, limit, offset) -> tuple:
        query, order, sort_paths = self._filter(where, order_by)
        scope, params = self._fields.scope([*query.indexable, *sort_paths[:1]])
        sql = (f"SELECT key, value FROM beaver_dicts WHERE {scope} AND {_LIVE} AND ({query.sql}) "
               f"ORDER BY {', '.join([*order, 'key'])} LIMIT ? OFFSET ?")
        return sql, [*params, _now(), *query.params, *_paging(limit, offset)]

    def _live_rows(self, columns="key, value"):
        """``columns`` of the live keys (key first), page by page, in key order."""
        now = _now()
        sql = (f"SELECT {columns} FROM beaver_dicts WHERE name = ? AND key %s ? AND "
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
        """Return the value of ``key``, storing ``default`` first if it is missing.

            >>> counters = db.dict("counters")
            >>> counters.setdefault("visits", 0), counters.setdefault("visits", 5)
            (0, 0)

        Of several callers at once (and a ``set`` meanwhile), each gets the value stored.
        """
        with self._core.transaction():
            value = self.get(key, _MISSING)
            while value is _MISSING:
                if self._add(key, default):
                    return default
                value = self.get(key, _MISSING)     # another connection stored it first
            return value

    # stores a value unless a live one is there: a write between a read that found nothing
    # and this one (a set outside the writers' lock, on PostgreSQL) is kept, not overwritten
    _ADD = ("INSERT INTO beaver_dicts (name, key, value, expires_at) VALUES (?, ?, ?, NULL) "
            "ON CONFLICT (name, key) DO UPDATE SET value = excluded.value, expires_at = NULL "
            "WHERE beaver_dicts.expires_at <= ?")

    def _add(self, key, value) -> bool:
        """Store ``value`` under ``key`` if no live value is there; True if it did."""
        text = self._codec.encode(value)
        added = self._core.execute(self._ADD, (self._name, key, text, _now())).rowcount == 1
        if added:
            self._wrote("set", key=key, value=_to_jsonable(value))
        return added

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

    def _export(self):
        for key, text, expires_at in self._live_rows("key, value, expires_at"):
            yield {"key": key, "value": _json_loads(text), "expires_at": expires_at}

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
        for _, text in self._rows():
            yield decode(text)

    def _rows(self):
        """``(pos, JSON text)`` in list order, page by page."""
        sql = ("SELECT pos, value FROM beaver_lists WHERE name = ? AND pos > ? "
               "ORDER BY pos LIMIT ?")
        return self._paged(sql, -(1 << 62))

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

    def _export(self):
        for _, text in self._rows():
            yield _json_loads(text)

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

            >>> jobs = db.queue("jobs")
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

            >>> jobs = db.queue("jobs")
            >>> jobs.put({"action": "reply"})
            >>> item = jobs.get(lease=30)
            >>> item.data                              # do the work, then
            {'action': 'reply'}
            >>> jobs.ack(item)
            True
        """
        timeout = _seconds(timeout, "timeout", wait=True)
        lease = _seconds(lease, "lease", positive=True)
        watcher, looked = self._core.watcher, [] if block else None
        tick = watcher.tick         # read before the first try: a change after it ends a wait
        item = self._take(lease, woken=False, looked=looked)
        if not block or self._core.in_transaction:
            if item is None and block:
                raise BeaverError(f"queue {self._name!r} is empty, and waiting inside a "
                                  "transaction would block every writer: use block=False")
            if item is None:
                raise QueueEmpty(f"queue {self._name!r} is empty")
            return item
        if item is None:
            take = functools.partial(self._take, lease, looked=looked)
            item = watcher.wait_for(take, timeout, cap=lambda: self._lease_due(looked),
                                    probed_at=tick)
        if item is None:
            raise Timeout(f"no item arrived in queue {self._name!r} within {timeout}s")
        return item

    def _take(self, lease=None, woken=True, looked=None):
        """The first item (None if there is none): ``woken`` looks with a read before taking
        the writers' lock; ``looked`` is handed to ``_takeable``."""
        core = self._core
        # a take wakes no waiter: only event listeners keep it off the one-statement path
        fast = lease is None and _HAS_RETURNING and self._codec is _JSON
        look_first = woken and not core.in_transaction
        events = self._db._events
        if fast and core.TAKE_OR_LOOK is not None and not core.in_transaction and \
                not events.listening(self._topic):
            row = core.one(core.TAKE_OR_LOOK, (self._name, _now(), events.origin))
            if row[2] is not None:
                return QueueItem(row[0], row[1], self._codec.decode(row[2]))
            if not self._seen(row[3], row[4], looked):
                return None
            fast = look_first = False   # a lease is due, or a listener: under the write lock
        fast = fast and not self._heard()
        if look_first and not self._takeable(looked):
            return None         # a waiter woken by some other write: no write lock for nothing
        if fast:
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

    def _takeable(self, looked=None) -> bool:
        """A read: is there an item, or an item whose lease ran out? The same read finds when
        the next lease runs out: appended to the list ``looked`` (for ``_lease_due``)."""
        queued, until = self._core.one(
            "SELECT EXISTS (SELECT 1 FROM beaver_queues WHERE name = ?), "
            "(SELECT min(until) FROM beaver_queue_leases WHERE name = ?)",
            (self._name, self._name))
        return self._seen(queued, until, looked)

    @staticmethod
    def _seen(queued, until, looked) -> bool:
        """Whether a look that found items ``queued`` and the first lease ending at ``until``
        (None: no lease) leaves something to take; appends the wait for that lease to the
        list ``looked`` (for ``_lease_due``)."""
        now = _now()
        if looked is not None:
            looked.append(None if until is None else max(0.0, until - now) + 0.0005)
        return bool(queued) or (until is not None and until <= now)

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

    def _lease_due(self, looked=None):
        """Seconds until the next lease of this queue runs out (bounds a blocked ``get``);
        what ``_takeable`` found, if it just ``looked``, else a read."""
        if looked:
            due = looked[-1]
            looked.clear()
            return due
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

    def _browse(self, offset, limit) -> dict:
        """A page for the dashboard: items in ``get`` order from ``offset``, and the leased
        items (the ``limit`` whose leases run out first) with the seconds left on each."""
        core, now = self._core, _now()
        items = core.execute("SELECT priority, timestamp, data FROM beaver_queues WHERE name = ? "
                             "ORDER BY priority, seq LIMIT ? OFFSET ?",
                             (self._name, *_paging(limit, offset))).fetchall()
        leased = core.execute("SELECT priority, timestamp, data, until FROM beaver_queue_leases "
                              "WHERE name = ? ORDER BY until LIMIT ?", (self._name, limit))
        count = self._leased_count()
        return {"items": [{"priority": p, "timestamp": t, "data": json.loads(d)}
                          for p, t, d in items],
                "leased": [{"priority": p, "timestamp": t, "data": json.loads(d),
                            "expires_in": max(0.0, u - now)} for p, t, d, u in leased],
                "leased_count": count}

    def _leased_count(self) -> int:
        return self._core.one("SELECT count(*) FROM beaver_queue_leases WHERE name = ?",
                              (self._name,))[0]

    def _export(self):
        """Queued items in ``get`` order, then leased ones (a restored dump hands those out
        again)."""
        queued = self._paged(
            "SELECT seq, priority, timestamp, data FROM beaver_queues WHERE name = ? AND "
            "(priority, seq) > (?, ?) ORDER BY priority, seq LIMIT ?",
            (float("-inf"), 0), key_of=lambda row: (row[1], row[0]))
        leased = self._paged(
            "SELECT lease, priority, timestamp, data FROM beaver_queue_leases WHERE name = ? "
            "AND lease > ? ORDER BY lease LIMIT ?", 0)
        for _, priority, timestamp, data in itertools.chain(queued, leased):
            yield {"priority": priority, "timestamp": timestamp, "data": _json_loads(data)}

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

    def _browse(self, offset, limit) -> list:
        """A page for the dashboard: ``{key, size, metadata}`` in key order (no data)."""
        rows = self._core.execute(
            "SELECT key, length(data), metadata FROM beaver_blobs WHERE name = ? ORDER BY key "
            "LIMIT ? OFFSET ?", (self._name, *_paging(limit, offset)))
        return [{"key": k, "size": n, "metadata": None if m is None else json.loads(m)}
                for k, n, m in rows]

    _load_batch = 1         # each blob may be large: load and copy_to hold one at a time

    def _export(self):
        """Keys page by page, each blob read on its own (one blob in memory at a time)."""
        for key in self:
            row = self._core.one("SELECT key, data, metadata FROM beaver_blobs WHERE name = ? "
                                 "AND key = ?", (self._name, key))
            if row is not None:         # None: deleted meanwhile (outside a snapshot)
                yield {"key": key, "data": base64.b64encode(row[1]).decode("ascii"),
                       "metadata": None if row[2] is None else _json_loads(row[2])}

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


class LogManager(_Manager, _Indexed):
    """A time-indexed log of structured entries, with range queries and live aggregates.

        >>> from datetime import datetime, timedelta, timezone
        >>> metrics = db.log("system_metrics")
        >>> metrics.log({"cpu": 0.4})
        >>> metrics.log({"cpu": 0.9}, timestamp=datetime.now(timezone.utc))
        >>> hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
        >>> [entry.data["cpu"] for entry in metrics.range(start=hour_ago)]
        [0.4, 0.9]

    Timestamps are ``datetime`` objects or epoch seconds; a naive ``datetime`` is taken as
    local time (as ``datetime.timestamp()`` does). Entries come back as ``LogEntry`` with an
    aware UTC timestamp, in time order (equal timestamps keep insertion order).
    ``retention`` (seconds or a ``timedelta``) drops older entries as new ones are logged.
    """

    _kind = "log"
    _table = "beaver_logs"
    _json_column = "data"
    _order = "timestamp"    # then seq: the rowid ends every index of the table

    _OPTIONS = {"retention": (None, lambda v: _seconds(v, "retention", positive=True))}

    def __init__(self, db, name, model=None, retention=_DEFAULT):
        super().__init__(db, name, model)
        self.retention = self._option("retention", retention)
        self._next_prune = 0.0

    def log(self, data, timestamp=None):
        """Append ``data`` at ``timestamp`` (default: now).

            >>> from datetime import datetime, timezone
            >>> metrics = db.log("system_metrics")
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

    def range(self, start=None, end=None, where=None, order="asc", limit=None, offset=0) -> list:
        """Entries with ``start <= timestamp <= end`` (either bound may be None), oldest first.

            >>> from datetime import datetime, timezone
            >>> logs = db.log("app")
            >>> logs.log({"level": "info"}, timestamp=datetime(2025, 1, 1, 9, tzinfo=timezone.utc))
            >>> logs.log({"level": "error"}, timestamp=datetime(2025, 1, 2, 9, tzinfo=timezone.utc))
            >>> for when, data in logs.range(start=datetime(2025, 1, 1, tzinfo=timezone.utc)):
            ...     print(when, data)
            2025-01-01 09:00:00+00:00 {'level': 'info'}
            2025-01-02 09:00:00+00:00 {'level': 'error'}
            >>> last_20 = logs.range(where={"level": "error"}, order="desc", limit=20)
            >>> [(entry.timestamp.day, entry.data) for entry in last_20]
            [(2, {'level': 'error'})]

        ``where`` keeps the entries whose data matches a filter (see "Queries and filters" in
        the README); ``order="desc"`` gives newest first; ``limit`` and ``offset`` page.
        """
        sql, params = self._range_query(start, end, where, order, limit, offset)
        decode = self._codec.decode
        return [LogEntry(_utc(t), decode(d)) for t, d in self._core.execute(sql, params)]

    def explain(self, where=None, start=None, end=None, order="asc") -> dict:
        """How SQLite would run ``range(start, end, where, order)``: the field index it uses
        (or None) and its plan.

            >>> logs = db.log("app")
            >>> logs.create_index("level")
            >>> logs.explain(where={"level": "error"})["index"]
            'level'
        """
        return self._fields.explain(*self._range_query(start, end, where, order, None, 0))

    def _range_query(self, start, end, where, order, limit, offset) -> tuple:
        if order not in ("asc", "desc"):
            raise ValueError(f"order is 'asc' or 'desc', not {order!r}")
        query = self._filter(where)[0]
        scope, params = self._fields.scope(query.indexable)
        terms = [scope]
        for bound, op, what in ((start, ">=", "start"), (end, "<=", "end")):
            if bound is not None:
                terms.append(f"timestamp {op} ?")
                params.append(_epoch(bound, what))
        sql = (f"SELECT timestamp, data FROM beaver_logs WHERE {' AND '.join(terms)} AND "
               f"({query.sql}) ORDER BY timestamp {order}, seq {order} LIMIT ? OFFSET ?")
        return sql, [*params, *query.params, *_paging(limit, offset)]

    def __iter__(self):
        decode = self._codec.decode
        for t, _, d in self._rows():
            yield LogEntry(_utc(t), decode(d))

    def _rows(self):
        """``(timestamp, seq, JSON text)`` in time order, page by page."""
        sql = ("SELECT timestamp, seq, data FROM beaver_logs WHERE name = ? AND (timestamp, seq) "
               "> (?, ?) ORDER BY timestamp, seq LIMIT ?")
        return self._paged(sql, (float("-inf"), 0), key_of=lambda row: row[:2])

    def __len__(self):
        return self._core.one("SELECT count(*) FROM beaver_logs WHERE name = ?",
                                  (self._name,))[0]

    def __bool__(self):
        return True

    def _counts(self, buckets, where=None) -> dict:
        """Entry counts (those matching ``where``) in ``buckets`` equal spans from the first
        entry to the last, for the dashboard's chart: ``{start, end, counts}``."""
        first = self.range(where=where, limit=1)
        if not first:
            return {"start": None, "end": None, "counts": []}
        start = first[0].timestamp.timestamp()
        end = self.range(where=where, order="desc", limit=1)[0].timestamp.timestamp()
        step = (end - start) / buckets or 1.0
        sql, params = self._range_query(None, None, where, "asc", None, 0)
        counts = [0] * buckets
        for bucket, count in self._core.execute(
                f"SELECT min(CAST((timestamp - ?) / ? AS INTEGER), ?), count(*) FROM ({sql}) "
                "GROUP BY 1", (start, step, buckets - 1, *params)):
            counts[bucket] += count
        return {"start": start, "end": end, "counts": counts}

    def live(self, window, period, aggregator=list, where=None) -> "LiveView":
        """An iterator of ``aggregator(entries in the last window)``, now and every ``period``.

            >>> from datetime import timedelta
            >>> logs = db.log("app")
            >>> logs.log({"level": "error"})
            >>> view = logs.live(window=timedelta(seconds=5), period=timedelta(seconds=1),
            ...                  aggregator=len, where={"level": "error"})
            >>> with view:
            ...     for count in view:                 # at once, then every second
            ...         print(count)
            ...         break
            1

        Each period reads only the rows logged since the last one (in any process). ``where``
        keeps the entries matching a filter, as in ``range``. Close the view with ``close()``
        or a ``with`` block; iteration then stops.
        """
        return LiveView(self, window, period, aggregator, where)

    def _export(self):
        for t, _, d in self._rows():
            yield {"timestamp": t, "data": _json_loads(d)}

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


class LiveView(Stream):
    """The stream returned by ``LogManager.live``: a rolling window, updated incrementally."""

    def __init__(self, log, window, period, aggregator, where=None):
        super().__init__()
        self._log = log
        self._where = log._filter(where)[0]
        self.window = _seconds(window, "window")
        self.period = _seconds(period, "period", positive=True)
        if self.window is None or self.period is None:
            raise TypeError("live() needs a window and a period (seconds or timedeltas)")
        if not callable(aggregator):
            raise TypeError("aggregator must be callable")
        self._aggregator = aggregator
        self._entries: collections.deque = collections.deque()   # (timestamp, seq, data)
        self._last_seq = None
        self._due_at = None
        self._stopped = threading.Event()

    def _next(self, timeout):
        wait = self._due()
        if timeout is not None and wait > timeout:
            if not self._stopped.wait(timeout):
                raise Timeout(f"no update of the live view within {timeout}s")
        if self.closed or (wait > 0 and self._stopped.wait(wait)):
            raise ClosedError("the live view is closed")
        return self._produce()

    def _stop(self):
        self._stopped.set()

    def _due(self) -> float:
        """Seconds until the next value is due."""
        return 0.0 if self._due_at is None else max(0.0, self._due_at - time.monotonic())

    def _produce(self):
        """Read the new rows, drop the old ones, and aggregate the window."""
        now = time.monotonic()
        self._due_at = now + self.period if self._due_at is None else max(
            self._due_at + self.period, now)
        if self._last_seq is None:
            self._load()
        else:
            try:
                self._read_new()
            except ConnectionError as e:    # the server is away (nothing was written): this
                if getattr(e, "written", True):     # value is of the rows read so far, and
                    raise                           # the next period reads what it missed
        cutoff = _now() - self.window
        entries = self._entries
        while entries and entries[0][0] < cutoff:
            entries.popleft()
        return self._aggregator([data for _, _, data in entries])

    def _load(self):
        core, log = self._log._core, self._log
        self._last_seq = core.execute("SELECT coalesce(max(seq), 0) FROM beaver_logs"
                                      ).fetchone()[0]
        where = self._where
        rows = core.execute(
            "SELECT timestamp, seq, data FROM beaver_logs WHERE name = ? AND timestamp >= ? "
            f"AND seq <= ? AND ({where.sql}) ORDER BY timestamp, seq",
            (log.name, _now() - self.window, self._last_seq, *where.params)).fetchall()
        decode = log._codec.decode
        self._entries.extend((t, s, decode(d)) for t, s, d in rows)

    def _read_new(self):
        log, where = self._log, self._where
        # every new row comes back, to move past it; the ones the filter drops without data
        rows = log._core.execute(
            f"SELECT timestamp, seq, CASE WHEN {where.sql} THEN data END FROM beaver_logs "
            "WHERE seq > ? AND +name = ? ORDER BY seq",
            (*where.params, self._last_seq, log.name)).fetchall()
        if not rows:
            return
        self._last_seq = rows[-1][1]
        decode, entries = log._codec.decode, self._entries
        for t, s, d in rows:
            if d is None:
                continue
            entry = (t, s, decode(d))
            if not entries or entries[-1][:2] <= entry[:2]:
                entries.append(entry)
            else:                   # logged with an older timestamp: keep the window sorted
                ordered = sorted([*entries, entry], key=lambda e: e[:2])
                self._entries = entries = collections.deque(ordered)

    def __repr__(self):
        return f"<LiveView {self._log.name!r} window={self.window}s period={self.period}s>"


# ==========================================================================================
# Channel
# ==========================================================================================

def _check_max_messages(max_messages):
    return None if max_messages is None else _count(max_messages, "max_messages", low=1)


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
        "max_messages": (CHANNEL_MAX_MESSAGES, _check_max_messages)}

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

            >>> chat = db.channel("chat")
            >>> sub = chat.subscribe()
            >>> chat.publish("hello")
            >>> with sub:                              # closes the subscription at the end
            ...     for message in sub.listen():       # waits for each message
            ...         print(message)
            ...         break
            hello
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

    def _export(self):
        for _, t, d in self._paged("SELECT seq, timestamp, data FROM beaver_channels WHERE "
                                   "name = ? AND seq > ? ORDER BY seq LIMIT ?", 0):
            yield {"timestamp": t, "payload": _json_loads(d)}

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


class Subscriber(Stream):
    """One subscription to a channel; use it in a ``with`` block and iterate ``listen()``."""

    def __init__(self, channel, sink=None):
        super().__init__()
        self.channel = channel
        if sink is not None:
            self._sink = sink
        self.start = 0
        channel._db._hub.add(self)

    @property
    def _what(self):
        return f"message on channel {self.channel.name!r}"

    def _decode(self, text):
        return self.channel._codec.decode(text)

    def _stop(self):
        self.channel._db._hub.remove(self)

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

        >>> with db.lock("nightly-report", timeout=10) as lock:     # waits its turn, 10 s at most
        ...     print("building the report; fencing token", lock.token)
        building the report; fencing token 1

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

            >>> lock = db.lock("nightly-report", ttl=60)
            >>> with lock:
            ...     lock.renew(300)                    # a long job: five more minutes

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
GRAMS_DELETE_MAX = 1000         # words leaving at once past which the trigram index is rebuilt
VECTOR_METRICS = ("l2", "cosine", "ip")
VECTOR_LOG_KEEP = 10000         # vector changes remembered for other processes' caches
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_TERM = re.compile(r"[^\W_]+")
_QUERY_TOKEN = re.compile(r'"[^"]*"?|[^\s"]+')
_BIG_ENDIAN = sys.byteorder == "big"
MATCH_MAX_LENGTH = 10000        # characters in a match() query (longer ones raise ValueError)
MATCH_MAX_TERMS = 64            # distinct words and phrases of a match() query (raw: its words)
_UNSEARCHABLE = re.compile("[\x00\ud800-\udfff]")    # NUL and lone surrogates: separators


# -- collection options -------------------------------------------------------------------

class _Option(typing.NamedTuple):
    """One option of a collection's vector index: its type, default and allowed values."""
    kind: type
    default: typing.Any
    low: typing.Any = None      # inclusive bounds of a number
    high: typing.Any = None
    choices: tuple = ()

    def check(self, name, value):
        if self.choices:
            ok, wanted = value in self.choices, "one of " + ", ".join(map(repr, self.choices))
        elif self.kind is bool:
            ok, wanted = isinstance(value, bool), "True or False"
        else:
            number = (int, float) if self.kind is float else int
            ok = (isinstance(value, number) and not isinstance(value, bool)
                  and not (isinstance(value, float) and math.isnan(value))
                  and self.low <= value <= self.high)
            wanted = f"{'a number' if self.kind is float else 'an int'} from {self.low} to {self.high}"
        if not ok:
            raise ValidationError(f"collection option {name!r} must be {wanted}, not {value!r}")


# The options of ``db.collection(name, **options)``, used by the ``beaver_vector`` index (the
# built-in exact search ignores them). Checked before anything is stored.
VECTOR_INDEX_OPTIONS = {
    "index": _Option(str, "auto", choices=("auto", "flat", "hnsw")),  # flat: exact, hnsw: ANN
    "ann_threshold": _Option(int, 20000, 1, 1 << 40),  # "auto" is HNSW from this many vectors
    "m": _Option(int, 32, 2, 256),                       # HNSW graph degree
    "ef_construction": _Option(int, 200, 1, 1 << 16),    # HNSW build breadth
    "ef_search": _Option(int, 64, 1, 1 << 16),           # HNSW search breadth (recall vs speed)
    "fold_min": _Option(int, 1000, 1, 1 << 40),      # fold the delta into the base at this size
    "fold_fraction": _Option(float, 0.05, 0.0, 1.0),  # ... or at this fraction of a flat base
    "rebuild_dead": _Option(float, 0.2, 0.0, 1.0),   # rebuild an HNSW base this fraction dead
    "filter_exact_below": _Option(int, 1000, 0, 1 << 40),  # where= this small: exact search
    "persist_fraction": _Option(float, 0.25, 0.0, 1.0),  # store a folded base this much new ...
    "persist_min": _Option(int, 1000, 0, 1 << 40),    # ... and with at least this many changes
    "part_bytes": _Option(int, 8 << 20, 1024, 1 << 29),  # the stored base is cut in such parts
    "build_chunk": _Option(int, 50000, 1, 1 << 30),  # vectors per step of an HNSW build
    "background": _Option(bool, True),               # fold in a thread (else only in compact())
}


def _check_vector_options(metric, options) -> dict:
    """``options`` (and ``metric`` unless None) as ``VECTOR_INDEX_OPTIONS`` allows, or
    ``ValidationError`` (a ``ValueError``) naming the first bad one and its allowed values."""
    if metric is not None and (not isinstance(metric, str) or metric not in VECTOR_METRICS):
        raise ValidationError(f"collection option 'metric' must be one of "
                              f"{', '.join(map(repr, VECTOR_METRICS))}, not {metric!r}")
    for name, value in options.items():
        option = VECTOR_INDEX_OPTIONS.get(name)
        if option is None:
            raise ValidationError(f"unknown collection option {name!r}; the options are "
                                  f"{', '.join(VECTOR_INDEX_OPTIONS)}")
        option.check(name, value)
    return options


def _stored_options(name, text) -> dict:
    """The stored options of collection ``name``; a value a file written before they were
    checked holds out of range is dropped (its default applies), with a warning."""
    good = {}
    for key, value in json.loads(text or "{}").items():
        try:
            _check_vector_options(None, {key: value})
        except ValidationError as e:
            logger.warning("collection %r: ignoring a stored option (%s)", name, e)
        else:
            good[key] = value
    return good


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


# -- the query language ------------------------------------------------------------------

class _Atom(typing.NamedTuple):
    text: str           # a word or phrase, quoted when written to FTS5
    prefix: bool


def _query_text(query) -> str:
    """A ``match()`` query checked (a str of at most ``MATCH_MAX_LENGTH`` characters), with
    NUL and lone surrogates, which no word can hold, turned into spaces."""
    if not isinstance(query, str):
        raise TypeError(f"a query is a str, not {type(query).__name__}")
    if len(query) > MATCH_MAX_LENGTH:
        raise ValidationError(f"a query may have at most {MATCH_MAX_LENGTH:,} characters, "
                              f"not {len(query):,}")
    return _UNSEARCHABLE.sub(" ", query)


def _check_term_count(count):
    if count > MATCH_MAX_TERMS:
        raise ValidationError(f"a query may have at most {MATCH_MAX_TERMS} distinct terms "
                              "(words or phrases; every word of a raw query counts)")


def _parse_query(text):
    """Plain user text as ``(groups, negatives)``: AND of OR-groups of atoms, minus negatives.

    Understood: words, "quoted phrases", ``prefix*``, ``OR``, ``AND``, ``-word``, ``NOT word``.
    Everything else is text, so no input can produce an FTS5 syntax error. A repeated atom
    or group counts once; more than ``MATCH_MAX_TERMS`` distinct atoms raise ``ValueError``.
    """
    groups, negatives, distinct = [], [], set()
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
            distinct.add(atom)
            _check_term_count(len(distinct))
            if negate:
                negatives.append(atom)
            elif join and groups:
                groups[-1].append(atom)
            else:
                groups.append([atom])
        negate = join = False
    unique = dict.fromkeys(tuple(dict.fromkeys(group)) for group in groups)
    return [list(group) for group in unique], list(dict.fromkeys(negatives))


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


def _ensure_fts(core) -> bool:
    """Create the FTS5 tables once per database; False where SQLite lacks FTS5."""
    ready = getattr(core, "_fts_ready", None)
    if ready is None:
        ready = _has_fts5()
        if ready:
            for statement in _FTS_SCHEMA:     # no write (nor lock) when they exist
                core.execute(statement)
            core.on_rollback(lambda: setattr(core, "_fts_ready", None))     # the tables may go
        else:
            logger.warning("this SQLite has no FTS5: collections work without text search")
        core._fts_ready = ready
    return ready


def _has_fts5() -> bool:
    """Whether this SQLite has FTS5 (a probe, not a reading of error messages)."""
    return _sqlite_accepts("CREATE VIRTUAL TABLE t USING fts5(x)")


@functools.lru_cache(maxsize=None)
def _sqlite_accepts(statement) -> bool:
    """Whether this SQLite library runs ``statement`` (on a throwaway in-memory database)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(statement)
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.close()


# -- the trigram index of known words, and files that move between SQLite versions ----------

def _has_trigram() -> bool:
    """Whether this SQLite's FTS5 has the trigram tokenizer (3.34 and newer)."""
    return _sqlite_accepts("CREATE VIRTUAL TABLE t USING fts5(x, tokenize = 'trigram')")


def _gram_worthy(term) -> bool:
    """Whether ``term`` goes into the trigram index (only 2-typo searches use it)."""
    return len(term) >= FUZZY_MIN_LENGTH[1] - 2 and term.isalpha()


def _grams_complete(core) -> bool:
    return bool(core.execute(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'beaver_grams') AND NOT "
        "EXISTS (SELECT 1 FROM beaver_meta WHERE key = 'grams_stale')").fetchone()[0])


def _ensure_grams(core, recheck=False) -> bool:
    """Whether the trigram index of known words (``beaver_grams``) can be used.

    It needs FTS5's trigram tokenizer (SQLite 3.34+). Where it is missing, words are still
    added to the vocabulary, and the file is marked (``grams_stale`` in beaver_meta); a
    newer SQLite that finds the table missing or marked rebuilds it from the vocabulary,
    once, under the write lock. ``recheck`` looks at the file again (searches do: another
    process may be on an older SQLite).
    """
    ready = getattr(core, "_grams_ready", None)
    if ready is not None and not (ready and recheck):
        return ready
    if not _has_trigram():
        logger.warning("this SQLite has no FTS5 trigram tokenizer (3.34+): fuzziness 2 acts as 1")
        core._grams_ready = False
        return False
    if not _grams_complete(core):
        try:
            _rebuild_grams(core)
        except BeaverError as e:     # a read-only file (for good), a busy one (for now)
            logger.warning("the trigram index of %r could not be rebuilt: %s", core.path, e)
            if not isinstance(e, DatabaseBusy):
                core._grams_ready = False
            return False
        if core.in_transaction:      # the table may go with a rollback
            core.on_rollback(lambda: setattr(core, "_grams_ready", None))
    core._grams_ready = True
    return True


def _rebuild_grams(core):
    with core.transaction():
        if _grams_complete(core):    # another process rebuilt it meanwhile
            return
        core.execute("CREATE VIRTUAL TABLE IF NOT EXISTS beaver_grams USING fts5("
                     "term, tokenize = 'trigram')")
        core.execute("DELETE FROM beaver_grams")
        grams = [(f"${term}$",) for (term,) in core.execute("SELECT term FROM beaver_terms")
                 if _gram_worthy(term)]
        core.executemany("INSERT INTO beaver_grams (term) VALUES (?)", grams)
        core.execute("DELETE FROM beaver_meta WHERE key = 'grams_stale'")
    logger.info("rebuilt the trigram index of %r (%d words)", core.path, len(grams))


# -- the parts of a collection, each with its own tables and state ---------------------------

class _DocumentRows:
    """The rows of one collection in ``beaver_documents``: id, body, and the vector joined.

    Each row also has an internal integer id (its rowid) that the text index uses, and that
    filters resolve to for vector search (``allowed``).
    """

    _COLUMNS = ("SELECT d.doc_id, d.body, v.vector, d.id FROM beaver_documents d LEFT JOIN "
                "beaver_vectors v ON v.collection = d.collection AND v.doc_id = d.doc_id ")
    _SELECT = _COLUMNS + "WHERE d.collection = ? "
    ALLOWED_KEEP = 8            # filters whose allowed ids are kept (a byte per rowid each)
    ALLOWED_PATCH = 1000        # changes past which a kept answer is read again, not patched
    SEEN_KEEP = 64              # filters remembered as seen once (read in full when seen again)

    def __init__(self, core, name, codec):
        self._core, self._name, self._codec = core, name, codec
        self._allowed = collections.OrderedDict()   # (SQL, params) -> (version, _Allowed)
        self._seen = collections.OrderedDict()      # (SQL, params) of filters seen, unread
        self._allowed_lock = threading.Lock()

    def write(self, doc_id, body) -> tuple:
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
        rowid = self._rowid(doc_id)
        self._core.execute("UPDATE beaver_documents SET body = ? WHERE id = ?", (body, rowid))
        return rowid, True

    def delete(self, doc_id):
        """Delete the row: its rowid, or None if there was none."""
        rowid = self._rowid(doc_id)
        if rowid is not None:
            self._core.execute("DELETE FROM beaver_documents WHERE id = ?", (rowid,))
        return rowid

    def _rowid(self, doc_id):
        row = self._core.execute("SELECT id FROM beaver_documents WHERE collection = ? AND "
                                 "doc_id = ?", (self._name, doc_id)).fetchone()
        return None if row is None else row[0]

    def clear(self):
        self._core.execute("DELETE FROM beaver_documents WHERE collection = ?", (self._name,))

    def document(self, row) -> Document:
        doc = Document.__new__(Document)
        vector = row[2]
        doc.__dict__.update(id=row[0], body=None if row[1] is None else self._codec.decode(row[1]),
                            _embedding=None if vector is None else _Packed(vector))
        return doc

    def get(self, doc_id):
        row = self._core.execute(self._SELECT + "AND d.doc_id = ?", (self._name, doc_id)).fetchone()
        return None if row is None else self.document(row)

    def by(self, column, keys, check=None) -> dict:
        """``{key: Document}`` of the documents whose ``column`` ('id' or 'doc_id') is in keys
        (and that match ``check``, a ``_Filter`` on ``d.body``, when given)."""
        at = 3 if column == "id" else 0
        keys = keys if isinstance(keys, list) else list(keys)
        condition, extra = ("", []) if check is None else (f" AND ({check.sql})", check.params)
        found, make = {}, self.document
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = self._core.execute(self._select_in(column, len(chunk)) + condition,
                                      (self._name, *chunk, *extra)).fetchall()
            for row in rows:
                found[row[at]] = make(row)
        return found

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _select_in(column, n) -> str:
        sql = _DocumentRows._SELECT + f"AND d.{column} IN ({_marks(n)})"
        if column == "id":      # rowid lookups, not a scan of the collection's index
            sql = sql.replace("WHERE d.collection", "WHERE +d.collection")
        return sql

    def present(self, doc_ids) -> set:
        """Which of a few ``doc_ids`` have a row."""
        doc_ids = list(doc_ids)
        return {row[0] for row in self._core.execute(
            f"SELECT doc_id FROM beaver_documents WHERE collection = ? AND doc_id IN "
            f"({_marks(len(doc_ids))})", (self._name, *doc_ids))}

    def count(self) -> int:
        return self._core.execute("SELECT count(*) FROM beaver_documents WHERE collection = ?",
                                  (self._name,)).fetchone()[0]

    def rows(self, paged):
        """Every row in id order, page by page (``paged`` is the manager's ``_paged``)."""
        return paged(self._SELECT + "AND d.doc_id > ? ORDER BY d.doc_id LIMIT ?", "")

    def allowed(self, condition, params, lazy=False):
        """The rowids of the documents matching ``condition`` (SQL on ``beaver_documents d``):
        an ``_Allowed``; with ``lazy``, a ``_Pending`` the first time a filter is seen.

        Kept for the collection's version (it counts every change to its documents), so a
        filter repeated while the documents are unchanged costs one read of the version.
        After changes, a kept answer is brought up to date from the change log by checking
        the changed documents only (``ALLOWED_PATCH`` at most); else, or the first time, one
        statement reads them all: SQLite joins the ids into one string that numpy parses.
        Nothing is kept from inside a transaction: its writes may yet be rolled back.
        """
        key = (condition, tuple(params))
        with self._allowed_lock:
            kept = self._allowed.get(key)
            if kept is not None:
                self._allowed.move_to_end(key)
            elif lazy and key not in self._seen:
                self._seen[key] = True
                while len(self._seen) > self.SEEN_KEEP:
                    self._seen.popitem(last=False)
                return _Pending(self, condition, params)
        version = self._version()
        if kept is not None and kept[0] == version:
            return kept[1]
        found = None if kept is None else self._patched(kept, condition, params)
        if found is None:
            version, ids = self._core.execute(
                "SELECT (SELECT version FROM beaver_collections WHERE collection = ?), "
                f"group_concat(d.id) FROM beaver_documents d WHERE {condition}",
                (self._name, *params)).fetchone()
            found = version, _Allowed(ids)
        if not self._core.in_transaction:
            with self._allowed_lock:
                self._allowed[key] = found
                self._allowed.move_to_end(key)
                while len(self._allowed) > self.ALLOWED_KEEP:
                    self._allowed.popitem(last=False)
        return found[1]

    def _patched(self, kept, condition, params):
        """``kept`` (version, _Allowed) brought up to date: (version, new _Allowed), or None
        when the log no longer holds every change since (trimmed, cleared) or too many."""
        since, allowed = kept
        log = self._core.execute(
            "SELECT version, doc_id FROM beaver_vector_log WHERE collection = ? AND version > ? "
            "ORDER BY version LIMIT ?", (self._name, since, self.ALLOWED_PATCH + 1)).fetchall()
        if not log or log[0][0] != since + 1 or len(log) > self.ALLOWED_PATCH:
            return None
        rows = []       # (rowid, matches) of each changed document still there
        for chunk in _chunks({doc_id for _, doc_id in log}):
            rows += self._core.execute(
                f"SELECT d.id, ({condition}) FROM beaver_documents d WHERE d.collection = ? "
                f"AND d.doc_id IN ({_marks(len(chunk))})", (*params, self._name, *chunk))
        return log[-1][0], allowed.patched([r for r, ok in rows if ok],
                                           [r for r, ok in rows if not ok])

    def passing(self, condition, params, rowids) -> set:
        """Which of ``rowids`` (a few) are documents matching ``condition``: looked up by
        rowid (NOT INDEXED: a field index would scan every matching document instead)."""
        found = set()
        for chunk in _chunks(rowids):
            ids = self._core.execute(
                f"SELECT group_concat(d.id) FROM beaver_documents d NOT INDEXED WHERE d.id IN "
                f"({_marks(len(chunk))}) AND {condition}", (*chunk, *params)).fetchone()[0]
            found.update(map(int, ids.split(",")) if ids else ())
        return found

    def _version(self) -> int:
        return self._core.execute("SELECT version FROM beaver_collections WHERE collection = ?",
                                  (self._name,)).fetchone()[0]


def _numpy():
    """numpy, or None where it does not import (beaver.py works without it)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


class _Allowed:
    """The documents a filter lets through, by rowid: what vector search takes.

    With numpy, a bool per rowid (``test`` checks many rowids at once); without, ``rowids``
    is a frozenset. Never changed once made (``patched`` makes another): the collection
    hands the same object to every search with the same filter while its documents are
    unchanged, so a vector index may keep what it derives from one (by identity). The rowid
    of a dropped document may stay in it: no vector has that rowid.

    A patched one knows where it came from: ``parent()`` (a weak reference, None for one
    read whole) and ``changed`` (the rowids that may differ from it), so what an index
    derived from the parent can be brought forward by looking at those rowids only.
    """

    parent = None
    changed = ()
    listed = None       # the rowids as an array, when a few are allowed and it was read whole

    def __init__(self, ids):
        """``ids``: the rowids joined by commas (SQLite's ``group_concat``), or None."""
        np = self.np = _numpy()
        if np is None:
            self.rowids = frozenset(map(int, ids.split(","))) if ids else frozenset()
            return
        rowids = np.fromstring(ids, np.int64, sep=",") if ids else np.empty(0, np.int64)
        self._mask = np.zeros(int(rowids.max()) + 2 if len(rowids) else 1, bool)
        self._mask[rowids] = True       # the last entry stays False: -1 and beyond land there
        self._count = len(rowids)
        if 64 * len(rowids) < len(self._mask):      # a few: listed too, for quick lookups
            self.listed = rowids

    def __len__(self):
        return len(self.rowids) if self.np is None else self._count

    def test(self, rowids):
        """Which of ``rowids`` (int64 numpy values; -1 for none) are allowed: bools."""
        rowids = self.np.asarray(rowids, self.np.int64)
        return self._mask[rowids.clip(-1, len(self._mask) - 1)]

    def patched(self, allow, deny) -> "_Allowed":
        """This one with the rowids ``allow`` in and ``deny`` out: itself when that changes
        nothing (so what was derived from it stays valid), else another.

            >>> before = _Allowed("1,2,3")
            >>> before.patched([2], [7]) is before
            True
            >>> after = before.patched([5], [1])
            >>> len(after), after.parent() is before, sorted(map(int, after.changed))
            (3, True, [1, 5])
        """
        new = _Allowed.__new__(_Allowed)
        np = new.np = self.np
        if np is None:
            new.rowids = (self.rowids - set(deny)) | set(allow)
            if new.rowids == self.rowids:
                return self
            new.parent, new.changed = weakref.ref(self), (*allow, *deny)
            return new
        allow, deny = np.array(allow, np.int64), np.array(deny, np.int64)
        allowed_before, denied_before = self.test(allow), self.test(deny)
        if allowed_before.all() and not denied_before.any():
            return self
        new._count = (self._count + len(allow) - int(allowed_before.sum())
                      - int(denied_before.sum()))
        new._mask = np.zeros(max(len(self._mask), int(allow.max()) + 2 if len(allow) else 0),
                             bool)
        new._mask[:len(self._mask)] = self._mask
        new._mask[allow] = True
        new._mask[deny[deny < len(new._mask) - 1]] = False
        new.parent, new.changed = weakref.ref(self), np.concatenate([allow, deny])
        return new


class _Pending:
    """A filter seen for the first time, not read yet: vector search may check only its
    nearest candidates (``passing``: bools, one per rowid) when the filter lets many
    documents through, or read it all (``resolve``: the ``_Allowed``, kept from then on).

        >>> docs = db.collection("docs")
        >>> docs.index_many(Document(id=f"d{i}", body={"n": i}) for i in range(4))
        4
        >>> pending = docs._allowed(docs._check({"n": {"$gte": 2}}), lazy=True)
        >>> [bool(ok) for ok in pending.passing([docs._rows._rowid(f"d{i}") for i in range(4)])]
        [False, False, True, True]
        >>> len(pending.resolve())
        2
    """

    def __init__(self, rows, condition, params):
        self._rows, self._condition, self._params = rows, condition, params

    def passing(self, rowids) -> list:
        rowids = [int(r) for r in rowids]
        found = self._rows.passing(self._condition, self._params, [r for r in rowids if r >= 0])
        return [r in found for r in rowids]

    def resolve(self) -> _Allowed:
        return self._rows.allowed(self._condition, self._params)


class _Vocabulary:
    """The words of one collection (``beaver_terms``) and their trigrams (``beaver_grams``,
    shared by every collection: one row per collection and word), for typo-tolerant search.

    Words leave only with ``clear`` and ``forget`` (see ``_TextIndex.prune``), which bump the
    collection's epoch. The words known to be stored are kept in memory for that epoch (read
    once per transaction), so a write checks its words in a set. A transaction's own words
    join that set when it commits; a rollback, of a savepoint too, takes back what it added.
    """

    GRAM_TABLE = True       # keeps beaver_grams itself (an engine may index the words alone)

    def __init__(self, core, name, cid):
        self._core, self._name, self._cid = core, name, cid
        self._known = (None, set())         # (epoch, committed words) for every thread
        self._local = threading.local()     # this thread's transaction: token, epoch, added

    def _transaction(self):
        """This thread's transaction state: the epoch (read once) and the words it added."""
        local, token = self._local, self._core.transaction_token()
        if token is None or getattr(local, "token", None) is not token:
            local.token, local.added = token, set()
            local.epoch = self._core.execute("SELECT epoch FROM beaver_collections WHERE "
                                             "collection = ?", (self._name,)).fetchone()[0]
        return local

    def add(self, words):
        """Record the new ones of ``words`` (inside the caller's write transaction)."""
        state = self._transaction()
        epoch, known = self._known
        if epoch != state.epoch:
            known = {row[0] for row in self._core.execute(
                "SELECT term FROM beaver_terms WHERE cid = ?", (self._cid,))}
            self._known = (state.epoch, known)      # it holds this transaction's words:
            self._core.on_rollback(self._forget_known)
        new = {word for word in words if len(word) <= FUZZY_MAX_TERM} - known - state.added
        if not new:
            return
        grams = [(f"${term}$",) for term in sorted(new)
                 if _gram_worthy(term)] if self.GRAM_TABLE else []
        usable = bool(grams) and _ensure_grams(self._core)    # before the new words go in
        self._core.executemany("INSERT OR IGNORE INTO beaver_terms (cid, term) VALUES (?, ?)",
                               [(self._cid, term) for term in sorted(new)])
        if usable:
            self._core.executemany("INSERT INTO beaver_grams (term) VALUES (?)", grams)
        elif grams:
            self._mark_grams_stale()
        state.added |= new
        self._core.on_rollback(lambda: state.added.difference_update(new))
        self._core.after_commit(lambda: known.update(new))

    def _two_edits(self) -> bool:
        """Whether words two edits away can be looked up (a search checks the file again)."""
        return _ensure_grams(self._core, recheck=True)

    def _forget_known(self):
        self._known = (None, set())

    def forget(self, words):
        """Remove ``words`` (no document of the collection holds them any more)."""
        gone = self.present(words)
        self._core.executemany("DELETE FROM beaver_terms WHERE cid = ? AND term = ?",
                               [(self._cid, term) for term in gone])
        self._forget_grams(gone)
        self._new_epoch()

    def clear(self):
        if self.GRAM_TABLE:
            self._forget_grams(self.all())
        self._core.execute("DELETE FROM beaver_terms WHERE cid = ?", (self._cid,))
        self._new_epoch()

    def all(self) -> list:
        return [row[0] for row in self._core.execute(
            "SELECT term FROM beaver_terms WHERE cid = ?", (self._cid,))]

    def _new_epoch(self):
        """Words left: every process reloads its word set (this one at once)."""
        state = self._transaction()     # reads the epoch: before it moves
        self._core.execute("UPDATE beaver_collections SET epoch = epoch + 1 WHERE collection = ?",
                           (self._name,))
        before = (state.epoch, state.added)
        state.epoch, state.added = state.epoch + 1, set()
        self._core.on_rollback(lambda: (setattr(state, "epoch", before[0]),
                                        setattr(state, "added", before[1])))

    def _forget_grams(self, terms):
        """Delete this collection's trigram row of each of ``terms``; for many, let the next
        two-edit search rebuild the whole trigram index instead."""
        grams = [f"${term}$" for term in terms if _gram_worthy(term)] if self.GRAM_TABLE else []
        if grams and len(grams) <= GRAMS_DELETE_MAX and _ensure_grams(self._core):
            self._core.executemany(
                "DELETE FROM beaver_grams WHERE rowid = (SELECT rowid FROM beaver_grams "
                "WHERE beaver_grams MATCH ? AND term = ? LIMIT 1)",
                [(_fts_atom(_Atom(gram, False)), gram) for gram in grams])
        elif grams:
            self._mark_grams_stale()

    def _mark_grams_stale(self):
        """The trigram index misses words or keeps dead ones: the next use rebuilds it."""
        self._core.execute("INSERT OR IGNORE INTO beaver_meta (key, value) "
                           "VALUES ('grams_stale', '1')")

    def present(self, terms) -> list:
        """The ones of ``terms`` in the vocabulary (asking the database)."""
        found = []
        for chunk in _chunks(terms):
            found += [row[0] for row in self._core.execute(
                f"SELECT term FROM beaver_terms WHERE cid = ? AND term IN "
                f"({_marks(len(chunk))})", (self._cid, *chunk))]
        return found

    def spellings(self, atom, fuzziness) -> list:
        """The known words within ``fuzziness`` edits of a one-word atom, best first."""
        words = _terms(atom.text)
        if atom.prefix or len(words) != 1 or len(words[0]) > FUZZY_MAX_TERM:
            return [atom.text]
        word = words[0]
        limit = min(fuzziness, sum(len(word) >= n for n in FUZZY_MIN_LENGTH))
        if limit == 0:
            return [word]
        if limit > 1 and self._two_edits():
            candidates = self._trigram_candidates(word, limit)
        else:
            limit = 1
            candidates = self.present(_neighbourhood(word) | {word})
        scored = [(_edit_distance(word, term, limit), term) for term in candidates]
        scored = sorted((d, not _slip(word, term), term) for d, term in scored if d <= limit)
        frequency = self._frequencies([term for _, _, term in scored])
        scored.sort(key=lambda item: (item[0], item[1], -frequency.get(item[2], 0), item[2]))
        return [term for _, _, term in scored] or [word]

    def _trigram_candidates(self, word, limit) -> list:
        """Words of this collection sharing enough trigrams with ``word`` (the trigram index
        holds every collection's words: the ones found are checked against this one's)."""
        grams = _trigrams(word)
        need = max(1, len(grams) - 4 * limit)
        query = " OR ".join('"' + gram.replace('"', '""') + '"' for gram in sorted(grams))
        found = set()
        for (padded,) in self._core.execute(
                "SELECT term FROM beaver_grams WHERE beaver_grams MATCH ?", (query,)):
            term = padded[1:-1]
            if abs(len(term) - len(word)) <= limit and len(_trigrams(term) & grams) >= need:
                found.add(term)
        return self.present(found)

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


def _narrowed(sql, params, paths, within) -> str:
    """A text index query ``sql`` kept to the field ``paths`` and the ``within`` condition
    (``(SQL, parameters)``), when given; their parameters are appended to ``params``."""
    if paths is not None:
        sql += " AND (" + " OR ".join(["path = ? OR substr(path, 1, ?) = ?"] * len(paths)) + ")"
        for p in paths:
            params += [p, len(p) + 1, p + "."]
    if within is not None:
        sql += f" AND {within[0]}"
        params += within[1]
    return sql


class _TextIndex:
    """The full-text rows of one collection in ``beaver_fts`` (FTS5) and their ranking.

    One row per text field of a document; rowid = collection id | document rowid | field
    number (see ``_FTS_*_BITS``), so the collection is one rowid range. New words go to the
    vocabulary; words no row holds any more leave it at the next ``prune`` (``compact()``).
    """

    def __init__(self, core, name, cid, words, enabled=True):
        self._core, self._name, self._cid, self._words = core, name, cid, words
        self.enabled = enabled
        self._low = cid << (_FTS_DOC_BITS + _FTS_PATH_BITS)       # the collection's rowids
        self._high = self._low + (1 << (_FTS_DOC_BITS + _FTS_PATH_BITS))

    def _rowid(self, doc_rowid) -> int:
        if doc_rowid >= 1 << _FTS_DOC_BITS or \
                self._cid >= 1 << (63 - _FTS_DOC_BITS - _FTS_PATH_BITS):
            raise BeaverError("too many documents or collections for the text index")
        return (self._cid << (_FTS_DOC_BITS + _FTS_PATH_BITS)) | (doc_rowid << _FTS_PATH_BITS)

    # -- writes ------------------------------------------------------------------------

    @staticmethod
    def batch():
        """An empty batch for ``write``: (rows, words), written by ``flush``."""
        return [], set()

    def write(self, doc_rowid, texts, existed=True, batch=None):
        """Replace a document's text rows (new rows wait in ``batch`` when given)."""
        if not self.enabled:
            return
        base = self._rowid(doc_rowid)
        if existed:
            self._delete_rows(base)
        rows, words = self.batch() if batch is None else batch
        for i, (path, text) in enumerate(texts):
            terms = _terms(text)
            rows.append(self._row(base + i, text, path, terms))
            words.update(terms)
        if batch is None:
            self.flush((rows, words))

    _INSERT = "INSERT INTO beaver_fts (rowid, text, collection, path) VALUES (?, ?, ?, ?)"

    def _row(self, rowid, text, path, terms) -> tuple:
        """The ``_INSERT`` parameters of one field's row (``terms``: its words, split once
        for the row and the vocabulary)."""
        return rowid, text, self._name, path

    def flush(self, batch):
        rows, words = batch
        if rows:
            self._core.executemany(self._INSERT, rows)
            self._words.add(words)

    def remove(self, doc_rowid):
        """Delete a document's text rows."""
        if self.enabled:
            self._delete_rows(self._rowid(doc_rowid))

    def _delete_rows(self, base):
        self._core.execute("DELETE FROM beaver_fts WHERE rowid >= ? AND rowid < ?",
                           (base, base + (1 << _FTS_PATH_BITS)))

    def prune(self):
        """Forget the words no text row of the collection holds any more (those of dropped
        or rewritten documents): the rows are read without the write lock, and the few
        candidates checked again, and removed, in one short transaction."""
        if not self.enabled:
            return
        held = set()
        for (text,) in self._core.execute(
                "SELECT text FROM beaver_fts WHERE rowid >= ? AND rowid < ?",
                (self._low, self._high)):
            held.update(_terms(text))
        candidates = [word for word in self._words.all() if word not in held]
        if candidates:
            with self._core.transaction():
                gone = [word for word in candidates if not self._holds(word)]
                if gone:
                    self._words.forget(gone)

    def _holds(self, word) -> bool:
        """Whether a text row of this collection still holds ``word``."""
        return self._core.execute(
            "SELECT 1 FROM beaver_fts WHERE beaver_fts MATCH ? AND rowid >= ? AND rowid < ? "
            "LIMIT 1", (_fts_atom(_Atom(word, False)), self._low, self._high)).fetchone() is not None

    def clear(self):
        if self.enabled:
            self._core.execute("DELETE FROM beaver_fts WHERE rowid >= ? AND rowid < ?",
                               (self._low, self._high))
        self._words.clear()

    def optimize(self):
        if self.enabled:
            with self._core.transaction():
                self._core.execute("INSERT INTO beaver_fts (beaver_fts) VALUES ('optimize')")

    # -- search ------------------------------------------------------------------------

    DOCUMENT = f"((beaver_fts.rowid >> {_FTS_PATH_BITS}) & {(1 << _FTS_DOC_BITS) - 1})"

    def ranked(self, expr, paths, limit, checked=False, within=None) -> list:
        """``[(document rowid, relevance)]`` of one FTS5 expression, one entry per document
        (only documents meeting ``within``, an ``(SQL, parameters)`` condition on
        ``DOCUMENT``, when given: applied before the limit)."""
        sql = (f"SELECT {self.DOCUMENT}, -sum(rank) AS score FROM beaver_fts "
               f"WHERE beaver_fts MATCH ? AND rowid >= ? AND rowid < ?")
        params = [expr, self._low, self._high]
        sql = _narrowed(sql, params, paths, within)
        sql += " GROUP BY 1 ORDER BY score DESC LIMIT ?"
        try:
            return self._core.execute(sql, (*params, limit)).fetchall()
        except BeaverError as e:
            if checked and isinstance(e.__cause__, sqlite3.OperationalError):
                raise ValidationError(f"bad FTS5 query {expr!r}: {e.__cause__}") from None
            raise

    def snippet(self, expr, doc_rowid) -> str:
        base = self._rowid(doc_rowid)
        row = self._core.execute(
            "SELECT snippet(beaver_fts, 0, '[', ']', '...', 16) FROM beaver_fts "
            "WHERE beaver_fts MATCH ? AND rowid >= ? AND rowid < ? ORDER BY rank LIMIT 1",
            (expr, base, base + (1 << _FTS_PATH_BITS))).fetchone()
        return row[0] if row else ""

    expression = staticmethod(_fts_expression)     # parsed atoms as this index's query

    def fuzzy(self, groups, negatives, paths, top_k, fuzziness, within=None):
        """Try the query as typed, then with each typo-corrected term in turn.

        Returns the hits and an expression every hit matches (for snippets)."""
        expr = self.expression(groups, negatives)
        hits = self.ranked(expr, paths, top_k, within=within)
        if len(hits) >= top_k:
            return hits, expr
        options = [[self._words.spellings(atom, fuzziness) for atom in group] for group in groups]
        found = {rowid: (0, score) for rowid, score in hits}
        for turn in range(1, FUZZY_ROUNDS + 1):
            rewritten = [[_Atom(term, False) for spellings in group for term in
                          (spellings[:turn] if turn < FUZZY_ROUNDS else spellings)]
                         for group in options]
            if all(rewritten):
                expr = self.expression([g + r for g, r in zip(groups, rewritten)], negatives)
                more = self.ranked(expr, paths, top_k + len(found), within=within)
                for rowid, score in more:
                    found.setdefault(rowid, (turn, score))
            if len(found) >= top_k or not any(len(s) > turn for g in options for s in g):
                break
        best = sorted(found.items(), key=lambda item: (item[1][0], -item[1][1]))[:top_k]
        return [(rowid, score) for rowid, (_, score) in best], expr


class _Graph:
    """The labelled, directed edges between documents of one collection (``beaver_edges``)."""

    _SIDES = {"outgoing": [("source", "target")], "incoming": [("target", "source")],
              "both": [("source", "target"), ("target", "source")]}
    _ENDS = {"outgoing": ["source"], "incoming": ["target"], "both": ["source", "target"]}

    def __init__(self, core, name):
        self._core, self._name = core, name

    def connect(self, source, target, label, meta):
        self._core.execute(
            "INSERT INTO beaver_edges (collection, source, label, target, metadata) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection, source, label, target) "
            "DO UPDATE SET metadata = excluded.metadata", (self._name, source, label, target, meta))

    def disconnect(self, source, target, label=None) -> int:
        sql = "DELETE FROM beaver_edges WHERE collection = ? AND source = ? AND target = ?"
        params = [self._name, source, target]
        if label is not None:
            sql, params = sql + " AND label = ?", params + [label]
        return self._core.execute(sql, params).rowcount

    def forget(self, doc_id):
        """Delete the edges that touch ``doc_id``."""
        for side in ("source", "target"):
            self._core.execute(f"DELETE FROM beaver_edges WHERE collection = ? AND {side} = ?",
                               (self._name, doc_id))

    def clear(self):
        self._core.execute("DELETE FROM beaver_edges WHERE collection = ?", (self._name,))

    def count(self) -> int:
        return self._core.one("SELECT count(*) FROM beaver_edges WHERE collection = ?",
                              (self._name,))[0]

    def edges(self, doc_id, direction, label) -> list:
        if direction not in self._SIDES:
            raise ValueError("direction is 'outgoing', 'incoming' or 'both'")
        found = []
        for side in self._ENDS[direction]:
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

    def walk(self, start, labels, depth, direction) -> list:
        """Ids reachable in 1..``depth`` edges, breadth first, each at its shortest distance."""
        seen, frontier, order = {start}, [start], []
        for _ in range(int(depth)):
            reached = sorted(self.step(frontier, labels, direction) - seen)
            if not reached:
                break
            seen.update(reached)
            order += reached
            frontier = reached
        return order

    def step(self, frontier, labels, direction) -> set:
        """Ids one edge away from any id of ``frontier``."""
        if direction not in self._SIDES:
            raise ValueError("direction is 'outgoing', 'incoming' or 'both'")
        reached = set()
        for here, there in self._SIDES[direction]:
            for chunk in _chunks(frontier):
                sql = (f"SELECT {there} FROM beaver_edges WHERE collection = ? "
                       f"AND {here} IN ({_marks(len(chunk))})")
                params = [self._name, *chunk]
                if labels is not None:
                    sql += f" AND label IN ({_marks(len(labels))})"
                    params += labels
                reached.update(row[0] for row in self._core.execute(sql, params))
        return reached


def _vector_backend_wanted() -> str:
    """``BEAVER_VECTOR_BACKEND``: '' (faiss when installed), 'exact' or 'faiss' (required)."""
    wanted = os.environ.get("BEAVER_VECTOR_BACKEND", "").strip().lower()
    if wanted not in ("", "exact", "faiss"):
        raise ValueError(f"BEAVER_VECTOR_BACKEND={wanted!r}: use 'exact' (the built-in search), "
                         "'faiss' (beaver_vector, required) or leave it unset (faiss if installed)")
    return wanted


class _Vectors:
    """The embeddings of one collection and their search.

    Rows in ``beaver_vectors``; the dimension and a version in ``beaver_collections`` (one
    per change to a document, with or without a vector, so that filters can be kept for a
    version too; and one per clear, which empties the log); the changed ids by version in
    ``beaver_vector_log``, which a copy replays only if it holds every version since its own.
    Searches go to the ``beaver_vector`` (faiss) index when it imports, else to an exact
    in-memory copy (``_VectorCache``) brought up to date from the log. What a transaction
    puts in memory is undone if it rolls back (``_Core.on_rollback``).
    """

    _WITH_ROWIDS = ("SELECT v.doc_id, v.vector, coalesce(d.id, -1) FROM beaver_vectors v "
                    "LEFT JOIN beaver_documents d ON d.collection = v.collection AND "
                    "d.doc_id = v.doc_id WHERE v.collection = ?")

    def __init__(self, core, name, metric, options):
        self._core, self._name, self.metric, self._options = core, name, metric, options
        self._dim = None            # the dimension, once committed (it never changes then)
        self.cache = None           # the _VectorCache of the exact search
        self.backend = None         # the beaver_vector index, False when unavailable
        self._backend_lock = threading.Lock()

    def dimension(self):
        """The dimension this connection sees: None before the first vector."""
        if self._dim is not None:
            return self._dim
        dim = self._core.execute("SELECT dim FROM beaver_collections WHERE collection = ?",
                                 (self._name,)).fetchone()[0]
        if dim is not None and not self._core.in_transaction:
            self._dim = dim
        return dim

    def check(self, dims):
        """Raise unless a vector of ``dims`` numbers fits the collection."""
        dim = self.dimension()
        if dim is not None and dims != dim:
            raise ValidationError(f"embedding has {dims} dimensions; "
                                  f"collection {self._name!r} holds {dim}")

    def put(self, doc_id, vector):
        """Insert or replace the vector (float32 bytes) of ``doc_id``."""
        self._core.execute(
            "INSERT INTO beaver_vectors (collection, doc_id, vector) VALUES (?, ?, ?) "
            "ON CONFLICT (collection, doc_id) DO UPDATE SET vector = excluded.vector",
            (self._name, doc_id, vector))
        dim = len(vector) // 4
        self._changed(dim, doc_id)
        self._call_backend(dim, "on_upsert", doc_id, vector)
        if self._dim is None:
            self._core.after_commit(lambda: setattr(self, "_dim", dim))

    def remove(self, doc_id, existed=True):
        """Delete the vector of ``doc_id`` if it has one (it may not if the document did not
        exist); count the document's change either way."""
        if existed and self._core.execute(
                "DELETE FROM beaver_vectors WHERE collection = ? AND doc_id = ?",
                (self._name, doc_id)).rowcount:
            dim = self.dimension()
            self._changed(dim, doc_id)
            self._call_backend(dim, "on_delete", doc_id)
        else:
            self._changed(None, doc_id)

    def clear(self):
        for table in ("beaver_vectors", "beaver_vector_log"):
            self._core.execute(f"DELETE FROM {table} WHERE collection = ?", (self._name,))
        self._core.execute("UPDATE beaver_collections SET version = version + 1 "
                           "WHERE collection = ?", (self._name,))
        self._call_backend(self.dimension(), "on_clear")

    def _changed(self, dim, doc_id):
        """Count a vector change in the collection's version and log it for other caches."""
        version = self._bump(dim, doc_id)
        if version % VECTOR_LOG_KEEP == 0:
            self._core.execute("DELETE FROM beaver_vector_log WHERE collection = ? AND "
                               "version <= ?", (self._name, version - VECTOR_LOG_KEEP))

    def _bump(self, dim, doc_id) -> int:
        """One more version, logged for ``doc_id``: the version."""
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
        return version

    # -- search ------------------------------------------------------------------------

    def search(self, query, top_k, allowed=None) -> list:
        """``[(doc_id, distance)]`` of the ``top_k`` closest, closest first.

        ``allowed`` (None for all) is the ``_Allowed`` of a filter: the rowids it lets through
        (or a ``_Pending``, which the faiss index may check on its nearest candidates only).
        """
        if self.backend and self._dim:      # the dimension never changes once committed
            dim = self._dim
        else:
            dim, version = self._core.execute(
                "SELECT dim, version FROM beaver_collections WHERE collection = ?",
                (self._name,)).fetchone()
            if dim is not None and not self._core.in_transaction:
                self._dim = dim
        if dim is None or top_k <= 0:
            return []
        if len(query) != dim:
            raise ValidationError(f"query has {len(query)} dimensions; collection "
                                  f"{self._name!r} holds {dim}")
        backend = self._backend_for(dim)
        if backend is not None:
            return backend.search(query, top_k, allowed)
        if isinstance(allowed, _Pending):
            allowed = allowed.resolve()
        return self._exact(version, dim).search(query, top_k, allowed)

    def _exact(self, version, dim) -> "_VectorCache":
        """The in-memory vectors, brought up to ``version`` (reloaded after a clear)."""
        cache = self.cache
        if cache is not None and (cache.version != version or cache.stale):
            if not self._catch_up(cache, version):
                cache = None
        if cache is None:
            rows = self._core.execute(self._WITH_ROWIDS, (self._name,)).fetchall()
            previous, cache = self.cache, _VectorCache(self.metric, version, rows, dim)
            self.cache = cache
            if self._core.in_transaction:   # it holds this transaction's writes
                self._core.on_rollback(lambda: self._restore(previous, cache))
        return cache

    def _catch_up(self, cache, version) -> bool:
        """Patch ``cache`` with the changes logged since its version; False if they are gone."""
        log = self._core.execute(
            "SELECT version, doc_id FROM beaver_vector_log WHERE collection = ? AND "
            "version > ? ORDER BY version", (self._name, cache.version)).fetchall()
        if (log and log[0][0] != cache.version + 1) or (not log and version != cache.version):
            return False
        changed = {doc_id for _, doc_id in log} | cache.stale
        fresh = dict.fromkeys(changed)
        for chunk in _chunks(changed):
            fresh.update((doc_id, (vector, rowid)) for doc_id, vector, rowid in self._core.execute(
                self._WITH_ROWIDS + f" AND v.doc_id IN ({_marks(len(chunk))})",
                (self._name, *chunk)))
        before = cache.version
        cache.patch(version, fresh)
        if self._core.in_transaction:       # uncommitted vectors: refetch them if rolled back
            self._core.on_rollback(lambda: cache.rewind(before, changed))
        return True

    def _restore(self, previous, loaded):
        if self.cache is loaded:
            self.cache = previous

    def _backend_for(self, dim):
        """The ``beaver_vector`` index of this collection, or None for the built-in search."""
        if self.backend is None and dim is not None:
            with self._backend_lock:
                if self.backend is None:
                    self.backend = self._open_backend(dim)
                    if self._core.in_transaction:   # opened for a dimension it may undo
                        self._core.on_rollback(self._forget_backend)
        return self.backend or None

    def _forget_backend(self):
        backend, self.backend = self.backend, None
        if backend:
            backend.close()

    def _open_backend(self, dim):
        """The index, or False when the built-in search must do (not installed, or asked)."""
        wanted = _vector_backend_wanted()
        if wanted == "exact":
            return False
        try:
            import beaver_vector
            open_index = beaver_vector.open_index
        except (ImportError, AttributeError) as e:
            if wanted == "faiss":
                raise FeatureUnavailable("BEAVER_VECTOR_BACKEND=faiss, but beaver_vector (numpy "
                                         f"and faiss-cpu) cannot be imported: {e}") from None
            return False
        try:
            return open_index(self._core, self._name, dim, self.metric, **self._options)
        except FeatureUnavailable:
            if wanted == "faiss":
                raise
            return False
        except BeaverError as e:    # making its tables: a read-only file, a busy one
            if self._core.in_transaction:
                raise
            logger.warning("collection %r searches without its vector index: %s", self._name, e)
            return None if isinstance(e, DatabaseBusy) else False

    def _call_backend(self, dim, method, *args):
        backend = self._backend_for(dim)
        if backend is not None:
            getattr(backend, method)(*args)

    def compact(self):
        backend = self.backend
        if backend:
            backend.compact()

    def close(self):
        backend, self.backend = self.backend, None
        if backend:
            backend.close()


# the parts of a collection that differ per engine: vocabulary, text index, vectors, graph
_Core.collection_parts = (_Vocabulary, _TextIndex, _Vectors, _Graph)


class CollectionManager(_Manager, _Indexed):
    """Documents searchable by full text, typo-tolerant text, vectors and relationships.

        >>> articles = db.collection("articles")
        >>> articles.index(Document(id="a1", body="SQLite is an embedded database"))
        Document(id='a1', body='SQLite is an embedded database')
        >>> [doc.id for doc, score in articles.match("datbase", fuzziness=1)]
        ['a1']

    ``match`` scores are relevance (higher is better); ``search`` scores are distances
    (lower is better) under the collection's metric: ``l2`` (default), ``cosine`` or ``ip``.

    The work is shared by parts that each own their tables: the document rows, the text
    index, the vocabulary, the graph and the vectors; this class holds transactions and
    events.
    """

    _kind = "collection"
    _table = "beaver_documents"
    _scope_column = "collection"
    _json_column = "body"
    _order = "doc_id"

    def __init__(self, db, name, model=None, metric=None, **options):
        super().__init__(db, name, model)
        _check_vector_options(metric, options)
        self._fts = self._core.text_search()
        metric, self._options, cid = self._register(metric, options)
        self._rows = _DocumentRows(self._core, self._name, self._codec)
        vocabulary, text_index, vectors, graph = self._core.collection_parts
        self._words = vocabulary(self._core, self._name, cid)
        self._text = text_index(self._core, self._name, cid, self._words, self._fts)
        self._graph = graph(self._core, self._name)
        self._vecs = vectors(self._core, self._name, metric, self._options)

    def _register(self, metric, options):
        """(metric, options, collection id) of the collection, created if new: only then
        does opening it write (so a read-only file, or a busy one, opens without waiting)."""
        sql = "SELECT metric, options, cid FROM beaver_collections WHERE collection = ?"
        row = self._core.execute(sql, (self._name,)).fetchone()
        if row is None:
            # registered inside a transaction that rolls back: the next open registers again
            self._core.on_rollback(lambda: self._db._managers.forget(self))
            self._core.execute(
                "INSERT INTO beaver_collections (collection, metric, options, cid) "
                "SELECT ?, ?, ?, coalesce(max(cid), 0) + 1 FROM beaver_collections WHERE true "
                "ON CONFLICT (collection) DO NOTHING",
                (self._name, metric or "l2", _json_dumps(options) if options else None))
            row = self._core.execute(sql, (self._name,)).fetchone()
        stored, stored_options, cid = row
        return stored, _stored_options(self._name, stored_options), cid

    def _agrees(self, metric, options):
        """Raise ``ValueError`` if ``metric`` or ``options`` differ from the collection's."""
        if metric is not None and metric != self.metric:
            raise ValueError(f"collection {self._name!r} uses metric {self.metric!r}, "
                             f"not {metric!r}")
        for key, value in options.items():
            have = self._options.get(key, VECTOR_INDEX_OPTIONS[key].default)
            if have != value:
                raise ValueError(f"collection {self._name!r} was created with {key}={have!r}, "
                                 f"not {value!r}")

    @property
    def metric(self) -> str:
        """The vector distance of this collection: 'l2', 'cosine' or 'ip'."""
        return self._vecs.metric

    @property
    def _backend(self):
        """The ``beaver_vector`` index (None before the first vector, False when unused)."""
        return self._vecs.backend

    @property
    def _vectors(self):
        """The exact search's in-memory copy of the vectors (None until a search)."""
        return self._vecs.cache

    # -- documents -------------------------------------------------------------------------

    def index(self, document, fts=True, fuzzy=False):
        """Insert or replace ``document`` with its text index and vector, atomically.

            >>> docs = db.collection("docs")
            >>> docs.index(Document(id="a1", body={"title": "Hi", "tags": ["x"]}))
            Document(id='a1', body={'title': 'Hi', 'tags': ['x']})
            >>> doc = Document(id="a2", body={"title": "Notes", "text": "not searched"})
            >>> _ = docs.index(doc, fts=["title"])     # index only these field paths
            >>> docs.match("notes")[0][0].id, docs.match("searched")
            ('a2', [])

        ``fts=False`` skips the text index. ``fuzzy`` is accepted for compatibility: every
        text-indexed document is searchable with typos. Returns the document.
        """
        prepared = self._prepare(document, fts)
        with self._core.transaction():
            self._store(prepared)
        return document

    def index_many(self, documents, fts=True, fuzzy=False) -> int:
        """Index many documents in one transaction (much faster than one by one).

            >>> docs = db.collection("docs")
            >>> texts = ["SQLite is small", "SQLite is fast"]
            >>> docs.index_many(Document(id=str(i), body=text) for i, text in enumerate(texts))
            2

        Every document is validated before anything is written; an id given twice is
        stored once (the last one wins, as with one ``index()`` after another). Returns how
        many documents were given.
        """
        prepared = [self._prepare(document, fts) for document in documents]
        given, prepared = len(prepared), list({p[0].id: p for p in prepared}.values())
        dims = {len(p[0].embedding) for p in prepared if p[3] is not None}
        if len(dims) > 1:
            raise ValidationError(f"embeddings of different dimensions {sorted(dims)}")
        with self._core.transaction():
            batch = self._text.batch()      # text rows and words, written once at the end
            for item in prepared:
                self._store(item, batch)
            self._text.flush(batch)
        return given

    def _prepare(self, document, fts):
        """Validate and encode before the transaction: (document, body, texts, vector)."""
        if not isinstance(document, Document):
            raise TypeError(f"index() takes a Document, not {type(document).__name__}")
        body = None if document.body is None else self._codec.encode(document.body)
        texts = self._texts(document.body, fts) if self._fts else []
        vector = None if document.embedding is None else _pack_vector(document.embedding)
        return document, body, texts, vector

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

    def _store(self, prepared, batch=None):
        document, body, texts, vector = prepared
        if vector is not None:
            self._vecs.check(len(vector) // 4)
        rowid, existed = self._rows.write(document.id, body)
        self._text.write(rowid, texts, existed, batch)
        if vector is not None:
            self._vecs.put(document.id, vector)
        else:
            self._vecs.remove(document.id, existed)
        self._wrote("index", id=document.id)

    def drop(self, document):
        """Remove a document (given as a ``Document`` or an id), its vector and its edges.

            >>> docs = db.collection("docs")
            >>> _ = docs.index(Document(id="a1", body="hello"))
            >>> docs.drop("a1")
            >>> "a1" in docs
            False

        Raises ``KeyError`` if there is no such document.
        """
        doc_id = _doc_id(document)
        with self._core.transaction():
            rowid = self._rows.delete(doc_id)
            if rowid is None:
                raise KeyError(doc_id)
            self._text.remove(rowid)
            self._vecs.remove(doc_id)
            self._graph.forget(doc_id)
            self._wrote("drop", id=doc_id)

    __delitem__ = drop

    def get(self, doc_id, default=None):
        """The document with this id, or ``default``.

            >>> docs = db.collection("docs")
            >>> _ = docs.index(Document(id="a1", body={"title": "Hi"}))
            >>> docs.get("a1").body, docs.get("b2")
            ({'title': 'Hi'}, None)
        """
        doc = self._rows.get(_doc_id(doc_id))
        return default if doc is None else doc

    def __getitem__(self, doc_id):
        doc = self.get(doc_id)
        if doc is None:
            raise KeyError(doc_id)
        return doc

    def __contains__(self, document):
        if not isinstance(document, (str, Document)):
            return False
        return bool(self._rows.present([_doc_id(document)]))

    def __len__(self):
        return self._rows.count()

    def __bool__(self):
        return True

    def __iter__(self):
        for row in self._rows.rows(self._paged):
            yield self._rows.document(row)

    # -- queries -----------------------------------------------------------------------------

    def find(self, where=None, order_by=None, limit=None, offset=0) -> list:
        """The documents whose body matches ``where``, in id order unless ``order_by`` says.

            >>> notes = db.collection("notes")
            >>> notes.index_many([Document(id="n1", body={"year": 2021, "tags": ["work"]}),
            ...                   Document(id="n2", body={"year": 2024, "tags": ["work", "ai"]}),
            ...                   Document(id="n3", body={"year": 2019, "tags": ["home"]})])
            3
            >>> notes.find({"year": {"$gte": 2020}, "tags": {"$contains": "work"}},
            ...            order_by="-year", limit=10)
            [Document(id='n2', body={'year': 2024, ...}), Document(id='n1', body={...})]

        ``where`` is a filter on the body's fields (see "Queries and filters" in the README);
        ``order_by`` a field path or a list of them, ``"-path"`` for descending, ties in id
        order; ``limit`` and ``offset`` page. Model bodies are filtered by their fields; a
        body that is not an object or array (a string) has no fields: each is missing.
        """
        sql, params = self._find_query(where, order_by, limit, offset)
        return [self._rows.document(row) for row in self._core.execute(sql, params)]

    def count(self, where=None) -> int:
        """How many documents match ``where`` (all of them without a filter).

            >>> notes = db.collection("notes")
            >>> notes.index_many(Document(body={"tags": tags}) for tags in (["work"], ["home"],
            ...                                                             ["work", "ai"]))
            3
            >>> notes.count({"tags": {"$contains": "work"}}), notes.count()
            (2, 3)
        """
        query = self._filter(where)[0]
        scope, params = self._fields.scope(query.indexable)
        return self._core.execute(f"SELECT count(*) FROM beaver_documents WHERE {scope} AND "
                                  f"({query.sql})", [*params, *query.params]).fetchone()[0]

    def explain(self, where=None, order_by=None) -> dict:
        """How SQLite would run ``find(where, order_by)``: the field index used, and its plan.

            >>> notes = db.collection("notes")
            >>> notes.create_index("year")
            >>> notes.explain(where={"year": 2024})["index"]
            'year'

        ``match()`` and ``search()`` select the documents a filter allows the same way.
        """
        return self._fields.explain(*self._find_query(where, order_by, None, 0))

    def _find_query(self, where, order_by, limit, offset) -> tuple:
        query, order, sort_paths = self._filter(where, order_by, column="d.body")
        scope, params = self._fields.scope([*query.indexable, *sort_paths[:1]], alias="d")
        sql = (f"{_DocumentRows._COLUMNS}WHERE {scope} AND ({query.sql}) "
               f"ORDER BY {', '.join([*order, 'd.doc_id'])} LIMIT ? OFFSET ?")
        return sql, [*params, *query.params, *_paging(limit, offset)]

    def _check(self, where):
        """``where`` compiled on ``d.body`` (the whole filter checked before any SQL), or None.

        Search results are fetched with it, so each document returned matches the filter
        even if a writer changed it after the search chose it."""
        return None if where is None else self._filter(where, column="d.body")[0]

    @staticmethod
    def _within(check):
        """The condition ``_TextIndex.ranked`` puts on each matching row: ``check`` on the
        row's document (a correlated EXISTS), so it costs in proportion to the text matches,
        never to the size of the collection."""
        if check is None:
            return None
        return (f"EXISTS (SELECT 1 FROM beaver_documents d WHERE d.id = {_TextIndex.DOCUMENT} "
                f"AND ({check.sql}))", check.params)

    def _allowed(self, check, lazy=False):
        """The rowids of the documents matching a filter (``check``; None for all): an
        ``_Allowed``, or with ``lazy`` a ``_Pending`` the first time (see ``allowed``)."""
        if check is None:
            return None
        scope, params = self._fields.scope(check.indexable, alias="d")
        return self._rows.allowed(f"{scope} AND ({check.sql})", [*params, *check.params], lazy)

    def clear(self):
        """Remove every document, vector, text index entry and edge of this collection."""
        with self._core.transaction():
            self._rows.clear()
            self._graph.clear()
            self._text.clear()
            self._vecs.clear()
            self._wrote("clear")

    # -- full-text and fuzzy search ----------------------------------------------------------

    def match(self, query, on=None, top_k=10, fuzziness=0, raw=False, highlight=False,
              where=None):
        """Full-text search: ``[(Document, score)]``, best first (higher score is better).

            >>> docs = db.collection("docs")
            >>> docs.index_many([
            ...     Document(id="a1", body={"title": "SQLite", "text": "an embedded database"}),
            ...     Document(id="a2", body={"title": "MySQL", "text": "a database server"})])
            2
            >>> [doc.id for doc, score in docs.match("embedded database")]  # all words, any order
            ['a1']
            >>> [doc.id for doc, score in docs.match('"database server" OR sqlite -mysql',
            ...                                      on=["title"])]
            ['a1']
            >>> sorted(doc.id for doc, score in docs.match("datbase", fuzziness=1))  # typos
            ['a1', 'a2']

        The query understands words, "phrases", ``prefix*``, ``OR``, ``-word``/``NOT word``;
        anything else is searched as text and never raises. ``raw=True`` passes full FTS5
        syntax through. ``on`` restricts the search to dotted field paths. ``fuzziness`` (1
        or 2) also finds words up to that many edits away (3+ letters for one, 7+ for
        two), ranked by edits, then relevance. ``highlight=True`` returns
        ``(Document, score, snippet)`` triples with matches in ``[...]``. A query holds at
        most ``MATCH_MAX_LENGTH`` characters and ``MATCH_MAX_TERMS`` distinct words or
        phrases (``ValueError`` beyond); NUL and lone surrogates separate words. ``where`` is
        a filter on the bodies (see "Queries and filters" in the README), applied before
        ``top_k``: ``docs.match("database", where={"lang": "en"})``.
        """
        if not self._fts:
            raise FeatureUnavailable("this SQLite was built without FTS5: match() is unavailable")
        query = _query_text(query)
        top_k, paths, check = _count(top_k, "top_k"), _check_paths(on), self._check(where)
        fuzziness = _check_number(fuzziness, "fuzziness", 0, 2)
        if fuzziness not in (0, 1, 2):
            raise ValueError(f"fuzziness is 0, 1 or 2, not {fuzziness!r}")
        fuzziness = int(fuzziness)
        within = self._within(check)
        if raw:
            _check_term_count(len(_TERM.findall(query)))
            searchable = bool(query.strip())
        else:
            groups, negatives = _parse_query(query)
            searchable = bool(groups)
        if top_k <= 0 or paths == [] or not searchable:
            return []
        if raw:
            expr, hits = query, self._text.ranked(query, paths, top_k, True, within)
        elif fuzziness:
            hits, expr = self._text.fuzzy(groups, negatives, paths, top_k, fuzziness,
                                          within)
        else:
            expr = self._text.expression(groups, negatives)
            hits = self._text.ranked(expr, paths, top_k, within=within)
        docs = self._rows.by("id", [rowid for rowid, _ in hits], check)
        if highlight:
            return [(docs[rowid], score, self._text.snippet(expr, rowid))
                    for rowid, score in hits if rowid in docs]
        return [(docs[rowid], score) for rowid, score in hits if rowid in docs]

    # -- graph ------------------------------------------------------------------------------

    def connect(self, source, target, label, metadata=None):
        """Add (or update) the edge ``source -[label]-> target`` between two documents.

            >>> net = db.collection("social")
            >>> alice = net.index(Document(id="alice"))
            >>> bob = net.index(Document(id="bob"))
            >>> net.connect(alice, bob, label="FOLLOWS", metadata={"since": 2020})
            >>> net.edges(alice)
            [Edge(source='alice', target='bob', label='FOLLOWS', metadata={'since': 2020})]
        """
        source, target = _doc_id(source), _doc_id(target)
        if not isinstance(label, str) or not label:
            raise TypeError(f"an edge label is a non-empty str, not {label!r}")
        meta = None if metadata is None else _json_dumps(_to_jsonable(metadata))
        with self._core.transaction():
            missing = sorted({source, target} - self._rows.present({source, target}))
            if missing:
                raise KeyError(f"no document {missing[0]!r} in {self._name!r}")
            self._graph.connect(source, target, label, meta)
            self._wrote("connect", source=source, target=target, label=label)

    def disconnect(self, source, target, label=None):
        """Remove the edges from ``source`` to ``target`` (only those with ``label`` if given)."""
        source, target = _doc_id(source), _doc_id(target)
        with self._core.transaction():
            if self._graph.disconnect(source, target, label):
                self._wrote("disconnect", source=source, target=target, label=label)

    def edges(self, document, direction="outgoing", label=None) -> list:
        """The ``Edge``s leaving ('outgoing'), entering ('incoming') or touching ('both') it."""
        return self._graph.edges(_doc_id(document), direction, label)

    def neighbors(self, document, label=None, direction="outgoing") -> list:
        """The documents one edge away, in id order.

            >>> net = db.collection("social")
            >>> net.index_many(Document(id=name) for name in ("alice", "bob", "charlie", "diana"))
            4
            >>> for source, target in [("alice", "bob"), ("alice", "charlie"),
            ...                        ("charlie", "diana")]:
            ...     net.connect(source, target, label="FOLLOWS")
            >>> [doc.id for doc in net.neighbors("alice", label="FOLLOWS")]
            ['bob', 'charlie']
        """
        ids = sorted(self._graph.step([_doc_id(document)], _labels(label), direction))
        docs = self._rows.by("doc_id", ids)
        return [docs[i] for i in ids if i in docs]

    def walk(self, source, labels=None, depth=1, direction="outgoing") -> list:
        """Documents reachable in 1..``depth`` edges, breadth first (the source excluded).

            >>> net = db.collection("social")
            >>> net.index_many(Document(id=name) for name in ("alice", "bob", "charlie", "diana"))
            4
            >>> for source, target in [("alice", "bob"), ("alice", "charlie"),
            ...                        ("charlie", "diana")]:
            ...     net.connect(source, target, label="FOLLOWS")
            >>> [doc.id for doc in net.walk("alice", labels=["FOLLOWS"], depth=2)]
            ['bob', 'charlie', 'diana']

        Each document appears once, at its shortest distance; cycles are harmless.
        """
        order = self._graph.walk(_doc_id(source), _labels(labels), depth, direction)
        docs = self._rows.by("doc_id", order)
        return [docs[i] for i in order if i in docs]

    # -- vectors ----------------------------------------------------------------------------

    def search(self, vector, top_k=10, where=None) -> list:
        """Nearest documents to ``vector``: ``[(Document, distance)]``, closest first.

            >>> docs = db.collection("docs")
            >>> english = {"lang": "en", "meta": {"year": 2024}}
            >>> french = {"lang": "fr", "meta": {"year": 2023}}
            >>> docs.index_many([Document(id="a", embedding=[0.1, 0.9, 0.2], body=english),
            ...                  Document(id="b", embedding=[0.8, 0.1, 0.0], body=french)])
            2
            >>> [(doc.id, round(distance, 2)) for doc, distance in docs.search([0.1, 0.8, 0.2])]
            [('a', 0.1), ('b', 1.01)]
            >>> recent_english = {"lang": "en", "meta.year": {"$gte": 2023}}
            >>> [doc.id for doc, _ in docs.search([0.8, 0.1, 0.0], top_k=3, where=recent_english)]
            ['a']

        Exact unless the ``beaver_vector`` extra provides an index. ``where`` is a filter
        (see "Queries and filters" in the README): the nearest documents among those it
        matches, each of which matches it.
        """
        top_k = _count(top_k, "top_k")
        query, check = _as_vector(vector), self._check(where)
        hits = self._vecs.search(query, top_k, self._allowed(check, lazy=True))
        docs = self._rows.by("doc_id", [doc_id for doc_id, _ in hits], check)
        return [(docs[doc_id], float(d)) for doc_id, d in hits if doc_id in docs]

    def compact(self):
        """Merge the text index into one segment, drop the words no document holds any more
        from the typo vocabulary, and fold the vector index's pending changes.

            >>> docs = db.collection("docs")
            >>> docs.index_many(Document(body=f"note {i}") for i in range(100))
            100
            >>> docs.compact()      # after a bulk load; searches keep working meanwhile
        """
        self._text.optimize()
        self._text.prune()
        self._vecs.compact()

    def _browse(self, offset, limit) -> list:
        """A page for the dashboard: ``{id, body, dimensions}`` in id order (no vectors)."""
        rows = self._core.execute(
            "SELECT d.doc_id, d.body, length(v.vector) / 4 FROM beaver_documents d LEFT JOIN "
            "beaver_vectors v ON v.collection = d.collection AND v.doc_id = d.doc_id "
            "WHERE d.collection = ? ORDER BY d.doc_id LIMIT ? OFFSET ?",
            (self._name, *_paging(limit, offset)))
        return [{"id": i, "body": None if b is None else json.loads(b), "dimensions": n}
                for i, b, n in rows]

    def _on_close(self):
        self._vecs.close()

    # -- dump and load ----------------------------------------------------------------------

    def dump(self, fp=None):
        """Export documents and edges: ``{"metadata", "items", "edges"}`` (or JSON to ``fp``).

            >>> docs = db.collection("docs")
            >>> _ = docs.index(Document(id="a1", body="hello"))
            >>> data = docs.dump()
            >>> other = db.collection("copy")
            >>> other.load(data)
            >>> other["a1"].body
            'hello'
        """
        with self._core.transaction():
            data = super().dump()
            data["edges"] = list(self._export_edges())
        data["metadata"]["metric"] = self.metric
        if fp is None:
            return data
        json.dump(data, fp, ensure_ascii=False, indent=2)
        return None

    def _export(self):
        for doc in self:
            yield doc.to_dict()

    def _export_edges(self):
        """The edges as dump items (``Edge._asdict()``), page by page."""
        sql = ("SELECT source, label, target, metadata FROM beaver_edges WHERE collection = ? "
               "AND (source, label, target) > (?, ?, ?) ORDER BY source, label, target LIMIT ?")
        for s, lab, t, m in self._paged(sql, ("", "", ""), key_of=lambda row: row[:3]):
            yield Edge(s, t, lab, None if m is None else _json_loads(m))._asdict()

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
    """None (every label), or a list of edge labels from one label or an iterable of them."""
    if labels is None:
        return None
    if isinstance(labels, str):
        return [_check_text(labels, "label")]
    return [_check_text(label, "label") for label in labels]


class _VectorCache:
    """All vectors of a collection in memory for exact search: numpy when it imports.

    Kept current by replaying ``beaver_vector_log`` (doc ids whose vector changed, by
    collection version), so a change costs one row update, not a reload of every vector.
    ``stale`` ids are fetched again at the next update (a rolled-back patch left them).
    Each row also holds its document's rowid, which filters (``_Allowed``) are made of.
    """

    def __init__(self, metric, version, rows, dim):
        self.metric, self.version = metric, version
        self.stale = set()
        self.ids = [row[0] for row in rows]
        self.rowids = array.array("q", [row[2] for row in rows])
        self.position = {doc_id: i for i, doc_id in enumerate(self.ids)}
        self.np = numpy = _numpy()
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
        """Apply ``{doc_id: (vector blob, rowid) or None}`` (None: the vector is gone)."""
        with self.lock:
            for doc_id, found in fresh.items():
                at = self.position.get(doc_id)
                if found is None:
                    if at is not None:
                        self._remove(at)
                elif at is None:
                    self._append(doc_id, self._prepare(found[0]), found[1])
                else:
                    self._put(at, self._prepare(found[0]))
                    self.rowids[at] = found[1]
            self.version = version
            self.stale = set()

    def rewind(self, version, ids):
        """Undo a patch that a rollback took back: back to ``version``, ``ids`` to refetch."""
        with self.lock:
            self.version = version
            self.stale |= ids

    def _put(self, at, vector):
        if self.np is None:
            self.rows[at] = vector
        else:
            self._buffer[at] = vector
            self._squares[at] = self._buffer[at] @ self._buffer[at]

    def _append(self, doc_id, vector, rowid):
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
        self.rowids.append(rowid)
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
            self.rowids[at] = self.rowids[last]
            self.position[moved] = at
        self.ids.pop()
        self.rowids.pop()
        if self.np is None:
            self.rows.pop()
        del self.position[gone]

    def search(self, query, top_k, allowed=None) -> list:
        """``[(doc_id, distance)]`` of the ``top_k`` closest vectors (among ``allowed``)."""
        if self.metric == "cosine":
            norm = math.sqrt(sum(x * x for x in query)) or 1.0
            query = [x / norm for x in query]
        with self.lock:
            positions = None if allowed is None else self._among(allowed)
            if positions is not None and not len(positions):
                return []
            if self.np is not None:
                return self._search_numpy(query, top_k, positions)
            return self._search_python(query, top_k, positions)

    def _among(self, allowed):
        """The positions of the rows whose document ``allowed`` lets through (lock held)."""
        if self.np is None:
            return [i for i, rowid in enumerate(self.rowids) if rowid in allowed.rowids]
        rowids = self.np.frombuffer(self.rowids, self.np.int64) if self.rowids else ()
        found = self.np.flatnonzero(allowed.test(rowids))
        del rowids      # the view must go before the array can grow again
        return found

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

        >>> docs = db.collection("docs")
        >>> docs.index_many([Document(id="a", embedding=[1.0, 0.0], body="embedded database"),
        ...                  Document(id="b", embedding=[0.0, 1.0], body="database server")])
        2
        >>> text_results = docs.match("embedded")                 # a
        >>> vector_results = docs.search([0.1, 0.9])              # b, then a
        >>> [doc.id for doc in rerank(text_results, vector_results, weights=[0.6, 0.4])]
        ['a', 'b']

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

    def opened(self, kind, name):
        """The open manager of ``kind`` called ``name``, or None: what ``get`` with no model
        and no options returns for it (it passed the checks when it was made)."""
        return self._by_key.get((kind, name))

    def all(self) -> list:
        with self._lock:
            return list(self._by_key.values())

    def forget(self, manager):
        """Drop ``manager`` from the cache (the next request makes a new one)."""
        with self._lock:
            if self._by_key.get((manager._kind, manager.name)) is manager:
                del self._by_key[(manager._kind, manager.name)]


# ==========================================================================================
# BeaverDB
# ==========================================================================================

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _open_core(path, timeout, durability):
    """The engine behind a ``BeaverDB``: a SQLite file, or PostgreSQL for a postgres URL
    (``beaver_postgres``, imported only then: this module stays standard-library only)."""
    if isinstance(path, str) and path.startswith(_POSTGRES_SCHEMES):
        try:
            import beaver_postgres
        except ImportError as e:
            raise FeatureUnavailable(
                f"opening a PostgreSQL URL needs beaver_postgres.py and psycopg 3: pip install "
                f"'beaver-db[postgres]' ({e})") from None
        return beaver_postgres.PostgresCore(path, timeout=timeout, durability=durability)
    return _Core(path, timeout=timeout, durability=durability)


class BeaverDB:
    """One database file and the entry point to every structure in it.

        >>> db = BeaverDB("app.db")
        >>> db.dict("config")["theme"] = "dark"
        >>> db.close()

    Share one ``BeaverDB`` between threads freely (each thread gets its own connection);
    other processes open the same path with their own ``BeaverDB``. ``":memory:"`` gives a
    private database that lives until ``close()``. A ``postgresql://`` (or ``postgres://``)
    URL opens the same API on a PostgreSQL database (the ``postgres`` extra; see the README).

    ``timeout`` is how long a write waits for its turn (beaver's gates, SQLite's lock);
    ``durability="full"`` syncs every commit to disk (the default, "normal", is crash-safe
    but may lose the last commits on power loss).
    """

    def __init__(self, path, *, timeout=DEFAULT_TIMEOUT, durability="normal"):
        self._core = _open_core(path, timeout, durability)
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
            >>> articles.metric, images.metric
            ('l2', 'cosine')

        ``model`` types the document bodies; ``metric`` ('l2' by default, 'cosine', 'ip') and
        extra options (``VECTOR_INDEX_OPTIONS``, e.g. ``index="hnsw"`` for ``beaver_vector``)
        are fixed at creation: checked first (``ValueError`` naming a bad one and its range),
        and compared with the stored ones when the collection exists.
        """
        _check_vector_options(metric, options)
        manager = self._manager(CollectionManager, name, model, metric=metric, **options)
        manager._agrees(metric, options)
        return manager

    @contextlib.contextmanager
    def transaction(self):
        """Group writes of any structures into one atomic transaction.

            >>> with db.transaction():
            ...     db.dict("accounts")["alice"] = 90
            ...     db.list("ledger").push({"from": "alice", "amount": 10})
            >>> db.dict("accounts")["alice"], db.list("ledger")[-1]
            (90, {'from': 'alice', 'amount': 10})

        Nested blocks are savepoints; an exception rolls back its block and propagates.
        """
        with self._core.transaction():
            yield self

    # -- the whole database --------------------------------------------------------------

    def dump(self, fp, names=None) -> int:
        """Write every structure (or those in ``names``) to the text file ``fp`` as JSON lines.

            >>> db.dict("config")["theme"] = "dark"
            >>> db.list("tasks").push("write report")
            >>> with open("backup.jsonl", "w") as f:
            ...     db.dump(f)
            2

        One consistent snapshot, streamed; returns the number of structures written. The
        format is described in the "Dump, load, backup" section of this module.
        """
        return _dump_database(self, fp, names)

    def load(self, fp, mode="append") -> int:
        """Read a ``dump()`` back from ``fp``, in one transaction; returns the structure count.

            >>> db.dict("config")["theme"] = "dark"
            >>> with open("backup.jsonl", "w") as f:
            ...     db.dump(f)
            1
            >>> db.dict("config")["theme"] = "light"
            >>> with open("backup.jsonl") as f:
            ...     db.load(f, mode="replace")
            1
            >>> db.dict("config")["theme"]
            'dark'

        ``mode="append"`` adds the items to what is there; ``"replace"`` first empties each
        structure the dump holds (structures absent from the dump are left alone).
        """
        return _load_database(self, fp, mode)

    def copy_to(self, other, mode="new", progress=None) -> int:
        """Copy every structure into ``other`` (a ``BeaverDB``, a path or URL to open, or a
        ``BeaverClient``: a server's database); returns the number of structures copied.

            >>> db.dict("config").set("session", "abc", ttl_seconds=3600)
            >>> db.queue("jobs").put({"task": "resize"}, priority=1)
            >>> with BeaverDB("moved.db") as other:
            ...     db.copy_to(other, progress=lambda copied, total: print(f"{copied}/{total}"))
            ...     other.dict("config")["session"], round(other.dict("config").ttl("session"))
            0/2
            2/2
            2
            ('abc', 3600)

        Everything a ``dump()`` holds goes across: dict values with their expiry, lists,
        queue items with priorities and timestamps (leased ones too), blobs with metadata,
        log entries and retained channel messages with their timestamps, collections with
        documents, vectors, edges, metric and options, and the field indexes. The source is
        read as one snapshot, page by page (memory stays small whatever its size, while
        others keep writing to it); the destination is written in one transaction: a copy
        that fails (or whose ``progress`` raises) leaves it unchanged.

        ``mode="new"`` refuses (``ValueError``, before writing) if a structure to copy already
        has items in ``other``; ``"append"`` adds to them and ``"replace"`` empties them first,
        as ``load`` does. ``progress(copied, total)`` is called as items (and edges) go
        across, at most about ten times a second, and once at the end.
        """
        return _copy_database(self, other, mode, progress)

    def backup(self, path) -> str:
        """Copy the database to ``path`` while other threads and processes keep writing.

            >>> db.backup("nightly.db")
            '/.../nightly.db'

        The copy is one consistent snapshot (SQLite's online backup API), written to a
        temporary file and renamed into place. Returns the absolute path.
        """
        return _backup_database(self, path)

    def info(self) -> dict:
        """The file, its size, and every structure in it with its kind and size.

            >>> db.dict("app_config").update(theme="dark", lang="en")
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
        >>> await tasks.put({"job": 1})                # in async code (or python -m asyncio)
        >>> item = await tasks.get(timeout=5)
        >>> item.data
        {'job': 1}
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

        >>> import asyncio
        >>> jobs = db.queue("jobs").as_async()
        >>> await jobs.put("send the newsletter")
        >>> item = await asyncio.wait_for(jobs.get(), 5)
        >>> item.data
        'send the newsletter'

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
        ...         print(message)
        ...         break
        {'text': 'hi'}
    """

    def subscribe(self) -> "AsyncStream":
        """A subscription delivering into the running event loop (call it inside a coroutine)."""
        return AsyncStream(self._sync.subscribe())


class AsyncLogManager(AsyncManager):
    """Awaitable twin of a log: ``async for summary in alog.live(window, period, agg)``."""

    def live(self, window, period, aggregator=list, where=None) -> "AsyncStream":
        """Like ``LogManager.live``, as an async iterator."""
        return AsyncStream(self._sync.live(window, period, aggregator, where))


class AsyncStream:
    """The asyncio face of a ``Stream``: ``await get()``, ``async for``, ``async with``.

        >>> chat = db.channel("chat")
        >>> async with chat.as_async().subscribe() as sub:
        ...     chat.publish("hello")
        ...     chat.publish("world")
        ...     print(await sub.get(timeout=5))
        ...     async for message in sub.listen(timeout=5):
        ...         print(message)
        ...         break
        hello
        world

    A push stream delivers straight into this event loop (no thread waits); a pull stream
    (a live view) sleeps until its next value is due and computes it in a worker thread.
    """

    def __init__(self, stream):
        self.sync = stream
        self._pull = hasattr(stream, "_due")
        if self._pull:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("an async stream needs a running event loop") from None
        queue: asyncio.Queue = asyncio.Queue()

        def sink(raw):
            with contextlib.suppress(RuntimeError):      # the loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, raw)
        stream._sink = sink
        with contextlib.suppress(_queue.Empty):          # what arrived before the switch
            while True:
                queue.put_nowait(stream._inbox.get_nowait())
        self._queue = queue

    async def get(self, timeout=None):
        """The next value; ``TimeoutError`` after ``timeout`` seconds without one."""
        timeout = _seconds(timeout, "timeout")
        if self._pull:
            return await self._produce(timeout)
        try:
            raw = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"no {self.sync._what} arrived within {timeout}s") from None
        if raw is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            raise ClosedError("the stream is closed")
        return self.sync._decode(raw)

    async def _produce(self, timeout):
        view, deadline = self.sync, _Deadline(timeout)
        while not view.closed and view._due() > 0:
            if deadline.expired:
                raise Timeout(f"no update of the live view within {timeout}s")
            await asyncio.sleep(deadline.remaining(min(view._due(), 0.25)))
        if view.closed:
            raise ClosedError("the live view is closed")
        return await asyncio.to_thread(view._produce)

    async def listen(self, timeout=None):
        """Yield values until ``close()``; ``TimeoutError`` after ``timeout`` s of silence."""
        while True:
            try:
                value = await self.get(timeout)
            except ClosedError:
                return
            yield value

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.get()
        except ClosedError:
            raise StopAsyncIteration from None

    def close(self):
        """Stop the stream; a ``listen()`` in progress ends."""
        self.sync.close()

    @property
    def closed(self) -> bool:
        return self.sync.closed

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


AsyncSubscriber = AsyncLiveView = AsyncStream    # the names of earlier versions


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
    conn = core._begin(core.conn(), core.SNAPSHOT_BEGIN)
    local = core._local
    local.depth, local.pending, local.undo, local.token = 1, [], [], object()
    try:
        core.one("SELECT count(*) FROM beaver_meta")  # the snapshot starts here
        yield
    finally:
        local.depth, local.pending = 0, []
        core._undo(0)
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
    return {"path": db.path, "bytes": db._core.size(), "beaver_version": __version__,
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
    """A structure line, its items, and for a collection its edges after the documents.

    The items go to a spool first (memory up to ``_SPOOL_BYTES``, then a temporary file):
    the structure line, written before them, holds their count."""
    manager = getattr(db, _STRUCTURES[kind][1])(name)
    header = {"structure": kind, "name": name}
    with tempfile.SpooledTemporaryFile(_SPOOL_BYTES, "w+", encoding="utf-8") as spool:
        header["count"] = _spool(manager._export(), spool)
        if kind == "collection":
            header.update(metric=manager.metric, options=manager._options or None,
                          edges=_spool(manager._export_edges(), spool))
        if isinstance(manager, _Indexed) and manager.indexes():
            header["indexes"] = manager.indexes()
        write(_json_dumps(header) + "\n")
        spool.seek(0)
        for chunk in iter(lambda: spool.read(1 << 16), ""):
            write(chunk)


_SPOOL_BYTES = 1 << 20


def _spool(items, spool) -> int:
    """Write ``items`` to ``spool`` as JSON lines; how many there were."""
    count = 0
    for item in items:
        spool.write(_json_dumps(item) + "\n")
        count += 1
    return count


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
    manager = _structure(db, kind, name, line.get("metric"), line.get("options"))
    if mode == "replace":
        manager.clear()
    for batch in _batches(lines, count, f"{kind} {name!r}", manager._load_batch):
        manager._load_items(batch)
    for batch in _batches(lines, line.get("edges") or 0, f"the edges of {kind} {name!r}"):
        _connect_all(manager, batch)
    _create_indexes(manager, line.get("indexes") or [])


def _structure(db, kind, name, metric=None, options=None):
    """The manager of the ``kind`` called ``name`` in ``db`` (a collection opened with the
    ``metric`` and ``options`` it was dumped or copied with)."""
    if kind == "collection":
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"collection {name!r}: options are a JSON object, "
                             f"not {options!r:.40}")
        return db.collection(name, metric=metric, **(options or {}))
    return getattr(db, _STRUCTURES[kind][1])(name)


def _connect_all(collection, edges):
    for edge in edges:
        collection.connect(*_item_fields(edge, "source", "target", "label", metadata=None))


def _create_indexes(manager, paths):
    """The field indexes of a dumped or copied structure (dicts, logs, collections)."""
    if not paths:
        return
    if not isinstance(manager, _Indexed) or not isinstance(paths, list):
        raise ValueError(f"{manager._kind} {manager.name!r}: 'indexes' is a list of field paths "
                         "of a dict, log or collection")
    for path in paths:
        manager.create_index(path)


def _batches(lines, count, what, size=_LOAD_BATCH):
    """The next ``count`` values of ``lines``, in lists of at most ``size``."""
    batch = []
    for _ in range(count):
        item = next(lines, _MISSING)
        if item is _MISSING:
            raise ValueError(f"the dump ends inside {what}")
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


_COPY_MODES = ("new", "append", "replace")


def _copy_database(source, target, mode="new", progress=None) -> int:
    """``source.copy_to(target, mode, progress)``; ``target`` is a ``BeaverDB`` or a path / URL
    opened (and closed) here."""
    if mode not in _COPY_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _COPY_MODES))}, not {mode!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress is a callable taking (copied, total), not {progress!r:.40}")
    if isinstance(source, BeaverClient) or isinstance(target, BeaverClient):
        return _copy_through_dump(source, target, mode, progress)
    source._check_open()
    if isinstance(target, (str, os.PathLike)):
        if _same_place(source.path, os.fspath(target)):
            raise ValueError("cannot copy a database onto itself")
        with BeaverDB(target) as opened:
            if _same_database(source, opened):      # a link, or another URL of it
                raise ValueError("cannot copy a database onto itself")
            return _copy_into(source, opened, mode, progress)
    if not isinstance(target, BeaverDB):
        raise TypeError(f"copy_to needs a BeaverDB, a BeaverClient or a path, not "
                        f"{type(target).__name__}")
    target._check_open()
    if _same_database(source, target):
        raise ValueError("cannot copy a database onto itself")
    return _copy_into(source, target, mode, progress)


def _same_database(a, b) -> bool:
    """Whether two ends of a copy (``BeaverDB`` or ``BeaverClient``) reach one database, by
    the identity each reports (by URL for a server too old to report one)."""
    if a is b:
        return True
    ids = _database_id(a), _database_id(b)
    if None in ids:
        return getattr(a, "url", None) == getattr(b, "url", False)
    return ids[0] == ids[1]


def _database_id(end):
    """The identity of the database of ``end`` (a ``BeaverDB``, or a ``BeaverClient``: its
    server's answer at ``/``, None if it gives none), hashed: it says nothing of paths."""
    if isinstance(end, BeaverClient):
        return json.loads(end._request("GET", "/")).get("database")
    import hashlib
    identity = end._core.identity()
    if identity is None:
        return None
    return hashlib.blake2b(identity.encode("utf-8"), digest_size=16).hexdigest()


def _copy_through_dump(source, target, mode, progress) -> int:
    """``copy_to`` when a server is at either end: the source's dump, spooled (memory up to
    ``_SPOOL_BYTES``, then a temporary file), loaded by the target in one transaction."""
    if isinstance(target, (str, os.PathLike)):
        with BeaverDB(target) as opened:
            return _copy_through_dump(source, opened, mode, progress)
    if not isinstance(target, (BeaverDB, BeaverClient)):
        raise TypeError(f"copy_to needs a BeaverDB, a BeaverClient or a path, not "
                        f"{type(target).__name__}")
    if _same_database(source, target):
        raise ValueError("cannot copy a database onto itself")
    with tempfile.SpooledTemporaryFile(_SPOOL_BYTES, "w+", encoding="utf-8") as spool:
        source.dump(spool)
        spool.seek(0)
        plan, framing = _dump_plan(spool)
        if mode == "new":
            _refuse_held(target, plan)
        spool.seek(0)
        meter = _Meter(progress, sum(size for _, _, size in plan))
        target.load(_MeteredDump(spool, framing, meter), "append" if mode == "new" else mode)
        meter.finish()
    return len(plan)


def _dump_plan(spool) -> tuple:
    """The structures of a spooled dump, ``[(kind, name, items and edges)]``, and the numbers
    of its lines that are not items (the header, structure lines, the end line)."""
    plan, framing, number = [], {0}, 0
    lines = (text for text in spool if text.strip())     # items are skipped, not parsed
    next(lines, None)
    try:
        for text in lines:
            number += 1
            framing.add(number)
            line = _parse_json(text)
            if line.get("end") is True:
                return plan, framing
            size = line["count"] + (line.get("edges") or 0)
            plan.append((line["structure"], line["name"], size))
            for _ in range(size):
                next(lines)
            number += size
    except (AttributeError, KeyError, TypeError, ValueError, StopIteration):
        pass
    raise ValueError("the source's dump is malformed or truncated; nothing was copied")


def _refuse_held(target, plan):
    held = {(s["kind"], s["name"]) for s in target.info()["structures"]}
    _refuse_filled_names([(kind, name) for kind, name, _ in plan if (kind, name) in held])


class _MeteredDump:
    """A spooled dump read by ``load``: line by line, counting its items and edges in
    ``meter`` (or in pieces, by a client that sends it, counted as they are read)."""

    def __init__(self, spool, framing, meter):
        self._spool, self._framing, self._meter = spool, framing, meter
        self._lines = None

    def __iter__(self):
        number = 0
        for line in self._spool:
            if line.strip():
                self._meter.add(number not in self._framing)
                number += 1
                yield line

    def read(self, size=-1):
        """The next whole lines, about ``size`` characters of them (all without a size)."""
        if size == 0:
            return ""
        if self._lines is None:
            self._lines = iter(self)
        pieces, got = [], 0
        for line in self._lines:
            pieces.append(line)
            got += len(line)
            if size is not None and 0 <= size <= got:
                break
        return "".join(pieces)


def _same_place(a, b) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def _copy_into(source, target, mode, progress) -> int:
    """One snapshot of ``source`` read page by page into one transaction of ``target``."""
    with _read_snapshot(source._core), target._core.transaction():
        plan = [(kind, name) for kind in _STRUCTURES for name, _ in _structure_names(source, kind)]
        if mode == "new":
            _refuse_filled(target, plan)
        managers = [getattr(source, _STRUCTURES[kind][1])(name) for kind, name in plan]
        meter = _Meter(progress, sum(_copy_size(manager) for manager in managers))
        for manager in managers:
            _copy_structure_into(manager, target, mode, meter)
        meter.finish()
    return len(plan)


def _refuse_filled(target, plan):
    held = {kind: {name for name, _ in _structure_names(target, kind)} for kind in _STRUCTURES}
    _refuse_filled_names([(kind, name) for kind, name in plan if name in held.get(kind, ())])


def _refuse_filled_names(pairs):
    filled = [f"{kind} {name!r}" for kind, name in pairs]
    if filled:
        more = f" and {len(filled) - 3} more" if len(filled) > 3 else ""
        raise ValueError(f"the destination already holds {', '.join(filled[:3])}{more}: copy "
                         "with mode='append' (beaver copy --append) to add to them, or "
                         "mode='replace' (--replace) to empty them first")


def _copy_size(manager) -> int:
    """The items (and edges) ``_copy_structure_into`` will count for ``manager``."""
    size = len(manager)
    if manager._kind == "queue":
        size += manager._leased_count()
    elif manager._kind == "collection":
        size += manager._graph.count()
    return size


class _Meter:
    """Counts copied items; calls ``progress(copied, total)`` at most ~10 times a second."""

    def __init__(self, progress, total):
        self.progress, self.total, self.copied, self.shown = progress, total, 0, 0.0
        self.report()

    def add(self, count):
        self.copied += count
        if self.progress is not None and time.monotonic() - self.shown >= 0.1:
            self.report()

    def report(self):
        if self.progress is not None:
            self.shown = time.monotonic()
            self.progress(self.copied, max(self.total, self.copied))

    def finish(self):
        """The last call: copied == total (fewer if keys expired while the copy ran)."""
        self.total = self.copied
        self.report()


def _copy_structure_into(manager, target, mode, meter):
    """Copy one structure: its items in batches, a collection's edges, its field indexes."""
    options = (manager.metric, manager._options) if manager._kind == "collection" else ()
    copy = _structure(target, manager._kind, manager.name, *options)
    if mode == "replace":
        copy.clear()
    for batch in _chunks(manager._export(), manager._load_batch):
        copy._load_items(batch)
        meter.add(len(batch))
    if manager._kind == "collection":
        for batch in _chunks(manager._export_edges(), _LOAD_BATCH):
            _connect_all(copy, batch)
            meter.add(len(batch))
    if isinstance(manager, _Indexed):
        _create_indexes(copy, manager.indexes())


def _backup_database(db, path):
    if db._core.engine != "sqlite":
        raise FeatureUnavailable(f"backup() copies a SQLite file; on {db._core.engine} use its "
                                 "own tools (pg_dump) or db.dump()")
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
# The API declared once: BeaverClient, the server's routes and the CLI derive from it
# ==========================================================================================
#
# Each operation of each structure is one ``_Op``: the local method it is, its HTTP verb
# and path, how its result travels, whether it writes, and which parameter is a wait. The
# parameters come from the local method's signature; where each travels (path, query, body)
# follows from the path and ``body``, and how it is encoded from ``_WIRE_TYPES``. Adding an
# operation is one local method plus one line here.

class _Op(typing.NamedTuple):
    kind: str       # "dict", "list", ..., or "db" for BeaverDB itself
    method: str     # the local method (a name starting with "_" is an entry of _ADAPTERS)
    verb: str       # the HTTP method
    path: str       # after /{route}/{name}: "/{key}", "/push", "" (a "?view=..." part is fixed)
    result: str     # how the answer travels: a key of _RESULTS ("" for nothing)
    body: str       # "" (no body), a parameter whose value is the body, or "{}" (a JSON object)
    writes: bool    # changes data: carries an Idempotency-Key, joins a remote transaction()
    wait: str       # the parameter that is a wait in seconds (served without a thread)


def _op(kind, method, route, result="", body="", writes=False, wait=""):
    verb, _, path = route.partition(" ")
    return _Op(kind, method, verb, path, result, body, writes, wait)


# list slices and dict.update take shapes the wire cannot: these are the operations served
def _get_slice(self, start=None, stop=None, step=None):
    return self[slice(start, stop, step)]


def _set_slice(self, values, start=None, stop=None, step=None):
    self[slice(start, stop, step)] = values


def _del_slice(self, start=None, stop=None, step=None):
    del self[slice(start, stop, step)]


def _update(self, items):
    self.update(items)


_ADAPTERS = {f.__name__: f for f in (_get_slice, _set_slice, _del_slice, _update)}

_ROUTES = {"dict": "dicts", "list": "lists", "queue": "queues", "blob": "blobs", "log": "logs",
           "channel": "channels", "collection": "collections", "db": ""}

# How a parameter travels, by name ("kind.method.name" and "kind.name" override): see _ENCODE.
_WIRE_TYPES = {
    "key": "str", "label": "str", "direction": "str", "event": "str", "query": "str",
    "path": "str", "order": "str",
    "document": "docid", "doc_id": "docid", "source": "docid", "target": "docid",
    "value": "value", "data": "value", "payload": "value", "values": "values",
    "default": "fallback", "fp": "local", "data_or_fp": "dump", "items": "mapping",
    "ttl_seconds": "seconds", "timeout": "seconds", "lease": "seconds", "ttl": "seconds",
    "window": "seconds", "period": "seconds", "retention": "seconds",
    "timestamp": "epoch", "log.start": "epoch", "log.end": "epoch",
    "vector": "vector", "documents": "documents", "item": "item",
    "collection.index.document": "document", "dict.setdefault.default": "value",
    "blob.data": "bytes", "blob.metadata": "header",
}

_API = [
    _op("dict", "__getitem__", "GET /{key}", "value"),
    _op("dict", "get", "GET /{key}", "value"),
    _op("dict", "set", "PUT /{key}", body="value", writes=True),
    _op("dict", "pop", "DELETE /{key}", "value", writes=True),
    _op("dict", "__delitem__", "DELETE /{key}", writes=True),
    _op("dict", "__contains__", "HEAD /{key}", "exists"),
    _op("dict", "ttl", "GET /{key}?view=ttl", "json"),
    _op("dict", "setdefault", "PUT /{key}?if_absent=true", "value", body="default", writes=True),
    _op("dict", "_update", "PATCH", body="items", writes=True),
    _op("dict", "popitem", "POST ?do=popitem", "pair", writes=True),
    _op("dict", "keys", "GET ?view=keys", "json"),
    _op("dict", "__iter__", "GET ?view=keys", "json"),
    _op("dict", "items", "GET ?view=items", "pairs"),
    _op("dict", "values", "GET ?view=items", "pair_values"),
    _op("dict", "find", "POST /find", "pairs", body="{}"),
    _op("dict", "explain", "POST /explain", "json", body="{}"),

    _op("list", "__getitem__", "GET /items/{index}", "value"),
    _op("list", "__setitem__", "PUT /items/{index}", body="value", writes=True),
    _op("list", "__delitem__", "DELETE /items/{index}", writes=True),
    _op("list", "_get_slice", "GET /slice", "values"),
    _op("list", "_set_slice", "PUT /slice", body="values", writes=True),
    _op("list", "_del_slice", "DELETE /slice", writes=True),
    _op("list", "__iter__", "GET ?view=items", "values"),
    _op("list", "push", "POST /push", body="value", writes=True),
    _op("list", "prepend", "POST /prepend", body="value", writes=True),
    _op("list", "extend", "POST /extend", body="values", writes=True),
    _op("list", "insert", "POST /insert", body="value", writes=True),
    _op("list", "pop", "POST /pop", "value", writes=True),
    _op("list", "deque", "POST /deque", "value", writes=True),
    _op("list", "remove", "POST /remove", body="value", writes=True),
    _op("list", "reverse", "POST /reverse", writes=True),

    _op("queue", "put", "POST /put", body="data", writes=True),
    _op("queue", "get", "POST /get", "item", writes=True, wait="timeout"),
    _op("queue", "ack", "POST /ack", "json", body="item", writes=True),
    _op("queue", "nack", "POST /nack", "json", body="item", writes=True),
    _op("queue", "peek", "GET /peek", "item"),
    _op("queue", "__iter__", "GET ?view=items", "items"),

    _op("blob", "__getitem__", "GET /{key}", "blob"),
    _op("blob", "get", "GET /{key}", "blob?"),
    _op("blob", "put", "PUT /{key}", body="data", writes=True),
    _op("blob", "__setitem__", "PUT /{key}", body="data", writes=True),
    _op("blob", "delete", "DELETE /{key}", writes=True),
    _op("blob", "__contains__", "HEAD /{key}", "exists"),
    _op("blob", "keys", "GET ?view=keys", "json"),
    _op("blob", "__iter__", "GET ?view=keys", "json"),

    _op("log", "log", "POST /log", body="data", writes=True),
    _op("log", "range", "GET /range", "entries"),
    _op("log", "explain", "GET /explain", "json"),
    _op("log", "__iter__", "GET ?view=items", "entries"),

    _op("channel", "publish", "POST /publish", body="payload", writes=True),
    _op("channel", "history", "GET /history", "values"),
    _op("channel", "prune", "POST /prune", writes=True),

    _op("collection", "index", "POST /index", "echo", body="{}", writes=True),
    _op("collection", "index_many", "POST /index_many", "count", body="{}", writes=True),
    _op("collection", "__getitem__", "GET /documents/{doc_id}", "document"),
    _op("collection", "get", "GET /documents/{doc_id}", "document"),
    _op("collection", "__contains__", "HEAD /documents/{document}", "exists"),
    _op("collection", "drop", "DELETE /documents/{document}", writes=True),
    _op("collection", "__iter__", "GET ?view=items", "documents"),
    _op("collection", "metric", "GET ?view=metric", "json"),
    _op("collection", "match", "POST /match", "hits", body="{}"),
    _op("collection", "search", "POST /search", "hits", body="{}"),
    _op("collection", "find", "POST /find", "documents", body="{}"),
    _op("collection", "count", "POST /count", "json", body="{}"),
    _op("collection", "explain", "POST /explain", "json", body="{}"),
    _op("collection", "connect", "POST /connect", body="{}", writes=True),
    _op("collection", "disconnect", "POST /disconnect", body="{}", writes=True),
    _op("collection", "edges", "GET /edges", "edges"),
    _op("collection", "neighbors", "GET /neighbors", "documents"),
    _op("collection", "walk", "POST /walk", "documents", body="{}"),
    _op("collection", "compact", "POST /compact", writes=True),

    _op("db", "info", "GET /info", "json"),
] + [op for kind in ("dict", "list", "queue", "blob", "log", "channel", "collection") for op in (
    _op(kind, "__len__", "GET", "size"),
    _op(kind, "clear", "DELETE", writes=True),
    _op(kind, "dump", "GET ?view=dump", "dump"),
    _op(kind, "load", "POST", body="data_or_fp", writes=True),
)] + [op for kind in ("dict", "log", "collection") for op in (
    _op(kind, "indexes", "GET /indexes", "json"),
    _op(kind, "create_index", "PUT /indexes/{path}", writes=True),
    _op(kind, "drop_index", "DELETE /indexes/{path}", "json", writes=True),
)]

# Constructor options a remote manager sends with each request (when not the default).
_MANAGER_OPTIONS = {"log": {"retention": None},
                    "channel": {"retention": CHANNEL_RETENTION,
                                "max_messages": CHANNEL_MAX_MESSAGES}}


def _local_classes() -> dict:
    return {"dict": DictManager, "list": ListManager, "queue": QueueManager,
            "blob": BlobManager, "log": LogManager, "channel": ChannelManager,
            "collection": CollectionManager, "db": BeaverDB}


@functools.lru_cache(maxsize=None)
def _local_function(op):
    """The function an operation runs on the server (its signature is the operation's)."""
    if op.method.startswith("_") and not op.method.startswith("__"):
        return _ADAPTERS[op.method]
    found = getattr(_local_classes()[op.kind], op.method)
    return found.fget if isinstance(found, property) else found


def _wire_type(op, name) -> str:
    return (_WIRE_TYPES.get(f"{op.kind}.{op.method}.{name}")
            or _WIRE_TYPES.get(f"{op.kind}.{name}") or _WIRE_TYPES.get(name, "json"))


class _Param(typing.NamedTuple):
    name: str
    place: str      # "path", "query", "body" (the whole body), "field" (of a JSON object), "none"
    type: str       # a key of _ENCODE
    default: typing.Any


@functools.lru_cache(maxsize=None)
def _plan(op):
    """(path template parts, fixed query, [_Param]) of an operation, from its declaration."""
    path, _, fixed = op.path.partition("?")
    parts = [p for p in path.split("/") if p]
    fixed_query = dict(pair.split("=") for pair in fixed.split("&") if pair)
    function = _local_function(op)
    code = function.__code__
    names = code.co_varnames[1:code.co_argcount]
    defaults = function.__defaults__ or ()
    default_of = dict(zip(names[len(names) - len(defaults):], defaults))
    params = []
    for name in names:
        kind = _wire_type(op, name)
        if "{%s}" % name in parts:
            place = "path"
        elif kind in ("fallback", "local", "header"):     # none: never sent (fp stays here)
            place = "header" if kind == "header" else "none"
        elif op.body == "{}":
            place = "field"
        else:
            place = "body" if name == op.body else "query"
        params.append(_Param(name, place, kind, default_of.get(name, _MISSING)))
    return parts, fixed_query, params


def _binder(function):
    """``bind(args, kwargs) -> {name: value}`` as Python would bind them to ``function``."""
    code = function.__code__
    names = code.co_varnames[1:code.co_argcount]
    defaults = function.__defaults__ or ()
    default_of = dict(zip(names[len(names) - len(defaults):], defaults))
    title = function.__name__

    def bind(args, kwargs):
        if len(args) > len(names):
            raise TypeError(f"{title}() takes {len(names) + 1} positional arguments but "
                            f"{len(args) + 1} were given")
        bound = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in default_of and key not in names:
                raise TypeError(f"{title}() got an unexpected keyword argument {key!r}")
            if key in bound:
                raise TypeError(f"{title}() got multiple values for argument {key!r}")
            bound[key] = value
        for name in names:
            if name not in bound:
                if name not in default_of:
                    raise TypeError(f"{title}() missing required argument: {name!r}")
                bound[name] = default_of[name]
        return bound
    return bind


def _operations(kind) -> dict:
    """{local method name: _Op} of one kind (the first declaration of a name wins)."""
    found: dict = {}
    for op in _API:
        if op.kind == kind:
            found.setdefault(op.method, op)
    return found


# -- request records: what makes a write exactly-once over the wire --------------------------

REQUEST_RETENTION = 300.0       # seconds the server remembers the answer to a keyed request
REQUEST_CLOCK_SKEW = 60.0       # seconds a client's clock may run ahead, its keys still fresh
PRUNE_EVERY = 512               # keyed writes between two prunes (or one PURGE_INTERVAL)
PRUNE_BUDGET = 4 * PRUNE_EVERY  # records one step of a prune reads at most
_RECORD = ("INSERT INTO beaver_requests (key, created, status, body) VALUES (?, ?, ?, ?) "
           "ON CONFLICT DO NOTHING")   # a row counted only if the key is new


def _once(db, key, call, answer=None, wait=True):
    """Run ``call()`` (returning ``(status, body bytes, headers)``) once for ``key``.

    The key and the answer are stored in the transaction of the operation itself, so a
    repeat (a client retrying after a lost response, on any worker) gets the first answer
    and applies nothing again; a repeat that arrives while the first runs waits for it.
    With ``answer``, what ``call()`` answers whenever it does not raise (a 204), the record
    goes in first and tells in the same statement whether the key is new. With ``wait``
    False, ``_WritersBusy`` at once while another writer holds the write transaction.

        >>> _once(db, "key-1", lambda: (200, b"1", None))
        (200, b'1', None)
        >>> _once(db, "key-1", lambda: (200, b"2", None))      # a repeat: the first answer
        (200, b'1', None)
    """
    core = db._core
    with core.transaction(wait):    # BEGIN IMMEDIATE: a repeat waits here for the first
        now = _now()
        if answer is None or not core.execute(
                _RECORD, (key, now, answer[0], answer[1] or None)).rowcount:
            stored = core.one("SELECT status, body FROM beaver_requests WHERE key = ?", (key,))
            if stored is not None:
                return stored[0], stored[1] or b"", None
        status, body, headers = call()
        if answer is None:
            core.execute(_RECORD, (key, now, status, body or None))
        pruner = _request_pruner(core)
        pruner.writes += 1
        if pruner.writes >= PRUNE_EVERY or now >= pruner.pruned + PURGE_INTERVAL:
            pruner.prune(core, now)
    return status, body, headers


def _request_pruner(core) -> _RequestPruner:
    """The pruner of ``core``'s request records (made on first use, under the write lock)."""
    try:
        return core.request_pruner
    except AttributeError:
        core.request_pruner = pruner = _RequestPruner()
        return pruner


def _time_prefix(seconds) -> str:
    """The first 12 characters of the client's keys made at ``seconds`` (``_request_key``)."""
    return f"{max(0, int(seconds * 1000)):012x}"


class _RequestPruner:
    """Forgets one core's answers older than ``REQUEST_RETENTION``, a bounded step at a time.

    The client's keys start with the time they were made (``_request_key``), so the young
    records of busy servers lie together in the key range of the last ``REQUEST_RETENTION``
    (plus ``REQUEST_CLOCK_SKEW`` for clocks ahead): the *window*. Each prune, run inside a
    keyed write's transaction, takes two steps in key order, each reading at most
    ``PRUNE_BUDGET`` records and deleting those older than the retention:

    - the *band*: the keys the window's old edge passed since the last prune, where the
      client's records fall due, so it reads little else;
    - the *walk*: one step of a walk over every key outside the window (other clients' keys:
      any text, uuids, clocks far off), which never reads the window's young records.

    So no young record ever goes (every delete checks ``created``), and an old one goes
    within a walk over the keys outside the window, or when the window's edge passes it: at
    most ``REQUEST_CLOCK_SKEW`` after the retention for a client's key (a clock further ahead
    delays it by as much, up to one retention more). Prunes come every ``PRUNE_EVERY``
    keyed writes, or on the first one after ``PURGE_INTERVAL``: under load the walk may read
    four records per keyed write, so it keeps up with any rate of writes with other keys.
    """

    def __init__(self):
        self.writes, self.pruned = 0, 0.0
        self.band = None        # the window's old edge at the last prune
        self.walk = ""          # where the walk goes on

    def prune(self, core, now):
        self.writes, self.pruned = 0, now
        cutoff = now - REQUEST_RETENTION
        edge, top = _time_prefix(cutoff), _time_prefix(now + REQUEST_CLOCK_SKEW)
        band = edge if self.band is None else min(self.band, edge)
        self.band = _sweep_requests(core, band, edge, cutoff) or edge
        if self.walk < edge:
            self.walk = _sweep_requests(core, self.walk, edge, cutoff) or top
        else:
            self.walk = _sweep_requests(core, max(self.walk, top), None, cutoff) or ""


def _sweep_requests(core, low, high, cutoff):
    """Delete the records older than ``cutoff`` among the first ``PRUNE_BUDGET`` keys from
    ``low`` on (below ``high``, if not None); the key after them, None if there is none."""
    if high is None:
        after = core.one("SELECT key FROM beaver_requests WHERE key >= ? "
                         "ORDER BY key LIMIT 1 OFFSET ?", (low, PRUNE_BUDGET))
    else:
        after = core.one("SELECT key FROM beaver_requests WHERE key >= ? AND key < ? "
                         "ORDER BY key LIMIT 1 OFFSET ?", (low, high, PRUNE_BUDGET))
    end = high if after is None else after[0]
    if end is None:
        core.execute("DELETE FROM beaver_requests WHERE key >= ? AND created < ?",
                     (low, cutoff))
    else:
        core.execute("DELETE FROM beaver_requests WHERE key >= ? AND key < ? AND created < ?",
                     (low, end, cutoff))
    return None if after is None else after[0]


def _remembered(db, key):
    """The stored answer to ``key`` (``(status, body, None)``), or None."""
    row = db._core.execute("SELECT status, body FROM beaver_requests WHERE key = ? AND "
                           "status > 0", (key,)).fetchone()
    return None if row is None else (row[0], row[1] or b"", None)


def _adopt_lock(db, name, token):
    """The ``Lock`` of the hold ``token`` on ``name`` (taken by any process), to renew or
    release it; ``LockLost`` if there is no such hold."""
    lock = db.lock(name)
    if isinstance(token, bool) or not isinstance(token, int) or db._core.execute(
            "SELECT 1 FROM beaver_locks WHERE ticket = ? AND name = ?", (token, name)
            ).fetchone() is None:
        raise LockLost(f"lock {name!r} is not held with token {token!r}")
    lock._ticket = token
    lock._guard.acquire()
    return lock


# -- how parameters and results travel -------------------------------------------------------

def _wire_str(manager, value, name):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value


def _wire_item(manager, item, name):
    lease_id = getattr(item, "lease_id", None)
    if lease_id is None:
        raise TypeError("ack() and nack() take an item returned by get(lease=...)")
    return {"lease_id": lease_id, "priority": item.priority, "timestamp": item.timestamp,
            "data": _to_jsonable(item.data)}


def _wire_document(manager, document, name):
    if not isinstance(document, Document):
        raise TypeError(f"index() takes a Document, not {type(document).__name__}")
    body = None if document.body is None else _json_loads(manager._codec.encode(document.body))
    return {"id": document.id, "embedding": document.embedding, "body": body}


def _wire_bytes(manager, data, name):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob data must be bytes-like, not {type(data).__name__}")
    return bytes(data)


# wire type -> client encoder(manager, value, parameter name): a str for the path and the
# query, a JSON value for a field, the body text (or bytes) for the body
_ENCODE = {
    "str": _wire_str,
    "docid": lambda m, v, n: _doc_id(v),
    "json": lambda m, v, n: v,
    "seconds": lambda m, v, n: _seconds(v, n),
    "epoch": lambda m, v, n: None if v is None else _epoch(v, n),
    "value": lambda m, v, n: m._codec.encode(v),
    "values": lambda m, v, n: "[" + ",".join(map(m._codec.encode, v)) + "]",
    "mapping": lambda m, v, n: {_check_key(k): _json_loads(m._codec.encode(x))
                                for k, x in v.items()},
    "vector": lambda m, v, n: _as_vector(v),
    "document": _wire_document,
    "documents": lambda m, v, n: [_wire_document(m, d, n) for d in v],
    "item": _wire_item,
    "dump": lambda m, v, n: _read_dump(v),
    "bytes": _wire_bytes,
    "header": lambda m, v, n: None if v is None else json.dumps(   # ASCII, as headers are
        _json_loads(m._codec.encode(v))),
}
_TEXT_TYPES = frozenset(("str", "docid"))     # travel as they are; the rest travel as JSON
_RAW_BODY_TYPES = frozenset(("value", "values", "bytes"))   # already the body's text or bytes


def _reply(value, status=200, headers=None):
    """A server answer: ``(status, body bytes, headers)``."""
    return status, _json_dumps(value).encode("utf-8"), headers


_NO_CONTENT = (204, b"", None)


def _queue_item(item) -> dict:
    result = {"priority": item.priority, "timestamp": item.timestamp,
              "data": _to_jsonable(item.data)}
    if getattr(item, "lease_id", None) is not None:
        result["lease_id"] = item.lease_id
    return result


def _blob_reply(blob, manager):
    headers = {}
    if blob.metadata is not None:
        headers["beaver-metadata"] = json.dumps(_to_jsonable(blob.metadata))   # ASCII
    meta = blob.metadata if isinstance(blob.metadata, dict) else {}
    for field in ("mimetype", "content_type", "content-type", "media_type"):
        media = meta.get(field)
        if isinstance(media, str) and "/" in media and media.isascii() and "\n" not in media:
            headers["content-type"] = media
            break
    return 200, bytes(blob.data), headers


def _hit(hit) -> dict:
    return {"document": hit[0].to_dict(), "score": hit[1],
            **({"snippet": hit[2]} if len(hit) > 2 else {})}


# result -> server encoder(local result, manager): a JSON value or a ``_reply`` tuple
_SERVE = {
    "": lambda r, m: _NO_CONTENT,
    "value": lambda r, m: _to_jsonable(r),
    "json": lambda r, m: r,
    "count": lambda r, m: r,
    "values": lambda r, m: [_to_jsonable(v) for v in r],
    "pair": lambda r, m: [r[0], _to_jsonable(r[1])],
    "pairs": lambda r, m: [[k, _to_jsonable(v)] for k, v in r],
    "pair_values": lambda r, m: [[k, _to_jsonable(v)] for k, v in r],
    "item": lambda r, m: None if r is None else _queue_item(r),
    "items": lambda r, m: [_queue_item(i) for i in r],
    "entries": lambda r, m: [{"timestamp": e.timestamp.timestamp(),
                              "data": _to_jsonable(e.data)} for e in r],
    "document": lambda r, m: r.to_dict(),
    "documents": lambda r, m: [d.to_dict() for d in r],
    "echo": lambda r, m: {"id": r.id},
    "hits": lambda r, m: [_hit(h) for h in r],
    "edges": lambda r, m: [_to_jsonable(e._asdict()) for e in r],
    "size": lambda r, m: {"name": m.name, "size": r},
    "dump": lambda r, m: r,
    "exists": lambda r, m: (200 if r else 404, b"", None),
    "blob": _blob_reply,
}


# (kind, method) -> the manager method giving a JSON answer's text as stored, for a manager
# without a model: the server sends it as it is
_STORED_TEXT = {("dict", "__getitem__"): "_stored"}


def _take_blob(m, reply, args):
    status, headers, data = reply
    meta = headers.get("beaver-metadata")
    return Blob(args["key"], data, None if meta is None else m._codec.decode(meta))


def _answer_json(reply):
    return _json_loads(reply[2].decode("utf-8"))


# result -> client decoder(manager, reply (status, headers, body), arguments)
_TAKE = {
    "": lambda m, r, a: None,
    "value": lambda m, r, a: m._value(_answer_json(r)),
    "json": lambda m, r, a: _answer_json(r),
    "count": lambda m, r, a: _answer_json(r),
    "values": lambda m, r, a: [m._value(v) for v in _answer_json(r)],
    "pair": lambda m, r, a: tuple((lambda p: (p[0], m._value(p[1])))(_answer_json(r))),
    "pairs": lambda m, r, a: [(k, m._value(v)) for k, v in _answer_json(r)],
    "pair_values": lambda m, r, a: [m._value(v) for _, v in _answer_json(r)],
    "item": lambda m, r, a: m._item(_answer_json(r)),
    "items": lambda m, r, a: [m._item(i) for i in _answer_json(r)],
    "entries": lambda m, r, a: [LogEntry(_utc(e["timestamp"]), m._value(e["data"]))
                                for e in _answer_json(r)],
    "document": lambda m, r, a: m._document(_answer_json(r)),
    "documents": lambda m, r, a: [m._document(d) for d in _answer_json(r)],
    "echo": lambda m, r, a: a["document"],
    "hits": lambda m, r, a: [(m._document(h["document"]), h["score"], h["snippet"])
                             if "snippet" in h else (m._document(h["document"]), h["score"])
                             for h in _answer_json(r)],
    "edges": lambda m, r, a: [Edge(**e) for e in _answer_json(r)],
    "size": lambda m, r, a: _answer_json(r)["size"],
    "dump": lambda m, r, a: _dump_to(_answer_json(r), a.get("fp")),
    "exists": lambda m, r, a: r[0] < 400,
    "blob": _take_blob,
}
# results a remote transaction() can give before the server has answered
_KNOWN_RESULTS = {"": lambda a: None, "echo": lambda a: a["document"],
                  "count": lambda a: len(a["documents"])}


def _dump_to(data, fp):
    if fp is None:
        return data
    json.dump(data, fp, ensure_ascii=False, indent=2)
    return None


def _remote_errors() -> dict:
    """Exception classes by name: every ``BeaverError`` and the builtins the API promises."""
    found = {cls.__name__: cls for cls in (KeyError, IndexError, ValueError, TypeError,
                                           TimeoutError, PermissionError, OverflowError)}
    todo = [BeaverError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


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


_CHUNK_WAIT = 25.0          # seconds one blocking request may wait on the server
_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)   # between attempts of a request safe to repeat
_RETRY_WINDOW = 120.0       # no retry this long after the first attempt (< REQUEST_RETENTION)
_ATTEMPTS = _RETRY_DELAYS + (None,)
_LONG_TARGET = 4000         # longer request targets travel in the body of POST /call


_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]*\Z")


def _segment(text) -> str:
    """One path segment: every character that could change the route is escaped."""
    if _PLAIN_SEGMENT.match(text):
        return text             # nothing to escape (and not "." or "..")
    from urllib.parse import quote
    quoted = quote(text, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


_last_request_key = [0, 0]      # (milliseconds, random part) of this process's latest key
_request_key_lock = threading.Lock()


def _request_key() -> str:
    """A fresh idempotency key: 12 hex digits of milliseconds since the epoch, then 20 of an
    80-bit number, so the server files it at the growing end of its records.

    The number starts at a random value in each process (a forked child's too) and counts up
    by one with each key, so each key of a process sorts after the one before, within one
    millisecond or while the clock is behind the last key's time (which it then keeps).

        >>> len(_request_key()), _request_key() < _request_key()
        (32, True)
    """
    milliseconds = int(_now() * 1000)
    with _request_key_lock:
        last, number = _last_request_key
        number = number + 1 if last else int.from_bytes(os.urandom(10), "big")
        if number >> 80:            # past the largest number: on to the next millisecond
            number, milliseconds = 0, max(milliseconds, last + 1)
        elif milliseconds < last:
            milliseconds = last
        _last_request_key[:] = milliseconds, number
    return f"{milliseconds:012x}{number:020x}"


def _forget_request_key():
    """In a forked child: count from a random number of its own, not the parent's."""
    global _request_key_lock
    _request_key_lock = threading.Lock()
    _last_request_key[:] = 0, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_request_key)


_RESPONSE_FIELD = re.compile(r"\r\n[ \t]*([^:\r]*?)[ \t]*:([^\r]*)")   # a response header


class _Dropped(OSError):
    """The connection ended before a whole response arrived."""


_PIECE = 1 << 16                # bytes of a file read (and sent) at a time


class _FileBody:
    """A request body read from a file in pieces: ``length`` bytes from ``start``, sent again
    from ``start`` when a request is retried."""

    def __init__(self, fp, start, length):
        self.fp, self.start, self.length = fp, start, length

    def __len__(self):
        return self.length

    def __iter__(self):
        self.fp.seek(self.start)
        left = self.length
        while left > 0:
            piece = self.fp.read(min(_PIECE, left))
            if not piece:
                raise ValueError("the file being sent got shorter")
            left -= len(piece)
            yield piece


@contextlib.contextmanager
def _upload(fp):
    """What ``fp`` reads (bytes or text, sent as UTF-8) as a ``_FileBody``: a binary regular
    file as it is, anything else through a spool (memory up to ``_SPOOL_BYTES``, then a
    temporary file), so its length is known and nothing holds it whole."""
    left = _bytes_left(fp)
    if left is not None:
        yield _FileBody(fp, fp.tell(), left)
        return
    with tempfile.SpooledTemporaryFile(_SPOOL_BYTES, "w+b") as spool:
        while True:
            piece = fp.read(_PIECE)
            if not piece:
                break
            spool.write(piece.encode("utf-8") if isinstance(piece, str) else piece)
        yield _FileBody(spool, 0, spool.tell())


def _bytes_left(fp):
    """Bytes from the position of a binary regular file to its end; None for anything else
    (a text file, a pipe, a file-like object)."""
    import io
    import stat as _stat
    mode = getattr(fp, "mode", "")
    if not isinstance(mode, str) or "b" not in mode or \
            not isinstance(getattr(fp, "raw", fp), io.FileIO):
        return None             # gzip, bz2...: the descriptor's size is not what it reads
    try:
        stat = os.fstat(fp.fileno())
        return stat.st_size - fp.tell() if _stat.S_ISREG(stat.st_mode) else None
    except (OSError, ValueError, AttributeError):   # no descriptor, or not seekable
        return None


class _Connection:
    """One keep-alive HTTP/1.1 connection: a request out, a response in (read with one
    ``recv`` when it fits, which it mostly does)."""

    def __init__(self, http, timeout):
        import socket
        sock = socket.create_connection((http.host, http.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if http.https:
            import ssl
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=http.host)
        self.sock = sock
        self.kernel = not http.https and sys.platform.startswith("linux")
        self.timeout = None
        self.set_timeout(timeout)
        self.buffer = bytearray()

    def set_timeout(self, timeout):
        """Bound each ``send`` and ``recv`` by ``timeout`` seconds (``None``: no bound).

        On Linux (plain TCP) the kernel keeps the bound (``SO_RCVTIMEO``, ``SO_SNDTIMEO``) on a
        blocking socket: a Python socket timeout would add a ``poll`` before every call, two
        more system calls per request."""
        if timeout == self.timeout:
            return
        self.timeout = timeout
        if not self.kernel:
            self.sock.settimeout(timeout)
            return
        import socket
        import struct
        self.sock.settimeout(None)
        whole = int(timeout or 0)
        micros = int(((timeout or 0) - whole) * 1e6) or int(timeout is not None and not whole)
        value = struct.pack("ll", whole, micros)        # 0, 0: no bound (``None``)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    def exchange(self, head, body, timeout, sink=None):
        """Send one request; ``(status, headers, body)`` (the body goes to ``sink`` if given)."""
        if timeout != self.timeout:
            self.set_timeout(timeout)
        try:
            if isinstance(body, _FileBody):
                self.sock.sendall(head)
                for piece in body:
                    self.sock.sendall(piece)
            else:
                self.sock.sendall(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    self.sock.sendall(body)
        except BlockingIOError:     # the kernel's send timeout
            raise TimeoutError("timed out") from None
        status, headers = self.read_head()
        if head.startswith(b"HEAD ") or status in (204, 304):
            return status, headers, b""
        length = headers.get("content-length", "")
        if sink is None and length.isdigit() and int(length) <= 1 << 20:
            return status, headers, self.take(int(length))
        if sink is None or status >= 300:
            return status, headers, b"".join(self.body(headers))
        for chunk in self.body(headers):
            sink(chunk)
        return status, headers, b""

    def fill(self):
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:     # the kernel's receive timeout
            raise TimeoutError("timed out") from None
        if not chunk:
            raise _Dropped("the server closed the connection")
        self.buffer += chunk

    def take(self, size) -> bytes:
        """The next ``size`` bytes."""
        buffer = self.buffer
        while len(buffer) < size:
            self.fill()
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    def readline(self, limit) -> bytes:
        buffer = self.buffer
        while True:
            end = buffer.find(b"\n")
            if end >= 0:
                return self.take(end + 1)
            if len(buffer) > limit:
                raise _Dropped("a response line is too long")
            self.fill()

    def read_head(self):
        buffer = self.buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buffer) > 1 << 17:
                raise _Dropped("the response head is too long")
            try:
                self.fill()
            except _Dropped:
                if buffer:
                    raise _Dropped("the connection ended inside the response headers") from None
                raise
        head = self.take(end + 4)[:end].decode("latin-1")
        first = head.split("\r\n", 1)[0]
        parts = first.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise _Dropped(f"not an HTTP response: {first[:80]!r}")
        headers = {name.lower(): value.strip()
                   for name, value in _RESPONSE_FIELD.findall(head, len(first))}
        return int(parts[1]), headers

    def body(self, headers):
        """The response body in pieces (by Content-Length, chunked, or up to the end)."""
        if "content-length" in headers:
            left = int(headers["content-length"])
            while left:
                if not self.buffer:
                    try:
                        self.fill()
                    except _Dropped:
                        raise _Dropped("the connection ended inside the response body") from None
                piece = self.take(min(left, len(self.buffer)))
                left -= len(piece)
                yield piece
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.readline(1026).split(b";")[0].strip() or b"x", 16)
                if not size:
                    self.readline(1026)
                    return
                try:
                    piece = self.take(size)
                except _Dropped:
                    raise _Dropped("the connection ended inside a chunk") from None
                self.readline(1026)
                yield piece
        else:
            while True:
                if self.buffer:
                    yield self.take(len(self.buffer))
                try:
                    self.fill()
                except _Dropped:
                    return

    def close(self):
        import socket
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class _Http:
    """The transport: one keep-alive connection per thread, retries of safe requests."""

    def __init__(self, url, token=None, timeout=60.0):
        from urllib.parse import urlsplit
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.head = f"Host: {host}:{self.port}\r\nX-Beaver: 1\r\n" + (
            f"Authorization: Bearer {token}\r\n" if token else "")
        self._local = threading.local()
        self._all: list = []
        self._all_lock = threading.Lock()
        self.streams = weakref.WeakSet()    # open remote streams, closed by close()

    def connection(self, timeout):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = _Connection(self, timeout)
            except OSError as e:
                raise _Dropped(f"cannot connect: {e}") from None
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def drop(self, conn):
        conn.close()
        self._local.conn = None
        with self._all_lock, contextlib.suppress(ValueError):
            self._all.remove(conn)

    def request(self, method, target, body=b"", headers="", wait=0.0, sink=None):
        """``(status, headers, body)`` of one request; a safe one is retried on a new
        connection when the old one breaks (reads, and writes with an Idempotency-Key)."""
        head = (f"{method} {self.prefix}{target} HTTP/1.1\r\n{self.head}{headers}"
                f"Content-Length: {len(body)}\r\n\r\n").encode("utf-8")
        safe = method in ("GET", "HEAD") or "Idempotency-Key" in headers
        first = time.monotonic()
        for delay in _ATTEMPTS:
            conn = None
            try:
                conn = self.connection(self.timeout)
                status, answer, data = conn.exchange(head, body, self.timeout + wait, sink)
                if answer.get("connection", "").lower() == "close":
                    self.drop(conn)
                return status, answer, data
            except OSError as e:
                if conn is not None:
                    self.drop(conn)
                if not safe or delay is None or time.monotonic() - first > _RETRY_WINDOW:
                    raise RemoteError(f"{method} {self.url}{target[:200]} failed: {e}") from None
                time.sleep(delay)
            except BaseException:   # a body that failed to read, a sink that failed to write:
                if conn is not None:    # the connection is mid-request, of no further use
                    self.drop(conn)
                raise
        raise AssertionError("unreachable")

    def stream(self, target):
        """A dedicated connection reading ``target`` as a server-sent event stream."""
        conn = None
        try:
            conn = _Connection(self, self.timeout)
            conn.sock.sendall((f"GET {self.prefix}{target} HTTP/1.1\r\n{self.head}"
                               "Accept: text/event-stream\r\n\r\n").encode("utf-8"))
            status, headers = conn.read_head()
            if status >= 400:
                _raise_remote(status, b"".join(conn.body(headers)))
            conn.set_timeout(None)      # a quiet stream is not an error; close() ends it
        except OSError as e:
            if conn is not None:
                conn.close()
            raise RemoteError(f"GET {self.url}{target[:200]} failed: {e}") from None
        except BaseException:
            conn.close()
            raise
        return conn, conn.body(headers)

    def close(self):
        """Close every connection; open streams end as if closed."""
        for stream in list(self.streams):
            stream.close()
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()


def _raise_remote(status, body, key=None):
    try:
        error = json.loads(body)
        name, message = error.get("error"), error.get("message", "")
    except (ValueError, AttributeError):
        name, message = None, body.decode("utf-8", "replace")[:500]
    if status == 401:
        raise Unauthorized(message or "unauthorized", status)
    if status == 404 and not body and key is not None:   # the answer to HEAD has no body
        raise KeyError(key)
    cls = _remote_errors().get(name)
    if cls is None or cls is RemoteError or cls is Unauthorized:
        raise RemoteError(f"HTTP {status}: {message}", status)
    try:
        error = cls(message)
    except Exception:       # a class whose constructor wants more than a message
        raise RemoteError(f"{name}: {message}", status) from None
    raise error


def _request_of(manager, op, args):
    """``(verb, target, body bytes, headers text)`` of one call of ``op`` with ``args``."""
    parts, fixed, params = _plan(op)
    path, fields = {}, {}
    query = {**fixed, **manager._options} if fixed or manager._options else {}
    body, headers = b"", ""
    for param in params:
        value = args[param.name]
        if param.place == "none" or (param.place in ("query", "field") and
                                     param.default is value):
            continue
        wire = _ENCODE[param.type](manager, value, param.name)
        if param.place in ("path", "query"):
            text = wire if param.type in _TEXT_TYPES else _json_dumps(wire)
            if param.place == "path":
                path[param.name] = _segment(text)
            else:
                query[param.name] = text
        elif param.place == "field":
            fields[param.name] = wire
        elif param.place == "header":
            if wire is not None:
                headers += f"Beaver-Metadata: {wire}\r\n"
        elif param.type in _RAW_BODY_TYPES:
            body = wire if isinstance(wire, bytes) else wire.encode("utf-8")
        else:
            body = _json_dumps(wire).encode("utf-8")
    if op.body == "{}":
        body = _json_dumps(fields).encode("utf-8")
    if op.body:
        kind = "application/octet-stream" if isinstance(args.get(op.body), (
            bytes, bytearray, memoryview)) else "application/json"
        headers += f"Content-Type: {kind}\r\n"
    target = manager._base
    for part in parts:
        target += "/" + (path[part[1:-1]] if part[0] == "{" else part)
    if query:
        from urllib.parse import quote, urlencode
        target += "?" + urlencode(query, quote_via=quote)
    return op.verb, target or "/", body, headers


class _RemoteManager(_StructureLock):
    """Shared plumbing of the remote twins of the managers (their operations are derived
    from ``_API``; see ``_derived``)."""

    _kind = ""

    def __init__(self, client, name, model=None, **options):
        self._client = client
        self._name = _check_name(name)
        self._model = model
        self._codec = _codec_for(model)
        self._base = f"/{_ROUTES[self._kind]}/{_segment(name)}"
        self._options = {}
        for option, default in _MANAGER_OPTIONS.get(self._kind, {}).items():
            value = options.get(option, _DEFAULT)
            value = default if value is _DEFAULT else _check_max_messages(value) if (
                option == "max_messages") else _seconds(value, option, positive=True)
            setattr(self, option, value)
            if value != default:
                self._options[option] = _json_dumps(value)

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self):
        return self._model

    def __repr__(self):
        return f"<{type(self).__name__} {self._name!r} at {self._client.url}>"

    def __bool__(self):
        return True

    def _call(self, method, *args, **kwargs):
        """Call the declared operation ``method`` with Python arguments."""
        op = _operations(self._kind)[method]
        return self._client._invoke(self, op, _binder(_local_function(op))(args, kwargs))

    def _value(self, obj):
        """A stored value as the caller's codec wants it (model instances when typed)."""
        return obj if self._model is None or obj is None else self._model.model_validate(obj)

    def _new_lock(self, name, ttl):
        return RemoteLock(self._client, name, ttl=ttl)

    def on(self, event, callback) -> "_RemoteEventHandle":
        """Call ``callback(payload)`` after every ``event`` ('set', 'del', ... or '*').

            >>> import queue
            >>> keys = queue.Queue()
            >>> handle = client.dict("config").on("set", lambda p: keys.put(p["key"]))
            >>> client.dict("config")["theme"] = "dark"
            >>> keys.get(timeout=5)                    # called on a thread of the client
            'theme'
            >>> handle.off()

        The server streams the events of this structure (server-sent events); callbacks run
        on one thread of this client, in order. Listening starts before ``on`` returns.
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        _check_event(self._kind, event)
        from urllib.parse import quote
        stream = _RemoteStream(self._client._http, f"/events/{self._kind}/{_segment(self._name)}"
                               f"?event={quote(_wire_str(self, event, 'event'), safe='')}",
                               json.loads)
        return _RemoteEventHandle(stream, event, callback)

    def as_async(self) -> "AsyncManager":
        """An awaitable twin whose calls run in worker threads."""
        return AsyncManager(self)


def _remote_method(op):
    """The client method of ``op``: the local method's name, docstring and signature."""
    local = _local_function(op)
    bind = _binder(local)

    def method(self, *args, **kwargs):
        return self._client._invoke(self, op, bind(args, kwargs))
    functools.update_wrapper(method, local)      # __wrapped__: inspect.signature is local's
    return method


def _derived(kind):
    """Class decorator: add every operation of ``kind`` the class does not write by hand,
    under the local method's names (aliases such as ``append`` = ``push`` included)."""
    def decorate(cls):
        local_class = _local_classes()[kind]
        names_of: dict = {}         # a local function -> every name it has in the class
        for name in dir(local_class):
            names_of.setdefault(id(_static_attr(local_class, name)), []).append(name)
        for name, op in _operations(kind).items():
            if name.startswith("_") and not name.startswith("__") or name in cls.__dict__:
                continue
            made = _remote_method(op)
            local = _static_attr(local_class, name)
            if isinstance(local, property):
                made = property(made, doc=made.__doc__)
            for alias in names_of.get(id(local), [name]):
                if alias not in cls.__dict__:
                    setattr(cls, alias, made)
        cls.__abstractmethods__ = frozenset(
            n for n in getattr(cls, "__abstractmethods__", ())
            if getattr(getattr(cls, n, None), "__isabstractmethod__", False))
        return cls
    return decorate


def _static_attr(cls, name):
    """``cls.name`` as stored in the class (no descriptor call), or None."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


@_derived("dict")
class RemoteDict(_RemoteManager, MutableMapping):
    """``db.dict(name)`` over HTTP."""

    _kind = "dict"

    def update(self, *args, **kwargs):
        """Like ``dict.update``, in one transaction on the server."""
        self._call("_update", dict(*args, **kwargs))


@_derived("list")
class RemoteList(_RemoteManager, MutableSequence):
    """``db.list(name)`` over HTTP."""

    _kind = "list"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._call("_get_slice", index.start, index.stop, index.step)
        return self._call("__getitem__", index)

    def __setitem__(self, index, value):
        if isinstance(index, slice):
            return self._call("_set_slice", value, index.start, index.stop, index.step)
        return self._call("__setitem__", index, value)

    def __delitem__(self, index):
        if isinstance(index, slice):
            return self._call("_del_slice", index.start, index.stop, index.step)
        return self._call("__delitem__", index)

    def __reversed__(self):
        return reversed(list(self))

    def __iadd__(self, values):
        self.extend(values)
        return self


@_derived("queue")
class RemoteQueue(_RemoteManager):
    """``db.queue(name)`` over HTTP. A blocking ``get`` waits in chunks on the server; a
    ``get`` whose response is lost is retried and answered with the same item."""

    _kind = "queue"

    def _item(self, item):
        if item is None:
            return None
        if "lease_id" not in item:
            return QueueItem(item["priority"], item["timestamp"], self._value(item["data"]))
        leased = LeasedItem(item["priority"], item["timestamp"], self._value(item["data"]))
        leased.lease_id = item["lease_id"]
        return leased

    def as_async(self) -> "AsyncManager":
        """An awaitable twin whose ``get`` can be cancelled without losing an item."""
        return _AsyncRemoteQueue(self)


@_derived("blob")
class RemoteBlobs(_RemoteManager):
    """``db.blobs(name)`` over HTTP: bytes travel raw, metadata in a header."""

    _kind = "blob"


@_derived("log")
class RemoteLog(_RemoteManager):
    """``db.log(name)`` over HTTP; ``live()`` follows a server-sent event stream."""

    _kind = "log"

    def live(self, window, period, aggregator=list, where=None) -> "Stream":
        """``aggregator(values in the last window)`` now and every ``period`` (a stream);
        ``where`` keeps only the entries a filter matches (see "Queries and filters")."""
        if not callable(aggregator):
            raise TypeError("aggregator must be callable")
        window, period = _seconds(window, "window"), _seconds(period, "period")
        if not period:
            raise ValueError("period must be positive")
        _Filter(where, "data")      # a malformed filter raises here, before any request
        query = f"window={window!r}&period={period!r}"
        if where is not None:
            query += "&where=" + _segment(_json_dumps(where))
        decode = self._value
        return _RemoteStream(self._client._http, f"{self._base}/live?{query}",
                             lambda text: aggregator([decode(v) for v in json.loads(text)]))

    def as_async(self) -> "AsyncLogManager":
        """An awaitable twin; ``async for summary in alog.live(...)`` works."""
        return AsyncLogManager(self)


@_derived("channel")
class RemoteChannel(_RemoteManager):
    """``db.channel(name)`` over HTTP; subscriptions are server-sent event streams."""

    _kind = "channel"

    def subscribe(self) -> "Stream":
        """A subscription receiving every message published once this call has returned.

            >>> chat = client.channel("chat")
            >>> with chat.subscribe() as sub:
            ...     chat.publish("hello")
            ...     for message in sub.listen(timeout=5):
            ...         print(message)
            ...         break
            hello
        """
        return _RemoteStream(self._client._http, self._base + "/sse", self._codec.decode)

    def as_async(self) -> "AsyncChannelManager":
        """An awaitable twin; ``async for message in achannel.subscribe().listen()`` works."""
        return AsyncChannelManager(self)


@_derived("collection")
class RemoteCollection(_RemoteManager):
    """``db.collection(name)`` over HTTP: documents, full-text, fuzzy, vector and graph search."""

    _kind = "collection"

    def _document(self, data) -> "Document":
        doc = Document.from_dict({**data, "body": None})
        doc.body = None if data.get("body") is None else self._value(data["body"])
        return doc


class _RemoteStream(Stream):
    """A server-sent event stream read by a thread of this client."""

    _what = "event"

    def __init__(self, http, target, decode):
        super().__init__()
        self._decode_text = decode
        self._conn, chunks = http.stream(target)
        http.streams.add(self)
        threading.Thread(target=self._read, args=(chunks,), daemon=True,
                         name="beaver-client-stream").start()

    def _read(self, chunks):
        buffer, data = b"", []
        try:
            for chunk in chunks:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    line = line.rstrip(b"\r").decode("utf-8")
                    if line.startswith("data:"):
                        data.append(line[6:] if line.startswith("data: ") else line[5:])
                    elif not line and data:
                        self._deliver("\n".join(data))
                        data = []
        except (OSError, ValueError):
            pass
        if not self.closed:
            self._deliver(RemoteError("the server ended the stream"))

    def _decode(self, raw):
        if isinstance(raw, RemoteError):
            self._deliver(raw)          # every later get() fails the same way
            raise raw
        return self._decode_text(raw)

    def _stop(self):
        self._conn.close()


class _RemoteEventHandle:
    """Returned by a remote manager's ``on(...)``; ``off()`` stops listening."""

    def __init__(self, stream, event, callback):
        self.event, self.callback = event, callback
        self._stream = stream
        self._thread = threading.Thread(target=self._dispatch, daemon=True,
                                        name="beaver-client-events")
        self._thread.start()

    def _dispatch(self):
        with contextlib.suppress(RemoteError):
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


class _AsyncRemoteQueue(AsyncManager):
    """Awaitable twin of a remote queue: a cancelled ``get`` gives back what it took."""

    async def get(self, block=True, timeout=None, lease=None) -> QueueItem:
        """``get`` as a coroutine that may safely be cancelled."""
        future = asyncio.ensure_future(asyncio.to_thread(self._sync.get, block, timeout, lease))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(AsyncQueueManager._give_back, self))
            raise


class RemoteLock:
    """``db.lock(name)`` over HTTP: the hold is the server's lock ticket (its ``token``), so
    any worker of the server can renew or release it."""

    def __init__(self, client, name, timeout=None, ttl=60.0):
        self._client = client
        self.name = _check_name(name)
        self.timeout = _seconds(timeout, "timeout", wait=True)
        self.ttl = _seconds(ttl, "ttl", positive=True)
        if self.ttl is None:
            raise TypeError("a lock needs a ttl (seconds or a timedelta)")
        self._base = f"/locks/{_segment(name)}"
        self._token = None
        self._guard = threading.Lock()

    def _post(self, action, query, wait=0.0):
        return self._client._request("POST", f"{self._base}/{action}?{query}", writes=True,
                                     wait=wait)

    @property
    def token(self):
        """The fencing token of the current hold (``None`` when not held)."""
        return self._token

    @property
    def held(self) -> bool:
        """True while this object holds the lock (and its TTL has not run out)."""
        return self._token is not None and json.loads(self._client._request(
            "GET", f"{self._base}?token={self._token}"))["held"]

    @property
    def locked(self) -> bool:
        """True while anybody holds the lock."""
        return json.loads(self._client._request("GET", self._base))["locked"]

    def acquire(self, timeout=None, block=True):
        """Wait for the lock (up to ``timeout`` s) and take it; ``LockTimeout`` otherwise."""
        timeout = self.timeout if timeout is None else _seconds(timeout, "timeout", wait=True)
        deadline = _Deadline(timeout if block else 0.0)
        if not self._guard.acquire(timeout=-1 if timeout is None else timeout):
            raise LockTimeout(f"lock {self.name!r} is held by another thread of this object")
        try:
            key = uuid.uuid4().hex
            while True:
                wait = deadline.remaining(cap=_CHUNK_WAIT)
                try:
                    held = json.loads(self._client._request(
                        "POST", f"{self._base}/acquire?timeout={wait!r}&ttl={self.ttl!r}",
                        writes=True, wait=wait, key=key))
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
            self._post("release", f"token={token}")
        finally:
            self._guard.release()

    def renew(self, ttl=None):
        """Extend the hold to ``ttl`` (default: the lock's ttl) seconds from now."""
        if self._token is None:
            raise LockLost(f"lock {self.name!r} is not held by this object")
        ttl = self.ttl if ttl is None else _seconds(ttl, "ttl", positive=True)
        try:
            self._post("renew", f"token={self._token}&ttl={ttl!r}")
        except LockLost:
            self._token = None          # the hold ran out: this object may acquire again
            self._guard.release()
            raise

    __enter__, __exit__, as_async = Lock.__enter__, Lock.__exit__, Lock.as_async

    def __repr__(self):
        return f"<RemoteLock {self.name!r} {'held' if self._token else 'free'}>"


class _Batches(threading.local):
    """Per thread, the writes of its open remote ``transaction()`` (None outside one)."""
    batch = None


class BeaverClient:
    """A ``BeaverDB`` look-alike that talks to a beaver server: change one line to go remote.

        >>> db = BeaverClient("http://127.0.0.1:8000", token="s3cret")   # was BeaverDB("app.db")
        >>> db.dict("app_config")["theme"] = "dark"
        >>> db.queue("jobs").put({"to": "ada"})
        >>> db.queue("jobs").get(timeout=5).data
        {'to': 'ada'}
        >>> db.close()

    Each thread keeps one keep-alive connection. Errors are the same classes ``BeaverDB``
    raises (``KeyError``, ``IndexError``, ``TimeoutError``, ``LockTimeout``...); transport
    failures raise ``RemoteError``, a wrong token ``Unauthorized``. Every write carries an
    idempotency key, so it is applied exactly once even when a response is lost and the
    request is sent again. Events (``.on()``), channel subscriptions and live views stream
    as server-sent events. ``transaction()`` queues writes and applies them at once.
    """

    _base = ""
    _options: dict = {}
    _codec = _JSON

    def __init__(self, url, token=None, *, timeout=60.0):
        self._http = _Http(url, token, timeout)
        self._managers = _Managers()
        self._closed = False
        self._local = _Batches()

    @property
    def url(self) -> str:
        return self._http.url

    def _manager(self, cls, name, model=None, **options):
        if self._closed:
            raise ClosedError("the client is closed")
        return self._managers.get(cls, name, model, lambda: cls(self, name, model, **options))

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

    def log(self, name, model=None, retention=_DEFAULT) -> RemoteLog:
        """The remote time-indexed log called ``name`` (``retention`` applies to its writes)."""
        return self._manager(RemoteLog, name, model, retention=retention)

    def channel(self, name, model=None, retention=_DEFAULT,
                max_messages=_DEFAULT) -> RemoteChannel:
        """The remote pub/sub channel called ``name`` (``retention``, ``max_messages`` apply
        to its ``publish`` and ``prune``)."""
        return self._manager(RemoteChannel, name, model, retention=retention,
                             max_messages=max_messages)

    def collection(self, name, model=None, metric=None, **options) -> RemoteCollection:
        """The remote document collection called ``name`` (``metric`` fixed at creation)."""
        manager = self._manager(RemoteCollection, name, model)
        if metric is not None or options:
            if metric is not None and metric not in VECTOR_METRICS:
                raise ValueError(f"metric must be one of {VECTOR_METRICS}, not {metric!r}")
            self._request("PUT", manager._base, _json_dumps(
                {"metric": metric, "options": options}).encode("utf-8"), writes=True)
        return manager

    def lock(self, name, timeout=None, ttl=60.0, lock_ttl=None) -> RemoteLock:
        """A new remote inter-process lock object on ``name``."""
        if self._closed:
            raise ClosedError("the client is closed")
        return RemoteLock(self, name, timeout=timeout, ttl=lock_ttl if lock_ttl is not None
                          else ttl)

    def info(self) -> dict:
        """Every structure on the server: kind, name and size."""
        return json.loads(self._request("GET", "/info"))

    # -- the wire ---------------------------------------------------------------------------

    def _request(self, verb, target, body=b"", headers="", writes=False, wait=0.0, key=None,
                 sink=None):
        """The body of one answer (or the headers, when ``sink`` took the body); raises the
        server's exception. A write carries an idempotency key (``key`` to reuse one)."""
        if self._closed:
            raise ClosedError("the client is closed")
        if writes:
            headers += f"Idempotency-Key: {key or _request_key()}\r\n"
        status, answer, data = self._send(verb, target, body, headers, wait, sink)
        if status >= 400:
            _raise_remote(status, data)
        return data if sink is None else answer

    def _invoke(self, manager, op, args):
        """Run the declared operation ``op`` of ``manager`` with bound ``args``."""
        try:
            verb, target, body, headers = _request_of(manager, op, args)
        except (TypeError, ValueError):
            if op.result == "exists":
                return False
            raise
        if op.writes and self._local.batch is not None:
            known = _KNOWN_RESULTS.get(op.result)
            if known is None:
                raise BeaverError(f"{op.kind}.{op.method}() answers with a result, so it cannot "
                                  "be queued in a remote transaction(): call it outside the block")
            self._local.batch.append(_subrequest(verb, target, body, headers))
            return known(args)
        if op.wait and args.get("block", True):
            return self._wait(manager, op, args)
        if op.writes:
            headers += f"Idempotency-Key: {_request_key()}\r\n"
        return self._answer(manager, op, args, verb, target, body, headers)

    def _send(self, verb, target, body, headers, wait=0.0, sink=None):
        if len(target) > _LONG_TARGET:      # too long for a request line: tunnel it
            body = _json_dumps(_subrequest(verb, target, body, "")).encode("utf-8")
            verb, target = "POST", "/call"
            headers += "Content-Type: application/json\r\n"
        return self._http.request(verb, target, body, headers, wait, sink)

    def _answer(self, manager, op, args, verb, target, body, headers, wait=0.0):
        status, answer, data = self._send(verb, target, body, headers, wait)
        if status >= 400:
            if status == 404 and op.result == "exists":
                return False
            try:
                _raise_remote(status, data)
            except KeyError:
                fallback = next((p.name for p in _plan(op)[2] if p.type == "fallback"), None)
                if fallback is not None and args[fallback] is not _MISSING:
                    return args[fallback]
                if op.result.endswith("?"):
                    return None
                raise
        value = _TAKE[op.result.rstrip("?")](manager, (status, answer, data), args)
        return iter(value) if op.method == "__iter__" else value

    def _wait(self, manager, op, args):
        """A blocking call in chunks of at most ``_CHUNK_WAIT`` s, with one idempotency key:
        an answer lost on the way is answered again, never taken twice."""
        deadline = _Deadline(_seconds(args[op.wait], op.wait))
        key = f"Idempotency-Key: {_request_key()}\r\n"
        while True:
            wait = deadline.remaining(cap=_CHUNK_WAIT)
            verb, target, body, headers = _request_of(manager, op, {**args, op.wait: wait})
            try:
                return self._answer(manager, op, args, verb, target, body, headers + key, wait)
            except Timeout:
                if deadline.expired:
                    raise

    # -- the whole database -------------------------------------------------------------------

    def dump(self, fp, names=None) -> int:
        """Write the server's database (or the structures in ``names``) as JSON lines."""
        import codecs
        from urllib.parse import quote
        decoder = codecs.getincrementaldecoder("utf-8")()
        target = "/dump" + (f"?names={quote(','.join(names), safe='')}" if names else "")
        headers = self._request("GET", target, sink=lambda chunk: fp.write(decoder.decode(chunk)))
        fp.write(decoder.decode(b"", final=True))
        return int(headers.get("beaver-structures", 0))

    def load(self, fp, mode="append") -> int:
        """Send a JSON-lines dump to the server, loaded there in one transaction.

        It is sent in pieces: a binary file as it is, anything else (a text file, a pipe)
        through a spool (memory up to 1 MB, then a temporary file).
        """
        from urllib.parse import quote
        with _upload(fp) as body:
            data = self._request("POST", f"/load?mode={quote(str(mode), safe='')}", body,
                                 "Content-Type: application/x-ndjson\r\n", writes=True)
        return json.loads(data)["structures"]

    def copy_to(self, other, mode="new", progress=None) -> int:
        """Copy every structure of the server's database into ``other`` (a ``BeaverDB``, a
        path or URL to open, or another ``BeaverClient``); returns how many were copied.

        As ``BeaverDB.copy_to``: one snapshot of the source, one transaction in ``other``,
        the same ``mode`` ("new", "append", "replace") and ``progress(copied, total)``. The
        dump travels through a spool (memory up to 1 MB, then a temporary file).
        """
        return _copy_database(self, other, mode, progress)

    def backup(self, path) -> str:
        """Download a consistent copy of the server's database file to ``path``."""
        target = os.path.abspath(os.fspath(path))
        partial = target + ".part"
        try:
            with open(partial, "wb") as f:
                self._request("GET", "/backup", sink=f.write)
            os.replace(partial, target)
        finally:
            with contextlib.suppress(OSError):
                os.remove(partial)
        return target

    @contextlib.contextmanager
    def transaction(self):
        """Queue the writes of the block and apply them at its end, atomically, on the server.

            >>> with client.transaction():
            ...     client.dict("accounts")["alice"] = 90
            ...     client.list("ledger").push({"from": "alice", "amount": 10})
            >>> client.dict("accounts")["alice"], client.list("ledger")[-1]
            (90, {'from': 'alice', 'amount': 10})

        Like Redis MULTI/EXEC: the writes are sent together when the block ends and applied
        in one server transaction, all or nothing; an exception in the block sends nothing.
        Reads inside the block go to the server at once and do not see the queued writes. A
        write whose result is needed (``pop``, queue ``get``, ``ack``...) raises
        ``BeaverError`` inside the block. Nested blocks join the outer one.
        """
        batch = self._local.batch
        outer = batch is None
        if outer:
            batch = self._local.batch = []
        mark = len(batch)
        try:
            yield self
        except BaseException:
            del batch[mark:]
            raise
        finally:
            if outer:
                self._local.batch = None
        if outer and batch:
            self._request("POST", "/transaction", _json_dumps(batch).encode("utf-8"),
                          "Content-Type: application/json\r\n", writes=True)

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


def _subrequest(verb, target, body, headers) -> dict:
    """One request as JSON, for a transaction or a long target (see the server's /call)."""
    request = {"method": verb, "target": target}
    if body:
        request["body64"] = base64.b64encode(body).decode("ascii")
    named = dict(line.split(": ", 1) for line in headers.split("\r\n") if line)
    if named:
        request["headers"] = named
    return request


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

        >>> import beaver
        >>> report = beaver.import_upstream("old.db", "new.db")
        >>> report["upstream"], report["structures"]["dict"]["app_config"]
        ('2.x', 4)

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
# The operations of each kind derive from ``_API`` (names, arguments, help from docstrings);
# the few irregular ones are written below. Output is JSON (``"dark"``, lists, objects) so it
# pipes into ``jq`` (``--raw`` prints a string as it is); a VALUE argument is JSON when it
# parses as JSON, else the text itself; ``-`` reads standard input. Exit status: 0 done, 1 not
# found, a false answer or the operation failed, 2 usage error. Errors go to standard error.

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
        return _queue_item(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_cli_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _cli_json(v) for k, v in value.items()}
    return _to_jsonable(value)


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


def _leased_item(lease_id):
    item = LeasedItem(0, 0.0, None)
    item.lease_id = int(lease_id)
    return item


class _UsageError(Exception):
    """Bad command-line usage found after parsing (exit status 2)."""


# wire type -> how the command line gives that argument: (argparse options, converter)
_CLI_TYPES = {
    "str": ({}, None), "docid": ({}, None),
    "value": ({"metavar": "VALUE"}, _cli_value), "json": ({}, _cli_value),
    "seconds": ({"type": float}, None), "epoch": ({}, _cli_time),
    "values": ({"metavar": "JSON_LIST"}, _cli_value), "vector": ({"metavar": "JSON_LIST"},
                                                                 _cli_value),
    "item": ({"metavar": "LEASE_ID", "type": int}, _leased_item),
    "bytes": ({"metavar": "FILE"}, _cli_bytes), "header": ({"metavar": "JSON"}, _cli_value),
    "dump": ({"metavar": "FILE"}, _cli_text), "mapping": ({"metavar": "JSON_OBJECT"},
                                                          _cli_value),
    "document": ({"metavar": "JSON"}, lambda t: Document.from_dict(_cli_value(t))),
}
# parameter -> its help, and its flags where they are not just --the-name
_CLI_HELP = {
    "key": "the key", "value": "a JSON value, else taken as text; - reads standard input",
    "data": "a JSON value, else text; - reads standard input", "payload": "the message: "
    "JSON, else text", "index": "a position (negative counts from the end)",
    "ttl_seconds": "expire after this many seconds", "priority": "lower comes out first",
    "timeout": "seconds to wait (default: forever)", "block": "fail at once instead of waiting",
    "lease": "seconds before the item returns unless acked (prints its lease_id)",
    "item": "the lease_id printed by get --lease", "metadata": "JSON metadata",
    "timestamp": "epoch seconds or an ISO 8601 time", "start": "epoch seconds or ISO 8601",
    "end": "epoch seconds or ISO 8601", "limit": "at most this many results (channel "
    "history: the newest ones)", "offset": "skip this many results first", "order": "asc "
    "(oldest first) or desc", "order_by": "a field path to sort by; -path sorts descending",
    "path": "a dotted field path, e.g. author.name",
    "document": "a document id", "doc_id": "a document id", "source": "a document id",
    "target": "a document id", "label": "an edge label", "labels": "an edge label "
    "(repeatable)", "direction": "which edges", "depth": "edges to follow at most",
    "query": "the words to find", "on": "a field path (repeatable)", "top_k": "results at "
    "most", "fuzziness": "typos allowed per word (0, 1 or 2)", "raw": "the query is FTS5 "
    "syntax", "highlight": "add a snippet with the matches in [brackets]", "vector":
    "a JSON list of numbers", "where": "a JSON filter, e.g. '{\"year\": {\"$gte\": 2020}}'",
    "data_or_fp": "the dump file (JSON); - reads standard input", "values": "a JSON list",
    "items": "a JSON object of keys and values", "fts": "index the text", "fuzzy":
    "(accepted for compatibility)",
}
_CLI_FLAGS = {"ttl_seconds": ["--ttl"], "priority": ["--priority", "-p"],
              "block": ["--no-wait", "-n"], "top_k": ["--top-k", "-k"],
              "fuzziness": ["--fuzziness", "-f"], "metadata": ["--metadata", "-m"],
              "timestamp": ["--timestamp", "-t"], "raw": ["--raw-query"]}
_CLI_CHOICES = {"direction": ["outgoing", "incoming", "both"]}
# (kind, local method) -> CLI name; None leaves it out (it has a better spelling here)
_CLI_NAMES = {"__getitem__": "get", "__setitem__": "set", "__delitem__": "delete",
              "__contains__": "has", "__len__": "len", "__iter__": "items", "log": "write"}
_CLI_SKIP = {("dict", "__iter__"), ("dict", "get"), ("dict", "values"), ("blob", "__iter__"), ("blob", "__getitem__"),
             ("blob", "get"), ("blob", "__setitem__"), ("collection", "get"),
             ("collection", "index"), ("list", "_get_slice"), ("list", "_set_slice"),
             ("list", "_del_slice"), ("list", "__setitem__"), ("list", "__getitem__"),
             ("list", "__delitem__"), ("dict", "items")}
_CLI_DOC = {"__getitem__": "print the value stored there", "__delitem__": "delete it",
            "__contains__": "print whether it is there (exit status 1 if not)",
            "__len__": "print the number of items", "__iter__": "print every item, in order",
            "dump": "print it as JSON (what load reads back)",
            "load": "add the items of a dump FILE in one transaction"}
# result -> how the CLI prints it
_CLI_SHOW = {
    "hits": lambda hits: [{"document": d, "score": s, **({"snippet": h[0]} if h else {})}
                          for d, s, *h in hits],
    "entries": lambda rows: [{"timestamp": e.timestamp.isoformat(), "data": e.data}
                             for e in rows],
    "edges": lambda edges: [e._asdict() for e in edges],
    "pairs": dict,
}


def _cli_declared(kind):
    """(name, help, [arguments], handler) of every declared operation of ``kind``."""
    found = []
    for method, op in _operations(kind).items():
        if (kind, method) in _CLI_SKIP:
            continue
        name = _CLI_NAMES.get(method, method)
        if name is None or name.startswith("_"):
            continue
        doc = _CLI_DOC.get(method) or (_local_function(op).__doc__ or "").strip().split(
            "\n")[0].replace("``", "")
        arguments = [_cli_argument(param) for param in _plan(op)[2]
                     if param.type not in ("fallback", "local")]
        found.append((name.replace("_", "-"), doc.rstrip("."), arguments, _cli_call(op),
                      not op.writes))
    return found


def _cli_argument(param):
    options, _ = _CLI_TYPES.get(param.type, ({}, None))
    options = {**options, "help": _CLI_HELP.get(param.name, param.name.replace("_", " ")),
               "dest": param.name}
    if param.name in _CLI_CHOICES:
        options["choices"] = _CLI_CHOICES[param.name]
    if param.default is _MISSING:
        options.pop("dest")
        return (param.name,), options
    if isinstance(param.default, bool):
        options.pop("type", None)
        options.pop("metavar", None)
        options["action"] = "store_false" if param.default else "store_true"
        flags = _CLI_FLAGS.get(param.name) or [
            ("--no-" if param.default else "--") + param.name.replace("_", "-")]
        return tuple(flags), {**options, "default": param.default}
    if param.name in ("on", "labels"):
        options["action"] = "append"
    flags = _CLI_FLAGS.get(param.name) or ["--" + param.name.replace("_", "-")]
    return tuple(flags), {**options, "default": param.default}


def _cli_call(op):
    """The handler running ``op`` on a manager with the parsed arguments."""
    def run(manager, args):
        kwargs = {}
        for param in _plan(op)[2]:
            if param.type in ("fallback", "local"):
                continue
            value = getattr(args, param.name)
            convert = _CLI_TYPES.get(param.type, ({}, None))[1]
            kwargs[param.name] = value if convert is None or value is None or isinstance(
                value, bool) or (param.default is not _MISSING and value is param.default) \
                else convert(value)
        found = getattr(manager, op.method)         # a property gives its value at once
        result = found(**kwargs) if callable(found) else found
        if op.method == "__iter__":
            result = list(result)
        if not op.result:
            return _NOTHING
        if result is False:                        # has, ack, nack: a false answer fails
            print("false")
            return _Exit(1)
        return _CLI_SHOW.get(op.result, lambda r: r)(result)
    return run


def _quiet(action):
    def run(manager, args):
        action(manager, args)
        return _NOTHING
    return run


def _arg(*flags, **options):
    return flags, options


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


def _cli_document(args):
    value = _cli_value(args.document)
    if args.id is None and isinstance(value, dict) and "id" in value and \
            set(value) <= {"id", "body", "embedding"}:
        return Document.from_dict(value)
    return Document(id=args.id, body=value)


def _cli_index_many(manager, args):
    """Index JSON-lines documents in batches of 1000 (one transaction each), with progress."""
    total, batch = 0, []
    with _Progress(sys.stdin if args.file == "-" else open(args.file, encoding="utf-8"),
                   "documents read") as lines:
        for line in lines:
            if line.strip():
                batch.append(Document.from_dict(json.loads(line)))
            if len(batch) >= 1000:
                total += manager.index_many(batch, fts=not args.no_fts)
                batch = []
        total += manager.index_many(batch, fts=not args.no_fts) if batch else 0
    return {"indexed": total}


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


_KEY = _arg("key", help="the key")
_COUNT = _arg("--count", type=int, default=None, help="stop after this many (default: never)")
_TIMEOUT = _arg("--timeout", type=float, default=None, help="seconds to wait (default: forever)")
_NO_WAIT = _arg("--no-wait", "-n", action="store_true", help="fail at once instead of waiting")

# kind -> (help, BeaverDB factory, the operations written by hand: (operation, help,
# [arguments], handler(manager, args), reads)); the declared ones are added by _cli_operations
CLI_KINDS = {
    "dict": ("a persistent dict of JSON values, with TTL", "dict", [
        ("items", "print every key and value as one JSON object", [],
         lambda m, a: dict(m.items()), True),
    ]),
    "list": ("a persistent list", "list", [
        ("get", "print the item at INDEX", [_arg("index", type=int, help="a position")],
         lambda m, a: m[a.index], True),
        ("set", "replace the item at INDEX", [_arg("index", type=int, help="a position"),
                                               _arg("value", help=_CLI_HELP["value"])],
         _quiet(lambda m, a: m.__setitem__(a.index, _cli_value(a.value))), False),
        ("delete", "delete the item at INDEX", [_arg("index", type=int, help="a position")],
         _quiet(lambda m, a: m.__delitem__(a.index)), False),
    ]),
    "queue": ("a persistent priority queue", "queue", []),
    "blob": ("a store of binary objects with JSON metadata", "blobs", [
        ("get", "write the bytes under KEY to standard output (or --output)", [_KEY, _arg(
            "--output", "-o", default=None, help="write to this file (default: stdout)")],
         _blob_get, True),
        ("info", "print the size and metadata of KEY", [_KEY], _blob_info, True),
    ]),
    "log": ("a time-indexed log of JSON values", "log", [
        ("live", "print the values of the last --window seconds every --period, as JSON lines",
         [_arg("--window", type=float, default=60.0, help="seconds of log in each update"),
          _arg("--period", type=float, default=1.0, help="seconds between updates"), _COUNT],
         _log_live, True),
    ]),
    "channel": ("a pub/sub channel", "channel", [
        ("listen", "print messages published from now on, as JSON lines", [
            _arg("--timeout", type=float, default=None,
                 help="stop after this many seconds without a message (default: never)"),
            _COUNT], _channel_listen, True),
    ]),
    "collection": ("documents searchable by text, typos, vectors and relationships",
                   "collection", [
        ("index", "store a document: JSON {\"id\", \"body\", \"embedding\"} (or a body + --id)",
         [_arg("document", help="the document as JSON; - reads standard input"),
          _arg("--id", default=None, help="the id, when DOCUMENT is just the body"),
          _arg("--no-fts", action="store_true", help="do not index the text")],
         lambda m, a: m.index(_cli_document(a), fts=not a.no_fts).id, False),
        ("index-many", "index the JSON-lines documents of FILE, 1000 per transaction", [
            _arg("file", help="one JSON document per line; - reads standard input"),
            _arg("--no-fts", action="store_true", help="do not index the text")],
         _cli_index_many, False),
        ("ids", "print the ids of the documents", [], lambda m, a: [d.id for d in m], True),
    ]),
    "lock": ("an inter-process lock", None, [
        ("run", "run a command while holding the lock; exit with its status", [
            _TIMEOUT, _NO_WAIT,
            _arg("--ttl", type=float, default=60.0, help="seconds a hold lasts unless renewed "
                                                          "(renewed while the command runs)"),
            _arg("argv", nargs="...", metavar="COMMAND", help="the command and its arguments")],
         _lock_run, False),
        ("status", "print whether the lock is held", [], _lock_status, True),
    ]),
}


def _cli_operations(kind):
    """Every operation of ``kind``: the hand-written ones, then the declared ones."""
    hand = CLI_KINDS[kind][2]
    names = {op[0] for op in hand}
    return hand + [op for op in ([] if kind == "lock" else _cli_declared(kind))
                   if op[0] not in names]


def _help_formatter():
    import argparse

    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Descriptions as written, and every option's default."""
    return Help


def _cli_parser(kind=None):
    """The argument parser; only ``kind`` gets its operations (building them all is slow)."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="beaver", description="Inspect and change a beaver database from the shell. "
        "Values are JSON (else text); output is JSON.", formatter_class=_help_formatter(),
        epilog="examples:\n  beaver --database my_data.db dict app_config get theme\n"
               "  beaver --database data.db lock my-cron-job run bash -c 'run_daily_report.sh'")
    parser.add_argument("--database", "-d", default=argparse.SUPPRESS,
                        help="database file (default: $BEAVER_DATABASE, else beaver.db)")
    parser.add_argument("--url", default=argparse.SUPPRESS,
                        help="use a beaver server at this URL instead (default: $BEAVER_URL)")
    parser.add_argument("--token", default=argparse.SUPPRESS,
                        help="bearer token for --url (default: $BEAVER_TOKEN)")
    parser.add_argument("--raw", action="store_true",
                        help="print a string result as it is, without JSON quotes")
    parser.add_argument("--version", action="version", version=f"beaver {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for each, (help_text, _, _) in CLI_KINDS.items():
        _cli_kind_parser(commands, each, help_text, each == kind)
    _cli_database_parsers(commands)
    return parser


def _cli_kind_parser(commands, kind, help_text, full):
    sub = commands.add_parser(kind, help=help_text, description=help_text,
                              formatter_class=_help_formatter())
    if not full:        # not the kind on this command line: its name is enough
        return
    sub.add_argument("name", help=f"the name of the {kind}")
    ops = sub.add_subparsers(dest="operation", metavar="OPERATION", required=True)
    for operation, op_help, arguments, handler, reads in _cli_operations(kind):
        op = ops.add_parser(operation, help=op_help, description=op_help,
                            formatter_class=_help_formatter())
        for flags, options in arguments:
            op.add_argument(*flags, **options)
        op.set_defaults(handler=handler, kind=kind, reads=reads)


def _cli_database_parsers(commands):
    def add(name, help_text, handler, reads):
        parser = commands.add_parser(name, help=help_text, description=help_text,
                                     formatter_class=_help_formatter())
        parser.set_defaults(handler=handler, reads=reads)
        return parser
    add("info", "print every structure: kind, name, size", lambda db, a: db.info(), True)
    dump = add("dump", "print the database (or the named structures) as JSON lines",
               _cli_dump, True)
    dump.add_argument("names", nargs="*", help="structure names (or kind:name); default all")
    load = add("load", "load a JSON-lines dump in one transaction", _cli_load, False)
    load.add_argument("file", help="the dump file; - reads standard input")
    load.add_argument("--replace", action="store_true",
                      help="empty each structure of the dump before loading it")
    backup = add("backup", "copy the database to PATH while it is in use",
                 lambda db, a: db.backup(a.path), True)
    backup.add_argument("path", help="the copy to write")
    commands.add_parser("serve", help="run the REST server (see beaver serve --help)",
                        add_help=False)
    commands.add_parser("client", help="run a command against the database (same as without "
                                       "'client')", add_help=False)
    commands.add_parser("import-upstream", help="copy a beaver-db 1.x/2.x file into a new "
                                                "beaver file (see --help)", add_help=False)
    commands.add_parser("copy", help="copy every structure of SRC into DST, files or URLs "
                                     "(see --help)", add_help=False)


class _Progress:
    """A text file passed through, counting lines; the count shows on stderr if a terminal."""

    def __init__(self, fp, what):
        self.fp, self.what, self.lines = fp, what, 0
        self.show = sys.stderr.isatty()
        self.shown = 0.0

    def _count(self, text):
        self.lines += text.count("\n")
        if self.show and time.monotonic() - self.shown > 0.2:
            self.shown = time.monotonic()
            print(f"\r{self.lines} {self.what}", end="", file=sys.stderr, flush=True)
        return text

    def write(self, text):
        return self.fp.write(self._count(text))

    def read(self, size=-1):
        return self._count(self.fp.read(size))

    def __iter__(self):
        return (self._count(line) for line in self.fp)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.show:
            print(f"\r{self.lines} {self.what}", file=sys.stderr, flush=True)
        if self.fp not in (sys.stdin, sys.stdout):
            self.fp.close()


def _cli_dump(db, args):
    with _Progress(sys.stdout, "lines dumped") as out:
        db.dump(out, args.names or None)
    return _NOTHING


def _cli_load(db, args):
    mode = "replace" if args.replace else "append"
    source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    with _Progress(source, "lines loaded") as lines:
        return {"structures": db.load(lines, mode)}


def _open_database(args):
    database = getattr(args, "database", None)
    url = getattr(args, "url", None) or os.environ.get("BEAVER_URL")
    if url and not database:
        return BeaverClient(url, token=getattr(args, "token", None) or
                            os.environ.get("BEAVER_TOKEN"))
    path = database or os.environ.get("BEAVER_DATABASE") or "beaver.db"
    if getattr(args, "reads", False) and path != ":memory:" and not os.path.exists(path) \
            and not path.startswith(_POSTGRES_SCHEMES):
        raise BeaverError(f"no database at {path!r} (a read never creates one)")
    return BeaverDB(path)


def _cli_run(db, args):
    if args.command not in CLI_KINDS:
        return args.handler(db, args)
    factory = CLI_KINDS[args.command][1]
    if factory is None:
        return args.handler(db, args)
    return args.handler(getattr(db, factory)(args.name), args)


def _cli_print(result, raw=False):
    if result is _NOTHING:
        return 0
    if isinstance(result, _Exit):
        return int(result)
    if raw and isinstance(result, str):
        print(result)
    else:
        print(json.dumps(_cli_json(result), indent=2, ensure_ascii=False))
    return 0


def _command_word(argv):
    """(index of the command word after the top-level options, the --database value)."""
    database, i = None, 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help"):
        if argv[i] in ("--database", "-d") and i + 1 < len(argv):
            database = argv[i + 1]
        i += 1 if "=" in argv[i] or argv[i] in ("--version", "--raw") else 2
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
        prog="beaver import-upstream", formatter_class=_help_formatter(),
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


def _cli_copy(argv) -> int:
    """``beaver copy SRC DST [--append | --replace]``: prints ``{"structures": N}``."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="beaver copy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy every structure of the database SRC into DST (see BeaverDB.copy_to): "
                    "one snapshot of SRC, written to DST in one transaction. Each is a file "
                    "(DST is created if missing), a database URL, or a beaver server's "
                    "http(s):// URL ($BEAVER_TOKEN is its token). Progress shows on stderr "
                    "when it is a terminal.")
    parser.add_argument("source", metavar="SRC", help="the database to read")
    parser.add_argument("target", metavar="DST", help="the database to write")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--append", action="store_const", const="append", dest="mode",
                       default="new", help="add to structures DST already holds (default: "
                                           "refuse to copy into them)")
    modes.add_argument("--replace", action="store_const", const="replace", dest="mode",
                       help="empty the structures DST already holds first (default: "
                            "refuse to copy into them)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        if "://" not in args.source and not os.path.exists(args.source):
            raise BeaverError(f"no database at {args.source!r} (a read never creates one)")
        with _open_end(args.source) as source, _open_end(args.target) as target, \
                _CopyProgress() as progress:
            count = source.copy_to(target, args.mode, progress)
    except (BeaverError, ValueError, TypeError, OSError) as e:
        print(f"beaver: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return _cli_print({"structures": count})


def _open_end(text):
    """One end of ``beaver copy``: a server's client for an http(s) URL, else a database."""
    if text.startswith(("http://", "https://")):
        return BeaverClient(text, token=os.environ.get("BEAVER_TOKEN"))
    return BeaverDB(text)


class _CopyProgress:
    """``copy_to``'s progress callback for the CLI: a count on stderr, if it is a terminal."""

    def __init__(self):
        self.show, self.line = sys.stderr.isatty(), ""

    def __call__(self, copied, total):
        if self.show:
            self.line = f"\r{copied}/{total} items copied"
            print(self.line, end="", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.line:
            print(file=sys.stderr, flush=True)


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
    if argv[i:i + 1] == ["copy"]:
        return _cli_copy(argv[i + 1:])
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
        return _cli_print(_cli_run(db, args), args.raw)
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
    # ``python -m beaver serve``: the server's ``import beaver`` must find this very module,
    # not load a second copy with other classes (BeaverDB, BeaverError...).
    sys.modules.setdefault("beaver", sys.modules[__name__])
    sys.exit(main())
