"""The internals of uvicorn and of the Kubernetes client that meshguard relies on are still there.

``webhook/connections.py`` subclasses uvicorn's httptools protocol and wraps its request cycle's transport;
``webhook/server.py`` hands uvicorn an SSL context factory; ``webhook/selfcert.py`` and ``webhook/state/kube.py``
call the generated client's transport (``param_serialize``/``call_api``) and read raw responses
(``_preload_content=False``). None of that is a stable public API, so ``pyproject.toml`` pins both packages to the
tested ranges, and these checks fail loudly, naming what moved, when an upgrade changes them.
"""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import version

import pytest
import uvicorn
from kubernetes import client
from packaging.requirements import Requirement
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tests.conftest import ROOT

PINS = {Requirement(r).name: Requirement(r) for r in
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}


@pytest.mark.parametrize("package", ["uvicorn", "kubernetes"])
def test_installed_version_is_in_the_pinned_range(package: str) -> None:
    pin = PINS[package]
    assert pin.specifier.filter([version(package)]), f"{package} {version(package)} is outside {pin}"
    assert any(s.operator == "<" for s in pin.specifier), f"{pin}: private APIs need an upper bound"


def test_uvicorn_protocol_hooks_meshguard_overrides() -> None:
    for hook in ("connection_made", "connection_lost", "on_message_begin", "on_url", "on_header",
                 "on_headers_complete", "on_message_complete", "send_400_response"):
        assert callable(getattr(HttpToolsProtocol, hook, None)), f"uvicorn's HttpToolsProtocol lost {hook}()"
    made = inspect.getsource(HttpToolsProtocol.__init__) + inspect.getsource(HttpToolsProtocol.connection_made)
    for attribute in ("self.cycle", "self.transport", "self.loop", "self.client"):
        assert attribute in made, f"uvicorn's HttpToolsProtocol no longer sets {attribute}"


def test_uvicorn_request_cycle_state_meshguard_reads() -> None:
    assert "transport" in inspect.signature(RequestResponseCycle.__init__).parameters
    source = inspect.getsource(RequestResponseCycle.__init__)
    for attribute in ("self.transport", "self.response_started", "self.response_complete", "self.disconnected",
                      "self.message_event"):
        assert attribute in source, f"uvicorn's RequestResponseCycle no longer sets {attribute}"


def test_uvicorn_config_takes_an_ssl_context_factory() -> None:
    assert "ssl_context_factory" in inspect.signature(uvicorn.Config.__init__).parameters


def test_kubernetes_client_transport_calls() -> None:
    serialize = inspect.signature(client.ApiClient.param_serialize).parameters
    assert {"method", "resource_path", "header_params", "body", "auth_settings"} <= set(serialize)
    assert "_request_timeout" in inspect.signature(client.ApiClient.call_api).parameters
    for call in (client.CoreV1Api.read_namespace, client.CoreV1Api.list_namespace):
        assert "_preload_content" in (call.__doc__ or ""), f"{call.__qualname__} lost _preload_content"
