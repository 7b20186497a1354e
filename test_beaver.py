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


# ---- realtime: shared helpers ----

import asyncio as _rt_asyncio
import multiprocessing as _rt_mp
import os as _rt_os
import signal as _rt_signal
import threading as _rt_threading
import time as _rt_time
from datetime import datetime as _rt_datetime, timedelta as _rt_timedelta, timezone as _rt_tz

_RT_SPAWN = _rt_mp.get_context("spawn")
_RT_DEADLINE = 60.0


def _rt_until(predicate, timeout=10.0):
    """Wait (bounded) until predicate() is true; polls a condition, not a fixed sleep."""
    end = _rt_time.monotonic() + timeout
    while not predicate():
        if _rt_time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        _rt_time.sleep(0.002)


def _rt_join(procs):
    for p in procs:
        p.join(_RT_DEADLINE)
    for p in procs:
        if p.is_alive():
            p.kill()
            raise AssertionError(f"process {p.name} did not finish in time")
        assert p.exitcode == 0, f"process {p.name} exited with {p.exitcode}"


def _rt_get(q, timeout=_RT_DEADLINE):
    return q.get(timeout=timeout)


# ---- realtime: workers (module level, for spawn) ----

def _rt_channel_subscriber(path, count, ready, out):
    db = BeaverDB(path)
    with db.channel("stream").subscribe() as sub:
        ready.put(_rt_os.getpid())
        got = []
        for message in sub.listen(timeout=_RT_DEADLINE):
            got.append(message["i"])
            if len(got) == count:
                break
    out.put(got)
    db.close()


def _rt_queue_producer(path, start, count):
    db = BeaverDB(path)
    q = db.queue("work")
    for i in range(start, start + count):
        q.put(i)
    db.close()


def _rt_queue_consumer(path, out):
    db = BeaverDB(path)
    q = db.queue("work")
    got = []
    while True:
        item = q.get(timeout=_RT_DEADLINE)
        if item.data is None:
            break
        got.append(item.data)
    out.put(got)
    db.close()


def _rt_lock_waiter(path, index, order_name, ready):
    db = BeaverDB(path)
    lock = db.lock("fifo", timeout=_RT_DEADLINE)
    ready.put(index)
    with lock:
        db.list(order_name).push(index)
    db.close()


def _rt_lock_enqueue_then_wait(path, index, queued):
    """Take a ticket, report it, then wait for the lock: queue order = ticket order."""
    db = BeaverDB(path)
    lock = db.lock("fifo", timeout=_RT_DEADLINE)
    original = lock._enqueue

    def enqueue():
        got = original()
        queued.put((index, lock._ticket))
        return got
    lock._enqueue = enqueue
    with lock:
        db.list("order").push(index)
    db.close()


def _rt_lock_holder(path, ttl, holding):
    db = BeaverDB(path)
    lock = db.lock("crashy", ttl=ttl)
    lock.acquire()
    holding.put(lock.token)
    _rt_time.sleep(_RT_DEADLINE)        # killed long before this ends


def _rt_event_writer(path, start_flag):
    db = BeaverDB(path)
    config = db.dict("shared_config")
    _rt_until(lambda: db._events.remote(("dict", "shared_config")), timeout=_RT_DEADLINE)
    config["theme"] = "dark"
    del config["theme"]
    db.log("metrics").log({"value": 7})
    db.close()


def _rt_log_writer(path, count):
    db = BeaverDB(path)
    logs = db.log("metrics")
    for i in range(count):
        logs.log({"value": i})
    db.close()


def _rt_lease_taker(path, out):
    db = BeaverDB(path)
    item = db.queue("leased").get(timeout=_RT_DEADLINE, lease=0.5)
    out.put(item.data)                  # then "crash": never ack
    db.close()


# ---- realtime: watcher ----

def test_watcher_wakes_blocked_get_from_other_thread(db):
    q = db.queue("wake")
    got = []
    t = _rt_threading.Thread(target=lambda: got.append(q.get(timeout=_RT_DEADLINE).data))
    t.start()
    _rt_until(lambda: db._core.watcher.users > 0)
    q.put("x")
    t.join(_RT_DEADLINE)
    assert got == ["x"]


def test_watcher_can_poll_without_inotify(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAVER_WATCH", "poll")
    database = BeaverDB(tmp_path / "poll.db")
    try:
        q = database.queue("q")
        t = _rt_threading.Thread(target=lambda: (_rt_time.sleep(0.05), q.put(1)))
        t.start()
        assert q.get(timeout=_RT_DEADLINE).data == 1
        t.join()
    finally:
        database.close()


# ---- realtime: queue leases and cross-process queue ----

def test_queue_lease_ack_and_expiry(db):
    q = db.queue("jobs")
    q.put("a")
    q.put("b")
    first = q.get(lease=60)
    assert first == beaver.QueueItem(first.priority, first.timestamp, "a")
    assert isinstance(first, beaver.QueueItem) and len(first) == 3
    assert q.ack(first) is True
    assert q.ack(first) is False
    second = q.get(lease=0.2)
    assert second.data == "b" and len(q) == 0
    again = q.get(timeout=_RT_DEADLINE)        # wakes when the lease runs out
    assert again.data == "b"
    assert q.ack(second) is False
    with pytest.raises(TypeError):
        q.ack(again)


def test_queue_nack_returns_item_at_once(db):
    q = db.queue("jobs")
    q.put("a")
    item = q.get(lease=60)
    assert q.nack(item) is True
    assert q.get(block=False).data == "a"


def test_queue_plain_get_is_exactly_once_with_leases_around(db):
    q = db.queue("jobs")
    for i in range(10):
        q.put(i)
    leased = [q.get(lease=60) for _ in range(5)]
    rest = [q.get(block=False).data for _ in range(5)]
    assert sorted([i.data for i in leased] + rest) == list(range(10))
    with pytest.raises(beaver.QueueEmpty):
        q.get(block=False)


def test_queue_lease_expiry_across_processes(tmp_path):
    path = str(tmp_path / "lease.db")
    db = BeaverDB(path)
    q = db.queue("leased")
    q.put({"job": 1})
    out = _RT_SPAWN.Queue()
    p = _RT_SPAWN.Process(target=_rt_lease_taker, args=(path, out))
    p.start()
    assert _rt_get(out) == {"job": 1}
    _rt_join([p])
    item = q.get(timeout=_RT_DEADLINE)         # comes back once the 0.5 s lease ends
    assert item.data == {"job": 1}
    db.close()


def test_queue_three_producers_four_blocking_consumers_exactly_once(tmp_path):
    path = str(tmp_path / "mpq.db")
    db = BeaverDB(path)
    out = _RT_SPAWN.Queue()
    consumers = [_RT_SPAWN.Process(target=_rt_queue_consumer, args=(path, out)) for _ in range(4)]
    for c in consumers:
        c.start()
    producers = [_RT_SPAWN.Process(target=_rt_queue_producer, args=(path, k * 300, 300))
                 for k in range(3)]
    for p in producers:
        p.start()
    _rt_join(producers)
    q = db.queue("work")
    for _ in consumers:
        q.put(None, priority=10)               # one stop marker each, after all the work
    results = [_rt_get(out) for _ in consumers]
    _rt_join(consumers)
    everything = sorted(x for r in results for x in r)
    assert everything == list(range(900))
    db.close()


# ---- realtime: async queue ----

def test_async_queue_get_waits(db):
    aq = db.queue("aq").as_async()

    async def main():
        waiter = _rt_asyncio.ensure_future(aq.get(timeout=_RT_DEADLINE))
        await _rt_asyncio.sleep(0.01)
        await aq.put({"n": 1})
        return (await waiter).data
    assert _rt_asyncio.run(main()) == {"n": 1}


# ---- log ----

def test_log_seed_example_live_summary(db):
    import statistics
    logs = db.log("system_metrics")

    def summarize(window):
        if not window:
            return {"mean": 0.0, "count": 0}
        values = [log.get("value", 0) for log in window]
        return {"mean": statistics.mean(values), "count": len(values)}

    for v in (1, 2, 3):
        logs.log({"value": v})
    live_summary = logs.live(window=_rt_timedelta(seconds=5), period=_rt_timedelta(seconds=0.05),
                             aggregator=summarize)
    seen = []
    for summary in live_summary:
        seen.append(summary)
        if len(seen) == 1:
            logs.log({"value": 10})
        if len(seen) == 3:
            live_summary.close()
    assert seen[0] == {"mean": 2, "count": 3}
    assert seen[-1] == {"mean": 4, "count": 4}


def test_log_range_is_inclusive_and_ordered(db):
    logs = db.log("events")
    base = 1_700_000_000.0
    for i, offset in enumerate([5, 1, 3, 3, 9]):
        logs.log({"i": i}, timestamp=base + offset)
    entries = logs.range(base + 1, base + 5)
    assert [e.data["i"] for e in entries] == [1, 2, 3, 0]     # equal timestamps keep order
    assert entries[0].timestamp == _rt_datetime.fromtimestamp(base + 1, _rt_tz.utc)
    assert [e.data["i"] for e in logs.range(start=base + 9)] == [4]
    assert [e.data["i"] for e in logs.range(end=base + 1)] == [1]
    assert [e.data["i"] for e in logs] == [1, 2, 3, 0, 4]
    assert len(logs) == 5
    when, data = entries[0]
    assert data == {"i": 1}


def test_log_datetimes_aware_and_naive_local(db):
    logs = db.log("tz")
    aware = _rt_datetime(2025, 1, 1, 12, 0, tzinfo=_rt_tz.utc)
    logs.log("aware", timestamp=aware)
    naive = _rt_datetime(2025, 1, 1, 12, 0)                   # local time
    logs.log("naive", timestamp=naive)
    assert logs.range(aware, aware)[0].data == "aware"
    assert logs.range(naive, naive)[0].timestamp.timestamp() == naive.timestamp()
    with pytest.raises(TypeError):
        logs.log("x", timestamp="yesterday")


def test_log_retention_dump_load(db):
    logs = db.log("short", retention=60)
    logs.log("old", timestamp=_rt_time.time() - 3600)
    logs.log("new")
    assert [e.data for e in logs] == ["new"]
    dumped = logs.dump()
    assert dumped["metadata"]["type"] == "log" and dumped["items"][0]["data"] == "new"
    other = db.log("copy")
    other.load(dumped)
    assert [e.data for e in other] == ["new"]


def test_log_live_is_incremental_and_drops_old_rows(db):
    logs = db.log("inc")
    logs.log(1, timestamp=_rt_time.time() - 0.3)
    view = logs.live(window=0.5, period=0.01, aggregator=list)
    assert next(view) == [1]
    statements = []
    db._core.conn().set_trace_callback(statements.append)
    logs.log(2)
    assert next(view) == [1, 2]
    db._core.conn().set_trace_callback(None)
    assert any("seq > " in s for s in statements)
    assert not any("timestamp >= " in s for s in statements)  # no rescan of the window
    _rt_until(lambda: next(view) == [2])
    view.close()
    assert list(view) == []


def test_log_live_close_from_another_thread_stops_a_waiting_iteration(db):
    view = db.log("idle").live(window=10, period=30, aggregator=len)
    assert next(view) == 0
    _rt_threading.Timer(0.05, view.close).start()
    assert list(view) == []


def test_log_live_sees_rows_from_another_process(tmp_path):
    path = str(tmp_path / "live.db")
    db = BeaverDB(path)
    with db.log("metrics").live(window=60, period=0.02, aggregator=len) as view:
        assert next(view) == 0
        p = _RT_SPAWN.Process(target=_rt_log_writer, args=(path, 25))
        p.start()
        _rt_until(lambda: next(view) == 25, timeout=_RT_DEADLINE)
        _rt_join([p])
    db.close()


def test_async_log_live(db):
    logs = db.log("alive")
    logs.log({"value": 1})

    async def main():
        seen = []
        async with logs.as_async().live(window=10, period=0.02, aggregator=len) as view:
            async for count in view:
                seen.append(count)
                if len(seen) == 1:
                    logs.log({"value": 2})
                if count == 2:
                    break
        return seen
    seen = _rt_asyncio.run(main())
    assert seen[0] == 1 and seen[-1] == 2


# ---- channel ----

def test_channel_seed_example(db):
    def publish():
        system_events = db.channel("system_events")
        system_events.publish({"event": "user_login", "user_id": "alice"})

    with db.channel("system_events").subscribe() as listener:
        _rt_threading.Thread(target=publish).start()
        for message in listener.listen():
            assert message == {"event": "user_login", "user_id": "alice"}
            break


def test_channel_only_messages_after_subscribing_in_order(db):
    ch = db.channel("c")
    ch.publish("before")
    with ch.subscribe() as a, ch.subscribe() as b:
        for i in range(50):
            ch.publish(i)
        got_a = [a.get(timeout=_RT_DEADLINE) for _ in range(50)]
        got_b = [b.get(timeout=_RT_DEADLINE) for _ in range(50)]
    assert got_a == got_b == list(range(50))
    assert len(ch) == 51


def test_channel_listen_timeout_and_close(db):
    ch = db.channel("quiet")
    sub = ch.subscribe()
    with pytest.raises(TimeoutError):
        next(sub.listen(timeout=0.05))
    _rt_threading.Timer(0.05, sub.close).start()
    assert list(sub.listen()) == []
    assert sub.closed


def test_channel_one_poller_for_many_subscribers(db):
    ch = db.channel("fan")
    subs = [ch.subscribe() for _ in range(5)]
    ch.publish("x")
    assert [s.get(timeout=_RT_DEADLINE) for s in subs] == ["x"] * 5
    pollers = [t for t in _rt_threading.enumerate() if t.name == "beaver-channels"]
    assert len(pollers) == 1
    for s in subs:
        s.close()


def test_channel_retention_clear_dump_load(db):
    ch = db.channel("bounded", max_messages=10)
    for i in range(25):
        ch.publish(i)
    ch.prune()
    assert len(ch) == 10 and ch.history() == list(range(15, 25))
    dumped = ch.dump()
    assert dumped["metadata"]["count"] == 10
    ch.clear()
    assert len(ch) == 0
    ch.load(dumped)
    assert ch.history(limit=2) == [23, 24]
    aged = db.channel("aged", retention=60)
    aged.load({"items": [{"timestamp": _rt_time.time() - 3600, "payload": "old"}]})
    aged.publish("new")
    aged.prune()
    assert aged.history() == ["new"]


def test_channel_with_model(db):
    class Msg(beaver.Model):
        text: str

    ch = db.channel("typed", model=Msg)
    with ch.subscribe() as sub:
        ch.publish(Msg(text="hi"))
        assert sub.get(timeout=_RT_DEADLINE) == Msg(text="hi")
    with pytest.raises((TypeError, ValueError)):
        ch.publish(42)


def test_channel_three_subscriber_processes_2000_messages(tmp_path):
    path = str(tmp_path / "chan.db")
    db = BeaverDB(path)
    ready, out = _RT_SPAWN.Queue(), _RT_SPAWN.Queue()
    subs = [_RT_SPAWN.Process(target=_rt_channel_subscriber, args=(path, 2000, ready, out))
            for _ in range(3)]
    for p in subs:
        p.start()
    for _ in subs:
        _rt_get(ready)
    ch = db.channel("stream")
    for i in range(2000):
        ch.publish({"i": i})
    results = [_rt_get(out) for _ in subs]
    _rt_join(subs)
    for got in results:
        assert got == list(range(2000))
    db.close()


def test_async_channel(db):
    async def main():
        ach = db.channel("achat").as_async()
        async with ach.subscribe() as sub:
            for i in range(3):
                await ach.publish(i)
            got = []
            async for message in sub:
                got.append(message)
                if len(got) == 3:
                    break
            with pytest.raises(TimeoutError):
                await sub.get(timeout=0.02)
        return got
    assert _rt_asyncio.run(main()) == [0, 1, 2]


# ---- lock (realtime) ----

def test_lock_seed_example_times_out_as_timeout_error(db):
    holder = db.lock("refresh_sitemap")
    holder.acquire()
    with pytest.raises(TimeoutError):
        with db.lock("refresh_sitemap", timeout=0.05):
            pass
    holder.release()
    with db.lock("refresh_sitemap", timeout=1) as lock:
        assert lock.locked


def test_lock_acquire_is_truthy_context_manager_and_tokens_grow(db):
    lock = db.lock("t")
    held = lock.acquire(timeout=1)
    assert held and lock.held and lock.locked
    first = lock.token
    lock.release()
    assert not lock.locked and lock.token is None
    with lock.acquire() as same:
        assert same is lock and lock.token > first
    assert not lock.acquire(block=False).__exit__(None, None, None)


def test_lock_block_false_tries_once(db):
    a, b = db.lock("once"), db.lock("once")
    a.acquire()
    with pytest.raises(beaver.LockTimeout):
        b.acquire(block=False)
    a.release()
    assert b.acquire(block=False)
    b.release()


def test_lock_ttl_applies_to_holder_only_and_renew(db):
    holder = db.lock("ttl", ttl=0.2)
    holder.acquire()
    holder.renew(60)
    waiter = db.lock("ttl", lock_ttl=0.2)        # the 1.x keyword
    assert waiter.ttl == 0.2
    with pytest.raises(TimeoutError):
        waiter.acquire(timeout=0.3)              # renewed: the holder keeps it
    holder.renew(0.05)
    assert waiter.acquire(timeout=_RT_DEADLINE)  # holder expired: the waiter gets it
    with pytest.raises(beaver.LockLost):
        holder.release()
    waiter.release()


def test_lock_distinct_objects_exclude_threads(db):
    inside, overlaps = [0], []

    def work():
        lock = db.lock("threads", timeout=_RT_DEADLINE)
        for _ in range(20):
            with lock:
                inside[0] += 1
                overlaps.append(inside[0])
                inside[0] -= 1
    threads = [_rt_threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(_RT_DEADLINE)
    assert len(overlaps) == 80 and set(overlaps) == {1}


def test_lock_fifo_order_of_staggered_waiters_across_processes(tmp_path):
    path = str(tmp_path / "fifo.db")
    db = BeaverDB(path)
    holder = db.lock("fifo")
    holder.acquire()
    queued = _RT_SPAWN.Queue()
    procs = []
    tickets = []
    for i in range(4):                   # start one at a time: each waits behind the others
        p = _RT_SPAWN.Process(target=_rt_lock_enqueue_then_wait, args=(path, i, queued))
        p.start()
        procs.append(p)
        tickets.append(_rt_get(queued))
    holder.release()
    _rt_join(procs)
    assert [t[1] for t in tickets] == sorted(t[1] for t in tickets)
    assert db.list("order")[:] == [0, 1, 2, 3]
    db.close()


def test_lock_reclaimed_after_holder_is_sigkilled(tmp_path):
    path = str(tmp_path / "kill.db")
    db = BeaverDB(path)
    holding = _RT_SPAWN.Queue()
    p = _RT_SPAWN.Process(target=_rt_lock_holder, args=(path, 1.0, holding))
    p.start()
    dead_token = _rt_get(holding)
    _rt_os.kill(p.pid, _rt_signal.SIGKILL)
    p.join(_RT_DEADLINE)
    lock = db.lock("crashy")
    assert lock.acquire(timeout=_RT_DEADLINE)   # free at the holder's TTL
    assert lock.token > dead_token
    lock.release()
    db.close()


def test_manager_acquire_uses_the_same_lock(db):
    q = db.queue("agent_tasks")
    for i in range(3):
        q.put(i)
    with q.acquire(timeout=5) as locked_q:
        assert locked_q is q
        other = db.lock("__beaver_queue__:agent_tasks")
        with pytest.raises(TimeoutError):
            other.acquire(timeout=0.05)
        assert [q.get(block=False).data for _ in range(3)] == [0, 1, 2]


def test_async_lock(db):
    async def main():
        alock = db.lock("alock").as_async()
        async with alock:
            assert await alock.locked()
            with pytest.raises(TimeoutError):
                await db.lock("alock").as_async().acquire(timeout=0.05)
        return await alock.locked()
    assert _rt_asyncio.run(main()) is False


# ---- events ----

def test_events_seed_example(db):
    config = db.dict("app_config")
    config.clear()
    received = []

    def on_config_change(payload):
        received.append((payload["event"], payload["key"]))

    set_handle = config.on("set", on_config_change)
    del_handle = config.on("del", on_config_change)
    config["theme"] = "dark"
    del config["theme"]
    _rt_until(lambda: len(received) == 2)
    set_handle.off()
    del_handle.off()
    config["theme"] = "light"
    marker = []
    config.on("set", lambda p: marker.append(p))
    config["done"] = True
    _rt_until(lambda: marker)
    assert received == [("set", "theme"), ("del", "theme")]


def test_events_every_manager_and_star(db):
    seen = []
    managers = [db.dict("d"), db.list("l"), db.queue("q"), db.blobs("b"), db.log("g"),
                db.channel("c")]
    for m in managers:
        m.on("*", lambda p: seen.append((p["kind"], p["event"], p["name"])))
    managers[0]["k"] = 1
    managers[1].push(1)
    managers[2].put(1)
    managers[2].get()
    managers[3].put("k", b"x")
    managers[4].log({"v": 1})
    managers[5].publish("hi")
    _rt_until(lambda: len(seen) == 7)
    assert seen == [("dict", "set", "d"), ("list", "push", "l"), ("queue", "put", "q"),
                    ("queue", "get", "q"), ("blob", "put", "b"), ("log", "log", "g"),
                    ("channel", "publish", "c")]


def test_events_callback_errors_are_isolated_and_logged(db, caplog):
    d = db.dict("boom")
    good = []

    def bad(payload):
        raise RuntimeError("callback failure")
    d.on("set", bad)
    d.on("set", good.append)
    d["a"] = 1
    d["b"] = 2
    _rt_until(lambda: len(good) == 2)
    assert [p["key"] for p in good] == ["a", "b"]
    assert "callback failure" in caplog.text


def test_events_rolled_back_writes_emit_nothing(db):
    d = db.dict("tx")
    seen = []
    d.on("set", seen.append)
    with pytest.raises(ZeroDivisionError):
        with db.transaction():
            d["lost"] = 1
            1 / 0
    d["kept"] = 1
    _rt_until(lambda: seen)
    assert [p["key"] for p in seen] == ["kept"]


def test_events_from_another_process_reach_a_callback_once(tmp_path):
    path = str(tmp_path / "ev.db")
    db = BeaverDB(path)
    seen = []
    db.dict("shared_config").on("*", lambda p: seen.append((p["event"], p["key"])))
    db.log("metrics").on("log", lambda p: seen.append(("log", p["data"]["value"])))
    p = _RT_SPAWN.Process(target=_rt_event_writer, args=(path, None))
    p.start()
    _rt_join([p])
    _rt_until(lambda: len(seen) >= 3, timeout=_RT_DEADLINE)
    db.dict("shared_config")["local"] = 1       # this process's own write: delivered once
    _rt_until(lambda: len(seen) >= 4)
    assert seen == [("set", "theme"), ("del", "theme"), ("log", 7), ("set", "local")]
    db.close()


def test_events_registry_rows_are_written_only_for_remote_listeners(tmp_path):
    path = str(tmp_path / "reg.db")
    a, b = BeaverDB(path), BeaverDB(path)
    try:
        seen = []
        a.dict("x").on("set", seen.append)
        b.dict("x")["k"] = 1                     # b sees a's registration (b's cache is fresh)
        _rt_until(lambda: seen)
        count = a._core.execute("SELECT count(*) FROM beaver_events").fetchone()[0]
        assert count == 1
        a.dict("x")["own"] = 1                   # nobody else listens: no row
        _rt_until(lambda: len(seen) == 2)
        assert a._core.execute("SELECT count(*) FROM beaver_events").fetchone()[0] == 1
    finally:
        a.close()
        b.close()
    c = BeaverDB(path)
    assert c._core.execute("SELECT count(*) FROM beaver_listeners").fetchone()[0] == 0
    c.close()


def test_channel_clear_keeps_the_sequence_growing(db):
    ch = db.channel("cleared")
    with ch.subscribe() as sub:
        ch.publish("a")
        assert sub.get(timeout=_RT_DEADLINE) == "a"
        ch.clear()
        assert len(ch) == 0
        ch.publish("b")                        # must not reuse the cleared row's number
        assert sub.get(timeout=_RT_DEADLINE) == "b"


def test_close_ends_listen_and_async_on_is_plain(tmp_path):
    database = BeaverDB(tmp_path / "close.db")
    sub = database.channel("c").subscribe()
    got = []
    t = _rt_threading.Thread(target=lambda: got.extend(sub.listen()))
    t.start()
    _rt_until(lambda: database._hub._thread is not None)
    handle = database.dict("d").as_async().on("set", lambda p: None)
    handle.off()
    database.close()
    t.join(_RT_DEADLINE)
    assert not t.is_alive() and got == []


@pytest.mark.skipif(not hasattr(_rt_os, "fork"), reason="needs fork")
def test_events_after_fork_reach_the_parent(tmp_path):
    db = BeaverDB(tmp_path / "fork.db")
    seen = []
    d = db.dict("forked")
    d.on("set", seen.append)
    ctx = _rt_mp.get_context("fork")
    p = ctx.Process(target=lambda: d.__setitem__("child", 1))
    p.start()
    p.join(_RT_DEADLINE)
    _rt_until(lambda: seen, timeout=_RT_DEADLINE)
    assert [x["key"] for x in seen] == ["child"]
    db.close()
