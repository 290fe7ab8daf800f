"""Override annotations and injection settings: valid values apply, invalid ones are named with their format."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from webhook import config
from webhook.injection.annotations import ANNOTATIONS, OVERRIDES
from webhook.injection.overrides import OverrideError, apply_overrides
from webhook.injection.settings import InjectionSettings
from webhook.injection.values import parse_quantity

DEFAULTS = InjectionSettings()
# A platform that lets pods use every override.
EVERY_OVERRIDE = InjectionSettings(allowed_overrides=tuple(OVERRIDES))


@pytest.mark.parametrize(("text", "value"), [
    ("100m", Decimal("0.1")), ("2", Decimal(2)), ("0.5", Decimal("0.5")), ("128Mi", Decimal(128 * 1024 ** 2)),
    ("1Gi", Decimal(1024 ** 3)), ("500M", Decimal(500 * 10 ** 6)), ("1e3", Decimal(1000)), (".5", Decimal("0.5")),
    ("250u", Decimal("0.00025")),
])
def test_parse_quantity(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


INVALID = [
    ("proxy-cpu", "lots", "a CPU quantity such as 100m"),
    ("proxy-cpu", "-1", "a CPU quantity"),
    ("proxy-memory", "128 Mi", "a memory quantity such as 128Mi"),
    ("proxy-cpu-limit", "2 cores", "a CPU quantity"),
    ("proxy-memory-limit", "1GB", "a memory quantity"),
    ("proxy-image", "Envoy Proxy:latest", "an image reference such as"),
    ("proxy-image", "", "an image reference"),
    ("log-level", "verbose", "one of trace, debug, info, warning, error, critical, off"),
    ("exclude-inbound-ports", "80,http", "up to 32 comma-separated ports 1-65535"),
    ("exclude-inbound-ports", "0", "up to 32 comma-separated ports 1-65535"),
    ("exclude-inbound-ports", "65536", "up to 32 comma-separated ports"),
    ("exclude-outbound-ports", "5432,,6379", "up to 32 comma-separated ports"),
    ("exclude-outbound-ports", "1_000", "up to 32 comma-separated ports"),
    ("include-outbound-ip-ranges", "10.0.0.0/33", "* or comma-separated CIDRs"),
    ("include-outbound-ip-ranges", "", "* or comma-separated CIDRs"),
    ("exclude-outbound-ip-ranges", "everything", "comma-separated CIDRs"),
    ("native-sidecar", "yes", '"true" or "false"'),
    ("hold-application-until-proxy-starts", "1", '"true" or "false"'),
    ("rewrite-app-probes", "no", '"true" or "false"'),
]


@pytest.mark.parametrize(("name", "value", "accepted"), INVALID, ids=[f"{c[0]}={c[1]!r}" for c in INVALID])
def test_invalid_override_names_annotation_and_format(name: str, value: str, accepted: str) -> None:
    with pytest.raises(OverrideError) as caught:
        apply_overrides(EVERY_OVERRIDE, {f"meshguard.io/{name}": value})
    assert str(caught.value).startswith(f'annotation meshguard.io/{name}: "{value}" is invalid; expected {accepted}')


def test_a_value_is_shown_quoted_so_that_it_cannot_start_a_line_of_its_own() -> None:
    with pytest.raises(OverrideError) as caught:
        apply_overrides(EVERY_OVERRIDE, {"meshguard.io/proxy-cpu": "1\nDeployment shop/web: allowed"})
    assert str(caught.value) == ('annotation meshguard.io/proxy-cpu: "1\\nDeployment shop/web: allowed" is invalid; '
                                 "expected a CPU quantity such as 100m, 0.5 or 2; fix or remove it")


def test_a_pod_may_choose_its_proxy_image_only_where_the_platform_lets_it() -> None:
    image = {"meshguard.io/proxy-image": "registry.example/envoy:patched", "meshguard.io/proxy-cpu": "200m"}
    with pytest.raises(OverrideError) as caught:
        apply_overrides(DEFAULTS, image)
    assert caught.value.problems == ["annotation meshguard.io/proxy-image is not one the platform lets pods set "
                                     "(injection.allowed_overrides); remove it"]
    assert apply_overrides(EVERY_OVERRIDE, image).proxy_image == "registry.example/envoy:patched"
    # The platform may take any override away from pods.
    with pytest.raises(OverrideError, match="meshguard.io/proxy-cpu is not one the platform lets pods set"):
        apply_overrides(InjectionSettings(allowed_overrides=("log-level",)), {"meshguard.io/proxy-cpu": "200m"})
    with pytest.raises(ValueError, match="'proxy-colour' is not an override annotation"):
        InjectionSettings(allowed_overrides=("proxy-colour",))


def test_a_port_list_is_a_few_exceptions_not_a_range() -> None:
    assert len(apply_overrides(EVERY_OVERRIDE, {"meshguard.io/exclude-inbound-ports": ",".join(
        map(str, range(1000, 1032)))}).exclude_inbound_ports) == 32
    with pytest.raises(OverrideError, match="is invalid; expected up to 32 comma-separated ports"):
        apply_overrides(EVERY_OVERRIDE, {"meshguard.io/exclude-inbound-ports": ",".join(map(str, range(1000, 1033)))})


def test_every_bad_annotation_is_reported_at_once() -> None:
    with pytest.raises(OverrideError) as caught:
        apply_overrides(DEFAULTS, {"meshguard.io/proxy-cpu": "x", "meshguard.io/log-level": "y"})
    assert len(caught.value.problems) == 2


def test_request_above_limit_is_rejected_in_annotation_terms() -> None:
    with pytest.raises(OverrideError, match=r"memory request 2Gi exceeds its limit 1Gi; make annotation "
                                            r"meshguard.io/proxy-memory <= meshguard.io/proxy-memory-limit"):
        apply_overrides(DEFAULTS, {"meshguard.io/proxy-memory": "2Gi"})
    raised = apply_overrides(DEFAULTS, {"meshguard.io/proxy-memory": "2Gi", "meshguard.io/proxy-memory-limit": "4Gi"})
    assert (raised.proxy_memory, raised.proxy_memory_limit) == ("2Gi", "4Gi")


def test_no_overrides_returns_the_same_settings_object() -> None:
    assert apply_overrides(DEFAULTS, {"team": "shop", "meshguard.io/inject": "true"}) is DEFAULTS


def test_values_are_normalised() -> None:
    applied = apply_overrides(DEFAULTS, {"meshguard.io/exclude-outbound-ip-ranges": "10.1.2.3/8, 169.254.169.254",
                                         "meshguard.io/exclude-inbound-ports": "",
                                         "meshguard.io/include-outbound-ip-ranges": " * "})
    assert applied.exclude_outbound_ip_ranges == ("10.0.0.0/8", "169.254.169.254/32")
    assert applied.exclude_inbound_ports == ()
    assert applied.include_outbound_ip_ranges == ("*",)


def test_annotation_list_is_the_documented_one() -> None:
    assert {a.removeprefix("meshguard.io/") for a in ANNOTATIONS} == {
        "proxy-cpu", "proxy-memory", "proxy-cpu-limit", "proxy-memory-limit", "proxy-image", "log-level",
        "exclude-inbound-ports", "exclude-outbound-ports", "include-outbound-ip-ranges",
        "exclude-outbound-ip-ranges", "native-sidecar", "hold-application-until-proxy-starts", "rewrite-app-probes"}


@pytest.mark.parametrize(("section", "fragment"), [
    ({"proxy_cpu": "lots"}, "injection.proxy_cpu"),
    ({"proxy_cpu": "4"}, "the proxy CPU request 4 exceeds its limit 2"),
    ({"exclude_inbound_ports": [0]}, "injection.exclude_inbound_ports"),
    ({"mesh_cidrs": ["10.0.0.0/40"]}, "injection.mesh_cidrs"),
    ({"include_outbound_ip_ranges": []}, "injection.include_outbound_ip_ranges"),
    ({"xds_address": "no-port"}, "xds_address 'no-port' must be host:port"),
    ({"proxy_image": "Bad Image"}, "injection.proxy_image"),
    ({"native_sidecars": True}, "injection.native_sidecars"),
])
def test_bad_config_fails_at_load(tmp_path: Path, section: dict[str, object], fragment: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"injection": section}))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert fragment in str(caught.value)


def test_config_file_and_environment_set_injection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("injection:\n  native_sidecar: false\n  exclude_outbound_ports: [5432]\n")
    monkeypatch.setenv("MESHGUARD_INJECTION__PROXY_IMAGE", "mirror.local/envoy:v1")
    settings = config.load(path)
    assert settings.injection.native_sidecar is False
    assert settings.injection.exclude_outbound_ports == (5432,)
    assert settings.injection.proxy_image == "mirror.local/envoy:v1"


def test_every_override_annotation_has_an_invalid_case() -> None:
    """A new override cannot be added without a test that its invalid values are named."""
    assert {f"meshguard.io/{name}" for name, _, _ in INVALID} == set(ANNOTATIONS)
