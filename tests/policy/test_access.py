"""Access lists: the file format, upas filter states and their replies."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import client, envelope, recipient, run

from mailgate.policy.access import AccessList, AccessStep
from mailgate.policy.base import Client, Verdict
from mailgate.protocol.envelope import Address, Envelope

HOST = "mx.mailgate.lab"

RULES = """\
# upas-style access list
deny    ip        192.0.2.0/24        # a bad network
dialup  ip        198.51.100.0/24
allow   ip        198.51.100.77
deny    ip        2001:db8:bad::/48
delay   helo      *.dynamic.lab
block   sender    *@spam.lab
block   sender    *.bulk.lab
deny    sender    spammer@annoying.lab
allow   sender    owner-9fans@cse.psu.edu
deny    sender    *@cse.psu.edu
delay   sender    news*@slow.lab
deny    sender    <>
block   recipient trap@mailgate.lab
deny    recipient old@mailgate.lab
delay   recipient busy@mailgate.lab
allow   recipient abuse@mailgate.lab
block   recipient *@traps.lab
"""


class Spool:
    size = 0

    def read_head(self, limit: int) -> bytes:
        return b""


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "access"
    path.write_text(RULES)
    return path


@pytest.fixture
def step(rules_file: Path) -> AccessStep:
    return AccessStep(str(rules_file), HOST)


def transaction(
    step: AccessStep, who: Client, env: Envelope, rcpts: tuple[str, ...] = ()
) -> tuple[Verdict, str]:
    """connect + MAIL (+ RCPTs + message): the first refusal and the filter state."""

    async def go() -> Verdict:
        who.filter_state = "TRUSTED" if who.trusted else "ACCEPT"  # as the engine does
        await step.connect(who)
        verdict = await step.mail(who, env)
        if not verdict.accepted:
            return verdict
        for text in rcpts:
            rcpt = recipient(text)
            verdict = await step.rcpt(who, env, rcpt)
            if not verdict.accepted:
                return verdict
            env.recipients.append(rcpt)
        return await step.message(who, env, Spool())

    verdict = run(go())
    return verdict, who.filter_state


def test_no_rule_accepts(step: AccessStep) -> None:
    verdict, state = transaction(step, client(), envelope("a@good.lab"), ("x@mailgate.lab",))
    assert verdict.accepted and state == "ACCEPT"


def test_denied_ip_is_refused_at_mail_naming_the_postmaster(step: AccessStep) -> None:
    who = client("192.0.2.9")
    run(step.connect(who))
    assert who.tags["access_ip"] == "deny"  # decided at connect ...
    verdict, state = transaction(step, who, envelope("a@good.lab"))
    assert state == "DENIED"
    assert str(verdict.reply) == (  # ... answered at MAIL, multi-line, 550 on every line
        "550-5.7.1 Access denied for 192.0.2.9.\r\n"
        f"550 5.7.1 Contact postmaster@{HOST} for more information."
    )
    assert dict(verdict.tags) == {"check": "access", "reason": "deny", "rule": verdict.tags[2][1]}
    assert verdict.tags[2][1].endswith(":2")


def test_denied_sender_is_refused_at_mail(step: AccessStep) -> None:
    verdict, state = transaction(step, client(), envelope("Spammer@Annoying.LAB"))
    assert state == "DENIED"
    assert verdict.reply is not None and verdict.reply.lines == (
        "We don't accept mail from Spammer@Annoying.LAB.",
        f"Contact postmaster@{HOST} for more information.",
    )
    assert (verdict.reply.code, verdict.reply.enhanced) == (550, "5.7.1")


def test_ipv4_mapped_client_matches_ipv4_rules(step: AccessStep) -> None:
    verdict, state = transaction(step, client("::ffff:192.0.2.9"), envelope("a@good.lab"))
    assert state == "DENIED" and verdict.reply is not None


def test_ipv6_rules(step: AccessStep) -> None:
    verdict, state = transaction(step, client("2001:db8:bad::1"), envelope("a@good.lab"))
    assert state == "DENIED" and verdict.reply is not None
    verdict, state = transaction(step, client("2001:db8:600d::1"), envelope("a@good.lab"))
    assert state == "ACCEPT" and verdict.accepted


def test_dialup_ip(step: AccessStep) -> None:
    verdict, state = transaction(step, client("198.51.100.3"), envelope("a@good.lab"))
    assert state == "DIALUP"
    assert str(verdict.reply) == "550 5.7.1 We don't accept mail from dial-up ports."


def test_allow_beats_the_rest_whatever_the_order(step: AccessStep) -> None:
    # allow ip 198.51.100.77 comes after the dialup /24 in the file
    verdict, state = transaction(step, client("198.51.100.77"), envelope("a@good.lab"))
    assert verdict.accepted and state == "ACCEPT"
    # allow sender owner-9fans@ beats deny *@cse.psu.edu listed after it ...
    verdict, state = transaction(step, client(), envelope("owner-9fans@cse.psu.edu"))
    assert verdict.accepted and state == "ACCEPT"
    # ... and an IP deny: the allow list is a real whitelist
    verdict, _ = transaction(step, client("192.0.2.9"), envelope("owner-9fans@cse.psu.edu"))
    assert verdict.accepted
    verdict, state = transaction(step, client(), envelope("other@cse.psu.edu"))
    assert state == "DENIED"


def test_delay_is_always_temporary(step: AccessStep) -> None:
    verdict, state = transaction(step, client(), envelope("a@good.lab", helo="host7.Dynamic.lab"))
    assert state == "DELAY"
    assert str(verdict.reply) == "451 4.7.1 Please try again later"
    verdict, state = transaction(step, client(), envelope("newsletter@slow.lab"))
    assert state == "DELAY" and verdict.reply is not None and verdict.reply.code == 451


def test_helo_wildcard_covers_the_domain_itself(step: AccessStep) -> None:
    _, state = transaction(step, client(), envelope("a@good.lab", helo="dynamic.lab"))
    assert state == "DELAY"
    _, state = transaction(step, client(), envelope("a@good.lab", helo="notdynamic.lab"))
    assert state == "ACCEPT"


def test_a_domain_pattern_matches_both_spellings_of_an_idn(tmp_path: Path) -> None:
    path = tmp_path / "access"
    path.write_text("deny sender *@*.bücher.lab\ndelay helo xn--mller-kva.lab\n")
    step = AccessStep(str(path), HOST)
    _, state = transaction(step, client(), envelope("x@shop.xn--bcher-kva.lab"))
    assert state == "DENIED"
    _, state = transaction(step, client(), envelope("x@good.lab", helo="MÜLLER.lab"))
    assert state == "DELAY"
    _, state = transaction(step, client(), envelope("x@good.lab", helo="mueller.lab"))
    assert state == "ACCEPT"


def test_null_sender_rule(step: AccessStep) -> None:
    _, state = transaction(step, client(), Envelope(helo="h.lab", sender=Address("", "")))
    assert state == "DENIED"


@pytest.mark.parametrize("disposition", ["discard", "quarantine"])
def test_blocked_is_refused_after_the_data(rules_file: Path, disposition: str) -> None:
    step = AccessStep(str(rules_file), HOST, disposition, "/var/quarantine")  # type: ignore[arg-type]
    verdict, state = transaction(step, client(), envelope("x@spam.lab"), ("a@mailgate.lab",))
    assert state == "BLOCKED"
    assert str(verdict.reply) == "554 5.7.1 we believe this is spam.  we don't accept it."
    tags = dict(verdict.tags)
    assert tags["disposition"] == disposition
    assert tags.get("quarantine_dir") == (
        "/var/quarantine" if disposition == "quarantine" else None
    )


def test_blocked_subdomain_pattern(step: AccessStep) -> None:
    _, state = transaction(step, client(), envelope("x@mx.eu.bulk.lab"), ("a@mailgate.lab",))
    assert state == "BLOCKED"
    _, state = transaction(step, client(), envelope("x@bulk.lab"), ("a@mailgate.lab",))
    assert state == "BLOCKED"


def test_spam_trap_recipient_blocks_the_message(step: AccessStep) -> None:
    verdict, state = transaction(
        step, client(), envelope("a@good.lab"), ("a@mailgate.lab", "TRAP@mailgate.lab")
    )
    assert state == "BLOCKED" and verdict.reply is not None and verdict.reply.code == 554


def test_recipient_deny_and_delay_at_rcpt(step: AccessStep) -> None:
    verdict, _ = transaction(step, client(), envelope("a@good.lab"), ("old@mailgate.lab",))
    assert str(verdict.reply) == "550 5.7.1 Mail to <old@mailgate.lab> refused by local policy"
    verdict, _ = transaction(step, client(), envelope("a@good.lab"), ("busy@mailgate.lab",))
    assert str(verdict.reply) == "451 4.7.1 Please try again later"


def test_an_allowed_client_still_meets_the_recipient_rules(step: AccessStep) -> None:
    # an allowed sender (forgeable) or address: refused addresses and spam traps hold
    # (they were skipped for any client an allow rule had matched)
    allowed = envelope("owner-9fans@cse.psu.edu")
    verdict, _ = transaction(step, client(), allowed, ("old@mailgate.lab",))
    assert str(verdict.reply) == "550 5.7.1 Mail to <old@mailgate.lab> refused by local policy"
    verdict, state = transaction(step, client(ip="198.51.100.77"), envelope("a@good.lab"),
                                 ("a@mailgate.lab", "trap@mailgate.lab"))
    assert state == "BLOCKED" and verdict.reply is not None and verdict.reply.code == 554


def test_opt_out_every_recipient_allowed_delivers_blocked_mail(step: AccessStep) -> None:
    verdict, state = transaction(step, client(), envelope("x@spam.lab"), ("abuse@mailgate.lab",))
    assert verdict.accepted and state == "ACCEPT"
    verdict, state = transaction(
        step, client(), envelope("x@spam.lab"), ("abuse@mailgate.lab", "a@mailgate.lab")
    )
    assert state == "BLOCKED" and not verdict.accepted


def test_trusted_and_authenticated_clients_skip_the_lists(step: AccessStep) -> None:
    who = client("192.0.2.9", trusted=True)
    verdict, state = transaction(step, who, envelope("x@spam.lab"), ("trap@mailgate.lab",))
    assert verdict.accepted and state == "TRUSTED"
    who = client("192.0.2.9", auth_user="alice")
    verdict, _ = transaction(step, who, envelope("x@spam.lab"), ("old@mailgate.lab",))
    assert verdict.accepted


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("deny ip 10.1.2.3/8", "has host bits set"),
        ("deny ip not-an-ip", "does not appear to be"),
        ("refuse ip 192.0.2.1", "unknown action 'refuse'"),
        ("deny host 192.0.2.1", "unknown kind 'host'"),
        ("deny ip", "expected <action> <kind> <pattern>"),
        ("deny sender a@b.lab extra", "expected <action> <kind> <pattern>"),
        ("block sender *@*", "would match every address"),
        ("block sender *", "would match every address"),
        ("block sender a*b@x.lab", "bad user"),
        ("delay helo *", "bad name pattern"),
        ("delay helo mail.*.lab", "bad name pattern"),
        ("dialup sender a@b.lab", "dialup describes a client"),
        ("deny recipient <>", "never a recipient"),
    ],
)
def test_bad_lines_name_file_line_and_problem(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "access"
    path.write_text(f"# fine\nallow ip 192.0.2.1\n\n{line}  # comment\n")
    with pytest.raises(ValueError, match=r"access:4: ") as info:
        AccessList.load(str(path))
    assert problem in str(info.value)


def test_missing_and_binary_files_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        AccessList.load(str(tmp_path / "nope"))
    binary = tmp_path / "bin"
    binary.write_bytes(b"deny ip \xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        AccessList.load(str(binary))


def test_hash_inside_a_pattern_is_not_a_comment(tmp_path: Path) -> None:
    path = tmp_path / "access"
    path.write_text("deny sender a#b@x.lab # real comment\n")
    rules = AccessList.load(str(path))
    assert rules.match_address("sender", Address("a#b", "x.lab")) is not None


@pytest.fixture(scope="module")
def shared_step(tmp_path_factory: pytest.TempPathFactory) -> AccessStep:
    path = tmp_path_factory.mktemp("access") / "access"
    path.write_text(RULES)
    return AccessStep(str(path), HOST)


@settings(max_examples=200, deadline=None)
@given(
    local=st.text(max_size=40),
    domain=st.text(max_size=40),
    helo=st.text(max_size=40),
    ip=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
)
def test_weird_input_never_raises(
    shared_step: AccessStep, local: str, domain: str, helo: str, ip: ipaddress.IPv4Address
) -> None:
    step = shared_step
    env = Envelope(helo=helo, sender=Address(local, domain))
    verdict, state = transaction(step, client(str(ip)), env, (f"{local}@{domain}",))
    assert state in ("ACCEPT", "DENIED", "BLOCKED", "DELAY", "DIALUP")
    if verdict.reply is not None:
        assert verdict.reply.to_bytes().count(b"\r\n") == len(verdict.reply.lines)


def test_the_documented_example_parses_and_means_what_it_says(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "access-lists.md").read_text()
    example = doc.split("# /etc/mailgate/access", 1)[1].split("```", 1)[0]
    path = tmp_path / "access"
    path.write_text(example)
    step = AccessStep(str(path), HOST)
    _, state = transaction(step, client("198.51.100.77"), envelope("a@good.lab"))
    assert state == "ACCEPT"
    _, state = transaction(step, client("198.51.100.78"), envelope("a@good.lab"))
    assert state == "DIALUP"
    _, state = transaction(step, client(), envelope("x@cse.psu.edu"))
    assert state == "DENIED"
