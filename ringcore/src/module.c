/* SPDX-License-Identifier: MIT */
/* The ringcore._ringcore module: types, exceptions, constants. */
#include "pyringcore.h"

PyObject *RingError;
PyObject *RingClosedError;
PyObject *NotConsumerError;
PyObject *ReservationError;
PyObject *RingCorruptedError;
PyObject *ConsumerBusyError;
PyObject *IncompatibleRingError;
PyTypeObject *RingQueryType;

/* pykernelring.c: readies and adds KernelRing and KernelRingQuery */
int kernelring_add_types(PyObject *m);
/* pyencoder.c: readies and adds Encoder */
int encoder_add_type(PyObject *m);

static PyStructSequence_Field query_fields[] = {
	{"avail_data", "bytes reserved and not yet consumed (BPF_RB_AVAIL_DATA)"},
	{"ring_size", "size of the data area in bytes (BPF_RB_RING_SIZE)"},
	{"consumer_pos", "logical consumer position (BPF_RB_CONS_POS)"},
	{"producer_pos", "logical producer position (BPF_RB_PROD_POS)"},
	{"submitted", "records committed with submit/output, all producers"},
	{"discarded", "records committed with discard, all producers"},
	{"reserve_failures", "reservations refused for lack of room"},
	{"wakeups", "eventfd signals producers sent to the consumer"},
	{"abandoned_records", "busy records of dead producers stepped over"},
	{"abandoned_bytes", "bytes of those records, headers included"},
	{"overwrite_pos", "overwrite mode: oldest position still intact"},
	{"overwritten_bytes", "overwrite mode: bytes overwritten unread"},
	{NULL, NULL},
};

static PyStructSequence_Desc query_desc = {
	"ringcore.RingQuery",
	"Momentary snapshot of a ring's positions and counters.",
	query_fields,
	12,
};

static struct PyModuleDef ringcore_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "ringcore._ringcore",
	.m_doc = "C core of ringcore: a BPF-style MPSC ring in shared memory.",
	.m_size = -1,
};

static PyObject *new_error(PyObject *m, const char *name, PyObject *base,
			   const char *doc)
{
	char qualname[64];
	PyObject *exc;

	PyOS_snprintf(qualname, sizeof(qualname), "ringcore.%s", name);
	exc = PyErr_NewExceptionWithDoc(qualname, doc, base, NULL);
	if (exc && PyModule_AddObjectRef(m, name, exc) < 0)
		Py_CLEAR(exc);
	return exc;
}

PyMODINIT_FUNC PyInit__ringcore(void)
{
	PyObject *m = PyModule_Create(&ringcore_module);

	if (!m)
		return NULL;
	/* every fork bumps rc_fork_epoch from now on, hooks or not */
	rc_watch_forks();
	if (PyType_Ready(&RingType) < 0 || PyType_Ready(&ReservationType) < 0 ||
	    PyType_Ready(&RecordViewType) < 0)
		goto fail;
	RingQueryType = PyStructSequence_NewType(&query_desc);
	if (!RingQueryType)
		goto fail;
	if (PyModule_AddType(m, &RingType) || PyModule_AddType(m, &ReservationType) ||
	    PyModule_AddType(m, RingQueryType))
		goto fail;
	if (kernelring_add_types(m))
		goto fail;
	if (encoder_add_type(m))
		goto fail;
	RingError = new_error(m, "RingError", PyExc_Exception,
			      "Base class of ringcore's errors.");
	if (!RingError)
		goto fail;
	RingClosedError = new_error(m, "RingClosedError", RingError,
				    "The ring handle was closed.");
	NotConsumerError = new_error(
		m, "NotConsumerError", RingError,
		"A consumer operation on a handle that is a producer.");
	ReservationError = new_error(
		m, "ReservationError", RingError,
		"A reservation used after submit/discard, or from another process.");
	RingCorruptedError = new_error(
		m, "RingCorruptedError", RingError,
		"A record header in shared memory is inconsistent.");
	ConsumerBusyError = new_error(
		m, "ConsumerBusyError", NotConsumerError,
		"The ring already has a live consumer process.");
	IncompatibleRingError = new_error(
		m, "IncompatibleRingError", RingError,
		"The memory is not a ringcore ring of this version and layout.");
	if (!RingClosedError || !NotConsumerError || !ReservationError ||
	    !RingCorruptedError || !ConsumerBusyError || !IncompatibleRingError)
		goto fail;
	if (PyModule_AddIntConstant(m, "NO_WAKEUP", RC_NO_WAKEUP) ||
	    PyModule_AddIntConstant(m, "FORCE_WAKEUP", RC_FORCE_WAKEUP) ||
	    PyModule_AddIntConstant(m, "HEADER_SIZE", RC_HDR_SZ) ||
	    PyModule_AddIntConstant(m, "BUSY_BIT", RC_BUSY_BIT) ||
	    PyModule_AddIntConstant(m, "DISCARD_BIT", RC_DISCARD_BIT) ||
	    PyModule_AddIntConstant(m, "PAGE_SIZE", (long)rc_page_size()) ||
	    PyModule_AddIntConstant(m, "MAX_SIZE", (long)RC_MAX_DATA_SZ))
		goto fail;
	return m;
fail:
	Py_DECREF(m);
	return NULL;
}
