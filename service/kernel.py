"""The kernel side of the sources that read BPF ring buffers, in the service process.

Before the workers start, `KernelSources.open()` settles each such source:

* exec with method "bpf" or "auto": load and attach exec.bpf.o. "bpf" that
  cannot load stops the start (exit status 2, the reason); "auto" falls back
  to /proc with one warning naming what was missing.
* bpf-ringbuf: open the pinned ring buffer at `path` and find `schema`.

Workers get the maps' descriptors in their options; the programs and maps
stay with this process until close(), after the workers stopped, so a
restarted worker finds the same ring. As a Prometheus collector it exports
each kernel ring's query values and the exec program's per-CPU counts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

import ringcore
from service.bpf.diagnose import BpfUnavailable
from service.bpf.fds import MapFd
from service.schema import Schema
from service.settings import ConfigError
from service.workers import WorkerSpec

log = logging.getLogger("ringstream.sources")


def _map_id(fd: int) -> int | None:
    """The kernel's id of the map behind `fd` (two pins of one map share it)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("map_id:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class KernelSourceError(Exception):
    """A kernel source cannot start; the message names the key and the reason."""


@dataclasses.dataclass
class _Ring:
    source: str  # the metrics label: "exec", or the pinned path
    ring: ringcore.KernelRing


class KernelSources:
    def __init__(self) -> None:
        self.exec_program: Any = None  # service.sources.exec.bpf.ExecProgram
        self.exec_method: str | None = None
        self._rings: list[_Ring] = []
        self._fds: list[MapFd] = []
        self._ring_ids: dict[int, str] = {}  # kernel map id -> the source key reading it

    def open(self, specs: Sequence[WorkerSpec], schemas: Sequence[Schema]) -> list[WorkerSpec]:
        """The specs with their kernel descriptors; raises KernelSourceError or ConfigError."""
        out = []
        try:
            for spec in specs:
                if spec.kind == "exec":
                    spec = self._open_exec(spec)
                elif spec.kind == "bpf-ringbuf":
                    spec = self._open_ringbuf(spec, schemas)
                out.append(spec)
        except BaseException:
            self.close()
            raise
        return out

    def _open_exec(self, spec: WorkerSpec) -> WorkerSpec:
        method = spec.options["method"]
        if method in ("bpf", "auto"):
            from service.sources.exec.bpf import ExecProgram

            try:
                self.exec_program = ExecProgram.load(spec.options["bpf_ring_size"])
            except BpfUnavailable as e:
                if method == "bpf":
                    raise KernelSourceError(f'sources[{spec.index}].method = "bpf": {e}') from None
                log.warning(
                    "exec source falls back to /proc: %s",
                    e,
                    extra={"event": "exec_method_fallback", "method": "proc", "reason": str(e)},
                )
                method = "proc"
            else:
                method = "bpf"
                self._rings.append(_Ring("exec", self.exec_program.kernel_ring))
        self.exec_method = method
        options = {**spec.options, "method": method}
        if method == "bpf":
            options.update(self.exec_program.worker_options())
        return dataclasses.replace(spec, options=options)

    def _open_ringbuf(self, spec: WorkerSpec, schemas: Sequence[Schema]) -> WorkerSpec:
        key = f"sources[{spec.index}]"
        name, path = spec.options["schema"], spec.options["path"]
        by_name = {s.name: s for s in schemas}
        if name not in by_name:
            raise ConfigError(
                f"{key}.schema: no schema named {name!r} (known: {', '.join(sorted(by_name))}; "
                "add yours with schemas.files)"
            )
        try:
            kring = ringcore.KernelRing(path=path)
        except (OSError, ValueError, ringcore.RingError) as e:
            raise KernelSourceError(f"{key}.path: cannot open {path}: {e}") from None
        map_id = _map_id(kring.map_fd)
        if map_id is not None and map_id in self._ring_ids:
            kring.close()
            raise ConfigError(
                f"{key}.path: {path} is the ring buffer {self._ring_ids[map_id]} reads "
                "already (a ring buffer has one consumer)"
            )
        if map_id is not None:
            self._ring_ids[map_id] = key
        self._rings.append(_Ring(path, kring))
        fd = MapFd(os.dup(kring.map_fd), path)
        self._fds.append(fd)
        options = {**spec.options, "map": fd, "type_id": by_name[name].type_id}
        return dataclasses.replace(spec, options=options)

    def summary(self) -> dict[str, object]:
        """For the "started" log line."""
        return {"exec_method": self.exec_method, "kernel_rings": [r.source for r in self._rings]}

    def close(self) -> None:
        """After the workers stopped: detach the programs, close the maps."""
        for r in self._rings:
            if r.source != "exec":
                r.ring.close()
        self._rings.clear()
        for fd in self._fds:
            fd.close()
        self._fds.clear()
        if self.exec_program is not None:
            self.exec_program.close()
            self.exec_program = None

    # --- prometheus_client Collector ---------------------------------------

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily(
            "ringstream_kernel_ring_size_bytes",
            "Kernel BPF ring buffer data size",
            labels=["source"],
        )
        avail = GaugeMetricFamily(
            "ringstream_kernel_ring_available_bytes",
            "Kernel ring BPF_RB_AVAIL_DATA: written by the BPF program, not yet consumed",
            labels=["source"],
        )
        cons = CounterMetricFamily(
            "ringstream_kernel_ring_consumer_position_bytes",
            "Kernel ring BPF_RB_CONS_POS",
            labels=["source"],
        )
        prod = CounterMetricFamily(
            "ringstream_kernel_ring_producer_position_bytes",
            "Kernel ring BPF_RB_PROD_POS",
            labels=["source"],
        )
        for r in self._rings:
            if r.ring.closed:
                continue
            q = r.ring.query()
            size.add_metric([r.source], q.ring_size)
            avail.add_metric([r.source], q.avail_data)
            cons.add_metric([r.source], q.consumer_pos)
            prod.add_metric([r.source], q.producer_pos)
        yield from (size, avail, cons, prod)
        events = CounterMetricFamily(
            "ringstream_bpf_events",
            "Events the exec BPF program wrote to its ring (sent) or could not reserve room for "
            "(lost; each loss is also a gap record in the stream)",
            labels=["source", "type", "outcome"],
        )
        if self.exec_program is not None:
            t = self.exec_program.totals()
            for typ in ("exec", "exit"):
                events.add_metric(["exec", typ, "sent"], t[f"sent_{typ}"])
                events.add_metric(["exec", typ, "lost"], t[f"lost_{typ}"])
        yield events
        method = GaugeMetricFamily(
            "ringstream_exec_method", "1 for the method the exec source runs", labels=["method"]
        )
        if self.exec_method is not None:
            method.add_metric([self.exec_method], 1)
        yield method
