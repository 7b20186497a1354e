"""A quick tour of every structure beaver offers, in one database file (runs in a second).

Sections for structures that this copy of beaver.py does not have yet are skipped.
"""
import asyncio
import os
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone

import beaver
from beaver import BeaverDB, Model


class Task(Model):
    title: str
    done: bool = False


def tour_dict(db):
    config = db.dict("app_config")
    config["theme"] = "dark"
    config.set("session", {"user": "alice"}, ttl_seconds=0.2)      # expires on its own
    config.set("token", "abc123", ttl_seconds=3600)
    print("dict:", sorted(config), "| token expires in", round(config.ttl("token") / 60), "min")
    time.sleep(0.25)
    print("     after 0.25 s:", sorted(config))


def tour_list(db):
    history = db.list("chat")
    history.extend(["hi", "hello!", "how are you?"])
    history.prepend("(start)")
    history.insert(-1, "(typing...)")
    print("list:", list(history), "| last two:", history[-2:], "| pop:", history.pop())


def tour_queue(db):
    jobs = db.queue("jobs")
    jobs.put({"action": "backup"}, priority=20)
    jobs.put({"action": "reply"}, priority=1)
    print("queue:", [item.data["action"] for item in jobs], "| get:", jobs.get().data)


def tour_blobs(db):
    files = db.blobs("uploads")
    files.put("hello.txt", b"hello, beaver", metadata={"mimetype": "text/plain"})
    blob = files.get("hello.txt")
    print("blobs:", blob.key, blob.data, blob.metadata)


def tour_models(db):
    todo = db.list("todo", model=Task)
    todo.push(Task(title="write the tour"))
    todo.push({"title": "ship it", "done": True})
    print("model:", todo[0], "|", todo[1].title, todo[1].done)


def tour_transactions_and_locks(db):
    accounts, ledger = db.dict("accounts"), db.list("ledger")
    accounts.update(alice=100, bob=0)
    with db.transaction():                     # all or nothing, across structures
        accounts["alice"] -= 30
        accounts["bob"] += 30
        ledger.push({"from": "alice", "to": "bob", "amount": 30})
    with db.lock("nightly-report", timeout=5):  # one holder across processes
        pass
    with db.dict("accounts") as locked:         # a structure's own lock, for batches
        locked["bob"] += 1
    print("transaction:", dict(accounts), "| ledger:", list(ledger))


def tour_events_and_async(db):
    seen = threading.Event()
    handle = db.dict("app_config").on("set", lambda payload: seen.set())
    db.dict("app_config")["theme"] = "light"
    print("events: callback ran:", seen.wait(5))
    handle.off()

    async def main():
        queue = db.queue("async_jobs").as_async()
        await queue.put("from asyncio")
        return (await queue.get(timeout=5)).data
    print("async:", asyncio.run(main()))


def tour_dump(db):
    data = db.dict("app_config").dump()
    copy = db.dict("config_copy")
    copy.load(data)
    print("dump/load:", data["metadata"]["count"], "items ->", dict(copy))


def tour_collection(db):
    from beaver import Document
    articles = db.collection("articles")
    articles.index(Document(id="sqlite-001", embedding=[0.1, 0.9],
                            body="SQLite is a powerful embedded database ideal for local apps."),
                   fts=True, fuzzy=True)
    articles.index(Document(id="py-001", embedding=[0.9, 0.1],
                            body="Python is a great language for fast prototyping."))
    doc, score = articles.match(query="datbase", fuzziness=1)[0]
    print("collection: fuzzy match ->", doc.id, "| nearest vector ->",
          articles.search(vector=[0.2, 0.8], top_k=1)[0][0].id)
    articles.connect(doc, articles.search(vector=[1.0, 0.0], top_k=1)[0][0], label="SEE_ALSO")
    print("            neighbors:", [d.id for d in articles.neighbors(doc, label="SEE_ALSO")])


def tour_log(db):
    metrics = db.log("metrics")
    for value in (1, 2, 3):
        metrics.log({"value": value})
    now = datetime.now(timezone.utc)
    entries = metrics.range(now - timedelta(minutes=1), now + timedelta(minutes=1))
    print("log:", len(entries), "entries in the last minute")


def tour_channel(db):
    channel = db.channel("system_events")
    with channel.subscribe() as listener:
        channel.publish({"event": "user_login", "user_id": "alice"})
        for message in listener.listen():
            print("channel: received", message)
            break


def tour_backup(db):
    import io
    folder = os.path.dirname(db.path)
    copy_path = db.backup(os.path.join(folder, "tour-backup.db"))   # while others write
    buffer = io.StringIO()
    count = db.dump(buffer)                                       # every structure, as JSON lines
    with BeaverDB(os.path.join(folder, "restored.db")) as restored:
        restored.load(io.StringIO(buffer.getvalue()))
        print(f"backup: {os.path.basename(copy_path)} | dump/load: {count} structures,",
              len(restored.info()["structures"]), "restored")


def main(path):
    with BeaverDB(path) as db:
        tour_dict(db)
        tour_list(db)
        tour_queue(db)
        tour_blobs(db)
        tour_models(db)
        tour_transactions_and_locks(db)
        tour_events_and_async(db)
        tour_dump(db)
        for name, section in [("collection", tour_collection), ("log", tour_log),
                              ("channel", tour_channel), ("backup", tour_backup)]:
            if hasattr(BeaverDB, name):
                section(db)
            else:
                print(f"({name}: not in this beaver {beaver.__version__} yet)")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "tour.db"))
