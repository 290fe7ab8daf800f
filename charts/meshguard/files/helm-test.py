"""`helm test`: send a pod labeled meshguard.io/inject=true through the API server with dryRun=All.

Nothing is persisted. The pod passes both webhooks: the answer must carry the injected proxy container, or be a
denial by meshguard's policy webhook (which runs after injection, so the webhooks were reached and answered).
Only the standard library and the pod's service account token are used.

Usage: helm-test.py NAMESPACE PROXY_CONTAINER_NAME
"""

import json
import os
import ssl
import sys
import urllib.error
import urllib.request

SERVICE_ACCOUNT = os.environ.get("SERVICE_ACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")


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
    sys.exit(main(sys.argv[1], sys.argv[2]))
