"""Callbacks on changes: ``.on(event, callback)`` and ``handle.off()``, across processes too."""
import os
import tempfile
import threading

from beaver import BeaverDB


def main(path):
    with BeaverDB(path) as db:
        config = db.dict("app_config")
        done = threading.Semaphore(0)

        def on_config_change(payload):
            print(f"EVENT RECEIVED: {payload['event']} of key {payload['key']!r}")
            done.release()

        set_handle = config.on("set", on_config_change)
        del_handle = config.on("del", on_config_change)

        print("Setting 'theme'...")
        config["theme"] = "dark"
        done.acquire(timeout=5)                 # callbacks run on a background thread
        print("Deleting 'theme'...")
        del config["theme"]
        done.acquire(timeout=5)

        set_handle.off()
        del_handle.off()
        print("Listeners are off. This change will be silent.")
        config["theme"] = "light"

        with BeaverDB(path) as other:            # another connection, as another process would
            everything = other.queue("jobs").on("*", lambda p: (print("queue:", p["event"],
                                                                      p["data"]), done.release()))
            db.queue("jobs").put({"job": 1})
            done.acquire(timeout=5)
            everything.off()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "events.db"))
