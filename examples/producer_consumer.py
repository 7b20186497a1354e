"""Several processes share one queue: every job is handled exactly once.

Producers put jobs; consumers block on ``get`` until a job arrives; a "stop" job with a
lower priority (a higher number) ends each consumer once the real jobs are done.
"""
import multiprocessing
import os
import tempfile

from beaver import BeaverDB

PRODUCERS, CONSUMERS, JOBS_EACH = 2, 3, 25
DEADLINE = 60      # seconds: nothing in this example waits longer


def producer(path, number):
    with BeaverDB(path) as db:
        jobs = db.queue("jobs")
        for i in range(JOBS_EACH):
            jobs.put({"producer": number, "job": i}, priority=0)


def consumer(path, number):
    with BeaverDB(path) as db:
        jobs, done = db.queue("jobs"), db.list("done")
        while True:
            item = jobs.get(timeout=DEADLINE)
            if item.data == "stop":
                return
            done.push({"consumer": number, **item.data})


def run(ctx, target, args_list):
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    return procs


def main(path):
    ctx = multiprocessing.get_context("spawn")
    consumers = run(ctx, consumer, [(path, n) for n in range(CONSUMERS)])
    producers = run(ctx, producer, [(path, n) for n in range(PRODUCERS)])
    for p in producers:
        p.join(DEADLINE)
    with BeaverDB(path) as db:
        for _ in consumers:
            db.queue("jobs").put("stop", priority=1)
    for p in consumers:
        p.join(DEADLINE)
    if any(p.exitcode != 0 for p in producers + consumers):
        raise SystemExit("a worker failed or missed the deadline")
    with BeaverDB(path) as db:
        done = list(db.list("done"))
    handled = sorted((d["producer"], d["job"]) for d in done)
    assert handled == [(p, j) for p in range(PRODUCERS) for j in range(JOBS_EACH)], handled
    for n in range(CONSUMERS):
        print(f"consumer {n} handled {sum(d['consumer'] == n for d in done)} jobs")
    print(f"{len(done)} jobs, each handled exactly once")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "jobs.db"))
