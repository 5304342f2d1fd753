/* SPDX-License-Identifier: MIT */
/*
 * Reservation: a record reserved in the ring, writable in place through the
 * buffer protocol, until submit() or discard(). The kernel's verifier makes
 * sure every reservation is committed exactly once and never touched after;
 * here the object's state does:
 *  - submit/discard twice, or after the ring is closed, raises;
 *  - submit/discard while a memoryview of it is alive raises BufferError,
 *    since writes through that view would land in a committed record;
 *  - a reservation dropped without either is discarded (and counted);
 *  - in a forked child, the parent's reservations cannot be committed.
 */
#include "pyringcore.h"

static void unlink_active(ReservationObject *self)
{
	RingObject *ring = self->ring;

	if (self->prev)
		self->prev->next = self->next;
	else if (ring->active == self)
		ring->active = self->next;
	if (self->next)
		self->next->prev = self->prev;
	self->prev = self->next = NULL;
}

PyObject *reservation_new(RingObject *ring, void *sample, uint64_t pos,
			  uint32_t size)
{
	ReservationObject *self;

	self = PyObject_New(ReservationObject, &ReservationType);
	if (!self) {
		/* never leave a record busy: the consumer would stall on it */
		rc_discard(producer_view(ring), sample, 0);
		return NULL;
	}
	Py_INCREF(ring);
	self->ring = ring;
	self->sample = sample;
	self->pos = pos;
	self->size = size;
	self->state = RES_ACTIVE;
	self->fork_gen = ring->fork_gen;
	self->exports = 0;
	self->prev = NULL;
	self->next = ring->active;
	if (ring->active)
		ring->active->prev = self;
	ring->active = self;
	return (PyObject *)self;
}

static int check_usable(ReservationObject *self, const char *what)
{
	ring_sync_fork(self->ring);
	if (self->state != RES_ACTIVE) {
		PyErr_Format(ReservationError, "cannot %s: reservation was already %s",
			     what,
			     self->state == RES_SUBMITTED ? "submitted" : "discarded");
		return -1;
	}
	if (self->fork_gen != self->ring->fork_gen) {
		PyErr_Format(ReservationError,
			     "cannot %s: reservation belongs to the parent "
			     "process (made before fork)",
			     what);
		return -1;
	}
	if (!self->ring->ring.base) {
		PyErr_Format(RingClosedError, "cannot %s: the ring is closed", what);
		return -1;
	}
	return 0;
}

static PyObject *finish(ReservationObject *self, PyObject *const *args,
			Py_ssize_t nargs, PyObject *kwnames, int discard)
{
	static const char *const names[] = {"flags", NULL};
	const char *what = discard ? "discard" : "submit";
	PyObject *flags_obj;
	unsigned flags;

	if (fast_args(what, args, nargs, kwnames, names, 0, &flags_obj) ||
	    parse_flags(flags_obj, &flags) || check_usable(self, what))
		return NULL;
	if (self->exports) {
		PyErr_Format(PyExc_BufferError,
			     "cannot %s: %zd memoryview(s) of the reservation "
			     "are still alive; release them first (use 'with "
			     "memoryview(r) as m:')",
			     what, self->exports);
		return NULL;
	}
	if (discard)
		rc_discard(producer_view(self->ring), self->sample, flags);
	else
		rc_submit(producer_view(self->ring), self->sample, flags);
	self->state = discard ? RES_DISCARDED : RES_SUBMITTED;
	unlink_active(self);
	Py_RETURN_NONE;
}

static PyObject *Reservation_submit(ReservationObject *self,
				    PyObject *const *args, Py_ssize_t nargs,
				    PyObject *kwnames)
{
	return finish(self, args, nargs, kwnames, 0);
}

static PyObject *Reservation_discard(ReservationObject *self,
				     PyObject *const *args, Py_ssize_t nargs,
				     PyObject *kwnames)
{
	return finish(self, args, nargs, kwnames, 1);
}

static PyObject *Reservation_enter(ReservationObject *self,
				   PyObject *Py_UNUSED(ignored))
{
	if (check_usable(self, "enter"))
		return NULL;
	Py_INCREF(self);
	return (PyObject *)self;
}

static PyObject *Reservation_exit(ReservationObject *self,
				  PyObject *const *args, Py_ssize_t nargs)
{
	int failed = nargs > 0 && args[0] != Py_None;

	/* committed inside the block: nothing left to do */
	if (self->state != RES_ACTIVE)
		Py_RETURN_FALSE;
	if (!finish(self, NULL, 0, NULL, failed))
		return NULL;
	Py_RETURN_FALSE;
}

/* Called when the ring is closed: commit nothing half-written. */
void reservations_abandon(RingObject *ring)
{
	while (ring->active) {
		ReservationObject *res = ring->active;

		if (res->fork_gen == ring->fork_gen)
			rc_discard(producer_view(ring), res->sample, 0);
		res->state = RES_DISCARDED;
		unlink_active(res);
	}
}

static void Reservation_dealloc(ReservationObject *self)
{
	RingObject *ring = self->ring;

	if (self->state == RES_ACTIVE) {
		ring_sync_fork(ring);
		if (ring->ring.base && self->fork_gen == ring->fork_gen)
			rc_discard(producer_view(ring), self->sample, 0);
		unlink_active(self);
	}
	Py_DECREF(ring);
	PyObject_Free(self);
}

static int Reservation_getbuffer(ReservationObject *self, Py_buffer *view,
				 int flags)
{
	if (check_usable(self, "write"))
		return -1;
	if (PyBuffer_FillInfo(view, (PyObject *)self, self->sample, self->size,
			      0, flags))
		return -1;
	self->exports++;
	self->ring->exports++;
	return 0;
}

static void Reservation_releasebuffer(ReservationObject *self,
				      Py_buffer *Py_UNUSED(view))
{
	self->exports--;
	self->ring->exports--;
}

static Py_ssize_t Reservation_len(ReservationObject *self)
{
	return self->size;
}

static PyObject *Reservation_get_active(ReservationObject *self,
					void *Py_UNUSED(closure))
{
	return PyBool_FromLong(self->state == RES_ACTIVE);
}

static PyObject *Reservation_get_position(ReservationObject *self,
					  void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLongLong(self->pos);
}

static PyObject *Reservation_repr(ReservationObject *self)
{
	static const char *const states[] = {"active", "submitted", "discarded"};

	return PyUnicode_FromFormat("<ringcore.Reservation position=%llu size=%u "
				    "%s>",
				    (unsigned long long)self->pos, self->size,
				    states[self->state]);
}

static PyBufferProcs Reservation_as_buffer = {
	.bf_getbuffer = (getbufferproc)Reservation_getbuffer,
	.bf_releasebuffer = (releasebufferproc)Reservation_releasebuffer,
};

static PySequenceMethods Reservation_as_sequence = {
	.sq_length = (lenfunc)Reservation_len,
};

#define FASTCALL_KW(fn) ((PyCFunction)(void (*)(void))(fn))

static PyMethodDef Reservation_methods[] = {
	{"submit", FASTCALL_KW(Reservation_submit), METH_FASTCALL | METH_KEYWORDS,
	 "submit(flags=0)\n--\n\nCommit the record: it becomes visible to the "
	 "consumer once every record reserved before it is committed too."},
	{"discard", FASTCALL_KW(Reservation_discard),
	 METH_FASTCALL | METH_KEYWORDS,
	 "discard(flags=0)\n--\n\nCommit the record as discarded: the consumer "
	 "skips it."},
	{"__enter__", (PyCFunction)Reservation_enter, METH_NOARGS, NULL},
	{"__exit__", FASTCALL_KW(Reservation_exit), METH_FASTCALL,
	 "Submit on normal exit, discard when the block raised."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef Reservation_getset[] = {
	{"active", (getter)Reservation_get_active, NULL,
	 "True until submit() or discard().", NULL},
	{"position", (getter)Reservation_get_position, NULL,
	 "Logical position of the record in the ring: records are consumed in "
	 "the order of their positions.", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject ReservationType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "ringcore.Reservation",
	.tp_basicsize = sizeof(ReservationObject),
	.tp_dealloc = (destructor)Reservation_dealloc,
	.tp_repr = (reprfunc)Reservation_repr,
	.tp_as_sequence = &Reservation_as_sequence,
	.tp_as_buffer = &Reservation_as_buffer,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A record reserved in a Ring, writable in place until "
		  "submit() or discard(). Get it from Ring.reserve().",
	.tp_methods = Reservation_methods,
	.tp_getset = Reservation_getset,
};
