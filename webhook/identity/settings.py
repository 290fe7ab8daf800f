"""The ``identity`` section of the configuration: where each proxy's workload certificate comes from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..section import Section

# The API that issues a certificate per pod (Kubernetes 1.37: GA, served by default).
POD_CERTIFICATES_API = "certificates.k8s.io/v1"


class IdentitySettings(Section):
    # pod-certificate: each pod gets its own certificate through a Kubernetes Pod Certificate, signed by meshguard;
    # secret: the proxy mounts the Secret injection.cert_secret of its namespace, made by the platform team;
    # auto: pod-certificate when the API server serves PodCertificateRequests, else secret (decided at start).
    mode: Literal["auto", "pod-certificate", "secret"] = "auto"
    # The signer meshguard answers PodCertificateRequests for, and names its ClusterTrustBundle after.
    signer_name: str = Field("meshguard.io/workload", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    # Lifetime of a workload certificate (never above the request's maxExpirationSeconds); the kubelet renews it
    # from half-life on.
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
