// SPDX-License-Identifier: MIT
/*
 * exec.bpf.c: process exec and exit events into a BPF_MAP_TYPE_RINGBUF, for
 * the exec source's BPF method (service/sources/exec/bpf.py loads it with
 * libbpf, a worker reads the ring with ringcore.KernelRing).
 *
 * Modelled on libbpf-bootstrap's bootstrap.bpf.c: one handler on
 * sched_process_exec, one on sched_process_exit, fixed-size records
 * reserved in the ring and filled in place. Differences, and why:
 *
 *  - tp_btf/ (BTF-typed raw tracepoints) instead of tp/: the same two
 *    tracepoints, but attached through BPF_RAW_TRACEPOINT_OPEN, which needs
 *    no tracefs (often not mounted in containers), and the arguments arrive
 *    typed (the task, the linux_binprm) instead of as a trace record.
 *  - argv is read from the new image's mm->arg_start..arg_end, as Tetragon
 *    does: at sched_process_exec the arguments are already on the new stack.
 *    Cut at ARGS_SIZE with EVENT_F_ARGS_TRUNCATED set.
 *  - losses are counted. bootstrap drops an event silently when
 *    bpf_ringbuf_reserve() fails; here each CPU counts its failures (and its
 *    successes) in `counts`, and every record carries its CPU's loss counts
 *    as of its reservation, so the reader can put a gap marker exactly where
 *    events were lost: before the first record of that CPU reserved after
 *    them. Losses not followed by a record yet are found by reading `counts`
 *    when the ring is empty.
 *
 * CO-RE without vmlinux.h: the few kernel types used are declared below
 * with preserve_access_index, so libbpf relocates every field access against
 * the running kernel's BTF (/sys/kernel/btf/vmlinux) at load time.
 *
 * Record layout (little-endian, no padding; service/sources/exec/bpf.py
 * unpacks it with the same offsets; exit records stop after `comm`):
 *
 *   0        8                24          32              40            56        72
 *   ┌────────┬────────────────┬───────────┬───────────────┬─────────────┬─────────┬──────────┬─────────┐
 *   │kind,fl,│ lost[exec,exit]│ ts_boot_ns│ start_boot_ns │pid,ppid,uid,│ comm[16]│filename  │args[256]│
 *   │alen,cpu│ (this CPU)     │           │               │exit_code    │         │[128]     │ (exec)  │
 *   └────────┴────────────────┴───────────┴───────────────┴─────────────┴─────────┴──────────┴─────────┘
 *
 * Reserved memory is not zeroed: the reader takes args[0..args_size) and
 * the strings up to their first NUL, never the bytes after.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define TASK_COMM_LEN 16
#define FILENAME_SIZE 128
#define ARGS_SIZE 256
#define PF_KTHREAD 0x00200000
#define SIGNAL_GROUP_EXIT 0x00000004 /* signal->flags: exit_group() or a fatal signal */

enum { EVENT_EXEC = 1, EVENT_EXIT = 2 };
enum { EVENT_F_ARGS_TRUNCATED = 1, EVENT_F_FILENAME_TRUNCATED = 2 };
enum { C_EXEC = 0, C_EXIT = 1 };

/* the kernel types this program reads, relocated by name (CO-RE) */
typedef struct {
	unsigned int val;
} kuid_t;

struct cred {
	kuid_t uid;
} __attribute__((preserve_access_index));

typedef struct {
	int counter;
} atomic_t;

struct signal_struct {
	atomic_t live; /* threads not yet in do_exit() */
	int group_exit_code;
	unsigned int flags;
} __attribute__((preserve_access_index));

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	unsigned int flags;
	int exit_code;
	__u64 start_boottime;
	char comm[TASK_COMM_LEN];
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct signal_struct *signal;
	struct mm_struct *mm;
	const struct cred *real_cred;
} __attribute__((preserve_access_index));

struct linux_binprm {
	const char *filename;
} __attribute__((preserve_access_index));

struct event_head {
	__u8 kind;
	__u8 flags;
	__u16 args_size;
	__u32 cpu;
	__u64 lost[2]; /* this CPU's lost exec, exit events as of this reservation */
	__u64 ts_boot_ns;
	__u64 start_boot_ns;
	__u32 pid;
	__u32 ppid;
	__u32 uid;
	__s32 exit_code; /* the raw wait status (task->exit_code); exit only */
	char comm[TASK_COMM_LEN];
};

struct exec_event {
	struct event_head h;
	char filename[FILENAME_SIZE];
	char args[ARGS_SIZE];
};

struct counts {
	__u64 sent[2];
	__u64 lost[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* the loader sets the configured size */
} events SEC(".maps");

/* Written by the reader only, never by this program: per CPU, the losses
 * already reported in the stream, so a restarted reader goes on from there.
 * The loader sizes it to the possible CPUs. */
struct reported {
	__u64 lost[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct reported);
} reported SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counts);
} counts SEC(".maps");

static __always_inline struct counts *cpu_counts(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&counts, &zero);
}

/*
 * A per-CPU value, yet updated atomically: tracing programs run with
 * migration disabled, not preemption, so another task on this CPU can run
 * the same program between our load and store on a preemptible kernel.
 * The reader's snapshot of the loss counts (fill_head) pairs with these
 * adds only through program order on this CPU; a preemption between the
 * reservation and the snapshot can attribute a loss one record early.
 */
static __always_inline void count(__u64 *counter)
{
	__sync_fetch_and_add(counter, 1);
}

static __always_inline void fill_head(struct event_head *h, struct task_struct *p, __u8 kind,
				      struct counts *c)
{
	h->kind = kind;
	h->flags = 0;
	h->args_size = 0;
	h->cpu = bpf_get_smp_processor_id();
	h->lost[C_EXEC] = c->lost[C_EXEC];
	h->lost[C_EXIT] = c->lost[C_EXIT];
	h->ts_boot_ns = bpf_ktime_get_boot_ns();
	/* the process's start, whichever thread this is (de_thread() gives an
	 * exec'ing thread its leader's start time): exec_id matches at exit */
	h->start_boot_ns = BPF_CORE_READ(p, group_leader, start_boottime);
	h->pid = BPF_CORE_READ(p, tgid);
	h->ppid = BPF_CORE_READ(p, real_parent, tgid);
	h->uid = BPF_CORE_READ(p, real_cred, uid.val); /* the real uid, as /proc's Uid: */
	h->exit_code = 0;
	/* the process's name (the leader's), not a thread's */
	BPF_CORE_READ_STR_INTO(&h->comm, p, group_leader, comm);
}

SEC("tp_btf/sched_process_exec")
int handle_exec(__u64 *ctx)
{
	/* TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm) */
	struct task_struct *p = (struct task_struct *)ctx[0];
	struct linux_binprm *bprm = (struct linux_binprm *)ctx[2];
	struct exec_event *e;
	struct counts *c;
	unsigned long start, end;
	__u64 len;
	long n;

	c = cpu_counts();
	if (!c)
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(&c->lost[C_EXEC]);
		return 0;
	}
	count(&c->sent[C_EXEC]);
	fill_head(&e->h, p, EVENT_EXEC, c);

	n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), BPF_CORE_READ(bprm, filename));
	if (n < 0)
		e->filename[0] = '\0';
	else if (n == sizeof(e->filename))
		e->h.flags |= EVENT_F_FILENAME_TRUNCATED; /* filled: possibly cut */

	start = BPF_CORE_READ(p, mm, arg_start);
	end = BPF_CORE_READ(p, mm, arg_end);
	len = end > start ? end - start : 0;
	if (len > ARGS_SIZE) {
		len = ARGS_SIZE;
		e->h.flags |= EVENT_F_ARGS_TRUNCATED;
	}
	if (len && bpf_probe_read_user(e->args, len, (const void *)start) == 0)
		e->h.args_size = len;
	else if (len)
		e->h.flags |= EVENT_F_ARGS_TRUNCATED; /* the pages were not there */

	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int handle_exit(__u64 *ctx)
{
	/* TP_PROTO(struct task_struct *p[, bool group_dead]): only p is read */
	struct task_struct *p = (struct task_struct *)ctx[0];
	struct event_head *h;
	struct counts *c;
	int code;

	/* Kernel threads never exec: the /proc method leaves them out too. A
	 * thread's exit is not the process's: bootstrap's rule (pid == tid)
	 * also takes the leader's exit while other threads live on (a
	 * non-main thread's execve, a main thread that returns first) and
	 * misses a process whose last thread is not the leader. The process
	 * exits with its last thread: do_exit() decrements signal->live before
	 * this tracepoint, so it is 0 here exactly once per process. */
	if (BPF_CORE_READ(p, flags) & PF_KTHREAD)
		return 0;
	if (BPF_CORE_READ(p, signal, live.counter) != 0)
		return 0;

	c = cpu_counts();
	if (!c)
		return 0;
	h = bpf_ringbuf_reserve(&events, sizeof(*h), 0);
	if (!h) {
		count(&c->lost[C_EXIT]);
		return 0;
	}
	count(&c->sent[C_EXIT]);
	fill_head(h, p, EVENT_EXIT, c);
	/* exit_group() or a fatal signal: the group's code; else the last
	 * thread's own (the main thread may have left with another) */
	if (BPF_CORE_READ(p, signal, flags) & SIGNAL_GROUP_EXIT)
		code = BPF_CORE_READ(p, signal, group_exit_code);
	else
		code = BPF_CORE_READ(p, exit_code);
	h->exit_code = code;
	bpf_ringbuf_submit(h, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
