/* SPDX-License-Identifier: MIT */
/*
 * ringcore: a multi-producer, single-consumer ring buffer in shared memory,
 * modelled on the Linux BPF ring buffer (kernel/bpf/ringbuf.c) and its
 * libbpf consumer (src/ringbuf.c), for processes instead of CPUs.
 *
 * Shared memory layout (one memfd, offsets in pages of the running system):
 *
 *  file:  0       1       2       3 ... 6         7 (META_PAGES)
 *         +-------+-------+-------+-----------+------------------------+
 *         | ctrl  | cons  | prod  | slots     | data (size bytes)      |
 *         +-------+-------+-------+-----------+------------------------+
 *
 *  a process maps it as:
 *         +-------+-------+-------+-----------+------------------------+------------------------+
 *         | ctrl  | cons  | prod  | slots     | 1 2 3 4 5 6 7 8 9      | 1 2 3 4 5 6 7 8 9      |
 *         +-------+-------+-------+-----------+------------------------+------------------------+
 *                                             | TA                  DA | TA                  DA |
 *                                                                  ^^^^^^^
 *  The data pages are mapped a second time right after themselves, so a
 *  record that starts near the end of the data area and wraps around is still
 *  contiguous in virtual memory: no padding records, no split copies.
 *
 *  ctrl   written once by the creator: magic, version, sizes.
 *  cons   written only by the consumer: consumer_pos, the "about to sleep"
 *         flag.
 *  prod   written only by producers: producer_pos (own cache line, read by the
 *         consumer), the reservation lock and pending_pos (producers only).
 *  slots  one 64-byte slot per producer process: its pid and its counters.
 *         Counting per producer keeps the submit path free of a shared
 *         counter cache line; query() sums the slots.
 *  data   records, each an 8-byte header and the payload, rounded up to 8.
 *
 * Each concern lives on its own pages so that each process maps it with the
 * permissions of its role, enforced by the MMU (as the kernel does since
 * 04ea3086): a stray write faults in the writer instead of corrupting the
 * ring.
 *
 *            ctrl  cons  prod+slots  data (both copies)
 *  consumer   r     rw     r           r
 *  producer   r     r      rw          rw
 *
 * A process that consumes and also produces holds two mappings, one per role.
 *
 * Positions are free-running 64-bit byte counters; the offset of a position
 * in the data area is pos & mask.
 *
 * Record header, as struct bpf_ringbuf_hdr:
 *
 *    0               4               8
 *    +---------------+---------------+---------------- - -
 *    | len           | pg_off        | payload (len bytes), padded to 8
 *    +---------------+---------------+---------------- - -
 *    len bit 31 = BUSY (reserved, not yet committed)
 *    len bit 30 = DISCARD (committed, to be skipped by the consumer)
 *
 * The kernel stores in pg_off the page offset of the header from the start of
 * struct bpf_ringbuf, to find the ring again from a bare record pointer.
 * ringcore does not need that (a reservation knows its ring), so pg_off names
 * the process that reserved the record: its producer slot index in bits 0-7
 * and the slot's claim generation in bits 8-31. Who owns a busy record is
 * then readable from the ring itself, even after the slot passed on to
 * another process. All other bytes of the data area are what the kernel
 * writes for the same operations.
 */
#ifndef RINGCORE_H
#define RINGCORE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define RC_MAGIC 0x45524f43474e4952ULL /* "RINGCORE" in little-endian bytes */
#define RC_VERSION 1

#define RC_BUSY_BIT (1U << 31)
#define RC_DISCARD_BIT (1U << 30)
#define RC_HDR_SZ 8U
/* as RINGBUF_MAX_RECORD_SZ: len has two flag bits */
#define RC_MAX_RECORD_SZ (UINT32_MAX / 4)
/* data sizes: a power of two from one page up to 2 GiB (the kernel's u32
 * max_entries allows no larger power of two) */
#define RC_MAX_DATA_SZ (1ULL << 31)

/* flags of submit/discard/output, values of BPF_RB_NO_WAKEUP/FORCE_WAKEUP */
#define RC_NO_WAKEUP 1U
#define RC_FORCE_WAKEUP 2U

#define RC_CACHELINE 64
#define RC_MAX_SLOTS 256 /* slot 0 is shared by processes that find no free slot */

/* error codes returned (negated) by the functions below */
enum {
	RC_OK = 0,
	RC_EBADSIZE = 1,  /* data size not a power of two multiple of the page */
	RC_ESYS = 2,      /* a system call failed; errno tells which way */
	RC_EMAGIC = 3,    /* not a ringcore ring */
	RC_EVERSION = 4,  /* ringcore ring of another layout version */
	RC_EGEOMETRY = 5, /* header sizes disagree with the file size */
	RC_EBUSY = 6,     /* another live process is the consumer */
};

enum { RC_ROLE_PRODUCER = 0, RC_ROLE_CONSUMER = 1 };

/* rc_ctrl.flags */
#define RC_FLAG_OVERWRITE 1U /* as BPF_F_RB_OVERWRITE (Linux 6.19) */

#define RC_SLOT_BITS 8
#define RC_PG_OFF(idx, gen) ((idx) | ((gen) << RC_SLOT_BITS))

struct rc_ctrl {
	uint64_t magic;
	uint32_t version;
	uint32_t page_size;
	uint64_t data_size;
	uint32_t meta_pages;
	uint32_t max_slots;
	uint32_t creator_pid;
	uint32_t flags;
};

struct rc_cons_page {
	_Atomic uint64_t consumer_pos;
	char pad0[RC_CACHELINE - sizeof(uint64_t)];
	/* On a line of its own: every producer reads it after every commit,
	 * and the consumer writes it only when it goes to sleep, so it stays
	 * in all caches while consumer_pos moves. 1 while the consumer has
	 * announced that it is about to sleep on the eventfd; the producer
	 * that takes it back to 0 sends the wakeup. */
	_Atomic uint32_t waiting;
	uint32_t pad1;
	_Atomic uint64_t wakeups_seen; /* times the consumer woke from a sleep */
	char pad2[RC_CACHELINE - 16];
	/* pid of the live consumer, 0 when there is none */
	_Atomic uint32_t consumer_pid;
	uint32_t pad3;
	/* busy records of dead producers the consumer stepped over */
	_Atomic uint64_t abandoned_records;
	_Atomic uint64_t abandoned_bytes;
	/* overwrite mode: bytes overwritten before the consumer read them */
	_Atomic uint64_t overwritten_bytes;
};

struct rc_prod_page {
	_Atomic uint64_t producer_pos;
	char pad0[RC_CACHELINE - sizeof(uint64_t)];
	/* Producers only, from here on. The lock is process-shared and robust:
	 * a producer that dies holding it does not deadlock the others. */
	pthread_mutex_t lock;
	uint64_t pending_pos; /* protected by lock */
	/* Protected by lock: the same value as producer_pos, on the lock's
	 * line, which only producers touch. Reserving reads this one: reading
	 * producer_pos would miss whenever the consumer has just read it. */
	uint64_t next_pos;
	/* Overwrite mode only. Written under the lock: the oldest position
	 * still intact; producers move it over the oldest records to make
	 * room, and the consumer skips ahead to it. */
	_Atomic uint64_t overwrite_pos;
};

struct rc_slot {
	_Atomic uint32_t pid; /* 0: free */
	_Atomic uint32_t gen; /* bumped by every claim, low 24 bits used */
	_Atomic uint64_t submitted;
	_Atomic uint64_t discarded;
	_Atomic uint64_t reserve_failures;
	_Atomic uint64_t wakeups; /* eventfd signals sent */
	uint64_t pad1[3];
} __attribute__((aligned(RC_CACHELINE)));

struct rc_hdr {
	_Atomic uint32_t len;
	uint32_t pg_off;
};

/* A process's handle on a ring: its own mapping, its descriptors. One thread
 * at a time uses a handle (the Python binding holds the GIL): the cached
 * positions and the slot's counters (count() in produce.c) rely on it. */
struct rc_ring {
	void *base;      /* start of the whole mapping */
	size_t map_len;  /* length of the whole mapping */
	struct rc_ctrl *ctrl;
	struct rc_cons_page *cons;
	struct rc_prod_page *prod;
	struct rc_slot *slots;
	unsigned char *data; /* data area, mapped twice back to back */
	uint64_t mask;       /* data size - 1 */
	int mem_fd;
	int event_fd;
	int role;             /* RC_ROLE_*: decides the mapping's permissions */
	struct rc_slot *slot; /* this process's slot; NULL until first produce */
	uint32_t slot_idx;
	unsigned slot_epoch;  /* rc_fork_epoch when the slot was claimed */
	uint32_t pg_off;      /* RC_PG_OFF(slot_idx, generation of our claim) */
	/* Last consumer_pos this handle read, under the reservation lock.
	 * Positions only grow, so a stale value only underestimates the room:
	 * reserving re-reads consumer_pos (a cache miss on a line the consumer
	 * keeps writing) only when the cached value says the record does not
	 * fit. */
	uint64_t cached_cons;
	/* Consumer only: a busy record of a dead producer is stepped over once
	 * it has blocked the consumer for abandon_ns (0: never). */
	uint64_t abandon_ns;
	uint64_t stall_pos;
	uint64_t stall_since; /* CLOCK_MONOTONIC ns, 0: not stalled */
	int overwrite;            /* RC_FLAG_OVERWRITE set in ctrl */
	unsigned char *scratch;   /* overwrite mode: a record's validated copy */
};

struct rc_query {
	uint64_t avail_data;
	uint64_t ring_size;
	uint64_t consumer_pos;
	uint64_t producer_pos;
	uint64_t submitted;
	uint64_t discarded;
	uint64_t reserve_failures;
	uint64_t wakeups;
	uint64_t abandoned_records;
	uint64_t abandoned_bytes;
	uint64_t overwrite_pos;
	uint64_t overwritten_bytes;
};

static inline void rc_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#endif
}

/* --- map.c: creation, attachment, teardown ------------------------------ */

/* 0 if size is a valid data size, else -RC_EBADSIZE */
int rc_check_size(uint64_t size);
size_t rc_page_size(void);
/* create a ring and map it for `role`; flags: RC_FLAG_* */
int rc_create(struct rc_ring *r, uint64_t size, int role, uint32_t flags);
/* Same, with the ring's memory in an unnamed file in directory `dir` (a
 * tmpfs, so its size limit applies) instead of a memfd; dir NULL = memfd. */
int rc_create_in(struct rc_ring *r, uint64_t size, int role, uint32_t flags,
		 const char *dir);
/* attach to a ring from its memory fd and event fd (both are dup()ed) */
int rc_attach(struct rc_ring *r, int mem_fd, int event_fd, int role);
void rc_close(struct rc_ring *r);
/* take the consumer role: 0, or -RC_EBUSY while another live process
 * holds it (*holder tells which) */
int rc_claim_consumer(struct rc_ring *r, uint32_t *holder);
void rc_release_consumer(struct rc_ring *r);
/* 0 only if process pid is certainly gone: no such process, or a zombie
 * (dead, not yet reaped by its parent) */
int rc_pid_alive(uint32_t pid);
const char *rc_strerror(int err);

/* --- produce.c: reserve, commit, output ---------------------------------- */

/* round_up(size + header, 8): the bytes a record of `size` takes */
static inline uint64_t rc_record_len(uint64_t size)
{
	return (size + RC_HDR_SZ + 7) & ~7ULL;
}

/* largest payload the ring can ever hold: len must stay <= mask */
static inline uint64_t rc_max_payload(const struct rc_ring *r)
{
	return r->mask + 1 - 2 * RC_HDR_SZ;
}

/* pointer to the payload of a reserved record, or NULL when there is no
 * room; the failure is counted. size must be <= rc_max_payload(). The
 * record's logical position goes to *pos unless pos is NULL. */
void *rc_reserve(struct rc_ring *r, uint32_t size, uint64_t *pos);
/* reserve n records in one critical section; returns how many were
 * reserved (a prefix of sizes), their payload pointers in out[], and the
 * position of the first in *pos unless pos is NULL */
size_t rc_reserve_batch(struct rc_ring *r, const uint32_t *sizes, size_t n,
			void **out, uint64_t *pos);
void rc_submit(struct rc_ring *r, void *sample, unsigned flags);
void rc_discard(struct rc_ring *r, void *sample, unsigned flags);
/* commit n records reserved together by rc_reserve_batch, in order, with a
 * single wakeup decision */
void rc_submit_batch(struct rc_ring *r, void **samples, size_t n,
		     unsigned flags);
/* 0, or -1 when there is no room */
int rc_output(struct rc_ring *r, const void *data, uint32_t size,
	      unsigned flags);
/* bumped in every forked child (pthread_atfork), see rc_claim_slot() */
extern unsigned rc_fork_epoch;
/* install the hook that bumps it (once per process; claiming a slot does) */
void rc_watch_forks(void);
/* claim a slot for this process (first use, or first use after a fork) */
struct rc_slot *rc_claim_slot(struct rc_ring *r);

/* the slot this process counts in; claims one on first use */
static inline struct rc_slot *rc_my_slot(struct rc_ring *r)
{
	if (r->slot && r->slot_epoch == rc_fork_epoch)
		return r->slot;
	return rc_claim_slot(r);
}
/* count n more reservation failures in this process's slot */
void rc_count_failures(struct rc_ring *r, uint64_t n);
/* forget the slot claimed by the parent (call in a forked child) */
void rc_forget_slot(struct rc_ring *r);
/* give this process's slot back (its counters stay in the totals) */
void rc_release_slot(struct rc_ring *r);
/* 1 if the process named by a record's pg_off is certainly gone */
int rc_owner_dead(struct rc_ring *r, uint32_t pg_off);
/* Test hook: reserve a record of `size` but stop at `stage` (1: holding the
 * lock, 2: busy header written, 3: producer_pos published, lock held, 4:
 * reserved, lock released), write one byte to notify_fd, and block forever:
 * a test kills the process there. */
void rc_test_park(struct rc_ring *r, uint32_t size, int stage, int notify_fd);

/* --- consume.c: the single consumer -------------------------------------- */

/* Called for each committed, non-discarded record with its logical
 * position (the position of its header). Return 0 to go on, 1 to stop after
 * this record (it counts as consumed), or RC_SAMPLE_ABORT to return at once
 * without publishing consumer_pos: the caller is no longer the consumer (a
 * child forked inside fn, while its parent goes on with the drain). */
#define RC_SAMPLE_ABORT 2
typedef int (*rc_sample_fn)(void *ctx, uint64_t pos, const void *data,
			    uint32_t size);

/* Consume up to max records (0 = no limit) of those committed when the call
 * starts. Returns records handed to fn, or -1 when a header is corrupt
 * (consumer_pos then stays at the corrupt record). */
int64_t rc_consume(struct rc_ring *r, rc_sample_fn fn, void *ctx, uint64_t max);
/* 1 if the record at consumer_pos is committed (even if discarded) */
int rc_ready(struct rc_ring *r);
/* ns until the consumer should look again at a busy record that blocks it
 * (it may belong to a dead producer), or 0 when it is not blocked */
uint64_t rc_stall_recheck_ns(struct rc_ring *r);
/* Announce that the consumer is about to sleep. Returns 1 if it may sleep on
 * event_fd now, 0 if a record is ready (the announcement is withdrawn). */
int rc_prepare_wait(struct rc_ring *r);
/* The consumer is awake again: withdraw the announcement, count the wake. */
void rc_finish_wait(struct rc_ring *r);
void rc_query(struct rc_ring *r, struct rc_query *q);

#endif /* RINGCORE_H */
