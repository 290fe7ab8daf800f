"""meshguard: an admission webhook that injects an Envoy sidecar and enforces mTLS and NetworkPolicy coverage."""

# The version, written only here: the package metadata reads it; tests hold the chart and Dockerfile to it.
__version__ = "0.1.0"
