"""Tests for traversal/logfmt.py: one ``event=NAME key=value`` line per event that splits back into its fields."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from traversal.logfmt import LOG_MAX_KEYS, LogLimiter, format_event, log_event


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


# --- LogLimiter: per-frame events, a few per key and interval -----------------------------


def _limited(caplog: pytest.LogCaptureFixture, **kwargs: Any) -> tuple[LogLimiter, Callable[[], list[str]]]:
    logger = logging.getLogger("traversal.test_logfmt.limited")
    caplog.set_level(logging.INFO, logger=logger.name)

    def lines() -> list[str]:
        out = [r.getMessage() for r in caplog.records if r.name == logger.name]
        caplog.clear()
        return out

    return LogLimiter(logger, **kwargs), lines


def test_limiter_logs_a_burst_then_one_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    limiter, lines = _limited(caplog, burst=3, interval=60.0)
    logged = [limiter.event(10.0 + i * 0.001, "direct_frame_dropped", peer="abc", reason="junk") for i in range(1000)]
    assert logged == [True] * 3 + [False] * 997
    assert lines() == ["event=direct_frame_dropped peer=abc reason=junk"] * 3
    assert limiter.next_deadline() == 70.0
    limiter.flush(69.99)
    assert lines() == []  # the interval has not ended
    limiter.flush(70.0)
    assert lines() == ["event=direct_frame_dropped_suppressed peer=abc suppressed=997 interval_s=60"]
    assert limiter.next_deadline() is None
    # A new interval starts with a full budget.
    assert limiter.event(71.0, "direct_frame_dropped", peer="abc", reason="junk")
    assert lines() == ["event=direct_frame_dropped peer=abc reason=junk"]


def test_limiter_keys_by_event_and_peer(caplog: pytest.LogCaptureFixture) -> None:
    limiter, lines = _limited(caplog, burst=1, interval=60.0)
    for peer in ("abc", "def"):
        for _ in range(5):
            limiter.event(0.0, "direct_frame_dropped", peer=peer, reason="junk")
    for _ in range(5):
        limiter.event(0.0, "relay_frame_dropped", reason="junk")  # no peer field: one key of its own
    assert lines() == [
        "event=direct_frame_dropped peer=abc reason=junk",
        "event=direct_frame_dropped peer=def reason=junk",
        "event=relay_frame_dropped reason=junk",
    ]
    limiter.flush(60.0)
    assert sorted(lines()) == [
        "event=direct_frame_dropped_suppressed peer=abc suppressed=4 interval_s=60",
        "event=direct_frame_dropped_suppressed peer=def suppressed=4 interval_s=60",
        "event=relay_frame_dropped_suppressed suppressed=4 interval_s=60",
    ]


def test_limiter_summarises_an_ended_interval_when_the_next_event_comes(caplog: pytest.LogCaptureFixture) -> None:
    """Without a flush (a driver that never ran its timer), the summary still comes, just later."""
    limiter, lines = _limited(caplog, burst=1, interval=10.0)
    for now in (0.0, 1.0, 2.0):
        limiter.event(now, "e", logging.WARNING, peer="p")
    assert lines() == ["event=e peer=p"]
    assert limiter.event(15.0, "e", logging.WARNING, peer="p")
    assert lines() == ["event=e_suppressed peer=p suppressed=2 interval_s=10", "event=e peer=p"]


def test_limiter_quiet_intervals_need_no_timer_and_are_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    limiter, lines = _limited(caplog, burst=5, interval=10.0)
    limiter.event(0.0, "e", peer="p")
    assert limiter.next_deadline() is None  # nothing suppressed: nothing to summarise
    limiter.flush(10.0)
    assert lines() == ["event=e peer=p"]
    assert limiter._windows == {}


def test_limiter_keeps_the_level_of_the_event(caplog: pytest.LogCaptureFixture) -> None:
    limiter, _ = _limited(caplog, burst=1, interval=1.0)
    limiter.event(0.0, "e", logging.ERROR, peer="p")
    limiter.event(0.0, "e", logging.ERROR, peer="p")
    limiter.flush(1.0)
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR]


def test_limiter_bounds_the_keys_it_tracks(caplog: pytest.LogCaptureFixture) -> None:
    limiter, lines = _limited(caplog, burst=1, interval=1.0)
    for i in range(3 * LOG_MAX_KEYS):
        limiter.event(float(i), "e", peer=f"p{i}")  # each key's interval ends before the next starts
    assert len(limiter._windows) <= LOG_MAX_KEYS
    assert len(lines()) == 3 * LOG_MAX_KEYS


@pytest.mark.parametrize(("burst", "interval"), [(0, 60.0), (1, 0.0), (1, -1.0)])
def test_limiter_refuses_impossible_limits(burst: int, interval: float) -> None:
    with pytest.raises(ValueError, match="burst"):
        LogLimiter(logging.getLogger("x"), burst=burst, interval=interval)
