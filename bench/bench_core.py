"""Core benchmark: beaver's dicts, lists and queues beside raw sqlite3 and the usual peers.

    python bench/bench_core.py            # full run (a few minutes on 2 cores)
    python bench/bench_core.py --quick    # small sizes, a smoke run

Every workload runs against each contender in the same process, one after the other, on
files in one temporary folder. Each figure is the best of ``--repeat`` timed rounds (the
machine may be shared, and the best round is the one least disturbed by neighbours).
The floor is plain ``sqlite3``: WAL, synchronous=NORMAL, autocommit, one prepared statement
per operation, values stored as JSON text like beaver stores them. Peers keep their own
defaults (diskcache, sqlitedict and persist-queue pickle; sqlitedict is switched to WAL).
Results go to stdout and to bench/results/core.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import beaver  # noqa: E402  (the beaver.py of this checkout)

FLOOR = "sqlite3 (floor)"
CLOCK = time.perf_counter   # --clock cpu: time.process_time (this process's CPU, all threads)


def value_for(i):
    """A small JSON document, the typical dict/queue payload."""
    return {"id": i, "name": f"user-{i}", "tags": ["a", "b"], "score": i * 0.5}


def optional(module):
    try:
        return __import__(module)
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------

class Results:
    """Rows of the final tables: (section, workload, contender, ops/s, note)."""

    def __init__(self):
        self.rows = []
        self.notes = []

    def add(self, section, workload, who, ops, seconds, note=""):
        rate = ops / seconds if seconds > 0 else float("inf")
        self.rows.append((section, workload, who, rate, note))
        print(f"  {workload:<34} {who:<28} {rate:>12,.0f} ops/s  {1e6 / rate:8.2f} us/op {note}",
              flush=True)

    def floor_of(self, section, workload):
        for s, w, who, rate, _ in self.rows:
            if s == section and w == workload and who == FLOOR:
                return rate
        return None


def race(entries, repeat):
    """Best time of each phase of each contender, rounds interleaved across contenders.

    ``entries`` is ``[(who, [phase_fn, ...]), ...]``; interleaving spreads the noise of a
    shared machine over every contender instead of whichever happened to run last.
    """
    best = {who: [float("inf")] * len(phases) for who, phases in entries}
    for _ in range(repeat):
        for who, phases in entries:
            for i, phase in enumerate(phases):
                start = CLOCK()
                phase()
                best[who][i] = min(best[who][i], CLOCK() - start)
    return best


def raw_connect(path):
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           cached_statements=256)
    conn.execute("PRAGMA journal_mode = WAL").fetchone()
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


# ------------------------------------------------------------------------------------------
# Dict contenders: each returns (get, set, bulk(items), close)
# ------------------------------------------------------------------------------------------

def dict_floor(folder):
    conn = raw_connect(os.path.join(folder, "floor-dict.db"))
    conn.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) "
                 "WITHOUT ROWID")
    execute, loads, dumps = conn.execute, json.loads, json.dumps
    get_sql = "SELECT value FROM kv WHERE key = ?"
    set_sql = ("INSERT INTO kv (key, value) VALUES (?, ?) "
               "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

    def get(key):
        return loads(execute(get_sql, (key,)).fetchone()[0])

    def set_(key, value):
        execute(set_sql, (key, dumps(value)))

    def bulk(items):
        execute("BEGIN IMMEDIATE")
        for key, value in items:
            execute(set_sql, (key, dumps(value)))
        execute("COMMIT")

    return get, set_, bulk, conn.close


def dict_beaver(folder):
    db = beaver.BeaverDB(os.path.join(folder, "beaver-dict.db"))
    d = db.dict("bench")

    def bulk(items):
        with db.transaction():
            for key, value in items:
                d[key] = value

    return d.__getitem__, d.__setitem__, bulk, db.close


def dict_diskcache(folder):
    diskcache = optional("diskcache")
    if diskcache is None:
        return None
    cache = diskcache.Cache(os.path.join(folder, "diskcache"))

    def bulk(items):
        with cache.transact():
            for key, value in items:
                cache[key] = value

    return cache.__getitem__, cache.__setitem__, bulk, cache.close


def dict_sqlitedict(folder):
    sqlitedict = optional("sqlitedict")
    if sqlitedict is None:
        return None
    path = os.path.join(folder, "sqlitedict.db")
    d = sqlitedict.SqliteDict(path, autocommit=True, journal_mode="WAL")
    batch = sqlitedict.SqliteDict(path, autocommit=False, journal_mode="WAL")

    def bulk(items):
        for key, value in items:
            batch[key] = value
        batch.commit()

    def close():
        batch.close()
        d.close()

    return d.__getitem__, d.__setitem__, bulk, close


DICT_CONTENDERS = [(FLOOR, dict_floor), ("beaver", dict_beaver), ("diskcache", dict_diskcache),
                   ("sqlitedict", dict_sqlitedict)]


def bench_dicts(results, folder, n_keys, n_ops, n_bulk, repeat):
    print("dict", flush=True)
    rng = random.Random(1)
    keys = [f"key-{i:06d}" for i in range(n_keys)]
    values = [value_for(i) for i in range(n_keys)]
    picks = [rng.randrange(n_keys) for _ in range(n_ops)]
    get_keys = [keys[i] for i in picks]
    set_items = [(keys[i], values[i]) for i in picks]
    bulk_items = [(f"bulk-{i:07d}", values[i % n_keys]) for i in range(n_bulk)]
    small_items = [(f"small-{i:07d}", i) for i in range(n_bulk)]
    entries, closers = [], []
    for who, factory in DICT_CONTENDERS:
        made = factory(folder)
        if made is None:
            print(f"  {who}: not installed")
            continue
        get, set_, bulk, close = made
        bulk(list(zip(keys, values)))
        closers.append(close)
        entries.append((who, phases_of_dict(get, set_, bulk, get_keys, set_items, bulk_items)
                                + [lambda bulk=bulk: bulk(small_items)]))
    best = race(entries, repeat)
    for phase, (workload, ops, note) in enumerate([
            ("get (random key)", n_ops, ""), ("set (autocommit)", n_ops, ""),
            ("set in one transaction", n_bulk, "items/s"),
            ("set in one transaction, int values", n_bulk, "items/s")]):
        for who, _ in entries:
            results.add("dict", workload, who, ops, best[who][phase], note)
    for close in closers:
        close()


def phases_of_dict(get, set_, bulk, get_keys, set_items, bulk_items):
    def gets():
        for key in get_keys:
            get(key)

    def sets():
        for key, value in set_items:
            set_(key, value)

    return [gets, sets, lambda: bulk(bulk_items)]


# ------------------------------------------------------------------------------------------
# Lists: beaver against the same dense-position layout written directly
# ------------------------------------------------------------------------------------------

class FloorList:
    """The layout beaver uses (name, dense pos) with one statement per operation."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS l (name TEXT NOT NULL, pos INTEGER NOT NULL, "
              "value TEXT NOT NULL, PRIMARY KEY (name, pos)) WITHOUT ROWID")
    PUSH = ("INSERT INTO l (name, pos, value) VALUES "
            "(?1, coalesce((SELECT max(pos) FROM l WHERE name = ?1) + 1, 0), ?2)")
    POP = ("DELETE FROM l WHERE name = ?1 AND pos = (SELECT max(pos) FROM l WHERE name = ?1) "
           "RETURNING value")
    INDEX = ("SELECT value FROM l WHERE name = ?1 "
             "AND pos = (SELECT min(pos) FROM l WHERE name = ?1) + ?2")

    def __init__(self, path):
        self.conn = raw_connect(path)
        self.conn.execute(self.SCHEMA)
        self.execute = self.conn.execute

    def extend(self, values):
        self.execute("BEGIN IMMEDIATE")
        self.conn.executemany("INSERT INTO l VALUES ('bench', ?, ?)",
                              ((i, json.dumps(v)) for i, v in enumerate(values)))
        self.execute("COMMIT")

    def push(self, value):
        self.execute(self.PUSH, ("bench", json.dumps(value)))

    def pop(self):
        return json.loads(self.execute(self.POP, ("bench",)).fetchone()[0])

    def __getitem__(self, i):
        return json.loads(self.execute(self.INDEX, ("bench", i)).fetchone()[0])

    def close(self):
        self.conn.close()


def open_list(who, path):
    if who == FLOOR:
        lst = FloorList(path)
        return lst, lst.close
    db = beaver.BeaverDB(path)
    return db.list("bench"), db.close


def phases_of_list(lst, item, indices, n_ops):
    def pushes():
        for _ in range(n_ops):
            lst.push(item)

    def pops():
        for _ in range(n_ops):
            lst.pop()

    def index():
        for i in indices:
            lst[i]

    return [pushes, pops, index]


def bench_lists(results, folder, sizes, n_ops, repeat):
    print("list (pops follow pushes, so the size stays put)", flush=True)
    rng = random.Random(2)
    item = value_for(7)
    flat = {}
    for size in sizes:
        values = [value_for(i) for i in range(size)]
        indices = [rng.randrange(size) for _ in range(n_ops)]
        entries, closers, paths = [], [], []
        for who in (FLOOR, "beaver"):
            path = os.path.join(folder, f"list-{who[:6]}-{size}.db")
            lst, close = open_list(who, path)
            lst.extend(values)
            entries.append((who, phases_of_list(lst, item, indices, n_ops)))
            closers.append(close)
            paths.append(path)
        del values
        best = race(entries, repeat)
        for phase, workload in enumerate(["push", "pop", "l[i] random"]):
            for who, _ in entries:
                results.add("list", f"{workload} @{size:,}", who, n_ops, best[who][phase])
        for who, _ in entries:
            flat.setdefault(who, []).append((size, best[who][2] / n_ops))
        for close, path in zip(closers, paths):
            close()
            os.remove(path)
    for who, points in flat.items():
        (s0, t0), (s1, t1) = points[0], points[-1]
        results.notes.append(f"`l[i]` flatness, {who}: {t0 * 1e6:.2f} us at {s0:,} items, "
                             f"{t1 * 1e6:.2f} us at {s1:,} items ({t1 / t0:.2f}x).")


# ------------------------------------------------------------------------------------------
# Queues: each contender returns (put, get, close)
# ------------------------------------------------------------------------------------------

def queue_floor(folder):
    conn = raw_connect(os.path.join(folder, "floor-queue.db"))
    conn.execute("CREATE TABLE IF NOT EXISTS q (seq INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "priority NUMERIC NOT NULL, timestamp REAL NOT NULL, data TEXT NOT NULL)")
    conn.execute("CREATE INDEX IF NOT EXISTS q_order ON q (name, priority, seq)")
    execute, dumps, loads, now = conn.execute, json.dumps, json.loads, time.time
    put_sql = "INSERT INTO q (name, priority, timestamp, data) VALUES (?, ?, ?, ?)"
    get_sql = ("DELETE FROM q WHERE seq = (SELECT seq FROM q WHERE name = ?1 "
               "ORDER BY priority, seq LIMIT 1) RETURNING priority, timestamp, data")

    def put(value):
        execute(put_sql, ("bench", 0, now(), dumps(value)))

    def get():
        row = execute(get_sql, ("bench",)).fetchone()
        return row[0], row[1], loads(row[2])

    return put, get, conn.close


def queue_beaver(folder):
    db = beaver.BeaverDB(os.path.join(folder, "beaver-queue.db"))
    q = db.queue("bench")
    return q.put, lambda: q.get(block=False), db.close


def queue_persist_sqlite(folder):
    persistqueue = optional("persistqueue")
    if persistqueue is None:
        return None
    q = persistqueue.SQLiteQueue(os.path.join(folder, "pq-sqlite"), auto_commit=True,
                                 multithreading=True)
    return q.put, lambda: q.get(block=False), lambda: None


def queue_persist_ack(folder):
    persistqueue = optional("persistqueue")
    if persistqueue is None:
        return None
    q = persistqueue.SQLiteAckQueue(os.path.join(folder, "pq-ack"), auto_commit=True,
                                    multithreading=True)

    def get():
        item = q.get(block=False)
        q.ack(item)
        return item

    return q.put, get, lambda: None


def queue_persist_file(folder):
    persistqueue = optional("persistqueue")
    if persistqueue is None:
        return None
    q = persistqueue.Queue(os.path.join(folder, "pq-file"), autosave=True)

    def get():
        item = q.get(block=False)
        q.task_done()
        return item

    return q.put, get, lambda: None


def queue_litequeue(folder):
    litequeue = optional("litequeue")
    if litequeue is None:
        return None
    q = litequeue.LiteQueue(os.path.join(folder, "litequeue.db"))
    dumps = json.dumps

    def put(value):
        q.put(dumps(value))

    def get():
        message = q.pop()
        q.done(message.message_id)
        return json.loads(message.data)

    return put, get, q.close


QUEUE_CONTENDERS = [
    (FLOOR, queue_floor), ("beaver", queue_beaver),
    ("persist-queue SQLiteQueue", queue_persist_sqlite),
    ("persist-queue SQLiteAckQueue", queue_persist_ack),
    ("persist-queue Queue (file)", queue_persist_file),
    ("litequeue", queue_litequeue),
]


def bench_queues(results, folder, n_ops, repeat):
    print("queue (get = take one item and acknowledge it where the library separates them)",
          flush=True)
    items = [value_for(i) for i in range(n_ops)]
    entries, closers = [], []
    for who, factory in QUEUE_CONTENDERS:
        made = factory(folder)
        if made is None:
            print(f"  {who}: not installed")
            continue
        put, get, close = made
        entries.append((who, phases_of_queue(put, get, items)))
        closers.append(close)
    best = race(entries, repeat)
    for phase, workload in enumerate(["put", "get"]):
        for who, _ in entries:
            results.add("queue", workload, who, n_ops, best[who][phase])
    for close in closers:
        close()


def phases_of_queue(put, get, items):
    def puts():
        for value in items:
            put(value)

    def gets():
        for _ in items:
            get()

    return [puts, gets]


# ------------------------------------------------------------------------------------------
# Import time
# ------------------------------------------------------------------------------------------

def bench_import(results, rounds):
    """``python -X importtime -c 'import beaver'`` with cached bytecode; best of ``rounds``."""
    print("import", flush=True)
    cache = tempfile.mkdtemp(prefix="beaver-pycache-")
    env = dict(os.environ, PYTHONPYCACHEPREFIX=cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import beaver"
    best = float("inf")
    try:
        for _ in range(rounds + 1):    # the first run writes the bytecode cache
            out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env,
                                 capture_output=True, text=True, check=True).stderr
            line = [x for x in out.splitlines() if x.rstrip().endswith("| beaver")][-1]
            best = min(best, int(line.split("|")[1]) / 1e6)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    results.add("import", "import beaver (cached .pyc)", "beaver", 1, best,
                f"= {best * 1e3:.1f} ms")


# ------------------------------------------------------------------------------------------
# Eight writer processes on one dict and one queue
# ------------------------------------------------------------------------------------------

def _is_locked(error) -> bool:
    return "locked" in str(error) or isinstance(error, beaver.DatabaseBusy)


def _open_shared(who, path):
    """(dict_set, queue_put, queue_get -> item or None, close) for one worker process."""
    if who == "beaver":
        db = beaver.BeaverDB(path)
        d, q = db.dict("shared"), db.queue("shared")

        def get():
            try:
                return q.get(block=False).data
            except beaver.QueueEmpty:
                return None

        return d.__setitem__, q.put, get, db.close
    conn = raw_connect(path)
    floor_put, floor_get, _ = queue_floor_on(conn)
    set_sql = ("INSERT INTO kv (key, value) VALUES (?, ?) "
               "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    return (lambda k, v: conn.execute(set_sql, (k, json.dumps(v))), floor_put, floor_get,
            conn.close)


def queue_floor_on(conn):
    """The floor's dict and queue for the writer processes: the tables of queue_floor."""
    conn.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) "
                 "WITHOUT ROWID")
    conn.execute("CREATE TABLE IF NOT EXISTS q (seq INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "priority NUMERIC NOT NULL, timestamp REAL NOT NULL, data TEXT NOT NULL)")
    conn.execute("CREATE INDEX IF NOT EXISTS q_order ON q (name, priority, seq)")
    put_sql = "INSERT INTO q (name, priority, timestamp, data) VALUES (?, ?, ?, ?)"
    get_sql = ("DELETE FROM q WHERE seq = (SELECT seq FROM q WHERE name = ?1 "
               "ORDER BY priority, seq LIMIT 1) RETURNING data")

    def put(value):
        conn.execute(put_sql, ("shared", 0, time.time(), json.dumps(value)))

    def get():
        row = conn.execute(get_sql, ("shared",)).fetchone()
        return None if row is None else json.loads(row[0])

    return put, get, conn.close


def writer(who, path, wid, n_ops, barrier):
    """One of the eight processes: n_ops rounds of dict set + queue put + queue get."""
    set_, put, get, close = _open_shared(who, path)
    locked = other = 0
    put_ok, got = [], []
    barrier.wait(timeout=60)
    start = time.perf_counter()
    for i in range(n_ops):
        for step in range(3):
            try:
                if step == 0:
                    set_(f"k{i % 100}", {"w": wid, "i": i})
                elif step == 1:
                    put([wid, i])
                    put_ok.append((wid, i))
                else:
                    item = get()
                    if item is not None:
                        got.append(tuple(item))
            except Exception as e:       # counted, not hidden: this is what we measure
                if _is_locked(e):
                    locked += 1
                else:
                    other += 1
    elapsed = time.perf_counter() - start
    close()
    return locked, other, put_ok, got, elapsed


def bench_writers(results, folder, n_procs, n_ops):
    print(f"{n_procs} writer processes", flush=True)
    ctx = multiprocessing.get_context("spawn")
    for who in (FLOOR, "beaver"):
        path = os.path.join(folder, f"writers-{who[:6]}.db")
        set_, put, get, close = _open_shared(who, path)   # create the schema once
        close()
        with ctx.Manager() as manager:
            barrier = manager.Barrier(n_procs)
            with ctx.Pool(n_procs) as pool:
                outs = pool.starmap(writer, [(who, path, w, n_ops, barrier)
                                             for w in range(n_procs)])
        set_, put, get, close = _open_shared(who, path)
        rest = []
        while (item := get()) is not None:
            rest.append(tuple(item))
        close()
        locked = sum(o[0] for o in outs)
        other = sum(o[1] for o in outs)
        acked = [x for o in outs for x in o[2]]
        delivered = [x for o in outs for x in o[3]] + rest
        lost = len(set(acked) - set(delivered))
        duplicated = len(delivered) - len(set(delivered))
        wall = max(o[4] for o in outs)
        results.add("writers", f"{n_procs} procs: set+put+get", who, 3 * n_ops * n_procs, wall,
                    f"locked errors {locked}, other errors {other}, lost {lost}, "
                    f"duplicated {duplicated}")


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def machine():
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    versions = []
    for name in ("diskcache", "sqlitedict", "persistqueue", "litequeue"):
        module = optional(name)
        if module is not None:
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
    return (f"nproc {os.cpu_count()}, {platform.machine()}, Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, beaver {beaver.__version__}; "
            f"{', '.join(versions)}; load average at start {load[0]:.2f}")


def table(results):
    lines = ["| section | workload | contender | ops/s | µs/op | vs floor | note |",
             "|---|---|---|---:|---:|---:|---|"]
    for section, workload, who, rate, note in results.rows:
        floor = results.floor_of(section, workload)
        ratio = f"{rate / floor:.2f}x" if floor else ""
        lines.append(f"| {section} | {workload} | {who} | {rate:,.0f} | {1e6 / rate:.2f} | "
                     f"{ratio} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default="dict,list,queue,import,writers",
                        help="comma-separated sections to run")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per figure")
    parser.add_argument("--no-peers", action="store_true",
                        help="only the floor and beaver (e.g. to compare two beaver versions)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time single-process workloads by this process's CPU time, "
                             "steadier when other jobs share the machine")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "core.md"))
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    global CLOCK, DICT_CONTENDERS, QUEUE_CONTENDERS
    if args.no_peers:
        DICT_CONTENDERS, QUEUE_CONTENDERS = DICT_CONTENDERS[:2], QUEUE_CONTENDERS[:2]
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        n_keys, n_ops, n_bulk, sizes, n_writer_ops = 10_000, 2_000, 20_000, [1_000, 10_000], 300
    else:
        n_keys, n_ops, n_bulk = 10_000, 20_000, 200_000
        sizes, n_writer_ops = [1_000, 10_000, 100_000, 1_000_000], 2_000
    started = machine()
    print(started, flush=True)
    results = Results()
    folder = tempfile.mkdtemp(prefix="beaver-bench-")
    try:
        if "dict" in only:
            bench_dicts(results, folder, n_keys, n_ops, n_bulk, args.repeat)
        if "list" in only:
            bench_lists(results, folder, sizes, n_ops // 2, args.repeat)
        if "queue" in only:
            bench_queues(results, folder, n_ops // 2, args.repeat)
        if "import" in only:
            bench_import(results, 5)
        if "writers" in only:
            bench_writers(results, folder, 8, n_writer_ops)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else "?"
    report = "\n".join([
        "# beaver core benchmark" + (" (--quick)" if args.quick else ""), "",
        f"Machine: {started}; at end {load_end:.2f}.", "",
        "Floor: raw `sqlite3`, WAL, synchronous=NORMAL, autocommit, one prepared statement "
        "per op, values stored as JSON text like beaver does. Peers use their defaults "
        "(diskcache/sqlitedict/persist-queue pickle values; sqlitedict runs in WAL). Each "
        f"figure is the best of {args.repeat} rounds, rounds interleaved across contenders; "
        "with a load average above the core count the figures are noisy (other processes "
        "share the machine). Clock: "
        + ("CPU time of the benchmark process (`--clock cpu`; no fsync waits are counted, "
           "which flatters peers that fsync: persist-queue)" if args.clock == "cpu"
           else "wall time") + "; the 8-writer figures are always wall time. "
        "litequeue keeps done messages until `prune()`, so its `get` slows as rounds add "
        "rows. beaver reads its file through mmap (`PRAGMA mmap_size`, 256 MiB) while the "
        "floor keeps SQLite's defaults: part of why beaver's list reads beat it at 100k-1M "
        "items.", "",
        table(results), "",
        *[f"- {note}" for note in results.notes],
    ])
    print()
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fp:
            fp.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
