"""The ``identity`` section of the configuration: where each proxy's workload certificate comes from."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Literal

from pydantic import Field, model_validator

from ..section import Section
from .authority import Timing

# The APIs that issue a certificate per pod, preferred first: GA and served by default from Kubernetes 1.37;
# v1beta1 on 1.35 and 1.36 where the cluster enables it (PodCertificateRequest and ClusterTrustBundle).
POD_CERTIFICATES_APIS = ("certificates.k8s.io/v1", "certificates.k8s.io/v1beta1")


class IdentitySettings(Section):
    # pod-certificate: each pod gets its own certificate through a Kubernetes Pod Certificate, signed by meshguard;
    # secret: meshguard keeps a certificate Secret per ServiceAccount of the mesh, and the proxy mounts its pod's;
    # auto: pod-certificate when the API server serves PodCertificateRequests, else secret (decided at start);
    # static: the proxy mounts the Secret injection.cert_secret of its namespace, made by the platform team.
    mode: Literal["auto", "pod-certificate", "secret", "static"] = "auto"
    # The signer meshguard answers PodCertificateRequests for, and names its ClusterTrustBundle after.
    signer_name: str = Field("meshguard.io/workload", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    # Lifetime of a workload certificate (never above a request's maxExpirationSeconds); it is renewed from
    # half-life on (by the kubelet, or by meshguard in the ServiceAccount's Secret).
    lifetime_hours: int = Field(24, ge=1, le=24 * 90)
    # The Secret in meshguard's namespace that keeps the mesh CA; the first replica to start fills it in.
    ca_secret: str = Field("meshguard-mesh-ca", min_length=1, max_length=253)
    ca_validity_days: int = Field(3650, ge=30, le=36500)
    # A CA meshguard made gets a successor this long before it expires (a CA of the platform's own is warned about
    # from then on: meshguard_mesh_ca_expiring).
    ca_renew_before_days: int = Field(90, ge=1)
    # How long a new CA is trusted before it signs: the time for every proxy to receive the new trust bundle (the
    # kubelet refreshes mounted bundles and Secrets within minutes).
    ca_propagation_minutes: float = Field(60, ge=0)

    @model_validator(mode="after")
    def _rotation_fits(self) -> IdentitySettings:
        timing = self.ca_timing
        if timing.renew_before >= timing.validity:
            raise ValueError("ca_renew_before_days must be shorter than ca_validity_days")
        if timing.renew_before < timing.propagation + timing.lifetime:
            raise ValueError("ca_renew_before_days must leave room for ca_propagation_minutes and a certificate "
                             "lifetime (lifetime_hours) before the CA expires")
        return self

    @property
    def ca_timing(self) -> Timing:
        return Timing(validity=dt.timedelta(days=self.ca_validity_days),
                      renew_before=dt.timedelta(days=self.ca_renew_before_days),
                      propagation=dt.timedelta(minutes=self.ca_propagation_minutes),
                      lifetime=dt.timedelta(hours=self.lifetime_hours))

    @property
    def trust_bundle_name(self) -> str:
        return trust_bundle_name(self.signer_name)


def trust_bundle_name(signer: str) -> str:
    """The ClusterTrustBundle holding the mesh CA: a signer-linked bundle's name starts with the signer's."""
    return signer.replace("/", ":") + ":mesh-ca"


# The Secret meshguard keeps for a ServiceAccount (identity.mode: secret) is this prefix and the account's name.
ACCOUNT_SECRET_PREFIX = "meshguard-identity-"
_NAME_LIMIT = 253  # a Secret's name is a DNS subdomain


def account_secret_name(account: str) -> str:
    """The name of the Secret holding ``account``'s workload certificate: the injector mounts it, the controller
    keeps it. An account name too long for the prefix is cut and told apart by a digest of the whole."""
    name = ACCOUNT_SECRET_PREFIX + account
    if len(name) <= _NAME_LIMIT:
        return name
    digest = hashlib.sha256(account.encode()).hexdigest()[:10]
    return f"{name[:_NAME_LIMIT - 11].rstrip('.-')}-{digest}"
