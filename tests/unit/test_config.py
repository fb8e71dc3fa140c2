"""Tests for traversal/config.py: the TOML [connect] / [relay] tables and every way a file can be wrong."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.identity import IdentityError, encode_public, generate_identity, public_bytes
from traversal.config import (
    MAX_CONFIG_SIZE,
    ConfigError,
    MembersChange,
    diff_members,
    diff_networks,
    load_networks,
    load_section,
    parse_members_spec,
)

ALLOWED: dict[str, type | tuple[type, ...]] = {
    "relay_url": str,
    "network": str,
    "insecure": bool,
    "mtu": int,
    "direct_timeout": (int, float),
    "members": list,
}


def write(tmp_path: Path, content: str | bytes, name: str = "traversal.toml") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def load(path: Path, section: str = "connect") -> dict[str, Any]:
    return load_section(path, section, ALLOWED)


def test_good_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        # both tables in one file
        [connect]
        relay_url = "wss://relay.example:8443"
        network = "chr-001"
        insecure = false
        mtu = 1400
        direct_timeout = 2.5
        members = ["chr-001:/etc/traversal/members", "chr-002:/x"]

        [relay]
        mtu = 1280
        direct_timeout = 5
        """,
    )
    assert load(path) == {
        "relay_url": "wss://relay.example:8443",
        "network": "chr-001",
        "insecure": False,
        "mtu": 1400,
        "direct_timeout": 2.5,
        "members": ["chr-001:/etc/traversal/members", "chr-002:/x"],
    }
    assert load(path, "relay") == {"mtu": 1280, "direct_timeout": 5}


def test_absent_table_and_empty_file_give_no_values(tmp_path: Path) -> None:
    assert load(write(tmp_path, "[relay]\nmtu = 1280\n")) == {}
    assert load(write(tmp_path, "")) == {}


def test_unknown_key_is_named_and_known_keys_listed(tmp_path: Path) -> None:
    path = write(tmp_path, '[connect]\nrealy_url = "wss://x:1"\n')
    with pytest.raises(ConfigError) as error:
        load(path)
    message = str(error.value)
    assert "unknown key 'realy_url' in [connect]" in message
    assert "known keys: direct_timeout, insecure, members, mtu, network, relay_url" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('mtu = "1400"', "mtu must be a int, got str"),
        ("mtu = 1400.0", "mtu must be a int, got float"),
        ("mtu = true", "mtu must be a int, got bool"),  # TOML booleans are not numbers here
        ('direct_timeout = "5"', "direct_timeout must be a int or float, got str"),
        ("insecure = 1", "insecure must be a bool, got int"),
        ("network = 7", "network must be a str, got int"),
        ('members = "chr-001:/x"', "members must be a list, got str"),
        ("members = [1, 2]", "members must be a list of strings"),
        ("network = { name = 'x' }", "network must be a str, got dict"),
        ("network = 1979-05-27", "network must be a str, got date"),
    ],
)
def test_wrong_type_names_the_key_and_the_types(tmp_path: Path, line: str, words: str) -> None:
    with pytest.raises(ConfigError, match=f"\\[connect\\] {words}"):
        load(write(tmp_path, f"[connect]\n{line}\n"))


def test_boolean_is_not_a_number_for_int_or_float_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[connect\] direct_timeout must be a int or float, got bool"):
        load(write(tmp_path, "[connect]\ndirect_timeout = true\n"))


def test_unknown_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown table \[conect\]; expected \[connect\] and/or \[relay\]"):
        load(write(tmp_path, "[conect]\nmtu = 1\n"))
    with pytest.raises(ConfigError, match=r"unknown table \[mtu\]"):
        load(write(tmp_path, "mtu = 1400\n"))  # a key outside any table


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[connect\] must be a table"):
        load(write(tmp_path, "connect = 1\n"))


def test_non_utf8_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load(write(tmp_path, b'[connect]\nnetwork = "caf\xe9"\n'))


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML") as error:
        load(write(tmp_path, "[connect]\nnetwork = \n"))
    assert "line 2" in str(error.value)  # tomllib's position helps the user find it


def test_oversize_file_is_refused_before_parsing(tmp_path: Path) -> None:
    at_limit = "[connect]\n" + "#" * (MAX_CONFIG_SIZE - len("[connect]\n") - 1) + "\n"
    assert load(write(tmp_path, at_limit)) == {}
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_SIZE} bytes"):
        load(write(tmp_path, at_limit + "\n"))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.toml: No such file or directory"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path)


def test_deeply_nested_value_is_a_config_error(tmp_path: Path) -> None:
    depth = 1000
    with pytest.raises(ConfigError):
        load(write(tmp_path, "[connect]\nmembers = " + "[" * depth + "]" * depth + "\n"))


# --- only ever ConfigError ------------------------------------------------------------

_scalars = st.one_of(
    st.sampled_from(['"text"', "'lit'", "1", "-0", "1.5", "inf", "true", "1979-05-27T07:32:00Z", "0x1f"]),
    st.text(max_size=12).map(lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'),
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3).map(lambda v: "[" + ", ".join(v) + "]"), max_leaves=6
)
_documents = st.lists(
    st.tuples(st.sampled_from(["[connect]", "[relay]", "[other]", ""]), st.sampled_from([*ALLOWED, "bogus"]), _values),
    max_size=5,
).map(lambda lines: "\n".join(f"{table}\n{key} = {value}" for table, key, value in lines).encode())


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=512), st.text(max_size=256).map(str.encode), _documents))
def test_any_file_content_is_a_dict_or_a_config_error(data: bytes) -> None:
    """Never a traceback from a user's file, whatever its bytes."""
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), data)
        for section in ("connect", "relay"):
            try:
                values = load(path, section)
            except ConfigError as exc:
                assert str(path) in str(exc)
            else:
                assert set(values) <= set(ALLOWED)


# --- members files (relay --members NETWORK:FILE, connect --members FILE; re-read on SIGHUP) ----


def _keys(n: int) -> list[bytes]:
    return [public_bytes(generate_identity()) for _ in range(n)]


def test_members_spec_is_network_and_file() -> None:
    assert parse_members_spec("chr-001:/etc/traversal/chr-001.members") == (
        "chr-001",
        Path("/etc/traversal/chr-001.members"),
    )
    for bad in ("chr-001", ":file", "chr-001:", ""):
        with pytest.raises(ConfigError, match="--members must be NETWORK:FILE"):
            parse_members_spec(bad)


def test_load_networks_reads_every_file_or_names_the_bad_one(tmp_path: Path) -> None:
    a, b = _keys(2)
    write(tmp_path, f"{encode_public(a)}  # a\n", "one.members")
    write(tmp_path, f"# b\n{encode_public(b)}\n", "two.members")
    files = {"one": tmp_path / "one.members", "two": tmp_path / "two.members"}
    assert load_networks(files) == {"one": frozenset({a}), "two": frozenset({b})}
    write(tmp_path, f"{encode_public(b)}\nnot-a-key\n", "two.members")
    with pytest.raises(IdentityError, match=r"two\.members line 2: not a base64 public key"):
        load_networks(files)
    write(tmp_path, f"{encode_public(b)}\n", "two.members")
    with pytest.raises(IdentityError, match=r"missing\.members does not exist"):
        load_networks({**files, "three": tmp_path / "missing.members"})


def test_diff_members_says_who_came_and_who_went() -> None:
    a, b, c = _keys(3)
    change = diff_members(frozenset({a, b}), frozenset({b, c}))
    assert change == MembersChange(added=frozenset({c}), removed=frozenset({a}), total=2)
    assert change.changed and change.summary() == "+1 -1 (2 members)"
    same = diff_members(frozenset({a}), frozenset({a}))
    assert not same.changed and same.summary() == "+0 -0 (1 member)"


def test_diff_networks_per_network_in_name_order() -> None:
    a, b = _keys(2)
    changes = diff_networks({"z": frozenset({a}), "y": frozenset({a})}, {"z": frozenset({a, b}), "y": frozenset()})
    assert list(changes) == ["y", "z"]
    assert changes["y"].removed == {a} and changes["y"].total == 0
    assert changes["z"].added == {b} and not changes["z"].removed
    # A network the old map did not have: everyone is new.
    assert diff_networks({}, {"x": frozenset({a})})["x"].added == {a}
