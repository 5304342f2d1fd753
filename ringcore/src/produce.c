/* SPDX-License-Identifier: MIT */
/*
 * The producer side: reservation in a short critical section, lock-free
 * commit, and the wakeup decision after commit. Follows
 * __bpf_ringbuf_reserve() and bpf_ringbuf_commit() in kernel/bpf/ringbuf.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <string.h>
#include <unistd.h>

#include "ringcore.h"

#define SPIN_TRIES 128

static inline struct rc_hdr *hdr_at(struct rc_ring *r, uint64_t pos)
{
	return (struct rc_hdr *)(r->data + (pos & r->mask));
}

static inline struct rc_hdr *hdr_of(void *sample)
{
	return (struct rc_hdr *)((unsigned char *)sample - RC_HDR_SZ);
}

/*
 * The critical section only advances positions and writes busy headers. If
 * a producer dies inside it, the robust mutex hands the lock to the next
 * producer with EOWNERDEAD, and what the dead one left is consistent:
 *  - died before storing next_pos: the header it may have written lies past
 *    next_pos, where nobody reads, and is overwritten next;
 *  - died after: its record is reserved (next_pos, and producer_pos if it got
 *    that far, are past it; the next reservation publishes producer_pos) and
 *    stays busy, exactly as for a producer dead between reserve and submit,
 *    which the consumer must deal with anyway.
 * pending_pos is a single aligned store of a value recomputed from headers.
 * So marking the mutex consistent again is all the repair there is.
 */
static void ring_lock(struct rc_ring *r)
{
	pthread_mutex_t *lock = &r->prod->lock;
	int err;

	/* The section is a few dozen instructions: spin a little before
	 * sleeping in the kernel. */
	for (int i = 0; i < SPIN_TRIES; i++) {
		err = pthread_mutex_trylock(lock);
		if (err == 0)
			return;
		if (err == EOWNERDEAD)
			goto owner_died;
		rc_cpu_relax();
	}
	err = pthread_mutex_lock(lock);
	if (err != EOWNERDEAD)
		return;
owner_died:
	pthread_mutex_consistent(lock);
}

static inline void ring_unlock(struct rc_ring *r)
{
	pthread_mutex_unlock(&r->prod->lock);
}

static bool pid_is_dead(uint32_t pid)
{
	return !rc_pid_alive(pid);
}

static bool claim(struct rc_slot *s, uint32_t expected, uint32_t pid)
{
	/* Acquire on success pairs with the release store of pid = 0 in
	 * rc_release_slot(): the counters, which count() updates without a
	 * read-modify-write, are read as the previous owner left them. (A
	 * slot taken from a dead owner is ordered by its exit and the
	 * kill()/proc check that saw it.) */
	return atomic_compare_exchange_strong_explicit(
		&s->pid, &expected, pid, memory_order_acquire,
		memory_order_relaxed);
}

/*
 * A slot belongs to one process. A child forked with the handle open must
 * claim its own: it is another writer of the counters (count() relies on
 * one) and another owner for the dead-producer checks. The binding's
 * after-fork hook forgets the parent's slot, but a fork that runs no Python
 * hooks (ctypes, a C library) does not call it, so every fork bumps this
 * process-wide epoch and a slot claimed under an older one is stale.
 */
unsigned rc_fork_epoch;
static pthread_once_t fork_hook_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
	rc_fork_epoch++;
}

static void add_fork_hook(void)
{
	if (pthread_atfork(NULL, NULL, on_fork_child) != 0) {
		/* ENOMEM only; the binding's own hook still covers
		 * os.fork() and multiprocessing */
	}
}

void rc_watch_forks(void)
{
	pthread_once(&fork_hook_once, add_fork_hook);
}

struct rc_slot *rc_claim_slot(struct rc_ring *r)
{
	uint32_t pid, i;

	rc_watch_forks();
	r->slot_epoch = rc_fork_epoch;
	pid = (uint32_t)getpid();
	for (i = 1; i < RC_MAX_SLOTS; i++)
		if (claim(&r->slots[i], 0, pid))
			goto found;
	/* Take over the slot of a process that exited without releasing it;
	 * its counters stay in the totals and go on counting for us. */
	for (i = 1; i < RC_MAX_SLOTS; i++) {
		uint32_t old = atomic_load_explicit(&r->slots[i].pid,
						    memory_order_relaxed);
		if (old && old != pid && pid_is_dead(old) &&
		    claim(&r->slots[i], old, pid))
			goto found;
	}
	i = 0; /* all taken by live processes: share slot 0 */
found:
	r->slot_idx = i;
	r->slot = &r->slots[i];
	/* A new generation per claim: records this claim reserves carry it,
	 * so they are told apart from records of the slot's earlier owners.
	 * Slot 0 is shared and keeps generation 0. */
	r->pg_off = RC_PG_OFF(i, i ? (atomic_fetch_add_explicit(
					      &r->slot->gen, 1,
					      memory_order_relaxed) + 1) &
					     0xffffff
				   : 0);
	return r->slot;
}

void rc_forget_slot(struct rc_ring *r)
{
	r->slot = NULL;
	r->slot_idx = 0;
	r->pg_off = 0;
}

void rc_release_slot(struct rc_ring *r)
{
	/* a slot claimed before a fork is the parent's to give back */
	if (r->slot && r->slot_idx && r->slot_epoch == rc_fork_epoch)
		/* Pairs with the acquire of a successful claim(): the next
		 * owner's counts go on from our last ones. */
		atomic_store_explicit(&r->slot->pid, 0, memory_order_release);
	rc_forget_slot(r);
}

/*
 * Add to one of this process's slot counters. An owned slot has one writer,
 * its process, using the handle from one thread at a time (the binding holds
 * the GIL; a C caller must do the same, see struct rc_ring), and owners
 * follow each other in order (claim()), so a plain load and store is
 * enough; a locked add would also drain the store buffer, the record just
 * copied, on every call. Readers (rc_query()) load the
 * counters relaxed and see each value whole either way. Slot 0 is shared by
 * the processes that found no slot of their own: there, an atomic add.
 */
static inline void count(struct rc_ring *r, _Atomic uint64_t *c, uint64_t n)
{
	if (r->slot_idx)
		atomic_store_explicit(c, atomic_load_explicit(
						 c, memory_order_relaxed) + n,
				      memory_order_relaxed);
	else
		atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

void rc_count_failures(struct rc_ring *r, uint64_t n)
{
	count(r, &rc_my_slot(r)->reserve_failures, n);
}

int rc_owner_dead(struct rc_ring *r, uint32_t pg_off)
{
	uint32_t idx = pg_off & ((1U << RC_SLOT_BITS) - 1);
	uint32_t gen = pg_off >> RC_SLOT_BITS;
	struct rc_slot *s = &r->slots[idx];
	uint32_t pid;

	/* Slot 0 is shared by processes that found no slot of their own:
	 * it does not tell who reserved the record, so never presume. */
	if (idx == 0)
		return 0;
	/* the slot has been claimed again since: its owner then was gone */
	if ((atomic_load_explicit(&s->gen, memory_order_relaxed) & 0xffffff) !=
	    gen)
		return 1;
	pid = atomic_load_explicit(&s->pid, memory_order_relaxed);
	return pid == 0 || pid_is_dead(pid);
}

/* a position that can be a record boundary at or behind prod_pos */
static bool pos_ok(struct rc_ring *r, uint64_t pos, uint64_t prod_pos)
{
	return !(pos & 7) && pos <= prod_pos && prod_pos - pos <= r->mask + 1;
}

/*
 * Walk pending_pos forward over committed records, as the kernel does since
 * 2024: a new reservation may not overrun a record that is still busy, even
 * when the consumer position says there is room (the consumer stops at the
 * busy record, but a producer that lapped it would overwrite it).
 * Called with the lock held.
 */
static uint64_t advance_pending(struct rc_ring *r, uint64_t prod_pos)
{
	uint64_t pend = r->prod->pending_pos;
	bool pend_ok = pos_ok(r, pend, prod_pos);

	/* Nothing before the consumer position is busy but records of dead
	 * producers the consumer stepped over (see the loop below), so the
	 * walk starts there when it is ahead. Without this, a consumer that
	 * keeps up leaves a whole lap of headers to walk, each one a cache
	 * miss, once per lap. Overwrite mode walks on every reservation, a
	 * record or two, and does not pay for a fresh consumer_pos unless
	 * pending_pos is unusable: the cached one is only ever behind.
	 * Pairs with the consumer's store-release of consumer_pos in
	 * rc_consume(). */
	if (!r->overwrite || !pend_ok)
		r->cached_cons = atomic_load_explicit(&r->cons->consumer_pos,
						      memory_order_acquire);
	/* Untrusted memory (see span_ok() in consume.c): a pending_pos that
	 * cannot be right is not walked from. The consumer position is a
	 * record boundary with nothing busy behind it: restart there, or
	 * leave pend as it is and let the room check refuse. */
	if (pos_ok(r, r->cached_cons, prod_pos) &&
	    (!pend_ok || r->cached_cons > pend))
		pend = r->cached_cons;
	else if (!pend_ok)
		return pend;
	while (pend < prod_pos) {
		/* Relaxed: only the length is used here, to step over the
		 * record; the payload is never read. */
		uint32_t len = atomic_load_explicit(&hdr_at(r, pend)->len,
						    memory_order_relaxed);
		uint64_t rec;

		if (len & RC_BUSY_BIT) {
			/* The consumer steps over a busy record only once its
			 * producer is dead (rc_consume()); nobody will write it
			 * any more, so it no longer holds producers back. */
			if (pend >= r->cached_cons)
				r->cached_cons = atomic_load_explicit(
					&r->cons->consumer_pos,
					memory_order_acquire);
			if (pend >= r->cached_cons)
				break;
		}
		rec = rc_record_len(len & ~(RC_BUSY_BIT | RC_DISCARD_BIT));
		if (rec > prod_pos - pend)
			break; /* a corrupt length: never walk past prod_pos */
		pend += rec;
	}
	r->prod->pending_pos = pend;
	return pend;
}

/*
 * The kernel's room check, with the lock held: the producer position may not
 * run more than size - 1 ahead of the consumer, nor of the oldest busy
 * record. Both bounds only grow, so the cached ones are tried first and
 * refreshed only when they refuse: the decision is the one fresh values
 * give, without touching the consumer's cache line or walking headers on
 * every reservation.
 */
/*
 * Overwrite mode (BPF_F_RB_OVERWRITE): the consumer does not bound producers,
 * only busy records do (checked by the caller); move overwrite_pos over the
 * oldest records, all committed, until the new one fits. Lock held.
 */
static void make_room(struct rc_ring *r, uint64_t new_prod, uint64_t pend)
{
	uint64_t over = atomic_load_explicit(&r->prod->overwrite_pos,
					     memory_order_relaxed);
	uint64_t start = over;

	/* Untrusted memory: an overwrite_pos that cannot be right, or a
	 * length that steps past the oldest busy record, ends the walk at
	 * pend, which the caller checked leaves room and which is a record
	 * boundary. Everything before it counts as overwritten. */
	if ((over & 7) || over > pend || new_prod - over > 2 * (r->mask + 1))
		over = pend;
	while (new_prod - over > r->mask) {
		uint32_t len = atomic_load_explicit(&hdr_at(r, over)->len,
						    memory_order_relaxed);
		uint64_t rec = rc_record_len(len & ~(RC_BUSY_BIT |
						     RC_DISCARD_BIT));

		if (rec > pend - over) {
			over = pend;
			break;
		}
		over += rec;
	}
	if (over == start)
		return;
	/* Pairs with the load-acquire in consume_overwrite(): a consumer
	 * that sees this over then reads a producer_pos of at least pend,
	 * which the lock ordered before this store. */
	atomic_store_explicit(&r->prod->overwrite_pos, over,
			      memory_order_release);
	/* The space given up is written next (header now, payload after
	 * the lock is dropped). Seqlock writer's fence: pairs with the
	 * acquire fence in consume_overwrite() after it copies a record, so a
	 * consumer that read any of those new bytes also reads the new
	 * overwrite_pos, and drops its torn copy. */
	atomic_thread_fence(memory_order_release);
}

static bool room_for(struct rc_ring *r, uint64_t prod, uint64_t new_prod)
{
	if (!r->overwrite && new_prod - r->cached_cons > r->mask) {
		/* Pairs with the consumer's store-release of consumer_pos in
		 * rc_consume(): once we see it past a record, the consumer is
		 * done reading that record and its space may be reused. */
		r->cached_cons = atomic_load_explicit(&r->cons->consumer_pos,
						      memory_order_acquire);
		if (new_prod - r->cached_cons > r->mask)
			return false;
	}
	if (r->overwrite) {
		/* make_room() is bounded by the oldest busy record: it must
		 * be current, not the lazily kept value */
		uint64_t pend = advance_pending(r, prod);

		if (new_prod - pend > r->mask)
			return false;
		make_room(r, new_prod, pend);
		return true;
	}
	if (new_prod - r->prod->pending_pos > r->mask &&
	    new_prod - advance_pending(r, prod) > r->mask)
		return false;
	return true;
}

static inline bool aligned(uint64_t pos)
{
	return !(pos & 7);
}

/* Where the next record goes. next_pos is untrusted memory like the rest:
 * a value that is not a record boundary falls back to the published
 * producer_pos, and if that is no better the reservation is refused
 * (the caller checks aligned()) rather than writing a misaligned header. */
static inline uint64_t reserve_start(struct rc_ring *r)
{
	uint64_t prod = r->prod->next_pos;

	if (aligned(prod))
		return prod;
	return atomic_load_explicit(&r->prod->producer_pos,
				    memory_order_relaxed);
}

static inline void write_busy_hdr(struct rc_ring *r, uint64_t pos,
				  uint32_t size)
{
	struct rc_hdr *hdr = hdr_at(r, pos);

	/* The owner first: a producer that dies between the two stores must
	 * not leave a busy length naming an earlier lap's owner. */
	hdr->pg_off = r->pg_off;
	/* Relaxed: published by the release store of producer_pos that
	 * follows (ours, or the next holder's if we die before it). */
	atomic_store_explicit(&hdr->len, size | RC_BUSY_BIT,
			      memory_order_relaxed);
}

void *rc_reserve(struct rc_ring *r, uint32_t size, uint64_t *pos)
{
	struct rc_slot *slot = rc_my_slot(r);
	uint64_t len = rc_record_len(size);
	uint64_t prod;

	ring_lock(r);
	prod = reserve_start(r);
	if (!aligned(prod) || !room_for(r, prod, prod + len)) {
		ring_unlock(r);
		count(r, &slot->reserve_failures, 1);
		return NULL;
	}
	write_busy_hdr(r, prod, size);
	r->prod->next_pos = prod + len;
	/* Pairs with the consumer's load-acquire of producer_pos: a consumer
	 * that sees the new position also sees the busy header. */
	atomic_store_explicit(&r->prod->producer_pos, prod + len,
			      memory_order_release);
	ring_unlock(r);
	if (pos)
		*pos = prod;
	return (unsigned char *)hdr_at(r, prod) + RC_HDR_SZ;
}

size_t rc_reserve_batch(struct rc_ring *r, const uint32_t *sizes, size_t n,
			void **out, uint64_t *first_pos)
{
	struct rc_slot *slot = rc_my_slot(r);
	uint64_t prod, pos;
	size_t i;

	if (n == 0)
		return 0;
	ring_lock(r);
	prod = reserve_start(r);
	pos = prod;
	if (first_pos)
		*first_pos = prod;
	for (i = 0; i < n; i++) {
		uint64_t len = rc_record_len(sizes[i]);

		/* pending_pos is walked from the batch start: the records
		 * of this batch are busy, it cannot pass them anyway */
		if (!aligned(prod) || !room_for(r, prod, pos + len))
			break;
		write_busy_hdr(r, pos, sizes[i]);
		out[i] = (unsigned char *)hdr_at(r, pos) + RC_HDR_SZ;
		pos += len;
	}
	if (pos != prod) {
		r->prod->next_pos = pos;
		/* as in rc_reserve() */
		atomic_store_explicit(&r->prod->producer_pos, pos,
				      memory_order_release);
	}
	ring_unlock(r);
	if (i < n)
		count(r, &slot->reserve_failures, n - i);
	return i;
}

static void signal_consumer(struct rc_ring *r)
{
	uint64_t one = 1;

	/* EAGAIN means the counter is saturated: the consumer is woken
	 * anyway. */
	if (write(r->event_fd, &one, sizeof(one)) == sizeof(one))
		count(r, &rc_my_slot(r)->wakeups, 1);
}

/*
 * The kernel wakes the consumer after a commit when the consumer position
 * equals the committed record's position: the consumer has caught up and
 * waits for exactly this record. A fast consumer is caught up nearly all the
 * time, so nearly every record costs a wakeup (irq_work + wake_up_all there,
 * an eventfd write here) although the consumer is busy, not asleep.
 *
 * ringcore keeps the kernel's rule and adds one condition: the consumer must
 * also have announced that it is going to sleep (cons->waiting, set in
 * rc_prepare_wait()), so a running consumer costs producers no system call and
 * a sleeping one gets one wakeup.
 *
 * [off, off + span) is the part of the data area the records just committed
 * occupy (offsets, so it may wrap). The consumer position always sits on a
 * record boundary, so for one record this is the kernel's equality test.
 */
static void notify(struct rc_ring *r, uint64_t off, uint64_t span,
		   unsigned flags)
{
	uint64_t cons;

	if ((flags & RC_NO_WAKEUP) && !(flags & RC_FORCE_WAKEUP))
		return;
	/* Pairs with the fence in rc_prepare_wait(). Either this fence comes
	 * first, and the consumer's check after its fence sees our commit
	 * (and the producer_pos store that came before it); or the consumer's
	 * fence comes first, and the loads below see waiting == 1 and the
	 * consumer_pos it stored before setting waiting. No lost wakeup. */
	atomic_thread_fence(memory_order_seq_cst);
	if (flags & RC_FORCE_WAKEUP) {
		signal_consumer(r);
		return;
	}
	if (!atomic_load_explicit(&r->cons->waiting, memory_order_relaxed))
		return;
	cons = atomic_load_explicit(&r->cons->consumer_pos,
				    memory_order_relaxed);
	if (((cons - off) & r->mask) >= span)
		return;
	/* Only the producer whose commit covers consumer_pos gets here, so a
	 * sleep costs one wakeup. The flag is the consumer's to clear:
	 * producers map its page read-only. */
	signal_consumer(r);
}

/* commit one record; returns its offset in the data area */
static uint64_t commit(struct rc_ring *r, void *sample, bool discard)
{
	struct rc_hdr *hdr = hdr_of(sample);
	/* our own header: nobody else writes it while it is busy */
	uint32_t new_len = atomic_load_explicit(&hdr->len,
						memory_order_relaxed) ^
			   RC_BUSY_BIT;

	if (discard)
		new_len |= RC_DISCARD_BIT;
	/* Pairs with the consumer's load-acquire of the header in
	 * rc_consume(): whoever sees BUSY clear sees the whole payload. */
	atomic_store_explicit(&hdr->len, new_len, memory_order_release);
	return (uint64_t)((unsigned char *)hdr - r->data);
}

void rc_submit(struct rc_ring *r, void *sample, unsigned flags)
{
	uint64_t off = commit(r, sample, false);

	count(r, &rc_my_slot(r)->submitted, 1);
	notify(r, off, RC_HDR_SZ, flags);
}

void rc_discard(struct rc_ring *r, void *sample, unsigned flags)
{
	uint64_t off = commit(r, sample, true);

	count(r, &rc_my_slot(r)->discarded, 1);
	notify(r, off, RC_HDR_SZ, flags);
}

void rc_submit_batch(struct rc_ring *r, void **samples, size_t n,
		     unsigned flags)
{
	uint64_t first, last;

	if (n == 0)
		return;
	first = commit(r, samples[0], false);
	last = first;
	for (size_t i = 1; i < n; i++)
		last = commit(r, samples[i], false);
	count(r, &rc_my_slot(r)->submitted, n);
	/* the batch was reserved in one piece: it spans first..last */
	notify(r, first, ((last - first) & r->mask) + RC_HDR_SZ, flags);
}

int rc_output(struct rc_ring *r, const void *data, uint32_t size,
	      unsigned flags)
{
	void *sample = rc_reserve(r, size, NULL);

	if (!sample)
		return -1;
	memcpy(sample, data, size);
	rc_submit(r, sample, flags);
	return 0;
}

void rc_test_park(struct rc_ring *r, uint32_t size, int stage, int notify_fd)
{
	uint64_t len = rc_record_len(size), prod;
	char one = 1;

	rc_my_slot(r);
	ring_lock(r);
	prod = r->prod->next_pos;
	if (stage >= 2 && room_for(r, prod, prod + len)) {
		write_busy_hdr(r, prod, size);
		if (stage >= 3) {
			r->prod->next_pos = prod + len;
			atomic_store_explicit(&r->prod->producer_pos, prod + len,
					      memory_order_release);
		}
	}
	if (stage >= 4)
		ring_unlock(r);
	if (write(notify_fd, &one, 1) != 1) {
		/* the test sees no notice and fails on its own */
	}
	for (;;)
		pause();
}
