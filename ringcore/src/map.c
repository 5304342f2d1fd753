/* SPDX-License-Identifier: MIT */
/*
 * Creating, attaching to and unmapping a ring: the memfd that holds it, the
 * eventfd the consumer sleeps on, and the double mapping of the data area
 * (see the diagram in ringcore.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ringcore.h"

#define RC_SLOT_BYTES ((size_t)RC_MAX_SLOTS * sizeof(struct rc_slot))

size_t rc_page_size(void)
{
	return (size_t)sysconf(_SC_PAGESIZE);
}

static size_t meta_pages(size_t page)
{
	/* ctrl, cons, prod, then the slot table */
	return 3 + (RC_SLOT_BYTES + page - 1) / page;
}

int rc_check_size(uint64_t size)
{
	uint64_t page = rc_page_size();

	if (size < page || size > RC_MAX_DATA_SZ || (size & (size - 1)) ||
	    (size % page))
		return -RC_EBADSIZE;
	return 0;
}

const char *rc_strerror(int err)
{
	switch (-err) {
	case RC_OK:
		return "success";
	case RC_EBADSIZE:
		return "data size is not a power of two multiple of the page size";
	case RC_ESYS:
		return strerror(errno);
	case RC_EMAGIC:
		return "not a ringcore ring (bad magic)";
	case RC_EVERSION:
		return "ringcore ring of an incompatible layout version";
	case RC_EGEOMETRY:
		return "ring header does not match the size of its memory";
	case RC_EBUSY:
		return "another live process is the consumer";
	default:
		return "unknown error";
	}
}

/*
 * Map meta pages and data once from fd, then the data pages again right
 * after, each region with the permissions of `role` (table in ringcore.h).
 * The whole range is reserved first with an inaccessible anonymous mapping
 * so that the MAP_FIXED mappings land in address space we own.
 */
static int map_ring(struct rc_ring *r, int fd, size_t meta, uint64_t size,
		    int role)
{
	const int ro = PROT_READ, rw = PROT_READ | PROT_WRITE;
	int prod_prot = role == RC_ROLE_PRODUCER ? rw : ro;
	size_t page = rc_page_size();
	size_t meta_len = meta * page;
	size_t total = meta_len + 2 * size;
	struct {
		size_t at, len;
		off_t off;
		int prot;
	} regions[] = {
		{0, page, 0, ro},                                   /* ctrl */
		{page, page, (off_t)page,
		 role == RC_ROLE_CONSUMER ? rw : ro},               /* cons */
		{2 * page, meta_len - 2 * page, (off_t)(2 * page),
		 prod_prot},                                        /* prod, slots */
		{meta_len, size, (off_t)meta_len, prod_prot},      /* data */
		{meta_len + size, size, (off_t)meta_len, prod_prot}, /* again */
	};
	unsigned char *base;

	base = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		return -RC_ESYS;
	for (size_t i = 0; i < sizeof(regions) / sizeof(regions[0]); i++) {
		void *p = mmap(base + regions[i].at, regions[i].len,
			       regions[i].prot, MAP_SHARED | MAP_FIXED, fd,
			       regions[i].off);

		if (p == MAP_FAILED) {
			int saved = errno;

			munmap(base, total);
			errno = saved;
			return -RC_ESYS;
		}
	}
	r->base = base;
	r->map_len = total;
	r->role = role;
	r->ctrl = (struct rc_ctrl *)base;
	r->cons = (struct rc_cons_page *)(base + page);
	r->prod = (struct rc_prod_page *)(base + 2 * page);
	r->slots = (struct rc_slot *)(base + 3 * page);
	r->data = base + meta_len;
	r->mask = size - 1;
	r->overwrite = !!(r->ctrl->flags & RC_FLAG_OVERWRITE);
	return 0;
}

static int init_lock(pthread_mutex_t *lock)
{
	pthread_mutexattr_t attr;
	int err;

	err = pthread_mutexattr_init(&attr);
	if (!err)
		err = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
	if (!err)
		err = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
	if (!err)
		err = pthread_mutex_init(lock, &attr);
	pthread_mutexattr_destroy(&attr);
	if (err) {
		errno = err;
		return -RC_ESYS;
	}
	return 0;
}

static void reset_handle(struct rc_ring *r)
{
	memset(r, 0, sizeof(*r));
	r->mem_fd = -1;
	r->event_fd = -1;
}

/* The lock and the control page are written once, before any process maps
 * the ring for a role: through a mapping of the producer page alone, and
 * pwrite(). */
static int init_ring(int fd, uint64_t size, size_t page, size_t meta,
		     uint32_t flags)
{
	struct rc_prod_page *prod;
	struct rc_ctrl ctrl;
	uint64_t magic = RC_MAGIC;
	int err;

	prod = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
		    (off_t)(2 * page));
	if (prod == MAP_FAILED)
		return -RC_ESYS;
	err = init_lock(&prod->lock);
	munmap(prod, page);
	if (err)
		return err;
	memset(&ctrl, 0, sizeof(ctrl));
	ctrl.version = RC_VERSION;
	ctrl.page_size = (uint32_t)page;
	ctrl.data_size = size;
	ctrl.meta_pages = (uint32_t)meta;
	ctrl.max_slots = RC_MAX_SLOTS;
	ctrl.creator_pid = (uint32_t)getpid();
	ctrl.flags = flags;
	if (pwrite(fd, &ctrl, sizeof(ctrl), 0) != (ssize_t)sizeof(ctrl))
		return -RC_ESYS;
	/* Written last, after everything it vouches for: a process that
	 * attaches reads it first (pwrite/pread on one file are ordered). */
	if (pwrite(fd, &magic, sizeof(magic), 0) != (ssize_t)sizeof(magic))
		return -RC_ESYS;
	return 0;
}

/* The file that holds the ring. With no directory: an anonymous memfd,
 * charged to the memory cgroup. With one (a tmpfs such as /dev/shm): an
 * unnamed O_TMPFILE there, so the ring counts against that file system's
 * size, which is what docker's --shm-size and a Kubernetes memory-backed
 * emptyDir limit; posix_fallocate() below then fails with ENOSPC when the
 * ring does not fit. Either way the file has no name another process could
 * open: it is shared only as a descriptor. */
static int open_backing(const char *dir)
{
	char path[4096];
	int fd;

	if (!dir)
		return memfd_create("ringcore", MFD_CLOEXEC);
	fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (fd >= 0 || (errno != EOPNOTSUPP && errno != EISDIR &&
			errno != EINVAL))
		return fd;
	/* no O_TMPFILE on this file system: a named file, unlinked at once */
	if (snprintf(path, sizeof(path), "%s/ringcore-XXXXXX", dir) >=
	    (int)sizeof(path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	fd = mkostemp(path, O_CLOEXEC);
	if (fd >= 0)
		unlink(path);
	return fd;
}

int rc_create(struct rc_ring *r, uint64_t size, int role, uint32_t flags)
{
	return rc_create_in(r, size, role, flags, NULL);
}

int rc_create_in(struct rc_ring *r, uint64_t size, int role, uint32_t flags,
		 const char *dir)
{
	size_t page = rc_page_size();
	size_t meta = meta_pages(page);
	off_t file_len;
	int err;

	reset_handle(r);
	err = rc_check_size(size);
	if (err)
		return err;
	file_len = (off_t)(meta * page + size);

	r->mem_fd = open_backing(dir);
	if (r->mem_fd < 0)
		goto sys_fail;
	if (ftruncate(r->mem_fd, file_len))
		goto sys_fail;
	/* Allocate every page now: a ring that does not fit fails here with
	 * ENOSPC/ENOMEM instead of SIGBUS on first touch. */
	err = posix_fallocate(r->mem_fd, 0, file_len);
	if (err) {
		errno = err;
		goto sys_fail;
	}
	r->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (r->event_fd < 0)
		goto sys_fail;
	if (flags & ~RC_FLAG_OVERWRITE) {
		errno = EINVAL;
		goto sys_fail;
	}
	err = init_ring(r->mem_fd, size, page, meta, flags);
	if (err)
		goto fail;
	err = map_ring(r, r->mem_fd, meta, size, role);
	if (err)
		goto fail;
	return 0;

sys_fail:
	err = -RC_ESYS;
fail:
	{
		int saved = errno;

		rc_close(r);
		errno = saved;
	}
	return err;
}

int rc_attach(struct rc_ring *r, int mem_fd, int event_fd, int role)
{
	size_t page = rc_page_size();
	struct rc_ctrl ctrl;
	struct stat st;
	int err;

	reset_handle(r);
	if (fstat(mem_fd, &st))
		return -RC_ESYS;
	if ((size_t)st.st_size < page)
		return -RC_EGEOMETRY;
	/* Read the control page through pread, not a mapping: its values
	 * decide how large the mapping is. */
	if (pread(mem_fd, &ctrl, sizeof(ctrl), 0) != (ssize_t)sizeof(ctrl))
		return -RC_EGEOMETRY;
	if (ctrl.magic != RC_MAGIC)
		return -RC_EMAGIC;
	if (ctrl.version != RC_VERSION)
		return -RC_EVERSION;
	if (ctrl.page_size != page || ctrl.meta_pages != meta_pages(page) ||
	    ctrl.max_slots != RC_MAX_SLOTS || rc_check_size(ctrl.data_size) ||
	    (ctrl.flags & ~RC_FLAG_OVERWRITE) ||
	    (uint64_t)st.st_size != ctrl.meta_pages * page + ctrl.data_size)
		return -RC_EGEOMETRY;

	r->mem_fd = fcntl(mem_fd, F_DUPFD_CLOEXEC, 0);
	if (r->mem_fd < 0)
		goto sys_fail;
	r->event_fd = fcntl(event_fd, F_DUPFD_CLOEXEC, 0);
	if (r->event_fd < 0)
		goto sys_fail;
	err = map_ring(r, r->mem_fd, ctrl.meta_pages, ctrl.data_size, role);
	if (err)
		goto fail;
	return 0;

sys_fail:
	err = -RC_ESYS;
fail:
	{
		int saved = errno;

		rc_close(r);
		errno = saved;
	}
	return err;
}

void rc_close(struct rc_ring *r)
{
	free(r->scratch);
	if (r->base)
		munmap(r->base, r->map_len);
	if (r->mem_fd >= 0)
		close(r->mem_fd);
	if (r->event_fd >= 0)
		close(r->event_fd);
	reset_handle(r);
}

int rc_pid_alive(uint32_t pid)
{
	char path[32], buf[256], *p;
	ssize_t n;
	int fd;

	if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
		return 0;
	/* kill() also succeeds on a zombie: a process that died but whose
	 * parent has not reaped it yet. Its state is the field after the
	 * command name in /proc/PID/stat. */
	snprintf(path, sizeof(path), "/proc/%u/stat", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	/* No /proc entry although kill() found the process: it died just now
	 * (then kill() says so again), or this /proc does not show it (mounted
	 * with hidepid, or belonging to another pid namespace). Only kill()
	 * can then tell, and it cannot tell a zombie: presume alive, as
	 * wrongly presuming dead would hand a live producer's records on. */
	if (fd < 0)
		return !(errno == ENOENT && kill((pid_t)pid, 0) != 0 &&
			 errno == ESRCH);
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 1;
	buf[n] = 0;
	p = strrchr(buf, ')');
	if (p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'))
		return 0;
	return 1;
}

int rc_claim_consumer(struct rc_ring *r, uint32_t *holder)
{
	uint32_t me = (uint32_t)getpid();
	uint32_t cur = atomic_load_explicit(&r->cons->consumer_pid,
					    memory_order_relaxed);

	for (;;) {
		/* another handle of this very process counts as live too */
		if (cur && rc_pid_alive(cur)) {
			*holder = cur;
			return -RC_EBUSY;
		}
		/* free, or its holder died: a restarted consumer takes over
		 * and resumes at the stored consumer_pos */
		if (atomic_compare_exchange_strong_explicit(
			    &r->cons->consumer_pid, &cur, me,
			    memory_order_acq_rel, memory_order_relaxed))
			break;
	}
	/* whatever a dead consumer left announced is void */
	atomic_store_explicit(&r->cons->waiting, 0, memory_order_relaxed);
	r->cached_cons = atomic_load_explicit(&r->cons->consumer_pos,
					      memory_order_acquire);
	return 0;
}

void rc_release_consumer(struct rc_ring *r)
{
	uint32_t me = (uint32_t)getpid();

	atomic_compare_exchange_strong_explicit(&r->cons->consumer_pid, &me, 0,
						memory_order_release,
						memory_order_relaxed);
}
