"""Clients that talked before the greeting are refused at MAIL, unless excused."""

from __future__ import annotations

from policy_helpers import client, envelope, run

from mailgate.policy.pregreet import TAG, PregreetStep


def test_a_client_that_talked_first_is_refused_at_mail() -> None:
    early = client(tags={TAG: "23"})
    verdict = run(PregreetStep().mail(early, envelope()))
    assert verdict.reply is not None
    assert str(verdict.reply) == "550 5.5.1 Protocol error: 203.0.113.5 talked before the greeting"
    assert dict(verdict.tags) == {"check": "pregreet", "reason": "talked_first", "octets": "23"}


def test_patient_trusted_authenticated_and_allowed_clients_pass() -> None:
    for who in (
        client(),
        client(tags={TAG: "5"}, trusted=True),
        client(tags={TAG: "5"}, auth_user="alice"),
        client(tags={TAG: "5", "access": "allow"}),
    ):
        assert run(PregreetStep().mail(who, envelope())).accepted
