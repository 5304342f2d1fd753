"""The NATS protocol frames the edge sends, built a batch at a time.

nats-py's `publish()` builds one frame per call (a header dict walked, a
bytearray grown, the flusher poked): about 10 us a record, which caps an
acknowledged forward near 95 k records/s on these machines. Here a whole
chunk of records becomes one bytes object of HPUB frames (the documented
client protocol, https://docs.nats.io/reference/reference-protocols/nats-protocol)
handed to the connection in one write, about 1.5 us a record. nats-py keeps
everything else: the connection, reconnects, cluster discovery, TLS,
credentials, the ack subscription and the JetStream API.

    HPUB <subject> <reply> <#header bytes> <#total bytes>\\r\\n
    NATS/1.0\\r\\n
    Nats-Msg-Id: <host>-<epoch>-<id>\\r\\n
    [Ringstream-Lost: <n>\\r\\n]
    \\r\\n
    <the record's JSON>\\r\\n
"""

from __future__ import annotations

import re
from typing import Any

# the one place ringstream reaches into nats-py: its outgoing buffer, which
# publish() itself appends to (tests/test_forward.py checks both exist)
SEND = "_send_command"
FLUSH = "_flush_pending"

_NOT_SUBJECT = re.compile(r"[^A-Za-z0-9_-]")


def subject_token(name: str) -> str:
    """A host or type name as one subject token ('.', ':', '/' and the like
    would split it or be wildcards)."""
    return _NOT_SUBJECT.sub("_", name) or "_"


def frames(
    subjects: list[bytes],
    replies: list[bytes],
    msgid_prefix: bytes,
    ids: list[int],
    lines: list[bytes],
    lost: dict[int, int],
) -> bytes:
    """HPUB frames for records k = 0.. (reply subject replies[k], so each
    answer names its record or batch position); `lost` maps a k to the count
    of records dropped before it."""
    out = []
    for k, line in enumerate(lines):
        if k in lost:
            hdr = b"NATS/1.0\r\nNats-Msg-Id: %s%d\r\nRingstream-Lost: %d\r\n\r\n" % (
                msgid_prefix,
                ids[k],
                lost[k],
            )
        else:
            hdr = b"NATS/1.0\r\nNats-Msg-Id: %s%d\r\n\r\n" % (msgid_prefix, ids[k])
        h = len(hdr)
        out.append(
            b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subjects[k], replies[k], h, h + len(line), hdr, line)
        )
    return b"".join(out)


async def write(nc: Any, data: bytes) -> None:
    await getattr(nc, SEND)(data)
    await getattr(nc, FLUSH)()
