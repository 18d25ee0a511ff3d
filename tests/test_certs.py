"""OpenSSH user certificates from a team CA (issue 19): real `ssh-keygen -s` certificates,
real KRLs from `ssh-keygen -k`, the real OpenSSH client.

Most tests run against the in-process gateway with the fake backend (fast); one logs in to a
real DinD container.  Refusals are checked in the audit log, with their reasons.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import ConfigError, GatewayConfig, User, load_gateway_config
from gateway.krl import parse_revoked
from gateway.ssh.certs import CertPolicy, CertRefused, read_certificate

from .conformance.conftest import InProcessGateway
from .conftest import pubkey, remove_labelled, unmount_under, wait_for


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f",
                    str(path)], check=True)
    return path


class Issuer:
    """Makes key pairs and has a CA sign them, like a team's `ssh-keygen -s` box."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.n = 0
        self.ca = keygen(d / "team_ca")
        self.other_ca = keygen(d / "other_ca")
        self.line_ca = keygen(d / "line_ca")  # trusted only by a cert-authority line

    def issue(self, principals: str, *, key_id: str = "alice@laptop", validity: str = "+5m",
              serial: int | None = None, options: tuple[str, ...] = (),
              ca: Path | None = None, key: Path | None = None) -> Path:
        """A certificate (key-cert.pub next to its key); returns the private key's path."""
        self.n += 1
        if key is None:
            key = keygen(self.dir / f"id_{self.n}")
        else:  # a second certificate for the same key
            copy = self.dir / f"id_{self.n}"
            copy.write_bytes(key.read_bytes())
            copy.chmod(0o600)
            copy.with_suffix(".pub").write_bytes(key.with_suffix(".pub").read_bytes())
            key = copy
        args = ["ssh-keygen", "-q", "-s", str(ca or self.ca), "-I", key_id, "-n", principals,
                "-V", validity]
        if serial is not None:
            args += ["-z", str(serial)]
        for option in options:
            args += ["-O", option]
        subprocess.run([*args, str(key.with_suffix(".pub"))], check=True)
        return key


def cert_of(key: Path) -> Path:
    return key.parent / f"{key.name}-cert.pub"


def login(gw: InProcessGateway, user: str, key: Path, *command: str,
          opts: tuple[str, ...] = (), input: bytes | None = None,
          ) -> subprocess.CompletedProcess:
    gw.keys[key.name] = key
    return gw.ssh(user, *command, key=key.name, input=input,
                  opts=(*opts, "-o", f"CertificateFile={cert_of(key)}"))


def audit(gw: InProcessGateway, event: str) -> list[dict]:
    path = gw.dir / "state" / "audit.log"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == event]


def cert_failure(gw: InProcessGateway, key_id: str) -> dict:
    """The audited refusal of the certificate with this key id."""
    found = [e for e in audit(gw, "auth.failure") if e.get("cert_id") == key_id]
    assert found, audit(gw, "auth.failure")[-4:]
    return found[-1]


def krl_update(gw: InProcessGateway, issuer: Issuer, spec: str | None = None,
               key: Path | None = None) -> None:
    """Add to the gateway's KRL with `ssh-keygen -k -u` (a spec file of serial:/id:, or a
    public key to revoke)."""
    krl = gw.dir / "revoked.krl"
    if spec is not None:
        spec_file = issuer.dir / f"spec{issuer.n}"
        issuer.n += 1
        spec_file.write_text(spec)
        subprocess.run(["ssh-keygen", "-q", "-k", "-u", "-f", str(krl), "-s",
                        str(issuer.ca.with_suffix(".pub")), str(spec_file)], check=True,
                       capture_output=True)
    if key is not None:
        subprocess.run(["ssh-keygen", "-q", "-k", "-u", "-f", str(krl),
                        str(key.with_suffix(".pub"))], check=True, capture_output=True)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return Issuer(tmp_path_factory.mktemp("ca"))


def cert_users(gw: InProcessGateway, issuer: Issuer) -> dict[str, dict]:
    """alice: no key at all (her CA's certificates only); bob: a plain key; carol: a
    cert-authority line with principals=; dave: principals: in users.yaml; erin: a
    cert-authority line without pty."""
    line_ca = pubkey(issuer.line_ca)
    return {
        "alice": {},
        "bob": {"keys": [pubkey(gw.keys["bob"])]},
        "carol": {"keys": [f'cert-authority,principals="carol-ops,oncall" {line_ca}']},
        "dave": {"principals": ["dave@corp"]},
        "erin": {"keys": [f"cert-authority,no-pty {line_ca}"]},
        "frank": {"keys": [pubkey(gw.keys["frank"])]},
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path],
       issuer: Issuer) -> Iterator[InProcessGateway]:
    d = tmp_path_factory.mktemp("certs-fake")
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(d / "revoked.krl")], check=True)
    gw = InProcessGateway(d, {**keys, "frank": keygen(d / "id_frank")}, "fake",
                          trusted_user_ca_keys=str(issuer.ca.with_suffix(".pub")),
                          revoked_keys="revoked.krl")
    gw.write_users(cert_users(gw, issuer))
    gw.start()
    yield gw
    gw.stop()


# --- logging in ------------------------------------------------------------------------------

def test_certificate_logs_in_with_no_key_in_users_yaml(gw: InProcessGateway, issuer: Issuer,
                                                        caplog: pytest.LogCaptureFixture,
                                                        ) -> None:
    caplog.set_level(logging.INFO, "dind_gateway")
    key = issuer.issue("alice", key_id="alice@laptop", validity="+5m", serial=7)
    r = login(gw, "alice", key, "echo", "in as $USER")
    assert r.returncode == 0 and r.stdout == b"in as alice\n", r.stderr
    # the session log names the certificate's key id
    assert wait_for(lambda: any("cert='alice@laptop'" in m and "session of alice ended" in m
                                for m in caplog.messages), 10), caplog.messages[-5:]
    ok = [e for e in audit(gw, "auth.success") if e.get("cert_id") == "alice@laptop"]
    assert ok, audit(gw, "auth.success")
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f",
                                  str(issuer.ca.with_suffix(".pub"))], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    assert ok[-1]["user"] == "alice" and ok[-1]["cert_serial"] == 7
    assert ok[-1]["cert_principals"] == ["alice"] and ok[-1]["ca"] == fingerprint, ok[-1]
    assert ok[-1]["method"] == "publickey"


def test_a_certificate_for_bob_does_not_log_in_as_alice(gw: InProcessGateway,
                                                         issuer: Issuer) -> None:
    key = issuer.issue("bob", key_id="bob-as-alice")
    r = login(gw, "alice", key, "true")
    assert r.returncode == 255, r.stderr
    event = cert_failure(gw, "bob-as-alice")
    assert event["user"] == "alice" and event["reason"].startswith("wrong principal"), event
    assert event["cert_principals"] == ["bob"], event


def test_expired_and_not_yet_valid_certificates_are_refused(gw: InProcessGateway,
                                                             issuer: Issuer) -> None:
    old = issuer.issue("alice", key_id="expired", validity="-2h:-1h")
    assert login(gw, "alice", old, "true").returncode == 255
    assert cert_failure(gw, "expired")["reason"] == "certificate expired"
    later = issuer.issue("alice", key_id="later", validity="+1h:+2h")
    assert login(gw, "alice", later, "true").returncode == 255
    assert cert_failure(gw, "later")["reason"] == "certificate not yet valid"


def test_host_certificate_and_no_principals_are_refused(gw: InProcessGateway,
                                                         issuer: Issuer) -> None:
    host = issuer.issue("alice", key_id="a-host", options=())
    subprocess.run(["ssh-keygen", "-q", "-s", str(issuer.ca), "-h", "-I", "a-host", "-n",
                    "alice", str(host.with_suffix(".pub"))], check=True)
    # the OpenSSH client never offers a host certificate: ask the policy itself
    with pytest.raises(CertRefused) as info:
        CertPolicy(gw.app.ctx.config).screen(_blob(cert_of(host)), User("alice"), "alice",
                                             "127.0.0.1")
    assert info.value.reason.startswith("not a user certificate"), info.value.reason
    anyone = host.parent / "anyone"
    anyone.write_bytes(host.read_bytes())
    anyone.chmod(0o600)
    anyone.with_suffix(".pub").write_bytes(host.with_suffix(".pub").read_bytes())
    subprocess.run(["ssh-keygen", "-q", "-s", str(issuer.ca), "-I", "for-anyone",
                    str(anyone.with_suffix(".pub"))], check=True)  # no -n: no principals
    assert login(gw, "alice", anyone, "true").returncode == 255
    assert cert_failure(gw, "for-anyone")["reason"] == "certificate names no principals"


def test_untrusted_ca_is_refused(gw: InProcessGateway, issuer: Issuer) -> None:
    key = issuer.issue("alice", key_id="rogue", ca=issuer.other_ca)
    assert login(gw, "alice", key, "true").returncode == 255
    event = cert_failure(gw, "rogue")
    assert event["reason"] == "untrusted CA", event
    assert event["ca"] != cert_failure(gw, "expired")["ca"]


def test_revoked_serial_key_id_and_key(gw: InProcessGateway, issuer: Issuer) -> None:
    """The KRL is re-read when it changes: each revocation refuses exactly its certificate."""
    revoked = issuer.issue("alice", key_id="stolen-laptop", serial=1042)
    kept = issuer.issue("alice", key_id="other-laptop", serial=1043)
    by_id = issuer.issue("alice", key_id="fired@corp", serial=1044)
    by_key = issuer.issue("alice", key_id="lost-key", serial=1045)
    for key in (revoked, kept, by_id, by_key):
        assert login(gw, "alice", key, "true").returncode == 0
    krl_update(gw, issuer, spec="serial: 1042\nid: fired@corp\n")
    krl_update(gw, issuer, key=by_key)
    assert login(gw, "alice", revoked, "true").returncode == 255
    assert cert_failure(gw, "stolen-laptop")["reason"] == "revoked certificate (serial 1042)"
    assert login(gw, "alice", by_id, "true").returncode == 255
    assert cert_failure(gw, "fired@corp")["reason"] == "revoked certificate (key id " \
                                                       "'fired@corp')"
    assert login(gw, "alice", by_key, "true").returncode == 255
    assert cert_failure(gw, "lost-key")["reason"] == "revoked key"
    # a new certificate for the revoked key is refused too; the other laptop still gets in
    again = issuer.issue("alice", key_id="lost-key-reissued", serial=1046, key=by_key)
    assert login(gw, "alice", again, "true").returncode == 255
    assert cert_failure(gw, "lost-key-reissued")["reason"] == "revoked key"
    assert login(gw, "alice", kept, "true").returncode == 0


def test_revoked_plain_key_is_refused(gw: InProcessGateway, issuer: Issuer) -> None:
    """revoked_keys covers plain users.yaml keys too (as sshd's RevokedKeys)."""
    assert gw.ssh("frank", "true").returncode == 0
    krl_update(gw, issuer, key=gw.keys["frank"])
    assert gw.ssh("frank", "true").returncode == 255
    fails = [e for e in audit(gw, "auth.failure") if e["user"] == "frank"]
    assert fails and fails[-1]["reason"] == "revoked key", fails


# --- what the certificate allows --------------------------------------------------------------

def test_source_address_is_enforced(gw: InProcessGateway, issuer: Issuer) -> None:
    elsewhere = issuer.issue("alice", key_id="office-only",
                             options=("source-address=10.9.9.0/24",))
    assert login(gw, "alice", elsewhere, "true").returncode == 255
    assert cert_failure(gw, "office-only")["reason"] == "source-address does not match peer"
    here = issuer.issue("alice", key_id="loopback", options=("source-address=127.0.0.1/32",))
    assert login(gw, "alice", here, "true").returncode == 0


def test_force_command_is_enforced(gw: InProcessGateway, issuer: Issuer) -> None:
    key = issuer.issue("alice", key_id="backup-job", options=("force-command=echo forced",))
    r = login(gw, "alice", key, "echo", "asked")
    assert r.returncode == 0 and r.stdout == b"forced\n", (r.stdout, r.stderr)
    shell = login(gw, "alice", key, input=b"echo from-stdin\n")
    assert shell.stdout == b"forced\n", (shell.stdout, shell.stderr)
    sftp = subprocess.run(["sftp", "-b", "-", "-P", str(gw.port), "-i", str(key),
                           "-o", f"CertificateFile={cert_of(key)}", "-o", "IdentitiesOnly=yes",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "BatchMode=yes", "alice@127.0.0.1"], input=b"ls\n",
                          capture_output=True, timeout=60)
    assert sftp.returncode != 0, sftp.stdout  # the subsystem is replaced by the command too


def test_no_pty_without_permit_pty(gw: InProcessGateway, issuer: Issuer) -> None:
    key = issuer.issue("alice", key_id="no-tty", options=("no-pty",))
    r = login(gw, "alice", key, "tty", opts=("-tt",))  # -tt: ssh gives up without a pty
    assert b"PTY allocation request failed" in r.stderr and b"/dev/" not in r.stdout, r
    with_pty = issuer.issue("alice", key_id="tty")
    r = login(gw, "alice", with_pty, "tty", opts=("-tt",))
    assert b"/dev/" in r.stdout, (r.stdout, r.stderr)


def test_no_port_forwarding_without_permit(gw: InProcessGateway, issuer: Issuer) -> None:
    key = issuer.issue("alice", key_id="no-fwd", options=("no-port-forwarding",))
    r = login(gw, "alice", key, "true",
              opts=("-o", "ExitOnForwardFailure=yes", "-R", "7001:localhost:22"))
    assert r.returncode != 0, (r.stdout, r.stderr)
    ok = issuer.issue("alice", key_id="fwd")
    r = login(gw, "alice", ok, "true",
              opts=("-o", "ExitOnForwardFailure=yes", "-R", "7002:localhost:22"))
    assert r.returncode == 0, r.stderr


def test_agent_forwarding_only_with_permit(gw: InProcessGateway, issuer: Issuer,
                                          tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        assert wait_for(sock.exists, 10)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(gw.keys["other"])], env=env, check=True,
                       capture_output=True)
        for key_id, options, expect in (("agent", (), True),
                                        ("no-agent", ("no-agent-forwarding",), False)):
            key = issuer.issue("alice", key_id=key_id, options=options)
            gw.keys[key.name] = key
            r = subprocess.run(
                [*gw.ssh_args("alice", key.name, "-A", "-o", f"CertificateFile={cert_of(key)}"),
                 'echo "${SSH_AUTH_SOCK-none}"'], env=env, capture_output=True, text=True,
                timeout=60)
            assert r.returncode == 0, r.stderr
            assert (r.stdout.strip() != "none") is expect, (key_id, r.stdout)
        refused = [e for e in audit(gw, "agent.refused") if e["user"] == "alice"]
        assert refused and refused[-1]["reason"] == "agent forwarding is disabled for this key"
    finally:
        agent.terminate()
        agent.wait(10)


# --- principals ---------------------------------------------------------------------------------

def test_users_yaml_principals(gw: InProcessGateway, issuer: Issuer) -> None:
    """dave accepts certificates for dave@corp only (not his bare name, once principals: is
    set), from the gateway's CA."""
    corp = issuer.issue("dave@corp", key_id="dave-corp")
    assert login(gw, "dave", corp, "echo", "$USER").stdout == b"dave\n"
    bare = issuer.issue("dave", key_id="dave-bare")
    assert login(gw, "dave", bare, "true").returncode == 255
    assert cert_failure(gw, "dave-bare")["reason"].startswith("wrong principal")


def test_cert_authority_line_with_principals(gw: InProcessGateway, issuer: Issuer) -> None:
    """carol's own cert-authority line (a CA the gateway does not trust) with principals=."""
    ops = issuer.issue("carol-ops", key_id="carol-ops", ca=issuer.line_ca)
    assert login(gw, "carol", ops, "echo", "$USER").stdout == b"carol\n"
    bare = issuer.issue("carol", key_id="carol-bare", ca=issuer.line_ca)
    assert login(gw, "carol", bare, "true").returncode == 255
    assert cert_failure(gw, "carol-bare")["reason"].startswith("wrong principal")
    # that CA is carol's: a certificate of it logs nobody else in
    alice = issuer.issue("alice,carol-ops", key_id="line-ca-alice", ca=issuer.line_ca)
    assert login(gw, "alice", alice, "true").returncode == 255
    assert cert_failure(gw, "line-ca-alice")["reason"] == "untrusted CA"
    # and the CA key itself is no login key
    gw.keys["line_ca"] = issuer.line_ca
    assert gw.ssh("carol", "true", key="line_ca").returncode == 255


def test_stricter_wins_line_no_pty_over_cert_permit_pty(gw: InProcessGateway,
                                                         issuer: Issuer) -> None:
    key = issuer.issue("erin", key_id="erin", ca=issuer.line_ca)  # permit-pty by default
    r = login(gw, "erin", key, "tty", opts=("-tt",))
    assert b"PTY allocation request failed" in r.stderr and b"/dev/" not in r.stdout, r
    assert login(gw, "erin", key, "echo", "in").stdout == b"in\n"


def test_certificate_expiring_mid_session_keeps_the_session(gw: InProcessGateway,
                                                            issuer: Issuer) -> None:
    """As sshd: validity is checked at login; an open session outlives its certificate, a
    new login with it is refused."""
    now = int(time.time())
    until = now + 6  # time enough to log in first, even on a loaded machine
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(until))
    key = issuer.issue("alice", key_id="short-lived", validity=f"-1m:{stamp}")
    gw.keys[key.name] = key
    proc = subprocess.Popen(
        [*gw.ssh_args("alice", key.name, "-o", f"CertificateFile={cert_of(key)}"),
         "while read line; do echo \"got $line\"; done"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"before\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"got before\n"
        # the clock is what is tested here: wait until the certificate has expired
        assert wait_for(lambda: time.time() > until + 1, 30)
        proc.stdin.write(b"after\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"got after\n"
        assert login(gw, "alice", key, "true").returncode == 255
        assert cert_failure(gw, "short-lived")["reason"] == "certificate expired"
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert proc.returncode == 0


# --- configuration ---------------------------------------------------------------------------

def _config_error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    return info.value


def test_bad_ca_and_krl_settings_are_config_errors(tmp_path: Path, issuer: Issuer) -> None:
    ca = pubkey(issuer.ca)
    err = _config_error(tmp_path, f"backend: fake\ntrusted_user_ca_keys:\n  - {ca}\n"
                                  "  - ssh-ed25519 AAAAnotbase64\n")
    assert (err.path, err.line, err.field) == (str(tmp_path / "gateway.yaml"), 4,
                                               "trusted_user_ca_keys[1]"), str(err)
    err = _config_error(tmp_path, "trusted_user_ca_keys: missing.pub\n")
    assert err.line == 1 and "cannot read CA key file" in err.message, str(err)
    (tmp_path / "cas.pub").write_text(f"# team CAs\n{ca}\n"
                                      f"{cert_of(issuer.issue('x')).read_text()}")
    err = _config_error(tmp_path, "trusted_user_ca_keys: cas.pub\n")
    assert (err.path, err.line) == (str(tmp_path / "cas.pub"), 3), str(err)
    assert "a certificate is not a CA key" in err.message
    err = _config_error(tmp_path, "trusted_user_ca_keys: |\n"
                                  f"  {ca}\n  not-a-key AAAA\n")
    assert err.line == 3, str(err)
    (tmp_path / "garbage.krl").write_bytes(b"SSHKRL\n\0\0\0\0\x01trunc")
    err = _config_error(tmp_path, "log_level: info\nrevoked_keys: garbage.krl\n")
    assert err.line == 2 and err.field == "revoked_keys" and "truncated" in err.message, str(err)
    (tmp_path / "revoked.txt").write_text(f"{ca}\nssh-ed25519 garbage\n")
    err = _config_error(tmp_path, "revoked_keys: revoked.txt\n")
    assert (err.path, err.line, err.field) == (str(tmp_path / "revoked.txt"), 2,
                                               "revoked_keys"), str(err)
    err = _config_error(tmp_path, "revoked_keys: nowhere.krl\n")
    assert err.line == 1 and "cannot read" in err.message, str(err)
    good = tmp_path / "gateway.yaml"
    good.write_text(f"trusted_user_ca_keys: [{ca}]\n")
    config = load_gateway_config(good)
    assert [c.source for c in config.trusted_user_ca_keys] == [f"{good}:1"]


def test_krl_sections_parsed_like_ssh_keygen(tmp_path: Path, issuer: Issuer) -> None:
    """Serial lists, ranges and bitmaps, key ids, keys and SHA-256 hashes, as ssh-keygen -k
    writes them (it picks the encoding; many scattered serials become a bitmap)."""
    spread = sorted({5, 9, 1000} | set(range(101, 400, 3)))
    user = keygen(tmp_path / "u")
    hashed = keygen(tmp_path / "h")
    sha = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(hashed)],
                         capture_output=True, text=True, check=True).stdout.split()[1]
    spec = tmp_path / "spec"
    spec.write_text("".join(f"serial: {s}\n" for s in spread) + "serial: 2000-2010\n"
                    f"id: someone\nhash: {sha}\n")
    krl = tmp_path / "k.krl"
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(krl), "-s",
                    str(issuer.ca.with_suffix(".pub")), str(spec), str(user.with_suffix(".pub"))],
                   check=True, capture_output=True)
    revoked = parse_revoked(krl.read_bytes())
    ca = read_certificate_blob(cert_of(issuer.issue("x", serial=1)))
    got = {s for s in range(0, 2100) if revoked.cert_revoked(ca, s, "nobody")}
    assert got == set(spread) | set(range(2000, 2011))
    assert revoked.cert_revoked(ca, 77777, "someone") == "key id 'someone'"
    assert revoked.cert_revoked(b"other", 5, "x") is None
    assert revoked.key_revoked(_blob(user.with_suffix(".pub")))
    assert revoked.key_revoked(_blob(hashed.with_suffix(".pub")))
    assert not revoked.key_revoked(_blob(issuer.ca.with_suffix(".pub")))


def test_revoked_ca_and_unusable_krl_fail_closed(tmp_path: Path, issuer: Issuer) -> None:
    """The policy alone (no gateway): a revoked CA refuses all its certificates; a KRL that
    disappears or turns to garbage refuses every key until it is fixed, then is re-read."""
    krl = tmp_path / "ca.krl"
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(krl),
                    str(issuer.other_ca.with_suffix(".pub"))], check=True)
    config = GatewayConfig.default(tmp_path, backend="fake",
                                   trusted_user_ca_keys=str(issuer.other_ca.with_suffix(".pub")),
                                   revoked_keys=str(krl))
    policy = CertPolicy(config)
    alice = User("alice")
    blob = _blob(cert_of(issuer.issue("alice", key_id="via-revoked-ca", ca=issuer.other_ca)))
    with pytest.raises(CertRefused) as info:
        policy.screen(blob, alice, "alice", "127.0.0.1")
    assert info.value.reason == "revoked CA" and info.value.cert is not None
    assert info.value.cert.key_id == "via-revoked-ca"
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(krl)], check=True)  # now empty
    assert policy.screen(blob, alice, "alice", "127.0.0.1").cert is not None
    krl.write_bytes(b"SSHKRL\n\0garbage")
    with pytest.raises(CertRefused) as info:
        policy.screen(blob, alice, "alice", "127.0.0.1")
    assert info.value.reason.startswith("revoked_keys unusable"), info.value.reason
    plain = _blob(issuer.ca.with_suffix(".pub"))
    with pytest.raises(CertRefused):
        policy.screen(plain, alice, "alice", "127.0.0.1")
    krl.unlink()
    with pytest.raises(CertRefused):
        policy.screen(blob, alice, "alice", "127.0.0.1")
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(krl)], check=True)
    assert policy.screen(plain, alice, "alice", "127.0.0.1").cert is None


def _blob(pub: Path) -> bytes:
    import base64
    return base64.b64decode(pub.read_text().split()[1])


def read_certificate_blob(cert: Path) -> bytes:
    """The CA key blob of a certificate file, via the gateway's own reader."""
    parsed = read_certificate(_blob(cert))
    assert parsed is not None
    return parsed.ca.public_data


# --- the real thing ---------------------------------------------------------------------------

def test_certificate_login_into_docker(tmp_path_factory: pytest.TempPathFactory,
                                       keys: dict[str, Path], issuer: Issuer,
                                       docker_client: object) -> None:
    """alice's certificate (no key of hers in users.yaml) gets her shell in her own DinD."""
    d = tmp_path_factory.mktemp("certs-docker")
    gw = InProcessGateway(d, keys, "docker",
                          trusted_user_ca_keys=str(issuer.ca.with_suffix(".pub")))
    gw.write_users({"alice": {"memory": "1g", "pids": 1000, "cpus": 1}})
    try:
        gw.start()
        key = issuer.issue("alice", key_id="alice@laptop", validity="+5m")
        r = login(gw, "alice", key, "id -un; echo $HOME")
        assert r.returncode == 0 and r.stdout.splitlines()[-2:] == [b"alice", b"/home/alice"], \
            (r.stdout, r.stderr)
        wrong = issuer.issue("bob", key_id="bob@laptop")
        assert login(gw, "alice", wrong, "true").returncode == 255
        assert cert_failure(gw, "bob@laptop")["reason"].startswith("wrong principal")
    finally:
        gw.stop()
        remove_labelled(docker_client, gw.prefix)  # type: ignore[arg-type]
        unmount_under(gw.dir)



def test_ps_names_the_certificate_of_an_open_session(gw: InProcessGateway,
                                                     issuer: Issuer) -> None:
    from gateway.cli import format_ps
    from gateway.services.admin import call

    key = issuer.issue("alice", key_id="alice@ps-check", serial=42)
    gw.keys[key.name] = key
    args = gw.ssh_args("alice", key.name, "-o", f"CertificateFile={cert_of(key)}") + [
        "echo up; exec sleep 60"]
    session = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert session.stdout.readline() == b"up\n"
        table = format_ps(call(gw.dir / "state", {"cmd": "ps"}))
        assert "alice: logged in with cert 'alice@ps-check' (serial 42)" in table, table
    finally:
        session.kill()
        session.wait(10)
