"""What nats-server spends per stored JetStream message (issue 13): its CPU
(utime + stime) over N core-published records, by storage, Nats-Msg-Id on or
off, and duplicate_window. It shows that the Msg-Id de-duplication the edge
needs about doubles the server's cost, which no window or storage choice
takes back. The first case is run again last, to show the drift of the run.

    .venv/bin/python bench/nats_server_cost.py          # N=300000 per case

Nothing here is a threshold.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import nats  # noqa: E402
from forward_bench import PAYLOAD  # noqa: E402
from machine import describe, proc_cpu  # noqa: E402
from nats.js.api import StorageType, StreamConfig  # noqa: E402
from natsctl import NatsServer, server_binary  # noqa: E402

N = int(os.environ.get("N", "300000"))

# (storage, Msg-Id, duplicate_window s); the edge's own stream is the first
CASES = [
    (StorageType.FILE, True, 600.0),
    (StorageType.FILE, True, 120.0),
    (StorageType.FILE, True, 10.0),
    (StorageType.FILE, False, 120.0),
    (StorageType.MEMORY, True, 600.0),
    (StorageType.MEMORY, False, 120.0),
    (StorageType.FILE, True, 600.0),
]


async def case(url: str, pid: int, name: str, storage: StorageType, msgid: bool, dw: float) -> None:
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=name, subjects=[f"{name}.>"], storage=storage, duplicate_window=dw)
    )
    subject = f"{name}.h.synthetic"
    c0, t0 = proc_cpu(pid) or 0.0, time.perf_counter()
    for i in range(N):
        headers = {"Nats-Msg-Id": f"bench-1796644614-{i}"} if msgid else None
        await nc.publish(subject, PAYLOAD, headers=headers)
        if i % 5000 == 0:
            await nc.flush()  # bounds what waits in the client's buffer
    await nc.flush()
    while (await js.stream_info(name)).state.messages < N:
        await asyncio.sleep(0.05)  # the server stores asynchronously; no event says "all in"
    dt, dc = time.perf_counter() - t0, (proc_cpu(pid) or 0.0) - c0
    window = f"duplicate_window {dw:3.0f} s" if msgid else "no Msg-Id          "
    print(
        f"{storage.value:6s} {window}: {N / dt:9.0f} msgs/s from one process, "
        f"server {dc / N * 1e6:5.2f} us CPU a message",
        flush=True,
    )
    await js.delete_stream(name)
    await nc.close()


async def main() -> None:
    version = subprocess.run([server_binary(), "--version"], capture_output=True, text=True)
    print(f"# {describe()}; {version.stdout.strip()}; N={N} per case")
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp))
        try:
            server.wait_healthy()
            assert server.proc is not None
            for i, (storage, msgid, dw) in enumerate(CASES):
                await case(server.url, server.proc.pid, f"S{i}", storage, msgid, dw)
        finally:
            server.close()


if __name__ == "__main__":
    asyncio.run(main())
