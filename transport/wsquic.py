"""The direct path's carriage: traversal frames over one QUIC connection, sans-I/O.

Control frames (heartbeat, rekey, path control, BYE) travel reliably and in
order as WebSocket binary messages on one bidirectional QUIC stream (stream 0,
opened by the client); DATA frames, already sealed by the session, each ride one
QUIC DATAGRAM frame (RFC 9221), as MASQUE's CONNECT-IP (RFC 9484) carries IP
packets, so a lost packet never stalls the others.

Like aioquic's ``QuicConnection`` underneath, :class:`WsQuicConnection` does no
I/O and reads no clock. The driver (which, later, hands UDP payloads to and from
an aioice-nominated pair; this module never sees an address) follows aioquic's
contract: after every call into the connection (``connect``,
``receive_datagram``, ``handle_timer``, ``send_control``, ``send_datagram``,
``close``) it sends what :meth:`~WsQuicConnection.datagrams_to_send` returns,
drains :meth:`~WsQuicConnection.next_event`, and arms a timer for
:meth:`~WsQuicConnection.get_timer`.

Trust (DESIGN.md, "Trust"): the server presents a self-signed per-session
certificate (``transport/certs.py``) whose fingerprint the client learnt inside
the end-to-end encrypted handshake. The client pins it: when aioquic reports the
TLS handshake complete (after it has checked the server's CertificateVerify
signature, i.e. possession of the key), the client compares the SHA-256 of the
certificate the server presented with the pin and, on any difference or if the
certificate cannot be read, closes with a CRYPTO_ERROR(bad_certificate) before its
own TLS Finished leaves, so neither side ever reports :class:`Connected`. (Pinning
through aioquic's ``cadata`` + ``server_name`` would need the whole certificate;
only its fingerprint travels in the handshake.) The server does not authenticate
the client at the TLS level (aioquic has no client certificates): the peer is
authenticated by the session layer, whose sealed frames this connection carries,
and the QUIC connection only binds the path.

aioquic pitfalls handled here (LIBRARY-NOTES.md): both sides give QUIC the same
fixed placeholder peer address (:data:`PLACEHOLDER_PEER`) and the ICE layer owns
the real path; the server's QUIC connection is made on the first Initial packet,
with that packet's destination connection id; aioquic's DATAGRAM queue is
unbounded and a datagram too large for one packet blocks every later one forever
(aioquic issue 294), so :meth:`~WsQuicConnection.send_datagram` refuses frames
above :attr:`~WsQuicConnection.max_datagram_payload` and beyond a bounded queue.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections import deque
from dataclasses import dataclass

from aioquic.buffer import Buffer
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from websockets.frames import BINARY, CLOSE, CONT, OK_CLOSE_CODES, TEXT
from websockets.protocol import Protocol, Side, State

from transport.certs import FINGERPRINT_SIZE, SessionCertificate, certificate_fingerprint
from transport.constants import (
    MAX_FRAME_SIZE,
    MAX_REASON,
    QUIC_ALPN,
    WSQUIC_HANDSHAKE_TIMEOUT,
    WSQUIC_IDLE_TIMEOUT,
    WSQUIC_MAX_DATAGRAM_SIZE,
    WSQUIC_MAX_PENDING_CONTROL_BYTES,
    WSQUIC_MAX_PENDING_DATAGRAMS,
)

log = logging.getLogger("traversal.wsquic")

#: The peer address both sides give aioquic. The real path is the ICE pair's;
#: aioquic's client drops packets from any address but the one it connected to,
#: so a constant on both sides keeps QUIC out of path management. 192.0.2.0/24 is
#: TEST-NET-1 (RFC 5737): never a real peer, and unused by the NAT lab.
PLACEHOLDER_PEER: tuple[str, int] = ("192.0.2.1", 1)

#: The one bidirectional stream: client-initiated stream 0 (RFC 9000 section 2.1).
CONTROL_STREAM_ID = 0

#: Length of the connection ids both sides issue (aioquic's default, pinned here
#: because max_datagram_payload depends on it).
CONNECTION_ID_LENGTH = 8

#: Bytes a 1-RTT packet spends around one DATAGRAM frame: short header (flags 1
#: + destination connection id + 2-byte packet number, aioquic's
#: PACKET_NUMBER_SEND_SIZE), the 16-byte AEAD tag, and the frame's type (1) and
#: length (2-byte varint for 64..16383 bytes).
DATAGRAM_OVERHEAD = 1 + CONNECTION_ID_LENGTH + 2 + 16 + 1 + 2

#: The max_datagram_frame_size transport parameter we announce: a DATAGRAM frame
#: larger than a traversal frame cannot carry a valid one (16 bytes of slack for
#: the frame's type and length fields).
MAX_DATAGRAM_FRAME_SIZE = MAX_FRAME_SIZE + 16

# Application error codes in CONNECTION_CLOSE (RFC 9000 section 20.2).
ERROR_NONE = 0x0
ERROR_CONTROL_STREAM = 0x101  # malformed WebSocket stream, message over MAX_FRAME_SIZE, stream misuse
ERROR_HANDSHAKE_TIMEOUT = 0x102
#: Pin mismatch: a TLS bad_certificate alert (42) as QUIC carries it (RFC 9001 section 4.8).
ERROR_BAD_CERTIFICATE = QuicErrorCode.CRYPTO_ERROR + 42
ERROR_NO_APPLICATION_PROTOCOL = QuicErrorCode.CRYPTO_ERROR + 120

#: How far past an aioquic deadline that did not move when fired we re-arm it.
#: aioquic's loss timer, fired exactly at its deadline, can compute that same
#: deadline again (``sent + delay`` versus ``sent <= now - delay`` in float
#: arithmetic), which livelocks a driver whose clock only moves to deadlines.
TIMER_GRANULARITY = 1e-6

#: WebSocket framing overhead of one binary message, worst case (client: 14-byte
#: header with a 64-bit length and the mask key).
_WS_OVERHEAD = 14


class WsQuicError(Exception):
    """Misuse of a :class:`WsQuicConnection` by the local program; the message says what."""


class WsQuicClosedError(WsQuicError):
    """The connection is closed: make a new one (after a new ICE pair) to use the direct path again."""


class ControlBacklogFullError(WsQuicError):
    """Too many control bytes wait for acknowledgement: the path does not drain; treat it as dead."""


# --- events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The QUIC handshake completed and (on the client) the server's certificate matched the pin.

    ``certificate_fingerprint`` is the server certificate's, which both ends
    see. ``peer_fingerprint`` is that same value on the client (the pinned,
    verified peer) and None on the server, whose peer shows no certificate.
    """

    peer_fingerprint: bytes | None
    certificate_fingerprint: bytes


@dataclass(frozen=True, slots=True)
class ControlFrameReceived:
    """A traversal frame arrived on the control stream (complete, in order)."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class DatagramFrameReceived:
    """A traversal frame arrived in a QUIC DATAGRAM frame (may have been lost, never duplicated)."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is closed; reported once. Nothing is sent or delivered after it.

    ``error`` is False only for an orderly close (ours or the peer's);
    ``by_peer`` says who decided (an idle or handshake timeout is ours).
    """

    reason: str
    error: bool
    by_peer: bool


WsQuicEvent = Connected | ControlFrameReceived | DatagramFrameReceived | ConnectionClosed


@dataclass(slots=True)
class WsQuicStats:
    """Counters for ``traversal status``. Datagram byte counts are traversal frame sizes."""

    udp_sent: int = 0
    udp_received: int = 0
    udp_bytes_sent: int = 0
    udp_bytes_received: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    datagram_bytes_sent: int = 0
    datagram_bytes_received: int = 0
    control_sent: int = 0
    control_received: int = 0
    # send_datagram refusals, by reason
    dropped_oversize: int = 0  # larger than max_datagram_payload
    dropped_queue_full: int = 0  # max_pending_datagrams already wait for congestion window or pacing
    dropped_not_connected: int = 0  # before Connected
    dropped_closed: int = 0  # after ConnectionClosed
    # received DATAGRAM frames discarded (before Connected, after close, or over MAX_FRAME_SIZE)
    rx_datagrams_dropped: int = 0
    # UDP payloads aioquic raised on (it normally drops bad packets silently)
    receive_errors: int = 0
    # from aioquic's loss recovery (RFC 9002 section 5), None until the first sample
    smoothed_rtt: float | None = None
    min_rtt: float | None = None


def _truncate_reason(reason: str) -> str:
    raw = reason.encode("utf-8")[:MAX_REASON]
    return raw.decode("utf-8", errors="ignore")


def _peer_certificate_der(quic: QuicConnection) -> bytes | None:
    """DER of the certificate the server presented, or None if aioquic does not expose it.

    aioquic 1.7.2 keeps it in ``tls.Context._peer_certificate`` (no public
    accessor). None fails the pin check closed, so a future aioquic that moves
    it breaks connections loudly rather than silently skipping the pin.
    """
    cert = getattr(getattr(quic, "tls", None), "_peer_certificate", None)
    if not isinstance(cert, x509.Certificate):
        return None
    return cert.public_bytes(Encoding.DER)


class WsQuicConnection:
    """One direct-path QUIC connection carrying traversal frames; see the module docstring.

    The client pins the server certificate's fingerprint (``expected_fingerprint``);
    the server presents ``certificate``. The server does not authenticate the
    client at the TLS level: peer authentication comes from the session layer
    (the frames carried are sealed end to end), and this connection only binds
    the path. Nothing that arrives from the network raises: malformed input is
    dropped by aioquic, and a malformed control stream closes the connection
    with a :class:`ConnectionClosed` event (``error=True``).
    """

    def __init__(
        self,
        *,
        is_client: bool,
        certificate: SessionCertificate | None = None,
        expected_fingerprint: bytes | None = None,
        now: float,
        idle_timeout: float = WSQUIC_IDLE_TIMEOUT,
        handshake_timeout: float = WSQUIC_HANDSHAKE_TIMEOUT,
        max_datagram_size: int = WSQUIC_MAX_DATAGRAM_SIZE,
        max_pending_datagrams: int = WSQUIC_MAX_PENDING_DATAGRAMS,
        max_pending_control_bytes: int = WSQUIC_MAX_PENDING_CONTROL_BYTES,
    ) -> None:
        if is_client:
            if certificate is not None:
                raise WsQuicError("the client presents no certificate (aioquic has no client certificates)")
            if not isinstance(expected_fingerprint, bytes) or len(expected_fingerprint) != FINGERPRINT_SIZE:
                raise WsQuicError(f"the client needs the server's {FINGERPRINT_SIZE}-byte certificate fingerprint")
        else:
            if certificate is None:
                raise WsQuicError("the server needs its session certificate")
            if expected_fingerprint is not None:
                raise WsQuicError("the server pins nothing: pass expected_fingerprint to the client only")
        if idle_timeout <= 0 or handshake_timeout <= 0:
            raise WsQuicError("timeouts must be positive")
        if max_datagram_size < SMALLEST_MAX_DATAGRAM_SIZE:
            raise WsQuicError(f"max_datagram_size must be at least {SMALLEST_MAX_DATAGRAM_SIZE} (RFC 9000 14)")
        if max_pending_datagrams < 1 or max_pending_control_bytes < MAX_FRAME_SIZE + _WS_OVERHEAD:
            raise WsQuicError("pending bounds must admit at least one frame")

        configuration = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[QUIC_ALPN],
            idle_timeout=idle_timeout,
            max_datagram_size=max_datagram_size,
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            connection_id_length=CONNECTION_ID_LENGTH,
            # Receive windows: only the control stream carries stream data.
            max_stream_data=max_pending_control_bytes,
            max_data=max_pending_control_bytes,
        )
        if is_client:
            # No CA can vouch for a per-session certificate: aioquic's chain and
            # name checks are off and the fingerprint pin replaces them
            # (_on_handshake_completed). CertificateVerify is still checked.
            configuration.verify_mode = ssl.CERT_NONE
            self._own_fingerprint: bytes | None = None
        else:
            assert certificate is not None
            configuration.certificate, configuration.private_key = certificate.load()
            self._own_fingerprint = certificate.fingerprint
        self._configuration = configuration
        self._is_client = is_client
        self._expected_fingerprint = expected_fingerprint

        #: The largest frame :meth:`send_datagram` accepts: what one DATAGRAM frame
        #: in one full-size 1-RTT packet carries (1422 with the default 1452).
        self.max_datagram_payload = min(max_datagram_size - DATAGRAM_OVERHEAD, MAX_FRAME_SIZE)
        self._max_pending_datagrams = max_pending_datagrams
        self._max_pending_control_bytes = max_pending_control_bytes
        self._handshake_deadline = now + handshake_timeout

        # The client's exists from the start; the server's is made from the first Initial packet.
        self._quic: QuicConnection | None = None
        self._quic_datagrams: deque[bytes] = deque()
        if is_client:
            self._bind(QuicConnection(configuration=configuration))
        self._started = False  # connect() called / first Initial accepted

        self._ws = Protocol(
            Side.CLIENT if is_client else Side.SERVER, state=State.OPEN, max_size=MAX_FRAME_SIZE, logger=log
        )
        # WebSocket bytes not yet handed to the QUIC stream: before Connected, and
        # on the server until the client has opened stream 0.
        self._control_out: list[bytes] = []
        self._control_out_bytes = 0
        self._stream_open = False
        self._fragments: list[bytes] | None = None  # a fragmented message being assembled
        self._early_control: list[bytes] = []  # messages that arrived before Connected

        self._connected = False
        self._closed = False
        self._terminated = False
        self._close_requested: tuple[str, bool] | None = None  # reason, flush first
        self._quic_fired_at: float | None = None  # the last now aioquic's handle_timer ran at
        self._events: deque[WsQuicEvent] = deque()
        self._stats = WsQuicStats()

    # --- public API -----------------------------------------------------------

    @property
    def is_client(self) -> bool:
        return self._is_client

    @property
    def connected(self) -> bool:
        """True from :class:`Connected` until :class:`ConnectionClosed`."""
        return self._connected

    @property
    def closed(self) -> bool:
        """True once :class:`ConnectionClosed` is queued."""
        return self._closed

    @property
    def terminated(self) -> bool:
        """True once QUIC needs nothing more (closing period over): the driver may drop this object."""
        return self._terminated

    @property
    def pending_datagrams(self) -> int:
        """DATAGRAM frames queued in QUIC, waiting for congestion window or pacing room."""
        return len(self._quic_datagrams)

    @property
    def pending_control_bytes(self) -> int:
        """Control-stream bytes queued or in flight and not yet acknowledged by the peer."""
        return self._control_out_bytes + self._control_unacked()

    @property
    def stats(self) -> WsQuicStats:
        """Counters, with the RTT refreshed from aioquic's loss recovery."""
        quic = self._quic
        if quic is not None:
            # aioquic 1.7.2 exposes no RTT accessor; read its recovery state, tolerating a rename.
            loss = getattr(quic, "_loss", None)
            if getattr(loss, "_rtt_initialized", False):
                self._stats.smoothed_rtt = loss._rtt_smoothed  # type: ignore[union-attr]
                self._stats.min_rtt = loss._rtt_min  # type: ignore[union-attr]
        return self._stats

    def connect(self, now: float) -> None:
        """Client: start the QUIC handshake (then drain :meth:`datagrams_to_send`)."""
        if not self._is_client:
            raise WsQuicError("only the client connects; the server waits for the first datagram")
        if self._started:
            raise WsQuicError("connect() was already called")
        if self._closed:
            raise WsQuicClosedError("the connection is closed")
        assert self._quic is not None
        self._started = True
        self._quic.connect(PLACEHOLDER_PEER, now=now)

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Take one UDP payload from the path. Never raises on what the network sends."""
        stats = self._stats
        stats.udp_received += 1
        stats.udp_bytes_received += len(data)
        quic = self._quic
        if quic is None:
            if self._closed:
                return
            quic = self._accept_first_packet(data)
            if quic is None:
                return
        elif self._is_client and not self._started:
            return  # nothing is expected before connect()
        try:
            quic.receive_datagram(data, PLACEHOLDER_PEER, now)
        except Exception:  # aioquic drops bad packets itself; this is a last line of defence
            stats.receive_errors += 1
            log.debug("aioquic raised on a received datagram", exc_info=True)
        if not self._started:
            # Server: the first "Initial" did not decrypt (garbage, or an injected
            # packet with a bogus connection id). Forget it, so the real client's
            # Initial sets the original destination connection id.
            if quic._state is QuicConnectionState.FIRSTFLIGHT:
                self._quic = None
                self._quic_datagrams = deque()
                return
            self._started = True
        self._process_quic_events()
        if not self._closed:
            self._notice_quic_close()

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """UDP payloads to put on the path, oldest first."""
        quic = self._quic
        if quic is None or not self._started:
            return []
        if self._close_requested is not None:
            (reason, flush), self._close_requested = self._close_requested, None
            # One last flush, so a BYE queued just before close() leaves ahead of the close.
            out = quic.datagrams_to_send(now) if flush else []
            quic.close(error_code=ERROR_NONE, reason_phrase=reason)
            out += quic.datagrams_to_send(now)
        else:
            out = quic.datagrams_to_send(now)
            if out and self._quic_datagrams and out[-1][0][0] & 0x80:
                # The last UDP datagram began with a long-header (handshake) packet:
                # a DATAGRAM frame that did not fit behind it in the coalesced
                # datagram waits for the next call, which nothing else would trigger.
                out += quic.datagrams_to_send(now)
        stats = self._stats
        payloads = [data for data, _addr in out]
        stats.udp_sent += len(payloads)
        stats.udp_bytes_sent += sum(map(len, payloads))
        return payloads

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next run; None when nothing is timed (e.g. terminated)."""
        if self._terminated:
            return None
        timer = None
        quic = self._quic
        if quic is not None and self._started:
            timer = quic.get_timer()
            fired_at = self._quic_fired_at
            if timer is not None and fired_at is not None and timer <= fired_at:
                timer = fired_at + TIMER_GRANULARITY  # see TIMER_GRANULARITY
        if not self._connected and not self._closed:
            timer = self._handshake_deadline if timer is None else min(timer, self._handshake_deadline)
        return timer

    def handle_timer(self, now: float) -> None:
        """Do what is due at ``now``: retransmission, ACKs, pacing, idle and handshake timeouts."""
        quic = self._quic
        if quic is not None and self._started and not self._terminated:
            timer = quic.get_timer()
            # aioquic's handle_timer compares with its close deadline, which is None once terminated.
            if timer is not None and now >= timer:
                quic.handle_timer(now)
                self._quic_fired_at = now
                self._process_quic_events()
        if not self._connected and not self._closed and now >= self._handshake_deadline:
            self._fail(ERROR_HANDSHAKE_TIMEOUT, "direct path QUIC handshake timed out")

    def next_event(self) -> WsQuicEvent | None:
        """The next event, or None when there is none."""
        try:
            return self._events.popleft()
        except IndexError:
            return None

    def send_control(self, frame: bytes) -> None:
        """Send one traversal frame on the control stream: reliably, in order, as one WebSocket message.

        Frames sent before :class:`Connected` wait and leave once the handshake
        completes. Raises :class:`WsQuicClosedError` once closed,
        :class:`ControlBacklogFullError` when the pending bound would be exceeded,
        :class:`WsQuicError` for a frame that is empty or over MAX_FRAME_SIZE.
        """
        if self._closed:
            raise WsQuicClosedError("the connection is closed")
        if not isinstance(frame, (bytes, bytearray)) or not 0 < len(frame) <= MAX_FRAME_SIZE:
            raise WsQuicError(f"a control frame is 1..{MAX_FRAME_SIZE} bytes")
        if self.pending_control_bytes + len(frame) + _WS_OVERHEAD > self._max_pending_control_bytes:
            raise ControlBacklogFullError(
                f"{self.pending_control_bytes} control bytes await acknowledgement: the direct path does not drain"
            )
        self._ws.send_binary(bytes(frame))
        self._stats.control_sent += 1
        self._flush_control()

    def send_datagram(self, frame: bytes) -> bool:
        """Queue one traversal frame as one QUIC DATAGRAM frame; False (and a counted drop) if refused.

        Refused when larger than :attr:`max_datagram_payload`, when
        ``max_pending_datagrams`` frames already wait, or when not connected. A
        refused frame is gone: it never blocks later ones.
        """
        stats = self._stats
        if not self._connected:
            if self._closed:
                stats.dropped_closed += 1
            else:
                stats.dropped_not_connected += 1
            return False
        size = len(frame)
        if size > self.max_datagram_payload:
            stats.dropped_oversize += 1
            return False
        if len(self._quic_datagrams) >= self._max_pending_datagrams:
            stats.dropped_queue_full += 1
            return False
        self._quic_datagrams.append(frame)
        stats.datagrams_sent += 1
        stats.datagram_bytes_sent += size
        return True

    def close(self, reason: str) -> None:
        """Close in an orderly way; the peer sees :class:`ConnectionClosed` with ``reason``.

        Control frames already queued get one last flush ahead of the close (best
        effort: the close does not wait for their acknowledgement). The local
        :class:`ConnectionClosed` is queued at once; keep driving the
        connection until :attr:`terminated` to let the close reach the peer.
        """
        if self._closed:
            return
        reason = _truncate_reason(reason)
        if self._quic is not None and self._started:
            # Flush only a connected stream: mid-handshake, a flush could send our TLS Finished.
            self._flush_control()
            self._close_requested = (reason, self._connected)
        else:
            self._terminated = True
        self._mark_closed(reason, error=False, by_peer=False)

    # --- internals --------------------------------------------------------------

    def _bind(self, quic: QuicConnection) -> None:
        self._quic = quic
        # aioquic 1.7.2's DATAGRAM queue, which it never bounds: send_datagram
        # appends to it directly and bounds it (the documented send_datagram_frame
        # does nothing more than this append).
        self._quic_datagrams = quic._datagrams_pending

    def _accept_first_packet(self, data: bytes) -> QuicConnection | None:
        """Server: make the QUIC connection from a client Initial packet, or None to ignore ``data``."""
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return None  # RFC 9000 section 14.1: Initial datagrams are padded to 1200
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            return None
        if header.packet_type != QuicPacketType.INITIAL or header.version not in self._configuration.supported_versions:
            return None
        quic = QuicConnection(
            configuration=self._configuration, original_destination_connection_id=header.destination_cid
        )
        self._bind(quic)
        return quic

    def _control_unacked(self) -> int:
        quic = self._quic
        if quic is None:
            return 0
        # aioquic keeps sent stream data until it is acknowledged; 1.7.2 has no
        # public accessor for how much that is.
        stream = quic._streams.get(CONTROL_STREAM_ID)
        return 0 if stream is None else len(stream.sender._buffer)

    def _process_quic_events(self) -> None:
        quic = self._quic
        assert quic is not None
        while (event := quic.next_event()) is not None:
            if isinstance(event, quic_events.DatagramFrameReceived):
                data = event.data
                if not self._connected or len(data) > MAX_FRAME_SIZE:
                    self._stats.rx_datagrams_dropped += 1
                    continue
                self._stats.datagrams_received += 1
                self._stats.datagram_bytes_received += len(data)
                self._events.append(DatagramFrameReceived(data))
            elif isinstance(event, quic_events.StreamDataReceived):
                self._on_stream_data(event)
            elif isinstance(event, quic_events.HandshakeCompleted):
                self._on_handshake_completed(event)
            elif isinstance(event, quic_events.ConnectionTerminated):
                self._on_terminated(event)
            elif isinstance(event, (quic_events.StreamReset, quic_events.StopSendingReceived)):
                self._fail(ERROR_CONTROL_STREAM, f"peer abandoned stream {event.stream_id}")
            # ProtocolNegotiated, PingAcknowledged, ConnectionIdIssued/Retired: nothing to do.

    def _on_handshake_completed(self, event: quic_events.HandshakeCompleted) -> None:
        if self._closed:
            return
        quic = self._quic
        assert quic is not None
        if event.alpn_protocol != QUIC_ALPN:
            self._fail(
                ERROR_NO_APPLICATION_PROTOCOL,
                f"peer negotiated ALPN {event.alpn_protocol!r}, not {QUIC_ALPN!r}",
                frame_type=QuicFrameType.CRYPTO,
            )
            return
        if self._is_client:
            assert self._expected_fingerprint is not None
            der = _peer_certificate_der(quic)
            if der is None:
                self._fail(
                    ERROR_BAD_CERTIFICATE,
                    "server certificate unavailable: cannot check the pin",
                    frame_type=QuicFrameType.CRYPTO,
                )
                return
            fingerprint = certificate_fingerprint(der)
            if not hmac.compare_digest(fingerprint, self._expected_fingerprint):
                # Closing here, inside receive_datagram, means our TLS Finished is
                # never sent: the server does not complete its handshake either.
                log.warning(
                    "direct path refused: server certificate %s does not match the pinned %s",
                    fingerprint.hex(),
                    self._expected_fingerprint.hex(),
                )
                self._fail(
                    ERROR_BAD_CERTIFICATE,
                    "server certificate does not match the pinned fingerprint",
                    frame_type=QuicFrameType.CRYPTO,
                )
                return
            self._events.append(Connected(peer_fingerprint=fingerprint, certificate_fingerprint=fingerprint))
            self._connected = True
            self._stream_open = True
            if not self._control_out:
                # Open stream 0 so the server may write to it before we have
                # anything to say; an unsolicited pong needs no answer (RFC 6455 5.5.3).
                self._ws.send_pong(b"")
        else:
            assert self._own_fingerprint is not None
            self._events.append(Connected(peer_fingerprint=None, certificate_fingerprint=self._own_fingerprint))
            self._connected = True
        for frame in self._early_control:
            self._deliver_control(frame)
        self._early_control.clear()
        self._flush_control()

    def _on_stream_data(self, event: quic_events.StreamDataReceived) -> None:
        if self._closed:
            return
        if event.stream_id != CONTROL_STREAM_ID:
            self._fail(ERROR_CONTROL_STREAM, f"data on stream {event.stream_id}; only stream 0 is used")
            return
        ws = self._ws
        try:
            if event.data:
                ws.receive_data(event.data)
            if event.end_stream:
                ws.receive_eof()
        except EOFError:
            self._fail(ERROR_CONTROL_STREAM, "data after the end of the control stream")
            return
        for frame in ws.events_received():
            opcode = frame.opcode
            if opcode is BINARY:
                if frame.fin:
                    self._deliver_control(frame.data)
                else:
                    self._fragments = [frame.data]
            elif opcode is CONT:
                # websockets checks the sequence of fragments and bounds their sum by max_size.
                assert self._fragments is not None
                self._fragments.append(frame.data)
                if frame.fin:
                    message = b"".join(self._fragments)
                    self._fragments = None
                    self._deliver_control(message)
            elif opcode is TEXT:
                self._fail(ERROR_CONTROL_STREAM, "text message on the control stream; traversal frames are binary")
                return
            elif opcode is CLOSE:
                close = ws.close_rcvd
                code = close.code if close is not None else 1005
                reason = close.reason if close is not None and close.reason else f"WebSocket close {code}"
                error = code not in OK_CLOSE_CODES
                self._close_quic(ERROR_CONTROL_STREAM if error else ERROR_NONE, reason)
                self._mark_closed(reason, error=error, by_peer=True)
                return
            if self._closed:
                return
            # PING: websockets queued the pong; PONG: nothing to do.
        if ws.parser_exc is not None:
            self._fail(ERROR_CONTROL_STREAM, f"malformed control stream: {ws.parser_exc}")
            return
        if event.end_stream:
            self._fail(ERROR_CONTROL_STREAM, "peer ended the control stream")
            return
        # Server: the client has opened stream 0, so we may write to it (once connected).
        self._stream_open = True
        self._flush_control()

    def _deliver_control(self, frame: bytes) -> None:
        if not self._connected:
            # Stream data can overtake a lost TLS Finished; hold it until Connected.
            self._early_control.append(frame)
            return
        self._stats.control_received += 1
        self._events.append(ControlFrameReceived(frame))

    def _flush_control(self) -> None:
        for chunk in self._ws.data_to_send():
            if chunk:  # b"" is websockets' end-of-stream marker; QUIC's close ends the stream
                self._control_out.append(chunk)
                self._control_out_bytes += len(chunk)
        if not self._control_out or self._closed or not (self._connected and self._stream_open):
            return
        assert self._quic is not None
        data = b"".join(self._control_out)
        self._control_out.clear()
        self._control_out_bytes = 0
        self._quic.send_stream_data(CONTROL_STREAM_ID, data)

    def _notice_quic_close(self) -> None:
        """Report a close aioquic decided on while receiving, without waiting for its closing period.

        aioquic queues ConnectionTerminated only when the closing or draining
        period ends (3 PTO, RFC 9000 section 10.2); the application should know
        at once that nothing more will be delivered. 1.7.2 keeps the pending
        close in ``_close_event`` and the phase in ``_state``.
        """
        quic = self._quic
        assert quic is not None
        event = quic._close_event
        if event is None:
            return
        by_peer = quic._state is QuicConnectionState.DRAINING  # the peer's CONNECTION_CLOSE
        self._mark_closed(
            self._close_reason(event), error=event.error_code != ERROR_NONE or not by_peer, by_peer=by_peer
        )

    def _on_terminated(self, event: quic_events.ConnectionTerminated) -> None:
        self._terminated = True
        if self._closed:
            return  # already reported; this is the end of the closing or draining period
        if event.error_code == QuicErrorCode.INTERNAL_ERROR and event.reason_phrase == "Idle timeout":
            # aioquic's own, from handle_timer (it sends nothing: RFC 9000 section 10.1).
            self._mark_closed("idle timeout", error=True, by_peer=False)
        else:
            self._mark_closed(self._close_reason(event), error=event.error_code != ERROR_NONE, by_peer=True)

    @staticmethod
    def _close_reason(event: quic_events.ConnectionTerminated) -> str:
        return event.reason_phrase or f"QUIC error 0x{event.error_code:x}"

    def _fail(self, code: int, reason: str, *, frame_type: int | None = None) -> None:
        if self._closed:
            return
        log.info("direct path QUIC connection failed: %s", reason)
        self._close_quic(code, reason, frame_type=frame_type)
        self._mark_closed(reason, error=True, by_peer=False)

    def _close_quic(self, code: int, reason: str, *, frame_type: int | None = None) -> None:
        quic = self._quic
        if quic is None or not self._started:
            self._terminated = True
            return
        # A transport close (frame_type set) keeps its code and reason in
        # Initial/Handshake packets; aioquic blanks an application close there.
        quic.close(error_code=code, frame_type=frame_type, reason_phrase=_truncate_reason(reason))

    def _mark_closed(self, reason: str, *, error: bool, by_peer: bool) -> None:
        self._closed = True
        self._connected = False
        self._control_out.clear()
        self._control_out_bytes = 0
        self._early_control.clear()
        self._fragments = None
        self._quic_datagrams.clear()
        self._events.append(ConnectionClosed(reason=reason, error=error, by_peer=by_peer))
