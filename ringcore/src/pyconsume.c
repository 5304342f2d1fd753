/* SPDX-License-Identifier: MIT */
/*
 * Consumer-side helpers shared by Ring and KernelRing: argument checks and
 * draining a ring (either kind: both are read by rc_consume()) into a list.
 */
#include <time.h>

#include "pyringcore.h"

double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int parse_max(PyObject *obj, uint64_t *max)
{
	long long v;

	*max = 0;
	if (!obj || obj == Py_None)
		return 0;
	v = PyLong_AsLongLong(obj);
	if (v == -1 && PyErr_Occurred())
		return -1;
	if (v <= 0) {
		PyErr_Format(PyExc_ValueError,
			     "max_records must be a positive int or None, not %lld",
			     v);
		return -1;
	}
	*max = (uint64_t)v;
	return 0;
}

int parse_seconds(PyObject *obj, const char *name, double *out)
{
	if (!obj || obj == Py_None) {
		*out = -1;
		return 0;
	}
	*out = PyFloat_AsDouble(obj);
	if (*out == -1 && PyErr_Occurred())
		return -1;
	if (*out < 0) {
		PyErr_Format(PyExc_ValueError, "%s must be >= 0 or None", name);
		return -1;
	}
	return 0;
}

struct collect_ctx {
	PyObject *list;
	int with_pos;
	int failed;
};

static int collect(void *ctx, uint64_t pos, const void *data, uint32_t size)
{
	struct collect_ctx *c = ctx;
	PyObject *item = PyBytes_FromStringAndSize(data, size);

	if (item && c->with_pos)
		item = Py_BuildValue("(KN)", (unsigned long long)pos, item);
	if (!item || PyList_Append(c->list, item)) {
		Py_XDECREF(item);
		c->failed = 1;
		return 1;
	}
	Py_DECREF(item);
	return 0;
}

PyObject *raise_corrupt(struct rc_ring *r)
{
	PyErr_Format(RingCorruptedError,
		     "corrupt record header or positions at consumer position "
		     "%llu",
		     (unsigned long long)atomic_load(&r->cons->consumer_pos));
	return NULL;
}

int consume_list(struct rc_ring *r, PyObject *list, uint64_t max, int with_pos)
{
	struct collect_ctx c = {list, with_pos, 0};
	int64_t n = rc_consume(r, collect, &c, max);

	if (c.failed)
		return -1;
	if (n == -2) {
		PyErr_NoMemory();
		return -1;
	}
	/* Records taken before the corrupt one are handed out; the consumer
	 * position stays at the corrupt record, so the next call reports it.
	 * Nothing already accepted is lost to the exception. */
	if (n == -1 && PyList_GET_SIZE(list) > 0)
		return 0;
	if (n < 0) {
		raise_corrupt(r);
		return -1;
	}
	return 0;
}
