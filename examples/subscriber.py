"""The other half of the pair: prints what publisher.py sends, in another process.

    python examples/subscriber.py demo.db &
    python examples/publisher.py demo.db

It stops at the publisher's "bye", or after a few quiet seconds when run alone.
"""
import sys
import time

from beaver import BeaverDB


def main(path, quiet=3.0):
    with BeaverDB(path) as db:
        with db.channel("system_events").subscribe() as listener:
            print(f"[subscriber] listening (stops after {quiet:g}s of silence)")
            try:
                for message in listener.listen(timeout=quiet):
                    delay = (time.time() - message["at"]) * 1000 if "at" in message else 0
                    print(f"[subscriber] got {message['event']} ({delay:.1f} ms after sending)")
                    if message["event"] == "bye":
                        break
            except TimeoutError:
                print("[subscriber] nothing more arrived")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo.db")
