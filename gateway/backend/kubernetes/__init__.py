"""Kubernetes: one DinD pod per user (see `backend` for the objects it makes)."""

import logging
from typing import Any

from .backend import LABEL_INSTANCE, LABEL_MANAGED, LABEL_OWNER, KubernetesBackend
from .client import KubeClient, KubeError

log = logging.getLogger("dind_gateway")

__all__ = ["LABEL_INSTANCE", "LABEL_MANAGED", "LABEL_OWNER", "KubeClient", "KubeError",
           "KubernetesBackend", "from_config"]


def from_config(config: Any, events: Any) -> KubernetesBackend:
    """The Kubernetes backend as gateway.yaml's `kubernetes:` group describes it."""
    k = config.kubernetes
    profile = config.security_profile
    if profile != "privileged":
        raise ValueError(f"security_profile {profile!r} is not offered by backend kubernetes: "
                         "set security_profile: privileged (see README, Kubernetes)")
    log.warning("backend kubernetes: user pods are privileged (the only profile this backend "
                "offers): users are root-equivalent on their node; for trusted teams only")
    return KubernetesBackend(
        KubeClient(k.kubeconfig, k.context), image=config.image, prefix=config.prefix,
        namespace=k.namespace, profile=profile, ready_timeout=config.ready_timeout,
        events=events, storage_class=k.storage_class, host_path=k.host_path,
        home_size=k.home_size, docker_size=k.docker_size,
        image_pull_policy=k.image_pull_policy, node_selector=dict(k.node_selector),
        gateway_labels=dict(k.gateway_labels))
