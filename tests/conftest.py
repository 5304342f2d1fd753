import os
import subprocess
import sys

import pytest

# the reference model and helpers live next to the tests
sys.path.insert(0, os.path.dirname(__file__))
# the plugin sources the end-to-end tests run in the service's workers
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "plugins"))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size ("1m"), standing in for a
    small /dev/shm such as docker's default; skips where mount is not allowed."""
    mounts = []

    def mount(size):
        mnt = tmp_path / f"tmpfs{len(mounts)}"
        mnt.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]
        if subprocess.run(cmd).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        # lazy: a ring still open in this process keeps the mount busy
        subprocess.run(["umount", "-l", str(mnt)], check=True)
