"""Tiny echo upstream standing in for the protected application in e2e tests.

Run as::

    python tools/echo_upstream.py --port 8000 [--host 127.0.0.1] [--log FILE]

Every request, whatever the method or path, gets ``200`` with a JSON body::

    {"method": "GET", "path": "/raw/target?x=1",
     "headers": {"authorization": ["Bearer a", "Bearer b"], ...}}

Header names are lower-cased and every value is kept, in order, as a list, so
tests can see repeated headers exactly as Envoy forwarded them.

With ``--log FILE`` one JSON line per request (the same object plus
``body_len``, ``body`` (UTF-8, undecodable bytes replaced) and ``ts``) is
appended to FILE *before* the response is sent, so once a client has its
response the line is already on disk; tests use it to assert what reached the
app, or that nothing did.

Stdlib only, so it runs under any Python without the venv.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 16 * 1024 * 1024  # bounded read; tests never send more


class _Handler(BaseHTTPRequestHandler):
    server_version = "e2e-echo-upstream/1"
    protocol_version = "HTTP/1.1"  # keep-alive with Envoy's connection pool
    # The head and the body are two writes: without TCP_NODELAY the body waits for the head's
    # delayed ACK (~40 ms a response on a kept-alive connection).
    disable_nagle_algorithm = True

    # Set by main().
    log_path: str | None = None
    log_lock = threading.Lock()

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler dispatches to do_<METHOD>; answer every method.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            total = 0
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers until the empty line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after the chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _raw_target(self) -> str:
        # The request target exactly as received. (self.path is not: since
        # Python 3.11.x http.server collapses a leading "//" to "/", which
        # would hide exactly what the tests want to see.)
        parts = self.requestline.split(" ")
        return parts[1] if len(parts) == 3 else self.path

    def _handle(self) -> None:
        body = self._read_body()
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        echo = {"method": self.command, "path": self._raw_target(), "headers": headers}

        if self.log_path:
            record = dict(echo)
            record["body_len"] = len(body)
            record["body"] = body.decode("utf-8", "replace")
            record["ts"] = time.time()
            line = json.dumps(record, sort_keys=True) + "\n"
            with self.log_lock, open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()

        payload = json.dumps(echo).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, fmt: str, *args) -> None:  # noqa: D401 - stdlib API
        sys.stderr.write("upstream: " + (fmt % args) + "\n")
        sys.stderr.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log", default=None, help="append one JSON line per request here")
    args = parser.parse_args(argv)

    _Handler.log_path = args.log
    if args.log:
        open(args.log, "a").close()  # exists (empty) as soon as we are up

    server = _Server((args.host, args.port), _Handler)
    print(f"upstream listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
