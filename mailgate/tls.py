"""Server TLS contexts: protocol floor, ciphers, SNI over several certificates, reload.

Each certificate gets its own SSLContext with the same settings.  The first one is
handed to the server; its SNI callback switches the handshake to the context whose
certificate names the requested host (exact name first, then a ``*.`` wildcard one
label deep), and keeps the first when nothing matches or no name is sent.

A reload builds all new context objects: sessions already running keep the ones they
started with, and a broken file leaves the old set in place.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from asn1crypto import pem, x509

from mailgate.config.auth import TLSConfig
from mailgate.ops.logging import log_event

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class _Loaded:
    default: ssl.SSLContext
    by_name: dict[str, ssl.SSLContext]  # lower-case names, "*.example.org" for wildcards


def certificate_names(cert_file: str) -> list[str]:
    """The DNS names of the first certificate in a PEM file (SAN, else the CN)."""
    with open(cert_file, "rb") as f:
        data = f.read()
    for kind, _headers, der in pem.unarmor(data, multiple=True):
        if kind == "CERTIFICATE":
            return [n.lower().rstrip(".") for n in x509.Certificate.load(der).valid_domains]
    raise ValueError("no CERTIFICATE block")


class TLSContexts:
    def __init__(self, config: TLSConfig) -> None:
        """Load every certificate now; ValueError "file: problem" when one is broken."""
        self._config = config
        self._loaded = self._load() if config.pairs else None

    def server_context(self) -> ssl.SSLContext | None:
        """The context to wrap server connections with, or None without certificates.
        Asked for at each STARTTLS and each implicit-TLS connection (server/tls_accept.py),
        so that a reload's contexts, built whole with the new settings, apply at once.
        (A context kept for the port 465 listener and patched in place kept its old
        minimum version and ciphers, and a certificate of the other key type next to a
        replaced one.)"""
        return self._loaded.default if self._loaded else None

    def reload(self, config: TLSConfig | None = None) -> None:
        """Re-read all certificates into new contexts; on ValueError the old ones stay.
        A config without certificates drops them: STARTTLS is no longer offered."""
        config = config or self._config
        previous = self._config
        self._config = config
        try:
            loaded = self._load() if config.pairs else None
        except (ValueError, OSError, ssl.SSLError):
            self._config = previous
            raise
        self._loaded = loaded
        # (the reload's own line says it happened; this one is per worker)
        log_event("tls_certificates", level="debug", outcome="reloaded", pairs=len(config.pairs))

    def _load(self) -> _Loaded:
        contexts: list[ssl.SSLContext] = []
        by_name: dict[str, ssl.SSLContext] = {}
        for cert, key in self._config.pairs:
            context = self._context(cert, key)
            contexts.append(context)
            try:
                names = certificate_names(cert)
            except (OSError, ValueError) as e:
                raise ValueError(f"{cert}: cannot read its names: {e}") from None
            for name in names:
                by_name.setdefault(name, context)  # an earlier certificate wins a name
        loaded = _Loaded(contexts[0], by_name)
        if len(contexts) > 1:
            # Closure over this load's table: a reload's new table cannot leak into
            # the old default context that running handshakes still use.
            contexts[0].sni_callback = lambda obj, name, _ctx: _choose(loaded, obj, name)
        return loaded

    def _context(self, cert: str, key: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[self._config.min_version]
        context.options |= (
            ssl.OP_NO_COMPRESSION  # CRIME
            | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation DoS
            | ssl.OP_CIPHER_SERVER_PREFERENCE
            | ssl.OP_SINGLE_ECDH_USE
        )
        try:
            context.set_ciphers(self._config.ciphers)
        except ssl.SSLError:
            raise ValueError(f"tls.ciphers: no usable cipher in {self._config.ciphers!r}") from None
        _load_pair(context, cert, key)
        return context


class _Encrypted(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Encrypted


def _load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    """The pair into ``context``; ValueError naming the files and the problem.

    A key encrypted with a pass phrase is refused: without a password callback
    OpenSSL would ask for one on the terminal, which a server must never do (and
    under systemd there is none)."""
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise ValueError(
            f"{key}: the private key is encrypted with a pass phrase, which a server "
            f"cannot type in; store it decrypted, readable by root only "
            f"(openssl pkey -in {key} -out {key}.plain)"
        ) from None
    except FileNotFoundError as e:
        raise ValueError(f"{e.filename}: file not found") from None
    except ssl.SSLError as e:  # (an OSError too: first)
        problem = _pem_problem(cert, key) or _SSL_REASONS.get(e.reason or "", str(e))
        raise ValueError(f"{cert} / {key}: {problem}") from None
    except OSError as e:
        raise ValueError(f"{cert} / {key}: {e.strerror or e}") from None


_SSL_REASONS = {"KEY_VALUES_MISMATCH": "key values mismatch: the private key is not the "
                "certificate's"}


def _pem_problem(cert: str, key: str) -> str:
    """What OpenSSL's "PEM lib" means here, if it is one of the usual mistakes."""
    for path, wanted, what in ((cert, ("CERTIFICATE",), "certificate"),
                               (key, ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"),
                                "private key")):
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            continue
        if not pem.detect(data):
            return f"{path} holds no whole PEM block (-----BEGIN ... -----END ...): " \
                   f"expected a {what}"
        try:
            kinds = {kind for kind, _, _ in pem.unarmor(data, multiple=True)}
        except ValueError as e:
            return f"{path}: broken PEM ({e})"
        if not kinds.intersection(wanted):
            return f"{path} holds no {what} (found: {', '.join(sorted(kinds))})"
    return ""


def _choose(loaded: _Loaded, ssl_object: ssl.SSLObject, server_name: str | None) -> None:
    if not server_name:
        return None
    name = server_name.lower().rstrip(".")
    context = loaded.by_name.get(name)
    if context is None and "." in name:
        context = loaded.by_name.get("*." + name.split(".", 1)[1])
    if context is not None and context is not ssl_object.context:
        ssl_object.context = context
    return None  # continue the handshake (a number would abort it with that alert)


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str, str]:
    """(protocol version, cipher name) for logs and Received headers; empty if unknown."""
    if ssl_object is None:
        return "", ""
    cipher = ssl_object.cipher()
    return ssl_object.version() or "", cipher[0] if cipher else ""
