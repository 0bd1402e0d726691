"""Poe proxy with memory: Poe's bots over plain HTTP and an OpenAI-style API, with the
conversations, projects and plan documents kept in a local SQLite file.

The HTTP contract is API.md, documented for users in docs/API.md. The sections, in file
order, and what each owns:

  Settings            Settings (a dataclass), load_settings(): flag > env > .env > default
  Database            Database (a writer, readers, long readers: the loop never calls SQLite),
                      transaction, fetch_or_404, insert_row, update_row, touch_conversation;
                      the schema's upgrade steps (MIGRATIONS, prepare_database)
  Request helpers     off_loop and let_go (long work on a worker thread), read_json (read_body,
                      body_coding, BodyDecoder: compressed bodies), text_field, int_field,
                      id_list_field, ..., given, query_limit, the {name:id} path convertor,
                      read_answer/write_answer, row_endpoint, poe_key
  Poe relay           relay_poe (the one call to Poe; RelayFeed: its items handed on as each
                      read arrives), PoeFailure and what Poe's statuses and error events mean,
                      PoeQuery (its JSON, built off the loop by prepare_query or
                      plain_query), query_body, open_poe; after_poe (what follows a call's end,
                      in PoeChores: app.state.poe_chores): drain, report_to_poe
  Poe's budget        PoeBudget (app.state.poe_budget: the shared rate budget every call takes a
                      slot of)
  Poe's events        PoeEventReader (Poe's server-sent events read as they arrive),
                      CutLongTextEvents
  Poe's connections   PoeClient (app.state.poe: httpx's client, and open(), the relay's way
                      straight to its transport), PoeTransport, PoeConnection, PoeBody (push:
                      the body fed to the relay in the connection's own read)
  Replies             Reply (one Poe reply in progress: its text, its saving, its Listener),
                      Replies (app.state.replies: the registry, claim(), the flushes, the
                      unsaved ends), ReplyEnd
  Reply streams       Listener (its fast lane: RawBody), EventStream, SentText (what a
                      streaming client has), sse()
  Conversations       /v1/chat/conversations...
  Messages and turns  .../messages, stop, regenerate, delete (forget_message: what a deleted
                      message leaves elsewhere); load_turn (begin_turn: a plain turn read and
                      stored in one write), poe_entries, fit_history
  Memory              estimate_tokens, Budget (model_budget, turn_sizes: a model's window),
                      stored_context (context_rows: a long history read from both ends),
                      compaction (plan_turn, fit_turn, summary_transcript, summarise,
                      insert_summary, require_read_intact: nothing deleted meanwhile),
                      SummaryCovers (summarized_by), forget_summaries_covering, .../compact
  Projects            /v1/projects...
  Plan                /v1/plan/categories..., /v1/plan/documents... (versions, tags, merge)
  Knowledge           document references of projects and conversations
  Source code         /v1/projects/{id}/complete-source-code (SourceText, GitIgnore): a
                      project's files as one text; open_below (never through a symlink),
                      shown (a name that is not UTF-8, as text)
  Source code, writing  /v1/write-source-code (SourceWriter, writable_root, plan_blocks): a
                      model's plan of file steps carried out in a project's folder, confined;
                      EventPipe (its events to the stream, bounded: the worker waits)
  OpenAI input        OpenAI's messages, content parts, tools and options, checked for Poe
  Chat completions    /v1/chat/completions (Completion, ClientToolCalls), /v1/models (ModelList:
                      Poe's list, each model's context window)
  OpenAI Responses    /v1/responses... (ResponseSpec, StoredHistory, ResponseTurn)
  Responses memory    truncation and context_management (plan_response, fit_response,
                      response_query; stored_read: what a summariser read of the stored
                      history, for require_read_intact), compaction items (CompactionSeal:
                      app.state.seal), compaction_trigger, /v1/responses/compact
  OpenAI Conversations  /v1/conversations..., messages as items
  Search, export, backup  /v1/search, .../export, /v1/backup
  Health, login, errors, access  LoopWatch, /health, /v1/auth/login, the error handlers and
                      the middleware guarding Host, access keys and JSON bodies
  The app             ENDPOINTS and routes (in this order; MethodRoute: a 405's Allow), the
                      lifespan (all of app.state), App and RequestTiming (the Server-Timing
                      header), create_app()
  Main                GuardedHttpProtocol (LaterLog: its access line made after the head), the
                      backup command, serve(): uvicorn with an orderly shutdown, LogsAside (log
                      lines written by a thread of their own)
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import codecs
import collections
import contextlib
import contextvars
import dataclasses
import datetime
import email.utils
import errno
import fnmatch
import gc
import hmac
import itertools
import json
import logging
import math
import mimetypes
import os
import queue
import re
import secrets
import shutil
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator

import fastapi_poe as fp
from fastapi_poe.client import PROTOCOL_VERSION
import httptools
import httpx
import zstandard
from starlette.applications import Starlette
from starlette.config import Config
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.background import BackgroundTask
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Match, Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("poe_proxy")

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "schema.sql")

# ---------------------------------------------------------------------------------------------
# Settings: a flag beats its env var, an env var beats a line in ./.env, which beats the default.

# A reply's new text is written in one batch this long after it arrives (and at start and end).
FLUSH_SECONDS = 0.5

# Poe bot names are letters, digits, '.', '-' and '_'; the name becomes part of the URL.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# What the original's clients send to have a long answer continued (the original's own list:
# two of them hold commas, so CONTINUE_PROMPTS, comma-separated, replaces rather than extends).
ORIGINAL_CONTINUE_PROMPTS = [
    "continue", "继续", "go on",
    "continue, and mark [to be continue] at the last line of your replay if your output is NOT "
    "over and wait user's command to be continued",
    "Go on. If an incomplete code block (```) exists from the previous dialogue, find the first "
    "step where it occurred. From that point on, regenerate all subsequent steps in the correct "
    "format. Skip any steps that were already properly completed.",
]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# CORS by default: pages served from this machine (the original's web, H5 and Dev-Docs clients
# run on Vite dev servers such as http://localhost:5173), any port.
LOOPBACK_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


@dataclass(frozen=True)
class Settings:
    """The service's settings (docs/API.md "Settings"): each from a flag or create_app's argument,
    else its environment variable (the name in capitals), else a line of ./.env (both read by
    Starlette's Config; empty counts as unset), else the default here. Lists: comma-separated."""
    host: str = "127.0.0.1"
    port: int = 8000
    db_path: str = "chat.db"
    poe_api_key: str | None = None
    access_keys: tuple = ()
    poe_base_url: str = "https://api.poe.com/bot/"
    poe_upload_url: str = "https://www.quora.com/poe_api/"
    poe_models_url: str = "https://api.poe.com/v1/models"
    default_model: str = "GPT-4o"
    poe_timeout: float = 120.0
    max_body_bytes: int = 33554432
    max_context_chars: int = 400000
    context_tokens: int = 128000  # a model's window when Poe's list gives none
    compact_model: str | None = None  # none: the turn's own model writes its summaries
    continue_prompts: tuple = ()  # none: ORIGINAL_CONTINUE_PROMPTS
    cors_origins: tuple = ()  # none: pages of this machine (LOOPBACK_ORIGINS)
    allowed_hosts: tuple = ()  # none: this machine's names when HOST is one of them, else any
    db_timeout: float = 5.0
    header_seconds: float = 10.0  # python server.py only: see GuardedHttpProtocol
    write_roots: tuple = ()  # none: /v1/write-source-code writes to projects' ai_work_dirs only
    poe_rate_limit: int = 500  # Poe calls per POE_RATE_WINDOW for the whole process; 0: no limit
    poe_queue_seconds: float = 30.0
    poe_rate_window: float = 60.0  # Poe counts a minute; shorter only for tests and benchmarks


SETTING_MINIMUMS = {"port": 0, "poe_timeout": 0.001, "max_body_bytes": 1,
                    "max_context_chars": 1, "context_tokens": 1, "db_timeout": 0.001,
                    "poe_rate_limit": 0, "poe_queue_seconds": 0, "poe_rate_window": 0.001,
                    "header_seconds": 0.001}


def setting(name: str, kind: str, raw: Any) -> Any:
    if kind == "tuple":
        values = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        return tuple(str(v).strip() for v in values if str(v).strip())
    if kind not in ("int", "float"):
        return str(raw)
    try:
        value = (int if kind == "int" else float)(raw)
    except (TypeError, ValueError):
        raise SystemExit(f"error: {name.upper()} must be a number, got {raw!r}") from None
    if value < SETTING_MINIMUMS[name]:
        raise SystemExit(f"error: {name.upper()} must be at least {SETTING_MINIMUMS[name]}, "
                         f"got {value}")
    return value


def load_settings(**overrides: Any) -> Settings:
    environ = {name: value for name, value in os.environ.items() if value != ""}
    try:
        config = Config(".env" if os.path.isfile(".env") else None, environ=environ)
    except (OSError, UnicodeDecodeError) as exc:
        log.warning(".env is left out: it cannot be read as UTF-8 text (%s)", exc)
        config = Config(None, environ=environ)
    values = {}
    for spec in dataclasses.fields(Settings):
        raw = overrides.get(spec.name)
        raw = config(spec.name.upper(), default=None) if raw is None else raw
        if raw not in (None, ""):
            values[spec.name] = setting(spec.name, spec.type.split(" ")[0], raw)
    settings = Settings(**values)
    if settings.compact_model is not None and not MODEL_NAME.fullmatch(settings.compact_model):
        raise SystemExit(f"COMPACT_MODEL must be a Poe bot name, got {settings.compact_model!r}")
    relative = [root for root in settings.write_roots if not os.path.isabs(root)]
    if relative:  # it would hang on the folder the service happens to start in
        raise SystemExit(f"WRITE_ROOTS must hold absolute paths, got {relative[0]!r}")
    for name in ("poe_base_url", "poe_upload_url"):
        values[name] = getattr(settings, name).removesuffix("/") + "/"
    values["continue_prompts"] = tuple(p.casefold() for p in settings.continue_prompts
                                       or ORIGINAL_CONTINUE_PROMPTS)
    # "testserver" is TestClient's Host, for testing an embedded app; no browser visits that name.
    values["allowed_hosts"] = settings.allowed_hosts or (
        ("localhost", "127.0.0.1", "[::1]", "testserver") if settings.host in LOOPBACK_HOSTS
        else ("*",))
    return dataclasses.replace(settings, **values)


# ---------------------------------------------------------------------------------------------
# Database: the event loop never calls SQLite. Writes run one at a time on a writer thread (as
# SQLite runs them anyway), reads on a few reader threads, reads that may take long (search,
# export, backup, a whole history) on long-reader threads of their own; each thread has its own
# connection whose busy_timeout (DB_TIMEOUT) is the longest a request waits for a lock another
# program holds, before a 503. So a locked file, a slow disk or a long read stalls no other client.

NOW_SQL = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


class DatabaseUnusable(Exception):
    """The database file cannot be served: one line says why (main prints it and exits)."""


def contains_folded(text: str | None, folded: str) -> bool:
    """SQL's contains_folded(text, word): `folded` (casefolded) is in text, in any case."""
    return text is not None and folded in text.casefold()


def connect(db_path: str, timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=timeout)
    db.row_factory = sqlite3.Row
    db.create_function("contains_folded", 2, contains_folded, deterministic=True)
    db.execute("PRAGMA foreign_keys = ON")
    # In WAL mode NORMAL loses nothing on a process crash (kill -9), only on power loss.
    db.execute("PRAGMA synchronous = NORMAL")
    # What a user deletes is overwritten, not left in free pages (and in every backup copied).
    db.execute("PRAGMA secure_delete = ON")
    # A checkpointed WAL is cut back to this size, so it does not keep its largest size forever.
    db.execute("PRAGMA journal_size_limit = 67108864")
    return db


def fetch_one(db: sqlite3.Connection, sql: str, params: tuple | dict = ()) -> dict | None:
    return next(map(dict, db.execute(sql, params)), None)


def fetch_all(db: sqlite3.Connection, sql: str, params: tuple | dict = ()) -> list[dict]:
    return [dict(row) for row in db.execute(sql, params)]


def fetch_or_404(db: sqlite3.Connection, sql: str, params: tuple, not_found: str) -> dict:
    if (row := fetch_one(db, sql, params)) is None:
        raise HTTPException(404, not_found)
    return row


def insert_row(db: sqlite3.Connection, table: str, values: dict) -> int:
    """`table` and the column names are this module's, never a request's (fixed field lists)."""
    columns = ", ".join(values)
    marks = ", ".join(":" + column for column in values)
    return db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", values).lastrowid


def update_row(db: sqlite3.Connection, table: str, key: Any, changes: dict,
               stamp: str | None = None) -> None:
    """Sets `changes` (names as for insert_row) on row id `key`; `stamp`, if given, to now."""
    assignments = [f"{column} = :{column}" for column in changes]
    if stamp is not None:
        assignments.append(f"{stamp} = {NOW_SQL}")
    db.execute(f"UPDATE {table} SET {', '.join(assignments)} WHERE id = :id",
               {**changes, "id": key})


def touch_conversation(db: sqlite3.Connection, conversation_id: str,
                       updated_at: str | None = None) -> None:
    """Moves a conversation's updated_at: to now, or back to `updated_at`."""
    db.execute(f"UPDATE conversations SET updated_at = coalesce(?, {NOW_SQL}) WHERE id = ?",
               (updated_at, conversation_id))


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """BEGIN IMMEDIATE (or `begin`) ... COMMIT, rolled back when the block raises (anything at
    all)."""
    db.execute(begin)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def database_failure(exc: sqlite3.Error) -> HTTPException:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        detail = "the database is locked by another program; try again"
    elif code == sqlite3.SQLITE_FULL:
        detail = "the database cannot be written: the disk is full"
    else:
        detail = f"the database failed ({getattr(exc, 'sqlite_errorname', 'error')})"
    return HTTPException(503, detail, headers={"Retry-After": "1"})


class Database:
    """The SQLite file, reached only via worker threads: read(fn, *args) runs fn(connection, *args)
    on a reader (long=True: on a long reader, so that long reads never take every reader),
    write() on the writer in a transaction(), read_then_write() there too, in a transaction that
    takes the write lock at its first write only. SQLite's refusals (locked past DB_TIMEOUT, disk
    full...) are 503s, never the caller's fault; fn's HTTPExceptions pass."""

    def __init__(self, db_path: str, timeout: float, readers: int = 3):
        self.path, self.timeout = db_path, timeout
        self.local, self.connections = threading.local(), []
        self.writer = ThreadPoolExecutor(1, "db-writer", initializer=self._open)
        self.readers = ThreadPoolExecutor(readers, "db-reader", initializer=self._open)
        self.long_readers = ThreadPoolExecutor(readers, "db-long-reader", initializer=self._open)
        self.wrote = asyncio.Event()  # set by each write that goes through

    def _open(self) -> None:
        self.local.db = connect(self.path, self.timeout)
        self.connections.append(self.local.db)

    def _run(self, fn: Callable, args: tuple, begin: str | None,
             repaired: bool = False) -> Any:
        """fn in a transaction begun by `begin` (None: a read, none)."""
        try:
            with transaction(self.local.db, begin) if begin else contextlib.nullcontext():
                return fn(self.local.db, *args)
        except sqlite3.Error as exc:
            if begin == "BEGIN" and getattr(exc, "sqlite_errorcode", 0) & 0xFF == \
                    sqlite3.SQLITE_BUSY:
                # Its first write met another program's lock, which SQLite does not wait for
                # once a transaction has read: once more, waiting for the lock from the start.
                return self._run(fn, args, "BEGIN IMMEDIATE", repaired)
            if begin and not repaired and search_index_broke(exc):
                # Only the index is damaged: remade from the text, the write goes through.
                self._run(repair_search_index, (), "BEGIN IMMEDIATE", True)
                return self._run(fn, args, begin, True)
            raise database_failure(exc) from None

    async def read(self, fn: Callable, *args: Any, long: bool = False) -> Any:
        pool = self.long_readers if long else self.readers
        return await asyncio.get_running_loop().run_in_executor(pool, self._run, fn, args, None)

    def submit_write(self, fn: Callable, *args: Any, begin: str = "BEGIN IMMEDIATE"
                     ) -> asyncio.Future:
        """Queues a write; the returned future may be left unawaited (a reply's text)."""
        future = asyncio.get_running_loop().run_in_executor(self.writer, self._run, fn, args,
                                                            begin)
        future.add_done_callback(self.written)
        return future

    async def read_then_write(self, fn: Callable, *args: Any) -> Any:
        """write(), in a deferred transaction: what fn reads before it writes (or if it never
        does) waits for no other program's write lock; if its first write meets one, fn runs
        again in a write() that waits for it (fn must do nothing but SQL)."""
        return await self.submit_write(fn, *args, begin="BEGIN")

    def written(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.wrote.set()

    async def write(self, fn: Callable, *args: Any) -> Any:
        return await self.submit_write(fn, *args)

    def close(self) -> None:
        self.readers.shutdown(wait=True)
        self.long_readers.shutdown(wait=True)
        self.writer.shutdown(wait=True)
        for db in self.connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()


def schema_statements() -> list[str]:
    """schema.sql's statements, each without the comment lines before it."""
    statements, current = [], ""
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        for line in f:
            if not current and (not line.strip() or line.lstrip().startswith("--")):
                continue
            current += line
            if sqlite3.complete_statement(current):
                statements.append(current.strip())
                current = ""
    return statements


def rebuild_table(db: sqlite3.Connection, table: str, fill: dict[str, str] | None = None) -> None:
    """Gives an existing table schema.sql's definition (SQLite's 12-step way: new table, copy,
    drop, rename), keeping every row; `fill` gives SQL for new columns from old ones."""
    old_columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    create = f"CREATE TABLE IF NOT EXISTS {table} ("
    db.execute(next(s for s in schema_statements() if s.startswith(create))
               .replace(f"IF NOT EXISTS {table} (", f"{table}_new (", 1))
    new_columns = [row[1] for row in db.execute(f"PRAGMA table_info({table}_new)")]
    fill = fill or {}
    copied = [c for c in new_columns if c in old_columns or c in fill]
    sources = [c if c in old_columns else fill[c] for c in copied]
    db.execute(f"INSERT INTO {table}_new ({', '.join(copied)}) "
               f"SELECT {', '.join(sources)} FROM {table}")
    db.execute(f"DROP TABLE {table}")
    db.execute(f"ALTER TABLE {table}_new RENAME TO {table}")


def search_index_broke(exc: sqlite3.Error) -> bool:
    # The FTS5 tables are the only virtual tables the schema has.
    return getattr(exc, "sqlite_errorcode", 0) == sqlite3.SQLITE_CORRUPT_VTAB


def search_index_damaged(db: sqlite3.Connection) -> bool:
    """FTS5's integrity-check of both indexes against their tables (about 1 s a 100,000
    messages): a damaged page or a row indexed twice or not at all."""
    try:
        for table in ("messages_fts", "documents_fts"):
            db.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('integrity-check', 1)")
    except sqlite3.Error as exc:
        if not search_index_broke(exc):
            raise
        return True
    return False


def rebuild_search_index(db: sqlite3.Connection) -> None:
    """Both indexes made again from the stored text, without the replies still streaming, as
    the triggers keep them: such a reply is indexed when it ends, and must not be twice."""
    for table in ("messages_fts", "documents_fts"):
        db.execute(f"INSERT INTO {table} ({table}) VALUES ('rebuild')")
    db.execute("INSERT INTO messages_fts (messages_fts, rowid, content) "
               "SELECT 'delete', id, content FROM messages WHERE status = 'streaming'")


def repair_search_index(db: sqlite3.Connection) -> None:
    log.warning("the search index is damaged: rebuilding it from the stored text")
    rebuild_search_index(db)


def m002_clients_tools_search(db: sqlite3.Connection) -> None:
    """Conversations: assistance_role, status, metadata. Messages: updated_at, attachments,
    tool calls, the 'tool' role. Projects: git_work_dir, ai_work_dir. Categories: summary_model.
    New tables (tags, references, responses, search) come from schema.sql."""
    rebuild_table(db, "conversations")
    rebuild_table(db, "messages", fill={"updated_at": "created_at"})
    db.execute("ALTER TABLE projects ADD COLUMN git_work_dir TEXT")
    db.execute("ALTER TABLE projects ADD COLUMN ai_work_dir TEXT")
    db.execute("ALTER TABLE plan_categories ADD COLUMN summary_model TEXT")


def m003_summaries(db: sqlite3.Connection) -> None:
    """Messages: kind, covers_first, covers_last (compaction's summaries), unless m002 just
    made the table with them. The two triggers that kept the search index on an update become
    one (schema.sql: as two, SQLite ran them in the wrong order and an edit damaged the index;
    upgrade() rebuilds it). The summaries' index and server_secrets come from schema.sql."""
    have = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    for column in ("kind TEXT CHECK (kind IS NULL OR kind = 'summary')",
                   "covers_first INTEGER", "covers_last INTEGER"):
        if column.split()[0] not in have:
            db.execute(f"ALTER TABLE messages ADD COLUMN {column}")
    db.execute("DROP TRIGGER IF EXISTS messages_fts_update_old")
    db.execute("DROP TRIGGER IF EXISTS messages_fts_update_new")


# In PRAGMA user_version (the first release, version 1, left it 0); step N upgrades from N - 1.
SCHEMA_VERSION = 3
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {2: m002_clients_tools_search,
                                                               3: m003_summaries}


def check_columns(db: sqlite3.Connection) -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as scratch:
        for statement in schema_statements():
            scratch.execute(statement)
        tables = [row[0] for row in scratch.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND sql NOT LIKE 'CREATE VIRTUAL%'"
            " AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '%_fts%'")]
        for table in tables:
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            missing = sorted({r[1] for r in scratch.execute(f"PRAGMA table_info({table})")} - have)
            if missing:
                raise DatabaseUnusable(f"table {table} lacks column(s) {', '.join(missing)}")


def inspect_database(db_path: str) -> int:
    """The schema version of an existing file (0 for an empty one), read without writing to
    it; DatabaseUnusable when this release cannot serve it."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True,
                                            isolation_level=None, timeout=30)) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                       "name = 'messages'").fetchone():
            version = 1  # the first release did not number its schema
            with contextlib.suppress(DatabaseUnusable):
                check_columns(db)
                version = SCHEMA_VERSION  # today's tables: schema.sql applied by hand
        if version > SCHEMA_VERSION:
            raise DatabaseUnusable(
                f"{db_path} was made by a newer release (schema {version}; this one knows up "
                f"to {SCHEMA_VERSION}): use that release")
        if version == SCHEMA_VERSION:
            check_columns(db)
        return version


def upgrade(db: sqlite3.Connection, version: int) -> None:
    """Steps after `version` then schema.sql (alone when new), in one all-or-nothing transaction."""
    # Steps rebuild tables, so foreign keys stay off until the data is whole again.
    db.execute("PRAGMA foreign_keys = OFF")
    with transaction(db):
        for step in range(version + 1, SCHEMA_VERSION + 1) if version else ():
            MIGRATIONS[step](db)
        for statement in schema_statements():
            db.execute(statement)
        if version:
            rebuild_search_index(db)
        check_columns(db)
        if (broken := db.execute("PRAGMA foreign_key_check").fetchone()) is not None:
            raise DatabaseUnusable(f"table {broken[0]} has rows whose {broken[2]} is gone; "
                                   "the upgrade would lose them")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def check_file_path(path: str, what: str) -> None:
    """DatabaseUnusable, said plainly, when `path` cannot be a file: SQLite would only say
    "unable to open database file" or "disk I/O error"."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DatabaseUnusable(f"cannot use {path} as {what}: it is a directory")
    if not os.path.isdir(folder):
        raise DatabaseUnusable(f"cannot use {path} as {what}: the folder {folder} does not exist")


def prepare_database(db_path: str) -> None:
    """Makes or upgrades the database in place, in one transaction. An unusable file (not SQLite,
    corrupt, read-only, newer release, column missing): DatabaseUnusable, file left untouched."""
    check_file_path(db_path, "the database")
    try:
        exists = os.path.exists(db_path) and os.path.getsize(db_path) > 0
        version = inspect_database(db_path) if exists else 0
        with contextlib.closing(sqlite3.connect(db_path, isolation_level=None, timeout=30)) as db:
            # An unnumbered file of today's tables gets its number (and a rebuilt index) too.
            if version < SCHEMA_VERSION or not db.execute("PRAGMA user_version").fetchone()[0]:
                upgrade(db, version)
            elif search_index_damaged(db):
                with transaction(db):
                    repair_search_index(db)
            db.execute("PRAGMA journal_mode = WAL")
            # A reply still 'streaming' here was cut off by a crash: keep its text, say so.
            db.execute(f"UPDATE messages SET status = 'interrupted', updated_at = {NOW_SQL} "
                       "WHERE status = 'streaming'")
    except sqlite3.Error as exc:
        reason = str(exc)
        if "readonly" in reason or "read-only" in reason:
            reason = "the file is read-only"
        raise DatabaseUnusable(f"cannot use {db_path}: {reason}") from None


# ---------------------------------------------------------------------------------------------
# Request helpers: one way to read a body, to check each kind of field, to answer from SQLite.

MISSING = object()
INT64 = 2**63

# The longest a request body may pause between two pieces before the request is dropped (408).
BODY_STALL_SECONDS = 15.0
# Input this long is parsed, decoded or walked on a worker thread (off_loop), not on the loop.
LONG_BYTES, LONG_ITEMS = 2**20, 500
# JSON nested deeper than this is refused: no client's needs it, and the code that walks it
# (schemas, tool_choice, the stored response) would hit Python's recursion limit.
MAX_JSON_DEPTH = 128
# A body may come compressed (Content-Encoding): gzip, or zstd (Codex CLI sends zstd). One coding
# at most: a stack of them is refused (415), as no client sends one, and each layer would need
# bounds of its own. Names are case-insensitive; x-gzip is gzip's old name; identity is none.
BODY_CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "zstd": "zstd"}
# A compressed body is decoded as it arrives, at most this much input at a time, handed on in
# pieces of about this much, the loop free between pieces; decoding stops past MAX_BODY_BYTES.
DECODE_INPUT_BYTES, DECODE_PIECE_BYTES = 2**16, 2**18
# zstd is fed this many bytes at a time (its decompressobj has no max_length): a block yields at
# most 128 KiB and takes at least 4 bytes, so one step yields at most ~2 MiB, whatever a frame says.
ZSTD_STEP_BYTES = 64
# The largest zstd window decoded: the 8 MiB RFC 8878 asks every decoder to support (levels 1-19
# stay within it). A frame claiming more (a 1 KB frame may claim 10 GB) is 400, nothing allocated.
ZSTD_MAX_WINDOW = 2**23
# The most gzip members or zstd frames one body may hold (400 past it). Clients send one; each
# costs a decoder's setup, so a body of a million empty 9-byte frames would hold the loop for
# seconds: this bounds the work per byte as the other bounds do.
MAX_BODY_FRAMES = 4096


async def off_loop(long: bool, fn: Callable, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args) if long else fn(*args)


async def while_client_stays(receive: Callable | None, call: Awaitable) -> Any:
    """`call`'s result; cancelled, and 499 (nobody reads it), once the client is gone (its ASGI
    `receive` says so): a summary call that waits for the budget asks Poe nothing for nobody."""
    if receive is None:
        return await call
    task, watch = asyncio.ensure_future(call), asyncio.ensure_future(client_leaves(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its clean-up (a budget slot given back) done
    if task.cancelled():
        raise HTTPException(499, "the client went away while its turn was being summarised")
    return task.result()


async def let_go(*lists: list) -> None:
    """Empties lists that are all that holds a long history's rows, on a worker thread: the rows
    are freed there, not on the loop (100,000 of them take ~50 ms to free)."""
    if sum(map(len, lists)) >= LONG_ITEMS:
        await asyncio.to_thread(lambda: [held.clear() for held in lists])


async def read_json(request: Request, empty_ok: bool = False) -> dict:
    """The body as a JSON object ({} for none if `empty_ok`: every field optional); a large body
    parsed off-loop. A compressed body (Content-Encoding) is decoded first."""
    body = await read_body(request)
    if not body.strip() and empty_ok:
        return {}
    return await off_loop(len(body) >= LONG_BYTES, parse_json_body, bytes(body))


async def read_body(request: Request) -> bytearray:
    """The body, decoded as it arrives when compressed; 413 when it (sent or decoded) passes
    MAX_BODY_BYTES, without reading or decoding the rest; 408 when it stalls."""
    limit = request.app.state.settings.max_body_bytes
    too_large = HTTPException(413, f"request body is larger than {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and is_number(length.strip()) and int(length) > limit:
        raise too_large
    try:
        decoder = BodyDecoder(body_coding(request.headers))
    except ValueError as exc:
        raise HTTPException(415, str(exc)) from None
    body, received = bytearray(), 0
    try:
        async with asyncio.timeout(BODY_STALL_SECONDS) as stall:
            async for chunk in request.stream():
                stall.reschedule(asyncio.get_running_loop().time() + BODY_STALL_SECONDS)
                received += len(chunk)
                if received > limit:
                    raise too_large
                if decoder.coding is None:
                    body += chunk
                    continue
                for piece in decoder.feed(chunk):
                    if len(body) + len(piece) > limit:
                        raise too_large
                    body += piece
                    await asyncio.sleep(0)  # a big body's decoding does not hold the loop
    except ClientDisconnect:
        raise HTTPException(400, "the request body did not arrive whole") from None
    except TimeoutError:
        raise HTTPException(408, "the request body stalled") from None
    if received:
        decoder.finish()
    return body


def body_coding(headers: Headers) -> str | None:
    """The content coding the body was sent in (None: as is); ValueError, said for a 415, for
    a coding not served here or for several."""
    listed = ",".join(headers.getlist("content-encoding")).split(",")
    names = [name.strip().lower() for name in listed if name.strip().lower() != "identity"]
    names = [name for name in names if name]
    if len(names) > 1:
        raise ValueError("a body may be sent in one Content-Encoding at most (gzip or zstd), "
                         f"not {', '.join(names)[:100]}")
    if names and names[0] not in BODY_CODINGS:
        raise ValueError(f"Content-Encoding {names[0][:40]!r} is not served here: send the body "
                         "as is, or in gzip or zstd")
    return BODY_CODINGS[names[0]] if names else None


class BodyDecoder:
    """One request body's decoder (coding None: the body as is), fed the body as it arrives.
    A body may hold several gzip members or zstd frames, one after another."""

    def __init__(self, coding: str | None) -> None:
        self.coding, self.frames = coding, 0
        # One zstd context per body (its setup is the dear part), reset for each frame.
        self.zstd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW) \
            if coding == "zstd" else None
        self.stream = self.new_stream() if coding is not None else None

    def new_stream(self) -> Any:
        """The decoder of the body's next gzip member or zstd frame; 400 past MAX_BODY_FRAMES."""
        self.frames += 1
        if self.frames > MAX_BODY_FRAMES:
            kind = "gzip members" if self.coding == "gzip" else "zstd frames"
            raise HTTPException(400, f"the request body holds more than {MAX_BODY_FRAMES} "
                                     f"{kind}: send it as one")
        if self.coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return self.zstd.decompressobj()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes, a piece at a time: each from at most DECODE_INPUT_BYTES of `data`,
        of at most about DECODE_PIECE_BYTES (zstd: plus one step's); 400 for corrupt data."""
        view = memoryview(data)
        decode = self.gzip_pieces if self.coding == "gzip" else self.zstd_pieces
        try:
            for start in range(0, len(view), DECODE_INPUT_BYTES):
                yield from decode(view[start:start + DECODE_INPUT_BYTES])
        except (zlib.error, zstandard.ZstdError) as exc:
            raise HTTPException(400, f"the request body is not valid {self.coding} data: {exc}"
                                ) from None

    def gzip_pieces(self, data: Any) -> Iterator[bytes]:
        while True:
            piece = self.stream.decompress(data, DECODE_PIECE_BYTES)
            yield piece
            if self.stream.eof:  # a member ended: what follows it is the next member
                data = self.stream.unused_data
                if not data:
                    return
                self.stream = self.new_stream()
            elif self.stream.unconsumed_tail:
                data = self.stream.unconsumed_tail
            elif len(piece) < DECODE_PIECE_BYTES:
                return
            else:  # the output was cut at max_length: zlib may hold more of it
                data = b""

    def zstd_pieces(self, data: Any) -> Iterator[bytes]:
        piece, at = bytearray(), 0
        while at < len(data):
            if self.stream.eof:  # a frame ended: what follows it is the next frame
                self.stream = self.new_stream()
            step = data[at:at + ZSTD_STEP_BYTES]
            piece += self.stream.decompress(step)
            at += len(step) - (len(self.stream.unused_data) if self.stream.eof else 0)
            if len(piece) >= DECODE_PIECE_BYTES:
                yield bytes(piece)
                piece = bytearray()
        yield bytes(piece)

    def finish(self) -> None:
        """400 when the body ended inside a gzip member or zstd frame."""
        if self.coding is not None and not self.stream.eof:
            raise HTTPException(400, f"the request body's {self.coding} data is cut short")


def parse_json_body(body: bytes) -> dict:
    try:
        data = json.loads(body)
        # A JSON escape may name half of a surrogate pair ("\ud800"): no text, and nothing
        # SQLite, Poe or a socket could take. One C-speed pass finds any, wherever it hides.
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise HTTPException(400, "request body must be valid UTF-8 text: it holds a lone "
                                 "surrogate escape such as \\ud800") from None
    except (ValueError, RecursionError):
        raise HTTPException(400, "request body must be valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "request body must be a JSON object")
    level = [data]  # the containers one level down, MAX_JSON_DEPTH times
    for _ in range(MAX_JSON_DEPTH):
        level = [child for node in level for child in
                 (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
        if not level:
            break
    if level:
        raise HTTPException(400, f"request body must not be nested deeper than {MAX_JSON_DEPTH} "
                                 "levels")
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
    # Lone surrogates never get here: parse_json_body refuses any body that holds one.
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
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HTTPException(400, f"{name} must be an integer >= {minimum}")
    if value >= INT64:
        raise HTTPException(400, f"{name} must be an integer from {minimum} to {INT64 - 1}")
    return value


def id_list_field(data: dict, name: str, kind: str, required: bool = False) -> list[int]:
    """Ids of `kind` (integers >= 0), each once, in order; [] if not required and absent/null."""
    value = data.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v < INT64 for v in value):
        raise HTTPException(400, f"{name} must be an array of {kind} ids")
    return list(dict.fromkeys(value))


def bool_field(data: dict, name: str, default: bool) -> bool:
    if (value := data.get(name)) is None:
        return default
    if not isinstance(value, bool):
        raise HTTPException(400, f"{name} must be true or false")
    return value


def model_field(data: dict, name: str = "model", empty_ok: bool = False) -> Any:
    value = text_field(data, name)
    if isinstance(value, str) and not MODEL_NAME.fullmatch(value) and (value or not empty_ok):
        raise HTTPException(400, f"{name} must be a Poe bot name (letters, digits, '.', '-', '_')")
    return value


def optional_model(data: dict) -> str | None:
    """A model named for one request, or None ('' names none)."""
    model = model_field(data, empty_ok=True)
    return model if isinstance(model, str) and model else None


def is_number(raw: str) -> bool:
    """Plain ASCII digits that fit SQLite's 64-bit integers."""
    return raw.isascii() and raw.isdigit() and int(raw) < INT64


class IdConvertor(Convertor):
    """`{name:id}` in a route: the segment as an integer id. A segment that is no id (letters,
    a number past SQLite's integers) becomes -1, which names no row, so the handler
    answers its own 404 ("Project not found"), as for any id that names nothing."""
    regex = "[^/]+"

    def convert(self, value: str) -> int:
        return int(value) if is_number(value) else -1

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id", IdConvertor())


def query_int(request: Request, name: str, default: int | None = None) -> int | None:
    if not (raw := request.query_params.get(name)):
        return default
    if not is_number(raw):
        raise HTTPException(400, f"{name} must be a whole number, 0 or more")
    return int(raw)


def query_limit(request: Request, maximum: int, default: int | None = None) -> int | None:
    limit = query_int(request, "limit", default)
    if limit is not None and not 1 <= limit <= maximum:
        raise HTTPException(400, f"limit must be from 1 to {maximum}")
    return limit


def given(fields: dict, nullable: tuple = ()) -> dict:
    """Fields given: not MISSING, nor null unless `nullable` (null clears those; others stay)."""
    return {name: value for name, value in fields.items()
            if value is not MISSING and (value is not None or name in nullable)}


async def read_answer(request: Request, fn: Callable, *args: Any) -> JSONResponse:
    return JSONResponse(await request.app.state.db.read(fn, *args))


async def write_answer(request: Request, fn: Callable, *args: Any) -> JSONResponse:
    return JSONResponse(await request.app.state.db.write(fn, *args))


def row_endpoint(fn: Callable, write: bool = False) -> Callable:
    """A route's endpoint whose whole work is fn(db, *the path's values), answered as JSON."""
    async def endpoint(request: Request) -> JSONResponse:
        answer = write_answer if write else read_answer
        return await answer(request, fn, *request.path_params.values())
    return endpoint


def bearer(headers: Headers) -> str | None:
    header = headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def poe_key(request: Request) -> str:
    """The server's POE_API_KEY when set (a caller's token never reaches Poe then), else the
    caller's Bearer token, else 401. Never stored, logged or echoed."""
    if key := request.app.state.settings.poe_api_key:
        return key
    token = bearer(request.headers)
    if token == "":
        raise HTTPException(401, "Authorization must be 'Bearer <poe api key>'")
    if token is None:
        raise HTTPException(401, "no Poe API key: send 'Authorization: Bearer <poe api key>' "
                                 "or set POE_API_KEY on the server")
    if not token.isascii():  # no Poe key is; an HTTP header could not carry it to Poe
        raise HTTPException(401, "the Poe API key in Authorization is not ASCII: no Poe key is")
    return token


# ---------------------------------------------------------------------------------------------
# Poe relay: the one place that talks to Poe. One call per reply (no retry), each once it has a
# slot of the shared budget (PoeBudget), sent as fastapi_poe's client sends it and read as it
# arrives by a reader of our own; only text is reply text, every failure becomes a PoeFailure with
# the status of API.md's table (Poe's rate limit, either form, a 429).

# With a 502/504 after a Poe call: official SDKs retry 5xx, calling (and paying) Poe again.
NO_RETRY = {"x-should-retry": "false"}


class PoeFailure(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def on_poe_error(exc: Exception, message: str) -> None:
    """fastapi_poe's error handler (uploads): its default prints; these never carry the key."""
    log.warning("Poe: %s", str(exc)[:200])


ERROR_TYPE_STATUS = {
    "insufficient_fund": (402, "Poe says the account is out of compute points"),
    "user_caused_error": (400, "Poe refused the request"),
    "privacy_authorization_error": (403, "Poe refused the request for privacy authorization"),
    "user_message_too_long": (413, "Poe says the message is too long"),
}
HTTP_STATUS_FAILURE = {
    402: (402, "Poe says the account is out of compute points"),
    413: (413, "Poe says the message is too long"),
}
POE_RATE_LIMITED = "Poe is rate-limiting requests; try again later"
POE_BROKE_OFF = "Poe's answer broke off before its end"
# Poe's error event for a rate limit has no error_type, only its text (fastapi_poe issue 109:
# "You have exceeded rate limit to query bot using User API Key. Try again later.").
RATE_LIMIT_TEXT = re.compile(r"\brate[ _-]?limit", re.IGNORECASE)
# An error event that says the key is not good (Poe's key check answers 401 as a rule).
KEY_REJECTED_TEXT = re.compile(
    r"\b(invalid|incorrect|wrong|expired|revoked|unauthori[sz]ed)\b[^.]{0,40}\b(api|access)[ _-]?"
    r"key\b|\b(api|access)[ _-]?key\b[^.]{0,40}\b(invalid|incorrect|not valid|expired|revoked)\b",
    re.IGNORECASE)


SERVER_KEY_REJECTED = ("Poe rejected this server's Poe key (POE_API_KEY): the server's operator "
                       "must replace it; no key of yours was sent to Poe")


def key_rejected(server_key: bool) -> PoeFailure:
    """Poe refused the key: the caller's own (401), or the server's POE_API_KEY, which is the
    server's fault (502), not the caller's."""
    return PoeFailure(502, SERVER_KEY_REJECTED) if server_key \
        else PoeFailure(401, "Poe rejected the API key")


def poe_http_error(status: int, detail: str, headers: dict | None) -> HTTPException:
    """A Poe call's failure as the caller's error: a 429 with its Retry-After and x-should-retry:
    true; a 502 or 504 (Poe was called) with x-should-retry: false, never a Retry-After."""
    headers = headers if status == 429 else NO_RETRY if status in (502, 504) else None
    return HTTPException(status, detail, headers=headers or None)


def status_failure(status: int, headers: httpx.Headers, model: str,
                   server_key: bool) -> PoeFailure:
    """Poe's answer to the query was not an event stream: what its HTTP status means."""
    if status == 404:
        return PoeFailure(404, f"Poe does not know the model {model!r}")
    if status in (400, 422):
        return PoeFailure(400, f"Poe refused the request (HTTP {status})")
    if status in (401, 403):
        return key_rejected(server_key)
    if status == 429:
        return rate_limited(POE_RATE_LIMITED, retry_seconds(headers.get("retry-after")), headers)
    if status < 300:
        return PoeFailure(502, "Poe's answer is not an event stream")
    code, detail = HTTP_STATUS_FAILURE.get(status, (502, f"Poe answered with HTTP {status}"))
    return PoeFailure(code, detail)


def transport_failure(exc: httpx.HTTPError, began: bool = False) -> PoeFailure:
    """The network failed the call: before Poe's answer `began` (Poe is unreachable), or after
    (its answer broke off: the connection closed, or a Content-Length longer than what came)."""
    if isinstance(exc, httpx.TimeoutException):
        return PoeFailure(504, "Poe did not answer in time")
    if isinstance(exc, httpx.TransportError):
        return PoeFailure(502, POE_BROKE_OFF if began else "Poe is unreachable")
    return PoeFailure(502, "Poe's answer could not be read")  # a broken gzip, say


def error_event_failure(event: dict, headers: httpx.Headers, server_key: bool) -> PoeFailure:
    """An error event (JSON with text, allow_retry and error_type): what it means."""
    text = clean_text(event["text"]) if isinstance(event.get("text"), str) else ""
    error_type = event.get("error_type")
    if error_type in ERROR_TYPE_STATUS:
        status, message = ERROR_TYPE_STATUS[error_type]
        return PoeFailure(status, f"{message}: {text}" if text else message)
    if error_type in ("rate_limit", "rate_limit_exceeded") or RATE_LIMIT_TEXT.search(text):
        return rate_limited(f"{POE_RATE_LIMITED}: {text}" if text else POE_RATE_LIMITED,
                            POE_RETRY_SECONDS, headers)
    if KEY_REJECTED_TEXT.search(text):
        return key_rejected(server_key)
    return PoeFailure(502, f"Poe answered with an error: {text}" if text
                      else "Poe answered with an error")


def clean_text(text: str) -> str:
    """Text that SQLite and a socket can take: NUL removed, lone surrogates (half an emoji from
    a broken encoder) replaced by U+FFFD."""
    if text.isascii():
        return text.replace("\x00", "") if "\x00" in text else text
    return re.sub("[\ud800-\udfff]", "\ufffd", text.replace("\x00", ""))


# The JSON fastapi_poe's stream_request sends (httpx's json=), and the headers it sends with it
# (its _BotContext's, as httpx_sse's aconnect_sse amends them).
POE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def poe_headers(api_key: str) -> dict[str, str]:
    return {"Accept": "text/event-stream", "Authorization": f"Bearer {api_key}",
            "Cache-Control": "no-store", "Content-Type": "application/json"}


@dataclass(frozen=True)
class PoeQuery:
    """A query as it is sent: its JSON, in three parts (before the value of "tools", that
    value, and after it: query_body puts the call's tools in), built off the event loop (a long
    history's is milliseconds to tens of milliseconds); and how many messages it holds."""
    head: bytes
    tools: bytes
    tail: bytes
    messages: int

    def __repr__(self) -> str:
        return f"PoeQuery({self.messages} messages)"


def query_json(payload: dict) -> tuple[bytes, bytes, bytes]:
    """A query's payload (fastapi_poe's model_dump) as JSON in PoeQuery's three parts."""
    keys = list(payload)
    at = keys.index("tools")
    head = POE_JSON({key: payload[key] for key in keys[:at]})[:-1] + ',"tools":'
    tail = POE_JSON({key: payload[key] for key in keys[at + 1:]})
    tail = "," + tail[1:] if len(tail) > 2 else "}"
    return head.encode(), POE_JSON(payload["tools"]).encode(), tail.encode()


def prepare_query(poe_messages: list[fp.ProtocolMessage], params: dict) -> PoeQuery:
    """Runs on a worker thread: a query with options (an OpenAI route's), checked and dumped by
    fastapi_poe's own model."""
    query = fp.QueryRequest(version=PROTOCOL_VERSION, type="query", query=poe_messages,
                            user_id=params.pop("user_id", ""), conversation_id="", message_id="",
                            **params)
    return PoeQuery(*query_json(fp.QueryRequest.model_dump(query)), len(poe_messages))


# A query without options, a message and an attachment, as fastapi_poe's model_dump gives them:
# the query's JSON in PoeQuery's parts, its first cut where "query" goes; a message's in four
# parts, around its role, content and attachments. plain_query builds a conversation turn's JSON
# from these, byte for byte as model_dump would (tested), with none of pydantic's work per
# message, which was most of a turn's preparation.
PLAIN_QUERY = query_json(fp.QueryRequest(
    version=PROTOCOL_VERSION, type="query", query=[], user_id="", conversation_id="",
    message_id="").model_dump())
PLAIN_QUERY = (*PLAIN_QUERY[0].split(b'"query":[]', 1), *PLAIN_QUERY[1:])
PLAIN_MESSAGE = POE_JSON({**fp.ProtocolMessage(role="user", content="").model_dump(),
                          "role": "\0", "content": "\0", "attachments": "\0"}).split('"\\u0000"')
PLAIN_ATTACHMENT = fp.Attachment(url="", name="", content_type="").model_dump()


def plain_query(entries: list[dict]) -> PoeQuery:
    """The query of `entries` (role, content, attachments: stored rows) with no options."""
    start, after_role, after_content, end = PLAIN_MESSAGE
    messages = ",".join(
        start + json_string("bot" if e["role"] == "assistant" else e["role"]) + after_role
        + json_string(e["content"]) + after_content
        + (POE_JSON([attachment_json(a) for a in e["attachments"]]) if e["attachments"]
           else "[]") + end for e in entries)
    before, after, tools, tail = PLAIN_QUERY
    return PoeQuery(before + b'"query":[' + messages.encode() + b"]" + after, tools, tail,
                    len(entries))


def attachment_json(attachment: dict) -> dict:
    """A stored attachment as a query sends it (fp.Attachment's fields, its defaults filled)."""
    return {**PLAIN_ATTACHMENT, "url": attachment["url"],
            "content_type": attachment.get("content_type") or "application/octet-stream",
            "name": attachment.get("name") or "file"}


def query_body(query: PoeQuery, tools: list | None) -> bytes:
    """The body fastapi_poe's stream_request would send for the query with these tools
    (ToolDefinitions, or their dicts), byte for byte: the tools' JSON put in at their key."""
    if tools is None:
        return query.head + query.tools + query.tail
    return query.head + POE_JSON([tool.model_dump() if isinstance(tool, fp.ToolDefinition)
                                  else tool for tool in tools]).encode() + query.tail


# After 'done', how long what follows (the end of the HTTP body, as a rule at once) is read: a
# connection read to its end goes back to the pool, where one left unread is closed (a new
# connection to Poe is a TLS handshake, a round trip or two).
POE_DRAIN_SECONDS = 0.5
# The longest one report to a bot (report_to_poe) may take.
POE_REPORT_SECONDS = 5.0


async def open_poe(app: Starlette, model: str, body: bytes, api_key: str) -> httpx.Response:
    """Sends the query as fastapi_poe's stream_request would (its URL, headers and JSON); Poe's
    answer once it is known to be an event stream, else the PoeFailure its status means."""
    settings = app.state.settings
    response = await app.state.poe.open(settings.poe_base_url + model, body, api_key)
    if response.status_code < 300 and "text/event-stream" in \
            response.headers.get("content-type", "").partition(";")[0]:
        return response
    await response.aclose()
    raise status_failure(response.status_code, response.headers, model,
                         bool(settings.poe_api_key))


class PoeChores:
    """app.state.poe_chores: what a Poe call leaves to do once its reply has ended, each in a
    task of its own (after_poe), so that the reply's end waits for none of it: the rest of the
    answer read (drain), the bot told what was wrong with it (report_to_poe). Cancelled at
    shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def add(self, chore: Any) -> None:
        task = asyncio.create_task(chore)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        while self.tasks:
            for task in self.tasks:
                task.cancel()
            await asyncio.wait(list(self.tasks))


def after_poe(app: Starlette, model: str, api_key: str, reports: list[tuple[str, dict]],
              response: httpx.Response | None = None,
              chunks: AsyncIterator[bytes] | None = None,
              ended: asyncio.Event | None = None) -> None:
    """A call's end: its reports logged now, then, in the background (PoeChores), the rest of
    its answer drained and closed (if `response` is given: the call ended at 'done') once
    `ended` is set (the reply's end, stored and told, goes first), and the reports sent, on
    the connection just drained if it was kept."""
    for message, _ in reports:
        log.warning("Poe: %s", message[:200])
    if response is not None or reports:
        app.state.poe_chores.add(finish_poe(app, model, api_key, list(reports), response, chunks,
                                            ended))
    reports.clear()


async def finish_poe(app: Starlette, model: str, api_key: str, reports: list[tuple[str, dict]],
                     response: httpx.Response | None, chunks: AsyncIterator[bytes] | None,
                     ended: asyncio.Event | None = None) -> None:
    """after_poe's task: the drain first, so that the reports may reuse its connection."""
    if response is not None:
        await drain(response, chunks, ended)
    await report_to_poe(app, model, api_key, reports)


async def drain(response: httpx.Response, chunks: AsyncIterator[bytes],
                ended: asyncio.Event | None = None) -> None:
    """Reads what follows 'done' (for at most POE_DRAIN_SECONDS), once `ended` is set, then
    closes the response: its connection goes back to the pool if it was read to its end."""
    try:
        if ended is not None:
            await ended.wait()
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            async with asyncio.timeout(POE_DRAIN_SECONDS):
                async for _ in chunks:
                    pass
    finally:
        await response.aclose()


async def report_to_poe(app: Starlette, model: str, api_key: str,
                        reports: list[tuple[str, dict]]) -> None:
    """Tells the bot what was wrong with its answer, as fastapi_poe's client did (its
    report_error), each report within POE_REPORT_SECONDS; a report that fails changes nothing."""
    settings = app.state.settings
    for message, metadata in reports:
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            async with asyncio.timeout(min(settings.poe_timeout, POE_REPORT_SECONDS)):
                await app.state.poe.post(
                    settings.poe_base_url + model,
                    headers={"Accept": "application/json", "Authorization": f"Bearer {api_key}"},
                    json={"version": PROTOCOL_VERSION, "type": "report_error",
                          "message": message, "metadata": metadata})


async def relay_poe(app: Starlette, model: str, query: PoeQuery, api_key: str,
                    take: Callable[[str, Any], bool], tools: list | None = None,
                    queued: Callable[[bool], None] | None = None,
                    ended: asyncio.Event | None = None) -> None:
    """One Poe call, once it has a slot of the budget (PoeBudget.take: `queued` hears when it
    waits for one): take(kind, value) is given ("text", chunk), ("replace", whole_text),
    ("file", attachment dict) and ("tool_calls", [delta dicts]) as their bytes arrive (RelayFeed:
    in the connection's own read, no task woken a chunk); take returning True ends the call
    there, as if stopped. It ends at 'done': what follows is after_poe's, begun once `ended` is
    set (the reply's end comes first: its text stored and told). Every failure, and
    take's own, is raised as a PoeFailure. The request's RequestTiming hears of the wait for
    the budget and of Poe's times."""
    timing = request_timing.get(None) or RequestTiming()
    await timing.wait_for_budget(app.state.poe_budget, queued)
    settings = app.state.settings
    response = feed = None
    timing.poe_call(began=True)
    try:
        async with asyncio.timeout(settings.poe_timeout) as deadline:
            response = await open_poe(app, model, query_body(query, tools), api_key)
            feed = RelayFeed(PoeEventReader(tools is not None, response.headers,
                                            bool(settings.poe_api_key)), take, deadline,
                             settings.poe_timeout, timing)
            # The body as it comes: PoeTransport's own (PoeBody.push: fed as it is read),
            # unless it must be decoded (gzip, say) or is a proxy's (httpx's own transport).
            body = None if "content-encoding" in response.headers else \
                response.extensions.get("poe_body")
            if body is not None:
                await body.push(feed.feed)
                chunks = aiter(body)
            else:
                chunks = aiter(response.aiter_bytes() if "content-encoding" in response.headers
                               else response.aiter_raw())
                async for chunk in chunks:
                    if feed.feed(chunk):
                        break
        feed.raise_failure()
        if feed.stopped:
            return  # (its response closed below: the connection is not kept)
        if not feed.reader.done:
            feed.reader.report("Bot exited without sending 'done' event")
            raise PoeFailure(502, POE_BROKE_OFF)
        after_poe(app, model, api_key, feed.reader.reports, response, chunks, ended)
        response = None  # after_poe's now
    except (TimeoutError, httpx.HTTPError, PoeFailure) as exc:
        raise failure_of(app, model, api_key, exc, feed and feed.reader) from None
    finally:
        timing.poe_call(began=False)
        if response is not None:
            await response.aclose()


class RelayFeed:
    """relay_poe's reading of one answer: feed() takes each read's bytes (PoeEventReader) and
    hands their items to `take`; it says True once the call has had enough: 'done', a failure
    (Poe's, or `take`'s: `failure`, raised by raise_failure), or `take` saying so (`stopped`).
    It moves the call's deadline, the chunk's dearest step, at most every `slack` s, to now +
    timeout + slack: never before `timeout` after the last event, at most `slack` later."""

    def __init__(self, reader: PoeEventReader, take: Callable[[str, Any], bool],
                 deadline: asyncio.Timeout, timeout: float, timing: RequestTiming) -> None:
        self.reader, self.take, self.deadline, self.timing = reader, take, deadline, timing
        self.loop, self.timeout, self.slack = asyncio.get_running_loop(), timeout, \
            min(1.0, timeout / 10)
        self.moved = -math.inf  # the first read always moves the deadline
        self.stopped, self.failure = False, None

    def feed(self, chunk: bytes) -> bool:
        reader = self.reader
        try:
            if (now := self.loop.time()) - self.moved >= self.slack:
                if self.moved < 0:
                    self.timing.poe_event()
                # (RuntimeError once the deadline has passed: the call ends as timed out)
                self.deadline.reschedule(now + self.timeout + self.slack)
                self.moved = now
            items = reader.feed(chunk)
            if items and self.timing.poe_output is None:
                self.timing.poe_output = time.perf_counter()
            for kind, value in items:
                if self.take(kind, value):
                    self.stopped = True
                    return True
        except Exception as exc:  # take's: PoeFailure, or a fault, which its caller logs
            self.failure = exc
            return True
        if reader.failure is not None:
            self.failure = reader.failure
        return reader.done or self.failure is not None

    def raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure


def failure_of(app: Starlette, model: str, api_key: str, exc: Exception,
               reader: PoeEventReader | None) -> PoeFailure:
    """relay_poe's failure: Poe's silence (504), the network's (its answer, once begun, broke
    off), or Poe's own, told to the bot if fastapi_poe's client would have told it, and logged
    once if it is the server's key."""
    if isinstance(exc, TimeoutError):
        return PoeFailure(504, f"Poe did not answer within {app.state.settings.poe_timeout:g} s")
    if isinstance(exc, httpx.HTTPError):
        return transport_failure(exc, began=reader is not None)
    if reader is not None:
        after_poe(app, model, api_key, reader.reports)
    if exc.detail == SERVER_KEY_REJECTED:
        app.state.poe_budget.log_key_rejection()
    return exc


def poe_message(role: str, content: str, attachments: list[dict] | None) -> fp.ProtocolMessage:
    files = [fp.Attachment(**attachment_json(a)) for a in attachments or []]
    return fp.ProtocolMessage(role="bot" if role == "assistant" else role, content=content,
                              attachments=files)


def file_markdown(attachment: dict) -> str:
    """A file a bot sent, as Markdown in the reply text."""
    name = (attachment.get("name") or "file").replace("]", "")
    url = attachment["url"].replace(")", "%29").replace(" ", "%20")
    if attachment.get("inline_ref"):
        # The bot's text shows it where it wants, as ![alt][ref]: a reference definition (on
        # a line of its own, after a blank one) resolves that, wherever it arrives.
        ref = re.sub(r"[\]\s]", "", attachment["inline_ref"])
        return f"\n\n[{ref}]: {url}\n\n"
    if attachment.get("content_type", "").startswith("image/"):
        return f"![{name}]({url})"
    return f"[{name}]({url})"


# ---------------------------------------------------------------------------------------------
# Poe's budget: at most POE_RATE_LIMIT calls begin in any POE_RATE_WINDOW seconds, for the whole
# process, first come first served; a call over it waits up to POE_QUEUE_SECONDS, then is 429.

# Retry-After, in seconds, when Poe rate-limits without saying when (its error event never does),
# or says it in a form HTTP does not have; and the longest passed on (Poe counts by the minute).
POE_RETRY_SECONDS, POE_RETRY_MAX_SECONDS = 10, 3600
# A conversation stream waiting for the budget gets an SSE comment line this often.
BUDGET_COMMENT_SECONDS = 5.0
BUDGET_COMMENT = b": waiting for Poe's rate limit\n\n"


def rate_limited(detail: str, retry_after: int, headers: Any = None) -> PoeFailure:
    """A 429: Retry-After in seconds, x-should-retry: true (waiting is the cure), and the
    x-ratelimit-* headers of Poe's answer, if any."""
    passed = {name: value for name, value in (headers or {}).items()
              if name.lower().startswith("x-ratelimit-")}
    return PoeFailure(429, detail, {**passed, "Retry-After": str(retry_after),
                                    "x-should-retry": "true"})


def retry_seconds(raw: str | None) -> int:
    """Poe's Retry-After as HTTP has it (whole seconds, or an HTTP date), from 1 to
    POE_RETRY_MAX_SECONDS (a longer wait is said as that); anything else (a fraction, a negative
    number, junk) POE_RETRY_SECONDS."""
    raw = (raw or "").strip()
    if raw.isascii() and raw.isdigit():
        return POE_RETRY_MAX_SECONDS if len(raw) > 9 else \
            min(max(1, int(raw)), POE_RETRY_MAX_SECONDS)
    with contextlib.suppress(ValueError, TypeError, OverflowError, IndexError):
        when = email.utils.parsedate_to_datetime(raw)
        if when.tzinfo is None:  # "-0000": an HTTP date is in GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        return min(max(1, math.ceil(when.timestamp() - time.time())), POE_RETRY_MAX_SECONDS)
    return POE_RETRY_SECONDS


@dataclass(slots=True)
class BudgetWaiter:
    future: asyncio.Future  # its result: the start time of the slot given
    since: float


class PoeBudget:
    """app.state.poe_budget: at most `limit` Poe calls begin in any `window` seconds, for the whole
    process (0: no limit), first come first served. A call over it waits up to `queue_seconds`,
    then is refused (429). Under the limit a call costs a compare and an append; a waiter is
    woken by one timer, set for when the oldest call leaves the window: nothing polls. It also
    keeps whether Poe's rejection of the server's key was logged (once a process)."""

    def __init__(self, limit: int, window: float, queue_seconds: float) -> None:
        self.limit, self.window, self.queue_seconds = limit, window, queue_seconds
        self.starts: collections.deque[float] = collections.deque()  # calls begun, oldest first
        self.waiters: collections.deque[BudgetWaiter] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.key_rejection_logged = False

    def used(self, now: float) -> int:
        starts, since = self.starts, now - self.window
        while starts and starts[0] <= since:
            starts.popleft()
        return len(starts)

    def take_now(self) -> bool:
        """A slot, if one is free and no call waits: the path of every call under the budget."""
        now = time.monotonic()
        if (self.used(now) < self.limit or not self.limit) and not self.waiters:
            self.starts.append(now)
            return True
        return False

    async def take(self, queued: Callable[[bool], None] | None = None) -> None:
        """Returns once the call has its slot; PoeFailure(429) when none came within
        queue_seconds. `queued(True)` is called when it begins to wait, `queued(False)` when it
        stops (its slot given, refused or cancelled)."""
        if self.take_now():
            return
        waiter = BudgetWaiter(asyncio.get_running_loop().create_future(), time.monotonic())
        self.waiters.append(waiter)
        self.admit()
        given = False
        if queued is not None:
            queued(True)
        try:
            async with asyncio.timeout(self.queue_seconds):
                await waiter.future
            given = True
        except TimeoutError:
            retry_after = self.seconds_to_slot(waiter)
            raise rate_limited(f"too many Poe calls: this server's budget ({self.limit} a "
                               f"{self.window:g} s) stayed full for {self.queue_seconds:g} s",
                               retry_after) from None
        finally:
            if not given:
                self.withdraw(waiter)
            if queued is not None:
                queued(False)

    def seconds_to_slot(self, waiter: BudgetWaiter) -> int:
        """Whole seconds (at least 1) until a slot frees for a call behind those waiting before
        `waiter`."""
        ahead = self.waiters.index(waiter) if waiter in self.waiters else 0
        if not self.starts:
            return 1
        frees = self.starts[min(ahead, len(self.starts) - 1)] + self.window
        return max(1, math.ceil(frees - time.monotonic()))

    def withdraw(self, waiter: BudgetWaiter) -> None:
        """A waiter leaves (refused, cancelled): out of the queue, or its slot, if one was
        given in the meantime, passed on."""
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        elif waiter.future.done() and not waiter.future.cancelled():
            with contextlib.suppress(ValueError):
                self.starts.remove(waiter.future.result())
        if not waiter.future.done():
            waiter.future.cancel()
        self.admit()

    def admit(self) -> None:
        """Gives free slots to the waiters at the head of the queue, in order; then, while any
        waits, a timer for when the oldest call leaves the window."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        now = time.monotonic()
        while self.waiters and self.used(now) < self.limit:
            waiter = self.waiters.popleft()
            if waiter.future.done():
                continue  # cancelled: its task, not yet resumed, will find it gone
            self.starts.append(now)
            waiter.future.set_result(now)
        if self.waiters:
            delay = max(self.starts[0] + self.window - now, 0.001)
            self.timer = asyncio.get_running_loop().call_later(delay, self.admit)

    def figures(self) -> dict:
        """What /health shows."""
        now = time.monotonic()
        return {"limit": self.limit, "used": self.used(now), "queued": len(self.waiters),
                "oldest_wait_seconds": round(now - self.waiters[0].since, 1)
                if self.waiters else 0}

    def log_key_rejection(self) -> None:
        if not self.key_rejection_logged:
            self.key_rejection_logged = True
            log.error("Poe rejected the server's key (POE_API_KEY): every call fails with 502 "
                      "until it is replaced (this is logged once)")


# ---------------------------------------------------------------------------------------------
# Poe's events: the server-sent events of Poe's answer, read from the bytes of each read as they
# come (PoeEventReader), each meaning what it meant to fastapi_poe's client; long text events cut
# before they are parsed (CutLongTextEvents).

# A text event's data line past this many bytes is cut, as it arrives and before it is parsed, into
# several text events (splitting no escape, UTF-8 character or surrogate pair): one event of 50 MB
# would hold the loop while it is joined and parsed, and be as large in every step after.
POE_EVENT_BYTES = 1 << 20
# An event that is not text (cut as it comes) is held whole till its end: past this, the reply
# fails (502) rather than hold the loop parsing it and the memory of it (a 300 MB meta event).
# A text event framed so that it cannot be cut (CR line ends alone) may reach MAX_EVENT_BYTES.
MAX_OTHER_EVENT_BYTES, MAX_EVENT_BYTES = 8 << 20, 64 << 20
TEXT_DATA = re.compile(rb'data: ?\{"text": ?"')
TEXT_CUT = b'"}\n\nevent: text\ndata: {"text": "'
EVENTS_END = (b"\n\n", b"\r\n\r\n", b"\r\r")  # a read that ends with an event's end


def backslashes_before(data: bytes, end: int) -> int:
    """The backslashes right before data[end]; -1 when there are too many to be sure."""
    window = data[max(0, end - 256):end]
    run = len(window) - len(window.rstrip(b"\\"))
    return -1 if run == len(window) and end > 256 else run


def cuts_an_escape(tail: bytes) -> bool:
    """Whether cutting a JSON string after `tail` would split an escape (\\n, \\u4e2d...) or
    the two halves of a surrogate pair (\\ud83d\\ude00)."""
    if backslashes_before(tail, len(tail)) % 2:  # odd, or too many to tell (-1)
        return True
    u = tail.rfind(b"\\u", max(0, len(tail) - 11))
    while u >= 0:
        run = backslashes_before(tail, u)
        if run < 0:
            return True
        if run % 2 == 0:  # this backslash escapes
            if u + 6 > len(tail):
                return True
            if u + 6 == len(tail) and tail[u + 2:u + 4].lower() in (b"d8", b"d9", b"da", b"db"):
                return True
        u = tail.rfind(b"\\u", max(0, len(tail) - 11), u)
    return False


class CutLongTextEvents:
    """Cuts every long text event of Poe's stream into pieces of `limit` bytes: cut() takes each
    read's bytes, as they come, and returns them with the cuts made."""

    def __init__(self, limit: int = POE_EVENT_BYTES):
        self.limit = limit
        self.event = b""  # the type of the event being read
        self.head = b""  # the first bytes of the line being read
        self.run = 0  # bytes of that line since it began or was last cut
        self.cuttable = True  # no unescaped quote seen: still inside the text string
        self.before = b""  # the line's last bytes before this chunk

    def clear(self) -> None:
        """Nothing of a line is left: the last read ended with an event's end."""
        self.event, self.head, self.run, self.cuttable, self.before = b"", b"", 0, True, b""

    def cut(self, chunk: bytes) -> bytes:
        if chunk.endswith(EVENTS_END):  # most reads: whole events, nothing of a line left
            if self.run or self.event:
                self.clear()
            return chunk
        last_newline = chunk.rfind(b"\n")
        if last_newline >= 0:
            # The line the last read left unfinished ends here: an event line cut in two.
            if (self.head + chunk[:16]).startswith(b"event:"):
                self.event = (self.head + chunk[:chunk.find(b"\n")])[6:].strip()
            kind = chunk.rfind(b"event:", 0, last_newline)
            if kind > 0 and chunk[kind - 1] in b"\r\n":
                self.event = chunk[kind + 6:chunk.find(b"\n", kind)].strip()
            self.head, self.run, self.cuttable, self.before = b"", 0, True, b""
        start = last_newline + 1
        self.head = (self.head + chunk[start:start + 32])[:32]
        self.run += len(chunk) - start
        before, self.before = self.before, (self.before + chunk[start:])[-256:]
        if self.run <= self.limit or self.event != b"text" or not self.cuttable \
                or not TEXT_DATA.match(self.head):
            return chunk
        at = max(start + 64, len(chunk) - (self.run - self.limit))
        if at >= len(chunk) - 8:
            return chunk  # too near this chunk's end to see what follows: the next one
        # The line so far, from 256 bytes before this chunk: enough to tell escapes apart.
        line = before + chunk[start:at]
        quote = line.find(b'"', len(before))
        while quote >= 0:
            if backslashes_before(line, quote) % 2 == 0:  # even, or too many to tell (-1)
                self.cuttable = False  # the string may have ended: leave this line be
                return chunk
            quote = line.find(b'"', quote + 1)
        for cut in range(len(line), len(line) - 16, -1):
            following = line[cut] if cut < len(line) else chunk[at]
            if 0x80 <= following < 0xC0 or cuts_an_escape(line[:cut]):
                continue  # inside a UTF-8 character or an escape
            at -= len(line) - cut
            self.run = len(chunk) - at
            self.before = chunk[max(start, at - 256):at][-256:]
            return chunk[:at] + TEXT_CUT + chunk[at:]
        return chunk


def sse_event(block: bytes) -> tuple[bytes, bytes | None]:
    """One server-sent event's type and data (its data lines joined by LF; None: it has none),
    from its lines, LF-separated; comments, ids and retry times are ignored."""
    if block.startswith(b"event: ") and block.count(b"\n") == 1:  # the common shape, at once
        head, _, line = block.partition(b"\n")
        if line.startswith(b"data: "):
            return head[7:] or b"message", line[6:]
    kind, data = b"message", None
    for line in block.split(b"\n"):
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data = value if data is None else data + b"\n" + value
        elif name == b"event":
            kind = value or b"message"
    return kind, data


def json_object(data: bytes | None) -> dict:
    try:
        value = json.loads(data or b"null")
    except UnicodeDecodeError:  # what the text decoding of fastapi_poe's client made of it
        value = json.loads(data.decode(errors="replace"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def event_text(data: bytes | None) -> str:
    """A text event's text: {"text": "..."} read with the JSON decoder's own string scanner (a
    third of what parsing it whole costs); any other shape parsed whole."""
    if data is not None and data.startswith(b'{"text": "') and data.endswith(b'"}'):
        try:
            string = data.decode()
            text, end = json.decoder.scanstring(string, 10)
            if end == len(string) - 1:
                return text
        except ValueError:  # UnicodeDecodeError is one
            pass
    return string_field(json_object(data), "text")


def string_field(event: dict, name: str) -> str:
    value = event[name]
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    return value


def tool_call_delta(call: Any) -> dict:
    """One tool call's delta, as fastapi_poe's ToolCallDefinitionDelta takes and dumps it."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ValueError("a tool call without its function")
    function = call["function"]
    delta = {"index": call.get("index", 0), "id": call.get("id"), "type": call.get("type"),
             "function": {"name": function.get("name"), "arguments": function["arguments"]}}
    if type(delta["index"]) is not int or not isinstance(function["arguments"], str) or not all(
            v is None or isinstance(v, str) for v in (delta["id"], delta["type"],
                                                        function.get("name"))):
        raise ValueError("a malformed tool call")
    return delta


IGNORED_EVENTS = (b"meta", b"suggested_reply", b"ping")
# A read that is one text event, whole (feed's one_text): its one data line in group 1; in group
# 2, when that is {"text": "..."} with no escape and no control character in the string (most of
# Poe's chunks), the string's bytes, which are its text once decoded.
ONE_TEXT_EVENT = re.compile(
    rb'event: ?text\r?\ndata: ?(\{"text": ?"([^"\\\x00-\x1f]*)"\}|[^\r\n]*)(?:\r\n\r\n|\n\n)')


class PoeEventReader:
    """Poe's server-sent events, read as they arrive: feed() takes each read's bytes and returns
    relay_poe's items for the events they complete, one each. Each event means what it meant to
    fastapi_poe's client, which this replaces on the hot path (it parsed each event's JSON twice,
    into pydantic models, on the loop); what that client reported to the bot is kept in
    `reports`. Malformed data fails the call (502), an error event as error_event_failure says:
    `failure`, once the items before it in the same read are taken. An event without data is
    none (the SSE rules), `done` aside."""

    def __init__(self, tools: bool, headers: httpx.Headers, server_key: bool) -> None:
        self.tools, self.headers, self.server_key = tools, headers, server_key
        self.cutter = CutLongTextEvents()
        self.rest: list[bytes] = []  # the bytes of an event not yet whole
        self.rest_bytes = 0
        self.after_cr = False  # the last read ended with CR: a LF first in the next is its pair
        self.started = self.done = False
        self.failure: PoeFailure | None = None  # what ends the call, after the items fed
        self.texts = 0  # text and replace_response events seen
        self.reports: list[tuple[str, dict]] = []

    def feed(self, chunk: bytes) -> list[tuple]:
        if not self.started:  # the stream may begin with a byte order mark (the SSE rules)
            self.started, chunk = True, chunk.removeprefix(b"\xef\xbb\xbf")
        elif not self.rest and not self.after_cr and (one := ONE_TEXT_EVENT.fullmatch(chunk)):
            return self.one_text(one)
        items: list[tuple] = []
        try:
            for block in self.blocks(self.cutter.cut(chunk)):
                kind, data = sse_event(block)
                if not data and kind != b"done":
                    continue
                if (item := self.event_item(kind, data)) is not None:
                    items.append(item)
                if self.done:
                    break
        except PoeFailure as exc:
            self.failure = exc
        return items

    def one_text(self, one: re.Match) -> list[tuple]:
        """feed() of the most common read, one text event whole (a paced chunk of Poe's): its
        item, as the loop over the read's events would make it (item()), in one match where
        cut(), blocks() and sse_event() take a pass each; a plain string, decoded at once."""
        if self.cutter.run or self.cutter.event:
            self.cutter.clear()  # (as its cut() would: the read ends with an event's end)
        if one[2] is not None:
            try:
                text = one[2].decode()  # (no NUL, no surrogate: nothing for clean_text)
            except UnicodeDecodeError:  # (event_text's fallback replaces what is not UTF-8)
                pass
            else:
                self.texts += 1
                return [("text", text)] if text else []
        data = one[1]
        if not data:
            return []
        try:
            text = event_text(data)
        except (ValueError, TypeError, KeyError, IndexError):  # event_item's report and 502
            try:
                return [item] if (item := self.event_item(b"text", data)) is not None else []
            except PoeFailure as exc:
                self.failure = exc
                return []
        self.texts += 1
        return [("text", text)] if text and (text := clean_text(text)) else []

    def event_item(self, kind: bytes, data: bytes | None) -> tuple | None:
        """item(), a malformed event a PoeFailure (502) reported to the bot."""
        try:
            return self.item(kind, data)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            self.report(f"Invalid {kind.decode(errors='replace')[:100]!r} event: {exc}",
                        data=(data or b"")[:500].decode(errors="replace"))
            raise PoeFailure(502, "Poe's answer could not be read") from None

    def item(self, kind: bytes, data: bytes | None) -> tuple | None:
        """What one event adds to the reply, if anything."""
        if kind == b"text":
            self.texts += 1
            text = event_text(data)  # (a text that is nothing once cleaned, a NUL, is none)
            return ("text", text) if text and (text := clean_text(text)) else None
        if kind == b"replace_response":
            self.texts += 1
            return ("replace", clean_text(event_text(data)))
        if kind == b"file":
            event = json_object(data)
            name, url, content_type = (string_field(event, key) for key in ("name", "url",
                                                                             "content_type"))
            inline_ref = event.get("inline_ref")
            return ("file", {"url": url, "name": clean_text(name)[:255],
                             "content_type": content_type,
                             "inline_ref": inline_ref if isinstance(inline_ref, str) else None})
        if kind == b"json":
            return self.tool_item(json.loads(data or b"null")) if self.tools else None
        if kind == b"done":
            self.done = True
            if not self.texts and not self.tools:
                self.report("Bot returned no text in response")
            return None
        if kind == b"error":
            raise error_event_failure(json_object(data), self.headers, self.server_key)
        if kind not in IGNORED_EVENTS and (data is not None or kind != b"message"):
            self.report(f"Unknown event type: {kind.decode(errors='replace')[:100]}",
                        event_data=(data or b"")[:500].decode(errors="replace"))
        return None

    def tool_item(self, chunk: Any) -> tuple | None:
        """A json event of a call with tools, OpenAI's chunk, as fastapi_poe's client reads it:
        its first choice's tool call deltas, or text."""
        if not isinstance(chunk, dict):
            raise ValueError("not a JSON object")
        if not chunk.get("choices"):
            return None
        choice = chunk["choices"][0]
        if choice["finish_reason"] is not None:
            return None
        delta = choice["delta"]
        if "tool_calls" in delta:
            return ("tool_calls", [tool_call_delta(call) for call in delta["tool_calls"]])
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError("content is not a string")
        return ("text", content) if content and (content := clean_text(content)) else None

    def report(self, message: str, **metadata: str) -> None:
        self.reports.append((message, {**metadata, "message_id": ""}))

    def blocks(self, chunk: bytes) -> list[bytes]:
        """The events this read completes, each its lines joined by LF (CRLF and CR endings
        made LF); the bytes of the event not yet whole are kept for the next."""
        if self.after_cr:
            self.after_cr = False
            if chunk[:1] == b"\n":  # the LF of a CRLF cut between two reads
                chunk = chunk[1:]
        if not chunk:
            return []
        if not self.rest and chunk.endswith(EVENTS_END):  # whole events: most reads
            if b"\r" in chunk:
                self.after_cr = chunk[-1:] == b"\r"
                chunk = chunk.replace(b"\r\n", b"\n")
                if b"\r" in chunk:
                    chunk = chunk.replace(b"\r", b"\n")
            return chunk[:-2].split(b"\n\n")
        rest = self.rest
        # Two line ends in a row (LF LF, CR CR, LF CR; CR LF is one) end an event.
        ends = b"\n\n" in chunk or b"\r\r" in chunk or b"\n\r" in chunk
        if rest:
            rest.append(chunk)
            if not ends and rest[-2][-1:] + chunk[:1] not in (b"\n\n", b"\r\r", b"\n\r"):
                self.hold(len(chunk))
                return []
            data, self.rest, self.rest_bytes = b"".join(rest), [], 0
        elif not ends:
            self.rest = [chunk]
            self.hold(len(chunk))
            return []
        else:
            data = chunk
        if b"\r" in data:
            self.after_cr = data[-1:] == b"\r"
            data = data.replace(b"\r\n", b"\n")
            if b"\r" in data:
                data = data.replace(b"\r", b"\n")
        *whole, tail = data.split(b"\n\n")
        if tail:
            self.rest = [tail]
            self.hold(len(tail))
        return whole

    def hold(self, size: int) -> None:
        """Counts bytes kept of an event not yet whole: past MAX_OTHER_EVENT_BYTES, 502, unless
        it is text (CutLongTextEvents cuts those as they come, as a rule), then past
        MAX_EVENT_BYTES."""
        self.rest_bytes += size
        if self.rest_bytes <= MAX_OTHER_EVENT_BYTES:
            return
        text = self.rest[0].lstrip(b"\r\n").startswith((b"event: text\n", b"event:text\n",
                                                          b"event: text\r", b"event:text\r"))
        if text and self.rest_bytes <= MAX_EVENT_BYTES:
            return
        self.rest, self.rest_bytes = [], 0
        self.report(f"An event longer than {MAX_EVENT_BYTES if text else MAX_OTHER_EVENT_BYTES} "
                    "bytes")
        raise PoeFailure(502, f"Poe sent an event larger than "
                              f"{MAX_EVENT_BYTES >> 20} MiB" if text else
                         f"Poe sent an event larger than {MAX_OTHER_EVENT_BYTES >> 20} MiB "
                         "that is not text")


# ---------------------------------------------------------------------------------------------
# Poe's connections: HTTP/1.1 to Poe for httpx's client (app.state.poe), parsed by httptools in C,
# kept alive and reused (PoeTransport, PoeConnection, PoeBody).

# A connection to Poe stops reading past this many bytes unread (and reads again below a fourth).
POE_READ_BUFFER_BYTES = 1 << 20
# Reads of Poe's answer this far apart are not one burst: its sink's work in a row begins again.
SINK_GAP_SECONDS = 0.001


class PoeConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to Poe (PoeTransport's): httptools, uvicorn's C parser, reads what
    arrives as it arrives; the body goes to the `sink` (PoeBody.push's) as it is parsed, or
    waits in `body` for the response's reader, which a future wakes. Reading pauses past
    POE_READ_BUFFER_BYTES unread."""

    def __init__(self, origin: tuple) -> None:
        self.origin, self.loop = origin, asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed, self.error = False, None  # error: why it closed before the answer's end
        self.waiter: asyncio.Future | None = None  # the reader's, while nothing has come
        self.drained: asyncio.Future | None = None  # the writer's, while the transport is full
        self.paused, self.buffered, self.idle_since = False, 0, 0.0
        self.busy = True  # a request's, not idle in the pool
        self.begin()

    def begin(self) -> None:
        """Ready for a response (the next one, on a connection kept alive)."""
        self.status, self.headers, self.head_done, self.complete = 0, [], False, False
        self.keep_alive = False
        self.sized = self.started = False  # the body has a length (or chunks); a byte came
        self.body: collections.deque[bytes] = collections.deque()
        # PoeBody.push's: it says True once it has had enough; it is set aside (the body
        # waits in `body` for push) after TURN_SECONDS of its work in a row (reads less than
        # SINK_GAP_SECONDS apart), so a burst gives way; a paced answer's reads never add up.
        self.sink: Callable[[bytes], bool] | None = None
        self.sink_work, self.sink_last, self.enough = 0.0, 0.0, False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    @property
    def alive(self) -> bool:
        """Neither end has closed it, nor begun to (bytes it should not have got close it)."""
        return not self.closed and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Nothing is asked of it (idle), or its answer has ended: bytes past the end would
            # leave its parser in a message of their own, no answer to the next request.
            self.transport.close()
            return
        self.started = True
        began = time.perf_counter() if self.sink is not None else None
        if began is not None and began - self.sink_last >= SINK_GAP_SECONDS:
            self.sink_work = 0.0  # the loop was free meanwhile: a new run of reads
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.complete:  # (else what came after the end, in the same read)
                self.error = httpx.RemoteProtocolError(f"Poe's answer is not HTTP: {exc}")
            self.transport.close()
        if self.sink is not None and began is not None:
            self.sink_last = time.perf_counter()
            self.sink_work += self.sink_last - began
            if self.sink_work >= TURN_SECONDS:
                self.sink = None  # (libuv makes up to 32 reads in a row: a burst is fed by push)
        if self.sink is None or self.complete or self.error is not None:
            self.wake()

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer after the end, in the same read: never parsed
            raise httptools.HttpParserError("bytes after the answer's end")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.sized = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = self.status >= 200  # a 1xx answer: the real one follows
        self.keep_alive = self.parser.should_keep_alive()  # (llhttp forgets it at the end)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            if self.sink(body):
                self.sink, self.enough = None, True  # the rest waits in `body` (for drain)
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > POE_READ_BUFFER_BYTES and not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
        else:
            self.begin()

    def eof_received(self) -> None:
        if self.head_done and not self.sized:
            self.complete = True  # a body that ends with the connection
        self.connection_lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = httpx.ReadError(str(exc)) if exc is not None else \
                httpx.RemoteProtocolError("Poe closed the connection before its answer's end")
        self.wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def wake(self) -> None:
        if self.waiter is not None:
            if not self.waiter.done():
                self.waiter.set_result(None)
            self.waiter = None

    async def wait(self, timeout: float | None) -> None:
        """Until more of the answer has come, or the connection is lost."""
        self.waiter = self.loop.create_future()
        if timeout is None:
            await self.waiter
            return
        try:
            async with asyncio.timeout(timeout):
                await self.waiter
        except TimeoutError:
            raise httpx.ReadTimeout("Poe sent nothing in time") from None

    def take(self) -> bytes:
        """All of the body that has come."""
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        return self.taken(data)

    def take_first(self) -> bytes:
        """The first of the body's pieces that have come (a read's, as a rule)."""
        return self.taken(self.body.popleft())

    def taken(self, data: bytes) -> bytes:
        """`data`, taken from the body: reading goes on once a fourth of the bound is left."""
        self.buffered -= len(data)
        if self.paused and self.buffered <= POE_READ_BUFFER_BYTES // 4:
            self.transport.resume_reading()
            self.paused = False
        return data

    async def send(self, request: httpx.Request, timeout: float | None) -> None:
        """The request's head and body (chunked if its headers say so)."""
        if self.closed:
            raise httpx.WriteError("the connection to Poe is closed")
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        head += [b"%s: %s\r\n" % pair for pair in request.headers.raw]
        self.transport.write(b"".join(head) + b"\r\n")
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        async for part in request.stream:
            if part:
                self.transport.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        if chunked:
            self.transport.write(b"0\r\n\r\n")
        if self.drained is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self.drained
            except TimeoutError:
                raise httpx.WriteTimeout("Poe took the request too slowly") from None


class PoeBody(httpx.AsyncByteStream):
    """A response's body, as it arrives: what has come at each read, at once. The reads of what
    has come do not yield the loop: a burst Poe had already sent (thousands of events) would hold
    it, and every other client with it; so after TURN_SECONDS of them, one does."""

    def __init__(self, pool: PoeTransport, connection: PoeConnection, timeout: float | None):
        self.pool, self.connection, self.timeout = pool, connection, timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection, loop = self.connection, asyncio.get_running_loop()
        turn_began = loop.time()
        while True:
            if connection.body:
                if loop.time() - turn_began >= TURN_SECONDS:
                    await asyncio.sleep(0)
                    turn_began = loop.time()
                yield connection.take()
            elif connection.complete:
                return
            elif connection.error is not None:
                raise connection.error
            else:
                await connection.wait(self.timeout)
                turn_began = loop.time()

    async def push(self, sink: Callable[[bytes], bool]) -> None:
        """Hands the body to `sink` as it is read, in the connection's own data_received (no
        task woken for each read), until sink says it has had enough (True) or the body ends;
        the connection's failure is raised. A sink must not raise. After TURN_SECONDS of its
        work in a row, the connection sets it aside: what waits is fed here, a piece at a
        time, yielding the loop every TURN_SECONDS, and the sink goes back."""
        connection = self.connection
        while True:
            began = time.perf_counter()
            while connection.body:
                if time.perf_counter() - began >= TURN_SECONDS:
                    await asyncio.sleep(0)
                    began = time.perf_counter()
                if sink(connection.take_first()):
                    return
            if connection.complete:
                return
            if connection.error is not None:
                raise connection.error
            connection.sink, connection.sink_work = sink, 0.0
            try:
                await connection.wait(self.timeout)
            finally:
                connection.sink = None
            if connection.enough:
                return

    async def aclose(self) -> None:
        self.pool.release(self.connection)


class PoeTransport(httpx.AsyncBaseTransport):
    """app.state.poe's transport: HTTP/1.1 over PoeConnections, kept alive and reused (at most
    `limits`), TLS by the event loop's own (uvloop's is compiled). httpcore's, which it replaces,
    cost as much per chunk relayed as everything else together: h11's parse in Python, six layers
    of async generators, anyio's cancel scope and timer per read."""

    def __init__(self, limits: httpx.Limits) -> None:
        self.limits, self.ssl = limits, httpx.create_ssl_context()
        self.idle: dict[tuple, list[PoeConnection]] = {}
        self.open: set[PoeConnection] = set()
        self.slots = asyncio.Semaphore(limits.max_connections or 1 << 30)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        for attempt in (1, 2):
            connection, reused = self.idle_connection(origin), True
            if connection is None:
                connection, reused = await self.connect(origin, timeouts), False
            try:
                await connection.send(request, timeouts.get("write"))
                while not connection.head_done and connection.error is None:
                    await connection.wait(timeouts.get("read"))
            except BaseException:
                self.close(connection)
                raise
            if connection.head_done:
                body = PoeBody(self, connection, timeouts.get("read"))
                return httpx.Response(connection.status, headers=connection.headers, stream=body,
                                      extensions={"http_version": b"HTTP/1.1", "poe_body": body})
            self.close(connection)
            if not reused or connection.started or attempt == 2:
                raise connection.error
            # Poe closed a kept-alive connection as it was reused: it saw nothing; once more.

    async def connect(self, origin: tuple, timeouts: dict) -> PoeConnection:
        scheme, host, port = origin
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self.slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("too many connections to Poe at once") from None
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                _, connection = await asyncio.get_running_loop().create_connection(
                    lambda: PoeConnection(origin), host, port,
                    ssl=self.ssl if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None)
        except BaseException as exc:
            self.slots.release()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"{host}:{port} did not answer in time") from None
            if isinstance(exc, OSError):  # ssl.SSLError is one
                raise httpx.ConnectError(str(exc)) from exc
            raise
        self.open.add(connection)
        return connection

    def idle_connection(self, origin: tuple) -> PoeConnection | None:
        idle, now = self.idle.get(origin), time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.alive and now - connection.idle_since < \
                    (self.limits.keepalive_expiry or 0):
                connection.busy = True
                connection.begin()
                return connection
            self.close(connection)
        return None

    def release(self, connection: PoeConnection) -> None:
        """A response is done with its connection: kept for the next if its answer was read
        whole and both ends keep it, else closed."""
        if connection not in self.open:
            return
        if not (connection.complete and connection.keep_alive and not connection.body
                and connection.alive):
            self.close(connection)
            return
        idle = self.idle.setdefault(connection.origin, [])
        if connection in idle:
            return
        connection.idle_since, connection.busy = time.monotonic(), False
        idle.append(connection)
        if len(idle) > (self.limits.max_keepalive_connections or 0):
            self.close(idle.pop(0))

    def close(self, connection: PoeConnection) -> None:
        if connection in self.open:
            self.open.discard(connection)
            self.slots.release()
        if connection in self.idle.get(connection.origin, ()):
            self.idle[connection.origin].remove(connection)
        if connection.transport is not None:
            connection.transport.close()

    async def aclose(self) -> None:
        for connection in list(self.open):
            self.close(connection)


def proxy_mounts() -> dict[str, httpx.AsyncBaseTransport | None]:
    """What httpx does with HTTP(S)_PROXY, ALL_PROXY and NO_PROXY (given a transport of one's
    own, it does nothing): Poe through a proxy is httpx's own transport's affair."""
    proxies = urllib.request.getproxies()
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {
        f"{scheme}://": httpx.AsyncHTTPTransport(proxy=url if "://" in url else f"http://{url}")
        for scheme in ("http", "https", "all") if (url := proxies.get(scheme))}
    for host in (h.strip() for h in proxies.get("no", "").split(",")):
        if host == "*":
            return {}
        if host:
            direct = "://" in host or host == "localhost" or host.replace(".", "").isdigit()
            mounts[host if "://" in host else f"all://{host}" if direct else
                   f"all://[{host}]" if ":" in host else f"all://*{host}"] = None
    return mounts


class PoeClient(httpx.AsyncClient):
    """app.state.poe: httpx's client over PoeTransport (uploads, reports and the model list use
    it as such), and open(), the relay's way in: a query's request made from the headers the
    client would give it (worked out once per URL), handed to PoeTransport itself, not through
    the client's layers (cookies, redirects, auth, hooks: some 80 us a call), unless a proxy
    (HTTP(S)_PROXY) is httpx's affair. A query carries no cookies, as fastapi_poe's own client
    (a new one each call) sends none. No read timeout: relay_poe's deadline bounds each wait
    for Poe (a timer per read costs)."""

    def __init__(self, settings: Settings) -> None:
        self.transport, mounts = PoeTransport(httpx.Limits(max_connections=1000,
                                                           max_keepalive_connections=100)), \
            proxy_mounts()
        super().__init__(transport=self.transport, mounts=mounts, timeout=httpx.Timeout(
            settings.poe_timeout, connect=min(settings.poe_timeout, 30.0), read=None))
        self.proxied = any(mount is not None for mount in mounts.values())
        # URL -> (the parsed URL, the headers but the key's and the body's length, the key's at)
        self.heads: dict[str, tuple[httpx.URL, list[tuple[bytes, bytes]], int]] = {}

    async def open(self, url: str, body: bytes, api_key: str) -> httpx.Response:
        """POSTs a query (its JSON) as fastapi_poe's stream_request would; the answer's head."""
        if self.is_closed:  # (as the client's own send says it)
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if url not in self.heads:
            if len(self.heads) >= 1000:  # model names are the caller's: no unbounded growth
                self.heads.clear()
            request = self.build_request("POST", url, headers=poe_headers("-"))
            raw = [pair for pair in request.headers.raw
                   if pair[0].lower() not in (b"content-length", b"cookie")]
            self.heads[url] = request.url, raw, [name.lower() for name, _ in raw].index(
                b"authorization")
        parsed, raw, at = self.heads[url]
        headers = raw.copy()
        headers[at] = (headers[at][0], b"Bearer " + api_key.encode("ascii"))
        request = httpx.Request("POST", parsed, headers=headers, content=body,
                                extensions={"timeout": self.timeout.as_dict()})
        if self.proxied:
            return await self.send(request, stream=True)
        return await self.transport.handle_async_request(request)


# ---------------------------------------------------------------------------------------------
# Replies: each reply is read to its end by its own task (Reply.run), so a client leaving changes
# nothing; the response that started it only listens (Listener). Its text is written at most each
# FLUSH_SECONDS, its end once, a refused write retried from memory: the relay never waits on SQLite.

RETRY_SECONDS = 1.0
# A reply's task, or the response relaying it, yields the event loop after holding it this long.
TURN_SECONDS = 0.005
# What a bot may make a reply hold, past its text: past these, the reply fails (502).
MAX_TOOL_CALLS = 128  # OpenAI's limit on a request's tools
MAX_REPLY_FILES = 100
# A reply's text is joined, and handed to SQLite, in pieces of about this many characters.
TEXT_PIECE_CHARS = 1 << 24
# A failure after some output is 502 (the reply cut off), but for these, which say more: Poe's
# rate limit (429: waiting is the cure, API.md says never 502) and Poe's silence (504).
CUT_OFF_KEPT = (429, 504)


@dataclass
class ResponseRecord:
    """What a Responses turn stores with its reply's end: the response as JSON (None: no trace),
    whether its new conversation goes too, and the tool calls the client got (only those kept)."""
    response_id: str
    body: str | None
    drop_conversation: bool
    tool_calls: list[dict]


@dataclass
class ReplyEnd:
    """A stored reply's end (save_reply_end); kept, and written again, while SQLite refuses it."""
    conversation_id: str
    message_id: int
    updated_at: str | None  # the conversation's before the turn: put back when it is discarded
    inserted_ids: list[int]
    replaces: int | None
    status: str
    discard: bool  # failed before any output: the turn leaves no trace (its caller may resend it)
    rewrite: bool  # `parts` replace the stored content instead of extending it
    parts: list[str]  # the text not yet stored, as it came
    attachments: str | None
    tool_calls: str | None
    response: ResponseRecord | None


def text_pieces(parts: list[str], limit: int = TEXT_PIECE_CHARS) -> Iterator[str]:
    """`parts` joined into pieces of at most `limit` characters (a longer part is one), one by
    one; at least one."""
    piece, size = [], 0
    for part in parts:
        if size and size + len(part) > limit:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(part)
        size += len(part)
    yield "".join(piece)


def store_all_but_last(db: sqlite3.Connection, message_id: int, parts: list[str],
                       rewrite: bool, limit: int = TEXT_PIECE_CHARS) -> tuple[str, str]:
    """Stores the reply text `parts` in its message but their last piece (text_pieces); returns
    the SQL and the text that store that piece, for its caller's UPDATE. A long text is joined,
    and handed to SQLite, a piece at a time: one join of tens of MB would hold the GIL, and the
    event loop with it, for tens of ms; SQLite's own work runs without it."""
    content_sql, last = ("?" if rewrite else "content || ?"), None
    for piece in text_pieces(parts, limit):
        if last is not None:
            db.execute(f"UPDATE messages SET content = {content_sql} WHERE id = ?",
                       (last, message_id))
            content_sql = "content || ?"
        last = piece
    return content_sql, last


def save_reply_text(db: sqlite3.Connection, message_id: int, parts: list[str],
                    rewrite: bool) -> None:
    if rewrite or any(parts):
        content_sql, text = store_all_but_last(db, message_id, parts, rewrite)
        db.execute(f"UPDATE messages SET content = {content_sql}, updated_at = {NOW_SQL} "
                   "WHERE id = ?", (text, message_id))


def save_reply_texts(db: sqlite3.Connection, texts: list[tuple[int, list[str], bool]]) -> None:
    for message_id, text, rewrite in texts:
        save_reply_text(db, message_id, text, rewrite)


def save_reply_end(db: sqlite3.Connection, end: ReplyEnd) -> None:
    response = end.response
    if end.discard:
        db.executemany("DELETE FROM messages WHERE id = ?",
                       [(i,) for i in [*end.inserted_ids, end.message_id]])
        touch_conversation(db, end.conversation_id, end.updated_at)
        if response is not None:  # a Responses turn: its record, and its new conversation
            db.execute("DELETE FROM responses WHERE id = ?", (response.response_id,))
            if response.drop_conversation:
                db.execute("DELETE FROM conversations WHERE id = ?", (end.conversation_id,))
        return
    if response is not None:
        db.execute("UPDATE responses SET body = ? WHERE id = ?",
                   (response.body, response.response_id))
    content_sql, text = store_all_but_last(db, end.message_id, end.parts, end.rewrite)
    db.execute(f"UPDATE messages SET content = {content_sql}, status = ?, attachments = ?, "
               f"tool_calls = ?, updated_at = {NOW_SQL} WHERE id = ?",
               (text, end.status, end.attachments, end.tool_calls, end.message_id))
    if end.replaces is not None and end.status == "complete":
        # Only a whole reply replaces the old; a failed or stopped one is kept too: nothing is lost.
        db.execute("DELETE FROM messages WHERE id = ?", (end.replaces,))
        forget_message(db, [(end.conversation_id, end.replaces, None)])
    touch_conversation(db, end.conversation_id)


@dataclass(eq=False)
class Reply:
    """One Poe reply in progress. Its fields change only in its own methods: start() and run()
    relay Poe's events into it, the registry's flushes and end() save it, its Listener is told
    of each."""
    # Where it is stored; a stateless reply (OpenAI routes without store) has no message_id.
    conversation_id: str | None = None
    message_id: int | None = None
    inserted_ids: list[int] = field(default_factory=list)  # this turn's input rows
    user_message_id: int | None = None
    replaces: int | None = None  # a reply this one regenerates: deleted once this is whole
    updated_at: str | None = None  # the conversation's, before this turn
    max_tokens: int | None = None  # the reply ends there (estimate_tokens), finish 'length'
    # A Responses turn: what its end stores with the reply's (ResponseTurn.end).
    ending: Callable[[Reply], ResponseRecord] | None = None
    # What Poe sent.
    chunks: list[str] = field(default_factory=list, init=False)
    files: list[dict] = field(default_factory=list, init=False)
    tool_calls: list[dict] = field(default_factory=list, init=False)  # merged OpenAI calls
    cut: bool = field(default=False, init=False)  # at max_tokens
    # Poe sent output (a stream has begun); a replacement that empties the text leaves it so.
    has_output: bool = field(default=False, init=False)
    counted: tuple[int, int] = field(default=(0, 0), init=False)  # the text's char_counts
    # Saving: chunks[:saved_chunks] are stored, unless `rewrite` (after a replace_response) asks
    # for the stored text whole; `generation` counts replacements, so a late write undoes none.
    saved_chunks: int = field(default=0, init=False)
    rewrite: bool = field(default=False, init=False)
    generation: int = field(default=0, init=False)
    pending: bool = field(default=False, init=False)  # has new text for the next flush
    writing: asyncio.Future | None = field(default=None, init=False)  # the write in flight
    # Who listens, and how it ends.
    listener: Listener | None = field(default=None, init=False)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex, init=False)
    status: str = field(default="streaming", init=False)
    error: tuple[int, str] | None = field(default=None, init=False)
    error_headers: dict | None = field(default=None, init=False)
    stop_error: tuple[int, str] | None = field(default=None, init=False)  # why it was stopped
    registry: Replies | None = field(default=None, init=False)
    task: asyncio.Task | None = field(default=None, init=False)
    running: bool = field(default=False, init=False)  # the task has taken its first step
    done: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    # While its Poe call waits for the budget: the client's ASGI receive, and what watches it.
    receive: Callable | None = field(default=None, init=False)
    waiting: bool = field(default=False, init=False)
    watch: asyncio.Task | None = field(default=None, init=False)

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def start(self, app: Starlette, model: str, query: PoeQuery, api_key: str, *,
              stream: bool, tools: list | None = None, receive: Callable | None = None) -> None:
        """Calls Poe in a task of its own; with `stream`, events are queued for the caller.
        `receive` (the request's) tells when the client leaves while the call waits."""
        self.registry = app.state.replies
        self.listener = Listener(self.message_id is not None) if stream else None
        self.receive = receive
        if self.conversation_id in self.registry.stopping:
            # Stopped while it was prepared: it ends at once, calling no one (with the stop's
            # error, if it had one: its conversation deleted).
            query = None
            self.stop_error = self.error = self.registry.stopping[self.conversation_id]
        self.task = asyncio.create_task(self.run(app, model, query, api_key, tools))
        self.registry.add(self)

    async def run(self, app: Starlette, model: str, query: PoeQuery | None, api_key: str,
                  tools: list | None) -> None:
        cancelled, self.running, status = False, True, "interrupted"
        if self.message_id is None:
            self.keep_watch(True)  # stateless: nobody else would read it
        try:
            if query is not None:
                await relay_poe(app, model, query, api_key, self.take_item, tools, self.queued,
                                self.done)
                # A reply cut at max_tokens is cut off part way, as API.md's 'interrupted' says.
                status = "interrupted" if self.cut else "complete"
        except PoeFailure as exc:
            self.error, self.error_headers = (exc.status, exc.detail), exc.headers
        except asyncio.CancelledError:
            # Stopped, the conversation deleted, or the server shutting down.
            cancelled, self.error = True, self.stop_error
        except Exception:
            log.exception("reading Poe's answer failed")
            self.error = (502, "Poe's answer could not be read")
        self.keep_watch(False)  # (before its end is told: the answer's stream watches then)
        try:
            await asyncio.shield(self.end(status))
        except asyncio.CancelledError:
            cancelled = True
        finally:
            self.registry.forget(self)
            self.done.set()
        if cancelled:
            raise asyncio.CancelledError

    def queued(self, waiting: bool) -> None:
        """relay_poe's word that the call waits for the budget (True), or no longer does: the
        listener is told, and the client watched, so that one who leaves leaves the queue."""
        self.waiting = waiting
        if waiting and self.listener is not None:
            self.listener.publish(("wait",))
        self.keep_watch(waiting or self.message_id is None)

    def keep_watch(self, on: bool) -> None:
        """Watches the client (watch_client) while the reply waits for the budget, or, if it is
        stateless, until its client has some of it: a stream its first output (the stream
        watches its client then, and drop_if_unstored acts), an answer whole its end. Once
        off, for good: the client's `receive` is the answer's then."""
        if on and self.watch is None and self.receive is not None:
            self.watch = asyncio.create_task(self.watch_client())
        elif not on:
            self.receive = None
            if self.watch is not None:
                self.watch.cancel()
                self.watch = None

    async def watch_client(self) -> None:
        """Ends the reply, as a failure before output, once its client is gone (the server
        learns it at once from the closed socket)."""
        await client_leaves(self.receive)
        if not self.task.done():
            self.stop_error = (499, "the client went away while the call waited for the budget"
                               if self.waiting else "the client went away before any output")
            self.task.cancel()

    def take_item(self, kind: str, value: Any) -> bool:
        """relay_poe's `take`: one of its items kept, told to the listener, saved later; True
        at max_tokens (the Poe call ends there)."""
        item = self.take(kind, value)
        if self.listener is not None:
            self.listener.publish(item)  # (first: its text may go to the client at once)
            if self.watch is not None and self.has_output:
                self.keep_watch(False)  # the stream has begun: it watches its client
        if self.message_id is not None and not self.pending:
            self.registry.save_later(self)
        return self.cut

    def take(self, kind: str, value: Any) -> tuple:
        """Keeps one of relay_poe's events; returns what the listener is told."""
        if value and not self.has_output:
            self.has_output = True
        if kind == "replace":
            self.chunks, self.saved_chunks = [value], 0
            self.rewrite, self.generation = True, self.generation + 1
            self.counted = char_counts(value)
        elif kind == "text":
            self.append_text(value)
            value = self.chunks[-1]
        elif kind == "file":
            if len(self.files) == MAX_REPLY_FILES:
                raise PoeFailure(502, "Poe sent too many files")
            self.files.append(value)
            self.append_text(file_markdown(value))
            kind, value = "text", self.chunks[-1]
        else:  # "tool_calls": OpenAI call deltas, merged into self.tool_calls by index
            for delta in value:
                index = delta.get("index") or 0
                if not 0 <= index < MAX_TOOL_CALLS:  # each index up to it is a call we hold
                    raise PoeFailure(502, "Poe sent too many tool calls")
                while len(self.tool_calls) <= index:
                    self.tool_calls.append({"id": "", "type": "function",
                                            "function": {"name": "", "arguments": ""}})
                call = self.tool_calls[index]
                call["id"] = delta.get("id") or call["id"]
                function = delta.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
        return kind, value

    def append_text(self, value: str) -> None:
        """Appends text; at max_tokens (estimate_tokens of the whole reply), only the part that
        fits, and the reply is cut."""
        if self.max_tokens is None:  # (the count is for max_tokens alone)
            self.chunks.append(value)
            return
        ascii_chars, other_chars = char_counts(value)
        total = (self.counted[0] + ascii_chars, self.counted[1] + other_chars)
        # Full: over it, or at it with no room for one more character.
        if tokens_of(*total) > self.max_tokens or (
                tokens_of(*total) == self.max_tokens and total[0] % 4 == 0):
            self.cut = True
            value = prefix_within(value, self.max_tokens, counted=self.counted)
            total = tuple(map(sum, zip(self.counted, char_counts(value))))
        self.chunks.append(value)
        self.counted = total

    def unsaved(self) -> tuple[int, list[str], bool, int, int]:
        """(message_id, text parts, rewrite) for the next flush (joined by its writer), and
        (count, generation) to tell written() what that write held."""
        count, rewrite = len(self.chunks), self.rewrite
        parts = self.chunks[0 if rewrite else self.saved_chunks:count]
        return self.message_id, parts, rewrite, count, self.generation

    def written(self, failed: bool, rewrite: bool, count: int, generation: int) -> None:
        """A flush of this reply's text is done: what it held is stored, unless it failed or a
        replacement came meanwhile (the next flush writes the text whole)."""
        self.writing = None
        if not failed and self.generation == generation:
            self.saved_chunks = count
            self.rewrite = self.rewrite and not rewrite

    async def end(self, status: str) -> None:
        """Stores the reply's end (once the write in flight is done), then tells the listener,
        whatever the database says: a refused write is retried by the registry."""
        self.status = status  # a flush to come leaves it be: its end writes its text
        if self.error is not None and self.has_output and self.error is not self.stop_error \
                and self.error[0] not in CUT_OFF_KEPT:
            # Cut off part way: what arrived is kept; the caller hears 502 (a stop, its reason).
            self.error = (502, self.error[1])
        record = self.ending(self) if self.ending is not None else None
        if self.message_id is not None:
            while self.writing is not None:
                with contextlib.suppress(Exception):
                    await self.writing
                await asyncio.sleep(0)  # a done future's callbacks (written) run next turn
            await self.registry.save_end(self.stored_end(record))
        # The conversation is freed before the end is told: the original's clients send at once.
        self.registry.forget(self)
        if self.listener is not None:
            self.listener.publish(("error", *self.error) if self.error is not None
                                  else ("end", self.message_id, status))
            if self.message_id is not None and self.message_id not in self.registry.unsaved:
                # A slow client keeps this object alive as long as its socket: not the text,
                # stored now (its stream reads only the listener's queue, bounded).
                self.chunks = []

    def stored_end(self, record: ResponseRecord | None) -> ReplyEnd:
        calls = self.tool_calls if record is None else record.tool_calls
        return ReplyEnd(
            conversation_id=self.conversation_id, message_id=self.message_id,
            updated_at=self.updated_at, inserted_ids=self.inserted_ids, replaces=self.replaces,
            status=self.status, discard=self.error is not None and not self.has_output,
            rewrite=self.rewrite, parts=self.chunks[0 if self.rewrite else self.saved_chunks:],
            attachments=json.dumps(self.files) if self.files else None,
            tool_calls=json.dumps(calls) if calls else None, response=record)

    async def stop(self, error: tuple[int, str] | None = None) -> None:
        """Ends it, its text kept 'interrupted'; the caller waiting hears `error`, if given."""
        if self.task is not None and not self.task.done():
            self.stop_error = error
            while not self.running and not self.task.done():
                await asyncio.sleep(0)  # a task cancelled before its first step never ends it
            self.task.cancel()
            await asyncio.wait([self.task])

    def drop_if_unstored(self) -> None:
        """A stateless reply whose client has gone: nobody is left to read the rest."""
        if self.message_id is None and self.task is not None and not self.task.done():
            self.task.cancel()

    def failure(self) -> HTTPException:
        return poe_http_error(*self.error, self.error_headers)

    async def answer(self, stream: bool, whole: Callable[[], Response],
                     events: Callable[[tuple], AsyncIterator[bytes]],
                     begin_waiting: bool = False) -> Response:
        """The caller's answer: whole() once the reply has ended, or the stream of
        events(first), begun only once Poe's first output (or the reply's end) is in hand, so
        that a failure before it is an ordinary JSON error with its status; or, with
        `begin_waiting` (the conversation stream), as soon as the call waits for the budget."""
        if not stream:
            await self.done.wait()
            if self.error is not None:
                raise self.failure()
            return whole()
        first = await self.listener.next()
        # An empty replacement is no output yet; a wait is none for OpenAI's streams.
        while (first[0] == "replace" and not first[1]) or (first[0] == "wait"
                                                           and not begin_waiting):
            first = await self.listener.next()
        if first[0] == "error":
            self.listener.closed = True
            # The reply's own failure, or this client's (fell_behind): the reply goes on.
            raise self.failure() if self.error is not None else \
                HTTPException(first[1], first[2], headers=NO_RETRY)
        # (A tool call's delta may write nothing yet: what comes before it goes at once.)
        self.listener.opening = first[0] == "text" and bool(first[1])
        return EventStream(events(first), listener=self.listener)


class Replies:
    """app.state.replies: replies in progress and the ends owed to SQLite; the one registry."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.by_conversation: dict[str, Reply] = {}  # a conversation's stored reply
        self.by_session: dict[str, Reply] = {}  # every reply, stored or not
        # A conversation whose turn is being prepared (claim); the event is set when it ends.
        self.preparing: dict[str, asyncio.Event] = {}
        # Of those, the ones stopped meanwhile, with the error their caller hears (None: none).
        self.stopping: dict[str, tuple[int, str] | None] = {}
        self.tasks: set[asyncio.Task] = set()
        self.unsaved: dict[int, ReplyEnd] = {}  # message id -> an end SQLite refused
        self.dirty: list[Reply] = []  # replies with text for the next flush
        self.flush_timer: asyncio.TimerHandle | None = None
        self.retrying: asyncio.Task | None = None

    def save_later(self, reply: Reply, delay: float = FLUSH_SECONDS) -> None:
        """The reply's new text goes in the next flush, within `delay` (FLUSH_SECONDS)."""
        if not reply.pending:
            reply.pending = True
            self.dirty.append(reply)
        if self.flush_timer is None:
            self.flush_timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Writes the new text of every reply that has some, in one transaction: a reply's text
        is stored within FLUSH_SECONDS of its arrival, at most once per FLUSH_SECONDS, and 500
        streams cost two writes a second, not a thousand. One refused is tried again after
        RETRY_SECONDS, from memory; a reply whose write is still in flight waits for the next."""
        self.flush_timer = None
        dirty, self.dirty, batch = self.dirty, [], []
        for reply in dirty:
            if reply.status == "streaming" and reply.writing is not None:
                self.dirty.append(reply)
            else:
                reply.pending = False
                if reply.status == "streaming":  # an ended one's end writes its text
                    batch.append(reply)
        if self.dirty:
            self.flush_timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
        if not batch:
            return
        marks = [reply.unsaved() for reply in batch]
        future = self.db.submit_write(save_reply_texts, [mark[:3] for mark in marks])
        for reply in batch:
            reply.writing = future

        def written(future: asyncio.Future) -> None:
            failed = future.cancelled() or future.exception() is not None
            for reply, mark in zip(batch, marks):
                reply.written(failed, *mark[2:])
                if failed and reply.status == "streaming":
                    self.save_later(reply, RETRY_SECONDS)
        future.add_done_callback(written)

    def busy(self, conversation_id: str) -> bool:
        return conversation_id in self.preparing or conversation_id in self.by_conversation

    def sending(self) -> int:
        """The replies Poe is sending now (/health): a turn waiting for the budget is not one."""
        return sum(not reply.waiting for reply in self.by_session.values())

    @contextlib.contextmanager
    def claim(self, conversation_id: str | None) -> Iterator[None]:
        """Holds the conversation for one turn while it is prepared (409 for any other), until
        its reply starts or the preparation fails; None claims nothing."""
        if conversation_id is None:
            yield
            return
        if self.busy(conversation_id):
            raise HTTPException(409, "this conversation already has a reply in progress")
        released = self.preparing[conversation_id] = asyncio.Event()
        try:
            yield
        finally:
            del self.preparing[conversation_id]
            self.stopping.pop(conversation_id, None)
            released.set()

    def add(self, reply: Reply) -> None:
        if reply.conversation_id is not None:
            self.by_conversation[reply.conversation_id] = reply
        self.by_session[reply.session_id] = reply
        self.tasks.add(reply.task)
        reply.task.add_done_callback(self.tasks.discard)

    def forget(self, reply: Reply) -> None:
        if self.by_conversation.get(reply.conversation_id) is reply:
            del self.by_conversation[reply.conversation_id]
        self.by_session.pop(reply.session_id, None)

    async def settle(self, conversation_id: str, error: tuple[int, str] | None = None) -> None:
        """Stops the conversation's reply in progress, and any that starts meanwhile; their
        callers hear `error`, if given."""
        while True:
            if (reply := self.by_conversation.get(conversation_id)) is not None:
                await reply.stop(error)
            elif (released := self.preparing.get(conversation_id)) is not None:
                self.stopping[conversation_id] = error
                await released.wait()  # a turn being prepared: it starts stopped, or it fails
            else:
                return

    async def stop(self, conversation_id: str) -> bool:
        """Stops the conversation's turn, if any: one being prepared (uploading, reading its
        history) goes on to answer as stopped, without calling Poe."""
        if conversation_id in self.preparing:
            self.stopping.setdefault(conversation_id, None)
            return True
        if (reply := self.by_conversation.get(conversation_id)) is not None:
            await reply.stop()
        return reply is not None

    async def save_end(self, end: ReplyEnd) -> None:
        try:
            await self.db.write(save_reply_end, end)
        except HTTPException as exc:
            log.warning("the end of reply %s waits to be stored: %s", end.message_id, exc.detail)
            self.unsaved[end.message_id] = end
            if self.retrying is None or self.retrying.done():
                self.retrying = asyncio.create_task(self.retry_unsaved())

    async def retry_unsaved(self) -> None:
        delay = RETRY_SECONDS
        self.db.wrote.clear()
        while self.unsaved:
            # Any write that goes through says the database takes writes again: no need to wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.db.wrote.wait()
            self.db.wrote.clear()
            for message_id, end in list(self.unsaved.items()):
                try:
                    await self.db.write(save_reply_end, end)
                except HTTPException:
                    delay = min(delay * 2, 10.0)
                    log.warning("the end of reply %s still waits to be stored; next try within "
                                "%g s", message_id, delay)
                    break
                self.unsaved.pop(message_id, None)
                log.info("the end of reply %s is stored", message_id)

    async def stop_all(self, status: int, detail: str) -> None:
        await asyncio.gather(*(reply.stop((status, detail)) for reply in self.by_session.values()))

    async def close(self) -> None:
        """At shutdown: running replies cut off (kept 'interrupted'); refused ends retried once."""
        await self.stop_all(503, "the server is shutting down")
        if self.flush_timer is not None:
            self.flush_timer.cancel()
        if self.retrying is not None:
            self.retrying.cancel()
        for end in list(self.unsaved.values()):
            with contextlib.suppress(HTTPException):
                await self.db.write(save_reply_end, end)


# ---------------------------------------------------------------------------------------------
# Reply streams: what a streaming response is told of its reply (Listener, a bounded queue), and
# how it writes it (EventStream: the events ready at once in one write; a text while it waits,
# at once, by the listener's fast lane, RawBody; SentText, sse()).

# A listener (streaming response) this far behind for BEHIND_SECONDS loses its view (a burst
# from Poe, read at once, puts a client that keeps up this far behind for an instant); the reply
# goes on, stored whole.
LISTENER_BUFFER_BYTES = 2**20
BEHIND_SECONDS = 1.0
FELL_BEHIND = "this client fell too far behind the reply"


class Listener:
    """The reply's events queued for the response that started it: ("wait",) while its Poe call
    waits for the budget, ("text", str), ("replace", str), ("tool_calls", deltas), then ("end",
    message_id, status) or ("error", status, detail). Still past LISTENER_BUFFER_BYTES behind
    BEHIND_SECONDS after it got there (a client not reading), what waits becomes one error. A
    deque and one future for the reader waiting, if any: asyncio.Queue's getters and putters
    cost more than they give here.
    Its fast lane (lane_open): while the reader waits, having written all it took, a text is
    written to the client at once, as the reader would write it (`lane`, its stream's), if the
    socket takes it now (`raw`: RawBody): no task woken for it."""

    def __init__(self, stored: bool) -> None:
        self.loop, self.stored = asyncio.get_running_loop(), stored  # stored: its reply is
        self.items: collections.deque[tuple] = collections.deque()
        self.waiter: asyncio.Future | None = None  # the reader's, while nothing is queued
        self.queued_bytes, self.closed = 0, False  # closed: its response has ended
        self.behind: asyncio.TimerHandle | None = None  # the check, once past the bound
        # A text (one SSE piece at most) as its stream's events, as the stream would send it.
        self.lane: Callable[[str], bytes] | None = None
        self.raw: RawBody | None = None
        self.held = False  # its stream holds events back, to write them with the next
        self.release: Callable[[], Awaitable[None]] | None = None  # writes those: its stream's
        # Its stream writes what comes before its first event with that event's, right after
        # its head, when that is a text (EventStream.opening_frames): Reply.answer sets it,
        # events() clears it.
        self.opening = False
        self.budget_wait = False  # its stream waits between comments on the budget

    def publish(self, item: tuple) -> None:
        if self.closed:
            return
        if item[0] == "text" and self.lane_open(item[1]):
            self.raw.write(self.lane(item[1]))
            return
        self.queued_bytes += len(item[1]) if item[0] in ("text", "replace") else 64
        if self.queued_bytes > LISTENER_BUFFER_BYTES and self.behind is None:
            self.behind = self.loop.call_later(BEHIND_SECONDS, self.check_behind)
        self.append(item)

    def append(self, item: tuple) -> None:
        self.items.append(item)
        if self.waiter is not None:
            if not self.waiter.done():
                self.waiter.set_result(None)
            self.waiter = None

    def lane_open(self, text: str) -> bool:
        """Whether `text` may take the fast lane: its stream waits for its next event with none
        held back, and not for the budget (that wait ends with an event), and its client's
        socket takes the text now."""
        return self.lane is not None and self.raw is not None and not self.held and \
            not self.budget_wait and self.waiter is not None and not self.waiter.done() and \
            len(text) <= SSE_PIECE_CHARS and self.raw.ready()

    def check_behind(self) -> None:
        """Still past the bound: the client is not keeping up; what waits is let go of, it
        hears so (503; whether the reply goes on, stored, or is stopped: nobody else reads it),
        and nothing more is queued."""
        self.behind = None
        if self.closed or self.queued_bytes <= LISTENER_BUFFER_BYTES:
            return
        self.items.clear()
        self.queued_bytes, self.closed = 0, True
        self.append(("error", 503, f"{FELL_BEHIND}; it goes on and is stored whole"
                     if self.stored else f"{FELL_BEHIND}, which is stopped: it is not stored"))

    async def next(self) -> tuple:
        """The next event, once there is one; what its stream holds back is written before it
        waits (the events it was held for gave nothing to write)."""
        while not self.items:
            if self.held and self.release is not None:
                await self.release()
                continue
            self.waiter = self.loop.create_future()
            await self.waiter
        return self.take()

    def take(self) -> tuple:
        item = self.items.popleft()
        self.queued_bytes -= len(item[1]) if item[0] in ("text", "replace") else 64
        return item

    async def events(self, item: tuple) -> AsyncIterator[tuple]:
        """From `item` (already taken) to the end or error event, inclusive."""
        loop = asyncio.get_running_loop()
        turn_began = loop.time()
        self.opening = False
        try:
            while True:
                yield item
                if item[0] in ("end", "error"):
                    return
                if item[0] == "wait":
                    item = await self.next_while_waiting()
                    continue
                if not self.items:
                    item = await self.next()
                    turn_began = loop.time()
                    continue
                if loop.time() - turn_began >= TURN_SECONDS:
                    await asyncio.sleep(0)  # a long queue is drained without yielding otherwise
                    turn_began = loop.time()
                item = self.take()
        finally:
            self.closed = True
            if self.behind is not None:
                self.behind.cancel()
                self.behind = None

    async def next_while_waiting(self) -> tuple:
        """The next event, or ("wait",) again when none comes within BUDGET_COMMENT_SECONDS."""
        self.budget_wait = True
        try:
            async with asyncio.timeout(BUDGET_COMMENT_SECONDS):
                return await self.next()
        except TimeoutError:
            return ("wait",)
        finally:
            self.budget_wait = False


# The ASGI scope's key for the server's own send, which EventStream writes its events with: the
# middlewares' wrappers of send (Starlette's error and exception handlers', CORS', the timing's)
# act on the response's start only, and cost a call each for every event past it.
RAW_SEND = "poe_proxy.send"


class RawBody:
    """A streamed response's body written at once, from a callback (Listener.publish), as
    uvicorn's send would write it (its httptools cycle, whose send is the scope's RAW_SEND), when
    that send would not wait: the response begun in chunks, not ended, the client there, the
    socket not full. of() is None under any other server."""

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle

    @classmethod
    def of(cls, send: Callable) -> RawBody | None:
        cycle = getattr(send, "__self__", None)
        return cls(cycle) if type(cycle) is RequestResponseCycle else None

    def ready(self) -> bool:
        cycle = self.cycle
        return cycle.response_started and cycle.chunked_encoding is True and not (
            cycle.response_complete or cycle.disconnected or cycle.flow.write_paused
            or cycle.transport.is_closing())

    def write(self, data: bytes) -> None:
        if data:  # (an empty chunk would end the body)
            self.cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))


# EventStream writes the events ready at once together, up to this many bytes a write.
STREAM_WRITE_BYTES = 1 << 18


class EventStream(Response):
    """Server-sent events: the bytes of `content` written as they come, those ready together in
    one write (while its `listener` has more queued), until it ends or the client goes (then
    `content` is closed); the listener's texts may also go by its fast lane (RawBody). Headers
    as sse-starlette's, whose response this replaced: it ran four tasks a stream and a lock and
    two calls an event."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict | None = None,
                 listener: Listener | None = None) -> None:
        self.body_iterator, self.listener = content, listener
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-store", "Connection": "keep-alive",
                           "X-Accel-Buffering": "no", **(headers or {})})

    def ready(self) -> bool:
        """More is ready at once: the listener's queue (the opening frames, with a first text
        in hand, have gone before: opening_frames)."""
        return self.listener is not None and bool(self.listener.items)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        # The opening frames, with a first text in hand, go right after the head, from this
        # task, not a turn of the loop later from the writing one.
        opening = await self.opening_frames() if self.listener is not None and \
            self.listener.opening else b""
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        if opening:
            await scope.get(RAW_SEND, send)({"type": "http.response.body", "body": opening,
                                             "more_body": True})
            self.listener.held = False
        if self.listener is not None:
            self.listener.raw = RawBody.of(scope.get(RAW_SEND))
        writing = asyncio.ensure_future(self.write(scope.get(RAW_SEND, send)))
        leaving = asyncio.ensure_future(client_leaves(receive))
        try:
            await asyncio.wait([writing, leaving], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writing, leaving):
                task.cancel()
            await asyncio.wait([writing, leaving])
        if not writing.cancelled():
            writing.result()  # its failure, if any

    async def opening_frames(self) -> bytes:
        """The frames up to the first text's (Listener.opening: in hand, so none waits for Poe),
        joined; what else is queued goes from write()."""
        frames = []
        with contextlib.suppress(StopAsyncIteration):
            while not frames or self.listener.opening:
                frames.append(await anext(self.body_iterator))
                self.listener.held = True  # (no text may pass them by the listener's lane)
        return b"".join(frames)

    async def write(self, send: Callable) -> None:
        """The events' frames as they come, those ready at once in one write: held back while
        more are (`waiting`), and written once none is, or once the listener must wait for Poe
        (Listener.release: what was queued gave nothing to write)."""
        self.send_body, self.waiting, self.waiting_bytes = send, [], 0
        if self.listener is not None:
            self.listener.release = self.write_waiting
        try:
            async with contextlib.aclosing(self.body_iterator) as events:
                async for data in events:
                    self.waiting.append(data)
                    self.waiting_bytes += len(data)
                    if self.ready() and self.waiting_bytes < STREAM_WRITE_BYTES:
                        self.listener.held = True  # (no text may pass them by the lane)
                    else:
                        await self.write_waiting()
        finally:
            if self.listener is not None:
                self.listener.release = None  # (no cycle left for the collector)
        await self.write_waiting()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def write_waiting(self) -> None:
        """What waits, written; forgotten only once sent (a send cancelled while the client's
        socket is full, by a budget comment's timeout, wrote nothing: it goes with the next)."""
        if self.waiting:
            await self.send_body({"type": "http.response.body",
                                  "body": b"".join(self.waiting), "more_body": True})
            self.waiting, self.waiting_bytes = [], 0
        if self.listener is not None:
            self.listener.held = False


async def client_leaves(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# The conversation stream keeps the seed's spacing, as API.md shows it: data: {"content": "..."}
seed_dumps = json.JSONEncoder(ensure_ascii=False).encode
# A chunk larger than this goes out as several events, so that no single one holds the loop.
SSE_PIECE_CHARS = SENT_TEXT_CHARS = 65536


def sse(data: str) -> bytes:
    """One server-sent event, encoded once: JSON has no raw newlines, so one data line does."""
    return b"data: " + data.encode() + b"\n\n"


json_string = json.encoder.encode_basestring  # a str as JSON (non-ASCII kept), in C


def content_event(text: str) -> bytes:
    """sse(seed_dumps({"content": text})), without the encoder's setup for each chunk."""
    return b'data: {"content": ' + json_string(text).encode() + b"}\n\n"


SSE_DONE = sse("[DONE]")


class SentText:
    """The text a streaming client got, so a replace_response extending it goes as the new part
    (clients append). Kept to SENT_TEXT_CHARS: a slow client must not make the server hold it."""

    def __init__(self) -> None:
        self.parts: list[str] | None = []
        self.length = 0

    def add(self, text: str) -> None:
        self.length += len(text)
        if self.parts is not None:
            self.parts.append(text)
            if self.length > SENT_TEXT_CHARS:
                self.parts = None  # forgotten: a later replacement goes out whole

    def deltas(self, kind: str, text: str) -> list[tuple[str, bool]]:
        """What the client is sent for a "text" or "replace" event: the new text, in pieces,
        or (replace) a whole new text that does not extend what it has, once, flagged True."""
        if kind == "replace":
            if self.parts is not None and len(text) >= self.length and \
                    text.startswith("".join(self.parts)):
                text = text[self.length:]
            else:
                self.parts, self.length = [], 0
                self.add(text)
                return [(text, True)]
        self.add(text)
        if len(text) <= SSE_PIECE_CHARS:
            return [(text, False)]
        return [(text[i:i + SSE_PIECE_CHARS], False) for i in range(0, len(text), SSE_PIECE_CHARS)]


# ---------------------------------------------------------------------------------------------
# Conversations

OTHER_GROUP = "其它"
CONVERSATION_SQL = f"""
    SELECT c.id, c.id AS conversation_id, c.system_prompt, coalesce(c.project_id, 0) AS project_id,
           coalesce(p.name, '{OTHER_GROUP}') AS project_name, c.name, c.model, c.assistance_role,
           c.status, c.created_at, c.updated_at
    FROM conversations c LEFT JOIN projects p ON p.id = c.project_id"""
CONVERSATION_FIELDS = ("project_id", "name", "model", "assistance_role", "status")


def get_conversation(db: sqlite3.Connection, conversation_id: str) -> dict:
    return fetch_or_404(db, CONVERSATION_SQL + " WHERE c.id = ?", (conversation_id,),
                        "Conversation not found")


def check_project(db: sqlite3.Connection, project_id: int) -> int | None:
    return None if project_id == 0 else get_project(db, project_id)["id"]


def conversation_changes(data: dict) -> dict[str, Any]:
    changes = {"name": text_field(data, "name"),
               "assistance_role": text_field(data, "assistance_role"),
               "model": model_field(data, empty_ok=True),
               "project_id": int_field(data, "project_id"), "status": int_field(data, "status")}
    if changes["status"] not in (MISSING, None, 0, 1):
        raise HTTPException(400, "status must be 0 (normal) or 1 (archived)")
    return given(changes, nullable=("name", "assistance_role", "model"))


def insert_conversation(db: sqlite3.Connection, changes: dict) -> str:
    conversation_id = str(uuid.uuid4())
    insert_row(db, "conversations", {**changes, "id": conversation_id, "project_id":
                                     check_project(db, changes.get("project_id", 0))})
    if changes.get("system_prompt"):
        db.execute("INSERT INTO messages (conversation_id, role, content) "
                   "VALUES (?, 'system', ?)", (conversation_id, changes["system_prompt"]))
    return conversation_id


async def create_conversation(request: Request) -> JSONResponse:
    data = await read_json(request, empty_ok=True)
    changes = conversation_changes(data)
    if (system_prompt := text_field(data, "system_prompt")) not in (MISSING, None, ""):
        changes["system_prompt"] = system_prompt
    conversation_id = await request.app.state.db.write(insert_conversation, changes)
    return JSONResponse({"conversation_id": conversation_id})


def select_conversations(db: sqlite3.Connection, filters: dict) -> list[dict]:
    where = " AND ".join(f"coalesce(c.{name}, 0) = :{name}" for name in filters) or "1"
    return fetch_all(db, f"{CONVERSATION_SQL} WHERE {where} "
                         "ORDER BY c.updated_at DESC, c.created_at DESC, c.rowid DESC", filters)


async def list_conversations(request: Request) -> JSONResponse:
    filters = given({name: query_int(request, name) for name in ("project_id", "status")})
    if filters.get("status", 0) not in (0, 1):
        raise HTTPException(400, "status must be 0 (normal) or 1 (archived)")
    return await read_answer(request, select_conversations, filters)


async def grouped_conversations(request: Request) -> JSONResponse:
    groups: dict[str, list[dict]] = {}
    for row in await request.app.state.db.read(select_conversations, {}):
        groups.setdefault(row["project_name"], []).append(row)
    return JSONResponse(groups)


def change_conversation(db: sqlite3.Connection, conversation_id: str, changes: dict) -> None:
    get_conversation(db, conversation_id)
    if "project_id" in changes:
        changes["project_id"] = check_project(db, changes["project_id"])
        # Its own references may only name documents of its project (replace_references).
        db.execute("DELETE FROM document_references WHERE conversation_id = ? AND document_id "
                   "NOT IN (SELECT id FROM plan_documents WHERE project_id = ?)",
                   (conversation_id, changes["project_id"]))
    update_row(db, "conversations", conversation_id, changes, stamp="updated_at")


async def update_conversation(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    changes = conversation_changes(await read_json(request))
    if not changes:
        raise HTTPException(400, "give at least one of " + ", ".join(CONVERSATION_FIELDS))
    await request.app.state.db.write(change_conversation, conversation_id, changes)
    return JSONResponse({"message": "Conversation updated"})


async def delete_conversation(request: Request) -> JSONResponse:
    await remove_conversation(request.app, request.path_params["conversation_id"])
    return JSONResponse({"message": "Conversation deleted"})


# What the caller of a turn hears when its conversation is deleted meanwhile (waiting for the
# budget, or part way through the reply): what any request to it would hear from then on.
CONVERSATION_DELETED = (404, "Conversation not found: it was deleted while this turn was in "
                             "progress")


async def remove_conversation(app: Starlette, conversation_id: str) -> None:
    """Deletes it (404 if none) with all it holds, once any reply in progress there has stopped
    (its caller hears CONVERSATION_DELETED)."""
    await app.state.db.read(get_conversation, conversation_id)
    await app.state.replies.settle(conversation_id, CONVERSATION_DELETED)
    await app.state.db.write(lambda db: db.execute("DELETE FROM conversations WHERE id = ?",
                                                   (conversation_id,)))


# ---------------------------------------------------------------------------------------------
# Messages and turns: a turn stores the caller's message and Poe's reply to the history.

MESSAGE_SQL = ("SELECT id, role, content, status, created_at, updated_at, attachments, "
               "tool_calls, tool_call_id, kind, covers_first, covers_last FROM messages")


def json_bytes(body: dict, long_list: str) -> bytes:
    """body (a long list and other keys) as JSON, the list encoded a batch at a time: one dumps of
    the whole holds the GIL, so stalls the event loop, as long as it takes (300 ms at 20 MB)."""
    items = body.pop(long_list)
    head = dumps(body)[:-1].encode()
    # 200 items at a time: a millisecond or so of encoding each, far fewer calls than one each.
    parts = [dumps(items[i:i + 200])[1:-1].encode() for i in range(0, len(items), 200)]
    return b"".join([head, b',"', long_list.encode(), b'":[', b",".join(parts), b"]}"])


def message_json(row: sqlite3.Row | dict, covers: SummaryCovers | None = None) -> dict:
    """A message as listed; a summary, or a message one covers, says so (memory_fields)."""
    message = {key: row[key] for key in
               ("id", "role", "content", "status", "created_at", "updated_at")}
    message |= {name: json.loads(row[name]) for name in ("attachments", "tool_calls") if row[name]}
    if row["tool_call_id"]:
        message["tool_call_id"] = row["tool_call_id"]
    return message | memory_fields(row, covers)


def with_unsaved_ends(messages: list[dict], unsaved: dict[int, ReplyEnd]) -> list[dict]:
    """The messages as they are once the ends SQLite refused so far (Replies.unsaved) are stored."""
    gone = set()
    for end in unsaved.values():
        if end.discard:
            gone.update([*end.inserted_ids, end.message_id])
        elif end.replaces is not None and end.status == "complete":
            gone.add(end.replaces)
    shown = [message for message in messages if message["id"] not in gone]
    for message in shown:
        if (end := unsaved.get(message["id"])) is not None:
            text = "".join(end.parts)
            message["content"] = text if end.rewrite else message["content"] + text
            message["status"] = end.status
            message |= {name: json.loads(value) for name, value in
                        (("attachments", end.attachments), ("tool_calls", end.tool_calls)) if value}
    return shown


def messages_page(db: sqlite3.Connection, conversation_id: str, limit: int | None,
                  before_id: int | None, unsaved: dict[int, ReplyEnd]) -> bytes:
    """The page as JSON bytes: built here, on a reader thread, however long the history."""
    get_conversation(db, conversation_id)
    body: dict[str, Any] = {"conversation_id": conversation_id}
    covers = conversation_covers(db, conversation_id)
    before = INT64 - 1 if before_id is None else before_id
    if limit is None:
        body["messages"] = [message_json(row, covers) for row in db.execute(
            MESSAGE_SQL + " WHERE conversation_id = ? AND id < ? ORDER BY id",
            (conversation_id, before))]
    else:
        rows = db.execute(MESSAGE_SQL + " WHERE conversation_id = ? AND id < ? ORDER BY id DESC "
                          "LIMIT ?", (conversation_id, before, limit + 1)).fetchall()
        body["messages"] = [message_json(row, covers) for row in reversed(rows[:limit])]
        body["has_more"] = len(rows) > limit
    if unsaved:
        body["messages"] = with_unsaved_ends(body["messages"], unsaved)
    return json_bytes(body, "messages")


async def list_messages(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    before_id, limit = query_int(request, "before_id"), query_limit(request, 10000)
    body = await request.app.state.db.read(messages_page, conversation_id, limit, before_id,
                                           dict(request.app.state.replies.unsaved),
                                           long=limit is None)
    return Response(body, media_type="application/json")


@dataclass
class Turn:
    role: str
    content: str
    model: str | None
    stream: bool
    documents: list[int]
    system_prompt_append: str
    attachments: list[dict]


def turn_fields(data: dict) -> Turn:
    role = text_field(data, "role", nullable=False)
    role = "user" if role is MISSING else role
    if role not in ("user", "system", "assistant"):
        raise HTTPException(400, "role must be one of user, system, assistant")
    documents = id_list_field(data, "documents", "document")
    append = text_field(data, "system_prompt_append")
    return Turn(role=role, content=text_field(data, "content", required=True, empty_ok=False),
                model=optional_model(data), stream=bool_field(data, "stream", False),
                documents=documents, system_prompt_append=append if isinstance(append, str) else "",
                attachments=attachment_fields(data.get("attachments")))


def attachment_fields(value: Any) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise HTTPException(400, "attachments must be an array")
    attachments = []
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, dict) or ("url" in item) == ("data" in item):
            raise HTTPException(400, f"{where} must be an object with either url or data")
        attachment = {key: text if (text := text_field(item, key)) not in (MISSING, None, "")
                      else None for key in ("name", "content_type")}
        if "url" in item:
            url = text_field(item, "url", required=True, empty_ok=False)
            if not re.match(r"https?://", url):
                raise HTTPException(400, f"{where}.url must be an http(s) URL")
            attachment["url"] = url
        else:
            data = text_field(item, "data", required=True, empty_ok=False)
            if data.startswith("data:") and "," in data:
                header, data = data.split(",", 1)
                attachment["content_type"] = attachment["content_type"] or \
                    header[5:].split(";")[0] or None
            try:
                attachment["data"] = base64.b64decode(data, validate=True)
            except (ValueError, binascii.Error):
                raise HTTPException(400, f"{where}.data must be base64") from None
        attachments.append(attachment)
    return attachments


def decode_data_url(attachment: dict) -> dict:
    """An attachment given as a data: URL (openai_attachment), with its bytes instead."""
    try:
        data = base64.b64decode(attachment["data_url"].partition(",")[2], validate=True)
    except (ValueError, binascii.Error):
        raise HTTPException(400, "a data: URL's data must be base64") from None
    return {"data": data, "name": attachment["name"], "content_type": attachment["content_type"]}


async def upload_attachments(app: Starlette, api_key: str, attachments: list[dict]) -> list[dict]:
    """Each attachment as Poe will see it: data goes up to POE_UPLOAD_URL first (fastapi_poe's
    upload_file); a URL is passed on as it is. Every data: URL is decoded before any upload."""
    attachments = [await off_loop(len(a["data_url"]) >= LONG_BYTES, decode_data_url, a)
                   if "data_url" in a else a for a in attachments]
    uploaded = []
    for attachment in attachments:
        name, content_type = attachment["name"], attachment["content_type"]
        if "url" in attachment:
            url = attachment["url"]
            name = name or os.path.basename(url.split("?")[0]) or "file"
            content_type = content_type or mimetypes.guess_type(name)[0]
        else:
            name = name or "file" + (mimetypes.guess_extension(content_type or "") or "")
            try:
                async with asyncio.timeout(app.state.settings.poe_timeout):
                    with (request_timing.get() or RequestTiming()).on_poe():
                        result = await fp.upload_file(
                            file=attachment["data"], file_name=name, api_key=api_key,
                            num_tries=1, on_error=on_poe_error,
                            base_url=app.state.settings.poe_upload_url)
            except TimeoutError:
                raise HTTPException(504, "Poe's file upload did not answer in time",
                                    headers=NO_RETRY) from None
            except Exception as exc:  # fastapi_poe's upload raises its own, httpx's and ValueError
                log.warning("upload to Poe failed: %s", type(exc).__name__)
                raise HTTPException(502, f"the attachment {name!r} could not be uploaded to Poe",
                                    headers=NO_RETRY) from None
            url, content_type = result.url, content_type or result.content_type
        uploaded.append({"url": url, "name": name,
                         "content_type": content_type or "application/octet-stream"})
    return uploaded


def system_parts(db: sqlite3.Connection, system_prompt: str, append: str,
                 document_ids: list[int]) -> str:
    """This turn's one system message: prompt, append, then each named document."""
    documents = {row["id"]: row for row in db.execute(
        "SELECT id, filename, content FROM plan_documents WHERE id IN "
        "(SELECT value FROM json_each(?))", (json.dumps(document_ids),))}
    if missing := [str(d) for d in document_ids if d not in documents]:
        raise HTTPException(404, f"Document not found: {', '.join(missing)}")
    # The original's web client sends the ids and their text in the append: none is sent twice.
    parts = [system_prompt, append] + [
        f"----- {documents[d]['filename']} BEGIN -----\n{documents[d]['content']}\n"
        f"----- {documents[d]['filename']} END -----" for d in document_ids
        if not (documents[d]["content"] and documents[d]["content"] in append)]
    return "\n\n".join(part for part in parts if part)


def fit_history(history: list[dict], keep: int, new: int, budget: Budget
                ) -> tuple[list[dict], int]:
    """The history less its oldest messages till all fit the budget (tokens and characters),
    never the first `keep` (the system prompt) nor the last `new` (this request's); and how many
    went."""
    costs = [cost_of(entry["content"]) for entry in history]
    tokens, chars = map(sum, zip(*costs)) if costs else (0, 0)
    start, end = keep, len(history) - new
    while not budget.fits((tokens, chars)) and start < end:
        tokens, chars = tokens - costs[start][0], chars - costs[start][1]
        start += 1
    return history[:keep] + history[start:], start - keep


def load_turn(db: sqlite3.Connection, conversation_id: str, turn: Turn, new_message: dict | None,
              before_id: int | None, sizes: Callable[[dict], tuple[Budget, int]]) -> TurnPlan:
    """On a reader thread: the turn's plan (plan_turn) over the conversation's history (404 if
    none) before `before_id`, then `new_message` (this very dict: its attachments are filled in
    once uploaded); its budget from `sizes` (turn_sizes). A regeneration, with no new message,
    keeps the last turn whole instead. A long history is read from both ends (context_rows:
    `summary_reach`, what its summariser reads at most)."""
    budget, summary_reach = sizes(get_conversation(db, conversation_id))
    context = stored_context(db, conversation_id, before_id, by_covers=True,
                             reach=(summary_reach, reach_chars(budget)))
    system = system_parts(db, context.system_prompt, turn.system_prompt_append, turn.documents)
    rows = context.rows + ([new_message] if new_message is not None else [])
    fixed = len(context.rows) if new_message is not None else turn_starts(rows, len(rows))[-1]
    plan = plan_turn(system, context.summary, rows, fixed, budget)
    if context.head is not None:  # what was not read is summarised from the oldest on
        plan.cut, plan.skipped = context.head, context.skipped
    if not plan.cut and not turn.attachments:  # nothing to wait for: the query is built here
        plan.ready = turn_query(plan, (plan.summary or {}).get("content"), 0)
        plan.rows = []  # freed on this thread, not the loop
    return plan


def begin_turn(db: sqlite3.Connection, conversation_id: str, turn: Turn, new_message: dict,
               sizes: Callable[[dict], tuple[Budget, int]], rows: list[tuple] | None
               ) -> tuple[TurnPlan, tuple | None]:
    """On the writer: load_turn, and, when its query is ready (nothing to summarise or upload),
    `rows` inserted in the same transaction (insert_compacted_turn's ids; None: not inserted):
    a plain turn makes one trip to a worker thread before Poe is called, not two (each is
    ~0.15 ms on two busy cores), and extends exactly the history it read."""
    plan = load_turn(db, conversation_id, turn, new_message, None, sizes)
    if plan.ready is None or rows is None:
        return plan, None
    return plan, insert_compacted_turn(db, conversation_id, rows, None)


def poe_entries(rows: list[dict], fixed: int) -> tuple[list[dict], int]:
    """Stored rows as a conversation turn sends them: tool messages left out (their calls and
    results are the Responses API's), empty ones too (a reply stopped before any text),
    consecutive assistant messages merged with "---" on a line between (Poe wants turns that
    alternate); and how many of the last hold rows[fixed:] (this turn's: never left out)."""
    entries: list[dict] = []
    first_new = None
    for index, row in enumerate(rows):
        if row["role"] == "tool" or not (row["content"] or row["attachments"]):
            continue
        last = entries[-1] if entries else None
        if row["role"] == "assistant" and last is not None and last["role"] == "assistant":
            last["content"] += "\n---\n" + row["content"]
            last["attachments"] = (last["attachments"] or []) + (row["attachments"] or [])
        else:
            entries.append({"role": row["role"], "content": row["content"],
                            "attachments": row["attachments"]})
        if index >= fixed and first_new is None:
            first_new = len(entries) - 1
    return entries, 0 if first_new is None else len(entries) - first_new


def insert_turn(db: sqlite3.Connection, conversation_id: str, messages: list[tuple]
                ) -> tuple[list[int], int, str]:
    """The turn's input messages and an empty 'streaming' reply, before Poe is called; and
    the conversation's updated_at before them, put back if the turn leaves no trace."""
    ids, updated_at = insert_messages(db, conversation_id, messages)
    return ids, insert_reply(db, conversation_id), updated_at


def insert_reply(db: sqlite3.Connection, conversation_id: str) -> int:
    """The empty 'streaming' reply a turn's Poe call fills."""
    return db.execute("INSERT INTO messages (conversation_id, role, content, status) VALUES "
                      "(?, 'assistant', '', 'streaming')", (conversation_id,)).lastrowid


def insert_compacted_turn(db: sqlite3.Connection, conversation_id: str, messages: list[tuple],
                          summary: dict | None) -> tuple[int | None, list[int], int, str]:
    """insert_turn, after the summary its history's compaction made (if any), in one write: so
    the summary's id is below the turn's. Returns the summary's id first."""
    summary_id = None
    if summary is not None:
        require_read_intact(db, conversation_id, summary["read"])
        summary_id = insert_summary(db, conversation_id, summary["content"], summary["covers"])
    return summary_id, *insert_turn(db, conversation_id, messages)


def insert_messages(db: sqlite3.Connection, conversation_id: str, rows: list[tuple]
                    ) -> tuple[list[int], str]:
    """Appends rows (role, content, attachments, tool_calls, tool_call_id), touching the
    conversation; returns their ids and its updated_at before them."""
    before = get_conversation(db, conversation_id)["updated_at"]
    ids = [db.execute("INSERT INTO messages (conversation_id, role, content, attachments, "
                      "tool_calls, tool_call_id) VALUES (?, ?, ?, ?, ?, ?)",
                      (conversation_id, *row)).lastrowid for row in rows]
    touch_conversation(db, conversation_id)
    return ids, before


def message_rows(entries: list[dict]) -> list[tuple]:
    return [(entry["role"], entry["content"],
             json.dumps(entry["attachments"]) if entry["attachments"] else None,
             json.dumps([call.model_dump() for call in entry["tool_calls"]])
             if entry.get("tool_calls") else None, entry.get("tool_call_id"))
            for entry in entries]


def turn_model(settings: Settings, requested: str | None, conversation: dict) -> str:
    """The request's model, else the conversation's, else DEFAULT_MODEL ('' and the web
    client's 'default' name none)."""
    return next((model for model in (requested, conversation.get("model"))
                 if model and model != "default"), settings.default_model)


async def post_message(request: Request) -> Response:
    app, db, settings = request.app, request.app.state.db, request.app.state.settings
    conversation_id = request.path_params["conversation_id"]
    turn = turn_fields(await read_json(request))
    # A user message equal to a continue prompt asks for more of the last reply: sent, not kept.
    continues = turn.role == "user" and turn.content.strip().casefold() in settings.continue_prompts
    sizes = await turn_sizes(app, turn.model)
    try:
        api_key = poe_key(request)
    except HTTPException:
        api_key = None  # its 401 is said once 404 is ruled out
    with app.state.replies.claim(conversation_id):
        new_message = {"role": turn.role, "content": turn.content, "attachments": []}
        rows = [] if continues else message_rows([new_message])
        plan, inserted = await db.read_then_write(begin_turn, conversation_id, turn,
                                                  new_message, sizes,
                                                  rows if api_key is not None else None)
        api_key, model = poe_key(request) if api_key is None else api_key, plan.budget.model
        if inserted is None:
            new_message["attachments"] = await upload_attachments(app, api_key, turn.attachments)
            rows = [] if continues else message_rows([new_message])
        query, answered, summary = await fit_turn(app, api_key, plan, request.receive)
        if inserted is None:
            inserted = await db.write(insert_compacted_turn, conversation_id, rows, summary)
        summary_id, inserted_ids, message_id, updated_at = inserted
        reply = Reply(conversation_id, message_id, ([] if summary_id is None else [summary_id])
                      + inserted_ids, updated_at=updated_at,
                      user_message_id=inserted_ids[-1] if inserted_ids else None)
        reply.start(app, model, query, api_key, stream=turn.stream, receive=request.receive)
    return await answer_turn(reply, turn.stream, answered | compacted(summary_id, summary))


def compacted(summary_id: int | None, summary: dict | None) -> dict:
    """The answer's word on a compaction its turn made (none: {})."""
    return {} if summary_id is None else {
        "compacted": {"summary_message_id": summary_id, "covers": summary["covers"]}}


async def answer_turn(reply: Reply, stream: bool, memory: dict) -> Response:
    """The answer to a stored turn, streamed or not (API.md "Messages"); `memory` says what
    its history's fitting did: context_trimmed, compacted."""
    ids = {"conversation_id": reply.conversation_id, "user_message_id": reply.user_message_id,
           "assistant_message_id": reply.message_id}

    def whole() -> JSONResponse:
        body = {"conversation_id": reply.conversation_id, "reply": reply.text,
                "message_id": reply.message_id, **ids}
        if reply.status != "complete":
            body["status"] = reply.status
        return JSONResponse(body | memory)
    return await reply.answer(stream, whole, lambda first: conversation_events(
        reply, first, {**ids, "session_id": reply.session_id}, memory), begin_waiting=True)


async def conversation_events(reply: Reply, first: tuple, ids: dict,
                              memory: dict) -> AsyncIterator[bytes]:
    yield sse(seed_dumps(ids))
    sent = SentText()

    def texts(kind: str, text: str) -> list[bytes]:
        return [sse(seed_dumps({"content": piece, "replace": True})) if replace
                else content_event(piece) for piece, replace in sent.deltas(kind, text)]
    def lane(text: str) -> bytes:  # texts("text", text), joined, for a text of one piece
        sent.add(text)
        return content_event(text)
    reply.listener.lane = lane
    async for item in reply.listener.events(first):
        kind = item[0]
        if kind == "wait":  # for the budget: at once, then every BUDGET_COMMENT_SECONDS
            yield BUDGET_COMMENT
        elif kind in ("text", "replace"):
            for data in texts(kind, item[1]):
                yield data
        elif kind == "end":
            end = {"content": "", "finish_reason": "stop", "message_id": item[1]}
            if item[2] != "complete":
                end["status"] = item[2]
            yield sse(seed_dumps(end | memory))
        elif kind == "error":
            error = {"message": item[2], "status": item[1]}
            if item[1] == 429 and "Retry-After" in (reply.error_headers or {}):
                error["retry_after"] = int(reply.error_headers["Retry-After"])
            yield sse(seed_dumps({"error": error}))
    yield SSE_DONE


async def stop_conversation(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    await request.app.state.db.read(get_conversation, conversation_id)
    return JSONResponse({"stopped": await request.app.state.replies.stop(conversation_id)})


async def stop_stream(request: Request) -> JSONResponse:
    session_id = text_field(await read_json(request), "session_id", required=True)
    reply = request.app.state.replies.by_session.get(session_id)
    if reply is None:
        raise HTTPException(404, "Stream session not found")
    await reply.stop()
    return JSONResponse({"message": "Stream stopped", "session_id": session_id})


async def stop_replies_of(app: Starlette, message_ids: set[int]) -> None:
    """Stops the replies in progress that write or answer one of these messages."""
    for reply in [reply for reply in app.state.replies.by_session.values()
                  if message_ids & {reply.message_id, *reply.inserted_ids}]:
        await reply.stop()


def forget_responses(db: sqlite3.Connection, messages: list[tuple[str, int]]) -> None:
    """Deletes the stored responses whose turn holds one of these (conversation id, message id):
    a response keeps its reply's text as served, which must not outlive a message deleted."""
    db.executemany("DELETE FROM responses WHERE conversation_id = ? AND ? BETWEEN "
                   "first_message_id AND last_message_id", messages)


def deleted_ids(db: sqlite3.Connection, ids: list[int]) -> set[int]:
    """Which of `ids` (messages) are no longer stored."""
    return set(ids) - {row[0] for row in db.execute(
        "SELECT id FROM messages WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))}


def forget_message(db: sqlite3.Connection, deleted: list[tuple[str, int, str | None]]) -> None:
    """What a deleted (or cut) message leaves elsewhere, given (conversation id, message id,
    kind): the summaries covering it (forget_summaries_covering; a summary deleted is only
    undone) and the stored responses holding any of them. What a user deleted is gone."""
    summaries = forget_summaries_covering(db, [(conversation_id, message_id) for
                                               conversation_id, message_id, kind in deleted
                                               if kind is None])
    forget_responses(db, [(row[0], row[1]) for row in deleted] + summaries)


def delete_message_rows(db: sqlite3.Connection, ids: list[int],
                        conversation_id: str | None = None) -> int:
    """Deletes messages (of one conversation, if given), the summaries covering them and their
    responses (forget_message), touching their conversations; the count."""
    deleted = db.execute("DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) AND "
                         "(? IS NULL OR conversation_id = ?) RETURNING conversation_id, id, kind",
                         (json.dumps(ids), conversation_id, conversation_id)).fetchall()
    forget_message(db, [tuple(row) for row in deleted])
    for conversation in {row[0] for row in deleted}:
        touch_conversation(db, conversation)
    return len(deleted)


async def delete_messages(request: Request) -> JSONResponse:
    ids = id_list_field(await read_json(request), "message_ids", "message", required=True)
    await stop_replies_of(request.app, set(ids))
    count = await request.app.state.db.write(delete_message_rows, ids)
    return JSONResponse({"message": f"{count} messages deleted"})


async def delete_message(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    message_id = request.path_params["message_id"]
    await request.app.state.db.read(get_conversation, conversation_id)
    # Checked before any reply is stopped: another conversation's reply goes on.
    await request.app.state.db.read(fetch_or_404, "SELECT id FROM messages WHERE id = ? AND "
                                    "conversation_id = ?", (message_id, conversation_id),
                                    "Message not found")
    await stop_replies_of(request.app, {message_id})
    if not await request.app.state.db.write(delete_message_rows, [message_id], conversation_id):
        raise HTTPException(404, "Message not found")
    return JSONResponse({"message": "Message deleted"})


def regeneration(db: sqlite3.Connection, conversation_id: str) -> tuple[int | None, int | None]:
    """(reply replaced, user message answered) for a regeneration: a last assistant reply is
    replaced once the new one is whole; else the whole history gets a new reply."""
    get_conversation(db, conversation_id)
    if not db.execute("SELECT 1 FROM messages WHERE conversation_id = ? AND role != 'system'",
                      (conversation_id,)).fetchone():
        raise HTTPException(400, "the conversation has no message to reply to")
    last = db.execute("SELECT id, role FROM messages WHERE conversation_id = ? AND kind IS NULL "
                      "ORDER BY id DESC LIMIT 1", (conversation_id,)).fetchone()
    replaced = last["id"] if last["role"] == "assistant" else None
    if replaced is not None and (covering := db.execute(
            f"SELECT id FROM messages WHERE conversation_id = ? AND {IS_SUMMARY} AND "
            "covers_first <= ? AND covers_last >= ? ORDER BY id DESC LIMIT 1",
            (conversation_id, replaced, replaced)).fetchone()):
        raise HTTPException(409, f"the reply to regenerate is covered by summary {covering[0]}, "
                                 "which would keep its text: delete that summary first (it "
                                 "undoes the compaction), then regenerate")
    user = db.execute("SELECT id FROM messages WHERE conversation_id = ? AND id < ? AND "
                      "role = 'user' ORDER BY id DESC LIMIT 1",
                      (conversation_id, INT64 - 1 if replaced is None else replaced)).fetchone()
    return replaced, user[0] if user else None


async def regenerate(request: Request) -> Response:
    app, db, settings = request.app, request.app.state.db, request.app.state.settings
    conversation_id = request.path_params["conversation_id"]
    data = await read_json(request, empty_ok=True)
    model, stream = optional_model(data), bool_field(data, "stream", False)
    conversation = await db.read(get_conversation, conversation_id)
    api_key = poe_key(request)
    model = turn_model(settings, model, conversation)
    with app.state.replies.claim(conversation_id):
        replaced, user_id = await db.read(regeneration, conversation_id)
        turn = Turn("assistant", "", model, stream, [], "", [])
        plan = await db.read(load_turn, conversation_id, turn, None, replaced,
                             await turn_sizes(app, model))
        query, answered, summary = await fit_turn(app, api_key, plan, request.receive)
        summary_id, _, message_id, updated_at = await db.write(
            insert_compacted_turn, conversation_id, [], summary)
        reply = Reply(conversation_id, message_id, [] if summary_id is None else [summary_id],
                      updated_at=updated_at, replaces=replaced, user_message_id=user_id)
        reply.start(app, model, query, api_key, stream=stream, receive=request.receive)
    return await answer_turn(reply, stream, answered | compacted(summary_id, summary))


# ---------------------------------------------------------------------------------------------
# Memory: one token estimate, each model's window, and compaction: what no longer fits a turn is
# summarised by one Poe call, the summary stored as a message of its own; nothing is dropped.

def char_counts(text: str) -> tuple[int, int]:
    """(ASCII characters, other characters), at C speed."""
    if text.isascii():
        return len(text), 0
    ascii_chars = len(text.encode("ascii", "ignore"))
    return ascii_chars, len(text) - ascii_chars


def tokens_of(ascii_chars: int, other_chars: int) -> int:
    return (ascii_chars + 3) // 4 + other_chars


def estimate_tokens(text: str) -> int:
    """The one estimate (Poe reports no token counts): four ASCII characters a token (OpenAI's
    rule of thumb for English), each other character a token of its own (CJK, emoji...). Never
    less than the text's UTF-8 bytes / 4: a character takes at most 4 bytes."""
    return tokens_of(*char_counts(text))


Cost = tuple[int, int]  # what a text costs a turn: (estimated tokens, characters)


def cost_of(text: str) -> Cost:
    if text.isascii():  # estimate_tokens' common case, at once
        return (len(text) + 3) // 4, len(text)
    return estimate_tokens(text), len(text)


@dataclass(frozen=True)
class Budget:
    """What one Poe call may be sent: `tokens` (the model's window less the room kept for the
    reply) and `chars` (MAX_CONTEXT_CHARS); whichever is smaller applies."""
    model: str
    window: int
    tokens: int
    chars: int

    def fits(self, cost: Cost, share: float = 1.0) -> bool:
        """Whether `cost` is within the budget (or within `share` of it: 0.5, half)."""
        return cost[0] <= self.tokens * share and cost[1] <= self.chars * share


async def model_budget(app: Starlette, model: str, reply_tokens: int | None = None) -> Budget:
    """A call's budget: the model's window (Poe's list, else CONTEXT_TOKENS) less the reply's
    room: `reply_tokens` (max_tokens, max_output_tokens) when given, else a quarter of it."""
    settings = app.state.settings
    window = await app.state.models.window(model, settings.context_tokens)
    return budget_for(settings, model, window, reply_tokens)


def budget_for(settings: Settings, model: str, window: int, reply_tokens: int | None = None
               ) -> Budget:
    room = window // 4 if reply_tokens is None else reply_tokens
    return Budget(model, window, max(window - room, 0), settings.max_context_chars)


def prefix_within(text: str, tokens: int, chars: int = INT64, counted: Cost = (0, 0)) -> str:
    """The longest beginning of `text` within `tokens` (estimated, after `counted`: the
    char_counts of what comes before it) and `chars`; a binary search, each step at C speed."""
    low, high = 0, min(len(text), max(chars, 0))
    while low < high:
        middle = (low + high + 1) // 2
        ascii_chars, other_chars = char_counts(text[:middle])
        if tokens_of(counted[0] + ascii_chars, counted[1] + other_chars) <= tokens:
            low = middle
        else:
            high = middle - 1
    return text[:low]


# The summariser's system message: a fixed prompt (docs/API.md quotes it, with N for {words}:
# summary_words), the transcript after.
SUMMARY_PROMPT = (
    "You keep the memory of a long conversation. The user message is a transcript of its "
    "earlier part, one block a message (\"role: text\"); it may begin with a summary of what "
    "came before it. Write a summary that lets the conversation go on without the transcript: "
    "the user's goals, requests and preferences; facts, names, numbers, decisions and "
    "conclusions; code, files and commands that matter (quote short ones exactly); what was "
    "being done last and what is still open. Write in the conversation's language, as compact "
    "notes of at most {words} words, with no preamble. Do not answer or continue the "
    "conversation.")
# What the system message says before the summary, on every turn after a compaction.
SUMMARY_HEADER = "Summary of the earlier conversation (stored, not sent in full):"
COMPACT_KEEP_LAST = 4
# The most summary calls one compaction without a turn makes (/compact, /v1/responses/compact,
# compaction_trigger) when what it summarises is longer than the summariser reads at once.
COMPACT_PASSES = 8
CONTEXT_SQL = ("SELECT id, role, content, attachments, tool_calls, tool_call_id FROM messages "
               "WHERE conversation_id = ? AND id > ? AND id < ? AND kind IS NULL ORDER BY id")
# The messages between two ids, summaries aside: both counts read indexes only.
BETWEEN_COUNT_SQL = ("SELECT (SELECT COUNT(*) FROM messages WHERE conversation_id = ?1 AND "
                     "id > ?2 AND id < ?3) - (SELECT COUNT(*) FROM messages WHERE "
                     "conversation_id = ?1 AND id > ?2 AND id < ?3 AND kind = 'summary')")
# A message a summariser read was deleted during its call: the summary is not stored.
CHANGED_WHILE_SUMMARISED = "the conversation changed while it was being summarised: try again"
# A summary (one made by hand without its range is none).
IS_SUMMARY = "kind = 'summary' AND covers_first IS NOT NULL AND covers_last IS NOT NULL"


@dataclass
class StoredContext:
    """A conversation as a turn sends it: its system prompt, its current summary (the newest:
    {id, content, covers_first, covers_last}) and the messages after that summary's range, in
    id order, summaries left out (each {id, role, content, attachments, tool_calls,
    tool_call_id}, attachments parsed)."""
    system_prompt: str
    summary: dict | None
    rows: list[dict]
    # Read from both ends (stored_context's `reach`): rows[:head] are the oldest, then `skipped`
    # messages that would be sent were not read; head None: every row was read.
    head: int | None = None
    skipped: int = 0


def stored_context(db: sqlite3.Connection, conversation_id: str, before_id: int | None = None,
                   by_covers: bool = False, reach: tuple[int, int] | None = None
                   ) -> StoredContext:
    """On a reader thread, the rows before `before_id` that a turn sends: a compacted history of
    100,000 messages costs the few after its summary. Its summary: the newest made before
    `before_id`; `by_covers` (a regeneration), the newest whose range ends before it, made
    before or after (a /compact after the reply it replaces). With `reach`, a long history is
    read from both ends only (context_rows)."""
    before = INT64 - 1 if before_id is None else before_id
    made_before = "covers_last < ?" if by_covers else "id < ?"
    first = fetch_one(db, "SELECT id, role, content, kind FROM messages WHERE conversation_id = ? "
                          "ORDER BY id LIMIT 1", (conversation_id,))
    prompt = first if first is not None and first["role"] == "system" and \
        first["kind"] is None and first["id"] < before else None
    summary = fetch_one(db, f"SELECT id, content, covers_first, covers_last FROM messages WHERE "
                            f"conversation_id = ? AND {IS_SUMMARY} AND {made_before} "
                            "ORDER BY id DESC LIMIT 1", (conversation_id, before))
    after = max(-1 if prompt is None else prompt["id"],
                -1 if summary is None else summary["covers_last"])
    rows, head, skipped = context_rows(db, conversation_id, after, before, reach)
    for row in rows:
        row["attachments"] = json.loads(row["attachments"]) if row["attachments"] else None
    return StoredContext("" if prompt is None else prompt["content"], summary, rows, head,
                         skipped)


def context_rows(db: sqlite3.Connection, conversation_id: str, after: int, before: int,
                 reach: tuple[int, int] | None) -> tuple[list[dict], int | None, int]:
    """The rows between two ids; with `reach` (characters: what one summary call can read, what
    one turn can send), a history that is longer than both together (one compacted only in
    part, its summaries reading a window at a time) is read from both ends: its newest rows
    while they come to `reach[1]` (older ones could not be sent), then its oldest while they
    come to `reach[0]`, to the end of a turn (what the next summary reads); what lies between
    is left out of this turn and summarised by later ones. Returns the rows, how many are the
    oldest (None: all were read) and how many messages were skipped."""
    if reach is None:
        return fetch_all(db, CONTEXT_SQL, (conversation_id, after, before)), None, 0
    newest, chars = [], 0
    for row in db.execute(CONTEXT_SQL.replace("ORDER BY id", "ORDER BY id DESC"),
                          (conversation_id, after, before)):
        newest.append(dict(row))
        if (chars := chars + len(row["content"])) > reach[1]:
            break
    else:
        return newest[::-1], None, 0
    newest.reverse()
    oldest, chars = [], 0
    for row in db.execute(CONTEXT_SQL, (conversation_id, after, newest[0]["id"])):
        if chars > reach[0] and row["role"] == "user":
            break
        oldest.append(dict(row))
        chars += len(row["content"])
    else:
        return oldest + newest, None, 0
    (skipped,) = db.execute(BETWEEN_COUNT_SQL, (conversation_id, oldest[-1]["id"] if oldest
                                                else after, newest[0]["id"])).fetchone()
    return oldest + newest, len(oldest), skipped


def reach_chars(budget: Budget) -> int:
    """The most characters of messages that can fit `budget` (at least a token each 4)."""
    return min(4 * budget.tokens, budget.chars)


def summary_words(budget: Budget) -> int:
    """How long a summary may be, in words, for a turn within `budget`: a quarter of it (in
    tokens, or characters / 4, whichever is smaller), at about 4/3 tokens a word; at least 50."""
    return max(50, min(budget.tokens, budget.chars // 4) // 4 * 3 // 4)


def summary_prompt(budget: Budget) -> str:
    """SUMMARY_PROMPT for a summary that goes to a turn within `budget`."""
    return SUMMARY_PROMPT.format(words=summary_words(budget))


def summary_system(system: str, summary: str | None) -> str:
    """The one system message: the system prompt's parts, then the summary under its header."""
    return "\n\n".join(filter(None, [system, summary and f"{SUMMARY_HEADER}\n{summary}"]))


def turn_starts(rows: list[dict], end: int) -> list[int]:
    """Where the turns of rows[:end] begin: at each user message (an assistant's tool calls and
    their results are never apart), and at 0."""
    return [0] + [i for i in range(1, end) if rows[i]["role"] == "user"]


def plan_cut(costs: list[Cost], starts: list[int], end: int, fixed: Cost, budget: Budget,
             share: float = 0.5) -> int:
    """How many of the first rows to summarise: all of rows[:end] but the newest whole turns
    (from `starts`) that, with `fixed` (what is always sent), fit `share` of the budget."""
    kept, cut = fixed, end
    for start in reversed([s for s in starts if s < end]):
        turn = tuple(map(sum, zip(*costs[start:cut]))) or (0, 0)
        total = (kept[0] + turn[0], kept[1] + turn[1])
        if not budget.fits(total, share):
            break
        kept, cut = total, start
    return cut


def summary_covers(previous: dict | None, covered: list[dict]) -> list[int]:
    """[first id, last id]: from the previous summary's first (a chain), else the first row's."""
    return [covered[0]["id"] if previous is None else previous["covers_first"],
            covered[-1]["id"]]


def transcript_block(row: dict) -> str:
    """A message as the summariser reads it: `role: text`, its tool calls and files named. A
    stored row (tool_calls as JSON) or an entry of a Responses turn (ToolCallDefinitions)."""
    role = f"tool ({row['tool_call_id']})" if row["role"] == "tool" else row["role"]
    lines = [row["content"]]
    calls = row.get("tool_calls") or []
    for call in json.loads(calls) if isinstance(calls, str) else calls:
        call = call if isinstance(call, dict) else call.model_dump()
        function = call.get("function") or {}
        lines.append(f"[tool call {call.get('id', '')}: {function.get('name', '')}"
                     f"({function.get('arguments', '')})]")
    lines += [f"[file: {a.get('name') or a.get('url')}]" for a in row.get("attachments") or []]
    return f"{role}: " + "\n".join(filter(None, lines))


def summary_transcript(previous: dict | None, rows: list[dict], budget: Budget, offset: int = 0
                       ) -> tuple[str, int, int]:
    """The summariser's user message, how many of `rows` it holds (all a summary of it may
    cover), and where in the first turn's text the next call goes on (0: nowhere): the previous
    summary (its beginning: at most half the room), then a block a message, oldest first, whole
    turns while they fit the summariser's budget (less its prompt); the first turn always, over
    alone as a part: its text from `offset` as far as it fits ('…' at cuts), no row held."""
    prompt = cost_of(SUMMARY_PROMPT)  # its number aside: 8 characters spare for it
    room = [budget.tokens - prompt[0] - 2, budget.chars - prompt[1] - 8]
    head = []
    if previous is not None:  # at most half the room (its beginning): the messages need some
        head = [prefix_within(f"summary: {previous['content']}", room[0] // 2, room[1] // 2)]
        room = [room[0] - estimate_tokens(head[0]), room[1] - len(head[0])]
    starts = [*turn_starts(rows, len(rows)), len(rows)]
    blocks: list[str] = []
    for start, end in zip(starts, starts[1:]):
        turn = [transcript_block(row) for row in rows[start:end]]
        costs = [cost_of(block + "\n\n") for block in turn]
        if sum(c[0] for c in costs) > room[0] or sum(c[1] for c in costs) > room[1] or offset:
            if start > 0:
                return "\n\n".join(head + blocks), start, 0
            text = "\n\n".join(turn)  # the first turn, over alone (or its rest): a part
            part = prefix_within(text[offset:], room[0] - 4, room[1] - 8)
            cut_at = offset + len(part)
            turn = [("…" if offset else "") + part + ("…" if cut_at < len(text) else "")]
            if cut_at < len(text):
                return "\n\n".join(head + turn), 0, cut_at
            offset, costs = 0, [cost_of(turn[0] + "\n\n")]
        blocks += turn
        room = [room[0] - sum(c[0] for c in costs), room[1] - sum(c[1] for c in costs)]
    return "\n\n".join(head + blocks), len(rows), 0


def summariser(app: Starlette, model: str) -> str:
    """Who writes a turn's summaries: COMPACT_MODEL, else the turn's own model."""
    return app.state.settings.compact_model or model


async def turn_sizes(app: Starlette, requested: str | None
                     ) -> Callable[[dict], tuple[Budget, int]]:
    """For load_turn, on its reader, given the conversation: the turn's budget (its model:
    turn_model) and the most characters its summariser reads at once, from the model list
    (fetched first, if it is due)."""
    await app.state.models.get()
    settings, windows = app.state.settings, app.state.models.windows

    def sizes(conversation: dict) -> tuple[Budget, int]:
        model = turn_model(settings, requested, conversation)
        budgets = [budget_for(settings, name, windows.get(name, settings.context_tokens))
                   for name in (model, settings.compact_model or model)]
        return budgets[0], reach_chars(budgets[1])
    return sizes


async def summary_of(app: Starlette, api_key: str, model: str, previous: dict | None,
                     covered: list[dict], turn: Budget, passes: int = 1
                     ) -> tuple[str, int, int]:
    """The summary of `covered` (after `previous`, the summary they follow) by `model`, for
    turns within `turn` (summary_prompt): a call (summarise) on the transcript (summary_transcript);
    while some of `covered` did not fit it, up to `passes` calls, each reading the summary so far
    and what is next (a first turn too long for one, in parts, up to COMPACT_PASSES calls).
    Returns the summary, the tokens the calls were sent, and how many of `covered` it covers
    (whole turns). PoeFailure when a call fails, 413 when the first turn cannot be read whole."""
    budget, tokens, seen, offset = await model_budget(app, model), 0, 0, 0
    summary, whole = "", ("", 0)  # the last summary of whole turns, and how many
    for call in range(max(passes, COMPACT_PASSES)):
        transcript, count, cut_at = await asyncio.to_thread(summary_transcript, previous,
                                                            covered[seen:], budget, offset)
        if not count and (cut_at <= offset or seen and not offset):
            break  # not a character more fits; or a long turn after others: the next reads it
        summary = await summarise(app, api_key, model, summary_prompt(turn), transcript)
        tokens += estimate_tokens(summary_prompt(turn)) + estimate_tokens(transcript)
        seen, offset, previous = seen + count, cut_at, {"content": summary}
        whole = whole if offset else (summary, seen)
        if seen == len(covered) or call + 1 >= passes and not offset:
            break
    summary, seen = whole  # (a turn read in part, to no end, is in none)
    if not seen:
        raise PoeFailure(413, f"the oldest message is too long for {model} to summarise (in "
                              f"{COMPACT_PASSES} calls): it is left as it is")
    return summary, tokens, seen


async def summarise(app: Starlette, api_key: str, model: str, prompt: str,
                    transcript: str) -> str:
    """One Poe call to `model` (relay_poe: num_tries=1, POE_TIMEOUT): the prompt (summary_prompt),
    then the transcript; its whole text. PoeFailure when it fails or says nothing."""
    query = await off_loop(len(transcript) >= LONG_BYTES, plain_query, [
        {"role": "system", "content": prompt, "attachments": None},
        {"role": "user", "content": transcript, "attachments": None}])
    chunks: list[str] = []

    def take(kind: str, value: Any) -> bool:
        if kind == "replace":
            chunks.clear()
        if kind in ("text", "replace"):
            chunks.append(value)
        return False
    await relay_poe(app, model, query, api_key, take)
    if not (text := "".join(chunks).strip()):
        raise PoeFailure(502, f"the summary from {model} was empty")
    return text


def insert_summary(db: sqlite3.Connection, conversation_id: str, content: str,
                   covers: list[int] | None) -> int:
    """A summary message; covers None: it stands for nothing stored (a compaction item at the
    start of a new conversation's input), so it covers itself alone: [its id, its id]."""
    summary_id = db.execute("INSERT INTO messages (conversation_id, role, content, kind, "
                            "covers_first, covers_last) VALUES (?, 'system', ?, 'summary', ?, ?)",
                            (conversation_id, content, *(covers or [0, 0]))).lastrowid
    if covers is None:
        db.execute("UPDATE messages SET covers_first = ?, covers_last = ? WHERE id = ?",
                   (summary_id, summary_id, summary_id))
    return summary_id


def read_range(rows: list[dict], summary: dict | None) -> tuple[int, int, int, int | None]:
    """(first id, last id, count, summary id) of what a summariser read: the stored rows
    (stored_context's: in id order, all the conversation's non-summary messages between the
    two) and the current summary, if any."""
    return rows[0]["id"], rows[-1]["id"], len(rows), None if summary is None else summary["id"]


def require_read_intact(db: sqlite3.Connection, conversation_id: str,
                        read: tuple[int, int, int, int | None]) -> None:
    """On the writer, before a summary is stored: 409 if a message the summariser read was
    deleted during its call (ids only grow: a range can lose messages, never gain them), or the
    summary it read (deleted with a message it covered: forget_summaries_covering), so a
    summary never holds deleted text."""
    first, last, count, summary_id = read
    (now,) = db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND "
                        "kind IS NULL AND id BETWEEN ? AND ?",
                        (conversation_id, first, last)).fetchone()
    if now != count or summary_id is not None and not db.execute(
            "SELECT 1 FROM messages WHERE id = ?", (summary_id,)).fetchone():
        raise HTTPException(409, CHANGED_WHILE_SUMMARISED)


def store_summary(db: sqlite3.Connection, conversation_id: str, content: str,
                  covers: list[int], read: tuple[int, int, int, int | None] | None) -> int:
    """A summary made by /compact or /v1/responses/compact: at the end of the conversation,
    which it touches (409 if what it read changed meanwhile: require_read_intact)."""
    if read is not None:
        require_read_intact(db, conversation_id, read)
    summary_id = insert_summary(db, conversation_id, content, covers)
    touch_conversation(db, conversation_id)
    return summary_id


@dataclass
class TurnPlan:
    """A stored turn before its Poe call (plan_turn, on a reader thread): its system message's
    parts, the current summary, the rows after it then this turn's input (rows[fixed:]: never
    summarised nor left out), the budget, and rows[:cut] to summarise first (0: none)."""
    system: str
    summary: dict | None
    rows: list[dict]
    fixed: int
    budget: Budget
    cut: int
    skipped: int = 0  # messages not read (context_rows), left out of this turn
    # The query and how many were left out, when nothing was left to do but build it.
    ready: tuple[PoeQuery, int] | None = None


def sent_cost(row: dict) -> Cost:
    """What a row costs a conversation turn: tool messages and empty ones are not sent."""
    return (0, 0) if row["role"] == "tool" else cost_of(row["content"])


def plan_turn(system: str, summary: dict | None, rows: list[dict], fixed: int,
              budget: Budget) -> TurnPlan:
    """The turn as it goes: whole when it fits; else its oldest turns summarised (with the
    current summary), the rest and that summary under half the budget. 413 when the system
    message and this turn's input alone do not fit."""
    costs = [sent_cost(row) for row in rows]
    alone = tuple(map(sum, zip(cost_of(system), *costs[fixed:])))
    if not budget.fits(alone):
        raise HTTPException(413, f"this turn does not fit the context window of {budget.model}: "
                                 f"the system message and the new message come to about "
                                 f"{alone[0]} tokens ({alone[1]} characters), and of its "
                                 f"{budget.window} tokens {budget.tokens} may be sent (the rest "
                                 f"is kept for the reply; MAX_CONTEXT_CHARS is {budget.chars})")
    held = tuple(map(sum, zip(alone, cost_of(summary_system("", (summary or {}).get(
        "content"))))))  # the current summary counts: too long, it is summarised again
    whole = tuple(map(sum, zip(held, *costs[:fixed])))
    cut = 0 if budget.fits(whole) else plan_cut(costs, turn_starts(rows, fixed), fixed, held,
                                                 budget)
    return TurnPlan(system, summary, rows, fixed, budget, cut)


async def fit_turn(app: Starlette, api_key: str, plan: TurnPlan, receive: Callable | None = None
                   ) -> tuple[PoeQuery, dict, dict | None]:
    """The turn's query, its history made to fit: compacted first when planned (a summary call
    to COMPACT_MODEL, its client watched: while_client_stays), else, or when it fails, trimmed.
    Returns the query, the answer's fields ({"context_trimmed": N} when N > 0) and the summary
    to store, if made; the plan's rows are let go of (let_go)."""
    if plan.ready is not None:
        query, trimmed = plan.ready
        return query, {"context_trimmed": trimmed} if trimmed else {}, None
    summary, start, made = (plan.summary or {}).get("content"), 0, None
    if plan.cut:
        model = summariser(app, plan.budget.model)
        try:
            summary, _, start = await while_client_stays(receive, summary_of(
                app, api_key, model, plan.summary, plan.rows[:plan.cut], plan.budget))
            # It covers what the summariser read; what did not fit goes on (trimmed if over).
            made = {"content": summary, "read": read_range(plan.rows[:start], plan.summary),
                    "covers": summary_covers(plan.summary, plan.rows[:start])}
        except PoeFailure as exc:
            log.warning("compacting a history with %s failed (%s: %s): its oldest messages are "
                        "left out instead", model, exc.status, exc.detail)
        # A message deleted during the call (after what it read) is gone from the turn too.
        kept = plan.rows[start:plan.fixed]
        if gone := await app.state.db.read(deleted_ids, [row["id"] for row in kept]):
            kept = [row for row in kept if row["id"] not in gone]
            plan = dataclasses.replace(plan, rows=[*plan.rows[:start], *kept,
                                                   *plan.rows[plan.fixed:]],
                                       fixed=start + len(kept))
    # Off the loop, as load_turn was: pydantic's work on a long history takes milliseconds.
    query, trimmed = await asyncio.to_thread(turn_query, plan, summary, start)
    trimmed += plan.skipped
    await let_go(plan.rows)
    return query, {"context_trimmed": trimmed} if trimmed else {}, made


def turn_query(plan: TurnPlan, summary: str | None, start: int) -> tuple[PoeQuery, int]:
    """The query: the system message (with `summary`), then rows[start:] as Poe's messages; the
    oldest left out while over the budget, then the summary cut if it still is; how many went."""
    entries, new = poe_entries(plan.rows[start:], plan.fixed - start)
    system = summary_system(plan.system, summary)
    history = ([{"role": "system", "content": system, "attachments": None}] if system else []) \
        + entries
    kept, left_out = fit_history(history, int(bool(system)), new, plan.budget)
    if summary:  # kept[0] is the system message
        rest = tuple(map(sum, zip(cost_of(summary_system(plan.system, " ")),
                                  *(cost_of(e["content"]) for e in kept[1:]))))
        if not plan.budget.fits((rest[0] + estimate_tokens(summary), rest[1] + len(summary))):
            # Over what is left even alone: its beginning goes, the rest of it is left out.
            cut = prefix_within(summary, plan.budget.tokens - rest[0],
                                plan.budget.chars - rest[1])
            kept[0] = {**kept[0], "content": summary_system(plan.system, cut)}
    return plain_query([e for e in kept if e["content"] or e["attachments"]]), left_out


class SummaryCovers:
    """Which summary covers each message, worked out at read time from the conversation's few
    summaries: the newest (highest id) whose covers hold the message's id. So deleting a summary
    undoes it, and the one before it covers again."""

    def __init__(self, summaries: list[tuple[int, int, int]]) -> None:  # (id, first, last)
        self.points = sorted({point for _, first, last in summaries for point in (first, last + 1)})
        # From each point to the next: the newest summary whose range holds it.
        self.newest = [max((s for s, first, last in summaries if first <= point <= last),
                           default=None) for point in self.points]

    def of(self, message_id: int) -> int | None:
        at = bisect.bisect_right(self.points, message_id) - 1
        return self.newest[at] if at >= 0 else None


def forget_summaries_covering(db: sqlite3.Connection, messages: list[tuple[str, int]]
                              ) -> list[tuple[str, int]]:
    """On the writer: deletes every summary whose range holds one of these (conversation id,
    message id), deleted: a summary is derived text, and a later one carries the earlier's, so
    each goes. What they covered is uncovered; a later turn compacts it again. -> the
    (conversation id, summary id) deleted."""
    if not messages:
        return []
    return [tuple(row) for row in db.execute(
        "DELETE FROM messages WHERE id IN (SELECT s.id FROM json_each(?) AS m JOIN messages AS s "
        "ON s.conversation_id = m.value ->> 0 AND s.kind = 'summary' AND m.value ->> 1 "
        "BETWEEN s.covers_first AND s.covers_last) RETURNING conversation_id, id",
        (json.dumps(messages),)).fetchall()]


def conversation_covers(db: sqlite3.Connection, conversation_id: str) -> SummaryCovers:
    return SummaryCovers(db.execute(f"SELECT id, covers_first, covers_last FROM messages WHERE "
                                    f"conversation_id = ? AND {IS_SUMMARY}",
                                    (conversation_id,)).fetchall())


def memory_fields(row: sqlite3.Row | dict, covers: SummaryCovers | None) -> dict:
    """What a listed message (or item) says of compaction: a summary's kind and covers, and
    the summary that covers it; nothing for a message no summary touches."""
    fields: dict[str, Any] = {}
    if row["kind"] == "summary":
        fields = {"kind": "summary", "covers": [row["covers_first"], row["covers_last"]]}
        if None in fields["covers"]:
            fields["covers"] = None
    if covers is not None and (summary_id := covers.of(row["id"])) not in (None, row["id"]):
        fields["summarized_by"] = summary_id
    return fields


def remap_covers(db: sqlite3.Connection, source_id: str, copy_id: str, up_to: int) -> None:
    """The covers of summaries copied with a history (fork_conversation), from the source's
    message ids to the copy's: the messages were copied in id order, one for one."""
    summaries = fetch_all(db, f"SELECT id, covers_first, covers_last FROM messages WHERE "
                              f"conversation_id = ? AND {IS_SUMMARY}", (copy_id,))
    if not summaries:
        return
    old, new = copied_ids(db, source_id, copy_id, up_to)
    for summary in summaries:
        first = bisect.bisect_left(old, summary["covers_first"])
        last = bisect.bisect_right(old, summary["covers_last"]) - 1
        first_id = new[first] if first < len(new) else new[-1] + 1
        db.execute("UPDATE messages SET covers_first = ?, covers_last = ? WHERE id = ?",
                   (first_id, new[last] if last >= 0 else first_id - 1, summary["id"]))


def copied_ids(db: sqlite3.Connection, source_id: str, copy_id: str, up_to: int
               ) -> tuple[list[int], list[int]]:
    """The ids of a history copied by fork_conversation, in the source and in the copy: the
    n-th of one is the n-th of the other."""
    old = [row[0] for row in db.execute("SELECT id FROM messages WHERE conversation_id = ? AND "
                                        "id <= ? ORDER BY id", (source_id, up_to))]
    new = [row[0] for row in db.execute("SELECT id FROM messages WHERE conversation_id = ? "
                                        "ORDER BY id", (copy_id,))]
    return old, new


def keep_cut(rows: list[dict], keep_last: int) -> int:
    """How many of the first rows /compact summarises: all but at least the last `keep_last`,
    its boundary moved back to a turn's start."""
    boundary = len(rows) - keep_last
    return max(start for start in [*turn_starts(rows, len(rows)), len(rows)]
               if start <= max(boundary, 0))


async def compact_conversation(request: Request) -> JSONResponse:
    """POST .../compact: summarises now all but the last keep_last messages not yet covered."""
    app, db, settings = request.app, request.app.state.db, request.app.state.settings
    conversation_id = request.path_params["conversation_id"]
    data = await read_json(request, empty_ok=True)
    conversation = await db.read(get_conversation, conversation_id)
    with app.state.replies.claim(conversation_id):  # 409 first: the history may be changing
        keep_last = int_field(data, "keep_last")
        keep_last = COMPACT_KEEP_LAST if keep_last in (MISSING, None) else keep_last
        own = turn_model(settings, None, conversation)
        model = optional_model(data) or settings.compact_model or own
        api_key = poe_key(request)
        turn = await model_budget(app, own)
        context = await db.read(stored_context, conversation_id, long=True)
        if (cut := keep_cut(context.rows, keep_last)) == 0:
            raise HTTPException(400, f"nothing to compact: the conversation has no message "
                                     f"before its last {keep_last} that a summary does not "
                                     "cover already")
        try:
            summary, _, cut = await summary_of(app, api_key, model, context.summary,
                                               context.rows[:cut], turn, COMPACT_PASSES)
        except PoeFailure as exc:
            raise poe_http_error(exc.status, exc.detail, exc.headers) from None
        covers = summary_covers(context.summary, context.rows[:cut])
        summary_id = await db.write(store_summary, conversation_id, summary, covers,
                                    read_range(context.rows[:cut], context.summary))
    return JSONResponse({"summary_message_id": summary_id, "covers": covers,
                         "content": summary})


# ---------------------------------------------------------------------------------------------
# Projects

PROJECT_FIELDS = ("name", "dev_environment", "grpc_server_address", "llm_model", "llm_url",
                  "git_work_dir", "ai_work_dir")
NULLABLE_PROJECT_FIELDS = ("llm_model", "llm_url", "git_work_dir", "ai_work_dir")


def get_project(db: sqlite3.Connection, project_id: int) -> dict:
    return fetch_or_404(db, "SELECT * FROM projects WHERE id = ?", (project_id,),
                        "Project not found")


def project_changes(data: dict) -> dict[str, Any]:
    """The fields given. null clears a field that may be empty and leaves one that may not as
    it is: the original's web and H5 clients PUT their whole form, nulls included."""
    return given({name: text_field(data, name, empty_ok=name != "name")
                  for name in PROJECT_FIELDS}, nullable=NULLABLE_PROJECT_FIELDS)


def save_named(db: sqlite3.Connection, table: str, row_id: int | None, changes: dict,
               get: Callable[[sqlite3.Connection, int], dict], what: str,
               stamp: str | None = None) -> dict:
    """Inserts (row_id None) or updates a project or category (`what`); a taken name is 409."""
    try:
        if row_id is None:
            row_id = insert_row(db, table, changes)
        else:
            get(db, row_id)
            update_row(db, table, row_id, changes, stamp)
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" not in str(exc):
            raise
        raise HTTPException(409, f"a {what} with this name already exists") from None
    return get(db, row_id)


def save_project(db: sqlite3.Connection, project_id: int | None, changes: dict) -> dict:
    return save_named(db, "projects", project_id, changes, get_project, "project",
                      stamp="updated_time")


async def list_projects(request: Request) -> JSONResponse:
    return await read_answer(request, fetch_all,
                             "SELECT * FROM projects ORDER BY updated_time DESC, id DESC")


async def create_project(request: Request) -> JSONResponse:
    changes = project_changes(await read_json(request))
    if "name" not in changes:
        raise HTTPException(400, "name is required")
    return await write_answer(request, save_project, None, changes)


async def update_project(request: Request) -> JSONResponse:
    changes = project_changes(await read_json(request))
    if not changes:
        raise HTTPException(400, "give at least one of " + ", ".join(PROJECT_FIELDS))
    return await write_answer(request, save_project, request.path_params["project_id"], changes)


def remove_project(db: sqlite3.Connection, project_id: int) -> dict:
    get_project(db, project_id)
    # Its documents go with their tags and references, then its own references (by cascade);
    # its conversations move to project 0 (ON DELETE SET NULL).
    delete_documents(db, "project_id = ?", (project_id,))
    db.execute("DELETE FROM projects WHERE id = ?", (project_id,))
    return {"message": "Project deleted successfully"}


def project_hierarchy(db: sqlite3.Connection, project_id: int) -> dict:
    """The project, its references and its conversations with theirs (AgentOS reads it)."""
    project = get_project(db, project_id)
    refs: dict[str | None, list[dict]] = {}
    for row in fetch_all(
            db, "SELECT DISTINCT r.conversation_id, r.document_id, d.filename, d.version "
                "FROM document_references r JOIN plan_documents d ON d.id = r.document_id "
                "LEFT JOIN conversations c ON c.id = r.conversation_id "
                "WHERE (r.conversation_id IS NULL AND r.project_id = :id) OR c.project_id = :id "
                "ORDER BY d.filename, d.version DESC, r.document_id", {"id": project_id}):
        refs.setdefault(row.pop("conversation_id"), []).append(row)
    conversations = fetch_all(
        db, "SELECT id, name, model, assistance_role, status, created_at, updated_at "
            "FROM conversations WHERE project_id = ? "
            "ORDER BY updated_at DESC, created_at DESC, rowid DESC", (project_id,))
    for conversation in conversations:
        conversation["conversation_document_references"] = refs.get(conversation["id"], [])
    return {"project_id": project_id, "project_name": project["name"],
            "project_document_references": refs.get(None, []), "conversations": conversations}


# ---------------------------------------------------------------------------------------------
# Plan: categories (seeded by schema.sql), versioned documents, their tags, migrate and merge

DOCUMENT_SOURCES = ("user", "server", "chat")
CATEGORY_FIELDS = ("name", "prompt_template", "message_method", "auto_save_category_id",
                   "is_builtin", "summary_model")
LATEST_SORTS = ("created_time", "filename", "version")
MAX_PAGE_SIZE = 200
MAX_TAG_CHARS = 100
# A row `d` of plan_documents that is the latest version of its (project, category, filename).
IS_LATEST = ("d.version = (SELECT max(m.version) FROM plan_documents m WHERE m.project_id = "
             "d.project_id AND m.category_id = d.category_id AND m.filename = d.filename)")


def category_json(request: Request, category: dict) -> dict:
    return {**category, "is_builtin": bool(category["is_builtin"]),
            "summary_model": category["summary_model"] or request.app.state.settings.default_model}


def get_category(db: sqlite3.Connection, category_id: int) -> dict:
    return fetch_or_404(db, "SELECT * FROM plan_categories WHERE id = ?", (category_id,),
                        "Category not found")


def category_changes(data: dict) -> dict[str, Any]:
    """The fields given. null clears auto_save_category_id (so does the original's -1) and
    summary_model (DEFAULT_MODEL then), and leaves the fields that may not be empty as they are."""
    changes = given({name: text_field(data, name, empty_ok=name != "name")
                     for name in ("name", "prompt_template", "message_method")})
    target = data.get("auto_save_category_id", MISSING)
    if target is None or (type(target) is int and target == -1):
        changes["auto_save_category_id"] = None
    elif target is not MISSING:
        changes["auto_save_category_id"] = int_field(data, "auto_save_category_id", minimum=1)
    if data.get("is_builtin") is not None:
        changes["is_builtin"] = int(bool_field(data, "is_builtin", False))
    if (summary_model := model_field(data, "summary_model", empty_ok=True)) is not MISSING:
        changes["summary_model"] = summary_model or None
    return changes


def save_category(db: sqlite3.Connection, category_id: int | None, changes: dict) -> dict:
    if changes.get("auto_save_category_id") is not None:
        fetch_or_404(db, "SELECT id FROM plan_categories WHERE id = ?",
                     (changes["auto_save_category_id"],),
                     "Category not found (auto_save_category_id)")
    return save_named(db, "plan_categories", category_id, changes, get_category, "category")


async def list_categories(request: Request) -> JSONResponse:
    categories = await request.app.state.db.read(fetch_all,
                                                 "SELECT * FROM plan_categories ORDER BY id")
    return JSONResponse([category_json(request, category) for category in categories])


async def create_category(request: Request) -> JSONResponse:
    changes = category_changes(await read_json(request))
    for name in ("name", "prompt_template", "message_method"):
        if name not in changes:
            raise HTTPException(400, f"{name} is required")
    category = await request.app.state.db.write(save_category, None, changes)
    return JSONResponse(category_json(request, category))


async def read_category(request: Request) -> JSONResponse:
    category = await request.app.state.db.read(get_category, request.path_params["category_id"])
    return JSONResponse(category_json(request, category))


async def update_category(request: Request) -> JSONResponse:
    changes = category_changes(await read_json(request))
    if not changes:
        raise HTTPException(400, "give at least one of " + ", ".join(CATEGORY_FIELDS))
    category = await request.app.state.db.write(save_category, request.path_params["category_id"],
                                                changes)
    return JSONResponse(category_json(request, category))


def remove_category(db: sqlite3.Connection, category_id: int) -> dict:
    get_category(db, category_id)
    deleted = delete_documents(db, "category_id = ?", (category_id,))
    # Categories that auto-saved into this one stop doing so (ON DELETE SET NULL).
    db.execute("DELETE FROM plan_categories WHERE id = ?", (category_id,))
    return {"message": "Category and related documents deleted successfully", "deleted": deleted}


def delete_documents(db: sqlite3.Connection, where: str, params: tuple,
                     not_found: str | None = None) -> dict[str, int]:
    """Deletes the documents `where` (this module's SQL, never a request's) selects, with tags
    and references, or 404 `not_found` (if given) when there are none; the counts
    (execution_logs is 0, kept for Dev-Docs' response type)."""
    selected = f"document_id IN (SELECT id FROM plan_documents WHERE {where})"
    deleted = {table: db.execute(f"DELETE FROM {table} WHERE {selected}", params).rowcount
               for table in ("document_tags", "document_references")}
    documents = db.execute(f"DELETE FROM plan_documents WHERE {where}", params).rowcount
    if documents == 0 and not_found:
        raise HTTPException(404, not_found)
    return {"plan_documents": documents, **deleted, "execution_logs": 0}


def source_field(data: dict, default: str | None) -> str | None:
    if (source := text_field(data, "source")) in (MISSING, None):
        return default
    if source not in DOCUMENT_SOURCES:
        raise HTTPException(400, "source must be one of " + ", ".join(DOCUMENT_SOURCES))
    return source


def insert_document(db: sqlite3.Connection, document: dict,
                    created_time: str | None = None) -> dict:
    """Next version of a (project, category, filename), from 1; created_time only when migrating."""
    get_project(db, document["project_id"])
    get_category(db, document["category_id"])
    document_id = db.execute(
        "INSERT INTO plan_documents (project_id, category_id, filename, content, version, "
        "source, related_log_id, created_time) VALUES (:project_id, :category_id, :filename, "
        ":content, (SELECT coalesce(max(version), 0) + 1 FROM plan_documents WHERE project_id "
        "= :project_id AND category_id = :category_id AND filename = :filename), :source, "
        f":related_log_id, coalesce(:created_time, {NOW_SQL}))",
        {**document, "created_time": created_time}).lastrowid
    return get_document(db, document_id)


async def create_document(request: Request) -> JSONResponse:
    data = await read_json(request)
    source = source_field(data, "user")
    related_log_id = int_field(data, "related_log_id")
    document = {"project_id": int_field(data, "project_id", required=True, minimum=1),
                "category_id": int_field(data, "category_id", required=True, minimum=1),
                "filename": text_field(data, "filename", required=True, empty_ok=False),
                "content": text_field(data, "content", required=True), "source": source,
                "related_log_id": None if related_log_id is MISSING else related_log_id}
    return await write_answer(request, insert_document, document)


def get_document(db: sqlite3.Connection, document_id: int) -> dict:
    return fetch_or_404(db, "SELECT * FROM plan_documents WHERE id = ?", (document_id,),
                        "Document not found")


async def list_documents(request: Request) -> JSONResponse:
    """GET /v1/plan/documents and /history: every version, newest first."""
    filters = {"project_id": query_int(request, "project_id"),
               "category_id": query_int(request, "category_id"),
               "filename": request.query_params.get("filename") or None}
    # Column names come from the fixed dict above, never from the request.
    where = " AND ".join(f"{column} = :{column}" for column, value in filters.items()
                         if value is not None) or "1"
    order = "version DESC, " if filters["filename"] is not None else ""
    return await read_answer(request, fetch_all, f"SELECT * FROM plan_documents WHERE {where} "
                             f"ORDER BY {order}created_time DESC, id DESC", filters)


def page_number(request: Request, name: str, default: int) -> int:
    if (value := query_int(request, name, default)) == 0:
        raise HTTPException(400, f"{name} must be a positive integer")
    return value


def latest_page(db: sqlite3.Connection, params: dict, sort_by: str, order: str) -> dict:
    where = ("d.project_id = :project_id AND (:category_id IS NULL OR d.category_id = "
             ":category_id) AND (:query IS NULL OR instr(lower(d.filename), lower(:query)) > 0) "
             f"AND {IS_LATEST}")
    total = db.execute(f"SELECT count(*) FROM plan_documents d WHERE {where}", params).fetchone()[0]
    # sort_by and order come from fixed sets (latest_documents checks them).
    return {"total": total, "page": params["page"], "page_size": params["page_size"],
            "items": fetch_all(db, f"SELECT d.* FROM plan_documents d WHERE {where} "
                                   f"ORDER BY d.{sort_by} {order}, d.id {order} "
                                   "LIMIT :page_size OFFSET :offset", params)}


async def latest_documents(request: Request) -> JSONResponse:
    if (project_id := query_int(request, "project_id")) is None:
        raise HTTPException(400, "project_id is required")
    if (sort_by := request.query_params.get("sort_by") or "created_time") not in LATEST_SORTS:
        raise HTTPException(400, "sort_by must be one of " + ", ".join(LATEST_SORTS))
    if (order := (request.query_params.get("order") or "desc").lower()) not in ("asc", "desc"):
        raise HTTPException(400, "order must be asc or desc")
    page = page_number(request, "page", 1)
    page_size = min(page_number(request, "page_size", 20), MAX_PAGE_SIZE)
    params = {"project_id": project_id, "category_id": query_int(request, "category_id"),
              "query": request.query_params.get("query") or None, "page": page,
              "page_size": page_size, "offset": min((page - 1) * page_size, INT64 - 1)}
    return await read_answer(request, latest_page, params, sort_by, order)


def save_new_version(db: sqlite3.Connection, document_id: int, changes: dict) -> dict:
    """The document with `changes` as the next version of its (new) filename: a PUT (or the
    original's POST) edits no version, so references to one and its history stay as they were."""
    return insert_document(db, {**get_document(db, document_id), **changes})


async def update_document(request: Request) -> JSONResponse:
    data = await read_json(request)
    changes = given({"filename": text_field(data, "filename", empty_ok=False),
                     "content": text_field(data, "content"), "source": source_field(data, None)})
    if not changes:
        raise HTTPException(400, "give at least one of filename, content, source")
    return await write_answer(request, save_new_version, request.path_params["document_id"],
                              changes)


async def delete_document(request: Request) -> JSONResponse:
    deleted = await request.app.state.db.write(
        delete_documents, "id = ?", (request.path_params["document_id"],), "Document not found")
    return JSONResponse({"message": "Document deleted successfully", "deleted": deleted})


async def delete_all_versions(request: Request) -> JSONResponse:
    """Every version of a file; without category_id, of that filename in every category."""
    project_id, category_id = query_int(request, "project_id"), query_int(request, "category_id")
    filename = request.query_params.get("filename") or None
    if project_id is None or filename is None:
        raise HTTPException(400, "project_id and filename are required")
    where = "project_id = ? AND filename = ? AND (? IS NULL OR category_id = ?)"
    params = (project_id, filename, category_id, category_id)
    deleted = await request.app.state.db.write(delete_documents, where, params,
                                               "No documents found")
    return JSONResponse({"message": "All versions deleted successfully", "deleted": deleted})


def tag_name_of(value: Any, name: str = "tag_name") -> str:
    tag = text_field({name: value}, name, required=True, empty_ok=False).strip()
    if len(tag) > MAX_TAG_CHARS:
        raise HTTPException(400, f"{name} must be at most {MAX_TAG_CHARS} characters")
    return tag


def tag_list(data: dict, name: str) -> list[str]:
    value = data.get(name)
    if value is not None and not isinstance(value, list):
        raise HTTPException(400, f"{name} must be a list of tag names")
    return list(dict.fromkeys(tag_name_of(v, name) for v in value or [] if v is not None and (
        not isinstance(v, str) or v.strip())))


def select_tags(db: sqlite3.Connection, document_id: int) -> dict:
    get_document(db, document_id)
    return {"document_id": document_id, "tags": fetch_all(
        db, "SELECT * FROM document_tags WHERE document_id = ? ORDER BY tag_name", (document_id,))}


def change_tags(db: sqlite3.Connection, document_id: int, add: list[str],
                remove: list[str]) -> dict:
    """Adds (a tag already there is left as it is) then removes tags of one document."""
    get_document(db, document_id)
    added = sum(db.execute("INSERT INTO document_tags (document_id, tag_name) VALUES (?, ?) "
                           "ON CONFLICT DO NOTHING", (document_id, tag)).rowcount for tag in add)
    removed = db.execute("DELETE FROM document_tags WHERE document_id = ? AND tag_name IN "
                         "(SELECT value FROM json_each(?))",
                         (document_id, json.dumps(remove))).rowcount
    return {"added": {"requested": len(add), "added": added, "duplicates": len(add) - added},
            "removed": {"requested": len(remove), "removed": removed}}


def add_tag(db: sqlite3.Connection, document_id: int, tag: str) -> dict:
    change_tags(db, document_id, [tag], [])
    return {"message": "Tag added", "tag": fetch_one(
        db, "SELECT * FROM document_tags WHERE document_id = ? AND tag_name = ?",
        (document_id, tag))}


async def create_tag(request: Request) -> JSONResponse:
    tag = tag_name_of((await read_json(request)).get("tag_name"))
    return await write_answer(request, add_tag, request.path_params["document_id"], tag)


async def delete_tag(request: Request) -> JSONResponse:
    document_id = request.path_params["document_id"]
    tag = tag_name_of(request.path_params["tag_name"])
    counts = await request.app.state.db.write(change_tags, document_id, [], [tag])
    return JSONResponse({"message": "Tag removed", "removed_count": counts["removed"]["removed"]})


async def batch_tags(request: Request) -> JSONResponse:
    document_id = request.path_params["document_id"]
    data = await read_json(request)
    add, remove = tag_list(data, "add"), tag_list(data, "remove")
    if not add and not remove:
        raise HTTPException(400, "add and remove cannot both be empty")
    counts = await request.app.state.db.write(change_tags, document_id, add, remove)
    return JSONResponse({"message": "Tags updated", **counts})


def documents_with_tags(db: sqlite3.Connection, project_id: int, tags: list[str],
                        match_all: bool) -> list[dict]:
    """The latest versions in the project with any (or all) of the tags."""
    get_project(db, project_id)
    return fetch_all(
        db, "SELECT d.* FROM plan_documents d JOIN document_tags t ON t.document_id = d.id "
            "WHERE d.project_id = ? AND t.tag_name IN (SELECT value FROM json_each(?)) "
            f"AND {IS_LATEST} GROUP BY d.id HAVING count(DISTINCT t.tag_name) >= ? "
            "ORDER BY d.created_time DESC, d.id DESC",
        (project_id, json.dumps(tags), len(tags) if match_all else 1))


async def search_documents_by_tags(request: Request) -> JSONResponse:
    if (project_id := query_int(request, "project_id")) is None:
        raise HTTPException(400, "project_id is required")
    raw = ",".join(request.query_params.getlist("tags")).split(",")
    tags = list(dict.fromkeys(tag_name_of(t, "tags") for t in raw if t.strip()))
    if not tags:
        raise HTTPException(400, "tags is required: tag names separated by commas")
    if (match := request.query_params.get("match") or "any") not in ("any", "all"):
        raise HTTPException(400, "match must be any or all")
    return await read_answer(request, documents_with_tags, project_id, tags, match == "all")


def copy_history(db: sqlite3.Connection, move: dict) -> dict:
    """Every version of a file, oldest first, copied to another category as its next versions,
    each with its content, source, log and time; the source stays."""
    get_category(db, move["target_category_id"])
    versions = fetch_all(db, "SELECT * FROM plan_documents WHERE project_id = :project_id AND "
                             "category_id = :source_category_id AND filename = :filename "
                             "ORDER BY version", move)
    if not versions:
        raise HTTPException(404, "No source documents found")
    copies = [insert_document(db, {**version, "category_id": move["target_category_id"]},
                              version["created_time"]) for version in versions]
    return {"message": "Migration completed", "migrated_count": len(copies),
            "target_category_id": move["target_category_id"], "filename": move["filename"],
            "start_version": copies[0]["version"], "end_version": copies[-1]["version"]}


async def migrate_all_history(request: Request) -> JSONResponse:
    data = await read_json(request)
    move = {name: int_field(data, name, required=True, minimum=1)
            for name in ("project_id", "source_category_id", "target_category_id")}
    move["filename"] = text_field(data, "filename", required=True, empty_ok=False)
    if move["source_category_id"] == move["target_category_id"]:
        raise HTTPException(400, "source and target category cannot be the same")
    return await write_answer(request, copy_history, move)


async def migrate_from_current(request: Request) -> JSONResponse:
    """A version copied to another category as its file's next (new name optional); source stays."""
    data = await read_json(request)
    document_id = int_field(data, "document_id", required=True, minimum=1)
    changes = {"category_id": int_field(data, "target_category_id", required=True, minimum=1)}
    if data.get("new_filename") not in (None, ""):
        changes["filename"] = text_field(data, "new_filename", empty_ok=False).strip()
    changes["source"] = source_field(data, None)
    return await write_answer(request, save_new_version, document_id, given(changes))


async def merge_documents(request: Request) -> JSONResponse:
    """Texts in order, each between marks naming it (Dev-Docs downloads it); unknown ids skipped."""
    document_ids = id_list_field(await read_json(request), "document_ids", "document",
                                 required=True)
    if not document_ids:
        raise HTTPException(400, "document_ids cannot be empty")
    documents = await request.app.state.db.read(
        fetch_all, "SELECT d.* FROM json_each(?) j JOIN plan_documents d ON d.id = j.value "
                   "ORDER BY j.key", (json.dumps(document_ids),))
    if not documents:
        raise HTTPException(404, "Documents not found")
    parts = []
    for document in documents:
        mark = f"{document['filename'].strip() or 'document_' + str(document['id'])}- " \
               f"版本[{document['version']}]"
        parts.append(f"--- {mark} 开始 ---\n{document['content']}\n--- {mark} 结束 ---")
    return JSONResponse({"count": len(parts), "merged": "\n\n".join(parts)})


# ---------------------------------------------------------------------------------------------
# Knowledge: document references, a project's (conversation_id NULL) or one conversation's own

REFERENCE_SQL = ("SELECT r.id, r.project_id, r.conversation_id, r.document_id, r.reference_type, "
                 "d.filename AS document_filename, d.content AS document_content, "
                 "d.version AS document_version, d.created_time AS document_created_time "
                 "FROM document_references r JOIN plan_documents d ON d.id = r.document_id")


def reference_owner(db: sqlite3.Connection, owner: tuple[str, Any]
                    ) -> tuple[int | None, str | None]:
    """(project_id, conversation_id) of an owner (kind, id), 404 if none; no project: None."""
    kind, owner_id = owner
    if kind == "project":
        return get_project(db, owner_id)["id"], None
    project_id = get_conversation(db, owner_id)["project_id"]
    return (None if project_id == 0 else project_id), owner_id


def select_references(db: sqlite3.Connection, project_id: int | None,
                      conversation_id: str | None) -> list[dict]:
    if conversation_id is None:
        where, owner_id = "r.project_id = ? AND r.conversation_id IS NULL", project_id
    else:
        where, owner_id = "r.conversation_id = ?", conversation_id
    return fetch_all(db, f"{REFERENCE_SQL} WHERE {where} ORDER BY d.filename, r.id", (owner_id,))


def list_owner_references(db: sqlite3.Connection, owner: tuple[str, Any]) -> list[dict]:
    return select_references(db, *reference_owner(db, owner))


def replace_references(db: sqlite3.Connection, owner: tuple[str, Any],
                       document_ids: list[int]) -> dict:
    """Makes the owner's references exactly document_ids: each a document of its project and,
    for a conversation, not one its project references already (400 naming them)."""
    project_id, conversation_id = reference_owner(db, owner)
    wanted = set(document_ids)
    in_project = {row[0] for row in db.execute(
        "SELECT id FROM plan_documents WHERE project_id = ? AND id IN "
        "(SELECT value FROM json_each(?))", (project_id, json.dumps(document_ids)))}
    if wanted - in_project:
        raise HTTPException(400, f"Documents not found in project: {sorted(wanted - in_project)}")
    references = select_references(db, project_id, conversation_id)
    current = {r["document_id"] for r in references}
    if conversation_id is not None:
        shared = wanted & {r["document_id"] for r in select_references(db, project_id, None)}
        if shared:
            raise HTTPException(400, "Documents already referenced at project level: "
                                     f"{sorted(shared)}")
    db.executemany("DELETE FROM document_references WHERE id = ?",
                   [(r["id"],) for r in references if r["document_id"] not in wanted])
    db.executemany("INSERT INTO document_references (project_id, conversation_id, document_id, "
                   "reference_type) VALUES (?, ?, ?, ?)",
                   [(project_id, conversation_id, d, owner[0]) for d in sorted(wanted - current)])
    return {"added_count": len(wanted - current), "removed_count": len(current - wanted),
            "current_references": sorted(wanted)}


def path_owner(request: Request, owner: str) -> tuple[str, Any]:
    """Project and conversation references alike: routes pass `owner`, the path has {<owner>_id}."""
    return owner, request.path_params[f"{owner}_id"]


async def list_references(request: Request, owner: str) -> JSONResponse:
    return await read_answer(request, list_owner_references, path_owner(request, owner))


async def set_references(request: Request, owner: str) -> JSONResponse:
    document_ids = id_list_field(await read_json(request), "document_ids", "document",
                                 required=True)
    counts = await request.app.state.db.write(replace_references, path_owner(request, owner),
                                              document_ids)
    return JSONResponse({"message": f"{owner.title()} document references updated "
                                    "successfully", **counts})


async def clear_references(request: Request, owner: str) -> JSONResponse:
    counts = await request.app.state.db.write(replace_references, path_owner(request, owner), [])
    return JSONResponse({"message": f"All {owner} document references cleared", **counts})


def conversation_knowledge(db: sqlite3.Connection, conversation_id: str) -> dict:
    """The project's references and its own (their document_ids go in a turn's `documents`)."""
    project_id, _ = reference_owner(db, ("conversation", conversation_id))
    return {"conversation_id": conversation_id,
            "project_references": [] if project_id is None
            else select_references(db, project_id, None),
            "conversation_references": select_references(db, project_id, conversation_id)}


# ---------------------------------------------------------------------------------------------
# Source code: the original's two routes over a project's files. complete-source-code reads them
# as teryfly/source-code-concatenator's text; write-source-code (the next section) carries out a
# model's plan in teryfly/CodeFileExecutorLib's step format. Both run on worker threads, through
# folder descriptors opened one name at a time without following symlinks (O_NOFOLLOW), so that
# no path leads out of its folder, even one changed while it is read or written.

# Folders never read into a project's text: version control, dependencies, caches, virtual
# environments (also any folder that holds a pyvenv.cfg), and write-source-code's backups.
SKIPPED_FOLDERS = frozenset({
    ".git", ".hg", ".svn", ".bzr", "node_modules", "bower_components", "__pycache__", ".venv",
    "venv", ".env", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache",
    ".ipynb_checkpoints", ".backup"})
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused, being no file).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def shown(text: str) -> str:
    """Text made with names from the filesystem, as it is shown: a name's bytes that are not
    UTF-8 (held by Python as lone surrogates, "surrogateescape") each become U+FFFD. The name
    itself, kept apart, still opens the file: only what is drawn or said is changed."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate no byte stands for: none comes from a name
        return text.encode("utf-8", "replace").decode()


def within(path: str, root: str) -> bool:
    """`path` is `root` or below it (both absolute and resolved)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def open_below(fd: int, names: list[str], create: bool = False) -> int:
    """A new descriptor of the folder `names` below folder `fd`, opened one name at a time
    without following symlinks (a symlink anywhere: OSError ELOOP, its filename the path to it);
    `create` makes the missing ones."""
    current = os.dup(fd)
    try:
        for index, name in enumerate(names):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, dir_fd=current)
            try:
                child = os.open(name, FOLDER_FLAGS, dir_fd=current)
            except NotADirectoryError:  # what O_DIRECTORY says of a symlink, before O_NOFOLLOW
                if not stat.S_ISLNK(os.stat(name, dir_fd=current, follow_symlinks=False).st_mode):
                    raise
                raise OSError(errno.ELOOP, "a symlink, not followed",
                              "/".join(names[:index + 1])) from None
            os.close(current)
            current = child
        return current
    except BaseException:
        os.close(current)
        raise


def open_resolved_folder(path: str) -> int:
    """A descriptor of the folder at `path`, a resolved path (os.path.realpath), walked from /
    without following symlinks: one that appeared since the path was resolved fails (ELOOP)."""
    top = os.open("/", FOLDER_FLAGS)
    try:
        return open_below(top, [name for name in path.split("/") if name])
    finally:
        os.close(top)


def read_regular(fd: int, name: str, most: int) -> bytes | None:
    """Up to `most` bytes of the regular file `name` in folder `fd`; None for anything else
    there (a symlink, a FIFO, a device...) or a file that cannot be read."""
    try:
        with open(os.open(name, READ_FLAGS, dir_fd=fd), "rb") as file:
            return file.read(most) if stat.S_ISREG(os.fstat(file.fileno()).st_mode) else None
    except OSError:
        return None


def fnmatch_glob(segment: str) -> str:
    """A .gitignore segment in fnmatch's terms: an escaped `*`, `?` or `[` becomes a class of
    itself, another escaped character itself, and a class `[^...]` is `[!...]`."""
    segment = re.sub(r"\\(.)", lambda m: f"[{m[1]}]" if m[1] in "*?[" else m[1], segment)
    return segment.replace("[^", "[!")


def gitignore_rule(line: str) -> tuple[list, bool, bool] | None:
    """One line of a .gitignore as (segment matchers, negated, folders only), None for a blank
    line or a comment. A `/` at the start or in the middle anchors the pattern to the root;
    without one it matches at any depth (a leading `**`, None among the matchers)."""
    line = re.sub(r"(?<!\\) +$", "", line)
    if not line or line.startswith("#"):
        return None
    negated = line.startswith("!")
    line = line[1:] if negated else line
    folders_only, anchored = line.endswith("/"), "/" in line.rstrip("/")
    names = [name for name in line.split("/") if name]
    if not names:
        return None
    matchers = [None if name == "**" else re.compile(fnmatch.translate(fnmatch_glob(name))).match
                for name in names]
    return ([None] if not anchored else []) + matchers, negated, folders_only


def segments_match(matchers: list, names: list[str]) -> bool:
    """Whether the path `names` matches, segment by segment (fnmatch's matching, which does not
    backtrack without end); None is `**`: any number of segments, at least one when last."""
    reachable = {0}
    for index, matcher in enumerate(matchers):
        if matcher is None:
            start = min(reachable) + (index == len(matchers) - 1)
            reachable = set(range(start, len(names) + 1))
        else:
            reachable = {at + 1 for at in reachable if at < len(names) and matcher(names[at])}
        if not reachable:
            return False
    return len(names) in reachable


class GitIgnore:
    """The common rules of a .gitignore: comments, blank lines, `!` negation, `\\` escapes, `/`
    anchoring, a trailing `/` for folders only, `*`, `?`, `[...]` and `**`. The last rule that
    matches decides; an excluded folder is not walked, so nothing below it comes back (as git)."""

    def __init__(self, text: str = "") -> None:
        self.rules = [rule for line in text.splitlines() if (rule := gitignore_rule(line))]

    def ignores(self, path: str, is_folder: bool) -> bool:
        ignored, names = False, path.split("/")
        for matchers, negated, folders_only in self.rules:
            if (is_folder or not folders_only) and segments_match(matchers, names):
                ignored = not negated
        return ignored


class SourceText:
    """A project's folder as source-code-concatenator's text: "Project Name: <name>", the tree
    (each folder's folders, then its files, by name in any case, drawn with ├── └── │), then
    "File: <path>\\n---\\n<text>\\n---" for each text file, in os.walk's order (a folder's files,
    then its folders'). Left out: SKIPPED_FOLDERS, what the root's .gitignore excludes, and
    symlinks that lead out of the folder or nowhere. A binary file (a NUL byte, or not UTF-8)
    and a symlink to a folder inside stay in the tree without a block. Bounded by `limit`.
    A name that is not UTF-8 is drawn, matched and said as shown() makes it."""

    def __init__(self, root: str, limit: int) -> None:
        self.name = shown(os.path.basename(root))
        self.real_root, self.limit, self.used = os.path.realpath(root), limit, 0
        self.tree, self.blocks = [self.name + "/"], []
        self.ignore, self.root_fd = GitIgnore(), -1

    def text(self) -> str:
        self.root_fd = open_resolved_folder(self.real_root)
        try:
            rules = read_regular(self.root_fd, ".gitignore", 2**20) or b""
            self.ignore = GitIgnore(rules.decode(errors="replace"))
            self.walk()
        finally:
            os.close(self.root_fd)
        return (f"Project Name: {self.name}\n\nProject Structure:\n" + "\n".join(self.tree)
                + "\n\nFile Contents:\n\n" + "\n\n".join(self.blocks))

    def charge(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise HTTPException(413, f"the source code under {shown(self.real_root)} is larger "
                                     f"than {self.limit} bytes (MAX_BODY_BYTES)")

    def walk(self) -> None:
        """The tree, depth first without recursion: a stack of (folder, prefix, entries left)."""
        stack = [(self.root_fd, "", self.listing(self.root_fd, ""))]
        try:
            while stack:
                fd, prefix, entries = stack[-1]
                if not entries:
                    stack.pop()
                    if fd != self.root_fd:
                        os.close(fd)
                    continue
                name, path, kind = entries.pop()
                last = not entries
                line = prefix + ("└── " if last else "├── ") + shown(name)
                self.charge(len(line.encode()) + 1)
                self.tree.append(line)
                if kind != "folder":
                    continue
                try:
                    child = os.open(name, FOLDER_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                stack.append((child, prefix + ("    " if last else "│   "), []))
                stack[-1][2].extend(self.listing(child, path + "/"))
        finally:
            for fd, _, _ in stack[1:]:
                os.close(fd)

    def listing(self, fd: int, folder: str) -> list[tuple[str, str, str]]:
        """A folder's entries to draw, as (name, path, kind), last first (the walk pops them):
        folders (and symlinks to folders) first, as the library sorts them. The blocks of its
        text files are added now, which is os.walk's order."""
        try:
            with os.scandir(fd) as found:
                entries = [(entry.name, folder + entry.name, self.kind(entry, folder))
                           for entry in found]
        except OSError:
            return []
        drawn = sorted((e for e in entries if e[2] is not None), key=lambda e: (
            not e[2].startswith("folder"), shown(e[0]).lower(), e[0]))
        for name, path, kind in drawn:
            text = self.file_text(fd, name, path, kind) if kind in ("file", "link") else None
            if text is not None:
                self.charge(len(f"File: {shown(path)}\n---\n\n---\n\n".encode()))
                self.blocks.append(f"File: {shown(path)}\n---\n{text}\n---")
        return drawn[::-1]

    def file_text(self, fd: int, name: str, path: str, kind: str) -> str | None:
        """A file's text, its line ends made \\n as Python's text mode reads them; None when it
        is binary or cannot be read. A file too large for what is left of the bound: 413."""
        room = self.limit - self.used
        data = (read_regular(fd, name, room + 1) if kind == "file"
                else self.target_data(path, room + 1))
        if data is None or b"\0" in data:
            return None
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(data, final=len(data) <= room)
        except UnicodeDecodeError:
            return None
        self.charge(len(data))
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def target_data(self, path: str, most: int) -> bytes | None:
        """The bytes of the file a symlink inside leads to, reached from the root one name at a
        time without following symlinks (one swapped in since it was resolved is not)."""
        target = os.path.realpath(os.path.join(self.real_root, path))
        names = os.path.relpath(target, self.real_root).split("/")
        try:
            folder = open_below(self.root_fd, names[:-1])
        except OSError:
            return None
        try:
            return read_regular(folder, names[-1], most)
        finally:
            os.close(folder)

    def kind(self, entry: os.DirEntry, folder: str) -> str | None:
        """"folder" (walked), "file" (read), "link" (a symlink to a file inside: read there),
        "folder-link" or "other" (drawn only), or None (left out)."""
        path = folder + entry.name
        try:
            if entry.is_symlink():
                target = os.path.realpath(os.path.join(self.real_root, path))
                if not within(target, self.real_root) or not os.path.exists(target):
                    return None
                if self.ignore.ignores(shown(path), os.path.isdir(target)):
                    return None
                return "link" if os.path.isfile(target) else (
                    "folder-link" if os.path.isdir(target) else "other")
            is_folder = entry.is_dir(follow_symlinks=False)
            if self.ignore.ignores(shown(path), is_folder):
                return None
            if is_folder:
                venv = os.path.exists(os.path.join(self.real_root, path, "pyvenv.cfg"))
                return None if entry.name in SKIPPED_FOLDERS or venv else "folder"
            return "file" if entry.is_file(follow_symlinks=False) else "other"
        except OSError:
            return None


def project_source(ai_work_dir: str, limit: int) -> bytes:
    """complete-source-code's answer, made on a worker thread (JSON of 32 MB takes a while)."""
    root = os.path.abspath(ai_work_dir)
    if not os.path.exists(root):
        raise HTTPException(404, f"ai_work_dir {ai_work_dir} does not exist")
    if not os.path.isdir(root):
        raise HTTPException(404, f"ai_work_dir {ai_work_dir} is not a folder")
    try:
        text = SourceText(root, limit).text()
    except OSError as exc:
        raise HTTPException(404, f"ai_work_dir {ai_work_dir} cannot be read: "
                                 f"{exc.strerror or exc}") from None
    return dumps({"completeSourceCode": text}).encode()


async def complete_source_code(request: Request) -> Response:
    project = await request.app.state.db.read(get_project, request.path_params["project_id"])
    if not project["ai_work_dir"]:
        raise HTTPException(404, f"project {project['id']} has no ai_work_dir")
    body = await asyncio.to_thread(project_source, project["ai_work_dir"],
                                   request.app.state.settings.max_body_bytes)
    return Response(body, media_type="application/json")


# ---------------------------------------------------------------------------------------------
# Source code, writing: write-source-code carries out a model's plan in CodeFileExecutorLib's
# step format: blocks split at "------", each naming its step ("Step [X/Y] - ..."), "Action:
# ..." and "File Path: ...", the file's text in a ``` fence (the longest, if more). Confined to
# the projects' ai_work_dirs and WRITE_ROOTS, every name opened with open_below.

GENERIC_PATTERNS = ("Task<", "List<", "Dictionary<", "IEnumerable<")
CONTENT_ACTIONS = ("create file", "update file")
MAX_STEP_BYTES, MAX_STEP_PATH = 10 * 1024 * 1024, 260  # the library's bounds
# Ours: the steps one plan may hold (a plan of millions of tiny blocks is no model's answer, and
# its events, a few per step, would take minutes to send), and the events waiting between the
# worker and the client (the worker waits while they fill this: it never runs further ahead).
MAX_PLAN_STEPS, PIPE_BYTES = 10000, 65536
# A divider and the blank blocks after it, as str.split("------") finds dividers (leftmost first).
PLAN_DIVIDERS = re.compile(r"------(?:\s*------)*")
REFUSED = "路径安全校验失败，跳过: "  # the library's words when a path fails its security check


class StepRefused(Exception):
    """A step not carried out; the argument is its error event's message."""


@dataclass
class Step:
    """One block of a plan, parsed as CodeFileExecutorLib parses it."""
    line: str = ""  # the block's last line that begins "Step"
    action: str = ""
    path: str = ""
    content: str = ""
    fences: int = 0  # code blocks found; the longest is the content
    error: str | None = None  # why the block is no task


def code_blocks(text: str) -> list[str]:
    """The library's fences: from the line after each ``` up to the next "\\n```" (else the next
    ```), the search going on three characters past where the block ended."""
    found, start = [], 0
    while (fence := text.find("```", start)) >= 0 and (newline := text.find("\n", fence)) >= 0:
        end = text.find("\n```", newline + 1)
        if end < 0 and (end := text.find("```", newline + 1)) < 0:
            break
        found.append(text[newline + 1:end])
        start = end + 3
    return found


def parse_step(block: str) -> Step:
    """The last lines (stripped) that begin "Step", "Action:" and "File Path:", wherever they
    are, code included, as the library reads them."""
    lines: dict[str, str] = {}
    for line in block.splitlines():
        key = next((k for k in ("Step", "Action:", "File Path:") if line.strip().startswith(k)),
                   None)
        if key is not None:
            lines[key] = line.strip()
    if len(lines) < 3:
        return Step(error="无效任务块")
    codes = code_blocks(block)
    step = Step(lines["Step"], lines["Action:"].replace("Action:", "").strip(),
                lines["File Path:"].replace("File Path:", "").strip(),
                max(codes, key=len) if codes else "", len(codes))
    if not step.action or not step.path:
        step.error = "缺少必要的任务组件"
    return step


def integrity_warning(block: str, content: str) -> str | None:
    """The library's check that no C#-style generic was lost from the chosen code block."""
    for pattern in GENERIC_PATTERNS:
        before, after = block.count(pattern), content.count(pattern)
        if before and not after:
            return f"关键泛型模式丢失: {pattern}"
        if before != after:
            return f"泛型模式数量不匹配: {pattern} (原始:{before}, 提取:{after})"
    return None


def step_names(path: str) -> list[str]:
    """The names, from root_dir down, that a step's File Path leads to (`\\` read as `/`);
    StepRefused for a path that could leave root_dir, or whose last name the library refuses."""
    if len(path) > MAX_STEP_PATH:
        raise StepRefused("路径长度超过限制，跳过")
    unix = path.replace("\\", "/")
    if unix.startswith("/") or re.match(r"[A-Za-z]:/", unix):
        raise StepRefused(f"{REFUSED}{path} is an absolute path: give one relative to root_dir")
    names = [name for name in unix.split("/") if name not in ("", ".")]
    if ".." in names:
        raise StepRefused(f"{REFUSED}{path} holds '..': a path must stay inside root_dir")
    if not names:
        raise StepRefused(f"{REFUSED}{path} names root_dir itself")
    if ".git" in names:
        raise StepRefused(f"{REFUSED}{path} is inside .git, whose hooks run programs")
    if not re.fullmatch(r"[\w.\-]+", names[-1]):
        raise StepRefused("文件名包含非法字符，跳过")
    return names


def plan_blocks(plan: str) -> list[str]:
    """The plan's blocks as the library splits them (at every "------", each stripped, blank
    ones left out); 413 past MAX_PLAN_STEPS, found without splitting a plan of millions."""
    dividers = sum(1 for _ in itertools.islice(PLAN_DIVIDERS.finditer(plan), MAX_PLAN_STEPS + 2))
    # Between two dividers found here there is always a block that is not blank.
    blocks = [] if dividers > MAX_PLAN_STEPS + 1 else [
        block.strip() for block in PLAN_DIVIDERS.split(plan) if block.strip()]
    if dividers > MAX_PLAN_STEPS + 1 or len(blocks) > MAX_PLAN_STEPS:
        raise HTTPException(413, f"files_content holds more than {MAX_PLAN_STEPS} steps (blocks "
                                 "between ------): nothing is carried out")
    return blocks


def write_event(message: str, kind: str, data: dict | None = None) -> dict:
    """An event as the library's StreamHandler builds it (local time, to the second)."""
    return {"message": message, "type": kind,
            "timestamp": datetime.datetime.now().isoformat(timespec="seconds"), "data": data}


def existing_file(fd: int, names: list[str]) -> os.stat_result | None:
    """The regular file names[-1] in folder `fd` (the folder names[:-1]), None when nothing is
    there; StepRefused for anything else (a symlink, a folder, a FIFO, a socket, a device)."""
    try:
        found = os.stat(names[-1], dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    path = "/".join(names)
    if stat.S_ISLNK(found.st_mode):
        raise StepRefused(f"{REFUSED}{path} is a symlink, which is not followed")
    if not stat.S_ISREG(found.st_mode):
        kind = next((word for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                                             (stat.S_ISSOCK, "a socket")) if test(found.st_mode)),
                    "a device")
        raise StepRefused(f"{REFUSED}{path} is {kind}, not a regular file")
    return found


def replace_file(fd: int, name: str, data: bytes, mode: int | None) -> None:
    """`name` in folder `fd` becomes `data`, whole or not at all: written to a new file beside
    it, flushed to disk, renamed over it. A rename never follows a symlink: whatever `name` has
    become meanwhile is replaced, never written through. An existing file's mode is kept."""
    temporary = f".{uuid.uuid4().hex[:16]}.tmp"
    file = os.open(temporary, NEW_FILE_FLAGS, 0o666, dir_fd=fd)
    try:
        with open(file, "wb") as out:
            out.write(data)
            if mode is not None:
                os.fchmod(out.fileno(), stat.S_IMODE(mode))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=fd)
        raise


def backup_name(fd: int, name: str, make: Callable[[str], Any]) -> tuple[str, Any]:
    """A new name in the .backup folder `fd`, <name>.<YYYYmmdd_HHMMSS>.bak as the library names
    it, and what make(name) returned on creating it (never over another: a second backup of
    the same file in the same second is <name>.<stamp>-2.bak)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    for attempt in range(1, 100):
        candidate = f"{name}.{stamp}{f'-{attempt}' if attempt > 1 else ''}.bak"
        try:
            return candidate, make(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "too many backups of this file in one second")


def event_bytes(event: dict) -> bytes:
    """An event framed as the original frames it (`data: <json>`, a blank line), its JSON with
    the seed's spacing; a name from the filesystem in it (a backup's path, an error's) shown."""
    text = seed_dumps(event)
    try:
        return sse(text)
    except UnicodeEncodeError:
        return sse(shown(text))


class EventPipe:
    """A worker thread's events on their way to the event loop. At most PIPE_BYTES (and one
    event) wait in between: the worker waits while they do, so it never runs further ahead of
    a client that reads slowly or not at all. The loop takes all that wait at each wake-up,
    which the worker asks for once, not once per event: a plan's events never flood the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock, self.ready = loop, threading.Condition(), asyncio.Event()
        self.waiting: list[bytes] = []
        self.size = 0  # the bytes in self.waiting
        self.asked = False  # a wake-up is on its way to the loop
        self.ended = False  # the worker has put its last event
        self.closed = False  # the reader has gone: nothing more is taken

    def put(self, data: bytes) -> bool:
        """Worker: hands `data` on, waiting while the pipe is full; False once the reader has
        gone (nothing is handed on then)."""
        with self.lock:
            while self.size >= PIPE_BYTES and not self.closed:
                self.lock.wait()
            if self.closed:
                return False
            self.waiting.append(data)
            self.size += len(data)
            self.wake()
        return True

    def end(self) -> None:
        """Worker: there is nothing more."""
        with self.lock:
            self.ended = True
            self.wake()

    def wake(self) -> None:
        """The loop is asked to take what waits, unless it already has been (lock held)."""
        if not self.asked and not self.closed:
            self.asked = True
            try:
                self.loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:  # the loop has closed: no one will ever read
                self.closed = True

    async def batches(self) -> AsyncIterator[bytes]:
        """Loop: what waits, joined, at each wake-up, until the worker's end."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            with self.lock:
                batch, ended = self.waiting, self.ended
                self.waiting, self.size, self.asked = [], 0, False
                self.lock.notify_all()
            if batch:
                yield b"".join(batch)
            if ended:
                return

    def close(self) -> None:
        """Loop: the reader has gone; a worker waiting is let go, and what it puts is dropped."""
        with self.lock:
            self.closed = True
            self.waiting, self.size = [], 0
            self.lock.notify_all()


class SourceWriter:
    """Carries out one plan of write-source-code in root_dir (a resolved path), step by step as
    CodeFileExecutorLib does, on a worker thread (run), handing each event on as it happens.
    Every name is opened from root_dir's descriptor without following symlinks, so a symlink
    in a step's path, there before or swapped in since, fails that step: nothing is written
    outside root_dir. The service's own database is never written. With `backup`, what a step
    overwrites is first copied, and what it deletes moved, to .backup beside it. At most
    `limit` bytes (backup copies included) are written; past it the steps fail, saying why."""

    def __init__(self, root: str, blocks: list[str], backup: bool, limit: int,
                 db_path: str) -> None:
        self.root, self.blocks, self.backup, self.limit = root, blocks, backup, limit
        self.database = [os.path.realpath(db_path) + end for end in ("", "-wal", "-shm",
                                                                     "-journal")]
        self.root_fd, self.written = -1, 0
        self.spent: str | None = None  # why the steps left fail (the bound reached)
        self.pipe: EventPipe | None = None  # the events on their way to the client
        self.counts = dict.fromkeys(("successful_tasks", "failed_tasks", "invalid_tasks",
                                     "content_integrity_warnings"), 0)

    async def events(self) -> AsyncIterator[bytes]:
        """The events, framed (event_bytes; no [DONE]), as soon as the worker has them, many
        in one piece when they come faster than the client reads. The worker, a thread of its
        own (it may wait long on a client), never runs more than the pipe ahead. A client that
        goes away (sse-starlette hears http.disconnect and cancels this) closes the pipe: the
        step in hand is finished, no other begun."""
        self.pipe = EventPipe(asyncio.get_running_loop())
        threading.Thread(target=self.run, name=f"write-source-code {self.root}",
                         daemon=True).start()
        try:
            async with contextlib.aclosing(self.pipe.batches()) as batches:
                async for batch in batches:
                    yield batch
        finally:
            self.pipe.close()

    def send(self, event: dict) -> bool:
        """Worker: hands an event on; False once the client has gone."""
        return self.pipe.put(event_bytes(event))

    def run(self) -> None:
        started, total = time.monotonic(), len(self.blocks)
        try:
            self.send(write_event(f"一共{total}个待执行任务", "info"))
            self.root_fd = open_resolved_folder(self.root)
            try:
                for number, block in enumerate(self.blocks, 1):
                    if not self.send(write_event(f"正在解析第【{number}/{total}】个任务",
                                                 "progress")):
                        return  # the client has gone: no step is begun after the one in hand
                    for event in self.step(block):
                        self.send(event)  # the step in hand is finished, told or not
            finally:
                os.close(self.root_fd)
            self.send(self.summary(total, time.monotonic() - started))
        except Exception as exc:  # as the original: the error as an event, and the stream ends
            log.error("write-source-code failed: %s: %s", type(exc).__name__, exc)
            self.send({"type": "error", "message": f"Exception: {exc}", "timestamp": "",
                       "data": {}})
        finally:
            self.pipe.end()

    def summary(self, total: int, seconds: float) -> dict:
        done, failed, invalid, warned = self.counts.values()
        message = f"执行完成 - 成功: {done}, 失败: {failed}, 无效: {invalid}" + (
            f", 内容警告: {warned}" if warned else "")
        rate = done / total * 100 if total else 0
        return write_event(message, "summary", {
            "total_tasks": total, **self.counts, "success_rate": f"{rate:.1f}%",
            "execution_time": f"{seconds:.2f}s", "log_file": "N/A"})

    def failed(self, message: str) -> dict:
        self.counts["failed_tasks"] += 1
        return write_event(message, "error")

    def step(self, block: str) -> Iterator[dict]:
        """One block's events, in the library's order of checks and words."""
        if self.spent is not None:
            yield self.failed(f"执行任务失败: {self.spent}")
            return
        step = parse_step(block)
        if step.error is not None:
            self.counts["invalid_tasks"] += 1
            yield write_event(f"无效任务: {step.error}", "error")
            return
        yield write_event(step.line, "info")
        if step.fences > 1:
            yield write_event(f"发现{step.fences}个代码块，将使用最大的一个", "warning")
        action = step.action.lower().strip()
        if action in CONTENT_ACTIONS and not step.content.strip():
            yield self.failed(f"内容验证失败: 操作 '{step.action}' 需要提供内容，但内容为空")
            return
        if action in CONTENT_ACTIONS and (warning := integrity_warning(block, step.content)):
            self.counts["content_integrity_warnings"] += 1
            yield write_event(f"代码提取完整性警告: {warning}", "warning")
        try:
            if len(step.content.encode()) > MAX_STEP_BYTES:
                raise StepRefused("文件内容超过10MB，跳过")
            names = step_names(step.path)
            if action not in STEP_ACTIONS:
                raise StepRefused(f"不支持的操作类型: {action}")
            if action.endswith(" file") and re.search(r"[/\\]\.?$", step.path):
                raise StepRefused(f"执行任务失败: {step.path} is a folder's path (it ends in '/'): "
                                  f"'{step.action}' needs the path of a file")
            target = os.path.join(self.root, *names)
            if action != "create folder" and any(within(p, target) for p in self.database):
                raise StepRefused(f"{REFUSED}{step.path} is the service's own database")
            backup = STEP_ACTIONS[action](self, names, step.content)
        except StepRefused as refused:
            yield self.failed(refused.args[0])
            return
        except OSError as exc:
            yield self.failed(f"执行任务失败: {exc.strerror or exc}: {step.path}")
            return
        self.counts["successful_tasks"] += 1
        lines = len(step.content.splitlines()) if action in CONTENT_ACTIONS else 0
        yield write_event(f"任务执行成功，更新{lines}行代码" + (
            f" (备份: {backup})" if backup else ""), "success")

    @contextlib.contextmanager
    def folder(self, names: list[str], create: bool = False) -> Iterator[int | None]:
        """The folder `names` below root_dir, opened (None if it is missing and not `create`)."""
        try:
            fd = open_below(self.root_fd, names, create)
        except FileNotFoundError:
            if create:
                raise
            fd = None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StepRefused(f"{REFUSED}{exc.filename} is a symlink, which is not followed"
                              ) from None
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def spend(self, size: int) -> None:
        """Counts `size` bytes against the call's bound; past it, this step and the rest fail."""
        if self.written + size > self.limit:
            self.spent = (f"not carried out: this call has reached its bound of {self.limit} "
                          "bytes written (MAX_BODY_BYTES)")
            raise StepRefused(
                f"执行任务失败: this step would write {size} bytes (backup copy included), past "
                f"the bound of {self.limit} bytes a call may write (MAX_BODY_BYTES; "
                f"{self.written} written so far): it and the steps after it are not carried out")
        self.written += size

    def create_folder(self, names: list[str], content: str) -> None:
        with self.folder(names, create=True):
            return None

    def write_file(self, names: list[str], content: str) -> str | None:
        """Create file and Update file alike: with `backup`, a file there is copied first."""
        data = content.encode()
        with self.folder(names[:-1], create=True) as fd:
            found = existing_file(fd, names)
            keep = self.backup and found is not None
            self.spend(len(data) + (found.st_size if keep else 0))
            backup = self.copy_aside(fd, names, found.st_size) if keep else None
            replace_file(fd, names[-1], data, found.st_mode if found is not None else None)
        return backup

    def delete_file(self, names: list[str], content: str) -> str | None:
        with self.folder(names[:-1]) as fd:
            if fd is None or existing_file(fd, names) is None:
                return None  # the library: nothing to delete is no failure
            if self.backup:
                return self.move_aside(fd, names, folder=False)
            os.unlink(names[-1], dir_fd=fd)
        return None

    def delete_folder(self, names: list[str], content: str) -> str | None:
        with self.folder(names[:-1]) as fd:
            try:
                found = None if fd is None else os.stat(names[-1], dir_fd=fd,
                                                         follow_symlinks=False)
            except FileNotFoundError:
                found = None
            if found is not None and stat.S_ISLNK(found.st_mode):
                raise StepRefused(f"{REFUSED}{'/'.join(names)} is a symlink, which is not "
                                  "followed")
            if found is None or not stat.S_ISDIR(found.st_mode):
                return None  # the library: no folder there is no failure
            if self.backup:
                return self.move_aside(fd, names, folder=True)
            shutil.rmtree(names[-1], dir_fd=fd)  # by descriptors: symlinks inside are unlinked
        return None

    @contextlib.contextmanager
    def backup_folder(self, fd: int, names: list[str]) -> Iterator[int]:
        """The .backup folder beside a step's file (made if missing, never through a symlink)."""
        try:
            backups = open_below(fd, [".backup"], create=True)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            where = "/".join([*names[:-1], ".backup"])
            raise StepRefused(f"{REFUSED}{where} is a symlink, which is not followed") from None
        try:
            yield backups
        finally:
            os.close(backups)

    def backup_path(self, names: list[str], name: str) -> str:
        return os.path.join(self.root, *names[:-1], ".backup", name)

    def copy_aside(self, fd: int, names: list[str], size: int) -> str:
        """A copy of the file about to be overwritten (its first `size` bytes, as counted), with
        its mode and times, as the library's shutil.copy2 makes it."""
        with open(os.open(names[-1], READ_FLAGS, dir_fd=fd), "rb") as source, \
                self.backup_folder(fd, names) as backups:
            found = os.fstat(source.fileno())
            if not stat.S_ISREG(found.st_mode):
                raise StepRefused(f"{REFUSED}{'/'.join(names)} is not a regular file")
            name, copy = backup_name(backups, names[-1], lambda candidate: os.open(
                candidate, NEW_FILE_FLAGS, 0o600, dir_fd=backups))
            try:
                with open(copy, "wb") as target:
                    while size > 0 and (piece := source.read(min(size, 2**20))):
                        target.write(piece)
                        size -= len(piece)
                    target.flush()
                    os.fchmod(target.fileno(), stat.S_IMODE(found.st_mode))
                    os.utime(target.fileno(), ns=(found.st_atime_ns, found.st_mtime_ns))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=backups)
                raise
        return self.backup_path(names, name)

    def move_aside(self, fd: int, names: list[str], folder: bool) -> str:
        """What a delete would remove, renamed into .backup instead (nothing copied): onto a
        new empty file or folder made for it, so that no other backup is ever replaced."""
        with self.backup_folder(fd, names) as backups:
            def make(candidate: str) -> None:
                if folder:
                    return os.mkdir(candidate, dir_fd=backups)
                os.close(os.open(candidate, NEW_FILE_FLAGS, 0o600, dir_fd=backups))
            name, _ = backup_name(backups, names[-1], make)
            try:
                os.rename(names[-1], name, src_dir_fd=fd, dst_dir_fd=backups)
            except BaseException:
                with contextlib.suppress(OSError):
                    (os.rmdir if folder else os.unlink)(name, dir_fd=backups)
                raise
        return self.backup_path(names, name)


STEP_ACTIONS = {"create folder": SourceWriter.create_folder,
                "delete folder": SourceWriter.delete_folder,
                "create file": SourceWriter.write_file, "update file": SourceWriter.write_file,
                "delete file": SourceWriter.delete_file}


def writable_root(root_dir: str, work_dirs: list[str], write_roots: tuple) -> str:
    """root_dir resolved (symlinks included), if it is a project's ai_work_dir, one of
    WRITE_ROOTS, or below one (each resolved too): else 403, before anything else is looked at.
    Then the original's checks (400): it exists, is a folder, and may be written."""
    real = os.path.realpath(root_dir)
    if not any(within(real, os.path.realpath(allowed)) for allowed in (*work_dirs, *write_roots)
               if allowed):
        raise HTTPException(403, f"root_dir {root_dir} is not a project's ai_work_dir, one of "
                                 "WRITE_ROOTS, or a folder below one: nothing is written there")
    if not os.path.exists(real):
        raise HTTPException(400, "root_dir does not exist.")
    if not os.path.isdir(real):
        raise HTTPException(400, "root_dir is not a directory.")
    if not os.access(real, os.W_OK):
        raise HTTPException(400, "root_dir is not writable.")
    return real


async def write_source_code(request: Request) -> Response:
    data = await read_json(request)
    root_dir = text_field(data, "root_dir", required=True, empty_ok=False)
    plan = text_field(data, "files_content", required=True)
    text_field(data, "log_level")  # the original's log level: there is no executor log here
    backup = bool_field(data, "backup_enabled", True)
    state = request.app.state
    rows = await state.db.read(fetch_all, "SELECT DISTINCT ai_work_dir FROM projects "
                                          "WHERE ai_work_dir <> ''")
    root = await asyncio.to_thread(writable_root, root_dir, [r["ai_work_dir"] for r in rows],
                                   state.settings.write_roots)
    blocks = await asyncio.to_thread(plan_blocks, plan)
    writer = SourceWriter(root, blocks, backup, state.settings.max_body_bytes,
                          state.settings.db_path)
    return EventStream(writer.events(), headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------
# OpenAI input: what OpenAI's clients send (messages, content parts, tools, options), checked
# and made into what Poe takes. Used by chat completions and by the Responses API.

# /v1/models' fallback when Poe's list cannot be had (docs/API.md lists them); any bot name works.
MODELS = ("GPT-4o", "GPT-4o-Mini", "GPT-4.1", "o3-mini", "Claude-Sonnet-4", "Claude-3.5-Sonnet",
          "Claude-3.5-Haiku", "Gemini-2.5-Pro", "Gemini-2.0-Flash", "Llama-3.1-405B",
          "DeepSeek-R1", "Grok-3")
MODELS_CREATED = 1735689600  # 2025-01-01, a fixed date: Poe does not say when a bot was made
MODELS_TTL = 3600.0  # Poe's list is fetched again after an hour
MODELS_RETRY = 60.0  # a failed fetch is tried again after a minute, not on every request
MODELS_FETCH_TIMEOUT = 10.0
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user",
                "assistant": "assistant", "tool": "tool"}
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                      402: "insufficient_quota", 403: "permission_error", 404: "not_found_error",
                      409: "conflict_error", 413: "invalid_request_error",
                      415: "invalid_request_error", 429: "rate_limit_error",
                      500: "server_error", 502: "api_error", 504: "timeout_error"}
DATA_URL = re.compile(r"data:([^,;]*)(;[^,]*)?,")
# One Markdown code fence around a whole reply (bots like to fence the JSON they were asked for).
FENCED = re.compile(r"\s*```[^\n`]*\n(.*?)\n?[ \t]*```\s*", re.DOTALL)


# OpenAI's code where it has a name for it; else the status.
OPENAI_ERROR_CODES = {429: "rate_limit_exceeded"}


def openai_error(status: int, message: str, fields: dict | None = None) -> dict:
    """OpenAI's error body; `fields` (an OpenAIRefusal's code and param) go in it."""
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "api_error"),
                      "code": OPENAI_ERROR_CODES.get(status, status), **(fields or {})}}


class OpenAIRefusal(HTTPException):
    """A 400 OpenAI has a code of its own for (context_length_exceeded): the code and the field
    it is about (param) go in the error's body."""

    def __init__(self, detail: str, code: str, param: str) -> None:
        super().__init__(400, detail)
        self.fields = {"param": param, "code": code}


def string_at(value: Any, where: str, empty_ok: bool = False) -> str:
    """A required string inside the body, named by its place (messages[2].tool_call_id)."""
    return text_field({where: value}, where, required=True, empty_ok=empty_ok)


def objects_at(value: Any, where: str) -> Iterator[tuple[str, dict]]:
    """Each object of an array (none for null) with its place; 400 where one is not an object."""
    if value is not None and not isinstance(value, list):
        raise HTTPException(400, f"{where} must be an array")
    for i, item in enumerate(value or []):
        if not isinstance(item, dict):
            raise HTTPException(400, f"{where}[{i}] must be an object")
        yield f"{where}[{i}]", item


def openai_attachment(url: Any, where: str, name: Any = None) -> dict:
    """An image_url, file or audio part: http(s) URLs as is, data: URLs via upload_attachments."""
    url = string_at(url, where)
    name = name if isinstance(name, str) and name else None
    if re.match(r"https?://", url, re.IGNORECASE):
        return {"url": url, "name": name, "content_type": None}
    match = DATA_URL.match(url)
    if match is None or "base64" not in (match[2] or "").split(";"):
        raise HTTPException(400, f"{where} must be an http(s) URL or a base64 data: URL")
    content_type = match[1] or (mimetypes.guess_type(name)[0] if name else None)
    return {"data_url": url, "name": name, "content_type": content_type}


def openai_part(part: Any, where: str) -> str | dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "refusal"):
        return string_at(part.get(kind), f"{where}.{kind}", empty_ok=True)
    if kind == "image_url":
        image = part.get("image_url")
        return openai_attachment(image.get("url") if isinstance(image, dict) else image,
                                 f"{where}.image_url.url")
    if kind == "file":
        file = part.get("file") if isinstance(part.get("file"), dict) else {}
        data = file.get("file_data")
        if data is None:
            raise HTTPException(400, f"{where}.file.file_data is required (there is no file "
                                     "store here for a file_id to name)")
        if isinstance(data, str) and not data.startswith(("data:", "http:", "https:")):
            data = "data:;base64," + data  # bare base64, as some clients send it
        return openai_attachment(data, f"{where}.file.file_data", file.get("filename"))
    if kind == "input_audio":
        audio = part.get("input_audio") if isinstance(part.get("input_audio"), dict) else {}
        audio_format = string_at(audio.get("format"), f"{where}.input_audio.format")
        data = string_at(audio.get("data"), f"{where}.input_audio.data")
        return openai_attachment(f"data:audio/{audio_format};base64,{data}",
                                 f"{where}.input_audio.data", f"audio.{audio_format}")
    raise HTTPException(400, f"{where}.type must be text, image_url, file or input_audio"
                             + (f", not {kind!r}" if isinstance(kind, str) else ""))


def openai_content(content: Any, where: str, role: str) -> tuple[str, list[dict]]:
    """A message's content as Poe's text (parts joined by newlines) and attachments."""
    if content is None and role in ("assistant", "tool"):
        return "", []
    if isinstance(content, str):
        return string_at(content, where, empty_ok=True), []
    if not isinstance(content, list):
        raise HTTPException(400, f"{where} must be a string or an array of content parts")
    texts, attachments = [], []
    for j, part in enumerate(content):
        item = openai_part(part, f"{where}[{j}]")
        if isinstance(item, str):
            texts.append(item)
        elif role in ("user", "system"):
            attachments.append(item)
        else:
            raise HTTPException(400, f"{where}[{j}]: only text parts in {role} messages")
    return "\n".join(texts), attachments


def openai_tool_calls(value: Any, where: str) -> list[fp.ToolCallDefinition]:
    """An assistant message's function calls; other tools' calls are dropped, as those tools are."""
    calls = []
    for at, call in objects_at(value, where):
        if call.get("type", "function") != "function":
            continue
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        calls.append(fp.ToolCallDefinition(
            id=string_at(call.get("id"), f"{at}.id"), type="function",
            function={"name": string_at(function.get("name"), f"{at}.function.name"),
                      "arguments": "{}" if arguments is None else
                      string_at(arguments, f"{at}.function.arguments", True)}))
    return calls


def openai_entries(messages: list, place: str = "messages") -> list[dict]:
    """OpenAI's messages checked, each as {role, content, attachments}, with tool_calls
    (assistant) or tool_call_id and name (tool)."""
    history: list[dict] = []
    names: dict[str, str] = {}  # tool call id -> function name: a result without one gets it
    for where, message in objects_at(messages, place):
        role = message.get("role")
        if role == "function":
            raise HTTPException(400, f"{where}: function messages (OpenAI's deprecated "
                                     "functions) are not supported: use tools")
        if role not in OPENAI_ROLES:
            raise HTTPException(400, f"{where}.role must be one of " + ", ".join(OPENAI_ROLES))
        content, attachments = openai_content(message.get("content"), f"{where}.content", role)
        entry = {"role": OPENAI_ROLES[role], "content": content, "attachments": attachments}
        if role == "assistant":
            entry["tool_calls"] = openai_tool_calls(message.get("tool_calls"),
                                                    f"{where}.tool_calls")
            names.update((call.id, call.function.name) for call in entry["tool_calls"])
        elif role == "tool":
            entry["tool_call_id"] = string_at(message.get("tool_call_id"), f"{where}.tool_call_id")
            name = message.get("name")
            entry["name"] = name if isinstance(name, str) and name else \
                names.get(entry["tool_call_id"], "tool")
        history.append(entry)
    return history


def split_tool_round(history: list[dict], tool_round: bool
                     ) -> tuple[list[dict], list | None, list | None]:
    """The history for Poe, a closing tool round apart when tools go to Poe (`tool_round`): Poe
    carries one round a request, as tool_calls and tool_results; others are folded into text."""
    start = len(history)
    while start > 0 and history[start - 1]["role"] == "tool":
        start -= 1
    if not (tool_round and 0 < start < len(history) and history[start - 1].get("tool_calls")):
        return fold_tool_rounds(history), None, None
    asked, results = history[start - 1], history[start:]
    tool_results = [fp.ToolResultDefinition(role="tool", name=r["name"], content=r["content"],
                                            tool_call_id=r["tool_call_id"]) for r in results]
    rest = history[:start - 1] + ([{**asked, "tool_calls": []}] if asked["content"] else [])
    return fold_tool_rounds(rest), asked["tool_calls"], tool_results


def fold_tool_rounds(history: list[dict]) -> list[dict]:
    """Tool calls and results as text: the calls end their assistant message, the results of
    one round are one user message."""
    folded: list[dict] = []
    for entry in history:
        if calls := entry.get("tool_calls"):
            lines = [f"[tool call {c.id}: {c.function.name}({c.function.arguments})]"
                     for c in calls]
            entry = {**entry, "content": "\n".join(filter(None, [entry["content"], *lines]))}
        elif entry["role"] == "tool":
            text = f"[tool result {entry['tool_call_id']} ({entry['name']})]\n{entry['content']}"
            if folded and folded[-1].get("tool_results"):
                folded[-1]["content"] += "\n\n" + text
                continue
            entry = {"role": "user", "content": text, "attachments": [], "tool_results": True}
        folded.append(entry)
    return folded


MAX_SCHEMA_NODES = 20000  # a tool's parameters with their $refs inlined: far past any real one


def inline_refs(schema: dict) -> dict:
    """Local $refs (pydantic's nested models) inlined, recursive ones kept: Poe's tool parameters
    keep only type, properties and required, which would lose $defs and leave the refs dangling.
    ValueError past MAX_SCHEMA_NODES: refs used twice at each level double at each level."""
    defs = {name: spec for key in ("definitions", "$defs") if isinstance(schema.get(key), dict)
            for name, spec in schema[key].items()}
    if not defs:
        return schema
    budget = [MAX_SCHEMA_NODES]

    def resolve(node: Any, path: tuple) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError("the schema is too large once its $refs are inlined")
        if isinstance(node, list):
            return [resolve(item, path) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
            name = ref.rsplit("/", 1)[1]
            if name in defs and name not in path and isinstance(defs[name], dict):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return resolve({**defs[name], **rest}, path + (name,))
        return {k: resolve(v, path) for k, v in node.items() if k not in ("$defs", "definitions")}
    return resolve(schema, ())


def tool_definition(function: Any, where: str) -> fp.ToolDefinition:
    """A function tool as Poe wants it: always a description and parameters with properties."""
    if not isinstance(function, dict):
        raise HTTPException(400, f"{where} must be an object")
    name = string_at(function.get("name"), f"{where}.name")
    description = function.get("description")
    if not isinstance(description, str) or not description.strip():
        description = f"The function {name}."
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise HTTPException(400, f"{where}.parameters must be a JSON Schema object")
    try:
        # A chain of $refs, each inlined into the last, can nest deeper than any body may.
        parameters = inline_refs(parameters) if isinstance(parameters, dict) else {}
        return fp.ToolDefinition(type="function", function={
            "name": name, "description": description,
            "parameters": {**parameters, "type": parameters.get("type") or "object",
                           "properties": parameters.get("properties") or {}}})
    except (ValueError, RecursionError):
        raise HTTPException(400, f"{where}.parameters must be a JSON Schema object, not nested "
                                 "too deep or too large once its $refs are inlined") from None


def openai_tools(tools: Any, choice: Any) -> tuple[list[fp.ToolDefinition] | None, str]:
    """Poe's function tools (others left out), and the instruction for tool_choice, which Poe lacks:
    'none' sends no tools; 'required' or a named function (then the only tool) asks for a call."""
    definitions = [tool_definition(tool.get("function"), f"{at}.function")
                   for at, tool in objects_at(tools, "tools") if tool.get("type") == "function"]
    mode, names = ("auto" if choice is None else choice), None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function") if isinstance(choice.get("function"), dict) else {}
        mode, names = "required", [string_at(function.get("name"), "tool_choice.function.name")]
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice["allowed_tools"] if isinstance(choice.get("allowed_tools"), dict) else {}
        mode = allowed.get("mode", "auto")
        listed = allowed.get("tools") or []
        if not isinstance(listed, list):
            raise HTTPException(400, "tool_choice.allowed_tools.tools must be an array")
        names = [t["function"].get("name") for t in listed
                 if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    elif isinstance(choice, dict):
        mode = "auto"  # a custom tool named: those are left out, so the bot may choose
    if mode not in ("none", "auto", "required"):
        raise HTTPException(400, "tool_choice must be none, auto, required or a function")
    if mode == "required" and not tools:  # (as OpenAI: nothing to call is no reply to give)
        raise HTTPException(400, "tool_choice required asks for a tool call, but no tools are "
                                 "given")
    if names is not None:
        definitions = [d for d in definitions if d.function.name in names]
        if not definitions:
            raise HTTPException(400, f"tool_choice names no function among tools: {names}")
    if mode == "none" or not definitions:
        return None, ""
    if mode == "auto":
        return definitions, ""
    if len(definitions) == 1:
        return definitions, f"You must answer by calling the tool {definitions[0].function.name}."
    return definitions, "You must answer by calling one or more of the tools."


def json_instruction(response_format: Any) -> str:
    """What the bot is told for response_format (Poe has no such field); '' for text."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if response_format is None or kind == "text":
        return ""
    if kind == "json_object":
        return ("Answer with one valid JSON object and nothing else: no text before or after "
                "it, no Markdown code fence.")
    if kind != "json_schema":
        raise HTTPException(400, "response_format.type must be text, json_object or json_schema")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict) or \
            not isinstance(spec.get("name"), str):
        raise HTTPException(400, "response_format.json_schema must be an object with a name "
                                 "and a schema object")
    about = " ".join(str(spec[k]) for k in ("name", "description") if spec.get(k))
    return ("Answer with one valid JSON value that conforms to this JSON Schema"
            + (f" ({about})" if about else "") + ", and nothing else: no text before or after "
            f"it, no Markdown code fence.\n{json.dumps(spec['schema'], ensure_ascii=False)}")


def openai_params(data: dict) -> dict:
    """Fields QueryRequest carries, checked: temperature, stop, logit_bias, user (as user_id)."""
    params: dict[str, Any] = {}
    for name in ("functions", "function_call"):
        if data.get(name) is not None:
            raise HTTPException(400, f"{name} (OpenAI's deprecated functions) is not "
                                     "supported: use tools")
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise HTTPException(400, "n must be a positive integer")
    if isinstance(n, int) and n > 1:
        raise HTTPException(400, "n > 1 is not supported: Poe gives one reply per call")
    if (temperature := data.get("temperature")) is not None:
        if type(temperature) not in (int, float) or not 0 <= temperature <= 2:
            raise HTTPException(400, "temperature must be a number from 0 to 2")
        params["temperature"] = float(temperature)
    if (stop := data.get("stop")) is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise HTTPException(400, "stop must be a string or an array of strings")
        params["stop_sequences"] = [text_field({"stop": s}, "stop") for s in stop]
    if (bias := data.get("logit_bias")) is not None:
        if not isinstance(bias, dict) or not all(type(v) in (int, float) and -100 <= v <= 100
                                                 for v in bias.values()):
            raise HTTPException(400, "logit_bias must map token ids to numbers from -100 to 100")
        params["logit_bias"] = {k: float(v) for k, v in bias.items()}
    for name in ("user", "safety_identifier"):  # the latter is OpenAI's new name for user
        if isinstance(user := text_field(data, name), str) and user:
            params.setdefault("user_id", user)
    return params


def max_reply_tokens(data: dict) -> int | None:
    """max_tokens / max_completion_tokens (the smaller), as estimate_tokens counts them."""
    limits = [int_field(data, name, minimum=1) for name in ("max_tokens", "max_completion_tokens")]
    limits = [limit for limit in limits if isinstance(limit, int)]
    return min(limits) if limits else None


async def upload_entries(app: Starlette, api_key: str, entries: list[dict]) -> list[dict]:
    """Attachments uploaded to Poe (upload_attachments), so stored messages keep Poe's URLs;
    `entries` themselves when none has any."""
    if not any(entry["attachments"] for entry in entries):
        return entries
    uploaded = iter(await upload_attachments(
        app, api_key, [a for entry in entries for a in entry["attachments"]]))
    return [{**entry, "attachments": [next(uploaded) for _ in entry["attachments"]]}
            for entry in entries]


async def poe_history(app: Starlette, api_key: str, history: list[dict],
                      instructions: list[str]) -> list[dict]:
    """Instructions (tool_choice, response_format) joined to the system message; files uploaded."""
    added = "\n\n".join(filter(None, instructions))
    if added and history and history[0]["role"] == "system":
        history = [{**history[0], "content": f"{history[0]['content']}\n\n{added}"}, *history[1:]]
    elif added:
        history = [{"role": "system", "content": added, "attachments": []}, *history]
    return await upload_entries(app, api_key, history)


def poe_query(entries: list[dict], params: dict, tools: list | None = None
              ) -> tuple[PoeQuery, int]:
    """The query and its tokens as usage counts them: everything Poe is sent (the messages,
    the last round's tool calls and results, the tools' definitions as JSON). On a worker
    thread (200,000 messages are seconds of pydantic work). Nothing to send is the caller's
    400, not a paid call."""
    poe_messages = [poe_message(entry["role"], entry["content"], entry["attachments"])
                    for entry in entries if entry["content"] or entry["attachments"]]
    tool_results = params.get("tool_results") or []
    if not poe_messages and not tool_results:
        raise HTTPException(400, "there is nothing to send: every message is empty")
    sent = [m.content for m in [*poe_messages, *tool_results]] + [
        definitions_json(items) for items in (params.get("tool_calls"), tools) if items]
    return prepare_query(poe_messages, params), sum(map(estimate_tokens, sent))


def definitions_json(items: list) -> str:
    """Tools, or tool calls, as Poe is sent them (and usage counts them)."""
    return json.dumps([item.model_dump() for item in items], ensure_ascii=False)


def usage(prompt_tokens: int, reply_text: str) -> dict:
    completion_tokens = estimate_tokens(reply_text)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def metadata_field(data: dict) -> dict | None:
    """OpenAI's metadata: at most 16 string values (None when absent or null)."""
    metadata = data.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(v, str) for v in metadata.values())):
        raise HTTPException(400, "metadata must be an object of at most 16 string values")
    if any("\x00" in text for pair in (metadata or {}).items() for text in pair):
        raise HTTPException(400, "metadata must not contain NUL characters")  # (as all text)
    return metadata


# ---------------------------------------------------------------------------------------------
# Chat completions and models: stateless, for any client that speaks OpenAI's Chat Completions

class ClientToolCalls:
    """Tool calls as the client sees them: the first only without parallel_tool_calls; ids made
    (and kept, so stream and end agree) where the bot sent none; '' (no JSON) ends as '{}'."""

    def __init__(self, reply: Reply, parallel: bool) -> None:
        self.reply, self.parallel = reply, parallel
        self.ids: dict[int, str] = {}
        self.sent: list[int] = []  # per call streamed: the characters of its arguments sent

    def bot_calls(self) -> list[dict]:
        return self.reply.tool_calls if self.parallel else self.reply.tool_calls[:1]

    def id_of(self, index: int, call: dict) -> str:
        return self.ids.setdefault(index, call["id"] or f"call_{uuid.uuid4().hex[:24]}")

    def calls(self) -> list[dict]:  # the ended reply's calls: those with a name
        return [{"id": self.id_of(index, call), "type": "function",
                 "function": {"name": call["function"]["name"],
                              "arguments": call["function"]["arguments"] or "{}"}}
                for index, call in enumerate(self.bot_calls()) if call["function"]["name"]]

    def deltas(self, ended: bool = False) -> list[dict]:
        """What of the calls the client has not seen, a delta a call, in call order: a call's
        first piece has its id and name, later ones more arguments."""
        deltas = []
        for index, call in enumerate(self.bot_calls()):
            name = call["function"]["name"]
            arguments = call["function"]["arguments"] or ("{}" if ended else "")
            if index == len(self.sent):
                if not name:
                    break  # a call is announced with its name: wait for it
                self.sent.append(len(arguments))
                deltas.append({"index": index, "id": self.id_of(index, call), "type": "function",
                               "function": {"name": name, "arguments": arguments}})
            elif len(arguments) > self.sent[index]:
                deltas.append({"index": index,
                               "function": {"arguments": arguments[self.sent[index]:]}})
                self.sent[index] = len(arguments)
        return deltas


def json_reply(text: str) -> str:
    """A reply asked for as JSON: one code fence around it is taken off; what is still not
    JSON is Poe's failure (502), which a retry would pay for again."""
    if (fenced := FENCED.fullmatch(text)) is not None and "```" not in fenced[1]:
        text = fenced[1]
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        raise HTTPException(502, "the bot did not answer with the JSON asked for",
                            headers=NO_RETRY) from None
    return text


@dataclass
class Completion:
    """A chat completion being answered: its reply and what the request asked of the answer."""
    reply: Reply
    model: str
    prompt_tokens: int
    json: bool  # response_format asked for JSON
    usage: bool  # stream_options.include_usage
    tool_calls: ClientToolCalls
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, kind: str) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model, "object": kind}

    def finish_reason(self, calls: list) -> str:
        return "length" if self.reply.cut else "tool_calls" if calls else "stop"

    def usage_of(self, calls: list[dict]) -> dict:
        """Usage, counting as completion the text and the calls' arguments."""
        output = self.reply.text + "".join(call["function"]["arguments"] for call in calls)
        return usage(self.prompt_tokens, output)

    def whole(self) -> JSONResponse:
        calls, text = self.tool_calls.calls(), self.reply.text
        if self.json and not calls and not self.reply.cut:
            text = json_reply(text)  # cut by max_tokens: 'length' tells the client why it is not
        message = {"role": "assistant", "content": text if text or not calls else None,
                   "refusal": None, **({"tool_calls": calls} if calls else {})}
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": self.finish_reason(calls)}
        return JSONResponse({**self.head("chat.completion"), "choices": [choice],
                             "usage": self.usage_of(calls)})

    async def events(self, first: tuple) -> AsyncIterator[bytes]:
        head = dumps(self.head("chat.completion.chunk"))[:-1]

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse(f'{head},"choices":[{dumps(choice)}]}}')

        # A text chunk, as chunk() makes it, without the encoder's setup for each.
        text_head = f'data: {head},"choices":[{{"index":0,"delta":{{"content":'.encode()
        text_tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'

        sent = SentText()

        def text_chunk(text: str) -> bytes:
            return text_head + json_string(text).encode() + text_tail

        def texts(kind: str, text: str) -> list[bytes]:
            # OpenAI's deltas only append: a non-extending replacement goes whole, flagged.
            return [chunk({"content": piece, "replace": True}) if replace else text_chunk(piece)
                    for piece, replace in sent.deltas(kind, text)]

        def lane(text: str) -> bytes:  # texts("text", text), joined, for a text of one piece
            sent.add(text)
            return text_chunk(text)
        try:
            yield chunk({"role": "assistant", "content": ""})
            self.reply.listener.lane = lane
            async for item in self.reply.listener.events(first):
                kind = item[0]
                if kind in ("text", "replace"):
                    for data in texts(kind, item[1]):
                        yield data
                elif kind in ("tool_calls", "end"):
                    for delta in self.tool_calls.deltas(ended=kind == "end"):
                        yield chunk({"tool_calls": [delta]})  # at the end, '{}' for no arguments
                    if kind == "end":
                        calls = self.tool_calls.calls()
                        yield chunk({}, self.finish_reason(calls))
                        if self.usage:
                            usage_json = dumps(self.usage_of(calls))
                            yield sse(f'{head},"choices":[],"usage":{usage_json}}}')
                elif kind == "error":
                    yield sse(dumps(openai_error(item[1], item[2])))
            yield SSE_DONE
        finally:
            self.reply.drop_if_unstored()


async def chat_completions(request: Request) -> Response:
    api_key = poe_key(request)
    data = await read_json(request)
    model = model_field(data)
    if not isinstance(model, str):
        raise HTTPException(400, "model is required: the name of a Poe bot")
    tools, tool_instruction = openai_tools(data.get("tools"), data.get("tool_choice"))
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPException(400, "messages must be a non-empty array")
    history, tool_calls, tool_results = await off_loop(
        len(messages) >= LONG_ITEMS,
        lambda: split_tool_round(openai_entries(messages), tools is not None))
    params = openai_params(data)
    format_instruction = json_instruction(data.get("response_format"))
    stream = bool_field(data, "stream", False)
    options = data.get("stream_options")
    if options is not None and (not isinstance(options, dict) or type(
            options.get("include_usage")) not in (bool, type(None))):
        raise HTTPException(400, "stream_options must be an object whose include_usage is true "
                                 "or false")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    reply = Reply(max_tokens=max_reply_tokens(data))
    parallel = bool_field(data, "parallel_tool_calls", True)
    entries = await poe_history(request.app, api_key, history,
                                [tool_instruction, format_instruction])
    query, prompt_tokens = await asyncio.to_thread(poe_query, entries, {
        **params, "tool_calls": tool_calls, "tool_results": tool_results}, tools)
    completion = Completion(reply, model, prompt_tokens, bool(format_instruction),
                            include_usage, ClientToolCalls(reply, parallel))
    reply.start(request.app, model, query, api_key, stream=stream, tools=tools,
                receive=request.receive)
    return await reply.answer(stream, completion.whole, completion.events)


def context_window(entry: dict) -> int | None:
    """A model's window in tokens, from its entry in Poe's list: `context_window` (an integer,
    or Poe's object holding `context_length`), `context_length`, or `top_provider`'s."""
    provider = entry.get("top_provider")
    for value in (entry.get("context_window"), entry.get("context_length"),
                  provider.get("context_length") if isinstance(provider, dict) else None):
        if isinstance(value, dict):
            value = value.get("context_length")
        if type(value) is int and 0 < value < INT64:
            return value
    return None


def model_entries(body: Any) -> list[dict] | None:
    """Poe's list, metadata kept, each entry in OpenAI's shape; None if it is no list of models."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    models = [{**entry, "object": "model",
               "created": entry["created"] if isinstance(entry.get("created"), int)
               else MODELS_CREATED,
               "owned_by": entry["owned_by"] if isinstance(entry.get("owned_by"), str) else "poe",
               **({"context_window": window} if (window := context_window(entry)) else {})}
              for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)
              and entry["id"]]
    return models or None


class ModelList:
    """Poe's live list (POE_MODELS_URL, no key; app.state.models), fetched at most hourly, after a
    failure once a minute; meanwhile, or failing that, the last list fetched, else MODELS."""

    def __init__(self, poe: httpx.AsyncClient, url: str) -> None:
        self.poe, self.url = poe, url
        self.models: list[dict] | None = None
        self.windows: dict[str, int] = {}  # model id -> context window, where the list gives one
        self.fetched = self.failed = -math.inf
        self.lock = asyncio.Lock()  # one fetch for every request that finds the list stale

    def fresh(self) -> bool:
        now = time.monotonic()
        return now - self.fetched < MODELS_TTL or now - self.failed < MODELS_RETRY

    async def refresh(self) -> None:
        """Fetches the list when it is stale, once for every request that finds it so."""
        if not self.fresh():
            async with self.lock:
                if not self.fresh():
                    await self.fetch()

    async def get(self) -> list[dict]:
        await self.refresh()
        return self.models or [{"id": model, "object": "model", "created": MODELS_CREATED,
                                "owned_by": "poe"} for model in MODELS]

    async def window(self, model: str, default: int) -> int:
        """The model's context window in tokens, from the list (fetched as get() does), else
        `default` (CONTEXT_TOKENS)."""
        await self.refresh()
        return self.windows.get(model, default)

    async def fetch(self) -> None:
        models, why = None, "not a model list"
        try:
            response = await self.poe.get(self.url, timeout=MODELS_FETCH_TIMEOUT)
            if response.status_code != 200:
                why = f"HTTP {response.status_code}"
            else:
                models = model_entries(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            why = "unreachable" if isinstance(exc, httpx.TransportError) else type(exc).__name__
        if models is None:
            serves = "the last list fetched" if self.models else "its built-in list"
            log.warning("Poe's model list (%s) could not be had: %s; /v1/models serves %s",
                        self.url, why, serves)
            self.failed = time.monotonic()
        else:
            self.models, self.fetched = models, time.monotonic()
            self.windows = {entry["id"]: entry["context_window"] for entry in models
                            if "context_window" in entry and type(entry["context_window"]) is int}


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": await request.app.state.models.get()})


async def read_model(request: Request) -> JSONResponse:
    model_id = request.path_params["model_id"]
    for model in await request.app.state.models.get():
        if model["id"] == model_id:
            return JSONResponse(model)
    raise HTTPException(404, f"The model {model_id!r} does not exist")


# ---------------------------------------------------------------------------------------------
# OpenAI Responses: OpenAI's stateful API over the conversations kept here. A stored response is
# a turn of a conversation (its input, then its reply, as messages); the responses table knows
# which messages, and keeps the response object as served.

# An item id: msg_<message id>, or fc_<message id>_<n> for the n-th tool call of a message.
ITEM_ID = re.compile(r"(msg|fc)_(\d{1,18})(?:_(\d{1,6}))?")
ITEM_STATUS = {"complete": "completed", "streaming": "in_progress", "interrupted": "incomplete"}
TERMINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete"}
RESPONSE_SQL = ("SELECT id, conversation_id, first_message_id, last_message_id, body "
                "FROM responses WHERE id = ?")


def input_part(part: Any, where: str) -> dict:
    """A Responses content part as the Chat Completions part openai_part reads."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "refusal":
        return {"type": "refusal", "refusal": part.get("refusal")}
    if kind == "input_image" and part.get("image_url") is not None:
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    if kind == "input_file" and (part.get("file_data") or part.get("file_url")) is not None:
        return {"type": "file", "file": {"file_data": part.get("file_data") or
                                         part.get("file_url"), "filename": part.get("filename")}}
    if kind in ("input_image", "input_file"):
        raise HTTPException(400, f"{where} needs its data or URL (there is no file store here "
                                 "for a file_id to name)")
    raise HTTPException(400, f"{where}.type must be input_text, output_text, input_image or "
                             "input_file" + (f", not {kind!r}" if isinstance(kind, str) else ""))


def input_content(content: Any, where: str) -> Any:
    if isinstance(content, list):
        return [input_part(part, f"{where}[{j}]") for j, part in enumerate(content)]
    return content  # a string, or what openai_content refuses with a clear message


def input_messages(items: Any, names: dict[str, str], place: str = "input",
                   marks: list | None = None) -> list[dict]:
    """Responses items as Chat messages for openai_entries: a function_call joins the assistant
    message before it (one round), an output is a tool message named by `names` (call id: name).
    With `marks` (a turn's input), compaction and compaction_trigger items are no messages: each
    is noted there as (how many messages came before it, the item, its place)."""
    if isinstance(items, str) and place == "input":
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        either = "a string or " if place == "input" else ""
        raise HTTPException(400, f"{place} must be {either}a non-empty array of items")
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"{place}[{i}]"
        if not isinstance(item, dict):
            raise HTTPException(400, f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system", "developer"):
                raise HTTPException(400, f"{where}.role must be one of user, assistant, system, "
                                         "developer")
            messages.append({"role": item["role"],
                             "content": input_content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            arguments = item.get("arguments")
            call = {"id": string_at(item.get("call_id"), f"{where}.call_id"), "type": "function",
                    "function": {"name": string_at(item.get("name"), f"{where}.name"),
                                 "arguments": string_at(arguments, f"{where}.arguments", True)
                                 if arguments is not None else "{}"}}
            names[call["id"]] = call["function"]["name"]
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = string_at(item.get("call_id"), f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "name": names.get(call_id, "tool"),
                             "content": input_content(item.get("output"), f"{where}.output")})
        elif marks is not None and kind in ("compaction", "compaction_trigger"):
            marks.append((len(messages), item, where))
        elif kind != "reasoning":  # never sent by us: a client's own reasoning is no use to Poe
            memory = ", compaction, compaction_trigger" if marks is not None else ""
            raise HTTPException(400, f"{where}.type must be message, function_call, "
                                     f"function_call_output{memory}" +
                                (f", not {kind!r}" if isinstance(kind, str) else ""))
    return messages


def chat_tools(tools: Any) -> Any:
    """Responses' flat function tools in Chat Completions' form (openai_tools checks them)."""
    if not isinstance(tools, list):
        return tools
    return [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
            if isinstance(tool, dict) and tool.get("type") == "function" else tool
            for tool in tools]


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        tools = choice.get("tools") if isinstance(choice.get("tools"), list) else []
        return {"type": "allowed_tools", "allowed_tools": {
            "mode": choice.get("mode", "auto"),
            "tools": [{"type": "function", "function": {"name": t.get("name")}}
                      for t in tools if isinstance(t, dict) and t.get("type") == "function"]}}
    return choice


def chat_response_format(text: Any) -> Any:
    """text.format as response_format (json_schema's name and schema sit flat in it here)."""
    if text is not None and not isinstance(text, dict):
        raise HTTPException(400, "text must be an object")
    fmt = (text or {}).get("format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in (
            "text", "json_object", "json_schema")):
        raise HTTPException(400, "text.format.type must be text, json_object or json_schema")
    if fmt is not None and fmt["type"] == "json_schema":
        return {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}}
    return fmt


@dataclass(frozen=True)
class ResponseSpec:
    """A POST /v1/responses body, checked before anything is read, uploaded or asked."""
    base: dict  # the response object as it starts (in_progress), whose fields echo the request
    model: str
    conversation: str | None
    previous: str | None
    stream: bool
    store: bool
    tools: list | None
    instructions: list[str]  # what the bot is told: instructions, tool_choice, text.format
    json: bool
    params: dict
    max_tokens: int | None
    truncation: str  # "auto": the oldest items left out to fit; "disabled": 400 instead
    compact_threshold: int | None  # context_management's (INT64: none given); None: none asked


def response_spec(data: dict) -> ResponseSpec:
    model = model_field(data)
    if not isinstance(model, str):
        raise HTTPException(400, "model is required: the name of a Poe bot")
    previous = text_field(data, "previous_response_id", empty_ok=False)
    previous = previous if isinstance(previous, str) else None
    conversation = data.get("conversation")
    if isinstance(conversation, dict):
        conversation = string_at(conversation.get("id"), "conversation.id")
    elif conversation is not None:
        conversation = string_at(conversation, "conversation")
    if previous and conversation:
        raise HTTPException(400, "previous_response_id and conversation cannot be used together")
    instructions = text_field(data, "instructions")
    tools, instruction = openai_tools(chat_tools(data.get("tools")),
                                      chat_tool_choice(data.get("tool_choice")))
    response_format = chat_response_format(data.get("text"))
    limit = int_field(data, "max_output_tokens", minimum=1)
    limit = limit if isinstance(limit, int) else None
    params = openai_params(data)
    text = data.get("text") if isinstance(data.get("text"), dict) else {}
    base = {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
            "created_at": int(time.time()), "status": "in_progress", "background": False,
            "completed_at": None, "error": None, "incomplete_details": None,
            "instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": limit, "model": model, "output": [],
            "parallel_tool_calls": bool_field(data, "parallel_tool_calls", True),
            "previous_response_id": previous,
            "conversation": {"id": conversation} if conversation else None,
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
            "store": bool_field(data, "store", True), "temperature": params.get("temperature", 1.0),
            "text": {**text, "format": text.get("format") or {"type": "text"}},
            "tool_choice": data.get("tool_choice") or "auto",
            "tools": [{"type": "function", "name": t["name"],
                       **{k: t.get(k) for k in ("description", "parameters", "strict")}}
                      for t in data.get("tools") or [] if t.get("type") == "function"],
            "top_p": 1.0, "truncation": truncation_field(data), "usage": None, "user": None,
            "metadata": metadata_field(data) or {}}
    return ResponseSpec(
        base=base, model=model, conversation=conversation, previous=previous,
        stream=bool_field(data, "stream", False), store=base["store"], tools=tools,
        instructions=[base["instructions"], instruction, json_instruction(response_format)],
        json=response_format is not None and response_format.get("type") != "text",
        params=params, max_tokens=limit, truncation=base["truncation"],
        compact_threshold=compact_threshold(data))


def call_id_of(call: dict, key: Any, n: int) -> str:
    """The call's id, or one made from its message and place (the same on every read)."""
    return call.get("id") or f"call_{key}_{n}"


async def response_target(app: Starlette, previous: str | None, conversation_id: str | None
                          ) -> tuple[dict, StoredHistory]:
    """response_start, read on a reader thread when the turn names something stored."""
    if previous is None and conversation_id is None:
        return response_start(None, None, None)  # a new conversation: it reads nothing then
    return await app.state.db.read(response_start, previous, conversation_id)


def response_start(db: sqlite3.Connection | None, previous: str | None,
                   conversation_id: str | None) -> tuple[dict, StoredHistory]:
    """On a reader thread: where a turn goes, and its history (response_history). After the
    previous response (appended if that is the latest message, else in a copy of the history up
    to it), at a conversation's end, or in a new one (no `db` needed); `up_to` is the history's
    last message."""
    up_to = None
    if previous is not None:
        row = fetch_or_404(db, RESPONSE_SQL, (previous,), f"Response not found: {previous}")
        conversation_id, up_to = row["conversation_id"], row["last_message_id"]
    elif conversation_id is not None:
        get_conversation(db, conversation_id)
    newest = None if conversation_id is None else db.execute(
        "SELECT id FROM messages WHERE conversation_id = ? AND kind IS NULL ORDER BY id DESC "
        "LIMIT 1", (conversation_id,)).fetchone()
    last = 0 if newest is None else newest[0]
    # A summary /compact added after the latest message is no message to fork before.
    append = conversation_id is not None and (up_to is None or up_to >= last)
    history = response_history(db, conversation_id, None if append else up_to)
    return ({"conversation_id": conversation_id, "up_to": last if up_to is None else up_to,
             "fork": previous is not None, "append": append}, history)


@dataclass
class StoredHistory:
    """What a Responses turn inherits (stored_context): the system prompt, the current summary,
    the messages after it as openai_entries makes a request's (tool calls and results included,
    each with its "ref": ("id", message id)), and each call's function name."""
    system_prompt: str = ""
    summary: dict | None = None
    entries: list[dict] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)


def response_history(db: sqlite3.Connection, conversation_id: str | None,
                     up_to: int | None) -> StoredHistory:
    """A conversation's history (to `up_to`, if given) as a Responses turn sends it."""
    if conversation_id is None:
        return StoredHistory()
    context = stored_context(db, conversation_id, None if up_to is None else up_to + 1)
    history = StoredHistory(context.system_prompt, context.summary)
    names = history.names
    for row in context.rows:
        entry = {"role": row["role"], "content": row["content"],
                 "attachments": row["attachments"] or [], "ref": ("id", row["id"])}
        if row["tool_calls"]:
            entry["tool_calls"] = [fp.ToolCallDefinition(
                id=call_id_of(call, row["id"], n), type="function",
                function={**call["function"], "arguments": call["function"]["arguments"] or "{}"})
                for n, call in enumerate(json.loads(row["tool_calls"])) if call["function"]["name"]]
            names.update((call.id, call.function.name) for call in entry["tool_calls"])
        if row["role"] == "tool":
            entry["tool_call_id"] = row["tool_call_id"] or ""
            entry["name"] = names.get(entry["tool_call_id"], "tool")
        history.entries.append(entry)
    return history


def fork_conversation(db: sqlite3.Connection, conversation_id: str, up_to: int) -> str:
    """A copy of a conversation (settings, history to `up_to`) as a new one; the original stays."""
    new_id = str(uuid.uuid4())
    columns = "system_prompt, project_id, name, model, assistance_role, metadata"
    db.execute(f"INSERT INTO conversations (id, {columns}) SELECT ?, {columns} "
               "FROM conversations WHERE id = ?", (new_id, conversation_id))
    db.execute("INSERT INTO messages (conversation_id, role, content, status, attachments, "
               "tool_calls, tool_call_id, created_at, updated_at, kind, covers_first, "
               "covers_last) SELECT ?, role, content, CASE status WHEN 'streaming' THEN "
               "'interrupted' ELSE status END, attachments, tool_calls, tool_call_id, "
               "created_at, updated_at, kind, covers_first, covers_last FROM messages "
               "WHERE conversation_id = ? AND id <= ? ORDER BY id",
               (new_id, conversation_id, up_to))
    remap_covers(db, conversation_id, new_id, up_to)  # summaries cover the copies
    return new_id


def insert_response_turn(db: sqlite3.Connection, target: dict, model: str, rows: list[tuple],
                         base: dict, kept: KeptSummary | None = None, reply: bool = True
                         ) -> tuple[str, list[int], int | None, str, dict]:
    """On the writer: the turn's conversation (decided again here, where nobody can add to it
    meanwhile), its rows, then the summary it keeps (if any: KeptSummary, whose compaction item
    a made one puts in the output), then its reply (none for a compaction_trigger: the summary
    ends the turn), and the response's row; returns `base` in that conversation. The ids
    returned with the rows' include the summary's, which goes with them if the turn fails.
    409 before anything when a stored message its summariser read is gone (require_read_intact)."""
    conversation_id, up_to, copied = target["conversation_id"], target["up_to"], None
    if kept is not None and kept.read is not None:  # read in the history's own conversation
        require_read_intact(db, conversation_id, kept.read)
    if conversation_id is None:
        conversation_id = insert_conversation(db, {"model": model})
    elif not target["append"] or db.execute(
            "SELECT 1 FROM messages WHERE conversation_id = ? AND id > ? AND kind IS NULL "
            "LIMIT 1", (conversation_id, up_to)).fetchone():
        if not target["fork"]:
            raise HTTPException(409, "the conversation changed while this turn was prepared; "
                                     "send it again")
        source, conversation_id = conversation_id, fork_conversation(db, conversation_id, up_to)
        copied = copied_ids(db, source, conversation_id, up_to) if kept is not None else None
    # A summary standing for nothing stored goes first, covering itself: later turns send it.
    leading = [] if kept is None or kept.last is not None else \
        [insert_summary(db, conversation_id, kept.content, None)]
    ids, updated_at = insert_messages(db, conversation_id, rows)
    ids = [*leading, *ids]
    if kept is not None and (covers := kept.covers(ids[len(leading):], copied)) is not None:
        summary_id = insert_summary(db, conversation_id, kept.content, covers)
        if kept.seal is not None:
            base = {**base, "output": [compaction_item(kept.seal, kept.content, conversation_id,
                                                       summary_id)]}
        ids = [*ids, summary_id]
    last_id = insert_reply(db, conversation_id) if reply else ids[-1]
    base = {**base, "conversation": {"id": conversation_id}}
    db.execute("INSERT INTO responses (id, conversation_id, first_message_id, last_message_id, "
               "body) VALUES (?, ?, ?, ?, ?)",
               (base["id"], conversation_id, ids[0] if ids else last_id, last_id, dumps(base)))
    return conversation_id, ids, last_id if reply else None, updated_at, base


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_items(text: str, calls: list[dict], key: Any, status: str) -> list[dict]:
    """A reply as output items: its message (unless it is only calls), then each call (in Chat
    Completions' form, as stored) as a function_call item."""
    named = any(call["function"]["name"] for call in calls)  # a call without one is left out
    items = [{"type": "message", "id": f"msg_{key}", "status": status, "role": "assistant",
              "content": [output_text(text)]}] if text or not named else []
    return items + [{"type": "function_call", "id": f"fc_{key}_{n}",
                     "call_id": call_id_of(call, key, n), "name": call["function"]["name"],
                     "arguments": call["function"]["arguments"] or "{}", "status": "completed"}
                    for n, call in enumerate(calls) if call["function"]["name"]]


def response_usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def ended_response(base: dict, status: str, text: str, calls: list[dict], key: Any,
                   input_tokens: int, error: str | None = None, error_status: int = 502) -> dict:
    """The response object at its end: completed, incomplete (max_output_tokens), failed
    (cut off part way: its error's code OpenAI's, rate_limit_exceeded for a 429, else
    server_error) or cancelled (stopped); its output after base's (a compaction item the turn
    made). Usage is estimated as chat completions' is: the text and the calls' arguments."""
    output = output_items(text, calls, key, "completed" if status == "completed" else "incomplete")
    output_tokens = estimate_tokens("".join(item["arguments"] if item["type"] == "function_call"
                                            else item["content"][0]["text"] for item in output))
    return {**base, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "error": {"code": OPENAI_ERROR_CODES.get(error_status, "server_error"),
                      "message": error} if status == "failed" else None,
            "output": [*base["output"], *output], "usage": response_usage(input_tokens,
                                                                          output_tokens)}


class ResponseTurn:
    """A Responses turn, from its reply's start to its end: the response object it becomes
    (`body`, made by end(), which the reply calls as it ends). Its output begins with base's
    (`leading`: the compaction item of a turn that compacted), the reply's items after them."""

    def __init__(self, spec: ResponseSpec, base: dict, key: Any, input_tokens: int,
                 new_conversation: bool) -> None:
        self.spec, self.base, self.key = spec, base, key  # key: its items' ids, msg_<key>
        self.input_tokens, self.new_conversation = input_tokens, new_conversation
        self.leading: list[dict] = base["output"]
        self.body: dict | None = None
        self.body_json: str | None = None  # as stored (a stored turn's), and answered

    def end(self, reply: Reply) -> ResponseRecord:
        """The response object (None if the reply left no trace) and what save_reply_end stores."""
        calls = reply.tool_calls if self.base["parallel_tool_calls"] else reply.tool_calls[:1]
        if reply.error is not None and not reply.has_output:
            return ResponseRecord(self.base["id"], None, self.new_conversation, calls)
        text = reply.text
        if self.spec.json and not self.spec.stream and not calls and not reply.cut:
            with contextlib.suppress(HTTPException):
                text = json_reply(text)  # a fence taken off; the caller hears if it is not JSON
        status = "incomplete" if reply.cut else "completed" if reply.status == "complete" \
            else "failed" if reply.error is not None else "cancelled"
        error_status, error = reply.error if reply.error is not None else (502, None)
        self.body = ended_response(self.base, status, text, calls, self.key, self.input_tokens,
                                   error, error_status)
        # (Without store, the record goes nowhere: whole() encodes the body.)
        self.body_json = dumps(self.body) if self.spec.store else None
        return ResponseRecord(self.base["id"], self.body_json, self.new_conversation, calls)

    def whole(self) -> Response:
        if self.spec.json and self.body["status"] == "completed" and \
                (last := self.body["output"][-1])["type"] == "message":
            json_reply(last["content"][0]["text"])  # 502 when it is not JSON
        return Response(self.body_json if self.body_json is not None else dumps(self.body),
                        media_type="application/json")


async def create_response(request: Request) -> Response:
    app = request.app
    data = await read_json(request)
    spec = response_spec(data)
    api_key = poe_key(request)
    target, stored = await response_target(app, spec.previous, spec.conversation)
    live = app.state.replies.by_conversation.get(target["conversation_id"])
    if spec.previous is not None and live is not None and live.message_id == target["up_to"]:
        # Its reply is still arriving: a fork would copy it unfinished (OpenAI refuses too).
        raise HTTPException(409, f"response {spec.previous} is still in progress: continue from "
                                 "it once it has ended")
    claimed = target["conversation_id"] if spec.store and target["append"] else None
    if claimed is not None and target["fork"] and app.state.replies.busy(claimed):
        # A turn is being added after the same response: this one forks (insert_response_turn).
        claimed, target = None, {**target, "append": False}
    with app.state.replies.claim(claimed):
        given = await response_input(app, api_key, data.get("input"), stored.names)
        if given.trigger:
            return await compaction_trigger(app, api_key, spec, target, stored, given)
        query, input_tokens, kept = await response_query(app, api_key, spec, stored, given,
                                                         request.receive)
        if spec.store:
            conversation_id, inserted_ids, message_id, updated_at, base = await app.state.db.write(
                insert_response_turn, target, spec.model, message_rows(given.entries),
                spec.base, kept)
            turn = ResponseTurn(spec, base, message_id, input_tokens,
                                conversation_id != target["conversation_id"])
            reply = Reply(conversation_id, message_id, inserted_ids, updated_at=updated_at,
                          max_tokens=spec.max_tokens, ending=turn.end)
        else:
            made = [compaction_item(kept.seal, kept.content)] if kept and kept.seal else []
            turn = ResponseTurn(spec, {**spec.base, "output": made}, uuid.uuid4().hex[:24],
                                input_tokens, False)
            reply = Reply(max_tokens=spec.max_tokens, ending=turn.end)
        reply.start(app, spec.model, query, api_key, stream=spec.stream, tools=spec.tools,
                    receive=request.receive)
    return await reply.answer(spec.stream, turn.whole,
                              lambda first: response_events(turn, reply, first))


async def response_events(turn: ResponseTurn, reply: Reply, first: tuple) -> AsyncIterator[bytes]:
    """OpenAI's events: created, in_progress, the leading items (a compaction item), the text as
    it comes; once the reply ends, the calls and every done event (response_output_events), then
    the terminal event."""
    text_at = {"item_id": f"msg_{turn.key}", "output_index": len(turn.leading),
               "content_index": 0}
    opened, sent, event = False, SentText(), response_event()

    def delta_event(delta: str, replace: bool = False) -> bytes:
        return event("response.output_text.delta", **text_at, delta=delta, logprobs=[],
                     **({"replace": True} if replace else {}))

    def texts(pieces: list[tuple[str, bool]]) -> list[bytes]:
        # Responses' deltas only append: a non-extending replacement goes whole, flagged.
        return [delta_event(delta, replace) for delta, replace in pieces]

    def lane(text: str) -> bytes:  # texts() of a text of one piece, joined; nothing if empty
        sent.add(text)
        return delta_event(text) if text else b""
    try:
        for frame in leading_events(turn.base, event):
            yield frame
        async for item in reply.listener.events(first):
            if item[0] == "error" and reply.error is None:  # this client fell behind: it ends
                yield event("error", code="server_error", message=item[2], param=None)
                return
            if item[0] not in ("text", "replace") or not (item[1] or opened):
                continue
            # (an empty replacement of text sent goes as an empty delta, flagged)
            if not (pieces := [piece for piece in sent.deltas(item[0], item[1])
                               if piece[0] or piece[1]]):
                continue
            message_start = b""  # (goes with the message's first delta: one write)
            if not opened:
                opened = True
                message_start = event("response.output_item.added",
                                      output_index=text_at["output_index"], item={
                                          "type": "message", "id": text_at["item_id"],
                                          "status": "in_progress", "role": "assistant",
                                          "content": []})
                message_start += event("response.content_part.added", **text_at,
                                       part=output_text(""))
                reply.listener.lane = lane
            for data in texts(pieces):
                yield message_start + data
                message_start = b""
        await reply.done.wait()  # at once, but for a listener that fell behind
        for frame in response_output_events(turn.body, event, text_at, opened):
            yield frame
        yield event(TERMINAL_EVENTS.get(turn.body["status"], "response.failed"), response=turn.body)
    finally:
        reply.drop_if_unstored()


def response_event() -> Callable[..., bytes]:
    """A response stream's event maker: event(type, **fields), numbered from 0."""
    sequence = iter(range(2**62))

    def event(kind: str, **fields: Any) -> bytes:
        data = dumps({"type": kind, "sequence_number": next(sequence), **fields})
        return f"event: {kind}\ndata: ".encode() + data.encode() + b"\n\n"
    return event


def leading_events(base: dict, event: Callable) -> Iterator[bytes]:
    """created and in_progress (their output empty, as OpenAI's), then an added and a done event
    for each item the output begins with (a compaction item), in place."""
    yield event("response.created", response={**base, "output": []})
    yield event("response.in_progress", response={**base, "output": []})
    for index, item in enumerate(base["output"]):
        yield event("response.output_item.added", output_index=index, item=item)
        yield event("response.output_item.done", output_index=index, item=item)


def response_output_events(body: dict, event: Callable, text_at: dict,
                           opened: bool) -> Iterator[bytes]:
    """The done events of a response's output items, once it has ended (its leading compaction
    item was sent at the start)."""
    for index, output in enumerate(body["output"]):
        if output["type"] == "compaction":
            continue
        if output["type"] == "message":
            if not opened:
                yield event("response.output_item.added", output_index=index,
                            item={**output, "status": "in_progress", "content": []})
                yield event("response.content_part.added", **text_at, part=output_text(""))
            part = output["content"][0]
            yield event("response.output_text.done", **text_at, text=part["text"], logprobs=[])
            yield event("response.content_part.done", **text_at, part=part)
        else:
            at = {"item_id": output["id"], "output_index": index}
            yield event("response.output_item.added", output_index=index, item={
                **output, "arguments": "", "status": "in_progress"})
            yield event("response.function_call_arguments.delta", **at, delta=output["arguments"])
            yield event("response.function_call_arguments.done", **at, name=output["name"],
                        arguments=output["arguments"])
        yield event("response.output_item.done", output_index=index, item=output)


def stored_response(db: sqlite3.Connection, response_id: str) -> tuple[dict, dict | None]:
    """On a reader thread: the row, and its reply's message if in progress (or cut by a crash)."""
    row = fetch_or_404(db, RESPONSE_SQL, (response_id,), f"Response not found: {response_id}")
    row["body"] = json.loads(row["body"])
    in_progress = row["body"]["status"] == "in_progress"
    return row, fetch_one(db, "SELECT content, tool_calls FROM messages WHERE id = ?",
                          (row["last_message_id"],)) if in_progress else None


def live_reply(app: Starlette, row: dict) -> Reply | None:
    reply = app.state.replies.by_conversation.get(row["conversation_id"])
    return reply if reply is not None and reply.message_id == row["last_message_id"] else None


async def read_response(request: Request) -> JSONResponse:
    row, message = await request.app.state.db.read(stored_response,
                                                   request.path_params["response_id"])
    body, key = row["body"], row["last_message_id"]
    live = live_reply(request.app, row) if message is not None else None
    end = request.app.state.replies.unsaved.get(key) if message is not None else None
    if end is not None and end.response is not None and end.response.body is not None:
        # Ended, its end not stored yet (the database refuses writes): as it will be stored.
        body = await off_loop(len(end.response.body) >= LONG_BYTES, json.loads, end.response.body)
    elif live is not None:  # what has arrived so far
        body = {**body, "output": [*body["output"], *output_items(live.text, live.tool_calls,
                                                                  key, "in_progress")]}
    elif message is not None:
        # In progress when the server stopped (kill -9, power loss): what was saved, failed.
        calls = json.loads(message["tool_calls"]) if message["tool_calls"] else []
        body = ended_response(body, "failed", message["content"], calls, key, 0,
                              "the server stopped before the reply ended; its text so far is kept")
    return JSONResponse(body)


async def delete_response(request: Request) -> JSONResponse:
    """Forgets the response; its messages stay in their conversation (delete them there)."""
    response_id = request.path_params["response_id"]
    row, _ = await request.app.state.db.read(stored_response, response_id)
    if (reply := live_reply(request.app, row)) is not None:
        await reply.stop()
    await request.app.state.db.write(lambda db: db.execute("DELETE FROM responses WHERE id = ?",
                                                           (response_id,)))
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


def input_items_page(db: sqlite3.Connection, response_id: str, page: dict) -> dict:
    row, _ = stored_response(db, response_id)
    return items_page(db, row["conversation_id"], row["first_message_id"],
                      row["last_message_id"] - 1, page, summaries=False)


async def list_input_items(request: Request) -> JSONResponse:
    """The response's own input (not what it inherited from earlier turns, nor a summary it
    kept: a compaction item is never input)."""
    return await read_answer(request, input_items_page, request.path_params["response_id"],
                             list_query(request))


# ---------------------------------------------------------------------------------------------
# Responses memory: what the Responses API asks of the Memory section. truncation ("auto" leaves
# out the oldest whole items, "disabled" answers 400 context_length_exceeded), context_management
# (the Memory section's compaction, its summary returned as a compaction item), compaction items
# sent back as input (CompactionSeal: the summary itself, sealed with a key kept in the
# database), compaction_trigger items, and /v1/responses/compact.

COMPACTION_REFUSED = "the compaction item's encrypted_content is not one this server made"
SEAL_KEY = "compaction_seal"  # its name in server_secrets


def server_secret(db: sqlite3.Connection, name: str) -> bytes:
    """On the writer: the server's secret `name`, made (32 random bytes) the first time."""
    db.execute("INSERT OR IGNORE INTO server_secrets (name, value) VALUES (?, ?)",
               (name, secrets.token_bytes(32)))
    return bytes(db.execute("SELECT value FROM server_secrets WHERE name = ?",
                            (name,)).fetchone()[0])


def base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class CompactionSeal:
    """app.state.seal: a compaction item's encrypted_content, opaque to clients, is
    base64url(JSON {"v": 1, "summary", "conversation"?, "summary_id"?}) "." base64url(its
    HMAC-SHA256 under a key made once and kept in server_secrets, read once): it carries the
    summary itself, so a stateless client's item needs nothing stored, and cannot be altered."""

    def __init__(self, db: Database) -> None:
        self.db, self.key = db, None

    async def ready(self) -> CompactionSeal:
        if self.key is None:
            self.key = await self.db.write(server_secret, SEAL_KEY)
        return self

    def mac(self, body: str) -> str:
        return base64url(hmac.new(self.key, body.encode(), "sha256").digest())

    def seal(self, summary: str, conversation_id: str | None = None,
             summary_id: int | None = None) -> str:
        stored = {} if summary_id is None else {"conversation": conversation_id,
                                                "summary_id": summary_id}
        body = base64url(dumps({"v": 1, "summary": summary, **stored}).encode())
        return f"{body}.{self.mac(body)}"

    def open(self, token: str) -> str:
        """The summary a token carries; 400 for one this server did not seal as it is."""
        body, _, mac = token.partition(".")
        try:
            if not hmac.compare_digest(mac.encode(), self.mac(body).encode()):
                raise ValueError
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            if payload.get("v") != 1 or not isinstance(payload.get("summary"), str):
                raise ValueError
        except (ValueError, AttributeError):
            raise HTTPException(400, COMPACTION_REFUSED) from None
        return payload["summary"]


def compaction_item(seal: CompactionSeal, summary: str, conversation_id: str | None = None,
                    summary_id: int | None = None) -> dict:
    """A summary as OpenAI's compaction item: cmp_<summary message id> when stored."""
    key = uuid.uuid4().hex if summary_id is None else summary_id
    return {"type": "compaction", "id": f"cmp_{key}",
            "encrypted_content": seal.seal(summary, conversation_id, summary_id)}


def truncation_field(data: dict) -> str:
    value = data.get("truncation")
    if value not in (None, "auto", "disabled"):
        raise HTTPException(400, "truncation must be auto or disabled")
    return value or "disabled"


def compact_threshold(data: dict) -> int | None:
    """context_management's compaction threshold (the smallest, if several); INT64 for an entry
    without one (compaction then only when the turn is over the window); None: not asked."""
    thresholds = []
    for where, entry in objects_at(data.get("context_management"), "context_management"):
        if entry.get("type") != "compaction":
            raise HTTPException(400, f"{where}.type must be compaction")
        value = int_field({f"{where}.compact_threshold": entry.get("compact_threshold")},
                          f"{where}.compact_threshold", minimum=1)
        thresholds.append(INT64 if value is None else value)
    return min(thresholds) if thresholds else None


@dataclass
class ResponseInput:
    """A turn's input (response_input): its entries (openai_entries, attachments uploaded), each
    with its "ref" ("input", n); how many of them come before its last compaction item
    (`before`), whose summary stands for them and for the stored history (`summary`); and
    whether it holds a compaction_trigger."""
    entries: list[dict] = field(default_factory=list)
    before: int = 0
    summary: str | None = None
    trigger: bool = False


async def response_input(app: Starlette, api_key: str, items: Any,
                         names: dict[str, str]) -> ResponseInput:
    """The input as a turn uses it; a compaction item's summary taken from its token (400 for
    one this server did not make)."""
    marks: list[tuple[int, dict, str]] = []
    entries = await off_loop(isinstance(items, list) and len(items) >= LONG_ITEMS, lambda: (
        openai_entries(input_messages(items, names, "input", marks), "input")))
    given = ResponseInput(trigger=any(m[1].get("type") == "compaction_trigger" for m in marks))
    if compactions := [m for m in marks if m[1].get("type") == "compaction"]:
        given.before, item, where = compactions[-1]
        token = string_at(item.get("encrypted_content"), f"{where}.encrypted_content")
        seal = await app.state.seal.ready()
        given.summary = await off_loop(len(token) >= LONG_BYTES, seal.open, token)
    given.entries = await upload_entries(app, api_key, entries)
    for n, entry in enumerate(given.entries):  # the request's own dicts, or upload's copies
        entry["ref"] = ("input", n)
    return given


def total_cost(costs: Iterable[Cost]) -> Cost:
    tokens = chars = 0
    for cost in costs:
        tokens, chars = tokens + cost[0], chars + cost[1]
    return tokens, chars


def entry_cost(entry: dict) -> Cost:
    """What an entry costs a Responses turn, at most: its text, each tool call as JSON, a tool
    result's header (poe_query counts the last round as JSON, fold_tool_rounds others as text)."""
    if not entry.get("tool_calls") and entry["role"] != "tool":
        return cost_of(entry["content"] or "")
    extra = [definitions_json(entry.get("tool_calls") or [])] if entry.get("tool_calls") else []
    if entry["role"] == "tool":
        extra.append(f"[tool result {entry['tool_call_id']} ({entry['name']})]\n\n")
    return total_cost(map(cost_of, [entry["content"] or "", *extra]))


def turn_rows(stored: StoredHistory, given: ResponseInput
              ) -> tuple[list[dict], dict | None, tuple | None, tuple | None]:
    """What a turn may send, in order: the stored history's entries, then the input's; of those
    before the input's compaction item, only system (and developer) messages: its summary stands
    for the rest. Returns them, the summary in effect ({"content", ...}), the ref a summary the
    turn keeps covers from (the stored summary's first, else the first row's), and the last ref
    the item's summary stands for (the stored summary's last when no message is before it; None:
    no item, or nothing stored before it: insert_response_turn stores it first, covering itself)."""
    everything = stored.entries + given.entries
    first = ("id", stored.summary["covers_first"]) if stored.summary is not None else \
        everything[0]["ref"] if everything else None
    if given.summary is None:
        return everything, stored.summary, first, None
    before = len(stored.entries) + given.before
    rows = [entry for entry in everything[:before] if entry["role"] == "system"]
    last = everything[before - 1]["ref"] if before else None if stored.summary is None else \
        ("id", stored.summary["covers_last"])  # it stands for the stored summary's range
    return rows + everything[before:], {"content": given.summary}, first, last


@dataclass
class ResponsePlan:
    """A Responses turn before its call (plan_response): the rows it may send (turn_rows) and
    their costs; rows[fixed:] are the newest input, from its last user message (never left out
    nor summarised); the summary in effect; what is always sent besides (system prompt,
    instructions, tools); and rows[:cut] to summarise first (context_management; 0: none).
    `first` and `last`: what a summary the turn keeps covers (KeptSummary)."""
    spec: ResponseSpec
    budget: Budget
    system_prompt: str
    rows: list[dict]
    costs: list[Cost]
    fixed: int
    summary: dict | None
    always: Cost
    cut: int
    first: tuple | None
    last: tuple | None


def too_long(budget: Budget, cost: Cost, what: str) -> OpenAIRefusal:
    return OpenAIRefusal(
        f"{what} come to about {cost[0]} tokens ({cost[1]} characters): more than "
        f"{budget.model}'s context window allows (of its {budget.window} tokens {budget.tokens} "
        f"may be sent, the rest is kept for the reply; MAX_CONTEXT_CHARS is {budget.chars}). "
        "Send less, or set truncation to auto or context_management to fit it",
        "context_length_exceeded", "input")


def plan_response(spec: ResponseSpec, stored: StoredHistory, given: ResponseInput,
                  budget: Budget) -> ResponsePlan:
    """What the turn's context comes to, and what fits: 400 context_length_exceeded when the
    always-sent parts and the newest input alone do not fit (whatever truncation says), or
    when all of it does not, with truncation disabled and no context_management; a compaction
    planned when it passes compact_threshold (or the window), to under half of that."""
    rows, summary, first, last = turn_rows(stored, given)
    costs = [entry_cost(row) for row in rows]
    users = [i for i, row in enumerate(rows) if row["role"] == "user"]
    fixed = users[-1] if users else next(
        (i for i, row in enumerate(rows) if row["ref"][0] == "input"), len(rows))
    system = "\n\n".join(filter(None, [stored.system_prompt, *spec.instructions]))
    always = total_cost([cost_of(system), cost_of(definitions_json(spec.tools or []))])
    alone = total_cost([always, *costs[fixed:]])
    if not budget.fits(alone):
        raise too_long(budget, alone, "the instructions, tools and the newest input alone")
    summary_cost = cost_of(summary_system("", (summary or {}).get("content")))
    whole = total_cost([alone, summary_cost, *costs[:fixed]])
    cut, threshold = 0, spec.compact_threshold
    if threshold is not None and (whole[0] > threshold or not budget.fits(whole)):
        cut = plan_cut(costs, turn_starts(rows, fixed), fixed, total_cost([alone, summary_cost]),
                       dataclasses.replace(budget, tokens=min(threshold, budget.tokens)))
    elif threshold is None and spec.truncation == "disabled" and not budget.fits(whole):
        raise too_long(budget, whole, "the history and the new input")
    return ResponsePlan(spec, budget, stored.system_prompt, rows, costs, fixed, summary, always,
                        cut, first, last)


def leave_out_oldest(budget: Budget, rows: list[dict], costs: list[Cost], fixed: int,
                     cost: Cost) -> tuple[list[dict], Cost]:
    """truncation auto: rows less their oldest whole items till `cost` fits the budget: never a
    system message nor rows[fixed:], a function call never without its outputs (nor these
    without it). Returns the rows kept, and their cost."""
    gone: set[int] = set()
    start = 0
    while start < fixed and not budget.fits(cost):
        end = start + 1
        if rows[start].get("tool_calls"):
            while end < len(rows) and rows[end]["role"] == "tool":
                end += 1
        if end > fixed:  # its outputs are the newest input's
            break
        if rows[start]["role"] != "system":
            gone.update(range(start, end))
            cost = tuple(a - b for a, b in zip(cost, total_cost(costs[start:end])))
        start = end
    return [row for i, row in enumerate(rows) if i not in gone], cost


def fit_response(plan: ResponsePlan, made: str | None, failure: PoeFailure | None
                 ) -> tuple[list[dict], str | None]:
    """The rows sent and the summary: after the summary `made` of rows[:cut], if any; then,
    while over the budget, the oldest items left out (truncation auto), then the summary cut to
    the room left. Still over: the summary call's failure, if it failed, else 400."""
    start = plan.cut if made is not None else 0
    summary = made if made is not None else (plan.summary or {}).get("content")
    rows, costs, fixed = plan.rows[start:], plan.costs[start:], plan.fixed - start
    rest = total_cost([plan.always, *costs])
    if plan.spec.truncation == "auto" and not plan.budget.fits(
            total_cost([rest, cost_of(summary_system("", summary))])):
        rows, rest = leave_out_oldest(plan.budget, rows, costs, fixed, rest)
    if summary and not plan.budget.fits(total_cost([rest, cost_of(summary_system("", summary))])):
        header = cost_of(summary_system("", " "))
        summary = prefix_within(summary, plan.budget.tokens - rest[0] - header[0],
                                plan.budget.chars - rest[1] - header[1])
    cost = total_cost([rest, cost_of(summary_system("", summary))])
    if not plan.budget.fits(cost):
        if failure is not None:
            raise poe_http_error(failure.status, failure.detail, failure.headers)
        raise too_long(plan.budget, cost, "the history and the new input")
    return rows, summary


@dataclass
class KeptSummary:
    """A summary a stored Responses turn keeps (insert_response_turn): its text, and what it
    covers, from `first` to `last`, each a row's "ref" (("id", message id), or ("input", n): the
    turn's n-th input row, its id known once stored). `seal` when the turn made it (context
    management, compaction_trigger): its compaction item then leads the output; `read`, what
    its summariser read of the stored history (stored_read), checked as it is stored."""
    content: str
    first: tuple | None
    last: tuple | None
    seal: CompactionSeal | None = None
    read: tuple[int, int, int, int | None] | None = None

    def covers(self, ids: list[int], copied: tuple[list[int], list[int]] | None
               ) -> list[int] | None:
        """[first id, last id] once the turn's rows have `ids` (and its history, forked, the
        copies `copied`: copied_ids); None when it stands for nothing stored."""
        if self.first is None or self.last is None:
            return None

        def resolve(ref: tuple) -> int:
            kind, key = ref
            if kind == "input":
                return ids[key]
            return key if copied is None else copied[1][bisect.bisect_left(copied[0], key)]
        return [resolve(self.first), resolve(self.last)]


def stored_read(entries: list[dict], rows: list[dict], seen: int, summary: dict | None
                ) -> tuple[int, int, int, int | None] | None:
    """read_range of what a Responses summariser read of the stored history `entries` (a
    StoredHistory's: every message in its stretch, in id order), for require_read_intact: of
    rows[:seen] (turn_rows': the stored entries first, each "ref" ("id", message id)) the stored
    ones, as the stretch of `entries` from the first to the last (after an input compaction item
    only the system ones are read: a message deleted between them is a change too), and
    `summary` if stored (an input compaction item's is not). None: it read nothing stored."""
    read = bisect.bisect_left(rows, True, hi=seen, key=lambda row: row["ref"][0] != "id")
    summary_id = None if summary is None else summary.get("id")
    if read == 0:  # the stored summary alone, if any: no message is BETWEEN 0 AND -1
        return None if summary_id is None else (0, -1, 0, summary_id)
    first, last = rows[0]["ref"][1], rows[read - 1]["ref"][1]
    span = bisect.bisect_right(entries, last, key=lambda entry: entry["ref"][1]) - \
        bisect.bisect_left(entries, first, key=lambda entry: entry["ref"][1])
    return first, last, span, summary_id


async def response_query(app: Starlette, api_key: str, spec: ResponseSpec,
                         stored: StoredHistory, given: ResponseInput,
                         receive: Callable | None = None
                         ) -> tuple[PoeQuery, int, KeptSummary | None]:
    """The turn's query (plan_response, a summary made if planned, fit_response), the tokens of
    all it sends (usage's input_tokens), and the summary a stored turn keeps: the one made, else
    the input compaction item's. The stored history's entries are let go of (let_go); the
    client is watched during a summary call (while_client_stays)."""
    budget = await model_budget(app, spec.model, spec.max_tokens)
    long = len(stored.entries) + len(given.entries) >= LONG_ITEMS
    plan = await off_loop(long, plan_response, spec, stored, given, budget)
    made, failure, kept = None, None, None
    if plan.cut:
        model = summariser(app, spec.model)
        try:
            made, _, seen = await while_client_stays(receive, summary_of(
                app, api_key, model, plan.summary, plan.rows[:plan.cut], budget))
            plan = dataclasses.replace(plan, cut=seen)  # what the summariser read, no more
            kept = KeptSummary(made, plan.first, plan.rows[plan.cut - 1]["ref"],
                               await app.state.seal.ready(),
                               stored_read(stored.entries, plan.rows, plan.cut, plan.summary))
        except PoeFailure as exc:
            failure = exc
            log.warning("compacting a Responses history with %s failed (%s: %s)", model,
                        exc.status, exc.detail)
    if kept is None and given.summary is not None:
        kept = KeptSummary(given.summary, plan.first, plan.last)
    rows, summary = await off_loop(long, fit_response, plan, made, failure)
    system = summary_system(plan.system_prompt, summary)
    history = ([{"role": "system", "content": system, "attachments": []}] if system else []) + rows
    folded, tool_calls, tool_results = split_tool_round(history, spec.tools is not None)
    entries_for_poe = await poe_history(app, api_key, folded, spec.instructions)
    query, tokens = await asyncio.to_thread(poe_query, entries_for_poe, {
        **spec.params, "tool_calls": tool_calls, "tool_results": tool_results}, spec.tools)
    await let_go(stored.entries, plan.rows, plan.costs, rows, history, folded, entries_for_poe)
    return query, tokens, kept


async def compact_all(app: Starlette, api_key: str, model: str, stored: StoredHistory,
                      given: ResponseInput
                      ) -> tuple[str, list[dict], int, tuple | None, tuple | None]:
    """One summary of everything a turn would send (turn_rows), by COMPACT_MODEL or `model`:
    the summary, the rows it covers, the tokens its call was sent, the ref its range starts
    at, and what it read of the stored history (stored_read). 400 when there is nothing but
    system messages; Poe's status when the call fails."""
    rows, summary, first, _ = turn_rows(stored, given)
    if all(row["role"] == "system" or not (row["content"] or row["attachments"] or
                                           row.get("tool_calls")) for row in rows):
        raise HTTPException(400, "nothing to compact: there is no message (but system and "
                                 "empty ones) that a summary does not stand for already")
    try:
        made, tokens, seen = await summary_of(app, api_key, summariser(app, model), summary,
                                              rows, await model_budget(app, model),
                                              COMPACT_PASSES)
    except PoeFailure as exc:
        raise poe_http_error(exc.status, exc.detail, exc.headers) from None
    return made, rows[:seen], tokens, first, stored_read(stored.entries, rows, seen, summary)


async def compaction_trigger(app: Starlette, api_key: str, spec: ResponseSpec, target: dict,
                             stored: StoredHistory, given: ResponseInput) -> Response:
    """A turn whose input holds a compaction_trigger (Codex's remote compaction): one summary
    call and no turn call; stored, the input and the summary are kept in its conversation (the
    chain continues compacted). The response's output is exactly one compaction item."""
    summary, rows, tokens, first, read = await compact_all(app, api_key, spec.model, stored,
                                                           given)
    seal = await app.state.seal.ready()
    body = {**spec.base, "status": "completed", "completed_at": int(time.time()),
            "usage": response_usage(tokens, estimate_tokens(summary)),
            "output": [compaction_item(seal, summary)]}
    if spec.store:
        kept = KeptSummary(summary, first, rows[-1]["ref"], seal, read)
        *_, body = await app.state.db.write(insert_response_turn, target, spec.model,
                                            message_rows(given.entries), body, kept, False)
    if not spec.stream:
        return JSONResponse(body)

    async def events() -> AsyncIterator[bytes]:
        event = response_event()
        for frame in leading_events({**body, "status": "in_progress", "completed_at": None,
                                     "usage": None}, event):
            yield frame
        yield event("response.completed", response=body)
    return EventStream(events())


def user_item(entry: dict) -> dict:
    """A user message of what /v1/responses/compact compacted, as an item (msg_<id> stored)."""
    kind, key = entry["ref"]
    return plain_items({"id": key if kind == "id" else uuid.uuid4().hex[:24],
                        "status": "complete", "role": "user", "content": entry["content"],
                        "attachments": json.dumps(entry["attachments"]) if entry["attachments"]
                        else None, "tool_calls": None, "tool_call_id": None})[0]


async def compact_responses(request: Request) -> JSONResponse:
    """POST /v1/responses/compact: everything (the chain of previous_response_id, then the
    input) summarised by one call -> the user messages, then one compaction item. With
    previous_response_id, the summary is also stored, covering the stored messages, when that
    response is its conversation's latest turn."""
    app = request.app
    data = await read_json(request)
    model = model_field(data)
    if not isinstance(model, str):
        raise HTTPException(400, "model is required: the name of a Poe bot")
    previous = text_field(data, "previous_response_id", empty_ok=False)
    previous = previous if isinstance(previous, str) else None
    text_field(data, "instructions")  # checked; a turn's instructions are not summarised
    if previous is None and data.get("input") is None:
        raise HTTPException(400, "input or previous_response_id is required")
    api_key = poe_key(request)
    target, stored = await response_target(app, previous, None)
    given = ResponseInput() if data.get("input") is None else \
        await response_input(app, api_key, data["input"], stored.names)
    claimed = target["conversation_id"] if previous is not None and target["append"] else None
    with app.state.replies.claim(claimed):
        summary, covered, tokens, first, read = await compact_all(app, api_key, model, stored,
                                                                  given)
        seal, summary_id = await app.state.seal.ready(), None
        last = covered[-1]["ref"]  # the stored part it read: all of it when it reached input
        if last[0] == "input":
            last = stored.entries[-1]["ref"] if stored.entries else None
        covers = KeptSummary(summary, first, last).covers([], None)
        if claimed is not None and covers is not None:
            summary_id = await app.state.db.write(store_summary, claimed, summary, covers,
                                                  read)
    users = [user_item(entry) for entry in stored.entries + given.entries
             if entry["role"] == "user"]
    return JSONResponse({
        "id": f"resp_{uuid.uuid4().hex}", "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [*users, compaction_item(seal, summary, claimed, summary_id)],
        "usage": response_usage(tokens, estimate_tokens(summary))})


# ---------------------------------------------------------------------------------------------
# OpenAI Conversations: OpenAI's view of the conversations of /v1/chat/conversations, their
# messages as items (also the input items of a stored response)

def message_items(row: dict, covers: SummaryCovers | None = None) -> list[dict]:
    """A stored message as OpenAI's items, each with its memory_fields: a tool message is a
    function_call_output, an assistant's tool calls are function_call items after its message
    (if it has text)."""
    memory = memory_fields(row, covers)
    return [item | memory for item in plain_items(row)] if memory else plain_items(row)


def plain_items(row: dict) -> list[dict]:
    key, status = row["id"], ITEM_STATUS[row["status"]]
    if row["role"] == "tool":
        return [{"type": "function_call_output", "id": f"msg_{key}",
                 "call_id": row["tool_call_id"] or "", "output": row["content"], "status": status}]
    if row["role"] == "assistant":
        return output_items(row["content"], json.loads(row["tool_calls"] or "[]"), key, status)
    files = [{"type": "input_image", "image_url": a["url"], "detail": "auto"}
             if (a.get("content_type") or "").startswith("image/") else
             {"type": "input_file", "file_url": a["url"], "filename": a.get("name")}
             for a in json.loads(row["attachments"] or "[]")]
    return [{"type": "message", "id": f"msg_{key}", "status": status, "role": row["role"],
             "content": [{"type": "input_text", "text": row["content"]}, *files]}]


def item_key(item_id: str) -> tuple[int, int]:
    """Where an item sits: its message, then its place there (the message's own item first);
    400 for what is no item id of ours."""
    match = ITEM_ID.fullmatch(item_id)
    if match is None or (match[1] == "fc") != (match[3] is not None):
        raise HTTPException(400, f"{item_id!r} is not an item id (msg_N or fc_N_M)")
    return int(match[2]), -1 if match[3] is None else int(match[3])


def list_query(request: Request) -> dict:
    """The list parameters of OpenAI's item lists: order (desc by default), after, limit."""
    order = request.query_params.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise HTTPException(400, "order must be asc or desc")
    limit, after = query_limit(request, 100, 20), request.query_params.get("after")
    return {"order": order, "after": item_key(after) if after else None, "limit": limit}


def items_page(db: sqlite3.Connection, conversation_id: str, low: int, high: int,
               page: dict, summaries: bool = True) -> dict:
    """A page of the items of messages low..high (summaries left out unless `summaries`), on a
    reader thread. A message is at least one item, so limit + 2 messages (the cursor's, limit,
    one more) are enough to say has_more."""
    desc, after = page["order"] == "desc", page["after"]
    if after is not None:
        low, high = (low, min(high, after[0])) if desc else (max(low, after[0]), high)
    rows = fetch_all(db, MESSAGE_SQL + " WHERE conversation_id = ? AND id BETWEEN ? AND ? "
                     f"{'' if summaries else 'AND kind IS NULL '}"
                     f"ORDER BY id {'DESC' if desc else 'ASC'} LIMIT ?",
                     (conversation_id, low, high, page["limit"] + 2))
    covers = conversation_covers(db, conversation_id)
    items = [item for row in rows for item in (reversed(message_items(row, covers)) if desc
                                               else message_items(row, covers))]
    if after is not None:
        items = [item for item in items if (item_key(item["id"]) < after) == desc
                 and item_key(item["id"]) != after]
    data = items[:page["limit"]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > len(data)}


def conversation_object(db: sqlite3.Connection, conversation_id: str) -> dict:
    row = fetch_or_404(db, "SELECT id, metadata, CAST(strftime('%s', created_at) AS INTEGER) "
                           "AS created_at FROM conversations WHERE id = ?", (conversation_id,),
                       "Conversation not found")
    return {"id": row["id"], "object": "conversation", "created_at": row["created_at"],
            "metadata": json.loads(row["metadata"]) if row["metadata"] else {}}


async def item_rows(request: Request, items: Any) -> list[tuple]:
    """Items as insert_messages' rows, checked, data uploaded to Poe (needs a Poe key only then)."""
    entries = openai_entries(input_messages(items, {}, "items"), "items")
    if any(a.get("data_url") for entry in entries for a in entry["attachments"]):
        entries = await upload_entries(request.app, poe_key(request), entries)
    return message_rows(entries)


def new_openai_conversation(db: sqlite3.Connection, metadata: dict | None,
                            rows: list[tuple]) -> dict:
    changes: dict[str, Any] = {"metadata": json.dumps(metadata) if metadata else None}
    if rows and rows[0][0] == "system" and rows[0][2] is None:
        # A first system item is the conversation's system prompt, as in the chat API.
        changes["system_prompt"], rows = rows[0][1], rows[1:]
    conversation_id = insert_conversation(db, changes)
    insert_messages(db, conversation_id, rows)
    return conversation_object(db, conversation_id)


async def create_openai_conversation(request: Request) -> JSONResponse:
    data = await read_json(request)
    metadata = metadata_field(data)
    rows = await item_rows(request, data["items"]) if data.get("items") else []
    return await write_answer(request, new_openai_conversation, metadata, rows)


async def update_openai_conversation(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    data = await read_json(request)
    if "metadata" not in data:
        raise HTTPException(400, "metadata is required (null clears it)")
    metadata = metadata_field(data)

    def update(db: sqlite3.Connection) -> dict:
        change_conversation(db, conversation_id,
                            {"metadata": json.dumps(metadata) if metadata else None})
        return conversation_object(db, conversation_id)
    return await write_answer(request, update)


async def delete_openai_conversation(request: Request) -> JSONResponse:
    conversation_id = request.path_params["conversation_id"]
    await remove_conversation(request.app, conversation_id)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


def conversation_items(db: sqlite3.Connection, conversation_id: str, page: dict) -> dict:
    get_conversation(db, conversation_id)
    return items_page(db, conversation_id, 0, INT64 - 1, page)


async def list_conversation_items(request: Request) -> JSONResponse:
    return await read_answer(request, conversation_items, request.path_params["conversation_id"],
                             list_query(request))


async def add_conversation_items(request: Request) -> JSONResponse:
    """Adds items at the end of the conversation; not while a reply is arriving there (409),
    which would put them in the middle of its turn."""
    app, conversation_id = request.app, request.path_params["conversation_id"]
    data = await read_json(request)
    await app.state.db.read(get_conversation, conversation_id)
    rows = await item_rows(request, data.get("items"))
    if not rows:
        raise HTTPException(400, "items must hold a message, function_call or "
                                 "function_call_output (reasoning items are not kept)")
    if app.state.replies.busy(conversation_id):
        raise HTTPException(409, "this conversation already has a reply in progress")
    ids, _ = await app.state.db.write(insert_messages, conversation_id, rows)
    page = {"order": "asc", "after": None, "limit": INT64 - 3}  # all: a message, many items
    return await read_answer(request, items_page, conversation_id, ids[0], ids[-1], page)


def find_item(db: sqlite3.Connection, conversation_id: str, item_id: str) -> dict:
    get_conversation(db, conversation_id)
    match = ITEM_ID.fullmatch(item_id)
    row = match and fetch_one(db, MESSAGE_SQL + " WHERE id = ? AND conversation_id = ?",
                              (int(match[2]), conversation_id))
    item = next((i for i in message_items(row, conversation_covers(db, conversation_id))
                 if i["id"] == item_id), None) if row else None
    if item is None:
        raise HTTPException(404, f"Item not found: {item_id}")
    return {"row": row, "item": item}


async def read_conversation_item(request: Request) -> JSONResponse:
    found = await request.app.state.db.read(find_item, *request.path_params.values())
    return JSONResponse(found["item"])


async def delete_conversation_item(request: Request) -> JSONResponse:
    """Deletes a message, or one tool call of an assistant message (the message goes when it
    has nothing left); a reply still arriving there is stopped first. -> the conversation."""
    conversation_id, item_id = request.path_params.values()
    found = await request.app.state.db.read(find_item, conversation_id, item_id)
    await stop_replies_of(request.app, {found["row"]["id"]})

    def delete(db: sqlite3.Connection) -> dict:
        row, (_, place) = find_item(db, conversation_id, item_id)["row"], item_key(item_id)
        calls = json.loads(row["tool_calls"]) if row["tool_calls"] else []
        if place >= 0 and (row["content"] or len(calls) > 1):
            del calls[place]
            db.execute("UPDATE messages SET tool_calls = ? WHERE id = ?",
                       (json.dumps(calls) if calls else None, row["id"]))
        else:
            db.execute("DELETE FROM messages WHERE id = ?", (row["id"],))
        # A summary or a response may hold the call too.
        forget_message(db, [(conversation_id, row["id"], row["kind"])])
        touch_conversation(db, conversation_id)
        return conversation_object(db, conversation_id)
    return await write_answer(request, delete)


# ---------------------------------------------------------------------------------------------
# Search, export, backup: find anything, take everything with you. Search reads the FTS5
# trigram indexes kept by schema.sql's triggers; exports and checked backups run on a reader.

SEARCH_LIMIT, SEARCH_LIMIT_MAX, SEARCH_QUERY_CHARS = 20, 100, 500
# A trigram index finds words of three characters or more: a query made only of shorter words
# (a two-character Chinese word) is a substring scan of the SHORT_QUERY_ROWS newest messages and
# documents, answered newest first. bm25 costs a few microseconds a match: only a word's newest
# RANK_CANDIDATES matches are ranked.
SHORT_QUERY_ROWS, RANK_CANDIDATES = 50000, 2000
# A phrase costs the index about (its length) x (where its first letters are found): the
# phrases looked up, all words together, are at most this long; the rest of a word is checked.
SEARCH_PHRASE_CHARS = 16
# A search is stopped past this long (checked between SQLite's steps): it holds a long reader.
SEARCH_SECONDS = 1.0
SNIPPET_BEFORE, SNIPPET_CHARS = 60, 200
EXPORT_TYPES = {"md": "text/markdown; charset=utf-8", "json": "application/json"}
# An export is read, encoded and sent a page at a time: this many messages, or about this much.
EXPORT_PAGE_ROWS, EXPORT_PAGE_CHARS = 200, 1_000_000


@contextlib.contextmanager
def time_budget(db: sqlite3.Connection, seconds: float) -> Iterator[None]:
    """Interrupts db's statements once `seconds` have passed: a 503 that says so."""
    deadline = time.monotonic() + seconds
    db.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        yield
    except sqlite3.OperationalError as exc:
        if time.monotonic() <= deadline:
            raise
        raise HTTPException(503, f"the search was stopped after {seconds:g} s: search for fewer "
                            "or more distinctive words") from exc
    finally:
        db.set_progress_handler(None, 0)


def snippet(text: str, terms: list[str]) -> str:
    """About SNIPPET_CHARS around the first query word in it; whitespace collapsed, '…' at cuts."""
    found = [m.start() for t in terms if (m := re.search(re.escape(t), text, re.IGNORECASE))]
    start = max(0, min(found) - SNIPPET_BEFORE) if found else 0
    end = start + SNIPPET_CHARS
    piece = " ".join(text[start:end].split())
    return ("…" if start else "") + piece + ("…" if end < len(text) else "")


def ranked_ids(db: sqlite3.Connection, table: str, joins: str, where: list[str],
               params: dict) -> list[tuple[int, float]]:
    """(rowid, bm25) of the best matches in an FTS5 table, best first, among its newest
    RANK_CANDIDATES matches. `table`, `joins` and `where` are fixed SQL, never input."""
    sql = f"FROM {table} {joins} WHERE {table} MATCH :match AND {' AND '.join(where or ['1'])}"
    cut = db.execute(f"SELECT {table}.rowid {sql} ORDER BY {table}.rowid DESC "
                     f"LIMIT 1 OFFSET {RANK_CANDIDATES - 1}", params).fetchone()
    return db.execute(f"SELECT {table}.rowid, bm25({table}) AS score {sql} AND "
                      f"{table}.rowid >= :cut ORDER BY score LIMIT :limit",
                      {**params, "cut": cut[0] if cut else 0}).fetchall()


def search_index(db: sqlite3.Connection, q: str, project_id: int | None, limit: int) -> bytes:
    """The answer as JSON bytes. Words of 3+ characters are looked up in the indexes (each an
    FTS5 phrase: input is never query syntax), ranked by bm25; shorter ones, and what is past
    SEARCH_PHRASE_CHARS, filter those hits."""
    terms = list(dict.fromkeys(q.split()))  # each must be found (a substring, in any case)
    indexed, checked, room = [], [], SEARCH_PHRASE_CHARS
    for term in terms:
        phrase = term[:room] if len(term) >= 3 and room >= 3 else ""
        room -= len(phrase)
        indexed += [phrase] if phrase else []
        checked += [term.casefold()] if phrase != term else []
    checks = {f"t{i}": term for i, term in enumerate(checked)}
    match = " ".join('"' + t.replace('"', '""') + '"' for t in dict.fromkeys(indexed))
    params: dict[str, Any] = {**checks, "limit": limit, "project_id": project_id, "match": match}
    message_where = [f"contains_folded(m.content, :{name})" for name in checks]
    document_where = [f"(contains_folded(d.filename, :{name}) OR contains_folded(d.content, "
                      f":{name}))" for name in checks]
    if project_id is not None:
        message_where.append("coalesce((SELECT project_id FROM conversations c WHERE "
                             "c.id = m.conversation_id), 0) = :project_id")
        document_where.append("d.project_id = :project_id")
    documents = project_id != 0  # every document belongs to a project
    with time_budget(db, SEARCH_SECONDS):
        best = search_keys(db, indexed, params, message_where, document_where, documents)
    return dumps({"results": search_results(db, best, terms)}).encode()


def search_keys(db: sqlite3.Connection, indexed: list, params: dict, message_where: list[str],
                document_where: list[str], documents: bool) -> list[tuple[str, int]]:
    """The (kind, id) of the best matches: ranked, or the newest for short words alone."""
    limit = params["limit"]
    if indexed:
        scores = {("message", rowid): score for rowid, score in ranked_ids(
            db, "messages_fts", "JOIN messages m ON m.id = messages_fts.rowid"
            if message_where else "", message_where, params)}
        if documents:
            scores.update((("document", rowid), score) for rowid, score in ranked_ids(
                db, "documents_fts", "JOIN plan_documents d ON d.id = documents_fts.rowid"
                if document_where else "", document_where, params))
        best = sorted(scores, key=scores.get)[:limit]
    else:
        # Rows still streaming are left out, as the index leaves them out.
        newest = [(row[0], ("message", row[1])) for row in db.execute(
            "SELECT m.created_at, m.id FROM messages m WHERE m.id >= coalesce((SELECT id FROM "
            f"messages ORDER BY id DESC LIMIT 1 OFFSET {SHORT_QUERY_ROWS - 1}), 0) AND "
            f"m.status != 'streaming' AND {' AND '.join(message_where)} "
            "ORDER BY m.id DESC LIMIT :limit", params)]
        if documents:
            newest += [(row[0], ("document", row[1])) for row in db.execute(
                "SELECT d.created_time, d.id FROM plan_documents d WHERE d.id >= coalesce(("
                f"SELECT id FROM plan_documents ORDER BY id DESC LIMIT 1 OFFSET "
                f"{SHORT_QUERY_ROWS - 1}), 0) AND {' AND '.join(document_where)} "
                "ORDER BY d.id DESC LIMIT :limit", params)]
        best = [key for _, key in sorted(newest, reverse=True)[:limit]]
    return best


def search_results(db: sqlite3.Connection, keys: list[tuple[str, int]],
                   terms: list[str]) -> list[dict]:
    """The results for (kind, id) keys, in their order, each with its snippet."""
    found: dict[tuple[str, int], dict] = {}
    ids = {kind: json.dumps([i for k, i in keys if k == kind]) for kind in ("message", "document")}
    for row in db.execute("SELECT id, conversation_id, role, content, created_at FROM messages "
                          "WHERE id IN (SELECT value FROM json_each(?))", (ids["message"],)):
        found["message", row["id"]] = {
            "kind": "message", "id": row["id"], "conversation_id": row["conversation_id"],
            "role": row["role"], "snippet": snippet(row["content"], terms),
            "created_at": row["created_at"]}
    for row in db.execute("SELECT id, project_id, filename, version, content, created_time "
                          "FROM plan_documents WHERE id IN (SELECT value FROM json_each(?))",
                          (ids["document"],)):
        found["document", row["id"]] = {
            "kind": "document", "id": row["id"], "document_id": row["id"],
            "project_id": row["project_id"], "filename": row["filename"],
            "version": row["version"], "snippet": snippet(row["content"], terms),
            "created_at": row["created_time"]}
    return [found[key] for key in keys if key in found]


async def search(request: Request) -> Response:
    q = request.query_params.get("q", "")
    if not q.strip():
        raise HTTPException(400, "q must be a non-empty string")
    if len(q) > SEARCH_QUERY_CHARS:
        raise HTTPException(400, f"q must be at most {SEARCH_QUERY_CHARS} characters")
    if "\x00" in q:
        raise HTTPException(400, "q must not contain NUL characters")
    limit = query_limit(request, SEARCH_LIMIT_MAX, SEARCH_LIMIT)
    body = await request.app.state.db.read(search_index, q, query_int(request, "project_id"),
                                           limit, long=True)
    return Response(body, media_type="application/json")


def link_markdown(name: str, url: str) -> str:
    name = (name or "file").replace("[", "").replace("]", "")
    return f"[{name}]({url.replace(' ', '%20').replace(')', '%29')})"


def markdown_head(conversation: dict, count: int) -> str:
    """The conversation's title and details, as a person reads them."""
    title = conversation["name"] or f"Conversation {conversation['id']}"
    details = [("Conversation", f"`{conversation['id']}`"), ("Model", conversation["model"]),
               ("Project", conversation["project_name"]),
               ("Assistance role", conversation["assistance_role"]),
               ("Status", "archived" if conversation["status"] == 1 else "normal"),
               ("Created", conversation["created_at"]), ("Updated", conversation["updated_at"]),
               ("Messages", str(count))]
    return "\n".join([f"# {title}", ""] + [f"- **{k}:** {v}" for k, v in details if v]) + "\n"


def message_markdown(number: int, message: dict) -> str:
    """One message under its heading, with its attachments and tool calls."""
    status = "" if message["status"] == "complete" else f" ({message['status']})"
    role = "Summary" if message.get("kind") == "summary" else message["role"].capitalize()
    heading = f"## {number}. {role} · {message['created_at']}{status}"
    lines = ["", "---", "", heading, ""]
    if message.get("kind") == "summary":
        first, last = message["covers"]
        lines += [f"*Message {message['id']}: the summary of messages {first} to {last}, which "
                  "stay stored and in this export; later turns send it instead of them.*", ""]
    if message.get("summarized_by") is not None:
        lines += [f"*Message {message['id']}, summarized by message "
                  f"{message['summarized_by']}*", ""]
    if message.get("tool_call_id"):
        lines += [f"*Result of tool call `{message['tool_call_id']}`*", ""]
    lines.append(message["content"])
    if message.get("attachments"):
        lines += ["", "**Attachments:**", ""]
        lines += [f"- {link_markdown(a.get('name'), a.get('url', ''))}"
                  + (f" ({a['content_type']})" if a.get("content_type") else "")
                  for a in message["attachments"]]
    if message.get("tool_calls"):
        lines += ["", "**Tool calls:**", ""]
        for call in message["tool_calls"]:
            function = call.get("function") or {}
            lines += [f"- `{function.get('name', '')}` (`{call.get('id', '')}`):", "",
                      "  ```json", f"  {function.get('arguments', '')}", "  ```"]
    return "\n".join(lines) + "\n"


def export_head(db: sqlite3.Connection, conversation_id: str, fmt: str) -> tuple[bytes, int]:
    """The export's start, and the newest message id it takes (later ones are left out)."""
    conversation = get_conversation(db, conversation_id)
    metadata = db.execute("SELECT metadata FROM conversations WHERE id = ?",
                          (conversation_id,)).fetchone()[0]
    conversation["metadata"] = json.loads(metadata) if metadata else None
    last_id, count = db.execute("SELECT coalesce(max(id), 0), count(*) FROM messages WHERE "
                                "conversation_id = ?", (conversation_id,)).fetchone()
    if fmt == "md":
        return markdown_head(conversation, count).encode(), last_id
    exported_at = db.execute(f"SELECT {NOW_SQL}").fetchone()[0]
    return dumps({"conversation": conversation, "exported_at": exported_at})[:-1].encode() \
        + b',"messages":[', last_id


def export_page(db: sqlite3.Connection, conversation_id: str, fmt: str, after_id: int,
                last_id: int, done: int) -> tuple[bytes, int | None, int]:
    """The messages after `after_id` (`done` already sent), up to EXPORT_PAGE_ROWS of them or
    about EXPORT_PAGE_CHARS, encoded; the last id read (None: the export is complete), and how
    many are sent with them."""
    messages, chars = [], 0
    covers = conversation_covers(db, conversation_id)
    for row in db.execute(MESSAGE_SQL + " WHERE conversation_id = ? AND id > ? AND id <= ? "
                          "ORDER BY id LIMIT ?", (conversation_id, after_id, last_id,
                                                  EXPORT_PAGE_ROWS)):
        messages.append(message_json(row, covers))
        chars += len(row["content"])
        if chars >= EXPORT_PAGE_CHARS:
            break
    if not messages:
        return (b"" if fmt == "md" else b"]}"), None, done
    if fmt == "md":
        text = "".join(message_markdown(done + n, m) for n, m in enumerate(messages, 1))
    else:
        text = ("," if done > 0 else "") + dumps(messages)[1:-1]
    return text.encode(), messages[-1]["id"], done + len(messages)


async def export_body(db: Database, conversation_id: str, fmt: str, head: bytes,
                      last_id: int) -> AsyncIterator[bytes]:
    """The export a page at a time, each read and encoded on a long reader."""
    yield head
    after_id, done = -1, 0  # 0 is an id too
    while after_id is not None:
        try:
            page, after_id, done = await db.read(export_page, conversation_id, fmt, after_id,
                                                 last_id, done, long=True)
        except HTTPException as exc:  # the response has begun: it can only end short
            log.warning("export of %s cut short: %s", conversation_id, exc.detail)
            return
        yield page


async def export(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    fmt = request.query_params.get("format") or "md"
    if fmt not in EXPORT_TYPES:
        raise HTTPException(400, "format must be md or json")
    db = request.app.state.db
    head, last_id = await db.read(export_head, conversation_id, fmt, long=True)
    filename = re.sub(r"[^A-Za-z0-9._-]", "_", conversation_id)
    disposition = f'attachment; filename="conversation-{filename}.{fmt}"'
    return StreamingResponse(export_body(db, conversation_id, fmt, head, last_id),
                             media_type=EXPORT_TYPES[fmt],
                             headers={"Content-Disposition": disposition})


def backup_to_temporary(db: sqlite3.Connection, directory: str, check: str = "quick_check") -> str:
    """The path of a copy of `db`'s database, new in `directory` (the database's own, where there
    is room for one): SQLite's online backup in one step (one consistent snapshot; writers go
    on), a single file (rollback journal, not WAL), checked by PRAGMA `check`."""
    assert check in ("quick_check", "integrity_check")
    try:
        fd, path = tempfile.mkstemp(prefix=".backup-", suffix=".db", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise HTTPException(503, f"cannot write the backup copy: {exc.strerror}") from None
    try:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as copy:
            db.backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")
            problems = [row[0] for row in copy.execute(f"PRAGMA {check}")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(f"the copy fails {check}: {'; '.join(problems[:3])}")
            copy.execute("SELECT count(*) FROM messages").fetchone()
    except BaseException:
        remove_file(path)
        raise
    return path


def remove_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


async def download_backup(request: Request) -> Response:
    db_path = request.app.state.settings.db_path
    path = await request.app.state.db.read(backup_to_temporary,
                                           os.path.dirname(os.path.abspath(db_path)), long=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(os.path.basename(db_path))[0])
    # Each request copies anew, so a Range (a resumed download) would join two copies: it is
    # dropped, the copy sent whole (read off the loop) and deleted once sent or the client gone.
    request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"range"]
    return FileResponse(path, media_type="application/vnd.sqlite3",
                        filename=f"{name}-backup-{stamp}.db",
                        headers={"Cache-Control": "no-store", "Accept-Ranges": "none"},
                        background=BackgroundTask(remove_file, path))


# ---------------------------------------------------------------------------------------------
# Health, login, errors, access

LOOP_WATCH_SECONDS = 0.05
OPENAI_PREFIXES = ("/v1/chat/completions", "/v1/models", "/v1/responses", "/v1/conversations")
OPEN_ROUTES = {("GET", "/health"), ("POST", "/v1/auth/login")}
JSON_TYPE = re.compile(r"application/([\w.+-]+\+)?json\s*(;.*)?$", re.IGNORECASE)


class LoopWatch:
    """Measures how late the event loop wakes up: the longest stall is in /health, and one past
    half a second is logged, for nothing should hold the loop that long."""

    def __init__(self) -> None:
        self.longest_stall = 0.0
        self.task = asyncio.create_task(self.watch())

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LOOP_WATCH_SECONDS)
            stall = loop.time() - started - LOOP_WATCH_SECONDS
            self.longest_stall = max(self.longest_stall, stall)
            if stall > 0.5:
                log.warning("the event loop stalled for %.0f ms", stall * 1000)


async def health(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        async with asyncio.timeout(2):
            await state.db.read(fetch_one, "SELECT 1 AS ok")
    except (HTTPException, TimeoutError):
        return JSONResponse({"status": "error", "database": "unavailable"}, 503)
    return JSONResponse({"status": "ok", "database": "ok",
                         "replies_in_progress": state.replies.sending(),
                         "unsaved_replies": len(state.replies.unsaved),
                         "longest_loop_stall_ms": round(state.loop_watch.longest_stall * 1000, 1),
                         "poe_budget": state.poe_budget.figures()})


def is_access_key(settings: Settings, token: str | None) -> bool:
    """Constant time: every key is compared (sum, not any), whatever matches."""
    return sum(hmac.compare_digest((token or "").encode(), key.encode())
               for key in settings.access_keys) > 0


async def login(request: Request) -> JSONResponse:
    data = await read_json(request)
    user = text_field(data, "userName", required=True, empty_ok=False).strip()
    password = text_field(data, "password")
    settings = request.app.state.settings
    if settings.access_keys and not is_access_key(
            settings, password if isinstance(password, str) else None):
        raise HTTPException(401, "Invalid username or password")
    return JSONResponse({"name": user, "user": user})


def error_response(scope: dict, status: int, detail: str, headers: dict | None = None,
                   fields: dict | None = None) -> JSONResponse:
    """OpenAI's routes answer errors in OpenAI's shape, and so does any /v1/ path not ours."""
    path = scope.get("path", "")
    openai = path.startswith(OPENAI_PREFIXES) or path.startswith("/v1/") and (
        "endpoint" not in scope and all(route.matches(scope)[0] == Match.NONE for route in routes))
    body = openai_error(status, detail, fields) if openai else {"detail": detail}
    return JSONResponse(body, status, headers=headers)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(request.scope, exc.status_code, exc.detail, exc.headers,
                          getattr(exc, "fields", None))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, sqlite3.Error):
        return await http_error(request, database_failure(exc))
    log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return error_response(request.scope, 500, "internal error")


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, whose refused preflight is plain text: JSON here, as every error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items()
                   if k.lower() not in ("content-length", "content-type")}
        return JSONResponse({"detail": bytes(response.body).decode()}, 400, headers=headers)


def host_guard(app: Any, settings: Settings) -> Any:
    """A Host not in ALLOWED_HOSTS is 400 (DNS rebinding), in JSON as every error here."""
    allowed = {h.lower() for h in settings.allowed_hosts}

    async def guard(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and "*" not in allowed:
            host = Headers(scope=scope).get("host", "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in allowed:
                detail = "this Host is not served here (ALLOWED_HOSTS)"
                return await error_response(scope, 400, detail)(scope, receive, send)
        await app(scope, receive, send)
    return guard


def access_guard(app: Any, settings: Settings) -> Any:
    """ACCESS_KEYS as Bearer on every route but /health, login and CORS preflights (401); a
    body must come as JSON (415), so that no web page can post one without a preflight, and in
    a Content-Encoding served here (415)."""

    async def guard(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await app(scope, receive, send)
        headers = Headers(scope=scope)
        if settings.access_keys and (scope["method"], scope["path"]) not in OPEN_ROUTES:
            if not is_access_key(settings, bearer(headers)):
                detail = "a valid access key is required: 'Authorization: Bearer <access key>'"
                return await error_response(scope, 401, detail)(scope, receive, send)
        length = headers.get("content-length", "0").strip()
        has_body = "transfer-encoding" in headers or (length != "0" and length != "")
        if has_body and not JSON_TYPE.match(headers.get("content-type", "")):
            detail = "the body must be JSON, sent as 'Content-Type: application/json'"
            return await error_response(scope, 415, detail)(scope, receive, send)
        try:
            if has_body:
                body_coding(headers)
        except ValueError as exc:
            return await error_response(scope, 415, str(exc))(scope, receive, send)
        await app(scope, receive, send)
    return guard


# ---------------------------------------------------------------------------------------------
# The app: the routes in the order of the sections above, the lifespan, create_app()

# Each path's endpoint by method. Paths are matched in this order; a method a path lacks is 405
# with the Allow of every method it has (MethodRoute).
ENDPOINTS = {
    # Conversations
    "/v1/chat/conversations": {"GET": list_conversations, "POST": create_conversation},
    "/v1/chat/conversations/grouped": {"GET": grouped_conversations},
    "/v1/chat/conversations/{conversation_id}": {"GET": row_endpoint(get_conversation),
                                                 "PUT": update_conversation,
                                                 "DELETE": delete_conversation},
    # Messages and turns
    "/v1/chat/conversations/{conversation_id}/messages": {"GET": list_messages,
                                                          "POST": post_message},
    "/v1/chat/conversations/{conversation_id}/messages/{message_id:id}": {
        "DELETE": delete_message},
    "/v1/chat/conversations/{conversation_id}/stop": {"POST": stop_conversation},
    "/v1/chat/conversations/{conversation_id}/regenerate": {"POST": regenerate},
    "/v1/chat/stop-stream": {"POST": stop_stream},
    "/v1/chat/messages/delete": {"POST": delete_messages},
    # Memory
    "/v1/chat/conversations/{conversation_id}/compact": {"POST": compact_conversation},
    # Projects
    "/v1/projects": {"GET": list_projects, "POST": create_project},
    "/v1/projects/{project_id:id}": {"GET": row_endpoint(get_project), "PUT": update_project,
                                     "DELETE": row_endpoint(remove_project, write=True)},
    "/v1/projects/{project_id:id}/hierarchy": {"GET": row_endpoint(project_hierarchy)},
    # Plan (fixed paths before /v1/plan/documents/{document_id}, which would take them)
    "/v1/plan/categories": {"GET": list_categories, "POST": create_category},
    "/v1/plan/categories/{category_id:id}": {"GET": read_category, "PUT": update_category,
                                             "DELETE": row_endpoint(remove_category, write=True)},
    "/v1/plan/documents": {"GET": list_documents, "POST": create_document,
                           "DELETE": delete_all_versions},
    "/v1/plan/documents/history": {"GET": list_documents},
    "/v1/plan/documents/latest": {"GET": latest_documents},
    "/v1/plan/documents/search-by-tags": {"GET": search_documents_by_tags},
    "/v1/plan/documents/migrate/all-history": {"POST": migrate_all_history},
    "/v1/plan/documents/migrate/from-current": {"POST": migrate_from_current},
    "/v1/plan/documents/merge": {"POST": merge_documents},
    "/v1/plan/documents/{document_id:id}": {"GET": row_endpoint(get_document),
                                            "PUT": update_document, "POST": update_document,
                                            "DELETE": delete_document},
    "/v1/plan/documents/{document_id:id}/tags": {"GET": row_endpoint(select_tags),
                                                 "POST": create_tag},
    "/v1/plan/documents/{document_id:id}/tags:batch": {"POST": batch_tags},
    "/v1/plan/documents/{document_id:id}/tags/{tag_name:path}": {"DELETE": delete_tag},
    # Knowledge
    "/v1/projects/{project_id:id}/document-references": {
        "GET": partial(list_references, owner="project"),
        "POST": partial(set_references, owner="project"),
        "DELETE": partial(clear_references, owner="project")},
    "/v1/chat/conversations/{conversation_id}/document-references": {
        "GET": partial(list_references, owner="conversation"),
        "POST": partial(set_references, owner="conversation"),
        "DELETE": partial(clear_references, owner="conversation")},
    "/v1/chat/conversations/{conversation_id}/referenced-documents": {
        "GET": row_endpoint(conversation_knowledge)},
    # Source code
    "/v1/projects/{project_id:id}/complete-source-code": {"GET": complete_source_code},
    # Source code, writing
    "/v1/write-source-code": {"POST": write_source_code},
    # Chat completions and models
    "/v1/chat/completions": {"POST": chat_completions},
    "/v1/models": {"GET": list_models},
    "/v1/models/{model_id:path}": {"GET": read_model},
    # OpenAI Responses
    "/v1/responses": {"POST": create_response},
    "/v1/responses/compact": {"POST": compact_responses},
    "/v1/responses/{response_id}": {"GET": read_response, "DELETE": delete_response},
    "/v1/responses/{response_id}/input_items": {"GET": list_input_items},
    # OpenAI Conversations
    "/v1/conversations": {"POST": create_openai_conversation},
    "/v1/conversations/{conversation_id}": {"GET": row_endpoint(conversation_object),
                                            "POST": update_openai_conversation,
                                            "DELETE": delete_openai_conversation},
    "/v1/conversations/{conversation_id}/items": {"GET": list_conversation_items,
                                                  "POST": add_conversation_items},
    "/v1/conversations/{conversation_id}/items/{item_id}": {"GET": read_conversation_item,
                                                            "DELETE": delete_conversation_item},
    # Search, export, backup
    "/v1/search": {"GET": search},
    "/v1/chat/conversations/{conversation_id}/export": {"GET": export},
    "/v1/backup": {"GET": download_backup},
    # Health, login
    "/health": {"GET": health},
    "/v1/auth/login": {"POST": login},
}


class MethodRoute(Route):
    """One method of a path (a Route of its own, HEAD with GET); a method the path lacks is 405
    naming every method it has (Starlette's Route would name only its own)."""

    def __init__(self, path: str, endpoint: Callable, method: str, methods: Iterable[str]):
        super().__init__(path, endpoint, methods=[method])
        has = {*methods, *(["HEAD"] if "GET" in methods else [])}
        self.allow = ", ".join(sorted(has))

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["method"] not in self.methods:
            raise HTTPException(405, headers={"Allow": self.allow})
        await self.app(scope, receive, send)


routes = [MethodRoute(path, endpoint, method, by_method)
          for path, by_method in ENDPOINTS.items() for method, endpoint in by_method.items()]

ACCESS_WITHOUT_KEY = ("ACCESS_KEYS is set but POE_API_KEY is not: callers' tokens are access "
                      "keys then, so the server needs its own Poe key")


def lifespan_of(settings: Settings) -> Callable:
    """The app's lifespan: app.state holds what it makes, and only that."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.access_keys and not settings.poe_api_key:
            raise SystemExit(ACCESS_WITHOUT_KEY)
        prepare_database(settings.db_path)
        state = app.state
        state.settings = settings
        state.db = Database(settings.db_path, settings.db_timeout)
        state.replies = Replies(state.db)
        state.seal = CompactionSeal(state.db)
        state.poe_budget = PoeBudget(settings.poe_rate_limit, settings.poe_rate_window,
                                     settings.poe_queue_seconds)
        state.loop_watch = LoopWatch()
        state.poe = PoeClient(settings)
        state.poe_chores = PoeChores()
        state.models = ModelList(state.poe, settings.poe_models_url)
        try:
            yield
        finally:
            await state.replies.close()
            state.loop_watch.task.cancel()
            await state.poe_chores.close()
            await state.poe.aclose()
            with contextlib.suppress(HTTPException):
                await state.db.read(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
            state.db.close()
    return lifespan


@dataclass(slots=True)
class RequestTiming:
    """What one request's Server-Timing header says (docs/API.md "Server-Timing"): the
    service's own time until the answer began (proxy), less its waits for Poe (calls, uploads)
    and for the budget; Poe's time to its first event; Poe's whole time, when its calls ended
    before the answer began; the wait for the budget. relay_poe records into the request's own
    (request_timing, which the reply's task inherits)."""
    began: float = field(default_factory=time.perf_counter)
    budget: float = 0.0  # seconds waited for a slot of the budget
    budget_since: float | None = None  # waiting for one now, since
    poe: float = 0.0  # seconds of Poe calls (and uploads) ended
    poe_since: float | None = None  # a call in progress, since
    poe_output: float | None = None  # ... and when it gave its first output
    first_event: float | None = None  # the latest call's seconds to its first event

    async def wait_for_budget(self, budget: PoeBudget, queued: Callable | None) -> None:
        if budget.take_now():  # a slot at once: no wait to tell
            return
        self.budget_since = time.perf_counter()
        try:
            await budget.take(queued)
        finally:
            self.budget += time.perf_counter() - self.budget_since
            self.budget_since = None

    def poe_call(self, began: bool) -> None:
        now = time.perf_counter()
        if began:
            self.poe_since, self.poe_output, self.first_event = now, None, None
        elif self.poe_since is not None:
            self.poe, self.poe_since = self.poe + now - self.poe_since, None

    def poe_event(self) -> None:
        self.first_event = time.perf_counter() - self.poe_since

    @contextlib.contextmanager
    def on_poe(self) -> Iterator[None]:
        """Time spent waiting for Poe outside a call (an upload)."""
        since = time.perf_counter()
        try:
            yield
        finally:
            self.poe += time.perf_counter() - since

    def header(self) -> bytes:
        now = time.perf_counter()
        budget = self.budget + (now - self.budget_since if self.budget_since is not None else 0)
        poe = self.poe  # a call going on (a stream's): Poe's part is up to its first output
        if self.poe_since is not None:
            poe += (self.poe_output or now) - self.poe_since
        metrics = [("proxy", max(0.0, now - self.began - poe - budget))]
        if self.first_event is not None:
            metrics.append(("poe-first-event", self.first_event))
        if self.poe and self.poe_since is None:
            metrics.append(("poe-total", self.poe))
        if budget:
            metrics.append(("poe-queue", budget))
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in metrics).encode()


request_timing: contextvars.ContextVar[RequestTiming | None] = contextvars.ContextVar(
    "request_timing", default=None)


class App(Starlette):
    """The Starlette app. Every HTTP answer gets a Server-Timing header (RequestTiming), and
    the responses that stream get the server's own send (in the scope, as RAW_SEND: see
    EventStream)."""

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        scope[RAW_SEND] = send
        timing = RequestTiming()
        token = request_timing.set(timing)

        async def send_timed(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"server-timing", timing.header())]}
            await send(message)
        try:
            await super().__call__(scope, receive, send_timed)
        finally:
            request_timing.reset(token)


def create_app(settings: Settings | None = None, **overrides: Any) -> Starlette:
    """The ASGI app. Keyword arguments override the environment (lower-case names of the
    settings table in docs/API.md: db_path, poe_base_url, poe_api_key, access_keys, ...)."""
    settings = settings or load_settings(**overrides)
    cors = ({"allow_origins": settings.cors_origins} if settings.cors_origins
            else {"allow_origin_regex": LOOPBACK_ORIGINS})
    middleware = [Middleware(host_guard, settings=settings),
                  Middleware(JSONCORSMiddleware, allow_methods=["*"], allow_headers=["*"],
                             max_age=600, **cors),
                  Middleware(access_guard, settings=settings)]
    return App(routes=routes, middleware=middleware, lifespan=lifespan_of(settings),
               exception_handlers={HTTPException: http_error, Exception: server_error})


app = create_app()


# ---------------------------------------------------------------------------------------------
# Main: uvicorn, with a guard on connections and an orderly shutdown

MAX_HEADER_BYTES = 65536
# The young generation collected every 5,000 allocations, not 700; the oldest after 400 of those,
# not 100. Measured with 500 paced streams: GC's CPU a third lower, no full collection in the run
# (one is ~15 ms of stopped loop), chunks' p99 lateness ~60 -> ~45 ms.
GC_THRESHOLDS = (5000, 20, 20)


class LaterLog:
    """uvicorn's access logger (its one call: info), each line made a turn of the loop later:
    uvicorn makes it before it writes an answer's head, and making it (the record, and the
    queue to LogsAside's thread: ~90 us, cold) held up the head, and a stream's first text
    with it. The line is the same."""

    def __init__(self, logger: logging.Logger, loop: asyncio.AbstractEventLoop) -> None:
        self.logger, self.loop = logger, loop

    def info(self, *args: Any) -> None:
        self.loop.call_soon(self.logger.info, *args)

    def __getattr__(self, name: str) -> Any:  # anything else uvicorn may call: the logger's own
        return getattr(self.logger, name)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits uvicorn cannot set (headers are unbounded but in
    h11 mode; its keep-alive timeout is armed only after a first response, so a silent socket
    stays open forever): each request's headers must arrive whole within `header_seconds` (the
    setting HEADER_SECONDS; a connection sending nothing is closed then too), and past
    MAX_HEADER_BYTES they are 431. main gives uvicorn partial(GuardedHttpProtocol, ...)."""

    def __init__(self, *args: Any, header_seconds: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_seconds = header_seconds
        self.access_logger = LaterLog(self.access_logger, self.loop)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.expect_headers()
        self.header_timer = self.loop.call_later(self.header_seconds, self.drop_slow)

    def expect_headers(self) -> None:
        self.reading_headers, self.header_bytes, self.header_tail = True, 0, b""

    def drop_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.reading_headers:
            seen = self.header_tail + data
            end = seen.find(b"\r\n\r\n")
            self.header_bytes += len(data) if end < 0 else end + 4 - len(self.header_tail)
            self.header_tail = seen[-3:]
            if self.header_bytes > MAX_HEADER_BYTES:
                self.header_timer.cancel()
                body = b'{"detail": "request headers are larger than 64 KiB"}'
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                     b"content-type: application/json\r\nconnection: close\r\n"
                                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
                self.transport.close()
                return
            if self.header_timer.cancelled():  # the first bytes of the next request
                self.header_timer = self.loop.call_later(self.header_seconds, self.drop_slow)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self.header_timer.cancel()
        self.reading_headers = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.expect_headers()  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.header_timer.cancel()
        super().connection_lost(exc)


def raise_file_limit() -> None:
    """Idle sockets each hold a file descriptor: a soft limit of 1024 would let a thousand of
    them lock everyone out, so take what the hard limit allows."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def backup(db_path: str, target: str) -> int:
    """Copies the database as GET /v1/backup does, even while served, to a new file beside
    `target`, checked (PRAGMA integrity_check) and renamed into place: `target` is never a
    partial copy. The database is not upgraded first. Returns the copy's size in bytes."""
    if not os.path.isfile(db_path):
        raise DatabaseUnusable(f"there is no database at {db_path}")
    check_file_path(target, "the backup FILE")
    if os.path.exists(target) and os.path.samefile(db_path, target):
        raise DatabaseUnusable("the backup FILE must not be the database itself")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True,
                                                timeout=30)) as source:
            path = backup_to_temporary(source, os.path.dirname(os.path.abspath(target)),
                                       "integrity_check")
    except HTTPException as exc:
        raise OSError(exc.detail) from None
    try:
        os.replace(path, target)
    except OSError:
        remove_file(path)
        raise
    return os.path.getsize(target)


# --help's defaults for the settings whose dataclass default (empty) stands for a rule.
DEFAULT_WORDS = {"poe_api_key": "unset: each caller sends its own Poe key",
                 "access_keys": "unset: no check", "continue_prompts": "continue, 继续, go on, ...",
                 "compact_model": "unset: the turn's own model",
                 "cors_origins": "pages of this machine (localhost, 127.0.0.1, [::1], any port)",
                 "allowed_hosts": "this machine's names when HOST is one of them, else any",
                 "write_roots": "unset: projects' ai_work_dirs only",
                 "poe_rate_limit": "500 calls a POE_RATE_WINDOW (0: no local limit)"}


def settings_help() -> str:
    lines = [f"  {spec.name.upper():<18} {DEFAULT_WORDS.get(spec.name, spec.default)}"
             for spec in dataclasses.fields(Settings)]
    return ("environment variables and their defaults (a flag wins over its variable, a\n"
            "variable over a line NAME=value in ./.env; docs/API.md says what each does):\n"
            + "\n".join(lines))


class LogsAside:
    """While the server runs, log lines are formatted and written by a thread of their own:
    uvicorn logs each request as its answer starts, and a line's formatting and write (~40 us
    here, more to a slow terminal) held every answer up. Each logger keeps its handlers, behind
    one queue (QueuedLog); what is queued is written at the end."""

    LOGGERS = ("", "uvicorn", "uvicorn.access", "uvicorn.error")

    def __enter__(self) -> LogsAside:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.moved = [(logger, logger.handlers) for logger in
                      {logging.getLogger(name) for name in self.LOGGERS} if logger.handlers]
        for logger, handlers in self.moved:
            logger.handlers = [QueuedLog(self.queue, handlers)]
        self.thread = threading.Thread(target=self.write, name="log-writer", daemon=True)
        self.thread.start()
        return self

    def write(self) -> None:
        while (item := self.queue.get()) is not None:
            handlers, record = item
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """The handlers back in place, then what was queued written (once: later calls pass)."""
        for logger, handlers in self.moved:
            logger.handlers = handlers
        self.moved = []
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(5)


class QueuedLog(logging.Handler):
    """A logger's one handler under LogsAside: the record, as it is, queued for its handlers."""

    def __init__(self, records: queue.SimpleQueue, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self.records, self.handlers = records, handlers

    def emit(self, record: logging.LogRecord) -> None:
        self.records.put((self.handlers, record))


def listening_socket(host: str, port: int) -> socket.socket:
    """The service's socket, bound before the database is touched: a taken port is one line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)  # uvicorn's backlog: a client early is queued until it serves
    except OSError as exc:
        sock.close()
        reason = ("the port is taken by another program (choose one with --port or PORT)"
                  if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
        raise SystemExit(f"error: cannot listen on {host}:{port}: {reason}") from None
    return sock


def start_line(settings: Settings, port: int) -> str:
    if settings.access_keys:
        keys = f"the server's Poe key, {len(settings.access_keys)} access key(s) required"
    elif settings.poe_api_key:
        keys = "the server's Poe key (POE_API_KEY), no access keys"
    else:
        keys = "no server key: each caller sends its own ('Authorization: Bearer <poe key>')"
    host = f"[{settings.host.strip('[]')}]" if ":" in settings.host else settings.host
    return (f"serving http://{host}:{port}; database {os.path.abspath(settings.db_path)}; "
            f"{keys}; Poe at {settings.poe_base_url}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Poe proxy with memory", epilog=settings_help(),
        usage="%(prog)s [-h] [--host HOST] [--port PORT] [--db DB] [backup FILE]",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", prog=parser.prog)
    backup_command = commands.add_parser("backup", help="copy the database to FILE and exit",
                                         allow_abbrev=False)
    backup_command.add_argument("file", metavar="FILE", help="the copy (its folder must exist)")
    # Flags go before or after the command; its copies, when absent, undo none given before it.
    for each, default in ((parser, None), (backup_command, argparse.SUPPRESS)):
        each.add_argument("--host", default=default, help="bind address (HOST, default 127.0.0.1)")
        each.add_argument("--port", type=int, default=default, help="port (PORT, default 8000)")
        each.add_argument("--db", default=default, help="SQLite file (DB_PATH, default chat.db)")
    # A flag nobody knows would otherwise be read as a wrong COMMAND (its value taken for one).
    given = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    unknown = [arg for arg in given if arg.startswith("-") and not re.fullmatch(
        r"-\d+(\.\d*)?", arg) and arg.split("=")[0] not in ("-h", "--help", "--host", "--port",
                                                             "--db")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per Poe call is noise
    settings = load_settings(host=args.host, port=args.port, db_path=args.db)
    if settings.access_keys and not settings.poe_api_key and args.command != "backup":
        raise SystemExit(f"error: {ACCESS_WITHOUT_KEY}")
    try:
        if args.command == "backup":
            size = backup(settings.db_path, args.file)
            print(f"backed up {settings.db_path} to {args.file} ({size} bytes, integrity_check ok)")
            return
        sock = listening_socket(settings.host, settings.port)
        prepare_database(settings.db_path)
    except DatabaseUnusable as exc:
        raise SystemExit(f"error: {exc}") from None
    except (sqlite3.Error, OSError) as exc:
        failed = "backup failed" if args.command == "backup" else f"cannot use {settings.db_path}"
        raise SystemExit(f"error: {failed}: {exc}") from None
    if not settings.access_keys and settings.host not in LOOPBACK_HOSTS:
        log.warning("listening on %s without ACCESS_KEYS: anyone who can reach this port can "
                    "read every conversation and spend the Poe key", settings.host)
    raise_file_limit()
    # Imports so far (fastapi_poe, pydantic's schemas...) live for good: spare the GC walking them.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    serve(create_app(settings), settings, sock)


def serve(service: Starlette, settings: Settings, sock: socket.socket) -> None:
    """uvicorn on `sock`, its log lines written aside (LogsAside), until Ctrl-C or SIGTERM."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:  # before uvicorn raises the signal it caught again (SIGTERM kills)
                    logs.close()

        async def shutdown(self, sockets: Any = None) -> None:
            # Before uvicorn waits for open responses: each reply in flight is ended, its
            # caller told (503 or an error event), its text stored 'interrupted'.
            with contextlib.suppress(Exception):
                await service.state.replies.stop_all(503, "the server is shutting down")
            await super().shutdown(sockets)

    config = uvicorn.Config(service, host=settings.host, port=settings.port, log_level="info",
                            http=partial(GuardedHttpProtocol,
                                         header_seconds=settings.header_seconds),
                            timeout_graceful_shutdown=3)  # (it sets uvicorn's log handlers up)
    with LogsAside() as logs:
        log.info("%s", start_line(settings, sock.getsockname()[1]))
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises Ctrl-C again once stopped
            Server(config).run([sock])


if __name__ == "__main__":
    main()
