"""Write a sample database with the public ``beaver-db`` package, for the import tests.

Run it with the Python of a virtual environment where ``beaver-db`` 1.x or 2.x is installed
(never with this repository's beaver on the path)::

    PY313=$(pyenv root)/versions/3.13.0/bin/python
    $PY313 -m venv /tmp/up1 && /tmp/up1/bin/pip install beaver-db==1.3.0 cryptography
    $PY313 -m venv /tmp/up2 && /tmp/up2/bin/pip install beaver-db==2.4.1 cryptography
    /tmp/up1/bin/python scripts/make_upstream_fixtures.py fixtures/
    /tmp/up2/bin/python scripts/make_upstream_fixtures.py fixtures/

Each run writes ``upstream-VERSION.db`` (through the package's public API only) and
``upstream-VERSION.json``: what that same API reads back from the file (live dict items,
list order, queue order, blobs, log entries, channel messages, documents, vectors and
edges), which the tests compare with what ``beaver.import_upstream`` makes of the file.
The file also holds what an import must skip and report: an expired key, an encrypted dict,
a sketch, a held lock, event notifications, and a table of the application's own.
"""

import base64
import datetime as dt
import importlib.metadata
import json
import os
import sqlite3
import sys
import time

import beaver                                    # the public beaver-db package
from beaver import BeaverDB, Document

if not beaver.__file__.endswith("__init__.py"):   # this repository's single-module beaver
    sys.exit(f"{beaver.__file__} is not the beaver-db package: run this in its venv")

VERSION = importlib.metadata.version("beaver-db")
MAJOR = int(VERSION.split(".")[0])
UTC = dt.timezone.utc
T0 = dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
FAR = 10 * 365 * 86400                           # a TTL that outlives the fixture


def when(seconds):
    """A log timestamp as each major version takes it (1.x: datetime, 2.x: epoch)."""
    moment = T0 + dt.timedelta(seconds=seconds)
    return moment if MAJOR == 1 else moment.timestamp()


def write_dicts(db):
    config = db.dict("app_config")
    config["theme"] = "dark"
    config["limits"] = {"retries": 3, "ratio": 0.25, "nested": {"ok": True, "none": None}}
    config["ключ"] = "значение ✓ 🦫"
    config.set("session", {"user": "alice"}, ttl_seconds=FAR)          # live TTL
    config.set("stale", "gone soon", ttl_seconds=0.2)                  # expires below
    db.dict("données")["clé"] = [1, 2.5, "trois", None]
    time.sleep(0.5)


def write_lists(db):
    tasks = db.list("tasks")
    for item in ["b", {"id": 2, "tags": ["x", "y"]}, 3, None, "z"]:
        tasks.push(item)
    tasks.prepend("a")
    for i in range(6):                           # repeated inserts at one spot
        tasks.insert(2, f"mid-{i}")
    tasks[1] = "b (edited)"
    tasks.pop()
    tasks.deque()
    db.list("üñï").push("ü")


def write_queues(db):
    jobs = db.queue("jobs")
    for data, priority in [({"job": "later"}, 10), ({"job": "first"}, 1), ("second", 1),
                           ({"job": "urgent"}, -5), ("fractional", 2.5), ("taken", 0)]:
        jobs.put(data, priority=priority)
        time.sleep(0.002)                        # distinct timestamps: FIFO among equals
    taken = jobs.get(block=False)
    assert taken.data == {"job": "urgent"}, taken


def write_blobs(db):
    files = db.blob("files")
    files.put("all-bytes.bin", bytes(range(256)), metadata={"mimetype": "application/octet-stream"})
    files.put("notes/ünïcode.txt", "héllo 🦫".encode("utf-8"), metadata={"lang": "fr"})
    files.put("no-meta", b"\x00")


def write_logs(db):
    metrics = db.log("metrics")
    for i, cpu in enumerate([0.5, 0.75, 0.125, 0.9]):
        metrics.log({"cpu": cpu, "i": i}, timestamp=when(i * 60))
    metrics.log({"note": "earlier, logged last"}, timestamp=when(-3600))


def write_channels(db):
    chat = db.channel("chat")
    for text in ["hello", "ça va ?", "👋"]:
        chat.publish({"text": text})
        time.sleep(0.002)


def write_collections(db):
    """1.x: one collection holds documents, vectors and edges; 2.x splits them by name."""
    docs = [  # (id, embedding, body)
        ("sqlite", [0.1, 0.9, 0.2, 0.0], {"title": "SQLite", "text": "An embedded database engine."}),
        ("postgres", [0.2, 0.8, 0.1, 0.3], {"title": "PostgreSQL", "meta": {"kind": "server database"}}),
        ("beaver", [0.9, 0.1, 0.0, 0.5], {"title": "Beaver 🦫", "text": "Un castor construit des barrages."}),
        ("plain", None, "A string body."),
        ("quiet", [0.0, 0.0, 1.0, 0.0], {"text": "not searchable"}),
        ("gone", None, {"text": "dropped before the end"}),
    ]
    if MAJOR == 1:
        articles = db.collection("articles")
        docs = [Document(id=i, embedding=e, body=b) for i, e, b in docs]
        for doc in docs:
            articles.index(doc, fts=doc.id != "quiet", fuzzy=doc.id == "beaver")
        articles.connect(docs[0], docs[1], label="SIMILAR")
        articles.connect(docs[0], docs[2], label="MENTIONS")
        articles.connect(docs[2], docs[0], label="MENTIONS")
        articles.drop(docs[5])
        graph = db.collection("people")
        people = [Document(id=n, body={"name": n}) for n in ("ana", "bo", "cy")]
        for person in people:
            graph.index(person)
        graph.connect(people[0], people[1], label="KNOWS")
        graph.connect(people[1], people[2], label="KNOWS")
        return
    articles, vectors, graph = db.docs("articles"), db.vectors("articles"), db.graph("articles")
    for doc_id, embedding, body in docs:
        articles.index(id=doc_id, body=body, fts=doc_id != "quiet", fuzzy=doc_id == "beaver")
        if embedding is not None:                # vector metadata beside a document body:
            vectors.set(doc_id, embedding, metadata={"model": "toy"} if doc_id == "sqlite"
                        else None)               # an import keeps the body, reports this
    articles.drop("gone")
    graph.link("sqlite", "postgres", "SIMILAR", metadata={"score": 0.8})
    graph.link("sqlite", "beaver", "MENTIONS")
    graph.link("beaver", "sqlite", "MENTIONS")
    social = db.graph("people")                 # a graph whose nodes are no documents
    social.link("ana", "bo", "KNOWS", metadata={"since": 2020})
    social.link("bo", "cy", "KNOWS")
    embeddings = db.vectors("embeddings")       # vectors alone, with metadata
    embeddings.set("v1", [1.0, 0.0, 0.0], metadata={"label": "x axis"})
    embeddings.set("v2", [0.0, 1.0, 0.0], metadata={"label": "y axis"})
    embeddings.set("v3", [0.5, 0.5, 0.7071])


def write_skipped(db):
    """What an import cannot carry over and must report."""
    try:
        db.dict("vault", secret="correct horse battery staple")["pin"] = "1234"
    except (ImportError, TypeError) as e:        # no [security] extra, or a release without
        print(f"note: no encrypted dict written ({e})", file=sys.stderr)      # secret=
    if hasattr(db, "sketch"):                    # sketches came with 1.1
        sketch = db.sketch("visitors", capacity=100)
        for visitor in ("ana", "bo", "cy"):
            sketch.add(visitor)
    if MAJOR == 1:
        db.dict("app_config").on("set", lambda payload: None)
        db.dict("app_config")["theme"] = "dark"  # an event notification row
    else:
        db.events("deployments").emit("done", {"build": 42})
    db.lock("nightly", ttl=3600).acquire() if MAJOR == 2 else db.lock(
        "nightly", lock_ttl=3600).acquire()


def expected(db):
    """What the package's own API reads back from the file."""
    out = {"version": VERSION, "dicts": {}, "lists": {}, "queues": {}, "blobs": {},
           "logs": {}, "channels": {}, "collections": {}}
    for name in ("app_config", "données"):      # get() hides expired keys (items() may not)
        d = db.dict(name)
        read = d.get if MAJOR == 1 else d.fetch
        keys = [k for k in d.keys() if k != "stale"]     # 1.x get() would delete its row
        out["dicts"][name] = {k: read(k, None) for k in keys if read(k, None) is not None}
    for name in ("tasks", "üñï"):
        out["lists"][name] = list(db.list(name))
    out["queues"]["jobs"] = [[i.priority, i.data] for i in db.queue("jobs")]
    files = db.blob("files")
    out["blobs"]["files"] = {key: [base64.b64encode(blob.data).decode(), blob.metadata]
                             for key in ("all-bytes.bin", "notes/ünïcode.txt", "no-meta")
                             for blob in [files.fetch(key) if MAJOR == 2 else files.get(key)]}
    entries = list(db.log("metrics")) if MAJOR == 1 else [
        (e.timestamp, e.data) for e in db.log("metrics").range()]
    out["logs"]["metrics"] = [[t, data] for t, data in entries]
    out["channels"]["chat"] = ([m.payload for m in db.channel("chat").history()] if MAJOR == 2
                               else [{"text": t} for t in ["hello", "ça va ?", "👋"]])
    out["collections"] = collections_expected(db)
    return out


def collections_expected(db):
    if MAJOR == 1:
        result = {}
        for name in ("articles", "people"):
            coll = db.collection(name)
            docs = {d.id: {"body": d.body, "embedding": d.embedding} for d in coll}
            edges = sorted([d.id, n.id] for d in coll for n in coll.neighbors(d))
            result[name] = {"documents": docs, "edges": edges}
        return result
    docs = {d.id: {"body": d.body, "embedding": None} for d in db.docs("articles")}
    for item in db.vectors("articles"):
        docs.setdefault(item.id, {"body": None})["embedding"] = item.vector
    result = {"articles": {"documents": docs, "edges": []}, "people": {"documents": {},
                                                                       "edges": []},
              "embeddings": {"documents": {item.id: {"body": item.metadata,
                                                     "embedding": item.vector}
                                           for item in db.vectors("embeddings")},
                             "edges": []}}
    for name, nodes in (("articles", docs), ("people", ["ana", "bo", "cy"])):
        result[name]["edges"] = sorted(
            [e.source, e.target, e.label, e.metadata]
            for node in nodes for e in db.graph(name).edges(node))
    return result


def main(folder):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"upstream-{VERSION}.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    db = BeaverDB(path)
    for write in (write_dicts, write_lists, write_queues, write_blobs, write_logs,
                  write_channels, write_collections, write_skipped):
        write(db)
    facts = expected(db)
    db.close()
    conn = sqlite3.connect(path, isolation_level=None)   # a table of the application's own
    conn.execute("CREATE TABLE app_notes (id INTEGER PRIMARY KEY, note TEXT)")
    conn.execute("INSERT INTO app_notes (note) VALUES ('not beaver data')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(os.path.join(folder, f"upstream-{VERSION}.json"), "w", encoding="utf-8") as f:
        json.dump(facts, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes) with beaver-db {VERSION} "
          f"({beaver.__file__})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
