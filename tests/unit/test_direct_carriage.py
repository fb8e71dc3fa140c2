"""Tests for DirectCarriage (traversal/direct.py): the lean and the QUIC DATA carriages.

Two real IceAgents on 127.0.0.1 nominate a pair, a real QUIC connection (pinned
certificate) runs over it, and each side wraps both in a DirectCarriage. DATA
frames must arrive, in order, with either carriage on either side (each side
always receives both); control records always go on the QUIC stream. With the
lean carriage a DATA frame is one UDP datagram holding exactly the frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from transport.certs import make_session_certificate
from transport.constants import WIRE_VERSION
from transport.frames import MsgType, encode_session_frame
from transport.wsquic import WsQuicConnection
from traversal.direct import DirectCarriage
from traversal.ice import IceAgent

from .test_ice import connected_pair

pytestmark = pytest.mark.timeout(60)

SESSION_ID = bytes(range(16))


def data_frame(index: int, size: int = 1300) -> bytes:
    return encode_session_frame(MsgType.DATA, SESSION_ID, index.to_bytes(4, "big") * (size // 4))


def path_frame(index: int) -> bytes:
    return encode_session_frame(MsgType.PATH, SESSION_ID, bytes([index]) * 40)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def carriages(
    lean_a: bool, lean_b: bool
) -> tuple[DirectCarriage, DirectCarriage, list[bytes], list[bytes], IceAgent, IceAgent]:
    agent_a, agent_b, _, _ = await connected_pair()
    loop = asyncio.get_running_loop()
    certificate = make_session_certificate()
    quic_a = WsQuicConnection(is_client=True, expected_fingerprint=certificate.fingerprint, now=loop.time())
    quic_b = WsQuicConnection(is_client=False, certificate=certificate, now=loop.time())
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    connected: list[str] = []
    closed: list[str] = []
    carriage_a, carriage_b = (
        DirectCarriage(
            agent,
            quic,
            on_frame=got.append,
            on_connected=lambda name=name: connected.append(name),  # type: ignore[misc]
            on_closed=closed.append,
            lean=lean,
        )
        for name, agent, quic, got, lean in (
            ("a", agent_a, quic_a, got_a, lean_a),
            ("b", agent_b, quic_b, got_b, lean_b),
        )
    )
    carriage_b.start()
    carriage_a.start()
    await wait_for(lambda: sorted(connected) == ["a", "b"], "the QUIC handshake")
    assert not closed
    return carriage_a, carriage_b, got_a, got_b, agent_a, agent_b


@pytest.mark.parametrize(("lean_a", "lean_b"), [(True, True), (False, False), (True, False), (False, True)])
def test_data_and_control_arrive_in_order_with_either_carriage(lean_a: bool, lean_b: bool) -> None:
    async def main() -> None:
        carriage_a, carriage_b, got_a, got_b, _, _ = await carriages(lean_a, lean_b)
        try:
            sent_ab = [data_frame(i) for i in range(40)]
            sent_ba = [data_frame(1000 + i, size=200) for i in range(40)]
            # A burst as the TAP hands it over: data with a control record in the middle.
            assert carriage_a.send([*sent_ab[:20], path_frame(1), *sent_ab[20:]]) == 0
            assert carriage_b.send([*sent_ba, path_frame(2)]) == 0
            await wait_for(lambda: len(got_b) == 41 and len(got_a) == 41, "every frame")
            assert [f for f in got_b if f[1] == MsgType.DATA] == sent_ab
            assert [f for f in got_b if f[1] == MsgType.PATH] == [path_frame(1)]
            assert [f for f in got_a if f[1] == MsgType.DATA] == sent_ba
            assert [f for f in got_a if f[1] == MsgType.PATH] == [path_frame(2)]
        finally:
            await carriage_a.close("test over")
            await carriage_b.close("test over")

    asyncio.run(main())


@pytest.mark.parametrize("lean", [True, False])
def test_lean_data_is_the_frame_itself_on_the_wire(lean: bool) -> None:
    async def main() -> None:
        carriage_a, carriage_b, _, got_b, _, agent_b = await carriages(lean, True)
        raw: list[bytes] = []

        def spy(datagram: bytes) -> None:
            raw.append(datagram)
            carriage_b._on_udp(datagram)

        agent_b.set_receiver(spy)
        try:
            frames = [data_frame(i) for i in range(10)]
            carriage_a.send(frames)
            await wait_for(lambda: len(got_b) == 10, "the frames")
            lean_datagrams = [d for d in raw if d[0] == WIRE_VERSION]
            if lean:
                assert lean_datagrams == frames
            else:
                assert lean_datagrams == [], "QUIC packets never start with the wire version byte"
                assert all(d[0] & 0x40 for d in raw), "every datagram is QUIC (its fixed bit is set)"
        finally:
            await carriage_a.close("test over")
            await carriage_b.close("test over")

    asyncio.run(main())


# --- the node's gathering turn (traversal/direct.py _Turn) ------------------------------------------


def test_a_gathering_turn_is_given_back_once_at_once_or_after_its_delay() -> None:
    from traversal.direct import _Turn

    async def body() -> None:
        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()
        first = _Turn(lock, loop)
        await first.take()
        second = _Turn(lock, loop)
        waiting = asyncio.ensure_future(second.take())
        first.give_back_after(0.05)
        await asyncio.sleep(0)
        assert not waiting.done()  # the sequential attempt still holds the turn
        await asyncio.wait_for(waiting, 1.0)  # ... until its delay is over
        first.give_back()  # a second give-back (the attempt's end) releases nothing more
        assert lock.locked()
        second.give_back()
        second.give_back()
        assert not lock.locked()

    asyncio.run(body())
