"""The node scenarios' app: an HTTP server the tests steer through files, and a client (standard library only).

Server (the image's entrypoint, no arguments): listens on $PORT (8080). ``GET /healthz`` answers 200, or 503 while
/tmp/unhealthy exists, and the gRPC health service on $GRPC_PORT (8081) answers SERVING, or NOT_SERVING while
/tmp/unhealthy exists; any other path answers 200 with JSON naming the pod, the path and the request headers.
While /tmp/dead exists the server closes its listening socket and the process idles: a dead app behind a live
process, as a liveness probe must catch.

Client: ``app.py get URL`` prints the status and body and exits 0 on a 2xx answer, 1 otherwise (2 when no
connection could be made). An ``https`` URL is called as a pod calls the API server: verified with the
ServiceAccount's CA, with its token.
"""

import json
import os
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            status, body = (503, b"unhealthy\n") if os.path.exists("/tmp/unhealthy") else (200, b"ok\n")
        else:
            status = 200
            body = json.dumps({"pod": socket.gethostname(), "path": self.path,
                               "headers": dict(self.headers.items())}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def serve_grpc_health() -> Any:
    """grpc.health.v1.Health/Check, whatever the service asked about, without generated code: the answer is a
    HealthCheckResponse whose only field, status (1), is SERVING (1) or NOT_SERVING (2)."""
    from concurrent import futures

    import grpc

    def check(request: bytes, context: object) -> bytes:
        return b"\x08\x02" if os.path.exists("/tmp/unhealthy") else b"\x08\x01"

    method = grpc.unary_unary_rpc_method_handler(check)  # no (de)serializers: the bytes as they are
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health",
                                                                         {"Check": method}),))
    server.add_insecure_port(f"[::]:{os.environ.get('GRPC_PORT', '8081')}")
    server.start()
    return server  # the caller keeps it: a grpc.Server stops when it is garbage-collected


def serve() -> None:
    server = ThreadingHTTPServer(("", int(os.environ.get("PORT", "8080"))), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    health = serve_grpc_health()
    while not os.path.exists("/tmp/dead"):
        time.sleep(0.2)
    server.shutdown()
    server.server_close()
    health.stop(None)
    print("dead: not listening any more", flush=True)
    while True:
        time.sleep(3600)


ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def get(url: str) -> int:
    request = urllib.request.Request(url)
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")
        with open(f"{ACCOUNT}/token") as token:
            request.add_header("Authorization", f"Bearer {token.read().strip()}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            print(answer.status, answer.read().decode(errors="replace"))
            return 0
    except urllib.error.HTTPError as error:
        print(error.code, error.read().decode(errors="replace"))
        return 1
    except OSError as error:
        print(f"error: {error}")
        return 2


if __name__ == "__main__":
    if sys.argv[1:2] == ["get"]:
        sys.exit(get(sys.argv[2]))
    serve()
