"""The floor: a raw ASGI handler that parses the review and answers allowed, behind the same uvicorn and TLS.

meshguard's throughput is reported as a ratio of this one's, measured in the same run, so the number says how
much the admission logic costs on top of what any Python webhook must pay (TLS, HTTP parsing, JSON).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from webhook.config import TLSSettings
from webhook.tls import CertificateReloader


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    review = orjson.loads(body)
    answer = orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "response": {"uid": review["request"]["uid"], "allowed": True}})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    reloader = CertificateReloader(TLSSettings(cert_dir=args.cert_dir))
    # The same uvicorn settings as meshguard's admission listener (webhook.server), so only the app differs.
    uvicorn.run(app, host="127.0.0.1", port=args.port, lifespan="off", access_log=False, log_level="warning",
                server_header=False, proxy_headers=False,
                ssl_context_factory=lambda _config, _default: reloader.context)


if __name__ == "__main__":
    main()
