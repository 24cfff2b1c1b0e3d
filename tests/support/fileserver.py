"""A loopback HTTP file server the way object stores and the Hugging Face Hub serve parquet:
HEAD with Content-Length and a strong ETag (the content's hash), GET with byte ranges. It
records every request, so tests can tell which reads touched the bytes."""

from __future__ import annotations

import hashlib
import re
from http.server import BaseHTTPRequestHandler

from support.loopback import LoopbackServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FileServer(LoopbackServer):
    """Serves `files` (path -> bytes; change it to change a file in place)."""

    def __init__(self, files: dict[str, bytes], host: str = "127.0.0.1") -> None:
        self.files = files
        self.requests: list[tuple[str, str]] = []  # (method, path)
        super().__init__(self._handler_class(), host, 0)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path}"

    def reads(self) -> int:
        """GET requests so far (a GET carries file bytes; a HEAD does not)."""
        return sum(method == "GET" for method, _ in self.requests)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = self.path.lstrip("/")
                server.requests.append((self.command, path))
                data = server.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = 0, len(data)
                wanted = _RANGE.match(self.headers.get("Range", ""))
                if wanted:
                    start = int(wanted[1])
                    end = min(int(wanted[2]) + 1 if wanted[2] else len(data), len(data))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()[:32]}"')
                self.end_headers()
                if body:
                    self.wfile.write(data[start:end])

        return Handler
