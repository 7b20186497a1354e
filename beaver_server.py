"""beaver_server: a beaver database as a REST API (the ``[server]`` extra: fastapi + uvicorn).

    $ python -m beaver_server --database app.db --port 8000        # or: beaver serve ...
    $ curl -X PUT localhost:8000/dicts/app_config/theme -d '"dark"'
    $ curl localhost:8000/dicts/app_config/theme
    "dark"

    >>> from beaver_server import create_app
    >>> app = create_app("app.db", token="s3cret")     # any ASGI server can run it

Routes (interactive documentation at ``/docs``), one group per structure kind::

    /dicts/{name}/{key}      GET PUT(?ttl_seconds) DELETE(returns the value) HEAD
    /dict/{name}/{key}       the same (the spec's spelling)
    /lists/{name}/items/{i}  GET PUT DELETE;  /lists/{name}/slice;  POST .../push|prepend|
                             extend|insert|pop|deque|reverse
    /queues/{name}/put|get|peek|ack|nack get?timeout=... waits, 408 when nothing came;
                                         get?lease=... hands out an item to ack
    /blobs/{name}/{key}      raw bytes; metadata as JSON in the Beaver-Metadata header
    /logs/{name}/log|range|live          live: server-sent events
    /channels/{name}/publish|history     subscribe: /channels/{name}/sse (server-sent
                                         events) or /channels/{name}/ws (WebSocket)
    /collections/{name}/index|documents/{id}|match|search|connect|disconnect|edges|
                        neighbors|walk
    /locks/{name}/acquire|release|renew  a token identifies the hold
    /events/{kind}/{name}?event=set      server-sent events: the changes of a structure
    /{kind}s/{name}          GET ?view=summary|keys|items|dump, POST (load a dump), DELETE
    /info  /dump  /load  /backup          the whole database

Values travel as JSON; a request body that is not valid JSON is taken as a string (so
``curl -d your-secret-api-key`` stores that string). Errors are JSON objects
``{"error": "KeyError", "message": "..."}`` with a 4xx status; ``beaver.BeaverClient``
raises the same exception classes a local ``BeaverDB`` would.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
from typing import Annotated, Any, Literal, Optional

from fastapi import (APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response,
                     WebSocket, WebSocketDisconnect)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import beaver
from beaver import BeaverDB

__all__ = ["create_app", "main"]

DEFAULT_MAX_BODY = 64 * 1024 * 1024   # bytes in one request (blobs included)
DEFAULT_MAX_WAIT = 25.0               # seconds one blocking request may wait on the server
_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}

Seconds = Optional[float]
_BOUND = 2 ** 62   # list positions beyond this are refused (SQLite integers are 64-bit)
Index = Annotated[int, Path(ge=-_BOUND, le=_BOUND, description="a position; negative counts "
                                                               "from the end")]
QIndex = Annotated[int, Query(ge=-_BOUND, le=_BOUND)]
OptIndex = Annotated[Optional[int], Query(ge=-_BOUND, le=_BOUND)]
View = Literal["summary", "keys", "items", "dump"]
_ANY_JSON = {"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}}
_JSON_LIST = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "array", "items": {}}}}}}
_JSON_OBJECT = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object"}}}}}
_BYTES = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _seconds(what, default=None):
    return Query(default, ge=0, allow_inf_nan=False, description=what)


# ------------------------------------------------------------------------------------------
# Responses and errors
# ------------------------------------------------------------------------------------------

def _json(value, status=200, headers=None) -> Response:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return Response(text, status, headers, media_type="application/json")


def _error(status, name, message, **extra) -> JSONResponse:
    return JSONResponse({"error": name, "message": message, **extra}, status)


# Most specific first: the first class an exception is an instance of decides the status.
_STATUS = [
    (beaver.LockLost, 409), (beaver.LockTimeout, 409), (beaver.DatabaseBusy, 503),
    (beaver.DiskFull, 507),
    (TimeoutError, 408), (KeyError, 404), (IndexError, 404), (ValueError, 422),
    (TypeError, 422), (beaver.ClosedError, 503), (beaver.FeatureUnavailable, 501),
]


def _handle_exception(request, exc):
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            break
    else:
        status = 500
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return _error(status, type(exc).__name__, str(message))


def _handle_http(request, exc):
    names = {400: "ValueError", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 413: "TooLarge",
             422: "ValueError"}
    name = names.get(exc.status_code, "HTTPError")
    response = _error(exc.status_code, name, str(exc.detail))
    for key, value in (getattr(exc, "headers", None) or {}).items():
        response.headers[key] = value
    return response


def _handle_validation(request, exc):
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    where = ", ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] for e in errors)
    return _error(422, "ValidationError", f"invalid request: {where}", detail=errors)


def _install_error_handlers(app):
    for cls in (beaver.BeaverError, KeyError, IndexError, ValueError, TypeError, TimeoutError):
        app.add_exception_handler(cls, _handle_exception)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_validation)


# ------------------------------------------------------------------------------------------
# Shared state and request bodies
# ------------------------------------------------------------------------------------------

class _Context:
    """What every route needs: the database, the limits, the holds of remote locks."""

    def __init__(self, db, max_body, max_wait):
        self.db = db
        self.max_body = max_body
        self.max_wait = max_wait
        self.locks: dict = {}
        self.locks_guard = threading.Lock()

    def wait(self, timeout):
        """A client's timeout, capped so one request never ties a worker up for long."""
        return self.max_wait if timeout is None else min(timeout, self.max_wait)

    async def raw_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise HTTPException(413, f"the request body exceeds {self.max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise HTTPException(413, f"the request body exceeds {self.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def value(self, request: Request) -> Any:
        """The JSON value of the body; a body that is not JSON is taken as a string."""
        raw = await self.raw_body(request)
        if not raw:
            raise HTTPException(422, "a request body (a JSON value) is required")
        try:
            return json.loads(raw)
        except ValueError:
            pass
        except RecursionError:
            raise HTTPException(400, "the JSON body is nested too deeply") from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(422, "the request body is neither JSON nor UTF-8 text") from None

    async def json_list(self, request: Request) -> list:
        value = await self.value(request)
        if not isinstance(value, list):
            raise HTTPException(422, "the request body must be a JSON array")
        return value

    async def json_object(self, request: Request) -> dict:
        value = await self.value(request)
        if not isinstance(value, dict):
            raise HTTPException(422, "the request body must be a JSON object")
        return value


def _structure_routes(router, ctx, factory, views):
    """``/{kind}s`` and ``/{kind}s/{name}``: listing, summary views, load, clear."""
    kind = factory if factory != "blobs" else "blob"

    @router.get("", summary=f"List the {kind} structures")
    def list_structures():
        return _json([s for s in ctx.db.info()["structures"] if s["kind"] == kind])

    @router.get("/{name}", summary=f"Size, keys, items or dump of a {kind}")
    def describe(name: str, view: View = "summary"):
        manager = getattr(ctx.db, factory)(name)
        result = {"name": name, "size": len(manager)}
        if isinstance(getattr(manager, "metric", None), str):
            result["metric"] = manager.metric
        if view == "dump":
            result["dump"] = manager.dump()
        elif view != "summary":
            result[view] = views[view](manager)
        return _json(result)

    @router.post("/{name}", summary=f"Load a {kind} dump", openapi_extra=_JSON_OBJECT)
    def load(name: str, mode: Literal["append", "replace"] = "append",
             data: dict = Depends(ctx.json_object)):
        manager = getattr(ctx.db, factory)(name)
        with ctx.db.transaction():
            if mode == "replace":
                manager.clear()
            manager.load(data)
        return Response(status_code=204)

    @router.delete("/{name}", status_code=204, summary=f"Remove every item of a {kind}")
    def clear(name: str):
        getattr(ctx.db, factory)(name).clear()
        return Response(status_code=204)


# ------------------------------------------------------------------------------------------
# Dicts
# ------------------------------------------------------------------------------------------

def _ttl_headers(manager, key):
    ttl = manager.ttl(key)
    return None if ttl is None else {"Beaver-TTL": repr(ttl)}


def _dict_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["dicts"])
    _structure_routes(router, ctx, "dict", {
        "keys": lambda m: m.keys(), "items": lambda m: [list(kv) for kv in m.items()]})

    @router.patch("/{name}", status_code=204, summary="Set many keys at once",
                  openapi_extra=_JSON_OBJECT)
    def update(name: str, items: dict = Depends(ctx.json_object)):
        ctx.db.dict(name).update(items)
        return Response(status_code=204)

    # A read never waits for writers (WAL), so the hottest route skips the threadpool hop.
    @router.get("/{name}/{key:path}", summary="Read a key")
    async def get_key(name: str, key: str):
        return _json(ctx.db.dict(name)[key])

    @router.head("/{name}/{key:path}", summary="Whether a key exists (and its TTL)")
    def has_key(name: str, key: str):
        return Response(headers=_ttl_headers(ctx.db.dict(name), key))

    @router.put("/{name}/{key:path}", summary="Write a key (optionally with a TTL)",
                openapi_extra=_ANY_JSON)
    def set_key(name: str, key: str, value: Any = Depends(ctx.value),
                ttl_seconds: Optional[float] = Query(None, gt=0, allow_inf_nan=False),
                if_absent: bool = False):
        manager = ctx.db.dict(name)
        if if_absent:
            return _json(manager.setdefault(key, value))
        manager.set(key, value, ttl_seconds=ttl_seconds)
        return Response(status_code=204)

    @router.delete("/{name}/{key:path}", summary="Delete a key, returning its value")
    def delete_key(name: str, key: str):
        return _json(ctx.db.dict(name).pop(key))

    return router


# ------------------------------------------------------------------------------------------
# Lists
# ------------------------------------------------------------------------------------------

def _list_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["lists"])
    _structure_routes(router, ctx, "list", {"keys": lambda m: list(range(len(m))),
                                            "items": lambda m: list(m)})

    @router.get("/{name}/items/{index}", summary="Read the item at an index")
    def get_item(name: str, index: Index):
        return _json(ctx.db.list(name)[index])

    @router.put("/{name}/items/{index}", status_code=204, summary="Replace the item at an index",
                openapi_extra=_ANY_JSON)
    def set_item(name: str, index: Index, value: Any = Depends(ctx.value)):
        ctx.db.list(name)[index] = value
        return Response(status_code=204)

    @router.delete("/{name}/items/{index}", status_code=204, summary="Delete the item at an index")
    def delete_item(name: str, index: Index):
        del ctx.db.list(name)[index]
        return Response(status_code=204)

    @router.get("/{name}/slice", summary="Read a slice")
    def get_slice(name: str, start: OptIndex = None, stop: OptIndex = None,
                  step: OptIndex = None):
        return _json(ctx.db.list(name)[_slice(start, stop, step)])

    @router.put("/{name}/slice", status_code=204, summary="Assign a slice",
                openapi_extra=_JSON_LIST)
    def set_slice(name: str, start: OptIndex = None, stop: OptIndex = None,
                  step: OptIndex = None, values: list = Depends(ctx.json_list)):
        ctx.db.list(name)[_slice(start, stop, step)] = values
        return Response(status_code=204)

    @router.delete("/{name}/slice", status_code=204, summary="Delete a slice")
    def delete_slice(name: str, start: OptIndex = None, stop: OptIndex = None,
                     step: OptIndex = None):
        del ctx.db.list(name)[_slice(start, stop, step)]
        return Response(status_code=204)

    _list_write_routes(router, ctx)
    return router


def _slice(start, stop, step):
    if step == 0:
        raise ValueError("slice step cannot be zero")
    return slice(start, stop, step)


def _popped(value, empty) -> Response:
    return _json(value, headers={"Beaver-Empty": "1"} if empty else None)


def _list_write_routes(router, ctx):
    @router.post("/{name}/push", status_code=204, summary="Append an item",
                 openapi_extra=_ANY_JSON)
    def push(name: str, value: Any = Depends(ctx.value)):
        ctx.db.list(name).push(value)
        return Response(status_code=204)

    @router.post("/{name}/prepend", status_code=204, summary="Insert an item at the front",
                 openapi_extra=_ANY_JSON)
    def prepend(name: str, value: Any = Depends(ctx.value)):
        ctx.db.list(name).prepend(value)
        return Response(status_code=204)

    @router.post("/{name}/extend", status_code=204, summary="Append many items",
                 openapi_extra=_JSON_LIST)
    def extend(name: str, values: list = Depends(ctx.json_list)):
        ctx.db.list(name).extend(values)
        return Response(status_code=204)

    @router.post("/{name}/insert", status_code=204, summary="Insert an item before an index",
                 openapi_extra=_ANY_JSON)
    def insert(name: str, index: QIndex, value: Any = Depends(ctx.value)):
        ctx.db.list(name).insert(index, value)
        return Response(status_code=204)

    @router.post("/{name}/pop", summary="Remove and return an item (default: the last)")
    def pop(name: str, index: OptIndex = None):
        manager = ctx.db.list(name)
        with ctx.db.transaction():
            empty = index is None and len(manager) == 0
            return _popped(manager.pop(index), empty)

    @router.post("/{name}/deque", summary="Remove and return the first item")
    def deque(name: str):
        manager = ctx.db.list(name)
        with ctx.db.transaction():
            empty = len(manager) == 0
            return _popped(manager.deque(), empty)

    @router.post("/{name}/reverse", status_code=204, summary="Reverse the list in place")
    def reverse(name: str):
        ctx.db.list(name).reverse()
        return Response(status_code=204)


# ------------------------------------------------------------------------------------------
# Queues
# ------------------------------------------------------------------------------------------

def _queue_item(item) -> dict:
    result = {"priority": item.priority, "timestamp": item.timestamp,
              "data": beaver._to_jsonable(item.data)}
    if getattr(item, "lease_id", None) is not None:
        result["lease_id"] = item.lease_id
    return result


def _leased(lease_id):
    """The item ``ack``/``nack`` need: only its lease id matters to them."""
    item = beaver.LeasedItem(0, 0.0, None)
    item.lease_id = lease_id
    return item


def _number(value):
    """Whole numbers as int (as a local caller would pass them), within SQLite's range."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def _queue_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["queues"])
    _structure_routes(router, ctx, "queue", {
        "keys": lambda m: list(range(len(m))), "items": lambda m: [_queue_item(i) for i in m]})

    @router.post("/{name}/put", status_code=204, summary="Add an item (lower priority first)",
                 openapi_extra=_ANY_JSON)
    def put(name: str, value: Any = Depends(ctx.value),
            priority: float = Query(0.0, allow_inf_nan=False)):
        ctx.db.queue(name).put(value, priority=_number(priority))
        return Response(status_code=204)

    @router.post("/{name}/get", summary="Take the first item, waiting up to `timeout` seconds",
                 responses={404: {"description": "empty (block=false)"},
                            408: {"description": "nothing arrived in time"}})
    def get(name: str, block: bool = True, timeout: Seconds = _seconds("seconds to wait"),
            lease: Optional[float] = Query(None, gt=0, allow_inf_nan=False,
                                           description="seconds before an un-acked item "
                                                       "returns to the queue")):
        item = ctx.db.queue(name).get(block=block, timeout=ctx.wait(timeout) if block else None,
                                      lease=lease)
        return _json(_queue_item(item))

    @router.post("/{name}/ack", summary="Finish a leased item (false if its lease ran out)")
    def ack(name: str, lease_id: int = Query(ge=0, le=2 ** 62)):
        return _json(ctx.db.queue(name).ack(_leased(lease_id)))

    @router.post("/{name}/nack", summary="Give a leased item back to the queue now")
    def nack(name: str, lease_id: int = Query(ge=0, le=2 ** 62)):
        return _json(ctx.db.queue(name).nack(_leased(lease_id)))

    @router.get("/{name}/peek", summary="The next item, without taking it (null if empty)")
    def peek(name: str):
        item = ctx.db.queue(name).peek()
        return _json(None if item is None else _queue_item(item))

    return router


# ------------------------------------------------------------------------------------------
# Blobs
# ------------------------------------------------------------------------------------------

def _blob_headers(blob) -> dict:
    headers = {"Content-Length": str(len(blob.data))}
    if blob.metadata is not None:
        headers["Beaver-Metadata"] = json.dumps(beaver._to_jsonable(blob.metadata))
    return headers


def _media_type(metadata) -> str:
    if isinstance(metadata, dict):
        for field in ("mimetype", "content_type", "content-type", "media_type"):
            value = metadata.get(field)
            if isinstance(value, str) and "/" in value and value.isascii():
                return value
    return "application/octet-stream"


def _blob_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["blobs"])
    _structure_routes(router, ctx, "blobs", {"keys": lambda m: m.keys(),
                                             "items": lambda m: m.keys()})

    @router.put("/{name}/{key:path}", status_code=204, openapi_extra=_BYTES,
                summary="Upload bytes; JSON metadata in the Beaver-Metadata header")
    async def put(request: Request, name: str, key: str):
        data = await ctx.raw_body(request)
        metadata = request.headers.get("beaver-metadata")
        if metadata is not None:
            try:
                metadata = json.loads(metadata)
            except (ValueError, RecursionError):
                raise HTTPException(422, "Beaver-Metadata must be JSON") from None
        await run_in_threadpool(ctx.db.blobs(name).put, key, data, metadata)
        return Response(status_code=204)

    @router.get("/{name}/{key:path}", summary="Download bytes",
                response_class=Response, responses={200: {"content": {"*/*": {}}}})
    def get(name: str, key: str):
        blob = ctx.db.blobs(name)[key]
        return Response(blob.data, headers=_blob_headers(blob),
                        media_type=_media_type(blob.metadata))

    @router.head("/{name}/{key:path}", summary="Whether a blob exists (and its metadata)")
    def head(name: str, key: str):
        blob = ctx.db.blobs(name)[key]
        return Response(headers=_blob_headers(blob), media_type=_media_type(blob.metadata))

    @router.delete("/{name}/{key:path}", status_code=204, summary="Delete a blob")
    def delete(name: str, key: str):
        ctx.db.blobs(name).delete(key)
        return Response(status_code=204)

    return router


# ------------------------------------------------------------------------------------------
# Logs
# ------------------------------------------------------------------------------------------

def _entry(entry) -> dict:
    return {"timestamp": entry.timestamp.timestamp(), "data": beaver._to_jsonable(entry.data)}


def _sse(events):
    """A server-sent event response streaming ``events`` (strings)."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _log_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["logs"])
    _structure_routes(router, ctx, "log", {"keys": lambda m: [], "items": lambda m: [
        _entry(e) for e in m]})

    @router.post("/{name}/log", status_code=204, summary="Append an entry (default: now)",
                 openapi_extra=_ANY_JSON)
    def log(name: str, value: Any = Depends(ctx.value),
            timestamp: Optional[float] = Query(None, allow_inf_nan=False,
                                               description="epoch seconds")):
        ctx.db.log(name).log(value, timestamp=timestamp)
        return Response(status_code=204)

    @router.get("/{name}/range", summary="Entries between start and end (epoch s, inclusive)")
    def range_(name: str, start: Optional[float] = Query(None, allow_inf_nan=False),
               end: Optional[float] = Query(None, allow_inf_nan=False)):
        return _json([_entry(e) for e in ctx.db.log(name).range(start, end)])

    @router.get("/{name}/live", summary="Server-sent events: the values of the last `window` "
                "seconds, now and every `period` seconds", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}})
    def live(name: str, window: float = Query(60.0, gt=0, allow_inf_nan=False),
             period: float = Query(1.0, ge=0.01, allow_inf_nan=False)):
        view = ctx.db.log(name).live(window=window, period=period, aggregator=list)

        def events():
            with view:
                for values in view:
                    yield f"data: {json.dumps(beaver._to_jsonable(values))}\n\n"
        return _sse(events())

    return router


# ------------------------------------------------------------------------------------------
# Channels
# ------------------------------------------------------------------------------------------

class _Inbox:
    """JSON texts handed over from any thread to the event loop that made the inbox."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, text):
        with contextlib.suppress(RuntimeError):     # the loop has already shut down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, text)

    async def next(self, timeout):
        """The next text; None after ``timeout`` s of silence; EOFError once the source ends."""
        try:
            text = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if not isinstance(text, str):     # a subscription's end-of-stream marker
            raise EOFError
        return text


def _sse_from(inbox, stop, greeting):
    """Server-sent events of every text of ``inbox``, with keep-alives; ``stop()`` at the end."""
    async def events():
        try:
            yield f": {greeting}\n\n"
            while True:
                text = await inbox.next(15.0)
                yield ": keep-alive\n\n" if text is None else f"data: {text}\n\n"
        except EOFError:
            return
        finally:
            stop()
    return _sse(events())


def _channel_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["channels"])
    _structure_routes(router, ctx, "channel", {"keys": lambda m: [],
                                               "items": lambda m: m.history()})

    @router.post("/{name}/publish", status_code=204, summary="Publish a message",
                 openapi_extra=_ANY_JSON)
    def publish(name: str, value: Any = Depends(ctx.value)):
        ctx.db.channel(name).publish(value)
        return Response(status_code=204)

    @router.get("/{name}/history", summary="The retained messages, oldest first")
    def history(name: str, limit: Optional[int] = Query(None, ge=0, le=2 ** 62)):
        return _json(ctx.db.channel(name).history(limit))

    @router.get("/{name}/sse", summary="Server-sent events: every message published from now on",
                response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}})
    async def sse(name: str):
        inbox = _Inbox()
        subscriber = beaver.Subscriber(ctx.db.channel(name), sink=inbox.put)
        return _sse_from(inbox, subscriber.close, "subscribed")

    return router


def _channel_websocket(app, ctx, token):
    @app.websocket("/channels/{name}/ws")
    async def websocket(websocket: WebSocket, name: str):
        """Every message published from now on, one JSON text frame each; frames sent by
        the client are published."""
        if token and not _websocket_authorized(websocket, token):
            await websocket.close(code=1008, reason="a valid bearer token is required")
            return
        try:
            channel = ctx.db.channel(name)
        except (TypeError, ValueError) as e:
            await websocket.close(code=1008, reason=str(e)[:120])
            return
        inbox = _Inbox()
        subscriber = beaver.Subscriber(channel, sink=inbox.put)
        await websocket.accept()
        receiver = asyncio.ensure_future(_publish_frames(websocket, channel))
        try:
            while not receiver.done():
                text = await inbox.next(1.0)
                if text is not None:
                    await websocket.send_text(text)
        except (EOFError, WebSocketDisconnect, RuntimeError):
            pass
        finally:
            subscriber.close()
            receiver.cancel()


async def _publish_frames(websocket, channel):
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            text = await websocket.receive_text()
            try:
                value = json.loads(text)
            except ValueError:
                value = text
            await run_in_threadpool(channel.publish, value)


def _websocket_authorized(websocket, token) -> bool:
    given = websocket.headers.get("authorization", "")
    given = given[7:] if given.lower().startswith("bearer ") else websocket.query_params.get(
        "token", "")
    return secrets.compare_digest(given.encode(), token.encode())


# ------------------------------------------------------------------------------------------
# Collections
# ------------------------------------------------------------------------------------------

Direction = Literal["outgoing", "incoming", "both"]


class _DocumentIn(BaseModel):
    id: Optional[str] = None
    embedding: Optional[list[float]] = None
    body: Any = None
    fts: Any = True
    fuzzy: bool = False


class _MatchIn(BaseModel):
    query: str
    on: Optional[list[str]] = None
    top_k: int = Field(10, ge=0, le=10_000)
    fuzziness: int = Field(0, ge=0, le=2)
    raw: bool = False
    highlight: bool = False


class _SearchIn(BaseModel):
    vector: list[float]
    top_k: int = Field(10, ge=0, le=10_000)
    where: Optional[dict] = None


class _EdgeIn(BaseModel):
    source: str
    target: str
    label: Optional[str] = None
    metadata: Any = None


class _WalkIn(BaseModel):
    source: str
    labels: Optional[list[str]] = None
    depth: int = Field(1, ge=0, le=100)
    direction: Direction = "outgoing"


class _CollectionIn(BaseModel):
    metric: Optional[Literal["l2", "cosine", "ip"]] = None
    options: dict = {}


def _hits(hits) -> list:
    return [{"document": hit[0].to_dict(), "score": hit[1],
             **({"snippet": hit[2]} if len(hit) > 2 else {})} for hit in hits]


def _collection_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["collections"])
    _structure_routes(router, ctx, "collection", {
        "keys": lambda m: [d.id for d in m], "items": lambda m: [d.to_dict() for d in m]})

    @router.put("/{name}", status_code=204, summary="Create a collection with a metric/options")
    def create(name: str, spec: _CollectionIn):
        ctx.db.collection(name, metric=spec.metric, **spec.options)
        return Response(status_code=204)

    @router.post("/{name}/index", summary="Insert or replace a document")
    def index(name: str, doc: _DocumentIn):
        if not (isinstance(doc.fts, bool) or (isinstance(doc.fts, list) and
                                              all(isinstance(p, str) for p in doc.fts))):
            raise ValueError("fts is true, false or a list of field paths")
        document = beaver.Document(id=doc.id, embedding=doc.embedding, body=doc.body)
        ctx.db.collection(name).index(document, fts=doc.fts, fuzzy=doc.fuzzy)
        return _json({"id": document.id})

    @router.get("/{name}/documents/{doc_id:path}", summary="Read a document")
    def get(name: str, doc_id: str):
        return _json(ctx.db.collection(name)[doc_id].to_dict())

    @router.head("/{name}/documents/{doc_id:path}", summary="Whether a document exists")
    def head(name: str, doc_id: str):
        ctx.db.collection(name)[doc_id]
        return Response()

    @router.delete("/{name}/documents/{doc_id:path}", status_code=204,
                   summary="Drop a document and its edges")
    def drop(name: str, doc_id: str):
        ctx.db.collection(name).drop(doc_id)
        return Response(status_code=204)

    @router.post("/{name}/match", summary="Full-text search (fuzzy with fuzziness 1 or 2)")
    def match(name: str, query: _MatchIn):
        return _json(_hits(ctx.db.collection(name).match(
            query.query, on=query.on, top_k=query.top_k, fuzziness=query.fuzziness,
            raw=query.raw, highlight=query.highlight)))

    @router.post("/{name}/search", summary="Nearest documents to a vector")
    def search(name: str, query: _SearchIn):
        return _json(_hits(ctx.db.collection(name).search(query.vector, query.top_k,
                                                          query.where)))

    _graph_routes(router, ctx)
    return router


def _graph_routes(router, ctx):
    @router.post("/{name}/connect", status_code=204, summary="Add or update an edge")
    def connect(name: str, edge: _EdgeIn):
        if edge.label is None:
            raise ValueError("an edge needs a label")
        ctx.db.collection(name).connect(edge.source, edge.target, edge.label, edge.metadata)
        return Response(status_code=204)

    @router.post("/{name}/disconnect", status_code=204, summary="Remove edges")
    def disconnect(name: str, edge: _EdgeIn):
        ctx.db.collection(name).disconnect(edge.source, edge.target, edge.label)
        return Response(status_code=204)

    @router.get("/{name}/edges", summary="The edges of a document")
    def edges(name: str, id: str, direction: Direction = "outgoing",
              label: Optional[str] = None):
        found = ctx.db.collection(name).edges(id, direction=direction, label=label)
        return _json([beaver._to_jsonable(e._asdict()) for e in found])

    @router.get("/{name}/neighbors", summary="The documents one edge away")
    def neighbors(name: str, id: str, label: Optional[str] = None,
                  direction: Direction = "outgoing"):
        found = ctx.db.collection(name).neighbors(id, label=label, direction=direction)
        return _json([d.to_dict() for d in found])

    @router.post("/{name}/walk", summary="Documents up to `depth` edges away, breadth first")
    def walk(name: str, walk: _WalkIn):
        found = ctx.db.collection(name).walk(walk.source, labels=walk.labels, depth=walk.depth,
                                             direction=walk.direction)
        return _json([d.to_dict() for d in found])

    @router.post("/{name}/compact", status_code=204, summary="Compact the vector index")
    def compact(name: str):
        ctx.db.collection(name).compact()
        return Response(status_code=204)


# ------------------------------------------------------------------------------------------
# Events
# ------------------------------------------------------------------------------------------

def _event_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["events"])
    kinds = {kind: factory for kind, (_, factory, *_) in beaver._STRUCTURES.items()}

    @router.get("/{kind}/{name}", summary="Server-sent events: the changes of one structure",
                response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}})
    async def events(kind: str, name: str, event: str = "*"):
        if kind not in kinds:
            raise HTTPException(404, f"no structure kind {kind!r}; one of {sorted(kinds)}")
        inbox, manager = _Inbox(), getattr(ctx.db, kinds[kind])(name)
        handle = await run_in_threadpool(manager.on, event, lambda payload: inbox.put(
            json.dumps(payload, ensure_ascii=False, default=str)))
        return _sse_from(inbox, handle.off, "listening")

    return router


# ------------------------------------------------------------------------------------------
# Locks
# ------------------------------------------------------------------------------------------

def _hold(ctx, name, token):
    with ctx.locks_guard:
        lock = ctx.locks.get(token)
    if lock is None or lock.name != name:
        raise beaver.LockLost(f"lock {name!r} is not held with token {token}")
    return lock


def _lock_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["locks"])

    @router.get("", summary="List the locks that are held or waited for")
    def list_locks():
        return _json([s for s in ctx.db.info()["structures"] if s["kind"] == "lock"])

    @router.get("/{name}", summary="Whether the lock is held (and by `token`)")
    def status(name: str, token: Optional[int] = None):
        lock = ctx.locks.get(token) if token is not None else None
        held = lock is not None and lock.name == name and lock.held
        return _json({"name": name, "locked": ctx.db.lock(name).locked, "held": held})

    @router.post("/{name}/acquire", summary="Wait up to `timeout` s for the lock; get a token",
                 responses={409: {"description": "not acquired in time"}})
    def acquire(name: str, timeout: Seconds = _seconds("seconds to wait"), block: bool = True,
                ttl: float = Query(60.0, gt=0, allow_inf_nan=False)):
        lock = ctx.db.lock(name, ttl=ttl)
        lock.acquire(timeout=ctx.wait(timeout), block=block)
        with ctx.locks_guard:
            ctx.locks[lock.token] = lock
            if len(ctx.locks) > 1000:
                _forget_expired_holds(ctx)
        return _json({"name": name, "token": lock.token, "ttl": ttl})

    @router.post("/{name}/release", status_code=204, summary="Release a hold")
    def release(name: str, token: int):
        lock = _hold(ctx, name, token)
        with ctx.locks_guard:
            ctx.locks.pop(token, None)
        lock.release()
        return Response(status_code=204)

    @router.post("/{name}/renew", status_code=204, summary="Extend a hold by `ttl` s from now")
    def renew(name: str, token: int, ttl: Optional[float] = Query(None, gt=0, allow_inf_nan=False)):
        _hold(ctx, name, token).renew(ttl)
        return Response(status_code=204)

    return router


def _forget_expired_holds(ctx):
    for token, lock in list(ctx.locks.items()):
        if not lock.held:
            del ctx.locks[token]
            with contextlib.suppress(beaver.LockLost):
                lock.release()


# ------------------------------------------------------------------------------------------
# The whole database
# ------------------------------------------------------------------------------------------

def _database_routes(ctx) -> APIRouter:
    router = APIRouter(tags=["database"])

    @router.get("/", summary="Server and database identity")
    def root():
        return _json({"beaver": beaver.__version__, "docs": "/docs"})

    @router.get("/info", summary="Every structure: kind, name, size")
    def info():
        return _json(ctx.db.info())

    @router.get("/dump", summary="The database (or the named structures) as JSON lines",
                response_class=Response,
                responses={200: {"content": {"application/x-ndjson": {}}}})
    def dump(names: Optional[str] = None):
        def write(path):
            with open(path, "w", encoding="utf-8") as f:
                return ctx.db.dump(f, names=names.split(",") if names else None)
        return _file_response(write, "dump.jsonl", "application/x-ndjson")

    @router.post("/load", summary="Load a JSON-lines dump in one transaction",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "text/plain": {"schema": {"type": "string"}}}}})
    async def load(request: Request, mode: Literal["append", "replace"] = "append"):
        raw = await ctx.raw_body(request)
        count = await run_in_threadpool(ctx.db.load, io.BytesIO(raw), mode)
        return _json({"structures": count})

    @router.get("/backup", summary="A consistent copy of the database file",
                response_class=Response,
                responses={200: {"content": {"application/vnd.sqlite3": {}}}})
    def backup():
        return _file_response(ctx.db.backup, "backup.db", "application/vnd.sqlite3")

    return router


def _file_response(write, filename, media_type) -> FileResponse:
    """Stream a file that ``write(path)`` makes in a temporary folder, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="beaver-server-")
    path = os.path.join(folder, filename)
    try:
        result = write(path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    headers = {"Beaver-Structures": str(result)} if isinstance(result, int) else None
    return FileResponse(path, media_type=media_type, filename=filename, headers=headers,
                        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True))


# ------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------

def _auth(token):
    bearer = HTTPBearer(auto_error=False, description="the server's --token / BEAVER_TOKEN")

    def check(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)):
        given = "" if credentials is None else credentials.credentials
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})
    return [Depends(check)]


# Each modality contributes (BeaverDB factory, prefix, router factory): a modality this
# beaver.py lacks is left out.
ROUTERS = [
    ("dict", "/dicts", _dict_routes), ("list", "/lists", _list_routes),
    ("queue", "/queues", _queue_routes), ("blobs", "/blobs", _blob_routes),
    ("log", "/logs", _log_routes), ("channel", "/channels", _channel_routes),
    ("collection", "/collections", _collection_routes), ("lock", "/locks", _lock_routes),
    ("transaction", "/events", _event_routes),
    ("dump", "", _database_routes),
]
ALIASES = {"/dicts": "/dict"}   # the spec's spelling, hidden from the schema


def create_app(database="beaver.db", token=None, *, max_body_bytes=DEFAULT_MAX_BODY,
               max_wait=DEFAULT_MAX_WAIT) -> FastAPI:
    """A FastAPI app serving ``database`` (a path or an open ``BeaverDB``).

    ``token``: require ``Authorization: Bearer <token>`` on every route (not ``/docs``).
    ``max_body_bytes``: the largest request body (blob uploads included), else 413.
    ``max_wait``: the longest a blocking call (queue get, lock acquire) waits per request.
    """
    owned = not isinstance(database, BeaverDB)
    db = BeaverDB(database) if owned else database

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if owned:
            db.close()

    app = FastAPI(title="beaver", version=beaver.__version__, lifespan=lifespan,
                  description="A beaver database over HTTP: dicts, lists, queues, blobs, "
                              "locks and more. Values are JSON.")
    app.state.db = db
    ctx = _Context(db, int(max_body_bytes), float(max_wait))
    dependencies = _auth(token) if token else []
    _install_error_handlers(app)
    for factory, prefix, routes in ROUTERS:
        if not hasattr(BeaverDB, factory):
            continue
        router = routes(ctx)
        app.include_router(router, prefix=prefix, dependencies=dependencies)
        if prefix in ALIASES:
            app.include_router(router, prefix=ALIASES[prefix], dependencies=dependencies,
                               include_in_schema=False)
    if hasattr(BeaverDB, "channel"):
        _channel_websocket(app, ctx, token)
    return app


def _is_loopback(host) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parser(prog=None) -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog=prog or "python -m beaver_server",
        description="Serve a beaver database over HTTP (OpenAPI docs at /docs).")
    parser.add_argument("--database", "-d",
                        default=env("BEAVER_DATABASE", env("DATABASE", "beaver.db")),
                        help="database file (default: $BEAVER_DATABASE, $DATABASE or beaver.db)")
    parser.add_argument("--host", default=env("BEAVER_HOST", "127.0.0.1"))
    parser.add_argument("--port", "-p", type=int, default=int(env("BEAVER_PORT", "8000")))
    parser.add_argument("--token", default=env("BEAVER_TOKEN") or None,
                        help="require this bearer token (default: $BEAVER_TOKEN)")
    parser.add_argument("--insecure", action="store_true",
                        default=env("BEAVER_INSECURE", "") not in ("", "0"),
                        help="allow a non-loopback --host without a token")
    parser.add_argument("--max-body-size", type=int, default=DEFAULT_MAX_BODY,
                        help="largest request body in bytes (blob uploads)")
    parser.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT,
                        help="longest wait of one blocking request, in seconds")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv=None, prog=None) -> int:
    """``python -m beaver_server [--database PATH] [--host H] [--port P] [--token T]``."""
    args = _parser(prog).parse_args(argv)
    if not _is_loopback(args.host) and not args.token and not args.insecure:
        print(f"beaver_server: refusing to listen on {args.host} without a token; set "
              "--token / BEAVER_TOKEN, or pass --insecure", file=sys.stderr)
        return 2
    import uvicorn
    app = create_app(args.database, args.token, max_body_bytes=args.max_body_size,
                     max_wait=args.max_wait)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
