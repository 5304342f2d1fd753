/* SPDX-License-Identifier: MIT */
/* Objects and helpers shared by the CPython binding's files. */
#ifndef PYRINGCORE_H
#define PYRINGCORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "ringcore.h"

struct ReservationObject;

typedef struct {
	PyObject_HEAD
	struct rc_ring ring;   /* ring.base == NULL once closed; mapped for the
				  consumer role when the handle was made one */
	struct rc_ring *pview; /* a consumer handle's producer mapping, made on
				  first produce; NULL otherwise */
	int is_consumer;       /* holds the ring's consumer role */
	uint64_t fork_gen;     /* bumped in a forked child: older reservations
				  belong to the parent */
	unsigned fork_epoch;   /* rc_fork_epoch this handle last saw */
	Py_ssize_t exports;    /* live buffers into ring memory (reservations,
				  record views) */
	int consuming;         /* inside rc_consume(): no re-entry */
	int waiting;           /* poll() waits with the GIL released */
	struct ReservationObject *active; /* open reservations, linked */
	PyObject *weakreflist;
} RingObject;

/*
 * What a forked child does with the handles it inherited: it becomes a
 * producer with a slot of its own, and reservations made before the fork
 * stay the parent's to commit. os.fork() and multiprocessing run this from
 * Python's after-fork hook; a fork that runs no Python hooks (libc's
 * through ctypes, a C library) is noticed by its fork epoch on the handle's
 * next use (ring_sync_fork()), before anything else is done with it.
 */
static inline void ring_after_fork(RingObject *self)
{
	self->is_consumer = 0;
	self->fork_gen++;
	/* Only the forking thread lives on in the child: no other thread
	 * waits in poll() or drains here. A drain the forking thread itself
	 * is in (a consume_each() callback forked) stops when the callback
	 * returns, without touching the ring. */
	self->waiting = 0;
	self->consuming = 0;
	rc_forget_slot(&self->ring);
	if (self->pview)
		rc_forget_slot(self->pview);
	self->fork_epoch = rc_fork_epoch;
}

static inline void ring_sync_fork(RingObject *self)
{
	if (self->fork_epoch != rc_fork_epoch)
		ring_after_fork(self);
}

enum { RES_ACTIVE = 0, RES_SUBMITTED = 1, RES_DISCARDED = 2 };

typedef struct ReservationObject {
	PyObject_HEAD
	RingObject *ring; /* strong reference */
	unsigned char *sample;
	uint64_t pos;
	uint32_t size;
	int state;
	uint64_t fork_gen;
	Py_ssize_t exports;
	struct ReservationObject *prev, *next; /* in ring->active while active */
} ReservationObject;

typedef struct {
	PyObject_HEAD
	RingObject *ring; /* strong reference */
	const unsigned char *data; /* NULL outside a callback */
	Py_ssize_t size;
	Py_ssize_t exports;
} RecordViewObject;

/* module state lives in these globals: the module is single-phase init */
extern PyObject *RingError;
extern PyObject *RingClosedError;
extern PyObject *NotConsumerError;
extern PyObject *ReservationError;
extern PyObject *RingCorruptedError;
extern PyObject *ConsumerBusyError;
extern PyObject *IncompatibleRingError;
extern PyTypeObject RingType;
extern PyTypeObject ReservationType;
extern PyTypeObject RecordViewType;
extern PyTypeObject *RingQueryType;

/* The mapping producer operations of this handle go through: the handle's
 * own if it was mapped for producing, else its producer view (which exists
 * once anything was reserved through it). */
static inline struct rc_ring *producer_view(RingObject *o)
{
	return o->ring.role == RC_ROLE_PRODUCER ? &o->ring : o->pview;
}

/* pyreservation.c */
PyObject *reservation_new(RingObject *ring, void *sample, uint64_t pos,
			  uint32_t size);
/* discard every open reservation of ring (on close) */
void reservations_abandon(RingObject *ring);

/* pyrecordview.c */
RecordViewObject *record_view_new(RingObject *ring);

/* args.c: keyword/positional parsing for METH_FASTCALL | METH_KEYWORDS */
int fast_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
	      PyObject *kwnames, const char *const *names, Py_ssize_t nrequired,
	      PyObject **out);
int parse_flags(PyObject *obj, unsigned *flags);

/* pyconsume.c: shared by Ring and KernelRing */
double now_s(void);
int parse_max(PyObject *obj, uint64_t *max);
/* seconds >= 0, or -1 for None/absent */
int parse_seconds(PyObject *obj, const char *name, double *out);
/* RingCorruptedError naming the consumer position; returns NULL */
PyObject *raise_corrupt(struct rc_ring *r);
/* drain r into list (bytes, or (position, bytes) pairs) */
int consume_list(struct rc_ring *r, PyObject *list, uint64_t max, int with_pos);

/* Borrow a byte range from a bytes object (fast) or any C-contiguous buffer.
 * view->obj is NULL when nothing needs releasing. Inline: output() calls it
 * once per record. */
static inline int get_bytes(PyObject *obj, Py_buffer *view)
{
	if (PyBytes_CheckExact(obj)) {
		view->obj = NULL;
		view->buf = PyBytes_AS_STRING(obj);
		view->len = PyBytes_GET_SIZE(obj);
		return 0;
	}
	return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

static inline void put_bytes(Py_buffer *view)
{
	if (view->obj)
		PyBuffer_Release(view);
}

#endif /* PYRINGCORE_H */
