"""The ``meshguard`` command: argument parsing and exit codes only; the work is in the modules it calls."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import certs, config, envoy, logs, manifests
from .errors import MeshguardError
from .lists import split_list

# Each subcommand registers (name, add_arguments, run); run returns the exit code.
Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML configuration file (below MESHGUARD_* env and flags)")
    p.add_argument("--dev", action="store_true", default=None,
                   help="generate development certificates if missing; run without a cluster")
    p.add_argument("--host", help="admission listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="admission HTTPS port (default 8443)")
    p.add_argument("--health-port", type=int, help="health/metrics HTTP port (default 8080)")
    p.add_argument("--cert-dir", type=Path, help="directory with tls.crt/tls.key (default certs/)")
    p.add_argument("--state", type=Path, help="directory of manifests used as cluster state instead of the API")


def _serve(args: argparse.Namespace) -> int:
    from .service import serve

    settings = config.load(
        args.config,
        {
            "dev": args.dev,
            "state_dir": args.state,
            "server": {"host": args.host, "port": args.port, "health_port": args.health_port},
            "tls": {"cert_dir": args.cert_dir},
        },
    )
    logs.configure(settings.log_level)
    # uvloop, as uvicorn itself would pick: its event loop and TLS transport cost a fraction of asyncio's
    # pure-Python SSL protocol on every request.
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(settings))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return None
    return uvloop.new_event_loop


def _certs_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="certs_command", required=True, metavar="{generate,workload}")
    gen = sub.add_parser("generate", help="create a CA (or reuse one) and issue the webhook's serving certificate")
    gen.add_argument("--service", default="meshguard", help="the webhook Service name (default meshguard)")
    gen.add_argument("--namespace", default="meshguard", help="the webhook namespace (default meshguard)")
    gen.add_argument("--out", type=Path, default=Path("certs"), help="output directory (default certs/)")
    gen.add_argument("--days", type=int, default=365, help="serving certificate validity in days (default 365)")
    gen.add_argument("--dev", action="store_true", help="also add localhost, 127.0.0.1 and ::1 SANs")
    work = sub.add_parser("workload", help="issue a workload certificate (SPIFFE ID) from an existing mesh CA")
    work.add_argument("--ca-dir", type=Path, required=True, help="directory with the mesh CA's ca.crt and ca.key")
    work.add_argument("--namespace", required=True, help="the workload's namespace")
    work.add_argument("--service-account", required=True, help="the workload's service account")
    work.add_argument("--out", type=Path, required=True, help="output directory: tls.crt, tls.key, ca.crt")
    work.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    work.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    work.add_argument("--credential-bundle", action="store_true",
                      help="also write credential-bundle.pem as the kubelet writes a Pod Certificate: the PKCS#8 key, "
                           "then the certificate chain, in one file")


def _certs(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise UsageError("--days must be at least 1")
    if args.certs_command == "workload":
        return _certs_workload(args)
    reused = (args.out / certs.CA_CERT).exists() and (args.out / certs.CA_KEY).exists()
    serving = certs.generate_serving(args.out, args.service, args.namespace, days=args.days, dev=args.dev)
    print(f"{'reused' if reused else 'created'} CA {args.out / certs.CA_CERT}")
    print(f"issued {args.out / certs.TLS_CERT} (valid until {serving.cert.not_valid_after_utc:%Y-%m-%d})")
    return 0


def _certs_workload(args: argparse.Namespace) -> int:
    if not (args.ca_dir / certs.CA_CERT).exists() or not (args.ca_dir / certs.CA_KEY).exists():
        raise UsageError(f"--ca-dir {args.ca_dir}: needs ca.crt and ca.key ('meshguard certs generate' makes them)")
    issued = certs.generate_workload(
        args.ca_dir, args.out, args.namespace, args.service_account, args.trust_domain, days=args.days
    )
    identity = certs.spiffe_id(args.trust_domain, args.namespace, args.service_account)
    print(f"issued {args.out / certs.TLS_CERT} for {identity} (valid until {issued.cert.not_valid_after_utc:%Y-%m-%d})")
    if args.credential_bundle:
        certs.write_atomic(args.out / certs.CREDENTIAL_BUNDLE, issued.key_pem() + issued.cert_pem(), 0o600)
        print(f"wrote {args.out / certs.CREDENTIAL_BUNDLE}")
    return 0


def _netinit_args(p: argparse.ArgumentParser) -> None:
    from . import netinit

    p.add_argument("--proxy-uid", type=int, required=True, help="uid Envoy runs as: its own traffic is not captured")
    p.add_argument("--inbound-port", type=int, required=True, help="Envoy's inbound capture port")
    p.add_argument("--outbound-port", type=int, required=True, help="Envoy's outbound capture port")
    p.add_argument(netinit.EXCLUDE_INBOUND_FLAG, default="", metavar="LIST", help="inbound ports not captured")
    p.add_argument("--exclude-outbound-ports", default="", metavar="LIST", help="destination ports not captured")
    p.add_argument("--include-outbound-ip-ranges", default="*", metavar="LIST",
                   help="destination ranges captured; * (default) for all")
    p.add_argument("--exclude-outbound-ip-ranges", default="", metavar="LIST", help="destination ranges not captured")
    p.add_argument("--dry-run", action="store_true", help="print the iptables-restore input instead of applying it")
    p.add_argument("--cert-dir", help="the proxy's certificate directory, named in the SDS files")
    p.add_argument("--sds-dir", help="write the proxy's SDS files here (with --cert-dir)")
    p.add_argument("--bootstrap-out", type=Path, help="also write the proxy's Envoy bootstrap for this pod here "
                   "(with --cert-dir and --sds-dir, the bootstrap flags, and the pod's Downward API environment)")
    envoy.add_option_arguments(p, skip=netinit.SHARED_OPTIONS)


def _netinit(args: argparse.Namespace) -> int:
    from . import netinit

    try:
        options = netinit.CaptureOptions(
            proxy_uid=args.proxy_uid,
            inbound_port=args.inbound_port,
            outbound_port=args.outbound_port,
            exclude_inbound_ports=netinit.parse_ports(args.exclude_inbound_ports, netinit.EXCLUDE_INBOUND_FLAG),
            exclude_outbound_ports=netinit.parse_ports(args.exclude_outbound_ports, "--exclude-outbound-ports"),
            include_outbound_ip_ranges=netinit.parse_include_ranges(
                args.include_outbound_ip_ranges, "--include-outbound-ip-ranges"
            ),
            exclude_outbound_ip_ranges=netinit.parse_ranges(
                args.exclude_outbound_ip_ranges, "--exclude-outbound-ip-ranges"
            ),
        )
    except netinit.NetinitError as exc:
        raise UsageError(str(exc)) from None
    if args.dry_run:
        sys.stdout.write(netinit.dry_run(options))
        return 0
    bootstrap = None
    if args.bootstrap_out is not None:
        if not args.cert_dir or not args.sds_dir:
            raise UsageError("--bootstrap-out needs --cert-dir and --sds-dir")
        try:
            bootstrap = envoy.options_from(args)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        netinit.apply(options, netinit.families())
        if args.sds_dir and args.cert_dir:
            envoy.write_sds_files(args.cert_dir, Path(args.sds_dir))
        if bootstrap is not None:
            envoy.write(bootstrap, args.bootstrap_out, os.environ)
    except netinit.NetinitError as exc:
        print(f"meshguard netinit: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"meshguard netinit: cannot write the proxy's files into {args.sds_dir}: {exc}", file=sys.stderr)
        return 1
    print(f"meshguard netinit: TCP traffic now goes through ports {args.inbound_port}/{args.outbound_port}")
    return 0


def _bootstrap_args(p: argparse.ArgumentParser) -> None:
    from . import envoy

    p.add_argument("--out", type=Path, required=True, help="file to write the bootstrap to (a volume the proxy mounts)")
    envoy.add_option_arguments(p)


def _bootstrap(args: argparse.Namespace) -> int:
    from . import envoy

    try:
        options = envoy.options_from(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        envoy.write(options, args.out, os.environ)
    except (ValueError, OSError) as exc:
        print(f"meshguard bootstrap: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(f"meshguard bootstrap: wrote the Envoy bootstrap to {args.out}")
    return 0


def _inject_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR|-",
                   help="manifests to inject (YAML or JSON, multi-document, kind: List); repeatable; - reads stdin")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="output format (default yaml)")
    p.add_argument("--config", type=Path, help="YAML configuration file: the injection settings the server uses")
    p.add_argument("-n", "--namespace", default="default",
                   help="namespace of objects that name none (default: default)")


def _inject(args: argparse.Namespace) -> int:
    from .injection.offline import InjectError, inject

    settings = config.load(args.config)
    try:
        objects = manifests.load(args.filename)
    except manifests.ManifestError as exc:
        raise UsageError(str(exc)) from None
    try:
        notes = inject(objects, settings, args.namespace)
    except InjectError as exc:
        print(f"meshguard: cannot inject {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"meshguard: {note}", file=sys.stderr)
    sys.stdout.write(manifests.dump(objects, args.output))
    return 0


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR|-",
                   help="workloads, NetworkPolicies, PeerAuthentications and Namespaces to check together; repeatable")
    p.add_argument("-n", "--namespace", default="default",
                   help="namespace of objects that name none (default: default)")
    p.add_argument("--namespace-labels", default="", metavar="K=V,...",
                   help="labels of that namespace, e.g. meshguard.io/inject=enabled")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format (default text)")
    p.add_argument("--config", type=Path, help="YAML configuration file: the policy settings the server uses")


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    try:
        items = split_list(text)
    except ValueError as exc:
        raise UsageError(f"--namespace-labels: {exc}") from None
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--namespace-labels: expected key=value, got {item!r}")
        labels[key] = value
    return labels


def _check(args: argparse.Namespace) -> int:
    from .policy import report
    from .policy.engine import Engine
    from .state.files import build_store
    from .workloads import iter_workloads

    settings = config.load(args.config)
    labels = _labels(args.namespace_labels)
    try:
        objects = manifests.load(args.filename)
    except manifests.ManifestError as exc:
        raise UsageError(str(exc)) from None
    store, problems = build_store(objects, args.namespace, labels)
    if problems:
        raise UsageError("; ".join(problems))
    result = report.check(Engine(settings, offline=True), store, iter_workloads(objects, args.namespace))
    sys.stdout.write(report.render(result, args.output))
    return 1 if result.failed else 0


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster, KUBECONFIG, ~/.kube/config)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format (default text)")
    p.add_argument("--config", type=Path, help="YAML configuration file: the policy settings the server uses")


def _audit(args: argparse.Namespace) -> int:
    from .policy import report
    from .policy.engine import Engine
    from .state import kube

    settings = config.load(args.config)
    tty = sys.stderr.isatty()

    def progress(kind: str, count: int) -> None:
        print(f"meshguard audit: {count} {kind} objects listed", end="\r" if tty else "\n", file=sys.stderr,
              flush=True)

    try:
        cluster = kube.Cluster(kube.api_client(args.kubeconfig))
        store, objects = kube.read_all(cluster, settings.policy.state.page_size, progress)
    except kube.ClusterError as exc:
        raise UsageError(str(exc)) from None
    print(f"meshguard audit: evaluating {len(objects)} objects", file=sys.stderr)
    result = report.audit(Engine(settings), store, settings, objects)
    sys.stdout.write(report.render(result, args.output))
    return 1 if result.failed else 0


def _proxy_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pod", help="the pod whose proxy's config to show")
    p.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default: default)")
    p.add_argument("--server", default="http://127.0.0.1:8080",
                   help="a meshguard replica's health port, e.g. through `kubectl -n meshguard port-forward "
                        "deploy/meshguard 8080` (default http://127.0.0.1:8080)")


def _proxy_config(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    path = f"/debug/proxy-config/{urllib.parse.quote(args.namespace, safe='')}/{urllib.parse.quote(args.pod, safe='')}"
    try:
        with urllib.request.urlopen(args.server.rstrip("/") + path, timeout=10) as answer:
            sys.stdout.write(json.dumps(json.load(answer), indent=2) + "\n")
            return 0
    except urllib.error.HTTPError as error:
        try:
            reason = json.load(error).get("error", error.reason)
        except ValueError:
            reason = error.reason
        raise UsageError(f"{args.server} answered {error.code}: {reason}") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot reach {args.server}: {error}") from None


COMMANDS: list[Command] = [
    ("serve", "run the admission webhook server", _serve_args, _serve),
    ("certs", "generate development or bootstrap certificates", _certs_args, _certs),
    ("inject", "inject the meshguard sidecar into manifests offline and print them", _inject_args, _inject),
    ("check", "check manifests against the policy offline (exit 1 when a rule fails)", _check_args, _check),
    ("audit", "report every workload of a live cluster against the policy", _audit_args, _audit),
    ("netinit", "install the pod's iptables rules that send its TCP traffic through the sidecar",
     _netinit_args, _netinit),
    ("bootstrap", "write the sidecar's Envoy bootstrap for a pod (what meshguard-init renders in it) to read it",
     _bootstrap_args, _bootstrap),
    ("proxy-config", "show what the control plane last sent a pod's proxy, and what it acknowledged",
     _proxy_config_args, _proxy_config),
]


class UsageError(MeshguardError):
    """A bad combination of arguments; printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (config.ConfigError, UsageError) as exc:
        print(f"meshguard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
