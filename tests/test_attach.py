"""Attach by name (ringcore.serve / ringcore.attach) and the produce CLI.

Every peer is a real process: subprocesses started with Popen (so they share
nothing with the test process but the socket path), or a forked child that
drops to another user. Nothing is synchronised by sleeping: processes report
progress on pipes, read with select() under a deadline that only guards
against a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ringcore

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
)
HANG = 60.0  # seconds: only ever a guard against a hang, never a measurement
NOBODY = 65534


def py(code: str, *args: object, **kw: object) -> subprocess.Popen[bytes]:
    """An unrelated Python process (fork+exec: it inherits no ring descriptor,
    they are all close-on-exec) running `code` with argv[1:] = args."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=ROOT,
        env=ENV,
        **kw,
    )


def read_line(fd: int, timeout: float = HANG) -> str:
    """One line from a pipe, waiting with select() up to timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"no line within {timeout} s (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"pipe closed before a full line (got {buf!r})")
        buf += chunk
    return buf.decode().rstrip("\n")


def read_all(fd: int, timeout: float = HANG) -> bytes:
    """Everything until EOF from a pipe, waiting with select() up to timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"pipe not closed within {timeout} s (got {buf!r})")
        chunk = os.read(fd, 65536)
        if not chunk:
            return buf
        buf += chunk


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=HANG)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        kill(p)
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                f.close()


# --- restartable consumer -----------------------------------------------------

PRODUCER = """
    import os, sys, time
    import ringcore

    path, m = sys.argv[1], int(sys.argv[2])
    # Unrelated to the keeper: before attaching, no descriptor of this process
    # refers to any ring's memory.
    for fd in os.listdir("/proc/self/fd"):
        try:
            assert not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"), fd
        except FileNotFoundError:
            pass  # the listing's own descriptor
    ring = ringcore.attach(path)
    retries = 0
    for seq in range(m):
        record = b"%08d" % seq + b"." * (seq % 23)  # tagged, of varying sizes
        while not ring.output(record):
            # Full (a consumer is stuck or dead): retry, never drop. The pause
            # is a backoff to spare the CPU, not synchronisation.
            retries += 1
            time.sleep(0.0002)
    ring.close()
    print(retries, flush=True)
"""

# Consumer #1: consume_each, one "position seq" line per record, flushed per
# record. consume_each does not pass positions, so they are computed: a
# record at p takes round_up(header + payload, 8) bytes, and the next one
# starts right after (nothing is discarded here). After each drain the
# computed position is checked against the stored consumer_pos. At the n-th
# record it reports on stdout and blocks *inside the callback*, where the test
# kills it: the drain it was in never published its progress.
CONSUMER_1 = """
    import select, sys
    import ringcore

    path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ring = ringcore.attach(path, consumer=True)
    pos = ring.query().consumer_pos
    f = open(out, "w")
    count = 0

    def on_record(view):
        global pos, count
        f.write(f"{pos} {int(bytes(view[:8]))}\\n")
        f.flush()
        pos += (len(view) + ringcore.HEADER_SIZE + 7) & ~7
        count += 1
        if count == n:
            print("stuck", flush=True)
            sys.stdin.read()  # blocks until SIGKILL

    while True:
        ring.consume_each(on_record)
        stored = ring.query().consumer_pos
        if stored != pos:
            sys.exit(f"computed position {pos} != stored consumer_pos {stored}")
        if ring.prepare_wait():
            select.select([ring.fileno()], [], [], 1.0)
            ring.finish_wait()
"""

# Consumer #2: consume_with_pos (the ring's own positions) until the last seq.
CONSUMER_2 = """
    import json, select, sys, time
    import ringcore

    path, m, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ring = ringcore.attach(path, consumer=True)
    start = ring.query().consumer_pos
    last = -1
    deadline = time.monotonic() + 120  # a guard against a hang only
    with open(out, "w") as f:
        while last != m - 1:
            if time.monotonic() > deadline:
                sys.exit(f"timed out after seq {last}")
            for pos, data in ring.consume_with_pos():
                last = int(data[:8])
                f.write(f"{pos} {last}\\n")
            if ring.prepare_wait():
                select.select([ring.fileno()], [], [], 1.0)
                ring.finish_wait()
    print(json.dumps({"start": start}), flush=True)
"""


def read_records(path: Path) -> list[tuple[int, int]]:
    return [(int(p), int(s)) for p, s in (line.split() for line in path.read_text().splitlines())]


def test_consumer_restarts_where_the_dead_one_stopped(tmp_path, procs):
    size, m, n = 4096, 4000, 600
    sock = tmp_path / "ring.sock"
    out1, out2 = tmp_path / "consumer1.txt", tmp_path / "consumer2.txt"
    keeper = ringcore.Ring(size, consumer=False)  # holds the ring, consumes nothing
    with keeper, ringcore.serve(keeper, sock):
        producer = py(PRODUCER, sock, m, stdout=subprocess.PIPE)
        procs.append(producer)
        c1 = py(CONSUMER_1, sock, n, out1, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(c1)
        assert read_line(c1.stdout.fileno()) == "stuck"
        assert len(read_records(out1)) == n
        os.kill(c1.pid, signal.SIGKILL)
        assert c1.wait(timeout=HANG) == -signal.SIGKILL
        stored = keeper.query().consumer_pos

        # #1 is dead (and reaped): the consumer role is free again
        c2 = py(CONSUMER_2, sock, m, out2, stdout=subprocess.PIPE)
        procs.append(c2)
        result = json.loads(read_line(c2.stdout.fileno(), 120))
        assert c2.wait(timeout=HANG) == 0
        retries = int(read_line(producer.stdout.fileno()))
        assert producer.wait(timeout=HANG) == 0
        q = keeper.query()

    first, second = read_records(out1), read_records(out2)
    assert len(first) == n
    # #2 resumed at the consumer position stored when #1 died
    assert result["start"] == stored
    assert second[0][0] == stored
    # #1 was killed inside the callback of its last record: that drain never
    # published its progress (consumer_pos is stored at the end of a drain,
    # or every quarter ring), so the stored position is at or before that
    # record and everything #1 handled from there on is delivered again to
    # #2 (at least once). Same positions, same records: dedupe by position,
    # keeping #1's records below the stored position and all of #2's.
    assert first[0][0] <= stored <= first[-1][0]
    repeated = [r for r in first if r[0] >= stored]
    assert repeated, "the record being processed at the kill must be delivered again"
    assert second[: len(repeated)] == repeated
    union = [r for r in first if r[0] < stored] + second
    assert [seq for _, seq in union] == list(range(m))  # no gap, no duplicate
    positions = [p for p, _ in union]
    assert positions == sorted(set(positions))
    # Nothing was lost: while #1 was stuck the ring filled up, the producer's
    # failed attempts are exactly the ring's reserve failures, and it retried
    # each one until it went in.
    assert retries > 0
    assert q.reserve_failures == retries
    assert q.submitted == m
    assert q.consumer_pos == q.producer_pos
    print(
        f"#1 handled {n}, {len(repeated)} of them again by #2 from position {stored}; "
        f"producer retried {retries} times"
    )


HOLD_CONSUMER = """
    import os, sys
    import ringcore

    ring = ringcore.attach(sys.argv[1], consumer=True)
    print("ready", os.getpid(), flush=True)
    sys.stdin.readline()  # hold the role until the test closes stdin
    ring.close()
"""

TRY_CONSUMER = """
    import sys
    import ringcore

    try:
        ringcore.attach(sys.argv[1], consumer=True)
    except ringcore.ConsumerBusyError as e:
        print(e, flush=True)
"""


def test_second_live_consumer_is_busy(tmp_path, procs):
    sock = tmp_path / "ring.sock"
    keeper = ringcore.Ring(4096, consumer=False)
    with keeper, ringcore.serve(keeper, sock):
        holder = py(HOLD_CONSUMER, sock, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(holder)
        assert read_line(holder.stdout.fileno()) == f"ready {holder.pid}"

        # from another unrelated process
        other = py(TRY_CONSUMER, sock, stdout=subprocess.PIPE)
        procs.append(other)
        message = read_all(other.stdout.fileno()).decode()
        assert other.wait(timeout=HANG) == 0
        assert re.search(rf"\bpid {holder.pid}\b", message), message

        # and from this one
        with pytest.raises(ringcore.ConsumerBusyError, match=rf"\bpid {holder.pid}\b"):
            ringcore.attach(sock, consumer=True)

        # producers attach all the same
        with ringcore.attach(sock) as producer:
            assert producer.output(b"still a producer")

        # the holder closes its ring and exits: the role is free
        holder.stdin.close()
        assert holder.wait(timeout=HANG) == 0
        with ringcore.attach(sock, consumer=True) as ring:
            assert ring.is_consumer
            assert ring.consume() == [b"still a producer"]


# --- credentials ---------------------------------------------------------------


def run_as(uid: int, fn: Callable[[], str]) -> str:
    """fn() in a forked child that runs as uid (and gid) `uid`: its result, or
    the exception it raised as 'TypeName: message'."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                result = fn()
            except Exception as e:
                result = f"{type(e).__name__}: {e}"
            os.write(w, result.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        return read_all(r).decode()
    finally:
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700), so
    that only the socket's own mode and the credential check stand between
    another user and the ring."""
    d = Path(tempfile.mkdtemp(prefix="ringcore-attach-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def test_root_refused_when_not_listed(tmp_path):
    sock = tmp_path / "ring.sock"
    with (
        ringcore.Ring(4096, consumer=False) as keeper,
        ringcore.serve(keeper, sock, allowed_uids={NOBODY}) as server,
    ):
        assert server.allowed_uids == {NOBODY}
        with pytest.raises(ringcore.AttachRefusedError) as info:
            ringcore.attach(sock)
        assert isinstance(info.value, PermissionError)
        assert f"uid {os.getuid()} " in str(info.value)
        assert str(sock) in str(info.value)
        assert server.refused == 1
        assert server.attaches == 0


def attach_and_output(sock: Path) -> str:
    with ringcore.attach(sock) as ring:
        return "ok" if ring.output(b"from uid %d" % os.getuid()) else "full"


@needs_root
def test_other_user_stopped_by_socket_mode(public_dir):
    sock = public_dir / "ring.sock"
    with ringcore.Ring(4096) as ring, ringcore.serve(ring, sock) as server:
        # the file is 0600, owned by root: nobody cannot even connect
        result = run_as(NOBODY, lambda: attach_and_output(sock))
        assert result.startswith("AttachRefusedError: "), result
        assert f"uid {NOBODY} may not connect" in result
        assert "mode 0600, owned by uid 0" in result
        assert server.refused == 0  # it never got to the server


@needs_root
def test_other_user_stopped_by_peer_credentials(public_dir):
    sock = public_dir / "ring.sock"
    with ringcore.Ring(4096) as ring, ringcore.serve(ring, sock) as server:
        # Open the file to everyone: the SO_PEERCRED check is then the gate
        # (allowed: root only, the default for a server running as root).
        os.chmod(sock, 0o666)
        result = run_as(NOBODY, lambda: attach_and_output(sock))
        assert result.startswith("AttachRefusedError: "), result
        assert f"uid {NOBODY} (pid " in result
        assert server.refused == 1
        assert ring.consume() == []


@needs_root
def test_listed_user_attaches(public_dir):
    sock = public_dir / "ring.sock"
    with (
        ringcore.Ring(4096) as ring,
        ringcore.serve(ring, sock, allowed_uids={0, NOBODY}) as server,
    ):
        os.chmod(sock, 0o666)
        assert run_as(NOBODY, lambda: attach_and_output(sock)) == "ok"
        assert ring.consume() == [b"from uid %d" % NOBODY]
        assert server.attaches == 1


# --- what exists where ---------------------------------------------------------


def shm_entries() -> set[str]:
    # multiprocessing semaphores of unrelated concurrent processes come and go
    # in /dev/shm as sem.*; anything else new would be ours
    with contextlib.suppress(FileNotFoundError):
        return {n for n in os.listdir("/dev/shm") if not n.startswith("sem.")}
    return set()


def fd_target(fd: int, pid: int | str = "self") -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


SHOW_FDS = """
    import os, sys
    import ringcore

    ring = ringcore.attach(sys.argv[1])
    print(os.readlink(f"/proc/self/fd/{ring._mem_fd}"))
    maps = open("/proc/self/maps").read()
    print(sum("memfd:ringcore" in line for line in maps.splitlines()), "/dev/shm" in maps)
"""


def test_socket_is_0600_and_ring_has_no_path(tmp_path, procs):
    sock = tmp_path / "ring.sock"
    before = shm_entries()
    old = os.umask(0)  # the socket's mode must not depend on the umask
    try:
        keeper = ringcore.Ring(4096, consumer=False)
        server = ringcore.serve(keeper, sock)
    finally:
        os.umask(old)
    with keeper, server:
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        assert server.path == str(sock)

        # the ring is an anonymous memfd, linked nowhere ("(deleted)"),
        # reachable only through descriptors
        attached = ringcore.attach(sock)
        for ring in (keeper, attached):
            target = fd_target(ring._mem_fd)
            assert target.startswith("/memfd:ringcore"), target
            assert target.endswith("(deleted)"), target
            assert fd_target(ring.fileno()) == "anon_inode:[eventfd]"
        attached.close()
        child = py(SHOW_FDS, sock, stdout=subprocess.PIPE)
        procs.append(child)
        target, maps = read_all(child.stdout.fileno()).decode().splitlines()
        assert child.wait(timeout=HANG) == 0
        assert target.startswith("/memfd:ringcore") and target.endswith("(deleted)")
        mappings, shm_mapped = maps.split()
        # its mappings of the ring (adjacent regions of equal permissions
        # show as one line) are all of the memfd, none of /dev/shm
        assert int(mappings) >= 1 and shm_mapped == "False"
        assert shm_entries() == before
    assert not sock.exists()  # close() unlinked it


# --- clear errors, no hangs ----------------------------------------------------


def test_missing_path(tmp_path):
    sock = tmp_path / "nothing-here.sock"
    with pytest.raises(ringcore.RingNotFoundError) as info:
        ringcore.attach(sock)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ringcore.RingError)
    assert info.value.filename == str(sock)
    assert str(sock) in str(info.value)


@pytest.mark.parametrize("kind", ["file", "directory", "fifo"])
def test_not_a_socket(tmp_path, kind):
    path = tmp_path / "thing"
    if kind == "file":
        path.write_text("not a ring\n")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(ringcore.AttachError, match="is not a Unix socket") as info:
        ringcore.attach(path, timeout=1.0)
    assert str(path) in str(info.value)
    # and serve() refuses to replace it
    with ringcore.Ring(4096) as ring, pytest.raises(FileExistsError, match="not a socket"):
        ringcore.serve(ring, path)
    assert path.exists() and not stat.S_ISSOCK(os.lstat(path).st_mode)


@contextlib.contextmanager
def fake_server(path: Path, reply: Callable[[socket.socket], None]) -> Iterator[None]:
    """A server at path that answers one client with reply(conn), then holds
    the connection open until the test is done."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    done = threading.Event()

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            reply(conn)
            done.wait()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        # unblock accept() if no client came
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        t.join(HANG)
        listener.close()


def send(data: bytes) -> Callable[[socket.socket], None]:
    return lambda conn: conn.sendall(data)


def send_file_fds(conn: socket.socket) -> None:
    """Says ok and passes two descriptors of a plain file, not a ring."""
    with tempfile.TemporaryFile() as f:
        socket.send_fds(conn, [b'{"ok": true, "ring_size": 4096}\n'], [f.fileno()] * 2)


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (send(b"HTTP/1.0 400 Bad Request\r\n\r\n"), ringcore.AttachProtocolError, "not a ringcore"),
        (send(b'{"hello": "world"}\n'), ringcore.AttachProtocolError, "not a ringcore"),
        (send(b"\x00\xff" * 5000), ringcore.AttachProtocolError, "without a newline"),
        (lambda conn: None, ringcore.AttachTimeoutError, "no answer"),
        (send(b"half a line"), ringcore.AttachTimeoutError, "no answer"),
        (lambda conn: conn.close(), ringcore.AttachProtocolError, "without a reply"),
        (send(b'{"ok": true, "ring_size": 4096}\n'), ringcore.AttachProtocolError, "0 desc"),
        (send(b'{"ok": false, "error": "go away"}\n'), ringcore.AttachError, "go away"),
        (send_file_fds, ringcore.IncompatibleRingError, "cannot attach"),
    ],
    ids=[
        "http",
        "other-json",
        "flood",
        "silent",
        "half-line",
        "hang-up",
        "ok-without-fds",
        "refusal",
        "not-a-ring",
    ],
)
def test_garbage_server(tmp_path, reply, error, match):
    sock = tmp_path / "fake.sock"
    before = set(os.listdir("/proc/self/fd"))
    with fake_server(sock, reply), pytest.raises(error, match=match) as info:
        ringcore.attach(sock, timeout=0.5)
    if not isinstance(info.value, ringcore.IncompatibleRingError):
        assert str(sock) in str(info.value)
    # every descriptor received was closed again
    assert set(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize(
    ("request_line", "match"),
    [
        (b'{"role": "producer", "version": 1, "pid": PID}\n', "unsupported protocol version 1"),
        (b'{"role": "admin", "version": 2, "pid": PID}\n', "role must be"),
        (b'{"role": "producer", "version": 2}\n', "pid must be the client's process id"),
        (b'{"role": "producer", "version": 2, "pid": "PID"}\n', "pid must be"),
        # a pid that is not the one SO_PEERCRED reports: another namespace's
        (b'{"role": "producer", "version": 2, "pid": 1}\n', "share one pid namespace"),
        (b"GET / HTTP/1.0\n", "not JSON"),
    ],
)
def test_server_rejects_bad_requests(tmp_path, request_line, match):
    sock = tmp_path / "ring.sock"
    with ringcore.Ring(4096) as ring, ringcore.serve(ring, sock) as server:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(HANG)
            client.connect(str(sock))
            client.sendall(request_line.replace(b"PID", str(os.getpid()).encode()))
            data, fds, _, _ = socket.recv_fds(client, 4096, 2)
        assert fds == []
        reply = json.loads(data)
        assert reply["ok"] is False and re.search(match, reply["error"]), reply
        assert server.refused == 1 and server.attaches == 0
        # and it goes on serving
        with ringcore.attach(sock) as producer:
            assert producer.output(b"after")
        assert ring.consume() == [b"after"]


def test_stale_socket(tmp_path):
    sock = tmp_path / "ring.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))  # a server that died: its file stays, nobody listens
    dead.close()
    with pytest.raises(ringcore.AttachError, match="nobody is listening") as info:
        ringcore.attach(sock)
    assert str(sock) in str(info.value)
    with ringcore.Ring(4096) as ring:
        with ringcore.serve(ring, sock):  # replaces the stale socket
            with ringcore.attach(sock) as producer:
                assert producer.output(b"x")
            # a live server's path is not taken over
            with pytest.raises(FileExistsError, match="live server"):
                ringcore.serve(ring, sock)
        assert ring.consume() == [b"x"]
    assert not sock.exists()


# --- python -m ringcore.produce --------------------------------------------------


def produce(
    sock: Path, ring: ringcore.Ring, data: bytes, *args: str, consume: bool = True
) -> tuple[int, list[bytes], str]:
    """Run the CLI with `data` on stdin, consuming as it goes (unless
    consume=False: then only after it exited). Returns (exit status, records,
    stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringcore.produce", str(sock), *args],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(data)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    got: list[bytes] = []
    err = b""
    err_fd = proc.stderr.fileno()
    deadline = time.monotonic() + HANG
    try:
        # until stderr reaches EOF, i.e. the CLI exited
        while True:
            if consume:
                got += ring.consume()
            left = deadline - time.monotonic()
            assert left > 0, f"produce did not finish (stderr so far: {err!r})"
            waits = [err_fd]
            if consume:
                if not ring.prepare_wait():
                    continue  # a record is ready: consume it first
                waits.append(ring.fileno())
            ready, _, _ = select.select(waits, [], [], left)
            if consume:
                ring.finish_wait()
            if err_fd in ready:
                chunk = os.read(err_fd, 65536)
                if not chunk:
                    break
                err += chunk
        status = proc.wait(timeout=HANG)
        writer.join(HANG)
    finally:
        kill(proc)
        proc.stderr.close()
    got += ring.consume()  # what it committed before exiting
    return status, got, err.decode()


SUMMARY = re.compile(
    r"(\d+) records, (\d+) bytes delivered; (\d+) writes found the ring full .*?, "
    r"(\d+) retries.*, "
    r"(?:nothing dropped|(\d+) dropped \((\d+) bytes\))"
)


def summary(stderr: str) -> tuple[int, ...]:
    lines = stderr.strip().splitlines()
    assert lines, "no summary"
    m = SUMMARY.search(lines[-1])
    assert m, lines[-1]
    return tuple(int(g) if g else 0 for g in m.groups())


def test_produce_lines(tmp_path):
    sock = tmp_path / "ring.sock"
    lines = [b"event %d %s" % (i, b"x" * (i % 50)) for i in range(5000)]
    lines[10] = b""  # an empty line is an empty record
    data = b"".join(line + b"\n" for line in lines[:-1]) + lines[-1]  # no final newline
    # the input is many times the ring: the CLI waits for room, drops nothing
    with ringcore.Ring(8192) as ring, ringcore.serve(ring, sock):
        status, got, err = produce(sock, ring, data)
        assert status == 0, err
        assert got == lines
        records, nbytes, full, retries, dropped, _ = summary(err)
        assert (records, nbytes, dropped) == (len(lines), sum(map(len, lines)), 0)
        assert retries == full
        assert ring.query().submitted == len(lines)


def test_produce_length_prefixed(tmp_path):
    sock = tmp_path / "ring.sock"
    with ringcore.Ring(8192) as ring, ringcore.serve(ring, sock):
        big = ring.max_record_size  # the largest record the ring holds
        records = [b"", b"a\nb", b"\x00" * 7, bytes(range(256)), b"z" * big]
        records += [b"rec %d\n" % i for i in range(3000)]
        data = b"".join(len(r).to_bytes(4, "little") + r for r in records)
        status, got, err = produce(sock, ring, data, "--format", "length-prefixed")
        assert status == 0, err
        assert got == records
        assert summary(err)[:2] == (len(records), sum(map(len, records)))


@pytest.mark.parametrize("fmt", ["lines", "length-prefixed"])
def test_produce_oversize_record(tmp_path, fmt):
    sock = tmp_path / "ring.sock"
    with ringcore.Ring(4096) as ring, ringcore.serve(ring, sock):
        size = ring.max_record_size + 1
        records = [b"first", b"second", b"third", b"y" * size, b"never"]
        if fmt == "lines":
            data = b"".join(r + b"\n" for r in records)
        else:
            data = b"".join(len(r).to_bytes(4, "little") + r for r in records)
        status, got, err = produce(sock, ring, data, "--format", fmt)
        assert status == 2, err
        assert got == records[:3]  # the records before it stay delivered
        assert re.search(r"\b(line|record) 3 \(0-based", err), err
        assert f"{size} bytes" in err
        assert summary(err)[0] == 3


def test_produce_truncated_input(tmp_path):
    sock = tmp_path / "ring.sock"
    with ringcore.Ring(4096) as ring, ringcore.serve(ring, sock):
        data = (2).to_bytes(4, "little") + b"ok" + (10).to_bytes(4, "little") + b"short"
        status, got, err = produce(sock, ring, data, "--format", "length-prefixed")
        assert status == 2, err
        assert got == [b"ok"]
        assert "inside record 1" in err and "5 of its 10 payload bytes" in err


def test_produce_drop(tmp_path):
    sock = tmp_path / "ring.sock"
    lines = [b"%06d" % i for i in range(2000)]  # 16 bytes a record: 256 fill the ring
    with ringcore.Ring(4096) as ring, ringcore.serve(ring, sock):
        # nobody consumes until the CLI is done: what does not fit is dropped
        status, got, err = produce(sock, ring, b"\n".join(lines), "--drop", consume=False)
        assert status == 0, err
        records, nbytes, full, retries, dropped, dropped_bytes = summary(err)
        assert retries == 0 and dropped == full > 0
        assert records == len(got) and records + dropped == len(lines)
        assert nbytes + dropped_bytes == sum(map(len, lines))
        # what went in is in order: the input with holes, never reordered
        assert got == [line for line in lines if line in set(got)]
        assert ring.query().reserve_failures >= dropped


def test_produce_attach_failure(tmp_path):
    sock = tmp_path / "missing.sock"
    out = subprocess.run(
        [sys.executable, "-m", "ringcore.produce", str(sock)],
        cwd=ROOT,
        env=ENV,
        input=b"x\n",
        capture_output=True,
        timeout=HANG,
    )
    assert out.returncode == 1
    assert str(sock) in out.stderr.decode()


def test_client_in_another_pid_namespace_is_refused(tmp_path):
    """Producers and the lock holder are named by pid: a client whose pids
    mean something else (another pid namespace) is refused, by name."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.strip()}")
    sock = tmp_path / "ring.sock"
    attach = "import sys, ringcore; ringcore.attach(sys.argv[1])"
    with ringcore.Ring(4096) as ring, ringcore.serve(ring, sock) as server:
        other = subprocess.run(
            ["unshare", "--pid", "--fork", sys.executable, "-c", attach, str(sock)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode != 0
        assert "AttachError" in other.stderr, other.stderr
        assert "share one pid namespace" in other.stderr and "--pid=" in other.stderr
        assert server.refused == 1 and server.attaches == 0
        # the same command in our namespace attaches
        same = subprocess.run(
            [sys.executable, "-c", attach, str(sock)], capture_output=True, text=True, timeout=60
        )
        assert same.returncode == 0, same.stderr
        assert server.attaches == 1
