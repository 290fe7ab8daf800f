"""Workload identity: the mesh CA, and the signer that issues each pod its certificate (Kubernetes Pod Certificates)."""
