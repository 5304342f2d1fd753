# ringstream: `ringstream serve` on its built-in config, port 8080.
#
#   docker build -t ringstream .
#   docker run --rm -p 8080:8080 --shm-size=256m ringstream
#   curl -N localhost:8080/events
#
# The ring lives in /dev/shm (ring.shm_dir): docker's default 64m holds the
# default 16 MiB ring; a larger RINGSTREAM_RING_SIZE needs a larger --shm-size
# (the service exits 2 naming the value to pass when it does not fit).
#
# PYTHON_IMAGE: any Debian-based image with Python >= 3.11 as `python3`, its
# headers and the venv module (the official slim image has all three).
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: compile the C extension and the BPF objects into a wheel, next to
# its dependencies' wheels (clang -target bpf, libbpf's headers, <linux/bpf.h>)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev clang libbpf-dev linux-libc-dev; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY config config
COPY ringcore ringcore
COPY service service
RUN /opt/build/bin/pip wheel --wheel-dir /wheels . \
    && ls /wheels/ringstream-*.whl \
    && python3 -m zipfile -l /wheels/ringstream-*.whl | grep -q 'exec/exec.bpf.o'


# --- runtime: the wheels installed into a venv; no compiler, no pip cache, no apt lists
FROM ${PYTHON_IMAGE} AS runtime
# tini; libbpf1 (the exec source's BPF method loads its program with it,
# through ctypes); a user; and a base that ships a compiler (a full Debian
# image) loses it: the packages owning the compiler drivers and
# assembler/linker are purged
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini libbpf1; \
    cc_pkgs=$(for t in cc gcc cpp c++ g++ clang as ld; do \
        p=$(command -v "$t") && dpkg -S "$(readlink -f "$p")"; \
    done 2>/dev/null | cut -d: -f1 | sort -u); \
    if [ -n "$cc_pkgs" ]; then \
        DEBIAN_FRONTEND=noninteractive apt-get purge -y --auto-remove $cc_pkgs; \
    fi; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log; \
    if command -v gcc; then echo "a compiler is left in the runtime image" >&2; exit 1; fi; \
    useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ringstream
# offline from the build stage's wheels (bind-mounted, so no wheel stays in a layer)
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    set -eux; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install --no-cache-dir --no-index --find-links=/wheels ringstream; \
    /opt/venv/bin/pip uninstall -y --no-cache-dir pip setuptools; \
    /opt/venv/bin/ringstream config >/dev/null

# A container is reached through its published port, so the image listens on
# every address (the built-in config keeps to loopback); a mounted config's
# server.host is overridden by this env: set it with -e instead
ENV RINGSTREAM_SERVER_HOST=0.0.0.0 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1
# Configuration: the built-in config (inside the wheel) is the default; set
# keys with RINGSTREAM_<SECTION>_<KEY> (RINGSTREAM_RING_SIZE=64MiB,
# RINGSTREAM_WORKERS_COUNT=2, RINGSTREAM_SERVER_PORT=9000), or mount a file
# and pass --config FILE / RINGSTREAM_CONFIG. Defaults are not repeated here
# as env, since env would override the values of a mounted config file.
# workers.count = 0 means one per CPU the container sees (os.cpu_count(), which
# ignores --cpus): set RINGSTREAM_WORKERS_COUNT when the CPU quota is limited.

USER ringstream:ringstream
EXPOSE 8080
# liveness, without curl; follows RINGSTREAM_SERVER_PORT
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('RINGSTREAM_SERVER_PORT', '8080'); urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
# tini is PID 1: it reaps, and with -g forwards SIGTERM/SIGINT to the whole
# process group (the service and its worker processes); the service then
# drains and exits 0 within server.shutdown_timeout (7 s, inside docker stop's 10)
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "ringstream"]
CMD ["serve"]
