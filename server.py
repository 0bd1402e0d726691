"""Poe proxy with memory: Poe's bots over plain HTTP and an OpenAI-style API, with the
conversations, projects and plan documents kept in a local SQLite file.

Read top to bottom: settings, database helpers, request helpers, the Poe relay, the handlers by
resource, the routes list, create_app(), main. The HTTP contract is API.md (shared/API.md).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import json
import logging
import math
import os
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import fastapi_poe as fp
from fastapi_poe.client import PROTOCOL_VERSION
import httpx
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("poe_proxy")

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "schema.sql")

# ---------------------------------------------------------------------------------------------
# Settings: a flag beats its env var, an env var beats a line in ./.env, which beats the default.
# ---------------------------------------------------------------------------------------------

DEFAULTS: dict[str, str | None] = {
    "HOST": "127.0.0.1",
    "PORT": "8000",
    "DB_PATH": "chat.db",
    "POE_API_KEY": None,
    "POE_BASE_URL": "https://api.poe.com/bot/",
    "DEFAULT_MODEL": "GPT-4o",
    "POE_TIMEOUT": "120",
    "MAX_BODY_BYTES": "4194304",
    "CORS_ORIGINS": None,
}

# While a reply streams, its new text is written this long after it arrives, in one write for all
# that came meanwhile (plus once at the start and once at the end), whatever the chunk rate.
FLUSH_SECONDS = 0.5

# Poe bot names are letters, digits, '.', '-' and '_'; the name becomes part of the URL.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def read_dotenv(path: str = ".env") -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return values
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def load_settings(**overrides: Any) -> dict[str, Any]:
    """Settings from overrides (create_app's arguments, CLI flags), the environment, ./.env."""
    dotenv = read_dotenv()
    raw: dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        override = overrides.get(name.lower())
        if override is not None:
            raw[name] = override
        elif os.environ.get(name) not in (None, ""):
            raw[name] = os.environ[name]
        elif dotenv.get(name) not in (None, ""):
            raw[name] = dotenv[name]
        else:
            raw[name] = default

    def number(name: str, kind: type, minimum: float) -> Any:
        try:
            value = kind(raw[name])
        except (TypeError, ValueError):
            raise SystemExit(f"{name} must be a number, got {raw[name]!r}") from None
        if value < minimum:
            raise SystemExit(f"{name} must be at least {minimum}, got {value}")
        return value

    base_url = str(raw["POE_BASE_URL"])
    origins = raw["CORS_ORIGINS"]
    if isinstance(origins, str):
        origins = [o.strip() for o in origins.split(",") if o.strip()]
    return {
        "host": str(raw["HOST"]),
        "port": number("PORT", int, 0),
        "db_path": str(raw["DB_PATH"]),
        "poe_api_key": raw["POE_API_KEY"] or None,
        "poe_base_url": base_url if base_url.endswith("/") else base_url + "/",
        "default_model": str(raw["DEFAULT_MODEL"]),
        "poe_timeout": number("POE_TIMEOUT", float, 0.001),
        "max_body_bytes": number("MAX_BODY_BYTES", int, 1),
        "cors_origins": list(origins or []),
    }


# ---------------------------------------------------------------------------------------------
# Database: one connection, used from the event loop only, so statements never interleave and
# every transaction is short and synchronous (no await inside one).
# ---------------------------------------------------------------------------------------------

NOW_SQL = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


def open_db(db_path: str) -> sqlite3.Connection:
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA journal_mode = WAL")
    # In WAL mode NORMAL loses nothing on a process crash (kill -9), only on power loss.
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA busy_timeout = 5000")
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        db.executescript(f.read())
    # A reply still 'streaming' here was cut off by a crash: keep its text, say so.
    db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def fetch_one(db: sqlite3.Connection, sql: str, params: tuple = ()) -> dict | None:
    row = db.execute(sql, params).fetchone()
    return dict(row) if row is not None else None


def fetch_all(db: sqlite3.Connection, sql: str, params: tuple = ()) -> list[dict]:
    return [dict(row) for row in db.execute(sql, params)]


# ---------------------------------------------------------------------------------------------
# Request helpers: one way to read a body, one way to check each kind of field.
# ---------------------------------------------------------------------------------------------

MISSING = object()
INT64 = 2**63


async def read_json(request: Request) -> dict:
    """The body as a JSON object; 413 past MAX_BODY_BYTES without reading the rest."""
    limit = request.app.state.settings["max_body_bytes"]
    too_large = HTTPException(413, f"request body is larger than {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and is_number(length.strip()) and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise HTTPException(400, "the request body did not arrive whole") from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPException(400, "request body must be valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "request body must be a JSON object")
    return data


def text_field(data: dict, name: str, *, required: bool = False, empty_ok: bool = True,
               nullable: bool = True) -> Any:
    """A string field; MISSING when absent (None when null and nullable)."""
    value = data.get(name, MISSING)
    if value is MISSING or (value is None and nullable and not required):
        if required:
            raise HTTPException(400, f"{name} is required")
        return value
    if not isinstance(value, str):
        raise HTTPException(400, f"{name} must be a string")
    if not empty_ok and not value.strip():
        raise HTTPException(400, f"{name} must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPException(400, f"{name} must be valid UTF-8 text") from None
    if "\x00" in value:
        # SQLite's text functions stop at NUL (length, ||): refuse it rather than corrupt it.
        raise HTTPException(400, f"{name} must not contain NUL characters")
    return value


def int_field(data: dict, name: str, *, required: bool = False, minimum: int = 0) -> Any:
    value = data.get(name, MISSING)
    if value is MISSING or (value is None and not required):
        if required:
            raise HTTPException(400, f"{name} is required")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < INT64:
        raise HTTPException(400, f"{name} must be an integer >= {minimum}")
    return value


def bool_field(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, MISSING)
    if value is MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise HTTPException(400, f"{name} must be true or false")
    return value


def model_field(data: dict, name: str = "model") -> Any:
    value = text_field(data, name)
    if isinstance(value, str) and not MODEL_NAME.fullmatch(value):
        raise HTTPException(400, f"{name} must be a Poe bot name (letters, digits, '.', '-', '_')")
    return value


def is_number(raw: str) -> bool:
    """Plain ASCII digits that fit SQLite's 64-bit integers."""
    return raw.isascii() and raw.isdigit() and int(raw) < INT64


def path_id(request: Request, name: str, not_found: str) -> int:
    """An integer id from the path; anything else names nothing, so 404."""
    raw = request.path_params[name]
    if not is_number(raw):
        raise HTTPException(404, not_found)
    return int(raw)


def poe_key(request: Request) -> str:
    """The caller's Bearer key, else the server's POE_API_KEY, else 401. Never stored."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise HTTPException(401, "Authorization must be 'Bearer <poe api key>'")
        return key
    key = request.app.state.settings["poe_api_key"]
    if not key:
        raise HTTPException(401, "no Poe API key: send 'Authorization: Bearer <poe api key>' "
                                 "or set POE_API_KEY on the server")
    return key


# ---------------------------------------------------------------------------------------------
# Poe relay: the one place that talks to Poe. One call per reply (num_tries=1, no retry), only
# text is reply text, every failure becomes a PoeFailure with the status of API.md's table.
# ---------------------------------------------------------------------------------------------

class PoeFailure(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# The HTTP status of Poe's answer, which fastapi_poe hides behind "Error communicating with bot".
# The shared client's response hook writes it into the box of the task making the call.
poe_http_status: contextvars.ContextVar[dict] = contextvars.ContextVar("poe_http_status")


async def remember_poe_status(response: httpx.Response) -> None:
    box = poe_http_status.get(None)
    if box is not None and response.status_code >= 400 and "status" not in box:
        box["status"] = response.status_code


ERROR_TYPE_STATUS = {
    "insufficient_fund": (402, "Poe says the account is out of compute points"),
    "user_caused_error": (400, "Poe refused the request"),
    "privacy_authorization_error": (403, "Poe refused the request for privacy authorization"),
    "user_message_too_long": (413, "Poe says the message is too long"),
}


def poe_failure(exc: BaseException, model: str, box: dict) -> PoeFailure:
    status = box.get("status")
    if status is not None:
        if status == 401:
            return PoeFailure(401, "Poe rejected the API key")
        if status == 402:
            return PoeFailure(402, "Poe says the account is out of compute points")
        if status == 404:
            return PoeFailure(404, f"Poe does not know the model {model!r}")
        if status == 413:
            return PoeFailure(413, "Poe says the message is too long")
        if status == 429:
            return PoeFailure(429, "Poe is rate-limiting requests; try again later")
        if status in (400, 422):
            return PoeFailure(400, f"Poe refused the request (HTTP {status})")
        return PoeFailure(502, f"Poe answered with HTTP {status}")
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, httpx.TimeoutException):
        return PoeFailure(504, "Poe did not answer in time")
    if isinstance(cause, httpx.TransportError):
        return PoeFailure(502, "Poe is unreachable")
    if isinstance(exc, fp.BotError) and exc.args:
        # An error event: its data is JSON with text, allow_retry and error_type.
        try:
            event = json.loads(exc.args[0])
        except (TypeError, ValueError):
            event = None
        if isinstance(event, dict):
            text = event.get("text") if isinstance(event.get("text"), str) else ""
            status, message = ERROR_TYPE_STATUS.get(event.get("error_type"),
                                                    (502, "Poe answered with an error"))
            return PoeFailure(status, f"{message}: {text}" if text else message)
    return PoeFailure(502, "Poe answered with an error")


class PoeQuery(fp.QueryRequest):
    """fastapi_poe puts repr(request) into every message it yields (full_prompt, which we never
    read): pydantic's repr walks the whole history, milliseconds per chunk on a long chat."""

    def __repr__(self) -> str:
        return f"PoeQuery({len(self.query)} messages)"


def log_poe_error(exc: Exception, message: str) -> None:
    # fastapi_poe's default handler prints; messages here never carry the key.
    log.warning("%s: %s", message, type(exc).__name__)


async def relay_poe(app: Starlette, model: str, poe_messages: list[fp.ProtocolMessage],
                    api_key: str, **params: Any) -> AsyncIterator[tuple[str, str]]:
    """Yields ("text", chunk) and ("replace", whole_text) from one Poe call.

    Must be consumed by a task that does no other await between chunks: the wait for Poe's next
    event is bounded by one deadline on the task, not a task per chunk. Moving that deadline is
    the dearest step of a chunk's relay, so it moves at most every `slack` seconds, to
    now + timeout + slack: never earlier than `timeout` after the last event, at most `slack`
    later. The wait for the first event is exact.
    """
    settings = app.state.settings
    timeout = settings["poe_timeout"]
    slack = min(1.0, timeout / 10)
    box: dict = {}
    token = poe_http_status.set(box)
    request = PoeQuery(version=PROTOCOL_VERSION, type="query", query=poe_messages, user_id="",
                       conversation_id="", message_id="", **params)
    loop = asyncio.get_running_loop()
    moved = -math.inf  # the first event always moves the deadline
    try:
        async with asyncio.timeout(timeout) as deadline:
            async with contextlib.aclosing(fp.stream_request(
                    request, model, api_key, session=app.state.poe, num_tries=1,
                    on_error=log_poe_error, base_url=settings["poe_base_url"])) as events:
                async for event in events:
                    now = loop.time()
                    if now - moved >= slack:
                        deadline.reschedule(now + timeout + slack)
                        moved = now
                    if (isinstance(event, fp.MetaResponse) or event.is_suggested_reply
                            or event.attachment is not None or event.data is not None):
                        continue
                    text = event.text if "\x00" not in event.text else event.text.replace(
                        "\x00", "")
                    yield ("replace" if event.is_replace_response else "text", text)
    except TimeoutError:
        raise PoeFailure(504, f"Poe did not answer within {timeout:g} s") from None
    except (fp.BotError, httpx.HTTPError) as exc:
        raise poe_failure(exc, model, box) from None
    finally:
        poe_http_status.reset(token)


def to_poe_messages(history: list[tuple[str, str]]) -> list[fp.ProtocolMessage]:
    return [fp.ProtocolMessage(role="bot" if role == "assistant" else role, content=content)
            for role, content in history if content]


# ---------------------------------------------------------------------------------------------
# Replies: each Poe reply is read to its end by a task of its own, so a client that goes away
# changes nothing; the response that started it only listens. In a conversation, the user
# message and the reply are written when the first text arrives, the reply's new text at most
# every FLUSH_SECONDS, and the end once.
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Reply:
    conversation_id: str | None  # None: stateless (the OpenAI route), nothing stored
    user_message: tuple[str, str] | None
    listener: asyncio.Queue | None
    chunks: list[str] = field(default_factory=list)
    saved_chunks: int = 0  # chunks[:saved_chunks] are in the database
    rewrite: bool = False  # replace_response: the stored text must be rewritten whole
    flush: asyncio.TimerHandle | None = None  # the next write of unsaved text, when scheduled
    message_id: int | None = None
    status: str = "streaming"
    error: tuple[int, str] | None = None
    task: asyncio.Task | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def start_reply(app: Starlette, *, conversation_id: str | None, user_message: tuple | None,
                model: str, history: list[tuple[str, str]], api_key: str, listen: bool,
                **params: Any) -> Reply:
    reply = Reply(conversation_id, user_message, asyncio.Queue() if listen else None)
    if conversation_id is not None:
        app.state.replies[conversation_id] = reply
    reply.task = asyncio.create_task(
        run_reply(app, reply, model, to_poe_messages(history), api_key, params))
    app.state.reply_tasks.add(reply.task)
    reply.task.add_done_callback(app.state.reply_tasks.discard)
    return reply


def notify(reply: Reply, item: tuple) -> None:
    if reply.listener is not None:
        reply.listener.put_nowait(item)


async def run_reply(app: Starlette, reply: Reply, model: str,
                    poe_messages: list[fp.ProtocolMessage], api_key: str, params: dict) -> None:
    db = app.state.db
    loop = asyncio.get_running_loop()

    def flush() -> None:
        # Runs between two chunks (the task is waiting for Poe), never inside a write.
        reply.flush = None
        save_reply_text(db, reply, "streaming")

    try:
        async with contextlib.aclosing(relay_poe(app, model, poe_messages, api_key,
                                                 **params)) as events:
            async for kind, text in events:
                if kind == "replace":
                    reply.chunks = [text]
                    reply.saved_chunks = 0
                    reply.rewrite = True
                else:
                    reply.chunks.append(text)
                if reply.conversation_id is not None:
                    if reply.message_id is None:
                        save_reply_start(db, reply)
                    elif reply.flush is None:
                        # Text that arrives is written within FLUSH_SECONDS, even if Poe then
                        # pauses; at most one write per FLUSH_SECONDS, whatever the chunk rate.
                        reply.flush = loop.call_later(FLUSH_SECONDS, flush)
                notify(reply, (kind, text))
        end_reply(db, reply, "complete")
    except PoeFailure as exc:
        reply.error = (exc.status, exc.detail)
        end_reply(db, reply, "interrupted")
    except asyncio.CancelledError:
        # Stopped, or the conversation deleted, or the server shutting down.
        end_reply(db, reply, "interrupted")
        raise
    except Exception as exc:
        log.exception("reply to conversation %s failed", reply.conversation_id)
        # A database that refuses the write is ours to answer for; anything else came out of
        # reading Poe's answer.
        reply.error = ((500, "the reply could not be saved") if isinstance(exc, sqlite3.Error)
                       else (502, "Poe's answer could not be read"))
        with contextlib.suppress(Exception):
            end_reply(db, reply, "interrupted")
    finally:
        if app.state.replies.get(reply.conversation_id) is reply:
            del app.state.replies[reply.conversation_id]
        reply.done.set()


def save_reply_start(db: sqlite3.Connection, reply: Reply) -> None:
    with transaction(db):
        if reply.user_message is not None:
            db.execute("INSERT INTO messages (conversation_id, role, content) VALUES (?, ?, ?)",
                       (reply.conversation_id, *reply.user_message))
        reply.message_id = db.execute(
            "INSERT INTO messages (conversation_id, role, content, status) "
            "VALUES (?, 'assistant', ?, ?)",
            (reply.conversation_id, reply.text, reply.status)).lastrowid
        db.execute(f"UPDATE conversations SET updated_at = {NOW_SQL} WHERE id = ?",
                   (reply.conversation_id,))
    reply.saved_chunks = len(reply.chunks)
    reply.rewrite = False


def save_reply_text(db: sqlite3.Connection, reply: Reply, status: str) -> None:
    if reply.rewrite:
        db.execute("UPDATE messages SET content = ?, status = ? WHERE id = ?",
                   (reply.text, status, reply.message_id))
    else:
        db.execute("UPDATE messages SET content = content || ?, status = ? WHERE id = ?",
                   ("".join(reply.chunks[reply.saved_chunks:]), status, reply.message_id))
    reply.saved_chunks = len(reply.chunks)
    reply.rewrite = False


def end_reply(db: sqlite3.Connection, reply: Reply, status: str) -> None:
    """Writes the reply's end and tells the listener. A reply that failed before any text
    leaves no trace: the user message is not kept."""
    reply.status = status
    if reply.flush is not None:
        reply.flush.cancel()
        reply.flush = None
    if reply.error is not None and reply.message_id is not None:
        # Cut off part way: what arrived is kept; the caller hears 502 (504 on a timeout).
        reply.error = (504 if reply.error[0] == 504 else 502, reply.error[1])
    if reply.conversation_id is not None:
        if reply.message_id is not None:
            save_reply_text(db, reply, status)
        elif reply.error is None:
            save_reply_start(db, reply)
    if reply.error is not None:
        notify(reply, ("error", *reply.error))
    else:
        notify(reply, ("end", reply.message_id, status))


async def stop_reply(reply: Reply) -> None:
    """Ends a reply in progress; its text so far is kept, 'interrupted'."""
    if reply.task is not None and not reply.task.done():
        reply.task.cancel()
        await asyncio.wait([reply.task])


class EventStream(EventSourceResponse):
    """sse-starlette's response without its per-event anyio cancel scope, which it opens even
    when there is no send timeout (ours): a measurable share of the CPU per relayed chunk."""

    async def _send_with_timeout(self, send: Any, message: dict) -> None:
        if self.send_timeout is not None:
            return await super()._send_with_timeout(send, message)
        await send(message)


dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# The conversation stream keeps the seed's spacing, as API.md shows it: data: {"content": "..."}
seed_dumps = json.JSONEncoder(ensure_ascii=False).encode


def sse(data: str) -> bytes:
    """One server-sent event, encoded once: JSON has no raw newlines, so one data line does, and
    sse-starlette passes bytes through untouched."""
    return b"data: " + data.encode() + b"\n\n"


SSE_DONE = sse("[DONE]")


# ---------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------

OTHER_GROUP = "其它"


def get_conversation(db: sqlite3.Connection, conversation_id: str) -> dict:
    conversation = fetch_one(db, "SELECT * FROM conversations WHERE id = ?", (conversation_id,))
    if conversation is None:
        raise HTTPException(404, "Conversation not found")
    return conversation


def check_project(db: sqlite3.Connection, project_id: int) -> int | None:
    """The stored form of a project_id: NULL for 0, else an existing project's id."""
    if project_id == 0:
        return None
    if fetch_one(db, "SELECT id FROM projects WHERE id = ?", (project_id,)) is None:
        raise HTTPException(404, "Project not found")
    return project_id


async def create_conversation(request: Request) -> JSONResponse:
    data = await read_json(request)
    system_prompt = text_field(data, "system_prompt")
    name = text_field(data, "name")
    model = model_field(data)
    project_id = int_field(data, "project_id")
    db = request.app.state.db
    stored_project = check_project(db, 0 if project_id in (MISSING, None) else project_id)
    system_prompt = system_prompt if isinstance(system_prompt, str) and system_prompt else None
    conversation_id = str(uuid.uuid4())
    with transaction(db):
        db.execute("INSERT INTO conversations (id, system_prompt, project_id, name, model) "
                   "VALUES (?, ?, ?, ?, ?)",
                   (conversation_id, system_prompt, stored_project,
                    None if name is MISSING else name, None if model is MISSING else model))
        if system_prompt is not None:
            db.execute("INSERT INTO messages (conversation_id, role, content) "
                       "VALUES (?, 'system', ?)", (conversation_id, system_prompt))
    return JSONResponse({"conversation_id": conversation_id})


async def grouped_conversations(request: Request) -> JSONResponse:
    rows = fetch_all(request.app.state.db, """
        SELECT c.id AS conversation_id, c.system_prompt, c.created_at,
               coalesce(c.project_id, 0) AS project_id, p.name AS project_name, c.name, c.model
        FROM conversations c LEFT JOIN projects p ON p.id = c.project_id
        ORDER BY c.created_at DESC, c.rowid DESC""")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["project_name"] or OTHER_GROUP, []).append(row)
    return JSONResponse(groups)


async def update_conversation(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    data = await read_json(request)
    changes: dict[str, Any] = {}
    name = text_field(data, "name")
    model = model_field(data)
    project_id = int_field(data, "project_id")
    db = request.app.state.db
    if name is not MISSING:
        changes["name"] = name
    if model is not MISSING:
        changes["model"] = model
    if project_id not in (MISSING, None):
        changes["project_id"] = check_project(db, project_id)
    if not changes:
        raise HTTPException(400, "give at least one of project_id, name, model")
    get_conversation(db, conversation_id)
    # Column names come from the fixed set above, never from the request.
    assignments = ", ".join(f"{column} = :{column}" for column in changes)
    with transaction(db):
        db.execute(f"UPDATE conversations SET {assignments}, updated_at = {NOW_SQL} "
                   "WHERE id = :id", {**changes, "id": conversation_id})
    return JSONResponse({"message": "Conversation updated"})


async def delete_conversation(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    db = request.app.state.db
    get_conversation(db, conversation_id)
    # A reply in progress is stopped first (another may start while we wait for it to end).
    while (reply := request.app.state.replies.get(conversation_id)) is not None:
        await stop_reply(reply)
    with transaction(db):
        db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
    return JSONResponse({"message": "Conversation deleted"})


async def list_messages(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    db = request.app.state.db
    get_conversation(db, conversation_id)
    messages = fetch_all(db, "SELECT id, role, content, created_at, status FROM messages "
                             "WHERE conversation_id = ? ORDER BY id", (conversation_id,))
    return JSONResponse({"conversation_id": conversation_id, "messages": messages})


async def post_message(request: Request) -> Any:
    app = request.app
    conversation_id = request.path_params["conversation_id"]
    data = await read_json(request)
    role = text_field(data, "role", nullable=False)
    role = "user" if role is MISSING else role
    if role not in ("user", "system", "assistant"):
        raise HTTPException(400, "role must be one of user, system, assistant")
    content = text_field(data, "content", required=True, empty_ok=False)
    model = model_field(data)
    stream = bool_field(data, "stream", False)
    db = app.state.db
    conversation = get_conversation(db, conversation_id)
    api_key = poe_key(request)
    if conversation_id in app.state.replies:
        raise HTTPException(409, "this conversation already has a reply in progress")
    if not isinstance(model, str):
        model = conversation["model"] or app.state.settings["default_model"]
    history = [(row["role"], row["content"]) for row in db.execute(
        "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id",
        (conversation_id,))]
    history.append((role, content))
    reply = start_reply(app, conversation_id=conversation_id, user_message=(role, content),
                        model=model, history=history, api_key=api_key, listen=stream)
    if not stream:
        await reply.done.wait()
        if reply.error is not None:
            raise HTTPException(*reply.error)
        body = {"conversation_id": conversation_id, "reply": reply.text,
                "message_id": reply.message_id}
        if reply.status != "complete":
            body["status"] = reply.status
        return JSONResponse(body)
    # The stream begins only once Poe's first text (or the reply's end) is in hand, so that a
    # failure before it is an ordinary JSON error with its status.
    first = await reply.listener.get()
    if first[0] == "error":
        reply.listener = None
        raise HTTPException(first[1], first[2])
    return EventStream(conversation_events(reply, first), sep="\n")


async def listen(reply: Reply, item: tuple) -> AsyncIterator[tuple]:
    """The reply's events for the response that started it, from `item` (already taken from
    the queue) to its end or error, inclusive."""
    queue = reply.listener
    try:
        while True:
            yield item
            if item[0] in ("end", "error"):
                return
            item = await queue.get()
    finally:
        reply.listener = None


async def conversation_events(reply: Reply, first: tuple) -> AsyncIterator[bytes]:
    async for item in listen(reply, first):
        kind = item[0]
        if kind == "text":
            yield sse(seed_dumps({"content": item[1]}))
        elif kind == "replace":
            yield sse(seed_dumps({"content": item[1], "replace": True}))
        elif kind == "end":
            end = {"content": "", "finish_reason": "stop", "message_id": item[1]}
            if item[2] != "complete":
                end["status"] = item[2]
            yield sse(seed_dumps(end))
        else:
            yield sse(seed_dumps({"error": {"message": item[2], "status": item[1]}}))
    yield SSE_DONE


async def stop_conversation(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    get_conversation(request.app.state.db, conversation_id)
    reply = request.app.state.replies.get(conversation_id)
    if reply is None:
        return JSONResponse({"stopped": False})
    await stop_reply(reply)
    return JSONResponse({"stopped": True})


# ---------------------------------------------------------------------------------------------
# Projects
# ---------------------------------------------------------------------------------------------

PROJECT_FIELDS = ("name", "dev_environment", "grpc_server_address", "llm_model", "llm_url")


def get_project(db: sqlite3.Connection, project_id: int) -> dict:
    project = fetch_one(db, "SELECT * FROM projects WHERE id = ?", (project_id,))
    if project is None:
        raise HTTPException(404, "Project not found")
    return project


def project_changes(data: dict) -> dict[str, Any]:
    changes = {}
    for name in PROJECT_FIELDS:
        value = text_field(data, name, empty_ok=name != "name",
                           nullable=name in ("llm_model", "llm_url"))
        if value is not MISSING:
            changes[name] = value
    return changes


def save_project(db: sqlite3.Connection, sql: str, params: dict) -> int:
    try:
        with transaction(db):
            return db.execute(sql, params).lastrowid
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" not in str(exc):
            raise
        raise HTTPException(409, "a project with this name already exists") from None


async def list_projects(request: Request) -> JSONResponse:
    return JSONResponse(fetch_all(request.app.state.db,
                                  "SELECT * FROM projects ORDER BY updated_time DESC, id DESC"))


async def create_project(request: Request) -> JSONResponse:
    changes = project_changes(await read_json(request))
    if "name" not in changes:
        raise HTTPException(400, "name is required")
    db = request.app.state.db
    columns = ", ".join(changes)
    values = ", ".join(f":{column}" for column in changes)
    project_id = save_project(db, f"INSERT INTO projects ({columns}) VALUES ({values})", changes)
    return JSONResponse(get_project(db, project_id))


async def read_project(request: Request) -> JSONResponse:
    project_id = path_id(request, "project_id", "Project not found")
    return JSONResponse(get_project(request.app.state.db, project_id))


async def update_project(request: Request) -> JSONResponse:
    project_id = path_id(request, "project_id", "Project not found")
    changes = project_changes(await read_json(request))
    if not changes:
        raise HTTPException(400, "give at least one of " + ", ".join(PROJECT_FIELDS))
    db = request.app.state.db
    get_project(db, project_id)
    assignments = ", ".join(f"{column} = :{column}" for column in changes)
    save_project(db, f"UPDATE projects SET {assignments}, updated_time = {NOW_SQL} "
                     "WHERE id = :id", {**changes, "id": project_id})
    return JSONResponse(get_project(db, project_id))


async def delete_project(request: Request) -> JSONResponse:
    project_id = path_id(request, "project_id", "Project not found")
    db = request.app.state.db
    get_project(db, project_id)
    if fetch_one(db, "SELECT 1 FROM plan_documents WHERE project_id = ? LIMIT 1", (project_id,)):
        raise HTTPException(409, "the project still has plan documents; delete them first")
    with transaction(db):
        # Its conversations move to project 0 (ON DELETE SET NULL).
        db.execute("DELETE FROM projects WHERE id = ?", (project_id,))
    return JSONResponse({"message": "Project deleted successfully"})


# ---------------------------------------------------------------------------------------------
# Plan: categories (seeded by schema.sql) and versioned documents
# ---------------------------------------------------------------------------------------------

DOCUMENT_SOURCES = ("user", "server", "chat")


async def list_categories(request: Request) -> JSONResponse:
    categories = fetch_all(request.app.state.db, "SELECT * FROM plan_categories ORDER BY id")
    for category in categories:
        category["is_builtin"] = bool(category["is_builtin"])
    return JSONResponse(categories)


async def create_document(request: Request) -> JSONResponse:
    data = await read_json(request)
    project_id = int_field(data, "project_id", required=True, minimum=1)
    category_id = int_field(data, "category_id", required=True, minimum=1)
    filename = text_field(data, "filename", required=True, empty_ok=False)
    content = text_field(data, "content", required=True, empty_ok=False)
    version = int_field(data, "version", minimum=1)
    source = text_field(data, "source")
    source = "user" if source in (MISSING, None) else source
    if source not in DOCUMENT_SOURCES:
        raise HTTPException(400, "source must be one of " + ", ".join(DOCUMENT_SOURCES))
    related_log_id = int_field(data, "related_log_id")
    db = request.app.state.db
    get_project(db, project_id)
    if fetch_one(db, "SELECT id FROM plan_categories WHERE id = ?", (category_id,)) is None:
        raise HTTPException(404, "Category not found")
    key = (project_id, category_id, filename)
    with transaction(db):
        if version in (MISSING, None):
            version = db.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM plan_documents "
                "WHERE project_id = ? AND category_id = ? AND filename = ?", key).fetchone()[0]
        elif db.execute("SELECT 1 FROM plan_documents WHERE project_id = ? AND category_id = ? "
                        "AND filename = ? AND version = ?", (*key, version)).fetchone():
            raise HTTPException(409, f"version {version} of this document already exists")
        document_id = db.execute(
            "INSERT INTO plan_documents (project_id, category_id, filename, content, version, "
            "source, related_log_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*key, content, version, source,
             None if related_log_id is MISSING else related_log_id)).lastrowid
    return JSONResponse(get_document(db, document_id))


def get_document(db: sqlite3.Connection, document_id: int) -> dict:
    document = fetch_one(db, "SELECT * FROM plan_documents WHERE id = ?", (document_id,))
    if document is None:
        raise HTTPException(404, "Document not found")
    return document


def query_int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not is_number(raw):
        raise HTTPException(400, f"{name} must be a positive integer")
    return int(raw)


async def list_documents(request: Request) -> JSONResponse:
    filters = {"project_id": query_int(request, "project_id"),
               "category_id": query_int(request, "category_id"),
               "filename": request.query_params.get("filename") or None}
    # Column names come from the fixed dict above, never from the request.
    where = " AND ".join(f"{column} = :{column}" for column, value in filters.items()
                         if value is not None) or "1"
    return JSONResponse(fetch_all(request.app.state.db,
                                  f"SELECT * FROM plan_documents WHERE {where} "
                                  "ORDER BY created_time DESC, id DESC", filters))


async def read_document(request: Request) -> JSONResponse:
    document_id = path_id(request, "document_id", "Document not found")
    return JSONResponse(get_document(request.app.state.db, document_id))


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible: stateless, for any client that speaks OpenAI's Chat Completions
# ---------------------------------------------------------------------------------------------

# The Poe bot names /v1/models lists (the README documents the same); any other bot name is
# accepted by /v1/chat/completions too.
MODELS = ("GPT-4o", "GPT-4o-Mini", "GPT-4.1", "o3-mini", "Claude-Sonnet-4", "Claude-3.5-Sonnet",
          "Claude-3.5-Haiku", "Gemini-2.5-Pro", "Gemini-2.0-Flash", "Llama-3.1-405B",
          "DeepSeek-R1", "Grok-3")
MODELS_CREATED = 1735689600  # 2025-01-01, a fixed date: Poe does not say when a bot was made
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user",
                "assistant": "assistant"}
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                      402: "insufficient_quota", 403: "permission_error", 404: "not_found_error",
                      409: "conflict_error", 413: "invalid_request_error",
                      429: "rate_limit_error", 500: "server_error", 502: "api_error",
                      504: "timeout_error"}


def openai_error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "api_error"),
                      "code": status}}


def openai_history(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise HTTPException(400, "messages must be a non-empty array")
    history = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise HTTPException(400, f"{where} must be an object")
        role = message.get("role")
        if role in ("tool", "function"):
            raise HTTPException(400, f"{where}: tool and function messages are not supported")
        if role not in OPENAI_ROLES:
            raise HTTPException(400, f"{where}.role must be one of system, developer, user, "
                                     "assistant")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else None
                    raise HTTPException(400, f"{where}.content: only text parts are supported"
                                             + (f", not {kind!r}" if isinstance(kind, str)
                                                else ""))
                texts.append(text_field(part, "text", required=True))
            content = "\n".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise HTTPException(400, f"{where}.content must be a string or an array of text "
                                     "parts")
        text_field({"content": content}, "content")
        history.append((OPENAI_ROLES[role], content))
    return history


def openai_params(data: dict) -> dict:
    params: dict[str, Any] = {}
    for name in ("tools", "functions"):
        if data.get(name):
            raise HTTPException(400, f"{name} are not supported")
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise HTTPException(400, "n must be a positive integer")
    if isinstance(n, int) and n > 1:
        raise HTTPException(400, "n > 1 is not supported: Poe gives one reply per call")
    temperature = data.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 <= temperature <= 2:
            raise HTTPException(400, "temperature must be a number from 0 to 2")
        params["temperature"] = float(temperature)
    stop = data.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise HTTPException(400, "stop must be a string or an array of strings")
        for s in stop:
            text_field({"stop": s}, "stop")
        params["stop_sequences"] = stop
    return params


def estimate_tokens(text: str) -> int:
    # Poe reports no token counts; about four characters a token is OpenAI's own rule of thumb.
    return (len(text) + 3) // 4


def usage(prompt_tokens: int, reply_text: str) -> dict:
    completion_tokens = estimate_tokens(reply_text)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def chat_completions(request: Request) -> Any:
    api_key = poe_key(request)
    data = await read_json(request)
    model = model_field(data)
    if not isinstance(model, str):
        raise HTTPException(400, "model is required: the name of a Poe bot")
    history = openai_history(data.get("messages"))
    params = openai_params(data)
    stream = bool_field(data, "stream", False)
    options = data.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    reply = start_reply(request.app, conversation_id=None, user_message=None, model=model,
                        history=history, api_key=api_key, listen=stream, **params)
    completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                  "model": model}
    prompt_tokens = sum(estimate_tokens(content) for _, content in history)
    if not stream:
        await reply.done.wait()
        if reply.error is not None:
            raise HTTPException(*reply.error)
        text = reply.text
        return JSONResponse({
            **completion, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": usage(prompt_tokens, text)})
    first = await reply.listener.get()
    if first[0] == "error":
        raise HTTPException(first[1], first[2])
    return EventStream(completion_chunks(reply, first, completion,
                                         prompt_tokens if include_usage else None), sep="\n")


async def completion_chunks(reply: Reply, first: tuple, completion: dict,
                            prompt_tokens: int | None) -> AsyncIterator[bytes]:
    head = dumps({**completion, "object": "chat.completion.chunk"})[:-1]

    def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse(f'{head},"choices":[{dumps(choice)}]}}')

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for item in listen(reply, first):
            kind = item[0]
            if kind == "text":
                yield chunk({"content": item[1]})
            elif kind == "replace":
                # OpenAI's deltas only append; the flag tells clients that know it.
                yield chunk({"content": item[1], "replace": True})
            elif kind == "end":
                yield chunk({}, "stop")
                if prompt_tokens is not None:
                    yield sse(f'{head},"choices":[],'
                              f'"usage":{dumps(usage(prompt_tokens, reply.text))}}}')
            else:
                yield sse(dumps(openai_error(item[1], item[2])))
        yield SSE_DONE
    finally:
        if reply.task is not None and not reply.task.done():
            reply.task.cancel()  # stateless: nobody is left to read the rest


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [
        {"id": model, "object": "model", "created": MODELS_CREATED, "owned_by": "poe"}
        for model in MODELS]})


# ---------------------------------------------------------------------------------------------
# Health, errors
# ---------------------------------------------------------------------------------------------

async def health(request: Request) -> JSONResponse:
    try:
        request.app.state.db.execute("SELECT 1").fetchone()
    except sqlite3.Error:
        return JSONResponse({"status": "error", "database": "unavailable"}, 503)
    return JSONResponse({"status": "ok", "database": "ok",
                         "replies_in_progress": len(request.app.state.replies)})


def error_response(request: Request, status: int, detail: str,
                   headers: dict | None = None) -> JSONResponse:
    if request.url.path in OPENAI_PATHS:
        return JSONResponse(openai_error(status, detail), status, headers=headers)
    return JSONResponse({"detail": detail}, status, headers=headers)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(request, exc.status_code, exc.detail, exc.headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s: %s", request.method, request.url.path,
              type(exc).__name__)
    return error_response(request, 500, "internal error")


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

routes = [
    Route("/health", health, methods=["GET"]),
    Route("/v1/chat/conversations", create_conversation, methods=["POST"]),
    Route("/v1/chat/conversations/grouped", grouped_conversations, methods=["GET"]),
    Route("/v1/chat/conversations/{conversation_id}", update_conversation, methods=["PUT"]),
    Route("/v1/chat/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
    Route("/v1/chat/conversations/{conversation_id}/messages", list_messages, methods=["GET"]),
    Route("/v1/chat/conversations/{conversation_id}/messages", post_message, methods=["POST"]),
    Route("/v1/chat/conversations/{conversation_id}/stop", stop_conversation, methods=["POST"]),
    Route("/v1/projects", list_projects, methods=["GET"]),
    Route("/v1/projects", create_project, methods=["POST"]),
    Route("/v1/projects/{project_id}", read_project, methods=["GET"]),
    Route("/v1/projects/{project_id}", update_project, methods=["PUT"]),
    Route("/v1/projects/{project_id}", delete_project, methods=["DELETE"]),
    Route("/v1/plan/categories", list_categories, methods=["GET"]),
    Route("/v1/plan/documents", list_documents, methods=["GET"]),
    Route("/v1/plan/documents", create_document, methods=["POST"]),
    Route("/v1/plan/documents/{document_id}", read_document, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings = app.state.settings
    app.state.db = open_db(settings["db_path"])
    app.state.replies = {}
    app.state.reply_tasks = set()
    timeout = settings["poe_timeout"]
    app.state.poe = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        event_hooks={"response": [remember_poe_status]})
    try:
        yield
    finally:
        # Replies still running are cut off: what they have is saved, 'interrupted'.
        tasks = list(app.state.reply_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.state.poe.aclose()
        app.state.db.close()


def create_app(**settings: Any) -> Starlette:
    """The ASGI app. Keyword arguments override the environment: db_path, poe_base_url,
    poe_api_key, default_model, poe_timeout, max_body_bytes, cors_origins."""
    settings = load_settings(**settings)
    middleware = []
    if settings["cors_origins"]:
        middleware.append(Middleware(CORSMiddleware, allow_origins=settings["cors_origins"],
                                     allow_methods=["*"], allow_headers=["*"]))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.settings = settings
    return app


app = create_app()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Poe proxy with memory")
    parser.add_argument("--host", help="bind address (HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (PORT, default 8000)")
    parser.add_argument("--db", help="SQLite file (DB_PATH, default chat.db)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per Poe call is noise
    service = create_app(host=args.host, port=args.port, db_path=args.db)
    settings = service.state.settings
    # Everything imported so far (fastapi_poe, pydantic's schemas...) lives as long as the
    # process: keep the cyclic collector from walking it again and again.
    gc.collect()
    gc.freeze()
    uvicorn.run(service, host=settings["host"], port=settings["port"],
                timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
