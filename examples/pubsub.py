"""Publish/subscribe inside one process: every subscriber gets every message, in order."""
import os
import tempfile
import threading

from beaver import BeaverDB


def listener(db, number, ready, count):
    with db.channel("system_events").subscribe() as sub:
        ready.release()
        for i, message in enumerate(sub.listen(timeout=10), 1):
            print(f"  subscriber {number} got {message}")
            if i == count:
                break


def main(path):
    with BeaverDB(path) as db:
        events = db.channel("system_events")
        ready = threading.Semaphore(0)
        threads = [threading.Thread(target=listener, args=(db, n, ready, 3)) for n in (1, 2)]
        for t in threads:
            t.start()
        for _ in threads:
            ready.acquire()                      # both subscribed: nothing will be missed
        for user in ("alice", "bob", "carol"):
            events.publish({"event": "user_login", "user_id": user})
        for t in threads:
            t.join()
        print(f"{len(events)} messages retained on the channel")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "pubsub.db"))
