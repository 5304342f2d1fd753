"""The exec source: process exec and exit records, by one of two methods.

``method = "bpf"``: exec.bpf.c on the kernel's sched_process_exec and
sched_process_exit tracepoints, every event, exact exit codes, losses
counted (bpf.py). ``method = "proc"``: polling /proc, unprivileged, blind to
processes that live less than a scan interval (proc.py). ``"auto"`` (the
default) is bpf where it can be loaded, else proc with one warning naming
what was missing. The service process decides (service/kernel.py loads the
program), so the worker's options say which method runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ringcore
from service.sources.exec.proc import (
    CMDLINE_SIZE,
    COMM_SIZE,
    EXEC,
    EXEC_TYPE,
    EXIT,
    EXIT_TYPE,
    FILENAME_SIZE,
    Scanner,
    exec_id,
    fit,
    parse_stat,
    wait_status_code,
)
from service.workers import StopFlag

__all__ = [
    "CMDLINE_SIZE",
    "COMM_SIZE",
    "EXEC",
    "EXEC_TYPE",
    "EXIT",
    "EXIT_TYPE",
    "FILENAME_SIZE",
    "Scanner",
    "exec_id",
    "fit",
    "parse_stat",
    "run",
    "wait_status_code",
]


def run(ring: ringcore.Ring, options: Mapping[str, Any], *, instance: int, stop: StopFlag) -> None:
    if options.get("method") == "bpf":
        from service.sources.exec.bpf import run_bpf

        run_bpf(ring, options, stop=stop)
    else:
        from service.sources.exec.proc import run_proc

        run_proc(ring, options, stop=stop)
