"""Tests for traversal/udpio.py: batched reads and segmented (GSO) sends on real UDP sockets.

Everything runs on 127.0.0.1: an asyncio datagram endpoint (as aioice makes them)
whose socket a BatchedSocket takes over, and a plain socket on the other end.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from traversal.udpio import MAX_GSO_SEGMENTS, READ_BATCH, BatchedSocket

pytestmark = pytest.mark.timeout(30)


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))


async def endpoint() -> tuple[asyncio.DatagramTransport, Collect]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
    return transport, protocol


def plain_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sock.settimeout(2.0)
    return sock


def receive(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recvfrom(65535)[0] for _ in range(count)]


def test_segmented_send_arrives_as_the_same_datagrams_in_order() -> None:
    async def main() -> None:
        transport, _ = await endpoint()
        peer = plain_socket()
        batched = BatchedSocket(transport, lambda data, addr: None)
        try:
            # Runs of full-sized frames, a shorter one closing a run, a larger one
            # starting a new run, single frames, and more than one GSO send's worth.
            sizes = [1400] * 5 + [600] + [1400] * 3 + [1450] + [80, 80, 1400] + [1200] * (MAX_GSO_SEGMENTS + 7)
            datagrams = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
            assert batched.send_many(datagrams, peer.getsockname()) == 0
            assert receive(peer, len(datagrams)) == datagrams
            assert batched.sent == len(datagrams) and batched.dropped == 0
            assert batched.gso, "loopback supports UDP_SEGMENT on Linux 4.18+: the segmented path was used"
        finally:
            batched.close()
            transport.close()
            peer.close()

    asyncio.run(main())


def test_without_gso_every_datagram_is_sent_alone() -> None:
    async def main() -> None:
        transport, _ = await endpoint()
        peer = plain_socket()
        batched = BatchedSocket(transport, lambda data, addr: None)
        batched.gso = False
        try:
            datagrams = [b"x" * 1000] * 10 + [b"y" * 10]
            assert batched.send_many(datagrams, peer.getsockname()) == 0
            assert receive(peer, len(datagrams)) == datagrams
        finally:
            batched.close()
            transport.close()
            peer.close()

    asyncio.run(main())


def test_reads_in_batches_instead_of_the_transport() -> None:
    async def main() -> None:
        transport, protocol = await endpoint()
        peer = plain_socket()
        got: list[bytes] = []
        batched = BatchedSocket(transport, lambda data, addr: got.append(data))
        batched.start()
        address = transport.get_extra_info("sockname")
        try:
            count = 3 * READ_BATCH + 5
            for i in range(count):
                peer.sendto(i.to_bytes(2, "big"), address)
            for _ in range(200):
                if len(got) == count:
                    break
                await asyncio.sleep(0.01)
            assert got == [i.to_bytes(2, "big") for i in range(count)]
            assert protocol.got == [], "the transport no longer reads once the batched reader started"
            # The transport can still send (ICE consent checks go out through it).
            transport.sendto(b"consent", peer.getsockname())
            assert peer.recvfrom(100)[0] == b"consent"
        finally:
            batched.close()
            transport.close()
            peer.close()

    asyncio.run(main())


def test_close_releases_the_port() -> None:
    async def main() -> None:
        transport, _ = await endpoint()
        port = transport.get_extra_info("sockname")[1]
        batched = BatchedSocket(transport, lambda data, addr: None)
        batched.start()
        batched.close()
        batched.close()  # idempotent
        transport.close()
        await asyncio.sleep(0)
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            again.bind(("127.0.0.1", port))  # nobody holds the duplicated descriptor any more
        finally:
            again.close()

    asyncio.run(main())


def test_sending_after_close_is_a_counted_drop() -> None:
    async def main() -> None:
        transport, _ = await endpoint()
        batched = BatchedSocket(transport, lambda data, addr: None)
        batched.close()
        transport.close()
        assert batched.send_many([b"a" * 100, b"b" * 100], ("127.0.0.1", 9)) == 2
        assert batched.dropped == 2

    asyncio.run(main())
