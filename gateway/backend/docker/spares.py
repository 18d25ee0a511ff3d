"""One pre-started, waiting process per user, so a warm `ssh host cmd` skips runc's start-up.

Starting a `docker exec` costs ~45 ms here, almost all of it runc entering the container.  Most
warm logins are non-interactive (`ssh host make`, scp, rsync, sftp, IDE probes), so after each
such session the backend starts a *spare*: a non-TTY exec, as the user, in the home directory,
running a shell that blocks reading one line from stdin.  The next non-TTY session writes that
line — its environment and argv, encoded so it holds no newline — and the spare `exec`s it; from
then on stdin/stdout/stderr, exit code and signals are exactly those of a fresh exec.

A spare that is gone (container stopped, restarted) is noticed by an inspect before use and
replaced by a fresh exec; if the gateway dies, Docker closes the spare's stdin and it exits.

The direct path (direct.py) keeps spares of its own, started through runc, with the same header
(backend.py `_replenish_direct`), and for interactive logins a *terminal* spare too: a TTY
process in her home reading the header from fd 3, a pipe runc preserved for it, since her
terminal would echo the line and cut it at 4096 bytes (`PTY_SPARE_ARGV`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from .engine import DockerClient, DockerError, ExecStream

log = logging.getLogger("dind_gateway.prestart")

# Reads the header line, decodes \\0ooo escapes with printf %b and evaluates it. `read` on a
# pipe takes one byte at a time, so nothing of the session's own stdin is consumed.
SPARE_ARGV = ["/bin/sh", "-c",
              'IFS= read -r dgw_h || exit 0; eval "$(printf \'%b\' "$dgw_h")"', "sh"]
# A terminal spare of the direct path (direct.py) reads it from fd 3, a pipe of its own: not
# through its terminal, which would echo it and cut a line at 4096 bytes; fd 3 is closed first.
PTY_SPARE_ARGV = ["/bin/sh", "-c", 'IFS= read -r dgw_h <&3 || exit 0; exec 3<&-; '
                  'eval "$(printf \'%b\' "$dgw_h")"', "sh"]
_SAFE = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-./:=,@+ ")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def encode_header(argv: list[str], env: dict[str, str]) -> bytes:
    """`export K='v'; exec 'argv'...` as one line: every unsafe byte becomes \\0ooo.

    Names are never quoted, so only plain shell names pass (a session's variables were
    filtered already; this is the last line of defence before `eval`)."""
    bad = [k for k in env if not _NAME.fullmatch(k)]
    if bad:
        raise ValueError(f"not a variable name: {bad[0]!r}")
    script = "".join(f"export {k}={_quote(v)}; " for k, v in env.items())
    script += "exec " + " ".join(_quote(a) for a in argv)
    out = bytearray()
    for byte in script.encode():
        out += bytes([byte]) if byte in _SAFE else b"\\0%03o" % byte
    return bytes(out) + b"\n"


class Spares:
    """At most one waiting spare exec per user."""

    def __init__(self, docker: DockerClient, container_name: Callable[[str], str]) -> None:
        self.docker = docker
        self.container_name = container_name
        self._spares: dict[str, tuple[str, ExecStream]] = {}
        self._starting: set[str] = set()

    def usable(self, user: str, tty: bool, workdir: str) -> bool:
        return not tty and workdir == f"/home/{user}"

    async def take(self, user: str) -> tuple[str, ExecStream] | None:
        """A live spare of this user's, or None."""
        spare = self._spares.pop(user, None)
        if spare is None:
            return None
        exec_id, stream = spare
        try:
            alive = (await self.docker.exec_inspect(exec_id)).get("Running")
        except DockerError:
            alive = False
        if not alive or stream.at_eof():
            stream.close()
            return None
        return spare

    async def replenish(self, user: str) -> None:
        """Start a spare for the user's next session (best effort, never raises)."""
        if user in self._spares or user in self._starting:
            return
        self._starting.add(user)
        try:
            name = self.container_name(user)
            exec_id = await self.docker.exec_create(
                name, SPARE_ARGV, tty=False, user=user, workdir=f"/home/{user}")
            stream = await self.docker.exec_start(exec_id, False)
            old = self._spares.pop(user, None)
            if old is not None:
                old[1].close()
            self._spares[user] = (exec_id, stream)
        except DockerError as exc:
            log.debug("no spare for %s: %s", user, exc)
        finally:
            self._starting.discard(user)

    def drop(self, user: str) -> None:
        spare = self._spares.pop(user, None)
        if spare is not None:
            spare[1].close()

    def drop_all(self) -> None:
        for user in list(self._spares):
            self.drop(user)
