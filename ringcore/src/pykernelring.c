/* SPDX-License-Identifier: MIT */
/*
 * The KernelRing type: ringcore's consumer on a real kernel
 * BPF_MAP_TYPE_RINGBUF, opened from a map fd or a path pinned under
 * /sys/fs/bpf. It drains records with rc_consume() (consume.c) and sleeps on
 * an epoll fd watching the map fd, as libbpf's ring_buffer__poll() does: the
 * kernel wakes it after a commit when the consumer had caught up with the
 * committed record (or on BPF_RB_FORCE_WAKEUP).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "kernelring.h"
#include "pyringcore.h"

#define FASTCALL_KW(fn) ((PyCFunction)(void (*)(void))(fn))

typedef struct {
	PyObject_HEAD
	struct rc_ring ring; /* ring.cons == NULL once closed */
	int map_fd;          /* our own descriptor of the map */
	int epoll_fd;        /* watches map_fd for EPOLLIN */
	int consuming;       /* inside rc_consume(): no re-entry */
	int waiting;         /* threads inside epoll_wait() in poll() */
	PyObject *weakreflist;
} KernelRingObject;

static PyTypeObject *KernelRingQueryType;

static PyStructSequence_Field query_fields[] = {
	{"avail_data", "bytes reserved and not yet consumed (BPF_RB_AVAIL_DATA)"},
	{"ring_size", "size of the data area in bytes (BPF_RB_RING_SIZE)"},
	{"consumer_pos", "logical consumer position (BPF_RB_CONS_POS)"},
	{"producer_pos", "logical producer position (BPF_RB_PROD_POS)"},
	{NULL, NULL},
};

static PyStructSequence_Desc query_desc = {
	"ringcore.KernelRingQuery",
	"Momentary snapshot of a kernel ring buffer's positions.",
	query_fields,
	4,
};

static int check_open(KernelRingObject *self)
{
	if (!self->ring.cons) {
		PyErr_SetString(RingClosedError, "the kernel ring is closed");
		return -1;
	}
	return 0;
}

static int check_consumer(KernelRingObject *self, const char *what)
{
	if (check_open(self))
		return -1;
	if (self->consuming) {
		PyErr_Format(RingError, "%s() called while a consume is running",
			     what);
		return -1;
	}
	return 0;
}

static const char *map_type_name(uint32_t type)
{
	switch (type) {
	case BPF_MAP_TYPE_HASH:
		return "BPF_MAP_TYPE_HASH map";
	case BPF_MAP_TYPE_ARRAY:
		return "BPF_MAP_TYPE_ARRAY map";
	case BPF_MAP_TYPE_PERF_EVENT_ARRAY:
		return "BPF_MAP_TYPE_PERF_EVENT_ARRAY map";
	case 31: /* BPF_MAP_TYPE_USER_RINGBUF, not in older headers */
		return "BPF_MAP_TYPE_USER_RINGBUF map";
	case RC_NOT_A_MAP:
		return "BPF object that is not a map";
	default:
		return NULL;
	}
}

/* what: "fd 5" or the path, for the message */
static void raise_attach_error(int err, PyObject *what, uint32_t map_type)
{
	const char *name;

	switch (-err) {
	case RC_ESYS:
		PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, what);
		break;
	case RC_ENOTRINGBUF:
		name = map_type_name(map_type);
		if (name)
			PyErr_Format(PyExc_ValueError,
				     "%U is a %s, not a BPF_MAP_TYPE_RINGBUF",
				     what, name);
		else
			PyErr_Format(PyExc_ValueError,
				     "%U is a BPF map of type %u, not a "
				     "BPF_MAP_TYPE_RINGBUF (%d)",
				     what, map_type, BPF_MAP_TYPE_RINGBUF);
		break;
	default:
		PyErr_Format(RingError,
			     "%U: the ring buffer's size is not a power of 2 "
			     "multiple of the page size",
			     what);
	}
}

static void do_close(KernelRingObject *self)
{
	if (self->ring.cons)
		rc_detach_kernel(&self->ring);
	if (self->epoll_fd >= 0)
		close(self->epoll_fd);
	if (self->map_fd >= 0)
		close(self->map_fd);
	self->epoll_fd = -1;
	self->map_fd = -1;
}

static PyObject *KernelRing_new(PyTypeObject *type, PyObject *args,
				PyObject *kwds)
{
	static char *kwlist[] = {"map_fd", "path", NULL};
	PyObject *fd_obj = Py_None, *path_obj = Py_None, *path_bytes = NULL;
	struct epoll_event ev = {.events = EPOLLIN};
	KernelRingObject *self;
	PyObject *what;
	uint32_t map_type = 0;
	int fd, err;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O$O:KernelRing", kwlist,
					 &fd_obj, &path_obj))
		return NULL;
	if ((fd_obj == Py_None) == (path_obj == Py_None)) {
		PyErr_SetString(PyExc_TypeError,
				"KernelRing() takes a map fd or path= (a map "
				"pinned in bpffs): exactly one of them");
		return NULL;
	}
	if (fd_obj != Py_None) {
		int user_fd = PyObject_AsFileDescriptor(fd_obj);

		if (user_fd < 0)
			return NULL;
		fd = fcntl(user_fd, F_DUPFD_CLOEXEC, 0);
		if (fd < 0)
			return PyErr_SetFromErrno(PyExc_OSError);
		what = PyUnicode_FromFormat("fd %d", user_fd);
	} else {
		if (!PyUnicode_FSConverter(path_obj, &path_bytes))
			return NULL;
		Py_BEGIN_ALLOW_THREADS
		fd = rc_bpf_obj_get(PyBytes_AS_STRING(path_bytes));
		Py_END_ALLOW_THREADS
		if (fd < 0) {
			PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError,
							     path_obj);
			Py_DECREF(path_bytes);
			return NULL;
		}
		Py_DECREF(path_bytes);
		what = PyUnicode_FromFormat("the BPF object pinned at %R",
					    path_obj);
	}
	if (!what) {
		close(fd);
		return NULL;
	}

	self = (KernelRingObject *)type->tp_alloc(type, 0);
	if (!self) {
		Py_DECREF(what);
		close(fd);
		return NULL;
	}
	self->map_fd = fd;
	self->epoll_fd = -1;
	err = rc_attach_kernel(&self->ring, fd, &map_type);
	if (err) {
		raise_attach_error(err, what, map_type);
		Py_DECREF(what);
		Py_DECREF(self);
		return NULL;
	}
	Py_DECREF(what);
	self->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	if (self->epoll_fd < 0 ||
	    epoll_ctl(self->epoll_fd, EPOLL_CTL_ADD, fd, &ev)) {
		PyErr_SetFromErrno(PyExc_OSError);
		Py_DECREF(self);
		return NULL;
	}
	return (PyObject *)self;
}

static void KernelRing_dealloc(KernelRingObject *self)
{
	if (self->weakreflist)
		PyObject_ClearWeakRefs((PyObject *)self);
	do_close(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *KernelRing_close(KernelRingObject *self,
				  PyObject *Py_UNUSED(ignored))
{
	if (self->waiting || self->consuming) {
		/* another thread sleeps in poll() on our mappings */
		PyErr_SetString(RingError,
				"cannot close the kernel ring while poll() is "
				"waiting on it in another thread");
		return NULL;
	}
	do_close(self);
	Py_RETURN_NONE;
}

static PyObject *KernelRing_enter(KernelRingObject *self,
				  PyObject *Py_UNUSED(ignored))
{
	if (check_open(self))
		return NULL;
	Py_INCREF(self);
	return (PyObject *)self;
}

static PyObject *KernelRing_exit(KernelRingObject *self,
				 PyObject *const *Py_UNUSED(args),
				 Py_ssize_t Py_UNUSED(nargs))
{
	if (!KernelRing_close(self, NULL))
		return NULL;
	Py_RETURN_FALSE;
}

/* --- consuming ----------------------------------------------------------- */

static int consume_into(KernelRingObject *self, PyObject *list, uint64_t max,
			int with_pos)
{
	int err;

	self->consuming = 1;
	err = consume_list(&self->ring, list, max, with_pos);
	self->consuming = 0;
	return err;
}

static PyObject *consume_common(KernelRingObject *self, PyObject *const *args,
				Py_ssize_t nargs, PyObject *kwnames,
				const char *fname, int with_pos)
{
	static const char *const names[] = {"max_records", NULL};
	PyObject *max_obj, *list;
	uint64_t max;

	if (fast_args(fname, args, nargs, kwnames, names, 0, &max_obj) ||
	    parse_max(max_obj, &max) || check_consumer(self, fname))
		return NULL;
	list = PyList_New(0);
	if (list && consume_into(self, list, max, with_pos))
		Py_CLEAR(list);
	return list;
}

static PyObject *KernelRing_consume(KernelRingObject *self,
				    PyObject *const *args, Py_ssize_t nargs,
				    PyObject *kwnames)
{
	return consume_common(self, args, nargs, kwnames, "consume", 0);
}

static PyObject *KernelRing_consume_with_pos(KernelRingObject *self,
					     PyObject *const *args,
					     Py_ssize_t nargs, PyObject *kwnames)
{
	return consume_common(self, args, nargs, kwnames, "consume_with_pos", 1);
}

/*
 * As ring_buffer__poll(): epoll on the map fd, level-triggered, so it
 * reports readable while the kernel's producer_pos is ahead of consumer_pos.
 * A wakeup can find nothing to hand out (discarded records, or a record a
 * BPF program is still writing): then sleep again until the deadline.
 */
static PyObject *KernelRing_poll(KernelRingObject *self, PyObject *const *args,
				 Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"timeout", "max_records", NULL};
	PyObject *a[2], *list;
	double timeout, deadline;
	uint64_t max;

	if (fast_args("poll", args, nargs, kwnames, names, 0, a) ||
	    parse_seconds(a[0], "timeout", &timeout) || parse_max(a[1], &max) ||
	    check_consumer(self, "poll"))
		return NULL;
	list = PyList_New(0);
	if (!list)
		return NULL;
	if (consume_into(self, list, max, 0))
		goto fail;
	deadline = timeout < 0 ? -1 : now_s() + timeout;
	while (PyList_GET_SIZE(list) == 0) {
		struct epoll_event ev;
		int ms, n, saved;

		if (deadline < 0) {
			ms = -1;
		} else {
			double left = deadline - now_s();

			if (left <= 0)
				break;
			ms = (int)(left * 1000.0 + 0.999);
		}
		self->waiting++;
		Py_BEGIN_ALLOW_THREADS
		n = epoll_wait(self->epoll_fd, &ev, 1, ms);
		saved = errno;
		Py_END_ALLOW_THREADS
		self->waiting--;
		if (n < 0) {
			if (saved != EINTR) {
				errno = saved;
				PyErr_SetFromErrno(PyExc_OSError);
				goto fail;
			}
			if (PyErr_CheckSignals())
				goto fail;
			continue;
		}
		if (n == 0)
			continue; /* timed out: the deadline check ends it */
		if (consume_into(self, list, max, 0))
			goto fail;
	}
	return list;
fail:
	Py_DECREF(list);
	return NULL;
}

/* --- introspection -------------------------------------------------------- */

static void positions(KernelRingObject *self, uint64_t *cons, uint64_t *prod)
{
	/* as ringbuf_avail_data_sz() */
	*cons = atomic_load_explicit(&self->ring.cons->consumer_pos,
				     memory_order_acquire);
	*prod = atomic_load_explicit(&self->ring.prod->producer_pos,
				     memory_order_acquire);
}

static PyObject *KernelRing_query(KernelRingObject *self,
				  PyObject *Py_UNUSED(ignored))
{
	uint64_t cons, prod, v[4];
	PyObject *res;

	if (check_open(self))
		return NULL;
	positions(self, &cons, &prod);
	v[0] = prod - cons;
	v[1] = self->ring.mask + 1;
	v[2] = cons;
	v[3] = prod;
	res = PyStructSequence_New(KernelRingQueryType);
	if (!res)
		return NULL;
	for (int i = 0; i < 4; i++) {
		PyObject *x = PyLong_FromUnsignedLongLong(v[i]);

		if (!x) {
			Py_DECREF(res);
			return NULL;
		}
		PyStructSequence_SET_ITEM(res, i, x);
	}
	return res;
}

static PyObject *KernelRing_snapshot(KernelRingObject *self,
				     PyObject *Py_UNUSED(ignored))
{
	uint64_t cons, prod;

	if (check_open(self))
		return NULL;
	positions(self, &cons, &prod);
	return Py_BuildValue("(KKy#)", (unsigned long long)cons,
			     (unsigned long long)prod, (char *)self->ring.data,
			     (Py_ssize_t)(self->ring.mask + 1));
}

static PyObject *KernelRing_fileno(KernelRingObject *self,
				   PyObject *Py_UNUSED(ignored))
{
	if (check_open(self))
		return NULL;
	return PyLong_FromLong(self->epoll_fd);
}

static PyObject *KernelRing_get_size(KernelRingObject *self,
				     void *Py_UNUSED(c))
{
	if (check_open(self))
		return NULL;
	return PyLong_FromUnsignedLongLong(self->ring.mask + 1);
}

static PyObject *KernelRing_get_map_fd(KernelRingObject *self,
				       void *Py_UNUSED(c))
{
	if (check_open(self))
		return NULL;
	return PyLong_FromLong(self->map_fd);
}

static PyObject *KernelRing_get_closed(KernelRingObject *self,
				       void *Py_UNUSED(c))
{
	return PyBool_FromLong(self->ring.cons == NULL);
}

static PyObject *KernelRing_repr(KernelRingObject *self)
{
	if (!self->ring.cons)
		return PyUnicode_FromFormat("<%s closed>", Py_TYPE(self)->tp_name);
	return PyUnicode_FromFormat("<%s size=%llu map_fd=%d>",
				    Py_TYPE(self)->tp_name,
				    (unsigned long long)(self->ring.mask + 1),
				    self->map_fd);
}

static PyMethodDef KernelRing_methods[] = {
	{"consume", FASTCALL_KW(KernelRing_consume), METH_FASTCALL | METH_KEYWORDS,
	 "consume(max_records=None)\n--\n\nDrain committed records in order "
	 "as a list of bytes, skipping discarded ones; never blocks."},
	{"consume_with_pos", FASTCALL_KW(KernelRing_consume_with_pos),
	 METH_FASTCALL | METH_KEYWORDS,
	 "consume_with_pos(max_records=None)\n--\n\nAs consume(), as a list of "
	 "(position, bytes)."},
	{"poll", FASTCALL_KW(KernelRing_poll), METH_FASTCALL | METH_KEYWORDS,
	 "poll(timeout=None, max_records=None)\n--\n\nConsume; if nothing is "
	 "there, wait on the map's epoll fd up to timeout seconds (None: "
	 "forever) until records come, as ring_buffer__poll()."},
	{"fileno", (PyCFunction)KernelRing_fileno, METH_NOARGS,
	 "fileno()\n--\n\nThe epoll fd watching the map: readable while the "
	 "ring holds unconsumed data."},
	{"query", (PyCFunction)KernelRing_query, METH_NOARGS,
	 "query()\n--\n\nPositions: a KernelRingQuery (avail_data, ring_size, "
	 "consumer_pos, producer_pos)."},
	{"snapshot", (PyCFunction)KernelRing_snapshot, METH_NOARGS,
	 "snapshot()\n--\n\n(consumer_pos, producer_pos, bytes of the data "
	 "area)."},
	{"close", (PyCFunction)KernelRing_close, METH_NOARGS,
	 "close()\n--\n\nUnmap the ring and close the descriptors."},
	{"__enter__", (PyCFunction)KernelRing_enter, METH_NOARGS, NULL},
	{"__exit__", FASTCALL_KW(KernelRing_exit), METH_FASTCALL, NULL},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef KernelRing_getset[] = {
	{"size", (getter)KernelRing_get_size, NULL, "Data area size in bytes.",
	 NULL},
	{"map_fd", (getter)KernelRing_get_map_fd, NULL,
	 "This handle's own descriptor of the BPF map.", NULL},
	{"closed", (getter)KernelRing_get_closed, NULL, "True after close().",
	 NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject KernelRingType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "ringcore.KernelRing",
	.tp_basicsize = sizeof(KernelRingObject),
	.tp_dealloc = (destructor)KernelRing_dealloc,
	.tp_repr = (reprfunc)KernelRing_repr,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "KernelRing(map_fd=None, *, path=None)\n--\n\nThe consumer of "
		  "a kernel BPF_MAP_TYPE_RINGBUF, from a map fd (duplicated) or "
		  "a map pinned in bpffs.",
	.tp_weaklistoffset = offsetof(KernelRingObject, weakreflist),
	.tp_methods = KernelRing_methods,
	.tp_getset = KernelRing_getset,
	.tp_new = KernelRing_new,
};

/* called from PyInit__ringcore (module.c) */
int kernelring_add_types(PyObject *m)
{
	if (PyType_Ready(&KernelRingType) < 0)
		return -1;
	KernelRingQueryType = PyStructSequence_NewType(&query_desc);
	if (!KernelRingQueryType)
		return -1;
	if (PyModule_AddType(m, &KernelRingType) ||
	    PyModule_AddType(m, KernelRingQueryType))
		return -1;
	return 0;
}
