"""Protocol timing constants and limits, in one place, under the seed's names.

Like wireguard-go's ``constants.go``: every interval and limit that shapes the
protocol lives here, so a reader can see the whole timing model at once.
Durations are seconds (floats); the sans-I/O cores take ``now`` as an argument
and compare it with these.
"""

from __future__ import annotations

# --- Wire format -------------------------------------------------------------

#: First byte of every frame. 0x0A lies outside the first-byte ranges of STUN
#: (0-3) and QUIC (64-255) (RFC 7983, RFC 9443), so a frame can share a UDP
#: 5-tuple with both and still be told apart by its first byte.
WIRE_VERSION = 0x0A

#: Largest encoded frame any parser accepts (a jumbo Ethernet frame plus the
#: session's sealing overhead fits; so does a BUNDLE of eleven full-sized DATA
#: records, which is what the relay path's throughput depends on). One TLS record.
MAX_FRAME_SIZE = 16_384

#: Largest end-to-end handshake message (ML-KEM-768 public key is 1184 bytes).
MAX_HANDSHAKE_SIZE = 4_096

#: Longest network name, in UTF-8 bytes.
MAX_NETWORK_NAME = 64

#: Longest human-readable reason in ERROR / PEER_LEFT frames, in UTF-8 bytes.
MAX_REASON = 255

# --- Session parameters announced in ESTABLISHED -------------------------------

#: Default MTU of the TAP overlay, chosen so one full-size Ethernet frame fits
#: one QUIC DATAGRAM on a 1500-byte IPv6 path: 1360 + 14 (Ethernet header)
#: + 45 (frame header 20, sealing 25) = 1419 <= 1422, the largest datagram
#: payload with max_datagram_size 1452 (1500 - 40 IPv6 - 8 UDP).
DEFAULT_MTU = 1360
MIN_MTU = 576
MAX_MTU = 9000

#: The seed's ``HeartbeatInterval`` (seconds): how often a session proves
#: liveness when it has nothing else to say.
HEARTBEAT_INTERVAL = 5.0

#: Without any authenticated record for this long, the peer is declared dead.
DEAD_PEER_TIMEOUT = 3 * HEARTBEAT_INTERVAL

#: The seed's ``KeyRotationInterval`` (seconds): send keys are ratcheted at
#: least this often.
KEY_ROTATION_INTERVAL = 120.0

#: Ratchet the send key after this many records under one key, whatever the
#: time (AEAD usage limit; far below the 2^64 counter space).
REKEY_AFTER_MESSAGES = 1 << 24

#: A receiver keeps the previous epoch's key this long after moving on, so
#: records still in flight when the sender rotated are accepted.
PREVIOUS_KEY_GRACE = 10.0

#: How many epochs a receiver may skip to follow its peer, e.g. after a relay
#: outage swallowed a whole epoch's records (each skipped epoch costs one HKDF).
MAX_EPOCHS_AHEAD = 8

#: Replay window width (counters), as WireGuard's: duplicates and counters
#: older than this are dropped.
REPLAY_WINDOW_SIZE = 2048

# --- Handshake ----------------------------------------------------------------

#: An end-to-end handshake not finished within this time is abandoned.
HANDSHAKE_TIMEOUT = 10.0

# --- Relay client -------------------------------------------------------------

#: Reconnect backoff to the relay after a transient failure: first delay,
#: factor, and ceiling.
RECONNECT_INITIAL_DELAY = 0.5
RECONNECT_BACKOFF_FACTOR = 2.0
RECONNECT_MAX_DELAY = 30.0
#: Each wait is drawn from [delay * (1 - JITTER), delay], so that the clients of a relay
#: that restarted do not all come back in the same instant (bench/relay_capacity.md: one
#: relay process admits a few hundred logins a second; a storm beyond what it can admit
#: within the login timeout times out and retries, later and more spread each time).
RECONNECT_JITTER = 0.5
#: A node that let the relay go (every member it knows of is direct) logs in again this often
#: (jittered) to hear of members added since: the relay's MEMBERS and PEER_JOINED come only
#: over a connection (issue 8). Five minutes: a login every five minutes per node is cheap.
RELAY_CHECKIN_INTERVAL = 300.0

#: Relay-side: time an unauthenticated connection has to complete HELLO/AUTH.
AUTH_TIMEOUT = 10.0

# --- Direct path (later issues build on these) --------------------------------

#: The seed: "If direct connection fails after 5 seconds, continue using relay".
DIRECT_CONNECT_DEADLINE = 5.0

#: The seed: "Retry direct connection every 60 seconds".
DIRECT_RETRY_INTERVAL = 60.0

#: While direct, each side probes the direct path this often ...
DIRECT_KEEPALIVE_INTERVAL = 1.0

#: ... and declares it dead when none of its probes was answered for this long
#: (the issue's bound: traffic back on the relay within 3 s of a cut, plus the
#: time to reach the relay again).
DIRECT_DEAD_AFTER = 3.0

#: After an agreed switch from direct to relay, the direct path keeps receiving
#: this long (frames the peer sent before it switched), then closes.
DIRECT_RELEASE_LINGER = 1.0

#: After a relay reconnect, a session resumed with its existing keys must hear
#: from the peer within this time, or a new handshake is made (the peer restarted).
RESUME_TIMEOUT = 2.0

# --- Relay server ---------------------------------------------------------------

#: A second login for an identity already connected makes the relay ping the
#: existing connection; no pong within this time means that connection is stale
#: (e.g. the peer process restarted) and the newcomer replaces it.
RELAY_DUPLICATE_PING_TIMEOUT = 2.0

#: WebSocket keepalive on relay connections: ping this often, and drop a
#: connection whose pong is this late (websockets' ping_interval/ping_timeout).
RELAY_KEEPALIVE_INTERVAL = 20.0

#: On shutdown the relay gives each client this long to take its
#: SERVER_SHUTDOWN error frame before the close handshake starts.
RELAY_SHUTDOWN_GRACE = 2.0

# --- Direct path carriage: WebSocket frames over QUIC (transport/wsquic.py) ---------

#: ALPN both ends of the direct path's QUIC connection insist on.
QUIC_ALPN = "traversal/1"

#: Largest UDP payload QUIC sends. 1452 = 1500 (Ethernet path MTU) - 40 (IPv6
#: header) - 8 (UDP header), so it fits a 1500-byte path over IPv4 or IPv6
#: unfragmented. It does not fit paths with a smaller MTU (PPPoE's 1492, tunnels):
#: aioquic has no path MTU discovery, so such paths need a smaller value (1200 is
#: QUIC's floor). With it, a DATAGRAM frame carries at most 1422 bytes of traversal
#: frame, i.e. a sealed DATA frame for an overlay MTU of at most 1363
#: (Ethernet 14 + session frame header 20 + sealing 25 = MTU + 59 bytes).
WSQUIC_MAX_DATAGRAM_SIZE = 1452

#: QUIC idle timeout (seconds). Longer than DEAD_PEER_TIMEOUT so the session's
#: heartbeats, not QUIC, decide (and log why) that the direct path is dead; QUIC's
#: own timeout only reaps a connection nobody closed. The session heartbeats every
#: HEARTBEAT_INTERVAL, which also keeps NAT mappings warm.
WSQUIC_IDLE_TIMEOUT = 30.0

#: A direct-path QUIC connection not connected within this time is closed.
WSQUIC_HANDSHAKE_TIMEOUT = 10.0

#: DATAGRAM frames waiting for congestion window or pacing room. Beyond this,
#: send_datagram refuses (the tunnelled traffic's own congestion control sees
#: a loss) rather than build a standing queue: 64 x 1.4 kB is ~10 ms at 70 Mbit/s.
WSQUIC_MAX_PENDING_DATAGRAMS = 64

#: Control-stream bytes queued or sent but not yet acknowledged. Control traffic
#: is small (heartbeats, rekey, path control); hitting this means the path does
#: not drain, which the caller should treat as a dead path. Also the QUIC
#: receive flow-control window of the stream.
WSQUIC_MAX_PENDING_CONTROL_BYTES = 256 * 1024

# --- Direct path: candidates and connectivity checks (traversal/candidates.py, ice.py) ---

#: Most candidates one CANDIDATES offer carries (host + server-reflexive +
#: predicted). aioice pairs every local socket with every remote candidate and
#: starts one check every 20 ms, so 24 candidates cost about half a second of
#: pacing on one socket: more would not fit the direct-connect deadline anyway.
MAX_CANDIDATES = 24

#: Longest candidate line (SDP "candidate" attribute value) an offer may carry.
MAX_CANDIDATE_SDP = 256

#: Most local addresses (hence sockets and host candidates) one ICE agent uses.
MAX_HOST_CANDIDATES = 8

#: Predicted server-reflexive ports advertised by default behind a NAT that
#: allocates ports sequentially, and the most ever advertised. Each costs the
#: peer one paced check; a few cover other flows that take ports meanwhile.
DEFAULT_PREDICTED_CANDIDATES = 4
MAX_PREDICTED_CANDIDATES = 8

#: Candidates made from the relay-observed public address (ESTABLISHED's peer
#: IP) and the peer's advertised ports, at most this many per offer.
MAX_OBSERVED_CANDIDATES = 8

#: How long gathering waits for the STUN server (all of its queries together).
ICE_GATHER_TIMEOUT = 3.0

#: First retransmission timeout of the gathering STUN queries (as the probe's:
#: shorter than RFC 5389's 0.5 s, because an answer that never comes costs the
#: whole direct-connect deadline).
ICE_STUN_RTO = 0.25

#: Datagrams kept for the caller between the first packet of the peer's QUIC
#: connection and ``IceAgent.set_receiver`` (or our own nomination); older ones
#: are dropped, as a full socket buffer would.
ICE_MAX_EARLY_DATAGRAMS = 32

#: Largest STUN message the ICE sockets accept (connectivity checks are ~100 bytes).
ICE_MAX_STUN_SIZE = 1_500

#: Extra early retransmissions of each connectivity check, in seconds after the
#: first send, before aioice's own (RFC 5389: 0.5 s, then doubling). Hole punching
#: loses the first check of each side by design (the peer's NAT has not opened
#: yet); resending soon after cuts the time to nominate from ~0.5 s to ~0.1 s.
ICE_CHECK_EARLY_RETRANSMITS = (0.1, 0.25)
