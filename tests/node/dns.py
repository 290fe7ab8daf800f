"""The node's cluster DNS: CoreDNS with its kubernetes plugin, as kubeadm deploys it (the kube-dns Service in
kube-system), so that pods call Services by name and the kubelet writes it into every pod's resolv.conf.

It listens on 1053 as an unprivileged user (the Service maps port 53 to it) and has no upstream: the node has no
internet, and the scenarios only resolve cluster names.
"""

from __future__ import annotations

from typing import Any

from tests.node.images import COREDNS_IMAGE
from tests.node.node import CLUSTER_DOMAIN, DNS_IP

NAMESPACE = "kube-system"
_LABELS = {"k8s-app": "kube-dns"}
_COREFILE = f""".:1053 {{
    errors
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
}}
"""


def objects() -> list[dict[str, Any]]:
    meta = {"name": "coredns", "namespace": NAMESPACE}
    read = ["list", "watch"]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": read},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", **meta}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": _COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": 1, "selector": {"matchLabels": _LABELS},
                  "template": {"metadata": {"labels": _LABELS}, "spec": {
                      "serviceAccountName": "coredns",
                      "containers": [{
                          "name": "coredns", "image": COREDNS_IMAGE, "imagePullPolicy": "Never",
                          "args": ["-conf", "/etc/coredns/Corefile"],
                          "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}],
                          "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                          "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                              "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
                          "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}]}],
                      "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": NAMESPACE,
                                                             "labels": _LABELS},
         "spec": {"clusterIP": DNS_IP, "selector": _LABELS,
                  "ports": [{"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"}]}},
    ]
