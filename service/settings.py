"""Configuration: the built-in TOML, a --config file, RINGSTREAM_* env, CLI flags.

Later layers override earlier ones key by key (a [[sources]] list replaces
the whole list). Every value is checked here, at start, and a bad one raises
ConfigError naming where it came from and what is wrong with it; the service
never starts on a configuration it would have to guess about.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "RINGSTREAM_"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names its key."""


# --- value checkers: (value, key) -> value, raising ConfigError ------------


def _fail(key: str, problem: str, value: object) -> ConfigError:
    return ConfigError(f"{key}: {problem}, got {value!r}")


def _str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, "must be a string", value)
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "must be true or false", value)
    return value


def _int(lo: int, hi: int | None = None) -> Callable[[object, str], int]:
    def check(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, "must be an integer", value)
        if value < lo or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise _fail(key, f"must be {bounds}", value)
        return value

    return check


def _seconds(lo: float = 0.0, *, positive: bool = False) -> Callable[[object, str], float]:
    def check(value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(key, "must be a number of seconds", value)
        if value < lo or (positive and value <= 0):
            raise _fail(key, "must be > 0 seconds" if positive else f"must be >= {lo}", value)
        return float(value)

    return check


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: object, key: str) -> int:
    """Bytes from an integer or a string such as "16MiB", "64m", "1G" (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _fail(key, "must be >= 0 bytes", value)
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise _fail(key, 'must be a size in bytes (4096, "64KiB", "16MiB", "1GiB")', value)


def _choice(*options: str) -> Callable[[object, str], str]:
    def check(value: object, key: str) -> str:
        if value not in options:
            raise _fail(key, "must be one of " + ", ".join(repr(o) for o in options), value)
        return value  # type: ignore[return-value]

    return check


def _uids(value: object, key: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _fail(key, "must be a list of uids", value)
    return tuple(_int(0)(v, f"{key}[{i}]") for i, v in enumerate(value))


def _paths(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(key, "must be a list of file paths", value)
    return tuple(_str(v, f"{key}[{i}]") for i, v in enumerate(value))


def _origins(value: object, key: str) -> tuple[str, ...]:
    from service.origins import normalize

    if not isinstance(value, list):
        raise _fail(key, 'must be a list of origins ("https://host:port", "*")', value)
    out = []
    for i, v in enumerate(value):
        n = v if v == "*" else normalize(v) if isinstance(v, str) else None
        if n is None:
            raise _fail(
                f"{key}[{i}]",
                'must be an origin such as "https://dash.example:8443" '
                '(scheme, host, optional port, no path), "null" or "*"',
                v,
            )
        out.append(n)
    return tuple(out)


def _type_name(value: object, key: str) -> str:
    from ringcore.frames import MAX_NAME
    from service.filters import is_type_name

    if not isinstance(value, str) or (value and not is_type_name(value)):
        raise _fail(
            key, f"must be a type name (up to {MAX_NAME} letters, digits, _ . : / -)", value
        )
    return value


_BASE_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+")


def _base_path(value: object, key: str) -> str:
    if not isinstance(value, str) or (value and not _BASE_PATH.fullmatch(value)):
        raise _fail(key, 'must be "" or a path such as "/ringstream" (no trailing /)', value)
    return value


_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def _token_hash(value: object, key: str) -> str:
    if not isinstance(value, str) or (value and not _TOKEN_HASH.fullmatch(value)):
        raise _fail(
            key, 'must be "sha256:" and 64 lower-case hex digits (ringstream token hash)', value
        )
    return value


_NATS_URL = re.compile(r"(nats|tls|ws|wss)://([^/@\s]+@)?[A-Za-z0-9._\[\]:-]+(:\d{1,5})?/?")


def _nats_urls(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(key, 'must be a list of NATS URLs such as ["nats://host:4222"]', value)
    for i, v in enumerate(value):
        if not isinstance(v, str) or not _NATS_URL.fullmatch(v):
            raise _fail(
                f"{key}[{i}]",
                'must be a NATS URL such as "nats://host:4222" (nats://, tls://, ws:// or wss://)',
                v,
            )
    return tuple(value)


_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def _subject_token(value: object, key: str) -> str:
    if not isinstance(value, str) or (value and not _SUBJECT_TOKEN.fullmatch(value)):
        raise _fail(key, 'must be "" or a NATS subject token (letters, digits, _ and -)', value)
    return value


def _stream_name(value: object, key: str) -> str:
    if not isinstance(value, str) or not _SUBJECT_TOKEN.fullmatch(value):
        raise _fail(key, "must be a JetStream stream name (letters, digits, _ and -)", value)
    return value


def _subject(value: object, key: str) -> str:
    ok = isinstance(value, str) and value.startswith("ringstream.")
    ok = ok and all(
        t in ("{host}", "{type}") or _SUBJECT_TOKEN.fullmatch(t) for t in value.split(".")
    )
    # a hub reads the host from the second token
    if not ok or "{type}" not in value or value.split(".")[1] != "{host}":
        raise _fail(
            key,
            'must be a subject "ringstream.{host}." then tokens with {type} among them, '
            'such as "ringstream.{host}.{type}" (a hub reads the host from the second token)',
            value,
        )
    return value


# how [forward] and [hub] reach NATS, as nats-py takes it
_NATS_CREDENTIALS: dict[str, Callable[[Any, str], Any]] = {
    "creds_file": _str,
    "user": _str,
    "password": _str,
    "password_file": _str,
    "token": _str,
    "token_file": _str,
    "tls_ca": _str,
    "tls_cert": _str,
    "tls_key": _str,
}

# section -> key -> checker; the keys of config/default.toml, all of them
SPEC: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "server": {
        "host": _str,
        "port": _int(0, 65535),
        "shutdown_timeout": _seconds(positive=True),
        "backlog": _int(1, 65535),
        "max_connections": _int(1, 1_000_000),
        "header_timeout": _seconds(positive=True),
        "idle_timeout": _seconds(positive=True),
        "allowed_origins": _origins,
        "tls_cert": _str,
        "tls_key": _str,
        "tls_client_ca": _str,
        "base_path": _base_path,
    },
    "ring": {
        "size": parse_size,
        "shm_dir": _str,
        "abandon_timeout": _seconds(),
        "attach_socket": _str,
        "attach_uids": _uids,
    },
    "workers": {
        "count": _int(0, 1024),
        "backoff_initial": _seconds(positive=True),
        "backoff_max": _seconds(positive=True),
        "backoff_reset": _seconds(positive=True),
    },
    "consumer": {
        "batch": _int(1, 1 << 20),
        "coalesce": _seconds(),
        "stall_recheck": _seconds(positive=True),
    },
    "subscribers": {
        "queue_records": _int(1),
        "queue_bytes": parse_size,
        "policy": _choice("drop-oldest", "disconnect"),
        "history_records": _int(0),
        "history_bytes": parse_size,
        "heartbeat": _seconds(positive=True),
        "max_batch": _int(1, 100_000),
        "ws_compress": _bool,
        "memory_budget": parse_size,
        "send_buffer": parse_size,
    },
    "ingest": {
        "enabled": _bool,
        "max_body": parse_size,
        "type": _type_name,
    },
    "auth": {
        "mode": _choice("none", "token", "jwt"),
        "tokens_file": _str,
        "jwt_key": _str,
        "jwt_jwks": _str,
        "jwt_audience": _str,
        "jwt_issuer": _str,
        "jwt_leeway": _seconds(),
        "metrics_token": _token_hash,
        "metrics_token_file": _str,
    },
    "forward": {
        "urls": _nats_urls,
        "stream": _stream_name,
        "replicas": _int(1, 5),
        "subject": _subject,
        "host": _subject_token,
        "buffer_bytes": parse_size,
        "max_inflight": _int(1, 1_000_000),
        "ack_timeout": _seconds(positive=True),
        **_NATS_CREDENTIALS,
    },
    "hub": {
        "urls": _nats_urls,
        "stream": _stream_name,
        **_NATS_CREDENTIALS,
    },
    "log": {
        "format": _choice("json", "plain"),
        "level": _choice("debug", "info", "warning", "error"),
    },
    "schemas": {"files": _paths},
}


@dataclass(frozen=True)
class Config:
    """The checked configuration: `section[key]` values plus the raw sources list.

    Sources are checked by service.workers.plan_workers, which knows what
    each kind takes.
    """

    sections: Mapping[str, Mapping[str, Any]]
    sources: tuple[Mapping[str, Any], ...]
    origin: str  # where it came from, for the start log line

    def __getitem__(self, section: str) -> Mapping[str, Any]:
        return self.sections[section]


def builtin_toml() -> dict[str, Any]:
    text = (importlib.resources.files("service.config") / "default.toml").read_text()
    return tomllib.loads(text)


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None


def _merge(base: dict[str, Any], layer: Mapping[str, Any], where: str) -> None:
    for name, value in layer.items():
        if name == "sources":
            if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
                raise _fail(f"{where}sources", "must be an array of tables ([[sources]])", value)
            base["sources"] = [dict(s) for s in value]
            continue
        if name not in SPEC:
            known = ", ".join([*SPEC, "sources"])
            raise ConfigError(f"{where}{name}: unknown section (known: {known})")
        if not isinstance(value, dict):
            raise _fail(f"{where}{name}", "must be a table", value)
        for key, v in value.items():
            if key not in SPEC[name]:
                known = ", ".join(SPEC[name])
                raise ConfigError(f"{where}{name}.{key}: unknown key (known: {known})")
            base[name][key] = v


def _env_value(text: str) -> Any:
    """An env value as TOML would read it (numbers, booleans, lists), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """RINGSTREAM_<SECTION>_<KEY> and RINGSTREAM_SOURCES_<i>_<KEY> variables."""
    sections: dict[str, Any] = {}
    sources: dict[int, dict[str, Any]] = {}
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if m := re.fullmatch(r"sources_(\d+)_(\w+)", rest):
            sources.setdefault(int(m.group(1)), {})[m.group(2)] = _env_value(text)
            continue
        for section, keys in SPEC.items():
            key = rest[len(section) + 1 :]
            if rest.startswith(section + "_") and key in keys:
                sections.setdefault(section, {})[key] = _env_value(text)
                break
        else:
            raise ConfigError(
                f"{var}: not a setting (expected RINGSTREAM_<SECTION>_<KEY>, such as "
                "RINGSTREAM_SERVER_PORT, or RINGSTREAM_SOURCES_<index>_<KEY>)"
            )
    return sections, sources


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Built-in defaults, then the file at `path`, then env, then `overrides` (CLI)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    raw = builtin_toml()
    merged: dict[str, Any] = {name: dict(raw[name]) for name in SPEC}
    merged["sources"] = [dict(s) for s in raw["sources"]]
    if path:
        _merge(merged, _read_file(path), f"{path}: ")
    env_sections, env_sources = env_layer(environ)
    _merge(merged, env_sections, "env RINGSTREAM_: ")
    for index, keys in env_sources.items():
        if index >= len(merged["sources"]):
            raise ConfigError(
                f"RINGSTREAM_SOURCES_{index}_*: there is no sources[{index}] "
                f"({len(merged['sources'])} sources configured)"
            )
        merged["sources"][index].update(keys)
    if overrides:
        _merge(merged, overrides, "")
    sections: dict[str, dict[str, Any]] = {}
    for name, keys in SPEC.items():
        sections[name] = {
            key: check(merged[name][key], f"{name}.{key}") for key, check in keys.items()
        }
    _check_across(sections)
    return Config(sections, tuple(merged["sources"]), path or "built-in")


def _check_across(s: Mapping[str, Mapping[str, Any]]) -> None:
    if s["hub"]["urls"] and s["forward"]["urls"]:
        raise ConfigError(
            "hub.urls and forward.urls: a hub reads the stream edges forward to; "
            "it has no ring of its own to forward"
        )
    if s["hub"]["urls"] and s["ingest"]["enabled"]:
        raise ConfigError("hub.urls and ingest.enabled: a hub has no ring to ingest into")
    w = s["workers"]
    if w["backoff_initial"] > w["backoff_max"]:
        raise ConfigError(
            f"workers.backoff_initial: must be <= workers.backoff_max "
            f"({w['backoff_max']}), got {w['backoff_initial']}"
        )
    srv = s["server"]
    if bool(srv["tls_cert"]) != bool(srv["tls_key"]):
        raise ConfigError(
            "server.tls_cert, server.tls_key: TLS needs both the certificate and its key, got "
            f"tls_cert={srv['tls_cert']!r}, tls_key={srv['tls_key']!r}"
        )
    if srv["tls_client_ca"] and not srv["tls_cert"]:
        raise ConfigError("server.tls_client_ca: mutual TLS needs server.tls_cert and tls_key")
    a = s["auth"]
    if a["mode"] == "token" and not a["tokens_file"]:
        raise ConfigError('auth.tokens_file: auth.mode = "token" needs a tokens file')
    if a["mode"] == "jwt" and bool(a["jwt_key"]) == bool(a["jwt_jwks"]):
        raise ConfigError(
            'auth.jwt_key, auth.jwt_jwks: auth.mode = "jwt" needs exactly one of them, got '
            f"jwt_key={a['jwt_key']!r}, jwt_jwks={a['jwt_jwks']!r}"
        )
    if a["metrics_token"] and a["metrics_token_file"]:
        raise ConfigError("auth.metrics_token, auth.metrics_token_file: set one of them, not both")
    if s["subscribers"]["queue_bytes"] < 1:
        raise ConfigError("subscribers.queue_bytes: must be at least 1 byte, got 0")
