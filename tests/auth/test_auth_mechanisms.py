"""Each mechanism against real client-side computations."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from auth_helpers import PASSWORDS
from scramp import ScramClient

from mailgate.auth.authenticator import Authenticator
from mailgate.auth.mechanisms import Challenge, Failure, SaslExchange, Success

IP = "192.0.2.7"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def steps(exchange: SaslExchange, *responses: bytes | None) -> list[object]:
    return [await exchange.step(r) for r in responses]


def failed(outcome: object, name: str) -> bool:
    return isinstance(outcome, Failure) and outcome.reply.name == name


# --- PLAIN -------------------------------------------------------------------


def test_plain_good_password(auth: Authenticator) -> None:
    out = run(steps(auth.start("plain", IP), b"\0alice\0correct horse"))
    assert out == [Success("alice")]


def test_plain_non_ascii_password(auth: Authenticator) -> None:
    out = run(steps(auth.start("PLAIN", IP), "\0carol\0pässwörd".encode()))
    assert out == [Success("carol")]


def test_plain_without_initial_response_asks_with_empty_challenge(auth: Authenticator) -> None:
    out = run(steps(auth.start("PLAIN", IP), None, b"alice\0alice\0correct horse"))
    assert out == [Challenge(b""), Success("alice")]


@pytest.mark.parametrize(
    "data",
    [b"\0alice\0wrong", b"\0nobody\0correct horse", b"\0alice\0", b"\0carol\0p\xc3\xa4sswort"],
)
def test_plain_bad_credentials(auth: Authenticator, data: bytes) -> None:
    (out,) = run(steps(auth.start("PLAIN", IP), data))
    assert failed(out, "auth.failed")
    assert out.reply.code == 535 and out.reply.enhanced == "5.7.8"


def test_plain_authzid_other_user_fails_even_with_right_password(auth: Authenticator) -> None:
    (out,) = run(steps(auth.start("PLAIN", IP), b"bob\0alice\0correct horse"))
    assert failed(out, "auth.failed")


@pytest.mark.parametrize(
    "data", [b"", b"alice\0correct horse", b"\0\0pw", b"a\0b\0c\0d", b"\0al\xffice\0pw"]
)
def test_plain_malformed(auth: Authenticator, data: bytes) -> None:
    (out,) = run(steps(auth.start("PLAIN", IP), data))
    assert failed(out, "auth.bad_response")
    assert out.reply.code == 501 and out.reply.enhanced == "5.5.2"


def test_step_after_the_end_is_refused(auth: Authenticator) -> None:
    out = run(steps(auth.start("PLAIN", IP), b"\0alice\0correct horse", b"again"))
    assert out[0] == Success("alice") and failed(out[1], "auth.bad_response")


# --- LOGIN -------------------------------------------------------------------


def test_login_without_initial_response(auth: Authenticator) -> None:
    out = run(steps(auth.start("login", IP), None, b"bob", b"bob's secret"))
    assert out == [Challenge(b"Username:"), Challenge(b"Password:"), Success("bob")]


def test_login_initial_response_is_the_user_name(auth: Authenticator) -> None:
    out = run(steps(auth.start("LOGIN", IP), b"bob", b"bob's secret"))
    assert out == [Challenge(b"Password:"), Success("bob")]


def test_login_wrong_password(auth: Authenticator) -> None:
    out = run(steps(auth.start("LOGIN", IP), b"bob", b"correct horse"))
    assert out[0] == Challenge(b"Password:") and failed(out[1], "auth.failed")


def test_login_empty_initial_response_is_an_empty_user(auth: Authenticator) -> None:
    out = run(steps(auth.start("LOGIN", IP), b"", b"correct horse"))
    assert out[0] == Challenge(b"Password:") and failed(out[1], "auth.failed")


# --- CRAM-MD5 ----------------------------------------------------------------


def cram_answer(user: str, password: str, challenge: bytes) -> bytes:
    digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
    return f"{user} {digest}".encode()


def test_cram_good(auth: Authenticator) -> None:
    exchange = auth.start("cram-md5", IP)
    challenge = run(exchange.step(None))
    assert isinstance(challenge, Challenge)
    assert challenge.data.startswith(b"<") and challenge.data.endswith(b"@mx.example.org>")
    answer = cram_answer("alice", PASSWORDS["alice"], challenge.data)
    assert run(exchange.step(answer)) == Success("alice")


def test_cram_challenges_differ(auth: Authenticator) -> None:
    first = run(auth.start("CRAM-MD5", IP).step(None))
    second = run(auth.start("CRAM-MD5", IP).step(None))
    assert first != second


def test_cram_initial_response_is_ignored(auth: Authenticator) -> None:
    exchange = auth.start("CRAM-MD5", IP)
    challenge = run(exchange.step(b"junk"))
    assert isinstance(challenge, Challenge)
    answer = cram_answer("bob", PASSWORDS["bob"], challenge.data)
    assert run(exchange.step(answer)) == Success("bob")


@pytest.mark.parametrize(
    ("user", "password"),
    [("alice", "wrong"), ("nobody", "correct horse"), ("carol", PASSWORDS["carol"])],
)
def test_cram_bad(auth: Authenticator, user: str, password: str) -> None:
    # carol's password is right, but she has no stored CRAM-MD5 form
    exchange = auth.start("CRAM-MD5", IP)
    challenge = run(exchange.step(None))
    assert isinstance(challenge, Challenge)
    assert failed(run(exchange.step(cram_answer(user, password, challenge.data))), "auth.failed")


def test_cram_answer_for_another_challenge_fails(auth: Authenticator) -> None:
    exchange = auth.start("CRAM-MD5", IP)
    run(exchange.step(None))
    answer = cram_answer("alice", PASSWORDS["alice"], b"<1.2@mx.example.org>")
    assert failed(run(exchange.step(answer)), "auth.failed")


@pytest.mark.parametrize(
    "answer", [b"alice", b"alice 1234", b"alice " + b"g" * 32, b" " + b"0" * 32]
)
def test_cram_malformed(auth: Authenticator, answer: bytes) -> None:
    exchange = auth.start("CRAM-MD5", IP)
    run(exchange.step(None))
    assert failed(run(exchange.step(answer)), "auth.bad_response")


# --- SCRAM-SHA-256 -----------------------------------------------------------


def scram_run(
    auth: Authenticator, user: str, password: str, initial: bool = True
) -> tuple[ScramClient, SaslExchange, object]:
    client = ScramClient(["SCRAM-SHA-256"], user, password)
    exchange = auth.start("scram-sha-256", IP)
    first = client.get_client_first().encode()
    if not initial:
        assert run(exchange.step(None)) == Challenge(b"")
    server_first = run(exchange.step(first))
    assert isinstance(server_first, Challenge)
    client.set_server_first(server_first.data.decode())
    final = run(exchange.step(client.get_client_final().encode()))
    return client, exchange, final


@pytest.mark.parametrize("initial", [True, False])
def test_scram_good_and_server_proves_itself(auth: Authenticator, initial: bool) -> None:
    client, exchange, server_final = scram_run(auth, "alice", PASSWORDS["alice"], initial)
    assert isinstance(server_final, Challenge)
    client.set_server_final(server_final.data.decode())  # raises if the signature is wrong
    assert run(exchange.step(b"")) == Success("alice")


def test_scram_non_ascii_password(auth: Authenticator) -> None:
    _, exchange, server_final = scram_run(auth, "carol", PASSWORDS["carol"])
    assert isinstance(server_final, Challenge)
    assert run(exchange.step(b"")) == Success("carol")


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("nobody", "x")])
def test_scram_bad(auth: Authenticator, user: str, password: str) -> None:
    _, _, final = scram_run(auth, user, password)
    assert failed(final, "auth.failed")


def _server_first(auth: Authenticator, user: str) -> dict[str, str]:
    client = ScramClient(["SCRAM-SHA-256"], user, "x")
    first = run(auth.start("SCRAM-SHA-256", IP).step(client.get_client_first().encode()))
    assert isinstance(first, Challenge)
    return dict(p.split("=", 1) for p in first.data.decode().split(","))


def test_scram_unknown_user_gets_a_stable_salt(auth: Authenticator) -> None:
    def salt_for(user: str) -> str:
        return _server_first(auth, user)["s"]

    assert salt_for("nobody") == salt_for("nobody") != salt_for("somebody")


def test_scram_unknown_user_looks_like_a_real_one_in_every_worker(
    make_auth: Callable[..., Authenticator],
) -> None:
    # Each worker (and each reload) builds its own Authenticator from the same file:
    # a made-up name must get the same salt from all of them, and a salt of the
    # length, and a count, a real entry has (a 16-byte fake beside 32-byte real
    # salts, or a salt that changed from one connection to the next, told them apart).
    one, other = make_auth(), make_auth()
    real = _server_first(one, "alice")
    fake = _server_first(one, "nobody")
    assert fake["s"] == _server_first(other, "nobody")["s"]
    assert len(base64.b64decode(fake["s"])) == len(base64.b64decode(real["s"])) == 32
    assert fake["i"] == real["i"]


def test_scram_refuses_channel_binding(auth: Authenticator) -> None:
    out = run(auth.start("SCRAM-SHA-256", IP).step(b"p=tls-exporter,,n=alice,r=abcdefgh"))
    assert failed(out, "auth.no_channel_binding")


def test_scram_accepts_y_flag(auth: Authenticator) -> None:
    exchange = auth.start("SCRAM-SHA-256", IP)
    out = run(exchange.step(b"y,,n=alice,r=abcdefghijkl"))
    assert isinstance(out, Challenge) and out.data.startswith(b"r=abcdefghijkl")


@pytest.mark.parametrize(
    "first", [b"", b"n,,", b"x,,n=alice,r=abc", b"n,,r=abc", b"\xff"]
)
def test_scram_malformed_first(auth: Authenticator, first: bytes) -> None:
    assert failed(run(auth.start("SCRAM-SHA-256", IP).step(first)), "auth.bad_response")


def _final_with_authzid(
    password: str, nonce: str, header: bytes, server_first: str
) -> tuple[bytes, bytes]:
    """A client-final for a client-first "<header>n=alice,r=<nonce>", computed by the
    RFC 5802 3 formulas; and the server signature the client expects."""
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(header).decode()},r={attrs['r']}"
    message = f"n=alice,r={nonce},{server_first},{without_proof}".encode()
    proof = bytes(a ^ b for a, b in zip(client_key, hmac.digest(stored_key, message, "sha256"),
                                        strict=True))
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    return final, b"v=" + base64.b64encode(hmac.digest(server_key, message, "sha256"))


@pytest.mark.parametrize(
    ("password", "signed_header", "ok"),
    [
        (PASSWORDS["alice"], b"n,a=alice,", True),
        ("wrong", b"n,a=alice,", False),
        (PASSWORDS["alice"], b"n,,", False),  # c= must be the header as it was sent
    ],
)
def test_scram_with_the_user_as_authzid(
    auth: Authenticator, password: str, signed_header: bytes, ok: bool
) -> None:
    # RFC 5802 5.1: "a=" names an authorization identity; the user's own is no more
    # than it has (GNU SASL sends it), another user's is refused
    exchange = auth.start("SCRAM-SHA-256", IP)
    first = run(exchange.step(b"n,a=alice,n=alice,r=abcdefghijkl"))
    assert isinstance(first, Challenge)
    final, verifier = _final_with_authzid(
        password, "abcdefghijkl", signed_header, first.data.decode()
    )
    out = run(exchange.step(final))
    if ok:
        assert out == Challenge(verifier)
        assert run(exchange.step(b"")) == Success("alice")
    else:
        assert failed(out, "auth.failed")


def test_scram_authzid_of_another_user_is_refused(auth: Authenticator) -> None:
    out = run(auth.start("SCRAM-SHA-256", IP).step(b"n,a=bob,n=alice,r=abcdefghijkl"))
    assert failed(out, "auth.failed")


def test_scram_final_with_wrong_nonce_is_malformed(auth: Authenticator) -> None:
    exchange = auth.start("SCRAM-SHA-256", IP)
    run(exchange.step(b"n,,n=alice,r=abcdefghijkl"))
    out = run(exchange.step(b"c=biws,r=otherotherother,p=AAAA"))
    assert failed(out, "auth.bad_response")


def test_scram_non_empty_last_response_is_malformed(auth: Authenticator) -> None:
    _, exchange, server_final = scram_run(auth, "alice", PASSWORDS["alice"])
    assert isinstance(server_final, Challenge)
    assert failed(run(exchange.step(b"extra")), "auth.bad_response")


# --- choosing ----------------------------------------------------------------


def test_unknown_mechanism_raises(auth: Authenticator) -> None:
    with pytest.raises(ValueError):
        auth.start("GSSAPI", IP)
