"""PostgreSQL benchmark: beaver on PostgreSQL beside raw psycopg 3 (the floor), and beaver on
SQLite for reference, on this machine, in one run.

    python bench/bench_postgres.py                 # about a minute on 2 cores
    python bench/bench_postgres.py --quick         # fewer operations, a smoke run
    python bench/bench_postgres.py --url postgresql://postgres@127.0.0.1:5432/test

The floor is plain psycopg 3 on the server at ``--url``: autocommit, one prepared statement
per operation (``prepare=True``), values stored as JSON text like beaver stores them, in a
schema of its own (``beaver_bench_floor_<pid>``) dropped at the end:

- dict get / set: a key/value table, ``SELECT`` and ``INSERT ... ON CONFLICT DO UPDATE``;
- queue put / get: ``INSERT``, and ``DELETE ... WHERE seq = (SELECT ... FOR UPDATE SKIP
  LOCKED LIMIT 1) RETURNING``;
- full-text match: a ``tsvector`` column (the ``simple`` configuration: no stemming, like
  beaver's FTS5 tokenizer) with a GIN index over the Debian package descriptions (the corpus
  of bench_collections.py, 50,000 packages), top 10 by ``ts_rank``;
- wake-up: a queue hand-off between two processes, the consumer blocked in ``LISTEN`` and
  woken by the producer's ``pg_notify`` sent with the item (one statement), which it then
  takes; and a channel, the subscriber woken the same way reading the rows past its last one.

The beaver column opens ``BeaverDB(url)`` (with ``search_path`` set to a schema of its own in
the URL's ``options``, dropped at the end) and runs the same operations through the public
API; until the PostgreSQL backend exists it prints "backend not available" instead. The
SQLite column is beaver on a file in a temporary folder. Throughput figures are the best of
``--repeat`` interleaved rounds (the wake-up samples are taken in as many turns); latencies
are wall-clock percentiles (the work happens in the server process, so this thread's CPU
time would miss it). Results go to stdout and to bench/results/postgres.md.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import beaver  # noqa: E402  (the beaver.py of this checkout)

SPAWN = multiprocessing.get_context("spawn")
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEADLINE = 60.0
UNAVAILABLE = "backend not available"
LAZY = "floor, synchronous_commit=off"


def value_for(i):
    """A small JSON document, the typical dict/queue payload (as bench_core.py)."""
    return {"id": i, "name": f"user-{i}", "tags": ["a", "b"], "score": i * 0.5}


def percentile(samples, q):
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(q * len(samples)))] * 1000


def in_schema(url, schema) -> str:
    """``url`` with libpq's ``options`` setting ``search_path`` to ``schema``."""
    return url + ("&" if "?" in url else "?") + "options=" + quote(f"-csearch_path={schema}")


# ------------------------------------------------------------------------------------------
# Contenders: each opens with (url or folder) and offers the same operations
# ------------------------------------------------------------------------------------------

class Floor:
    """Raw psycopg 3: autocommit, one prepared statement per operation."""

    name = "raw psycopg (floor)"
    GET = "SELECT value FROM kv WHERE key = %s"
    SET = ("INSERT INTO kv (key, value) VALUES (%s, %s) "
           "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    PUT = "INSERT INTO q (priority, ts, data) VALUES (0, %s, %s)"
    TAKE = ("DELETE FROM q WHERE seq = (SELECT seq FROM q ORDER BY priority, seq "
            "FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING priority, ts, data")
    MATCH = ("SELECT id FROM docs, plainto_tsquery('simple', %s) query WHERE tsv @@ query "
             "ORDER BY ts_rank(tsv, query) DESC, id LIMIT 10")

    def __init__(self, url, name=None):
        import psycopg
        self.name = name or self.name
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.conn.execute("CREATE TABLE q (seq BIGSERIAL PRIMARY KEY, priority BIGINT NOT NULL, "
                          "ts DOUBLE PRECISION NOT NULL, data TEXT NOT NULL)")
        self.conn.execute("CREATE INDEX q_order ON q (priority, seq)")
        self.conn.execute("CREATE TABLE chan (seq BIGSERIAL PRIMARY KEY, data TEXT NOT NULL)")

    def get(self, key):
        return json.loads(self.conn.execute(self.GET, (key,), prepare=True).fetchone()[0])

    def set(self, key, value):
        self.conn.execute(self.SET, (key, json.dumps(value)), prepare=True)

    def put(self, value):
        self.conn.execute(self.PUT, (time.time(), json.dumps(value)), prepare=True)

    def take(self):
        return json.loads(self.conn.execute(self.TAKE, prepare=True).fetchone()[2])

    def index(self, rows):
        self.conn.execute("CREATE TABLE docs (id TEXT PRIMARY KEY, body TEXT NOT NULL, "
                          "tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED)")
        with self.conn.cursor().copy("COPY docs (id, body) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((row["id"], row["text"]))
        self.conn.execute("CREATE INDEX docs_tsv ON docs USING GIN (tsv)")
        self.conn.execute("ANALYZE docs")

    def match(self, query):
        return [row[0] for row in self.conn.execute(self.MATCH, (query,), prepare=True)]

    def close(self):
        self.conn.close()


class Beaver:
    """beaver's public API, on PostgreSQL (a URL) or SQLite (a path)."""

    def __init__(self, name, where):
        self.name, self.where = name, where
        self.db = beaver.BeaverDB(where)
        self.d, self.q = self.db.dict("bench"), self.db.queue("bench")

    def get(self, key):
        return self.d[key]

    def set(self, key, value):
        self.d[key] = value

    def put(self, value):
        self.q.put(value)

    def take(self):
        return self.q.get(block=False).data

    def index(self, rows):
        docs = self.db.collection("debian")
        for start in range(0, len(rows), 1000):
            docs.index_many((beaver.Document(id=r["id"], body={"text": r["text"]})
                             for r in rows[start:start + 1000]), fts=["text"])
        self.docs = docs

    def match(self, query):
        return [doc.id for doc, _ in self.docs.match(query, top_k=10)]

    def close(self):
        self.db.close()


def open_beaver_postgres(url):
    """beaver on PostgreSQL, or the reason it cannot run (the backend may not exist yet)."""
    try:
        return Beaver("beaver on PostgreSQL", url), None
    except (beaver.FeatureUnavailable, ValueError, ImportError, beaver.BeaverError) as e:
        return None, f"{type(e).__name__}: {str(e)[:120]}"


# ------------------------------------------------------------------------------------------
# Throughput and latency of one process
# ------------------------------------------------------------------------------------------

def race(contenders, phases, repeat):
    """Best seconds of each phase of each contender, rounds interleaved across contenders."""
    best = {c.name: {phase: float("inf") for phase in phases} for c in contenders}
    for _ in range(repeat):
        for c in contenders:
            for phase, run in phases.items():
                start = time.perf_counter()
                run(c)
                best[c.name][phase] = min(best[c.name][phase], time.perf_counter() - start)
    return best


def bench_operations(contenders, n, repeat):
    keys = [f"key-{i}" for i in range(n)]
    values = [value_for(i) for i in range(n)]
    order = random.Random(7).sample(keys, n)

    def sets(c):
        for key, value in zip(keys, values):
            c.set(key, value)

    def gets(c):
        for key in order:
            c.get(key)

    def puts(c):
        for value in values:
            c.put(value)

    def takes(c):
        for _ in range(n):
            c.take()
    phases = {"dict set": sets, "dict get": gets, "queue put": puts, "queue get": takes}
    best = race(contenders, phases, repeat)
    return {c: {phase: n / seconds for phase, seconds in by_phase.items()}
            for c, by_phase in best.items()}


def bench_match(contenders, rows, n_queries, missing):
    """p50 / p99 ms of a top-10 match for each contender, on the same queries in turn (a
    contender that cannot index says why in ``missing``)."""
    loaded = {}
    for c in list(contenders):
        start = time.perf_counter()
        try:
            c.index(rows)
        except beaver.FeatureUnavailable as e:
            missing.append(f"{c.name}, text search: {e}")
            contenders = [other for other in contenders if other is not c]
            continue
        loaded[c.name] = len(rows) / (time.perf_counter() - start)
    rng = random.Random(42)
    vocabulary = {w for r in rows for w in beaver._terms(r["text"])}
    queries = []
    for _ in range(n_queries):
        terms = [w for w in beaver._terms(rng.choice(rows)["title"]) if w in vocabulary
                 and len(w) >= 3 and w.isalpha()]
        queries.append(" ".join(rng.sample(terms, min(len(terms), rng.choice([1, 2])))) or "data")
    times = {c.name: [] for c in contenders}
    for c in contenders:                                  # warm the caches
        for query in queries[:30]:
            c.match(query)
    for i, query in enumerate(queries):
        for c in (contenders if i % 2 == 0 else contenders[::-1]):
            start = time.perf_counter()
            c.match(query)
            times[c.name].append(time.perf_counter() - start)
    return {name: (percentile(t, 0.5), percentile(t, 0.99)) for name, t in times.items()}, loaded


# ------------------------------------------------------------------------------------------
# Cross-process wake-up: a queue hand-off (module-level workers, for spawn)
# ------------------------------------------------------------------------------------------

def floor_consumer(url, n, ready, out):
    import psycopg
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("LISTEN bench_queue")
    ready.put(1)
    latencies, deadline = [], time.monotonic() + DEADLINE
    while len(latencies) < n and time.monotonic() < deadline:
        row = conn.execute(Floor.TAKE, prepare=True).fetchone()
        if row is None:
            for _ in conn.notifies(timeout=1.0, stop_after=1):
                pass
            continue
        latencies.append(time.time() - json.loads(row[2])["t"])
    out.put(latencies)
    conn.close()


def floor_producer(url, n):
    import psycopg
    conn = psycopg.connect(url, autocommit=True)
    send = ("WITH item AS (INSERT INTO q (priority, ts, data) VALUES (0, %s, %s) RETURNING seq) "
            "SELECT pg_notify('bench_queue', '') FROM item")
    for _ in range(n):
        time.sleep(random.uniform(0.0005, 0.005))     # each sample is a real wake-up
        now = time.time()
        conn.execute(send, (now, json.dumps({"t": now})), prepare=True)
    conn.close()


def floor_subscriber(url, n, ready, out):
    """The floor of a channel: on each NOTIFY, read the rows past the last one seen."""
    import psycopg
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("LISTEN bench_channel")
    last = conn.execute("SELECT coalesce(max(seq), 0) FROM chan").fetchone()[0]
    ready.put(1)
    latencies, deadline = [], time.monotonic() + DEADLINE
    while len(latencies) < n and time.monotonic() < deadline:
        for _ in conn.notifies(timeout=1.0, stop_after=1):
            pass
        for seq, data in conn.execute(FLOOR_READ, (last,), prepare=True).fetchall():
            latencies.append(time.time() - json.loads(data)["t"])
            last = seq
    out.put(latencies)
    conn.close()


FLOOR_READ = "SELECT seq, data FROM chan WHERE seq > %s ORDER BY seq"


def floor_publisher(url, n):
    import psycopg
    conn = psycopg.connect(url, autocommit=True)
    send = ("WITH message AS (INSERT INTO chan (data) VALUES (%s) RETURNING seq) "
            "SELECT pg_notify('bench_channel', '') FROM message")
    for _ in range(n):
        time.sleep(random.uniform(0.0005, 0.005))
        conn.execute(send, (json.dumps({"t": time.time()}),), prepare=True)
    conn.close()


def beaver_receiver(kind, where, n, ready, out):
    """The latencies of ``n`` items taken from queue ``wakeup`` (``kind`` "queue") or
    received from channel ``wakeup`` (a subscriber), each carrying its send time."""
    db = beaver.BeaverDB(where)
    with contextlib.ExitStack() as stack:
        if kind == "queue":
            queue = db.queue("wakeup")
            receive = lambda: queue.get(timeout=DEADLINE).data
        else:
            subscriber = stack.enter_context(db.channel("wakeup").subscribe())
            receive = lambda: subscriber.get(timeout=DEADLINE)
        ready.put(1)
        latencies = []
        with contextlib.suppress(TimeoutError):
            while len(latencies) < n:
                sent = receive()["t"]
                latencies.append(time.time() - sent)
    out.put(latencies)
    db.close()


def beaver_sender(kind, where, n):
    """``n`` queue puts (or channel publishes) of their send time, at random short gaps."""
    db = beaver.BeaverDB(where)
    send = db.queue("wakeup").put if kind == "queue" else db.channel("wakeup").publish
    for _ in range(n):
        time.sleep(random.uniform(0.0005, 0.005))
        send({"t": time.time()})
    db.close()


def hand_off(consumer, producer, where, n):
    """The latencies (s) of ``n`` hand-offs from a producer process to a consumer process."""
    ready, out = SPAWN.Queue(), SPAWN.Queue()
    receiving = SPAWN.Process(target=consumer, args=(where, n, ready, out))
    receiving.start()
    ready.get(timeout=DEADLINE)
    sending = SPAWN.Process(target=producer, args=(where, n))
    sending.start()
    latencies = out.get(timeout=DEADLINE + 10)
    for process in (sending, receiving):
        process.join(DEADLINE)
    if len(latencies) < n:
        raise RuntimeError(f"only {len(latencies)} of {n} hand-offs arrived")
    return latencies


def wake_ups(sides, n, rounds):
    """{name: ((queue p50, p99), (channel p50, p99))} in ms, ``n`` samples each, taken in
    ``rounds`` turns across the contenders so that the machine's load changes hit all alike."""
    queue = {name: [] for name, _, _ in sides}
    channel = {name: [] for name, _, _ in sides}
    for turn in range(rounds):
        size = n // rounds + (1 if turn < n % rounds else 0)
        for name, where, (consumer, producer, subscriber, publisher) in sides:
            queue[name] += hand_off(consumer, producer, where, size)
            channel[name] += hand_off(subscriber, publisher, where, size)
    p = lambda samples: (percentile(samples, 0.5), percentile(samples, 0.99))
    return {name: p(samples) for name, samples in queue.items()}, \
        {name: p(samples) for name, samples in channel.items()}


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

class Schemas:
    """Schemas of their own on the server for the floor and for beaver, dropped at the end."""

    def __init__(self, url):
        import psycopg
        self.conn = psycopg.connect(url, autocommit=True)
        self.names = []

    def new(self, label) -> str:
        name = f"beaver_bench_{label}_{os.getpid()}"
        self.conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        self.conn.execute(f"CREATE SCHEMA {name}")
        self.names.append(name)
        return name

    def drop(self):
        for name in self.names:
            self.conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        self.conn.close()


def fmt(value, unit):
    if value is None:
        return "—"
    return f"{value:,.0f}" if unit.endswith("/s") else f"{value:.3f}"


def ratio(beaver_value, floor_value, higher_is_better):
    if beaver_value is None or not floor_value:
        return "—"
    speed = beaver_value / floor_value if higher_is_better else floor_value / beaver_value
    return f"{speed:.2f}x"


def table(rows):
    lines = ["| operation | raw psycopg (floor) | floor, synchronous_commit=off | beaver on "
             "PostgreSQL | beaver vs floor | beaver on SQLite | target |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for what, unit, floor_value, lazy_value, pg_value, sqlite_value, higher, target in rows:
        pg_text = UNAVAILABLE if pg_value is None else fmt(pg_value, unit)
        lines.append(f"| {what}, {unit} | {fmt(floor_value, unit)} | {fmt(lazy_value, unit)} | "
                     f"{pg_text} | {ratio(pg_value, floor_value, higher)} | "
                     f"{fmt(sqlite_value, unit)} | {target} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BEAVER_BENCH_POSTGRES_URL", DEFAULT_URL))
    parser.add_argument("--ops", type=int, default=3000, help="operations per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (best kept)")
    parser.add_argument("--docs", type=int, default=50000, help="documents for the text search")
    parser.add_argument("--queries", type=int, default=300, help="text-search queries")
    parser.add_argument("--samples", type=int, default=600, help="wake-up hand-offs")
    parser.add_argument("--quick", action="store_true", help="a smoke run, nothing written")
    args = parser.parse_args(argv)
    if args.quick:
        args.ops, args.repeat, args.docs, args.queries, args.samples = 300, 1, 2000, 50, 50
    import psycopg
    from bench_collections import corpus
    started = time.perf_counter()
    rows = corpus()[:args.docs]
    schemas = Schemas(args.url)
    folder = tempfile.mkdtemp(prefix="beaver-bench-postgres-")
    contenders = []
    try:
        floor_url = in_schema(args.url, schemas.new("floor"))
        floor = Floor(floor_url)
        lazy_url = in_schema(args.url, schemas.new("lazy")) + quote(" -csynchronous_commit=off")
        lazy = Floor(lazy_url, name=LAZY)
        pg, pg_note = open_beaver_postgres(in_schema(args.url, schemas.new("beaver")))
        lite = Beaver("beaver on SQLite", os.path.join(folder, "bench.db"))
        contenders = [c for c in (floor, lazy, pg, lite) if c is not None]
        print(f"beaver on PostgreSQL: {pg_note or 'available'}", flush=True)
        rates = bench_operations(contenders, args.ops, args.repeat)
        print("operations done", flush=True)
        missing = [] if pg_note is None else [f"beaver on PostgreSQL did not open ({pg_note}): "
                                              "the backend is not in this checkout yet"]
        latency, loaded = bench_match([c for c in contenders if c is not lazy], rows,
                                      args.queries, missing)
        print("text search done", flush=True)
        floor_side = (floor_consumer, floor_producer, floor_subscriber, floor_publisher)
        beaver_side = tuple(functools.partial(role, kind) for kind in ("queue", "channel")
                            for role in (beaver_receiver, beaver_sender))
        sides = [(floor.name, floor_url, floor_side), (LAZY, lazy_url, floor_side),
                 (lite.name, lite.where, beaver_side)]
        if pg is not None:
            sides.append((pg.name, pg.where, beaver_side))
        wake, heard = wake_ups(sides, args.samples, args.repeat)
        print("wake-up done", flush=True)
    finally:
        for c in contenders:
            c.close()
        schemas.drop()
        shutil.rmtree(folder, ignore_errors=True)
    names = (floor.name, LAZY, "beaver on PostgreSQL", "beaver on SQLite")

    def each(by_name, key=None):
        """The figure of each contender in ``names`` order (None for one that did not run)."""
        return [None if n not in by_name else by_name[n] if key is None else by_name[n][key]
                for n in names]
    result_rows = [(phase, "ops/s", *each(rates, phase), True, ">= 0.7x the floor")
                   for phase in ("dict get", "dict set", "queue put", "queue get")]
    result_rows += [(f"text match top-10, {label}", "ms", *each(latency, i), False, "")
                    for i, label in enumerate(("p50", "p99"))]
    result_rows.append(("index the documents", "docs/s", *each(loaded), True, ""))
    result_rows += [(f"queue hand-off between two processes, {label}", "ms", *each(wake, i),
                     False, "p50 <= 2 ms" if i == 0 else "")
                    for i, label in enumerate(("p50", "p99"))]
    result_rows += [(f"channel publish to a subscriber in another process, {label}", "ms",
                     *each(heard, i), False, "p50 <= 2 ms" if i == 0 else "")
                    for i, label in enumerate(("p50", "p99"))]
    with psycopg.connect(args.url) as conn:
        server = conn.info.server_version
    with_long = sum(1 for r in rows if "\n" in r["text"])
    lines = ["# PostgreSQL benchmark (beaver)", "",
             f"{platform.platform()}, Python {sys.version.split()[0]}, PostgreSQL "
             f"{server // 10000}.{server % 10000}, psycopg {psycopg.__version__}, SQLite "
             f"{sqlite3.sqlite_version}, {os.cpu_count()} CPUs; machine shared with other "
             f"jobs (load average {os.getloadavg()[0]:.1f} at the end). "
             f"`python bench/bench_postgres.py` ({time.perf_counter() - started:.0f} s).", "",
             *table(result_rows), "",
             *[f"Not available: {reason}." for reason in missing], *([""] if missing else []),
             f"Operations: {args.ops:,} per round, best of {args.repeat} interleaved rounds, one "
             "process, one connection, the server on the same machine over TCP (127.0.0.1). "
             f"Text: {len(rows):,} Debian packages ({with_long:,} with long descriptions), "
             f"{args.queries} queries of one or two words of a package summary, contenders "
             "alternating on each query; the floor ranks with `ts_rank` over a `simple` "
             "tsvector, beaver with its own scoring, so the top 10 may legitimately differ. "
             f"Wake-up: {args.samples} items (then as many messages) in {args.repeat} turns "
             "across the contenders, the producer pausing "
             "0.5-5 ms before each, the latency from the producer's clock before the write to "
             "the consumer's after the read (the floor: LISTEN and `pg_notify` with the INSERT, "
             "then the SKIP LOCKED DELETE; for the channel, the rows past the last one read). The server runs with `synchronous_commit=on` (its default): every "
             "autocommit write waits for its WAL flush, which dominates the write and hand-off "
             "figures; the second column is the same floor with `synchronous_commit=off` for "
             "its session (a crash may lose the last commits, never corrupt: the analogue of "
             "beaver's SQLite default, synchronous=NORMAL). Compare beaver on PostgreSQL with "
             "the floor of the setting it runs with; the ratio column uses the first.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "postgres.md"), "w") as fp:
            fp.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
