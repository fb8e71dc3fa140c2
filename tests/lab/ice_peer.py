"""One ICE peer for the lab tests (tests/lab/test_ice_lab.py), run inside a host namespace.

The test plays the relay: this script prints its offer as one JSON line, reads the
peer's offer (and the public address the "relay" observed for the peer) as one JSON
line on stdin, runs :class:`traversal.ice.IceAgent.connect` and, on success, swaps a
few datagrams with the peer over the nominated pair. It ends with one JSON result
line, then keeps answering checks until the test says "close" (so a peer that
finished early never leaves the other checking a closed socket). Every wait is bounded.

    python tests/lab/ice_peer.py --name a --controlling --stun 203.0.113.1:3478 --timeout 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from traversal.candidates import CandidateOffer, decode_offer, encode_offer, observed_candidates
from traversal.ice import IceAgent, IceFailed

#: Datagrams each side sends over the nominated pair, and how long it may take (the peer
#: may nominate up to a whole deadline later than we did).
DATAGRAMS = 5
EXCHANGE_TIMEOUT = 8.0
#: After receiving all of the peer's datagrams, keep sending ours this long (the peer may still miss some).
EXCHANGE_GRACE = 0.3


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def read_line(timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout)
    if not line:
        raise SystemExit("stdin closed before the peer's offer arrived")
    return json.loads(line)


async def exchange(agent: IceAgent, name: str) -> list[str]:
    """Send DATAGRAMS numbered datagrams repeatedly until all of the peer's arrived (bounded)."""
    received: set[str] = set()
    agent.set_receiver(lambda data: received.add(data.decode(errors="replace")))
    deadline = time.monotonic() + EXCHANGE_TIMEOUT
    done_at: float | None = None
    while time.monotonic() < deadline:
        for i in range(DATAGRAMS):
            agent.send(f"D{name}{i}".encode())
        if done_at is None and len(received) >= DATAGRAMS:
            done_at = time.monotonic()
        if done_at is not None and time.monotonic() - done_at >= EXCHANGE_GRACE:
            break
        await asyncio.sleep(0.05)
    return sorted(received)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--controlling", action="store_true")
    parser.add_argument("--stun", help="IP:PORT of the STUN server")
    parser.add_argument("--timeout", type=float, default=5.0, help="the direct-connect deadline")
    parser.add_argument("--gather-timeout", type=float, default=2.0)
    parser.add_argument("--predict", type=int, default=4)
    parser.add_argument("--port-range", help="LOW-HIGH")
    args = parser.parse_args()
    if os.environ.get("ICE_PEER_DEBUG"):  # aioice's per-check log on stderr, for diagnosing a lab case
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)6.0f %(name)s %(message)s")
    stun = None
    if args.stun:
        host, _, port = args.stun.rpartition(":")
        stun = (host, int(port))
    port_range = None
    if args.port_range:
        low, _, high = args.port_range.partition("-")
        port_range = (int(low), int(high))

    agent = IceAgent(controlling=args.controlling, stun_server=stun, port_range=port_range, predict=args.predict)
    try:
        started = time.monotonic()
        local = await agent.gather(timeout=args.gather_timeout)
        nat = agent.nat
        offer = CandidateOffer(attempt=0, ufrag=agent.local_ufrag, pwd=agent.local_pwd, candidates=tuple(local))
        emit(
            {
                "event": "offer",
                "offer": base64.b64encode(encode_offer(offer)).decode(),
                "candidates": local,
                "gather_ms": round((time.monotonic() - started) * 1000),
                "allocation": nat.allocation if nat else None,
                "delta": nat.delta if nat else None,
                "mapped": [f"{ip}:{port}" for ip, port in nat.mapped] if nat else [],
                "predicted_ports": list(nat.predicted_ports) if nat else [],
            }
        )
        peer = await read_line(30.0)
        remote = decode_offer(base64.b64decode(peer["offer"]))
        extra = observed_candidates(peer["observed_ip"], remote.candidates) if peer.get("observed_ip") else []
        started = time.monotonic()
        connect_at = time.time()  # wall clock: lets the test see how far apart the two sides started
        try:
            pair = await agent.connect(remote, args.timeout, extra_remote=extra)
        except IceFailed as exc:
            emit(
                {
                    "event": "result",
                    "outcome": "relay",
                    "reason": str(exc),
                    "elapsed_s": round(time.monotonic() - started, 3),
                    "checks_sent": agent.checks_sent,
                    "connect_at": connect_at,
                }
            )
            return
        nominate_s = time.monotonic() - started
        received = await exchange(agent, args.name)
        stats = agent.stats()
        emit(
            {
                "event": "result",
                "outcome": "direct",
                "pair": str(pair),
                "local_type": pair.local.type,
                "remote_type": pair.remote.type,
                "remote_predicted": pair.predicted,
                "nominate_s": round(nominate_s, 3),
                "received": received,
                "checks_sent": stats.checks_sent,
                "pairs": stats.pairs,
                "connect_at": connect_at,
            }
        )
        await read_line(30.0)  # "close"
    finally:
        await agent.close()


if __name__ == "__main__":
    asyncio.run(main())
