"""`helm test`: this pod's own workload certificate, then a pod labeled meshguard.io/inject=true sent through the
API server with dryRun=All.

The test pod mounts a workload certificate as an injected proxy would (its Pod Certificate from meshguard's
signer, or the Secret meshguard keeps for its ServiceAccount): it started, so the certificate was issued, and it
must name the pod's own identity (IDENTITY_SPIFFE_ID) and be signed by a CA of the trust bundle beside it. Then
the dry-run pod (nothing is persisted) passes both webhooks: the answer must carry the injected proxy container,
or be a denial by meshguard's policy webhook (which runs after injection, so the webhooks were reached).

Usage: helm-test.py NAMESPACE PROXY_CONTAINER_NAME  (IDENTITY_DIR, IDENTITY_SPIFFE_ID: the certificate check)
"""

import json
import os
import ssl
import sys
import urllib.error
import urllib.request

SERVICE_ACCOUNT = os.environ.get("SERVICE_ACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")


def check_identity(directory: str, expected: str) -> int:
    """The workload certificate in ``directory`` (tls.crt, ca.crt) names ``expected`` and chains to ca.crt."""
    from cryptography import x509  # in meshguard's image, like everything the server uses
    from cryptography.exceptions import InvalidSignature

    with open(f"{directory}/tls.crt", "rb") as chain, open(f"{directory}/ca.crt", "rb") as bundle:
        leaf = x509.load_pem_x509_certificates(chain.read())[0]
        anchors = x509.load_pem_x509_certificates(bundle.read())
    try:
        sans = [str(n.value) for n in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        sans = []
    if sans != [expected]:
        print(f"FAIL: this pod's workload certificate names {sans or 'nothing'}, not {expected}")
        return 1
    for anchor in anchors:
        try:
            leaf.verify_directly_issued_by(anchor)
        except (InvalidSignature, ValueError, TypeError):  # not this anchor's
            continue
        print(f"ok: this pod's workload certificate names {expected}, issued by {anchor.subject.rfc4514_string()}")
        return 0
    print("FAIL: this pod's workload certificate is not signed by the mesh CA in its trust bundle")
    return 1


def main(namespace: str, proxy: str) -> int:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    host = f"[{host}]" if ":" in host else host
    url = f"https://{host}:{os.environ['KUBERNETES_SERVICE_PORT']}/api/v1/namespaces/{namespace}/pods?dryRun=All"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "meshguard-helm-test-", "labels": {"meshguard.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
    }
    with open(f"{SERVICE_ACCOUNT}/token") as handle:
        token = handle.read().strip()
    request = urllib.request.Request(url, data=json.dumps(pod).encode(), method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "application/json"})
    context = ssl.create_default_context(cafile=f"{SERVICE_ACCOUNT}/ca.crt")
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            created = json.load(response)
    except urllib.error.HTTPError as error:
        try:
            message = json.load(error).get("message", "")
        except ValueError:
            message = ""
        if error.code == 403 and '.validate.meshguard.io" denied the request' in message:
            print(f"ok: meshguard answered (its policy denies this test pod in {namespace}): {message}")
            return 0
        print(f"FAIL: the API server answered {error.code}: {message or error.reason}")
        return 1
    spec = created.get("spec", {})
    names = [c.get("name") for c in spec.get("initContainers", []) + spec.get("containers", [])]
    if proxy in names:
        print(f"ok: meshguard injected {proxy} into a dry-run pod in {namespace}")
        return 0
    print(f"FAIL: the dry-run pod in {namespace} came back without {proxy} (containers: {', '.join(names)}); "
          f"is {namespace} labeled meshguard.io/inject=disabled or excluded from the webhooks?")
    return 1


if __name__ == "__main__":
    identity = os.environ.get("IDENTITY_DIR")
    if identity and check_identity(identity, os.environ["IDENTITY_SPIFFE_ID"]):
        sys.exit(1)
    sys.exit(main(sys.argv[1], sys.argv[2]))
