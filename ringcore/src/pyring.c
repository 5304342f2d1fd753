/* SPDX-License-Identifier: MIT */
/*
 * The Ring type: one process's handle on a ring. The process that creates
 * the ring is its consumer; handles made in other processes (a forked child,
 * a spawned child that unpickled it) are producers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <time.h>

#include "pyringcore.h"

#define FASTCALL_KW(fn) ((PyCFunction)(void (*)(void))(fn))

static int check_open(RingObject *self)
{
	ring_sync_fork(self);
	if (!self->ring.base) {
		PyErr_SetString(RingClosedError, "the ring is closed");
		return -1;
	}
	return 0;
}

static int check_consumer(RingObject *self, const char *what)
{
	if (check_open(self))
		return -1;
	if (self->consuming) {
		/* the outer drain holds its own copy of consumer_pos */
		PyErr_Format(RingError,
			     "%s() called from inside a consume_each() callback",
			     what);
		return -1;
	}
	if (!self->is_consumer) {
		PyErr_Format(NotConsumerError,
			     "%s() needs the consumer: this handle is a producer "
			     "(the ring was created in another process)",
			     what);
		return -1;
	}
	return 0;
}

static void raise_size_error(unsigned long long size)
{
	unsigned long long page = rc_page_size(), lo = page, hi;

	if (size > RC_MAX_DATA_SZ) {
		PyErr_Format(PyExc_ValueError,
			     "ring size %llu is too large: the largest is %llu "
			     "(2 GiB)",
			     size, (unsigned long long)RC_MAX_DATA_SZ);
		return;
	}
	while (lo * 2 <= size)
		lo *= 2;
	hi = lo < size ? lo * 2 : lo;
	if (size < page)
		PyErr_Format(PyExc_ValueError,
			     "ring size %llu is too small: it must be a power of "
			     "2 and a multiple of the page size (%llu); nearest "
			     "valid size: %llu",
			     size, page, page);
	else
		PyErr_Format(PyExc_ValueError,
			     "ring size %llu is not a power of 2 multiple of the "
			     "page size (%llu); nearest valid sizes: %llu and %llu",
			     size, page, lo, hi);
}

static void raise_rc_error(int err, const char *what)
{
	if (err == -RC_ESYS)
		PyErr_SetFromErrno(PyExc_OSError);
	else
		PyErr_Format(RingError, "%s: %s", what, rc_strerror(err));
}

static int parse_abandon(double seconds, struct rc_ring *r)
{
	if (seconds < 0) {
		PyErr_SetString(PyExc_ValueError,
				"abandon_timeout must be >= 0 seconds (0: never)");
		return -1;
	}
	r->abandon_ns = (uint64_t)(seconds * 1e9);
	return 0;
}

/* Become the ring's consumer, or explain who is. */
static int claim_consumer(RingObject *self)
{
	uint32_t holder = 0;

	if (rc_claim_consumer(&self->ring, &holder)) {
		PyErr_Format(ConsumerBusyError,
			     "the ring already has a live consumer (pid %u); "
			     "a ring has one consumer at a time",
			     holder);
		return -1;
	}
	self->is_consumer = 1;
	return 0;
}

static PyObject *Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"size", "consumer", "abandon_timeout",
				 "overwrite", "shm_dir", NULL};
	unsigned long long size;
	int consumer = 1, overwrite = 0;
	double abandon = 1.0;
	PyObject *dir_arg = Py_None, *dir_obj = NULL;
	const char *dir = NULL;
	RingObject *self;
	int err;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "K|$pdpO:Ring", kwlist,
					 &size, &consumer, &abandon, &overwrite,
					 &dir_arg))
		return NULL;
	if (dir_arg != Py_None) {
		if (!PyUnicode_FSConverter(dir_arg, &dir_obj))
			return NULL;
		dir = PyBytes_AS_STRING(dir_obj);
	}
	if (rc_check_size(size)) {
		raise_size_error(size);
		Py_XDECREF(dir_obj);
		return NULL;
	}
	self = (RingObject *)type->tp_alloc(type, 0);
	if (!self) {
		Py_XDECREF(dir_obj);
		return NULL;
	}
	self->fork_epoch = rc_fork_epoch;
	err = rc_create_in(&self->ring, size,
			   consumer ? RC_ROLE_CONSUMER : RC_ROLE_PRODUCER,
			   overwrite ? RC_FLAG_OVERWRITE : 0, dir);
	if (err) {
		/* name the directory: ENOSPC there means "the ring does not
		 * fit in this tmpfs", which the caller explains */
		if (err == -RC_ESYS && dir)
			PyErr_SetFromErrnoWithFilename(PyExc_OSError, dir);
		else
			raise_rc_error(err, "cannot create ring");
		Py_XDECREF(dir_obj);
		Py_DECREF(self);
		return NULL;
	}
	Py_XDECREF(dir_obj);
	if (parse_abandon(abandon, &self->ring) ||
	    (consumer && claim_consumer(self))) {
		Py_DECREF(self);
		return NULL;
	}
	return (PyObject *)self;
}

static PyObject *Ring_attach_fds(PyTypeObject *type, PyObject *args,
				 PyObject *kwds)
{
	static char *kwlist[] = {"mem_fd", "event_fd", "consumer",
				 "abandon_timeout", NULL};
	int mem_fd, event_fd, consumer = 0, err;
	double abandon = 1.0;
	RingObject *self;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii|$pd:_attach_fds",
					 kwlist, &mem_fd, &event_fd, &consumer,
					 &abandon))
		return NULL;
	self = (RingObject *)type->tp_alloc(type, 0);
	if (!self)
		return NULL;
	self->fork_epoch = rc_fork_epoch;
	err = rc_attach(&self->ring, mem_fd, event_fd,
			consumer ? RC_ROLE_CONSUMER : RC_ROLE_PRODUCER);
	if (err) {
		if (err == -RC_ESYS)
			PyErr_SetFromErrno(PyExc_OSError);
		else
			PyErr_Format(IncompatibleRingError,
				     "cannot attach to ring: %s",
				     rc_strerror(err));
		Py_DECREF(self);
		return NULL;
	}
	if (parse_abandon(abandon, &self->ring) ||
	    (consumer && claim_consumer(self))) {
		Py_DECREF(self);
		return NULL;
	}
	return (PyObject *)self;
}

/* The mapping to produce through, made on first use by a consumer handle. */
static struct rc_ring *get_producer_view(RingObject *self)
{
	struct rc_ring *pv;
	int err;

	if (self->ring.role == RC_ROLE_PRODUCER)
		return &self->ring;
	if (self->pview)
		return self->pview;
	pv = PyMem_Calloc(1, sizeof(*pv));
	if (!pv) {
		PyErr_NoMemory();
		return NULL;
	}
	err = rc_attach(pv, self->ring.mem_fd, self->ring.event_fd,
			RC_ROLE_PRODUCER);
	if (err) {
		PyMem_Free(pv);
		raise_rc_error(err, "cannot map the ring for producing");
		return NULL;
	}
	self->pview = pv;
	return pv;
}

static void do_close(RingObject *self)
{
	if (!self->ring.base)
		return;
	/* a child must not discard the parent's reservations nor give up
	 * its consumer role */
	ring_sync_fork(self);
	reservations_abandon(self);
	if (self->is_consumer)
		rc_release_consumer(&self->ring);
	if (self->pview) {
		rc_release_slot(self->pview);
		rc_close(self->pview);
		PyMem_Free(self->pview);
		self->pview = NULL;
	}
	rc_release_slot(&self->ring);
	rc_close(&self->ring);
	self->is_consumer = 0;
}

static void Ring_dealloc(RingObject *self)
{
	/* Reservations hold a strong reference, so none is open here. */
	if (self->weakreflist)
		PyObject_ClearWeakRefs((PyObject *)self);
	do_close(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored))
{
	if (self->consuming) {
		PyErr_SetString(RingError,
				"cannot close the ring from inside a "
				"consume_each() callback: the drain goes on "
				"reading it");
		return NULL;
	}
	if (self->waiting) {
		PyErr_SetString(RingError,
				"cannot close the ring while poll() is waiting "
				"on it in another thread");
		return NULL;
	}
	if (self->exports) {
		PyErr_Format(PyExc_BufferError,
			     "cannot close the ring: %zd memoryview(s) of its "
			     "records or reservations are still alive",
			     self->exports);
		return NULL;
	}
	do_close(self);
	Py_RETURN_NONE;
}

static PyObject *Ring_enter(RingObject *self, PyObject *Py_UNUSED(ignored))
{
	if (check_open(self))
		return NULL;
	Py_INCREF(self);
	return (PyObject *)self;
}

static PyObject *Ring_exit(RingObject *self, PyObject *const *Py_UNUSED(args),
			   Py_ssize_t Py_UNUSED(nargs))
{
	if (!Ring_close(self, NULL))
		return NULL;
	Py_RETURN_FALSE;
}

/* --- producing ----------------------------------------------------------- */

static int check_record_size(RingObject *self, Py_ssize_t size)
{
	uint64_t max = rc_max_payload(&self->ring);


	if (size < 0 || (uint64_t)size > max) {
		PyErr_Format(PyExc_ValueError,
			     "a record of %zd bytes can never fit in this ring: "
			     "the largest payload a ring of %llu bytes holds is "
			     "%llu bytes",
			     size, (unsigned long long)(self->ring.mask + 1),
			     (unsigned long long)max);
		return -1;
	}
	return 0;
}

static PyObject *Ring_output(RingObject *self, PyObject *const *args,
			     Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"data", "flags", NULL};
	struct rc_ring *pr;
	PyObject *a[2];
	Py_buffer view;
	unsigned flags;
	int rc;

	if (nargs == 1 && !kwnames) {
		a[0] = args[0];
		flags = 0;
	} else if (fast_args("output", args, nargs, kwnames, names, 1, a) ||
		   parse_flags(a[1], &flags)) {
		return NULL;
	}
	if (check_open(self) || !(pr = get_producer_view(self)) ||
	    get_bytes(a[0], &view))
		return NULL;
	if (check_record_size(self, view.len)) {
		put_bytes(&view);
		return NULL;
	}
	rc = rc_output(pr, view.buf, (uint32_t)view.len, flags);
	put_bytes(&view);
	return PyBool_FromLong(rc == 0);
}

#define BATCH 256

/* Reserve, copy and commit views[0..n) as one batch; returns records written */
static size_t output_chunk(struct rc_ring *pr, Py_buffer *views, size_t n,
			   unsigned flags)
{
	uint32_t sizes[BATCH];
	void *samples[BATCH];
	size_t i, got;

	for (i = 0; i < n; i++)
		sizes[i] = (uint32_t)views[i].len;
	got = rc_reserve_batch(pr, sizes, n, samples, NULL);
	for (i = 0; i < got; i++)
		memcpy(samples[i], views[i].buf, sizes[i]);
	rc_submit_batch(pr, samples, got, flags);
	return got;
}

static PyObject *Ring_output_many(RingObject *self, PyObject *const *args,
				  Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"records", "flags", NULL};
	Py_buffer views[BATCH];
	struct rc_ring *pr;
	PyObject *a[2], *seq;
	Py_ssize_t n, i, done = 0;
	unsigned flags;

	if (fast_args("output_many", args, nargs, kwnames, names, 1, a) ||
	    parse_flags(a[1], &flags) || check_open(self) ||
	    !(pr = get_producer_view(self)))
		return NULL;
	seq = PySequence_Fast(a[0], "output_many() needs a sequence of "
				    "bytes-like records");
	if (!seq)
		return NULL;
	n = PySequence_Fast_GET_SIZE(seq);
	/* Check every record first: a bad one raises before anything is
	 * written, so the caller never has to guess what went in. */
	for (i = 0; i < n; i++) {
		Py_buffer v;

		if (get_bytes(PySequence_Fast_GET_ITEM(seq, i), &v)) {
			PyErr_Format(PyExc_TypeError,
				     "output_many(): record %zd is not a "
				     "bytes-like object",
				     i);
			goto fail;
		}
		put_bytes(&v);
		if (check_record_size(self, v.len)) {
			PyErr_Format(PyExc_ValueError,
				     "output_many(): record %zd of %zd bytes "
				     "can never fit in this ring (largest "
				     "payload: %llu bytes)",
				     i, v.len,
				     (unsigned long long)rc_max_payload(
					     &self->ring));
			goto fail;
		}
	}
	while (done < n) {
		size_t k = (size_t)(n - done < BATCH ? n - done : BATCH), got;

		for (i = 0; i < (Py_ssize_t)k; i++)
			if (get_bytes(PySequence_Fast_GET_ITEM(seq, done + i),
				      &views[i])) {
				while (i--)
					put_bytes(&views[i]);
				goto fail;
			}
		got = output_chunk(pr, views, k, flags);
		for (i = 0; i < (Py_ssize_t)k; i++)
			put_bytes(&views[i]);
		done += (Py_ssize_t)got;
		if (got < k) {
			/* the records not even tried count as failures too */
			rc_count_failures(pr,
					  (uint64_t)(n - done) - (k - got));
			break;
		}
	}
	Py_DECREF(seq);
	return PyLong_FromSsize_t(done);
fail:
	Py_DECREF(seq);
	return NULL;
}

static PyObject *Ring_reserve(RingObject *self, PyObject *const *args,
			      Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"size", NULL};
	struct rc_ring *pr;
	PyObject *size_obj;
	Py_ssize_t size;
	uint64_t pos;
	void *sample;

	if (fast_args("reserve", args, nargs, kwnames, names, 1, &size_obj))
		return NULL;
	size = PyLong_AsSsize_t(size_obj);
	if (size == -1 && PyErr_Occurred())
		return NULL;
	if (check_open(self) || check_record_size(self, size) ||
	    !(pr = get_producer_view(self)))
		return NULL;
	sample = rc_reserve(pr, (uint32_t)size, &pos);
	if (!sample)
		Py_RETURN_NONE;
	return reservation_new(self, sample, pos, (uint32_t)size);
}

/* --- consuming ----------------------------------------------------------- */

static int consume_into(RingObject *self, PyObject *list, uint64_t max,
			int with_pos)
{
	return consume_list(&self->ring, list, max, with_pos);
}

static PyObject *Ring_consume(RingObject *self, PyObject *const *args,
			      Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"max_records", NULL};
	PyObject *max_obj, *list;
	uint64_t max;

	if (fast_args("consume", args, nargs, kwnames, names, 0, &max_obj) ||
	    parse_max(max_obj, &max) || check_consumer(self, "consume"))
		return NULL;
	list = PyList_New(0);
	if (list && consume_into(self, list, max, 0))
		Py_CLEAR(list);
	return list;
}

static PyObject *Ring_consume_with_pos(RingObject *self, PyObject *const *args,
				       Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"max_records", NULL};
	PyObject *max_obj, *list;
	uint64_t max;

	if (fast_args("consume_with_pos", args, nargs, kwnames, names, 0,
		      &max_obj) ||
	    parse_max(max_obj, &max) || check_consumer(self, "consume_with_pos"))
		return NULL;
	list = PyList_New(0);
	if (list && consume_into(self, list, max, 1))
		Py_CLEAR(list);
	return list;
}

struct each_ctx {
	RingObject *ring;
	PyObject *callback;
	RecordViewObject *view;
	int with_pos;
	int failed;
};

static int call_each(void *ctx, uint64_t pos, const void *data, uint32_t size)
{
	struct each_ctx *c = ctx;
	PyObject *mv, *res;

	c->view->data = data;
	c->view->size = size;
	mv = PyMemoryView_FromObject((PyObject *)c->view);
	if (!mv)
		goto fail;
	if (c->with_pos) {
		PyObject *args[2] = {PyLong_FromUnsignedLongLong(pos), mv};

		res = args[0] ? PyObject_Vectorcall(c->callback, args, 2, NULL)
			      : NULL;
		Py_XDECREF(args[0]);
	} else {
		res = PyObject_CallOneArg(c->callback, mv);
	}
	if (Py_REFCNT(mv) > 1) {
		/* The callback kept its view: release it, keeping the
		 * callback's own exception (if any) as the one reported. */
		PyObject *exc_type, *exc, *tb, *r;

		PyErr_Fetch(&exc_type, &exc, &tb);
		r = PyObject_CallMethod(mv, "release", NULL);
		Py_XDECREF(r);
		PyErr_Clear();
		PyErr_Restore(exc_type, exc, tb);
	}
	Py_DECREF(mv);
	c->view->data = NULL;
	/* The callback may have forked. In the child the handle is a
	 * producer now, and the drain is its parent's to finish. */
	ring_sync_fork(c->ring);
	if (!c->ring->is_consumer) {
		if (!res)
			PyErr_Clear();
		Py_XDECREF(res);
		PyErr_SetString(NotConsumerError,
				"consume_each(): this process was forked inside "
				"the callback; in the child the ring is a "
				"producer, so the drain stops here (the parent "
				"goes on with it)");
		c->failed = 1;
		return RC_SAMPLE_ABORT;
	}
	if (!res)
		goto fail;
	Py_DECREF(res);
	if (c->view->exports) {
		PyErr_SetString(PyExc_BufferError,
				"consume_each() callback kept a view of a record "
				"past the call; copy what it needs (bytes(view)) "
				"instead, the ring reuses that memory");
		goto fail;
	}
	return 0;
fail:
	c->failed = 1;
	return 1;
}

static PyObject *Ring_consume_each(RingObject *self, PyObject *const *args,
				   Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"callback", "max_records",
					    "with_pos", NULL};
	PyObject *a[3];
	struct each_ctx c = {self, NULL, NULL, 0, 0};
	uint64_t max;
	int64_t n;

	if (fast_args("consume_each", args, nargs, kwnames, names, 1, a) ||
	    parse_max(a[1], &max) || check_consumer(self, "consume_each"))
		return NULL;
	if (a[2] && (c.with_pos = PyObject_IsTrue(a[2])) < 0)
		return NULL;
	if (!PyCallable_Check(a[0])) {
		PyErr_SetString(PyExc_TypeError,
				"consume_each() callback must be callable");
		return NULL;
	}
	c.callback = a[0];
	c.view = record_view_new(self);
	if (!c.view)
		return NULL;
	self->consuming = 1;
	n = rc_consume(&self->ring, call_each, &c, max);
	self->consuming = 0;
	Py_DECREF(c.view);
	if (c.failed)
		return NULL;
	if (n == -2)
		return PyErr_NoMemory();
	if (n < 0)
		return raise_corrupt(&self->ring);
	return PyLong_FromLongLong(n);
}

/* Spin until a record is ready or `until` (monotonic seconds) passes. The
 * pause between checks keeps the spinning consumer from pulling the
 * producers' cache lines away from them on every iteration. */
static int spin_until(struct rc_ring *r, double until)
{
	for (;;) {
		for (int i = 0; i < 256; i++) {
			if (rc_ready(r))
				return 1;
			for (int j = 0; j < 16; j++)
				rc_cpu_relax();
		}
		if (now_s() >= until)
			return rc_ready(r);
	}
}

static void nap(double seconds)
{
	struct timespec ts;

	ts.tv_sec = (time_t)seconds;
	ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
	nanosleep(&ts, NULL);
}

/*
 * Wait until a record is ready, at most `timeout` seconds (< 0: forever).
 * Returns 1 when ready, 0 on timeout, -1 with an exception set.
 *
 * coalesce: when the ring is empty, first nap that long *without* announcing
 * a sleep, then look again. A consumer that is faster than its producers
 * otherwise takes records one by one as they are committed, and the two
 * sides keep pulling the same cache lines (header, payload, positions) from
 * each other; measured here, that halves a producer's rate. Napping lets a
 * batch build up that then crosses cores in bulk, and since no sleep was
 * announced, producers make no system call. Only an idle ring reaches the
 * announced sleep on the eventfd.
 */
static int wait_ready_unguarded(RingObject *self, double deadline,
				 int busy_poll, double coalesce)
{
	struct rc_ring *r = &self->ring;
	double start = now_s();
	uint64_t stall;
	int ready;

	if (rc_ready(r))
		return 1;
	/* A busy record blocks the consumer: it may belong to a dead
	 * producer, whose commit (and wakeup) will never come. Wake when it
	 * is due for a look, and let the caller consume (which steps over it
	 * if its owner is gone). */
	stall = rc_stall_recheck_ns(r);
	if (stall) {
		double due = start + (double)stall * 1e-9;

		if (deadline < 0 || due < deadline)
			deadline = due;
	}
	if (busy_poll) {
		Py_BEGIN_ALLOW_THREADS
		ready = spin_until(r, deadline < 0 ? 1e300 : deadline);
		Py_END_ALLOW_THREADS
		if (PyErr_CheckSignals())
			return -1;
		return ready || stall;
	}
	if (coalesce > 0) {
		if (deadline >= 0 && start + coalesce > deadline)
			coalesce = deadline - start;
		Py_BEGIN_ALLOW_THREADS
		nap(coalesce > 0 ? coalesce : 0);
		ready = rc_ready(r);
		Py_END_ALLOW_THREADS
		if (ready)
			return 1;
	}
	for (;;) {
		struct pollfd pfd = {r->event_fd, POLLIN, 0};
		int ms, n, saved;

		if (!rc_prepare_wait(r))
			return 1;
		if (deadline < 0) {
			ms = -1;
		} else {
			double left = deadline - now_s();

			ms = left <= 0 ? 0 : (int)(left * 1000.0 + 0.999);
		}
		Py_BEGIN_ALLOW_THREADS
		n = poll(&pfd, 1, ms);
		saved = errno;
		Py_END_ALLOW_THREADS
		rc_finish_wait(r);
		if (n < 0 && saved != EINTR) {
			errno = saved;
			PyErr_SetFromErrno(PyExc_OSError);
			return -1;
		}
		if (n < 0 && PyErr_CheckSignals())
			return -1;
		if (rc_ready(r))
			return 1;
		if (deadline >= 0 && now_s() >= deadline)
			return stall ? 1 : 0;
		/* woken for a later record while an earlier one is still
		 * busy (or by FORCE_WAKEUP): sleep again */
	}
}

/* close() from another thread must not unmap the ring under a wait that
 * released the GIL: Ring_close() refuses while one is on. */
static int wait_ready(RingObject *self, double deadline, int busy_poll,
		      double coalesce)
{
	int ready;

	self->waiting++;
	ready = wait_ready_unguarded(self, deadline, busy_poll, coalesce);
	self->waiting--;
	return ready;
}

/* 20 us: nanosleep's timer slack makes it 50-70 us in practice, far below
 * what a streaming consumer notices, and enough to double per-record
 * throughput from a Python producer (bench/ring_bench.py). */
#define DEFAULT_COALESCE 20e-6

static PyObject *Ring_poll(RingObject *self, PyObject *const *args,
			   Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"timeout", "max_records",
					    "busy_poll", "coalesce", NULL};
	PyObject *a[4], *list;
	double timeout, coalesce, deadline;
	uint64_t max;
	int busy = 0, ready;

	if (fast_args("poll", args, nargs, kwnames, names, 0, a) ||
	    parse_seconds(a[0], "timeout", &timeout) || parse_max(a[1], &max) ||
	    parse_seconds(a[3], "coalesce", &coalesce) ||
	    check_consumer(self, "poll"))
		return NULL;
	if (!a[3] || a[3] == Py_None)
		coalesce = DEFAULT_COALESCE;
	if (a[2] && (busy = PyObject_IsTrue(a[2])) < 0)
		return NULL;
	deadline = timeout < 0 ? -1 : now_s() + timeout;
	list = PyList_New(0);
	if (!list)
		return NULL;
	for (;;) {
		if (consume_into(self, list, max, 0))
			goto fail;
		if (PyList_GET_SIZE(list) ||
		    (deadline >= 0 && now_s() >= deadline))
			return list;
		ready = wait_ready(self, deadline, busy, coalesce);
		if (ready < 0)
			goto fail;
		if (!ready)
			return list;
	}
fail:
	Py_DECREF(list);
	return NULL;
}

static PyObject *Ring_prepare_wait(RingObject *self,
				   PyObject *Py_UNUSED(ignored))
{
	if (check_consumer(self, "prepare_wait"))
		return NULL;
	return PyBool_FromLong(rc_prepare_wait(&self->ring));
}

static PyObject *Ring_finish_wait(RingObject *self,
				  PyObject *Py_UNUSED(ignored))
{
	if (check_consumer(self, "finish_wait"))
		return NULL;
	rc_finish_wait(&self->ring);
	Py_RETURN_NONE;
}

static PyObject *Ring_ready(RingObject *self, PyObject *Py_UNUSED(ignored))
{
	if (check_open(self))
		return NULL;
	return PyBool_FromLong(rc_ready(&self->ring));
}

/* An event-loop consumer sleeps on fileno() with no timeout of its own, but a
 * record stuck busy by a dead producer never signals: this says when to look
 * again (then consume() steps over the record if its owner is gone). */
static PyObject *Ring_stall_recheck(RingObject *self,
				   PyObject *Py_UNUSED(ignored))
{
	if (check_consumer(self, "stall_recheck"))
		return NULL;
	return PyFloat_FromDouble((double)rc_stall_recheck_ns(&self->ring) *
				  1e-9);
}

/* --- introspection -------------------------------------------------------- */

/* The per-producer counters that query() sums, slot by slot, so a service
 * can attribute them to its producers by pid. A slot's counters only grow,
 * across owners: a freed slot (pid 0) keeps what its last owner counted. */
static PyObject *Ring_slot_stats(RingObject *self, PyObject *Py_UNUSED(ignored))
{
	PyObject *list;

	if (check_open(self))
		return NULL;
	list = PyList_New(0);
	if (!list)
		return NULL;
	for (uint32_t i = 0; i < RC_MAX_SLOTS; i++) {
		struct rc_slot *sl = &self->ring.slots[i];
		/* relaxed: counters for reporting, each read on its own */
		uint32_t pid = atomic_load_explicit(&sl->pid,
						    memory_order_relaxed);
		uint64_t sub = atomic_load_explicit(&sl->submitted,
						    memory_order_relaxed);
		uint64_t dis = atomic_load_explicit(&sl->discarded,
						    memory_order_relaxed);
		uint64_t fail = atomic_load_explicit(&sl->reserve_failures,
						     memory_order_relaxed);
		uint64_t wake = atomic_load_explicit(&sl->wakeups,
						     memory_order_relaxed);
		PyObject *t;

		if (!pid && !sub && !dis && !fail && !wake)
			continue; /* never used */
		t = Py_BuildValue("(IIKKKK)", i, pid, (unsigned long long)sub,
				  (unsigned long long)dis,
				  (unsigned long long)fail,
				  (unsigned long long)wake);
		if (!t || PyList_Append(list, t)) {
			Py_XDECREF(t);
			Py_DECREF(list);
			return NULL;
		}
		Py_DECREF(t);
	}
	return list;
}

static PyObject *Ring_query(RingObject *self, PyObject *Py_UNUSED(ignored))
{
	struct rc_query q;
	uint64_t v[12];
	PyObject *res;

	if (check_open(self))
		return NULL;
	rc_query(&self->ring, &q);
	v[0] = q.avail_data;
	v[1] = q.ring_size;
	v[2] = q.consumer_pos;
	v[3] = q.producer_pos;
	v[4] = q.submitted;
	v[5] = q.discarded;
	v[6] = q.reserve_failures;
	v[7] = q.wakeups;
	v[8] = q.abandoned_records;
	v[9] = q.abandoned_bytes;
	v[10] = q.overwrite_pos;
	v[11] = q.overwritten_bytes;
	res = PyStructSequence_New(RingQueryType);
	if (!res)
		return NULL;
	for (int i = 0; i < 12; i++) {
		PyObject *x = PyLong_FromUnsignedLongLong(v[i]);

		if (!x) {
			Py_DECREF(res);
			return NULL;
		}
		PyStructSequence_SET_ITEM(res, i, x);
	}
	return res;
}

static PyObject *Ring_snapshot(RingObject *self, PyObject *Py_UNUSED(ignored))
{
	uint64_t cons, prod;

	if (check_open(self))
		return NULL;
	cons = atomic_load_explicit(&self->ring.cons->consumer_pos,
				    memory_order_acquire);
	prod = atomic_load_explicit(&self->ring.prod->producer_pos,
				    memory_order_acquire);
	return Py_BuildValue("(KKy#)", (unsigned long long)cons,
			     (unsigned long long)prod, (char *)self->ring.data,
			     (Py_ssize_t)(self->ring.mask + 1));
}

static PyObject *Ring_fileno(RingObject *self, PyObject *Py_UNUSED(ignored))
{
	if (check_open(self))
		return NULL;
	return PyLong_FromLong(self->ring.event_fd);
}

static PyObject *Ring_after_fork_child(RingObject *self,
				       PyObject *Py_UNUSED(ignored))
{
	/* The child shares the mapping and the descriptors, and becomes a
	 * producer with a slot of its own. */
	ring_after_fork(self);
	Py_RETURN_NONE;
}

static PyObject *Ring_regions(RingObject *self, PyObject *Py_UNUSED(ignored))
{
	struct rc_ring *r = &self->ring;
	int w_cons = r->role == RC_ROLE_CONSUMER;
	int w_prod = r->role == RC_ROLE_PRODUCER;
	uint64_t size = r->mask + 1;
	unsigned char *data = r->data;

	if (check_open(self))
		return NULL;
	return Py_BuildValue(
		"[(sKKi)(sKKi)(sKKi)(sKKi)(sKKi)(sKKi)]", "ctrl",
		(unsigned long long)(uintptr_t)r->ctrl,
		(unsigned long long)sizeof(struct rc_ctrl), 0, "consumer",
		(unsigned long long)(uintptr_t)r->cons, 8ULL, w_cons, "producer",
		(unsigned long long)(uintptr_t)r->prod, 8ULL, w_prod, "slots",
		(unsigned long long)(uintptr_t)r->slots,
		(unsigned long long)sizeof(struct rc_slot), w_prod, "data",
		(unsigned long long)(uintptr_t)data, (unsigned long long)size,
		w_prod, "data_again", (unsigned long long)(uintptr_t)(data + size),
		(unsigned long long)size, w_prod);
}

static PyObject *Ring_test_park(RingObject *self, PyObject *args)
{
	unsigned int size;
	int stage, fd;
	struct rc_ring *pr;

	if (!PyArg_ParseTuple(args, "Iii:_test_park", &size, &stage, &fd) ||
	    check_open(self) || !(pr = get_producer_view(self)))
		return NULL;
	rc_test_park(pr, size, stage, fd);
	Py_RETURN_NONE; /* not reached */
}

static PyObject *Ring_get_abandon_timeout(RingObject *self,
					  void *Py_UNUSED(c))
{
	return PyFloat_FromDouble((double)self->ring.abandon_ns * 1e-9);
}

static PyObject *Ring_get_overwrite(RingObject *self, void *Py_UNUSED(c))
{
	if (check_open(self))
		return NULL;
	return PyBool_FromLong(self->ring.overwrite);
}

static PyObject *Ring_get_size(RingObject *self, void *Py_UNUSED(c))
{
	if (check_open(self))
		return NULL;
	return PyLong_FromUnsignedLongLong(self->ring.mask + 1);
}

static PyObject *Ring_get_max_record(RingObject *self, void *Py_UNUSED(c))
{
	if (check_open(self))
		return NULL;
	return PyLong_FromUnsignedLongLong(rc_max_payload(&self->ring));
}

static PyObject *Ring_get_is_consumer(RingObject *self, void *Py_UNUSED(c))
{
	ring_sync_fork(self);
	return PyBool_FromLong(self->is_consumer);
}

static PyObject *Ring_get_closed(RingObject *self, void *Py_UNUSED(c))
{
	return PyBool_FromLong(self->ring.base == NULL);
}

static PyObject *Ring_get_mem_fd(RingObject *self, void *Py_UNUSED(c))
{
	if (check_open(self))
		return NULL;
	return PyLong_FromLong(self->ring.mem_fd);
}

static PyObject *Ring_repr(RingObject *self)
{
	if (!self->ring.base)
		return PyUnicode_FromFormat("<%s closed>", Py_TYPE(self)->tp_name);
	ring_sync_fork(self);
	return PyUnicode_FromFormat("<%s size=%llu %s>", Py_TYPE(self)->tp_name,
				    (unsigned long long)(self->ring.mask + 1),
				    self->is_consumer ? "consumer" : "producer");
}

static PyMethodDef Ring_methods[] = {
	{"output", FASTCALL_KW(Ring_output), METH_FASTCALL | METH_KEYWORDS,
	 "output(data, flags=0)\n--\n\nCopy one record into the ring. False "
	 "(and counted) when there is no room; never blocks."},
	{"output_many", FASTCALL_KW(Ring_output_many),
	 METH_FASTCALL | METH_KEYWORDS,
	 "output_many(records, flags=0)\n--\n\nCopy a sequence of records in "
	 "with one reservation; returns how many went in (a prefix)."},
	{"reserve", FASTCALL_KW(Ring_reserve), METH_FASTCALL | METH_KEYWORDS,
	 "reserve(size)\n--\n\nReserve a record to write in place: a "
	 "Reservation, or None when there is no room."},
	{"consume", FASTCALL_KW(Ring_consume), METH_FASTCALL | METH_KEYWORDS,
	 "consume(max_records=None)\n--\n\nDrain committed records in order "
	 "as a list of bytes, skipping discarded ones; never blocks."},
	{"consume_with_pos", FASTCALL_KW(Ring_consume_with_pos),
	 METH_FASTCALL | METH_KEYWORDS,
	 "consume_with_pos(max_records=None)\n--\n\nAs consume(), as a list of "
	 "(position, bytes): the position is the record's resumable id."},
	{"consume_each", FASTCALL_KW(Ring_consume_each),
	 METH_FASTCALL | METH_KEYWORDS,
	 "consume_each(callback, max_records=None, with_pos=False)\n--\n\n"
	 "Call callback with a read-only memoryview of each record, valid only "
	 "during the call (with_pos: callback(position, view)). The consumer "
	 "position moves past a record only after its callback returned. "
	 "Returns the number of records."},
	{"poll", FASTCALL_KW(Ring_poll), METH_FASTCALL | METH_KEYWORDS,
	 "poll(timeout=None, max_records=None, busy_poll=False, coalesce=None)\n"
	 "--\n\n"
	 "Consume; if nothing is there, wait up to timeout seconds (None: "
	 "forever) and consume again. An empty ring is first given coalesce "
	 "seconds (None: 20 us) to build up a batch without any wakeup, then "
	 "the consumer sleeps on the eventfd. busy_poll spins instead (lowest "
	 "latency, lower throughput: the consumer then shares cache lines "
	 "with producers record by record)."},
	{"prepare_wait", (PyCFunction)Ring_prepare_wait, METH_NOARGS,
	 "prepare_wait()\n--\n\nAnnounce that the consumer is about to sleep "
	 "on fileno(). True: sleep now, a producer will signal. False: a "
	 "record is ready, consume instead."},
	{"finish_wait", (PyCFunction)Ring_finish_wait, METH_NOARGS,
	 "finish_wait()\n--\n\nThe consumer is awake again (after "
	 "prepare_wait() returned True)."},
	{"ready", (PyCFunction)Ring_ready, METH_NOARGS,
	 "ready()\n--\n\nTrue if the next record is committed."},
	{"stall_recheck", (PyCFunction)Ring_stall_recheck, METH_NOARGS,
	 "stall_recheck()\n--\n\nSeconds until the consumer should look again "
	 "at a busy record that blocks it (its producer may have died), or 0.0 "
	 "when it is not blocked."},
	{"slot_stats", (PyCFunction)Ring_slot_stats, METH_NOARGS,
	 "slot_stats()\n--\n\n[(slot, pid, submitted, discarded, "
	 "reserve_failures, wakeups)] for every producer slot ever used; pid 0: "
	 "free now. The counters of a slot only grow, across owners."},
	{"query", (PyCFunction)Ring_query, METH_NOARGS,
	 "query()\n--\n\nPositions and counters: a RingQuery."},
	{"snapshot", (PyCFunction)Ring_snapshot, METH_NOARGS,
	 "snapshot()\n--\n\n(consumer_pos, producer_pos, bytes of the data "
	 "area), for debugging and conformance checks."},
	{"fileno", (PyCFunction)Ring_fileno, METH_NOARGS,
	 "fileno()\n--\n\nThe eventfd the consumer sleeps on."},
	{"close", (PyCFunction)Ring_close, METH_NOARGS,
	 "close()\n--\n\nDiscard open reservations and unmap the ring."},
	{"__enter__", (PyCFunction)Ring_enter, METH_NOARGS, NULL},
	{"__exit__", FASTCALL_KW(Ring_exit), METH_FASTCALL, NULL},
	{"_attach_fds", (PyCFunction)(void (*)(void))Ring_attach_fds,
	 METH_VARARGS | METH_KEYWORDS | METH_CLASS,
	 "_attach_fds(mem_fd, event_fd, *, consumer=False, abandon_timeout=1.0)"
	 "\n--\n\nA handle on the ring behind these descriptors (they are "
	 "duplicated): a producer, or with consumer=True the consumer, which "
	 "resumes at the stored consumer position."},
	{"_regions", (PyCFunction)Ring_regions, METH_NOARGS,
	 "_regions()\n--\n\nThis handle's mappings: (name, address, length, "
	 "writable) tuples, for isolation tests."},
	{"_test_park", (PyCFunction)(void (*)(void))Ring_test_park,
	 METH_VARARGS,
	 "_test_park(size, stage, notify_fd)\n--\n\nTest hook: stop inside "
	 "a reservation (see rc_test_park) and block forever."},
	{"_after_fork_child", (PyCFunction)Ring_after_fork_child, METH_NOARGS,
	 NULL},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
	{"size", (getter)Ring_get_size, NULL, "Data area size in bytes.", NULL},
	{"max_record_size", (getter)Ring_get_max_record, NULL,
	 "Largest payload a record can have in this ring.", NULL},
	{"is_consumer", (getter)Ring_get_is_consumer, NULL,
	 "True for the handle that holds the ring's consumer role.", NULL},
	{"abandon_timeout", (getter)Ring_get_abandon_timeout, NULL,
	 "Seconds a busy record of a dead producer may block the consumer "
	 "before it is stepped over (0: never).", NULL},
	{"closed", (getter)Ring_get_closed, NULL, "True after close().", NULL},
	{"overwrite", (getter)Ring_get_overwrite, NULL,
	 "True for a flight-recorder ring: the newest records overwrite the "
	 "oldest instead of being refused.", NULL},
	{"_mem_fd", (getter)Ring_get_mem_fd, NULL, NULL, NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject RingType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "ringcore._ringcore.Ring",
	.tp_basicsize = sizeof(RingObject),
	.tp_dealloc = (destructor)Ring_dealloc,
	.tp_repr = (reprfunc)Ring_repr,
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
	.tp_doc = "Ring(size, *, consumer=True, abandon_timeout=1.0, "
		  "overwrite=False)\n--\n\n"
		  "A multi-producer, single-consumer ring buffer in shared "
		  "memory.",
	.tp_weaklistoffset = offsetof(RingObject, weakreflist),
	.tp_methods = Ring_methods,
	.tp_getset = Ring_getset,
	.tp_new = Ring_new,
};
