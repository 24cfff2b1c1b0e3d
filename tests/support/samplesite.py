"""A loopback HTTP server that serves given bytes and scripted faults.

The demo serves its sample images from it and the tests use it for real HTTP failures: status
codes, slow answers, bodies that trickle, stop short of their Content-Length, or fail a few
times before succeeding. It counts what it saw: hits per path, requests in flight at once,
and bodies the client hung up on. It binds a loopback address only (127.0.0.1 by default; any
127.x.y.z works on Linux, which gives tests and benchmarks several distinct hosts).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from support.loopback import LoopbackServer


@dataclass
class Route:
    body: bytes = b""
    content_type: str = "application/octet-stream"
    status: int = 200
    delay_s: float = 0.0  # before the status line
    trickle_s: float = 0.0  # between 1 KiB pieces of the body
    declared_length: int | None = None  # a Content-Length that differs from the body
    fail_first: int = 0  # answer `fail_status` this many times first
    fail_status: int = 503
    fail_headers: dict[str, str] | None = None  # e.g. {"Retry-After": "1"}
    chunked: bool = False  # no Content-Length: the size is known only by reading
    headers: dict[str, str] | None = None
    # The whole answer as bytes on the wire (status line, headers, body), then a hang-up:
    # for answers the standard library would refuse to send (raw bytes in headers, bad
    # framing, no HTTP at all). `b""` hangs up without a word.
    raw: bytes | None = None
    hold: threading.Event | None = None  # answer only once this is set (the test sets it)


class SampleSite(LoopbackServer):
    """`with SampleSite(routes) as site:` serves `routes[path]` at `site.url(path)`."""

    def __init__(self, routes: dict[str, Route], port: int = 0, host: str = "127.0.0.1") -> None:
        self.routes = routes
        self.hits: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.hung_up: set[str] = set()  # paths whose body the client stopped reading
        self._lock = threading.Lock()
        super().__init__(self._handler_class(), host, port)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def _count(self, path: str) -> int:
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.hits[path]

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # small writes must not wait for delayed ACKs

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].lstrip("/")
                hit = site._count(path)
                try:
                    self._serve(path, hit)
                finally:
                    site._done()

            def _serve(self, path: str, hit: int) -> None:
                route = site.routes.get(path)
                if route is None:
                    return self._answer(404, b"not found", "text/plain")
                if route.hold is not None:
                    route.hold.wait()
                if route.delay_s:
                    time.sleep(route.delay_s)
                if route.raw is not None:
                    self.wfile.write(route.raw)
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                if hit <= route.fail_first:
                    return self._answer(
                        route.fail_status, b"try again", "text/plain", route.fail_headers
                    )
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                for name, value in (route.headers or {}).items():
                    self.send_header(name, value)
                if route.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    length = route.declared_length
                    self.send_header(
                        "Content-Length", str(len(route.body) if length is None else length)
                    )
                if route.declared_length is not None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                piece = 1024 if route.trickle_s else max(len(route.body), 1)
                try:
                    for start in range(0, len(route.body), piece):
                        self._send(route.body[start : start + piece], route.chunked)
                        if route.trickle_s:
                            time.sleep(route.trickle_s)
                    if route.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    site.hung_up.add(path)
                    self.close_connection = True

            def _send(self, piece: bytes, chunked: bool) -> None:
                if chunked:
                    piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
                self.wfile.write(piece)
                self.wfile.flush()

            def _answer(
                self,
                status: int,
                body: bytes,
                content_type: str,
                headers: dict[str, str] | None = None,
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
