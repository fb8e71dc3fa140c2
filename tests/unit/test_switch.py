"""The learning switch (traversal/switch.py): learning, flooding, ageing, moves and its bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traversal.node import members_to_reach
from traversal.switch import REFRESH_S, LearningSwitch

BROADCAST = b"\xff" * 6
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
IPV6_ND = bytes.fromhex("3333ff000001")  # a solicited-node multicast destination


def frame(dst: bytes, src: bytes, payload: bytes = b"\x08\x06" + bytes(28)) -> bytes:
    return dst + src + payload


def test_unknown_and_group_destinations_flood_known_ones_go_to_their_owner() -> None:
    switch: LearningSwitch[str] = LearningSwitch()
    assert switch.port_for(frame(MAC_A, MAC_B), 0.0) is None  # unknown: flood
    switch.learn(frame(BROADCAST, MAC_A), "peer-a", 0.0)  # an ARP request from behind peer-a
    assert switch.port_for(frame(MAC_A, MAC_B), 1.0) == "peer-a"
    assert switch.port_for(frame(BROADCAST, MAC_B), 1.0) is None
    assert switch.port_for(frame(IPV6_ND, MAC_B), 1.0) is None
    assert switch.counters.learned == 1


def test_group_source_addresses_and_runts_are_never_learnt() -> None:
    switch: LearningSwitch[str] = LearningSwitch()
    switch.learn(frame(MAC_A, BROADCAST), "peer-a", 0.0)
    switch.learn(frame(MAC_A, IPV6_ND), "peer-a", 0.0)
    switch.learn(MAC_A + MAC_B, "peer-a", 0.0)  # 12 bytes: no EtherType, not a frame
    assert len(switch) == 0
    assert switch.port_for(frame(BROADCAST, MAC_B), 0.0) is None


def test_an_address_that_moves_follows_its_new_peer() -> None:
    switch: LearningSwitch[str] = LearningSwitch()
    switch.learn(frame(BROADCAST, MAC_A), "peer-a", 0.0)
    switch.learn(frame(BROADCAST, MAC_A), "peer-b", 0.5)  # within REFRESH_S, but another port
    assert switch.port_for(frame(MAC_A, MAC_B), 0.6) == "peer-b"
    assert switch.counters.moved == 1


def test_entries_age_out_unless_refreshed() -> None:
    switch: LearningSwitch[str] = LearningSwitch(ageing=10.0)
    switch.learn(frame(BROADCAST, MAC_A), "peer-a", 0.0)
    switch.learn(frame(BROADCAST, MAC_B), "peer-b", 0.0)
    for t in range(1, 20):
        switch.learn(frame(BROADCAST, MAC_A), "peer-a", float(t))  # MAC_A keeps talking
    assert switch.port_for(frame(MAC_A, MAC_B), 19.5) == "peer-a"
    assert switch.port_for(frame(MAC_B, MAC_A), 19.5) is None  # silent for 19.5 s > 10 s: flooded again
    assert switch.counters.aged == 1


def test_expire_drops_only_the_stale_entries() -> None:
    switch: LearningSwitch[str] = LearningSwitch(ageing=10.0)
    switch.learn(frame(BROADCAST, MAC_A), "peer-a", 0.0)
    switch.learn(frame(BROADCAST, MAC_B), "peer-b", 8.0)
    assert switch.expire(15.0) == 1
    assert switch.port_for(frame(MAC_B, MAC_A), 15.0) == "peer-b"


def test_refresh_is_rate_limited_but_keeps_the_entry_alive() -> None:
    switch: LearningSwitch[str] = LearningSwitch(ageing=10.0)
    switch.learn(frame(BROADCAST, MAC_A), "peer-a", 0.0)
    switch.learn(frame(BROADCAST, MAC_A), "peer-a", REFRESH_S / 2)  # skipped: seen just now
    switch.learn(frame(BROADCAST, MAC_A), "peer-a", 9.0)
    assert switch.port_for(frame(MAC_A, MAC_B), 18.0) == "peer-a"


def test_forget_a_peer_that_left() -> None:
    switch: LearningSwitch[str] = LearningSwitch()
    switch.learn(frame(BROADCAST, MAC_A), "peer-a", 0.0)
    switch.learn(frame(BROADCAST, MAC_B), "peer-b", 0.0)
    assert switch.forget("peer-a") == 1
    assert switch.port_for(frame(MAC_A, MAC_B), 0.0) is None
    assert switch.addresses("peer-b", 0.0) == ["02:00:00:00:00:02"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LearningSwitch(ageing=0)
    with pytest.raises(ValueError):
        LearningSwitch(max_entries=0)


@settings(max_examples=200, deadline=None)
@given(sources=st.lists(st.binary(min_size=6, max_size=6), min_size=1, max_size=200), bound=st.integers(1, 16))
def test_a_peer_spraying_source_addresses_cannot_grow_the_table(sources: list[bytes], bound: int) -> None:
    switch: LearningSwitch[int] = LearningSwitch(max_entries=bound)
    for i, src in enumerate(sources):
        switch.learn(frame(BROADCAST, src), i % 3, float(i))
        assert len(switch) <= bound
    unicast = [s for s in sources if not s[0] & 1]
    if unicast:
        # The most recent unicast source is always remembered, at its latest port.
        last = max(i for i, s in enumerate(sources) if s == unicast[-1])
        assert switch.port_for(frame(unicast[-1], MAC_A), float(len(sources))) == last % 3


# --- whom a node must reach before it lets the relay go (traversal/node.py) ----------------------

ME, B, C, D = (bytes([i]) * 32 for i in range(4))


def test_members_to_reach_follows_the_relay_list_narrowed_by_the_allow_list() -> None:
    assert members_to_reach(None, None, ME) is None  # nothing known: keep the relay
    assert members_to_reach(None, frozenset({ME, B, C}), ME) == {B, C}
    assert members_to_reach({B, C, D}, None, ME) == {B, C, D}
    # D is on our allow-list but the relay does not admit it: it can never join, so we do not wait for it.
    assert members_to_reach({ME, B, D}, frozenset({ME, B, C}), ME) == {B}
