"""JetStream fast-ingest batches: one acknowledgement for many records.

A PubAck a record costs the edge about 5 us of Python (nats-py's callback,
the JSON) and the server a reply to build and send. With a stream made with
`allow_batched` (nats-server 2.14+), records go out as one open batch and
the server says how far it has *persisted* every few hundred messages:

    HPUB <subject> <inbox>.<batch id>.<flow>.fail.<batch seq>.<op>.$FI ...
                           op 0: the batch's first message (batch seq 1)
                           op 1: any later one
                           op 3: commit, "end of batch": not stored itself

    answers, to the reply subject of the message that caused them:
      {"type":"ack","seq":0,"msgs":N}       the batch is open; an ack every N
      {"type":"ack","seq":S,"msgs":N}       batch seqs <= S are in the stream
      {"type":"err","seq":S,"error":{...}}  S refused; the batch ends here
      {"stream":..,"seq":..,"batch":..,"count":C}  the end: seqs <= C stored
      {"error":{...}}                       the batch never started
      status 503, no payload                no stream leader (an election)

The gap mode is "fail": a missing or refused message ends the batch, so an
ack for S says every message up to S is stored, which is what "forwarded"
means. The protocol is the server's (nats-server's stream.go, getFastBatch,
and jetstream_batching.go); nats-py has no client for it yet.

Only records never sent before go in a batch. One sent again (after a
disconnect, a failed batch or a late ack) may be in the stream already, and
a duplicate at a batch's start would end that batch at once; so those go
with a PubAck each, which also says "duplicate" when it is one.
"""

from __future__ import annotations

from typing import Any

import orjson

FLOW = 500  # the most messages between two flow acks the edge allows
LINGER = 0.01  # seconds with nothing to send before an open batch is committed
HOLD = 0.5  # seconds before a new batch after one failed

OP_START, OP_APPEND, OP_COMMIT_EOB = 0, 1, 3  # (2 commits with a stored last message)

# the server's error codes (nats-server server/jetstream_errors_generated.go)
DISABLED = 10205  # the stream's allow_batched was turned off
TOO_BIG = 10054  # past the stream's max_msg_size: refused for good

ACK, ERR, GAP, END, FAILED = "ack", "err", "gap", "end", "failed"


def reply(prefix: bytes, batch_id: bytes, bseq: int) -> bytes:
    op = OP_START if bseq == 1 else OP_APPEND
    return b"%s%s.%d.fail.%d.%d.$FI" % (prefix, batch_id, FLOW, bseq, op)


def commit(subject: bytes, prefix: bytes, batch_id: bytes, bseq: int) -> bytes:
    """The end-of-batch message: no payload, not stored; the server answers
    with the batch's PubAck once all before it are."""
    return b"PUB %s %s%s.%d.fail.%d.%d.$FI 0\r\n\r\n" % (
        subject,
        prefix,
        batch_id,
        FLOW,
        bseq,
        OP_COMMIT_EOB,
    )


def batch_of(subject: str) -> str:
    """The batch id in an answer's subject (<inbox>.<id>.<flow>.<gap>.<seq>.<op>.$FI)."""
    parts = subject.rsplit(".", 6)
    return parts[1] if len(parts) == 7 else ""


def parse(data: bytes) -> tuple[str, int, dict[str, Any] | None]:
    """(kind, sequence, error) for one answer; the sequence is the highest
    batch seq known stored (ack, end) or the refused one (err)."""
    if not data:
        return FAILED, 0, None  # a status message, such as 503 no responders
    try:
        j = orjson.loads(data)
    except orjson.JSONDecodeError:
        return FAILED, 0, {"description": data[:200].decode(errors="replace")}
    if not isinstance(j, dict):
        return FAILED, 0, None
    kind = j.get("type")
    if kind == "ack":
        return ACK, int(j.get("seq", 0)), None
    if kind == "err":
        return ERR, int(j.get("seq", 0)), j.get("error") or {}
    if kind == "gap":
        return GAP, int(j.get("last_seq", 0)), None
    if "error" in j:
        return FAILED, 0, j["error"] or {}
    return END, int(j.get("count", 0)), None
