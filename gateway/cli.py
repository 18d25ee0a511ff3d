"""Command line: turns flags into a config object and hands it to the gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .config import ConfigError, GatewayConfig, load_gateway_config, load_users

DEFAULT_CONFIG = "/etc/dind-gateway/gateway.yaml"


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
    runner = uvloop.run if uvloop and not args.no_uvloop else asyncio.run
    return runner(_serve(config))


async def _serve(config: GatewayConfig) -> int:
    from .server import Gateway

    gateway = Gateway(config)
    await gateway.start()
    gateway.install_signal_handlers()
    print(f"dind-gateway listening on {config.listen_host}:{gateway.port}", flush=True)
    await gateway.serve_forever()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    users = load_users(config.users_file)
    print(f"{args.config}: ok; {config.users_file}: ok, {len(users.users)} user(s)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"dind-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
