"""Tests of beaver, in the order of beaver.py's sections."""
import subprocess
import sys

import pytest

import beaver
from beaver import BeaverDB


@pytest.fixture
def db(tmp_path):
    database = BeaverDB(tmp_path / "test.db")
    yield database
    database.close()


def test_import_without_site_packages():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import beaver; print(beaver.__version__)"
    out = subprocess.run([sys.executable, "-S", "-c", code, str(__import__("pathlib").Path(beaver.__file__).parent)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == beaver.__version__


def test_dict_round_trip(db):
    config = db.dict("app_config")
    config["theme"] = "dark"
    assert config["theme"] == "dark"
    assert len(config) == 1


# ---- dump/load/backup ----

import io
import json
import os
import socket
import sqlite3
import threading
import time
import uuid


def _fill(db):
    """One structure of every kind, with the awkward cases: TTL, models, bytes, priorities."""
    config = db.dict("app_config")
    config["theme"] = "dark"
    config.set("session", {"user": 1}, ttl_seconds=3600)
    tasks = db.list("daily_tasks")
    tasks.extend([{"id": "task-001"}, "plain", 3, None])
    jobs = db.queue("jobs")
    jobs.put({"action": "backup"}, priority=20)
    jobs.put({"action": "reply"}, priority=1)
    db.blobs("files").put("a.bin", bytes(range(256)), metadata={"mimetype": "application/x"})
    db.blobs("files").put("empty", b"")


def _snapshot(db):
    return {
        "dict": sorted(db.dict("app_config").items()),
        "ttl": db.dict("app_config").ttl("session"),
        "list": list(db.list("daily_tasks")),
        "queue": [(i.priority, i.timestamp, i.data) for i in db.queue("jobs")],
        "blobs": [(k, db.blobs("files")[k].data, db.blobs("files")[k].metadata)
                  for k in db.blobs("files").keys()],
    }


def test_dump_load_reproduces_every_structure(tmp_path, db):
    _fill(db)
    out = io.StringIO()
    assert db.dump(out) == 4
    lines = out.getvalue().splitlines()
    assert json.loads(lines[0])["beaver_dump"] == 1 and json.loads(lines[-1])["end"] is True
    with BeaverDB(tmp_path / "copy.db") as copy:
        assert copy.load(io.StringIO(out.getvalue())) == 4
        before, after = _snapshot(db), _snapshot(copy)
        assert abs(before.pop("ttl") - after.pop("ttl")) < 5
        assert before == after
        assert copy.info()["structures"] == db.info()["structures"]


def test_dump_skips_expired_and_selects_names(db):
    db.dict("c").set("gone", 1, ttl_seconds=0.001)
    db.dict("c")["kept"] = 2
    db.list("l").push(1)
    time.sleep(0.01)  # let the TTL pass (not synchronisation)
    out = io.StringIO()
    assert db.dump(out, names=["c"]) == 1
    text = out.getvalue()
    assert '"kept"' in text and '"gone"' not in text and '"list"' not in text
    out = io.StringIO()
    assert db.dump(out, names=["list:l"]) == 1


def test_load_append_and_replace(db):
    db.list("l").extend([1, 2])
    out = io.StringIO()
    db.dump(out)
    db.load(io.StringIO(out.getvalue()))
    assert list(db.list("l")) == [1, 2, 1, 2]
    db.dict("other")["x"] = 1
    db.load(io.StringIO(out.getvalue()), mode="replace")
    assert list(db.list("l")) == [1, 2] and db.dict("other")["x"] == 1


@pytest.mark.parametrize("text", ["", "nonsense\n", '{"beaver_dump": 99}\n',
                                  '{"beaver_dump": 1}\n{"structure": "list", "name": "l", '
                                  '"count": 2}\n1\n'])
def test_load_rejects_bad_dumps_atomically(db, text):
    with pytest.raises(ValueError):
        db.load(io.StringIO(text))
    assert len(db.list("l")) == 0
    with pytest.raises(ValueError):
        db.load(io.StringIO(""), mode="merge")


def test_info_lists_structures_and_locks(db):
    _fill(db)
    with db.lock("cron"):
        info = db.info()
    kinds = {(s["kind"], s["name"]): s for s in info["structures"]}
    assert kinds[("dict", "app_config")]["size"] == 2
    assert kinds[("queue", "jobs")]["size"] == 2
    assert kinds[("lock", "cron")]["locked"] is True
    assert info["bytes"] > 0 and info["beaver_version"] == beaver.__version__


def _write_forever(path, stop):
    with BeaverDB(path) as writer:
        log = writer.list("writes")
        n = 0
        while not stop.is_set():
            with writer.transaction():
                log.push(n)
                writer.dict("counter")["n"] = n
            n += 1


def test_backup_during_concurrent_writes(tmp_path, db):
    db.list("writes").push(-1)
    stop = threading.Event()
    writer = threading.Thread(target=_write_forever, args=(db.path, stop))
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while len(db.list("writes")) < 50 and time.monotonic() < deadline:
            db._core.watcher.wait_for(lambda: len(db.list("writes")) >= 50 or None, 0.05)
        copies = [db.backup(tmp_path / f"copy{i}.db") for i in range(3)]
    finally:
        stop.set()
        writer.join()
    for copy in copies:
        conn = sqlite3.connect(copy)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        with BeaverDB(copy) as restored:
            items = list(restored.list("writes"))
            assert items[0] == -1 and items[1:] == list(range(len(items) - 1))
            assert restored.dict("counter").get("n", -1) == len(items) - 2
    with pytest.raises(ValueError):
        db.backup(db.path)


# ---- client and server ----

fastapi = None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A real ``python -m beaver_server`` process on 127.0.0.1, killed at the end."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    path = tmp_path_factory.mktemp("server") / "served.db"
    port = _free_port()
    here = os.path.dirname(os.path.abspath(beaver.__file__))
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "beaver_server", "--database", str(path), "--port", str(port),
         "--max-wait", "2", "--log-level", "warning"], env=env, cwd=here)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert process.poll() is None, "the server process died"
                assert time.monotonic() < deadline, "the server did not start in 30 s"
                time.sleep(0.05)  # polling a port: nothing to wait on
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(params=["local", "remote"])
def anydb(request, tmp_path):
    """The same tests against ``BeaverDB`` and against ``BeaverClient`` over HTTP."""
    if request.param == "local":
        database = BeaverDB(tmp_path / "local.db")
    else:
        database = beaver.BeaverClient(request.getfixturevalue("server_url"))
    yield database
    database.close()


@pytest.fixture
def uid():
    return uuid.uuid4().hex[:8]


def test_same_api_dict(anydb, uid):
    config = anydb.dict(f"{uid}-config")
    config["theme"] = "dark"
    config.set("session", {"user": 1}, ttl_seconds=100)
    config["odd/key with space"] = [1, "two"]
    assert config["theme"] == "dark" and config.get("missing", 7) == 7
    assert "theme" in config and "missing" not in config and 3 not in config
    assert len(config) == 3 and sorted(config) == sorted(config.keys())
    assert config["odd/key with space"] == [1, "two"]
    assert 90 < config.ttl("session") <= 100 and config.ttl("theme") is None
    with pytest.raises(KeyError):
        config["missing"]
    with pytest.raises(KeyError):
        del config["missing"]
    assert config.pop("theme") == "dark" and config.pop("theme", None) is None
    assert config.setdefault("x", 1) == 1 and config.setdefault("x", 2) == 1
    config.update({"a": 1}, b=2)
    assert dict(config.items())["b"] == 2 and 2 in config.values()
    config.clear()
    assert len(config) == 0


def test_same_api_dict_with_model(anydb, uid):
    class User(beaver.Model):
        name: str
        id: int
    users = anydb.dict(f"{uid}-users", model=User)
    users["alice"] = User(name="Alice", id=1)
    assert users["alice"] == User(name="Alice", id=1)
    assert users.items() == [("alice", User(name="Alice", id=1))]
    with pytest.raises((TypeError, ValueError)):
        users["bob"] = "not a user"


def test_same_api_list(anydb, uid):
    tasks = anydb.list(f"{uid}-tasks")
    tasks.push("b")
    tasks.prepend("a")
    tasks.extend(["c", "d"])
    tasks.insert(-1, "x")
    assert list(tasks) == ["a", "b", "c", "x", "d"] and len(tasks) == 5
    assert tasks[0] == "a" and tasks[-1] == "d" and tasks[1:4] == ["b", "c", "x"]
    assert tasks[::2] == ["a", "c", "d"]
    tasks[3] = "X"
    del tasks[3]
    tasks[0:2] = ["A", "B", "B2"]
    del tasks[::3]
    assert list(tasks) == ["B", "B2", "d"]
    with pytest.raises(IndexError):
        tasks[10]
    with pytest.raises(IndexError):
        tasks.pop(10)
    assert tasks.pop() == "d" and tasks.deque() == "B" and tasks.index("B2") == 0
    tasks.reverse()
    assert tasks.pop() == "B2" and tasks.pop() is None and tasks.deque() is None
    tasks.push(None)
    assert tasks.pop() is None and len(tasks) == 0


def test_same_api_queue(anydb, uid):
    jobs = anydb.queue(f"{uid}-jobs")
    jobs.put({"action": "backup"}, priority=20)
    jobs.put({"action": "reply"}, priority=1)
    jobs.put({"action": "later"}, priority=20)
    assert len(jobs) == 3 and jobs.peek().data == {"action": "reply"}
    assert [i.data["action"] for i in jobs] == ["reply", "backup", "later"]
    item = jobs.get()
    assert isinstance(item, beaver.QueueItem) and item.priority == 1
    assert jobs.get(timeout=1).data == {"action": "backup"}
    assert jobs.get(block=False).data == {"action": "later"}
    with pytest.raises(IndexError):
        jobs.get(block=False)
    with pytest.raises(TimeoutError):
        jobs.get(timeout=0.05)
    assert jobs.peek() is None


def test_same_api_queue_blocking_get_wakes(anydb, uid):
    jobs = anydb.queue(f"{uid}-wake")
    got = []
    taker = threading.Thread(target=lambda: got.append(jobs.get(timeout=20)))
    taker.start()
    jobs.put("hello")
    taker.join(timeout=30)
    assert [i.data for i in got] == ["hello"]


def test_same_api_blobs(anydb, uid):
    files = anydb.blobs(f"{uid}-files")
    files.put("a.png", b"\x89PNG\x00", metadata={"mimetype": "image/png"})
    files["plain"] = b""
    assert files.get("a.png") == beaver.Blob("a.png", b"\x89PNG\x00", {"mimetype": "image/png"})
    assert files["plain"].data == b"" and files["plain"].metadata is None
    assert files.get("missing") is None and "a.png" in files and "missing" not in files
    assert files.keys() == ["a.png", "plain"] and len(files) == 2
    with pytest.raises(KeyError):
        files["missing"]
    files.delete("a.png")
    with pytest.raises(KeyError):
        files.delete("a.png")
    with pytest.raises(TypeError):
        files.put("x", "not bytes")


def test_same_api_locks(anydb, uid):
    lock = anydb.lock(f"{uid}-cron", ttl=30)
    other = anydb.lock(f"{uid}-cron")
    with lock.acquire(timeout=5):
        first = lock.token
        assert lock.locked and other.locked
        with pytest.raises(TimeoutError):
            other.acquire(block=False)
        with pytest.raises(TimeoutError):
            other.acquire(timeout=0.05)
        lock.renew(10)
    assert not lock.locked
    with other:
        assert other.token > first
    with pytest.raises(beaver.LockLost):
        lock.release()
    with anydb.queue(f"{uid}-q").acquire(timeout=5) as q:
        q.put(1)
        assert len(q) == 1


def test_same_api_structure_dump_load_and_async(anydb, uid):
    import asyncio
    config = anydb.dict(f"{uid}-c")
    config["a"] = 1
    data = config.dump()
    assert data["metadata"]["count"] == 1
    copy = anydb.dict(f"{uid}-copy")
    copy.load(data)
    assert copy["a"] == 1

    async def run():
        aconfig = copy.as_async()
        await aconfig.set("b", 2)
        return await aconfig.get("b")
    assert asyncio.run(run()) == 2


def test_same_api_whole_database(anydb, uid, tmp_path):
    anydb.dict(f"{uid}-whole")["k"] = "v"
    out = io.StringIO()
    assert anydb.dump(out, names=[f"{uid}-whole"]) == 1
    anydb.dict(f"{uid}-whole")["k"] = "changed"
    anydb.load(io.StringIO(out.getvalue()), mode="replace")
    assert anydb.dict(f"{uid}-whole")["k"] == "v"
    assert any(s["name"] == f"{uid}-whole" for s in anydb.info()["structures"])
    path = anydb.backup(tmp_path / "remote-copy.db")
    with BeaverDB(path) as copy:
        assert copy.dict(f"{uid}-whole")["k"] == "v"


def test_client_threads_and_keep_alive(server_url, uid):
    client = beaver.BeaverClient(server_url)
    counter = client.list(f"{uid}-threads")

    def work():
        for i in range(20):
            counter.push(i)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counter) == 80
    assert len({id(c) for c in client._http._all}) == 5  # one connection per thread
    client.close()


def test_client_errors(server_url):
    with pytest.raises(beaver.RemoteError):
        beaver.BeaverClient("http://127.0.0.1:1").dict("x")["k"]
    with pytest.raises(ValueError):
        beaver.BeaverClient("ftp://example.com")
    client = beaver.BeaverClient(server_url)
    with pytest.raises(beaver.FeatureUnavailable):
        client.transaction()
    client.close()
    with pytest.raises(beaver.ClosedError):
        client.dict("x")


@pytest.fixture
def api(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    database = BeaverDB(tmp_path / "api.db")
    app = beaver_server.create_app(database, max_body_bytes=1000, max_wait=0.2)
    with TestClient(app) as client:
        client.db = database
        yield client
    database.close()


def test_server_spec_curl_examples(api):
    r = api.put("/dicts/app_config/api_key", content=b"your-secret-api-key",
                headers={"Content-Type": "application/json"})
    assert r.status_code == 204
    assert api.get("/dicts/app_config/api_key").text == '"your-secret-api-key"'
    api.client = None
    api.db.dict("app_config")["theme"] = "dark"
    assert api.get("/dict/app_config/theme").text == '"dark"'


def test_server_dict_routes(api):
    assert api.put("/dicts/c/k?ttl_seconds=60", json={"a": 1}).status_code == 204
    assert 0 < float(api.head("/dicts/c/k").headers["Beaver-TTL"]) <= 60
    assert api.head("/dicts/c/missing").status_code == 404
    for key in ("keys", "count", "items", "a/b"):   # no route swallows these keys
        assert api.put(f"/dicts/c/{key}", json=key).status_code == 204
        assert api.get(f"/dicts/c/{key}").json() == key
    assert api.get("/dicts/c").json() == {"name": "c", "size": 5}
    assert api.get("/dicts/c?view=keys").json()["keys"] == ["a/b", "count", "items", "k", "keys"]
    assert api.get("/dicts/c?view=items").json()["items"][0] == ["a/b", "a/b"]
    assert api.get("/dicts/c?view=dump").json()["dump"]["metadata"]["count"] == 5
    assert api.put("/dicts/c/new?if_absent=true", json=1).json() == 1
    assert api.put("/dicts/c/new?if_absent=true", json=2).json() == 1
    assert api.patch("/dicts/c", json={"p": 1, "q": 2}).status_code == 204
    assert api.delete("/dicts/c/p").json() == 1
    r = api.delete("/dicts/c/p")
    assert r.status_code == 404 and r.json() == {"error": "KeyError", "message": "p"}
    assert api.get("/dicts").json()[0]["name"] == "c"
    assert api.post("/dicts/d", json={"items": [{"key": "z", "value": 1}]}).status_code == 204
    assert api.delete("/dicts/d").status_code == 204 and api.get("/dicts/d").json()["size"] == 0


def test_server_list_routes(api):
    assert api.post("/lists/l/push", json="b").status_code == 204
    api.post("/lists/l/prepend", json="a")
    api.post("/lists/l/extend", json=["c", "d"])
    api.post("/lists/l/insert?index=1", json="x")
    assert api.get("/lists/l?view=items").json()["items"] == ["a", "x", "b", "c", "d"]
    assert api.get("/lists/l/items/-1").json() == "d"
    assert api.get("/lists/l/items/9").status_code == 404
    assert api.put("/lists/l/items/1", json="X").status_code == 204
    assert api.delete("/lists/l/items/1").status_code == 204
    assert api.get("/lists/l/slice?start=1&stop=3").json() == ["b", "c"]
    api.put("/lists/l/slice?start=0&stop=1", json=["A", "A2"])
    api.delete("/lists/l/slice?step=2")
    assert api.get("/lists/l/slice").json() == ["A2", "c"]
    assert api.get("/lists/l/slice?step=0").status_code == 422
    api.post("/lists/l/reverse")
    assert api.post("/lists/l/pop").json() == "A2" and api.post("/lists/l/deque").json() == "c"
    r = api.post("/lists/l/pop")
    assert r.json() is None and r.headers["Beaver-Empty"] == "1"
    assert api.post("/lists/l/pop?index=3").status_code == 404
    assert api.get("/lists/l/items/abc").status_code == 422


def test_server_queue_routes(api):
    assert api.post("/queues/q/put?priority=5", json={"n": 1}).status_code == 204
    api.post("/queues/q/put", json={"n": 2})
    assert api.get("/queues/q/peek").json()["data"] == {"n": 2}
    assert [i["data"]["n"] for i in api.get("/queues/q?view=items").json()["items"]] == [2, 1]
    assert api.post("/queues/q/get").json()["data"] == {"n": 2}
    assert api.post("/queues/q/get?timeout=1").json()["priority"] == 5
    r = api.post("/queues/q/get?timeout=0.01")
    assert r.status_code == 408 and r.json()["error"] == "Timeout"
    assert api.post("/queues/q/get?block=false").status_code == 404
    assert api.post("/queues/q/get").status_code == 408   # capped by max_wait
    assert api.post("/queues/q/put?priority=nan", json=1).status_code == 422


def test_server_blob_routes(api):
    r = api.put("/blobs/files/dir/a.txt", content=b"hello",
                headers={"Beaver-Metadata": '{"mimetype": "text/plain"}'})
    assert r.status_code == 204
    r = api.get("/blobs/files/dir/a.txt")
    assert r.content == b"hello" and r.headers["content-type"].startswith("text/plain")
    assert json.loads(r.headers["Beaver-Metadata"]) == {"mimetype": "text/plain"}
    assert api.head("/blobs/files/dir/a.txt").status_code == 200
    assert api.get("/blobs/files?view=keys").json()["keys"] == ["dir/a.txt"]
    assert api.put("/blobs/files/big", content=b"x" * 1001).status_code == 413
    assert api.put("/blobs/files/m", content=b"x",
                   headers={"Beaver-Metadata": "{not json"}).status_code == 422
    assert api.delete("/blobs/files/dir/a.txt").status_code == 204
    assert api.get("/blobs/files/dir/a.txt").status_code == 404


def test_server_lock_routes(api):
    held = api.post("/locks/cron/acquire?ttl=30").json()
    assert held["token"] and api.get("/locks/cron").json()["locked"] is True
    assert api.get(f"/locks/cron?token={held['token']}").json()["held"] is True
    r = api.post("/locks/cron/acquire?timeout=0.01")
    assert r.status_code == 409 and r.json()["error"] == "LockTimeout"
    assert api.post("/locks/cron/acquire?block=false").status_code == 409
    assert api.post(f"/locks/cron/renew?token={held['token']}&ttl=5").status_code == 204
    assert api.get("/locks").json()[0]["name"] == "cron"
    assert api.post(f"/locks/cron/release?token={held['token']}").status_code == 204
    r = api.post(f"/locks/cron/release?token={held['token']}")
    assert r.status_code == 409 and r.json()["error"] == "LockLost"
    assert api.post("/locks/other/renew?token=1").status_code == 409


def test_server_database_routes(api):
    api.db.dict("c")["k"] = "v"
    assert api.get("/").json()["beaver"] == beaver.__version__
    assert api.get("/info").json()["structures"] == [{"kind": "dict", "name": "c", "size": 1}]
    dump = api.get("/dump").text
    assert '"structure":"dict"' in dump
    api.db.dict("c")["k"] = "changed"
    assert api.post("/load?mode=replace", content=dump).json() == {"structures": 1}
    assert api.db.dict("c")["k"] == "v"
    assert api.post("/load", content=b"garbage").status_code == 422
    assert api.get("/backup").content.startswith(b"SQLite format 3\x00")
    assert api.get("/docs").status_code == 200
    assert api.get("/no/such/route").json()["error"] == "NotFound"


@pytest.mark.parametrize("method,path,body", [
    ("put", "/dicts/c/k?ttl_seconds=-1", b"1"), ("put", "/dicts/c/k?ttl_seconds=inf", b"1"),
    ("put", "/dicts/c/k", b""), ("put", "/dicts/c/k", b"\xff\xfe"),
    ("patch", "/dicts/c", b"[1]"), ("post", "/lists/l/extend", b'{"a": 1}'),
    ("post", "/lists/l/insert?index=x", b"1"), ("post", "/queues/q/get?timeout=-1", None),
    ("post", "/locks/x/acquire?ttl=0", None), ("post", "/locks/x/release?token=abc", None),
    ("post", "/dicts/c?mode=wipe", b"{}"), ("post", "/dicts/c", b'{"items": 3}'),
    ("post", "/lists/l", b'{"metadata": {"type": "dict"}, "items": []}'),
    ("get", "/dicts/c?view=nonsense", None), ("post", "/load", b'{"beaver_dump": 1}\n'),
])
def test_server_bad_input_is_4xx_json(api, method, path, body):
    r = api.request(method.upper(), path, content=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert set(r.json()) >= {"error", "message"}


def test_server_auth(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    app = beaver_server.create_app(str(tmp_path / "auth.db"), token="s3cret")
    with TestClient(app) as client:
        r = client.get("/dicts/c/k")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.put("/dicts/c/k", json=1, headers=ok).status_code == 204
        assert client.get("/dicts/c/k", headers=ok).json() == 1
        assert client.get("/openapi.json").status_code == 200


def test_server_refuses_public_host_without_token(capsys):
    pytest.importorskip("fastapi")
    import beaver_server
    assert beaver_server.main(["--host", "0.0.0.0", "--database", ":memory:"]) == 2
    assert "token" in capsys.readouterr().err
    assert beaver_server._is_loopback("::1") and beaver_server._is_loopback("localhost")
    assert not beaver_server._is_loopback("10.0.0.1")


def test_client_auth_against_real_server(tmp_path):
    pytest.importorskip("uvicorn")
    import uvicorn
    import beaver_server
    app = beaver_server.create_app(str(tmp_path / "a.db"), token="s3cret")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)  # polling uvicorn's started flag: nothing to wait on
        with pytest.raises(PermissionError):
            beaver.BeaverClient(f"http://127.0.0.1:{port}", token="wrong").dict("c")["k"] = 1
        good = beaver.BeaverClient(f"http://127.0.0.1:{port}", token="s3cret")
        good.dict("c")["k"] = 1
        assert good.dict("c")["k"] == 1
        good.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _fuzz_app():
    pytest.importorskip("schemathesis")
    import beaver_server
    return beaver_server.create_app(BeaverDB(":memory:"), max_body_bytes=10_000, max_wait=0.01)


@pytest.fixture
def fuzz_schema():
    import schemathesis
    return schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app())


try:
    import schemathesis as _schemathesis
    from hypothesis import HealthCheck, settings as _settings
except ImportError:  # pragma: no cover
    _schemathesis = None

if _schemathesis is not None:
    _lazy_schema = _schemathesis.pytest.from_fixture("fuzz_schema")

    @_lazy_schema.parametrize()
    @_settings(max_examples=2, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))
    def test_server_fuzz_never_500(case):
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, response.text[:300])


# ---- CLI ----

def _cli(capsys, *argv):
    code = beaver.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dbfile(tmp_path):
    return str(tmp_path / "cli.db")


def test_cli_spec_dict_and_list(capsys, dbfile):
    with BeaverDB(dbfile) as db:
        db.dict("app_config")["theme"] = "dark"
    assert _cli(capsys, "--database", dbfile, "dict", "app_config", "get", "theme") == \
        (0, '"dark"\n', "")
    assert _cli(capsys, "--database", dbfile, "dict", "app_config", "set", "user",
                '{"name": "Alice", "id": 123}')[0] == 0
    assert _cli(capsys, "--database", dbfile, "list", "daily_tasks", "push", "Review PRs")[0] == 0
    assert _cli(capsys, "client", "--database", dbfile, "dict", "app_config", "get", "user")[1] \
        == '{\n  "name": "Alice",\n  "id": 123\n}\n'
    with BeaverDB(dbfile) as db:
        assert db.dict("app_config")["user"] == {"name": "Alice", "id": 123}
        assert list(db.list("daily_tasks")) == ["Review PRs"]


def test_cli_dict_operations(capsys, dbfile, monkeypatch):
    run = lambda *a: _cli(capsys, "-d", dbfile, "dict", "c", *a)  # noqa: E731
    assert run("set", "n", "42") == (0, "", "")
    assert run("set", "s", "--ttl", "100", "text with spaces")[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO('{"from": "stdin"}\n'))
    assert run("set", "piped", "-")[0] == 0
    assert json.loads(run("get", "piped")[1]) == {"from": "stdin"}
    assert json.loads(run("get", "n")[1]) == 42
    assert 0 < json.loads(run("ttl", "s")[1]) <= 100
    assert json.loads(run("keys")[1]) == ["n", "piped", "s"]
    assert json.loads(run("items")[1])["s"] == "text with spaces"
    assert run("len")[1] == "3\n" and run("has", "n")[0] == 0 and run("has", "zz")[0] == 1
    assert json.loads(run("pop", "n")[1]) == 42
    code, out, err = run("get", "n")
    assert code == 1 and out == "" and "not found" in err
    assert run("delete", "s")[0] == 0 and run("delete", "s")[0] == 1
    dump = run("dump")[1]
    assert json.loads(dump)["metadata"]["count"] == 1
    path = os.path.join(os.path.dirname(dbfile), "d.json")
    with open(path, "w") as f:
        f.write(dump)
    assert run("clear")[0] == 0 and run("len")[1] == "0\n"
    assert run("load", path)[0] == 0 and run("len")[1] == "1\n"


def test_cli_list_queue_blob(capsys, dbfile, tmp_path):
    run = lambda *a: _cli(capsys, "-d", dbfile, *a)  # noqa: E731
    for args in (("push", "b"), ("prepend", "a"), ("insert", "1", "[1, 2]"), ("set", "0", "A")):
        assert run("list", "l", *args)[0] == 0
    assert json.loads(run("list", "l", "items")[1]) == ["A", [1, 2], "b"]
    assert json.loads(run("list", "l", "get", "-1")[1]) == "b"
    assert json.loads(run("list", "l", "pop")[1]) == "b"
    assert json.loads(run("list", "l", "deque")[1]) == "A"
    assert run("list", "l", "delete", "0")[0] == 0 and run("list", "l", "pop")[1] == "null\n"
    assert run("list", "l", "get", "5")[0] == 1
    assert run("queue", "q", "put", '{"job": 1}', "--priority", "5")[0] == 0
    assert run("queue", "q", "put", "urgent", "-p", "1")[0] == 0
    assert json.loads(run("queue", "q", "peek")[1])["data"] == "urgent"
    assert [i["priority"] for i in json.loads(run("queue", "q", "items")[1])] == [1, 5]
    assert json.loads(run("queue", "q", "get")[1])["data"] == "urgent"
    assert json.loads(run("queue", "q", "get", "--timeout", "1")[1])["data"] == {"job": 1}
    assert run("queue", "q", "get", "--no-wait")[0] == 1
    assert run("queue", "q", "get", "--timeout", "0.01")[0] == 1
    source = tmp_path / "in.bin"
    source.write_bytes(b"\x00\x01binary")
    assert run("blob", "b", "put", "k", str(source), "-m", '{"mimetype": "x/y"}')[0] == 0
    assert json.loads(run("blob", "b", "info", "k")[1]) == \
        {"key": "k", "size": 8, "metadata": {"mimetype": "x/y"}}
    assert run("blob", "b", "get", "k", "-o", str(tmp_path / "out.bin"))[0] == 0
    assert (tmp_path / "out.bin").read_bytes() == b"\x00\x01binary"
    assert json.loads(run("blob", "b", "keys")[1]) == ["k"]
    assert run("blob", "b", "delete", "k")[0] == 0 and run("blob", "b", "info", "k")[0] == 1


def test_cli_lock_run(capsys, dbfile, tmp_path):
    marker = tmp_path / "ran"
    script = f"echo ran > {marker}; exit 3"
    assert _cli(capsys, "--database", dbfile, "lock", "my-cron-job", "run",
                "bash", "-c", script)[0] == 3
    assert marker.exists()
    marker.unlink()
    assert _cli(capsys, "--database", dbfile, "lock", "my-cron-job", "run", "--timeout", "5",
                "--", "bash", "-c", script)[0] == 3
    assert marker.exists()
    marker.unlink()
    with BeaverDB(dbfile) as db, db.lock("my-cron-job"):
        code, _, err = _cli(capsys, "--database", dbfile, "lock", "my-cron-job", "run",
                            "--timeout", "0.05", "bash", "-c", script)
        assert code == 1 and "not acquired" in err and not marker.exists()
        assert _cli(capsys, "-d", dbfile, "lock", "my-cron-job", "run", "--no-wait", "true")[0] == 1
        assert json.loads(_cli(capsys, "-d", dbfile, "lock", "my-cron-job", "status")[1])["locked"]
    assert _cli(capsys, "-d", dbfile, "lock", "x", "run", "no-such-command-here")[0] == 127
    assert _cli(capsys, "-d", dbfile, "lock", "x", "run")[0] == 2


def test_cli_whole_database(capsys, dbfile, tmp_path, monkeypatch):
    with BeaverDB(dbfile) as db:
        _fill(db)
    code, out, _ = _cli(capsys, "-d", dbfile, "info")
    assert code == 0 and len(json.loads(out)["structures"]) == 4
    code, dump, _ = _cli(capsys, "-d", dbfile, "dump")
    assert code == 0 and dump.count('"structure"') == 4
    assert _cli(capsys, "-d", dbfile, "dump", "app_config")[1].count('"structure"') == 1
    copy = str(tmp_path / "copy.db")
    monkeypatch.setattr("sys.stdin", io.StringIO(dump))
    assert json.loads(_cli(capsys, "-d", copy, "load", "-")[1]) == {"structures": 4}
    path = tmp_path / "dump.jsonl"
    path.write_text(dump)
    assert _cli(capsys, "-d", copy, "load", "--replace", str(path))[0] == 0
    with BeaverDB(dbfile) as a, BeaverDB(copy) as b:
        assert _snapshot(a)["list"] == _snapshot(b)["list"]
    backup = str(tmp_path / "backup.db")
    code, out, _ = _cli(capsys, "-d", dbfile, "backup", backup)
    assert code == 0 and json.loads(out) == backup
    with BeaverDB(backup) as restored:
        assert restored.dict("app_config")["theme"] == "dark"


def test_cli_usage_errors_and_help(capsys, dbfile):
    assert _cli(capsys, "-d", dbfile)[0] == 2
    assert _cli(capsys, "-d", dbfile, "nonsense")[0] == 2
    code, _, err = _cli(capsys, "-d", dbfile, "dict", "c", "get")
    assert code == 2 and "key" in err
    assert _cli(capsys, "-d", dbfile, "list", "l", "get", "not-a-number")[0] == 2
    for argv in (["--help"], ["dict", "--help"], ["dict", "c", "set", "--help"],
                 ["lock", "x", "run", "--help"], ["dump", "--help"]):
        code, out, _ = _cli(capsys, *argv)
        assert code == 0 and "usage:" in out
    assert _cli(capsys, "--version")[1].strip() == f"beaver {beaver.__version__}"


def test_cli_against_server(capsys, server_url, uid):
    assert _cli(capsys, "--url", server_url, "dict", f"{uid}-c", "set", "theme", "dark")[0] == 0
    assert _cli(capsys, "--url", server_url, "dict", f"{uid}-c", "get", "theme")[1] == '"dark"\n'
    assert _cli(capsys, "--url", server_url, "dict", f"{uid}-c", "get", "nope")[0] == 1


def test_cli_serve_help_and_refusal(capsys):
    pytest.importorskip("fastapi")
    code, out, _ = _cli(capsys, "serve", "--help")
    assert code == 0 and "beaver serve" in out and "--token" in out
    code, _, err = _cli(capsys, "serve", "--database", ":memory:", "--host", "0.0.0.0")
    assert code == 2 and "token" in err


def test_cli_help_subprocess():
    here = os.path.dirname(os.path.abspath(beaver.__file__))
    env = {**os.environ, "PYTHONPATH": here}
    out = subprocess.run([sys.executable, "-m", "beaver", "--help"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0 and "lock" in out.stdout and "collection" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "beaver", "dict"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 2 and "usage:" in out.stderr
