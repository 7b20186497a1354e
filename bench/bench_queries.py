"""Queries benchmark: filters on logs, dicts and collections, with and without field indexes,
beside raw sqlite3.

    python bench/bench_queries.py                  # 1M log entries, 100k dict values, 100k docs
    python bench/bench_queries.py --quick          # 100k / 20k / 20k, a smoke run
    python bench/bench_queries.py --only collections
    python bench/bench_queries.py --clock wall     # elapsed time instead of this thread's CPU

beaver's ``log.range(where=...)``, ``dict.find(where=...)`` and ``collection.find(where=...)``
run on a file of their own; the floor is plain ``sqlite3`` on a second file holding the same
rows in a table of their own (one structure, so no name column), queried with
``json_extract`` and an expression index on the same field, rows decoded with ``json.loads``
(beaver also turns log timestamps into aware datetimes, returns documents with their
embeddings joined, and checks JSON types: a number never equals a string, ``true`` is not
``1``). Filtered vector search is in bench_vector.py.
Latencies are medians over repeated calls, beaver and raw alternating. Results go to stdout
and, for full-size runs, to bench/results/queries.md. No thresholds are asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import beaver  # noqa: E402  (the beaver.py of this checkout)

CLOCK = time.thread_time     # --clock wall: time.perf_counter


def timed(fn):
    start = CLOCK()
    result = fn()
    return (CLOCK() - start) * 1000, result


def paired(beaver_fn, raw_fn, runs):
    """Median ms of each function over ``runs`` calls, alternating which goes first."""
    ours, theirs, results = [], [], None
    for n in range(runs):
        pair = [(beaver_fn, ours), (raw_fn, theirs)]
        for fn, times in (pair if n % 2 == 0 else pair[::-1]):
            ms, result = timed(fn)
            times.append(ms)
            if fn is beaver_fn:
                results = result
    return statistics.median(ours), statistics.median(theirs), results


def raw_database(path):
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def decoded(cursor):
    """The raw floor's rows with their JSON (the last column) decoded."""
    return [(key, json.loads(text)) for key, text in cursor]


def raw_table(folder, create, insert, rows):
    """The floor's file: one table made by ``create``, filled with ``rows`` (each a tuple
    whose last item is stored as JSON) in one transaction."""
    raw = raw_database(os.path.join(folder, "raw.db"))
    raw.execute(create)
    with raw:
        raw.execute("BEGIN")
        raw.executemany(insert, ((*row[:-1], json.dumps(row[-1], separators=(",", ":")))
                                 for row in rows))
    return raw


class Report:
    def __init__(self):
        self.rows = []

    def pair(self, what, ours, theirs, note=""):
        self.rows.append((what, f"{ours:.3f} ms", f"{theirs:.3f} ms", f"{ours / theirs:.2f}x",
                          note))
        print(f"  {what:<62} beaver {ours:9.3f} ms   raw {theirs:9.3f} ms   "
              f"{ours / theirs:5.2f}x  {note}", flush=True)

    def one(self, what, value, note=""):
        self.rows.append((what, value, "", "", note))
        print(f"  {what:<62} {value}  {note}", flush=True)

    def markdown(self, title) -> str:
        lines = [f"# {title}", "", "| what | beaver | raw sqlite3 | ratio | note |",
                 "|---|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


# -- logs ---------------------------------------------------------------------------------------

def log_rows(n, rng):
    """Request logs: 0.1 % have status 500, one per 10 ms."""
    t0 = 1_700_000_000.0
    for i in range(n):
        status = 500 if rng.random() < 0.001 else rng.choice((200, 200, 200, 301, 404))
        yield t0 + i * 0.01, {"status": status, "user": f"u{rng.randrange(10_000)}",
                              "ms": rng.randrange(1, 2000), "path": f"/api/v{i % 3}/items"}


def bench_logs(folder, n, runs, report):
    rng = random.Random(7)
    rows = list(log_rows(n, rng))
    db = beaver.BeaverDB(os.path.join(folder, "beaver.db"))
    logs = db.log("requests")
    start = time.perf_counter()
    for at in range(0, n, 10_000):
        with db.transaction():
            for when, data in rows[at:at + 10_000]:
                logs.log(data, timestamp=when)
    report.one(f"log: {n:,} entries logged, 10k per transaction",
               f"{n / (time.perf_counter() - start):,.0f} entries/s")
    raw = raw_table(folder, "CREATE TABLE logs (seq INTEGER PRIMARY KEY, timestamp REAL NOT "
                    "NULL, data TEXT NOT NULL)",
                    "INSERT INTO logs (timestamp, data) VALUES (?, ?)", rows)
    errors = sum(1 for _, d in rows if d["status"] == 500)
    where = {"status": 500}
    raw_sql = ("SELECT timestamp, data FROM logs WHERE json_extract(data, '$.status') = 500 "
               "ORDER BY timestamp, seq")
    raw_last = raw_sql.replace("timestamp, seq", "timestamp DESC, seq DESC") + " LIMIT 10"
    t_lo, t_hi = rows[n // 2][0], rows[n // 2 + n // 100][0]
    raw_window = raw_sql.replace("WHERE", "WHERE timestamp BETWEEN ? AND ? AND")


    scans = max(3, runs // 20)
    ours, theirs, got = paired(lambda: logs.range(where=where),
                               lambda: decoded(raw.execute(raw_sql)), scans)
    assert len(got) == errors
    report.pair(f"log.range(where=status 500), {errors:,} of {n:,}, no index (scan)",
                ours, theirs)
    start = time.perf_counter()
    logs.create_index("status")
    report.one("log.create_index('status')", f"{time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    raw.execute("CREATE INDEX logs_status ON logs (json_extract(data, '$.status'), timestamp)")
    report.one("raw CREATE INDEX on json_extract(data, '$.status'), timestamp",
               f"{time.perf_counter() - start:.2f} s")
    assert logs.explain(where=where)["index"] == "status"
    ours, theirs, got = paired(lambda: logs.range(where=where),
                               lambda: decoded(raw.execute(raw_sql)), runs)
    assert len(got) == errors
    report.pair(f"log.range(where=status 500), {errors:,} rows, indexed", ours, theirs)
    ours, theirs, got = paired(lambda: logs.range(where=where, order="desc", limit=10),
                               lambda: decoded(raw.execute(raw_last)), runs)
    report.pair("the last 10 of them: order='desc', limit=10, indexed", ours, theirs)
    ours, theirs, got = paired(lambda: logs.range(t_lo, t_hi, where=where),
                               lambda: decoded(raw.execute(raw_window, (t_lo, t_hi))), runs)
    report.pair(f"in a 1 % time window ({len(got)} rows), indexed", ours, theirs)
    db.close()
    raw.close()


# -- dicts --------------------------------------------------------------------------------------

def dict_values(n, rng):
    """Profiles: 1,000 cities (a city holds ~0.1 % of the values), ages, scores, tags."""
    for i in range(n):
        yield f"user-{i:07d}", {"name": f"User {i}", "city": f"c{rng.randrange(1000)}",
                                "age": rng.randrange(18, 90), "score": rng.random(),
                                "tags": rng.sample(["a", "b", "c", "d", "e"], 2)}


def bench_dicts(folder, n, runs, report):
    rng = random.Random(11)
    items = list(dict_values(n, rng))
    db = beaver.BeaverDB(os.path.join(folder, "beaver.db"))
    users = db.dict("users")
    with db.transaction():
        for key, value in items:
            users[key] = value
    raw = raw_table(folder, "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) "
                    "WITHOUT ROWID", "INSERT INTO kv VALUES (?, ?)", items)
    city = {"city": "c42"}
    top = {"score": {"$gte": 0.999}}
    expected = sum(1 for _, v in items if v["city"] == "c42")
    raw_city = ("SELECT key, value FROM kv WHERE json_extract(value, '$.city') = 'c42' "
                "ORDER BY key")
    raw_top = ("SELECT key, value FROM kv INDEXED BY kv_score "     # (it would sort by key
               "WHERE json_extract(value, '$.score') >= 0.999 ORDER BY key")  # with a scan)


    scans = max(5, runs // 10)
    ours, theirs, got = paired(lambda: users.find(city), lambda: decoded(raw.execute(raw_city)),
                               scans)
    assert len(got) == expected
    report.pair(f"dict.find(city), {expected} of {n:,} values, no index (scan)", ours, theirs)
    for path in ("city", "score"):
        start = time.perf_counter()
        users.create_index(path)
        report.one(f"dict.create_index({path!r})", f"{(time.perf_counter() - start) * 1000:.0f} ms")
        raw.execute(f"CREATE INDEX kv_{path} ON kv (json_extract(value, '$.{path}'))")
    assert users.explain(where=city)["index"] == "city"
    ours, theirs, got = paired(lambda: users.find(city), lambda: decoded(raw.execute(raw_city)),
                               runs)
    assert len(got) == expected
    report.pair(f"dict.find(city), {expected} rows, indexed", ours, theirs, "target <= 1.5x")
    ours, theirs, got = paired(lambda: users.find(top), lambda: decoded(raw.execute(raw_top)),
                               runs)
    report.pair(f"dict.find(score >= 0.999), {len(got)} rows, indexed", ours, theirs)
    ours, theirs, got = paired(
        lambda: users.find(order_by="-score", limit=10),
        lambda: decoded(raw.execute("SELECT key, value FROM kv ORDER BY "
                                   "json_extract(value, '$.score') DESC LIMIT 10")), runs)
    report.pair("dict.find(order_by='-score', limit=10), indexed", ours, theirs)
    db.close()
    raw.close()


# -- collections --------------------------------------------------------------------------------

def bench_collections(folder, n, runs, report):
    """The profiles of bench_dicts as the bodies of documents (no text, no vectors)."""
    rng = random.Random(13)
    items = list(dict_values(n, rng))
    db = beaver.BeaverDB(os.path.join(folder, "beaver.db"))
    docs = db.collection("articles")
    docs.index_many((beaver.Document(id=k, body=v) for k, v in items), fts=False)
    raw = raw_table(folder, "CREATE TABLE docs (id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL "
                    "UNIQUE, body TEXT)", "INSERT INTO docs (doc_id, body) VALUES (?, ?)", items)
    city = {"city": "c42"}
    expected = sum(1 for _, v in items if v["city"] == "c42")
    raw_city = ("SELECT doc_id, body FROM docs WHERE json_extract(body, '$.city') = 'c42' "
                "ORDER BY doc_id")


    scans = max(5, runs // 10)
    ours, theirs, got = paired(lambda: docs.find(city), lambda: decoded(raw.execute(raw_city)),
                               scans)
    assert len(got) == expected
    report.pair(f"collection.find(city), {expected} of {n:,} documents, no index (scan)",
                ours, theirs)
    start = time.perf_counter()
    docs.create_index("city")
    report.one("collection.create_index('city')",
               f"{(time.perf_counter() - start) * 1000:.0f} ms")
    raw.execute("CREATE INDEX docs_city ON docs (json_extract(body, '$.city'))")
    assert docs.explain(where=city)["index"] == "city"
    ours, theirs, got = paired(lambda: docs.find(city), lambda: decoded(raw.execute(raw_city)),
                               runs)
    assert len(got) == expected
    report.pair(f"collection.find(city), {expected} documents, indexed", ours, theirs,
                "target <= 1.5x")
    ours, theirs, got = paired(
        lambda: docs.count(city),
        lambda: raw.execute("SELECT count(*) FROM docs WHERE json_extract(body, '$.city') = "
                            "'c42'").fetchone()[0], runs)
    assert got == expected
    report.pair(f"collection.count(city), indexed", ours, theirs)
    db.close()
    raw.close()


def main(argv=None):
    global CLOCK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-entries", type=int, default=1_000_000)
    parser.add_argument("--dict-values", type=int, default=100_000)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=200, help="timed calls per indexed query")
    parser.add_argument("--quick", action="store_true",
                        help="100k entries, 20k values, 20k documents")
    parser.add_argument("--only", choices=["dicts", "logs", "collections"],
                        help="run one part (results are then only printed)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.log_entries, args.dict_values, args.documents, args.runs = (100_000, 20_000,
                                                                          20_000, 40)
    if args.clock == "wall":
        CLOCK = time.perf_counter
    report = Report()
    parts = {"dicts": (bench_dicts, args.dict_values), "logs": (bench_logs, args.log_entries),
             "collections": (bench_collections, args.documents)}
    for name, (bench, size) in parts.items():
        if args.only not in (None, name):
            continue
        folder = tempfile.mkdtemp(prefix="beaver-bench-queries-")
        try:
            bench(folder, size, args.runs, report)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    clock = "this thread's CPU time" if args.clock == "cpu" else "wall clock"
    text = report.markdown(
        f"Queries benchmark ({args.log_entries:,} log entries, {args.dict_values:,} dict "
        f"values, {args.documents:,} documents; SQLite {sqlite3.sqlite_version}, Python "
        f"{sys.version.split()[0]})")
    text += (f"\nMedians of {args.runs} calls per indexed query ({clock}), beaver and raw "
             "alternating. `python bench/bench_queries.py"
             f"{' --clock wall' if args.clock == 'wall' else ''}`.\n")
    print(text)
    if not args.quick and args.only is None:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "queries.md"), "w") as fp:
            fp.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
