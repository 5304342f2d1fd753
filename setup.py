"""Build of the ringcore C extension and the BPF objects (metadata lives in pyproject.toml).

CFLAGS from the environment are appended by distutils, which is how the
sanitizer test builds an instrumented copy; RINGCORE_WERROR=1 turns
warnings into errors.

BPF programs (*.bpf.c beside the source that loads them) are compiled with
clang -target bpf into *.bpf.o next to their source, before the package
files are collected, so a wheel (the Docker image's) ships them and its
runtime needs no compiler. Without clang the build goes on without them and
says so; the exec source then runs on /proc (method "auto").
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

BPF_SOURCES = ["service/sources/exec/exec.bpf.c"]

SOURCES = [
    "ringcore/src/map.c",
    "ringcore/src/produce.c",
    "ringcore/src/consume.c",
    "ringcore/src/args.c",
    "ringcore/src/pyreservation.c",
    "ringcore/src/pyrecordview.c",
    "ringcore/src/pyconsume.c",
    "ringcore/src/pyring.c",
    "ringcore/src/module.c",
    "ringcore/src/kernel.c",
    "ringcore/src/pykernelring.c",
    "ringcore/src/encode.c",
    "ringcore/src/json.c",
    "ringcore/src/pyencoder.c",
]

flags = ["-std=gnu11", "-O2", "-Wall", "-Wextra"]
if os.environ.get("RINGCORE_WERROR") == "1":
    flags.append("-Werror")


def _multiarch_include() -> list[str]:
    # <asm/types.h>, which <linux/bpf.h> needs: clang -target bpf does not
    # look in the host's multiarch directory
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    d = Path("/usr/include") / arch
    return [f"-I{d}"] if arch and d.is_dir() else []


def build_bpf() -> None:
    clang = shutil.which("clang")
    for src in BPF_SOURCES:
        obj = Path(src).with_suffix(".o")
        if obj.exists() and obj.stat().st_mtime >= Path(src).stat().st_mtime:
            continue
        if clang is None or not Path("/usr/include/bpf/bpf_helpers.h").exists():
            print(f"warning: {src} not compiled: needs clang and libbpf-dev")
            continue
        cmd = [clang, "-O2", "-g", "-target", "bpf", "-Wall", "-Wextra", *_multiarch_include()]
        cmd += ["-c", src, "-o", str(obj)]
        if os.environ.get("RINGCORE_WERROR") == "1":
            cmd.append("-Werror")
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        build_bpf()
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithBpf},
    ext_modules=[
        Extension(
            "ringcore._ringcore",
            sources=SOURCES,
            depends=[
                "ringcore/src/ringcore.h",
                "ringcore/src/pyringcore.h",
                "ringcore/src/kernelring.h",
                "ringcore/src/encode.h",
            ],
            extra_compile_args=flags,
        )
    ],
)
