"""Per-user host uids and subordinate id ranges, allocated once and kept in the state dir.

User containers have no user namespace of their own, so the uid a user's processes run as is a
*host* uid, and the kernel counts per-uid limits (inotify instances and watches, user
namespaces, RLIMIT_NPROC, the keyring) across every container that uses it.  So each user gets
her own uid and her own subordinate range for her rootless inner daemon, disjoint from
everybody else's:

    slot k (0, 1, 2, ... in order of first login)
    uid = gid = UID_BASE + k                 alice 40000, bob 40001, ... up to UID_LAST
    subordinate ids = SUB_BASE + k * 65536   (the 65536 ids her inner containers use)

Her uid must stay below 65537: her rootless daemon maps inner ids 1..65536 onto her
subordinate range, and the Docker CLI sends files owned by her own uid (`docker build -` with
a Dockerfile on stdin, `docker cp`), which the daemon must be able to chown inside that range
(a uid of 2000000 made such builds fail with "lchown: invalid argument").  40000-59999 is
inside the range Debian gives ordinary users but above what small and medium hosts use, and
below systemd's dynamic users (61184-65519); on a host whose own users reach 40000, check
(docs/security.md).  The subordinate ranges start at 2000000, above the 100000 + n * 65536
ranges `useradd` hands the first 29 host users.

The allocation lives in ``<state_dir>/uids.json``: written atomically (temporary file, fsync,
rename), and made under an exclusive ``flock`` of ``uids.lock`` that is held across
read-modify-write, so concurrent first logins - in this process or in another gateway process
on the same state dir - never get the same slot.  Slots are never reused: `purge` keeps the
user's slot (the next environment of the same name gets the same ids) and a slot freed by
editing the file by hand is not handed out again (`next` only grows), so a uid never moves
from one person to another and whatever a former user left on the host stays attributable.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

UID_BASE = 40000
UID_LAST = 59999  # 20000 users
SUB_BASE = 2_000_000
SUB_COUNT = 65536
MAX_ID = 2**31 - 2  # dind-init refuses ids >= 2^31 - 1
FILE_VERSION = 2

# What the previous version gave everybody (and what a volume without a migration marker
# was made with).
LEGACY_UID = 1000
LEGACY_SUB = 100000


class UidError(Exception):
    """The allocation file cannot be used; the message says why and where."""


@dataclass(frozen=True)
class Ids:
    """One user's host ids: her uid (= gid) and the first of her SUB_COUNT subordinate ids."""

    uid: int
    sub: int

    @property
    def gid(self) -> int:
        return self.uid

    def env(self) -> list[str]:
        """The container environment dind-init takes them from."""
        return [f"DGW_UID={self.uid}", f"DGW_SUBID={self.sub}"]


LEGACY = Ids(LEGACY_UID, LEGACY_SUB)


def ids_of_slot(slot: int) -> Ids:
    uid, sub = UID_BASE + slot, SUB_BASE + slot * SUB_COUNT
    if slot < 0 or uid > UID_LAST or sub + SUB_COUNT > MAX_ID:
        raise UidError(f"uid slot {slot} is out of range (at most {UID_LAST - UID_BASE + 1} "
                       f"users: uids {UID_BASE}-{UID_LAST})")
    return Ids(uid, sub)


class UidMap:
    """user name -> Ids, persisted in one JSON file; safe across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cache: dict[str, Ids] = {}

    def get(self, user: str) -> Ids:
        """The user's ids, allocating the next free slot at her first call (blocking I/O)."""
        if os.environ.get("DGW_LEGACY_UIDS") == "1":
            # test hook: make environments exactly as the previous version did
            return LEGACY
        ids = self._cache.get(user)
        if ids is not None:
            return ids
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
                data = self._read()
                slot = data["users"].get(user)
                if slot is None:
                    slot = data["next"]
                    ids_of_slot(slot)  # fails before anything is written
                    data["users"][user] = slot
                    data["next"] = slot + 1
                    self._write(data)
        ids = ids_of_slot(slot)
        self._cache[user] = ids
        return ids

    def _read(self) -> dict:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {"version": FILE_VERSION, "uid_base": UID_BASE, "sub_base": SUB_BASE,
                    "next": 0, "users": {}}
        try:
            data = json.loads(text)
            users = data["users"]
            ok = (data.get("version") == FILE_VERSION and data.get("uid_base") == UID_BASE
                  and data.get("sub_base") == SUB_BASE and isinstance(users, dict)
                  and isinstance(data.get("next"), int)
                  and all(isinstance(s, int) and 0 <= s < data["next"] for s in users.values())
                  and len(set(users.values())) == len(users))
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            # never guess: a re-allocation would hand one user's files to another
            raise UidError(f"{self.path} is not a valid uid allocation (version {FILE_VERSION}"
                           f", uid_base {UID_BASE}, sub_base {SUB_BASE}, distinct slots below "
                           "'next'); fix or restore it")
        return data

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def container_ids(info: dict) -> Ids:
    """The ids an existing container was created with (the previous version set DGW_UID=1000
    and no DGW_SUBID: its inner daemon used 100000..165535)."""
    env = dict(e.split("=", 1) for e in (info.get("Config") or {}).get("Env") or [] if "=" in e)
    try:
        return Ids(int(env.get("DGW_UID", LEGACY_UID)), int(env.get("DGW_SUBID", LEGACY_SUB)))
    except ValueError:
        return Ids(-1, -1)
