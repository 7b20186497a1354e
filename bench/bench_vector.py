"""Vector benchmark: beaver's faiss index beside raw faiss, on real embeddings.

    python bench/bench_vector.py                 # full run (63,436 x 384, about 2 min cached)
    python bench/bench_vector.py --quick         # first 10,000 vectors, 200 queries

Data: ``shared/data`` (all-MiniLM-L6-v2 vectors of the Debian package descriptions and 1,000
title queries, unit norm; see its README). Everything runs on one thread
(``faiss.omp_set_num_threads(1)``), in one process, against the same vectors and queries:

- exact: raw ``faiss.IndexFlatIP`` vs beaver's flat index (``index="flat"``), end to end
  (``collection.search`` returning documents) and at the index level (ids only);
- ANN: a raw ``IndexHNSWFlat`` (M=32, efConstruction=200) vs beaver's ``index="hnsw"`` built
  with the same parameters, at several ``ef_search``; recall@10 is tie-tolerant (a returned
  id counts when its true distance is <= the 10th true distance: the corpus has groups of
  identical vectors);
- inserts per second, one transaction per vector and batched; the delay before a second
  process's search sees a new vector; memory and file bytes per vector;
- filtered search: ``collection.search(where=...)`` on a body field ``n = row % 100`` with a
  field index, at 1, 10 and 50 % allowed, repeated, after writes and first search of a new
  filter, beside the same search without a filter; recall@10 within the filter (exact
  top-10 among its rows).

Search latencies are the calling thread's CPU time by default (``--clock wall`` for elapsed
time): faiss runs on that thread (one OpenMP thread) and the machine may be shared. Inserts,
loading and the cross-process delay are always elapsed time.

Slow things are built once and cached under ``--cache`` (default /tmp/beaver-vec-cache): the
raw HNSW index and a database holding both beaver collections with their stored bases.
Results go to stdout and to bench/results/vector.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import faiss  # noqa: E402

import beaver  # noqa: E402  (the beaver.py of this checkout)
import beaver_vector  # noqa: E402
from beaver import BeaverDB, Document  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
EF_VALUES = (16, 24, 32, 48, 64, 96, 128)
HNSW = {"m": 32, "ef_construction": 200}


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # of search latencies; --clock wall for elapsed time


def timed(fn, items):
    """Per-call latencies in seconds, and the results."""
    out, lat = [], []
    for item in items:
        t = clock()
        out.append(fn(item))
        lat.append(clock() - t)
    return lat, out


def recall_at_10(results, queries, X, kth):
    """Tie-tolerant recall@10 of ``results`` (lists of row numbers)."""
    hits = 0
    for rows, q, limit in zip(results, queries, kth):
        rows = [r for r in rows if r >= 0]
        hits += int(np.sum(X[rows] @ q >= limit - 1e-6)) if rows else 0
    return hits / (10 * len(results))


# ------------------------------------------------------------------------------------------
# Raw faiss
# ------------------------------------------------------------------------------------------

def raw_hnsw(X, cache, tag):
    path = os.path.join(cache, f"raw_hnsw_{tag}_m32_efc200_ip.faiss")
    if os.path.exists(path):
        return faiss.read_index(path), None
    index = faiss.IndexHNSWFlat(X.shape[1], HNSW["m"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW["ef_construction"]
    t = time.perf_counter()
    index.add(X)
    build = time.perf_counter() - t
    faiss.write_index(index, path)
    return index, build


# ------------------------------------------------------------------------------------------
# beaver
# ------------------------------------------------------------------------------------------

def build_database(path, X, ids):
    """Both collections, indexed in transactions of 5,000 documents, compacted (stored)."""
    timings = {}
    with BeaverDB(path) as db:
        for name, options in (("flat", {"index": "flat"}), ("hnsw", dict(HNSW, index="hnsw"))):
            docs = db.collection(name, metric="cosine", **options)
            t = time.perf_counter()
            for start in range(0, len(X), 5000):
                with db.transaction():
                    for i in range(start, min(start + 5000, len(X))):
                        docs.index(Document(id=ids[i], body={"n": i % 100},
                                            embedding=X[i].tolist()), fts=False)
            timings[f"{name} inserts"] = time.perf_counter() - t
            t = time.perf_counter()
            docs.compact()
            timings[f"{name} compact"] = time.perf_counter() - t
    return timings


def open_collection(db, name):
    options = {"index": "flat"} if name == "flat" else dict(HNSW, index="hnsw")
    docs = db.collection(name, metric="cosine", **options)
    t = time.perf_counter()
    docs.search([1.0] + [0.0] * 383, top_k=1)
    return docs, time.perf_counter() - t


# ------------------------------------------------------------------------------------------
# Inserts and cross-process visibility
# ------------------------------------------------------------------------------------------

def insert_rates(X, n_single, n_batch):
    """Vectors/s, one transaction each and batched, end to end and at the index level."""
    rates = {}
    with tempfile.TemporaryDirectory(prefix="beaver-vec-") as folder:
        with BeaverDB(os.path.join(folder, "i.db")) as db:
            docs = db.collection("c", metric="cosine", index="flat")
            docs.index(Document(id="warm", embedding=X[0].tolist()), fts=False)
            vecs = [x.tolist() for x in X[:n_single]]
            t = time.perf_counter()
            for i, v in enumerate(vecs):
                docs.index(Document(id=f"s{i}", embedding=v), fts=False)
            rates["collection.index, one transaction each"] = n_single / (time.perf_counter() - t)
            vecs = [x.tolist() for x in X[:n_batch]]
            t = time.perf_counter()
            with db.transaction():
                for i, v in enumerate(vecs):
                    docs.index(Document(id=f"b{i}", embedding=v), fts=False)
            seconds = time.perf_counter() - t
            rates["collection.index, batched in db.transaction()"] = n_batch / seconds
            t = time.perf_counter()
            docs.search(X[0].tolist(), top_k=10)
            rates["first search after the batch (catch-up), ms"] = (time.perf_counter() - t) * 1e3
        with BeaverDB(os.path.join(folder, "h.db")) as db:
            rates.update(hook_rates(db, X, n_single, n_batch))
    return rates


def hook_rates(db, X, n_single, n_batch):
    """The vector part alone: the beaver_vectors row plus the index hook, as collections do."""
    db.collection("c", metric="cosine", index="flat")  # creates the tables
    core = db._core
    index = beaver_vector.open_index(core, "c", X.shape[1], "cosine", index="flat")
    sql = "INSERT OR REPLACE INTO beaver_vectors (collection, doc_id, vector) VALUES ('c', ?, ?)"
    blobs = [x.astype("<f4").tobytes() for x in X[:max(n_single, n_batch)]]
    t = time.perf_counter()
    for i in range(n_single):
        with core.transaction():
            core.execute(sql, (f"s{i}", blobs[i]))
            index.on_upsert(f"s{i}", blobs[i])
    rates = {"vector row + on_upsert, one transaction each": n_single / (time.perf_counter() - t)}
    t = time.perf_counter()
    with core.transaction():
        core.executemany(sql, [(f"b{i}", blobs[i]) for i in range(n_batch)])
        index.on_upsert_many((f"b{i}", blobs[i]) for i in range(n_batch))
    rates["vector rows + on_upsert_many, batched"] = n_batch / (time.perf_counter() - t)
    index.close()
    return rates


def watcher(path, name, ready, queue, trials):
    """The second process: search in a loop until each probe shows up, report when."""
    faiss.omp_set_num_threads(1)
    with BeaverDB(path) as db:
        docs, _ = open_collection(db, name)
        probe = np.zeros(384, np.float32)
        probe[0] = 1.0
        ready.set()
        for i in range(trials):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                hits = docs.search(probe.tolist(), top_k=1)
                if hits and hits[0][0].id == f"probe{i}":
                    queue.put(time.perf_counter())
                    break
            probe[1] += 0.001  # the next probe is a little different


def visibility(path, name, trials=20):
    """ms from the commit of a new vector to a second process's search returning it."""
    ctx = multiprocessing.get_context("spawn")
    ready, queue = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=watcher, args=(path, name, ready, queue, trials))
    child.start()
    ready.wait(120)
    delays = []
    with BeaverDB(path) as db:
        docs, _ = open_collection(db, name)
        probe = np.zeros(384, np.float32)
        probe[0] = 1.0
        for i in range(trials):
            before = time.perf_counter()  # conservative: includes the index() call itself
            docs.index(Document(id=f"probe{i}", embedding=(probe * 10).tolist()), fts=False)
            delays.append(queue.get(timeout=60) - before)
            probe[1] += 0.001
        for i in range(trials):
            docs.drop(f"probe{i}")
    child.join(60)
    return delays


# ------------------------------------------------------------------------------------------
# Filters, memory
# ------------------------------------------------------------------------------------------

FRACTIONS = (0.01, 0.1, 0.5)


def filter_truth(X, Q, fraction):
    """The filter keeping a ``fraction`` of the rows (the body field n = row % 100), its rows,
    and the 10th best score among them per query (for recall within the filter)."""
    cut = int(round(fraction * 100))
    rows = np.flatnonzero(np.arange(len(X)) % 100 < cut)
    kth = np.sort(Q @ X[rows].T, axis=1)[:, -10]
    return {"n": {"$lt": cut}}, rows, kth


def memory_per_vector(index, n):
    """Bytes per vector in memory: raw vectors plus the HNSW graph when there is one."""
    total = n * index.d * 4
    if isinstance(index, faiss.IndexHNSW):
        total += index.hnsw.neighbors.size() * 4 + index.hnsw.offsets.size() * 8
        total += index.hnsw.levels.size() * 4
    return total / n


def file_bytes(path):
    with BeaverDB(path) as db:
        if not has_dbstat(db):
            return {}
        return dict(db._core.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))


def has_dbstat(db):
    try:
        db._core.execute("SELECT 1 FROM dbstat LIMIT 1").fetchall()
        return True
    except beaver.BeaverError:
        return False


# ------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------

def load_data(args):
    X = np.load(os.path.join(args.data, "debian_minilm_docs.f16.npy")).astype(np.float32)
    Q = np.load(os.path.join(args.data, "debian_minilm_queries.f16.npy")).astype(np.float32)
    with open(os.path.join(args.data, "debian_minilm_ids.json")) as f:
        ids = json.load(f)["doc_ids"]
    if args.quick:
        X, Q, ids = X[:10000], Q[:200], ids[:10000]
    return X, Q, ids


class Report:
    def __init__(self):
        self.lines = []

    def table(self, title, header, rows):
        self.lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |",
                       "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        print("\n".join(self.lines[-(len(rows) + 4):]), flush=True)

    def note(self, text):
        self.lines += ["", text]
        print(text, flush=True)


def lat_row(name, lat, floor=None, recall=None):
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    ratio = f"{p50 / floor:.2f}x" if floor else "1.00x (floor)"
    return [name, f"{p50:.3f}", f"{p99:.3f}", ratio, "" if recall is None else f"{recall:.4f}"]


def interleaved(fns, Q):
    """Latencies of each function, called in turn on every query (same machine load)."""
    lats, outs = [[] for _ in fns], [[] for _ in fns]
    for q in Q:
        for lat, out, fn in zip(lats, outs, fns):
            t = clock()
            out.append(fn(q))
            lat.append(clock() - t)
    return lats, outs


def contenders(raw, docs, row_of, ef=None):
    params = None
    if ef is not None:
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        docs._backend.ef_search = ef
    index = docs._backend
    return [lambda q: raw.search(q.reshape(1, -1), 10, params=params)[1][0],
            lambda q: [row_of[d] for d, _ in index.search(q, 10, None)],
            lambda q: [row_of[d.id] for d, _ in docs.search(q.tolist(), top_k=10)]]


NAMES = ("index (ids)", "collection (documents)")


def bench_exact(report, db, X, Q, ids, row_of, kth):
    flat = faiss.IndexFlatIP(X.shape[1])
    flat.add(X)
    docs, load = open_collection(db, "flat")
    lats, outs = interleaved(contenders(flat, docs, row_of), Q)
    floor = percentile(lats[0], 50)
    rows = [lat_row("raw faiss IndexFlatIP", lats[0], None, recall_at_10(outs[0], Q, X, kth))]
    for name, lat, out in zip(NAMES, lats[1:], outs[1:]):
        rows.append(lat_row(f"beaver flat, {name}", lat, floor, recall_at_10(out, Q, X, kth)))
    report.table(f"Exact search, {len(X):,} vectors, top-10, one thread",
                 ["who", "p50 ms", "p99 ms", "p50 vs raw", "recall@10"], rows)
    return docs, load, memory_per_vector(flat, len(X))


def bench_ann(report, db, X, Q, ids, row_of, kth, cache, tag):
    raw, build = raw_hnsw(X, cache, tag)
    docs, load = open_collection(db, "hnsw")
    rows, summary = [], []
    for ef in EF_VALUES:
        lats, outs = interleaved(contenders(raw, docs, row_of, ef), Q)
        floor = percentile(lats[0], 50)
        rows.append(lat_row(f"raw HNSW ef={ef}", lats[0], floor, recall_at_10(outs[0], Q, X, kth)))
        for name, lat, out in zip(NAMES, lats[1:], outs[1:]):
            rec = recall_at_10(out, Q, X, kth)
            rows.append(lat_row(f"beaver hnsw ef={ef}, {name}", lat, floor, rec))
            summary.append((ef, name, rec, percentile(lat, 50), floor))
    report.table(f"ANN (HNSW M=32 efConstruction=200), {len(X):,} vectors, top-10, one thread; "
                 "recall tie-tolerant", ["who", "p50 ms", "p99 ms", "p50 vs raw same ef",
                                         "recall@10"], rows)
    docs._backend.ef_search = 64
    if build is not None:
        report.note(f"raw HNSW build (one thread): {build:.1f} s")
    return docs, load, memory_per_vector(raw, len(X)), summary


def bench_filters(report, docs_flat, docs_hnsw, X, Q, ids, row_of):
    """``collection.search(where=...)`` on the field n (a field index on it), each variant
    in a loop of its own beside the same search without a filter, called in turn on every
    query: "repeated" (nothing changed since the last search with that filter: its allowed
    ids are kept), "after a write" (a document without a vector, in the filter, written
    again since: the kept ids are patched from the change log), "after a write moving a
    document in or out" (a document of the base written again with its vector, its n
    switching between 99 and 0: out of every filter, then in) and "first search of a new
    filter" (each query's filter is new: the same one plus ``$ne`` a value no document
    has, so nothing of it is kept)."""
    rows, summary = [], []
    for name, docs in (("hnsw ef=64", docs_hnsw), ("flat", docs_flat)):
        docs.create_index("n")
        index = docs._backend
        plain = lambda q, docs=docs: [  # noqa: E731
            row_of[d.id] for d, _ in docs.search(q.tolist(), top_k=10)]
        for fraction in FRACTIONS:
            where, allowed_rows, kth = filter_truth(X, Q, fraction)
            allowed = docs._allowed(docs._check(where))
            found = lambda q, docs=docs, where=where: [  # noqa: E731
                row_of[d.id] for d, _ in docs.search(q.tolist(), top_k=10, where=where)]

            def write(q, docs=docs):
                docs.index(beaver.Document(id="a note", body={"n": 0}))

            def move(q, docs=docs, flip=itertools.cycle([99, 0])):
                docs.index(beaver.Document(id=ids[0], body={"n": next(flip)},
                                           embedding=X[0].tolist()))

            def first(q, docs=docs, where=where, new=itertools.count(1)):
                where = {"n": dict(where["n"], **{"$ne": -next(new)})}  # no document has it
                return [row_of[d.id] for d, _ in docs.search(q.tolist(), top_k=10, where=where)]

            loops = [(("repeated", found),
                      ("repeated, index level (ids)", lambda q, allowed=allowed: [
                          row_of[d] for d, _ in index.search(q, 10, allowed)])),
                     (("after a write", found),),
                     (("after a write moving a document in or out", found),),
                     (("first search of a new filter", first),)]
            writes = {"after a write": [write],
                      "after a write moving a document in or out": [move]}
            for loop in loops:
                fns = [plain] + writes.get(loop[0][0], [])
                lats, outs = interleaved(fns + [fn for _, fn in loop], Q)
                floor = percentile(lats[0], 50)
                for (what, _), lat, out in zip(loop, lats[len(fns):], outs[len(fns):]):
                    assert set(np.concatenate(out)) <= set(allowed_rows.tolist())
                    recall = recall_at_10(out, Q, X, kth)
                    rows.append([f"beaver {name}, {fraction:.0%} allowed, {what}",
                                 f"{percentile(lat, 50):.3f}", f"{percentile(lat, 99):.3f}",
                                 f"{floor:.3f}", f"{percentile(lat, 50) / floor:.2f}x",
                                 f"{recall:.4f}"])
                    summary.append((name, fraction, what, percentile(lat, 50), floor, recall))
        docs.drop("a note")
        docs.index(beaver.Document(id=ids[0], body={"n": 0}, embedding=X[0].tolist()))
    report.table("Filtered search: `collection.search(where={\"n\": {\"$lt\": ...}})`, a field "
                 "index on n, documents returned",
                 ["who", "p50 ms", "p99 ms", "no filter, same loop: p50 ms", "p50 vs no filter",
                  "recall@10 within the filter"], rows)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k vectors, 200 queries")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--cache", default="/tmp/beaver-vec-cache")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "vector.md"))
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="search latencies as the calling thread's CPU time (default: "
                        "robust on a shared machine) or as elapsed wall time")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    faiss.omp_set_num_threads(1)
    os.environ.pop("BEAVER_VECTOR_BACKEND", None)
    os.makedirs(args.cache, exist_ok=True)
    X, Q, ids = load_data(args)
    row_of = {doc_id: i for i, doc_id in enumerate(ids)}
    truth = faiss.IndexFlatIP(X.shape[1])
    truth.add(X)
    kth = truth.search(Q, 10)[0][:, 9]
    tag = "quick" if args.quick else "full"
    path = os.path.join(args.cache, f"bench_{tag}.db")
    report = Report()
    report.note(f"beaver {beaver.__version__}, faiss {faiss.__version__}, numpy {np.__version__}, "
                f"Python {platform.python_version()}, {os.cpu_count()} CPUs (shared), one thread; "
                f"{len(X):,} vectors x {X.shape[1]}, {len(Q):,} queries; search latencies "
                f"are {args.clock} time; load average at start "
                f"{os.getloadavg()[0]:.1f} (other jobs share the machine: compare ratios, and "
                "raw and beaver calls alternate query by query so both see the same load).")
    timings = None
    if not os.path.exists(path):
        timings = build_database(path, X, ids)
    with BeaverDB(path) as db:
        docs_flat, load_flat, mem_flat = bench_exact(report, db, X, Q, ids, row_of, kth)
        docs_hnsw, load_hnsw, mem_hnsw, summary = bench_ann(report, db, X, Q, ids, row_of, kth,
                                                            args.cache, tag)
        filters = bench_filters(report, docs_flat, docs_hnsw, X, Q, ids, row_of)
        info_flat, info_hnsw = docs_flat._backend.info(), docs_hnsw._backend.info()
    rates = insert_rates(X, 2000 if args.quick else 5000, 10000 if args.quick else 30000)
    report.table("Inserts (384-dim vectors, fresh database)", ["what", "vectors/s (or ms)"],
                 [[k, f"{v:,.0f}" if "ms" not in k else f"{v:.1f}"] for k, v in rates.items()])
    delays = visibility(path, "hnsw")
    report.table("A second process sees a new vector (commit to its search returning it)",
                 ["p50 ms", "p90 ms", "max ms"],
                 [[f"{percentile(delays, 50):.2f}", f"{percentile(delays, 90):.2f}",
                   f"{max(delays) * 1e3:.2f}"]])
    sizes = file_bytes(path)
    stored = sizes.get("beaver_ann_parts", 0) / 2 / len(X)
    table = sizes.get("beaver_vectors", 0) / 2 / len(X)
    report.table("Memory and file bytes per vector", ["what", "bytes/vector"], [
        ["raw faiss IndexFlatIP (memory)", f"{mem_flat:,.0f}"],
        ["raw faiss HNSW M=32 (memory)", f"{mem_hnsw:,.0f}"],
        ["beaver flat index (memory, from info())", f"{info_flat['memory_bytes'] / len(X):,.0f}"],
        ["beaver hnsw index (memory, from info())", f"{info_hnsw['memory_bytes'] / len(X):,.0f}"],
        ["file: beaver_vectors rows (the collection's copy)", f"{table:,.0f}"],
        ["file: stored bases, mean of flat and hnsw (beaver_ann_parts)", f"{stored:,.0f}"],
    ])
    loads = [["open + load stored flat base, first search", f"{load_flat * 1e3:.0f}"],
             ["open + load stored HNSW base, first search", f"{load_hnsw * 1e3:.0f}"]]
    if timings:
        loads += [[f"build: {k}", f"{v * 1e3:.0f}"] for k, v in timings.items()]
    report.table("Opening and building", ["what", "ms"], loads)
    targets(report, summary, rates, delays, filters)
    report.note(f"Load average at the end: {os.getloadavg()[0]:.1f}. \"index (ids)\" is "
                "`VectorIndex.search` (catch-up from the log, faiss, merge with the delta); "
                "\"collection (documents)\" adds beaver.py's `collection.search`: checking "
                "the query and fetching the 10 documents (body decoded, embedding kept as "
                "bytes until `.embedding` is read: the benchmark reads only ids).")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("# Vector benchmark (bench/bench_vector.py)\n" + "\n".join(report.lines) + "\n")
    return 0


def targets(report, summary, rates, delays, filters):
    """One line per target of the issue, with the figure that decides it."""
    lines = ["Targets:"]
    for name, fraction, what, p50, floor, recall in filters:
        if name.startswith("hnsw") and not what.endswith("(ids)"):
            lines.append(f"- filtered search, {name}, {fraction:.0%} allowed, {what}: p50 "
                         f"{p50:.3f} ms = {p50 / floor:.2f}x the search without a filter "
                         f"(target <= 2x), recall@10 within the filter {recall:.4f} "
                         "(target >= 0.98)")
    for name in NAMES:
        ok = [s for s in summary if s[1] == name and s[2] >= 0.98]
        if ok:
            best = min(ok, key=lambda s: s[3])
            lines.append(f"- ANN recall@10 >= 0.98, {name}: ef={best[0]} gives {best[2]:.4f} at "
                         f"p50 {best[3]:.3f} ms (target <= 1 ms), {best[3] / best[4]:.2f}x raw "
                         "HNSW at the same ef (target <= 2x)")
    single = rates.get("collection.index, one transaction each", 0)
    lines.append(f"- inserts one by one: {single:,.0f}/s end to end, "
                 f"{rates.get('vector row + on_upsert, one transaction each', 0):,.0f}/s for the "
                 "vector part alone (target >= 5k/s)")
    lines.append(f"- second process sees a new vector: p50 {percentile(delays, 50):.2f} ms, "
                 f"max {max(delays) * 1e3:.2f} ms (target <= 100 ms)")
    report.note("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
