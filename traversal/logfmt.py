"""One log line per event, as ``event=NAME key=value ...`` (logfmt).

Operators grep these lines; tests parse them. Values with spaces or quotes
are quoted so a line always splits back into the same fields.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def _value(value: Any) -> str:
    text = f"{value:.1f}" if isinstance(value, float) else str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


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
    for noisy in ("websockets", "aioice", "aioquic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
