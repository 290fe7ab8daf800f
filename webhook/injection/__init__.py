"""Sidecar injection: whether a pod gets the mesh data plane, what is injected, and the JSON patch that does it.

``webhook.config`` embeds :class:`~webhook.injection.settings.InjectionSettings` in ``Settings`` and that module
subclasses ``config._Section``; importing ``config`` here first makes the cycle resolve the same way whichever
module a caller imports first.
"""

from .. import config as _config  # noqa: F401
