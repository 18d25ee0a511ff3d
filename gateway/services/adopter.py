"""Adoption: take over the environments a previous gateway process left, once the platform
answers.

At start the gateway adopts before it serves.  If the container platform does not answer
then (dockerd not started yet, a wrong `docker_host`), the gateway serves SSH anyway: it logs
once what is wrong and what to do, tries again in the background with a growing pause, and
every login is told to try again until adoption has happened.  No session starts in an
environment before its leftovers from the previous run are reaped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..aio import background
from ..backend import Backend, BackendError, EnvState
from ..config import UsersConfig
from ..errors import GatewayError
from .registry import Activity

log = logging.getLogger("dind_gateway")

RETRY_MIN = 1.0
RETRY_MAX = 30.0
ADOPT_AT_ONCE = 8  # environments stopped or reaped at the same time at start


class PlatformUnavailable(GatewayError):
    """A login while the platform has not answered since the gateway started."""


class Adopter:
    """Adopts once; until it has, `ready()` refuses with a try-again message."""

    def __init__(self, backend: Backend, users: Callable[[], UsersConfig],
                 activity: Activity) -> None:
        self.backend = backend
        self.users = users
        self.activity = activity
        self.done = False
        self._lock = asyncio.Lock()
        self._retry: asyncio.Task[None] | None = None
        self._error: BackendError | None = None

    async def start(self) -> None:
        """Adopt now; if the platform does not answer, say so and keep trying."""
        try:
            await self._attempt()
        except BackendError as exc:
            log.error("the container platform does not answer at start: %s. Serving SSH "
                      "anyway: logins are told to try again until it answers (retried every "
                      "%g-%g s). To fix: %s", exc, RETRY_MIN, RETRY_MAX,
                      self.backend.outage_hint)
            self._retry = background(self._keep_trying())

    async def ready(self) -> None:
        """Before any environment is touched: adopted, or adopted now, or refused."""
        if self.done:
            return
        try:
            await self._attempt()
        except BackendError as exc:
            raise PlatformUnavailable(exc.user_message, f"not adopted yet: {exc}",
                                      exc.reason) from exc

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()

    async def _keep_trying(self) -> None:
        delay = RETRY_MIN
        while not self.done:
            await asyncio.sleep(delay)
            try:
                await self._attempt()
            except BackendError as exc:
                log.debug("container platform still unavailable: %s", exc)
                delay = min(delay * 2, RETRY_MAX)

    async def _attempt(self) -> None:
        async with self._lock:
            if self.done:
                return
            await self._adopt()
            if self._retry is not None:
                log.info("the container platform answers again: adopted what the previous "
                         "run left; logins are served")
            self.done = True

    async def _adopt(self) -> None:
        """Running environments keep running and their idle clock starts now; those of
        users who are no longer allowed in are stopped (their data is kept).

        Environments are taken in hand `ADOPT_AT_ONCE` at a time: a stop waits for her
        inner daemon to stop its containers (seconds on Docker, ~13 s for a pod on
        Kubernetes), and logins wait for adoption, so one at a time made a restart after
        removing ten users take minutes."""
        users = self.users()
        gate = asyncio.Semaphore(ADOPT_AT_ONCE)

        async def take(state: EnvState) -> None:
            user = users.user(state.user)
            async with gate:
                if user is None or user.disabled:
                    log.info("stopping %s's environment: user no longer allowed", state.user)
                    await self.backend.stop(state.user)
                    return
                self.activity.touch(state.user)
                log.info("adopted running environment of %s (%s)", state.user,
                         state.container_id[:12])
                await self.backend.reap(state.user)  # before any new session can start

        running = [state for state in await self.backend.list_environments() if state.running]
        results = await asyncio.gather(*(take(state) for state in running),
                                       return_exceptions=True)
        # every environment was tried; the first failure (the platform went away) is the
        # attempt's: it is retried as a whole, and stop and reap are safe to repeat
        for result in results:
            if isinstance(result, BaseException):
                raise result
