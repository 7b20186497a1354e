"""Stress the faiss vector index: batch and single inserts, two writer processes, upserts,
drops, compaction and reopening, checking every answer against brute force.

    python examples/stress_vectors.py          # a few seconds; exit status 0 when all is well

Needs the ``[vector]`` extra (numpy, faiss-cpu); without it, says so and exits with 0.
"""
import multiprocessing
import os
import sys
import tempfile
import time

try:
    import numpy as np
    import faiss  # noqa: F401
except ImportError as e:
    print(f"skipped: the vector extra is not installed ({e})")
    sys.exit(0)

from beaver import BeaverDB, Document

DIM = 32
OPTIONS = {"metric": "l2", "fold_min": 500}


def brute_force(docs, query, top_k):
    ids = list(docs)
    matrix = np.array([docs[i] for i in ids], dtype=np.float64)
    dist = np.linalg.norm(matrix - np.asarray(query, dtype=np.float64), axis=1)
    order = np.argsort(dist, kind="stable")[:top_k]
    return [(ids[i], float(dist[i])) for i in order]


def check(collection, docs, rng, rounds=20, top_k=10):
    """Every search equals brute force over ``docs`` (up to rounding and ties)."""
    for _ in range(rounds):
        query = rng.standard_normal(DIM)
        got = [(doc.id, d) for doc, d in collection.search(query.tolist(), top_k=top_k)]
        want = brute_force(docs, query, top_k)
        if not np.allclose([d for _, d in got], [d for _, d in want], atol=1e-4):
            raise SystemExit(f"mismatch:\n got  {got}\n want {want}")


def writer(path, prefix, count):
    """A second process: index documents one by one, each visible to its own next search."""
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
    with BeaverDB(path) as db:
        docs = db.collection("stress", **OPTIONS)
        for i in range(count):
            vector = rng.standard_normal(DIM).tolist()
            docs.index(Document(id=f"{prefix}{i}", embedding=vector))
            if docs.search(vector, top_k=1)[0][0].id != f"{prefix}{i}":
                raise SystemExit(f"{prefix}{i} not found by its own vector")


def main():
    rng = np.random.default_rng(0)
    folder = tempfile.mkdtemp(prefix="beaver-stress-")
    path = os.path.join(folder, "stress.db")
    docs = {}
    with BeaverDB(path) as db:
        collection = db.collection("stress", **OPTIONS)
        start = time.perf_counter()
        with db.transaction():
            for i in range(3000):
                docs[f"b{i}"] = rng.standard_normal(DIM)
                collection.index(Document(id=f"b{i}", embedding=docs[f"b{i}"].tolist()))
        print(f"batch insert: {3000 / (time.perf_counter() - start):,.0f} docs/s")
        start = time.perf_counter()
        for i in range(500):
            docs[f"s{i}"] = rng.standard_normal(DIM)
            collection.index(Document(id=f"s{i}", embedding=docs[f"s{i}"].tolist()))
        print(f"one-by-one insert: {500 / (time.perf_counter() - start):,.0f} docs/s")
        check(collection, docs, rng)

        ctx = multiprocessing.get_context("spawn")
        workers = [ctx.Process(target=writer, args=(path, p, 200)) for p in ("p", "q")]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):      # search while they write
            collection.search(rng.standard_normal(DIM).tolist(), top_k=5)
            for w in workers:
                w.join(timeout=0.01)
        if any(w.exitcode for w in workers):
            raise SystemExit("a writer process failed")
        for doc in collection:
            docs[doc.id] = np.asarray(doc.embedding)
        print(f"two writer processes: {len(docs)} documents in all")

        for i in rng.choice(3000, 900, replace=False):  # upserts and drops
            if i % 2:
                docs[f"b{i}"] = rng.standard_normal(DIM)
                collection.index(Document(id=f"b{i}", embedding=docs[f"b{i}"].tolist()))
            else:
                collection.drop(f"b{i}")
                del docs[f"b{i}"]
        check(collection, docs, rng)
        collection.compact()
        check(collection, docs, rng)
    with BeaverDB(path) as db:                          # reopen: stored base + log replay
        check(db.collection("stress", **OPTIONS), docs, rng)
    print(f"ok: {len(docs)} documents, every search equal to brute force")


if __name__ == "__main__":
    main()
