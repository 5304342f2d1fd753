/* SPDX-License-Identifier: MIT */
/*
 * Attaching ringcore's consumer to a kernel BPF ring buffer: the map's size
 * from BPF_OBJ_GET_INFO_BY_FD and the two mappings libbpf's
 * ring_buffer__add() makes (see kernelring.h). Raw bpf() system calls, so the
 * extension does not link libbpf.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernelring.h"

static long sys_bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

int rc_bpf_obj_get(const char *path)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.pathname = (uint64_t)(uintptr_t)path;
	/* read-write: the consumer page is written */
	attr.file_flags = 0;
	return (int)sys_bpf(BPF_OBJ_GET, &attr);
}

static int map_info(int fd, struct bpf_map_info *info)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	memset(info, 0, sizeof(*info));
	attr.info.bpf_fd = (uint32_t)fd;
	attr.info.info_len = sizeof(*info);
	attr.info.info = (uint64_t)(uintptr_t)info;
	return sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) ? -1 : 0;
}

/* 1 if fd is a BPF map, 0 if another BPF object (a program, a link answer
 * BPF_OBJ_GET_INFO_BY_FD with their own info), 1 too when /proc cannot say */
static int is_bpf_map(int fd)
{
	char path[64], target[64];
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, target, sizeof(target) - 1);
	if (n < 0)
		return 1;
	target[n] = '\0';
	return strncmp(target, "anon_inode:bpf-", 15) != 0 ||
	       strcmp(target, "anon_inode:bpf-map") == 0;
}

int rc_attach_kernel(struct rc_ring *r, int map_fd, uint32_t *map_type)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	struct bpf_map_info info;
	void *cons, *prod;
	uint64_t size;

	memset(r, 0, sizeof(*r));
	r->mem_fd = -1;
	r->event_fd = -1;
	if (map_info(map_fd, &info))
		return -RC_ESYS;
	if (!is_bpf_map(map_fd))
		info.type = RC_NOT_A_MAP;
	if (map_type)
		*map_type = info.type;
	if (info.type != BPF_MAP_TYPE_RINGBUF)
		return -RC_ENOTRINGBUF;
	size = info.max_entries;
	/* the kernel checks this at map creation; a wrong fd type (a program
	 * answers the same command with other fields) fails here or in mmap */
	if (size < page || (size & (size - 1)) || size % page ||
	    size > (SIZE_MAX - page) / 2)
		return -RC_EBADSIZE;

	/* as libbpf's ring_buffer__add(): the consumer page read-write ... */
	cons = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
	if (cons == MAP_FAILED)
		return -RC_ESYS;
	/* ... the producer page and the data area, twice, read-only */
	prod = mmap(NULL, page + 2 * (size_t)size, PROT_READ, MAP_SHARED, map_fd,
		    (off_t)page);
	if (prod == MAP_FAILED) {
		int saved = errno;

		munmap(cons, page);
		errno = saved;
		return -RC_ESYS;
	}
	r->cons = cons;
	r->prod = prod;
	r->data = (unsigned char *)prod + page;
	r->mask = size - 1;
	r->slots = NULL;
	r->ctrl = NULL;
	return 0;
}

void rc_detach_kernel(struct rc_ring *r)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	if (r->prod)
		munmap(r->prod, page + 2 * (size_t)(r->mask + 1));
	if (r->cons)
		munmap(r->cons, page);
	r->cons = NULL;
	r->prod = NULL;
	r->data = NULL;
	r->mask = 0;
}
