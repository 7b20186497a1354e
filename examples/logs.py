"""A time-indexed log with a live, rolling summary (a tiny terminal dashboard)."""
import os
import random
import statistics
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone

from beaver import BeaverDB


def summarize(window):
    if not window:
        return {"mean": 0.0, "count": 0}
    values = [log.get("value", 0) for log in window]
    return {"mean": statistics.mean(values), "count": len(values)}


def writer(logs, stop):
    while not stop.is_set():
        logs.log({"value": random.uniform(0, 100)})
        time.sleep(0.05)


def main(path):
    with BeaverDB(path) as db:
        logs = db.log("system_metrics")
        stop = threading.Event()
        thread = threading.Thread(target=writer, args=(logs, stop))
        thread.start()
        live = logs.live(window=timedelta(seconds=1), period=timedelta(seconds=0.25),
                         aggregator=summarize)
        with live:
            for i, summary in enumerate(live):
                print(f"Live stats (1s window): count={summary['count']}, "
                      f"mean={summary['mean']:.2f}")
                if i == 6:
                    break
        stop.set()
        thread.join()
        since = datetime.now(timezone.utc) - timedelta(seconds=0.5)
        print(f"{len(logs)} entries in all, {len(logs.range(start=since))} in the last 0.5s")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "logs.db"))
