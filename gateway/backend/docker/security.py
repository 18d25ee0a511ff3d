"""Security profiles: what the engine is asked to grant each user's container.

docs/security.md states the threat model and why each remaining flag of the default
`rootless` profile is needed; `hardened` and `privileged` make the user root-equivalent on the
host and are for trusted teams only.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

from ..base import Limits

PROFILES = ("rootless", "hardened", "privileged", "sysbox")
# Profiles under which the user holds root-equivalent power over the host (docs/security.md).
ROOT_EQUIVALENT = ("hardened", "privileged")
# What the rootless profile's init still needs as root before it drops to the user: chown of
# her home, volume and tun device, setuid/setgid to become her, and kill for tini (root) to
# pass `docker stop`'s signal to her daemon.  Everything else of Docker's default set goes.
ROOTLESS_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL"]
TMP_DEFAULT = 1 << 30  # /tmp size when memory is unlimited (tmpfs counts against memory)
# The rootless profile's AppArmor profile (profiles/apparmor-rootless, loaded by check_host).
APPARMOR_PROFILE = "dgw-rootless"

log = logging.getLogger("dind_gateway")


def host_config(profile: str, limits: Limits) -> dict[str, Any]:
    """The HostConfig fields of one profile."""
    if profile == "rootless":
        tmp = f"exec,size={limits.memory or TMP_DEFAULT}"
        opts = [f"seccomp={rootless_seccomp()}"]
        if apparmor_enabled():
            # docker-default denies mount(2), which rootlesskit and slirp4netns need in her
            # own user namespace (her daemon fails with "slirp4netns failed"): dgw-rootless is
            # docker-default with mount allowed; unconfined only where it cannot be loaded.
            opts.append(f"apparmor={_apparmor_loaded() or 'unconfined'}")
        return {
            "CgroupnsMode": "private",
            "CapDrop": ["ALL"],
            "CapAdd": ROOTLESS_CAPS,
            "SecurityOpt": opts,
            # an unmasked /proc: the kernel lets a user namespace mount a new proc only
            # where the existing one is fully visible (inner containers need that)
            "MaskedPaths": [],
            "ReadonlyPaths": [],
            "Devices": [{"PathOnHost": "/dev/net/tun", "PathInContainer": "/dev/net/tun",
                         "CgroupPermissions": "rwm"}],
            # the user can write nowhere on the container's root filesystem; what she
            # may write outside her volumes is in memory, under her memory cap
            "Tmpfs": {"/run": "exec,size=64m", "/tmp": tmp, "/var/tmp": tmp},
        }
    if profile == "privileged":
        return {"Privileged": True, "CgroupnsMode": "private"}
    if profile == "sysbox":
        return {"Runtime": "sysbox-runc"}
    # hardened: the least that runs dockerd here (shared/notes/dind-here.md).  The CLI's
    # `systempaths=unconfined` is client-side sugar for empty Masked/ReadonlyPaths.
    return {
        "CgroupnsMode": "private",
        "CapAdd": ["SYS_ADMIN", "NET_ADMIN"],
        "SecurityOpt": ["seccomp=unconfined", "apparmor=unconfined"],
        "MaskedPaths": [],
        "ReadonlyPaths": [],
    }


def limit_spec(limits: Limits) -> dict[str, Any]:
    """cpus / memory / pids as engine fields (create and live update)."""
    mem = limits.memory or 0
    return {
        "Memory": mem,
        # swap equal to memory: no swapping past the cap; -1 would allow unlimited swap.
        "MemorySwap": mem if mem else -1,
        "NanoCpus": int((limits.cpus or 0) * 1e9),
        "PidsLimit": limits.pids or -1,
    }


@functools.cache
def rootless_seccomp() -> str:
    """The rootless profile's seccomp filter as JSON (scripts/seccomp-rootless.py made it)."""
    text = resources.files(__package__).joinpath("profiles/seccomp-rootless.json").read_text()
    return json.dumps(json.loads(text), separators=(",", ":"))  # compact, as the CLI sends it


def apparmor_enabled() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


_APPARMOR: dict[str, str] = {}


def _apparmor_loaded() -> str:
    return _APPARMOR.get("profile", "")


def load_apparmor_profile() -> str:
    """Load (or replace) dgw-rootless into the kernel; its name, or "" where that fails
    (no apparmor_parser, e.g. a containerised gateway) - the caller then uses unconfined.
    `userns,` (AppArmor 4, e.g. Ubuntu 24.04's restricted unprivileged user namespaces) is
    offered first; parsers that do not know the rule get the profile without it."""
    parser = shutil.which("apparmor_parser")
    if not parser:
        return ""
    text = resources.files(__package__).joinpath("profiles/apparmor-rootless").read_text()
    err = ""
    for userns in ("userns,", ""):
        r = subprocess.run([parser, "-r", "-K"], input=text.replace("@USERNS@", userns),
                           capture_output=True, text=True, timeout=60, check=False)
        if r.returncode == 0:
            return APPARMOR_PROFILE
        err = r.stderr.strip()
    log.warning("cannot load AppArmor profile %s (%s)", APPARMOR_PROFILE, err)
    return ""


def check_host(profile: str) -> None:
    """Refuse at start a profile this host cannot run, saying which one to use instead; on an
    AppArmor host, load the rootless profile's AppArmor profile."""
    if profile != "rootless":
        return
    if apparmor_enabled():
        _APPARMOR["profile"] = load_apparmor_profile()
        if _APPARMOR["profile"]:
            log.info("AppArmor: user containers run under %s", APPARMOR_PROFILE)
        else:
            log.warning("AppArmor: user containers run unconfined (%s could not be loaded; "
                        "load gateway/backend/docker/profiles/apparmor-rootless with "
                        "apparmor_parser -r and restart)", APPARMOR_PROFILE)
    # The kernel is the engine's too (a containerised gateway shares it); /dev/net/tun is
    # checked by the engine when a container is created, and its error reaches the user.
    try:
        userns = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        userns = 1
    if userns == 0:
        raise SystemExit("dind-gateway: security_profile rootless cannot run on this host "
                         "(user namespaces are disabled: user.max_user_namespaces = 0); "
                         "enable them, or choose sysbox (or, for a trusted team only, "
                         "hardened) in gateway.yaml")
