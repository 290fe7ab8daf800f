"""The delta ADS protocol over a real gRPC connection: nonces, ACK, NACK, stale requests, only what changed pushed,
reconnection with the versions held, subscriptions, and who may ask (mutual TLS with the pod's identity)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
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
from webhook.xds.plane import CLUSTER, ENDPOINTS, LISTENER, TYPES, ControlPlane
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
    control: ControlPlane


@contextlib.asynccontextmanager
async def started(tls_ca: certs.Issued | None = None) -> AsyncIterator[Plane]:
    """A control plane serving ADS on a free port, with POD in its state; stopped on leaving."""
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
    try:
        yield Plane(state, metrics, servicer, f"127.0.0.1:{settings.port}", plane)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Stream:
    """One delta ADS stream; responses are read by a task of their own (cancelling a read would cancel the call)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
        self.responses: asyncio.Queue[discovery_pb2.DeltaDiscoveryResponse | grpc.aio.AioRpcError] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                await self.responses.put(response)
        except grpc.aio.AioRpcError as exc:
            await self.responses.put(exc)

    async def send(self, type_url: str, nonce: str = "", subscribe: tuple[str, ...] = (),
                   unsubscribe: tuple[str, ...] = (), error: str | None = None, first: bool = False,
                   held: dict[str, str] | None = None) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, response_nonce=nonce, resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe), initial_resource_versions=held or {})
        if first:
            request.node.CopyFrom(node())
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(request)

    async def receive(self, timeout: float = 30) -> discovery_pb2.DeltaDiscoveryResponse:
        item = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        return item

    async def nothing_more(self) -> bool:
        await asyncio.sleep(SILENCE)
        return self.responses.empty()


def names(response: discovery_pb2.DeltaDiscoveryResponse) -> set[str]:
    return {resource.name for resource in response.resources}


def held(plane: Plane, type_url: str) -> set[str]:
    """The names the server records web-0's proxy as holding of ``type_url`` (``meshguard proxy-config``)."""
    described = plane.servicer.describe("shop", "web-0") or {}
    return {r.get("name") or r.get("cluster_name") for r in described.get("resources", {}).get(TYPES[type_url], [])}


@pytest.fixture
def run() -> Any:
    def runner(test: Any) -> Any:
        return asyncio.run(asyncio.wait_for(test(), 120))
    return runner


def test_ack_nack_and_only_what_changed_is_pushed(run: Any) -> None:
    def service(name: str, ip: str) -> dict[str, Any]:
        return {**SERVICE, "metadata": {"name": name, "namespace": "shop"},
                "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}}

    api, db, cache = SERVICE, service("db", "10.96.0.11"), service("cache", "10.96.0.12")

    async def scenario() -> None:
        async with started() as plane, grpc.aio.insecure_channel(plane.address) as channel:
            stream = Stream(channel)
            await stream.send(CLUSTER, first=True)
            first = await stream.receive()
            assert first.type_url == CLUSTER and first.nonce and envoy.MESH_CLUSTER in names(first)
            await stream.send(CLUSTER, first.nonce)  # ACK
            assert await stream.nothing_more()
            assert plane.servicer.describe("shop", "web-0")["nonces"]["cds"] == {
                "sent": first.nonce, "acked": first.nonce}
            # A Service appears: its cluster alone is sent; another, before the proxy answered: its own.
            plane.store.replace("Service", [api])
            second = await stream.receive()
            assert second.nonce != first.nonce and names(second) == {"outbound|10.96.0.10:80"}
            plane.store.replace("Service", [api, db])
            third = await stream.receive()
            assert names(third) == {"outbound|10.96.0.11:80"}
            # The earlier response is NACKed after the later one was sent: each is answered on its own.
            await stream.send(CLUSTER, second.nonce, error="bad cluster")
            await stream.send(CLUSTER, third.nonce)
            assert await stream.nothing_more()  # not sent again now
            assert plane.metrics.xds_nacks.labels("cds").value == 1
            # A nonce already answered is stale: ignored, no NACK counted.
            await stream.send(CLUSTER, first.nonce, error="late")
            assert await stream.nothing_more()
            assert plane.metrics.xds_nacks.labels("cds").value == 1
            # The next change carries the rejected cluster again, with what changed.
            plane.store.replace("Service", [api, db, cache])
            fourth = await stream.receive()
            assert names(fourth) == {"outbound|10.96.0.10:80", "outbound|10.96.0.12:80"}
            await stream.send(CLUSTER, fourth.nonce)
            # A Service goes: its cluster is named for removal, nothing else is sent.
            plane.store.replace("Service", [db, cache])
            fifth = await stream.receive()
            assert not fifth.resources and list(fifth.removed_resources) == ["outbound|10.96.0.10:80"]
            assert plane.metrics.xds_pushes.labels("cds").value == 5

    run(scenario)


def test_endpoints_are_sent_for_the_names_subscribed_and_listeners_for_the_pod(run: Any) -> None:
    other = {**SERVICE, "metadata": {"name": "db", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.11",
                                                                                  "ports": [{"port": 80}]}}

    async def scenario() -> None:
        async with started() as plane:
            plane.store.replace("Service", [SERVICE, other])
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(ENDPOINTS, subscribe=("outbound|80||api.shop", "unknown"), first=True)
                endpoints = await stream.receive()
                assert endpoints.type_url == ENDPOINTS and names(endpoints) == {"outbound|80||api.shop"}
                await stream.send(LISTENER)
                listeners = await stream.receive()
                assert names(listeners) == {"inbound", "outbound"}
                await stream.send(ENDPOINTS, endpoints.nonce)  # ACK: the nonce is answered
                # A subscription change is honoured even with a stale nonce: only the new name is sent.
                await stream.send(ENDPOINTS, endpoints.nonce, subscribe=("outbound|80||db.shop",))
                assert names(await stream.receive()) == {"outbound|80||db.shop"}
                # Unsubscribed: its changes are no longer sent. (Once the server has read it: a change made before
                # would rightly still be sent.)
                assert "outbound|80||api.shop" in held(plane, ENDPOINTS)
                await stream.send(ENDPOINTS, unsubscribe=("outbound|80||api.shop",))
                while "outbound|80||api.shop" in held(plane, ENDPOINTS):
                    await asyncio.sleep(0.01)
                plane.store.replace("EndpointSlice", [{
                    "kind": "EndpointSlice", "metadata": {"name": "api-1", "namespace": "shop",
                                                          "labels": {"kubernetes.io/service-name": "api"}},
                    "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["10.0.0.5"]}]}])
                assert await stream.nothing_more()

    run(scenario)


def test_a_stream_subscribing_to_more_endpoints_than_there_could_be_is_ended(run: Any) -> None:
    """Each name is held and compared on every later request: a proxy written by hand must not grow that
    without bound (a legitimate one subscribes to the names its clusters carry)."""
    async def scenario() -> None:
        async with started() as plane:
            plane.store.replace("Service", [SERVICE])
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                too_long = "outbound|80||" + "x" * xds_server.MAX_NAME_LENGTH
                await stream.send(ENDPOINTS, subscribe=("outbound|80||api.shop", too_long), first=True)
                assert names(await stream.receive()) == {"outbound|80||api.shop"}
                assert held(plane, ENDPOINTS) == {"outbound|80||api.shop"}  # the overlong name is not kept
                many = tuple(f"outbound|80||s{i}.shop" for i in range(xds_server.MIN_SUBSCRIPTION_LIMIT))
                await stream.send(ENDPOINTS, subscribe=many)
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await stream.receive()
                assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "more than the 1024 allowed" in (ended.value.details() or "")

    run(scenario)


def test_a_reconnecting_proxy_gets_only_what_differs_from_the_versions_it_holds(run: Any) -> None:
    async def scenario() -> None:
        async with started() as plane:
            plane.store.replace("Service", [SERVICE])
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(CLUSTER, first=True)
                held = {resource.name: resource.version for resource in (await stream.receive()).resources}
            plane.store.replace("Service", [{**SERVICE, "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}}])
            held[envoy.PASSTHROUGH_CLUSTER] = "an older version"
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(CLUSTER, first=True, held=held)
                answer = await stream.receive()
                assert names(answer) == {"outbound|10.96.0.12:80", envoy.PASSTHROUGH_CLUSTER}
                assert list(answer.removed_resources) == ["outbound|10.96.0.10:80"]

    run(scenario)


def test_a_proxy_of_a_pod_not_yet_seen_waits_for_it(run: Any) -> None:
    async def scenario() -> None:
        async with started() as plane:
            plane.store.apply("Pod", "DELETED", POD)
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(LISTENER, first=True)
                assert await stream.nothing_more()
                plane.store.apply("Pod", "ADDED", POD)
                assert (await stream.receive()).type_url == LISTENER

    run(scenario)


def _client_channel(ca: certs.Issued, account: str, address: str) -> grpc.aio.Channel:
    leaf = certs.issue_workload(ca, "shop", account)
    credentials = grpc.ssl_channel_credentials(ca.cert_pem(), leaf.key_pem(), leaf.cert_pem())
    return grpc.aio.secure_channel(address, credentials,
                                   options=[("grpc.ssl_target_name_override", "meshguard.meshguard.svc")])


async def _first_answer(channel: grpc.aio.Channel) -> discovery_pb2.DeltaDiscoveryResponse:
    stream = Stream(channel)
    await stream.send(CLUSTER, first=True)
    return await stream.receive()


def test_over_mutual_tls_only_the_pods_own_identity_gets_its_config(run: Any) -> None:
    async def scenario() -> None:
        ca = certs.generate_ca("test mesh CA")
        async with started(tls_ca=ca) as plane:
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
    subscribed = ("outbound|80||api.shop", "outbound|80||db.shop")

    async def scenario() -> None:
        async with started() as plane:
            plane.store.replace("Service", [SERVICE, other])
            plane.store.replace("EndpointSlice", [slice_of("api", "10.0.0.5"), slice_of("db", "10.0.0.6")])
            async with grpc.aio.insecure_channel(plane.address) as channel:
                stream = Stream(channel)
                await stream.send(ENDPOINTS, subscribe=subscribed, first=True)
                first = await stream.receive()
                assert names(first) == set(subscribed)
                await stream.send(ENDPOINTS, first.nonce)
                plane.store.apply("EndpointSlice", "MODIFIED", slice_of("api", "10.0.0.7"))
                second = await stream.receive()
                assert names(second) == {"outbound|80||api.shop"}
                from envoy.config.endpoint.v3 import endpoint_pb2

                assignment = endpoint_pb2.ClusterLoadAssignment()
                second.resources[0].resource.Unpack(assignment)
                address = assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address
                assert address == "10.0.0.7"

    run(scenario)


def test_the_control_planes_certificate_carries_an_identity_no_workload_certificate_can() -> None:
    ca = certs.generate_ca("test mesh CA")
    served = xds_server.server_certificate(ca, "meshguard", "meshguard", "cluster.local").cert
    uris = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [envoy.control_plane_id("cluster.local")]
    assert not envoy.control_plane_id("cluster.local").startswith("spiffe://cluster.local/ns/")  # workloads' form


def test_a_proxy_that_stops_reading_does_not_keep_the_control_planes_snapshots_alive(run: Any) -> None:
    import gc
    import weakref

    async def scenario() -> None:
        async with started() as plane:
            servicer = plane.servicer
            requests: asyncio.Queue[Any] = asyncio.Queue()
            request = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER)
            request.node.CopyFrom(node())
            await requests.put(request)

            async def incoming() -> Any:
                while True:
                    yield await requests.get()

            stream = servicer.DeltaAggregatedResources(incoming(), None)  # type: ignore[arg-type]
            try:
                await stream.__anext__()  # its first response, and then it reads no more
                snapshots = []
                for index in range(20):
                    named = {**SERVICE, "metadata": {"name": f"s{index}", "namespace": "shop"}}
                    plane.store.replace("Service", [named])
                    await asyncio.sleep(0.05)  # the control plane rebuilds and wakes the stream
                    snapshots.append(weakref.ref(plane.control.current()))
                gc.collect()
                assert sum(ref() is not None for ref in snapshots) <= 2  # the current one, and at most the one sent
            finally:
                await stream.aclose()

    run(scenario)
