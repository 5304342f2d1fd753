// SPDX-License-Identifier: MIT
/*
 * killsnoop.bpf.c: every signal one process sends another (kill(2),
 * tgkill(2), rt_sigqueueinfo(2), pidfd_send_signal(2), the shell's kill),
 * one record each in the ring buffer `events`. The example of ringstream's
 * bpf-ringbuf source: load.py loads this and pins `events`, ringstream
 * streams it with the schema of killsnoop.toml.
 *
 * BCC's killsnoop traces the kill syscall's entry and exit. This one hooks
 * the signal_generate tracepoint as a BTF-typed raw tracepoint (tp_btf/):
 * no tracefs needed (often not mounted in containers), no map to pair the
 * entry with the exit, the same program on every architecture, and all the
 * ways of sending a signal at once. It sees signals that were generated:
 * kill(pid, 0) and a kill refused with ESRCH or EPERM do not show; `result`
 * says what became of the signal (delivered, ignored, already pending, ...).
 * Signals the kernel sends by itself (SIGCHLD, SIGSEGV, SIGPIPE, timers) are
 * left out by their si_code.
 *
 * CO-RE without vmlinux.h: the kernel types read are declared below with
 * preserve_access_index, and libbpf relocates the field offsets against the
 * running kernel's BTF (/sys/kernel/btf/vmlinux) when it loads the program.
 *
 * Record: 48 bytes, little-endian, no padding (killsnoop.toml decodes it)
 *
 *   0     4      8     12       16         32          48
 *   ┌─────┬──────┬─────┬────────┬──────────┬───────────┐
 *   │ pid │ tpid │ sig │ result │ comm[16] │ tcomm[16] │
 *   └─────┴──────┴─────┴────────┴──────────┴───────────┘
 *
 * pid and comm are the sender's (process id, i.e. tgid), tpid and tcomm the
 * target process's, as seen from the initial pid namespace.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#define TASK_COMM_LEN 16

/* si_code of signals sent by a process (include/uapi/asm-generic/siginfo.h) */
#define SI_USER 0   /* kill(2), pidfd_send_signal(2) without info */
#define SI_QUEUE -1 /* sigqueue(3) */
#define SI_TKILL -6 /* tkill(2), tgkill(2) */

/* the kernel types read here, relocated by name (CO-RE) */
struct kernel_siginfo {
	int si_code; /* in an anonymous struct in the kernel: CO-RE finds it */
} __attribute__((preserve_access_index));

struct task_struct {
	int tgid;
	char comm[TASK_COMM_LEN];
} __attribute__((preserve_access_index));

struct event {
	__u32 pid;
	__u32 tpid;
	__s32 sig;
	__s32 result;
	char comm[TASK_COMM_LEN];
	char tcomm[TASK_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* records that did not fit in the ring (its reader fell behind) */
__u64 lost = 0;

SEC("tp_btf/signal_generate")
int BPF_PROG(signal_generate, int sig, struct kernel_siginfo *info, struct task_struct *task,
	     int group, int result)
{
	struct event *e;
	int code;

	/* the kernel passes 0 (SEND_SIG_NOINFO) or 1 (SEND_SIG_PRIV) for
	 * signals without a siginfo: its own */
	if ((unsigned long)info <= 1)
		return 0;
	code = BPF_CORE_READ(info, si_code);
	if (code != SI_USER && code != SI_QUEUE && code != SI_TKILL)
		return 0;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&lost, 1);
		return 0;
	}
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->tpid = BPF_CORE_READ(task, tgid);
	e->sig = sig;
	e->result = result;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	BPF_CORE_READ_STR_INTO(&e->tcomm, task, comm);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
