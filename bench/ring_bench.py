"""ringcore throughput against other ways of moving records between processes.

One command, one run, every figure measured here and now:

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/ring_bench.py

For 1 and 2 producer processes -> 1 consumer process and 64 B / 512 B
records it measures records/s delivered to the consumer by:
  ringcore   output() per record, reserve()+submit() per record, output_many()
             batches; consumer sleeping on the eventfd (default wakeups) or
             busy-polling
  peers      multiprocessing.Queue, faster-fifo, pyzmq PUSH/PULL over ipc://,
             each per record and in its best batched form (pickled lists of
             records), plus a socketpair with pickled lists
and prints ratios against the peers measured in the same run. Then it builds
and runs the C-level benchmark (bench/c_bench.c) of the core without Python.

Each figure is the median of --repeat runs (default 5). Producers are forked;
the consumer is the process that created the ring, as ringcore requires.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe as describe_machine  # noqa: E402

import ringcore  # noqa: E402

BATCH = 64  # records per batch for the batched forms


def pool(size: int) -> list[bytes]:
    """BATCH distinct records: a list of one repeated object would pickle as a
    single copy (pickle memoizes), flattering the pickling peers."""
    return [bytes([i]) * size for i in range(BATCH)]


def stream(size: int, n: int) -> Iterator[bytes]:
    """n records from the pool, for per-record loops: iterating this costs
    ~6 ns a record against ~45 for counting and indexing in Python, so the
    per-record figures measure each API's call rather than the loop."""
    return islice(cycle(pool(size)), n)


RING_SIZE = 1 << 22


@dataclass
class Method:
    name: str
    family: str  # "ringcore" or "peer"
    batched: bool
    # make(producers) -> channel; produce(channel, n, size, go); consume(channel, total) -> None
    make: Callable[[int], object]
    produce: Callable[[object, int, int], None]
    consume: Callable[[object, int], None]
    scale: float = 1.0  # relative record count (slow peers get fewer)


# --- ringcore -----------------------------------------------------------------


def rc_make(_producers: int) -> ringcore.Ring:
    return ringcore.Ring(RING_SIZE)


def rc_produce_output(ring: ringcore.Ring, n: int, size: int) -> None:
    out = ring.output
    for rec in stream(size, n):
        while not out(rec):
            pass


def rc_produce_reserve(ring: ringcore.Ring, n: int, size: int) -> None:
    reserve = ring.reserve
    for rec in stream(size, n):
        while (res := reserve(size)) is None:
            pass
        with memoryview(res) as mv:
            mv[:] = rec
        res.submit()


def rc_produce_batched(ring: ringcore.Ring, n: int, size: int) -> None:
    batch = pool(size)
    out_many = ring.output_many
    i = 0
    while i < n:
        k = min(BATCH, n - i)
        i += out_many(batch if k == BATCH else batch[:k])


def rc_consume_sleep(ring: ringcore.Ring, total: int) -> None:
    got = 0
    poll = ring.poll
    while got < total:
        got += len(poll(timeout=5.0))


def rc_consume_busy(ring: ringcore.Ring, total: int) -> None:
    got = 0
    poll = ring.poll
    while got < total:
        got += len(poll(timeout=5.0, busy_poll=True))


# --- peers --------------------------------------------------------------------


def mpq_make(_p: int) -> object:
    return mp.get_context("fork").Queue()


def q_produce(q, n: int, size: int) -> None:
    put = q.put
    for rec in stream(size, n):
        put(rec)


def q_produce_batched(q, n: int, size: int) -> None:
    batch = pool(size)
    put = q.put
    for i in range(0, n, BATCH):
        put(batch[: min(BATCH, n - i)])


def q_consume(q, total: int) -> None:
    get = q.get
    for _ in range(total):
        get()


def q_consume_batched(q, total: int) -> None:
    got = 0
    get = q.get
    while got < total:
        got += len(get())


def ff_make(_p: int) -> object:
    import faster_fifo

    return faster_fifo.Queue(max_size_bytes=64 * 1024 * 1024)


def ff_consume(q, total: int) -> None:
    got = 0
    get_many = q.get_many
    while got < total:
        got += len(get_many(max_messages_to_get=10_000, timeout=5))


def ff_consume_batched(q, total: int) -> None:
    got = 0
    get_many = q.get_many
    while got < total:
        for batch in get_many(max_messages_to_get=1000, timeout=5):
            got += len(batch)


class Zmq:
    def __init__(self) -> None:
        self.addr = f"ipc://{tempfile.mkdtemp()}/bench.sock"
        self.pull = None

    def bind(self):
        import zmq

        self.pull = zmq.Context.instance().socket(zmq.PULL)
        self.pull.bind(self.addr)


def zmq_make(_p: int) -> Zmq:
    z = Zmq()
    z.bind()
    return z


def zmq_push(z: Zmq):
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.connect(z.addr)
    return ctx, s


def zmq_produce(z: Zmq, n: int, size: int) -> None:
    ctx, s = zmq_push(z)
    send = s.send
    for rec in stream(size, n):
        send(rec)
    s.close(linger=-1)
    ctx.term()


def zmq_produce_batched(z: Zmq, n: int, size: int) -> None:
    ctx, s = zmq_push(z)
    batch = pool(size)
    for i in range(0, n, BATCH):
        s.send(pickle.dumps(batch[: min(BATCH, n - i)], protocol=5))
    s.close(linger=-1)
    ctx.term()


# pyzmq was seen to lose a few hundred of 400,000 messages with 2 forked
# producers: its consumers stop after 5 s of silence and report what arrived,
# timed to the last message, rather than hang the benchmark.
ZMQ_SILENCE_MS = 5000


def zmq_consume(z: Zmq, total: int) -> tuple[int, float]:
    import zmq

    z.pull.setsockopt(zmq.RCVTIMEO, ZMQ_SILENCE_MS)
    recv = z.pull.recv
    got = 0
    last = time.perf_counter()
    try:
        while got < total:
            recv()
            got += 1
            if got & 1023 == 0:
                last = time.perf_counter()
    except zmq.Again:
        return got, last
    return got, time.perf_counter()


def zmq_consume_batched(z: Zmq, total: int) -> tuple[int, float]:
    import zmq

    z.pull.setsockopt(zmq.RCVTIMEO, ZMQ_SILENCE_MS)
    got = 0
    recv = z.pull.recv
    last = time.perf_counter()
    try:
        while got < total:
            got += len(pickle.loads(recv()))
            last = time.perf_counter()
    except zmq.Again:
        return got, last
    return got, time.perf_counter()


def sp_make(producers: int) -> list:
    return [socket.socketpair() for _ in range(producers)]


def sp_produce_batched(pairs_and_idx, n: int, size: int) -> None:
    pairs, idx = pairs_and_idx
    sock = pairs[idx][0]
    batch = pool(size)
    for i in range(0, n, BATCH):
        blob = pickle.dumps(batch[: min(BATCH, n - i)], protocol=5)
        sock.sendall(len(blob).to_bytes(4, "little") + blob)


def sp_consume_batched(pairs, total: int) -> None:
    import selectors

    sel = selectors.DefaultSelector()
    bufs = {}
    for _, b in pairs:
        sel.register(b, selectors.EVENT_READ)
        bufs[b] = bytearray()
    got = 0
    while got < total:
        for key, _ in sel.select(5):
            sock = key.fileobj
            buf = bufs[sock]
            buf += sock.recv(1 << 20)
            while len(buf) >= 4:
                ln = int.from_bytes(buf[:4], "little")
                if len(buf) < 4 + ln:
                    break
                got += len(pickle.loads(buf[4 : 4 + ln]))
                del buf[: 4 + ln]


METHODS = [
    Method("ringcore output()", "ringcore", False, rc_make, rc_produce_output, rc_consume_sleep),
    Method(
        "ringcore reserve+submit", "ringcore", False, rc_make, rc_produce_reserve, rc_consume_sleep
    ),
    Method(
        "ringcore output_many()", "ringcore", True, rc_make, rc_produce_batched, rc_consume_sleep
    ),
    Method(
        "ringcore output() busy-poll",
        "ringcore",
        False,
        rc_make,
        rc_produce_output,
        rc_consume_busy,
    ),
    Method(
        "ringcore output_many() busy-poll",
        "ringcore",
        True,
        rc_make,
        rc_produce_batched,
        rc_consume_busy,
    ),
    Method("multiprocessing.Queue", "peer", False, mpq_make, q_produce, q_consume, 0.05),
    Method(
        "multiprocessing.Queue lists",
        "peer",
        True,
        mpq_make,
        q_produce_batched,
        q_consume_batched,
        0.5,
    ),
    Method("faster-fifo", "peer", False, ff_make, q_produce, ff_consume, 0.1),
    Method("faster-fifo lists", "peer", True, ff_make, q_produce_batched, ff_consume_batched, 0.5),
    Method("pyzmq PUSH/PULL ipc", "peer", False, zmq_make, zmq_produce, zmq_consume, 0.2),
    Method(
        "pyzmq PUSH/PULL ipc lists",
        "peer",
        True,
        zmq_make,
        zmq_produce_batched,
        zmq_consume_batched,
        0.5,
    ),
    Method("socketpair lists", "peer", True, sp_make, sp_produce_batched, sp_consume_batched, 0.5),
]


def _producer(method: Method, chan, idx: int, n: int, size: int, go) -> None:
    go.wait()
    if method.produce is sp_produce_batched:
        chan = (chan, idx)
    method.produce(chan, n, size)


LOST: dict[str, int] = {}


def run_once(method: Method, producers: int, size: int, per_producer: int) -> float:
    """Records/s delivered to the consumer (this process) for one run."""
    ctx = mp.get_context("fork")
    chan = method.make(producers)
    go = ctx.Event()
    procs = [
        ctx.Process(target=_producer, args=(method, chan, i, per_producer, size, go))
        for i in range(producers)
    ]
    for p in procs:
        p.start()
    start = time.perf_counter()
    go.set()
    total = per_producer * producers
    got = method.consume(chan, total)
    if got is None:
        got, end = total, time.perf_counter()
    else:
        got, end = got
        if got < total:
            LOST[method.name] = LOST.get(method.name, 0) + total - got
    elapsed = end - start
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{method.name}: producer exited with {p.exitcode}")
    if isinstance(chan, ringcore.Ring):
        chan.close()
    return got / elapsed


def measure(
    method: Method, producers: int, size: int, records: int, repeat: int
) -> tuple[float, int]:
    """Median records/s of repeat runs, and the records the peer lost in them.

    records is per producer for ringcore; slow peers get method.scale of it.
    """
    n = max(1000, int(records * method.scale) // producers)
    rate = statistics.median(run_once(method, producers, size, n) for _ in range(repeat))
    return rate, LOST.pop(method.name, 0)


def run_c_bench(records: int) -> str:
    exe = Path(tempfile.mkdtemp()) / "c_bench"
    src = ROOT / "ringcore" / "src"
    cmd = [
        "gcc",
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-o",
        str(exe),
        str(ROOT / "bench" / "c_bench.c"),
        str(src / "map.c"),
        str(src / "produce.c"),
        str(src / "consume.c"),
        f"-I{src}",
        "-lpthread",
    ]
    subprocess.run(cmd, check=True)
    return subprocess.run(
        [str(exe), str(records)], check=True, capture_output=True, text=True
    ).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2_000_000, help="per producer, for ringcore")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="", help="substring filter on method names")
    ap.add_argument("--no-c", action="store_true", help="skip the C-level benchmark")
    args = ap.parse_args()

    print(f"machine: {describe_machine()}")
    print(f"records per producer: {args.records} for ringcore (peers scaled down), batch {BATCH}")
    results: dict[tuple[str, int, int], float] = {}
    for producers in (1, 2):
        for size in (64, 512):
            print(f"\n== {producers} producer(s) -> 1 consumer, {size} B records ==")
            for m in METHODS:
                if args.only and args.only not in m.name:
                    continue
                rate, lost = measure(m, producers, size, args.records, args.repeat)
                results[(m.name, producers, size)] = rate
                note = f"  ({lost} records lost by the peer)" if lost else ""
                print(f"  {m.name:36s} {rate / 1e6:7.2f} M records/s{note}")
            peers = {
                k[0]: v
                for k, v in results.items()
                if k[1:] == (producers, size) and not k[0].startswith("ringcore")
            }
            ours = {
                k[0]: v
                for k, v in results.items()
                if k[1:] == (producers, size) and k[0].startswith("ringcore")
            }
            if peers and ours:
                best_peer_name = max(peers, key=peers.get)
                zmq_rate = peers.get("pyzmq PUSH/PULL ipc")
                for name, rate in ours.items():
                    line = (
                        f"  {name:36s} x{rate / peers[best_peer_name]:5.2f} best peer "
                        f"({best_peer_name})"
                    )
                    if zmq_rate:
                        line += f", x{rate / zmq_rate:5.1f} pyzmq per record"
                    print(line)
    if not args.no_c:
        print("\n== C core, no Python (bench/c_bench.c) ==")
        print(run_c_bench(10_000_000), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
