"""The relay's counters and their Prometheus text exposition (format 0.0.4).

The relay keeps plain integers (no client library: a handful of counters do
not justify a dependency) and renders them on ``GET /metrics``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: Content type Prometheus expects for the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Reasons an authentication can fail; pre-declared so each series exists
#: (at 0) before the first failure, which keeps rate() queries honest. "abandoned": the
#: client closed the connection before its login was over (admission.py counts that against
#: its address like any failed login, so /metrics shows it too).
AUTH_FAILURE_REASONS = (
    "unknown_network",
    "bad_signature",
    "not_a_member",
    "duplicate_login",
    "auth_timeout",
    "abandoned",
)


#: Outcomes of a members reload (SIGHUP), pre-declared for the same reason.
MEMBER_RELOAD_RESULTS = ("ok", "error")


#: How far a TCP connection got: accepted, TLS handshake done, answered as plain HTTP
#: (/metrics, 404, a bad upgrade request) or opened as a WebSocket. The differences are what
#: the TLS and HTTP layers dropped before the relay saw a client (silence, garbage, slowness).
CONNECTION_STAGES = ("accepted", "tls", "http", "websocket")


@dataclass
class RelayCounters:
    """Monotonic counters; gauges are computed from the relay's state when rendering."""

    forwarded_bytes: int = 0
    forwarded_frames: int = 0
    dropped_frames: int = 0
    protocol_errors: int = 0
    releases: int = 0
    sessions_created: int = 0
    sessions_established: int = 0
    auth_failures: Counter[str] = field(default_factory=Counter)
    #: How far each TCP connection got (CONNECTION_STAGES); see server.py's _CountingConnection.
    connections: Counter[str] = field(default_factory=Counter)
    #: Members reloads (SIGHUP) by result: "ok", or "error" (a file missing or malformed: nothing changed).
    member_reloads: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class SessionSample:
    """One active session's traffic, labelled by the first 8 hex digits of its id."""

    label: str
    forwarded_bytes: int
    forwarded_frames: int


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


class _Exposition:
    """Accumulates metric families in the text format: HELP, TYPE, then samples."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], int | float]]
    ) -> None:
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                rendered = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
                self._lines.append(f"{name}{{{rendered}}} {value}")
            else:
                self._lines.append(f"{name} {value}")

    def single(self, name: str, kind: str, help_text: str, value: int | float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def render_metrics(
    counters: RelayCounters,
    *,
    clients_connected: int,
    connections_open: int,
    sessions: Iterable[SessionSample],
    logins_pending: int = 0,
    refused: dict[str, int] | None = None,
) -> str:
    """The whole ``/metrics`` page."""
    out = _Exposition()
    out.single(
        "traversal_relay_clients_connected", "gauge", "Authenticated clients currently connected.", clients_connected
    )
    out.single(
        "traversal_relay_connections_open",
        "gauge",
        "Open WebSocket connections, including ones still authenticating.",
        connections_open,
    )
    session_list = list(sessions)
    out.single("traversal_relay_sessions_active", "gauge", "Relay sessions with forwarding state.", len(session_list))
    out.single(
        "traversal_relay_sessions_created_total",
        "counter",
        "Relay sessions created by pairing.",
        counters.sessions_created,
    )
    out.single(
        "traversal_relay_sessions_established_total",
        "counter",
        "Relay sessions whose both ends sent READY.",
        counters.sessions_established,
    )
    out.single(
        "traversal_relay_forwarded_bytes_total",
        "counter",
        "Bytes of session frames forwarded between peers.",
        counters.forwarded_bytes,
    )
    out.single(
        "traversal_relay_forwarded_frames_total",
        "counter",
        "Session frames forwarded between peers.",
        counters.forwarded_frames,
    )
    out.family(
        "traversal_relay_session_forwarded_bytes",
        "gauge",
        "Bytes forwarded on an active session, both directions.",
        [({"session": s.label}, s.forwarded_bytes) for s in session_list],
    )
    out.family(
        "traversal_relay_session_forwarded_frames",
        "gauge",
        "Frames forwarded on an active session, both directions.",
        [({"session": s.label}, s.forwarded_frames) for s in session_list],
    )
    stages = dict.fromkeys(CONNECTION_STAGES, 0) | dict(counters.connections)
    out.family(
        "traversal_relay_connections_total",
        "counter",
        "TCP connections by how far they got: accepted, tls (handshake done), then http (answered as plain "
        "HTTP) or websocket (opened). accepted - tls were dropped during TLS (garbage, or silent past the "
        "handshake timeout); tls - http - websocket before a whole HTTP request.",
        [({"stage": stage}, count) for stage, count in stages.items()],
    )
    reasons = dict.fromkeys(AUTH_FAILURE_REASONS, 0) | dict(counters.auth_failures)
    out.family(
        "traversal_relay_auth_failures_total",
        "counter",
        "Failed logins, by reason (abandoned: the client closed the connection during its login).",
        [({"reason": reason}, count) for reason, count in sorted(reasons.items())],
    )
    out.single(
        "traversal_relay_logins_pending",
        "gauge",
        "Connections admitted to log in that have not finished.",
        logins_pending,
    )
    out.family(
        "traversal_relay_refused_total",
        "counter",
        "Connections turned away before their login: relay full, too many logins pending, "
        "too many failed logins from the address.",
        [({"reason": reason}, count) for reason, count in sorted((refused or {}).items())],
    )
    out.single(
        "traversal_relay_protocol_errors_total",
        "counter",
        "Connections closed for a protocol violation (malformed, unexpected, text or oversize frame).",
        counters.protocol_errors,
    )
    out.single(
        "traversal_relay_dropped_frames_total",
        "counter",
        "Frames dropped because their session is unknown, released, or not the sender's.",
        counters.dropped_frames,
    )
    out.single(
        "traversal_relay_releases_total",
        "counter",
        "Sessions released by their ends (gone direct).",
        counters.releases,
    )
    reloads = dict.fromkeys(MEMBER_RELOAD_RESULTS, 0) | dict(counters.member_reloads)
    out.family(
        "traversal_relay_member_reloads_total",
        "counter",
        "Members-file reloads (SIGHUP), by result; an error keeps the previous members.",
        [({"result": result}, count) for result, count in sorted(reloads.items())],
    )
    return out.text()
