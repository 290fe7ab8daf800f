"""The ``xds`` section of the configuration: the control plane the injected proxies connect to."""

from __future__ import annotations

from pydantic import Field

from ..section import Section


class XdsSettings(Section):
    # Serve Envoy's aggregated discovery (ADS) to the proxies: they learn which peers are meshed from the cluster's
    # Services, EndpointSlices, Pods and ServiceCIDRs, and their inbound mode from PeerAuthentications, live. Needs
    # watches on those kinds (the chart's RBAC); the injector must be given injection.xds_address to use it.
    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = Field(15012, ge=1, le=65535, description="gRPC port of the ADS server")
    # A burst of changes (a Deployment rolling 50 pods) becomes one push: wait this long after a change...
    debounce_seconds: float = Field(0.1, ge=0, le=10)
    # ...but never longer than this after the first change of a burst.
    max_delay_seconds: float = Field(1.0, gt=0, le=60)
