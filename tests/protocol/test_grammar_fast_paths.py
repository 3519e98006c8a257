"""The grammar's fast paths accept a subset of what the full grammar accepts, and give
the same result for it; the envelope's copy is copy.copy's."""

from __future__ import annotations

import copy
import dataclasses

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.grammar import (
    GrammarError,
    _parse_full_path,
    _parse_simple_path,
    parse_path,
    split_path_and_params,
)

# Characters that matter to the path grammar, weighted towards the plain ones so that
# many drawn paths are valid; long runs test the length limits.
_CHARS = st.sampled_from(list("abcXYZ019-._+=!#$%&'*/?^`{|}~@<>[]\":\\ ,é\x00"))
_PLAIN = st.text(alphabet="ab9-.", min_size=1, max_size=70)


def _full(text: str, utf8: bool, allow_null: bool) -> Address | None:
    try:
        return _parse_full_path(text, utf8=utf8, allow_null=allow_null)
    except GrammarError:
        return None


@settings(max_examples=2000)
@given(
    text=st.one_of(
        st.builds(lambda local, domain: f"<{local}@{domain}>", _PLAIN, _PLAIN),
        st.builds(lambda body: f"<{body}>", st.text(alphabet=_CHARS, max_size=80)),
        st.text(alphabet=_CHARS, max_size=20),
    ),
    utf8=st.booleans(),
    allow_null=st.booleans(),
)
@example(text="<joe@example.org>", utf8=False, allow_null=False)
@example(text="<" + "a" * 64 + "@b.example>", utf8=False, allow_null=False)
@example(text="<" + "a" * 65 + "@b.example>", utf8=False, allow_null=False)
@example(text="<a@" + "b" * 63 + ".example>", utf8=False, allow_null=False)
@example(text="<a@" + "b" * 64 + ".example>", utf8=False, allow_null=False)
@example(text="<a@" + ".".join(["b" * 60] * 5) + ">", utf8=True, allow_null=False)
def test_simple_path_is_a_subset_of_the_full_grammar(
    text: str, utf8: bool, allow_null: bool
) -> None:
    simple = _parse_simple_path(text)
    full = _full(text, utf8, allow_null)
    if simple is not None:
        assert simple == full
    assert _full(text, utf8, allow_null) == (
        _call(parse_path, text, utf8=utf8, allow_null=allow_null)
    )


def test_simple_path_takes_the_common_form() -> None:
    assert _parse_simple_path("<bench@client.bench.internal>") == Address(
        "bench", "client.bench.internal"
    )
    assert _parse_simple_path('<"joe"@example.org>') is None  # left to the full grammar


def _call(fn: object, *args: object, **kwargs: object) -> object:
    try:
        return fn(*args, **kwargs)  # type: ignore[operator]
    except GrammarError:
        return None


def _split_by_scan(arg: str, prefix: str) -> tuple[str, list[str]] | None:
    """The quote-aware scan alone (what split_path_and_params does for every path
    with a quote), as the reference for its shortcut without one."""
    if arg[: len(prefix)].upper() != prefix:
        return None
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        return None
    in_quote = escaped = False
    for i, ch in enumerate(rest):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            params = rest[i + 1 :]
            if params and not params.startswith(" "):
                return None
            return rest[: i + 1], params.split()
    return None


@settings(max_examples=1000)
@given(arg=st.text(alphabet=st.sampled_from(list('FROM:fr <>"\\a@b. =SZIE1')), max_size=40))
@example(arg="FROM:<a@b> SIZE=1")
@example(arg='FROM:<"a>b"@c> SIZE=1')
@example(arg="FROM:<a@b>x")
def test_split_path_and_params_matches_the_scan(arg: str) -> None:
    assert _call(split_path_and_params, arg, "FROM:") == _split_by_scan(arg, "FROM:")


def test_envelope_copy_is_a_shallow_copy() -> None:
    env = Envelope(
        helo="h.example", extended=True, sender=Address("a", "b.example"), body="8BITMIME",
        smtputf8=True, declared_size=5, ret="FULL", envid="id", auth="<>",
        recipients=[Recipient(Address("c", "d.example"))], chunked=True,
    )  # fmt: skip
    # Every field differs from its default, so a field the copy forgot would show.
    for field in dataclasses.fields(Envelope):
        assert getattr(env, field.name) != getattr(Envelope(), field.name), field.name
    twin = env.copy()
    assert twin == copy.copy(env) and twin is not env
    assert twin.recipients is env.recipients
