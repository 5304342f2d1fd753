"""The service's lifecycle: start everything in order, run, drain and stop.

Start: schemas and encoder, worker plan (config errors surface here, before
anything runs), then the components in order: the ring (allocated up front,
so a ring that does not fit its tmpfs fails now, not with SIGBUS later), the
attach socket, the kernel sources (BPF programs loaded, pinned rings
opened), HTTP, the consumer, the workers; /readyz turns 200.

Stop (SIGTERM or SIGINT), within server.shutdown_timeout: /readyz 503 and
new subscribers refused, then the components in reverse: workers stopped,
the ring drained to the subscribers, streams flushed and ended (WebSockets
closed with 1001), BPF programs detached, the ring closed; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

import ringcore
from service import __version__, tls
from service.auth.gate import AuthConfigError, Authenticator, Keys
from service.consumer import RingConsumer
from service.endpoints import State, make_app
from service.fanout import Hub
from service.filters import FilterSchema
from service.guard import ConnectionGuard, GuardedRunner, Rejections, install_log_filter
from service.ingest import Ingest
from service.kernel import KernelSourceError, KernelSources
from service.loopmon import LoopMonitor
from service.metrics import Latency, ServiceCollector
from service.origins import OriginPolicy, add_cors_headers, is_loopback_host
from service.reload import Plan, Reloader
from service.schema import SchemaError, builtin_schemas, compile_encoder, load_schema_file
from service.settings import Config, ConfigError
from service.sources import plugin
from service.workers import Supervisor, WorkerSpec, plan_workers

log = logging.getLogger("ringstream")


class StartupError(Exception):
    """The service cannot start; the message says why and what to change."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _sized_ring(size: int, **kw: Any) -> ringcore.Ring:
    """A ring of ring.size; a size the ring refuses is a config error naming it."""
    try:
        return ringcore.Ring(size, **kw)
    except ValueError as e:
        raise ConfigError(f"ring.size: {e}") from None


def create_ring(cfg: Config) -> ringcore.Ring:
    size = cfg["ring"]["size"]
    shm_dir = cfg["ring"]["shm_dir"]
    where = None if shm_dir == "memfd" else shm_dir
    try:
        return _sized_ring(size, abandon_timeout=cfg["ring"]["abandon_timeout"], shm_dir=where)
    except OSError as e:
        if where is None:
            raise StartupError(f"cannot create the ring: {e}") from None
        if e.errno == errno.ENOSPC:
            st = os.statvfs(where)
            free = st.f_bavail * st.f_frsize
            total = st.f_blocks * st.f_frsize
            need = size + 7 * ringcore.PAGE_SIZE  # the control pages, rounded up
            raise StartupError(
                f"the ring does not fit in {where}: ring.size {_mib(size)} needs "
                f"{_mib(need)}, and {where} has {_mib(free)} free of {_mib(total)}. "
                f"In Docker, give the container more shared memory: docker run "
                f"--shm-size={max(64, (need >> 20) + 64)}m ...; in Kubernetes, size the "
                f"memory-backed emptyDir on {where}; or lower ring.size (--ring-size)."
            ) from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            raise StartupError(
                f"ring.shm_dir: cannot create the ring in {where}: {e.strerror} "
                '(ring.shm_dir = "memfd" uses an anonymous memfd instead)'
            ) from None
        raise StartupError(f"cannot create the ring in {where}: {e}") from None


def load_schemas(cfg: Config) -> list[Any]:
    schemas = list(builtin_schemas())
    for path in cfg["schemas"]["files"]:
        try:
            schemas.extend(load_schema_file(path))
        except OSError as e:
            raise ConfigError(f"schemas.files: cannot read {path}: {e.strerror}") from None
        except SchemaError as e:
            raise ConfigError(f"schemas.files: {path}: {e}") from None
    seen: dict[int, str] = {}
    for s in schemas:
        if s.type_id in seen:
            raise ConfigError(
                f"schemas.files: type {s.type_id} is defined twice ({seen[s.type_id]}, {s.name})"
            )
        seen[s.type_id] = s.name
    return schemas


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU
    quota (docker run --cpus, a Kubernetes CPU limit), which os.cpu_count()
    ignores."""
    n = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _check_plugins(specs: list[WorkerSpec]) -> None:
    """Import plugin targets now: a typo fails the start, not a worker later."""
    for spec in specs:
        if spec.kind == "plugin" and spec.instance == 0:
            try:
                plugin.resolve(spec.options["target"])
            except plugin.PluginError as e:
                raise ConfigError(f"sources[{spec.index}].target: {e}") from None


def plan(cfg: Config) -> Plan:
    """What `cfg` asks for, checked: the schemas, the encoder, the worker plan,
    the plugins' imports. At start and for every reload."""
    schemas = load_schemas(cfg)
    encoder = compile_encoder(schemas)
    count = cfg["workers"]["count"] or available_cpus()
    specs = plan_workers([dict(s) for s in cfg.sources], count)
    _check_plugins(specs)
    try:
        keys = Keys(cfg["auth"])
    except AuthConfigError as e:
        raise ConfigError(str(e)) from None
    return Plan(cfg, schemas, encoder, specs, keys)


def check(cfg: Config) -> Plan:
    """Every check of `cfg` that needs no running service: the plan and the
    ring's size (a ring never written costs no memory: made and closed)."""
    p = plan(cfg)
    _sized_ring(cfg["ring"]["size"], shm_dir=None).close()
    tls.check(cfg["server"])
    return p


def _raise_fd_limit() -> None:
    """Every subscriber is a socket: a soft limit of 1,024 descriptors would
    cap them well below what the machine allows, so take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Service:
    """The running service; `run()` returns the process exit status.

    Each component is an async generator method in the manner of aiohttp's
    cleanup_ctx: the code before its `yield` starts it, the code after stops
    it, and `run()` enters them in COMPONENTS order and leaves them in
    reverse. A component that fails to start stops those already started.
    """

    COMPONENTS = (
        "_ring",
        "_loop_monitor",
        "_attach",
        "_kernel_sources",
        "_http",
        "_forward",
        "_consumer",
        "_workers",
        "_reloads",
    )

    # a hub (hub.urls): no ring, no workers; the stream read from JetStream
    HUB_COMPONENTS = (
        "_hub_state",
        "_loop_monitor",
        "_http",
        "_nats_feed",
        "_signals",
    )

    def __init__(self, cfg: Config, read_config: Callable[[], Config]) -> None:
        """`read_config` reads the configuration again, from the layers `cfg` came from."""
        self.cfg = cfg
        self.read_config = read_config
        self.stop_requested = asyncio.Event()
        self.port: int | None = None
        self.stop_began: float | None = None  # monotonic
        self.deadline = 0.0  # stop_began + server.shutdown_timeout
        self.drained = 0

    async def run(self) -> int:
        self._plan()
        async with contextlib.AsyncExitStack() as stack:
            hub_mode = bool(self.cfg["hub"]["urls"])
            for name in self.HUB_COMPONENTS if hub_mode else self.COMPONENTS:
                component = contextlib.asynccontextmanager(getattr(self, name))
                await stack.enter_async_context(component())
            self._serving()
            await self.stop_requested.wait()
            self._stopping()
        return 0

    # --- before anything runs: what the configuration asks for ------------

    def _plan(self) -> None:
        """Config errors surface here, before anything is started."""
        _raise_fd_limit()
        # SIGHUP asks for a reload: until the reloader is up (and after it is
        # down) it must not stop the service, as its default action would
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        p = plan(self.cfg)
        self.schemas, self.encoder = p.schemas, p.encoder
        self.keys = p.keys
        # planned: what a reload compares; specs: what the workers get (with
        # the kernel sources' descriptors)
        self.planned = self.specs = p.specs

    # --- the components, in start order ------------------------------------

    def _fan_out(self) -> Hub:
        subs = self.cfg["subscribers"]
        return Hub(
            queue_records=subs["queue_records"],
            queue_bytes=subs["queue_bytes"],
            policy=subs["policy"],
            history_records=subs["history_records"],
            history_bytes=subs["history_bytes"],
            budget_bytes=subs["memory_budget"],
        )

    def _shared_state(self, ring: ringcore.Ring | None, consumer: RingConsumer | None) -> State:
        """The metrics registry and what the endpoints share (a hub: no ring,
        no consumer)."""
        self.registry = CollectorRegistry(auto_describe=True)
        latency = Latency()
        self.registry.register(latency)
        return State(
            ring=ring,  # type: ignore[arg-type]
            hub=self.hub,
            consumer=consumer,  # type: ignore[arg-type]
            filters=FilterSchema(
                {s.name: s.type_id for s in self.schemas},
                (f.name for s in self.schemas for f in s.fields),
            ),
            registry=self.registry,
            latency=latency,
            settings=self.cfg["subscribers"],
            batch=self.cfg["consumer"]["batch"],
        )

    async def _ring(self) -> AsyncIterator[None]:
        """The ring, allocated up front (so it fails now, not with SIGBUS later),
        and what reads it: the hub, the consumer, the metrics."""
        cfg = self.cfg
        self.ring = ring = create_ring(cfg)
        self.hub = self._fan_out()
        self.consumer = RingConsumer(
            ring,
            self.encoder,
            self.hub,
            batch=cfg["consumer"]["batch"],
            stall_recheck=cfg["consumer"]["stall_recheck"],
            coalesce=cfg["consumer"]["coalesce"],
        )
        self.state = self._shared_state(ring, self.consumer)
        try:
            yield
        finally:
            if self.stop_began is not None:
                log.info(
                    "stopped",
                    extra={
                        "event": "stop",
                        "drained_records": self.drained,
                        "last_id": self.hub.history.last,
                        "consumed_records": self.consumer.records,
                        "left_in_ring_bytes": ring.query().avail_data,
                        "seconds": round(time.monotonic() - self.stop_began, 3),
                    },
                )
            ring.close()

    async def _hub_state(self) -> AsyncIterator[None]:
        """A hub's fan-out and what the endpoints share: no ring, no consumer."""
        self.ring = None  # type: ignore[assignment]
        self.attach = None
        self.hub = self._fan_out()
        self.state = self._shared_state(None, None)
        try:
            yield
        finally:
            if self.stop_began is not None:
                log.info(
                    "stopped",
                    extra={
                        "event": "stop",
                        "last_id": self.hub.history.last,
                        "seconds": round(time.monotonic() - self.stop_began, 3),
                    },
                )

    async def _nats_feed(self) -> AsyncIterator[None]:
        """A hub's only source: the JetStream stream (service/forward/hub.py)."""
        from service.forward.hub import HubStartError, NatsFeed

        feed = NatsFeed(
            self.cfg["hub"],
            self.hub,
            {s.name: s.type_id for s in self.schemas},
            self.cfg["subscribers"]["history_records"],
        )
        try:
            await feed.start()
        except HubStartError as e:
            raise StartupError(str(e)) from None
        self.feed = feed
        self.state.epoch = feed.epoch
        self.state.feed = feed
        self.registry.register(feed)
        try:
            yield
        finally:
            await feed.stop()

    async def _signals(self) -> AsyncIterator[None]:
        """A hub's SIGTERM and SIGINT (the workers component has them otherwise)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        yield

    async def _loop_monitor(self) -> AsyncIterator[None]:
        """The event loop's stalls, measured for as long as anything runs."""
        monitor = LoopMonitor()
        self.registry.register(monitor)
        monitor.start()
        try:
            yield
        finally:
            monitor.stop()

    async def _attach(self) -> AsyncIterator[None]:
        """The Unix socket external producers attach through (ring.attach_socket)."""
        self.attach = None
        if self.cfg["ring"]["attach_socket"]:
            uids = {os.getuid(), *self.cfg["ring"]["attach_uids"]}
            try:
                self.attach = ringcore.serve(
                    self.ring, self.cfg["ring"]["attach_socket"], allowed_uids=uids
                )
            except OSError as e:
                path = self.cfg["ring"]["attach_socket"]
                parent = os.path.dirname(os.path.abspath(path))
                why = e.strerror or str(e)
                if not os.path.isdir(parent):
                    why = f"its directory {parent} does not exist"
                raise StartupError(f"ring.attach_socket: cannot listen on {path}: {why}") from None
        try:
            yield
        finally:
            if self.attach is not None:
                self.attach.close()

    async def _kernel_sources(self) -> AsyncIterator[None]:
        """BPF programs and pinned kernel rings the sources read; held until the
        workers that read them have stopped."""
        self.kernel = KernelSources()
        try:
            self.specs = self.kernel.open(self.specs, self.schemas)
        except KernelSourceError as e:
            raise StartupError(str(e)) from None
        try:
            self.registry.register(self.kernel)
            yield
        finally:
            self.kernel.close()

    async def _forward(self) -> AsyncIterator[None]:
        """forward.urls: every record also to NATS JetStream (service/forward/).
        Left after the consumer has drained, so what it drained goes too."""
        cfg = self.cfg["forward"]
        self.forwarder = None
        if not cfg["urls"]:
            yield
            return
        from service.forward.edge import ForwardConfigError
        from service.forward.process import ForwardProcess

        try:
            # in a process of its own: acks and frames cost this loop nothing
            fwd = ForwardProcess(
                cfg,
                host=cfg["host"] or socket.gethostname(),
                epoch=self.state.epoch,
                type_names={0: "raw", **{s.type_id: s.name for s in self.schemas}},
                log_cfg=self.cfg["log"],
            )
            await fwd.start()
        except ForwardConfigError as e:
            raise StartupError(str(e)) from None
        self.forwarder = self.state.forwarder = fwd
        self.registry.register(fwd)
        self.hub.taps.append(fwd.offer)
        try:
            yield
        finally:
            await fwd.stop(max(time.monotonic(), self.deadline - 0.5))

    async def _http(self) -> AsyncIterator[None]:
        """The HTTP server; at stop, the streams end (flushed, WebSockets 1001) first."""
        server = self.cfg["server"]
        rejections = Rejections()
        self.guard = ConnectionGuard(rejections, server)
        self.origins = OriginPolicy(rejections, server)
        self.registry.register(rejections)
        self.registry.register(self.guard)
        base = server["base_path"]
        self.authenticator = auth = Authenticator(self.keys, base)
        self.state.auth = auth
        self.registry.register(auth)
        self.tls = tls.context(server)
        outer = [self.guard.middleware, self.origins.middleware]
        app = make_app(self.state, [auth.middleware] if base else [*outer, auth.middleware])
        app.router.add_post("/login", auth.login)
        app.router.add_post("/logout", auth.logout)
        if self.ring is not None:  # a hub has no ring to ingest into
            self.ingest = Ingest(self.ring, self.cfg["ingest"], lambda: self.state.phase == "ready")
            self.registry.register(self.ingest)
            app.router.add_post("/ingest", self.ingest.handle)
        app.on_response_prepare.append(add_cors_headers)
        if base:
            root = web.Application(middlewares=outer)
            # the page's relative URLs want its directory: /base/, not /base
            # (first: the sub-app's prefix would take /base as well)
            root.router.add_get(base, _redirect(base + "/"))
            root.add_subapp(base, app)
            app = root
        runner = GuardedRunner(
            app,
            self.guard,
            handle_signals=False,
            shutdown_timeout=1.0,
            keepalive_timeout=server["idle_timeout"],
        )
        remove_log_filter = install_log_filter(rejections)
        await runner.setup()
        host, port = self.cfg["server"]["host"], self.cfg["server"]["port"]
        site = web.TCPSite(
            runner,
            host,
            port,
            backlog=self.cfg["server"]["backlog"],
            ssl_context=self.tls.listener if self.tls else None,
        )
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            remove_log_filter()
            # the address is the host's fault (no such interface, no such
            # name), a port in use or privileged the port's
            key = "server.port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "server.host"
            raise StartupError(
                f"{key}: cannot listen on {host}:{port}: {e.strerror or e}"
            ) from None
        self.port = _bound_port(runner, port)
        _warn_auth(self.keys, host, self.tls is not None)
        try:
            yield
        finally:
            self.hub.close_all("shutdown")
            pending = set(self.state.streams)
            if pending:
                _, late = await asyncio.wait(
                    pending, timeout=max(0.1, self.deadline - time.monotonic() - 0.5)
                )
                for task in late:
                    task.cancel()
            await runner.cleanup()
            remove_log_filter()

    async def _consumer(self) -> AsyncIterator[None]:
        """The ring's consumer on the loop; at stop, what is left is drained."""
        self.consumer.start()
        try:
            yield
        finally:
            self.consumer.stop()
            self.drained = self.consumer.drain()

    async def _workers(self) -> AsyncIterator[None]:
        """The worker processes and the signals that stop the service."""
        cfg = self.cfg
        self.supervisor = Supervisor(
            self.ring,
            self.specs,
            backoff_initial=cfg["workers"]["backoff_initial"],
            backoff_max=cfg["workers"]["backoff_max"],
            backoff_reset=cfg["workers"]["backoff_reset"],
            log=logging.getLogger("ringstream.workers"),
        )
        self.collector = collector = ServiceCollector(
            self.ring,
            self.hub,
            self.supervisor,
            self.encoder,
            # this process writes into the ring only for POST /ingest
            lambda pid: "ingest" if pid == os.getpid() else self.supervisor.source_of(pid),
            lambda: self.state.phase == "ready",
        )
        # a series per source from the start, so the first refusals show in rate()
        for kind in {*(s.kind for s in self.specs), "external", "ingest"}:
            collector.slots.failures[kind] += 0
        self.registry.register(collector)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        await self.supervisor.start()
        try:
            yield
        finally:
            left = self.deadline - time.monotonic()
            await self.supervisor.stop(max(0.5, min(3.0, left - 1.5)))

    async def _reloads(self) -> AsyncIterator[None]:
        """SIGHUP and POST /-/reload: the configuration read again and applied
        (service/reload.py says what applies at once and what needs a restart)."""
        reloader = Reloader(self, self.read_config, plan)
        self.registry.register(reloader.metrics)
        self.state.reload = reloader.reload
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reloader.on_sighup)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self.state.reload = None
            await reloader.settle()

    # --- the transitions ----------------------------------------------------

    def _serving(self) -> None:
        cfg = self.cfg
        self.state.phase = "ready"
        # what start-up built lives as long as the service: keep it out of
        # every full collection's scan
        gc.freeze()
        if self.ring is None:
            log.info(
                "started",
                extra={
                    "event": "start",
                    "version": __version__,
                    "mode": "hub",
                    "host": cfg["server"]["host"],
                    "port": self.port,
                    "stream": cfg["hub"]["stream"],
                    "epoch": self.state.epoch,
                    "config": cfg.origin,
                    "pid": os.getpid(),
                },
            )
            return
        log.info(
            "started",
            extra={
                "event": "start",
                "version": __version__,
                "host": cfg["server"]["host"],
                "port": self.port,
                "ring_size": self.ring.size,
                "ring_memory": cfg["ring"]["shm_dir"],
                "workers": len(self.specs),
                "sources": sorted({s.kind for s in self.specs}),
                **self.kernel.summary(),
                "config": cfg.origin,
                "attach_socket": cfg["ring"]["attach_socket"] or None,
                "pid": os.getpid(),
            },
        )

    def _stopping(self) -> None:
        """/readyz 503 and new subscribers refused, no new producers; the
        components then stop in reverse order within server.shutdown_timeout."""
        self.stop_began = time.monotonic()
        self.deadline = self.stop_began + self.cfg["server"]["shutdown_timeout"]
        self.state.phase = "draining"
        log.info("stopping", extra={"event": "stopping"})
        if self.attach is not None:
            self.attach.close()


def _redirect(to: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        # a shared link's filter survives the redirect
        qs = request.query_string
        raise web.HTTPPermanentRedirect(f"{to}?{qs}" if qs else to)

    return handler


def _warn_auth(keys: Keys, host: str, tls_on: bool) -> None:
    """What a start with auth on should not keep quiet about."""
    if keys.tokens is not None and keys.tokens.warning:
        log.warning(keys.tokens.warning, extra={"event": "auth_warning"})
    if keys.mode != "none" and not tls_on and not is_loopback_host(host):
        log.warning(
            "tokens travel in clear text: auth is on, TLS is off, and the service "
            f"listens on {host}, beyond loopback (set server.tls_cert and tls_key, "
            "or put a TLS proxy in front)",
            extra={"event": "auth_warning"},
        )


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return asked
