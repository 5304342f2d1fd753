"""`ringstream tail [URL]`: follow a running service's stream in a terminal.

    ringstream tail                                  # localhost:8080, everything
    ringstream tail --type exec --field comm=bash -o pid,comm,cmdline
    ringstream tail https://host:8443 --token-file t --from 120 | jq .

Reads /events as NDJSON. Output is the records' JSON lines, as the service
sends them (the default when stdout is not a terminal: pipe-friendly), or on
a terminal one coloured line per record with the chosen fields (-o). A lost
connection (the service restarting, a network blip) is retried with backoff
(0.5 s doubling to 10 s), resuming after the last record received, by epoch
and id: the service's gap marker (a restart, records older than its history)
is shown where the stream skips. Exit status: 0 on Ctrl-C or when the server
ends the stream (its shutdown), 2 for a bad option or filter (the server's
400, shown), 4 when the token is refused or ends (401, 403, token_expired,
token_revoked).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp
import orjson
from rich.console import Console
from rich.text import Text

from service.term.connect import Target, UsageError, add_target_options, target

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
ENVELOPE = ("id", "ts_ns", "type", "type_id")
COLOURS = ("cyan", "green", "magenta", "blue", "yellow", "bright_cyan", "bright_green", "red")


class Retry(Exception):
    """The service is there but not serving (503, a 5xx): try again later."""


class Fatal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tail", help="follow a running service's stream", description=__doc__)
    add_target_options(p)
    p.add_argument("--type", action="append", metavar="T", help="record type (repeatable)")
    p.add_argument(
        "--field", action="append", metavar="K=V", help="field condition, V* for a prefix"
    )
    p.add_argument("--sample", type=int, metavar="N", help="every Nth matching record")
    p.add_argument("--from", dest="from_id", metavar="ID", help="start at this id (EPOCH-ID too)")
    p.add_argument(
        "-o", "--fields", metavar="F,F", help="fields to show, on a terminal (default: all)"
    )
    p.add_argument(
        "--format",
        choices=("auto", "json", "pretty"),
        default="auto",
        help="json lines, or one coloured line each (auto: pretty on a terminal)",
    )


def query(args: argparse.Namespace) -> list[tuple[str, str]]:
    q: list[tuple[str, str]] = []
    if args.type:
        q.append(("type", ",".join(args.type)))
    for f in args.field or ():
        k, eq, v = f.partition("=")
        if not eq or not k:
            raise UsageError(f"--field {f!r}: expected K=V (V* for a prefix)")
        q.append((f"field.{k}", v))
    if args.sample is not None:
        q.append(("sample", str(args.sample)))
    return q


class JsonOut:
    def __init__(self, out: TextIO) -> None:
        self.out = out.buffer if hasattr(out, "buffer") else None
        self.text = out

    def record(self, line: bytes, rec: dict[str, Any]) -> None:
        if self.out is not None:
            self.out.write(line.rstrip(b"\n") + b"\n")
        else:
            self.text.write(line.decode().rstrip("\n") + "\n")

    def flush(self) -> None:
        (self.out or self.text).flush()


# C0 and C1 controls (ESC, CSI, ...) from a record's values would reach the
# terminal raw: any producer could retitle it, recolour it, or worse
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _safe(text: str) -> str:
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class PrettyOut:
    def __init__(self, console: Console, fields: Sequence[str] | None) -> None:
        self.console = console
        self.fields = fields

    def _colour(self, name: str) -> str:
        return COLOURS[hashlib.blake2s(name.encode()).digest()[0] % len(COLOURS)]

    def record(self, line: bytes, rec: dict[str, Any]) -> None:
        kind = _safe(str(rec.get("type", "?")))
        t = Text(no_wrap=True, overflow="ellipsis")
        if not isinstance(rec.get("id"), int):  # the service's marker: gap, end
            t.append(f" {kind} ", style="bold black on yellow")
            t.append(" " + _safe(" ".join(f"{k}={v}" for k, v in rec.items() if k != "type")))
            self.console.print(t)
            return
        ts = rec.get("ts_ns")
        if isinstance(ts, int) and ts > 10**18:  # wall-clock nanoseconds
            t.append(time.strftime("%H:%M:%S", time.localtime(ts / 1e9)), style="dim")
            t.append(f".{ts // 1_000_000 % 1000:03d} ", style="dim")
        t.append(f"{rec.get('id', '')} ", style="dim")
        t.append(f"{kind} ", style=f"bold {self._colour(kind)}")
        names = self.fields or [k for k in rec if k not in ENVELOPE]
        for name in names:
            value = rec.get(name)
            if value is None and name not in rec:
                continue
            shown = value if isinstance(value, str) else orjson.dumps(value).decode()
            t.append(f"{_safe(name)}=", style="dim")
            t.append(f"{_safe(shown)} ")
        self.console.print(t)

    def flush(self) -> None:
        pass


def note(message: str) -> None:
    print(f"ringstream tail: {message}", file=sys.stderr, flush=True)


async def _stream(
    http: aiohttp.ClientSession,
    t: Target,
    params: list[tuple[str, str]],
    out: JsonOut | PrettyOut,
    resume: dict[str, Any],
) -> int:
    """One connection: its records until the server ends the stream (the exit
    status then), or raise Retry / a connection error to reconnect."""
    q = list(params)
    if resume.get("last") is not None:
        epoch, last = resume["epoch"], resume["last"]
        q.append(("last_event_id", f"{epoch}-{last}" if epoch else str(last)))
    elif resume.get("from") is not None:
        q.append(("from", resume["from"]))
    url = t.url("/events") + ("?" + urlencode(q) if q else "")
    async with http.get(url, headers=t.headers, ssl=t.ssl) as resp:
        if resp.status in (400, 404):
            raise Fatal(2, f"{resp.status}: {(await resp.text()).strip()}")
        if resp.status in (401, 403):
            raise Fatal(4, f"{resp.status}: {(await resp.text()).strip()}")
        if resp.status != 200:
            raise Retry(f"HTTP {resp.status}")
        epoch = resp.headers.get("Ringstream-Epoch")
        if resume.get("retries"):
            note(f"connected again (epoch {epoch})")
        resume["retries"] = 0
        resume["backoff"] = BACKOFF_FIRST
        async for chunk in _lines(resp.content):
            for line in chunk:
                rec = orjson.loads(line)
                out.record(line, rec)
                # a record has an id whatever its type; the service's markers none
                rid = rec.get("id")
                if isinstance(rid, int):
                    resume["epoch"], resume["last"] = epoch, rid
                elif rec.get("type") == "end":
                    out.flush()
                    raise Fatal(4, f"the server ended the stream: {rec.get('reason')}")
            out.flush()  # all that came
        out.flush()
        return 0


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The stream's lines, as many as each read brought: of any length (a
    record can be megabytes, past aiohttp's line limit)."""
    pieces: list[bytes] = []  # a line so far (a long one comes in many reads)
    async for data in content.iter_any():
        if b"\n" not in data:
            pieces.append(data)
            continue
        first, *lines, last = data.split(b"\n")
        lines.insert(0, b"".join([*pieces, first]))
        pieces = [last]
        lines = [x for x in lines if x.strip()]
        if lines:
            yield lines
    rest = b"".join(pieces)
    if rest.strip():
        yield [rest]


async def follow(args: argparse.Namespace) -> int:
    t = target(args.url, args.token, args.token_file, args.cacert)
    params = query(args)
    pretty = args.format == "pretty" or (args.format == "auto" and sys.stdout.isatty())
    fields = [f for f in args.fields.split(",") if f] if args.fields else None
    out: JsonOut | PrettyOut = (
        PrettyOut(Console(highlight=False, soft_wrap=False), fields)
        if pretty
        else JsonOut(sys.stdout)
    )
    resume: dict[str, Any] = {"from": args.from_id, "backoff": BACKOFF_FIRST, "retries": 0}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while True:
            try:
                status = await _stream(http, t, params, out, resume)
                note("the server ended the stream")
                return status
            except (aiohttp.ClientError, Retry, TimeoutError, ConnectionError) as e:
                if isinstance(e, BrokenPipeError):
                    raise  # our stdout's reader left, not the service
                delay = resume["backoff"]
                resume["backoff"] = min(BACKOFF_MAX, delay * 2)
                resume["retries"] += 1
                why = str(e) or type(e).__name__
                note(f"connection lost ({why}); reconnecting in {delay:g} s")
                await asyncio.sleep(delay)


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(follow(args))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # | head: the reader is done, so are we
        # and nothing more to flush at exit, which would fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as e:
        note(str(e))
        return 2
    except Fatal as e:
        note(str(e))
        return e.status
