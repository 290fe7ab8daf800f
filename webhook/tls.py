"""The serving TLS context and its hot reload.

cert-manager and Kubernetes Secret volumes rotate ``tls.crt``/``tls.key`` in place (a ``..data`` symlink swap).
The listener keeps one :class:`ssl.SSLContext`; loading the new pair into that same context makes every new
handshake use it while established connections and in-flight requests carry on untouched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import time
from collections.abc import Callable

from cryptography import x509

from .certs import TLS_CERT, TLS_KEY
from .config import TLSSettings

log = logging.getLogger("meshguard.tls")

# Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 suites are fixed by OpenSSL and all modern).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# While the certificate stays close to expiry, the warning is repeated this often (seconds), so that a log-based
# alert sees it even when nobody restarts the server.
WARNING_INTERVAL = 3600.0


def expiring(not_after: dt.datetime, warning_days: int, now: dt.datetime | None = None) -> bool:
    """Whether a certificate valid until ``not_after`` expires within ``warning_days`` (or has expired)."""
    return not_after - (now or dt.datetime.now(dt.UTC)) < dt.timedelta(days=warning_days)


class CertificateReloader:
    """Owns the server's SSL context and reloads the certificate files into it when they change.

    It also watches the expiry of the certificate in use: on load and at every check, ``on_expiry_checked`` gets
    whether it is within ``expiry_warning_days`` of expiring, and a warning is logged (again every
    :data:`WARNING_INTERVAL`) while it is.
    """

    def __init__(self, settings: TLSSettings, on_loaded: Callable[[x509.Certificate], None] | None = None,
                 on_expiry_checked: Callable[[bool], None] | None = None) -> None:
        self._settings = settings
        self._cert_path = settings.cert_dir / TLS_CERT
        self._key_path = settings.cert_dir / TLS_KEY
        self._on_loaded = on_loaded
        self._on_expiry_checked = on_expiry_checked
        self._loaded: tuple[bytes, bytes] | None = None
        self._warned: tuple[dt.datetime, float] | None = None  # (not_after warned about, when: monotonic)
        self.not_after: dt.datetime | None = None
        self.context = self._new_context()
        self.reload()

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if self._settings.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_CIPHERS)
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_alpn_protocols(["http/1.1"])
        if self._settings.client_ca_file:
            ctx.load_verify_locations(cafile=str(self._settings.client_ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def reload(self) -> bool:
        """Load the files if their content changed. Returns True when a new pair was loaded.

        Raises ``OSError``/``ssl.SSLError`` when the files are missing or do not match; the previous pair (if
        any) stays in use, so a rotation caught half-way is simply retried on the next check.
        """
        pair = (self._cert_path.read_bytes(), self._key_path.read_bytes())
        if pair == self._loaded:
            return False
        self.context.load_cert_chain(str(self._cert_path), str(self._key_path))
        cert = x509.load_pem_x509_certificate(pair[0])
        self._loaded = pair
        self.not_after = cert.not_valid_after_utc
        if self._on_loaded:
            self._on_loaded(cert)
        self.check_expiry()
        return True

    def check_expiry(self, now: dt.datetime | None = None) -> bool:
        """Whether the certificate in use is close to expiry; reports it (callback, and a log line when due)."""
        if self.not_after is None:
            return False
        close = expiring(self.not_after, self._settings.expiry_warning_days, now)
        if self._on_expiry_checked:
            self._on_expiry_checked(close)
        if close and (self._warned is None or self._warned[0] != self.not_after
                      or time.monotonic() - self._warned[1] >= WARNING_INTERVAL):
            self._warned = (self.not_after, time.monotonic())
            left = self.not_after - (now or dt.datetime.now(dt.UTC))
            log.warning(
                "serving certificate expires soon; renew it" if left.total_seconds() > 0
                else "serving certificate has expired; renew it",
                extra={"not_after": self.not_after.isoformat(), "days_left": round(left.total_seconds() / 86400, 1),
                       "warning_days": self._settings.expiry_warning_days},
            )
        return close

    async def watch(self) -> None:
        """Poll for rotated files until cancelled; polling works on every volume type, unlike inotify."""
        while True:
            await asyncio.sleep(self._settings.reload_interval_seconds)
            try:
                if self.reload():
                    not_after = self.not_after.isoformat() if self.not_after else None
                    log.info("serving certificate reloaded", extra={"not_after": not_after})
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("serving certificate not reloaded, keeping the previous one", extra={"error": str(exc)})
            self.check_expiry()
