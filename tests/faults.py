"""A store that fails: an HTTP proxy in front of the local S3 server that fails some requests as real
stores do (503 SlowDown, 500 InternalError, a connection reset), counting what it saw."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ANSWERS = {
    503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    500: b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FlakyProxy:
    """Forwards to `upstream` (http://host:port), answering as a store that is unavailable now and then:
    every `every`-th request starts an outage of `outage_s` in which every request fails, cycling through
    503 SlowDown, 500 and a connection reset (a client that gives up after 3 quick tries does not live
    through one). `failed / requests` is the share that failed."""

    def __init__(self, upstream: str, every: int = 40, outage_s: float = 1.0) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.every, self.outage_s, self.lock = every, outage_s, threading.Lock()
        self.requests = self.failed = 0
        self.seen: list[tuple[str, str]] = []  # (method, path with query) of every request, in order
        self.outage_until = 0.0
        self.failing = True
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def handle_one(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.requests += 1
                    proxy.seen.append((self.command, self.path))
                    now = time.monotonic()
                    if proxy.failing and proxy.requests % proxy.every == 0:
                        proxy.outage_until = now + proxy.outage_s
                    fail = now < proxy.outage_until
                    mode = proxy.failed % 3 if fail else None
                    proxy.failed += fail
                if mode == 2:  # a connection reset: no answer at all
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if mode is not None:
                    status = (503, 500)[mode]
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ANSWERS[status])))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(ANSWERS[status])
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else
                                                       answer.getheader("Content-Length") or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
