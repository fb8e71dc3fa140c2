"""One log line per event, as ``event=NAME key=value ...`` (logfmt).

Operators grep these lines; tests parse them. Values with spaces or quotes
are quoted so a line always splits back into the same fields. Events that
can happen once per received frame go through a :class:`LogLimiter`, so a
flood of bad frames is counted in full but logged only a few times a minute.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _value(value: Any) -> str:
    """A field value as logfmt: bare when safe, else double-quoted with escapes.

    Values can come from the network (a peer's BYE reason), so control and other
    non-printable characters never reach the line: they are written as escapes.
    """
    text = f"{value:.1f}" if isinstance(value, float) else str(value)
    if text and text.isprintable() and not any(c in text for c in " \"='\\"):
        return text
    return '"' + "".join(_escape(c) for c in text) + '"'


def format_event(name: str, fields: dict[str, Any]) -> str:
    parts = [f"event={name}"]
    parts.extend(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def log_event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_event(name, fields))


#: A per-frame event (a dropped frame) is logged at most this many times per key and interval ...
LOG_BURST = 5
#: ... seconds; the rest are counted and reported by one summary line per interval.
LOG_INTERVAL = 60.0
#: Keys tracked at once: beyond this, ended intervals are summarised and forgotten early.
LOG_MAX_KEYS = 1024


@dataclass(slots=True)
class _Window:
    started: float
    level: int
    fields: dict[str, Any]  # the key fields, repeated on the summary line
    logged: int = 0
    suppressed: int = 0


class LogLimiter:
    """Caps how often one event is logged per key (e.g. per peer): a flood of bad frames must not
    flood the log, yet the operator must see that it happened and how much of it there was.

    In each ``interval`` seconds the first ``burst`` events of a key are logged as they come;
    the rest are only counted, and when the interval ends one line ``event=NAME_suppressed
    KEY... suppressed=K interval_s=S`` says how many were left out. The key is the event name
    plus the values of ``key_fields``. Sans-I/O like the protocol cores: time is an argument,
    and the driver calls :meth:`flush` at :meth:`next_deadline` so that a summary comes out
    even when the flood has stopped. The counts that matter live in ``traversal status``;
    this only keeps the log readable.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        key_fields: tuple[str, ...] = ("peer",),
        burst: int = LOG_BURST,
        interval: float = LOG_INTERVAL,
    ) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError("a log limit needs a burst of at least 1 and a positive interval")
        self._logger = logger
        self._key_fields = key_fields
        self._burst = burst
        self._interval = interval
        self._windows: dict[tuple[Any, ...], _Window] = {}

    def event(self, now: float, name: str, level: int = logging.WARNING, **fields: Any) -> bool:
        """Log ``name`` with ``fields`` if its key is within budget; returns whether it was logged."""
        key = (name, *(fields.get(f) for f in self._key_fields))
        window = self._windows.get(key)
        if window is not None and now >= window.started + self._interval:
            self._summarise(key, window)
            window = None
        if window is None:
            if len(self._windows) >= LOG_MAX_KEYS:
                self.flush(now)
            window = _Window(now, level, {f: fields.get(f) for f in self._key_fields})
            self._windows[key] = window
        if window.logged < self._burst:
            window.logged += 1
            log_event(self._logger, name, level, **fields)
            return True
        window.suppressed += 1
        return False

    def flush(self, now: float) -> None:
        """Summarise and forget every interval that has ended by ``now``."""
        for key, window in list(self._windows.items()):
            if now >= window.started + self._interval:
                self._summarise(key, window)

    def next_deadline(self) -> float | None:
        """When the next summary is due (the end of an interval with suppressed events), or None."""
        due = [w.started + self._interval for w in self._windows.values() if w.suppressed]
        return min(due) if due else None

    def _summarise(self, key: tuple[Any, ...], window: _Window) -> None:
        del self._windows[key]
        if window.suppressed:
            log_event(
                self._logger,
                f"{key[0]}_suppressed",
                window.level,
                **window.fields,
                suppressed=window.suppressed,
                interval_s=round(self._interval),
            )


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with a timestamp, level and component, line-buffered."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Library chatter (websockets per-frame debug, aioice) only when asked for.
    for noisy in ("websockets", "aioice", "aioquic", "quic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
