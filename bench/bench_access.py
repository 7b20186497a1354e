"""Access benchmark: BeaverClient over HTTP (keep-alive, localhost) beside BeaverDB in-process.

    python bench/bench_access.py            # full run (about a minute)
    python bench/bench_access.py --quick    # small sizes, a smoke run

Measured in one run, on one machine:
- dict ``set`` / ``get`` round trips, one at a time: p50 / p99 latency and ops/s, for
  ``BeaverDB`` in-process (the floor) and ``BeaverClient`` against ``python -m beaver_server``
  (one uvicorn worker, a separate process, 127.0.0.1);
- requests/s of that one worker with 1 and 4 client threads (dict get);
- channel publish -> receive latency over WebSocket and SSE, when the server has channels;
- start-up time of ``python -m beaver --help`` beside ``python -c pass`` (target <= 150 ms).

Results go to stdout and bench/results/access.md. No thresholds are asserted.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import beaver  # noqa: E402  (the beaver.py of this checkout)


def value_for(i):
    return {"id": i, "name": f"user-{i}", "tags": ["a", "b"], "score": i * 0.5}


def percentile(samples, q):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    process = subprocess.Popen(
        [sys.executable, "-m", "beaver_server", "--database", path, "--port", str(port),
         "--log-level", "warning"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)


def timed_ops(op, n):
    """Latencies (seconds) of ``n`` calls of ``op(i)``, and the wall time of all of them."""
    samples = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        op(i)
        samples.append(time.perf_counter() - t)
    return samples, time.perf_counter() - start


def dict_round_trips(db, n, rows, who, rounds):
    """Best of ``rounds`` timed rounds per operation (the round least disturbed by neighbours)."""
    d = db.dict("bench")
    for i in range(min(n, 100)):     # warm-up: connections, statement cache
        d[f"k{i}"] = value_for(i)
    for label, op in (("dict set", lambda i: d.__setitem__(f"k{i}", value_for(i))),
                      ("dict get", lambda i: d[f"k{i % n}"])):
        best = None
        for _ in range(rounds):
            samples, wall = timed_ops(op, n)
            if best is None or wall < best[1]:
                best = (samples, wall)
        samples, wall = best
        p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
        rows.append((label, who, n / wall, p50, p99))
        print(f"  {label:<10} {who:<34} {n / wall:>9,.0f} ops/s  p50 {p50 * 1e6:8.1f} us  "
              f"p99 {p99 * 1e6:8.1f} us", flush=True)


def throughput(url, threads, seconds):
    """Requests/s of dict gets from ``threads`` client threads (one connection each)."""
    client = beaver.BeaverClient(url)
    d = client.dict("bench")
    d["hot"] = value_for(1)
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(k):
        while time.monotonic() < stop:
            d["hot"]
            counts[k] += 1
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    rate = sum(counts) / (time.perf_counter() - start)
    client.close()
    return rate


def startup(command, runs):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("PYTHONDONTWRITEBYTECODE", None)   # measure with compiled bytecode, as installed
    env.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "beaver-bench-pyc"))
    subprocess.run(command, env=env, capture_output=True)      # compile once
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(command, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def channel_latency(url, n):
    """Publish -> receive over WebSocket and SSE, if the server offers channels."""
    try:
        import httpx
    except ImportError:
        return []
    with httpx.Client(base_url=url) as http:
        if "/channels/{name}/publish" not in http.get("/openapi.json").json()["paths"]:
            return []
    results = []
    for transport, measure in (("WebSocket", _ws_latency), ("SSE", _sse_latency)):
        try:
            samples = measure(url, n)
        except Exception as e:  # noqa: BLE001 - a missing optional package must not stop the run
            print(f"  channel over {transport}: skipped ({e})")
            continue
        results.append((transport, percentile(samples, 0.5), percentile(samples, 0.99)))
        print(f"  channel over {transport:<9} p50 {percentile(samples, 0.5) * 1e3:6.2f} ms  "
              f"p99 {percentile(samples, 0.99) * 1e3:6.2f} ms", flush=True)
    return results


def _ws_latency(url, n):
    from websockets.sync.client import connect
    client = beaver.BeaverClient(url)
    channel = client.channel("bench-ws")
    samples = []
    with connect(url.replace("http", "ws", 1) + "/channels/bench-ws/ws") as ws:
        time.sleep(0.2)   # let the subscription start before the first publish
        for i in range(n):
            t = time.perf_counter()
            channel.publish({"i": i})
            ws.recv(timeout=10)
            samples.append(time.perf_counter() - t)
    client.close()
    return samples


def _sse_latency(url, n):
    import httpx
    client = beaver.BeaverClient(url)
    channel = client.channel("bench-sse")
    samples = []
    with httpx.Client(timeout=10) as http, \
            http.stream("GET", url + "/channels/bench-sse/sse") as response:
        lines = response.iter_lines()
        time.sleep(0.2)
        for i in range(n):
            t = time.perf_counter()
            channel.publish({"i": i})
            for line in lines:
                if line.startswith("data:"):
                    break
            samples.append(time.perf_counter() - t)
    client.close()
    return samples


def write_report(rows, rates, channels, starts, quick):
    floor = {label: rate for label, who, rate, _, _ in rows if who.startswith("BeaverDB")}
    lines = [
        "# Access benchmark", "",
        f"`python bench/bench_access.py{' --quick' if quick else ''}` on {platform.platform()}, "
        f"Python {platform.python_version()}, SQLite {beaver.sqlite3.sqlite_version}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (a shared "
        "machine: figures are indicative).", "",
        "## dict round trips, one at a time (best of 3 rounds)", "",
        "| operation | contender | ops/s | p50 | p99 | ratio to in-process |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, who, rate, p50, p99 in rows:
        lines.append(f"| {label} | {who} | {rate:,.0f} | {p50 * 1e6:,.0f} us | "
                     f"{p99 * 1e6:,.0f} us | {rate / floor[label]:.3f}x |")
    lines += ["", "## one uvicorn worker, dict get", "", "| client threads | requests/s |",
              "|---:|---:|"]
    lines += [f"| {threads} | {rate:,.0f} |" for threads, rate in rates]
    if channels:
        lines += ["", "## channel publish -> receive through the server", "",
                  "| transport | p50 | p99 |", "|---|---:|---:|"]
        lines += [f"| {t} | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms |" for t, p50, p99 in channels]
    lines += ["", "## start-up", "", "| command | best | median |", "|---|---:|---:|"]
    lines += [f"| `{label}` | {best * 1e3:.0f} ms | {median * 1e3:.0f} ms |"
              for label, best, median in starts]
    lines += ["", "Target: `beaver --help` <= 150 ms (the `python -c pass` row is the floor of "
              "this machine's interpreter start).", ""]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "access.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 300 if args.quick else 2000
    rounds = 1 if args.quick else 3
    rows, rates = [], []
    with tempfile.TemporaryDirectory() as folder:
        print("dict round trips")
        with beaver.BeaverDB(os.path.join(folder, "local.db")) as db:
            dict_round_trips(db, n, rows, "BeaverDB (in-process)", rounds)
        process, url = start_server(os.path.join(folder, "served.db"))
        try:
            with beaver.BeaverClient(url) as client:
                dict_round_trips(client, n, rows, "BeaverClient (HTTP keep-alive)", rounds)
            print("one worker, requests/s")
            for threads in (1, 4):
                rates.append((threads, max(throughput(url, threads, 1.0 if args.quick else 2.0)
                                           for _ in range(rounds))))
                print(f"  {threads} client thread(s): {rates[-1][1]:,.0f} requests/s", flush=True)
            channels = channel_latency(url, 50 if args.quick else 500)
        finally:
            process.terminate()
            process.wait(timeout=10)
    print("start-up")
    starts = []
    for label, command in (("python -c pass", [sys.executable, "-c", "pass"]),
                           ("python -c 'import beaver'", [sys.executable, "-c", "import beaver"]),
                           ("beaver --help", [sys.executable, "-m", "beaver", "--help"])):
        best, median = startup(command, 5 if args.quick else 15)
        starts.append((label, best, median))
        print(f"  {label:<28} best {best * 1e3:6.0f} ms  median {median * 1e3:6.0f} ms", flush=True)
    write_report(rows, rates, channels, starts, args.quick)


if __name__ == "__main__":
    main()
