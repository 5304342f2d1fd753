"""`ringstream`: the command line.

    ringstream serve [--config FILE] [--host H] [--port N] [--ring-size SIZE] [--workers N]
    ringstream config [...same flags]   print the effective configuration as JSON

Exit status: 0 after a clean stop, 2 for a configuration error or a service
that cannot start (the message on stderr names the key and the problem).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

import orjson

from service import __version__, logs
from service.settings import Config, ConfigError, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringstream", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"ringstream {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the service"),
        ("config", "print the effective configuration (built-in < file < env < flags) as JSON"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--config", metavar="FILE", help="TOML file (default: built in)")
        c.add_argument("--host", help="address to listen on (server.host)")
        c.add_argument("--port", type=int, help="port to listen on, 0 for any (server.port)")
        c.add_argument(
            "--ring-size", metavar="SIZE", help='ring data area, e.g. "64MiB" (ring.size)'
        )
        c.add_argument("--workers", type=int, metavar="N", help="worker processes, 0 = CPUs")
        c.add_argument(
            "--log-format", choices=("json", "plain"), help="log line format (log.format)"
        )
    return p


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    o: dict[str, dict[str, Any]] = {}
    pairs = (
        ("server", "host", args.host),
        ("server", "port", args.port),
        ("ring", "size", args.ring_size),
        ("workers", "count", args.workers),
        ("log", "format", args.log_format),
    )
    for section, key, value in pairs:
        if value is not None:
            o.setdefault(section, {})[key] = value
    return o


def _serve(cfg: Config, read_config: Callable[[], Config]) -> int:
    import uvloop

    from service.app import Service, StartupError

    logs.setup(cfg["log"]["format"], cfg["log"]["level"])
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(Service(cfg, read_config).run())
    except (ConfigError, StartupError) as e:
        print(f"ringstream: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load(args.config, overrides=_overrides(args))
    except ConfigError as e:
        print(f"ringstream: configuration error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        from service.app import check

        # what serve checks before it starts anything, so that a config this
        # prints is one serve takes
        try:
            check(cfg)
        except ConfigError as e:
            print(f"ringstream: configuration error: {e}", file=sys.stderr)
            return 2
        out = {**cfg.sections, "sources": list(cfg.sources)}
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    # a reload reads the same layers again: this file, the environment, these flags
    return _serve(cfg, lambda: load(args.config, overrides=_overrides(args)))


if __name__ == "__main__":
    sys.exit(main())
