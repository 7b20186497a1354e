"""beaver on PostgreSQL: the engine behind ``BeaverDB("postgresql://...")``.

    >>> from beaver import BeaverDB
    >>> db = BeaverDB("postgresql://postgres@127.0.0.1:5432/test")    # doctest: +SKIP
    >>> db.dict("config")["theme"] = "dark"                           # doctest: +SKIP

``beaver.py`` imports this module only when such a URL is opened; it needs psycopg 3 with its
pool package (``pip install "beaver-db[postgres]"``). The managers of ``beaver.py`` run
unchanged on top of ``PostgresCore``, which differs from the SQLite core only where the
engines differ:

- statements: the managers' SQLite text is rewritten once per distinct statement (and
  cached): ``?`` placeholders, ``INSERT OR IGNORE/REPLACE``, ``RETURNING`` for new keys, and
  a few statements PostgreSQL spells differently (``_OVERRIDES``). Unknown SQLite-only text
  raises instead of running wrongly.
- writers: SQLite lets one writer in at a time (``BEGIN IMMEDIATE``). Here every
  ``transaction()`` takes one transaction-scoped advisory lock per database schema right after
  ``BEGIN``, so read-modify-write code keeps its meaning (exactly-once queues, FIFO locks,
  gap-free channel and log sequences). Single statements that are atomic by themselves (dict
  set/delete, queue put, queue take with ``FOR UPDATE SKIP LOCKED``, blob put/delete) run
  without it; a channel publish takes it inside its one statement (``_LOCKING_ITSELF``); any
  other write outside a transaction is wrapped in one.
- wake-ups: triggers on the tables waiters care about ``NOTIFY`` the schema's channel (the
  payload is the table name: bounded); one listening connection per ``BeaverDB`` wakes the
  same ``_Watcher`` waiters as SQLite's data_version poller does. A woken queue ``get``
  sends one ``SKIP LOCKED`` statement (``_TAKE_OR_LOOK``: an empty take locks nothing, so it
  is the probe too, and it checks for event listeners itself): one round trip from the
  wake-up to the item, and one per wake-up that finds nothing.
- filters: compiled to ``jsonb`` expressions (``PgFilter``), field indexes are expression
  indexes over the structure's rows (``PgFieldIndexes``).
- collections: the same tables and managers; the text index (``PgTextIndex``) stores beaver's
  own tokens in a ``tsvector`` column (GIN), so parsed queries become ``tsquery`` parameters
  that find what FTS5 finds; two-edit typo search (``PgVocabulary``) takes its candidates from
  ``pg_trgm`` and ``fuzzystrmatch``, created once per database in ``public``; the faiss index
  of ``beaver_vector`` keeps its tables here too.

Connections: a pool of at most ``POOL_SIZE`` per ``BeaverDB`` (autocommit, statements
prepared by psycopg after a few runs, ``application_name`` "beaver" unless the URL names
one). A statement borrows a connection and gives it back with its rows read; a transaction
pins one to its thread until it ends; a thread that ended holding one loses it when the pool
runs short. A connection that breaks is closed with the idle ones (a server restart breaks
them all); the next call opens a new one. A read that fails because the connection broke
outside a transaction is retried once on a new connection; a write is sent on no connection
the server is seen to have closed (``_closed_by_server``), and one that breaks while it runs
is never retried (its outcome is unknown): it raises ``ConnectionLost`` with
``written=True``. Pins end when a transaction does; a raw ``BEGIN`` sent through
``execute`` pins the connection it ran on until it is idle again. Waiters (queue
``get``, lock ``acquire``, subscribers, events) take a lost server as "not yet" and retry
every ``_PgWatcher.RETRY_EVERY`` seconds; a live view yields from the rows it has until the
server is back.
"""
from __future__ import annotations

import collections
import contextlib
import decimal
import hashlib
import re
import select
import threading
import time

import psycopg
import psycopg.adapt
import psycopg.conninfo
import psycopg.errors
import psycopg.sql

import beaver
try:
    import beaver_vector            # imports without numpy and faiss (it then stays unused)
except ImportError:                 # pragma: no cover - a partial install
    beaver_vector = None
from beaver import (BeaverError, ClosedError, DatabaseBusy, FeatureUnavailable, ReadOnlyDatabase,
                    SchemaError, ValidationError, DiskFull)

__all__ = ["PostgresCore", "ConnectionLost"]


class ConnectionLost(BeaverError, ConnectionError):
    """The connection to PostgreSQL broke (or could not be opened). ``written`` is True when
    it broke during a write or a transaction: whether that committed is unknown."""

    written = False


# ==========================================================================================
# Schema: the tables of beaver.py's _SCHEMA, in PostgreSQL's types (text sorts bytewise)
# ==========================================================================================

_T = 'TEXT COLLATE "C"'

_SCHEMA = [
    f"CREATE TABLE IF NOT EXISTS beaver_meta (key {_T} PRIMARY KEY, value TEXT NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS beaver_dicts (name {_T} NOT NULL, key {_T} NOT NULL,
        value TEXT NOT NULL, expires_at DOUBLE PRECISION, PRIMARY KEY (name, key))""",
    """CREATE INDEX IF NOT EXISTS beaver_dicts_expiry ON beaver_dicts (expires_at)
        WHERE expires_at IS NOT NULL""",
    f"""CREATE TABLE IF NOT EXISTS beaver_lists (name {_T} NOT NULL, pos BIGINT NOT NULL,
        value TEXT NOT NULL, PRIMARY KEY (name, pos))""",
    f"""CREATE TABLE IF NOT EXISTS beaver_queues (seq BIGSERIAL PRIMARY KEY, name {_T} NOT NULL,
        priority NUMERIC NOT NULL, timestamp DOUBLE PRECISION NOT NULL, data TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS beaver_queues_order ON beaver_queues (name, priority, seq)",
    f"""CREATE TABLE IF NOT EXISTS beaver_blobs (name {_T} NOT NULL, key {_T} NOT NULL,
        data BYTEA NOT NULL, metadata TEXT, PRIMARY KEY (name, key))""",
    f"""CREATE TABLE IF NOT EXISTS beaver_queue_leases (lease BIGSERIAL PRIMARY KEY,
        name {_T} NOT NULL, priority NUMERIC NOT NULL, timestamp DOUBLE PRECISION NOT NULL,
        data TEXT NOT NULL, until DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS beaver_queue_leases_due ON beaver_queue_leases (name, until)",
    f"""CREATE TABLE IF NOT EXISTS beaver_logs (seq BIGSERIAL PRIMARY KEY, name {_T} NOT NULL,
        timestamp DOUBLE PRECISION NOT NULL, data TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS beaver_logs_time ON beaver_logs (name, timestamp)",
    f"""CREATE TABLE IF NOT EXISTS beaver_channels (seq BIGSERIAL PRIMARY KEY,
        name {_T} NOT NULL, timestamp DOUBLE PRECISION NOT NULL, data TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS beaver_channels_name ON beaver_channels (name, seq)",
    f"""CREATE TABLE IF NOT EXISTS beaver_events (seq BIGSERIAL PRIMARY KEY, kind {_T} NOT NULL,
        name {_T} NOT NULL, origin {_T} NOT NULL, timestamp DOUBLE PRECISION NOT NULL,
        payload TEXT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS beaver_listeners (owner {_T} NOT NULL, kind {_T} NOT NULL,
        name {_T} NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (owner, kind, name))""",
    f"""CREATE TABLE IF NOT EXISTS beaver_locks (ticket BIGSERIAL PRIMARY KEY,
        name {_T} NOT NULL, owner {_T} NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
        held INTEGER NOT NULL DEFAULT 0, ttl DOUBLE PRECISION NOT NULL DEFAULT 60)""",
    f"""CREATE TABLE IF NOT EXISTS beaver_indexes (kind {_T} NOT NULL, name {_T} NOT NULL,
        path {_T} NOT NULL, PRIMARY KEY (kind, name, path))""",
    f"""CREATE TABLE IF NOT EXISTS beaver_requests (key {_T} PRIMARY KEY,
        created DOUBLE PRECISION NOT NULL, status INTEGER NOT NULL, body BYTEA)""",
    "DROP INDEX IF EXISTS beaver_requests_age",     # made by earlier versions: pruned by key
    # collections: documents, vectors and their change log, words, edges (as on SQLite)
    f"""CREATE TABLE IF NOT EXISTS beaver_collections (collection {_T} PRIMARY KEY, dim INTEGER,
        metric TEXT NOT NULL DEFAULT 'l2', options TEXT, version BIGINT NOT NULL DEFAULT 0,
        epoch BIGINT NOT NULL DEFAULT 0, cid INTEGER UNIQUE)""",
    f"""CREATE TABLE IF NOT EXISTS beaver_documents (id BIGSERIAL PRIMARY KEY,
        collection {_T} NOT NULL, doc_id {_T} NOT NULL, body TEXT, UNIQUE (collection, doc_id))""",
    f"""CREATE TABLE IF NOT EXISTS beaver_vectors (collection {_T} NOT NULL, doc_id {_T} NOT NULL,
        vector BYTEA NOT NULL, PRIMARY KEY (collection, doc_id))""",
    f"""CREATE TABLE IF NOT EXISTS beaver_vector_log (collection {_T} NOT NULL,
        version BIGINT NOT NULL, doc_id {_T} NOT NULL, PRIMARY KEY (collection, version))""",
    f"""CREATE TABLE IF NOT EXISTS beaver_terms (cid INTEGER NOT NULL, term {_T} NOT NULL,
        PRIMARY KEY (cid, term))""",
    f"""CREATE TABLE IF NOT EXISTS beaver_edges (collection {_T} NOT NULL, source {_T} NOT NULL,
        label {_T} NOT NULL, target {_T} NOT NULL, metadata TEXT,
        PRIMARY KEY (collection, source, label, target))""",
    """CREATE INDEX IF NOT EXISTS beaver_edges_incoming
        ON beaver_edges (collection, target, label, source)""",
    # the text index: one row per (document, field path), rowids as on SQLite (_TextIndex);
    # the words are beaver's own tokens (_terms), with positions, so queries mean the same
    f"""CREATE TABLE IF NOT EXISTS beaver_fts (rowid BIGINT PRIMARY KEY, collection {_T} NOT NULL,
        path {_T} NOT NULL, text TEXT NOT NULL, words TSVECTOR NOT NULL)""",
    # a short pending list: searches scan it whole (the default 4 MB costs ms per search)
    """CREATE INDEX IF NOT EXISTS beaver_fts_words ON beaver_fts USING gin (words)
        WITH (gin_pending_list_limit = 256)""",
    # the tables of beaver_vector's index (its _SCHEMA, in PostgreSQL's types)
    f"""CREATE TABLE IF NOT EXISTS beaver_ann_log (seq BIGSERIAL PRIMARY KEY,
        collection {_T} NOT NULL, doc_id {_T} NOT NULL, op TEXT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS beaver_ann_base (collection {_T} PRIMARY KEY, generation TEXT,
        kind TEXT, dim INTEGER, metric TEXT, built_seq BIGINT NOT NULL DEFAULT 0,
        log_floor BIGINT NOT NULL DEFAULT 0, count BIGINT NOT NULL DEFAULT 0,
        parts INTEGER NOT NULL DEFAULT 0, ids TEXT, lease_owner TEXT,
        lease_until DOUBLE PRECISION NOT NULL DEFAULT 0)""",
    f"""CREATE TABLE IF NOT EXISTS beaver_ann_parts (collection {_T} NOT NULL,
        generation TEXT NOT NULL, part INTEGER NOT NULL, data BYTEA NOT NULL,
        PRIMARY KEY (collection, generation, part))""",
    """CREATE OR REPLACE FUNCTION beaver_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME); RETURN NULL; END $$""",
]

# The changes that wake waiters: a new item (blocking get), a lease given back (nack), a
# message or an event, a lock released or handed over. Takes, acks and the like notify nobody.
_NOTIFIED = {"beaver_queues": "INSERT", "beaver_queue_leases": "UPDATE",
             "beaver_channels": "INSERT", "beaver_events": "INSERT",
             "beaver_locks": "UPDATE OR DELETE"}

# A woken queue get's one statement (see beaver._Core.TAKE_OR_LOOK): the take of _TAKE, unless
# another BeaverDB listens to the queue's events (the take is then recorded, in a transaction);
# and what a look would have found, read in the snapshot before the take.
_TAKE_OR_LOOK = (
    "WITH taken AS (DELETE FROM beaver_queues WHERE seq = (SELECT seq FROM beaver_queues "
    "WHERE name = ?1 ORDER BY priority, seq LIMIT 1 FOR UPDATE SKIP LOCKED) AND NOT EXISTS "
    "(SELECT 1 FROM beaver_queue_leases WHERE name = ?1 AND until <= ?2) AND NOT EXISTS "
    "(SELECT 1 FROM beaver_listeners WHERE kind = 'queue' AND name = ?1 AND owner != ?3 AND "
    "expires_at > ?2) RETURNING priority, timestamp, data) "
    "SELECT taken.priority, taken.timestamp, taken.data, "
    "EXISTS (SELECT 1 FROM beaver_queues WHERE name = ?1), "
    "(SELECT min(until) FROM beaver_queue_leases WHERE name = ?1) "
    "FROM (SELECT 1) AS one LEFT JOIN taken ON true")

# Statements that are atomic on their own under concurrency: run without the writers' lock.
_LOCK_FREE = {
    _TAKE_OR_LOOK,
    beaver.DictManager._SET, beaver.DictManager._DEL, beaver.QueueManager._PUT,
    beaver.QueueManager._TAKE,
    "INSERT INTO beaver_blobs (name, key, data, metadata) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (name, key) DO UPDATE SET data = excluded.data, metadata = excluded.metadata",
    "DELETE FROM beaver_blobs WHERE name = ? AND key = ?",
    "DELETE FROM beaver_dicts WHERE (name, key) IN (SELECT name, key FROM beaver_dicts "
    "WHERE expires_at <= ? LIMIT ?)",
}

# Writes that need the writers' lock but are one statement: outside a transaction they take
# the lock themselves (its key is the first parameter), one round trip instead of three
# (BEGIN and the lock, the write, COMMIT). The lock is held until the commit is visible, so
# channel messages still become visible in the order of their sequence numbers.
_LOCKING_ITSELF = {
    beaver.ChannelManager._PUBLISH:
        "WITH writers AS (SELECT pg_advisory_xact_lock(?::bigint)) "
        "INSERT INTO beaver_channels (name, timestamp, data) SELECT ?, ?, ? FROM writers",
}

# SQLite statements of beaver.py that PostgreSQL spells otherwise (still with ? placeholders)
_OVERRIDES = {
    # a queue item is taken by one transaction only: rows locked by another are skipped
    beaver.QueueManager._TAKE:
        "DELETE FROM beaver_queues WHERE seq = (SELECT seq FROM beaver_queues WHERE name = ?1 "
        "ORDER BY priority, seq LIMIT 1 FOR UPDATE SKIP LOCKED) AND NOT EXISTS (SELECT 1 FROM "
        "beaver_queue_leases WHERE name = ?1 AND until <= ?2) RETURNING priority, timestamp, data",
    "SELECT seq, priority, timestamp, data FROM beaver_queues WHERE name = ? "
    "ORDER BY priority, seq LIMIT 1":
        "SELECT seq, priority, timestamp, data FROM beaver_queues WHERE name = ? "
        "ORDER BY priority, seq LIMIT 1 FOR UPDATE SKIP LOCKED",
    "PRAGMA table_info(beaver_locks)":
        "SELECT 0, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'beaver_locks'",
    "SELECT json_type('[]')": "SELECT 1",
}
if beaver_vector is not None:     # its tables are in _SCHEMA above
    _OVERRIDES.update(dict.fromkeys(beaver_vector._SCHEMA, "SELECT 1"))
    _OVERRIDES["SELECT count(*) FROM sqlite_master WHERE name IN "
               "('beaver_ann_log', 'beaver_ann_base', 'beaver_ann_parts')"] = (
        "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename IN "
        "('beaver_ann_log', 'beaver_ann_base', 'beaver_ann_parts')")

# Reads of rows that lock-free statements may write: inside a transaction they lock the rows
# they find (FOR UPDATE), so a read-modify-write (pop, popitem, setdefault of a present key)
# and a concurrent set or delete of the same key happen one after the other, as on SQLite.
_LOCK_ROWS_IN_TRANSACTION = {
    beaver.DictManager._GET, beaver.DictManager._HAS,
    "SELECT data, metadata FROM beaver_blobs WHERE name = ? AND key = ?",
    "SELECT key, value FROM beaver_dicts WHERE name = ? AND key >= ? AND "
    f"{beaver._LIVE} ORDER BY key LIMIT ?",
}
_CACHED_STATEMENTS = 4096       # distinct statements kept translated (filters make new ones)

_PLACEHOLDER = re.compile(r"\?(\d*)")
_UNARY_PLUS = re.compile(r"(?<=[\s(])\+(?=(?:\w+\.)?(?:name|collection) =)")
_SQLITE_ONLY = re.compile(r"\bOR\s+(?:REPLACE|IGNORE)\b|\bsqlite_|\bPRAGMA\b|\bjson_\w+\(|"
                          r"\bWITHOUT ROWID\b|\bGLOB\b|\bAUTOINCREMENT\b", re.I)
_CONFLICT_KEYS = {"beaver_listeners": "owner, kind, name", "beaver_meta": "key",
                  "beaver_indexes": "kind, name, path", "beaver_dicts": "name, key",
                  "beaver_requests": "key"}
_NEW_KEYS = {"beaver_locks": "ticket", "beaver_queue_leases": "lease", "beaver_documents": "id"}
_SCALAR_MAX = re.compile(r"\bmax\((\w+), (\w+)\)")    # SQLite's two-argument max()
_LOG_BUCKETS = re.compile(r"min\(CAST\(\(timestamp - \?\) / \? AS INTEGER\), \?\)")


_LITERAL = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")


def _outside_literals(text, change) -> str:
    """``text`` with ``change`` applied to what lies outside its string literals and quoted
    identifiers (names and paths are written into some statements as literals)."""
    out, at = [], 0
    for match in _LITERAL.finditer(text):
        out += [change(text[at:match.start()]), match.group()]
        at = match.end()
    out.append(change(text[at:]))
    return "".join(out)


class _Statement:
    """One SQLite statement of beaver.py as PostgreSQL runs it."""

    __slots__ = ("sql", "picks", "writes", "locked", "locks_itself", "new_key",
                 "in_transaction", "prepare")

    def __init__(self, text, plain=False):
        original = text
        text, self.new_key = self._insert_forms(_OVERRIDES.get(text, text))
        text = _outside_literals(text, self._rewrite)
        self.picks, self.sql = self._placeholders(text)
        verb = text.lstrip().split(None, 1)[0].upper()
        self.writes = verb in ("INSERT", "UPDATE", "DELETE") or original in _LOCKING_ITSELF or (
            verb == "WITH" and re.search(r"\b(?:INSERT|UPDATE|DELETE)\b", text) is not None)
        self.locked = self.writes and original not in _LOCK_FREE
        self.locks_itself = False
        self.in_transaction = self     # the form to run inside a transaction
        # psycopg prepares a statement run often (None); a text search is planned for each
        # query instead: a generic plan cannot tell a rare word (the GIN index) from a common one
        self.prepare = False if "tsquery" in text else None
        if original in _LOCK_ROWS_IN_TRANSACTION:
            self.in_transaction = self._copy()
            self.in_transaction.sql = self.sql + " FOR UPDATE"
        if original in _LOCKING_ITSELF and not plain:
            self.in_transaction = _Statement(original, plain=True)   # the lock is held there
            self.sql = _Statement(_LOCKING_ITSELF[original], plain=True).sql
            self.locked, self.locks_itself = False, True

    def _copy(self) -> "_Statement":
        twin = _Statement.__new__(_Statement)
        for slot in self.__slots__:
            setattr(twin, slot, getattr(self, slot))
        return twin

    @staticmethod
    def _rewrite(code):
        """The PostgreSQL spelling of a piece of SQL that holds no string literal."""
        if _SQLITE_ONLY.search(code):
            raise FeatureUnavailable(f"this statement has no PostgreSQL form yet: {code[:200]}")
        code = _LOG_BUCKETS.sub("least(floor((timestamp - ?) / ?)::bigint, ?)", code)
        # documents by id (_DocumentRows._select_in): by the primary key, the collection
        # checked on each row, as SQLite's unary plus says (a planner with stale statistics
        # would intersect the ids with the whole collection's index)
        code = code.replace("+d.collection = ?", "d.collection || '' = ?")
        code = _UNARY_PLUS.sub("", code)
        code = re.sub(r"\) GROUP BY 1$", ") AS sub GROUP BY 1", code)     # PostgreSQL 15 names
        code = re.sub(r"LIMIT \?\) ORDER BY", "LIMIT ?) AS sub ORDER BY", code)  # subqueries
        code = re.sub(r"\bLIMIT \?", "LIMIT nullif(?, -1)", code)
        code = code.replace("group_concat(d.id)", "string_agg(d.id::text, ',')")
        code = code.replace(" NOT INDEXED ", " ")
        code = _SCALAR_MAX.sub(r"greatest(\1, \2)", code)
        return re.sub(r"\bIS NOT (?!NULL\b|DISTINCT\b|TRUE\b|FALSE\b)([\w.]+)",
                      r"IS DISTINCT FROM \1", code)

    @staticmethod
    def _insert_forms(text):
        match = re.match(r"\s*INSERT OR (IGNORE|REPLACE) INTO (\w+)\s*(\(([^)]*)\))?", text, re.I)
        new_key = None
        if match:
            verb, table, columns = match.group(1).upper(), match.group(2), match.group(4)
            text = f"INSERT INTO {table} " + (f"({columns})" if columns else "") + \
                text[match.end():]
            if verb == "IGNORE":
                text += " ON CONFLICT DO NOTHING"
            else:
                keys = _CONFLICT_KEYS[table]
                rest = [c.strip() for c in columns.split(",") if c.strip() not in keys.split(", ")]
                text += f" ON CONFLICT ({keys}) DO " + ("UPDATE SET " + ", ".join(
                    f"{c} = excluded.{c}" for c in rest) if rest else "NOTHING")
        match = re.match(r"\s*INSERT INTO (\w+)", text)
        if match and match.group(1) in _NEW_KEYS and "RETURNING" not in text:
            new_key = _NEW_KEYS[match.group(1)]
            text += f" RETURNING {new_key}"
        return text, new_key

    @staticmethod
    def _placeholders(text):
        """``%s`` placeholders (and ``%%`` for ``%``, in literals too, as psycopg reads them);
        ``picks`` maps them to SQLite's numbered ``?N`` (None if there are none)."""
        picks, numbered = [], False

        def place(code):
            nonlocal numbered
            def one(match):
                nonlocal numbered
                numbered = numbered or bool(match.group(1))
                picks.append(int(match.group(1)) - 1 if match.group(1) else len(picks))
                return "%s"
            return _PLACEHOLDER.sub(one, code)
        text = _outside_literals(text.replace("%", "%%"), place)
        return (picks if numbered else None), text


# ==========================================================================================
# Results and errors
# ==========================================================================================

class _Result:
    """What ``execute`` returns: the rows (if any), ``rowcount`` and ``lastrowid``."""

    __slots__ = ("_rows", "rowcount", "lastrowid", "description")

    def __init__(self, cursor, statement):
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self._rows = iter(cursor.fetchall() if cursor.description is not None else ())
        self.lastrowid = None
        if statement.new_key is not None:
            first = next(self._rows, None)
            self.lastrowid = None if first is None else first[0]

    def fetchone(self):
        return next(self._rows, None)

    def fetchall(self) -> list:
        return list(self._rows)

    def __iter__(self):
        return self._rows


class _NumberLoader(psycopg.adapt.Loader):
    """NUMERIC as SQLite gives it back: an int when whole, else a float."""

    def load(self, data):
        value = decimal.Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


_RESULT, _ONE, _MANY = "result", "one", "many"     # what a statement's caller wants back

_BROKEN = (psycopg.OperationalError, psycopg.InterfaceError)


def _pg_error(error, url, timeout) -> Exception:
    """The beaver exception for ``error``, raised by psycopg."""
    if isinstance(error, UnicodeEncodeError):
        return ValidationError(f"cannot store {error.object[:60]!r}: it holds a lone surrogate "
                               "(not valid Unicode)")
    if "NUL (0x00)" in str(error):
        return ValidationError(f"PostgreSQL text cannot hold a NUL character: {error}")
    if isinstance(error, (psycopg.errors.NumericValueOutOfRange, OverflowError,
                          psycopg.DataError)):
        return ValueError(f"PostgreSQL refused a value: {error}")
    if isinstance(error, (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled,
                          psycopg.errors.DeadlockDetected)):
        new = DatabaseBusy(f"PostgreSQL stayed busy for over {timeout:g}s: {error}")
    elif isinstance(error, psycopg.errors.DiskFull):
        new = DiskFull(f"PostgreSQL has no room left: {error}")
    elif isinstance(error, (psycopg.errors.ReadOnlySqlTransaction,
                            psycopg.errors.InsufficientPrivilege)):
        new = ReadOnlyDatabase(f"PostgreSQL refused the write: {error}")
    elif isinstance(error, _BROKEN):
        new = ConnectionLost(f"the connection to PostgreSQL broke: {error}")
    else:
        new = BeaverError(f"PostgreSQL error: {error}")
    new.orig = error
    return new


_DB_ERRORS = (psycopg.Error, UnicodeError, OverflowError, ValueError)


def _is_broken(error, conn) -> bool:
    """True if ``error`` left ``conn`` unusable (the server went away, the network broke)."""
    return isinstance(error, _BROKEN) and (conn.closed or getattr(conn, "broken", False)
                                           or conn.pgconn.status != psycopg.pq.ConnStatus.OK)


def _closed_by_server(conn) -> bool:
    """True if the server closed the idle ``conn`` (a restart, a failover, a terminated
    backend): its socket reads the end. Checked before a write is sent on a lent connection,
    so that a write nothing ran of goes to a new connection instead of failing unknown."""
    try:
        readable = select.poll()    # not select.select: it refuses descriptors past 1023
        readable.register(conn.pgconn.socket, select.POLLIN)
        for _ in range(3):          # a notice, or the server's last error, then the end
            if not readable.poll(0):
                break               # nothing (more) to read: as alive as can be known
            conn.pgconn.consume_input()
    except (psycopg.Error, OSError, ValueError):
        return True
    return conn.pgconn.status != psycopg.pq.ConnStatus.OK


def _safe_url(url) -> str:
    """``url`` without its password, for messages and ``db.path``."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def _libpq_url(url) -> str:
    return "postgresql://" + url.split("://", 1)[1]


# ==========================================================================================
# Filters and field indexes in jsonb
# ==========================================================================================

_RANK = ("CASE jsonb_typeof({x}) WHEN 'null' THEN 0 WHEN 'boolean' THEN CASE WHEN {x} = "
         "'true'::jsonb THEN 2 ELSE 1 END WHEN 'number' THEN 3 WHEN 'string' THEN 4 "
         "WHEN 'array' THEN 5 WHEN 'object' THEN 6 END")
_LITERALS = {beaver._NULL: "'null'", beaver._FALSE: "'false'", beaver._TRUE: "'true'"}


def _jsonb(column, path) -> str:
    """The jsonb value at ``path`` of the JSON text ``column`` (NULL where it is missing)."""
    keys = ", ".join(beaver._sql_text(str(part), "the field path") for part in path.parts)
    return f"(({column})::jsonb #> ARRAY[{keys}]::text[])"


def _pg_terms(column, path) -> tuple:
    """(type rank, value) of a path, as filters compare them."""
    x = _jsonb(column, path)
    return _RANK.format(x=x), x


def _pg_order_terms(column, path) -> tuple:
    """The sort keys of a path: JSON type rank (-1: missing, first as in SQLite), then numbers
    by value, then text bytewise. Field indexes hold the same three expressions, and filters
    compare them, so a filter or an order on an indexed path can use the index."""
    rank, x = _pg_terms(column, path)
    return (f"coalesce({rank}, -1)", f"CASE WHEN jsonb_typeof({x}) = 'number' THEN ({x})::numeric END",
            f"({x} #>> '{{}}') COLLATE \"C\"")


def _exact_number(value):
    """A number operand as NUMERIC compares it: whole floats exactly, others by their repr."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else decimal.Decimal(repr(value))
    return value


class _Array(list):
    """An array parameter that can be part of a key (collections keep filters' answers by
    their SQL and parameters); psycopg sends it as a list."""

    __slots__ = ()

    def __hash__(self):
        return hash(tuple(self))


class PgFilter(beaver._Filter):
    """A beaver filter compiled to a PostgreSQL condition over JSON text (cast to jsonb).

    Same grammar, checks and meaning as SQLite's ``_Filter``; no condition is ever NULL
    (``rank = k AND ...`` is FALSE whenever the rank differs, whatever the rest is)."""

    TRUE, FALSE = "TRUE", "FALSE"
    _terms = staticmethod(_pg_terms)

    def _sort_terms(self, path):
        return _pg_order_terms(self.column, path)

    def _operator(self, path, op, operand, at, depth, top):
        self._path = path           # the compare methods below need the path, not its terms
        return super()._operator(path, op, operand, at, depth, top)

    def _is(self, kind, operand, op="=") -> str:
        rank, number, text = self._sort_terms(self._path)
        if kind < beaver._NUMBER:
            return f"{rank} = {kind}"
        if kind == beaver._NUMBER:
            self.params.append(_exact_number(operand))
            return f"{rank} = {kind} AND {number} {op} ?::numeric"
        self.params.append(operand)
        return f"{rank} = {kind} AND {text} {op} ?"

    def _equal(self, rank, value, typed) -> str:
        return self._is(*typed)

    def _compare(self, rank, value, op, typed, at) -> str:
        kind, operand = typed
        if kind not in (beaver._NUMBER, beaver._STRING):
            raise ValidationError(f"{at}: {op} compares numbers or strings, not {operand!r}")
        return self._is(kind, operand, beaver._ORDERING[op])

    def _any(self, rank, value, operands, at) -> tuple:
        if not isinstance(operands, (list, tuple)):
            raise ValidationError(f"{at}: expected a list of values, not "
                                  f"{type(operands).__name__}")
        typed = [beaver._scalar(v, f"{at}[{i}]") for i, v in enumerate(operands)]
        kinds = sorted({kind for kind, _ in typed})
        rank, number, text = self._sort_terms(self._path)
        terms = []
        for kind in kinds:
            values = [v for k, v in typed if k == kind]
            if kind < beaver._NUMBER:
                terms.append(f"{rank} = {kind}")
            elif kind == beaver._NUMBER:
                self.params.append(_Array(decimal.Decimal(_exact_number(v)) for v in values))
                terms.append(f"{rank} = {kind} AND {number} = ANY(?::numeric[])")
            else:
                self.params.append(_Array(values))
                terms.append(f"{rank} = {kind} AND {text} = ANY(?::text[])")
        return " OR ".join(f"({term})" for term in terms) or self.FALSE, kinds

    def _contains(self, path, rank, typed) -> str:
        kind, operand = typed
        x = _jsonb(self.column, path)
        if kind < beaver._NUMBER:
            item = f"{_LITERALS[kind]}::jsonb"
        else:
            self.params.append(beaver._json_dumps(operand))
            item = "?::jsonb"
        return f"coalesce(jsonb_typeof({x}) = 'array' AND {x} @> jsonb_build_array({item}), FALSE)"


class PgFieldIndexes(beaver._FieldIndexes):
    """Field indexes as PostgreSQL expression indexes over one structure's rows."""

    def _only_this(self, column=None) -> str:
        return f"{column or self._scope} = {beaver._sql_text(self._name, 'a structure name')}"

    def _key_terms(self, path) -> str:
        return ", ".join(f"({term})" for term in _pg_order_terms(self._column, path))

    def explain(self, sql, params) -> dict:
        """The plan with sequential scans disfavoured: PostgreSQL scans a small table rather
        than use an index; this shows the index a query would use as the table grows."""
        with self._core.transaction():
            self._core.execute("SET LOCAL enable_seqscan = off")
            plan = [row[0] for row in self._core.execute("EXPLAIN " + sql, params)]
        names = {self._index_name(path): path for path in self.paths()}
        used = [names[word] for line in plan for word in re.findall(r"\w+", line)
                if word in names]
        return {"index": used[0] if used else None, "plan": plan}


# ==========================================================================================
# Collections: text search over tsvector, typo search with pg_trgm and fuzzystrmatch
# ==========================================================================================

_LEXEME_MAX = 500       # characters of a word kept in the index (tsvector holds 2047 bytes)
_POSITIONS_MAX = 256    # positions kept per word and field (as to_tsvector keeps)
_EXTENSIONS = ("pg_trgm", "fuzzystrmatch")
_EXTENSIONS_LOCK = 0x62656176_65727865     # advisory lock: one CREATE EXTENSION at a time


def _lexeme(term) -> str:
    """``term`` (one of beaver's tokens) quoted as a tsvector or tsquery lexeme.

        >>> _lexeme("it's")
        "'it''s'"
    """
    return "'" + term[:_LEXEME_MAX].replace("\\", "\\\\").replace("'", "''") + "'"


def _tsvector(terms) -> str:
    """A text's words (beaver's tokens: ``_terms``, as FTS5's unicode61 splits them) as
    tsvector text, with their positions, so phrases and prefixes match as on SQLite.

        >>> _tsvector(beaver._terms("The cat saw the CAT"))
        "'the':1,4 'cat':2,5 'saw':3"
    """
    positions: dict = {}
    for at, term in enumerate(terms, 1):
        kept = positions.setdefault(term[:_LEXEME_MAX], [])
        if len(kept) < _POSITIONS_MAX:
            kept.append(min(at, 16383))
    return " ".join(_lexeme(term) + ":" + ",".join(map(str, dict.fromkeys(at)))
                    for term, at in positions.items())


def _tsquery_atom(atom) -> str:
    """One parsed atom (a word or phrase, maybe a prefix) as tsquery text."""
    lexemes = [_lexeme(term) for term in beaver._terms(atom.text)]
    if atom.prefix:
        lexemes[-1] += ":*"
    return lexemes[0] if len(lexemes) == 1 else "(" + " <-> ".join(lexemes) + ")"


def _tsquery(groups, negatives) -> str:
    """``_parse_query``'s groups and negatives as tsquery text, passed as a parameter: the
    user's text only ever reaches it as quoted lexemes, so no input is tsquery syntax.

        >>> A = beaver._Atom
        >>> _tsquery([[A("sql", True), A("embedded db", False)], [A("x", False)]], [A("no", False)])
        "(('sql':* | ('embedded' <-> 'db')) & ('x')) & !('no')"
    """
    expr = " & ".join("(" + " | ".join(map(_tsquery_atom, group)) + ")" for group in groups)
    if negatives:
        expr = f"({expr}) & !({' | '.join(map(_tsquery_atom, negatives))})"
    return expr


_QUERY_LEXEME = re.compile(r"'((?:[^']|'')*)'(:\*)?")


class PgTextIndex(beaver._TextIndex):
    """``_TextIndex`` on a table with a ``tsvector`` column and a GIN index: the same rows
    (one per document and field path, the same rowids), ranked by ``ts_rank`` (SQLite
    ranks by bm25: scores differ, their order mostly agrees)."""

    expression = staticmethod(_tsquery)

    _INSERT = ("INSERT INTO beaver_fts (rowid, text, collection, path, words) "
               "VALUES (?, ?, ?, ?, ?::tsvector)")

    def _row(self, rowid, text, path, terms) -> tuple:
        return (rowid, beaver._UNSEARCHABLE.sub(" ", text), self._name, path,  # no NUL here
                _tsvector(terms))

    # the collection's rows, checked on the rows the GIN index finds (as a rowid range, a
    # planner with stale statistics would intersect the index with the whole collection's)
    _MINE = f"(beaver_fts.rowid >> {beaver._FTS_DOC_BITS + beaver._FTS_PATH_BITS}) = ?"

    def _holds(self, word) -> bool:
        return self._core.execute(
            f"SELECT 1 FROM beaver_fts WHERE words @@ ?::tsquery AND {self._MINE} LIMIT 1",
            (_lexeme(word), self._cid)).fetchone() is not None

    def optimize(self):
        """Merge the GIN index's pending list (what FTS5's 'optimize' is to its segments);
        only the index's owner may (autovacuum merges it anyway)."""
        try:
            with self._core.transaction():      # a savepoint inside a caller's transaction
                self._core.execute("SELECT gin_clean_pending_list('beaver_fts_words'::regclass)")
        except ReadOnlyDatabase:
            pass

    def ranked(self, expr, paths, limit, checked=False, within=None) -> list:
        """As on SQLite; ``checked`` (a raw query) is PostgreSQL's ``to_tsquery`` syntax."""
        query = "to_tsquery('simple', ?)" if checked else "?::tsquery"
        sql = (f"SELECT {self.DOCUMENT}, sum(ts_rank(words, q.q))::float8 AS score "
               f"FROM beaver_fts, (SELECT {query} AS q) AS q "
               f"WHERE words @@ q.q AND {self._MINE}")
        params = [expr, self._cid]
        sql = beaver._narrowed(sql, params, paths, within)
        sql += " GROUP BY 1 ORDER BY score DESC, 1 LIMIT ?"
        if not checked:
            return self._core.execute(sql, (*params, limit)).fetchall()
        try:
            with self._core.transaction() if self._core.in_transaction else \
                    contextlib.nullcontext():   # a savepoint: a bad query keeps the transaction
                return self._core.execute(sql, (*params, limit)).fetchall()
        except BeaverError as e:
            if isinstance(getattr(e, "orig", None), psycopg.errors.SyntaxError):
                raise ValidationError(f"bad tsquery {expr!r}: {e.orig}") from None
            raise

    def snippet(self, expr, doc_rowid) -> str:
        """The best matching field of the document, its matched words in ``[...]``, cut to
        16 words around the first match (as FTS5's ``snippet`` marks them)."""
        base = self._rowid(doc_rowid)
        row = self._core.execute(
            "SELECT text FROM beaver_fts, (SELECT ?::tsquery AS q) AS q WHERE words @@ q.q "
            "AND rowid >= ? AND rowid < ? ORDER BY ts_rank(words, q.q) DESC, rowid LIMIT 1",
            (expr, base, base + (1 << beaver._FTS_PATH_BITS))).fetchone()
        return "" if row is None else _marked(row[0], expr)


def _marked(text, expr, width=16) -> str:
    """``text`` cut to ``width`` words around the first word that a lexeme of the tsquery
    text ``expr`` matches, matched words in brackets.

        >>> _marked("SQLite is an embedded database", "'embed':* & 'database'")
        'SQLite is an [embedded] [database]'
        >>> _marked(" ".join(map(str, range(40))), "'20'", width=5)
        '...18 19 [20] 21 22...'
    """
    exact, prefixes = set(), []
    for lexeme, star in _QUERY_LEXEME.findall(expr):
        lexeme = lexeme.replace("''", "'")
        (prefixes.append(lexeme) if star else exact.add(lexeme))
    tokens = list(beaver._TERM.finditer(text))

    def hit(token):
        term = (beaver._terms(token.group()) or [""])[0]
        return term in exact or any(term.startswith(p) for p in prefixes)
    hits = [i for i, token in enumerate(tokens) if hit(token)]
    first = max(0, min(hits[0] - 2 if hits else 0, len(tokens) - width))
    shown = tokens[first:first + width]
    if not shown:
        return text
    out, at = [], shown[0].start()
    for i, token in enumerate(shown, first):
        out += [text[at:token.start()], f"[{token.group()}]" if i in hits else token.group()]
        at = token.end()
    end = len(text) if first + width >= len(tokens) else at
    out.append(text[at:end])
    return ("..." if first else text[:shown[0].start()]) + "".join(out) + \
        ("..." if end < len(text) else "")


class PgVocabulary(beaver._Vocabulary):
    """``_Vocabulary`` whose two-edit candidates come from a trigram (``pg_trgm``) GIN index
    on the words and ``fuzzystrmatch``'s ``levenshtein_less_equal``, then the same checks as
    on SQLite (shared trigrams, edit distance with swaps), so the same words come back."""

    GRAM_TABLE = False      # the GIN index on beaver_terms follows the words itself

    def _two_edits(self) -> bool:
        if self._core.fuzzy_schema is None:
            raise FeatureUnavailable(
                f"fuzziness=2 on PostgreSQL needs the extensions {' and '.join(_EXTENSIONS)} "
                f"(Debian's postgresql package has them), which {self._core.path} lacks or "
                "beaver may not create: CREATE EXTENSION them, or use fuzziness=1")
        return True

    def _trigram_candidates(self, word, limit) -> list:
        grams = beaver._trigrams(word)
        need = max(1, len(grams) - 4 * limit)
        patterns = sorted(_like_pattern(gram) for gram in grams)
        schema = self._core.fuzzy_schema
        rows = self._core.execute(
            f"SELECT term FROM beaver_terms WHERE cid = ? AND length(term) BETWEEN ? AND ? "
            f"AND ({' OR '.join(['term LIKE ?'] * len(patterns))}) "
            f"AND {schema}.levenshtein_less_equal(term, ?, ?) <= ?",
            (self._cid, len(word) - limit, len(word) + limit, *patterns, word, 2 * limit,
             2 * limit))     # a swap is one edit here, two for levenshtein
        return [term for (term,) in rows
                if beaver._gram_worthy(term) and len(beaver._trigrams(term) & grams) >= need]

    def _frequencies(self, terms) -> dict:
        """How many text fields hold each term (any collection), for a few terms."""
        if len(terms) < 2:
            return {}
        return {term: self._core.one("SELECT count(*) FROM beaver_fts WHERE words @@ ?::tsquery",
                                     (_lexeme(term),))[0]
                for term in terms[:beaver.FUZZY_FREQUENCIES]}


class PgVectors(beaver._Vectors):
    """``_Vectors`` whose version bump and its log row are one statement (one round trip
    per indexed document fewer)."""

    def _bump(self, dim, doc_id) -> int:
        return self._core.one(
            "WITH bumped AS (UPDATE beaver_collections SET version = version + 1, "
            "dim = coalesce(dim, ?) WHERE collection = ? RETURNING version) "
            "INSERT INTO beaver_vector_log (collection, version, doc_id) "
            "SELECT ?, version, ? FROM bumped RETURNING version",
            (dim, self._name, self._name, doc_id))[0]


class PgGraph(beaver._Graph):
    """``_Graph`` whose ``walk`` is one recursive query instead of one query per step."""

    _NEXT = {"outgoing": [("source", "target")], "incoming": [("target", "source")],
             "both": [("source", "target"), ("target", "source")]}

    def walk(self, start, labels, depth, direction) -> list:
        """As on SQLite: ids reachable in 1..``depth`` edges, each at its shortest distance,
        by distance then id; a (document, distance) pair is expanded once, so cycles end."""
        if direction not in self._NEXT:
            raise ValueError("direction is 'outgoing', 'incoming' or 'both'")
        only = "" if labels is None else " AND label = ANY(?::text[])"
        steps = " UNION ALL ".join(
            f"SELECT {there} FROM beaver_edges WHERE collection = ? AND {here} = w.id{only}"
            for here, there in self._NEXT[direction])
        params = [start]
        for _ in self._NEXT[direction]:
            params += [self._name] + ([] if labels is None else [_Array(labels)])
        rows = self._core.execute(
            "WITH RECURSIVE walk (id, depth) AS (SELECT ?::text COLLATE \"C\", 0 UNION "
            f"SELECT n.id, w.depth + 1 FROM walk w CROSS JOIN LATERAL ({steps}) AS n (id) "
            "WHERE w.depth < ?) SELECT id FROM walk WHERE id <> ? GROUP BY id "
            "ORDER BY min(depth), id", (*params, max(0, int(depth)), start))
        return [row[0] for row in rows]


def _like_pattern(gram) -> str:
    """The LIKE pattern of the words whose padded form (``$word$``) holds ``gram``.

        >>> [_like_pattern(g) for g in ("$ca", "cat", "at$", "$a$")]
        ['ca%', '%cat%', '%at', 'a']
    """
    escaped = gram.strip("$").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return ("" if gram.startswith("$") else "%") + escaped + ("" if gram.endswith("$") else "%")


# ==========================================================================================
# Wake-ups: LISTEN on the schema's channel
# ==========================================================================================

class _PgWatcher(beaver._Watcher):
    """``_Watcher`` woken by NOTIFY instead of ``PRAGMA data_version``.

    One listening connection per ``BeaverDB``, open while anybody waits (and a little
    after). If it breaks (a server restart), it reconnects and wakes every waiter, whose
    probes then read the rows they wait for. A waiter whose probe finds the server gone
    (nothing written) keeps waiting and tries again every RETRY_EVERY seconds.
    """

    RETRY_EVERY = 0.1

    def _patient(self, probe, cap) -> tuple:
        """``probe`` and ``cap`` that take a server gone (nothing written) as "not yet", and
        then bound the next sleep by RETRY_EVERY."""
        lost = []

        def patient():
            try:
                result = probe()
            except ConnectionLost as e:
                if e.written:
                    raise
                lost.append(e)
                return None
            lost.clear()
            return result

        def bound():
            try:
                limit = cap() if callable(cap) else cap
            except ConnectionLost as e:     # the bound is a read: nothing was written
                lost.append(e)
                limit = None
            if lost:
                limit = self.RETRY_EVERY if limit is None else min(limit, self.RETRY_EVERY)
            return limit
        return patient, bound

    def wait_for(self, probe, timeout=None, cap=None, probed_at=None):
        patient, bound = self._patient(probe, cap)
        return super().wait_for(patient, timeout, bound, probed_at)

    async def wait_for_async(self, probe, timeout=None, cap=None, run=None, stop=None):
        patient, bound = self._patient(probe, cap)
        return await super().wait_for_async(patient, timeout, bound, run, stop)

    def _poll(self):
        idle_since, conn = None, None
        try:
            while not self._stopping:
                if conn is None:
                    conn = self._listen()
                    if conn is None:
                        time.sleep(0.1)
                        continue
                    self.wake()         # a commit before LISTEN: the probes look again
                try:
                    got = any(True for _ in conn.notifies(timeout=beaver.WATCH_IDLE_CHECK,
                                                          stop_after=1))
                except psycopg.Error:
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                    continue
                if got:
                    self.wake()
                if self.users:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > beaver.WATCH_LINGER:
                    with self._cond:
                        if not self.users:
                            self._thread = None
                            return
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    _away = False       # the last attempt to listen failed (it was logged)

    def _listen(self):
        core = self._core
        try:
            conn = psycopg.connect(core.url, autocommit=True, **core.connect_args)
            conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(core.channel)))
        except psycopg.Error as e:
            if not self._stopping and not self._away:      # once per outage, not per retry
                beaver.logger.warning("beaver could not listen on %s (retrying): %s",
                                      core.path, e)
            self._away = True
            return None
        if self._away:
            beaver.logger.warning("beaver listens on %s again", core.path)
            self._away = False
        return conn


# ==========================================================================================
# Connections: a small pool
# ==========================================================================================

POOL_SIZE = 10      # connections one BeaverDB opens at most (its listener aside)
_IDLE = psycopg.pq.TransactionStatus.IDLE


class _Pool:
    """At most ``size`` connections, each with its one cursor (results are read before the
    connection goes back). A statement borrows one and gives it back; a transaction pins one
    to its thread until it ends. Idle ones are reused newest first; a thread that ended while
    holding a pin loses it when the pool runs short. Waiting for a free one longer than
    ``timeout`` raises ``DatabaseBusy``.

        >>> pool = _Pool(opener=lambda: "a new cursor", size=1, timeout=0)
        >>> pool.borrow(), pool.count
        ('a new cursor', 1)
        >>> pool.borrow()
        Traceback (most recent call last):
          ...
        beaver.DatabaseBusy: all 1 connections to PostgreSQL stayed busy for 0s
    """

    def __init__(self, opener, size, timeout):
        self._opener, self.size, self.timeout = opener, size, timeout
        self._idle: collections.deque = collections.deque()    # cursors
        self._all: list = []                                    # every open connection
        self._opening = 0
        self._pins: dict = {}                                   # thread -> its pinned cursor
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._waiting = 0
        self.closed = False

    @property
    def count(self) -> int:
        """Connections open (or being opened)."""
        return len(self._all) + self._opening

    def borrow(self):
        try:
            return self._idle.pop()
        except IndexError:
            return self._borrow_slowly()

    def _borrow_slowly(self):
        deadline = beaver._Deadline(self.timeout)
        with self._lock:
            self._waiting += 1      # before looking at _idle: give_back then notifies
            try:
                while True:
                    if self.closed:
                        raise ClosedError("the database is closed")
                    if self._idle:
                        return self._idle.pop()
                    if self.count < self.size:
                        self._opening += 1
                        break
                    if self._reclaim_dead_pins():
                        continue
                    if deadline.expired:
                        raise DatabaseBusy(f"all {self.size} connections to PostgreSQL stayed "
                                           f"busy for {self.timeout:g}s")
                    self._freed.wait(deadline.remaining())
            finally:
                self._waiting -= 1
        return self._open_one()

    def _open_one(self):
        cursor = None
        try:
            cursor = self._opener()
        finally:
            with self._lock:
                self._opening -= 1
                if cursor is not None and self.closed:      # closed while this one opened
                    getattr(cursor, "connection", cursor).close()
                    raise ClosedError("the database is closed")
                if cursor is not None:
                    self._all.append(getattr(cursor, "connection", cursor))
                self._freed.notify()
        return cursor

    def give_back(self, cursor):
        """Return a borrowed cursor; its connection is closed instead if it is not idle (it
        broke, or a statement was interrupted)."""
        conn = cursor.connection
        if conn.pgconn.transaction_status != _IDLE:
            self.discard(conn)
            return
        self._idle.append(cursor)
        if self._waiting:
            with self._lock:
                self._freed.notify()

    def discard(self, conn):
        """Close ``conn`` and free its place."""
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
            self._freed.notify()
        with contextlib.suppress(Exception):
            conn.close()

    def discard_idle(self):
        """Close every idle connection: after one broke (a server restart breaks them all),
        the next borrower opens a new one instead of finding the next broken one."""
        while True:
            try:
                cursor = self._idle.pop()
            except IndexError:
                return
            self.discard(cursor.connection)

    def pin(self, thread, cursor=None):
        """Pin ``cursor`` (by default a newly borrowed one) to ``thread``."""
        cursor = self._pins[thread] = cursor or self.borrow()
        return cursor

    def unpin(self, thread, broken=False):
        """End ``thread``'s pin: its cursor goes back (or, ``broken``, is just forgotten)."""
        cursor = self._pins.pop(thread, None)
        if cursor is not None and not broken:
            self.give_back(cursor)

    def _reclaim_dead_pins(self) -> bool:
        """Close the pinned connections of threads that ended (under the lock): True if any."""
        dead = [t for t in list(self._pins) if not t.is_alive()]
        for thread in dead:
            conn = self._pins.pop(thread).connection
            if conn in self._all:
                self._all.remove(conn)
            with contextlib.suppress(Exception):
                conn.close()            # the server rolls back what it left open
        return bool(dead)

    def close(self) -> list:
        """Stop lending; returns every connection (the caller closes them)."""
        with self._lock:
            self.closed = True
            conns, self._all = self._all, []
            self._idle.clear()
            self._pins.clear()
            self._freed.notify_all()
        return conns


# ==========================================================================================
# The core
# ==========================================================================================

_orphans: list = []     # connections a forked child inherited: never closed (nor collected) there


class PostgresCore(beaver._Core):
    """``beaver._Core`` on PostgreSQL: pooled connections, the same transactions,
    after-commit hooks, TTL purge and schema stamp; see the module docstring."""

    engine = "postgresql"
    SNAPSHOT_BEGIN = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    TAKE_OR_LOOK = _TAKE_OR_LOOK    # a take that finds nothing (SKIP LOCKED) locks nothing

    def __init__(self, url, timeout=beaver.DEFAULT_TIMEOUT, durability="normal"):
        self._settings(timeout, durability)
        self.url, self.path, self.memory = _libpq_url(url), _safe_url(url), False
        self._statements: dict = {}
        self.channel = self.lock_key = None
        self.connect_args = {"connect_timeout": max(2, int(min(self.timeout, 60)))}
        if "application_name" not in psycopg.conninfo.conninfo_to_dict(self.url):
            self.connect_args["application_name"] = "beaver"
        self._pool = _Pool(self._open, POOL_SIZE, self.timeout)
        self.fuzzy_schema, self._text_ready = None, False
        self._start()

    def _new_watcher(self):
        return _PgWatcher(self)

    def compile_filter(self, where, column) -> PgFilter:
        return PgFilter(where, column)

    def order_terms(self, order_by, column) -> tuple:
        return beaver._order_terms(order_by, column, _pg_order_terms)

    def field_indexes(self, *args) -> PgFieldIndexes:
        return PgFieldIndexes(self, *args)

    def check_json(self):
        pass

    collection_parts = (PgVocabulary, PgTextIndex, PgVectors, PgGraph)

    def text_search(self) -> bool:
        """Text search always works; two-edit typo search needs pg_trgm and fuzzystrmatch:
        created here once if missing (``fuzzy_schema`` is where they are, None without)."""
        if not self._text_ready:
            self.fuzzy_schema = self._fuzzy_extensions()
            # a failure inside a transaction (a read-only snapshot) is tried again after it
            self._text_ready = self.fuzzy_schema is not None or not self.in_transaction
        return True

    def _fuzzy_extensions(self):
        """The quoted schema of fuzzystrmatch once both extensions and the trigram index on
        this schema's words are there (made if missing), or None (with a warning)."""
        try:
            schemas = self._extension_schemas()
            if len(schemas) < len(_EXTENSIONS) or not self.one(
                    "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() "
                    "AND indexname = 'beaver_terms_trgm'")[0]:
                with self.transaction():    # a savepoint inside a caller's transaction
                    # one creator at a time in the whole database: IF NOT EXISTS can race
                    self.execute(f"SELECT pg_advisory_xact_lock({_EXTENSIONS_LOCK})")
                    for name in _EXTENSIONS:    # in public: a dropped schema keeps them
                        if name not in schemas:
                            self.execute(f"CREATE EXTENSION IF NOT EXISTS {name} SCHEMA public")
                    schemas = self._extension_schemas()
                    self.execute("CREATE INDEX IF NOT EXISTS beaver_terms_trgm ON beaver_terms "
                                 f"USING gin (term {schemas['pg_trgm']}.gin_trgm_ops)")
                    self.on_rollback(self._forget_extensions)
        except BeaverError as e:
            beaver.logger.warning("typo search with fuzziness=2 is unavailable on %s: %s",
                                  self.path, e)
            return None
        return schemas["fuzzystrmatch"]

    def _forget_extensions(self):
        """The extensions made by a transaction that rolled back are gone: look again."""
        self.fuzzy_schema, self._text_ready = None, False

    def _extension_schemas(self) -> dict:
        return {name: psycopg.sql.Identifier(schema).as_string(None) for name, schema in self.all(
            "SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n "
            "ON n.oid = e.extnamespace WHERE e.extname IN ('pg_trgm', 'fuzzystrmatch')")}

    def connection_in_transaction(self) -> bool:
        """Whether this thread holds a connection in a transaction (beaver's or a raw
        ``BEGIN``); looking pins none."""
        cursor = getattr(self._local, "cursor", None)
        return cursor is not None and cursor.connection.pgconn.transaction_status != _IDLE

    def size(self) -> int:
        """Bytes beaver's tables take in this schema (with their indexes and TOAST)."""
        return self.one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() "
            "AND c.relkind = 'r' AND c.relname LIKE 'beaver%'")[0]

    def identity(self) -> str:
        """The server (its system identifier and start), the database and the schema: the
        same for every URL that reaches them (another host name, port forward or user)."""
        return "postgresql:" + ":".join(map(str, self.one(
            "SELECT (SELECT system_identifier FROM pg_control_system()), "
            "extract(epoch FROM pg_postmaster_start_time()), "   # not a text: no TimeZone
            "(SELECT oid FROM pg_database WHERE datname = current_database()), "
            "current_schema()")))

    # -- connections ------------------------------------------------------------------

    def conn(self):
        """This thread's connection for a transaction: borrowed and pinned to the thread
        until the transaction ends (``_rollback``, or the end of ``transaction()``)."""
        local = self._local
        cursor = getattr(local, "cursor", None)
        if cursor is None:
            if self.closed:
                raise ClosedError("the database is closed")
            if not hasattr(local, "depth"):
                local.depth, local.pending, local.undo = 0, [], []
            cursor = local.cursor = self._pool.pin(threading.current_thread())
        return cursor.connection

    def _unpin(self):
        """Give this thread's pinned connection back once no transaction uses it."""
        local = self._local
        if getattr(local, "cursor", None) is not None and not getattr(local, "depth", 0):
            del local.cursor
            self._pool.unpin(threading.current_thread())

    @contextlib.contextmanager
    def transaction(self, wait=True):
        try:
            with super().transaction(wait) as conn:
                yield conn
        finally:
            self._unpin()

    def _open(self):
        """A new connection's cursor (the pool calls this when it has none idle)."""
        if self.closed:
            raise ClosedError("the database is closed")
        try:
            conn = psycopg.connect(self.url, autocommit=True, **self.connect_args)
            conn.execute("SET lock_timeout = %d" % max(1, int(self.timeout * 1000)))
        except psycopg.Error as e:
            raise ConnectionLost(f"cannot connect to {self.path}: {e}") from None
        conn.adapters.register_loader("numeric", _NumberLoader)
        return conn.cursor()

    def _forget(self, conn):
        """Drop a broken connection: the next call borrows another (or opens a new one)."""
        local = self._local
        cursor = getattr(local, "cursor", None)
        if cursor is not None and cursor.connection is conn:
            del local.cursor
            self._pool.unpin(threading.current_thread(), broken=True)
        self._pool.discard(conn)
        self._pool.discard_idle()

    def _identify(self):
        """The schema this URL works in: its advisory lock key and NOTIFY channel."""
        database, schema = self.one("SELECT current_database(), current_schema()")
        if schema is None:
            raise SchemaError(f"{self.path}: no schema to work in (the search_path names "
                              "none that exists)")
        digest = hashlib.blake2b(f"{database}\x00{schema}".encode(), digest_size=8).digest()
        self.lock_key = int.from_bytes(digest, "big", signed=True)
        self.channel = f"beaver_{digest.hex()}"

    def _after_fork(self):
        _orphans.extend(self._pool._all)
        super()._after_fork()
        self._pool = _Pool(self._open, self._pool.size, self.timeout)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._halt.set()
        self.watcher.stop()
        # unlike SQLite's, the threads keep their locals: a thread inside a transaction ends it
        # cleanly, its statements failing with ClosedError on the closed connection
        for conn in self._pool.close():
            with contextlib.suppress(Exception):
                conn.close()
        beaver._live_cores.discard(self)

    def _close_deferred(self):
        pass

    # -- statements --------------------------------------------------------------------

    def _statement(self, sql) -> _Statement:
        statement = self._statements.get(sql)
        if statement is None:
            if len(self._statements) >= _CACHED_STATEMENTS:
                self._statements.clear()
            statement = self._statements[sql] = _Statement(sql)
        return statement

    def execute(self, sql, params=()):
        return self._call(sql, params, _RESULT)

    def one(self, sql, params=()):
        return self._call(sql, params, _ONE)

    def all(self, sql, params=()) -> list:
        return self._call(sql, params, _RESULT).fetchall()

    def executemany(self, sql, rows):
        return self._call(sql, rows, _MANY)

    def _call(self, sql, params, how):
        """Run the PostgreSQL form of ``sql``; a write that needs the writers' lock outside a
        transaction gets a transaction of its own."""
        statement = self._statements.get(sql) or self._statement(sql)
        if statement.picks is not None:
            picks = statement.picks
            params = ([[row[i] for i in picks] for row in params] if how is _MANY
                      else [params[i] for i in picks])
        if getattr(self._local, "depth", 0):
            return self._send(statement.in_transaction, params, how)
        if statement.locks_itself:
            params = (self.lock_key, *params)
        elif statement.locked:
            with self.transaction():
                return self._send(statement, params, how)
        return self._send(statement, params, how)

    def _send(self, statement, params, how):
        """Run on this thread's pinned connection, or on one borrowed for the statement."""
        for attempt in (0, 1):
            cursor = getattr(self._local, "cursor", None)
            lent = cursor is None
            if lent:
                cursor = self._pool.borrow()
                if statement.writes and _closed_by_server(cursor.connection):
                    self._forget(cursor.connection)     # and the idle ones: all gone too
                    cursor = self._pool.borrow()
            try:
                result = self._on(cursor, statement, params, how)
            except _DB_ERRORS as e:
                error = e
            except BaseException:
                if lent:
                    self._pool.give_back(cursor)    # closed instead if not idle
                raise
            else:
                self._after_statement(cursor, lent)
                return result
            if lent:
                self._pool.give_back(cursor)        # closed instead if it broke
            conn = cursor.connection
            broken = _is_broken(error, conn)
            if broken:
                self._forget(conn)
            if broken and attempt == 0 and not statement.writes and not self.in_transaction:
                continue            # a read on a connection that broke: once more
            new = self._error(error)
            if broken:
                new.written = statement.writes or self.in_transaction
            raise new from error

    def _after_statement(self, cursor, lent):
        """Give a lent connection back, unless a statement began a transaction on it (a raw
        ``BEGIN``): then it stays with this thread, and goes back once idle again."""
        idle = cursor.connection.pgconn.transaction_status == _IDLE
        if lent and idle:
            self._pool.give_back(cursor)
        elif lent:
            self._local.cursor = self._pool.pin(threading.current_thread(), cursor)
        elif idle and not getattr(self._local, "depth", 0):
            self._unpin()           # pinned by conn() outside transaction(): done with it

    @staticmethod
    def _on(cursor, statement, params, how):
        if how is _MANY:
            cursor.executemany(statement.sql, params)
            return cursor.rowcount
        cursor.execute(statement.sql, params, prepare=statement.prepare)
        if how is _ONE:
            return None if cursor.description is None else cursor.fetchone()
        return _Result(cursor, statement)

    def _error(self, e) -> Exception:
        if self.closed:
            return ClosedError("the database is closed")
        return _pg_error(e, self.path, self.timeout)

    def _begin(self, conn, sql):
        """Begin on ``conn``; if it turns out broken (nothing ran yet), once more on a new one:
        so a transaction, or a snapshot read, carries on after a restart or a failover."""
        try:
            self._run(conn, sql)
        except ConnectionLost:
            conn = self.conn()
            self._run(conn, sql)
        return conn

    def _begin_within(self, conn, left):
        """After a wait at the writer gate: the writers' lock within the ``left`` seconds of
        the timeout (one round trip; later statements get the whole ``lock_timeout`` back)."""
        return self._begin(conn, f"BEGIN; SET LOCAL lock_timeout = {max(1, int(left * 1000))}; "
                                 f"SELECT pg_advisory_xact_lock({self.lock_key}); "
                                 f"SET LOCAL lock_timeout = {max(1, int(self.timeout * 1000))}")

    def _begin_unless_held(self, conn):
        """BEGIN and the writers' lock on ``conn`` if no other session holds the lock, else
        ``_WritersBusy`` at once (the transaction ended); the connection."""
        conn = self._begin(conn, "BEGIN")
        try:
            free = conn.execute("SELECT pg_try_advisory_xact_lock(%s)",
                                (self.lock_key,)).fetchone()[0]
        except _DB_ERRORS as e:
            self._rollback(conn)
            raise self._error(e) from e
        if not free:
            self._rollback(conn)
            raise beaver._WritersBusy("another session holds the writers' lock")
        return conn

    def _run(self, conn, sql):
        """Transaction control: ``BEGIN IMMEDIATE`` is BEGIN plus the writers' lock."""
        begins = sql.startswith("BEGIN")
        if sql == "BEGIN IMMEDIATE":
            sql = f"BEGIN; SELECT pg_advisory_xact_lock({self.lock_key})"
        try:
            conn.execute(sql)
        except _DB_ERRORS as e:
            broken = _is_broken(e, conn)
            if broken:
                self._forget(conn)
            elif begins:            # the lock timed out: end the transaction it began
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            error = self._error(e)
            error.written = broken and not begins       # nothing was written yet
            raise error from e

    def _rollback(self, conn):
        try:
            if conn.info.transaction_status != _IDLE:
                conn.execute("ROLLBACK")
        except psycopg.Error:
            self._forget(conn)
        self._unpin()

    # -- schema ------------------------------------------------------------------------

    def _ensure_schema(self):
        self._identify()
        with self.transaction() as conn:
            names = {row[0] for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
            if self._stamp(names) is None and any(n.startswith("beaver_") for n in names):
                raise SchemaError(f"{self.path} has beaver tables but no schema stamp: a "
                                  "layout (an older beaver?) this version does not know")
            triggers = [f"CREATE OR REPLACE TRIGGER {table}_notify AFTER {events} ON {table} "
                        f"FOR EACH STATEMENT EXECUTE FUNCTION beaver_notify('{self.channel}')"
                        for table, events in _NOTIFIED.items()]
            conn.execute(";\n".join(_SCHEMA + triggers))       # one round trip
            conn.execute("INSERT INTO beaver_meta VALUES ('schema_version', %s) "
                         "ON CONFLICT DO NOTHING", (str(beaver.SCHEMA_VERSION),))
