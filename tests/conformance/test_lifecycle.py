"""Environment lifecycle through the contract: racing first logins, adoption after a restart."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.app import make_backend
from gateway.backend import Limits
from gateway.observe.events import Events

from .conftest import InProcessGateway


def test_racing_first_logins_make_one_environment(live: InProcessGateway) -> None:
    """10 first logins at once: one environment, every login served by it.  On Kubernetes a
    second backend instance (as a second gateway process would be) races too: the API's 409
    answers settle it.  (Not on Docker yet: two DockerBackend instances on one state_dir
    race in the uid check of a stopped container, which removes it under the other.)"""
    user = "dave"
    backend = live.app.backend
    live.call(lambda: backend.purge(user), timeout=180)
    other = None
    if live.kind == "kubernetes":
        other = live.call(lambda: asyncio.sleep(0, make_backend(live.app.config, Events())))

    async def rival() -> str:
        if other is None:
            return ""
        state = await other.ensure(user, Limits(memory=1 << 30, cpus=1.0))
        return state.container_id

    try:
        rival_done = asyncio.run_coroutine_threadsafe(rival(), live._loop)
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: live.ssh(user, "hostname"), range(10)))
        rival_id = rival_done.result(300)
    finally:
        if other is not None:
            live.call(other.close)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert {r.stdout for r in results} == {f"{user}-devbox\n".encode()} or live.kind == "fake"
    envs = [e for e in live.call(backend.list_environments) if e.user == user]
    assert len(envs) == 1 and envs[0].running, envs
    assert rival_id in ("", envs[0].container_id)


def test_restart_adopts_running_environments(live: InProcessGateway) -> None:
    """A new gateway process finds her running environment and uses it: no second start."""
    if live.kind == "fake":
        pytest.skip("the fake backend's environments live in the gateway process itself")
    first = live.ssh("carol", "echo $$ > /tmp/adopt-marker; true")
    assert first.returncode == 0, first.stderr
    before = live.call(lambda: live.app.backend.inspect("carol"))
    live.stop()
    live.start()
    r = live.ssh("carol", "cat /tmp/adopt-marker >/dev/null && echo same")
    assert (r.returncode, r.stdout) == (0, b"same\n"), r.stderr
    assert b"Starting your Docker environment" not in r.stderr, r.stderr
    after = live.call(lambda: live.app.backend.inspect("carol"))
    assert after.running and after.container_id == before.container_id
