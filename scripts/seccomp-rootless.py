#!/usr/bin/env python3
"""Derive the rootless profile's seccomp filter from Docker's own default profile.

    apt-get download golang-github-docker-docker-dev     # the engine's source, same version
    dpkg -x golang-github-docker-docker-dev_*.deb x
    python3 scripts/seccomp-rootless.py \
        x/usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json \
        > gateway/backend/docker/profiles/seccomp-rootless.json

Docker's default profile allows the namespace and mount syscalls only to containers holding
CAP_SYS_ADMIN.  A rootless dockerd needs them without that capability: rootlesskit and the
inner runc create user, mount, network, UTS, IPC and PID namespaces and mount inside them, and
the kernel checks each of those calls against the capabilities *of the new user namespace*, not
the host's.  So exactly these become unconditional (everything else stays as Docker has it):

- unshare, setns, clone (any flags): entering and creating namespaces
- mount, umount, umount2, pivot_root, chroot: the inner root filesystems (chroot: the classic
  builder's layer extraction)
- sethostname, setdomainname: the inner containers' own host names
- keyctl, add_key, request_key answer ENOSYS instead of EPERM: the kernel keyring is keyed by
  host uid, not namespaced, so it stays closed; runc treats ENOSYS as "no keyring" and goes on.
"""

from __future__ import annotations

import json
import sys

ALLOW = ["unshare", "setns", "clone", "mount", "umount", "umount2", "pivot_root", "chroot",
         "sethostname", "setdomainname"]
NO_KEYRING = ["keyctl", "add_key", "request_key"]
ENOSYS = 38


def derive(default: dict) -> dict:
    rules = []
    for rule in default["syscalls"]:
        # Docker's clone rule without SYS_ADMIN masks out the namespace flags; ours allows them.
        if rule["names"] == ["clone"] and rule.get("args"):
            continue
        rules.append(rule)
    rules.append({"names": ALLOW, "action": "SCMP_ACT_ALLOW", "args": [],
                  "comment": "dind-gateway rootless: namespaces and mounts inside the user's "
                             "own user namespace", "includes": {}, "excludes": {}})
    rules.append({"names": NO_KEYRING, "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS,
                  "args": [], "comment": "dind-gateway rootless: the keyring is not namespaced",
                  "includes": {}, "excludes": {}})
    return {**default, "syscalls": rules}


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        json.dump(derive(json.load(fh)), sys.stdout, indent=1)
        sys.stdout.write("\n")
