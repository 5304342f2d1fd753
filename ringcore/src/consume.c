/* SPDX-License-Identifier: MIT */
/*
 * The consumer side: draining committed records in order, as libbpf's
 * ringbuf_process_ring() does, the sleep protocol on the eventfd, and the
 * query values.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ringcore.h"

static inline struct rc_hdr *hdr_at(struct rc_ring *r, uint64_t pos)
{
	return (struct rc_hdr *)(r->data + (pos & r->mask));
}

/*
 * Every process that maps the ring can write some of its pages, so the
 * positions and headers read here are untrusted. Positions are 8-aligned and
 * the consumer is never more than one ring behind the producer (outside
 * overwrite mode); a record is never longer than the ring. Whatever breaks
 * that is reported as corruption instead of being walked.
 */
static int span_ok(struct rc_ring *r, uint64_t from, uint64_t to)
{
	return !((from | to) & 7) && from <= to && to - from <= r->mask + 1;
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/*
 * The record at cons is busy. In the kernel the verifier guarantees it will
 * be committed; between processes its producer may have died at any
 * instruction since reserving it. Once it has blocked the consumer for
 * abandon_ns, and its owner (named by pg_off) is gone, step over it: 1.
 * A live producer, however slow, is waited for: records stay in order and a
 * record is never reused under a producer that can still write it.
 */
static int abandon_if_dead(struct rc_ring *r, uint64_t cons,
			   struct rc_hdr *hdr)
{
	uint64_t now;

	if (!r->abandon_ns || !r->slots)
		return 0;
	now = mono_ns();
	if (r->stall_pos != cons || !r->stall_since) {
		r->stall_pos = cons;
		r->stall_since = now;
		return 0;
	}
	if (now - r->stall_since < r->abandon_ns)
		return 0;
	if (!rc_owner_dead(r, hdr->pg_off)) {
		r->stall_since = now; /* look again after another period */
		return 0;
	}
	r->stall_since = 0;
	return 1;
}

/* The record at *cons is busy: step over it if its producer is dead (1),
 * wait for it (0), or report a length that cannot be right (-1). */
static int step_over_dead(struct rc_ring *r, uint64_t *cons, uint64_t prod,
			  struct rc_hdr *hdr, uint32_t len)
{
	uint64_t rec;

	if (!abandon_if_dead(r, *cons, hdr))
		return 0;
	rec = rc_record_len(len & ~RC_BUSY_BIT);
	if (rec > prod - *cons)
		return -1;
	atomic_fetch_add_explicit(&r->cons->abandoned_records, 1,
				  memory_order_relaxed);
	atomic_fetch_add_explicit(&r->cons->abandoned_bytes, rec,
				  memory_order_relaxed);
	*cons += rec;
	return 1;
}

/*
 * Overwrite mode: producers may overwrite a record while the consumer reads
 * it, so each record is copied out, then checked seqlock-style against
 * overwrite_pos, and handed on only if it was intact throughout the copy.
 * The consumer skips ahead to overwrite_pos whenever it fell behind it,
 * counting the bytes it never saw.
 */
static int64_t consume_overwrite(struct rc_ring *r, rc_sample_fn fn, void *ctx,
				 uint64_t max)
{
	uint64_t cons, prod, over;
	int64_t cnt = 0;
	int corrupt = 0;

	if (!r->scratch && !(r->scratch = malloc(r->mask + 1)))
		return -2;
	cons = atomic_load_explicit(&r->cons->consumer_pos,
				    memory_order_relaxed);
	/* as in rc_consume() */
	prod = atomic_load_explicit(&r->prod->producer_pos,
				    memory_order_acquire);
	while (cons < prod) {
		struct rc_hdr *hdr = hdr_at(r, cons);
		uint32_t len, size;
		uint64_t rec;
		int stop = 0;

		/* Pairs with the store-release in make_room(): the
		 * producer_pos read after this one is at least over. */
		over = atomic_load_explicit(&r->prod->overwrite_pos,
					    memory_order_acquire);
		if ((over & 7) || (cons & 7)) {
			corrupt = 1;
			break;
		}
		if (over > prod) {
			/* Producers lapped the prod this drain started
			 * from (the callback can take that long): read it
			 * again, then over again at the top, so that over
			 * stays the newer of the two, as the span check
			 * below needs. Only a corrupt over is still ahead. */
			prod = atomic_load_explicit(&r->prod->producer_pos,
						    memory_order_acquire);
			if (over > prod) {
				corrupt = 1;
				break;
			}
			continue;
		}
		if (cons < over) {
			atomic_fetch_add_explicit(&r->cons->overwritten_bytes,
						  over - cons,
						  memory_order_relaxed);
			cons = over;
			continue;
		}
		if (prod - cons > r->mask + 1) {
			/* a producer can be at most a ring ahead of the
			 * oldest intact record */
			corrupt = 1;
			break;
		}
		/* as in rc_consume() */
		len = atomic_load_explicit(&hdr->len, memory_order_acquire);
		if (len & RC_BUSY_BIT) {
			int step = step_over_dead(r, &cons, prod, hdr, len);

			if (step < 0)
				corrupt = 1;
			if (step <= 0)
				break;
			continue;
		}
		size = len & ~RC_DISCARD_BIT;
		rec = rc_record_len(size);
		/* never copy more than the record's share of the ring: the
		 * scratch buffer is one ring long */
		if (rec <= prod - cons)
			memcpy(r->scratch, (unsigned char *)hdr + RC_HDR_SZ,
			       size);
		/* Seqlock reader's fence: pairs with the release fence in
		 * make_room(). If the copy (or the header) saw any byte a
		 * producer wrote after taking this space, this load sees the
		 * overwrite_pos that gave the space away. */
		atomic_thread_fence(memory_order_acquire);
		if (atomic_load_explicit(&r->prod->overwrite_pos,
					 memory_order_relaxed) > cons)
			continue; /* torn: skip ahead at the top */
		if (rec > prod - cons) {
			corrupt = 1;
			break;
		}
		if (!(len & RC_DISCARD_BIT)) {
			stop = fn(ctx, cons, r->scratch, size);
			cnt++;
			if (stop == RC_SAMPLE_ABORT)
				return cnt;
		}
		cons += rec;
		if (stop || (max && (uint64_t)cnt >= max))
			break;
	}
	/* as in rc_consume() */
	atomic_store_explicit(&r->cons->consumer_pos, cons,
			      memory_order_release);
	return corrupt ? -1 : cnt;
}

int64_t rc_consume(struct rc_ring *r, rc_sample_fn fn, void *ctx, uint64_t max)
{
	/* Give space back to producers in quarters of the ring while a long
	 * drain goes on, rather than once at its end. */
	uint64_t publish_every = (r->mask + 1) / 4;
	uint64_t cons, prod, published;
	int64_t cnt = 0;
	int corrupt = 0;

	if (r->overwrite)
		return consume_overwrite(r, fn, ctx, max);
	/* the consumer is the only writer of consumer_pos */
	cons = atomic_load_explicit(&r->cons->consumer_pos,
				    memory_order_relaxed);
	published = cons;
	/* Pairs with the store-release of producer_pos in rc_reserve(): the
	 * busy headers of all records up to prod are visible. */
	prod = atomic_load_explicit(&r->prod->producer_pos,
				    memory_order_acquire);
	if (!span_ok(r, cons, prod))
		return -1;
	while (cons < prod) {
		struct rc_hdr *hdr = hdr_at(r, cons);
		/* Pairs with the store-release in commit(): once BUSY reads
		 * clear, the payload is complete. */
		uint32_t len = atomic_load_explicit(&hdr->len,
						    memory_order_acquire);
		uint32_t size;
		uint64_t rec;
		int stop = 0;

		if (len & RC_BUSY_BIT) {
			int step = step_over_dead(r, &cons, prod, hdr, len);

			if (step < 0)
				corrupt = 1;
			if (step <= 0)
				break;
			continue;
		}
		size = len & ~RC_DISCARD_BIT;
		rec = rc_record_len(size);
		if (rec > prod - cons) {
			corrupt = 1;
			break;
		}
		if (!(len & RC_DISCARD_BIT)) {
			stop = fn(ctx, cons, (unsigned char *)hdr + RC_HDR_SZ,
				  size);
			cnt++;
			/* a forked child: a store here could move the
			 * parent's consumer_pos back, and records would be
			 * read twice */
			if (stop == RC_SAMPLE_ABORT)
				return cnt;
		}
		cons += rec;
		if (cons - published >= publish_every) {
			/* as below */
			atomic_store_explicit(&r->cons->consumer_pos, cons,
					      memory_order_release);
			published = cons;
		}
		if (stop || (max && (uint64_t)cnt >= max))
			break;
	}
	/* Pairs with the load-acquire of consumer_pos in rc_reserve(): all
	 * reads of the consumed records happen before a producer can see the
	 * space as free and overwrite it. */
	if (cons != published)
		atomic_store_explicit(&r->cons->consumer_pos, cons,
				      memory_order_release);
	return corrupt ? -1 : cnt;
}

int rc_ready(struct rc_ring *r)
{
	uint64_t cons = atomic_load_explicit(&r->cons->consumer_pos,
					     memory_order_relaxed);
	/* as in rc_consume() */
	uint64_t prod = atomic_load_explicit(&r->prod->producer_pos,
					     memory_order_acquire);

	/* Corrupt positions (see span_ok()) read as "ready", so that the
	 * consume call that follows reports them. */
	if ((cons | prod) & 7)
		return 1;
	if (r->overwrite) {
		uint64_t over = atomic_load_explicit(&r->prod->overwrite_pos,
						     memory_order_acquire);

		if (over & 7)
			return 1;
		if (over > cons)
			cons = over;
	}
	if (cons >= prod)
		return 0;
	if (!r->overwrite && !span_ok(r, cons, prod))
		return 1;
	/* as in rc_consume() */
	return !(atomic_load_explicit(&hdr_at(r, cons)->len,
				      memory_order_acquire) &
		 RC_BUSY_BIT);
}

uint64_t rc_stall_recheck_ns(struct rc_ring *r)
{
	uint64_t cons, prod, now, due;

	if (!r->abandon_ns || !r->slots)
		return 0;
	cons = atomic_load_explicit(&r->cons->consumer_pos,
				    memory_order_relaxed);
	/* as in rc_consume() */
	prod = atomic_load_explicit(&r->prod->producer_pos,
				    memory_order_acquire);
	if ((cons | prod) & 7)
		return 0; /* corrupt: rc_consume() reports it */
	if (cons >= prod || !(atomic_load_explicit(&hdr_at(r, cons)->len,
						   memory_order_acquire) &
			      RC_BUSY_BIT))
		return 0;
	if (r->stall_pos != cons || !r->stall_since)
		return r->abandon_ns;
	now = mono_ns();
	due = r->stall_since + r->abandon_ns;
	return due > now ? due - now : 1;
}

int rc_prepare_wait(struct rc_ring *r)
{
	uint64_t junk;

	/* Clear wakeups sent for earlier sleeps; whatever they announced is
	 * seen by the check below. */
	if (read(r->event_fd, &junk, sizeof(junk)) < 0) {
		/* EAGAIN: nothing pending */
	}
	atomic_store_explicit(&r->cons->waiting, 1, memory_order_relaxed);
	/* Pairs with the fence in notify() (produce.c): either a producer's
	 * commit is visible to rc_ready() below, or that producer sees
	 * waiting == 1 and writes the eventfd. This is the fence whose absence
	 * loses wakeups: without it the store of waiting may be ordered after
	 * the loads of rc_ready(), and both sides miss each other. */
	atomic_thread_fence(memory_order_seq_cst);
	if (rc_ready(r)) {
		atomic_store_explicit(&r->cons->waiting, 0,
				      memory_order_relaxed);
		return 0;
	}
	return 1;
}

void rc_finish_wait(struct rc_ring *r)
{
	/* A producer may take the flag at the same time and send one more
	 * wakeup; rc_prepare_wait() clears it before the next sleep. */
	atomic_store_explicit(&r->cons->waiting, 0, memory_order_relaxed);
	atomic_fetch_add_explicit(&r->cons->wakeups_seen, 1,
				  memory_order_relaxed);
}

void rc_query(struct rc_ring *r, struct rc_query *q)
{
	/* Acquire, as ringbuf_avail_data_sz(): a snapshot for reporting, the
	 * two values may be momentarily out of step. */
	q->consumer_pos = atomic_load_explicit(&r->cons->consumer_pos,
					       memory_order_acquire);
	q->producer_pos = atomic_load_explicit(&r->prod->producer_pos,
					       memory_order_acquire);
	q->avail_data = q->producer_pos - q->consumer_pos;
	q->ring_size = r->mask + 1;
	q->overwrite_pos = q->overwritten_bytes = 0;
	if (r->overwrite) {
		uint64_t over = atomic_load_explicit(&r->prod->overwrite_pos,
						     memory_order_acquire);
		uint64_t seen = atomic_load_explicit(&r->cons->overwritten_bytes,
						     memory_order_relaxed);

		q->overwrite_pos = over;
		/* bytes lost so far: those the consumer skipped, and those
		 * already overwritten that it has not reached yet */
		q->overwritten_bytes = seen + (over > q->consumer_pos
						       ? over - q->consumer_pos
						       : 0);
		if (over > q->consumer_pos)
			q->avail_data = q->producer_pos > over
						? q->producer_pos - over
						: 0;
	}
	q->submitted = q->discarded = q->reserve_failures = q->wakeups = 0;
	q->abandoned_records = q->abandoned_bytes = 0;
	if (!r->slots)
		return; /* a kernel ring: its pages hold only the positions */
	q->abandoned_records = atomic_load_explicit(&r->cons->abandoned_records,
						    memory_order_relaxed);
	q->abandoned_bytes = atomic_load_explicit(&r->cons->abandoned_bytes,
						  memory_order_relaxed);
	for (uint32_t i = 0; i < RC_MAX_SLOTS; i++) {
		struct rc_slot *s = &r->slots[i];

		q->submitted += atomic_load_explicit(&s->submitted,
						     memory_order_relaxed);
		q->discarded += atomic_load_explicit(&s->discarded,
						     memory_order_relaxed);
		q->reserve_failures += atomic_load_explicit(
			&s->reserve_failures, memory_order_relaxed);
		q->wakeups += atomic_load_explicit(&s->wakeups,
						   memory_order_relaxed);
	}
}
