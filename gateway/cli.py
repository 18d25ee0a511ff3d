"""Command line: turns flags into a config object and hands it to the gateway.

`serve` is given by the caller (gateway.app), so this module builds nothing itself; the other
commands are offline (`check`, `hash-password`) or talk to the running gateway's control socket.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .auth import hash_password
from .config import ConfigError, GatewayConfig, load_gateway_config, load_users
from .services.admin import AdminError, call

Serve = Callable[[GatewayConfig], Awaitable[int]]

DEFAULT_CONFIG = os.environ.get("DIND_GATEWAY_CONFIG", "/etc/dind-gateway/gateway.yaml")


def _load(args: argparse.Namespace) -> GatewayConfig:
    overrides = {"listen": args.listen} if getattr(args, "listen", None) else None
    return load_gateway_config(Path(args.config), overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional speed-up
        uvloop = None
    if uvloop and config.backend == "kubernetes" and not args.no_uvloop:
        # uvloop's TLS transport drops what it still buffers when the peer closes while
        # reading is paused (MagicStack/uvloop PR 661, open): with the exec websocket held
        # back by a full SSH window, the tail of a command's output and its exit status were
        # lost when the API server closed the exec.  Stock asyncio's TLS waits for resume.
        logging.getLogger("dind_gateway").info(
            "backend kubernetes: stock asyncio event loop (uvloop loses TLS data at close)")
        uvloop = None
    runner = uvloop.run if uvloop and not args.no_uvloop else asyncio.run
    return runner(args.serve(config))


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    users = load_users(config.users_file)
    groups = f", {len(users.groups)} group(s)" if users.groups else ""
    print(f"{args.config}: ok; {config.users_file}: ok, {len(users.users)} user(s){groups}"
          " (images are checked against the engine at reload)")
    return 0


DEFAULT_STATE_DIR = "/var/lib/dind-gateway"


def cmd_init(args: argparse.Namespace) -> int:
    """gateway.yaml and users.yaml from the shipped examples; an existing file is kept."""
    from . import share

    target = Path(args.dir)
    target.mkdir(parents=True, exist_ok=True)
    examples = share.path("config")
    status = 0
    for name in ("gateway.yaml", "users.yaml"):
        dest = target / name
        if dest.exists():
            print(f"{dest}: exists, not overwritten")
            continue
        text = (examples / name).read_text()
        if name == "gateway.yaml":  # the example keeps a checkout's state in ./state
            text = text.replace("\nstate_dir: ../state\n", f"\nstate_dir: {args.state_dir}\n")
        try:
            with open(dest, "x") as f:  # never over a file made meanwhile
                f.write(text)
        except FileExistsError:
            print(f"{dest}: exists, not overwritten")
            continue
        except OSError as exc:
            print(f"dind-gateway: cannot write {dest}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{dest}: written from {examples / name}")
    print(f"next: add users and keys to {target / 'users.yaml'}, build the user image "
          f"(bash {share.path('scripts') / 'build-images.sh'}), then "
          f"`dind-gateway check --config {target / 'gateway.yaml'}`; systemd unit: "
          f"{share.path('packaging') / 'dind-gateway.service'}")
    return status


def _size(n: int | None) -> str:
    if n is None or n < 0:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def format_ps(rows: list[dict[str, Any]]) -> str:
    """The `ps` table, one row per user."""
    head = ("USER", "STATE", "UPTIME", "SESSIONS", "CPU%", "MEMORY", "PIDS", "CACHE", "DISK",
            "IMAGE")
    table = [head]
    for r in rows:
        mem = "-" if "mem_bytes" not in r else f"{_size(r['mem_bytes'])} / " + (
            _size(r["mem_limit"]) if r.get("mem_limit") else "unlimited")
        table.append((r["user"], r["state"], _duration(r.get("uptime")), str(r["sessions"]),
                      f"{r['cpu_percent']:.1f}" if "cpu_percent" in r else "-", mem,
                      str(r.get("pids", "-")), _size(r.get("cache_bytes")),
                      f"{_size(r['disk'][0])} / {_size(r['disk'][1])}" if r.get("disk")
                      else "no quota", _image_state(r)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    notes = [f"  {r['user']}: outdated: {r['outdated']}" for r in rows if r.get("outdated")]
    notes += [f"  {r['user']}: logged in with {', '.join(r['logins'])}" for r in rows
              if r.get("logins")]
    return "\n".join(["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                      for row in table] + notes)


def _image_state(row: dict[str, Any]) -> str:
    if row.get("outdated"):
        return "outdated, upgrade when idle" if row.get("upgrade_pending") else "outdated"
    return "-" if row["state"].startswith("absent") else "current"


def _admin(args: argparse.Namespace, request: dict[str, Any]) -> Any:
    return call(_load(args).state_dir, request)


def cmd_ps(args: argparse.Namespace) -> int:
    print(format_ps(_admin(args, {"cmd": "ps"})))
    return 0


def cmd_user_action(args: argparse.Namespace) -> int:
    if args.command == "purge" and not args.yes:
        if not sys.stdin.isatty():
            print("dind-gateway: purge deletes all of the user's data; pass --yes to confirm",
                  file=sys.stderr)
            return 1
        answer = input(f"Delete {args.user}'s container, network and volumes (home and image "
                       "cache)? Type the user name to confirm: ")
        if answer.strip() != args.user:
            print("not confirmed; nothing deleted", file=sys.stderr)
            return 1
    print(_admin(args, {"cmd": args.command, "user": args.user}))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    if (args.user is None) == (not args.all):
        print("dind-gateway: upgrade needs a user name or --all (not both)", file=sys.stderr)
        return 2
    request = {"cmd": "upgrade", "user": args.user, "all": args.all,
               "when_idle": args.when_idle, "now": args.now}
    print(call(_load(args).state_dir, request, timeout=3600))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    print(_admin(args, {"cmd": "reload"}))
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            print("dind-gateway: the passwords differ", file=sys.stderr)
            return 1
    else:
        first = sys.stdin.readline().rstrip("\n")
    if not first:
        print("dind-gateway: empty password refused", file=sys.stderr)
        return 1
    print(hash_password(first, args.scheme))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dind-gateway",
                                     description="SSH gateway to per-user Docker-in-Docker")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help="path to gateway.yaml")
    serve.add_argument("--listen", help="HOST:PORT, overrides the config file")
    serve.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate gateway.yaml and the users file")
    check.add_argument("--config", default=DEFAULT_CONFIG, help="path to gateway.yaml")
    check.set_defaults(func=cmd_check)

    init = sub.add_parser("init", help="write gateway.yaml and users.yaml from the examples "
                          "(existing files are kept)")
    init.add_argument("--dir", default=os.path.dirname(DEFAULT_CONFIG) or ".",
                      help="where to write them (default /etc/dind-gateway)")
    init.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                      help="state_dir written into gateway.yaml (default %(default)s)")
    init.set_defaults(func=cmd_init)

    def admin_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default=DEFAULT_CONFIG, help="path to gateway.yaml")
        return p

    admin_parser("ps", "one row per user: state, sessions, CPU, memory, pids, cache"
                 ).set_defaults(func=cmd_ps)
    admin_parser("reload", "re-read the users file now").set_defaults(func=cmd_reload)
    for name, text in (("stop", "stop a user's container (data kept)"),
                       ("restart", "restart a user's container"),
                       ("purge", "delete a user's container, network and volumes")):
        p = admin_parser(name, text)
        p.add_argument("user")
        if name == "purge":
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        p.set_defaults(func=cmd_user_action)

    up = admin_parser("upgrade", "make outdated containers again on their configured image, "
                      "keeping home, image cache and network")
    up.add_argument("user", nargs="?", help="the user (or --all)")
    up.add_argument("--all", action="store_true", help="every user with a container")
    when = up.add_mutually_exclusive_group()
    when.add_argument("--when-idle", action="store_true",
                      help="users connected now are upgraded once their last connection ends")
    when.add_argument("--now", action="store_true",
                      help="tell her sessions and close them, then upgrade")
    up.set_defaults(func=cmd_upgrade)

    hp = sub.add_parser("hash-password", help="prompt for a password, print a hash for users.yaml")
    hp.add_argument("--scheme", default="bcrypt", choices=["bcrypt", "sha512_crypt"])
    hp.set_defaults(func=cmd_hash_password)
    return parser


def main(argv: list[str] | None = None, serve: Serve | None = None) -> int:
    """Run one command; `serve` runs the gateway (gateway.app.serve)."""
    args = build_parser().parse_args(argv)
    args.serve = serve
    if args.command == "serve" and serve is None:
        print("dind-gateway: start the gateway with `dind-gateway serve` "
              "(gateway.app:main)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, AdminError) as exc:
        print(f"dind-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
