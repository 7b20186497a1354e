"""One half of a pair: publishes messages on a channel (run subscriber.py beside it).

    python examples/subscriber.py demo.db &
    python examples/publisher.py demo.db

Alone, it publishes a few messages to nobody and exits.
"""
import sys
import time

from beaver import BeaverDB


def main(path, count=5, pause=0.2):
    with BeaverDB(path) as db:
        events = db.channel("system_events")
        for i in range(count):
            events.publish({"event": "tick", "n": i, "at": time.time()})
            print(f"[publisher] sent tick {i}")
            time.sleep(pause)
        events.publish({"event": "bye"})
        print("[publisher] sent bye")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo.db")
