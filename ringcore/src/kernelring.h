/* SPDX-License-Identifier: MIT */
/*
 * Reading a real kernel BPF_MAP_TYPE_RINGBUF with ringcore's consumer.
 *
 * The kernel's ring buffer, as mmap()ed by libbpf (src/ringbuf.c):
 *
 *   map offset 0      one page, read-write: consumer_pos (unsigned long)
 *   map offset page   one page, read-only:  producer_pos (unsigned long),
 *                     then the data area, mapped twice back to back
 *
 * consumer_pos and producer_pos sit at the start of their pages, as in
 * struct rc_cons_page and struct rc_prod_page, and the records have the same
 * header, so rc_consume() and rc_ready() (consume.c) read the kernel's ring
 * unchanged. Only those fields exist in the kernel's pages: a ring attached
 * here has slots and ctrl NULL, and must not be passed to the producer
 * functions, rc_prepare_wait(), rc_finish_wait() or rc_query() (they use
 * ringcore's own fields); the consumer waits on the map fd with epoll.
 */
#ifndef RINGCORE_KERNELRING_H
#define RINGCORE_KERNELRING_H

#include "ringcore.h"

/* returned (negated) by rc_attach_kernel(), next to the RC_E* codes */
enum {
	RC_ENOTRINGBUF = 64, /* the fd is a BPF map of another type */
};

/* *map_type on -RC_ENOTRINGBUF when the object is no map at all */
#define RC_NOT_A_MAP UINT32_MAX

/* Map the ring buffer of the BPF map map_fd (not dup()ed, not kept: the
 * mappings stay valid after it is closed). Fills r->cons, r->prod, r->data
 * and r->mask; r->slots and r->ctrl are NULL. The map's type goes to
 * *map_type unless it is NULL (for the error message on -RC_ENOTRINGBUF;
 * RC_NOT_A_MAP for a BPF program or link).
 * Returns 0, -RC_ENOTRINGBUF, -RC_EBADSIZE, or -RC_ESYS with errno set. */
int rc_attach_kernel(struct rc_ring *r, int map_fd, uint32_t *map_type);
/* unmap what rc_attach_kernel() mapped; r->cons is NULL afterwards */
void rc_detach_kernel(struct rc_ring *r);
/* an fd for the BPF object pinned at path (BPF_OBJ_GET), or -1 with errno */
int rc_bpf_obj_get(const char *path);

#endif /* RINGCORE_KERNELRING_H */
