"""An offline fake Poe: try the service without a Poe key, and see the Poe bot protocol at work.

    python examples/echo_poe.py                     # fake Poe on :8001, the service on :8000
    python examples/echo_poe.py --port 9000 --db x.db  # other arguments go to server.py
    python examples/echo_poe.py --poe-port 0        # the fake Poe on a free port (it says which)
    python examples/echo_poe.py --poe-only          # only the fake Poe; prints the env lines

It starts the fake Poe and then the service (server.py, a child process) pointed at it with
POE_BASE_URL, POE_UPLOAD_URL, POE_MODELS_URL and POE_API_KEY=offline (unless already set), on the
database offline.db unless --db is given. Ctrl-C (or SIGTERM) stops both.

Any bot name answers (POST /bot/<name> with any key as a Bearer token; Poe's protocol as
fastapi_poe speaks it: a `meta` event, then `text`, `json` or `file` events, then `done`):
- text, a word per event: "<name> heard: <last user message> (<n> messages in the history)",
  n counting every message Poe got (system included), then the names of files attached and of
  the plan documents the service put in the system message;
- a query that offers tools and has no tool results: one call to the first tool (OpenAI's chunks
  in `json` events), its arguments a placeholder for each required property; with tool results:
  a text that quotes them;
- a system message that asks for JSON ("... valid JSON ..."): {"bot": <name>, "echo": <message>};
- image bots (the name contains "image" or starts with FLUX, DALL-E, Imagen or Playground): a
  short text and a `file` event: a PNG drawn here and served at /files/<id>/<name>.
GET /v1/models is Poe's model list; POST /poe_api/file_upload_3RD_PARTY_POST is fastapi_poe's
upload_file: the file is kept in memory and served at /files/<id>/<name> too.
"""
from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from urllib.parse import quote

import fastapi_poe as fp
import uvicorn
from sse_starlette.event import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

SERVER_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "server.py")
WORD_SECONDS = 0.02  # the pause between two words of a reply (--word-seconds)
IMAGE_BOT = re.compile(r"^(flux|dall-e|imagen|playground)|image", re.IGNORECASE)
FILES: dict[str, tuple[str, str, bytes]] = {}  # id -> (name, content type, bytes), in memory
MODELS = [  # what GET /v1/models answers: Poe's format, a few with their context window
    ("GPT-4o", "OpenAI", 128000), ("GPT-4o-Mini", "OpenAI", 128000), ("GPT-4.1", "OpenAI", None),
    ("o3-mini", "OpenAI", None), ("Claude-Sonnet-4", "Anthropic", 200000),
    ("Claude-3.5-Sonnet", "Anthropic", None), ("Claude-3.5-Haiku", "Anthropic", None),
    ("Gemini-2.5-Pro", "Google", 1000000), ("Gemini-2.0-Flash", "Google", None),
    ("Llama-3.1-405B", "Meta", None), ("DeepSeek-R1", "DeepSeek", None), ("Grok-3", "xAI", None),
    ("FLUX-schnell", "Black Forest Labs", None), ("DALL-E-3", "OpenAI", None)]


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid PNG: a vertical gradient from black to `rgb` (8-bit truecolor, one zlib stream)."""
    rows = b"".join(b"\x00" + bytes(c * y // (height - 1) for c in rgb) * width  # 0: no filter
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def keep_file(request: Request, name: str, content_type: str, data: bytes) -> str:
    """Stores a file in memory; its URL on this fake Poe."""
    file_id = uuid.uuid4().hex[:12]
    FILES[file_id] = (name, content_type, data)
    return f"{str(request.base_url).rstrip('/')}/files/{file_id}/{quote(name)}"


def tool_chunk(delta: dict, finish_reason: str | None = None) -> ServerSentEvent:
    """A tool call travels as OpenAI's streaming chunks, each in a `json` event."""
    return ServerSentEvent(event="json", data=json.dumps(
        {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}))


def placeholder(schema: dict):
    if schema.get("enum"):
        return schema["enum"][0]
    return {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}.get(
        schema.get("type"), "example")


class EchoBot(fp.PoeBot):
    """One bot for every name: it is served at /bot/{name} and reads the name from the path."""

    async def get_response_with_context(self, request: fp.QueryRequest, context: fp.RequestContext):
        name = context.http_request.path_params["name"]
        last = next((m for m in reversed(request.query) if m.role == "user"), None)
        said = last.content if last else ""
        # The first event may be `meta`: how to show the reply (fastapi_poe sends it as such).
        yield fp.MetaResponse(text="", content_type="text/markdown", suggested_replies=False)
        if request.tool_results:  # the caller ran the tools we asked for: quote what they said
            quoted = "; ".join(f"{r.name} returned {r.content}" for r in request.tool_results)
            yield fp.PartialResponse(text=f"{name} got the tool results: {quoted}")
            return
        if request.tools:  # call the first tool, the arguments in a second chunk as Poe does
            function = request.tools[0].function
            properties = function.parameters.properties or {}
            arguments = {key: placeholder(properties.get(key) or {})
                         for key in function.parameters.required or []}
            yield tool_chunk({"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                 "function": {"name": function.name, "arguments": ""}}]})
            yield tool_chunk({"tool_calls": [
                {"index": 0, "function": {"arguments": json.dumps(arguments)}}]})
            yield tool_chunk({}, "tool_calls")
            return
        if any(m.role == "system" and "valid JSON" in m.content for m in request.query):
            yield fp.PartialResponse(text=json.dumps({"bot": name, "echo": said}))
            return
        if IMAGE_BOT.search(name):
            color = zlib.crc32(said.encode(errors="replace")).to_bytes(4, "big")[:3]
            url = keep_file(context.http_request, "image.png", "image/png",
                            png(64, 64, tuple(color)))
            yield fp.PartialResponse(text=f"{name} drew: {said}\n\n")
            yield fp.PartialResponse(text="", attachment=fp.Attachment(
                url=url, content_type="image/png", name="image.png"))
            return
        count = len(request.query)  # the whole history, system message included
        text = f"{name} heard: {said} ({count} message{'s' * (count != 1)} in the history)"
        if last and last.attachments:
            text += " Attached: " + ", ".join(a.name for a in last.attachments) + "."
        system = next((m.content for m in request.query if m.role == "system"), "")
        if documents := re.findall(r"^----- (.+) BEGIN -----$", system, re.MULTILINE):
            text += " Documents: " + ", ".join(documents) + "."  # the service's document marks
        for word in re.findall(r"\S+\s*", text):  # streamed: one text event per word
            yield fp.PartialResponse(text=word)
            await asyncio.sleep(WORD_SECONDS)


async def upload(request: Request) -> Response:
    """fastapi_poe's upload_file: a multipart form with one part `file` (stdlib parses it)."""
    body = await request.body()
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    form = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    for part in form.iter_parts() if form.is_multipart() else ():
        if part.get_param("name", header="content-disposition") == "file":
            name = part.get_filename() or "file"
            content_type = part.get_content_type()
            url = keep_file(request, name, content_type, part.get_payload(decode=True) or b"")
            return JSONResponse({"attachment_url": url, "mime_type": content_type})
    return JSONResponse({"error": "a multipart form with a part named 'file' is expected"}, 400)


async def get_file(request: Request) -> Response:
    found = FILES.get(request.path_params["file_id"])
    if found is None:
        return JSONResponse({"error": "no such file"}, 404)
    return Response(found[2], media_type=found[1])


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": model, "object": "model", "created": 1735689600, "owned_by": owner,
         "description": f"Offline echo of {model}",
         **({"context_window": {"context_length": size}} if size else {})}
        for model, owner, size in MODELS]})


def make_app():
    logging.getLogger("uvicorn.default").setLevel(logging.ERROR)  # make_app's "no bot name" warning
    # A list of bots, even of one: for a single bot make_app would take POE_API_KEY from the
    # environment as the key callers must send (and exit unless it has 32 characters).
    app = fp.make_app([EchoBot(path="/bot/{name}")], allow_without_key=True)
    app.add_api_route("/poe_api/file_upload_3RD_PARTY_POST", upload, methods=["POST"])
    app.add_api_route("/files/{file_id}/{name}", get_file, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    return app


def main() -> None:
    global WORD_SECONDS
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="An offline fake Poe, and the service pointed at it.",
        epilog="Other arguments (--port, --host, ...) are passed to server.py.")
    parser.add_argument("--poe-port", type=int, default=8001, help="the fake Poe's port "
                        "(default 8001; 0: a free one)")
    parser.add_argument("--poe-only", action="store_true", help="start only the fake Poe")
    parser.add_argument("--db", default="offline.db", help="the service's database (offline.db)")
    parser.add_argument("--word-seconds", type=float, default=WORD_SECONDS,
                        help="the pause between two words of a reply (default 0.02)")
    args, passthrough = parser.parse_known_args()
    WORD_SECONDS = args.word_seconds
    if args.poe_only and passthrough:
        parser.error(f"--poe-only starts no service: {' '.join(passthrough)} is for none")

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", args.poe_port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SystemExit(f"error: the fake Poe cannot listen on 127.0.0.1:{args.poe_port}: "
                         f"{reason} (choose another port with --poe-port)") from None
    poe = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"POE_BASE_URL": f"{poe}/bot/", "POE_UPLOAD_URL": f"{poe}/poe_api/",
           "POE_MODELS_URL": f"{poe}/v1/models",
           "POE_API_KEY": os.environ.get("POE_API_KEY") or "offline"}
    # uvicorn in a thread leaves the signals to the main thread: they stop the service (which
    # then stops the fake Poe) or, without a service, the fake Poe.
    server = uvicorn.Server(uvicorn.Config(make_app(), log_level="warning"))
    child: subprocess.Popen | None = None

    def forward(sig, frame):
        if child is not None and child.poll() is None:
            child.send_signal(sig)  # a second Ctrl-C makes the service quit at once
        else:
            server.should_exit = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    if not server.started:
        raise SystemExit("error: the fake Poe did not start")
    service = f"; starting server.py {' '.join(['--db', args.db, *passthrough])}"
    print(f"Offline Poe on {poe}: any bot name answers (POST {poe}/bot/<name>)"
          + ("" if args.poe_only else service), flush=True)
    if args.poe_only:
        print("".join(f"export {key}={value}\n" for key, value in env.items()), end="", flush=True)
    elif not server.should_exit:  # a session of its own: a terminal's Ctrl-C reaches it through us
        child = subprocess.Popen([sys.executable, SERVER_PY, "--db", args.db, *passthrough],
                                 env={**os.environ, **env}, start_new_session=True)

    while thread.is_alive():
        if child is not None and child.poll() is not None:
            server.should_exit = True  # the service is gone: so goes the fake Poe
        thread.join(0.2)
    if child is None:
        return
    if child.poll() is None:  # the fake Poe stopped: stop the service
        child.terminate()
    code = child.wait()
    sys.exit(code if code >= 0 else 128 - code)  # killed by a signal: the shell's convention


if __name__ == "__main__":
    main()
