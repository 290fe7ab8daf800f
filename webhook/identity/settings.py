"""The ``identity`` section of the configuration: where each proxy's workload certificate comes from."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from ..section import Section

# The API that issues a certificate per pod (Kubernetes 1.37: GA, served by default).
POD_CERTIFICATES_API = "certificates.k8s.io/v1"


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
