"""A loopback OpenAI-compatible chat server: scripted replies, scripted faults, or a model.

Answers `POST /v1/chat/completions` in OpenAI's JSON shape. The reply comes from a function
of the messages (tests), or from a local model folder through `TransformersRewriter` (the
demo and the benchmark: a real, if tiny, model server). With a model, concurrent requests are
gathered into batches of up to `batch_size` for one `generate`, as vLLM and TGI do; the
server's own `max_new_tokens` applies and the requests' sampling fields are ignored (greedy).

Faults for tests: `fault(n, body)` is asked about the n-th request (1-based) and may return a
`Fault`: sleep first (past a client's timeout, say), then answer an error status with headers
such as Retry-After, or a body of its own: a JSON value (one with no choices, say) or raw
bytes (an HTML page, invalid UTF-8, 30 MB), trickled a piece at a time or sent chunked, or a
whole raw HTTP answer written to the socket as is (a broken status line, garbage chunking). It
counts requests and the most in flight at once, and keeps each body.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType

from support.loopback import LoopbackServer

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Fault:
    sleep_s: float = 0.0  # before answering
    status: int | None = None  # None: answer normally after the sleep (or `body`, with 200)
    headers: dict[str, str] | None = None  # e.g. {"Retry-After": "1"}
    body: object = None  # a JSON value answered instead of an error or a completion
    raw: bytes | None = None  # bytes answered as the body instead (not JSON-encoded)
    content_type: str = "application/json"  # of `raw`
    piece_bytes: int = 0  # send the body in pieces of this size ...
    piece_sleep_s: float = 0.0  # ... this far apart (a trickle)
    chunked: bool = False  # Transfer-Encoding: chunked instead of Content-Length
    wire: bytes | None = None  # a whole HTTP answer written as is; the connection then closes


FaultHook = Callable[[int, dict], Fault | None]


def first_requests(count: int, fault: Fault) -> FaultHook:
    """A hook that answers the first `count` requests with `fault`, the rest normally."""
    return lambda number, body: fault if number <= count else None


@dataclass
class _Pending:
    messages: Messages
    done: threading.Event
    reply: str | BaseException | None = None
    tokens: int = 0


class ChatServer(LoopbackServer):
    """`with ChatServer(reply) as server:` serves at `server.base_url` (ends in /v1)."""

    def __init__(
        self,
        reply: Callable[[Messages], str] | None = None,
        *,
        model_dir: Path | None = None,
        fault: FaultHook | None = None,
        max_new_tokens: int = 48,
        batch_size: int = 8,
        batch_wait_s: float = 0.005,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        if (reply is None) == (model_dir is None):
            raise ValueError("give the server either a reply function or a model_dir")
        self.reply = reply
        self.fault = fault
        self.model_name = Path(model_dir).name if model_dir else "scripted"
        self.count = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[dict] = []
        self.authorizations: list[str] = []  # each request's Authorization header
        self.batch_sizes: list[int] = []  # with a model: conversations per generate
        self._lock = threading.Lock()
        self._rewriter = None
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._worker: threading.Thread | None = None
        if model_dir is not None:
            from facecaption.caption.rewriters.in_process import TransformersRewriter

            self._rewriter = TransformersRewriter(
                Path(model_dir),
                system_prompt="",
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                top_p=1.0,
                seed=0,
                batch_size=batch_size,
            )
            self._worker = threading.Thread(target=self._serve_batches, daemon=True)
        super().__init__(self._handler_class(), host, port)

    @property
    def base_url(self) -> str:
        """The API root, as the openai backend's `base_url` setting takes it."""
        return f"http://{self.host}:{self.port}/v1"

    url = base_url

    def __enter__(self) -> ChatServer:
        if self._worker is not None:
            self._worker.start()
        return super().__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc, traceback)
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()

    # -- answers ------------------------------------------------------------------------

    def answer(self, messages: Messages) -> tuple[str, int]:
        """The reply to one conversation and its length in tokens (words when scripted)."""
        if self.reply is not None:
            text = self.reply(messages)
            return text, len(text.split())
        pending = _Pending(messages, threading.Event())
        self._queue.put(pending)
        pending.done.wait()
        if isinstance(pending.reply, BaseException):
            raise pending.reply
        return str(pending.reply), pending.tokens

    def _serve_batches(self) -> None:
        """The model's one thread: up to batch_size conversations per generate. It waits
        `batch_wait_s` for more only while other requests are in the house: a lone client
        pays no batching delay."""
        while (first := self._queue.get()) is not None:
            batch = [first]
            wait_s = self._batch_wait_s if self.in_flight > 1 else 0.0
            deadline = time.monotonic() + wait_s
            while len(batch) < self._batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            self.batch_sizes.append(len(batch))
            try:
                replies = self._rewriter.complete([p.messages for p in batch])
                counts = self._rewriter.last_token_counts
            except Exception as error:  # handed to each waiting request: a 500 each
                replies, counts = [error] * len(batch), [0] * len(batch)
            for pending, reply, tokens in zip(batch, replies, counts, strict=True):
                pending.reply, pending.tokens = reply, tokens
                pending.done.set()

    def _enter(self, body: dict, authorization: str) -> int:
        with self._lock:
            self.count += 1
            self.requests.append(body)
            self.authorizations.append(authorization)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.count

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.split("?", 1)[0] not in CHAT_PATHS:
                    return self._json(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    body = json.loads(raw)
                    messages = body["messages"]
                except (ValueError, KeyError, TypeError):
                    return self._json(400, {"error": {"message": "expected JSON with messages"}})
                number = server._enter(body, self.headers.get("Authorization", ""))
                try:
                    self._complete(number, body, messages)
                finally:
                    server._leave()

            def _complete(self, number: int, body: dict, messages: Messages) -> None:
                fault = server.fault(number, body) if server.fault else None
                if fault is not None:
                    time.sleep(fault.sleep_s)
                    if fault.wire is not None:
                        self.close_connection = True
                        return self._write(fault.wire)
                    if fault.raw is not None or fault.body is not None:
                        data = fault.raw if fault.raw is not None else json.dumps(fault.body)
                        data = data if isinstance(data, bytes) else data.encode()
                        return self._send(fault.status or 200, data, fault)
                    if fault.status is not None:
                        error = {"error": {"message": f"scripted fault {fault.status}"}}
                        return self._json(fault.status, error, fault.headers)
                try:
                    text, tokens = server.answer(messages)
                except Exception as error:  # the client sees a 500, as from a real server
                    return self._json(500, {"error": {"message": repr(error)}})
                self._json(
                    200,
                    {
                        "id": f"chatcmpl-{uuid.uuid4().hex}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model") or server.model_name,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"completion_tokens": tokens},
                    },
                )

            def _send(self, status: int, data: bytes, fault: Fault) -> None:
                """A scripted body: whole, trickled in pieces, and/or chunked."""
                self.send_response(status)
                self.send_header("Content-Type", fault.content_type)
                for name, value in (fault.headers or {}).items():
                    self.send_header(name, value)
                if fault.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                piece = fault.piece_bytes or max(len(data), 1)
                for start in range(0, len(data), piece):
                    chunk = data[start : start + piece]
                    if fault.chunked:
                        chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                    if not self._write(chunk):
                        return
                    time.sleep(fault.piece_sleep_s)
                if fault.chunked:
                    self._write(b"0\r\n\r\n")

            def _write(self, data: bytes) -> bool:
                """Write and flush; False once the client has hung up (a cap, a deadline)."""
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return False
                return True

            def _json(
                self, status: int, payload: dict, headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
