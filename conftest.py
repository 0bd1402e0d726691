"""The local Poe and the services under test, shared by test_server.py.

The local Poe is a real Poe-protocol server (fastapi_poe's PoeBot + make_app) on 127.0.0.1, with
bots that echo, stream slowly, fail, run out of points, want another key; raw server-sent-event
bots that speak the protocol badly; and Poe's file upload and model list endpoints. It counts the
calls it gets. The service runs under uvicorn in this process (LiveServer) or as `python
server.py` (ServerProcess), each on a port the OS gives it."""
from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import fastapi_poe as fp
import httpx
import pytest
import uvicorn
from sse_starlette.event import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

import server

# ---------------------------------------------------------------------------------------------
# The local Poe: bots that echo, stream slowly, fail, run out of points, want another key.

CALLS: collections.Counter = collections.Counter()  # bot name -> query requests received
LAST_QUERY: dict[str, fp.QueryRequest] = {}
ARRIVALS: list[tuple[str, str, float]] = []  # (bot, last message, time.monotonic()) per query
UPLOADS: list[dict] = []  # what the fake upload endpoint received
UPLOAD_GATE = threading.Event()  # an upload of b"HOLD-UPLOAD" waits for it
# While HOLD_SUMMARIES is set, the Summarizer sets SUMMARY_HELD and waits for SUMMARY_GATE.
HOLD_SUMMARIES, SUMMARY_HELD, SUMMARY_GATE = threading.Event(), threading.Event(), threading.Event()
MODEL_LISTS: collections.Counter = collections.Counter()  # model list route -> fetches
RIGHT_KEY = "poe-right-key-0123456789"


class ScriptBot(fp.PoeBot):
    """A bot whose reply is the async generator `script(request)`."""

    def __init__(self, name, script, access_key=None):
        super().__init__(path=f"/{name}", access_key=access_key)
        self.name, self.script = name, script

    async def get_response(self, request):
        CALLS[self.name] += 1
        LAST_QUERY[self.name] = request
        ARRIVALS.append((self.name, request.query[-1].content, time.monotonic()))
        async for event in self.script(request):
            yield event


def history_of(request) -> list[list[str]]:
    return [[m.role, m.content] for m in request.query]


async def echo(request):
    """Replies with the JSON of the history it received, in small chunks, among events that are
    not reply text (meta, a suggested reply)."""
    yield fp.MetaResponse(text="", content_type="text/markdown", suggested_replies=True)
    text = json.dumps(history_of(request), ensure_ascii=False)
    for i in range(0, len(text), 7):
        yield fp.PartialResponse(text=text[i:i + 7])
    yield fp.PartialResponse(text="Tell me more", is_suggested_reply=True)


async def slow(request):
    """'N DELAY' in the last message: N chunks 'c0 ', 'c1 ', ... DELAY seconds apart."""
    count, delay = request.query[-1].content.split()[:2]
    for i in range(int(count)):
        yield fp.PartialResponse(text=f"c{i} ")
        await asyncio.sleep(float(delay))


async def fail_at_once(request):
    yield fp.ErrorResponse(text="the bot broke", allow_retry=True)


async def fail_part_way(request):
    yield fp.PartialResponse(text="half an ")
    yield fp.PartialResponse(text="answer")
    await asyncio.sleep(0.05)
    yield fp.ErrorResponse(text="the bot broke", allow_retry=True)


def error_type_bot(error_type):
    async def script(request):
        yield fp.ErrorResponse(text=f"refused: {error_type}", allow_retry=False,
                               error_type=error_type)
    return script


POE_RATE_LIMIT_TEXT = ("You have exceeded rate limit to query bot using User API Key. "
                       "Try again later.")


async def rate_limited(request):
    """Poe's rate limit as its bot protocol sends it: an error event, no error_type."""
    yield fp.ErrorResponse(text=POE_RATE_LIMIT_TEXT, allow_retry=True)


async def part_then_rate_limited(request):
    """Some text, then Poe's rate limit: a reply cut off part way by it."""
    yield fp.PartialResponse(text="partial text ")
    await asyncio.sleep(0.05)  # the text is relayed (a stream has begun) before the error
    yield fp.ErrorResponse(text=POE_RATE_LIMIT_TEXT, allow_retry=True)


async def key_refused(request):
    """Poe's word, as an error event, that the key it was given is not valid."""
    yield fp.ErrorResponse(text="Invalid API key", allow_retry=False)


async def replace(request):
    yield fp.PartialResponse(text="draft ")
    yield fp.PartialResponse(text="words")
    yield fp.PartialResponse(text="final answer", is_replace_response=True)
    yield fp.PartialResponse(text=" and more")


REVISE_STEPS = [("one ", False), ("two ", False), ("one two three", True), (" four", False),
                ("fresh", True), (" end", False)]


async def revise(request):
    """Texts and replacements (one extending the text, one not), each in a read of its own, so
    that the stream relaying them waits for each."""
    for text, replace_ in REVISE_STEPS:
        yield fp.PartialResponse(text=text, is_replace_response=replace_)
        await asyncio.sleep(0.02)


async def extend(request):
    yield fp.PartialResponse(text="Think")
    yield fp.PartialResponse(text="Thinking done", is_replace_response=True)
    yield fp.PartialResponse(text=" more")


async def silent(request):
    await asyncio.sleep(3)
    yield fp.PartialResponse(text="too late")


async def stall(request):
    yield fp.PartialResponse(text="begin ")
    await asyncio.sleep(0.2)
    yield fp.PartialResponse(text="more ")
    await asyncio.sleep(3)
    yield fp.PartialResponse(text="too late")


async def count(request):
    yield fp.PartialResponse(text=f"{len(request.query)} messages")


async def flood(request):
    """N chunks of 10 kB, as fast as they go."""
    for i in range(int(request.query[-1].content)):
        yield fp.PartialResponse(text=f"{i % 10}" * 10000)


async def painter(request):
    yield fp.PartialResponse(text="Here: ")
    yield fp.PartialResponse(text="", attachment=fp.Attachment(
        url="https://poe.test/cat.png", content_type="image/png", name="cat.png"))


async def locked(request):
    yield fp.PartialResponse(text="unlocked")


async def say_back(request):
    """Replies with the last message's text, in chunks of five characters."""
    text = request.query[-1].content
    for i in range(0, len(text), 5):
        yield fp.PartialResponse(text=text[i:i + 5])


def tool_chunk(delta, finish_reason=None):
    """A tool-call chunk as Poe sends it: OpenAI's chunk in a 'json' event."""
    return ServerSentEvent(event="json", data=json.dumps(
        {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}))


async def call_tools(request):
    """Calls every tool it is offered with {"city": "Paris"} (the arguments in two pieces), one
    call after another; given results, answers with them as JSON."""
    if request.tool_results:
        yield fp.PartialResponse(text=json.dumps(
            [[r.tool_call_id, r.name, r.content] for r in request.tool_results]))
        return
    if not request.tools:
        yield fp.PartialResponse(text="no tools")
        return
    for index, tool in enumerate(request.tools):
        yield tool_chunk({"role": "assistant", "tool_calls": [
            {"index": index, "id": f"call_{index}", "type": "function",
             "function": {"name": tool.function.name, "arguments": ""}}]})
        for piece in ('{"city": ', '"Paris"}'):
            yield tool_chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield tool_chunk({}, "tool_calls")


async def paint(request):
    """An image bot: files among its text, one of them shown inline by reference."""
    def file(name, content_type, inline_ref=None):
        return fp.PartialResponse(text="", attachment=fp.Attachment(
            url=f"https://poe.test/{name}", content_type=content_type, name=name,
            inline_ref=inline_ref))
    yield fp.PartialResponse(text="Here: ")
    yield file("cat.png", "image/png")
    yield fp.PartialResponse(text=" and ![a dog][d1]")
    yield file("dog.png", "image/png", inline_ref="d1")
    yield file("notes.txt", "text/plain")


async def blank_then_fail(request):
    """An empty replace_response, then an error: no output at all."""
    yield fp.PartialResponse(text="", is_replace_response=True)
    yield fp.ErrorResponse(text="the bot broke", allow_retry=True)


async def nameless_call(request):
    """A tool call whose function has no name, and no text."""
    yield tool_chunk({"role": "assistant", "tool_calls": [
        {"index": 0, "id": "call_0", "type": "function", "function": {"arguments": "{}"}}]})
    yield tool_chunk({}, "tool_calls")


async def hoard(request):
    """Asks the service to hold much for little: 'calls N' (a call, then a delta at index N),
    'files N' (N files) or 'name N' (a file whose name is N characters)."""
    what, size = request.query[-1].content.split()
    size = int(size)
    if what == "calls":
        yield tool_chunk({"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                          "function": {"name": "get_weather", "arguments": ""}}]})
        yield tool_chunk({"tool_calls": [{"index": size, "function": {"arguments": "{}"}}]})
        yield tool_chunk({}, "tool_calls")
        return
    yield fp.PartialResponse(text="files: ")
    for i in range(size if what == "files" else 1):
        name = f"f{i}.txt" if what == "files" else "n" * size
        yield fp.PartialResponse(text="", attachment=fp.Attachment(
            url=f"https://poe.test/{i}", content_type="text/plain", name=name))


SMALL_QUERIES: list[fp.QueryRequest] = []  # every request the Small bot gets


async def small(request):
    """A bot with a small window (2,000 tokens in the model list): a short fixed reply."""
    SMALL_QUERIES.append(request)
    yield fp.PartialResponse(text=f"small got {len(request.query)} messages")


async def summarize(request):
    """A summariser: a short summary that says what it was given (a transcript as the user
    message, after the summarising prompt)."""
    transcript = request.query[-1].content
    if HOLD_SUMMARIES.is_set():  # a slow summary call: the test acts meanwhile
        SUMMARY_HELD.set()
        await asyncio.to_thread(SUMMARY_GATE.wait, 30)
    yield fp.PartialResponse(text=f"SUMMARY of {transcript.count(chr(10) * 2) + 1} blocks, "
                                  f"{len(transcript)} chars")


async def empty_reply(request):
    yield fp.PartialResponse(text="", is_replace_response=True)


def make_poe_app():
    bots = [ScriptBot("Echo", echo), ScriptBot("GPT-4o", echo), ScriptBot("Slow", slow),
            ScriptBot("Fail", fail_at_once), ScriptBot("FailPartWay", fail_part_way),
            ScriptBot("Poor", error_type_bot("insufficient_fund")),
            ScriptBot("TooLong", error_type_bot("user_message_too_long")),
            ScriptBot("Fussy", error_type_bot("user_caused_error")),
            ScriptBot("Private", error_type_bot("privacy_authorization_error")),
            ScriptBot("Replace", replace), ScriptBot("Revise", revise),
            ScriptBot("Silent", silent), ScriptBot("Stall", stall),
            ScriptBot("Locked", locked, access_key=RIGHT_KEY), ScriptBot("Sketcher", painter),
            ScriptBot("Flood", flood), ScriptBot("Count", count), ScriptBot("Extend", extend),
            ScriptBot("Say", say_back), ScriptBot("ToolBot", call_tools),
            ScriptBot("Painter", paint), ScriptBot("BlankThenFail", blank_then_fail),
            ScriptBot("NamelessCall", nameless_call), ScriptBot("Hoard", hoard),
            ScriptBot("RateLimited", rate_limited), ScriptBot("KeyRefused", key_refused),
            ScriptBot("Small", small), ScriptBot("Summarizer", summarize),
            ScriptBot("Blank", empty_reply),
            ScriptBot("PartRateLimited", part_then_rate_limited)]
    poe = fp.make_app(bots, allow_without_key=True)

    # Failures that only an HTTP status carries; a 429 with Poe's rate-limit headers.
    def status_route(name, status):
        async def route():
            CALLS[name] += 1
            return JSONResponse({"detail": name}, status,
                                headers=BUSY_HEADERS if status == 429 else None)
        poe.add_api_route(f"/{name}", route, methods=["POST"])

    status_route("Busy", 429)
    status_route("Crash", 500)

    # A 429 whose Retry-After is the last message's text ('date N': an HTTP date N s ahead).
    async def busy_for(request: Request):
        CALLS["BusyFor"] += 1
        said = (await request.json())["query"][-1]["content"]
        if said.startswith("date "):
            said = email.utils.formatdate(time.time() + float(said[5:]), usegmt=True)
        return JSONResponse({"detail": "busy"}, 429, headers={"Retry-After": said})
    poe.add_api_route("/BusyFor", busy_for, methods=["POST"])

    # fastapi_poe's upload_file posts here (POE_UPLOAD_URL = this server + /poe_api/).
    async def upload(request: Request):
        body = await request.body()
        UPLOADS.append({"authorization": request.headers.get("authorization"), "body": body})
        if b"REFUSE-UPLOAD" in body:
            return JSONResponse({"error": "refused"}, 400)
        if b"HOLD-UPLOAD" in body:
            await asyncio.to_thread(UPLOAD_GATE.wait, 30)
        return JSONResponse({"attachment_url": f"https://poe.test/file/{len(UPLOADS)}",
                             "mime_type": "application/octet-stream"})
    poe.add_api_route("/poe_api/file_upload_3RD_PARTY_POST", upload, methods=["POST"])

    # Poe's public model list (POE_MODELS_URL = this server + /v1/models), and one that is down.
    async def model_list():
        MODEL_LISTS["/v1/models"] += 1
        # A cookie, as Cloudflare in front of Poe sets: the relay's queries carry none.
        return JSONResponse({"object": "list", "data": POE_MODEL_LIST},
                            headers={"set-cookie": "__cf_bm=test; Path=/; HttpOnly"})

    async def broken_model_list():
        MODEL_LISTS["/v1/broken-models"] += 1
        return JSONResponse({"error": "down"}, 503)
    poe.add_api_route("/v1/models", model_list, methods=["GET"])
    poe.add_api_route("/v1/broken-models", broken_model_list, methods=["GET"])
    for name in RAW_BOTS:
        poe.add_api_route(f"/{name}", raw_bot, methods=["POST"])
    return poe


BUSY_HEADERS = {"Retry-After": "7", "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "7s"}

POE_MODEL_LIST = [
    {"id": "Echo", "object": "model", "created": 1700000000, "owned_by": "Poe Test",
     "description": "Echoes the history", "context_window": {"context_length": 8000}},
    {"id": "ToolBot", "object": "model", "created": 1700000001, "owned_by": "Poe Test",
     "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]}},
    {"id": "GPT-4o", "object": "model", "created": 1700000002, "owned_by": "OpenAI"},
    # Windows as Poe gives them (an object), or as other lists do (integers, top_provider).
    {"id": "Small", "object": "model", "created": 1700000003, "owned_by": "Poe Test",
     "context_window": {"context_length": 2000, "max_output_tokens": 500}},
    {"id": "Summarizer", "object": "model", "created": 1700000004, "owned_by": "Poe Test",
     "context_window": 4000},
    {"id": "Say", "object": "model", "created": 1700000005, "owned_by": "Poe Test",
     "context_length": 100000},
    {"id": "Replace", "object": "model", "created": 1700000006, "owned_by": "Poe Test",
     "top_provider": {"context_length": 50000}},
]


# Bots that speak the protocol badly, as raw server-sent events.
def event(kind: str, data: str) -> bytes:
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def odd_text(query):
    # JSON escapes, as a broken encoder sends them: a NUL and half of a surrogate pair.
    yield event("text", '{"text": "nul\\u0000here "}')
    yield event("text", '{"text": "half \\ud83d emoji"}')
    yield event("done", "{}")


async def no_done(query):
    yield event("text", '{"text": "partial "}')
    await asyncio.sleep(0.05)


async def no_events(query):
    return
    yield


async def huge(query):
    """One text event of N characters (N is the message), then done."""
    size = int(query["query"][-1]["content"])
    yield event("text", json.dumps({"text": "x" * size}))
    yield event("done", "{}")


TRICKY = 'say "hi" \\ 中文 😀\n' * 150000  # 3.3 MB of escapes, CJK and surrogate pairs


async def tricky(query):
    """TRICKY in one text event; its message says whether non-ASCII is escaped ("ascii")."""
    ascii_only = query["query"][-1]["content"] == "ascii"
    yield event("text", json.dumps({"text": TRICKY}, ensure_ascii=ascii_only))
    yield event("done", "{}")


# A stream as an odd server frames it: CR LF or CR alone as line ends, comments, an id and a
# retry time, one event's JSON over two data lines, a ping and an event of an unknown type; each
# element a write of its own, cut anywhere (inside a line, between a CR and its LF). Its text is
# FRAMED_TEXT.
FRAMED = {
    "crlf": [b": a comment\r\nevent: meta\r\nid: 7\r\nretry: 10", b"00\r\ndata: {}\r\n\r",
             b"\nevent: te", b"xt\r\ndata: {\"text\": \"one \"}\r",
             b"\n\r\nevent: text\r\ndata: {\"text\":\r\ndata:  \"two \"}\r\n\r\n",
             b"event: ping\r\ndata: {}\r\n\r\nevent: novel\r\ndata: {\"what\": 1}\r\n\r\n",
             b"event: text\r\ndata: {\"text\": \"th", b"ree\"}\r\n", b"\r\nevent: done\r\ndata: {}\r\n\r\n"],
    "cr": [b"event: text\rdata: {\"text\": \"one \"}\r\r: comment\r", b"\revent: text\r",
           b"data: {\"text\": \"two \"}\r\revent: novel\rdata: {}\r\r",
           b"event: text\rdata: {\"text\": \"three\"}\r", b"\revent: done\rdata: {}\r\r"],
}
FRAMED_TEXT = "one two three"


async def framed(query):
    for piece in FRAMED[query["query"][-1]["content"]]:
        yield piece
        await asyncio.sleep(0.01)  # a write, and as a rule a read, of its own


async def peer_port(query, request):
    """Replies with the port the service's connection to it comes from."""
    yield event("text", json.dumps({"text": f"port {request.client.port}"}))
    yield event("done", "{}")


SEEN_REQUESTS: list[tuple[dict, bytes]] = []  # the headers and body of each query to Record


async def record(query, request):
    """Keeps the query's headers and body as they came (SEEN_REQUESTS)."""
    yield event("text", '{"text": "recorded"}')
    yield event("done", "{}")


async def burst(query):
    """N text events of 1,000 characters (N is the message), and done, in one write."""
    count = int(query["query"][-1]["content"])
    yield b"".join(event("text", json.dumps({"text": f"{i % 10}" * 1000}))
                   for i in range(count)) + event("done", "{}")


# What follows some text in the same write (Mixed's message names it).
MIXED = {"error": event("error", '{"text": "boom", "allow_retry": true}'),
         "bad": b"event: text\ndata: {oops\n\n",
         "rate": event("error", '{"text": "You have exceeded rate limit to query bot."}')}


async def mixed(query):
    yield event("text", '{"text": "partial "}') + MIXED[query["query"][-1]["content"]]


async def sloppy(query):
    """A byte order mark first, events without data, then text and done."""
    yield b"\xef\xbb\xbf" + event("text", '{"text": "first "}')
    yield b"event: text\n\nevent: text\ndata:\n\n" + event("text", '{"text": "second"}')
    yield event("done", "{}")


async def giant_meta(query):
    """A meta event of N MiB (N is the message), written a MiB at a time, then text and done."""
    yield b'event: meta\ndata: {"x": "'
    for _ in range(int(query["query"][-1]["content"])):
        yield b"m" * 2**20
    yield b'"}\n\n' + event("text", '{"text": "after"}') + event("done", "{}")


async def reorder(query):
    """A read whose last event gives a Responses stream no event (a replacement repeating the
    text), so the stream may hold the events before it for the next; then a text of its own."""
    yield (event("replace_response", '{"text": "Hello"}') + event("text", '{"text": " there"}')
           + event("replace_response", '{"text": "Hello there"}'))
    await asyncio.sleep(0.2)
    yield event("text", '{"text": "!"}')
    yield event("done", "{}")


async def reorder_tools(query):
    """The same for chat completions: a tool call's delta with nothing to send yet, last."""
    call = {"choices": [{"index": 0, "delta": {"tool_calls": [{
        "index": 0, "id": "c1", "type": "function", "function": {"arguments": ""}}]},
        "finish_reason": None}]}
    yield (event("replace_response", '{"text": "Hi"}') + event("text", '{"text": " a"}')
           + event("json", json.dumps(call)))
    await asyncio.sleep(0.2)
    yield event("text", '{"text": "!"}')
    yield event("done", "{}")


# A tool-call bot's first delta, then (once the test has seen the stream begin, or after 10 s) the
# rest: TOOL_GATE lets it go on, TOOL_GATE_PASSED says it did.
TOOL_GATE, TOOL_GATE_PASSED = threading.Event(), threading.Event()


def gated_tool_call(named: bool, pair: bool = False):
    """A tool call's first delta (with its name, or without: the name comes later), no text;
    with `pair`, in the same write, a second delta with the arguments' first half."""
    async def script(query):
        function = {"name": "f", "arguments": ""} if named else {"arguments": ""}
        first = event("json", json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "id": "c1", "type": "function", "function": function}]},
            "finish_reason": None}]}))
        yield first + (event("json", json.dumps({"choices": [{"index": 0, "delta": {
            "tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},
            "finish_reason": None}]})) if pair else b"")
        await asyncio.to_thread(TOOL_GATE.wait, 10)
        TOOL_GATE_PASSED.set()
        arguments = "}" if pair else "{}"
        rest = {"arguments": arguments} if named else {"name": "f", "arguments": arguments}
        yield event("json", json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "function": rest}]}, "finish_reason": None}]}))
        yield event("done", "{}")
    return script


async def empty_replace(query):
    """Some text, then a replacement that empties it, then more text."""
    yield event("text", '{"text": "abc"}')
    await asyncio.sleep(0.05)
    yield event("replace_response", '{"text": ""}')
    await asyncio.sleep(0.05)
    yield event("text", '{"text": "d"}')
    yield event("done", "{}")


async def emptied_then_fails(query):
    """A text that comes to nothing ("nul": a NUL alone; else "abc", then a replacement that
    empties it), then an error event."""
    if query["query"][-1]["content"] == "nul":
        yield event("text", '{"text": "\\u0000"}')
    else:
        yield event("text", '{"text": "abc"}')
        await asyncio.sleep(0.05)
        yield event("replace_response", '{"text": ""}')
    await asyncio.sleep(0.05)
    yield event("error", '{"text": "boom", "allow_retry": true}')


RAW_BOTS = {"Odd": odd_text, "NoDone": no_done, "NoEvents": no_events, "Huge": huge,
            "Tricky": tricky, "Framed": framed, "Port": peer_port, "Record": record,
            "Burst": burst, "Mixed": mixed, "Sloppy": sloppy, "GiantMeta": giant_meta,
            "Reorder": reorder, "ReorderTools": reorder_tools, "EmptyReplace": empty_replace,
            "EmptiedThenFails": emptied_then_fails,
            "ToolFirst": gated_tool_call(True), "NamelessFirst": gated_tool_call(False),
            "ToolPairFirst": gated_tool_call(True, pair=True),
            "NamelessPairFirst": gated_tool_call(False, pair=True)}
REPORTS: list[dict] = []  # fastapi_poe's error reports the raw bots received


async def raw_bot(request: Request):
    name = request.url.path.strip("/")
    body = await request.body()
    query = json.loads(body)
    if query.get("type") == "report_error":
        REPORTS.append(query)
        return JSONResponse({"detail": "no such thing"}, 404)  # must not read as "no model"
    CALLS[name] += 1
    if name == "Record":
        SEEN_REQUESTS.append((dict(request.headers), body))
    script = RAW_BOTS[name]
    events = script(query, request) if name in ("Port", "Record") else script(query)
    return StreamingResponse(events, media_type="text/event-stream")


# ---------------------------------------------------------------------------------------------
# A Poe that misbehaves on the wire, below what an ASGI app can do.

WIRE_EVENTS = event("text", '{"text": "wire"}') + event("done", "{}")
WIRE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
             b"transfer-encoding: chunked\r\n\r\n")


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class SocketPoe:
    """A Poe of raw HTTP/1.1 on sockets, a thread a connection (answer(connection, number)): for
    what a bot server on fastapi_poe will not do on the wire."""

    def __init__(self):
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            number, self.connections = self.connections, self.connections + 1
            self.opened(number)
            threading.Thread(target=self.answer, args=(connection, number), daemon=True).start()

    def opened(self, number):
        pass

    def answer(self, connection, number):
        raise NotImplementedError

    @staticmethod
    def read_request(connection, data):
        """(bot, the JSON body's type, what came after it), or None at the connection's end."""
        while b"\r\n\r\n" not in data:
            if not (more := connection.recv(65536)):
                return None
            data += more
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: *(\d+)", head, re.I)[1])
        while len(data) < length:
            if not (more := connection.recv(65536)):
                return None
            data += more
        bot = head.split(b" ")[1].decode().rstrip("/").rsplit("/", 1)[-1]
        return bot, json.loads(data[:length]).get("type"), data[length:]


class WirePoe(SocketPoe):
    """A Poe of raw HTTP/1.1 on sockets, kept alive, a thread a connection; the bot (the URL's
    last part) says how it answers:
      Ok           text "wire" and done, chunked
      Weird        the same with an event of an unknown type before done (reported to the bot)
      Second       Ok's answer and, in the same write, a second one nobody asked for (its head
                   and part of its body), the connection kept
      KeepOpen     Ok's events, but the body never ends: the connection stays until the service
                   closes it
      CutOff       text, then the connection closed part way through a chunk
      ShortLength  text with a Content-Length 50 bytes longer, then the connection closed
      Never        nothing, until the service closes the connection
    A report (report_error) is held unanswered until `release_reports` is set, or the service
    closes its connection. `requests`: (connection number, bot, the body's type) of each request
    as it comes; `closed[number]`: set once that connection is closed (by the service, for one
    left waiting)."""

    def __init__(self):
        self.requests: list[tuple[int, str, str]] = []
        self.closed: dict[int, threading.Event] = {}
        self.release_reports = threading.Event()
        super().__init__()

    def opened(self, number):
        self.closed[number] = threading.Event()

    def answer(self, connection, number):
        try:
            with connection:
                connection.settimeout(30)
                rest = b""
                while (request := self.read_request(connection, rest)) is not None:
                    bot, kind, rest = request
                    self.requests.append((number, bot, kind))
                    if kind == "report_error":
                        if not self.hold(connection):
                            return
                        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json"
                                           b"\r\ncontent-length: 2\r\n\r\n{}")
                    elif not self.respond(connection, bot):
                        return
        except OSError:
            pass
        finally:
            self.closed[number].set()

    def hold(self, connection) -> bool:
        """Until release_reports (True) or the connection's end (False)."""
        connection.settimeout(0.02)
        try:
            while not self.release_reports.is_set():
                try:
                    if not connection.recv(1):
                        return False
                except TimeoutError:
                    pass
            return True
        finally:
            connection.settimeout(30)

    @staticmethod
    def respond(connection, bot) -> bool:
        """Answers as the bot says; False: the connection is done with."""
        if bot in ("Ok", "Weird", "Second"):
            events = WIRE_EVENTS if bot != "Weird" else \
                event("novel", "{}") + WIRE_EVENTS
            connection.sendall(WIRE_HEAD + http_chunk(events) + b"0\r\n\r\n" + (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1000"
                b"\r\n\r\n" + event("text", '{"text": "BOGUS"}') if bot == "Second" else b""))
            return True
        if bot == "CutOff":
            connection.sendall(WIRE_HEAD + http_chunk(event("text", '{"text": "cut "}')) +
                               b"100\r\nevent: te")
        elif bot == "ShortLength":
            text = event("text", '{"text": "short "}')
            connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                               b"content-length: %d\r\n\r\n%s" % (len(text) + 50, text))
        else:  # KeepOpen, Never: until the service closes the connection
            if bot == "KeepOpen":
                connection.sendall(WIRE_HEAD + http_chunk(WIRE_EVENTS))
            while connection.recv(65536):
                pass
        return False


# ---------------------------------------------------------------------------------------------
# The servers: the service (or the local Poe) under uvicorn in this process, or `python
# server.py` in a process of its own

def wait_for(condition, seconds=10.0, step=0.02):
    """The first true value `condition()` returns, polled until the deadline."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


class LiveServer:
    """An ASGI app under uvicorn in a thread, on a free port of 127.0.0.1; `config`: more of
    uvicorn's settings (ssl_certfile and ssl_keyfile: HTTPS)."""

    def __init__(self, app, **config):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        scheme = "https" if "ssl_certfile" in config else "http"
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=1, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.stop()
        self.thread.join(10)

    def stop(self):
        """Asks uvicorn to shut down; join self.thread to wait for it."""
        self.server.should_exit = True


class ServerProcess:
    """`python server.py` as a user runs it, in a directory of its own, on a port the OS gives
    it (--port 0): the port is read from the service's start line ("serving http://host:port;
    ...") in the log, logged once it listens. Arguments go to server.py, keywords to its
    environment; the log is appended to, so that a second process in the same directory keeps
    the first one's lines."""

    def __init__(self, workdir, poe_url=None, *args, **env):
        self.log_path = workdir / "server.log"
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.log = open(self.log_path, "ab")
        if poe_url is not None:
            env = {"POE_BASE_URL": poe_url, **env}
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(server.HERE, "server.py"), "--port", "0",
             "--db", str(workdir / "chat.db"), *args],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            self.port = wait_for(self.listening_port, seconds=20)
            self.url = f"http://127.0.0.1:{self.port}"
            assert httpx.get(self.url + "/health", timeout=5).status_code == 200
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def output(self) -> str:
        """What this process has written to the log so far."""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def listening_port(self) -> int | None:
        output = self.output()
        if self.process.poll() is not None:
            raise AssertionError(f"server.py exited with {self.process.returncode}:\n{output}")
        found = re.search(r"serving https?://\S+:(\d+);", output)
        return int(found[1]) if found else None

    def stop(self, sig):
        self.process.send_signal(sig)
        self.process.wait(15)
        self.log.close()


# ---------------------------------------------------------------------------------------------
# Fixtures: the local Poe, and services on temporary databases

@pytest.fixture(scope="session")
def poe_url():
    with LiveServer(make_poe_app()) as poe:
        yield poe.url + "/"


@pytest.fixture(scope="session")
def start_service(poe_url, tmp_path_factory, monkeypatch_session):
    """Starts the service with settings of the test's choosing; yields (client, db_path)."""
    monkeypatch_session.delenv("POE_API_KEY", raising=False)
    stack = []

    def start(**settings):
        db_path = str(tmp_path_factory.mktemp("db") / "chat.db")
        # The shared services make more Poe calls a minute than POE_RATE_LIMIT's default: a
        # budget they never reach, unless the test asks for one.
        settings = {"db_path": db_path, "poe_base_url": poe_url,
                    "poe_upload_url": poe_url + "poe_api/",
                    "poe_models_url": poe_url + "v1/models", "poe_rate_limit": 100000, **settings}
        live = LiveServer(server.create_app(**settings)).__enter__()
        client = httpx.Client(base_url=live.url, timeout=30)
        stack.append((live, client))
        return client, db_path

    yield start
    # Stopped together, not one after another: each takes a tick of uvicorn's loop and more.
    for live, client in stack:
        client.close()
        live.stop()
    for live, _ in stack:
        live.thread.join(10)


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def service(start_service):
    """The service most tests share: they make conversations and projects of their own."""
    return start_service()


@pytest.fixture
def api(service):
    return service[0]


@pytest.fixture
def db(service):
    conn = sqlite3.connect(service[1])
    conn.row_factory = sqlite3.Row
    yield conn
    conn.close()


@pytest.fixture
def fresh(start_service):
    """A service of the test's own, on a new database: for a test whose answer depends on what
    the whole database holds."""
    return start_service()


@pytest.fixture(scope="session")
def search_service(start_service):
    """The search-syntax cases' service: what other tests store (a reply of 3 MB of "x", say)
    is not theirs to search."""
    return start_service()


@pytest.fixture(scope="session")
def guarded(start_service):
    """A service behind access keys, with a Poe key of its own."""
    return start_service(access_keys="first-access-key, second-access-key",
                         poe_api_key=RIGHT_KEY)


@pytest.fixture(scope="session")
def impatient(start_service):
    """A service that waits at most 0.5 s for Poe's next event."""
    return start_service(poe_timeout=0.5)


@pytest.fixture(scope="session")
def lockable(start_service):
    """A service that waits at most 0.3 s for a database another program has locked."""
    return start_service(db_timeout=0.3)


@pytest.fixture(scope="session")
def small_bodies(start_service):
    """A service that takes request bodies of at most 1,000 bytes."""
    return start_service(max_body_bytes=1000)
