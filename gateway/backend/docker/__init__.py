"""Docker: one DinD container per user (see `backend` for the layout of this package)."""

import logging
import os
from typing import Any

from .backend import LABEL_INSTANCE, LABEL_MANAGED, LABEL_OWNER, DockerBackend
from .direct import RUNC_ROOT, DirectExec
from .engine import DockerClient, DockerError
from .firewall import CHAIN as FIREWALL_CHAIN
from .firewall import HostFirewall
from .registry import RegistryOptions
from .security import PROFILES, ROOT_EQUIVALENT, check_host

log = logging.getLogger("dind_gateway")

__all__ = ["LABEL_INSTANCE", "LABEL_MANAGED", "LABEL_OWNER", "PROFILES", "ROOT_EQUIVALENT",
           "DockerBackend", "DockerClient", "DockerError", "from_config"]


def from_config(config: Any, events: Any) -> DockerBackend:
    """The Docker backend as gateway.yaml describes it; says at start what the profile means
    and refuses one this host cannot run."""
    profile = config.security_profile
    if profile in ROOT_EQUIVALENT:
        log.warning("security_profile %s: users are root-equivalent on the host: for trusted "
                    "teams only (docs/security.md); the default 'rootless' is not", profile)
    check_host(profile)
    if config.host_firewall:
        why_not = HostFirewall(config.user_network_pool).install()
        if why_not:
            log.warning("host_firewall: not in place (%s): host services bound to all "
                        "addresses are reachable from user networks; bind them to loopback "
                        "or filter INPUT from %s", why_not, config.user_network_pool)
        else:
            log.info("host_firewall: new connections from %s to this host are dropped "
                     "(iptables chain %s)", config.user_network_pool, FIREWALL_CHAIN)
    direct = None
    if config.process_path == "engine":
        log.info("sessions start through the engine's exec API (process_path: engine)")
    else:
        direct = DirectExec.probe()
        if direct is None and config.process_path == "direct":
            raise SystemExit("dind-gateway: process_path: direct needs root, runc on PATH and "
                             "the engine's "
                             f"runc state in {RUNC_ROOT} on this host; use 'auto' or 'engine'")
        if direct is None:
            log.info("sessions start through the engine's exec API")
        elif os.path.isdir(direct.root):
            log.info("sessions start through runc (%s, %s)", direct.runc, direct.root)
        else:
            log.info("sessions start through runc (%s) once the engine has its runc state in "
                     "%s (none yet: its first container makes it); until then through the "
                     "engine's exec API", direct.runc, direct.root)
    return DockerBackend(
        DockerClient(config.docker_url()), image=config.image, prefix=config.prefix,
        profile=profile, ready_timeout=config.ready_timeout, events=events,
        network_pool=str(config.user_network_pool), disks_dir=config.state_dir / "disks",
        uids_file=config.state_dir / "uids.json",
        registry=RegistryOptions(config.registry_mirror, config.insecure_registries,
                                 config.preload_images),
        direct=direct)
