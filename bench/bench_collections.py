"""Collections benchmark: beaver vs raw FTS5 / raw SQL / numpy on real Debian data.

    python bench/bench_collections.py [--docs 50000] [--queries 300]

Corpus: every Debian bookworm main amd64 package (``apt-cache dumpavail``: name, section,
summary line, Depends), with the long description from the Translation-en index when apt
has it (``../shared/data/README.md`` explains how to fetch it into a private folder; pass
``--translation FILE`` or let the script look in /var/lib/apt/lists and /tmp). Without it the
text is the summary line only. The extraction is cached under /tmp. Embeddings:
``../shared/data/debian_minilm_docs.f16.npy`` (rows in package-name order). Results go to
bench/results/collections.md. No thresholds are asserted: read the ratios.
"""
import argparse
import os

# One BLAS thread for every peer: on a shared 2-core machine threaded BLAS only adds noise.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
import glob
import json
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beaver  # noqa: E402
from beaver import BeaverDB, Document  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
CACHE = os.path.join(tempfile.gettempdir(), "beaver_bench_collections_corpus.jsonl")
TRANSLATION_GLOBS = ["/var/lib/apt/lists/*i18n_Translation-en*",
                     os.path.join(tempfile.gettempdir(), "*", "lists", "*i18n_Translation-en*")]


# -- corpus ---------------------------------------------------------------------------------

def _stanzas(text):
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line[1:]
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            yield fields


def _long_descriptions(path):
    if path is None:
        found = [p for pattern in TRANSLATION_GLOBS for p in glob.glob(pattern)]
        path = found[0] if found else None
    if path is None:
        return {}, None
    text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], capture_output=True,
                          text=True, check=True).stdout
    out = {}
    for f in _stanzas(text):
        body = f.get("Description-en", "").split("\n", 1)
        if len(body) == 2:
            out[(f["Package"], f.get("Description-md5"))] = body[1].replace("\n.\n", "\n\n")
    return out, path


def corpus(translation=None):
    """One dict per package name, sorted: id, section, title, text, depends."""
    if os.path.exists(CACHE):
        with open(CACHE) as fp:
            return [json.loads(line) for line in fp]
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True,
                          check=True).stdout
    longs, source = _long_descriptions(translation)
    print(f"long descriptions: {len(longs)} from {source}", file=sys.stderr)
    docs = {}
    for f in _stanzas(dump):
        name = f["Package"]
        if name in docs:
            continue
        title = f.get("Description", "")
        text = title + "\n" + longs.get((name, f.get("Description-md5")), "")
        depends = [re.split(r"[\s(:]", alt.strip())[0] for dep in f.get("Depends", "").split(",")
                   for alt in dep.split("|")[:1] if alt.strip()]
        docs[name] = {"id": name, "section": f.get("Section", ""), "title": title,
                      "text": text.strip(), "depends": depends}
    rows = [docs[name] for name in sorted(docs)]
    with open(CACHE + ".tmp", "w") as fp:
        for row in rows:
            fp.write(json.dumps(row) + "\n")
    os.replace(CACHE + ".tmp", CACHE)
    return rows


# -- helpers ----------------------------------------------------------------------------------

def clock():
    """Latencies are CPU time of this thread (SQLite and numpy run in it, BLAS on one
    thread): on a machine shared with other busy processes, wall-clock percentiles measure
    the neighbours' load more than the code."""
    return time.thread_time()


def timed(fn, items):
    """Per-call latencies in ms of ``fn(item)`` for each item, and the results."""
    times, results = [], []
    for item in items:
        t = clock()
        results.append(fn(item))
        times.append((clock() - t) * 1000)
    return times, results


def paired(fn_a, fn_b, items):
    """Time ``fn_a`` and ``fn_b`` on each item, alternating which goes first, so that load
    from other processes on the machine falls on both alike."""
    times_a, times_b, results_a, results_b = [], [], [], []
    for n, item in enumerate(items):
        order = [(fn_a, times_a, results_a), (fn_b, times_b, results_b)]
        for fn, times, results in (order if n % 2 == 0 else order[::-1]):
            t = clock()
            results.append(fn(item))
            times.append((clock() - t) * 1000)
    return times_a, results_a, times_b, results_b


def pct(times, q):
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def raw_connection(path):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def make_typo(word, rng, vocabulary):
    for _ in range(50):
        i = rng.randrange(len(word))
        op = rng.choice("dsit" if len(word) > 3 else "sit")
        letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
        if op == "d":
            typo = word[:i] + word[i + 1:]
        elif op == "s":
            typo = word[:i] + letter + word[i + 1:]
        elif op == "i":
            typo = word[:i] + letter + word[i:]
        else:
            i = min(i, len(word) - 2)
            typo = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if typo != word and typo not in vocabulary:
            return typo
    return None


# -- the benchmark ------------------------------------------------------------------------------

def bench_text(rows, folder, n_queries, rng, report):
    db = BeaverDB(os.path.join(folder, "beaver.db"))
    coll = db.collection("debian")
    raw = raw_connection(os.path.join(folder, "raw.db"))
    raw.execute("CREATE VIRTUAL TABLE raw USING fts5(name UNINDEXED, text, "
                "tokenize = 'unicode61 remove_diacritics 2')")

    def document(row):
        return Document(id=row["id"], body={"title": row["title"], "text": row["text"],
                                            "section": row["section"]})

    single = rows[:1000]
    t = time.perf_counter()
    for start in range(1000, len(rows), 1000):
        coll.index_many((document(r) for r in rows[start:start + 1000]), fts=["text"])
    beaver_rate = (len(rows) - 1000) / (time.perf_counter() - t)
    t = time.perf_counter()
    for row in single:
        coll.index(document(row), fts=["text"])
    beaver_single = len(single) / (time.perf_counter() - t)
    t = time.perf_counter()
    for start in range(1000, len(rows), 1000):
        raw.execute("BEGIN")
        raw.executemany("INSERT INTO raw (name, text) VALUES (?, ?)",
                        [(r["id"], r["text"]) for r in rows[start:start + 1000]])
        raw.execute("COMMIT")
    raw_rate = (len(rows) - 1000) / (time.perf_counter() - t)
    t = time.perf_counter()
    for r in single:
        raw.execute("INSERT INTO raw (name, text) VALUES (?, ?)", (r["id"], r["text"]))
    raw_single = len(single) / (time.perf_counter() - t)
    report.append(("index documents, index_many (1,000 per transaction)",
                   f"{beaver_rate:,.0f} docs/s", f"{raw_rate:,.0f} docs/s",
                   f"{beaver_rate / raw_rate:.2f}x", ""))
    report.append(("index documents, index() (one transaction each)",
                   f"{beaver_single:,.0f} docs/s", f"{raw_single:,.0f} docs/s",
                   f"{beaver_single / raw_single:.2f}x", ""))

    raw.execute("CREATE VIRTUAL TABLE temp.v USING fts5vocab(main, raw, 'row')")
    vocabulary = dict(raw.execute("SELECT term, doc FROM temp.v").fetchall())
    words = [w for w, n in vocabulary.items() if 5 <= n <= 20000 and w.isalpha() and len(w) >= 3]
    queries = []
    for _ in range(n_queries):
        title = rng.choice(rows)["title"]
        terms = [w for w in beaver._terms(title) if w in vocabulary and len(w) >= 3]
        queries.append(" ".join(rng.sample(terms, min(len(terms), rng.choice([1, 2])))) or
                       rng.choice(words))

    def beaver_match(q):
        return [doc.id for doc, _ in coll.match(q, top_k=10)]

    def raw_match(q):
        expr = " AND ".join('"%s"' % w for w in q.split())
        return [r[0] for r in raw.execute("SELECT name, text FROM raw WHERE raw MATCH ? "
                                          "ORDER BY rank LIMIT 10", (expr,))]

    for fn in (beaver_match, raw_match):        # warm both caches
        timed(fn, queries[:50])
    bt, bres, rt, rres = paired(beaver_match, raw_match, queries)
    overlap = statistics.mean(len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(bres, rres)
                              if b)
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        report.append((f"match top-10 {label}", f"{pct(bt, q):.3f} ms", f"{pct(rt, q):.3f} ms",
                       f"{pct(bt, q) / pct(rt, q):.2f}x", "<= 2x"))
    report.append(("match top-10 overlap with raw FTS5", f"{overlap:.3f}", "1", "", ""))

    def summary_word():
        terms = [w for w in beaver._terms(rng.choice(rows)["title"])
                 if w.isalpha() and len(w) >= 3 and vocabulary.get(w, 0) >= 5]
        return rng.choice(terms) if terms else None

    fuzzy_report(coll, "words of package summaries", summary_word, vocabulary, rng, n_queries,
                 report)
    fuzzy_report(coll, "vocabulary words", lambda: rng.choice(words), vocabulary, rng,
                 n_queries, report)
    db.close()
    raw.close()


def fuzzy_report(coll, source, pick, vocabulary, rng, n_queries, report):
    """One random typo (drop, swap, substitute or insert a letter) in ``n_queries`` words
    from ``pick()``, never a typo that is itself an indexed word."""
    pairs = []
    while len(pairs) < n_queries:
        word = pick()
        typo = word and make_typo(word, rng, vocabulary)
        if typo:
            pairs.append((word, typo))
    for group, keep in (("all lengths", lambda w: True), ("3-5 letters", lambda w: len(w) <= 5),
                        ("6+ letters", lambda w: len(w) >= 6)):
        chosen = [p for p in pairs if keep(p[0])]
        times, recalls = [], []
        for word, typo in chosen:
            truth = {doc.id for doc, _ in coll.match(word, top_k=10)}
            t = clock()
            got = {doc.id for doc, _ in coll.match(typo, top_k=10, fuzziness=1)}
            times.append((clock() - t) * 1000)
            recalls.append(len(truth & got) / len(truth) if truth else 1.0)
        report.append((f"fuzzy 1-typo p50, {source} ({group}, n={len(chosen)})",
                       f"{pct(times, 0.5):.2f} ms (p99 {pct(times, 0.99):.1f})", "", "",
                       "<= 10 ms"))
        report.append((f"fuzzy recall vs correct spelling, {source} ({group})",
                       f"{statistics.mean(recalls):.3f}", "", "", ">= 0.95"))


def bench_graph(rows, folder, n_queries, rng, report):
    names = {r["id"] for r in rows}
    edges = sorted({(r["id"], d) for r in rows for d in r["depends"] if d in names and
                    d != r["id"]})
    db = BeaverDB(os.path.join(folder, "graph.db"))
    net = db.collection("packages")
    t = time.perf_counter()
    for start in range(0, len(rows), 2000):
        net.index_many((Document(id=row["id"], body={"section": row["section"]})
                        for row in rows[start:start + 2000]), fts=False)
    with db.transaction():
        for source, target in edges:
            net.connect(source, target, "depends")
    build = time.perf_counter() - t
    raw = raw_connection(os.path.join(folder, "graph_raw.db"))
    raw.execute("CREATE TABLE e (s TEXT, t TEXT, PRIMARY KEY (s, t)) WITHOUT ROWID")
    raw.execute("CREATE TABLE d (id TEXT PRIMARY KEY, body TEXT) WITHOUT ROWID")
    raw.execute("BEGIN")
    raw.executemany("INSERT INTO e VALUES (?, ?)", edges)
    raw.executemany("INSERT INTO d VALUES (?, ?)",
                    [(r["id"], json.dumps({"section": r["section"]})) for r in rows])
    raw.execute("COMMIT")
    starts = rng.sample([r["id"] for r in rows if r["depends"]], n_queries)

    def raw_walk(s):
        return [(i, json.loads(b)) for i, b in raw.execute(
            "WITH RECURSIVE w(id, hop) AS (SELECT ?, 0 UNION SELECT e.t, w.hop + 1 FROM w "
            "JOIN e ON e.s = w.id WHERE w.hop < 3) SELECT d.id, d.body FROM "
            "(SELECT id, min(hop) AS hop FROM w WHERE id != ? GROUP BY id) x "
            "JOIN d ON d.id = x.id ORDER BY x.hop, x.id", (s, s))]

    def raw_neighbors(s):
        return [(i, json.loads(b)) for i, b in raw.execute(
            "SELECT d.id, d.body FROM e JOIN d ON d.id = e.t WHERE e.s = ? ORDER BY e.t", (s,))]

    nt, _, rnt, _ = paired(lambda s: net.neighbors(s, label="depends"), raw_neighbors, starts)
    wt, wres, rwt, rwres = paired(lambda s: net.walk(s, labels=["depends"], depth=3), raw_walk,
                                  starts)
    assert [len(a) for a in wres] == [len(b) for b in rwres], "walk differs from the raw CTE"
    report.append((f"graph: {len(rows):,} nodes, {len(edges):,} Depends edges, build",
                   f"{build:.1f} s", "", "", ""))
    report.append(("graph neighbors p50", f"{pct(nt, 0.5):.3f} ms", f"{pct(rnt, 0.5):.3f} ms",
                   f"{pct(nt, 0.5) / pct(rnt, 0.5):.2f}x", "<= 2 ms"))
    report.append((f"graph 3-hop walk p50 (median {statistics.median(map(len, wres)):.0f} docs)",
                   f"{pct(wt, 0.5):.3f} ms", f"{pct(rwt, 0.5):.3f} ms",
                   f"{pct(wt, 0.5) / pct(rwt, 0.5):.2f}x", "<= 2 ms"))
    report.append(("graph 3-hop walk p99", f"{pct(wt, 0.99):.3f} ms", f"{pct(rwt, 0.99):.3f} ms",
                   f"{pct(wt, 0.99) / pct(rwt, 0.99):.2f}x", ""))
    db.close()
    raw.close()


def bench_vectors(rows, folder, n_queries, report):
    try:
        import numpy as np
    except ImportError:
        report.append(("vector search", "numpy missing: skipped", "", "", ""))
        return
    os.environ["BEAVER_VECTOR_BACKEND"] = "exact"
    matrix = np.load(os.path.join(DATA, "debian_minilm_docs.f16.npy"))[:len(rows)]
    matrix = matrix.astype(np.float32)
    ids = json.load(open(os.path.join(DATA, "debian_minilm_ids.json")))["doc_ids"][:len(rows)]
    queries = np.load(os.path.join(DATA, "debian_minilm_queries.f16.npy")).astype(np.float32)
    queries = queries[:n_queries]
    db = BeaverDB(os.path.join(folder, "vectors.db"))
    for metric in ("cosine", "l2"):
        coll = db.collection(f"vec_{metric}", metric=metric)
        t = time.perf_counter()
        for start in range(0, len(ids), 1000):
            coll.index_many((Document(id=ids[i], embedding=matrix[i], body={"n": i})
                             for i in range(start, min(start + 1000, len(ids)))), fts=False)
        rate = len(ids) / (time.perf_counter() - t)
        t = clock()
        coll.search(queries[0], top_k=10)
        load = (clock() - t) * 1000
        squares = (matrix ** 2).sum(axis=1)

        def numpy_search(q, metric=metric):
            if metric == "cosine":
                scores = 1 - matrix @ (q / np.linalg.norm(q))
            else:
                scores = squares - 2 * (matrix @ q)
            best = np.argpartition(scores, 9)[:10]
            return [ids[i] for i in best[np.argsort(scores[best])]]

        bt, bres, nt, nres = paired(lambda q: [d.id for d, _ in coll.search(q, top_k=10)],
                                    numpy_search, queries)
        same = statistics.mean(len(set(a) & set(b)) / 10 for a, b in zip(bres, nres))
        report.append((f"vectors {metric}: index {len(ids):,} x {matrix.shape[1]}",
                       f"{rate:,.0f} docs/s (first search {load:.0f} ms)", "", "", ""))
        report.append((f"vector exact search {metric} p50 (top-10 agreement {same:.3f})",
                       f"{pct(bt, 0.5):.3f} ms", f"{pct(nt, 0.5):.3f} ms",
                       f"{pct(bt, 0.5) / pct(nt, 0.5):.2f}x", "<= 1.2x"))
    db.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--translation", help="a Translation-en index file (lz4 ok)")
    parser.add_argument("--only", choices=["text", "graph", "vectors"])
    args = parser.parse_args(argv)
    rows = corpus(args.translation)[:args.docs]
    rng = random.Random(42)
    folder = tempfile.mkdtemp(prefix="beaver-bench-collections-")
    report = []
    try:
        if args.only in (None, "text"):
            bench_text(rows, folder, args.queries, rng, report)
        if args.only in (None, "graph"):
            bench_graph(rows, folder, args.queries, rng, report)
        if args.only in (None, "vectors"):
            bench_vectors(rows, folder, args.queries, report)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    long_text = sum(1 for r in rows if "\n" in r["text"])
    lines = [f"# Collections benchmark ({len(rows):,} Debian packages, {long_text:,} with long "
             f"descriptions; SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]})",
             "", "Latencies: CPU time of the calling thread, peers timed alternately on the same "
             "queries; rates: wall clock. `python bench/bench_collections.py`.", "", "| what | beaver | peer (raw FTS5 / raw SQL / numpy) | ratio | target |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in report]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.only is None and args.docs >= 50000:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "collections.md"), "w") as fp:
            fp.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
