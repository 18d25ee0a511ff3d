"""Kubernetes-only behaviour of the backend, on the real cluster (run with the kubernetes
backend selected: DGW_CONFORMANCE_BACKENDS=kubernetes)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from gateway.backend import BackendError, Limits
from gateway.backend.kubernetes import KubeClient, KubernetesBackend

from .conftest import BACKENDS, K8S_HOST_PATH, Cluster

pytestmark = pytest.mark.skipif("kubernetes" not in BACKENDS,
                                reason="the kubernetes backend is not selected")


def test_a_pod_that_cannot_start_is_explained(k8s_cluster: Cluster) -> None:
    """A missing image: the user is told at once (no ready_timeout wait), with the pod's
    events; nothing of a second pod is left after purge."""
    ns = f"dgwk{secrets.token_hex(3)}"
    k8s_cluster.kubectl("create", "namespace", ns)

    async def run() -> str:
        backend = KubernetesBackend(
            KubeClient(k8s_cluster.kubeconfig), image="dind-gateway/absent:none", prefix=ns,
            namespace=ns, host_path=K8S_HOST_PATH, image_pull_policy="Never",
            home_size=1 << 30, docker_size=1 << 30, ready_timeout=300)
        try:
            with pytest.raises(BackendError) as info:
                await backend.ensure("alice", Limits())
            await backend.purge("alice")
            assert await backend.list_environments() == []
            return info.value.user_message
        finally:
            await backend.close()

    try:
        message = asyncio.run(run())
    finally:
        k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        k8s_cluster.kubectl("delete", "pv", "-l", f"dind-gateway.instance={ns}", check=False)
    assert "ErrImageNeverPull" in message and "event:" in message, message
