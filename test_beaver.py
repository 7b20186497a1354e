"""Tests of beaver, in the order of beaver.py's sections.

Conventions: file databases live under ``tmp_path``; multi-process tests use the spawn
context with module-level workers and bound every wait by a deadline; nothing waits on a
fixed sleep for synchronisation. TTL tests drive beaver's one clock (``beaver._now``)
through the ``clock`` fixture, so they neither sleep nor depend on timing.
"""
import ast
import asyncio
import base64
import contextlib
import copy
import doctest
import gc
import inspect
import io
import itertools
import json
import multiprocessing
import operator
import os
import re
import shlex
import shutil
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import typing
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import beaver
from beaver import BeaverDB

ROOT = Path(__file__).resolve().parent
SPAWN = multiprocessing.get_context("spawn")
MP_DEADLINE = 60.0          # seconds any multi-process test may take before it fails

PROPERTY_SETTINGS = settings(max_examples=25, stateful_step_count=25, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def db(request, tmp_path):
    """A fresh database: a SQLite file, or (for tests run on both engines, see
    ``pytest_generate_tests``) a PostgreSQL schema of its own when the param says so."""
    if getattr(request, "param", "sqlite") == "postgres":
        if _beyond_pg_variants(request):
            pytest.skip(f"cases after the first {PG_VARIANTS} run on SQLite only")
        yield request.getfixturevalue("pg_db")
        return
    database = BeaverDB(tmp_path / "test.db")
    yield database
    database.close()


# --- PostgreSQL test server ---
#
# The structure tests run on both engines: the ``db`` fixture of the tests whose names start
# with a prefix of BOTH_ENGINES is parametrised [sqlite, postgres] (``any_db`` is the same for
# new tests). PostgreSQL comes from BEAVER_TEST_POSTGRES_URL, else the server at
# 127.0.0.1:5432 (database ``test``), else a throwaway cluster of Debian's binaries; the
# postgres params skip, saying why, when none is there or BEAVER_TEST_POSTGRES=0. Each test
# works in a schema of its own, dropped after it.

BOTH_ENGINES = ("test_dict_", "test_list_", "test_queue_", "test_blob_", "test_log_",
                "test_channel_", "test_lock_", "test_event", "test_transaction",
                "test_filter_", "test_pg_", "test_collection_", "test_vector_")
# Structure tests that stay on SQLite, each for a reason: explain() asserting the field index
# SQLite picks (PostgreSQL's planner prefers the primary key on tiny tables; see
# test_pg_field_index_serves_order_by), and a NUL inside a key (PostgreSQL text cannot hold
# one: test_pg_nul_in_a_key_is_a_validation_error).
SQLITE_ONLY = {
    "test_filter_paths_quoted_keys_items_and_unicode", "test_dict_find_with_models",
    "test_dict_unusual_keys", "test_log_explain_and_range_with_an_index",
    # tests that trace SQLite's statements (set_trace_callback)
    "test_log_live_is_incremental_and_drops_old_rows",
    "test_collection_malformed_filters_raise_before_any_sql",
    "test_collection_kept_filter_is_patched_after_a_write",
    "test_collection_first_search_of_a_broad_filter_checks_candidates_only",
    "test_vector_index_tables_made_again_after_a_savepoint_rolls_them_back",
    # a SQLite built without FTS5 (PostgreSQL's text search is always there)
    "test_collection_without_fts5",
}
# Debian's PostgreSQL binaries, the newest major version installed (15 on bookworm)
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
             key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
             default=Path("/usr/lib/postgresql/15/bin/initdb")).parent


def pytest_generate_tests(metafunc):
    name = metafunc.function.__name__
    if "db" in metafunc.fixturenames and name.startswith(BOTH_ENGINES) and \
            name not in SQLITE_ONLY and "tmp_path" not in inspect.signature(
                metafunc.function).parameters:
        metafunc.parametrize("db", ["sqlite", "postgres"], indirect=True)


PG_VARIANTS = 2    # of a test with parameters of its own, the first cases run on both
PG_ALL_CASES = {"test_collection_fuzzy"}    # but every case of these (typos: same words)


_pg_cases_run: dict = {}     # test function -> its cases run on PostgreSQL so far


def _beyond_pg_variants(request) -> bool:
    """True for the later cases of a test parametrised with many (most of which check
    arguments before any SQL runs): those run on SQLite only, to keep the suite's time."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or len(callspec.params) < 2:
        return False
    name = request.node.originalname
    if name in PG_ALL_CASES:
        return False
    _pg_cases_run[name] = _pg_cases_run.get(name, 0) + 1
    return _pg_cases_run[name] > PG_VARIANTS


def _pg_answers(url) -> bool:
    try:
        import psycopg
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False


def _throwaway_cluster(folder):
    """Start a PostgreSQL cluster of Debian's binaries in ``folder``; (url, stop) or reason."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL binaries at {PG_BIN}"
    if os.geteuid() == 0:
        run = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    else:
        run = []
    data = os.path.join(folder, "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run(run + [str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres", "-D", data],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(run + [str(PG_BIN / "pg_ctl"), "-D", data, "-w", "-l",
                              os.path.join(folder, "log"), "-o",
                              f"-k {folder} -p {port} -h 127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as e:
        return f"could not start a throwaway PostgreSQL cluster: {e}"
    ctl = lambda *args: subprocess.run(run + [str(PG_BIN / "pg_ctl"), "-D", data, *args],
                                       capture_output=True, timeout=120)
    stop = lambda: ctl("-m", "immediate", "stop")
    stop.restart = lambda: ctl("-m", "immediate", "-w", "-l", os.path.join(folder, "log"),
                               "restart")                          # as after a crash
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """The base URL of a PostgreSQL server for the tests (skips, saying why, without one)."""
    if os.environ.get("BEAVER_TEST_POSTGRES") == "0":
        pytest.skip("PostgreSQL tests are off (BEAVER_TEST_POSTGRES=0)")
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg 3 (the postgres extra)")
    url = os.environ.get("BEAVER_TEST_POSTGRES_URL")
    if url:
        if not _pg_answers(url):
            pytest.fail(f"BEAVER_TEST_POSTGRES_URL={url!r} does not answer")
        yield url
        return
    local = "postgresql://postgres@127.0.0.1:5432/test"
    if _pg_answers(local):
        yield local
        return
    folder = tempfile.mkdtemp(prefix="beaver-pg-")
    started = _throwaway_cluster(folder)
    if isinstance(started, str):
        pytest.skip(f"no PostgreSQL server: none at 127.0.0.1:5432 and {started}")
    url, stop = started
    try:
        yield url
    finally:
        stop()
        shutil.rmtree(folder, ignore_errors=True)


def pg_schema_url(base, schema) -> str:
    """``base`` working in ``schema`` (libpq options: every connection's search_path; and
    commits that do not wait for the disk, as nothing here outlives the test)."""
    return (f"{base}{'&' if '?' in base else '?'}"
            f"options=-csearch_path%3D{schema}%20-csynchronous_commit%3Doff")


@contextlib.contextmanager
def pg_schema(base):
    """A new empty schema on the server at ``base``: yields its URL; dropped after."""
    import psycopg
    schema = f"beaver_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield pg_schema_url(base, schema)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_url(postgres_url):
    """The URL of a schema of this test's own."""
    with pg_schema(postgres_url) as url:
        yield url


@pytest.fixture
def pg_db(pg_url):
    database = BeaverDB(pg_url)
    yield database
    database.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request, tmp_path):
    """A fresh database on each engine."""
    if request.param == "postgres":
        yield request.getfixturevalue("pg_db")
        return
    database = BeaverDB(tmp_path / "any.db")
    yield database
    database.close()


class FakeClock:
    """Stands in for ``beaver._now``: time only moves when a test says so."""

    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock(time.time())
    monkeypatch.setattr(beaver, "_now", fake)
    return fake


def raw_rows(path, sql, params=()):
    """Read a beaver file with plain sqlite3 (what any SQLite tool would see)."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def join_all(processes, deadline):
    """Join processes by an absolute monotonic deadline; kill stragglers and fail."""
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    stragglers = [p for p in processes if p.is_alive()]
    for p in stragglers:
        p.kill()
        p.join(5)
    assert not stragglers, f"{len(stragglers)} worker process(es) missed the deadline"
    assert [p.exitcode for p in processes] == [0] * len(processes)


json_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                   max_size=3),
    max_leaves=6)


# ---- core ----

def test_import_without_site_packages():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import beaver; print(beaver.__version__)"
    out = subprocess.run([sys.executable, "-S", "-c", code, str(Path(beaver.__file__).parent)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == beaver.__version__


def test_exception_hierarchy():
    assert issubclass(beaver.ClosedError, beaver.BeaverError)
    assert issubclass(beaver.SchemaError, beaver.BeaverError)
    assert issubclass(beaver.QueueEmpty, beaver.BeaverError)
    assert issubclass(beaver.QueueEmpty, IndexError)
    assert issubclass(beaver.Timeout, TimeoutError)
    assert issubclass(beaver.LockTimeout, TimeoutError)
    assert issubclass(beaver.ValidationError, ValueError)
    for name in beaver.__all__:
        assert hasattr(beaver, name), name


def test_file_is_plain_sqlite_with_wal(tmp_path):
    path = tmp_path / "plain.db"
    with BeaverDB(path) as db:
        db.dict("config")["theme"] = "dark"
    assert raw_rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert raw_rows(path, "SELECT name, key, value FROM beaver_dicts") == [
        ("config", "theme", '"dark"')]
    assert raw_rows(path, "PRAGMA integrity_check") == [("ok",)]


def test_durability_option(tmp_path):
    with BeaverDB(tmp_path / "full.db", durability="full") as db:
        db.list("l").push(1)
        assert db._core.conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(ValueError):
        BeaverDB(tmp_path / "bad.db", durability="sometimes")


def test_not_a_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "junk.db"
    content = b"this is not a database at all\n" * 200
    path.write_bytes(content)
    with pytest.raises(beaver.BeaverError, match="not a SQLite database"):
        BeaverDB(path)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db"]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(beaver.BeaverError, match="does not exist"):
        BeaverDB(tmp_path / "no" / "such" / "dir" / "x.db")
    assert not (tmp_path / "no").exists()


def test_directory_as_path_is_a_clear_error(tmp_path):
    with pytest.raises(beaver.BeaverError):
        BeaverDB(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs a non-root POSIX user for a read-only folder")
def test_read_only_directory_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(beaver.BeaverError):
            BeaverDB(folder / "x.db").dict("d")["a"] = 1
    finally:
        folder.chmod(0o700)


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "future.db"
    BeaverDB(path).close()
    conn = sqlite3.connect(str(path))
    conn.execute("UPDATE beaver_meta SET value = ? WHERE key = 'schema_version'",
                 (str(beaver.SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(beaver.SchemaError):
        BeaverDB(path)
    # and the stamp was not rewritten
    assert raw_rows(path, "SELECT value FROM beaver_meta WHERE key = 'schema_version'") == [
        (str(beaver.SCHEMA_VERSION + 1),)]


def test_unreadable_schema_stamp_is_refused(tmp_path):
    path = tmp_path / "garbled.db"
    BeaverDB(path).close()
    conn = sqlite3.connect(str(path))
    conn.execute("UPDATE beaver_meta SET value = 'banana' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(beaver.SchemaError):
        BeaverDB(path)


def test_unknown_beaver_layout_is_refused(tmp_path):
    path = tmp_path / "old.db"             # beaver-looking tables, no stamp: e.g. an older beaver
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE beaver_dicts (dict_name TEXT, key TEXT, value TEXT)")
    conn.execute("INSERT INTO beaver_dicts VALUES ('d', 'k', '1')")
    conn.commit()
    conn.close()
    with pytest.raises(beaver.SchemaError):
        BeaverDB(path)
    assert raw_rows(path, "SELECT name FROM sqlite_master") == [("beaver_dicts",)]


# Table names the upstream beaver-db package writes (seen in files it made): 2.x, 1.x, 0.5
UPSTREAM_LAYOUTS = {
    "2.x": ["__beaver_dicts__", "__beaver_lists__", "__beaver_manager_versions__"],
    "1.x": ["beaver_dicts", "beaver_lists", "beaver_pubsub_log", "beaver_collection_versions",
            "beaver_manager_versions"],
    "0.x": ["_beaver_kv_store", "beaver_pubsub_log", "beaver_lists"],
}


@pytest.mark.parametrize("version", sorted(UPSTREAM_LAYOUTS))
@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_upstream_files_are_refused_untouched(tmp_path, version, journal):
    path = tmp_path / "upstream.db"
    conn = sqlite3.connect(str(path))
    conn.execute(f"PRAGMA journal_mode = {journal}")
    for table in UPSTREAM_LAYOUTS[version]:
        conn.execute(f"CREATE TABLE {table} (name TEXT, key TEXT, value TEXT)")
        conn.execute(f"INSERT INTO {table} VALUES ('n', 'k', '1')")
    conn.commit()
    conn.close()
    content = path.read_bytes()
    with pytest.raises(beaver.ForeignDatabase, match="beaver import-upstream OLD.db NEW.db"):
        BeaverDB(path)
    assert path.read_bytes() == content
    assert not any(name.startswith("beaver_") and name not in UPSTREAM_LAYOUTS[version]
                   for (name,) in raw_rows(path, "SELECT name FROM sqlite_master"))
    expected = "2.x" if version == "2.x" else "1.x"
    conn = sqlite3.connect(str(path))
    assert beaver._upstream_version(conn) == expected
    conn.close()


def test_upstream_version_of_other_files_is_none(tmp_path):
    BeaverDB(tmp_path / "ours.db").close()
    conn = sqlite3.connect(str(tmp_path / "ours.db"))
    conn.execute("CREATE TABLE beaver_unrelated_but_ours_looking (x)")
    assert beaver._upstream_version(conn) is None
    assert beaver._upstream_version(sqlite3.connect(":memory:")) is None


def test_sqlite_older_than_3_31_is_refused_with_the_version(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 30, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.30.1")
    with pytest.raises(beaver.FeatureUnavailable, match=r"3\.31.*3\.30\.1"):
        BeaverDB(tmp_path / "old.db")
    assert not (tmp_path / "old.db").exists()


def test_concurrent_first_opens_agree_on_the_schema(tmp_path):
    path, errors = tmp_path / "fresh.db", []

    def open_and_write(i):
        try:
            with BeaverDB(path) as db:
                db.list("l").push(i)
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(MP_DEADLINE)
    assert errors == []
    with BeaverDB(path) as db:
        assert sorted(db.list("l")) == list(range(6))


def test_existing_sqlite_file_with_other_tables_is_usable(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    with BeaverDB(path) as db:
        db.dict("d")["k"] = 1
    assert raw_rows(path, "SELECT name FROM users") == [("ada",)]
    with BeaverDB(path) as db:
        assert db.dict("d")["k"] == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_connection(tmp_path):
    db = BeaverDB(tmp_path / "fork.db")
    lst = db.list("l")
    lst.push("parent")
    pid = os.fork()
    if pid == 0:                        # the child: never returns into pytest
        code = 1
        try:
            lst.push("child")
            code = 0 if list(lst) == ["parent", "child"] else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + MP_DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    lst.push("parent again")            # the parent's connection is unharmed
    assert list(lst) == ["parent", "child", "parent again"]
    db.close()


def _crash_writer(path, conn):
    """Write forever; report each index over the pipe only after its commit."""
    db = BeaverDB(path)
    log, seen = db.list("log"), db.dict("seen")
    i = 0
    while True:
        with db.transaction():
            log.push(i)
            seen[str(i)] = {"i": i, "pad": "x" * (i % 50)}
        conn.send(i)
        i += 1


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkilled_writer_leaves_a_sound_database(tmp_path):
    path = str(tmp_path / "crash.db")
    BeaverDB(path).close()
    receiver, sender = SPAWN.Pipe(duplex=False)
    writer = SPAWN.Process(target=_crash_writer, args=(path, sender))
    writer.start()
    sender.close()
    deadline = time.monotonic() + MP_DEADLINE
    acked = []
    try:
        while len(acked) < 300:
            assert receiver.poll(max(0.0, deadline - time.monotonic())), "writer stalled"
            acked.append(receiver.recv())
        os.kill(writer.pid, signal.SIGKILL)     # mid-stream: it is writing as fast as it can
        writer.join(10)
        while receiver.poll(1.0):               # acknowledgements sent before the kill
            try:
                acked.append(receiver.recv())
            except EOFError:
                break
    finally:
        if writer.is_alive():
            writer.kill()
            writer.join(5)
    assert writer.exitcode == -signal.SIGKILL
    assert raw_rows(path, "PRAGMA integrity_check") == [("ok",)]
    with BeaverDB(path) as db:
        log = list(db.list("log"))
        seen = db.dict("seen")
        assert log == list(range(len(log)))          # no gap, no torn transaction
        assert set(log) >= set(acked)                # every acknowledged write is there
        assert sorted(int(k) for k in seen) == log   # both halves of each transaction
        assert all(seen[str(i)]["i"] == i for i in acked)
        db.list("log").push("after the crash")       # and it is writable again


# ---- core: typed errors ----

def test_error_tree_keeps_builtins_and_sqlite_details():
    assert issubclass(beaver.DatabaseBusy, beaver.Timeout)
    assert issubclass(beaver.DiskFull, beaver.BeaverError) and issubclass(beaver.DiskFull, OSError)
    assert issubclass(beaver.CorruptDatabase, beaver.BeaverError)
    assert issubclass(beaver.ForeignDatabase, beaver.SchemaError)
    assert issubclass(beaver.ReadOnlyDatabase, PermissionError)
    error = beaver.BeaverError("plain")
    assert error.orig is None and error.code is None


@pytest.mark.parametrize("code, cls", [
    (5, beaver.DatabaseBusy), (6, beaver.DatabaseBusy), (517, beaver.DatabaseBusy),
    (13, beaver.DiskFull), (11, beaver.CorruptDatabase), (26, beaver.CorruptDatabase),
    (8, beaver.ReadOnlyDatabase), (1, beaver.BeaverError), (None, beaver.BeaverError)])
def test_sqlite_errors_are_translated_by_result_code(code, cls):
    error = sqlite3.OperationalError("whatever the text says")
    if code is not None:
        error.sqlite_errorcode = code
    translated = beaver._sqlite_error(error, "/x.db", 1.0)
    assert type(translated) is cls
    assert translated.orig is error and translated.code == code


@pytest.mark.parametrize("text, code", [
    ("database is locked", 5), ("database or disk is full", 13),
    ("database disk image is malformed", 11), ("file is not a database", 26),
    ("attempt to write a readonly database", 8), ("no such table: x", None)])
def test_result_code_without_sqlite_errorcode(text, code):
    # Python 3.9/3.10 exceptions carry no code: it comes from SQLite's wording of the code
    assert beaver._result_code(sqlite3.OperationalError(text)) == code


def test_no_code_matches_sqlite_error_text():
    import re
    source = (ROOT / "beaver.py").read_text()
    # the collection section is left to the collections work (see its _ensure_* helpers)
    checked = source[:source.index("# Collection: documents")]
    checked += source[source.index("class _Managers"):]
    checked = checked.replace(checked[checked.index("_ERRSTR_CODES = ("):
                                      checked.index("def _sqlite_error(")], "")
    assert not re.search(r"in str\(\w+\)|str\(\w+\)\.(startswith|find)", checked)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 4 MiB tmpfs (needs root): a disk that fills up."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small file system")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_disk(folder):
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 256, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * size)
    finally:
        os.close(fd)


def test_disk_full_is_disk_full_on_every_write_path_and_loses_nothing(tiny_fs):
    db = BeaverDB(tiny_fs / "full.db")
    try:
        q, items, d = db.queue("q"), db.list("l"), db.dict("d")
        for i in range(30):
            q.put(i)
            items.push(i)
        d["k"] = 1
        fill_disk(tiny_fs)
        calls = [lambda: q.put("x" * 2000), lambda: q.get(block=False), items.pop,
                 items.deque, lambda: d.set("k", "v" * 5000), lambda: items.push("y" * 5000)]
        failures = 0
        for _ in range(40):         # the WAL may still have room for a few small writes
            for call in calls:
                try:
                    call()
                except beaver.DiskFull as e:
                    failures += 1
                    assert isinstance(e, OSError) and e.code & 0xFF == 13
                    assert isinstance(e.orig, sqlite3.Error)
        assert failures > 0
        os.remove(tiny_fs / "filler")
        assert len(q) + len(items) >= 0 and d["k"] in (1, "v" * 5000)
    finally:
        db.close()
    assert raw_rows(tiny_fs / "full.db", "PRAGMA integrity_check") == [("ok",)]


def _dict_file(path, n=3000):
    with BeaverDB(path) as db:
        with db.transaction():
            for i in range(n):
                db.dict("d")[f"k{i:05}"] = "v" * 50
    return path.read_bytes()


def test_zeroed_page_is_corrupt_database_not_a_raw_sqlite_error(tmp_path):
    data = bytearray(_dict_file(tmp_path / "a.db"))
    page = 4096
    pages = len(data) // page
    data[(pages - 3) * page:(pages - 2) * page] = bytes(page)   # a leaf of beaver_dicts
    bad = tmp_path / "zero.db"
    bad.write_bytes(bytes(data))
    with BeaverDB(bad) as db:
        with pytest.raises(beaver.CorruptDatabase) as info:
            db.dict("d").items()
        assert info.value.code & 0xFF == 11
        with pytest.raises(beaver.CorruptDatabase):
            list(db.dict("d"))


def test_flipped_bytes_in_the_schema_are_corrupt_database(tmp_path):
    data = bytearray(_dict_file(tmp_path / "a.db", n=10))
    for at in [i for i in range(len(data)) if data[i:i + 16] == b"beaver_listeners"][:2]:
        bad = bytearray(data)
        bad[at + 3] = 0xFF
        (tmp_path / "flip.db").write_bytes(bytes(bad))
        with pytest.raises(beaver.CorruptDatabase):
            BeaverDB(tmp_path / "flip.db")


def _hold_exclusive(path, ready, done):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("CREATE TABLE IF NOT EXISTS other (x)")
    ready.set()
    done.wait(MP_DEADLINE)
    conn.close()


def test_exclusive_lock_held_by_another_process_at_open_is_database_busy(tmp_path):
    path = str(tmp_path / "held.db")
    ready, done = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_exclusive, args=(path, ready, done))
    holder.start()
    try:
        assert ready.wait(MP_DEADLINE)
        with _busy_after(0.2) as info:
            BeaverDB(path, timeout=0.2)
        assert isinstance(info.value, TimeoutError) and info.value.code & 0xFF == 5
    finally:
        done.set()
        holder.join(MP_DEADLINE)
    assert not os.path.exists(path + "-wal") or BeaverDB(path).close() is None


@pytest.mark.parametrize("depth", [5000])
def test_deeply_nested_values_are_a_clear_error(db, depth):
    value = []
    for _ in range(depth):
        value = [value]
    for write in (lambda: db.dict("d").set("k", value), lambda: db.list("l").push(value),
                  lambda: db.queue("q").put(value), lambda: db.channel("c").publish(value)):
        with pytest.raises((ValueError, TypeError), match="nested"):
            write()
    assert "k" not in db.dict("d") and len(db.list("l")) == 0 and len(db.queue("q")) == 0


def test_deeply_nested_stored_text_reads_as_corrupt_not_recursion_error(db):
    db.dict("d")["k"] = 1
    deep = "[" * 100_000 + "]" * 100_000
    db._core.execute("UPDATE beaver_dicts SET value = ?", (deep,))
    with pytest.raises(beaver.CorruptDatabase):
        db.dict("d")["k"]


# ---- helpers: one validation of numbers and names from users ----

NAN, INF = float("nan"), float("inf")

# (what, call(db, value)): every number a user passes goes through the same checks
NUMBER_ARGUMENTS = {
    "dict ttl_seconds": lambda db, v: db.dict("d").set("k", 1, ttl_seconds=v),
    "queue get timeout": lambda db, v: db.queue("q").get(timeout=v),
    "queue get lease": lambda db, v: db.queue("q").get(lease=v),
    "queue put priority": lambda db, v: db.queue("q").put(1, priority=v),
    "lock ttl": lambda db, v: db.lock("l", ttl=v),
    "lock timeout": lambda db, v: db.lock("l", timeout=v),
    "lock acquire timeout": lambda db, v: db.lock("l").acquire(timeout=v),
    "lock renew ttl": lambda db, v: _renew(db.lock("l"), v),
    "structure acquire ttl": lambda db, v: db.list("s").acquire(ttl=v),
    "structure acquire timeout": lambda db, v: db.list("s").acquire(timeout=v),
    "log timestamp": lambda db, v: db.log("g").log(1, timestamp=v),
    "log retention": lambda db, v: db.log("g2", retention=v),
    "live window": lambda db, v: db.log("g").live(window=v, period=1),
    "live period": lambda db, v: db.log("g").live(window=1, period=v),
    "channel retention": lambda db, v: db.channel("c2", retention=v),
    "channel max_messages": lambda db, v: db.channel("c3", max_messages=v),
    "channel history limit": lambda db, v: db.channel("c").history(limit=v),
    "subscriber get timeout": lambda db, v: db.channel("c").subscribe().get(timeout=v),
    "collection match top_k": lambda db, v: db.collection("k").match("x", top_k=v),
    "collection search top_k": lambda db, v: db.collection("k").search([1.0], top_k=v),
}


def _renew(lock, ttl):
    with lock:
        lock.renew(ttl)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", sorted(NUMBER_ARGUMENTS))
@pytest.mark.parametrize("value, error", [
    (NAN, ValueError), ("10", TypeError), (True, TypeError), (-1, ValueError),
    (10 ** 400, ValueError), ([1], TypeError)], ids=["nan", "str", "bool", "-1", "huge", "list"])
def test_bad_numbers_are_refused_up_front_with_a_clear_error(db, what, value, error):
    if value == 10 ** 400 and "timeout" in what:
        return          # a huge timeout is a wait without limit (see the next test)
    if value == -1 and what in ("log timestamp", "queue put priority"):
        return          # 1969-12-31T23:59:59 is a fine timestamp, -1 a fine priority
    if value != value and what.endswith(("limit", "max_messages", "top_k")):
        error = TypeError   # a count is an int: a float is the wrong type
    db.queue("q").put("kept")
    before = _state(db)
    with pytest.raises(error) as info:
        NUMBER_ARGUMENTS[what](db, value)
    message = str(info.value)
    assert what.split()[-1] in message, message         # the error names the argument
    assert _state(db) == before


def _state(db):
    out = io.StringIO()
    db.dump(out)
    return [line for line in out.getvalue().splitlines() if '"dumped_at"' not in line]


@pytest.mark.timeout(60)
def test_unbounded_waits_take_inf_and_huge_numbers(db):
    channel = db.channel("c")
    with channel.subscribe() as sub:
        channel.publish("hi")
        assert sub.get(timeout=INF) == "hi"
        channel.publish("again")
        assert sub.get(timeout=10 ** 400) == "again"
    db.queue("q").put(1)
    assert db.queue("q").get(timeout=10 ** 400).data == 1
    with db.lock("l", timeout=INF):
        pass


def test_infinite_and_far_timestamps_are_refused_and_old_rows_still_read(db):
    log = db.log("g")
    log.log("first", timestamp=1000)
    for bad in (1e20, INF, -INF, 253402300800, -62135596801):
        with pytest.raises(ValueError, match="timestamp"):
            log.log("x", timestamp=bad)
    assert [e.data for e in log] == ["first"]
    # a row written by an older beaver with a timestamp beyond year 9999 still reads
    db._core.execute("INSERT INTO beaver_logs (name, timestamp, data) VALUES ('g', 1e20, '2')")
    db._core.execute("INSERT INTO beaver_logs (name, timestamp, data) VALUES ('g', -1e20, '0')")
    assert [e.data for e in log.range()] == [0, "first", 2]
    assert [e.data for e in log] == [0, "first", 2]
    assert [e.data for e in log.range(start=2000)] == [2]
    assert db.log("g").dump()["metadata"]["count"] == 3


def test_database_timeout_is_checked(tmp_path):
    for bad, error in [("10", TypeError), (True, TypeError), (NAN, ValueError),
                       (-1, ValueError), (INF, ValueError), (10 ** 400, ValueError)]:
        with pytest.raises(error, match="timeout"):
            BeaverDB(tmp_path / "t.db", timeout=bad)
    with BeaverDB(tmp_path / "t.db", timeout=0) as db:
        db.dict("d")["k"] = 1


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc80x"])
def test_lone_surrogates_in_keys_and_names_are_value_errors(db, text):
    calls = [lambda: db.dict(text), lambda: db.list(text), lambda: db.lock(text),
             lambda: db.dict("d").set(text, 1), lambda: db.dict("d")[text],
             lambda: db.dict("d").get(text), lambda: db.dict("d").pop(text),
             lambda: db.blobs("b").put(text, b"x"), lambda: db.blobs("b").get(text),
             lambda: db.dict("d").set("k", text), lambda: db.list("l").push(text),
             lambda: db.queue("q").put({text: 1})]
    for call in calls:
        with pytest.raises(ValueError, match="surrogate"):
            call()
    assert _state(db) == _state(BeaverDB(":memory:"))



# ---- dump and load: bad items are refused, nothing is half loaded ----

def test_load_of_json_nested_too_deeply_is_a_value_error(db):
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(ValueError, match="nested too deeply"):
        db.dict("d").load(deep)
    header = json.dumps({"beaver_dump": 1}) + "\n"
    with pytest.raises(ValueError, match="nested too deeply"):
        db.load(io.StringIO(header + deep + "\n"))


@pytest.mark.parametrize("kind, item", [
    ("blob", {"key": "a", "data": "!!!!", "metadata": None}),             # loaded as b""
    ("blob", {"key": "a", "data": "!!!not base64!!!", "metadata": None}),
    ("blob", {"key": "a", "data": "aGVsbG8", "metadata": None}),        # bad padding
    ("blob", {"key": "a", "data": 5}),
    ("blob", {"data": "aGk="}),
    ("dict", {"key": "k", "value": 1, "expires_at": "soon"}),
    ("dict", {"key": "k", "value": 1, "expires_at": float("nan")}),
    ("dict", {"value": 1}),
    ("dict", ["k", 1]),
    ("queue", {"priority": "high", "timestamp": 1.0, "data": 1}),
    ("queue", {"priority": 1, "timestamp": "noon", "data": 1}),
    ("queue", {"priority": 10 ** 30, "data": 1}),
    ("queue", {"priority": 1}),
    ("queue", 7),
    ("log", {"timestamp": 1e20, "data": 1}),
    ("log", {"timestamp": "yesterday", "data": 1}),
    ("log", {"data": 1, "timestamp": [1]}),
    ("log", {"timestamp": 1.0}),
    ("channel", {"timestamp": "now", "payload": 1}),
    ("channel", {"timestamp": 1.0}),
])
def test_load_refuses_bad_items_and_loads_nothing(db, kind, item):
    manager = {"blob": db.blobs, "dict": db.dict, "queue": db.queue, "log": db.log,
               "channel": db.channel}[kind]("s")
    good = {"blob": {"key": "ok", "data": "aGk=", "metadata": None},
            "dict": {"key": "ok", "value": 1, "expires_at": None},
            "queue": {"priority": 0, "timestamp": 1.0, "data": "ok"},
            "log": {"timestamp": 1.0, "data": "ok"},
            "channel": {"timestamp": 1.0, "payload": "ok"}}[kind]
    before = _state(db)
    with pytest.raises((ValueError, TypeError)):
        manager.load({"metadata": {"type": kind}, "items": [good, item]})
    assert _state(db) == before


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.timeout(1800)
def test_stress_random_sigkills_lose_and_duplicate_nothing(tmp_path, monkeypatch):
    """bench/stress.py: a mixed workload of processes SIGKILLed at random, checked each round
    (BEAVER_STRESS_ROUNDS=N for a longer run)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import stress
    rounds = int(os.environ.get("BEAVER_STRESS_ROUNDS", "2"))
    for attempt in range(5):    # on a loaded machine the workers may die before any work:
        folder = tmp_path / f"attempt{attempt}"         # then again, each run checked whole
        folder.mkdir()
        result = stress.run(str(folder), rounds=rounds, workers=3, seconds=1.0,
                            log=lambda line: None)
        assert result["kills"] == 3 * rounds
        if result["queued"] > 0 and result["documents"] > 0:
            return
    pytest.fail(f"no queue item or no document written in 5 runs: {result}")

# ---- hostile-input fuzz of every public method ----

class _Nested(list):
    """A list nested ``depth`` deep, with a short repr (hypothesis prints failing inputs)."""

    def __init__(self, depth):
        value = []
        for _ in range(depth - 1):
            value = [value]
        super().__init__([value] if depth else [])
        self.depth = depth

    def __repr__(self):
        return f"<list nested {self.depth} deep>"


_nested = _Nested


CORNERS = [
    NAN, INF, -INF, -0.0, 0, -1, 1.5, 10 ** 400, -(10 ** 400), 2 ** 63, -(2 ** 63) - 1,
    True, False, None, "", "\x00", "a\x00b", "\ud800", "a\udfffb", "wo\ud800rd", "/", "..",
    "%s", "\n", "*", '"', "NEAR(", "a OR", "-x", "'; DROP TABLE beaver_dicts; --", "k",
    "x" * 300, b"bytes", b"", [], {}, (), [1.0, 2.0], [NAN, 1.0], {"a": [1, {"b": None}]},
    _Nested(900), _Nested(5000), object()]

HOSTILE = st.one_of(
    st.sampled_from(CORNERS),
    st.integers(), st.floats(), st.text(st.characters(blacklist_categories=()), max_size=12),
    st.integers(0, 3000).map(_nested),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3))

# Half the arguments are ordinary, so that calls get past their first check more often.
FUZZ_ARG = st.one_of(HOSTILE, st.text(st.characters(blacklist_categories=()), max_size=8),
                     st.integers(0, 5), st.sampled_from([None, 0.5, 5.0, "k", "word", "x y"]))

# What every public call may raise on bad input: beaver's errors and the builtins its
# docstrings name. Waits get block=False or a short fixed timeout: nothing may hang.
FUZZ_ALLOWED = (beaver.BeaverError, TypeError, ValueError, KeyError, IndexError, TimeoutError)


def _fuzz_lock(db, a):
    lock = db.lock("fuzz", timeout=a[0], ttl=a[1])
    if lock.acquire(block=False, timeout=a[2]):
        try:
            lock.renew(a[3])
        finally:
            lock.release()


def _fuzz_subscriber(db, a):
    with db.channel("c").subscribe() as sub:
        db.channel("c").publish(a[0])
        return sub.get(timeout=5)


def _fuzz_live(db, a):
    with db.log("g").live(window=a[0], period=a[1], aggregator=len) as view:
        return next(view)


FUZZ_CALLS = {
    "dict": [
        lambda db, a: db.dict("d")[a[0]],
        lambda db, a: db.dict("d").get(a[0], a[1]),
        lambda db, a: db.dict("d").set(a[0], a[1], ttl_seconds=a[2]),
        lambda db, a: db.dict("d").__setitem__(a[0], a[1]),
        lambda db, a: db.dict("d").__delitem__(a[0]),
        lambda db, a: a[0] in db.dict("d"),
        lambda db, a: db.dict("d").pop(a[0], a[1]),
        lambda db, a: db.dict("d").setdefault(a[0], a[1]),
        lambda db, a: db.dict("d").update({a[0]: a[1]}),
        lambda db, a: db.dict("d").update(a[0]),
        lambda db, a: db.dict("d").ttl(a[0]),
        lambda db, a: db.dict("d").items(),
        lambda db, a: db.dict("d").set(_text(a[0]), a[1], ttl_seconds=_small(a[2]) or None),
    ],
    "list": [
        lambda db, a: db.list("l")[a[0]],
        lambda db, a: db.list("l").__setitem__(a[0], a[1]),
        lambda db, a: db.list("l").__delitem__(a[0]),
        lambda db, a: db.list("l").insert(a[0], a[1]),
        lambda db, a: db.list("l").push(a[0]),
        lambda db, a: db.list("l").prepend(a[0]),
        lambda db, a: db.list("l").extend(a[0]),
        lambda db, a: db.list("l").pop(a[0]),
        lambda db, a: db.list("l").remove(a[0]),
        lambda db, a: db.list("l").index(a[0]),
        lambda db, a: db.list("l")[a[0]:a[1]:a[2]],
        lambda db, a: db.list("l").__setitem__(slice(a[0], a[1]), [a[2]]),
    ],
    "queue": [
        lambda db, a: db.queue("q").put(a[0], priority=a[1]),
        lambda db, a: db.queue("q").get(block=False, timeout=a[0], lease=a[1]),
        lambda db, a: db.queue("q").get(timeout=0.01, lease=a[1]),
        lambda db, a: db.queue("q").ack(a[0]),
        lambda db, a: db.queue("q").nack(a[0]),
        lambda db, a: db.queue("q").peek(),
    ],
    "blob": [
        lambda db, a: db.blobs("b").put(a[0], a[1], metadata=a[2]),
        lambda db, a: db.blobs("b").get(a[0]),
        lambda db, a: db.blobs("b")[a[0]],
        lambda db, a: db.blobs("b").delete(a[0]),
        lambda db, a: a[0] in db.blobs("b"),
    ],
    "log": [
        lambda db, a: db.log("g").log(a[0], timestamp=a[1]),
        lambda db, a: db.log("g").range(a[0], a[1]),
        _fuzz_live,
    ],
    "channel": [
        lambda db, a: db.channel("c").publish(a[0]),
        lambda db, a: db.channel("c").history(a[0]),
        _fuzz_subscriber,
    ],
    "lock": [_fuzz_lock, lambda db, a: db.list("l").acquire(block=False, timeout=a[0], ttl=a[1])],
    "collection": [
        lambda db, a: db.collection("k").index(Document(id=a[0], body=a[1])),
        lambda db, a: db.collection("k").index(Document(id="v", embedding=a[0])),
        lambda db, a: db.collection("k").get(a[0]),
        lambda db, a: db.collection("k").drop(a[0]),
        lambda db, a: db.collection("k").match(a[0], top_k=a[1]),
        lambda db, a: db.collection("k").match("word", on=a[0], fuzziness=a[1]),
        lambda db, a: db.collection("k").match(_text(a[0]), fuzziness=_small(a[1])),
        lambda db, a: db.collection("k").index(Document(id=_text(a[0]), body=_text(a[1]))),
        lambda db, a: db.collection("k").search(a[0], top_k=a[1], where=a[2]),
        lambda db, a: db.collection("k").connect(a[0], a[1], a[2], metadata=a[3]),
        lambda db, a: db.collection("k").walk(a[0], labels=a[1], depth=a[2]),
        lambda db, a: db.collection("k").neighbors(a[0], label=a[1], direction=a[2]),
    ],
    "database": [
        lambda db, a: db.dict(a[0], model=a[1]),
        lambda db, a: db.log(a[0], retention=a[1]),
        lambda db, a: db.channel(a[0], retention=a[1], max_messages=a[2]),
        lambda db, a: db.collection(a[0], metric=a[1]),
        lambda db, a: db.dict("d").on(a[0], print).off(),
        lambda db, a: db.dump(io.StringIO(), names=a[0]),
        lambda db, a: db.load(io.StringIO(_json_line(a[0])), mode=a[1]),
    ],
}


def _text(value):
    """``value`` if it is a str, else its repr: a call that gets past its type checks."""
    return value if isinstance(value, str) else repr(value)


def _small(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2 \
        else 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", sorted(FUZZ_CALLS))
def test_fuzz_every_call_with_every_corner_value(tmp_path, clock, kind):
    """The deterministic half of the fuzz: each corner value in each of the first two
    argument positions of every call, the other arguments ordinary."""
    with BeaverDB(tmp_path / "corners.db", timeout=5) as db:
        _seed_fuzz_database(db)
        fuzz = _Fuzz(db, kind)
        for which, call in enumerate(FUZZ_CALLS[kind]):
            for position in (0, 1):
                for value in CORNERS:
                    args = ["k", 1, None, None]
                    args[position] = value
                    fuzz.call(which, call, tuple(args))


class _Fuzz:
    """Calls one at a time; a call that raises must leave the dump of the database as it was
    (the dump is taken after each call, so a failed call costs one dump, not two). The tests
    stop beaver's clock, so no TTL runs out between two dumps."""

    def __init__(self, db, kind):
        self.db, self.kind, self.state = db, kind, _state(db)

    def call(self, which, call, args):
        try:
            call(self.db, args)
        except Exception as e:
            if _known_collection_bug(self.kind, args, e):
                self.state = _state(self.db)
                return
            where = f"call {which} of {self.kind} with {args!r:.120}"
            assert isinstance(e, FUZZ_ALLOWED), f"{where} raised {type(e).__name__}: {e}"
            assert not (type(e) is beaver.BeaverError and e.orig is not None), (
                f"{where}: an SQLite error beaver did not expect: {e}")
            assert _state(self.db) == self.state, f"{where} raised after a change"
        else:
            self.state = _state(self.db)


def _known_collection_bug(kind, args, error):
    """The inputs of the expected failures below (collection internals, fixed elsewhere)."""
    if kind != "collection":
        return False
    if isinstance(error, OverflowError):                            # match(fuzziness=inf)
        return any(a in (INF, -INF) for a in args if isinstance(a, float))
    return isinstance(getattr(error, "orig", None), (sqlite3.InterfaceError,
                                                     sqlite3.ProgrammingError)) and any(
        isinstance(a, (list, tuple)) and any(isinstance(x, (list, dict)) for x in a)
        for a in args)                                  # walk(labels=[[...]]) and the like


def test_collection_walk_with_labels_that_are_not_str(db):
    with pytest.raises(TypeError, match="label"):
        db.collection("k").walk("a", labels=[["x"]])


@pytest.mark.parametrize("query", ["a\x00b", "wo\ud800rd"])
def test_collection_match_with_nul_or_surrogate_inside_a_word(db, query):
    from beaver import Document
    docs = db.collection("k")
    docs.index(Document(id="k", body={"text": "word"}))
    assert docs.match(query) == [] and docs.match(query, fuzziness=1) == []


def test_collection_match_with_infinite_fuzziness(db):
    with pytest.raises(ValueError, match="fuzziness"):
        db.collection("k").match("word", fuzziness=INF)


def _json_line(value):
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return "[]"


def _seed_fuzz_database(db):
    from beaver import Document
    db.dict("d").update({"k": 1, "": 2})
    db.list("l").extend([1, "k", None])
    db.queue("q").put("k")
    db.blobs("b").put("k", b"data")
    db.log("g").log("k", timestamp=1000)
    db.channel("c").publish("k")
    db.collection("k").index(Document(id="k", body={"text": "word"}))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", sorted(FUZZ_CALLS))
def test_fuzz_hostile_inputs_raise_clear_errors_and_change_nothing(tmp_path, clock, kind):
    with BeaverDB(tmp_path / "fuzz.db", timeout=5) as db:
        _seed_fuzz_database(db)
        calls, fuzz = FUZZ_CALLS[kind], _Fuzz(db, kind)

        @settings(max_examples=int(os.environ.get("BEAVER_FUZZ_EXAMPLES", "25")),
                  deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.integers(0, len(calls) - 1), st.tuples(FUZZ_ARG, FUZZ_ARG, FUZZ_ARG, FUZZ_ARG))
        def hostile_call(which, args):
            fuzz.call(which, calls[which], args)
        hostile_call()


# ---- codec / Model ----

class Address(beaver.Model):
    city: str
    zip: str = ""


class Person(beaver.Model):
    name: str
    age: int = 0
    address: typing.Optional[Address] = None
    tags: typing.List[str] = []
    friends: typing.List["Friend"] = []


class Friend(beaver.Model):
    name: str
    score: float = 0.0


def test_model_fields_defaults_and_round_trip():
    p = Person(name="Ada", address=Address(city="London"), friends=[Friend(name="Bob")])
    assert p.age == 0 and p.tags == [] and p.address.city == "London"
    data = p.model_dump()
    assert data == {"name": "Ada", "age": 0, "address": {"city": "London", "zip": ""},
                    "tags": [], "friends": [{"name": "Bob", "score": 0.0}]}
    assert Person.model_validate(data) == p
    assert Person.model_validate_json(p.model_dump_json()) == p
    again = Person.model_validate_json(json.dumps(data))
    assert isinstance(again.address, Address) and isinstance(again.friends[0], Friend)
    assert Person.model_validate(p) is p
    assert "Ada" in repr(p)


def test_model_defaults_are_not_shared():
    a, b = Person(name="a"), Person(name="b")
    a.tags.append("x")
    assert b.tags == []


@pytest.mark.parametrize("data", [
    {},                                   # missing field
    {"name": 1},                          # wrong type
    {"name": "x", "age": "3"},            # wrong type
    {"name": "x", "age": True},           # bool is not an int here
    {"name": "x", "nick": "y"},           # unknown field
    {"name": "x", "address": {"zip": "1"}},  # nested model missing a field
    {"name": "x", "friends": [{"score": 1.0}]},
])
def test_model_rejects_bad_data(data):
    with pytest.raises(beaver.ValidationError):
        Person.model_validate(data)
    with pytest.raises(ValueError):
        Person.model_validate(data)


def test_model_literal_tuple_and_set_fields():
    class Shape(beaver.Model):
        kind: typing.Literal["circle", "square"] = "circle"
        origin: typing.Tuple[int, str] = (0, "")
        sizes: typing.Tuple[float, ...] = ()
        tags: typing.Set[str] = set()

    shape = Shape(kind="square", origin=(1, "a"), sizes=(1.5, 2), tags={"x"})
    again = Shape.model_validate_json(shape.model_dump_json())
    assert again.model_dump() == {"kind": "square", "origin": [1, "a"], "sizes": [1.5, 2],
                                  "tags": ["x"]}
    assert Shape().model_dump_json()                  # defaults serialize too
    for bad in [{"kind": "triangle"}, {"origin": (1, 2)}, {"origin": [1]},
                {"sizes": ["big"]}, {"tags": [1]}]:
        with pytest.raises(beaver.ValidationError):
            Shape.model_validate(bad)


def test_model_validate_needs_a_dict():
    with pytest.raises(ValueError):
        Person.model_validate(["not", "a", "dict"])


def test_json_values_round_trip_exactly(db):
    values = [None, True, False, 0, -1, 2**62, 10**30, 1.5, -0.25, "", "text", "ünï🦫",
              [], {}, [1, [2, [3]]], {"a": {"b": [None, True]}}]
    d = db.dict("values")
    for i, value in enumerate(values):
        d[str(i)] = value
    assert [d[str(i)] for i in range(len(values))] == values


@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes", {"k": object()}, {(1, 2): 3}])
def test_non_json_values_raise_type_error_and_write_nothing(db, bad):
    d, lst, q = db.dict("d"), db.list("l"), db.queue("q")
    with pytest.raises(TypeError):
        d["k"] = bad
    with pytest.raises(TypeError):
        lst.push(bad)
    with pytest.raises(TypeError):
        lst.extend([1, bad])
    with pytest.raises(TypeError):
        q.put(bad)
    with pytest.raises(TypeError):
        db.blobs("b").put("k", b"data", metadata=bad)
    assert len(d) == len(lst) == len(q) == len(db.blobs("b")) == 0


def test_circular_value_raises_type_error(db):
    loop = []
    loop.append(loop)
    with pytest.raises(TypeError):
        db.dict("d")["k"] = loop
    assert "k" not in db.dict("d")


def test_model_validated_on_write_everywhere(db):
    people = db.dict("people", model=Person)
    people["ada"] = Person(name="Ada", address=Address(city="London"))
    people["bob"] = {"name": "Bob", "friends": [{"name": "Ada", "score": 2}]}
    assert isinstance(people["ada"], Person) and people["ada"].address.city == "London"
    assert isinstance(people["bob"].friends[0], Friend)
    for bad in [Address(city="x"), {"name": 1}, {"nick": "x"}, "Ada", 5, None]:
        with pytest.raises((TypeError, ValueError)):
            people["bad"] = bad
    assert "bad" not in people and len(people) == 2

    lst = db.list("people", model=Person)
    lst.push(Person(name="a"))
    with pytest.raises((TypeError, ValueError)):
        lst.push({"name": 3})
    with pytest.raises((TypeError, ValueError)):
        lst.extend([Person(name="b"), {"nope": 1}])
    assert list(lst) == [Person(name="a")]

    q = db.queue("people", model=Person)
    q.put({"name": "q"})
    with pytest.raises((TypeError, ValueError)):
        q.put(Friend(name="f"))
    assert len(q) == 1 and q.get(block=False).data == Person(name="q")

    files = db.blobs("files", model=Address)
    files.put("a", b"1", metadata=Address(city="Rome"))
    with pytest.raises((TypeError, ValueError)):
        files.put("b", b"2", metadata={"town": "x"})
    assert files.get("a").metadata == Address(city="Rome") and "b" not in files


def test_model_subclass_instances_are_stored_as_the_model(db):
    class Admin(Address):
        level: int = 1

    class Labelled(Address):
        def label(self):
            return self.city.upper()

    places = db.dict("places", model=Address)
    places["labelled"] = Labelled(city="x")     # same fields: stored, read back as Address
    assert type(places["labelled"]) is Address
    with pytest.raises(ValueError):             # extra fields the model cannot read back
        places["admin"] = Admin(city="Rome", level=3)
    assert places.items() == [("labelled", Address(city="x"))]


def test_model_dict_and_optional_fields(db):
    class Registry(beaver.Model):
        by_city: typing.Dict[str, Address] = {}
        count: typing.Optional[int] = None

    reg = db.dict("reg", model=Registry)
    reg["r"] = {"by_city": {"rome": {"city": "Rome"}}}
    got = reg["r"]
    assert isinstance(got.by_city["rome"], Address) and got.count is None
    with pytest.raises(ValueError):
        reg["bad"] = {"by_city": {"rome": {"town": "Rome"}}}
    with pytest.raises(ValueError):
        reg["bad"] = {"count": "three"}
    assert list(reg) == ["r"]


def test_pydantic_models(db):
    pydantic = pytest.importorskip("pydantic")

    class Tag(pydantic.BaseModel):
        label: str

    class User(pydantic.BaseModel):
        name: str
        email: str
        permissions: typing.List[str]
        tags: typing.List[Tag] = []

    users = db.dict("users", model=User)
    users["alice"] = User(name="Alice", email="a@x", permissions=["read"],
                          tags=[Tag(label="admin")])
    users["bob"] = {"name": "Bob", "email": "b@x", "permissions": []}
    got = users["alice"]
    assert isinstance(got, User) and isinstance(got.tags[0], Tag)
    assert got.tags[0].label == "admin" and users["bob"].permissions == []
    for bad in [{"name": "x"}, Tag(label="x"), {"name": 1, "email": "e", "permissions": []}]:
        with pytest.raises((TypeError, ValueError)):
            users["bad"] = bad
    assert sorted(users) == ["alice", "bob"]
    tasks = db.queue("tasks", model=User)
    tasks.put(users["bob"])
    assert tasks.get(block=False).data == users["bob"]
    db.list("users", model=User).append(got)
    assert db.list("users", model=User)[0] == got

    class Admin(User):
        level: int = 1

    users["root"] = Admin(name="Root", email="r@x", permissions=["all"], level=9)
    assert type(users["root"]) is User and users["root"].name == "Root"   # stored as a User


# ---- queries: filters, ordering, paging and field indexes ----
# An oracle of the filter language, written apart from beaver's compiler (it reads the filter
# dict itself), and the property tests comparing dict.find / log.range(where=) with it.

MISSING = object()
PATH_PART = re.compile(r'\.?"([^"]*)"|\.?([^.\[\]"]+)|\[(\d+)\]')


def oracle_path(path):
    """The parts of a filter path: keys (str) and array positions (int)."""
    parts = []
    for quoted, bare, index in PATH_PART.findall(path):
        parts.append(int(index) if index else quoted if quoted or not bare else bare)
    return parts


def oracle_get(doc, path):
    for part in oracle_path(path):
        if isinstance(part, int):
            if not (isinstance(doc, list) and part < len(doc)):
                return MISSING
        elif not (isinstance(doc, dict) and part in doc):
            return MISSING
        doc = doc[part]
    return doc


def json_kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def as_number(value):
    """SQLite reads JSON integers beyond 64 bits as floats."""
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        return float(value)
    return value


def json_equal(a, b):
    if a is MISSING or json_kind(a) != json_kind(b) or json_kind(a) in ("array", "object"):
        return False
    return as_number(a) == as_number(b)


ORACLE_ORDER = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


def oracle_op(value, op, arg):
    if op == "$eq":
        return json_equal(value, arg)
    if op == "$ne":
        return not json_equal(value, arg)
    if op == "$in":
        return any(json_equal(value, a) for a in arg)
    if op == "$nin":
        return not any(json_equal(value, a) for a in arg)
    if op == "$exists":
        return (value is not MISSING) == arg
    if op == "$contains":
        return isinstance(value, list) and any(json_equal(item, arg) for item in value)
    if op == "$not":
        return not oracle_condition(value, arg)
    return (value is not MISSING and json_kind(value) == json_kind(arg)
            and ORACLE_ORDER[op](as_number(value), as_number(arg)))


def oracle_condition(value, condition):
    if isinstance(condition, dict):
        return all(oracle_op(value, op, arg) for op, arg in condition.items())
    if isinstance(condition, list):
        return oracle_op(value, "$in", condition)
    return oracle_op(value, "$eq", condition)


def oracle_match(where, doc):
    for key, condition in where.items():
        if key == "$and":
            ok = all(oracle_match(f, doc) for f in condition)
        elif key == "$or":
            ok = any(oracle_match(f, doc) for f in condition)
        elif key == "$not":
            ok = not oracle_match(condition, doc)
        else:
            ok = oracle_condition(oracle_get(doc, key), condition)
        if not ok:
            return False
    return True


def oracle_sort_key(value):
    """Missing < null < false < true < numbers < strings < arrays < objects (as JSON text)."""
    if value is MISSING:
        return (-1, 0)
    kind = json_kind(value)
    if kind == "bool":
        return (2 if value else 1, 0)
    if kind in ("array", "object"):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return (5 if kind == "array" else 6, text)
    return ({"null": 0, "number": 3, "string": 4}[kind], 0 if value is None else as_number(value))


def oracle_sorted(pairs, order_by):
    """``pairs`` (in key order) sorted by ``order_by`` stably, as Python sorts."""
    for spec in reversed(order_by):
        path, descending = (spec[1:], True) if spec.startswith("-") else (spec, False)
        pairs = sorted(pairs, key=lambda kv: oracle_sort_key(oracle_get(kv[1], path)),
                       reverse=descending)
    return pairs


def test_oracle_reads_paths_like_beaver():
    assert oracle_path('n."$k".x[2]') == ["n", "$k", "x", 2]
    assert oracle_path('"a.b"') == ["a.b"] and oracle_path('""') == [""]
    assert oracle_get({"a": [{"b": 1}]}, "a[0].b") == 1
    assert oracle_get({"a": {"0": 1}}, "a[0]") is MISSING


Q_PATHS = ["a", "b", "é", '"a.b"', '"$k"', "n", "n.x", "n.y", "arr", "arr[0]", "arr[1].x", "[0]",
           "missing"]
def q_weighted(*weighted):
    """One of the strategies, drawn with the given weights (one_of's choice is not even)."""
    weights = [w for w, _ in weighted]
    return st.integers(0, sum(weights) - 1).flatmap(
        lambda n: next(s for s, top in zip([s for _, s in weighted], itertools.accumulate(weights))
                       if n < top))


q_common = st.sampled_from([None, True, False, 0, 1, 1.0, 2, "", "a", "1"])
q_rare = (st.sampled_from([-0.0, 1e300, 2**53 + 1, 2**63, 2**63 - 1, -2**63, "ab", "true",
                           "null", "[1]", "\U0001F600"])
          | st.integers(-3, 3) | st.floats(-4, 4, allow_nan=False).map(lambda f: round(f, 1))
          | st.text("ab\u00e9\U0001F600\n'\"", max_size=2))
q_scalars = q_weighted((3, q_common), (1, q_rare))       # common values meet often
q_leaves = q_weighted((3, q_scalars), (1, st.lists(q_scalars, max_size=3)))
q_objects = st.fixed_dictionaries({}, optional={"x": q_leaves, "y": q_scalars})
q_docs = q_weighted(
    (8, st.fixed_dictionaries({}, optional={
        "a": q_leaves, "b": q_leaves, "é": q_scalars, "a.b": q_scalars, "$k": q_scalars,
        "n": q_objects | q_scalars, "arr": st.lists(q_scalars | q_objects, max_size=3)})),
    (1, q_scalars), (1, st.lists(q_scalars, max_size=2)))
q_orderable = st.one_of(st.integers(-3, 3), st.sampled_from([1.5, -0.0, 2**63, "", "a", "b",
                                                              "é", "1"]), st.text("ab", max_size=2))
q_operator = st.one_of(
    st.tuples(st.sampled_from(["$eq", "$ne", "$contains"]), q_scalars),
    st.tuples(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), q_orderable),
    st.tuples(st.sampled_from(["$in", "$nin"]), st.lists(q_scalars, max_size=3)),
    st.tuples(st.just("$exists"), st.booleans()))
q_conditions = st.recursive(
    q_scalars | st.lists(q_scalars, max_size=3)
    | st.lists(q_operator, min_size=1, max_size=2).map(dict),
    lambda inner: inner.map(lambda c: {"$not": c}), max_leaves=3)
Q_LIKELY = ["a", "b", "é", '"a.b"', '"$k"', "n", "n.x", "arr[0]"]    # paths most documents hold
q_paths = q_weighted((3, st.sampled_from(Q_LIKELY)), (1, st.sampled_from(Q_PATHS)))
q_filters = st.recursive(
    q_weighted((20, st.dictionaries(q_paths, q_conditions, min_size=1, max_size=2)),
               (1, st.just({}))),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda fs: {"$and": fs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda fs: {"$or": fs}),
        inner.map(lambda f: {"$not": f}),
        st.tuples(inner, inner).map(lambda two: {**two[0], **two[1]})),
    max_leaves=6)
q_order_by = st.lists(st.sampled_from(Q_PATHS).flatmap(lambda p: st.sampled_from([p, "-" + p])),
                      max_size=2)
QUERY_SETTINGS = settings(max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])


def indexed_twins(db, kind):
    """Two empty structures of ``kind``: one with a field index on every test path."""
    make = getattr(db, kind)
    plain, indexed = make("plain"), make("indexed")
    for path in Q_PATHS:
        indexed.create_index(path)
    return plain, indexed


def dict_twins(db, docs):
    """``indexed_twins`` of dicts holding ``docs`` under keys k00, k01...; and those pairs."""
    plain, indexed = indexed_twins(db, "dict")
    pairs = [(f"k{i:02d}", doc) for i, doc in enumerate(docs)]
    with db.transaction():
        for key, doc in pairs:
            plain[key] = indexed[key] = doc
    return plain, indexed, pairs


@QUERY_SETTINGS
@given(docs=st.lists(q_docs, max_size=12), filters=st.lists(q_filters, min_size=1, max_size=5))
def test_dict_find_matches_the_oracle_with_and_without_indexes(docs, filters):
    with BeaverDB(":memory:") as db:
        plain, indexed, pairs = dict_twins(db, docs)
        for where in filters:
            expected = [(k, d) for k, d in pairs if oracle_match(where, d)]
            assert plain.find(where) == expected, where
            assert indexed.find(where) == expected, where


@QUERY_SETTINGS
@given(docs=st.lists(q_docs, max_size=12), filters=st.lists(q_filters, min_size=1, max_size=5),
       order=st.sampled_from(["asc", "desc"]))
def test_log_range_where_matches_the_oracle_with_and_without_indexes(docs, filters, order):
    with BeaverDB(":memory:") as db:
        plain, indexed = indexed_twins(db, "log")
        entries = [(1000 + (i * 7) % 5, i, doc) for i, doc in enumerate(docs)]  # equal times too
        with db.transaction():
            for when, _, doc in entries:
                plain.log(doc, timestamp=when)
                indexed.log(doc, timestamp=when)
        entries.sort(key=lambda e: e[:2], reverse=order == "desc")
        for where in filters:
            expected = [(when, doc) for when, _, doc in entries if oracle_match(where, doc)]
            for log in (plain, indexed):
                got = [(e.timestamp.timestamp(), e.data) for e in log.range(where=where,
                                                                            order=order)]
                assert got == expected, where
            low = [(t, d) for t, d in expected if t >= 1002]
            assert [e.data for e in indexed.range(start=1002, where=where, order=order)] == \
                [d for _, d in low]


@QUERY_SETTINGS
@given(docs=st.lists(q_docs, max_size=12), where=q_filters, order_by=q_order_by,
       limit=st.none() | st.integers(0, 5), offset=st.integers(0, 4))
def test_dict_find_order_and_paging_match_the_oracle(docs, where, order_by, limit, offset):
    with BeaverDB(":memory:") as db:
        plain, indexed, pairs = dict_twins(db, docs)
        ordered = oracle_sorted([(k, d) for k, d in pairs if oracle_match(where, d)], order_by)
        expected = ordered[offset:None if limit is None else offset + limit]
        for d in (plain, indexed):
            assert d.find(where, order_by=order_by, limit=limit, offset=offset) == expected


def test_filter_null_and_missing_fields(db):
    d = db.dict("nulls")
    d.update(null={"x": None}, missing={}, zero={"x": 0}, false={"x": False}, text={"x": "null"})
    keys = lambda where: [k for k, _ in d.find(where)]          # noqa: E731
    assert keys({"x": None}) == ["null"]                          # explicit null only
    assert keys({"x": {"$exists": False}}) == ["missing"]
    assert keys({"x": {"$exists": True}}) == ["false", "null", "text", "zero"]
    assert keys({"x": {"$ne": None}}) == ["false", "missing", "text", "zero"]   # missing too
    assert keys({"x": {"$nin": [0, None]}}) == ["false", "missing", "text"]
    assert keys({"$not": {"x": 0}}) == ["false", "missing", "null", "text"]
    assert keys({"x": {"$not": {"$gt": -1}}}) == ["false", "missing", "null", "text"]
    assert keys({"$or": [{"x": None}, {"x": {"$exists": False}}]}) == ["missing", "null"]


def test_filter_comparisons_follow_json_types(db):
    d = db.dict("types")
    d.update(one={"v": 1}, one_f={"v": 1.0}, true={"v": True}, text={"v": "1"},
             arr={"v": [1]}, arr_text={"v": "[1]"}, obj={"v": {"a": 1}}, big={"v": 2**63})
    keys = lambda where: [k for k, _ in d.find(where)]          # noqa: E731
    assert keys({"v": 1}) == keys({"v": 1.0}) == ["one", "one_f"]   # 1 == 1.0, never true or "1"
    assert keys({"v": True}) == ["true"] and keys({"v": "1"}) == ["text"]
    assert keys({"v": "[1]"}) == ["arr_text"]                     # not the array [1]
    assert keys({"v": {"$gte": 1}}) == ["big", "one", "one_f"]    # numbers with numbers only
    assert keys({"v": {"$gte": ""}}) == ["arr_text", "text"]      # strings with strings only
    assert keys({"v": {"$contains": 1}}) == ["arr"] and keys({"v": {"$contains": True}}) == []
    assert keys({"v": 2**63}) == ["big"] and keys({"v": [True, "1"]}) == ["text", "true"]


def test_filter_paths_quoted_keys_items_and_unicode(db):
    d = db.dict("paths")
    d["a"] = {"v1.2": {"notes": "x"}, "$set": 1, "tags": ["p", "q"], "ключ": {"é": 2},
              "it's": 3, "a b": 4, "": 5}
    d["b"] = {"tags": ["q"], "v1": {"2": {"notes": "x"}}}
    keys = lambda where: [k for k, _ in d.find(where)]          # noqa: E731
    assert keys({'"v1.2".notes': "x"}) == ["a"]
    assert keys({'"$set"': 1}) == ["a"]
    assert keys({"tags[1]": "q"}) == ["a"] and keys({"tags[0]": "q"}) == ["b"]
    assert keys({"ключ.é": 2}) == ["a"] and keys({"it's": 3}) == ["a"]
    assert keys({"a b": 4}) == ["a"] and keys({'""': 5}) == ["a"]
    assert keys({"v1.2.notes": "x"}) == ["b"]   # dots walk objects: v1 -> "2" -> notes
    d.create_index('"v1.2".notes')
    d.create_index("ключ.é")
    assert d.indexes() == ['"v1.2".notes', "ключ.é"]
    assert d.explain(where={'"v1.2".notes': "x"})["index"] == '"v1.2".notes'
    assert keys({'"v1.2".notes': "x"}) == ["a"]


@pytest.mark.parametrize("where, part", [
    ({"x": {"$regex": "a"}}, "unknown operator '$regex'"),
    ({"$nor": [{"x": 1}]}, "'$nor'"),
    ({"x": {"$gt": None}}, "$gt compares numbers or strings"),
    ({"x": {"$lt": [1]}}, "expected a JSON scalar"),
    ({"x": {"$in": 1}}, "expected a list"),
    ({"x": {"$in": [1, {"a": 1}]}}, "['x']['$in'][1]"),
    ({"x": {"$exists": 1}}, "$exists takes true or false"),
    ({"x": float("nan")}, "not a JSON number"),
    ({"x": {"$gte": float("inf")}}, "not a JSON number"),
    ({"x": 10**5000}, "an integer of 16610 bits is beyond the range of JSON numbers"),
    ({"x": "a\x00b"}, "NUL"),
    ({"x": "\ud800"}, "not valid Unicode"),
    ({1: 2}, "a field path is a str"),
    ({"": 1}, "bad field path ''"),
    ({"a..b": 1}, "bad field path"),
    ({"a[x]": 1}, "bad field path"),
    ({'a"b': 1}, "bad field path"),
    ({"a\\b": 1}, "bad field path"),
    ({"a\nb": 1}, "bad field path"),
    ({"a.\ud800": 1}, "not valid Unicode"),
    ({"$or": []}, "$or takes a non-empty list"),
    ({"$and": {"x": 1}}, "$and takes a non-empty list"),
    ({"$not": [{"x": 1}]}, "a filter is a dict"),
    ({"x": {}}, "a condition dict holds operators"),
    ({"x": {"a": 1}}, "whole objects are not compared"),
    ({"x": {"$eq": 1, "b": 2}}, "a condition dict holds operators"),
    ([("x", 1)], "a filter is a dict"),
    ({"x": {"$eq": b"1"}}, "not bytes"),
])
def test_malformed_filters_raise_before_any_sql(db, where, part):
    d, log = db.dict("users"), db.log("events")
    len(d)                                      # open this thread's connection first
    statements = []
    db._core.conn().set_trace_callback(statements.append)
    try:
        for call in (lambda: d.find(where), lambda: log.range(where=where),
                     lambda: d.explain(where=where), lambda: log.live(1, 1, where=where)):
            with pytest.raises(ValueError) as info:
                call()
            assert isinstance(info.value, beaver.ValidationError)
            assert part in str(info.value)
    finally:
        db._core.conn().set_trace_callback(None)
    assert statements == []


def test_filter_limits_on_depth_and_size(db):
    d = db.dict("limits")
    where = {"x": 1}
    for _ in range(beaver.FILTER_MAX_DEPTH):
        where = {"$not": where}
    d.find(where)                                                  # at the limit: fine
    with pytest.raises(beaver.ValidationError, match="nests deeper"):
        d.find({"$not": where})
    wide = {"$and": [{"x": i} for i in range(beaver.FILTER_MAX_CONDITIONS)]}
    assert d.find(wide) == []
    with pytest.raises(beaver.ValidationError, match="at most"):
        d.find({"$and": [{"x": i} for i in range(beaver.FILTER_MAX_CONDITIONS + 1)]})
    d["k"] = {"x": 5}
    assert d.find({"x": {"$in": list(range(100_000))}}) == [("k", {"x": 5})]   # one parameter


@pytest.mark.parametrize("order_by, message", [
    (5, "order_by is a path or a list"), (["a", 3], "a field path is a str"),
    ("-", "bad field path"), ("a.", "bad field path")])
def test_bad_order_by_raises(db, order_by, message):
    with pytest.raises(beaver.ValidationError, match=re.escape(message)):
        db.dict("d").find(order_by=order_by)


@pytest.mark.parametrize("limit, offset, error", [
    (-1, 0, ValueError), (1, -1, ValueError), (1.5, 0, TypeError), (True, 0, TypeError),
    (None, None, TypeError), ("3", 0, TypeError)])
def test_bad_paging_raises(db, limit, offset, error):
    with pytest.raises(error):
        db.dict("d").find(limit=limit, offset=offset)
    with pytest.raises(error):
        db.log("l").range(limit=limit, offset=offset)


def test_dict_find_order_by_paths_with_ties_by_key(db):
    d = db.dict("people")
    d.update(c={"age": 30, "name": "Cy"}, a={"age": 30, "name": "Al"}, b={"age": 25},
             d={"name": "Di"}, e={"age": None})
    assert [k for k, _ in d.find(order_by="age")] == ["d", "e", "b", "a", "c"]
    assert [k for k, _ in d.find(order_by="-age")] == ["a", "c", "b", "e", "d"]
    assert [k for k, _ in d.find(order_by=["-age", "-name"])] == ["c", "a", "b", "e", "d"]
    assert [k for k, _ in d.find(order_by="-age", limit=2, offset=1)] == ["c", "b"]
    assert d.find(limit=0) == [] and [k for k, _ in d.find(offset=3)] == ["d", "e"]
    d.create_index("age")
    assert d.explain(order_by="age")["index"] == "age"
    assert [k for k, _ in d.find(order_by="-age", limit=2, offset=1)] == ["c", "b"]


def test_dict_find_sees_live_keys_only(db, clock):
    d = db.dict("cache")
    d.set("old", {"v": 1}, ttl_seconds=10)
    d.set("new", {"v": 1}, ttl_seconds=100)
    d["forever"] = {"v": 1}
    d.create_index("v")
    assert [k for k, _ in d.find({"v": 1})] == ["forever", "new", "old"]
    clock.advance(50)
    assert [k for k, _ in d.find({"v": 1})] == ["forever", "new"]
    assert [k for k, _ in d.find(order_by="v")] == ["forever", "new"]


def test_dict_find_with_models(db):
    users = db.dict("users", model=Person)
    users["ada"] = Person(name="Ada", age=36, tags=["admin"], address=Address(city="London"))
    users["bob"] = Person(name="Bob", age=25, address=Address(city="Paris"))
    users.create_index("address.city")
    assert users.find({"address.city": "London"}) == [("ada", users["ada"])]
    assert users.find({"tags": {"$contains": "admin"}, "age": {"$gt": 30}})[0][1].name == "Ada"
    assert [u.name for _, u in users.find(order_by="-age")] == ["Ada", "Bob"]
    assert users.explain(where={"address.city": "Paris"})["index"] == "address.city"


def test_explain_shows_the_field_index_when_one_exists(db):
    d, other = db.dict("users"), db.dict("others")
    for i in range(200):
        d[f"u{i}"] = other[f"u{i}"] = {"age": i % 50, "city": ["x", "y"][i % 2]}
    where = {"age": {"$gte": 40}}
    assert d.explain(where=where)["index"] is None
    d.create_index("age")
    plan = d.explain(where=where)
    assert plan["index"] == "age" and any("USING INDEX beaver_fx_" in p for p in plan["plan"])
    assert d.explain(where={"city": "x", "age": 3})["index"] == "age"
    assert d.explain(where={"$and": [{"city": "x"}, {"age": [1, 2]}]})["index"] == "age"
    assert d.explain(where={"city": "x"})["index"] is None          # no index on city
    assert other.explain(where=where)["index"] is None               # the index is per structure
    assert "PRIMARY KEY" in other.explain(where=where)["plan"][0]
    assert d.find(where) == [(k, v) for k, v in d.items() if v["age"] >= 40]
    assert d.drop_index("age") is True and d.drop_index("age") is False
    assert d.explain(where=where)["index"] is None and d.indexes() == []


def test_log_explain_and_range_with_an_index(db):
    logs = db.log("requests")
    for i in range(300):
        logs.log({"status": [200, 404, 500][i % 3], "ms": i}, timestamp=1000 + i)
    where = {"status": 500}
    assert logs.explain(where=where)["index"] is None
    logs.create_index("status")
    assert logs.indexes() == ["status"]
    assert logs.explain(where=where)["index"] == "status"
    assert logs.explain(where=where, start=1100, end=1200, order="desc")["index"] == "status"
    assert logs.explain(start=1100)["index"] is None                # time alone: the time index
    last = logs.range(where=where, order="desc", limit=3)
    assert [e.data["ms"] for e in last] == [299, 296, 293]
    page = logs.range(start=1100, end=1200, where={"status": {"$in": [404, 500]}}, offset=2,
                      limit=3)
    assert [e.data["ms"] for e in page] == [103, 104, 106]
    assert [e.data["ms"] for e in logs.range(end=1004)] == [0, 1, 2, 3, 4]   # old calls work


def test_field_indexes_persist_and_are_shared(tmp_path):
    path = tmp_path / "shared.db"
    with BeaverDB(path) as first:
        first.dict("users").create_index("age")
        first.dict("users").create_index("age")                   # again: nothing happens
        first.log("events").create_index("level")
        with BeaverDB(path) as second:                             # another connection sees it
            assert second.dict("users").indexes() == ["age"]
            second.dict("users").drop_index("age")
            assert first.dict("users").indexes() == []
            second.dict("users").create_index("age")
        users = first.dict("users")
        users["a"] = {"age": 3}
        users.clear()                                              # clear keeps the index
        assert users.indexes() == ["age"]
    with BeaverDB(path) as again:
        assert again.dict("users").indexes() == ["age"]
        assert again.log("events").indexes() == ["level"]
        assert again.dict("events").indexes() == []                # per kind and name
        assert again.dict("users").explain(where={"age": 3})["index"] == "age"


HOSTILE_NAMES = ["x'); DROP TABLE beaver_dicts; --", 'q"uote', "new\nline", "100%", "..",
                 "ünï/cødé 🦫", "' OR 1=1 --", "users"]


def test_hostile_names_and_paths_cannot_change_the_query(db):
    raw_tables = db._core.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    for name in HOSTILE_NAMES:
        d = db.dict(name)
        d["k"] = {"age": 1, "x'); DROP TABLE beaver_dicts; --": name}
        d["j"] = {"age": 2}
        d.create_index("age")
        d.create_index("\"x'); DROP TABLE beaver_dicts; --\"")
    for name in HOSTILE_NAMES:                  # each index covers its own structure only
        d = db.dict(name)
        assert d.find({"age": 1}) == [("k", d["k"])]
        assert d.find({"x'); DROP TABLE beaver_dicts; --": name}) == [("k", d["k"])]
        assert d.explain(where={"age": 1})["index"] == "age"
        assert d.indexes() == ["age", "x'); DROP TABLE beaver_dicts; --"]   # canonical
    raw_tables += 2 * len(HOSTILE_NAMES)        # two indexes each, nothing else
    assert db._core.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == raw_tables
    sqls = [row[0] for row in db._core.execute(
        "SELECT sql FROM sqlite_master WHERE name LIKE 'beaver_fx_%'")]
    assert sum("WHERE +name = 'x''); DROP TABLE beaver_dicts; --'" in s for s in sqls) == 2
    assert db._core.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_sql_text_is_one_literal_whatever_the_text(text):
    conn = sqlite3.connect(":memory:")
    try:
        literal = beaver._sql_text(text)
    except beaver.ValidationError:
        assert "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    try:
        assert conn.execute(f"SELECT {literal}, 1").fetchall() == [(text, 1)]
    finally:
        conn.close()


@settings(max_examples=300, deadline=None)
@given(key=st.text(min_size=1, max_size=8))
def test_any_addressable_key_reaches_its_value_and_nothing_else(key):
    conn = sqlite3.connect(":memory:")
    try:
        path = beaver._field_path(f'"{key}"')
    except beaver.ValidationError:
        assert any(c in key for c in '"\\') or any(ord(c) < 32 for c in key) or \
            any(0xD800 <= ord(c) <= 0xDFFF for c in key)
        return
    try:
        doc = beaver._json_dumps({key: "hit", "other": "miss"})
        assert conn.execute(f"SELECT json_extract(?, {path.sql})", (doc,)).fetchone() == ("hit",)
        assert beaver._field_path(path.text) == path                 # canonical spelling
    finally:
        conn.close()


def test_index_on_a_name_sql_cannot_hold_is_refused(db):
    for bad in ("a\x00b", "\ud800"):
        for call in (lambda d: d.create_index("x"), lambda d: d.drop_index("x")):
            with pytest.raises(beaver.ValidationError, match="NUL|not valid Unicode"):
                call(db.dict(bad))
    with pytest.raises(beaver.ValidationError, match="bad field path"):
        db.dict("d").create_index("a..b")
    with pytest.raises(beaver.ValidationError, match="a field path is a str"):
        db.dict("d").drop_index(1)
    assert db.dict("d").indexes() == []


def test_log_live_where_keeps_matching_entries(db):
    logs = db.log("app")
    logs.log({"level": "error", "n": 1})
    logs.log({"level": "info", "n": 2})
    with logs.live(window=60, period=0.01, where={"level": "error"},
                   aggregator=lambda rows: [r["n"] for r in rows]) as view:
        views = iter(view)
        assert next(views) == [1]
        for n in range(3, 8):
            logs.log({"level": "info" if n % 2 else "error", "n": n})
        assert next(views) == [1, 4, 6]
        logs.log({"level": "info", "n": 8})
        assert next(views) == [1, 4, 6]
        assert view._last_seq == db._core.execute("SELECT max(seq) FROM beaver_logs").fetchone()[0]


def test_async_find_and_live_where(db):
    d = db.dict("users")
    d["a"] = {"age": 3}
    logs = db.log("l")
    logs.log({"ok": True})
    logs.log({"ok": False})

    async def main():
        found = await d.as_async().find({"age": 3})
        async with logs.as_async().live(60, 0.01, aggregator=len, where={"ok": True}) as view:
            async for count in view:
                return found, count
    assert asyncio.run(main()) == ([("a", {"age": 3})], 1)


def test_nan_and_infinity_are_not_json_and_are_refused(db):
    d = db.dict("numbers")
    for bad in (float("nan"), float("inf"), {"x": [float("-inf")]}):
        with pytest.raises(TypeError, match="JSON"):
            d["k"] = bad
        with pytest.raises(TypeError, match="JSON"):
            db.log("l").log(bad)
    assert len(d) == 0 and len(db.log("l")) == 0


def test_readme_queries_section_shows_what_it_says(in_tmp):
    namespace = _run_readme_section("Queries and filters")        # (docs that run, below)
    assert [k for k, _ in namespace["work"]] == ["n1", "n3"]
    assert [k for k, _ in namespace["newest"]] == ["n4", "n1"]
    assert [k for k, _ in namespace["page"]] == ["n1", "n2"]
    assert [e.data["status"] for e in namespace["errors"]] == [500, 500]
    assert namespace["error_count"] == 2 and namespace["plan"]["index"] == "year"
    assert [d.id for d in namespace["recent"]] == ["a1", "a3"] and namespace["english"] == 2
    assert [d.id for d, _ in namespace["near"]] == ["a1", "a3"]
    assert [d.id for d, _ in namespace["older"]] == ["a3"]


# ---- dict ----

def test_dict_mapping_basics(db):
    d = db.dict("config")
    assert len(d) == 0 and list(d) == [] and "theme" not in d
    d["theme"] = "dark"
    d.set("retries", 3)
    d["user_ids"] = [101, 205]
    assert d["theme"] == "dark" and d.get("retries") == 3
    assert d.get("missing") is None and d.get("missing", "default") == "default"
    assert "theme" in d and "missing" not in d and 123 not in d
    assert len(d) == 3
    assert list(d) == ["retries", "theme", "user_ids"]
    assert d.keys() == ["retries", "theme", "user_ids"]
    assert d.values() == [3, "dark", [101, 205]]
    assert d.items() == [("retries", 3), ("theme", "dark"), ("user_ids", [101, 205])]
    assert dict(d) == {"theme": "dark", "retries": 3, "user_ids": [101, 205]}
    assert d == {"theme": "dark", "retries": 3, "user_ids": [101, 205]}
    d["theme"] = "light"
    assert d["theme"] == "light" and len(d) == 3
    del d["retries"]
    assert "retries" not in d and len(d) == 2
    with pytest.raises(KeyError):
        d["retries"]
    with pytest.raises(KeyError):
        del d["retries"]


def test_dict_pop_setdefault_update_popitem(db):
    d = db.dict("d")
    d.update({"a": 1, "b": 2}, c=3)
    d.update([("d", 4)])
    assert dict(d) == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert d.pop("a") == 1 and "a" not in d
    with pytest.raises(KeyError):
        d.pop("a")
    assert d.pop("a", "gone") == "gone"
    assert d.pop("a", None) is None
    assert d.setdefault("b", 99) == 2 and d["b"] == 2
    assert d.setdefault("e", [5]) == [5] and d["e"] == [5]
    assert d.setdefault("f") is None and "f" in d and d["f"] is None
    assert d.popitem() == ("b", 2)          # the smallest key first
    popped = [d.popitem() for _ in range(len(d))]
    assert popped == [("c", 3), ("d", 4), ("e", [5]), ("f", None)]
    with pytest.raises(KeyError):
        d.popitem()


def test_dict_update_is_atomic(db):
    d = db.dict("d")
    d["keep"] = 1
    with pytest.raises(TypeError):
        d.update({"a": 1, "b": object()})
    with pytest.raises(TypeError):
        d.update({"a": 1, 2: "int key"})
    assert dict(d) == {"keep": 1}


def test_dict_clear_and_namespaces(db):
    a, b = db.dict("a"), db.dict("b")
    a["k"], b["k"] = 1, 2
    a.clear()
    assert len(a) == 0 and b["k"] == 2
    assert db.list("a") is not a          # other kinds with the same name are separate


def test_dict_unusual_keys(db, monkeypatch):
    d = db.dict("d")
    keys = ["", " ", "a\x00b", "ключ", "🦫", "x" * 1000, "'; DROP TABLE beaver_dicts; --"]
    for i, key in enumerate(keys):
        d[key] = i
    assert sorted(d) == sorted(keys) and len(d) == len(keys)
    assert [d[k] for k in keys] == list(range(len(keys)))
    monkeypatch.setattr(beaver, "PAGE_SIZE", 2)       # iteration pages through the keys
    assert list(d) == sorted(keys)
    assert d.items() == sorted((k, i) for i, k in enumerate(keys))


@pytest.mark.parametrize("key", [1, 1.5, None, b"k", ("t",), True])
def test_dict_non_str_keys_raise_type_error(db, key):
    d = db.dict("d")
    with pytest.raises(TypeError):
        d[key] = 1
    with pytest.raises(TypeError):
        d.set(key, 1, ttl_seconds=5)
    with pytest.raises(TypeError):
        d[key]
    with pytest.raises(TypeError):
        d.get(key)
    assert key not in d
    assert len(d) == 0


@pytest.mark.parametrize("ttl", [0, -1, -0.5, "10", True, False, float("nan"), [1]])
def test_dict_bad_ttl_raises_and_writes_nothing(db, ttl):
    d = db.dict("d")
    d["k"] = "old"
    with pytest.raises((TypeError, ValueError)):
        d.set("k", "new", ttl_seconds=ttl)
    with pytest.raises((TypeError, ValueError)):
        d.set("other", "new", ttl_seconds=ttl)
    assert dict(d) == {"k": "old"} and d.ttl("k") is None


def test_dict_ttl_is_exact_everywhere(db, clock):
    d = db.dict("cache")
    d["forever"] = 0
    d.set("short", 1, ttl_seconds=10)
    d.set("long", 2, ttl_seconds=100)
    clock.advance(9.999)
    assert d["short"] == 1 and len(d) == 3
    clock.advance(0.001)                  # exactly at expiry: gone
    assert "short" not in d and d.get("short") is None and d.get("short", "x") == "x"
    with pytest.raises(KeyError):
        d["short"]
    with pytest.raises(KeyError):
        del d["short"]
    with pytest.raises(KeyError):
        d.pop("short")
    with pytest.raises(KeyError):
        d.ttl("short")
    assert len(d) == 2
    assert list(d) == ["forever", "long"] and d.keys() == ["forever", "long"]
    assert d.items() == [("forever", 0), ("long", 2)] and d.values() == [0, 2]
    assert dict(d) == {"forever": 0, "long": 2}
    assert [item["key"] for item in d.dump()["items"]] == ["forever", "long"]
    assert d.dump()["metadata"]["count"] == 2
    assert d.setdefault("short", "fresh") == "fresh"   # an expired key is free again
    assert d.ttl("short") is None
    clock.advance(1000)
    assert dict(d) == {"forever": 0, "short": "fresh"}


def test_dict_ttl_method(db, clock):
    d = db.dict("cache")
    d.set("k", 1, ttl_seconds=60)
    assert d.ttl("k") == pytest.approx(60)
    clock.advance(15)
    assert d.ttl("k") == pytest.approx(45)
    d.set("k", 2, ttl_seconds=5.5)          # a new set replaces the expiry
    assert d.ttl("k") == pytest.approx(5.5)
    d["k"] = 3                              # plain assignment removes it
    assert d.ttl("k") is None
    clock.advance(10**6)
    assert d["k"] == 3
    with pytest.raises(KeyError):
        d.ttl("missing")
    d.set("td", 1, ttl_seconds=2)           # ints and floats; ttl() is never negative
    clock.advance(1.5)
    assert 0 <= d.ttl("td") <= 0.5


def test_dict_ttl_with_the_real_clock(db):
    d = db.dict("cache")
    d.set("brief", "v", ttl_seconds=0.05)
    d.set("hour", "v", ttl_seconds=3600)
    time.sleep(0.1)                         # waits past the expiry, never races towards it
    assert "brief" not in d and d.get("brief") is None and list(d) == ["hour"]


def _stored_rows(path):
    return raw_rows(path, "SELECT count(*) FROM beaver_dicts")[0][0]


def test_dict_writes_purge_at_least_as_many_due_rows_as_they_expire(tmp_path, clock,
                                                                     monkeypatch):
    monkeypatch.setattr(beaver, "PURGE_INTERVAL", 3600.0)     # no idle purge in this test
    path = tmp_path / "purge.db"
    with BeaverDB(path) as db:
        d, other = db.dict("cache"), db.dict("other")
        for round_ in range(5):
            for i in range(1000):
                (d if i % 2 else other).set(f"k{round_}-{i}", i, ttl_seconds=1)
            clock.advance(2)            # this round's keys are now dead
        for i in range(1000):
            d.set(f"fresh-{i}", i, ttl_seconds=60)
        assert len(d) == 1000
        dead = _stored_rows(path) - 1000
        assert dead <= 100, f"{dead} dead rows beside 1000 live ones"
        assert len(other) == 0 and d.get("k0-1") is None


def test_dict_expired_rows_are_purged_while_idle(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(beaver, "PURGE_INTERVAL", 0.02)
    monkeypatch.setattr(beaver, "PURGE_BATCH", 50)
    path = tmp_path / "idle.db"
    with BeaverDB(path) as db:
        d = db.dict("cache")
        with db.transaction():
            for i in range(500):
                d.set(f"k{i}", i, ttl_seconds=1)
        d["keep"] = 1
        clock.advance(2)
        _rt_until(lambda: _stored_rows(path) == 1, timeout=MP_DEADLINE)   # no write needed
    with BeaverDB(path) as db:          # rows left by an earlier run are purged too
        db.dict("cache").set("short", 1, ttl_seconds=1)
    clock.advance(2)
    with BeaverDB(path) as db:
        _rt_until(lambda: _stored_rows(path) == 1, timeout=MP_DEADLINE)
        assert dict(db.dict("cache")) == {"keep": 1}


def test_dict_dump_and_load_round_trip(db, clock, tmp_path):
    d = db.dict("src")
    d["a"] = {"nested": [1, 2]}
    d["b"] = "text"
    d.set("c", 3, ttl_seconds=50)
    d.set("expired", 4, ttl_seconds=1)
    clock.advance(2)
    data = d.dump()
    assert data["metadata"]["type"] == "dict" and data["metadata"]["name"] == "src"
    assert data["metadata"]["count"] == 3
    assert [i["key"] for i in data["items"]] == ["a", "b", "c"]
    json.dumps(data)                                   # JSON-ready

    copy = db.dict("copy")
    copy.load(data)
    assert dict(copy) == {"a": {"nested": [1, 2]}, "b": "text", "c": 3}
    assert copy.ttl("c") == pytest.approx(48) and copy.ttl("a") is None   # expiry kept

    target = tmp_path / "dump.json"
    with open(target, "w") as fp:
        assert d.dump(fp) is None
    from_file = db.dict("from_file")
    with open(target) as fp:
        from_file.load(fp)
    from_text = db.dict("from_text")
    from_text.load(target.read_text())
    assert dict(from_file) == dict(from_text) == dict(copy)
    clock.advance(100)
    assert "c" not in copy and "c" not in from_file

    with pytest.raises(ValueError):
        db.list("l").load(d.dump())                    # a dict dump is not a list
    with pytest.raises(ValueError):
        copy.load({"metadata": {"type": "dict"}})      # no items
    with pytest.raises(ValueError):
        copy.load("[1, 2]")


def test_dict_model_dump_and_load(db):
    people = db.dict("people", model=Person)
    people["ada"] = Person(name="Ada", address=Address(city="London"))
    data = people.dump()
    assert data["items"][0]["value"]["address"] == {"city": "London", "zip": ""}
    again = db.dict("again", model=Person)
    again.load(data)
    assert again["ada"] == people["ada"]


def _mp_popitem(path, out_path, barrier):
    db = BeaverDB(path)
    d, got, spurious = db.dict("d"), [], 0
    barrier.wait(MP_DEADLINE)
    while True:
        try:
            got.append(d.popitem())
        except KeyError:
            if len(d) == 0:             # nothing is ever added: a KeyError before empty is wrong
                break
            spurious += 1
    Path(out_path).write_text(json.dumps({"got": got, "spurious": spurious}))
    db.close()


def test_dict_popitem_from_four_processes_is_atomic(tmp_path):
    path, count = str(tmp_path / "mp.db"), 100
    with BeaverDB(path) as db:
        db.dict("d").update({f"k{i:03}": i for i in range(count)})
    barrier = SPAWN.Barrier(4)
    outs = [str(tmp_path / f"out{w}.json") for w in range(4)]
    workers = [SPAWN.Process(target=_mp_popitem, args=(path, out, barrier)) for out in outs]
    for p in workers:
        p.start()
    join_all(workers, time.monotonic() + MP_DEADLINE)
    results = [json.loads(Path(out).read_text()) for out in outs]
    popped = sorted(tuple(pair) for r in results for pair in r["got"])
    assert popped == [(f"k{i:03}", i) for i in range(count)]
    assert sum(r["spurious"] for r in results) == 0


class DictMachine(RuleBasedStateMachine):
    """A DictManager against a plain dict with expiry times, on a fake clock, reopening."""

    keys = st.text(max_size=3)

    def __init__(self):
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="beaver-dict-")
        self.path = os.path.join(self.folder, "p.db")
        self.clock = FakeClock(1_000_000.0)
        self.real_now, beaver._now = beaver._now, self.clock
        self.db = BeaverDB(self.path)
        self.d = self.db.dict("p")
        self.oracle = {}                # key -> (value, expires_at or None)

    def teardown(self):
        beaver._now = self.real_now
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def live(self):
        now = self.clock.now
        return {k: v for k, (v, exp) in self.oracle.items() if exp is None or exp > now}

    @rule(key=keys, value=json_values)
    def set(self, key, value):
        self.d[key] = value
        self.oracle[key] = (value, None)

    @rule(key=keys, value=json_scalars, ttl=st.sampled_from([1, 2.5, 10]))
    def set_with_ttl(self, key, value, ttl):
        self.d.set(key, value, ttl_seconds=ttl)
        self.oracle[key] = (value, self.clock.now + ttl)

    @rule(seconds=st.sampled_from([0.5, 1, 2.5, 4]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule(key=keys)
    def delete(self, key):
        if key in self.live():
            del self.d[key]
            del self.oracle[key]
        else:
            with pytest.raises(KeyError):
                del self.d[key]

    @rule(key=keys)
    def pop(self, key):
        expected = self.live().get(key, "absent")
        self.oracle.pop(key, None)
        assert self.d.pop(key, "absent") == expected

    @rule(key=keys, value=json_scalars)
    def setdefault(self, key, value):
        live = self.live()
        if key not in live:
            self.oracle[key] = (value, None)
        assert self.d.setdefault(key, value) == live.get(key, value)

    @rule(items=st.dictionaries(keys, json_scalars, max_size=4))
    def update(self, items):
        self.d.update(items)
        self.oracle.update({k: (v, None) for k, v in items.items()})

    @rule()
    def popitem(self):
        live = self.live()
        if not live:
            with pytest.raises(KeyError):
                self.d.popitem()
            return
        key = min(live)
        del self.oracle[key]
        assert self.d.popitem() == (key, live[key])

    @rule()
    def clear(self):
        self.d.clear()
        self.oracle.clear()

    @rule()
    def reopen(self):
        self.db.close()
        self.db = BeaverDB(self.path)
        self.d = self.db.dict("p")

    @invariant()
    def same(self):
        live = self.live()
        assert len(self.d) == len(live)
        assert self.d.items() == sorted(live.items(), key=lambda kv: kv[0])
        assert [item["key"] for item in self.d.dump()["items"]] == sorted(live)
        for key in list(live)[:3]:
            assert key in self.d and self.d[key] == live[key]
            expected_ttl = self.oracle[key][1]
            ttl = self.d.ttl(key)
            assert (ttl is None) if expected_ttl is None else ttl == pytest.approx(
                expected_ttl - self.clock.now)


TestDictProperties = DictMachine.TestCase
TestDictProperties.settings = PROPERTY_SETTINGS


# ---- list ----

@pytest.fixture
def ten(db):
    lst = db.list("ten")
    lst.extend(range(10))
    return lst


def test_list_push_prepend_and_indexing(db):
    lst = db.list("tasks")
    assert len(lst) == 0 and list(lst) == []
    assert lst.push("b") is None
    lst.append("c")
    lst.prepend("a")
    lst.prepend("z")
    assert list(lst) == ["z", "a", "b", "c"] and len(lst) == 4
    assert [lst[i] for i in range(4)] == ["z", "a", "b", "c"]
    assert [lst[i] for i in range(-1, -5, -1)] == ["c", "b", "a", "z"]
    for bad in (4, 100, -5, -100):
        with pytest.raises(IndexError):
            lst[bad]
    lst[0] = "first"
    lst[-1] = "last"
    assert list(lst) == ["first", "a", "b", "last"]


def test_list_slices_match_python(ten):
    oracle = list(range(10))
    bounds = [None, -15, -10, -3, -1, 0, 1, 4, 9, 10, 15]
    for step in [None, 1, 2, 3, -1, -2, -4]:
        for start in bounds:
            for stop in bounds:
                s = slice(start, stop, step)
                assert ten[s] == oracle[s], s
    with pytest.raises(ValueError):
        ten[::0]


@pytest.mark.parametrize("s, values", [
    (slice(2, 5), ["a"]), (slice(2, 5), []), (slice(2, 2), ["x", "y"]),
    (slice(None), ["only"]), (slice(None), []), (slice(8, None), ["a", "b", "c", "d"]),
    (slice(-3, None), ["e"]), (slice(20, 30), ["end"]), (slice(-20, 1), ["front"]),
    (slice(5, 2), ["between"]), (slice(None, None, 2), list("abcde")),
    (slice(None, None, -1), list("abcdefghij")), (slice(8, 1, -3), list("xyz")),
    (slice(1, 2, 5), ["single"]), (slice(0, 10, 1), range(3)),
])
def test_list_slice_assignment_matches_python(ten, s, values):
    oracle = list(range(10))
    oracle[s] = list(values)
    ten[s] = values
    assert list(ten) == oracle
    assert [ten[i] for i in range(len(oracle))] == oracle   # positions stay dense


def test_list_extended_slice_size_mismatch_changes_nothing(ten):
    with pytest.raises(ValueError):
        ten[::2] = [1, 2]
    with pytest.raises(TypeError):
        ten[1:3] = [object()]
    with pytest.raises(TypeError):
        ten[1:3] = 5                      # not iterable
    assert list(ten) == list(range(10))


@pytest.mark.parametrize("s", [
    slice(2, 5), slice(None), slice(None, None, 2), slice(1, None, 3), slice(None, None, -1),
    slice(8, 1, -2), slice(-3, None), slice(5, 2), slice(20, 30), slice(-20, 2), slice(0, 1),
])
def test_list_slice_deletion_matches_python(ten, s):
    oracle = list(range(10))
    del oracle[s]
    del ten[s]
    assert list(ten) == oracle and len(ten) == len(oracle)
    assert [ten[i] for i in range(-len(oracle), len(oracle))] == oracle + oracle


@pytest.mark.parametrize("index", list(range(-8, 9)) + [-100, 100])
def test_list_insert_follows_python(ten, index):
    oracle = list(range(10))[:6]
    del ten[6:]
    oracle.insert(index, "new")
    ten.insert(index, "new")
    assert list(ten) == oracle
    assert [ten[i] for i in range(-len(oracle), len(oracle))] == oracle + oracle


def test_list_insert_into_empty_and_many_at_one_spot(db):
    lst, oracle = db.list("l"), []
    lst.insert(5, "a")
    oracle.insert(5, "a")
    lst.insert(-5, "b")
    oracle.insert(-5, "b")
    for i in range(120):            # ordering keys must never collapse
        lst.insert(1, i)
        oracle.insert(1, i)
        lst.insert(len(oracle) // 2, -i)
        oracle.insert(len(oracle) // 2, -i)
    assert list(lst) == oracle
    assert lst[37] == oracle[37] and lst[-38] == oracle[-38]


def test_list_setitem_delitem(ten):
    oracle = list(range(10))
    for index, value in [(0, "a"), (-1, "b"), (5, {"x": 1}), (-10, None)]:
        ten[index] = value
        oracle[index] = value
    assert list(ten) == oracle
    for index in (0, -1, 3, -3, 2):
        del ten[index]
        del oracle[index]
        assert list(ten) == oracle
    for bad in (len(oracle), -len(oracle) - 1, 99):
        with pytest.raises(IndexError):
            ten[bad] = 1
        with pytest.raises(IndexError):
            del ten[bad]
    assert list(ten) == oracle


def test_list_pop_and_deque(ten):
    assert ten.pop() == 9 and ten.deque() == 0 and ten.popleft() == 1
    assert ten.pop(0) == 2 and ten.pop(-1) == 8 and ten.pop(2) == 5
    assert list(ten) == [3, 4, 6, 7]
    for bad in (4, -5, 100):
        with pytest.raises(IndexError):
            ten.pop(bad)
    with pytest.raises(TypeError):
        ten.pop("0")
    assert list(ten) == [3, 4, 6, 7]
    ten.clear()
    assert ten.pop() is None and ten.deque() is None and len(ten) == 0
    with pytest.raises(IndexError):
        ten.pop(0)
    with pytest.raises(IndexError):
        ten.pop(-1)


def test_list_extend_reverse_iteration(db):
    lst = db.list("l")
    lst.extend([1, 2])
    lst.extend(x for x in [3, 4])
    lst.extend([])
    lst += [5]
    assert list(lst) == [1, 2, 3, 4, 5]
    lst.extend(lst)                     # extending by itself reads a snapshot
    assert list(lst) == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    del lst[5:]
    lst.prepend(0)
    lst.reverse()
    assert list(lst) == [5, 4, 3, 2, 1, 0] and list(reversed(lst)) == [0, 1, 2, 3, 4, 5]
    assert lst[0] == 5 and lst[-1] == 0
    assert 3 in lst and 9 not in lst and lst.index(3) == 2 and lst.count(3) == 1
    lst.remove(3)
    assert list(lst) == [5, 4, 2, 1, 0]
    with pytest.raises(ValueError):
        lst.remove(3)
    db.list("empty").reverse()
    assert list(db.list("empty")) == [] and list(reversed(db.list("empty"))) == []


def test_list_iteration_pages(db, monkeypatch):
    lst = db.list("l")
    lst.extend(range(25))
    for i in range(5):
        lst.prepend(-1 - i)
    monkeypatch.setattr(beaver, "PAGE_SIZE", 4)
    assert list(lst) == list(range(-5, 25))
    assert list(reversed(lst)) == list(range(24, -6, -1))


@pytest.mark.parametrize("bad", ["0", 1.0, None, [0], {"a": 1}])
def test_list_bad_indices(ten, bad):
    with pytest.raises(TypeError):
        ten[bad]
    with pytest.raises(TypeError):
        ten[bad] = 1
    with pytest.raises(TypeError):
        del ten[bad]
    with pytest.raises(TypeError):
        ten.insert(bad, 1)
    assert list(ten) == list(range(10))


@pytest.mark.parametrize("index", [2**63, -2**63, 10**30, -10**30, 2**60, 10, -11])
def test_list_out_of_range_indices_raise_index_error(ten, index):
    with pytest.raises(IndexError):
        ten[index]
    with pytest.raises(IndexError):
        ten[index] = "x"
    with pytest.raises(IndexError):
        del ten[index]
    with pytest.raises(IndexError):
        ten.pop(index)
    assert ten[index:] == list(range(10))[index:]
    assert list(ten) == list(range(10))


def test_list_dump_and_load(ten, db):
    data = ten.dump()
    assert data["metadata"]["type"] == "list" and data["items"] == list(range(10))
    copy = db.list("copy")
    copy.load(data)
    copy.load(json.dumps(data))         # load appends
    assert list(copy) == list(range(10)) * 2
    buffer = io.StringIO()
    ten.dump(buffer)
    buffer.seek(0)
    assert json.load(buffer)["items"] == list(range(10))
    with pytest.raises(ValueError):
        db.dict("d").load(data)


def test_list_models(db):
    lst = db.list("people", model=Person)
    lst.extend([Person(name="a"), {"name": "b"}])
    lst.insert(1, Person(name="c", address=Address(city="x")))
    assert [p.name for p in lst] == ["a", "c", "b"]
    assert lst[1].address.city == "x" and lst[0:2][1] == lst[1]
    assert lst.pop().name == "b"


def _mp_remove(path, worker, out_path, barrier):
    db = BeaverDB(path)
    lst, errors = db.list("l"), []
    barrier.wait(MP_DEADLINE)
    for value in range(worker, 120, 4):
        try:
            lst.remove(value)
        except (ValueError, IndexError) as e:
            errors.append(repr(e))
    Path(out_path).write_text(json.dumps(errors))
    db.close()


def test_list_remove_from_four_processes_removes_the_right_items(tmp_path):
    path = str(tmp_path / "mp.db")
    with BeaverDB(path) as db:
        db.list("l").extend(range(120))
        db.list("l").push("keep")
    barrier = SPAWN.Barrier(4)
    outs = [str(tmp_path / f"out{w}.json") for w in range(4)]
    workers = [SPAWN.Process(target=_mp_remove, args=(path, w, outs[w], barrier))
               for w in range(4)]
    for p in workers:
        p.start()
    join_all(workers, time.monotonic() + MP_DEADLINE)
    assert [json.loads(Path(out).read_text()) for out in outs] == [[]] * 4
    with BeaverDB(path) as db:
        assert list(db.list("l")) == ["keep"]


class ListMachine(RuleBasedStateMachine):
    """A ListManager against a Python list, reopening the database now and then."""

    indices = st.integers(-12, 12)
    slices = st.builds(slice, st.none() | indices, st.none() | indices,
                       st.none() | st.sampled_from([1, 2, 3, -1, -2]))

    def __init__(self):
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="beaver-list-")
        self.path = os.path.join(self.folder, "p.db")
        self.db = BeaverDB(self.path)
        self.lst = self.db.list("p")
        self.oracle = []

    def teardown(self):
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def both(self, action):
        """Run ``action`` on the oracle and the manager: same result or same error type."""
        try:
            expected = action(self.oracle)
        except (IndexError, ValueError) as e:
            with pytest.raises(type(e)):
                action(self.lst)
            return
        assert action(self.lst) == expected

    @rule(value=json_values)
    def push(self, value):
        self.lst.push(value)
        self.oracle.append(value)

    @rule(value=json_scalars)
    def prepend(self, value):
        self.lst.prepend(value)
        self.oracle.insert(0, value)

    @rule(index=indices, value=json_scalars)
    def insert(self, index, value):
        self.both(lambda seq: seq.insert(index, value))

    @rule(index=st.none() | indices)
    def pop(self, index):
        if index is None:
            expected = self.oracle.pop() if self.oracle else None
            assert self.lst.pop() == expected
        else:
            self.both(lambda seq: seq.pop(index))

    @rule()
    def deque(self):
        expected = self.oracle.pop(0) if self.oracle else None
        assert self.lst.deque() == expected

    @rule(index=indices, value=json_scalars)
    def setitem(self, index, value):
        self.both(lambda seq: seq.__setitem__(index, value))

    @rule(index=indices | slices)
    def delitem(self, index):
        self.both(lambda seq: seq.__delitem__(index))

    @rule(s=slices, values=st.lists(json_scalars, max_size=4))
    def set_slice(self, s, values):
        self.both(lambda seq: seq.__setitem__(s, values))

    @rule(index=indices | slices)
    def getitem(self, index):
        self.both(lambda seq: seq[index])

    @rule(values=st.lists(json_scalars, max_size=4))
    def extend(self, values):
        self.lst.extend(values)
        self.oracle.extend(values)

    @rule()
    def reverse(self):
        self.lst.reverse()
        self.oracle.reverse()

    @rule()
    def reopen(self):
        self.db.close()
        self.db = BeaverDB(self.path)
        self.lst = self.db.list("p")

    @invariant()
    def same(self):
        assert len(self.lst) == len(self.oracle)
        assert list(self.lst) == self.oracle


TestListProperties = ListMachine.TestCase
TestListProperties.settings = PROPERTY_SETTINGS


def _mp_push(path, worker, count, barrier):
    db = BeaverDB(path)
    lst = db.list("shared")
    barrier.wait(MP_DEADLINE)
    for i in range(count):
        lst.push([worker, i])
    db.close()


def test_list_four_processes_pushing_lose_nothing(tmp_path):
    path, count = str(tmp_path / "mp.db"), 100
    BeaverDB(path).close()
    barrier = SPAWN.Barrier(4)
    workers = [SPAWN.Process(target=_mp_push, args=(path, w, count, barrier)) for w in range(4)]
    for p in workers:
        p.start()
    join_all(workers, time.monotonic() + MP_DEADLINE)
    with BeaverDB(path) as db:
        items = list(db.list("shared"))
    assert sorted(map(tuple, items)) == [(w, i) for w in range(4) for i in range(count)]
    for w in range(4):                  # each process's pushes keep their order
        assert [i for ww, i in items if ww == w] == list(range(count))


# ---- queue ----

def test_queue_priority_then_fifo(db):
    q = db.queue("tasks")
    q.put({"action": "summarize"}, priority=10)
    q.put({"action": "respond"}, priority=1)
    q.put({"action": "backup"}, priority=20)
    q.put({"action": "alert"}, priority=1)
    q.put("urgent", priority=-5)
    q.put("half", priority=1.5)
    q.put("default")                    # priority 0
    order = [q.get().data for _ in range(7)]
    assert order == ["urgent", "default", {"action": "respond"}, {"action": "alert"}, "half",
                     {"action": "summarize"}, {"action": "backup"}]
    assert len(q) == 0


def test_queue_fifo_within_priority_is_by_sequence(db, clock):
    q = db.queue("q")
    for i in range(50):                 # identical timestamps: order still holds
        q.put(i, priority=i % 3)
    got = [q.get(block=False).data for _ in range(50)]
    assert got == sorted(range(50), key=lambda i: (i % 3, i))


def test_queue_item_fields(db):
    q = db.queue("q")
    before = time.time()
    q.put({"x": 1}, priority=3)
    item = q.get(block=False)
    assert isinstance(item, beaver.QueueItem) and isinstance(item, tuple)
    assert item.priority == 3 and item.data == {"x": 1}
    assert before - 1 <= item.timestamp <= time.time() + 1
    priority, timestamp, data = item
    assert (priority, data) == (3, {"x": 1})


def test_queue_peek_len_and_iteration_do_not_consume(db):
    q = db.queue("q")
    assert q.peek() is None and len(q) == 0 and list(q) == [] and bool(q)
    q.put("b", priority=2)
    q.put("a", priority=1)
    q.put("c", priority=2)
    assert q.peek().data == "a" and q.peek().data == "a"
    assert [i.data for i in q] == ["a", "b", "c"]
    assert [i.data for i in q] == ["a", "b", "c"] and len(q) == 3
    assert q.get().data == "a" and len(q) == 2 and q.peek().data == "b"


def test_queue_empty_and_timeout(db):
    q = db.queue("q")
    with pytest.raises(beaver.QueueEmpty):
        q.get(block=False)
    with pytest.raises(IndexError):     # the spec's `except IndexError` works
        q.get(block=False)
    with pytest.raises(TimeoutError):
        q.get(timeout=0.05)
    with pytest.raises(TimeoutError):
        q.get(timeout=0)
    with pytest.raises(beaver.BeaverError):
        q.get(timeout=0.01)


@pytest.mark.parametrize("timeout", [-1, "1", True, [1]])
def test_queue_bad_timeout(db, timeout):
    q = db.queue("q")
    q.put(1)
    with pytest.raises((TypeError, ValueError)):
        q.get(timeout=timeout)
    assert len(q) == 1


@pytest.mark.parametrize("priority", ["1", None, True, [1], float("nan"), 2 ** 70, -(2 ** 64)])
def test_queue_bad_priority_writes_nothing(db, priority):
    q = db.queue("q")
    with pytest.raises((TypeError, ValueError)):
        q.put("x", priority=priority)
    assert len(q) == 0


def test_queue_blocking_get_inside_a_transaction_does_not_wait_forever(db):
    q = db.queue("q")
    with db.transaction():
        with pytest.raises(beaver.BeaverError, match="inside a transaction"):
            q.get()                       # nobody could put while we hold the write lock
        q.put("x")
        assert q.get().data == "x"        # an item already there is taken as usual
    assert len(q) == 0


def test_queue_blocking_get_wakes_on_put_from_another_thread(db):
    q = db.queue("q")
    got = []
    consumer = threading.Thread(target=lambda: got.append(q.get(timeout=30).data))
    consumer.start()
    q.put("hello")
    consumer.join(30)
    assert not consumer.is_alive() and got == ["hello"]


@pytest.mark.parametrize("timeout", [None, float("inf"), 1e300])
def test_queue_get_with_unbounded_timeouts(db, timeout):
    q = db.queue("q")
    got = []
    consumer = threading.Thread(target=lambda: got.append(q.get(timeout=timeout).data))
    consumer.start()
    q.put("hello")
    consumer.join(MP_DEADLINE)
    assert not consumer.is_alive() and got == ["hello"]


def test_queue_blocking_get_wakes_on_put_from_another_connection(tmp_path):
    path = tmp_path / "q.db"
    with BeaverDB(path) as reader, BeaverDB(path) as writer:
        got = []
        consumer = threading.Thread(target=lambda: got.append(reader.queue("q").get(timeout=30)))
        consumer.start()
        writer.queue("q").put("across")
        consumer.join(30)
        assert not consumer.is_alive() and got[0].data == "across"


def test_queue_namespaces_and_clear(db):
    a, b = db.queue("a"), db.queue("b")
    a.put(1)
    b.put(2)
    a.clear()
    assert len(a) == 0 and b.get(block=False).data == 2


def test_queue_dump_and_load(db):
    q = db.queue("q")
    q.put("low", priority=5)
    q.put({"k": "high"}, priority=1)
    data = q.dump()
    assert data["metadata"]["type"] == "queue" and data["metadata"]["count"] == 2
    assert [i["data"] for i in data["items"]] == [{"k": "high"}, "low"]
    assert len(q) == 2                  # dump does not consume
    copy = db.queue("copy")
    copy.load(data)
    assert [(i.priority, i.data) for i in copy] == [(1, {"k": "high"}), (5, "low")]
    with pytest.raises(ValueError):
        db.list("l").load(data)


class QueueMachine(RuleBasedStateMachine):
    """A QueueManager against a sorted list of (priority, sequence, data)."""

    def __init__(self):
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="beaver-queue-")
        self.path = os.path.join(self.folder, "p.db")
        self.db = BeaverDB(self.path)
        self.q = self.db.queue("p")
        self.oracle = []
        self.seq = 0

    def teardown(self):
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @rule(value=json_values, priority=st.integers(-2, 2) | st.sampled_from([0.5, -1.5]))
    def put(self, value, priority):
        self.q.put(value, priority=priority)
        self.oracle.append((priority, self.seq, value))
        self.oracle.sort(key=lambda t: t[:2])
        self.seq += 1

    @rule()
    def get(self):
        if not self.oracle:
            with pytest.raises(beaver.QueueEmpty):
                self.q.get(block=False)
            return
        priority, _, value = self.oracle.pop(0)
        item = self.q.get(block=False)
        assert (item.priority, item.data) == (priority, value)

    @rule()
    def peek(self):
        item = self.q.peek()
        if self.oracle:
            assert (item.priority, item.data) == (self.oracle[0][0], self.oracle[0][2])
        else:
            assert item is None

    @rule()
    def reopen(self):
        self.db.close()
        self.db = BeaverDB(self.path)
        self.q = self.db.queue("p")

    @invariant()
    def same(self):
        assert len(self.q) == len(self.oracle)
        assert [(i.priority, i.data) for i in self.q] == [(p, v) for p, _, v in self.oracle]


TestQueueProperties = QueueMachine.TestCase
TestQueueProperties.settings = PROPERTY_SETTINGS


def _mp_consume(path, worker, barrier, out_path):
    db = BeaverDB(path)
    q = db.queue("jobs")
    got = []
    barrier.wait(MP_DEADLINE)
    while True:
        item = q.get(timeout=MP_DEADLINE)
        if item.data == "stop":
            break
        got.append(item.data)
    with open(out_path, "w") as fp:
        json.dump(got, fp)
    db.close()


def test_queue_four_consumers_get_each_item_exactly_once(tmp_path):
    four_consumers_get_each_item_exactly_once(str(tmp_path / "mp.db"), tmp_path)


def test_pg_queue_four_processes_over_tcp_get_each_item_exactly_once(pg_url, tmp_path):
    four_consumers_get_each_item_exactly_once(pg_url, tmp_path)     # 127.0.0.1: TCP


def four_consumers_get_each_item_exactly_once(path, tmp_path):
    count = 240
    BeaverDB(path).close()
    barrier = SPAWN.Barrier(5)
    outs = [str(tmp_path / f"out{w}.json") for w in range(4)]
    workers = [SPAWN.Process(target=_mp_consume, args=(path, w, barrier, outs[w]))
               for w in range(4)]
    for p in workers:
        p.start()
    deadline = time.monotonic() + MP_DEADLINE
    with BeaverDB(path) as db:
        q = db.queue("jobs")
        for i in range(count // 2):     # half before the consumers start, half while they run
            q.put(i)
        barrier.wait(MP_DEADLINE)
        for i in range(count // 2, count):
            q.put(i)
        for _ in workers:               # after every job: a lower priority comes last
            q.put("stop", priority=1)
        join_all(workers, deadline)
        assert len(q) == 0
    results = [json.loads(Path(out).read_text()) for out in outs]
    everything = [i for got in results for i in got]
    assert sorted(everything) == list(range(count))       # no loss, no duplicate
    for got in results:                                    # each consumer saw FIFO order
        assert got == sorted(got)


# ---- blob ----

def test_blob_put_get_delete(db):
    files = db.blobs("uploads")
    assert db.blob("uploads") is files           # both spellings, one store
    files.put("a.txt", b"hello", metadata={"mimetype": "text/plain"})
    blob = files.get("a.txt")
    assert isinstance(blob, beaver.Blob)
    assert blob == ("a.txt", b"hello", {"mimetype": "text/plain"})
    assert (blob.key, blob.data, blob.metadata) == ("a.txt", b"hello", {"mimetype": "text/plain"})
    assert isinstance(blob.data, bytes)
    assert files.get("missing") is None
    assert "a.txt" in files and "missing" not in files and 5 not in files
    files.put("a.txt", b"replaced")              # overwrite, metadata dropped
    assert files.get("a.txt") == ("a.txt", b"replaced", None)
    files.delete("a.txt")
    assert "a.txt" not in files and files.get("a.txt") is None
    with pytest.raises(KeyError):
        files.delete("a.txt")


def test_blob_metadata_round_trips(db):
    files = db.blobs("b")
    for key, meta in [("empty", {}), ("none", None), ("list", [1, "x"]), ("str", "s"),
                      ("zero", 0), ("false", False), ("nested", {"a": {"b": []}})]:
        files.put(key, b"x", metadata=meta)
        got = files.get(key).metadata
        assert got == meta and type(got) is type(meta), key


def test_blob_bytes_like_data(db):
    files = db.blobs("b")
    payload = bytes(range(256)) * 4
    files.put("bytes", payload)
    files.put("bytearray", bytearray(payload))
    files.put("memoryview", memoryview(payload)[10:20])
    files.put("empty", b"")
    assert files.get("bytes").data == payload
    assert files.get("bytearray").data == payload and type(files.get("bytearray").data) is bytes
    assert files.get("memoryview").data == payload[10:20]
    assert files.get("empty").data == b""


@pytest.mark.parametrize("bad", ["text", 1, None, [1, 2], {"a": 1}, 1.5])
def test_blob_non_bytes_data_raises_type_error(db, bad):
    files = db.blobs("b")
    files.put("k", b"old")
    with pytest.raises(TypeError):
        files.put("k", bad)
    with pytest.raises(TypeError):
        files.put("new", bad)
    assert files.get("k").data == b"old" and len(files) == 1


@pytest.mark.parametrize("key", [1, None, b"k", ("t",)])
def test_blob_non_str_keys(db, key):
    files = db.blobs("b")
    with pytest.raises(TypeError):
        files.put(key, b"x")
    with pytest.raises(TypeError):
        files.get(key)
    with pytest.raises(TypeError):
        files.delete(key)
    assert key not in files and len(files) == 0


def test_blob_mapping_protocol_len_and_iteration(db, monkeypatch):
    files = db.blobs("b")
    keys = ["b", "a", "", "emails/user123/attachment_01.txt", "ü", "c"]
    for key in keys:
        files[key] = key.encode()
    assert len(files) == len(keys) and bool(db.blobs("empty"))
    assert list(files) == sorted(keys) and files.keys() == sorted(keys)
    monkeypatch.setattr(beaver, "PAGE_SIZE", 2)
    assert list(files) == sorted(keys)
    assert files["a"].data == b"a"
    with pytest.raises(KeyError):
        files["zzz"]
    del files["a"]
    with pytest.raises(KeyError):
        del files["a"]
    assert "a" not in files and len(files) == len(keys) - 1
    files.clear()
    assert len(files) == 0 and list(files) == []


def test_blob_dump_and_load(db):
    files = db.blobs("b")
    files.put("bin", b"\x00\xff\x10binary", metadata={})
    files.put("plain", b"text")
    data = files.dump()
    assert data["metadata"]["type"] == "blob" and data["metadata"]["count"] == 2
    json.dumps(data)
    copy = db.blobs("copy")
    copy.load(json.loads(json.dumps(data)))
    assert copy.get("bin") == ("bin", b"\x00\xff\x10binary", {})
    assert copy.get("plain") == ("plain", b"text", None)


# ---- lock / acquire ----

@pytest.mark.parametrize("kind", ["dict", "list", "queue", "blobs"])
def test_manager_acquire_is_truthy_and_yields_the_manager(db, kind):
    manager = getattr(db, kind)("m")
    held = manager.acquire(timeout=5)
    assert held and bool(held) is True
    with held as inside:
        assert inside is manager
    with manager.acquire(timeout=5) as inside:      # the lock was released: free again
        assert inside is manager
    assert manager.acquire(timeout=5)
    manager.release()
    with manager as inside:
        assert inside is manager
    with getattr(db, kind)("m") as inside:
        assert inside is manager


def test_manager_acquire_excludes_other_holders(tmp_path):
    path = tmp_path / "lock.db"
    with BeaverDB(path) as one, BeaverDB(path) as two:
        with one.dict("c") as d:
            d["x"] = 1
            with pytest.raises(TimeoutError):
                two.dict("c").acquire(block=False)
            with pytest.raises(beaver.LockTimeout):
                two.dict("c").acquire(timeout=0.05)
            assert two.dict("other").acquire(block=False)   # other structures are free
            two.dict("other").release()
            assert two.list("c").acquire(block=False)       # so are other kinds
            two.list("c").release()
        with two.dict("c").acquire(block=False) as d2:
            assert d2["x"] == 1


def test_manager_acquire_excludes_threads(db):
    d = db.dict("counter")
    d["n"] = 0

    def bump():
        for _ in range(25):
            with db.dict("counter") as c:
                c["n"] = c["n"] + 1
    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(MP_DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert d["n"] == 100


def test_manager_release_without_acquire(db):
    with pytest.raises(beaver.BeaverError):
        db.dict("d").release()


def test_manager_acquire_releases_on_exception(db):
    d = db.dict("d")
    with pytest.raises(RuntimeError):
        with d:
            raise RuntimeError("boom")
    with d.acquire(block=False):
        pass


def _mp_increment(path, count, barrier):
    db = BeaverDB(path)
    barrier.wait(MP_DEADLINE)
    for _ in range(count):
        with db.dict("c") as d:
            d["n"] = d.get("n", 0) + 1
    db.close()


def test_dict_four_processes_incrementing_under_the_manager_lock(tmp_path):
    path, count = str(tmp_path / "mp.db"), 25
    BeaverDB(path).close()
    barrier = SPAWN.Barrier(4)
    workers = [SPAWN.Process(target=_mp_increment, args=(path, count, barrier))
               for _ in range(4)]
    for p in workers:
        p.start()
    join_all(workers, time.monotonic() + MP_DEADLINE)
    with BeaverDB(path) as db:
        assert db.dict("c")["n"] == 4 * count


def test_db_lock_excludes_other_connections(tmp_path):
    path = tmp_path / "lock.db"
    with BeaverDB(path) as one, BeaverDB(path) as two:
        with one.lock("job", timeout=5) as held:
            assert held is not None
            with pytest.raises(TimeoutError):
                with two.lock("job", timeout=0.05):
                    pass
        with two.lock("job", timeout=5):
            pass


def _seed_scraper():
    """The spec's lock example, verbatim apart from the returned outcome."""
    db = BeaverDB("scraper_state.db")
    scrapers_state = db.dict("scraper_state")
    outcome = "skipped"
    last_refresh = scrapers_state.get("last_sitemap_refresh", 0)
    if time.time() - last_refresh > 3600:
        try:
            with db.lock("refresh_sitemap", timeout=1):
                print(f"PID {os.getpid()} is refreshing the sitemap...")
                scrapers_state["sitemap"] = ["/page1", "/page2"]
                scrapers_state["last_sitemap_refresh"] = time.time()
                outcome = "refreshed"
        except TimeoutError:
            print(f"PID {os.getpid()} letting other process handle refresh.")
            outcome = "timed out"
    sitemap = scrapers_state.get("sitemap")
    print(f"PID {os.getpid()} proceeding with sitemap: {sitemap}")
    db.close()
    return outcome


def test_seed_lock_scraper(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with BeaverDB("scraper_state.db") as other:
        with other.lock("refresh_sitemap", timeout=5):
            assert _seed_scraper() == "timed out"     # somebody else is refreshing
    assert _seed_scraper() == "refreshed"
    assert _seed_scraper() == "skipped"               # refreshed less than an hour ago


# ---- BeaverDB ----

def test_managers_are_cached_per_kind_and_name(db):
    assert db.dict("a") is db.dict("a")
    assert db.list("a") is db.list("a") and db.queue("a") is db.queue("a")
    assert db.blobs("a") is db.blob("a")
    assert len({id(db.dict("a")), id(db.list("a")), id(db.queue("a")), id(db.blobs("a")),
                id(db.dict("b"))}) == 5
    assert db.dict("a").name == "a" and "a" in repr(db.dict("a"))


def test_model_conflict_is_an_error(db):
    people = db.dict("people", model=Person)
    assert db.dict("people", model=Person) is people
    assert db.dict("people") is people                  # no model given: the open one
    with pytest.raises(ValueError):
        db.dict("people", model=Address)
    plain = db.list("plain")
    with pytest.raises(ValueError):
        db.list("plain", model=Person)
    assert db.list("plain") is plain and plain.model is None


def test_reopening_with_other_settings_is_an_error_and_omitting_them_reuses(db):
    import datetime
    chat = db.channel("chat", retention=60, max_messages=10)
    assert db.channel("chat") is chat and chat.retention == 60 and chat.max_messages == 10
    assert db.channel("chat", retention=datetime.timedelta(seconds=60)) is chat
    with pytest.raises(ValueError, match=r"retention.*60.*120"):
        db.channel("chat", retention=120)
    with pytest.raises(ValueError, match="max_messages"):
        db.channel("chat", max_messages=None)
    assert chat.retention == 60 and chat.max_messages == 10
    logs = db.log("logs", retention=5)
    assert db.log("logs") is logs and logs.retention == 5
    with pytest.raises(ValueError, match="retention"):
        db.log("logs", retention=None)
    with pytest.raises(ValueError, match="retention"):
        db.log("logs", retention=6)
    plain = db.log("plain")
    assert plain.retention is None and db.log("plain", retention=None) is plain
    assert db.channel("fresh").retention == beaver.CHANNEL_RETENTION
    docs = db.collection("docs", metric="cosine")
    assert db.collection("docs") is docs
    with pytest.raises(ValueError, match="metric"):
        db.collection("docs", metric="l2")
    with pytest.raises(ValueError, match="index"):
        db.collection("docs", index="flat")


@pytest.mark.parametrize("name", ["", None, 5, b"x"])
def test_bad_structure_names(db, name):
    for factory in (db.dict, db.list, db.queue, db.blobs):
        with pytest.raises(TypeError):
            factory(name)


@pytest.mark.parametrize("name", [
    "it's", 'say "hi"', "x'; DROP TABLE beaver_dicts; --", "a\" OR 1=1 --", "%", "_", "*",
    "beaver_dicts", "name WITH spaces", "../../etc/passwd", "ünï🦫", "\x00",
])
def test_names_are_just_names(tmp_path, name):
    path = tmp_path / "names.db"
    with BeaverDB(path) as db:
        db.dict("plain")["k"] = "plain"
        d, lst, q, b = db.dict(name), db.list(name), db.queue(name), db.blobs(name)
        d["k"] = name
        lst.push(name)
        q.put(name)
        b.put("k", b"x", metadata=name)
        with d:
            pass
        assert d["k"] == name and list(lst) == [name] and len(q) == 1
        assert b.get("k").metadata == name
        assert db.dict("plain")["k"] == "plain" and len(db.dict("plain")) == 1
        assert len(db.dict("other")) == 0 and len(db.list("other")) == 0
        d.clear()
        assert db.dict("plain")["k"] == "plain"
    assert raw_rows(path, "PRAGMA integrity_check") == [("ok",)]
    with BeaverDB(path) as db:
        assert list(db.list(name)) == [name] and db.queue(name).get(block=False).data == name


def test_transaction_is_atomic_across_managers(db):
    d, lst, q, b = db.dict("d"), db.list("l"), db.queue("q"), db.blobs("b")
    with db.transaction() as tx:
        assert tx is db
        d["a"] = 1
        lst.push(1)
        q.put(1)
        b.put("k", b"1")
    assert (d["a"], list(lst), len(q), b.get("k").data) == (1, [1], 1, b"1")
    with pytest.raises(ZeroDivisionError):
        with db.transaction():
            d["a"] = 2
            d["new"] = 2
            lst.push(2)
            lst[0] = "changed"
            q.put(2)
            q.get(block=False)
            b.put("k", b"2")
            b.put("k2", b"2")
            1 / 0
    assert dict(d) == {"a": 1} and list(lst) == [1] and len(q) == 1 and list(b) == ["k"]
    assert b.get("k").data == b"1" and q.peek().data == 1


def test_transaction_nested_savepoints(db):
    d = db.dict("d")
    with db.transaction():
        d["outer"] = 1
        with db.transaction():
            d["inner_ok"] = 1
        with pytest.raises(KeyError):
            with db.transaction():
                d["inner_bad"] = 1
                with db.transaction():
                    d["deeper"] = 1
                raise KeyError("roll back this level only")
        d["after"] = 1
    assert sorted(d) == ["after", "inner_ok", "outer"]
    with pytest.raises(RuntimeError):
        with db.transaction():
            d["x"] = 1
            with db.transaction():
                d["y"] = 1
            raise RuntimeError
    assert "x" not in d and "y" not in d


@pytest.mark.parametrize("caught", [False, True])
def test_a_transaction_the_engine_rolled_back_keeps_nothing(db, caught):
    """SQLite rolls back the whole transaction on SQLITE_FULL: every level raises the
    DiskFull that caused it (not "no such savepoint" from rolling back to a savepoint gone
    with it). A caller that catches it and writes on does not write one statement at a time
    outside any transaction: the transaction is doomed, the outermost level raises the error
    again, and nothing of it is kept."""
    d = db.dict("d")
    d["before"] = 1
    _cap_the_file(db._core.conn())
    with pytest.raises(beaver.DiskFull):
        with db.transaction():
            d["a"] = 1
            try:
                with db.transaction():
                    with db.transaction():
                        d["big"] = "x" * 40_000
            except beaver.DiskFull:
                if not caught:
                    raise
            d["after_caught"] = 2               # in a transaction that cannot commit
            with db.transaction():
                d["nested_after"] = 3
    assert dict(d) == {"before": 1} and not db._core.connection_in_transaction()
    db._core.conn().execute("PRAGMA max_page_count = 1073741823")
    with db.transaction():                      # the next transaction is a fresh one
        d["after"] = 1
    assert dict(d) == {"before": 1, "after": 1}


def test_transaction_on_rollback_follows_savepoints(db):
    """Undo callbacks run when their level or an outer one rolls back, newest first, and
    never after a commit; a released savepoint hands its callbacks to the parent."""
    core, undone = db._core, []
    core.on_rollback(lambda: undone.append("outside"))      # nothing to undo: dropped
    with db.transaction():
        core.on_rollback(lambda: undone.append("committed"))
    with pytest.raises(RuntimeError):
        with db.transaction():
            core.on_rollback(lambda: undone.append("outer"))
            with pytest.raises(KeyError):
                with db.transaction():
                    core.on_rollback(lambda: undone.append("inner"))
                    raise KeyError("roll back the savepoint only")
            assert undone == ["inner"]
            with db.transaction():
                core.on_rollback(lambda: undone.append("released"))
            raise RuntimeError("roll back everything")
    assert undone == ["inner", "released", "outer"]


def test_transaction_is_invisible_to_other_threads_until_commit(db):
    d = db.dict("d")
    seen = {}

    def look(label):
        seen[label] = db.dict("d").get("k")
    with db.transaction():
        d["k"] = "v"
        t = threading.Thread(target=look, args=("during",))
        t.start()
        t.join(MP_DEADLINE)
    look("after")
    assert seen == {"during": None, "after": "v"}


BUSY_SLACK = 5.0    # seconds past its timeout a refused write may still take (a slow machine)


@contextlib.contextmanager
def _busy_after(timeout):
    """The block raises DatabaseBusy no sooner than ``timeout`` seconds and well before
    ``timeout + BUSY_SLACK``: a write that waits for ever, or much longer, fails."""
    started = time.monotonic()
    with pytest.raises(beaver.DatabaseBusy) as info:
        yield info
    waited = time.monotonic() - started
    assert timeout <= waited < timeout + BUSY_SLACK, waited


def _hold_a_write(db, entered, release):
    with db.transaction():
        db.dict("d")["held"] = 1
        entered.set()
        release.wait(MP_DEADLINE)


def test_threads_queue_for_the_write_transaction_and_get_in_once_it_commits(tmp_path):
    db = BeaverDB(tmp_path / "gate.db", timeout=0.2)
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_a_write, args=(db, entered, release))
    holder.start()
    try:
        assert entered.wait(MP_DEADLINE)
        with _busy_after(0.2):                      # past the timeout: busy, as from SQLite
            with db.transaction():
                db.dict("d")["mine"] = 1
        assert "mine" not in db.dict("d")
    finally:
        release.set()
        holder.join(MP_DEADLINE)
    writers = [threading.Thread(target=_write_in_a_transaction, args=(db, i)) for i in range(8)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(MP_DEADLINE)
    assert sorted(db.dict("d").keys()) == ["held"] + sorted(f"w{i}" for i in range(8))
    db.close()



def _refused_at_once(core) -> bool:
    """Whether ``transaction(wait=False)`` is refused with ``_WritersBusy`` (a waiting one
    would wait for the holder, here for the test's deadline, then write)."""
    try:
        with core.transaction(wait=False):
            core.execute("SELECT 1")
    except beaver._WritersBusy as e:
        return isinstance(e, beaver.DatabaseBusy)
    return False


def _refused_in_another_thread(core) -> bool:
    refused = []
    thread = threading.Thread(target=lambda: refused.append(_refused_at_once(core)))
    thread.start()
    thread.join(MP_DEADLINE)
    return refused == [True]


def _refused_while_a_thread_writes(core, writer_db) -> bool:
    """Whether ``core`` refuses the ways in that must not wait while a thread holds a write
    transaction of ``writer_db`` (let go after)."""
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_a_write, args=(writer_db, entered, release))
    holder.start()
    try:
        assert entered.wait(MP_DEADLINE)
        return _refused_at_once(core)
    finally:
        release.set()
        holder.join(MP_DEADLINE)


def test_a_transaction_that_must_not_wait_is_refused_while_another_thread_writes(tmp_path):
    db = BeaverDB(tmp_path / "try.db", timeout=MP_DEADLINE)
    core = db._core
    assert _refused_while_a_thread_writes(core, db)
    with core.transaction(wait=False):      # free again: it begins, nested levels too
        db.dict("d")["mine"] = 1
        with core.transaction(wait=False), core.transaction():
            db.dict("d")["nested"] = 1
        assert _refused_in_another_thread(core)
    assert dict(db.dict("d")) == {"held": 1, "mine": 1, "nested": 1}
    with core.transaction():                # and free again after it
        db.dict("d")["after"] = 1
    db.close()

# -- the writers' gate between processes (_WalGate) -------------------------------------------

def _gate_writer(path, worker, count, barrier):
    """``count`` transactions, each a dict set and a list push, once every writer is ready."""
    with BeaverDB(path) as db:
        d, log = db.dict("d"), db.list("log")
        barrier.wait(MP_DEADLINE)
        for i in range(count):
            with db.transaction():
                d[f"{worker}-{i}"] = i
                log.push([worker, i])


def _hold_a_write_in_a_process(path, entered, release):
    with BeaverDB(path) as db:
        _hold_a_write(db, entered, release)


@contextlib.contextmanager
def _a_write_held_in_another_process(path):
    """A spawned process holds a write transaction on ``path`` while the block runs."""
    entered, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_a_write_in_a_process, args=(path, entered, release))
    holder.start()
    try:
        assert entered.wait(MP_DEADLINE)
        yield holder
    finally:
        release.set()
        holder.join(MP_DEADLINE)


def _wal_gate_is_free(path) -> bool:
    """Whether no open file description holds the flock on ``path``'s -wal file."""
    import fcntl
    fd = os.open(path + "-wal", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)            # SQLite holds no POSIX lock on the -wal: nothing else drops


needs_flock = pytest.mark.skipif(beaver.fcntl is None, reason="needs fcntl.flock")


def test_two_processes_writing_transactions_lose_nothing(tmp_path):
    path, count = str(tmp_path / "two.db"), 400
    BeaverDB(path).close()
    barrier = SPAWN.Barrier(2)
    writers = [SPAWN.Process(target=_gate_writer, args=(path, w, count, barrier))
               for w in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(MP_DEADLINE)
    assert [writer.exitcode for writer in writers] == [0, 0]
    with BeaverDB(path) as db:
        assert len(db.dict("d")) == 2 * count
        pushed = list(db.list("log"))
        for worker in range(2):
            assert [i for w, i in pushed if w == worker] == list(range(count))


def test_a_write_of_another_process_makes_a_write_busy_within_the_timeout(tmp_path):
    path = str(tmp_path / "held.db")
    db = BeaverDB(path, timeout=0.3)
    db.dict("d")["before"] = 1
    outcome = []

    def write():
        with _busy_after(0.3) as info, db.transaction():
            db.dict("d")["mine"] = 1
        outcome.append(info.value)
    with _a_write_held_in_another_process(path) as holder:
        thread = threading.Thread(target=write)
        thread.start()
        thread.join(MP_DEADLINE)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError)
    assert holder.exitcode == 0
    with db.transaction():                  # the holder is gone: the gate lets us in
        db.dict("d")["mine"] = 2
    assert dict(db.dict("d")) == {"before": 1, "held": 1, "mine": 2}
    db.close()



@needs_flock
def test_a_transaction_that_must_not_wait_is_refused_while_another_process_writes(tmp_path):
    path = str(tmp_path / "try.db")
    with BeaverDB(path, timeout=MP_DEADLINE) as db:
        db.dict("d")["before"] = 1              # the -wal (the gate) exists from here on
        with _a_write_held_in_another_process(path):
            assert _refused_at_once(db._core)
            assert db.dict("d")["before"] == 1   # nothing left held: reads go on
        with db._core.transaction(wait=False):
            assert not _wal_gate_is_free(path)
            db.dict("d")["mine"] = 1
        assert _wal_gate_is_free(path) and dict(db.dict("d")) == {"before": 1, "held": 1,
                                                                    "mine": 1}

@needs_flock
def test_a_gate_held_by_no_writer_delays_a_write_but_never_refuses_it(tmp_path):
    import fcntl
    path = str(tmp_path / "stuck.db")
    db = BeaverDB(path, timeout=MP_DEADLINE)
    db.dict("d")["k"] = 0
    stuck = os.open(path + "-wal", os.O_RDONLY)     # a holder stopped before its BEGIN
    fcntl.flock(stuck, fcntl.LOCK_EX)
    try:
        done = []
        thread = threading.Thread(target=lambda: done.append(_write_in_a_transaction(db, 1)))
        thread.start()
        thread.join(MP_DEADLINE)
        assert done == [None] and db.dict("d")["w1"] == 1   # SQLite's lock was free
    finally:
        os.close(stuck)
    db.close()


@needs_flock
def test_the_gate_is_held_during_a_write_and_free_after_it(tmp_path):
    path = str(tmp_path / "order.db")
    with BeaverDB(path) as db:
        db.dict("d")["k"] = 0                       # the -wal exists from here on
        with db.transaction():
            db.dict("d")["k"] = 1
            assert not _wal_gate_is_free(path)
        assert _wal_gate_is_free(path)
        with pytest.raises(ValueError):
            with db.transaction():
                db.dict("d")["k"] = 2
                raise ValueError
        assert _wal_gate_is_free(path) and db.dict("d")["k"] == 1


@needs_flock
def test_the_gate_follows_a_wal_file_deleted_and_made_anew(tmp_path):
    path = str(tmp_path / "anew.db")
    db = BeaverDB(path)
    db.dict("d")["k"] = 1
    with db.transaction():
        db.dict("d")["k"] = 2
    old = os.fstat(db._core.wal_gate.fd).st_ino
    other = BeaverDB(path)
    other.dict("d")["seen"] = 1
    # every connection to the file closes (the last one deletes the -wal), the core stays
    for core in (db._core, other._core):
        with core._conns_lock:
            for _, conn in core._conns:
                conn.close()
            core._conns = []
        core._local = threading.local()
    other.close()
    assert not os.path.exists(path + "-wal")
    db.dict("d")["k"] = 3                           # a new connection makes a new -wal
    for _ in range(beaver.GATE_LINK_CHECK_EVERY):   # the gate notices within so many writes
        with db.transaction():
            db.dict("d")["k"] = 4
    with db.transaction():
        assert not _wal_gate_is_free(path)          # held on the new file, not the old one
    assert os.fstat(db._core.wal_gate.fd).st_ino == os.stat(path + "-wal").st_ino != old
    assert dict(db.dict("d")) == {"k": 4, "seen": 1}
    db.close()


def _write_and_exit(lst, count):
    code = 1
    try:
        for i in range(count):
            lst.push(("child", i))
        code = 0
    finally:
        os._exit(code)


def _wait_child(pid) -> int:
    deadline = time.monotonic() + MP_DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -2
        time.sleep(0.005)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_writes_while_the_parent_writes(tmp_path):
    db = BeaverDB(tmp_path / "forked.db")
    lst, count = db.list("l"), 300
    lst.push(("parent", -1))                        # the parent's gate is open before fork
    pid = os.fork()
    if pid == 0:
        _write_and_exit(lst, count)
    for i in range(count):
        lst.push(("parent", i))
    assert _wait_child(pid) == 0
    items = [tuple(item) for item in lst]
    assert [i for who, i in items if who == "child"] == list(range(count))
    assert [i for who, i in items if who == "parent"] == list(range(-1, count))
    db.close()


@needs_flock
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_inside_a_write_never_unlocks_the_parents_gate(tmp_path):
    path = str(tmp_path / "inside.db")
    db = BeaverDB(path, timeout=0.2)
    db.dict("d")["k"] = 0
    with db.transaction():
        db.dict("d")["k"] = 1
        pid = os.fork()
        if pid == 0:                    # its own gate: it waits for the parent, then gives up
            code = 1
            try:
                with _busy_after(0.2):
                    BeaverDB(path, timeout=0.2).dict("d").pop("k")
                code = 0 if db._core.wal_gate.fd is None else 3
            finally:
                os._exit(code)
        assert _wait_child(pid) == 0
        assert not _wal_gate_is_free(path)          # still the parent's
    assert _wal_gate_is_free(path) and db.dict("d")["k"] == 1
    db.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_sigkilled_holder_of_the_gate_blocks_no_one(tmp_path):
    path = str(tmp_path / "killed.db")
    db = BeaverDB(path, timeout=MP_DEADLINE)
    db.dict("d")["k"] = 0
    entered, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_a_write_in_a_process, args=(path, entered, release))
    holder.start()
    try:
        assert entered.wait(MP_DEADLINE)
        if beaver.fcntl is not None:
            assert not _wal_gate_is_free(path)
        os.kill(holder.pid, signal.SIGKILL)     # (release is never set: a killed sleeper
        holder.join(MP_DEADLINE)                # on it would hang the Event's notify)
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join(MP_DEADLINE)
    done = []
    thread = threading.Thread(target=lambda: done.append(_write_in_a_transaction(db, 1)))
    thread.start()
    thread.join(MP_DEADLINE)
    assert done == [None]
    assert dict(db.dict("d")) == {"k": 0, "w1": 1}  # the killed write never committed
    db.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_database_dropped_without_close_leaves_no_descriptor_of_its_wal(tmp_path):
    def wal_descriptors():
        names = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [name for name in names if "dropped" in name and "-wal" in name]
    for i in range(5):
        db = BeaverDB(str(tmp_path / f"dropped{i}.db"))
        with db.transaction():              # through the gate: its descriptor is open
            db.dict("d")["k"] = i
        del db
    gc.collect()
    assert wal_descriptors() == []


def test_without_flock_processes_meet_on_sqlites_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(beaver, "fcntl", None)
    path = str(tmp_path / "plain.db")
    db = BeaverDB(path, timeout=0.3)
    db.dict("d")["before"] = 1
    with _a_write_held_in_another_process(path), _busy_after(0.3):
        with db.transaction():
            db.dict("d")["mine"] = 1
    _write_in_a_transaction(db, 2)
    assert db._core.wal_gate.fd is None and db.dict("d")["w2"] == 2
    db.close()


def test_a_memory_database_writes_through_its_gate_from_many_threads():
    db = BeaverDB(":memory:")
    writers = [threading.Thread(target=_write_in_a_transaction, args=(db, i)) for i in range(8)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(MP_DEADLINE)
    assert sorted(db.list("order")) == list(range(8))
    db.close()


def _write_in_a_transaction(db, i):
    with db.transaction():
        db.dict("d")[f"w{i}"] = i
        db.list("order").push(i)


def test_a_failed_transaction_lets_the_next_writer_in(db):
    for failure in (ValueError, KeyboardInterrupt):
        with pytest.raises(failure):
            with db.transaction():
                db.list("l").push(1)
                raise failure
    done = []
    thread = threading.Thread(target=lambda: done.append(_write_in_a_transaction(db, 1)))
    thread.start()
    thread.join(MP_DEADLINE)
    assert done == [None] and list(db.list("order")) == [1] and len(db.list("l")) == 0


def _time_key(seconds, tail=None):
    """A key in the client's format: 12 hex digits of milliseconds, 20 of anything."""
    return f"{int(seconds * 1000):012x}{tail or os.urandom(10).hex()}"


def test_request_keys_are_fixed_width_hex_that_increase_with_time(monkeypatch):
    monkeypatch.setattr(beaver, "_last_request_key", [0, 0])
    before = int(time.time() * 1000)
    keys = [beaver._request_key() for _ in range(5000)]
    after = int(time.time() * 1000)
    assert all(re.fullmatch(r"[0-9a-f]{32}", key) for key in keys)
    assert keys == sorted(keys) and len(set(keys)) == len(keys)    # strictly increasing
    assert before <= int(keys[0][:12], 16) <= int(keys[-1][:12], 16) <= after + 1


def test_request_keys_increase_in_one_millisecond_and_when_the_clock_steps_back(monkeypatch):
    clock = FakeClock(1_800_000_000.0)
    monkeypatch.setattr(beaver, "_now", clock)
    monkeypatch.setattr(beaver, "_last_request_key", [0, 0])
    keys = [beaver._request_key() for _ in range(100)]      # all in one millisecond
    clock.advance(-3600.0)                                  # NTP steps the clock back an hour
    keys += [beaver._request_key() for _ in range(100)]
    clock.advance(7200.0)
    keys += [beaver._request_key() for _ in range(100)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert {key[:12] for key in keys[:200]} == {f"{1_800_000_000_000:012x}"}
    assert keys[-1][:12] == f"{1_800_003_600_000:012x}"


def test_request_keys_after_the_largest_random_part_move_to_the_next_millisecond(monkeypatch):
    monkeypatch.setattr(beaver, "_now", lambda: 1_800_000_000.0)
    monkeypatch.setattr(beaver, "_last_request_key", [1_800_000_000_000, (1 << 80) - 1])
    key = beaver._request_key()
    assert len(key) == 32 and key[:12] == f"{1_800_000_000_001:012x}"


def _keys_of_a_process(count, out_path):
    Path(out_path).write_text(json.dumps([beaver._request_key() for _ in range(count)]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_request_keys_are_unique_across_threads_processes_and_a_fork(tmp_path, monkeypatch):
    monkeypatch.setattr(beaver, "_now", lambda: 1_800_000_000.0)     # one millisecond for all
    beaver._request_key()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                        # the child: never returns into pytest
        try:
            os.write(write_end, json.dumps([beaver._request_key() for _ in range(200)]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    parent = [beaver._request_key() for _ in range(200)]
    assert len(child) == 200 and not set(child) & set(parent)
    monkeypatch.undo()
    threads_keys = [[] for _ in range(4)]
    threads = [threading.Thread(target=lambda keys=keys: keys.extend(
        beaver._request_key() for _ in range(5000))) for keys in threads_keys]
    outs = [str(tmp_path / f"keys{w}.json") for w in range(2)]
    workers = [SPAWN.Process(target=_keys_of_a_process, args=(5000, out)) for out in outs]
    for worker in workers + threads:
        worker.start()
    for thread in threads:
        thread.join(MP_DEADLINE)
    join_all(workers, time.monotonic() + MP_DEADLINE)
    every = [key for keys in threads_keys for key in keys]
    every += [key for out in outs for key in json.loads(Path(out).read_text())]
    assert len(every) == 30_000 and len(set(every)) == len(every)
    assert all(keys == sorted(keys) for keys in threads_keys)


def _records(db) -> dict:
    return dict(db._core.all("SELECT key, created FROM beaver_requests"))


def _odd_request_keys(now):
    """Keys not in the client's format, or in it from clocks far off: below, inside and
    above the range of the client's fresh keys."""
    uuids = [uuid.uuid4().hex for _ in range(30)]
    return uuids + ["", "0", "00", "0" * 32, "f" * 32, "g", "zzz", "~~", "ÿ-unicode",
                    "not hex", _time_key(now).upper(), _time_key(now) + "-more",
                    _time_key(now)[:-1], _time_key(now - 86400), _time_key(now - 1000),
                    _time_key(now + 86400), _time_key(now + 365 * 86400), _time_key(0),
                    f"{(1 << 48) - 1:012x}" + "0" * 20]


def test_transaction_records_of_any_key_live_the_retention_then_go(db, monkeypatch):
    clock = FakeClock(1_800_000_000.0)
    monkeypatch.setattr(beaver, "_now", clock)
    monkeypatch.setattr(beaver, "PRUNE_BUDGET", 7)      # a walk of many steps
    runs, written, late = [], {}, {}    # key -> when it was written, how late it may go

    def write(key):
        return beaver._once(db, key, lambda: (runs.append(key), (200, key.encode(), None))[1])
    for batch in range(3):          # old, then younger, then youngest records of every kind
        for key in _odd_request_keys(clock.now):
            late[key] = 0.0
        for ahead in (-2, 0, 0, 1, 30, 200):            # clocks a little off, a little more
            late[_time_key(clock.now + ahead)] = ahead
        for key in late.keys() - written.keys():
            write(key)
            written[key] = clock.now
        clock.advance(100.0)
    walk = (len(written) // beaver.PRUNE_BUDGET + 4) * beaver.PURGE_INTERVAL
    end = max(written.values()) + beaver.REQUEST_RETENTION + max(late.values()) + walk
    while clock.now < end:          # the traffic of one client, a write a second
        clock.advance(beaver.PURGE_INTERVAL)
        key = _time_key(clock.now)
        write(key)
        written[key], late[key] = clock.now, 0.0
        left = set(_records(db))
        young = {k for k, at in written.items() if at >= clock.now - beaver.REQUEST_RETENTION}
        assert young <= left                            # nothing young ever goes
        due = {k for k, at in written.items()
               if at + beaver.REQUEST_RETENTION + max(late[k], walk) < clock.now}
        assert not due & left                           # and the old go within the bound
    before = len(runs)
    for key, at in written.items():         # a retry of a young one: the first answer
        if at >= clock.now - beaver.REQUEST_RETENTION + 1:
            assert write(key)[:2] == (200, key.encode())
    assert len(runs) == before


def test_transaction_one_prune_does_bounded_work_and_busy_writers_prune_more(db, monkeypatch):
    clock = FakeClock(1_800_000_000.0)
    monkeypatch.setattr(beaver, "_now", clock)
    monkeypatch.setattr(beaver, "PRUNE_BUDGET", 20)
    monkeypatch.setattr(beaver, "PRUNE_EVERY", 5)
    old = [(uuid.uuid4().hex, clock.now - 1000, 204, None) for _ in range(100)]
    old += [(_time_key(clock.now - 1000 + i / 10), clock.now - 1000, 204, None)
            for i in range(100)]
    with db.transaction():
        db._core.executemany("INSERT INTO beaver_requests VALUES (?, ?, ?, ?)", old)
    counts = []
    for n in range(30):             # busy: all within one PURGE_INTERVAL
        beaver._once(db, _time_key(clock.now), lambda: (204, b"", None))
        counts.append(len(_records(db)) - n - 1)
    steps = [a - b for a, b in zip([len(old)] + counts, counts)]
    assert 0 < max(steps) <= 2 * (beaver.PRUNE_BUDGET + 1)     # bounded, and more than one
    assert counts[-1] < len(old) - 2 * (beaver.PRUNE_BUDGET + 1)
    for _ in range(20):
        clock.advance(beaver.PURGE_INTERVAL)
        beaver._once(db, _time_key(clock.now), lambda: (204, b"", None))
    assert not set(_records(db)) & {row[0] for row in old}


@pytest.mark.parametrize("answer", [None, beaver._NO_CONTENT])
def test_once_applies_a_call_once_per_key_and_a_failed_call_leaves_no_record(any_db, answer):
    pushed = any_db.list("l")

    def push():
        pushed.push(len(pushed))
        return beaver._NO_CONTENT

    def fail():
        pushed.push("never")
        raise ValueError("refused")
    assert beaver._once(any_db, "k1", push, answer) == beaver._NO_CONTENT
    assert beaver._once(any_db, "k1", push, answer) == beaver._NO_CONTENT    # a repeat
    with pytest.raises(ValueError):
        beaver._once(any_db, "k2", fail, answer)
    assert list(pushed) == [0] and list(_records(any_db)) == ["k1"]   # nothing of k2 stayed
    assert beaver._once(any_db, "k2", push, answer) == beaver._NO_CONTENT    # tried again
    assert list(pushed) == [0, 1] and sorted(_records(any_db)) == ["k1", "k2"]


def test_a_file_from_before_loses_the_request_age_index_on_open(tmp_path):
    path = tmp_path / "older.db"
    BeaverDB(path).close()
    raw = sqlite3.connect(path)
    raw.execute("CREATE INDEX beaver_requests_age ON beaver_requests (created)")
    raw.commit()
    raw.close()
    with BeaverDB(path) as db:
        assert beaver._once(db, "k", lambda: (204, b"", None)) == (204, b"", None)
    assert raw_rows(path, "SELECT name FROM sqlite_master WHERE name LIKE 'beaver_requests%'"
                    ) == [("beaver_requests",)]


def test_transaction_rolls_back_on_keyboard_interrupt(db):
    with pytest.raises(KeyboardInterrupt):
        with db.transaction():
            db.list("l").push(1)
            raise KeyboardInterrupt
    assert len(db.list("l")) == 0
    db.list("l").push(2)                 # and the connection is usable afterwards
    assert list(db.list("l")) == [2]


def test_context_manager_closes(tmp_path):
    with BeaverDB(tmp_path / "cm.db") as db:
        db.dict("d")["a"] = 1
        assert not db.closed
    assert db.closed and "closed" in repr(db)


def test_calls_after_close_raise_closed_error(tmp_path):
    db = BeaverDB(tmp_path / "closed.db")
    d, lst, q, b = db.dict("d"), db.list("l"), db.queue("q"), db.blobs("b")
    d["a"] = 1
    lst.push(1)
    db.close()
    db.close()                          # idempotent
    calls = [
        lambda: d["a"], lambda: d.__setitem__("a", 2), lambda: d.get("a"), lambda: len(d),
        lambda: list(d), lambda: "a" in d, lambda: d.set("a", 1, ttl_seconds=5),
        lambda: lst.push(2), lambda: lst[0], lambda: len(lst), lambda: lst.pop(),
        lambda: q.put(1), lambda: q.get(block=False), lambda: q.get(timeout=1), lambda: len(q),
        lambda: b.put("k", b"x"), lambda: b.get("k"), lambda: d.dump(), lambda: lst.clear(),
        lambda: db.dict("d"), lambda: db.list("new"), lambda: db.queue("q"), lambda: db.blobs("b"),
        lambda: db.lock("l"), lambda: d.acquire(timeout=1), lambda: db.transaction().__enter__(),
    ]
    for call in calls:
        with pytest.raises(beaver.ClosedError):
            call()


def open_handles(path):
    """How many file descriptors of this process point at ``path`` (Linux)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts handles in /proc")
def test_close_from_main_closes_every_threads_connection(tmp_path):
    path = tmp_path / "threads.db"
    db = BeaverDB(path)
    ready, release = threading.Barrier(5), threading.Event()
    errors = []

    def work(i):
        db.list("l").push(i)
        ready.wait(MP_DEADLINE)
        release.wait(MP_DEADLINE)
        try:
            db.list("l").push(i)
        except beaver.ClosedError:
            errors.append(i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    ready.wait(MP_DEADLINE)
    assert len(db._core._conns) >= 5 and open_handles(path) >= 5   # workers and main
    db.close()
    assert open_handles(path) == 0          # idle threads' connections are closed at once
    release.set()
    for t in threads:
        t.join(MP_DEADLINE)
    assert sorted(errors) == [0, 1, 2, 3]


def test_close_wakes_a_blocked_get(tmp_path):
    db = BeaverDB(tmp_path / "wake.db")
    outcome = []
    started = threading.Event()

    def consume():
        started.set()
        try:
            db.queue("q").get(timeout=MP_DEADLINE)
        except beaver.BeaverError as e:
            outcome.append(e)
    t = threading.Thread(target=consume)
    t.start()
    started.wait(MP_DEADLINE)
    _rt_until(lambda: db._core.watcher.users, MP_DEADLINE)    # the consumer really waits
    db.close()
    t.join(MP_DEADLINE)
    assert not t.is_alive() and isinstance(outcome[0], beaver.ClosedError)


_CLOSE_WHILE_BUSY = """
import os, sys, threading
import beaver
for trial in range(8):
    db = beaver.BeaverDB(sys.argv[1] + str(trial) + ".db")
    go, stop = threading.Event(), []
    def work(i):
        go.wait()
        try:
            while True:
                db.list("l").push(i)
                len(db.list("l"))
        except beaver.ClosedError:
            stop.append(i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    go.set()
    while len(db.list("l")) < 50 * (trial + 1):
        pass
    db.close()                         # while the other threads are mid-statement
    for t in threads:
        t.join(30)
    assert sorted(stop) == [0, 1, 2, 3], stop
    if os.path.isdir("/proc/self/fd"):     # and every connection got closed in the end
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink("/proc/self/fd/" + fd))
            except OSError:
                pass
        assert db.path not in fds, "a connection was left open"
"""


def test_close_while_other_threads_are_mid_statement(tmp_path):
    """A connection busy in another thread is left to that thread (closing it crashes CPython)."""
    result = subprocess.run([sys.executable, "-c", _CLOSE_WHILE_BUSY, str(tmp_path / "busy")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]


def _mixed_work(db, worker, rounds, got):
    d, lst, q, b = db.dict("d"), db.list("l"), db.queue("q"), db.blobs("b")
    for i in range(rounds):
        d[f"{worker}:{i}"] = i
        lst.push([worker, i])
        q.put([worker, i], priority=i % 3)
        b.put(f"{worker}:{i}", bytes([worker, i]))
        with db.transaction():
            d["total"] = d.get("total", 0) + 1
        got.append(tuple(q.get(timeout=MP_DEADLINE).data))
        assert d[f"{worker}:{i}"] == i and f"{worker}:{i}" in b
        len(lst), list(d)[:3], lst[-1]


def _run_in_threads(target, count) -> list:
    """Run ``target(i)`` in ``count`` threads at once; the threads, joined (within the
    deadline: any still alive is stuck)."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(MP_DEADLINE)
    return threads


@pytest.mark.parametrize("where", ["file", "memory"])
def test_threads_share_one_database(tmp_path, where):
    db = BeaverDB(tmp_path / "threads.db" if where == "file" else ":memory:")
    workers, rounds, got, errors = 8, 30, [], []

    def run(w):
        try:
            _mixed_work(db, w, rounds, got)
        except Exception as e:          # reported below, with the thread's error
            errors.append(e)
    threads = _run_in_threads(run, workers)
    try:
        assert not any(t.is_alive() for t in threads) and errors == []
        expected = sorted((w, i) for w in range(workers) for i in range(rounds))
        assert sorted(got) == expected                         # each item got exactly once
        assert sorted(map(tuple, db.list("l"))) == expected
        assert len(db.dict("d")) == workers * rounds + 1 and db.dict("d")["total"] == len(expected)
        assert len(db.blobs("b")) == workers * rounds and len(db.queue("q")) == 0
        connections = [conn for _, conn in db._core._conns]
    finally:
        db.close()
    for conn in connections:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")


def test_relative_path_survives_chdir(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with BeaverDB("app.db") as db:
        db.dict("d")["k"] = "v"
        monkeypatch.chdir(tmp_path / "b")
        seen = []
        t = threading.Thread(target=lambda: seen.append(db.dict("d").get("k")))
        t.start()
        t.join(MP_DEADLINE)
        assert seen == ["v"] and os.path.isabs(db.path)
    assert list((tmp_path / "b").iterdir()) == []


def test_memory_databases_are_private_and_vanish(tmp_path):
    one, two = BeaverDB(":memory:"), BeaverDB(":memory:")
    one.dict("d")["k"] = 1
    assert "k" not in two.dict("d")
    seen = []
    t = threading.Thread(target=lambda: seen.append(one.dict("d")["k"]))
    t.start()
    t.join(MP_DEADLINE)
    assert seen == [1]
    backing = one.path
    one.close()
    two.close()
    assert not os.path.exists(backing)


_MEMORY_CHILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import beaver
db = beaver.BeaverDB(":memory:")
db.dict("d")["k"] = 1
print(db.path, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_memory_database_files_never_outlive_their_process():
    def child(how):
        done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(ROOT), how],
                              capture_output=True, text=True, timeout=MP_DEADLINE)
        return done.stdout.strip()
    exited = child("exit")                      # no close(): removed at exit
    assert exited and not os.path.exists(exited)
    killed = child("kill")                      # no exit handler ran: its file stays...
    assert os.path.exists(killed)
    BeaverDB(":memory:").close()                # ... until the next memory database sweeps it
    assert not any(os.path.exists(killed + suffix) for suffix in ("", "-wal", "-shm"))


def test_on_and_off_deliver_events_after_commit(db):
    config = db.dict("app_config")
    received, arrived = [], threading.Event()

    def callback(payload):
        received.append((payload["event"], payload["key"]))
        arrived.set()
    set_handle = config.on("set", callback)
    del_handle = config.on("del", callback)
    config["theme"] = "dark"
    assert arrived.wait(MP_DEADLINE)
    arrived.clear()
    del config["theme"]
    assert arrived.wait(MP_DEADLINE)
    set_handle.off()
    del_handle.off()
    set_handle.off()                    # idempotent
    assert received == [("set", "theme"), ("del", "theme")]
    with pytest.raises(TypeError):
        config.on("set", "not callable")


def test_events_skip_rolled_back_writes(db):
    d = db.dict("d")
    got, done = [], threading.Event()

    def callback(payload):
        got.append(payload["key"])
        if payload["key"] == "last":
            done.set()
    handle = d.on("set", callback)
    with pytest.raises(RuntimeError):
        with db.transaction():
            d["rolled_back"] = 1
            raise RuntimeError
    with db.transaction():
        d["committed"] = 1
        with pytest.raises(RuntimeError):
            with db.transaction():
                d["savepoint_rolled_back"] = 1
                raise RuntimeError
    d["last"] = 1
    assert done.wait(MP_DEADLINE)
    handle.off()
    assert got == ["committed", "last"]


# ---- async ----

def test_as_async_on_every_manager(db):
    async def main():
        adict = db.dict("d").as_async()
        await adict.set("theme", "dark", ttl_seconds=60)
        await adict.setitem("k", 1)
        assert await adict.getitem("theme") == "dark" and await adict.get("nope", 0) == 0
        assert await adict.len() == 2 and await adict.contains("k")
        assert [k async for k in adict] == ["k", "theme"]
        await adict.delitem("k")
        assert await adict.items() == [("theme", "dark")]

        alist = db.list("l").as_async()
        await alist.push(1)
        await alist.prepend(0)
        await alist.extend([2, 3])
        assert await alist.getitem(-1) == 3 and await alist.getitem(slice(1, 3)) == [1, 2]
        assert await alist.pop() == 3 and await alist.deque() == 0 and await alist.len() == 2

        aqueue = db.queue("q").as_async()
        waiter = asyncio.ensure_future(aqueue.get(timeout=MP_DEADLINE))
        await aqueue.put({"job": 1}, priority=2)
        assert (await waiter).data == {"job": 1}
        with pytest.raises(beaver.QueueEmpty):
            await aqueue.get(block=False)

        ablobs = db.blobs("b").as_async()
        await ablobs.put("k", b"data", metadata={})
        assert (await ablobs.get("k")).metadata == {} and await ablobs.contains("k")
        await ablobs.delete("k")
        assert await ablobs.len() == 0

        async with db.dict("d").as_async() as locked:
            assert locked.sync is db.dict("d")
        dumped = await adict.dump()
        assert dumped["metadata"]["count"] == 1
        assert "Async" in repr(adict)
    asyncio.run(main())


@pytest.mark.parametrize("factory", ["dict", "list", "queue", "blobs", "blob", "log", "channel",
                                     "collection"])
def test_as_async_exists_on_every_manager(db, factory):
    if not hasattr(db, factory):
        pytest.skip(f"this beaver has no db.{factory}() yet")
    manager = getattr(db, factory)("any")
    twin = manager.as_async()
    assert twin is not None and twin is not manager
    if hasattr(manager, "__len__"):
        assert asyncio.run(twin.len()) == len(manager)


def test_async_queue_get_cancelled_loses_nothing_and_does_not_hang(db):
    outcome = []

    async def main():
        jobs = db.queue("jobs").as_async()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(jobs.get(), 0.05)        # cancelled while waiting
        await jobs.put("precious")
        outcome.append((await jobs.get(timeout=MP_DEADLINE)).data)
        for i in range(100):
            await jobs.put(i)
        got = []
        while len(got) < 100:                               # cancellations racing with takes
            try:
                got.append((await asyncio.wait_for(jobs.get(), 0.001)).data)
            except asyncio.TimeoutError:
                pass
        outcome.append(sorted(got))
        with pytest.raises(asyncio.TimeoutError):           # the last one: nothing left
            await asyncio.wait_for(jobs.get(), 0.05)
    runner = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    runner.start()
    runner.join(MP_DEADLINE)
    assert not runner.is_alive(), "asyncio.run hung on a cancelled get's worker thread"
    assert outcome == ["precious", list(range(100))]
    assert len(db.queue("jobs")) == 0


def test_async_acquire_cancelled_does_not_leak_the_lock(tmp_path):
    path = tmp_path / "lock.db"
    with BeaverDB(path) as one, BeaverDB(path) as two:
        held = two.dict("c").acquire(timeout=5)
        outcome = []

        async def main():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(one.dict("c").as_async().__aenter__(), 0.05)
            held.release()              # the abandoned wait gets the lock, and gives it back
            outcome.append(bool(await asyncio.to_thread(two.dict("c").acquire, 10)))
            two.dict("c").release()
        runner = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        runner.start()
        runner.join(MP_DEADLINE)
        assert not runner.is_alive() and outcome == [True]


# ---- aliases ----

def test_alias_imports():
    from beaver import BeaverDB as B, Blob, Model, QueueItem  # noqa: F401
    from beaver.blobs import Blob as AliasBlob
    from beaver.queues import QueueItem as AliasQueueItem
    from beaver.manager import DictManager
    assert AliasQueueItem is QueueItem and AliasBlob is Blob and DictManager is beaver.DictManager


def test_alias_module_import_binds_the_attribute():
    code = ("import beaver.queues, beaver.blobs; "
            "assert beaver.queues.QueueItem is beaver.QueueItem; "
            "assert beaver.blobs.Blob is beaver.Blob")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT),
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


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


def test_watcher_start_wakes_a_waiter_that_probed_before_it(db, monkeypatch):
    # a commit between a waiter's first probe and the watcher's baseline must still wake it
    db._core.execute("CREATE TABLE rt_flag (v)")
    other = sqlite3.connect(db._core.path, isolation_level=None)
    probed, poll = threading.Event(), beaver._Watcher._poll
    monkeypatch.setattr(beaver._Watcher, "_poll",
                        lambda self: (probed.wait(_RT_DEADLINE), poll(self)))

    def probe():
        if not probed.is_set():
            other.execute("INSERT INTO rt_flag VALUES (1)")   # before the watcher starts
            probed.set()
            return None
        return db._core.watcher.tick       # woken (tick moved), not just timed out

    assert db._core.watcher._thread is None and db._core.watcher.tick == 0
    try:
        assert db._core.watcher.wait_for(probe, timeout=5) >= 1
    finally:
        other.close()


def test_watcher_can_poll_without_inotify(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAVER_WATCH", "poll")
    database = BeaverDB(tmp_path / "poll.db")
    try:
        q = database.queue("q")
        t = _rt_threading.Thread(target=lambda: (
            _rt_until(lambda: database._core.watcher.users, _RT_DEADLINE), q.put(1)))
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
    logs.log(1, timestamp=_rt_time.time() - 1.0)
    view = logs.live(window=2.0, period=0.01, aggregator=list)
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
        publisher = _rt_threading.Thread(target=publish)
        publisher.start()
        for message in listener.listen():
            assert message == {"event": "user_login", "user_id": "alice"}
            break
    publisher.join(_RT_DEADLINE)        # it prunes after publishing: done before db closes


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


@pytest.mark.timeout(60)
def test_lock_is_usable_again_after_lock_lost(db, clock):
    lock = db.lock("job", ttl=10)
    for lose in (lambda: lock.renew(), lambda: lock.release()):
        lock.acquire(timeout=5)
        clock.advance(11)                       # the hold ran out
        with pytest.raises(beaver.LockLost):
            lose()
        assert lock.token is None and not lock.held
        assert lock.acquire(timeout=5)          # not "held by another thread of this object"
        assert lock.held
        lock.release()
    assert not lock.locked


def test_close_releases_every_lock_the_database_holds(tmp_path):
    path = tmp_path / "locks.db"
    first = BeaverDB(path)
    first.lock("job", ttl=600).acquire()
    first.list("jobs").acquire(ttl=600)
    forgotten = first.lock("gone", ttl=600)
    forgotten.acquire()
    del forgotten
    with BeaverDB(path) as second:
        assert second.lock("job").locked and second.lock("gone").locked
        first.close()
        assert second.lock("job").acquire(block=False)
        assert second.lock("gone").acquire(block=False)
        assert second.list("jobs").acquire(block=False)
        assert raw_rows(path, "SELECT count(*) FROM beaver_locks WHERE owner LIKE ?",
                        (f"{os.getpid()}:%",))[0][0] == 3    # the second database's holds


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
    for i in range(3):                   # start one at a time: each waits behind the others
        p = _RT_SPAWN.Process(target=_rt_lock_enqueue_then_wait, args=(path, i, queued))
        p.start()
        procs.append(p)
        tickets.append(_rt_get(queued))
    holder.release()
    _rt_join(procs)
    assert [t[1] for t in tickets] == sorted(t[1] for t in tickets)
    assert db.list("order")[:] == [0, 1, 2]
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


def test_events_heartbeat_does_not_wait_for_a_slow_callback(tmp_path, monkeypatch):
    monkeypatch.setattr(beaver, "LISTENER_TTL", 0.3)
    path = str(tmp_path / "slow.db")
    listener, writer = BeaverDB(path), BeaverDB(path)     # two origins, as two processes
    try:
        started, release, seen = threading.Event(), threading.Event(), []

        def slow(payload):
            seen.append(payload["key"])
            started.set()
            release.wait(_RT_DEADLINE)          # a callback that runs for many LISTENER_TTLs

        listener.dict("d").on("set", slow)
        writer.dict("d")["first"] = 1
        assert started.wait(_RT_DEADLINE)
        since = time.time()
        expiry = lambda: listener._core.execute(     # noqa: E731
            "SELECT max(expires_at) FROM beaver_listeners").fetchone()[0] or 0
        _rt_until(lambda: expiry() > since + 2 * beaver.LISTENER_TTL, timeout=_RT_DEADLINE)
        for key in ("a", "b", "c"):             # registration still alive: events are stored
            writer.dict("d")[key] = 1
        release.set()
        _rt_until(lambda: len(seen) == 4, timeout=_RT_DEADLINE)
        assert seen == ["first", "a", "b", "c"]
    finally:
        release.set()
        writer.close()
        listener.close()


@pytest.mark.parametrize("kind", ["dict", "list", "queue", "blobs", "log", "channel",
                                  "collection"])
def test_events_unknown_event_names_are_refused(db, kind):
    manager = getattr(db, kind)("x")
    with pytest.raises(ValueError, match="valid events") as info:
        manager.on("sett", print)
    assert "'*'" in str(info.value)
    manager.on("*", print).off()
    manager.on("clear", print).off()


def test_events_every_emitted_name_is_declared():
    import re
    source = (ROOT / "beaver.py").read_text().split("\n")
    emitted, cls = {}, None
    for line in source:
        found = re.match(r"class (\w+)", line)
        cls = found.group(1) if found else cls
        for event in re.findall(r'_wrote\("(\w+)"', line):
            emitted.setdefault(cls, set()).add(event)
    assert emitted
    for name, events in emitted.items():
        cls = getattr(beaver, name)
        kinds = [c._kind for c in vars(beaver).values() if isinstance(c, type)
                 and issubclass(c, cls) and c._kind] if name == "_Manager" else [cls._kind]
        for kind in kinds:
            assert events <= set(beaver._EVENT_NAMES[kind]), (kind, events)


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


def test_lock_release_hands_over_to_the_first_live_waiter(db):
    holder = db.lock("handoff")
    holder.acquire()
    first_token = holder.token
    db._core.execute(                              # a waiter whose process died: no heartbeat
        "INSERT INTO beaver_locks (name, owner, expires_at, ttl) VALUES ('handoff', 'dead', ?, 60)",
        (_rt_time.time() - 1,))
    waiter = db.lock("handoff", timeout=_RT_DEADLINE)
    got = []
    t = _rt_threading.Thread(target=lambda: got.append(waiter.acquire()))
    t.start()
    _rt_until(lambda: db._core.execute(
        "SELECT count(*) FROM beaver_locks WHERE name = 'handoff' AND owner = ?",
        (waiter._owner,)).fetchone()[0] == 1)
    holder.release()
    t.join(_RT_DEADLINE)
    assert got and waiter.held and waiter.token > first_token
    expires = db._core.execute("SELECT expires_at FROM beaver_locks WHERE ticket = ?",
                               (waiter.token,)).fetchone()[0]
    assert expires > _rt_time.time() + 30          # the waiter's own ttl, not the grace time
    waiter.release()
    assert not waiter.locked


def test_lock_works_on_files_without_the_ttl_column(tmp_path):
    path = tmp_path / "old.db"
    database = BeaverDB(path)
    database._core.execute("DROP TABLE beaver_locks")
    database._core.execute(
        "CREATE TABLE beaver_locks (ticket INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, "
        "owner TEXT NOT NULL, expires_at REAL NOT NULL, held INTEGER NOT NULL DEFAULT 0)")
    database.close()
    database = BeaverDB(path)
    with database.lock("old", timeout=1) as lock:
        assert lock.locked
    database.close()


# ---- collections ----

import json
import multiprocessing
import operator
import threading

from beaver import Document, FeatureUnavailable, ValidationError, rerank


@pytest.fixture
def docs(db):
    return db.collection("docs")


def test_collection_quickstart_string_body(db):
    articles = db.collection("articles")
    doc = Document(id="sqlite-001",
                   body="SQLite is a powerful embedded database ideal for local apps.")
    articles.index(doc, fts=True, fuzzy=True)
    top_doc, rank = articles.match(query="datbase", fuzziness=1)[0]
    assert top_doc == doc and top_doc.body == doc.body and rank >= 0


def test_collection_old_readme_quickstart(db):
    articles = db.collection("articles")
    articles.index(Document(id="sqlite-001",
                            content="SQLite is a powerful embedded database ideal for local apps."))
    top_doc, _ = articles.match(query="database")[0]
    assert top_doc.content.startswith("SQLite is")
    assert top_doc.to_dict() == {"id": "sqlite-001", "embedding": None,
                                 "body": {"content": top_doc.content}}


def test_collection_rag_example(db):
    from beaver.collections import rerank as rerank_alias
    assert rerank_alias is rerank
    articles = db.collection("articles")
    for doc in [
        Document(id="py-fast", embedding=[0.1, 0.9, 0.2],
                 body="Python is a great language for fast prototyping."),
        Document(id="py-data", embedding=[0.8, 0.2, 0.9],
                 body="The Python ecosystem is ideal for data science."),
        Document(id="js-fast", embedding=[0.2, 0.8, 0.1],
                 body="JavaScript engines are optimized for fast execution."),
    ]:
        articles.index(doc, fts=True)
    vector_results = [doc for doc, _ in articles.search(vector=[0.15, 0.85, 0.15])]
    text_results = [doc for doc, _ in articles.match(query="python")]
    assert [d.id for d in vector_results][:2] in (["py-fast", "js-fast"], ["js-fast", "py-fast"])
    assert {d.id for d in text_results} == {"py-fast", "py-data"}
    best = rerank(text_results, vector_results)
    assert best[0].id == "py-fast" and {d.id for d in best} == {"py-fast", "py-data", "js-fast"}
    weighted = rerank(vector_results, text_results, weights=[0.6, 0.4])
    assert weighted[0].id == "py-fast"


def _social(db):
    net = db.collection("social_network")
    people = {name: Document(id=name, body={"name": name.title()})
              for name in ("alice", "bob", "charlie", "diana")}
    for doc in people.values():
        net.index(doc)
    for a, b in [("alice", "bob"), ("alice", "charlie"), ("bob", "diana"), ("charlie", "bob")]:
        net.connect(people[a], people[b], label="FOLLOWS")
    return net, people


def test_collection_graph_example(db):
    net, p = _social(db)
    assert [d.id for d in net.neighbors(p["alice"], label="FOLLOWS")] == ["bob", "charlie"]
    foaf = net.walk(source=p["alice"], labels=["FOLLOWS"], depth=2)
    assert [d.id for d in foaf] == ["bob", "charlie", "diana"]
    assert [d.id for d in net.neighbors("bob", direction="incoming")] == ["alice", "charlie"]
    assert [d.id for d in net.neighbors("bob", direction="both")] == ["alice", "charlie", "diana"]
    assert net.neighbors("alice", label="LIKES") == []
    net.connect("diana", "alice", "LIKES", metadata={"since": 2020})
    assert net.edges("diana") == [beaver.Edge("diana", "alice", "LIKES", {"since": 2020})]
    net.disconnect("alice", "bob")
    assert [d.id for d in net.neighbors("alice")] == ["charlie"]
    with pytest.raises(KeyError):
        net.connect("alice", "nobody", "FOLLOWS")


def test_collection_walk_on_cycle(db):
    ring = db.collection("ring")
    n = 50
    for i in range(n):
        ring.index(Document(id=f"n{i}"))
    for i in range(n):
        ring.connect(f"n{i}", f"n{(i + 1) % n}", "next")
        ring.connect(f"n{i}", f"n{(i + 7) % n}", "skip")
    reached = ring.walk("n0", depth=1000)
    assert len(reached) == n - 1 and "n0" not in {d.id for d in reached}
    assert [d.id for d in ring.walk("n0", labels="next", depth=3)] == ["n1", "n2", "n3"]
    assert {d.id for d in ring.walk("n0", direction="incoming", depth=1)} == {"n49", "n43"}


def test_collection_first_opened_in_a_rolled_back_transaction_opens_again(db):
    with pytest.raises(ZeroDivisionError), db.transaction():
        db.collection("born", metric="cosine").index(Document(id="a", embedding=[1.0, 0.0]))
        1 / 0
    born = db.collection("born")                       # registered anew, not a stale manager
    born.index(Document(id="a", embedding=[1.0, 0.0], body="text"))    # its text tables too
    assert born.metric == "l2" and [d.id for d, _ in born.search([1.0, 0.0])] == ["a"]
    assert [d.id for d, _ in born.match("text")] == ["a"]


def test_collection_drop_removes_edges(db):
    net, _ = _social(db)
    net.drop("bob")
    assert "bob" not in net and len(net) == 3
    assert net.edges("alice") == [beaver.Edge("alice", "charlie", "FOLLOWS", None)]
    assert net.edges("charlie") == []
    with pytest.raises(KeyError):
        net.drop("bob")


def test_collection_document_basics():
    doc = Document(content="hi", tags=["a"])
    assert len(doc.id) == 36 and doc.content == "hi" and doc.tags == ["a"]
    assert Document(id="x", body={"a": 1}, b=2).body == {"a": 1, "b": 2}
    assert Document(id="x", embedding=(1, 2)).embedding == [1.0, 2.0]
    assert Document(id="x", embedding=[0.1]) == Document(id="x", embedding=[0.1])
    assert "x" in repr(Document(id="x", body="text"))
    with pytest.raises(AttributeError):
        Document(id="x").missing
    with pytest.raises(TypeError):
        Document(id="x", body="text", extra=1)
    with pytest.raises(ValueError):
        Document(embedding=[float("nan")])
    np = pytest.importorskip("numpy")
    assert Document(id="x", embedding=np.array([1.5, 2.0])).embedding == [1.5, 2.0]


def test_collection_fetched_embedding_decoded_on_read(docs):
    import copy
    import pickle
    docs.index(Document(id="v", embedding=[0.5, 1.5], body={"n": 1}))
    for got in (docs["v"], docs.search([0.5, 1.5], top_k=1)[0][0]):
        assert pickle.loads(pickle.dumps(got)) == got == copy.copy(got)
        assert got.embedding == [0.5, 1.5] and got.to_dict()["embedding"] == [0.5, 1.5]
        got.embedding = [2.0]
        assert got.embedding == [2.0] and got.n == 1


def test_collection_dimension_not_kept_from_rolled_back_vector(db):
    docs = db.collection("dims")
    with pytest.raises(RuntimeError):
        with db.transaction():
            docs.index(Document(id="a", embedding=[1.0, 2.0, 3.0]))
            raise RuntimeError("roll back")
    docs.index(Document(id="b", embedding=[1.0, 2.0]))
    docs.index(Document(id="c", embedding=[2.0, 1.0]))
    with pytest.raises(ValueError):
        docs.index(Document(id="d", embedding=[1.0, 2.0, 3.0]))
    assert [d.id for d, _ in docs.search([1.0, 2.0], top_k=2)] == ["b", "c"]


def test_collection_mapping_protocol(docs):
    docs.index(Document(id="b", body={"t": "beta"}))
    docs.index(Document(id="a", body={"t": "alpha"}, embedding=[1.0, 0.0]))
    assert len(docs) == 2 and "a" in docs and Document(id="b") in docs and "z" not in docs
    assert [d.id for d in docs] == ["a", "b"]
    assert docs["a"].embedding == [1.0, 0.0] and docs.get("z") is None
    with pytest.raises(KeyError):
        docs["z"]
    docs.clear()
    assert len(docs) == 0 and docs.match("alpha") == [] and docs.search([1.0, 0.0]) == []


INJECTIONS = ['"', '""', "'", "-", "--", ":", "*", "(", ")", "()", "AND", "OR", "NOT", "NEAR",
              "NEAR(a b)", '"sqlite-001"', "sqlite-001", "a AND", "OR b", "title:sqlite",
              "col:", "^start", "a*b", "-sqlite", "NOT sqlite", "sqlite NOT", "{a b}:c",
              "a + b", "[x]", '"unclosed phrase', "\\", "%_", "a OR OR b", "* sqlite", ""]


def test_collection_fts_injection_never_raises(docs):
    docs.index(Document(id="sqlite-001", body="SQLite is a powerful embedded database."))
    docs.index(Document(id="pg", body="PostgreSQL is a database server. AND OR NOT NEAR"))
    for query in INJECTIONS:
        for fuzziness in (0, 1):
            assert isinstance(docs.match(query, fuzziness=fuzziness), list), query
    assert [d.id for d, _ in docs.match("database -server")] == ["sqlite-001"]
    assert [d.id for d, _ in docs.match("database NOT server")] == ["sqlite-001"]
    assert {d.id for d, _ in docs.match("sqlite OR postgresql")} == {"sqlite-001", "pg"}
    assert [d.id for d, _ in docs.match('"embedded database"')] == ["sqlite-001"]
    assert [d.id for d, _ in docs.match("embed*")] == ["sqlite-001"]
    assert docs.match('"database embedded"') == []
    assert [d.id for d, _ in docs.match("NEAR")] == ["pg"]
    with pytest.raises(ValueError):
        docs.match("(", raw=True)
    if docs._core.engine == "sqlite":      # raw is the engine's own syntax: FTS5's here
        assert [d.id for d, _ in docs.match("NEAR(sqlite database, 5)", raw=True)] == \
            ["sqlite-001"]
    else:                                   # and PostgreSQL's to_tsquery there
        assert [d.id for d, _ in docs.match("sqlite <-> is", raw=True)] == ["sqlite-001"]


def test_collection_isolation_and_names_not_searchable(db):
    first, second = db.collection("first"), db.collection("second")
    first.index(Document(id="same", body={"title": "apple pie", "meta": {"tag": "fruit"}}))
    second.index(Document(id="same", body={"title": "banana bread"}))
    assert [d.body["title"] for d, _ in first.match("apple")] == ["apple pie"]
    assert second.match("apple") == [] and first.match("banana") == []
    for name in ("first", "second", "title", "meta", "tag", "meta.tag", "docs", "collection"):
        assert first.match(name) == [] and second.match(name) == [], name
    first.drop("same")
    assert [d.id for d, _ in second.match("banana")] == ["same"]


def test_collection_multi_field_dedup_and_on(docs):
    docs.index(Document(id="a", body={"title": "python", "text": "python python",
                                      "tags": ["python", "code"], "meta": {"lang": "python"}}))
    docs.index(Document(id="b", body={"title": "rust", "text": "about python"}))
    hits = docs.match("python")
    assert [d.id for d, _ in hits] == ["a", "b"] and hits[0][1] > hits[1][1] > 0
    assert [d.id for d, _ in docs.match("python", on=["title"])] == ["a"]
    assert [d.id for d, _ in docs.match("python", on=["meta"])] == ["a"]
    assert [d.id for d, _ in docs.match("code", on="tags")] == ["a"]
    assert docs.match("code", on=["title", "text"]) == [] and docs.match("python", on=[]) == []
    assert len(docs.match("python", top_k=1)) == 1
    docs.index(Document(id="c", body={"title": "python", "secret": "hidden"}), fts=["title"])
    assert docs.match("hidden") == []
    assert {d.id for d, _ in docs.match("python", on="title")} == {"a", "c"}
    doc, score, snippet = docs.match("rust", highlight=True)[0]
    assert doc.id == "b" and "[rust]" in snippet
    doc, score, snippet = docs.match("rsut", highlight=True, fuzziness=1)[0]
    assert doc.id == "b" and "[rust]" in snippet


def test_collection_upsert_replaces_text(docs):
    docs.index(Document(id="a", body="old words"))
    docs.index(Document(id="a", body="new words"))
    assert docs.match("old") == [] and [d.id for d, _ in docs.match("new")] == ["a"]
    assert len(docs) == 1
    docs.compact()
    assert [d.id for d, _ in docs.match("new")] == ["a"]


@pytest.mark.parametrize("query,fuzziness,expected", [
    ("datbase", 1, "database"), ("databse", 1, "database"), ("dtaabase", 1, "database"),
    ("pyton", 1, "python"), ("cat", 1, "cat"), ("cta", 1, "cat"), ("ct", 1, None),
    ("dgo", 1, "dog"), ("sqlit", 1, "sqlite"), ("datbsae", 2, "database"),
    ("prgramming", 1, "programming"), ("progrmaming", 2, "programming"),
    ("prgoramimng", 2, "programming"), ("databaes", 2, "database"), ("pyton", 2, "python"),
])
def test_collection_fuzzy(docs, query, fuzziness, expected):
    texts = {"database": "an embedded database", "python": "python is a language",
             "cat": "the cat sat", "dog": "a dog barked", "sqlite": "sqlite rocks",
             "programming": "functional programming ideas", "other": "unrelated words here"}
    for key, text in texts.items():
        docs.index(Document(id=key, body=text))
    hits = [d.id for d, _ in docs.match(query, fuzziness=fuzziness)]
    if expected is None:
        assert "cat" not in hits
    else:
        assert hits and hits[0] == expected, hits
    assert docs.match(query) == [] or query == "cat"


def test_collection_fuzzy_ranks_by_distance(docs):
    docs.index(Document(id="exact", body="database"))
    docs.index(Document(id="one", body="databse"))
    docs.index(Document(id="two", body="dtabse"))
    assert [d.id for d, _ in docs.match("database", fuzziness=2)] == ["exact", "one", "two"]
    assert [d.id for d, _ in docs.match("database", fuzziness=1)] == ["exact", "one"]
    assert [d.id for d, _ in docs.match("colour database", fuzziness=1)] == []


def test_collection_vectors_metrics_and_where(db):
    l2, cos, ip = (db.collection(n, metric=m) for n, m in
                   (("l2", None), ("cos", "cosine"), ("ip", "ip")))
    vectors = {"x": [1.0, 0.0], "y": [0.0, 2.0], "xy": [3.0, 3.0]}
    for coll in (l2, cos, ip):
        for key, vec in vectors.items():
            coll.index(Document(id=key, embedding=vec, body={"k": key, "g": {"even": key != "y"}}))
    got = l2.search([1.0, 0.0], top_k=3)
    assert [d.id for d, _ in got] == ["x", "y", "xy"]
    assert got[0][1] == pytest.approx(0.0) and got[1][1] == pytest.approx(5 ** 0.5)
    got = cos.search([1.0, 1.0])
    assert got[0][0].id == "xy" and got[0][1] == pytest.approx(0.0, abs=1e-6)
    assert got[1][1] == pytest.approx(1 - 2 ** -0.5, abs=1e-6)
    got = ip.search([1.0, 1.0])
    assert [d.id for d, _ in got] == ["xy", "y", "x"] and got[0][1] == pytest.approx(-6.0)
    assert [d.id for d, _ in l2.search([1.0, 0.0], where={"k": "y"})] == ["y"]
    assert [d.id for d, _ in l2.search([1.0, 0.0], where={"g.even": True})] == ["x", "xy"]
    assert [d.id for d, _ in l2.search([1.0, 0.0], where={"k": ["xy", "y"]})] == ["y", "xy"]
    assert l2.search([1.0, 0.0], where={"k": "nope"}) == []
    with pytest.raises(ValidationError):
        l2.search([1.0, 0.0, 0.0])
    with pytest.raises(ValidationError):
        l2.index(Document(id="bad", embedding=[1.0, 2.0, 3.0]))
    assert "bad" not in l2
    with pytest.raises(ValueError):
        db.collection("cos", metric="l2")


def test_collection_vector_upsert_moves_and_reopen(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")
    path = tmp_path / "v.db"
    with BeaverDB(path) as db:
        docs = db.collection("v")
        docs.index(Document(id="a", embedding=[0.0, 0.0]))
        docs.index(Document(id="b", embedding=[10.0, 10.0]))
        assert docs.search([0.0, 0.0], top_k=1)[0][0].id == "a"
        docs.index(Document(id="a", embedding=[20.0, 20.0]))
        assert [d.id for d, _ in docs.search([0.0, 0.0])] == ["b", "a"]
        docs.index(Document(id="a", body="no vector now"))
        assert [d.id for d, _ in docs.search([0.0, 0.0])] == ["b"]
        docs.drop("b")
        assert docs.search([0.0, 0.0]) == []
        docs.index(Document(id="b", embedding=[1.0, 1.0], body="back again"))
    with BeaverDB(path) as db:
        docs = db.collection("v")
        hits = docs.search([0.0, 0.0])
        assert [(d.id, d.body) for d, _ in hits] == [("b", "back again")]
        assert [d.id for d, _ in docs.match("again")] == ["b"]


def test_collection_vector_backend_setting_is_checked(tmp_path, monkeypatch):
    from beaver import Document
    with BeaverDB(tmp_path / "v.db") as db:
        docs = db.collection("v")
        monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "fais")
        with pytest.raises(ValueError, match="BEAVER_VECTOR_BACKEND.*'exact'.*'faiss'"):
            docs.index(Document(id="a", embedding=[0.0, 1.0]))
        assert "a" not in docs
        monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "faiss")
        monkeypatch.setitem(sys.modules, "beaver_vector", None)     # not importable
        with pytest.raises(beaver.FeatureUnavailable, match="faiss"):
            docs.index(Document(id="a", embedding=[0.0, 1.0]))
        monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "Exact")
        docs.index(Document(id="a", embedding=[0.0, 1.0]))
        assert docs.search([0.0, 1.0])[0][0].id == "a"


def test_collection_vectors_pure_python(docs, monkeypatch):
    monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")  # beaver_vector may be imported already
    monkeypatch.setitem(sys.modules, "numpy", None)
    for i in range(20):
        docs.index(Document(id=f"d{i}", embedding=[float(i), 1.0]))
    hits = docs.search([4.2, 1.0], top_k=3)
    assert [d.id for d, _ in hits] == ["d4", "d5", "d3"]
    assert hits[0][1] == pytest.approx(0.2, abs=1e-5)
    assert docs._vectors.np is None


def test_collection_dump_load_with_edges(db):
    net, _ = _social(db)
    net.index(Document(id="v", embedding=[1.0, 2.0], body={"text": "vector doc"}))
    data = net.dump()
    assert data["metadata"]["count"] == 5 and len(data["edges"]) == 4
    copy = db.collection("copy")
    copy.load(json.dumps(data))
    assert [d.id for d in copy] == [d.id for d in net]
    assert copy["v"].embedding == [1.0, 2.0]
    assert [d.id for d in copy.walk("alice", depth=2)] == ["bob", "charlie", "diana"]
    assert [d.id for d, _ in copy.match("vector")] == ["v"]


def test_collection_events_and_model(db):
    seen = []
    done = threading.Event()
    coll = db.collection("ev")
    coll.on("*", lambda p: (seen.append(p["event"]), p["event"] == "drop" and done.set()))
    coll.index(Document(id="a"))
    coll.index(Document(id="b"))
    coll.connect("a", "b", "x")
    coll.drop("a")
    assert done.wait(5)
    assert seen == ["index", "index", "connect", "drop"]

    class Article(beaver.Model):
        title: str
        views: int = 0

    typed = db.collection("typed", model=Article)
    typed.index(Document(id="t", body=Article(title="Typed search")))
    doc, _ = typed.match("typed")[0]
    assert isinstance(doc.body, Article) and doc.title == "Typed search"
    with pytest.raises((TypeError, ValueError)):
        typed.index(Document(id="u", body=["not", "an", "article"]))


def test_collection_rerank_shapes():
    a, b, c = Document(id="a"), Document(id="b"), Document(id="c")
    assert [d.id for d in rerank([a, b, c], [c, b])] == ["c", "b", "a"]      # 1/63+1/61 > 2/62
    assert [d.id for d in rerank([a, b, c], [c, b], weights=[1.0, 0.0])] == ["a", "b", "c"]
    assert [d.id for d in rerank([a, a, b])] == ["a", "b"]
    assert [d.id for d in rerank([(a, 0.1), (b, 0.2)], [b])] == ["b", "a"]
    assert rerank() == [] and rerank([]) == []
    with pytest.raises(ValueError):
        rerank([a], [b], weights=[1.0])


def _collection_writer(path):
    with BeaverDB(path) as db:
        db.collection("shared").index(Document(id="remote", embedding=[0.5, 0.5],
                                               body="written by another process"))


def test_collection_visible_across_processes(tmp_path):
    path = str(tmp_path / "x.db")
    with BeaverDB(path) as db:
        coll = db.collection("shared")
        coll.index(Document(id="local", embedding=[9.0, 9.0], body="local text"))
        assert [d.id for d, _ in coll.search([0.5, 0.5])] == ["local"]
        proc = multiprocessing.get_context("spawn").Process(target=_collection_writer,
                                                             args=(path,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert [d.id for d, _ in coll.match("another")] == ["remote"]
        assert [d.id for d, _ in coll.search([0.5, 0.5])] == ["remote", "local"]
        assert [d.id for d, _ in coll.match("anotehr", fuzziness=1)] == ["remote"]


def test_collection_index_many(docs):
    assert docs.index_many(Document(id=f"d{i}", body=f"text number {i}", embedding=[i, 1.0])
                           for i in range(30)) == 30
    assert len(docs) == 30 and [d.id for d, _ in docs.match("text", top_k=50)].__len__() == 30
    with pytest.raises(ValidationError):
        docs.index_many([Document(id="x", embedding=[1.0]), Document(id="y", embedding=[1, 2])])
    with pytest.raises(ValidationError):
        docs.index_many([Document(id="x", embedding=[1.0, 2.0, 3.0])])
    assert "x" not in docs and "y" not in docs


def test_collection_index_many_with_an_id_twice(docs):
    assert docs.index_many([Document(id="x", body="alpha", embedding=[1.0, 0.0]),
                            Document(id="y", body="gamma"),
                            Document(id="x", body="beta", embedding=[0.0, 1.0])]) == 3
    assert [d.id for d in docs] == ["x", "y"] and docs["x"].body == "beta"
    assert docs.match("alpha") == [] and [d.id for d, _ in docs.match("beta")] == ["x"]
    assert docs["x"].embedding == [0.0, 1.0]
    assert {row[0] for row in docs._core.execute("SELECT term FROM beaver_terms")} == \
        {"beta", "gamma"}


@pytest.mark.parametrize("numpy_present", [True, False])
def test_collection_vector_cache_follows_changes(tmp_path, monkeypatch, numpy_present):
    """A searcher's cached vectors track inserts, moves and drops made by another handle."""
    import random
    monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")   # the built-in cache is under test
    if not numpy_present:
        monkeypatch.setitem(sys.modules, "numpy", None)
    rng = random.Random(3)
    path = tmp_path / "cache.db"
    with BeaverDB(path) as reader_db, BeaverDB(path) as writer_db:
        reader = reader_db.collection("v", metric="cosine")
        writer = writer_db.collection("v", metric="cosine")
        truth = {}
        for step in range(120):
            doc_id = f"d{rng.randrange(40)}"
            if doc_id in truth and rng.random() < 0.3:
                writer.drop(doc_id)
                del truth[doc_id]
            else:
                truth[doc_id] = [rng.uniform(-1, 1) for _ in range(4)]
                writer.index(Document(id=doc_id, embedding=truth[doc_id]))
            if step % 7 == 0:
                query = [rng.uniform(-1, 1) for _ in range(4)]
                got = [d.id for d, _ in reader.search(query, top_k=100)]
                assert sorted(got) == sorted(truth)
                best = min(truth, key=lambda k: 1 - sum(a * b for a, b in zip(truth[k], query))
                           / (sum(a * a for a in truth[k]) ** 0.5 * sum(b * b for b in query) ** 0.5))
                assert got[0] == best
        assert reader._vectors.version == reader_db._core.execute(
            "SELECT version FROM beaver_collections WHERE collection = 'v'").fetchone()[0]
        writer.clear()
        assert reader.search([1, 0, 0, 0]) == []


def test_collection_fts5_is_probed_not_read_from_error_text(tmp_path, monkeypatch):
    monkeypatch.setattr(beaver, "_has_fts5", lambda: False)
    with BeaverDB(tmp_path / "nofts.db") as db:
        docs = db.collection("docs")
        docs.index(beaver.Document(id="a", body="text"))
        assert "a" in docs
        with pytest.raises(beaver.FeatureUnavailable):
            docs.match("text")
    assert not raw_rows(tmp_path / "nofts.db",
                        "SELECT name FROM sqlite_master WHERE name = 'beaver_fts'")


def test_collection_without_fts5(db, monkeypatch):
    monkeypatch.setattr(db._core, "_fts_ready", False, raising=False)
    plain = db.collection("plain")
    plain.index(Document(id="a", body="still stored", embedding=[1.0]))
    assert plain["a"].body == "still stored" and plain.search([1.0])[0][0].id == "a"
    with pytest.raises(FeatureUnavailable):
        plain.match("stored")


def test_collection_alias_module_and_async(db):
    import asyncio
    from beaver.collections import CollectionManager, Document as AliasDocument
    assert AliasDocument is Document and isinstance(db.collection("x"), CollectionManager)

    async def run():
        coll = db.collection("x").as_async()
        await coll.index(Document(id="a", body="async text"))
        await coll.index(Document(id="b", body={"n": 2}, embedding=[1.0]))
        return (await coll.match("async"), await coll.find({"n": 2}), await coll.count({"n": 2}),
                await coll.search([0.0], where={"n": {"$gt": 1}}))

    hits, found, count, near = asyncio.run(run())
    assert [d.id for d, _ in hits] == ["a"] and [d.id for d in found] == ["b"] and count == 1
    assert [d.id for d, _ in near] == ["b"]


# ---- collections: transactions, options, SQLite versions, hostile queries, read-only ----

@pytest.fixture(params=["exact", "faiss"])
def backend(request, monkeypatch):
    """Run a test with beaver.py's own exact vector search and with beaver_vector (faiss)."""
    if request.param == "exact":
        monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")
    else:
        pytest.importorskip("numpy")
        pytest.importorskip("faiss")
        monkeypatch.delenv("BEAVER_VECTOR_BACKEND", raising=False)
    return request.param


def _ids(hits):
    return [hit[0].id for hit in hits]


def test_collection_search_rolled_back_leaves_no_cached_vectors(db, backend):
    docs = db.collection("v")
    docs.index(Document(id="a", embedding=[0.0, 0.0]))
    assert _ids(docs.search([0.0, 0.0])) == ["a"]
    with pytest.raises(RuntimeError):
        with db.transaction():
            docs.index(Document(id="b", embedding=[1.0, 1.0]))
            assert _ids(docs.search([0.0, 0.0])) == ["a", "b"]     # the cache sees "b" ...
            raise RuntimeError("roll back")
    docs.index(Document(id="c", embedding=[2.0, 2.0]))              # reuses the version number
    assert _ids(docs.search([0.0, 0.0])) == ["a", "c"]              # ... so "b" must be gone
    with db.transaction():
        with pytest.raises(RuntimeError):
            with db.transaction():
                docs.drop("a")
                docs.index(Document(id="e", embedding=[0.5, 0.5]))
                assert _ids(docs.search([0.0, 0.0])) == ["e", "c"]
                raise RuntimeError("roll back the savepoint only")
        docs.index(Document(id="d", embedding=[3.0, 3.0]))
        docs.index(Document(id="f", embedding=[4.0, 4.0]))
        assert _ids(docs.search([0.0, 0.0])) == ["a", "c", "d", "f"]
    assert _ids(docs.search([0.0, 0.0])) == ["a", "c", "d", "f"]


def test_collection_rolled_back_savepoint_forgets_its_dimension(db, backend):
    docs = db.collection("dims")
    with db.transaction():
        with pytest.raises(RuntimeError):
            with db.transaction():
                docs.index(Document(id="a", embedding=[1.0, 2.0, 3.0]))
                raise RuntimeError("roll back the savepoint only")
        docs.index(Document(id="b", embedding=[1.0, 2.0, 3.0, 4.0]))     # not "holds 3"
        assert _ids(docs.search([1.0, 2.0, 3.0, 4.0])) == ["b"]
    assert _ids(docs.search([1.0, 2.0, 3.0, 4.0])) == ["b"]
    with pytest.raises(ValidationError):
        docs.index(Document(id="c", embedding=[1.0, 2.0, 3.0]))


def test_collection_word_of_a_rolled_back_savepoint_reaches_the_vocabulary(db):
    docs = db.collection("words")
    with db.transaction():
        with pytest.raises(RuntimeError):
            with db.transaction():
                docs.index(Document(id="a", body="zebra"))
                raise RuntimeError("roll back the savepoint only")
        docs.index(Document(id="b", body="zebra crossing"))
    assert _ids(docs.match("zebrx", fuzziness=1)) == ["b"]
    with pytest.raises(RuntimeError):
        with db.transaction():
            docs.index(Document(id="c", body="kangaroo"))
            raise RuntimeError("roll back")
    docs.index(Document(id="d", body="kangaroo"))
    assert _ids(docs.match("kangarxo", fuzziness=1)) == ["d"]
    assert _ids(docs.match("kangxrxo", fuzziness=2)) == ["d"]


def _terms_of(db):
    return {row[0] for row in db._core.execute("SELECT term FROM beaver_terms")}


def test_collection_words_come_back_after_a_clear_in_a_transaction(db):
    """Found by the rollback state machine: a clear as the first call of a transaction read
    the collection's epoch after moving it, so the word set it kept was one epoch ahead and
    a later clear left it looking current: words indexed afterwards never reached the
    vocabulary (typo search and the trigram index missed them)."""
    docs = db.collection("words")
    docs.index(Document(id="a", body="zebra"))
    docs.clear()
    with db.transaction():
        docs.clear()
        docs.index(Document(id="a", body="zebra"))
    with db.transaction():
        docs.clear()
    docs.index(Document(id="a", body="zebra"))
    assert _terms_of(db) == {"zebra"}
    assert _ids(docs.match("zebrx", fuzziness=1)) == ["a"]


def test_collection_compact_drops_the_words_of_dropped_documents(tmp_path):
    path = tmp_path / "words.db"
    with BeaverDB(path) as db, BeaverDB(path) as other:
        docs, others = db.collection("words"), other.collection("words")
        docs.index(Document(id="a", body="zebra giraffe"))
        docs.index(Document(id="b", body="zebra"))
        others.index(Document(id="o", body="okapi"))         # its word set is in memory now
        docs.drop("a")
        docs.index(Document(id="b", body="elephant"))        # "zebra" is gone too
        others.drop("o")
        docs.compact()
        assert _terms_of(db) == {"elephant"}
        assert docs.match("giraffx", fuzziness=1) == [] and docs.match("zebrx", fuzziness=1) == []
        others.index(Document(id="c", body="zebra okapi"))   # knows they left: added again
        assert _ids(docs.match("zebrx", fuzziness=1)) == ["c"]
        assert _ids(docs.match("okapx", fuzziness=1)) == ["c"]
        assert _ids(docs.match("elephnta", fuzziness=2)) == ["b"]
        grams = db._core.execute("SELECT term FROM beaver_grams ORDER BY term").fetchall()
        assert grams == [("$elephant$",), ("$okapi$",), ("$zebra$",)]


def test_collection_clear_leaves_no_vector_index_rows(tmp_path, faiss_ok):
    with BeaverDB(tmp_path / "v.db") as db, BeaverDB(tmp_path / "v.db") as other:
        docs = db.collection("v", background=False, persist_min=1)
        docs.index_many(Document(id=f"d{i}", embedding=[float(i), 1.0]) for i in range(50))
        docs.compact()                                   # a stored base in beaver_ann_parts
        watcher = other.collection("v", background=False, persist_min=1)
        assert len(watcher.search([0.0, 1.0], top_k=100)) == 50
        docs.clear()
        count = "SELECT count(*) FROM {} WHERE collection = 'v'"
        assert db._core.execute(count.format("beaver_ann_parts")).fetchone() == (0,)
        assert db._core.execute(count.format("beaver_ann_log")).fetchone() == (1,)  # the clear
        assert watcher.search([0.0, 1.0]) == []          # another process's index follows
        docs.index(Document(id="new", embedding=[0.0, 1.0]))
        assert _ids(watcher.search([0.0, 1.0])) == ["new"]
    with BeaverDB(tmp_path / "v.db") as db:
        assert _ids(db.collection("v").search([0.0, 1.0])) == ["new"]


BAD_OPTIONS = [
    ({"index": "hnsw", "m": 0}, "'m'"), ({"m": -1}, "'m'"), ({"m": True}, "'m'"),
    ({"m": 2.5}, "'m'"), ({"m": 10 ** 30}, "'m'"), ({"fold_min": 0, "fold_fraction": 0}, "fold_min"),
    ({"build_chunk": 0}, "build_chunk"), ({"part_bytes": 0}, "part_bytes"),
    ({"index": "ivf"}, "index"), ({"ef_serach": 5}, "ef_serach"),
    ({"ef_search": float("nan")}, "ef_search"), ({"fold_fraction": float("inf")}, "fold_fraction"),
    ({"rebuild_dead": -0.1}, "rebuild_dead"), ({"background": "yes"}, "background"),
    ({"ann_threshold": "20000"}, "ann_threshold"), ({"metric": "manhattan"}, "metric"),
    ({"metric": 2}, "metric"),
]


@pytest.mark.parametrize("options,named", BAD_OPTIONS)
def test_collection_options_checked_before_anything_is_stored(db, options, named):
    with pytest.raises(ValueError, match=named):
        db.collection("c", **options)
    assert db._core.execute("SELECT count(*) FROM beaver_collections").fetchone() == (0,)
    dump = io.StringIO("\n".join(json.dumps(line) for line in [
        {"beaver_dump": 1}, {"structure": "collection", "name": "c", "count": 0,
                             "metric": options.pop("metric", None), "options": options},
        {"end": True, "structures": 1}]))
    with pytest.raises(ValueError, match=named):
        db.load(dump)
    assert db._core.execute("SELECT count(*) FROM beaver_collections").fetchone() == (0,)


def test_collection_options_in_range_work(db, faiss_ok):
    docs = db.collection("c", index="hnsw", m=2, ef_construction=1, ef_search=1, fold_min=1,
                         fold_fraction=0, build_chunk=1, part_bytes=1024, background=False)
    docs.index_many(Document(id=f"d{i}", embedding=[float(i), 1.0]) for i in range(20))
    docs.compact()
    assert _ids(docs.search([3.0, 1.0], top_k=1)) == ["d3"]
    assert db.collection("c") is docs and db.collection("c", m=2, index="hnsw") is docs


def test_collection_stored_bad_options_of_an_older_file_fall_back(tmp_path, faiss_ok):
    """A file written before options were checked may hold m=0: beaver warns and uses the
    default instead of letting faiss abort the process (checked in a child process)."""
    path = tmp_path / "old.db"
    with BeaverDB(path) as db:
        db.collection("c")
    conn = sqlite3.connect(path)
    conn.execute("""UPDATE beaver_collections SET options = '{"index": "hnsw", "m": 0}'""")
    conn.commit()
    conn.close()
    code = ("import sys, beaver; db = beaver.BeaverDB(sys.argv[1]); c = db.collection('c')\n"
            "c.index_many(beaver.Document(id=str(i), embedding=[i, 1.0]) for i in range(30))\n"
            "c.compact(); print(c.search([2.0, 1.0], top_k=1)[0][0].id); db.close()")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=MP_DEADLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2"] and "'m'" in out.stderr


def test_collection_options_are_documented():
    readme = (ROOT / "README.md").read_text()
    for name in ["metric", *beaver.VECTOR_INDEX_OPTIONS]:
        assert f"| `{name}` |" in readme, name


def test_server_refuses_bad_collection_options(api):
    r = api.put("/collections/c", json={"metric": "l2", "options": {"index": "hnsw", "m": 0}})
    assert r.status_code == 422 and "'m'" in r.text
    lines = [{"beaver_dump": 1}, {"structure": "collection", "name": "c", "count": 0,
                                  "options": {"index": "hnsw", "m": 0}},
             {"end": True, "structures": 1}]
    r = api.post("/load", content="\n".join(json.dumps(x) for x in lines).encode())
    assert r.status_code == 422 and "'m'" in r.text
    assert api.db._core.execute("SELECT count(*) FROM beaver_collections").fetchone() == (0,)


def _old_sqlite(monkeypatch, db):
    """Make ``db`` behave as on SQLite 3.31-3.33, which has FTS5 but no trigram tokenizer.

    This machine's SQLite is newer, so the old library is simulated: beaver's feature
    detection answers no, and an authorizer on this thread's connection refuses every
    statement that touches the trigram table, as "no such tokenizer: trigram" would."""
    monkeypatch.setattr(beaver, "_has_trigram", lambda: False, raising=False)

    def authorize(action, arg1, arg2, *_):
        names = (arg1 or "", arg2 or "")
        return sqlite3.SQLITE_DENY if any(n.startswith("beaver_grams") for n in names) \
            else sqlite3.SQLITE_OK
    db._core.conn().set_authorizer(authorize)


def test_collection_file_moves_from_a_newer_to_an_older_sqlite_and_back(tmp_path, monkeypatch):
    path = tmp_path / "moves.db"
    with BeaverDB(path) as db:                               # SQLite >= 3.34: grams are made
        db.collection("c").index(Document(id="a", body="elephant"))
    with BeaverDB(path) as db:
        _old_sqlite(monkeypatch, db)
        docs = db.collection("c")
        docs.index(Document(id="b", body="crocodile"))       # indexes without the trigram table
        assert _ids(docs.match("crocodlie", fuzziness=2)) == ["b"]   # 1 edit: still found
        assert docs.match("crcodlie", fuzziness=2) == []     # 2 edits need trigrams
    monkeypatch.undo()
    with BeaverDB(path) as db:                               # newer again: rebuilt once
        docs = db.collection("c")
        assert _ids(docs.match("crcodlie", fuzziness=2)) == ["b"]
        assert _ids(docs.match("elehpnat", fuzziness=2)) == ["a"]
        grams = db._core.execute("SELECT term FROM beaver_grams ORDER BY term").fetchall()
        assert grams == [("$crocodile$",), ("$elephant$",)]


def test_collection_file_made_on_an_older_sqlite_gets_its_trigram_index(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    with BeaverDB(path) as db:
        _old_sqlite(monkeypatch, db)
        docs = db.collection("c")
        docs.index_many([Document(id="a", body="elephant"), Document(id="b", body="giraffe")])
        assert _ids(docs.match("elephnat", fuzziness=2)) == ["a"]
    assert raw_rows(path, "SELECT name FROM sqlite_master WHERE name = 'beaver_grams'") == []
    monkeypatch.undo()
    with BeaverDB(path) as db:
        docs = db.collection("c")
        assert _ids(docs.match("elehpnat", fuzziness=2)) == ["a"]
        assert _ids(docs.match("girfafe", fuzziness=2)) == ["b"]


def test_collection_long_queries_are_bounded(docs):
    docs.index(Document(id="a", body="alpha beta gamma"))
    with pytest.raises(ValueError, match="characters"):
        docs.match("a " * 100_000)
    with pytest.raises(ValueError, match="characters"):
        docs.match("a " * 100_000, raw=True)
    many = " ".join(f"w{i}" for i in range(beaver.MATCH_MAX_TERMS + 1))
    for fuzziness in (0, 1):
        with pytest.raises(ValueError, match="terms"):
            docs.match(many, fuzziness=fuzziness)
    with pytest.raises(ValueError, match="terms"):
        docs.match(many, raw=True)
    assert _ids(docs.match("alpha " * 1600)) == ["a"]             # repeats count once
    assert _ids(docs.match("alpha " * 800 + "-delta " * 600, fuzziness=1)) == ["a"]
    fits = " ".join(["alpha"] + [f"w{i}" for i in range(beaver.MATCH_MAX_TERMS - 1)])
    assert docs.match(fits) == [] and docs.match(fits.replace(" ", " OR "))


@pytest.mark.parametrize("query,expected", [
    ("alpha\x00beta", ["a"]), ("\x00alpha", ["a"]), ("alp\x00", []), ("\x00", []),
    ("alpha\ud800", ["a"]), ("\udcffbeta", ["a"]), ("\ud800", []), ('"alpha\x00beta"', ["a"]),
])
def test_collection_nul_and_lone_surrogates_in_queries(docs, query, expected):
    docs.index(Document(id="a", body="alpha beta"))
    for fuzziness in (0, 1, 2):
        assert _ids(docs.match(query, fuzziness=fuzziness)) == expected
    assert _ids(docs.match(query, highlight=True)) == expected
    if docs._core.engine == "sqlite":      # raw queries are FTS5 syntax (tsquery on PostgreSQL)
        assert _ids(docs.match(query.replace('"', ""), raw=True)) == expected


def _read_collection(path, done, found):
    """Open an existing collection and search it (run in a thread under a held write lock)."""
    with BeaverDB(path, timeout=MP_DEADLINE) as db:
        docs = db.collection("c")
        found += [_ids(docs.match("readable")), _ids(docs.match("readabel", fuzziness=1)),
                  _ids(docs.search([1.0, 0.0])), len(docs), docs.metric]
    done.set()


def test_collection_open_and_search_need_no_write_lock(tmp_path, backend):
    path = tmp_path / "locked.db"
    with BeaverDB(path) as db:
        docs = db.collection("c", metric="cosine")
        docs.index(Document(id="a", body="readable text", embedding=[1.0, 0.0]))
        docs.search([1.0, 0.0])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")                  # another process is writing
    blocker.execute("INSERT INTO beaver_meta VALUES ('busy', 'yes')")
    try:
        done, found = threading.Event(), []
        threading.Thread(target=_read_collection, args=(path, done, found), daemon=True).start()
        assert done.wait(MP_DEADLINE / 2), "opening a collection waited for the write lock"
        assert found == [["a"], ["a"], ["a"], 1, "cosine"]
        with BeaverDB(path, timeout=0.2) as db:         # creating one does write
            with _busy_after(0.2):
                db.collection("new")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def _unprivileged():
    """(user, python) that runs a child without root's rights (root reads a 0444 file)."""
    if not hasattr(os, "geteuid"):
        pytest.skip("needs POSIX users")
    if os.geteuid() != 0:
        return None, sys.executable
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            if subprocess.run([python, "-c", "import sqlite3"], user="nobody",
                              capture_output=True, timeout=MP_DEADLINE).returncode == 0:
                return "nobody", python
        except (OSError, subprocess.SubprocessError):
            continue
    pytest.skip("no Python that user nobody may run")


READ_ONLY_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import beaver
with beaver.BeaverDB(sys.argv[2]) as db:
    docs = db.collection("c")
    ids = lambda hits: [hit[0].id for hit in hits]
    print(json.dumps([ids(docs.match("readable")), ids(docs.match("readabel", fuzziness=1)),
                      ids(docs.search([1.0, 0.0])), len(docs), docs.metric]))
"""


def test_collection_search_a_read_only_file(monkeypatch):
    """A 0444 database file (in a folder where SQLite may make its -wal and -shm files)
    is searched by a process without the right to write it: beaver.py alone, copied."""
    user, python = _unprivileged()
    monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")
    folder = tempfile.mkdtemp(prefix="beaver-read-only-")
    try:
        os.chmod(folder, 0o777)
        shutil.copy(ROOT / "beaver.py", folder)
        path = os.path.join(folder, "ro.db")
        with BeaverDB(path) as db:
            db.collection("c", metric="ip").index(
                Document(id="a", body="readable text", embedding=[1.0, 0.0]))
        os.chmod(path, 0o444)
        out = subprocess.run([python, "-c", READ_ONLY_CHILD, folder, path], user=user,
                             capture_output=True, text=True, timeout=MP_DEADLINE,
                             env={"BEAVER_VECTOR_BACKEND": "exact", "PATH": os.defpath})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == [["a"], ["a"], ["a"], 1, "ip"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class CollectionTransactionMachine(RuleBasedStateMachine):
    """Collections under nested transactions that randomly roll back.

    Checked after every step against a pure-Python model (documents, words, vectors, edges,
    the dimension), and at depth 0 against a fresh ``BeaverDB`` opened on the same file: every
    in-memory cache (dimension, vocabulary, exact vectors, faiss delta) must follow rollbacks.
    """
    # words pairwise far apart, so that a typo of one can only be that one
    WORDS = ["zebra", "mango", "kettle", "orbital", "lantern", "quartz", "violin"]
    IDS = ["a", "b", "c", "d"]
    backend = "exact"
    options: dict = {}

    def __init__(self):
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="beaver-machine-")
        self.path = os.path.join(self.folder, "machine.db")
        self.env = os.environ.get("BEAVER_VECTOR_BACKEND")
        if self.backend == "exact":
            os.environ["BEAVER_VECTOR_BACKEND"] = "exact"
        else:
            os.environ.pop("BEAVER_VECTOR_BACKEND", None)
        self.db = BeaverDB(self.path)
        self.docs = self.db.collection("c", **self.options)
        self.levels, self.saved = [], []
        self.model = {"docs": {}, "edges": set(), "dim": None}

    def teardown(self):
        while self.levels:
            self.levels.pop().__exit__(RuntimeError, RuntimeError("teardown"), None)
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.env is None:
            os.environ.pop("BEAVER_VECTOR_BACKEND", None)
        else:
            os.environ["BEAVER_VECTOR_BACKEND"] = self.env

    # -- transactions -----------------------------------------------------------------

    @precondition(lambda self: len(self.levels) < 3)
    @rule()
    def begin(self):
        level = self.db.transaction()
        level.__enter__()
        self.levels.append(level)
        self.saved.append(copy.deepcopy(self.model))

    @precondition(lambda self: self.levels)
    @rule()
    def commit(self):
        self.saved.pop()
        self.levels.pop().__exit__(None, None, None)

    @precondition(lambda self: self.levels)
    @rule()
    def roll_back(self):
        self.model = self.saved.pop()
        error = RuntimeError("roll back")
        assert self.levels.pop().__exit__(RuntimeError, error, None) is False

    # -- writes -----------------------------------------------------------------------

    @rule(doc_id=st.sampled_from(IDS), words=st.lists(st.sampled_from(WORDS), max_size=3),
          dim=st.sampled_from([None, 2, 3, 4]), data=st.data())
    def index(self, doc_id, words, dim, data):
        vector = None if dim is None else data.draw(
            st.lists(st.integers(-3, 3), min_size=dim, max_size=dim))
        document = Document(id=doc_id, body=" ".join(words), embedding=vector)
        known = self.model["dim"]
        if dim is not None and known is not None and dim != known:
            with pytest.raises(ValidationError):
                self.docs.index(document)
            return
        self.docs.index(document)
        self.model["docs"][doc_id] = (document.body, set(words), vector)
        self.model["dim"] = known or dim

    @rule(doc_id=st.sampled_from(IDS))
    def drop(self, doc_id):
        if doc_id not in self.model["docs"]:
            with pytest.raises(KeyError):
                self.docs.drop(doc_id)
            return
        self.docs.drop(doc_id)
        del self.model["docs"][doc_id]
        self.model["edges"] = {e for e in self.model["edges"] if doc_id not in (e[0], e[2])}

    @rule(source=st.sampled_from(IDS), to=st.sampled_from(IDS), label=st.sampled_from("xy"))
    def connect(self, source, to, label):
        if not {source, to} <= set(self.model["docs"]):
            with pytest.raises(KeyError):
                self.docs.connect(source, to, label)
            return
        self.docs.connect(source, to, label)
        self.model["edges"].add((source, label, to))

    @rule()
    def clear(self):
        self.docs.clear()
        self.model["docs"], self.model["edges"] = {}, set()

    @precondition(lambda self: not self.levels)
    @rule()
    def compact(self):
        self.docs.compact()                      # also drops the words no document holds
        terms = {row[0] for row in self.db._core.execute("SELECT term FROM beaver_terms")}
        assert terms == set().union(*(w for _, w, _ in self.model["docs"].values()))

    # -- reads ------------------------------------------------------------------------

    @staticmethod
    def _typo(word, edits):
        """``word`` with ``edits`` letters replaced by 'x' (far from every other word)."""
        for at in (1, 3)[:edits]:
            word = word[:at] + "x" + word[at + 1:]
        return word

    @rule(word=st.sampled_from(WORDS), fuzziness=st.sampled_from([0, 1, 2]))
    def match(self, word, fuzziness):
        self.check_match(self.docs, word, fuzziness)

    def check_match(self, docs, word, fuzziness):
        edits = min(fuzziness, 2 if len(word) >= 7 else 1)
        hits = docs.match(self._typo(word, edits), fuzziness=fuzziness, top_k=100)
        expected = {i for i, (_, words, _) in self.model["docs"].items() if word in words}
        assert {doc.id for doc, _ in hits} == expected and len(hits) == len(expected)

    @rule(data=st.data())
    def search(self, data):
        dim = self.model["dim"] or 2
        query = data.draw(st.lists(st.integers(-3, 3), min_size=dim, max_size=dim))
        self.check_search(self.docs, query)

    def check_search(self, docs, query):
        hits = docs.search(query, top_k=100)
        vectors = {i: v for i, (_, _, v) in self.model["docs"].items() if v is not None}
        assert {doc.id for doc, _ in hits} == set(vectors)
        for doc, distance in hits:
            exact = sum((a - b) ** 2 for a, b in zip(vectors[doc.id], query)) ** 0.5
            assert distance == pytest.approx(exact, abs=1e-4)

    @invariant()
    def documents_match_the_model(self):
        self.check_documents(self.docs)

    def check_documents(self, docs):
        assert {doc.id: (doc.body, doc.embedding) for doc in docs} == {
            i: (body, None if v is None else [float(x) for x in v])
            for i, (body, _, v) in self.model["docs"].items()}

    @precondition(lambda self: not self.levels)
    @rule()
    def reopen(self):
        """A fresh database on the same file sees exactly what the model holds."""
        with BeaverDB(self.path) as fresh:
            docs = fresh.collection("c")
            self.check_documents(docs)
            edges = {(e.source, e.label, e.target) for i in self.model["docs"]
                     for e in docs.edges(i)}
            assert edges == self.model["edges"]
            terms = {row[0] for row in fresh._core.execute(
                "SELECT term FROM beaver_terms t JOIN beaver_collections c ON c.cid = t.cid "
                "WHERE c.collection = 'c'")}
            assert terms >= set().union(*(w for _, w, _ in self.model["docs"].values()))
            for word in self.WORDS[::3]:
                self.check_match(docs, word, 2)
            if self.model["dim"]:
                self.check_search(docs, [1] * self.model["dim"])
                self.check_search(self.docs, [1] * self.model["dim"])


class CollectionTransactionMachineFaiss(CollectionTransactionMachine):
    backend = "faiss"
    options = {"fold_min": 2, "background": False, "persist_min": 1}


MACHINE_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=40, stateful_step_count=40)
TestCollectionTransactions = CollectionTransactionMachine.TestCase
TestCollectionTransactions.settings = MACHINE_SETTINGS


@pytest.fixture
def _faiss_machine():
    pytest.importorskip("numpy")
    pytest.importorskip("faiss")


@pytest.mark.usefixtures("_faiss_machine")
class TestCollectionTransactionsFaiss(CollectionTransactionMachineFaiss.TestCase):
    settings = MACHINE_SETTINGS


# ---- collections: queries (find, count, explain, where= on match and search) ----

@contextlib.contextmanager
def vector_backend(name):
    """``BEAVER_VECTOR_BACKEND`` set for a block (hypothesis tests cannot use monkeypatch)."""
    if name == "faiss":
        pytest.importorskip("numpy")
        pytest.importorskip("faiss")
    before = os.environ.get("BEAVER_VECTOR_BACKEND")
    os.environ["BEAVER_VECTOR_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["BEAVER_VECTOR_BACKEND"]
        else:
            os.environ["BEAVER_VECTOR_BACKEND"] = before


def collection_twins(db, bodies):
    """``indexed_twins`` of collections holding ``bodies`` as documents k00, k01...: each
    with the embedding [i, 1] (so the query [-1, 1] ranks them in order) and, for dict
    bodies, the text "common words" to match; and the (id, body) pairs."""
    plain, indexed = indexed_twins(db, "collection")
    pairs = [(f"k{i:02d}", {**body, "t": "common words"} if isinstance(body, dict) else body)
             for i, body in enumerate(bodies)]
    for coll in (plain, indexed):
        coll.index_many(Document(id=key, body=body, embedding=[float(i), 1.0])
                        for i, (key, body) in enumerate(pairs))
    return plain, indexed, pairs


def scored(hits):
    return sorted(((doc.id, score) for doc, score, *_ in hits), key=lambda h: (-h[1], h[0]))


@pytest.mark.parametrize("backend_name", ["exact", "faiss"])
@QUERY_SETTINGS
@given(bodies=st.lists(q_docs, max_size=12), filters=st.lists(q_filters, min_size=1, max_size=4))
def test_collection_queries_match_the_oracle(backend_name, bodies, filters):
    """find, count, and where= on match (plain and fuzzy) and search, with and without field
    indexes, on both vector backends, against the pure-Python evaluator of the filter."""
    with vector_backend(backend_name), BeaverDB(":memory:") as db:
        plain, indexed, pairs = collection_twins(db, bodies)
        everything = {(q, f): scored(plain.match(q, top_k=50, fuzziness=f))
                      for q, f in (("common", 0), ("comon", 1))}
        for where in filters:
            expected = [(k, body) for k, body in pairs if oracle_match(where, body)]
            ids = {k for k, _ in expected}
            for coll in (plain, indexed):
                assert [(d.id, d.body) for d in coll.find(where)] == expected, where
                assert coll.count(where) == len(expected)
                assert [d.id for d, _ in coll.search([-1.0, 1.0], top_k=50, where=where)] == \
                    [k for k, _ in expected]
                for (query, fuzziness), hits in everything.items():
                    got = scored(coll.match(query, top_k=50, fuzziness=fuzziness, where=where))
                    assert got == [h for h in hits if h[0] in ids], (query, where)


@QUERY_SETTINGS
@given(bodies=st.lists(q_docs, max_size=12), where=q_filters, order_by=q_order_by,
       limit=st.none() | st.integers(0, 5), offset=st.integers(0, 4))
def test_collection_find_order_and_paging_match_the_oracle(bodies, where, order_by, limit,
                                                            offset):
    with vector_backend("exact"), BeaverDB(":memory:") as db:
        plain, indexed, pairs = collection_twins(db, bodies)
        ordered = oracle_sorted([(k, d) for k, d in pairs if oracle_match(where, d)], order_by)
        expected = ordered[offset:None if limit is None else offset + limit]
        for coll in (plain, indexed):
            got = coll.find(where, order_by=order_by, limit=limit, offset=offset)
            assert [(d.id, d.body) for d in got] == expected


def test_collection_find_count_and_explain(db):
    notes = db.collection("notes")
    notes.index_many([
        Document(id="n1", body={"year": 2024, "tags": ["work", "ai"], "author": {"name": "Ada"}}),
        Document(id="n2", body={"year": 2019, "tags": ["home"], "author": {"name": "Bob"}}),
        Document(id="n3", body={"year": 2022, "tags": ["work"]}, embedding=[1.0, 0.0]),
        Document(id="n4", body={"year": "2023", "tags": ["work"]}),
        Document(id="s", body="a string body has no fields"), Document(id="none")])
    where = {"year": {"$gte": 2020}, "tags": {"$contains": "work"}}
    assert [d.id for d in notes.find(where)] == ["n1", "n3"]
    assert notes.find({"year": 2022})[0].embedding == [1.0, 0.0]       # documents whole
    assert [d.id for d in notes.find(order_by="-year", limit=3)] == ["n4", "n1", "n3"]
    assert [d.id for d in notes.find(offset=4)] == ["none", "s"]        # id order
    assert notes.count() == len(notes) == 6 and notes.count(where) == 2
    assert notes.count({"year": {"$exists": False}}) == 2               # "s" and "none"
    assert [d.id for d in notes.find({"$not": {"year": {"$exists": True}}})] == ["none", "s"]
    assert notes.find({"author.name": "Ada"})[0].id == "n1"
    assert notes.explain(where)["index"] is None
    notes.create_index("year")
    assert notes.indexes() == ["year"]
    if db._core.engine == "sqlite":     # PostgreSQL's planner picks its own on six rows
        plan = notes.explain(where)
        assert plan["index"] == "year" and any("beaver_fx_" in line for line in plan["plan"])
    assert notes.explain(order_by="year")["index"] == "year"
    assert [d.id for d in notes.find(where)] == ["n1", "n3"]
    notes.clear()
    assert notes.indexes() == ["year"] and notes.find(where) == []
    assert db.dict("notes").indexes() == []                             # per kind and name
    assert notes.drop_index("year") is True and notes.indexes() == []


def test_collection_filters_on_model_bodies(db):
    people = db.collection("people", model=Person)
    people.index(Document(id="ada", body=Person(name="Ada", age=36, tags=["admin"],
                                                address=Address(city="London"))))
    people.index(Document(id="bob", body=Person(name="Bob", age=25,
                                                address=Address(city="Paris"))))
    people.create_index("address.city")
    found = people.find({"address.city": "London"})
    assert [d.id for d in found] == ["ada"] and found[0].body.name == "Ada"
    assert people.count({"tags": {"$contains": "admin"}, "age": {"$gt": 30}}) == 1
    assert [d.id for d in people.find(order_by="-age")] == ["ada", "bob"]
    if db._core.engine == "sqlite":     # PostgreSQL's planner picks its own on two rows
        assert people.explain(where={"address.city": "Paris"})["index"] == "address.city"
    assert [d.id for d, _ in people.match("Bob", where={"age": 25})] == ["bob"]


def test_collection_where_semantics_follow_json_types(db):
    """The filter language replaces the old equality-only where= of search(): None is an
    explicit null (not a missing field), True is not 1, 1 equals 1.0, dotted paths work."""
    docs = db.collection("types")
    bodies = {"null": {"x": None}, "missing": {}, "one": {"x": 1}, "float": {"x": 1.0},
              "true": {"x": True}, "text": {"x": "1"}, "deep": {"g": {"even": True}}}
    for i, (key, body) in enumerate(bodies.items()):
        docs.index(Document(id=key, body=body, embedding=[float(i), 0.0]))
    near = lambda where: sorted(d.id for d, _ in docs.search([0.0, 0.0], where=where))  # noqa
    assert near({"x": None}) == ["null"]
    assert near({"x": {"$exists": False}}) == ["deep", "missing"]
    assert near({"x": True}) == ["true"] and near({"x": 1}) == ["float", "one"]
    assert near({"x": ["1", None]}) == ["null", "text"]                 # a bare list: $in
    assert near({"g.even": True}) == ["deep"]


@pytest.mark.parametrize("where", [{"x": {"$regex": "a"}}, {"x": {"$gt": None}}, {"$or": []},
                                   {"a..b": 1}, {"x": float("nan")}, [("x", 1)]])
def test_collection_malformed_filters_raise_before_any_sql(db, where):
    docs = db.collection("docs")
    docs.index(Document(id="a", body={"x": "text"}, embedding=[1.0]))
    statements = []
    db._core.conn().set_trace_callback(statements.append)
    try:
        for call in (lambda: docs.find(where), lambda: docs.count(where),
                     lambda: docs.explain(where), lambda: docs.match("text", where=where),
                     lambda: docs.match("txt", fuzziness=1, where=where),
                     lambda: docs.search([1.0], where=where)):
            with pytest.raises(beaver.ValidationError):
                call()
    finally:
        db._core.conn().set_trace_callback(None)
    assert statements == []


def test_collection_filtered_search_follows_every_change(db, backend):
    """The allowed ids of a filter are kept for the collection's version: a change to any
    document (a body, a drop, a clear, a document without a vector) is seen at once."""
    docs = db.collection("v")
    for i in range(6):
        docs.index(Document(id=f"d{i}", body={"ok": i % 2 == 0}, embedding=[float(i), 0.0]))
    ok = {"ok": True}
    assert _ids(docs.search([0.0, 0.0], where=ok)) == ["d0", "d2", "d4"]
    docs.index(Document(id="d0", body={"ok": False}, embedding=[0.0, 0.0]))   # same vector
    assert _ids(docs.search([0.0, 0.0], where=ok)) == ["d2", "d4"]
    docs.index(Document(id="d1", body={"ok": True}, embedding=[1.0, 0.0]))
    docs.drop("d4")
    docs.index(Document(id="t", body={"ok": True}))                          # no vector
    assert _ids(docs.search([0.0, 0.0], where=ok)) == ["d1", "d2"]
    assert _ids(docs.search([0.0, 0.0], where=ok)) == ["d1", "d2"]           # kept
    with pytest.raises(RuntimeError):
        with db.transaction():
            docs.index(Document(id="d5", body={"ok": True}, embedding=[5.0, 0.0]))
            docs.index(Document(id="d9", body={"ok": True}, embedding=[0.5, 0.0]))
            assert _ids(docs.search([0.0, 0.0], where=ok)) == ["d9", "d1", "d2", "d5"]
            raise RuntimeError("roll back")
    docs.index(Document(id="d3", body={"ok": True}, embedding=[3.0, 0.0]))   # the same version
    assert _ids(docs.search([0.0, 0.0], where=ok)) == ["d1", "d2", "d3"]
    docs.clear()
    assert docs.search([0.0, 0.0], where=ok) == []
    docs.index(Document(id="back", body={"ok": True}, embedding=[1.0, 1.0]))
    assert _ids(docs.search([0.0, 0.0], where=ok)) == ["back"]


@pytest.mark.parametrize("backend_name", ["exact", "faiss"])
@QUERY_SETTINGS
@given(steps=st.lists(st.tuples(st.integers(0, 9), q_docs | st.none(), st.booleans()),
                      max_size=20),
       filters=st.lists(q_filters, min_size=1, max_size=3))
def test_collection_kept_filters_follow_writes_like_the_oracle(backend_name, steps, filters):
    """A filter's allowed ids are kept, then patched from the change log after each write:
    searches after any sequence of writes (with and without vectors, drops) answer as the
    oracle does."""
    with vector_backend(backend_name), BeaverDB(":memory:") as db:
        docs, state = db.collection("c"), {}
        for n, body, with_vector in steps:
            key = f"k{n}"
            if body is None:
                if state.pop(key, None) is not None:
                    docs.drop(key)
            else:
                docs.index(Document(id=key, body=body,
                                    embedding=[float(n), 1.0] if with_vector else None))
                state[key] = (body, with_vector)
            for where in filters:
                expected = sorted(k for k, (b, v) in state.items() if v and oracle_match(where, b))
                got = [d.id for d, _ in docs.search([-1.0, 1.0], top_k=20, where=where)]
                assert got == expected, where


def test_collection_kept_filter_is_patched_after_a_write(db):
    docs = db.collection("v")
    docs.index_many(Document(id=f"d{i}", body={"n": i}, embedding=[float(i), 0.0])
                    for i in range(50))
    where = {"n": {"$lt": 10}}
    assert len(docs.search([0.0, 0.0], top_k=100, where=where)) == 10
    docs.index(Document(id="d3", body={"n": 30}, embedding=[3.0, 0.0]))
    docs.index(Document(id="new", body={"n": 1}))                       # no vector
    statements = []
    db._core.conn().set_trace_callback(statements.append)
    try:
        assert len(docs.search([0.0, 0.0], top_k=100, where=where)) == 9
    finally:
        db._core.conn().set_trace_callback(None)
    assert not any("group_concat" in s for s in statements)             # patched, not read
    assert sum("beaver_vector_log" in s for s in statements) == 1
    docs.clear()                                                        # the log is emptied
    docs.index(Document(id="x", body={"n": 1}, embedding=[1.0, 0.0]))
    assert _ids(docs.search([0.0, 0.0], where=where)) == ["x"]


BASE_FILTERS = [{"n": {"$lt": 2}}, {"n": {"$in": [1, 3]}}, {"$not": {"n": 4}}, {"n": 9}]


@QUERY_SETTINGS
@given(steps=st.lists(st.tuples(st.sampled_from(["index", "no vector", "drop", "rolled back"]),
                                st.integers(0, 29), st.integers(0, 4)), max_size=15),
       where=st.sampled_from(BASE_FILTERS), top_k=st.sampled_from([3, 30]))
def test_collection_filtered_search_on_a_built_base_follows_writes_like_the_oracle(steps, where,
                                                                                 top_k):
    """A filter kept over a stored (faiss) base, brought forward after each write (a new
    body and vector, a body without a vector, a drop, a rolled back write): the answer is
    the brute-force one, in order."""
    with vector_backend("faiss"), BeaverDB(":memory:") as db:
        docs = db.collection("c", background=False)
        state = {f"d{i}": ({"n": i % 5}, float(i)) for i in range(30)}
        docs.index_many(Document(id=k, body=b, embedding=[x, 1.0]) for k, (b, x) in state.items())
        docs.compact()
        q = [12.3141, 1.0]

        def agrees():
            want = sorted((abs(x - q[0]), k) for k, (b, x) in state.items()
                          if x is not None and oracle_match(where, b))
            assert _ids(docs.search(q, top_k=top_k, where=where)) == [k for _, k in want][:top_k]
        agrees()
        for op, i, n in steps:
            key, body, x = f"d{i}", {"n": n}, i + n / 10
            if op == "drop":
                if state.pop(key, None) is not None:
                    docs.drop(key)
            elif op == "rolled back":
                with pytest.raises(RuntimeError), db.transaction():
                    docs.index(Document(id=key, body=body, embedding=[x, 1.0]))
                    raise RuntimeError("roll back")
            else:
                x = x if op == "index" else None
                docs.index(Document(id=key, body=body, embedding=None if x is None else [x, 1.0]))
                state[key] = (body, x)
            agrees()


def test_collection_kept_filter_is_brought_forward_on_the_base(db, faiss_ok, monkeypatch):
    """After the first search of a filter, writes never make the index test every label of
    its base again: a write that changes nothing for the filter keeps the same allowed set
    (and labels); one that does is applied to the labels of the changed rowids only."""
    docs = db.collection("v", background=False)
    docs.index_many(Document(id=f"d{i}", body={"n": i % 10}, embedding=[float(i), 1.0])
                    for i in range(200))
    docs.compact()
    where, q = {"n": {"$lt": 5}}, [20.2, 1.0]
    assert _ids(docs.search(q, top_k=3, where=where)) == ["d20", "d21", "d22"]
    kept, base = docs._allowed(docs._check(where)), docs._backend._base
    among = base.among(kept)
    sizes, test = [], beaver._Allowed.test
    monkeypatch.setattr(beaver._Allowed, "test",
                        lambda self, rowids: sizes.append(len(rowids)) or test(self, rowids))
    docs.index(Document(id="note", body={"n": 1}))                  # in, no vector
    patched = docs._allowed(docs._check(where))
    assert patched is not kept and patched.parent() is kept
    assert _ids(docs.search(q, top_k=3, where=where)) == ["d20", "d21", "d22"]
    assert base.among(patched) is among                             # no label changed
    docs.index(Document(id="note", body={"n": 2}))                  # still in: nothing changes
    assert docs._allowed(docs._check(where)) is patched
    docs.drop("d21")                                                # a label dies
    docs.index(Document(id="d20", body={"n": 9}, embedding=[20.0, 1.0]))     # leaves
    docs.index(Document(id="d29", body={"n": 0}, embedding=[20.3, 1.0]))     # moves, joins
    assert _ids(docs.search(q, top_k=3, where=where)) == ["d29", "d22", "d23"]
    assert len(docs._backend._base.rowids) == 200 and 200 not in sizes


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_collection_first_search_of_a_broad_filter_checks_candidates_only(db, faiss_ok,
                                                                         monkeypatch, kind):
    """The first search with a filter letting many documents through checks the nearest
    candidates of an unfiltered search, by rowid, without reading the filter whole; it is
    read (and kept) at its second search, or at once when few pass a sample, or too few
    candidates do. Every answer is the brute-force one (exact on both: few vectors)."""
    import beaver_vector
    monkeypatch.setattr(beaver_vector, "POST_FILTER_MIN", 0)
    docs = db.collection("v", index=kind, background=False)
    docs.index_many(Document(id=f"d{i:03d}", body={"n": i % 10, "i": i},
                             embedding=[float(i), 1.0]) for i in range(300))
    docs.compact()
    docs.index(Document(id="new", body={"n": 0}, embedding=[140.45, 1.0]))   # the delta
    docs.drop("d141")                                                         # a dead label
    bodies = {d.id: (d.body, d.embedding[0]) for d in docs.find() if d.embedding}
    post = []
    checked = beaver_vector.VectorIndex._post_filtered
    monkeypatch.setattr(beaver_vector.VectorIndex, "_post_filtered",
                        lambda *a: post.append(checked(*a)) or post[-1])
    statements = []
    db._core.conn().set_trace_callback(statements.append)
    for where, first_by_candidates in (
            ({"n": {"$lt": 6}}, True), ({"n": {"$ne": 3}}, True),
            ({"i": 42}, False), ({"n": {"$gt": 99}}, False),    # few pass the sample
            ({"i": {"$lt": 100}}, False)):                      # none of the candidates
        want = sorted((abs(x - 140.2), k) for k, (b, x) in bodies.items()
                      if oracle_match(where, b))[:5]
        reads = 0
        for search in range(3):
            post.clear(), statements.clear()
            got = docs.search([140.2, 1.0], top_k=5, where=where)
            assert _ids(got) == [k for _, k in want], (where, search)
            by_candidates = bool(post) and post[0] is not None
            assert by_candidates == (first_by_candidates and search == 0)
            read = any("group_concat(d.id) FROM beaver_documents d WHERE" in s
                       for s in statements)
            assert not (read and by_candidates)
            reads += read
        assert reads == 1                           # then kept
    db._core.conn().set_trace_callback(None)
    with db.transaction():                          # inside one: read whole, own writes seen
        docs.index(Document(id="mine", body={"n": 1}, embedding=[140.2, 1.0]))
        assert _ids(docs.search([140.2, 1.0], top_k=1, where={"n": {"$lt": 7}})) == ["mine"]
    assert post == []


def test_collection_first_search_by_candidates_never_skips_nearer_base_rows(db, faiss_ok,
                                                                          monkeypatch):
    """The delta's vectors are all candidates, however far: one that passes the filter may
    not stand in for nearer allowed rows of the base that were beyond its candidates."""
    import beaver_vector
    monkeypatch.setattr(beaver_vector, "POST_FILTER_MIN", 0)
    docs = db.collection("v", index="flat", background=False)
    docs.index_many(Document(id=f"d{i:03d}", body={"n": 9 if 100 <= i < 200 else 0},
                             embedding=[float(i), 1.0]) for i in range(300))
    docs.compact()
    docs.index_many(Document(id=f"far{j}", body={"n": 0}, embedding=[1000.0 + j, 1.0])
                    for j in range(5))
    got = _ids(docs.search([150.3, 1.0], top_k=5, where={"n": 0}))
    assert got == ["d200", "d201", "d099", "d202", "d098"]


@QUERY_SETTINGS
@given(blocks=st.lists(st.integers(0, 4), min_size=5, max_size=10),
       delta=st.lists(st.tuples(st.floats(-10, 90), st.integers(0, 4)), min_size=1,
                      max_size=8),
       drops=st.sets(st.integers(0, 39), max_size=10), q=st.floats(-5, 85),
       top_k=st.sampled_from([1, 2, 3, 10]), where=st.sampled_from(BASE_FILTERS))
def test_collection_first_search_by_candidates_matches_the_oracle(blocks, delta, drops, q,
                                                                  top_k, where):
    """First searches of filters over a flat base with a delta and dead labels, answered
    from candidates wherever the sample allows: exactly the brute-force answer. Neighbours
    share their field (blocks of 8), as they often do: the nearest candidates may all fail."""
    import beaver_vector
    saved, beaver_vector.POST_FILTER_MIN = beaver_vector.POST_FILTER_MIN, 0
    try:
        with vector_backend("faiss"), BeaverDB(":memory:") as db:
            docs = db.collection("c", index="flat", background=False)
            state = {f"b{i}": ({"n": blocks[i // 8]}, float(i)) for i in range(8 * len(blocks))}
            docs.index_many(Document(id=k, body=b, embedding=[x, 1.0])
                            for k, (b, x) in state.items())
            docs.compact()
            for j, (x, n) in enumerate(delta):
                state[f"e{j}"] = ({"n": n}, x + 0.001 * j + 0.0005)
                docs.index(Document(id=f"e{j}", body={"n": n},
                                    embedding=[state[f"e{j}"][1], 1.0]))
            for i in drops:
                docs.drop(f"b{i}")
                state.pop(f"b{i}")
            query = q + 0.000123
            want = sorted((abs(x - query), k) for k, (b, x) in state.items()
                          if oracle_match(where, b))[:top_k]
            got = docs.search([query, 1.0], top_k=top_k, where=where)
            assert _ids(got) == [k for _, k in want]
    finally:
        beaver_vector.POST_FILTER_MIN = saved


def _flip_documents(path, name):
    with BeaverDB(path) as db:
        docs = db.collection(name)
        with db.transaction():
            for i in range(0, 40, 2):
                docs.index(Document(id=f"d{i}", body={"ok": False}, embedding=[float(i), 0.0]))
            docs.drop("d1")


def test_collection_filtered_search_sees_other_processes(tmp_path, backend):
    path = tmp_path / "shared.db"
    with BeaverDB(path) as db:
        docs = db.collection("v")
        docs.index_many(Document(id=f"d{i}", body={"ok": True}, embedding=[float(i), 0.0])
                        for i in range(40))
        assert len(docs.search([0.0, 0.0], top_k=100, where={"ok": True})) == 40
        child = multiprocessing.get_context("spawn").Process(target=_flip_documents,
                                                             args=(str(path), "v"))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert _ids(docs.search([0.0, 0.0], top_k=100, where={"ok": True})) == \
            [f"d{i}" for i in range(3, 40, 2)]


def test_collection_filtered_search_without_numpy(docs, monkeypatch):
    monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")
    monkeypatch.setitem(sys.modules, "numpy", None)
    for i in range(20):
        docs.index(Document(id=f"d{i:02d}", body={"n": i}, embedding=[float(i), 1.0]))
    hits = docs.search([4.2, 1.0], top_k=3, where={"n": {"$gte": 6}})
    assert [d.id for d, _ in hits] == ["d06", "d07", "d08"]
    assert docs.search([4.2, 1.0], where={"n": 99}) == []


def test_collection_filtered_search_returns_only_matching_documents(db, backend, monkeypatch):
    """A writer changing a document between the choice of the nearest ids and the fetch of
    the documents: the fetch checks the filter again."""
    docs = db.collection("race")
    for i in range(5):
        docs.index(Document(id=f"d{i}", body={"ok": True}, embedding=[float(i), 0.0]))
    search = docs._vecs.search

    def racing(query, top_k, allowed=None):
        hits = search(query, top_k, allowed)
        with BeaverDB(db.path) as other:
            other.collection("race").index(Document(id="d0", body={"ok": False},
                                                    embedding=[0.0, 0.0]))
        return hits
    monkeypatch.setattr(docs._vecs, "search", racing)
    assert _ids(docs.search([0.0, 0.0], top_k=2, where={"ok": True})) == ["d1"]


# ---- vectors (beaver_vector: the faiss index) ----
# The collections run on beaver_vector whenever numpy and faiss import; these tests check it
# against brute force, across reopen, processes and a crash mid-compaction.

class _VecCollection:
    """A collection with vectors, with helpers to reach its faiss index and its table."""

    def __init__(self, db, name, metric="l2", **options):
        self.db, self.name = db, name
        self.coll = db.collection(name, metric=metric, **options)

    @property
    def index(self):
        import beaver_vector
        assert isinstance(self.coll._backend, beaver_vector.VectorIndex)
        return self.coll._backend

    def put(self, doc_id, vector):
        self.coll.index(Document(id=doc_id, body={"g": doc_id},
                                 embedding=[float(x) for x in vector]), fts=False)

    def put_many(self, items):
        with self.db.transaction():
            for doc_id, vector in items:
                self.put(doc_id, vector)

    def delete(self, doc_id):
        with contextlib.suppress(KeyError):
            self.coll.drop(doc_id)

    def search(self, vector, top_k=10, allowed=None):
        where = None if allowed is None else {"g": sorted(allowed)}
        hits = self.coll.search([float(x) for x in vector], top_k=top_k, where=where)
        return [(doc.id, distance) for doc, distance in hits]

    def stored(self) -> dict:
        np = _np()
        return {d: np.frombuffer(b, "<f4") for d, b in self.db._core.execute(
            "SELECT doc_id, vector FROM beaver_vectors WHERE collection = ?", (self.name,))}


def _np():
    return pytest.importorskip("numpy")


@pytest.fixture
def faiss_ok(monkeypatch):
    pytest.importorskip("numpy")
    pytest.importorskip("faiss")
    monkeypatch.delenv("BEAVER_VECTOR_BACKEND", raising=False)


def _brute(stored, query, metric, top_k, allowed=None):
    np = _np()
    ids = [d for d in stored if allowed is None or d in allowed]
    if not ids:
        return []
    matrix = np.array([stored[d] for d in ids], dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "l2":
        dist = np.linalg.norm(matrix - q, axis=1)
    elif metric == "ip":
        dist = -(matrix @ q)
    else:
        norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(q)
        dist = 1 - (matrix @ q) / np.where(norms == 0, 1, norms)
    order = np.argsort(dist, kind="stable")[:top_k]
    return [(ids[i], float(dist[i])) for i in order]


def _same_answer(got, want, tol=1e-4):
    """Equal up to float rounding and the order of (near-)ties."""
    assert len(got) == len(want)
    assert [d for _, d in got] == pytest.approx([d for _, d in want], abs=tol)
    want_dist = dict(want)
    cutoff = want[-1][1] if want else 0
    for doc_id, dist in got:
        assert doc_id in want_dist or dist >= cutoff - tol, (doc_id, dist)


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_vector_exact_equals_brute_force(db, faiss_ok, metric, monkeypatch):
    import beaver_vector
    np = _np()
    rng = np.random.default_rng(7)
    coll = _VecCollection(db, "v", metric, fold_min=40, background=False)
    coll.put_many((f"d{i}", rng.standard_normal(8)) for i in range(150))
    for step in range(120):
        doc_id = f"d{rng.integers(0, 200)}"
        if step % 3 == 0:
            coll.delete(doc_id)
        else:
            coll.put(doc_id, rng.standard_normal(8))
        if step % 40 == 39:
            coll.coll.compact()
        if step % 7 == 0:
            q = rng.standard_normal(8)
            _same_answer(coll.search(q, 10), _brute(coll.stored(), q, metric, 10))
    allowed = {f"d{i}" for i in range(0, 200, 3)}
    q = rng.standard_normal(8)
    _same_answer(coll.search(q, 5, allowed), _brute(coll.stored(), q, metric, 5, allowed))
    faiss_answer = coll.search(q, 1000)
    assert len(faiss_answer) == len(coll.stored())
    monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")    # beaver.py's own exact search
    with BeaverDB(db.path) as other:
        builtin = _VecCollection(other, "v", metric, fold_min=40, background=False)
        _same_answer(faiss_answer, builtin.search(q, 1000))
        assert builtin.coll._backend is False


def test_vector_persistence_across_reopen(tmp_path, faiss_ok):
    vector_persistence_across_reopen(tmp_path / "v.db")


def test_pg_vector_persistence_across_reopen(pg_url, faiss_ok):
    vector_persistence_across_reopen(pg_url)      # the base in beaver_ann_parts (BYTEA)


def vector_persistence_across_reopen(path):
    np = _np()
    rng = np.random.default_rng(1)
    vectors = {f"d{i}": rng.standard_normal(6) for i in range(300)}
    with BeaverDB(path) as db:
        coll = _VecCollection(db, "v", "cosine", background=False)
        coll.put_many(list(vectors.items())[:200])
        coll.coll.compact()                       # a stored base ...
        for doc_id, v in list(vectors.items())[200:]:
            coll.put(doc_id, v)                   # ... plus entries only in the log
        coll.delete("d5")
        coll.delete("d250")
    with BeaverDB(path) as db:
        coll = _VecCollection(db, "v", "cosine", background=False)
        q = rng.standard_normal(6)
        _same_answer(coll.search(q, 300), _brute(coll.stored(), q, "cosine", 300))
        assert coll.index.info()["count"] == 298
        assert not {"d5", "d250"} & {d for d, _ in coll.search(q, 300)}
        coll.put("d5", vectors["d5"])             # re-index after drop, then reopen
    with BeaverDB(path) as db:
        coll = _VecCollection(db, "v", "cosine", background=False)
        assert coll.search(vectors["d5"], 1)[0][0] == "d5"


def test_vector_upsert_drop_clear(db, faiss_ok):
    coll = _VecCollection(db, "v", "l2", fold_min=2, background=False)
    coll.put("a", [1, 0, 0])
    coll.put("b", [0, 1, 0])
    coll.coll.compact()
    coll.put("a", [0, 0, 5])                      # upsert: the old vector must disappear
    assert coll.search([1, 0, 0], 1) == [("b", pytest.approx(2 ** 0.5))]
    assert coll.search([0, 0, 5], 1) == [("a", pytest.approx(0))]
    coll.delete("b")
    coll.coll.compact()
    assert [d for d, _ in coll.search([0, 1, 0], 5)] == ["a"]
    coll.coll.index(Document(id="a", body="no vector any more"))
    assert coll.search([0, 1, 0], 5) == []
    coll.put("c", [1, 1, 1])
    coll.coll.compact()
    coll.coll.clear()
    assert coll.search([0, 1, 0], 5) == []
    coll.coll.compact()                            # the emptied base replaces the stored one
    assert db._core.execute("SELECT count FROM beaver_ann_base").fetchone() == (0,)
    coll.put("b", [0, 1, 0])
    coll.coll.compact()
    assert coll.search([0, 1, 0], 5) == [("b", pytest.approx(0))]
    with BeaverDB(db.path) as other:
        reopened = _VecCollection(other, "v", "l2", fold_min=2, background=False)
        assert reopened.search([0, 1, 0], 5) == [("b", pytest.approx(0))]


def test_vector_transaction_sees_own_writes_and_rollback(db, faiss_ok):
    coll = _VecCollection(db, "v")
    coll.put("a", [0, 0])
    with pytest.raises(RuntimeError):
        with db.transaction():
            coll.put("b", [1, 1])
            coll.delete("a")
            assert [d for d, _ in coll.search([1, 1], 5)] == ["b"]
            raise RuntimeError("roll back")
    assert [d for d, _ in coll.search([1, 1], 5)] == ["a"]


def test_vector_index_opened_inside_a_rolled_back_transaction(db, faiss_ok):
    coll = _VecCollection(db, "v")
    with pytest.raises(RuntimeError):
        with db.transaction():
            coll.put("a", [1, 2])                 # opens the index (and creates its tables)
            raise RuntimeError("roll back")
    coll.put("b", [3, 4])
    assert coll.search([1, 2], 5) == [("b", pytest.approx(8 ** 0.5))]


def test_vector_index_tables_made_again_after_a_savepoint_rolls_them_back(db, faiss_ok):
    """The index knows its tables are there (committed, or made by this transaction) without
    catching errors: a savepoint that made them and rolled back makes it look again."""
    coll = _VecCollection(db, "v")
    with db.transaction():
        with pytest.raises(RuntimeError), db.transaction():
            coll.put("a", [1, 2])                 # opens the index, makes its tables
            raise RuntimeError("roll back the savepoint")
        assert coll.search([1, 2], 5) == []       # inside the transaction: none yet
        coll.put("b", [3, 4])                     # made again
        assert [d for d, _ in coll.search([1, 2], 5)] == ["b"]
    assert [d for d, _ in coll.search([1, 2], 5)] == ["b"]
    statements = []
    db._core.conn().set_trace_callback(statements.append)
    try:
        coll.put("c", [5, 6])
        with db.transaction():
            coll.put("d", [7, 8])
            assert [d for d, _ in coll.search([7, 8], 1)] == ["d"]
    finally:
        db._core.conn().set_trace_callback(None)
    assert not any("sqlite_master" in s for s in statements)      # known, not looked up


def test_vector_search_in_a_transaction_after_the_tables_rolled_back(db, faiss_ok):
    coll = _VecCollection(db, "v")
    with pytest.raises(RuntimeError), db.transaction():
        coll.put("a", [1, 2])
        coll.index.info()                         # loads the index inside the transaction
        raise RuntimeError("roll back")
    with db.transaction():
        assert coll.search([1, 2], 5) == []       # its tables are gone: nothing to read
        coll.put("b", [3, 4])
        assert [d for d, _ in coll.search([1, 2], 5)] == ["b"]
    assert [d for d, _ in coll.search([1, 2], 5)] == ["b"]


def test_vector_checks_dimension_metric_and_options(db, faiss_ok, monkeypatch):
    import beaver_vector
    coll = _VecCollection(db, "v")
    coll.put("a", [1.0, 2.0, 3.0])
    with pytest.raises(ValidationError):
        coll.index.on_upsert("b", bytes(8))
    with pytest.raises(ValueError):
        coll.index.search([1.0], 1, None)
    with pytest.raises(ValueError):
        beaver_vector.open_index(db._core, "w", 3, "manhattan")
    with pytest.raises(ValueError):
        beaver_vector.open_index(db._core, "w", 3, "l2", ef_serach=5)
    with pytest.raises(ValueError):
        _VecCollection(db, "typo", ef_serach=5).put("a", [1.0])
    monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")
    with pytest.raises(FeatureUnavailable):
        beaver_vector.open_index(db._core, "w", 3)


def test_vector_hnsw_filters_and_rebuilds(db, faiss_ok):
    np = _np()
    rng = np.random.default_rng(3)
    coll = _VecCollection(db, "v", "cosine", index="hnsw", fold_min=100, background=False,
                          filter_exact_below=50, build_chunk=256)
    coll.put_many((f"d{i}", rng.standard_normal(16)) for i in range(600))
    coll.coll.compact()
    assert coll.index.info()["kind"] == "hnsw"
    for i in range(0, 600, 2):
        coll.delete(f"d{i}")
    q = rng.standard_normal(16)
    assert all(int(d[1:]) % 2 for d, _ in coll.search(q, 20))
    small = {f"d{i}" for i in range(1, 60, 2)}      # exact path
    _same_answer(coll.search(q, 5, small), _brute(coll.stored(), q, "cosine", 5, small))
    large = {f"d{i}" for i in range(1, 600, 4)}     # IDSelector path
    got = coll.search(q, 10, large)
    assert len(got) == 10 and {d for d, _ in got} <= large
    coll.coll.compact()                             # half dead: rebuilt without them
    assert coll.index.info()["dead"] == 0 and coll.index.info()["count"] == 300


def test_vector_filters_by_exact_search_and_by_hnsw_agree_with_brute_force(db, faiss_ok,
                                                                          monkeypatch):
    """Filters on an HNSW base (and its delta): exact when that is cheaper, HNSW with a
    selector when forced (EXACT_COST = 0), each returning allowed documents only."""
    import beaver_vector
    np = _np()
    rng = np.random.default_rng(11)
    coll = _VecCollection(db, "v", "l2", index="hnsw", fold_min=50, background=False,
                          filter_exact_below=0)
    coll.put_many((f"d{i}", rng.standard_normal(8)) for i in range(400))
    coll.coll.compact()
    coll.put_many((f"e{i}", rng.standard_normal(8)) for i in range(30))    # the delta
    coll.delete("d3")                                                         # a dead label
    filters = [{f"d{i}" for i in range(0, 400, 2)} | {"e1", "e2", "d3"},
               {f"d{i}" for i in range(7)} | {f"e{i}" for i in range(0, 30, 3)},
               {f"d{i}" for i in range(1, 400, 9)}]
    for allowed in filters:
        for cost in (beaver_vector.EXACT_COST, 0):
            monkeypatch.setattr(beaver_vector, "EXACT_COST", cost)
            for _ in range(5):
                q = rng.standard_normal(8)
                want = {d for d, _ in _brute(coll.stored(), q, "l2", 10, allowed)}
                got = coll.search(q, 10, allowed)
                assert {d for d, _ in got} <= allowed - {"d3"} and len(got) == 10
                assert len({d for d, _ in got} & want) >= (10 if cost else 9)
    assert coll.index.info()["kind"] == "hnsw" and coll.index.info()["delta"] == 30
    among = coll.index._base._among
    assert len(among) == len(filters) and all(kept[1] == 1 for kept in among.values())


def test_vector_few_allowed_are_looked_up_among_labels_sharing_a_rowid(db, faiss_ok):
    """A filter letting a few documents through is mapped to labels by looking its rowids up
    (not by testing every label); a document written again after the base was built has a
    dead label and a live one with the same rowid once folded: the live one is found."""
    np = _np()
    rng = np.random.default_rng(8)
    coll = _VecCollection(db, "v", "l2", index="hnsw", fold_min=10, background=False)
    vectors = {f"d{i}": rng.standard_normal(4) for i in range(300)}
    coll.put_many(vectors.items())
    coll.coll.compact()
    vectors["d5"] = vectors["d7"] + 0.01
    coll.put("d5", vectors["d5"])
    coll.coll.compact()                             # folded: d5's old label stays, dead
    base = coll.index._base
    rowid = base.rowids[base.pos["d5"]]
    assert (base.rowids == rowid).sum() == 2
    allowed = {"d5", "d7", "d250"}
    _same_answer(coll.search(vectors["d7"], 3, allowed),
                 _brute(coll.stored(), vectors["d7"], "l2", 3, allowed))
    kept = coll.coll._allowed(coll.coll._check({"g": sorted(allowed)}))
    assert kept.listed is not None and len(base.among(kept)) == 3


def test_vector_filtered_search_after_reopen_maps_stored_labels(tmp_path, faiss_ok):
    """A stored base holds doc ids; their rowids are read again when it loads (documents
    dropped and indexed again since then get new rowids)."""
    np = _np()
    rng = np.random.default_rng(2)
    vectors = {f"d{i}": rng.standard_normal(4) for i in range(60)}
    with BeaverDB(tmp_path / "v.db") as db:
        coll = _VecCollection(db, "v", background=False)
        coll.put_many(vectors.items())
        coll.coll.compact()
        coll.delete("d7")
        coll.put("d7", vectors["d7"])                 # a new rowid, only in the log
    with BeaverDB(tmp_path / "v.db") as db:
        coll = _VecCollection(db, "v", background=False)
        allowed = {"d7", "d8", "d30"}
        q = vectors["d7"]
        _same_answer(coll.search(q, 3, allowed), _brute(coll.stored(), q, "l2", 3, allowed))
        assert coll.search(q, 60, {f"d{i}" for i in range(60)})[0][0] == "d7"


def test_vector_other_process_compaction_needs_no_reload(tmp_path, faiss_ok):
    np = _np()
    rng = np.random.default_rng(5)
    options = {"background": False, "persist_min": 1}
    with BeaverDB(tmp_path / "v.db") as one, BeaverDB(tmp_path / "v.db") as two:
        writer, reader = _VecCollection(one, "v", **options), _VecCollection(two, "v", **options)
        writer.put_many((f"d{i}", rng.standard_normal(4)) for i in range(100))
        q = rng.standard_normal(4)
        _same_answer(reader.search(q, 100), _brute(writer.stored(), q, "l2", 100))
        loads = reader.index.info()["loads"]
        writer.coll.compact()                    # stored, log trimmed up to the older base
        writer.put_many((f"e{i}", rng.standard_normal(4)) for i in range(50))
        writer.coll.compact()
        _same_answer(reader.search(q, 200), _brute(writer.stored(), q, "l2", 200))
        assert reader.index.info()["loads"] == loads     # caught up from the log alone
        for round_ in range(2):                  # the reader sleeps through two compactions:
            writer.put_many((f"f{round_}{i}", rng.standard_normal(4)) for i in range(50))
            writer.delete(f"d{round_}")
            writer.coll.compact()                # the log it would need is trimmed
        _same_answer(reader.search(q, 300), _brute(writer.stored(), q, "l2", 300))
        assert reader.index.info()["loads"] == loads + 1  # so it loaded the stored base


def _vec_writer(path, prefix, count, other, result):
    with BeaverDB(path) as db:
        coll = _VecCollection(db, "v", fold_min=50)
        missing = 0
        for i in range(count):
            vector = [float(i), float(len(prefix)), 1.0, 0.5]
            coll.put(f"{prefix}{i}", vector)
            hit = coll.search(vector, 1)
            if not hit or hit[0][1] > 1e-6:
                missing += 1
        deadline = time.monotonic() + MP_DEADLINE
        seen = False
        while time.monotonic() < deadline and not seen:   # the other's last write shows up
            seen = any(d == f"{other}{count - 1}" for d, _ in coll.search([0, 0, 0, 0], 10 ** 6))
        result.put((prefix, missing, seen))


def test_vector_two_processes_insert_and_search(tmp_path, faiss_ok):
    vector_two_processes_insert_and_search(str(tmp_path / "v.db"))


def test_pg_vector_two_processes_insert_and_search(pg_url, faiss_ok):
    vector_two_processes_insert_and_search(pg_url)     # over TCP, log rows in commit order


def vector_two_processes_insert_and_search(path):
    result = SPAWN.Queue()
    workers = [SPAWN.Process(target=_vec_writer, args=(path, p, 150, o, result))
               for p, o in (("a", "bb"), ("bb", "a"))]
    for w in workers:
        w.start()
    answers = [result.get(timeout=MP_DEADLINE) for _ in workers]
    for w in workers:
        w.join(timeout=MP_DEADLINE)
    assert sorted(answers) == [("a", 0, True), ("bb", 0, True)]
    with BeaverDB(path) as db:
        coll = _VecCollection(db, "v", fold_min=50)
        q = [3.0, 1.0, 1.0, 0.5]
        _same_answer(coll.search(q, 400), _brute(coll.stored(), q, "l2", 400))
        assert coll.index.info()["count"] == 300


def _vec_compactor(path):
    import numpy as np
    rng = np.random.default_rng(os.getpid())
    with BeaverDB(path) as db:
        coll = _VecCollection(db, "v", part_bytes=1024, background=False)
        i = 0
        while True:                              # killed from outside, mid-compaction
            coll.put_many((f"d{i + j}", rng.standard_normal(16)) for j in range(200))
            coll.delete(f"d{i // 2}")
            i += 200
            coll.coll.compact()


def test_vector_crash_during_compaction_loses_nothing(tmp_path, faiss_ok):
    path = str(tmp_path / "v.db")
    child = SPAWN.Process(target=_vec_compactor, args=(path,))
    child.start()
    with BeaverDB(path) as db:
        core = db._core

        def mid_compaction():
            try:
                row = core.execute("SELECT count(DISTINCT generation), "
                                   "(SELECT built_seq FROM beaver_ann_base) FROM beaver_ann_parts"
                                   ).fetchone()
            except beaver.BeaverError:           # tables not created yet
                return None
            return row[0] >= 2 and row[1] > 0 or None
        found = core.watcher.wait_for(mid_compaction, timeout=MP_DEADLINE)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=MP_DEADLINE)
        assert found, "never saw a compaction in progress"
        assert core.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        coll = _VecCollection(db, "v", part_bytes=1024, background=False)
        stored = coll.stored()
        q = [0.5] * 16
        _same_answer(coll.search(q, 50), _brute(stored, q, "l2", 50))
        assert coll.index.info()["count"] == len(stored) > 0
        coll.coll.compact()                      # the dead child's lease does not block it
        parts = core.execute("SELECT count(DISTINCT generation) FROM beaver_ann_parts").fetchone()
        assert parts[0] == 1
    with BeaverDB(path) as db:
        coll = _VecCollection(db, "v", part_bytes=1024, background=False)
        _same_answer(coll.search(q, 50), _brute(stored, q, "l2", 50))


def test_lock_seed_example_scraper(tmp_path, monkeypatch, capsys):
    import os
    import time
    monkeypatch.chdir(tmp_path)
    db = BeaverDB("scraper_state.db")
    scrapers_state = db.dict("scraper_state")

    last_refresh = scrapers_state.get("last_sitemap_refresh", 0)
    if time.time() - last_refresh > 3600:  # Only refresh once per hour
        try:
            with db.lock("refresh_sitemap", timeout=1):
                print(f"PID {os.getpid()} is refreshing the sitemap...")
                scrapers_state["sitemap"] = ["/page1", "/page2"]
                scrapers_state["last_sitemap_refresh"] = time.time()
        except TimeoutError:
            print(f"PID {os.getpid()} letting other process handle refresh.")

    sitemap = scrapers_state.get("sitemap")
    print(f"PID {os.getpid()} proceeding with sitemap: {sitemap}")
    db.close()
    out = capsys.readouterr().out
    assert "is refreshing the sitemap" in out and "['/page1', '/page2']" in out


def test_queue_dump_keeps_leased_items(db):
    q = db.queue("dumped")
    q.put("queued")
    q.put("leased")
    q.get(lease=60)
    q.get(lease=60)
    assert [i["data"] for i in q.dump()["items"]] == ["queued", "leased"]
    q.clear()
    assert q.dump()["items"] == [] and len(q) == 0


# ---- dump/load/backup ----

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


def _peak_memory(call):
    """(the result of ``call()``, the peak of Python's allocations meanwhile)."""
    import tracemalloc
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_dump_and_load_hold_a_page_at_a_time(tmp_path, db):
    megabyte = bytes(range(256)) * 4096
    for i in range(24):
        db.blobs("big").put(str(i), megabyte)
    db.dict("many").update({f"{i:05}": "x" * 1000 for i in range(12_000)})
    db.collection("docs").index_many(Document(id=str(i), body="text") for i in range(3))
    db.collection("docs").connect("0", "1", "next")
    with open(tmp_path / "dump.jsonl", "w") as out:
        structures, peak = _peak_memory(lambda: db.dump(out))
    assert structures == 3 and peak < 12 * len(megabyte)      # 36 MB went out
    with BeaverDB(tmp_path / "copy.db") as copy, open(tmp_path / "dump.jsonl") as dump:
        structures, peak = _peak_memory(lambda: copy.load(dump))
        assert structures == 3 and peak < 12 * len(megabyte)
        _same_dump(_dump_lines_of(copy), _dump_lines_of(db))


def test_dump_skips_expired_and_selects_names(db):
    db.dict("c")["kept"] = 2
    db._core.execute("INSERT INTO beaver_dicts VALUES ('c', 'gone', '1', ?)", (time.time() - 1,))
    db.list("l").push(1)
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


# ---- copy_to: every structure into another database ----

def _fill_all_kinds(db):
    """Every kind with what a copy must keep: expiry, priorities, timestamps, metadata,
    vectors, edges, metric, field indexes; and an expired key that must stay behind."""
    _fill(db)
    db.dict("app_config").set("gone", 1, ttl_seconds=1)
    db.dict("app_config")[""] = "the empty key"
    db.dict("app_config").create_index("user")
    db.log("metrics").log({"cpu": 0.5}, timestamp=1_700_000_000.25)
    db.log("metrics").log({"cpu": 0.7}, timestamp=1_700_000_000.25)    # a timestamp tie
    db.log("metrics").create_index("cpu")
    db.channel("news").publish({"headline": "hello"})
    docs = db.collection("docs", metric="cosine")
    docs.index_many([Document(id="a", body="embedded databases", embedding=[1.0, 0.0, 0.0]),
                     Document(id="b", body={"title": "vectors"}, embedding=[0.0, 1.0, 0.5]),
                     Document(id="c", body="no vector")])
    docs.connect("a", "b", "LINKS", metadata={"weight": 2})
    docs.connect("b", "c", "LINKS")
    docs.create_index("title")


def _dump_lines_of(db):
    out = io.StringIO()
    db.dump(out)
    return [json.loads(line) for line in out.getvalue().splitlines()[1:]]


def _same_dump(copied, source):
    """The two dumps hold the same lines (an expiry equal up to float rounding)."""
    assert len(copied) == len(source)
    for mine, theirs in zip(copied, source):
        if isinstance(theirs, dict) and theirs.get("expires_at") is not None:
            assert mine["expires_at"] == pytest.approx(theirs["expires_at"])
            mine, theirs = {**mine, "expires_at": 0}, {**theirs, "expires_at": 0}
        assert mine == theirs


def test_copy_to_reproduces_every_structure(tmp_path, db, clock):
    _fill_all_kinds(db)
    clock.advance(2)                                    # "gone" has expired
    with BeaverDB(tmp_path / "copy.db") as copy:
        assert db.copy_to(copy) == 7
        _same_dump(_dump_lines_of(copy), _dump_lines_of(db))
        assert "gone" not in copy.dict("app_config")
        assert copy.dict("app_config").ttl("session") == pytest.approx(3598)
        assert copy.dict("app_config").indexes() == ["user"]
        assert copy.log("metrics").indexes() == ["cpu"]
        docs = copy.collection("docs")
        assert docs.metric == "cosine" and docs.indexes() == ["title"]
        assert [doc.id for doc, _ in docs.search([0.0, 1.0, 0.4], top_k=1)] == ["b"]
        assert [doc.id for doc, _ in docs.match("databses", fuzziness=1)] == ["a"]
        assert [doc.id for doc in docs.walk("a", labels=["LINKS"], depth=2)] == ["b", "c"]
        clock.advance(3600)
        assert "session" not in copy.dict("app_config")        # the expiry went across


def test_copy_to_a_path_opens_and_closes_it(tmp_path, db):
    _fill(db)
    assert db.copy_to(str(tmp_path / "new.db")) == 4
    with BeaverDB(tmp_path / "new.db") as copy:
        before, after = _snapshot(db), _snapshot(copy)
        assert before.pop("ttl") == pytest.approx(after.pop("ttl"), abs=60)
        assert before == after


def test_copy_to_pages_through_large_structures(tmp_path, db, monkeypatch):
    monkeypatch.setattr(beaver, "PAGE_SIZE", 3)        # many pages, ties across page ends
    d, lst, q, lg, ch = (db.dict("d"), db.list("l"), db.queue("q"), db.log("lg"),
                         db.channel("ch", max_messages=None))
    d.update({f"k{i:02}": i for i in range(20)})
    lst.extend(range(20))
    for i in range(20):
        q.put(i, priority=i % 2)
        lg.log(i, timestamp=1_700_000_000 + i // 4)
        ch.publish(i)
        db.blobs("b").put(f"{i:02}", bytes([i]) * i)
    docs = db.collection("docs")
    docs.index_many(Document(id=f"d{i:02}", body=f"text {i}") for i in range(20))
    for i in range(19):
        docs.connect(f"d{i:02}", f"d{i + 1:02}", "next")
    q.get(lease=60)                                    # a leased item is copied as queued
    with BeaverDB(tmp_path / "copy.db") as copy:
        db.copy_to(copy)
        assert dict(copy.dict("d")) == dict(d) and list(copy.list("l")) == list(lst)
        assert [i.data for i in q] == [*range(2, 20, 2), *range(1, 20, 2)]
        assert [i.data for i in copy.queue("q")] == [*range(2, 20, 2), 0, *range(1, 20, 2)]
        assert list(copy.log("lg")) == list(lg)
        assert copy.channel("ch").history() == ch.history()
        assert {k: copy.blobs("b")[k].data for k in copy.blobs("b")} == {
            k: db.blobs("b")[k].data for k in db.blobs("b")}
        assert list(copy.collection("docs")) == list(docs)
        assert len(copy.collection("docs")._dump_items()) == 20
        assert copy.collection("docs").dump()["edges"] == docs.dump()["edges"]


def test_copy_to_holds_a_page_at_a_time(tmp_path, db):
    megabyte = bytes(range(256)) * 4096
    for i in range(24):
        db.blobs("big").put(str(i), megabyte)
    db.dict("many").update({f"{i:05}": "x" * 1000 for i in range(12_000)})
    with BeaverDB(tmp_path / "copy.db") as copy:
        structures, peak = _peak_memory(lambda: db.copy_to(copy))
        assert structures == 2 and peak < 12 * len(megabyte)  # 36 MB went across
        assert len(copy.blobs("big")) == 24 and len(copy.dict("many")) == 12_000


def test_copy_to_reads_one_snapshot_while_others_write(tmp_path, db):
    """A writer adds to a list and a dict in each transaction while the copy runs: the
    copy holds as many of each (a snapshot), fewer than the source ends with."""
    stop, commits, changed = threading.Event(), [0], threading.Condition()

    def write():
        i = 0
        while not stop.is_set():
            with db.transaction():
                db.list("l").push(i)
                db.dict("d")[str(i)] = i
            with changed:
                commits[0] += 1
                changed.notify_all()
            i += 1
    db.list("l").push(-1)
    db.dict("d")["-1"] = -1
    writer = threading.Thread(target=write)
    writer.start()

    def meanwhile(copied, total):
        if copied == 0:                 # the snapshot is taken: let the writer commit more
            with changed:
                later = commits[0] + 20
                assert changed.wait_for(lambda: commits[0] >= later, timeout=30)
    try:
        with BeaverDB(tmp_path / "copy.db") as copy:
            db.copy_to(copy, progress=meanwhile)
            stop.set()
            writer.join(30)
            assert len(copy.list("l")) == len(copy.dict("d")) < len(db.list("l"))
            assert list(copy.list("l")) == list(db.list("l"))[:len(copy.list("l"))]
    finally:
        stop.set()
        writer.join(30)


def test_copy_to_with_models_on_either_side(tmp_path, db):
    db.dict("people", model=Person)["ada"] = Person(name="Ada", address=Address(city="London"))
    db.collection("staff", model=Person).index(Document(id="ada", body=Person(name="Ada")))
    with BeaverDB(tmp_path / "copy.db") as copy:
        people = copy.dict("people", model=Person)        # open typed before the copy
        db.copy_to(copy)
        assert people["ada"] == db.dict("people")["ada"]
        assert copy.collection("staff")["ada"].body == Person(name="Ada").model_dump()


def test_copy_to_reports_progress(tmp_path, db, clock):
    _fill_all_kinds(db)
    calls = []
    with BeaverDB(tmp_path / "copy.db") as copy:
        db.copy_to(copy, progress=lambda copied, total: calls.append((copied, total)))
    total = 4 + 4 + 2 + 2 + 2 + 1 + 3 + 2             # items of each kind, then the edges
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(a[0] <= b[0] and a[1] == total for a, b in zip(calls, calls[1:]))


def test_copy_to_modes(tmp_path, db):
    db.list("l").extend([1, 2])
    db.dict("d")["a"] = 1
    with BeaverDB(tmp_path / "copy.db") as copy:
        copy.list("l").push(0)
        copy.dict("other")["kept"] = True
        with pytest.raises(ValueError, match="already holds list 'l'.*append.*replace"):
            db.copy_to(copy)
        assert "a" not in copy.dict("d") and list(copy.list("l")) == [0]     # nothing written
        assert db.copy_to(copy, mode="append") == 2
        assert list(copy.list("l")) == [0, 1, 2] and copy.dict("d")["a"] == 1
        assert db.copy_to(copy, mode="replace") == 2
        assert list(copy.list("l")) == [1, 2] and copy.dict("other")["kept"] is True
        with pytest.raises(ValueError, match="mode"):
            db.copy_to(copy, mode="merge")
        with pytest.raises(TypeError, match="progress"):
            db.copy_to(copy, mode="append", progress="stderr")


def test_copy_to_is_all_or_nothing(tmp_path, db, clock):
    _fill_all_kinds(db)

    def interrupt(copied, total):
        if copied == total:
            raise KeyboardInterrupt
    with BeaverDB(tmp_path / "copy.db") as copy:
        copy.collection("docs", metric="l2")           # another metric: refused on the way
        with pytest.raises(ValueError, match="metric"):
            db.copy_to(copy)
        assert copy.info()["structures"] == []
    with BeaverDB(tmp_path / "other.db") as copy:
        with pytest.raises(KeyboardInterrupt):
            db.copy_to(copy, progress=interrupt)
        assert copy.info()["structures"] == []
        assert db.copy_to(copy) == 7                   # and it can be done again


def test_copy_to_refuses_bad_destinations(tmp_path, db):
    db.dict("d")["a"] = 1
    for bad in (42, None, io.StringIO()):
        with pytest.raises(TypeError, match="BeaverClient or a path"):
            db.copy_to(bad)
    with pytest.raises(ValueError, match="onto itself"):
        db.copy_to(db)
    with pytest.raises(ValueError, match="onto itself"):
        db.copy_to(db.path)
    with BeaverDB(db.path) as same, pytest.raises(ValueError, match="onto itself"):
        db.copy_to(same)
    closed = BeaverDB(tmp_path / "closed.db")
    closed.close()
    with pytest.raises(beaver.ClosedError):
        db.copy_to(closed)
    with BeaverDB(tmp_path / "x.db") as other:
        other.close()
        with pytest.raises(beaver.ClosedError):
            other.copy_to(db)


def test_copy_to_and_from_a_server(tmp_path, server_url, uid):
    """copy_to with a BeaverClient at either end: through the dump, same modes and progress."""
    local = BeaverDB(tmp_path / "local.db")
    local.dict(f"d-{uid}").set("a", {"n": 1}, ttl_seconds=3600)
    local.list(f"l-{uid}").extend([1, 2, 3])
    local.queue(f"q-{uid}").put("job", priority=2)
    local.blobs(f"b-{uid}").put("k", b"\x00bytes", metadata={"m": 1})
    docs = local.collection(f"c-{uid}")
    docs.index(Document(id="x", body="hello world", embedding=[1.0, 0.0]))
    docs.index(Document(id="y", body="other", embedding=[0.0, 1.0]))
    docs.connect("x", "y", label="next")
    calls = []
    client = beaver.BeaverClient(server_url)
    try:
        assert local.copy_to(client, progress=lambda c, t: calls.append((c, t))) == 5
        assert calls[0] == (0, 9) and calls[-1] == (9, 9)
        assert client.dict(f"d-{uid}")["a"] == {"n": 1} and client.dict(f"d-{uid}").ttl("a") > 3500
        assert client.list(f"l-{uid}")[:] == [1, 2, 3]
        assert client.collection(f"c-{uid}").search([1.0, 0.1], top_k=1)[0][0].id == "x"
        assert [d.id for d in client.collection(f"c-{uid}").neighbors("x")] == ["y"]
        with pytest.raises(ValueError, match="already holds"):
            local.copy_to(client)
        assert client.list(f"l-{uid}")[:] == [1, 2, 3]           # refused before writing
        local.list(f"l-{uid}").append(4)
        local.copy_to(client, mode="replace")
        assert client.list(f"l-{uid}")[:] == [1, 2, 3, 4]
        back = tmp_path / "back.db"
        assert client.copy_to(back) >= 5
        with BeaverDB(back) as copied:
            assert copied.list(f"l-{uid}")[:] == [1, 2, 3, 4]
            assert copied.blobs(f"b-{uid}").get("k").data == b"\x00bytes"
            assert copied.queue(f"q-{uid}").get(block=False).data == "job"
            assert copied.collection(f"c-{uid}").match("hello")[0][0].id == "x"
        with pytest.raises(ValueError, match="onto itself"):
            client.copy_to(client)
        with beaver.BeaverClient(server_url) as same, pytest.raises(ValueError, match="onto"):
            client.copy_to(same)
        with pytest.raises(TypeError, match="BeaverClient or a path"):
            client.copy_to(42)
    finally:
        client.close()
        local.close()


def test_copy_to_refuses_the_database_of_its_own_server_by_any_name(served, tmp_path, uid):
    """Whatever names the two ends (a path and a server serving it, localhost and
    127.0.0.1), copying a database onto itself is refused; two other servers are not."""
    url, path = served
    with BeaverDB(path) as local, beaver.BeaverClient(url) as client, \
            beaver.BeaverClient(url.replace("127.0.0.1", "localhost")) as alias:
        local.list(f"l-{uid}").extend([1, 2])
        for source, target in ((local, client), (client, local), (client, alias)):
            with pytest.raises(ValueError, match="onto itself"):
                source.copy_to(target, mode="append")
        assert local.list(f"l-{uid}")[:] == [1, 2]
        process, other_url = _start_server(tmp_path / "other.db")
        try:
            with beaver.BeaverClient(other_url) as other:
                assert alias.copy_to(other) >= 1
                assert other.list(f"l-{uid}")[:] == [1, 2]
        finally:
            _stop_server(process)


def test_server_json_bodies_read_as_json_loads_reads_them():
    """The server's fast JSON read gives json.loads's value, or its kind of error, for UTF-8
    with and without whitespace or a BOM, UTF-16, and broken text."""
    beaver_server = pytest.importorskip("beaver_server")
    cases = [b'{"a":[1,NaN]}', b" 2 ", '"x"', b"2 ", b"\xef\xbb\xbf1", "\ufeff1", b"", "",
             '"a" x', b'"\xff"', "[1,2]".encode("utf-16"), "[1]".encode("utf-16-le"),
             b"\n[1]\n", b"[", b"nul", b'"\xc3\xa9"', b"1e400", b"-0"]

    def outcome(read, text):
        try:
            return "value", read(text)
        except ValueError as e:
            return "error", type(e).__name__
    for text in cases:
        mine, theirs = outcome(beaver_server._loads, text), outcome(json.loads, text)
        assert repr(mine) == repr(theirs), text


def test_cli_copy_from_and_to_a_server(capsys, tmp_path, server_url, uid):
    source = str(tmp_path / "source.db")
    with BeaverDB(source) as db:
        db.list(f"cli-{uid}").extend(["a", "b"])
    assert _cli(capsys, "copy", source, server_url)[0] == 0
    with beaver.BeaverClient(server_url) as client:
        assert client.list(f"cli-{uid}")[:] == ["a", "b"]
    back = str(tmp_path / "back.db")
    assert _cli(capsys, "copy", server_url, back)[0] == 0
    with BeaverDB(back) as db:
        assert db.list(f"cli-{uid}")[:] == ["a", "b"]
    code, _, err = _cli(capsys, "copy", server_url, server_url)
    assert code == 1 and "onto itself" in err


def test_pg_copy_to_between_engines(pg_db, tmp_path, clock):
    """SQLite -> PostgreSQL -> SQLite: every kind comes back the same, a collection with its
    vectors, edges, metric, field index and text (searchable on PostgreSQL in between)."""
    with BeaverDB(tmp_path / "source.db") as source:
        _fill_all_kinds(source)
        clock.advance(2)                                    # "gone" has expired
        assert source.copy_to(pg_db) == 7
        docs = pg_db.collection("docs")
        assert docs.metric == "cosine" and docs.indexes() == ["title"]
        assert [doc.id for doc, _ in docs.search([0.0, 1.0, 0.4], top_k=1)] == ["b"]
        assert [doc.id for doc, _ in docs.match("databses", fuzziness=1)] == ["a"]
        assert [doc.id for doc in docs.walk("a", labels=["LINKS"], depth=2)] == ["b", "c"]
        with BeaverDB(tmp_path / "back.db") as back:
            assert pg_db.copy_to(back) == 7
            _same_dump(_dump_lines_of(back), _dump_lines_of(source))
            assert back.dict("app_config").indexes() == ["user"]
            assert back.collection("docs").indexes() == ["title"]
            assert [doc.id for doc, _ in back.collection("docs").match("vectors")] == ["b"]
        with pytest.raises(ValueError, match="already holds"):
            source.copy_to(pg_db)
        assert source.copy_to(pg_db, mode="replace") == 7
        _same_dump(_dump_lines_of(pg_db), _dump_lines_of(source))


def test_pg_copy_to_refuses_its_own_schema_by_any_name(pg_db, pg_url, postgres_url):
    """Two URLs of one schema (localhost and 127.0.0.1) are one database: a copy between
    them is refused; another schema of the same server is another database."""
    pg_db.list("l").extend([1, 2])
    with BeaverDB(pg_url.replace("127.0.0.1", "localhost")) as alias:
        with pytest.raises(ValueError, match="onto itself"):
            pg_db.copy_to(alias, mode="append")
    assert "options=" in pg_url         # another session TimeZone: the same identity
    with BeaverDB(pg_url.replace("options=", "options=-ctimezone%3DAsia%2FTokyo%20")) as tokyo:
        assert tokyo._core.identity() == pg_db._core.identity()
    with pytest.raises(ValueError, match="onto itself"):
        pg_db.copy_to(pg_url.replace("127.0.0.1", "localhost"), mode="append")
    with pg_schema(postgres_url) as other_url, BeaverDB(other_url) as other:
        assert pg_db.copy_to(other) == 1
        assert other.list("l")[:] == [1, 2]
    assert pg_db.list("l")[:] == [1, 2]


def test_pg_cli_copy_to_a_url_and_back(capsys, pg_url, tmp_path):
    source, back = str(tmp_path / "source.db"), str(tmp_path / "back.db")
    with BeaverDB(source) as db:
        _fill(db)
        db.collection("docs").index(Document(id="a", body="moving up", embedding=[1.0, 2.0]))
    assert _cli(capsys, "copy", source, pg_url) == (0, '{\n  "structures": 5\n}\n', "")
    assert _cli(capsys, "copy", pg_url, back)[0] == 0
    with BeaverDB(source) as a, BeaverDB(back) as b:
        _same_dump(_dump_lines_of(b), _dump_lines_of(a))
    code, _, err = _cli(capsys, "copy", source, pg_url)
    assert code == 1 and "already holds" in err


def test_dump_and_load_keep_field_indexes(tmp_path, db):
    db.dict("users")["ada"] = {"age": 36}
    db.dict("users").create_index("age")
    out = io.StringIO()
    db.dump(out)
    assert json.loads(out.getvalue().splitlines()[1])["indexes"] == ["age"]
    with BeaverDB(tmp_path / "copy.db") as copy:
        copy.load(io.StringIO(out.getvalue()))
        assert copy.dict("users").indexes() == ["age"]
    bad = out.getvalue().replace('"indexes":["age"]', '"indexes":"age"')
    with BeaverDB(tmp_path / "bad.db") as copy, pytest.raises(ValueError, match="indexes"):
        copy.load(io.StringIO(bad))


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



def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(path, *options, command=("-m", "beaver")):
    """A real server process on 127.0.0.1 serving ``path``: (process, url)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = _free_port()
    here = os.path.dirname(os.path.abspath(beaver.__file__))
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = ([sys.executable, *command, "--database", str(path), "serve"] if command[-1] == "beaver"
            else [sys.executable, *command, "--database", str(path)])
    process = subprocess.Popen(argv + ["--port", str(port), "--log-level", "warning", *options],
                               env=env, cwd=here)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None:
                raise AssertionError("the server process died")
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("the server did not start in 30 s")
            time.sleep(0.05)  # polling a port: nothing to wait on


def _stop_server(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real ``beaver serve`` process on 127.0.0.1: (url, database path)."""
    path = tmp_path_factory.mktemp("server") / "served.db"
    process, url = _start_server(path, "--max-wait", "2")
    try:
        yield url, str(path)
    finally:
        _stop_server(process)


@pytest.fixture(scope="module")
def server_url(served):
    return served[0]


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


def test_same_api_filters_indexes_and_explain(anydb, uid):
    """Filters, field indexes and explain() work alike in-process and over HTTP."""
    users = anydb.dict(f"users-{uid}")
    users.update({"ada": {"year": 1815, "tags": ["math"]}, "alan": {"year": 1912, "tags": []},
                  "grace": {"year": 1906, "tags": ["navy", "math"]}, "x/y\n": {"year": None}})
    where = {"tags": {"$contains": "math"}, "year": {"$gte": 1800}}
    assert users.find(where, order_by="-year") == [("grace", {"year": 1906, "tags": ["navy", "math"]}),
                                                  ("ada", {"year": 1815, "tags": ["math"]})]
    assert users.find({"year": None}) == [("x/y\n", {"year": None})]
    assert users.find(order_by="year", limit=1, offset=1) == [("ada", {"year": 1815, "tags": ["math"]})]
    assert users.explain({"year": 1906})["index"] is None
    users.create_index("year")
    assert users.indexes() == ["year"]
    assert users.explain({"year": 1906})["index"] == "year"
    assert [k for k, _ in users.find({"year": {"$gt": 1900}})] == ["alan", "grace"]
    assert users.drop_index("year") is True and users.indexes() == []
    with pytest.raises(ValueError):
        users.find({"year": {"$bogus": 1}})

    log = anydb.log(f"events-{uid}")
    for i in range(6):
        log.log({"n": i, "ok": i % 2 == 0}, timestamp=1_700_000_000 + i)
    assert [e.data["n"] for e in log.range(where={"ok": True}, order="desc", limit=2)] == [4, 2]
    log.create_index("ok")
    assert log.explain(where={"ok": True})["index"] == "ok"
    with log.live(window=10 ** 9, period=0.05, where={"ok": False}) as view:
        assert [d["n"] for d in next(iter(view))] == [1, 3, 5]


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


def test_same_api_queue_leases(anydb, uid):
    jobs = anydb.queue(f"{uid}-leased")
    jobs.put("a")
    jobs.put("b")
    first = jobs.get(lease=30)
    assert first.data == "a" and first.lease_id is not None
    assert jobs.ack(first) is True and jobs.ack(first) is False
    second = jobs.get(lease=30)
    assert jobs.nack(second) is True
    assert jobs.get(block=False).data == "b"
    with pytest.raises(TypeError):
        jobs.ack(beaver.QueueItem(0, 0.0, "x"))


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


def test_same_api_events(anydb, uid):
    import queue as queue_module
    config = anydb.dict(f"{uid}-watched")
    seen = queue_module.SimpleQueue()
    handle = config.on("set", seen.put)
    everything = config.on("*", lambda p: p["event"] == "boom" or 1 / 0)   # raises: isolated
    config["theme"] = "dark"
    del config["theme"]
    payload = seen.get(timeout=20)
    assert (payload["event"], payload["key"], payload["value"]) == ("set", "theme", "dark")
    assert payload["kind"] == "dict" and payload["name"] == f"{uid}-watched"
    handle.off()
    everything.off()
    config["theme"] = "light"
    with pytest.raises(queue_module.Empty):
        seen.get(timeout=0.2)


def test_same_api_structure_dump_load_and_async(anydb, uid):
    import asyncio
    config = anydb.dict(f"{uid}-c")
    config["a"] = 1
    data = config.dump()
    assert data["metadata"]["count"] == 1
    copy = anydb.dict(f"{uid}-copy")
    copy.load(data)
    assert copy["a"] == 1
    written = io.StringIO()                 # to a file object (the client's once raised)
    assert config.dump(written) is None
    assert json.loads(written.getvalue())["items"] == data["items"]
    copy.load(io.StringIO(written.getvalue()))
    assert copy.items() == [("a", 1)]

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


def test_client_close_ends_streams(server_url, uid):
    client = beaver.BeaverClient(server_url)
    subscription = client.channel(f"{uid}-closing").subscribe()
    client.close()
    assert list(subscription.listen(timeout=20)) == []


def test_client_errors(server_url):
    with pytest.raises(beaver.RemoteError):
        beaver.BeaverClient("http://127.0.0.1:1").dict("x")["k"]
    with pytest.raises(ValueError):
        beaver.BeaverClient("ftp://example.com")
    client = beaver.BeaverClient(server_url)
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
    assert 0 < api.get("/dicts/c/k?view=ttl").json() <= 60
    assert api.head("/dicts/c/missing").status_code == 404
    for key in ("keys", "count", "items", "a/b"):   # no route swallows these keys
        assert api.put(f"/dicts/c/{key}", json=key).status_code == 204
        assert api.get(f"/dicts/c/{key}").json() == key
    assert api.get("/dicts/c").json() == {"name": "c", "size": 5}
    assert api.get("/dicts/c?view=keys").json() == ["a/b", "count", "items", "k", "keys"]
    assert api.get("/dicts/c?view=items").json()[0] == ["a/b", "a/b"]
    assert api.get("/dicts/c?view=dump").json()["metadata"]["count"] == 5
    r = api.get('/dicts/c?view=dump&fp="out"')       # the file object is the client's own
    assert r.status_code == 422 and "fp" in r.json()["message"]
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
    assert api.get("/lists/l?view=items").json() == ["a", "x", "b", "c", "d"]
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
    assert api.post("/lists/l/pop").json() is None
    assert api.post("/lists/l/pop?index=3").status_code == 404
    assert api.get("/lists/l/items/abc").status_code == 422


def test_server_queue_routes(api):
    assert api.post("/queues/q/put?priority=5", json={"n": 1}).status_code == 204
    api.post("/queues/q/put", json={"n": 2})
    assert api.get("/queues/q/peek").json()["data"] == {"n": 2}
    assert [i["data"]["n"] for i in api.get("/queues/q?view=items").json()] == [2, 1]
    assert api.post("/queues/q/get").json()["data"] == {"n": 2}
    assert api.post("/queues/q/get?timeout=1").json()["priority"] == 5
    r = api.post("/queues/q/get?timeout=0.01")
    assert r.status_code == 408 and r.json()["error"] == "Timeout"
    assert api.post("/queues/q/get?block=false").status_code == 404
    assert api.post("/queues/q/get").status_code == 408   # capped by max_wait
    assert api.post("/queues/q/put?priority=nan", json=1).status_code == 422
    assert api.post("/queues/q/put?priority=1e308", json=1).status_code == 204   # no overflow


def test_server_keyed_queue_wait_reads_once_per_wake_up(tmp_path, monkeypatch):
    """A keyed blocking get through the server: its first attempt goes through the request
    record (a retry answers the same item), each later wake-up costs one look while the
    queue is empty, and the record is read again only by the take."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    reads = []
    for method in ("one", "execute"):
        original = getattr(beaver._Core, method)

        def spy(self, sql, params=(), original=original):
            reads.append(sql)
            return original(self, sql, params)
        monkeypatch.setattr(beaver._Core, method, spy)
    records = lambda: [sql for sql in reads if sql.startswith("SELECT status, body FROM "
                                                               "beaver_requests WHERE key")]
    looks = lambda: [sql for sql in reads if "SELECT EXISTS (SELECT 1 FROM beaver_queues" in sql]
    with BeaverDB(tmp_path / "api.db") as database, TestClient(beaver_server.create_app(
            database, max_wait=MP_DEADLINE)) as api:
        key = {"Idempotency-Key": "wait-1"}
        answers = []
        getter = threading.Thread(target=lambda: answers.append(
            api.post(f"/queues/q/get?timeout={MP_DEADLINE}", headers=key)))
        getter.start()
        _rt_until(lambda: records())                # the first attempt found nothing
        _rt_until(lambda: any(sql.startswith("SELECT min(until)") for sql in reads))  # cap
        mark = len(reads)
        try:
            for i in range(3):                      # wake-ups with nothing to take
                seen = len(looks())
                database.dict("d")[str(i)] = i
                _rt_until(lambda: len(looks()) > seen)
            woken = [sql for sql in reads[mark:] if "beaver_queue" in sql or sql in records()]
            assert woken == looks()[-len(woken):]   # each wake-up: one look, nothing else
            assert len(records()) == 1
        finally:
            database.queue("q").put("job")
            getter.join(MP_DEADLINE)
        assert answers[0].status_code == 200 and answers[0].json()["data"] == "job"
        assert len(records()) == 2                  # the take, under the write lock
        database.queue("q").put("other")
        again = api.post(f"/queues/q/get?timeout={MP_DEADLINE}", headers=key)
        assert again.json() == answers[0].json()    # the same item, nothing taken
        assert [item.data for item in database.queue("q")] == ["other"]


def test_server_blob_routes(api):
    r = api.put("/blobs/files/dir/a.txt", content=b"hello",
                headers={"Beaver-Metadata": '{"mimetype": "text/plain"}'})
    assert r.status_code == 204
    r = api.get("/blobs/files/dir/a.txt")
    assert r.content == b"hello" and r.headers["content-type"].startswith("text/plain")
    assert json.loads(r.headers["Beaver-Metadata"]) == {"mimetype": "text/plain"}
    assert api.head("/blobs/files/dir/a.txt").status_code == 200
    assert api.get("/blobs/files?view=keys").json() == ["dir/a.txt"]
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


def _big_dump(path, uid) -> int:
    """Write to ``path`` a dump of one list, bigger than the load spools keep in memory."""
    with BeaverDB(path.with_suffix(".db")) as db:
        db.list(f"big-{uid}").extend(f"{i:06d}" + "x" * 1000 for i in range(1500))
        with open(path, "w", encoding="utf-8") as f:
            db.dump(f)
    size = os.path.getsize(path)
    assert size > beaver._SPOOL_BYTES
    return size


class _PiecewiseBytes(io.BufferedReader):
    """A binary file that gives its content in pieces only: a read of it whole fails."""

    def read(self, size=-1):
        assert size is not None and size >= 0, "the whole file was read at once"
        return super().read(size)


class _PiecewiseText(io.TextIOWrapper):
    """The same for a text file."""

    def read(self, size=-1):
        assert size is not None and size >= 0, "the whole file was read at once"
        return super().read(size)


def test_client_load_sends_a_big_dump_in_pieces(served, tmp_path, uid):
    """A dump bigger than the spool loads through a real server, binary or text, without
    the client ever holding it whole."""
    dump = tmp_path / "big.jsonl"
    _big_dump(dump, uid)
    with beaver.BeaverClient(served[0]) as client:
        with _PiecewiseBytes(io.FileIO(dump)) as f:
            assert client.load(f) == 1
        with _PiecewiseText(_PiecewiseBytes(io.FileIO(dump)), encoding="utf-8") as f:
            assert client.load(f, mode="replace") == 1
        big = client.list(f"big-{uid}")
        assert len(big) == 1500 and big[-1].startswith("001499")


def test_client_load_of_a_compressed_file_sends_what_it_reads(served, tmp_path, uid):
    """A gzip file's descriptor has the size of the compressed bytes: it is read, not
    measured (its mode is not even a str on some Pythons)."""
    import gzip
    dump = tmp_path / "big.jsonl"
    _big_dump(dump, uid)
    packed = tmp_path / "big.jsonl.gz"
    packed.write_bytes(gzip.compress(dump.read_bytes()))
    with beaver.BeaverClient(served[0]) as client, gzip.open(packed, "rb") as f:
        assert client.load(f) == 1
        assert len(client.list(f"big-{uid}")) == 1500


def test_an_upload_that_fails_midway_leaves_no_half_sent_request(served, tmp_path, uid,
                                                                 monkeypatch):
    """A body that cannot be read to its end fails the call, and the connection it was
    half sent on is dropped: the next call goes on a new one and works."""
    dump = tmp_path / "big.jsonl"
    _big_dump(dump, uid)
    left = beaver._bytes_left
    monkeypatch.setattr(beaver, "_bytes_left", lambda fp: left(fp) + 50)   # it "shrank"
    with beaver.BeaverClient(served[0]) as client:
        client.dict(f"d-{uid}")["before"] = 1            # a connection to reuse
        with open(dump, "rb") as f, pytest.raises(ValueError, match="shorter"):
            client.load(f)
        client.dict(f"d-{uid}")["after"] = 2
        assert dict(client.dict(f"d-{uid}")) == {"before": 1, "after": 2}


def test_server_load_spools_a_big_body_to_disk(tmp_path, monkeypatch, uid):
    """The /load body goes to a spool that rolls over to a file past 1 MB (here sent
    chunked: no length known up front); past the body limit it is a 413, nothing loaded."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    dump = tmp_path / "big.jsonl"
    size = _big_dump(dump, uid)
    spools = []

    class Spool(tempfile.SpooledTemporaryFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spools.append(self)
    monkeypatch.setattr(beaver_server.tempfile, "SpooledTemporaryFile", Spool)

    def pieces(extra=b""):
        with open(dump, "rb") as f:
            yield from iter(lambda: f.read(1 << 16), b"")
        yield extra
    headers = {"Content-Type": "application/x-ndjson"}
    with BeaverDB(tmp_path / "api.db") as database, TestClient(beaver_server.create_app(
            database, max_body_bytes=size + 1000)) as api:
        r = api.post("/load", content=pieces(b"\n" * 1001), headers=headers)
        assert r.status_code == 413 and r.json()["error"] == "TooLarge"
        assert database.info()["structures"] == []
        r = api.post("/load", content=pieces(), headers=headers)
        assert r.status_code == 200 and r.json() == {"structures": 1}
        assert len(database.list(f"big-{uid}")) == 1500
    assert spools and all(spool.closed for spool in spools) and spools[-1]._rolled


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


def test_server_deeply_nested_json_is_400_not_500(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    with BeaverDB(tmp_path / "api.db") as database, TestClient(
            beaver_server.create_app(database, max_body_bytes=100_000)) as api:
        deep = "[" * 5000 + "]" * 5000
        for path in ["/dicts/d/k", "/lists/l/push", "/queues/q/put", "/channels/c/publish"]:
            r = getattr(api, "put" if path.startswith("/dicts") else "post")(
                path, content=deep.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, r.status_code, r.text[:200])
            assert r.json()["error"] == "ValueError" and "nested" in r.json()["message"]
        assert "k" not in database.dict("d") and len(database.list("l")) == 0


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
        assert client.get("/openapi.json").status_code == 401      # the docs follow the token
        assert client.get("/openapi.json", headers=ok).json()["paths"]["/dicts/{name}/{key}"]
        assert client.get("/docs", headers=ok).status_code == 200


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
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_keep_alive=0.2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _rt_until(lambda: server.started, 20)
        with pytest.raises(PermissionError):
            beaver.BeaverClient(f"http://127.0.0.1:{port}", token="wrong").dict("c")["k"] = 1
        good = beaver.BeaverClient(f"http://127.0.0.1:{port}", token="s3cret")
        good.dict("c")["k"] = 1
        assert good.dict("c")["k"] == 1
        idle = good._http._local.conn.sock
        assert select.select([idle], [], [], 20)[0]     # the server closed the idle socket
        good.dict("c")["k"] = 2                         # sent again on a fresh connection
        assert good.dict("c")["k"] == 2
        good.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ---- the network face: exactly-once, names, parity, transactions, waits, security ----

class _DroppingProxy:
    """A TCP proxy that forwards requests and, when armed, drops the connection as soon as
    the server starts answering: the server has done the work, the client never hears."""

    def __init__(self, upstream_url):
        self.upstream = ("127.0.0.1", int(upstream_url.rsplit(":", 1)[1]))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.drops, self.dropped, self.forwarded = 0, 0, 0
        self.on_drop = None
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, on_drop=None):
        with self.lock:
            self.drops, self.on_drop = 1, on_drop

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        while True:
            try:
                data = upstream.recv(65536)
            except OSError:
                data = b""
            with self.lock:
                drop = bool(data) and self.drops > 0
                if drop:
                    self.drops, self.dropped = self.drops - 1, self.dropped + 1
            if drop and self.on_drop is not None:
                self.on_drop()
            if not data or drop:
                for sock in (client, upstream):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                return
            with contextlib.suppress(OSError):
                client.sendall(data)

    def _pipe(self, source, target):
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    return
                target.sendall(data)
                self.forwarded += len(data)
            except OSError:
                return

    def close(self):
        self.listener.close()


@pytest.fixture(scope="module")
def served_on_the_loop(tmp_path_factory):
    """A ``beaver serve`` process without the reactor: (url, database path)."""
    path = tmp_path_factory.mktemp("server") / "loop.db"
    process, url = _start_server(path, "--max-wait", "2", "--direct-connections", "0")
    try:
        yield url, str(path)
    finally:
        _stop_server(process)


@pytest.fixture(params=["threads", "loop"])
def lossy(request):
    """(client through a dropping proxy, the proxy, a local BeaverDB on the served file), for
    a server with the reactor and for one serving everything on its event loop."""
    served = request.getfixturevalue("served" if request.param == "threads" else
                                     "served_on_the_loop")
    proxy = _DroppingProxy(served[0])
    client = beaver.BeaverClient(proxy.url)
    local = BeaverDB(served[1])
    yield client, proxy, local
    client.close()
    local.close()
    proxy.close()


def test_lost_response_list_push_and_queue_put_apply_once(lossy, uid):
    client, proxy, local = lossy
    proxy.arm()
    client.list(f"{uid}-l").push("once")
    proxy.arm()
    client.queue(f"{uid}-q").put("once")
    assert proxy.dropped == 2
    assert list(local.list(f"{uid}-l")) == ["once"] and len(local.queue(f"{uid}-q")) == 1


def test_lost_response_dict_set_and_index_are_not_applied_again(lossy, uid):
    client, proxy, local = lossy
    # between the lost answer and the retry, another writer changes the same data: a
    # re-applied request would undo that change, a replayed one leaves it
    proxy.arm(lambda: local.dict(f"{uid}-d").set("k", "other writer"))
    client.dict(f"{uid}-d")["k"] = "client"
    proxy.arm(lambda: local.collection(f"{uid}-c").drop("doc"))
    assert client.collection(f"{uid}-c").index(beaver.Document(id="doc", body="x")).id == "doc"
    assert proxy.dropped == 2
    assert local.dict(f"{uid}-d")["k"] == "other writer"
    assert "doc" not in local.collection(f"{uid}-c")


@pytest.mark.parametrize("lease", [None, 30])
def test_lost_response_queue_get_is_retried_to_the_same_item(lossy, uid, lease):
    client, proxy, local = lossy
    queue = local.queue(f"{uid}-q")
    queue.put("first")
    queue.put("second")
    proxy.arm()
    item = client.queue(f"{uid}-q").get(timeout=10, lease=lease)
    assert proxy.dropped == 1 and item.data == "first"
    assert [i.data for i in queue] == ["second"]
    if lease:
        assert client.queue(f"{uid}-q").ack(item) is True


def test_lost_response_blocking_get_waits_then_answers_the_same_item(lossy, uid):
    client, proxy, local = lossy
    got = []
    taker = threading.Thread(target=lambda: got.append(client.queue(f"{uid}-w").get(timeout=20)))
    proxy.arm()
    taker.start()
    _rt_until(lambda: proxy.forwarded > 0)     # the get has reached the server
    local.queue(f"{uid}-w").put("only")
    local.queue(f"{uid}-w").put("spare")
    taker.join(timeout=30)
    assert [i.data for i in got] == ["only"] and proxy.dropped == 1
    assert [i.data for i in local.queue(f"{uid}-w")] == ["spare"]


def test_lost_response_lock_acquire_takes_one_hold(lossy, uid):
    client, proxy, local = lossy
    lock = client.lock(f"{uid}-lock", ttl=60)
    proxy.arm()
    lock.acquire(timeout=10)
    assert proxy.dropped == 1 and local.lock(f"{uid}-lock").locked
    lock.release()
    assert not local.lock(f"{uid}-lock").locked     # no second hold left behind


def test_client_never_resends_a_write_without_a_key(lossy, uid):
    client, proxy, local = lossy
    proxy.arm()
    with pytest.raises(beaver.RemoteError):     # no Idempotency-Key: not sent again
        client._http.request("POST", f"/lists/{uid}-raw/push", b"1",
                             "Content-Type: application/json\r\n")
    assert list(local.list(f"{uid}-raw")) == [1]


@pytest.mark.parametrize("which", ["served", "served_on_the_loop"])
def test_remote_dict_get_answers_the_stored_text_and_still_flags_corrupt_text(which, uid,
                                                                             request):
    url, path = request.getfixturevalue(which)
    client, local = beaver.BeaverClient(url), BeaverDB(path)
    try:
        value = {"b": [1, 2.5, None, "é\u2028"], "a": {"": True}}
        client.dict(f"d-{uid}")["k"] = value
        assert client.dict(f"d-{uid}")["k"] == value == local.dict(f"d-{uid}")["k"]
        assert client.dict(f"d-{uid}").get("missing", 7) == 7
        with pytest.raises(KeyError):
            client.dict(f"d-{uid}")["missing"]
        local._core.execute("UPDATE beaver_dicts SET value = ? WHERE name = ?",
                            ("[" * 100_000 + "]" * 100_000, f"d-{uid}"))
        with pytest.raises(beaver.CorruptDatabase):
            client.dict(f"d-{uid}")["k"]
    finally:
        client.close()
        local.close()


def test_client_timeout_bounds_a_server_that_never_answers():
    import socket as _socket
    listener = _socket.create_server(("127.0.0.1", 0))
    accepted = []
    stop = threading.Event()

    def accept_and_stay_silent():
        listener.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])
    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    client = beaver.BeaverClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.2)
    try:
        with pytest.raises(beaver.RemoteError, match="timed out"):
            client.dict("d")["k"]
        client._http.connection(0.2).set_timeout(None)      # a stream's: no bound at all
        assert client._http.connection(0.2).sock.gettimeout() is None
    finally:
        stop.set()
        thread.join(_RT_DEADLINE)
        client.close()
        for conn in accepted:
            conn.close()
        listener.close()


NAMES = st.one_of(st.sampled_from(["team/members", "a%2Fb", "%", "line\nbreak", "..", ".",
                                   "x" * 5000, "é/ü", "😀", " lead", "tab\t", "?q=1", "#h"]),
                  st.text(min_size=1, max_size=30))
KEYS = st.one_of(st.sampled_from(["", "..", ".", "a/b", "/", "%2F", "\n", "x" * 6000]),
                 st.text(max_size=30))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=NAMES, key=KEYS, value=st.integers())
def test_remote_names_and_keys_match_the_local_oracle(served, name, key, value):
    client = beaver.BeaverClient(served[0])
    try:
        with BeaverDB(served[1]) as local:
            remote = client.dict(name)
            remote[key] = value
            assert local.dict(name)[key] == value and remote[key] == value
            assert key in remote and remote.ttl(key) is None
            assert sorted(remote) == sorted(local.dict(name))
            client.list(name).push(key)
            assert local.list(name)[-1] == key
            client.blobs(name).put(key, b"\x00bytes", metadata={"k": key})
            assert local.blobs(name)[key].metadata == {"k": key}
            assert client.blobs(name)[key].data == b"\x00bytes"
            del remote[key]
            assert key not in local.dict(name)
    finally:
        client.close()


def test_remote_clear_of_a_slashed_name_touches_only_that_name(anydb, uid):
    anydb.dict(f"{uid}-team")["members"] = 1
    anydb.dict(f"{uid}-team/members")["x"] = 2
    anydb.dict(f"{uid}-team/members").clear()
    assert anydb.dict(f"{uid}-team")["members"] == 1
    assert len(anydb.dict(f"{uid}-team/members")) == 0


def test_remote_misses_raise_what_local_raises(anydb, uid):
    config = anydb.dict(f"{uid}-d")
    with pytest.raises(KeyError) as missing:
        config.ttl("missing")
    assert missing.value.args == ("missing",)
    config["new\nline"] = 1
    assert config["new\nline"] == 1 and config.get("new\nline") == 1
    with pytest.raises(TypeError):
        config[3] = 1
    assert 3 not in config
    with pytest.raises(TypeError):
        anydb.dict("")
    with pytest.raises(IndexError):
        anydb.list(f"{uid}-l")[0]
    with pytest.raises(ValueError):
        anydb.list(f"{uid}-l").remove("absent")
    with pytest.raises(beaver.QueueEmpty):
        anydb.queue(f"{uid}-q").get(block=False)


def test_remote_has_what_was_missing(anydb, uid):
    docs = anydb.collection(f"{uid}-docs")
    assert docs.index_many([beaver.Document(id=str(i), body=f"text {i}") for i in range(3)]) == 3
    assert len(docs) == 3
    log = anydb.log(f"{uid}-log", retention=3600)
    assert log.retention == 3600.0
    log.log("ancient", timestamp=1.0)       # the first write prunes what the retention drops
    log.log("fresh")
    assert [e.data for e in log] == ["fresh"]
    channel = anydb.channel(f"{uid}-ch", retention=None, max_messages=2)
    assert (channel.retention, channel.max_messages) == (None, 2)
    for n in range(5):
        channel.publish(n)
    channel.prune()
    assert channel.history() == [3, 4]

    async def locked():
        async with anydb.lock(f"{uid}-lock").as_async() as held:
            return held.token is not None
    assert asyncio.run(locked())


def test_remote_transaction_commits_all_or_nothing(anydb, uid):
    accounts, ledger = anydb.dict(f"{uid}-accounts"), anydb.list(f"{uid}-ledger")
    accounts["alice"] = 100
    with anydb.transaction():
        accounts["alice"] = 90
        ledger.push({"from": "alice", "amount": 10})
        with anydb.transaction():           # nested blocks join the outer one
            accounts["bob"] = 10
    assert accounts["alice"] == 90 and list(ledger) == [{"from": "alice", "amount": 10}]
    assert accounts["bob"] == 10
    with pytest.raises(RuntimeError):
        with anydb.transaction():
            accounts["alice"] = 0
            ledger.push("never")
            raise RuntimeError("abort")
    assert accounts["alice"] == 90 and len(ledger) == 1
    with pytest.raises(KeyError):           # a failing write rolls the whole block back
        with anydb.transaction():
            accounts["carol"] = 5
            del accounts["nobody"]
    assert "carol" not in accounts


def test_remote_transaction_reads_and_results(server_url, uid):
    client = beaver.BeaverClient(server_url)
    try:
        config = client.dict(f"{uid}-c")
        config["k"] = "before"
        with client.transaction():
            config["k"] = "queued"
            assert config["k"] == "before"      # reads go to the server at once
            with pytest.raises(beaver.BeaverError):
                client.list(f"{uid}-l").pop()   # needs its result: not in a transaction
        assert config["k"] == "queued"
    finally:
        client.close()


_LOCAL_ONLY = {
    # BeaverDB: where the file is (the client has ``url`` instead)
    ("BeaverDB", "path"),
}


def _public(cls):
    return {name for name in dir(cls) if not name.startswith("_") or name in (
        "__getitem__", "__setitem__", "__delitem__", "__contains__", "__len__", "__iter__",
        "__reversed__", "__iadd__", "__bool__", "__enter__", "__exit__")}


def test_parity_every_local_method_has_its_remote_twin(server_url):
    import inspect
    client = beaver.BeaverClient(server_url)
    pairs = [(BeaverDB, beaver.BeaverClient), (beaver.Lock, beaver.RemoteLock)] + [
        (beaver._local_classes()[kind], type(getattr(client, factory)("parity")))
        for kind, factory in [("dict", "dict"), ("list", "list"), ("queue", "queue"),
                              ("blob", "blobs"), ("log", "log"), ("channel", "channel"),
                              ("collection", "collection")]]
    missing, different = [], []
    for local, remote in pairs:
        for name in sorted(_public(local) - {n for c, n in _LOCAL_ONLY if c == local.__name__}):
            if not hasattr(remote, name):
                missing.append(f"{local.__name__}.{name}")
                continue
            mine, theirs = inspect.getattr_static(local, name), inspect.getattr_static(remote, name)
            if isinstance(mine, property) != isinstance(theirs, property):
                different.append(f"{local.__name__}.{name}: property or not")
            elif callable(mine) and not isinstance(mine, property):
                if inspect.signature(getattr(local, name)).parameters != inspect.signature(
                        getattr(remote, name)).parameters:
                    different.append(f"{local.__name__}.{name}: "
                                     f"{inspect.signature(getattr(local, name))} != "
                                     f"{inspect.signature(getattr(remote, name))}")
    with BeaverDB(":memory:") as db:    # attributes set by the constructors
        for make in ("log", "channel"):
            for attribute in vars(getattr(db, make)("x")):
                if not attribute.startswith("_") and not hasattr(getattr(client, make)("x"),
                                                                 attribute):
                    missing.append(f"{make}.{attribute}")
        for attribute in vars(db.lock("x")):
            if not attribute.startswith("_") and not hasattr(client.lock("x"), attribute):
                missing.append(f"lock.{attribute}")
    client.close()
    assert missing == [] and different == []


def test_remote_error_table_follows_the_exception_classes():
    class BrandNewError(beaver.BeaverError):
        pass
    with pytest.raises(BrandNewError):
        beaver._raise_remote(500, b'{"error": "BrandNewError", "message": "m"}')
    with pytest.raises(KeyError):
        beaver._raise_remote(404, b'{"error": "KeyError", "message": "k"}')
    with pytest.raises(beaver.RemoteError):
        beaver._raise_remote(500, b'{"error": "SystemExit", "message": "no"}')


def _proc_usage(pid):
    """(threads, open file descriptors) of a process."""
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


async def _raw_requests(port, requests, hold=False):
    """Send raw HTTP requests on one connection each; their answers (or, with ``hold``, the
    open connections, answers unread)."""
    async def one(request):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        if hold:
            return reader, writer
        answer = await reader.read(65536)
        writer.close()
        return answer
    return await asyncio.gather(*(one(r) for r in requests))


def _raw(method, target, port, body=b""):
    return (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Beaver: 1\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("direct_connections", ["16", "0"])
def test_server_holds_500_waiting_consumers_without_threads(tmp_path, direct_connections):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    process, url = _start_server(tmp_path / "waits.db", "--max-wait", "60",
                                 "--connection-threads", direct_connections,   # the former name
                                 command=("-m", "beaver_server"))
    port = int(url.rsplit(":", 1)[1])
    client = beaver.BeaverClient(url)
    try:
        client.dict("d")["k"] = "v"

        async def scenario():
            await _raw_requests(port, [_raw("GET", "/dicts/d/k", port)] * 100)   # warm up
            baseline = _proc_usage(process.pid)
            held = await _raw_requests(port, [_raw("POST", "/queues/jobs/get?timeout=60", port)]
                                       * 500, hold=True)
            deadline = time.monotonic() + 60
            while json.loads(client._request("GET", "/"))["waits"] < 500:
                assert time.monotonic() < deadline, "the consumers never all waited"
                await asyncio.sleep(0.05)   # polling the server's count: nothing to wait on
            during = _proc_usage(process.pid)
            answer = await asyncio.wait_for(asyncio.to_thread(lambda: client.dict("d")["k"]),
                                            30)
            with BeaverDB(tmp_path / "waits.db") as local, local.transaction():
                for n in range(500):
                    local.queue("jobs").put(n)
            bodies = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in held)), 60)
            for _, writer in held:
                writer.close()
            return baseline, during, answer, bodies
        baseline, during, answer, bodies = asyncio.run(scenario())
        assert answer == "v"
        assert during[0] <= baseline[0] + 36, (baseline, during)    # the pool, not a thread each
        got = sorted(json.loads(b.split(b"\r\n\r\n", 1)[1])["data"] for b in bodies)
        assert got == list(range(500))                              # each item exactly once
        deadline = time.monotonic() + 30
        while True:         # their sockets closed; only new pool threads' SQLite files left
            threads, fds = _proc_usage(process.pid)
            if fds <= baseline[1] + 3 * (threads - baseline[0]) + 2:
                break
            assert time.monotonic() < deadline, (baseline, during, threads, fds)
            time.sleep(0.05)  # polling /proc: nothing to wait on
        assert threads <= during[0]
    finally:
        client.close()
        _stop_server(process)


def test_server_wait_ends_when_the_client_leaves(tmp_path):
    process, url = _start_server(tmp_path / "leave.db", "--max-wait", "60",
                                 command=("-m", "beaver_server"))
    port = int(url.rsplit(":", 1)[1])
    client = beaver.BeaverClient(url)
    try:
        async def leave():
            held = await _raw_requests(port, [_raw("POST", "/queues/q/get?timeout=60", port)]
                                       * 20, hold=True)
            deadline = time.monotonic() + 30
            while json.loads(client._request("GET", "/"))["waits"] < 20:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)   # polling the server's count: nothing to wait on
            for _, writer in held:
                writer.close()
        asyncio.run(leave())
        _rt_until(lambda: not json.loads(client._request("GET", "/"))["waits"], 30)
        with BeaverDB(tmp_path / "leave.db") as local:
            local.queue("q").put("kept")        # nobody takes it: the waiters are gone
            assert client.queue("q").get(timeout=10).data == "kept"
    finally:
        client.close()
        _stop_server(process)


def _worker_consumer(url, out, pids):
    client = beaver.BeaverClient(url)
    pid = json.loads(client._request("GET", "/"))["pid"]
    pids.append(pid)
    timeout = 60                # the first item may take a while: it comes once all wait
    try:
        while True:
            try:
                out.append((pid, client.queue("shared").get(timeout=timeout).data))
            except TimeoutError:
                return
            timeout = 2
    finally:
        client.close()


@pytest.mark.parametrize("direct_connections", ["1024", "0"])
def test_two_workers_serve_one_queue_without_duplicates(tmp_path, direct_connections):
    process, url = _start_server(tmp_path / "workers.db", "--workers", "2", "--max-wait", "5",
                                 "--direct-connections", direct_connections,
                                 command=("-m", "beaver_server"))
    try:
        seen, deadline = set(), time.monotonic() + 60
        while len(seen) < 2:                # both workers are up and listening
            assert time.monotonic() < deadline, f"workers {seen}"
            probe = beaver.BeaverClient(url)
            seen.add(json.loads(probe._request("GET", "/"))["pid"])
            probe.close()
        pids, out, threads = [], [], []
        while len(set(pids)) < 2 or len(threads) < 4:   # consumers on both workers
            assert time.monotonic() < deadline and len(threads) < 40, f"workers {pids}"
            thread = threading.Thread(target=_worker_consumer, args=(url, out, pids))
            thread.start()
            threads.append(thread)
            _rt_until(lambda: len(pids) == len(threads))
        with BeaverDB(tmp_path / "workers.db") as local, local.transaction():
            for n in range(300):
                local.queue("shared").put(n)
        for thread in threads:
            thread.join(timeout=90)
        assert sorted(n for _, n in out) == list(range(300))        # none twice, none lost
        assert len({pid for pid, _ in out}) == 2
    finally:
        _stop_server(process)


# ---- security ----

@pytest.fixture
def guarded(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    database = BeaverDB(tmp_path / "guarded.db")
    app = beaver_server.create_app(database, max_body_bytes=10_000, max_streams=2,
                                   cors_origins=["https://app.example"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        client.db, client.app = database, app
        yield client
    database.close()


@pytest.mark.parametrize("path", ["/lists/l/push", "/queues/q/put", "/load?mode=replace"])
def test_cross_site_form_posts_are_refused(guarded, path):
    body = b'{"beaver_dump": 1}\n' if path.startswith("/load") else b'"x"'
    r = guarded.post(path, content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"
    for headers in ({"Origin": "https://evil.example", "Content-Type": "application/json"},
                    {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}):
        assert guarded.post(path, content=body, headers=headers).status_code == 403
    assert guarded.db.info()["structures"] == []
    assert guarded.post("/lists/l/push", content=b'"ok"', headers={
        "Content-Type": "text/plain", "X-Beaver": "1"}).status_code == 204
    assert guarded.post("/lists/l/push", json="same", headers={
        "Origin": "http://127.0.0.1:8000"}).status_code == 204


def test_cors_only_for_the_given_origins(guarded):
    ok = guarded.options("/lists/l/push", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    r = guarded.post("/lists/l/push", json=1, headers={"Origin": "https://app.example"})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == \
        "https://app.example"
    bad = guarded.options("/lists/l/push", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in bad.headers


def test_loopback_server_refuses_foreign_host_names(served):
    port = int(served[0].rsplit(":", 1)[1])

    def status(host):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET /info HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                         .encode())
            return int(sock.recv(4096).split()[1])
    assert status("evil.example") == 403 and status(f"rebound.example:{port}") == 403
    assert status(f"localhost:{port}") == 200 and status(f"127.0.0.1:{port}") == 200
    assert status(f"[::1]:{port}") == 200


@pytest.mark.parametrize("value,insecure", [("false", False), ("no", False), ("0", False),
                                            ("off", False), ("true", True), ("YES", True),
                                            ("1", True), ("on", True)])
def test_insecure_environment_variable_is_a_strict_boolean(monkeypatch, value, insecure):
    pytest.importorskip("fastapi")
    import beaver_server
    monkeypatch.setenv("BEAVER_INSECURE", value)
    assert beaver_server._settings([], None)["insecure"] is insecure


def test_unknown_boolean_in_the_environment_is_an_error(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    import beaver_server
    monkeypatch.setenv("BEAVER_INSECURE", "maybe")
    assert beaver_server.main(["--host", "0.0.0.0"]) == 2
    assert "BEAVER_INSECURE" in capsys.readouterr().err
    monkeypatch.setenv("BEAVER_INSECURE", "false")
    assert beaver_server.main(["--host", "0.0.0.0", "--database", ":memory:"]) == 2


def test_body_limit_holds_on_every_route(guarded):
    big = {"query": "a " * 6000}
    assert guarded.post("/collections/c/match", json=big).status_code == 413
    assert guarded.put("/dicts/d/k", json="x" * 20_000).status_code == 413

    def chunks():           # no Content-Length: counted on the stream
        for _ in range(20):
            yield b"x" * 1000
    assert guarded.put("/blobs/b/k", content=chunks()).status_code == 413
    assert guarded.db.info()["structures"] == []


def test_limits_on_query_text_top_k_period_target_and_streams(guarded):
    r = guarded.post("/collections/c/match", json={"query": "a" * 5000})
    assert r.status_code == 422 and "at most" in r.json()["message"]
    assert guarded.post("/collections/c/match", json={"query": "a", "top_k": 10 ** 6}
                        ).status_code == 422
    assert guarded.get("/logs/l/live?period=0.001").status_code == 422
    assert guarded.get("/dicts/d/" + "k" * 20_000).status_code == 414
    server = guarded.app.beaver
    with server.waiting(), server.waiting():
        r = guarded.post("/queues/q/get?timeout=1")
        assert r.status_code == 503 and r.json()["error"] == "TooManyStreams"


def test_tokens_stay_out_of_the_access_log():
    pytest.importorskip("fastapi")
    import logging
    import beaver_server
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s"',
                               ("127.0.0.1", "GET", "/channels/c/ws?token=s3cret&x=1"), None)
    beaver_server._RedactTokens().filter(record)
    assert "s3cret" not in record.getMessage() and "x=1" in record.getMessage()


def test_websocket_takes_the_token_from_a_header_or_subprotocol(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    app = beaver_server.create_app(str(tmp_path / "ws.db"), token="s3cret")
    with TestClient(app) as client:
        with client.websocket_connect("/channels/c/ws", subprotocols=["beaver",
                                                                      "bearer.s3cret"]) as ws:
            ws.send_text('"hello"')
            assert json.loads(ws.receive_text()) == "hello"
        with pytest.raises(Exception):
            with client.websocket_connect("/channels/c/ws") as ws:
                ws.receive_text()


def test_connections_that_never_finish_their_headers_are_closed(tmp_path):
    process, url = _start_server(tmp_path / "loris.db", "--header-timeout", "0.5",
                                 command=("-m", "beaver_server"))
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\n")      # never finished
            assert sock.recv(1024) == b""           # closed by the server, not by our timeout
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
            assert idle.recv(1024) == b""           # a connection that sends nothing at all
    finally:
        _stop_server(process)


# ---- the reactor: the direct path answers as the event loop does ----

def _exchange(sock, request, read_body=True):
    """Send ``request`` (bytes) on ``sock``; ``(status, headers, body)`` of the answer, or
    None when the server closed the connection instead."""
    sock.sendall(request)
    return _read_answer(sock, read_body)


def _read_answer(sock, read_body=True):
    head = b""
    while not head.endswith(b"\r\n\r\n"):    # byte by byte: the next answer stays unread
        chunk = sock.recv(1)
        if not chunk:
            return None
        head += chunk
    head, data = head[:-4], b""
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                   (line.partition(":") for line in lines[1:]))
    length = int(headers.get("content-length", 0)) if read_body else 0
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            break
        data += chunk
    return int(lines[0].split()[1]), headers, data[:length]


def _raw_req(method, target, body=b"", token="s3cret", host="127.0.0.1", extra=""):
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{auth}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


@pytest.fixture(scope="module")
def two_paths(tmp_path_factory):
    """Two servers of one file with a token: with the reactor, and without."""
    path = tmp_path_factory.mktemp("paths") / "paths.db"
    started = [_start_server(path, "--token", "s3cret", "--max-body-size", "1000",
                             "--header-timeout", "1", "--cors-origin", "https://app.example",
                             *extra, command=("-m", "beaver_server"))
               for extra in (("--direct-connections", "2"), ("--direct-connections", "0"))]
    yield [int(url.rsplit(":", 1)[1]) for _, url in started]
    for process, _ in started:
        _stop_server(process)


_SAME_ANSWERS = [   # (request, whether the server closes the connection after it)
    (_raw_req("PUT", "/dicts/d/k", b'"v"', extra="Content-Type: application/json\r\n"), False),
    (_raw_req("GET", "/dicts/d/k"), False),
    (_raw_req("HEAD", "/dicts/d/k"), False),
    (_raw_req("GET", "/dicts/d/missing"), False),
    (_raw_req("GET", "/dicts/d/k?nonsense=1"), False),
    (_raw_req("GET", "/dicts/d%2Fk/k"), False),
    (_raw_req("POST", "/lists/l/push", b'"x"', extra="Content-Type: application/json\r\n"
                                                 "Idempotency-Key: same-key-1\r\n"), False),
    (_raw_req("POST", "/lists/l/push", b'"x"', extra="Content-Type: application/json\r\n"
                                                 "Idempotency-Key: same-key-1\r\n"), False),
    (_raw_req("GET", "/lists/l"), False),
    (_raw_req("GET", "/dicts/d/k", host="evil.example"), False),                # DNS rebinding
    (_raw_req("POST", "/lists/l/push", b'"x"', extra="Content-Type: text/plain\r\n"), False),
    (_raw_req("POST", "/lists/l/push", b'"x"', extra="Content-Type: application/json\r\n"
                                                 "Origin: https://evil.example\r\n"), False),
    (_raw_req("GET", "/dicts/d/k", extra="Origin: https://app.example\r\n"), False),  # CORS
    (_raw_req("GET", "/dicts/d/k", token=None), False),
    (_raw_req("GET", "/dicts/d/k", token="wrong"), False),
    (_raw_req("GET", "/" + "x" * 20_000), False),                                # too long
    (_raw_req("PUT", "/dicts/d/big", b'"' + b"x" * 2000 + b'"'), True),          # over the limit
    (_raw_req("POST", "/queues/q/get?timeout=0.2"), False),                    # waits: the loop
    (_raw_req("GET", "/info"), False),
    (_raw_req("GET", "/openapi.json"), False),                                  # FastAPI's route
    (b"PUT /dicts/d/chunked HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\n"
     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n\"c\"\r\n"
     b"0\r\n\r\n", False),
    (_raw_req("GET", "/dicts/d/chunked"), False),
]


def test_reactor_answers_as_the_event_loop_does(two_paths):
    answers = []
    for port in two_paths:
        seen = []
        for request, closes in _SAME_ANSWERS:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                status, headers, body = _exchange(sock, request)
                if closes:
                    assert sock.recv(1) == b""
                else:                       # the connection still serves the next request
                    assert _exchange(sock, _raw_req("GET", "/dicts/d/k"))[0] == 200
            seen.append((status, headers.get("content-type"), body,
                         headers.get("www-authenticate"), headers.get("content-length"),
                         headers.get("access-control-allow-origin")))
        answers.append(seen)
    direct, loop = answers
    for request, a, b in zip(_SAME_ANSWERS, direct, loop):
        if b"openapi" not in request[0] and b"/info" not in request[0]:
            assert a == b, request[0][:60]
        else:
            assert a[0] == b[0] == 200
    assert [a[0] for a in direct] == [204, 200, 200, 404, 422, 404, 204, 204, 200, 403, 403,
                                      403, 200, 401, 401, 414, 413, 408, 200, 200, 204, 200]
    assert direct[12][-1] == "https://app.example"


def test_a_connection_moves_to_the_event_loop_for_a_wait_and_keeps_serving(two_paths):
    port = two_paths[0]
    json_type = "Content-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert _exchange(sock, _raw_req("PUT", "/dicts/m/k", b"1", extra=json_type))[0] == 204
        sock.sendall(_raw_req("POST", "/queues/moving/get?timeout=20"))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as other:
            _rt_until(lambda: json.loads(_exchange(other, _raw_req("GET", "/"))[2])["waits"], 30)
            assert _exchange(other, _raw_req("POST", "/queues/moving/put", b'"job"',
                                     extra=json_type))[0] == 204
        status, _, body = _read_answer(sock)
        assert status == 200 and json.loads(body)["data"] == "job"
        # pipelined: two requests in one write, two answers in order
        sock.sendall(_raw_req("GET", "/dicts/m/k") + _raw_req("GET", "/dicts/m/missing"))
        assert _read_answer(sock)[0] == 200 and _read_answer(sock)[0] == 404
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # on the reactor
        sock.sendall(_raw_req("GET", "/dicts/m/k") + _raw_req("GET", "/dicts/m/missing"))
        assert _read_answer(sock)[0] == 200 and _read_answer(sock)[0] == 404


def test_reactor_never_waits_on_a_client_forever(two_paths):
    port = two_paths[0]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert _exchange(sock, _raw_req("PUT", "/dicts/d/k", b'"v"', extra="Content-Type: "
                                        "application/json\r\n"))[0] == 204
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(_raw_req("PUT", "/dicts/d/slow", b'"12345"')[:-3])    # the body never ends
        assert sock.recv(1024) == b""       # closed by the server (--header-timeout 1)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert _exchange(sock, _raw_req("GET", "/dicts/d/k"))[0] == 200
        assert sock.recv(1024) == b""       # idle keep-alive: closed after its deadline
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert _exchange(sock, _raw_req("GET", "/dicts/d/k"))[0] == 200    # threads are free again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reactor_leaks_no_threads_or_descriptors(tmp_path):
    process, url = _start_server(tmp_path / "leak.db", "--direct-connections", "3",
                                 command=("-m", "beaver_server"))
    port = int(url.rsplit(":", 1)[1])
    try:
        def burst(count):       # more connections than the reactor takes: some go to the loop
            socks = [socket.create_connection(("127.0.0.1", port), timeout=30)
                     for _ in range(count)]
            for n, sock in enumerate(socks):
                assert _exchange(sock, _raw("PUT", f"/dicts/leak/k{n}", port, b"1"))[0] == 204
                assert sock.recv(1) == b""      # Connection: close: the server closed it
                sock.close()
        burst(1)                # the server is up, its event loop running
        before = _open_sockets(process.pid)
        burst(10)
        _rt_until(lambda: _open_sockets(process.pid) <= before, timeout=30)
        baseline = _proc_usage(process.pid)     # the pool's threads and SQLite files made
        for _ in range(3):
            burst(20)
        _rt_until(lambda: _open_sockets(process.pid) <= before, timeout=30)
        threads, fds = _proc_usage(process.pid)
        # no thread more; the sockets all closed (above); other files: SQLite's, 2 or 3 per
        # thread that ever opened the database (one ended thread's may linger until another
        # thread opens a connection)
        assert threads <= baseline[0] and fds <= baseline[1] + 3, (baseline, threads, fds)
    finally:
        _stop_server(process)


def _open_sockets(pid) -> int:
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
               for fd in os.listdir(f"/proc/{pid}/fd"))


def test_a_server_with_open_direct_connections_stops_promptly(tmp_path):
    process, url = _start_server(tmp_path / "stop.db", command=("-m", "beaver_server"))
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
        assert _exchange(idle, _raw("GET", "/info", port).replace(b"Connection: close\r\n", b""))[0] \
            == 200                          # a keep-alive connection held by the reactor
        process.terminate()
        process.wait(timeout=20)           # uvicorn re-raises SIGTERM once it has stopped
        assert idle.recv(1024) == b""


def test_reactor_serves_only_plain_heads():
    pytest.importorskip("fastapi")
    import beaver_server
    plain = beaver_server._plain_head(b"PUT /dicts/d/k?ttl_seconds=5 HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 3\r\nConnection: close")
    assert (plain.method, plain.path, plain.query, plain.length, plain.close) == \
        ("PUT", b"/dicts/d/k", b"ttl_seconds=5", 3, True)
    assert plain.headers == {"host": "x", "content-length": "3", "connection": "close"}
    for head in (   # each is left to uvicorn (which refuses or serves it in its own way)
            b"GET /a HTTP/1.0\r\nHost: x", b"GET http://x/a HTTP/1.1\r\nHost: x",
            b"GET /a#frag HTTP/1.1\r\nHost: x", b"OPTIONS /a HTTP/1.1\r\nHost: x",
            b"GET /a HTTP/1.1\r\nHost: x\r\n folded", b"GET /a HTTP/1.1\r\nBad Name: x",
            b"GET /a HTTP/1.1\r\nHost: a\x00b", b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x",
            b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
            b"POST /a HTTP/1.1\r\nContent-Length: -1", b"POST /a HTTP/1.1\r\nContent-Length: 1x",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked", b"POST /a HTTP/1.1\r\nExpect: "
            b"100-continue", b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade",
            b"GET /a HTTP/1.1\r\nOrigin: https://app.example", b"GET  /a HTTP/1.1",
            b"GET /a HTTP/1.1\r\nHost: a\nb", b"GET /a HTTP/1.1\r\nHost: a\rb",
            b"GET /a HTTP/1.1\r\nHost: x\r\nno colon", b"GET /a HTTP/1.1\r\nHost: a\x01b",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\nX-B: 2", b"GET /a HTTP/1.1\r\n: x",
            b"PUT /a HTTP/1.1\r\nContent-Length: \xb2", b"PUT /a HTTP/1.1\r\nContent-Length: \xb9"):
        assert beaver_server._plain_head(head) is None, head


def test_reactor_remembers_a_bounded_number_of_head_lines_and_parses_them_alike():
    pytest.importorskip("fastapi")
    import beaver_server
    head = b"PUT /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nIdempotency-Key: k1"
    first, again = beaver_server._plain_head(head), beaver_server._plain_head(head)
    assert first == again and first.headers == {"host": "x", "content-length": "3",
                                                "idempotency-key": "k1"}
    assert "Idempotency-Key: k1" not in beaver_server._FIELDS_SEEN     # never seen twice
    beaver_server._plain_head(b"GET /d HTTP/1.1\r\nAuthorization: Bearer s3cret")
    assert not any("s3cret" in line for line in beaver_server._FIELDS_SEEN)   # nor secrets
    assert beaver_server._plain_head(head + b"\r\nContent-Length: 3") is None  # both known
    for i in range(3 * beaver_server._FIELDS_SEEN_MAX):      # a client making up lines
        beaver_server._plain_head(b"GET /d HTTP/1.1\r\nX-Made-Up: %d" % i)
    assert len(beaver_server._FIELDS_SEEN) <= beaver_server._FIELDS_SEEN_MAX
    long = b"GET /d HTTP/1.1\r\nX-Long: " + b"a" * 10_000
    assert beaver_server._plain_head(long).headers["x-long"] == "a" * 10_000
    assert not any(len(line) > 10_000 for line in beaver_server._FIELDS_SEEN)


# ---- the reactor, in this process: order, many connections, group commit, deadlines ----

@pytest.fixture
def reactor(tmp_path):
    """A reactor serving a database of this process with short deadlines: (reactor, port,
    db); ``reactor.handed`` has the bytes of each connection handed to the event loop."""
    db = BeaverDB(tmp_path / "reactor.db")
    try:
        with _running_reactor(db) as (reactor, port):
            yield reactor, port, db
    finally:
        db.close()


@contextlib.contextmanager
def _running_reactor(db):
    """A reactor serving ``db`` with short deadlines: ``(reactor, port)``."""
    pytest.importorskip("fastapi")
    import beaver_server
    app = beaver_server.create_app(db)
    listener = socket.create_server(("127.0.0.1", 0))
    handed = []

    def handoff(sock, pending):
        handed.append(pending)
        sock.close()
    reactor = beaver_server._Reactor(app.beaver, [listener], handoff, limit=100,
                                     header_timeout=0.5, keep_alive=0.5, send_timeout=0.5)
    reactor.handed = handed
    try:
        yield reactor, listener.getsockname()[1]
    finally:
        reactor.close()
        listener.close()
        app.beaver.executor.shutdown()


_JSON = "Content-Type: application/json\r\n"


def _req(method, target, body=b"", extra=""):
    return _raw_req(method, target, body, token=None, extra=_JSON + extra if body else extra)


def _answers(sock, count):
    return [_read_answer(sock) for _ in range(count)]


def test_reactor_keeps_a_connection_that_pipelines_past_the_header_timeout(reactor):
    """A client whose requests never stop coming (the input never empties) is served for
    as long as it sends: each request's head is due a header timeout after the one before
    was served, not after the first (0.5 s here)."""
    _, port, db = reactor
    db.dict("d")["k"] = 1
    count, started = 15_000, time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=MP_DEADLINE)
    request = _req("GET", "/dicts/d/k")
    def send():
        with contextlib.suppress(OSError):
            for _ in range(count // 1000):
                sock.sendall(request * 1000)
    sender = threading.Thread(target=send)
    sender.start()
    received, answers = b"", 0
    try:
        while answers < count:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            received = received[-12:] + chunk     # a status line cut in two counts once
            answers += received.count(b"HTTP/1.1 200 ")
    except ConnectionResetError:
        pass                                # counted below
    finally:
        sock.close()
        sender.join(MP_DEADLINE)
    assert answers == count, (answers, time.monotonic() - started)


def test_reactor_closes_a_head_trickled_a_byte_at_a_time(reactor):
    """Bytes that keep coming do not keep a head alive: it is due whole within the header
    timeout (0.5 s), however often a byte arrives."""
    _, port, _ = reactor
    head = _req("GET", "/dicts/d/" + "k" * 100)[:-4]      # 20 s at a byte per 0.2 s
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        closed = select.poll()
        closed.register(sock, select.POLLIN)
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if closed.poll(200):                # the pace of the trickle, 0.2 s a byte
                break
        assert sock.recv(1024) == b""           # closed by the server before the head ended


def test_reactor_answers_pipelined_requests_in_order(reactor):
    _, port, db = reactor
    requests = [   # reads inline, writes in a batch, scans in the pool: answers in order
        (_req("PUT", "/dicts/d/a", b"1"), 204, b""),
        (_req("GET", "/dicts/d/a"), 200, b"1"),
        (_req("POST", "/lists/l/push", b'"x"'), 204, b""),
        (_req("POST", "/lists/l/push", b'"y"'), 204, b""),
        (_req("GET", "/lists/l/slice"), 200, b'["x","y"]'),
        (_req("GET", "/dicts/d?view=keys"), 200, b'["a"]'),
        (_req("PUT", "/dicts/d/a", b"2"), 204, b""),
        (_req("GET", "/dicts/d/a"), 200, b"2"),
        (_req("POST", "/lists/l/pop"), 200, b'"y"'),
        (_req("DELETE", "/dicts/d/a"), 200, b"2"),
        (_req("GET", "/dicts/d/a"), 404, None),
        (_req("GET", "/lists/l"), 200, b'{"name":"l","size":1}'),
        (_req("HEAD", "/dicts/d/a"), 404, b""),
    ] + [(_req("PUT", f"/dicts/d/{n}", b"%d" % n), 204, b"") if n % 3 else
         (_req("GET", f"/dicts/d/{n - 2}"), 200 if n else 404, b"%d" % (n - 2) if n else None)
         for n in range(200)] + [(_req("GET", "/dicts/d/1"), 200, b"1")] * 150   # > a turn's
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"".join(r for r, _, _ in requests))
        answers = _answers(sock, len(requests))
        for (request, status, body), (got, _, data) in zip(requests, answers):
            assert got == status and (body is None or data == body), request[:40]
    assert list(db.list("l")) == ["x"] and "a" not in db.dict("d") and len(db.dict("d")) == 133


def test_reactor_serves_many_connections_at_once(reactor):
    _, port, db = reactor
    clients, rounds, errors = 50, 200, []

    def client(c):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                for i in range(rounds):
                    if i % 4 == 0:
                        assert _exchange(sock, _req("PUT", f"/dicts/d/{c}-{i}", b"%d" % i))[0] \
                            == 204
                    elif i % 4 == 1:
                        assert _exchange(sock, _req("GET", f"/dicts/d/{c}-{i - 1}"))[2] == \
                            b"%d" % (i - 1)
                    elif i % 4 == 2:
                        assert _exchange(sock, _req("POST", "/lists/l/push",
                                                    b'"%d-%d"' % (c, i)))[0] == 204
                    else:
                        assert _exchange(sock, _req("POST", "/queues/q/put", b"%d" % i))[0] == 204
        except Exception as e:          # reported below
            errors.append(e)
    threads = _run_in_threads(client, clients)
    assert errors == [] and not any(t.is_alive() for t in threads)
    quarter = clients * rounds // 4
    assert len(db.dict("d")) == quarter and db.dict("d")["7-40"] == 40
    assert sorted(db.list("l")) == sorted(f"{c}-{i}" for c in range(clients)
                                          for i in range(2, rounds, 4))
    assert len(db.queue("q")) == quarter


def _busy(reactor) -> bool:
    """Whether a request of the reactor runs (read from another thread: a copy of the list)."""
    return any(conn.busy for conn in list(reactor.connections.values()))


def _hold_the_writer(db, port, first):
    """Hold SQLite's write lock (as another process would) while ``first`` (a write) reaches
    the reactor, which waits for the lock: the writes sent meanwhile are all ready in its
    next round. ``(the socket of first, the release)``."""
    import sqlite3
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(first)
    return sock, lambda: (other.execute("ROLLBACK"), other.close())


def test_reactor_group_commit_rolls_back_only_the_failing_write(reactor, monkeypatch):
    r, port, db = reactor
    batches, local_function = [], beaver._local_function

    def recorded(calls, wait=True):
        batches.append(len(calls))
        return group_commit(calls, wait)
    group_commit, r.group_commit = r.group_commit, recorded

    def writes_then_fails(op):
        function = local_function(op)

        def run(manager, **kwargs):
            result = function(manager, **kwargs)
            if manager.name == "broken":    # its write is done: the savepoint must undo it
                raise RuntimeError("failed after writing")
            return result
        return run
    monkeypatch.setattr(beaver, "_local_function", writes_then_fails)
    seen = []
    db.dict("d").on("set", lambda payload: seen.append(payload["key"]))
    first, release = _hold_the_writer(db, port, _req("PUT", "/dicts/d/first", b"0"))
    _rt_until(lambda: _busy(r))
    requests = [_req("PUT", "/dicts/d/a", b"1", "Idempotency-Key: key-a\r\n"),
                _req("PUT", "/dicts/broken/b", b"2", "Idempotency-Key: key-b\r\n"),
                _req("DELETE", "/dicts/d/missing"),
                _req("PUT", "/dicts/broken/c", b"3"),
                _req("POST", "/lists/l/push", b'"kept"')]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in requests]
    for sock, request in zip(socks, requests):
        sock.sendall(request)
    release()
    try:
        assert _read_answer(first)[0] == 204
        statuses = [_read_answer(sock)[0] for sock in socks]
    finally:
        for sock in socks + [first]:
            sock.close()
    assert statuses == [204, 500, 404, 500, 204] and batches == [len(requests)]
    assert dict(db.dict("d").items()) == {"first": 0, "a": 1} and list(db.list("l")) == ["kept"]
    assert len(db.dict("broken")) == 0
    assert beaver._remembered(db, "key-a") is not None and beaver._remembered(db, "key-b") is None
    _rt_until(lambda: sorted(seen) == ["a", "first"])     # an event per committed write


def test_pg_reactor_writes_wait_in_the_pool_while_another_session_writes(pg_url):
    """On PostgreSQL, while another session holds the writers' lock, the reactor's writes
    wait for it in the pool: another connection's read is answered meanwhile."""
    with BeaverDB(pg_url) as db, BeaverDB(pg_url) as elsewhere, _running_reactor(db) as (r, port):
        db.dict("d")["k0"] = -1
        inside, release = threading.Event(), threading.Event()

        def hold():                         # the writers' lock, as another process holds it
            with elsewhere.transaction():
                inside.set()
                release.wait(MP_DEADLINE)
        holder = threading.Thread(target=hold)
        holder.start()
        assert inside.wait(MP_DEADLINE)
        puts = [_req("PUT", f"/dicts/d/k{i}", b"%d" % i, f"Idempotency-Key: pg-{i}\r\n")
                for i in range(4)]
        socks = [socket.create_connection(("127.0.0.1", port), timeout=MP_DEADLINE)
                 for _ in puts]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=MP_DEADLINE) as reader:
                for sock, request in zip(socks, puts):
                    sock.sendall(request)
                _rt_until(lambda: sum(conn.busy for conn in list(r.connections.values())) == 4)
                assert _exchange(reader, _req("GET", "/dicts/d/k0"))[2] == b"-1"
            release.set()
            statuses = [_read_answer(sock)[0] for sock in socks]
        finally:
            release.set()
            holder.join(MP_DEADLINE)
            for sock in socks:
                sock.close()
        assert statuses == [204] * 4
        assert dict(db.dict("d").items()) == {f"k{i}": i for i in range(4)}


def test_pg_reactor_runs_every_operation_in_the_pool(pg_url):
    """On PostgreSQL each operation is a network round trip: run on the reactor, they would
    run one at a time; all go to the pool, where a slow one holds up no other."""
    with BeaverDB(pg_url) as db, _running_reactor(db) as (r, port):
        db.dict("d")["k"] = 1
        execute, entered, release = r.server.execute, threading.Event(), threading.Event()

        def slow_for_one_key(op, name, options, kwargs, *args, **more):
            if "slow" in kwargs.values():
                entered.set()
                release.wait(MP_DEADLINE)
            return execute(op, name, options, kwargs, *args, **more)
        r.server.execute = slow_for_one_key
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow, \
                socket.create_connection(("127.0.0.1", port), timeout=30) as other:
            slow.sendall(_req("GET", "/dicts/d/slow"))
            assert entered.wait(MP_DEADLINE)
            try:
                assert _exchange(other, _req("GET", "/dicts/d/k"))[2] == b"1"
                assert _exchange(other, _req("PUT", "/dicts/d/k", b"2"))[0] == 204
                assert _exchange(other, _req("POST", "/queues/q/put", b'"job"'))[0] == 204
            finally:
                release.set()
            assert _read_answer(slow)[0] == 404
        assert db.dict("d")["k"] == 2 and len(db.queue("q")) == 1


def test_reactor_commit_failure_fails_every_write_of_the_batch(reactor, monkeypatch):
    r, port, db = reactor
    core, run = db._core, db._core._run

    def no_commit(conn, sql):
        if sql == "COMMIT" and _waits_in(threading.current_thread(), "group_commit"):
            raise beaver.DiskFull("the disk is full")
        return run(conn, sql)
    batches, group_commit = [], r.group_commit
    r.group_commit = lambda calls, wait=True: (batches.append(len(calls)),
                                               group_commit(calls, wait))[1]
    first, release = _hold_the_writer(db, port, _req("PUT", "/dicts/d/first", b"0"))
    _rt_until(lambda: _busy(r))
    monkeypatch.setattr(core, "_run", no_commit)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    for n, sock in enumerate(socks):
        sock.sendall(_req("PUT", f"/dicts/d/k{n}", b"1", f"Idempotency-Key: batch-{n}\r\n"))
    release()
    try:
        assert _read_answer(first)[0] == 204        # alone in its round: no batch
        assert [_read_answer(sock)[0] for sock in socks] == [507] * 3
    finally:
        for sock in socks + [first]:
            sock.close()
    monkeypatch.setattr(core, "_run", run)
    assert batches == [3]                           # the three failed together
    assert list(db.dict("d")) == ["first"] and beaver._remembered(db, "batch-0") is None


def _cap_the_file(conn, pages_more=2):
    """Let ``conn`` grow the file ``pages_more`` pages at most (SQLite's ``max_page_count``):
    a larger write fails with SQLITE_FULL, and SQLite rolls back the whole transaction."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + pages_more}")


def test_reactor_batch_rolled_back_by_the_engine_answers_every_write_with_its_error(reactor):
    """A write that fills the disk makes SQLite roll back the whole batch's transaction:
    every write of the batch is answered with that error (507 DiskFull), not a generic 500."""
    r, port, db = reactor
    batches, group_commit = [], r.group_commit
    r.group_commit = lambda calls, wait=True: (batches.append(len(calls)),
                                               group_commit(calls, wait))[1]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert _exchange(sock, _req("GET", "/dicts/d/x"))[0] == 404   # the reactor's connection
    _cap_the_file(next(conn for thread, conn in db._core._conns if thread is r.thread))
    first, release = _hold_the_writer(db, port, _req("PUT", "/dicts/d/first", b"0"))
    _rt_until(lambda: _busy(r))
    requests = [_req("PUT", "/dicts/d/a", b"1"),
                _req("PUT", "/dicts/d/big", b'"' + b"x" * 40_000 + b'"'),
                _req("PUT", "/dicts/d/c", b"3", "Idempotency-Key: full-c\r\n")]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in requests]
    for sock, request in zip(socks, requests):
        sock.sendall(request)
    release()
    try:
        assert _read_answer(first)[0] == 204        # alone in its round: no batch
        answers = [_read_answer(sock) for sock in socks]
    finally:
        for sock in socks + [first]:
            sock.close()
    assert batches == [3]
    assert [(status, json.loads(body)["error"]) for status, _, body in answers] == \
        [(507, "DiskFull")] * 3
    assert list(db.dict("d")) == ["first"] and beaver._remembered(db, "full-c") is None


def test_reactor_writes_wait_in_the_pool_while_a_pool_thread_holds_the_writer(reactor):
    r, port, db = reactor
    holding, release = threading.Event(), threading.Event()

    def hold():                         # as a long bulk write in the pool would
        with db._core.transaction():
            holding.set()
            release.wait(MP_DEADLINE)
    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(MP_DEADLINE)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as writer, \
            socket.create_connection(("127.0.0.1", port), timeout=30) as reader:
        writer.sendall(_req("PUT", "/dicts/d/k", b"1") + _req("GET", "/dicts/d/k"))
        _rt_until(lambda: _busy(r))
        assert _exchange(reader, _req("GET", "/dicts/d/k"))[0] == 404   # not stalled
        release.set()
        holder.join(MP_DEADLINE)
        assert [(a[0], a[2]) for a in _answers(writer, 2)] == [(204, b""), (200, b"1")]


class _TakenAsTheReactorLooks:
    """A core's writers' lock that ``take()`` (a pool thread's writer) takes the first time
    the reactor's thread looks at it: right after a look that found it free, or right
    before a try to take it. The worst moment for the reactor."""

    def __init__(self, lock, reactor_thread, take):
        self.lock, self.reactor_thread, self.take = lock, reactor_thread, take
        self.raced = False

    def race(self):
        if not self.raced and threading.current_thread() is self.reactor_thread:
            self.raced = True
            self.take()

    def locked(self):
        locked = self.lock.locked()
        self.race()
        return locked

    def acquire(self, *args, **kwargs):
        self.race()
        return self.lock.acquire(*args, **kwargs)

    def release(self):
        self.lock.release()


def test_reactor_never_waits_for_a_writer_that_comes_in_as_it_looks(reactor, monkeypatch):
    """A pool thread takes the write transaction just as the reactor goes to write: the
    reactor does not wait for it (the write waits in the pool); another connection's read
    is answered while the writer holds on, the write right after it lets go."""
    r, port, db = reactor
    holding, release = threading.Event(), threading.Event()

    def hold():                         # as a bulk write or a clear in the pool would
        with db._core.transaction():
            holding.set()
            release.wait(MP_DEADLINE)

    def take():
        held.append(r.server.executor.submit(hold))
        assert holding.wait(MP_DEADLINE)
    held = []
    monkeypatch.setattr(db._core, "_writers",
                        _TakenAsTheReactorLooks(db._core._writers, r.thread, take))
    with socket.create_connection(("127.0.0.1", port), timeout=MP_DEADLINE) as writer, \
            socket.create_connection(("127.0.0.1", port), timeout=MP_DEADLINE) as reader:
        try:
            writer.sendall(_req("PUT", "/dicts/d/k", b"1"))
            assert holding.wait(MP_DEADLINE)
            assert _exchange(reader, _req("GET", "/dicts/d/k"))[0] == 404    # not stalled
            assert select.select([writer], [], [], 0)[0] == []    # the write waits its turn
        finally:
            release.set()
        assert _read_answer(writer)[0] == 204
        assert _exchange(reader, _req("GET", "/dicts/d/k"))[2] == b"1"
    held[0].result(MP_DEADLINE)


def test_reactor_long_operations_run_in_the_pool_without_stalling_others(reactor):
    r, port, _ = reactor
    execute, entered, release = r.server.execute, threading.Event(), threading.Event()

    def slow_info(op, *args, **more):
        if op.method == "info":
            entered.set()
            release.wait(MP_DEADLINE)
        return execute(op, *args, **more)
    r.server.execute = slow_info
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow, \
            socket.create_connection(("127.0.0.1", port), timeout=30) as other:
        slow.sendall(_req("GET", "/info") + _req("PUT", "/dicts/d/after", b"1"))
        assert entered.wait(MP_DEADLINE)
        assert _exchange(other, _req("PUT", "/dicts/d/k", b"1"))[0] == 204
        assert _exchange(other, _req("GET", "/dicts/d/k"))[2] == b"1"
        assert _exchange(other, _req("GET", "/dicts/d/after"))[0] == 404  # waits its turn
        release.set()
        assert [a[0] for a in _answers(slow, 2)] == [200, 204]


def _fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reactor_closes_slow_silent_and_non_reading_clients_at_their_deadlines(reactor):
    r, port, db = reactor
    db.blobs("b").put("big", os.urandom(1 << 20))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert _exchange(sock, _req("GET", "/dicts/d/x"))[0] == 404       # up and running
    _rt_until(lambda: not r.connections)
    baseline, threads = _fds(), threading.active_count()
    silent = socket.create_connection(("127.0.0.1", port), timeout=30)
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    slow.sendall(_req("GET", "/dicts/d/x")[:20])                      # the head never ends
    body = socket.create_connection(("127.0.0.1", port), timeout=30)
    body.sendall(_req("PUT", "/dicts/d/x", b'"12345"')[:-3])          # the body never ends
    idle = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert _exchange(idle, _req("GET", "/dicts/d/x"))[0] == 404      # then keep-alive idle
    deaf = socket.create_connection(("127.0.0.1", port), timeout=30)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.sendall(_req("GET", "/blobs/b/big") * 8)                     # never reads a byte
    half = socket.create_connection(("127.0.0.1", port), timeout=30)
    half.sendall(_req("GET", "/dicts/d/x") + _req("GET", "/dicts/d/x")[:10])
    half.shutdown(socket.SHUT_WR)                                     # sends nothing more
    _rt_until(lambda: len(r.connections) >= 5)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as other:   # still served
        assert _exchange(other, _req("GET", "/blobs/b/big"))[2] == db.blobs("b")["big"].data
    assert _read_answer(half)[0] == 404 and half.recv(1) == b""      # answered, then closed
    for sock in (silent, slow, body, idle):
        assert sock.recv(1024) == b""           # closed by the server at its deadline
    _rt_until(lambda: not r.connections, timeout=30)                  # the deaf one too
    for sock in (silent, slow, body, idle, deaf, half):
        sock.close()
    assert _fds() == baseline and threading.active_count() == threads and r.handed == []


def test_reactor_hands_what_it_does_not_serve_to_the_event_loop_in_order(reactor):
    r, port, _ = reactor
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        wait = _req("POST", "/queues/q/get?timeout=5")
        sock.sendall(_req("PUT", "/dicts/d/k", b"1") + wait + _req("GET", "/dicts/d/k"))
        assert _read_answer(sock)[0] == 204 and sock.recv(1) == b""   # closed by the stub
    assert r.handed == [wait + _req("GET", "/dicts/d/k")]


def test_reactor_wait_for_another_process_lock_is_bounded_by_the_database_timeout(tmp_path):
    pytest.importorskip("fastapi")
    import sqlite3
    import beaver_server
    path = tmp_path / "locked.db"
    with BeaverDB(path, timeout=0.3) as db:
        app = beaver_server.create_app(db)
        listener = socket.create_server(("127.0.0.1", 0))
        r = beaver_server._Reactor(app.beaver, [listener], lambda s, p: s.close(), limit=10,
                                   header_timeout=30, keep_alive=30)
        other = sqlite3.connect(path, isolation_level=None)     # another process's writer
        try:
            with socket.create_connection(listener.getsockname(), timeout=30) as sock:
                assert _exchange(sock, _req("PUT", "/dicts/d/k", b"1"))[0] == 204
                other.execute("BEGIN IMMEDIATE")
                status, _, body = _exchange(sock, _req("PUT", "/dicts/d/k", b"2"))
                assert status == 503 and json.loads(body)["error"] == "DatabaseBusy"
                other.execute("ROLLBACK")
                assert _exchange(sock, _req("PUT", "/dicts/d/k", b"3"))[0] == 204
            assert db.dict("d")["k"] == 3
        finally:
            other.close()
            r.close()
            listener.close()
            app.beaver.executor.shutdown()


def test_reactor_close_stops_its_thread_and_closes_connections(tmp_path):
    pytest.importorskip("fastapi")
    import beaver_server
    with BeaverDB(tmp_path / "close.db") as db:
        app = beaver_server.create_app(db)
        listener = socket.create_server(("127.0.0.1", 0))
        r = beaver_server._Reactor(app.beaver, [listener], lambda s, p: s.close(), limit=10,
                                   header_timeout=5, keep_alive=5)
        with socket.create_connection(listener.getsockname(), timeout=30) as sock:
            assert _exchange(sock, _req("GET", "/dicts/d/k"))[0] == 404
            r.close()
            assert not r.thread.is_alive() and sock.recv(1) == b""
        listener.close()
        app.beaver.executor.shutdown()


def test_direct_connections_option_is_checked():
    pytest.importorskip("fastapi")
    code, lines = _one_line_error(["-m", "beaver_server", "--direct-connections", "-1"])
    assert code == 2 and len(lines) == 1 and "--direct-connections" in lines[0]


def _one_line_error(argv, **kwargs):
    here = os.path.dirname(os.path.abspath(beaver.__file__))
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": here}, **kwargs)
    return out.returncode, out.stderr.strip().splitlines()


def test_server_start_up_problems_print_one_line(tmp_path):
    pytest.importorskip("fastapi")
    code, lines = _one_line_error(["-m", "beaver_server", "--database",
                                   str(tmp_path / "missing" / "x.db")])
    assert code == 1 and len(lines) == 1 and "does not exist" in lines[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, lines = _one_line_error(["-m", "beaver_server", "--database",
                                       str(tmp_path / "x.db"), "--port",
                                       str(taken.getsockname()[1])])
    assert code == 1 and len(lines) == 1 and "cannot listen" in lines[0]
    code, lines = _one_line_error(["-c", "import sys, runpy; sys.modules['fastapi'] = None; "
                                   "sys.argv = ['beaver_server', '--database', 'x.db']; "
                                   "runpy.run_module('beaver_server', run_name='__main__')"],
                                  cwd=tmp_path)
    assert code == 1 and len(lines) == 1 and "[server]" in lines[0]
    out = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.modules['fastapi'] = "
                          "None; sys.argv = ['beaver_server', '--help']; "
                          "runpy.run_module('beaver_server', run_name='__main__')"],
                         capture_output=True, text=True, timeout=60, env={
                             **os.environ, "PYTHONPATH": os.path.dirname(beaver.__file__)})
    assert out.returncode == 0 and "--token" in out.stdout and "Traceback" not in out.stderr


def test_python_m_beaver_serve_imports_beaver_once():
    pytest.importorskip("fastapi")
    here = os.path.dirname(os.path.abspath(beaver.__file__))
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "beaver", "serve", "--help"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": here})
    assert out.returncode == 0
    imported = [line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:") and "|" in line]
    assert "beaver_server" in imported and "beaver" not in imported


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
    _settings = settings
except ImportError:  # pragma: no cover
    _schemathesis = None

if _schemathesis is not None:
    # streams (server-sent events) never end by themselves: they are tested on their own
    _lazy_schema = _schemathesis.pytest.from_fixture("fuzz_schema").exclude(
        path_regex=r"/(sse|live)$|^/events/")

    @_lazy_schema.parametrize()
    @_settings(max_examples=2, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))
    def test_server_fuzz_never_500(case):
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, response.text[:300])


# ---- dashboard: its routes (the browser drives it below) ----

def test_root_sends_a_browser_to_the_dashboard_and_answers_clients_in_json(api):
    assert api.get("/").json()["beaver"] == beaver.__version__
    r = api.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
                follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui"


def test_dashboard_files_are_served_with_a_strict_policy(api):
    page = api.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe" not in policy and page.headers["x-frame-options"] == "DENY"
    assert '<script src="/ui/dashboard.js">' in page.text and "<script>" not in page.text
    assert api.get("/ui/").text == page.text
    script = api.get("/ui/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text
    assert api.get("/ui/dashboard.css").headers["x-content-type-options"] == "nosniff"
    for missing in ("/ui/nope.js", "/ui/%2E%2E", "/ui/__init__.py"):
        assert api.get(missing).status_code == 404
    assert api.post("/ui", json={}).status_code == 405


def test_with_a_token_only_the_dashboard_files_are_public(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    app = beaver_server.create_app(str(tmp_path / "t.db"), token="s3cret")
    browser = {"Accept": "text/html"}
    with TestClient(app) as client:
        assert client.get("/ui").status_code == 200
        assert client.head("/ui/dashboard.js").status_code == 200
        assert client.get("/", headers=browser, follow_redirects=False).status_code == 303
        assert client.get("/").status_code == 401                 # the JSON answer: token
        for path in ("/ui/api/page/dict/d", "/ui/api/chart/l", "/info", "/ui/%64ashboard.js",
                     "/openapi.json"):
            assert client.get(path, headers=browser).status_code == 401, path
        assert client.post("/ui", headers=browser).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/ui/api/page/dict/d", headers=ok).json() == {"items": [],
                                                                         "more": False}


def test_dashboard_page_of_a_dict_has_ttls_filters_and_pages(api, clock):
    users = api.db.dict("users")
    for i in range(5):
        users.set(f"u{i}", {"age": 20 + i}, ttl_seconds=100 if i == 1 else None)
    r = api.get("/ui/api/page/dict/users", params={"limit": 2}).json()
    assert r == {"items": [{"key": "u0", "value": {"age": 20}, "ttl": None},
                           {"key": "u1", "value": {"age": 21}, "ttl": 100.0}], "more": True}
    r = api.get("/ui/api/page/dict/users", params={"offset": 3, "limit": 2}).json()
    assert [i["key"] for i in r["items"]] == ["u3", "u4"] and r["more"] is False
    where = json.dumps({"age": {"$gte": 23}})
    r = api.get("/ui/api/page/dict/users", params={"where": where}).json()
    assert [i["key"] for i in r["items"]] == ["u3", "u4"]
    bad = api.get("/ui/api/page/dict/users", params={"where": '{"age": {"$gt": null}}'})
    assert bad.status_code == 422 and "$gt" in bad.json()["message"]


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "offset=-1", "limit=1.5",
                                   "limit=true", "limit=x", "page=2"])
def test_dashboard_page_refuses_bad_paging(api, query):
    r = api.get(f"/ui/api/page/dict/d?{query}")
    assert r.status_code == 422 and r.json()["error"] == "ValueError"


def test_dashboard_pages_of_queues_blobs_and_collections(api):
    jobs = api.db.queue("jobs")
    for i in range(4):
        jobs.put({"job": i}, priority=3 - i)
    taken = jobs.get(lease=60)
    r = api.get("/ui/api/page/queue/jobs", params={"limit": 2}).json()
    assert [i["data"] for i in r["items"]] == [{"job": 2}, {"job": 1}] and r["more"] is True
    assert r["leased_count"] == 1 and r["leased"][0]["data"] == taken.data
    assert 0 < r["leased"][0]["expires_in"] <= 60
    api.db.blobs("files").put("a/b.txt", b"hello", {"mimetype": "text/plain"})
    assert api.get("/ui/api/page/blob/files").json() == {"items": [
        {"key": "a/b.txt", "size": 5, "metadata": {"mimetype": "text/plain"}}], "more": False}
    docs = api.db.collection("docs")
    docs.index(beaver.Document(id="b", body={"t": "x"}, embedding=[1.0, 2.0]))
    docs.index(beaver.Document(id="a", body="text"))
    assert api.get("/ui/api/page/collection/docs").json()["items"] == [
        {"id": "a", "body": "text", "dimensions": None},
        {"id": "b", "body": {"t": "x"}, "dimensions": 2}]
    assert api.get("/ui/api/page/list/l").status_code == 404          # lists have /slice
    assert api.get("/ui/api/page/queue/jobs?where={}").status_code == 422


def test_dashboard_chart_counts_a_logs_entries_over_time(api):
    log = api.db.log("requests")
    for i in range(10):
        log.log({"status": 500 if i % 3 == 0 else 200}, timestamp=1000 + i)
    r = api.get("/ui/api/chart/requests", params={"buckets": 3}).json()
    assert r == {"start": 1000.0, "end": 1009.0, "counts": [3, 3, 4]}
    where = json.dumps({"status": 500})
    r = api.get("/ui/api/chart/requests", params={"buckets": 2, "where": where}).json()
    assert r == {"start": 1000.0, "end": 1009.0, "counts": [2, 2]}
    assert api.get("/ui/api/chart/empty").json() == {"start": None, "end": None, "counts": []}
    assert api.get("/ui/api/chart/requests?buckets=0").status_code == 422
    assert api.get("/ui/api/chart/requests?limit=3").status_code == 422


# ---- dashboard: every page in a real browser (headless Chromium) ----
#
# Debian's chromium and chromium-driver, driven by selenium, against a real ``beaver serve``.
# Every page is checked for its content and for errors in the browser's console; names, keys
# and values are hostile HTML that must show as text.

HOSTILE = "<img src=x onerror=alert(1)>"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--window-size=1280,900")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (skipped, saying why, where it or selenium is missing)."""
    pytest.importorskip("selenium", reason="the dashboard test needs selenium (the [test] extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("the dashboard test needs Chromium and its driver: "
                    "apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.downloads = tmp_path_factory.mktemp("downloads")
    chrome.execute_cdp_cmd("Browser.setDownloadBehavior", {
        "behavior": "allow", "downloadPath": str(chrome.downloads)})
    try:
        yield chrome
    finally:
        chrome.quit()


def _fill_for_the_dashboard(db):
    users = db.dict("users")
    users.update({f"user{i:03d}": {"name": f"U{i}", "age": 20 + i % 50} for i in range(120)})
    users.set("session", {"user": 7}, ttl_seconds=3600)
    db.dict(HOSTILE).update({"<script>alert(2)</script>": "<b>bold</b>",
                             "big": [2 ** 63 - 1, -(2 ** 60) - 1, 0.1]})
    db.dict("..")["dots"] = "reached through /call"
    db.list("tasks").extend([{"task": i} for i in range(75)])
    jobs = db.queue("jobs")
    for i in range(6):
        jobs.put({"job": i}, priority=i % 3)
    jobs.get(lease=600)
    db.blobs("files").put(HOSTILE, b"hello", {"mimetype": "text/html", "note": HOSTILE})
    log = db.log("requests")
    start = time.time() - 3600
    for i in range(300):
        log.log({"status": 500 if i % 7 == 0 else 200, "i": i}, timestamp=start + i * 12)
    db.channel("chat").publish({"hello": HOSTILE})
    articles = db.collection("articles")
    for doc_id, title, lang, vector in [
            ("a1", "SQLite is an embedded database", "en", [1.0, 0.0, 0.0]),
            ("a2", "PostgreSQL is a database server", "en", [0.9, 0.1, 0.0]),
            ("a3", "Une base de données", "fr", [0.0, 1.0, 0.0])]:
        articles.index(beaver.Document(id=doc_id, embedding=vector,
                                       body={"title": title, "lang": lang}))
    articles.connect("a1", "a2", "RELATED", {"why": HOSTILE})
    articles.connect("a3", "a1", "TRANSLATES")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A real ``beaver serve`` of a filled database: (url, the database, has find)."""
    path = tmp_path_factory.mktemp("dashboard") / "shown.db"
    with BeaverDB(path) as db:
        _fill_for_the_dashboard(db)
    process, url = _start_server(path)
    db = BeaverDB(path)
    try:
        has_find = _http("POST", f"{url}/collections/articles/find", b'{"limit": 1}',
                         {"Content-Type": "application/json"})[0] != 404
        yield url, db, has_find
    finally:
        db.close()
        _stop_server(process)


def _until(browser, condition, what):
    """Wait for ``condition()``; elements a re-render replaced meanwhile mean "not yet"."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, 15, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda _: condition(), message=f"waited 15 s for {what}")


def _show(browser, url, route, expect):
    """Open ``#route`` of the dashboard and wait until the page shows ``expect``."""
    if browser.current_url.startswith(url + "/ui"):
        browser.execute_script("location.hash = arguments[0]", route)
    else:
        browser.get(f"{url}/ui{route}")
    return _text_shown(browser, expect)


def _text_shown(browser, expect, selector="main"):
    from selenium.webdriver.common.by import By
    node = browser.find_element(By.CSS_SELECTOR, selector)
    _until(browser, lambda: expect in node.text, f"{expect!r} in {selector}")
    return node


def _all(browser, selector):
    from selenium.webdriver.common.by import By
    return browser.find_elements(By.CSS_SELECTOR, selector)


def _console_errors(browser, allowed=()):
    """Errors the pages logged (script errors, CSP refusals, failed loads) beyond ``allowed``
    (regular expressions of expected failed loads)."""
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
            and not any(re.search(a, entry["message"]) for a in allowed)]


def _no_find_route(dashboard):
    """The failed load of POST .../find, expected while the server has no collection find."""
    return () if dashboard[2] else (r"/collections/[^ ]*/find - .* 404",)


def _live(browser):
    _until(browser, lambda: [s.text for s in _all(browser, ".state")] == ["live"],
           "the live tail to connect")


def _confirm(browser):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, 10).until(expected_conditions.alert_is_present()).accept()


def test_dashboard_overview_shows_every_structure_and_hostile_names_as_text(browser, dashboard):
    url, db, _ = dashboard
    browser.get(url + "/")                                  # a browser asking for / is sent on
    _until(browser, lambda: browser.current_url.startswith(url + "/ui"), "the redirect")
    main = _text_shown(browser, "collection")
    rows = [row.text for row in _all(browser, "main tbody tr")]
    for line in ["dict users 121", "list tasks 75", "queue jobs 5", "blob files 1",
                 "log requests 300", "channel chat 1", "collection articles 3",
                 f"dict {HOSTILE} 2", "dict .. 1"]:
        assert line in rows, (line, rows)
    assert re.fullmatch(r"\d+(\.\d)? (KB|MB)", browser.find_element("id", "file-size").text)
    assert db.info()["path"] in main.text
    assert not _all(browser, "img, main script, main b")     # the hostile names stayed text
    link = [a for a in _all(browser, "main a") if a.text == HOSTILE][0]
    link.click()
    _text_shown(browser, "<script>alert(2)</script>")
    shown = browser.find_element("css selector", "main").text
    assert '"<b>bold</b>"' in shown and "[9223372036854775807,-1152921504606846977,0.1]" in shown
    assert not _all(browser, "img, main script, main b")
    _show(browser, url, "#/dict/..", "reached through /call")   # a name a URL cannot hold
    assert _console_errors(browser) == []


def test_dashboard_dict_pages_filters_and_shows_ttl_left(browser, dashboard):
    url = dashboard[0]
    main = _show(browser, url, "#/dict/users", "user000")
    rows = _all(browser, "main tbody tr")
    assert len(rows) == 50 and rows[0].text.startswith("session {\"user\":7} 60 min")
    assert rows[1].text == 'user000 {"name":"U0","age":20} never'
    _all(browser, ".pager button")[1].click()               # Next
    _text_shown(browser, "51–100")
    assert _all(browser, "main tbody tr")[0].text.startswith("user049")
    search = browser.find_element("css selector", "form.filter input")
    search.send_keys('{"age": {"$gte": 68}}\n')
    _text_shown(browser, "1–4")
    assert [r.text.split()[0] for r in _all(browser, "main tbody tr")] == [
        "user048", "user049", "user098", "user099"]
    search.clear()
    search.send_keys('{"age": {"$gt": null}}\n')              # refused by the server: 422
    assert "$gt compares numbers or strings" in _text_shown(browser, "ValidationError").text
    search.clear()
    search.send_keys("{not json\n")
    _text_shown(browser, "not JSON")
    assert "user" in main.text and _console_errors(browser, [r"/ui/api/page/dict/.* 422"]) == []


def test_dashboard_list_queue_and_blob_pages(browser, dashboard):
    url, db, _ = dashboard
    _show(browser, url, "#/list/tasks", '{"task":49}')
    assert len(_all(browser, "main tbody tr")) == 50
    _all(browser, ".pager button")[1].click()
    _text_shown(browser, "51–75")
    assert _all(browser, "main tbody tr")[0].text == '50 {"task":50}'
    assert not _all(browser, ".pager button")[1].is_enabled()

    _show(browser, url, "#/queue/jobs", "Leased: 1")
    waiting, leased = _all(browser, "main table")
    assert [r.text.split(" ", 3)[1] for r in waiting.find_elements("css selector", "tbody tr")
            ] == ["0", "1", "1", "2", "2"]                  # priority order, FIFO among equals
    assert '{"job":3}' in waiting.text and '{"job":0}' in leased.text and " min" in leased.text

    main = _show(browser, url, "#/blob/files", "5 B")
    assert HOSTILE in main.text and '"note":"<img' in main.text and not _all(browser, "img")
    browser.find_element("css selector", "button.download").click()
    _until(browser, lambda: [p for p in browser.downloads.iterdir()
                             if not p.name.endswith(".crdownload")], "the download")
    (saved,) = [p for p in browser.downloads.iterdir()]
    assert saved.read_bytes() == b"hello"                     # saved, never rendered as HTML
    assert _console_errors(browser) == []


def test_dashboard_log_page_charts_filters_and_tails(browser, dashboard):
    url, db, _ = dashboard
    main = _show(browser, url, "#/log/requests", "300 entries")
    assert len(_all(browser, "svg.chart rect")) == 60
    assert _all(browser, ".paged tbody tr")[0].text.endswith('{"status":200,"i":299}')
    _live(browser)
    db.log("requests").log({"tail": HOSTILE})
    _text_shown(browser, '{"tail":"<img src=x onerror=alert(1)>"}', "table.live")
    browser.find_element("css selector", "form.filter input").send_keys('{"status": 500}\n')
    _text_shown(browser, "43 entries")
    assert "1–43" in main.text and '"i":294' in main.text and '"i":299' not in main.text
    assert _console_errors(browser) == []


def test_dashboard_channel_page_tails_and_publishes(browser, dashboard):
    url, db, _ = dashboard
    _show(browser, url, "#/channel/chat", '{"hello":"<img')
    _live(browser)
    assert not browser.find_element("css selector", "form.publish").is_displayed()
    db.channel("chat").publish({"from": "python"})
    _text_shown(browser, '{"from":"python"}', "table.live")
    browser.find_element("id", "editing").click()           # Allow changes: the form shows
    try:
        browser.find_element("css selector", "form.publish input").send_keys(
            '{"from": "the browser"}\n')
        _text_shown(browser, '{"from":"the browser"}', "table.live")
    finally:
        browser.find_element("id", "editing").click()
    assert db.channel("chat").history()[-1] == {"from": "the browser"}
    assert _console_errors(browser) == []


def test_dashboard_collection_searches_filters_and_walks_the_graph(browser, dashboard):
    url, db, has_find = dashboard
    main = _show(browser, url, "#/collection/articles", "Une base de données")
    browser.find_element("css selector", "form.search input").send_keys("datbase")
    browser.find_element("css selector", "form.search select option[value='1']").click()
    browser.find_element("css selector", "form.search button").click()
    _text_shown(browser, "2 found")
    hits = [r.text.split()[0] for r in _all(browser, "table.hits tbody tr")]
    assert sorted(hits) == ["a1", "a2"] and "[" in main.text    # highlighted snippets
    _until(browser, lambda: browser.execute_script(
        "return document.querySelector('form.filter') !== null && "
        "document.querySelector('form.filter').closest('[hidden]') === null") == has_find,
        "the filter box to match the server's find route")
    if has_find:
        browser.find_element("css selector", "form.filter input").send_keys('{"lang": "fr"}\n')
        _until(browser, lambda: [r.text.split()[0] for r in _all(browser, ".paged tbody tr")]
               == ["a3"], "the filtered documents")
    [a for a in _all(browser, "main a") if a.text == "a1"][0].click()
    main = _text_shown(browser, "More like this")
    _text_shown(browser, "0.1414")                           # a2, the nearest vector
    assert "SQLite is an embedded database" in main.text and "3 dimensions" in main.text
    graph = [r.text for r in _all(browser, "table.graph tbody tr")]
    assert graph == ['→ RELATED a2 {"why":"<img src=x onerror=alert(1)>"}', "← TRANSLATES a3"]
    assert not _all(browser, "img")
    assert _console_errors(browser, _no_find_route(dashboard)) == []


def test_dashboard_writes_only_behind_allow_changes_and_a_confirmation(browser, dashboard):
    url, db, _ = dashboard
    _show(browser, url, "#/dict/users", "user001")
    delete = [b for b in _all(browser, "main tbody tr button")
              if b.get_attribute("textContent") == "Delete"]
    assert delete and not any(b.is_displayed() for b in delete)     # read-only by default
    browser.find_element("id", "editing").click()
    try:
        row = [r for r in _all(browser, "main tbody tr") if r.text.startswith("user001")][0]
        row.find_element("css selector", "button").click()
        _confirm(browser)
        _until(browser, lambda: "user001" not in db.dict("users"), "the key deleted")
        _until(browser, lambda: "user001" not in browser.find_element("css selector",
                                                                      "main").text, "the row")
        _show(browser, url, "#/list/tasks", '{"task":0}')
        browser.find_element("css selector", ".actions button").click()   # Clear
        _confirm(browser)
        _text_shown(browser, "nothing here")
        assert len(db.list("tasks")) == 0
    finally:
        browser.find_element("id", "editing").click()
    assert _console_errors(browser) == []


def test_dashboard_asks_for_the_token_and_keeps_it_out_of_urls(browser, tmp_path):
    path = tmp_path / "guarded.db"
    with BeaverDB(path) as db:
        db.channel("news").publish("first")
    process, url = _start_server(path, "--token", "s3cret-token")
    try:
        browser.get(url + "/ui#/channel/news")
        token = _text_shown(browser, "wants its token").find_element("css selector", "input")
        token.send_keys("wrong\n")
        _text_shown(browser, "That token was refused")
        browser.find_element("css selector", "form.login input").send_keys("s3cret-token\n")
        _text_shown(browser, '"first"')
        _live(browser)                                      # the stream carries the token too
        with BeaverDB(path) as db:
            db.channel("news").publish("second")
        _text_shown(browser, '"second"', "table.live")
        urls = browser.execute_script("return performance.getEntries().map(e => e.name)")
        assert urls and not [u for u in urls if "s3cret" in u]
        assert _console_errors(browser, [r" 401 "]) == []
    finally:
        browser.get("about:blank")                          # closes the stream
        _stop_server(process)


# ---- import from upstream beaver-db ----
#
# fixtures/upstream-*.db were written by the public beaver-db package through its API
# (scripts/make_upstream_fixtures.py); fixtures/upstream-*.json hold what that package's API
# read back from each file.

UPSTREAM = sorted((ROOT / "fixtures").glob("upstream-*.db"))
UPSTREAM_SKIPPED = {   # what each fixture holds that an import must report and not copy
    "1": {"expired_keys": {"app_config": 1}, "encrypted_dicts": {"vault": 1},
          "sketches": {"visitors": 1}, "locks": {"nightly": 1},
          "event_messages": {"__beaver_events__": 1}},
    "2": {"expired_keys": {"app_config": 1}, "encrypted_dicts": {"vault": 1},
          "sketches": {"visitors": 1}, "locks": {"nightly": 1},
          "event_messages": {"__events_deployments__": 1}, "vector_metadata": {"articles": 1},
          "placeholder_documents": {"people": 3}},
}


@pytest.fixture(params=UPSTREAM, ids=lambda path: path.stem)
def upstream(request, tmp_path):
    """(a copy of an upstream fixture in its own folder, what beaver-db read from it)."""
    folder = tmp_path / "old"
    folder.mkdir()
    old = folder / request.param.name
    shutil.copyfile(request.param, old)
    return old, json.loads(request.param.with_suffix(".json").read_text("utf-8"))


def _imported(upstream, tmp_path):
    old, want = upstream
    report = beaver.import_upstream(old, tmp_path / "new.db")
    return BeaverDB(tmp_path / "new.db"), report, want


def test_upstream_fixtures_cover_both_major_versions():
    assert [p.name for p in UPSTREAM] == ["upstream-1.3.0.db", "upstream-2.4.1.db"]
    for path in UPSTREAM:
        assert path.stat().st_size < 300_000 and path.with_suffix(".json").exists()
        assert not Path(str(path) + "-wal").exists()


def test_upstream_version_tells_1x_2x_and_others_apart(upstream, tmp_path):
    old, want = upstream
    conn = sqlite3.connect(old)
    try:
        assert beaver._upstream_version(conn) == want["version"][0] + ".x"
    finally:
        conn.close()
    BeaverDB(tmp_path / "own.db").close()
    for path in (tmp_path / "own.db", tmp_path / "empty.db"):
        conn = sqlite3.connect(path)
        try:
            assert beaver._upstream_version(conn) is None
        finally:
            conn.close()


def test_import_upstream_copies_every_structure(upstream, tmp_path):
    db, report, want = _imported(upstream, tmp_path)
    with db:
        for name, items in want["dicts"].items():
            assert dict(db.dict(name).items()) == items
        for name, items in want["lists"].items():
            assert list(db.list(name)) == items                     # order kept
        assert [[i.priority, i.data] for i in db.queue("jobs")] == want["queues"]["jobs"]
        assert [db.queue("jobs").get(block=False).data for _ in range(3)] == [
            "taken", {"job": "first"}, "second"]                    # priority, then FIFO
        files = db.blobs("files")
        for key, (data, metadata) in want["blobs"]["files"].items():
            assert files.get(key) == (key, base64.b64decode(data), metadata)
        assert [[e.timestamp.timestamp(), e.data] for e in db.log("metrics")] == \
            want["logs"]["metrics"]                                 # timestamps kept
        assert [m["payload"] for m in db.channel("chat").dump()["items"]] == \
            want["channels"]["chat"]
    assert report["structures"]["dict"] == {n: len(v) for n, v in want["dicts"].items()}
    assert report["structures"]["list"] == {n: len(v) for n, v in want["lists"].items()}
    assert report["structures"]["queue"] == {"jobs": 5}
    assert report["structures"]["blob"] == {"files": 3}
    assert report["structures"]["log"] == {"metrics": 5}
    assert report["structures"]["channel"] == {"chat": 3}
    assert report["skipped"] == UPSTREAM_SKIPPED[want["version"][0]]
    assert report["unknown_tables"] == ["app_notes"]
    assert report["upstream"] == want["version"][0] + ".x" and report["dry_run"] is False


def test_import_upstream_collections_documents_vectors_edges(upstream, tmp_path):
    db, report, want = _imported(upstream, tmp_path)
    with db:
        for name, expected in want["collections"].items():
            coll = db.collection(name)
            got = {d.id: {"body": d.body, "embedding": d.embedding} for d in coll}
            placeholders = set(got) - set(expected["documents"])
            assert {k: got[k] for k in expected["documents"]} == expected["documents"]
            assert all(got[k] == {"body": None, "embedding": None} for k in placeholders)
            assert len(placeholders) == report["skipped"].get(
                "placeholder_documents", {}).get(name, 0)
            edges = sorted([e["source"], e["target"], e["label"], e["metadata"]]
                           for e in coll.dump()["edges"])
            width = len(expected["edges"][0]) if expected["edges"] else 4
            assert [e[:width] for e in edges] == expected["edges"]
            assert report["structures"]["collection"][name] == {
                "documents": len(got), "edges": len(edges), "metric": coll.metric,
                "vectors": sum(d["embedding"] is not None for d in got.values())}
            assert coll.metric == ("l2" if want["version"][0] == "1" else "cosine")
        articles = db.collection("articles")
        assert [d.id for d, _ in articles.match("castor")] == ["beaver"]
        assert [d.id for d, _ in articles.match("castr", fuzziness=1)] == ["beaver"]
        assert articles.match("searchable") == []                   # upstream fts=False
        assert [d.id for d, _ in articles.match("server", on=["meta.kind"])] == ["postgres"]
        assert articles.search([0.9, 0.1, 0.0, 0.5], top_k=1)[0][0].id == "beaver"
        assert [d.id for d in articles.neighbors("sqlite", label="MENTIONS")] == ["beaver"]
        assert [d.id for d in db.collection("people").walk("ana", depth=2)] == ["bo", "cy"]


def test_import_upstream_keeps_expiry(upstream, tmp_path, clock):
    old, want = upstream
    (expires_at,) = raw_rows(old, "SELECT expires_at FROM {} WHERE key = 'session'".format(
        "beaver_dicts" if want["version"][0] == "1" else "__beaver_dicts__"))[0]
    db, report, _ = _imported(upstream, tmp_path)
    with db:
        config = db.dict("app_config")
        assert "stale" not in config and config["session"] == {"user": "alice"}
        assert abs(config.ttl("session") - (expires_at - clock.now)) < 1e-3
        clock.advance(expires_at - clock.now + 1)
        assert "session" not in config and len(config) == 3


def test_import_upstream_never_changes_the_source(upstream, tmp_path):
    old, _ = upstream
    before = old.read_bytes()
    beaver.import_upstream(old, tmp_path / "new.db")
    beaver.import_upstream(old, tmp_path / "dry.db", dry_run=True)
    assert old.read_bytes() == before
    assert os.listdir(old.parent) == [old.name]                   # no -wal / -shm left beside it


def test_import_upstream_reads_rows_still_in_the_wal(upstream, tmp_path):
    old, want = upstream
    writer = sqlite3.connect(old, isolation_level=None)          # an upstream app, still open
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        table = "beaver_dicts" if want["version"][0] == "1" else "__beaver_dicts__"
        writer.execute(f"INSERT INTO {table} VALUES ('late', 'k', '\"in the wal\"', NULL)")
        assert os.path.getsize(str(old) + "-wal") > 0
        report = beaver.import_upstream(old, tmp_path / "new.db")
    finally:
        writer.close()
    assert report["structures"]["dict"]["late"] == 1
    with BeaverDB(tmp_path / "new.db") as db:
        assert db.dict("late")["k"] == "in the wal"


def test_import_upstream_dry_run_counts_and_writes_nothing(upstream, tmp_path, capsys):
    old, _ = upstream
    dry = beaver.import_upstream(old, tmp_path / "new.db", dry_run=True)
    assert not (tmp_path / "new.db").exists() and dry["dry_run"] is True
    code, out, err = _cli(capsys, "import-upstream", str(old), str(tmp_path / "new.db"),
                          "--dry-run")
    assert (code, err) == (0, "") and json.loads(out) == dry
    assert not (tmp_path / "new.db").exists()
    real = beaver.import_upstream(old, tmp_path / "new.db")
    assert {k: v for k, v in real.items() if k != "dry_run"} == \
        {k: v for k, v in dry.items() if k != "dry_run"}


def test_cli_import_upstream(upstream, tmp_path, capsys):
    old, want = upstream
    code, out, err = _cli(capsys, "import-upstream", str(old), str(tmp_path / "new.db"))
    assert (code, err) == (0, "")
    assert json.loads(out)["structures"]["list"]["tasks"] == len(want["lists"]["tasks"])
    assert _cli(capsys, "-d", str(tmp_path / "new.db"), "list", "tasks", "len")[1] == \
        f"{len(want['lists']['tasks'])}\n"
    code, out, err = _cli(capsys, "import-upstream", str(old), str(tmp_path / "new.db"))
    assert code == 1 and "FileExistsError" in err and "exists" in err
    assert _cli(capsys, "import-upstream", "--help")[0] == 0
    assert _cli(capsys, "import-upstream", str(old))[0] == 2
    assert "import-upstream" in _cli(capsys, "--help")[1]


def test_import_upstream_refuses_what_it_cannot_read(tmp_path, capsys):
    (tmp_path / "text.db").write_text("not a database at all, just text " * 100)
    sqlite3.connect(tmp_path / "plain.db").execute("CREATE TABLE t (x)").connection.close()
    BeaverDB(tmp_path / "ours.db").close()
    for name, message in [("text.db", "not a SQLite database"),
                          ("plain.db", "holds no beaver-db 1.x or 2.x tables"),
                          ("ours.db", "is a beaver database already")]:
        with pytest.raises(beaver.SchemaError, match=message):
            beaver.import_upstream(tmp_path / name, tmp_path / "new.db")
        code, _, err = _cli(capsys, "import-upstream", str(tmp_path / name),
                            str(tmp_path / "new.db"))
        assert code == 1 and message in err
    with pytest.raises(FileNotFoundError):
        beaver.import_upstream(tmp_path / "missing.db", tmp_path / "new.db")
    assert not (tmp_path / "new.db").exists()


def test_import_upstream_never_overwrites_new(upstream, tmp_path):
    old, _ = upstream
    (tmp_path / "new.db").write_bytes(b"precious")
    for dry_run in (False, True):
        with pytest.raises(FileExistsError):
            beaver.import_upstream(old, tmp_path / "new.db", dry_run=dry_run)
    with pytest.raises(FileExistsError):
        beaver.import_upstream(old, old)
    assert (tmp_path / "new.db").read_bytes() == b"precious"


def test_import_upstream_failure_leaves_no_new_file(upstream, tmp_path):
    old, want = upstream
    table = "beaver_lists" if want["version"][0] == "1" else "__beaver_lists__"
    conn = sqlite3.connect(old)
    conn.execute(f"UPDATE {table} SET item_value = '{{broken' WHERE item_value = '3'")
    conn.commit()
    conn.close()
    with pytest.raises(beaver.SchemaError, match="cannot import list 'tasks'"):
        beaver.import_upstream(old, tmp_path / "new.db")
    assert sorted(os.listdir(tmp_path)) == ["old"]


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
    assert run("queue", "q", "put", "leased")[0] == 0
    leased = json.loads(run("queue", "q", "get", "--lease", "30")[1])
    assert leased["data"] == "leased"
    assert run("queue", "q", "nack", str(leased["lease_id"]))[0] == 0
    leased = json.loads(run("queue", "q", "get", "--lease", "30")[1])
    assert run("queue", "q", "ack", str(leased["lease_id"]))[1] == "true\n"
    assert run("queue", "q", "ack", str(leased["lease_id"]))[0] == 1
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


def test_cli_copy(capsys, dbfile, tmp_path, monkeypatch):
    with BeaverDB(dbfile) as db:
        _fill(db)
    copy = str(tmp_path / "copy.db")
    assert _cli(capsys, "copy", dbfile, copy) == (0, '{\n  "structures": 4\n}\n', "")
    with BeaverDB(dbfile) as a, BeaverDB(copy) as b:
        assert _dump_lines_of(a)[2:] == _dump_lines_of(b)[2:]    # all but the expiring key
    code, out, err = _cli(capsys, "copy", dbfile, copy)
    assert code == 1 and out == "" and "already holds" in err and "--append" in err
    assert _cli(capsys, "copy", "--append", dbfile, copy)[0] == 0
    assert _cli(capsys, "copy", dbfile, copy, "--replace")[0] == 0
    with BeaverDB(copy) as b:
        assert len(b.list("daily_tasks")) == 4
    missing = str(tmp_path / "typo.db")
    code, _, err = _cli(capsys, "copy", missing, copy)
    assert code == 1 and "no database" in err and not os.path.exists(missing)
    assert _cli(capsys, "copy", dbfile, dbfile)[0] == 1
    assert _cli(capsys, "copy", dbfile)[0] == 2
    assert _cli(capsys, "copy", "--append", "--replace", dbfile, copy)[0] == 2
    code, out, _ = _cli(capsys, "copy", "--help")
    assert code == 0 and "usage: beaver copy" in out and "http(s)://" in out
    assert "copy every structure of SRC into DST" in _cli(capsys, "--help")[1]

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert beaver.main(["copy", "--replace", dbfile, copy]) == 0
    shown = terminal.getvalue()
    assert shown.startswith("\r0/10 items copied") and shown.endswith("\r10/10 items copied\n")


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


def test_cli_reads_never_create_a_database(capsys, tmp_path):
    typo = str(tmp_path / "typo.db")
    for argv in (["info"], ["dict", "c", "get", "k"], ["dump"], ["queue", "q", "peek"],
                 ["collection", "c", "match", "x"], ["lock", "x", "status"]):
        code, out, err = _cli(capsys, "--database", typo, *argv)
        assert code == 1 and out == "" and "no database" in err, argv
    assert not os.path.exists(typo)
    assert _cli(capsys, "--database", typo, "dict", "c", "set", "k", "v")[0] == 0   # a write may
    assert _cli(capsys, "--database", typo, "dict", "c", "get", "k")[1] == '"v"\n'


def test_cli_raw_and_has(capsys, dbfile):
    assert _cli(capsys, "-d", dbfile, "dict", "c", "set", "k", "two words")[0] == 0
    assert _cli(capsys, "-d", dbfile, "--raw", "dict", "c", "get", "k")[1] == "two words\n"
    assert _cli(capsys, "-d", dbfile, "--raw", "dict", "c", "keys")[1] == '[\n  "k"\n]\n'
    assert _cli(capsys, "-d", dbfile, "dict", "c", "has", "k") == (0, "true\n", "")
    assert _cli(capsys, "-d", dbfile, "dict", "c", "has", "zz") == (1, "false\n", "")


def _all_parsers(parser):
    import argparse
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_cli_every_option_has_help_and_shows_its_default():
    for kind in list(beaver.CLI_KINDS) + [None]:
        for parser in _all_parsers(beaver._cli_parser(kind)):
            text = parser.format_help()
            for action in parser._actions:
                if action.dest in ("help", "version") or not action.option_strings:
                    continue
                assert action.help, (parser.prog, action.option_strings)
                entry = text.split("options:", 1)[1].split(action.option_strings[0], 1)[1]
                assert "default" in entry.split("\n  -", 1)[0], (parser.prog,
                                                                 action.option_strings)


def test_cli_progress_only_on_a_terminal(capsys, dbfile, tmp_path, monkeypatch):
    with BeaverDB(dbfile) as db:
        db.list("l").extend(range(10))
    assert _cli(capsys, "-d", dbfile, "dump")[2] == ""           # not a terminal: silent

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert beaver.main(["-d", dbfile, "dump"]) == 0
    assert "lines dumped" in terminal.getvalue()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "body": f"text {i}"}) + "\n"
                            for i in range(2500)))
    assert beaver.main(["-d", dbfile, "collection", "c", "index-many", str(docs)]) == 0
    assert "documents read" in terminal.getvalue()
    with BeaverDB(dbfile) as db:
        assert len(db.collection("c")) == 2500


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
    assert out.returncode == 0 and out.stderr == ""
    assert all(kind in out.stdout for kind in ("dict", "list", "queue", "blob", "log", "channel",
                                               "lock", "collection", "serve", "backup"))
    out = subprocess.run([sys.executable, "-m", "beaver", "dict"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 2 and "usage:" in out.stderr


# ---- hot paths: single-statement fast paths and their fallbacks ----
# list pop/deque and queue get take an item with DELETE ... RETURNING where SQLite has it;
# both paths must behave alike, events included.

@pytest.mark.parametrize("returning", [True, False])
def test_list_ends_and_queue_get_with_and_without_returning(tmp_path, monkeypatch, returning):
    if returning and not beaver._HAS_RETURNING:
        pytest.skip("this SQLite has no usable RETURNING")
    monkeypatch.setattr(beaver, "_HAS_RETURNING", returning)
    with BeaverDB(tmp_path / "r.db") as db:
        items = db.list("items")
        items.extend([None, 0, "x", {"a": [1]}, None])     # stored nulls are items, not "empty"
        assert (items.pop(), items.deque(), len(items)) == (None, None, 3)
        assert (items.pop(), items.deque(), items.pop(), len(items)) == ({"a": [1]}, 0, "x", 0)
        assert (items.pop(), items.deque()) == (None, None)
        jobs = db.queue("jobs")
        for i, priority in enumerate([2, 1, 2, 1]):
            jobs.put({"i": i}, priority=priority)
        got = [jobs.get(block=False) for _ in range(4)]
        assert [(g.priority, g.data["i"]) for g in got] == [(1, 1), (1, 3), (2, 0), (2, 2)]
        with pytest.raises(beaver.QueueEmpty):
            jobs.get(block=False)


@pytest.mark.parametrize("returning", [True, False])
def test_fast_paths_still_emit_events(tmp_path, monkeypatch, returning):
    if returning and not beaver._HAS_RETURNING:
        pytest.skip("this SQLite has no usable RETURNING")
    monkeypatch.setattr(beaver, "_HAS_RETURNING", returning)
    with BeaverDB(tmp_path / "e.db") as db:
        received, done = [], threading.Event()

        def callback(payload):
            received.append({k: v for k, v in payload.items() if k not in ("kind", "name")})
            if payload["event"] == "get":
                done.set()
        items, jobs = db.list("items"), db.queue("jobs")
        items.on("*", callback)
        jobs.on("*", callback)
        items.push("a")
        items.push("b")
        assert (items.pop(), items.deque()) == ("b", "a")
        jobs.put([1], priority=3)
        assert jobs.get(block=False).data == [1]
        assert done.wait(MP_DEADLINE)
        assert received == [{"event": "push", "value": "a"}, {"event": "push", "value": "b"},
                            {"event": "pop", "index": 1}, {"event": "deque"},
                            {"event": "put", "priority": 3, "data": [1]},
                            {"event": "get", "priority": 3, "data": [1], "lease": None}]


# ---- client and server: logs, channels, collections ----

def test_same_api_log(anydb, uid):
    import datetime as dt
    metrics = anydb.log(f"{uid}-metrics")
    t0 = time.time()
    metrics.log({"cpu": 0.1}, timestamp=t0 - 10)
    metrics.log({"cpu": 0.2}, timestamp=dt.datetime.fromtimestamp(t0 - 5, dt.timezone.utc))
    metrics.log({"cpu": 0.3})
    assert len(metrics) == 3
    entries = metrics.range(start=t0 - 6)
    assert [e.data["cpu"] for e in entries] == [0.2, 0.3]
    assert entries[0].timestamp.tzinfo is not None
    assert abs(entries[0].timestamp.timestamp() - (t0 - 5)) < 1e-3
    assert [e.data["cpu"] for e in metrics] == [0.1, 0.2, 0.3]
    with metrics.live(window=60, period=0.05, aggregator=len) as view:
        assert next(iter(view)) == 3
        metrics.log({"cpu": 0.4})
        deadline = time.monotonic() + 20
        for count in view:
            if count == 4 or time.monotonic() > deadline:
                break
    assert count == 4


def test_same_api_channel(anydb, uid):
    events = anydb.channel(f"{uid}-events")
    events.publish("before")            # published before subscribing: not received
    with events.subscribe() as listener:
        events.publish({"event": "login", "user": "alice"})
        events.publish([1, 2])
        received = []
        for message in listener.listen(timeout=20):
            received.append(message)
            if len(received) == 2:
                break
    assert received == [{"event": "login", "user": "alice"}, [1, 2]]
    assert events.history() == ["before", {"event": "login", "user": "alice"}, [1, 2]]
    assert events.history(limit=1) == [[1, 2]] and len(events) == 3
    with events.subscribe() as listener:
        with pytest.raises(TimeoutError):
            listener.get(timeout=0.05)


def test_same_api_async_channel_and_live(anydb, uid):
    import asyncio

    async def run():
        achannel = anydb.channel(f"{uid}-achat").as_async()
        async with achannel.subscribe() as sub:
            await achannel.publish({"text": "hi"})
            async for message in sub.listen(timeout=20):
                break
        alog = anydb.log(f"{uid}-alog").as_async()
        await alog.log(1)
        async with alog.live(window=60, period=0.05, aggregator=sum) as view:
            async for total in view:
                break
        return message, total
    assert asyncio.run(run()) == ({"text": "hi"}, 1)


def test_same_api_collection(anydb, uid):
    articles = anydb.collection(f"{uid}-articles")
    doc = beaver.Document(id="sqlite-001",
                          body="SQLite is a powerful embedded database ideal for local apps.")
    assert articles.index(doc, fts=True, fuzzy=True) is doc
    articles.index(beaver.Document(id="pg", embedding=[0.0, 1.0], body={"title": "PostgreSQL"}))
    articles.index(beaver.Document(id="duck", embedding=[1.0, 0.0], content="DuckDB analytics"))
    results = articles.match(query="datbase", fuzziness=1)
    top_doc, rank = results[0]
    assert top_doc.id == "sqlite-001" and top_doc.body == doc.body and isinstance(rank, float)
    assert [d.id for d, _ in articles.match("analytics")] == ["duck"]
    assert articles.match("PostgreSQL", on=["title"])[0][0].id == "pg"
    assert [d.id for d, _ in articles.search([0.9, 0.1], top_k=1)] == ["duck"]
    assert articles["duck"].content == "DuckDB analytics" and "pg" in articles
    assert articles.get("missing") is None and "missing" not in articles and len(articles) == 3
    articles.connect("sqlite-001", "pg", "RELATED", metadata={"w": 1})
    articles.connect("pg", "duck", "RELATED")
    assert [d.id for d in articles.neighbors("sqlite-001")] == ["pg"]
    assert [d.id for d in articles.walk("sqlite-001", labels=["RELATED"], depth=2)] == ["pg", "duck"]
    assert articles.edges("pg", direction="incoming") == [
        beaver.Edge("sqlite-001", "pg", "RELATED", {"w": 1})]
    data = articles.dump()
    assert len(data["edges"]) == 2
    articles.disconnect("pg", "duck")
    articles.drop("duck")
    with pytest.raises(KeyError):
        articles.drop("duck")
    with pytest.raises(KeyError):
        articles["duck"]
    assert sorted(d.id for d in articles) == ["pg", "sqlite-001"]
    copy = anydb.collection(f"{uid}-copy", metric="cosine")
    copy.load(data)
    assert len(copy) == 3 and copy.metric == "cosine"
    assert [d.id for d in copy.walk("sqlite-001", depth=2)] == ["pg", "duck"]


def _query_notes(coll):
    """The same collection queries for every face: (find, count, match, search, explain).
    (Text scores depend on every text of the file, so matches are compared by their ids.)"""
    work = {"tags": {"$contains": "work"}, "year": {"$gte": 2020}}
    return ([(d.id, d.body) for d in coll.find(work, order_by="-year")],
            [d.id for d in coll.find(order_by=["lang", "-year"], limit=2, offset=1)],
            coll.count(work), coll.count({"lang": {"$exists": False}}),
            sorted(d.id for d, _ in coll.match("notes", where={"lang": "en"})),
            sorted(d.id for d, _ in coll.match("ntes", fuzziness=1, where={"year": [2019, 2022]})),

            [(d.id, round(s, 4)) for d, s in coll.search([1.0, 0.0], top_k=2, where=work)],
            coll.explain(where={"year": 2024})["index"])


NOTES = [("n1", {"year": 2024, "tags": ["work", "ai"], "lang": "en", "t": "my notes"}, [1.0, 0.1]),
         ("n2", {"year": 2019, "tags": ["home"], "lang": "fr", "t": "notes"}, [0.0, 1.0]),
         ("n3", {"year": 2022, "tags": ["work"], "t": "old notes"}, [0.9, 0.0]),
         ("n4", {"year": "2023", "tags": ["work"], "lang": "en", "t": "notes"}, [1.0, 0.0])]


def test_same_api_collection_queries(anydb, uid):
    """find, count, explain, indexes and where= on match and search, in-process and over
    HTTP, give the same answers as in-process (BeaverDB on its own file)."""
    notes = anydb.collection(f"{uid}-notes")
    notes.index_many(Document(id=i, body=b, embedding=e) for i, b, e in NOTES)
    with BeaverDB(":memory:") as local:
        reference = local.collection("notes")
        reference.index_many(Document(id=i, body=b, embedding=e) for i, b, e in NOTES)
        reference.create_index("year")
        expected = _query_notes(reference)
    assert expected[:2] == ([("n1", NOTES[0][1]), ("n3", NOTES[2][1])], ["n4", "n1"])
    assert expected[4:6] == (["n1", "n4"], ["n2", "n3"]) and expected[-1] == "year"
    notes.create_index("year")
    assert notes.indexes() == ["year"]
    assert _query_notes(notes) == expected
    assert notes.drop_index("year") is True and notes.explain(where={"year": 1})["index"] is None
    with pytest.raises(ValueError, match=r"\$bogus"):
        notes.find({"year": {"$bogus": 1}})
    with pytest.raises(ValueError):
        notes.search([1.0, 0.0], where={"$or": []})


def test_cli_collection_queries(capsys, dbfile):
    with BeaverDB(dbfile) as db:
        notes = db.collection("notes")
        notes.index_many(Document(id=i, body=b, embedding=e) for i, b, e in NOTES)
        notes.create_index("year")
        expected = _query_notes(notes)
    for mode in ((), ("client",)):
        run = lambda *a: json.loads(_cli(capsys, *mode, "-d", dbfile, "collection", "notes",
                                         *a)[1])  # noqa: E731
        work = json.dumps({"tags": {"$contains": "work"}, "year": {"$gte": 2020}})
        got = ([(d["id"], d["body"]) for d in run("find", "--where", work, "--order-by=-year")],
               [d["id"] for d in run("find", "--order-by", '["lang", "-year"]', "--limit", "2",
                                     "--offset", "1")],
               run("count", "--where", work), run("count", "--where", '{"lang": {"$exists": false}}'),
               sorted(h["document"]["id"] for h in run("match", "notes", "--where",
                                                       '{"lang": "en"}')),
               sorted(h["document"]["id"] for h in run("match", "ntes", "-f", "1", "--where",
                                                       '{"year": [2019, 2022]}')),
               [(h["document"]["id"], round(h["score"], 4))
                for h in run("search", "[1.0, 0.0]", "-k", "2", "--where", work)],
               run("explain", "--where", '{"year": 2024}')["index"])
        assert got == expected
        assert run("indexes") == ["year"]
        code, out, err = _cli(capsys, *mode, "-d", dbfile, "collection", "notes", "find",
                              "--where", '{"year": {"$bogus": 1}}')
        assert code == 1 and out == "" and "$bogus" in err


def test_server_channel_sse_and_websocket(api):
    with api.websocket_connect("/channels/c/ws") as ws:
        api.post("/channels/c/publish", json={"y": 2})
        assert json.loads(ws.receive_text()) == {"y": 2}
        ws.send_text("plain text")
        assert ws.receive_text() == '"plain text"'
    assert api.db.channel("c").history() == [{"y": 2}, "plain text"]


def test_server_log_and_collection_routes(api):
    assert api.post("/logs/m/log?timestamp=100", json={"cpu": 1}).status_code == 204
    assert api.get("/logs/m/range?start=50&end=150").json() == [{"timestamp": 100.0,
                                                                  "data": {"cpu": 1}}]
    assert api.get("/logs/m?view=items").json()[0]["data"] == {"cpu": 1}
    r = api.post("/collections/a/index", json={"document": {"id": "x/1",
                                                            "body": {"t": "hello world"}}})
    assert r.json() == {"id": "x/1"}
    assert api.get("/collections/a/documents/x/1").json()["body"] == {"t": "hello world"}
    assert api.head("/collections/a/documents/nope").status_code == 404
    hits = api.post("/collections/a/match", json={"query": "hello", "highlight": True}).json()
    assert hits[0]["document"]["id"] == "x/1" and "[hello]" in hits[0]["snippet"]
    assert api.post("/collections/a/match", json={"query": '"sqlite-001" AND ( -'}).status_code == 200
    assert api.post("/collections/a/search", json={"vector": [1.0]}).json() == []
    assert api.post("/collections/a/connect", json={"source": "x/1", "target": "nope",
                                                    "label": "L"}).status_code == 404
    assert api.post("/collections/a/index", json={"fts": 3}).status_code == 422
    assert api.put("/collections/a", json={"metric": "cosine"}).status_code == 422
    assert api.delete("/collections/a/documents/x/1").status_code == 204
    assert api.get("/collections/a?view=items").json() == []


def test_cli_spec_collection_match(capsys, dbfile):
    with BeaverDB(dbfile) as db:
        db.collection("articles").index(beaver.Document(
            id="sqlite-001", body="SQLite is a powerful embedded database ideal for local apps."),
            fts=True, fuzzy=True)
    code, out, _ = _cli(capsys, "--database", dbfile, "collection", "articles", "match",
                        "datbase", "--fuzziness", "1")
    hits = json.loads(out)
    assert code == 0 and len(hits) == 1 and set(hits[0]) == {"document", "score"}
    assert hits[0]["document"] == {"id": "sqlite-001", "embedding": None, "body":
                                   "SQLite is a powerful embedded database ideal for local apps."}
    code, out, _ = _cli(capsys, "--database", dbfile, "collection", "my_documents", "dump")
    assert code == 0 and json.loads(out)["metadata"]["type"] == "collection"


def test_cli_collection_graph_log_channel(capsys, dbfile):
    run = lambda *a: _cli(capsys, "-d", dbfile, *a)  # noqa: E731
    assert run("collection", "c", "index", '{"id": "a", "body": "alpha"}')[1] == '"a"\n'
    assert run("collection", "c", "index", '{"title": "beta"}', "--id", "b")[0] == 0
    assert run("collection", "c", "connect", "a", "b", "NEXT", "-m", '{"w": 2}')[0] == 0
    assert json.loads(run("collection", "c", "neighbors", "a")[1])[0]["id"] == "b"
    assert json.loads(run("collection", "c", "walk", "b", "--direction", "incoming")[1])[0]["id"] == "a"
    assert json.loads(run("collection", "c", "edges", "a")[1])[0]["metadata"] == {"w": 2}
    assert json.loads(run("collection", "c", "get", "b")[1])["body"] == {"title": "beta"}
    assert json.loads(run("collection", "c", "ids")[1]) == ["a", "b"]
    assert json.loads(run("collection", "c", "search", "[1, 0]")[1]) == []
    assert run("collection", "c", "drop", "b")[0] == 0 and run("collection", "c", "get", "b")[0] == 1
    assert run("log", "m", "write", '{"cpu": 1}', "--timestamp", "2026-01-01T00:00:00Z")[0] == 0
    assert run("log", "m", "write", "2", "-t", "1800000000")[0] == 0
    entries = json.loads(run("log", "m", "range", "--end", "2026-06-01T00:00:00+00:00")[1])
    assert entries == [{"timestamp": "2026-01-01T00:00:00+00:00", "data": {"cpu": 1}}]
    assert run("log", "m", "range", "--start", "yesterday")[0] == 2
    code, out, _ = run("log", "m", "live", "--window", "1e10", "--period", "0.01", "--count", "2")
    assert code == 0 and out.splitlines() == ['[{"cpu": 1}, 2]'] * 2
    assert run("channel", "ch", "publish", "hello")[0] == 0
    assert json.loads(run("channel", "ch", "history")[1]) == ["hello"]
    assert run("channel", "ch", "listen", "--timeout", "0.05", "--count", "1")[0] == 1


def _publish_until(path, name, stop):
    with BeaverDB(path) as db:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            db.channel(name).publish({"n": 1})
            stop.wait(0.02)   # keep publishing until the listener has had one


def test_cli_channel_listen_receives(capsys, dbfile):
    BeaverDB(dbfile).close()    # the file exists first: a read command never makes one
    stop = threading.Event()
    publisher = threading.Thread(target=_publish_until, args=(dbfile, "ch", stop))
    publisher.start()
    try:
        code, out, _ = _cli(capsys, "-d", dbfile, "channel", "ch", "listen", "--timeout", "20",
                            "--count", "1")
    finally:
        stop.set()
        publisher.join()
    assert code == 0 and json.loads(out.splitlines()[0]) == {"n": 1}


def test_dump_load_logs_channels_collections(tmp_path, db):
    db.log("metrics").log({"cpu": 1}, timestamp=100.0)
    db.channel("events").publish({"e": 1})
    docs = db.collection("docs", metric="cosine")
    docs.index(beaver.Document(id="a", embedding=[1.0, 0.0], body={"t": "alpha text"}))
    docs.index(beaver.Document(id="b", embedding=[0.0, 1.0], body="beta"))
    docs.connect("a", "b", "NEXT", metadata={"w": 1})
    out = io.StringIO()
    assert db.dump(out) == 3
    with BeaverDB(tmp_path / "copy.db") as copy:
        assert copy.load(io.StringIO(out.getvalue())) == 3
        assert [(e.timestamp.timestamp(), e.data) for e in copy.log("metrics")] == [(100.0, {"cpu": 1})]
        assert copy.channel("events").history() == [{"e": 1}]
        restored = copy.collection("docs")
        assert restored.metric == "cosine" and restored["a"] == docs["a"]
        assert restored.edges("a") == docs.edges("a")
        assert restored.match("alpha")[0][0].id == "a"
        assert restored.search([1.0, 0.1], top_k=1)[0][0].id == "a"
        assert copy.info()["structures"] == db.info()["structures"]


# ---- seed examples of the spec (dict, list, queue, blob, models, acquire, dump) ----

@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_seed_quickstart_dict_and_list(in_tmp, capsys):
    from beaver import BeaverDB
    db = BeaverDB("my_data.db")
    config = db.dict("app_config")
    config["theme"] = "dark"
    config["user_id"] = 123
    print(f"App theme is: {config['theme']}")
    tasks = db.list("daily_tasks")
    tasks.push({"id": "task-001", "desc": "Write project report"})
    tasks.push({"id": "task-002", "desc": "Deploy new feature"})
    print(f"First task is: {tasks[0]['desc']}")
    db.close()
    assert capsys.readouterr().out == ("App theme is: dark\n"
                                       "First task is: Write project report\n")
    assert (in_tmp / "my_data.db").exists()


def test_seed_old_readme_quickstart_dict_and_list(in_tmp, capsys):
    db = BeaverDB("data.db")
    config = db.dict("app_config")
    config["theme"] = "dark"
    print(f"Theme set to: {config['theme']}")
    tasks = db.list("daily_tasks")
    tasks.push("Write the project report")
    tasks.push("Deploy the new feature")
    print(f"First task is: {tasks[0]}")
    db.close()
    assert capsys.readouterr().out == ("Theme set to: dark\n"
                                       "First task is: Write the project report\n")


def test_seed_dict_section(in_tmp, capsys):
    db = BeaverDB("demo.db")
    config = db.dict("app_config")
    config["theme"] = "dark"
    config["retries"] = 3
    config.set("user_ids", [101, 205, 301])
    print(f"Configuration dictionary has {len(config)} items.")
    theme = config["theme"]
    print(f"Retrieved theme: {theme}")
    non_existent = config.get("non_existent_key", "default_value")
    print(f"Result for non_existent_key: {non_existent}")
    print("\nIterating over config items:")
    for key, value in config.items():
        print(f" - {key}: {value}")
    del config["retries"]
    print(f"\nAfter deleting 'retries', config has {len(config)} items.")
    db.close()
    out = capsys.readouterr().out
    assert "Configuration dictionary has 3 items." in out
    assert "Retrieved theme: dark" in out and "non_existent_key: default_value" in out
    assert " - user_ids: [101, 205, 301]" in out and " - retries: 3" in out
    assert "config has 2 items." in out


def test_seed_ttl_cache(in_tmp, capsys, clock):
    sleep = clock.advance               # the example's sleeps, without the waiting
    calls = []

    def expensive_api_call(prompt: str):
        print(f"--- Making expensive API call for: '{prompt}' ---")
        calls.append(prompt)
        sleep(2)
        return "Quito"

    db = BeaverDB("demo.db")
    api_cache = db.dict("api_cache")
    prompt = "capital of Ecuador"
    response = api_cache.get(prompt)
    if response is None:
        print("Cache miss.")
        response = expensive_api_call(prompt)
        api_cache.set(prompt, response, ttl_seconds=10)
    print(f"Response: {response}")
    sleep(5)
    response = api_cache.get(prompt)
    if response is None:
        pass
    else:
        print("Cache hit!")
    print(f"Response: {response}")
    sleep(12)
    response = api_cache.get(prompt)
    if response is None:
        print("Cache miss (key expired).")
        response = expensive_api_call(prompt)
        api_cache.set(prompt, response, ttl_seconds=10)
    else:
        print("Cache hit!")
    print(f"Response: {response}")
    db.close()
    out = capsys.readouterr().out
    assert out.count("Cache miss.") == 1 and out.count("Cache hit!") == 1
    assert "Cache miss (key expired)." in out and calls == [prompt, prompt]


def test_seed_old_readme_api_cache(in_tmp):
    db = BeaverDB("data.db")
    api_cache = db.dict("external_api_cache")
    response = api_cache.get("weather_new_york")
    if response is None:
        response = {"city": "New York", "temp": 21}
        api_cache.set("weather_new_york", response, ttl_seconds=3600)
    assert api_cache.get("weather_new_york") == {"city": "New York", "temp": 21}
    db.close()


def test_seed_lists(in_tmp, capsys):
    db = BeaverDB("demo.db")
    tasks = db.list("project_tasks")
    tasks.push({"id": "task-002", "desc": "Write documentation"})
    tasks.push({"id": "task-003", "desc": "Deploy to production"})
    tasks.prepend({"id": "task-001", "desc": "Design the feature"})
    print("\nCurrent tasks in order:")
    for task in tasks:
        print(f"  - {task['id']}: {task['desc']}")
    print(f"\nThe first task is: {tasks[0]}")
    print(f"The last task is: {tasks[-1]}")
    print(f"A slice of the first two tasks: {tasks[0:2]}")
    tasks[1] = {"id": "task-002", "desc": "Write and review documentation"}
    print(f"Updated second task: {tasks[1]}")
    del tasks[0]
    print(f"List length after deletion: {len(tasks)}")
    last_item = tasks.pop()
    print(f"\nPopped the last task: {last_item}")
    db.close()
    out = capsys.readouterr().out
    assert out.index("task-001") < out.index("task-002") < out.index("task-003")
    assert "List length after deletion: 2" in out
    assert "Popped the last task: {'id': 'task-003', 'desc': 'Deploy to production'}" in out
    assert "Write and review documentation" in out


def test_seed_old_readme_chat_history(in_tmp, capsys):
    db = BeaverDB("data.db")
    chat_history = db.list("conversation_with_user_123")
    chat_history.push({"role": "user", "content": "Hello, Beaver!"})
    chat_history.push({"role": "assistant", "content": "Hello! How can I help you today?"})
    for message in chat_history:
        print(f"{message['role']}: {message['content']}")
    db.close()
    assert capsys.readouterr().out == ("user: Hello, Beaver!\n"
                                       "assistant: Hello! How can I help you today?\n")


def test_seed_priority_queue(in_tmp, capsys):
    db = BeaverDB("demo.db")
    tasks = db.queue("agent_tasks")
    tasks.put({"action": "summarize_news", "topic": "AI"}, priority=10)
    tasks.put({"action": "respond_to_user", "user_id": "alice"}, priority=1)
    tasks.put({"action": "run_backup", "target": "all"}, priority=20)
    tasks.put({"action": "send_alert", "message": "CPU at 90%"}, priority=1)
    item1 = tasks.get()
    item2 = tasks.get()
    item3 = tasks.get()
    print(f"Agent's first task: {item1.data['action']}")
    print(f"Agent's second task: {item2.data['action']}")
    db.close()
    assert item3.data["action"] == "summarize_news"
    assert capsys.readouterr().out == ("Agent's first task: respond_to_user\n"
                                       "Agent's second task: send_alert\n")


def test_seed_old_readme_agent_tasks(in_tmp):
    db = BeaverDB("data.db")
    tasks = db.queue("agent_tasks")
    tasks.put({"action": "summarize_news"}, priority=10)
    tasks.put({"action": "respond_to_user"}, priority=1)
    tasks.put({"action": "run_backup"}, priority=20)
    next_task = tasks.get()
    assert next_task.data["action"] == "respond_to_user"
    db.close()


def test_seed_blobs(in_tmp, capsys):
    db = BeaverDB("demo.db")
    attachments = db.blobs("user_uploads")
    file_content = "This is the content of a virtual text file."
    file_bytes = file_content.encode("utf-8")
    file_key = "emails/user123/attachment_01.txt"
    attachments.put(
        key=file_key,
        data=file_bytes,
        metadata={"mimetype": "text/plain", "sender": "alice@example.com"}
    )
    blob = attachments.get(file_key)
    if blob:
        print(f"Retrieved Blob: {blob.key}")
        print(f"Metadata: {blob.metadata}")
        print(f"Data (decoded): '{blob.data.decode('utf-8')}'")
    attachments.delete(file_key)
    print(f"\nVerified deletion: {file_key not in attachments}")
    db.close()
    out = capsys.readouterr().out
    assert f"Retrieved Blob: {file_key}" in out
    assert "Metadata: {'mimetype': 'text/plain', 'sender': 'alice@example.com'}" in out
    assert f"Data (decoded): '{file_content}'" in out and "Verified deletion: True" in out


def test_seed_old_readme_avatar(in_tmp):
    Path("avatar.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    db = BeaverDB("data.db")
    attachments = db.blobs("user_uploads")
    with open("avatar.png", "rb") as f:
        avatar_bytes = f.read()
    attachments.put(key="user_123_avatar.png", data=avatar_bytes,
                    metadata={"mimetype": "image/png"})
    avatar = attachments.get("user_123_avatar.png")
    assert avatar.data == avatar_bytes and avatar.metadata == {"mimetype": "image/png"}
    db.close()


def test_seed_old_readme_user_profiles(in_tmp):
    db = BeaverDB("data.db")
    users = db.dict("user_profiles")
    users["alice"] = {"hashed_password": "...", "email": "alice@example.com",
                      "permissions": ["read", "write"]}
    alice_profile = users.get("alice")
    assert alice_profile["permissions"] == ["read", "write"]
    db.close()


def test_seed_pydantic_user(in_tmp, capsys):
    pydantic = pytest.importorskip("pydantic")

    class User(pydantic.BaseModel):
        name: str
        email: str
        permissions: typing.List[str]

    db = BeaverDB("user_data.db")
    users = db.dict("user_profiles", model=User)
    users["alice"] = User(name="Alice", email="alice@example.com",
                          permissions=["read", "write"])
    retrieved_user = users["alice"]
    print(f"Retrieved: {retrieved_user.name}")
    print(f"Permissions: {retrieved_user.permissions}")
    db.close()
    assert isinstance(retrieved_user, User)
    assert capsys.readouterr().out == ("Retrieved: Alice\n"
                                       "Permissions: ['read', 'write']\n")


def test_seed_beaver_model_user(in_tmp, capsys):
    from beaver import BeaverDB, Model

    class User(Model):
        name: str
        email: str

    db = BeaverDB("user_data.db")
    users = db.dict("user_profiles", model=User)
    users["alice"] = User(name="Alice", email="alice@example.com")
    retrieved_user = users["alice"]
    print(f"Retrieved: {retrieved_user.name}")
    db.close()
    assert isinstance(retrieved_user, User) and capsys.readouterr().out == "Retrieved: Alice\n"


def _seed_acquire_batch():
    """The spec's batch example, verbatim, as a function."""
    db = BeaverDB("tasks.db")
    tasks_to_process = []
    try:
        with db.queue('agent_tasks').acquire(timeout=5) as q:
            for _ in range(10):
                item = q.get(block=False)
                tasks_to_process.append(item.data)
    except (TimeoutError, IndexError):
        print("Could not get 10 items.")
        pass
    print(f"Processing batch of {len(tasks_to_process)} items.")
    db.close()
    return tasks_to_process


def test_seed_manager_acquire_batch(in_tmp, capsys):
    assert _seed_acquire_batch() == []                    # empty queue: IndexError path
    assert capsys.readouterr().out == ("Could not get 10 items.\n"
                                       "Processing batch of 0 items.\n")
    with BeaverDB("tasks.db") as db:
        for i in range(12):
            db.queue("agent_tasks").put(i)
    assert _seed_acquire_batch() == list(range(10))
    assert capsys.readouterr().out == "Processing batch of 10 items.\n"
    with BeaverDB("tasks.db") as db:                      # lock held elsewhere: TimeoutError
        with db.queue("agent_tasks").acquire(timeout=5):
            with BeaverDB("tasks.db") as other, pytest.raises(TimeoutError):
                other.queue("agent_tasks").acquire(timeout=0.05)
        assert len(db.queue("agent_tasks")) == 2


def test_seed_dump(in_tmp, capsys):
    db = BeaverDB("my_app.db")
    config = db.dict("app_config")
    config["theme"] = "dark"
    config["user_id"] = 456
    with open("config_backup.json", "w") as f:
        config.dump(f)
    dump_data = config.dump()
    print(dump_data['metadata'])
    db.close()
    saved = json.loads(Path("config_backup.json").read_text())
    assert saved["items"] == dump_data["items"] == [
        {"key": "theme", "value": "dark", "expires_at": None},
        {"key": "user_id", "value": 456, "expires_at": None}]
    assert "'type': 'dict'" in capsys.readouterr().out


def test_seed_with_dict_as_config(in_tmp):
    db = BeaverDB("demo.db")
    with db.dict("config") as config:
        config["theme"] = "dark"
    assert db.dict("config")["theme"] == "dark"
    db.close()


# ---- spec examples ----
# The examples of spec/001 (the guide) and spec/000 (the old README) that the seed tests
# above and the modality sections do not already run: the quickstart as a script, then
# through the CLI and a real `beaver serve`; the lock-protected cron job; pub/sub across two
# processes; the live dashboards; the event callbacks; the API forms of the chapter outlines.

import urllib.error
import urllib.request

SPEC_QUICKSTART = '''\
from beaver import BeaverDB, Document

# This creates a single file "my_data.db" if it doesn't exist
# and sets it up for safe, concurrent access.
db = BeaverDB("my_data.db")

# This is perfect for storing app configuration or user settings.
config = db.dict("app_config")

# Assigning a value saves it instantly to the database file.
config["theme"] = "dark"
config["user_id"] = 123

# You can read the value back just as easily:
print(f"App theme is: {config['theme']}")

# This is great for a to-do list, a job queue, or a chat history.
tasks = db.list("daily_tasks")

# Use .push() to append items
tasks.push({"id": "task-001", "desc": "Write project report"})
tasks.push({"id": "task-002", "desc": "Deploy new feature"})

# You can access items by index, just like a normal list:
print(f"First task is: {tasks[0]['desc']}")

# This is the most powerful feature, combining data and search.
articles = db.collection("articles")

# Create a Document to store.
# We give it a unique ID and some text content in the 'body'.
doc = Document(
    id="sqlite-001",
    body="SQLite is a powerful embedded database ideal for local apps."
)

# This not only saves the document but also automatically
# makes its text content searchable via a Full-Text Search (FTS) index
# with optional fuzzy matching.
articles.index(doc, fts=True, fuzzy=True)

# This isn't a simple string find; it's a real search engine!
# Note the typo in "datbase"
results = articles.match(query="datbase", fuzziness=1)

# The result is a list of tuples: (document, score)
top_doc, rank = results[0]
print(f"Search found: '{top_doc.body}' (Score: {rank:.2f})")
'''

SPEC_MATCH_OUTPUT = '''\
[
  {
    "document": {
      "id": "sqlite-001",
      "embedding": null,
      "body": "SQLite is a powerful embedded database ideal for local apps."
    },
    "score": %s
  }
]
'''


def _spec_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}


def test_spec_quickstart_script_then_cli(in_tmp, capsys):
    Path("quickstart.py").write_text(SPEC_QUICKSTART)
    run = subprocess.run([sys.executable, "quickstart.py"], env=_spec_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == (
        "App theme is: dark\n"
        "First task is: Write project report\n"
        "Search found: 'SQLite is a powerful embedded database ideal for local apps.' "
        "(Score: 0.00)\n")
    assert _cli(capsys, "--database", "my_data.db", "dict", "app_config", "get", "theme") \
        == (0, '"dark"\n', "")
    if shutil.which("beaver"):                  # the installed console script, once
        run = subprocess.run(["beaver", "--database", "my_data.db", "dict", "app_config", "get",
                              "theme"], env=_spec_env(), capture_output=True, text=True,
                             timeout=60)
        assert (run.returncode, run.stdout) == (0, '"dark"\n'), run.stderr
    code, out, err = _cli(capsys, "--database", "my_data.db", "collection", "articles", "match",
                          "datbase", "--fuzziness", "1")
    score = json.loads(out)[0]["score"]   # FTS5 relevance; the guide shows 0.0 (see report)
    assert (code, err) == (0, "") and out == SPEC_MATCH_OUTPUT % json.dumps(score)
    assert 0 <= score < 0.005


def _http(method, url, body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _spec_serve(database, port):
    """``beaver serve --database <database> --port <port>``, as the guide types it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    process = subprocess.Popen(
        [sys.executable, "-m", "beaver", "serve", "--database", database, "--port", str(port)],
        env=_spec_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError("beaver serve did not start: " + process.communicate()[1])
            time.sleep(0.05)  # polling a port: nothing to wait on


def test_spec_beaver_serve_and_curl(in_tmp):
    with BeaverDB("my_data.db") as db:          # what the quickstart left in my_data.db
        db.dict("app_config")["theme"] = "dark"
    port = _free_port()
    server = _spec_serve("my_data.db", port)
    try:
        base = f"http://localhost:{port}"
        # $ curl http://localhost:8000/dict/app_config/theme
        assert _http("GET", f"{base}/dict/app_config/theme") == (200, '"dark"')
        # $ curl -X PUT http://127.0.0.1:8000/dicts/app_config/api_key \
        #     -H "Content-Type: application/json" -d "your-secret-api-key"
        base = f"http://127.0.0.1:{port}"
        status, _ = _http("PUT", f"{base}/dicts/app_config/api_key", b"your-secret-api-key",
                          {"Content-Type": "application/json"})
        assert 200 <= status < 300
        assert _http("GET", f"{base}/dicts/app_config/api_key") == (200, '"your-secret-api-key"')
        assert _http("GET", f"{base}/docs")[0] == 200      # the interactive OpenAPI docs
    finally:
        server.terminate()
        try:
            _, err = server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in err
    with BeaverDB("my_data.db") as db:
        assert db.dict("app_config")["api_key"] == "your-secret-api-key"


def test_spec_cli_lock_run_cron_script(in_tmp, capsys, monkeypatch):
    script = in_tmp / "run_daily_report.sh"
    script.write_text(f"#!/bin/sh\necho report > {in_tmp / 'report.txt'}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{in_tmp}{os.pathsep}{os.environ['PATH']}")
    # beaver --database data.db lock my-cron-job run bash -c 'run_daily_report.sh'
    assert _cli(capsys, "--database", "data.db", "lock", "my-cron-job", "run",
                "bash", "-c", "run_daily_report.sh")[0] == 0
    assert (in_tmp / "report.txt").read_text() == "report\n"
    with BeaverDB("data.db") as db:
        assert not db.lock("my-cron-job").locked


SPEC_PUBLISHER = '''\
# --- In one process or thread (e.g., a monitoring service) ---
#
import time
from beaver import BeaverDB

db = BeaverDB("demo.db")

system_events = db.channel("system_events")
print("[Publisher] Publishing message...")
system_events.publish({"event": "user_login", "user_id": "alice"})
db.close()
'''


def test_spec_pubsub_between_two_processes(in_tmp, capsys):
    from beaver import BeaverDB

    db = BeaverDB("demo.db")
    # The 'with' block handles the subscription lifecycle.
    with db.channel("system_events").subscribe() as listener:
        publisher = subprocess.Popen([sys.executable, "-c", SPEC_PUBLISHER], env=_spec_env(),
                                     stdout=subprocess.PIPE, text=True)
        watchdog = threading.Timer(MP_DEADLINE, listener.close)   # bounds the endless listen
        watchdog.start()
        for message in listener.listen():
            print(f"Event received: {message}")
            # >> Event received: {'event': 'user_login', 'user_id': 'alice'}
            break # Exit after one message for this example
        watchdog.cancel()
    db.close()
    assert publisher.communicate(timeout=MP_DEADLINE)[0] == "[Publisher] Publishing message...\n"
    assert publisher.returncode == 0
    assert capsys.readouterr().out == \
        "Event received: {'event': 'user_login', 'user_id': 'alice'}\n"


def test_spec_live_log_dashboard(in_tmp, capsys, monkeypatch):
    from datetime import timedelta
    import statistics
    import time
    from beaver import BeaverDB

    db = BeaverDB("live_log_demo.db")
    logs = db.log("system_metrics")

    def summarize(window: list[dict]) -> dict:
        """Aggregator that calculates stats from a window of log data."""
        if not window:
            return {"mean": 0.0, "count": 0}
        values = [log.get("value", 0) for log in window]
        return {"mean": statistics.mean(values), "count": len(values)}

    # The background writer the guide leaves to examples/logs.py.
    stop, first = threading.Event(), threading.Event()

    def write():
        value = 0
        while not stop.is_set():
            logs.log({"value": value % 10})
            value += 1
            first.set()
            stop.wait(0.02)

    writer = threading.Thread(target=write)
    writer.start()
    assert first.wait(MP_DEADLINE)
    # The loop runs until Ctrl+C: the second `time.sleep(1)` of the loop presses it.
    real_sleep, loop_sleeps = time.sleep, []

    def sleep(seconds):
        if sys._getframe(1).f_code.co_name != "test_spec_live_log_dashboard":
            return real_sleep(seconds)          # beaver's own sleeps, if any
        loop_sleeps.append(seconds)
        if len(loop_sleeps) == 2:
            stop.set()
            writer.join()
            raise KeyboardInterrupt
    monkeypatch.setattr(time, "sleep", sleep)

    # Get the live iterator over a 5-second rolling window, updating every 1 sec
    live_summary = logs.live(
        window=timedelta(seconds=5),
        period=timedelta(seconds=1),
        aggregator=summarize
    )
    print("[Main Thread] Starting live view. Press Ctrl+C to stop.")
    try:
        for summary in live_summary:
            print(f"Live Stats (5s window): Count={summary['count']}, Mean={summary['mean']:.2f}")
            time.sleep(1) # In a real app, this loop just blocks
    except KeyboardInterrupt:
        print("\nShutting down.")
    finally:
        db.close()

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[Main Thread] Starting live view. Press Ctrl+C to stop."
    assert lines[-2:] == ["", "Shutting down."] and len(lines) == 5
    counts = [int(line.split("Count=")[1].split(",")[0]) for line in lines[1:3]]
    assert all(line.startswith("Live Stats (5s window): Count=") for line in lines[1:3])
    assert counts[0] >= 1 and counts[1] >= 1 and db.closed


def test_spec_old_readme_live_monitoring(in_tmp, capsys):
    db = BeaverDB("data.db")
    for value in (10, 20, 30):
        db.log("system_metrics").log({"value": value})
    # (the old README's block, verbatim)
    from datetime import timedelta
    import statistics

    logs = db.log("system_metrics")

    def summarize(window):
        values = [log.get("value", 0) for log in window]
        return {"mean": statistics.mean(values), "count": len(values)}

    live_summary = logs.live(
        window=timedelta(seconds=10),
        period=timedelta(seconds=1),
        aggregator=summarize
    )

    def dashboard():
        for summary in live_summary:
            print(f"Live Stats (10s window): Count={summary['count']}, Mean={summary['mean']:.2f}")

    screen = []

    def printed():
        screen.append(capsys.readouterr().out)
        return "".join(screen)

    runner = threading.Thread(target=dashboard)   # it runs forever: stop it after one summary
    runner.start()
    try:
        _rt_until(printed, timeout=MP_DEADLINE)
    finally:
        live_summary.close()
        runner.join(MP_DEADLINE)
    assert not runner.is_alive()
    assert "".join(screen).splitlines()[0] == "Live Stats (10s window): Count=3, Mean=20.00"
    db.close()


def test_spec_event_callbacks(in_tmp, capsys, monkeypatch):
    import time
    from beaver import BeaverDB

    # The guide waits 0.1 s for each callback; here each of its sleeps also waits (bounded)
    # until the callbacks due by then have printed, so a slow machine cannot break it.
    real_sleep, screen, due = time.sleep, [], iter([0, 1, 2, 2])

    def sleep(seconds):
        real_sleep(seconds)
        if sys._getframe(1).f_code.co_name != "test_spec_event_callbacks":
            return                              # beaver's own sleeps (on() waits a little)
        expected = next(due)

        def delivered():
            screen.append(capsys.readouterr().out)
            return "".join(screen).count("EVENT RECEIVED") >= expected
        _rt_until(delivered, timeout=MP_DEADLINE)
    monkeypatch.setattr(time, "sleep", sleep)

    db = BeaverDB("events_demo.db")
    config = db.dict("app_config")
    config.clear()

    def on_config_change(payload):
        """This callback is triggered when a key is set or deleted."""
        print(f"EVENT RECEIVED: Key '{payload['key']}' was changed!")

    # Subscribe to 'set' events on this specific dict
    set_handle = config.on("set", on_config_change)
    del_handle = config.on("del", on_config_change)

    # Give the listener thread time to start
    time.sleep(0.1)

    print("Setting 'theme'...")
    config["theme"] = "dark" # Triggers the 'on_config_change' callback
    time.sleep(0.1) # Wait for event to process

    print("Deleting 'theme'...")
    del config["theme"] # Triggers the 'on_config_change' callback
    time.sleep(0.1)

    # Clean up the listeners
    set_handle.off()
    del_handle.off()

    print("Listeners are off. This change will be silent.")
    config["theme"] = "light" # No event will be printed
    time.sleep(0.1)

    db.close()
    screen.append(capsys.readouterr().out)
    assert "".join(screen) == (
        "Setting 'theme'...\n"
        "EVENT RECEIVED: Key 'theme' was changed!\n"
        "Deleting 'theme'...\n"
        "EVENT RECEIVED: Key 'theme' was changed!\n"
        "Listeners are off. This change will be silent.\n")


def test_spec_rag_example_prints(in_tmp, capsys):
    from beaver import BeaverDB, Document
    from beaver.collections import rerank

    db = BeaverDB("rag_demo.db")
    articles = db.collection("articles")
    docs_to_index = [
        Document(
            id="py-fast",
            embedding=[0.1, 0.9, 0.2], # Vector leans towards "speed"
            body="Python is a great language for fast prototyping.",
        ),
        Document(
            id="py-data",
            embedding=[0.8, 0.2, 0.9], # Vector leans towards "data science"
            body="The Python ecosystem is ideal for data science.",
        ),
        Document(
            id="js-fast",
            embedding=[0.2, 0.8, 0.1], # Vector similar to "py-fast"
            body="JavaScript engines are optimized for fast execution.",
        ),
    ]
    for doc in docs_to_index:
        articles.index(doc, fts=True) # Enable FTS
    query_vector = [0.15, 0.85, 0.15] # A vector close to "fast"
    vector_results = [doc for doc, _ in articles.search(vector=query_vector)]
    text_results = [doc for doc, _ in articles.match(query="python")]
    best_context = rerank(text_results, vector_results)
    print("--- Final Reranked Results ---")
    for doc in best_context:
        print(f" - {doc.id}: {doc.body}")
    db.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["--- Final Reranked Results ---",
                         " - py-fast: Python is a great language for fast prototyping."]
    assert sorted(lines[2:]) == [
        " - js-fast: JavaScript engines are optimized for fast execution.",
        " - py-data: The Python ecosystem is ideal for data science."]


def test_spec_graph_example_prints(in_tmp, capsys):
    from beaver import BeaverDB, Document

    db = BeaverDB("graph_demo.db")
    net = db.collection("social_network")
    alice = Document(id="alice", body={"name": "Alice"})
    bob = Document(id="bob", body={"name": "Bob"})
    charlie = Document(id="charlie", body={"name": "Charlie"})
    diana = Document(id="diana", body={"name": "Diana"})
    net.index(alice); net.index(bob); net.index(charlie); net.index(diana)  # noqa: E702
    net.connect(alice, bob, label="FOLLOWS")
    net.connect(alice, charlie, label="FOLLOWS")
    net.connect(bob, diana, label="FOLLOWS")
    net.connect(charlie, bob, label="FOLLOWS")
    print("--- Testing `neighbors` (1-hop) ---")
    following = net.neighbors(alice, label="FOLLOWS")
    print(f"Alice follows: {[p.id for p in following]}")
    print("\n--- Testing `walk` (multi-hop) ---")
    foaf = net.walk(
        source=alice,
        labels=["FOLLOWS"],
        depth=2,
    )
    print(f"Alice's extended network (friends of friends): {[p.id for p in foaf]}")
    db.close()
    assert capsys.readouterr().out == (
        "--- Testing `neighbors` (1-hop) ---\n"
        "Alice follows: ['bob', 'charlie']\n"
        "\n--- Testing `walk` (multi-hop) ---\n"
        "Alice's extended network (friends of friends): ['bob', 'charlie', 'diana']\n")


def test_spec_chapter_outline_api_forms(in_tmp):
    """The calls named in the guide's chapter outlines (parts I and II), in their forms."""
    from datetime import datetime, timedelta, timezone
    db = BeaverDB("outline.db")
    config = db.dict("config")
    config["api_key"] = "k"
    config.set("session", {"user": 1}, ttl_seconds=3600)
    assert config.get("api_key") == "k" and len(config) == 2
    assert dict(config.items()) == {"api_key": "k", "session": {"user": 1}}
    del config["api_key"]
    blobs = db.blobs("files")
    blobs.put("report.pdf", b"%PDF-1.4", {"mimetype": "application/pdf"})
    blob = blobs.get("report.pdf")
    assert (blob.data, blob.metadata) == (b"%PDF-1.4", {"mimetype": "application/pdf"})
    my_list = db.list("items")
    for i in range(6):
        my_list.push(i)
    my_list.prepend(-1)
    my_list[0] = "first"
    assert my_list[1:5] == [0, 1, 2, 3]
    assert (my_list.pop(), my_list.deque()) == (5, "first")
    queue = db.queue("jobs")
    queue.put({"job": 1}, priority=2)
    assert queue.get(timeout=5).data == {"job": 1}
    docs = db.collection("docs")
    doc = Document(id="d1", embedding=[1.0, 0.0], body={"field": {"path": "hello world"}})
    docs.index(doc)
    docs.index(Document(id="d2", embedding=[0.0, 1.0], body={"field": {"path": "other"}}))
    assert [d.id for d, _ in docs.search([1.0, 0.1], top_k=1)] == ["d1"]
    assert [d.id for d, _ in docs.match("hello", on=["field.path"])] == ["d1"]
    assert [d.id for d, _ in docs.match("hallo", fuzziness=2)] == ["d1"]
    docs.connect(doc, "d2", "LINKS", {"weight": 1})
    assert [d.id for d in docs.neighbors(doc, "LINKS")] == ["d2"]
    assert [d.id for d in docs.walk("d2", ["LINKS"], 2, "incoming")] == ["d1"]
    docs.drop(doc)
    assert "d1" not in docs
    channel = db.channel("news")
    with channel.subscribe() as listener:
        channel.publish({"n": 1})
        for msg in listener.listen():
            assert msg == {"n": 1}
            break
    logs = db.log("metrics")
    logs.log({"cpu": 1})
    now = datetime.now(timezone.utc)
    assert [e.data for e in logs.range(now - timedelta(minutes=1), now + timedelta(minutes=1))] \
        == [{"cpu": 1}]
    with db.lock("my_task", timeout=10):
        pass
    with db.dict("config") as config:
        config["theme"] = "dark"
    for manager in (config, blobs, my_list, queue, docs, channel, logs, db.lock("my_task")):
        assert type(manager.as_async()).__name__.startswith("Async")
    db.close()
    tables = {row[0] for row in raw_rows(in_tmp / "outline.db",
                                         "SELECT name FROM sqlite_master WHERE type='table'")}
    assert all(name.startswith(("beaver_", "sqlite_")) for name in tables)


# ---- examples ----
# Every script in examples/ runs to completion in a scratch folder. A script that cannot run
# alone (one half of a publisher/subscriber pair, say) opts out with a line reading
# "# beaver-example: needs-args" in its source.

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SKIP_MARK = "# beaver-example: needs-args"


def test_examples_exist():
    names = {path.name for path in EXAMPLES}
    assert {"kvstore.py", "cache.py", "list.py", "pqueue.py", "producer_consumer.py",
            "blobs.py", "type_hints.py", "tour.py"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(script, tmp_path):
    if SKIP_MARK in script.read_text(encoding="utf-8"):
        pytest.skip("the example needs arguments or a partner process")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    result = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip(), "an example should show what it does"


# ---- docs that run: docstring examples and the README's Python blocks ----
# Every ``>>>`` example of the three modules runs under doctest, and every ```python block of
# the README runs, so neither can go stale. Each docstring (each README section) runs in a
# scratch folder with a fresh ``db``; the client's docstrings (``BeaverClient``, and its
# managers, which carry the local managers' docstrings) and the README's client code run
# against a real ``beaver serve --token s3cret``, emptied before each, at the address the docs
# show (``DOCS_URL``). Top-level ``await`` works, as in ``python -m asyncio``. A README block
# that cannot run says why in ``<!-- no-run: reason -->`` on the line before it, and is
# compiled only; a docstring example that cannot run is marked ``# doctest: +SKIP``.

DOCS_URL = "http://127.0.0.1:8000"
DOCS_TOKEN = "s3cret"
UPSTREAM_FIXTURE = ROOT / "fixtures" / "upstream-2.4.1.db"      # the docs' "old.db"


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    """A ``beaver serve --token s3cret`` for the client's examples: its url."""
    path = tmp_path_factory.mktemp("docs-server") / "served.db"
    process, url = _start_server(path, "--token", DOCS_TOKEN, "--max-wait", "2")
    try:
        yield url
    finally:
        _stop_server(process)


def _emptied_client(url):
    """A client of the docs' server, every structure there cleared and its indexes dropped."""
    client = beaver.BeaverClient(url, token=DOCS_TOKEN)
    for structure in client.info()["structures"]:
        manager = getattr(client, structure["kind"])(structure["name"])
        manager.clear()
        for path in manager.indexes() if hasattr(manager, "indexes") else ():
            manager.drop_index(path)
    return client


def _close_databases(namespace):
    for value in list(namespace.values()):
        if isinstance(value, (BeaverDB, beaver.BeaverClient)):
            value.close()


def _run_top_level_await(code, namespace, loop):
    """Run ``code`` compiled with top-level await allowed; a coroutine runs on ``loop``."""
    result = eval(code, namespace)
    return loop.run_until_complete(result) if inspect.iscoroutine(result) else result


class _DocRunner(doctest.DocTestRunner):
    """doctest with top-level ``await`` (one event loop per docstring)."""

    def run(self, test, **options):
        loop = asyncio.new_event_loop()
        for i, example in enumerate(test.examples):
            code = compile(example.source, test.name, "single", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            if code.co_flags & inspect.CO_COROUTINE:
                test.globs[f"_awaited_{i}"] = code
                example.source = f"_run_top_level_await(_awaited_{i}, globals(), _loop)\n"
        test.globs.update(_run_top_level_await=_run_top_level_await, _loop=loop)
        try:
            return super().run(test, **options)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _is_remote(test):
    owner = test.name.split(".")[1] if test.name.count(".") else ""
    return owner.startswith(("Remote", "_Remote", "BeaverClient"))


@pytest.mark.parametrize("module_name, side", [("beaver", "local"), ("beaver", "remote"),
                                               ("beaver_vector", "local"),
                                               ("beaver_server", "local"),
                                               ("beaver_postgres", "local")])
def test_docstring_examples_run(module_name, side, tmp_path, monkeypatch, request):
    module = pytest.importorskip(module_name)
    if module_name == "beaver_vector":          # its examples are the faiss index itself
        monkeypatch.delenv("BEAVER_VECTOR_BACKEND", raising=False)
    tests = [t for t in doctest.DocTestFinder().find(module)
             if t.examples and _is_remote(t) == (side == "remote")]
    assert tests, f"no docstring examples found in {module_name}"
    url = request.getfixturevalue("docs_server") if side == "remote" else None
    runner, report = _DocRunner(optionflags=doctest.ELLIPSIS), io.StringIO()
    for number, test in enumerate(sorted(tests, key=lambda t: t.name)):
        folder = tmp_path / str(number)
        folder.mkdir()
        monkeypatch.chdir(folder)
        if "old.db" in test.docstring:
            shutil.copy(UPSTREAM_FIXTURE, folder / "old.db")
        if url is None:
            test.globs = {**module.__dict__, "db": BeaverDB(":memory:")}
        else:
            client = _emptied_client(url)
            test.globs = {**module.__dict__, "db": client, "client": client}
            for example in test.examples:
                example.source = example.source.replace(DOCS_URL, url)
        try:
            runner.run(test, out=report.write, clear_globs=False)
        finally:
            _close_databases(test.globs)
            test.globs.clear()
    assert runner.failures == 0, report.getvalue()


def _readme_sections(text):
    """The ```python blocks of a README by ``## `` section, in order:
    ``{heading: [(line number of the code, code, the no-run reason or None)]}``."""
    lines = text.splitlines()
    sections, heading, i = {}, "(top)", 0
    while i < len(lines):
        if lines[i].startswith("## "):
            heading = lines[i][3:].strip()
        fence = re.match(r"(\s*)```(\w*)\s*$", lines[i])
        if fence:
            end = lines.index(fence.group(1) + "```", i + 1)
            if fence.group(2) == "python":
                marker = re.match(r"\s*<!-- no-run: (.+?) -->\s*$", lines[i - 1])
                code = textwrap.dedent("\n".join(lines[i + 1:end]))
                sections.setdefault(heading, []).append((i + 2, code, marker and marker[1]))
            i = end
        i += 1
    return sections


README_SECTIONS = _readme_sections((ROOT / "README.md").read_text("utf-8"))


def _run_readme_section(heading, server_url=None, db=None) -> dict:
    """Run the section's blocks in the current folder, in one namespace that starts where
    the README's first example leaves off (``BeaverDB`` imported, ``db`` open on "app.db",
    or the ``db`` given), and return it. Blocks marked no-run are compiled only."""
    namespace = {"__name__": "__readme__", "BeaverDB": BeaverDB,
                 "db": BeaverDB("app.db") if db is None else db}
    try:
        for line, code, no_run in README_SECTIONS[heading]:
            if server_url is not None:
                code = code.replace(DOCS_URL, server_url)
            compiled = compile("\n" * (line - 1) + code, str(ROOT / "README.md"), "exec",
                               ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            if no_run is None:
                result = eval(compiled, namespace)
                if inspect.iscoroutine(result):
                    asyncio.run(result)
    finally:
        _close_databases(namespace)
    return namespace


def _works_on_the_given_db(heading) -> bool:
    """Whether the section's code uses the ``db`` it starts with (rather than its own)."""
    code = "\n".join(code for _, code, _ in README_SECTIONS[heading])
    return "db." in code and not re.search(r"\bdb = BeaverDB\(|\bas db:", code)


def test_readme_has_python_blocks_and_says_why_any_does_not_run():
    blocks = [block for section in README_SECTIONS.values() for block in section]
    assert len(blocks) >= 20 and len(README_SECTIONS) >= 12
    assert all(reason.strip() for _, _, reason in blocks if reason is not None)
    sample = ("## A\n```python\na = 1\n```\n```bash\n## not a heading\n```\n"
              "<!-- no-run: waits forever -->\n  ```python\n  while True:\n      pass\n  ```\n")
    assert _readme_sections(sample) == {"A": [(3, "a = 1", None),
                                              (10, "while True:\n    pass", "waits forever")]}


@pytest.mark.parametrize("heading, side", [(h, "local") for h in README_SECTIONS] + [
    (h, "remote") for h in README_SECTIONS if _works_on_the_given_db(h)])
def test_readme_section_runs(heading, side, in_tmp, request):
    """Locally, and with ``db`` a ``BeaverClient`` ("change one line and the same code runs
    against a server")."""
    code = "".join(code for _, code, _ in README_SECTIONS[heading])
    if "old.db" in code:
        shutil.copy(UPSTREAM_FIXTURE, in_tmp / "old.db")
    url = db = None
    if side == "remote" or DOCS_URL in code:
        url = request.getfixturevalue("docs_server")
        client = _emptied_client(url)
        if side == "remote":
            db = client
        else:
            client.close()
    _run_readme_section(heading, url, db)


def _readme_command_lines():
    """Every ``beaver ...`` line of the README's ```bash blocks, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text("utf-8"),
                        re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("beaver ")]


def test_readme_command_lines_run(in_tmp, capsys, monkeypatch, docs_server):
    """Each ``beaver`` line of the README runs, in order, in one scratch folder holding what
    the lines name (docs.jsonl, run_daily_report.sh, old.db; the server's app_config theme),
    and exits 0; a one-word comment (``# "dark"``) is the line's output."""
    for name in ("BEAVER_URL", "BEAVER_TOKEN", "BEAVER_DATABASE"):
        monkeypatch.delenv(name, raising=False)
    (in_tmp / "docs.jsonl").write_text('{"id": "a1", "body": "an embedded database"}\n')
    script = in_tmp / "run_daily_report.sh"
    script.write_text("#!/bin/sh\necho report > report.txt\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{in_tmp}{os.pathsep}{os.environ['PATH']}")
    shutil.copy(UPSTREAM_FIXTURE, in_tmp / "old.db")
    with _emptied_client(docs_server) as client:
        client.dict("app_config")["theme"] = "dark"
    lines = _readme_command_lines()
    assert len(lines) >= 12
    for line in lines:
        argv = shlex.split(line.replace("http://host:8000", docs_server), comments=True)[1:]
        target = argv.pop() if argv[-2:-1] == [">"] else None
        argv = argv[:-1] if target else argv
        capsys.readouterr()
        assert beaver.main(argv) == 0, line
        out = capsys.readouterr().out
        if target:
            (in_tmp / target).write_text(out)
        shown = re.search(r"\s#\s+(\S+)$", line)
        if shown:
            assert out.strip() == shown[1], line
    assert (in_tmp / "report.txt").exists() and (in_tmp / "new.db").exists()
    assert json.loads((in_tmp / "all.jsonl").read_text().splitlines()[0])


# ---- packaging ----
# What a package index and a user of the sdist see: the README's links, its table of the
# environment variables, and the sdist built, installed in a fresh venv and used there.

MODULES = ("beaver.py", "beaver_server.py", "beaver_vector.py")


def _readme_prose():
    """The README without code blocks and inline code (where brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", (ROOT / "README.md").read_text("utf-8"),
                  flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_links_work_on_a_package_index():
    """Only absolute links, or anchors of the README's own headings (GitHub's and PyPI's
    renderers derive the same ids): a path into the repository would be dead on PyPI."""
    readme = (ROOT / "README.md").read_text("utf-8")
    headings = {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in readme.splitlines() if line.startswith("#")}
    prose = _readme_prose()
    links = re.findall(r"\]\(([^)\s]*)", prose) + re.findall(r'(?:src|href)="([^"]*)"', prose)
    assert links, "the README has links (its contents list)"
    for link in links:
        if link.startswith("#"):
            assert link[1:] in headings, f"an anchor with no heading: {link}"
        else:
            assert link.startswith("https://"), f"a link that only works in the repository: {link}"


def test_readme_documents_every_environment_variable():
    read = set()
    for module in MODULES:
        source = (ROOT / module).read_text("utf-8")
        read |= set(re.findall(r'(?:environ\.get|getenv|env|_env_\w+)\(\s*"([A-Z][A-Z0-9_]*)"',
                               source))
        read |= set(re.findall(r'environ\[\s*"([A-Z][A-Z0-9_]*)"\s*\]', source))
    section = (ROOT / "README.md").read_text("utf-8").split("## Environment variables")[1]
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section.split("\n## ")[0], re.M))
    assert {"BEAVER_URL", "BEAVER_TOKEN", "BEAVER_WATCH", "BEAVER_VECTOR_BACKEND",
            "BEAVER_INSECURE", "DATABASE"} <= read
    assert read == table


def _clean_env(**extra):
    """The environment without this checkout on the path (PYTHONPATH), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(*argv, **options):
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                            timeout=240, **options)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist and the wheel made from it by ``python -m build``, from a copy of the tree."""
    pytest.importorskip("build")
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building needs setuptools>=77 (the [test] extra)")
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".hypothesis", ".pytest_cache", "__pycache__", "build", "dist", "*.egg-info",
        "*.db-wal", "*.db-shm"))
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", base / "dist", source,
         env=_clean_env())
    (tarball,) = (base / "dist").glob("*.tar.gz")
    (wheel,) = (base / "dist").glob("*.whl")
    return base, tarball, wheel


def test_sdist_carries_tests_examples_fixtures_and_license(sdist):
    import tarfile
    import zipfile
    _, tarball, wheel = sdist
    with tarfile.open(tarball) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        metadata = tar.extractfile(f"{tarball.name[:-7]}/PKG-INFO").read().decode()
    assert {"LICENSE", "README.md", "pyproject.toml", "MANIFEST.in", "test_beaver.py",
            "beaver.py", "beaver_server.py", "beaver_vector.py", "examples/tour.py",
            "fixtures/upstream-1.3.0.db", "fixtures/upstream-2.4.1.json",
            "bench/bench_core.py", "scripts/check-image.sh",
            "scripts/make_upstream_fixtures.py", "Dockerfile", "beaver_dashboard/index.html",
            "beaver_dashboard/dashboard.js", "beaver_dashboard/dashboard.css"} <= names
    assert not [n for n in names if n.startswith("docs/")]     # the README links its picture
    assert {path.name for path in EXAMPLES} <= {n[9:] for n in names if n.startswith("examples/")}
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", "-wal", "-shm"))]
    assert "License-Expression: MIT" in metadata and "Project-URL: " in metadata
    with zipfile.ZipFile(wheel) as whl:
        files = set(whl.namelist())
    assert {"beaver.py", "beaver_server.py", "beaver_vector.py", "beaver_dashboard/index.html",
            "beaver_dashboard/dashboard.js", "beaver_dashboard/dashboard.css"} <= files
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files)
    assert not [f for f in files if f.startswith(("test_", "fixtures/", "examples/"))]


def test_sdist_installs_in_a_fresh_venv_and_works(sdist, tmp_path):
    """``pip install --no-deps`` of the sdist into a venv that sees no site-packages of ours;
    the build backend (setuptools) comes from the running environment, so no network."""
    import setuptools
    base, tarball, _ = sdist
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    backend = tmp_path / "backend"          # setuptools alone, for --no-build-isolation
    backend.mkdir()
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        found = Path(setuptools.__file__).parent.parent / name
        if found.exists():
            (backend / name).symlink_to(found)
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         tarball, env=_clean_env(PYTHONPATH=str(backend)))
    smoke = ("import beaver, importlib.metadata as m, sys\n"
             "assert beaver.__file__.startswith(sys.prefix), beaver.__file__\n"
             "db = beaver.BeaverDB(sys.argv[1]); db.dict('d')['k'] = {'v': [1, 'ü']}; db.close()\n"
             "db = beaver.BeaverDB(sys.argv[1]); print(db.dict('d')['k'], "
             "m.metadata('beaver-db')['License-Expression'])\n"
             "import beaver_server, os\n"       # its dashboard's files sit beside it
             "assert os.path.isfile(os.path.join(beaver_server._DASHBOARD_DIR, 'dashboard.js'))")
    out = _run(python, "-c", smoke, tmp_path / "smoke.db", env=_clean_env(), cwd=tmp_path)
    assert out == "{'v': [1, 'ü']} MIT\n"
    beaver_cli = python.parent / "beaver"
    assert "import-upstream" in _run(beaver_cli, "--help", env=_clean_env(), cwd=tmp_path)
    assert _run(beaver_cli, "-d", tmp_path / "smoke.db", "dict", "d", "get", "k",
                env=_clean_env(), cwd=tmp_path) == '{\n  "v": [\n    1,\n    "ü"\n  ]\n}\n'


def test_tests_run_from_the_unpacked_sdist(sdist, tmp_path):
    import tarfile
    _, tarball, _ = sdist
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                    else {}))
    (unpacked,) = tmp_path.iterdir()
    out = _run(sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
               "-k", "upstream_fixtures or import_upstream_copies or examples_exist or tour",
               cwd=unpacked, env=_clean_env(PYTHONPATH=str(unpacked)))
    assert re.search(r"\b5 passed", out), out      # the fixtures, both imports, the examples


# ---- PostgreSQL: what is particular to that engine ----

def test_pg_backup_is_refused_with_a_clear_error(pg_db):
    with pytest.raises(beaver.FeatureUnavailable, match="pg_dump"):
        pg_db.backup("copy.db")


def test_pg_without_psycopg_is_a_feature_unavailable_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "beaver_postgres", None)      # import fails
    with pytest.raises(beaver.FeatureUnavailable, match=r"beaver-db\[postgres\]"):
        BeaverDB("postgresql://nobody@127.0.0.1:1/none")


def test_pg_nul_in_a_key_is_a_validation_error(pg_db):
    d = pg_db.dict("d")
    with pytest.raises(beaver.ValidationError, match="NUL"):
        d["a\x00b"] = 1
    d["ok"] = "a\x00b"               # inside a JSON value it is an escape: stored fine
    assert d["ok"] == "a\x00b" and len(d) == 1


def test_pg_field_index_serves_order_by(pg_db):
    d = pg_db.dict("people")
    d.update({f"k{i}": {"age": i % 50} for i in range(200)})
    d.create_index("age")
    assert d.explain(order_by="age")["index"] == "age"
    assert [v["age"] for _, v in d.find(order_by="-age", limit=3)] == [49, 49, 49]


def test_pg_schemas_are_separate_databases(postgres_url):
    with pg_schema(postgres_url) as a, pg_schema(postgres_url) as b:
        with BeaverDB(a) as one, BeaverDB(b) as two:
            one.dict("d")["k"] = 1
            assert "k" not in two.dict("d") and one.dict("d")["k"] == 1


def test_pg_statements_with_sqlite_only_syntax_are_refused_not_run(pg_db):
    with pytest.raises(beaver.FeatureUnavailable, match="no PostgreSQL form"):
        pg_db._core.execute("SELECT name FROM sqlite_master")


def test_pg_a_read_survives_a_dropped_connection(pg_db, postgres_url):
    import psycopg
    d = pg_db.dict("d")
    d["k"] = 1
    pid = pg_db._core.one("SELECT pg_backend_pid()")[0]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert d["k"] == 1                # the read is retried once on a new connection
    d["k"] = 2                        # and writes go on on it
    assert d["k"] == 2


def test_pg_a_transaction_begins_on_a_new_connection_or_keeps_its_own(pg_db, pg_url,
                                                                       postgres_url):
    import psycopg
    pid = pg_db._core.one("SELECT pg_backend_pid()")[0]      # the idle connection, lent next
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pg_db.transaction():                   # it broke at BEGIN: begun again on a new one
        pg_db.dict("d")["k"] = 1
        assert pg_db._core.one("SELECT pg_backend_pid()")[0] != pid
    assert pg_db.dict("d")["k"] == 1
    with BeaverDB(pg_url, timeout=0.5) as impatient:
        mine = impatient._core.one("SELECT pg_backend_pid()")[0]
        with pg_db.transaction():               # holds the writers' lock
            with pytest.raises(beaver.DatabaseBusy):
                with impatient.transaction():
                    pass
        with impatient.transaction():           # the same connection, its BEGIN rolled back
            assert impatient._core.one("SELECT pg_backend_pid()")[0] == mine


def _waits_in(thread, function) -> bool:
    """Whether ``thread`` is (somewhere) inside ``function`` now."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_pg_writers_queued_for_a_transaction_hold_no_connection(pg_url, monkeypatch):
    """Threads waiting for the writers hold no pooled connection meanwhile: with a pool of
    2, one transaction open and three more queued, a plain read still gets one."""
    beaver_postgres = pytest.importorskip("beaver_postgres")
    monkeypatch.setattr(beaver_postgres, "POOL_SIZE", 2)
    with BeaverDB(pg_url, timeout=2) as db:
        db.dict("d")["x"] = 1
        inside, leave, done = threading.Event(), threading.Event(), []

        def hold():
            with db.transaction():
                inside.set()
                leave.wait(MP_DEADLINE)

        def queue_up():
            with db.transaction():
                db.dict("d")["y"] = 2
            done.append(1)
        holder = threading.Thread(target=hold)
        holder.start()
        assert inside.wait(MP_DEADLINE)
        queued = [threading.Thread(target=queue_up) for _ in range(3)]
        for thread in queued:
            thread.start()
        _rt_until(lambda: all(_waits_in(thread, "_enter_write") for thread in queued))
        assert db.dict("d")["x"] == 1           # DatabaseBusy if the queued held the pool
        leave.set()
        for thread in [holder, *queued]:
            thread.join(MP_DEADLINE)
        assert done == [1, 1, 1]


def test_pg_a_transaction_that_must_not_wait_is_refused_while_another_writes(pg_url):
    """On PostgreSQL, ``transaction(wait=False)`` is refused at once while a thread of this
    process holds the writers, or another session the writers' lock; nothing stays held."""
    with BeaverDB(pg_url, timeout=MP_DEADLINE) as db, \
            BeaverDB(pg_url, timeout=MP_DEADLINE) as elsewhere:
        for writer_db in (db, elsewhere):
            assert _refused_while_a_thread_writes(db._core, writer_db)
            assert not db._core.connection_in_transaction()
        with db._core.transaction(wait=False):
            db.dict("d")["mine"] = 1
            with db._core.transaction(wait=False):
                db.dict("d")["nested"] = 1
        assert dict(db.dict("d")) == {"held": 1, "mine": 1, "nested": 1}


def test_pg_a_write_queued_at_the_gate_waits_for_the_lock_only_what_is_left(pg_url):
    """The database timeout bounds the whole wait of a write: the time it queued behind this
    process's writers counts against its wait for the writers' lock held elsewhere (it used
    to wait a full lock_timeout more, up to twice the timeout)."""
    import psycopg
    timeout, held_here = 1.5, 0.9
    with BeaverDB(pg_url, timeout=timeout) as db, BeaverDB(pg_url, timeout=30) as elsewhere:
        db.dict("d")["x"] = 1
        main, inside, release = threading.current_thread(), threading.Event(), threading.Event()

        def hold_here():
            with db.transaction():
                inside.set()
                _rt_until(lambda: _waits_in(main, "_enter_write"))
                time.sleep(held_here)       # the stimulus: this process's writer holds on

        def hold_elsewhere():               # queued on the lock first, then holds it
            with elsewhere.transaction():
                release.wait(MP_DEADLINE)
        here = threading.Thread(target=hold_here)
        here.start()
        assert inside.wait(MP_DEADLINE)
        there = threading.Thread(target=hold_elsewhere)
        there.start()
        with psycopg.connect(pg_url, autocommit=True) as look:
            _rt_until(lambda: look.execute("SELECT count(*) FROM pg_locks WHERE locktype = "
                                           "'advisory' AND NOT granted").fetchone()[0] >= 1)
        started = time.monotonic()
        try:
            with pytest.raises(beaver.DatabaseBusy), db.transaction():
                db.dict("d")["y"] = 2
            waited = time.monotonic() - started
        finally:
            release.set()
            here.join(MP_DEADLINE)
            there.join(MP_DEADLINE)
        assert waited < timeout + 0.5, waited       # 0.9 s at the gate + 0.6 s on the lock


def test_pg_a_closed_connection_is_seen_past_descriptor_1023(pg_url):
    """The look at an idle connection's socket works for any descriptor number (select()
    refuses those past 1023: every write would then take its connection for closed)."""
    import resource
    beaver_postgres = pytest.importorskip("beaver_postgres")
    import psycopg
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the file limit ({hard}) is too low to reach descriptor 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn, \
                psycopg.connect(pg_url, autocommit=True) as killer:
            assert conn.pgconn.socket > 1023
            assert not beaver_postgres._closed_by_server(conn)
            killer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            _rt_until(lambda: beaver_postgres._closed_by_server(conn))
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_pg_a_write_cut_off_midway_is_connection_lost_written(pg_db, postgres_url):
    import psycopg
    beaver_postgres = pytest.importorskip("beaver_postgres")
    d = pg_db.dict("d")
    d["k"] = 1
    lost = []

    def write():                        # waits for the row lock below, then its backend dies
        try:
            pg_db._core.execute(beaver.DictManager._SET, ("d", "k", "2", None))
        except beaver_postgres.ConnectionLost as e:
            lost.append(e)
    with psycopg.connect(postgres_url, autocommit=True) as admin, \
            psycopg.connect(pg_db._core.url) as holder:
        holder.execute("SELECT 1 FROM beaver_dicts WHERE key = 'k' FOR UPDATE")
        writer = threading.Thread(target=write)
        writer.start()
        find = "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND " \
               "query LIKE 'INSERT INTO beaver_dicts%%'"
        _rt_until(lambda: admin.execute(find).fetchone() is not None, MP_DEADLINE)
        admin.execute("SELECT pg_terminate_backend(%s)", admin.execute(find).fetchone())
        writer.join(MP_DEADLINE)
    assert len(lost) == 1 and lost[0].written   # it may have committed: never retried
    assert d["k"] == 1


def _pg_killed_mid_transaction(url, ready):
    db = BeaverDB(url)
    for i in range(10):
        db.dict("acked")[str(i)] = i  # acknowledged: each committed before the call returned
        db.queue("jobs").put(i)
    with db.transaction():
        db.dict("acked")["doomed"] = 1
        db.queue("jobs").put("doomed")
        ready.set()
        time.sleep(MP_DEADLINE)       # SIGKILLed here, holding the writers' lock


def test_pg_client_sigkilled_mid_transaction_loses_nothing_acknowledged(pg_url):
    ready = SPAWN.Event()
    child = SPAWN.Process(target=_pg_killed_mid_transaction, args=(pg_url, ready))
    child.start()
    try:
        assert ready.wait(MP_DEADLINE), "the child never reached its transaction"
    finally:
        child.kill()
        child.join(MP_DEADLINE)
    with BeaverDB(pg_url, timeout=MP_DEADLINE) as db:
        with db.transaction():        # the dead client's lock is gone with its connection
            db.dict("after")["x"] = 1
        assert dict(db.dict("acked").items()) == {str(i): i for i in range(10)}
        assert [item.data for item in db.queue("jobs")] == list(range(10))


def test_pg_blocking_get_wakes_on_a_put_from_another_process(pg_url):
    with BeaverDB(pg_url) as db:
        q = db.queue("wake")
        child = SPAWN.Process(target=_pg_put_later, args=(pg_url,))
        child.start()
        try:
            assert q.get(timeout=MP_DEADLINE).data == "hello"
        finally:
            child.join(MP_DEADLINE)


def _pg_put_later(url):
    with BeaverDB(url) as db:
        db.queue("wake").put("hello")


def test_pg_a_woken_get_sends_one_statement_per_attempt(pg_url, monkeypatch):
    """A blocked get on PostgreSQL, once woken, sends its take alone: the take tells whether
    there was an item (and when a lease runs out), and checks for event listeners itself,
    so neither a look nor a stale cache of listeners costs a round trip more."""
    import beaver_postgres
    sent, run = [], beaver_postgres.PostgresCore._on

    def on(cursor, statement, params, how):
        if threading.current_thread().name == "getter":
            sent.append(statement.sql)
        return run(cursor, statement, params, how)
    monkeypatch.setattr(beaver_postgres.PostgresCore, "_on", staticmethod(on))
    with BeaverDB(pg_url) as db, BeaverDB(pg_url) as other:
        got = []
        getter = threading.Thread(target=lambda: got.append(db.queue("q").get(timeout=MP_DEADLINE)),
                                  name="getter")
        getter.start()
        _rt_until(lambda: _waits_in(getter, "wait"))
        del sent[:]
        db._events._remote_due = 0.0                    # its cache of listeners is stale
        other.channel("c").publish("not for the queue")     # wakes it: nothing to take
        _rt_until(lambda: sent and _waits_in(getter, "wait"))
        assert sent and all("DELETE FROM beaver_queues" in sql for sql in sent), sent
        del sent[:]
        db._events._remote_due = 0.0
        other.queue("q").put("job")
        getter.join(MP_DEADLINE)
        assert [item.data for item in got] == ["job"]
        assert sent and all("DELETE FROM beaver_queues" in sql for sql in sent), sent


def test_pg_dump_of_sqlite_loads_into_postgres_and_back(pg_db, tmp_path):
    with BeaverDB(tmp_path / "a.db") as lite:
        lite.dict("d").update(a=1, b={"x": [1, 2]})
        lite.list("l").extend([1, "two", None])
        lite.queue("q").put("job", priority=2.5)
        lite.blobs("b").put("k", b"\x00\xff", metadata={"m": 1})
        lite.log("g").log({"v": 1}, timestamp=1000.0)
        lite.channel("c").publish("hi")
        first = io.StringIO()
        assert lite.dump(first) == 6
    first.seek(0)
    assert pg_db.load(first) == 6
    again = io.StringIO()
    pg_db.dump(again)
    lines = lambda text: [json.loads(line) for line in text.splitlines()[1:]]
    assert lines(again.getvalue()) == lines(first.getvalue())
    info = pg_db.info()
    assert info["bytes"] > 0 and "secret" not in info["path"]
    assert {(s["kind"], s["name"], s["size"]) for s in info["structures"]} == {
        ("dict", "d", 2), ("list", "l", 3), ("queue", "q", 1), ("blob", "b", 1),
        ("log", "g", 1), ("channel", "c", 1)}


def test_pg_concurrent_publishers_lose_no_message(pg_url):
    # publishes of several connections at once: each message becomes visible in the order of
    # its sequence number (the writers' lock, taken inside the one publishing statement)
    dbs = [BeaverDB(pg_url) for _ in range(4)]
    try:
        with dbs[0].channel("c").subscribe() as sub:
            def publish(k):
                for i in range(100):
                    dbs[k].channel("c").publish([k, i])
            threads = [threading.Thread(target=publish, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            got = [sub.get(timeout=MP_DEADLINE) for _ in range(400)]
            for t in threads:
                t.join(MP_DEADLINE)
        assert sorted(map(tuple, got)) == [(k, i) for k in range(4) for i in range(100)]
        for k in range(4):
            assert [i for j, i in got if j == k] == list(range(100))
    finally:
        for db in dbs:
            db.close()


def _pg_connections(base, application_name) -> int:
    import psycopg
    with psycopg.connect(base, autocommit=True) as admin:
        return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                             (application_name,)).fetchone()[0]


def test_pg_many_short_lived_threads_share_a_bounded_pool(pg_url, postgres_url):
    beaver_postgres = pytest.importorskip("beaver_postgres")
    name = f"beaver_test_{uuid.uuid4().hex[:12]}"
    with BeaverDB(f"{pg_url}&application_name={name}") as db:
        d = db.dict("d")

        def work(i):
            d[f"k{i}"] = i
            assert d[f"k{i}"] == i
        for batch in range(4):          # 4 x 30 threads, 30 at a time, each gone after its work
            threads = [threading.Thread(target=work, args=(batch * 30 + k,)) for k in range(30)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(MP_DEADLINE)
            assert 1 <= _pg_connections(postgres_url, name) <= beaver_postgres.POOL_SIZE
        assert len(d) == 120
    _rt_until(lambda: _pg_connections(postgres_url, name) == 0, MP_DEADLINE)    # backends end


def test_pg_a_transaction_keeps_one_connection_while_other_threads_borrow(pg_db):
    core = pg_db._core
    backend = lambda: core.one("SELECT pg_backend_pid()")[0]
    with pg_db.transaction():
        mine = backend()
        pg_db.dict("d")["a"] = 1
        others = []
        reader = threading.Thread(target=lambda: others.append(backend()))
        reader.start()
        reader.join(MP_DEADLINE)
        assert backend() == mine and others and others[0] != mine
    assert pg_db.dict("d")["a"] == 1


def test_pg_raw_begin_and_commit_keep_one_connection_then_give_it_back(pg_db):
    core = pg_db._core
    backend = lambda: core.one("SELECT pg_backend_pid()")[0]
    core.execute(core.SNAPSHOT_BEGIN)           # as a caller of the core may (beaver_vector)
    mine = backend()
    assert core.one("SELECT count(*) FROM beaver_meta")[0] >= 1 and backend() == mine
    core.execute("COMMIT")
    assert core._pool._pins == {}               # back in the pool once idle
    core.conn()                                 # a pin taken outside transaction() ...
    pg_db.dict("d")["k"] = 1
    assert core._pool._pins == {}               # ... ends with the next idle statement


def test_pg_pool_waits_for_a_free_connection_and_reclaims_a_dead_threads(pg_url, monkeypatch):
    beaver_postgres = pytest.importorskip("beaver_postgres")
    monkeypatch.setattr(beaver_postgres, "POOL_SIZE", 1)
    with BeaverDB(pg_url, timeout=0.5) as db:
        d = db.dict("d")
        stray = threading.Thread(target=db._core.conn)     # pins the one connection, then ends
        stray.start()
        stray.join(MP_DEADLINE)
        assert d.get("k") is None           # its connection was closed and a new one opened
        held, release = threading.Event(), threading.Event()

        def hold():
            with db.transaction():
                d["k"] = 1
                held.set()
                release.wait(MP_DEADLINE)
        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert held.wait(MP_DEADLINE)
            with pytest.raises(beaver.DatabaseBusy, match="connections"):
                d.get("k")                  # the only connection is the transaction's
        finally:
            release.set()
            holder.join(MP_DEADLINE)
        assert d["k"] == 1


def _pg_setdefaults(url, keys, ready, start, out):
    with BeaverDB(url) as db:
        d = db.dict("d")
        ready.put(1)
        start.wait(MP_DEADLINE)
        out.put([d.setdefault(key, os.getpid()) for key in keys])


def test_pg_setdefault_of_a_new_key_from_many_callers_gives_one_winner(pg_url):
    keys = [f"k{i}" for i in range(100)]
    dbs = [BeaverDB(pg_url) for _ in range(4)]
    ready, start, out = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    children = [SPAWN.Process(target=_pg_setdefaults, args=(pg_url, keys, ready, start, out))
                for _ in range(2)]
    try:
        results = []
        barrier = threading.Barrier(len(dbs))

        def race(k):
            barrier.wait(MP_DEADLINE)
            results.append([dbs[k].dict("d").setdefault(key, f"thread {k}") for key in keys])
        threads = [threading.Thread(target=race, args=(k,)) for k in range(len(dbs))]
        for child in children:
            child.start()
        for _ in children:
            ready.get(timeout=MP_DEADLINE)
        start.set()
        for t in threads:
            t.start()
        for t in threads:
            t.join(MP_DEADLINE)
        results += [out.get(timeout=MP_DEADLINE) for _ in children]
        stored = [dbs[0].dict("d")[key] for key in keys]
        assert results == [stored] * (len(dbs) + len(children))
    finally:
        for child in children:
            child.join(MP_DEADLINE)
        for db in dbs:
            db.close()


def test_pg_setdefault_and_a_set_of_the_new_key_between_its_read_and_write(pg_url):
    # setdefault reads no row (nothing to lock), a set of another connection stores the key,
    # then setdefault must not overwrite it: it returns the value that is there
    with BeaverDB(pg_url) as db, BeaverDB(pg_url) as other:
        d, read, reads = db.dict("d"), db.dict("d").get, []

        def read_then_let_the_set_in(key, default=None):
            value = read(key, default)
            reads.append(value)
            if len(reads) == 1:         # after the first read only (a second one locks the row)
                setter = threading.Thread(target=lambda: other.dict("d").set(key, "set"))
                setter.start()
                setter.join(MP_DEADLINE)
            return value
        d.get = read_then_let_the_set_in
        assert d.setdefault("k", "default") == "set"
        assert other.dict("d")["k"] == "set"


def test_pg_async_queue_get(pg_db):
    async def run():
        aq = pg_db.queue("q").as_async()
        await aq.put("x")
        return (await aq.get(timeout=MP_DEADLINE)).data
    assert asyncio.run(run()) == "x"


@pytest.fixture
def pg_cluster():
    """A throwaway PostgreSQL cluster of this test's own: (url, stop), stop.restart()."""
    if os.environ.get("BEAVER_TEST_POSTGRES") == "0":
        pytest.skip("PostgreSQL tests are off (BEAVER_TEST_POSTGRES=0)")
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg 3 (the postgres extra)")
    folder = tempfile.mkdtemp(prefix="beaver-pg-")
    started = _throwaway_cluster(folder)
    if isinstance(started, str):
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(started)
    try:
        yield started
    finally:
        started[1]()
        shutil.rmtree(folder, ignore_errors=True)


def _listening(url) -> bool:
    """Whether a beaver listener (LISTEN) is connected to the server at ``url``."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                            "'LISTEN %'").fetchone()[0] > 0


def _idle_waiter(thread) -> bool:
    """Whether ``thread`` sleeps in its wait, not taking: a restart cannot meet its take
    (a take cut off by the server going away raises, as documented)."""
    return _waits_in(thread, "wait") and not _waits_in(thread, "_take")


def test_pg_server_restart_clients_reconnect_and_carry_on(pg_cluster):
    url, stop = pg_cluster
    beaver_postgres = pytest.importorskip("beaver_postgres")
    with BeaverDB(url) as db, BeaverDB(url) as other:
        d, q = db.dict("d"), db.queue("q")
        d["a"] = 1
        other.dict("d")["b"] = 2                # ``other`` has a connection to lose too
        got = []
        waiter = threading.Thread(target=lambda: got.append(q.get(timeout=MP_DEADLINE).data))
        waiter.start()
        _rt_until(lambda: _listening(url) and _idle_waiter(waiter), MP_DEADLINE)
        assert stop.restart().returncode == 0
        assert d["a"] == 1                      # a read is retried once on a new connection
        other.dict("d")["c"] = 3                # a write is sent on no connection found closed
        q.put("after the restart")              # the waiter's listener reconnected
        waiter.join(MP_DEADLINE)
        assert got == ["after the restart"]
        assert dict(d.items()) == {"a": 1, "b": 2, "c": 3}


def test_pg_waiters_survive_a_server_restart(pg_cluster):
    url, stop = pg_cluster
    with BeaverDB(url) as db, BeaverDB(url) as other:
        holder = other.lock("job")
        holder.acquire()
        sub = db.channel("news").subscribe()
        view = db.log("hits").live(window=3600, period=0.05, aggregator=len)
        got, errors = {}, []

        def wait(what, run):
            try:
                got[what] = run()
            except Exception as e:      # reported by the assertion below
                errors.append((what, e))

        def view_sees_the_hit():
            while view.get(timeout=MP_DEADLINE) == 0:
                pass
            return "seen"
        waiters = [threading.Thread(target=wait, args=args) for args in [
            ("queue", lambda: db.queue("jobs").get(timeout=MP_DEADLINE).data),
            ("lock", lambda: db.lock("job").acquire(timeout=MP_DEADLINE).release()),
            ("message", lambda: sub.get(timeout=MP_DEADLINE)),
            ("view", view_sees_the_hit)]]
        for t in waiters:
            t.start()
        _rt_until(lambda: db._core.watcher.users >= 3 and other._core.one(
            "SELECT count(*) FROM beaver_locks WHERE name = 'job'")[0] == 2, MP_DEADLINE)
        assert stop.restart().returncode == 0
        assert other.dict("d").get("k") is None     # a read: retried on a new connection
        other.queue("jobs").put("job")
        other.channel("news").publish("hello")
        other.log("hits").log(1)
        holder.release()
        for t in waiters:
            t.join(MP_DEADLINE)
        view.close()
        sub.close()
        assert errors == []
        assert got == {"queue": "job", "lock": None, "message": "hello", "view": "seen"}


@pytest.fixture
def pg_standby(pg_cluster):
    """A synchronous streaming standby of ``pg_cluster``: (URL naming both, promote, stop
    the primary). Commits are acknowledged once the standby has them."""
    url, stop_primary = pg_cluster
    folder = tempfile.mkdtemp(prefix="beaver-pg-")
    run = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run:
        shutil.chown(folder, "postgres")
    data, port = os.path.join(folder, "data"), _free_port()
    primary_port = url.rsplit(":", 1)[1].split("/")[0]
    ctl = lambda *args: subprocess.run(run + [str(PG_BIN / "pg_ctl"), "-D", data, *args],
                                       capture_output=True, timeout=120)
    try:
        subprocess.run(run + [str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p",
                              primary_port, "-U", "postgres", "-D", data, "-R", "-X", "stream",
                              "-c", "fast"], check=True, capture_output=True, timeout=120)
        assert ctl("-w", "-l", os.path.join(folder, "log"), "-o",
                   f"-k {folder} -p {port} -h 127.0.0.1", "start").returncode == 0
        import psycopg
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
            _rt_until(lambda: conn.execute("SELECT count(*) FROM pg_stat_replication WHERE "
                                           "sync_state = 'sync'").fetchone()[0], MP_DEADLINE)
        both = (f"postgresql://postgres@127.0.0.1:{primary_port},127.0.0.1:{port}/postgres"
                "?target_session_attrs=read-write")
        yield both, lambda: ctl("-w", "promote"), stop_primary
    finally:
        ctl("-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_pg_failover_to_a_standby_is_a_restart_for_clients(pg_standby):
    """The primary dies, the synchronous standby is promoted: every acknowledged write is
    there, a waiting consumer and new writes carry on (a URL naming both hosts)."""
    url, promote, stop_primary = pg_standby
    with BeaverDB(url) as db:
        log, queue, acked, stop = db.list("acked"), db.queue("jobs"), [], threading.Event()
        log.push(-1)
        got, cut_off = [], []

        def wait():
            while True:
                try:
                    return got.append(queue.get(timeout=MP_DEADLINE).data)
                except beaver_postgres_lost() as e:     # a take cut off as the server died
                    cut_off.append(e)                   # (written: its outcome is unknown; the
                                                        # queue is empty here), or a new get
                                                        # called while no primary answers
        waiter = threading.Thread(target=wait)
        waiter.start()

        def write():
            for i in itertools.count():
                if stop.is_set():
                    return
                with contextlib.suppress(beaver_postgres_lost()):
                    log.push(i)
                    acked.append(i)
        writer = threading.Thread(target=write)
        writer.start()
        _rt_until(lambda: len(acked) >= 20)
        assert stop_primary().returncode == 0
        assert promote().returncode == 0
        seen = len(acked)
        _rt_until(lambda: len(acked) >= seen + 20)      # writes go on on the new primary
        stop.set()
        writer.join(MP_DEADLINE)
        assert set(acked) <= set(log[:])                # nothing acknowledged was lost
        queue.put("after the failover")
        waiter.join(MP_DEADLINE)
        assert got == ["after the failover"] and sum(e.written for e in cut_off) <= 1


def beaver_postgres_lost():
    return pytest.importorskip("beaver_postgres").ConnectionLost


def test_pg_two_servers_share_one_database(pg_url):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    import beaver_server
    with BeaverDB(pg_url) as one, BeaverDB(pg_url) as two, \
            TestClient(beaver_server.create_app(one)) as a, \
            TestClient(beaver_server.create_app(two)) as b:
        key = {"idempotency-key": uuid.uuid4().hex}
        assert a.post("/queues/jobs/put", json={"n": 1}, headers=key).status_code == 204
        assert a.post("/queues/jobs/put", json={"n": 1}, headers=key).status_code == 204
        assert b.post("/queues/jobs/get").json()["data"] == {"n": 1}      # once only
        assert b.post("/queues/jobs/get?block=false").status_code >= 400
        a.put("/dicts/config/theme", json="dark")
        assert b.get("/dicts/config/theme").json() == "dark"
        assert b.get("/info").json()["structures"] == [
            {"kind": "dict", "name": "config", "size": 1}]
        document = {"id": "x/1", "body": {"t": "hello world", "n": 1}, "embedding": [1.0, 0.0]}
        assert a.post("/collections/c/index", json={"document": document}).status_code == 200
        hits = b.post("/collections/c/match", json={"query": "helo", "fuzziness": 1,
                                                    "highlight": True}).json()
        assert hits[0]["document"]["id"] == "x/1" and "[hello]" in hits[0]["snippet"]
        hits = b.post("/collections/c/search", json={"vector": [1.0, 0.1],
                                                     "where": {"n": 1}}).json()
        assert [hit["document"]["id"] for hit in hits] == ["x/1"]
        assert {"kind": "collection", "name": "c", "size": 1} in b.get("/info").json()[
            "structures"]


def test_pg_pop_and_a_concurrent_set_of_the_key_happen_one_after_the_other(pg_url):
    with BeaverDB(pg_url) as db, BeaverDB(pg_url) as other:
        d = db.dict("d")
        d["k"] = "old"
        done = threading.Event()
        with db.transaction():
            assert d.pop("k") == "old"      # the row stays locked until this commits
            setter = threading.Thread(target=lambda: (other.dict("d").set("k", "new"),
                                                      done.set()))
            setter.start()
            assert not done.wait(0.2)       # a window for the set: it cannot end before
        setter.join(MP_DEADLINE)            # the commit, as the pop locked the key's row
        assert d["k"] == "new"              # the set came after the pop: nothing lost


@pytest.mark.parametrize("name", ["what?", "100%", "it's", 'x LIMIT ?', "?1 OR 1=1", '"q"'])
def test_pg_names_and_paths_with_sql_characters_stay_literals(pg_db, name):
    d = pg_db.dict(name)
    d.update(a={name: 1, "n": 1}, b={name: 2, "n": 2})
    path = "n" if '"' in name else f'"{name}"'      # a key with " has no path: "n" then
    d.create_index(path)                             # the name goes into SQL as a literal
    assert d.find({path: 2}) == [("b", {name: 2, "n": 2})]
    assert d.find({"n": {"$gte": 1}}, order_by=f"-{path}") == [
        ("b", {name: 2, "n": 2}), ("a", {name: 1, "n": 1})]
    assert pg_db.dict("other").find() == [] and len(d) == 2


def test_pg_passwords_stay_out_of_paths_and_errors():
    beaver_postgres = pytest.importorskip("beaver_postgres")
    assert beaver_postgres._safe_url("postgresql://app:s3cret@db:5432/app") == \
        "postgresql://app:***@db:5432/app"
    with pytest.raises(beaver_postgres.ConnectionLost) as lost:
        BeaverDB("postgres://app:s3cret@127.0.0.1:1/app", timeout=2)
    assert "s3cret" not in str(lost.value) and not lost.value.written


def _pg_other_process(url, started):
    with BeaverDB(url) as db:
        started.set()
        with db.lock("job", timeout=MP_DEADLINE) as lock:   # waits for the parent's release
            db.channel("news").publish({"token": lock.token})
            db.dict("config")["theme"] = "dark"


def test_pg_lock_hand_off_channel_and_events_across_processes(pg_url):
    with BeaverDB(pg_url) as db:
        events, seen = [], threading.Event()
        db.dict("config").on("set", lambda p: (events.append(p["value"]), seen.set()))
        lock = db.lock("job")
        lock.acquire()
        first = lock.token
        with db.channel("news").subscribe() as sub:
            started = SPAWN.Event()
            child = SPAWN.Process(target=_pg_other_process, args=(pg_url, started))
            child.start()
            try:
                assert started.wait(MP_DEADLINE)
                _rt_until(lambda: db._core.one("SELECT count(*) FROM beaver_locks WHERE "
                                               "name = ? AND held = 0", ("job",))[0], MP_DEADLINE)
                lock.release()                              # handed to the waiting child
                assert sub.get(timeout=MP_DEADLINE)["token"] > first    # fencing token grew
                assert seen.wait(MP_DEADLINE) and events == ["dark"]
            finally:
                child.join(MP_DEADLINE)
        assert child.exitcode == 0


# ---- collections on PostgreSQL ----

def _pg_collection_reader(url, loaded, written, result):
    """Another process, over TCP: search once (its vector index loads), wait for the other
    process's writes, then search, filter and match again."""
    with BeaverDB(url, timeout=MP_DEADLINE) as db:
        docs = db.collection("shared")
        before = _ids(docs.search([0.0, 0.0], top_k=2))
        loaded.set()
        written.wait(MP_DEADLINE)
        result.put((before, _ids(docs.search([0.0, 0.0], top_k=2)),
                    _ids(docs.search([0.0, 0.0], top_k=2, where={"team": "blue"})),
                    _ids(docs.match("quick fox")), _ids(docs.match("quikc", fuzziness=1)),
                    _ids(docs.match("elefantine", fuzziness=2)), len(docs)))


def test_pg_collection_two_processes_over_tcp(pg_url):
    with BeaverDB(pg_url) as db:
        docs = db.collection("shared")
        docs.index_many(Document(id=f"d{i}", embedding=[float(i), 0.0],
                                 body={"text": f"note {i}", "team": ("blue", "red")[i % 2]})
                        for i in range(10))
        loaded, written, result = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
        reader = SPAWN.Process(target=_pg_collection_reader, args=(pg_url, loaded, written,
                                                                   result))
        reader.start()
        try:
            assert loaded.wait(MP_DEADLINE)
            docs.index(Document(id="near", embedding=[0.1, 0.0],
                                body={"text": "the quick brown fox", "team": "blue"}))
            docs.drop("d0")
            docs.index(Document(id="big", embedding=[50.0, 0.0],
                                body={"text": "an elephantine task", "team": "red"}))
            written.set()
            answer = result.get(timeout=MP_DEADLINE)
        finally:
            reader.join(MP_DEADLINE)
        assert answer == (["d0", "d1"], ["near", "d1"], ["near", "d2"], ["near"], ["near"],
                          ["big"], 11)
        assert reader.exitcode == 0


HOSTILE_QUERIES = ["'", "''", "\\", "\\'", "it's", "back\\slash", "a & b", "a | b", "!bang",
                   "colon:", ":*", "star*", "*", "(paren", "()", ")(", "<->", "a <-> b",
                   "a:* & !b", "'a' & 'b'", "\x00", "back\x00slash", "x\\x00", "$$", "%_",
                   "'; DROP TABLE beaver_documents; --", '"it\'s back\\slash"', "-it's",
                   "NOT 'a'", "it's OR !bang", "& | ! : * ( ) < - >", "é:*", "word" * 2500]


def test_pg_indexing_splits_each_text_field_into_words_once(pg_db, monkeypatch):
    """The words of a field feed the vocabulary and the row's tsvector: split once."""
    split = []
    terms = beaver._terms
    monkeypatch.setattr(beaver, "_terms", lambda text: split.append(text) or terms(text))
    docs = pg_db.collection("c")
    docs.index(Document(id="a", body={"title": "the cat", "text": "saw the cat"}))
    assert sorted(split) == ["saw the cat", "the cat"]
    monkeypatch.undo()
    assert [hit[0].id for hit in docs.match("saw cat")] == ["a"]


def test_pg_collection_hostile_query_text_finds_what_sqlite_finds(pg_db, tmp_path):
    """Quotes, backslashes, tsquery's own operators, NUL and huge queries are text on
    PostgreSQL as on SQLite: the same documents come back, and nothing raises."""
    bodies = {"a": "it's a back\\slash & pipe | bang! colon: star* (paren) <-> 'quoted'",
              "b": "plain words, a bang and a star", "c": {"t": "Élan façade naïve"}}
    with BeaverDB(tmp_path / "lite.db") as lite:
        engines = [lite.collection("h"), pg_db.collection("h")]
        for docs in engines:
            docs.index_many(Document(id=key, body=body) for key, body in bodies.items())
        for query in HOSTILE_QUERIES:
            for fuzziness in (0, 1, 2):
                sqlite, postgres = (sorted(_ids(docs.match(query, fuzziness=fuzziness)))
                                    for docs in engines)
                assert sqlite == postgres, (query, fuzziness)
        assert _ids(engines[1].match("back\\slash")) == ["a"]
        assert _ids(engines[1].match("'quoted'")) == ["a"]
        assert _ids(engines[1].match("elan facade")) == ["c"]
        for docs in engines:
            with pytest.raises(ValueError):
                docs.match("x" * (beaver.MATCH_MAX_LENGTH + 1))
    assert len(pg_db.collection("h")) == 3


def test_pg_collection_no_leak_between_two_collections(db):
    """Text, typo vocabulary, vectors, filters and edges stay inside their collection."""
    a, b = db.collection("a"), db.collection("b")
    a.index(Document(id="same", body={"w": "zebra crossing"}, embedding=[1.0, 0.0]))
    b.index_many([Document(id="same", body={"w": "zebras database"}, embedding=[0.0, 1.0]),
                  Document(id="other", body={"w": "programming"}, embedding=[1.0, 0.1])])
    b.connect("same", "other", "L")
    assert _ids(a.match("zebras", fuzziness=1)) == ["same"]
    assert a.match("databse", fuzziness=1) == [] and a.match("progrmaming", fuzziness=2) == []
    assert a.match("database") == [] and _ids(b.match("database")) == ["same"]
    assert [d.body for d, _ in a.search([0.0, 1.0], top_k=5)] == [{"w": "zebra crossing"}]
    assert _ids(a.search([1.0, 0.1], top_k=5, where={"w": "programming"})) == []
    assert a.find({"w": "programming"}) == [] and a.count() == 1
    assert a.neighbors("same") == [] and [d.id for d in b.neighbors("same")] == ["other"]
    b.clear()
    assert _ids(a.match("zebra")) == ["same"] and len(a.search([1.0, 0.0])) == 1


def test_pg_collection_nul_inside_a_body_is_indexed_as_a_separator(db):
    docs = db.collection("docs")
    docs.index(Document(id="a", body={"t": "alpha\x00beta"}))
    assert _ids(docs.match("beta")) == ["a"] and docs["a"].body == {"t": "alpha\x00beta"}
    assert "[beta]" in docs.match("beta", highlight=True)[0][2]


def test_pg_collection_typo_search_needs_its_extensions(pg_db, postgres_url):
    """Without pg_trgm and fuzzystrmatch, fuzziness=2 is a clear FeatureUnavailable (one
    edit needs neither); the extensions live in public, so dropping a schema keeps them."""
    docs = pg_db.collection("docs")
    docs.index(Document(id="p", body="functional programming"))
    assert _ids(docs.match("progrmaming", fuzziness=2)) == ["p"]
    import psycopg
    with psycopg.connect(postgres_url) as conn:
        assert dict(conn.execute("SELECT e.extname, n.nspname FROM pg_extension e JOIN "
                                 "pg_namespace n ON n.oid = e.extnamespace")).items() >= \
            {"pg_trgm": "public", "fuzzystrmatch": "public"}.items()
    pg_db._core.fuzzy_schema = None
    with pytest.raises(beaver.FeatureUnavailable, match="pg_trgm"):
        docs.match("progrmaming", fuzziness=2)
    assert _ids(docs.match("programing", fuzziness=1)) == ["p"]


def test_pg_collection_extensions_made_once_by_racing_openers(postgres_url):
    """In a new database (no extensions yet), several openers at once make pg_trgm and
    fuzzystrmatch once (CREATE EXTENSION IF NOT EXISTS alone can race), and all can use them."""
    import psycopg
    name = f"beaver_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = postgres_url.rsplit("/", 1)[0] + "/" + name
    found, errors = [], []

    def open_and_search(i):
        try:
            with BeaverDB(pg_schema_url(url, "public")) as db:
                docs = db.collection(f"c{i}")
                docs.index(Document(id="p", body="functional programming"))
                found.append(_ids(docs.match("progrmaming", fuzziness=2)))
        except Exception as e:      # reported below
            errors.append(e)
    try:
        threads = [threading.Thread(target=open_and_search, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(MP_DEADLINE)
        assert errors == [] and found == [["p"]] * 4
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_pg_collection_extensions_made_in_a_transaction_that_rolls_back(postgres_url):
    """Typo search first used inside a transaction that rolls back (taking the extensions it
    made with it) makes them again at its next use, instead of failing on them."""
    import psycopg
    name = f"beaver_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = postgres_url.rsplit("/", 1)[0] + "/" + name
    try:
        with BeaverDB(pg_schema_url(url, "public")) as db:
            docs = db.collection("c")
            docs.index(Document(id="p", body="functional programming"))
            with pytest.raises(ZeroDivisionError), db.transaction():
                assert _ids(docs.match("progrmaming", fuzziness=2)) == ["p"]
                1 / 0
            assert _ids(docs.match("progrmaming", fuzziness=2)) == ["p"]
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_pg_collection_typo_search_of_a_role_that_may_not_create_extensions(postgres_url):
    """In a database without the extensions, a role that may not create them gets text search
    and one-typo search, and a clear FeatureUnavailable for two typos."""
    import psycopg
    suffix = uuid.uuid4().hex[:12]
    name, role = f"beaver_test_{suffix}", f"beaver_test_role_{suffix}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
    with psycopg.connect(postgres_url.rsplit("/", 1)[0] + "/" + name, autocommit=True) as conn:
        conn.execute(f"REVOKE CREATE ON DATABASE {name} FROM PUBLIC")
        conn.execute(f"CREATE SCHEMA app AUTHORIZATION {role}")
    url = postgres_url.rsplit("/", 1)[0].replace("postgres@", f"{role}@", 1) + "/" + name
    try:
        with BeaverDB(pg_schema_url(url, "app")) as db:
            docs = db.collection("docs")
            docs.index(Document(id="p", body="functional programming"))
            assert _ids(docs.match("programming")) == ["p"]
            assert _ids(docs.match("programing", fuzziness=1)) == ["p"]
            with pytest.raises(beaver.FeatureUnavailable, match="CREATE EXTENSION"):
                docs.match("progrmaming", fuzziness=2)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
            conn.execute(f"DROP ROLE {role}")


def test_pg_collection_walk_in_one_query_matches_sqlite(pg_db, tmp_path):
    """PostgreSQL walks the graph with one recursive query: the same documents, in the same
    order (distance, then id), as SQLite's step-by-step walk, cycles and labels included."""
    import random
    rng = random.Random(5)
    names = [f"n{i:02d}" for i in range(30)]
    edges = {(rng.choice(names), rng.choice(names), rng.choice("AB")) for _ in range(80)}
    with BeaverDB(tmp_path / "lite.db") as lite:
        graphs = [lite.collection("g"), pg_db.collection("g")]
        for graph in graphs:
            graph.index_many(Document(id=name) for name in names)
            for source, target, label in edges:
                graph.connect(source, target, label)
        for start in names[:4]:
            for direction in ("outgoing", "incoming", "both"):
                for labels in (None, ["A"]):
                    for depth in (0, 1, 2, 4):
                        sqlite, postgres = ([d.id for d in graph.walk(start, labels, depth,
                                                                       direction)]
                                            for graph in graphs)
                        assert sqlite == postgres, (start, direction, labels, depth)
