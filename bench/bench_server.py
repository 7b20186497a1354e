"""Server benchmark: BeaverClient against ``beaver serve`` beside redis-py against redis-server.

    python bench/bench_server.py            # full run (a few minutes)
    python bench/bench_server.py --runs 3   # three full runs (fresh servers each), the spread
    python bench/bench_server.py --quick    # small sizes, a smoke run

Measured side by side in one run, on one machine, both over TCP on 127.0.0.1:
- dict get / set (Redis GET / SET), list push / pop (RPUSH / RPOP), queue put / get
  (RPUSH / LPOP), blob put / get of 4 KB (SET / GET of bytes): ops/s from one client thread,
  against one server worker;
- dict get / set from 4 client threads against ``--workers 2`` (Redis: one server, 4 threads).

Beaver's writes carry an idempotency key and are stored with it (exactly-once); Redis's are
not. Redis is expected at 127.0.0.1:6379 (``redis-server``); ``pip install redis``. Results go
to stdout and bench/results/server.md, with the ratios beaver / redis. No thresholds.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import beaver  # noqa: E402  (the beaver.py of this checkout)

VALUE = {"id": 7, "name": "user-7", "tags": ["a", "b"], "score": 3.5}
BLOB = os.urandom(4096)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path, workers=1):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "beaver_server", "--database", path, "--port", str(port),
         "--workers", str(workers), "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
    deadline = time.monotonic() + 30
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            client = beaver.BeaverClient(url)
            client.info()
            client.close()
            return process, url
        except beaver.RemoteError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.1)


def cpu_seconds(pids) -> float:
    """CPU time (user + system) used so far by the processes ``pids`` and their children
    (Linux /proc; 0.0 elsewhere)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick + cpu_seconds(children)
    return total


def timed(op, n, threads, server_pids):
    """``(ops/s, client CPU µs per op, server CPU µs per op)`` of ``rate(op, n, threads)``."""
    client, server = time.process_time(), cpu_seconds(server_pids)
    ops_s = rate(op, n, threads)
    count = n * threads
    return (ops_s, (time.process_time() - client) / count * 1e6,
            (cpu_seconds(server_pids) - server) / count * 1e6)


def rate(op, n, threads=1):
    """Operations per second of ``op(thread, i)`` run ``n`` times in each of ``threads``."""
    barrier = threading.Barrier(threads + 1)

    def work(t):
        barrier.wait()
        for i in range(n):
            op(t, i)
    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    return n * threads / (time.perf_counter() - start)


def beaver_ops(client):
    d, lst, q, b = (client.dict("bench"), client.list("bench"), client.queue("bench"),
                    client.blobs("bench"))
    return {
        "dict set": lambda t, i: d.set(f"k{t}-{i}", VALUE),
        "dict get": lambda t, i: d.get(f"k{t}-{i}"),
        "list push": lambda t, i: lst.push(VALUE),
        "list pop": lambda t, i: lst.pop(),
        "queue put": lambda t, i: q.put(VALUE),
        "queue get": lambda t, i: q.get(block=False),
        "blob put": lambda t, i: b.put(f"b{t}-{i}", BLOB),
        "blob get": lambda t, i: b.get(f"b{t}-{i}"),
    }


def redis_ops(r):
    import json
    return {
        "dict set": lambda t, i: r.set(f"bench:k{t}-{i}", json.dumps(VALUE)),
        "dict get": lambda t, i: json.loads(r.get(f"bench:k{t}-{i}")),
        "list push": lambda t, i: r.rpush("bench:list", json.dumps(VALUE)),
        "list pop": lambda t, i: r.rpop("bench:list"),
        "queue put": lambda t, i: r.rpush("bench:queue", json.dumps(VALUE)),
        "queue get": lambda t, i: r.lpop("bench:queue"),
        "blob put": lambda t, i: r.set(f"bench:b{t}-{i}", BLOB),
        "blob get": lambda t, i: r.get(f"bench:b{t}-{i}"),
    }


def per_thread(make):
    """An ``op(t, i)`` using one client per thread (made on first use in that thread)."""
    local = threading.local()

    def op(name):
        def run(t, i):
            ops = getattr(local, "ops", None)
            if ops is None:
                ops = local.ops = make()
            ops[name](t, i)
        return run
    return op


def measure(args, redis_module):
    results = {}
    folder = tempfile.mkdtemp(prefix="bench-server-")
    r = redis_module.Redis(host="127.0.0.1", port=6379)
    r.flushdb()
    process, url = start_server(os.path.join(folder, "one.db"))
    workers, wurl = start_server(os.path.join(folder, "two.db"), workers=2)
    clients = []
    try:
        client = beaver.BeaverClient(url)
        mine, theirs = beaver_ops(client), redis_ops(r)
        pids = {"beaver": [process.pid], "redis": [r.info("server")["process_id"]],
                "beaver workers": [workers.pid]}
        for round_ in range(args.rounds):
            for name in mine:           # interleaved: the same moment's noise for both
                for who, ops in (("beaver", mine), ("redis", theirs)):
                    keep(results, (name, 1, who), timed(ops[name], args.n, 1, pids[who]))
            r.flushdb()

        def make_client():
            c = beaver.BeaverClient(wurl)
            clients.append(c)
            return beaver_ops(c)
        pools = {"beaver": per_thread(make_client),
                 "redis": per_thread(lambda: redis_ops(redis_module.Redis(port=6379)))}
        for round_ in range(args.rounds):
            for name in ("dict set", "dict get"):
                for who in ("beaver", "redis"):
                    server = pids["beaver workers" if who == "beaver" else who]
                    keep(results, (name, 4, who), timed(pools[who](name), args.n // 2, 4,
                                                        server))
        client.close()
    finally:
        for c in clients:
            c.close()
        for p in (process, workers):
            p.terminate()
            p.wait()
    return results


def keep(results, key, measured):
    """Keep the best round (by ops/s) with its CPU figures."""
    if measured[0] > results.get(key, (0.0,))[0]:
        results[key] = measured


def report(runs, args):
    """The table of the median run (by each row's ratio), with every run's ratio beside it."""
    lines = [
        "# Server benchmark: BeaverClient + beaver serve beside redis-py + redis-server",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, SQLite {beaver.sqlite3.sqlite_version}; "
        f"{args.n} ops per round, best of {args.rounds} interleaved rounds, ops/s; "
        f"{len(runs)} run(s), each with fresh servers.",
        "Beaver's writes carry an idempotency key stored with the write (exactly-once).",
        "CPU per operation (µs, user + system, of the best round): the client process (all its",
        "threads) and the server process(es), beaver / redis. The row shown is the run with",
        "the median ratio; the last column has every run's ratio.",
        "",
        "| operation | client threads | server | beaver ops/s | redis ops/s | beaver / redis "
        "| client CPU µs/op | server CPU µs/op | every run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(k for k in runs[0] if k[2] == "beaver"):
        name, threads, _ = key
        ratios = sorted((r[key][0] / r[(name, threads, "redis")][0], i)
                        for i, r in enumerate(runs))
        median = runs[ratios[len(ratios) // 2][1]]
        value, client, server = median[key]
        theirs, their_client, their_server = median[(name, threads, "redis")]
        workers = "1 worker" if threads == 1 else "--workers 2"
        every = ", ".join(f"{ratio:.2f}x" for ratio, _ in sorted(ratios, key=lambda r: r[1]))
        lines.append(f"| {name} | {threads} | {workers} | {value:,.0f} | {theirs:,.0f} | "
                     f"{value / theirs:.2f}x | {client:.0f} / {their_client:.0f} | "
                     f"{server:.0f} / {their_server:.0f} | {every} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "server.md"), "w") as f:
            f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no results file")
    parser.add_argument("-n", type=int, default=None, help="operations per round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (best is kept)")
    parser.add_argument("--runs", type=int, default=1,
                        help="full runs, each with fresh servers (the median is shown)")
    args = parser.parse_args()
    args.n = args.n or (300 if args.quick else 3000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    try:
        import redis
    except ImportError:
        raise SystemExit("pip install redis (and run redis-server on 127.0.0.1:6379)")
    report([measure(args, redis) for _ in range(args.runs)], args)


if __name__ == "__main__":
    main()
