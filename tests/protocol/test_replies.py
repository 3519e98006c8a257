"""Item 3: the EHLO keywords, enhanced status codes everywhere (RFC 2034 / 3463), and
replies that never echo CR, LF or unbounded client input."""

from __future__ import annotations

import re

import pytest
from protocol_helpers import HOST, Session, codes, lines, well_formed

from mailgate.protocol.connection import Connection, Settings
from mailgate.protocol.replies import CATALOGUE, ECHO_LIMIT, MAX_LINE, Reply, reply

ENHANCED_RFC3463 = re.compile(r"[245]\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\Z")


def ehlo_keywords(s: Session) -> list[str]:
    out = s.send("EHLO client.example.net\r\n")
    assert out[0] == f"250-{HOST} you are client.example.net"
    assert out[-1].startswith("250 ")
    assert all(line.startswith("250-") for line in out[:-1])
    return [line[4:] for line in out[1:]]


def test_ehlo_advertises_the_extensions() -> None:
    kws = ehlo_keywords(Session(max_message_size=1000))
    for kw in ["ENHANCEDSTATUSCODES", "PIPELINING", "SIZE 1000", "8BITMIME", "SMTPUTF8",
               "CHUNKING", "DSN"]:
        assert kw in kws
    assert "STARTTLS" not in kws
    assert not any(k.startswith("AUTH") for k in kws)


def test_starttls_advertised_until_tls_is_active() -> None:
    s = Session(starttls=True)
    assert "STARTTLS" in ehlo_keywords(s)
    assert s.send("STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]  # accept_all shakes hands
    assert s.conn.tls_active
    assert "STARTTLS" not in ehlo_keywords(s)


def test_auth_plaintext_mechanisms_hidden_without_tls() -> None:
    mechs = ("PLAIN", "LOGIN", "SCRAM-SHA-256")
    s = Session(auth_mechanisms=mechs, starttls=True)
    assert "AUTH SCRAM-SHA-256" in ehlo_keywords(s)
    s.send("STARTTLS\r\n")
    assert "AUTH PLAIN LOGIN SCRAM-SHA-256" in ehlo_keywords(s)
    s = Session(auth_mechanisms=mechs, allow_plaintext_auth=True)
    assert "AUTH PLAIN LOGIN SCRAM-SHA-256" in ehlo_keywords(s)
    s = Session(auth_mechanisms=("PLAIN",))
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(s))


def test_auth_not_advertised_once_authenticated() -> None:
    s = Session(auth_mechanisms=("PLAIN",), allow_plaintext_auth=True)
    ehlo_keywords(s)
    assert codes(s.send("AUTH PLAIN AHVzZXIAcGFzcw==\r\n")) == ["235 2.7.0"]
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(s))


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_catalogue_enhanced_codes(name: str) -> None:
    tpl = CATALOGUE[name]
    assert 200 <= tpl.code < 600
    if tpl.enhanced is None:
        # RFC 2034: only the greeting, the HELO/EHLO reply and 3xx go without.
        assert name in ("greeting", "helo") or tpl.code // 100 == 3, name
        return
    assert ENHANCED_RFC3463.match(tpl.enhanced), (name, tpl.enhanced)
    assert tpl.enhanced[0] == str(tpl.code)[0], (name, tpl.code, tpl.enhanced)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_catalogue_entries_render_well_formed(name: str) -> None:
    args = {k: "x" * 600 for k in re.findall(r"{(\w+)}", CATALOGUE[name].text)}
    r = reply(name, **args)
    data = r.to_bytes()
    # A SASL challenge is our own base64, allowed RFC 4954's 12288 octets; client
    # values anywhere else are cut so that a line fits RFC 5321's 512.
    limit = 12288 if name == "auth.challenge" else MAX_LINE
    assert all(len(line) + 2 <= limit for line in data[:-2].split(b"\r\n"))
    if name == "greeting" or name == "helo":
        return
    if r.code // 100 != 3:
        # Every line of a multi-line reply repeats the code and the enhanced code.
        for line in lines(data):
            assert line[4:].startswith(f"{r.enhanced} "), line


def test_codes_after_plain_helo_too() -> None:
    s = Session()
    assert s.send("HELO client.example.net\r\n") == [f"250 {HOST} you are client.example.net"]
    for cmd, expected in [
        ("MAIL FROM:<a@example.net>", "250 2.1.0"),
        ("RCPT TO:<b@example.org>", "250 2.1.5"),
        ("RSET", "250 2.0.0"),
        ("NOOP", "250 2.0.0"),
        ("BOGUS", "500 5.5.1"),
        ("VRFY x", "252 2.5.0"),
    ]:
        assert codes(s.send(cmd + "\r\n")) == [expected]
    for out in s.writes:
        well_formed(out)


def test_multiline_reply_from_the_driver_keeps_code_on_every_line() -> None:
    def refuse(conn: Connection, event: object) -> None:
        conn.reject(reply("access.denied", sender="a@example.net", host=HOST))

    from protocol_helpers import scripted

    s = Session(decide=scripted(MailFrom=refuse))
    s.ehlo()
    out = s.send("MAIL FROM:<a@example.net>\r\n")
    assert len(out) == 2
    assert out[0].startswith("550-5.7.1 ") and out[1].startswith("550 5.7.1 ")


HOSTILE = [
    "MAIL FROM:<" + "a" * 1500 + "@example.net>",
    "MAIL FROM:<a@example.net> " + "X" * 1800 + "=1",
    "MAIL FROM:<a@example.net> SIZE=" + "9" * 1500,
    "MAIL FROM:<a@example.net> ENVID=" + "\x01" * 40,
    'MAIL FROM:<"a\rb"@example.net>',
    "RCPT TO:<" + "b" * 1900 + "@example.org>",
    "RCPT TO:<b@example.org> " + "Y" * 1900,
    "EHLO " + "h" * 500,
    "VRFY " + "v" * 500,
    "HELO a\x1b[31mred",
    "X" * 100,
]


@pytest.mark.parametrize("line", HOSTILE)
def test_replies_never_echo_control_characters_or_long_input(line: str) -> None:
    s = Session(vrfy=True)
    s.ehlo()
    if line.startswith("RCPT"):
        s.send("MAIL FROM:<a@example.net>\r\n")
    out = s.feed(line.encode() + b"\r\n")
    well_formed(out)
    for text in lines(out):
        assert "\x1b" not in text and "\x01" not in text
        assert len(text) <= ECHO_LIMIT + 80, text  # client values are cut to ECHO_LIMIT


def test_reply_text_is_us_ascii() -> None:
    # RFC 5321 4.2 textstring: a U-label HELO name or a mailer's UTF-8 words are not
    # echoed as UTF-8 (nor cut in the middle of a character at the 512-octet limit)
    r = reply("helo", host="mx.example.org", name="b\u00fccher-client.de")
    assert r.to_bytes() == b"250 mx.example.org you are b?cher-client.de\r\n"
    long = reply("delivery.downstream_temp").with_preface(["\u30c6\u30b9\u30c8" * 200])
    assert long.to_bytes().isascii() and all(
        len(line) <= MAX_LINE for line in long.to_bytes().splitlines(keepends=True))
    # a whole address of the longest kind is echoed, not cut to 64 characters
    address = "a" * 64 + "@" + "b" * 180 + ".example"
    assert address in reply("rcpt.unknown", address=address).text


def test_a_driver_reply_with_a_hostile_value_is_cleaned() -> None:
    r = reply("rcpt.unknown", address="evil\r\n250 2.0.0 fake@example.org")
    assert r.to_bytes().count(b"\r\n") == 1
    assert isinstance(r, Reply)


def test_a_long_configured_hostname_still_fits_a_reply_line() -> None:
    conn = Connection(Settings("h" * 600))
    conn.greet()
    greeting = conn.data_to_send()
    assert greeting.endswith(b" ESMTP mailgate\r\n") and len(greeting) <= MAX_LINE


def test_per_message_replies_do_not_push_recurring_ones_out_of_the_memo() -> None:
    # The same HELO answer recurs on every connection of a client; the final 250
    # carries a new message id each time and must not evict it.
    helo = reply("helo", host=HOST, name="client.example.net")
    accepted = [reply("data.accepted", id=f"S1.{n}") for n in range(1000)]
    assert reply("helo", host=HOST, name="client.example.net") is helo
    assert accepted[7].to_bytes() == b"250 2.0.0 OK: queued as S1.7\r\n"


def test_a_status_of_another_class_or_form_is_not_taken() -> None:
    ours = reply("delivery.downstream_rcpt_perm", address="a@b")
    assert ours.with_status("5.2.2").enhanced == "5.2.2"
    for other in ("4.2.2", "2.0.0", "5.2", "5.02.2", "5.2.2x", "5.1000.1", ""):
        assert ours.with_status(other) is ours, other

