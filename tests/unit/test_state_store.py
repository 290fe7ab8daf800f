"""The in-memory store: its NetworkPolicy index against brute force, watch-event updates, live re-checks."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.metrics import Metrics
from webhook.policy.selectors import parse_selector
from webhook.state.files import FileSource, build_store, state_objects
from webhook.state.store import NAME_LABEL, NamespaceState, Store


def netpol(name: str, selector: dict[str, Any], namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"podSelector": selector, **spec}}


def peer_auth(name: str, mode: str, namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"mtls": {"mode": mode}}}


def names(store: Store, labels: dict[str, str], namespace: str = "shop") -> list[str]:
    return [p.name for p in store.network_policies_selecting(namespace, labels)]


# -- the index agrees with brute force -------------------------------------------------------------------------

KEYS = st.sampled_from(["app", "tier", "env"])
VALUES = st.sampled_from(["a", "b", "c"])


@st.composite
def selectors(draw: st.DrawFn) -> dict[str, Any]:
    exprs = []
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        expr: dict[str, Any] = {"key": draw(KEYS), "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = draw(st.lists(VALUES, min_size=1, max_size=2))
        exprs.append(expr)
    return {"matchLabels": draw(st.dictionaries(KEYS, VALUES, max_size=2)), "matchExpressions": exprs}


@settings(max_examples=200)
@given(st.lists(selectors(), max_size=12), st.lists(st.tuples(st.integers(0, 11), selectors()), max_size=4),
       st.sets(st.integers(0, 11), max_size=4), st.dictionaries(KEYS, VALUES, max_size=3))
def test_index_matches_brute_force_through_updates_and_deletes(
    initial: list[dict[str, Any]], updates: list[tuple[int, dict[str, Any]]], deletes: set[int], labels: dict[str, str]
) -> None:
    store = Store()
    current = {f"p{i}": sel for i, sel in enumerate(initial)}
    store.replace("NetworkPolicy", [netpol(n, s) for n, s in current.items()])
    for i, sel in updates:  # MODIFIED (or ADDED) with a different selector: the old bucket must be emptied
        current[f"p{i}"] = sel
        store.apply("NetworkPolicy", "MODIFIED", netpol(f"p{i}", sel))
    for i in deletes:
        current.pop(f"p{i}", None)
        store.apply("NetworkPolicy", "DELETED", netpol(f"p{i}", {}))
    expected = sorted(n for n, s in current.items() if parse_selector(s).matches(labels))
    assert names(store, labels) == expected
    assert store.count("NetworkPolicy") == len(current)


def test_ten_thousand_policies_in_one_namespace() -> None:
    policies = [netpol(f"svc-{i:05}", {"matchLabels": {"app": f"svc-{i}"}}) for i in range(10_000)]
    policies.append(netpol("zz-team", {"matchExpressions": [{"key": "team", "operator": "Exists"}]}))
    policies.append(netpol("zz-not-canary", {"matchExpressions": [{"key": "track", "operator": "NotIn",
                                                                     "values": ["canary"]}]}))
    store = Store()
    assert store.replace("NetworkPolicy", policies) == []
    assert names(store, {"app": "svc-4242"}) == ["svc-04242", "zz-not-canary"]
    assert names(store, {"app": "svc-4242", "team": "x", "track": "canary"}) == ["svc-04242", "zz-team"]
    assert names(store, {"app": "nope", "track": "canary"}) == []
    assert names(store, {"app": "svc-1"}, namespace="other") == []


# -- writes ------------------------------------------------------------------------------------------------------

def test_namespaces_carry_the_name_label_like_the_api_server_sets_it() -> None:
    store = Store()
    store.replace("Namespace", [{"metadata": {"name": "shop", "labels": {"team": "a"}}}])
    assert store.namespace_labels("shop") == {"team": "a", NAME_LABEL: "shop"}
    assert store.namespace_labels("unknown") == {NAME_LABEL: "unknown"}
    assert store.has_namespace("shop") and not store.has_namespace("unknown")
    store.apply("Namespace", "DELETED", {"metadata": {"name": "shop"}})
    assert not store.has_namespace("shop")


def test_an_invalid_update_removes_the_previous_version() -> None:
    store = Store()
    store.replace("NetworkPolicy", [netpol("p", {})])
    problem = store.apply("NetworkPolicy", "MODIFIED",
                          netpol("p", {"matchExpressions": [{"key": "a", "operator": "Bogus"}]}))
    assert problem is not None and problem.startswith("NetworkPolicy shop/p was ignored:")
    assert names(store, {}) == []
    assert store.apply("NetworkPolicy", "ADDED", {"metadata": {"namespace": "shop"}}) == \
        "a NetworkPolicy without metadata.name was ignored"


def test_replace_namespace_installs_a_live_read_and_keeps_unreadable_peer_authentications() -> None:
    store = Store()
    store.replace("NetworkPolicy", [netpol("old", {}), netpol("elsewhere", {}, namespace="other")])
    store.replace("PeerAuthentication", [peer_auth("default", "STRICT")])
    store.replace_namespace(NamespaceState("shop", {"metadata": {"name": "shop", "labels": {"a": "b"}}},
                                           [netpol("new", {})], None))
    assert names(store, {}) == ["new"] and names(store, {}, "other") == ["elsewhere"]
    assert [p.name for p in store.peer_authentications("shop")] == ["default"]
    assert store.namespace_labels("shop")["a"] == "b"
    store.replace_namespace(NamespaceState("shop", None, [], []))
    assert names(store, {}) == [] and store.peer_authentications("shop") == []
    assert not store.has_namespace("shop")


def test_object_counts_are_exported() -> None:
    metrics = Metrics()
    store = Store(metrics=metrics)
    store.replace("NetworkPolicy", [netpol("a", {}), netpol("b", {}, namespace="x")])
    store.apply("PeerAuthentication", "ADDED", peer_auth("default", "STRICT"))
    text = metrics.exposition()[0].decode()
    assert 'meshguard_state_objects{kind="NetworkPolicy"} 2.0' in text
    assert 'meshguard_state_objects{kind="PeerAuthentication"} 1.0' in text


# -- the live re-check -------------------------------------------------------------------------------------------

def test_refresh_without_a_reader_is_always_current() -> None:
    assert asyncio.run(Store().refresh(["shop"])) is True


def test_refresh_installs_what_the_reader_returns() -> None:
    calls: list[str] = []

    def reader(namespace: str) -> NamespaceState:
        calls.append(namespace)
        return NamespaceState(namespace, None, [netpol("fresh", {}, namespace=namespace)], None)

    store = Store(reader)
    assert asyncio.run(store.refresh(["shop", "istio-system", "shop"])) is True
    assert calls == ["shop", "istio-system"]
    assert names(store, {}) == ["fresh"] and names(store, {}, "istio-system") == ["fresh"]


def test_refresh_that_fails_or_times_out_is_not_confirmation() -> None:
    def broken(namespace: str) -> NamespaceState:
        raise ConnectionRefusedError("connection refused")

    assert asyncio.run(Store(broken).refresh(["shop"])) is False
    release = threading.Event()

    def stuck(namespace: str) -> NamespaceState:
        release.wait(30)
        return NamespaceState(namespace, None, [netpol("late", {})], None)

    async def timed_out() -> bool:
        try:
            return await store.refresh(["shop"])
        finally:
            release.set()  # let the worker thread finish, or asyncio.run would wait for it

    store = Store(stuck, recheck_timeout=0.05)
    assert asyncio.run(timed_out()) is False
    assert names(store, {}) == []


def test_concurrent_refreshes_of_a_namespace_share_one_read() -> None:
    calls: list[str] = []
    gate = threading.Event()

    def reader(namespace: str) -> NamespaceState:
        calls.append(namespace)
        gate.wait(10)
        return NamespaceState(namespace, None, [], None)

    async def main() -> list[bool]:
        store = Store(reader, recheck_timeout=10)
        waiting = [asyncio.create_task(store.refresh(["shop"])) for _ in range(20)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*waiting)
        results.append(await store.refresh(["shop"]))  # a later denial reads again
        return results

    assert asyncio.run(main()) == [True] * 21
    assert calls == ["shop", "shop"]


# -- files -------------------------------------------------------------------------------------------------------

def test_objects_without_a_namespace_go_to_the_default_one_on_a_copy() -> None:
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": {}}
    found = state_objects([policy, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}], "shop")
    assert found["NetworkPolicy"][0]["metadata"] == {"name": "p", "namespace": "shop"}
    assert policy["metadata"] == {"name": "p"}
    assert found["Namespace"] == [] and found["PeerAuthentication"] == []


def test_namespace_labels_from_the_command_line_merge_with_the_input() -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}}
    store, _ = build_store([ns], "shop", {"meshguard.io/inject": "enabled"})
    assert store.namespace_labels("shop") == {"team": "a", "meshguard.io/inject": "enabled", NAME_LABEL: "shop"}
    store, _ = build_store([], "shop", {"x": "y"})
    assert store.namespace_labels("shop") == {"x": "y", NAME_LABEL: "shop"}


def test_invalid_state_objects_are_reported() -> None:
    bad = netpol("bad", {"matchExpressions": [{"key": "a", "operator": "In"}]})
    _, problems = build_store([bad], "shop")
    assert problems == ["NetworkPolicy shop/bad was ignored: NetworkPolicy shop/bad spec.podSelector."
                        "matchExpressions[0]: operator In needs at least one value"]


def test_file_source_reads_the_directory_again_for_a_namespace(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([netpol("p1", {}), peer_auth("pa", "STRICT", "other")]))
    source = FileSource(tmp_path, "shop")
    store = Store(source.read_namespace)
    assert source.load(store) == []
    assert names(store, {}) == ["p1"]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(netpol("p2", {"matchLabels": {"app": "x"}})))
    assert names(store, {"app": "x"}) == ["p1"]  # memory only until a re-check
    assert asyncio.run(store.refresh(["shop"])) is True
    assert names(store, {"app": "x"}) == ["p1", "p2"]
    state = source.read_namespace("other")
    assert state.network_policies == [] and [p["metadata"]["name"] for p in state.peer_authentications] == ["pa"]


def test_file_source_unreadable_directory_raises(tmp_path: Path) -> None:
    from webhook.manifests import ManifestError

    with pytest.raises(ManifestError):
        FileSource(tmp_path / "missing").read()


def test_file_source_follows_the_directory_as_a_watch_does_one_event_per_changed_object(tmp_path: Path) -> None:
    def service(name: str, ip: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
                "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}

    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([service("a", "10.96.0.1"), service("b", "10.96.0.2"),
                                                         netpol("p1", {})]))
    source = FileSource(tmp_path, "shop")
    store = Store(source.read_namespace)
    source.load(store)
    events: list[str] = []
    store.subscribe(events.append)

    async def change_and_follow() -> None:
        task = asyncio.create_task(source.follow(store))
        await asyncio.sleep(0)  # it has seen the directory as it is
        (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([service("a", "10.96.0.1"), service("c", "10.96.0.3"),
                                                             netpol("p1", {})]))
        try:
            while len(events) < 2:
                await asyncio.sleep(0.05)
        finally:
            task.cancel()

    asyncio.run(asyncio.wait_for(change_and_follow(), 10))
    assert events == ["Service", "Service"]  # b deleted, c added; a and the policy untouched
    assert sorted(s.name for s in store.catalog.services()) == ["a", "c"]


def test_file_source_parses_again_only_the_files_that_changed(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(netpol("p1", {})))
    b.write_text(yaml.safe_dump(netpol("p2", {})))
    settled = time.time_ns() - 10**10  # written a while ago: its timestamp can be trusted
    os.utime(a, ns=(settled, settled))
    source = FileSource(tmp_path, "shop")

    def names() -> list[str]:
        return [p["metadata"]["name"] for p in source.read()["NetworkPolicy"]]

    (first_a, _) = source.read()["NetworkPolicy"]
    b.write_text(yaml.safe_dump(netpol("p3", {"matchLabels": {"app": "x"}})))
    (again_a, again_b) = source.read()["NetworkPolicy"]
    assert again_a is first_a  # the same object: not parsed, and not compared field by field by a follower
    assert again_b["metadata"]["name"] == "p3"
    # Written again within one tick of its timestamp, at the same size: the new version is read all the same.
    tick = b.stat().st_mtime_ns
    b.write_text(yaml.safe_dump(netpol("p4", {"matchLabels": {"app": "x"}})))
    os.utime(b, ns=(tick, tick))
    assert names() == ["p1", "p4"]
    b.unlink()
    assert names() == ["p1"]
