"""One domain, two spellings: the key under which they compare equal.

An internationalized domain reaches a server as U-labels (``bücher.example``, in
SMTPUTF8 mail, RFC 6531) or as A-labels (``xn--bcher-kva.example``, what a client
without SMTPUTF8 must send, RFC 5890 2.3.2.1), and either may be configured.  Both
name the same domain, so every comparison of a recipient's or sender's domain with a
configured one goes through :func:`domain_key`.

The key decodes A-labels with Punycode (RFC 3492) and puts U-labels in NFC, in lower
case; it maps nothing else.  IDNA2003's nameprep (Python's ``idna`` codec) would also
turn ``ß`` into ``ss`` and so make ``straße.example`` and ``strasse.example``, two
domains under IDNA2008, one.
"""

from __future__ import annotations

import unicodedata

ACE_PREFIX = "xn--"


def domain_key(domain: str) -> str:
    """``domain`` in the form its other spellings share (address literals unchanged
    but for case)."""
    key = domain.lower()
    if key.isascii():
        if ACE_PREFIX not in key:  # the usual case: nothing to decode
            return key
    else:
        key = unicodedata.normalize("NFC", key)
    return ".".join(_u_label(label) for label in key.split("."))


def _u_label(label: str) -> str:
    """The U-label an A-label encodes; anything else (a label that is no valid
    A-label included) as it is."""
    if not label.startswith(ACE_PREFIX):
        return label
    try:
        decoded = label[len(ACE_PREFIX):].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):
        return label
    # An A-label encodes at least one non-ASCII character (RFC 5890 2.3.2.1), and
    # only letters, digits and the like: a control character is no U-label.
    if decoded.isascii() or not decoded.isprintable():
        return label
    return unicodedata.normalize("NFC", decoded.lower())


def ascii_domain(domain: str) -> str:
    """``domain`` with each U-label as its A-label: the spelling of the same domain
    for a peer without SMTPUTF8 (RFC 5890 2.3.2.1, RFC 6531 3.2).  Punycode of the
    label in NFC and lower case, as :func:`domain_key` compares it; ASCII labels
    unchanged."""
    if domain.isascii():
        return domain
    return ".".join(
        label if label.isascii()
        else ACE_PREFIX + unicodedata.normalize("NFC", label.lower()).encode("punycode").decode()
        for label in domain.split(".")
    )
