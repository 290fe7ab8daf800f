"""``meshguard inject``: manifests in, injected manifests out, through the real command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.conftest import CORPUS, ROOT
from webhook.cli import main
from webhook.injection.decision import INIT_NAME, PROXY_NAME, STATUS_ANNOTATION
from webhook.workloads import TEMPLATE_PATHS, as_workload

CONTAINERS = {"containers": [{"name": "app", "image": "app:1"}]}


def controller(kind: str) -> dict[str, Any]:
    """A minimal object of ``kind`` with its pod template where TEMPLATE_PATHS says."""
    obj: dict[str, Any] = {"apiVersion": "v1" if kind in ("Pod", "ReplicationController") else "apps/v1",
                           "kind": kind, "metadata": {"name": kind.lower()}}
    path = TEMPLATE_PATHS[kind]
    if not path:
        obj["spec"] = dict(CONTAINERS)
        return obj
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = {"metadata": {"labels": {"app": "x"}}, "spec": dict(CONTAINERS)}
    return obj


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["inject", *args])
    out, err = capsys.readouterr()
    return code, out, err


def proxy_names(obj: dict[str, Any]) -> list[str]:
    workload = as_workload(obj)
    assert workload is not None
    spec = workload.pod_spec
    return [c["name"] for c in spec.get("initContainers", [])]


def test_every_controller_kind_and_nothing_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}
    objects = [controller(kind) for kind in TEMPLATE_PATHS] + [service]
    source = tmp_path / "all.yaml"
    source.write_text(yaml.safe_dump_all(objects))
    code, out, err = run(capsys, "-f", str(source))
    assert (code, err) == (0, "")
    result = list(yaml.safe_load_all(out))
    assert [o["kind"] for o in result] == [*TEMPLATE_PATHS, "Service"]
    for obj in result[:-1]:
        assert proxy_names(obj) == [INIT_NAME, PROXY_NAME], obj["kind"]
        assert STATUS_ANNOTATION in as_workload(obj).annotations  # type: ignore[union-attr]
    assert result[-1] == service
    assert "&id" not in out  # each manifest gets its own copy, not a YAML alias of a shared one


def test_json_list_in_json_out_and_second_pass_is_a_no_op(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "list.json"
    source.write_bytes(orjson.dumps({"apiVersion": "v1", "kind": "List",
                                     "items": [controller("Deployment"), controller("Job")]}))
    code, out, _ = run(capsys, "-f", str(source), "-o", "json")
    assert code == 0
    items = orjson.loads(out)["items"]
    assert [proxy_names(o) for o in items] == [[INIT_NAME, PROXY_NAME]] * 2
    again = tmp_path / "again.json"
    again.write_text(out)
    code, out2, err = run(capsys, "-f", str(again), "-o", "json")
    assert code == 0 and orjson.loads(out2) == orjson.loads(out)
    assert err.count("already has the meshguard proxy") == 2


def test_directory_and_skips_reported_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opted_out = controller("Deployment")
    opted_out["spec"]["template"]["metadata"]["labels"]["meshguard.io/inject"] = "false"
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(opted_out))
    (tmp_path / "b.yml").write_text(yaml.safe_dump(controller("StatefulSet")))
    (tmp_path / "notes.txt").write_text("not a manifest")
    code, out, err = run(capsys, "-f", str(tmp_path), "--namespace", "shop")
    assert code == 0
    first, second = yaml.safe_load_all(out)
    assert first == opted_out
    assert proxy_names(second) == [INIT_NAME, PROXY_NAME]
    assert err == ("meshguard: left Deployment shop/deployment unchanged: "
                   "the pod opted out with the label meshguard.io/inject=false\n")


def test_system_namespace_from_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "pod.yaml"
    source.write_text(yaml.safe_dump(controller("Pod")))
    code, out, err = run(capsys, "-f", str(source), "-n", "kube-system")
    assert code == 0 and yaml.safe_load(out) == controller("Pod")
    assert "never injected" in err


def test_config_file_selects_classic_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yaml").write_text("injection:\n  native_sidecar: false\n")
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(controller("Pod")))
    code, out, _ = run(capsys, "-f", str(tmp_path / "pod.yaml"), "--config", str(tmp_path / "config.yaml"))
    assert code == 0
    assert [c["name"] for c in yaml.safe_load(out)["spec"]["containers"]] == ["app", PROXY_NAME]


def test_invalid_override_fails_with_the_annotation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pod = controller("Pod")
    pod["metadata"]["annotations"] = {"meshguard.io/proxy-memory": "lots"}
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    code, out, err = run(capsys, "-f", str(tmp_path / "pod.yaml"))
    assert (code, out) == (1, "")
    assert err == ('meshguard: cannot inject Pod default/pod: annotation meshguard.io/proxy-memory: "lots" is '
                   "invalid; expected a memory quantity such as 128Mi, 1Gi or 500M; fix or remove it\n")


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: d / "missing.yaml", "no such file or directory"),
    (lambda d: (d / "bad.yaml").write_text("kind: [unclosed") and d / "bad.yaml", "not valid YAML or JSON"),
    (lambda d: (d / "scalar.yaml").write_text("just text") and d / "scalar.yaml", "expected Kubernetes objects"),
    (lambda d: (d / "bin.yaml").write_bytes(b"\xff\xfe\x00") and d / "bin.yaml", "cannot read"),
])
def test_unreadable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: Any,
                                  message: str) -> None:
    path = setup(tmp_path)
    code, out, err = run(capsys, "-f", str(path))
    assert (code, out) == (2, "")
    assert err.startswith("meshguard: ") and message in err and str(path) in err


def test_stdin_through_the_installed_command() -> None:
    """The real process: ``kubectl``-style piping of a corpus file through ``meshguard inject -f -``."""
    source = (CORPUS / "bookinfo/bookinfo.yaml").read_text()
    done = subprocess.run([sys.executable, "-m", "webhook", "inject", "-f", "-"], input=source, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert len(deployments) == 6 and all(proxy_names(d)[:2] == [INIT_NAME, PROXY_NAME] for d in deployments)
    assert len(objects) == len([o for o in yaml.safe_load_all(source) if o])
