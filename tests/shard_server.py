"""A loopback HTTP server for the download tests and scripts/bench_download.py: serves parquet shards
from a folder (URL path = file path under it), at a capped rate per connection if asked (as a CDN
serves one connection), and misbehaves on request, the way real mirrors do."""
import http.server
import os
import threading
import time


class ShardServer:
    """faults: {path: [action, ...]} consumed one per request of that path, then normal service.
    Actions: "drop" (announce the whole file, send half, close), "500", "404", "garbage" (bytes that
    are not parquet), "truncate" (the first half, announced as the whole answer). delay: seconds per
    request (a slow mirror). rate: bytes/s per connection (0: as fast as it goes). requests: (path,
    whether it was a Range probe) in arrival order."""

    def __init__(self, root, faults=None, delay=0.0, rate=0.0):
        self.root, self.faults, self.delay = root, {k: list(v) for k, v in (faults or {}).items()}, delay
        self.rate = rate
        self.requests, self.lock = [], threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    self.serve()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up (a probe reads 4 bytes and closes)

            def serve(self):
                path = self.path.lstrip("/")
                with server.lock:
                    server.requests.append((path, "Range" in self.headers))
                    action = server.faults[path].pop(0) if server.faults.get(path) else None
                time.sleep(server.delay)
                file = os.path.join(server.root, path)
                if action == "404" or not os.path.isfile(file):
                    return self.send_error(404)
                if action == "500":
                    return self.send_error(500)
                data = open(file, "rb").read()
                if action == "garbage":
                    data = b"<html>this is not parquet</html>" * 20
                elif action == "truncate":
                    data = data[:len(data) // 2]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if action == "drop":
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # mid-response, as a reset connection does
                    return
                if not server.rate:
                    return self.wfile.write(data)
                t0, chunk = time.time(), 1 << 16
                for i in range(0, len(data), chunk):
                    self.wfile.write(data[i:i + chunk])
                    ahead = (i + chunk) / server.rate - (time.time() - t0)
                    if ahead > 0:
                        time.sleep(ahead)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def full_gets(self):
        """Paths fetched for real (not the reachability probes), in order."""
        with self.lock:
            return [p for p, probe in self.requests if not probe]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
