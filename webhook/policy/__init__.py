"""Policy enforcement: NetworkPolicy coverage and mutual TLS for every Pod and pod controller.

``webhook.config`` embeds :class:`~webhook.policy.settings.PolicySettings` in ``Settings`` and that module
subclasses ``config._Section``; importing ``config`` here first makes the cycle resolve the same way whichever
module a caller imports first.
"""

from .. import config as _config  # noqa: F401
