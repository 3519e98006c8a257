"""domain_key: the U-label and A-label spellings of a domain compare equal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.protocol.idn import ascii_domain, domain_key


@pytest.mark.parametrize(
    ("spelling", "key"),
    [
        ("Example.ORG", "example.org"),
        ("xn--bcher-kva.example", "bücher.example"),
        ("XN--BCHER-KVA.Example", "bücher.example"),
        ("BÜCHER.example", "bücher.example"),
        ("bu\u0308cher.example", "bücher.example"),  # decomposed: NFC
        ("xn--strae-oqa.example", "straße.example"),  # no IDNA2003 mapping to ss
        ("strasse.example", "strasse.example"),
        ("xn--zz.example", "xn--zz.example"),  # no valid A-label: as it is
        ("xn--abc-.example", "xn--abc-.example"),  # decodes to ASCII: no A-label
        ("xn--a.example", "xn--a.example"),  # decodes to a control character
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::1]", "[ipv6:2001:db8::1]"),
    ],
)
def test_keys(spelling: str, key: str) -> None:
    assert domain_key(spelling) == key


_U_LABEL = st.text(
    alphabet=st.sampled_from("abcxyz019-äöüßçéñжзиλμ中文"), min_size=1, max_size=20
).filter(lambda s: not s.isascii() and s[0] != "-" and s[-1] != "-")


@given(st.lists(_U_LABEL, min_size=1, max_size=3))
def test_a_labels_and_u_labels_share_the_key(labels: list[str]) -> None:
    u_form = ".".join(labels) + ".example"
    a_form = ".".join("xn--" + label.encode("punycode").decode("ascii") for label in labels)
    assert domain_key(a_form + ".example") == domain_key(u_form) == u_form
    assert domain_key(a_form.upper() + ".EXAMPLE") == u_form
    assert ascii_domain(u_form) == a_form + ".example"


@pytest.mark.parametrize(
    ("domain", "ascii_form"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("straße.example", "xn--strae-oqa.example"),
        ("mail.xn--bcher-kva.example", "mail.xn--bcher-kva.example"),
        ("Example.ORG", "Example.ORG"),  # ASCII: left as it is
    ],
)
def test_ascii_domain(domain: str, ascii_form: str) -> None:
    assert ascii_domain(domain) == ascii_form
    assert domain_key(ascii_domain(domain)) == domain_key(domain)
