"""Issue 7, operations and safety: audit log, metrics and health, bans, floods, login line.

The unit tests at the top drive the guard and the audit sink with a fake clock; the rest runs a
real gateway process against real clients (OpenSSH's ssh/sftp/scp, and asyncssh where hundreds
of connections are needed) and reads what an operator would read: the audit file, /metrics,
/healthz, the process's RSS.
"""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

from gateway.audit import AuditLog
from gateway.events import Events
from gateway.guard import Guard, source_of

# --------------------------------------------------------------------------------------------
# Guard (unit)


class FakeConn:
    def __init__(self) -> None:
        self.disconnected: list[tuple[int, str]] = []

    def disconnect(self, code: int, reason: str) -> None:
        self.disconnected.append((code, reason))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_guard(**kw: object) -> tuple[Guard, list[dict], Clock]:
    events = Events()
    seen: list[dict] = []
    events.subscribe(seen.append)
    clock = Clock()
    settings = {"max_startups": 100, "max_startups_per_source": 10, "max_auth_tries": 6,
                "ban_threshold": 3, "ban_seconds": 10.0, "ban_max_seconds": 35.0, **kw}
    return Guard(events, clock=clock, **settings), seen, clock  # type: ignore[arg-type]


def fail_login(guard: Guard, conn_id: int, peer: str, attempts: int = 1) -> FakeConn:
    conn = FakeConn()
    assert guard.admit(conn_id, peer, conn) is None
    for _ in range(attempts):
        guard.auth_failed(conn_id)
    guard.closed(conn_id)
    return conn


def test_ban_after_threshold_grows_and_expires() -> None:
    guard, seen, clock = make_guard()
    ids = iter(range(1, 1000))
    for _ in range(2):
        fail_login(guard, next(ids), "10.0.0.1", attempts=2)  # one failed login per connection
    assert guard.ban_remaining("10.0.0.1") == 0
    fail_login(guard, next(ids), "10.0.0.1")
    assert guard.ban_remaining("10.0.0.1") == 10
    assert guard.admit(next(ids), "10.0.0.1") == "banned"
    assert guard.admit(next(ids), "10.0.0.2") is None  # others are not affected
    bans = [e for e in seen if e["event"] == "ban"]
    assert [(b["peer"], b["seconds"], b["failures"], b["strikes"]) for b in bans] == [
        ("10.0.0.1", 10, 3, 1)]
    # expires; the next ban is twice as long, then capped by ban_max_seconds
    for expected in (20, 35, 35):
        clock.now += guard.ban_remaining("10.0.0.1") + 0.01
        assert guard.admit(next(ids), "10.0.0.1") is None
        guard.closed(next(ids) - 1)
        for _ in range(3):
            fail_login(guard, next(ids), "10.0.0.1")
        assert guard.ban_remaining("10.0.0.1") == expected
    assert guard.banned_sources() == 1
    # a day of quiet forgives the strikes
    clock.now += 86400 + 40
    for _ in range(3):
        fail_login(guard, next(ids), "10.0.0.1")
    assert guard.ban_remaining("10.0.0.1") == 10


def test_failures_are_forgotten_after_the_window() -> None:
    guard, _, clock = make_guard(failure_window=60.0)
    fail_login(guard, 1, "10.0.0.1")
    fail_login(guard, 2, "10.0.0.1")
    clock.now += 61
    fail_login(guard, 3, "10.0.0.1")
    assert guard.ban_remaining("10.0.0.1") == 0


def test_login_after_a_wrong_key_is_not_a_failure() -> None:
    guard, _, _ = make_guard()
    for conn_id in range(1, 6):  # the agent offers a wrong key first, then the right one
        assert guard.admit(conn_id, "10.0.0.1", FakeConn()) is None
        guard.auth_failed(conn_id)
        guard.auth_succeeded(conn_id)
        guard.closed(conn_id)
    assert guard.ban_remaining("10.0.0.1") == 0


def test_ban_drops_connections_still_authenticating() -> None:
    guard, _, _ = make_guard()
    waiting = FakeConn()
    assert guard.admit(1, "10.0.0.1", waiting) is None
    logged_in = FakeConn()
    assert guard.admit(2, "10.0.0.1", logged_in) is None
    guard.auth_succeeded(2)
    for conn_id in (3, 4, 5):
        fail_login(guard, conn_id, "10.0.0.1")
    assert waiting.disconnected and not logged_in.disconnected
    assert guard.unauthenticated == 0


def test_max_auth_tries_disconnects() -> None:
    guard, seen, _ = make_guard(max_auth_tries=3, ban_threshold=100)
    conn = FakeConn()
    assert guard.admit(1, "10.0.0.1", conn) is None
    guard.auth_failed(1)
    guard.auth_failed(1)
    assert not conn.disconnected
    guard.auth_failed(1)
    assert conn.disconnected == [(14, "Too many authentication failures")]
    assert seen[-1]["event"] == "connection.refused" and seen[-1]["reason"] == "max_auth_tries"
    assert guard.unauthenticated == 0


def test_startup_caps_global_and_per_source() -> None:
    guard, seen, _ = make_guard(max_startups=5, max_startups_per_source=2)
    assert guard.admit(1, "10.0.0.1") is None
    assert guard.admit(2, "10.0.0.1") is None
    assert guard.admit(3, "10.0.0.1") == "max_startups_per_source"
    for conn_id, peer in ((4, "10.0.0.2"), (5, "10.0.0.3"), (6, "10.0.0.4")):
        assert guard.admit(conn_id, peer) is None
    assert guard.admit(7, "10.0.0.5") == "max_startups"
    assert guard.unauthenticated == 5
    guard.auth_succeeded(1)  # logging in frees the slot
    assert guard.admit(8, "10.0.0.1") is None
    guard.closed(2)
    guard.closed(8)
    assert guard.admit(9, "10.0.0.1") is None
    refused = [e["reason"] for e in seen if e["event"] == "connection.refused"]
    assert refused == ["max_startups_per_source", "max_startups"]


def test_sources_ipv6_by_64_and_mapped_v4() -> None:
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("192.0.2.7") == "192.0.2.7"
    guard, _, _ = make_guard()
    for conn_id in range(1, 4):
        fail_login(guard, conn_id, f"2001:db8:1:2::{conn_id}")
    assert guard.admit(9, "2001:db8:1:2::ffff") == "banned"


def test_source_table_is_bounded() -> None:
    guard, _, _ = make_guard(max_sources=100, ban_threshold=2)
    for i in range(5000):
        fail_login(guard, i, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(guard._sources) <= 100


# --------------------------------------------------------------------------------------------
# Audit sink (unit)


def test_audit_lines_enriched_and_rotated(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.log"
    out = io.StringIO()
    audit = AuditLog(path, stdout=True, max_bytes=2000, backups=2, stream=out)
    events = Events()
    events.subscribe(audit)
    events.emit("connection.open", conn=1, peer="192.0.2.1")
    events.emit("auth.success", conn=1, peer="192.0.2.1", user="alice", method="publickey",
                key="SHA256:x")
    events.emit("session.start", conn=1, user="alice", type="exec", command="ls")
    events.emit("forward.open", conn=1, user="alice", host="localhost", port=80)
    events.emit("connection.refused", conn=2, peer="192.0.2.9", reason="banned")
    events.emit("container.start", user="alice", duration=0.5)
    events.emit("connection.close", conn=1, peer="192.0.2.1", user="alice")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["connection.open", "auth.success", "session.start",
                                           "forward.open", "container.start",
                                           "connection.close"]
    for r in lines:
        assert list(r)[:5] == ["time", "event", "conn", "peer", "user"]
    assert lines[2]["peer"] == "192.0.2.1" and lines[3]["peer"] == "192.0.2.1"
    assert lines[0]["user"] is None and lines[3]["user"] == "alice"
    assert (lines[4]["conn"], lines[4]["peer"], lines[4]["duration"]) == (None, None, 0.5)
    assert out.getvalue() == path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # size cap: never more than backups + 1 files, none much above max_bytes
    for i in range(200):
        events.emit("session.end", conn=3, user="bob", type="exec", command=f"job {i}",
                    exit_status=0, bytes_in=1, bytes_out=2, duration=0.1)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all(p.stat().st_size <= 2000 for p in path.parent.iterdir())
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["command"] == "job 199"
    audit.close()


def test_audit_without_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, max_bytes=500, backups=0)
    for i in range(50):
        audit({"time": "t", "event": "ban", "peer": "192.0.2.1", "seconds": i})
    assert [p.name for p in tmp_path.iterdir()] == ["audit.log"]
    assert 0 < path.stat().st_size <= 500
    audit.close()


def test_audit_write_errors_do_not_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    audit = AuditLog(blocker / "audit.log")  # parent is a file: cannot be created
    audit({"time": "t", "event": "ban", "peer": "192.0.2.1"})
