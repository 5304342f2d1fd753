"""Load killsnoop.bpf.o, attach it, and pin its ring buffer for ringstream.

    python examples/bpf-ringbuf/load.py /sys/fs/bpf/killsnoop

Loads and attaches the program with libbpf (ringstream's ctypes binding,
service.bpf.libbpf), pins the `events` ring buffer at the path given, prints
"pinned PATH" and stays until SIGINT or SIGTERM: the program is attached as
long as this process holds it. Then it unpins and says how many records the
program could not write because the ring was full.

ringstream's bpf-ringbuf source reads the pinned ring; a reader that stops
for a while (ringstream restarting) loses nothing as long as the ring has
room, since the ring lives on with the pin.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import struct
import sys
from pathlib import Path

from service.bpf.libbpf import BpfObject, LibbpfError, lib

HERE = Path(__file__).resolve().parent


def _bind() -> ctypes.CDLL:
    """The libbpf calls this loader needs beyond BpfObject's."""
    libbpf = lib().lib
    libbpf.bpf_obj_pin.restype = ctypes.c_int
    libbpf.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    return libbpf


def pin(fd: int, path: str) -> None:
    err = _bind().bpf_obj_pin(fd, os.fsencode(path))
    if err:
        raise OSError(-err, f"cannot pin at {path}: {os.strerror(-err)}")


def read_lost(obj: BpfObject) -> int:
    """The program's global `lost` (its .bss map, a single 8-byte value)."""
    buf = ctypes.create_string_buffer(8)
    key = ctypes.c_uint32(0)
    if lib().lib.bpf_map_lookup_elem(obj.map_fd(".bss"), ctypes.byref(key), buf):
        return -1
    return struct.unpack("<Q", buf.raw)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", nargs="?", default="/sys/fs/bpf/killsnoop", help="where to pin")
    p.add_argument("--object", default=str(HERE / "killsnoop.bpf.o"), help="the compiled program")
    args = p.parse_args(argv)

    if os.path.lexists(args.path):
        print(
            f"load.py: {args.path} exists (another loader, or a stale pin: rm {args.path})",
            file=sys.stderr,
        )
        return 1
    # blocked before anything is pinned, taken by sigwait() below (and not
    # ignored, as a shell ignores SIGINT for a job started with &: an ignored
    # signal is discarded, a blocked one waits)
    stop = {signal.SIGINT, signal.SIGTERM}
    for s in stop:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        obj = BpfObject(args.object)
    except LibbpfError as e:
        print(f"load.py: {e}", *e.libbpf_says, sep="\n", file=sys.stderr)
        return 1
    with obj:
        try:
            obj.load()
            obj.attach()
            pin(obj.map_fd("events"), args.path)
        except (LibbpfError, OSError) as e:
            says = getattr(e, "libbpf_says", [])
            print(f"load.py: {e}", *says, sep="\n", file=sys.stderr)
            return 1
        try:
            print(f"pinned {args.path}", flush=True)
            sig = signal.sigwait(stop)
        finally:
            os.unlink(args.path)
        lost = read_lost(obj)
    print(f"{signal.Signals(sig).name}: unpinned {args.path}; {lost} records lost", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
