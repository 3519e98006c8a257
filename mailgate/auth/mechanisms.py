"""Server-side SASL exchanges: PLAIN, LOGIN, CRAM-MD5 and SCRAM-SHA-256.

The session hands each exchange DECODED client data (base64, ``*`` cancel and the
SMTP sequence rules are the protocol engine's business) and sends back what
``step`` returns: a Challenge (a 334), a Success (235) or a Failure with its reply.
Nothing here logs a password, a proof or a digest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from scramp import ScramMechanism
from scramp.utils import ScramException, ServerError

from mailgate.auth.credentials import Credentials
from mailgate.protocol.replies import Reply, reply

log = logging.getLogger("mailgate.auth")


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes  # raw; the session base64-encodes it into "334 <data>"


@dataclass(frozen=True, slots=True)
class Success:
    user: str


@dataclass(frozen=True, slots=True)
class Failure:
    reply: Reply


Outcome = Challenge | Success | Failure


class Recorder(Protocol):
    """Where an exchange reports its start and its end, for throttling."""

    def attempt(self, client_ip: str) -> None: ...
    def failure(self, user: str | None) -> None: ...
    def success(self, client_ip: str, user: str) -> None: ...
    def not_counted(self, client_ip: str) -> None: ...


class Malformed(Exception):
    """The client's message breaks the mechanism's syntax: 501 5.5.2."""


# Replies that are the client's doing and count against its failure budget.
_COUNTED = frozenset({"auth.failed", "auth.bad_response", "auth.no_channel_binding"})


class SaslExchange(ABC):
    """One AUTH exchange.  Call ``step`` with the initial response (None when the
    client gave none), then with each decoded client line, until it returns a
    Success or a Failure."""

    name = ""

    def __init__(self, credentials: Credentials, recorder: Recorder, client_ip: str) -> None:
        self._credentials = credentials
        self._recorder = recorder
        self._client_ip = client_ip
        self.user: str | None = None  # the identity claimed so far, for logs and throttling
        self._done = False
        recorder.attempt(client_ip)

    async def step(self, response: bytes | None) -> Outcome:
        if self._done:
            return Failure(reply("auth.bad_response"))
        try:
            outcome = await self._step(response)
        except Malformed:
            outcome = Failure(reply("auth.bad_response"))
        except Exception:
            # A backend fault (argon2, a worker thread): the client may retry later.
            log.exception("auth %s from %s: internal error", self.name, self._client_ip)
            outcome = Failure(reply("auth.temporary"))
        if not isinstance(outcome, Challenge):
            self._done = True
            self._record(outcome)
        return outcome

    def _record(self, outcome: Success | Failure) -> None:
        # (the session's own event=auth line says what became of it, with its sid)
        if isinstance(outcome, Success):
            self._recorder.success(self._client_ip, outcome.user)
            return
        if outcome.reply.name in _COUNTED:
            self._recorder.failure(self.user)
        else:
            self._recorder.not_counted(self._client_ip)

    @abstractmethod
    async def _step(self, response: bytes | None) -> Outcome: ...

    async def _check_password(self, user: str, password: str) -> Outcome:
        self.user = user
        if await self._credentials.verify_password(user, password):
            return Success(user)
        return Failure(reply("auth.failed"))


def _saslname(text: str) -> str:
    """RFC 5802 5.1: "=2C" is a comma and "=3D" an equals sign in a name."""
    return text.replace("=2C", ",").replace("=3D", "=")


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed from None


class PlainExchange(SaslExchange):
    """RFC 4616: ``authzid NUL authcid NUL passwd``; authzid empty or the authcid."""

    name = "PLAIN"

    async def _step(self, response: bytes | None) -> Outcome:
        if response is None:
            return Challenge(b"")  # "334 " and wait for the credentials
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise Malformed
        authzid, authcid, password = (_text(p) for p in parts)
        if authzid and authzid != authcid:
            # Acting for another user is not supported: refuse, do not ignore it.
            self.user = authcid
            return Failure(reply("auth.failed"))
        return await self._check_password(authcid, password)


class LoginExchange(SaslExchange):
    """The non-standard LOGIN; an initial response is the user name (as 9front does)."""

    name = "LOGIN"

    def __init__(self, credentials: Credentials, recorder: Recorder, client_ip: str) -> None:
        super().__init__(credentials, recorder, client_ip)
        self._login: str | None = None  # None: still waiting for the user name

    async def _step(self, response: bytes | None) -> Outcome:
        if self._login is None:
            if response is None:
                return Challenge(b"Username:")
            self._login = self.user = _text(response)
            return Challenge(b"Password:")
        return await self._check_password(self._login, _text(response or b""))


class CramMD5Exchange(SaslExchange):
    """RFC 2195: challenge ``<random.time@host>``, answer ``user SP hex(HMAC-MD5)``."""

    name = "CRAM-MD5"

    def __init__(
        self, credentials: Credentials, recorder: Recorder, client_ip: str, hostname: str
    ) -> None:
        super().__init__(credentials, recorder, client_ip)
        self._challenge = f"<{secrets.randbits(64)}.{int(time.time())}@{hostname}>".encode()
        self._sent = False

    async def _step(self, response: bytes | None) -> Outcome:
        if not self._sent:
            # RFC 2195 has no initial response: the engine refuses one (501 5.7.0)
            # before the exchange starts.
            self._sent = True
            return Challenge(self._challenge)
        user, space, digest = _text(response or b"").rpartition(" ")
        if not space or not user or len(digest) != 32:
            raise Malformed
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raise Malformed from None
        self.user = user
        if self._credentials.check_cram(user, self._challenge, raw):
            return Success(user)
        return Failure(reply("auth.failed"))


class ScramExchange(SaslExchange):
    """RFC 5802 / RFC 7677 SCRAM-SHA-256 through scramp, without channel binding.

    client-first -> server-first; client-final -> server-final (``v=`` signature, sent
    as a last 334 so the client can check the server); empty line -> 235.
    """

    name = "SCRAM-SHA-256"
    _MECHANISM = ScramMechanism("SCRAM-SHA-256")
    # scramp errors that mean "wrong password", as opposed to a malformed message
    _BAD_CREDENTIALS = frozenset(
        {ServerError.INVALID_PROOF, ServerError.CHANNEL_BINDINGS_DONT_MATCH}
    )

    def __init__(self, credentials: Credentials, recorder: Recorder, client_ip: str) -> None:
        super().__init__(credentials, recorder, client_ip)
        self._server = self._MECHANISM.make_server(self._auth_fn)
        self._stage = 0
        # The gs2 header as the client sent it, when it names an authzid: scramp
        # takes none (it refuses any "a="), so it gets the header without it and the
        # client-final, whose c= and proof cover the original, is checked here.
        self._gs2_with_authzid = ""

    def _auth_fn(self, user: str) -> tuple[bytes, bytes, bytes, int]:
        self.user = user
        return self._credentials.scram_keys(user)

    async def _step(self, response: bytes | None) -> Outcome:
        stage, self._stage = self._stage, self._stage + 1
        if stage == 0:
            if response is None:
                self._stage = 0
                return Challenge(b"")  # ask for the client-first message
            text = _text(response)
            if text.startswith("p="):
                return Failure(reply("auth.no_channel_binding"))
            flag, _, rest = text.partition(",")
            authz, _, bare = rest.partition(",")
            if authz.startswith("a="):
                self._gs2_with_authzid = f"{flag},{authz},"
                text = f"{flag},,{bare}"
            try:
                self._server.set_client_first(text)
                first = self._server.get_server_first()
            except ScramException:
                raise Malformed from None
            if authz.startswith("a=") and _saslname(authz[2:]) != self.user:
                # acting for another user is not supported: refused, not ignored
                return Failure(reply("auth.failed"))
            return Challenge(first.encode())
        if stage == 1 and self._gs2_with_authzid:
            return self._final_with_authzid(_text(response or b""))
        if stage == 1:
            try:
                self._server.set_client_final(_text(response or b""))
            except ScramException as e:
                if e.server_error in self._BAD_CREDENTIALS:
                    return Failure(reply("auth.failed"))
                raise Malformed from None
            return Challenge(self._server.get_server_final().encode())
        if response:
            raise Malformed  # the answer to server-final must be empty
        if self.user is None:  # cannot happen: _auth_fn ran in stage 0
            raise Malformed
        return Success(self.user)

    def _final_with_authzid(self, text: str) -> Outcome:
        """RFC 5802 5.1 and 3: the client-final of an exchange whose gs2 header named
        the user as its authzid.  c= must be that header; the proof signs the
        AuthMessage, of which the client-final without its proof is the last part."""
        server = self._server
        head, sep, proof_text = text.rpartition(",p=")
        attributes = head.split(",")
        if not sep or len(attributes) < 2 or attributes[0][:2] != "c=" or attributes[1][:2] != "r=":
            raise Malformed
        try:
            binding = base64.b64decode(attributes[0][2:], validate=True)
            proof = base64.b64decode(proof_text, validate=True)
        except binascii.Error:
            raise Malformed from None
        if binding != self._gs2_with_authzid.encode() or attributes[1][2:] != str(server.nonce):
            return Failure(reply("auth.failed"))
        message = f"{server.client_first_bare},{server.server_first},{head}".encode()
        signature = hmac.digest(server.stored_key, message, "sha256")
        client_key = bytes(a ^ b for a, b in zip(signature, proof, strict=False))
        if len(proof) != len(signature) or not hmac.compare_digest(
            hashlib.sha256(client_key).digest(), server.stored_key
        ):
            return Failure(reply("auth.failed"))
        verifier = base64.b64encode(hmac.digest(server.server_key, message, "sha256"))
        return Challenge(b"v=" + verifier)
