"""libbpf (libbpf.so.1, Debian libbpf1) through ctypes: open, load and attach a BPF object.

libbpf does what a hand-written loader would get wrong: ELF parsing, CO-RE
relocation against the kernel's BTF, map creation, program load with the
verifier's log, attachment. There is no maintained Python binding of it with
ring-buffer support, and ringcore.KernelRing already reads ring buffers, so
this module binds the dozen functions the service needs and nothing more.

libbpf's own messages (a missing BTF, a verifier log) go through a print
callback into the `ringstream.bpf` logger at debug level, and the last
warnings are kept so that a failed load can say what libbpf said.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sysconfig
from collections import deque
from pathlib import Path

log = logging.getLogger("ringstream.bpf")

_p, _i, _u32, _s = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
_SIGNATURES: list[tuple[str, object, list[object]]] = [
    ("bpf_object__open_file", _p, [_s, _p]),
    ("bpf_object__load", _i, [_p]),
    ("bpf_object__close", None, [_p]),
    ("bpf_object__find_map_by_name", _p, [_p, _s]),
    ("bpf_object__next_program", _p, [_p, _p]),
    ("bpf_program__name", _s, [_p]),
    ("bpf_program__attach", _p, [_p]),
    ("bpf_link__destroy", _i, [_p]),
    ("bpf_map__fd", _i, [_p]),
    ("bpf_map__set_max_entries", _i, [_p, _u32]),
    ("bpf_map__value_size", _u32, [_p]),
    ("bpf_map_lookup_elem", _i, [_i, _p, _p]),
    ("bpf_map_update_elem", _i, [_i, _p, _p, ctypes.c_uint64]),
    ("libbpf_strerror", _i, [_i, _s, ctypes.c_size_t]),
    ("libbpf_num_possible_cpus", _i, []),
    ("libbpf_set_print", _p, [_p]),
]

# int (*)(enum libbpf_print_level, const char *fmt, va_list)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
LIBBPF_WARN = 0


class LibbpfError(OSError):
    """A libbpf call failed; errno is set, `libbpf_says` holds libbpf's last warnings."""

    def __init__(self, err: int, what: str, libbpf_says: list[str]) -> None:
        super().__init__(err, f"{what}: {strerror(err)}")
        self.what = what
        self.libbpf_says = libbpf_says


def strerror(err: int) -> str:
    """libbpf's own errors (4000 and up: LIBBPF_ERRNO__*) as libbpf words them."""
    if err >= 4000 and _lib is not None:
        buf = ctypes.create_string_buffer(256)
        _lib.lib.libbpf_strerror(err, buf, len(buf))
        return buf.value.decode(errors="replace")
    return os.strerror(err)


def find_libbpf() -> str | None:
    """libbpf.so.1: the 1.x API (0.x returns error pointers where 1.x returns NULL)."""
    name = ctypes.util.find_library("bpf")
    if name and name.endswith(".so.1"):
        return name
    try:
        ctypes.CDLL("libbpf.so.1")
        return "libbpf.so.1"
    except OSError:
        pass
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for d in ("/usr/lib64", "/usr/lib", f"/usr/lib/{multiarch}", "/lib64", f"/lib/{multiarch}"):
        if (Path(d) / "libbpf.so.1").exists():
            return str(Path(d) / "libbpf.so.1")
    return None


class _Lib:
    """The loaded library, its print callback and the warnings it collected."""

    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path, use_errno=True)
        for name, res, args in _SIGNATURES:
            fn = getattr(self.lib, name)
            fn.restype = res
            fn.argtypes = args
        self.warnings: deque[str] = deque(maxlen=12)
        libc = ctypes.CDLL(None)
        self._vsnprintf = libc.vsnprintf
        self._vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, _p]
        self._vsnprintf.restype = ctypes.c_int
        # kept referenced: libbpf holds the pointer for the life of the process
        self._print = _PRINT_FN(self._on_print)
        self.lib.libbpf_set_print(ctypes.cast(self._print, _p))

    def _on_print(self, level: int, fmt: bytes, args: int) -> int:
        # one message can be the whole verifier log, whose reason is at its
        # end: room for it all, and the last lines kept (the va_list can be
        # read once only, so no second call with the needed size)
        buf = ctypes.create_string_buffer(1 << 20)
        self._vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip()
        if level == LIBBPF_WARN:
            self.warnings.extend(line for line in text.splitlines() if line.strip())
        log.debug("libbpf: %s", text)
        return 0

    def said(self) -> list[str]:
        out = list(self.warnings)
        self.warnings.clear()
        return out


_lib: _Lib | None = None


def lib() -> _Lib:
    """libbpf, loaded once; FileNotFoundError when it is not installed."""
    global _lib
    if _lib is None:
        path = find_libbpf()
        if path is None:
            raise FileNotFoundError("libbpf.so.1 not found (Debian package libbpf1)")
        _lib = _Lib(path)
    return _lib


class BpfObject:
    """An opened BPF object file: size its maps, then load() and attach()."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._l = lib()
        self.path = str(path)
        self._links: list[int] = []
        self._l.said()
        ctypes.set_errno(0)
        obj = self._l.lib.bpf_object__open_file(os.fsencode(self.path), None)
        if not obj:
            raise self._error(f"cannot open {self.path}")
        self._obj: int | None = obj

    def _error(self, what: str) -> LibbpfError:
        return LibbpfError(ctypes.get_errno() or 1, what, self._l.said())

    def _map(self, name: str) -> int:
        assert self._obj is not None
        m = self._l.lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise KeyError(f"{self.path} has no map {name!r}")
        return int(m)

    def set_max_entries(self, name: str, n: int) -> None:
        """Before load(): a ring buffer's size, an array's length."""
        err = self._l.lib.bpf_map__set_max_entries(self._map(name), n)
        if err:
            raise LibbpfError(-err, f"map {name}: cannot set max_entries {n}", self._l.said())

    def load(self) -> None:
        """Relocate (CO-RE), create the maps, load the programs through the verifier."""
        err = self._l.lib.bpf_object__load(self._obj)
        if err:
            raise LibbpfError(-err, f"cannot load {Path(self.path).name}", self._l.said())

    def attach(self) -> list[str]:
        """Attach every program where its SEC() says; returns their names."""
        names = []
        prog = self._l.lib.bpf_object__next_program(self._obj, None)
        while prog:
            name = self._l.lib.bpf_program__name(prog).decode()
            ctypes.set_errno(0)
            link = self._l.lib.bpf_program__attach(prog)
            if not link:
                raise self._error(f"cannot attach program {name}")
            self._links.append(int(link))
            names.append(name)
            prog = self._l.lib.bpf_object__next_program(self._obj, prog)
        return names

    def map_fd(self, name: str) -> int:
        """The map's descriptor, owned by this object (dup it to keep it longer)."""
        fd = self._l.lib.bpf_map__fd(self._map(name))
        if fd < 0:
            raise LibbpfError(-fd, f"map {name} has no descriptor (not loaded)", [])
        return int(fd)

    def close(self) -> None:
        """Detach the programs, free the object (maps live on while other fds hold them)."""
        for link in self._links:
            self._l.lib.bpf_link__destroy(link)
        self._links.clear()
        if self._obj is not None:
            self._l.lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def possible_cpus() -> int:
    n = lib().lib.libbpf_num_possible_cpus()
    if n < 0:
        raise OSError(-n, "cannot count the possible CPUs")
    return int(n)


def lookup(map_fd: int, key: int, value_size: int) -> bytes:
    """One value of an array map."""
    buf = ctypes.create_string_buffer(value_size)
    k = ctypes.c_uint32(key)
    ctypes.set_errno(0)
    if lib().lib.bpf_map_lookup_elem(map_fd, ctypes.byref(k), buf) != 0:
        err = ctypes.get_errno() or 1
        raise OSError(err, f"bpf_map_lookup_elem: {os.strerror(err)}")
    return buf.raw


def update(map_fd: int, key: int, value: bytes) -> None:
    """Set one value of an array map (BPF_ANY)."""
    k = ctypes.c_uint32(key)
    ctypes.set_errno(0)
    if lib().lib.bpf_map_update_elem(map_fd, ctypes.byref(k), value, 0) != 0:
        err = ctypes.get_errno() or 1
        raise OSError(err, f"bpf_map_update_elem: {os.strerror(err)}")


def lookup_percpu(map_fd: int, value_size: int, key: int = 0) -> list[bytes]:
    """One key of a BPF_MAP_TYPE_PERCPU_ARRAY: each possible CPU's value."""
    cpus = possible_cpus()
    stride = (value_size + 7) // 8 * 8  # the kernel rounds each CPU's value up to 8
    buf = ctypes.create_string_buffer(stride * cpus)
    k = ctypes.c_uint32(key)
    ctypes.set_errno(0)
    if lib().lib.bpf_map_lookup_elem(map_fd, ctypes.byref(k), buf) != 0:
        err = ctypes.get_errno() or 1
        raise OSError(err, f"bpf_map_lookup_elem: {os.strerror(err)}")
    raw = buf.raw
    return [raw[i * stride : i * stride + value_size] for i in range(cpus)]
