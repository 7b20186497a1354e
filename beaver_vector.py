"""beaver_vector: the faiss hybrid vector index for beaver collections (the ``[vector]`` extra).

``beaver.py`` owns the vectors (table ``beaver_vectors``) and calls this module when numpy and
faiss import; without them it falls back to its own exact search. The index is the design of
the original README, made safe across processes:

- a **base** faiss index (exact ``IndexFlat`` or approximate ``IndexHNSWFlat``), serialized in
  parts into ``beaver_ann_parts`` of the same database file, described by one row of
  ``beaver_ann_base`` (its generation, kind and ``built_seq``, the last log entry it holds);
- a **delta** of fresh vectors, in memory, searched exactly beside the base;
- a **log** ``beaver_ann_log(seq, collection, doc_id, op)`` written by ``on_upsert`` /
  ``on_delete`` / ``on_clear`` inside the collection's own write transaction, so nothing
  is lost in a crash. Every search first reads the log entries it has not seen yet
  (new seqs only, with their vectors from ``beaver_vectors``): another process's writes are
  visible at the next search, and the write path costs one small INSERT;
- **compaction**: a background thread folds the delta into a new base (concatenation for
  flat, incremental HNSW inserts, or a rebuild when many entries are dead), in bounded steps
  outside any write transaction, then swaps it in under the in-process lock. One process at a
  time (a lease on the ``beaver_ann_base`` row) writes the folded base back to the file, part
  by part in short transactions, switching generations atomically; crashed halfway, the old
  base and the log are still whole. Other processes never reload what they already have: they
  keep catching up from the log, and load the stored base only when they open, or when they
  fell so far behind that the log entries they need were trimmed.

    >>> import beaver
    >>> db = beaver.BeaverDB(":memory:")
    >>> docs = db.collection("docs")                # its vectors go to this module's index
    >>> docs.index(beaver.Document(id="a", embedding=[1.0, 0.0]))
    Document(id='a', embedding=[1, 0] (2 dims), body=None)
    >>> [(doc.id, round(distance, 2)) for doc, distance in docs.search([1.0, 0.1], top_k=1)]
    [('a', 0.1)]
    >>> db.close()

Distances, lower is better: ``l2`` Euclidean (not squared), ``cosine`` 1 - cosine similarity,
``ip`` minus the dot product.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid

import beaver

try:
    import numpy as np
    import faiss
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    np = faiss = None
    _IMPORT_ERROR = _e
else:
    _IMPORT_ERROR = None

__all__ = ["open_index", "VectorIndex"]

logger = logging.getLogger("beaver.vector")

METRICS = beaver.VECTOR_METRICS
# The options (name, type, range, default) are declared once, in beaver.VECTOR_INDEX_OPTIONS,
# so that beaver.py checks them before storing a collection, with or without this module.
KINDS = beaver.VECTOR_INDEX_OPTIONS["index"].choices
DEFAULTS = {name: option.default for name, option in beaver.VECTOR_INDEX_OPTIONS.items()}
LEASE_SECONDS = 60.0
# A filter letting a fraction f of an HNSW base through searches it with the breadth
# ef_search * (1 + FILTER_EF_SCALE / f) / 2 (at least ef_search): faiss's filtered HNSW walks
# the graph as without a filter and keeps what passes, so a narrow filter needs a wider walk
# for the same recall (about 0.985 within the filter at every f on 384-dim MiniLM vectors).
# The search is exact (numpy over the allowed rows) when that costs less: EXACT_COST exact
# distances cost about one step of breadth (measured there: 0.22 us a row, 5 us a step).
FILTER_EF_SCALE = 0.5
EXACT_COST = 24
CHUNK_ROWS = 2048       # rows gathered at once by the exact search (kept within the CPU cache)
MEMO_FILTERS = 8        # filters whose allowed labels a base keeps
PATCH_LABELS = 256      # changed rowids past which a filter's labels are tested all again
# A filter seen for the first time, on a base this large, is checked on SAMPLE_LABELS random
# labels; if many pass, only the nearest candidates of an unfiltered search are checked:
# POST_FILTER_MARGIN times as many as should hold top_k allowed ones, at most POST_FILTER_MAX.
POST_FILTER_MIN = 4096
SAMPLE_LABELS = 64
POST_FILTER_MARGIN = 2.0
POST_FILTER_MAX = 400
FLAT_POST_FILTER = 0.25     # on a flat base, the share that must pass (a scan costs the same)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS beaver_ann_log (
        seq INTEGER PRIMARY KEY, collection TEXT NOT NULL,
        doc_id TEXT NOT NULL, op TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS beaver_ann_base (
        collection TEXT PRIMARY KEY, generation TEXT, kind TEXT, dim INTEGER, metric TEXT,
        built_seq INTEGER NOT NULL DEFAULT 0, log_floor INTEGER NOT NULL DEFAULT 0,
        count INTEGER NOT NULL DEFAULT 0, parts INTEGER NOT NULL DEFAULT 0, ids TEXT,
        lease_owner TEXT, lease_until REAL NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS beaver_ann_parts (
        collection TEXT NOT NULL, generation TEXT NOT NULL, part INTEGER NOT NULL,
        data BLOB NOT NULL, PRIMARY KEY (collection, generation, part)) WITHOUT ROWID""",
]

# New log rows of this collection with their current vectors and their documents' rowids
# (what filters are made of), plus the newest row of the whole log (so that _last_seq moves
# past the other collections' rows too). Rows of other collections in between are skipped
# inside SQLite, their vectors never read.
_CATCH_UP = """SELECT seq, collection = ?1, doc_id, op,
        CASE WHEN collection = ?1 AND op = 'u' THEN (SELECT vector FROM beaver_vectors
             WHERE collection = ?1 AND doc_id = l.doc_id) END,
        CASE WHEN collection = ?1 AND op = 'u' THEN coalesce((SELECT id FROM beaver_documents
             WHERE collection = ?1 AND doc_id = l.doc_id), -1) END
    FROM beaver_ann_log l
    WHERE seq > ?2 AND (collection = ?1 OR seq = (SELECT max(seq) FROM beaver_ann_log))
    ORDER BY seq"""
# Every vector of a collection with its document's rowid (-1: a vector without a document)
_WITH_ROWIDS = """SELECT v.doc_id, v.vector, coalesce(d.id, -1) FROM beaver_vectors v
    LEFT JOIN beaver_documents d ON d.collection = v.collection AND d.doc_id = v.doc_id
    WHERE v.collection = ?"""


def open_index(core, collection: str, dim: int, metric: str = "l2", **options) -> "VectorIndex":
    """Open (load or build) the faiss index of one collection; the collection calls this.

        >>> index = open_index(db._core, "docs", 384, "cosine", index="hnsw")
        >>> index.search([0.5] * 384, 10)                  # nothing indexed yet
        []

    Raises ``beaver.FeatureUnavailable`` when numpy/faiss are missing (or when the
    environment variable ``BEAVER_VECTOR_BACKEND=exact`` asks for the built-in search).
    """
    host = _host(core)
    if _IMPORT_ERROR is not None:
        raise host.FeatureUnavailable(
            "vector index needs numpy and faiss-cpu (pip install beaver-db[vector]): "
            f"{_IMPORT_ERROR}")
    if os.environ.get("BEAVER_VECTOR_BACKEND", "").lower() == "exact":
        raise host.FeatureUnavailable("BEAVER_VECTOR_BACKEND=exact selects the built-in search")
    return VectorIndex(core, collection, dim, metric, **options)


def _host(core):
    """The beaver module that made ``core``: ``__main__`` under ``python -m beaver``; for
    another engine's core (``beaver_postgres``), the module of the core it extends."""
    for cls in type(core).__mro__:
        module = sys.modules.get(cls.__module__)
        if hasattr(module, "_check_vector_options"):
            return module
    return beaver


def _check_options(dim, metric, options, errors=beaver) -> dict:
    """The options merged with their defaults, checked as ``beaver.VECTOR_INDEX_OPTIONS`` says."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise errors.ValidationError(f"vector dimension must be a positive int, not {dim!r}")
    if metric not in METRICS:
        raise errors.ValidationError(f"metric must be one of {METRICS}, not {metric!r}")
    errors._check_vector_options(metric, options)
    return {name: options.get(name, option.default)
            for name, option in errors.VECTOR_INDEX_OPTIONS.items()}


# ==========================================================================================
# In-memory parts: the base (one faiss index) and the delta (fresh vectors, searched exactly)
# ==========================================================================================

def _faiss_metric(metric):
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _stored_vectors(index, kind, n, dim):
    """A zero-copy (n, dim) view of the vectors a flat or HNSW-flat index stores."""
    if n == 0:
        return np.empty((0, dim), np.float32)
    flat = index if kind == "flat" else faiss.downcast_index(index.storage)
    return faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim)


class _Base:
    """A faiss index over labels 0..n-1 with their doc ids and their documents' rowids.

    Only the dead marks change. What a filter lets through (``among``) is kept for a few
    filters, until a label dies.
    """

    def __init__(self, kind, index, ids, built_seq, dim, rowids):
        self.kind = kind
        self.index = index
        self.ids = ids
        self.rowids = rowids        # int64, one per label: what filters (beaver._Allowed) hold
        self.built_seq = built_seq
        n = len(ids)
        self.pos = {doc_id: i for i, doc_id in enumerate(ids) if doc_id is not None}
        self.dead = np.fromiter((doc_id is None for doc_id in ids), bool, n)
        self.n_dead = n - len(self.pos)
        self.xb = _stored_vectors(index, kind, n, dim)
        self._selector = None
        self.killed: list = []      # labels killed since loaded, in order
        self._sample = None
        self._sorted = None         # (rowids sorted, their labels), for _allowed_labels
        self._among: dict = {}      # id(allowed) -> (allowed, len(killed) then, _Among)

    @classmethod
    def empty(cls, dim, metric, built_seq=0):
        return cls("flat", faiss.IndexFlat(dim, _faiss_metric(metric)), [], built_seq, dim,
                   np.empty(0, np.int64))

    def __len__(self):
        return len(self.pos)

    def kill(self, doc_id) -> bool:
        i = self.pos.pop(doc_id, None)
        if i is None:
            return False
        self.dead[i] = True
        self.n_dead += 1
        self.killed.append(i)
        self._selector = None
        return True

    def live_ids(self) -> list:
        return [doc_id if not dead else None for doc_id, dead in zip(self.ids, self.dead)]

    def selector(self):
        """An IDSelector of the live labels (None when nothing is dead)."""
        if self.n_dead == 0:
            return None
        if self._selector is None:
            self._selector = _bitmap_selector(~self.dead)
        return self._selector[0]

    def sample(self):
        """The rowids of up to ``SAMPLE_LABELS`` labels drawn at random (the same ones while
        the base lives): what the share of documents a filter lets through is guessed from."""
        if self._sample is None:
            n = len(self.ids)
            picked = np.random.default_rng(n).choice(n, min(n, SAMPLE_LABELS), replace=False)
            self._sample = self.rowids[np.sort(picked)]
        return self._sample

    def among(self, allowed) -> "_Among":
        """The live labels whose documents ``allowed`` (a ``beaver._Allowed``) lets through.

        Kept for the last ``MEMO_FILTERS`` filters: the collection hands the same object to
        every search with one filter while its documents are unchanged. After a write it
        hands a patched one, whose answer is brought forward from its parent's (the labels
        of its changed rowids only), and labels killed since are taken out; only a filter
        seen for the first time is tested against every label."""
        kept = self._among.get(id(allowed))
        if kept is None or kept[0] is not allowed:
            kept = self._from_parent(allowed)
        if kept is None:
            kept = (allowed, len(self.killed), _Among(self._allowed_labels(allowed) & ~self.dead))
        elif kept[1] != len(self.killed):
            gone = np.array(self.killed[kept[1]:], np.int64)
            kept = (allowed, len(self.killed), kept[2].set(gone, np.zeros(len(gone), bool)))
        self._among.pop(id(allowed), None)
        self._among[id(allowed)] = kept
        while len(self._among) > MEMO_FILTERS:
            del self._among[next(iter(self._among))]
        return kept[2]

    def _allowed_labels(self, allowed):
        """A bool per label: whether ``allowed`` lets its rowid through. When it lists a few
        rowids, they are looked up among the base's sorted rowids (made once); else every
        label's rowid is tested."""
        if allowed.listed is None:
            return allowed.test(self.rowids)
        if self._sorted is None:
            order = np.argsort(self.rowids, kind="stable")
            self._sorted = self.rowids[order], order
        rowids, order = self._sorted
        start = np.searchsorted(rowids, allowed.listed, "left")
        count = np.searchsorted(rowids, allowed.listed, "right") - start
        # a rowid may have several labels (a dead one, and the live one a fold appended)
        total = int(count.sum())
        ends = np.cumsum(count)
        at = np.repeat(start - (ends - count), count) + np.arange(total)
        mask = np.zeros(len(self.rowids), bool)
        mask[order[at]] = True
        return mask

    def _from_parent(self, allowed):
        """(allowed, kills then, _Among) from the kept answer of ``allowed``'s parent, or None."""
        parent = allowed.parent() if allowed.parent is not None else None
        kept = None if parent is None else self._among.get(id(parent))
        if kept is None or kept[0] is not parent or len(allowed.changed) > PATCH_LABELS:
            return None
        labels = np.flatnonzero(np.isin(self.rowids, np.asarray(allowed.changed, np.int64)))
        among = kept[2]
        if len(labels):
            among = among.set(labels, allowed.test(self.rowids[labels]) & ~self.dead[labels])
        return allowed, kept[1], among


class _Among:
    """The labels of a base that a filter lets through (a bool per label), their count, and
    their sorted list and faiss selector (each made once, when first needed)."""

    def __init__(self, mask):
        self._mask = mask
        self._count = int(np.count_nonzero(mask))
        self._labels = self._selector = None

    def __len__(self):
        return self._count

    @property
    def labels(self):
        if self._labels is None:
            self._labels = np.flatnonzero(self._mask)
        return self._labels

    def selector(self):
        if self._selector is None:
            self._selector = _bitmap_selector(self._mask)
        return self._selector[0]

    def set(self, labels, allowed) -> "_Among":
        """Itself when ``labels`` already are as ``allowed`` says (bools), else a copy
        changed there."""
        if np.array_equal(self._mask[labels], allowed):
            return self
        mask = self._mask.copy()
        mask[labels] = allowed
        return _Among(mask)


def _bitmap_selector(mask):
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits


class _Delta:
    """Vectors written since the base was built: rows overwritten in place on upsert."""

    def __init__(self, dim):
        self.vecs = np.empty((64, dim), np.float32)
        self.rowids = np.full(64, -1, np.int64)
        self.ids: list = []
        self.live = np.zeros(64, bool)
        self.pos: dict = {}

    def __len__(self):
        return len(self.pos)

    def put_many(self, doc_ids, matrix, rowids):
        for doc_id, vector, rowid in zip(doc_ids, matrix, rowids):
            i = self.pos.get(doc_id)
            if i is None:
                i = len(self.ids)
                if i == len(self.live):
                    self._grow()
                self.ids.append(doc_id)
                self.pos[doc_id] = i
            self.vecs[i] = vector
            self.rowids[i] = rowid
            self.live[i] = True

    def _grow(self):
        n, size = len(self.live), 2 * len(self.live)
        vecs = np.empty((size, self.vecs.shape[1]), np.float32)
        vecs[:n] = self.vecs
        rowids = np.full(size, -1, np.int64)
        rowids[:n] = self.rowids
        live = np.zeros(size, bool)
        live[:n] = self.live
        self.vecs, self.rowids, self.live = vecs, rowids, live

    def drop(self, doc_id) -> bool:
        i = self.pos.pop(doc_id, None)
        if i is not None:
            self.live[i] = False
        return i is not None

    def rows(self):
        """(indices, ids) of the live rows."""
        idx = np.flatnonzero(self.live[:len(self.ids)])
        return idx, [self.ids[i] for i in idx]


class _Plan:
    """What a fold starts from: taken under the lock, built from without it."""

    def __init__(self, base, epoch, seq, kind, dvecs, dids, drowids, dead):
        self.base, self.epoch, self.seq, self.kind = base, epoch, seq, kind
        self.dvecs, self.dids, self.drowids, self.dead = dvecs, dids, drowids, dead


class _Stopped(Exception):
    """The index is closing: a background build gives up."""


# ==========================================================================================
# The index of one collection
# ==========================================================================================

class VectorIndex:
    """The hybrid faiss index of one collection (see the module docstring).

    The collection calls, inside the write transaction of the document:
    ``on_upsert(doc_id, vector_bytes)`` after writing its ``beaver_vectors`` row (or
    ``on_upsert_many([(doc_id, vector_bytes), ...])`` for a batch), ``on_delete(doc_id)``
    after deleting it and ``on_clear()`` after deleting all of them; and, outside
    transactions, ``search(query, top_k, allowed)``, ``compact()`` and ``close()``.
    """

    def __init__(self, core, collection, dim, metric="l2", **options):
        self._errors = _host(core)
        self.options = _check_options(dim, metric, options, self._errors)
        self._core = core
        self.collection = collection
        self.dim = dim
        self.metric = metric
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._owner = f"{os.getpid()}:{uuid.uuid4().hex}"
        self._thread = None
        self._store_lock = threading.Lock()
        self._closing = False
        self._epoch = 0
        self._loads = 0
        self._cleared = False
        self._base = self._delta = None     # loaded on first use outside a transaction:
        self._last_seq = 0                  # the collection may open us inside its own
        self._params = None                 # (ef, SearchParametersHNSW) of plain searches
        self._tables = None                 # see _has_tables
        if not core.in_transaction:
            self._ready()

    def __repr__(self):
        return f"<VectorIndex {self.collection!r} dim={self.dim} metric={self.metric}>"

    def _ready(self):
        """Create the tables and load the state if not done yet (outside transactions)."""
        self._check_pid()
        if self._base is None:
            with self._lock:
                if self._base is None:
                    self._ensure_tables()
                    self._load()

    @property
    def ef_search(self) -> int:
        """HNSW search breadth; set it to trade speed for recall (``index.ef_search = 128``)."""
        return self.options["ef_search"]

    @ef_search.setter
    def ef_search(self, value):
        self._errors._check_vector_options(None, {"ef_search": value})
        self.options["ef_search"] = value

    # -- tables, loading ---------------------------------------------------------------

    def _ensure_tables(self):
        """Create the tables and this collection's row, unless there (no write, no lock)."""
        if self._known_tables():
            return
        if not self._tables_ready():
            with self._core.transaction():
                for statement in _SCHEMA:
                    self._core.execute(statement)
                self._core.execute("INSERT OR IGNORE INTO beaver_ann_base (collection) "
                                   "VALUES (?)", (self.collection,))
        self._remember_tables()

    def _known_tables(self) -> bool:
        """Whether the tables are known to be there for this thread: committed (``_tables``
        is True) or made by (or seen in) its transaction (its token)."""
        known = self._tables
        return known is True or (known is not None and known is self._core.transaction_token())

    def _has_tables(self) -> bool:
        """Whether this thread sees the tables (known to, else looked up in the schema)."""
        return self._known_tables() or self._tables_ready()

    def _remember_tables(self):
        """Known from now on; inside a transaction, for it until it commits (a rollback,
        of a savepoint too, may take the tables back with it)."""
        token = self._core.transaction_token()
        if token is None:
            self._tables = True
            return
        self._tables = token
        self._core.on_rollback(lambda: setattr(self, "_tables", None))
        self._core.after_commit(lambda: setattr(self, "_tables", True))

    def _tables_ready(self) -> bool:
        tables = self._core.execute(
            "SELECT count(*) FROM sqlite_master WHERE name IN "
            "('beaver_ann_log', 'beaver_ann_base', 'beaver_ann_parts')").fetchone()[0]
        return tables == 3 and self._header() is not None

    def _header(self):
        return self._core.execute(
            "SELECT generation, kind, dim, metric, built_seq, log_floor, count, parts "
            "FROM beaver_ann_base WHERE collection = ?", (self.collection,)).fetchone()

    def _load(self):
        """Load the stored base (or build a flat one from ``beaver_vectors``), then catch up.

        A stored base plus the log must account for every vector of the table; when they do
        not (a process without this module wrote vectors), the index is rebuilt from the table.
        """
        self._epoch += 1
        self._loads += 1
        self._delta = _Delta(self.dim)
        with self._read_snapshot():
            base = self._read_stored_base()
            self._base = base if base is not None else self._base_from_table()
            self._last_seq = self._base.built_seq
            self._catch_up()
            if base is None:
                return
            stored = self._core.execute("SELECT count(*) FROM beaver_vectors WHERE collection = ?",
                                        (self.collection,)).fetchone()[0]
            if stored == len(self._base) + len(self._delta):
                return
            logger.warning("vector index of %r was out of step with its table (%d vs %d "
                           "vectors): rebuilt", self.collection,
                           len(self._base) + len(self._delta), stored)
            self._delta = _Delta(self.dim)
            self._base = self._base_from_table()
            self._last_seq = self._base.built_seq

    def _read_stored_base(self):
        with self._read_snapshot():
            head = self._header()
            if head is None or head[1] is None or head[2] != self.dim or head[3] != self.metric:
                return None
            generation, kind, _, _, built_seq, _, count, parts = head
            chunks = [row[0] for row in self._core.execute(
                "SELECT data FROM beaver_ann_parts WHERE collection = ? AND generation = ? "
                "ORDER BY part", (self.collection, generation))]
            ids = json.loads(self._core.execute(
                "SELECT ids FROM beaver_ann_base WHERE collection = ?",
                (self.collection,)).fetchone()[0])
            rowids = self._rowids_of(ids)
        if len(chunks) != parts:
            logger.warning("stored vector index of %r is incomplete: rebuilding", self.collection)
            return None
        index = faiss.deserialize_index(np.frombuffer(b"".join(chunks), np.uint8))
        return _Base(kind, index, ids, built_seq, self.dim, rowids)

    def _rowids_of(self, ids):
        """The rowids of the documents ``ids`` (None: a dead label) as they are now: a label
        whose document has changed since the base was built dies at the catch-up anyway."""
        rowid_of = dict(self._core.execute(
            "SELECT doc_id, id FROM beaver_documents WHERE collection = ?", (self.collection,)))
        return np.fromiter((-1 if d is None else rowid_of.get(d, -1) for d in ids), np.int64,
                           len(ids))

    def _base_from_table(self):
        with self._read_snapshot():
            rows = self._core.execute(_WITH_ROWIDS, (self.collection,)).fetchall()
            seq = self._core.execute("SELECT max(seq) FROM beaver_ann_log").fetchone()
        ids = [row[0] for row in rows]
        rowids = np.fromiter((row[2] for row in rows), np.int64, len(rows))
        return self._flat_base(ids, self._matrix([row[1] for row in rows]), seq[0] or 0, rowids)

    def _flat_base(self, ids, matrix, built_seq, rowids):
        index = faiss.IndexFlat(self.dim, _faiss_metric(self.metric))
        if len(ids):
            index.add(matrix)
        return _Base("flat", index, ids, built_seq, self.dim, rowids)

    def _read_snapshot(self):
        """A read transaction (one consistent snapshot), unless one is already open."""
        core = self._core

        class _Snapshot:
            def __enter__(snap):
                snap.own = not core.connection_in_transaction()
                if snap.own:
                    core.execute(core.SNAPSHOT_BEGIN)

            def __exit__(snap, *exc):
                if snap.own:
                    core.execute("COMMIT")

        return _Snapshot()

    def _matrix(self, blobs):
        """float32 (n, dim) from little-endian float32 blobs, normalised for cosine."""
        if not blobs:
            return np.empty((0, self.dim), np.float32)
        matrix = np.frombuffer(b"".join(blobs), "<f4").astype(np.float32).reshape(-1, self.dim)
        if self.metric == "cosine":
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            norms[norms == 0] = 1.0
            matrix /= norms
        return matrix

    # -- write hooks (inside the collection's write transaction) -------------------------

    def on_upsert(self, doc_id: str, vector: bytes):
        """Log that ``doc_id`` now has the vector just written to ``beaver_vectors``.

            >>> from array import array
            >>> core, index = db._core, open_index(db._core, "docs", 2)
            >>> vector = array("f", [1.0, 0.0]).tobytes()
            >>> with core.transaction():                      # the collection's write
            ...     _ = core.execute("INSERT OR REPLACE INTO beaver_vectors VALUES (?, ?, ?)",
            ...                      ("docs", "a", vector))
            ...     index.on_upsert("a", vector)
            >>> index.search([1.0, 0.0], 1)
            [('a', 0.0)]

        Costs one INSERT; the vector reaches memory at the next search (in every process).
        """
        self._check_vector(vector)
        self._log([(self.collection, doc_id, "u")])

    def on_upsert_many(self, items):
        """Batch form of ``on_upsert``: ``items`` is an iterable of ``(doc_id, vector_bytes)``.

            >>> from array import array
            >>> core, index = db._core, open_index(db._core, "docs", 2)
            >>> rows = [("a", array("f", [1.0, 0.0]).tobytes()),
            ...         ("b", array("f", [0.0, 1.0]).tobytes())]
            >>> with core.transaction():
            ...     _ = core.executemany("INSERT INTO beaver_vectors VALUES ('docs', ?, ?)", rows)
            ...     index.on_upsert_many(rows)
            >>> sorted(doc_id for doc_id, distance in index.search([1.0, 1.0], 10))
            ['a', 'b']
        """
        rows = []
        for doc_id, vector in items:
            self._check_vector(vector)
            rows.append((self.collection, doc_id, "u"))
        self._log(rows)

    def on_delete(self, doc_id: str):
        """Log that ``doc_id``'s vector was deleted (``index.on_delete("a")``)."""
        self._log([(self.collection, doc_id, "d")])

    def on_clear(self):
        """Log that every vector of the collection was deleted (``index.on_clear()``), and
        delete what the index kept of them: its stored base and its older log rows.

        The stored base becomes an empty one built at the clear's log row, and the log floor
        moves just below that row: a process that had not seen every earlier row reloads
        (an empty or small table), one that had sees the clear.
        """
        self._log([(self.collection, "", "c")])
        seq = self._core.execute("SELECT max(seq) FROM beaver_ann_log").fetchone()[0]
        self._core.execute("DELETE FROM beaver_ann_log WHERE collection = ? AND seq < ?",
                           (self.collection, seq))
        self._core.execute("DELETE FROM beaver_ann_parts WHERE collection = ?",
                           (self.collection,))
        self._core.execute(
            "UPDATE beaver_ann_base SET generation = NULL, kind = NULL, built_seq = ?, "
            "log_floor = ?, count = 0, parts = 0, ids = NULL WHERE collection = ?",
            (seq, seq - 1, self.collection))

    def _log(self, rows):
        self._ensure_tables()       # made (or rolled back) with the caller's transaction
        sql = "INSERT INTO beaver_ann_log (collection, doc_id, op) VALUES (?, ?, ?)"
        if len(rows) == 1:
            self._core.execute(sql, rows[0])
        else:
            self._core.executemany(sql, rows)

    def _check_vector(self, vector):
        if len(vector) != 4 * self.dim:
            raise self._errors.ValidationError(
                f"vector of {len(vector) // 4} floats in collection {self.collection!r} "
                f"of dimension {self.dim}")

    # -- catching up with the log --------------------------------------------------------

    def _read_log(self):
        """New log rows (all collections, so ``_last_seq`` skips the others' too) and the floor.

        The floor is read after the rows: it only grows, so if it is still at or below
        ``_last_seq`` now, none of the rows just read had been trimmed.
        """
        rows = self._core.execute(_CATCH_UP, (self.collection, self._last_seq)).fetchall()
        head = self._core.execute("SELECT log_floor FROM beaver_ann_base WHERE collection = ?",
                                  (self.collection,)).fetchone()
        return rows, (head[0] if head else 0)

    @staticmethod
    def _net_changes(rows):
        """(cleared, {doc_id: (vector bytes, rowid) or None}) of log rows, in order."""
        cleared, final = False, {}
        for _, mine, doc_id, op, vector, rowid in rows:
            if not mine:
                continue
            if op == "c":
                cleared, final = True, {}
            else:
                final[doc_id] = (vector, rowid) if op == "u" else None
        return cleared, final

    def _puts(self, final):
        """The vectors ``_net_changes`` found: (doc ids, rowids, their matrix)."""
        puts = [(d, v) for d, v in final.items()
                if v is not None and v[0] is not None and len(v[0]) == 4 * self.dim]
        return ([d for d, _ in puts], np.fromiter((v[1] for _, v in puts), np.int64, len(puts)),
                self._matrix([v[0] for _, v in puts]))

    def _catch_up(self):
        """Apply every committed log row newer than ``_last_seq`` (lock held)."""
        rows, floor = self._read_log()
        if floor > self._last_seq:
            logger.info("vector index of %r fell behind the trimmed log: reloading",
                        self.collection)
            self._load()
            return
        if not rows:
            return
        cleared, final = self._net_changes(rows)
        self._last_seq = rows[-1][0]
        if cleared:
            self._epoch += 1
            self._cleared = True  # so that a fold stores the emptied base, freeing the old
            self._base = _Base.empty(self.dim, self.metric, self._last_seq)
            self._delta = _Delta(self.dim)
        doc_ids, rowids, matrix = self._puts(final)
        for doc_id in final:
            self._base.kill(doc_id)
        kept = set(doc_ids)
        for doc_id in final:
            if doc_id not in kept:
                self._delta.drop(doc_id)
        if doc_ids:
            self._delta.put_many(doc_ids, matrix, rowids)

    def _check_pid(self):
        if self._pid != os.getpid():  # forked: the parent's thread and lock are not ours
            self._pid = os.getpid()
            self._owner = f"{os.getpid()}:{uuid.uuid4().hex}"
            self._lock = threading.RLock()
            self._store_lock = threading.Lock()
            self._thread = None

    # -- search ----------------------------------------------------------------------------

    def search(self, query, top_k: int, allowed=None) -> list:
        """The ``top_k`` nearest documents as ``[(doc_id, distance), ...]``, nearest first.

            >>> from array import array
            >>> core, index = db._core, open_index(db._core, "docs", 2, "cosine")
            >>> rows = [("a", array("f", [1.0, 0.0]).tobytes()),
            ...         ("b", array("f", [0.0, 1.0]).tobytes())]
            >>> with core.transaction():
            ...     _ = core.executemany("INSERT INTO beaver_vectors VALUES ('docs', ?, ?)", rows)
            ...     index.on_upsert_many(rows)
            >>> [(doc_id, round(distance, 2)) for doc_id, distance in index.search([0.1, 0.9], 10)]
            [('b', 0.01), ('a', 0.89)]

        ``allowed`` (a ``beaver._Allowed``: the rowids of the documents a ``where=`` filter
        lets through) restricts the answer: searched exactly when that is cheaper than the
        HNSW search the filter needs, else by HNSW with a faiss IDSelector and a breadth grown
        as the filter narrows. Sees every write committed before the call, in any process, and
        this thread's own uncommitted writes inside a transaction.
        """
        q = self._prepare(query)
        if top_k <= 0:
            return []
        if hasattr(allowed, "resolve"):     # a filter seen for the first time, not read yet
            hits = None if self._core.in_transaction else self._post_filtered(q, top_k, allowed)
            if hits is not None:
                return hits
            allowed = allowed.resolve()
        if allowed is not None and not len(allowed):
            return []
        if self._core.in_transaction:
            return self._search_in_transaction(q, top_k, allowed)
        self._ready()
        with self._lock:
            self._catch_up()
            self._maybe_fold()
            dist, ids = self._search_state(q, top_k, allowed, ())
        return _top(dist, ids, top_k)

    def _post_filtered(self, q, top_k, pending):
        """The ``top_k`` nearest documents that a filter not read yet (``pending``) lets
        through, from the nearest candidates of an unfiltered search, checked by rowid; or
        None when the filter is better read whole: a small base, few of a random sample of
        labels passing (the candidates needed would be many; on a flat base, whose search
        scans every row, fewer than ``FLAT_POST_FILTER``: the allowed rows alone cost less
        to scan), or too few candidates passing.

        Exact on a flat base whenever it answers (an allowed vector nearer than the last one
        returned is nearer than that candidate too, so it was a candidate); on HNSW, as good
        as an unfiltered search as broad as the candidates."""
        self._ready()
        with self._lock:
            self._catch_up()
            self._maybe_fold()
            if len(self._base) < POST_FILTER_MIN:
                return None
            sample = self._base.sample()
        share = sum(pending.passing(sample)) / len(sample)
        k = int(POST_FILTER_MARGIN * top_k / share) + 1 if share else POST_FILTER_MAX + 1
        if k > POST_FILTER_MAX or (self._base.kind == "flat" and share < FLAT_POST_FILTER):
            return None
        with self._lock:
            dist, ids, rowids, reach = self._candidates(q, k)
        order = np.argsort(dist, kind="stable")
        order = order[dist[order] <= reach]     # not the delta's rows beyond the base's cut
        first = min(len(order), int(1.25 * top_k / share) + 1)
        kept = []       # nearest first: the first top_k that pass are the answer
        for part in (order[:first], order[first:]):
            ok = pending.passing(rowids[part])
            kept += [i for i, keep in zip(part.tolist(), ok) if keep]
            if len(kept) >= top_k:
                return [(ids[i], float(dist[i])) for i in kept[:top_k]]
        return None

    def _candidates(self, q, k):
        """(distances, ids, rowids, reach) of the base's ``k`` nearest live vectors and of every
        live vector of the delta (lock held). Those within ``reach`` are the nearest of all:
        it is the farthest of the base's, unless they are all of the base's."""
        base, delta = self._base, self._delta
        dist, labels = self._nearest_labels(base, q, min(k, len(base)), base.selector(),
                                            max(self.ef_search, k))
        reach = np.inf if len(dist) >= len(base) else dist.max() if len(dist) else -np.inf
        idx, dids = delta.rows()
        return (np.concatenate([dist, self._distances(delta.vecs[idx], q)]),
                [base.ids[i] for i in labels] + dids,
                np.concatenate([base.rowids[labels], delta.rowids[idx]]), reach)

    def _prepare(self, query):
        if isinstance(query, list):
            q = np.fromiter(query, np.float32, len(query))
        else:
            q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise self._errors.ValidationError(
                f"query has {q.shape[0]} dimensions, the collection {self.collection!r} {self.dim}")
        if self.metric == "cosine":
            norm = float(np.linalg.norm(q))
            if norm:
                q = q / norm
        return np.ascontiguousarray(q)

    def _search_in_transaction(self, q, top_k, allowed):
        """Search state + this transaction's uncommitted log rows, without changing the state."""
        with self._lock:
            loaded = self._base is not None and self._has_tables()
            rows, floor = self._read_log() if loaded else ((), 1)
            if floor > self._last_seq:
                return self._brute_force(q, top_k, allowed)
            cleared, final = self._net_changes(rows)
            if cleared:
                dist, ids = np.empty(0, np.float32), []
            else:
                dist, ids = self._search_state(q, top_k, allowed, final.keys())
        doc_ids, rowids, matrix = self._puts(final)
        if allowed is not None and doc_ids:
            keep = allowed.test(rowids)
            doc_ids, matrix = [d for d, ok in zip(doc_ids, keep) if ok], matrix[keep]
        if doc_ids:
            dist, ids = np.concatenate([dist, self._distances(matrix, q)]), ids + doc_ids
        return _top(dist, ids, top_k)

    def _brute_force(self, q, top_k, allowed):
        rows = [r for r in self._core.execute(_WITH_ROWIDS, (self.collection,)).fetchall()
                if len(r[1]) == 4 * self.dim]
        if allowed is not None and rows:
            keep = allowed.test(np.fromiter((r[2] for r in rows), np.int64, len(rows)))
            rows = [r for r, ok in zip(rows, keep) if ok]
        dist = self._distances(self._matrix([r[1] for r in rows]), q)
        return _top(dist, [r[0] for r in rows], top_k)

    def _search_state(self, q, top_k, allowed, exclude):
        """(distances, ids) of candidates from base and delta (lock held), maybe > top_k."""
        base, delta = self._base, self._delta
        k = top_k + len(exclude)
        idx, dids = delta.rows()
        if allowed is None:
            dist, ids = self._search_base(base, q, min(k, len(base)), base.selector(),
                                          self.ef_search)
            if len(ids) < min(k, len(base)):  # HNSW among many dead entries can come back short
                dist, ids = self._exact_among(base, q, k, np.flatnonzero(~base.dead))
        else:
            dist, ids = self._search_base_among(base, q, k, base.among(allowed))
            keep = allowed.test(delta.rowids[idx])
            idx, dids = idx[keep], [d for d, ok in zip(dids, keep) if ok]
        if len(idx):
            dist = np.concatenate([dist, self._distances(delta.vecs[idx], q)])
            ids = ids + dids
        if exclude:
            mask = np.fromiter((d not in exclude for d in ids), bool, len(ids))
            dist, ids = dist[mask], [d for d, m in zip(ids, mask) if m]
        return dist, ids

    def _search_base_among(self, base, q, k, among):
        """The base's ``k`` nearest among the labels a filter allows (``among``): by HNSW with
        a selector and a breadth grown as the filter narrows (see ``FILTER_EF_SCALE``) unless
        an exact search of the allowed rows costs less, or HNSW comes back short. A flat base
        is searched exactly: row by row, or by faiss with a selector when most rows pass."""
        n, k = len(among), min(k, len(among))
        if n == 0:
            return np.empty(0, np.float32), []
        if base.kind == "hnsw":
            wide = self.ef_search * (1 + FILTER_EF_SCALE * len(base) / n) / 2
            ef = min(4096, max(self.ef_search, int(wide)))
            if n > max(self.options["filter_exact_below"], EXACT_COST * ef):
                dist, ids = self._search_base(base, q, k, among.selector(), ef)
                if len(ids) == k:
                    return dist, ids
        elif 4 * n > len(base):     # a scan beats gathering that many rows one by one
            return self._search_base(base, q, k, among.selector(), 0)
        return self._exact_among(base, q, k, among.labels)

    def _exact_among(self, base, q, k, labels):
        """The ``k`` nearest of the base's ``labels``, exactly: numpy, a chunk at a time."""
        dist = np.concatenate([self._distances(base.xb[labels[at:at + CHUNK_ROWS]], q)
                               for at in range(0, len(labels), CHUNK_ROWS)] or
                              [np.empty(0, np.float32)])
        if len(dist) > k:
            best = np.argpartition(dist, k - 1)[:k]
            dist, labels = dist[best], labels[best]
        return dist, [base.ids[i] for i in labels]

    def _search_base(self, base, q, k, selector, ef):
        """faiss search of the base: (distances, ids) without the -1 padding."""
        dist, labels = self._nearest_labels(base, q, k, selector, ef)
        ids = base.ids
        return dist, [ids[i] for i in labels]

    def _nearest_labels(self, base, q, k, selector, ef):
        """faiss search of the base: (distances, labels) without the -1 padding."""
        if k <= 0 or base.index.ntotal == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        if selector is None:
            params = self._plain_params(base.kind, max(ef, k))
        else:
            hnsw = base.kind == "hnsw"
            params = faiss.SearchParametersHNSW() if hnsw else faiss.SearchParameters()
            if hnsw:
                params.efSearch = max(ef, k)
            params.sel = selector
        raw, labels = base.index.search(q.reshape(1, -1), k, params=params)
        raw, labels = raw[0], labels[0]
        if labels[-1] < 0:
            found = labels >= 0
            raw, labels = raw[found], labels[found]
        return self._to_distance(raw), labels

    def _plain_params(self, kind, ef):
        """Search parameters without a selector, kept between searches (lock held)."""
        if kind != "hnsw":
            return None
        cached = self._params
        if cached is None or cached[0] != ef:
            params = faiss.SearchParametersHNSW()
            params.efSearch = ef
            cached = self._params = (ef, params)
        return cached[1]

    def _distances(self, matrix, q):
        if self.metric == "l2":
            diff = matrix - q
            return self._to_distance(np.einsum("ij,ij->i", diff, diff))
        return self._to_distance(np.einsum("ij,j->i", matrix, q))  # no BLAS threads

    def _to_distance(self, raw):
        raw = np.asarray(raw, dtype=np.float32)
        if self.metric == "l2":
            return np.sqrt(np.maximum(raw, 0.0))
        if self.metric == "ip":
            return -raw
        return 1.0 - raw


    # -- folding the delta into the base (compaction in memory) ---------------------------

    def _wanted_kind(self, base) -> str:
        choice = self.options["index"]
        if choice != "auto":
            return choice
        live = len(base) + len(self._delta)
        threshold = self.options["ann_threshold"]
        if base.kind == "hnsw":
            return "hnsw" if live >= threshold // 2 else "flat"
        return "hnsw" if live >= threshold else "flat"

    def _fold_due(self) -> bool:
        base, opts = self._base, self.options
        n = len(base.ids)
        if self._cleared:
            return True
        if self._wanted_kind(base) != base.kind:
            return len(base) + len(self._delta) > 0
        if base.kind == "hnsw":
            # the exact delta search adds to every ANN search: keep the delta small; and
            # extending keeps the dead entries, only a rebuild removes them
            limit = opts["fold_min"]
            dead_limit = max(opts["fold_min"], opts["rebuild_dead"] * n)
        else:
            limit = dead_limit = max(opts["fold_min"], opts["fold_fraction"] * n)
        return len(self._delta) >= limit or base.n_dead >= dead_limit

    def _maybe_fold(self):
        """Start the background fold when it is due (lock held)."""
        if not self.options["background"] or self._closing or not self._fold_due():
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._background, daemon=True,
                                        name=f"beaver-vector-{self.collection}")
        self._thread.start()

    def _background(self):
        try:
            while not self._closing and self._fold(persist=False):
                pass
        except (_Stopped, self._errors.ClosedError):
            pass
        except Exception:  # a background thread must not die silently
            logger.exception("vector index compaction of %r failed", self.collection)

    def _plan(self, force=False):
        """Snapshot of what to fold, or None if nothing is due (lock held)."""
        self._catch_up()
        if not (force or self._fold_due()):
            return None
        base, delta = self._base, self._delta
        idx, dids = delta.rows()
        return _Plan(base, self._epoch, self._last_seq, self._wanted_kind(base),
                     delta.vecs[idx].copy(), dids, delta.rowids[idx], base.dead.copy())

    def _fold(self, persist=False, force=False) -> bool:
        """One fold: plan (locked), build (unlocked, in steps), swap (locked), maybe store."""
        with self._lock:
            plan = self._plan(force)
        if plan is None:
            return False
        new = self._build(plan)
        with self._lock:
            if self._closing:
                raise _Stopped()
            if plan.epoch != self._epoch:
                return True  # cleared or reloaded meanwhile: the new base is stale
            self._epoch += 1
            self._cleared = False
            self._base, self._delta, self._last_seq = new, _Delta(self.dim), plan.seq
            self._catch_up()  # the writes that came in while building
        self._store(new, force=persist)
        return True

    def _build(self, plan):
        old, kind = plan.base, plan.kind
        live = ~plan.dead
        live_rowids = np.concatenate([old.rowids[live], plan.drowids])
        if kind == "flat":
            matrix = np.concatenate([old.xb[live], plan.dvecs])
            ids = [d for d, alive in zip(old.ids, live) if alive] + plan.dids
            return self._flat_base(ids, matrix, plan.seq, live_rowids)
        incremental = (old.kind == "hnsw" and len(old.ids)
                       and plan.dead.sum() < self.options["rebuild_dead"] * len(old.ids))
        if incremental:
            index = faiss.clone_index(old.index)
            ids = [d if alive else None for d, alive in zip(old.ids, live)] + plan.dids
            rowids = np.concatenate([old.rowids, plan.drowids])
            self._add_in_steps(index, plan.dvecs)
        else:
            index = self._new_hnsw()
            ids = [d for d, alive in zip(old.ids, live) if alive] + plan.dids
            rowids = live_rowids
            self._add_in_steps(index, old.xb[live])
            self._add_in_steps(index, plan.dvecs)
        return _Base("hnsw", index, ids, plan.seq, self.dim, rowids)

    def _new_hnsw(self):
        index = faiss.IndexHNSWFlat(self.dim, self.options["m"], _faiss_metric(self.metric))
        index.hnsw.efConstruction = self.options["ef_construction"]
        return index

    def _add_in_steps(self, index, matrix):
        step = self.options["build_chunk"]
        index.hnsw.efConstruction = self.options["ef_construction"]
        for start in range(0, len(matrix), step):
            if self._closing:
                raise _Stopped()
            index.add(np.ascontiguousarray(matrix[start:start + step]))

    # -- storing the base in the database file ----------------------------------------------

    def _store(self, base, force=False):
        """Write ``base`` as the stored base if it is due, under the lease, part by part."""
        head = self._header()
        if head is None or head[4] >= base.built_seq:
            return False
        same = head[1] == base.kind and head[2] == self.dim and head[3] == self.metric
        due = max(self.options["persist_min"], self.options["persist_fraction"] * len(base))
        shrunk = len(base) < (1 - self.options["persist_fraction"]) * head[6]
        if same and not force and not shrunk and base.built_seq - head[4] < due:
            return False
        if not self._store_lock.acquire(blocking=force):
            return False
        try:
            return self._store_under_lease(base)
        finally:
            self._store_lock.release()

    def _store_under_lease(self, base) -> bool:
        if not self._claim_lease():
            return False
        try:
            generation = uuid.uuid4().hex
            parts = self._write_parts(generation, base)
            switched = self._switch(generation, parts, base)
            self._drop_orphan_parts()
            if switched:
                self._trim_log()
            return switched
        finally:
            self._release_lease()

    def _claim_lease(self) -> bool:
        with self._core.transaction():
            owner, until = self._core.execute(
                "SELECT lease_owner, lease_until FROM beaver_ann_base WHERE collection = ?",
                (self.collection,)).fetchone()
            if owner not in (None, self._owner) and until > time.time() and _alive(owner):
                return False
            self._core.execute("UPDATE beaver_ann_base SET lease_owner = ?, lease_until = ? "
                               "WHERE collection = ?",
                               (self._owner, time.time() + LEASE_SECONDS, self.collection))
        return True

    def _renew_lease(self):
        cursor = self._core.execute(
            "UPDATE beaver_ann_base SET lease_until = ? WHERE collection = ? AND lease_owner = ?",
            (time.time() + LEASE_SECONDS, self.collection, self._owner))
        if cursor.rowcount != 1:
            raise _Stopped()

    def _write_parts(self, generation, base) -> int:
        """One short transaction per part, so writers wait at most one part's write."""
        data = faiss.serialize_index(base.index)
        size = self.options["part_bytes"]
        count = max(1, -(-len(data) // size))
        for part in range(count):
            if self._closing:
                raise _Stopped()
            with self._core.transaction():
                self._renew_lease()
                self._core.execute("INSERT INTO beaver_ann_parts VALUES (?, ?, ?, ?)",
                                   (self.collection, generation, part,
                                    data[part * size:(part + 1) * size].tobytes()))
        return count

    def _switch(self, generation, parts, base) -> bool:
        """Make the written parts the stored base, atomically, if still newer and still ours."""
        with self._core.transaction():
            owner, built_seq = self._core.execute(
                "SELECT lease_owner, built_seq FROM beaver_ann_base WHERE collection = ?",
                (self.collection,)).fetchone()
            if owner != self._owner or built_seq >= base.built_seq:
                return False
            self._core.execute(
                "UPDATE beaver_ann_base SET generation = ?, kind = ?, dim = ?, metric = ?, "
                "built_seq = ?, log_floor = max(log_floor, built_seq), count = ?, parts = ?, "
                "ids = ? WHERE collection = ?",
                (generation, base.kind, self.dim, self.metric, base.built_seq, len(base), parts,
                 json.dumps(base.live_ids()), self.collection))
        return True

    def _drop_orphan_parts(self):
        """Delete parts of other generations (replaced, or left by a crash), one per transaction."""
        while not self._closing:
            with self._core.transaction():
                row = self._orphan_part()
                if row is None:
                    return
                self._renew_lease()
                self._core.execute("DELETE FROM beaver_ann_parts WHERE collection = ? "
                                   "AND generation = ? AND part = ?", (self.collection, *row))

    def _orphan_part(self):
        """(generation, part) of a part the stored base does not use, or None."""
        return self._core.execute(
            "SELECT p.generation, p.part FROM beaver_ann_parts p JOIN beaver_ann_base b "
            "ON b.collection = p.collection WHERE p.collection = ? "
            "AND p.generation IS NOT b.generation LIMIT 1", (self.collection,)).fetchone()

    def _collect_garbage(self):
        """Delete the parts a crashed store left behind (under the lease), if any."""
        if self._orphan_part() is None:
            return
        with self._store_lock:
            if not self._claim_lease():
                return
            try:
                self._drop_orphan_parts()
                self._trim_log()
            finally:
                self._release_lease()

    def _release_lease(self):
        self._core.execute("UPDATE beaver_ann_base SET lease_owner = NULL, lease_until = 0 "
                           "WHERE collection = ? AND lease_owner = ?",
                           (self.collection, self._owner))

    def _trim_log(self, batch=5000):
        """Delete this collection's log rows at or below the floor, a batch per transaction.

        The newest row of the whole log is kept, so that ``seq`` (max + 1) is never reused.
        """
        while not self._closing:
            with self._core.transaction():
                cursor = self._core.execute(
                    "DELETE FROM beaver_ann_log WHERE seq IN (SELECT seq FROM beaver_ann_log "
                    "WHERE collection = ? AND seq <= (SELECT log_floor FROM beaver_ann_base "
                    "WHERE collection = ?) AND seq < (SELECT max(seq) FROM beaver_ann_log) "
                    "LIMIT ?)", (self.collection, self.collection, batch))
            if cursor.rowcount < batch:
                return

    # -- maintenance ---------------------------------------------------------------------------

    def compact(self):
        """Fold the delta into the base now and store the base in the database file.

            >>> index = open_index(db._core, "docs", 2)
            >>> index.compact()

        Waits for a background fold in progress first. Writers are blocked only for the
        short transactions that write each stored part.
        """
        self._ready()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join()
        try:
            self._fold(persist=True, force=True)
            self._collect_garbage()
        except _Stopped:
            pass

    def info(self) -> dict:
        """Sizes and kind, for monitoring (``index.info()["count"]``)."""
        self._ready()
        with self._lock:
            base, delta = self._base, self._delta
            n = len(base.ids)
            graph = 0
            if base.kind == "hnsw" and n:
                graph = base.index.hnsw.neighbors.size() * 4 + base.index.hnsw.offsets.size() * 8
            memory = n * (self.dim * 4 + 8) + graph + delta.vecs.nbytes + delta.rowids.nbytes
            return {"kind": base.kind, "count": len(base) + len(delta), "base": len(base),
                    "delta": len(delta), "dead": base.n_dead, "built_seq": base.built_seq,
                    "last_seq": self._last_seq, "loads": self._loads, "memory_bytes": memory}

    def close(self):
        """Stop the background fold (``index.close()``); the stored base stays as it is.

        Waits a little for the fold thread; one still inside a faiss build step gives up
        (without writing anything) when the step ends.
        """
        self._closing = True
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=2.0)


def _alive(owner) -> bool:
    """False when the lease owner is a process of this machine that no longer exists."""
    try:
        os.kill(int(owner.split(":")[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True
    return True

def _top(dist, ids, top_k) -> list:
    """The ``top_k`` smallest distances as ``[(doc_id, float), ...]``, ascending."""
    n = len(ids)
    if n == 0:
        return []
    if n > top_k:
        part = np.argpartition(dist, top_k - 1)[:top_k]
        order = part[np.argsort(dist[part], kind="stable")]
    else:
        order = np.argsort(dist, kind="stable")
    return [(ids[i], float(dist[i])) for i in order]
