"""Reloading the configuration on SIGHUP or POST /-/reload, as Prometheus does.

The configuration is read again from the layers it came from at start (the
same --config file, the environment, the same flags) and checked the way
`serve` checks it at start: every value, the schema files, the worker plan,
the plugins' imports, the synthetic records' fit in the ring. Nothing changes
before all of that passes; a configuration that fails is refused, its error
logged, and the running one stays.

Applied at once: sources (only the workers whose planned spec changed are
stopped and started again; the others keep running, same pid), subscriber
and history bounds (existing subscribers get the new queue bounds and
policy, new ones everything), consumer and worker backoff settings, schema
files (a new encoder and filter schema; the consumer runs on the event loop,
as this does, so it switches between two batches, never within one), and
the log level and format. Every other changed key needs a restart: it is
named in a warning and the running value stays, so the next reload names
it again. Kernel sources (exec, bpf-ringbuf) hold BPF programs and kernel
rings opened at start; a change to them also needs a restart (the running
ones go on as they were).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import ringcore
from service import logs, tls
from service.auth.gate import Keys
from service.filters import FilterSchema
from service.schema import Schema
from service.settings import Config, ConfigError
from service.workers import WorkerSpec, check_fits

if TYPE_CHECKING:
    from service.app import Service

log = logging.getLogger("ringstream.reload")

# the keys a reload applies; any other key that changed needs a restart
LIVE_KEYS = frozenset(
    {
        "server.shutdown_timeout",
        "server.max_connections",
        "server.header_timeout",
        "server.allowed_origins",
        "workers.count",
        "workers.backoff_initial",
        "workers.backoff_max",
        "workers.backoff_reset",
        "consumer.batch",
        "consumer.coalesce",
        "consumer.stall_recheck",
        "subscribers.queue_records",
        "subscribers.queue_bytes",
        "subscribers.policy",
        "subscribers.history_records",
        "subscribers.history_bytes",
        "subscribers.heartbeat",
        "subscribers.max_batch",
        "subscribers.ws_compress",
        "subscribers.memory_budget",
        "subscribers.send_buffer",
        "ingest.enabled",
        "ingest.max_body",
        "ingest.type",
        "log.format",
        "log.level",
        "schemas.files",
        "auth.mode",
        "auth.tokens_file",
        "auth.jwt_key",
        "auth.jwt_jwks",
        "auth.jwt_audience",
        "auth.jwt_issuer",
        "auth.jwt_leeway",
        "auth.metrics_token",
        "auth.metrics_token_file",
    }
)
KERNEL_KINDS = ("exec", "bpf-ringbuf")
# how long the workers a reload retires may take to stop (then SIGKILL)
WORKER_STOP_TIMEOUT = 3.0


@dataclass(frozen=True)
class Plan:
    """What a configuration asks for, checked; built before anything runs or changes."""

    cfg: Config
    schemas: list[Schema]
    encoder: ringcore.Encoder
    specs: list[WorkerSpec]  # as planned, before the kernel sources are opened
    keys: Keys  # [auth]'s files, read


Running = tuple[WorkerSpec, WorkerSpec]  # (as planned, as the worker got it)


@dataclass
class SourcesDiff:
    keep: list[Running] = field(default_factory=list)
    retire: list[Running] = field(default_factory=list)
    launch: list[WorkerSpec] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Per source: added, removed, restarted (changed), by index and kind."""
        started = {(s.index, s.kind) for s in self.launch}
        stopped = {(p.index, p.kind) for p, _ in self.retire}
        restarted = started & stopped
        return {
            "added": sorted(_label(s) for s in started - restarted),
            "removed": sorted(_label(s) for s in stopped - restarted),
            "restarted": sorted(_label(s) for s in restarted),
            "workers_kept": len(self.keep),
            "workers_started": len(self.launch),
            "workers_stopped": len(self.retire),
        }


def _label(source: tuple[int, str]) -> str:
    return f"sources[{source[0]}] ({source[1]})"


def _same(a: WorkerSpec, b: WorkerSpec) -> bool:
    """The same worker, whatever its position in [[sources]]."""
    return (a.kind, a.instance, a.instances, a.options) == (
        b.kind,
        b.instance,
        b.instances,
        b.options,
    )


def _type_ids(schemas: Sequence[Schema]) -> dict[str, int]:
    return {s.name: s.type_id for s in schemas}


def _check_kernel_schemas(specs: Sequence[WorkerSpec], schemas: Sequence[Schema]) -> None:
    """A bpf-ringbuf source's schema must be in the new schema files, as at start."""
    known = _type_ids(schemas)
    for spec in specs:
        if spec.kind == "bpf-ringbuf" and spec.options["schema"] not in known:
            raise ConfigError(
                f"sources[{spec.index}].schema: no schema named {spec.options['schema']!r} "
                f"(known: {', '.join(sorted(known))}; add yours with schemas.files)"
            )


def _kernel_same(planned: WorkerSpec, running: Running, type_ids: Mapping[str, int]) -> bool:
    if not _same(planned, running[0]):
        return False
    # a bpf-ringbuf worker tags its records with the type id it was given
    return planned.kind != "bpf-ringbuf" or (
        type_ids[planned.options["schema"]] == running[1].options["type_id"]
    )


def _match(
    planned: Sequence[WorkerSpec], pool: list[Running], same: Callable[[WorkerSpec, Running], bool]
) -> tuple[list[Running], list[WorkerSpec]]:
    """Pair each planned spec with an equal running one (taken out of `pool`)."""
    kept, new = [], []
    for spec in planned:
        at = next((i for i, r in enumerate(pool) if same(spec, r)), None)
        if at is None:
            new.append(spec)
        else:
            kept.append((spec, pool.pop(at)[1]))
    return kept, new


def diff_sources(
    running: Sequence[Running], planned: Sequence[WorkerSpec], schemas: Sequence[Schema]
) -> SourcesDiff:
    """Which workers keep running, which stop, which start."""
    diff = SourcesDiff()
    type_ids = _type_ids(schemas)
    old_kernel = [r for r in running if r[0].kind in KERNEL_KINDS]
    unmatched = list(old_kernel)
    kept, new = _match(
        [s for s in planned if s.kind in KERNEL_KINDS],
        unmatched,
        lambda s, r: _kernel_same(s, r, type_ids),
    )
    if new or unmatched:
        # BPF programs and kernel rings are opened once, at start: the
        # kernel workers run on as they were
        diff.keep.extend(old_kernel)
        diff.restart_needed.extend(
            sorted(
                {f"sources[{s.index}] ({s.kind})" for s in new}
                | {f"sources[{p.index}] ({p.kind})" for p, _ in unmatched}
            )
        )
    else:
        diff.keep.extend(kept)
    pool = [r for r in running if r[0].kind not in KERNEL_KINDS]
    kept, diff.launch = _match(
        [s for s in planned if s.kind not in KERNEL_KINDS], pool, lambda s, r: _same(s, r[0])
    )
    diff.keep.extend(kept)
    diff.retire = pool
    return diff


def check_ring_size(old: Config, new: Config) -> None:
    """A ring.size that the next start would refuse is refused now (a ring of
    that size, never written, costs no memory: it is made and closed)."""
    size = new["ring"]["size"]
    if size == old["ring"]["size"]:
        return
    try:
        ringcore.Ring(size, shm_dir=None).close()
    except ValueError as e:
        raise ConfigError(f"ring.size: {e}") from None


def changed_keys(old: Config, new: Config) -> list[str]:
    return [
        f"{section}.{key}"
        for section, keys in new.sections.items()
        for key, value in keys.items()
        if old.sections.get(section, {}).get(key) != value
    ]


def effective(old: Config, new: Config, restart_needed: Sequence[str]) -> Config:
    """`new`, except the keys that need a restart, which keep their running values."""
    sections = {name: dict(keys) for name, keys in new.sections.items()}
    for name in restart_needed:
        section, _, key = name.partition(".")
        sections[section][key] = old.sections[section][key]
    return Config(sections, new.sources, new.origin)


@dataclass
class Pending:
    """A new configuration that passed every check, and what applying it changes."""

    plan: Plan
    cfg: Config  # effective: the keys that need a restart keep their running values
    keys: list[str]  # the keys that changed and apply now
    restart_needed: list[str]
    sources: SourcesDiff
    schemas_changed: bool
    tls: ssl.SSLContext | None  # server.tls_*'s files, loaded


class ReloadMetrics(Collector):
    """ringstream_config_* as Prometheus exports its own prometheus_config_*."""

    def __init__(self) -> None:
        self.success = 1  # the configuration at start loaded
        self.last_success = time.time()
        self.totals = {"success": 0, "failure": 0}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ringstream_config_reload_success",
            "1 if the last configuration reload succeeded (or none was asked for), else 0.",
            value=self.success,
        )
        yield GaugeMetricFamily(
            "ringstream_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (at start or by a reload).",
            value=self.last_success,
        )
        totals = CounterMetricFamily(
            "ringstream_config_reloads",
            "Configuration reloads (SIGHUP or POST /-/reload), by result.",
            labels=["result"],
        )
        for result, n in self.totals.items():
            totals.add_metric([result], n)
        yield totals


class Reloader:
    """Reloads `service`'s configuration, one reload at a time."""

    def __init__(
        self,
        service: Service,
        read_config: Callable[[], Config],
        plan: Callable[[Config], Plan],
    ) -> None:
        self.service = service
        self.read_config = read_config
        self.plan = plan
        self.metrics = ReloadMetrics()
        self.running: list[Running] = list(zip(service.planned, service.specs, strict=True))
        self.attempts = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    def on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """At stop: let a reload under way finish (one not begun sees the phase and refuses)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._lock:
            pass

    async def reload(self, trigger: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body): 200 applied, 400 refused, 500 failed, 503 not serving."""
        async with self._lock:
            phase = self.service.state.phase
            if phase != "ready":
                log.warning(
                    "configuration reload ignored: not serving",
                    extra={"event": "reload_ignored", "trigger": trigger, "phase": phase},
                )
                return 503, {"error": f"not serving ({phase}): try again when ready"}
            self.attempts += 1
            try:
                pending = self.check()
            except ConfigError as e:
                return self._failed(trigger, 400, str(e))
            except Exception as e:  # a bug, not the config: say so, keep running
                log.exception("reload check failed", extra={"event": "reload_error"})
                return self._failed(trigger, 500, f"{type(e).__name__}: {e}")
            try:
                changed = await self.apply(pending)
            except Exception as e:
                log.exception("reload apply failed", extra={"event": "reload_error"})
                return self._failed(
                    trigger, 500, f"applying the new configuration failed part way: {e}"
                )
            self._succeeded(trigger, changed)
            return 200, {"status": "ok", "changed": changed}

    # --- check: everything `serve` checks at start, nothing changed yet ----

    def check(self) -> Pending:
        svc = self.service
        new = self.read_config()
        plan = self.plan(new)
        keys = changed_keys(svc.cfg, new)
        restart_needed = [k for k in keys if k not in LIVE_KEYS]
        check_ring_size(svc.cfg, new)
        # the new plan, on the ring of the running config
        check_fits(svc.ring, plan.specs)
        _check_kernel_schemas(plan.specs, plan.schemas)
        sources = diff_sources(self.running, plan.specs, plan.schemas)
        FilterSchema(_type_ids(plan.schemas), (f.name for s in plan.schemas for f in s.fields))
        cfg = effective(svc.cfg, new, restart_needed)
        # the certificate files as they are now (the paths need a restart),
        # loaded once: the context checked is the one applied
        tls_context = tls.check(cfg["server"])
        return Pending(
            plan=plan,
            cfg=cfg,
            keys=[k for k in keys if k in LIVE_KEYS],
            restart_needed=restart_needed + sources.restart_needed,
            sources=sources,
            schemas_changed=plan.schemas != svc.schemas,
            tls=tls_context,
        )

    # --- apply --------------------------------------------------------------

    async def apply(self, p: Pending) -> dict[str, Any]:
        svc = self.service
        old = svc.cfg
        _apply_logs(p.cfg)
        for key in p.keys:
            section, _, name = key.partition(".")
            log.debug(
                "setting changed",
                extra={
                    "event": "reload_key",
                    "key": key,
                    "old": old.sections.get(section, {}).get(name),
                    "new": p.cfg[section][name],
                },
            )
        _apply_subscribers(svc, p.cfg["subscribers"])
        # the connection limits apply to connections accepted from now on
        svc.guard.configure(p.cfg["server"])
        svc.origins.configure(p.cfg["server"])
        svc.ingest.settings = p.cfg["ingest"]
        if svc.tls is not None and p.tls is not None:
            svc.tls.current = p.tls
        svc.authenticator.configure(p.plan.keys)
        _revoke(svc, p.plan.keys)
        _apply_consumer(svc, p.cfg["consumer"])
        _apply_workers(svc, p.cfg["workers"])
        if p.schemas_changed:
            _apply_schemas(svc, p.plan)
            _rescope(svc)
        svc.cfg = p.cfg
        await self._apply_sources(p.sources)
        changed: dict[str, Any] = {
            "keys": [*p.keys, *(["schemas"] if p.schemas_changed else [])],
            "sources": p.sources.summary(),
            "restart_needed": p.restart_needed,
        }
        return changed

    async def _apply_sources(self, diff: SourcesDiff) -> None:
        svc = self.service
        for spec in diff.launch:
            # a series per source from its start, as at start
            svc.collector.slots.failures[spec.kind] += 0
        # set before the await: a worker started now is part of what runs
        self.running = [*diff.keep, *((s, s) for s in diff.launch)]
        svc.specs = [opened for _, opened in self.running]
        svc.planned = [planned for planned, _ in self.running]
        if diff.retire or diff.launch:
            await svc.supervisor.replace(
                [opened for _, opened in diff.retire], diff.launch, WORKER_STOP_TIMEOUT
            )

    # --- the outcome --------------------------------------------------------

    def _failed(self, trigger: str, status: int, error: str) -> tuple[int, dict[str, Any]]:
        self.metrics.success = 0
        self.metrics.totals["failure"] += 1
        log.error(
            "configuration reload failed: the running configuration stays",
            extra={
                "event": "reload_failed",
                "trigger": trigger,
                "attempt": self.attempts,
                "error": error,
            },
        )
        return status, {"error": error}

    def _succeeded(self, trigger: str, changed: dict[str, Any]) -> None:
        self.metrics.success = 1
        self.metrics.totals["success"] += 1
        self.metrics.last_success = time.time()
        if changed["restart_needed"]:
            log.warning(
                "configuration reloaded, but some changes need a restart to take effect",
                extra={
                    "event": "reload_restart_needed",
                    "trigger": trigger,
                    "keys": changed["restart_needed"],
                },
            )
        log.info(
            "configuration reloaded",
            extra={
                "event": "reload",
                "trigger": trigger,
                "attempt": self.attempts,
                "config": self.service.cfg.origin,
                **changed,
            },
        )


def _revoke(svc: Service, keys: Keys) -> None:
    """End the streams whose token the new keys no longer accept (removed
    from the tokens file, its scope changed, its signing key gone)."""
    for sub in list(svc.hub.subscribers.values()):
        if sub.closed is None and not keys.holds(sub.principal):
            log.info(
                "token revoked: stream ended",
                extra={
                    "event": "token_revoked",
                    "subscriber": sub.id,
                    "token": sub.principal.name if sub.principal else None,
                },
            )
            svc.hub.end(sub, "token_revoked")


def _rescope(svc: Service) -> None:
    """Scopes compiled again for the new schemas: a scope holds type ids, and
    a reload may give an id to another type (or a name to a new id)."""
    for sub in svc.hub.subscribers.values():
        p = sub.principal
        if p is not None and not p.scope.unrestricted:
            sub.scope = p.scope.filter(svc.state.filters)


def _apply_logs(cfg: Config) -> None:
    logs.setup(cfg["log"]["format"], cfg["log"]["level"])


def _apply_subscribers(svc: Service, subs: Mapping[str, Any]) -> None:
    hub = svc.hub
    hub.queue_records, hub.queue_bytes = subs["queue_records"], subs["queue_bytes"]
    hub.policy, hub.budget_bytes = subs["policy"], subs["memory_budget"]
    # connected subscribers too: a lowered bound applies at their next record
    for sub in hub.subscribers.values():
        sub.max_records, sub.max_bytes, sub.policy = hub.queue_records, hub.queue_bytes, hub.policy
    hub.history.resize(subs["history_records"], subs["history_bytes"])
    # heartbeat, max_batch, ws_compress, send_buffer: read per new connection
    svc.state.settings = subs


def _apply_consumer(svc: Service, consumer: Mapping[str, Any]) -> None:
    c = svc.consumer
    c.batch, c.coalesce, c.stall_recheck = (
        consumer["batch"],
        consumer["coalesce"],
        consumer["stall_recheck"],
    )
    svc.state.batch = consumer["batch"]


def _apply_workers(svc: Service, workers: Mapping[str, Any]) -> None:
    sup = svc.supervisor
    sup.backoff_initial = workers["backoff_initial"]
    sup.backoff_max = workers["backoff_max"]
    sup.backoff_reset = workers["backoff_reset"]


def _apply_schemas(svc: Service, plan: Plan) -> None:
    # on the event loop, as the consumer is: its next batch is the first
    # encoded with the new schemas, and no batch is split between the two
    svc.consumer.encoder = plan.encoder
    svc.collector.swap_encoder(plan.encoder)
    svc.state.filters = FilterSchema(
        _type_ids(plan.schemas), (f.name for s in plan.schemas for f in s.fields)
    )
    svc.schemas, svc.encoder = plan.schemas, plan.encoder
