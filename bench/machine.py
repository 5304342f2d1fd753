"""What every benchmark prints first: the machine its figures come from."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}; {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}); "
        f"Linux {platform.release()}; Python {platform.python_version()} "
        f"({platform.python_implementation()})"
    )


def proc_cpu(pid: int) -> float | None:
    """A process's CPU seconds so far (utime + stime), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
