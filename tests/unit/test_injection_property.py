"""Property: for any pod, the patch applies, leaves exactly one proxy, touches nothing else, and is idempotent."""

from __future__ import annotations

from typing import Any

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.injection.podcheck import all_containers, pod_spec_problems, uninjected
from webhook.injection.decision import PROXY_NAME
from webhook.injection.patch import plan
from webhook.injection.settings import InjectionSettings
from webhook.workloads import as_workload

# Keys with '/' and '~' exercise JSON Pointer escaping; none is a meshguard key (those change the decision).
keys = st.text("abcz.~/-_", min_size=1, max_size=12).filter(lambda k: not k.startswith("meshguard"))
names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True).filter(lambda n: not n.startswith("meshguard"))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)
env = st.lists(st.builds(lambda n, v: {"name": n, "value": v}, names, st.text(max_size=10)), max_size=5)
SETTINGS = [InjectionSettings(), InjectionSettings(native_sidecar=False),
            InjectionSettings(native_sidecar=False, hold_application_until_proxy_starts=True)]


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    container_names = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    split = draw(st.integers(0, len(container_names) - 1))
    containers = [{"name": n, "image": "img", "env": draw(env), "x-future": draw(json_values)}
                  for n in container_names]
    meta: dict[str, Any] = {"generateName": "web-"}
    for key in ("annotations", "labels"):
        choice = draw(st.sampled_from(["absent", "null", "map"]))
        if choice != "absent":
            meta[key] = None if choice == "null" else draw(st.dictionaries(keys, st.text(max_size=8), max_size=4))
    spec: dict[str, Any] = {"containers": containers[split:]}
    if split:
        spec["initContainers"] = containers[:split]
    elif draw(st.booleans()):
        spec["initContainers"] = draw(st.sampled_from([None, []]))
    volumes = draw(st.sampled_from(["absent", "null", "list"]))
    if volumes != "absent":
        spec["volumes"] = None if volumes == "null" else [{"name": n, "emptyDir": {}} for n in
                                                          draw(st.lists(names, max_size=3, unique=True))]
    spec.update(draw(st.dictionaries(st.sampled_from(["nodeSelector", "futureField", "os"]), json_values)))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


@given(pod=pods(), mode=st.sampled_from(SETTINGS))
@settings(max_examples=200, deadline=None)
def test_patch_applies_once_and_only_adds(pod: dict[str, Any], mode: InjectionSettings) -> None:
    workload = as_workload(pod, "shop")
    assert workload is not None
    outcome = plan(workload, mode, "meshguard")
    assert outcome.decision.inject
    result = jsonpatch.apply_patch(pod, outcome.ops)
    assert [c["name"] for c in all_containers(result["spec"])].count(PROXY_NAME) == 1
    assert pod_spec_problems(result["spec"]) == []
    assert uninjected(result, pod) == pod
    second = as_workload(result, "shop")
    assert second is not None
    again = plan(second, mode, "meshguard")
    assert (again.decision.reason, again.ops) == ("already-injected", [])
