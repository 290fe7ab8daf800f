"""The app's kubelet probes, rewritten to a port the sidecar serves in plaintext, which checks the app over localhost.

The kubelet probes from the node in plaintext. Under STRICT mTLS the inbound listener refuses an ``httpGet``
probe on a captured port (the pod is never Ready, and a liveness probe restarts it for ever), and answers a
``tcpSocket`` probe itself, so that probe passes even when the app is dead. As Istio and Linkerd users expect,
each such probe of an app container becomes an ``httpGet`` on the proxy's readiness port (never captured), at
``/app-health/<container>/<readyz|livez|startupz>``, and the proxy checks the app as the kubelet would have:

- ``httpGet``: the same request (path with its query, headers, HTTP or HTTPS) to ``127.0.0.1:<port>``; the
  kubelet judges the status code as before;
- ``tcpSocket``: a real TCP connect to ``127.0.0.1:<port>``, made by Envoy's active health check every
  ``periodSeconds`` (within ``timeoutSeconds``); the path answers 200 while the last connect succeeded, else 503;
- ``grpc``: the gRPC health check (``grpc.health.v1.Health/Check`` of the probe's ``service``) to
  ``127.0.0.1:<port>`` over HTTP/2, by Envoy's active health check in the same way: 200 while the app answers
  SERVING, else 503.

Timing fields (delays, periods, thresholds) are kept; the probe's ``timeoutSeconds`` bounds the proxy's own
call. Probes on ports excluded from capture, ``exec`` probes and the probes of containers meshguard adds are
left as they are. The proxy's part is per pod, but the injected proxy container is the same
for every pod: its Envoy bootstrap has three empty splice points (:data:`webhook.envoy.SPLICES`), and the patch
sets the proxy's matching environment variables to this pod's routes, filters and clusters, which the kubelet
(or ``meshguard bootstrap``) splices in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import envoy
from ..lists import port_number

APP_HEALTH = "/app-health"
# Probe field -> the last segment of its rewritten path.
PROBES = {"readinessProbe": "readyz", "livenessProbe": "livez", "startupProbe": "startupz"}
_HTTP_TIMEOUT_DEFAULT = 1  # the kubelet's default timeoutSeconds
_PERIOD_DEFAULT = 10  # and periodSeconds


@dataclass
class Rewritten:
    """The replacement probes (container index, probe field, new probe) and the proxy's per-pod configuration."""

    probes: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)
    filters: list[dict[str, Any]] = field(default_factory=list)
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        """The values of the proxy's splice variables: each object followed by a comma, or nothing."""
        parts = {"routes": self.routes, "http_filters": self.filters, "clusters": list(self.clusters.values())}
        return {envoy.SPLICES[key]: "".join(json.dumps(o, separators=(",", ":")) + "," for o in objects)
                for key, objects in parts.items()}


def _port(container: Mapping[str, Any], port: Any) -> int | None:
    """A probe's port as a number: as given, or the container port of that name; None when it resolves to none."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port if 1 <= port <= 65535 else None
    if isinstance(port, str):
        if port.isdigit():
            return _port(container, int(port))
        for declared in container.get("ports") or ():
            if isinstance(declared, dict) and declared.get("name") == port:
                return _port(container, declared.get("containerPort"))
    return None


def _seconds(probe: Mapping[str, Any], key: str, default: int) -> int:
    value = probe.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _target_cluster(kind: str, port: int, service: str = "") -> dict[str, Any]:
    cluster = envoy.local_cluster(f"probe|{kind}|{port}" + (f"|{service}" if service else ""), port)
    if kind == "https":
        # The kubelet does not verify an HTTPS probe's certificate either.
        cluster["transport_socket"] = envoy.unverified_tls()
    if kind == "grpc":
        cluster["typed_extension_protocol_options"] = envoy.http2()
    return cluster


def rewrite(spec: Mapping[str, Any], readiness_port: int, excluded_ports: tuple[int, ...]) -> Rewritten:
    """The probes of ``spec.containers`` to rewrite, and what the proxy needs to answer them."""
    out = Rewritten()
    containers = spec.get("containers")
    for index, container in enumerate(containers if isinstance(containers, list) else ()):
        name = container.get("name") if isinstance(container, dict) else None
        if not isinstance(name, str):
            continue
        for probe_field, segment in PROBES.items():
            probe = container.get(probe_field)
            if not isinstance(probe, dict):
                continue
            path = f"{APP_HEALTH}/{name}/{segment}"
            http, tcp, grpc = probe.get("httpGet"), probe.get("tcpSocket"), probe.get("grpc")
            action = next((a for a in (http, tcp, grpc) if isinstance(a, dict)), None)
            port = _port(container, action.get("port")) if action is not None else None
            if action is None or port is None or port in excluded_ports or port == readiness_port:
                continue
            timeout = _seconds(probe, "timeoutSeconds", _HTTP_TIMEOUT_DEFAULT)
            new_get: dict[str, Any] = {"path": path, "port": readiness_port, "scheme": "HTTP"}
            if action is http:
                scheme = "https" if str(http.get("scheme", "HTTP")).upper() == "HTTPS" else "http"
                cluster = _target_cluster(scheme, port)
                original = http.get("path") if isinstance(http.get("path"), str) and http.get("path") else "/"
                out.routes.append({"match": {"path": path}, "route": {
                    "cluster": cluster["name"], "prefix_rewrite": original, "timeout": f"{timeout}s"}})
                if isinstance(http.get("httpHeaders"), list):
                    new_get["httpHeaders"] = http["httpHeaders"]
            else:
                named = grpc.get("service") if action is grpc else None
                service = named if isinstance(named, str) else ""
                cluster = _target_cluster("tcp" if action is tcp else "grpc", port, service)
                period = _seconds(probe, "periodSeconds", _PERIOD_DEFAULT)
                previous = out.clusters.get(cluster["name"], {}).get("health_checks")
                if previous:  # one check per port, as often as its most frequent probe
                    period = min(period, int(previous[0]["interval"].rstrip("s")))
                cluster["health_checks"] = [envoy.tcp_connect_check(period, timeout) if action is tcp
                                            else envoy.grpc_health_check(period, timeout, service)]
                out.filters.append(envoy.cluster_health_filter(path, cluster["name"]))
            out.clusters[cluster["name"]] = {**out.clusters.get(cluster["name"], {}), **cluster}
            new_probe = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket", "grpc")}
            new_probe["httpGet"] = new_get
            out.probes.append((index, probe_field, new_probe))
    return out


def _parsed_splices(values: Mapping[str, str]) -> dict[str, list[Any]] | None:
    """The splice variables' objects by bootstrap list, or None when one is not what :meth:`Rewritten.environment`
    writes (JSON objects, each followed by a comma)."""
    found: dict[str, list[Any]] = {}
    for key, variable in envoy.SPLICES.items():
        text = values.get(variable, "")
        if text and not text.endswith(","):
            return None
        try:
            objects = json.loads(f"[{text[:-1]}]")
        except (ValueError, RecursionError):  # a tenant's text: nested deeper than the parser goes, say
            return None
        if not all(isinstance(o, dict) for o in objects):
            return None
        found[key] = objects
    return found


def _original(probe: Mapping[str, Any], path: str, splices: dict[str, list[Any]]) -> dict[str, Any] | None:
    """The probe that ``rewrite`` turned into ``probe`` (at ``path``), as far as the splices record it."""
    clusters = {c.get("name"): c for c in splices["clusters"]}
    route = next((r for r in splices["routes"] if r.get("match") == {"path": path}), None)
    if route is not None:
        target = route.get("route") if isinstance(route.get("route"), dict) else {}
        scheme, _, text = str(target.get("cluster", "")).removeprefix("probe|").partition("|")
        port = port_number(text)
        if scheme not in ("http", "https") or port is None or target.get("cluster") not in clusters:
            return None
        action: dict[str, Any] = {"path": target.get("prefix_rewrite"), "port": port, "scheme": scheme.upper()}
        headers = probe["httpGet"].get("httpHeaders")
        return {**probe, "httpGet": {**action, **({"httpHeaders": headers} if headers is not None else {})}}
    check = envoy.cluster_health_filter(path, "")["typed_config"]["headers"]
    for health in splices["http_filters"]:
        config = health.get("typed_config") if isinstance(health.get("typed_config"), dict) else {}
        if config.get("headers") != check:
            continue
        targets = config.get("cluster_min_healthy_percentages")
        if not isinstance(targets, dict) or len(targets) != 1:
            return None
        kind, _, rest = str(next(iter(targets))).removeprefix("probe|").partition("|")
        text, _, service = rest.partition("|")
        port = port_number(text)
        if kind not in ("tcp", "grpc") or port is None:
            return None
        original = {k: v for k, v in probe.items() if k != "httpGet"}
        if kind == "tcp":
            return {**original, "tcpSocket": {"port": port}}
        return {**original, "grpc": {"port": port, **({"service": service} if service else {})}}
    return None


def splices_problem(spec: Mapping[str, Any], values: Mapping[str, str], readiness_port: int,
                    excluded_ports: tuple[int, ...]) -> str | None:
    """Why the splice variables ``values`` of an injected pod are not what the injector writes for its probes, or
    None. Its app's original probes are recorded only there: they are rebuilt from them, rewritten again, and
    the result must be exactly ``values`` (a route, filter or cluster of the tenant's own reaches its proxy's
    plaintext port, so nothing else may)."""
    splices = _parsed_splices(values)
    if splices is None:
        return "its probe configuration is not meshguard's"
    restored = dict(spec)
    containers = []
    listed = spec.get("containers")
    for container in listed if isinstance(listed, list) else ():
        name = container.get("name") if isinstance(container, dict) else None
        if isinstance(name, str):
            container = dict(container)
            for probe_field, segment in PROBES.items():
                probe = container.get(probe_field)
                get = probe.get("httpGet") if isinstance(probe, dict) else None
                path = f"{APP_HEALTH}/{name}/{segment}"
                if isinstance(probe, dict) and isinstance(get, dict) and get.get("port") == readiness_port \
                        and get.get("path") == path:
                    container[probe_field] = _original(probe, path, splices) or probe
        containers.append(container)
    restored["containers"] = containers
    expected = rewrite(restored, readiness_port, excluded_ports).environment()
    if any(values.get(variable, "") != text for variable, text in expected.items()):
        return "its probe configuration is not what meshguard writes for its probes"
    return None
