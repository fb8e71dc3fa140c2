"""TOML configuration files for `traversal connect` and `traversal relay`.

One file may hold a ``[connect]`` and a ``[relay]`` table; their keys are the
command-line flag names with ``-`` written as ``_`` (``self_signed``,
``direct_timeout``...). Command-line flags win over the file. Unknown keys
and wrong types are errors that name the key, so typos never pass silently.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

#: Config files are small; refuse anything absurd before parsing it.
MAX_CONFIG_SIZE = 1024 * 1024


class ConfigError(Exception):
    """The config file is missing or wrong; the message names the file and the key."""


def load_section(path: Path, section: str, allowed: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Read ``[section]`` of ``path``, checking every key against ``allowed`` (name -> type)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_SIZE} bytes")
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests too deeply to be a configuration") from None
    unknown_tables = sorted(set(document) - {"connect", "relay"})
    if unknown_tables:
        raise ConfigError(f"{path}: unknown table [{unknown_tables[0]}]; expected [connect] and/or [relay]")
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{section}] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"{path}: unknown key '{key}' in [{section}]; known keys: {known}")
        expected = allowed[key]
        allowed_types = expected if isinstance(expected, tuple) else (expected,)
        # bool is an int subclass in Python, but `mtu = true` is a mistake, not 1.
        if not isinstance(value, allowed_types) or (isinstance(value, bool) and bool not in allowed_types):
            names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise ConfigError(f"{path}: [{section}] {key} must be a {names}, got {type(value).__name__}")
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{path}: [{section}] {key} must be a list of strings")
        values[key] = value
    return values
