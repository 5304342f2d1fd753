"""Worker processes that produce into the ring, and the supervisor that keeps them running.

`plan_workers` turns the [[sources]] configuration and the worker count into
one `WorkerSpec` per process; `Supervisor` runs them as `multiprocessing`
processes of the *spawn* context (the parent runs an event loop, and a forked
copy of a running loop is unsafe), each handed the ring, which arrives in the
child as a producer handle. A worker that exits while the supervisor runs is
restarted after a backoff; `stop()` ends them all within its timeout.

A source module (service.sources.<kind>) has one entry point::

    run(ring, options, *, instance, stop) -> None

`options` are the checked keys of its [[sources]] entry (the rate already split
per instance), `instance` is the worker's index within the source, and `stop`
is a `StopFlag` set by SIGTERM: the source returns soon after it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import math
import multiprocessing
import multiprocessing.process
import os
import select
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import setproctitle

import ringcore
from service.settings import ConfigError, parse_size

log = logging.getLogger(__name__)

# exit status of a worker whose source cannot run as configured (sysexits'
# EX_CONFIG): restarting it would fail the same way, so it is not restarted
EX_CONFIG = 78

SOURCE_MODULES = {
    "bpf-ringbuf": "service.sources.bpf_ringbuf",
    "exec": "service.sources.exec",
    "plugin": "service.sources.plugin",
    "synthetic": "service.sources.synthetic",
}
MIX_KINDS = ("synthetic", "synthetic_blob", "raw")
SYNTHETIC_MIN_SIZE = 64  # the synthetic schema's fixed size, header included

# backoff while the ring is full: short enough not to add latency when the
# consumer catches up, long enough not to spin on the reservation lock
FULL_BACKOFF_MIN = 50e-6
FULL_BACKOFF_MAX = 5e-3


class SourceConfigError(ConfigError):
    """A [[sources]] or workers.count value that cannot be used; the message names the key.

    A ConfigError like any other, so the service stops at start with it.
    """


# --- the plan: which worker processes run which source --------------------


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: `instance` of `instances` running source `index` of [[sources]]."""

    kind: str
    index: int  # position in [[sources]], for messages
    instance: int
    instances: int
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.instance}]"


def _fail(key: str, problem: str, value: object) -> SourceConfigError:
    return SourceConfigError(f"{key}: {problem}, got {value!r}")


def _number(value: object, key: str, *, minimum: float, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(key, "must be a number", value)
    if value < minimum or (positive and value <= 0):
        raise _fail(key, "must be > 0" if positive else f"must be >= {minimum:g}", value)
    return float(value)


def _integer(value: object, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, "must be an integer", value)
    if value < minimum:
        raise _fail(key, f"must be >= {minimum}", value)
    return value


EXEC_METHODS = ("auto", "bpf", "proc")
DEFAULT_BPF_RING_SIZE = 4 << 20


def _kernel_ring_size(value: object, key: str) -> int:
    size = parse_size(value, key)
    page = os.sysconf("SC_PAGE_SIZE")
    if size < page or size & (size - 1) or size > 1 << 30:
        raise _fail(
            key, f"must be a power of 2 from {page} bytes to 1GiB (a BPF ring buffer)", value
        )
    return size


def _check_exec(src: Mapping[str, Any], key: str) -> dict[str, Any]:
    existing = src.get("existing", False)
    if not isinstance(existing, bool):
        raise _fail(f"{key}.existing", "must be true or false", existing)
    method = src.get("method", "auto")
    if method not in EXEC_METHODS:
        raise _fail(f"{key}.method", f"must be one of {', '.join(EXEC_METHODS)}", method)
    return {
        "method": method,
        "interval": _number(src.get("interval", 0.1), f"{key}.interval", minimum=0, positive=True),
        "existing": existing,
        "bpf_ring_size": _kernel_ring_size(
            src.get("bpf_ring_size", DEFAULT_BPF_RING_SIZE), f"{key}.bpf_ring_size"
        ),
    }


def _check_bpf_ringbuf(src: Mapping[str, Any], key: str) -> dict[str, Any]:
    path = src.get("path")
    if not isinstance(path, str) or not path:
        raise _fail(
            f"{key}.path", 'must be the path of a pinned ring buffer, e.g. "/sys/fs/bpf/NAME"', path
        )
    schema = src.get("schema")
    if not isinstance(schema, str) or not schema:
        raise _fail(f"{key}.schema", "must name a schema of the schema files", schema)
    return {"path": path, "schema": schema}


def _check_synthetic(src: Mapping[str, Any], key: str) -> dict[str, Any]:
    size = _integer(src.get("size", SYNTHETIC_MIN_SIZE), f"{key}.size", minimum=SYNTHETIC_MIN_SIZE)
    mix = src.get("mix", {"synthetic": 1.0})
    if not isinstance(mix, Mapping) or not mix:
        raise _fail(f"{key}.mix", "must be a table of weights such as { synthetic = 1.0 }", mix)
    weights: dict[str, float] = {}
    for name, weight in mix.items():
        if name not in MIX_KINDS:
            known = ", ".join(MIX_KINDS)
            raise SourceConfigError(f"{key}.mix.{name}: unknown record kind (known: {known})")
        weights[name] = _number(weight, f"{key}.mix.{name}", minimum=0)
    if not any(weights.values()):
        raise _fail(f"{key}.mix", "needs at least one weight > 0", mix)
    return {
        "rate": _number(src.get("rate", 5), f"{key}.rate", minimum=0),
        "size": size,
        "mix": {name: w for name, w in weights.items() if w > 0},
    }


def _check_plugin(src: Mapping[str, Any], key: str) -> dict[str, Any]:
    target = src.get("target")
    if target is None:
        raise SourceConfigError(
            f'{key}.target: missing (a plugin needs target = "module:function")'
        )
    mod, sep, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not mod.strip() or not attr.strip():
        raise _fail(f"{key}.target", 'must be "module:function"', target)
    options = src.get("options", {})
    if not isinstance(options, Mapping):
        raise _fail(f"{key}.options", "must be a table", options)
    return {"target": target, "options": dict(options)}


# kind -> (its own keys, checker); "kind" and "instances" are common to all
_KINDS = {
    "bpf-ringbuf": (("path", "schema"), _check_bpf_ringbuf),
    "exec": (("method", "interval", "existing", "bpf_ring_size"), _check_exec),
    "synthetic": (("rate", "size", "mix"), _check_synthetic),
    "plugin": (("target", "options"), _check_plugin),
}


def _instances(src: Mapping[str, Any], kind: str, key: str) -> int | None:
    """Fixed instance count, or None for "auto"."""
    value = src.get("instances", 1)
    if kind == "exec":
        # two scanners of one /proc would report every event twice
        if value != 1 or isinstance(value, bool):
            raise _fail(f"{key}.instances", "an exec source runs exactly 1 instance", value)
        return 1
    if kind == "bpf-ringbuf":
        # a ring buffer has one consumer
        if value != 1 or isinstance(value, bool):
            raise _fail(f"{key}.instances", "a bpf-ringbuf source runs exactly 1 instance", value)
        return 1
    if value == "auto":
        return None
    return _integer(value, f"{key}.instances", minimum=1)


def plan_workers(sources: Sequence[Mapping[str, Any]], count: int) -> list[WorkerSpec]:
    """The worker processes for `sources` ([[sources]] tables) and workers.count.

    count 0 means one worker per CPU. A source's `instances` is an integer or
    "auto": the workers the fixed sources leave over, shared among the auto
    sources, at least 1 each. A synthetic `rate` is split evenly over its
    instances. Raises SourceConfigError naming the offending key.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise _fail("workers.count", "must be an integer >= 0", count)
    workers = count or os.cpu_count() or 1
    checked: list[tuple[str, int | None, dict[str, Any]]] = []
    exec_at: int | None = None
    for i, src in enumerate(sources):
        key = f"sources[{i}]"
        if not isinstance(src, Mapping):
            raise _fail(key, "must be a table", src)
        kind = src.get("kind")
        if kind is None:
            raise SourceConfigError(f"{key}.kind: missing (known: {', '.join(sorted(_KINDS))})")
        if kind not in _KINDS:
            raise _fail(
                f"{key}.kind", f"unknown source kind (known: {', '.join(sorted(_KINDS))})", kind
            )
        if kind == "exec":
            if exec_at is not None:
                raise SourceConfigError(
                    f"{key}.kind: only one exec source may run (sources[{exec_at}] is one)"
                )
            exec_at = i
        own, check = _KINDS[kind]
        for name in src:
            if name not in ("kind", "instances", *own):
                known = ", ".join(("instances", *own))
                raise SourceConfigError(
                    f"{key}.{name}: unknown key for kind {kind!r} (known: {known})"
                )
        checked.append((kind, _instances(src, kind, key), check(src, key)))

    fixed = [(kind, n) for kind, n, _ in checked if n is not None]
    total = sum(n for _, n in fixed)
    if total > workers:
        parts = ", ".join(f"{kind}: {n}" for kind, n in fixed)
        plural = "worker" if workers == 1 else "workers"
        raise SourceConfigError(
            f"workers.count: {workers} {plural} cannot run {total} fixed source instances ({parts})"
        )
    autos = sum(1 for _, n, _ in checked if n is None)
    spare = workers - total
    specs: list[WorkerSpec] = []
    auto_seen = 0
    for index, (kind, fixed_n, options) in enumerate(checked):
        n = fixed_n
        if n is None:
            # the spare workers shared out, the first autos taking the remainder
            n = max(1, spare // autos + (1 if auto_seen < spare % autos else 0))
            auto_seen += 1
        if kind == "synthetic":
            options = {**options, "rate": options["rate"] / n}
        specs.extend(WorkerSpec(kind, index, i, n, options) for i in range(n))
    return specs


# --- inside a worker process ----------------------------------------------


class StopFlag:
    """Set by SIGTERM (or another thread); `wait(t)` sleeps until it is set or t passes.

    Not a threading.Event: setting one from a signal handler can deadlock on
    its lock if the signal lands while the main thread holds it. A pipe lets
    `wait` wake at once.
    """

    def __init__(self) -> None:
        self._set = False
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # a plugin that knows nothing of the flag is stopped by an exception
        # raised from the signal handler instead
        self.interrupt = False

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"\0")

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """True when the flag is set; returns early when it gets set while waiting."""
        if not self._set and (timeout is None or timeout > 0):
            select.select([self._r], [], [], timeout)
        return self._set

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


class Grace:
    """A StopFlag for delivering records already taken out of a kernel ring.

    Those records exist nowhere else: after `stop` is set, a full ring is
    still retried for `seconds` more (the service's consumer keeps draining
    until the workers are gone), rather than given up at once.
    """

    def __init__(self, stop: StopFlag, seconds: float = 1.0) -> None:
        self.stop = stop
        self.seconds = seconds
        self._until: float | None = None

    def is_set(self) -> bool:
        if not self.stop.is_set():
            return False
        if self._until is None:
            self._until = time.monotonic() + self.seconds
        return time.monotonic() >= self._until

    def wait(self, timeout: float | None = None) -> bool:
        if not self.stop.is_set():
            self.stop.wait(timeout)
        elif timeout:
            time.sleep(min(timeout, 0.01))
        return self.is_set()


class Terminated(Exception):
    """Raised by SIGTERM in a worker whose source does not watch its StopFlag."""


class Producer(Protocol):
    def output_many(self, records: Sequence[bytes], flags: int = 0) -> int: ...


def deliver(ring: Producer, records: Sequence[bytes], stop: StopFlag | Grace) -> int:
    """Put `records` in the ring in order, backing off while it is full.

    Nothing is dropped: a full ring is retried (each refusal is counted by the
    ring in query().reserve_failures) until every record is in or `stop` is
    set. Returns how many went in.
    """
    done, n = 0, len(records)
    delay = FULL_BACKOFF_MIN
    while done < n:
        k = ring.output_many(records[done:] if done else records)
        if k:
            done += k
            delay = FULL_BACKOFF_MIN
            continue
        if stop.wait(delay):
            break
        delay = min(delay * 2, FULL_BACKOFF_MAX)
    return done


def _die_with_parent() -> None:
    """Have the kernel SIGTERM this worker when the supervisor dies (Linux)."""
    parent = multiprocessing.parent_process()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    # the parent may have died before prctl: then we were reparented already
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGTERM)


def worker_main(ring: ringcore.Ring, spec: WorkerSpec) -> None:
    """Entry point of a worker process: run the source until SIGTERM."""
    # as `ps` and `top` show it, instead of `python -c from multiprocessing.spawn ...`
    setproctitle.setproctitle(f"ringstream: worker {spec.kind}-{spec.instance}")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s %(levelname)s worker {spec.name}[%(process)d]: %(message)s",
        )
    stop = StopFlag()

    def on_sigterm(signum: int, frame: object) -> None:
        stop.set()
        if stop.interrupt:
            raise Terminated

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C reaches the whole process group; the supervisor decides when
    # workers stop (it sends SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        module = importlib.import_module(SOURCE_MODULES[spec.kind])
        module.run(ring, spec.options, instance=spec.instance, stop=stop)
    except Terminated:
        pass
    except SourceConfigError as e:
        logging.getLogger(__name__).error(
            "%s source sources[%d] cannot run: %s", spec.kind, spec.index, e
        )
        sys.exit(EX_CONFIG)


# --- the supervisor (in the service process) ------------------------------


def check_fits(ring: ringcore.Ring, specs: Sequence[WorkerSpec]) -> None:
    """Raise SourceConfigError for a synthetic source whose records the ring cannot hold."""
    for spec in specs:
        size = spec.options.get("size", 0) if spec.kind == "synthetic" else 0
        if size > ring.max_record_size:
            raise SourceConfigError(
                f"sources[{spec.index}].size: must fit the ring (max_record_size "
                f"{ring.max_record_size} for ring.size {ring.size}), got {size}"
            )


class _Slot:
    """One planned worker and the process currently running it."""

    def __init__(self, spec: WorkerSpec, backoff: float) -> None:
        self.spec = spec
        self.retired = False  # stopped by a reload: not restarted
        self.process: multiprocessing.process.BaseProcess | None = None
        self.started = 0.0
        self.exited: asyncio.Future[int] | None = None
        self.next_backoff = backoff
        self.restart: asyncio.TimerHandle | None = None


class Supervisor:
    """Runs one process per WorkerSpec and restarts those that exit, with backoff."""

    def __init__(
        self,
        ring: ringcore.Ring,
        specs: Sequence[WorkerSpec],
        *,
        backoff_initial: float,
        backoff_max: float,
        backoff_reset: float,
        log: logging.Logger,
    ) -> None:
        check_fits(ring, specs)
        self.ring = ring
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.backoff_reset = backoff_reset
        self.log = log
        self.restarts: dict[str, int] = {spec.kind: 0 for spec in specs}
        self._slots = [_Slot(spec, backoff_initial) for spec in specs]
        self._ctx = multiprocessing.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._pids: dict[int, str] = {}

    def source_of(self, pid: int) -> str:
        """The source a producer pid ran (its workers' pids are remembered after
        they exit), or "external" for a process that attached by name."""
        return self._pids.get(pid, "external")

    def alive(self) -> int:
        """Worker processes running now."""
        return sum(1 for s in self._slots if s.exited is not None and not s.exited.done())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        for slot in self._slots:
            self._launch(slot)

    def _launch(self, slot: _Slot) -> None:
        assert self._loop is not None
        slot.restart = None
        spec = slot.spec
        process = self._ctx.Process(
            target=worker_main, args=(self.ring, spec), name=f"ringstream-{spec.name}", daemon=True
        )
        slot.exited = self._loop.create_future()
        slot.process = process
        slot.started = time.monotonic()
        try:
            # spawn: a fork+exec and a pickle written to a pipe; it does not
            # wait for the child to import anything
            process.start()
        except OSError as e:
            self.log.error(
                "worker start failed: %s",
                e,
                extra={
                    "event": "worker_start_failed",
                    "source": spec.kind,
                    "instance": spec.instance,
                },
            )
            slot.process = None
            slot.exited.set_result(-1)
            self._after_exit(slot, -1)
            return
        if process.pid is not None:
            self._pids[process.pid] = spec.kind
        self.log.info(
            "worker started",
            extra={
                "event": "worker_start",
                "source": spec.kind,
                "index": spec.index,
                "instance": spec.instance,
                "pid": process.pid,
            },
        )
        # the sentinel is readable once the child is gone; no polling
        self._loop.add_reader(process.sentinel, self._on_sentinel, slot, process, 0.001)

    def _on_sentinel(
        self, slot: _Slot, process: multiprocessing.process.BaseProcess, retry: float
    ) -> None:
        assert self._loop is not None
        self._loop.remove_reader(process.sentinel)
        process.join(0)  # reaps without blocking
        if process.exitcode is None:
            # The pipe closes a moment before the child becomes reapable (or
            # the child closed it itself): look again shortly.
            self._loop.call_later(retry, self._on_sentinel_retry, slot, process, retry)
            return
        code = process.exitcode
        process.close()
        if slot.exited is not None and not slot.exited.done():
            slot.exited.set_result(code)
        self._after_exit(slot, code)

    def _on_sentinel_retry(
        self, slot: _Slot, process: multiprocessing.process.BaseProcess, retry: float
    ) -> None:
        assert self._loop is not None
        # re-register the reader so _on_sentinel's remove_reader stays paired
        self._loop.add_reader(
            process.sentinel, self._on_sentinel, slot, process, min(retry * 2, 0.1)
        )

    def _after_exit(self, slot: _Slot, code: int) -> None:
        assert self._loop is not None
        if not self._running or slot.retired:
            return  # stopping, or a reload took it out: not a restart
        spec = slot.spec
        if code == EX_CONFIG:
            self.log.error(
                "worker failed: its source cannot run as configured; not restarted",
                extra={
                    "event": "worker_failed",
                    "source": spec.kind,
                    "instance": spec.instance,
                    "exitcode": code,
                },
            )
            return
        if time.monotonic() - slot.started >= self.backoff_reset:
            slot.next_backoff = self.backoff_initial
        backoff = slot.next_backoff
        slot.next_backoff = min(backoff * 2, self.backoff_max)
        slot.restart = self._loop.call_later(backoff, self._restart, slot, code, backoff)

    def _restart(self, slot: _Slot, code: int, backoff: float) -> None:
        if not self._running or slot.retired:
            return
        spec = slot.spec
        self.restarts[spec.kind] += 1
        self._launch(slot)
        self.log.warning(
            "worker restarted",
            extra={
                "event": "worker_restart",
                "source": spec.kind,
                "instance": spec.instance,
                "exitcode": code,
                "restarts": self.restarts[spec.kind],
                "backoff": backoff,
            },
        )

    async def replace(
        self, retire: Sequence[WorkerSpec], launch: Sequence[WorkerSpec], timeout: float
    ) -> None:
        """Stop the workers running `retire` (the very spec objects), then start
        one for each of `launch`; the others run on untouched.

        Stopped first: a source whose config changed must not run twice at once.
        """
        gone = [s for s in self._slots if any(s.spec is r for r in retire)]
        for slot in gone:
            slot.retired = True
        await self._terminate(gone, timeout)
        self._slots = [s for s in self._slots if not s.retired]
        for spec in launch:
            self.restarts.setdefault(spec.kind, 0)
            slot = _Slot(spec, self.backoff_initial)
            self._slots.append(slot)
            self._launch(slot)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker, SIGKILL those still running late; returns within `timeout`."""
        self._running = False
        await self._terminate(self._slots, timeout)

    async def _terminate(self, slots: Sequence[_Slot], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for slot in slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        running = [s for s in slots if s.exited is not None and not s.exited.done()]
        for slot in running:
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError, ValueError):
                slot.process.terminate()
        # most of the time for a clean stop, the rest for SIGKILL to take effect
        await self._wait(running, timeout * 0.8)
        stragglers = [s for s in running if s.exited is not None and not s.exited.done()]
        for slot in stragglers:
            assert slot.process is not None
            self.log.warning(
                "worker still running after SIGTERM, killing it",
                extra={
                    "event": "worker_kill",
                    "source": slot.spec.kind,
                    "instance": slot.spec.instance,
                },
            )
            with contextlib.suppress(ProcessLookupError, ValueError):
                slot.process.kill()
        await self._wait(stragglers, deadline - time.monotonic())
        left = [s.spec.name for s in stragglers if s.exited is not None and not s.exited.done()]
        if left:
            self.log.error(
                "workers still running after stop", extra={"event": "worker_stop", "workers": left}
            )

    @staticmethod
    async def _wait(slots: Sequence[_Slot], timeout: float) -> None:
        futures = [s.exited for s in slots if s.exited is not None and not s.exited.done()]
        if futures and timeout > 0:
            await asyncio.wait(futures, timeout=timeout)
