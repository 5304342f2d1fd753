"""Build of the ringcore C extension (metadata lives in pyproject.toml).

CFLAGS from the environment are appended by distutils, which is how the
sanitizer test builds an instrumented copy; RINGCORE_WERROR=1 turns
warnings into errors.
"""

import os

from setuptools import Extension, setup

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
    "ringcore/src/pyencoder.c",
]

flags = ["-std=gnu11", "-O2", "-Wall", "-Wextra"]
if os.environ.get("RINGCORE_WERROR") == "1":
    flags.append("-Werror")

setup(
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
    ]
)
