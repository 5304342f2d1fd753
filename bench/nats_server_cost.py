"""What nats-server spends per stored JetStream message (issue 13): its
CPU (utime+stime from /proc) over N core-published records, by storage,
Nats-Msg-Id on or off, and duplicate_window. Shows that the Msg-Id
de-duplication the edge needs about doubles the server's cost.

    .venv/bin/python bench/nats_server_cost.py          # N=300000 per case

Nothing here is a threshold.
"""

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import nats
from nats.js.api import StorageType, StreamConfig
from natsctl import NatsServer

PAYLOAD = (
    b'{"id":123456,"ts_ns":1796644614432187239,"type":"synthetic","seq":3417,"worker":0,'
    b'"level":"info","value":3.417,"label":"synthetic-0","token":"4d343209f4bc77d2"}'
)
N = int(os.environ.get("N", "300000"))


def cpu(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def run(url, pid, name, storage, msgid, dw):
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=name, subjects=[f"{name}.>"], storage=storage, duplicate_window=dw)
    )
    c0 = cpu(pid)
    t0 = time.perf_counter()
    subj = f"{name}.h.synthetic"
    for i in range(N):
        h = {"Nats-Msg-Id": f"bench-1796644614-{i}"} if msgid else None
        await nc.publish(subj, PAYLOAD, headers=h)
        if i % 5000 == 0:
            await nc.flush()
    await nc.flush()
    while True:
        si = await js.stream_info(name)
        if si.state.messages >= N:
            break
        await asyncio.sleep(0.05)
    dt = time.perf_counter() - t0
    dc = cpu(pid) - c0
    print(
        f"{name:12s} {storage.value:6s} msgid={msgid} dw={dw:5.0f}: "
        f"{N / dt:9.0f}/s wall, server {dc / N * 1e6:5.2f} us/msg",
        flush=True,
    )
    await js.delete_stream(name)
    await nc.close()


async def main():
    tmp = Path(tempfile.mkdtemp())
    s = NatsServer(tmp)
    s.wait_healthy()
    pid = s.proc.pid
    for i, (st, mid, dw) in enumerate(
        [
            (StorageType.FILE, True, 600),
            (StorageType.FILE, True, 120),
            (StorageType.FILE, True, 10),
            (StorageType.FILE, False, 600),
            (StorageType.MEMORY, True, 600),
            (StorageType.MEMORY, False, 120),
            (StorageType.FILE, True, 600),
        ]
    ):
        await run(s.url, pid, f"S{i}", st, mid, dw)
    s.close()


asyncio.run(main())
