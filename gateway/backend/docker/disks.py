"""Disk quotas: one sparse XFS image per user, loop-mounted on the host.

Why this and not polling or overlay2's `size=`: the host's root filesystem here is ext4 without
project quotas, so neither `--storage-opt size=` nor XFS project quotas exist; a loop-mounted
filesystem is a hard cap the kernel enforces (a full one answers ENOSPC to that user only),
needs nothing but xfsprogs and util-linux, and `df` inside the container shows the user her own
quota without any help.  XFS rather than ext4: ext4's online resize needs CAP_SYS_RESOURCE,
which hosts like this VM do not grant even to root, while `xfs_growfs` grows a mounted XFS
with the CAP_SYS_ADMIN the gateway has (measured: a full 300 MiB disk grown to 600 MiB live).
XFS cannot shrink; lowering a quota is refused.

Layout under ``<state_dir>/disks``: ``NAME.img`` (sparse: it takes only what is written) and
the mount point ``NAME/`` holding ``home/`` and ``docker/``, which the backend hands to the
container as the user's two volumes.  A group's shared volume is one more such disk, named
``<prefix>.<group>.<volume>``, holding ``data/`` (see `share_permissions`).  Mounted
``nosuid,nodev``.  Everything here needs root on the host, as driving the Docker engine does
anyway.

The mounts must be in the engine's mount namespace (dockerd bind-mounts the disks into her
container).  Under systemd's sandboxing (ProtectSystem= and friends, packaging/
dind-gateway.service) the gateway has a mount namespace of its own, a slave of the host's:
mounts made there never reach dockerd, whatever MountFlags= says (found under real systemd:
"failed to mount local volume ... no such file or directory").  DIND_GATEWAY_MOUNT_NS names
the namespace to mount and unmount in instead (the unit sets /proc/1/ns/mnt: `mount` and
`umount` run through `nsenter --mount=`); the host's mounts propagate back into the slave, so
the gateway sees them at the same paths.  Unset: its own (a plain process, or a container with
the state dir bind-mounted rshared, compose.yaml).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger("dind_gateway.disks")

SUBDIRS = ("home", "docker")
_TOOL_TIMEOUT = 120.0


# POSIX ACL xattr (linux/posix_acl_xattr.h): version 2, then (tag, perm, id) entries.
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER = 0x01, 0x04, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def share_permissions(path: Path, gid: int | None) -> None:
    """Make a group's shared directory usable by every member although each has her own uid:
    owned by root and the group's own gid, mode 2770 (setgid: what is made in it belongs to
    the group; others get nothing), and a default ACL group::rwx so new files and directories
    are group-writable whatever her umask (a default ACL replaces the umask).  Without a gid
    (no uid allocation: only backends that make no environment) it is left alone."""
    if gid is None:
        return
    os.chown(path, 0, gid)
    os.chmod(path, 0o2770)
    acl = struct.pack("<I", _ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, _ACL_UNDEFINED_ID)
        for tag, perm in ((_ACL_USER_OBJ, 7), (_ACL_GROUP_OBJ, 7), (_ACL_OTHER, 0)))
    os.setxattr(path, "system.posix_acl_default", acl)


class DiskError(Exception):
    """A quota could not be set up or changed; the message says why, for the admin."""


def _in_mount_ns(*argv: str) -> tuple[str, ...]:
    """argv run in DIND_GATEWAY_MOUNT_NS when set (see the module docstring), else as it is."""
    ns = os.environ.get("DIND_GATEWAY_MOUNT_NS")
    return ("nsenter", f"--mount={ns}", "--", *argv) if ns else argv


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _TOOL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        raise DiskError(f"{argv[0]} did not finish within {_TOOL_TIMEOUT:.0f} s") from None
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise DiskError(f"{' '.join(argv)} failed ({proc.returncode}): {text}")
    return text


def _mounted_source(mountpoint: Path) -> str | None:
    """The device mounted exactly at mountpoint, from /proc/self/mountinfo, else None."""
    target = os.fspath(mountpoint)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == target:
                return fields[fields.index("-") + 2]
    return None


class Disks:
    """The quota'd filesystems of one gateway instance (names are <prefix>-<user>)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def image(self, name: str) -> Path:
        return self.root / f"{name}.img"

    def mountpoint(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.image(name).exists()

    async def ensure(self, name: str, size: int, subdirs: tuple[str, ...] = SUBDIRS) -> Path:
        """Create (first time), mount (if not mounted) and grow (if size grew); the mount point.

        Never shrinks: see resize().  `subdirs` are made on it (a user's home/ and docker/, a
        group's shared data/).
        """
        image, mnt = self.image(name), self.mountpoint(name)
        if not image.exists():
            await self._create(image, size)
        mnt.mkdir(parents=True, exist_ok=True)
        if _mounted_source(mnt) is None:
            await _run(*_in_mount_ns("mount", "-t", "xfs", "-o", "loop,nosuid,nodev,noatime",
                                     os.fspath(image), os.fspath(mnt)))
        for sub in subdirs:
            (mnt / sub).mkdir(exist_ok=True)
        if size > self.size(name):
            await self.resize(name, size)
        return mnt

    async def _create(self, image: Path, size: int) -> None:
        image.parent.mkdir(parents=True, exist_ok=True)
        tmp = image.with_suffix(".new")
        await _run("truncate", "-s", str(size), os.fspath(tmp))  # sparse
        os.chmod(tmp, 0o600)
        await _run("mkfs.xfs", "-q", "-f", os.fspath(tmp))
        os.replace(tmp, image)
        log.info("created disk %s (%d MiB)", image, size >> 20)

    def used(self, name: str) -> int:
        """Bytes in use on a mounted disk (statvfs, as df counts them)."""
        st = os.statvfs(self.mountpoint(name))
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def size(self, name: str) -> int:
        """The quota: the image's size (the filesystem's own size is that less metadata)."""
        return self.image(name).stat().st_size

    def mounted(self, name: str) -> bool:
        return _mounted_source(self.mountpoint(name)) is not None

    async def resize(self, name: str, size: int) -> None:
        """Grow a mounted disk online.  Shrinking is refused: XFS cannot shrink, and a quota
        below what is stored would lose data."""
        mnt = self.mountpoint(name)
        device = _mounted_source(mnt)
        if device is None:
            raise DiskError(f"disk {name} is not mounted")
        current = self.size(name)
        if size < current:
            used = self.used(name)
            if size < used:
                raise DiskError(f"cannot lower the quota of {name} to {size >> 20} MiB: "
                                f"{used >> 20} MiB are in use")
            raise DiskError(f"cannot lower the quota of {name} to {size >> 20} MiB (now "
                            f"{current >> 20} MiB): a quota can only grow while it is in use")
        if size == current:
            return
        await _run("truncate", "-s", str(size), os.fspath(self.image(name)))
        await _run("losetup", "-c", device)
        await _run("xfs_growfs", os.fspath(mnt))
        log.info("disk %s grown to %d MiB", name, size >> 20)

    async def remove(self, name: str) -> None:
        """Unmount and delete a disk with all its data (purge)."""
        mnt = self.mountpoint(name)
        if _mounted_source(mnt) is not None:
            await _run(*_in_mount_ns("umount", os.fspath(mnt)))
        self.image(name).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            mnt.rmdir()  # empty once unmounted: home/ and docker/ live on the image
