"""Tests for traversal/logfmt.py: one ``event=NAME key=value`` line per event that splits back into its fields."""

from __future__ import annotations

import logging
import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from traversal.logfmt import format_event, log_event


def parse(line: str) -> dict[str, str]:
    """How a test or an operator's script reads a line back: shell-style words, each KEY=VALUE."""
    fields: dict[str, str] = {}
    for word in shlex.split(line):
        key, sep, value = word.partition("=")
        assert sep, f"word without '=': {word!r} in {line!r}"
        assert key not in fields, f"field {key!r} twice in {line!r}"
        fields[key] = value
    return fields


def test_plain_values_are_not_quoted() -> None:
    assert format_event("established", {"peer": "abc", "mtu": 1400, "direct": True}) == (
        "event=established peer=abc mtu=1400 direct=True"
    )


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("no direct path yet", '"no direct path yet"'),
        ('say "hi"', '"say \\"hi\\""'),
        ('"', '"\\""'),
        ("a=b", '"a=b"'),
        ("k3y+/w==", '"k3y+/w=="'),  # base64 padding
        ("", '""'),
        ("two\nlines", '"two\\nlines"'),
        ("back\\slash and space", '"back\\\\slash and space"'),
    ],
)
def test_values_that_need_it_are_quoted(value: str, written: str) -> None:
    line = format_event("e", {"reason": value})
    assert line == f"event=e reason={written}"
    assert "\n" not in line  # one event, one line


@pytest.mark.parametrize(
    "value", ["no direct path yet", 'say "hi"', "a=b", "", "k3y+/w==", "back\\slash and space", " lead", "x ="]
)
def test_quoted_values_split_back_with_shlex(value: str) -> None:
    assert parse(format_event("e", {"reason": value, "peer": "abc"})) == {"event": "e", "reason": value, "peer": "abc"}


def test_newline_splits_back_as_an_escape() -> None:
    # The line stays one line; the newline comes back as the two characters backslash, n.
    assert parse(format_event("e", {"reason": "one\ntwo three"})) == {"event": "e", "reason": "one\\ntwo three"}


@pytest.mark.parametrize(
    "value",
    [pytest.param("bob's", id="single-quote"), pytest.param("C:\\temp", id="backslash")],
)
def test_unquoted_special_characters_split_back(value: str) -> None:
    assert parse(format_event("e", {"network": value, "peer": "abc"})) == {
        "event": "e",
        "network": value,
        "peer": "abc",
    }


@pytest.mark.parametrize(("value", "escaped"), [("a\tb", "a\\tb"), ("a\rb", "a\\rb"), ("\x1b[2J", "\\x1b[2J")])
def test_control_characters_split_back_as_escapes(value: str, escaped: str) -> None:
    assert parse(format_event("e", {"reason": value})) == {"event": "e", "reason": escaped}


def test_control_characters_never_reach_the_line() -> None:
    for value in ("spoof\r2024-01-01 ERROR x", "\x1b[2Jclear screen", "para\u2028graph"):
        line = format_event("peer_bye", {"reason": value})
        assert line.isprintable(), repr(line)
        assert len(line.splitlines()) == 1


def test_none_fields_are_omitted_and_order_kept() -> None:
    line = format_event("path", {"peer": "abc", "endpoint": None, "path": "relay", "rtt": None})
    assert line == "event=path peer=abc path=relay"


@pytest.mark.parametrize(
    ("value", "written"),
    [(15.0, "15.0"), (2.36, "2.4"), (2.34, "2.3"), (0.0, "0.0"), (-1.5, "-1.5"), (1e9, "1000000000.0")],
)
def test_floats_have_one_decimal(value: float, written: str) -> None:
    assert format_event("peer_dead", {"silent_for": value}) == f"event=peer_dead silent_for={written}"


_safe_text = st.text(
    alphabet=st.characters(
        codec="utf-8", categories=("L", "N", "P", "S"), include_characters=" ", exclude_characters="'\\"
    ).filter(str.isprintable),
    max_size=30,
)


@given(fields=st.dictionaries(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), _safe_text, max_size=5))
def test_printable_fields_round_trip_through_shlex(fields: dict[str, str]) -> None:
    """Any printable text splits back exactly (quotes and backslashes are covered above)."""
    fields.pop("event", None)
    assert parse(format_event("e", fields)) == {"event": "e", **fields}


def test_log_event_logs_one_line_at_its_level(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("traversal.test_logfmt")
    with caplog.at_level(logging.INFO, logger=logger.name):
        log_event(logger, "handshake_retry", logging.WARNING, peer="abc", reason="timed out")
        log_event(logger, "ignored", logging.DEBUG, peer="abc")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, 'event=handshake_retry peer=abc reason="timed out"')
    ]


def test_log_event_does_not_format_when_the_level_is_off() -> None:
    class Explosive:
        def __str__(self) -> str:
            raise AssertionError("formatted a disabled event")

    logger = logging.getLogger("traversal.test_logfmt.quiet")
    logger.setLevel(logging.WARNING)
    try:
        log_event(logger, "chatter", logging.DEBUG, value=Explosive())
    finally:
        logger.setLevel(logging.NOTSET)
