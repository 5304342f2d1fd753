"""Fan-out: the consumer publishes each batch once; every subscriber queues it.

A subscriber's queue is bounded in records and bytes. When a publish would
overflow it, the policy applies at once, in the publisher's call: either the
oldest queued records are dropped (counted, and the subscriber's next write
starts with a gap marker saying how many and between which ids) or the
subscriber is disconnected (counted). Publishing never awaits, so a slow
subscriber cannot slow the ring consumer or anyone else.

The history keeps the newest records (bounded in records and bytes) for
subscribers that resume with Last-Event-ID or ?from=. A subscriber that
resumes replays from the history through a cursor, not by copying it into
its queue, and joins the live stream where the replay ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

from service.batch import Batch
from service.filters import Filter

log = logging.getLogger("ringstream.subscribers")

TRANSPORTS = ("ndjson", "sse", "ws")


@dataclass(slots=True)
class Gap:
    """Records a subscriber will not get: a marker goes out before the next record."""

    reason: str  # "slow_subscriber" | "history" | "unknown_id" | "restart"
    after_id: int  # the last id before the gap (-1: from the beginning)
    dropped: int | None = None  # None: not known (history)
    after_epoch: str | None = None  # restart: the run `after_id` belongs to

    def marker(self, next_id: int | None) -> dict[str, object]:
        m: dict[str, object] = {"type": "gap", "reason": self.reason, "after_id": self.after_id}
        if self.after_epoch is not None:
            m["after_epoch"] = self.after_epoch
        if next_id is not None:
            m["next_id"] = next_id
        if self.dropped is not None:
            m["dropped"] = self.dropped
        return m


class History:
    """The newest published batches, bounded in records and bytes."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.batches: deque[Batch] = deque()
        self.records = 0
        self.bytes = 0
        self.evicted_last = -1  # id of the newest record evicted so far

    def append(self, batch: Batch) -> None:
        if self.max_records == 0:
            self.evicted_last = batch.last
            return
        self.batches.append(batch)
        self.records += len(batch)
        self.bytes += batch.nbytes
        while self.batches and (self.records > self.max_records or self.bytes > self.max_bytes):
            old = self.batches.popleft()
            self.records -= len(old)
            self.bytes -= old.nbytes
            self.evicted_last = old.last

    def resize(self, max_records: int, max_bytes: int) -> None:
        """New bounds (a reload): what no longer fits is evicted now."""
        self.max_records, self.max_bytes = max_records, max_bytes
        while self.batches and (
            self.records > max_records or self.bytes > max_bytes or max_records == 0
        ):
            old = self.batches.popleft()
            self.records -= len(old)
            self.bytes -= old.nbytes
            self.evicted_last = old.last

    @property
    def last(self) -> int:
        """Id of the newest record published (-1: none yet)."""
        return self.batches[-1].last if self.batches else self.evicted_last

    def read(self, after: int, until: int, limit: int) -> tuple[Batch | None, bool]:
        """Up to `limit` records with after < id <= until, and whether some are gone."""
        lost = after < self.evicted_last
        for b in self.batches:
            if b.last <= after:
                continue
            if b.first > until:
                break
            part = b.after(after)
            if part.last > until:
                part = part.slice(0, sum(1 for p in part.positions if p <= until))
            return (part.slice(0, limit) if len(part) > limit else part), lost
        return None, lost


class Subscriber:
    """One connected client: its filter, bounded queue, pending gap and wake-up."""

    def __init__(
        self,
        sid: int,
        transport: str,
        peer: str,
        flt: Filter | None,
        max_records: int,
        max_bytes: int,
        policy: str,
        scope: Filter | None = None,
        principal: Any = None,
    ) -> None:
        self.id = sid
        self.transport = transport
        self.peer = peer
        self.filter = flt
        # the token's scope, applied before the subscriber's own filter (which
        # a WebSocket message may replace; this stays); and who it is
        self.scope = scope
        self.principal = principal
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.policy = policy
        self.queue: deque[Batch] = deque()
        self.records = 0
        self.bytes = 0
        self.gap: Gap | None = None  # live records dropped by the policy
        self.last_id = -1  # id of the last live record queued (or dropped)
        # a resuming subscriber replays the history (cursor, until] first
        self.replay_until = -1
        self.cursor = -1
        self.replay_gap: Gap | None = None
        self.dropped = 0
        self.delivered = 0
        # the first position it has not got (taken or announced dropped), when
        # its queue holds something: how far behind it is, in ring bytes, for
        # any filter; a drop leaves it where it was (see Hub._keep_budget)
        self.behind: int | None = None
        self.closed: str | None = None  # disconnect reason, once closed
        self.wake = asyncio.Event()
        # the task writing to this subscriber: cancelled when the policy
        # disconnects it, since that task may be stuck in a write to a client
        # that reads nothing
        self.writer: asyncio.Task[None] | None = None

    def push(self, batch: Batch) -> int:
        """Queue a published batch; returns records dropped by the policy.

        Every batch published after subscribe() lies past replay_until (the
        newest id then), so the live queue and the replay never overlap.
        """
        if self.closed is not None:
            return 0
        if self.scope is not None:
            batch = self.scope.apply(batch)
        if self.filter is not None:
            batch = self.filter.apply(batch)
        if not batch.lines:
            return 0
        if self.behind is None:
            self.behind = batch.first
        self.queue.append(batch)
        self.records += len(batch.lines)
        self.bytes += batch.nbytes
        wake = self.wake
        if not wake.is_set():
            wake.set()
        if self.records <= self.max_records and self.bytes <= self.max_bytes:
            return 0
        if self.policy == "disconnect":
            self.close("slow")
            return 0
        return self.drop_oldest(self.max_records, self.max_bytes)

    def drop_oldest(
        self,
        max_records: int,
        max_bytes: int,
        *,
        tails: dict[int, Batch] | None = None,
    ) -> int:
        """Drop the oldest queued records until within the bounds; returns how
        many. With `tails` (the memory budget's cut): whole batches only, and
        of the newest batch its last record, shared through `tails` (keyed by
        id(batch)) among the subscribers cut in one pass, never a copy each."""
        # Whole batches first, in a tight loop: a client that reads nothing
        # has one batch dropped per publish, for every such client, and this
        # is most of what it costs the loop.
        queue = self.queue
        records, nbytes = self.records, self.bytes
        dropped = 0
        lost_last = -1
        while (records > max_records or nbytes > max_bytes) and (
            len(queue) > 1 or (tails is None and records - max_records >= len(queue[0].lines))
        ):
            head = queue.popleft()
            n = len(head.lines)
            records -= n
            nbytes -= head.nbytes
            dropped += n
            lost_last = head.positions[-1]
            if not queue:
                break
        self.records, self.bytes = records, nbytes
        if dropped:
            self._note_gap(dropped, lost_last)
        if not queue or (records <= max_records and nbytes <= max_bytes):
            pass
        elif tails is None:
            dropped += self._trim_head(max_records, max_bytes)
        elif len(queue[0].lines) > 1:
            # the newest record stays, whatever the level: a gap marker waits
            # for the record after it, and a stream that keeps up must go on
            head = queue[0]
            tail = tails.get(id(head))
            if tail is None:
                tail = tails[id(head)] = head.slice(len(head.lines) - 1)
            queue[0] = tail
            n = len(head.lines) - 1
            self.records -= n
            self.bytes -= head.nbytes - tail.nbytes
            self._note_gap(n, head.positions[-2])
            dropped += n
        if not queue and self.closed is None:
            self.wake.clear()  # nothing to write until the next record
        self.dropped += dropped
        return dropped

    def _trim_head(self, max_records: int, max_bytes: int) -> int:
        """Cut the only queued batch from its front, down to the bounds."""
        head = self.queue[0]
        over_r = self.records - max_records
        over_b = self.bytes - max_bytes
        if over_b >= head.nbytes:  # a record bigger than queue_bytes: nothing stays
            self.queue.popleft()
            n, nb, lost_last = len(head), head.nbytes, head.last
        else:
            cut = max(over_r, _bytes_prefix(head, over_b))
            rest = head.slice(cut)
            if rest.lines:
                self.queue[0] = rest
            else:
                self.queue.popleft()
            n, nb, lost_last = cut, head.nbytes - rest.nbytes, head.positions[cut - 1]
        self.records -= n
        self.bytes -= nb
        self._note_gap(n, lost_last)
        return n

    def _note_gap(self, n: int, lost_last: int) -> None:
        if self.gap is None:
            # after_id: the last record this subscriber will have got
            self.gap = Gap("slow_subscriber", self.last_id, 0)
        self.gap.dropped = (self.gap.dropped or 0) + n
        self.last_id = lost_last

    def take(self, max_bytes: int | None = None) -> tuple[Gap | None, list[Batch]]:
        """What is queued, up to about `max_bytes` (at least one record), and
        the gap to report before it.

        The bound is what one write may copy: a subscriber that lagged by a
        whole queue must not turn it into one 16 MiB buffer of its own.
        """
        gap, self.gap = self.gap, None
        batches: list[Batch] = []
        size = 0
        queue = self.queue
        while queue and (max_bytes is None or size < max_bytes):
            head = queue[0]
            if max_bytes is not None and size + head.nbytes > max_bytes:
                cut = max(1, _bytes_prefix(head, max_bytes - size))
                if cut < len(head):
                    part, queue[0] = head.slice(0, cut), head.slice(cut)
                    batches.append(part)
                    size += part.nbytes
                    self.records -= cut
                    break
            queue.popleft()
            batches.append(head)
            size += head.nbytes
            self.records -= len(head)
        self.bytes -= size
        if not queue:
            self.records = self.bytes = 0
            self.wake.clear()
        self.behind = queue[0].first if queue else None
        if batches:
            self.last_id = max(self.last_id, batches[-1].last)
            self.delivered += sum(map(len, batches))
        return gap, batches

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self.wake.set()


def _bytes_prefix(batch: Batch, nbytes: int) -> int:
    """How many leading records of `batch` add up to at least `nbytes`."""
    total = 0
    for i, line in enumerate(batch.lines):
        if total >= nbytes:
            return i
        total += len(line)
    return len(batch.lines)


class Hub:
    """The subscribers, the history, and the counters the metrics export."""

    def __init__(
        self,
        *,
        queue_records: int,
        queue_bytes: int,
        policy: str,
        history_records: int,
        history_bytes: int,
        budget_bytes: int = 0,
    ) -> None:
        self.queue_records = queue_records
        self.budget_bytes = budget_bytes  # all queues together; 0: no budget
        self.queue_bytes = queue_bytes
        self.policy = policy
        self.history = History(history_records, history_bytes)
        self.subscribers: dict[int, Subscriber] = {}
        self.dropped: Counter[str] = Counter({t: 0 for t in TRANSPORTS})
        self.disconnects: Counter[str] = Counter()
        self.budget_dropped = 0  # of `dropped`: records dropped to keep the budget
        self.queued_bytes = 0  # all queues together, as of the last publish
        self._ids = count(1)
        # called with every published batch, after the subscribers (the
        # forwarder): each must return at once, never wait
        self.taps: list[Callable[[Batch], None]] = []

    def publish(self, batch: Batch) -> None:
        self.history.append(batch)
        total = 0
        for sub in list(self.subscribers.values()):
            if sub.closed is None:
                try:
                    dropped = sub.push(batch)
                except Exception:
                    # a bug in one subscriber's path must not cost the others
                    # their records, nor stop the consumer that called us
                    log.exception("subscriber failed", extra={"event": "subscriber_error"})
                    self._disconnect(sub, "error")
                    continue
                if dropped:
                    self.dropped[sub.transport] += dropped
                elif sub.closed == "slow":
                    self._slow(sub)
                total += sub.bytes
        if self.budget_bytes and total > self.budget_bytes:
            total = self._keep_budget(total)
        self.queued_bytes = total
        for tap in self.taps:
            tap(batch)

    def _keep_budget(self, total: int) -> int:
        """Bring the queues back within the budget, the biggest laggards first.

        Queued batches are shared between subscribers, so this counts each
        queue as if it were its own: an upper bound on what they hold.

        The biggest laggard is the one furthest behind (`behind`, the first
        position it has not got), not the one with the biggest queue: a
        client that reads nothing has its queue held at its own bound by
        drop-oldest, and right after a cut it is small, while a client that
        keeps up but paused for half a second can hold more. Cut by size, the
        two take turns losing records; cut by how far behind, the one that
        reads nothing stays first in line (a cut does not move `behind`),
        and a subscriber that keeps up loses records to the budget only when
        all that lag further are cut already. Each is cut to its newest
        record, so that one cut pays for many publishes.
        """
        subs = sorted(
            (s for s in self.subscribers.values() if s.closed is None and s.bytes),
            key=lambda s: s.queue[0].first if s.behind is None else s.behind,
        )
        if self.policy == "disconnect":
            for sub in subs:
                if total <= self.budget_bytes * 3 // 4:
                    break
                total -= sub.bytes
                sub.close("slow")
                self._slow(sub, budget=True)
            return total
        # down to 3/4 of the budget, not to it: this way one pass over the
        # subscribers pays for many publishes
        tails: dict[int, Batch] = {}
        for sub in subs:
            if total <= self.budget_bytes * 3 // 4:
                break
            before = sub.bytes
            # whole batches, and of the newest its last record (shared through
            # tails): a partial cut would copy a batch for every subscriber cut
            dropped = sub.drop_oldest(0, 0, tails=tails)
            total -= before - sub.bytes
            self.dropped[sub.transport] += dropped
            self.budget_dropped += dropped
        return total

    def _slow(self, sub: Subscriber, *, budget: bool = False) -> None:
        log.warning(
            "subscriber too slow: disconnected",
            extra={
                "event": "subscriber_slow",
                "subscriber": sub.id,
                "cause": "subscribers.memory_budget" if budget else "queue bounds",
            },
        )
        if sub.writer is not None:
            sub.writer.cancel()

    def end(self, sub: Subscriber, reason: str, grace: float = 2.0) -> None:
        """End `sub`'s stream for `reason` (a token that expired or was revoked):
        its writer sends the end marker and stops; one stuck in a write to a
        client that reads nothing is cancelled after `grace` seconds, since
        a closed subscriber's queue no longer grows into the slow policy."""
        if sub.closed is not None:
            return
        sub.close(reason)
        sub.wake.set()

        def unstick() -> None:
            if sub.writer is not None and not sub.writer.done():
                sub.writer.cancel()

        asyncio.get_running_loop().call_later(grace, unstick)

    def _disconnect(self, sub: Subscriber, reason: str) -> None:
        sub.close(reason)
        if sub.writer is not None:
            sub.writer.cancel()

    def subscribe(
        self,
        transport: str,
        peer: str,
        flt: Filter | None,
        after: int | None,
        after_epoch: str | None = None,
        *,
        scope: Filter | None = None,
        principal: Any = None,
    ) -> Subscriber:
        """A new live subscriber; with `after`, it first replays the history past
        that id. `after_epoch`: `after` is an id of an earlier run (a restart),
        so everything this run has is new to it."""
        sub = Subscriber(
            next(self._ids),
            transport,
            peer,
            flt,
            self.queue_records,
            self.queue_bytes,
            self.policy,
            scope,
            principal,
        )
        sub.last_id = self.history.last
        whole: Gap | None = None  # a gap after which all there is is replayed
        if after is not None and after_epoch is not None:
            # positions started again at 0: whatever the old id, the client
            # has none of this run's records
            whole = Gap("restart", after, after_epoch=after_epoch)
        elif after is not None and after > self.history.last:
            # an id from before a restart (positions start again at 0), or
            # made up: say so
            whole = Gap("unknown_id", after)
        if whole is not None:
            if self.history.last < 0:  # nothing to replay: before the first record
                sub.gap = whole
            else:
                sub.replay_gap = whole
                sub.cursor = -1
                sub.replay_until = self.history.last
            sub.wake.set()
        elif after is not None and after < self.history.last:
            sub.cursor = after
            sub.replay_until = self.history.last
            sub.wake.set()
        self.subscribers[sub.id] = sub
        log.info(
            "subscriber connected",
            extra={
                "event": "subscriber_connect",
                "subscriber": sub.id,
                "transport": transport,
                "peer": peer,
                "filter": flt.spec if flt else None,
                "after": after,
                "after_epoch": after_epoch,
                **({"token": principal.name} if principal is not None else {}),
            },
        )
        return sub

    def replay(
        self, sub: Subscriber, limit: int, max_bytes: int | None = None
    ) -> Iterator[tuple[Gap | None, list[Batch]]]:
        """The next piece of `sub`'s history replay (nothing once it has caught
        up): at most `limit` records read, and about `max_bytes` to write.

        A piece spans as many history batches as that allows: batches are as
        small as the consumer's passes (tens of records at a high rate), and
        a replay one batch per write would fall behind the live stream and
        then off the end of the history."""
        if sub.replay_until < 0:
            return
        gap, sub.replay_gap = sub.replay_gap, None
        parts: list[Batch] = []
        scanned = size = 0
        while scanned < limit and (max_bytes is None or size < max_bytes):
            part, lost = self.history.read(sub.cursor, sub.replay_until, limit - scanned)
            # only the first read can find records gone: nothing is
            # published (so nothing evicted) while this runs
            if lost and gap is None and not parts:
                gap = Gap("history", sub.cursor)
            if part is None:
                sub.replay_until = -1  # caught up: live records from here
                break
            if max_bytes is not None and size + part.nbytes > max_bytes:
                part = part.slice(0, max(1, _bytes_prefix(part, max_bytes - size)))
            scanned += len(part)
            sub.cursor = part.last
            if part.last >= sub.replay_until:
                sub.replay_until = -1
            if sub.scope is not None:
                part = sub.scope.apply(part)
            if sub.filter is not None:
                part = sub.filter.apply(part)
            if part.lines:
                parts.append(part)
                size += part.nbytes
                sub.delivered += len(part)
            if sub.replay_until < 0:
                break
        if gap is not None and not parts:
            # nothing here passes the filter (or nothing is left): the marker
            # waits for the record after it, so that it can say where the
            # stream goes on
            if sub.replay_until >= 0:
                sub.replay_gap = gap
            elif sub.gap is None:
                sub.gap = gap  # the live queue's first record gives next_id
            else:
                yield gap, parts
            return
        yield gap, parts

    def unsubscribe(self, sub: Subscriber, reason: str) -> None:
        sub.close(reason)
        if self.subscribers.pop(sub.id, None) is None:
            return
        self.disconnects[sub.closed or reason] += 1
        log.info(
            "subscriber disconnected",
            extra={
                "event": "subscriber_disconnect",
                "subscriber": sub.id,
                "transport": sub.transport,
                "peer": sub.peer,
                "reason": sub.closed,
                "delivered": sub.delivered,
                "dropped": sub.dropped,
            },
        )

    def close_all(self, reason: str) -> None:
        for sub in self.subscribers.values():
            sub.close(reason)

    def counts(self) -> Counter[str]:
        c: Counter[str] = Counter({t: 0 for t in TRANSPORTS})
        for sub in self.subscribers.values():
            c[sub.transport] += 1
        return c
