"""meshguard: an admission webhook that injects an Envoy sidecar and enforces mTLS and NetworkPolicy coverage."""

__version__ = "0.1.0"
