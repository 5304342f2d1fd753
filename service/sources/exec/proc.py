"""The exec source's /proc method: exec and exit events seen by polling /proc (no privileges).

Every `interval` seconds the scanner lists /proc and compares it with the
previous scan:

* a new pid -> an exec record (type 1): pid, ppid, uid (real), comm,
  filename = the /proc/pid/exe link ("" when not permitted), cmdline (NULs
  as spaces), text truncated to the field (at a UTF-8 character boundary);
* a known pid whose comm, exe or cmdline changed (it exec'd again) -> an exec
  record;
* a pid that exited -> an exit record (type 2) with the cached pid, ppid,
  uid and comm, and lifetime_ns = now - its start time (0 if unknown). A
  process is caught as a zombie when it can be: its exit code then comes from
  waitid(WNOWAIT) for our own children (the child stays waitable for its
  parent) or from /proc/pid/stat when the kernel lets us read it (same user
  or CAP_SYS_PTRACE), as the exit status, or 128 + the signal that killed
  it; otherwise, and for a pid already reaped when seen gone, -1.

The first scan only records what runs (no records), unless `existing` is
set: then it emits an exec record for every process already running.

Limits, inherent to polling: a process that lives less than one interval
between two scans is never seen; several execs within one interval show as
the last one; a fork is seen as a new pid running its parent's image (an
exec record with the parent's cmdline), and its exec as a second record; a
process rewriting its own argv or comm (setproctitle, prctl) shows as an
exec; a pid reused within one interval is seen through its new start time
(an exit then an exec). Kernel threads are left out: they never exec. With
/proc mounted hidepid, other users' processes are invisible.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ringcore
from service.record import MAGIC
from service.workers import StopFlag, deliver

EXEC_TYPE = 1
EXIT_TYPE = 2
# header + the fields of config/schemas.toml, in order (tests check them)
EXEC = struct.Struct("<2sHIQ" + "III16s128s256s24sB")
EXIT = struct.Struct("<2sHIQ" + "IIIi16sQ24s")
COMM_SIZE, FILENAME_SIZE, CMDLINE_SIZE, EXEC_ID_SIZE = 16, 128, 256, 24

PF_KTHREAD = 0x00200000  # /proc/pid/stat flags: a kernel thread
CLK_TCK = os.sysconf("SC_CLK_TCK")


def fit(text: bytes, size: int) -> bytes:
    """`text` cut to `size` bytes without splitting a UTF-8 character."""
    if len(text) <= size:
        return text
    end = size
    # text[end] is the first byte left out: while it continues a character,
    # that character straddles the cut, so leave it out whole
    while end > 0 and size - end < 4 and text[end] & 0xC0 == 0x80:
        end -= 1
    return text[:end]


def exec_id(pid: int, start_ticks: int) -> bytes:
    """What ties a process's exec and exit records together: its pid and start time
    (clock ticks after boot, /proc/pid/stat's starttime), so a reused pid gets a new one."""
    return b"%d-%d" % (pid, start_ticks)


def wait_status_code(status: int) -> int:
    """A wait status as an exit code: the exit status, or 128 + the signal (as a shell)."""
    if status & 0x7F == 0:
        return (status >> 8) & 0xFF
    return 128 + (status & 0x7F)


@dataclass
class Stat:
    """What one read of /proc/pid/stat says."""

    comm: bytes
    state: str
    ppid: int
    flags: int
    threads: int
    start: int  # clock ticks after boot
    exit_status: int  # a wait status; 0 unless a zombie (and readable)


@dataclass
class Proc:
    start: int
    ppid: int
    uid: int
    comm: bytes
    exe: bytes
    cmdline: bytes
    truncated: bool = False  # cmdline or exe cut to its field
    exited: bool = False  # exit already reported (seen as a zombie)


def _read(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def parse_stat(data: bytes) -> Stat:
    # comm is in parentheses and may itself hold ")" or spaces: split at the last
    head, _, tail = data.rpartition(b")")
    comm = head.partition(b"(")[2]
    f = tail.split()  # f[0] is field 3 of proc(5)
    return Stat(
        comm=comm,
        state=f[0].decode(),
        ppid=int(f[1]),
        flags=int(f[6]),
        threads=int(f[17]),
        start=int(f[19]),
        exit_status=int(f[49]) if len(f) > 49 else 0,
    )


class Scanner:
    """Diffs successive scans of /proc into exec and exit records."""

    def __init__(self, proc: str = "/proc", *, existing: bool = False) -> None:
        self.proc = proc
        self.procs: dict[int, Proc] = {}
        self._first = True
        self._existing = existing
        self._self = os.getpid()
        # pids whose cmdline read empty last scan (see _look)
        self._deferred: set[int] = set()
        self._defer_next: set[int] = set()

    def scan(self) -> list[bytes]:
        """One pass over /proc: the records of what changed since the last pass."""
        emit = self._existing or not self._first
        self._first = False
        records: list[bytes] = []
        seen: set[int] = set()
        self._deferred, self._defer_next = self._defer_next, set()
        for name in os.listdir(self.proc):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                self._look(pid, emit, seen, records)
            except (FileNotFoundError, ProcessLookupError):
                # gone between listdir and the read: counts as unseen, so a
                # known one gets its exit record below, a new one none
                seen.discard(pid)
            except (ValueError, IndexError):
                # a stat line we cannot parse: not evidence that it exited
                if pid in self.procs:
                    seen.add(pid)
        for pid in [pid for pid in self.procs if pid not in seen]:
            p = self.procs.pop(pid)
            if not p.exited:
                records.append(self._exit(pid, p, -1))
        return records

    def _look(self, pid: int, emit: bool, seen: set[int], out: list[bytes]) -> None:
        # appends to `out` as it goes: a record is kept even if a later read fails
        base = f"{self.proc}/{pid}"
        st = parse_stat(_read(f"{base}/stat", 1024))
        if st.flags & PF_KTHREAD:
            return
        seen.add(pid)
        known = self.procs.get(pid)
        if known is not None and known.start != st.start:
            # the pid was reused since the last scan
            del self.procs[pid]
            if not known.exited:
                out.append(self._exit(pid, known, -1))
            known = None
        # a zombie leader with live threads is still a running process
        if st.state in "ZX" and st.threads <= 1:
            if known is None:
                # exited before we saw it run: nothing to report its exec with
                self.procs[pid] = Proc(st.start, st.ppid, -1, st.comm, b"", b"", exited=True)
            elif not known.exited:
                known.exited = True
                out.append(self._exit(pid, known, self._exit_code(pid, known, st)))
            return
        full = _read(f"{base}/cmdline", CMDLINE_SIZE + 1).rstrip(b"\0")
        cmdline = fit(full, CMDLINE_SIZE).replace(b"\0", b" ")
        if not cmdline and pid not in self._deferred:
            # Mid-exec the new image's comm and exe are in place before the
            # kernel sets up its argv (cmdline reads empty): look again next
            # scan rather than report a half-done exec. An empty cmdline
            # seen twice in a row is taken as it is.
            self._defer_next.add(pid)
            return
        try:
            exe = os.readlink(f"{base}/exe").encode(errors="surrogateescape")
        except (FileNotFoundError, ProcessLookupError):
            raise
        except OSError:
            exe = b""  # not permitted: another user's process
        if known is None or (known.comm, known.exe, known.cmdline) != (st.comm, exe, cmdline):
            cut = len(full) > CMDLINE_SIZE or len(exe) > FILENAME_SIZE
            p = Proc(st.start, st.ppid, self._uid(base), st.comm, exe, cmdline, cut)
            self.procs[pid] = p
            if emit:
                out.append(self._exec(pid, p))
        else:
            known.ppid = st.ppid  # reparented: report the parent it had last

    @staticmethod
    def _uid(base: str) -> int:
        for line in _read(f"{base}/status", 4096).splitlines():
            if line.startswith(b"Uid:"):
                return int(line.split()[1])  # the real uid
        return -1

    def _exit_code(self, pid: int, p: Proc, st: Stat) -> int:
        if p.ppid == self._self:
            try:
                # WNOWAIT: read the status and leave the child to its waiter
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is not None:
                if info.si_code == os.CLD_EXITED:
                    return info.si_status
                return 128 + info.si_status
        # stat shows a zombie's exit status only to whom may ptrace it, 0 to
        # others; the exe link tells which: ENOENT (no mm) if permitted, EACCES if not
        try:
            os.readlink(f"{self.proc}/{pid}/exe")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return wait_status_code(st.exit_status)
        return -1

    def _exec(self, pid: int, p: Proc) -> bytes:
        return EXEC.pack(
            MAGIC,
            EXEC_TYPE,
            0,
            time.time_ns(),
            pid,
            p.ppid,
            _u32(p.uid),
            fit(p.comm, COMM_SIZE),
            fit(p.exe, FILENAME_SIZE),
            p.cmdline,
            exec_id(pid, p.start),
            1 if p.truncated else 0,
        )

    def _exit(self, pid: int, p: Proc, code: int) -> bytes:
        lifetime = 0
        if p.start:
            started = p.start * 1_000_000_000 // CLK_TCK
            lifetime = max(0, time.clock_gettime_ns(time.CLOCK_BOOTTIME) - started)
        return EXIT.pack(
            MAGIC,
            EXIT_TYPE,
            0,
            time.time_ns(),
            pid,
            p.ppid,
            _u32(p.uid),
            code,
            fit(p.comm, COMM_SIZE),
            lifetime,
            exec_id(pid, p.start),
        )


def _u32(uid: int) -> int:
    return uid & 0xFFFF_FFFF  # an unknown uid (-1) as the kernel writes it: 4294967295


def run_proc(ring: ringcore.Ring, options: Mapping[str, Any], *, stop: StopFlag) -> None:
    interval = float(options["interval"])
    scanner = Scanner(existing=bool(options.get("existing", False)))
    next_scan = time.monotonic()
    while not stop.is_set():
        deliver(ring, scanner.scan(), stop)
        # keep to the schedule, but after a slow scan start over rather than
        # scan back to back to catch up
        next_scan = max(next_scan + interval, time.monotonic())
        stop.wait(next_scan - time.monotonic())
