"""A misbehaving relay for the lab's trust tests (issue 7): the real relay, with hooks that
record, tamper, replay, swap, lie and inject.

The design's trust model says the relay is a matchmaker the peers do not trust with their
traffic: everything it forwards is sealed end to end, the handshake is bound to the
network, the relay session and both identities, and the direct path is validated by the
peers themselves. This program is the relay an attacker would run, so the lab can check
that claim with the real nodes, TAP devices and NATs::

    python netns-lab/hostile_relay.py --record FILE --lie-ip IP  [the `traversal relay` flags]

It serves exactly as ``traversal relay`` does (same flags, same STUN server, same /metrics),
but writes every frame it forwards or sends to FILE (``u32 length | frame``, a record per
frame), and misbehaves on request: ``GET /hostile?mode=MODE`` on its port switches the
behaviour and answers a JSON object of what it has done so far, per victim (the public key
of the client that received the frame). ``GET /hostile`` only reports. The modes:

``honest``      forward as the real relay does (the start-up mode);
``flip``        flip one bit in the last byte (the AEAD tag) of every forwarded session frame;
``replay``      forward every session frame twice, and at once resend every frame it has
                forwarded so far (old handshakes, candidates, DATA) to its first receiver;
``swap``        deliver each session frame on another session of its sender instead, re-labelled
                with that session's id (a client in sessions S1 and S2: S1's frames go to S2's
                other end and back);
``inject``      at once send each client forged session frames (every sealed type, random
                bodies, valid headers) and frames that do not decode; then forge a copy of every
                CANDIDATES and DATA frame it forwards;
``lie``         announce ``--lie-ip`` as the peer's public address in ESTABLISHED;
``lie-censor``  lie, and drop CANDIDATES, so the peers can only try the lie.

Counters per victim: ``forwarded``, ``flipped``, ``duplicated``, ``replayed``, ``swapped``,
``forged`` (forged session frames), ``garbage`` (frames that do not decode), ``censored`` and
``lied`` (ESTABLISHED frames rewritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from collections import Counter, defaultdict
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

import relay_server.server as relay_module
from transport.frames import (
    SEALED_TYPES,
    SESSION_HEADER_SIZE,
    SESSION_ID_SIZE,
    WIRE_VERSION,
    Established,
    MsgType,
    PeerLeft,
    decode,
    encode,
    peek_session_id,
)
from transport.identity import encode_public

MODES = ("honest", "flip", "replay", "swap", "inject", "lie", "lie-censor")
#: Frames kept for ``replay``: enough for a set-up and a few seconds of pings, bounded.
REPLAY_MEMORY = 4096
#: Forged frames per sealed type and session, and undecodable ones per client, in one ``inject`` volley.
FORGED_PER_TYPE = 3
GARBAGE_FRAMES = 8


class HostileRelay(relay_module.RelayServer):
    """The real relay with a recorder and a switchable misbehaviour (see the module docstring)."""

    record_path: Path | None = None
    lie_ip: str = "203.0.113.2"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = "honest"
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._memory: list[tuple[relay_module._Client, bytes]] = []
        self._random = random.Random(7)
        self._recording: IO[bytes] | None = open(self.record_path, "ab") if self.record_path else None  # noqa: SIM115

    # --- recording ----------------------------------------------------------------------

    def _record(self, data: bytes) -> None:
        if self._recording is not None:
            self._recording.write(len(data).to_bytes(4, "big") + data)
            self._recording.flush()

    def _count(self, victim: relay_module._Client, what: str, n: int = 1) -> None:
        self.counts[encode_public(victim.identity)][what] += n

    async def _send(self, client: relay_module._Client, data: bytes) -> bool:
        if self.mode.startswith("lie") and len(data) > 1 and data[1] == MsgType.ESTABLISHED:
            established = decode(data)
            assert isinstance(established, Established)
            data = encode(dataclasses.replace(established, peer_public_ip=self.lie_ip))
            self._count(client, "lied")
        self._record(data)
        return await super()._send(client, data)

    # --- forwarding -------------------------------------------------------------------------

    async def _forward(self, sender: relay_module._Client, kind: MsgType, data: bytes) -> None:
        session = sender.sessions.get(peek_session_id(data, kind)) if len(data) >= SESSION_HEADER_SIZE else None
        if session is None:
            await super()._forward(sender, kind, data)  # the real relay's refusal, as is
            return
        victim = session.other(sender)
        if self.mode == "swap":
            await self._swap(sender, session, data)
            return
        if self.mode == "lie-censor" and kind == MsgType.CANDIDATES:
            self._count(victim, "censored")
            return
        if self.mode == "flip" and kind != MsgType.HANDSHAKE:
            tampered = bytearray(data)
            tampered[-1] ^= 1 << self._random.randrange(8)
            data = bytes(tampered)
            self._count(victim, "flipped")
        forging = self.mode == "inject" and kind in (MsgType.CANDIDATES, MsgType.DATA)
        if forging and await self._send(victim, self._forge(data)):
            self._count(victim, "forged")
        self._count(victim, "forwarded")
        await super()._forward(sender, kind, data)
        # Kept as delivered: a frame withheld (flipped) and sent later would be a delay, not a replay.
        if len(self._memory) < REPLAY_MEMORY:
            self._memory.append((victim, data))
        if self.mode == "replay" and kind in SEALED_TYPES and await self._send(victim, data):
            self._count(victim, "duplicated")

    async def _swap(self, sender: relay_module._Client, session: relay_module._Session, data: bytes) -> None:
        sessions = sorted(sender.sessions.values(), key=lambda s: s.session_id)
        if len(sessions) < 2:
            await super()._forward(sender, MsgType(data[1]), data)
            return
        other = sessions[(sessions.index(session) + 1) % len(sessions)]
        victim = other.other(sender)
        relabelled = data[:2] + other.session_id + data[2 + SESSION_ID_SIZE :]
        if await self._send(victim, relabelled):
            self._count(victim, "swapped")

    def _forge(self, data: bytes) -> bytes:
        """``data``'s header with a random body of the same length: what the relay can make without the keys."""
        body = self._random.randbytes(len(data) - SESSION_HEADER_SIZE)
        return data[:SESSION_HEADER_SIZE] + body

    # --- misbehaviour on request ----------------------------------------------------------

    async def _replay_memory(self) -> None:
        for victim, data in list(self._memory):
            if await self._send(victim, data):
                self._count(victim, "replayed")

    async def _inject_volley(self) -> None:
        clients = [c for network in self._clients.values() for c in network.values()]
        for client in clients:
            for session_id in sorted(client.sessions):
                for kind in sorted(SEALED_TYPES):
                    for size in (1, 40, 300)[:FORGED_PER_TYPE]:
                        head = bytes([WIRE_VERSION, kind]) + session_id + size.to_bytes(2, "big")
                        if await self._send(client, head + self._random.randbytes(size)):
                            self._count(client, "forged")
            for frame in self._garbage(client):
                if await self._send(client, frame):
                    self._count(client, "garbage")

    def _garbage(self, client: relay_module._Client) -> list[bytes]:
        """Frames that fail to decode, or decode to nonsense: wrong version, unknown type, bad lengths."""
        some_session = next(iter(client.sessions), bytes(SESSION_ID_SIZE))
        frames = [
            b"",
            bytes([WIRE_VERSION]),
            bytes([0x01, MsgType.DATA]) + some_session + b"\x00\x00",
            bytes([WIRE_VERSION, 0x7F]) + self._random.randbytes(30),
            bytes([WIRE_VERSION, MsgType.DATA]) + some_session + b"\xff\xff" + self._random.randbytes(10),
            bytes([WIRE_VERSION, MsgType.ESTABLISHED]) + self._random.randbytes(5),
            encode(
                PeerLeft(self._random.randbytes(SESSION_ID_SIZE), self._random.randbytes(32), "forged: no such session")
            ),
            self._random.randbytes(64),
        ]
        return frames[:GARBAGE_FRAMES]

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != "/hostile":
            return super()._process_request(connection, request)
        mode = parse_qs(url.query).get("mode", [self.mode])[0]
        if mode not in MODES:
            return connection.respond(HTTPStatus.BAD_REQUEST, f"mode must be one of {', '.join(MODES)}\n")
        previous, self.mode = self.mode, mode
        if mode != previous:
            relay_module.log.warning(relay_module._kv("hostile_mode", mode=mode, was=previous))
            if mode == "replay":
                self._spawn(self._replay_memory())
            elif mode == "inject":
                self._spawn(self._inject_volley())
        body = {"mode": self.mode, "counts": {victim: dict(c) for victim, c in self.counts.items()}}
        return connection.respond(HTTPStatus.OK, json.dumps(body) + "\n")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--record", type=Path, required=True, help="append every frame the relay sends here")
    parser.add_argument("--lie-ip", default=HostileRelay.lie_ip, help="the address announced in lie modes")
    own, relay_args = parser.parse_known_args(argv)
    HostileRelay.record_path = own.record
    HostileRelay.lie_ip = own.lie_ip
    # run_relay looks the class up by name at call time: serve with the hostile one.
    relay_module.RelayServer = HostileRelay  # type: ignore[misc]
    from traversal.cli import main as cli_main

    cli_main(["relay", *relay_args], prog_name="traversal")


if __name__ == "__main__":
    main(sys.argv[1:])
