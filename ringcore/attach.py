"""Attach to a ring by name, from unrelated processes.

A ring exists only as two descriptors (an anonymous memfd and an eventfd):
nothing in any file system names it. :func:`serve` gives it a name: a Unix
stream socket that hands both descriptors (SCM_RIGHTS) to clients whose user
id is allowed. :func:`attach` is the client::

    keeper = ringcore.Ring(1 << 20, consumer=False)   # holds the ring
    server = ringcore.serve(keeper, "/run/myapp/events.sock")

    # any process of an allowed user, started any way
    ring = ringcore.attach("/run/myapp/events.sock")                 # producer
    ring = ringcore.attach("/run/myapp/events.sock", consumer=True)  # consumer

Who may attach, two gates:

* the socket file is created with mode 0600, so for a non-root client the
  file permissions already stop any user but the server's owner at
  ``connect()`` (root bypasses file permissions);
* the server then reads the peer's credentials with ``SO_PEERCRED`` (set by
  the kernel, not forgeable by the client) and serves only the uids in
  ``allowed_uids`` (default: the server's own uid). The set is exact: root is
  *not* implicitly allowed, list 0 to allow it. To let another user in, list
  its uid *and* open the file to it (``os.chmod(server.path, 0o660)`` with a
  shared group, for instance): the credential check stays the gate.

Protocol (version 2): the client sends one JSON line
``{"role": "producer"|"consumer", "version": 2, "pid": N}``; the server replies one
JSON line, ``{"ok": true, "ring_size": N}`` sent together with the memfd and
the eventfd, or ``{"ok": false, "error": "...", "code": "..."}``. The consumer
role is claimed by the client itself (``Ring._attach_fds``), in shared memory:
a second live consumer gets :class:`ringcore.ConsumerBusyError` naming the
holder's pid, and a consumer that attaches after the previous one died
resumes at the stored consumer position.

A ring names its producers (the owners of busy records) and its consumer by
pid, so every process of a ring must see the same pids: the server checks the
pid the client states against the one ``SO_PEERCRED`` reports and refuses a
client from another pid namespace (a container started without
``--pid=container:...`` or ``--pid=host``, a Kubernetes sidecar without
``shareProcessNamespace: true``), which would otherwise be taken for dead and
have its slot and its busy records given away.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterable
from types import TracebackType

import ringcore
from ringcore._ringcore import RingError

__all__ = [
    "PROTOCOL_VERSION",
    "AttachError",
    "AttachProtocolError",
    "AttachRefusedError",
    "AttachServer",
    "AttachTimeoutError",
    "RingNotFoundError",
    "attach",
    "serve",
]

PROTOCOL_VERSION = 2  # 2: the request states the client's pid
# a request or a reply is one short JSON line; anything longer is not ours
_MAX_LINE = 4096
# how long the server waits for an accepted client's request line
_REQUEST_TIMEOUT = 5.0
_ROLES = ("producer", "consumer")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AttachError(RingError):
    """Attaching to a ring by name failed (the message names the path)."""


class RingNotFoundError(AttachError, FileNotFoundError):
    """No socket exists at the path given to :func:`attach`."""


class AttachRefusedError(AttachError, PermissionError):
    """The server (or the socket's file permissions) refused this user."""


class AttachProtocolError(AttachError):
    """The peer at the path is not a ringcore attach server of this version."""


class AttachTimeoutError(AttachError, TimeoutError):
    """The server did not answer within the timeout."""


# --- server ------------------------------------------------------------------


class AttachServer:
    """Serves one ring's descriptors at a Unix socket; see :func:`serve`."""

    def __init__(
        self, ring: ringcore.Ring, path: str | os.PathLike[str], allowed_uids: Iterable[int]
    ) -> None:
        self._ring = ring
        self._path = os.fspath(path)
        self._allowed = frozenset(int(u) for u in allowed_uids)
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._attaches = 0
        self._refused = 0
        self._sock = _bind_private(self._path)
        try:
            st = os.stat(self._path)
            self._ident = (st.st_dev, st.st_ino)
            self._sock.listen(64)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except BaseException:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"ringcore-attach:{self._path}", daemon=True
        )
        self._thread.start()

    @property
    def path(self) -> str:
        """The socket's path, as given to :func:`serve`."""
        return self._path

    @property
    def ring(self) -> ringcore.Ring:
        return self._ring

    @property
    def allowed_uids(self) -> frozenset[int]:
        return self._allowed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def attaches(self) -> int:
        """Descriptors handed out so far."""
        return self._attaches

    @property
    def refused(self) -> int:
        """Connections refused so far (credentials or a bad request)."""
        return self._refused

    def close(self) -> None:
        """Stop serving: end the thread, close the socket, unlink its file.

        The file is unlinked only if it is still the one this server bound
        (another server may have replaced a stale one). Rings already
        attached are not affected. In a forked child it only closes the
        inherited descriptors: the parent keeps serving.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:
            # A forked child's copy: the serving thread and the socket file
            # belong to the parent; close the inherited descriptors only.
            self._sock.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            st = os.stat(self._path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._ident:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def __enter__(self) -> AttachServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<AttachServer {self._path!r} {state} uids={sorted(self._allowed)}>"

    # The accept loop: one connection at a time, each bounded by
    # _REQUEST_TIMEOUT. Credentials are checked before anything is read.
    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                if self._wake_r in ready or self._closed:
                    return
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError:
                    if self._closed:
                        return
                    raise
                # OSError: the client went away; nothing was handed out
                with conn, contextlib.suppress(OSError):
                    self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(_REQUEST_TIMEOUT)
        pid, uid, _gid = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid not in self._allowed:
            self._refused += 1
            _reply(
                conn,
                {
                    "ok": False,
                    "code": "uid_not_allowed",
                    "uid": uid,
                    "error": f"uid {uid} (pid {pid}) is not allowed to attach to this ring",
                },
            )
            return
        line = _read_line(conn)
        stated = _parse_request(line)
        if isinstance(stated, str):
            self._refused += 1
            _reply(conn, {"ok": False, "code": "bad_request", "error": stated})
            return
        if stated != pid:
            self._refused += 1
            _reply(
                conn,
                {
                    "ok": False,
                    "code": "pid_namespace",
                    "error": (
                        f"the client is pid {stated} in its own pid namespace but pid {pid} "
                        "in the ring's: a ring's processes must share one pid namespace "
                        "(for a container: --pid=host or --pid=container:NAME; for a "
                        "Kubernetes sidecar: shareProcessNamespace: true)"
                    ),
                },
            )
            return
        try:
            fds = [self._ring._mem_fd, self._ring.fileno()]
            size = self._ring.size
        except RingError as e:
            _reply(conn, {"ok": False, "code": "ring_closed", "error": f"the ring is gone: {e}"})
            return
        data = (json.dumps({"ok": True, "ring_size": size}) + "\n").encode()
        socket.send_fds(conn, [data], fds)
        self._attaches += 1


def _parse_request(line: bytes | None) -> int | str:
    """The pid a valid request states, or what is wrong with the request."""
    if line is None:
        return "no request line (expected one JSON line ending in a newline)"
    try:
        req = json.loads(line)
    except ValueError:
        return f"request is not JSON: {line[:80]!r}"
    if not isinstance(req, dict):
        return "request must be a JSON object"
    if req.get("version") != PROTOCOL_VERSION:
        return (
            f"unsupported protocol version {req.get('version')!r} "
            f"(this server speaks {PROTOCOL_VERSION})"
        )
    if req.get("role") not in _ROLES:
        return f"role must be 'producer' or 'consumer', not {req.get('role')!r}"
    pid = req.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return f"pid must be the client's process id, a positive integer, not {pid!r}"
    return pid


def _read_line(conn: socket.socket) -> bytes | None:
    buf = b""
    while b"\n" not in buf and len(buf) <= _MAX_LINE:
        chunk = conn.recv(_MAX_LINE + 1 - len(buf))
        if not chunk:
            return None
        buf += chunk
    line, nl, _ = buf.partition(b"\n")
    return line if nl else None


def _reply(conn: socket.socket, msg: dict[str, object]) -> None:
    conn.sendall((json.dumps(msg) + "\n").encode())


def _bind_private(path: str) -> socket.socket:
    """A socket bound at path with mode 0600, not yet listening."""
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Linux creates the socket file with the socket inode's mode (masked
        # by the umask): set it first, so the file never exists with a wider
        # mode. The chmod after bind covers systems that ignore it; until
        # listen() nobody can connect anyway.
        with contextlib.suppress(OSError):
            os.fchmod(sock.fileno(), 0o600)
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise FileExistsError(
                    errno.EEXIST, "another server bound this path first", path
                ) from e
            if "too long" in str(e):
                raise ValueError(
                    f"socket path is too long for AF_UNIX ({len(os.fsencode(path))} bytes, "
                    f"at most 107): {path!r}"
                ) from e
            raise
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    return sock


def _clear_stale(path: str) -> None:
    """Unlink a stale socket at path; refuse anything else that exists there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST, "path exists and is not a socket; refusing to replace it", path
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left by a server that died
        return
    except OSError as e:
        raise FileExistsError(
            errno.EEXIST, f"a socket exists at this path and cannot be probed ({e})", path
        ) from e
    finally:
        probe.close()
    raise FileExistsError(errno.EEXIST, "a live server is already listening at this path", path)


def serve(
    ring: ringcore.Ring,
    path: str | os.PathLike[str],
    *,
    allowed_uids: Iterable[int] | None = None,
) -> AttachServer:
    """Serve ``ring`` at the Unix socket ``path`` from a daemon thread.

    ``path`` is created with mode 0600 in a directory the caller chooses. If
    it exists, it must be a stale socket (nobody listening), which is
    replaced; anything else raises :class:`FileExistsError`.
    ``allowed_uids`` (default: this process's uid only) are the user ids
    served; the peer's uid is read with ``SO_PEERCRED``. Root is not
    implicitly allowed. Clients are served one at a time; one that connects
    and sends nothing holds the others (and :meth:`AttachServer.close`) up
    for at most 5 seconds.
    """
    uids = {os.getuid()} if allowed_uids is None else set(allowed_uids)
    return AttachServer(ring, path, uids)


# --- client ------------------------------------------------------------------


def attach(
    path: str | os.PathLike[str],
    *,
    consumer: bool = False,
    timeout: float = 5.0,
    abandon_timeout: float = 1.0,
) -> ringcore.Ring:
    """A handle on the ring served at ``path`` (see :func:`serve`).

    A producer, or with ``consumer=True`` the ring's consumer, resuming at the
    stored consumer position. Raises :class:`RingNotFoundError` (a
    ``FileNotFoundError``) when nothing is at ``path``,
    :class:`AttachRefusedError` (a ``PermissionError``) when this user is
    refused, :class:`AttachTimeoutError` when the server does not answer
    within ``timeout`` seconds, :class:`AttachProtocolError` when the peer is
    not an attach server, :class:`AttachError` for other failures, and
    :class:`ringcore.ConsumerBusyError` when another live process is the
    consumer.
    """
    path = os.fspath(path)
    deadline = time.monotonic() + timeout
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RingNotFoundError(
            errno.ENOENT, "no ring is served here (no such socket)", path
        ) from None
    except PermissionError as e:
        raise AttachRefusedError(
            errno.EACCES, f"uid {os.getuid()} cannot reach the socket ({e.strerror})", path
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise AttachError(f"{path} is not a Unix socket, so no ring is served there")
    request = {
        "role": "consumer" if consumer else "producer",
        "version": PROTOCOL_VERSION,
        "pid": os.getpid(),
    }
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    fds: list[int] = []
    try:
        _connect(sock, path, deadline)
        try:
            sock.settimeout(_left(deadline, path))
            sock.sendall((json.dumps(request) + "\n").encode())
        except BrokenPipeError:
            pass  # the server may have refused us already: read its reply
        reply = _recv_reply(sock, path, deadline, fds)
        return _attach_reply(reply, fds, path, consumer, abandon_timeout)
    except TimeoutError as e:
        if isinstance(e, AttachTimeoutError):
            raise
        raise AttachTimeoutError(
            f"{path}: no answer from the attach server within {timeout} s"
        ) from None
    finally:
        sock.close()
        for fd in fds:
            os.close(fd)


def _left(deadline: float, path: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AttachTimeoutError(f"{path}: no answer from the attach server in time")
    return left


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    sock.settimeout(_left(deadline, path))
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise RingNotFoundError(
            errno.ENOENT, "no ring is served here (no such socket)", path
        ) from None
    except PermissionError as e:
        raise AttachRefusedError(
            e.errno,
            f"uid {os.getuid()} may not connect to the socket ({e.strerror}; {_perms(path)})",
            path,
        ) from None
    except ConnectionRefusedError:
        raise AttachError(
            f"{path}: nobody is listening (a stale socket: its server is gone)"
        ) from None


def _perms(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "its mode is unknown"
    return f"it is mode {stat.S_IMODE(st.st_mode):04o}, owned by uid {st.st_uid}"


def _recv_reply(sock: socket.socket, path: str, deadline: float, fds: list[int]) -> bytes:
    buf = b""
    while b"\n" not in buf:
        if len(buf) > _MAX_LINE:
            raise AttachProtocolError(
                f"{path}: the peer sent {len(buf)} bytes without a newline: not a "
                f"ringcore attach server (starts {buf[:40]!r})"
            )
        sock.settimeout(_left(deadline, path))
        try:
            data, got, flags, _ = socket.recv_fds(sock, _MAX_LINE, 2, socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            data, got, flags = b"", [], 0
        fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise AttachProtocolError(f"{path}: the peer sent more descriptors than expected")
        if not data:
            if not buf:
                raise AttachProtocolError(
                    f"{path}: the server closed the connection without a reply"
                )
            raise AttachProtocolError(
                f"{path}: the peer closed the connection mid-line: not a ringcore "
                f"attach server (got {buf[:40]!r})"
            )
        buf += data
    return buf.partition(b"\n")[0]


def _attach_reply(
    line: bytes, fds: list[int], path: str, consumer: bool, abandon_timeout: float
) -> ringcore.Ring:
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise AttachProtocolError(
            f"{path}: not a ringcore attach server (it answered {line[:60]!r})"
        )
    if not reply["ok"]:
        error = str(reply.get("error", "no reason given"))
        if reply.get("code") == "uid_not_allowed":
            raise AttachRefusedError(errno.EACCES, f"the server refused: {error}", path)
        raise AttachError(f"{path}: the server refused: {error}")
    if len(fds) != 2:
        raise AttachProtocolError(
            f"{path}: the server said ok but sent {len(fds)} descriptors instead of 2"
        )
    ring = ringcore.Ring._attach_fds(
        fds[0], fds[1], consumer=consumer, abandon_timeout=abandon_timeout
    )
    if ring.size != reply.get("ring_size"):
        ring.close()
        raise AttachProtocolError(
            f"{path}: the server announced a ring of {reply.get('ring_size')!r} bytes "
            f"but sent one of {ring.size}"
        )
    return ring
