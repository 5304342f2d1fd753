"""`ringstream`: the command line.

    ringstream serve [--config FILE] [--host H] [--port N] [--ring-size SIZE] [--workers N]
                     [--from-nats URL]   (a hub: the edges' merged stream from JetStream)
    ringstream config [...same flags]   print the effective configuration as JSON
    ringstream token new NAME [--type T]... [--field K=V]... [--allow A]... [--expires TIME]
    ringstream token hash                a token from stdin -> "sha256:HEX" (auth.metrics_token)
    ringstream tail [URL] [--type T] [--field K=V] [--from ID] [-o F,F]   follow the stream
    ringstream top [URL]                 a live view of the ring, rates, subscribers, sources

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
        c.add_argument(
            "--from-nats",
            metavar="URL",
            action="append",
            help="serve the merged stream of the edges from NATS JetStream, no local ring "
            "(hub.urls; repeat for more servers)",
        )
    _token_parser(sub)
    from service.term import tail, top

    tail.add_parser(sub)
    top.add_parser(sub)
    return p


def _token_parser(sub: Any) -> None:
    t = sub.add_parser("token", help="make a bearer token for auth.tokens_file")
    ts = t.add_subparsers(dest="token_command", required=True)
    n = ts.add_parser(
        "new",
        help="a new token: its [[token]] entry on stdout, the token itself on stderr (or --out)",
    )
    n.add_argument("name", help="its name in logs and metrics")
    n.add_argument("--type", action="append", help="a record type it may see (default: all)")
    n.add_argument("--field", action="append", metavar="K=V", help="a condition its records meet")
    n.add_argument(
        "--allow",
        action="append",
        choices=("subscribe", "ingest", "reload"),
        help="what it may do (default: subscribe)",
    )
    n.add_argument("--expires", metavar="TIME", help="ISO 8601 with offset: 2027-01-01T00:00Z")
    n.add_argument("--out", metavar="FILE", help="write the token to FILE (mode 0600)")
    ts.add_parser("hash", help='read a token on stdin, print "sha256:HEX"')


def _token(args: argparse.Namespace) -> int:
    import datetime
    import os

    from service.auth.scope import ScopeError, parse_scope
    from service.auth.tokens import NAME, digest, new_token

    if args.token_command == "hash":
        token = sys.stdin.readline().strip()
        if not token:
            print("ringstream: token hash: no token on stdin", file=sys.stderr)
            return 2
        print("sha256:" + digest(token))
        return 0
    if not NAME.fullmatch(args.name):
        print(
            f"ringstream: token new: name {args.name!r}: 1 to 64 letters, digits and _ . @ : -",
            file=sys.stderr,
        )
        return 2
    entry: dict[str, Any] = {}
    if args.type:
        entry["types"] = args.type
    if args.field:
        fields = {}
        for f in args.field:
            k, eq, v = f.partition("=")
            if not eq:
                print(f"ringstream: token new: --field {f!r}: expected K=V", file=sys.stderr)
                return 2
            fields[k] = v
        entry["fields"] = fields
    entry["allow"] = args.allow or ["subscribe"]
    try:
        parse_scope(entry, "token")
    except ScopeError as e:
        print(f"ringstream: token new: {e}", file=sys.stderr)
        return 2
    expires = None
    if args.expires:
        try:
            expires = datetime.datetime.fromisoformat(args.expires)
        except ValueError:
            expires = None
        if expires is None or expires.tzinfo is None:
            print(
                f"ringstream: token new: --expires {args.expires!r}: ISO 8601 with an offset",
                file=sys.stderr,
            )
            return 2
    token = new_token()
    lines = ["[[token]]", f"name = {_toml(args.name)}", f'sha256 = "{digest(token)}"']
    if "types" in entry:
        lines.append("types = [" + ", ".join(_toml(t) for t in entry["types"]) + "]")
    if "fields" in entry:
        inner = ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in entry["fields"].items())
        lines.append("fields = { " + inner + " }")
    lines.append("allow = [" + ", ".join(_toml(a) for a in entry["allow"]) + "]")
    if expires is not None:
        lines.append(f"expires = {expires.isoformat()}")
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file that was there keeps its mode otherwise
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    else:
        print(token, file=sys.stderr)
    print("\n".join(lines))
    return 0


def _toml(s: str) -> str:
    return orjson.dumps(s).decode()  # a JSON string is a TOML basic string


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
    if args.from_nats:
        o.setdefault("hub", {})["urls"] = list(args.from_nats)
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
    if args.command == "token":
        return _token(args)
    if args.command in ("tail", "top"):
        from service.term import tail, top

        return (tail if args.command == "tail" else top).main(args)
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
