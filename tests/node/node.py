"""A real node for the control plane of ``tests/e2e/cluster.py``: containerd, kubelet, kube-scheduler, kube-proxy.

Pods really run: runc containers on a CNI bridge (``mgnode0``, 10.244.0.0/24), kube-proxy's iptables rules for
Services (10.0.0.0/24; the API server is 10.0.0.1 through the node's address), kubelet probes, projected volumes.
Images come from ``tests/node/images.py`` and are imported into containerd: no registry is used.

What this machine needs (each found by hitting the failure; see docs/testing.md): cgroup v1 through
``failCgroupV1: false`` and the cgroupfs driver, containerd's ``restrict_oom_score_adj`` (no CAP_SYS_RESOURCE),
``net.ipv4.ip_forward=1`` for pod -> ClusterIP -> pod.

:meth:`Node.stop` undoes everything it did, in an order that leaves nothing behind even after a failed test:
controllers stopped first (nothing recreates pods), pods deleted, components stopped by PID, leftover
containers killed through runc, mounts and network namespaces under the state directory unmounted, the pods'
cgroups removed, kube-proxy's, the kubelet's and CNI's iptables chains dropped, the bridge deleted and
``ip_forward`` restored.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from tests.e2e.cluster import Component, ControlPlane, restartable_port, wait_for
from webhook import certs

NAME = "meshguard-node"
BRIDGE = "mgnode0"
POD_CIDR = "10.244.0.0/24"
SERVICE_CIDR = "10.0.0.0/24"
# The cluster DNS's Service address (tests/node/dns.py), as kubeadm picks it: the tenth of the Service range.
DNS_IP = str(ipaddress.ip_network(SERVICE_CIDR)[10])
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN = Path("/usr/lib/cni")
_CHAIN_PREFIXES = ("KUBE-", "CNI-")
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class NodeUnavailable(RuntimeError):
    """This machine cannot run the node (a missing package or privilege); the message says which."""


def node_ip() -> str:
    """The address of the interface of the default route (the node's InternalIP)."""
    out = subprocess.run(["ip", "-4", "-o", "route", "get", "192.0.2.255"], capture_output=True, text=True)
    match = re.search(r"\bsrc (\S+)", out.stdout)
    if not match:
        raise NodeUnavailable(f"no IPv4 route to give the node an address: {out.stderr.strip()}")
    return match.group(1)


def check_machine() -> None:
    """Raise :class:`NodeUnavailable` when a part the node needs is missing here."""
    if os.geteuid() != 0:
        raise NodeUnavailable("the node needs root (containers, mounts, iptables)")
    for tool in ("containerd", "ctr", "runc", "conntrack", "iptables", "ip"):
        if shutil.which(tool) is None:
            raise NodeUnavailable(f"{tool} is not installed (.ci/run installs containerd, runc, "
                                  "containernetworking-plugins, conntrack and iptables)")
    if not (CNI_BIN / "bridge").exists():
        raise NodeUnavailable(f"no CNI plugins in {CNI_BIN} (Debian's containernetworking-plugins)")


class Node:
    """One node registered with ``cluster`` (which must have been made with ``node_ip``)."""

    def __init__(self, cluster: ControlPlane, logs: Path) -> None:
        assert cluster.node_ip, "the control plane must be started with node_ip"
        self.cluster = cluster
        # Short: containerd's socket path (and the shims' beside it) must fit in a unix socket address.
        self.state = Path(tempfile.mkdtemp(prefix="mgnode-"))
        self.logs = logs
        self.components: dict[str, Component] = {}
        self.socket = self.state / "containerd" / "containerd.sock"
        self._ip_forward = _IP_FORWARD.read_text().strip()

    # --- start ------------------------------------------------------------------------------------------
    def start(self, images: list[Path]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        _IP_FORWARD.write_text("1\n")
        self._containerd()
        for archive in images:
            self.ctr("images", "import", "--no-unpack", str(archive))
        self._kubelet()
        self._scheduler()
        self._proxy()
        wait_for("the node to be Ready", self.ready, timeout=120, component=self.components["kubelet"])

    def _start(self, name: str, args: list[str]) -> Component:
        component = Component(name, args, self.logs / f"{name}.log")
        component.start()
        self.components[name] = component
        return component

    def _containerd(self) -> None:
        d = self.state / "containerd"
        cni = self.state / "cni"
        (cni / "net.d").mkdir(parents=True)
        (cni / "net.d" / "10-meshguard-node.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "meshguard-node",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (d / "config.toml").parent.mkdir(parents=True, exist_ok=True)
        (d / "config.toml").write_text(f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
[grpc]
  address = "{self.socket}"
[{cri}]
  sandbox_image = "localhost/pause:meshguard"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d / 'runc'}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni / 'net.d'}"
""")
        containerd = self._start("containerd", ["containerd", "--config", str(d / "config.toml")])
        wait_for("containerd", lambda: self.ctr("version", check=False).returncode == 0, component=containerd)

    def _kubelet(self) -> None:
        c = self.cluster
        ca = certs.load_pair(c.pki, "ca.crt", "ca.key")
        serving = certs.issue_leaf(ca, NAME, dns_names=(NAME,), ip_addresses=(c.node_ip,))
        certs.write_pair(self.state, serving, "kubelet.crt", "kubelet.key")
        kubeconfig = c.client_kubeconfig("kubelet", f"system:node:{NAME}", "system:nodes")
        config = self.state / "kubelet.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(c.pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(self.state / "kubelet.crt"), "tlsPrivateKeyFile": str(self.state / "kubelet.key"),
            "port": restartable_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": restartable_port(),
            "failSwapOn": False, "podLogsDir": str(self.state / "pod-logs"),
            # The images were imported, not pulled: never let the kubelet collect them, whatever the disk says.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "serializeImagePulls": False,
            # Pods resolve names with the cluster DNS (tests/node/dns.py), as on any cluster.
            "clusterDNS": [DNS_IP], "clusterDomain": CLUSTER_DOMAIN,
        }))
        self._start("kubelet", [
            str(c.bin / "kubelet"), "--config", str(config), "--kubeconfig", str(kubeconfig),
            "--root-dir", str(self.state / "kubelet"), "--hostname-override", NAME, "--node-ip", c.node_ip, "--v=1"])

    def _scheduler(self) -> None:
        kubeconfig = self.cluster.client_kubeconfig("kube-scheduler", "system:kube-scheduler")
        self._start("kube-scheduler", [
            str(self.cluster.bin / "kube-scheduler"), "--kubeconfig", str(kubeconfig),
            "--authentication-kubeconfig", str(kubeconfig), "--authorization-kubeconfig", str(kubeconfig),
            "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", str(restartable_port()),
            "--v=1"])

    def _proxy_config(self) -> Path:
        kubeconfig = self.cluster.client_kubeconfig("kube-proxy", "system:kube-proxy")
        config = self.state / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clientConnection": {"kubeconfig": str(kubeconfig)},
            "clusterCIDR": POD_CIDR, "hostnameOverride": NAME,
            # Never touch this machine's conntrack table size: 0 leaves it as it is.
            "conntrack": {"maxPerCore": 0},
            "iptables": {"localhostNodePorts": False},
            "healthzBindAddress": f"127.0.0.1:{restartable_port()}",
            "metricsBindAddress": f"127.0.0.1:{restartable_port()}",
        }))
        return config

    def _proxy(self) -> None:
        self._start("kube-proxy", [str(self.cluster.bin / "kube-proxy"), "--config", str(self._proxy_config()),
                                   "--v=1"])

    # --- clients ------------------------------------------------------------------------------------------
    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def ready(self) -> bool:
        out = self.cluster.kubectl("get", "node", NAME, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # --- teardown -----------------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Tear everything down; returns what could not be cleaned (empty when all is gone)."""
        problems: list[str] = []
        c = self.cluster
        if "kube-controller-manager" in c.components:
            c.components["kube-controller-manager"].stop()  # nothing recreates what is deleted below
        if self.components.get("kubelet") and self.components["kubelet"].alive() and c.api_ready_quietly():
            c.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=2", "--timeout=90s",
                      check=False, timeout=120)
        for name in ("kube-proxy", "kube-scheduler", "kubelet"):
            if name in self.components:
                self.components[name].stop()
        if "kube-proxy" in self.components:
            subprocess.run([str(c.bin / "kube-proxy"), "--cleanup", "--config", str(self.state / "kube-proxy.yaml")],
                           capture_output=True, timeout=60)
        self._kill_containers()
        if "containerd" in self.components:
            self.components["containerd"].stop()
        self._kill_shims()
        problems += self._unmount()
        problems += self._remove_cgroups()
        problems += _drop_chains()
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        _IP_FORWARD.write_text(self._ip_forward + "\n")
        # containerd's shim sockets and the CNI library's result cache have fixed paths outside the state directory.
        for leftover in (Path("/run/containerd/s"), Path("/var/lib/cni/results")):
            shutil.rmtree(leftover, ignore_errors=True)
        for directory in (Path("/run/containerd"), Path("/var/lib/cni")):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: nothing else of this machine's is touched
        shutil.rmtree(self.state, ignore_errors=True)
        if self.state.exists():
            problems.append(f"{self.state} could not be removed")
        return problems

    def _kill_containers(self) -> None:
        root = self.state / "containerd" / "runc" / "k8s.io"
        if not root.exists():
            return
        listed = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True)
        for container in listed.stdout.split():
            subprocess.run(["runc", "--root", str(root), "delete", "--force", container], capture_output=True)

    def _kill_shims(self) -> None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), 9)

    def _unmount(self) -> list[str]:
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        ours = sorted((m for m in mounts if m.startswith(str(self.state))), key=len, reverse=True)
        for mount in ours:
            subprocess.run(["umount", "--lazy", mount], capture_output=True)
        left = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4].startswith(str(self.state))]
        return [f"still mounted: {m}" for m in left]

    def _remove_cgroups(self) -> list[str]:
        problems = []
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            kubepods = hierarchy / "kubepods"
            if not kubepods.is_dir() or kubepods.is_symlink():
                continue
            for _ in range(10):  # a cgroup empties a moment after its last process is killed
                for root, dirs, _files in os.walk(kubepods, topdown=False):
                    for d in dirs:
                        with contextlib.suppress(OSError):
                            os.rmdir(os.path.join(root, d))
                try:
                    os.rmdir(kubepods)
                    break
                except OSError:
                    time.sleep(0.5)
            if kubepods.exists():
                problems.append(f"cgroup {kubepods} is still in use")
        return problems


def _drop_chains() -> list[str]:
    """Remove every ``KUBE-*`` and ``CNI-*`` chain, and the rules jumping to them, from IPv4 and IPv6 tables."""
    problems = []
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        for table in ("filter", "nat", "mangle"):
            dump = subprocess.run([save, "-t", table], capture_output=True, text=True)
            if dump.returncode != 0 or not any(p in dump.stdout for p in _CHAIN_PREFIXES):
                continue
            kept = [line for line in dump.stdout.splitlines() if not _ours(line)]
            done = subprocess.run([restore, "-T", table], input="\n".join(kept) + "\n", capture_output=True,
                                  text=True)
            if done.returncode != 0:
                problems.append(f"{restore} -T {table}: {done.stderr.strip()}")
    return problems


def _ours(line: str) -> bool:
    words = line.split()
    if line.startswith(":"):
        return line[1:].startswith(_CHAIN_PREFIXES)
    if line.startswith("-A"):
        return words[1].startswith(_CHAIN_PREFIXES) or any(
            words[i + 1].startswith(_CHAIN_PREFIXES) for i, w in enumerate(words[:-1]) if w in ("-j", "-g"))
    return False
