"""Reliability harness: a mixed multi-process workload, SIGKILLed at random, checked each round.

    python bench/stress.py --rounds 100            # or: BEAVER_STRESS_ROUNDS=100 pytest -k stress

Every round starts ``--workers`` processes on one database file. Each runs a random mix of
operations (queue put / get with a lease / ack, list push / deque, dict sets with short and
long TTLs, collection documents with text and vectors indexed and dropped, channel
publishes, lock-guarded counter increments) and is SIGKILLed at a random moment. Each worker
notes every operation in a side file: ``T`` before it starts, ``A`` once it returned (so
after its commit). After each round the checker opens the file and verifies:

- ``PRAGMA integrity_check`` and the FTS5 index's own integrity check;
- nothing acknowledged is lost or duplicated: every acknowledged queue item is either done
  exactly once or still queued (or leased); every acknowledged list push is either in the
  list or was popped, once; every acknowledged channel message is in the history once; the
  last acknowledged value of each long-lived dict key is there (or a newer one); the
  lock-guarded counter counts every acknowledged increment (a lost update would mean two
  holders at once). Only an operation in flight when its process died may be unaccounted,
  at most one per kill;
- the indexes agree with the documents: one FTS row per document and no other, one vector
  per document and no other, and a search by each document's unique word finds it.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import beaver  # noqa: E402  (the beaver.py of this checkout)

SPAWN = multiprocessing.get_context("spawn")
DIM = 8
OPS = ["put"] * 4 + ["get"] * 3 + ["push"] * 3 + ["deque"] * 2 + ["dict"] * 3 + \
      ["index"] * 2 + ["drop"] + ["publish"] * 2 + ["increment"]


# ------------------------------------------------------------------------------------------
# The worker (module level: spawned processes import it)
# ------------------------------------------------------------------------------------------

def worker(path, acks, prefix, seed, ready):
    """Run random operations until killed; note each in ``acks`` (T: started, A: returned)."""
    rng = random.Random(seed)
    fd = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(*words):
        os.write(fd, (" ".join(map(str, words)) + "\n").encode())

    db = beaver.BeaverDB(path, timeout=60)
    q, items, cache = db.queue("jobs"), db.list("items"), db.dict("cache")
    docs, news, counters = db.collection("docs"), db.channel("news"), db.dict("counters")
    values, indexed, n = collections.Counter(), [], 0
    ready.set()
    while True:
        n += 1
        uid = f"{prefix}n{n}"
        op = rng.choice(OPS)
        if op == "put":
            note("T put", uid)
            q.put(uid, priority=rng.randrange(3))
            note("A put", uid)
        elif op == "get":
            try:
                item = q.get(timeout=0.05, lease=0.5)
            except TimeoutError:
                continue
            note("A got", item.data)
            if q.ack(item):
                note("A done", item.data)
        elif op == "push":
            note("T push", uid)
            items.push(uid)
            note("A push", uid)
        elif op == "deque":
            value = items.deque()
            if value is not None:
                note("A pop", value)
        elif op == "dict":
            key = f"{prefix}k{rng.randrange(20)}"
            values[key] += 1
            cache.set(key, values[key], ttl_seconds=600)
            note("A dict", key, values[key], round(time.time() + 600, 3))
            cache.set(f"{prefix}s{n}", n, ttl_seconds=rng.uniform(0.05, 0.5))
        elif op == "index":
            note("T index", uid)
            docs.index(beaver.Document(id=uid, body={"text": f"tok{uid} shared words"},
                                       embedding=[rng.random() for _ in range(DIM)]))
            note("A index", uid)
            indexed.append(uid)
        elif op == "drop" and indexed:
            doomed = indexed.pop(rng.randrange(len(indexed)))
            note("T drop", doomed)
            docs.drop(doomed)
            note("A drop", doomed)
        elif op == "publish":
            note("T publish", uid)
            news.publish(uid)
            note("A publish", uid)
        elif op == "increment":
            note("T increment", uid)
            with db.lock("counter", ttl=2, timeout=60):
                counters["n"] = counters.get("n", 0) + 1
                note("A increment", uid)


# ------------------------------------------------------------------------------------------
# The checker
# ------------------------------------------------------------------------------------------

def read_notes(folder):
    """{(T|A, op): [uid or (key, value)...]} over every side file written so far."""
    notes = collections.defaultdict(list)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".acks"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue                # cut short by the kill
                words = line.split()
                notes[(words[0], words[1])].append(tuple(words[2:]) if len(words) > 3
                                                   else words[2])
    return notes


def _once(values, what):
    counts = collections.Counter(values)
    twice = [v for v, c in counts.items() if c > 1]
    assert not twice, f"{what}: {len(twice)} duplicated, e.g. {twice[:5]}"
    return set(counts)


def check(path, folder, kills) -> dict:
    """Verify the database against the notes; returns a few counts. AssertionError if not."""
    notes = read_notes(folder)
    with beaver.BeaverDB(path, timeout=60) as db:
        core = db._core
        assert core.all("PRAGMA integrity_check") == [("ok",)], "integrity_check failed"
        core.execute("INSERT INTO beaver_fts (beaver_fts) VALUES ('integrity-check')")
        lost = _check_queue(core, notes) + _check_list(core, notes)
        assert lost <= kills, f"{lost} acknowledged items unaccounted for after {kills} kills"
        _check_dict(db, notes)
        documents = _check_collection(db, notes)
        _check_channel(db, notes)
        count = db.dict("counters").get("n", 0)
        assert len(notes["A", "increment"]) <= count <= len(notes["T", "increment"]), (
            f"counter {count}: acknowledged {len(notes['A', 'increment'])} increments "
            "(fewer means two holders of the lock at once)")
    return {"queued": len(notes["A", "put"]), "done": len(notes["A", "done"]),
            "documents": documents, "increments": count}


def _check_queue(core, notes) -> int:
    done = _once(notes["A", "done"], "queue items acknowledged done")
    waiting = _once([row[0] for row in core.all(
        "SELECT data FROM beaver_queues WHERE name = 'jobs' UNION ALL "
        "SELECT data FROM beaver_queue_leases WHERE name = 'jobs'")], "queue items stored")
    waiting = {beaver._json_loads(text) for text in waiting}
    assert not done & waiting, f"done and still queued: {sorted(done & waiting)[:5]}"
    assert waiting | done <= set(notes["T", "put"]), "queue items nobody put"
    lost = set(notes["A", "put"]) - done - waiting
    in_flight = set(notes["A", "got"]) - done
    assert lost <= in_flight, f"queue items lost: {sorted(lost - in_flight)[:5]}"
    return len(lost)


def _check_list(core, notes) -> int:
    popped = _once(notes["A", "pop"], "list items popped")
    present = _once([beaver._json_loads(row[0]) for row in core.all(
        "SELECT value FROM beaver_lists WHERE name = 'items'")], "list items stored")
    assert not popped & present, f"popped and still there: {sorted(popped & present)[:5]}"
    assert present | popped <= set(notes["T", "push"]), "list items nobody pushed"
    return len(set(notes["A", "push"]) - popped - present)


def _check_dict(db, notes):
    cache = db.dict("cache")
    last, soon = {}, time.time() + 10
    for key, value, expires_at in notes["A", "dict"]:
        if float(expires_at) > soon:        # else it may have expired by now, rightly
            last[key] = max(last.get(key, 0), int(value))
    for key, value in last.items():
        stored = cache.get(key)
        assert stored is not None and stored >= value, f"dict {key}: {stored} < {value}"


def _check_collection(db, notes) -> int:
    core, docs = db._core, db.collection("docs")
    present = {row[0]: row[1] for row in core.all(
        "SELECT doc_id, id FROM beaver_documents WHERE collection = 'docs'")}
    expected = set(notes["A", "index"]) - set(notes["T", "drop"])
    assert expected <= set(present), f"documents lost: {sorted(expected - set(present))[:5]}"
    assert set(present) <= set(notes["T", "index"]) - set(notes["A", "drop"]), \
        "documents that were dropped, or never indexed"
    vectors = _once([row[0] for row in core.all(
        "SELECT doc_id FROM beaver_vectors WHERE collection = 'docs'")], "vectors")
    assert vectors == set(present), "vectors and documents disagree"
    mask = (1 << beaver._FTS_DOC_BITS) - 1
    fts = _once([row[0] for row in core.all(
        f"SELECT (rowid >> {beaver._FTS_PATH_BITS}) & {mask} FROM beaver_fts "
        "WHERE collection = 'docs'")], "FTS rows")
    assert fts == {rowid & mask for rowid in present.values()}, "FTS rows and documents disagree"
    sample = random.sample(sorted(present), min(20, len(present)))
    for uid in sample:
        assert [d.id for d, _ in docs.match(f"tok{uid}")] == [uid], f"match misses {uid}"
    for uid in random.sample(notes["A", "drop"], min(20, len(notes["A", "drop"]))):
        assert not docs.match(f"tok{uid}"), f"dropped {uid} still matches"
    if present:
        hits = docs.search([0.5] * DIM, top_k=len(present))
        assert {d.id for d, _ in hits} == set(present), "vector search disagrees"
    return len(present)


def _check_channel(db, notes):
    history = _once(db.channel("news").history(), "channel messages")
    assert set(notes["A", "publish"]) <= history, "published messages lost"
    assert history <= set(notes["T", "publish"]), "messages nobody published"


# ------------------------------------------------------------------------------------------
# Rounds
# ------------------------------------------------------------------------------------------

def run(folder, rounds=3, workers=4, seconds=1.5, seed=None, log=print) -> dict:
    """``rounds`` rounds of ``workers`` processes killed at random within ``seconds``."""
    rng = random.Random(seed)
    path = os.path.join(folder, "stress.db")
    beaver.BeaverDB(path).close()
    kills, stats = 0, {}
    for number in range(rounds):
        ready = [SPAWN.Event() for _ in range(workers)]
        procs = [SPAWN.Process(target=worker, daemon=True, args=(
            path, os.path.join(folder, f"r{number}w{w}.acks"), f"r{number}w{w}",
            rng.randrange(1 << 30), ready[w])) for w in range(workers)]
        for p in procs:
            p.start()
        for event in ready:
            assert event.wait(60), "a worker did not start"
        started = time.monotonic()
        for when, p in sorted((rng.uniform(0.2, seconds), p) for p in procs):
            time.sleep(max(0.0, started + when - time.monotonic()))
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(60)
            assert p.exitcode == -signal.SIGKILL, f"worker exited with {p.exitcode}"
        kills += len(procs)
        stats = check(path, folder, kills)
        log(f"round {number + 1}/{rounds}: {kills} kills so far, {stats}")
    return dict(stats, rounds=rounds, kills=kills)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int,
                        default=int(os.environ.get("BEAVER_STRESS_ROUNDS", "10")))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.5,
                        help="each worker is killed at a random time within this")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="beaver-stress-") as folder:
        result = run(folder, args.rounds, args.workers, args.seconds, args.seed)
    print(f"passed: {result['rounds']} rounds, {result['kills']} processes SIGKILLed, "
          f"{result['queued']} queue items, {result['documents']} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
