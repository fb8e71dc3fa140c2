"""The `traversal` command line: keygen, genpsk, pubkey, relay, connect, status.

Every subcommand that takes many options also takes ``--config FILE`` (TOML,
see ``traversal/config.py``); flags given on the command line win. Errors
print one line and exit non-zero; there are no tracebacks for user mistakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from transport.constants import RELAY_CHECKIN_INTERVAL
from transport.identity import (
    IdentityError,
    encode_public,
    generate_identity,
    generate_psk,
    load_identity,
    load_members,
    load_psk,
    public_bytes,
    save_identity,
    save_psk,
)
from traversal.config import ConfigError, load_networks, load_section, parse_members_spec
from traversal.control import ControlError, default_control_path, find_control_socket, query
from traversal.logfmt import setup_logging


class UserError(click.ClickException):
    """A mistake or refusal the user can fix; printed as one line, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"traversal: error: {self.message}", err=True)


def option_types(command: click.Command) -> dict[str, type | tuple[type, ...]]:
    """What TOML type each of a command's options takes in a config file."""
    allowed: dict[str, type | tuple[type, ...]] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in (None, "config", "verbose"):
            continue
        if param.multiple:
            allowed[param.name] = list
        elif param.is_flag:
            allowed[param.name] = bool
        elif isinstance(param.type, click.types.IntParamType):
            allowed[param.name] = int
        elif isinstance(param.type, click.types.FloatParamType):
            allowed[param.name] = (int, float)
        else:
            allowed[param.name] = str
    return allowed


def _config_callback(section: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """Eager --config: load the TOML table into ctx.default_map so flags still win."""

    def callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is None:
            return
        allowed = option_types(ctx.command)
        try:
            ctx.default_map = load_section(Path(value), section, allowed)
        except ConfigError as exc:
            raise UserError(str(exc)) from None

    return callback


def _config_option(section: str) -> Callable[[Any], Any]:
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_config_callback(section),
        help=f"TOML file whose [{section}] table sets any of these options (flags win).",
    )


def _split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{what} must be HOST:PORT (e.g. 0.0.0.0:8443 or [::]:8443), got {value!r}")
    return host, int(port)


def _run(coro_factory: Callable[[], Any]) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro_factory())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="traversal")
def main() -> None:
    """traversal: a layer-2 peer-to-peer VPN whose relay is a matchmaker, not a middleman."""


# --- keys --------------------------------------------------------------------


@main.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Where to write the identity.")
@click.option("--force", is_flag=True, help="Overwrite an existing identity file.")
def keygen(out: str, force: bool) -> None:
    """Write a new Ed25519 identity (mode 0600) and print its public key."""
    path = Path(out)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to replace it (the old identity is lost)")
    key = generate_identity()
    try:
        save_identity(key, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    click.echo(encode_public(public_bytes(key)))


@main.command()
@click.option("--identity", required=True, type=click.Path(dir_okay=False), help="An identity file from keygen.")
def pubkey(identity: str) -> None:
    """Print the public key of an identity file (one line)."""
    try:
        click.echo(encode_public(public_bytes(load_identity(Path(identity)))))
    except IdentityError as exc:
        raise UserError(str(exc)) from None


@main.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Where to write the PSK.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def genpsk(out: str, force: bool) -> None:
    """Write a new 32-byte network pre-shared key (mode 0600) for --psk."""
    path = Path(out)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to replace it")
    save_psk(generate_psk(), path)
    click.echo(f"wrote {path}; give the same file to every member as --psk")


# --- relay ---------------------------------------------------------------------


@main.command()
@_config_option("relay")
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT for WebSocket/TLS and /metrics.")
@click.option(
    "--members",
    "members",
    multiple=True,
    metavar="NETWORK:FILE",
    help="A network and its members file (one public key per line). Repeat for more networks. "
    "SIGHUP re-reads the files: sessions of members who stay are kept, removed members are disconnected.",
)
@click.option("--cert", type=click.Path(dir_okay=False), help="TLS certificate (PEM).")
@click.option("--key", type=click.Path(dir_okay=False), help="TLS private key (PEM).")
@click.option(
    "--self-signed",
    "self_signed",
    type=click.Path(file_okay=False),
    help="Directory for a self-signed cert.pem/key.pem (made if absent); clients pass cert.pem as --ca.",
)
@click.option("--insecure", is_flag=True, help="Serve plain ws:// without TLS (testing only).")
@click.option("--mtu", type=int, default=None, help="Overlay MTU announced in ESTABLISHED.")
@click.option("--heartbeat", type=int, default=None, help="Heartbeat interval (s) announced in ESTABLISHED.")
@click.option("--key-rotation", "key_rotation", type=int, default=None, help="Key rotation interval (s) announced.")
@click.option(
    "--stun",
    "stun",
    metavar="IP:PORT",
    help="Also serve STUN Binding on this UDP address (e.g. 203.0.113.1:3478), in the same process.",
)
@click.option(
    "--stun-alt",
    "stun_alt",
    metavar="IP:PORT",
    help="Alternate STUN address (another IP and another port) for RFC 5780 NAT behaviour discovery.",
)
@click.option(
    "--max-clients",
    "max_clients",
    type=click.IntRange(1),
    default=20_000,
    show_default=True,
    help="Logged-in clients at once; one more is told OVERLOADED (and retries later).",
)
@click.option(
    "--max-pending-logins",
    "max_pending_logins",
    type=click.IntRange(1),
    default=1_000,
    show_default=True,
    help="Connections still logging in at once (each has --auth-timeout too).",
)
@click.option(
    "--auth-timeout",
    "auth_timeout",
    type=click.FloatRange(0.5, 120),
    default=10.0,
    show_default=True,
    help="Seconds a connection may take to log in.",
)
@click.option(
    "--auth-failures",
    "auth_failures",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Failed logins from one IP address within --auth-failure-window before it is turned away.",
)
@click.option(
    "--auth-failure-window",
    "auth_failure_window",
    type=click.FloatRange(1, 86400),
    default=60.0,
    show_default=True,
    help="Seconds over which failed logins per IP address are counted.",
)
@click.option(
    "--conn-rate",
    "conn_rate",
    type=click.FloatRange(0),
    default=20.0,
    show_default=True,
    help="New connections a second per IP address (bursts of --conn-burst); more get HTTP 429. 0: no limit.",
)
@click.option(
    "--stun-rate",
    "stun_rate",
    type=click.FloatRange(0, min_open=True),
    default=50.0,
    show_default=True,
    help="STUN requests a second per source IP address (bursts of --stun-burst); more are dropped unanswered.",
)
@click.option(
    "--stun-burst",
    "stun_burst",
    type=click.IntRange(1),
    default=200,
    show_default=True,
    help="STUN requests one source IP address may send at once before --stun-rate applies.",
)
@click.option(
    "--conn-burst",
    "conn_burst",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="New connections one IP address may open at once before --conn-rate applies.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def relay(
    listen: str,
    members: tuple[str, ...],
    cert: str | None,
    key: str | None,
    self_signed: str | None,
    insecure: bool,
    mtu: int | None,
    heartbeat: int | None,
    key_rotation: int | None,
    stun: str | None,
    stun_alt: str | None,
    max_clients: int,
    max_pending_logins: int,
    auth_timeout: float,
    auth_failures: int,
    auth_failure_window: float,
    conn_rate: float,
    conn_burst: int,
    stun_rate: float,
    stun_burst: int,
    verbose: bool,
) -> None:
    """Run the relay: login, pairing, end-to-end message forwarding, /metrics; optionally STUN."""
    from relay_server.ratelimit import RateLimiter
    from relay_server.server import RelayConfig, RelayError, run_relay
    from relay_server.stun_server import StunServer, StunServerError
    from relay_server.tls import TlsError, ensure_self_signed, server_ssl_context
    from transport.constants import MAX_MTU, MIN_MTU

    setup_logging(verbose)
    _hold_sighup()
    host, port = _split_hostport(listen, "--listen")
    if not members:
        raise UserError("no --members NETWORK:FILE given: the relay would admit nobody")
    try:
        # The same files, parser and errors serve SIGHUP's reload (relay_server.server.reload_members).
        members_files = dict(parse_members_spec(item) for item in members)
        networks = load_networks(members_files)
    except (ConfigError, IdentityError) as exc:
        raise UserError(str(exc)) from None
    modes = sum(bool(x) for x in (cert or key, self_signed, insecure))
    if modes != 1:
        raise UserError("choose exactly one of --cert/--key, --self-signed DIR or --insecure")
    try:
        if self_signed:
            cert_path, key_path, fingerprint = ensure_self_signed(Path(self_signed), host)
            click.echo(f"relay certificate: {cert_path} (clients pass it as --ca)", err=True)
            click.echo(f"certificate SHA-256 fingerprint: {fingerprint}", err=True)
            ssl_context = server_ssl_context(cert_path, key_path)
        elif cert or key:
            if not (cert and key):
                raise UserError("--cert and --key go together")
            ssl_context = server_ssl_context(Path(cert), Path(key))
        else:
            ssl_context = None
    except TlsError as exc:
        raise UserError(str(exc)) from None
    if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
        raise UserError(f"--mtu must be between {MIN_MTU} and {MAX_MTU}")
    overrides: dict[str, int | float] = {
        "max_clients": max_clients,
        "max_pending_logins": max_pending_logins,
        "auth_timeout": auth_timeout,
        "auth_failure_limit": auth_failures,
        "auth_failure_window": auth_failure_window,
        "connection_rate": conn_rate,
        "connection_burst": conn_burst,
    }
    if mtu is not None:
        overrides["mtu"] = mtu
    if heartbeat is not None:
        if not 1 <= heartbeat <= 3600:
            raise UserError("--heartbeat must be between 1 and 3600 seconds")
        overrides["heartbeat_interval"] = heartbeat
    if key_rotation is not None:
        if not 10 <= key_rotation <= 86400:
            raise UserError("--key-rotation must be between 10 and 86400 seconds")
        overrides["key_rotation_interval"] = key_rotation
    if stun_alt and not stun:
        raise UserError("--stun-alt needs --stun (the primary STUN address)")
    stun_server = None
    if stun:
        stun_primary = _split_hostport(stun, "--stun")
        stun_alternate = _split_hostport(stun_alt, "--stun-alt") if stun_alt else None
        if stun_primary[1] == 0 or (stun_alternate and stun_alternate[1] == 0):
            raise UserError("--stun and --stun-alt need a port (3478 is the usual one)")
        try:
            stun_server = StunServer(stun_primary, stun_alternate, limiter=RateLimiter(stun_rate, stun_burst))
        except StunServerError as exc:
            raise UserError(str(exc)) from None

    async def serve() -> None:
        # The STUN server shares the relay's event loop; it binds first so a taken UDP port
        # fails before any peer could connect.
        if stun_server is None:
            await run_relay(config, members_files=members_files)
            return
        await stun_server.start()
        try:
            await run_relay(config, extra_metrics=stun_server.metrics_lines, members_files=members_files)
        finally:
            await stun_server.close()

    try:
        config = RelayConfig(host=host, port=port, networks=networks, ssl=ssl_context, **overrides)
        _run(serve)
    except (RelayError, StunServerError) as exc:
        raise UserError(str(exc)) from None


# --- connect -------------------------------------------------------------------


@main.command()
@_config_option("connect")
@click.option("--relay", "relay_url", metavar="wss://HOST:PORT", help="The relay to join.")
@click.option("--ca", type=click.Path(dir_okay=False), help="The relay's certificate (its cert.pem) or CA bundle.")
@click.option("--network", help="Network name, e.g. chr-001.")
@click.option("--identity", type=click.Path(dir_okay=False), help="This node's identity file (traversal keygen).")
@click.option("--tap", default="tap0", show_default=True, help="Name of the TAP device to create.")
@click.option("--address", metavar="CIDR", help="Overlay address of this node, e.g. 10.10.10.3/24.")
@click.option(
    "--members",
    type=click.Path(dir_okay=False),
    help="Allow-list of peer public keys (pins membership). SIGHUP re-reads it: "
    "peers no longer listed are closed (BYE) and refused, newly listed ones accepted.",
)
@click.option("--psk", type=click.Path(dir_okay=False), help="Network pre-shared key file (traversal genpsk).")
@click.option("--control", type=click.Path(), help="Control socket path [default: /run/traversal/TAP.sock].")
@click.option("--insecure", is_flag=True, help="Allow a plain ws:// relay URL (testing only).")
@click.option("--stun", metavar="HOST:PORT", help="STUN server for candidates [default: the relay's host, port 3478].")
@click.option("--no-direct", "no_direct", is_flag=True, help="Stay on the relay: never try a direct path.")
@click.option(
    "--direct-timeout",
    "direct_timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds an attempt at a direct path may take before staying on the relay.",
)
@click.option(
    "--direct-retry",
    "direct_retry",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds between attempts at a direct path while on the relay.",
)
@click.option(
    "--relay-standby",
    "relay_standby",
    type=click.Choice(["close", "keep"]),
    default="close",
    show_default=True,
    help="Once every peer is direct: close the relay connection, or keep it idle.",
)
@click.option(
    "--relay-checkin",
    "relay_checkin",
    type=float,
    default=RELAY_CHECKIN_INTERVAL,
    show_default=True,
    help="Once the relay connection is closed, log in again this often (seconds; 0: never) to hear of new members.",
)
@click.option("--udp-ports", "udp_ports", metavar="LOW-HIGH", help="Local UDP port range for direct paths.")
@click.option(
    "--carriage",
    type=click.Choice(["lean", "quic"]),
    default="lean",
    show_default=True,
    help="How data travels on a direct path: sealed UDP datagrams (fast) or QUIC datagrams.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def connect(
    relay_url: str | None,
    ca: str | None,
    network: str | None,
    identity: str | None,
    tap: str,
    address: str | None,
    members: str | None,
    psk: str | None,
    control: str | None,
    insecure: bool,
    stun: str | None,
    no_direct: bool,
    direct_timeout: float,
    direct_retry: float,
    relay_standby: str,
    relay_checkin: float,
    udp_ports: str | None,
    carriage: str,
    verbose: bool,
) -> None:
    """Join a network through a relay and carry the TAP's Ethernet frames to its peers."""
    from traversal.node import Node, NodeConfig, NodeError
    from traversal.relay_client import RelayRefused, validate_relay_url

    setup_logging(verbose)
    _hold_sighup()
    missing = [
        flag
        for flag, value in (
            ("--relay", relay_url),
            ("--network", network),
            ("--identity", identity),
            ("--address", address),
        )
        if not value
    ]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (give them as flags or in the [connect] table of --config)")
    if not (relay_checkin == 0 or 10 <= relay_checkin <= 86400):
        raise UserError("--relay-checkin must be 0 (never) or between 10 and 86400 seconds")
    assert relay_url and network and identity and address
    try:
        validate_relay_url(relay_url, insecure)
    except RelayRefused as exc:
        raise UserError(exc.reason) from None
    if relay_url.startswith("wss:") and not ca:
        raise UserError(
            "--ca is required with wss:// (the relay's cert.pem, printed by `traversal relay --self-signed`)"
        )
    try:
        ipaddress.ip_interface(address)
    except ValueError:
        raise UserError(
            f"--address must be an address with prefix length, e.g. 10.10.10.3/24, got {address!r}"
        ) from None
    if "/" not in address:
        raise UserError(f"--address needs a prefix length, e.g. {address}/24")
    direct = _direct_settings(relay_url, stun, no_direct, direct_timeout, direct_retry, relay_standby, udp_ports)
    direct.carriage = carriage
    direct.checkin = relay_checkin
    try:
        config = NodeConfig(
            relay_url=relay_url,
            ca=Path(ca) if ca else None,
            network=network,
            identity=load_identity(Path(identity)),
            tap_name=tap,
            address=address,
            control_path=Path(control) if control else default_control_path(tap),
            members=load_members(Path(members)) if members else None,
            members_file=Path(members) if members else None,
            psk=load_psk(Path(psk)) if psk else None,
            insecure=insecure,
            direct=direct,
        )
    except IdentityError as exc:
        raise UserError(str(exc)) from None

    async def run() -> None:
        node = Node(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
        loop.add_signal_handler(signal.SIGHUP, node.reload_members)
        await node.run()

    try:
        _run(run)
    except NodeError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # TAP and control-socket errors carry their own advice
        from tap.device import TapError
        from traversal.control import ControlError as _ControlError

        if isinstance(exc, (TapError, _ControlError)):
            raise UserError(str(exc)) from None
        raise


def _hold_sighup() -> None:
    """SIGHUP means "re-read the members files" once the loop handles it; until then it must
    not end the process (a reload sent while the relay or node is still starting)."""
    with contextlib.suppress(ValueError, OSError):  # not the main thread (tests): nothing to hold
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _direct_settings(
    relay_url: str,
    stun: str | None,
    no_direct: bool,
    timeout: float,
    retry: float,
    standby: str,
    udp_ports: str | None,
) -> Any:
    from urllib.parse import urlsplit

    from traversal.direct import DirectSettings

    if not 0.5 <= timeout <= 120:
        raise UserError("--direct-timeout must be between 0.5 and 120 seconds")
    if not 1 <= retry <= 86400:
        raise UserError("--direct-retry must be between 1 and 86400 seconds")
    if stun:
        stun_server = _split_hostport(stun, "--stun")
    else:
        host = urlsplit(relay_url).hostname or ""
        stun_server = (host, 3478)
    port_range = None
    if udp_ports:
        low, sep, high = udp_ports.partition("-")
        if not sep or not low.isdigit() or not high.isdigit() or not 1024 <= int(low) <= int(high) <= 65535:
            raise UserError(f"--udp-ports must be LOW-HIGH within 1024-65535, e.g. 40000-40100, got {udp_ports!r}")
        port_range = (int(low), int(high))
    return DirectSettings(
        enabled=not no_direct,
        timeout=timeout,
        retry=retry,
        stun_server=stun_server,
        port_range=port_range,
        standby=standby,
    )


# --- status --------------------------------------------------------------------


@main.command()
@click.argument("where", type=click.Choice(["relay", "direct"]))
@click.option("--control", type=click.Path(), help="The node's control socket [default: the only one running].")
def path(where: str, control: str | None) -> None:
    """Move every peer to the relay (agreed with the peer, without loss), or try direct now.

    `path relay` keeps the peers on the relay until `path direct` (no direct retries meanwhile).
    """
    try:
        target = Path(control) if control else find_control_socket()
        reply = query(target, f"path {where}")
    except ControlError as exc:
        raise UserError(str(exc)) from None
    if "error" in reply:
        raise UserError(str(reply["error"]))
    peers = reply.get("peers", [])
    click.echo(f"asked {len(peers)} peer(s) to move to the {where} path: {', '.join(peers) or '-'}")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@main.command()
@click.option("--control", type=click.Path(), help="The node's control socket [default: the only one running].")
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
def status(control: str | None, as_json: bool) -> None:
    """Show what a running node is doing: relay, trust, and per peer path, endpoint, bytes, RTT."""
    try:
        path = Path(control) if control else find_control_socket()
        reply = query(path)
    except ControlError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    relay_info = reply.get("relay", {})
    click.echo(f"identity  {reply.get('identity')}")
    click.echo(f"network   {reply.get('network')}   trust: {reply.get('trust')}")
    click.echo(
        f"relay     {relay_info.get('url')}   {relay_info.get('state')}"
        + (f"   seen as {relay_info['observed']}" if relay_info.get("observed") else "")
        + (f"   last error: {relay_info['last_error']}" if relay_info.get("last_error") else "")
    )
    click.echo(f"members   {_members_summary(relay_info)}")
    tap_info = reply.get("tap", {})
    click.echo(f"tap       {tap_info.get('name')} {tap_info.get('address')} mtu {tap_info.get('mtu')}")
    peers = reply.get("peers", [])
    if not peers:
        click.echo("peers     none yet")
        return
    rows = [("PEER", "STATE", "PATH", "ENDPOINT", "RX", "TX", "RTT", "AGE")]
    for p in peers:
        rtt = f"{p['rtt_ms']:.1f} ms" if p.get("rtt_ms") is not None else "-"
        age = f"{p['session_age_s']:.0f} s" if p.get("session_age_s") is not None else "-"
        rows.append(
            (
                p.get("identity", "?"),
                p.get("state", "?"),
                p.get("path") or "-",
                p.get("endpoint") or "-",
                _fmt_bytes(p.get("rx_bytes")),
                _fmt_bytes(p.get("tx_bytes")),
                rtt,
                age,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    click.echo("")
    for row in rows:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    click.echo("")
    for p in peers:
        click.echo(f"{p.get('name', '?')}  {_direct_summary(p.get('direct'))}")
        for switch in (p.get("direct") or {}).get("history", [])[-5:]:
            click.echo(
                f"    {switch.get('at')}  -> {switch.get('path'):<6}  {switch.get('reason')}"
                f" ({switch.get('took_ms', 0):.0f} ms)"
            )


def _members_summary(relay_info: dict[str, Any]) -> str:
    """Who else is in the network, and whether the relay connection is still needed to hear of them."""
    known, missing = relay_info.get("members_known"), relay_info.get("members_missing")
    if known is None:
        return "not known (the relay's list has not come, or is too long): the relay connection stays"
    if not missing:
        return f"{known} other(s), all reached directly"
    return f"{known} other(s); not reached directly: {', '.join(missing)} (the relay connection stays for them)"


def _direct_summary(direct: dict[str, Any] | None) -> str:
    """One line on a peer's direct path: the pair and how long it took, or why not and when again."""
    if not direct:
        return "direct path: not tried (--no-direct here or at the peer)"
    attempts = direct.get("attempts", 0)
    if direct.get("state") == "direct":
        took = direct.get("time_to_direct_s")
        return (
            f"direct path: {direct.get('nominated')}"
            + (f", {took * 1000:.0f} ms after ESTABLISHED" if took is not None else "")
            + f" (attempt {attempts})"
        )
    line = f"direct path: {direct.get('state')}"
    if direct.get("last_error"):
        line += f"; last attempt failed: {direct['last_error']}"
    if direct.get("next_retry_in_s") is not None:
        line += f"; retry in {direct['next_retry_in_s']:.0f} s"
    return line + f" ({attempts} attempt{'s' if attempts != 1 else ''})"


# --- probe ---------------------------------------------------------------------


def _probe_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Eager --config for probe: the default --stun is ``stun`` in the [connect] table.

    The rest of [connect] belongs to `traversal connect`; its keys are accepted (and
    type-checked) here so one file serves both commands.
    """
    if value is None:
        return
    allowed = {"stun": str, **option_types(connect)}
    try:
        table = load_section(Path(value), "connect", allowed)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if "stun" in table:
        ctx.default_map = {**(ctx.default_map or {}), "stun": table["stun"]}


@main.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_probe_config,
    help='TOML file whose [connect] table may set stun = "HOST:PORT" (the flag wins).',
)
@click.option(
    "--stun", "stun", metavar="HOST:PORT", help="STUN server, ideally with RFC 5780 (traversal relay --stun)."
)
@click.option("--json", "as_json", is_flag=True, help='Print the result as JSON (stable keys, "version": 1).')
@click.option("--lifetime", is_flag=True, help="Also measure how long an idle UDP mapping lives (slow).")
@click.option(
    "--lifetime-max",
    "lifetime_max",
    type=click.FloatRange(1, 600),
    default=120.0,
    show_default=True,
    help="Longest idle time (s) --lifetime waits.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 30),
    default=2.0,
    show_default=True,
    help="Seconds to wait for each STUN answer (tests that expect none take this long).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def probe(stun: str | None, as_json: bool, lifetime: bool, lifetime_max: float, timeout: float, verbose: bool) -> None:
    """What NAT am I behind? UDP, public address, mapping, filtering, ports, hairpinning, verdict."""
    from traversal.probe import ProbeError, ProbeOptions, format_human, run_probe

    setup_logging(verbose)
    if not stun:
        raise UserError(
            "no STUN server: pass --stun HOST:PORT (e.g. the relay's --stun address) "
            "or set stun in the [connect] table of --config"
        )
    host, port = _split_hostport(stun, "--stun")
    if port == 0:
        raise UserError(f"--stun needs a port other than 0 (3478 is the usual one), got {stun!r}")
    options = ProbeOptions(host=host, port=port, timeout=timeout, lifetime=lifetime, lifetime_max=lifetime_max)
    try:
        result = asyncio.run(run_probe(options))
    except ProbeError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        raise UserError("interrupted") from None
    except OSError as exc:
        raise UserError(f"probe failed: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(format_human(result, lifetime_requested=lifetime))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
