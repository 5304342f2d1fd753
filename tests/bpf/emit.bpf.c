// SPDX-License-Identifier: MIT
/*
 * emit: a stand-in for "someone else's BPF program" in
 * tests/test_bpf_ringbuf.py. One BPF_PROG_TEST_RUN writes ctx->count records
 * (at most MAX_PER_RUN) into the ring buffer `events`, with seq numbers
 * first_seq, first_seq + 1, ... The test pins `events` in bpffs and points a
 * bpf-ringbuf source at it.
 *
 * Record (32 bytes, little-endian, no padding), the test's schema:
 *
 *   0      8     12      16
 *   ┌──────┬─────┬───────┬───────────┐
 *   │ seq  │ pid │ magic │ label[16] │
 *   └──────┴─────┴───────┴───────────┘
 *
 * pid is the tgid of the process that ran the program (the test), magic is
 * EMIT_MAGIC, label is "emit-test" NUL-padded. Reservations that fail (a
 * full ring) are counted in stats.lost, those that succeed in stats.sent.
 *
 * Plain C, no CO-RE: a syscall program reads only its own context.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_PER_RUN 256
#define EMIT_MAGIC 0xe317e317

#ifndef RING_SIZE
#define RING_SIZE (16 << 10)
#endif

struct args {
	__u32 count;
	__u32 pad;
	__u64 first_seq;
};

struct event {
	__u64 seq;
	__u32 pid;
	__u32 magic;
	__u64 label_lo; /* char label[16] */
	__u64 label_hi;
};

struct stats {
	__u64 sent;
	__u64 lost;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RING_SIZE);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stats);
} stats SEC(".maps");

SEC("syscall")
int emit(struct args *ctx)
{
	__u32 zero = 0, count = ctx->count, pid = bpf_get_current_pid_tgid() >> 32;
	__u64 first = ctx->first_seq;
	struct stats *st;
	int i;

	st = bpf_map_lookup_elem(&stats, &zero);
	if (!st)
		return 1;
	if (count > MAX_PER_RUN)
		count = MAX_PER_RUN;
	for (i = 0; i < MAX_PER_RUN; i++) {
		struct event *e;

		if (i >= count)
			break;
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
		if (!e) {
			__sync_fetch_and_add(&st->lost, 1);
			continue;
		}
		e->seq = first + i;
		e->pid = pid;
		e->magic = EMIT_MAGIC;
		/* "emit-test", NUL-padded, as two stores (a string constant
		 * would need a .rodata.cst16 section) */
		e->label_lo = 0x7365742d74696d65ULL; /* "emit-tes" */
		e->label_hi = 0x74; /* "t" */
		bpf_ringbuf_submit(e, 0);
		__sync_fetch_and_add(&st->sent, 1);
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
