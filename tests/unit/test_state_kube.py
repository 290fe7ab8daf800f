"""The live source through the kubernetes client's real HTTP code, against a small scripted API server.

The fake serves what kube-apiserver serves for list and watch (paged lists with a resourceVersion, newline-
delimited watch events, bookmarks, ``ERROR`` events and HTTP errors) and records every request, so the tests
assert the reflector's behaviour from the wire: what it lists, and from which resourceVersion it watches.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client

from tests.fakehttp import JSONHandler
from webhook.metrics import Metrics
from webhook.policy.settings import StateSettings
from webhook.state.catalog import SERVICE_CIDR
from webhook.state.kube import Cluster, ClusterError, KubeSource, api_client, read_all
from webhook.state.store import KINDS, Store

NAMESPACES = "/api/v1/namespaces"
POLICIES = "/apis/networking.k8s.io/v1/networkpolicies"
PA_V1 = "/apis/security.istio.io/v1/peerauthentications"
PA_V1BETA1 = "/apis/security.istio.io/v1beta1/peerauthentications"
SERVICE_CIDRS = "/apis/networking.k8s.io/v1/servicecidrs"
FAST = StateSettings(backoff_initial_seconds=0.01, backoff_max_seconds=0.05, watch_timeout_seconds=30,
                     crd_poll_seconds=60)


def obj(name: str, rv: str, namespace: str | None = "shop", labels: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": rv, "labels": labels or {}}
    if namespace:
        meta["namespace"] = namespace
    return {"metadata": meta, "spec": spec or {"podSelector": {}}}


def listing(items: list[dict[str, Any]], rv: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    meta: dict[str, Any] = {"resourceVersion": rv}
    if token:
        meta["continue"] = token
    return 200, {"kind": "List", "apiVersion": "v1", "metadata": meta, "items": items}


def event(kind: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": item}


def gone() -> dict[str, Any]:
    return {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                        "reason": "Expired", "message": "too old resource version: 20 (35)"}}


def status(code: int) -> tuple[int, dict[str, Any]]:
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": f"HTTP {code}"}


class FakeAPI:
    """Scripted responses per path: ``lists[path]`` and ``watches[path]`` are queues (the last list answer
    repeats; once the watch scripts run out, a watch is held open until the test ends). A watch script is a list
    of events, then the stream ends (a ``threading.Event`` in it holds the stream until set); an int is an HTTP
    error status instead."""

    def __init__(self) -> None:
        self.lists: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        self.watches: dict[str, list[list[dict[str, Any]] | int]] = defaultdict(list)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.closing = threading.Event()
        self._lock = threading.Lock()
        fake = self

        class Handler(JSONHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams, as kube-apiserver answers

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                with fake._lock:
                    fake.requests.append((url.path, query))
                if query.get("watch") == "true":
                    fake._watch(self, url.path)
                else:
                    fake._list(self, url.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _list(self, handler: JSONHandler, path: str) -> None:
        with self._lock:
            queue = self.lists.get(path)
            answer = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else status(404)
        handler.answer(*answer)

    def _watch(self, handler: JSONHandler, path: str) -> None:
        with self._lock:
            queue = self.watches.get(path)
            script = queue.pop(0) if queue else None
        if isinstance(script, int):
            handler.answer(*status(script))
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        if script is None:
            self.closing.wait(30)
            script = []
        for item in script:
            if isinstance(item, threading.Event):
                item.wait(30)
                continue
            line = json.dumps(item).encode() + b"\n"
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")

    def calls(self, path: str) -> list[str]:
        """``list`` or ``watch@<resourceVersion>`` for every request to ``path``, in order."""
        with self._lock:
            return [f"watch@{q.get('resourceVersion')}" if q.get("watch") == "true" else "list"
                    for p, q in self.requests if p == path]

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeAPI]:
    api = FakeAPI()
    api.lists[NAMESPACES] = [listing([obj("shop", "5", namespace=None)], "10")]
    api.lists[POLICIES] = [listing([obj("p1", "20")], "20")]
    yield api
    api.close()


def cluster(fake: FakeAPI) -> Cluster:
    return Cluster(client.ApiClient(client.Configuration(host=fake.url)))


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll until ``condition`` holds; the limit only turns a hang into a failure, it is not a timing claim."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


class Running:
    def __init__(self, fake: FakeAPI, kinds: tuple[str, ...] = KINDS, settings: StateSettings = FAST) -> None:
        self.metrics = Metrics()
        self.source = KubeSource(cluster(fake), settings, self.metrics, kinds)
        self.store = Store(self.source.read_namespace, 5, self.metrics)
        self.readiness: list[bool] = []  # a True for every call of the source's synced callback

    @property
    def synced(self) -> bool:
        return self.readiness[-1:] == [True]

    def policies(self, namespace: str = "shop") -> list[str]:
        return [p.name for p in self.store.network_policies_selecting(namespace, {})]

    def metric(self, text: str) -> bool:
        return text in self.metrics.exposition()[0].decode()


def follow(fake: FakeAPI, scenario: Callable[[Running], Any], kinds: tuple[str, ...] = KINDS,
           settings: StateSettings = FAST) -> Running:
    """Run the source against ``fake`` while ``scenario`` (a coroutine function) runs, then stop it."""
    running = Running(fake, kinds, settings)

    async def main() -> None:
        task = asyncio.create_task(running.source.run(running.store, lambda: running.readiness.append(True)))
        try:
            await scenario(running)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    # Cancelling the job stops every watch thread, including those blocked reading an open watch.
    asyncio.run(eventually(lambda: not any(t.name.startswith("watch-") for t in threading.enumerate()),
                           "watch threads end"))
    return running


def test_lists_in_pages_then_watches_and_resumes_from_the_last_resource_version(fake: FakeAPI) -> None:
    fake.lists[POLICIES] = [listing([obj("p0", "19")], "20", token="page2"), listing([obj("p1", "20")], "20")]
    fake.watches[POLICIES] = [[event("ADDED", obj("p2", "21")), event("DELETED", obj("p1", "22")),
                               {"type": "BOOKMARK", "object": {"kind": "NetworkPolicy",
                                                               "metadata": {"resourceVersion": "30"}}}]]
    fake.watches[NAMESPACES] = [[event("MODIFIED", obj("shop", "11", None, {"meshguard.io/inject": "enabled"}))]]

    async def scenario(r: Running) -> None:
        await eventually(lambda: r.synced, "first list of every kind")
        await eventually(lambda: fake.calls(POLICIES)[-1:] == ["watch@30"], "a second watch from the bookmark")
        await eventually(lambda: r.store.namespace_labels("shop").get("meshguard.io/inject") == "enabled",
                         "namespace update")

    r = follow(fake, scenario)
    assert r.policies() == ["p0", "p2"]
    # Two pages, one watch that ended, then a resumed watch: no re-list.
    assert fake.calls(POLICIES)[:4] == ["list", "list", "watch@20", "watch@30"]
    pages = [q for p, q in fake.requests if p == POLICIES and "watch" not in q]
    assert pages[0]["limit"] == "500" and "continue" not in pages[0] and pages[1]["continue"] == "page2"
    watch_query = next(q for p, q in fake.requests if p == POLICIES and q.get("watch"))
    assert watch_query["allowWatchBookmarks"] == "true" and watch_query["timeoutSeconds"] == "30"
    # No PeerAuthentication CRD: both versions were tried, and the kind still counts as synced.
    assert fake.calls(PA_V1) == ["list"] and fake.calls(PA_V1BETA1) == ["list"]
    assert r.metric('meshguard_state_objects{kind="NetworkPolicy"} 2.0')
    assert r.metric('meshguard_state_last_full_sync_timestamp_seconds{kind="NetworkPolicy"}')


@pytest.mark.parametrize("expiry", ["error-event", "http-410"])
def test_410_gone_lists_again_and_watches_from_the_new_list(fake: FakeAPI, expiry: str) -> None:
    fake.lists[POLICIES] = [listing([obj("p1", "20")], "20"), listing([obj("p3", "40")], "40")]
    fake.watches[POLICIES] = [[event("ADDED", obj("p2", "21")), gone()] if expiry == "error-event" else 410]

    async def scenario(r: Running) -> None:
        await eventually(lambda: fake.calls(POLICIES)[-1:] == ["watch@40"], "a watch from the new list")
        await eventually(lambda: r.policies() == ["p3"], "the re-list replaced the state")
        # The other kinds' first lists run concurrently: on a busy machine they may finish after the re-list.
        await eventually(lambda: r.synced, "first list of every kind")

    r = follow(fake, scenario)
    # p1 was deleted while the watch was expired: only a full re-list can notice, and it did.
    first_watch = "watch@20"
    assert fake.calls(POLICIES) == ["list", first_watch, "list", "watch@40"]
    assert r.metric('meshguard_state_watch_restarts_total{kind="NetworkPolicy",reason="expired"} 1.0')
    assert r.readiness == [True]  # an expired watch is routine: readiness never dropped


def test_errors_back_off_and_resume_the_watch_without_listing_again(fake: FakeAPI) -> None:
    fake.lists[POLICIES] = [status(503), listing([obj("p1", "20")], "20")]
    fake.watches[POLICIES] = [500, [event("ADDED", obj("p2", "21"))]]

    async def scenario(r: Running) -> None:
        await eventually(lambda: r.policies() == ["p1", "p2"], "the event after the retry")
        await eventually(lambda: fake.calls(POLICIES)[-1:] == ["watch@21"], "resumed from the event")

    r = follow(fake, scenario)
    assert fake.calls(POLICIES) == ["list", "list", "watch@20", "watch@20", "watch@21"]
    assert r.metric('meshguard_state_watch_restarts_total{kind="NetworkPolicy",reason="error"} 2.0')


def test_readiness_is_kept_while_a_kind_cannot_be_followed_after_the_first_sync(fake: FakeAPI) -> None:
    # Once everything is synced, the namespace watch ends and the API server refuses it three times (a restart).
    restart = threading.Event()
    fake.watches[NAMESPACES] = [[restart], 503, 503, 503]

    async def scenario(r: Running) -> None:
        await eventually(lambda: r.synced, "first sync")
        restart.set()
        await eventually(lambda: fake.calls(NAMESPACES).count("watch@10") == 5, "the watch retried until accepted")

    r = follow(fake, scenario)
    # Ready from the first sync on: the failed watches retried with the state kept, never withdrawn.
    assert r.readiness == [True]
    assert fake.calls(NAMESPACES) == ["list"] + ["watch@10"] * 5
    assert r.metric('meshguard_state_watch_restarts_total{kind="Namespace",reason="error"} 3.0')


def test_peer_authentication_crd_deleted_empties_the_kind_without_losing_readiness(fake: FakeAPI) -> None:
    pa = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
          "metadata": {"name": "default", "namespace": "shop", "resourceVersion": "50"},
          "spec": {"mtls": {"mode": "PERMISSIVE"}}}
    # Listed once; then the CRD is deleted: the watch and every later list are 404, in both versions.
    fake.lists[PA_V1] = [listing([pa], "50"), status(404)]
    fake.watches[PA_V1] = [404]

    async def scenario(r: Running) -> None:
        await eventually(lambda: fake.calls(PA_V1BETA1) == ["list"], "listed again after the 404")
        await eventually(lambda: r.store.count("PeerAuthentication") == 0, "the kind emptied")
        await eventually(lambda: r.synced, "first list of every kind")

    r = follow(fake, scenario)
    assert fake.calls(PA_V1) == ["list", "watch@50", "list"]  # then it waits crd_poll_seconds to look again
    assert r.readiness == [True]


@pytest.mark.parametrize("answer", [200, 404, 403])
def test_service_cidrs_are_followed_where_readable_and_synced_empty_where_not(fake: FakeAPI, answer: int) -> None:
    served = answer == 200
    fake.lists[SERVICE_CIDRS] = [listing([obj("kubernetes", "3", None, cidrs=["10.96.0.0/12", "fd00::/108"])], "3")
                                 if served else status(answer)]
    installs: list[str] = []

    async def scenario(r: Running) -> None:
        r.store.subscribe(lambda kind: installs.append(kind) if kind == SERVICE_CIDR else None)
        await eventually(lambda: r.synced, "first list of every kind")
        if served:
            await eventually(lambda: fake.calls(SERVICE_CIDRS)[-1:] == ["watch@3"], "a watch")
        else:  # looked for again, and again
            await eventually(lambda: len(fake.calls(SERVICE_CIDRS)) >= 3, "two more looks")

    polling = StateSettings(**{**FAST.model_dump(), "crd_poll_seconds": 0.05})
    r = follow(fake, scenario, (*KINDS, SERVICE_CIDR), polling)
    # Before 1.33 the API answers 404, without the RBAC 403: the proxies then match each ClusterIP, and the server
    # is ready all the same.
    assert r.store.catalog.service_cidrs() == (["10.96.0.0/12", "fd00::/108"] if served else [])
    assert r.readiness == [True]
    if served:
        assert fake.calls(SERVICE_CIDRS)[:2] == ["list", "watch@3"]
    else:  # each look that finds nothing changes nothing: no rebuild of every proxy's config
        assert set(fake.calls(SERVICE_CIDRS)) == {"list"} and installs == [SERVICE_CIDR]


def test_not_ready_until_every_kind_has_been_listed(fake: FakeAPI) -> None:
    fake.lists[POLICIES] = [status(403)]

    async def scenario(r: Running) -> None:
        await eventually(lambda: fake.calls(POLICIES).count("list") >= 3, "retries of the refused list")
        await eventually(lambda: fake.calls(NAMESPACES)[-1:] == ["watch@10"], "namespaces listed and watched")
        assert not r.synced

    follow(fake, scenario)


def test_peer_authentications_fall_back_to_v1beta1_and_recheck_uses_it(fake: FakeAPI) -> None:
    pa = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
          "metadata": {"name": "default", "namespace": "shop", "resourceVersion": "50"},
          "spec": {"mtls": {"mode": "PERMISSIVE"}}}
    fake.lists[PA_V1BETA1] = [listing([pa], "50")]
    fake.watches[PA_V1BETA1] = [[event("MODIFIED", {**pa, "spec": {"mtls": {"mode": "STRICT"}},
                                                    "metadata": {**pa["metadata"], "resourceVersion": "51"}})]]
    shop = "/apis/security.istio.io/v1beta1/namespaces/shop/peerauthentications"
    fake.lists[shop] = [listing([{**pa, "spec": {"mtls": {"mode": "DISABLE"}}}], "60")]
    fake.lists["/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies"] = [listing([obj("fresh", "61")], "61")]
    fake.lists["/api/v1/namespaces/shop"] = [(200, obj("shop", "62", None, {"team": "a"}))]

    async def scenario(r: Running) -> None:
        await eventually(lambda: [p.mode for p in r.store.peer_authentications("shop")] == ["STRICT"],
                         "the PeerAuthentication update")
        assert await r.store.refresh(["shop"]) is True

    r = follow(fake, scenario)
    assert fake.calls(PA_V1)[:1] == ["list"] and fake.calls(PA_V1BETA1)[:2] == ["list", "watch@50"]
    # The live re-check read the namespace, its policies and its PeerAuthentications (v1beta1, no 404 first).
    assert [p.mode for p in r.store.peer_authentications("shop")] == ["DISABLE"]
    assert r.policies() == ["fresh"] and r.store.namespace_labels("shop")["team"] == "a"
    assert "/apis/security.istio.io/v1/namespaces/shop/peerauthentications" not in {p for p, _ in fake.requests}


def test_recheck_of_a_deleted_namespace_and_without_the_crd(fake: FakeAPI) -> None:
    # The namespace is gone (GET 404); listing in a missing namespace is an empty list, as the API server answers.
    fake.lists["/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies"] = [listing([], "80")]

    async def scenario(r: Running) -> None:
        await eventually(lambda: r.synced, "sync")
        assert r.store.has_namespace("shop") and r.policies() == ["p1"]
        assert await r.store.refresh(["shop"]) is True

    r = follow(fake, scenario)
    assert not r.store.has_namespace("shop") and r.policies() == []
    assert not any("peerauthentications" in p and "namespaces" in p for p, _ in fake.requests)


def test_recheck_errors_are_not_confirmation(fake: FakeAPI) -> None:
    fake.lists["/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies"] = [status(500)]

    async def scenario(r: Running) -> None:
        await eventually(lambda: r.synced, "sync")
        assert await r.store.refresh(["shop"]) is False

    r = follow(fake, scenario)
    assert r.policies() == ["p1"]


def test_read_all_for_audit_and_its_errors(fake: FakeAPI) -> None:
    fake.lists["/apis/apps/v1/deployments"] = [listing([obj("web", "70")], "70")]
    seen: list[tuple[str, int]] = []
    for path in ("/api/v1/pods", "/api/v1/replicationcontrollers", "/apis/apps/v1/statefulsets",
                 "/apis/apps/v1/daemonsets", "/apis/apps/v1/replicasets", "/apis/batch/v1/jobs",
                 "/apis/batch/v1/cronjobs"):
        fake.lists[path] = [listing([], "70")]
    store, objects = read_all(cluster(fake), 100, lambda kind, n: seen.append((kind, n)))
    assert [(o["kind"], o["apiVersion"], o["metadata"]["name"]) for o in objects] == [("Deployment", "apps/v1", "web")]
    assert store.has_namespace("shop") and [p.name for p in store.network_policies_selecting("shop", {})] == ["p1"]
    assert ("Deployment", 1) in seen and ("Pod", 0) in seen
    fake.lists["/api/v1/pods"] = [status(403)]
    with pytest.raises(ClusterError) as raised:
        read_all(cluster(fake), 100, lambda kind, n: None)
    assert "cannot list Pod objects: HTTP 403" in str(raised.value)


def test_missing_kubeconfig_is_a_readable_error(tmp_path: Any) -> None:
    with pytest.raises(ClusterError) as raised:
        api_client(tmp_path / "nope")
    assert "cannot load cluster credentials from" in str(raised.value)
