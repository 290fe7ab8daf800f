"""The sidecar's Envoy bootstrap: every combination of options is accepted by the real Envoy (``--mode validate``,
which also opens the certificate files), and the config says what the data plane promises."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from tests.dataplane.tools import POD_VALUES, validate, write_workload_certs
from webhook import envoy
from webhook.cli import main
from webhook.envoy import BootstrapOptions


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("mesh")
    return str(write_workload_certs(root / "ca", root / "web", "shop", "web"))


def _listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [item for item in config["static_resources"]["listeners"] if item["name"] == name]
    return found


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [item for item in config["static_resources"]["clusters"] if item["name"] == name]
    return found


def _chain(listener: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [chain for chain in listener["filter_chains"] if chain["name"] == name]
    return found


COMBINATIONS = [
    pytest.param(mode, cidrs, xds, ipv6, id=f"{mode}-cidrs{len(cidrs)}-{xds or 'static'}-{'v6' if ipv6 else 'v4'}")
    for mode, cidrs, xds, ipv6 in itertools.product(
        envoy.MTLS_MODES,
        [(), ("10.213.0.0/16", "fd00:213::/64")],
        [None, "meshguard-xds.meshguard.svc:15010", "[fd00::10]:15010"],
        [True, False],
    )
    # IPv6 listeners only matter for the static listeners; one xDS variant each is enough there.
    if ipv6 or xds is None
]


@pytest.mark.parametrize(("mode", "cidrs", "xds", "ipv6"), COMBINATIONS)
def test_real_envoy_accepts_every_combination(
    cert_dir: str, mode: str, cidrs: tuple[str, ...], xds: str | None, ipv6: bool
) -> None:
    # Ports whose PeerAuthentication mode differs, resolved at injection (static mode; the control plane sends them).
    port_modes = tuple(f"{8080 + i}={m}" for i, m in enumerate(envoy.MTLS_MODES))
    options = BootstrapOptions(cert_dir=cert_dir, mtls_mode=mode, mesh_cidrs=cidrs, xds_address=xds, ipv6=ipv6,
                               port_mtls_modes=port_modes)
    result = validate(options)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "OK" in result.stdout + result.stderr


def test_xds_without_tls_is_accepted(cert_dir: str) -> None:
    result = validate(BootstrapOptions(cert_dir=cert_dir, xds_address="127.0.0.1:15010", xds_tls=False))
    assert result.returncode == 0, result.stderr


def test_validation_opens_the_certificates(tmp_path: Path) -> None:
    """The check above reads the certificate files through the SDS files: without them the update is rejected
    (the TLS listeners then never warm, and the proxy is not Ready)."""
    result = validate(BootstrapOptions(cert_dir=str(tmp_path)))
    assert f"Filesystem config update rejected: Invalid path: {tmp_path}/" in result.stdout + result.stderr


def test_certificates_come_from_the_sds_files_so_that_they_rotate() -> None:
    """Static tls_certificates are read once; an SDS secret from files is reloaded when the volume changes."""
    options = BootstrapOptions(cert_dir="/certs", sds_dir="/sds")
    files = {name: json.loads(text)["resources"][0] for name, text in envoy.sds_files(options.cert_dir).items()}
    cert = files["certificate.json"]["tls_certificate"]
    assert (cert["certificate_chain"], cert["private_key"], cert["watched_directory"]) == (
        {"filename": "/certs/tls.crt"}, {"filename": "/certs/tls.key"}, {"path": "/certs"})
    bundle = files["trust-bundle.json"]["validation_context"]
    assert (bundle["trusted_ca"], bundle["watched_directory"]) == ({"filename": "/certs/ca.crt"}, {"path": "/certs"})
    assert "tls_certificates" not in json.dumps(envoy.bootstrap(options))
    assert "/sds/certificate.json" in json.dumps(envoy.bootstrap(options))


def test_render_is_the_bootstrap_as_compact_json_with_kubelet_references() -> None:
    options = BootstrapOptions(mesh_cidrs=("10.0.0.0/8",))
    rendered = envoy.render(options)
    assert "\n" not in rendered and ": " not in rendered
    assert "$(POD_NAME)" in rendered and "$(POD_NAMESPACE)" in rendered
    assert all(f"$({variable})" in rendered for variable in envoy.SPLICES.values())
    # With the splice points empty (a pod without rewritten probes) it is the bootstrap itself.
    unchanged = {name: f"$({name})" for name in envoy.POD_VARIABLES}
    assert json.loads(envoy.expand_pod_variables(rendered, unchanged)) == envoy.bootstrap(options)
    expanded = envoy.expand_pod_variables(rendered, POD_VALUES)
    assert "$(" not in expanded
    assert json.loads(expanded)["node"]["id"] == "sidecar~10.213.1.2~web-7d4b9.shop"


def test_admin_is_loopback_only_and_health_and_stats_are_exposed() -> None:
    config = envoy.bootstrap(BootstrapOptions())
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
    for name, port, paths in (("readiness", 15021, {"/healthz/ready", "/ready"}),
                              ("prometheus", 15090, {"/stats/prometheus"})):
        listener = _listener(config, name)
        assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": port}
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        # Exact paths only: the rest of the admin API (e.g. /quitquitquit) stays on loopback.
        assert {route["match"]["path"] for route in routes} == paths
        assert all(route["route"]["cluster"] == envoy.ADMIN_CLUSTER for route in routes)


def test_strict_inbound_only_has_a_tls_chain_requiring_a_mesh_client_certificate() -> None:
    inbound = _listener(envoy.bootstrap(BootstrapOptions(trust_domain="example.org")), "inbound")
    chains = {chain["name"] for chain in inbound["filter_chains"]}
    assert "inbound-plaintext" not in chains and "default_filter_chain" not in inbound
    tls = _chain(inbound, "inbound-mtls")
    assert tls["filter_chain_match"] == {"transport_protocol": "tls"}
    context = tls["transport_socket"]["typed_config"]
    assert context["require_client_certificate"] is True
    validation = context["common_tls_context"]["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == "mesh-ca"
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"prefix": "spiffe://example.org/"}}]


def test_permissive_inbound_adds_a_plaintext_chain_to_the_same_app() -> None:
    inbound = _listener(envoy.bootstrap(BootstrapOptions(mtls_mode="PERMISSIVE")), "inbound")
    plain = _chain(inbound, "inbound-plaintext")
    assert plain["filter_chain_match"] == {"transport_protocol": "raw_buffer"}
    assert "transport_socket" not in plain
    assert plain["filters"] == _chain(inbound, "inbound-mtls")["filters"]


def test_inbound_forwards_to_loopback_on_the_original_port() -> None:
    config = envoy.bootstrap(BootstrapOptions())
    inbound = _listener(config, "inbound")
    filters = _chain(inbound, "inbound-mtls")["filters"]
    state = filters[0]["typed_config"]["on_new_connection"][0]
    assert state["object_key"] == "envoy.network.transport_socket.original_dst_address"
    assert state["format_string"]["text_format_source"]["inline_string"] == "127.0.0.1:%DOWNSTREAM_LOCAL_PORT%"
    assert filters[1]["typed_config"]["cluster"] == envoy.INBOUND_CLUSTER
    assert _cluster(config, envoy.INBOUND_CLUSTER)["type"] == "ORIGINAL_DST"
    assert "%DOWNSTREAM_PEER_URI_SAN%" in json.dumps(inbound["access_log"])


@pytest.mark.parametrize(("listener", "ports"), [("inbound", {16006, 16001, 16000}), ("outbound", {16001})])
def test_connections_to_the_proxy_ports_are_blackholed(listener: str, ports: set[int]) -> None:
    """Otherwise a connection to 15001/15006 loops through Envoy, and 15000 exposes admin to the network.
    Outbound, only Envoy's own port loops: port 15006 of another host is an ordinary destination."""
    options = BootstrapOptions(inbound_port=16006, outbound_port=16001, admin_port=16000)
    found = _listener(envoy.bootstrap(options), listener)
    blackholed = {
        chain["filter_chain_match"]["destination_port"]
        for chain in found["filter_chains"]
        if chain["filters"][0]["typed_config"].get("cluster") == envoy.BLACKHOLE_CLUSTER
    }
    assert blackholed == ports


def test_outbound_originates_mtls_to_mesh_ranges_and_passes_the_rest_through() -> None:
    config = envoy.bootstrap(BootstrapOptions(mesh_cidrs=("10.1.2.3/16", "fd00::/8")))
    outbound = _listener(config, "outbound")
    mesh = _chain(outbound, "outbound-mesh")
    assert mesh["filter_chain_match"]["prefix_ranges"] == [
        {"address_prefix": "10.1.0.0", "prefix_len": 16}, {"address_prefix": "fd00::", "prefix_len": 8}]
    assert mesh["filters"][0]["typed_config"]["cluster"] == envoy.MESH_CLUSTER
    tls = _cluster(config, envoy.MESH_CLUSTER)["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    validation = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert validation["match_typed_subject_alt_names"][0]["matcher"] == {"prefix": "spiffe://cluster.local/"}
    passthrough = outbound["default_filter_chain"]["filters"][0]["typed_config"]["cluster"]
    assert passthrough == envoy.PASSTHROUGH_CLUSTER
    assert "transport_socket" not in _cluster(config, envoy.PASSTHROUGH_CLUSTER)


def test_without_mesh_ranges_everything_passes_through() -> None:
    outbound = _listener(envoy.bootstrap(BootstrapOptions()), "outbound")
    assert [chain["name"] for chain in outbound["filter_chains"]] == ["outbound-blackhole-15001"]


def test_ipv6_adds_the_any_address_to_the_capture_listeners_only() -> None:
    with_v6 = envoy.bootstrap(BootstrapOptions())
    without = envoy.bootstrap(BootstrapOptions(ipv6=False))
    for name in ("inbound", "outbound"):
        assert _listener(with_v6, name)["additional_addresses"] == [
            {"address": {"socket_address": {"address": "::", "port_value": 15006 if name == "inbound" else 15001}}}]
        assert "additional_addresses" not in _listener(without, name)


def test_xds_mode_leaves_traffic_listeners_to_the_control_plane() -> None:
    config = envoy.bootstrap(BootstrapOptions(xds_address="xds.mesh.svc:15010"))
    names = {listener["name"] for listener in config["static_resources"]["listeners"]}
    assert names == {"readiness", "prometheus"}
    ads = config["dynamic_resources"]
    assert ads["ads_config"]["grpc_services"] == [{"envoy_grpc": {"cluster_name": envoy.XDS_CLUSTER}}]
    # The proxy waits for its listeners however long the control plane takes: never serving without them.
    assert ads["cds_config"] == ads["lds_config"] == {"ads": {}, "resource_api_version": "V3",
                                                      "initial_fetch_timeout": "0s"}
    xds = _cluster(config, envoy.XDS_CLUSTER)
    assert xds["type"] == "STRICT_DNS"
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "xds.mesh.svc", "port_value": 15010}}
    context = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["tls_certificate_sds_secret_configs"]
    # Only the control plane's own SPIFFE ID: a workload's certificate, from the same CA, is not the control plane.
    assert context["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/meshguard/control-plane"}}]
    plain = _cluster(envoy.bootstrap(BootstrapOptions(xds_address="[fd00::1]:99", xds_tls=False)), envoy.XDS_CLUSTER)
    assert plain.get("type", "STATIC") == "STATIC" and "transport_socket" not in plain  # Envoy's default type
    assert plain["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "fd00::1", "port_value": 99}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mtls_mode": "strict"}, "mtls_mode 'strict' is not one of STRICT, PERMISSIVE"),
        ({"inbound_port": 0}, "inbound_port 0 is not a TCP port"),
        ({"outbound_port": 15006}, "the proxy ports must differ"),
        ({"mesh_cidrs": ("10.0.0.0/33",)}, "mesh CIDR '10.0.0.0/33' is not an IP range"),
        ({"xds_address": "xds.mesh.svc"}, "xds_address 'xds.mesh.svc' must be host:port"),
        ({"trust_domain": ""}, "trust_domain '' must be a non-empty name"),
    ],
)
def test_bad_options_are_refused_with_a_readable_reason(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        BootstrapOptions(**changes)


def test_options_are_hashable_for_the_injectors_cache() -> None:
    assert hash(BootstrapOptions(mesh_cidrs=("10.0.0.0/8",))) == hash(BootstrapOptions(mesh_cidrs=("10.0.0.0/8",)))


# -- the bootstrap container: options as flags, the file in the pod -------------------------------------------------

def _parse(args: list[str]) -> BootstrapOptions:
    parser = argparse.ArgumentParser()
    envoy.add_option_arguments(parser)
    return envoy.options_from(parser.parse_args(args))


@pytest.mark.parametrize("options", [
    BootstrapOptions(),
    BootstrapOptions(mtls_mode="PERMISSIVE", mesh_cidrs=("10.0.0.0/8", "fd00::/8"), trust_domain="corp.example",
                     ipv6=False, inbound_port=16006, cert_dir="/certs"),
    BootstrapOptions(trust_domain="corp.example", xds_address="istiod.mesh:15012", xds_tls=False),
])
def test_options_survive_the_trip_through_flags(options: BootstrapOptions) -> None:
    assert _parse(envoy.option_args(options)) == options


def test_with_a_control_plane_the_static_only_options_are_not_written_and_shape_nothing() -> None:
    options = BootstrapOptions(mtls_mode="PERMISSIVE", port_mtls_modes=("8080=DISABLE",), mesh_cidrs=("10.0.0.0/8",),
                               xds_address="istiod.mesh:15012")
    args = envoy.option_args(options)
    assert not {"--mtls-mode", "--port-mtls-modes", "--mesh-cidrs"} & set(args)
    assert envoy.render(_parse(args)) == envoy.render(options)


def test_write_fills_in_the_pod_and_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "envoy.json"
    odd = {**POD_VALUES, "POD_NAME": 'we"b\\0'}  # never valid in Kubernetes, but must not break the JSON
    envoy.write(BootstrapOptions(), out, odd)
    config = json.loads(out.read_text())
    assert config["node"]["metadata"]["pod_name"] == 'we"b\\0'
    assert config["node"]["cluster"] == f"{POD_VALUES['SERVICE_ACCOUNT']}.{POD_VALUES['POD_NAMESPACE']}"
    assert "$(" not in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o644  # Envoy runs as another user than whoever wrote it
    assert [p.name for p in tmp_path.iterdir()] == ["envoy.json"]


def test_write_names_the_missing_downward_api_variables(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks POD_IP, SERVICE_ACCOUNT"):
        envoy.write(BootstrapOptions(), tmp_path / "envoy.json", {"POD_NAME": "web", "POD_NAMESPACE": "shop"})
    assert not list(tmp_path.iterdir())


def test_bootstrap_command_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "envoy.json"
    assert main(["bootstrap", "--out", str(out), "--mtls-mode", "NOPE"]) == 2
    assert "mtls_mode 'NOPE' is not one of STRICT, PERMISSIVE" in capsys.readouterr().err
    for name in POD_VALUES:
        monkeypatch.delenv(name, raising=False)
    assert main(["bootstrap", "--out", str(out)]) == 1
    assert "the injector sets them from the Downward API" in capsys.readouterr().err
    for name, value in POD_VALUES.items():
        monkeypatch.setenv(name, value)
    assert main(["bootstrap", "--out", str(out), "--mesh-cidrs", "10.0.0.0/8"]) == 0
    assert json.loads(out.read_text()) == json.loads(
        envoy.expand_pod_variables(envoy.render(BootstrapOptions(mesh_cidrs=("10.0.0.0/8",))), POD_VALUES))


def test_port_modes_are_checked_and_travel_as_flags() -> None:
    with pytest.raises(ValueError, match="port_mtls_modes item '8080=MAYBE' is not PORT=MODE"):
        BootstrapOptions(port_mtls_modes=("8080=MAYBE",))
    with pytest.raises(ValueError, match="port_mtls_modes item 'http=STRICT'"):
        BootstrapOptions(port_mtls_modes=("http=STRICT",))
    options = BootstrapOptions(mtls_mode="DISABLE", port_mtls_modes=("8080=STRICT", "9090=PERMISSIVE"))
    parser = argparse.ArgumentParser()
    envoy.add_option_arguments(parser)
    assert envoy.options_from(parser.parse_args(envoy.option_args(options))) == options
    chains = [c["name"] for c in envoy.inbound_listener(options)["filter_chains"]]
    assert chains[3:] == ["inbound-mtls-8080", "inbound-mtls-9090", "inbound-plaintext-9090", "inbound-plaintext"]



def test_a_port_mode_for_the_proxys_own_ports_leaves_them_closed() -> None:
    """A workload's PeerAuthentication may name any port; on the capture and admin ports a mode would add chains
    that Envoy prefers to the blackhole (or rejects as its duplicate), opening them to the network."""
    options = BootstrapOptions()
    modes = {options.inbound_port: "DISABLE", options.admin_port: "PERMISSIVE", options.outbound_port: "STRICT",
             8080: "DISABLE"}
    chains = envoy.inbound_listener(options, "STRICT", modes)["filter_chains"]
    by_port = {c["filter_chain_match"]["destination_port"]: c["name"] for c in chains
               if "destination_port" in c.get("filter_chain_match", {})}
    assert by_port == {options.inbound_port: "inbound-blackhole-15006", options.outbound_port:
                       "inbound-blackhole-15001", options.admin_port: "inbound-blackhole-15000",
                       8080: "inbound-plaintext-8080"}

def test_pod_values_are_expanded_once_never_inside_another_value() -> None:
    """A probe path may contain ``$(...)``: the kubelet expands a reference once, and so does meshguard-init."""
    rendered = envoy.render(BootstrapOptions())
    routes = '{"match":{"path":"/h$(MESHGUARD_PROBE_CLUSTERS)$(POD_NAME)"},"route":{"cluster":"c"}},'
    values = {**POD_VALUES, "MESHGUARD_PROBE_ROUTES": routes, "MESHGUARD_PROBE_CLUSTERS": '{"name":"c"},'}
    expanded = envoy.expand_pod_variables(rendered, values)
    assert routes in expanded and json.loads(expanded)
