"""The serving TLS context and its hot reload.

cert-manager and Kubernetes Secret volumes rotate ``tls.crt``/``tls.key`` in place (a ``..data`` symlink swap).
A new pair is loaded into a new :class:`ssl.SSLContext`, and only once it loaded whole does the listener's SNI
callback hand that context to new handshakes; established connections and in-flight requests carry on untouched.
Loading into the live context instead would leave it holding a new certificate without its key whenever
``tls.crt`` is replaced before ``tls.key``, and every handshake would fail until the next good reload.
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
    :data:`WARNING_INTERVAL`) while it is; ``on_valid`` gets whether it is still valid (the server's readiness:
    the API server rejects an expired certificate, so a replica serving one must get no traffic).
    """

    def __init__(self, settings: TLSSettings, on_loaded: Callable[[x509.Certificate], None] | None = None,
                 on_expiry_checked: Callable[[bool], None] | None = None,
                 on_valid: Callable[[bool], None] | None = None) -> None:
        self._settings = settings
        self._cert_path = settings.cert_dir / TLS_CERT
        self._key_path = settings.cert_dir / TLS_KEY
        self._on_loaded = on_loaded
        self._on_expiry_checked = on_expiry_checked
        self._on_valid = on_valid
        self._loaded: tuple[bytes, bytes] | None = None
        self._warned: tuple[dt.datetime, float] | None = None  # (not_after warned about, when: monotonic)
        self.not_after: dt.datetime | None = None
        self._current = self._new_context()
        self.reload()
        # The listener's context: it serves the first pair, and its SNI callback (called for every ClientHello,
        # with or without a server name) switches each handshake to the pair loaded last.
        self.context = self._current
        self.context.sni_callback = self._select

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
        context = self._current if self._loaded is None else self._new_context()
        context.load_cert_chain(str(self._cert_path), str(self._key_path))  # raises unless the key matches
        if (self._cert_path.read_bytes(), self._key_path.read_bytes()) != pair:
            return False  # rewritten while loading: what loaded matches, but may not be what was read; next time
        cert = x509.load_pem_x509_certificate(pair[0])
        self._current = context
        self._loaded = pair
        self.not_after = cert.not_valid_after_utc
        if self._on_loaded:
            self._on_loaded(cert)
        self.check_expiry()
        return True

    def _select(self, connection: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext) -> None:
        if connection.context is not self._current:
            connection.context = self._current

    def check_expiry(self, now: dt.datetime | None = None) -> bool:
        """Whether the certificate in use is close to expiry; reports it (callback, and a log line when due)."""
        if self.not_after is None:
            return False
        close = expiring(self.not_after, self._settings.expiry_warning_days, now)
        left = self.not_after - (now or dt.datetime.now(dt.UTC))
        if self._on_expiry_checked:
            self._on_expiry_checked(close)
        if self._on_valid:
            self._on_valid(left.total_seconds() > 0)
        if close and (self._warned is None or self._warned[0] != self.not_after
                      or time.monotonic() - self._warned[1] >= WARNING_INTERVAL):
            self._warned = (self.not_after, time.monotonic())
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
