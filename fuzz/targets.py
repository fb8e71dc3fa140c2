"""Fuzz targets: the parsers that read what strangers, relays and peers send, and config files.

Each target takes arbitrary bytes and may raise only its parser's own error; anything else
(an IndexError, a struct.error, a hang) is a bug. Run coverage-guided by atheris through
``fuzz/run.py`` (``make fuzz``), and over the kept corpus by the test suite.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from transport import frames
from transport.handshake import Handshake, HandshakeError
from traversal import stun
from traversal.config import ConfigError, load_section

_PROLOGUE = b"traversal fuzz"
_INITIATOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_RESPONDER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
#: The [connect] keys and types `traversal connect --config` accepts (a fixed subset is enough
#: to reach every branch of the checker).
_ALLOWED: dict[str, type | tuple[type, ...]] = {
    "relay_url": str,
    "network": str,
    "members": (str, list),
    "direct_timeout": (int, float),
    "insecure": bool,
}
_CONFIG = Path(tempfile.gettempdir()) / f"traversal-fuzz-{id(_ALLOWED)}.toml"


def fuzz_frames(data: bytes) -> None:
    """The relay's and the peers' frame decoder, and the data plane's framing checks."""
    with contextlib.suppress(frames.FrameError):
        frames.decode(data)
    frames.data_record(data)  # never raises: None for anything but a well-formed DATA frame
    with contextlib.suppress(frames.FrameError):
        frames.split_bundle(data)


def fuzz_stun(data: bytes) -> None:
    """The STUN decoder (the relay's STUN server, and the peers' ICE and probe)."""
    with contextlib.suppress(stun.StunError):
        stun.parse(data)


def fuzz_handshake(data: bytes) -> None:
    """The handshake state machine fed a forged message 1, 2 or 3 (the first byte picks which)."""
    if not data:
        return
    stage, message = data[0] % 3, data[1:]
    initiator = Handshake(initiator=True, identity=_INITIATOR_KEY, prologue=_PROLOGUE)
    responder = Handshake(initiator=False, identity=_RESPONDER_KEY, prologue=_PROLOGUE)
    try:
        if stage == 0:
            responder.receive(message)  # a forged message 1
        elif stage == 1:
            initiator.start()
            initiator.receive(message)  # a forged message 2
        else:
            msg2 = responder.receive(initiator.start())
            assert msg2 is not None
            responder.receive(message)  # a forged message 3
    except HandshakeError:
        pass


def fuzz_config(data: bytes) -> None:
    """The config file reader (TOML, then strict key and type checks)."""
    _CONFIG.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_section(_CONFIG, "connect", _ALLOWED)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": fuzz_frames,
    "stun": fuzz_stun,
    "handshake": fuzz_handshake,
    "config": fuzz_config,
}
