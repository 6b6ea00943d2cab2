"""A scripted HTTP server on 127.0.0.1 and a fake clock for the transport tests.

The server plays a list of replies in order (the last one repeats) and records every hit, so a
test can assert how many attempts reached it, when, and with which headers.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tower_aoai

#: Bounds every wait in the server so a broken test cannot hang.
GATE_TIMEOUT = 5.0


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: When set, the body is sent chunked, one element per chunk, and between the first and the
    #: second chunk the server waits for `gate` (so a test can see that chunk 1 arrived alone).
    chunks: list[bytes] | None = None
    gate: threading.Event | None = None
    #: Seconds to wait before answering (to provoke client timeouts).
    delay: float = 0.0
    #: When set, the server holds the answer until this is set, watching the connection: a
    #: client that drops it is recorded (`ScriptedServer.dropped`) and gets no answer.
    hold: threading.Event | None = None


@dataclass
class Hit:
    at: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def chat_completion(content: str = "hello") -> Reply:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    return Reply(200, {"content-type": "application/json"}, json.dumps(body).encode())


def sse_stream(words: list[str], gate: threading.Event | None = None) -> Reply:
    chunks = []
    for i, word in enumerate(words):
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": word} if i else {"role": "assistant", "content": word},
                    "finish_reason": None,
                }
            ],
        }
        chunks.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return Reply(200, {"content-type": "text/event-stream"}, chunks=chunks, gate=gate)


QUOTA_MESSAGE = (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
    "have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after "
    "6 seconds."
)


def throttle(message: str = QUOTA_MESSAGE, **headers: str) -> Reply:
    """A 429 with Azure's error body; header names use `_` for `-`."""
    body = json.dumps({"error": {"code": "429", "message": message}}).encode()
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    hdrs["content-type"] = "application/json"
    return Reply(429, hdrs, body)


def blocked(**headers: str) -> Reply:
    """A 403 "temporarily blocked"; header names use `_` for `-`."""
    body = {
        "error": {
            "code": "Forbidden",
            "message": "Your resource has been temporarily blocked because we detected unusual behavior.",
        }
    }
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    hdrs["content-type"] = "application/json"
    return Reply(403, hdrs, json.dumps(body).encode())


def server_error(body: bytes = b'{"error":{"code":"InternalServerError","message":"oops"}}') -> Reply:
    return Reply(500, {"content-type": "application/json"}, body)


def tiered(east: ScriptedServer, west: ScriptedServer) -> list[tower_aoai.Backend]:
    """Two backends for the hedging tests. East is the primary (tier 0): every first attempt goes
    there; west only takes hedges."""
    return [
        tower_aoai.Backend("east", east.url, deployment="d-east", api_key="east-key", tier=0),
        tower_aoai.Backend("west", west.url, deployment="d-west", api_key="west-key", tier=1),
    ]


def slow(content: str, delay: float = 0.0, hold: threading.Event | None = None) -> Reply:
    """A success that comes `delay` s late, or not before `hold` is set."""
    return dataclasses.replace(chat_completion(content), delay=delay, hold=hold)


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


class ScriptedServer:
    """Plays `script` (the last reply repeats) and records hits."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.script: list[Reply] = [chat_completion()]
        self.hits: list[Hit] = []
        self.stream_finished = threading.Event()
        #: Set when a request arrives (a test can wait for "the request is at the server").
        self.hit = threading.Event()
        #: Requests being answered now, and the most at once since `play`.
        self.in_flight = 0
        self.max_in_flight = 0
        #: Requests whose answer is not fully written yet (a stream counts until its last chunk),
        #: and the most at once since `play`.
        self.open = 0
        self.max_open = 0
        #: When the last chunk of the latest stream started to be written (monotonic).
        self.last_chunk_at: float | None = None
        #: Set when a client drops the connection of a held request.
        self.dropped = threading.Event()
        self._generation = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://{host}:{self._httpd.server_port}"

    def play(self, *replies: Reply) -> None:
        with self._lock:
            self.script = list(replies)
            self.hits = []
            # Requests of an earlier script (a reply still delayed) are not counted.
            self._generation += 1
            self.in_flight = 0
            self.max_in_flight = 0
            self.open = 0
            self.max_open = 0
            self.last_chunk_at = None
        self.stream_finished.clear()
        self.hit.clear()
        self.dropped.clear()

    def waits(self) -> list[float]:
        """Seconds between consecutive hits, as the server saw them."""
        return [b.at - a.at for a, b in zip(self.hits, self.hits[1:])]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, hit: Hit) -> tuple[Reply, int]:
        with self._lock:
            index = len(self.hits)
            self.hits.append(hit)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.open += 1
            self.max_open = max(self.max_open, self.open)
            reply = self.script[min(index, len(self.script) - 1)]
            generation = self._generation
        self.hit.set()
        return reply, generation

    def _done(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self.in_flight -= 1

    def _closed(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self.open -= 1

    def _hold(self, connection: socket.socket, hold: threading.Event) -> bool:
        """Waits for `hold`; `False` if the client dropped the connection first."""
        deadline = time.monotonic() + GATE_TIMEOUT
        while not hold.wait(0.005) and time.monotonic() < deadline:
            readable, _, _ = select.select([connection], [], [], 0)
            if readable and connection.recv(1, socket.MSG_PEEK) == b"":
                return False
        return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                hit = Hit(time.monotonic(), self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                reply, generation = server._next(hit)
                try:
                    self._answer(reply, generation)
                finally:
                    server._closed(generation)

            def _answer(self, reply: Reply, generation: int) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.hold is not None and not server._hold(self.connection, reply.hold):
                    server._done(generation)
                    server.dropped.set()
                    self.close_connection = True
                    return
                # In flight until the answer starts: a client can only react to it after this.
                server._done(generation)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if reply.chunks is None:
                        self.send_header("content-length", str(len(reply.body)))
                        self.end_headers()
                        self.wfile.write(reply.body)
                        self.wfile.flush()
                        return
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for i, chunk in enumerate(reply.chunks):
                        if i == 1 and reply.gate is not None:
                            reply.gate.wait(GATE_TIMEOUT)
                        if i == len(reply.chunks) - 1:
                            server.last_chunk_at = time.monotonic()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    server.stream_finished.set()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = _serve
            do_POST = _serve

        return Handler


class FakeSleep:
    """Records the waits a transport asks for instead of sleeping (a fake clock)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class AsyncFakeSleep(FakeSleep):
    async def __call__(self, seconds: float) -> None:  # type: ignore[override]
        self.waits.append(seconds)


@pytest.fixture(scope="session")
def _server() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture
def server(_server: ScriptedServer) -> ScriptedServer:
    _server.play(chat_completion())
    return _server


@pytest.fixture(scope="session")
def _other_servers() -> Iterator[tuple[ScriptedServer, ScriptedServer]]:
    # Other loopback addresses: another host is another Azure resource to the router.
    servers = (ScriptedServer("127.0.0.2"), ScriptedServer("127.0.0.3"))
    yield servers
    for s in servers:
        s.close()


@pytest.fixture
def east(_other_servers: tuple[ScriptedServer, ScriptedServer]) -> ScriptedServer:
    """A second resource (host 127.0.0.2), answering success until told otherwise."""
    _other_servers[0].play(chat_completion("from east"))
    return _other_servers[0]


@pytest.fixture
def west(_other_servers: tuple[ScriptedServer, ScriptedServer]) -> ScriptedServer:
    """A third resource (host 127.0.0.3), answering success until told otherwise."""
    _other_servers[1].play(chat_completion("from west"))
    return _other_servers[1]


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def async_sleep() -> AsyncFakeSleep:
    return AsyncFakeSleep()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class QueueLog(logging.Handler):
    """Counts the transport's "queueing for a permit" debug lines: a test waits on it to know
    that a call is in the permit queue, without sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if "queueing for a permit" in record.getMessage():
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    def wait_for(self, n: int, timeout: float = GATE_TIMEOUT) -> bool:
        """Whether `n` calls queued within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= n, timeout)


@pytest.fixture
def queue_log() -> Iterator[QueueLog]:
    handler = QueueLog()
    logger = logging.getLogger("tower_aoai")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
