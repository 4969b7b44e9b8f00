"""A counting pass-through in front of the test S3 server, on 127.0.0.1: which requests reached S3.

Requests are forwarded unchanged (the Host header too, so SigV4 signatures still verify) and each one is
recorded as (method, path). Tests point AWS_ENDPOINT_URL_S3 at `endpoint` to see, for example, that
several processes on one node fetch each object once.
"""

import http.client
import http.server
import threading
import urllib.parse


class CountingProxy:
    def __init__(self, upstream):
        self.upstream = urllib.parse.urlparse(upstream)
        self.requests = []
        self.queries = []  # (method, path, query string)
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    path, _, query = self.path.partition("?")
                    proxy.requests.append((self.command, urllib.parse.unquote(path)))
                    proxy.queries.append((self.command, urllib.parse.unquote(path), query))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    reply = conn.getresponse()
                    data = reply.read()
                finally:
                    conn.close()
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD reply has no body but the object's length (what boto3 reports as its size).
                length = reply.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def gets(self, prefix):
        """{path: number of GETs} of the objects under a /bucket/key prefix."""
        counts = {}
        for method, path in self.requests:
            if method == "GET" and path.startswith(prefix) and not path.endswith("/"):
                counts[path] = counts.get(path, 0) + 1
        return counts

    def listings(self):
        """The bucket listings (ListObjectsV2 pages) that reached S3."""
        return [(path, query) for method, path, query in self.queries if method == "GET" and "list-type" in query]
