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


def test_openssh_with_a_single_modern_kex_logs_in(gateway: GatewayProc) -> None:
    for kex in ("curve25519-sha256", "diffie-hellman-group16-sha512"):
        r = gateway.ssh("alice", "echo kex-ok", opts=("-o", f"KexAlgorithms={kex}"))
        assert (r.returncode, r.stdout) == (0, b"kex-ok\n"), (kex, r.stderr)
    r = gateway.ssh("alice", "true", opts=("-o", "KexAlgorithms=diffie-hellman-group14-sha1",
                                          "-o", "LogLevel=INFO"))
    assert r.returncode == 255 and b"no matching key exchange" in r.stderr, r.stderr
