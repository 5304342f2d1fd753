// SPDX-License-Identifier: MIT
/*
 * ringops: an interpreter of ring buffer operations, run with
 * BPF_PROG_TEST_RUN, that drives a real BPF_MAP_TYPE_RINGBUF with the same
 * sequence tests/test_kernel.py applies to a ringcore.Ring.
 *
 * One run reads `struct run` from the array map `runs` (key 0) and applies
 * ops[0..nops) in order to the ring buffer in `rings[0]` (a map of maps, so
 * a test can start over on a fresh ring without loading the program again):
 *
 *   OUTPUT  size, src, flags   bpf_ringbuf_output(pool + src, size)
 *   RESERVE slot, size         bpf_ringbuf_reserve_dynptr(size) into slot
 *   WRITE   slot, off, src, size  bpf_dynptr_write(slot, off, pool + src, size)
 *   SUBMIT  slot, flags        bpf_ringbuf_submit_dynptr(slot)
 *   DISCARD slot, flags        bpf_ringbuf_discard_dynptr(slot)
 *
 * Each op's return value goes to ret[]. A slot holds one reservation; it is
 * open from RESERVE until SUBMIT/DISCARD, also when the reservation failed
 * (the dynptr is then null, and committing it does nothing), because the
 * verifier demands that every reserved dynptr be released. Reserving into an
 * open slot or committing a closed one is refused (-EBUSY, -ENOENT) and has
 * no effect. When the ops are done, every slot still open is discarded, in
 * slot order 0..NSLOTS-1, and cleanup[slot] is set to 1.
 *
 * Reservations live in dynptrs because bpf_ringbuf_reserve() needs a size
 * known to the verifier, and a slot's state is a constant on every path the
 * verifier explores (open##n), so it can follow which dynptr is live.
 *
 * Verification cost (Linux 6.18): with the open-coded iterator and three
 * slots, about 11k instructions; with four slots 880k (the verifier tells
 * states apart by the order in which the live dynptrs were acquired), and a
 * bounded for loop over MAX_OPS exceeds the 1M limit even with three.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_OPS 64
#define NSLOTS 3
#define POOL_MASK 8191 /* sources and sizes are masked with it */
#define POOL_SIZE (2 * (POOL_MASK + 1))

#define EBUSY 16
#define ENOENT 2

enum { OP_NOP, OP_OUTPUT, OP_RESERVE, OP_WRITE, OP_SUBMIT, OP_DISCARD };

struct op {
	__u8 kind;
	__u8 slot;
	__u8 flags;
	__u8 pad;
	__u32 size; /* record size (OUTPUT, RESERVE) or bytes to write (WRITE) */
	__u32 src;  /* offset in pool of the bytes to output or write */
	__u32 off;  /* WRITE: offset in the reserved record */
};

struct run {
	__u32 nops;
	__u32 pad;
	struct op ops[MAX_OPS];
	__s64 ret[MAX_OPS];
	__s64 cleanup[NSLOTS];
	__u8 pool[POOL_SIZE];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct run);
} runs SEC(".maps");

/* the size of every ring buffer put into `rings` (-DRING_SIZE=...) */
#ifndef RING_SIZE
#define RING_SIZE 4096
#endif

struct ringbuf {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RING_SIZE);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct ringbuf);
} rings SEC(".maps");

#define SLOTS(X) X(0) X(1) X(2)

/* Open-coded iterator (kernel 6.4+): the verifier checks the loop body until
 * the states at its head converge, instead of once per iteration. */
struct bpf_iter_num {
	__u64 __opaque[1];
} __attribute__((aligned(8)));

extern int bpf_iter_num_new(struct bpf_iter_num *it, int start, int end) __ksym;
extern int *bpf_iter_num_next(struct bpf_iter_num *it) __ksym;
extern void bpf_iter_num_destroy(struct bpf_iter_num *it) __ksym;

SEC("syscall")
int ringops(void *ctx)
{
	struct bpf_dynptr d0, d1, d2;
	int open0 = 0, open1 = 0, open2 = 0;
	__u32 zero = 0, n;
	struct bpf_iter_num it;
	struct run *run;
	int *next;
	void *rb;

	run = bpf_map_lookup_elem(&runs, &zero);
	if (!run)
		return 1;
	rb = bpf_map_lookup_elem(&rings, &zero);
	if (!rb)
		return 2;
	n = run->nops;
	if (n > MAX_OPS)
		n = MAX_OPS;

	bpf_iter_num_new(&it, 0, (int)n);
	while ((next = bpf_iter_num_next(&it))) {
		__u32 i = (__u32)*next;
		struct op *op;

		if (i >= MAX_OPS)
			break;
		op = &run->ops[i];
		__u32 size = op->size & POOL_MASK;
		void *src = &run->pool[op->src & POOL_MASK];
		__u64 flags = op->flags;
		long r = -ENOENT;

		switch (op->kind) {
		case OP_OUTPUT:
			r = bpf_ringbuf_output(rb, src, size, flags);
			break;
		case OP_RESERVE:
			switch (op->slot) {
#define RESERVE(n)                                                     \
	case n:                                                        \
		if (open##n) {                                         \
			r = -EBUSY;                                    \
			break;                                         \
		}                                                      \
		r = bpf_ringbuf_reserve_dynptr(rb, op->size, 0, &d##n); \
		open##n = 1;                                           \
		break;
			SLOTS(RESERVE)
			}
			break;
		case OP_WRITE:
			switch (op->slot) {
#define WRITE(n)                                                          \
	case n:                                                           \
		if (open##n)                                              \
			r = bpf_dynptr_write(&d##n, op->off, src, size, 0); \
		break;
			SLOTS(WRITE)
			}
			break;
		case OP_SUBMIT:
			switch (op->slot) {
#define SUBMIT(n)                                             \
	case n:                                               \
		if (open##n) {                                \
			bpf_ringbuf_submit_dynptr(&d##n, flags); \
			open##n = 0;                          \
			r = 0;                                \
		}                                             \
		break;
			SLOTS(SUBMIT)
			}
			break;
		case OP_DISCARD:
			switch (op->slot) {
#define DISCARD(n)                                             \
	case n:                                                \
		if (open##n) {                                 \
			bpf_ringbuf_discard_dynptr(&d##n, flags); \
			open##n = 0;                           \
			r = 0;                                 \
		}                                              \
		break;
			SLOTS(DISCARD)
			}
			break;
		default:
			r = 0;
		}
		run->ret[i] = r;
	}
	bpf_iter_num_destroy(&it);

#define CLEANUP(n)                                    \
	run->cleanup[n] = open##n;                    \
	if (open##n)                                  \
		bpf_ringbuf_discard_dynptr(&d##n, 0);
	SLOTS(CLEANUP)
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
