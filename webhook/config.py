"""One typed configuration object, loaded once and passed in.

Precedence, lowest to highest: built-in defaults < YAML file (``--config``) < ``MESHGUARD_*`` environment
variables < command-line flags. Nested keys use ``__`` in environment variables, e.g.
``MESHGUARD_SERVER__PORT=9443`` sets ``server.port``. Nothing below the CLI reads the environment or a global:
every component receives the :class:`Settings` (or the section it needs) as an argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import MeshguardError
from .identity.settings import IdentitySettings
from .injection.settings import InjectionSettings
from .policy.settings import PolicySettings
from .section import Section
from .xds.settings import XdsSettings

MIB = 1024 * 1024


class ServerSettings(Section):
    host: str = "0.0.0.0"
    port: int = Field(8443, ge=1, le=65535, description="HTTPS port for /mutate and /validate")
    health_host: str = "0.0.0.0"
    health_port: int = Field(8080, ge=1, le=65535, description="plain HTTP port for /healthz, /readyz, /metrics")
    # The API server sends at most ~3 MiB of object, and an UPDATE carries object and oldObject:
    # 7 MiB is the same cap controller-runtime uses.
    max_body_bytes: int = Field(7 * MIB, ge=1024)
    # Slow clients must not pin connections: uvicorn closes a keep-alive connection idle this long.
    keepalive_timeout_seconds: float = Field(30.0, gt=0)
    # ...and a whole request (head and body) must arrive within this, from the connection's opening or the request's
    # first byte, or the client gets 408 and the connection is closed (uvicorn has no such timeout; this is Go's
    # http.Server ReadTimeout). The API server gives up on a webhook after 30 s at most.
    read_timeout_seconds: float = Field(10.0, gt=0)
    # The API server's headers take a few hundred bytes (a bearer token a few KiB); larger heads get 431.
    max_header_bytes: int = Field(64 * 1024, ge=4096)
    # After SIGTERM the server reports not-ready for this long before it stops accepting, so the
    # endpoints controller can take the pod out of the Service first.
    shutdown_delay_seconds: float = Field(0.0, ge=0)
    # How long in-flight requests get to finish after the listener closes.
    graceful_timeout_seconds: float = Field(20.0, gt=0)


class TLSSettings(Section):
    cert_dir: Path = Path("certs")
    min_version: Literal["1.2", "1.3"] = "1.2"
    # How often the serving certificate files are checked for rotation (cert-manager, Secret volumes).
    reload_interval_seconds: float = Field(2.0, gt=0)
    # Optional: require clients (the API server, via its admission kubeconfig) to present a certificate
    # signed by this CA.
    client_ca_file: Path | None = None
    # A serving certificate this close to expiry is logged as a warning and flagged by a metric.
    expiry_warning_days: int = Field(30, ge=0)


class LimitSettings(Section):
    """How much one Pod or pod template may carry before meshguard refuses to look at it (HTTP code 400).

    Far above any real workload (the API server caps annotations at 256 KiB in all, and a pod with more than a few
    dozen containers is unheard of), so only a broken or hostile object meets them; they bound the work one request
    can cause. Both webhooks deny such an object whatever their failure mode: padding an object must never be a way
    around policy.
    """

    # initContainers, containers and ephemeralContainers together.
    max_containers: int = Field(1000, ge=1)
    max_labels: int = Field(1000, ge=1)
    max_annotations: int = Field(1000, ge=1)


class FailureSettings(Section):
    """What a webhook answers when it cannot evaluate a well-formed request (a bug or an unexpected object).

    Injection denies by default so that no pod is silently created without its sidecar; the controller
    retries and the message says why. Validation allows by default so that a bug in a policy cannot stop the
    cluster; `meshguard audit` reports what slipped through.
    """

    mutate: Literal["allow", "deny"] = "deny"
    validate_: Literal["allow", "deny"] = Field("allow", alias="validate")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CertificateSettings(Section):
    """Self-managed serving certificate: the server keeps it in a Secret and patches the webhooks' caBundle.

    Off by default (cert-manager, Helm or a file provides ``tls.cert_dir``). When on, every replica keeps the
    Secret, the caBundle of both webhook configurations and its own ``tls.cert_dir`` in step, renewing the serving
    certificate ``renew_before_days`` before it expires; see webhook/selfcert.py.
    """

    self_managed: bool = False
    # The Secret (in ``namespace``) holding ca.crt, ca.key, tls.crt and tls.key.
    secret_name: str = Field("meshguard-tls", min_length=1, max_length=253)
    # The Service the API server calls: the certificate's DNS names are derived from it and ``namespace``.
    service: str = Field("meshguard", min_length=1, max_length=63)
    mutating_webhook: str = Field("meshguard", min_length=1, max_length=253)
    validating_webhook: str = Field("meshguard", min_length=1, max_length=253)
    validity_days: int = Field(365, ge=2, le=3650)
    renew_before_days: int = Field(90, ge=1)
    # How often the Secret and the webhook configurations are re-checked once they are in step.
    check_interval_seconds: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _renewal_inside_validity(self) -> CertificateSettings:
        if self.renew_before_days >= self.validity_days:
            raise ValueError(
                f"renew_before_days ({self.renew_before_days}) must be less than validity_days ({self.validity_days})"
            )
        return self


class Settings(BaseSettings):
    """The whole configuration of a meshguard process."""

    model_config = SettingsConfigDict(
        env_prefix="MESHGUARD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    # The namespace meshguard itself runs in: never injected, always exempt from policy.
    namespace: str = "meshguard"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # --dev: generate development certificates when missing and run without a cluster.
    dev: bool = False
    # A directory of manifests used as cluster state instead of the live API (for --dev and tests).
    state_dir: Path | None = None
    # Post a Kubernetes Event on the object for each denial, policy warning and notable injection skip (in a
    # cluster only; never for dry runs), so users see why in `kubectl describe`.
    events: bool = True
    server: ServerSettings = ServerSettings()
    tls: TLSSettings = TLSSettings()
    limits: LimitSettings = LimitSettings()
    failure: FailureSettings = FailureSettings()
    injection: InjectionSettings = InjectionSettings()
    policy: PolicySettings = PolicySettings()
    certificates: CertificateSettings = CertificateSettings()
    identity: IdentitySettings = IdentitySettings()
    xds: XdsSettings = XdsSettings()

class ConfigError(MeshguardError, ValueError):
    """The configuration file or environment is invalid; the message says where."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings from a YAML file, the environment and flag overrides (highest).

    ``overrides`` is a nested mapping such as ``{"server": {"port": 9443}}``; ``None`` values are ignored so
    that unset flags do not mask the file or the environment. Nested mappings from the layers are merged.
    """
    file_data = _read_yaml(config_file) if config_file else {}

    class _WithFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_data))

    try:
        return _WithFile(**_drop_none(overrides or {}))
    except ValidationError as exc:
        origin = f" (file {config_file})" if config_file else ""
        raise ConfigError(f"invalid configuration{origin}: {_summarise(exc)}") from exc


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
