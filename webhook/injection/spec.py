"""What is injected: the ``meshguard-init`` init container, the ``meshguard-proxy`` sidecar and their volumes.

Nothing here depends on the individual pod: pod identity reaches the bootstrap through the Downward API (read
from the environment by ``meshguard-init``, which renders it, or with an inline bootstrap ``$(POD_NAME)`` and
friends, expanded by the kubelet in the proxy's ``args``), so the whole injected spec is a function of the
effective settings alone and is built once per distinct settings value (in practice: once, plus once per
distinct set of override annotations). An inline bootstrap is rendered once per distinct
:class:`~webhook.envoy.BootstrapOptions`. The returned dicts are shared: callers serialise them and must not
mutate them.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .. import __version__, envoy
from ..admission import Constant
from ..certs import CA_CERT, TLS_CERT, TLS_KEY
from ..identity.settings import trust_bundle_name
from ..netinit import ALL_RANGES, EXCLUDE_INBOUND_FLAG, SHARED_OPTIONS
from .decision import INIT_NAME, PROXY_NAME
from .settings import CERT_DIR, INBOUND_PORT, OUTBOUND_PORT, READINESS_PORT, STATE_DIR, STATS_PORT, InjectionSettings

STATE_VOLUME = "meshguard-envoy"
BOOTSTRAP_FILE = posixpath.join(STATE_DIR, "envoy.json")
CERT_VOLUME = "meshguard-certs"
# The proxy reports ready only once its listeners are up; kubelet probes it on the readiness port.
READY_PATH = "/ready"
# Native mode: the app containers start only after the proxy's startup probe passes (up to 10 minutes).
STARTUP_PERIOD_SECONDS = 1
STARTUP_FAILURE_THRESHOLD = 600
# Classic "hold" mode: the postStart hook polls readiness every half second, for as long as the startup probe
# would wait. Bash's /dev/tcp needs no HTTP client in the proxy image (the Envoy image has bash, not curl).
_HOLD_SCRIPT = (
    "n=0; until (exec 3<>/dev/tcp/127.0.0.1/{port} && "
    "printf 'GET {path} HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && "
    "read -r line <&3 && case $line in *' 200 '*) exit 0;; *) exit 1;; esac) 2>/dev/null; "
    "do n=$((n+1)); [ $n -ge {tries} ] && exit 1; sleep 0.5; done"
)


def hold_command(port: int = READINESS_PORT, path: str = READY_PATH,
                 tries: int = 2 * STARTUP_FAILURE_THRESHOLD) -> list[str]:
    """The postStart command: exits 0 once ``GET path`` on the port answers 200, 1 after ``tries`` attempts."""
    return ["bash", "-c", _HOLD_SCRIPT.format(port=port, path=path, tries=tries)]


_DOWNWARD_API = (
    ("POD_NAME", "metadata.name"),
    ("POD_NAMESPACE", "metadata.namespace"),
    ("POD_IP", "status.podIP"),
    ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
)


@dataclass(frozen=True, slots=True)
class Sidecar:
    """The injected parts, placed by :mod:`webhook.injection.patch`.

    ``init_containers`` go first in ``initContainers`` in this order; ``containers_front`` first in
    ``containers``; ``containers_back`` at its end.
    """

    init_containers: tuple[dict[str, Any], ...]
    containers_front: tuple[dict[str, Any], ...]
    containers_back: tuple[dict[str, Any], ...]
    volumes: tuple[dict[str, Any], ...]
    status: str
    renderer: str  # the container the bootstrap is rendered from: its environment carries the probe splices


def netinit_args(settings: InjectionSettings) -> list[str]:
    """``meshguard netinit`` arguments (the image's entrypoint is ``meshguard``)."""
    options = settings.bootstrap_options()
    args = [
        "netinit",
        "--cert-dir", options.cert_dir,
        "--sds-dir", options.sds_dir,
        "--proxy-uid", str(settings.proxy_uid),
        "--inbound-port", str(INBOUND_PORT),
        "--outbound-port", str(OUTBOUND_PORT),
        EXCLUDE_INBOUND_FLAG, ",".join(map(str, settings.uncaptured_inbound_ports())),
    ]
    for flag, items in (
        ("--exclude-outbound-ports", [str(p) for p in settings.exclude_outbound_ports]),
        # Everything (netinit's own default, whatever its version) is not written.
        ("--include-outbound-ip-ranges",
         [] if settings.include_outbound_ip_ranges == (ALL_RANGES,) else list(settings.include_outbound_ip_ranges)),
        ("--exclude-outbound-ip-ranges", list(settings.exclude_outbound_ip_ranges)),
    ):
        if items:
            args += [flag, ",".join(items)]
    if settings.bootstrap == "init-container":
        args += ["--bootstrap-out", BOOTSTRAP_FILE, *envoy.option_args(options, skip=SHARED_OPTIONS)]
    return args


def _resources(settings: InjectionSettings) -> dict[str, Any]:
    return {
        "requests": {"cpu": settings.proxy_cpu, "memory": settings.proxy_memory},
        "limits": {"cpu": settings.proxy_cpu_limit, "memory": settings.proxy_memory_limit},
    }


def init_container(settings: InjectionSettings) -> dict[str, Any]:
    """Sets up the iptables redirect, so it needs NET_ADMIN/NET_RAW and root — at container level, because the
    pod may say ``runAsNonRoot: true`` (Online Boutique's do) and that must not stop it. Unless the bootstrap is
    inline, it also renders the proxy's bootstrap for this pod (from its Downward API environment): one container
    less than a renderer of its own, in every pod object."""
    return {
        "name": INIT_NAME,
        "image": settings.init_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": netinit_args(settings),
        **({"env": _bootstrap_env(inline=False)} if settings.bootstrap == "init-container" else {}),
        "resources": _resources(settings),
        # The proxy's SDS files (and bootstrap) go in the volume it shares with the proxy.
        "volumeMounts": [{"name": STATE_VOLUME, "mountPath": STATE_DIR}],
        "securityContext": {
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


@functools.lru_cache(maxsize=64)
def _bootstrap(options: envoy.BootstrapOptions) -> str:
    return envoy.render(options)


def _bootstrap_env(inline: bool) -> list[dict[str, Any]]:
    """The pod's identity from the Downward API; inline, also the bootstrap's splice points, empty until the patch
    sets this pod's (its rewritten probes), since the kubelet leaves a reference to an undefined variable as it
    is. meshguard-init takes an absent one as empty: the patch adds only those this pod needs."""
    return [*({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}
              for name, path in _DOWNWARD_API),
            *({"name": variable, "value": ""} for variable in envoy.SPLICES.values() if inline)]


# Static bootstrap: the inbound modes this proxy enforces ("MODE[,PORT=MODE...]"), resolved at injection, so that
# the policy can tell when a PeerAuthentication changed since (webhook/policy/integrity.py).
INBOUND_MTLS_ENV = "MESHGUARD_INBOUND_MTLS"


def inbound_mtls(settings: InjectionSettings) -> str:
    return ",".join((settings.mtls_mode, *settings.inbound_port_modes))


def declared_inbound(spec: Mapping[str, Any]) -> tuple[str, dict[int, str]] | None:
    """The inbound modes a pod's proxy says it was injected with (:data:`INBOUND_MTLS_ENV`); None when it has no
    such proxy or the value is not one meshguard writes."""
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or ():
            if not isinstance(container, Mapping) or container.get("name") != PROXY_NAME:
                continue
            for variable in container.get("env") or ():
                if isinstance(variable, Mapping) and variable.get("name") == INBOUND_MTLS_ENV:
                    return _parse_inbound(variable.get("value"))
    return None


def _parse_inbound(value: Any) -> tuple[str, dict[int, str]] | None:
    mode, *ports = value.split(",") if isinstance(value, str) else [""]
    if mode not in envoy.MTLS_MODES:
        return None
    try:
        return mode, envoy.parse_port_modes(ports)
    except ValueError:
        return None


def _unprivileged(uid: int) -> dict[str, Any]:
    return {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": True,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _proxy_env(settings: InjectionSettings, inline: bool) -> dict[str, Any]:
    env = _bootstrap_env(inline=True) if inline else []
    if settings.xds_address is None:
        env.append({"name": INBOUND_MTLS_ENV, "value": inbound_mtls(settings)})
    return {"env": env} if env else {}


def _ready_probe(period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": READY_PATH, "port": READINESS_PORT}, "periodSeconds": period, "timeoutSeconds": 3,
            "failureThreshold": failures}


def proxy_container(settings: InjectionSettings, native: bool, hold: bool) -> dict[str, Any]:
    inline = settings.bootstrap == "inline"
    config = (["--config-yaml", _bootstrap(settings.bootstrap_options())] if inline
              else ["--config-path", BOOTSTRAP_FILE])
    container: dict[str, Any] = {
        "name": PROXY_NAME,
        "image": settings.proxy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["envoy"],
        "args": [
            *config,
            "--log-level", settings.log_level,
            # No shared-memory hot restart: a pod restarts its container instead, and /dev/shm stays unused.
            "--disable-hot-restart",
            "--drain-time-s", str(settings.drain_seconds),
        ],
        # Inline, the kubelet expands the bootstrap's $(POD_NAME)... from these; else meshguard-init reads them.
        **_proxy_env(settings, inline),
        "ports": [{"name": "meshguard-stats", "containerPort": STATS_PORT, "protocol": "TCP"}],
        "readinessProbe": _ready_probe(period=2, failures=3),
        "resources": _resources(settings),
        "securityContext": _unprivileged(settings.proxy_uid),
        "volumeMounts": [
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
            {"name": CERT_VOLUME, "mountPath": CERT_DIR, "readOnly": True},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    lifecycle: dict[str, Any] = {}
    if settings.drain_seconds and settings.prestop_sleep:
        # Keep serving while the app finishes its in-flight requests; the sleep action needs no shell in the image.
        lifecycle["preStop"] = {"sleep": {"seconds": settings.drain_seconds}}
    if native:
        container["restartPolicy"] = "Always"
        container["startupProbe"] = _ready_probe(period=STARTUP_PERIOD_SECONDS, failures=STARTUP_FAILURE_THRESHOLD)
    elif hold:
        # The kubelet starts the next container only after postStart returns: the app waits for the proxy.
        lifecycle["postStart"] = {"exec": {"command": hold_command()}}
    if lifecycle:
        container["lifecycle"] = lifecycle
    return container


def volumes(settings: InjectionSettings) -> list[dict[str, Any]]:
    return [
        {"name": STATE_VOLUME, "emptyDir": {"medium": "Memory"}},
        {"name": CERT_VOLUME, **_certificate_source(settings)},
    ]


def _certificate_source(settings: InjectionSettings) -> dict[str, Any]:
    """tls.crt, tls.key and ca.crt for the proxy: the pod's own Pod Certificate and the mesh CA's trust bundle, or
    the namespace's Secret. 0444: the proxy runs as uid 1337 and must read the key; only containers mounting the
    volume see it."""
    signer = settings.pod_certificate_signer
    if signer is None:
        return {"secret": {"secretName": settings.cert_secret, "defaultMode": 0o444}}
    return {"projected": {"defaultMode": 0o444, "sources": [
        {"podCertificate": {"signerName": signer, "keyType": "ECDSAP256", "keyPath": TLS_KEY,
                            "certificateChainPath": TLS_CERT}},
        {"clusterTrustBundle": {"name": trust_bundle_name(signer), "path": CA_CERT}},
    ]}}


@functools.lru_cache(maxsize=256)
def build(settings: InjectionSettings) -> Sidecar:
    """Everything injected for pods with these effective settings (cached: the settings are frozen and hashable)."""
    native = settings.native_sidecar
    hold = not native and settings.hold_application_until_proxy_starts
    # Constants: each is serialised for the wire once, not on every pod creation.
    proxy = Constant(proxy_container(settings, native, hold))
    first = (Constant(init_container(settings)),)
    init = (*first, proxy) if native else first
    front, back = ((), ()) if native else (((proxy,), ()) if hold else ((), (proxy,)))
    vols = tuple(Constant(v) for v in volumes(settings))
    status = {
        "initContainers": [c["name"] for c in init],
        "containers": [c["name"] for c in (*front, *back)],
        "volumes": [v["name"] for v in vols],
        "version": __version__,
    }
    renderer = PROXY_NAME if settings.bootstrap == "inline" else INIT_NAME
    return Sidecar(init, front, back, vols, orjson.dumps(status).decode(), renderer)
