"""Where a thread of this process sleeps, read from /proc.

A test that must act while another thread is blocked in a system call (a
commit that should wake it, a close() that must be refused) waits until /proc
shows the thread asleep there, instead of sleeping for a while and hoping.
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Syscall:
    wchan_word: str  # in the name of the kernel function /proc/.../wchan shows
    numbers: dict[str, set[int]]  # by machine, for kernels that show no wchan


EPOLL_WAIT = Syscall(  # epoll_wait, epoll_pwait, epoll_pwait2
    "epoll", {"x86_64": {232, 281, 441}, "aarch64": {22, 441}, "riscv64": {22, 441}}
)
POLL = Syscall("poll", {"x86_64": {7, 271}, "aarch64": {73}, "riscv64": {73}})  # poll, ppoll


def sleeps_in(task: str, call: Syscall) -> bool:
    """True if the thread whose /proc directory is task sleeps in call."""
    with open(f"{task}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] != "S":
            return False
    with open(f"{task}/wchan") as f:
        wchan = f.read()
    if wchan not in ("", "0"):
        return call.wchan_word in wchan
    with open(f"{task}/syscall") as f:
        nr = f.read().split()[0]
    known = call.numbers.get(platform.machine())
    assert known, f"cannot tell from /proc whether a thread sleeps in {call.wchan_word} ({task})"
    return nr.isdigit() and int(nr) in known


def wait_until_sleeping(thread: threading.Thread, call: Syscall) -> None:
    """Return once thread sleeps in call."""
    task = f"/proc/self/task/{thread.native_id}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sleeps_in(task, call):
            return
        assert thread.is_alive(), f"the thread ended before it slept in {call.wchan_word}"
        time.sleep(0.001)  # polling a condition, not waiting for time to pass
    raise AssertionError(f"the thread never slept in {call.wchan_word} ({task})")
