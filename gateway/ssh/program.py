"""What a session runs: request + principal + settings → a `ProcessSpec`.  Pure; no I/O.

sshd's rules, as users expect them: a forced command (`command=` in the key) replaces what
the client asked for and gets `SSH_ORIGINAL_COMMAND`; `exec` runs through the user's shell;
`shell` is her login shell; the environment is the client's accepted variables,
`OMP_NUM_THREADS` from her CPU cap (coreutils' `nproc` reads it: the host's CPU count is not
what she can use), the key's `environment=`, then what the gateway and the backend set (those
always win).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..auth import AuthorizedKey
from ..backend import ProcessSpec
from ..config import User

# Client variables let through: OpenSSH's default AcceptEnv on Debian, plus GIT_PROTOCOL (as
# sshd's default config since 8.x, so git over ssh speaks protocol v2).
ENV_ALLOWED = re.compile(r"LANG|LC_[A-Z_]+|TERM|COLORTERM|GIT_PROTOCOL")  # fullmatch: no "LANG\n"


@dataclass(frozen=True)
class Principal:
    """Who is logged in on a connection and with which key (None: password)."""

    user: User
    key: AuthorizedKey | None


@dataclass(frozen=True)
class SessionRequest:
    """What the client asked for on one session channel."""

    kind: str  # shell | exec | sftp
    command: str | None = None
    term_type: str = ""
    size: tuple[int, int] = (80, 24)  # columns, rows
    client_env: Mapping[str, str] | None = None
    ssh_connection: str = ""

    @property
    def tty(self) -> bool:
        return bool(self.term_type)


def home_of(user: User) -> str:
    return f"/home/{user.name}"


def program(request: SessionRequest, principal: Principal,
            backend_env: Mapping[str, str]) -> ProcessSpec:
    """The process for this session in the user's environment."""
    user, key = principal.user, principal.key
    env = {k: v for k, v in (request.client_env or {}).items() if ENV_ALLOWED.fullmatch(k)}
    if user.cpus is not None:  # `nproc` (and OpenMP) then size themselves to her CPU cap
        env["OMP_NUM_THREADS"] = str(max(1, math.ceil(user.cpus)))
    if key is not None:
        env.update(key.environment)
    env.update(backend_env)
    env.update({"USER": user.name, "LOGNAME": user.name, "HOME": home_of(user),
                "SSH_CONNECTION": request.ssh_connection})
    if request.tty:
        env["TERM"] = request.term_type
    else:
        env.pop("TERM", None)
    common = {"user": user.name, "tty": request.tty, "size": request.size,
              "workdir": home_of(user), "shell": user.shell}
    forced = key.forced_command if key is not None else None
    if forced is not None:
        if request.kind == "exec":
            env["SSH_ORIGINAL_COMMAND"] = request.command or ""
        return ProcessSpec(kind="command", command=forced, env=env, **common)
    if request.kind == "sftp":
        return ProcessSpec(kind="sftp", env=env, **common)
    if request.kind == "exec":
        return ProcessSpec(kind="command", command=request.command or "", env=env, **common)
    return ProcessSpec(kind="shell", env=env, **common)


def login_line(user: User, help_contact: str | None) -> str:
    """The line an interactive shell starts with: the user's limits and where to get help."""
    def size(n: int) -> str:
        for unit, factor in (("GiB", 2**30), ("MiB", 2**20)):
            if n >= factor:
                return f"{n / factor:.1f}".removesuffix(".0") + f" {unit}"
        return f"{n} B"

    cpus = "unlimited" if user.cpus is None else f"{user.cpus:g}"
    memory = "unlimited" if user.memory is None else size(user.memory)
    pids = "unlimited" if user.pids is None else str(user.pids)
    return (f"dind-gateway: limits for {user.name}: cpus {cpus}, memory {memory}, pids {pids}; "
            f"help: {help_contact or 'ask your administrator'}\n")
