"""Kernel BPF for the sources that read the kernel's own ring buffers.

libbpf.py binds libbpf through ctypes (open, load, attach, look up maps);
diagnose.py turns a failure to load into what the user must change;
fds.py hands map descriptors from the service process to its workers.
"""
