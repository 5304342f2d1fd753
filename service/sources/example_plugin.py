"""An example plugin: a heartbeat record every `interval` seconds.

    [[sources]]
    kind = "plugin"
    target = "service.sources.example_plugin:heartbeat"
    options = { interval = 1.0, name = "example" }

Each record is framed (service/record.py) with type 100 and two fields. No
built-in schema has type 100, so the service delivers these records raw
(base64 of all 40 bytes) until a schema file listed in [schemas] files
describes them:

    [[schemas]]
    type = 100
    name = "heartbeat"
    fields = [
        { name = "count", kind = "u64" },
        { name = "name", kind = "char", size = 16 },
    ]
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import ringcore
from service.record import pack_header
from service.workers import StopFlag, deliver

HEARTBEAT_TYPE = 100
FIELDS = struct.Struct("<Q16s")  # count, name


def heartbeat(ring: ringcore.Ring, options: Mapping[str, Any], stop: StopFlag) -> None:
    interval = float(options.get("interval", 1.0))
    name = str(options.get("name", "example")).encode()[:16]
    count = 0
    while not stop.is_set():
        deliver(ring, [pack_header(HEARTBEAT_TYPE) + FIELDS.pack(count, name)], stop)
        count += 1
        stop.wait(interval)
