"""RFC 5321 4.1.2 command grammar: paths, domains, address literals, ESMTP parameters.

Extensions: RFC 6531 (UTF-8 in addresses when SMTPUTF8 is in force), RFC 1870 SIZE,
RFC 6152 8BITMIME / RFC 3030 BINARYMIME, RFC 3461 DSN (RET, ENVID, NOTIFY, ORCPT with
xtext), RFC 4954 AUTH=.  Every parser here either returns a value or raises
:class:`GrammarError` naming the catalogue reply to send; nothing else escapes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailgate.protocol.envelope import Address


class GrammarError(ValueError):
    """A syntax error; ``reply`` names the catalogue entry, ``args`` fill it in."""

    def __init__(self, reply: str, **args: str) -> None:
        super().__init__(reply)
        self.reply = reply
        self.args_ = args


MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8 = "\u0080-\U0010ffff"
_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_ATOM_UTF8 = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*\Z")
# A domain label; HELO names are allowed "_" (common in Windows host names, policy
# judges them), address domains are not.
_LABEL_TEXT = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_LABEL = re.compile(_LABEL_TEXT + r"\Z")
_LABEL_HELO = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?\Z")
_LABEL_UTF8 = re.compile(
    rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]{{0,61}}[A-Za-z0-9{_UTF8}])?\Z"
)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*\Z")
# RFC 6533 3: utf-8-addr-unitext, QCHAR (printable ASCII but "+", "=" and "\"), an
# EmbeddedUnicodeChar "\x{HEXPOINT}", or UTF-8 (utf-8-addr-xtext has no raw UTF-8)
_UTF8_ADDR = re.compile(r"(?:[!-*,-<>-\[\]-~]|\\x\{[0-9A-F]{2,6}\}|[^\x00-\x7f])+\Z")
_HEXPOINT = re.compile(r"\\x\{([0-9A-F]{2,6})\}")
_GENERAL_TAG = re.compile(r"[A-Za-z0-9\-]*[A-Za-z0-9]:[!-Z^-~]+\Z")


def parse_domain(text: str, *, utf8: bool = False, helo: bool = False) -> str:
    """A domain name (no trailing dot) or raise GrammarError('syntax.args')."""
    if not text or len(text.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        raise GrammarError("syntax.args", detail="bad domain")
    if utf8 and not text.isprintable():  # no U-label holds C1 controls or U+2028/2029
        raise GrammarError("syntax.args", detail="bad domain")
    label_re = _LABEL_UTF8 if utf8 else (_LABEL_HELO if helo else _LABEL)
    for label in text.split("."):
        if not label_re.match(label):
            raise GrammarError("syntax.args", detail="bad domain")
    return text


def parse_address_literal(text: str) -> str:
    """``[IPv4]``, ``[IPv6:...]``, a general literal ``[tag:content]`` or the upas ``[]``."""
    inner = text[1:-1]
    if inner == "":
        return "[]"
    if inner[:5].lower() == "ipv6:":
        address = _ipv6(inner[5:])
        # RFC 5952 5: an IPv4-mapped address keeps its dotted quad (3.11 writes
        # ::ffff:7f00:1 for ::ffff:127.0.0.1)
        mapped = address.ipv4_mapped
        return f"[IPv6:::ffff:{mapped}]" if mapped else f"[IPv6:{address.compressed}]"
    if inner[:1].isdigit() and ":" not in inner:
        return f"[{_ipv4(inner)}]"
    if _GENERAL_TAG.match(inner):
        return text
    raise GrammarError("syntax.args", detail="bad address literal")


def _ipv4(text: str) -> ipaddress.IPv4Address:
    """RFC 5321 4.1.3 ``Snum 3("." Snum)``, Snum being 1*3DIGIT up to 255: leading
    zeros are allowed (and decimal), which Python's parser refuses."""
    nums = text.split(".")
    if len(nums) != 4 or not all(n.isascii() and n.isdigit() and len(n) <= 3 for n in nums):
        raise GrammarError("syntax.args", detail="bad IPv4 address literal")
    values = [int(n) for n in nums]
    if max(values) > 255:
        raise GrammarError("syntax.args", detail="bad IPv4 address literal")
    return ipaddress.IPv4Address(".".join(map(str, values)))


def _ipv6(text: str) -> ipaddress.IPv6Address:
    """RFC 5321 4.1.3 IPv6-addr: no zone index (Python takes "%eth0"), a "::" stands
    for at least two groups (so at most six more, four beside an IPv4 part), and an
    IPv4 part is Snums as in :func:`_ipv4`."""
    head, _, last = text.rpartition(":")
    v4 = "." in last
    if "%" in text or not head:
        raise GrammarError("syntax.args", detail="bad IPv6 address literal")
    if v4:
        text = f"{head}:{_ipv4(last)}"
    if "::" in text:
        groups = [g for g in text.replace("::", ":").split(":") if g]
        if len(groups) - v4 > (4 if v4 else 6):
            raise GrammarError("syntax.args", detail="bad IPv6 address literal")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise GrammarError("syntax.args", detail="bad IPv6 address literal") from None


def parse_helo_name(arg: str) -> str:
    """The EHLO/HELO argument: a domain or an address literal."""
    name = arg.strip()
    if not name or " " in name or name == "[]":  # ("[]" is upas's loopback, for RCPT)
        raise GrammarError("syntax.args", detail="HELO/EHLO needs one domain or address literal")
    if name.startswith("[") and name.endswith("]"):
        return parse_address_literal(name)
    return parse_domain(name.rstrip(".") if name.endswith(".") and len(name) > 1 else name,
                        utf8=not name.isascii(), helo=True)


def _split_quoted_local(path: str, utf8: bool) -> tuple[str, str]:
    """Split ``"quoted local"@domain`` into the unescaped local part and the rest;
    non-ASCII only with SMTPUTF8 (RFC 5321 qtextSMTP is ASCII, RFC 6531 3.3)."""
    i = 1
    out = []
    while i < len(path):
        ch = path[i]
        if ch == "\\":
            if i + 1 >= len(path):
                raise GrammarError("syntax.args", detail="bad quoted local part")
            nxt = path[i + 1]
            if not (" " <= nxt <= "~" or (utf8 and ord(nxt) > 127)):
                raise GrammarError("syntax.args", detail="bad quoted local part")
            out.append(nxt)
            i += 2
            continue
        if ch == '"':
            return "".join(out), path[i + 1 :]
        if not (" " <= ch <= "~" or (utf8 and ord(ch) > 127)):
            raise GrammarError("syntax.args", detail="bad quoted local part")
        out.append(ch)
        i += 1
    raise GrammarError("syntax.args", detail="unterminated quoted local part")


def is_local_part(text: str, *, utf8: bool) -> bool:
    """A dot-string local part (no quoting), within the RFC 5321 length limit."""
    atom = _ATOM_UTF8 if utf8 else _ATOM_ASCII
    return bool(atom.match(text)) and len(text.encode("utf-8", "surrogatepass")) <= MAX_LOCAL_PART


def parse_mailbox(text: str, *, utf8: bool) -> Address:
    """``Local-part "@" (Domain / address-literal)`` per RFC 5321 4.1.2."""
    if text.startswith('"'):
        local, rest = _split_quoted_local(text, utf8)
        quoted = True
        if not rest.startswith("@"):
            raise GrammarError("syntax.args", detail="missing @domain")
        domain = rest[1:]
    else:
        local, sep, domain = text.rpartition("@")
        if not sep:
            raise GrammarError("syntax.args", detail="missing @domain")
        quoted = False
        atom = _ATOM_UTF8 if utf8 else _ATOM_ASCII
        if not atom.match(local):
            raise GrammarError("syntax.args", detail="bad local part")
    # ("" is a valid quoted local part, RFC 5321 4.1.2: no mailbox will be called so)
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART:
        raise GrammarError("syntax.args", detail="bad local part")
    if domain.startswith("[") and domain.endswith("]"):
        domain = parse_address_literal(domain)
    else:
        domain = parse_domain(domain, utf8=utf8)
    if quoted and _ATOM_UTF8.match(local) and (utf8 or local.isascii()):
        quoted = False  # "joe"@x is joe@x: keep one canonical form
    return Address(local, domain, quoted)


def parse_path(text: str, *, utf8: bool, allow_null: bool) -> Address:
    """``<[A-d-l:]Mailbox>``; a source route is accepted and dropped (Appendix C)."""
    simple = _parse_simple_path(text)
    if simple is not None:
        return simple
    return _parse_full_path(text, utf8=utf8, allow_null=allow_null)


# Almost every path is <dot-atom@host.name> in ASCII.  For those, one regex does what
# the full grammar would (same atoms, same labels, same limits); anything else, even
# a valid path, is left to the full grammar.
_SIMPLE_PATH = re.compile(
    rf"<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@({_LABEL_TEXT}(?:\.{_LABEL_TEXT})*)>\Z"
)


def _parse_simple_path(text: str) -> Address | None:
    """The address of a plain ``<local@domain>`` path, or None for the full grammar."""
    if len(text) > MAX_PATH:
        return None
    match = _SIMPLE_PATH.match(text)
    if match is None:
        return None
    local, domain = match.groups()
    if len(local) > MAX_LOCAL_PART:
        return None
    return Address(local, domain)


def _parse_full_path(text: str, *, utf8: bool, allow_null: bool) -> Address:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise GrammarError("syntax.args", detail="path too long")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise GrammarError("syntax.args", detail="path must be in angle brackets")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return Address("", "")
        raise GrammarError("syntax.args", detail="null path not allowed here")
    if inner.startswith("@"):
        route, colon, mailbox = inner.partition(":")
        if not colon:
            raise GrammarError("syntax.args", detail="bad source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise GrammarError("syntax.args", detail="bad source route")
            hop_domain = hop[1:]
            if hop_domain.startswith("["):
                parse_address_literal(hop_domain)
            else:
                parse_domain(hop_domain, utf8=utf8)
        inner = mailbox
    return parse_mailbox(inner, utf8=utf8)


def split_path_and_params(arg: str, prefix: str) -> tuple[str, list[str]]:
    """``FROM:<path> p1 p2`` -> (``<path>``, [p1, p2]).  Spaces after the colon are
    tolerated (many clients send them), spaces inside a quoted local part are kept."""
    if arg[: len(prefix)].upper() != prefix:
        raise GrammarError("syntax.args", detail=f"expected {prefix}<path>")
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        # RFC 5321 special case: a bare address is a syntax error, but be explicit.
        raise GrammarError("syntax.args", detail="path must be in angle brackets")
    if '"' not in rest:
        # No quoted local part, so nothing to skip: the path ends at the first ">".
        end = rest.find(">")
        if end < 0:
            raise GrammarError("syntax.args", detail="path must be in angle brackets")
        return _path_and_params(rest, end + 1)
    in_quote = False
    escaped = False
    for i, ch in enumerate(rest):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return _path_and_params(rest, i + 1)
    raise GrammarError("syntax.args", detail="path must be in angle brackets")


def _path_and_params(rest: str, end: int) -> tuple[str, list[str]]:
    """Split ``rest`` after the path's closing ">" at ``end``."""
    params = rest[end:]
    if params and not params.startswith(" "):
        raise GrammarError("syntax.args", detail="junk after path")
    return rest[:end], params.split()


@dataclass(frozen=True, slots=True)
class Param:
    keyword: str  # upper case
    value: str | None


def parse_params(items: list[str]) -> list[Param]:
    """``keyword[=value]`` items; duplicates are an error (RFC 5321 4.1.2)."""
    if not items:  # the usual MAIL or RCPT
        return []
    seen: set[str] = set()
    out = []
    for item in items:
        keyword, eq, value = item.partition("=")
        if not _KEYWORD.match(keyword):
            raise GrammarError("syntax.args", detail="bad parameter")
        kw = keyword.upper()
        if kw in seen:
            raise GrammarError("syntax.param_twice", param=kw)
        seen.add(kw)
        if eq:
            if not value or any(c in value for c in "= ") or not value.isprintable():
                raise GrammarError("syntax.param_value", param=kw)
            out.append(Param(kw, value))
        else:
            out.append(Param(kw, None))
    return out


def decode_xtext(value: str, keyword: str) -> str:
    """RFC 3461 4: ``+XX`` hex escapes; anything else outside ``!``..``~`` is an error,
    and so is a decoded value that is not printable US-ASCII (RFC 3461 4.2, 4.4: the
    values of ENVID and ORCPT are, before encoding)."""
    if not _XTEXT.match(value):
        raise GrammarError("syntax.param_value", param=keyword)
    if "+" not in value:
        return value
    decoded = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
    if not all(" " <= ch <= "~" for ch in decoded):
        raise GrammarError("syntax.param_value", param=keyword)
    return decoded


_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}


def parse_notify(value: str) -> tuple[str, ...]:
    items = tuple(v.upper() for v in value.split(","))
    if items == ("NEVER",):
        return items
    if not items or any(v not in _NOTIFY for v in items) or len(set(items)) != len(items):
        raise GrammarError("syntax.param_value", param="NOTIFY")
    return items


def parse_orcpt(value: str, utf8: bool) -> str:
    addr_type, semi, rest = value.partition(";")
    if not semi or not _KEYWORD.match(addr_type) or not rest:
        raise GrammarError("syntax.param_value", param="ORCPT")
    if addr_type.lower() == "utf-8":
        # RFC 6533 3: utf-8-addr-xtext (ASCII, \x{HEX} escapes), or with SMTPUTF8
        # utf-8-addr-unitext (raw UTF-8 too).
        if not (_UTF8_ADDR.match(rest) and rest.isprintable()) or not (utf8 or rest.isascii()):
            raise GrammarError("syntax.param_value", param="ORCPT")
        # HEXPOINT names a Unicode scalar value: no surrogate, nothing past U+10FFFF
        for point in _HEXPOINT.findall(rest):
            value = int(point, 16)
            if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise GrammarError("syntax.param_value", param="ORCPT")
        return f"{addr_type};{rest}"
    return f"{addr_type};{decode_xtext(rest, 'ORCPT')}"
