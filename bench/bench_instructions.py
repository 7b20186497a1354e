"""Instructions the server spends per request, counted by callgrind (repeatable under load).

    python bench/bench_instructions.py            # keyed dict sets and dict gets
    python bench/bench_instructions.py -n 2000 set

A reactor (``beaver_server._Reactor``) serves a fresh database in a child process run under
``valgrind --tool=callgrind`` with collection off; a ``BeaverClient`` in this process warms it
up, collection goes on for ``n`` requests only, and the count divided by ``n`` is printed.
Timings on a shared 2-core machine swing by tens of percent; instruction counts do not, so
this is how a change to the request path is judged before the side-by-side benchmark
(``bench_server.py``) confirms it. Needs valgrind (``apt-get install valgrind``).
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import beaver  # noqa: E402  (the beaver.py of this checkout)

SERVE = """
import socket, sys
sys.path.insert(0, {root!r})
import beaver, beaver_server
db = beaver.BeaverDB({path!r})
app = beaver_server.create_app(db)
listener = socket.create_server(("127.0.0.1", 0))
reactor = beaver_server._Reactor(app.beaver, [listener], lambda sock, pending: sock.close(),
                                 limit=100, header_timeout=600, keep_alive=600)
print(listener.getsockname()[1], flush=True)
sys.stdin.read()                    # until this benchmark closes the pipe
reactor.close()
db.close()
"""


def serve(folder):
    """The reactor's process under callgrind, and its port."""
    script = SERVE.format(root=ROOT, path=os.path.join(folder, "bench.db"))
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no",
         f"--callgrind-out-file={folder}/callgrind.out", sys.executable, "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, int(process.stdout.readline())


def requests(client, what, n):
    """Send ``n`` requests of kind ``what`` ("set": keyed dict sets, "get": dict gets)."""
    d = client.dict("bench")
    if what == "get":
        for i in range(n):
            d.get(f"w{i % 1000}")
    else:
        for _ in range(n):
            key = f"k{random.randrange(10 ** 9)}"
            d[key] = {"value": key, "n": 1}


def count(what, n) -> float:
    """Instructions of the server process per request of kind ``what``."""
    folder = tempfile.mkdtemp(prefix="beaver-instructions-")
    process, port = serve(folder)
    try:
        client = beaver.BeaverClient(f"http://127.0.0.1:{port}")
        for i in range(1000):               # the keys the gets read
            client.dict("bench")[f"w{i}"] = {"v": i}
        requests(client, what, 200)         # warm-up: statement caches, the header memo
        control = ["callgrind_control", "-i"]
        subprocess.run(control + ["on", str(process.pid)], check=True, capture_output=True)
        requests(client, what, n)
        subprocess.run(control + ["off", str(process.pid)], check=True, capture_output=True)
        client.close()
    finally:
        process.stdin.close()
        log = process.stderr.read()
        process.wait()
        shutil.rmtree(folder, ignore_errors=True)
    return int(re.search(r"Collected : (\d+)", log).group(1)) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="requests counted")
    parser.add_argument("what", nargs="*", help="set (keyed dict sets), get (dict gets); "
                                                "default: both")
    args = parser.parse_args()
    if set(args.what) - {"set", "get"}:
        parser.error("what is 'set' or 'get'")
    if shutil.which("valgrind") is None:
        sys.exit("bench_instructions: needs valgrind (apt-get install valgrind)")
    for what in args.what or ["set", "get"]:
        started = time.monotonic()
        per = count(what, args.n)
        print(f"dict {what}: {per / 1000:.1f}k instructions per request in the server "
              f"({args.n} requests, {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
