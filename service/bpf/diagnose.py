"""Why a BPF program cannot be loaded here, said as what to change.

Checked before loading, in the order a user meets them: the compiled
object, libbpf, the kernel's BTF (CO-RE relocates against it), the
capabilities (CAP_BPF for maps and programs, CAP_PERFMON for tracing ones,
or CAP_SYS_ADMIN for both). After a refused load, an EPERM with every
capability present means a seccomp profile blocks bpf(): docker's and
podman's default profiles do.
"""

from __future__ import annotations

import errno
from pathlib import Path

from service.bpf import libbpf

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
BTF_PATH = Path("/sys/kernel/btf/vmlinux")

CONTAINER_HINT = (
    "in a container: docker run --cap-add BPF --cap-add PERFMON --security-opt "
    "seccomp=unconfined (or --privileged); in Kubernetes, add BPF and PERFMON to the "
    "container's securityContext.capabilities"
)


class BpfUnavailable(Exception):
    """The BPF method cannot run here; the message names what is missing."""


def effective_caps(status: str = "/proc/self/status") -> int:
    with open(status) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_caps(caps: int | None = None) -> list[str]:
    """The capabilities a tracing program needs that this process lacks."""
    caps = effective_caps() if caps is None else caps

    def has(cap: int) -> bool:
        return bool(caps >> cap & 1)

    if has(CAP_SYS_ADMIN):
        return []
    return [
        name for cap, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if not has(cap)
    ]


def check(obj: Path, *, what: str) -> None:
    """Raise BpfUnavailable when loading `obj` cannot work here."""
    if not obj.exists():
        raise BpfUnavailable(
            f"{what}: the BPF object {obj.name} is not built (clang and libbpf-dev were "
            "missing when ringstream was installed: apt install clang libbpf-dev, then "
            "scripts/setup again)"
        )
    try:
        libbpf.lib()
    except (OSError, AttributeError) as e:
        raise BpfUnavailable(
            f"{what}: libbpf.so.1 cannot be used ({e}): apt install libbpf1"
        ) from None
    if not BTF_PATH.exists():
        raise BpfUnavailable(
            f"{what}: the kernel has no BTF ({BTF_PATH} is missing; it needs a kernel "
            "built with CONFIG_DEBUG_INFO_BTF=y, 5.8 or newer)"
        )
    missing = missing_caps()
    if missing:
        raise BpfUnavailable(
            f"{what}: this process lacks {' and '.join(missing)} (or CAP_SYS_ADMIN), which "
            f"loading a tracing BPF program needs: run as root, or {CONTAINER_HINT}"
        )


def explain(e: libbpf.LibbpfError, *, what: str) -> BpfUnavailable:
    """A refused load or attach, as what to change."""
    said = "; ".join(e.libbpf_says[-4:])
    detail = f" (libbpf: {said})" if said else ""
    if e.errno == errno.EPERM and not missing_caps():
        return BpfUnavailable(
            f"{what}: bpf() was refused (EPERM) although this process has CAP_BPF and "
            "CAP_PERFMON: a seccomp profile (docker's and podman's default) or a user namespace "
            "blocks it, or, on kernels before 5.11, RLIMIT_MEMLOCK is too low (--ulimit "
            f"memlock=-1); {CONTAINER_HINT}{detail}"
        )
    if e.errno in (errno.EACCES, errno.EINVAL, errno.E2BIG) and "load" in e.what:
        return BpfUnavailable(
            f"{what}: the kernel's verifier rejected the program ({errno.errorcode[e.errno]}); "
            f"it needs Linux 5.8 or newer with BTF{detail}"
        )
    return BpfUnavailable(f"{what}: {e.strerror or e}{detail}")
