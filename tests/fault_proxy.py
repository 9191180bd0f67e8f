"""A real HTTP proxy in front of a real server that answers chosen requests with an error instead
of forwarding them: a registry that fails in the middle of a gate, reproducibly. No pytest in here."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultRule:
    """Fail requests whose method is `method` and whose path contains one of `paths`: skip the first
    `after` of them, then fail `times` of them (None: all). `failed` counts what was answered 503."""

    def __init__(self, paths: tuple[str, ...], method: str = "GET", after: int = 0, times: int | None = None):
        self.paths, self.method, self.after, self.times = paths, method, after, times
        self.seen = self.failed = 0
        self._lock = threading.Lock()

    def should_fail(self, method: str, path: str) -> bool:
        if method != self.method or not any(p in path for p in self.paths):
            return False
        with self._lock:
            self.seen += 1
            if self.seen <= self.after or (self.times is not None and self.failed >= self.times):
                return False
            self.failed += 1
            return True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    rules: list

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while size := int(self.rfile.readline().strip() or b"0", 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return out
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else None

    def _handle(self):
        body = self._body()
        if any(r.should_fail(self.command, self.path) for r in type(self).rules):
            payload = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected by the fault proxy"}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*type(self).upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "content-length"}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, *args):
        pass


@contextmanager
def fault_proxy(upstream_url: str):
    """Yields (proxy_url, rules): append FaultRule objects to `rules` to inject errors."""
    parts = urlsplit(upstream_url)
    rules: list[FaultRule] = []
    handler = type("Handler", (_Handler,), {"upstream": (parts.hostname, parts.port), "rules": rules})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", rules
    finally:
        server.shutdown()
        server.server_close()
