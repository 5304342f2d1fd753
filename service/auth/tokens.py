"""Static bearer tokens (auth.mode = "token"), from a TOML file of hashes.

    [[token]]
    name = "grafana"                 # in logs and metrics, never the token
    sha256 = "9f86d081..."           # of the token: `ringstream token new` prints both
    types = ["exec"]                 # optional, as service/auth/scope.py reads it
    fields = { comm = "bash" }
    allow = ["subscribe"]
    expires = 2027-01-01T00:00:00Z   # optional: refused after, streams end then

The file holds no token, only its SHA-256: the tokens are 256 random bits,
so a fast hash is enough (a slow one guards guessable passwords, which
these are not). A presented token is hashed and compared with every entry
with hmac.compare_digest, all of them every time, so how long the check
takes says nothing about which entry came close.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import secrets
import stat
import tomllib
from dataclasses import dataclass

from service.auth.scope import Principal, Scope, ScopeError, parse_scope

PREFIX = "rs_"
_HEX64 = re.compile(r"[0-9a-f]{64}")
NAME = re.compile(r"[A-Za-z0-9_.@:-]{1,64}")


class TokenFileError(ValueError):
    """A tokens file that cannot be used; the message names the file and entry."""


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    name: str
    sha256: bytes  # the raw digest, for compare_digest
    scope: Scope
    expires: float | None


class TokenFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.entries = _read(path)
        self.warning: str | None = None
        # reading it gives nothing away (hashes of random tokens); writing it
        # lets one add a token of one's own
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise TokenFileError(f"auth.tokens_file: cannot stat {path}: {e.strerror}") from None
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            self.warning = f"auth.tokens_file: {path} is writable by others: chmod go-w it"

    def find(self, token: str) -> Entry | None:
        """The entry whose hash `token` has; every entry compared, no early exit."""
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for e in self.entries:
            if hmac.compare_digest(presented, e.sha256):
                found = e
        return found

    def principal(self, token: str) -> Principal | None:
        e = self.find(token)
        if e is None:
            return None
        return Principal(e.name, "token", e.scope, e.expires, e.sha256.hex())

    def holds(self, p: Principal) -> bool:
        """Whether `p` (accepted before a reload) is still in this file, as it was."""
        return any(
            e.sha256.hex() == p.key and e.scope == p.scope and e.expires == p.expires
            for e in self.entries
        )


def _read(path: str) -> list[Entry]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise TokenFileError(f"auth.tokens_file: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise TokenFileError(f"auth.tokens_file: {path} is not valid TOML: {e}") from None
    unknown = set(doc) - {"token"}
    if unknown:
        raise TokenFileError(
            f"auth.tokens_file: {path}: unknown table {sorted(unknown)[0]!r} "
            "(entries are [[token]] tables)"
        )
    raw = doc.get("token", [])
    if not isinstance(raw, list):
        raise TokenFileError(f"auth.tokens_file: {path}: entries are [[token]] tables")
    entries: list[Entry] = []
    names: set[str] = set()
    hashes: set[str] = set()
    for i, t in enumerate(raw):
        where = f"{path}: token[{i}]"
        if not isinstance(t, dict):
            raise TokenFileError(f"auth.tokens_file: {where}: entries are [[token]] tables")
        name, h = t.get("name"), t.get("sha256")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise TokenFileError(
                f"auth.tokens_file: {where}.name: 1 to 64 letters, digits and _ . @ : -, "
                f"got {name!r}"
            )
        where = f"{path}: token {name!r}"
        if name in names:
            raise TokenFileError(f"auth.tokens_file: {where}: the name is used twice")
        if not isinstance(h, str) or not _HEX64.fullmatch(h):
            raise TokenFileError(
                f"auth.tokens_file: {where}.sha256: 64 lower-case hex digits "
                "(ringstream token new prints it)"
            )
        if h in hashes:
            raise TokenFileError(f"auth.tokens_file: {where}: the same token as another entry")
        expires = t.get("expires")
        if expires is not None:
            if not isinstance(expires, datetime.datetime) or expires.tzinfo is None:
                raise TokenFileError(
                    f"auth.tokens_file: {where}.expires: a TOML date-time with its offset "
                    "(2027-01-01T00:00:00Z)"
                )
            expires = expires.timestamp()
        rest = {k: v for k, v in t.items() if k not in ("name", "sha256", "expires")}
        try:
            scope = parse_scope(rest, f"{where}")
        except ScopeError as e:
            raise TokenFileError(f"auth.tokens_file: {e}") from None
        names.add(name)
        hashes.add(h)
        entries.append(Entry(name, bytes.fromhex(h), scope, expires))
    return entries
