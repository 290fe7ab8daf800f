"""The ``injection`` section of the configuration: what every injected pod gets unless an annotation overrides it.

Defaults follow the issue's contract (proxy uid 1337, capture ports 15001/15006, readiness 15021, stats 15090,
requests 100m/128Mi, limits 2/1Gi) so that a cluster works with an empty config file. Values are checked with
the same parsers as the per-pod annotations, so a bad default fails at startup rather than on every pod.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from .. import __version__, envoy
from ..section import Section
from . import values
from .annotations import OVERRIDES, PREFIX, TENANT_OVERRIDES
from .values import EnvoyLogLevel

INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
READINESS_PORT = 15021
STATS_PORT = 15090
ADMIN_PORT = 15000
CERT_DIR = "/etc/meshguard/certs"
# The memory-backed volume meshguard's containers share with the proxy: its SDS files, its bootstrap file.
STATE_DIR = "/var/run/meshguard"
SDS_DIR = f"{STATE_DIR}/sds"

Quantity = Annotated[str, AfterValidator(values.quantity)]
Image = Annotated[str, AfterValidator(values.image)]
Port = Annotated[int, Field(ge=1, le=65535)]
Cidr = Annotated[str, AfterValidator(values.cidr)]
IncludeRange = Annotated[str, AfterValidator(values.include_range)]


def _override(name: str) -> str:
    if name not in OVERRIDES:
        raise ValueError(f"{name!r} is not an override annotation (without {PREFIX}): one of {', '.join(OVERRIDES)}")
    return name


Override = Annotated[str, AfterValidator(_override)]


class InjectionSettings(Section):
    proxy_image: Image = "envoyproxy/envoy:v1.40.0"
    # The init container runs meshguard's own image (``meshguard netinit ...``).
    init_image: Image = f"meshguard:{__version__}"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # Native sidecar (an init container with restartPolicy: Always, Kubernetes >= 1.29): Jobs complete and the
    # app starts only once the proxy is ready. False appends the proxy to ``containers`` (classic mode).
    native_sidecar: bool = True
    # Classic mode only: put the proxy first with a postStart hook that waits until it is ready.
    hold_application_until_proxy_starts: bool = False
    proxy_uid: int = Field(1337, ge=1, le=2**31 - 1)
    log_level: EnvoyLogLevel = "info"
    proxy_cpu: Quantity = "100m"
    proxy_memory: Quantity = "128Mi"
    proxy_cpu_limit: Quantity = "2"
    proxy_memory_limit: Quantity = "1Gi"
    # Traffic capture, passed to ``meshguard netinit``; readiness and stats ports are always excluded inbound.
    exclude_inbound_ports: tuple[Port, ...] = ()
    exclude_outbound_ports: tuple[Port, ...] = ()
    include_outbound_ip_ranges: tuple[IncludeRange, ...] = Field(("*",), min_length=1)
    exclude_outbound_ip_ranges: tuple[Cidr, ...] = ()
    # The Secret (in the pod's namespace) holding the workload certificate: tls.crt, tls.key, ca.crt
    # (identity.mode static, made by the platform team).
    cert_secret: str = Field("meshguard-workload-cert", min_length=1, max_length=253)
    # Instead of cert_secret, the Secret meshguard keeps for the pod's ServiceAccount (meshguard-identity-<name>):
    # set at start when identity.mode is secret (or auto on an API server without Pod Certificates).
    cert_secret_per_account: bool = False
    # The signer of the proxy's own Pod Certificate (its key made by the kubelet, its SPIFFE ID that of the pod's
    # ServiceAccount) instead of a Secret: set at start from identity.mode when meshguard's signer runs.
    pod_certificate_signer: str | None = None
    # The inbound mode of a proxy with a static bootstrap (no xds_address) injected without cluster state
    # (meshguard inject). meshguard serve resolves each pod's from its PeerAuthentications (policy.mtls) instead.
    mtls_mode: Literal["STRICT", "PERMISSIVE", "DISABLE"] = "STRICT"
    # Static bootstrap: ports whose inbound mode differs from mtls_mode, "PORT=MODE"; set per pod at injection.
    inbound_port_modes: tuple[str, ...] = ()
    # Outbound destinations that are in the mesh and get mTLS.
    mesh_cidrs: tuple[Cidr, ...] = ()
    trust_domain: str = "cluster.local"
    # ADS server host:port for dynamic configuration (meshguard's own with xds.enabled: the chart sets it to the
    # Service); None runs Envoy from its static bootstrap, with mesh_cidrs.
    xds_address: str | None = None
    # Mutual TLS to the ADS server with the workload certificate; set at start: on when meshguard holds the mesh CA.
    xds_tls: bool = True
    # How the proxy gets its Envoy bootstrap. init-container: rendered in the pod by meshguard-init into the shared
    # volume, so the pod object stays small (the API server pays for its size on every write, watch and webhook
    # call). inline: in the proxy's arguments (--config-yaml), kilobytes more in every pod.
    bootstrap: Literal["inline", "init-container"] = "init-container"
    # Rewrite the app containers' httpGet and tcpSocket probes to the sidecar, which checks the app over localhost
    # (under STRICT the kubelet's plaintext probes would be refused); annotation meshguard.io/rewrite-app-probes.
    rewrite_app_probes: bool = True
    # How long the proxy keeps serving after the pod is told to stop (preStop), so in-flight requests finish.
    drain_seconds: int = Field(5, ge=0, le=3600)
    # The API server accepts the preStop sleep action (Kubernetes 1.30+, beta and on by default). Set at start from
    # the API server's version; without it the proxy gets no preStop (the API server would refuse the pod).
    prestop_sleep: bool = True
    # The override annotations pods may use (names without meshguard.io/); a pod using another is refused. All
    # but proxy-image by default: a pod choosing its proxy's image chooses what handles its traffic.
    allowed_overrides: tuple[Override, ...] = TENANT_OVERRIDES
    # Namespaces never injected in addition to kube-system, kube-public, kube-node-lease and meshguard's own.
    exclude_namespaces: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> InjectionSettings:
        problem = resource_problem(self)
        if problem:
            message, request, limit = problem
            raise ValueError(f"{message}: {request} must be <= {limit}")
        self.bootstrap_options()  # raises ValueError (a bad xds_address, trust_domain...) at startup
        return self

    def uncaptured_inbound_ports(self) -> tuple[int, ...]:
        """The pod ports its proxy does not capture: its own readiness and stats ports, and ``exclude_inbound_ports``
        (meshguard-init's exclusions; the probes of these ports are not rewritten either)."""
        return tuple(dict.fromkeys((READINESS_PORT, STATS_PORT, *self.exclude_inbound_ports)))

    def bootstrap_options(self) -> envoy.BootstrapOptions:
        """The Envoy bootstrap these settings call for (per-pod overrides included)."""
        return envoy.BootstrapOptions(
            inbound_port=INBOUND_PORT,
            outbound_port=OUTBOUND_PORT,
            readiness_port=READINESS_PORT,
            stats_port=STATS_PORT,
            admin_port=ADMIN_PORT,
            cert_dir=CERT_DIR,
            sds_dir=SDS_DIR,
            mtls_mode=self.mtls_mode,
            port_mtls_modes=self.inbound_port_modes,
            mesh_cidrs=self.mesh_cidrs,
            trust_domain=self.trust_domain,
            xds_address=self.xds_address,
            xds_tls=self.xds_tls,
        )


_RESOURCE_PAIRS = (("proxy_cpu", "proxy_cpu_limit", "CPU"), ("proxy_memory", "proxy_memory_limit", "memory"))


def resource_problem(settings: InjectionSettings) -> tuple[str, str, str] | None:
    """Kubernetes rejects a container whose request exceeds its limit; say so in our words first.

    Returns (sentence, request field, limit field) so the caller can name them its own way (config key or
    annotation).
    """
    for request, limit, what in _RESOURCE_PAIRS:
        low, high = getattr(settings, request), getattr(settings, limit)
        if values.parse_quantity(low) > values.parse_quantity(high):
            return f"the proxy {what} request {low} exceeds its limit {high}", request, limit
    return None
