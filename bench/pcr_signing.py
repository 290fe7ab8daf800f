"""Pod certificates signed per second by one meshguard replica, against a real kube-apiserver. A benchmark, not a
test.

    .venv/bin/python -m bench.pcr_signing [--requests 1000] [--concurrency 8]

It starts the end-to-end harness's control plane (etcd, kube-apiserver, kube-controller-manager on loopback),
binds ``--requests`` pods to a Node object (no kubelet runs: the pods stay Pending, as a pod does until its
certificate is issued) and creates one PodCertificateRequest per pod for meshguard's signer, each with a fresh
P-256 key, as the kubelet would. Then one signer (meshguard's own code, in this process, with the mesh CA in its
Secret) starts and answers them. Two phases:

* ``backlog``: every request exists before the signer starts (a replica starting, or a cluster-wide restart):
  from the signer's start to the last ``Issued`` status;
* ``live``: requests created while the signer runs, ``--concurrency`` at a time: from the first creation to the
  last ``Issued`` status (the watch path), which includes creating them.

Reported: requests per second and seconds for all of them, per phase, and the CPU milliseconds per request of
this process (the signer) and of the API server. Everything shares this machine's cores. Results also go to
``bench/results/pcr-signing-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.run import _cpu_seconds, add_result_arguments, save_result
from tests.e2e.cluster import ControlPlane, binaries, wait_for
from webhook import kubejson
from webhook.errors import KubeError
from webhook.identity.controller import MeshAuthority, Signer
from webhook.identity.settings import IdentitySettings
from webhook.state.kube import api_client

NODE = "bench-node"
NAMESPACE = "pcr-bench"
SETTINGS = IdentitySettings()


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode()


def _create(client: Any, path: str, bodies: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(concurrency) as pool:
        return [r for r in pool.map(lambda body: kubejson.call(client, "POST", path, body), bodies) if r]


def _pods(client: Any, prefix: str, count: int, concurrency: int) -> list[dict[str, Any]]:
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{prefix}-{i}"},
             "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1"}]}} for i in range(count)]
    return _create(client, f"/api/v1/namespaces/{NAMESPACE}/pods", pods, concurrency)


def _requests(pods: list[dict[str, Any]], node_uid: str, account_uid: str) -> list[dict[str, Any]]:
    return [{"apiVersion": "certificates.k8s.io/v1", "kind": "PodCertificateRequest",
             "metadata": {"name": pod["metadata"]["name"]},
             "spec": {"signerName": SETTINGS.signer_name, "podName": pod["metadata"]["name"],
                      "podUID": pod["metadata"]["uid"], "serviceAccountName": "default",
                      "serviceAccountUID": account_uid, "nodeName": NODE, "nodeUID": node_uid,
                      "stubPKCS10Request": _csr()}} for pod in pods]


def _issued(client: Any, prefix: str) -> int:
    listing = kubejson.call(client, "GET", f"/apis/certificates.k8s.io/v1/namespaces/{NAMESPACE}/"
                                           "podcertificaterequests") or {}
    return sum(1 for r in listing.get("items", []) if r["metadata"]["name"].startswith(prefix)
               and [c["type"] for c in (r.get("status") or {}).get("conditions", [])] == ["Issued"])


def _wait_issued(client: Any, prefix: str, count: int) -> float:
    while _issued(client, prefix) < count:
        time.sleep(0.05)
    return time.monotonic()


def _follow(signer: Signer) -> None:
    """The signer's list-then-watch, again whenever a watch ends (as a replica runs it)."""
    while True:
        try:
            signer.follow_once()
        except KubeError:
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    add_result_arguments(parser, "20 requests (harness smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.requests = 20
    with tempfile.TemporaryDirectory(prefix="pcr-bench-") as work:
        plane = ControlPlane(binaries(), Path(work))
        plane.start()
        try:
            client = api_client(plane.kubeconfig)
            node = kubejson.call(client, "POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                                   "metadata": {"name": NODE}}) or {}
            for name in (NAMESPACE, "meshguard"):
                kubejson.call(client, "POST", "/api/v1/namespaces",
                              {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            kubejson.call(client, "POST", "/api/v1/namespaces/meshguard/secrets", {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SETTINGS.ca_secret}})
            account = wait_for("the default ServiceAccount", lambda: kubejson.call(
                client, "GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"))
            ids = node["metadata"]["uid"], account["metadata"]["uid"]
            path = f"/apis/certificates.k8s.io/v1/namespaces/{NAMESPACE}/podcertificaterequests"
            backlog = _requests(_pods(client, "backlog", args.requests, args.concurrency), *ids)
            live = _requests(_pods(client, "live", args.requests, args.concurrency), *ids)
            _create(client, path, backlog, args.concurrency)
            signer = Signer(client, SETTINGS, "cluster.local", MeshAuthority(client, "meshguard", SETTINGS))
            api = plane.components["kube-apiserver"].process.pid
            before = {"signer": time.process_time(), "apiserver": _cpu_seconds(api)}
            start = time.monotonic()
            threading.Thread(target=_follow, args=(signer,), daemon=True).start()
            results: dict[str, dict[str, float]] = {}
            end = _wait_issued(client, "backlog", args.requests)
            results["backlog"] = {"seconds": end - start, "per_second": args.requests / (end - start)}
            start = time.monotonic()
            _create(client, path, live, args.concurrency)
            end = _wait_issued(client, "live", args.requests)
            results["live"] = {"seconds": end - start, "per_second": args.requests / (end - start)}
            spent = {"signer": time.process_time() - before["signer"],
                     "apiserver": _cpu_seconds(api) - before["apiserver"]}
            cpu = {k: 1000 * v / (2 * args.requests) for k, v in spent.items()}
        finally:
            plane.stop()
    report = {"requests": args.requests, "concurrency": args.concurrency, "phases": results,
              "cpu_ms_per_request": cpu, "at": dt.datetime.now(dt.UTC).isoformat()}
    out = save_result(report, args.out, "pcr-signing")
    for phase, figures in results.items():
        print(f"{phase:8} {args.requests} requests issued in {figures['seconds']:.2f} s "
              f"({figures['per_second']:.0f}/s)")
    print("CPU ms per request: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
