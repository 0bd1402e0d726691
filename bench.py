"""What the proxy costs over talking to Poe directly, measured in one run on this machine.

Starts, each in a process of its own on 127.0.0.1: a Poe-protocol bot server built with
fastapi_poe, the service (`python server.py`, as users run it, on a fresh temporary database), and
a bare Starlette JSON route served the same way. This process is the client. Every figure comes
from the same run, so the ratios hold on a noisy machine.

    python bench.py            # the full table, a few minutes (a 200k-message database is built)
    python bench.py --quick    # a small version in about fifteen seconds
    python bench.py --smoke    # every row of --quick at its smallest, in seconds (the test suite
                               # runs it: it proves each measurement runs; its figures mean nothing)
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import itertools
import json
import os
import random
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable

import fastapi_poe as fp
import httpx
from fastapi_poe.client import PROTOCOL_VERSION

HERE = os.path.dirname(os.path.abspath(__file__))
PACE = 50  # chunks per second, as Poe sends them
KEY = "bench-key"
SMOKE_NOTE = "smoke run: sizes too small for the figures to mean anything"


def sized(mode: str, full, quick, smoke):
    """What a measurement takes in this mode: "full" (the table of docs/BENCHMARK.md), "quick"
    (--quick) or "smoke" (--smoke: every row of --quick at its smallest, its checks kept)."""
    return {"full": full, "quick": quick, "smoke": smoke}[mode]


# ---------------------------------------------------------------------------------------------
# The processes

class Bench(fp.PoeBot):
    """'paced N': N chunks at PACE/s; 'flat N': N chunks at once; else a short reply. Each
    paced chunk carries its send time."""

    async def get_response(self, request):
        words = request.query[-1].content.split()
        if words[:1] == ["paced"]:
            start = time.monotonic()
            for i in range(int(words[1])):
                delay = start + i / PACE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield fp.PartialResponse(text=f"{time.time():.6f} ")
        elif words[:1] == ["flat"]:
            for _ in range(int(words[1])):
                yield fp.PartialResponse(text="chunk ")
        elif words[:1] == ["huge"]:
            yield fp.PartialResponse(text="h" * int(words[1]))
        elif words[:1] == ["flood"]:
            for i in range(int(words[1])):
                yield fp.PartialResponse(text=str(i % 10) * 10000)
        elif words[:1] == ["stamp"]:
            yield fp.PartialResponse(text=f"{time.time():.6f}")  # when the call arrived
        else:
            yield fp.PartialResponse(text="ok")


def bare_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def create(request):
        await request.body()
        return JSONResponse({"conversation_id": str(uuid.uuid4())})

    return Starlette(routes=[Route("/v1/chat/conversations", create, methods=["POST"])])


async def raw_paced(request):
    """'paced N' as pre-encoded events (a fastapi_poe bot's pydantic and sse-starlette cost some
    60 us a chunk: 500 streams would need more than two cores of bot alone)."""
    from starlette.responses import StreamingResponse
    count = int((await request.json())["query"][-1]["content"].split()[1])

    async def events():
        start = time.monotonic()
        for i in range(count):
            delay = start + i / PACE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield b'event: text\r\ndata: {"text": "%.6f "}\r\n\r\n' % time.time()
        yield b"event: done\r\ndata: {}\r\n\r\n"
    return StreamingResponse(events(), media_type="text/event-stream")
# The bot server's model list (POE_MODELS_URL): Small, the same bot, has a window of 2,000 tokens.
MODEL_LIST = {"object": "list", "data": [
    {"id": "Bench", "object": "model", "created": 0, "owned_by": "bench"},
    {"id": "Small", "object": "model", "created": 0, "owned_by": "bench",
     "context_window": {"context_length": 2000}}]}


def bot_app():
    app = fp.make_app([Bench(path="/Bench"), Bench(path="/Small")], allow_without_key=True)
    app.add_api_route("/v1/models", lambda: MODEL_LIST, methods=["GET"])
    app.add_route("/Raw", raw_paced, methods=["POST"])
    return app


def serve(role: str, port: int) -> None:
    import uvicorn

    app = bot_app() if role == "bot" else bare_app()
    # The same uvicorn settings as `python server.py` (access log on, uvloop and httptools).
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


class Process:
    """A server started on port 0, its output in `log_path`: ready() waits for the line that says
    where it listens (the service's "serving http://127.0.0.1:NNNN; ...", uvicorn's "Uvicorn
    running on http://127.0.0.1:NNNN" for a bot) and takes the port the OS gave it from there
    (a port picked beforehand could be taken by then). stop() only asks a process to end (its
    shutdown, a fifth of a second, overlaps what comes next); stop_all() waits for every one."""

    started: list[Process] = []

    def __init__(self, args: list[str], log_path: str, env: dict | None = None):
        Process.started.append(self)
        self.args, self.log_path, self.url = args, log_path, ""
        self.log = open(log_path, "wb")
        self.popen = subprocess.Popen([sys.executable, *args], stdout=self.log,
                                      stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                      cwd=os.path.dirname(log_path))

    async def ready(self) -> Process:
        deadline = time.monotonic() + 30
        while True:
            with open(self.log_path, "rb") as log:
                found = re.search(rb"(?:Uvicorn running on|serving) https?://\S+:(\d+)",
                                  log.read())
            if found:
                self.url = f"http://127.0.0.1:{int(found[1])}"
                return self
            if time.monotonic() > deadline or self.popen.poll() is not None:
                raise SystemExit(f"{self.args} did not start; see {self.log_path}")
            await asyncio.sleep(0.02)  # --smoke's sections start their services meanwhile

    def cpu_seconds(self) -> float:
        """CPU time of all its threads, to the nanosecond (/proc's schedstat; stat counts ticks of
        10 ms, too coarse for the quick run's few thousand chunks)."""
        total = 0
        for task in os.listdir(f"/proc/{self.popen.pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{self.popen.pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
        return total / 1e9

    def memory_mb(self, field: str) -> float:
        """A line of /proc/PID/status in MB: VmRSS now, VmHWM the peak."""
        with open(f"/proc/{self.popen.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def rss_mb(self) -> float:
        return self.memory_mb("VmRSS")

    def peak_rss_mb(self) -> float:
        return self.memory_mb("VmHWM")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    @classmethod
    def stop_all(cls) -> None:
        for process in cls.started:
            process.stop()
        for process in cls.started:
            try:
                process.popen.wait(10)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
            process.log.close()
        cls.started.clear()


async def start_service(workdir: str, bot: Process, db_path: str, log_name: str,
                        **env: str) -> Process:
    """`python server.py` as users run it, on `db_path`, its Poe the bench's bot; `env`: more
    settings. No budget of Poe calls (POE_RATE_LIMIT=0), but where a row measures it: the bench
    makes more than its default 500 calls a minute."""
    return await Process([os.path.join(HERE, "server.py"), "--port", "0", "--db", db_path],
                         os.path.join(workdir, log_name),
                         env={"POE_BASE_URL": bot.url + "/", "POE_API_KEY": KEY,
                              "DEFAULT_MODEL": "Bench", "POE_RATE_LIMIT": "0", **env}).ready()


# ---------------------------------------------------------------------------------------------
# Clients: direct (fastapi_poe's own client) and through the service

def query(content: str, history: list[fp.ProtocolMessage] | None = None) -> fp.QueryRequest:
    messages = (history or []) + [fp.ProtocolMessage(role="user", content=content)]
    return fp.QueryRequest(version=PROTOCOL_VERSION, type="query", query=messages, user_id="",
                           conversation_id="", message_id="")


async def direct_reply(session: httpx.AsyncClient, bot_url: str, request: fp.QueryRequest,
                       on_chunk=None) -> str:
    parts = []
    async for message in fp.stream_request(request, "Bench", KEY, session=session, num_tries=1,
                                           base_url=bot_url):
        if on_chunk is not None:
            on_chunk(message.text)
        parts.append(message.text)
    return "".join(parts)


async def service_reply(client: httpx.AsyncClient, conversation_id: str, content: str,
                        on_chunk=None) -> str:
    parts = []
    async with client.stream("POST", f"/v1/chat/conversations/{conversation_id}/messages",
                             json={"content": content, "stream": True}) as response:
        if response.status_code != 200:
            raise SystemExit(f"service answered {response.status_code}: "
                             f"{(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise SystemExit(f"stream failed: {event}")
                if event.get("content"):
                    if on_chunk is not None:
                        on_chunk(event["content"])
                    parts.append(event["content"])
    return "".join(parts)


def latency_recorder(latencies: list[float]):
    def record(text: str) -> None:
        latencies.append(time.time() - float(text))
    return record


async def new_conversations(client: httpx.AsyncClient, count: int) -> list[str]:
    async def one() -> str:
        response = await client.post("/v1/chat/conversations", json={"model": "Bench"})
        return response.json()["conversation_id"]
    return list(await asyncio.gather(*(one() for _ in range(count))))


def check_stored(db_path: str, replies: dict[str, str]) -> int:
    """How many of the replies the database holds whole and complete."""
    db = sqlite3.connect(db_path)
    whole = 0
    for conversation_id, text in replies.items():
        row = db.execute("SELECT content, status FROM messages WHERE conversation_id = ? AND "
                         "role = 'assistant' ORDER BY id DESC LIMIT 1",
                         (conversation_id,)).fetchone()
        whole += row == (text, "complete")
    db.close()
    return whole


def server_timing(response: httpx.Response) -> dict[str, float]:
    """The Server-Timing header's metrics: name -> milliseconds."""
    return {name.strip(): float(duration) for name, _, duration in
            (metric.partition(";dur=") for metric in response.headers["server-timing"].split(","))}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------------------------------------
# The measurements

async def bench_paced(mode: str, session: httpx.AsyncClient, client: httpx.AsyncClient,
                      bot: Process, service: Process, db_path: str, streams: int,
                      chunks: int) -> list[tuple[str, str, str]]:
    """`streams` paced replies of `chunks` chunks: with fastapi_poe's client (its CPU a chunk;
    its latency, after its parsing of each chunk), then read as they arrive (sse_reply)
    straight from the bot and through the service: the latency the service adds, the CPU it
    spends a chunk."""
    fastapi_poe: list[float] = []
    direct_cpu = time.process_time()
    await asyncio.gather(*(direct_reply(session, bot.url + "/", query(f"paced {chunks}"),
                                        latency_recorder(fastapi_poe)) for _ in range(streams)))
    direct_cpu = (time.process_time() - direct_cpu) / (streams * chunks)
    bot_port = int(bot.url.rsplit(":", 1)[1])
    # (One stream's latency is measured side by side, below.)
    direct = [] if streams == 1 else await asyncio.gather(*(sse_reply(bot_port, "/Bench", query(
        f"paced {chunks}").model_dump(), "text") for _ in range(streams)))
    conversation_ids = await new_conversations(client, streams)
    port = int(service.url.rsplit(":", 1)[1])
    cpu_before = (bot.cpu_seconds(), service.cpu_seconds(), time.process_time())
    started = time.perf_counter()
    proxied = await asyncio.gather(*(raw_stream_reply(port, c, f"paced {chunks}")
                                     for c in conversation_ids))
    wall = time.perf_counter() - started
    cpu = [after - before for before, after in zip(
        cpu_before, (bot.cpu_seconds(), service.cpu_seconds(), time.process_time()))]
    texts = [text for text, _ in proxied]
    stored = check_stored(db_path, dict(zip(conversation_ids, texts)))
    complete = sum(len(t.split()) == chunks for t in texts)
    lates = [[delays for _, delays in direct], [delays for _, delays in proxied]]
    how = ""
    if streams == 1:
        # 4,000 chunks a side: a p99 over 1,000 (their 10th latest) moved 0.21-0.35 ms added
        # over 12 sets of one run; over 2,000, 0.21-0.33 in 8 full runs; over 4,000, 0.22-0.32 in 6.
        pairs = sized(mode, 20, 1, 1)
        lates, apart = await side_by_side(bot_port, port, client, chunks, pairs)
        how = (f", the two at once, {pairs} × {chunks} chunks each, "
               f"{min(apart) * 1000:.0f}-{max(apart) * 1000:.0f} ms apart")
    direct_late, proxied_late = ([late for delays in side for late in delays] for side in lates)
    d50, d99 = statistics.median(direct_late), percentile(direct_late, 0.99)
    p50, p99 = statistics.median(proxied_late), percentile(proxied_late, 0.99)
    # The streams begin and end together: their turns' start and end hold the loop a moment.
    inner = [percentile([late for delays in side for late in delays[1:-1]], 0.99)
             for side in lates]
    server_cpu = cpu[1] / (streams * chunks)
    return [(f"paced, {streams} stream(s): latency per chunk, as read, median / p99",
             f"direct {ms(d50)} / {ms(d99)}; service {ms(p50)} / {ms(p99)}{how} (fastapi_poe's "
             f"client, after its parsing: {ms(statistics.median(fastapi_poe))} / "
             f"{ms(percentile(fastapi_poe, 0.99))})",
             f"adds {ms(p50 - d50)} / {ms(p99 - d99)} (p99 without each stream's first and "
             f"last chunk: {ms(inner[1] - inner[0])}); "
             f"{complete}/{streams} complete, {stored}/{streams} stored whole"),
            (f"paced, {streams} stream(s) through the service: cores busy",
             f"bot {cpu[0] / wall:.2f}, service {cpu[1] / wall:.2f}, "
             f"client {cpu[2] / wall:.2f}", f"{sum(cpu) / wall:.2f} of {os.cpu_count()}"),
            (f"paced, {streams} stream(s): CPU per chunk",
             f"fastapi_poe's client {direct_cpu * 1e6:.0f} µs; server {server_cpu * 1e6:.0f} µs",
             f"ratio {server_cpu / direct_cpu:.2f}")]


async def bench(mode: str, workdir: str) -> list[tuple[str, str, str]]:
    """The sections in turn; with --smoke, where no figure counts, all at once (each still
    with its own service), so that their services start together."""
    bot = Process([os.path.abspath(__file__), "serve", "bot", "0"],
                  os.path.join(workdir, "bot.log"))
    bare = Process([os.path.abspath(__file__), "serve", "bare", "0"],
                   os.path.join(workdir, "bare.log"))
    await bot.ready()
    sections = [
        # 1.-5. Streams, flat-out relay, turns by history size, GET messages, creation rate.
        functools.partial(bench_service, mode, workdir, bot, bare),
        # 6. Search, a page of a long conversation, a backup while replies stream: a large
        # database, built before its service starts.
        functools.partial(bench_history, mode, workdir, bot),
        # 7. What could hold the event loop: a long history, a huge chunk, stuck readers.
        functools.partial(bench_faults, mode, workdir, bot),
        # 8. Long reads: a big export, a pathological search, three backups.
        functools.partial(bench_long_reads, mode, workdir, bot),
        # 9. The budget of Poe calls: its cost under it, and turns offered at twice it.
        functools.partial(bench_budget_cost, mode),
        functools.partial(bench_over_budget, mode, workdir, bot),
        # 10. Hundreds of streams.
        *([functools.partial(bench_many_streams, workdir, bot, 500, 200)]
          if mode == "full" else []),
        # 11. Compaction: what it adds to a turn, a compacted long history, the loop meanwhile.
        functools.partial(bench_compaction, mode, workdir, bot)]
    try:
        if mode == "smoke":
            parts = await asyncio.gather(*(section() for section in sections))
        else:
            parts = [await section() for section in sections]
    finally:
        bot.stop()
    return [row for part in parts for row in part]


async def side_by_side(bot_port: int, port: int, client: httpx.AsyncClient, chunks: int,
                       pairs: int) -> tuple[list[list[list[float]]], list[float]]:
    """One stream's latencies, [direct, through the service], `pairs` times: a stream straight
    from the bot and one through the service at once, the second begun half a chunk's interval
    after the first, so that each chunk is alone on the machine and both streams meet the same
    moments of a shared host. One after the other, they met different ones: the bot's own CPU a
    chunk differed by up to 2.5x between two such 4 s streams, and a p99 over 200 chunks (their
    second latest) with it. Also how far apart (s) the two streams' chunks were sent, each
    pair; both streams must be whole."""
    lates: list[list[list[float]]] = [[], []]
    apart = []
    for _ in range(pairs):
        [conversation_id] = await new_conversations(client, 1)
        straight = asyncio.ensure_future(sse_reply(bot_port, "/Bench", query(
            f"paced {chunks}").model_dump(), "text"))
        await asyncio.sleep(0.5 / PACE)
        text, late = await raw_stream_reply(port, conversation_id, f"paced {chunks}")
        direct_text, direct_late = await straight
        sent = [[float(stamp) for stamp in t.split()] for t in (direct_text, text)]
        assert all(len(stamps) == chunks for stamps in sent), "a stream side by side broke off"
        apart.append((sent[1][0] - sent[0][0]) % (1 / PACE))
        lates[0].append(direct_late)
        lates[1].append(late)
    return lates, apart


async def bench_service(mode: str, workdir: str, bot: Process,
                        bare: Process) -> list[tuple[str, str, str]]:
    """In the service every other section leaves alone: paced streams, flat-out relay,
    non-streamed and OpenAI turns by history size, GET messages, conversations created a
    second against a bare Starlette route."""
    rows: list[tuple[str, str, str]] = []
    db_path = os.path.join(workdir, "chat.db")
    service = await start_service(workdir, bot, db_path, "service.log")
    await bare.ready()
    bot_url = bot.url + "/"
    db = sqlite3.connect(db_path)
    # Counts the service's updates of stored replies (the start of a reply is one insert).
    db.executescript("""
        CREATE TABLE bench_writes (message_id INTEGER);
        CREATE TRIGGER bench_count_writes AFTER UPDATE ON messages
        BEGIN INSERT INTO bench_writes VALUES (new.id); END;""")
    # Idle connections expire before uvicorn's 5 s keep-alive closes them under the client.
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000,
                          keepalive_expiry=2)
    session = httpx.AsyncClient(timeout=600, limits=limits)
    client = httpx.AsyncClient(base_url=service.url, timeout=600, limits=limits)
    try:
        # 1. Paced streams. 5. Peak RSS at the largest, writes per reply.
        paced_chunks = sized(mode, 200, 10, 3)
        for streams in sized(mode, (1, 50, 200), (1, 5), (1, 2)):
            rows += await bench_paced(mode, session, client, bot, service, db_path, streams,
                                      paced_chunks)
            if streams == 50:
                stall = (await client.get("/health")).json()["longest_loop_stall_ms"]
                rows.append(("longest event-loop stall the service saw up to here",
                             f"{stall:.0f} ms", "target ≤ 50 ms"))
        rows.append((f"server peak RSS after {streams} streams", f"{service.peak_rss_mb():.1f} MB",
                     ""))
        updates = db.execute("SELECT count(*) FROM bench_writes WHERE message_id IN "
                             "(SELECT id FROM messages WHERE role = 'assistant' AND content "
                             "LIKE '%.% %' AND status = 'complete')").fetchone()[0]
        replies = db.execute("SELECT count(*) FROM messages WHERE role = 'assistant' AND "
                             "content LIKE '%.% %'").fetchone()[0]
        seconds = paced_chunks / PACE
        # An insert, then a flush (every FLUSH_SECONDS, the first maybe at once), and the end.
        rows.append(("database writes per streamed reply",
                     f"{1 + updates / replies:.1f} over {seconds:.1f} s of streaming",
                     f"limit 1 + 2 + 2/s = {3 + 2 * seconds:.0f}"))

        # 2. Flat-out relay.
        flat_chunks = sized(mode, 2000, 200, 20)
        for streams in sized(mode, (1, 10), (1, 2), (1, 2)):
            cpu, started = time.process_time(), time.perf_counter()
            await asyncio.gather(*(direct_reply(session, bot_url, query(f"flat {flat_chunks}"))
                                   for _ in range(streams)))
            direct_time = time.perf_counter() - started
            direct_cpu = (time.process_time() - cpu) / (streams * flat_chunks)
            conversation_ids = await new_conversations(client, streams)
            server_cpu, started = service.cpu_seconds(), time.perf_counter()
            texts = await asyncio.gather(*(service_reply(client, c, f"flat {flat_chunks}")
                                           for c in conversation_ids))
            service_time = time.perf_counter() - started
            relayed_cpu = (service.cpu_seconds() - server_cpu) / (streams * flat_chunks)
            stored = check_stored(db_path, dict(zip(conversation_ids, texts)))
            rows.append((f"flat-out {flat_chunks} chunks, {streams} stream(s): total time",
                         f"direct {direct_time:.3f} s; service {service_time:.3f} s",
                         f"ratio {service_time / direct_time:.2f}; "
                         f"{stored}/{streams} stored whole"))
            rows.append((f"flat-out, {streams} stream(s): CPU per chunk",
                         f"direct client {direct_cpu * 1e6:.0f} µs; "
                         f"server {relayed_cpu * 1e6:.0f} µs",
                         f"ratio {relayed_cpu / direct_cpu:.2f}"))

        # 3. A non-streamed turn with a short reply, by history size. 4. GET .../messages.
        # Timed with clients of their own, holding one connection each: the shared ones hold the
        # streams' and those of the conversations just created at once, and httpx's pool looks
        # at every connection it holds for each request.
        repeats = sized(mode, 25, 5, 2)
        timed_session = httpx.AsyncClient(timeout=600)
        timed_client = httpx.AsyncClient(base_url=service.url, timeout=600)
        for size in sized(mode, (10, 100, 1000), (10, 100), (10, 100)):
            # Each turn on a conversation of its own, holding `size` messages: none grows.
            turns = sized(mode, 200, 20, 3) if size == 10 else repeats
            conversation_ids = await new_conversations(client, turns)
            for conversation_id in conversation_ids:
                history = fill_history(db, conversation_id, size)
            poe_history = [fp.ProtocolMessage(role="bot" if role == "assistant" else role,
                                              content=content) for role, content in history]
            direct, proxied, proxy_own = [], [], []
            for conversation_id in conversation_ids:
                started = time.perf_counter()
                await direct_reply(timed_session, bot_url, query("short", poe_history))
                direct.append(time.perf_counter() - started)
                started = time.perf_counter()
                response = await timed_client.post(
                    f"/v1/chat/conversations/{conversation_id}/messages", json={"content": "short"})
                proxied.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                proxy_own.append(server_timing(response)["proxy"])
            d50, p50 = statistics.median(direct), statistics.median(proxied)
            d99, p99 = percentile(direct, 0.99), percentile(proxied, 0.99)
            rows.append((f"non-streamed turn, {size} stored messages, {turns} turns one at a "
                         "time: latency median / p99",
                         f"direct {ms(d50)} / {ms(d99)}; service {ms(p50)} / {ms(p99)}",
                         f"adds {ms(p50 - d50)} / {ms(p99 - d99)}; the service's own time "
                         f"(Server-Timing: proxy) {statistics.median(proxy_own):.2f} ms median"))
            # 6. The same turn through OpenAI's APIs: stateless chat completions (the history in
            # the request) against a stored Responses turn (the history read from the database,
            # the turn written to it), interleaved so that both meet the same machine.
            chat_messages = [{"role": role, "content": content} for role, content in history]
            given = [*chat_messages, {"role": "user", "content": "short"}]
            chat, stateless, stored = [], [], []
            for _ in range(repeats):
                started = time.perf_counter()
                response = await timed_client.post("/v1/chat/completions", json={
                    "model": "Bench", "messages": given})
                chat.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                started = time.perf_counter()
                response = await timed_client.post("/v1/responses", json={
                    "model": "Bench", "input": given, "store": False})
                stateless.append(time.perf_counter() - started)
                assert response.json().get("status") == "completed", response.text
                started = time.perf_counter()
                response = await timed_client.post("/v1/responses", json={
                    "model": "Bench", "input": "short", "conversation": conversation_id})
                stored.append(time.perf_counter() - started)
                assert response.json().get("status") == "completed", response.text
            c50, s50, r50 = (statistics.median(t) for t in (chat, stateless, stored))
            rows.append((f"OpenAI turn, {size} messages of history: median latency",
                         f"chat completions {ms(c50)}; Responses {ms(s50)} (store: false), "
                         f"{ms(r50)} (stored)",
                         f"adds {ms(c50 - d50)} / {ms(s50 - d50)} / {ms(r50 - d50)}; target: "
                         "Responses (store: false) ≤ chat completions"))
        for size in sized(mode, (10, 1000, 10000), (10, 1000), (10, 100)):
            [conversation_id] = await new_conversations(client, 1)
            fill_history(db, conversation_id, size)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                response = await timed_client.get(
                    f"/v1/chat/conversations/{conversation_id}/messages")
                times.append(time.perf_counter() - started)
                assert len(response.json()["messages"]) == size
            rows.append((f"GET messages, {size} messages: median", ms(statistics.median(times)),
                         ""))
        await timed_session.aclose()
        await timed_client.aclose()
        seconds = sized(mode, 3.0, 0.25, 0.05)
        service_rate = await requests_per_second(service.url, seconds)
        bare_rate = await requests_per_second(bare.url, seconds)
        rows.append(("POST /v1/chat/conversations, 20 concurrent clients",
                     f"service {service_rate:.0f}/s; bare Starlette route {bare_rate:.0f}/s",
                     f"ratio {service_rate / bare_rate:.2f}"))
        stall = (await client.get("/health")).json()["longest_loop_stall_ms"]
        rows.append(("longest event-loop stall the service saw over all of the above",
                     f"{stall:.0f} ms", "target ≤ 50 ms"))
    finally:
        await session.aclose()
        await client.aclose()
        db.close()
        for process in (service, bare):
            process.stop()
    return rows


async def bench_faults(mode: str, workdir: str, bot: Process) -> list[tuple[str, str, str]]:
    """The longest event-loop stall (the service's own watch, in /health) in a fresh service
    that did one of: a GET and a turn on a 100k-message conversation, a 50 MB chunk from Poe;
    and the memory 40 clients that never read their streams cost. With --smoke the four share
    one service (its stalls add up; no figure counts there): a service's start is the dearest
    thing in that run."""
    sys.path.insert(0, HERE)
    import server
    rows = []
    size, chunk, stuck = sized(mode, (100000, 50_000_000, 40), (5000, 2_000_000, 5),
                               (200, 100_000, 2))
    flood = sized(mode, 500, 200, 20)  # chunks of 10 kB a stuck client's reply
    db_path = os.path.join(workdir, "faults.db")
    server.prepare_database(db_path)
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO conversations (id) VALUES ('long')")
    fill_history(db, "long", size)
    db.close()

    services = itertools.count(1)
    shared: Process | None = None  # --smoke's one service

    async def start_fresh() -> tuple[Process, httpx.AsyncClient]:
        nonlocal shared
        service = shared or await start_service(workdir, bot, db_path,
                                                f"faults-{next(services)}.log")
        if mode == "smoke":
            shared = service
        return service, httpx.AsyncClient(base_url=service.url, timeout=600)

    async def stall_of(name: str, request: Callable) -> None:
        service, client = await start_fresh()
        try:
            started = time.perf_counter()
            await request(client)
            took = time.perf_counter() - started
            stall = (await client.get("/health")).json()["longest_loop_stall_ms"]
            rows.append((f"longest loop stall during {name}",
                         f"{stall:.0f} ms (the request took {ms(took)})", "target ≤ 50 ms"))
        finally:
            await client.aclose()
            if service is not shared:
                service.stop()

    async def get_history(client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/chat/conversations/long/messages")
        assert len(response.json()["messages"]) >= size

    async def turn(client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/chat/conversations/long/messages",
                                     json={"content": "short"})
        assert response.status_code == 200, response.text[:200]

    async def huge_chunk(client: httpx.AsyncClient) -> None:
        [conversation_id] = await new_conversations(client, 1)
        assert len(await service_reply(client, conversation_id, f"huge {chunk}")) == chunk

    await stall_of(f"GET messages of a {size}-message conversation", get_history)
    await stall_of(f"a turn on a {size}-message conversation", turn)
    await stall_of(f"one {chunk / 10**6:g} MB chunk from Poe, streamed", huge_chunk)
    service, client = await start_fresh()
    try:
        rss_before = service.rss_mb()
        conversation_ids = await new_conversations(client, stuck)
        sockets = [stuck_client(service.url, c, f"flood {flood}") for c in conversation_ids]
        db = sqlite3.connect(db_path)
        marks = ", ".join("?" * stuck)

        def complete() -> int:
            return db.execute(f"SELECT count(*) FROM messages WHERE conversation_id IN ({marks})"
                              " AND role = 'assistant' AND status = 'complete' AND "
                              f"length(content) = {flood * 10000}", conversation_ids
                              ).fetchone()[0]
        deadline = time.monotonic() + 300
        while complete() < stuck and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stored = complete()
        db.close()
        grown = service.rss_mb() - rss_before
        rows.append((f"{stuck} clients that never read their {flood / 100:g} MB streams: "
                     "server RSS growth",
                     f"{grown:.0f} MB ({grown / stuck:.1f} MB each); {stored}/{stuck} "
                     "stored whole", "target a few MB each"))
        for sock in sockets:
            sock.close()
    finally:
        await client.aclose()
        service.stop()
    return rows


async def bench_long_reads(mode: str, workdir: str, bot: Process) -> list[tuple[str, str, str]]:
    """In one fresh service: the RSS an export of a long conversation adds; a search of a
    500-character phrase in long runs of one letter, beside 10 paced streams; one-row reads
    beside three backups."""
    sys.path.insert(0, HERE)
    import server
    messages, runs, ballast = sized(mode, (20000, 3, 200), (1000, 1, 20), (100, 1, 2))
    db_path = os.path.join(workdir, "long-reads.db")
    server.prepare_database(db_path)
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO conversations (id) VALUES ('export'), ('runs')")
    db.executemany("INSERT INTO messages (conversation_id, role, content) VALUES (?, ?, ?)",
                   [("export", "user", f"{i} " + "words to export " * 200)
                    for i in range(messages)] + [("runs", "user", "a" * 10**6)] * runs)
    db.execute("CREATE TABLE bench_ballast (b BLOB)")  # a database of a few hundred MB
    db.executemany("INSERT INTO bench_ballast VALUES (randomblob(1048576))", [()] * ballast)
    db.commit()
    db.close()
    service = await start_service(workdir, bot, db_path, "long-reads.log")
    client = httpx.AsyncClient(base_url=service.url, timeout=600)
    rows = []
    try:
        before = service.rss_mb()
        size = await asyncio.to_thread(download, service.url + "/v1/chat/conversations/export/"
                                       "export?format=json")
        rows.append((f"export of a {messages}-message conversation ({size / 10**6:.0f} MB of "
                     "JSON): server RSS growth", f"{service.rss_mb() - before:.1f} MB",
                     "target ≤ 20 MB"))
        rows.append(await bench_search_beside_streams(client, runs, sized(mode, 150, 40, 40)))
        rows.append(await bench_backups_beside_reads(client, os.path.getsize(db_path)))
    finally:
        await client.aclose()
        service.stop()
    return rows


async def bench_search_beside_streams(client: httpx.AsyncClient, runs: int,
                                      chunks: int) -> tuple[str, str, str]:
    """GET /v1/search?q=aaa...a (500) over `runs` messages of 10**6 a's, while 10 paced replies
    stream: what the search answered and when, how late chunks arrived meanwhile."""
    conversation_ids = await new_conversations(client, 10)
    arrivals: list[tuple[float, float]] = []

    def record(text: str) -> None:
        now = time.time()
        arrivals.append((now, now - float(text)))

    replies = asyncio.gather(*(service_reply(client, c, f"paced {chunks}", record)
                               for c in conversation_ids))
    await asyncio.sleep(0.3)
    began = time.time()
    response = await client.get("/v1/search", params={"q": "a" * 500})
    ended = time.time()
    await replies
    during = [late for when, late in arrivals if began <= when <= ended] or [0.0]
    return (f"GET /v1/search of a 500-letter phrase over {runs} message(s) of a million of "
            "one letter, beside 10 streams: answer, how late chunks arrive during it (max)",
            f"{response.status_code} after {ended - began:.2f} s; {ms(max(during))}",
            "target: cut within 1 s, no chunk > 50 ms late")


async def bench_backups_beside_reads(client: httpx.AsyncClient,
                                     db_size: int) -> tuple[str, str, str]:
    """Three GET /v1/backup at once; one-row reads (GET a conversation) meanwhile."""
    [conversation_id] = await new_conversations(client, 1)
    url = str(client.base_url) + "/v1/backup"
    backups = asyncio.gather(*(asyncio.to_thread(download, url) for _ in range(3)))
    await asyncio.sleep(0.05)
    times = []
    while not times or not backups.done():  # one read at least: --smoke's backups are quick
        started = time.perf_counter()
        response = await client.get(f"/v1/chat/conversations/{conversation_id}")
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        await asyncio.sleep(0.01)
    await backups
    return (f"three GET /v1/backup at once ({db_size / 2**20:.0f} MB database): a one-row read "
            "meanwhile, median / max", f"{ms(statistics.median(times))} / {ms(max(times))} "
            f"({len(times)} reads)", "target ≤ 50 ms")


def stuck_client(url: str, conversation_id: str, content: str) -> socket.socket:
    """A streaming request whose client never reads the answer."""
    body = json.dumps({"content": content, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"POST /v1/chat/conversations/{conversation_id}/messages HTTP/1.1\r\n"
                 f"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


async def bench_history(mode: str, workdir: str, bot: Process) -> list[tuple[str, str, str]]:
    # A page from the middle of the long conversation needs 100 messages before it.
    messages, long_conversation, documents = sized(mode, (200000, 100000, 5000),
                                                   (5000, 2500, 200), (600, 300, 20))
    db_path = os.path.join(workdir, "history.db")
    started = time.perf_counter()
    queries, short_query = build_history(db_path, messages, long_conversation, documents)
    built = time.perf_counter() - started
    size_mb = os.path.getsize(db_path) / 2**20
    rows = [(f"history database: {messages} messages ({long_conversation} in one "
             f"conversation), {documents} documents", f"{size_mb:.0f} MB, built in {built:.0f} s",
             "")]
    service = await start_service(workdir, bot, db_path, "history.log")
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100,
                          keepalive_expiry=2)
    client = httpx.AsyncClient(base_url=service.url, timeout=600, limits=limits)
    try:
        repeats = sized(mode, 7, 3, 1)
        times, counts = [], []
        for q in queries:
            for _ in range(repeats):
                started = time.perf_counter()
                response = await client.get("/v1/search", params={"q": q})
                times.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
            counts.append(len(response.json()["results"]))
        rows.append((f"GET /v1/search, {len(queries)} queries (English and Chinese, rare to "
                     "common, one and two words): median / max",
                     f"{ms(statistics.median(times))} / {ms(max(times))}",
                     f"target median ≤ 20 ms; {sum(c > 0 for c in counts)}/{len(queries)} "
                     "found something (one query: a word that is nowhere)"))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            response = await client.get("/v1/search", params={"q": short_query})
            times.append(time.perf_counter() - started)
        rows.append((f"GET /v1/search, a rare two-character Chinese word (a scan of the newest "
                     f"{min(messages, 50000)} messages and documents): median",
                     ms(statistics.median(times)), f"{len(response.json()['results'])} found"))
        times = []
        newest = None
        for i in range(repeats * 4):
            params = {"limit": 50} if i % 2 == 0 else {"limit": 50, "before_id": newest // 2}
            started = time.perf_counter()
            response = await client.get("/v1/chat/conversations/long/messages", params=params)
            times.append(time.perf_counter() - started)
            page = response.json()["messages"]
            assert len(page) == 50, response.text
            newest = newest or page[-1]["id"]
        rows.append((f"GET messages?limit=50 (newest, and from the middle) of "
                     f"{long_conversation} messages: median", ms(statistics.median(times)),
                     "target ≤ 5 ms"))
        rows.append(await bench_backup(client, mode))
    finally:
        await client.aclose()
        service.stop()
    return rows


async def bench_backup(client: httpx.AsyncClient, mode: str) -> tuple[str, str, str]:
    """GET /v1/backup while 10 paced replies stream: how late their chunks arrive meanwhile."""
    # The streams run `lead` seconds before the backup begins (the 0.5 s before it are shown).
    streams, (chunks, lead) = 10, sized(mode, (600, 1.0), (60, 0.6), (30, 0.3))
    conversation_ids = await new_conversations(client, streams)
    arrivals: list[tuple[float, float]] = []  # (when received, how late)

    def record(text: str) -> None:
        now = time.time()
        arrivals.append((now, now - float(text)))

    replies = asyncio.gather(*(service_reply(client, c, f"paced {chunks}", record)
                               for c in conversation_ids))
    await asyncio.sleep(lead)
    began = time.time()
    # Downloaded on a thread of its own, so that reading the copy holds up no chunk here.
    size = await asyncio.to_thread(download, str(client.base_url) + "/v1/backup")
    ended = time.time()
    texts = await replies
    during = [late for when, late in arrivals if began <= when <= ended]
    before = [late for when, late in arrivals if began - 0.5 <= when < began]
    complete = sum(len(t.split()) == chunks for t in texts)
    nan = float("nan")  # no chunk in that time (--smoke's short streams, its loop held elsewhere)
    if ended > max(when for when, _ in arrivals):
        return ("GET /v1/backup while 10 streams run", "the streams ended before the backup did",
                "make the streams longer")
    return (f"GET /v1/backup ({size / 2**20:.0f} MB) while {streams} streams run: how late "
            "chunks arrive, the 0.5 s before it / during it, max",
            f"{ms(max(before, default=nan))} / {ms(max(during, default=nan))} (backup took "
            f"{ended - began:.1f} s)",
            f"target during ≤ 50 ms; {complete}/{streams} complete")


async def bench_budget_cost(mode: str) -> list[tuple[str, str, str]]:
    """What PoeBudget.take() costs a call under the budget (every call pays it), in this
    process: a compare and an append, against awaiting a coroutine that does nothing."""
    sys.path.insert(0, HERE)
    import server
    calls = sized(mode, 200000, 20000, 1000)
    budget = server.PoeBudget(10**9, 60.0, 30.0)  # never full: the path of a call under it

    async def nothing(queued=None) -> None:
        return None

    timings = {}
    for name, take in (("nothing", nothing), ("take", budget.take), ("nothing", nothing),
                       ("take", budget.take)):  # twice each, the second counted: warm
        started = time.perf_counter()
        for _ in range(calls):
            await take()
        timings[name] = (time.perf_counter() - started) / calls
    return [("what the budget adds to a Poe call under it (PoeBudget.take, in-process)",
             f"{timings['take'] * 1e6:.2f} µs a call (awaiting a coroutine that does nothing: "
             f"{timings['nothing'] * 1e6:.2f} µs)", "target ≤ 20 µs")]


async def bench_over_budget(mode: str, workdir: str,
                            bot: Process) -> list[tuple[str, str, str]]:
    """Turns offered at twice the budget, to a service of their own whose budget is 50 calls a
    second (POE_RATE_WINDOW=1; --smoke: 10 in 0.2 s), each waiting at most a window: every turn
    must be served, the served ones reaching the bot in the order they reached the service, or
    refused with Retry-After; none failing otherwise; the event loop held no longer than 50 ms."""
    turns, limit, window = sized(mode, (1000, 50, 1), (200, 50, 1), (60, 10, 0.2))
    rate = limit / window
    service = await start_service(workdir, bot, os.path.join(workdir, "budget.db"), "budget.log",
                                  POE_RATE_LIMIT=str(limit), POE_RATE_WINDOW=str(window),
                                  POE_QUEUE_SECONDS=str(window))
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000,
                          keepalive_expiry=2)
    client = httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits)
    try:
        conversation_ids = []
        for first in range(0, turns, 50):  # 50 at a time: a burst of 1,000 would be the stall
            conversation_ids += await new_conversations(client, min(50, turns - first))

        async def offer(index: int) -> tuple[int, httpx.Response]:
            await asyncio.sleep(index / (2 * rate))  # twice the budget's rate
            return index, await client.post(
                f"/v1/chat/conversations/{conversation_ids[index]}/messages",
                json={"content": f"stamp {index}"})
        started = time.perf_counter()
        answers = await asyncio.gather(*(offer(i) for i in range(turns)))
        took = time.perf_counter() - started
        # In the order the turns reached the service (their message ids), when each reached Poe.
        served = sorted((r.json()["user_message_id"], float(r.json()["reply"]))
                        for _, r in answers if r.status_code == 200)
        refused = [r for _, r in answers if r.status_code == 429 and
                   int(r.headers.get("retry-after", "0")) >= 1]
        failed = turns - len(served) - len(refused)
        # Calls given slots at the same instant (their turns came together) race to the bot:
        # which arrives first, by a fraction of a millisecond or a turn of a busy event loop, is
        # not the queue's order. Disorder past that would be.
        late = [earlier - later for (_, earlier), (_, later) in zip(served, served[1:])
                if later < earlier]
        stall = (await client.get("/health")).json()["longest_loop_stall_ms"]
        db = sqlite3.connect(os.path.join(workdir, "budget.db"))
        stored = db.execute("SELECT count(*) FROM messages WHERE role = 'assistant'").fetchone()[0]
        db.close()
    finally:
        await client.aclose()
        service.stop()
    return [(f"{turns} turns offered at twice the budget ({2 * rate:g}/s against {rate:g}/s, "
             f"POE_QUEUE_SECONDS={window:g}), over {took:.1f} s",
             f"{len(served)} served ({len(late)} reached Poe out of order, by at most "
             f"{ms(max(late, default=0))}), {len(refused)} refused with "
             f"Retry-After, {failed} failed otherwise; {stored} replies stored; longest loop "
             f"stall {stall:.0f} ms",
             "target: served in order (a race of calls let go together aside: ≤ 5 ms), "
             "0 failed, stored = served, stall ≤ 50 ms")]


async def bench_many_streams(workdir: str, bot: Process, streams: int,
                             chunks: int) -> list[tuple[str, str, str]]:
    """`streams` paced replies at once through a service of their own, from the bot's raw route
    (pre-encoded events: fastapi_poe's bot server could not send 25,000 events a second on two
    cores) to clients that keep the bytes and read them at the end (httpx's parsing would take a
    core): every reply complete and stored whole, the service's longest loop stall, its peak
    RSS and CPU per chunk, and how late chunks arrived (the client's reads timed)."""
    db_path = os.path.join(workdir, "many.db")
    service = await start_service(workdir, bot, db_path, "many.log")
    port = int(service.url.rsplit(":", 1)[1])
    client = httpx.AsyncClient(base_url=service.url, timeout=60)
    try:
        conversation_ids = []
        for _ in range(streams // 50):  # 50 at a time
            conversation_ids += await asyncio.gather(*(
                one_conversation(client, "Raw") for _ in range(50)))
        cpu, started = service.cpu_seconds(), time.perf_counter()
        replies = await asyncio.gather(*(raw_stream_reply(port, c, f"paced {chunks}")
                                         for c in conversation_ids))
        took = time.perf_counter() - started
        cpu = (service.cpu_seconds() - cpu) / (streams * chunks)
        texts = [text for text, _ in replies]
        late = [delay for _, delays in replies for delay in delays]
        complete = sum(len(t.split()) == chunks for t in texts)
        stored = check_stored(db_path, dict(zip(conversation_ids, texts)))
        stall = (await client.get("/health")).json()["longest_loop_stall_ms"]
        rss = service.peak_rss_mb()
    finally:
        await client.aclose()
        service.stop()
    return [(f"{streams} paced streams at once ({chunks} chunks each at {PACE}/s, "
             f"{streams * PACE:,} chunks/s), a service of their own",
             f"{complete}/{streams} complete, {stored}/{streams} stored whole; longest loop stall "
             f"{stall:.0f} ms; peak RSS {rss:.0f} MB; server CPU {cpu * 1e6:.0f} µs a chunk; "
             f"chunks late by {ms(statistics.median(late))} median / "
             f"{ms(percentile(late, 0.99))} p99 (over {took:.1f} s)",
             "target: all complete and stored whole, stall ≤ 100 ms, RSS ≤ 250 MB")]


async def one_conversation(client: httpx.AsyncClient, model: str) -> str:
    response = await client.post("/v1/chat/conversations", json={"model": model})
    return response.json()["conversation_id"]


async def raw_stream_reply(port: int, conversation_id: str,
                           content: str) -> tuple[str, list[float]]:
    """A streamed turn through the service, read by sse_reply: (the text, how late each chunk
    arrived)."""
    return await sse_reply(port, f"/v1/chat/conversations/{conversation_id}/messages",
                           {"content": content, "stream": True}, "content")


async def sse_reply(port: int, path: str, payload: dict, key: str) -> tuple[str, list[float]]:
    """A stream of server-sent events read as bytes (HTTP/1.1 with Connection: close, so the end
    of the answer is the end of the connection), each read timed, and decoded at the end, taking
    `key` of each data line's JSON: (the text, how late each chunk (its send time) arrived: when
    the read that ended it came). A few microseconds a chunk, where httpx's reading and a JSON
    parse a chunk take tens: the client must not be what makes chunks late."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(payload).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {KEY}\r\nConnection: close\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    reads, ends = [], []  # (when, bytes) of each read; where each read ends in the answer
    while data := await reader.read(65536):
        reads.append((time.time(), data))
        ends.append((ends[-1] if ends else 0) + len(data))
    writer.close()
    raw = b"".join(data for _, data in reads)
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    parts, at = [], 0
    while (end := chunked.find(b"\r\n", at)) > at:  # the body's chunks, joined
        size = int(chunked[at:end], 16)
        parts.append(chunked[end + 2:end + 2 + size])
        at = end + 4 + size
    texts = [text for line in re.split(rb"\r?\n", b"".join(parts)) if line.startswith(b"data: {")
             and isinstance(text := json.loads(line[6:]).get(key), str) and text]
    delays, where = [], 0
    for text in texts:
        where = raw.find(text.encode(), where) + len(text.encode())
        with contextlib.suppress(ValueError):  # a paced chunk is its send time
            delays.append(reads[bisect.bisect_left(ends, where)][0] - float(text))
    return "".join(texts), delays
async def bench_compaction(mode: str, workdir: str, bot: Process) -> list[tuple[str, str, str]]:
    """In a fresh service whose Small bot has a window of 2,000 tokens: the loop's longest stall
    while the first turn on a 100,000-message conversation (5,000 with --quick) compacts it;
    the turns after it, each compacting the next part (a summary reads a window at a time),
    against the first turn on 100-message ones, which compacts too (one summary call each);
    and what a compacting turn adds beyond its summary call (compaction_cost)."""
    sys.path.insert(0, HERE)
    import server
    size, repeats = sized(mode, (100000, 15), (5000, 5), (200, 1))
    db_path = os.path.join(workdir, "compaction.db")
    server.prepare_database(db_path)
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO conversations (id, model) VALUES ('long', 'Small')")
    fill_history(db, "long", size)
    hundreds = [f"hundred{i}" for i in range(repeats + 1)]
    db.executemany("INSERT INTO conversations (id, model) VALUES (?, 'Small')",
                   [(c,) for c in hundreds])
    for conversation_id in hundreds:
        fill_history(db, conversation_id, 100)
    for conversation_id, messages in (("whole", size), ("whole100", 100)):
        compacted_history(db, conversation_id, messages)
    fresh = [f"small{i}" for i in range(repeats)]
    db.executemany("INSERT INTO conversations (id, model) VALUES (?, 'Small')",
                   [(c,) for c in fresh])
    for conversation_id in fresh:
        history = fill_history(db, conversation_id, 60)
    db.commit()
    db.close()
    service = await start_service(workdir, bot, db_path, "compaction.log",
                                  POE_MODELS_URL=bot.url + "/v1/models")
    client = httpx.AsyncClient(base_url=service.url, timeout=600)

    async def turn(conversation_id: str) -> tuple[float, dict]:
        started = time.perf_counter()
        response = await client.post(f"/v1/chat/conversations/{conversation_id}/messages",
                                     json={"content": "short"})
        assert response.status_code == 200, response.text[:200]
        return time.perf_counter() - started, response.json()

    try:
        took, body = await turn("long")
        assert "compacted" in body, body
        stall = (await client.get("/health")).json()["longest_loop_stall_ms"]
        rows = [(f"longest loop stall while a turn compacts a {size}-message conversation",
                 f"{stall:.0f} ms (the turn took {ms(took)})", "target ≤ 50 ms")]
        assert "compacted" in (await turn(hundreds[-1]))[1]  # the first turn warms up
        long, hundred = [], []
        for conversation_id in hundreds[:-1]:
            took, body = await turn("long")
            assert "compacted" in body, body
            long.append(took)
            took, body = await turn(conversation_id)
            assert "compacted" in body, body
            hundred.append(took)
        rows.append(await compacted_turns(turn, size, repeats))
        ratio = statistics.median(long) / statistics.median(hundred)
        rows.append((f"a compacting turn on the {size}-message conversation (compacted in part: "
                     "it reads both ends) against one on a 100-message one: median",
                     f"{ms(statistics.median(long))} against "
                     f"{ms(statistics.median(hundred))}",
                     f"ratio {ratio:.2f} (the turn counts what it leaves out: ~3 ms a 100,000)"))
        rows.append(await compaction_cost(turn, fresh, history, bot.url + "/", server))
    finally:
        await client.aclose()
        service.stop()
    return rows


def compacted_history(db: sqlite3.Connection, conversation_id: str, size: int) -> None:
    """A conversation of `size` messages compacted as turns leave it: a summary covering all
    but its last four."""
    db.execute("INSERT INTO conversations (id, model) VALUES (?, 'Small')", (conversation_id,))
    fill_history(db, conversation_id, size)
    first, last = db.execute("SELECT MIN(id), MAX(id) FROM messages WHERE conversation_id = ?",
                             (conversation_id,)).fetchone()
    with db:
        db.execute("INSERT INTO messages (conversation_id, role, content, kind, covers_first, "
                   "covers_last) VALUES (?, 'system', ?, 'summary', ?, ?)",
                   (conversation_id, "SUMMARY " * 100, first, last - 4))


async def compacted_turns(turn: Callable, size: int, repeats: int) -> tuple[str, str, str]:
    """Turns on a compacted `size`-message conversation against turns on a compacted 100-message
    one, by turns (neither compacts again: the summary and what follows fit)."""
    long, short = [], []
    for _ in range(repeats + 1):
        for conversation_id, times in (("whole", long), ("whole100", short)):
            took, body = await turn(conversation_id)
            assert "compacted" not in body and "context_trimmed" not in body, body
            times.append(took)
    long, short = long[1:], short[1:]  # the first of each warms up
    ratio = statistics.median(long) / statistics.median(short)
    return (f"a turn on a compacted {size}-message conversation (a summary covers all but its "
            "last turns) against one on a compacted 100-message one: median",
            f"{ms(statistics.median(long))} against {ms(statistics.median(short))}",
            f"ratio {ratio:.2f}; target ≤ 1.5")


async def compaction_cost(turn: Callable, fresh: list[str], history: list[tuple],
                          bot_url: str, server) -> tuple[str, str, str]:
    """On each of `fresh` (60 messages, past Small's window): its first turn, which compacts,
    its second, which sends as much (the summary, what was kept) and does not, and a direct call
    to the bot with what a summary call sends. The first less the other two is compaction's own
    work: planning, the transcript, storing the summary."""
    compacting, plain, summary = [], [], []
    # The prompt as the service fills it for Small (a window of 2,000 tokens, a quarter for the
    # reply), as model_budget makes it.
    budget = server.Budget("Small", 2000, 1500, server.Settings().max_context_chars)
    transcript = "\n\n".join(f"{role}: {content}" for role, content in history[:48])
    summary_query = query(transcript, [fp.ProtocolMessage(role="system",
                                                         content=server.summary_prompt(budget))])
    async with httpx.AsyncClient(timeout=600) as session:
        for conversation_id in fresh:
            took, body = await turn(conversation_id)
            assert "compacted" in body, body
            compacting.append(took)
            took, body = await turn(conversation_id)
            assert "compacted" not in body, body
            plain.append(took)
            started = time.perf_counter()
            await direct_reply(session, bot_url, summary_query)
            summary.append(time.perf_counter() - started)
    c50, p50, s50 = (statistics.median(t) for t in (compacting, plain, summary))
    return ("what compacting adds to a turn beyond its summary call: a turn that compacts, the "
            "next (as much sent, no compaction), the summary call alone (direct): median",
            f"{ms(c50)}; {ms(p50)}; {ms(s50)}", f"adds {ms(c50 - p50 - s50)}; target ≤ 5 ms")


def download(url: str) -> int:
    size = 0
    with httpx.stream("GET", url, timeout=600) as response:
        assert response.status_code == 200
        for data in response.iter_raw(2**20):
            size += len(data)
    return size


def build_history(db_path: str, messages: int, long_conversation: int,
                  documents: int) -> tuple[list[str], str]:
    """A database as a long-used service holds it, written directly (the service's schema,
    its triggers filling the search indexes). Text is drawn from an English-like and a Chinese
    vocabulary, word frequencies following Zipf's law as in real text. Returns the queries."""
    sys.path.insert(0, HERE)
    import server
    server.prepare_database(db_path)
    rng = random.Random(15)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    english = list(dict.fromkeys("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))
                                 for _ in range(6000)))
    common = 0x4E00
    chinese = list(dict.fromkeys("".join(chr(common + rng.randrange(3000))
                                         for _ in range(rng.randint(2, 3)))
                                 for _ in range(6000)))
    words = english + chinese
    rng.shuffle(words)
    weights = list(itertools.accumulate(1 / rank for rank in range(1, len(words) + 1)))

    def text(count: int) -> str:
        return " ".join(rng.choices(words, cum_weights=weights, k=count))

    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    conversations = 1 + (messages - long_conversation) // 100
    db.executemany("INSERT INTO conversations (id, project_id) VALUES (?, NULL)",
                   [("long",)] + [(f"c{i}",) for i in range(1, conversations)])
    db.executemany("INSERT INTO messages (conversation_id, role, content) VALUES (?, ?, ?)",
                   (("long" if i < long_conversation else f"c{1 + i % (conversations - 1)}",
                     "user" if i % 2 == 0 else "assistant", text(rng.randint(5, 40)))
                    for i in range(messages)))
    db.executemany("INSERT INTO projects (name) VALUES (?)", [(f"p{i}",) for i in range(20)])
    db.executemany("INSERT INTO plan_documents (project_id, category_id, filename, content, "
                   "version) VALUES (?, 5, ?, ?, 1)",
                   ((1 + i % 20, f"doc{i}.md", text(rng.randint(50, 300)))
                    for i in range(documents)))
    db.execute("COMMIT")
    db.close()
    english_words, chinese_words = set(english), set(chinese)
    ranked_english = [w for w in words if w in english_words]
    ranked_chinese = [w for w in words if w in chinese_words and len(w) == 3]
    queries = [ranked_english[r] for r in (5, 50, 500, 3000)] + \
              [ranked_chinese[r] for r in (5, 50, 500, 2000)] + \
              [f"{ranked_english[20]} {ranked_english[40]}", f"{ranked_chinese[10]} nowhere",
               ranked_english[0][1:4]]
    # The dearest short query: a rare word, so that the scan runs to its bound.
    short = [w for w in words if w in chinese_words and len(w) == 2][-1]
    return queries, short


def fill_history(db: sqlite3.Connection, conversation_id: str, size: int) -> list[tuple]:
    """Stores `size` messages in a conversation, as a long chat would have them."""
    rng = random.Random(size)
    history = [("user" if i % 2 == 0 else "assistant",
                " ".join(rng.choice(("poe", "proxy", "memory", "sqlite", "stream", "turn"))
                         for _ in range(30)))
               for i in range(size)]
    with db:
        db.executemany("INSERT INTO messages (conversation_id, role, content) VALUES (?, ?, ?)",
                       [(conversation_id, role, content) for role, content in history])
    return history


async def requests_per_second(url: str, seconds: float, concurrency: int = 20) -> float:
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.post("/v1/chat/conversations", json={"name": "bench"})
                assert response.status_code == 200
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="a small version, in seconds")
    sizes.add_argument("--smoke", action="store_true",
                       help="every row of --quick at its smallest, for the test suite: proves "
                            "each measurement runs and its checks hold; the figures mean nothing")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    started = time.perf_counter()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    with tempfile.TemporaryDirectory() as workdir:
        try:
            rows = run(bench(mode, workdir))
        finally:
            Process.stop_all()
    note = f" ({SMOKE_NOTE})" if mode == "smoke" else ""
    print(f"| measurement{note} | figures | service vs direct |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
