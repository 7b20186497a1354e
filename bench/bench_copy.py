"""Copy benchmark: a whole database moved by ``beaver copy`` (``copy_to``), beside the other
ways of moving it, with the memory each one takes.

    python bench/bench_copy.py              # a database of about 300 MB (a minute or two)
    python bench/bench_copy.py --mb 1000    # bigger
    python bench/bench_copy.py --quick      # about 30 MB, nothing written

One database holds every kind: blobs of 1 MB with metadata (half the bytes), a dict with
expiring keys, a list, a log, a queue, a channel, and a collection of documents with text,
64-dimension vectors and edges. It is then moved into a new file three ways, each in child
processes of its own (so each peak of memory is that process's own):

- SQLite's online backup API (``beaver backup``): the floor, pages copied as they are,
  nothing decoded; SQLite to SQLite only;
- ``beaver dump`` to a JSON-lines file, then ``beaver load`` of it (one transaction);
- ``beaver copy SRC DST``: one snapshot of the source, read page by page, written in one
  transaction, no file in between; the only one of the three that goes from one engine
  to another.

Each is timed (wall clock) and its memory sampled every 10 ms from /proc: the peak of
anonymous memory (the process's own heap: what grows if something holds the whole
database) and of file-backed memory (SQLite's 256 MB mmap window over the files, page cache
the kernel reclaims at will). Every copy is checked against the source (the sizes of all its
structures). Results go to stdout and bench/results/copy.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
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

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega database queue "
         "index vector graph search text").split()


def build(path, megabytes, rng):
    """A database of about ``megabytes`` MB with every kind of structure."""
    db = beaver.BeaverDB(path)
    unit = max(1, megabytes // 10)       # one unit is about 10 MB of the whole
    chunk = os.urandom(1 << 20)
    with db.transaction():
        for i in range(5 * unit):
            db.blobs("files").put(f"file-{i:05}", chunk[i:] + chunk[:i], {"n": i})
    cache = db.dict("cache")
    for start in range(0, 8000 * unit, 10_000):
        with db.transaction():
            for i in range(start, min(start + 10_000, 8000 * unit)):
                cache.set(f"key-{i:08}", {"n": i, "pad": "x" * 300},
                          ttl_seconds=86400 if i % 3 == 0 else None)
    db.list("tasks").extend({"n": i, "s": "y" * 200} for i in range(2000 * unit))
    with db.transaction():
        for i in range(2000 * unit):
            db.log("events").log({"n": i, "msg": "z" * 100}, timestamp=1_700_000_000 + i)
        for i in range(1000):
            db.queue("jobs").put({"n": i}, priority=i % 3)
            db.channel("news", retention=None).publish({"n": i})
    docs = db.collection("docs")
    for start in range(0, 1000 * unit, 1000):
        docs.index_many(beaver.Document(id=f"doc-{i:07}", body=" ".join(rng.choices(WORDS, k=25)),
                                        embedding=[rng.random() for _ in range(64)])
                        for i in range(start, min(start + 1000, 1000 * unit)))
    with db.transaction():
        for i in range(1, 1000 * unit):
            docs.connect(f"doc-{i - 1:07}", f"doc-{i:07}", "next")
    db.close()


def measured(argv, stdout=None):
    """(seconds, peak anonymous MB, peak file-backed MB) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=stdout or subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": ROOT})
    peaks = {"RssAnon": 0, "RssFile": 0}
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as fp:
                for line in fp:
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) // 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
    if child.wait() != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {child.returncode}")
    return time.perf_counter() - start, peaks["RssAnon"], peaks["RssFile"]


def sizes(path):
    with beaver.BeaverDB(path) as db:
        return [(s["kind"], s["name"], s["size"]) for s in db.info()["structures"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="size of the database, about")
    parser.add_argument("--quick", action="store_true", help="about 30 MB, nothing written")
    args = parser.parse_args(argv)
    megabytes = 30 if args.quick else args.mb
    folder = tempfile.mkdtemp(prefix="beaver-bench-copy-")
    cli = [sys.executable, "-m", "beaver"]
    try:
        source = os.path.join(folder, "source.db")
        start = time.perf_counter()
        build(source, megabytes, random.Random(1))
        built = time.perf_counter() - start
        size = os.path.getsize(source) / 1e6
        expected = sizes(source)
        print(f"built {size:.0f} MB in {built:.0f} s", flush=True)
        rows = []
        target = os.path.join(folder, "backup.db")
        rows.append(("SQLite backup API (`beaver backup`; floor)",
                     measured(cli + ["-d", source, "backup", target]), target))
        target, dump = os.path.join(folder, "loaded.db"), os.path.join(folder, "dump.jsonl")
        with open(dump, "w") as out:
            dumped = measured(cli + ["-d", source, "dump"], stdout=out)
        loaded = measured(cli + ["-d", target, "load", dump])
        rows.append(("`beaver dump` to a file, then `beaver load`",
                     (dumped[0] + loaded[0], max(dumped[1], loaded[1]),
                      max(dumped[2], loaded[2])), target))
        target = os.path.join(folder, "copied.db")
        rows.append(("`beaver copy SRC DST` (copy_to)",
                     measured(cli + ["copy", source, target]), target))
        dump_mb = os.path.getsize(dump) / 1e6
        same = [sizes(path) == expected for _, _, path in rows]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    floor = rows[0][1][0]
    lines = ["# Copy benchmark (beaver)", "",
             f"{platform.platform()}, Python {sys.version.split()[0]}, SQLite "
             f"{sqlite3.sqlite_version}, {os.cpu_count()} CPUs; machine shared with other jobs "
             f"(load average {os.getloadavg()[0]:.1f} at the end). `python bench/bench_copy.py"
             f"{'' if megabytes == 300 else f' --mb {megabytes}'}`.", "",
             f"A {size:.0f} MB database (every kind of structure; {len(expected)} structures, "
             f"{sum(n for *_, n in expected):,} items) moved into a new file; the dump file "
             f"was {dump_mb:.0f} MB.", "",
             "| how | seconds | MB/s | vs floor | peak anonymous memory, MB | peak file-backed "
             "memory (mmap), MB | copy equals the source |", "|---|---:|---:|---:|---:|---:|---|"]
    for (what, (seconds, anon, mapped), _), equal in zip(rows, same):
        lines.append(f"| {what} | {seconds:.1f} | {size / seconds:.0f} | {floor / seconds:.2f}x "
                     f"| {anon} | {mapped} | {'yes' if equal else 'NO'} |")
    lines += ["", "Memory: sampled from /proc every 10 ms; anonymous memory is the process's own "
              "(Python, SQLite's page cache, the items in flight), file-backed memory is "
              "SQLite's mmap window (256 MB per file at most) over the source and the "
              "destination, page cache the kernel reclaims when it needs the room. The dump + "
              "load row shows the larger peak of its two processes and the sum of their times.",
              ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "copy.md"), "w") as fp:
            fp.write(text)
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
