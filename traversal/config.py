"""TOML configuration files for `traversal connect` and `traversal relay`, and their members files.

One file may hold a ``[connect]`` and a ``[relay]`` table; their keys are the
command-line flag names with ``-`` written as ``_`` (``self_signed``,
``direct_timeout``...). Command-line flags win over the file. Unknown keys
and wrong types are errors that name the key, so typos never pass silently.

Members files (``relay --members NETWORK:FILE``, ``connect --members FILE``)
are read at start-up and again on SIGHUP; :func:`diff_members` says what a
re-read changed, so the relay and the node log and act on exactly that.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transport.identity import load_members

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


# --- members files ---------------------------------------------------------------


def parse_members_spec(item: str) -> tuple[str, Path]:
    """One ``relay --members NETWORK:FILE`` value as (network, file)."""
    name, sep, file = item.partition(":")
    if not sep or not name or not file:
        raise ConfigError(f"--members must be NETWORK:FILE, got {item!r}")
    return name, Path(file)


def load_networks(files: Mapping[str, Path]) -> dict[str, frozenset[bytes]]:
    """Read every network's members file; raises :class:`~transport.identity.IdentityError`
    naming the file (and line) that is missing or malformed, so one bad file changes nothing."""
    return {name: load_members(path) for name, path in files.items()}


@dataclass(frozen=True, slots=True)
class MembersChange:
    """What re-reading one members file changed."""

    added: frozenset[bytes]
    removed: frozenset[bytes]
    total: int

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    def summary(self) -> str:
        """``+1 -0 (3 members)``: the counts an operator checks after a reload."""
        return f"+{len(self.added)} -{len(self.removed)} ({self.total} member{'' if self.total == 1 else 's'})"


def diff_members(old: frozenset[bytes], new: frozenset[bytes]) -> MembersChange:
    return MembersChange(added=new - old, removed=old - new, total=len(new))


def diff_networks(old: Mapping[str, frozenset[bytes]], new: Mapping[str, frozenset[bytes]]) -> dict[str, MembersChange]:
    """Per network of ``new``, what changed since ``old`` (a network new to ``old`` is all added)."""
    return {name: diff_members(old.get(name, frozenset()), members) for name, members in sorted(new.items())}
