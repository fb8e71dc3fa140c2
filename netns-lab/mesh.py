"""Multi-site NAT lab: N sites on one closed WAN, each a NAT with its own profile and one or more hosts.

The two-site :class:`Lab` of ``lab.py`` has peers a and b; a full mesh (issue 8) needs more.
:class:`MeshLab` builds the same kind of world from the same parts (lab.py's rulesets, naming
scheme, state directory and teardown), so ``make lab-down`` removes a mesh too, and it offers
the API :class:`overlay.Overlay` drives (``run``, ``popen``, ``host_address``, ``public_address``,
roles ``wan`` and ``host-<peer>``, plus ``overlay_address``). Peers are ``p1``, ``p2``, ... in
site order; sites are ``s1``, ``s2``, ...::

    P-host-pN  eth0 192.168.K.(1+j)/24, default via 192.168.K.1     (j-th host of site K)
        |         (several hosts: nat lan0 is a bridge, one port per host)
    P-nat-sK   lan0 192.168.K.1/24   wan0 203.0.113.(10+K)/24      (nftables NAT, per profile)
        |
    P-wan      br0 203.0.113.1/24 + 203.0.113.2/24                  (relay / STUN, as in lab.py)

``double`` puts ``P-cgn-sK`` between the NAT and the WAN (cgn wan0 203.0.113.(10+K), cgn lan0
100.64.K.1/24, nat wan0 100.64.K.2/24). ``public`` makes ``P-nat-sK`` a plain bridge and gives
host pN 203.0.113.(100+N)/24. The overlay address of pN is 10.10.10.(10+N)/24. ``fullcone``
sites take one host (its ruleset forwards every mapped port to that host); ``dualstack``
and link delays are the two-site lab's alone.

Hosts behind one NAT share a LAN, so they meet on host candidates whatever the profile (the
LAN is a switch: their traffic never crosses the NAT's rules).

    python netns-lab/mesh.py up --sites cone,symseq,symrand,udpblock   # prints prefix and addresses
    python netns-lab/mesh.py up --sites cone:3,symseq:2 --prefix tvm1  # 3 hosts behind the cone NAT
    python netns-lab/mesh.py down --prefix tvm1                         # or: make lab-down
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import secrets
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


def _load_lab() -> ModuleType:
    """lab.py, the same module object whoever loaded it first (the tests, the bench, a script),
    so LabError and the helpers are shared."""
    for name in ("traversal_netns_lab", "netns_lab_lab", "lab"):
        module = sys.modules.get(name)
        if module is not None and Path(getattr(module, "__file__", "") or "").name == "lab.py":
            return module
    path = Path(__file__).resolve().with_name("lab.py")
    spec = importlib.util.spec_from_file_location("netns_lab_lab", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lab = _load_lab()
LabError = lab.LabError

#: Profiles a mesh site can have (lab.py's, less dualstack: its IPv6 routing is two-site only).
MESH_PROFILES = tuple(p for p in lab.PROFILES if p != "dualstack")
#: The naming scheme (lab.MESH_ROLE_PATTERNS) and the addressing plan allow this many.
MAX_SITES = 40
MAX_PEERS = 64
#: The lab's overlay network; peer pN gets 10.10.10.(OVERLAY_HOST_BASE + N).
OVERLAY_PREFIX = "10.10.10"
OVERLAY_HOST_BASE = 10

#: Profiles whose NAT filters inbound packets by address and port (lab.py's profile table). A
#: random symmetric NAT facing one of them cannot be punched: see tests/lab/test_direct_matrix.py.
ADDRESS_AND_PORT_FILTERING = frozenset({"cone", "symrand", "symseq", "udpblock", "double"})


@dataclass(frozen=True)
class Site:
    """One site: a NAT of ``profile`` with ``hosts`` hosts behind it."""

    profile: str
    hosts: int = 1

    @classmethod
    def parse(cls, text: str) -> Site:
        """``"cone"`` or ``"cone:3"`` (three hosts behind one cone NAT)."""
        profile, _, count = text.strip().partition(":")
        try:
            return cls(profile, int(count) if count else 1)
        except ValueError:
            raise LabError(f"bad site {text!r}: write PROFILE or PROFILE:HOSTS, e.g. cone:3") from None


def predicted_path(
    profile_a: str,
    profile_b: str,
    *,
    same_lan: bool,
    direct_pairs: Iterable[tuple[str, str]],
    relay_pairs: Iterable[tuple[str, str]],
) -> str | None:
    """The path the direct-path matrix predicts for two peers: "direct", "relay" or None (unknown).

    ``direct_pairs`` and ``relay_pairs`` are the matrix's lists (tests/lab/test_direct_matrix.py),
    read in either order. A pair they do not list gets the matrix's stated rule for staying on
    the relay, "UDP blocked on one side, or a random symmetric NAT facing one that filters by
    address and port", and None if that rule does not apply either. Two hosts on one LAN meet
    on host candidates (the matrix's shared-NAT case), whatever their NAT.
    """
    if same_lan:
        return "direct"
    pair = {(profile_a, profile_b), (profile_b, profile_a)}
    if pair & set(direct_pairs):
        return "direct"
    if pair & set(relay_pairs):
        return "relay"
    if "udpblock" in (profile_a, profile_b):
        return "relay"
    for one, other in ((profile_a, profile_b), (profile_b, profile_a)):
        if one == "symrand" and other in ADDRESS_AND_PORT_FILTERING:
            return "relay"
    return None


class MeshLab(lab.NamespaceSet):
    """One multi-site lab. ``MeshLab(["cone", "symseq:2"])`` plans names and addresses; ``up()``
    builds it, ``down()`` (idempotent) kills every process inside and deletes the namespaces."""

    def __init__(
        self,
        sites: Sequence[Site | str],
        *,
        prefix: str | None = None,
        symseq_delta: int = 1,
        state_dir: Path | None = None,
    ) -> None:
        self.sites = [s if isinstance(s, Site) else Site.parse(s) for s in sites]
        if not 1 <= len(self.sites) <= MAX_SITES:
            raise LabError(f"a mesh has 1 to {MAX_SITES} sites, not {len(self.sites)}")
        for k, site in enumerate(self.sites, start=1):
            if site.profile not in MESH_PROFILES:
                raise LabError(f"site s{k}: profile {site.profile!r} is not one of {', '.join(MESH_PROFILES)}")
            if site.hosts < 1 or (site.profile == "fullcone" and site.hosts != 1):
                raise LabError(f"site s{k}: {site.hosts} hosts; a site has at least one, a fullcone site exactly one")
        self.prefix = prefix if prefix is not None else "tv" + secrets.token_hex(2)
        if not lab.PREFIX_RE.match(self.prefix):
            raise LabError(f"bad prefix {self.prefix!r}: use 'tv' followed by 1-12 lowercase letters or digits")
        self.symseq_delta = symseq_delta
        self.state_dir = state_dir if state_dir is not None else lab.STATE_DIR
        #: Peer names in site order, and the site ("s1", ...) of each.
        self.peers: list[str] = []
        self.site_of: dict[str, str] = {}
        self.profiles: dict[str, str] = {}  # by site
        for k, site in enumerate(self.sites, start=1):
            self.profiles[f"s{k}"] = site.profile
            for _ in range(site.hosts):
                peer = f"p{len(self.peers) + 1}"
                self.peers.append(peer)
                self.site_of[peer] = f"s{k}"
        if len(self.peers) > MAX_PEERS:
            raise LabError(f"a mesh has at most {MAX_PEERS} peers, not {len(self.peers)}")
        self._procs: list[subprocess.Popen[Any]] = []
        self._up = False
        self.addresses = self._plan_addresses()

    # -- naming and addressing ------------------------------------------------------------

    def site_peers(self, site: str) -> list[str]:
        return [p for p in self.peers if self.site_of[p] == site]

    def profile(self, peer: str) -> str:
        """The NAT profile in front of ``peer``."""
        return self.profiles[self.site_of[peer]]

    def same_lan(self, peer: str, other: str) -> bool:
        return self.site_of[peer] == self.site_of[other]

    @property
    def roles(self) -> tuple[str, ...]:
        sites = [f"nat-{s}" for s in self.profiles] + [f"cgn-{s}" for s, p in self.profiles.items() if p == "double"]
        return ("wan", *sites, *(f"host-{p}" for p in self.peers))

    def ns(self, role: str) -> str:
        """Namespace name of ``role`` (e.g. "host-p3" -> "tv1a2b-host-p3")."""
        if role not in self.roles:
            raise LabError(f"no role {role!r} in this mesh: roles are wan, nat-sK, cgn-sK (double), host-pN")
        return f"{self.prefix}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(role) for role in self.roles]

    def _plan_addresses(self) -> dict[str, list[str]]:
        plan: dict[str, list[str]] = {"wan": [f"{a}/{lab.WAN_PREFIXLEN}" for a in lab.RELAY_ADDRESSES]}
        for k, (site, profile) in enumerate(self.profiles.items(), start=1):
            wan = f"203.0.113.{10 + k}/{lab.WAN_PREFIXLEN}"
            peers = self.site_peers(site)
            if profile == "public":
                plan[f"nat-{site}"] = [wan]
                for peer in peers:
                    plan[f"host-{peer}"] = [f"203.0.113.{100 + int(peer[1:])}/{lab.WAN_PREFIXLEN}"]
                continue
            if profile == "double":
                plan[f"cgn-{site}"] = [wan, f"100.64.{k}.1/24"]
                plan[f"nat-{site}"] = [f"100.64.{k}.2/24", f"192.168.{k}.1/24"]
            else:
                plan[f"nat-{site}"] = [wan, f"192.168.{k}.1/24"]
            for j, peer in enumerate(peers, start=2):
                plan[f"host-{peer}"] = [f"192.168.{k}.{j}/24"]
        return plan

    def host_address(self, peer: str) -> str:
        """The host's own address (what its sockets bind to)."""
        return self.addresses[f"host-{peer}"][0].split("/")[0]

    def public_address(self, peer: str) -> str:
        """The address the WAN sees for traffic from this peer's host (its mapped address)."""
        site = self.site_of[peer]
        if self.profiles[site] == "public":
            return self.host_address(peer)
        outer = f"cgn-{site}" if self.profiles[site] == "double" else f"nat-{site}"
        return self.addresses[outer][0].split("/")[0]

    def overlay_address(self, peer: str) -> str:
        """The peer's TAP address, as CIDR (what ``traversal connect --address`` takes)."""
        return f"{OVERLAY_PREFIX}.{OVERLAY_HOST_BASE + int(peer[1:])}/24"

    def _build(self) -> None:
        for ns in self.namespaces:
            lab._run(["ip", "netns", "add", ns])
            lab._run(["ip", "-n", ns, "link", "set", "lo", "up"])
        wan = self.ns("wan")
        lab._run(["ip", "-n", wan, "link", "add", "br0", "type", "bridge"])
        for cidr in self.addresses["wan"]:
            lab._run(["ip", "-n", wan, "addr", "add", cidr, "dev", "br0"])
        lab._run(["ip", "-n", wan, "link", "set", "br0", "up"])
        for site in self.profiles:
            self._build_site(site)

    def _bridge(self, ns: str, name: str, ports: Iterable[str]) -> None:
        lab._run(["ip", "-n", ns, "link", "add", name, "type", "bridge"])
        for port in ports:
            lab._run(["ip", "-n", ns, "link", "set", port, "master", name])
        lab._run(["ip", "-n", ns, "link", "set", name, "up"])
        # With br_netfilter loaded, bridged frames would cross this namespace's forward chain
        # (policy drop), so hosts on one LAN could not talk: keep the bridge a plain switch.
        lab._run(
            ["ip", "netns", "exec", ns, "sh", "-c",
             "test ! -e /proc/sys/net/bridge || sysctl -qw net.bridge.bridge-nf-call-iptables=0"]
        )  # fmt: skip

    def _build_site(self, site: str) -> None:
        profile = self.profiles[site]
        wan, nat = self.ns("wan"), self.ns(f"nat-{site}")
        peers = self.site_peers(site)
        outer = self.ns(f"cgn-{site}") if profile == "double" else nat
        self._veth(outer, "wan0", wan, f"port-{site}")
        lab._run(["ip", "-n", wan, "link", "set", f"port-{site}", "master", "br0"])
        # One host: a veth straight to it, as in lab.py. Several: lan0 becomes a bridge
        # with a port per host (the rulesets match "lan0", so they are unchanged).
        single = len(peers) == 1
        ports = []
        for i, peer in enumerate(peers):
            port = "lan0" if single else f"lanp{i}"
            self._veth(nat, port, self.ns(f"host-{peer}"), "eth0")
            ports.append(port)
        for ns in {outer, nat}:
            self._sysctl(ns, "net.ipv4.ip_forward=1")
        if profile == "public":
            # A modem in bridge mode: the hosts sit on the WAN segment with their own addresses.
            self._bridge(nat, "br0", ["wan0", *ports])
            lab._run(["ip", "-n", nat, "addr", "add", self.addresses[f"nat-{site}"][0], "dev", "br0"])
            for peer in peers:
                host, cidr = self.ns(f"host-{peer}"), self.addresses[f"host-{peer}"][0]
                lab._run(["ip", "-n", host, "addr", "add", cidr, "dev", "eth0"])
            return
        if not single:
            self._bridge(nat, "lan0", ports)
        nat_wan, nat_lan = self.addresses[f"nat-{site}"]
        if profile == "double":
            cgn_wan, cgn_lan = self.addresses[f"cgn-{site}"]
            self._veth(outer, "lan0", nat, "wan0")
            lab._run(["ip", "-n", outer, "addr", "add", cgn_wan, "dev", "wan0"])
            lab._run(["ip", "-n", outer, "addr", "add", cgn_lan, "dev", "lan0"])
            lab._run(["ip", "netns", "exec", outer, "nft", "-f", "-"], input=lab.ruleset_cone())
            lab._run(["ip", "-n", nat, "addr", "add", nat_wan, "dev", "wan0"])
            lab._run(["ip", "-n", nat, "route", "add", "default", "via", cgn_lan.split("/")[0]])
        else:
            lab._run(["ip", "-n", nat, "addr", "add", nat_wan, "dev", "wan0"])
        lab._run(["ip", "-n", nat, "addr", "add", nat_lan, "dev", "lan0"])
        gateway = nat_lan.split("/")[0]
        for peer in peers:
            host = self.ns(f"host-{peer}")
            lab._run(["ip", "-n", host, "addr", "add", self.addresses[f"host-{peer}"][0], "dev", "eth0"])
            lab._run(["ip", "-n", host, "route", "add", "default", "via", gateway])
        lab._run(["ip", "netns", "exec", nat, "nft", "-f", "-"], input=self._ruleset(site))

    def _ruleset(self, site: str) -> str:
        profile = self.profiles[site]
        wan_address = self.addresses[f"nat-{site}"][0].split("/")[0]
        if profile in ("cone", "double"):
            return str(lab.ruleset_cone())
        if profile == "fullcone":
            return str(lab.ruleset_fullcone(wan_address, self.host_address(self.site_peers(site)[0])))
        if profile == "symrand":
            return str(lab.ruleset_symrand())
        if profile == "symseq":
            return str(lab.ruleset_symseq(wan_address, lab.SYMSEQ_BASE_PORT, self.symseq_delta))
        if profile == "udpblock":
            return str(lab.ruleset_udpblock())
        raise LabError(f"no ruleset for profile {profile!r}")

    # -- state ----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What ``lab.py status`` and :meth:`attach` read back (``kind`` tells it from a two-site lab)."""
        return {
            "kind": "mesh",
            "prefix": self.prefix,
            "symseq_delta": self.symseq_delta,
            "sites": [
                {"name": site, "profile": profile, "peers": self.site_peers(site)}
                for site, profile in self.profiles.items()
            ],
            "namespaces": {role: self.ns(role) for role in self.roles},
            "addresses": self.addresses,
            "public": {p: self.public_address(p) for p in self.peers},
            "overlay": {p: self.overlay_address(p) for p in self.peers},
            "relay": list(lab.RELAY_ADDRESSES),
        }

    def _write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / f"{self.prefix}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def attach(cls, prefix: str, *, state_dir: Path | None = None) -> MeshLab:
        """A MeshLab object for a mesh another process brought up (from its state file)."""
        state_dir = state_dir if state_dir is not None else lab.STATE_DIR
        path = state_dir / f"{prefix}.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise LabError(f"no lab with prefix {prefix!r} (no {path}); see `lab.py status`") from exc
        if state.get("kind") != "mesh":
            raise LabError(f"lab {prefix} is a two-site lab: use netns-lab/lab.py")
        sites = [Site(s["profile"], len(s["peers"])) for s in state["sites"]]
        mesh = cls(sites, prefix=prefix, symseq_delta=state.get("symseq_delta", 1), state_dir=state_dir)
        mesh._up = True
        return mesh


def pair_names(peers: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of ``peers``, in order: (p1, p2), (p1, p3), ..., (p2, p3), ..."""
    return [(a, b) for i, a in enumerate(peers) for b in peers[i + 1 :]]


def _print(state: Mapping[str, Any]) -> None:
    print(f"mesh {state['prefix']}: {len(state['sites'])} sites, {len(state['public'])} peers")
    print(f"  relay/STUN (wan): {', '.join(state['relay'])}")
    for site in state["sites"]:
        nat = state["namespaces"]["nat-" + site["name"]]
        print(f"  {site['name']:4} {site['profile']:9} {nat}")
        for peer in site["peers"]:
            host = state["addresses"][f"host-{peer}"][0]
            print(f"       {peer:4} {host:18} seen as {state['public'][peer]:15} overlay {state['overlay'][peer]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a mesh and leave it running")
    up.add_argument("--sites", required=True, help="comma-separated PROFILE[:HOSTS], e.g. cone:2,symseq,udpblock")
    up.add_argument("--prefix", help="namespace prefix (default: tv + 4 random hex digits)")
    up.add_argument("--symseq-delta", type=int, default=1)
    up.add_argument("--json", action="store_true", help="print the mesh as JSON")
    down = sub.add_parser("down", help="tear a mesh down (make lab-down removes every lab)")
    down.add_argument("--prefix", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            mesh = MeshLab(args.sites.split(","), prefix=args.prefix, symseq_delta=args.symseq_delta).up()
            if args.json:
                print(json.dumps(mesh.state(), indent=2))
            else:
                _print(mesh.state())
                print(f"tear down with: {sys.executable} {sys.argv[0]} down --prefix {mesh.prefix}")
        else:
            if not lab.PREFIX_RE.match(args.prefix):
                raise LabError(f"bad prefix {args.prefix!r}: lab prefixes look like tv1a2b")
            deleted = lab._teardown_prefix(args.prefix, lab.STATE_DIR)
            print(f"deleted {len(deleted)} namespaces")
    except LabError as exc:
        print(f"mesh.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
