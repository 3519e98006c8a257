"""TLS contexts: real handshakes over loopback TCP with trustme certificates."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from mailgate.config.auth import TLSConfig
from mailgate.tls import TLSContexts, describe


@dataclass
class Certs:
    ca: trustme.CA
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (cert, key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    out = Certs(ca)
    for label, names in {
        "mail": ["mail.example.org", "smtp.example.org"],
        "net": ["*.example.net"],
    }.items():
        leaf = ca.issue_cert(*names)
        cert, key = folder / f"{label}.pem", folder / f"{label}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        out.files[label] = (str(cert), str(key))
    return out


def two_cert_config(certs: Certs, **extra: object) -> TLSConfig:
    cert, key = certs.files["mail"]
    net_cert, net_key = certs.files["net"]
    return TLSConfig(cert=cert, key=key, certificates=[{"cert": net_cert, "key": net_key}], **extra)  # type: ignore[arg-type]


@dataclass
class Handshake:
    client_names: list[str] = field(default_factory=list)  # DNS names in the served cert
    client_error: Exception | None = None
    server_error: Exception | None = None
    server_description: tuple[str, str] = ("", "")


def handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, sni: str | None
) -> Handshake:
    result = Handshake()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_context.wrap_socket(conn, server_side=True) as tls:
                result.server_description = describe(tls)
                # Until the client closes.  A client that closes with the server's
                # TLS 1.3 session tickets still unread resets the connection: the
                # handshake succeeded all the same (Python 3.13: ~1 run in 300).
                with contextlib.suppress(ConnectionResetError):
                    tls.recv(1)
        except (ssl.SSLError, OSError) as e:
            result.server_error = e

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            peer = tls.getpeercert() or {}
            result.client_names = [v for k, v in peer.get("subjectAltName", ()) if k == "DNS"]
    except (ssl.SSLError, OSError) as e:
        result.client_error = e
    finally:
        thread.join(10)
        listener.close()
    return result


def client(certs: Certs, *, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context()
    certs.ca.configure_trust(context)
    context.check_hostname = check_hostname
    return context


def test_no_certificate_no_context() -> None:
    assert TLSContexts(TLSConfig()).server_context() is None


def test_single_pair_still_works(certs: Certs) -> None:
    cert, key = certs.files["mail"]
    server = TLSContexts(TLSConfig(cert=cert, key=key)).server_context()
    assert server is not None
    result = handshake(server, client(certs), "mail.example.org")
    assert result.client_error is None and result.server_error is None
    assert "mail.example.org" in result.client_names


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("smtp.example.org", "smtp.example.org"),
        ("MX1.Example.NET", "*.example.net"),  # wildcard, any case
        ("mx1.example.net.", "*.example.net"),
        ("other.example.com", "mail.example.org"),  # no match: the default (first)
        (None, "mail.example.org"),  # no SNI: the default
    ],
)
def test_sni_picks_the_certificate(certs: Certs, sni: str | None, expected: str) -> None:
    server = TLSContexts(two_cert_config(certs)).server_context()
    assert server is not None
    result = handshake(server, client(certs, check_hostname=False), sni)
    assert result.client_error is None, result.client_error
    assert expected in result.client_names


def test_wildcard_is_one_label_deep(certs: Certs) -> None:
    server = TLSContexts(two_cert_config(certs)).server_context()
    assert server is not None
    result = handshake(server, client(certs, check_hostname=False), "a.b.example.net")
    assert result.client_names == ["mail.example.org", "smtp.example.org"]


def test_hostname_verification_passes_for_both_names(certs: Certs) -> None:
    server = TLSContexts(two_cert_config(certs)).server_context()
    assert server is not None
    for name in ("mail.example.org", "relay.example.net"):
        assert handshake(server, client(certs), name).client_error is None


def test_describe_reports_version_and_cipher(certs: Certs) -> None:
    server = TLSContexts(two_cert_config(certs)).server_context()
    assert server is not None
    result = handshake(server, client(certs), "mail.example.org")
    version, cipher = result.server_description
    assert version == "TLSv1.3" and cipher.startswith("TLS_")
    assert describe(None) == ("", "")


def test_tls12_uses_only_ecdhe_aead(certs: Certs) -> None:
    server = TLSContexts(two_cert_config(certs)).server_context()
    assert server is not None
    old = client(certs)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(server, old, "mail.example.org")
    version, cipher = result.server_description
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_server_refuses_tls11(certs: Certs) -> None:
    server = TLSContexts(two_cert_config(certs)).server_context()
    assert server is not None
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.1
    result = handshake(server, old, "mail.example.org")
    assert result.client_error is not None
    if result.server_error is None:
        pytest.skip("this OpenSSL cannot even send a TLS 1.1 ClientHello")
    assert isinstance(result.server_error, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(result.server_error).upper(), result.server_error


def test_min_version_13_refuses_tls12(certs: Certs) -> None:
    server = TLSContexts(two_cert_config(certs, min_version="1.3")).server_context()
    assert server is not None
    old = client(certs)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(server, old, "mail.example.org")
    assert result.client_error is not None and result.server_error is not None
    assert handshake(server, client(certs), "mail.example.org").client_error is None


def test_no_compression_no_renegotiation(certs: Certs) -> None:
    server = TLSContexts(two_cert_config(certs)).server_context()
    assert server is not None
    assert server.options & ssl.OP_NO_COMPRESSION
    assert server.options & ssl.OP_NO_RENEGOTIATION


def test_reload_makes_new_contexts(certs: Certs) -> None:
    contexts = TLSContexts(two_cert_config(certs))
    before = contexts.server_context()
    contexts.reload()
    after = contexts.server_context()
    assert before is not None and after is not None and after is not before
    # both the new set and the one running sessions still hold serve by SNI
    for context in (after, before):
        assert handshake(context, client(certs), "x.example.net").client_names == ["*.example.net"]


def test_reload_takes_the_new_settings_and_may_drop_the_certificates(certs: Certs) -> None:
    # (port 465's context was one patched in place: a reload gave it the new pair
    # but not the new minimum version or ciphers)
    contexts = TLSContexts(two_cert_config(certs))
    contexts.reload(two_cert_config(certs, min_version="1.3"))
    after = contexts.server_context()
    assert after is not None and after.minimum_version is ssl.TLSVersion.TLSv1_3
    # [tls] taken out of the file: STARTTLS is no longer offered (it stayed on)
    contexts.reload(TLSConfig())
    assert contexts.server_context() is None


def test_broken_cert_on_reload_keeps_the_old_contexts(certs: Certs, tmp_path: Path) -> None:
    cert, key = certs.files["mail"]
    copy = tmp_path / "cert.pem"
    copy.write_text(Path(cert).read_text())
    contexts = TLSContexts(TLSConfig(cert=str(copy), key=key))
    before = contexts.server_context()
    copy.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=str(copy)):
        contexts.reload()
    assert contexts.server_context() is before
    assert before is not None
    assert handshake(before, client(certs), "mail.example.org").client_error is None


@pytest.mark.parametrize(
    ("which", "problem"),
    [("key", "file not found"),
     ("mismatch", "key values mismatch: the private key is not the certificate's"),
     # OpenSSL says only "[SSL] PEM lib (_ssl.c:3905)" for these
     ("garbage", "holds no whole PEM block"),
     ("swapped", "holds no certificate \\(found: .*PRIVATE KEY\\)")],
)
def test_broken_pairs_at_start(certs: Certs, which: str, problem: str, tmp_path: Path) -> None:
    cert, key = certs.files["mail"]
    if which == "key":
        key = "/nonexistent/key.pem"
    elif which == "mismatch":
        key = certs.files["net"][1]
    elif which == "garbage":
        cert = str(tmp_path / "garbage.pem")
        Path(cert).write_text("this is no certificate\n")
    else:
        cert, key = key, cert
    with pytest.raises(ValueError, match=problem):
        TLSContexts(TLSConfig(cert=cert, key=key))


def test_a_key_with_a_pass_phrase_is_refused_without_prompting(
    certs: Certs, tmp_path: Path
) -> None:
    # Without a password callback OpenSSL would ask on the terminal and wait there.
    from cryptography.hazmat.primitives import serialization

    cert, key = certs.files["mail"]
    private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    with pytest.raises(ValueError, match=f"{encrypted}: the private key is encrypted"):
        TLSContexts(TLSConfig(cert=cert, key=str(encrypted)))
    contexts = TLSContexts(TLSConfig(cert=cert, key=key))
    assert contexts.server_context() is not None
    with pytest.raises(ValueError, match="encrypted with a pass phrase"):
        contexts.reload(TLSConfig(cert=cert, key=str(encrypted)))


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"cert": "a.pem"}, "give both or neither"),
        ({"certificates": [{"cert": "a.pem"}]}, r"certificates\[1\]"),
        ({"min_version": "1.1"}, "min_version"),
    ],
)
def test_config_validation(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TLSConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_cipher_string(certs: Certs) -> None:
    cert, key = certs.files["mail"]
    with pytest.raises(ValueError, match=r"^tls\.ciphers: no usable cipher in 'NOTHING-REAL'"):
        TLSContexts(TLSConfig(cert=cert, key=key, ciphers="NOTHING-REAL"))
