"""The ``injection`` section of the configuration: what every injected pod gets unless an annotation overrides it.

Defaults follow the issue's contract (proxy uid 1337, capture ports 15001/15006, readiness 15021, stats 15090,
requests 100m/128Mi, limits 2/1Gi) so that a cluster works with an empty config file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import _Section

EnvoyLogLevel = Literal["trace", "debug", "info", "warning", "error", "critical", "off"]


class InjectionSettings(_Section):
    proxy_image: str = "envoyproxy/envoy:v1.31.2"
    # The init container runs meshguard's own image (``meshguard netinit ...``).
    init_image: str = "meshguard:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # Native sidecar (an init container with restartPolicy: Always, Kubernetes >= 1.29): Jobs complete and the
    # app starts only once the proxy is ready. False appends the proxy to ``containers`` (classic mode).
    native_sidecar: bool = True
    # Classic mode only: put the proxy first with a postStart hook that waits until it is ready.
    hold_application_until_proxy_starts: bool = False
    proxy_uid: int = Field(1337, ge=1, le=2**31 - 1)
    log_level: EnvoyLogLevel = "info"
    proxy_cpu: str = "100m"
    proxy_memory: str = "128Mi"
    proxy_cpu_limit: str = "2"
    proxy_memory_limit: str = "1Gi"
    # Traffic capture, passed to ``meshguard netinit``; readiness and stats ports are always excluded inbound.
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_ip_ranges: tuple[str, ...] = ("*",)
    exclude_outbound_ip_ranges: tuple[str, ...] = ()
    # The Secret (in the pod's namespace) holding the workload certificate: tls.crt, tls.key, ca.crt.
    cert_secret: str = "meshguard-workload-cert"
    mtls_mode: Literal["STRICT", "PERMISSIVE"] = "STRICT"
    # Outbound destinations that are in the mesh and get mTLS.
    mesh_cidrs: tuple[str, ...] = ()
    trust_domain: str = "cluster.local"
    # ADS server host:port for dynamic configuration; None runs Envoy from its static bootstrap.
    xds_address: str | None = None
    # How long the proxy keeps serving after the pod is told to stop (preStop), so in-flight requests finish.
    drain_seconds: int = Field(5, ge=0, le=3600)
    # Namespaces never injected in addition to kube-system, kube-public, kube-node-lease and meshguard's own.
    exclude_namespaces: tuple[str, ...] = ()
