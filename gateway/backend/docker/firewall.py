"""The host firewall: nothing in a user network opens a connection to the host itself.

Docker filters traffic *between* networks (FORWARD) but not traffic *to the host* (INPUT): a host
service bound to all addresses — a database, the host's own sshd, a dev server on `0.0.0.0` — is
reachable from every bridge network through its gateway address, and with it from every user's
container.  So the gateway keeps one rule per user network pool in a chain of its own,
`DGW-INPUT`, jumped to first from `INPUT`: new connections from the pool to any host address
are dropped.  Replies to connections the host opened (ESTABLISHED, RELATED) pass, and so does
DNS (port 53), in case the host's resolver is what Docker's embedded DNS forwards to.  The mirror
and everything she reaches on her own network are bridged, never seen by INPUT.

Idempotent (each rule is checked before it is added), shared by gateways that use the same pool,
and kept when the gateway stops: her container outlives a gateway restart and stays filtered.
`remove()` takes the pool's rules out again (`dind-gateway` never does it by itself; tests do).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess

CHAIN = "DGW-INPUT"


def _rules(pool: ipaddress.IPv4Network) -> list[list[str]]:
    src = ["-s", str(pool), "-m", "comment", "--comment", f"dind-gateway {pool}"]
    return [
        [*src, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
        [*src, "-p", "udp", "--dport", "53", "-j", "RETURN"],
        [*src, "-p", "tcp", "--dport", "53", "-j", "RETURN"],
        [*src, "-j", "DROP"],
    ]


class HostFirewall:
    """The INPUT rules for one user network pool (iptables, as Docker itself uses)."""

    def __init__(self, pool: ipaddress.IPv4Network, iptables: str | None = None) -> None:
        self.pool = pool
        self.iptables = iptables or shutil.which("iptables") or ""

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.iptables, "-w", *args], capture_output=True, text=True,
                              timeout=30, check=False)

    def chain_exists(self) -> bool:
        return bool(self.iptables) and self._run("-n", "-L", CHAIN).returncode == 0

    def pools(self) -> list[ipaddress.IPv4Network]:
        """Every pool whose rules are in the chain now, this one or not (from their comments)."""
        listing = self._run("-S", CHAIN).stdout if self.iptables else ""
        found = {m for line in listing.splitlines() for m in line.split('"')
                 if m.startswith("dind-gateway ")}
        return [ipaddress.IPv4Network(m.split()[1]) for m in sorted(found)]

    def install(self) -> str | None:
        """Put the rules in place; None when done, else why not (for the start-up log)."""
        if not self.iptables:
            return "iptables is not installed"
        if not self.chain_exists():
            r = self._run("-N", CHAIN)
            if r.returncode != 0 and "exists" not in r.stderr:
                return f"iptables -N {CHAIN}: {r.stderr.strip()}"
        if self._run("-C", "INPUT", "-j", CHAIN).returncode != 0:
            r = self._run("-I", "INPUT", "1", "-j", CHAIN)
            if r.returncode != 0:
                return f"iptables -I INPUT: {r.stderr.strip()}"
        for rule in _rules(self.pool):
            if self._run("-C", CHAIN, *rule).returncode != 0:
                r = self._run("-A", CHAIN, *rule)
                if r.returncode != 0:
                    return f"iptables -A {CHAIN}: {r.stderr.strip()}"
        return None

    def remove(self) -> None:
        """Take this pool's rules out; the chain and its jump too once it is empty."""
        if not self.iptables:
            return
        for rule in _rules(self.pool):
            while self._run("-D", CHAIN, *rule).returncode == 0:
                pass
        listing = self._run("-S", CHAIN)
        if listing.returncode == 0 and listing.stdout.strip() == f"-N {CHAIN}":
            while self._run("-D", "INPUT", "-j", CHAIN).returncode == 0:
                pass
            self._run("-X", CHAIN)

    def remove_all(self) -> None:
        """Every pool's rules, then the chain: what a test run or a bench run added, when the
        host had no chain before it (a real gateway's rules are not theirs to touch)."""
        for pool in self.pools():
            HostFirewall(pool, self.iptables).remove()

