"""The exec source's BPF method: exec.bpf.c in the kernel, read from its ring buffer.

Two halves in two processes:

* `ExecProgram` (the service process) loads exec.bpf.o with libbpf, sizes
  its ring buffer, attaches both programs, and keeps them attached for the
  service's life. Workers get duplicates of the maps' descriptors, so a
  restarted worker goes on where the last stopped. The service reads the
  kernel ring's positions and the per-CPU counts from here for /metrics.

* `run_bpf` (the exec worker) consumes the kernel ring with
  ringcore.KernelRing and turns each event into the same exec and exit
  records the /proc method writes (config/schemas.toml), into the service's
  ring: wall-clock ts_ns from the event's boot-time stamp, argv NULs as
  spaces, exit_code as the exit status or 128 + the signal.

Losses: every event carries its CPU's loss counts as of its reservation.
When they grew since the last event of that CPU, a gap record (type "gap",
reason "kernel_ring_full") goes into the stream just before it, saying how
many exec and exit events that CPU could not reserve. Losses that no event
has followed yet are found by reading the counts map while the kernel ring
is empty (at most every IDLE_SWEEP seconds), and reported the same way.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ringcore
from service.bpf import diagnose, libbpf
from service.bpf.fds import MapFd
from service.record import MAGIC
from service.sources.exec.proc import (
    CLK_TCK,
    CMDLINE_SIZE,
    EXEC,
    EXEC_TYPE,
    EXIT,
    EXIT_TYPE,
    FILENAME_SIZE,
    Scanner,
    exec_id,
    wait_status_code,
)
from service.sources.gap import KERNEL_RING_FULL, gap_record
from service.workers import Grace, StopFlag, deliver

log = logging.getLogger(__name__)

OBJECT = Path(__file__).with_name("exec.bpf.o")
WHAT = "exec source (method bpf)"

# keep in step with exec.bpf.c
EVENT_EXEC, EVENT_EXIT = 1, 2
F_ARGS_TRUNCATED, F_FILENAME_TRUNCATED = 1, 2
HEAD = struct.Struct("<BBHIQQQQIIIi16s")  # struct event_head, 72 bytes
EXEC_TAIL = struct.Struct(f"<{FILENAME_SIZE}s{CMDLINE_SIZE}s")
COUNTS = struct.Struct("<QQQQ")  # struct counts: sent[exec, exit], lost[exec, exit]
REPORTED = struct.Struct("<QQ")  # struct reported: lost[exec, exit] already in the stream

IDLE_SWEEP = 0.1  # seconds between reads of the counts map while idle
POLL_TIMEOUT = 0.1  # seconds a poll may wait before the stop flag is looked at
BATCH = 4096
TICK_NS = 1_000_000_000 // CLK_TCK


class ExecProgram:
    """exec.bpf.o loaded and attached; close() detaches it."""

    def __init__(self, obj: libbpf.BpfObject) -> None:
        self._obj = obj
        self._fds: list[MapFd] = []
        try:
            self.events = self._dup("events")
            self.counts = self._dup("counts")
            self.reported = self._dup("reported")
            # for /metrics only: the worker is the ring's consumer
            self.kernel_ring = ringcore.KernelRing(self.events.fd)
        except BaseException:
            for fd in self._fds:
                fd.close()
            raise

    def _dup(self, name: str) -> MapFd:
        fd = MapFd(os.dup(self._obj.map_fd(name)), name)
        self._fds.append(fd)
        return fd

    @classmethod
    def load(cls, ring_size: int) -> ExecProgram:
        """Raises diagnose.BpfUnavailable naming what is missing."""
        diagnose.check(OBJECT, what=WHAT)
        try:
            obj = libbpf.BpfObject(OBJECT)
        except libbpf.LibbpfError as e:
            raise diagnose.explain(e, what=WHAT) from None
        try:
            obj.set_max_entries("events", ring_size)
            obj.set_max_entries("reported", libbpf.possible_cpus())
            obj.load()
            obj.attach()
            return cls(obj)
        except libbpf.LibbpfError as e:
            obj.close()
            raise diagnose.explain(e, what=WHAT) from None
        except BaseException:
            obj.close()  # detached: nothing is left running that no one reads
            raise

    def worker_options(self) -> dict[str, Any]:
        return {"events": self.events, "counts": self.counts, "reported": self.reported}

    def totals(self) -> dict[str, int]:
        """Events the program sent and lost, by type, summed over the CPUs."""
        return sum_counts(self.counts.fd)

    def close(self) -> None:
        self._obj.close()
        self.kernel_ring.close()
        for fd in self._fds:
            fd.close()


def per_cpu_counts(counts_fd: int) -> list[tuple[int, int, int, int]]:
    return [COUNTS.unpack(v) for v in libbpf.lookup_percpu(counts_fd, COUNTS.size)]


def sum_counts(counts_fd: int) -> dict[str, int]:
    sent_exec = sent_exit = lost_exec = lost_exit = 0
    for se, sx, le, lx in per_cpu_counts(counts_fd):
        sent_exec += se
        sent_exit += sx
        lost_exec += le
        lost_exit += lx
    return {
        "sent_exec": sent_exec,
        "sent_exit": sent_exit,
        "lost_exec": lost_exec,
        "lost_exit": lost_exit,
    }


class Translator:
    """Kernel events -> ringstream records, with gap records where events were lost."""

    def __init__(
        self, source: str = "exec", reported: dict[int, tuple[int, int]] | None = None
    ) -> None:
        self.source = source
        # cpu -> (lost exec, lost exit) already in the stream
        self.reported: dict[int, tuple[int, int]] = dict(reported or {})
        self.changed: set[int] = set()  # CPUs whose `reported` grew since save()
        self.offset = 0
        self.resync()

    def resync(self) -> None:
        """CLOCK_REALTIME - CLOCK_BOOTTIME, to date the events (which carry boot time)."""
        self.offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(
            time.CLOCK_BOOTTIME
        )

    def losses(self, cpu: int, lost_exec: int, lost_exit: int, ts_ns: int) -> bytes | None:
        """A gap record when `cpu` lost events beyond what was reported, else None."""
        done_exec, done_exit = self.reported.get(cpu, (0, 0))
        new_exec, new_exit = max(0, lost_exec - done_exec), max(0, lost_exit - done_exit)
        if not new_exec and not new_exit:
            return None
        self.reported[cpu] = (max(done_exec, lost_exec), max(done_exit, lost_exit))
        self.changed.add(cpu)
        return gap_record(
            ts_ns,
            reason=KERNEL_RING_FULL,
            source=self.source,
            cpu=cpu,
            lost_exec=new_exec,
            lost_exit=new_exit,
        )

    def records(self, events: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for ev in events:
            (
                kind,
                flags,
                args_size,
                cpu,
                lost_exec,
                lost_exit,
                ts_boot,
                start_boot,
                pid,
                ppid,
                uid,
                status,
                comm,
            ) = HEAD.unpack_from(ev)
            ts_ns = ts_boot + self.offset
            gap = self.losses(cpu, lost_exec, lost_exit, ts_ns)
            if gap is not None:
                out.append(gap)
            xid = exec_id(pid, start_boot // TICK_NS)
            comm = _cstr(comm)
            if kind == EVENT_EXEC:
                filename, args = EXEC_TAIL.unpack_from(ev, HEAD.size)
                cmdline = args[:args_size].rstrip(b"\0").replace(b"\0", b" ")
                truncated = 1 if flags & (F_ARGS_TRUNCATED | F_FILENAME_TRUNCATED) else 0
                out.append(
                    EXEC.pack(
                        MAGIC,
                        EXEC_TYPE,
                        0,
                        ts_ns,
                        pid,
                        ppid,
                        uid,
                        comm,
                        _cstr(filename),
                        cmdline,
                        xid,
                        truncated,
                    )
                )
            elif kind == EVENT_EXIT:
                out.append(
                    EXIT.pack(
                        MAGIC,
                        EXIT_TYPE,
                        0,
                        ts_ns,
                        pid,
                        ppid,
                        uid,
                        wait_status_code(status),
                        comm,
                        max(0, ts_boot - start_boot),
                        xid,
                    )
                )
        return out

    def load(self, reported_fd: int) -> None:
        """What earlier readers reported (this reader may be a restarted one)."""
        for cpu in range(libbpf.possible_cpus()):
            self.reported[cpu] = REPORTED.unpack(libbpf.lookup(reported_fd, cpu, REPORTED.size))

    def save(self, reported_fd: int) -> None:
        """After the gap records are in the ring: remember them for a successor."""
        for cpu in self.changed:
            libbpf.update(reported_fd, cpu, REPORTED.pack(*self.reported[cpu]))
        self.changed.clear()

    def sweep(self, counts_fd: int) -> list[bytes]:
        """Gap records for losses no event has reported yet (call with the ring empty)."""
        now = time.time_ns()
        out = []
        for cpu, (_, _, lost_exec, lost_exit) in enumerate(per_cpu_counts(counts_fd)):
            gap = self.losses(cpu, lost_exec, lost_exit, now)
            if gap is not None:
                out.append(gap)
        return out


def _cstr(b: bytes) -> bytes:
    return b.partition(b"\0")[0]


def run_bpf(ring: ringcore.Ring, options: Mapping[str, Any], *, stop: StopFlag) -> None:
    events: MapFd = options["events"]
    counts: MapFd = options["counts"]
    reported: MapFd = options["reported"]
    kring = ringcore.KernelRing(events.fd)
    events.close()  # KernelRing keeps its own duplicate
    tr = Translator()
    tr.load(reported.fd)
    grace = Grace(stop)
    undelivered = 0

    def put(records: list[bytes]) -> None:
        nonlocal undelivered
        undelivered += len(records) - deliver(ring, records, grace)
        if tr.changed:
            tr.save(reported.fd)

    def sweep() -> None:
        # Losses that no event of their CPU followed yet. Only while the ring
        # is empty, and the producer position unchanged across the read of
        # the counts: an event reserved in between (before a loss read here)
        # must come before the gap, so the next round will place it.
        before = kring.query()
        if before.avail_data:
            return
        saved, saved_changed = dict(tr.reported), set(tr.changed)
        gaps = tr.sweep(counts.fd)
        if kring.query().producer_pos == before.producer_pos:
            put(gaps)
        else:
            tr.reported, tr.changed = saved, saved_changed  # not placed: next round

    if options.get("existing"):
        # what already runs, from /proc (the program only sees what comes next)
        deliver(ring, Scanner(existing=True).scan(), stop)
    next_sweep = time.monotonic() + IDLE_SWEEP
    try:
        while not stop.is_set():
            batch = kring.poll(timeout=POLL_TIMEOUT, max_records=BATCH)
            if batch:
                tr.resync()
                put(tr.records(batch))
            if len(batch) < BATCH and time.monotonic() >= next_sweep:
                sweep()
                next_sweep = time.monotonic() + IDLE_SWEEP
        # the program stays attached until the service closes it, after the
        # workers: what is in the ring now is the last this worker can take
        for _ in range(3):
            put(tr.records(kring.consume()))
            if kring.query().avail_data == 0:
                sweep()
                break
        if undelivered:
            log.warning(
                "stopped with %d exec records not delivered: the ring was full", undelivered
            )
    finally:
        kring.close()
        counts.close()
        reported.close()
