"""Certificates: the CA, the webhook's serving certificate, and how they are written to disk.

ECDSA P-256 keys: the API server and Envoy accept them, and their handshakes cost a fraction of RSA's.
Files are written atomically (temporary file + rename) so a server reloading them never reads half a file,
and keys get mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
TLS_CERT, TLS_KEY = "tls.crt", "tls.key"
# The one file of a Pod Certificate's credentialBundlePath: the PKCS#8 key, then the chain.
CREDENTIAL_BUNDLE = "credential-bundle.pem"
# What a development certificate also names: the server on this machine.
DEV_NAMES, DEV_IPS = ("localhost",), ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: float
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # Backdated a little so that clocks a few minutes apart still accept a fresh certificate.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); an ECDSA leaf signs handshakes and agrees keys."""
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=not ca,
        encipher_only=False, decipher_only=False,
    )


def generate_ca(common_name: str = "meshguard-ca", days: float = 3650) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshguard"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue_leaf(
    ca: Issued,
    common_name: str,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    days: float = 365,
    server: bool = True,
    client: bool = False,
    organizations: tuple[str, ...] = (),
) -> Issued:
    """A leaf certificate signed by ``ca`` with the given SANs and extended key usages.

    ``organizations`` become O= attributes: Kubernetes reads them as the groups of a client certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )
    builder = (
        _builder(subject, ca.cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    if sans:
        # A certificate without a subject must mark its SANs critical; ours has a CN, so they need not be.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def service_dns_names(service: str, namespace: str) -> tuple[str, ...]:
    """The names the API server may use to reach a Service: short, namespaced, svc and the cluster FQDN."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local")


def issue_serving(ca: Issued, service: str, namespace: str, days: int = 365, dev: bool = False) -> Issued:
    names = service_dns_names(service, namespace)
    ips = DEV_IPS if dev else ()
    names += DEV_NAMES if dev else ()
    return issue_leaf(ca, f"{service}.{namespace}.svc", dns_names=names, ip_addresses=ips, days=days)


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SPIFFE ID of a workload: what peers verify, and what Envoy's access log shows as the peer."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def issue_workload(
    ca: Issued, namespace: str, service_account: str, trust_domain: str = "cluster.local", days: float = 30
) -> Issued:
    """A workload certificate: the SPIFFE ID as its only SAN, usable both to serve (inbound) and as a client
    (outbound), since every sidecar is both. In a cluster cert-manager issues the same shape and renews it."""
    return issue_leaf(
        ca,
        f"{service_account}.{namespace}",
        uris=(spiffe_id(trust_domain, namespace, service_account),),
        days=days,
        server=True,
        client=True,
    )


def generate_workload(
    ca_dir: Path, out: Path, namespace: str, service_account: str, trust_domain: str = "cluster.local", days: int = 30
) -> Issued:
    """Write ``tls.crt``, ``tls.key`` and ``ca.crt`` into ``out`` (the layout of the workload Secret) from the CA
    in ``ca_dir``, which must exist: a workload certificate from a fresh, unknown CA would be trusted by no one."""
    ca = load_pair(ca_dir, CA_CERT, CA_KEY)
    workload = issue_workload(ca, namespace, service_account, trust_domain, days)
    write_pair(out, workload, TLS_CERT, TLS_KEY)
    write_atomic(out / CA_CERT, ca.cert_pem(), 0o644)
    return workload


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` in one rename, created with ``mode`` (never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_pair(out: Path, issued: Issued, cert_name: str, key_name: str) -> None:
    # Key first: a reader that sees a new certificate then also finds its key.
    write_atomic(out / key_name, issued.key_pem(), 0o600)
    write_atomic(out / cert_name, issued.cert_pem(), 0o644)


def load_pair(out: Path, cert_name: str, key_name: str) -> Issued:
    cert = x509.load_pem_x509_certificate((out / cert_name).read_bytes())
    key = serialization.load_pem_private_key((out / key_name).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out / key_name}: expected an ECDSA key")
    return Issued(cert, key)


def load_or_create_ca(out: Path, days: int = 3650) -> tuple[Issued, bool]:
    """Reuse ``ca.crt``/``ca.key`` in ``out`` when both exist, else create them. Returns (ca, created)."""
    if (out / CA_CERT).exists() and (out / CA_KEY).exists():
        return load_pair(out, CA_CERT, CA_KEY), False
    ca = generate_ca(days=days)
    write_pair(out, ca, CA_CERT, CA_KEY)
    return ca, True


def generate_serving(out: Path, service: str, namespace: str, days: int = 365, dev: bool = False) -> Issued:
    """Issue ``tls.crt``/``tls.key`` into ``out`` from the CA there (created when missing)."""
    ca, _ = load_or_create_ca(out)
    serving = issue_serving(ca, service, namespace, days=days, dev=dev)
    write_pair(out, serving, TLS_CERT, TLS_KEY)
    return serving


def ensure_dev_certs(out: Path, service: str, namespace: str) -> bool:
    """Create development certificates in ``out`` unless a serving pair is already there. Returns created."""
    if (out / TLS_CERT).exists() and (out / TLS_KEY).exists():
        return False
    generate_serving(out, service, namespace, dev=True)
    return True
