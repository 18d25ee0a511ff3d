"""Certificate trust material: trusted user CA keys, and revocation lists (OpenSSH KRL or a
file of public keys, as sshd's ``RevokedKeys``), re-read whenever the file changes.

The KRL format is OpenSSH's PROTOCOL.krl, parsed here in full: certificate sections per CA
(serial lists, ranges and bitmaps, key ids; an empty CA means "any CA" for key ids), explicit
keys, SHA-1 and SHA-256 fingerprints.  Signature sections are skipped (the file is the admin's
own, like sshd, which does not verify them either).  A file that cannot be read or parsed at
run time makes every check fail closed, as sshd refuses public-key logins then.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from asyncssh import SSHKey
from asyncssh.public_key import KeyImportError, import_certificate, import_public_key

log = logging.getLogger("dind_gateway.krl")

KRL_MAGIC = b"SSHKRL\n\0"
KRL_FORMAT_VERSION = 1
_SECTION_CERTIFICATES = 1
_SECTION_EXPLICIT_KEY = 2
_SECTION_FINGERPRINT_SHA1 = 3
_SECTION_SIGNATURE = 4
_SECTION_FINGERPRINT_SHA256 = 5
_CERT_SERIAL_LIST = 0x20
_CERT_SERIAL_RANGE = 0x21
_CERT_SERIAL_BITMAP = 0x22
_CERT_KEY_ID = 0x23


class KRLError(ValueError):
    """A revocation list or CA key file that cannot be used; ``line`` is set for text files."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class WireReader:
    """SSH wire-format fields (uint32, uint64, string) read in order; KRLError if short."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def __bool__(self) -> bool:
        return self.pos < len(self.data)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise KRLError(f"truncated {self.what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def uint32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def uint64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.uint32())


@dataclass
class _CertRevocations:
    serials: set[int] = field(default_factory=set)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    key_ids: set[str] = field(default_factory=set)

    def serial_revoked(self, serial: int) -> bool:
        return serial in self.serials or any(lo <= serial <= hi for lo, hi in self.ranges)


@dataclass
class Revocations:
    """What one revoked_keys file revokes.  ``by_ca`` is keyed by the CA's public key blob
    (b"" for sections that apply to certificates of any CA)."""

    by_ca: dict[bytes, _CertRevocations] = field(default_factory=dict)
    blobs: set[bytes] = field(default_factory=set)
    sha1: set[bytes] = field(default_factory=set)
    sha256: set[bytes] = field(default_factory=set)

    def key_revoked(self, blob: bytes) -> bool:
        """Whether a plain public key (its wire blob) is revoked."""
        return (blob in self.blobs or hashlib.sha256(blob).digest() in self.sha256
                or hashlib.sha1(blob).digest() in self.sha1)  # noqa: S324 - KRL format

    def cert_revoked(self, ca_blob: bytes, serial: int, key_id: str) -> str | None:
        """Why a certificate of this CA is revoked (``serial`` / ``key id``), else None."""
        for blob in (ca_blob, b""):
            section = self.by_ca.get(blob)
            if section is None:
                continue
            if blob and serial and section.serial_revoked(serial):
                return f"serial {serial}"
            if key_id in section.key_ids:
                return f"key id {key_id!r}"
        return None


def parse_krl(data: bytes) -> Revocations:
    """An OpenSSH KRL (``ssh-keygen -k``) into `Revocations`; KRLError if malformed."""
    r = WireReader(data, "KRL header")
    if r.take(8) != KRL_MAGIC:
        raise KRLError("not an OpenSSH KRL")
    version = r.uint32()
    if version != KRL_FORMAT_VERSION:
        raise KRLError(f"unsupported KRL format version {version}")
    r.uint64(), r.uint64(), r.uint64()  # krl_version, generated_date, flags
    r.string(), r.string()  # reserved, comment
    out = Revocations()
    while r:
        kind = r.byte()
        body = WireReader(r.string(), f"KRL section {kind}")
        if kind == _SECTION_CERTIFICATES:
            _parse_cert_section(body, out)
        elif kind == _SECTION_EXPLICIT_KEY:
            while body:
                out.blobs.add(body.string())
        elif kind in (_SECTION_FINGERPRINT_SHA1, _SECTION_FINGERPRINT_SHA256):
            size, target = (20, out.sha1) if kind == _SECTION_FINGERPRINT_SHA1 else (32,
                                                                                out.sha256)
            while body:
                digest = body.string()
                if len(digest) != size:
                    raise KRLError(f"bad fingerprint length {len(digest)} in KRL section {kind}")
                target.add(digest)
        elif kind == _SECTION_SIGNATURE:
            continue
        else:
            raise KRLError(f"unknown KRL section type {kind}")
    return out


def _parse_cert_section(body: WireReader, out: Revocations) -> None:
    ca = body.string()
    body.string()  # reserved
    section = out.by_ca.setdefault(ca, _CertRevocations())
    while body:
        kind = body.byte()
        sub = WireReader(body.string(), f"KRL certificate subsection {kind:#x}")
        if kind == _CERT_SERIAL_LIST:
            while sub:
                section.serials.add(sub.uint64())
        elif kind == _CERT_SERIAL_RANGE:
            lo, hi = sub.uint64(), sub.uint64()
            if lo > hi:
                raise KRLError(f"KRL serial range {lo}-{hi} is reversed")
            section.ranges.append((lo, hi))
        elif kind == _CERT_SERIAL_BITMAP:
            offset = sub.uint64()
            bits = int.from_bytes(sub.string(), "big")  # an mpint, never negative here
            i = 0
            while bits:
                if bits & 1:
                    section.serials.add(offset + i)
                bits >>= 1
                i += 1
        elif kind == _CERT_KEY_ID:
            while sub:
                section.key_ids.add(sub.string().decode("utf-8", "replace"))
        else:
            raise KRLError(f"unknown KRL certificate subsection type {kind:#x}")


def _import_key_line(text: str) -> SSHKey:
    """One public key (or certificate: its key) from an authorized_keys-style line."""
    try:
        return import_public_key(text)
    except KeyImportError:
        pass
    try:
        return import_certificate(text).key
    except (KeyImportError, ValueError):
        raise KRLError("not an OpenSSH public key line (expected 'ssh-ed25519 AAAA... "
                       "comment'; was it cut or wrapped?)") from None


def parse_key_lines(text: str, *, allow_certs: bool = True) -> list[tuple[int, SSHKey]]:
    """Public keys one per line (blank lines and # comments skipped), with their line numbers."""
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not allow_certs and line.split()[0].endswith("-cert-v01@openssh.com"):
            raise KRLError("a certificate is not a CA key; list the CA's public key "
                           "(the .pub of the key given to ssh-keygen -s)", number)
        try:
            key = _import_key_line(line)
        except KRLError as exc:
            raise KRLError(str(exc), number) from None
        if not allow_certs and key.get_algorithm() == "ssh-dss":
            raise KRLError("DSA (ssh-dss) keys are insecure and not accepted", number)
        out.append((number, key))
    return out


def parse_revoked(data: bytes) -> Revocations:
    """A revoked_keys file: a KRL if it starts with the KRL magic, else public key lines."""
    if data.startswith(KRL_MAGIC):
        return parse_krl(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KRLError("neither an OpenSSH KRL nor a text file of public keys") from None
    out = Revocations()
    for _, key in parse_key_lines(text):
        out.blobs.add(key.public_data)
    return out


@dataclass(frozen=True)
class TrustedCA:
    """A CA key from trusted_user_ca_keys, and where it was configured."""

    key: SSHKey
    fingerprint: str
    source: str  # file:line


class RevokedKeys:
    """A revoked_keys file, re-read when it changes (mtime, size, inode), checked per login."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False
        self._current: Revocations | None = None
        self.error: str | None = None
        self.refresh()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def refresh(self) -> Revocations | None:
        """The current revocations, or None (fail closed) when the file is unusable."""
        stamp = self._file_stamp()
        if self._loaded and stamp == self._stamp:
            return self._current
        self._stamp, self._loaded = stamp, True
        try:
            data = self.path.read_bytes()
            self._current = parse_revoked(data)
            self.error = None
            log.info("revoked keys loaded from %s", self.path)
        except (OSError, KRLError) as exc:
            self._current = None
            self.error = str(exc.strerror if isinstance(exc, OSError) else exc)
            log.error("revoked_keys %s unusable, refusing key logins: %s", self.path,
                      self.error)
        return self._current
