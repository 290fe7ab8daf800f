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
from collections.abc import Callable

from cryptography import x509

from .certs import TLS_CERT, TLS_KEY
from .config import TLSSettings

log = logging.getLogger("meshguard.tls")

# Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 suites are fixed by OpenSSL and all modern).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class CertificateReloader:
    """Owns the server's SSL context and reloads the certificate files into it when they change."""

    def __init__(self, settings: TLSSettings, on_loaded: Callable[[x509.Certificate], None] | None = None) -> None:
        self._settings = settings
        self._cert_path = settings.cert_dir / TLS_CERT
        self._key_path = settings.cert_dir / TLS_KEY
        self._on_loaded = on_loaded
        self._loaded: tuple[bytes, bytes] | None = None
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
        return True

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
