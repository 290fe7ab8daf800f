"""The cluster's own namespaces: meshguard never injects into them, never denies in them, and the chart's
webhooks are not called for them (a test compares the chart with this list). Their pods run the control plane,
which a mistaken denial or a sidecar waiting for meshguard would stop."""

SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
