"""Tests of beaver, in the order of beaver.py's sections."""
import subprocess
import sys

import pytest

import beaver
from beaver import BeaverDB


@pytest.fixture
def db(tmp_path):
    database = BeaverDB(tmp_path / "test.db")
    yield database
    database.close()


def test_import_without_site_packages():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import beaver; print(beaver.__version__)"
    out = subprocess.run([sys.executable, "-S", "-c", code, str(__import__("pathlib").Path(beaver.__file__).parent)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == beaver.__version__


def test_dict_round_trip(db):
    config = db.dict("app_config")
    config["theme"] = "dark"
    assert config["theme"] == "dark"
    assert len(config) == 1


# ---- vectors (beaver_vector: the faiss index) ----

import os  # noqa: E402
import signal  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

_VEC_TABLES = [
    """CREATE TABLE IF NOT EXISTS beaver_vectors (collection TEXT, doc_id TEXT,
        vector BLOB NOT NULL, PRIMARY KEY (collection, doc_id)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS beaver_collections (collection TEXT PRIMARY KEY,
        dim INTEGER, metric TEXT, options TEXT)""",
]


class _VecCollection:
    """The collection's side of the vector contract, written as beaver.py's collections do."""

    def __init__(self, db, name, dim, metric="l2", **options):
        import beaver_vector
        self.core, self.name = db._core, name
        for statement in _VEC_TABLES:
            self.core.execute(statement)
        self.index = beaver_vector.open_index(self.core, name, dim, metric, **options)

    def put(self, doc_id, vector):
        blob = _np().asarray(vector, dtype="<f4").tobytes()
        with self.core.transaction():
            self.core.execute("INSERT OR REPLACE INTO beaver_vectors VALUES (?, ?, ?)",
                              (self.name, doc_id, blob))
            self.index.on_upsert(doc_id, blob)

    def put_many(self, items):
        rows = [(doc_id, _np().asarray(v, dtype="<f4").tobytes()) for doc_id, v in items]
        with self.core.transaction():
            self.core.executemany("INSERT OR REPLACE INTO beaver_vectors VALUES (?, ?, ?)",
                                  [(self.name, d, b) for d, b in rows])
            self.index.on_upsert_many(rows)

    def delete(self, doc_id):
        with self.core.transaction():
            gone = self.core.execute("DELETE FROM beaver_vectors WHERE collection = ? AND doc_id = ?",
                                     (self.name, doc_id)).rowcount
            if gone:
                self.index.on_delete(doc_id)

    def clear(self):
        with self.core.transaction():
            self.core.execute("DELETE FROM beaver_vectors WHERE collection = ?", (self.name,))
            self.index.on_clear()

    def search(self, vector, top_k=10, allowed=None):
        return self.index.search(vector, top_k, allowed)

    def stored(self) -> dict:
        np = _np()
        return {d: np.frombuffer(b, "<f4") for d, b in self.core.execute(
            "SELECT doc_id, vector FROM beaver_vectors WHERE collection = ?", (self.name,))}


def _np():
    return pytest.importorskip("numpy")


@pytest.fixture
def faiss_ok():
    pytest.importorskip("numpy")
    pytest.importorskip("faiss")
    os.environ.pop("BEAVER_VECTOR_BACKEND", None)


def _brute(stored, query, metric, top_k, allowed=None):
    np = _np()
    ids = [d for d in stored if allowed is None or d in allowed]
    if not ids:
        return []
    matrix = np.array([stored[d] for d in ids], dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "l2":
        dist = np.linalg.norm(matrix - q, axis=1)
    elif metric == "ip":
        dist = -(matrix @ q)
    else:
        norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(q)
        dist = 1 - (matrix @ q) / np.where(norms == 0, 1, norms)
    order = np.argsort(dist, kind="stable")[:top_k]
    return [(ids[i], float(dist[i])) for i in order]


def _same_answer(got, want, tol=1e-4):
    """Equal up to float rounding and the order of (near-)ties."""
    assert len(got) == len(want)
    assert [d for _, d in got] == pytest.approx([d for _, d in want], abs=tol)
    want_dist = dict(want)
    cutoff = want[-1][1] if want else 0
    for doc_id, dist in got:
        assert doc_id in want_dist or dist >= cutoff - tol, (doc_id, dist)


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_vector_exact_equals_brute_force(db, faiss_ok, metric, monkeypatch):
    import beaver_vector
    np = _np()
    rng = np.random.default_rng(7)
    coll = _VecCollection(db, "v", 8, metric, fold_min=40, background=False)
    coll.put_many((f"d{i}", rng.standard_normal(8)) for i in range(150))
    for step in range(120):
        doc_id = f"d{rng.integers(0, 200)}"
        if step % 3 == 0:
            coll.delete(doc_id)
        else:
            coll.put(doc_id, rng.standard_normal(8))
        if step % 40 == 39:
            coll.index.compact()
        if step % 7 == 0:
            q = rng.standard_normal(8)
            _same_answer(coll.search(q, 10), _brute(coll.stored(), q, metric, 10))
    allowed = {f"d{i}" for i in range(0, 200, 3)}
    q = rng.standard_normal(8)
    _same_answer(coll.search(q, 5, allowed), _brute(coll.stored(), q, metric, 5, allowed))
    monkeypatch.setattr(beaver_vector, "GATHER_BELOW", 0)    # the IDSelector path
    _same_answer(coll.search(q, 5, allowed), _brute(coll.stored(), q, metric, 5, allowed))
    assert coll.search(q, 1000) and len(coll.search(q, 1000)) == len(coll.stored())


def test_vector_persistence_across_reopen(tmp_path, faiss_ok):
    np = _np()
    rng = np.random.default_rng(1)
    vectors = {f"d{i}": rng.standard_normal(6) for i in range(300)}
    with BeaverDB(tmp_path / "v.db") as db:
        coll = _VecCollection(db, "v", 6, "cosine", background=False)
        coll.put_many(list(vectors.items())[:200])
        coll.index.compact()                      # stored base ...
        for doc_id, v in list(vectors.items())[200:]:
            coll.put(doc_id, v)                   # ... plus entries only in the log
        coll.delete("d5")
        coll.delete("d250")
        coll.index.close()
    with BeaverDB(tmp_path / "v.db") as db:
        coll = _VecCollection(db, "v", 6, "cosine")
        assert coll.index.info()["count"] == 298
        q = rng.standard_normal(6)
        _same_answer(coll.search(q, 300), _brute(coll.stored(), q, "cosine", 300))
        assert not {"d5", "d250"} & {d for d, _ in coll.search(q, 300)}
        coll.put("d5", vectors["d5"])             # re-index after drop, then reopen
        coll.index.close()
    with BeaverDB(tmp_path / "v.db") as db:
        coll = _VecCollection(db, "v", 6, "cosine")
        assert coll.search(vectors["d5"], 1)[0][0] == "d5"


def test_vector_upsert_drop_clear(db, faiss_ok):
    coll = _VecCollection(db, "v", 3, "l2", fold_min=2, background=False)
    coll.put("a", [1, 0, 0])
    coll.put("b", [0, 1, 0])
    coll.index.compact()
    coll.put("a", [0, 0, 5])                      # upsert: the old vector must disappear
    assert coll.search([1, 0, 0], 1) == [("b", pytest.approx(2 ** 0.5))]
    assert coll.search([0, 0, 5], 1) == [("a", pytest.approx(0))]
    coll.delete("b")
    coll.index.compact()
    assert [d for d, _ in coll.search([0, 1, 0], 5)] == ["a"]
    coll.clear()
    assert coll.search([0, 1, 0], 5) == []
    coll.put("b", [0, 1, 0])
    coll.index.compact()
    assert coll.search([0, 1, 0], 5) == [("b", pytest.approx(0))]
    reopened = _VecCollection(db, "v", 3, "l2")
    assert reopened.search([0, 1, 0], 5) == [("b", pytest.approx(0))]


def test_vector_transaction_sees_own_writes_and_rollback(db, faiss_ok):
    coll = _VecCollection(db, "v", 2, "l2")
    coll.put("a", [0, 0])
    with pytest.raises(RuntimeError):
        with db.transaction():
            coll.put("b", [1, 1])
            coll.delete("a")
            assert [d for d, _ in coll.search([1, 1], 5)] == ["b"]
            raise RuntimeError("roll back")
    assert [d for d, _ in coll.search([1, 1], 5)] == ["a"]


def test_vector_checks_dimension_metric_and_options(db, faiss_ok):
    import beaver_vector
    coll = _VecCollection(db, "v", 3)
    with pytest.raises(beaver.ValidationError):
        coll.put("a", [1.0, 2.0])
    with pytest.raises(ValueError):
        coll.search([1.0], 1)
    with pytest.raises(ValueError):
        beaver_vector.open_index(db._core, "w", 3, "manhattan")
    with pytest.raises(ValueError):
        beaver_vector.open_index(db._core, "w", 3, "l2", ef_serach=5)
    os.environ["BEAVER_VECTOR_BACKEND"] = "exact"
    try:
        with pytest.raises(beaver.FeatureUnavailable):
            beaver_vector.open_index(db._core, "w", 3)
    finally:
        del os.environ["BEAVER_VECTOR_BACKEND"]


def test_vector_hnsw_filters_and_rebuilds(db, faiss_ok):
    np = _np()
    rng = np.random.default_rng(3)
    coll = _VecCollection(db, "v", 16, "cosine", index="hnsw", fold_min=100, background=False,
                          filter_exact_below=50, build_chunk=256)
    coll.put_many((f"d{i}", rng.standard_normal(16)) for i in range(600))
    coll.index.compact()
    assert coll.index.info()["kind"] == "hnsw"
    for i in range(0, 600, 2):
        coll.delete(f"d{i}")
    q = rng.standard_normal(16)
    assert all(int(d[1:]) % 2 for d, _ in coll.search(q, 20))
    small = {f"d{i}" for i in range(1, 60, 2)}      # exact path
    _same_answer(coll.search(q, 5, small), _brute(coll.stored(), q, "cosine", 5, small))
    large = {f"d{i}" for i in range(1, 600, 4)}     # IDSelector path
    got = coll.search(q, 10, large)
    assert len(got) == 10 and {d for d, _ in got} <= large
    coll.index.compact()                            # half dead: rebuilt without them
    assert coll.index.info()["dead"] == 0 and coll.index.info()["count"] == 300


def _vec_writer(path, prefix, count, other, result):
    db = BeaverDB(path)
    coll = _VecCollection(db, "v", 4, "l2", fold_min=50)
    missing = 0
    for i in range(count):
        vector = [float(i), float(len(prefix)), 1.0, 0.5]
        coll.put(f"{prefix}{i}", vector)
        hit = coll.search(vector, 1)
        if not hit or hit[0][1] > 1e-6:
            missing += 1
    deadline = time.monotonic() + 60
    seen = False
    while time.monotonic() < deadline and not seen:       # the other's last write shows up
        seen = any(d == f"{other}{count - 1}" for d, _ in coll.search([0, 0, 0, 0], 10 ** 6))
    result.put((prefix, missing, seen))
    coll.index.close()
    db.close()


def test_vector_two_processes_insert_and_search(tmp_path, faiss_ok):
    path = str(tmp_path / "v.db")
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    workers = [ctx.Process(target=_vec_writer, args=(path, p, 150, o, result))
               for p, o in (("a", "bb"), ("bb", "a"))]
    for w in workers:
        w.start()
    answers = [result.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert sorted(answers) == [("a", 0, True), ("bb", 0, True)]
    with BeaverDB(path) as db:
        coll = _VecCollection(db, "v", 4, "l2")
        q = [3.0, 1.0, 1.0, 0.5]
        _same_answer(coll.search(q, 400), _brute(coll.stored(), q, "l2", 400))
        assert coll.index.info()["count"] == 300


def _vec_compactor(path):
    db = BeaverDB(path)
    coll = _VecCollection(db, "v", 16, "l2", part_bytes=1024, background=False)
    import numpy as np
    rng = np.random.default_rng(os.getpid())
    i = 0
    while True:                                  # killed from outside, mid-compaction
        coll.put_many((f"d{i + j}", rng.standard_normal(16)) for j in range(200))
        coll.delete(f"d{i // 2}")
        i += 200
        coll.index.compact()


def test_vector_crash_during_compaction_loses_nothing(tmp_path, faiss_ok):
    path = str(tmp_path / "v.db")
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_vec_compactor, args=(path,))
    child.start()
    with BeaverDB(path) as db:
        core = db._core

        def mid_compaction():
            try:
                row = core.execute("SELECT count(DISTINCT generation), "
                                   "(SELECT built_seq FROM beaver_ann_base) FROM beaver_ann_parts"
                                   ).fetchone()
            except beaver.BeaverError:           # tables not created yet
                return None
            return row[0] >= 2 and row[1] > 0 or None
        found = core.watcher.wait_for(mid_compaction, timeout=60)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        assert found, "never saw a compaction in progress"
        assert core.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        coll = _VecCollection(db, "v", 16, "l2", part_bytes=1024, background=False)
        stored = coll.stored()
        assert coll.index.info()["count"] == len(stored) > 0
        q = [0.5] * 16
        _same_answer(coll.search(q, 50), _brute(stored, q, "l2", 50))
        coll.index.compact()                     # the dead child's lease does not block it
        parts = core.execute("SELECT count(DISTINCT generation) FROM beaver_ann_parts").fetchone()
        assert parts[0] == 1
        _same_answer(_VecCollection(db, "v", 16, "l2").search(q, 50), _brute(stored, q, "l2", 50))


def test_vector_example_stress_runs():
    example = Path(__file__).parent / "examples" / "stress_vectors.py"
    out = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(example.parent.parent)))
    assert out.returncode == 0, out.stderr
