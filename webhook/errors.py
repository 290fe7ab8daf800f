"""meshguard's exceptions share one root, so a caller can catch meshguard's own failures and nothing else.

Errors of the Kubernetes client and urllib3 are translated into :class:`KubeError` where the API is called
(:mod:`webhook.kubejson`, :mod:`webhook.state.kube`), never passed through.
"""


class MeshguardError(Exception):
    """Something meshguard reports in a sentence: a bad input, configuration, manifest or API call."""


class KubeError(MeshguardError):
    """An API call failed, or no cluster credentials are usable; the message names the call and the cause."""


class Conflict(KubeError):
    """The object changed since it was read (HTTP 409): read it again and redo the decision."""
