"""An inter-process lock: only one of several processes refreshes a shared value."""
import multiprocessing
import os
import tempfile
import time

from beaver import BeaverDB


def scraper(path):
    with BeaverDB(path) as db:
        state = db.dict("scraper_state")
        if time.time() - state.get("last_sitemap_refresh", 0) > 3600:
            try:
                with db.lock("refresh_sitemap", timeout=0.5):        # don't wait long
                    if time.time() - state.get("last_sitemap_refresh", 0) > 3600:
                        print(f"PID {os.getpid()} is refreshing the sitemap...")
                        time.sleep(0.2)                              # the slow fetch
                        state["sitemap"] = ["/page1", "/page2"]
                        state["last_sitemap_refresh"] = time.time()
            except TimeoutError:
                print(f"PID {os.getpid()} lets another process refresh")
        print(f"PID {os.getpid()} proceeds with sitemap {state.get('sitemap')}")


def main(path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=scraper, args=(path,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    with BeaverDB(path) as db:
        lock = db.lock("report", ttl=5)          # held at most 5 s unless renewed
        with lock.acquire(timeout=1):
            print(f"holding 'report' with fencing token {lock.token}")
            lock.renew()
        print("released; locked now?", lock.locked)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "locks.db"))
