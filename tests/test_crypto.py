"""Issue 17 (part): crypto defaults as strict as OpenSSH's, checked with real tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import GatewayProc


def test_ssh_audit_finds_no_failures(gateway: GatewayProc) -> None:
    audit = Path(sys.executable).parent / "ssh-audit"
    r = subprocess.run([str(audit), "--skip-rate-test", "-p", str(gateway.port), "127.0.0.1"],
                       capture_output=True, text=True, timeout=120)
    assert "(fail)" not in r.stdout and "[fail]" not in r.stdout, r.stdout
    assert r.returncode in (0, 2), r.stdout + r.stderr  # 3 would mean failures


def test_ssh_audit_rate_test_sees_throttling(make_gateway) -> None:
    """DHEat (CVE-2002-20001): with the default penalties a source opening connections it
    never logs in on is throttled; ssh-audit's rate test then reports no DHEat warning."""
    gw = make_gateway(noauth_burst=20, noauth_per_second=2)
    gw.start()
    audit = Path(sys.executable).parent / "ssh-audit"
    r = subprocess.run([str(audit), "-p", str(gw.port), "127.0.0.1"], capture_output=True,
                       text=True, timeout=300)
    assert "DHEat" not in r.stdout, r.stdout
    assert "(fail)" not in r.stdout and "[fail]" not in r.stdout, r.stdout
    audit = (gw.dir / "state" / "audit.log").read_text()
    print("audit:", audit.count('"connection.open"'), "opened,", audit.count('"penalty"'),
          "penalty")
    assert '"event": "penalty"' in audit  # the throttle started, and says so
    r = gw.ssh("alice", "echo still-in", opts=("-b", "127.0.0.2"))  # another source: unaffected
    assert r.stdout == b"still-in\n", r.stderr


def test_openssh_with_a_single_modern_kex_logs_in(gateway: GatewayProc) -> None:
    for kex in ("curve25519-sha256", "diffie-hellman-group16-sha512"):
        r = gateway.ssh("alice", "echo kex-ok", opts=("-o", f"KexAlgorithms={kex}"))
        assert (r.returncode, r.stdout) == (0, b"kex-ok\n"), (kex, r.stderr)
    r = gateway.ssh("alice", "true", opts=("-o", "KexAlgorithms=diffie-hellman-group14-sha1",
                                          "-o", "LogLevel=INFO"))
    assert r.returncode == 255 and b"no matching key exchange" in r.stderr, r.stderr
