"""The C core builds warning-free; stress, model, encoder, JSON tests pass under ASan + UBSan.

The sanitizer test builds an instrumented copy of the extension into a temporary
directory and runs tests/test_stress.py and tests/test_model.py against it in a
fresh interpreter. Python itself is not instrumented, so the ASan runtime is
preloaded; with gcc it does not contain the UBSan handlers, but the instrumented
module pulls in libubsan as a dependency when it is loaded, which is enough
(the UBSan probe below checks exactly that set-up). PYTHONMALLOC=malloc routes
Python's allocations through malloc so ASan sees them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "ringcore" / "src").glob("*.c"))
PY_INCLUDES = [
    f"-I{d}"
    for d in dict.fromkeys((sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]))
]
WERROR_FLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", *PY_INCLUDES]
SAN_FLAGS = [
    "-std=gnu11",
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-Wall",
    "-Wextra",
    "-shared",
    "-fPIC",
    *PY_INCLUDES,
]
EXT_NAME = "_ringcore" + sysconfig.get_config_var("EXT_SUFFIX")

# Loaded through ctypes into the same interpreter set-up as the extension: if
# either sanitizer is inactive there, the probe "succeeds" and the test fails.
PROBE_C = r"""
#include <limits.h>
#include <stdlib.h>

int probe_heap_overflow(int n)
{
	volatile char *p = malloc(n);
	p[n] = 1;
	int r = p[0];
	free((void *)p);
	return r;
}

int probe_signed_overflow(int x)
{
	return x + INT_MAX;
}
"""

# Records which _ringcore the sanitizer pytest run really imported.
GUARD_PLUGIN = """\
import sys
from pathlib import Path


def pytest_unconfigure(config):
    mod = sys.modules.get("ringcore._ringcore")
    Path(__file__).with_name("exercised.txt").write_text(getattr(mod, "__file__", "") or "")
"""


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def show(r: subprocess.CompletedProcess[str], lines: int = 80) -> str:
    def tail(text: str) -> str:
        return "\n".join(text.splitlines()[-lines:])

    return (
        f"$ {' '.join(map(str, r.args))}\nexit {r.returncode}\n"
        f"--- stdout (tail) ---\n{tail(r.stdout)}\n--- stderr (tail) ---\n{tail(r.stderr)}"
    )


SANITIZER_REPORT = re.compile(r"^==\d+==ERROR: |: runtime error: ", re.M)


def run_watched(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[subprocess.CompletedProcess[str], str | None]:
    """Run cmd in its own session; stop it soon after a sanitizer report.

    A producer process that a sanitizer stops leaves the stress test waiting
    for its records until stress.py's deadline (minutes per test), so the
    output is watched and the whole process group ended instead. Returns the
    result (returncode -9 when stopped) and the first report, if any.
    """
    out_path, err_path = cwd / "run.stdout", cwd / "run.stderr"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    seen = None  # when a report first appeared
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if seen is None and SANITIZER_REPORT.search(err_path.read_text(errors="replace")):
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen > 5:  # let the report finish
                break
            time.sleep(0.2)
    finally:
        # also ends producers left behind by a crashed run
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    if proc.returncode == -signal.SIGKILL and seen is None:
        stderr += f"\n[killed after {timeout:.0f} s]"
    m = SANITIZER_REPORT.search(stderr)
    start = stderr.rfind("\n", 0, m.start()) + 1 if m else 0
    # from the start of the report's line (UBSan's begins with file:line:col)
    report = "\n".join(stderr[start:].splitlines()[:100]) if m else None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), report


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_core_compiles_clean_with_werror(cc, tmp_path):
    if cc == "clang" and shutil.which("clang") is None:
        pytest.skip("clang is not installed")
    assert SOURCES, "no ringcore/src/*.c found"
    failures = []
    for src in SOURCES:
        r = run([cc, *WERROR_FLAGS, "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o")])
        if r.returncode != 0 or r.stderr:
            failures.append(show(r))
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_stress_under_asan_ubsan(tmp_path):
    # the instrumented package, in a directory the repo checkout cannot shadow
    pkg = tmp_path / "ringcore"
    pkg.mkdir()
    ext = pkg / EXT_NAME
    r = run(["gcc", *SAN_FLAGS, *map(str, SOURCES), "-o", str(ext)])
    assert r.returncode == 0, show(r)
    for f in [*ROOT.glob("ringcore/*.py"), *ROOT.glob("ringcore/*.pyi")]:
        shutil.copy2(f, pkg / f.name)

    libasan = run(["gcc", "-print-file-name=libasan.so"]).stdout.strip()
    assert os.path.isabs(libasan) and os.path.exists(libasan), f"gcc has no libasan: {libasan!r}"
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "RINGCORE_EXPECT_BUILD": str(ext),
    }

    def py(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, *args], cwd=tmp_path, env=env, **kwargs)

    # the sanitizers are live in this set-up: both probes must be caught
    probe_c = tmp_path / "probe.c"
    probe_c.write_text(PROBE_C)
    probe = tmp_path / "libprobe.so"
    r = run(["gcc", *SAN_FLAGS, str(probe_c), "-o", str(probe)])
    assert r.returncode == 0, show(r)
    call = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).{}({}))"
    r = py("-c", call.format("probe_heap_overflow", 16), str(probe))
    assert r.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in r.stderr, show(r)
    r = py("-c", call.format("probe_signed_overflow", 5), str(probe))
    assert r.returncode != 0 and "runtime error: signed integer overflow" in r.stderr, show(r)

    # the instrumented build is the one that gets imported
    r = py("-c", "import ringcore._ringcore as m; print(m.__file__)")
    assert r.returncode == 0, show(r)
    assert Path(r.stdout.strip()) == ext, show(r)

    # -s: without it a report goes to pytest's capture, where it is lost when
    # the test process aborts and is not seen while a producer's stall runs
    # out; with it, the report reaches run.stderr and run_watched stops the run
    (tmp_path / "ringcore_build_guard.py").write_text(GUARD_PLUGIN)
    tests = [
        str(ROOT / "tests" / name)
        for name in ("test_stress.py", "test_model.py", "test_encoder.py", "test_json_records.py")
    ]
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"]
    cmd += ["-p", "ringcore_build_guard", *tests]
    r, report = run_watched(cmd, tmp_path, env, timeout=900)
    assert report is None, f"sanitizer report:\n{report}\n\n{show(r)}"
    assert r.returncode == 0, show(r)
    exercised = (tmp_path / "exercised.txt").read_text()
    assert Path(exercised) == ext, f"the test run imported {exercised!r}, not {ext}\n{show(r)}"


def test_c_bench_compiles_clean(tmp_path):
    """bench/c_bench.c uses the core's C API directly: keep it building."""
    src = ROOT / "ringcore" / "src"
    cmd = [
        "gcc",
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-o",
        str(tmp_path / "c_bench"),
        str(ROOT / "bench" / "c_bench.c"),
        *(str(src / f) for f in ("map.c", "produce.c", "consume.c")),
        f"-I{src}",
        "-lpthread",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
