"""`make demo`: build a NAT lab, start a relay and two peers behind NATs, ping across the overlay.

It narrates each step in plain words, shows the nodes' own log lines and
`traversal status`, and tears everything down at the end, on error and on
Ctrl-C. Everything happens inside network namespaces this script creates;
nothing touches the machine's real network.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"netns_lab_{name}", HERE / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lab_module = _load("lab")
overlay_module = _load("overlay")

INTERESTING = re.compile(
    r"event=(relay_listening|stun_listening|joined|handshake_done|established|path|candidates_sent|ice_nominated|"
    r"relay_released|relay_closed|bye_sent|peer_bye|tap_down|paired|released)"
)


BOLD, PLAIN = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def say(text: str) -> None:
    print(f"\n{BOLD}==> {text}{PLAIN}", flush=True)


def show_log(overlay: object, name: str, seen: dict[str, int]) -> None:
    """Print the new interesting lines of a process log, indented."""
    lines = overlay.log_text(name).splitlines()  # type: ignore[attr-defined]
    start = seen.get(name, 0)
    for line in lines[start:]:
        if INTERESTING.search(line):
            print(f"    [{name}] {line}")
    seen[name] = len(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nat-a", default="cone", choices=lab_module.PROFILES)
    parser.add_argument("--nat-b", default="cone", choices=lab_module.PROFILES)
    parser.add_argument("--keep", action="store_true", help="keep the work directory with logs and keys")
    parser.add_argument(
        "--no-delay", dest="delay", action="store_false", help="no link delay (default: the seed's geography)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("make demo needs root: it creates network namespaces, NATs and TAP devices", file=sys.stderr)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="traversal-demo-"))
    # The seed's geography: UK -> Frankfurt relay -> Belgium is ~80 ms round trip,
    # UK <-> Belgium direct ~30 ms (see netns-lab/README.md for the arithmetic).
    delays = dict(lab_module.SEED_GEOGRAPHY) if args.delay else {}
    lab = lab_module.Lab(nat_a=args.nat_a, nat_b=args.nat_b, **delays)
    overlay = overlay_module.Overlay(lab, workdir)
    seen: dict[str, int] = {}
    started = time.monotonic()
    try:
        say(f"Building the NAT lab (namespaces {lab.prefix}-*)")
        lab.up()
        print(f"    relay 'on the internet' at {overlay_module.RELAY_IP}")
        for peer in ("a", "b"):
            print(
                f"    peer {peer.upper()}: host {lab.host_address(peer)} behind a {args.__dict__['nat_' + peer]} NAT"
                f" whose public address is {lab.public_address(peer)}"
            )

        say("Creating identities (Ed25519) for peers A and B and the network chr-001's member list")
        for name in ("a", "b"):
            print(f"    {name}: {overlay.keygen(name)}")
        members = overlay.write_members(["a", "b"])

        say(f"Starting the relay in the WAN namespace (wss://{overlay_module.RELAY_IP}:{overlay_module.RELAY_PORT})")
        overlay.start_relay(members)
        show_log(overlay, "relay", seen)

        say("Starting peer A (10.10.10.3) and peer B (10.10.10.4), each behind its NAT")
        print("    each logs in to the relay, which pairs them; they run an end-to-end hybrid")
        print("    X25519 + ML-KEM-768 handshake through it (the relay only forwards the bytes),")
        print("    then trade ICE candidates (sealed end to end), punch through both NATs and")
        print("    move onto a direct QUIC path; the relay connection is then closed")
        overlay.start_peer("a", "a", extra=["--members", str(members)])
        overlay.start_peer("b", "b", extra=["--members", str(members)])
        overlay.wait_established("a", "a", timeout=45)
        pinger = subprocess.Popen(
            lab.exec_argv("host-a", ["ping", "-c", "16", "-i", "0.25", "-W", "2", "10.10.10.4"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        went_direct = True
        try:
            for name in ("a", "b"):
                overlay.wait_path(name, name, "direct", timeout=12)
        except overlay_module.OverlayError:
            went_direct = False  # e.g. symrand x symrand: no direct path exists between these NATs
        for name in ("a", "b", "relay"):
            show_log(overlay, name, seen)
        if not went_direct:
            say("No direct path between these two NATs: the traffic stays on the relay, and the direct path is retried")

        say("Pinging 10.10.10.4 from peer A over the TAP overlay, across the switch to the direct path")
        if args.delay:
            print("    the lab emulates the seed's geography: ~80 ms round trip through the relay, ~30 ms direct")
        output, _ = pinger.communicate(timeout=60)
        print("    " + output.strip().replace("\n", "\n    "))
        ok = pinger.returncode == 0

        say("traversal status on peer A")
        status = subprocess.run(
            lab.exec_argv("host-a", [*overlay_module.TRAVERSAL, "status", "--control", str(overlay.control("a"))]),
            capture_output=True,
            text=True,
            timeout=15,
        )
        print("    " + status.stdout.replace("\n", "\n    ").rstrip())

        metrics = overlay.metrics()
        forwarded = metrics.get("traversal_relay_forwarded_bytes_total", 0)
        connected = metrics.get("traversal_relay_clients_connected", 0)
        say(f"The relay forwarded {forwarded:.0f} encrypted bytes in all, and now holds {connected:.0f} connections")
        if went_direct:
            print("    a matchmaker, not a middleman: once the peers are direct it carries nothing")

        say("Stopping the peers with Ctrl-C (they say BYE to each other), then the relay")
        for name in ("a", "b"):
            code = overlay.stop(name)
            print(f"    peer {name.upper()} exited with status {code}")
        for name in ("a", "b"):
            show_log(overlay, name, seen)
        overlay.stop("relay")
        say(
            f"Demo {'succeeded' if ok else 'FAILED'} in {time.monotonic() - started:.1f}s: "
            + (
                ("peers A and B went from the relay to a direct path" if went_direct else "the relay carried it all")
                if ok
                else "the ping did not get through"
            )
        )
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted: tearing the lab down")
        return 130
    except (overlay_module.OverlayError, lab_module.LabError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        print(f"logs are in {workdir}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        overlay.stop_all()
        lab.down()
        print(f"    lab {lab.prefix} removed")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
