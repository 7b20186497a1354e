"""beaver_server: a beaver database as a REST API (the ``[server]`` extra: fastapi + uvicorn).

    $ python -m beaver_server --database app.db --port 8000        # or: beaver serve ...
    $ curl -X PUT localhost:8000/dicts/app_config/theme -H "Content-Type: application/json" \\
           -d '"dark"'
    $ curl localhost:8000/dicts/app_config/theme
    "dark"

    >>> from beaver_server import create_app
    >>> app = create_app("app.db", token="s3cret")     # any ASGI server can run it

The routes are derived from ``beaver._API``, the one declaration of every operation that
``BeaverClient`` and the CLI use too (interactive documentation at ``/docs``)::

    /dicts/{name}/{key}      GET PUT(?ttl_seconds) DELETE(returns the value) HEAD
    /dict/{name}/{key}       the same (the spec's spelling)
    /lists/{name}/items/{i}  GET PUT DELETE;  /lists/{name}/slice;  POST .../push|prepend|
                             extend|insert|pop|deque|remove|reverse
    /queues/{name}/put|get|peek|ack|nack get?timeout=... waits (no thread), 408 when nothing
                                         came; get?lease=... hands out an item to ack
    /blobs/{name}/{key}      raw bytes; metadata as JSON in the Beaver-Metadata header
    /logs/{name}/log|range|live          live: server-sent events
    /channels/{name}/publish|history|prune  subscribe: /channels/{name}/sse (server-sent
                                         events) or /channels/{name}/ws (WebSocket)
    /collections/{name}/index|index_many|documents/{id}|match|search|find|count|explain|
                        connect|disconnect|edges|neighbors|walk|compact|indexes/{path}
    /locks/{name}/acquire|release|renew  the token (the lock's ticket) identifies the hold
    /events/{kind}/{name}?event=set      server-sent events: the changes of a structure
    /{kind}s/{name}          GET ?view=keys|items|dump, POST (load a dump), DELETE (clear)
    /info  /dump  /load  /backup          the whole database
    /transaction             POST a list of writes, applied in one transaction
    /call                    POST one request whose target is too long for a request line
    /ui                      the web dashboard (a browser asking for / is sent there)

Names and keys are single path segments (percent-encode ``/`` as ``%2F``); the route is
read from the raw path, so every string works. Values travel as JSON; a request body that
is not JSON is taken as a string. Errors are ``{"error": "KeyError", "message": "..."}``
with a 4xx status; ``beaver.BeaverClient`` raises the same exception classes.

Writes carrying an ``Idempotency-Key`` header are applied once: the key and the answer are
stored in the operation's own transaction, and a repeat gets the first answer. Long waits
(queue get, lock acquire, streams) await the database's wake-ups without holding a thread.
Run by ``main``, each process serves the plain requests of its connections on one reactor
thread (``--direct-connections``, see "The reactor" below) without an event-loop hop, and
commits the writes that arrive together in one transaction.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import selectors
import shutil
import socket
import sys
import tempfile
import threading
import time
import typing
from urllib.parse import parse_qsl, unquote, urlsplit

try:
    from fastapi import FastAPI
    from fastapi.openapi.docs import get_swagger_ui_html
except ImportError as _missing:      # the [server] extra is not installed
    FastAPI = None
    _MISSING_EXTRA = _missing
else:
    _MISSING_EXTRA = None

import beaver
from beaver import BeaverDB

__all__ = ["create_app", "main"]

DEFAULT_MAX_BODY = 64 * 1024 * 1024   # bytes in one request (blobs included)
DEFAULT_MAX_WAIT = 25.0               # seconds one blocking request may wait on the server
DEFAULT_MAX_STREAMS = 2000            # open streams and long waits at once (per process)
MAX_TARGET = 16 * 1024                # bytes of a request target (path and query)
MAX_TEXT_QUERY = 4096                 # characters of a full-text query
MAX_TOP_K = 10_000                    # results of one search
MIN_PERIOD = 0.05                     # seconds between two updates of a live view
HEADER_TIMEOUT = 10.0                 # seconds a client has to send a request's headers
SPOOL_BYTES = beaver._SPOOL_BYTES     # a spooled request body (/load) past this goes to disk
_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
_SIMPLE_TYPES = {"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}
_STATUS = [   # most specific first: the first class an exception is an instance of decides
    (beaver.LockLost, 409), (beaver.LockTimeout, 409), (beaver.DatabaseBusy, 503),
    (beaver.DiskFull, 507),
    (TimeoutError, 408), (KeyError, 404), (IndexError, 404), (PermissionError, 403),
    (ValueError, 422), (TypeError, 422), (OverflowError, 422), (beaver.ClosedError, 503),
    (beaver.FeatureUnavailable, 501),
]
logger = logging.getLogger("beaver.server")


# ------------------------------------------------------------------------------------------
# Requests, answers and errors
# ------------------------------------------------------------------------------------------

class HTTPError(Exception):
    """An answer other than the operation's: ``status``, error ``name`` and ``message``."""

    def __init__(self, status, name, message, headers=None):
        super().__init__(message)
        self.status, self.name, self.headers = status, name, headers or {}


def _error_reply(exc):
    if isinstance(exc, HTTPError):
        return beaver._reply({"error": exc.name, "message": str(exc)}, exc.status, exc.headers)
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
    if status == 500 and not isinstance(exc, beaver.BeaverError):
        logger.exception("beaver server: unexpected error", exc_info=exc)
        return beaver._reply({"error": "InternalError", "message": "internal error"}, 500)
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    body = {"error": type(exc).__name__, "message": str(message)}
    if hasattr(exc, "beaver_index"):
        body["index"] = exc.beaver_index
    return beaver._reply(body, status)


class _Request:
    """One HTTP request: its parts, its body (read within the limit), its disconnection."""

    def __init__(self, scope, receive, send, limit):
        self.scope, self.receive, self._send = scope, receive, send
        self.started = False        # the answer has begun: an error can no longer replace it
        self.method = scope["method"]
        self.raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        self.query_string = scope.get("query_string", b"")
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.limit = limit
        self._body = None
        self._gone = None
        self._query = None

    async def body(self) -> bytes:
        if self._body is None:
            self._body = b"".join([chunk async for chunk in self._chunks()])
        return self._body

    async def spool(self):
        """The body in a ``tempfile.SpooledTemporaryFile`` (memory up to ``SPOOL_BYTES``,
        then a file on disk), at its start; the caller closes it."""
        spool = tempfile.SpooledTemporaryFile(SPOOL_BYTES)
        try:
            async for chunk in self._chunks():
                spool.write(chunk)
        except BaseException:
            spool.close()
            raise
        self._body = b""            # read: a later look at the body finds it ended
        spool.seek(0)
        return spool

    async def _chunks(self):
        """The pieces of the body as they arrive, within the limit (413 beyond it)."""
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "Disconnected", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise HTTPError(413, "TooLarge", f"the request body exceeds {self.limit} "
                                                 "bytes", {"connection": "close"})
            yield chunk
            if not message.get("more_body"):
                break

    def gone(self) -> asyncio.Future:
        """A future done once the client has disconnected (read after the body)."""
        if self._gone is None:
            future = self._gone = asyncio.get_running_loop().create_future()

            async def watch():
                await self.body()
                while (await self.receive())["type"] != "http.disconnect":
                    pass
                future.done() or future.set_result(None)
            task = asyncio.ensure_future(watch())
            future.add_done_callback(lambda f: task.cancel())
        return self._gone

    def query(self) -> dict:
        if self._query is None:
            self._query = _query_of(self.query_string)
        return self._query

    async def send(self, message):
        self.started = True
        await self._send(message)

    async def reply(self, reply):
        status, body, headers = reply
        head = [(b"content-length", str(len(body)).encode())]
        if body and not (headers and "content-type" in headers):
            head.append((b"content-type", b"application/json"))
        for name, value in (headers or {}).items():
            head.append((name.encode("latin-1"), str(value).encode("latin-1")))
        await self.send({"type": "http.response.start", "status": status, "headers": head})
        await self.send({"type": "http.response.body",
                         "body": b"" if self.method == "HEAD" else body})


def _query_of(raw: bytes) -> dict:
    """The parameters of a query string (the last of a repeated name wins).

        >>> _query_of(b"view=ttl&block=false")
        {'view': 'ttl', 'block': 'false'}
    """
    if not raw:
        return {}
    try:
        return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict"))
    except UnicodeDecodeError:
        raise HTTPError(400, "ValueError", "the query string is not UTF-8") from None


def _segments(raw_path: bytes) -> list:
    """The decoded segments of a request path.

        >>> _segments(b"/dicts/a%20b/k"), _segments(b"/")
        (['dicts', 'a b', 'k'], [])
    """
    if b"%" in raw_path:
        segments = [_text(s) for s in raw_path.split(b"/")[1:]]
    else:
        try:
            segments = raw_path.decode("utf-8").split("/")[1:]
        except UnicodeDecodeError:
            raise HTTPError(400, "ValueError", "the path is not UTF-8") from None
    return [] if segments == [""] else segments


def _text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
        return unquote(text, errors="strict") if "%" in text else text
    except UnicodeDecodeError:
        raise HTTPError(400, "ValueError", "the path is not UTF-8") from None


def _loads(text):
    """``json.loads``; JSON nested beyond the recursion limit is a 400, not a crash.

    UTF-8 JSON with nothing around it (what clients send) goes straight to the scanner;
    anything else (whitespace, a BOM, UTF-16, an error to raise) through ``json.loads``.

        >>> _loads(b'{"a":[1,NaN]}'), _loads(b' 2 '), _loads('"x"')
        ({'a': [1, nan]}, 2, 'x')
    """
    try:
        raw = isinstance(text, bytes)
        if not (raw and b"\x00" in text[:4]):           # UTF-16 and -32 go to json.loads
            try:
                decoded = text.decode("utf-8") if raw else text
                value, end = beaver._json_scan(decoded, 0)  # stops at whitespace or a BOM
                if end == len(decoded):
                    return value
            except (StopIteration, UnicodeDecodeError):
                pass            # json.loads raises its own error below
        return json.loads(text)
    except RecursionError:
        raise HTTPError(400, "ValueError", "the JSON is nested too deeply") from None


def _json_param(text, name):
    try:
        return _loads(text)
    except ValueError:
        raise HTTPError(422, "ValueError", f"{name} must be a JSON value, not {text[:80]!r}"
                        ) from None


def _body_value(raw: bytes):
    """A JSON body; a body that is not JSON is taken as a string (curl -d text works)."""
    if not raw:
        raise HTTPError(422, "ValueError", "a request body (a JSON value) is required")
    try:
        return _loads(raw)
    except ValueError:
        pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(422, "ValueError", "the request body is neither JSON nor UTF-8 text"
                        ) from None


def _body_json(raw: bytes, shape, what):
    try:
        value = _loads(raw)
    except ValueError:
        raise HTTPError(422, "ValueError", f"the request body must be {what}") from None
    if not isinstance(value, shape):
        raise HTTPError(422, "ValueError", f"the request body must be {what}")
    return value


def _document(data):
    if not isinstance(data, dict) or not set(data) <= {"id", "embedding", "body"}:
        raise ValueError("a document is a JSON object with id, embedding and body")
    return beaver.Document(id=data.get("id"), embedding=data.get("embedding"),
                           body=data.get("body"))


def _leased(data):
    if not isinstance(data, dict) or not isinstance(data.get("lease_id"), int):
        raise ValueError("a leased item is a JSON object with its lease_id")
    item = beaver.LeasedItem(data.get("priority", 0), data.get("timestamp", 0.0),
                             data.get("data"))
    item.lease_id = data["lease_id"]
    return item


# wire type -> server decoder of the decoded JSON (or text) value
_LIMITED = frozenset(("top_k", "period", "query"))    # the arguments check_limits bounds
_DECODE = {"document": _document, "item": _leased,
           "documents": lambda v: [_document(d) for d in v] if isinstance(v, list) else v}


# ------------------------------------------------------------------------------------------
# Routes: the declared operations and the few written by hand
# ------------------------------------------------------------------------------------------

class _Route:
    """One route: verb, path parts (``{param}`` or literal), fixed query, handler."""

    def __init__(self, verb, parts, fixed, handler, op=None, greedy=False, summary=""):
        self.verb, self.parts, self.fixed, self.handler = verb, parts, fixed, handler
        self.op, self.greedy, self.summary = op, greedy, summary
        self.literals = [(i, part) for i, part in enumerate(parts) if part[0] != "{"]
        self.names = [(i, part[1:-1]) for i, part in enumerate(parts) if part[0] == "{"]
        self.wants = [(key, value, "summary" if key == "view" else None)
                      for key, value in fixed.items()]
        if op is not None:      # what each request of the operation needs, worked out once
            _, op_fixed, self.plan = beaver._plan(op)
            self.known = frozenset(op_fixed) | {"view"} | {
                p.name for p in self.plan if p.place in ("path", "query")}
            self.options = tuple(beaver._MANAGER_OPTIONS.get(op.kind, ()))
            self.decoded = tuple((p.name, _DECODE[p.type]) for p in self.plan
                                 if p.type in _DECODE)
            self.body_type = next((p.type for p in self.plan if p.name == op.body), None)
            self.limited = not _LIMITED.isdisjoint(p.name for p in self.plan)

    def match(self, segments, query):
        count = len(self.parts)
        if len(segments) != count and not (self.greedy and len(segments) > count):
            return None
        for i, part in self.literals:
            if part != segments[i]:
                return None
        for key, value, default in self.wants:
            if query.get(key, default) != value:
                return None
        params = {}
        for i, name in self.names:
            params[name] = segments[i]
        if self.greedy and count:           # the last parameter takes the rest of the path
            i, name = self.names[-1]
            params[name] = "/".join(segments[i:])
        return params


def _route_prefixes(kind):
    route = beaver._ROUTES[kind]
    return [route, "dict"] if kind == "dict" else [route]


def _declared_routes(server):
    routes = []
    for op in beaver._API:
        parts, fixed, _ = beaver._plan(op)
        for prefix in _route_prefixes(op.kind):
            full = ([prefix, "{name}"] if prefix else []) + parts
            if any(r.verb == op.verb and r.parts == full and r.fixed == fixed for r in routes):
                continue        # a client-side variant (get beside __getitem__...)
            fixed_view = dict(fixed)
            if op.verb in ("GET", "HEAD") and not parts and prefix and "view" not in fixed:
                fixed_view["view"] = "summary"
            doc = (beaver._local_function(op).__doc__ or "").strip().split("\n")[0]
            routes.append(_Route(op.verb, full, fixed_view, server.serve_op, op,
                                 greedy=bool(parts) and parts[-1] in ("{key}", "{doc_id}",
                                                                      "{document}"),
                                 summary=doc or f"{op.kind} {op.method}"))
    return routes


def _hand_routes(server):
    hand = [
        ("GET", "", server.root, "Server and database identity"),
        ("GET", "dump", server.dump, "The database (or ?names=a,b) as JSON lines"),
        ("POST", "load", server.load, "Load a JSON-lines dump in one transaction"),
        ("GET", "backup", server.backup, "A consistent copy of the database file"),
        ("POST", "transaction", server.transaction, "Apply a list of writes atomically"),
        ("POST", "call", server.call, "One request whose target is too long for a URL"),
        ("PUT", "collections/{name}", server.configure, "Create a collection: metric, options"),
        ("GET", "logs/{name}/live", server.live, "Server-sent events: a live view of a log"),
        ("GET", "channels/{name}/sse", server.sse, "Server-sent events: channel messages"),
        ("GET", "events/{kind}/{name}", server.events, "Server-sent events: changes"),
        ("GET", "locks", server.list_locks, "The locks that are held or waited for"),
        ("GET", "locks/{name}", server.lock_status, "Whether the lock is held (by ?token)"),
        ("POST", "locks/{name}/acquire", server.acquire, "Wait for the lock; get a token"),
        ("POST", "locks/{name}/release", server.release, "Release the hold ?token"),
        ("POST", "locks/{name}/renew", server.renew, "Extend the hold ?token by ?ttl s"),
    ]
    for kind in ("dict", "list", "queue", "blob", "log", "channel", "collection"):
        for prefix in _route_prefixes(kind):
            hand.append(("GET", prefix, server.list_structures, f"List the {kind} structures"))
    dashboard = _Dashboard(server)
    hand += [
        ("GET", "ui", dashboard.asset, "The web dashboard (no data: it asks for the token)"),
        ("GET", "ui/{file}", dashboard.asset, "The dashboard's script and style"),
        ("GET", "ui/api/page/{kind}/{name}", dashboard.page,
         "Dashboard: a page of a dict (TTLs), queue (leases), blob store or collection"),
        ("GET", "ui/api/chart/{name}", dashboard.chart, "Dashboard: a log's entry counts"),
    ]
    return [_Route(verb, [p for p in path.split("/") if p], {}, handler, summary=summary)
            for verb, path, handler, summary in hand]


# ------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------

class _Server:
    """Routing, security checks, limits and the handlers, on one ``BeaverDB``."""

    def __init__(self, db, token, limits, cors_origins, allowed_hosts):
        self.db, self.token = db, token
        self.limits = limits
        self.cors_origins = set(cors_origins)
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.executor = concurrent.futures.ThreadPoolExecutor(limits["threads"],
                                                              "beaver-server")
        self.routes: dict = {}      # (verb, first segment, segment count or "*") -> routes
        for route in _declared_routes(self) + _hand_routes(self):
            count = "*" if route.greedy else len(route.parts)
            self.routes.setdefault((route.verb, route.parts[0] if route.parts else "", count),
                                   []).append(route)
        for routes in self.routes.values():      # ?view=ttl before the plain /{key}
            routes.sort(key=lambda r: -len(r.fixed))
        self.open_waits = 0
        self.managers: dict = {}

    # -- plumbing -----------------------------------------------------------------------------

    def run(self, function, *args):
        """Run ``function`` (anything touching SQLite) in the thread pool."""
        return asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    @contextlib.contextmanager
    def waiting(self):
        """Count an open stream or long wait; 503 beyond the limit."""
        if self.open_waits >= self.limits["streams"]:
            raise HTTPError(503, "TooManyStreams", f"more than {self.limits['streams']} "
                                                   "streams and waits are open")
        self.open_waits += 1
        try:
            yield
        finally:
            self.open_waits -= 1

    def manager(self, kind, name, options=None):
        """The manager of ``kind`` called ``name`` (on the reactor's thread or a worker
        thread, never the event loop's: opening may write)."""
        db = self.db
        if kind == "db":
            return db
        if not options:
            manager = db._managers.opened(kind, name)
            if manager is None or db._core.closed:
                return getattr(db, "blobs" if kind == "blob" else kind)(name)
            return manager
        key = (kind, name, tuple(sorted(options.items())))
        manager = self.managers.get(key)
        if manager is None:
            if len(self.managers) > 1000:
                self.managers.clear()
            cls = beaver._local_classes()[kind]
            manager = self.managers[key] = cls(db, name, **options)
        return manager

    def route(self, method, raw_path, query):
        segments = _segments(raw_path)
        first = segments[0] if segments else ""
        verbs = ("HEAD", "GET") if method == "HEAD" else (method,)
        for verb in verbs:
            for count in (len(segments), "*"):
                for route in self.routes.get((verb, first, count), ()):
                    params = route.match(segments, query)
                    if params is not None:
                        return route, params
        if any(route.match(segments, query) is not None
               for (verb, head, _), routes in self.routes.items()
               if head == first and verb not in verbs for route in routes):
            raise HTTPError(405, "MethodNotAllowed", f"{method} is not allowed here")
        raise HTTPError(404, "NotFound", "no such route")

    # -- declared operations ------------------------------------------------------------------

    async def arguments(self, request, route, params, query):
        """``(op, name, options, kwargs)`` of a request to a declared operation."""
        raw = await request.body() if route.op.body else b""
        return self.arguments_of(request.headers, route, params, query, raw)

    def arguments_of(self, headers, route, params, query, raw):
        """``arguments`` with the body ``raw`` read already."""
        op, plan = route.op, route.plan
        options, kwargs = {}, {}
        for option in route.options:
            if option in query:
                options[option] = _json_param(query[option], option)
        for param in plan:
            if param.place == "path":
                text = params.get(param.name)
            elif param.place == "query":
                text = query.get(param.name)
            else:
                if param.place == "header" and "beaver-metadata" in headers:
                    kwargs[param.name] = _json_param(headers["beaver-metadata"],
                                                     "Beaver-Metadata")
                continue
            if text is not None:
                kwargs[param.name] = text if param.type in beaver._TEXT_TYPES else \
                    _json_param(text, param.name)
        if query:
            self.check_query(route, query, options)
        if op.body:
            self.body_arguments(raw, route, kwargs)
        for name, decode in route.decoded:
            if name in kwargs:
                kwargs[name] = decode(kwargs[name])
        if route.limited:
            self.check_limits(kwargs)
        return op, params.get("name"), options, kwargs

    @staticmethod
    def check_query(route, query, options):
        """Refuse query parameters the operation does not take."""
        unknown = set(query) - route.known - options.keys()
        if unknown:
            raise HTTPError(422, "ValueError", f"unknown query parameters: {sorted(unknown)}")

    def body_arguments(self, raw, route, kwargs):
        op = route.op
        if op.body == "{}":
            fields = _body_json(raw, dict, "a JSON object")
            names = {p.name for p in route.plan if p.place == "field"}
            if set(fields) - names:
                raise HTTPError(422, "ValueError", f"unknown fields: {sorted(set(fields) - names)}"
                                f"; expected some of {sorted(names)}")
            kwargs.update(fields)
            return
        kind = route.body_type
        if kind == "bytes":
            kwargs[op.body] = raw
        elif kind in ("value", "json"):
            kwargs[op.body] = _body_value(raw)
        elif kind in ("values", "documents"):
            kwargs[op.body] = _body_json(raw, list, "a JSON array")
        else:
            kwargs[op.body] = _body_json(raw, dict, "a JSON object")

    def check_limits(self, kwargs):
        top_k, period = kwargs.get("top_k"), kwargs.get("period")
        if isinstance(top_k, int) and top_k > self.limits["top_k"]:
            raise ValueError(f"top_k is at most {self.limits['top_k']} on this server")
        if isinstance(period, (int, float)) and period < self.limits["period"]:
            raise ValueError(f"period is at least {self.limits['period']} s on this server")
        query = kwargs.get("query")
        if isinstance(query, str) and len(query) > self.limits["text"]:
            raise ValueError(f"a text query is at most {self.limits['text']} characters on "
                             "this server")

    def execute(self, op, name, options, kwargs, key=None, wait=True):
        """Run one declared operation (on the reactor's thread or a worker thread); its
        answer. With an idempotency ``key`` the operation runs once for that key
        (``beaver._once``); with ``wait`` False a write refuses to wait for another writer
        (``beaver._WritersBusy``), so a write without a key then runs in a transaction of its
        own (``BEGIN IMMEDIATE``) instead of as one statement."""
        manager = self.manager(op.kind, name, options)     # before any transaction opens
        stored = beaver._STORED_TEXT.get((op.kind, op.method))
        if stored and key is None and getattr(manager, "_codec", None) is beaver._JSON:
            return 200, getattr(manager, stored)(**kwargs).encode("utf-8"), None

        def call():
            result = beaver._local_function(op)(manager, **kwargs)
            reply = beaver._SERVE[op.result.rstrip("?")](result, manager)
            return reply if isinstance(reply, tuple) else beaver._reply(reply)
        if key is None and wait:
            return call()
        if key is None:         # a write that must not wait for another writer
            with self.db._core.transaction(wait=False):
                return call()
        return beaver._once(self.db, key, call, beaver._NO_CONTENT if not op.result else None,
                            wait)

    async def serve_op(self, request, route, params):
        op, name, options, kwargs = await self.arguments(request, route, params,
                                                         request.query())
        key = request.headers.get("idempotency-key") if op.writes else None
        if op.wait and kwargs.get("block", True) is not False:
            reply = await self.wait_for_item(request, op, name, options, kwargs, key)
        else:
            reply = await self.run(self.execute, op, name, options, kwargs, key)
        await request.reply(reply)

    async def wait_for_item(self, request, op, name, options, kwargs, key):
        """A blocking queue get: attempts in the pool, waits on wake-ups, no thread held."""
        timeout = beaver._seconds(kwargs.get(op.wait), op.wait)
        wait = self.limits["wait"] if timeout is None else min(timeout, self.limits["wait"])
        queue = await self.run(self.manager, op.kind, name, options)
        attempt_args = {**kwargs, "block": False}
        looked, woken, due = [], False, None

        def attempt():
            """A take (keyed: ``_once`` answers a retry with the stored reply, reading the
            record under the write lock); once woken, a look before it. ``due``: the wait
            for the next lease to run out (from the look, else a read)."""
            nonlocal woken, due
            if woken and not queue._takeable(looked):
                due = queue._lease_due(looked)
                return None
            woken = True
            with contextlib.suppress(beaver.QueueEmpty):
                return self.execute(op, name, options, attempt_args, key)
            due = queue._lease_due(looked)
            return None
        gone = request.gone()
        with self.waiting():
            reply = await self.db._core.watcher.wait_for_async(
                attempt, wait, cap=lambda: due, run=self.run, stop=gone)
        if reply is None:
            raise beaver.Timeout(f"no item arrived in queue {name!r} within {wait}s")
        if gone.done() and key is None:     # nobody will read it: give it back
            await self.run(_give_back, queue, reply)
        return reply

    # -- hand-written routes --------------------------------------------------------------------

    async def root(self, request, route, params):
        if _wants_html(request.headers):
            return await request.reply(_TO_DASHBOARD)
        database = await self.run(beaver._database_id, self.db)
        await request.reply(beaver._reply({"beaver": beaver.__version__, "docs": "/docs",
                                           "pid": os.getpid(), "waits": self.open_waits,
                                           "database": database}))

    async def list_structures(self, request, route, params):
        kind = "dict" if params == {} and route.parts[0] == "dict" else \
            next(k for k, r in beaver._ROUTES.items() if r == route.parts[0])
        info = await self.run(self.db.info)
        await request.reply(beaver._reply([s for s in info["structures"] if s["kind"] == kind]))

    async def configure(self, request, route, params):
        spec = _body_json(await request.body(), dict, "a JSON object {metric, options}")
        options = spec.get("options") or {}
        if not isinstance(options, dict) or set(spec) - {"metric", "options"}:
            raise ValueError("the body is {\"metric\": ..., \"options\": {...}}")
        await self.run(lambda: self.db.collection(params["name"], metric=spec.get("metric"),
                                                  **options))
        await request.reply(beaver._NO_CONTENT)

    async def transaction(self, request, route, params):
        items = _body_json(await request.body(), list, "a JSON array of requests")
        calls = [await self.subcall(request, item) for item in items]

        def apply():
            with self.db.transaction():
                for index, (op, name, options, kwargs) in enumerate(calls):
                    try:
                        self.execute(op, name, options, kwargs)
                    except Exception as e:
                        e.beaver_index = index
                        raise
            return beaver._reply({"count": len(calls)})
        await self.run(lambda: [self.manager(op.kind, name, options)    # opening may write
                                for op, name, options, _ in calls])
        await request.reply(await self.run(self.keyed, request, apply))

    async def subcall(self, request, item):
        inner = self.inner(request, item)
        route, params = self.route(inner.method, inner.raw_path, inner.query())
        if route.op is None or not route.op.writes:
            raise HTTPError(422, "ValueError", f"{inner.method} {item.get('target')!r} is not "
                                               "a write that a transaction can hold")
        return await self.arguments(inner, route, params, inner.query())

    def inner(self, request, item):
        """The request carried in the body of ``request`` (a transaction item, /call)."""
        if not isinstance(item, dict) or not isinstance(item.get("target"), str) or \
                item.get("method") not in ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"):
            raise HTTPError(422, "ValueError", "a request is {method, target, body64?, headers?}")
        path, _, query = item["target"].partition("?")
        inner = _Request({**request.scope, "method": item["method"], "path": path,
                          "raw_path": path.encode("latin-1", "strict"),
                          "query_string": query.encode("latin-1"), "headers": [
                              (k.lower().encode("latin-1"), str(v).encode("latin-1"))
                              for k, v in {**request.headers, **(item.get("headers") or {})
                                           }.items()]},
                         request.receive, request.send, request.limit)
        try:
            inner._body = base64.b64decode(item.get("body64") or "", validate=True)
        except ValueError:
            raise HTTPError(422, "ValueError", "body64 is not base64") from None
        return inner

    async def call(self, request, route, params):
        inner = self.inner(request, _body_json(await request.body(), dict, "a request"))
        inner._gone = request._gone
        inner_route, inner_params = self.route(inner.method, inner.raw_path, inner.query())
        await inner_route.handler(inner, inner_route, inner_params)

    def keyed(self, request, call):
        key = request.headers.get("idempotency-key")
        return call() if key is None else beaver._once(self.db, key, call)

    async def load(self, request, route, params):
        mode = request.query().get("mode", "append")
        with await request.spool() as spool:
            def load():
                return beaver._reply({"structures": self.db.load(spool, mode)})
            reply = await self.run(self.keyed, request, load)
        await request.reply(reply)

    async def dump(self, request, route, params):
        names = request.query().get("names")

        def write(path):
            with open(path, "w", encoding="utf-8") as f:
                return self.db.dump(f, names=names.split(",") if names else None)
        await self.send_file(request, write, "dump.jsonl", "application/x-ndjson")

    async def backup(self, request, route, params):
        await self.send_file(request, self.db.backup, "backup.db", "application/vnd.sqlite3")

    async def send_file(self, request, write, filename, media_type):
        """Stream a file that ``write(path)`` makes in a temporary folder, removed afterwards."""
        folder = tempfile.mkdtemp(prefix="beaver-server-")
        try:
            path = os.path.join(folder, filename)
            result = await self.run(write, path)
            headers = [(b"content-type", media_type.encode()),
                       (b"content-length", str(os.path.getsize(path)).encode()),
                       (b"content-disposition", f'attachment; filename="{filename}"'.encode())]
            if isinstance(result, int):
                headers.append((b"beaver-structures", str(result).encode()))
            await request.send({"type": "http.response.start", "status": 200,
                                "headers": headers})
            with open(path, "rb") as f:
                while True:
                    chunk = await self.run(f.read, 1 << 20)
                    await request.send({"type": "http.response.body", "body": chunk,
                                        "more_body": bool(chunk)})
                    if not chunk:
                        break
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- streams ----------------------------------------------------------------------------

    async def stream(self, request, astream, encode, greeting, stop):
        """Serve ``astream`` as server-sent events until the client leaves; then ``stop()``."""
        with self.waiting():
            try:
                await request.send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no")]})
                await request.send({"type": "http.response.body", "more_body": True,
                                    "body": f": {greeting}\n\n".encode()})
                gone = request.gone()
                while not gone.done():
                    pending = asyncio.ensure_future(astream.get(timeout=15.0))
                    await asyncio.wait({pending, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not pending.done():
                        pending.cancel()
                        break
                    try:
                        chunk = f"data: {encode(pending.result())}\n\n"
                    except beaver.Timeout:
                        chunk = ": keep-alive\n\n"
                    except beaver.ClosedError:
                        break
                    await request.send({"type": "http.response.body", "more_body": True,
                                        "body": chunk.encode("utf-8")})
                with contextlib.suppress(OSError, RuntimeError):
                    await request.send({"type": "http.response.body", "body": b""})
            finally:
                await self.run(stop)

    async def sse(self, request, route, params):
        channel = await self.run(self.db.channel, params["name"])
        subscriber = await self.run(beaver.Subscriber, channel)
        await self.stream(request, beaver.AsyncStream(subscriber), _event_text, "subscribed",
                          subscriber.close)

    async def live(self, request, route, params):
        query = request.query()
        window = _json_param(query.get("window", "60"), "window")
        period = _json_param(query.get("period", "1"), "period")
        self.check_limits({"period": period})
        where = _json_param(query.get("where", "null"), "where")
        log = await self.run(self.db.log, params["name"])
        view = log.live(window, period, list, where)
        await self.stream(request, beaver.AsyncStream(view), _event_text, "live", view.close)

    async def events(self, request, route, params):
        kind = params["kind"]
        if kind not in beaver._ROUTES or kind == "db":
            raise HTTPError(404, "NotFound", f"no structure kind {kind!r}")
        event = request.query().get("event", "*")
        manager = await self.run(self.manager, kind, params["name"])
        stream = beaver.Stream()
        astream = beaver.AsyncStream(stream)
        handle = await self.run(manager.on, event, stream._deliver)
        await self.stream(request, astream, _event_text, "listening", handle.off)

    async def websocket(self, scope, receive, send):
        """``/channels/{name}/ws``: every message published from now on, one JSON text frame
        each; frames the client sends are published."""
        from starlette.websockets import WebSocket, WebSocketDisconnect
        segments = [_text(s) for s in (scope.get("raw_path") or b"").split(b"/")[1:]]
        socket = WebSocket(scope, receive, send)
        if len(segments) != 3 or segments[0] != "channels" or segments[2] != "ws":
            await socket.close(code=1008, reason="no such route")
            return
        with self.waiting():
            channel = await self.run(self.db.channel, segments[1])
            subscriber = await self.run(beaver.Subscriber, channel)
            astream = beaver.AsyncStream(subscriber)
            await socket.accept(subprotocol=_chosen_subprotocol(scope))
            receiver = asyncio.ensure_future(self.publish_frames(socket, channel))
            try:
                while not receiver.done():
                    with contextlib.suppress(beaver.Timeout):
                        await socket.send_text(_event_text(await astream.get(timeout=1.0)))
            except (beaver.ClosedError, WebSocketDisconnect, RuntimeError, OSError):
                pass
            finally:
                receiver.cancel()
                await self.run(subscriber.close)

    async def publish_frames(self, socket, channel):
        from starlette.websockets import WebSocketDisconnect
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                text = await socket.receive_text()
                try:
                    value = json.loads(text)
                except ValueError:
                    value = text
                await self.run(channel.publish, value)

    # -- locks ------------------------------------------------------------------------------

    async def list_locks(self, request, route, params):
        info = await self.run(self.db.info)
        await request.reply(beaver._reply([s for s in info["structures"]
                                           if s["kind"] == "lock"]))

    async def lock_status(self, request, route, params):
        name, query = params["name"], request.query()
        token = _json_param(query["token"], "token") if "token" in query else None

        def status():
            held = False
            if token is not None:
                with contextlib.suppress(beaver.LockLost):
                    lock = beaver._adopt_lock(self.db, name, token)
                    held = lock.held
                    lock._guard.release()
            return beaver._reply({"name": name, "locked": self.db.lock(name).locked,
                                  "held": held})
        await request.reply(await self.run(status))

    async def acquire(self, request, route, params):
        name, query = params["name"], request.query()
        timeout = beaver._seconds(_json_param(query.get("timeout", "null"), "timeout"),
                                  "timeout")
        block = _json_param(query.get("block", "true"), "block")
        ttl = _json_param(query.get("ttl", "60"), "ttl")
        wait = self.limits["wait"] if timeout is None else min(timeout, self.limits["wait"])
        key = request.headers.get("idempotency-key")
        if key is not None:
            stored = await self.run(beaver._remembered, self.db, key)
            if stored is not None:
                return await request.reply(stored)
        lock = await self.run(self.db.lock, name, None, ttl)
        got = await self.run(lock._enqueue)
        gone = request.gone()

        def claim():        # a repeat of this request may have the lock already
            stored = None if key is None else beaver._remembered(self.db, key)
            return stored if stored is not None else lock._claim()
        if not got and block is not False:
            with self.waiting():
                got = await self.db._core.watcher.wait_for_async(
                    claim, wait, cap=lock._next_check, run=self.run, stop=gone)
        if isinstance(got, tuple):
            await self.run(lock._leave, lock._ticket)
            return await request.reply(got)
        if not got or (gone.done() and key is None):
            await self.run(lock._leave, lock._ticket)
            raise beaver.LockTimeout(f"could not acquire lock {name!r} within {wait}s")
        mine = beaver._reply({"name": name, "token": lock.token, "ttl": ttl})
        reply = mine if key is None else await self.run(beaver._once, self.db, key,
                                                         lambda: mine)
        if reply[1] != mine[1]:         # a repeat of this request got the lock first
            await self.run(lock._leave, lock._ticket)
        await request.reply(reply)

    async def release(self, request, route, params):
        await self.with_hold(request, params, lambda lock, query: lock.release())

    async def renew(self, request, route, params):
        await self.with_hold(request, params, lambda lock, query: lock.renew(
            _json_param(query["ttl"], "ttl") if "ttl" in query else None))

    async def with_hold(self, request, params, action):
        query = request.query()
        token = _json_param(query.get("token", "null"), "token")

        def act():
            lock = beaver._adopt_lock(self.db, params["name"], token)
            try:
                action(lock, query)
            finally:
                if lock._guard.locked():
                    lock._guard.release()
            return beaver._NO_CONTENT
        await request.reply(await self.run(self.keyed, request, act))

    # -- the gate: every request passes here first --------------------------------------------

    def check(self, scope, headers):
        """Refuse what a browser on another site, a rebinding DNS name or a stranger sends."""
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if target > self.limits["target"]:
            raise HTTPError(414, "TooLong", f"the request target exceeds {self.limits['target']}"
                                            " bytes (send long names with POST /call)")
        host = headers.get("host", "")
        server = (scope.get("server") or ("",))[0]
        if _is_loopback(server) and not self._loopback_host(host):
            raise HTTPError(403, "Forbidden", f"host {host!r} is not a loopback name")
        origin = headers.get("origin")
        state_changing = scope.get("method", "GET") not in ("GET", "HEAD", "OPTIONS")
        if origin is not None and not self._same_origin(origin, host):
            raise HTTPError(403, "Forbidden", f"cross-site request from {origin!r} refused")
        if state_changing or scope["type"] == "websocket":
            site = headers.get("sec-fetch-site", "same-origin")
            if site not in ("same-origin", "none") and (origin or "") not in self.cors_origins:
                raise HTTPError(403, "Forbidden", "cross-site request refused")
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media in _SIMPLE_TYPES and "x-beaver" not in headers:
                raise HTTPError(403, "Forbidden", f"a {media} request needs the X-Beaver header "
                                                  "(or a JSON content type)")
        if self.token and not self._authorized(scope, headers) and not _public(scope, headers):
            raise HTTPError(401, "Unauthorized", "a valid bearer token is required",
                            {"www-authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits["body"]:
            raise HTTPError(413, "TooLarge", f"the request body exceeds {self.limits['body']} "
                                             "bytes", {"connection": "close"})

    def _loopback_host(self, host) -> bool:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        return _is_loopback(name) or name in self.allowed_hosts

    def _same_origin(self, origin, host) -> bool:
        if origin in self.cors_origins or "*" in self.cors_origins:
            return True
        parts = urlsplit(origin)
        return bool(parts.netloc) and parts.netloc.lower() == host.lower()

    def _authorized(self, scope, headers) -> bool:
        given = headers.get("authorization", "")
        given = given[7:] if given[:7].lower() == "bearer " else ""
        if not given and scope["type"] == "websocket":
            given = _bearer_subprotocol(scope) or dict(parse_qsl(
                (scope.get("query_string") or b"").decode("latin-1"))).get("token", "")
        return secrets.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send, fallback):
        if scope["type"] == "websocket":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                self.check(scope, headers)
            except HTTPError as e:
                await send({"type": "websocket.close", "code": 1008, "reason": str(e)[:120]})
                return
            return await self.websocket(scope, receive, send)
        request = _Request(scope, receive, send, self.limits["body"])
        try:
            self.check(scope, request.headers)
            try:
                route, params = self.route(request.method, request.raw_path, request.query())
            except HTTPError as e:
                if e.status != 404:
                    raise
                return await fallback(scope, _limited(receive, self.limits["body"]),
                                      request.send)
            await route.handler(request, route, params)
        except Exception as e:   # an answer for every failure, unless one has started
            await self.failed(request, e)
        finally:
            if request._gone is not None and not request._gone.done():
                request._gone.cancel()          # stops its watch of the connection

    async def failed(self, request, e):
        if request.started:
            if not isinstance(e, (OSError, RuntimeError, HTTPError)):
                logger.error("beaver server: failure while answering", exc_info=e)
            return
        with contextlib.suppress(OSError, RuntimeError):
            await request.reply(_error_reply(e))


def _event_text(value) -> str:
    return beaver._json_dumps(beaver._to_jsonable(value))


def _give_back(queue, reply):
    """Requeue an item taken for a client that left before its answer (no key to retry)."""
    item = json.loads(reply[1])
    if "lease_id" in item:
        queue.nack(_leased(item))
    else:
        queue.put(item["data"], priority=item["priority"])


def _limited(receive, limit):
    """``receive`` that refuses a body beyond ``limit`` bytes (for the routes of FastAPI)."""
    seen = 0

    async def receive_limited():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise HTTPError(413, "TooLarge", f"the request body exceeds {limit} bytes")
        return message
    return receive_limited


def _bearer_subprotocol(scope):
    for value in scope.get("subprotocols") or ():
        if value.startswith("bearer."):
            return value[7:]
    return None


def _chosen_subprotocol(scope):
    return "beaver" if "beaver" in (scope.get("subprotocols") or ()) else None


@functools.lru_cache(maxsize=256)
def _is_loopback(host) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------
# The dashboard: its static files at /ui, and the read routes its pages need
# ------------------------------------------------------------------------------------------
#
# The files live in the beaver_dashboard folder next to this module (shipped as package data)
# and hold no data, so a browser may load them without the token; the page then asks for the
# token and sends it as a bearer header on every request, the streams included (read with
# fetch(), never put in a URL). Everything else is read through the routes above, or through
# the two below where the declared operations cannot page (TTLs, leases, blob sizes, document
# pages without vectors, a log's counts over time).

_DASHBOARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "beaver_dashboard")
_DASHBOARD_FILES = {"": "index.html", "index.html": "index.html",
                    "dashboard.js": "dashboard.js", "dashboard.css": "dashboard.css"}
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
_DASHBOARD_HEADERS = {   # no inline script, no framing, no third party: data stays text
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-frame-options": "DENY", "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer", "cache-control": "no-cache"}
_PUBLIC_PATHS = frozenset(b"/ui" + (b"/" + name.encode() if name else b"")
                          for name in _DASHBOARD_FILES) | {b"/ui/"}
_TO_DASHBOARD = (303, b'<a href="/ui">beaver dashboard</a>\n',
                 {"location": "/ui", "content-type": "text/html; charset=utf-8"})
MAX_PAGE = 1000                       # items of one dashboard page
MAX_BUCKETS = 1000                    # bars of one chart


def _wants_html(headers) -> bool:
    """A browser navigating (it asks for HTML), not an API client."""
    return "text/html" in headers.get("accept", "")


def _public(scope, headers) -> bool:
    """The dashboard's static files, and ``/`` for a browser (sent to them): no data."""
    if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
        return False
    path = scope.get("raw_path") or scope["path"].encode("utf-8")
    return path in _PUBLIC_PATHS or (path == b"/" and _wants_html(headers))


@functools.lru_cache(maxsize=None)
def _dashboard_file(name):
    with open(os.path.join(_DASHBOARD_DIR, name), "rb") as f:
        return f.read()


def _int_param(query, name, default, low, high) -> int:
    value = _json_param(query[name], name) if name in query else default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HTTPError(422, "ValueError", f"{name} is an integer from {low} to {high}")
    return value


def _dict_page(manager, offset, limit, where):
    pairs = manager.find(where, limit=limit, offset=offset)
    return [{"key": key, "value": beaver._to_jsonable(value), "ttl": _ttl_left(manager, key)}
            for key, value in pairs]


def _ttl_left(manager, key):
    try:
        return manager.ttl(key)
    except KeyError:            # expired since find() saw it
        return 0.0


def _queue_page(manager, offset, limit, where):
    page = manager._browse(offset, limit)
    return page.pop("items"), page


_PAGES = {   # kind -> (manager, offset, limit, where) -> items, or (items, other fields)
    "dict": _dict_page,
    "queue": _queue_page,
    "blob": lambda m, offset, limit, where: m._browse(offset, limit),
    "collection": lambda m, offset, limit, where: m._browse(offset, limit),
}


class _Dashboard:
    """The handlers of /ui: the static files and the two read routes of its pages."""

    def __init__(self, server):
        self.server = server

    async def asset(self, request, route, params):
        name = _DASHBOARD_FILES.get(params.get("file", ""))
        if name is None:
            raise HTTPError(404, "NotFound", "no such dashboard file")
        body = await self.server.run(_dashboard_file, name)
        headers = {**_DASHBOARD_HEADERS, "content-type": _MEDIA[os.path.splitext(name)[1]]}
        await request.reply((200, body, headers))

    async def page(self, request, route, params):
        """``{"items": [...], "more": bool}`` from ``?offset`` (and for a dict ``?where``)."""
        kind, query = params["kind"], request.query()
        browse = _PAGES.get(kind)
        if browse is None:
            raise HTTPError(404, "NotFound", f"no dashboard page for {kind!r}")
        unknown = set(query) - {"offset", "limit", "where"}
        if unknown or ("where" in query and kind != "dict"):
            raise HTTPError(422, "ValueError", f"unknown query parameters: "
                                               f"{sorted(unknown or {'where'})}")
        offset = _int_param(query, "offset", 0, 0, 2 ** 62)
        limit = _int_param(query, "limit", 50, 1, MAX_PAGE)
        where = _json_param(query["where"], "where") if "where" in query else None

        def read():
            manager = self.server.manager(kind, params["name"])
            found = browse(manager, offset, limit + 1, where)
            items, extra = found if isinstance(found, tuple) else (found, {})
            return beaver._reply({**extra, "items": items[:limit], "more": len(items) > limit})
        await request.reply(await self.server.run(read))

    async def chart(self, request, route, params):
        """``{"start", "end", "counts"}``: entries (matching ``?where``) per time bucket."""
        query = request.query()
        if set(query) - {"buckets", "where"}:
            raise HTTPError(422, "ValueError", "the parameters are buckets and where")
        buckets = _int_param(query, "buckets", 60, 1, MAX_BUCKETS)
        where = _json_param(query["where"], "where") if "where" in query else None

        def read():
            return beaver._reply(self.server.manager("log", params["name"])._counts(buckets,
                                                                                  where))
        await request.reply(await self.server.run(read))


# ------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------

def _openapi(server, app):
    """The OpenAPI schema, derived from the routes (and so from ``beaver._API``)."""
    paths: dict = {}
    for routes in server.routes.values():
        for route in routes:
            path = "/" + "/".join(route.parts)
            entry = paths.setdefault(path, {}).setdefault(route.verb.lower(), {
                "summary": route.summary, "parameters": [], "responses": {
                    "200": {"description": "OK"}, "4XX": {"description": "an error: "
                                                          "{error, message}"}}})
            names = {p["name"] for p in entry["parameters"]}
            wanted = [(p[1:-1], "path") for p in route.parts if p.startswith("{")]
            wanted += [(k, "query") for k in route.fixed]
            if route.op is not None:
                wanted += [(p.name, "query") for p in beaver._plan(route.op)[2]
                           if p.place == "query"]
                if route.op.body:
                    entry["requestBody"] = {"content": {"application/json": {"schema": {}}}}
            for name, place in wanted:
                if name not in names:
                    names.add(name)
                    entry["parameters"].append({"name": name, "in": place,
                                                "required": place == "path",
                                                "schema": {"type": "string"}})
    security = [{"bearer": []}] if server.token else []
    return {"openapi": "3.1.0", "info": {"title": "beaver", "version": beaver.__version__,
                                         "description": "A beaver database over HTTP."},
            "paths": paths, "security": security,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def create_app(database="beaver.db", token=None, *, max_body_bytes=DEFAULT_MAX_BODY,
               max_wait=DEFAULT_MAX_WAIT, max_streams=DEFAULT_MAX_STREAMS, cors_origins=(),
               allowed_hosts=(), threads=32):
    """A FastAPI app serving ``database`` (a path or an open ``BeaverDB``).

    ``token``: require ``Authorization: Bearer <token>`` on every route (``/docs`` too).
    ``max_body_bytes``: the largest request body, on every route, else 413.
    ``max_wait``: the longest a blocking call (queue get, lock acquire) waits per request.
    ``max_streams``: open streams and long waits at once, else 503.
    ``cors_origins``: web origins allowed to call the API from a browser (CORS).
    ``allowed_hosts``: ``Host`` names accepted besides loopback ones on a loopback address.
    """
    if FastAPI is None:
        raise ImportError("beaver_server needs the [server] extra: pip install "
                          f"'beaver-db[server]' ({_MISSING_EXTRA})")
    owned = not isinstance(database, BeaverDB)
    db = BeaverDB(database) if owned else database
    limits = {"body": int(max_body_bytes), "wait": float(max_wait), "streams": int(max_streams),
              "target": MAX_TARGET, "text": MAX_TEXT_QUERY, "top_k": MAX_TOP_K,
              "period": MIN_PERIOD, "threads": int(threads)}
    server = _Server(db, token, limits, cors_origins, allowed_hosts)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if owned:
            await server.run(db.close)      # close() joins threads: not on the event loop
        server.executor.shutdown(wait=False)

    app = _App(title="beaver", version=beaver.__version__, lifespan=lifespan,
               docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.db = db
    app.beaver = server
    app.openapi = lambda: _openapi(server, app)

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="beaver")
    app.add_exception_handler(404, _not_found)
    app.beaver_entry = _Front(server, app)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.beaver_entry = CORSMiddleware(
            app.beaver_entry, allow_origins=list(cors_origins), allow_methods=["*"],
            allow_headers=["authorization", "content-type", "x-beaver", "idempotency-key",
                           "beaver-metadata"], expose_headers=["beaver-metadata",
                                                               "beaver-structures"])
    if token:
        logging.getLogger("uvicorn.access").addFilter(_RedactTokens())
    return app


def _not_found(request, exc):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": "NotFound", "message": "no such route"}, 404)


class _Front:
    """The ASGI entry: beaver's routes first, then FastAPI's (``/docs``, user routes)."""

    def __init__(self, server, app):
        self.server = server
        self.fastapi = functools.partial(FastAPI.__call__, app)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.fastapi(scope, receive, send)
        await self.server(scope, receive, send, self.fastapi)


if FastAPI is not None:
    class _App(FastAPI):
        """FastAPI with beaver's raw ASGI routes in front of its own."""

        async def __call__(self, scope, receive, send):
            await self.beaver_entry(scope, receive, send)


class _RedactTokens(logging.Filter):
    """Keep ``?token=`` (WebSocket clients may send it) out of the access log."""

    def filter(self, record):
        if record.args:
            record.args = tuple(re.sub(r"(token=)[^&\s]*", r"\1[redacted]", a)
                                if isinstance(a, str) else a for a in record.args)
        return True


# ------------------------------------------------------------------------------------------
# The reactor: one thread per process serves the plain connections
# ------------------------------------------------------------------------------------------
#
# Run by ``main``, a server process accepts its connections on one reactor thread, which waits
# on all of them in one selector (epoll, kqueue) with non-blocking sockets, an input and an
# output buffer per connection, and runs the hot declared operations right there: no event
# loop hop, no thread hop, no GIL hand-off between threads per request. Only plain HTTP/1.1
# requests with a small Content-Length body that route to a declared operation and do not wait
# are served so; at the first request that is anything else (a wait, a stream, a WebSocket, a
# hand-written route, a large or chunked body, a header it does not read), the connection with
# the bytes read so far goes to the event loop for good, where uvicorn serves it and waits
# hold no thread. The declared operations whose cost grows with the data (scans, searches,
# bulk writes: everything not in ``_INLINE``; on PostgreSQL, every one, each being a round
# trip to the server) run in the server's thread pool, their answers coming back to the
# reactor, so they never stall the other connections. The inline writes one round finds ready
# (from several connections) commit together: one transaction, a savepoint each, the answers
# sent after COMMIT (group commit). Answers go out in request order per connection, pipelined
# requests too. Every connection has one deadline at a time (its request's head and body, the
# keep-alive time between requests, the sending of its answers): a slow or silent client, or
# one that never reads, holds nothing. A round's writes take the writers' gates without
# waiting (``transaction(wait=False)`` of the core): while a pool thread or another beaver
# process is in a write transaction, they wait for it in the pool, not here; SQLite's lock
# taken by a writer that passes no gate (another program, a single-statement write) is waited
# for here, in SQLite's busy handler, at most the database timeout.

DIRECT_BODY = 64 * 1024         # larger request bodies are read by the event loop
SEND_TIMEOUT = 30.0             # seconds to send an answer (plus one per MB of it)
DEFAULT_DIRECT_CONNECTIONS = 1024      # per process: see "The reactor"
_INBOX_LIMIT = MAX_TARGET + 64 * 1024 + DIRECT_BODY    # bytes read ahead of the served request
_FOREVER = float("inf")
_TURN_SHARE = 64                # pipelined requests of one connection served per turn
_PLAIN_METHODS = frozenset((b"GET", b"HEAD", b"PUT", b"POST", b"PATCH", b"DELETE"))
_HEAD_TARGET = re.compile(rb"/[\x21\x22\x24-\x7e]*\Z")       # visible ASCII, no '#'
_HEAD_FIELD = re.compile(   # a "name: value" line (of a head decoded as latin-1)
    r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([\t\x20-\x7e\x80-\xff]*)\Z")
_FIELDS_SEEN: dict = {}     # field line -> (lower-case name, value): clients repeat their lines
_FIELDS_SEEN_MAX = 1024     # lines remembered (of at most _FIELD_SEEN_LENGTH characters)
_FIELD_SEEN_LENGTH = 256
_FIELDS_NOT_KEPT = frozenset(("idempotency-key", "authorization", "cookie"))  # new or secret
# chunked bodies, 100-continue, WebSockets; and browsers' requests (CORS answers them there)
_LEFT_TO_THE_LOOP = frozenset(("transfer-encoding", "expect", "upgrade", "origin"))
_SINGLE = frozenset(("content-length", "host", "authorization", "idempotency-key",
                     "content-type", "connection"))
_REASONS = {200: "OK", 204: "No Content", 303: "See Other", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
            413: "Content Too Large", 414: "URI Too Long", 422: "Unprocessable Content",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            507: "Insufficient Storage"}
access_logger = logging.getLogger("uvicorn.access")


def _at_an_end(kwargs) -> bool:
    """A list pop at the end (the middle shifts the items after it)."""
    return kwargs.get("index") in (None, -1)


# (kind, method) -> True when a call runs on the reactor (or a predicate of its arguments
# saying so): a few statements on one key or an end, whatever the size of the structure (the
# request body is at most DIRECT_BODY). On SQLite only: see _Reactor.inline
_INLINE = {
    **{("dict", m): True for m in ("__getitem__", "get", "set", "pop", "__delitem__",
                                   "__contains__", "ttl", "setdefault")},
    **{("list", m): True for m in ("__getitem__", "__setitem__", "push", "prepend", "deque")},
    ("list", "pop"): _at_an_end,
    **{("queue", m): True for m in ("put", "get", "ack", "nack", "peek")},
    **{("blob", m): True for m in ("__getitem__", "get", "put", "__setitem__", "delete",
                                   "__contains__")},
    ("log", "log"): True, ("channel", "publish"): True,
    **{("collection", m): True for m in ("__getitem__", "get", "__contains__")},
}


class _Plain(typing.NamedTuple):
    """A request head the reactor serves: method, path, query, headers (lower-case names)."""
    method: str
    path: bytes
    query: bytes
    headers: dict
    length: int
    close: bool


def _plain_head(head: bytes):
    """The ``_Plain`` of a request head, or None for anything else (left to uvicorn)."""
    end = head.find(b"\r\n")
    line = head if end < 0 else head[:end]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in _PLAIN_METHODS or \
            not _HEAD_TARGET.match(parts[1]):
        return None
    headers = _head_fields(head[end + 2:].decode("latin-1")) if end >= 0 else {}
    if headers is None or not headers.keys().isdisjoint(_LEFT_TO_THE_LOOP):
        return None
    length, close = None, False
    if "content-length" in headers:
        length = headers["content-length"]
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            return None
    if "connection" in headers:
        token = headers["connection"].lower()
        if token not in ("keep-alive", "close"):
            return None
        close = token == "close"
    path, _, query = parts[1].partition(b"?")
    return _Plain(parts[0].decode("ascii"), path, query, headers, int(length or 0), close)


def _head_fields(text):
    """``{lower-case name: value}`` of the field lines of a head (``text``, decoded as
    latin-1, after its request line); None if a line is not a field, or a field that may
    come once comes twice (two Content-Lengths, two Hosts...: left to uvicorn).

    A client sends the same lines request after request (its Host, its Content-Type...):
    the lines seen are remembered with their parse, so most lines cost one lookup.
    """
    headers = {}
    for line in text.split("\r\n"):
        field = _FIELDS_SEEN.get(line)
        if field is None:
            match = _HEAD_FIELD.match(line)
            if match is None:
                return None
            field = match[1].lower(), match[2].strip(" \t")
            if len(line) <= _FIELD_SEEN_LENGTH and field[0] not in _FIELDS_NOT_KEPT:
                if len(_FIELDS_SEEN) >= _FIELDS_SEEN_MAX:
                    _FIELDS_SEEN.clear()
                _FIELDS_SEEN[line] = field
        name = field[0]
        if name in headers and name in _SINGLE:
            return None
        headers[name] = field[1]
    return headers


def _answer_bytes(plain, reply) -> bytes:
    """The HTTP/1.1 answer ``reply`` (status, body, headers) to the request ``plain``."""
    status, body, headers = reply
    if headers:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                 f"content-length: {len(body)}\r\n"]
        if body and "content-type" not in headers:
            lines.append("content-type: application/json\r\n")
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n")
        head = "".join(lines).encode("latin-1") + b"\r\n"
    else:                       # most answers: the status line and two fields at most
        head = b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%s" % (
            status, _REASONS.get(status, "Unknown").encode("latin-1"), len(body),
            b"content-type: application/json\r\n\r\n" if body else b"\r\n")
    return head if plain.method == "HEAD" else head + body


class _Handoff(Exception):
    """This request (and the rest of its connection) goes to the event loop."""


class _Call(typing.NamedTuple):
    """A declared operation a request asks for, its arguments read and checked."""
    op: typing.Any
    name: str
    options: dict
    kwargs: dict
    key: typing.Optional[str]       # the Idempotency-Key of a write


class _Connection:
    """A connection of the reactor: its socket, buffers, state and deadline."""

    __slots__ = ("sock", "local", "peer", "inbox", "outbox", "sent", "deadline", "events",
                 "open", "busy", "closing", "leaving", "eof", "idle", "body_wait")

    def __init__(self, sock, deadline):
        self.sock = sock
        self.local, self.peer = sock.getsockname()[:2], sock.getpeername()[:2]
        self.inbox = b""            # bytes received, not served yet
        self.outbox = bytearray()   # answers waiting for room in the socket's send buffer
        self.sent = 0               # bytes of outbox sent
        self.deadline = deadline
        self.events = 0             # what the selector watches for it
        self.open = True
        self.busy = False           # a request runs (pool or batch): the next ones wait
        self.closing = False        # closed once its answers are sent (Connection: close)
        self.leaving = False        # handed to the event loop once its answers are sent
        self.eof = False            # the client will send nothing more
        self.idle = False           # between requests: the deadline is the keep-alive time
        self.body_wait = False      # the head is in, the body is not


class _Reactor:
    """One thread serving the plain connections of ``listeners`` (see above); ``handoff(sock,
    pending)`` gives a connection to the event loop."""

    def __init__(self, server, listeners, handoff, *, limit, header_timeout, keep_alive,
                 send_timeout=SEND_TIMEOUT):
        self.server, self.handoff, self.limit = server, handoff, limit
        self.header_timeout, self.keep_alive = header_timeout, keep_alive
        self.send_timeout = send_timeout
        # on SQLite an inline call costs microseconds; elsewhere (PostgreSQL) each is a round
        # trip to the server: in the pool they run in parallel, here they would run in turn
        self.inline = _INLINE if server.db._core.engine == "sqlite" else {}
        self.period = max(0.01, min(1.0, header_timeout / 4, keep_alive / 4))
        self.selector = selectors.DefaultSelector()
        self.connections: dict = {}         # socket -> _Connection
        self.ready: dict = {}               # connections with requests to look at (ordered)
        self.finished = queue.SimpleQueue()  # (connection, plain, reply) from the pool
        self.paused: dict = {}              # listener -> when accepting resumes
        self.waker, self.wake_up = socket.socketpair()
        self.waker.setblocking(False)
        self.wake_up.setblocking(False)
        self.closing = False
        self.next_sweep = time.monotonic() + self.period
        for listener in listeners:
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, listener)
        self.selector.register(self.waker, selectors.EVENT_READ, self.waker)
        self.thread = threading.Thread(target=self.run, name="beaver-reactor", daemon=True)
        self.thread.start()

    # -- the loop ------------------------------------------------------------------------------

    def run(self):
        try:
            while not self.closing:
                try:
                    self.turn()
                except Exception:       # a bug must not stop the serving of every connection
                    logger.exception("beaver server: the reactor failed a turn")
        finally:
            self.shut()

    def turn(self):
        """Wait for sockets (or a deadline), read and write them, serve what arrived."""
        timeout = 0.0 if self.ready else max(0.0, self.next_sweep - time.monotonic())
        for key, mask in self.selector.select(timeout):
            target = key.data
            if type(target) is _Connection:
                if mask & selectors.EVENT_WRITE:
                    self.flush(target)
                if mask & selectors.EVENT_READ and target.open:
                    self.receive(target)
            elif target is self.waker:
                with contextlib.suppress(OSError):
                    self.waker.recv(4096)
            else:
                self.accept(target)
        if not self.finished.empty():
            self.collect()
        if self.ready:
            self.serve_ready()
        now = time.monotonic()
        if now >= self.next_sweep:
            self.sweep(now)

    def accept(self, listener):
        now = time.monotonic()
        for _ in range(64):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:        # out of file descriptors...: pause, as asyncio does
                logger.warning("beaver server: accept failed: %s", e)
                self.selector.unregister(listener)
                self.paused[listener] = now + 1.0
                self.next_sweep = min(self.next_sweep, now + 1.0)
                return
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if len(self.connections) >= self.limit:
                    self.handoff(sock, b"")
                    continue
                conn = _Connection(sock, now + self.header_timeout)
            except OSError:             # gone already
                sock.close()
                continue
            sock.setblocking(False)
            self.connections[sock] = conn
            self.watch(conn, selectors.EVENT_READ)

    def watch(self, conn, events):
        """Have the selector watch ``conn`` for ``events`` (0: not at all)."""
        if events == conn.events:
            return
        if not conn.events:
            self.selector.register(conn.sock, events, conn)
        elif not events:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def interest(self, conn):
        """Watch ``conn`` for what it needs: input while it may read ahead, output while
        its answers wait for room in the socket's buffer."""
        reading = not (conn.eof or conn.closing or conn.leaving) and \
            len(conn.inbox) < _INBOX_LIMIT
        events = (selectors.EVENT_READ if reading else 0) | \
            (selectors.EVENT_WRITE if conn.outbox else 0)
        if events != conn.events:
            self.watch(conn, events)

    def receive(self, conn):
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.drop(conn)
        if not chunk:
            conn.eof = True
            self.interest(conn)
        else:
            if conn.idle:           # a request begins: its head within the header timeout
                conn.idle = False
                conn.deadline = time.monotonic() + self.header_timeout
            conn.inbox = conn.inbox + chunk if conn.inbox else chunk
            if len(conn.inbox) >= _INBOX_LIMIT:
                self.interest(conn)
        self.ready[conn] = None

    def collect(self):
        """Take the answers the thread pool finished (or a batch it ran)."""
        while not self.finished.empty():       # this thread is the only taker
            self.finish(*self.finished.get())

    def finish(self, conn, plain, reply):
        """``conn``'s running request has its answer: send it; then its next requests (read
        ahead meanwhile) may go, or the connection settles."""
        if not conn.open:
            return
        conn.busy = False
        conn.deadline = time.monotonic() + self.header_timeout
        self.respond(conn, plain, reply)
        if conn.inbox or conn.eof:
            self.ready[conn] = None
        else:                           # nothing to serve: no turn of its own needed
            self.settle(conn)

    def sweep(self, now):
        """Close the connections past their deadline; resume paused accepting."""
        soonest = now + self.period
        for conn in list(self.connections.values()):
            if conn.deadline <= now:
                self.drop(conn)
            elif conn.deadline < soonest:
                soonest = conn.deadline
        for listener, when in list(self.paused.items()):
            if when <= now:
                del self.paused[listener]
                self.selector.register(listener, selectors.EVENT_READ, listener)
        self.next_sweep = soonest

    # -- requests ------------------------------------------------------------------------------

    def serve_ready(self):
        """Serve the requests that arrived; the inline writes of this round commit together."""
        ready, self.ready = self.ready, {}
        batch = []
        for conn in ready:
            if conn.open:
                try:
                    self.advance(conn, batch)
                except Exception:       # a bug: this connection goes, the others stay
                    logger.exception("beaver server: a connection failed")
                    self.drop(conn)
        if batch:
            self.commit(batch)

    def advance(self, conn, batch):
        """Serve ``conn``'s requests in order until one runs elsewhere (the pool, the batch)
        or is not all there yet (or it had its share of this turn); then settle what the
        connection waits for."""
        for _ in range(_TURN_SHARE):
            if not conn.inbox or not conn.open or conn.busy or conn.closing or conn.leaving or \
                    conn.outbox:
                break
            request = self.next_request(conn)
            if request is None:
                break
            plain, body, size = request
            conn.deadline = time.monotonic() + self.header_timeout  # the next one's, from now
            try:
                call = self.prepare(conn, plain, body)
            except _Handoff:
                conn.leaving = True
                break
            except Exception as e:
                conn.inbox = conn.inbox[size:]
                self.respond(conn, plain, _error_reply(e))
                continue
            conn.inbox = conn.inbox[size:]
            self.dispatch(conn, plain, call, batch)
        else:
            self.ready[conn] = None     # the rest after the other connections' turn
            return self.settle(conn)
        if conn.open:
            if conn.eof and not (conn.busy or conn.leaving or conn.outbox):
                conn.closing = True     # all it sent is served: nothing more will come
            self.settle(conn)

    def next_request(self, conn):
        """``(plain, body, size)`` of the next request in ``conn``'s input, None while it is
        not all there; ``conn.leaving`` set when it is not one for the reactor."""
        inbox = conn.inbox
        end = inbox.find(b"\r\n\r\n")
        if end < 0:
            if len(inbox) > MAX_TARGET + 64 * 1024:
                conn.leaving = True     # uvicorn refuses it, in its words
            return None
        plain = _plain_head(inbox[:end])
        if plain is None or plain.length > DIRECT_BODY:
            conn.leaving = True
            return None
        size = end + 4 + plain.length
        if len(inbox) < size:
            if not conn.body_wait:      # the body within a header timeout of the head
                conn.body_wait = True
                conn.deadline = time.monotonic() + self.header_timeout
            return None
        conn.body_wait = False
        return plain, inbox[end + 4:size], size

    def prepare(self, conn, plain, body) -> _Call:
        """The checked ``_Call`` of a request; ``_Handoff`` for one the event loop serves."""
        server, headers = self.server, plain.headers
        scope = {"type": "http", "method": plain.method, "raw_path": plain.path,
                 "query_string": plain.query, "server": conn.local, "client": conn.peer}
        server.check(scope, headers)
        query = _query_of(plain.query)
        try:
            route, params = server.route(plain.method, plain.path, query)
        except HTTPError as e:
            if e.status == 404:
                raise _Handoff from None    # FastAPI's routes: /docs, /openapi.json
            raise
        if route.op is None:
            raise _Handoff
        op, name, options, kwargs = server.arguments_of(headers, route, params, query, body)
        if op.wait and kwargs.get("block", True) is not False:
            raise _Handoff
        return _Call(op, name, options, kwargs,
                     headers.get("idempotency-key") if op.writes else None)

    def dispatch(self, conn, plain, call, batch):
        """Run ``call`` now (a read), join the batch (a write) or send it to the pool."""
        rule = self.inline.get((call.op.kind, call.op.method))
        if rule is not True and (rule is None or not rule(call.kwargs)):
            return self.offload(conn, plain, call)
        if not call.op.writes:
            try:
                reply = self.server.execute(*call)
            except Exception as e:
                reply = _error_reply(e)
            return self.respond(conn, plain, reply)
        try:    # opening a manager may write: never inside the batch's transaction
            self.server.manager(call.op.kind, call.name, call.options)
        except Exception as e:
            return self.respond(conn, plain, _error_reply(e))
        conn.busy = True
        batch.append((conn, plain, call))

    def attempt(self, call, wait=True):
        """The answer to ``call``, an error answer if it fails (a write with ``wait`` False:
        ``beaver._WritersBusy`` while another writer holds the write transaction)."""
        try:
            return self.server.execute(*call, wait=wait)
        except Exception as e:
            if not wait and isinstance(e, beaver._WritersBusy):
                raise
            return _error_reply(e)

    def offload(self, conn, plain, call):
        """Run ``call`` in the server's thread pool; its answer comes back to this thread."""
        def finished(future):
            self.finished.put((conn, plain, future.result()))
            self.wake()
        conn.busy = True
        try:
            self.server.executor.submit(self.attempt, call).add_done_callback(finished)
        except RuntimeError:            # the pool is shut down: the server is stopping
            self.finish(conn, plain, _error_reply(beaver.ClosedError("the server is stopping")))

    def wake(self):
        with contextlib.suppress(OSError):      # a full buffer: a wake-up is pending anyway
            self.wake_up.send(b"\0")

    # -- group commit ------------------------------------------------------------------------

    def commit(self, batch):
        """Run the inline writes of one round, then send their answers. While another
        writer holds the write transaction (a thread of the pool in a bulk write, a
        clear...; another process), they run in the pool: the reactor does not wait for it,
        and serves the reads meanwhile."""
        calls = [call for _, _, call in batch]
        try:
            replies = self.writes(calls, wait=False)
        except beaver._WritersBusy:
            try:
                return self.server.executor.submit(self.writes, calls).add_done_callback(
                    functools.partial(self.committed_in_pool, batch))
            except RuntimeError:        # the pool is shut down: the server is stopping
                replies = self.writes(calls)
        for (conn, plain, _), reply in zip(batch, replies):
            self.finish(conn, plain, reply)

    def committed_in_pool(self, batch, future):
        """Hand the answers to ``batch``, written in the pool, back to the reactor (each an
        error answer if the pool failed them: every request is answered)."""
        try:
            replies = future.result()
        except Exception as e:
            replies = [_error_reply(e)] * len(batch)
        for (conn, plain, _), reply in zip(batch, replies):
            self.finished.put((conn, plain, reply))
        self.wake()

    def writes(self, calls, wait=True) -> list:
        """The answers to the inline writes ``calls``: one alone, several group-committed;
        with ``wait`` False, ``beaver._WritersBusy`` at once while another writer holds the
        write transaction."""
        if len(calls) > 1:
            return self.group_commit(calls, wait)
        return [self.attempt(calls[0], wait)]

    def group_commit(self, calls, wait=True) -> list:
        """The answers to ``calls``, run in one transaction, each in a savepoint of its own
        (a keyed one in ``_once``'s): a failing call rolls back alone and gets its own error;
        if the COMMIT fails, or a call's error made the engine roll back the whole
        transaction (SQLITE_FULL...), every call gets that error."""
        core, replies = self.server.db._core, []
        try:
            with core.transaction(wait):
                for call in calls:
                    replies.append(self.in_savepoint(core, call))
                    if not core.connection_in_transaction():    # the engine rolled it back
                        raise beaver.BeaverError("the transaction was rolled back by SQLite")
        except Exception as e:
            if not wait and isinstance(e, beaver._WritersBusy):
                raise
            return [_error_reply(e)] * len(calls)
        return replies

    def in_savepoint(self, core, call):
        """The answer to ``call`` in a savepoint of the batch's transaction; its error raised
        if the engine rolled back the whole transaction (every call of the batch gets it)."""
        try:
            if call.key is not None:        # _once opens the savepoint and stores the answer
                return self.server.execute(*call)
            with core.transaction():
                return self.server.execute(*call)
        except Exception as e:
            if not core.connection_in_transaction():
                raise
            return _error_reply(e)

    # -- answers -------------------------------------------------------------------------------

    def respond(self, conn, plain, reply):
        """Send the answer to ``plain`` on ``conn`` (what the socket takes; the rest waits in
        its output buffer, after the answers already waiting there)."""
        data = _answer_bytes(plain, reply)
        if plain.close or (reply[2] and reply[2].get("connection") == "close"):
            conn.closing = True
        if access_logger.isEnabledFor(logging.INFO):
            target = plain.path + (b"?" + plain.query if plain.query else b"")
            access_logger.info('%s - "%s %s HTTP/%s" %d', "%s:%d" % conn.peer, plain.method,
                               target.decode("latin-1"), "1.1", reply[0])
        if conn.outbox:
            conn.outbox += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return self.drop(conn)
        if sent < len(data):            # the socket's buffer is full: wait for room
            conn.outbox += memoryview(data)[sent:]
            conn.deadline = time.monotonic() + self.send_timeout + len(conn.outbox) / 1e6
            self.interest(conn)

    def flush(self, conn):
        """Send what the socket takes of ``conn``'s waiting answers (it has room now)."""
        try:
            with memoryview(conn.outbox) as view:
                conn.sent += conn.sock.send(view[conn.sent:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.drop(conn)
        if conn.sent < len(conn.outbox):
            return
        conn.outbox, conn.sent = bytearray(), 0
        conn.deadline = time.monotonic() + self.header_timeout
        self.ready[conn] = None         # its next requests (read ahead meanwhile), or settle

    def settle(self, conn):
        """After a request: the keep-alive deadline when nothing is pending; close or hand
        over a connection that asked for it; watch it for what it needs."""
        if conn.outbox or not conn.open:
            return                      # settled once its answers are out (flush)
        if conn.closing:
            return self.drop(conn)
        if conn.leaving and not conn.busy:
            return self.leave(conn)
        if conn.busy:
            conn.deadline = _FOREVER    # the running request ends by itself
        elif not conn.inbox and not conn.idle:
            conn.idle = True
            conn.deadline = time.monotonic() + self.keep_alive
        self.interest(conn)

    def leave(self, conn):
        """Hand ``conn`` to the event loop with the bytes of its requests not served."""
        self.forget(conn)
        self.handoff(conn.sock, conn.inbox)

    def drop(self, conn):
        """Close ``conn``."""
        if conn.open:
            self.forget(conn)
            with contextlib.suppress(OSError):
                conn.sock.close()

    def forget(self, conn):
        conn.open = False
        self.watch(conn, 0)
        self.connections.pop(conn.sock, None)
        self.ready.pop(conn, None)

    # -- stopping ------------------------------------------------------------------------------

    def close(self):
        """Stop: open connections are shut down, the thread ends (a running batch first)."""
        self.closing = True
        self.wake()
        self.thread.join(5.0)

    def shut(self):
        for conn in list(self.connections.values()):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            self.drop(conn)
        self.selector.close()
        self.waker.close()
        self.wake_up.close()


# ------------------------------------------------------------------------------------------
# Running it: python -m beaver_server / beaver serve
# ------------------------------------------------------------------------------------------

def _env_bool(name, default=False) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (else an error)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={os.environ[name]!r} is not a boolean (use 1/true/yes/on or "
                     "0/false/no/off)")


def _env_number(name, default, kind=int):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


def _parser(prog=None) -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog=prog or "python -m beaver_server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a beaver database over HTTP (OpenAPI docs at /docs). Every option "
                    "also reads the environment variable named in its help.")
    add = parser.add_argument
    add("--database", "-d", default=env("BEAVER_DATABASE", env("DATABASE", "beaver.db")),
        help="database file ($BEAVER_DATABASE or $DATABASE)")
    add("--host", default=env("BEAVER_HOST", "127.0.0.1"), help="address to listen on "
        "($BEAVER_HOST); a non-loopback one needs --token or --insecure")
    add("--port", "-p", type=int, default=_env_number("BEAVER_PORT", 8000),
        help="port ($BEAVER_PORT)")
    add("--token", default=env("BEAVER_TOKEN") or None,
        help="require this bearer token on every route ($BEAVER_TOKEN)")
    add("--insecure", action="store_true", default=_env_bool("BEAVER_INSECURE"),
        help="allow a non-loopback --host without a token ($BEAVER_INSECURE)")
    add("--workers", "-w", type=int, default=_env_number("BEAVER_WORKERS", 1),
        help="server processes sharing the port ($BEAVER_WORKERS)")
    add("--cors-origin", action="append", default=None, metavar="ORIGIN",
        help="a web origin (https://app.example) allowed to call from a browser; repeatable "
             "($BEAVER_CORS_ORIGINS, comma-separated)")
    add("--allow-host", action="append", default=None, metavar="NAME",
        help="a Host name accepted besides loopback names on a loopback address (behind a "
             "proxy); repeatable ($BEAVER_ALLOW_HOSTS, comma-separated)")
    add("--max-body-size", type=int, default=_env_number("BEAVER_MAX_BODY", DEFAULT_MAX_BODY),
        help="largest request body in bytes, on every route ($BEAVER_MAX_BODY)")
    add("--max-wait", type=float, default=_env_number("BEAVER_MAX_WAIT", DEFAULT_MAX_WAIT,
                                                      float),
        help="longest wait of one blocking request, in seconds ($BEAVER_MAX_WAIT)")
    add("--max-streams", type=int, default=_env_number("BEAVER_MAX_STREAMS",
                                                       DEFAULT_MAX_STREAMS),
        help="open streams and long waits per process ($BEAVER_MAX_STREAMS)")
    add("--direct-connections", "--connection-threads", dest="direct_connections", type=int,
        default=_env_number("BEAVER_DIRECT_CONNECTIONS", _env_number(
            "BEAVER_CONNECTION_THREADS", DEFAULT_DIRECT_CONNECTIONS)),
        help="connections per process served by its reactor thread (plain requests, no "
             "event-loop hop); beyond them, new ones go to the event loop; 0 serves "
             "everything on the event loop ($BEAVER_DIRECT_CONNECTIONS; the former name "
             "--connection-threads N now caps the reactor's connections at N)")
    add("--header-timeout", type=float, default=HEADER_TIMEOUT,
        help="seconds a connection may take to send a request's headers (and on the "
             "reactor, its body too)")
    add("--log-level", default=env("BEAVER_LOG_LEVEL", "info"),
        choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    return parser


def _env_list(name) -> list:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def _settings(argv, prog):
    args = _parser(prog).parse_args(argv)
    if args.direct_connections < 0:
        raise ValueError("--direct-connections is 0 or more")
    return {"database": args.database, "token": args.token, "host": args.host,
            "port": args.port, "workers": args.workers, "insecure": args.insecure,
            "cors_origins": args.cors_origin or _env_list("BEAVER_CORS_ORIGINS"),
            "allowed_hosts": args.allow_host or _env_list("BEAVER_ALLOW_HOSTS"),
            "max_body_bytes": args.max_body_size, "max_wait": args.max_wait,
            "max_streams": args.max_streams, "header_timeout": args.header_timeout,
            "direct_connections": args.direct_connections,
            "log_level": args.log_level}


_APP_KEYS = ("token", "max_body_bytes", "max_wait", "max_streams", "cors_origins",
             "allowed_hosts")


def _app_from_environment():
    """The app of a server process, configured by ``main`` through the environment."""
    global _header_timeout
    settings = json.loads(os.environ["BEAVER_SERVER_SETTINGS"])
    _header_timeout = settings["header_timeout"]
    return create_app(settings["database"], **{k: settings[k] for k in _APP_KEYS})


def main(argv=None, prog=None) -> int:
    """``python -m beaver_server [--database PATH] [--host H] [--port P] [--token T] ...``."""
    try:
        settings = _settings(argv, prog)
    except ValueError as e:
        print(f"beaver_server: {e}", file=sys.stderr)
        return 2
    if not _is_loopback(settings["host"]) and not settings["token"] and not settings["insecure"]:
        print(f"beaver_server: refusing to listen on {settings['host']} without a token; set "
              "--token / BEAVER_TOKEN, or pass --insecure", file=sys.stderr)
        return 2
    if FastAPI is None:
        print("beaver_server: the server needs the [server] extra: pip install "
              f"'beaver-db[server]' ({_MISSING_EXTRA})", file=sys.stderr)
        return 1
    try:
        return _serve(settings)
    except (beaver.BeaverError, OSError, ImportError, ValueError) as e:
        print(f"beaver_server: {e}", file=sys.stderr)
        return 1


def _serve(settings) -> int:
    with BeaverDB(settings["database"]):       # a bad path fails here, in one line
        pass
    os.environ["BEAVER_SERVER_SETTINGS"] = json.dumps(settings)
    sock = _bind(settings, listen=settings["workers"] == 1)
    logging.getLogger("uvicorn.access").addFilter(_RedactTokens())
    if settings["workers"] > 1:
        return _supervise(settings, sock)
    server = _uvicorn_server(settings)
    _log_start(settings, sock)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _bind(settings, listen=True):
    """The listening socket (a clean error if the address is taken). Workers bind their own
    with SO_REUSEPORT, so the kernel spreads connections between them."""
    family = socket.AF_INET6 if ":" in settings["host"] else socket.AF_INET
    # IPPROTO_TCP named: asyncio then sets TCP_NODELAY on every accepted connection
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings["workers"] > 1:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise OSError("--workers needs SO_REUSEPORT, which this system lacks")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((settings["host"], settings["port"]))
        if listen:
            sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {settings['host']}:{settings['port']}: "
                      f"{e.strerror or e}") from None
    return sock


def _uvicorn_server(settings):
    import uvicorn
    config = uvicorn.Config(
        "beaver_server:_app_from_environment", factory=True, host=settings["host"],
        port=settings["port"], log_level=settings["log_level"], http=_Protocol, loop="auto",
        h11_max_incomplete_event_size=MAX_TARGET + 64 * 1024,
        timeout_graceful_shutdown=5)        # streams never end by themselves
    config.load()
    limit = settings.get("direct_connections", 0)

    class Server(uvicorn.Server):
        """uvicorn's server; with a reactor, the reactor accepts the connections."""

        direct = None

        async def startup(self, sockets=None):
            await super().startup(sockets=[] if limit and sockets else sockets)
            if limit and sockets and self.started:
                self.direct = _Direct(self, sockets, limit)

        async def shutdown(self, sockets=None):
            if self.direct is not None:
                await self.direct.stop()
            await super().shutdown(sockets)
    return Server(config)


class _Direct:
    """This process's reactor and its way to the event loop: uvicorn adopts a connection
    the reactor does not serve (or has no room for), with the bytes read from it so far."""

    def __init__(self, server, sockets, limit):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.tasks: set = set()
        app = server.config.loaded_app
        while not hasattr(app, "beaver"):      # inside uvicorn's middleware
            app = app.app
        self.reactor = _Reactor(app.beaver, sockets, self.handoff, limit=limit,
                                header_timeout=_header_timeout,
                                keep_alive=server.config.timeout_keep_alive)

    def adopt(self, conn, pending):
        """uvicorn serves ``conn`` from now on, ``pending`` (bytes read already) first."""
        config, server = self.server.config, self.server

        def protocol():
            made = config.http_protocol_class(config=config, server_state=server.server_state,
                                              app_state=server.lifespan.state, _loop=self.loop)
            made._pending = pending
            return made

        async def connect():
            try:
                await self.loop.connect_accepted_socket(protocol, conn)
            except Exception:           # the client left already, or the loop is stopping
                conn.close()
        task = self.loop.create_task(connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def handoff(self, conn, pending):
        """From the reactor: the event loop takes ``conn`` over."""
        try:
            self.loop.call_soon_threadsafe(self.adopt, conn, pending)
        except RuntimeError:            # the loop is closed: the server is gone
            conn.close()

    async def stop(self):
        await asyncio.to_thread(self.reactor.close)


def _log_start(settings, sock):
    host = f"[{settings['host']}]" if ":" in settings["host"] else settings["host"]
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to "
                                            "quit)", host, sock.getsockname()[1])


def _worker(settings):
    """One process of ``--workers N``: its own socket on the shared port."""
    os.environ["BEAVER_SERVER_SETTINGS"] = json.dumps(settings)
    server = _uvicorn_server(settings)
    server.run(sockets=[_bind(settings)])


def _supervise(settings, placeholder):
    """Run ``--workers`` processes until a signal; one that dies is started again."""
    import multiprocessing
    import multiprocessing.connection
    import signal
    context = multiprocessing.get_context("spawn")
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    workers = []
    _log_start(settings, placeholder)
    try:
        while not stopping:
            workers = [w for w in workers if w.is_alive()]
            while len(workers) < settings["workers"] and not stopping:
                worker = context.Process(target=_worker, args=(settings,), daemon=True)
                worker.start()
                workers.append(worker)
            multiprocessing.connection.wait([w.sentinel for w in workers], timeout=0.5)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(10)
        placeholder.close()
    return 0


_header_timeout = HEADER_TIMEOUT

class _HeaderDeadline:
    """Closes a connection whose request headers do not arrive within ``--header-timeout``
    seconds (slow-loris clients; one that sends nothing at all too), on top of uvicorn's
    HTTP protocols."""

    _header_deadline = None

    def _arm(self, idle=0.0):
        self._head_arrived()
        self._header_deadline = self.loop.call_later(_header_timeout + idle, self._too_slow)

    def _too_slow(self):
        if not self.transport.is_closing():
            self.transport.close()

    def _head_arrived(self):
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    _pending = b""      # bytes the reactor read before handing the connection over

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()
        if self._pending:
            pending, self._pending = self._pending, b""
            self.data_received(pending)

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(idle=self.timeout_keep_alive)

    def connection_lost(self, exc):
        self._head_arrived()
        super().connection_lost(exc)


def _protocols():
    """uvicorn's fastest HTTP protocol available, with the header deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class Protocol(_HeaderDeadline, H11Protocol):
            def data_received(self, data):
                super().data_received(data)
                if self.conn.their_state is not h11.IDLE:
                    self._head_arrived()
        return Protocol

    class Protocol(_HeaderDeadline, HttpToolsProtocol):
        def on_headers_complete(self):
            self._head_arrived()
            super().on_headers_complete()
    return Protocol


try:
    _Protocol = _protocols()
    _Protocol.__qualname__ = _Protocol.__name__ = "_Protocol"    # picklable by name
except ImportError:
    _Protocol = None


if __name__ == "__main__":
    sys.modules.setdefault("beaver_server", sys.modules[__name__])   # one copy of this module
    sys.exit(main())
