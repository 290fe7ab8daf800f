"""Sidecar injection: whether a pod gets the mesh data plane, what is injected, and the JSON patch that does it."""
