"""Session recording (users.yaml `record: true`): her pty session as an asciicast v2 file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pexpect

from .conftest import InProcessGateway


def _casts(live: InProcessGateway) -> set[Path]:
    return set((live.dir / "state" / "recordings" / "grace").glob("*.cast"))


def test_pty_session_is_recorded_and_plays(live: InProcessGateway) -> None:
    before = _casts(live)
    child = pexpect.spawn(" ".join(live.ssh_args("grace", "alice2", "-tt")), timeout=60,
                          dimensions=(30, 100))
    try:
        child.expect("this session is recorded")
        child.sendline("echo rec-$((6*7))")
        child.expect("rec-42")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3
    new = _casts(live) - before
    assert len(new) == 1, new
    cast = new.pop()
    assert cast.stat().st_mode & 0o777 == 0o600
    assert cast.parent.stat().st_mode & 0o777 == 0o700
    lines = cast.read_text().splitlines()
    header = json.loads(lines[0])
    assert (header["version"], header["width"], header["height"]) == (2, 100, 30), header
    events = [json.loads(line) for line in lines[1:]]
    times = [e[0] for e in events]
    assert times == sorted(times) and all(e[1] in ("o", "r") for e in events), events
    assert "rec-42" in "".join(e[2] for e in events if e[1] == "o")
    # The real player reads it back.
    played = subprocess.run([str(Path(sys.executable).parent / "asciinema"), "cat", str(cast)],
                            capture_output=True, timeout=60)
    assert played.returncode == 0 and b"rec-42" in played.stdout, played.stderr
    audit = (live.dir / "state" / "audit.log").read_text().splitlines()
    ends = [json.loads(a) for a in audit if '"recording.end"' in a and str(cast) in a]
    assert ends and ends[-1]["bytes"] == cast.stat().st_size, ends


def test_non_pty_sessions_are_not_recorded(live: InProcessGateway) -> None:
    before = _casts(live)
    r = live.ssh("grace", "echo plain", key="alice2")
    assert r.returncode == 0 and r.stdout == b"plain\n", r.stderr
    assert b"recorded" not in r.stderr
    assert _casts(live) == before
