"""One log line per event, as ``event=NAME key=value ...`` (logfmt).

Operators grep these lines; tests parse them. Values with spaces or quotes
are quoted so a line always splits back into the same fields.
"""

from __future__ import annotations

import logging
import sys
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
