"""The ADS protocol over a real gRPC connection: versions and nonces, ACK, NACK, stale requests, pushes on change,
and who may ask (mutual TLS with the pod's identity)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from tests.conftest import free_port
from webhook import certs, envoy
from webhook.identity.authority import Authority
from webhook.injection.settings import InjectionSettings
from webhook.metrics import Metrics
from webhook.policy.mtls import Resolver
from webhook.state.store import Store
from webhook.xds import server as xds_server
from webhook.xds.plane import CLUSTER, ENDPOINTS, LISTENER, ControlPlane
from webhook.xds.settings import XdsSettings

POD = {"kind": "Pod", "metadata": {"name": "web-0", "namespace": "shop", "labels": {}},
       "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}, {"name": "meshguard-proxy"}]},
       "status": {"phase": "Running", "podIP": "10.0.0.1"}}
SERVICE = {"kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}}
SILENCE = 0.5  # how long "nothing more is sent" is watched for: too short can only let a bug pass, never fail


def node(namespace: str = "shop", pod: str = "web-0") -> Any:
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "pod_name": pod, "service_account": "web"})
    from envoy.config.core.v3 import base_pb2

    return base_pb2.Node(id=f"sidecar~10.0.0.1~{pod}.{namespace}", metadata=metadata)


@dataclass
class Plane:
    store: Store
    metrics: Metrics
    servicer: xds_server.AggregatedDiscovery
    address: str


async def start(tls_ca: certs.Issued | None = None) -> tuple[Plane, list[asyncio.Task[None]]]:
    state = Store()
    state.replace("Pod", [POD])
    metrics = Metrics()
    settings = XdsSettings(enabled=True, host="127.0.0.1", port=free_port(), debounce_seconds=0)
    plane = ControlPlane(state, Resolver("istio-system", "STRICT"), InjectionSettings().bootstrap_options(), settings,
                         metrics)
    state.subscribe(plane.changed)
    servicer = xds_server.AggregatedDiscovery(plane, metrics, "cluster.local", tls=tls_ca is not None)
    tasks = [asyncio.create_task(plane.run()),
             asyncio.create_task(xds_server.serve(servicer, settings, (lambda: Authority(tls_ca)) if tls_ca else None,
                                                  "meshguard", "meshguard"))]
    await asyncio.sleep(0.2)
    return Plane(state, metrics, servicer, f"127.0.0.1:{settings.port}"), tasks


class Stream:
    """One ADS stream; responses are read by a task of their own (cancelling a read would cancel the call)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        self.responses: asyncio.Queue[discovery_pb2.DiscoveryResponse | grpc.aio.AioRpcError] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                await self.responses.put(response)
        except grpc.aio.AioRpcError as exc:
            await self.responses.put(exc)

    async def send(self, type_url: str, nonce: str = "", version: str = "", names: tuple[str, ...] = (),
                   error: str | None = None, first: bool = False) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce, version_info=version,
                                                 resource_names=list(names))
        if first:
            request.node.CopyFrom(node())
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(request)

    async def receive(self, timeout: float = 30) -> discovery_pb2.DiscoveryResponse:
        item = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        return item

    async def nothing_more(self) -> bool:
        await asyncio.sleep(SILENCE)
        return self.responses.empty()


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def run() -> Any:
    def runner(test: Any) -> Any:
        return asyncio.run(asyncio.wait_for(test(), 120))
    return runner


def test_ack_nack_and_a_push_on_change(run: Any) -> None:
    async def scenario() -> None:
        plane, tasks = await start()
        try:
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(CLUSTER, first=True)
                first = await stream.receive()
                assert first.type_url == CLUSTER and first.version_info and first.nonce
                await stream.send(CLUSTER, first.nonce, first.version_info)  # ACK
                assert await stream.nothing_more()
                assert plane.servicer.describe("shop", "web-0")["versions"]["cds"] == {
                    "sent": first.version_info, "acked": first.version_info}
                # A Service appears: a new version, with its cluster.
                plane.store.replace("Service", [SERVICE])
                second = await stream.receive()
                assert second.version_info != first.version_info and second.nonce != first.nonce
                names = set()
                for resource in second.resources:
                    from envoy.config.cluster.v3 import cluster_pb2

                    cluster = cluster_pb2.Cluster()
                    resource.Unpack(cluster)
                    names.add(cluster.name)
                assert "outbound|80||api.shop" in names
                # NACK: counted, and the same config is not sent again.
                await stream.send(CLUSTER, second.nonce, first.version_info, error="bad cluster")
                assert await stream.nothing_more()
                assert plane.metrics.xds_nacks.labels("cds").value == 1
                # A stale nonce is ignored: no answer, no NACK counted.
                await stream.send(CLUSTER, first.nonce, first.version_info, error="late")
                assert await stream.nothing_more()
                assert plane.metrics.xds_nacks.labels("cds").value == 1
                assert plane.metrics.xds_pushes.labels("cds").value == 2
        finally:
            await _stop(tasks)

    run(scenario)


def test_endpoints_are_sent_for_the_names_asked_and_listeners_for_the_pod(run: Any) -> None:
    async def scenario() -> None:
        plane, tasks = await start()
        plane.store.replace("Service", [SERVICE])
        try:
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(ENDPOINTS, names=("outbound|80||api.shop", "unknown"), first=True)
                endpoints = await stream.receive()
                assert endpoints.type_url == ENDPOINTS and len(endpoints.resources) == 1
                await stream.send(LISTENER)
                listeners = await stream.receive()
                from envoy.config.listener.v3 import listener_pb2

                found = set()
                for resource in listeners.resources:
                    listener = listener_pb2.Listener()
                    resource.Unpack(listener)
                    found.add(listener.name)
                assert found == {"inbound", "outbound"}
        finally:
            await _stop(tasks)

    run(scenario)


def test_a_proxy_of_a_pod_not_yet_seen_waits_for_it(run: Any) -> None:
    async def scenario() -> None:
        plane, tasks = await start()
        plane.store.apply("Pod", "DELETED", POD)
        try:
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(LISTENER, first=True)
                assert await stream.nothing_more()
                plane.store.apply("Pod", "ADDED", POD)
                assert (await stream.receive()).type_url == LISTENER
        finally:
            await _stop(tasks)

    run(scenario)


def _client_channel(ca: certs.Issued, account: str, address: str) -> grpc.aio.Channel:
    leaf = certs.issue_workload(ca, "shop", account)
    credentials = grpc.ssl_channel_credentials(ca.cert_pem(), leaf.key_pem(), leaf.cert_pem())
    return grpc.aio.secure_channel(address, credentials,
                                   options=[("grpc.ssl_target_name_override", "meshguard.meshguard.svc")])


async def _first_answer(channel: grpc.aio.Channel) -> discovery_pb2.DiscoveryResponse:
    stream = Stream(channel)
    await stream.send(CLUSTER, first=True)
    return await stream.receive()


def test_over_mutual_tls_only_the_pods_own_identity_gets_its_config(run: Any) -> None:
    async def scenario() -> None:
        ca = certs.generate_ca("test mesh CA")
        plane, tasks = await start(tls_ca=ca)
        try:
            async with _client_channel(ca, "web", plane.address) as channel:
                assert (await _first_answer(channel)).type_url == CLUSTER
            async with _client_channel(ca, "intruder", plane.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _first_answer(channel)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "spiffe://cluster.local/ns/shop/sa/intruder" in (refused.value.details() or "")
            async with grpc.aio.insecure_channel(plane.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError):  # no certificate, no TLS: no config
                    await _first_answer(channel)
        finally:
            await _stop(tasks)

    run(scenario)


def test_proxy_configs_are_served_to_loopback_only(run: Any) -> None:
    import httpx

    from webhook.server import Readiness, build_health_app

    app = build_health_app(Readiness(), Metrics(), lambda namespace, pod: {"node": f"{namespace}/{pod}"})

    async def fetch(client: tuple[str, int]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://meshguard") as http:
            return await http.get("/debug/proxy-config/shop/web-0")

    remote = run(lambda: fetch(("10.0.0.7", 50000)))
    assert remote.status_code == 403 and "loopback" in remote.json()["error"]
    local = run(lambda: fetch(("127.0.0.1", 50000)))
    assert local.status_code == 200 and local.json() == {"node": "shop/web-0"}


def test_endpoint_changes_send_only_the_changed_assignment(run: Any) -> None:
    def slice_of(service: str, ip: str) -> dict[str, Any]:
        return {"kind": "EndpointSlice", "metadata": {"name": f"{service}-1", "namespace": "shop",
                                                      "labels": {"kubernetes.io/service-name": service}},
                "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": [ip]}]}

    other = {**SERVICE, "metadata": {"name": "db", "namespace": "shop"}}
    names = ("outbound|80||api.shop", "outbound|80||db.shop")

    async def scenario() -> None:
        plane, tasks = await start()
        plane.store.replace("Service", [SERVICE, other])
        plane.store.replace("EndpointSlice", [slice_of("api", "10.0.0.5"), slice_of("db", "10.0.0.6")])
        try:
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(ENDPOINTS, names=names, first=True)
                first = await stream.receive()
                assert len(first.resources) == 2
                await stream.send(ENDPOINTS, first.nonce, first.version_info, names=names)
                plane.store.apply("EndpointSlice", "MODIFIED", slice_of("api", "10.0.0.7"))
                second = await stream.receive()
                assert second.version_info != first.version_info and len(second.resources) == 1
                from envoy.config.endpoint.v3 import endpoint_pb2

                assignment = endpoint_pb2.ClusterLoadAssignment()
                second.resources[0].Unpack(assignment)
                assert assignment.cluster_name == "outbound|80||api.shop"
                address = assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address
                assert address == "10.0.0.7"
        finally:
            await _stop(tasks)

    run(scenario)


def test_the_control_planes_certificate_carries_an_identity_no_workload_certificate_can() -> None:
    ca = certs.generate_ca("test mesh CA")
    served = xds_server.server_certificate(ca, "meshguard", "meshguard", "cluster.local").cert
    uris = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [envoy.control_plane_id("cluster.local")]
    assert not envoy.control_plane_id("cluster.local").startswith("spiffe://cluster.local/ns/")  # workloads' form
