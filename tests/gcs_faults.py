"""A fault-injecting HTTP proxy in front of the GCS emulator, as GCS under load behaves.

    python gcs_faults.py PORT UPSTREAM_URL SEED LOG

Seeded: a fraction of requests is answered 503 or 429 without reaching storage, some are
stalled for seconds before they are forwarded, and some uploads are cut mid-object (the
connection closed after part of the body). Every injected fault is appended to LOG as one
JSON line, so a test can count what the clients survived.
"""

import http.client
import http.server
import json
import random
import socketserver
import sys
import threading
import time
import urllib.parse

RATES = {"503": 0.06, "429": 0.06, "stall": 0.02, "cut": 0.05}
STALL_S = 3.0


class Faults:
    def __init__(self, seed: int, log: str):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.log = log
        self.requests = 0

    def draw(self, method: str, length: int) -> str | None:
        with self.lock:
            self.requests += 1
            if self.requests <= 3:  # let the clients start
                return None
            x = self.rng.random()
        edge = 0.0
        for name, rate in RATES.items():
            edge += rate
            if x < edge:
                if name == "cut" and (method not in ("POST", "PUT") or length < 64):
                    return None
                return name
        return None

    def record(self, name: str, method: str, path: str) -> None:
        with self.lock, open(self.log, "a") as f:
            f.write(json.dumps({"fault": name, "method": method, "path": path[:120]}) + "\n")


def handler(upstream: str, faults: Faults):
    target = urllib.parse.urlsplit(upstream)

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _body(self, cut: bool) -> bytes | None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if cut:
                        return None
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            if cut:
                self.rfile.read(length // 2)
                return None
            return self.rfile.read(length) if length else b""

        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            fault = faults.draw(self.command, length)
            if fault:
                faults.record(fault, self.command, self.path)
            if fault == "cut":
                self._body(cut=True)
                self.close_connection = True
                self.connection.close()
                return
            body = self._body(cut=False)
            if fault in ("503", "429"):
                message = b'{"error": {"code": %s, "message": "injected"}}' % fault.encode()
                self.send_response(int(fault))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(message)))
                if fault == "429":
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(message)
                return
            if fault == "stall":
                time.sleep(STALL_S)
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "transfer-encoding", "content-length")}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    return Proxy


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


if __name__ == "__main__":
    port, upstream, seed, log = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    Server(("127.0.0.1", port), handler(upstream, Faults(seed, log))).serve_forever()
