"""`traversal probe` against every NAT profile of the lab, cross-checked with coturn.

Per profile one lab (peer a behind the profile's NAT) carries three checks:

1. our STUN server, started the production way (`traversal relay --stun --stun-alt` in the
   WAN namespace), probed by `traversal probe --json` from host-a: the profile's true
   mapping, filtering, port allocation and RFC 3489 name;
2. coturn's `turnutils_natdiscovery -m -f` from host-a against the same server agrees;
3. coturn's own `turnserver` (two listening IPs, RFC 5780) in the WAN namespace gives our
   probe the same verdicts as our server does.

Every wait is bounded (process timeouts, readiness polled against a deadline); the lab and
every process in it are torn down by ``lab_factory`` whatever happens.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from transport.identity import encode_public, generate_identity, public_bytes

pytestmark = [pytest.mark.lab, pytest.mark.timeout(60)]

EIM = "endpoint-independent"
APD = "address-and-port-dependent"
OUR_STUN = ("203.0.113.1", 3478)
OUR_STUN_ALT = ("203.0.113.2", 3479)
# coturn listens on other ports, so both servers can run side by side.
COTURN_PORT, COTURN_ALT_PORT = 3480, 3481
RELAY_LISTEN = "203.0.113.1:8443"
SYMSEQ_DELTA = 7
PROBE_TIMEOUT = "1.0"

#: What each profile truly is (netns-lab/README.md), in the probe's terms.
EXPECTED: dict[str, dict[str, Any]] = {
    "public": {"udp": True, "nat": False, "mapping": EIM, "filtering": EIM, "allocation": "preserving",
               "rfc3489": "open-internet", "hairpinning": True},
    "fullcone": {"udp": True, "nat": True, "mapping": EIM, "filtering": EIM, "allocation": "preserving",
                 "rfc3489": "full-cone", "hairpinning": False},
    "cone": {"udp": True, "nat": True, "mapping": EIM, "filtering": APD, "allocation": "preserving",
             "rfc3489": "port-restricted-cone", "hairpinning": False},
    "symseq": {"udp": True, "nat": True, "mapping": APD, "filtering": APD, "allocation": "sequential",
               "delta": SYMSEQ_DELTA, "rfc3489": "symmetric", "hairpinning": False},
    "symrand": {"udp": True, "nat": True, "mapping": APD, "filtering": APD, "allocation": "random",
                "rfc3489": "symmetric", "hairpinning": False},
    "udpblock": {"udp": False, "nat": None, "mapping": None, "filtering": None, "allocation": None,
                 "rfc3489": "udp-blocked", "hairpinning": None},
    "double": {"udp": True, "nat": True, "mapping": EIM, "filtering": APD, "allocation": "preserving",
               "rfc3489": "port-restricted-cone", "hairpinning": False},
}  # fmt: skip

#: The keys that must agree between our server and coturn's for the same NAT.
VERDICT_KEYS = (
    "udp", "nat", "rfc5780", "public_ipv4", "mapping", "filtering", "allocation", "delta", "rfc3489", "verdict",
)  # fmt: skip

_NATDISCOVERY_TERMS = {
    "Endpoint Independent": EIM,
    "Address Dependent": "address-dependent",
    "Address and Port Dependent": APD,
}


def parse_natdiscovery(output: str) -> tuple[str | None, str | None]:
    """(mapping, filtering) from `turnutils_natdiscovery -m -f` output, None where it found none."""
    found: dict[str, str | None] = {"Mapping": None, "Filtering": None}
    for kind in found:
        match = re.search(
            rf"NAT with (Endpoint Independent|Address and Port Dependent|Address Dependent) {kind}!", output
        )
        if match:
            found[kind] = _NATDISCOVERY_TERMS[match.group(1)]
        elif kind == "Mapping" and "No NAT! (Endpoint Independent Mapping)" in output:
            found[kind] = EIM
    return found["Mapping"], found["Filtering"]


def test_parse_natdiscovery() -> None:
    sample = (
        "-= Mapping Behavior Discovery =-\n...\nNAT with Endpoint Independent Mapping!\n"
        "-= Filtering Behavior Discovery =-\n...\nNAT with Address and Port Dependent Filtering!\n"
    )
    assert parse_natdiscovery(sample) == (EIM, APD)
    assert parse_natdiscovery("STUN receive timeout..\n") == (None, None)


def _wait_udp_listening(lab: Any, addresses: list[tuple[str, int]], proc: Any, log: Path, timeout: float) -> None:
    """Poll `ss` in the WAN namespace until every address has a UDP socket (bounded)."""
    wanted = {f"{ip}:{port}" for ip, port in addresses}
    deadline = time.monotonic() + timeout
    while True:
        listening = {line.split()[3] for line in lab.run("wan", "ss", "-Hlun").stdout.splitlines() if line.strip()}
        if wanted <= listening:
            return
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not listening on {sorted(wanted - listening)} after {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


def _start_relay_with_stun(lab: Any, workdir: Path) -> Path:
    """`traversal relay ... --stun --stun-alt` in the WAN namespace; returns its log file."""
    members = workdir / "members.txt"
    members.write_text(encode_public(public_bytes(generate_identity())) + "\n")
    log = workdir / "relay.log"
    argv = [
        sys.executable, "-m", "traversal", "relay", "--listen", RELAY_LISTEN, "--insecure",
        "--members", f"lab:{members}",
        "--stun", f"{OUR_STUN[0]}:{OUR_STUN[1]}", "--stun-alt", f"{OUR_STUN_ALT[0]}:{OUR_STUN_ALT[1]}",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = lab.popen("wan", argv, stdout=out, stderr=out)
    combos = [(OUR_STUN[0], OUR_STUN[1]), (OUR_STUN[0], OUR_STUN_ALT[1]),
              (OUR_STUN_ALT[0], OUR_STUN[1]), (OUR_STUN_ALT[0], OUR_STUN_ALT[1])]  # fmt: skip
    _wait_udp_listening(lab, combos, proc, log, timeout=15)
    deadline = time.monotonic() + 15
    while "event=relay_listening" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, f"relay did not start:\n{log.read_text()}"
        time.sleep(0.05)
    return log


def _start_coturn(lab: Any, workdir: Path) -> None:
    """coturn's turnserver, STUN only, on both WAN addresses (RFC 5780 needs two IPs and
    two ports: --listening-ip twice, --listening-port and --alt-listening-port)."""
    conf = workdir / "turnserver.conf"
    conf.write_text(
        "\n".join(
            [
                f"listening-ip={OUR_STUN[0]}",
                f"listening-ip={OUR_STUN_ALT[0]}",
                f"listening-port={COTURN_PORT}",
                f"alt-listening-port={COTURN_ALT_PORT}",
                "stun-only",
                "no-cli",
                "no-tls",
                "no-dtls",
                "log-file=stdout",
                "simple-log",
                f"pidfile={workdir / 'turnserver.pid'}",
                "",
            ]
        )
    )
    log = workdir / "turnserver.log"
    with open(log, "w") as out:
        proc = lab.popen("wan", ["turnserver", "-c", str(conf)], stdout=out, stderr=out)
    combos = [(ip, port) for ip in (OUR_STUN[0], OUR_STUN_ALT[0]) for port in (COTURN_PORT, COTURN_ALT_PORT)]
    _wait_udp_listening(lab, combos, proc, log, timeout=15)


def _probe(lab: Any, port: int, *extra: str, timeout: float = 30) -> dict[str, Any]:
    argv = [sys.executable, "-m", "traversal", "probe", "--stun", f"{OUR_STUN[0]}:{port}", "--json"]
    proc = lab.run("host-a", *argv, "--timeout", PROBE_TIMEOUT, *extra, check=False, timeout=timeout)
    assert proc.returncode == 0, f"probe exited {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def _metrics(lab: Any) -> dict[str, float]:
    url = f"http://{RELAY_LISTEN}/metrics"
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    text = lab.run("wan", sys.executable, "-c", fetch).stdout
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _assert_profile(result: dict[str, Any], profile: str, lab: Any, server: str) -> None:
    expected = EXPECTED[profile]
    got = {key: result[key] for key in expected}
    assert got == {**expected, **({"delta": lab.symseq_delta} if profile == "symseq" else {})}, (
        f"{profile} against {server}: {json.dumps(result, indent=2)}"
    )
    assert result["version"] == 1
    if expected["udp"]:
        assert result["rfc5780"] is True
        assert result["public_ipv4"] == lab.public_address("a")
    else:
        assert result["public_ipv4"] is None and result["notes"], result


@pytest.mark.parametrize("profile", list(EXPECTED))
def test_probe_classifies_profile(lab_factory: Any, lab_module: ModuleType, tmp_path: Path, profile: str) -> None:
    # coturn is part of the lab's prerequisites (Makefile APT_PACKAGES): missing, it fails loudly.
    missing = [tool for tool in ("turnserver", "turnutils_natdiscovery") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} not found: install coturn (make system-packages does)"
    lab = lab_factory(nat_a=profile, nat_b="cone", symseq_delta=SYMSEQ_DELTA)
    _start_relay_with_stun(lab, tmp_path)
    _start_coturn(lab, tmp_path)

    # 1. Our server, through the relay CLI.
    ours = _probe(lab, OUR_STUN[1])
    _assert_profile(ours, profile, lab, "our STUN server")
    if profile == "symseq":
        assert lab.symseq_delta == SYMSEQ_DELTA

    # 2. coturn's natdiscovery agrees with our classification against the same server.
    nd = lab.run(
        "host-a", "turnutils_natdiscovery", "-m", "-f", "-p", str(OUR_STUN[1]), OUR_STUN[0], check=False, timeout=30
    )
    assert parse_natdiscovery(nd.stdout) == (ours["mapping"], ours["filtering"]), nd.stdout
    if not ours["udp"]:
        assert "STUN receive timeout" in nd.stdout, nd.stdout

    # 3. Our probe against coturn's turnserver gives the same verdicts.
    theirs = _probe(lab, COTURN_PORT)
    assert {k: theirs[k] for k in VERDICT_KEYS} == {k: ours[k] for k in VERDICT_KEYS}, (ours, theirs)
    if ours["udp"]:
        assert theirs["other_address"] == f"{OUR_STUN_ALT[0]}:{COTURN_ALT_PORT}"

    # The STUN server's counters are on the relay's /metrics.
    metrics = _metrics(lab)
    if ours["udp"]:
        assert metrics["traversal_stun_requests_total"] >= 6
        assert metrics["traversal_stun_change_requests_total"] >= 2
    else:
        assert metrics["traversal_stun_requests_total"] == 0
    assert metrics["traversal_stun_rfc5780"] == 1


def test_probe_measures_mapping_lifetime(lab_factory: Any, tmp_path: Path) -> None:
    """--lifetime with a NAT whose UDP mappings idle out after 4 s (conntrack, in nat-a only)."""
    lab = lab_factory(nat_a="cone", nat_b="cone")
    lab.run("nat-a", "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=4")
    _start_relay_with_stun(lab, tmp_path)
    started = time.monotonic()
    result = _probe(lab, OUR_STUN[1], "--lifetime", "--lifetime-max", "8")
    # Checked after 1, 2, 3, 5 s idle: alive at 3, gone at 5; the probe stops at the first loss.
    assert (result["lifetime_s"], result["lifetime_upper_s"]) == (3, 5), result
    assert time.monotonic() - started < 15
    assert result["mapping"] == EIM and result["filtering"] == APD
